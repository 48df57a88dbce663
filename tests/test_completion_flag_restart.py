"""The PLC's completion flag as last seen is committed with the machine: a flag that rose while the gateway was stopped
is a rising edge when it is seen again, and completes the operation (red before: the first value after a start only
set the level, so the operation was never final-confirmed and the next job's parts were booked to it). A flag seen
high before the stop completes nothing again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.orders import OrderCommand
from gateway.runtime import Gateway
from mappings.machine import OrderContext
from mappings.samples import Sample
from tests.e2e import IDENT


def _cfg(tmp: Path):
    tag = lambda n: {"connector": "opc", "node_id": f"ns=2;s=m1.{n}"}  # noqa: E731
    return parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp / "gw.db")},
                         "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1"}],
                         "machines": [{"id": "m1", "order_source": "mqtt", "reporting": {"interval_s": 3600},
                                       "counters": {"good": {**tag("good"), "max_rate": 1000}},
                                       "complete_tag": tag("complete")}]}, "<test>")


async def _start(cfg) -> Gateway:
    gw = Gateway(cfg)
    await gw.store.open()
    gw.core.restore(await gw.store.load_states(), gw.store.next_seq,
                    EventEncoder(cfg.gateway, gw.topics, gw.store.epoch))
    return gw


def _s(key: str, value: Any, t: float) -> Sample:
    return Sample(key, value, True, recv_time=t, source_time=t)


def _feed(gw: Gateway, *samples: Sample) -> None:
    gw.core.stage(gw.core.apply_samples(list(samples)))


async def _completed(gw: Gateway) -> list[tuple[str, str]]:
    out = []
    for r in await gw.store.export_rows("outbox"):
        e = r["payload"] if isinstance(r["payload"], dict) else json.loads(r["payload"])
        if e["type"] == "operation.completed":
            out.append((e["data"]["order"], e["data"]["totals"]["yield"]))
    return out


async def test_a_flag_that_rose_while_the_gateway_was_stopped_completes_the_operation(tmp_path):
    cfg = _cfg(tmp_path)
    gw = await _start(cfg)
    _feed(gw, _s("m1/good", 0, 1), _s("m1/complete", 0, 1))
    gw.core.stage(gw.core.apply_order(OrderCommand("m1", OrderContext("A", "10"), "mqtt")))
    _feed(gw, _s("m1/good", 30, 2))
    await gw.core.commit(force=True)
    await gw.store.close()
    # stopped; the PLC finishes A (42 parts) and raises its flag
    gw = await _start(cfg)
    try:
        _feed(gw, _s("m1/good", 42, 10), _s("m1/complete", 1, 10))
        await gw.core.commit(force=True)
        assert await _completed(gw) == [("A", "42")]
        assert gw.engines["m1"].context is None
    finally:
        await gw.store.close()
    # and again: the flag still up completes nothing more
    gw = await _start(cfg)
    try:
        _feed(gw, _s("m1/good", 42, 20), _s("m1/complete", 1, 20))
        await gw.core.commit(force=True)
        assert await _completed(gw) == [("A", "42")]
    finally:
        await gw.store.close()
