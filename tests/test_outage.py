"""Broker outages under load, with the gateway in-process and both machines producing continuously.

Each case: press-1 (OPC UA) and press-2 (Modbus, 16-bit counters near rollover) produce at ~100 parts/s each; the
gateway reports small windows (max 5 units), so it commits ~40 events/s. The broker then goes away:

- ``stop-1s`` / ``stop-5s`` / ``stop-long``: a clean mosquitto stop (SIGTERM) for 1 s, 5 s and a long period (20 s;
  2 minutes with ``EDGE_GATEWAY_LONG_OUTAGE=1``);
- ``kill-3s``: mosquitto is SIGKILLed (on loopback the kernel closes its sockets, so the gateway notices at once);
- ``freeze-kill``: mosquitto is frozen (SIGSTOP) for 1 s — its sockets stay open, the gateway has NOT noticed
  (keepalive 2 s, it stays "connected" and keeps publishing into the void, no PUBACKs) — then SIGKILLed and
  restarted 3 s later. Events committed during the unnoticed window must not be lost.

During every outage the gateway keeps committing events to its outbox (whatever the connection state). After the
restart production goes on for 3 s (live events during the drain), then the machines pause and we check:

- the ERP ledger (deduplicated by event id) == the machines' ground truth, exactly, per machine and order;
- every sequence number the gateway committed (1 .. next_seq-1) reached the ERP (no gaps, none missing at the end)
  and the gateway's outbox is empty (``store.pending == 0``: every committed event was PUBACKed at least once);
- order per machine: before the outage, first arrivals come in increasing ``seq``. After a reconnect the publisher
  sends two lanes (``gateway/mqtt.py``): the *live* lane (rows committed since the connection came up) goes first and
  the *backlog* lane (rows committed before) drains behind it, each in id order. So after a reconnect the first
  arrivals of each machine are increasing within each lane, every live seq above every backlog seq; the ``seq``
  extension gives the ERP the total order. The test checks exactly that (``lane_order_violations``) and reports
  whether the plain "increasing first arrivals" held too.

What is and is not guaranteed end to end with a broker SIGKILL: the gateway deletes an outbox row only after the
broker's PUBACK, so nothing the broker did not acknowledge is ever lost. But a PUBACK does not mean the broker wrote
the message to disk (mosquitto persists on shutdown / autosave only): messages the broker acknowledged and had queued
for a subscriber that was offline or behind are lost when it is killed — by the broker, not the gateway. After a
SIGKILL mosquitto also restarts from its last saved database, so a subscriber session created since then is gone
and messages published before the subscriber resubscribes are dropped. The kill cases are therefore set up the way
a production deployment must be: the ERP's persistent session is saved (a clean broker restart after the ERP
subscribed), and the ERP is connected and has every event the broker acknowledged when the broker dies or freezes
(the test holds the gateway's publishing for that moment, production going on). With that, the checks above hold; what
this measures is the gateway's side (outbox + resend), not the broker's durability. (Observed without the saved
session: in 1 of 9 ``kill-3s`` runs the gateway reconnected before the ERP, mosquitto had no session for the ERP
and dropped the backlog it PUBACKed — ~300 parts per machine missing from the ledger, the gateway's outbox empty.)

Live latency: for events committed after the broker came back, the time from the gateway's commit to the ERP's
receipt is printed (p50/p95/max), split into "before the gateway reconnected" and "after" (the live lane proper).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import time
from typing import Any

import pytest

from gateway.runtime import Gateway
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import (IDENT, RunningGateway, assert_ledger_matches, gateway_config, wait_idle_at_the_erp, wait_until,
                       workdir)
from tests.test_chaos import first_arrivals, lane_order_violations, strictly_increasing

HIER = tuple(IDENT[k] for k in ("enterprise", "site", "area", "line"))
LONG_OUTAGE_S = 120.0 if os.environ.get("EDGE_GATEWAY_LONG_OUTAGE") == "1" else 20.0
AFTER_S = 3.0  # production after the broker came back (live events during the drain)


class InstrumentedGateway(RunningGateway):
    """RunningGateway that records when each event (seq) was committed, and when the MQTT link (re)connected."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.commit_times: dict[int, float] = {}
        self.connect_times: list[float] = []
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> Gateway:
        self.gw = gw = Gateway(self.cfg)
        store_commit = gw.store.commit

        async def commit(states: Any, rows: Any, next_seq: int) -> Any:
            committed = await store_commit(states, rows, next_seq)
            now = time.time()
            for r in rows:
                self.commit_times[r.seq] = now
            return committed

        gw.store.commit = commit  # type: ignore[method-assign]
        self.task = asyncio.create_task(gw.run(), name="gateway")
        self._watch = asyncio.create_task(self._watch_link(gw), name="watch-link")
        self.generations += 1
        await wait_until(lambda: gw.started.is_set() or self.task.done(), 15)
        if self.task.done():
            self.task.result()
        return gw

    async def _watch_link(self, gw: Gateway) -> None:
        seen = 0
        while True:
            if gw.link.connections != seen:
                seen = gw.link.connections
                self.connect_times.append(time.time())
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await super().stop()


