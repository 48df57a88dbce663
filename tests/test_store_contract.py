"""The outbox's durability and identity contract (the docstring at the top of gateway/store.py), against real
SQLite files and real processes: only committed rows are visible, commit() returns what it committed, counters
equal the database, retried rows keep their place, one gateway per store, relative store paths, power loss with
synchronous=full, and classified commit failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from gateway.config import StoreConfig, load_config
from gateway.exporter import oldest_pending_created
from gateway.store import OutboxRow, PendingRow, Store, StoreError, StoreLocked
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def rows_for(machine: str, seqs: range, size: int = 40) -> list[OutboxRow]:
    return [OutboxRow(s, machine, "t", f"t/{machine}", f'{{"seq":{s},"pad":"{"x" * size}"}}'.encode()) for s in seqs]


async def db_counts(store: Store) -> tuple[int, int, int]:
    """(COUNT outbox, SUM LENGTH outbox + quarantine, COUNT quarantine), straight from the file."""
    with sqlite3.connect(store.path) as c:
        n, b = c.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        qn, qb = c.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM quarantine").fetchone()
    return n, b + qb, qn


async def assert_counters_true(store: Store) -> None:
    assert (store.outbox_rows, store.pending_bytes, store.quarantined) == await db_counts(store)


# --- 1. only committed rows are visible ---------------------------------------------------------------------------

async def test_reads_never_see_rows_of_a_commit_that_fails_at_commit(tmp_path):
    """The INSERT succeeded, COMMIT fails (as SQLITE_FULL does at COMMIT): a fetch / max_id / count running
    meanwhile on the same connection must not return the rows that are then rolled back."""
    async with Store(str(tmp_path / "s.db")) as store:
        kept = await store.commit({}, rows_for("m1", range(1, 3)), 3)
        inserted, reads = asyncio.Event(), {}

        async def fail_at_commit():
            inserted.set()
            # let the readers run while the rows are inserted but not committed; they either finish (and would have
            # seen the rows) or queue on the store's lock
            await wait_until(lambda: all(t.done() or store._tx._waiters for t in reads.values()) and reads, 10)
            raise sqlite3.OperationalError("database or disk is full")

        store.before_commit = fail_at_commit
        committing = asyncio.create_task(store.commit({}, rows_for("m1", range(3, 8)), 8))
        await asyncio.wait_for(inserted.wait(), 10)
        reads["fetch"] = asyncio.create_task(store.fetch(0, 100))
        reads["max_id"] = asyncio.create_task(store.max_id())
        reads["count"] = asyncio.create_task(store.count_pending())
        with pytest.raises(StoreError) as err:
            await committing
        assert err.value.kind == "disk_full"
        assert await reads["fetch"] == kept
        assert await reads["max_id"] == kept[-1].id
        assert await reads["count"] == 2
        store.before_commit = None
        await assert_counters_true(store)


# --- 3. commit() returns the committed rows ----------------------------------------------------------------------

async def test_commit_returns_the_committed_rows_with_their_ids(tmp_path):
    async with Store(str(tmp_path / "s.db")) as store:
        a = await store.commit({"m1": {"n": 1}}, rows_for("m1", range(1, 4)), 4)
        assert await store.commit({"m1": {"n": 2}}, [], 4) == []
        b = await store.commit({}, rows_for("m2", range(4, 6)), 6)
        assert [r.id for r in a + b] == [1, 2, 3, 4, 5]
        assert [(r.machine, r.seq, r.topic) for r in a + b] == [("m1", 1, "t/m1"), ("m1", 2, "t/m1"),
                                                                ("m1", 3, "t/m1"), ("m2", 4, "t/m2"), ("m2", 5, "t/m2")]
        assert [r.payload for r in a + b] == [r.payload for r in rows_for("m1", range(1, 4)) + rows_for("m2", range(4, 6))]
        assert await store.fetch(0, 100) == a + b  # fetch fills machine and seq too
        assert PendingRow(7, "t", b"p") == PendingRow(7, "t", b"p", "", 0)  # old three-field form still works


# --- 4. counters cannot drift --------------------------------------------------------------------------------------

async def test_acks_of_gone_rows_do_not_move_the_counters(tmp_path):
    async with Store(str(tmp_path / "s.db")) as store:
        await store.commit({}, rows_for("m1", range(1, 11)), 11)
        rows = await store.fetch(0, 100)
        await store.ack([(r.id, len(r.payload)) for r in rows[:3]])
        await assert_counters_true(store)
        await store.ack([(r.id, len(r.payload)) for r in rows[:3]])  # the same PUBACKs again (late duplicates)
        await assert_counters_true(store)
        assert await store.quarantine(rows[4].id, "poison")
        await store.ack([(rows[4].id, len(rows[4].payload))])  # a PUBACK for a row quarantined meanwhile
        await assert_counters_true(store)
        assert store.quarantined == 1
        assert await store.purge("outbox", [rows[6].id]) == 1
        await store.ack([(rows[6].id, len(rows[6].payload))])  # purged by the operator, then acked
        await assert_counters_true(store)
        await store.ack([(rows[7].id, 99999)])  # a wrong size given with a real ack
        await assert_counters_true(store)
        assert [r.id for r in await store.fetch(0, 100)] == [rows[i].id for i in (3, 5, 8, 9)]
        assert await store.purge("quarantine") == 1
        await assert_counters_true(store)


async def test_acks_handed_over_are_deleted_by_the_next_commit_and_none_handed_during_it_is_lost(tmp_path):
    """The publisher hands PUBACKs to ``ack_later``; the core's next commit deletes them in its own transaction.
    PUBACKs handed while that commit runs wait for the next one; a commit that fails deletes none."""
    async with Store(str(tmp_path / "s.db")) as store:
        first = await store.commit({}, rows_for("m1", range(1, 3)), 3)
        first += await store.commit({}, rows_for("m1", range(3, 7)), 7)
        created = {i: c for i, c in sqlite3.connect(store.path).execute("SELECT id, created FROM outbox")}
        assert created[first[0].id] < created[first[2].id]
        store.ack_later([first[0].id, first[1].id])
        # the oldest event not acknowledged (health, status page, metrics) is the first of the second commit
        assert await store.oldest_unacked_created() == created[first[2].id]
        assert oldest_pending_created(store.path, store.acks_waiting_ids) == created[first[2].id]
        assert oldest_pending_created(store.path) == created[first[0].id]
        # nothing deleted yet; not pending any more (the broker has them)
        assert store.acks_waiting == 2 and store.outbox_rows == 6 and store.pending == 4

        async def puback_during_commit():
            store.ack_later([first[2].id])
        store.before_commit = puback_during_commit
        more = await store.commit({"m1": {"n": 1}}, rows_for("m1", range(7, 9)), 9)
        store.before_commit = None
        await assert_counters_true(store)
        assert [r.id for r in await store.fetch(0, 100)] == [r.id for r in first[2:] + more]
        assert store.acks_waiting == 1 and store.acked_total == 2

        async def fail():
            raise OSError(28, "No space left on device")
        store.before_commit = fail
        with pytest.raises(StoreError):
            await store.commit({}, rows_for("m1", range(9, 10)), 10)
        store.before_commit = None
        assert store.acks_waiting == 1
        await assert_counters_true(store)
        assert await store.ack([first[3].id]) == 2  # the one still waiting and the one given
        assert store.acks_waiting == 0 and store.acked_total == 4
        assert [r.id for r in await store.fetch(0, 100)] == [r.id for r in first[4:] + more]
        await assert_counters_true(store)


async def test_a_commit_cancelled_while_it_runs_in_sqlites_thread_is_kept_with_its_counters(tmp_path, monkeypatch):
    """Without a hook, BEGIN, the statements and COMMIT are one call on SQLite's thread: a cancellation (the gateway
    stopping) that arrives while that call is queued or running cannot stop it, and it commits. The store waits for
    it, applies the counters of what is on disk, then re-raises; a ROLLBACK sent instead would find no transaction
    and leave next_seq and the counters behind the file (a later commit reusing sequence numbers)."""
    from gateway import store as store_mod

    started, release = threading.Event(), threading.Event()
    real = store_mod._begin_then

    def held(conn, synchronous, body, commit):
        started.set()
        assert release.wait(10), "the test did not release SQLite's thread"
        return real(conn, synchronous, body, commit)

    async with Store(str(tmp_path / "s.db")) as store:
        monkeypatch.setattr(store_mod, "_begin_then", held)
        task = asyncio.create_task(store.commit({"m1": {"n": 1}}, rows_for("m1", range(1, 4)), 4))
        assert await asyncio.to_thread(started.wait, 10), "the commit never reached SQLite's thread"
        task.cancel()
        await asyncio.sleep(0)  # the cancellation is delivered while the call still waits in SQLite's thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(store_mod, "_begin_then", real)
        assert [(r.seq, r.machine) for r in await store.fetch(0, 100)] == [(1, "m1"), (2, "m1"), (3, "m1")]
        assert store.next_seq == 4
        assert await store.load_states() == {"m1": {"n": 1}}
        await assert_counters_true(store)
        again = await store.commit({}, rows_for("m1", range(4, 5)), 5)
        assert [r.seq for r in again] == [4] and again[0].id == 4


_LOOP_SHUTDOWN_SCRIPT = """
import asyncio, sys, threading
from gateway import store as store_mod
from gateway.store import OutboxRow, Store

