"""The local store: counter state and the event outbox in one SQLite file (WAL).

Invariants
----------
- **Atomicity.** ``commit()`` writes, in one transaction, the machine snapshots (counter baselines, open window,
  totals, order context), the next sequence number and the outbox rows derived from them. Either all of it is on
  disk or none of it is. Because the machine's cumulative counter is the durable log, a crash before the commit
  loses nothing: after restart the engine resumes from the last committed baseline and derives the same quantities
  again, under the same sequence numbers.
- **Durability.** With ``synchronous=NORMAL`` (default) a committed transaction survives a crash of the gateway
  process; after a power loss or kernel crash the last few transactions may roll back (WAL is fsynced at
  checkpoints) — and are then re-derived from the counters as above. ``synchronous=FULL`` fsyncs the WAL on every
  commit: committed events survive power loss too, at the cost of one fsync per group commit.
- **Group commit.** The runtime batches many samples/events per transaction (``store.commit_interval_ms``).
- **Ordering.** Outbox rows get increasing ids in commit order; events of one machine are committed in the order
  the engine produced them, so publishing in id order preserves per-machine order.
- **Delivery.** A row is deleted only after the broker's PUBACK (``ack()``). Acks are applied in small batches, so
  a crash between PUBACK and delete re-publishes those rows after restart: consumers deduplicate on the event id,
  which is stable. After a restart delivery resumes at the lowest id still in the outbox.
- **Identity.** The store has an ``epoch`` (random, made when the file is created); event ids derive from
  source + epoch + sequence, so a new store never reuses the id of an event from an old one.
- **Corrupt or oversized records.** Payloads are written by the gateway itself and checked when read; a row that
  cannot be published (e.g. larger than the broker accepts) is left to the publisher's quarantine (see publisher).
"""

from __future__ import annotations

import asyncio
import json
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


class StoreError(Exception):
    """The store could not be opened or written (disk full, corrupt file, permissions)."""


class Store:
    """SQLite-backed state + outbox. Async context manager."""

    def __init__(self, path: str, *, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self.epoch: str = ""
        self.next_seq: int = 1
        self.pending: int = 0
        self._tx = asyncio.Lock()  # one connection: transactions must not interleave

    async def __aenter__(self) -> "Store":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        import os

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
            (self.pending,) = (await db.execute_fetchall("SELECT COUNT(*) FROM outbox"))[0]
        except Exception as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        log.info("store.opened", path=self.path, epoch=self.epoch, next_seq=self.next_seq, pending=self.pending,
                 synchronous=self.synchronous.lower())

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def load_states(self) -> dict[str, dict[str, Any]]:
        rows = await self.db.execute_fetchall("SELECT machine, state FROM machine_state")
        return {m: json.loads(s) for m, s in rows}

    async def commit(self, states: dict[str, dict[str, Any]], rows: list[OutboxRow], next_seq: int) -> None:
        """Write snapshots, outbox rows and the sequence counter in one transaction."""
        async with self._tx:
            await self._commit(states, rows, next_seq)
        self.next_seq = next_seq
        self.pending += len(rows)

    async def _commit(self, states: dict[str, dict[str, Any]], rows: list[OutboxRow], next_seq: int) -> None:
        db = self.db
        now = time.time()
        try:
            await db.execute("BEGIN IMMEDIATE")
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
            if next_seq != self.next_seq:
                await db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(next_seq),))
            await db.execute("COMMIT")
        except Exception as exc:
            try:
                await db.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the rollback error is secondary
                pass
            raise StoreError(f"commit failed: {exc}") from exc

    async def fetch(self, after_id: int, limit: int) -> list[PendingRow]:
        rows = await self.db.execute_fetchall(
            "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [PendingRow(i, t, bytes(p)) for i, t, p in rows]

    async def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        db = self.db
        async with self._tx:
            try:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                await db.execute("COMMIT")
            except Exception as exc:
                try:
                    await db.execute("ROLLBACK")
                except Exception:  # noqa: BLE001
                    pass
                raise StoreError(f"ack failed: {exc}") from exc
        self.pending -= len(ids)

    async def count_pending(self) -> int:
        (n,) = (await self.db.execute_fetchall("SELECT COUNT(*) FROM outbox"))[0]
        return int(n)
