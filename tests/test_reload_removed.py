"""A reload that removes a machine commits its state with the events it staged at that moment, in one commit (red
before: the state went to the store alone, its events only later: a crash in between lost them)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.reload import Reloader, plan
from gateway.runtime import Gateway
from mappings.samples import Sample
from tests.e2e import IDENT


def _machine(m: str, c: str) -> dict:
    tag = lambda node: {"connector": c, "node_id": f"ns=2;s={m}.{node}"}  # noqa: E731
    return {"id": m, "order_source": "tag", "counters": {"good": {**tag("good"), "max_rate": 1000}},
            "order_tag": tag("order"), "operation_tag": tag("op"), "reporting": {"interval_s": 3600}}


def _cfg(tmp: Path, machines: list[tuple[str, str]]):
    return parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp / "gw.db")},
        "connectors": [{"type": "opcua", "id": c, "endpoint": "opc.tcp://127.0.0.1:1"} for c in sorted({c for _, c in machines})],
        "machines": [_machine(m, c) for m, c in machines]}, "<test>")


def _s(key: str, value, t: float) -> Sample:
    return Sample(key, value, True, recv_time=t, source_time=t)


async def _started(gw: Gateway):
    """The gateway's core restored from its (open) store, as at start, and a feed of sample batches into it."""
    core = gw.core
    core.restore(await gw.store.load_states(), gw.store.next_seq, EventEncoder(gw.cfg.gateway, gw.topics,
                                                                                gw.store.epoch))
    gw.started.set()

    def feed(batch: list[Sample]) -> None:
        core.stage(core.apply_samples(batch))

    return core, feed


async def test_a_removed_machines_state_is_committed_with_the_events_of_its_held_order_switch(tmp_path):
    """m2's PLC order tags switch from A/10 to B/20 and the switch is still pending (settling) when a reload removes
    m2: the reload applies the switch (the changeover report of A's 25 parts and B's start are staged) and commits
    m2's state. That commit must carry those events."""
    old = _cfg(tmp_path, [("m1", "opc1"), ("m2", "opc2")])
    new = _cfg(tmp_path, [("m1", "opc1")])
    gw = Gateway(old)
    await gw.store.open()
    try:
        core, feed = await _started(gw)

        feed([_s("m2/order", "A", 1.0), _s("m2/operation", "10", 1.0), _s("m2/good", 0, 1.0)])
        feed([_s("m2/good", 5, 2.0)])
        await core.commit(force=True)
        feed([_s("m2/good", 25, 3.0)])
        feed([_s("m2/order", "B", 4.0), _s("m2/operation", "20", 4.0)])  # pending: settles later
        assert "m2" in core.tags.pending
        commits: list[tuple[set[str], list[tuple[str, str]]]] = []
        real = gw.store.commit

        async def spy(states, rows, next_seq):
            commits.append((set(states), [(r.machine, r.type) for r in rows]))
            return await real(states, rows, next_seq)

        gw.store.commit = spy  # type: ignore[method-assign]
        await Reloader(gw, "reload")._apply(new, plan(gw.cfg, new))
        with_m2 = [rows for states, rows in commits if "m2" in states]
        assert with_m2, commits
        assert ("m2", "operation.quantity_reported") in with_m2[0] and ("m2", "operation.started") in with_m2[0]
        reports = [r["payload"] if isinstance(r["payload"], dict) else json.loads(r["payload"])
                   for r in await gw.store.export_rows("outbox")
                   if r["machine"] == "m2" and r["type"] == "operation.quantity_reported"]
        assert [(e["data"]["order"], e["data"]["quantities"]["yield"]) for e in reports][-1] == ("A", "25")
    finally:
        await gw.store.close()


async def test_a_reload_of_another_machine_keeps_a_pending_plc_order_switch(tmp_path):
    """m2's PLC order tags switched A/10 -> B/20 and the switch is pending (settling) when a reload changes only m1:
    m2 keeps its tracker and its pending switch, so the parts made after it go to B/20 (red at c5af0d6: the pending
    carry-over had slipped under another branch and m2's next parts went to A/10)."""
    import asyncio

    def cfg(m1_interval: float):
        ms = [_machine("m1", "opc1"), _machine("m2", "opc2")]
        ms[0]["reporting"] = {"interval_s": m1_interval}
        return parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
                             "connectors": [{"type": "opcua", "id": c, "endpoint": "opc.tcp://127.0.0.1:1"}
                                            for c in ("opc1", "opc2")],
                             "machines": ms}, "<test>")

    old, new = cfg(3600), cfg(1800)
    gw = Gateway(old)
    await gw.store.open()
    try:
        core, feed = await _started(gw)

        feed([_s("m2/order", "A", 1.0), _s("m2/operation", "10", 1.0), _s("m2/good", 0, 1.0)])
        feed([_s("m2/good", 25, 3.0)])
        feed([_s("m2/order", "B", 4.0), _s("m2/operation", "20", 4.0)])  # settling
        assert "m2" in core.tags.pending
        await core.commit(force=True)
        p = plan(gw.cfg, new)
        assert p.machines_changed == ["m1"]
        async with asyncio.TaskGroup() as tg:  # m1's connector restarts (it cannot connect: stopped)
            gw._tg = tg
            await Reloader(gw, "reload")._apply(new, p)
            for t in gw._tasks:
                t.cancel()
        assert "m2" in core.tags.pending
        feed([_s("m2/good", 40, 5.0)])  # 15 parts made under B/20
        core.stage(core.engines["m2"].flush("periodic", 6.0))
        got = [(d["order"], d["quantities"]["yield"]) for d in (json.loads(r.payload)["data"] for r in core.uncommitted
               if r.type == "operation.quantity_reported")]
        assert got == [("A", "25"), ("B", "15")], got
    finally:
        await gw.store.close()
