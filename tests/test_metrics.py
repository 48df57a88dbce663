"""Prometheus metrics (docs/metrics.md) as an operator sees them: scraped over HTTP from ``GET /metrics`` of a gateway
running against a real mosquitto, the OPC UA and Modbus simulators and the ERP simulator, and parsed with
prometheus-client's own parser. Each metric is checked to move under the load that should move it."""

from __future__ import annotations

import asyncio
import errno
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway.component import HttpListenError
from gateway.config import GatewayConfig
from gateway.dispatch import ErpAck
from gateway.events import EventEncoder, Topics
from gateway.exporter import SYNC_TRACK_MAX, GatewayMetrics
from gateway.runtime import Gateway
from gateway.store import OutboxRow
from mappings.machine import EventDraft
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import RunningGateway, dispatch_order, gateway_config, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def with_http(cfg: GatewayConfig, port: int) -> GatewayConfig:
    return cfg.model_copy(update={"http": cfg.http.model_copy(update={"enabled": True, "port": port})})


async def start_with_http(rg: RunningGateway) -> tuple[Gateway, int]:
    """Start the gateway; returns it and its HTTP port. ``free_port()`` only names a port that was free when it was
    asked: until the gateway listens there, anything else on the machine can take it (another xdist worker's
    simulator or broker, any connection's ephemeral local port; seen once in ~45 runs: "cannot listen on
    127.0.0.1:50047: address already in use"). A start refused for that is tried again on another port."""
    for attempt in range(3):
        try:
            return await rg.start(), rg.cfg.http.port
        except HttpListenError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 2:
                raise
            rg.cfg = with_http(rg.cfg, free_port())
    raise AssertionError("unreachable")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


async def scrape(port: int) -> Samples:
    """One Prometheus scrape of the gateway's /metrics, parsed by prometheus-client: {(sample, labels): value}."""
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


async def scrape_until(port: int, pred: Any, timeout: float, what: str) -> Samples:
    """Scrape until ``pred(samples)`` holds (a gauge that must move with time); fails with the last values."""
    deadline = time.monotonic() + timeout
    while True:
        s = await scrape(port)
        if pred(s):
            return s
        if time.monotonic() > deadline:
            edge = {k: v for k, v in s.items() if k[0].startswith(("edge_gateway_outbox", "edge_gateway_mqtt"))}
            raise AssertionError(f"{what}: not within {timeout}s; last scrape: {edge}")
        await asyncio.sleep(0.2)


def settled(gw: Gateway) -> bool:
    """Machines idle (the state change seen), no reporting window open, nothing staged, in the outbox or in flight:
    no event can appear before the next scrape."""
    return (all(e.machine_state == "idle" and e.next_deadline() is None for e in gw.engines.values())
            and not gw.core.uncommitted and gw.store.pending == 0 and gw.publisher.inflight == 0)


