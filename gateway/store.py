"""The local store: counter state, the event outbox and the quarantine in one SQLite file (WAL).

Invariants
----------
- **Atomicity.** ``commit()`` writes, in one transaction, the machine snapshots (counter baselines, open window,
  totals, order context), the next sequence number and the outbox rows derived from them. Either all of it is on
  disk or none of it is. Because the machine's cumulative counter is the durable log, a crash before the commit
  loses nothing: after restart the engine resumes from the last committed baseline and derives the same quantities
  again, under the same sequence numbers.
- **Durability.** With ``synchronous=NORMAL`` (default) a committed transaction survives a crash of the gateway
  process (the WAL is in the OS page cache); after a power loss or kernel crash the last transactions since the
  last WAL sync may roll back — they are then re-derived from the machine counters as above, and any event of
  them that had already been published is re-published under the same id (the sequence rolls back with it).
  ``synchronous=FULL`` fsyncs the WAL on every commit: committed events survive power loss too, at the cost of one
  fsync per group commit (``store.synchronous``).
- **Group commit.** The runtime batches many samples/events per transaction; never one transaction per event.
- **Ordering.** Outbox rows get increasing ids in commit order; events of one machine are committed in the order
  the engine produced them, so publishing in id order preserves per-machine order.
- **Delivery.** A row is deleted only after the broker's PUBACK (``ack()``). Acks are applied in small batches, so
  a crash between PUBACK and delete re-publishes those rows after restart: consumers deduplicate on the event id,
  which is stable. After a restart delivery resumes at the lowest id still in the outbox.
- **Identity.** The store has an ``epoch`` (random, made when the file is created); event ids derive from
  source + epoch + sequence, so a new store never reuses the id of an event from an old one.
- **Size cap.** ``max_bytes`` bounds the payload bytes held in the outbox and quarantine. At the cap (or when the
  disk is full: SQLITE_FULL / ENOSPC) the store reports ``full``: the runtime then stops closing reporting windows
  — quantity deltas keep accumulating in the (small, persisted) machine state and are reported once space returns —,
  drops only low-value events (state changes) with an exact count, and raises an alarm. Events that must be written
  (changeover and completion reports) may exceed the cap; a commit that fails for lack of disk is retried, never
  dropped, and the engine state it would have persisted stays in memory until it succeeds.
- **Corrupt or oversized records.** Rows are written by the gateway itself. A row the broker refuses (larger than
  ``mqtt.max_message_bytes``, or a negative MQTT 5 PUBACK) or an event the ERP rejects is moved to the
  ``quarantine`` table with the reason, so it never blocks the rows behind it; ``edge-gateway buffer`` lists,
  retries (moves back to the end of the outbox), exports and purges them. A row whose payload cannot be read is
  quarantined too.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiosqlite
import structlog

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machine_state (
    machine TEXT PRIMARY KEY,
    state   TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    seq     INTEGER NOT NULL,
    machine TEXT NOT NULL,
    type    TEXT NOT NULL,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid     INTEGER PRIMARY KEY AUTOINCREMENT,
    seq     INTEGER,
    machine TEXT NOT NULL,
    type    TEXT NOT NULL,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason  TEXT NOT NULL,
    at      REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    machine: str
    type: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PendingRow:
    id: int
    topic: str
    payload: bytes
    machine: str = ""
    seq: int = 0


class StoreError(Exception):
    """The store could not be opened or written (disk full, corrupt file, permissions)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL or "full" in str(exc).lower():
            return True
    return isinstance(exc, OSError) and exc.errno == 28


