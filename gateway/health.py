"""Health: liveness, readiness, the overall state, and the gateway-level alarms, evaluated once a second.

The core loop calls ``Health.evaluate()`` when ``next_due`` has come (its timed work, like the reporting windows):
one evaluation a second of gateway-level conditions, a few dictionary looks per connector, no work per machine
except on the edge of a connector outage. It raises and clears the alarms below (``counter_anomaly`` is raised when
the anomaly is committed; the store alarms are the core's); every alarm has a stable id, a severity, since-when and
the evidence, and goes to ``/status``, the log (once raised, once cleared), the retained status topic (``alarms``,
republished at each edge by ``publish_status``) and the ``edge_gateway_alarms_active`` gauge (gateway/alarms.py).
The full table, with the alarms raised elsewhere, is in docs/operations.md.

=====================================  ========  ==========================================================
alarm id                               severity  raised when (threshold in ``alarms:``)
=====================================  ========  ==========================================================
``broker_unreachable``                 critical  the MQTT broker is unreachable longer than ``broker_unreachable_s``
``connector_down:<connector>``         critical  a connector is not connected longer than ``connector_down_s``
``store_full``                         critical  raised by the core at the commit: size cap or disk full
``store_commit_failing``               critical  raised by the core: a commit failed (cleared by the next good one)
``quarantine_not_empty``               warning   rows wait in the quarantine (``edge-gateway buffer list``)
``oldest_unsent_event``                critical  the oldest event not acknowledged by the broker is older than
                                                 ``oldest_unsent_s``
``completion_unacked:<machine>``       critical  an ``operation.completed`` event has no ERP acknowledgement
                                                 (``status: accepted``) after ``completion_unacked_s``
``counter_anomaly:<machine>``          warning   a ``counter.anomaly`` with a quantity held, in the last
                                                 ``anomaly_hold_s``
=====================================  ========  ==========================================================

A machine one of whose connectors has been down longer than ``machine_unreachable_s`` emits ``machine.state_changed``
with state ``unreachable`` (``MachineEngine.set_reachable``); it is reported again when the connector is back.

Liveness (``/livez``): the core loop has run a round within ``CORE_STALL_S`` (it runs at least once a second).
Readiness (``/readyz``): live, the store is open, its last commit did not fail and it is not full: the gateway can take
and durably buffer events. The broker is not part of it (buffering is the point). ``/health``: ``failed`` (HTTP 503)
when not live or not ready, ``degraded`` when a component is not connected or an alarm is active, else ``ok``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import structlog

from gateway.component import ComponentState, rfc3339
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.runtime import Gateway
    from gateway.store import OutboxRow
    from mappings.machine import EventDraft

log = structlog.get_logger(__name__)

EVALUATE_EVERY_S = 1.0
CORE_STALL_S = 10.0  # no core round for this long: not live
MAX_TRACKED_COMPLETIONS = 10_000  # unacknowledged completions remembered (the oldest are forgotten beyond this)
_DOWN = (ComponentState.STARTING, ComponentState.DISCONNECTED, ComponentState.STOPPED)


@dataclass(slots=True)
class _Completion:
    machine: str
    order: str | None
    operation: str | None
    committed_mono: float
    committed_wall: float


class Health:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.cfg.alarms
        self.next_due = 0.0  # monotonic: the core evaluates at its first round
        self.oldest_unsent_age_s: float | None = None  # of the last evaluation (None: outbox empty)
        self._down_since: dict[str, float] = {}  # component -> monotonic time it was first seen down
        self._unreachable: set[str] | None = None  # connectors whose machines were told 'unreachable'
        self._machines_of: dict[str, list[str]] = {}  # connector -> machines with any tag on it
        for m in gw.cfg.machines:
            tags = [*m.counters.values(), *m.materials.values(), m.state, m.order_tag, m.operation_tag, m.complete_tag]
            for cid in dict.fromkeys(t.connector for t in tags if t is not None):
                self._machines_of.setdefault(cid, []).append(m.id)
        self._completions: dict[str, _Completion] = {}  # event id -> completion waiting for the ERP's ack
        self._anomalies: dict[str, tuple[float, dict[str, Any]]] = {}  # machine -> (monotonic, evidence)
        gw.alarms.on_change = self.publish_status

    # ------------------------------------------------------------------ inputs from the runtime
    def committed(self, rows: list[OutboxRow]) -> None:
        """Rows of a successful commit: completions wait for the ERP's acknowledgement; anomalies with a held
        quantity raise their alarm at once."""
        for r in rows:
            if r.type == "operation.completed" and self.cfg.completion_unacked_s is not None:
                ev = json.loads(r.payload)
                if len(self._completions) >= MAX_TRACKED_COMPLETIONS:
                    self._completions.pop(next(iter(self._completions)))
                self._completions[ev["id"]] = _Completion(r.machine, ev["data"].get("order"),
                                                          ev["data"].get("operation"), time.monotonic(), time.time())
            elif r.type == "counter.anomaly":
                ev = json.loads(r.payload)
                d = ev["data"]
                try:
                    held = Decimal(d.get("held") or "0")
                except InvalidOperation:
                    held = Decimal(1)
                if held == 0:
                    continue
                evidence = {"event_id": ev["id"], "counter": d.get("counter"), "kind": d.get("kind"),
                            "held": d.get("held"), "time": ev.get("time"), "detail": d.get("detail")}
                self._anomalies[r.machine] = (time.monotonic(), evidence)
                self.gw.alarms.raise_(f"counter_anomaly:{r.machine}", "warning",
                                      "a counter change could not be counted with certainty: a quantity is held (not "
                                      "counted); check the machine's counter and the counter.anomaly event",
                                      machine=r.machine, **evidence)

    def erp_accepted(self, event_id: str | None) -> None:
        """The ERP acknowledged (posted) an event: a completion it acknowledged no longer waits."""
        c = self._completions.pop(event_id, None) if event_id else None
        if c is not None and f"completion_unacked:{c.machine}" in self.gw.alarms:
            self.next_due = 0.0  # re-evaluate now
            self.gw.core.wake()

    # ------------------------------------------------------------------ the evaluation (core loop, once a second)
    async def evaluate(self) -> list[EventDraft]:
        gw, cfg, alarms = self.gw, self.cfg, self.gw.alarms
        # the one await, first: a cancel (the gateway stopping) after an engine changed would lose the event that
        # reports the change, while the engine's state is persisted at the stop (tests/test_health_cancel.py)
        store = gw.store
        oldest = None
        if store.pending:
            try:  # the first unacknowledged outbox row (id order is commit order): one index lookup
                oldest = await store.oldest_unacked_created()
            except StoreError as exc:
                log.warning("health.oldest_unsent_failed", error=str(exc))
        now = time.monotonic()
        wall = time.time()
        self.next_due = now + EVALUATE_EVERY_S
        drafts: list[EventDraft] = []

        # broker and connectors: down for how long
        link = gw.link.status
        down = self._down_for("mqtt", link.state, now)
        alarms.set("broker_unreachable", down >= cfg.broker_unreachable_s, "critical",
                   "the MQTT broker has been unreachable: events are buffered in the store, nothing reaches the ERP",
                   down_s=round(down), since=rfc3339(link.since), last_error=link.last_error,
                   outbox_pending=gw.store.pending)
        if self._unreachable is None:  # after a restart: machines persisted as unreachable are told when it is back
            self._unreachable = {c for c, ms in self._machines_of.items()
                                 if any((e := gw.engines.get(m)) is not None and e.machine_state == "unreachable"
                                        for m in ms)}
        for cid, conn in gw.connectors.items():
            st = conn.status
            down = self._down_for(f"connector.{cid}", st.state, now)
            alarms.set(f"connector_down:{cid}", down >= cfg.connector_down_s, "critical",
                       "a connector has not been connected: the machines on it are not read (their counters keep "
                       "the parts)", connector=cid, state=st.state.value, down_s=round(down), since=rfc3339(st.since),
                       last_error=st.last_error, machines=self._machines_of.get(cid, []))
            if down >= cfg.machine_unreachable_s and cid not in self._unreachable:
                self._unreachable.add(cid)
                drafts += self._reachability(cid, False, st.since)
            elif down == 0.0 and cid in self._unreachable:
                self._unreachable.discard(cid)
                drafts += self._reachability(cid, True, wall)

        # the store: quarantine, oldest unsent event (store_full / store_commit_failing: raised at the commit)
        alarms.set("quarantine_not_empty", store.quarantined > 0, "warning",
                   "events wait in the quarantine (refused by the broker or the ERP): see edge-gateway buffer list "
                   "--quarantine, then retry or purge", quarantined=store.quarantined)
        if not store.quarantined and "erp_rejected" in alarms:  # the rows the ERP rejected were retried or purged
            alarms.clear("erp_rejected")
        age = None if oldest is None else max(0.0, wall - oldest)
        self.oldest_unsent_age_s = age
        alarms.set("oldest_unsent_event", age is not None and age >= cfg.oldest_unsent_s, "critical",
                   "the oldest event not acknowledged by the broker is getting old: data is not reaching the ERP",
                   oldest_age_s=None if age is None else round(age), committed=rfc3339(oldest),
                   outbox_pending=store.pending)

        # completions the ERP has not acknowledged; anomalies held
        if cfg.completion_unacked_s is not None:
            overdue: dict[str, list[dict[str, Any]]] = {}
            for eid, c in self._completions.items():
                if now - c.committed_mono >= cfg.completion_unacked_s:
                    overdue.setdefault(c.machine, []).append(
                        {"event_id": eid, "order": c.order, "operation": c.operation,
                         "committed": rfc3339(c.committed_wall)})
            for machine in {*overdue, *(a.split(":", 1)[1] for a in alarms.ids()
                                        if a.startswith("completion_unacked:"))}:
                late = overdue.get(machine, [])
                alarms.set(f"completion_unacked:{machine}", bool(late), "critical",
                           "an operation completed on the machine has not been acknowledged by the ERP (final "
                           "confirmation not posted?)", machine=machine, unacknowledged=len(late), oldest=late[:1],
                           threshold_s=cfg.completion_unacked_s)
        for machine, (at, _evidence) in list(self._anomalies.items()):
            if now - at >= cfg.anomaly_hold_s:
                del self._anomalies[machine]
                alarms.clear(f"counter_anomaly:{machine}")
        return drafts

    def _down_for(self, component: str, state: ComponentState, now: float) -> float:
        if state in _DOWN:
            return now - self._down_since.setdefault(component, now)
        self._down_since.pop(component, None)
        return 0.0

    def _reachability(self, cid: str, reachable: bool, t: float) -> list[EventDraft]:
        gw = self.gw
        out: list[EventDraft] = []
        for machine in self._machines_of.get(cid, []):
            eng = gw.engines.get(machine)
            if eng is None or machine in gw.core.faulted:
                continue
            if reachable and any(c in (self._unreachable or ()) for c, ms in self._machines_of.items()
                                 if machine in ms):
                continue  # another of its connectors is still down
            drafts = eng.set_reachable(reachable, t)
            if drafts:
                (log.warning if not reachable else log.info)(
                    "machine.unreachable" if not reachable else "machine.reachable", machine=machine, connector=cid)
                out += drafts
        return out

    # ------------------------------------------------------------------ the retained status topic
    def publish_status(self) -> None:
        """Alarms changed: the retained status (online) carries them; also the payload sent at the next connect."""
        gw = self.gw
        payload = gw._status_payload("online")  # with the alarms; link.online makes a fresh one at each connect
        topic = gw.topics.status()
        try:
            gw.link.publish(topic, payload, retain=True)
        except Exception as exc:  # noqa: BLE001 - the status is best effort; the next change or connect sends it
            log.warning("health.status_publish_failed", error=str(exc))


# ---------------------------------------------------------------------- probes (gateway/http.py)
def liveness(gw: Gateway) -> dict[str, Any]:
    hb = gw.core_heartbeat
    age = None if not hb else time.monotonic() - hb
    return {"live": age is not None and age < CORE_STALL_S,
            "core_heartbeat_age_s": None if age is None else round(age, 3)}


def readiness(gw: Gateway) -> dict[str, Any]:
    store = gw.store
    live = liveness(gw)
    reasons = []
    if not live["live"]:
        reasons.append("core loop not running")
    if store._db is None:
        reasons.append("store not open")
    if gw.core.commit_failing is not None:
        reasons.append(f"store commits failing: {gw.core.commit_failing[:200]}")
    if store.full:
        reasons.append("store full")
    return {"ready": not reasons, "reasons": reasons, **live}


def report(gw: Gateway) -> dict[str, Any]:
    """The /health body: overall status (ok / degraded / failed), liveness, readiness, per-component states."""
    ready = readiness(gw)
    comps: dict[str, dict[str, Any]] = {}
    for name, st in [*((f"connector.{cid}", c.status) for cid, c in gw.connectors.items()), ("mqtt", gw.link.status)]:
        comps[name] = {"state": st.state.value, "since": rfc3339(st.since), "last_error": st.last_error}
    store = gw.store
    comps["store"] = {"state": "failing" if gw.core.commit_failing is not None else "full" if store.full
                      else "closed" if store._db is None else "ok",
                      "pending": store.pending, "quarantined": store.quarantined}
    comps["core"] = {"state": "running" if ready["live"] else "stalled",
                     "heartbeat_age_s": ready["core_heartbeat_age_s"]}
    alarm_ids = gw.alarms.ids()
    if not ready["ready"]:
        status = "failed"
    elif alarm_ids or any(c["state"] != ComponentState.CONNECTED.value
                          for n, c in comps.items() if n not in ("store", "core")):
        status = "degraded"
    else:
        status = "ok"
    return {"status": status, "healthy": status == "ok", "live": ready["live"], "ready": ready["ready"],
            "reasons": ready["reasons"], "components": comps, "alarms": alarm_ids,
            "outbox_pending": store.pending, "oldest_unsent_age_s": gw.health.oldest_unsent_age_s}
