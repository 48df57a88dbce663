"""The local store: counter state, the event outbox and the quarantine in one SQLite file (WAL).

Contract
--------
What the rest of the gateway may rely on. Each point says why it holds.

- **The publisher sees only committed rows.** Reads (``fetch``, ``max_id``, ``list_rows`` ...) share the writer's
  connection, so they take the same transaction lock as writes: a read never runs inside another task's open
  transaction, and rows of a transaction that is later rolled back (SQLITE_FULL often surfaces only at COMMIT) are
  never returned. ``commit()`` itself returns the rows it committed, with their outbox ids, so the runtime can hand
  them to the publisher without reading them back.
- **An event leaves the gateway only when its commit is durable.** With ``synchronous="full"`` (the default) SQLite
  fsyncs the WAL before COMMIT returns, so a row returned by ``commit()`` or ``fetch()`` survives a power loss or a
  kernel crash. ``synchronous="normal"`` is an explicit opt-out (``store.opened`` is then logged at warning level): a commit then
  survives a crash of the process but not a power loss, and the last transactions may roll back; the engine then
  re-derives the events from the machine counters under the same sequence numbers, and an event that had already
  been published may be re-derived with a *different content under an id that was already published* (the counter
  moved on in between). Only ``full`` gives the identity guarantee below across power loss.
- **An id is never reused for different content.** An event id derives from source + epoch + sequence number. The
  sequence number is allocated by the engine and persisted (``meta.next_seq``) only inside the commit that carries the
  engine snapshot which produced the event, together with the event itself: both are on disk or neither is. A failed
  commit's rows are never visible (previous point), so nothing derived from a state that was not persisted can be
  published; the caller keeps the staged rows and re-commits them unchanged. With ``synchronous="full"`` the commit
  of a published row cannot roll back, so the sequence number cannot be allocated again. The ``epoch`` (random, made
  when the file is created) keeps a new store from reusing the ids of an old one. Outbox ids come from AUTOINCREMENT
  and are never reused either.
- **Counters cannot drift.** ``pending`` (outbox rows), ``pending_bytes`` (payload bytes in outbox + quarantine) and
  ``quarantined`` are changed only by what a committed transaction actually did: ``ack`` and ``purge`` count the rows
  their DELETE removed (``RETURNING length(payload)``), not the ids they were given, so acking a row twice, acking a
  quarantined or purged row, or a lost race changes nothing. They equal ``COUNT(*)`` / ``SUM(LENGTH(payload))`` of
  the tables at all times (the stateful model test checks this after every step).
- **Ordering.** Rows get increasing outbox ids in commit order (ids of one commit are consecutive); events of one
  machine are committed in the order the engine produced them, so publishing in id order preserves per-machine order.
  A row retried from the quarantine goes back under its original outbox id (kept in ``quarantine.outbox_id``; free,
  since AUTOINCREMENT never hands out an id twice) with its original ``seq``, so it goes out in its original place
  among its machine's rows; rows quarantined from outside (ERP rejections: no outbox id) go to the end.
- **One process per store.** ``open()`` takes an exclusive ``flock`` on ``<path>.lock`` and writes its PID and
  command line into it; a second opener gets ``StoreLocked`` naming that process. ``Store(path, readonly=True)`` reads
  without the lock (``edge-gateway buffer list|export`` next to a running gateway) and can never write.
- **A failed commit.** ``commit()`` raises ``StoreError`` with a ``kind`` (``disk_full``, ``readonly``, ``io``,
  ``corrupt``, ``locked``, ``other``, from the SQLite error code); the transaction is rolled back entirely, nothing of
  it is visible, the store's counters and ``next_seq`` are unchanged. The caller keeps the staged rows and engine
  state and retries; ``last_error`` and ``consecutive_failures`` tell a supervisor how long it has been failing.
  A task cancelled while COMMIT runs (gateway stop) gets ``CancelledError`` only after COMMIT's outcome is known, and
  the counters follow the disk; the rows may then be committed although the caller saw no return value (a caller
  that re-commits them produces duplicates with the same ids and content, which consumers deduplicate).

Other invariants
----------------
- **Atomicity.** ``commit()`` writes, in one transaction, the machine snapshots (counter baselines, open window,
  totals, order context), the next sequence number and the outbox rows derived from them. Because the machine's
  cumulative counter is the durable log, a crash before the commit loses nothing: after restart the engine resumes
  from the last committed baseline and derives the quantities again.
- **Machine snapshots** are appended to ``state_log`` (the last row of a machine is its state; compacted inside
  a commit, ``Store._compaction``, and at open, which keeps only each machine's last row), so a commit's snapshots
  land on a few adjacent pages instead of one page per machine. A store of schema 1 or 2 has them in
  ``machine_state``: moved to the log when it opens. A store of a newer schema than this version's is refused (it
  would start every machine afresh).
- **Group commit.** The runtime batches many samples/events per transaction; never one transaction per event. The
  cost of the durable default (one WAL fsync per commit) is measured by ``bench/commit_cost.py``.
- **Delivery.** A row is deleted only after the broker's PUBACK (``ack()``). Acks are applied in small batches, so
  a crash between PUBACK and delete re-publishes those rows after restart: consumers deduplicate on the event id,
  which is stable. After a restart delivery resumes at the lowest id still in the outbox. The delete itself is not
  synced (``synchronous=NORMAL`` for that transaction; the next commit's fsync carries it): a delete lost to a power
  loss only sends the same event again, same id and content, which is a duplicate, never a conflict.
- **Size cap.** ``max_bytes`` bounds the payload bytes held in the outbox and quarantine. At the cap (or when the
  disk is full: SQLITE_FULL / ENOSPC) the store reports ``full``: the runtime then stops closing reporting windows
  — quantity deltas keep accumulating in the (small, persisted) machine state and are reported once space returns —,
  drops only low-value events (state changes) with an exact count, and raises an alarm. Events that must be written
  (changeover and completion reports) may exceed the cap; a commit that fails for lack of disk is retried, never
  dropped, and the engine state it would have persisted stays in memory until it succeeds.
- **Corrupt or oversized records.** Rows are written by the gateway itself. A row the broker refuses (larger than
  ``mqtt.max_message_bytes``, or a negative MQTT 5 PUBACK) or an event the ERP rejects is moved to the
  ``quarantine`` table with the reason, so it never blocks the rows behind it; ``edge-gateway buffer`` lists,
  retries, exports and purges them (retry and purge only while no gateway runs on the store). A row whose payload
  cannot be read is quarantined too.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiosqlite
import structlog

from gateway.faults import crash_point

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 3  # 2: quarantine.outbox_id (added by ALTER TABLE to files of version 1); 3: state_log
# (machine_state's rows moved there when a file of version 1 or 2 opens; machine_state stays, empty)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machine_state (
    machine TEXT PRIMARY KEY,
    state   TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state_log (
    id      INTEGER PRIMARY KEY,
    machine TEXT NOT NULL,
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
    qid       INTEGER PRIMARY KEY AUTOINCREMENT,
    seq       INTEGER,
    machine   TEXT NOT NULL,
    type      TEXT NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    reason    TEXT NOT NULL,
    at        REAL NOT NULL,
    outbox_id INTEGER
);
"""

