"""Alarms are raised once and cleared once, with id, severity, since and evidence; logged at each edge."""

from __future__ import annotations

import structlog

from gateway.alarms import Alarms
from gateway.metrics import ALARMS_ACTIVE


def test_raise_once_clear_once_with_evidence():
    a = Alarms()
    with structlog.testing.capture_logs() as logs:
        a.raise_("store_full", "critical", "full", pending_bytes=10)
        a.raise_("store_full", "critical", "full", pending_bytes=12)  # refresh, not a second edge
        assert a.ids() == ["store_full"]
        d = a.active()[0].as_dict()
        assert d["severity"] == "critical" and d["evidence"] == {"pending_bytes": 12} and d["since"].endswith("Z")
        assert ALARMS_ACTIVE.labels("critical")._value.get() == 1
        a.clear("store_full")
        a.clear("store_full")
    assert [(e["event"], e["alarm"]) for e in logs] == [("alarm.raised", "store_full"), ("alarm.cleared", "store_full")]
    assert a.ids() == [] and ALARMS_ACTIVE.labels("critical")._value.get() == 0
