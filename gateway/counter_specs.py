"""Config bindings → counter-engine specs (the one place that turns a counter/meter config into a CounterSpec).

An integer counter wraps at its modulus (``counter_modulus``: max_value, bits, the Modbus data type, or 32-bit). A
float meter (``resolution`` set) has no modulus: the engine counts whole resolution steps, so its rate limit and
noise band are converted to steps here and its quantity per step is ``resolution x scale``."""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog

from connectors.base import CounterType, TagType
from gateway.config import CounterConfig, counter_modulus
from gateway.core import counter_checkpoint
from mappings.counters import REORDER_WINDOW_S, CounterSpec
from mappings.machine import CounterBinding, MachineSpec

log = structlog.get_logger(__name__)


_SHARED: dict[Any, Any] = {}


def shared(x: Any) -> Any:
    """One instance per distinct value of an immutable spec: 3,333 machines with the same three counters hold three
    CounterBindings, not 10,000 (~3.5 MB at that size). Bounded: cleared when it grows past 10,000 entries."""
    if len(_SHARED) > 10_000:
        _SHARED.clear()
    return _SHARED.setdefault(x, x)


def reorder_windows(connectors: list[Any]) -> dict[str, float]:
    """Per connector id: how much older than a counter's baseline a sample may arrive and still be a late delivery
    (not a clock step). An OPC UA subscription holds values up to its publishing interval before it sends them (and
    a publish may come later still, up to the request timeout), while the changeover's cut read returns the current
    value at once: the values queued before it must not look like a decrease (nor be counted again)."""
    out = {}
    for c in connectors:
        p = getattr(c, "publishing_interval_ms", None)
        out[c.id] = REORDER_WINDOW_S if p is None else max(REORDER_WINDOW_S, 2 * p / 1000 + c.timeout_s)
    return out


def counter_binding(name: str, b: CounterConfig, addr: Any, reorder_window_s: float = REORDER_WINDOW_S
                    ) -> CounterBinding:
    resolution = getattr(b, "resolution", None)
    if resolution is None:
        modulus, signed = counter_modulus(b, addr)
        return shared(CounterBinding(CounterSpec(name=name, mode=b.mode, modulus=modulus, signed=signed,
                                                 max_rate=b.max_rate, reorder_window_s=reorder_window_s), b.scale))
    noise = getattr(b, "noise", None)
    jitter = 1 if noise is None else int(noise / resolution)
    spec = CounterSpec(name=name, mode=b.mode, modulus=None, signed=True, max_rate=b.max_rate / float(resolution),
                       resolution=resolution, jitter=jitter, reorder_window_s=reorder_window_s)
    return shared(CounterBinding(spec, b.scale * resolution))


def counter_type(b: Any) -> CounterType:
    """What the config says about a counter's register, for the connector's check against the server."""
    return shared(CounterType(bits=b.bits, signed=b.signed, max_value=b.max_value is not None,
                              float_meter=getattr(b, "resolution", None) is not None))


def width_from_server(b: CounterConfig, current: CounterSpec, t: TagType) -> CounterSpec | None:
    """The spec of an integer counter whose width is not configured (no bits, no max_value), with the width and
    signedness of its node on the server; None when the config decides (or the node is not an integer)."""
    if t.kind != "integer" or t.bits is None or b.bits is not None or b.max_value is not None \
            or getattr(b, "resolution", None) is not None:
        return None
    signed = b.signed if b.signed is not None else t.signed
    return dataclasses.replace(current, modulus=2**t.bits, signed=signed)


def apply_tag_types(cfg: Any, specs: dict[str, MachineSpec], core: Any, types: dict[str, TagType]) -> None:
    """In the core (``CoreCall``): give each counter whose width is not configured the width of its node on the
    server (a UInt16 counter wraps at 2**16). The engine's counter state is kept."""
    machines = {m.id: m for m in cfg.machines}
    for key, t in types.items():
        route = core.routes.signal.get(key)
        eng = core.engines.get(route[0]) if route else None
        if eng is None:
            continue
        machine, signal = route
        m, spec = machines[machine], specs[machine]
        material = signal.removeprefix("material:") if signal.startswith("material:") else None
        b = m.materials.get(material) if material is not None else m.counters.get(signal)
        current = (spec.materials[material].binding if material is not None else spec.counters[signal]).spec \
            if b is not None else None
        new = width_from_server(b, current, t) if b is not None and current is not None else None
        if new is not None and eng.set_counter_spec(signal, new):
            log.info("counter.width_from_server", machine=machine, counter=signal, data_type=t.data_type,
                     modulus=new.modulus, signed=new.signed)
            # a narrower counter wraps sooner: its committed baseline must not get older than half a wrap period
            core.checkpoint_s = min(core.checkpoint_s, counter_checkpoint(new))