async def main(path):
    started, release = threading.Event(), threading.Event()
    real = store_mod._begin_then

    def held(conn, synchronous, body, commit):
        started.set()
        release.wait(10)
        return real(conn, synchronous, body, commit)

    store = Store(path)
    await store.open()
    store_mod._begin_then = held
    task = asyncio.create_task(store.commit({"m1": {"n": 1}}, [OutboxRow(1, "m1", "x", "t/m1/events/x", b"{}")], 2))
    assert await asyncio.to_thread(started.wait, 10)
    for t in asyncio.all_tasks():  # what asyncio.run does to the tasks still running when its coroutine ends
        if t is not asyncio.current_task():
            t.cancel()
    await asyncio.sleep(0)
    release.set()
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.CancelledError:
        print("commit cancelled", flush=True)
    store_mod._begin_then = real
    await store.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_commit_whose_own_call_is_cancelled_by_the_loops_shutdown_ends(tmp_path):
    """When the event loop shuts down (``asyncio.run`` cancels every task left, e.g. after the stop's grace period)
    the task running the transaction's call is cancelled too, and its outcome can no longer be learnt. The commit
    must end with the cancellation, not wait for that call again: awaiting a cancelled call raised at once, for
    ever, and the process hung without yielding to its loop (red before: this script never ended). What the
    thread committed meanwhile is on disk and the next open reads it."""
    path = tmp_path / "s.db"
    r = subprocess.run([sys.executable, "-c", _LOOP_SHUTDOWN_SCRIPT, str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "commit cancelled" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])
    async with Store(str(path)) as store:
        assert [(r.seq, r.machine) for r in await store.fetch(0, 10)] == [(1, "m1")]
        assert store.next_seq == 2
        assert await store.load_states() == {"m1": {"n": 1}}
        await assert_counters_true(store)


