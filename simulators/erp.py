"""ERP-side consumer: what a real ERP adapter does with the gateway's events (see docs/event-contract.md).

- subscribes QoS 1 to ``{root}/v1/+/+/+/+/+/events/#`` and reconnects/resubscribes by itself after a broker outage;
- validates each CloudEvent; a malformed one is counted and logged (``erp.event_rejected``), never fatal;
- deduplicates on ``source`` + ``id`` in SQLite: the dedup insert, the event record and the ledger update are ONE
  transaction, and the message is acknowledged (PUBACK) only after that commit;
- checks every duplicate it drops against what it stored for that id, and every new id against the ``seq`` of its
  stream: a **conflict** is a second version of an event, i.e. the same (``source``, ``id``) with different content,
  or the same ``seq`` of one (``source``, ``epoch``) under a different id. Content is the whole CloudEvent as parsed
  JSON (``canonical``): only transport may differ between two sends of one event (the JSON text's key order and
  spacing, the topic, whether it came alone or inside a batch), no attribute and nothing in ``data``. A conflict is
  counted (``stats["conflicts"]``), recorded with both versions in the ``conflicts`` table (``conflicts()``) and
  logged at error (``erp.conflict``); the message is acknowledged and not booked (the first version stays). The
  ledger is suspect after a conflict: every end-to-end test asserts there was none;
- books ``operation.quantity_reported`` deltas (decimal strings → ``Decimal``) into a ledger per
  machine / order / operation (unassigned counts under order '' / operation '');
- tracks the ``seq`` extension per (``source``, ``epoch``) and reports gaps;
- publishes retained dispatch messages (ERP → gateway) and waits for their PUBACK.

The ledger, the dedup table and the events survive a restart of the consumer (SQLite file at ``db_path``).
All callbacks run in paho's network thread; queries from other threads go through one lock.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

log = structlog.get_logger(__name__)

QUANTITY_REPORTED = "operation.quantity_reported"
QUANTITY_KINDS = ("yield", "scrap", "rework")
_DECIMAL_RE = re.compile(r"[+-]?\d+(\.\d+)?")
_ZERO = Decimal(0)

LedgerKey = tuple[str, "str | None", "str | None"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    received_at REAL NOT NULL,
    content     TEXT,                                -- canonical(event) of the version stored first
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    n           INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    epoch       TEXT,
    seq         INTEGER,
    type        TEXT NOT NULL,
    subject     TEXT,
    time        TEXT,
    topic       TEXT,
    payload     TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    machine     TEXT NOT NULL,
    "order"     TEXT NOT NULL,                       -- '' = unassigned
    operation   TEXT NOT NULL,                       -- '' = unassigned
    yield       TEXT NOT NULL,                       -- decimal strings
    scrap       TEXT NOT NULL,
    rework      TEXT NOT NULL,
    unit        TEXT,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (machine, "order", operation)
);
CREATE TABLE IF NOT EXISTS conflicts (
    n           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,                       -- 'same_id' | 'same_seq'
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,                       -- id of the version received now
    epoch       TEXT,
    seq         INTEGER,
    stored      TEXT NOT NULL,                       -- canonical JSON of the version stored first
    received    TEXT NOT NULL,                       -- canonical JSON of the version received now
    topic       TEXT,
    received_at REAL NOT NULL
);
"""


