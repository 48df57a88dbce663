"""PostgreSQL side of the ERP posting service: dedup, seq tracking, ledger, transactional outbox.

``Ledger.process(conn, topic, payload)`` handles one broker message (one CloudEvent, or a JSON array of them in the
CloudEvents batch format) in ONE transaction:

- every event is validated against the contract (``gateway.schema.validate_event``); an invalid one is recorded in
  ``erp_rejected`` and answered with a rejection, the valid ones of the same batch go on;
- dedup: ``erp_events`` has a unique key (source, id) and a unique key (source, epoch, seq). A repeated key whose
  canonical content equals the first is a duplicate (counted); one whose content differs is a **conflict**: the first
  wins, the second is stored in ``erp_conflicts`` and alarmed (metric, log, a rejection to the gateway);
- per (source, epoch): highest seq, contiguous watermark ``low`` (every seq 1..low arrived), reorders, gap age;
- ledger per (machine, order, operation): yield / scrap / rework; ``erp_consumption`` per component;
- ``operation.completed`` is applied only when every seq before it arrived (``low >= seq - 1``); until then it is
  held (``erp_events.applied = false``) and applied by the transaction that closes the gap;
- ERP documents (SAP ``ProdnOrdConf2`` bodies) go into ``erp_outbox`` keyed by the external id (= event id).

A seq whose event was rejected and books quantities (a report, a consumption, a completion) holds the final
confirmations behind it until an operator releases it (``Ledger.release_gap``, ``edge-gateway-erp release-gap``,
after dealing with the event by hand): the seq is filled (``erp_filled``, audit in ``erp_releases``) and the
watermark advanced by the same ``_advance`` as an arriving event. An event that arrives later under a released seq
is never booked: it is a conflict (kind ``released``). ``Ledger.open_gaps`` lists what is held and why.

The caller acknowledges the broker message only after this returns (the commit happened). Give it a connection
in autocommit mode (or one with no transaction open): otherwise the block would only be a savepoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import structlog
from psycopg import errors as pgerr
from psycopg.types.json import Jsonb

from erp_service.config import ServiceConfig
from erp_service.metrics import Metrics
from gateway.schema import EventValidationError, validate_event

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS erp_events (
    source      text NOT NULL,
    id          text NOT NULL,
    epoch       text NOT NULL,
    seq         bigint NOT NULL,
    type        text NOT NULL,
    subject     text NOT NULL,
    event_time  timestamptz NOT NULL,
    body        jsonb NOT NULL,
    digest      text NOT NULL,
    applied     boolean NOT NULL DEFAULT true,
    duplicates  integer NOT NULL DEFAULT 0,     -- repeats absorbed (same content)
    redeliveries integer NOT NULL DEFAULT 0,   -- of which the broker marked as redelivered (JetStream / MQTT DUP)
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, id),
    UNIQUE (source, epoch, seq)
);
CREATE INDEX IF NOT EXISTS erp_events_held ON erp_events (source, epoch, seq) WHERE NOT applied;
CREATE TABLE IF NOT EXISTS erp_conflicts (
    n           bigserial PRIMARY KEY,
    source      text NOT NULL,
    id          text NOT NULL,
    epoch       text,
    seq         bigint,
    kind        text NOT NULL,            -- same_id | same_seq | released (first_body: the release)
    first_id    text NOT NULL,
    first_body  jsonb NOT NULL,
    body        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS erp_rejected (
    n           bigserial PRIMARY KEY,
    source      text,
    id          text,
    topic       text,
    reason      text NOT NULL,
    body        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
-- seqs of rejected events that book nothing (a state change, an anomaly, a start): the watermark passes them, so a
-- final confirmation is not held for ever behind one (a rejected report or completion still holds it: alarmed gap)
CREATE TABLE IF NOT EXISTS erp_filled (
    source      text NOT NULL,
    epoch       text NOT NULL,
    seq         bigint NOT NULL,
    id          text,
    PRIMARY KEY (source, epoch, seq)
);
-- seqs released by hand (edge-gateway-erp release-gap): the audit of the erp_filled rows an operator made. An event
-- that arrives later under a released seq is not booked (erp_conflicts, kind 'released')
CREATE TABLE IF NOT EXISTS erp_releases (
    source      text NOT NULL,
    epoch       text NOT NULL,
    seq         bigint NOT NULL,
    reason      text NOT NULL,                 -- --reason: what the operator did about the event
    released_by text,                          -- OS user who ran the command (NULL: unknown)
    db_user     text NOT NULL DEFAULT current_user,
    event_lost  boolean NOT NULL,              -- no rejection was recorded: released as lost (--event-lost)
    rejected_n  bigint,                        -- the erp_rejected row of the event (NULL when lost)
    rejected_id text,
    released_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, epoch, seq)
);
CREATE TABLE IF NOT EXISTS erp_streams (
    source      text NOT NULL,
    epoch       text NOT NULL,
    low         bigint NOT NULL DEFAULT 0,     -- every seq 1..low arrived
    high        bigint NOT NULL DEFAULT 0,     -- highest seq seen
    received    bigint NOT NULL DEFAULT 0,     -- distinct seqs received
    reorders    bigint NOT NULL DEFAULT 0,
    gap_since   timestamptz,                   -- when low < high started
    PRIMARY KEY (source, epoch)
);
CREATE TABLE IF NOT EXISTS erp_ledger (
    machine     text NOT NULL,
    order_id    text NOT NULL,                 -- '' = unassigned
    operation   text NOT NULL,                 -- '' = unassigned
    yield       numeric NOT NULL DEFAULT 0,
    scrap       numeric NOT NULL DEFAULT 0,
    rework      numeric NOT NULL DEFAULT 0,
    unit        text,
    reports     integer NOT NULL DEFAULT 0,
    PRIMARY KEY (machine, order_id, operation)
);
CREATE TABLE IF NOT EXISTS erp_consumption (
    machine     text NOT NULL,
    order_id    text NOT NULL,
    operation   text NOT NULL,
    material    text NOT NULL,
    unit        text NOT NULL,
    quantity    numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (machine, order_id, operation, material, unit)
);
CREATE TABLE IF NOT EXISTS erp_operations (
    order_id    text NOT NULL,
    operation   text NOT NULL,
    machine     text NOT NULL,
    final_id    text NOT NULL,                 -- the operation.completed event id
    totals      jsonb NOT NULL,
    final_at    timestamptz NOT NULL DEFAULT now(),
    late_reports integer NOT NULL DEFAULT 0,
    PRIMARY KEY (order_id, operation, machine)
);
CREATE TABLE IF NOT EXISTS erp_unassigned (
    source      text NOT NULL,
    id          text NOT NULL,
    machine     text NOT NULL,
    body        jsonb NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, id)
);
CREATE TABLE IF NOT EXISTS erp_outbox (
    external_id text PRIMARY KEY,              -- ExternalSystemConfirmation = the event id
    n           bigserial UNIQUE,
    kind        text NOT NULL,                 -- partial | final | goods_issue
    order_id    text NOT NULL,
    operation   text NOT NULL,
    source      text NOT NULL,
    event_time  timestamptz NOT NULL,
    body        jsonb NOT NULL,
    state       text NOT NULL DEFAULT 'pending',   -- pending | sent | failed
    attempts    integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    response    jsonb,
    last_error  text,
    found_by_lookup boolean NOT NULL DEFAULT false  -- a retry found the document already booked: not re-posted
);
CREATE INDEX IF NOT EXISTS erp_outbox_pending ON erp_outbox (next_attempt_at, n) WHERE state = 'pending';
-- no event is ever stored under a seq released by hand, whatever process inserts it: this version's insert already
-- skips such a seq (a conflict), but a service process of a version before the release (still running during an
-- upgrade) inserts and books unconditionally; the trigger makes its insert fail (an integrity error: not booked)
CREATE OR REPLACE FUNCTION erp_events_not_released() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM erp_releases r
               WHERE r.source = NEW.source AND r.epoch = NEW.epoch AND r.seq = NEW.seq) THEN
        RAISE EXCEPTION 'seq % of % epoch % was released by hand: the event is not booked', NEW.seq, NEW.source,
            NEW.epoch USING ERRCODE = 'check_violation', HINT = 'edge-gateway-erp gaps lists the release';
    END IF;
    RETURN NEW;
END $$;
-- created once: DROP TRIGGER / CREATE TRIGGER lock the table against every reader and writer, and this runs at every
-- start of a worker and every operator command
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'erp_events_not_released'
                   AND tgrelid = 'erp_events'::regclass) THEN
        CREATE TRIGGER erp_events_not_released BEFORE INSERT ON erp_events
            FOR EACH ROW EXECUTE FUNCTION erp_events_not_released();
    END IF;
END $$;
"""

