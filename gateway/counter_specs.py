"""Config bindings → counter-engine specs (the one place that turns a counter/meter config into a CounterSpec).

An integer counter wraps at its modulus (``counter_modulus``: max_value, bits, the Modbus data type, or 32-bit). A
float meter (``resolution`` set) has no modulus: the engine counts whole resolution steps, so its rate limit and
noise band are converted to steps here and its quantity per step is ``resolution x scale``."""

from __future__ import annotations

from typing import Any

from gateway.config import CounterConfig, counter_modulus
from mappings.counters import CounterSpec
from mappings.machine import CounterBinding


def counter_binding(name: str, b: CounterConfig, addr: Any) -> CounterBinding:
    resolution = getattr(b, "resolution", None)
    if resolution is None:
        modulus, signed = counter_modulus(b, addr)
        return CounterBinding(CounterSpec(name=name, mode=b.mode, modulus=modulus, signed=signed, max_rate=b.max_rate),
                              b.scale)
    noise = getattr(b, "noise", None)
    jitter = 1 if noise is None else int(noise / resolution)
    spec = CounterSpec(name=name, mode=b.mode, modulus=None, signed=True, max_rate=b.max_rate / float(resolution),
                       resolution=resolution, jitter=jitter)
    return CounterBinding(spec, b.scale * resolution)