class Rejected(ValueError):
    """A message that is not a valid event of the contract."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _plain(d: Decimal) -> str:
    """Decimal as a plain string (never exponent notation)."""
    return format(d, "f")


def _json_default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return _plain(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def canonical(ev: dict[str, Any]) -> str:
    """The content of an event for comparing two sends of it: the whole parsed CloudEvent, serialised with sorted
    keys and no spacing (so the JSON text's key order and whitespace, which are transport, do not count)."""
    return json.dumps(ev, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_quantity(value: Any, field: str) -> Decimal:
    """A contract quantity: a decimal string (or an integer), finite and not negative."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Rejected("bad_quantity", f"{field}: expected a decimal string, got {type(value).__name__}")
    text = str(value)
    if not _DECIMAL_RE.fullmatch(text):
        raise Rejected("bad_quantity", f"{field}: {text!r} is not a decimal string")
    try:
        d = Decimal(text)
    except InvalidOperation:  # pragma: no cover - guarded by the regex
        raise Rejected("bad_quantity", f"{field}: {text!r}") from None
    if d < 0:
        raise Rejected("bad_quantity", f"{field}: negative quantity {text}")
    return d


def parse_event(payload: bytes) -> dict[str, Any]:
    """Validate a structured-JSON CloudEvent 1.0 against the contract; raises Rejected."""
    try:
        ev = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("invalid_json", str(exc)) from None
    if not isinstance(ev, dict):
        raise Rejected("not_an_object", f"top level is {type(ev).__name__}")
    for attr in ("specversion", "id", "source", "type"):
        if attr not in ev:
            raise Rejected("missing_attribute", attr)
        if not isinstance(ev[attr], str) or not ev[attr]:
            raise Rejected("bad_attribute", f"{attr} must be a non-empty string")
    if ev["specversion"] != "1.0":
        raise Rejected("wrong_specversion", repr(ev["specversion"]))
    for attr in ("subject", "time", "epoch"):
        if attr in ev and ev[attr] is not None and not isinstance(ev[attr], str):
            raise Rejected("bad_attribute", f"{attr} must be a string")
    if "seq" in ev:
        seq = ev["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise Rejected("bad_seq", f"seq must be a non-negative integer, got {seq!r}")
    if ev["type"] == QUANTITY_REPORTED:
        parse_quantity_data(ev.get("data"))
    return ev


def parse_quantity_data(data: Any) -> tuple[tuple[str, str, str], dict[str, Decimal], str | None]:
    """(machine, order or '', operation or ''), quantities, unit of an ``operation.quantity_reported``."""
    if not isinstance(data, dict):
        raise Rejected("bad_data", "data must be an object")
    machine = data.get("machine")
    if not isinstance(machine, str) or not machine:
        raise Rejected("bad_data", "data.machine must be a non-empty string")
    ref = []
    for f in ("order", "operation"):
        v = data.get(f)
        if v is not None and (not isinstance(v, str) or not v):
            raise Rejected("bad_data", f"data.{f} must be a non-empty string or null")
        ref.append(v or "")
    q = data.get("quantities")
    if not isinstance(q, dict):
        raise Rejected("bad_data", "data.quantities must be an object")
    qty = {k: parse_quantity(q[k], f"data.quantities.{k}") if k in q else _ZERO for k in QUANTITY_KINDS}
    unit = data.get("unit")
    return (machine, ref[0], ref[1]), qty, unit if isinstance(unit, str) else None


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


class ErpConsumer:
    """Consumes the gateway's CloudEvents into a deduplicated SQLite ledger; publishes dispatches.

    ``client_id``: with a fixed id the MQTT session is persistent (clean_session False), so QoS 1 events published
    while the consumer is disconnected are queued by the broker; without one a random id and a clean session are
    used. ``durable``: fsync every commit (SQLite synchronous=FULL) before the PUBACK; False = synchronous=NORMAL.
    """

    def __init__(self, host: str, port: int, *, db_path: str, topic_root: str = "edge", client_id: str | None = None,
                 clean_session: bool | None = None, keepalive: int = 10, durable: bool = True) -> None:
        self.host = host
        self.port = port
        self.db_path = str(db_path)
        self.topic_root = topic_root
        self.client_id = client_id or f"erp-{uuid.uuid4().hex[:12]}"
        self.clean_session = (client_id is None) if clean_session is None else clean_session
        self.keepalive = keepalive
        self.durable = durable
        self.event_filter = f"{topic_root}/v1/+/+/+/+/+/events/#"

        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._sub_mid: int | None = None

        # in-memory mirrors of the committed state (rebuilt from SQLite on start)
        self._ledger: dict[tuple[str, str, str], dict[str, Decimal]] = {}
        self._seqs: dict[tuple[str, str], dict[int, str]] = {}   # (source, epoch) -> {seq: id stored first}
        self._events: list[dict[str, Any]] = []
        self._conflicts: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = self._fresh_stats()
        #: business rule of the ERP: returns a reason to refuse an event (it is then not posted and a rejection with
        #: the event goes back to the gateway on ``.../{machine}/acks``), or None to post it
        self.reject_rule: Callable[[dict[str, Any]], str | None] | None = None
        #: also answer every posted (or duplicate) event with ``{"status": "accepted", "id", "source"}`` on
        #: ``.../{machine}/acks``, as the ERP service does with ``acks: all``
        self.ack_accepted = False

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return {"accepted": 0, "duplicates": 0, "rejected": 0, "by_type": Counter(), "rejected_by_reason": Counter(),
                "conflicts": 0, "errors": 0, "connects": 0, "disconnects": 0, "refused": 0}

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> "ErpConsumer":
        """Open the ledger, connect and subscribe; returns once the subscription is acknowledged (bounded)."""
        if self._client is not None:
            return self
        await asyncio.to_thread(self._open_db)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=self.clean_session,
                        manual_ack=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.reconnect_delay_set(min_delay=0.1, max_delay=2)
        c.connect_async(self.host, self.port, keepalive=self.keepalive)
        c.loop_start()  # the network thread retries the first connection and reconnects after losses
        self._client = c
        try:
            await self.wait_connected(timeout)
        except BaseException:
            await self.stop()
            raise
        log.info("erp.started", host=self.host, port=self.port, filter=self.event_filter, db=self.db_path)
        return self

    async def stop(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            def _shutdown() -> None:
                c.disconnect()
                c.loop_stop()
            await asyncio.to_thread(_shutdown)
        self._connected.clear()
        self._subscribed.clear()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        log.info("erp.stopped")

    async def __aenter__(self) -> "ErpConsumer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        return self._connected.is_set() and self._subscribed.is_set()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Until the broker acknowledged the events subscription (again, after a reconnect)."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ERP consumer not connected/subscribed to {self.host}:{self.port} within {timeout}s")
            await asyncio.sleep(0.02)

    # -- storage -------------------------------------------------------------------------------------------------
    def _open_db(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            db.executescript(_SCHEMA)
            self._migrate(db)
            self._db = db
            self._load()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """A ledger written before conflicts were checked: add ``seen.content``, filled from the stored events."""
        if "content" in {row[1] for row in db.execute("PRAGMA table_info(seen)")}:
            return
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE seen ADD COLUMN content TEXT")
        for source, id_, payload in db.execute("SELECT source, id, payload FROM events").fetchall():
            db.execute("UPDATE seen SET content=? WHERE source=? AND id=?", (canonical(json.loads(payload)), source, id_))
        db.execute("COMMIT")

    def _load(self) -> None:
        assert self._db is not None
        self._ledger.clear()
        self._seqs.clear()
        self._events.clear()
        self._conflicts = [self._conflict_row(r) for r in self._db.execute(
            "SELECT kind, source, id, epoch, seq, stored, received, topic FROM conflicts ORDER BY n")]
        for machine, order, op, y, s, r in self._db.execute(
                'SELECT machine, "order", operation, yield, scrap, rework FROM ledger'):
            self._ledger[(machine, order, op)] = {"yield": Decimal(y), "scrap": Decimal(s), "rework": Decimal(r)}
        for source, id_, epoch, seq, payload in self._db.execute(
                "SELECT source, id, epoch, seq, payload FROM events ORDER BY n"):
            self._events.append(json.loads(payload))
            if seq is not None:
                self._seqs.setdefault((source, epoch or ""), {}).setdefault(seq, id_)

    @staticmethod
    def _conflict_row(row: tuple[Any, ...]) -> dict[str, Any]:
        kind, source, id_, epoch, seq, stored, received, topic = row
        return {"kind": kind, "source": source, "id": id_, "epoch": epoch, "seq": seq, "stored": json.loads(stored),
                "received": json.loads(received), "topic": topic}

    def _stored_content(self, source: str, id_: str) -> str | None:
        """canonical() of the event stored for (source, id), None if there is none."""
        assert self._db is not None
        row = self._db.execute("SELECT content FROM seen WHERE source=? AND id=?", (source, id_)).fetchone()
        return None if row is None else row[0]

    def _record_conflict(self, kind: str, topic: str, ev: dict[str, Any], stored: str, received: str,
                         now: float) -> None:
        """Inside the caller's transaction: the conflicts row. The mirror and the stats follow the commit."""
        assert self._db is not None
        self._db.execute("INSERT INTO conflicts (kind, source, id, epoch, seq, stored, received, topic, received_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (kind, ev["source"], ev["id"], ev.get("epoch"), ev.get("seq"), stored, received, topic, now))

    def _conflict_committed(self, kind: str, topic: str, ev: dict[str, Any], stored: str, received: str) -> None:
        row = (kind, ev["source"], ev["id"], ev.get("epoch"), ev.get("seq"), stored, received, topic)
        self._conflicts.append(self._conflict_row(row))
        self.stats["conflicts"] += 1
        first, second = json.loads(stored), json.loads(received)
        differs = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
        log.error("erp.conflict", kind=kind, source=ev["source"], id=ev["id"], stored_id=first.get("id"),
                  epoch=ev.get("epoch"), seq=ev.get("seq"), type=ev["type"], differs=differs, topic=topic,
                  stored=stored[:500], received=received[:500])

    def _commit_event(self, topic: str, raw: bytes, ev: dict[str, Any]) -> str:
        """One transaction: dedup insert + event record + ledger update. Returns "accepted", "duplicate" (same
        (source, id) seen before with the same content: nothing written) or "conflict" (only the conflicts row is
        written: same (source, id) with other content, or a new id for a seq its (source, epoch) already has)."""
        db = self._db
        if db is None:
            raise RuntimeError("ledger database is closed")
        now = time.time()
        content = canonical(ev)
        booking = parse_quantity_data(ev.get("data")) if ev["type"] == QUANTITY_REPORTED else None
        stream = (ev["source"], ev.get("epoch") or "")
        seq_owner = self._seqs.get(stream, {}).get(ev["seq"]) if "seq" in ev else None
        db.execute("BEGIN IMMEDIATE")
        try:
            conflict: tuple[str, str] | None = None   # (kind, stored content)
            stored = self._stored_content(ev["source"], ev["id"])
            if stored is not None:
                if stored == content:
                    db.execute("ROLLBACK")
                    return "duplicate"
                conflict = ("same_id", stored)
            elif seq_owner is not None:   # a new id for a seq this stream already has
                conflict = ("same_seq", self._stored_content(ev["source"], seq_owner) or "null")
            if conflict is not None:
                self._record_conflict(conflict[0], topic, ev, conflict[1], content, now)
                db.execute("COMMIT")
                self._conflict_committed(conflict[0], topic, ev, conflict[1], content)
                return "conflict"
            db.execute("INSERT INTO seen (source, id, received_at, content) VALUES (?, ?, ?, ?)",
                       (ev["source"], ev["id"], now, content))
            db.execute("INSERT INTO events (source, id, epoch, seq, type, subject, time, topic, payload, received_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (ev["source"], ev["id"], ev.get("epoch"), ev.get("seq"), ev["type"], ev.get("subject"),
                        ev.get("time"), topic, raw.decode("utf-8"), now))
            new_row = None
            if booking is not None:
                key, qty, unit = booking
                row = db.execute('SELECT yield, scrap, rework FROM ledger WHERE machine=? AND "order"=? AND operation=?',
                                 key).fetchone()
                old = dict(zip(QUANTITY_KINDS, map(Decimal, row))) if row else dict.fromkeys(QUANTITY_KINDS, _ZERO)
                new_row = {k: old[k] + qty[k] for k in QUANTITY_KINDS}
                db.execute('INSERT INTO ledger (machine, "order", operation, yield, scrap, rework, unit, updated_at) '
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (machine, \"order\", operation) DO UPDATE SET "
                           "yield=excluded.yield, scrap=excluded.scrap, rework=excluded.rework, "
                           "unit=COALESCE(ledger.unit, excluded.unit), updated_at=excluded.updated_at",
                           (*key, *(_plain(new_row[k]) for k in QUANTITY_KINDS), unit, now))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # committed: update the in-memory mirrors
        if booking is not None and new_row is not None:
            self._ledger[booking[0]] = new_row
        if "seq" in ev:
            self._seqs.setdefault(stream, {}).setdefault(ev["seq"], ev["id"])
        self._events.append(ev)
        return "accepted"

    # -- MQTT callbacks (paho network thread) --------------------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # PUBACKs are tiny writes: without TCP_NODELAY, Nagle + delayed ACK can hold each one back ~40 ms.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("erp.connect_failed", reason=str(reason_code))
            return
        self.stats["connects"] += 1
        self._connected.set()
        self._subscribed.clear()
        rc, mid = client.subscribe(self.event_filter, qos=1)
        self._sub_mid = mid
        log.info("erp.connected", host=self.host, port=self.port, session_present=getattr(flags, "session_present", None),
                 subscribe_rc=int(rc))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._sub_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            log.error("erp.subscribe_failed", filter=self.event_filter, reasons=[str(rc) for rc in reason_codes])
            return
        self._subscribed.set()
        log.info("erp.subscribed", filter=self.event_filter)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self.stats["disconnects"] += 1
        log.info("erp.disconnected", reason=str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg.topic, msg.payload)
        except Exception:  # never let an internal error kill the network thread; the message stays un-acked
            self.stats["errors"] += 1
            log.exception("erp.internal_error", topic=msg.topic)
            return
        client.ack(msg.mid, msg.qos)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/events/batch"):
            self._handle_batch(topic, payload)
            return
        with self._lock:
            try:
                ev = parse_event(payload)
                if self.reject_rule is not None and (why := self.reject_rule(ev)):
                    self._refuse(topic, ev, why)
                    return
                outcome = self._commit_event(topic, payload, ev)
            except Rejected as exc:
                self.stats["rejected"] += 1
                self.stats["rejected_by_reason"][exc.reason] += 1
                log.warning("erp.event_rejected", topic=topic, reason=exc.reason, detail=exc.detail,
                            payload=payload[:200].decode("utf-8", "replace"))
                return
            if self.ack_accepted and outcome in ("accepted", "duplicate") and self._client is not None:
                body = json.dumps({"status": "accepted", "id": ev["id"], "source": ev["source"]})
                self._client.publish(f"{topic.partition('/events/')[0]}/acks", body.encode(), qos=1)
            if outcome == "duplicate":
                self.stats["duplicates"] += 1
                log.debug("erp.duplicate", source=ev["source"], id=ev["id"], type=ev["type"])
                return
            if outcome == "accepted":
                self.stats["accepted"] += 1
                self.stats["by_type"][ev["type"]] += 1

    def _handle_batch(self, topic: str, payload: bytes) -> None:
        """CloudEvents batch format: a JSON array of structured events; each is handled as if it came alone."""
        try:
            items = json.loads(payload)
            if not isinstance(items, list):
                raise ValueError("a batch must be a JSON array")
        except (ValueError, UnicodeDecodeError) as exc:
            self.stats["rejected"] += 1
            self.stats["rejected_by_reason"]["bad_batch"] += 1
            log.warning("erp.event_rejected", topic=topic, reason="bad_batch", detail=str(exc)[:200])
            return
        self.stats["batches"] = self.stats.get("batches", 0) + 1
        base = topic.rpartition("/events/")[0]
        for item in items:
            etype = item.get("type") if isinstance(item, dict) else None
            self._handle(f"{base}/events/{etype}", json.dumps(item).encode())

    def _refuse(self, topic: str, ev: dict[str, Any], reason: str) -> None:
        """Not posted (so a later retry of the same id is not a duplicate); the gateway quarantines it."""
        self.stats["refused"] += 1
        base, _, _ = topic.partition("/events/")
        body = json.dumps({"status": "rejected", "id": ev["id"], "source": ev["source"], "reason": reason,
                           "event": ev}, default=_json_default)
        if self._client is not None:
            self._client.publish(f"{base}/acks", body.encode(), qos=1)
        log.warning("erp.event_refused", id=ev["id"], type=ev["type"], reason=reason)

    # -- queries -------------------------------------------------------------------------------------------------
    def ledger(self) -> dict[LedgerKey, dict[str, Decimal]]:
        """{(machine, order or None, operation or None): {"yield", "scrap", "rework"}} (a copy)."""
        with self._lock:
            return {(m, o or None, op or None): dict(v) for (m, o, op), v in self._ledger.items()}

    def totals_by_machine(self) -> dict[str, dict[str, Decimal]]:
        out: dict[str, dict[str, Decimal]] = {}
        for (machine, _o, _op), v in self.ledger().items():
            t = out.setdefault(machine, dict.fromkeys(QUANTITY_KINDS, _ZERO))
            for k in QUANTITY_KINDS:
                t[k] += v[k]
        return out

    def events(self, type: str | None = None) -> list[dict[str, Any]]:
        """Accepted events (parsed CloudEvent dicts) in arrival order, optionally of one type. Do not mutate."""
        with self._lock:
            return [e for e in self._events if type is None or e["type"] == type]

    def conflicts(self) -> list[dict[str, Any]]:
        """Every conflict recorded in this ledger (also before a restart), oldest first: ``kind`` ("same_id" |
        "same_seq"), ``source``, ``id`` (of the version received second), ``epoch``, ``seq``, ``topic``, and both
        versions as parsed CloudEvents: ``stored`` (first) and ``received`` (second). Still readable after stop()."""
        with self._lock:
            return [dict(c) for c in self._conflicts]

    def gaps(self) -> dict[tuple[str, str], list[int]]:
        """{(source, epoch): missing seq numbers between the lowest and highest seen}; only streams with gaps."""
        with self._lock:
            streams = {k: set(v) for k, v in self._seqs.items()}
        out = {}
        for key, seqs in streams.items():
            lo, hi = min(seqs), max(seqs)
            if hi - lo + 1 != len(seqs):
                out[key] = [s for s in range(lo, hi + 1) if s not in seqs]
        return out

    def seqs(self) -> dict[tuple[str, str], list[int]]:
        """{(source, epoch): sorted seq numbers seen}."""
        with self._lock:
            return {k: sorted(v) for k, v in self._seqs.items()}

    async def wait_for(self, predicate: Callable[..., Any], timeout: float = 10.0,
                       interval: float = 0.02) -> dict[LedgerKey, dict[str, Decimal]]:
        """Poll until ``predicate(ledger)`` (or ``predicate()`` if it takes no argument) is true; returns the
        ledger. Raises TimeoutError showing the ledger and stats."""
        with_arg = _takes_argument(predicate)
        deadline = time.monotonic() + timeout
        while True:
            led = self.ledger()
            if predicate(led) if with_arg else predicate():
                return led
            if time.monotonic() > deadline:
                raise TimeoutError(f"ERP condition not met within {timeout}s; ledger={led} stats={self.stats}")
            await asyncio.sleep(interval)

    # -- publishing (ERP → gateway) ------------------------------------------------------------------------------
    def dispatch_topic(self, enterprise: str, site: str, area: str, line: str, machine: str) -> str:
        return f"{self.topic_root}/v1/{enterprise}/{site}/{area}/{line}/{machine}/dispatch"

    def dispatch(self, enterprise: str, site: str, area: str, line: str, machine: str, order: str, operation: str, *,
                 status: str | None = "active", unit: str | None = "PCE",
                 components: Iterable[dict[str, Any]] | None = None, planned_quantity: Any = None,
                 timeout: float = 10.0) -> dict[str, Any]:
        """Publish a retained QoS 1 dispatch and wait for its PUBACK; returns the message as sent (JSON-decoded)."""
        msg = {"order": order, "operation": operation, "status": status, "unit": unit,
               "planned_quantity": _plain(Decimal(planned_quantity)) if planned_quantity is not None else None,
               "components": list(components) if components is not None else None}
        msg = {k: v for k, v in msg.items() if v is not None}
        topic = self.dispatch_topic(enterprise, site, area, line, machine)
        body = json.dumps(msg, default=_json_default)
        self._publish(topic, body.encode(), retain=True, timeout=timeout)
        log.info("erp.dispatched", topic=topic, order=order, operation=operation, status=status)
        return json.loads(body)

    def clear_dispatch(self, enterprise: str, site: str, area: str, line: str, machine: str, *,
                       timeout: float = 10.0) -> None:
        """Empty retained payload: the broker drops the retained dispatch, the gateway clears the order."""
        topic = self.dispatch_topic(enterprise, site, area, line, machine)
        self._publish(topic, b"", retain=True, timeout=timeout)
        log.info("erp.dispatch_cleared", topic=topic)

    def publish_raw(self, topic: str, payload: bytes | str, retain: bool = False, *, qos: int = 1,
                    timeout: float = 10.0) -> None:
        """Publish anything (for tests of malformed input); waits for the PUBACK when qos > 0."""
        self._publish(topic, payload.encode() if isinstance(payload, str) else payload, retain=retain, qos=qos,
                      timeout=timeout)

    def _publish(self, topic: str, payload: bytes, *, retain: bool, timeout: float, qos: int = 1) -> None:
        c = self._client
        if c is None:
            raise RuntimeError("ERP consumer is not started")
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            raise ConnectionError(f"not connected to {self.host}:{self.port} within {timeout}s; cannot publish to {topic}")
        info = c.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise ConnectionError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for {topic} within {timeout}s")
