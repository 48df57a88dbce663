"""The local status page (``GET /``) and the per-machine figures only it needs.

The page is one HTML file with inline CSS and JavaScript (``gateway/static/status.html``, package data: no build step,
no external assets). It polls ``/status`` every 2 s and draws everything from it. Like every GET of the local API it
is read-only and needs no token (the bearer token guards the order command, a POST).

``Activity`` keeps what ``/status`` did not have, per machine, in memory and bounded:

- the last committed event (type, sequence number, when it was committed);
- what the ERP acknowledged on ``.../{machine}/acks``: accepted / rejected counts and the last one (event type and
  sequence number when the event is one of the last ``RECENT_EVENTS`` events of the gateway: one compact ring of
  (sequence number, machine, type) for all machines, not a buffer per machine — 3,333 machines would hold ~80 MB);
- a short history of produced parts (yield + scrap + rework of the quantity reports), one point per commit at most
  every ``HISTORY_STEP_S``, from which ``/status`` gives parts per minute over a trailing minute and a series for the
  chart. Updated at commit, not per sample.
"""

from __future__ import annotations

import array
import base64
import hashlib
import time
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any

from gateway.component import rfc3339

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.config import GatewayConfig
    from gateway.dispatch import ErpAck
    from gateway.store import PendingRow, Store
    from mappings.machine import EventDraft

HISTORY_STEP_S = 2.0  # at most one history point per machine per this many seconds (later commits update it)
HISTORY_POINTS = 330  # 11 minutes at one point per 2 s: the chart shows the last 10
RATE_WINDOW_S = 60.0  # parts per minute: over the trailing minute
CHART_SPAN_S = 600.0
RECENT_EVENTS = 16_384  # of the whole gateway: to name the event the ERP acknowledged (type, sequence number)
QUANTITY_REPORTED = "operation.quantity_reported"


def _parts(draft: EventDraft) -> Decimal:
    """Yield + scrap + rework of a quantity report draft (as the engine counted them, else from its typed data or
    plain dict)."""
    if draft.parts is not None:
        return draft.parts
    q = getattr(draft.data, "quantities", None)
    if q is not None:
        vals = (q.yield_, q.scrap, q.rework)
    elif isinstance(draft.data, dict):
        d = draft.data.get("quantities") or {}
        vals = (d.get("yield"), d.get("scrap"), d.get("rework"))
    else:
        return Decimal(0)
    total = Decimal(0)
    for v in vals:
        try:
            total += Decimal(v) if v is not None else 0
        except (InvalidOperation, TypeError, ValueError):
            pass
    return total


def _event_type(topic: str) -> str:
    """``.../{machine}/events/{type}`` → type."""
    return topic.rpartition("/")[2]


class _History:
    """(time, parts produced) points of one machine, oldest first, at most HISTORY_POINTS: two arrays of doubles
    used as a ring (16 bytes per point; a deque of [t, c] lists took ~110, and with one point per report of 3,333
    machines the status page history grew to ~120 MB over its 11 minutes)."""

    __slots__ = ("t", "c", "start")

    def __init__(self, t: float, c: float) -> None:
        self.t = array.array("d", (t,))
        self.c = array.array("d", (c,))
        self.start = 0  # index of the oldest point once the arrays are full

    def __len__(self) -> int:
        return len(self.t)

    def _at(self, k: int) -> int:
        """Array index of the k-th point from the end (k = 1: the last)."""
        return (self.start - k) % len(self.t)

    def time_before_last(self) -> float:
        return self.t[self._at(2)]

    def set_last(self, t: float, c: float) -> None:
        i = self._at(1)
        self.t[i], self.c[i] = t, c

    def append(self, t: float, c: float) -> None:
        if len(self.t) < HISTORY_POINTS:
            self.t.append(t)
            self.c.append(c)
        else:
            self.t[self.start], self.c[self.start] = t, c
            self.start = (self.start + 1) % HISTORY_POINTS

    def points(self) -> list[list[float]]:
        n, s = len(self.t), self.start
        return [[self.t[(s + k) % n], self.c[(s + k) % n]] for k in range(n)]


