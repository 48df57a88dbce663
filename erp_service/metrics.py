"""Prometheus metrics of the ERP posting service (one registry per service instance: several instances can live in
one process, e.g. in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("edge_erp_events_total", "Events received, by outcome "
                              "(accepted, duplicate, conflict, rejected).", ["outcome"], registry=r)
        self.messages = Counter("edge_erp_messages_total", "Broker messages processed (a batch is one).",
                                registry=r)
        self.conflicts = Counter("edge_erp_conflicts_total", "Duplicates (same source + id, or same source + epoch + "
                                 "seq) whose content differs from the first: alarmed, recorded in erp_conflicts.",
                                 registry=r)
        self.seq_gaps = Gauge("edge_erp_seq_gap_open", "Missing seq numbers below the highest seen, all streams.",
                              registry=r)
        self.gap_alarm = Gauge("edge_erp_seq_gap_alarm", "1 while a gap stays open longer than gap_alarm_s.",
                               registry=r)
        self.reorders = Counter("edge_erp_seq_reordered_total", "Events that arrived after a later seq of their "
                                "stream.", registry=r)
        self.held = Gauge("edge_erp_completions_held", "operation.completed held behind an open seq gap.",
                          registry=r)
        self.seqs_released = Gauge("edge_erp_seqs_released", "Seqs released by hand (edge-gateway-erp release-gap), "
                                   "all time, from erp_releases (the command runs in its own process).", registry=r)
        self.outbox_pending = Gauge("edge_erp_outbox_pending", "Outbox documents not yet acknowledged by the ERP.",
                                    registry=r)
        self.posted = Counter("edge_erp_posted_total", "Documents acknowledged by the ERP, by kind.", ["kind"],
                              registry=r)
        self.erp_errors = Counter("edge_erp_erp_errors_total", "Failed ERP calls, by reason.", ["reason"],
                                  registry=r)
        self.posting_latency = Histogram("edge_erp_posting_latency_seconds", "Event time → acknowledged by the ERP.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge("edge_erp_consumer_lag", "Messages not yet delivered to the consumer (JetStream "
                                  "num_pending + ack pending).", registry=r)
        self.db_retries = Counter("edge_erp_db_retries_total", "Transactions retried (deadlock, serialization, "
                                  "connection).", registry=r)
        self.processing_errors = Counter("edge_erp_processing_errors_total", "Messages left unacknowledged after an "
                                         "internal error (redelivered later).", registry=r)