_CHUNK = 500  # ids per "IN (...)" statement (SQLite allows 32766 variables; keep statements small)


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (0.7 against 0.16 µs per row, two rows per
# event on the hot path). Treated as immutable all the same; nothing hashes them.
@dataclass(slots=True)
class OutboxRow:
    """An event to commit: made by the runtime, written by ``Store.commit``."""

    seq: int
    machine: str
    type: str
    topic: str
    payload: bytes
    time: float = 0.0  # the event's time (Unix seconds): not stored (it is in the payload); for the sync latency


@dataclass(slots=True)
class PendingRow:
    """A committed outbox row: returned by ``Store.commit`` and ``Store.fetch``."""

    id: int
    topic: str
    payload: bytes
    machine: str = ""
    seq: int = 0


ERROR_KINDS = ("disk_full", "readonly", "io", "corrupt", "locked", "other")


class StoreError(Exception):
    """The store could not be opened or written.

    ``kind`` says why, from the SQLite result code (or the OS errno): ``disk_full`` (SQLITE_FULL, ENOSPC),
    ``readonly`` (SQLITE_READONLY, SQLITE_PERM, EROFS, EACCES), ``io`` (SQLITE_IOERR, SQLITE_CANTOPEN, other OS
    errors), ``corrupt`` (SQLITE_CORRUPT, SQLITE_NOTADB), ``locked`` (SQLITE_BUSY, SQLITE_LOCKED, another gateway
    holds the store: ``StoreLocked``), ``other``. ``disk_full`` is kept as a bool for older callers.
    """

    def __init__(self, message: str, *, kind: str | None = None, disk_full: bool = False) -> None:
        super().__init__(message)
        self.kind = kind or ("disk_full" if disk_full else "other")
        self.disk_full = self.kind == "disk_full"


class StoreLocked(StoreError):
    """Another process has the store open for writing (it holds the flock on ``<path>.lock``)."""

    def __init__(self, path: str, pid: int | None, command: str) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        if command:
            who += f" ({command})"
        super().__init__(f"store {path} is in use by {who}; stop it first", kind="locked")
        self.path = path
        self.pid = pid
        self.command = command


_SQLITE_KINDS = {
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_READONLY: "readonly",
    sqlite3.SQLITE_PERM: "readonly",
    sqlite3.SQLITE_IOERR: "io",
    sqlite3.SQLITE_CANTOPEN: "io",
    sqlite3.SQLITE_CORRUPT: "corrupt",
    sqlite3.SQLITE_NOTADB: "corrupt",
    sqlite3.SQLITE_BUSY: "locked",
    sqlite3.SQLITE_LOCKED: "locked",
}


def error_kind(exc: BaseException) -> str:
    """Classify a failure of SQLite or of the OS (see ``StoreError``)."""
    if isinstance(exc, StoreError):
        return exc.kind
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) in _SQLITE_KINDS:
            return _SQLITE_KINDS[code & 0xFF]
        if "full" in str(exc).lower():
            return "disk_full"
        return "other"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk_full"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "readonly"
        return "io"
    return "other"


def _is_disk_full(exc: BaseException) -> bool:
    return error_kind(exc) == "disk_full"


def _command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
        return " ".join(p.decode(errors="replace") for p in parts if p)
    except OSError:
        return " ".join([sys.executable, *sys.argv])


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


def _in_thread(db: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """``fn(conn, *args)`` on SQLite's thread with the sqlite3 connection ``conn`` of ``db``, in one round trip
    (aiosqlite queues every call to that thread; its own methods are such calls, one per statement). aiosqlite has
    no public call for this: ``Connection._execute`` and ``_conn`` are its own, present from 0.20 (pyproject.toml
    bounds the version; tests/test_store_contract.py checks them)."""
    return db._execute(lambda: fn(db._conn, *args))


def _begin_then(conn: sqlite3.Connection, synchronous: str | None, body: Callable[[sqlite3.Connection], Any],
                commit: bool) -> Any:
    """On SQLite's thread: the pragma (None: unchanged), BEGIN IMMEDIATE, the transaction's ``body``, then COMMIT if
    ``commit``. On an error the transaction is left open: ``Store._write`` rolls it back."""
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("BEGIN IMMEDIATE")
    out = body(conn)
    if commit:
        conn.execute("COMMIT")
    return out


def _delete_rows(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, int]:
    """Inside a transaction: delete the outbox rows ``ids``; returns the rows deleted and their payload bytes (the
    counters move by what the DELETE removed, not by what was asked)."""
    n = size = 0
    for chunk in _chunks(ids):
        for (length,) in conn.execute(
                f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))}) RETURNING LENGTH(payload)", chunk):
            n += 1
            size += int(length)
    return n, size