class _Machine:
    __slots__ = ("acks", "connectors", "history", "index", "last_event", "produced", "since", "staged_parts")

    def __init__(self, index: int, connectors: list[str], now: float) -> None:
        self.index = index
        self.connectors = connectors
        self.last_event: dict[str, Any] | None = None
        self.acks: dict[str, Any] = {"accepted": 0, "rejected": 0, "last": None}
        self.since = now
        # created at the first committed report (3,333 idle machines need none)
        self.history: _History | None = None
        self.staged_parts = Decimal(0)  # of quantity reports staged, not yet committed
        self.produced = Decimal(0)  # committed since the gateway started


class Activity:
    """Per-machine figures for the status page. The core loop calls ``staged`` and ``committed``; the MQTT
    callback calls ``erp_ack``; ``machine()`` is merged into each machine of ``Gateway.status()``."""

    def __init__(self, cfg: GatewayConfig) -> None:
        now = time.time()
        self.started = now
        self.event_id: Any = None  # seq -> event id of this store (EventEncoder.event_id), set once the store is open
        self._m: dict[str, _Machine] = {}
        self._staged: set[_Machine] = set()  # machines with parts in quantity reports not yet committed
        # the ring of recent rows: seq, machine index, type index (a few bytes per row, fixed size)
        self._ring_seq = array.array("q", bytes(8 * RECENT_EVENTS))
        self._ring_machine = array.array("i", bytes(4 * RECENT_EVENTS))
        self._ring_type = array.array("h", bytes(2 * RECENT_EVENTS))
        self._ring_next = 0  # rows written so far (the ring holds the last RECENT_EVENTS of them)
        self._types: dict[str, int] = {}
        self._type_names: list[str] = []
        for i, m in enumerate(cfg.machines):
            used = [b.connector for b in m.counters.values()] + [b.connector for b in m.materials.values()]
            used += [t.connector for t in (m.state, m.order_tag, m.operation_tag, m.complete_tag) if t is not None]
            self._m[m.id] = _Machine(i, list(dict.fromkeys(used)), now)

    def staged(self, drafts: list[EventDraft]) -> None:
        for d in drafts:
            if d.type == QUANTITY_REPORTED:
                m = self._m.get(d.subject)
                if m is not None:
                    m.staged_parts += _parts(d)
                    self._staged.add(m)

    def committed(self, rows: list[PendingRow]) -> None:
        """Rows are in the store: the last event per machine, and the staged parts become history. Per row only a
        deque append (a group commit may carry 100 000 rows); event ids are computed when an ack is shown."""
        now = time.time()
        machines = self._m
        last: dict[_Machine, Any] = {}
        ring_seq, ring_machine, ring_type = self._ring_seq, self._ring_machine, self._ring_type
        types = self._types
        k = self._ring_next
        for r in rows:
            m = machines.get(r.machine)
            if m is not None:
                etype = _event_type(r.topic)
                t = types.get(etype)
                if t is None:
                    t = types[etype] = len(self._type_names)
                    self._type_names.append(etype)
                i = k % RECENT_EVENTS
                ring_seq[i], ring_machine[i], ring_type[i] = r.seq, m.index, t
                k += 1
                last[m] = r
        self._ring_next = k
        for m, r in last.items():
            m.last_event = {"type": _event_type(r.topic), "seq": r.seq, "time": now}
        staged, self._staged = self._staged, set()
        for m in staged:
            if m.staged_parts:
                m.produced += m.staged_parts
                m.staged_parts = Decimal(0)
                h = m.history
                if h is None:
                    h = m.history = _History(m.since, 0.0)
                if len(h) > 1 and now - h.time_before_last() < HISTORY_STEP_S:
                    h.set_last(now, float(m.produced))
                else:
                    h.append(now, float(m.produced))

    def erp_ack(self, machine: str, ack: ErpAck) -> None:
        m = self._m.get(machine)
        if m is None:
            return
        m.acks[ack.status] += 1
        last: dict[str, Any] = {"status": ack.status, "id": ack.event_id, "time": time.time(), "type": ack.type,
                                "seq": ack.seq}
        if ack.status == "rejected":
            last["reason"] = ack.reason
        m.acks["last"] = last

    def _resolve(self, m: _Machine) -> None:
        """Name the last acknowledged event (an acceptance carries only its id): the newest recent events of the
        machine are tried, once per ack, when /status is asked for."""
        last = m.acks["last"]
        if last is None or last["type"] is not None or last.get("resolved") or self.event_id is None:
            return
        last["resolved"] = True
        k = self._ring_next
        for j in range(k - 1, max(-1, k - 1 - RECENT_EVENTS), -1):
            i = j % RECENT_EVENTS
            if self._ring_machine[i] == m.index and self.event_id(self._ring_seq[i]) == last["id"]:
                last["type"], last["seq"] = self._type_names[self._ring_type[i]], self._ring_seq[i]
                return

    def machine(self, machine: str, connectors: dict[str, dict[str, Any]], now: float | None = None) -> dict[str, Any]:
        """The page's fields of one machine. ``connectors``: component status by connector id."""
        m = self._m.get(machine)
        if m is None:
            return {}
        now = time.time() if now is None else now
        self._resolve(m)
        points = m.history.points() if m.history is not None else [[m.since, 0.0]]
        if now > points[-1][0]:
            points.append([now, points[-1][1]])  # nothing reported since: the rate falls as time passes
        series = _rates(points, now)
        last_ack = m.acks["last"]
        return {
            "connectors": {cid: connectors.get(cid, {}) for cid in m.connectors},
            "last_event": {**m.last_event, "time": rfc3339(m.last_event["time"])} if m.last_event else None,
            "erp_acks": {**m.acks, "last": {**{k: v for k, v in last_ack.items() if k != "resolved"},
                                            "time": rfc3339(last_ack["time"])} if last_ack else None},
            "parts_produced": float(m.produced),
            "parts_per_minute": series[-1][1] if series else 0.0,
            # [seconds before identity.time, parts per minute]: an age, not a time (times here are RFC 3339)
            "parts_per_minute_history": [[round(now - t, 3), r] for t, r in series],
        }


