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


def test_listener_is_told_at_each_edge_only():
    """The retained status topic is republished when an alarm is raised or cleared, not on every refresh."""
    a = Alarms()
    seen: list[list[str]] = []
    a.on_change = lambda: seen.append(a.ids())
    a.raise_("broker_unreachable", "critical", "down", down_s=1)
    a.raise_("broker_unreachable", "critical", "down", down_s=2)  # a refresh of its evidence
    a.set("quarantine_not_empty", False, "warning", "none")  # not active: no edge
    a.set("quarantine_not_empty", True, "warning", "one", quarantined=1)
    a.clear("broker_unreachable")
    a.clear("broker_unreachable")
    assert seen == [["broker_unreachable"], ["broker_unreachable", "quarantine_not_empty"], ["quarantine_not_empty"]]
    assert a.active()[0].evidence == {"quarantined": 1}


def test_alarms_per_kind_for_alerting_rules():
    """An alerting rule can match one kind of alarm (the id up to ':'): two machines with a completion the ERP has not
    acknowledged count 2 in one series; cleared, it goes back to 0 (the series stays, a rule sees the edge)."""
    from prometheus_client import REGISTRY

    def kind(k: str) -> float | None:
        return REGISTRY.get_sample_value("edge_gateway_alarms_by_kind", {"alarm": k})

    a = Alarms()
    a.raise_("completion_unacked:press-1", "critical", "not posted", unacknowledged=1)
    a.raise_("completion_unacked:press-2", "critical", "not posted", unacknowledged=3)
    a.raise_("quarantine_not_empty", "warning", "one", quarantined=1)
    assert kind("completion_unacked") == 2 and kind("quarantine_not_empty") == 1
    assert kind("completion_unacked:press-1") is None  # no series per machine
    a.clear("completion_unacked:press-1")
    assert kind("completion_unacked") == 1
    a.clear("completion_unacked:press-2")
    a.clear("quarantine_not_empty")
    assert kind("completion_unacked") == 0 and kind("quarantine_not_empty") == 0


def test_a_failing_listener_does_not_stop_the_alarm():
    a = Alarms()

    def broken() -> None:
        raise RuntimeError("status topic down")

    a.on_change = broken
    with structlog.testing.capture_logs() as logs:
        a.raise_("store_full", "critical", "full")
    assert a.ids() == ["store_full"] and ALARMS_ACTIVE.labels("critical")._value.get() == 1
    assert [e["event"] for e in logs] == ["alarm.raised", "alarm.listener_failed"]
    a.on_change = None
    a.clear("store_full")


def test_alarm_thresholds_have_defaults_and_can_be_switched_off():
    from gateway.config import parse_config

    ident = {"id": "gw-1", "enterprise": "acme", "site": "p1", "area": "a1", "line": "l1"}
    cfg = parse_config({"gateway": ident}, "<test>")
    assert (cfg.alarms.broker_unreachable_s, cfg.alarms.connector_down_s, cfg.alarms.oldest_unsent_s,
            cfg.alarms.completion_unacked_s) == (60, 60, 300, 600)
    cfg = parse_config({"gateway": ident, "alarms": {"completion_unacked_s": None, "oldest_unsent_s": 30}}, "<test>")
    assert cfg.alarms.completion_unacked_s is None and cfg.alarms.oldest_unsent_s == 30
