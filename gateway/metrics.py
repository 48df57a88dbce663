"""Prometheus metrics (process-wide). Tests read per-gateway figures from Gateway.stats instead."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SAMPLES = Counter("edge_gateway_samples_total", "Samples received from connectors", ["machine"])
EVENTS_COMMITTED = Counter("edge_gateway_events_committed_total", "Events written to the outbox", ["type"])
EVENTS_ACKED = Counter("edge_gateway_events_acked_total", "Events acknowledged by the broker (PUBACK)")
DISPATCH_REJECTED = Counter("edge_gateway_dispatch_rejected_total", "Malformed dispatch messages", ["reason"])
DISPATCH_ACCEPTED = Counter("edge_gateway_dispatch_accepted_total", "Dispatch messages applied")
ANOMALIES = Counter("edge_gateway_counter_anomalies_total", "Counter anomalies (held quantities)", ["machine"])
OUTBOX_PENDING = Gauge("edge_gateway_outbox_pending", "Events in the outbox not yet acknowledged")
STORE_FULL = Gauge("edge_gateway_store_full", "1 while the store is at its size cap or the disk is full")
DROPPED = Counter("edge_gateway_events_dropped_total", "Low-value events dropped while the store was full", ["type"])
ALARMS_ACTIVE = Gauge("edge_gateway_alarms_active", "Active alarms", ["severity"])
INPUT_COALESCED = Counter("edge_gateway_input_coalesced_samples_total",
                          "Queued cumulative samples merged into a later one under overload (their delta is kept)")
MACHINE_FAULTS = Counter("edge_gateway_machine_faults_total", "Machines stopped because their engine raised")
COMMIT_FAILURES = Counter("edge_gateway_store_commit_failures_total", "Failed group commits (retried)", ["kind"])
ACKS_REJECTED = Counter("edge_gateway_erp_acks_rejected_total", "ERP acknowledgements refused (malformed, foreign)",
                        ["reason"])

# --- OPC UA certificates (connectors/opcua/connector.py) ---
OPCUA_CERTIFICATE_EXPIRY_DAYS = Gauge(
    "edge_gateway_opcua_certificate_expiry_days",
    "Days until a certificate of an OPC UA session expires (negative: expired): which=own (our application "
    "certificate) or server", ["connector", "endpoint", "which"])
