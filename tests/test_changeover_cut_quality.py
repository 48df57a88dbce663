"""A changeover's cut read must be a good read: a counter the OPC UA server answers with a Bad status (the PLC behind
it unreachable: BadCommunicationError) is no cut. The changeover is held until a good read, so the parts made for the
old order meanwhile are booked to it, never to the next one (docs/counting.md, "Order changeover"). Real
OpcUaConnector against the asyncua machine simulator, the gateway's core driven round by round (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.orders import OrderCommand
from gateway.runtime import Gateway
from mappings.machine import OrderContext
from simulators.machine import MachineModel
from simulators.opcua_server import OpcUaMachineServer
from tests.e2e import IDENT
from tests.faults import start_on_free_port


def make_gateway(tmp_path: Any, server: OpcUaMachineServer, counters: tuple[str, ...] = ("good",), *,
                 complete: bool = False, publishing_ms: int = 50) -> Gateway:
    machine: dict[str, Any] = {"id": "press-1", "order_source": "mqtt", "reporting": {"interval_s": 3600},
                               "counters": {c: {"connector": "opc", "node_id": server.node_ids[c], "max_rate": 1000}
                                            for c in counters}}
    if complete:
        machine["complete_tag"] = {"connector": "opc", "node_id": server.node_ids["complete"]}
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": server.endpoint, "security": "none",
                        "publishing_interval_ms": publishing_ms, "sampling_interval_ms": 0, "timeout_s": 1.0}],
        "machines": [machine],
    }, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    return gw


async def pump(gw: Gateway, until: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Run core rounds until ``until()`` holds (the connector's samples and the cut's result go through the inbox)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not until():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
        gw.core.round()


def order(gw: Gateway) -> tuple[str, str] | None:
    c = gw.engines["press-1"].context
    return None if c is None else (c.order, c.operation)


def booked(gw: Gateway) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for r in gw.core.uncommitted:
        ev = json.loads(r.payload)
        if ev["type"] == "operation.quantity_reported":
            d = ev["data"]
            key = (d["order"], d["operation"])
            out[key] = out.get(key, 0) + int(d["quantities"]["yield"])
    return out


@contextlib.asynccontextmanager
async def connected(gw: Gateway) -> AsyncIterator[None]:
    task = asyncio.create_task(gw.connectors["opc"].run())
    try:
        yield
    finally:
        gw.core.cancel_cuts()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


async def test_a_changeover_waits_for_a_good_cut_read(tmp_path):
    model = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.0)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port))
    try:
        gw = make_gateway(tmp_path, server)
        cell = gw.engines["press-1"].counters["good"]

        def dispatch(o: str, op: str) -> None:
            model.set_order(o, op)
            gw.core._order_command(OrderCommand("press-1", OrderContext(o, op), "mqtt"))

        async def make(parts: int) -> None:
            for _ in range(parts):
                model.make_part()
            await server.flush()

        async with connected(gw):
            await pump(gw, lambda: cell.last == 0, "the baseline")
            dispatch("A", "10")
            await pump(gw, lambda: order(gw) == ("A", "10"), "order A")
            await make(10)
            await pump(gw, lambda: cell.last == 10, "10 parts")
            await server.set_bad("good")  # the PLC behind the server is unreachable
            await make(20)  # made for A, not readable yet
            gw.core._order_command(OrderCommand("press-1", OrderContext("B", "20"), "mqtt"))
            await pump(gw, lambda: gw.core.stats.cut_read_failures >= 1 or "press-1" not in gw.core.cuts,
                       "a cut read of the Bad counter")
            assert "press-1" in gw.core.cuts and order(gw) == ("A", "10"), "the changeover must wait for a good read"
            await server.set_bad("good", False)
            await pump(gw, lambda: not gw.core.cuts and order(gw) == ("B", "20"), "the changeover after a good read")
            model.set_order("B", "20")
            await make(5)
            await pump(gw, lambda: cell.last == 35, "5 parts for B")
            gw.core.stage(gw.engines["press-1"].flush("test", 0))
        assert booked(gw) == {("A", "10"): 30, ("B", "20"): 5}
        assert model.truth_for("A", "10")["good"] == 30 and model.truth_for("B", "20")["good"] == 5
    finally:
        await server.stop()


async def test_an_unexpected_error_of_the_cut_read_is_retried_not_a_changeover_stuck_for_ever(tmp_path):
    """The connector's read raises something no one expected (here a RuntimeError, e.g. the OPC UA client being torn
    down under it) once: the cut read's task ended with it, the machine stayed in a cut that never completed, and
    every later order command queued behind it until a restart (red before). It is retried like a failed read."""
    model = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.0)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port))
    try:
        gw = make_gateway(tmp_path, server)
        cell = gw.engines["press-1"].counters["good"]
        conn = gw.connectors["opc"]
        real_read = conn.read
        calls = {"n": 0}

        async def flaky_read(keys, timeout=2.0):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("client torn down")
            return await real_read(keys, timeout)

        async with connected(gw):
            await pump(gw, lambda: cell.last == 0, "the baseline")
            conn.read = flaky_read
            gw.core._order_command(OrderCommand("press-1", OrderContext("A", "10"), "mqtt"))
            await pump(gw, lambda: order(gw) == ("A", "10"), "order A after the retried cut read")
            assert calls["n"] >= 2 and not gw.core.cuts and gw.core.stats.cut_read_failures == 1
    finally:
        await server.stop()


async def test_a_counter_that_stays_bad_does_not_hold_the_changeover_for_ever(tmp_path, monkeypatch):
    """One counter node stays Bad (removed by a PLC program change): after CUT_PARTIAL_AFTER_S the changeover is cut
    with the good counters and logged (changeover.cut_partial); the parts made after it go to the new order (red
    before: the cut was retried for ever, every part of every counter booked to the old order)."""
    import structlog

    from gateway import core as core_module

    monkeypatch.setattr(core_module, "CUT_PARTIAL_AFTER_S", 0.5)
    model = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.0)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port))
    try:
        gw = make_gateway(tmp_path, server, ("good", "scrap"))
        cell = gw.engines["press-1"].counters["good"]

        async def make(parts: int) -> None:
            for _ in range(parts):
                model.make_part()
            await server.flush()

        with structlog.testing.capture_logs() as logs:
            async with connected(gw):
                await pump(gw, lambda: cell.last == 0, "the baseline")
                model.set_order("A", "10")
                gw.core._order_command(OrderCommand("press-1", OrderContext("A", "10"), "mqtt"))
                await pump(gw, lambda: order(gw) == ("A", "10"), "order A")
                await server.set_bad("scrap")
                await make(10)
                await pump(gw, lambda: cell.last == 10, "10 parts")
                model.set_order("B", "20")
                gw.core._order_command(OrderCommand("press-1", OrderContext("B", "20"), "mqtt"))
                await pump(gw, lambda: not gw.core.cuts and order(gw) == ("B", "20"), "the changeover, partial")
                await make(5)
                await pump(gw, lambda: cell.last == 15, "5 parts for B")
                gw.core.stage(gw.engines["press-1"].flush("test", 0))
        assert booked(gw) == {("A", "10"): 10, ("B", "20"): 5}
        [partial] = [e for e in logs if e["event"] == "changeover.cut_partial"]
        assert partial["machine"] == "press-1" and partial["without"][0].startswith("press-1/scrap: Bad")
        assert gw.core.stats.cut_partial == 1
    finally:
        await server.stop()


async def test_a_completion_flag_raised_before_a_dispatch_completes_the_old_operation(tmp_path):
    """ERP dispatches (order_source mqtt) plus the PLC's completion flag: the flag rises for A, then B is dispatched
    at once. The cut read takes the flag with the counters (a Read answers at once; the subscription publishes every
    1.5 s here), so A is completed with its parts before B starts; the flag's notification that comes later is a
    late delivery (red before: it completed B with 0 parts, A was never final-confirmed and B's dispatch was refused
    from then on)."""
    model = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.0)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port))
    try:
        gw = make_gateway(tmp_path, server, complete=True, publishing_ms=1500)
        cell = gw.engines["press-1"].counters["good"]
        tracker = gw.core.tags.trackers["press-1"]
        async with connected(gw):
            await pump(gw, lambda: cell.last == 0 and tracker.complete_level is False, "the baselines")
            model.set_order("A", "10")
            gw.core._order_command(OrderCommand("press-1", OrderContext("A", "10"), "mqtt"))
            await pump(gw, lambda: order(gw) == ("A", "10"), "order A")
            for _ in range(12):
                model.make_part()
            model.complete_operation()
            await server.flush()
            gw.core._order_command(OrderCommand("press-1", OrderContext("B", "20"), "mqtt"))
            await pump(gw, lambda: not gw.core.cuts and order(gw) == ("B", "20"), "B after the cut")
            await asyncio.sleep(2.0)  # the next publish: the flag's (and the counter's) notifications, late
            for _ in range(5):
                gw.core.round()
                await asyncio.sleep(0.05)
            assert order(gw) == ("B", "20"), "the late flag notification must not complete B"
        events = [json.loads(r.payload) for r in gw.core.uncommitted]
        completed = [(e["data"]["order"], e["data"]["totals"]["yield"]) for e in events
                     if e["type"] == "operation.completed"]
        assert completed == [("A", "12")]
        assert booked(gw) == {("A", "10"): 12}
        assert gw.core.refusal(OrderCommand("press-1", OrderContext("B", "20"), "mqtt")) is None
    finally:
        await server.stop()


def test_late_completion_flag_values_after_the_cut_read_do_not_complete_again():
    """The cut read took the flag high (source time 10.0); the publish of the values queued before it delivers low
    (9.0) and high (10.0) again: late deliveries, no second rising edge (red without the source-time check: the new
    operation was completed). A value older by more than FLAG_REORDER_S is a clock step and used."""
    from gateway.orders import FLAG_REORDER_S, TagOrderTracker
    from mappings.samples import Sample

    def flag(v: int, t: float) -> Sample:
        return Sample("m1/complete", v, True, recv_time=t, source_time=t)

    tr = TagOrderTracker("m1")
    assert [tr.complete_flag(flag(v, t)) for v, t in [(0, 1.0), (1, 10.0), (0, 9.0), (1, 10.0)]] == \
        [False, True, False, False]
    # a PLC stamping whole seconds: a pulse within one second, then the next completion (both are edges)
    assert [tr.complete_flag(flag(v, t)) for v, t in [(0, 10.0), (1, 50.0), (0, 50.0), (1, 90.0)]] == \
        [False, True, False, True]
    assert [tr.complete_flag(flag(v, t)) for v, t in [(0, 10.0 - FLAG_REORDER_S - 1), (1, 10.0 - FLAG_REORDER_S)]] \
        == [False, True]