async def test_a_commit_cancelled_during_commit_keeps_the_counters_true(tmp_path):
    """The gateway stops (its task is cancelled) while COMMIT runs in SQLite's thread: COMMIT may still succeed.
    The store waits for its outcome, so the counters and next_seq follow what is on disk, then re-raises."""
    async with Store(str(tmp_path / "s.db")) as store:
        task: list[asyncio.Task] = []

        async def cancel_during_commit():
            asyncio.get_running_loop().call_soon(task[0].cancel)  # lands on the await of COMMIT

        store.before_commit = cancel_during_commit
        task.append(asyncio.create_task(store.commit({"m1": {"n": 1}}, rows_for("m1", range(1, 4)), 4)))
        with pytest.raises(asyncio.CancelledError):
            await task[0]
        store.before_commit = None
        on_disk = await store.fetch(0, 100)
        await assert_counters_true(store)
        assert store.next_seq == (4 if on_disk else 1)
        assert [r.seq for r in on_disk] in ([1, 2, 3], [])
        again = await store.commit({}, rows_for("m1", range(store.next_seq, store.next_seq + 1)), store.next_seq + 1)
        assert again[0].id == len(on_disk) + 1
        await assert_counters_true(store)


# --- 5. retry keeps the original place ---------------------------------------------------------------------------

async def test_retry_puts_a_row_back_in_its_original_place_with_its_seq(tmp_path):
    async with Store(str(tmp_path / "s.db")) as store:
        await store.commit({}, rows_for("m1", range(1, 4)) + rows_for("m2", range(4, 5)) + rows_for("m1", range(5, 7)),
                           7)
        before = await store.fetch(0, 100)
        poison = before[1]  # m1, seq 2
        assert await store.quarantine(poison.id, "broker refused")
        await store.quarantine_external(seq=None, machine="m2", type="t", topic="t/m2", payload=b'{"erp":1}',
                                        reason="ERP rejected")
        assert await store.retry_quarantined() == 2
        after = await store.fetch(0, 100)
        assert after[:len(before)] == before  # the retried row is back between seq 1 and 3 of m1, same id and seq
        assert [r.seq for r in after if r.machine == "m1"] == [1, 2, 3, 5, 6]
        ext = after[-1]  # a row from outside has no outbox id: it goes to the end, under a new id
        assert (ext.payload, ext.seq, ext.machine) == (b'{"erp":1}', 0, "m2") and ext.id > before[-1].id
        await assert_counters_true(store)