@pytest.fixture
async def plant(tmp_path, mqtt_broker):
    broker = mqtt_broker
    m1 = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.07, seed=31, counter_bits=32)
    m2 = MachineModel("Press2", cycle_time=0.01, scrap_rate=0.05, seed=32, counter_bits=16,
                      start_good=64_000, start_scrap=65_450)
    opc = OpcUaMachineServer(m1, host="127.0.0.1", port=free_port())
    mb = ModbusMachineServer(m2, host="127.0.0.1", port=free_port(), unit_id=1)
    await opc.start()
    await mb.start()
    erp = ErpConsumer("127.0.0.1", broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-outage")
    await erp.start()
    cfg = gateway_config(broker_port=broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc, modbus=mb,
                         interval_s=0.2, max_units=5, max_rate=400, keepalive_s=2)
    gw = InstrumentedGateway(cfg)
    producers: list[asyncio.Task[None]] = []
    p = type("Plant", (), {"broker": broker, "m1": m1, "m2": m2, "opc": opc, "mb": mb, "erp": erp, "gw": gw,
                           "models": {"press-1": m1, "press-2": m2}, "producers": producers})
    try:
        yield p
    finally:
        m1.pause()
        m2.pause()
        for t in producers:
            t.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        await gw.stop()
        await erp.stop()
        await mb.stop()
        await opc.stop()


# --- checks -----------------------------------------------------------------------------------------------------

def erp_arrivals(erp: ErpConsumer) -> dict[int, float]:
    """seq -> time the ERP committed its first arrival (from the consumer's SQLite, read-only)."""
    db = sqlite3.connect(f"file:{erp.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return {seq: t for seq, t in db.execute("SELECT seq, received_at FROM events WHERE seq IS NOT NULL")}
    finally:
        db.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def latency_stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
            "p95_ms": round(1000 * pct(values, 0.95), 1), "max_ms": round(1000 * max(values), 1)}


async def hold_until_the_erp_has_every_acknowledged_event(p) -> Any:
    """Hold the gateway's publishing (its in-flight window set to 0; production and commits go on) until every event
    the broker acknowledged has reached the ERP; returns the function that releases it. A broker SIGKILLed then loses
    no event it acknowledged: mosquitto holds what it acknowledged and has not yet delivered in memory only, and on a
    loaded machine the ERP may be behind by an event or two (seen: one 5-part report missing from the ledger in a
    full suite run with -n 3 on 2 cores). That loss is the broker's (module docstring), not what this test is about."""
    gw = p.gw.gw
    pub = gw.publisher
    window = pub.window
    pub.window = 0

    def release() -> None:
        pub.window = window
        pub.notify()  # wake the publisher: rows committed meanwhile go (into the dead connection, then resent)

    try:
        await wait_until(lambda: pub.inflight == 0, 15, message="PUBACKs of the events in flight")
        await pub.flush_acks()  # acknowledged rows leave the outbox: what is left was never acknowledged
        pending = {r.seq for r in await gw.store.fetch(0, 10_000_000)}
        acked = set(p.gw.commit_times) - pending
        await wait_until(lambda: acked <= {s for v in p.erp.seqs().values() for s in v}, 30,
                         message="the ERP did not receive every event the broker acknowledged")
    except BaseException:
        release()
        raise
    return release


# --- the scenario -------------------------------------------------------------------------------------------------

async def start_production(p) -> None:
    """Orders first (the gateway's changeover cut reads the counters: what was made before is a baseline), then run."""
    await p.gw.start()
    for machine, order in (("press-1", "O-100"), ("press-2", "O-200")):
        await asyncio.to_thread(p.erp.dispatch, *HIER, machine, order, "0010")
        await p.gw.wait_dispatch_applied(machine, order, "0010")
        p.models[machine].set_order(order, "0010")
    p.producers.extend(asyncio.create_task(m.run_forever(), name=f"produce.{m.name}") for m in (p.m1, p.m2))
    p.m1.start()
    p.m2.start()


async def quiesce_and_check(p, what: str) -> dict[str, Any]:
    """Pause the machines, wait for ledger == truth and an empty outbox, check the stream. Returns a report."""
    p.m1.pause()
    p.m2.pause()
    t0 = time.monotonic()
    await assert_ledger_matches(p.erp, p.models, timeout=60 + LONG_OUTAGE_S)
    await wait_idle_at_the_erp(p.erp, p.models)
    gw = p.gw.gw
    await wait_until(lambda: gw.store.pending == 0, 30,
                     message=f"{what}: outbox not drained: {gw.store.pending} rows pending")
    settle_s = time.monotonic() - t0
    await wait_until(lambda: gw.store.outbox_rows == 0, 5, message=f"{what}: acknowledged rows not deleted")
    assert await gw.store.count_pending() == 0
    committed = gw.core.next_seq - 1

    def delivered() -> list[int]:
        return sorted(s for v in p.erp.seqs().values() for s in v)

    # a PUBACK comes before the broker's delivery to the ERP's subscription: wait for the last ones to arrive
    with contextlib.suppress(AssertionError, TimeoutError):
        await wait_until(lambda: delivered() == list(range(1, committed + 1)), 10)
    seqs = delivered()
    assert not p.erp.gaps(), f"{what}: sequence gaps at the ERP: {p.erp.gaps()}"
    assert seqs == list(range(1, committed + 1)), (
        f"{what}: the ERP is missing committed events: {sorted(set(range(1, committed + 1)) - set(seqs))[:20]}")
    assert p.erp.stats["rejected"] == 0 and not p.erp.conflicts(), (p.erp.stats, p.erp.conflicts()[:3])
    assert not p.erp.events("counter.anomaly"), [e["data"] for e in p.erp.events("counter.anomaly")]
    return {"events_committed": committed, "settle_s": round(settle_s, 2)}


OUTAGES = [
    pytest.param("stop", 1.0, id="stop-1s"),
    pytest.param("stop", 5.0, id="stop-5s"),
    pytest.param("kill", 3.0, id="kill-3s"),
    pytest.param("freeze-kill", 3.0, id="freeze-kill"),
    pytest.param("stop", LONG_OUTAGE_S, id="stop-long", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("mode, down_s", OUTAGES)
async def test_broker_outage_under_load(plant, mode, down_s, record_property):
    p = plant
    await start_production(p)
    if mode != "stop":
        # make the ERP's persistent session part of the broker's saved database (a clean restart saves it): after a
        # SIGKILL mosquitto restarts from that file, and without the session it would drop what the gateway resends
        # before the ERP has resubscribed (see the module docstring)
        connections = p.gw.gw.link.connections
        await p.broker.astop()
        await p.broker.astart()
        await p.erp.wait_connected(15)
        await wait_until(lambda: p.gw.gw.link.connections > connections and p.gw.gw.link.is_connected, 15,
                         message="the gateway did not reconnect after the broker restart")
    n0 = len(p.erp.events())
    await asyncio.sleep(1.5)          # production before the outage (the scenario)
    await wait_until(lambda: len(p.erp.events()) > n0 + 10, 15, message="no events before the outage")
    before = first_arrivals(p.erp)
    for machine, seqs in before.items():
        assert strictly_increasing(seqs), f"{machine}: first arrivals out of order before any outage: {seqs}"
    gw = p.gw.gw

    # --- the outage
    committed_at_down = gw.core.next_seq - 1
    unnoticed: list[int] = []
    if mode == "stop":
        await p.broker.astop()
    elif mode == "kill":
        release = await hold_until_the_erp_has_every_acknowledged_event(p)
        try:
            await p.broker.akill()
        finally:
            release()
    else:
        pid = p.broker.pid
        assert pid is not None
        release = await hold_until_the_erp_has_every_acknowledged_event(p)
        release()  # no await from here to the freeze: nothing is published in between
        os.kill(pid, signal.SIGSTOP)  # frozen: sockets open, no answers
        try:
            t_freeze = time.time()
            await asyncio.sleep(1.0)
            still_connected = gw.link.is_connected
        finally:
            await p.broker.akill()     # SIGKILL works on a stopped process
        unnoticed = [s for s, t in p.gw.commit_times.items() if t >= t_freeze]
        assert still_connected, "the gateway noticed the frozen broker within 1 s (keepalive is 2 s): not the case under test"
        assert unnoticed, "no events were committed while the broker was frozen"
    arrivals_at_down = len(p.erp.events())
    await asyncio.sleep(down_s)
    committed_during = gw.core.next_seq - 1 - committed_at_down
    assert committed_during > 0, "the gateway committed nothing while the broker was down"
    await p.broker.astart()
    t_back = time.time()

    # --- production goes on while the backlog drains
    await asyncio.sleep(AFTER_S)
    report = await quiesce_and_check(p, f"{mode} {down_s}s")

    # --- order per machine after the reconnect (lane-aware), and the plain check for the record
    after = first_arrivals(p.erp, arrivals_at_down)
    lane_problems = {m: v for m, s in after.items() if (v := lane_order_violations(s))}
    plain_increasing = all(strictly_increasing(s) for s in after.values())
    assert not lane_problems, f"per-machine order broken beyond the live/backlog lanes: {lane_problems}"
    if unnoticed:
        received = {s for v in p.erp.seqs().values() for s in v}
        assert set(unnoticed) <= received, f"events committed while the broker was frozen were lost: " \
                                           f"{sorted(set(unnoticed) - received)[:20]}"

    # --- latency of events committed after the broker came back
    reconnects = [t for t in p.gw.connect_times if t >= t_back]
    t_reconnect = reconnects[0] if reconnects else None
    arrived = erp_arrivals(p.erp)
    backlog = [s for s, t in p.gw.commit_times.items() if t < (t_reconnect or t_back) and s > committed_at_down]
    lat_before = [arrived[s] - t for s, t in p.gw.commit_times.items() if t >= t_back and s in arrived
                  and t_reconnect is not None and t < t_reconnect]
    lat_live = [arrived[s] - t for s, t in p.gw.commit_times.items() if t_reconnect is not None
                and t >= t_reconnect and s in arrived]
    backlog_drained_at = max((arrived[s] for s in backlog if s in arrived), default=None)
    report.update({
        "mode": mode, "down_s": down_s,
        "events_committed_while_down": committed_during,
        "unnoticed_window_events": len(unnoticed),
        "gateway_reconnect_after_broker_back_s": None if t_reconnect is None else round(t_reconnect - t_back, 2),
        "backlog_events": len(backlog),
        "backlog_drained_after_reconnect_s": None if (backlog_drained_at is None or t_reconnect is None)
        else round(backlog_drained_at - t_reconnect, 2),
        "latency_committed_after_broker_back_before_reconnect": latency_stats(lat_before),
        "latency_live_after_reconnect": latency_stats(lat_live),
        "first_arrivals_plainly_increasing_after_reconnect": plain_increasing,
        "erp_duplicates": p.erp.stats["duplicates"],
        "gateway_mqtt_connections": gw.link.connections,
    })
    print(f"outage {mode} {down_s}s: " + json.dumps(report, sort_keys=True))
    record_property("outage_report", json.dumps(report, sort_keys=True))
    record_property("erp_duplicates", p.erp.stats["duplicates"])
