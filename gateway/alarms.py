"""Alarms: conditions an operator must act on, each with a stable id, a severity, since-when and the evidence.

An alarm is raised once and cleared once: the log gets one line at each edge (``alarm.raised`` at error or warning,
``alarm.cleared`` at info, with how long it lasted), ``/status`` and the status topic list the active ones, and the
``edge_gateway_alarms_active`` gauge counts them per severity (``edge_gateway_alarms_by_kind`` per kind: the id up to
``:``). Raising an active alarm again only refreshes its
evidence.

Ids are stable strings an alerting rule can match: ``store_full``, ``store_commit_failing``, ``input_overflow``,
``machine_faulted:<machine>``, ``subscription_refused:<topic filter>``, ``erp_rejected`` (the ERP service answered
a rejection on the acks topic: the event is quarantined; raised again at start while such rows are quarantined);
raised by connectors (which report to the runtime's Alarms, ``Connector.alarms``): ``tag_refused:<machine>/<signal>``
(a monitored item the OPC UA server refused), ``queue_revised:<machine>/<signal>`` (its queue revised below what the
tag needs), ``queue_overflow:<machine>/<signal>`` (the server's queue of a delta / reset_on_read counter overflowed:
production lost at the server; cleared an hour after the last overflow once the queue is large enough),
``delta_gap:<machine>/<signal>`` (the connection of a delta / reset_on_read counter's OPC UA server was lost: what the
node took meanwhile is not counted; cleared an hour later),
``certificate_expiring:<connector>:own|server``; and those evaluated
by gateway/health.py (``broker_unreachable``, ``connector_down:<connector>``, ``quarantine_not_empty``,
``oldest_unsent_event``, ``completion_unacked:<machine>``, ``counter_anomaly:<machine>``; the table with thresholds is
in docs/operations.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from gateway import metrics
from gateway.component import rfc3339

log = structlog.get_logger(__name__)

Severity = Literal["critical", "warning"]


@dataclass
class Alarm:
    id: str
    severity: Severity
    message: str
    since: float  # wall clock, for people
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "message": self.message,
                "since": rfc3339(self.since),
                "evidence": self.evidence}


class Alarms:
    def __init__(self) -> None:
        self._active: dict[str, Alarm] = {}
        self._mono: dict[str, float] = {}
        self.on_change: Callable[[], None] | None = None  # after a raise or a clear (the retained status topic)
        self._kinds: set[str] = set()  # alarm kinds seen (their gauge goes back to 0, it is not removed)

    def raise_(self, id: str, severity: Severity, message: str, **evidence: Any) -> None:
        a = self._active.get(id)
        if a is not None:
            a.evidence = evidence
            return
        self._active[id] = Alarm(id, severity, message, time.time(), evidence)
        self._mono[id] = time.monotonic()
        (log.error if severity == "critical" else log.warning)("alarm.raised", alarm=id, severity=severity,
                                                                message=message, **evidence)
        self._gauge()
        self._changed()

    def clear(self, id: str, **evidence: Any) -> None:
        a = self._active.pop(id, None)
        if a is None:
            return
        lasted = time.monotonic() - self._mono.pop(id)
        log.info("alarm.cleared", alarm=id, lasted_s=round(lasted, 3), **evidence)
        self._gauge()
        self._changed()

    def set(self, id: str, active: bool, severity: Severity, message: str, **evidence: Any) -> None:
        if active:
            self.raise_(id, severity, message, **evidence)
        else:
            self.clear(id)

    def active(self) -> list[Alarm]:
        return sorted(self._active.values(), key=lambda a: a.id)

    def ids(self) -> list[str]:
        return sorted(self._active)

    def __contains__(self, id: str) -> bool:
        return id in self._active

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # a listener's failure must not stop the alarm's own bookkeeping
                log.exception("alarm.listener_failed")

    def _gauge(self) -> None:
        for sev in ("critical", "warning"):
            metrics.ALARMS_ACTIVE.labels(sev).set(sum(1 for a in self._active.values() if a.severity == sev))
        # per kind, so that an alerting rule can match one ("completed on the machine, not posted in the ERP"):
        # the id up to ':' (completion_unacked, connector_down, ...): a few series, not one per machine
        kinds = Counter(a.split(":", 1)[0] for a in self._active)
        self._kinds |= kinds.keys()
        for kind in self._kinds:
            metrics.ALARMS_BY_KIND.labels(kind).set(kinds.get(kind, 0))
