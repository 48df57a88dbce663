"""Stateful property test: the SQLite store against an in-memory model. Any sequence of append (group commit),
publish (fetch), ack, quarantine, retry, a commit that dies half-way, close/reopen and a size cap neither loses nor
reorders an event."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.store import OutboxRow, Store, StoreError


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.path = str(Path(self.dir.name) / "s.db")
        self.max_bytes = 2000
        self.store = self.run(self._open())
        self.rows: list[tuple[int, bytes]] = []        # model of the outbox: (seq, payload) in publish order
        self.quarantine: list[tuple[int, bytes]] = []
        self.next_seq = 1
        self.cursor = 0                                  # publisher cursor (last fetched id)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Store:
        s = Store(self.path, max_bytes=self.max_bytes)
        await s.open()
        return s

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.dir.cleanup()

    @rule(sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20))
    def append(self, sizes):
        batch = []
        for n in sizes:
            payload = f"{self.next_seq}:".encode() + b"x" * n
            batch.append((self.next_seq, payload))
            self.next_seq += 1
        rows = [OutboxRow(seq, "m", "t", "topic", p) for seq, p in batch]
        self.run(self.store.commit({"m": {"seq": self.next_seq}}, rows, self.next_seq))
        self.rows.extend(batch)

    @rule(sizes=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5))
    def commit_dies_half_way(self, sizes):
        """The transaction fails after some rows were inserted: none of them may remain."""

        async def tx(db):
            await db.executemany("INSERT INTO outbox(seq, machine, type, topic, payload, created) VALUES (?,?,?,?,?,0)",
                                 [(0, "m", "t", "topic", b"doomed" * n) for n in sizes])
            raise OSError(28, "No space left on device")

        try:
            self.run(self.store._write(tx, "commit"))
        except StoreError as exc:
            assert exc.disk_full
        assert self.store.full  # a failed write for lack of space raises the alarm until a write succeeds

    @rule(k=st.integers(min_value=1, max_value=50))
    def publish_and_ack_oldest(self, k):
        fetched = self.run(self.store.fetch(0, k))
        assert [r.payload for r in fetched] == [p for _, p in self.rows[:k]]
        self.run(self.store.ack([(r.id, len(r.payload)) for r in fetched]))
        del self.rows[:len(fetched)]

    @rule(data=st.data())
    def ack_out_of_order(self, data):
        """PUBACKs may be applied in any order: only the acked rows disappear, the rest keep their order."""
        fetched = self.run(self.store.fetch(0, 30))
        if not fetched:
            return
        chosen = data.draw(st.sets(st.sampled_from(range(len(fetched)))))
        self.run(self.store.ack([(fetched[i].id, len(fetched[i].payload)) for i in chosen]))
        gone = {fetched[i].payload for i in chosen}
        self.rows = [r for r in self.rows if r[1] not in gone]

    @rule(data=st.data())
    def quarantine_one(self, data):
        fetched = self.run(self.store.fetch(0, 30))
        if not fetched:
            return
        i = data.draw(st.integers(min_value=0, max_value=len(fetched) - 1))
        assert self.run(self.store.quarantine(fetched[i].id, "poison"))
        row = next(r for r in self.rows if r[1] == fetched[i].payload)
        self.rows.remove(row)
        self.quarantine.append(row)

    @precondition(lambda self: self.quarantine)
    @rule()
    def retry_quarantine(self):
        n = self.run(self.store.retry_quarantined())
        assert n == len(self.quarantine)
        self.rows.extend(self.quarantine)  # back at the end of the outbox, in quarantine order
        self.quarantine = []

    @rule()
    def crash_and_reopen(self):
        self.run(self.store.close())
        self.store = self.run(self._open())
        assert self.store.next_seq == self.next_seq
        states = self.run(self.store.load_states())
        if self.next_seq > 1 and states:
            assert states["m"]["seq"] <= self.next_seq

    @invariant()
    def matches_model(self):
        if not hasattr(self, "store"):
            return
        rows = self.run(self.store.fetch(0, 10**6))
        assert [r.payload for r in rows] == [p for _, p in self.rows]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert self.store.pending == len(self.rows)
        total = sum(len(p) for _, p in self.rows) + sum(len(p) for _, p in self.quarantine)
        assert self.store.pending_bytes == total
        if not self.store.disk_full:
            assert self.store.full == (total >= self.max_bytes)
        assert self.store.quarantined == len(self.quarantine)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
