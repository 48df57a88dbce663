"""The health evaluation (core loop, once a second) is cancelled at shutdown like any task: a cancel must never leave
a machine's state changed without the event that reports the change (its state is persisted at shutdown, the event
would be lost for good)."""

from __future__ import annotations

import asyncio
import time

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.runtime import Gateway
from gateway.store import OutboxRow
from simulators.ports import free_port
from tests.e2e import IDENT, wait_until


async def test_a_cancelled_evaluation_changes_no_machine_state(tmp_path):
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"port": free_port()}, "store": {"path": str(tmp_path / "gw.db")},
        "alarms": {"machine_unreachable_s": 0.01},
        # a PLC that is not there: its connector is down from the start (it is never started here)
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": free_port(), "unit_id": 1}],
        "machines": [{"id": "press-1", "counters": {"good": {"connector": "mb", "address": 0}}}],
    }, "<test>")
    gw = Gateway(cfg)
    await gw.store.open()
    try:  # the engines as the gateway's start builds them
        gw.core.restore(await gw.store.load_states(), gw.store.next_seq,
                        EventEncoder(cfg.gateway, gw.topics, gw.store.epoch))
        await gw.store.commit({}, [OutboxRow(1, "press-1", "x", "t/x", b"{}")], 2)  # an unsent row: the age query
        eng = gw.engines["press-1"]
        assert await gw.health.evaluate() == []  # the connector is seen down from now on
        await wait_until(lambda: time.monotonic() - gw.health._down_since["connector.mb"] > 0.05, 2)

        gate = asyncio.Event()
        entered = asyncio.Event()
        real = gw.store.oldest_unacked_created

        async def slow_oldest(*a, **kw):  # the store's thread busy with a large commit
            entered.set()
            await gate.wait()
            return await real(*a, **kw)

        gw.store.oldest_unacked_created = slow_oldest
        task = asyncio.create_task(gw.health.evaluate())
        await asyncio.wait_for(entered.wait(), 5)
        task.cancel()  # the gateway stops now
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert eng.machine_state != "unreachable" and not eng.dirty, \
            "the machine was marked unreachable, and the event saying so was cancelled with the evaluation"

        gate.set()
        drafts = await gw.health.evaluate()  # the next evaluation reports it
        assert [(d.type, d.data.state) for d in drafts] == [("machine.state_changed", "unreachable")]
        assert eng.machine_state == "unreachable"
    finally:
        await gw.store.close()