def _rates(points: list[list[float]], now: float) -> list[list[float]]:
    """[[t, parts per minute over the trailing RATE_WINDOW_S (or since the first point)], ...] of the last
    CHART_SPAN_S."""
    out: list[list[float]] = []
    j = 0
    for t, c in points:
        while points[j][0] < t - RATE_WINDOW_S:
            j += 1
        t0, c0 = points[j]
        if t - t0 <= 0 or t < now - CHART_SPAN_S:
            continue
        out.append([round(t, 3), round((c - c0) * 60.0 / max(t - t0, 1.0), 2)])
    return out


def identity(cfg: GatewayConfig, started: float) -> dict[str, Any]:
    g = cfg.gateway
    try:
        version = metadata.version("edge-gateway")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"id": g.id, "enterprise": g.enterprise, "site": g.site, "area": g.area, "line": g.line,
            "version": version, "started": rfc3339(started), "time": rfc3339(time.time())}


async def oldest_unsent_age_s(store: Store) -> float | None:
    """Age of the oldest event in the outbox not acknowledged by the broker (None when there is none or the store
    cannot be read): one indexed read."""
    if not store.pending:
        return None
    try:
        created = await store.oldest_unacked_created()
    except Exception:  # noqa: BLE001 - the page shows "unknown"; the store's own errors are reported elsewhere
        return None
    return None if created is None else max(0.0, time.time() - created)


# ------------------------------------------------------------------------------------------------ the page
@lru_cache(maxsize=1)
def _page() -> tuple[bytes, str]:
    html = resources.files("gateway").joinpath("static/status.html").read_text(encoding="utf-8")
    # Content-Security-Policy: only this file's own inline script and style (by hash), requests to this origin only
    hashes = []
    for tag in ("script", "style"):
        start = html.index(f"<{tag}>") + len(tag) + 2
        body = html[start:html.index(f"</{tag}>", start)]
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes.append(f"'sha256-{digest}'")
    csp = (f"default-src 'none'; script-src {hashes[0]}; style-src {hashes[1]}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


async def page(request: web.Request) -> web.Response:
    from aiohttp import web  # imported by the HTTP API only: a gateway without it does not load aiohttp (start, RSS)

    body, csp = _page()
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", page)