async def test_schema_1_file_is_migrated_and_its_quarantine_retries_to_the_end(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:  # a store written by the previous version
        c.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE machine_state (machine TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL);
            CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, machine TEXT NOT NULL,
                type TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL);
            CREATE TABLE quarantine (qid INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER, machine TEXT NOT NULL,
                type TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
            INSERT INTO meta VALUES ('epoch', 'e1'), ('next_seq', '9'), ('schema', '1');
            INSERT INTO outbox VALUES (5, 8, 'm1', 't', 't/m1', x'7b7d', 0);
            INSERT INTO quarantine VALUES (1, 3, 'm1', 't', 't/m1', x'5b5d', 'old', 0);
            INSERT INTO machine_state VALUES ('m1', '{"n":1}', 0), ('m2', '{"n":2}', 0);
        """)
    async with Store(str(path), readonly=True) as ro:  # read-only on a schema-1 file: listing works
        assert (await ro.list_rows("quarantine"))[0]["outbox_id"] is None
        assert await ro.load_states() == {"m1": {"n": 1}, "m2": {"n": 2}}
    async with Store(str(path)) as store:
        assert (store.epoch, store.next_seq, store.pending, store.quarantined) == ("e1", 9, 1, 1)
        assert await store.retry_quarantined() == 1
        assert [(r.id, r.seq, r.payload) for r in await store.fetch(0, 10)] == [(5, 8, b"{}"), (6, 3, b"[]")]
        assert await store.load_states() == {"m1": {"n": 1}, "m2": {"n": 2}}  # moved to state_log
        await store.commit({"m2": {"n": 3}}, [], 9)
    async with Store(str(path)) as again:
        assert await again.load_states() == {"m1": {"n": 1}, "m2": {"n": 3}}
    with sqlite3.connect(path) as c:
        assert "outbox_id" in [r[1] for r in c.execute("PRAGMA table_info(quarantine)")]
        assert c.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("3",)
        assert c.execute("SELECT COUNT(*) FROM machine_state").fetchone() == (0,)


async def test_a_store_of_a_newer_schema_is_refused_unchanged(tmp_path):
    """A store written by a newer edge-gateway (an upgrade rolled back) is not opened: this version would not know
    where the newer one keeps the machine states, and would start every machine afresh. Its schema mark stays."""
    path = str(tmp_path / "s.db")
    async with Store(path) as store:
        await store.commit({"m1": {"n": 1}}, [], 1)
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    for readonly in (False, True):
        with pytest.raises(StoreError) as err:
            await Store(path, readonly=readonly).open()
        assert "was written by a newer edge-gateway (store schema 99; this version reads schema 3" in str(err.value)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("99",)


# --- 5b. machine snapshots: appended, compacted, the last one per machine -----------------------------------------

async def test_snapshots_are_appended_next_to_each_other_and_compacted_keeping_idle_machines(tmp_path):
    """A commit's snapshots are appended to state_log as consecutive rows (a few adjacent pages, not one page per
    machine); compaction drops superseded rows and copies forward the last row of a machine that wrote none since
    the last compaction, so the log stays within two generations and every machine loads its last snapshot."""
    path = str(tmp_path / "s.db")
    async with Store(path) as store:
        store.state_log_slack = 4
        await store.commit({"idle": {"n": 0}, "quiet": {"n": 0}}, [], 1)
        want = {"idle": {"n": 0}, "quiet": {"n": 0}}
        seq = 1
        for k in range(1, 61):
            busy = {f"m{(k + j) % 5}": {"k": k, "j": j} for j in range(3)}
            states = busy | ({"quiet": {"n": k}} if k % 25 == 0 else {})  # reports now and then
            rows = rows_for("m1", range(seq, seq + 2))
            seq += 2
            await store.commit(states, rows, seq)
            want |= states
            ids = [store._state_ids[m] for m in states]
            assert ids == list(range(ids[0], ids[0] + len(states))), "a commit's states are consecutive rows"
            with sqlite3.connect(path) as c:
                (n,) = c.execute("SELECT COUNT(*) FROM state_log").fetchone()
            assert n <= 2 * (7 + 4 + 4) + 7, f"commit {k}: {n} rows in state_log"  # the bound in Store
        assert want["idle"] == {"n": 0} and want["quiet"] == {"n": 50}
        assert await store.load_states() == want
    async with Store(path) as again:
        assert await again.load_states() == want
        await again.commit({"idle": {"n": 1}}, [], seq)
        assert (await again.load_states())["idle"] == {"n": 1}


async def test_a_gateway_restarted_often_does_not_grow_the_state_log(tmp_path):
    """A compaction comes once a generation of rows was added since open: a gateway restarted after a few commits
    each time (a crash loop, frequent deploys) never reached one and kept every superseded row. Opening the store
    keeps only each machine's last row; what loads is unchanged."""
    path = str(tmp_path / "s.db")
    for k in range(6):
        async with Store(path) as store:
            for j in range(4):
                await store.commit({"m1": {"k": k, "j": j}, f"other{k % 2}": {"k": k}}, [], 1)
        with sqlite3.connect(path) as c:
            assert c.execute("SELECT COUNT(*) FROM state_log").fetchone()[0] <= 3 + 4 * 2  # last rows + this run's
    async with Store(path) as store:
        assert await store.load_states() == {"m1": {"k": 5, "j": 3}, "other0": {"k": 4}, "other1": {"k": 5}}
        assert store._state_rows == 3
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT COUNT(*) FROM state_log").fetchone()[0] == 3


