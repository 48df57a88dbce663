"""A committed counter baseline is never older than half the counter's wrap period (``core.checkpoint_interval``),
so a crash and a restart find a decrease that is one rollover, not an ambiguous one. An OPC UA counter whose width is
not configured is 32-bit until the connector learns its node's width at connect (``apply_tag_types``): the
checkpoint interval must follow that width. Real store (SQLite), core driven by hand on a simulated clock."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

import gateway.core as core_mod
from connectors.base import TagType
from gateway.config import parse_config
from gateway.core import CoreCall
from gateway.counter_specs import apply_tag_types
from gateway.events import EventEncoder
from gateway.orders import OrderCommand
from gateway.runtime import Gateway
from mappings.machine import OrderContext
from mappings.samples import Sample
from tests.e2e import IDENT

RATE = 1200  # parts/s; max_rate 2000/s: a 16-bit counter wraps in 32.8 s at max_rate (checkpoint every 16.4 s)


def config(tmp_path: Any, bits: int | None) -> Any:
    good: dict[str, Any] = {"connector": "opc", "node_id": "ns=2;s=good", "max_rate": 2000}
    if bits:
        good["bits"] = bits
    return parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1", "security": "none"}],
        "machines": [{"id": "m1", "order_source": "mqtt", "counters": {"good": good},
                      "reporting": {"interval_s": 3600, "jitter": 0}}]}, "<test>")


@pytest.mark.parametrize("configured_bits", [None, 16])  # the width from the server, and from the config
def test_a_crash_with_a_wrap_during_the_downtime_loses_nothing(tmp_path, monkeypatch, configured_bits):
    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(core_mod, "time", SimpleNamespace(monotonic=lambda: 1000 + clock.t,
                                                          time=lambda: 1.7e9 + clock.t))
    cfg = config(tmp_path, configured_bits)
    start_value = 27256  # wraps at t = 31.9 s: during the downtime below
    staged: list[Any] = []

    async def start() -> Gateway:
        gw = Gateway(cfg)
        await gw.store.open()
        gw.core.ticker = None
        gw.core.restore(await gw.store.load_states(), gw.store.next_seq,
                        EventEncoder(cfg.gateway, gw.topics, gw.store.epoch))
        gw.core.on_staged = staged.extend
        # the connector reports the node's data type at connect, before the first sample
        gw.core.put(CoreCall(lambda core: apply_tag_types(cfg, gw.specs, core,
                                                          {"m1/good": TagType("UInt16", "integer", 16, False)})))
        return gw

    async def poll(gw: Gateway) -> None:
        wall = 1.7e9 + clock.t
        value = (start_value + round(RATE * clock.t)) % 65536
        gw.core.on_samples([Sample("m1/good", value, True, wall, wall, "Good", 1000 + clock.t)])
        gw.core.round()
        await gw.core.commit()

    async def main() -> tuple[int, list[Any], float]:
        gw = await start()
        await poll(gw)  # the baseline
        clock.t = 0.5
        await poll(gw)
        gw.core.stage(gw.core.apply_order(OrderCommand("m1", OrderContext("A", "10"), "mqtt", needs_cut=False)))
        await gw.core.commit()
        while clock.t < 29.5:
            clock.t = round(clock.t + 0.5, 3)
            await poll(gw)
        checkpoint_s = gw.core.checkpoint_s
        await gw.store.close()  # the process dies at t = 29.5 s: nothing more is committed
        clock.t = 33.9  # back 4.4 s later; the counter wrapped at 31.9 s meanwhile
        gw = await start()
        await poll(gw)
        counted = sum(int(d.data["quantities"]["yield"]) for d in staged
                      if d.type == "operation.quantity_reported") + int(gw.engines["m1"].window.q["good"])
        await gw.store.close()
        return counted, [d.data.to_dict() for d in staged if d.type == "counter.anomaly"], checkpoint_s

    counted, anomalies, checkpoint_s = asyncio.run(main())
    assert checkpoint_s == pytest.approx(65536 / 2000 / 2)
    assert (counted, anomalies) == (round(RATE * 33.9), []), json.dumps(anomalies)
