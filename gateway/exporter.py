"""Per-gateway Prometheus metrics, read at scrape time (see docs/metrics.md for every metric).

Why a collector and not counters incremented where things happen: the sample and event paths are hot (one
``labels(...).inc()`` costs about a microsecond, more than a sample's whole share of the core loop). The gateway already
keeps plain ints where the work is done — ``Gateway.stats``, each connector (``samples``, ``status``; an OPC UA
connector's ``queue_overflows``), the publisher (``published``, ``acked``, ``inflight``), the store (``pending``,
``pending_bytes``, ``quarantined``), each machine engine (``anomalies``) — and :class:`GatewayCollector` turns them into
metric families when Prometheus asks. Gauges of state (outbox depth, oldest unsent age, connector up) are therefore
always current, never "as of the last commit". Only three things are observed where they happen, each at most once per
batch, poll or ERP answer:

- the group-commit duration (one ``observe`` per commit, in :meth:`GatewayMetrics.committed`);
- connector read / poll durations (one per Modbus poll, per OPC UA watchdog read, per changeover cut read);
- the sync latency, event time → ERP acknowledgement (one per accepted ERP ack, :meth:`GatewayMetrics.erp_ack`).

The registry is per gateway (``GatewayMetrics.registry``): two gateways in one process (tests) do not share figures.
``GET /metrics`` serves it together with the process-wide registry of ``gateway.metrics`` (alarms, dispatches,
commit failures, dropped events) and the process / platform collectors.

Sync latency needs the time of the event an ERP acknowledgement names. The ack carries only the event id, so the
gateway remembers ``id -> (machine, event time)`` of committed events — but only once the ERP has shown that it sends
positive acknowledgements (``erp_service`` with ``acks: all``): a gateway whose ERP never sends one pays nothing per
event. The map is bounded (``SYNC_TRACK_MAX`` events; the oldest are forgotten first and counted in
``edge_gateway_erp_sync_untracked_total``). Events committed before a restart are not timed.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.component import ComponentState
from gateway.store import OLDEST_ROWS_SQL, first_unacked_created

if TYPE_CHECKING:
    from gateway.dispatch import ErpAck
    from gateway.runtime import Gateway
    from gateway.store import OutboxRow

SYNC_TRACK_MAX = 50_000
"""Committed events remembered for the sync latency (about 100 bytes each) until the ERP acknowledges them."""
SYNC_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, float("inf"))
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))
READ_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))

# the event id is the first attribute of every payload the gateway encodes (gateway.events.EventEncoder.encode)
_ID_AT = len(b'{"specversion": "1.0", "id": "')
_ID_END = _ID_AT + 36  # a UUID in its canonical text form

_STATES = [s.value for s in ComponentState]
_type_of = attrgetter("type")


def version() -> str:
    try:
        return importlib.metadata.version("edge-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def oldest_pending_created(path: str, acked: frozenset[int] = frozenset()) -> float | None:
    """Commit time (wall clock) of the outbox row delivered next (lowest id not in ``acked``: the acknowledged rows
    waiting for their delete), or None when there is none.

    A read on a connection of its own (WAL: it never waits for the gateway's writer); ``Store.oldest_unacked_created``
    on the store's connection."""
    db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=1)
    try:
        rows = db.execute(OLDEST_ROWS_SQL, (len(acked) + 1,)).fetchall()
    finally:
        db.close()
    return first_unacked_created(rows, acked)