def _compact_states(conn: sqlite3.Connection, copies: dict[str, int], pairs: list[tuple[int, int]], gen: int) -> int:
    """Inside a commit's transaction: ``Store._compaction``'s copies, then the rows below ``gen`` deleted; returns
    the rows deleted."""
    if pairs:
        conn.executemany("INSERT INTO state_log(id, machine, state, updated) "
                         "SELECT ?, machine, state, updated FROM state_log WHERE id = ?", pairs)
    return conn.execute("DELETE FROM state_log WHERE id < ?", (gen,)).rowcount


Apply = Callable[[], Any]  # bookkeeping run after a successful COMMIT, under the transaction lock

# the first outbox rows, for the oldest one not acknowledged (limit: the acknowledged rows waiting for their delete
# + 1): the first entries of the primary-key b-tree, as cheap with ten rows as with ten million
LAST_STATE_IDS_SQL = "SELECT MAX(id) FROM state_log GROUP BY machine"  # each machine's state: its last row

OLDEST_ROWS_SQL = "SELECT id, created FROM outbox ORDER BY id LIMIT ?"


def first_unacked_created(rows: Iterable[tuple[int, Any]], acked: frozenset[int]) -> float | None:
    """The ``created`` of the first of ``rows`` (OLDEST_ROWS_SQL's) not in ``acked``."""
    return next((float(c) for i, c in rows if i not in acked), None)