QUANTITY_KINDS = ("yield", "scrap", "rework")


class _ReleasedMeanwhile(Exception):
    """A seq of this transaction's events was released by hand after the event was inserted and before the stream
    lock: the transaction is rolled back and run again, and the event becomes a conflict (kind ``released``)."""


class ReleaseRefused(Exception):
    """``Ledger.release_gap`` changed nothing; the message (one line) says why."""


_RETRYABLE = (pgerr.DeadlockDetected, pgerr.SerializationFailure, _ReleasedMeanwhile)
# errors of the data itself (a contract-valid event the database refuses, e.g. a site's constraint; the contract
# leaves out what PostgreSQL cannot hold, such as a NUL character in a text): the
# same again at every redelivery, so they are not retried but isolate the event that causes them
_UNBOOKABLE = (pgerr.DataError, pgerr.IntegrityError)


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        # one creator at a time (several workers start together)
        await conn.execute("SELECT pg_advisory_xact_lock(7316001)")
        await conn.execute(SCHEMA)


def _json_int(text: str) -> int | Decimal:
    return int(text) if len(text) < 4000 else Decimal(text)


def _pg_text(v: str | None) -> str | None:
    """A text as PostgreSQL can store it (no NUL: written as the JSON escape), for what a rejection records of what
    was received."""
    return v.replace("\x00", "\\u0000") if v is not None and "\x00" in v else v


def _rejected_body(event: dict[str, Any] | None, payload: bytes) -> str:
    """What erp_rejected keeps of a rejected event: its canonical JSON, else (an element JSON cannot write again, e.g.
    nested too deep) the message as received; at most 100,000 characters of the latter."""
    if event:
        try:
            return canonical(event)
        except (ValueError, TypeError, RecursionError):
            pass
    return payload.decode("utf-8", "replace")[:100_000]


