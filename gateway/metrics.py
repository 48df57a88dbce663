"""Prometheus metrics incremented where things happen (process-wide, rare events only).

The figures of a gateway that move per sample or per event (samples, events committed and acknowledged, outbox
depth, anomalies, connector and MQTT state, sync latency) are not here: they are plain ints kept where the work is
done and exported at scrape time by ``gateway.exporter`` (a per-gateway registry). ``GET /metrics`` serves both.
docs/metrics.md lists every metric."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics

# no ``*_created`` series beside every counter and histogram (the time each was created, a second series per label
# set that a dashboard never uses): process-wide, read at each scrape
disable_created_metrics()

DISPATCH_REJECTED = Counter("edge_gateway_dispatch_rejected_total", "Malformed dispatch messages", ["reason"])
DISPATCH_ACCEPTED = Counter("edge_gateway_dispatch_accepted_total", "Dispatch messages applied")
STORE_FULL = Gauge("edge_gateway_store_full", "1 while the store is at its size cap or the disk is full")
DROPPED = Counter("edge_gateway_events_dropped_total", "Low-value events dropped while the store was full", ["type"])
ALARMS_ACTIVE = Gauge("edge_gateway_alarms_active", "Active alarms", ["severity"])
ALARMS_BY_KIND = Gauge("edge_gateway_alarms_by_kind",
                       "Active alarms of each kind (the alarm id up to ':', e.g. completion_unacked)", ["alarm"])
INPUT_COALESCED = Counter("edge_gateway_input_coalesced_samples_total",
                          "Queued cumulative samples merged into a later one under overload (their delta is kept)")
MACHINE_FAULTS = Counter("edge_gateway_machine_faults_total", "Machines stopped because their engine raised")
COMMIT_FAILURES = Counter("edge_gateway_store_commit_failures_total", "Failed group commits (retried)", ["kind"])
PUBACK_TIMEOUTS = Counter("edge_gateway_mqtt_puback_timeouts_total",
                          "Connections ended because a message waited mqtt.puback_timeout_s for its PUBACK")
ACKS_REJECTED = Counter("edge_gateway_erp_acks_rejected_total", "ERP acknowledgements refused (malformed, foreign)",
                        ["reason"])

# --- OPC UA certificates (connectors/opcua/connector.py) ---
OPCUA_CERTIFICATE_EXPIRY_DAYS = Gauge(
    "edge_gateway_opcua_certificate_expiry_days",
    "Days until a certificate of an OPC UA session expires (negative: expired): which=own (our application "
    "certificate) or server", ["connector", "endpoint", "which"])