class Store:
    """SQLite-backed state + outbox + quarantine. Async context manager.

    ``synchronous``: ``"full"`` (default; a returned commit survives power loss) or ``"normal"`` (survives a process
    crash only; see the contract above). ``readonly``: open the file read-only without taking the process lock
    (inspection next to a running gateway); every write then fails with ``StoreError(kind="readonly")``.
    """

    def __init__(self, path: str, *, synchronous: str = "full", max_bytes: int | None = None,
                 readonly: bool = False) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self._sync_now = self.synchronous  # the connection's current PRAGMA synchronous
        self.max_bytes = max_bytes
        self.readonly = readonly
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._outbox_id_col = "outbox_id"  # "NULL" when a read-only open finds a schema-1 file
        self.epoch: str = ""
        self.next_seq: int = 1
        self.outbox_rows: int = 0  # rows in the outbox table (``pending``: those not acknowledged)
        self.pending_bytes: int = 0
        self.quarantined_bytes: int = 0  # the part of pending_bytes in the quarantine
        self.quarantined: int = 0
        self.disk_full = False  # the last write failed for lack of space
        self.last_error: StoreError | None = None  # the error of the last write if it failed, else None
        self.consecutive_failures = 0  # writes failed in a row (0 after a successful one)
        self._tx = asyncio.Lock()  # one connection: transactions and reads must not interleave
        # state_log (machine snapshots, appended): the latest row's id per machine, the row count, the next id and
        # the first id of the current generation (_compact_states); set by open()
        self._state_table = "state_log"
        self._state_ids: dict[str, int] = {}
        self._state_rows = 0
        self._state_next = 1
        self._state_gen = 1
        self.state_log_slack = 1024  # rows added beyond one per machine before a compaction
        # ids of acknowledged rows whose delete waits for the next commit (ack_later) or ack(): a delete of its own
        # is a transaction of its own (BEGIN, DELETE, COMMIT, a WAL commit frame); inside a commit it is one statement
        self._ack_ids: list[int] = []
        # machine -> an outbox id at least as high as that machine's highest row in the outbox, for the publisher's
        # backlog after a reconnect (backlog_bounds) without waiting for a scan of the table: every row this store
        # inserted (commit, retry_quarantined) and, once a scan ran (last_ids_by_machine), the rows it found of
        # those in the file at open. Deletes leave entries as they are (an upper bound). Known: it covers every row
        # of the outbox (an empty outbox at open, or a scan since)
        self._machine_last: dict[str, int] = {}
        self._machine_last_known = False
        self.acked_total = 0  # acknowledged rows whose delete committed (already gone or not)
        self.acked_at: float | None = None  # when the last of them committed (Unix time)
        self.acks_since = 0.0  # time.monotonic() when the oldest of _ack_ids was handed over
        # test hook: awaited inside a write transaction, after its statements, right before COMMIT
        self.before_commit: Callable[[], Awaitable[None]] | None = None

    async def __aenter__(self) -> "Store":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ lifecycle
    @property
    def lock_path(self) -> str:
        return os.path.abspath(self.path) + ".lock"

    def _take_lock(self) -> None:
        """One writer per store: an exclusive flock on ``<path>.lock`` (released by the OS if the process dies)."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 8192, 0).decode(errors="replace")
            finally:
                os.close(fd)
            first, _, rest = text.partition("\n")
            pid = int(first) if first.strip().isdigit() else None
            raise StoreLocked(os.path.abspath(self.path), pid, rest.strip()) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        try:  # who holds it, for the message of a second opener; the flock alone is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{_command_line()}\n".encode(), 0)
        except OSError:  # e.g. a full disk: the store may still open (and report the full disk)
            pass

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    async def open(self, *, readonly: bool | None = None) -> None:
        """Open (creating the file and its schema unless read-only). Raises ``StoreLocked`` when another process
        has the store open for writing, ``StoreError`` when the file cannot be opened."""
        if readonly is not None:
            self.readonly = readonly
        if self._db is not None:
            return
        try:
            if not self.readonly:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._take_lock()
                # the events and machine states are the plant's production data: readable by the gateway's user
                # only (SQLite gives its -wal and -shm files the database file's mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}", kind=error_kind(exc)) from exc
        try:
            if self.readonly:
                uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
                self._db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
                db = self._db
                await db.execute("PRAGMA busy_timeout=5000")
            else:
                self._db = await aiosqlite.connect(self.path, isolation_level=None)
                db = self._db
                # a new file gets 16 KB pages (SQLite's default is 4 KB; an existing file keeps its own): a commit's
                # rows (~1 KB each) and states fill a quarter as many pages, each written to the WAL and again by the
                # checkpoint in one call instead of four (bench/README.md, fifteenth session)
                await db.execute("PRAGMA page_size=16384")
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute(f"PRAGMA synchronous={self.synchronous}")
                self._sync_now = self.synchronous
                await db.execute("PRAGMA busy_timeout=5000")
                # statement journals (a multi-row UPSERT or DELETE inside BEGIN) in memory, not in files created and
                # unlinked in /var/tmp by every transaction (~2,000 writes/s at 667 events/s; a full or read-only
                # /var/tmp, as in a container with a read-only root, would fail every commit)
                await db.execute("PRAGMA temp_store=MEMORY")
                # Debian's SQLite is built with SECURE_DELETE: every deleted row (each acknowledged event, each
                # superseded state) zeroed, and every page a delete frees written again, full of zeros, to the WAL and
                # by the checkpoint: ~a fifth of the store's page writes at the Node-RED peer's load. FAST zeroes a
                # deleted row only in a page that is written anyway (bench/README.md, twelfth session)
                await db.execute("PRAGMA secure_delete=FAST")
                await db.executescript(_SCHEMA)
                cols = {r[1] for r in await db.execute_fetchall("PRAGMA table_info(quarantine)")}
                if "outbox_id" not in cols:  # a file of schema version 1
                    await db.execute("ALTER TABLE quarantine ADD COLUMN outbox_id INTEGER")
                    log.info("store.migrated", path=self.path, schema=SCHEMA_VERSION)
            meta = dict(await db.execute_fetchall("SELECT key, value FROM meta"))
            if "epoch" not in meta and not self.readonly:
                meta = {"epoch": uuid.uuid4().hex, "next_seq": "1", "schema": str(SCHEMA_VERSION)}
                await db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
            if "epoch" not in meta:
                raise StoreError(f"{self.path} is not an edge-gateway store (no epoch)", kind="corrupt")
            if int(meta.get("schema") or 0) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer edge-gateway (store schema {meta['schema']}; "
                                 f"this version reads schema {SCHEMA_VERSION} and older): run that version, or "
                                 "start this one on a new store file", kind="other")
            await self._load_state_index(migrate=not self.readonly)
            if not self.readonly and meta.get("schema") != str(SCHEMA_VERSION):
                await db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self.epoch = meta["epoch"]
            self.next_seq = int(meta["next_seq"])
            cols = {r[1] for r in await db.execute_fetchall("PRAGMA table_info(quarantine)")}
            self._outbox_id_col = "outbox_id" if "outbox_id" in cols else "NULL"
            await self._recount()
            self._machine_last = {}
            self._machine_last_known = self.outbox_rows == 0
        except Exception as exc:
            if self._db is not None:
                await self._db.close()
                self._db = None
            self._release_lock()
            if isinstance(exc, StoreError):  # says what is wrong with the file already
                raise
            raise StoreError(f"cannot open store {self.path}: {exc}", kind=error_kind(exc)) from exc
        durable = self.readonly or self.synchronous in ("FULL", "EXTRA")
        (log.info if durable else log.warning)(
            "store.opened", path=self.path, epoch=self.epoch, next_seq=self.next_seq, pending=self.outbox_rows,
            quarantined=self.quarantined, synchronous=self.synchronous.lower(), readonly=self.readonly,
            **({} if durable else {"risk": "not durable against power loss: the last commits may roll back and an "
                                           "event already published can be re-derived with other content under the "
                                           "same id; store.synchronous: full avoids it"}))

    async def _load_state_index(self, *, migrate: bool) -> None:
        """Read ``state_log``'s ids (the latest row of each machine, the row count); ``migrate``: first move the rows
        of ``machine_state`` (a file of schema 1 or 2) into the log, in one transaction."""
        db = self.db
        tables = {r[0] for r in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if migrate and (await db.execute_fetchall("SELECT EXISTS (SELECT 1 FROM machine_state)"))[0][0]:
            def move(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO state_log(machine, state, updated) "
                             "SELECT machine, state, updated FROM machine_state ORDER BY rowid")
                conn.execute("DELETE FROM machine_state")

            await self._write(lambda: move, "moving machine_state to state_log")
            log.info("store.migrated", path=self.path, schema=SCHEMA_VERSION, moved="machine_state -> state_log")
        self._state_table = "state_log" if "state_log" in tables else "machine_state"  # read-only: an older file
        latest: dict[str, int] = {}
        rows = 0
        top = 0
        if self._state_table == "state_log":
            for row_id, machine in await db.execute_fetchall("SELECT id, machine FROM state_log ORDER BY id"):
                latest[machine] = row_id
                rows += 1
                top = row_id
        if migrate and rows > len(latest):
            # only each machine's last row counts. The others wait for a compaction, which comes once the rows
            # added since open reach a generation (_compaction): dropped here, or a gateway restarted often with
            # few commits in between would keep every row (tests/test_store_model.py: the log's bound across opens)
            def prune(conn: sqlite3.Connection) -> None:
                conn.execute(f"DELETE FROM state_log WHERE id NOT IN ({LAST_STATE_IDS_SQL})")

            await self._write(lambda: prune, "pruning state_log")
            rows = len(latest)
        self._state_ids = latest
        self._state_rows = rows
        self._state_next = top + 1
        self._state_gen = top + 1  # the rows below are the old generation (see _compaction)

    async def _recount(self) -> None:
        db = self.db
        (self.outbox_rows, size) = (await db.execute_fetchall(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"))[0]
        (self.quarantined, qsize) = (await db.execute_fetchall(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM quarantine"))[0]
        self.pending_bytes = int(size) + int(qsize)
        self.quarantined_bytes = int(qsize)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                await db.close()
            finally:
                self._release_lock()
        else:
            self._release_lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @property
    def pending(self) -> int:
        """Outbox rows not acknowledged by the broker: ``outbox_rows`` without the acknowledged ones that wait for
        their delete (``ack_later``; at most a second or so)."""
        return max(0, self.outbox_rows - len(self._ack_ids))

    @property
    def full(self) -> bool:
        return self.disk_full or (self.max_bytes is not None and self.pending_bytes >= self.max_bytes)

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A read under the transaction lock: never inside another task's open transaction."""
        db = self.db
        async with self._tx:
            return list(await db.execute_fetchall(sql, params))

    async def _write(self, prepare: Callable[[], Callable[[sqlite3.Connection], Apply | None]], what: str, *,
                     committed_point: str | None = None, durable: bool = True) -> Any:
        """Run one transaction; translate failures, remember a full disk.

        ``prepare()`` is called under the lock on the event loop's thread: it reads what the transaction needs from
        the store and returns its statements as one plain function of the sqlite3 connection, run on SQLite's
        thread together with the pragma, BEGIN and COMMIT (``_begin_then``): a transaction is one round trip to that
        thread instead of one per statement, each of which waits for the event loop to come round again when it is
        busy (bench/README.md, sixteenth and seventeenth sessions). That function must not touch what the event
        loop's tasks change. It may return a function that updates the in-memory counters; that runs on the loop's
        thread only after COMMIT succeeded (still under the lock) and its result is returned. A cancellation while
        the transaction runs on SQLite's thread waits for its outcome first (it may commit all the same), so the
        counters follow what is on disk either way. With a ``before_commit`` hook (tests: a failure, a cancellation
        or a PUBACK between the statements and COMMIT) COMMIT is a second call, after the hook.
        ``durable=False`` (acknowledged deletes) runs the transaction with ``synchronous=NORMAL`` whatever
        ``store.synchronous`` says: no fsync of its own; the next durable commit syncs it with its own."""
        db = self.db
        async with self._tx:
            apply: Apply | None = None
            cancelled: BaseException | None = None

            async def outcome(call: asyncio.Future[Any]) -> Any:
                # the call runs on in SQLite's thread whatever happens here: on a cancellation learn how it ended
                nonlocal cancelled
                while True:
                    try:
                        return await asyncio.shield(call)
                    except asyncio.CancelledError as exc:
                        if call.done():
                            if call.cancelled():
                                # the call's own task was cancelled (the event loop shutting down cancels every
                                # task): its outcome cannot be learnt here any more; waiting for it again would
                                # spin for ever. The counters are read from the file at the next open.
                                raise
                            return call.result()  # raises the call's own error
                        cancelled = exc

            try:
                want = self.synchronous if durable else "NORMAL"
                hook = self.before_commit
                call = asyncio.ensure_future(_in_thread(db, _begin_then, None if want == self._sync_now else want,
                                                        prepare(), hook is None))
                # without a hook COMMIT is in the call, which may have committed when cancelled; with one a
                # cancellation here leaves the transaction open (rolled back below)
                apply = await (outcome(call) if hook is None else call)
                self._sync_now = want
                if hook is not None:
                    await hook()
                    await outcome(asyncio.ensure_future(db.execute("COMMIT")))
            except BaseException as exc:
                # also on cancellation (gateway stop): never leave the transaction open for the next writer
                rollback = asyncio.ensure_future(db.execute("ROLLBACK"))
                # its error is secondary (e.g. no transaction yet: cancelled before BEGIN ran); retrieved here even
                # when this task is cancelled again while it waits (else asyncio logs "exception never retrieved")
                rollback.add_done_callback(lambda f: f.cancelled() or f.exception())
                try:
                    await asyncio.shield(rollback)
                except BaseException:  # noqa: BLE001 - the rollback error is secondary (no transaction left)
                    pass
                if not isinstance(exc, Exception):
                    raise
                err = StoreError(f"{what} failed: {exc}", kind=error_kind(exc))
                self.last_error = err
                self.consecutive_failures += 1
                if err.kind == "disk_full":
                    self.disk_full = True
                if cancelled is not None:
                    raise cancelled from err
                raise err from exc
            self.disk_full = False
            self.last_error = None
            self.consecutive_failures = 0
            result = apply() if apply is not None else None
        if committed_point is not None:
            crash_point(committed_point)
        if cancelled is not None:
            raise cancelled
        return result

    # ------------------------------------------------------------------ state + outbox
    async def load_states(self) -> dict[str, dict[str, Any]]:
        """Each machine's last committed snapshot."""
        if self._state_table == "machine_state":
            rows = await self._read("SELECT machine, state FROM machine_state")
        else:
            rows = await self._read("SELECT machine, state FROM state_log "
                                    f"WHERE id IN ({LAST_STATE_IDS_SQL})")
        return {m: json.loads(s) for m, s in rows}

    async def commit(self, states: dict[str, dict[str, Any] | str], rows: list[OutboxRow],
                     next_seq: int) -> list[PendingRow]:
        """Write snapshots (a dict, or its JSON text: ``MachineEngine.snapshot_json``), outbox rows and the sequence
        counter in one transaction, which also deletes the acknowledged rows handed to ``ack_later``; return the
        committed rows with their outbox ids (consecutive, in the order given). On ``StoreError`` nothing was
        written (nor deleted)."""
        now = time.time()
        deleted: list[int] = []

        def prepare() -> Callable[[sqlite3.Connection], Apply]:
            # under the transaction lock, on the event loop's thread (the body runs on SQLite's): the acknowledged
            # rows handed over so far, whether the state log is due for a compaction and which rows it copies
            taken, ack_ids = self._acks_to_delete()
            compaction = None
            if states and self._state_next - self._state_gen >= len(self._state_ids) + self.state_log_slack:
                compaction = self._compaction(states)
            next_id = self._state_next if compaction is None else compaction[0]
            write_seq = next_seq != self.next_seq
            # the statements' parameters too: the caller's dict and list are not read on another thread
            state_params = [(next_id + i, m, s if isinstance(s, str) else json.dumps(s, separators=(",", ":")), now)
                            for i, (m, s) in enumerate(states.items())]
            row_params = [(r.seq, r.machine, r.type, r.topic, r.payload, now) for r in rows]

            def tx(conn: sqlite3.Connection) -> Apply:
                gone, gone_bytes = _delete_rows(conn, ack_ids)
                removed = 0 if compaction is None else _compact_states(conn, *compaction[1:])
                if state_params:
                    conn.executemany("INSERT INTO state_log(id, machine, state, updated) VALUES (?, ?, ?, ?)",
                                     state_params)
                first = 0
                if row_params:
                    conn.executemany(
                        "INSERT INTO outbox(seq, machine, type, topic, payload, created) VALUES (?, ?, ?, ?, ?, ?)",
                        row_params)
                    # AUTOINCREMENT gives each new row max(sqlite_sequence, max id) + 1 and records it in
                    # sqlite_sequence: the rows of this (only) writer's transaction got the last len(rows) ids
                    ((last,),) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchall()
                    first = int(last) - len(row_params) + 1
                    crash_point("store.inserted")
                if write_seq:
                    conn.execute("UPDATE meta SET value=? WHERE key='next_seq'", (str(next_seq),))
                return lambda: apply(taken, gone, gone_bytes, compaction, removed, next_id, first)

            return tx

        def apply(taken: int, gone: int, gone_bytes: int, compaction: Any, removed: int, next_id: int,
                  first: int) -> list[PendingRow]:
            if taken:
                self._acks_deleted(taken, gone, gone_bytes, now)
                deleted.append(taken)
            if compaction is not None:
                nxt, copies = compaction[0], compaction[1]
                self._state_next = self._state_gen = nxt
                self._state_rows += len(copies) - removed
                self._state_ids.update(copies)
            if states:
                ids = self._state_ids
                for i, m in enumerate(states, next_id):
                    ids[m] = i
                self._state_next = next_id + len(states)
                self._state_rows += len(states)
            self.next_seq = next_seq
            self.outbox_rows += len(rows)
            self.pending_bytes += sum(len(r.payload) for r in rows)
            last = self._machine_last
            for i, r in enumerate(rows, first):  # ascending ids: each machine's entry ends at its highest
                last[r.machine] = i
            return [PendingRow(first + i, r.topic, r.payload, r.machine, r.seq) for i, r in enumerate(rows)]

        committed = await self._write(prepare, "commit", committed_point="store.committed")
        if deleted:
            crash_point("store.deleted")  # with the acknowledged rows it deleted
        return committed

    def _compaction(self, states: dict[str, Any]) -> tuple[int, dict[str, int], list[tuple[int, int]], int]:
        """A compaction of ``state_log`` inside the next commit's transaction (``_compact_states``, which runs it):
        the rows below the current generation (``_state_gen``) go. The last row of a machine that has written none
        since (idle), unless this commit writes it anew, is first copied to the end of the log; every other row
        down there has a later one. Returns the log's next id after the copies (the new generation's first), the
        copies' ids by machine, the (new id, old id) pairs to copy and the generation's first id.

        Appending the states instead of updating one row per machine writes a commit's states to a few adjacent
        pages, not one page each (a report's machine is anywhere in the table): bench/README.md, twelfth session.
        A compaction runs once ``len(machines) + state_log_slack`` rows have been added since the last one and
        copies at most one row per machine, so a state costs at most two row writes, and machines that report
        between two compactions are never copied. The log holds at most 2 × (machines + slack + the largest
        commit's states) + machines rows (tests/test_store_model.py checks it after every step)."""
        gen = self._state_gen
        old = [(m, i) for m, i in self._state_ids.items() if i < gen and m not in states]
        nxt = self._state_next
        copies = {m: nxt + k for k, (m, _) in enumerate(old)}
        return nxt + len(old), copies, [(copies[m], i) for m, i in old], gen

    async def oldest_unacked_created(self) -> float | None:
        """Commit time (wall clock) of the oldest outbox row not acknowledged by the broker (the acknowledged ones
        waiting for their delete are skipped), or None: one read of the first rows by primary key."""
        skip = self.acks_waiting_ids
        return first_unacked_created(await self._read(OLDEST_ROWS_SQL, (len(skip) + 1,)), skip)

    @property
    def acks_waiting_ids(self) -> frozenset[int]:
        return frozenset(self._ack_ids)

    async def max_id(self) -> int:
        (n,) = (await self._read("SELECT COALESCE(MAX(id), 0) FROM outbox"))[0]
        return int(n)

    async def fetch(self, after_id: int, limit: int, upto_id: int | None = None) -> list[PendingRow]:
        """Committed rows with ``after_id < id [<= upto_id]``, in id order."""
        if upto_id is None:
            rows = await self._read(
                "SELECT id, topic, payload, machine, seq FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit))
        else:
            rows = await self._read(
                "SELECT id, topic, payload, machine, seq FROM outbox WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (after_id, upto_id, limit))
        return [PendingRow(i, t, bytes(p), m, s) for i, t, p, m, s in rows]

    def ack_later(self, ids: Iterable[int]) -> None:
        """Acknowledged rows (ids) to delete with the next commit's transaction, or by the next ``ack()``. Until
        then they stay in the outbox and in ``pending``: a crash before sends them again (same id, same content: a
        duplicate the consumer drops). Nothing waits here; the publisher calls ``ack()`` when no commit came."""
        if not self._ack_ids:
            self.acks_since = time.monotonic()
        self._ack_ids.extend(ids)

    @property
    def acks_waiting(self) -> int:
        """Acknowledged rows handed to ``ack_later`` and not deleted yet (a transaction running now may be deleting
        them: ``busy``)."""
        return len(self._ack_ids)

    @property
    def busy(self) -> bool:
        """A transaction or read runs now."""
        return self._tx.locked()

    def _acks_to_delete(self) -> tuple[int, list[int]]:
        """The acknowledged rows handed to ``ack_later`` so far, for a transaction to delete (``_delete_rows``): how
        many of ``_ack_ids`` it takes (removed from the list by the transaction's ``apply``, only after COMMIT; more
        may be handed over while it runs) and their ids, copied here on the event loop's thread."""
        taken = len(self._ack_ids)
        return taken, self._ack_ids[:taken]

    def _acks_deleted(self, taken: int, n: int, size: int, now: float, given: int = 0) -> None:
        """After the COMMIT of a transaction that deleted ``_acks_to_delete``'s rows."""
        del self._ack_ids[:taken]
        if self._ack_ids:  # handed over while this transaction ran
            self.acks_since = time.monotonic()
        self.outbox_rows -= n
        self.pending_bytes -= size
        self.acked_total += taken + given
        self.acked_at = now

    async def ack(self, acked: Iterable[tuple[int, int] | int] = ()) -> int:
        """Delete acknowledged rows, given as ids or ``(id, payload_size)`` pairs (the size is not trusted: the
        counters move by what the DELETE removed), with those handed to ``ack_later``. Returns the number of rows
        deleted."""
        ids = [a[0] if isinstance(a, tuple) else int(a) for a in acked]
        if not ids and not self._ack_ids:
            return 0

        def prepare() -> Callable[[sqlite3.Connection], Apply]:
            taken, waiting = self._acks_to_delete()  # under the transaction lock

            def tx(conn: sqlite3.Connection) -> Apply:
                n, size = _delete_rows(conn, waiting + ids)

                def apply() -> int:
                    self._acks_deleted(taken, n, size, time.time(), given=len(ids))
                    return n

                return apply

            return tx

        # not synced: a delete lost to a power loss only sends the event again, same id, same content (a duplicate)
        n = await self._write(prepare, "ack", durable=False)
        crash_point("store.deleted")
        return int(n)

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

        found = await asyncio.to_thread(scan)
        if not self._machine_last_known:
            # the rows that were in the file at open and are still there have ids <= upto_id (the outbox's highest
            # at some moment since open: rows are only added above it, or put back by retry_quarantined, which
            # records them): with the rows inserted since, the entries now cover the whole outbox
            last = self._machine_last
            for m, i in found.items():
                if i > last.get(m, 0):
                    last[m] = i
            self._machine_last_known = True
        return found

    async def backlog_bounds(self) -> tuple[int, dict[str, int] | None]:
        """The outbox's highest id (0: empty) and, per machine that may have rows up to it, an id at least as high
        as its highest row there (capped at that id), or None when not known yet (a store opened with rows and not
        scanned since: ``last_ids_by_machine``). An upper bound: a machine whose rows were all deleted since may be
        in it, never is one with rows left out. Read under the transaction lock: no commit half counted."""
        async with self._tx:
            ((lo, hi),) = await self.db.execute_fetchall(
                "SELECT COALESCE(MIN(id), 0), COALESCE(MAX(id), 0) FROM outbox")
            if not self._machine_last_known:
                return int(hi), None
            return int(hi), {m: min(i, hi) for m, i in self._machine_last.items() if hi and i >= lo}

    async def count_pending(self) -> int:
        (n,) = (await self._read("SELECT COUNT(*) FROM outbox"))[0]
        return int(n)

    # ------------------------------------------------------------------ quarantine
    async def quarantine(self, row_id: int, reason: str) -> bool:
        """Move an outbox row to the quarantine (keeping its outbox id for a retry). Returns False when the row is
        gone (already acked, quarantined or purged)."""

        def tx(conn: sqlite3.Connection) -> Apply:
            gone = conn.execute(
                "DELETE FROM outbox WHERE id = ? RETURNING seq, machine, type, topic, payload", (row_id,)).fetchall()
            for seq, machine, type_, topic, payload in gone:
                conn.execute(
                    "INSERT INTO quarantine(seq, machine, type, topic, payload, reason, at, outbox_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, machine, type_, topic, payload, reason, time.time(), row_id))

            def apply() -> bool:
                self.outbox_rows -= len(gone)
                self.quarantined += len(gone)  # bytes stay: pending_bytes counts outbox + quarantine
                self.quarantined_bytes += sum(len(g[4]) for g in gone)
                return bool(gone)

            return apply

        return bool(await self._write(lambda: tx, "quarantine"))

    async def quarantine_external(self, *, seq: int | None, machine: str, type: str, topic: str, payload: bytes,
                                  reason: str) -> None:
        """Quarantine an event that already left the outbox (the ERP rejected it after delivery). It has no outbox
        id: a retry puts it at the end of the outbox. Idempotent: the same event (machine, seq and content) already
        there is not added again (a rejection written once more after a stop cut the first write's answer short, or
        an ack the ERP sent twice)."""

        def tx(conn: sqlite3.Connection) -> Apply:
            cur = conn.execute(
                "INSERT INTO quarantine(seq, machine, type, topic, payload, reason, at) SELECT ?, ?, ?, ?, ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM quarantine WHERE machine = ? AND seq IS ? AND payload = ?)",
                (seq, machine, type, topic, payload, reason, time.time(), machine, seq, payload))
            added = cur.rowcount

            def apply() -> None:
                if added:
                    self.quarantined += 1
                    self.pending_bytes += len(payload)
                    self.quarantined_bytes += len(payload)

            return apply

        await self._write(lambda: tx, "quarantine")

    # ------------------------------------------------------------------ operator tools (edge-gateway buffer)
    async def list_rows(self, table: str, limit: int = 100) -> list[dict[str, Any]]:
        if table == "quarantine":
            rows = await self._read(
                f"SELECT qid, seq, machine, type, topic, LENGTH(payload), reason, at, {self._outbox_id_col} "
                "FROM quarantine ORDER BY qid LIMIT ?", (limit,))
            return [dict(zip(("id", "seq", "machine", "type", "topic", "bytes", "reason", "at", "outbox_id"), r))
                    for r in rows]
        rows = await self._read(
            "SELECT id, seq, machine, type, topic, LENGTH(payload), created FROM outbox ORDER BY id LIMIT ?", (limit,))
        return [dict(zip(("id", "seq", "machine", "type", "topic", "bytes", "created"), r)) for r in rows]

    async def count_quarantined_by_erp(self) -> int:
        """Quarantined rows the ERP rejected (``quarantine_external`` with a reason starting ``ERP:``)."""
        rows = await self._read("SELECT count(*) FROM quarantine WHERE reason LIKE 'ERP:%'")
        return int(rows[0][0])

    async def export_rows(self, table: str) -> list[dict[str, Any]]:
        if table == "quarantine":
            rows = await self._read(
                f"SELECT qid, seq, machine, type, topic, payload, reason, {self._outbox_id_col} "
                "FROM quarantine ORDER BY qid")
            keys: tuple[str, ...] = ("id", "seq", "machine", "type", "topic", "payload", "reason", "outbox_id")
        else:
            rows = await self._read("SELECT id, seq, machine, type, topic, payload FROM outbox ORDER BY id")
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
        """Move quarantined rows (all, or the given quarantine ids) back to the outbox, in quarantine order. A row
        that came from the outbox goes back under its original outbox id (and seq), so it is published in its
        original place among its machine's rows; a row quarantined from outside (no outbox id) goes to the end."""
        where = "" if ids is None else f" WHERE qid IN ({','.join('?' * len(ids))})"
        params = () if ids is None else tuple(ids)

        def tx(conn: sqlite3.Connection) -> Apply:
            gone = sorted(conn.execute(
                f"DELETE FROM quarantine{where} RETURNING qid, seq, machine, type, topic, payload, outbox_id",
                params).fetchall())
            now = time.time()
            placed: list[tuple[str, int]] = []  # (machine, outbox id) of each row put back
            for _qid, seq, machine, type_, topic, payload, outbox_id in gone:
                values = (seq if seq is not None else 0, machine, type_, topic, payload, now)
                if outbox_id is not None and not conn.execute(
                        "SELECT 1 FROM outbox WHERE id = ?", (outbox_id,)).fetchall():
                    conn.execute("INSERT INTO outbox(id, seq, machine, type, topic, payload, created) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (outbox_id, *values))
                    placed.append((machine, int(outbox_id)))
                else:
                    cur = conn.execute("INSERT INTO outbox(seq, machine, type, topic, payload, created) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", values)
                    placed.append((machine, int(cur.lastrowid)))  # type: ignore[arg-type]

            def apply() -> int:
                last = self._machine_last
                for m, i in placed:
                    if i > last.get(m, 0):
                        last[m] = i
                self.quarantined -= len(gone)
                self.outbox_rows += len(gone)  # bytes stay: pending_bytes counts outbox + quarantine
                self.quarantined_bytes -= sum(len(g[5]) for g in gone)
                return len(gone)

            return apply

        return int(await self._write(lambda: tx, "retry"))

    async def purge(self, table: str, ids: list[int] | None = None) -> int:
        """Delete outbox or quarantine rows for good (all, or the given ids). Returns the number deleted."""
        if table not in ("outbox", "quarantine"):
            raise ValueError(f"unknown table {table!r}")
        key = "qid" if table == "quarantine" else "id"
        where = "" if ids is None else f" WHERE {key} IN ({','.join('?' * len(ids))})"
        params = () if ids is None else tuple(ids)

        def tx(conn: sqlite3.Connection) -> Apply:
            gone = conn.execute(f"DELETE FROM {table}{where} RETURNING LENGTH(payload)", params).fetchall()
            n, size = len(gone), sum(int(s) for (s,) in gone)

            def apply() -> int:
                if table == "quarantine":
                    self.quarantined -= n
                    self.quarantined_bytes -= size
                else:
                    self.outbox_rows -= n
                self.pending_bytes -= size
                return n

            return apply

        return int(await self._write(lambda: tx, "purge"))

    async def missing_ids(self, table: str, ids: list[int]) -> list[int]:
        """The ids of ``ids`` that are not rows of ``table`` ("outbox" ids, or "quarantine" ids), in the given
        order: ``buffer retry|purge --ids`` refuses them by name instead of silently changing nothing."""
        if table not in ("outbox", "quarantine"):
            raise ValueError(f"unknown table {table!r}")
        key = "qid" if table == "quarantine" else "id"
        have: set[int] = set()
        for chunk in _chunks(sorted(set(ids))):
            rows = await self._read(f"SELECT {key} FROM {table} WHERE {key} IN ({','.join('?' * len(chunk))})",
                                    tuple(chunk))
            have.update(int(r[0]) for r in rows)
        return [i for i in ids if i not in have]
