"""Stateful property test: the SQLite store against an in-memory model. Any sequence of append (group commit),
publish (fetch), ack (also repeated, of quarantined or purged rows; also handed over for the next commit's
transaction to delete), quarantine (from the outbox or from outside),
retry, purge, a commit that dies half-way, close/reopen and a size cap neither loses nor reorders an event, and the
store's counters equal what the database holds after every step. The machine snapshots committed with them
(``state_log``, appended and compacted: the slack is drawn small so that compactions, with idle machines' rows
copied forward, happen every few commits) always load as the last one committed per machine."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.store import OutboxRow, PendingRow, Store, StoreError


@dataclass
class Row:
    id: int | None  # outbox id; None for an event quarantined from outside until a retry gives it one
    seq: int
    machine: str
    payload: bytes


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.path = str(Path(self.dir.name) / "s.db")
        self.max_bytes = 2000
        self.slack = 0
        self.store = self.run(self._open())
        self.rows: list[Row] = []          # model of the outbox, in id (= publish) order
        self.quarantine: list[Row] = []    # in quarantine order
        self.gone_ids: list[int] = []      # ids acked or purged: acking them again must change nothing
        self.next_seq = 1
        self.max_id = 0                    # AUTOINCREMENT: the highest outbox id ever handed out
        self.states: dict[str, dict] = {}  # the last snapshot committed per machine
        self.commits = 0
        self.acks_later: list[int] = []    # ids handed to ack_later: deleted by the next commit or ack()
        self.opened_with_rows = False      # the last open found rows in the outbox
        self.scanned = False               # last_ids_by_machine ran since

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Store:
        s = Store(self.path, max_bytes=self.max_bytes)
        s.state_log_slack = self.slack
        await s.open()
        return s

    def deleted(self, given=()) -> int:
        """A commit or ack() succeeded: it deleted the rows handed to ack_later and ``given`` that were still in the
        outbox. Returns how many."""
        gone = set(self.acks_later) | set(given)
        self.acks_later = []
        n = sum(1 for r in self.rows if r.id in gone)
        self.gone_ids += [r.id for r in self.rows if r.id in gone]
        self.rows = [r for r in self.rows if r.id not in gone]
        return n

    @rule(k=st.integers(min_value=1, max_value=20), skip=st.integers(min_value=0, max_value=5))
    def ack_later(self, k, skip):
        """PUBACKs handed over for the next transaction: nothing is deleted yet."""
        fetched = self.run(self.store.fetch(0, k + skip))[skip:]
        self.store.ack_later([r.id for r in fetched])
        self.acks_later += [r.id for r in fetched]
        assert self.store.acks_waiting == len(self.acks_later)

    @rule(slack=st.integers(min_value=0, max_value=3))
    def set_state_log_slack(self, slack):
        self.slack = self.store.state_log_slack = slack

    @rule(machines=st.lists(st.sampled_from(["m1", "m2", "m3", "m4", "m5", "idle"]), min_size=1, max_size=3,
                            unique=True))
    def commit_states_only(self, machines):
        """A commit of snapshots without events (a checkpoint)."""
        self.commits += 1
        states = {m: {"m": m, "commit": self.commits} for m in machines}
        self.run(self.store.commit(states, [], self.next_seq))
        self.states.update(states)
        self.deleted()

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.dir.cleanup()

    @rule(sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20),
          machine=st.sampled_from(["m1", "m2"]))
    def append(self, sizes, machine):
        batch = []
        for n in sizes:
            batch.append(Row(None, self.next_seq, machine, f"{self.next_seq}:".encode() + b"x" * n))
            self.next_seq += 1
        rows = [OutboxRow(r.seq, r.machine, "t", f"topic/{r.machine}", r.payload) for r in batch]
        self.commits += 1
        state = {"seq": self.next_seq, "commit": self.commits}
        committed = self.run(self.store.commit({machine: state}, rows, self.next_seq))
        self.states[machine] = state
        # commit() returns the committed rows with their ids: consecutive, above every id handed out before
        assert committed == [PendingRow(self.max_id + 1 + i, f"topic/{r.machine}", r.payload, r.machine, r.seq)
                             for i, r in enumerate(batch)]
        for r, c in zip(batch, committed):
            r.id = c.id
        self.max_id += len(batch)
        self.rows.extend(batch)
        self.deleted()

    @rule(sizes=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5))
    def commit_dies_half_way(self, sizes):
        """commit() fails after its rows were inserted (the disk fills up before COMMIT): none of them may remain,
        the counters and next_seq stay, the failure is classified."""
        rows = [OutboxRow(self.next_seq + i, "m1", "t", "topic/m1", b"doomed" * n) for i, n in enumerate(sizes)]

        async def fail():
            raise OSError(28, "No space left on device")

        self.store.before_commit = fail
        try:
            self.run(self.store.commit({"m1": {"doomed": True}}, rows, self.next_seq + len(rows)))
            raise AssertionError("the commit should have failed")
        except StoreError as exc:
            assert exc.disk_full and exc.kind == "disk_full"
        finally:
            self.store.before_commit = None
        assert self.store.full  # a failed write for lack of space raises the alarm until a write succeeds
        assert self.store.next_seq == self.next_seq
        assert self.store.acks_waiting == len(self.acks_later)  # their delete rolled back with it: still to do
        assert self.store.last_error is not None and self.store.consecutive_failures >= 1
        states = self.run(self.store.load_states())
        assert "doomed" not in states.get("m1", {})
        # AUTOINCREMENT's counter rolled back with the transaction: the next commit reuses none of these ids for
        # anything visible, and the model's max_id is unchanged

    @rule(k=st.integers(min_value=1, max_value=50))
    def publish_and_ack_oldest(self, k):
        fetched = self.run(self.store.fetch(0, k))
        assert [(r.id, r.seq, r.machine, r.payload) for r in fetched] == [
            (r.id, r.seq, r.machine, r.payload) for r in self.rows[:k]]
        n = self.run(self.store.ack([(r.id, len(r.payload)) for r in fetched]))
        assert n == self.deleted([r.id for r in fetched]) >= len(fetched)

    @rule(data=st.data())
    def ack_out_of_order(self, data):
        """PUBACKs may be applied in any order: only the acked rows disappear, the rest keep their order."""
        fetched = self.run(self.store.fetch(0, 30))
        if not fetched:
            return
        chosen = data.draw(st.sets(st.sampled_from(range(len(fetched)))))
        n = self.run(self.store.ack([fetched[i].id for i in chosen]))
        assert n == self.deleted([fetched[i].id for i in chosen])

    @precondition(lambda self: self.gone_ids or self.quarantine)
    @rule(data=st.data())
    def ack_again(self, data):
        """A late or repeated PUBACK: the row was already acked, purged or quarantined. Nothing changes; a wrong
        size given with it changes nothing either."""
        candidates = self.gone_ids + [r.id for r in self.quarantine if r.id is not None] + [10**9]
        ids = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=5))
        assert self.run(self.store.ack([(i, 12345) for i in ids])) == self.deleted()

    @rule(data=st.data())
    def quarantine_one(self, data):
        fetched = self.run(self.store.fetch(0, 30))
        if not fetched:
            return
        i = data.draw(st.integers(min_value=0, max_value=len(fetched) - 1))
        assert self.run(self.store.quarantine(fetched[i].id, "poison"))
        assert not self.run(self.store.quarantine(fetched[i].id, "poison"))  # gone from the outbox: no-op
        row = next(r for r in self.rows if r.id == fetched[i].id)
        self.rows.remove(row)
        self.quarantine.append(row)

    @rule(n=st.integers(min_value=1, max_value=100))
    def quarantine_from_outside(self, n):
        """The ERP rejected a delivered event: it comes back with no outbox id."""
        payload = f"erp:{n}:".encode() + b"r" * n
        self.run(self.store.quarantine_external(seq=n, machine="m2", type="t", topic="topic/m2", payload=payload,
                                                reason="rejected"))
        # the same event rejected again (written twice, or an ack sent twice) is there once
        if not any(r.machine == "m2" and r.seq == n and r.payload == payload for r in self.quarantine):
            self.quarantine.append(Row(None, n, "m2", payload))

    @precondition(lambda self: self.quarantine)
    @rule()
    def retry_quarantine(self):
        n = self.run(self.store.retry_quarantined())
        assert n == len(self.quarantine)
        # rows from the outbox go back under their original id (their original place); rows from outside go to
        # the end, in quarantine order, under new ids
        for r in self.quarantine:
            if r.id is None:
                self.max_id += 1
                r.id = self.max_id
        self.rows = sorted(self.rows + self.quarantine, key=lambda r: r.id)
        self.quarantine = []

    @precondition(lambda self: self.rows or self.quarantine)
    @rule(data=st.data(), table=st.sampled_from(["outbox", "quarantine"]))
    def purge_some_then_ack_them(self, data, table):
        if table == "outbox" and self.rows:
            chosen = data.draw(st.lists(st.sampled_from(self.rows), min_size=1, max_size=3, unique_by=id))
            ids = [r.id for r in chosen]
            assert self.run(self.store.purge("outbox", ids)) == len(chosen)
            self.rows = [r for r in self.rows if r.id not in ids]
            self.gone_ids += ids
            assert self.run(self.store.ack(ids)) == self.deleted()
        elif table == "quarantine" and self.quarantine:
            listed = self.run(self.store.list_rows("quarantine", limit=10**6))
            i = data.draw(st.integers(min_value=0, max_value=len(self.quarantine) - 1))
            assert self.run(self.store.purge("quarantine", [listed[i]["id"]])) == 1
            row = self.quarantine.pop(i)
            if row.id is not None:
                self.gone_ids.append(row.id)
                assert self.run(self.store.ack([row.id])) == self.deleted()

    @rule()
    def scan_backlog(self):
        """The publisher's scan after a reconnect: each machine's highest id up to the outbox's highest; from then
        on backlog_bounds knows every row without one."""
        boundary = max((r.id for r in self.rows), default=0)
        found = self.run(self.store.last_ids_by_machine(boundary))
        self.scanned = True
        exact: dict[str, int] = {}
        for r in self.rows:
            exact[r.machine] = max(exact.get(r.machine, 0), r.id)
        assert found == exact

    @rule()
    def crash_and_reopen(self):
        self.acks_later = []  # lost with the process: those rows are sent again (same id, same content)
        self.run(self.store.close())
        self.store = self.run(self._open())
        self.opened_with_rows, self.scanned = bool(self.rows), False
        assert self.store.next_seq == self.next_seq
        assert self.run(self.store.load_states()) == self.states

    @invariant()
    def matches_model(self):
        if not hasattr(self, "store"):
            return
        rows = self.run(self.store.fetch(0, 10**6))
        assert [(r.id, r.seq, r.machine, r.payload) for r in rows] == [
            (r.id, r.seq, r.machine, r.payload) for r in self.rows]
        q = self.run(self.store.export_rows("quarantine"))
        assert [(r["seq"], r["machine"], r["outbox_id"]) for r in q] == [(r.seq, r.machine, r.id)
                                                                        for r in self.quarantine]
        assert self.store.outbox_rows == len(self.rows)
        assert self.store.pending == max(0, len(self.rows) - len(self.acks_later))
        total = sum(len(r.payload) for r in self.rows) + sum(len(r.payload) for r in self.quarantine)
        assert self.store.pending_bytes == total
        if not self.store.disk_full:
            assert self.store.full == (total >= self.max_bytes)
        assert self.store.quarantined == len(self.quarantine)

    @invariant()
    def backlog_bounds_cover_every_row(self):
        """The publisher's backlog per machine without a scan: unknown only for a store opened with rows and not
        scanned since; when known, no machine's row is above its bound (a machine left out, or one bound too low,
        would let its live rows overtake its backlog)."""
        if not hasattr(self, "store"):
            return
        boundary, bound = self.run(self.store.backlog_bounds())
        assert boundary == max((r.id for r in self.rows), default=0)
        if bound is None:
            assert self.opened_with_rows and not self.scanned
            return
        for r in self.rows:
            assert bound.get(r.machine, 0) >= r.id, (r, bound)
        assert all(v <= boundary for v in bound.values())

    @invariant()
    def counters_equal_the_database(self):
        if not hasattr(self, "store"):
            return
        db = self.store.db
        ((n, size),) = self.run(db.execute_fetchall(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"))
        ((qn, qsize),) = self.run(db.execute_fetchall(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM quarantine"))
        assert (self.store.outbox_rows, self.store.pending_bytes, self.store.quarantined) == (n, size + qsize, qn)
        assert self.store.quarantined_bytes == qsize

    @invariant()
    def states_load_as_last_committed(self):
        """load_states gives each machine's last snapshot; the store's index of the log is the database's; the log
        holds at most two generations (each: one row per machine plus the slack, plus one commit's states)."""
        if not hasattr(self, "store"):
            return
        assert self.run(self.store.load_states()) == self.states
        db = self.store.db
        latest = dict(self.run(db.execute_fetchall("SELECT machine, MAX(id) FROM state_log GROUP BY machine")))
        assert self.store._state_ids == latest
        ((n,),) = self.run(db.execute_fetchall("SELECT COUNT(*) FROM state_log"))
        assert self.store._state_rows == n
        assert n <= 2 * (len(self.states) + 3 + 3) + len(self.states)  # the bound in Store (slack <= 3, <= 3 states)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