def canonical(ev: dict[str, Any]) -> str:
    return json.dumps(ev, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(ev: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(ev).encode()).hexdigest()


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def utc_text(t: datetime) -> str:
    """A database time for people: ``2026-11-22 08:00:01 UTC``."""
    return f"{t.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _odata_date(dt: datetime, tz: ZoneInfo) -> str:
    """OData V2 Edm.DateTime of the plant-local calendar date (midnight UTC of that date, as SAP expects)."""
    local = dt.astimezone(tz).date()
    midnight = datetime(local.year, local.month, local.day, tzinfo=timezone.utc)
    return f"/Date({int(midnight.timestamp() * 1000)})/"


@dataclass
class Result:
    """What happened to one event of a message; the caller turns it into an ack."""

    outcome: str                      # accepted | duplicate | conflict | rejected
    id: str | None
    source: str | None
    type: str | None
    reason: str | None = None
    event: dict[str, Any] | None = None
    refilled: bool = False            # accepted under a seq its rejected version had filled (counted then)

    def ack(self) -> dict[str, Any]:
        if self.outcome in ("accepted", "duplicate"):
            return {"status": "accepted", "id": self.id, "source": self.source}
        return {"status": "rejected", "id": self.id, "source": self.source, "reason": self.reason,
                "event": self.event}


class Ledger:
    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.tz = ZoneInfo(cfg.timezone)

    # ------------------------------------------------------------------------------------------ documents
    def _unit(self, unit: str) -> str:
        return self.cfg.unit_map.get(unit, unit)

    def _confirmation(self, ev: dict[str, Any], *, yield_: str = "0", scrap: str = "0", rework: str = "0",
                      unit: str, final: bool = False) -> dict[str, Any]:
        d = ev["data"]
        doc: dict[str, Any] = {
            "OrderID": d["order"],
            "OrderOperation": d["operation"],
            "Sequence": "0",
            "ConfirmationUnit": self._unit(unit),
            "ConfirmationYieldQuantity": yield_,
            "ConfirmationScrapQuantity": scrap,
            "ConfirmationReworkQuantity": rework,
            "FinalConfirmationType": "X" if final else "",
            "IsFinalConfirmation": final,
            "ExternalSystemConfirmation": ev["id"],
            "PostingDate": _odata_date(parse_time(ev["time"]), self.tz),
            "ConfirmationText": f"{d['machine']} {ev['type']} seq {ev['seq']}"[:40],
        }
        if Decimal(scrap) > 0 and self.cfg.scrap_reason_code:
            doc["VarianceReasonCode"] = self.cfg.scrap_reason_code
        return doc

    # ------------------------------------------------------------------------------------------ entry point
    async def process(self, conn: psycopg.AsyncConnection[Any], topic: str, payload: bytes, *,
                      redelivered: bool = False) -> list[Result]:
        """Validate, dedup, book and write the outbox for one broker message, in one transaction (retried on a
        deadlock / serialization failure). Returns one Result per event (in message order). ``redelivered``: the
        broker says it delivered this message before (counted separately among the duplicates)."""
        items, results = self._parse(topic, payload)
        try:
            out = await self._transaction(conn, topic, payload, items, results, redelivered)
        except _UNBOOKABLE as exc:
            # one event of the message cannot be stored: each event on its own, that one rejected, the others booked
            # (the whole message was redelivered and dead-lettered before, with the good events in it)
            log.error("erp.message_unbookable", topic=topic, error=str(exc)[:300], events=len(items),
                      action="each event booked on its own")
            out = []
            for item, pre in zip(items, results):
                try:
                    out += await self._transaction(conn, topic, payload, [item], [pre], redelivered)
                except _UNBOOKABLE as one:
                    r = Result("rejected", _str(item, "id"), _str(item, "source"), _str(item, "type"),
                               f"cannot be booked: {type(one).__name__}: {one}"[:1000], item)
                    out += await self._transaction(conn, topic, payload, [None], [r], redelivered)
        for r in out:
            self.metrics.events.labels(r.outcome).inc()
            if r.outcome == "conflict":
                self.metrics.conflicts.inc()
        self.metrics.messages.inc()
        return out

    async def _transaction(self, conn: psycopg.AsyncConnection[Any], topic: str, payload: bytes,
                           items: list[dict[str, Any] | None], results: list[Result | None],
                           redelivered: bool) -> list[Result]:
        for attempt in range(8):
            try:
                # pipeline mode: statements whose result is not needed do not wait for a round trip
                async with conn.pipeline(), conn.transaction():
                    return await self._apply(conn, topic, payload, items, results, redelivered)
            except _RETRYABLE as exc:
                self.metrics.db_retries.inc()
                log.warning("erp.db_retry", error=type(exc).__name__, attempt=attempt + 1)
                if attempt == 7:
                    raise
        raise AssertionError("unreachable")

    def _parse(self, topic: str, payload: bytes) -> tuple[list[dict[str, Any] | None], list[Result | None]]:
        """(valid events or None, pre-filled results for invalid ones), in message order."""
        try:
            # an integer too long for int() (4,300 digits) is read as a Decimal: its event is refused, not its batch
            doc = json.loads(payload, parse_int=_json_int)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested deeper than the parser goes
            return [None], [Result("rejected", None, None, None, f"not JSON: {type(exc).__name__}: {exc}"[:500])]
        elements = doc if isinstance(doc, list) else [doc]
        if isinstance(doc, list) and not doc:
            return [None], [Result("rejected", None, None, None, "empty batch")]
        items: list[dict[str, Any] | None] = []
        results: list[Result | None] = []
        for el in elements:
            e = el if isinstance(el, dict) else None
            try:
                ev = validate_event(el) if isinstance(el, dict) else validate_event(json.dumps(el))
                try:
                    # the ERP's posting date of this time (plant calendar): a time near year 1 or 9999 overflows
                    _odata_date(parse_time(ev["time"]), self.tz)
                except (ValueError, OverflowError) as exc:
                    raise EventValidationError([f"time: {exc}"], ev) from None
            except EventValidationError as exc:
                problems = "; ".join(exc.problems)
            except (TypeError, ValueError, RecursionError) as exc:  # one odd element never fails its batch
                problems = f"not a valid event: {type(exc).__name__}: {exc}"
            else:
                items.append(ev)
                results.append(None)
                continue
            results.append(Result("rejected", _str(e, "id"), _str(e, "source"), _str(e, "type"), problems[:1000], e))
            items.append(None)
        return items, results

    async def _apply(self, conn: psycopg.AsyncConnection[Any], topic: str, payload: bytes,
                     items: list[dict[str, Any] | None], pre: list[Result | None],
                     redelivered: bool = False) -> list[Result]:
        out: list[Result] = []
        # operations already finally confirmed, among those this message reports on (late reports are flagged)
        fin: set[tuple[str, str, str]] = set()
        refs = {(ev["data"]["order"], ev["data"]["operation"], ev["data"]["machine"]) for ev in items
                if ev is not None and ev["type"] == "operation.quantity_reported" and not ev["data"]["unassigned"]}
        if refs:
            cur = await conn.execute("SELECT order_id, operation, machine FROM erp_operations WHERE "
                                     "(order_id, operation, machine) IN (SELECT * FROM unnest(%s::text[], %s::text[], "
                                     "%s::text[]))", [list(x) for x in zip(*refs)])
            fin = {tuple(r) for r in await cur.fetchall()}  # type: ignore[misc]
        new: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for ev, r in zip(items, pre):
            if ev is None:
                assert r is not None
                await conn.execute("INSERT INTO erp_rejected (source, id, topic, reason, body) "
                                   "VALUES (%s, %s, %s, %s, %s)",
                                   tuple(_pg_text(v) for v in (r.source, r.id, topic, r.reason or "",
                                                               _rejected_body(r.event, payload))))
                log.warning("erp.event_rejected", topic=topic, id=r.id, source=r.source, reason=(r.reason or "")[:300])
                filler = _filler(r.event)
                if filler is not None:
                    cur = await conn.execute("INSERT INTO erp_filled (source, epoch, seq, id) VALUES (%s, %s, %s, %s) "
                                             "ON CONFLICT DO NOTHING RETURNING 1",
                                             (filler["source"], filler["epoch"], filler["seq"], filler["id"]))
                    if await cur.fetchone() is not None:
                        new.setdefault((filler["source"], filler["epoch"]), []).append(filler)
                out.append(r)
                continue
            res = await self._event(conn, ev, fin, redelivered)
            if res.outcome == "accepted":
                new.setdefault((ev["source"], ev["epoch"]), []).append({**ev, "(refilled)": True} if res.refilled
                                                                       else ev)
            out.append(res)
        # the stream rows are locked last (fixed order), so concurrent workers wait for each other only this long
        for key in sorted(new):
            await self._advance(conn, key, new[key], fin)
        return out

    async def _event(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any],
                     fin: set[tuple[str, str, str]], redelivered: bool = False) -> Result:
        src, eid, seq = ev["source"], ev["id"], ev["seq"]
        dg = digest(ev)
        # a completion starts held; _advance applies it once every seq before it arrived
        # a seq released by hand is taken: the event is a conflict (_repeat), never booked after the release
        cur = await conn.execute(
            "INSERT INTO erp_events (source, id, epoch, seq, type, subject, event_time, body, digest, applied) "
            "SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM erp_releases "
            "WHERE source = %s AND epoch = %s AND seq = %s) ON CONFLICT DO NOTHING RETURNING EXISTS (SELECT 1 FROM "
            "erp_filled WHERE source = %s AND epoch = %s AND seq = %s)",
            (src, eid, ev["epoch"], seq, ev["type"], ev["subject"], parse_time(ev["time"]), Jsonb(ev), dg,
             ev["type"] != "operation.completed", src, ev["epoch"], seq, src, ev["epoch"], seq))
        row = await cur.fetchone()
        if row is None:
            return await self._repeat(conn, ev, dg, redelivered)
        await self._book(conn, ev, fin)
        # its rejected version filled the seq already (a state or anomaly event sent again after a fix): the stream
        # counted that seq then (``_advance`` skips it)
        return Result("accepted", eid, src, ev["type"], refilled=bool(row[0]))

    async def _advance(self, conn: psycopg.AsyncConnection[Any], key: tuple[str, str], evs: list[dict[str, Any]],
                       fin: set[tuple[str, str, str]], *, count_reorders: bool = True) -> dict[str, dict[str, Any]]:
        """Seq tracking of one (source, epoch) under its row lock, then apply the completions it releases (returned,
        by id).

        Whoever inserts the event at ``low + 1`` walks the watermark over everything committed beyond it; a
        concurrent transaction's events are either committed before this one takes the lock (then visible to the
        walk) or take the lock after this one commits (then they walk). ``evs`` are the new events, or stand-ins for
        filled seqs (``_filler``, ``release_gap``: type in parentheses). A release takes the same lock: an event of
        this transaction whose seq was released meanwhile (inserted before the release committed) rolls the
        transaction back to be run again (``_ReleasedMeanwhile``), where it is a conflict."""
        source, epoch = key
        await conn.execute("INSERT INTO erp_streams (source, epoch) VALUES (%s, %s) ON CONFLICT DO NOTHING", key)
        cur = await conn.execute("SELECT low, high, received, reorders FROM erp_streams "
                                 "WHERE source = %s AND epoch = %s FOR UPDATE", key)
        low, high, received, reorders = await cur.fetchone()  # type: ignore[misc]
        seqs = [e["seq"] for e in evs]
        late = 0
        top = high
        for sq in seqs:
            if sq < top and count_reorders:
                late += 1
            top = max(top, sq)
        if late:
            self.metrics.reorders.inc(late)
        refilled = sum(1 for e in evs if "(refilled)" in e)
        high, received, reorders = top, received + len(seqs) - refilled, reorders + late
        if low + 1 in seqs:
            while True:
                cur = await conn.execute("SELECT seq FROM erp_events WHERE source = %s AND epoch = %s AND seq > %s "
                                         "UNION SELECT seq FROM erp_filled WHERE source = %s AND epoch = %s AND seq > %s "
                                         "ORDER BY seq LIMIT 10000", (source, epoch, low, source, epoch, low))
                rows = await cur.fetchall()
                start = low
                for (sq,) in rows:
                    if sq != low + 1:
                        break
                    low = sq
                if low - start < 10000:
                    break
        await conn.execute(
            "UPDATE erp_streams SET low = %s, high = %s, received = %s, reorders = %s, "
            "gap_since = CASE WHEN %s < %s THEN COALESCE(gap_since, now()) ELSE NULL END "
            "WHERE source = %s AND epoch = %s", (low, high, received, reorders, low, high, source, epoch))
        arrived = [e["seq"] for e in evs if not e["type"].startswith("(")]
        taken = None
        if arrived:  # sent with the next query (pipeline mode): no round trip of its own
            taken = await conn.execute("SELECT seq FROM erp_releases WHERE source = %s AND epoch = %s "
                                       "AND seq = ANY(%s)", (source, epoch, arrived))
        cur = await conn.execute("SELECT body FROM erp_events WHERE source = %s AND epoch = %s AND NOT applied "
                                 "AND seq <= %s ORDER BY seq", (source, epoch, low))
        if taken is not None and await taken.fetchall():
            raise _ReleasedMeanwhile(f"{source} {epoch}")
        released = {}
        for (body,) in await cur.fetchall():
            await self._complete(conn, body, fin)
            await conn.execute("UPDATE erp_events SET applied = true WHERE source = %s AND id = %s",
                               (source, body["id"]))
            released[body["id"]] = body
        for e in evs:
            if e["type"] != "operation.completed":
                continue
            if e["id"] in released:
                continue
            log.info("erp.completion_held", source=source, id=e["id"], seq=e["seq"], low=low,
                     order=e["data"]["order"], operation=e["data"]["operation"])
        for b in released.values():
            if b["id"] not in {e["id"] for e in evs}:
                log.info("erp.completion_released", source=source, id=b["id"], seq=b["seq"])
        return released

    async def _repeat(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any], dg: str,
                      redelivered: bool = False) -> Result:
        src, eid = ev["source"], ev["id"]
        cur = await conn.execute("SELECT id, digest, body FROM erp_events WHERE source = %s AND id = %s", (src, eid))
        row = await cur.fetchone()
        kind = "same_id"
        if row is None:  # a different id under an already used (source, epoch, seq)
            kind = "same_seq"
            cur = await conn.execute("SELECT id, digest, body FROM erp_events WHERE source = %s AND epoch = %s "
                                     "AND seq = %s", (src, ev["epoch"], ev["seq"]))
            row = await cur.fetchone()
        if row is None:  # no event holds the seq: it was released by hand (the insert's NOT EXISTS)
            return await self._after_release(conn, ev)
        first_id, first_digest, first_body = row  # type: ignore[misc]
        if kind == "same_id" and first_digest == dg:
            await conn.execute("UPDATE erp_events SET duplicates = duplicates + 1, redeliveries = redeliveries + %s "
                               "WHERE source = %s AND id = %s", (1 if redelivered else 0, src, eid))
            return Result("duplicate", eid, src, ev["type"])
        await conn.execute("INSERT INTO erp_conflicts (source, id, epoch, seq, kind, first_id, first_body, body) "
                           "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                           (src, eid, ev["epoch"], ev["seq"], kind, first_id, Jsonb(first_body), Jsonb(ev)))
        reason = (f"conflict: {kind}: differs from the event already received as {first_id} "
                  f"(first wins; recorded in erp_conflicts)")
        log.error("erp.conflict", source=src, id=eid, kind=kind, first_id=first_id, seq=ev["seq"], type=ev["type"])
        return Result("conflict", eid, src, ev["type"], reason, ev)

    async def _after_release(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any]) -> Result:
        """An event under a seq an operator released (after dealing with its rejected event by hand, or declaring it
        lost): booking it now could book its quantity twice (by hand and here) and after the final confirmation.
        Not booked: a conflict (kind ``released``), recorded with the release, alarmed, rejected to the gateway."""
        src, eid, seq = ev["source"], ev["id"], ev["seq"]
        cur = await conn.execute("SELECT released_at, released_by, reason, event_lost, rejected_id FROM erp_releases "
                                 "WHERE source = %s AND epoch = %s AND seq = %s", (src, ev["epoch"], seq))
        rel = await cur.fetchone()
        if rel is None:
            raise RuntimeError(f"event {eid} was not inserted, yet neither its id nor its seq is taken")
        at, by, why, lost, rejected_id = rel
        release = {"released_at": at.isoformat(), "released_by": by, "reason": why, "event_lost": lost,
                   "rejected_id": rejected_id}
        await conn.execute("INSERT INTO erp_conflicts (source, id, epoch, seq, kind, first_id, first_body, body) "
                           "VALUES (%s, %s, %s, %s, 'released', %s, %s, %s)",
                           (src, eid, ev["epoch"], seq, rejected_id or "", Jsonb(release), Jsonb(ev)))
        reason = (f"conflict: released: seq {seq} was released by hand on {utc_text(at)}"
                  f"{f' by {by}' if by else ''} ({why}); this event is not booked (recorded in erp_conflicts): "
                  f"book it by hand if it is still missing")[:1000]
        log.error("erp.conflict", source=src, id=eid, kind="released", first_id=rejected_id, seq=seq, type=ev["type"],
                  released_at=release["released_at"], released_by=by, release_reason=why[:300])
        return Result("conflict", eid, src, ev["type"], reason, ev)

    async def _book(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any],
                    fin: set[tuple[str, str, str]]) -> None:
        t, d = ev["type"], ev["data"]
        if t == "operation.quantity_reported":
            q = d["quantities"]
            order, op = d["order"] or "", d["operation"] or ""
            await conn.execute(
                "INSERT INTO erp_ledger (machine, order_id, operation, yield, scrap, rework, unit, reports) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, 1) ON CONFLICT (machine, order_id, operation) DO UPDATE SET "
                "yield = erp_ledger.yield + excluded.yield, scrap = erp_ledger.scrap + excluded.scrap, "
                "rework = erp_ledger.rework + excluded.rework, reports = erp_ledger.reports + 1, "
                "unit = COALESCE(erp_ledger.unit, excluded.unit)",
                (d["machine"], order, op, Decimal(q["yield"]), Decimal(q["scrap"]), Decimal(q["rework"]), d["unit"]))
            if d["unassigned"]:
                await conn.execute("INSERT INTO erp_unassigned (source, id, machine, body) VALUES (%s, %s, %s, %s) "
                                   "ON CONFLICT DO NOTHING", (ev["source"], ev["id"], d["machine"], Jsonb(ev)))
                return
            await self._late_check(conn, ev, fin)
            if all(Decimal(q[k]) == 0 for k in QUANTITY_KINDS):
                return  # nothing to post (sap-mapping.md: record as processed)
            doc = self._confirmation(ev, yield_=q["yield"], scrap=q["scrap"], rework=q["rework"], unit=d["unit"])
            await self._outbox(conn, ev, "partial", doc)
        elif t == "material.consumed":
            order, op = d["order"] or "", d["operation"] or ""
            for c in d["components"]:
                await conn.execute(
                    "INSERT INTO erp_consumption (machine, order_id, operation, material, unit, quantity) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (machine, order_id, operation, material, unit) "
                    "DO UPDATE SET quantity = erp_consumption.quantity + excluded.quantity",
                    (d["machine"], order, op, c["material"], c["unit"], Decimal(c["quantity"])))
            if d["unassigned"]:
                await conn.execute("INSERT INTO erp_unassigned (source, id, machine, body) VALUES (%s, %s, %s, %s) "
                                   "ON CONFLICT DO NOTHING", (ev["source"], ev["id"], d["machine"], Jsonb(ev)))
                return
            if self.cfg.consumption == "post":
                doc = self._confirmation(ev, unit=(d["basis"] or {}).get("unit") or d["components"][0]["unit"])
                doc["to_ProdnOrdConfMatlDocItm"] = {"results": [
                    {"Material": c["material"], "GoodsMovementType": d["movement_type"],
                     "QuantityInEntryUnit": c["quantity"], "EntryUnit": self._unit(c["unit"])}
                    for c in d["components"]]}
                await self._outbox(conn, ev, "goods_issue", doc)

    async def _late_check(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any],
                          fin: set[tuple[str, str, str]]) -> None:
        d = ev["data"]
        if (d["order"], d["operation"], d["machine"]) not in fin:
            return
        await conn.execute("UPDATE erp_operations SET late_reports = late_reports + 1 WHERE order_id = %s AND "
                           "operation = %s AND machine = %s", (d["order"], d["operation"], d["machine"]))
        log.warning("erp.report_after_final", id=ev["id"], order=d["order"], operation=d["operation"],
                    machine=d["machine"])

    async def _complete(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any],
                        fin: set[tuple[str, str, str]]) -> None:
        d = ev["data"]
        await conn.execute("INSERT INTO erp_operations (order_id, operation, machine, final_id, totals) "
                           "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (order_id, operation, machine) DO UPDATE SET "
                           "final_id = excluded.final_id, totals = excluded.totals, final_at = now()",
                           (d["order"], d["operation"], d["machine"], ev["id"], Jsonb(d["totals"])))
        fin.add((d["order"], d["operation"], d["machine"]))
        await self._outbox(conn, ev, "final", self._confirmation(ev, unit=d["unit"], final=True))

    async def _outbox(self, conn: psycopg.AsyncConnection[Any], ev: dict[str, Any], kind: str,
                      doc: dict[str, Any]) -> None:
        d = ev["data"]
        await conn.execute("INSERT INTO erp_outbox (external_id, kind, order_id, operation, source, event_time, body) "
                           "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (external_id) DO NOTHING",
                           (ev["id"], kind, d["order"], d["operation"], ev["source"], parse_time(ev["time"]),
                            Jsonb(doc)))

    async def dead_letter(self, conn: psycopg.AsyncConnection[Any], topic: str, payload: bytes, error: str) -> None:
        """A message that failed again and again (not a database outage): recorded in erp_rejected and alarmed, so
        the caller can acknowledge it instead of looping on it forever."""
        reason = _pg_text(f"internal error: {error}"[:1000])
        # one row per event that can be read (its source, id and body: `gaps` / `release-gap` then know the seq was
        # rejected, not merely missing), else one row for the message as received
        rows: list[tuple[str | None, str | None, str | None]] = []
        try:
            doc = json.loads(payload, parse_int=_json_int)
        except (ValueError, RecursionError):
            doc = None
        for el in doc if isinstance(doc, list) else [doc]:
            if isinstance(el, dict) and isinstance(el.get("source"), str):
                with contextlib.suppress(ValueError, TypeError, RecursionError):
                    rows.append((_pg_text(el["source"]), _pg_text(_str(el, "id")), _pg_text(canonical(el))))
        if not rows:
            rows = [(None, None, _pg_text(payload.decode("utf-8", "replace")))]
        async with conn.transaction():
            for source, eid, body in rows:
                await conn.execute("INSERT INTO erp_rejected (source, id, topic, reason, body) VALUES (%s, %s, %s, "
                                   "%s, %s)", (source, eid, _pg_text(topic), reason, body))
        self.metrics.events.labels("rejected").inc()
        log.error("erp.dead_letter", topic=topic, error=error[:300])

    # ------------------------------------------------------------------------------------------ queries
    async def gaps(self, conn: psycopg.AsyncConnection[Any]) -> dict[tuple[str, str], dict[str, Any]]:
        """{(source, epoch): {low, high, missing, reorders, gap_age_s}} for streams with an open gap."""
        cur = await conn.execute("SELECT source, epoch, low, high, received, reorders, "
                                 "EXTRACT(EPOCH FROM now() - gap_since) FROM erp_streams WHERE low < high")
        return {(s, e): {"low": lo, "high": hi, "missing": hi - rc, "reorders": ro,
                         "gap_age_s": float(age) if age is not None else 0.0}
                for s, e, lo, hi, rc, ro, age in await cur.fetchall()}


    # ------------------------------------------------------------------------------------------ held gaps, by hand
    async def open_gaps(self, conn: psycopg.AsyncConnection[Any], source: str | None = None,
                        ranges_max: int = 1000) -> list[dict[str, Any]]:
        """Streams with an open gap, each with what holds it: the missing seq ranges (``[first, last]``, at most
        ``ranges_max``), the latest rejection recorded for a missing seq (by seq: n, id, type, reason, at) and the
        completions held behind it (seq, id, order, operation, machine). Read only."""
        cur = await conn.execute("SELECT source, epoch, low, high, received, EXTRACT(EPOCH FROM now() - gap_since) "
                                 "FROM erp_streams WHERE low < high AND (%s::text IS NULL OR source = %s) "
                                 "ORDER BY source, epoch", (source, source))
        out = []
        for src, epoch, low, high, received, age in await cur.fetchall():
            # the seqs present above the watermark, with the one before each: a hole between them is missing
            cur = await conn.execute(
                "SELECT prev + 1, seq - 1 FROM (SELECT seq, lag(seq) OVER (ORDER BY seq) AS prev FROM ("
                "SELECT seq FROM erp_events WHERE source = %(s)s AND epoch = %(e)s AND seq > %(low)s UNION "
                "SELECT seq FROM erp_filled WHERE source = %(s)s AND epoch = %(e)s AND seq > %(low)s UNION "
                "SELECT %(low)s::bigint) p) x WHERE seq - prev > 1 ORDER BY seq LIMIT %(max)s",
                {"s": src, "e": epoch, "low": low, "max": ranges_max})
            ranges = [[a, b] for a, b in await cur.fetchall()]
            rejected = {sq: r for sq, r in (await self._rejections(conn, src, epoch)).items()
                        if any(a <= sq <= b for a, b in ranges)}
            cur = await conn.execute("SELECT seq, id, body->'data'->>'order', body->'data'->>'operation', "
                                     "body->'data'->>'machine' FROM erp_events WHERE source = %s AND epoch = %s "
                                     "AND NOT applied ORDER BY seq", (src, epoch))
            held = [{"seq": sq, "id": i, "order": o, "operation": op, "machine": m}
                    for sq, i, o, op, m in await cur.fetchall()]
            out.append({"source": src, "epoch": epoch, "low": low, "high": high, "missing": high - received,
                        "gap_age_s": round(float(age), 1) if age is not None else 0.0, "missing_ranges": ranges,
                        "rejected": rejected, "held": held})
        return out

    async def _rejections(self, conn: psycopg.AsyncConnection[Any], source: str,
                          epoch: str) -> dict[int, dict[str, Any]]:
        """The latest ``erp_rejected`` row per seq of one stream: {seq: {n, id, type, reason, at}}. Read from the
        stored event (canonical JSON), so rows written before the release existed are found as well."""
        needle = '"epoch":' + json.dumps(epoch, ensure_ascii=False)  # as canonical() writes it: prefilter only
        cur = await conn.execute("SELECT n, id, reason, received_at, body FROM erp_rejected WHERE source = %s AND "
                                 "strpos(body, %s) > 0 ORDER BY n", (source, needle))
        out: dict[int, dict[str, Any]] = {}
        for n, eid, reason, at, body in await cur.fetchall():
            try:
                ev = json.loads(body)
            except ValueError:
                continue
            if not isinstance(ev, dict) or ev.get("epoch") != epoch or type(ev.get("seq")) is not int:
                continue
            seq = ev["seq"]
            out[seq] = {"n": n, "id": eid, "type": _str(ev, "type"), "reason": reason, "at": at}
        return out

    async def release_gap(self, conn: psycopg.AsyncConnection[Any], source: str, epoch: str, seqs: list[int], *,
                          reason: str, released_by: str | None, event_lost: bool = False) -> dict[str, Any]:
        """Release missing seqs of one stream by hand, all or none, in one transaction: each is filled
        (``erp_filled``) with its audit (``erp_releases``), and the watermark advanced and the completions held
        behind it applied by ``_advance``, as when the missing event arrives. For an operator who dealt with the
        rejected event by hand (booked it in the ERP) or knows it is lost.

        Refused (``ReleaseRefused``, nothing changed) for an unknown stream, a seq that arrived, is filled already
        (released before, or a rejected event that books nothing), is beyond the highest seq seen, or has no
        rejection recorded unless ``event_lost`` (its event may only be late: booked after the final confirmation
        otherwise; a late arrival under a released seq is a conflict, never booked). Give a connection in
        autocommit mode. Returns {source, epoch, low_before, low, high, seqs: [{seq, rejected}], completions}."""
        reason = " ".join(reason.split())
        if not reason:
            raise ReleaseRefused("the reason is empty: say what was done about the event (e.g. 'booked by hand in "
                                 "SAP, ticket 4711'); it is recorded with the release")
        if not seqs:
            raise ReleaseRefused("no seq given")
        wanted = sorted(set(seqs))
        for attempt in range(8):
            try:
                async with conn.transaction():
                    return await self._release(conn, source, epoch, wanted, reason, released_by, event_lost)
            except _RETRYABLE as exc:
                log.warning("erp.db_retry", error=type(exc).__name__, attempt=attempt + 1)
                if attempt == 7:
                    raise
        raise AssertionError("unreachable")

    async def _release(self, conn: psycopg.AsyncConnection[Any], source: str, epoch: str, seqs: list[int],
                       reason: str, released_by: str | None, event_lost: bool) -> dict[str, Any]:
        key = (source, epoch)
        # the stream's lock first: an event of these seqs is either committed now (seen below: refused) or checks
        # erp_releases under this lock after this commits (_advance: a conflict, never booked)
        cur = await conn.execute("SELECT low, high FROM erp_streams WHERE source = %s AND epoch = %s FOR UPDATE", key)
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute("SELECT epoch FROM erp_streams WHERE source = %s ORDER BY epoch", (source,))
            epochs = [e for (e,) in await cur.fetchall()]
            if not epochs:
                raise ReleaseRefused(f"unknown stream: no event of source {source!r} was ever received")
            more = f", ... ({len(epochs)})" if len(epochs) > 5 else ""
            raise ReleaseRefused(f"unknown stream: source {source!r} has no epoch {epoch!r} (its epochs: "
                                 f"{', '.join(epochs[:5])}{more})")
        low, high = row
        cur = await conn.execute("SELECT seq, id, type FROM erp_events WHERE source = %s AND epoch = %s AND "
                                 "seq = ANY(%s)", (source, epoch, seqs))
        arrived = {sq: (i, t) for sq, i, t in await cur.fetchall()}
        cur = await conn.execute("SELECT f.seq, f.id, r.released_at, r.released_by, r.reason FROM erp_filled f "
                                 "LEFT JOIN erp_releases r USING (source, epoch, seq) WHERE f.source = %s AND "
                                 "f.epoch = %s AND f.seq = ANY(%s)", (source, epoch, seqs))
        filled = {r[0]: r[1:] for r in await cur.fetchall()}
        rejections = await self._rejections(conn, source, epoch)
        for sq in seqs:
            at = f"seq {sq} of {source} epoch {epoch}"
            if sq < 1:
                raise ReleaseRefused(f"{at}: seqs start at 1")
            if sq in arrived:
                raise ReleaseRefused(f"{at}: its event arrived ({arrived[sq][1]} {arrived[sq][0]}): nothing to "
                                     f"release")
            if sq in filled:
                fid, when, by, why = filled[sq]
                if when is not None:
                    raise ReleaseRefused(f"{at}: already released on {utc_text(when)}"
                                         f"{f' by {by}' if by else ''} ({why})")
                raise ReleaseRefused(f"{at}: already filled (its rejected event {fid} books nothing): it holds "
                                     f"nothing")
            if sq > high:
                raise ReleaseRefused(f"{at}: beyond the highest seq received ({high}): nothing is held behind it")
            if sq <= low:  # every seq up to the watermark arrived or is filled: only if rows were deleted
                raise ReleaseRefused(f"{at}: at or below the watermark ({low}): nothing is held behind it")
            if sq not in rejections and not event_lost:
                raise ReleaseRefused(f"{at}: no rejection recorded for it, its event may only be late and still "
                                     f"arrive; release it only if it is known lost (--event-lost)")
        fillers = []
        for sq in seqs:
            rj = rejections.get(sq)
            await conn.execute("INSERT INTO erp_filled (source, epoch, seq, id) VALUES (%s, %s, %s, %s)",
                               (source, epoch, sq, rj["id"] if rj else None))
            await conn.execute("INSERT INTO erp_releases (source, epoch, seq, reason, released_by, event_lost, "
                               "rejected_n, rejected_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                               (source, epoch, sq, reason, released_by, rj is None,
                                rj["n"] if rj else None, rj["id"] if rj else None))
            fillers.append({"source": source, "epoch": epoch, "seq": sq, "id": rj["id"] if rj else None,
                            "type": "(released)"})
        applied = await self._advance(conn, key, fillers, set(), count_reorders=False)
        cur = await conn.execute("SELECT low, high FROM erp_streams WHERE source = %s AND epoch = %s", key)
        new_low, high = await cur.fetchone()  # type: ignore[misc]
        completions = [{"seq": b["seq"], "id": b["id"], "order": b["data"]["order"],
                        "operation": b["data"]["operation"], "machine": b["data"]["machine"]}
                       for b in applied.values()]
        for sq in seqs:
            rj = rejections.get(sq)
            log.warning("erp.gap_released", source=source, epoch=epoch, seq=sq, reason=reason,
                        released_by=released_by, event_lost=rj is None, rejected_id=rj["id"] if rj else None,
                        rejected_type=rj["type"] if rj else None, low_before=low, low=new_low, high=high,
                        completions_applied=[c["id"] for c in completions])
        return {"source": source, "epoch": epoch, "low_before": low, "low": new_low, "high": high,
                "seqs": [{"seq": sq, "rejected": rejections.get(sq)} for sq in seqs], "completions": completions}


def _str(doc: Any, key: str) -> str | None:
    v = doc.get(key) if isinstance(doc, dict) else None
    return v if isinstance(v, str) else None


# events that book nothing: when one is rejected, its seq is no reason to hold a final confirmation
_BOOKS_NOTHING = frozenset({"machine.state_changed", "counter.anomaly", "operation.started"})


def _filler(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The seq a rejected event leaves behind, as a stand-in for ``_advance`` (source, epoch, seq, id, type), when its
    envelope can be read and its type books nothing; else None (the seq stays open: the gap alarm tells)."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or event["type"] not in _BOOKS_NOTHING:
        return None
    source, epoch, seq = event.get("source"), event.get("epoch"), event.get("seq")
    if not isinstance(source, str) or not isinstance(epoch, str) or type(seq) is not int or not 1 <= seq < 2**63:
        return None
    if "\x00" in source or "\x00" in epoch:  # PostgreSQL stores no NUL in a text
        return None
    return {"source": source, "epoch": epoch, "seq": seq, "id": _str(event, "id"), "type": "(rejected)"}