def val(samples: Samples, name: str, **labels: str) -> float:
    """The value of one series; 0 when absent (a counter not yet created)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------------------------------------------- the pipeline

async def test_metrics_move_under_production(tmp_path, mqtt_broker):
    """Two machines producing, the ERP answering every event (acks: all): connector samples / polls / reads, core
    samples, commits, MQTT published / acked / last PUBACK, ERP acks and sync latency per machine, an anomaly, an
    ERP rejection in the quarantine; outbox depth and bytes current (0 once everything is delivered)."""
    m1 = MachineModel("Press1", cycle_time=0.01, seed=1)
    m2 = MachineModel("Press2", cycle_time=0.01, seed=2, counter_bits=16)
    port = free_port()
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"))
    erp.ack_accepted = True
    rejected: list[str] = []

    def reject_one(ev: dict[str, Any]) -> str | None:
        if not rejected and ev["type"] == "operation.quantity_reported" and ev["subject"] == "press-1":
            rejected.append(ev["id"])
            return "test: cost centre locked"
        return None

    async with OpcUaMachineServer(m1, host="127.0.0.1", port=free_port()) as opc, \
            ModbusMachineServer(m2, port=free_port()) as mb:
        cfg = with_http(gateway_config(broker_port=mqtt_broker.port, store_path=str(tmp_path / "gw.db"), opc=opc,
                                       modbus=mb, interval_s=0.2), port)
        await erp.start()
        rg = RunningGateway(cfg)
        gw, port = await start_with_http(rg)
        try:
            await wait_until(lambda: all(c.status.state.value == "connected" for c in gw.connectors.values()), 15)
            before = await scrape(port)
            assert val(before, "edge_gateway_build_info", version=gw.exporter.version, gateway="gw-test") == 1
            assert val(before, "edge_gateway_connector_up", connector="opc") == 1
            assert val(before, "edge_gateway_connector_up", connector="mb") == 1
            assert val(before, "edge_gateway_mqtt_connected") == 1

            erp.reject_rule = reject_one
            tasks = [asyncio.create_task(m.run_forever()) for m in (m1, m2)]
            m1.start()
            m2.start()
            for machine, model in (("press-1", m1), ("press-2", m2)):  # a changeover reads the counters (op=read)
                await dispatch_order(erp, rg, machine, model, "1000123", "0010")
            # enough events that both machines' reports were acknowledged by the ERP after tracking began
            await wait_until(lambda: erp.stats["accepted"] >= 30 and rejected and gw.store.quarantined == 1, 20)
            # a counter jump far beyond max_rate: held as an anomaly, not counted
            m2.set_counters(good=(m2.good_raw + 30_000) % 65536)
            await wait_until(lambda: gw.engines["press-2"].anomalies == 1, 10)
            for m in (m1, m2):
                m.pause()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # everything delivered: the outbox is empty (the gauge must say so at once, not at the next commit)
            await wait_until(lambda: settled(gw), 15)
            # ... and the ERP has answered every event it got
            await wait_until(lambda: erp.stats["accepted"] + erp.stats["refused"] >= gw.stats.events_committed
                             and gw.exporter.erp_acks["accepted"] >= erp.stats["accepted"], 15,
                             message="the gateway did not take in the ERP's acknowledgements")
            after = await scrape(port)
        finally:
            await rg.stop()
            await erp.stop()

    def moved(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    assert_documented(after)
    # connectors: every sample counted, polls and reads timed
    for cid in ("opc", "mb"):
        assert moved("edge_gateway_connector_samples_total", connector=cid) > 10, cid
    assert moved("edge_gateway_connector_read_duration_seconds_count", connector="mb", op="poll") > 10
    assert moved("edge_gateway_connector_read_duration_seconds_count", connector="opc", op="watchdog") >= 1
    assert val(after, "edge_gateway_connector_read_duration_seconds_sum", connector="mb", op="poll") > 0
    for cid in ("opc", "mb"):
        assert moved("edge_gateway_connector_read_duration_seconds_count", connector=cid, op="read") >= 1, cid
    # the core's count: the connectors' samples plus the changeover reads (handed to the core directly)
    assert moved("edge_gateway_samples_total") > 20
    assert val(after, "edge_gateway_samples_total") <= gw.stats.samples
    # store
    committed = sum(v for (n, _), v in after.items() if n == "edge_gateway_events_committed_total")
    assert 30 < committed <= gw.stats.events_committed
    assert moved("edge_gateway_events_committed_total", type="operation.quantity_reported") > 20
    assert moved("edge_gateway_store_commit_duration_seconds_count") >= 10
    assert val(after, "edge_gateway_outbox_pending") == 0 and val(after, "edge_gateway_outbox_oldest_age_seconds") == 0
    # quarantine: the payload of the ERP-rejected event stays in the store
    assert val(after, "edge_gateway_quarantine_events") == 1
    assert val(after, "edge_gateway_events_quarantined_total", by="erp") == 1
    assert val(after, "edge_gateway_store_payload_bytes") > 0
    # anomalies, per machine
    assert moved("edge_gateway_counter_anomalies_total", machine="press-2") == 1
    assert val(after, "edge_gateway_counter_anomalies_total", machine="press-1") == 0
    # MQTT
    acked = val(after, "edge_gateway_events_acked_total")
    # one consistent snapshot: every committed event was acknowledged by the broker or is still in the outbox (the
    # ERP-refused one too: the ERP refuses after the broker's PUBACK)
    assert acked + val(after, "edge_gateway_outbox_pending") == committed
    assert acked <= gw.publisher.acked
    assert val(after, "edge_gateway_mqtt_published_events_total") >= acked
    assert moved("edge_gateway_events_acked_total") > 30
    assert time.time() - val(after, "edge_gateway_mqtt_last_puback_timestamp_seconds") < 30
    assert val(after, "edge_gateway_mqtt_connects_total") == 1
    # ERP: acknowledgements and the sync latency (event time -> ERP ack), per machine
    assert moved("edge_gateway_erp_acks_received_total", status="accepted") >= 30
    assert val(after, "edge_gateway_erp_acks_received_total", status="rejected") == 1
    assert 0 <= time.time() - val(after, "edge_gateway_erp_last_ack_timestamp_seconds") < 30
    for machine in ("press-1", "press-2"):
        n = val(after, "edge_gateway_erp_sync_latency_seconds_count", machine=machine)
        total = val(after, "edge_gateway_erp_sync_latency_seconds_sum", machine=machine)
        assert n >= 5, (machine, n)
        assert 0 < total / n < 10, (machine, total / n)
        # a histogram: every observation in the +Inf bucket, and some under 5 s
        assert val(after, "edge_gateway_erp_sync_latency_seconds_bucket", machine=machine, le="+Inf") == n
        assert val(after, "edge_gateway_erp_sync_latency_seconds_bucket", machine=machine, le="5.0") > 0


def documented() -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(edge_gateway_[a-z_]+)` \|", text, re.MULTILINE))


def assert_documented(samples: Samples) -> None:
    """Every edge_gateway metric a scrape shows is in docs/metrics.md, and every documented one exists (in the
    scrape, or in the process-wide registry: labelled counters show no series before their first increment)."""
    assert [n for n, _ in samples if n.endswith("_created")] == []  # no creation-time series (gateway/metrics.py)
    scraped = {re.sub(r"_(bucket|count|sum)$", "", n) for n, _ in samples if n.startswith("edge_gateway_")}
    docs = documented()
    assert scraped - docs == set(), f"metrics missing from docs/metrics.md: {sorted(scraped - docs)}"
    known = scraped | {n for c in list(REGISTRY._collector_to_names) for n in REGISTRY._collector_to_names[c]}
    assert docs - known == set(), f"documented metrics that do not exist: {sorted(docs - known)}"


# ---------------------------------------------------------------------------------------------------- a PLC outage

async def test_connector_metrics_through_a_plc_outage(tmp_path, mqtt_broker):
    """The Modbus device goes away and comes back: up 1 -> 0 -> 1, state disconnected while away, one reconnect."""
    model = MachineModel("Press2", cycle_time=0.01, seed=3)
    port = free_port()
    server = ModbusMachineServer(model, port=free_port())
    await server.start()
    cfg = with_http(gateway_config(broker_port=mqtt_broker.port, store_path=str(tmp_path / "gw.db"), modbus=server),
                    port)
    rg = RunningGateway(cfg)
    gw, port = await start_with_http(rg)
    try:
        await wait_until(lambda: gw.connectors["mb"].status.state.value == "connected", 10)
        s = await scrape(port)
        assert val(s, "edge_gateway_connector_up", connector="mb") == 1
        assert val(s, "edge_gateway_connector_reconnects_total", connector="mb") == 0
        await server.stop()
        await wait_until(lambda: gw.connectors["mb"].status.state.value == "disconnected", 10)
        s = await scrape(port)
        assert val(s, "edge_gateway_connector_up", connector="mb") == 0
        assert val(s, "edge_gateway_connector_state", connector="mb", state="disconnected") == 1
        assert val(s, "edge_gateway_connector_state", connector="mb", state="connected") == 0
        polls = val(s, "edge_gateway_connector_read_duration_seconds_count", connector="mb", op="poll")
        await server.start()
        await wait_until(lambda: gw.connectors["mb"].status.state.value == "connected", 15)
        s = await scrape(port)
        assert val(s, "edge_gateway_connector_up", connector="mb") == 1
        assert val(s, "edge_gateway_connector_reconnects_total", connector="mb") == 1
        assert val(s, "edge_gateway_connector_read_duration_seconds_count", connector="mb", op="poll") > polls
    finally:
        await rg.stop()
        await server.stop()


# ---------------------------------------------------------------------------------------------------- the operator check

async def test_oldest_unsent_age_rises_during_broker_outage_and_falls_after(tmp_path, mqtt_broker):
    """Issue 9, "done when": a Prometheus scrape of /metrics parses and shows the oldest-unsent age rising during a
    broker outage and falling after it (with the outbox depth, the MQTT link state and the reconnect)."""
    model = MachineModel("Press2", cycle_time=0.01, seed=4)
    port = free_port()
    async with ModbusMachineServer(model, port=free_port()) as mb:
        cfg = with_http(gateway_config(broker_port=mqtt_broker.port, store_path=str(tmp_path / "gw.db"), modbus=mb,
                                       interval_s=0.2), port)
        rg = RunningGateway(cfg)
        gw, port = await start_with_http(rg)
        task = asyncio.create_task(model.run_forever())
        model.start()
        try:
            await wait_until(lambda: gw.publisher.acked >= 5, 15)
            s = await scrape(port)
            assert val(s, "edge_gateway_mqtt_connected") == 1
            assert val(s, "edge_gateway_outbox_oldest_age_seconds") < 2

            await asyncio.to_thread(mqtt_broker.stop)
            # store.pending also counts rows the broker acknowledged before it went away, until their batched
            # delete (every 0.1 s): scraped until an event committed during the outage is in the outbox
            first = await scrape_until(port, lambda s: val(s, "edge_gateway_mqtt_connected") == 0
                                       and val(s, "edge_gateway_outbox_pending") > 0, 15, "an unsent event in the outbox")
            assert val(first, "edge_gateway_mqtt_connected") == 0
            # the oldest unsent event keeps ageing while the broker is away (scraped until it has), the outbox fills
            age1 = val(first, "edge_gateway_outbox_oldest_age_seconds")
            second = await scrape_until(port, lambda s: val(s, "edge_gateway_outbox_oldest_age_seconds") >= age1 + 2,
                                        10, "the oldest unsent age rises during the outage")
            age2 = val(second, "edge_gateway_outbox_oldest_age_seconds")
            assert age2 >= 2
            assert val(second, "edge_gateway_outbox_pending") > val(first, "edge_gateway_outbox_pending") > 0
            assert val(second, "edge_gateway_outbox_bytes") > val(first, "edge_gateway_outbox_bytes") > 0
            assert val(second, "edge_gateway_store_payload_bytes") > 0

            await asyncio.to_thread(mqtt_broker.start)
            # the backlog drains while the machine keeps producing: the age falls back under a second
            third = await scrape_until(port, lambda s: val(s, "edge_gateway_outbox_oldest_age_seconds") < 1.0,
                                       15, "the oldest unsent age falls after the outage")
            assert val(third, "edge_gateway_mqtt_connected") == 1
            assert val(third, "edge_gateway_mqtt_connects_total") == 2
            assert val(third, "edge_gateway_outbox_pending") < val(second, "edge_gateway_outbox_pending")
            model.pause()
            await wait_until(lambda: settled(gw), 15)
            last = await scrape(port)
            assert val(last, "edge_gateway_outbox_oldest_age_seconds") == 0
            assert val(last, "edge_gateway_outbox_pending") == 0
        finally:
            model.pause()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await rg.stop()


# ---------------------------------------------------------------------------------------------------- sync tracking

def test_sync_latency_tracking_is_bounded_and_keyed_by_the_encoded_event_id(tmp_path):
    """The id the exporter reads out of a payload is the id the encoder wrote (the ERP acks by it); nothing is
    tracked until the ERP has sent a positive ack; the map never holds more than SYNC_TRACK_MAX events."""
    cfg = gateway_config(broker_port=1, store_path=str(tmp_path / "gw.db"))
    gw = Gateway(cfg)
    m: GatewayMetrics = gw.exporter
    enc = EventEncoder(cfg.gateway, Topics("edge", cfg.gateway), "epoch-1")

    def rows(first: int, n: int, t: float) -> list[OutboxRow]:
        out = []
        for seq in range(first, first + n):
            topic, payload = enc.encode(EventDraft("machine.state_changed", "press-1", t, {"state": "running"}), seq)
            out.append(OutboxRow(seq, "press-1", "machine.state_changed", topic, payload, t))
        return out

    def sync_count() -> float:
        return sum(s.value for fam in m.registry.collect() for s in fam.samples
                   if s.name == "edge_gateway_erp_sync_latency_seconds_count")

    m.committed(rows(1, 10, time.time()), 0.001)
    assert not m._sent  # no positive ack seen yet: nothing tracked
    m.erp_ack(ErpAck("accepted", enc.event_id(1)))
    assert sync_count() == 0  # committed before tracking began
    t0 = time.time() - 2.0
    m.committed(rows(11, 3, t0), 0.001)
    m.erp_ack(ErpAck("accepted", enc.event_id(12)))
    m.erp_ack(ErpAck("accepted", enc.event_id(12)))  # a duplicate ack is timed once
    assert sync_count() == 1
    [latency] = [s.value for fam in m.registry.collect() for s in fam.samples
                 if s.name == "edge_gateway_erp_sync_latency_seconds_sum"]
    assert 2.0 <= latency < 3.0
    m.committed(rows(100, SYNC_TRACK_MAX + 10, time.time()), 0.001)
    assert len(m._sent) <= SYNC_TRACK_MAX
    assert m.sync_untracked > 0
    m.erp_ack(ErpAck("accepted", enc.event_id(100 + SYNC_TRACK_MAX + 5)))  # recent ones are still tracked
    assert sync_count() == 2


# ---------------------------------------------------------------------------------------------------- a frozen broker

async def test_inflight_messages_while_the_broker_is_frozen(tmp_path, mqtt_broker):
    """A broker that stops answering (SIGSTOP) without closing its sockets: the gateway has not noticed yet, keeps
    publishing into the void, and the messages in flight are visible; they drain after SIGCONT."""
    import os
    import signal

    model = MachineModel("Press2", cycle_time=0.01, seed=5)
    port = free_port()
    async with ModbusMachineServer(model, port=free_port()) as mb:
        cfg = with_http(gateway_config(broker_port=mqtt_broker.port, store_path=str(tmp_path / "gw.db"), modbus=mb,
                                       interval_s=0.1, keepalive_s=10), port)
        rg = RunningGateway(cfg)
        gw, port = await start_with_http(rg)
        task = asyncio.create_task(model.run_forever())
        model.start()
        frozen = False
        try:
            await wait_until(lambda: gw.publisher.acked >= 3, 15)
            os.kill(mqtt_broker.pid, signal.SIGSTOP)
            frozen = True
            await wait_until(lambda: gw.publisher.inflight >= 3, 10)
            s = await scrape(port)
            assert val(s, "edge_gateway_mqtt_connected") == 1  # not noticed (keepalive 10 s)
            assert val(s, "edge_gateway_mqtt_inflight_messages") >= 3
            os.kill(mqtt_broker.pid, signal.SIGCONT)
            frozen = False
            model.pause()
            await wait_until(lambda: settled(gw), 15)
            s = await scrape(port)
            assert val(s, "edge_gateway_mqtt_inflight_messages") == 0
        finally:
            if frozen:
                os.kill(mqtt_broker.pid, signal.SIGCONT)
            model.pause()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await rg.stop()