async def test_a_compaction_in_a_commit_that_fails_leaves_the_log_as_it_was(tmp_path):
    path = str(tmp_path / "s.db")
    async with Store(path) as store:
        store.state_log_slack = 100
        await store.commit({"idle": {"n": 0}}, [], 1)
        for k in range(3):
            await store.commit({"m1": {"k": k}}, [], 1)
        store.state_log_slack = 0  # the next commit compacts: copies idle's row, deletes all four below it
        assert store._state_next - store._state_gen >= len(store._state_ids)

        async def fail():
            raise OSError(28, "No space left on device")

        store.before_commit = fail
        with pytest.raises(StoreError):
            await store.commit({"m1": {"k": 99}}, rows_for("m1", range(1, 3)), 3)
        store.before_commit = None
        assert await store.load_states() == {"idle": {"n": 0}, "m1": {"k": 2}}
        await store.commit({"m1": {"k": 3}}, [], 1)  # compacts now, from the same in-memory index
        assert await store.load_states() == {"idle": {"n": 0}, "m1": {"k": 3}}
    async with Store(path) as again:
        assert await again.load_states() == {"idle": {"n": 0}, "m1": {"k": 3}}


# --- 6. one gateway per store ------------------------------------------------------------------------------------

async def test_a_second_store_object_is_refused_while_readonly_reads_work(tmp_path):
    path = str(tmp_path / "s.db")
    async with Store(path) as first:
        await first.commit({}, rows_for("m1", range(1, 3)), 3)
        with pytest.raises(StoreLocked) as err:
            await Store(path).open()
        msg = str(err.value)
        assert f"store {path} is in use by process {os.getpid()} (" in msg and msg.endswith("; stop it first")
        assert err.value.pid == os.getpid() and err.value.kind == "locked" and err.value.command == " ".join(
            a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\0") if a)
        async with Store(path, readonly=True) as ro:
            assert [r.payload for r in await ro.fetch(0, 10)] == [r.payload for r in rows_for("m1", range(1, 3))]
            assert ro.pending == 2
            with pytest.raises(StoreError) as werr:
                await ro.purge("outbox")
            assert werr.value.kind == "readonly"
        assert first.pending == 2 and await first.count_pending() == 2
    async with Store(path) as again:  # closed: the lock is free
        assert again.pending == 2


def _run_config(tmp_path: Path, broker_port: int, modbus_port: int, tags: dict) -> Path:
    cfg = {
        "gateway": IDENT,
        "mqtt": {"port": broker_port},
        "store": {"path": "data/gw.db"},  # relative: next to the config file
        "logging": {"format": "json"},
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": modbus_port, "poll_interval_s": 0.1}],
        "machines": [{"id": "press-2", "counters": {"good": {"connector": "mb", **tags["good"]}},
                      "reporting": {"interval_s": 0.5}}],
    }
    path = tmp_path / "conf" / "gw.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    return path


async def test_second_gateway_and_buffer_writes_are_refused_by_a_running_gateway(tmp_path, mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.05, seed=4, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        cfg = _run_config(tmp_path, mqtt_broker.port, mb.port, mb.tag_addresses())
        lock = tmp_path / "conf" / "data" / "gw.db.lock"
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        first = await asyncio.create_subprocess_exec(*EXE, "run", "--config", str(cfg), cwd=ROOT,
                                                     env={**os.environ, "PYTHONPATH": str(ROOT)},
                                                     stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: lock.exists() and lock.read_text().startswith(f"{first.pid}\n"), 30,
                             message="the first gateway never took the store lock")

            def cli(*argv: str) -> subprocess.CompletedProcess[str]:
                # started from another directory: the relative store.path still names the same store
                return subprocess.run(EXE + list(argv), cwd=elsewhere, capture_output=True, text=True, timeout=60,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})

            second = await asyncio.to_thread(cli, "run", "--config", str(cfg))
            assert second.returncode == 2, second.stderr
            assert f"is in use by process {first.pid} (" in second.stderr and "gateway.cli run --config" in second.stderr
            assert "stop it first" in second.stderr and "Traceback" not in second.stderr
            for action in (["retry"], ["purge", "--yes"]):
                r = await asyncio.to_thread(cli, "buffer", *action, "--config", str(cfg))
                assert r.returncode == 2, r.stdout + r.stderr
                assert f"in use by process {first.pid}" in r.stderr and "Traceback" not in r.stderr
            listed = await asyncio.to_thread(cli, "buffer", "list", "--config", str(cfg))
            assert listed.returncode == 0, listed.stderr
            assert '"table": "outbox"' in listed.stdout
        finally:
            first.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(first.communicate(), timeout=30)
        assert first.returncode == 0, err.decode()[-2000:]
        r = await asyncio.to_thread(subprocess.run, EXE + ["buffer", "retry", "--config", str(cfg)], cwd=elsewhere,
                                    capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0 and "moved 0 quarantined events" in r.stdout, r.stderr


# --- 7. relative store.path ----------------------------------------------------------------------------------------

def test_relative_store_path_resolves_against_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "etc" / "gw.yaml"
    conf.parent.mkdir()
    conf.write_text(yaml.safe_dump({"gateway": IDENT, "store": {"path": "data/x.db"}}))
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc") / "gw.yaml").store.path == str(tmp_path / "etc" / "data" / "x.db")
    conf.write_text(yaml.safe_dump({"gateway": IDENT}))
    monkeypatch.chdir("/")
    assert load_config(conf).store.path == str(tmp_path / "etc" / "data" / "edge-gateway.db")
    conf.write_text(yaml.safe_dump({"gateway": IDENT, "store": {"path": "/var/lib/x.db"}}))
    assert load_config(conf).store.path == "/var/lib/x.db"


# --- 2. durable by default -----------------------------------------------------------------------------------------

async def test_durable_by_default_and_normal_is_a_logged_opt_out(tmp_path):
    assert StoreConfig().synchronous == "full"
    with capture_logs() as logs:
        async with Store(str(tmp_path / "a.db")) as store:
            assert (await store.db.execute_fetchall("PRAGMA synchronous"))[0][0] == 2  # FULL
    opened = [e for e in logs if e["event"] == "store.opened"]
    assert len(opened) == 1 and opened[0]["log_level"] == "info" and "risk" not in opened[0]
    with capture_logs() as logs:
        async with Store(str(tmp_path / "b.db"), synchronous="normal") as store:
            assert (await store.db.execute_fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
    opened = [e for e in logs if e["event"] == "store.opened"]
    assert len(opened) == 1 and opened[0]["log_level"] == "warning" and "same id" in opened[0]["risk"]


# --- 9. power loss -------------------------------------------------------------------------------------------------

def snapshot_disk(path: str, dest: Path) -> Path:
    """The database files as they are now: with synchronous=full, after commit() returned, this is what the disk
    holds after a power loss (SQLite fsynced the WAL before COMMIT returned)."""
    dest.mkdir(parents=True)
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            shutil.copyfile(path + suffix, dest / ("s.db" + suffix))
    return dest / "s.db"


async def test_power_loss_after_commit_keeps_every_returned_row_identical(tmp_path):
    path = str(tmp_path / "live" / "s.db")
    seen: dict[int, PendingRow] = {}
    disks: list[tuple[Path, dict[int, PendingRow], int]] = []
    async with Store(path, synchronous="full") as store:
        seq = 1
        for i, n in enumerate((1, 5, 40, 3, 200, 7)):
            machine = f"m{i % 2}"
            committed = await store.commit({machine: {"next": seq + n}}, rows_for(machine, range(seq, seq + n)),
                                           seq + n)
            seq += n
            seen.update({r.id: r for r in committed})
            seen.update({r.id: r for r in await store.fetch(0, 10**6)})
            if i == 2:  # some are published and acked: they leave the outbox, which is fine
                await store.ack([r.id for r in committed[:10]])
                for r in committed[:10]:
                    seen.pop(r.id)
            disks.append((snapshot_disk(path, tmp_path / f"disk{i}"), dict(seen), seq))
    for disk, rows, next_seq in disks:
        async with Store(str(disk)) as after:
            assert after.next_seq == next_seq  # no sequence number can be handed out a second time
            back = {r.id: r for r in await after.fetch(0, 10**6)}
            assert back == rows, f"{disk}: rows returned before the power loss differ after it"
            await assert_counters_true(after)


async def test_power_loss_between_insert_and_commit_keeps_nothing_of_it(tmp_path):
    path = str(tmp_path / "live" / "s.db")
    async with Store(path, synchronous="full") as store:
        kept = await store.commit({"m1": {"next": 3}}, rows_for("m1", range(1, 3)), 3)
        disk: list[Path] = []

        async def pull_the_plug():
            disk.append(snapshot_disk(path, tmp_path / "mid"))

        store.before_commit = pull_the_plug
        # a commit large enough to spill pages into the WAL before COMMIT
        doomed = await store.commit({"m1": {"next": 2003}}, rows_for("m1", range(3, 2003), size=2000), 2003)
        assert len(doomed) == 2000
    assert os.path.getsize(str(disk[0]) + "-wal") > 2_000_000  # the uncommitted rows were on disk, in the WAL
    async with Store(str(disk[0])) as after:
        assert await after.fetch(0, 10**6) == kept
        assert after.next_seq == 3 and await after.load_states() == {"m1": {"next": 3}}
        await assert_counters_true(after)


FSYNC_SCRIPT = """
import asyncio, logging, sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from gateway.store import OutboxRow, Store
async def main(path, sync):
    async with Store(path, synchronous=sync) as s:
        for i in range(1, 41):
            await s.commit({}, [OutboxRow(i, "m", "t", "t", b"x" * 300)], i + 1)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_full_syncs_the_wal_before_every_commit_returns(tmp_path):
    """What makes the copies above "the disk after a power loss": with full, SQLite fdatasyncs the WAL in every
    commit (40 commits: at least 40 syncs); with normal it does not (only at checkpoints)."""
    counts = {}
    for sync in ("full", "normal"):
        out = tmp_path / f"strace-{sync}.txt"
        r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(out), sys.executable,
                            "-c", FSYNC_SCRIPT, str(tmp_path / f"{sync}.db"), sync], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0 and "ptrace" in r.stderr:
            pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
        assert r.returncode == 0, r.stderr
        counts[sync] = sum(1 for line in out.read_text().splitlines() if "sync(" in line)
    assert counts["full"] >= 40, counts
    assert counts["normal"] < 20, counts


# --- 10. classified failures -------------------------------------------------------------------------------------

async def test_a_read_only_store_fails_commits_with_kind_readonly(tmp_path):
    path = str(tmp_path / "s.db")
    async with Store(path) as store:
        await store.commit({}, rows_for("m1", range(1, 3)), 3)
    async with Store(path, readonly=True) as ro:  # file:...?mode=ro: SQLite itself refuses the write
        for attempt in (1, 2):
            with pytest.raises(StoreError) as err:
                await ro.commit({}, rows_for("m1", range(3, 4)), 4)
            assert err.value.kind == "readonly" and not err.value.disk_full
            assert ro.last_error is err.value and ro.consecutive_failures == attempt
        assert ro.pending == 2 and ro.next_seq == 3 and not ro.full
    async with Store(path) as store:
        await store.db.execute("PRAGMA query_only=ON")  # the file turned read-only under a running store
        with pytest.raises(StoreError) as err:
            await store.ack([1])
        assert err.value.kind == "readonly" and store.consecutive_failures == 1
        await store.db.execute("PRAGMA query_only=OFF")
        assert await store.ack([1]) == 1
        assert store.last_error is None and store.consecutive_failures == 0


async def test_a_corrupt_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 500)
    with pytest.raises(StoreError) as err:
        await Store(str(path)).open()
    assert err.value.kind == "corrupt"
    async with Store(str(tmp_path / "t.db")):  # the failed open released its lock: the path is usable
        pass
    with pytest.raises(StoreError):
        await Store(str(path)).open()  # still corrupt, still not locked by the failed attempt above


def test_relative_secret_and_certificate_files_resolve_against_the_config_file(tmp_path, monkeypatch):
    """Like the store: a password file or TLS file named relative to the config is found from any working dir."""
    conf = tmp_path / "etc" / "gw.yaml"
    (tmp_path / "etc" / "secrets").mkdir(parents=True)
    (tmp_path / "etc" / "secrets" / "mqtt.pw").write_text("s3cret\n")
    conf.write_text(yaml.safe_dump({
        "gateway": IDENT,
        "mqtt": {"username": "gw", "password_file": "secrets/mqtt.pw",
                 "tls": {"enabled": True, "ca_file": "pki/ca.pem", "cert_file": "/abs/c.pem", "key_file": "k.pem"}},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:4840", "security": "none",
                        "username": "op", "password_file": "secrets/opc.pw"}]}))
    monkeypatch.chdir("/")
    cfg = load_config(conf)
    etc = tmp_path / "etc"
    assert cfg.mqtt.password_file == str(etc / "secrets" / "mqtt.pw")
    assert cfg.mqtt.password() == "s3cret"
    assert (cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file) == (
        str(etc / "pki" / "ca.pem"), "/abs/c.pem", str(etc / "k.pem"))
    assert cfg.connectors[0].password_file == str(etc / "secrets" / "opc.pw")


async def test_statement_journals_stay_in_memory(tmp_path):
    """A multi-row UPSERT or DELETE inside BEGIN needs a statement journal. SQLite's default puts it in a file it
    creates and unlinks in /var/tmp (or $SQLITE_TMPDIR) on every such transaction: two writes per page, and every
    commit fails where that directory is full or read-only (a container with a read-only root). The store keeps
    them in memory. (And it deletes with secure_delete=FAST, not a SECURE_DELETE build's default: see store.py.)"""
    async with Store(str(tmp_path / "s.db")) as store:
        ((mode,),) = await store.db.execute_fetchall("PRAGMA temp_store")
        assert mode == 2, "PRAGMA temp_store: 2 (MEMORY) expected"
        # and deleted rows are not zeroed in pages written for that alone (a build with SECURE_DELETE does)
        ((secure,),) = await store.db.execute_fetchall("PRAGMA secure_delete")
        assert secure == 2, "PRAGMA secure_delete: 2 (FAST) expected"
        ((page,),) = await store.db.execute_fetchall("PRAGMA page_size")
        assert page == 16384, "a new store's pages: 16 KB expected"
        rows = await store.commit({f"m{i}": {"n": i} for i in range(50)}, rows_for("m1", range(1, 51)), 51)
        await store.commit({f"m{i}": {"n": -i} for i in range(50)}, [], 51)  # every state row updated in one statement
        assert await store.ack([(r.id, len(r.payload)) for r in rows]) == 50
        assert (await store.load_states())["m7"] == {"n": -7}
        await assert_counters_true(store)


async def test_a_commit_and_an_ack_take_one_call_to_sqlites_thread(tmp_path):
    """A commit's statements (the acknowledged rows' delete, the snapshots, the rows, the sequence counter, a
    compaction of the state log) and an ack's delete run on SQLite's thread in one call with BEGIN and COMMIT: each
    call waits for the event loop to come round when it is busy (an OPC UA publish response being decoded), so a
    commit made of one call per statement took several times as long under load (bench/README.md, sixteenth and
    seventeenth sessions). aiosqlite has no public call for it: the private ones the store uses must be there."""
    import aiosqlite

    assert callable(getattr(aiosqlite.Connection, "_execute", None))
    assert isinstance(getattr(aiosqlite.Connection, "_conn", None), property)
    async with Store(str(tmp_path / "s.db")) as store:
        store.state_log_slack = 0
        db = store.db
        calls: list[str] = []
        inner = db._execute

        def counting(fn, *args, **kwargs):
            calls.append(getattr(fn, "__name__", "?"))
            return inner(fn, *args, **kwargs)

        db._execute = counting  # type: ignore[method-assign]
        first = await store.commit({f"m{i}": {"n": i} for i in range(4)}, rows_for("m1", range(1, 6)), 6)
        assert len(calls) == 1, calls
        store.ack_later([first[0].id, first[1].id])
        calls.clear()
        # the acks handed over, two machines' snapshots (a compaction is due: slack 0), rows, the sequence counter
        more = await store.commit({"m1": {"n": 10}, "m2": {"n": 20}}, rows_for("m2", range(6, 8)), 8)
        assert len(calls) == 1, calls
        assert store.acks_waiting == 0 and store.acked_total == 2
        calls.clear()
        assert await store.ack([first[2].id]) == 1  # not synced: the pragma switch goes with the delete
        assert len(calls) == 1, calls
        calls.clear()
        await store.commit({"m3": {"n": 30}}, [], 8)  # synced again: the pragma back, in the same call
        assert len(calls) == 1, calls
        db._execute = inner  # type: ignore[method-assign]
        assert [r.id for r in await store.fetch(0, 100)] == [r.id for r in first[3:] + more]
        assert await store.load_states() == {"m0": {"n": 0}, "m1": {"n": 10}, "m2": {"n": 20}, "m3": {"n": 30}}
        await assert_counters_true(store)
        with sqlite3.connect(store.path) as c:
            assert c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone() == ("8",)
            # the compactions kept each machine's last row only below the current generation
            assert c.execute("SELECT COUNT(*) FROM state_log").fetchone()[0] <= 2 * (4 + 2 + 1) + 4
