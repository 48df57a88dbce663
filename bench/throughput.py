"""Durable event throughput: events/s from the mapping to the broker's PUBACK through the SQLite outbox.

Our path (one event per MQTT message), all in this process on one asyncio loop, as in the gateway:
  synthetic counter samples -> MachineEngine.apply (max_units=1: one quantity report per sample)
  -> EventEncoder.encode (CloudEvents JSON) -> Store.commit (group commit: machine snapshots + rows, one transaction)
  -> Publisher (live lane, sliding window) -> MqttLink (paho driven by the loop) -> broker PUBACK -> Store.ack.
The clock runs from the first sample to the moment the last row's PUBACK has been applied to the store (deleted).
The producer stays at most ``--ahead`` rows ahead of the publisher (a steady state, as with real machines).

Baseline, same broker, same run: raw paho-mqtt QoS 1 publishing the very same (topic, payload) pairs, nothing else:
loop_start() network thread, max_inflight 100, TCP_NODELAY, protocol MQTT 5 like the gateway; two variants are
timed each round and the faster is the baseline: "publish all, then wait for all PUBACKs" (in chunks below the
65,535 message-id limit) and a sliding window of 100 (a semaphore released in on_publish).
Rounds alternate baseline, ours, baseline, ours, ...; medians are reported.

Batch mode (``mqtt.batch_max_events``: consecutive events of ONE machine in one CloudEvents batch message on
``.../{machine}/events/batch``) is measured the same way with ``--batch`` events per message, in two event orders:
runs of ``--batch`` consecutive events per machine (the best case: every message full) and round-robin over 20
machines (consecutive rows never share a machine: one event per message). It is also measured without the mapping
(rows committed beforehand, clock from connection to the last PUBACK: the store -> broker path alone). Its baseline:
raw paho publishing the same batch messages (same topics, same JSON arrays).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import asyncio
import contextlib
import os
import socket
import threading
import time
from decimal import Decimal
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import BenchBroker, BenchFailed, CpuMeter, ident, main, median, quiet_logs, scratch_dir
from gateway import loops
from gateway.config import MqttConfig
from gateway.events import EventEncoder, Topics
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store
from mappings.counters import CounterSpec
from mappings.machine import CounterBinding, MachineEngine, MachineSpec, OrderContext
from mappings.samples import Sample

MACHINES = 20
T0 = 1_767_225_600.0  # source time of the first sample (2026-01-01)


def make_engines(n: int) -> list[MachineEngine]:
    engines = []
    for i in range(n):
        spec = MachineSpec(id=f"press-{i:03d}", counters={"good": CounterBinding(CounterSpec("good", max_rate=50.0))},
                           unit="PCE", interval_s=5.0, max_units=1)
        eng = MachineEngine(spec)
        eng.dispatch(OrderContext(f"10000{i:03d}", "0010", unit="PCE", planned_quantity=Decimal(100000)), T0)
        eng.apply(Sample(spec.key("good"), 0, True, T0, T0), "good")  # baseline
        engines.append(eng)
    return engines


class Producer:
    """Samples -> engines -> encoder -> group commit, like Gateway._core/_stage/_commit, without connectors."""

    def __init__(self, store: Store | None, encoder: EventEncoder, *, run: int = 1) -> None:
        self.store = store  # None: only drafts and rows (pregenerate)
        self.encoder = encoder
        self.run = run  # consecutive events of one machine
        self.engines = make_engines(MACHINES)
        self.keys = [e.spec.key("good") for e in self.engines]
        self.value = [0] * MACHINES
        self.t = T0
        self.seq = store.next_seq if store is not None else 1
        self.made = 0

    def drafts(self, n: int) -> list[Any]:
        out = []
        for j in range(n):
            i = ((self.made + j) // self.run) % MACHINES
            self.value[i] += 1
            self.t += 0.05
            out.extend(self.engines[i].apply(Sample(self.keys[i], self.value[i], True, self.t, self.t), "good"))
        return out

    def stage(self, drafts: list[Any]) -> list[OutboxRow]:
        rows = []
        for d in drafts:
            topic, payload = self.encoder.encode(d, self.seq)
            rows.append(OutboxRow(self.seq, d.subject, d.type, topic, payload))
            self.seq += 1
        return rows

    async def commit(self, rows: list[OutboxRow]) -> None:
        assert self.store is not None
        dirty = [e for e in self.engines if e.dirty]
        await self.store.commit({e.spec.id: e.snapshot() for e in dirty}, rows, self.seq)
        for e in dirty:
            e.dirty = False
        self.made += len(rows)


def pregenerate(n: int, run: int = 1) -> list[tuple[str, bytes]]:
    """The (topic, payload) pairs our path produces for n events (same engine, encoder, epoch scheme)."""
    ids = ident()
    enc = EventEncoder(ids, Topics("edge", ids), "0" * 32)
    p = Producer(None, enc, run=run)
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        rows = p.stage(p.drafts(min(1000, n - len(out))))
        p.made += len(rows)
        out.extend((r.topic, r.payload) for r in rows)
    return out


def batch_messages(msgs: list[tuple[str, bytes]], batch: int) -> list[tuple[str, bytes]]:
    """Group consecutive events of one machine into CloudEvents batch messages, as the Publisher does."""
    out: list[tuple[str, bytes]] = []
    cur: list[bytes] = []
    prefix = None
    for topic, payload in msgs:
        p = topic.rpartition("/events/")[0]
        if cur and (p != prefix or len(cur) >= batch):
            out.append((prefix + "/events/batch", b"[" + b",".join(cur) + b"]"))
            cur = []
        prefix = p
        cur.append(payload)
    if cur:
        out.append((prefix + "/events/batch", b"[" + b",".join(cur) + b"]"))
    return out


# ------------------------------------------------------------------------------------------------ our path
async def run_ours(port: int, n: int, *, group: int, ahead: int, window: int, workdir: str, batch: int = 0,
                   run: int = 1, precommit: bool = False) -> dict[str, Any]:
    """``precommit``: commit all rows first (not timed), then time connection -> last PUBACK (publish path only)."""
    path = os.path.join(workdir, f"outbox-{time.monotonic_ns()}.db")
    store = Store(path, synchronous="normal")  # as labelled in the results (store_synchronous)
    await store.open()
    cfg = MqttConfig(host="127.0.0.1", port=port, max_inflight=window, keepalive_s=30)
    link = MqttLink(cfg, client_id=f"bench-ours-{os.getpid()}")
    pub = Publisher(store, link, window=window, batch_max=batch)
    ids = ident()
    producer = Producer(store, EventEncoder(ids, Topics("edge", ids), store.epoch), run=run)
    if precommit:
        while producer.made < n:
            await producer.commit(producer.stage(producer.drafts(min(5000, n - producer.made))))
    messages = 0
    publish = link.publish

    def counting_publish(topic: str, payload: bytes, **kw: Any) -> int | None:
        nonlocal messages
        mid = publish(topic, payload, **kw)
        messages += mid is not None
        return mid

    link.publish = counting_publish  # type: ignore[method-assign]
    tasks = [asyncio.create_task(link.run(), name="link")]
    try:
        if precommit:
            meter = CpuMeter().__enter__()
        tasks.append(asyncio.create_task(pub.run(), name="publisher"))
        await asyncio.wait_for(link.connected.wait(), 10)
        while pub._live is None:  # the publisher's session (lanes) is set up
            await asyncio.sleep(0.001)
        if not precommit:
            meter = CpuMeter().__enter__()
        while producer.made < n:
            while store.pending >= ahead:
                await asyncio.sleep(0.001)
            rows = producer.stage(producer.drafts(min(group, n - producer.made)))
            await producer.commit(rows)
            pub.notify()
            await asyncio.sleep(0)
        produced_at = time.perf_counter() - meter.w0
        deadline = time.monotonic() + 120
        while pub.acked < n:
            if time.monotonic() > deadline or any(t.done() for t in tasks):
                raise BenchFailed(f"our path stalled: {pub.acked} of {n} acknowledged")
            await asyncio.sleep(0.001)
        # the acknowledged rows the last commits did not delete: now, inside the measurement (not ACK_HOLD_S later)
        await pub.flush_acks()
        meter.stop()
        if store.pending != 0 or await store.count_pending() != 0:
            raise BenchFailed(f"outbox not empty after all PUBACKs: {store.pending}")
        return {"rate": n / meter.wall, "wall": meter.wall, "cpu": meter.cpu, "produced_s": produced_at,
                "published": pub.published, "messages": messages}
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await store.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.remove(path + suffix)


# ------------------------------------------------------------------------------------------------ baseline
def run_raw_paho(port: int, msgs: list[tuple[str, bytes]], *, mode: str, window: int = 100) -> dict[str, Any]:
    """Raw paho QoS 1: ``mode`` "all" = publish everything, then wait for every PUBACK (chunks of 50,000 so the
    16-bit message ids never wrap); "window" = at most ``window`` unacknowledged messages (semaphore)."""
    n = len(msgs)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}-{mode}", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(window)
    c.max_queued_messages_set(0)
    acked = 0
    target = 0
    reached = threading.Event()
    connected = threading.Event()
    sem = threading.BoundedSemaphore(window)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connected.set()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if mode == "window":
            sem.release()
        if acked >= target:
            reached.set()

    def on_socket_open(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_connect, c.on_publish, c.on_socket_open = on_connect, on_publish, on_socket_open
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise BenchFailed("raw paho baseline could not connect")
        meter = CpuMeter().__enter__()
        if mode == "all":
            chunk = 50_000
            for k in range(0, n, chunk):
                part = msgs[k:k + chunk]
                target = k + len(part)
                reached.clear()
                for topic, payload in part:
                    c.publish(topic, payload, qos=1)
                if not reached.wait(120):
                    raise BenchFailed(f"raw paho baseline stalled at {acked} of {n}")
        else:
            target = n
            for topic, payload in msgs:
                sem.acquire()
                c.publish(topic, payload, qos=1)
            if not reached.wait(120):
                raise BenchFailed(f"raw paho baseline stalled at {acked} of {n}")
        meter.stop()
        return {"rate": n / meter.wall, "wall": meter.wall, "cpu": meter.cpu}
    finally:
        c.disconnect()
        c.loop_stop()


# ------------------------------------------------------------------------------------------------ main
def body(args: Any, res: Any) -> None:
    quiet_logs()
    n = args.events or (200_000 if args.long else 40_000)
    rounds = args.rounds or (5 if args.long else 3)
    workdir = scratch_dir("throughput")
    msgs = pregenerate(n)
    payload_bytes = sum(len(p) for _, p in msgs) / n
    broker = BenchBroker(os.path.join(workdir, "broker"))
    broker.start()
    ours: list[dict[str, Any]] = []
    base: dict[str, list[dict[str, Any]]] = {"all": [], "window": []}
    broker_cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
    try:
        # warm-up (imports, first connection, page cache), not counted
        run_raw_paho(broker.port, msgs[:2000], mode="window")
        loops.run(run_ours(broker.port, 2000, group=args.group, ahead=args.ahead, window=args.window, workdir=workdir))
        for r in range(rounds):
            b0 = _broker_cpu(broker)
            for mode in ("all", "window") if r % 2 == 0 else ("window", "all"):
                base[mode].append(run_raw_paho(broker.port, msgs, mode=mode))
            b1 = _broker_cpu(broker)
            ours.append(loops.run(run_ours(broker.port, n, group=args.group, ahead=args.ahead, window=args.window,
                                             workdir=workdir)))
            b2 = _broker_cpu(broker)
            broker_cpu["baseline"].append((b1 - b0) / 2)
            broker_cpu["ours"].append(b2 - b1)
            print(f"# round {r + 1}/{rounds}: raw paho all {base['all'][-1]['rate']:.0f}/s, window "
                  f"{base['window'][-1]['rate']:.0f}/s; ours {ours[-1]['rate']:.0f}/s", flush=True)
    finally:
        broker.close()
    if any(o["published"] < n for o in ours):
        raise BenchFailed("our path published fewer messages than events")
    med_all = median([b["rate"] for b in base["all"]])
    med_win = median([b["rate"] for b in base["window"]])
    best_mode = "all" if med_all >= med_win else "window"
    baseline = max(med_all, med_win)
    ours_rate = median([o["rate"] for o in ours])
    settings = {
        "events_per_round": n, "rounds": rounds, "order": "baseline(all, window), ours; alternating per round",
        "machines": MACHINES, "event_type": "operation.quantity_reported (one per sample, max_units=1)",
        "payload_bytes_avg": round(payload_bytes), "group_commit_rows": args.group, "max_rows_ahead": args.ahead,
        "publisher_window": args.window, "mqtt_protocol": "5", "qos": 1, "store_synchronous": "normal",
        "clock": "first sample -> last row deleted after its PUBACK", **broker.settings(),
    }
    ratio = ours_rate / baseline
    res.add("one_event_per_message", ours_rate, "events/s", baseline=baseline,
            baseline_name=f"raw paho-mqtt QoS 1, same payloads, same broker ({best_mode} variant)", ratio=ratio,
            target=">= 0.8 of the raw paho rate", met=ratio >= 0.8, settings=settings,
            rounds_ours=[round(o["rate"]) for o in ours],
            rounds_baseline={k: [round(b["rate"]) for b in v] for k, v in base.items()},
            baseline_variants={"all": round(med_all), "window": round(med_win)})
    cpu_ours = median([o["cpu"] / n * 1e6 for o in ours])
    cpu_base = median([b["cpu"] / n * 1e6 for b in base[best_mode]])
    res.add("cpu_per_event", cpu_ours, "us CPU/event (gateway process, all threads)", baseline=cpu_base,
            baseline_name="raw paho-mqtt process CPU per message", settings=settings,
            target="<= 1.3x raw paho's CPU per message", met=cpu_ours <= 1.3 * cpu_base,
            broker_cpu_us_per_event={k: round(median(v) / n * 1e6, 1) for k, v in broker_cpu.items()},
            cores_used_ours=round(median([o["cpu"] / o["wall"] for o in ours]), 2))
    batch_mode(args, res, workdir)


def batch_mode(args: Any, res: Any, workdir: str) -> None:
    """Batch mode: runs of ``batch`` events per machine (full messages) vs round-robin machines; with and without
    the mapping; baseline raw paho with the same batch messages."""
    n, b, rounds = args.batch_events or (500_000 if args.long else 100_000), args.batch, 3 if args.long else 2
    msgs = batch_messages(pregenerate(n, run=b), b)
    broker = BenchBroker(os.path.join(workdir, "broker-batch"))
    broker.start()
    kw = dict(group=args.group, ahead=args.ahead, window=args.window, workdir=workdir, batch=b)
    full: list[dict[str, Any]] = []
    publish_only: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    try:
        loops.run(run_ours(broker.port, 5000, run=b, **kw))  # warm-up
        for r in range(rounds):
            base.append(run_raw_paho(broker.port, msgs, mode="window"))
            full.append(loops.run(run_ours(broker.port, n, run=b, **kw)))
            publish_only.append(loops.run(run_ours(broker.port, n, run=b, precommit=True, **kw)))
            print(f"# batch round {r + 1}/{rounds}: raw paho {base[-1]['rate'] * n / len(msgs):.0f} events/s, ours "
                  f"{full[-1]['rate']:.0f}/s, ours publish-only {publish_only[-1]['rate']:.0f}/s", flush=True)
        n_rr = min(n, 40_000)
        rr = loops.run(run_ours(broker.port, n_rr, run=1, **kw))
    finally:
        broker.close()
    base_rate = median([x["rate"] for x in base]) * n / len(msgs)  # events/s (rate counts messages)
    settings = {"events_per_round": n, "rounds": rounds, "batch_max_events": b, "event_order":
                f"runs of {b} consecutive events per machine (every message full)", "machines": MACHINES,
                "messages_per_round": len(msgs), "message_bytes_avg": round(sum(len(p) for _, p in msgs) / len(msgs)),
                "group_commit_rows": args.group, "publisher_window": args.window, "mqtt_protocol": "5", "qos": 1,
                **broker.settings()}
    ours = median([x["rate"] for x in full])
    res.add("batch_mode", ours, "events/s", baseline=base_rate,
            baseline_name="raw paho-mqtt QoS 1 publishing the same batch messages (window 100)",
            target=">= 0.25 of raw paho publishing the same batch messages", met=ours >= 0.25 * base_rate,
            settings={**settings, "clock": "first sample -> "
            "last row deleted after its PUBACK (mapping + encoding + store + publish)"},
            rounds_ours=[round(x["rate"]) for x in full], cpu_us_per_event=round(median([x["cpu"] for x in full]) / n * 1e6, 1))
    po = median([x["rate"] for x in publish_only])
    res.add("batch_mode_publish_only", po, "events/s", baseline=base_rate,
            baseline_name="raw paho-mqtt QoS 1 publishing the same batch messages (window 100)",
            settings={**settings, "clock": "rows committed "
            "beforehand; connection up -> last row deleted after its PUBACK (store fetch + publish + ack only)"},
            rounds_ours=[round(x["rate"]) for x in publish_only],
            cpu_us_per_event=round(median([x["cpu"] for x in publish_only]) / n * 1e6, 1))
    res.add("batch_mode_round_robin", rr["rate"], "events/s", settings={**settings, "events_per_round": n_rr,
            "rounds": 1, "event_order": f"round-robin over {MACHINES} machines (no two consecutive rows of one "
            "machine)"}, events_per_message=round(n_rr / max(rr["messages"], 1), 2),
            note="the publisher batches only consecutive rows of one machine: with interleaved machines every "
                 "message carries one event")


def _broker_cpu(broker: BenchBroker) -> float:
    from bench.common import proc_cpu_s

    return proc_cpu_s(broker.pid) if broker.pid else 0.0


def add_args(p: Any) -> None:
    p.add_argument("--events", type=int, default=0, help="events per round (default 40,000; --long 200,000)")
    p.add_argument("--rounds", type=int, default=0, help="rounds (default 3; --long 5)")
    p.add_argument("--group", type=int, default=500, help="rows per group commit")
    p.add_argument("--ahead", type=int, default=10_000, help="most rows the producer may be ahead of the PUBACKs")
    p.add_argument("--window", type=int, default=100, help="publisher window (mqtt.max_inflight)")
    p.add_argument("--batch", type=int, default=100, help="batch mode: mqtt.batch_max_events")
    p.add_argument("--batch-events", type=int, default=0, help="batch mode events per round (100,000; --long 500,000)")


if __name__ == "__main__":
    main("throughput", body, add_args, __doc__ or "")