class GatewayMetrics:
    """The figures of one gateway that are not plain counters elsewhere, and its registry.

    The runtime calls :meth:`committed` after each successful group commit and :meth:`erp_ack` for each valid ERP
    acknowledgement; connectors get a duration observer (:meth:`wire`)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.registry = CollectorRegistry(auto_describe=False)
        self.commit_seconds = Histogram(
            "edge_gateway_store_commit_duration_seconds",
            "Duration of one group commit (snapshots + events in one SQLite transaction, fsync included)",
            buckets=COMMIT_BUCKETS, registry=None)
        self.read_seconds = Histogram(
            "edge_gateway_connector_read_duration_seconds",
            "Duration of a connector's reads: op=poll (one Modbus poll of every block), op=read (a one-shot read, "
            "e.g. the counters at an order changeover), op=watchdog (the OPC UA watchdog's read of the server time)",
            ["connector", "op"], buckets=READ_BUCKETS, registry=None)
        self.sync_seconds = Histogram(
            "edge_gateway_erp_sync_latency_seconds",
            "Time from an event's time to the ERP's acknowledgement of it (status accepted on .../{machine}/acks)",
            ["machine"], buckets=SYNC_LATENCY_BUCKETS, registry=None)
        self.committed_by_type: Counter[str] = Counter()
        self.erp_acks: Counter[str] = Counter()
        self.erp_last_ack: float | None = None
        self.sync_untracked = 0
        self._track = False  # on once the ERP has sent a positive ack
        self._sent: dict[bytes, tuple[str, float]] = {}
        self.version = version()
        self.registry.register(GatewayCollector(self))
        self.wire()

    # ------------------------------------------------------------------ called by the runtime
    def committed(self, rows: list[OutboxRow], seconds: float) -> None:
        """After a successful group commit of ``rows`` that took ``seconds``: once per commit, not per event."""
        self.commit_seconds.observe(seconds)
        if not rows:
            return
        self.committed_by_type.update(map(_type_of, rows))
        if self._track:
            sent = self._sent
            sent.update({r.payload[_ID_AT:_ID_END]: (r.machine, r.time) for r in rows})
            if len(sent) > SYNC_TRACK_MAX:
                drop = len(sent) - SYNC_TRACK_MAX + SYNC_TRACK_MAX // 10  # forget the oldest, in one go
                for k in list(itertools.islice(sent, drop)):
                    del sent[k]
                self.sync_untracked += drop

    def erp_ack(self, ack: ErpAck) -> None:
        """A valid ERP acknowledgement arrived (accepted or rejected): count it; time an accepted one."""
        now = time.time()
        self.erp_acks[ack.status] += 1
        self.erp_last_ack = now
        if ack.status != "accepted":
            return
        self._track = True
        hit = self._sent.pop(ack.event_id.encode(), None) if ack.event_id else None
        if hit is not None:
            machine, t = hit
            self.sync_seconds.labels(machine).observe(max(0.0, now - t))

    def wire(self) -> None:
        """Give every connector its read-duration observer (idempotent; also picks up connectors added later)."""
        for cid, conn in self.gw.connectors.items():
            if getattr(conn, "_metrics_wired", None) is not self:
                conn.observe_read = self._observer(cid)
                conn._metrics_wired = self  # type: ignore[attr-defined]

    def _observer(self, cid: str) -> Callable[[str, float], None]:
        children: dict[str, Any] = {}
        hist = self.read_seconds

        def observe(op: str, seconds: float) -> None:
            child = children.get(op)
            if child is None:
                child = children[op] = hist.labels(cid, op)
            child.observe(seconds)

        return observe


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class GatewayCollector(Collector):
    """Reads the gateway's plain counters and state at scrape time (see the module docstring)."""

    def __init__(self, m: GatewayMetrics) -> None:
        self.m = m

    def collect(self) -> Iterable[Metric]:
        m, gw = self.m, self.m.gw
        m.wire()
        stats, store, pub, link = gw.stats, gw.store, gw.publisher, gw.link
        gid = gw.cfg.gateway.id

        info = GaugeMetricFamily("edge_gateway_build_info", "Version of the running gateway (always 1)",
                                 labels=["version", "gateway"])
        info.add_metric([m.version, gid], 1)
        yield info

        # ---- connectors
        up = GaugeMetricFamily("edge_gateway_connector_up",
                               "1 while the connector has a working session with its device (connected or degraded)",
                               labels=["connector"])
        state = GaugeMetricFamily("edge_gateway_connector_state", "The connector's state (1 for the current one)",
                                  labels=["connector", "state"])
        reconnects = CounterMetricFamily("edge_gateway_connector_reconnects_total",
                                         "Sessions re-established after a loss", labels=["connector"])
        samples = CounterMetricFamily("edge_gateway_connector_samples_total",
                                      "Samples (tag values, good or bad) the connector delivered", labels=["connector"])
        overflows = CounterMetricFamily("edge_gateway_opcua_queue_overflows_total",
                                        "Values an OPC UA server delivered with the Overflow bit: its monitored item "
                                        "queue was full and discarded values (per tag: /status queue_overflows)",
                                        labels=["connector"])
        for cid, conn in gw.connectors.items():
            st = conn.status.state
            up.add_metric([cid], 1 if st in (ComponentState.CONNECTED, ComponentState.DEGRADED) else 0)
            for s in _STATES:
                state.add_metric([cid, s], 1 if st.value == s else 0)
            reconnects.add_metric([cid], conn.status.detail.get("reconnects", 0))
            samples.add_metric([cid], getattr(conn, "samples", 0))
            n = getattr(conn, "queue_overflows", None)  # OPC UA connectors only
            if n is not None:
                overflows.add_metric([cid], n)
        yield from (up, state, reconnects, samples, overflows)
        yield from m.read_seconds.collect()
        yield _counter("edge_gateway_samples_total", "Samples handed to the machine engines by the core loop",
                       stats.samples)

        # ---- machines
        anomalies = CounterMetricFamily("edge_gateway_counter_anomalies_total",
                                        "Counter anomalies: implausible jumps and ambiguous decreases held as "
                                        "counter.anomaly events (since the gateway started)", labels=["machine"])
        for mid, eng in gw.engines.items():
            anomalies.add_metric([mid], eng.anomalies)
        yield anomalies

        # ---- store
        committed = CounterMetricFamily("edge_gateway_events_committed_total", "Events written to the outbox",
                                        labels=["type"])
        for t, n in sorted(m.committed_by_type.items()):
            committed.add_metric([t], n)
        yield committed
        yield from m.commit_seconds.collect()
        yield GaugeMetricFamily("edge_gateway_outbox_pending", "Events in the outbox not yet acknowledged by the "
                                "broker", value=store.pending)
        yield GaugeMetricFamily("edge_gateway_outbox_bytes", "Payload bytes of the events in the outbox (not yet "
                                "acknowledged by the broker)", value=store.pending_bytes - store.quarantined_bytes)
        yield GaugeMetricFamily("edge_gateway_store_payload_bytes", "Payload bytes held in the store (outbox + "
                                                                    "quarantine): what store.max_size_mb caps",
                                value=store.pending_bytes)
        if store.max_bytes:
            yield GaugeMetricFamily("edge_gateway_store_payload_limit_bytes", "store.max_size_mb in bytes",
                                    value=store.max_bytes)
        yield GaugeMetricFamily("edge_gateway_quarantine_events", "Events in the quarantine (refused by the broker "
                                                                  "or the ERP; edge-gateway buffer list --quarantine)",
                                value=store.quarantined)
        oldest = _oldest(gw)
        yield GaugeMetricFamily("edge_gateway_outbox_oldest_age_seconds",
                                "Age of the oldest event not yet acknowledged by the broker (since its commit); "
                                "0 when the outbox is empty", value=0.0 if oldest is None else max(0.0, time.time() - oldest))

        # ---- MQTT
        yield GaugeMetricFamily("edge_gateway_mqtt_connected", "1 while the MQTT connection is up",
                                value=1 if link.is_connected else 0)
        yield _counter("edge_gateway_mqtt_connects_total", "Successful MQTT connections (the first one and every "
                                                           "reconnect)", link.connections)
        yield _counter("edge_gateway_mqtt_published_events_total", "Events handed to the MQTT client (resends after "
                                                                   "a reconnect included)", pub.published)
        yield _counter("edge_gateway_events_acked_total", "Events acknowledged by the broker (PUBACK)", pub.acked)
        yield GaugeMetricFamily("edge_gateway_mqtt_inflight_messages", "QoS 1 messages sent and not yet "
                                                                       "acknowledged (a batch message is one)",
                                value=pub.inflight)
        if pub.last_ack_time is not None:
            yield GaugeMetricFamily("edge_gateway_mqtt_last_puback_timestamp_seconds",
                                    "When the last PUBACKs were applied to the outbox (Unix time)",
                                    value=pub.last_ack_time)
        yield _counter("edge_gateway_mqtt_retried_events_total", "Events the broker refused transiently (kept and "
                                                                 "resent)", pub.retried)
        quarantined = CounterMetricFamily("edge_gateway_events_quarantined_total",
                                          "Events moved to the quarantine, by who refused them", labels=["by"])
        quarantined.add_metric(["broker"], pub.quarantined)
        quarantined.add_metric(["erp"], stats.erp_rejections)
        yield quarantined

        # ---- ERP
        acks = CounterMetricFamily("edge_gateway_erp_acks_received_total",
                                   "Valid ERP acknowledgements received on .../{machine}/acks, by status",
                                   labels=["status"])
        for s in ("accepted", "rejected"):
            acks.add_metric([s], m.erp_acks[s])
        yield acks
        if m.erp_last_ack is not None:
            yield GaugeMetricFamily("edge_gateway_erp_last_ack_timestamp_seconds",
                                    "When the last valid ERP acknowledgement arrived (Unix time)", value=m.erp_last_ack)
        yield from m.sync_seconds.collect()
        yield _counter("edge_gateway_erp_sync_untracked_total", "Committed events forgotten before the ERP "
                                                                "acknowledged them (bound of the sync latency map)",
                       m.sync_untracked)


def _oldest(gw: Gateway) -> float | None:
    if gw.store.pending <= 0 or gw.store._db is None:
        return None
    try:
        return oldest_pending_created(gw.store.path, gw.store.acks_waiting_ids)
    except sqlite3.Error:
        return None
