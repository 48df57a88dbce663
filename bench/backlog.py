"""Backlog: fill the outbox while the broker is down, then bring the broker back and drain.

Sequence (one process, one asyncio loop, like the gateway):
1. A Store, an MqttLink and the Publisher run against a broker port where nothing listens (an outage: the link
   retries with its backoff, as the gateway would). The outbox is filled with N realistic CloudEvents
   (``operation.quantity_reported`` of 50 machines, ~740 bytes, unique id and seq each) by Store.commit in batches
   of 10,000 rows. The outage lasts at least ``--outage`` seconds.
2. ``Store.open()`` of the filled file is timed with a second Store on the same file (a gateway restart opens it).
3. The broker (mosquitto, default config) starts. Measured: broker start -> first PUBACK (includes the link's
   reconnect backoff), connection up -> first PUBACK (the publisher alone), and the drain time (connection up ->
   PUBACK of the last backlog row). While the backlog drains, "live" events are committed at ``--live-rate``/s, one
   per transaction, and their latency from production (before the commit) to PUBACK is recorded.
4. Extra short outages (``--restarts``, broker stopped ``--restart-outage`` s) repeat the broker start -> first
   PUBACK measurement, which depends on where the reconnect backoff stands.

Baseline in the same run: raw paho-mqtt QoS 1 (sliding window of 100, its own network thread) publishing the first
``--baseline-events`` backlog payloads to the same broker: the drain rate is reported against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import asyncio
import contextlib
import copy
import json
import os
import time
from typing import Any

from bench.common import BenchBroker, BenchFailed, CpuMeter, ident, main, percentile, quiet_logs, scratch_dir
from bench.throughput import pregenerate, run_raw_paho
from gateway import loops
from gateway.config import MqttConfig
from gateway.events import EventEncoder, Topics, event_id
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store
from simulators.ports import free_port

FILL_BATCH = 10_000


class Filler:
    """Realistic payloads, fast: real encoded events as templates, each row with its own id, seq and totals."""

    def __init__(self, encoder: EventEncoder, machines: int = 50) -> None:
        self.encoder = encoder
        base = pregenerate(machines)  # one real event per machine (engine + EventEncoder)
        self.templates = [(t, json.loads(p)) for t, p in base]
        self.seq = 1

    def rows(self, n: int, *, machine: str | None = None) -> list[OutboxRow]:
        """``n`` rows of the template machines in turn, or all of ``machine`` (a machine with no backlog)."""
        out = []
        enc = self.encoder
        for _ in range(n):
            seq = self.seq
            self.seq += 1
            topic, doc = self.templates[seq % len(self.templates)]
            if machine is not None:
                old = doc["subject"]
                topic = topic.replace(f"/{old}/", f"/{machine}/")
                doc = {**doc, "subject": machine, "data": {**doc["data"], "machine": machine}}
            d = copy.copy(doc)
            d["id"] = event_id(enc.source, enc.epoch, seq)
            d["seq"] = seq
            d["epoch"] = enc.epoch
            data = dict(d["data"])
            data["totals"] = {"yield": str(seq), "scrap": "0", "rework": "0"}
            d["data"] = data
            out.append(OutboxRow(seq, d["subject"], d["type"], topic, json.dumps(d).encode()))
        return out


async def scenario(args: Any, workdir: str, n: int) -> dict[str, Any]:
    port = free_port()
    broker = BenchBroker(os.path.join(workdir, "broker"), port=port)
    path = os.path.join(workdir, "outbox.db")
    store = Store(path)
    await store.open()
    ids = ident()
    encoder = EventEncoder(ids, Topics("edge", ids), store.epoch)
    cfg = MqttConfig(host="127.0.0.1", port=port, keepalive_s=5)
    link = MqttLink(cfg, client_id="bench-backlog")
    pub = Publisher(store, link, window=cfg.max_inflight)
    out: dict[str, Any] = {"rows": n, "broker_settings": broker.settings()}

    # PUBACK hook: what was acknowledged and when (the publisher's own callback runs right after)
    first_ack: list[float] = []
    backlog_acked = 0
    boundary = 0
    drained = asyncio.Event()
    live_sent: dict[bytes, float] = {}
    live_lat: list[float] = []
    inner = link.on_puback

    def on_puback(connection_id: int, mid: int, code: int) -> None:
        nonlocal backlog_acked
        now = time.perf_counter()
        s = pub.session
        rows = s.inflight.get(mid) if s is not None and s.conn_id == connection_id else None
        if rows is not None and not isinstance(rows, tuple):
            rows = (rows,)
        if rows and not first_ack:
            first_ack.append(now)
        # the session's own boundary: PUBACKs can come before the loop below has read it
        upto = s.boundary if s is not None else boundary
        for row in rows or ():
            if row.id <= upto:
                backlog_acked += 1
                if backlog_acked == n:
                    drained.set()
            else:
                t = live_sent.pop(row.payload, None)
                if t is not None:
                    live_lat.append(now - t)
        inner(connection_id, mid, code)

    link.on_puback = on_puback
    tasks = [asyncio.create_task(link.run(), name="link"), asyncio.create_task(pub.run(), name="publisher")]
    try:
        # 1. outage: fill
        t_out = time.perf_counter()
        filler = Filler(encoder)
        with CpuMeter() as fill:
            while filler.seq <= n:
                rows = filler.rows(min(FILL_BATCH, n - filler.seq + 1))
                await store.commit({}, rows, filler.seq)
                pub.notify()
        out["fill_s"] = fill.wall
        out["fill_rate"] = n / fill.wall
        out["db_mb"] = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s)) / 2**20
        if store.pending != n:
            raise BenchFailed(f"store holds {store.pending} rows, expected {n}")
        # 2. a gateway restart opens this file: time Store.open (it counts rows and bytes)
        other = Store(path, readonly=True)  # the bench holds the store open: a second writer is refused
        t0 = time.perf_counter()
        await other.open()
        out["store_open_s"] = time.perf_counter() - t0
        if other.pending != n:
            raise BenchFailed(f"reopened store counts {other.pending} rows, expected {n}")
        await other.close()
        wait = args.outage - (time.perf_counter() - t_out)
        if wait > 0:
            await asyncio.sleep(wait)
        out["outage_s"] = time.perf_counter() - t_out
        if link.is_connected:
            raise BenchFailed("connected while no broker was running")

        # 3. the broker comes back
        await broker.astart()
        t_broker = time.perf_counter()
        await asyncio.wait_for(link.connected.wait(), 30)
        t_conn = time.perf_counter()
        while pub.session is None or pub.session.backlog is None:
            await asyncio.sleep(0.0005)
        boundary = pub.session.boundary
        live = asyncio.create_task(live_producer(store, pub, encoder, filler, args.live_rate, live_sent, drained))
        with CpuMeter({"broker": broker.pid}) as drain:
            await asyncio.wait_for(drained.wait(), args.drain_timeout)
        t_drained = time.perf_counter()
        live_count = await live
        # the last live rows and the ack flush
        deadline = time.monotonic() + 10
        while (live_sent or store.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if store.pending:
            raise BenchFailed(f"{store.pending} rows left in the outbox after the drain")
        if not first_ack:
            raise BenchFailed("no PUBACK")
        out.update(
            first_puback_after_broker_start_s=first_ack[0] - t_broker,
            connect_after_broker_start_s=t_conn - t_broker,
            first_puback_after_connect_s=first_ack[0] - t_conn,
            drain_s=t_drained - t_conn,
            drain_s_from_broker_start=t_drained - t_broker,
            drain_rate=n / (t_drained - t_conn),
            drain_cpu_cores=drain.cores,
            drain_broker_cpu_cores=drain.other_cpu["broker"] / drain.wall,
            live_events=live_count,
            live_latencies=live_lat,
        )
        # 4. short outages: broker start -> first PUBACK again
        restarts = []
        for _ in range(args.restarts or (6 if args.long else 2)):
            await broker.astop()
            await asyncio.sleep(0.2)
            rows = filler.rows(1000)
            await store.commit({}, rows, filler.seq)
            pub.notify()
            await asyncio.sleep(args.restart_outage)
            first_ack.clear()
            await broker.astart()
            tb = time.perf_counter()
            deadline = time.monotonic() + 20
            while not first_ack and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            if not first_ack:
                raise BenchFailed("no PUBACK within 20 s of a broker restart")
            restarts.append(first_ack[0] - tb)
            while store.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        out["restart_first_puback_s"] = restarts
        return out
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await store.close()
        broker.close()


async def live_producer(store: Store, pub: Publisher, encoder: EventEncoder, filler: Filler, rate: float,
                        sent: dict[bytes, float], stop: asyncio.Event) -> int:
    """One event per transaction at ``rate``/s until the backlog is drained (absolute schedule, no drift)."""
    loop = asyncio.get_running_loop()
    next_t = loop.time()
    count = 0
    while not stop.is_set():
        next_t += 1.0 / rate
        await asyncio.sleep(max(0.0, next_t - loop.time()))
        # a machine that produced nothing during the outage (no backlog): the live lane; a machine with backlog
        # sends its events in seq order, after its backlog (docs/event-contract.md)
        (row,) = filler.rows(1, machine="live-press")
        sent[row.payload] = time.perf_counter()
        await store.commit({}, [row], filler.seq)
        pub.notify()
        count += 1
    return count


def body(args: Any, res: Any) -> None:
    quiet_logs()
    n = args.rows or (2_000_000 if args.long else 1_000_000)
    workdir = scratch_dir("backlog")
    r = loops.run(scenario(args, workdir, n))
    # baseline: raw paho on the same kind of payloads, same broker config, same run
    bb = BenchBroker(os.path.join(workdir, "broker-baseline"))
    bb.start()
    try:
        msgs = pregenerate(args.baseline_events)
        raw = run_raw_paho(bb.port, msgs, mode="window")["rate"]
    finally:
        bb.close()
    lat = r["live_latencies"]
    if len(lat) < 20:
        raise BenchFailed(f"only {len(lat)} live latencies measured")
    full = n >= 1_000_000
    settings = {
        "rows": n, "payload": "operation.quantity_reported, ~740 bytes, 50 machines", "fill_batch": FILL_BATCH,
        "outage_s": round(r["outage_s"], 1), "live_rate_per_s": args.live_rate, "live": "one event per commit, of a machine with no backlog (machines with backlog deliver in seq order after it)",
        "publisher_window": 100, "mqtt_protocol": "5", "db_mb": round(r["db_mb"]), **r["broker_settings"],
        **({} if full else {"scaled": f"{n:,} rows: fewer than the 1,000,000 of the targets"}),
    }
    applies = "met" if full else "n/a at this size"
    res.add("fill_rate", r["fill_rate"], "rows/s", settings=settings, note="Store.commit, 10,000 rows per transaction")
    res.add("store_open", r["store_open_s"], "s", settings=settings,
            note="Store.open() of the filled file: COUNT(*) + SUM(LENGTH(payload)) over the outbox")
    starts = [r["first_puback_after_broker_start_s"], *r["restart_first_puback_s"]]
    worst = max(starts)
    res.add("first_puback_after_broker_start", worst, "s", target="< 2 s", met=(worst < 2) if full else None,
            settings=settings, all_starts_s=[round(x, 3) for x in starts],
            median_s=round(sorted(starts)[len(starts) // 2], 3),
            with_full_backlog_s=round(r["first_puback_after_broker_start_s"], 3),
            connect_after_broker_start_s=round(r["connect_after_broker_start_s"], 3),
            first_puback_after_connect_s=round(r["first_puback_after_connect_s"], 4),
            note="worst of all broker starts (the first with the full backlog, then --restarts short outages); "
                 "includes the MQTT link's reconnect backoff (capped at 5 s, +-20 % jitter); "
                 "first_puback_after_connect_s is the publisher alone")
    drain_proj = r["drain_s"] * 1_000_000 / n
    res.add("drain", r["drain_s"], "s", target="<= 60 s for 1,000,000 events",
            met=(drain_proj <= 60) if full else None, settings=settings,
            projected_1m_s=round(drain_proj, 1), drain_s_from_broker_start=round(r["drain_s_from_broker_start"], 2),
            note=f"connection up -> PUBACK of the last of {n:,} backlog rows ({applies})")
    res.add("drain_rate", r["drain_rate"], "events/s", baseline=raw,
            baseline_name=f"raw paho-mqtt QoS 1, window 100, {args.baseline_events:,} payloads, same broker config",
            settings=settings, gateway_cpu_cores=round(r["drain_cpu_cores"], 2),
            broker_cpu_cores=round(r["drain_broker_cpu_cores"], 2))
    p99 = percentile(lat, 99)
    res.add("live_latency_p99", p99 * 1000, "ms", target="< 1 s", met=p99 < 1.0 if full else None,
            settings=settings, p50_ms=round(percentile(lat, 50) * 1000, 2), max_ms=round(max(lat) * 1000, 2),
            live_events=len(lat), note="live event: before its commit -> its PUBACK, while the backlog drains")


def add_args(p: Any) -> None:
    p.add_argument("--rows", type=int, default=0, help="backlog rows (default 1,000,000; --long 2,000,000)")
    p.add_argument("--outage", type=float, default=10.0, help="minimum broker outage before it comes back (s)")
    p.add_argument("--live-rate", type=float, default=50.0, help="live events per second during the drain")
    p.add_argument("--restarts", type=int, default=0, help="extra broker restarts timed after the drain (default 2; "
                                                           "--long 6)")
    p.add_argument("--restart-outage", type=float, default=7.0, help="outage of each extra restart (s)")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--baseline-events", type=int, default=30_000)


if __name__ == "__main__":
    main("backlog", body, add_args, __doc__ or "")