class Store:
    """SQLite-backed state + outbox + quarantine. Async context manager."""

    def __init__(self, path: str, *, synchronous: str = "normal", max_bytes: int | None = None) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.max_bytes = max_bytes
        self._db: aiosqlite.Connection | None = None
        self.epoch: str = ""
        self.next_seq: int = 1
        self.pending: int = 0
        self.pending_bytes: int = 0
        self.quarantined: int = 0
        self.disk_full = False  # the last write failed for lack of space
        self._tx = asyncio.Lock()  # one connection: transactions must not interleave

    async def __aenter__(self) -> "Store":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            db = self._db
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={self.synchronous}")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(_SCHEMA)
            meta = dict(await db.execute_fetchall("SELECT key, value FROM meta"))
            if "epoch" not in meta:
                meta = {"epoch": uuid.uuid4().hex, "next_seq": "1", "schema": str(SCHEMA_VERSION)}
                await db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
            self.epoch = meta["epoch"]
            self.next_seq = int(meta["next_seq"])
            (self.pending, size) = (await db.execute_fetchall("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"))[0]
            (self.quarantined, qsize) = (await db.execute_fetchall("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM quarantine"))[0]
            self.pending_bytes = int(size) + int(qsize)
        except Exception as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            raise StoreError(f"cannot open store {self.path}: {exc}", disk_full=_is_disk_full(exc)) from exc
        log.info("store.opened", path=self.path, epoch=self.epoch, next_seq=self.next_seq, pending=self.pending,
                 quarantined=self.quarantined, synchronous=self.synchronous.lower())

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @property
    def full(self) -> bool:
        return self.disk_full or (self.max_bytes is not None and self.pending_bytes >= self.max_bytes)

    async def _write(self, fn: Any, what: str) -> None:
        """Run ``fn(db)`` in one transaction; translate failures, remember a full disk."""
        db = self.db
        async with self._tx:
            try:
                await db.execute("BEGIN IMMEDIATE")
                await fn(db)
                await db.execute("COMMIT")
            except BaseException as exc:
                # also on cancellation (gateway stop): never leave the transaction open for the next writer
                try:
                    await asyncio.shield(db.execute("ROLLBACK"))
                except BaseException:  # noqa: BLE001 - the rollback error is secondary (no transaction left)
                    pass
                if not isinstance(exc, Exception):
                    raise
                full = _is_disk_full(exc)
                if full:
                    self.disk_full = True
                raise StoreError(f"{what} failed: {exc}", disk_full=full) from exc
        self.disk_full = False

    # ------------------------------------------------------------------ state + outbox
    async def load_states(self) -> dict[str, dict[str, Any]]:
        rows = await self.db.execute_fetchall("SELECT machine, state FROM machine_state")
        return {m: json.loads(s) for m, s in rows}

    async def commit(self, states: dict[str, dict[str, Any]], rows: list[OutboxRow], next_seq: int) -> list[PendingRow]:
        """Write snapshots, outbox rows and the sequence counter in one transaction; returns the committed rows
        with their outbox ids (for ``Publisher.notify(rows)``)."""
        now = time.time()
        last_id = 0

        async def tx(db: aiosqlite.Connection) -> None:
            nonlocal last_id
            if states:
                await db.executemany(
                    "INSERT INTO machine_state(machine, state, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(machine) DO UPDATE SET state=excluded.state, updated=excluded.updated",
                    [(m, json.dumps(s, separators=(",", ":")), now) for m, s in states.items()],
                )
            if rows:
                await db.executemany(
                    "INSERT INTO outbox(seq, machine, type, topic, payload, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.seq, r.machine, r.type, r.topic, r.payload, now) for r in rows],
                )
                ((last_id,),) = await db.execute_fetchall("SELECT last_insert_rowid()")
            if next_seq != self.next_seq:
                await db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(next_seq),))

        await self._write(tx, "commit")
        self.next_seq = next_seq
        self.pending += len(rows)
        self.pending_bytes += sum(len(r.payload) for r in rows)
        # one writer, one transaction, AUTOINCREMENT: the ids of the rows are consecutive, ending at last_id
        first = last_id - len(rows) + 1
        return [PendingRow(first + i, r.topic, r.payload, r.machine, r.seq) for i, r in enumerate(rows)]

    async def max_id(self) -> int:
        (n,) = (await self.db.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM outbox"))[0]
        return int(n)

    async def fetch(self, after_id: int, limit: int, upto_id: int | None = None) -> list[PendingRow]:
        if upto_id is None:
            rows = await self.db.execute_fetchall(
                "SELECT id, topic, payload, machine, seq FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        else:
            rows = await self.db.execute_fetchall(
                "SELECT id, topic, payload, machine, seq FROM outbox WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (after_id, upto_id, limit))
        return [PendingRow(i, t, bytes(p), m, s) for i, t, p, m, s in rows]

    async def ack(self, acked: list[tuple[int, int]]) -> None:
        """Delete acknowledged rows: ``(id, payload_size)`` pairs."""
        if not acked:
            return

        async def tx(db: aiosqlite.Connection) -> None:
            await db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i, _ in acked])

        await self._write(tx, "ack")
        self.pending -= len(acked)
        self.pending_bytes -= sum(size for _, size in acked)

    async def last_ids_by_machine(self, upto_id: int) -> dict[str, int]:
        """Highest outbox id per machine among the rows with ``id <= upto_id`` (the publisher's backlog after a
        reconnect). Scans on a separate read-only connection in a worker thread (WAL: one consistent snapshot), so a
        large outbox (~1.5 s per million rows) does not hold up this store's connection."""

        def scan() -> dict[str, int]:
            db = sqlite3.connect(self.path, timeout=5)
            try:
                db.execute("PRAGMA query_only=ON")
                rows = db.execute("SELECT machine, MAX(id) FROM outbox WHERE id <= ? GROUP BY machine", (upto_id,))
                return {m: int(i) for m, i in rows}
            finally:
                db.close()

        return await asyncio.to_thread(scan)

    async def count_pending(self) -> int:
        (n,) = (await self.db.execute_fetchall("SELECT COUNT(*) FROM outbox"))[0]
        return int(n)

    # ------------------------------------------------------------------ quarantine
    async def quarantine(self, row_id: int, reason: str) -> bool:
        """Move an outbox row to the quarantine. Returns False when the row is gone (already acked)."""
        moved = False

        async def tx(db: aiosqlite.Connection) -> None:
            nonlocal moved
            cur = await db.execute(
                "INSERT INTO quarantine(seq, machine, type, topic, payload, reason, at) "
                "SELECT seq, machine, type, topic, payload, ?, ? FROM outbox WHERE id = ?", (reason, time.time(), row_id))
            moved = cur.rowcount == 1
            await db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

        await self._write(tx, "quarantine")
        if moved:
            self.pending -= 1
            self.quarantined += 1
        return moved

    async def quarantine_external(self, *, seq: int | None, machine: str, type: str, topic: str, payload: bytes,
                                  reason: str) -> None:
        """Quarantine an event that already left the outbox (the ERP rejected it after delivery)."""

        async def tx(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO quarantine(seq, machine, type, topic, payload, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, machine, type, topic, payload, reason, time.time()))

        await self._write(tx, "quarantine")
        self.quarantined += 1
        self.pending_bytes += len(payload)

    # ------------------------------------------------------------------ operator tools (edge-gateway buffer)
    async def list_rows(self, table: str, limit: int = 100) -> list[dict[str, Any]]:
        if table == "quarantine":
            rows = await self.db.execute_fetchall(
                "SELECT qid, seq, machine, type, topic, LENGTH(payload), reason, at FROM quarantine ORDER BY qid LIMIT ?", (limit,))
            return [dict(zip(("id", "seq", "machine", "type", "topic", "bytes", "reason", "at"), r)) for r in rows]
        rows = await self.db.execute_fetchall(
            "SELECT id, seq, machine, type, topic, LENGTH(payload), created FROM outbox ORDER BY id LIMIT ?", (limit,))
        return [dict(zip(("id", "seq", "machine", "type", "topic", "bytes", "created"), r)) for r in rows]

    async def export_rows(self, table: str) -> list[dict[str, Any]]:
        if table == "quarantine":
            rows = await self.db.execute_fetchall(
                "SELECT qid, seq, machine, type, topic, payload, reason FROM quarantine ORDER BY qid")
            keys = ("id", "seq", "machine", "type", "topic", "payload", "reason")
        else:
            rows = await self.db.execute_fetchall("SELECT id, seq, machine, type, topic, payload FROM outbox ORDER BY id")
            keys = ("id", "seq", "machine", "type", "topic", "payload")
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            raw = bytes(d["payload"])
            try:
                d["payload"] = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                d["payload"] = raw.decode("latin-1")
                d["payload_unreadable"] = True
            out.append(d)
        return out

    async def retry_quarantined(self, ids: list[int] | None = None) -> int:
        """Move quarantined rows (all, or the given ids) back to the end of the outbox."""
        n = 0
        where = "" if ids is None else f" WHERE qid IN ({','.join('?' * len(ids))})"
        params = () if ids is None else tuple(ids)

        async def tx(db: aiosqlite.Connection) -> None:
            nonlocal n
            cur = await db.execute(
                "INSERT INTO outbox(seq, machine, type, topic, payload, created) "
                f"SELECT COALESCE(seq, 0), machine, type, topic, payload, ? FROM quarantine{where} ORDER BY qid",
                (time.time(), *params))
            n = cur.rowcount
            await db.execute(f"DELETE FROM quarantine{where}", params)

        await self._write(tx, "retry")
        self.quarantined -= n
        self.pending += n
        return n

    async def purge(self, table: str, ids: list[int] | None = None) -> int:
        key = "qid" if table == "quarantine" else "id"
        where = "" if ids is None else f" WHERE {key} IN ({','.join('?' * len(ids))})"
        params = () if ids is None else tuple(ids)
        n = 0
        size = 0

        async def tx(db: aiosqlite.Connection) -> None:
            nonlocal n, size
            ((size,),) = await db.execute_fetchall(f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM {table}{where}", params)
            cur = await db.execute(f"DELETE FROM {table}{where}", params)
            n = cur.rowcount

        await self._write(tx, "purge")
        if table == "quarantine":
            self.quarantined -= n
        else:
            self.pending -= n
        self.pending_bytes -= int(size)
        return n
