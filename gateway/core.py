"""The core: the only writer of machine state.

It takes commands from one inbox — sample batches from connectors, order commands from the order sources
(gateway/orders.py), cut results — applies each synchronously to the pure engines (mappings/machine.py) and stages
the resulting event drafts (sequence number, id, payload) in the same step: it never awaits while it holds work that
is not staged. The only await of a round is the group commit of staged rows and the snapshots of the machines they
came from; a commit that fails keeps both staged and is retried. Changeover cuts are two-phase: the core asks the
connectors for a read in a task of its own and goes on; the read comes back through the inbox as a tagged batch, so
a slow PLC delays only its own machine.

Cost is proportional to change: a machine whose counters do not move costs its sample's decode and a comparison;
reporting windows run on a timer heap (``MachineEngine.next_deadline``, monotonic clock), snapshots are taken only of
machines whose state changed (the dirty set), at the checkpoint or with the events they produced.

The core knows no protocol and no broker: it is handed a ``read`` function for cut reads and a ``notify`` function
that takes the rows of each commit (the publisher's input).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import heapq
import math
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from connectors.errors import ConnectorError, ConnectorUnavailable, ReadFailed
from gateway import metrics
from gateway.alarms import Alarms
from gateway.events import EventEncoder
from gateway.faults import crash_point, freeze_point
from gateway.orders import HOLD, CompleteCommand, OrderCommand, PlcTagOrders
from gateway.store import OutboxRow, PendingRow, Store, StoreError
from mappings.machine import (
    EventDraft,
    MachineEngine,
    MachineSpec,
    OrderRefused,
    RunRoute,
    apply_run,
)
from mappings.samples import Readings, Sample

log = structlog.get_logger("gateway.runtime")

CHECKPOINT_S = 30.0
"""How old the committed state of a machine whose only change is counted production may get (checked every half
of it; a machine that reports more often is snapshotted with its reports, not again at the checkpoint). Their
counters are the durable log: a crash re-derives the quantities since the last snapshot from the counter, so a
snapshot is needed only before a counter can wrap twice (the interval is capped at half the shortest wrap period at
max_rate) — state that exists nowhere else (an order change, reset-on-read and delta values, a counter reset or
rollover seen, a held zero) is committed at once (``urgent``), and every event is committed with the state that
produced it."""
CUT_READ_TIMEOUT_S = 3.0  # one attempt of a cut read
CUT_RETRY_MAX_S = 1.0  # a cut read of a connector that is not connected is retried, with backoff up to this
# a cut read answered with some counters Bad for this long: the good ones are the cut (changeover.cut_partial)
CUT_PARTIAL_AFTER_S = 30.0
MAX_QUEUED_SAMPLES = 200_000  # above this, queued cumulative samples are coalesced (the latest carries the delta)
CORE_BATCH = 10_000  # inbox items handled per round before a commit
WAKE_SLACK_S = 0.002
"""Added to the core's wait for its next timed work. uvloop keeps time in whole milliseconds and may end a wait up to
~1 ms before ``time.monotonic()`` reaches the deadline; the core then found nothing due and waited again, a fraction
of a millisecond at a time: ~20 rounds a second instead of ~4 at the peer load. A report 2 ms later changes nothing."""
TIMER_SLOT_S = 0.5
"""Reporting windows close at the start of the timer slot their deadline falls in: never later than their deadline,
at most one slot earlier, and all windows of one slot in one round and one group commit. A machine's slot is this,
halved until it is at most a fifth of its reporting interval (``timer_slot``): 0.5 s from 2.5 s up (the default is
5 s), 0.125 s at 1 s; a window closes at most a fifth of its interval early. Every slot divides this one, so the
windows of machines with different intervals still close together. (1 s slots were tried: one commit of reports per
second instead of two, but the windows of 1 s polls then close in phase with the polls, and at one phase they
were ~0.9 s shorter on average: 806 reports/s instead of 667 at 3,333 machines, more CPU, not less.)"""
MIN_TIMER_SLOT_S = 1 / 1024


@functools.lru_cache(maxsize=64)
def timer_slot(interval_s: float) -> float:
    """The timer slot of windows of ``interval_s`` (see TIMER_SLOT_S)."""
    slot = TIMER_SLOT_S
    while slot > interval_s / 5 and slot > MIN_TIMER_SLOT_S:
        slot /= 2
    return slot


def counter_checkpoint(counter: Any) -> float:
    """How old a counter's committed baseline may get: half its wrap period (modulus / max_rate) for a cumulative
    counter with a modulus, so a crash finds one rollover at most; at least 1 s, at most CHECKPOINT_S."""
    if counter.mode == "cumulative" and counter.modulus and counter.max_rate > 0:
        return max(1.0, min(CHECKPOINT_S, counter.modulus / counter.max_rate / 2))
    return CHECKPOINT_S


def checkpoint_interval(specs: Any) -> float:
    """The shortest ``counter_checkpoint`` of any counter or meter of the machines ``specs``."""
    return min([CHECKPOINT_S, *(counter_checkpoint(b.spec) for spec in specs
                                for b in [*spec.counters.values(), *(m.binding for m in spec.materials.values())])])


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the start time an operator sees."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Routes:
    """How tag keys reach machines, built by the wiring from the config (gateway/runtime.py)."""

    signal: dict[str, tuple[str, str]] = field(default_factory=dict)  # tag key -> (machine, signal)
    control: set[str] = field(default_factory=set)  # order / operation / complete tags
    rank: dict[str, int] = field(default_factory=dict)  # same sample time: counters, then complete, then order tags
    coalescable: set[str] = field(default_factory=set)  # cumulative counter keys: the latest value carries the delta
    # machine -> connector id -> counter keys (what a cut reads)
    cut_keys: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))


@dataclass
class CoreCall:
    """A change the wiring asks the core to make in inbox order (before the samples queued after it), e.g. a
    counter's width found on the server at connect (gateway/counter_specs.py ``apply_tag_types``)."""

    fn: Callable[[Core], None]


@dataclass
class CutDone:
    """The cut read of one machine came back (a tagged sample batch)."""

    machine: str
    samples: list[Sample]


@dataclass
class _Cut:
    """A changeover waiting for its cut read; commands that arrive meanwhile queue behind it, in order."""

    machine: str
    commands: list[OrderCommand | CompleteCommand]
    task: asyncio.Task[None] | None = None


@dataclass
class Stats:
    samples: int = 0
    events_committed: int = 0
    commits: int = 0
    dispatch_accepted: int = 0
    dispatch_unchanged: int = 0  # an order command that changed nothing (the order in force, again)
    dispatch_rejected: int = 0
    dispatch_rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cut_read_failures: int = 0
    commit_failures: int = 0
    dropped_while_full: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    erp_rejections: int = 0
    acks_malformed: int = 0
    acks_rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples_coalesced: int = 0
    machine_faults: int = 0
    cut_partial: int = 0  # changeovers cut without the counters that stayed Bad (CUT_PARTIAL_AFTER_S)


CutReader = Callable[[str, list[str], float], Awaitable[list[Sample]]]  # (connector id, keys, timeout) -> samples


def _decreases(before: Any, after: Any) -> bool:
    """A counter reading lower than the one before it (numbers only; anything else is left to the engine)."""
    try:
        return bool(after < before)
    except TypeError:
        return False


class Core:
    def __init__(self, specs: dict[str, MachineSpec], routes: Routes, store: Store, *, stats: Stats, alarms: Alarms,
                 tags: PlcTagOrders, read: CutReader, notify: Callable[[list[PendingRow]], None],
                 on_refused: Callable[[OrderCommand, OrderRefused], None]) -> None:
        self.specs = specs
        self.routes = routes
        self.store = store
        self.stats = stats
        self.alarms = alarms
        self.tags = tags
        self._read = read
        self._notify = notify
        self._on_refused = on_refused
        self.engines: dict[str, MachineEngine] = {}
        self.encoder: EventEncoder | None = None
        self.inbox: collections.deque[Any] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self.queued_samples = 0
        self.cuts: dict[str, _Cut] = {}
        self.dirty: set[str] = set()  # machines whose engine state is not committed
        # dirty machines whose engine said ``urgent`` after a call of the core (their state exists nowhere else: it is
        # committed now, not at the checkpoint). Whoever changes an engine outside the core's own calls adds it here.
        self.urgent: set[str] = set()
        # reporting windows, a timer wheel: the machines of each slot time (deadlines are slotted: see _schedule), and
        # a heap of the slot times; ``scheduled`` holds each machine's one valid entry (others are skipped)
        self._timers: list[float] = []
        self._slots: dict[float, list[str]] = {}
        self.scheduled: dict[str, float] = {}
        self.faulted: dict[str, str] = {}  # machine -> error: its engine raised; its samples are ignored
        self._frozen: set[str] = set()  # faulted machines whose state is not committed again (see fault)
        self.after_commit: list[Callable[[], Awaitable[None]]] = []  # awaited by the core after its commit
        # told of every successful commit: its rows (with their event times) and how long the store took (metrics)
        self.on_commit: Callable[[list[OutboxRow], float], None] | None = None
        self.on_staged: Callable[[list[EventDraft]], None] | None = None  # sees the drafts staged (the status page)
        self.next_seq = 1
        self.uncommitted: list[OutboxRow] = []
        self._drafts: dict[int, EventDraft] = {}  # seq -> draft of each uncommitted row (renumbered if a machine faults)
        self._committing = False  # a commit's await is in flight (its rows and states are taken)
        self._last_checkpoint = 0.0
        self.checkpoint_s = checkpoint_interval(specs.values())
        self._snapped: dict[str, float] = {}  # machine -> monotonic time its state was last committed
        self._commit_backoff_until = 0.0
        self._commit_failing: str | None = None
        self._full_since = 0.0  # monotonic time the store became full (the downtime in store.space_recovered)
        self._full = False
        self._first_samples = False
        self.heartbeat = 0.0  # monotonic time of the core loop's last round
        # gateway/health.Health: ``evaluate()`` when its ``next_due`` (monotonic) has come, about once a second (also
        # when idle: the heartbeat of liveness); ``committed(rows)`` after each commit with rows
        self.ticker: Any = None
        self.tick_s: float | None = None  # the loop wakes at least this often, idle or not (the watchdog sets it)
        # the routes of each run's keys tuple (see apply_readings), valid for the routes and engines of _runs_of
        self._runs: dict[tuple[str, ...], tuple[list[RunRoute], bool]] = {}
        self._runs_of: tuple[Any, ...] = ()  # the objects themselves, not their ids: a freed id can come back

    def restore(self, snapshots: dict[str, Any], next_seq: int, encoder: EventEncoder) -> None:
        """The engines from their committed snapshots (a machine without one starts fresh)."""
        self.engines = {mid: MachineEngine(spec, snapshots.get(mid)) for mid, spec in self.specs.items()}
        for mid in self.engines:
            self._schedule(mid)
        for mid, tracker in self.tags.trackers.items():  # the completion flag as last committed
            eng = self.engines.get(mid)
            if eng is not None:
                tracker.complete_level = eng.complete_flag
        self.next_seq = next_seq
        self.encoder = encoder

    # ------------------------------------------------------------------ inbox (event loop callbacks, non-blocking)
    def put(self, item: Any) -> None:
        self.inbox.append(item)
        self._inbox_ready.set()

    def wake(self) -> None:
        self._inbox_ready.set()

    def on_samples(self, samples: list[Sample] | Readings) -> None:
        """The connectors' sink."""
        self.inbox.append(samples)
        self._inbox_ready.set()
        self.queued_samples += len(samples)
        if self.queued_samples > MAX_QUEUED_SAMPLES:
            self._coalesce()

    def _coalesce(self) -> None:
        """Bound the inbox under overload: merge runs of queued sample batches, keeping only the latest sample of
        each cumulative counter (its value carries every delta before it) and the last one before each decrease (a
        reset, a preset or a rollover: the value after it does not carry the deltas before it). Delta /
        reset-on-read counters, state and order tags are kept in full and in order; a batch with order tags is a
        barrier nothing moves across."""
        out: collections.deque[Any] = collections.deque()
        run: dict[str, Sample] = {}
        latest: dict[str, Sample] = {}  # per coalescable key, the last sample seen in this stretch
        rest: list[Sample] = []
        before = self.queued_samples
        coalescable, control = self.routes.coalescable, self.routes.control

        def close_run() -> None:
            if run or rest:
                out.append(rest + list(run.values()))

        for item in self.inbox:
            if isinstance(item, (list, Readings)) and not any(s.key in control for s in item):
                for s in item:
                    k = s.key
                    if k in coalescable and s.good:
                        prev = latest.get(k)
                        latest[k] = s
                        if prev is None:
                            rest.append(s)  # kept: it may be the engine's first value (a baseline)
                        elif _decreases(prev.value, s.value):
                            # the counter went back (a reset, a preset, a rollover): the value before and the value
                            # after are both kept, so the engine sees the decrease where it happened
                            if run.get(k) is prev:
                                del run[k]
                                rest.append(prev)
                            rest.append(s)
                        else:
                            run.pop(k, None)
                            run[k] = s
                    else:
                        rest.append(s)
                continue
            close_run()
            run, rest, latest = {}, [], {}
            out.append(item)
        close_run()
        self.inbox = out
        self.queued_samples = sum(len(i) for i in out if isinstance(i, (list, Readings)))
        dropped = before - self.queued_samples
        if dropped > 0:
            self.stats.samples_coalesced += dropped
            metrics.INPUT_COALESCED.inc(dropped)
        self.alarms.raise_("input_overflow", "warning",
                           "the core cannot keep up with the connectors: queued counter samples are coalesced "
                           "(no quantity is lost; windows get coarser)",
                           queued_before=before, queued_after=self.queued_samples,
                           coalesced_total=self.stats.samples_coalesced)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        while True:
            if not self.inbox:
                timeout = self._next_wakeup()
                if self.tick_s is not None and (timeout is None or timeout > self.tick_s):
                    timeout = self.tick_s
                self._inbox_ready.clear()
                if timeout is None or timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(None if timeout is None else timeout + WAKE_SLACK_S):
                            await self._inbox_ready.wait()
            await freeze_point("core.round")
            self.heartbeat = time.monotonic()
            self.round()
            if self.ticker is not None and self.heartbeat >= self.ticker.next_due:
                self.stage(await self.ticker.evaluate())
            await self.commit()
            if self.after_commit:
                jobs, self.after_commit = self.after_commit, []
                for job in jobs:
                    await job()

    def round(self) -> None:
        """One synchronous round: drain (a bounded part of) the inbox, run due timers. Everything it produces is
        staged before it returns."""
        if self.queued_samples < MAX_QUEUED_SAMPLES // 2 and "input_overflow" in self.alarms:
            self.alarms.clear("input_overflow", coalesced_total=self.stats.samples_coalesced)
        inbox = self.inbox
        if not self._first_samples and self.queued_samples:
            self._first_samples = True
            log.info("core.first_samples", process_age_s=process_age_s(), samples=self.queued_samples)
        n = 0
        while inbox and n < CORE_BATCH:
            n += 1
            self._handle(inbox.popleft())
        self.run_timers()

    def _handle(self, item: Any, *, commands: bool = True) -> None:
        """One inbox item. ``commands=False`` (the gateway stopping): readings and cut reads only, no order command
        that would start a cut read nor a call into the stopping core."""
        if isinstance(item, Readings):
            self.queued_samples -= len(item)
            self.stage(self.apply_readings(item))
        elif isinstance(item, list):
            self.queued_samples -= len(item)
            self.stage(self.apply_samples(item))
        elif isinstance(item, CutDone):
            self._cut_done(item)
        elif not commands:
            return
        elif isinstance(item, (OrderCommand, CompleteCommand)):
            self._order_command(item)
        elif isinstance(item, CoreCall):
            item.fn(self)

    def drain(self) -> None:
        """The gateway is stopping and its connectors have stopped: apply what the inbox still holds (samples, cut
        reads and the commands that waited for them), so it is in the last commit. A reset-on-read register was
        cleared by the read that delivered its samples, and a delta value is not delivered again: left in the
        inbox they were lost (tests/test_shutdown_drain.py). Order commands that would need a new cut read are
        left: a retained dispatch comes again at the next start."""
        if self.encoder is None:  # stopped before the engines were restored: nothing can be applied
            return
        inbox, self.inbox = self.inbox, collections.deque()
        self._not_applied(inbox, "the gateway stopped before it took the order")
        for item in inbox:
            try:
                self._handle(item, commands=False)
            except Exception:  # noqa: BLE001 - the stop goes on: what was applied so far is committed
                log.exception("core.drain_failed")
                break
        self.queued_samples = 0
        if self.tags.pending:  # samples held while an order pair was not known: the switch now, then them
            self.settle_order_tags(all_now=True)

    def _next_wakeup(self) -> float | None:
        """Seconds until the core has timed work: the next reporting window, a settling order switch, the
        checkpoint of dirty machines, a commit retry, the health evaluation (``ticker``). None: nothing timed."""
        now = time.monotonic()
        due: list[float] = []
        if self._timers:
            due.append(self._timers[0])
        if self.ticker is not None:
            due.append(self.ticker.next_due)
        if self.dirty or self.uncommitted or self.after_commit:
            due.append(max(self._last_checkpoint + self.checkpoint_s / 2, self._commit_backoff_until))
        settle = self.tags.next_settle()
        if settle is not None:
            due.append(settle)
        if self.after_commit:
            due.append(now)
        if not due:
            return None
        return max(0.0, min(due) - now)

    @staticmethod
    def now() -> float:
        """Reporting windows run on the monotonic clock (a wall-clock step neither closes nor stretches them)."""
        return time.monotonic()

    # ------------------------------------------------------------------ samples
    def apply_samples(self, samples: list[Sample]) -> list[EventDraft]:
        routes = self.routes.signal
        if self.routes.control:
            if self.tags.pending:
                return self._apply_samples_ordered(samples)
            control = self.routes.control
            for s in samples:
                if s.key in control:
                    return self._apply_samples_ordered(samples)
        out: list[EventDraft] = []
        engines = self.engines
        dirty = self.dirty
        urgent = self.urgent
        scheduled = self.scheduled
        unscheduled: list[str] = []
        last = None  # the engine of the previous sample, once it was dirty: a machine's tags come together
        for s in samples:
            route = routes.get(s.key)
            if route is None:
                continue
            machine, signal = route
            eng = engines[machine]
            try:
                drafts = eng.apply(s, signal)
            except Exception as exc:  # noqa: BLE001 - one machine's fault must not stop the others
                self.fault(machine, exc, s)
                continue
            if drafts:
                out.extend(drafts)
            if eng.dirty:
                if eng is not last:  # dirty stays set within a batch: once per run of one machine's samples
                    last = eng
                    dirty.add(machine)
                    if machine not in scheduled:
                        unscheduled.append(machine)
                if eng.urgent:
                    urgent.add(machine)
        self.stats.samples += len(samples)
        for machine in unscheduled:  # only machines whose window may just have opened
            self._schedule(machine)
        return out

    def _run_routes(self, keys: tuple[str, ...]) -> tuple[list[RunRoute], bool]:
        """The routes of a run's keys (``mappings.machine.apply_run``) and whether any is an order tag; looked up once
        per keys tuple while the routes and engines stay the same objects (a reload replaces them, a fault clears
        the cache)."""
        routes, of = self.routes, self._runs_of
        if not of or of[0] is not routes or of[1] is not routes.signal or of[2] is not self.engines:
            self._runs.clear()
            self._runs_of = (routes, routes.signal, self.engines)
        got = self._runs.get(keys)
        if got is None:
            routes, engines, control = self.routes.signal, self.engines, self.routes.control
            table: list[RunRoute] = []
            for k in keys:
                route = routes.get(k)
                if route is None:
                    table.append(None)
                    continue
                eng = engines[route[0]]
                table.append((eng, eng.cell(route[1])))
            got = self._runs[keys] = (table, any(k in control for k in keys))
        return got

    def apply_readings(self, readings: Readings) -> list[EventDraft]:
        """``apply_samples`` for a poll's ``Readings``: each run column by column (``apply_run``), with no
        ``Sample`` per reading unless it leaves the fast path; the same engine calls in the same order as
        ``apply_samples(list(readings))`` (tests/test_core_runs.py)."""
        if self.routes.control:
            if self.tags.pending or any(
                    self._run_routes(part[0])[1] if type(part) is tuple else any(s.key in self.routes.control
                                                                                 for s in part)
                    for part in readings.parts):
                return self._apply_samples_ordered(list(readings))
        out: list[EventDraft] = []
        scheduled, dirty = self.scheduled, self.dirty
        for part in readings.parts:
            if type(part) is list:
                out.extend(self.apply_samples(part))
                continue
            keys, values, recv, mono = part  # type: ignore[misc]
            table = self._run_routes(keys)[0]

            def slow(i: int, keys: tuple[str, ...] = keys, values: list[int | None] = values, recv: float = recv,
                     mono: float = mono, table: list[RunRoute] = table) -> None:
                faults = len(self.faulted)
                out.extend(self.apply_samples([Sample(keys[i], values[i], True, recv, None, "Good", mono)]))
                self.stats.samples -= 1  # counted with the run below
                if len(self.faulted) != faults:
                    # its engine raised: fault() unrouted the machine (and dropped this table from the cache); the
                    # rest of this run skips it too, as its samples would be
                    faulted = self.faulted
                    for j, route in enumerate(table):
                        if route is not None and route[0].spec.id in faulted:
                            table[j] = None

            for eng in apply_run(table, values, recv, mono, slow):
                machine = eng.spec.id
                dirty.add(machine)
                if machine not in scheduled:
                    self._schedule(machine)
            self.stats.samples += len(values) - values.count(None)
        return out

    def _apply_samples_ordered(self, samples: list[Sample]) -> list[EventDraft]:
        """A batch with order tags or a completion flag: applied in sample-time order, so a PLC-tag changeover
        switches at the exact sample boundary (see gateway/orders.py for the rule)."""
        out: list[EventDraft] = []
        routes = self.routes.signal
        touched: set[str] = set()
        rank = self.routes.rank
        control = self.routes.control

        def order(s: Sample) -> tuple[float, int]:
            # a counter's value read again (a new subscription's first value, a cut read) says what it is now, not
            # when it changed: counted before the order tags of the same batch (after an outage that spans an order
            # change its parts go to the old order, as in a Modbus scan, never the whole gap to the new one)
            if s.reread and s.key not in control:
                return (-math.inf, 0)
            return (s.time, rank.get(s.key, 0))

        for s in sorted(samples, key=order):
            route = routes.get(s.key)
            if route is not None:
                self._ordered(s, route[0], route[1], out, touched)
        self.stats.samples += len(samples)
        for machine in touched:
            self._schedule(machine)
        return out

    def _ordered(self, s: Sample, machine: str, signal: str, out: list[EventDraft], touched: set[str]) -> None:
        """One sample of a machine with PLC order tags or a completion flag, in sample-time order. While only one tag
        of the order pair has changed (the other may follow a scan later) the machine's samples after the change are
        held, and applied after the switch (gateway/orders.py, ORDER_PAIR_WINDOW_S)."""
        tags = self.tags
        cmd = tags.before_sample(machine, s.time)
        if cmd is HOLD:
            if signal != "order" and signal != "operation":
                tags.hold(machine, s)
                return
        else:
            if cmd is not None:
                out.extend(self.apply_order(cmd))  # type: ignore[arg-type]
            self._release(machine, out, touched)
        if signal == "order" or signal == "operation" or signal == "complete":
            cmd = tags.control_sample(machine, signal, s)
            if signal == "complete":
                level = tags.trackers[machine].complete_level
                eng = self.engines[machine]
                if eng.complete_flag is not level:  # persisted with the machine (committed with a completion)
                    eng.complete_flag = level
                    eng.dirty = True
                    self.dirty.add(machine)
            if cmd is not None:
                out.extend(self.apply_order(cmd))
                self._release(machine, out, touched)
            return
        eng = self.engines[machine]
        try:
            out.extend(eng.apply(s, signal))
        except Exception as exc:  # noqa: BLE001
            self.fault(machine, exc, s)
            return
        if eng.dirty:
            self.dirty.add(machine)
            if eng.urgent:
                self.urgent.add(machine)
            touched.add(machine)

    def _release(self, machine: str, out: list[EventDraft], touched: set[str]) -> None:
        """Apply the samples held for ``machine`` while its order pair was not known (the switch is applied)."""
        held = self.tags.release(machine)
        if held:
            routes = self.routes.signal
            for h in held:
                route = routes.get(h.key)
                if route is not None:
                    self._ordered(h, machine, route[1], out, touched)

    def fault(self, machine: str, exc: BaseException, sample: Sample | None = None, *, frozen: bool = False) -> None:
        """An engine raised (a bug, or input nothing validated): this machine stops counting, the others go on.
        Its last committed state stays: nothing of the engine after the fault is committed (it may hold a sample
        half applied, or the emptied window of a report that could not be encoded), and the events it staged since
        that commit go with it (the rows behind them take their sequence numbers). As after a crash, a restart
        counts from that state: its counter keeps the parts. Not so a machine with reset-on-read or delta counters
        (the device forgot what it handed on): its state at the fault is committed once more with what it staged,
        as before this rule, unless its snapshot itself fails (``frozen``)."""
        if machine in self.faulted:
            if frozen and machine not in self._frozen:
                self._freeze(machine)
            return
        self.faulted[machine] = f"{type(exc).__name__}: {exc}"[:500]
        self.stats.machine_faults += 1
        metrics.MACHINE_FAULTS.inc()
        self.alarms.raise_(f"machine_faulted:{machine}", "critical",
                           "the machine's engine raised; it stops counting until the gateway is restarted (its "
                           "counter keeps the parts)", machine=machine, error=self.faulted[machine])
        routes = self.routes.signal
        for key in [k for k, (m, _) in routes.items() if m == machine]:
            del routes[key]
        self._runs.clear()  # its keys are not routed any more
        dropped = self._freeze(machine) if frozen or self._recountable(machine) else 0
        log.error("machine.faulted", machine=machine, error=self.faulted[machine],
                  sample=None if sample is None else {"key": sample.key, "value": repr(sample.value)[:100]},
                  staged_events_dropped=dropped, exc_info=exc,
                  action="its last committed state stays; restart the gateway (or reload the machine) to count "
                         "again from it")

    def _freeze(self, machine: str) -> int:
        """The faulted machine's state is not committed again; its uncommitted rows go (the number dropped)."""
        self._frozen.add(machine)
        self.dirty.discard(machine)
        self.urgent.discard(machine)
        return 0 if self._committing else self._drop_staged(machine)

    def _recountable(self, machine: str) -> bool:
        """Every counter and meter of the machine is cumulative: its PLC keeps what the engine knew."""
        spec = self.specs.get(machine)
        if spec is None:
            return True
        return all(b.spec.mode == "cumulative" for b in spec.counters.values()) and \
            all(m.binding.spec.mode == "cumulative" for m in spec.materials.values())

    def _drop_staged(self, machine: str) -> int:
        """Drop ``machine``'s uncommitted rows; the others keep their order and are numbered again from the first
        uncommitted sequence number (nothing of them left the process: no gap, no number used twice)."""
        rows = self.uncommitted
        if not any(r.machine == machine for r in rows):
            return 0
        assert self.encoder is not None
        encode = self.encoder.encode
        seq = rows[0].seq
        kept: list[OutboxRow] = []
        drafts: dict[int, EventDraft] = {}
        for r in rows:
            if r.machine == machine:
                continue
            d = self._drafts[r.seq]
            if r.seq != seq:
                topic, payload = encode(d, seq)
                r = OutboxRow(seq, r.machine, r.type, topic, payload, r.time)
            kept.append(r)
            drafts[seq] = d
            seq += 1
        self.uncommitted, self._drafts = kept, drafts
        self.next_seq = seq
        return len(rows) - len(kept)

    # ------------------------------------------------------------------ order commands
    def refusal(self, cmd: OrderCommand) -> OrderRefused | None:
        """Would the machine refuse this command (e.g. an operation it already completed)? For the local command's
        synchronous answer; the core checks again when it applies the command."""
        if cmd.machine in self.faulted:  # it would be dropped when applied: say so now (the local command's 409)
            return OrderRefused("faulted", f"machine {cmd.machine} is faulted (its engine raised: "
                                           f"{self.faulted[cmd.machine]}); it takes no order until the gateway is "
                                           f"restarted or the machine is reloaded")
        eng = self.engines.get(cmd.machine)
        return eng.refusal(cmd.context) if eng is not None else None

    def _order_command(self, cmd: OrderCommand | CompleteCommand) -> None:
        """An order command from an order source: apply now, or after the machine's cut read."""
        machine = cmd.machine
        if machine not in self.engines:
            # queued for a machine a reload removed meanwhile (the order sources take the new table at its end)
            log.warning("order.machine_removed", machine=machine, source=cmd.source,
                        action="dropped: the machine is no longer configured")
            return
        if machine in self.faulted:
            log.warning("order.ignored_machine_faulted", machine=machine, source=cmd.source,
                        order=getattr(getattr(cmd, "context", None), "order", None),
                        clear=isinstance(cmd, OrderCommand) and cmd.context is None)
            return
        cut = self.cuts.get(machine)
        if cut is not None:
            cut.commands.append(cmd)
            return
        if isinstance(cmd, CompleteCommand):
            self.stage(self.apply_order(cmd))
            return
        eng = self.engines[machine]
        refused = eng.refusal(cmd.context)
        if refused is not None:  # no cut read for an order that will not be applied
            self._on_refused(cmd, refused)
            return
        if eng.unchanged_by(cmd.context):  # e.g. the retained dispatch again, after a reconnect or a resync
            self.stats.dispatch_unchanged += 1
            log.debug("order.unchanged", machine=machine, source=cmd.source)
            return
        cur, new = eng.context, cmd.context
        if new is not None and new.status == "completed" and (cur is None or cur.ref != new.ref):
            self.stage(self.apply_order(cmd))  # an operation that ran earlier: no changeover, no cut read
            return
        changes = (cur is None) != (new is None) or (
            cur is not None and new is not None and (cur.ref != new.ref or new.status != cur.status))
        if changes and cmd.needs_cut and self.routes.cut_keys.get(machine):
            cut = self.cuts[machine] = _Cut(machine, [cmd])
            cut.task = asyncio.get_running_loop().create_task(self._cut_read(machine), name=f"cut.{machine}")
            return
        self.stage(self.apply_order(cmd))

    async def _cut_read(self, machine: str) -> None:
        """Phase one of a changeover: read every counter of the machine, and hand the result to the core. A
        connector that cannot answer is retried (with backoff) until it can: the changeover is held until the
        first good read, so parts made before it are never booked to the new order."""
        from gateway.component import Backoff

        samples: list[Sample] = []
        for cid, keys in list(self.routes.cut_keys[machine].items()):
            backoff = Backoff(0.05, CUT_RETRY_MAX_S)
            started = time.monotonic()
            reported = False
            while True:
                try:
                    read = await self._read(cid, keys, CUT_READ_TIMEOUT_S)
                    bad = next((s for s in read if not s.good), None)
                    if bad is not None:  # e.g. OPC UA BadCommunicationError: answered, but no value is no cut
                        good = [dataclasses.replace(s, reread=True) for s in read if s.good]
                        held_s = time.monotonic() - started
                        if held_s >= CUT_PARTIAL_AFTER_S:
                            # answered, but some counters stay Bad (a node removed by a PLC program change): the
                            # changeover is not held for ever (every part of every counter would go to the old
                            # order). The good ones are the cut; the Bad ones count from their next good value on
                            samples.extend(good)
                            self.stats.cut_partial += 1
                            log.warning("changeover.cut_partial", machine=machine, connector=cid, held_s=round(held_s, 1),
                                        without=sorted({f"{s.key}: {s.status}" for s in read if not s.good}),
                                        risk="what these counters counted while Bad goes to the new order")
                            break
                        # the good values it read are readings before the cut: a reset-on-read register was
                        # cleared by this read, its value is the only copy (a reread of the others changes nothing)
                        if good:
                            self.on_samples(good)
                        raise ReadFailed(f"{bad.key}: {bad.status}", connector=cid, tag=bad.key)
                    # a re-read: the current value again (a delta register re-read at the cut is not new production)
                    samples.extend(dataclasses.replace(s, reread=True) for s in read)
                    break
                except Exception as exc:  # noqa: BLE001 - anything a read raises (a connector torn down, a bug)
                    # holds the cut and is retried: a task ended by it would hold the machine's changeover for ever
                    # (its commands queued behind a cut that never completes). A connector still connecting
                    # (typically right after a restart) is waited for quietly
                    if not reported and (not isinstance(exc, ConnectorUnavailable)
                                         or time.monotonic() - started >= CUT_READ_TIMEOUT_S):
                        reported = True
                        self.stats.cut_read_failures += 1
                        log.warning("changeover.cut_read_failed", machine=machine, connector=cid,
                                    error=f"{type(exc).__name__}: {exc}" if not isinstance(
                                        exc, (TimeoutError, ConnectorError)) else str(exc) or type(exc).__name__,
                                    action="held until the first good read")
                await asyncio.sleep(backoff.next())
            if reported:
                log.info("changeover.cut_read_recovered", machine=machine, connector=cid,
                         held_s=round(time.monotonic() - started, 3))
        self.put(CutDone(machine, samples))

    def _cut_done(self, done: CutDone) -> None:
        """Phase two: the read is the cut — apply it, then the commands that waited for it, in order."""
        cut = self.cuts.pop(done.machine, None)
        self.stage(self.apply_samples(done.samples))
        if cut is None:
            return
        for cmd in cut.commands:
            self.stage(self.apply_order(cmd))

    def apply_order(self, cmd: OrderCommand | CompleteCommand) -> list[EventDraft]:
        machine = cmd.machine
        if machine in self.faulted or machine not in self.engines:
            return []
        eng = self.engines[machine]
        if isinstance(cmd, CompleteCommand):
            cur = eng.context  # the operation active at that sample
            if cur is None:
                log.warning("order.complete_without_order", machine=machine)
                return []
            cmd = OrderCommand(machine, dataclasses.replace(cur, status="completed"), cmd.source, needs_cut=False)
        try:
            out = eng.dispatch(cmd.context, time.time())
        except OrderRefused as exc:
            self._on_refused(cmd, exc)
            if cmd.source == "tag" and eng.context is not None:
                # the PLC's tags show an operation completed here (not reopened): what the machine makes now is not
                # the previous operation's, nor may the next completion flag complete that one
                ctx = cmd.context
                log.warning("order_tag.completed_operation", machine=machine, order=ctx.order if ctx else None,
                            operation=ctx.operation if ctx else None,
                            action="counts reported unassigned until the tags show another order")
                return self.apply_order(OrderCommand(machine, None, "tag", needs_cut=False))
            return []
        except Exception as exc:  # noqa: BLE001 - e.g. a value nothing validated: this machine faults, not all
            self.fault(machine, exc)
            return []
        if eng.dirty:
            self.dirty.add(machine)
            eng.urgent = True  # an order change is persisted now, not at the next checkpoint
            self.urgent.add(machine)
        self.stats.dispatch_accepted += 1
        metrics.DISPATCH_ACCEPTED.inc()
        ctx = cmd.context
        log.info("order.applied", machine=machine, source=cmd.source,
                 order=ctx.order if ctx else None, operation=ctx.operation if ctx else None,
                 status=ctx.status if ctx else "cleared")
        self._schedule(machine)
        return out

    # ------------------------------------------------------------------ reporting windows (timer heap)
    def _schedule(self, machine: str) -> None:
        eng = self.engines.get(machine)
        if eng is None:
            return
        d = eng.next_deadline()
        if d is None:
            # no window open (e.g. a changeover just flushed it): a timer still in the heap is stale, and the window
            # that opens next is scheduled by the call that opens it (the sample paths schedule unscheduled machines)
            self.scheduled.pop(machine, None)
            return
        if d > -math.inf:
            # timer slots: windows that close within one slot close together, in one round and one group commit
            # (3,333 machines reporting every 5 s would otherwise mean ~670 commits - and fsyncs - per second; with
            # their reports spread by the jitter, one commit per 100 ms slot still cost ~20 % more CPU per polled tag
            # than 2 per second). The slot starts at or before the deadline: a window closes up to one slot early,
            # never late (a report at least every interval_s); run_timers ticks the engine at its own deadline.
            slot = timer_slot(eng.spec.interval_s)
            d = math.floor(d / slot) * slot
        if self.scheduled.get(machine) == d:
            return
        self.scheduled[machine] = d
        slot = self._slots.get(d)
        if slot is None:
            self._slots[d] = [machine]
            heapq.heappush(self._timers, d)
        else:
            slot.append(machine)

    def run_timers(self) -> None:
        timers = self._timers
        if timers:
            now = self.now()
            scheduled, engines, faulted, dirty, urgent = self.scheduled, self.engines, self.faulted, self.dirty, \
                self.urgent
            staged: list[EventDraft] = []  # the slot's reports, staged together in machine order (one call)
            slots = self._slots
            while timers and timers[0] <= now:
                d = heapq.heappop(timers)
                machines = slots.pop(d)
                machines.sort()
                try:
                    for machine in machines:
                        if scheduled.get(machine) != d:
                            continue  # superseded (or seen already: a machine scheduled to one slot twice)
                        del scheduled[machine]
                        eng = engines[machine]
                        if machine in faulted:
                            continue
                        try:
                            due = eng.next_deadline()  # within this slot (slots start at or before a deadline)
                            drafts = eng.tick(now if due is None else max(now, due))
                        except Exception as exc:  # noqa: BLE001
                            self.fault(machine, exc)
                            continue
                        if eng.dirty:
                            dirty.add(machine)
                            if eng.urgent:
                                urgent.add(machine)
                        if drafts:
                            staged += drafts
                        if eng.next_deadline() is not None:  # else no window open (it just closed): no timer
                            self._schedule(machine)
                except BaseException:
                    # the machines of this slot not handled yet keep their timer
                    rest = [m for m in machines if scheduled.get(m) == d]
                    if rest:
                        if d not in slots:
                            heapq.heappush(timers, d)
                        slots.setdefault(d, []).extend(rest)
                    raise
            self.stage(staged)
        self.settle_order_tags()

    def settle_order_tags(self, *, all_now: bool = False, machines: set[str] | None = None) -> None:
        """A pending PLC-tag switch of a machine that sends nothing after it is applied once it has settled, then
        the samples held for it. ``all_now``: every pending one (the gateway is stopping; a reload rebuilds
        ``machines``)."""
        out: list[EventDraft] = []
        touched: set[str] = set()
        for machine, cmd in self.tags.settled(time.monotonic(), all_now=all_now, machines=machines):
            if cmd is not None:
                out.extend(self.apply_order(cmd))
            self._release(machine, out, touched)
        self.stage(out)
        for machine in touched:
            self._schedule(machine)

    # ------------------------------------------------------------------ staging and the group commit
    def _update_full(self) -> None:
        full = self.store.full
        if full != self._full:
            self._full = full
            for e in self.engines.values():
                e.hold_reports = full or self._commit_failing is not None
            if full:
                self._full_since = time.monotonic()
                log.error("store.full", pending_bytes=self.store.pending_bytes, max_bytes=self.store.max_bytes,
                          disk_full=self.store.disk_full,
                          action="quantities accumulate in machine state; state-change events are dropped")
            else:
                log.info("store.space_recovered", pending_bytes=self.store.pending_bytes,
                         downtime_s=round(time.monotonic() - self._full_since, 3),
                         dropped=dict(self.stats.dropped_while_full))
                for mid in self.engines:
                    self._schedule(mid)
            metrics.STORE_FULL.set(1 if full else 0)
            self.alarms.set("store_full", full, "critical",
                            "the store is at its size cap or the disk is full: quantities accumulate in machine "
                            "state, state-change events are dropped (counted)",
                            pending_bytes=self.store.pending_bytes, max_bytes=self.store.max_bytes,
                            disk_full=self.store.disk_full)

    def stage(self, events: list[EventDraft]) -> None:
        """Give drafts their sequence numbers and payloads, in the same synchronous step as the engine change that
        made them: from here on they are committed with that state, or not at all (never one without the other)."""
        if not events:
            return
        assert self.encoder is not None
        if self._full:
            kept = []
            for ev in events:
                if ev.droppable:
                    self.stats.dropped_while_full[ev.type] += 1
                    metrics.DROPPED.labels(ev.type).inc()
                else:
                    kept.append(ev)
            events = kept
        if self.on_staged is not None:
            self.on_staged(events)
        encode = self.encoder.encode
        faulted = self.faulted
        for ev in events:
            if faulted and ev.subject in faulted:
                continue  # made before its machine's fault in the same call: it goes with the engine's state
            seq = self.next_seq
            try:
                topic, payload = encode(ev, seq)
            except Exception as exc:  # noqa: BLE001 - a draft that cannot be encoded is a bug in one machine
                log.error("event.encode_failed", machine=ev.subject, type=ev.type, data=repr(ev.data)[:2000])
                self.fault(ev.subject, exc)
                continue
            self.next_seq = seq + 1
            self.uncommitted.append(OutboxRow(seq, ev.subject, ev.type, topic, payload, ev.time))
            self._drafts[seq] = ev
            self.dirty.add(ev.subject)  # committed with its rows (whatever else made the engine urgent, too)

    async def commit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._commit_backoff_until and not force:
            return
        self._update_full()
        dirty = self.dirty
        faulted = self._frozen
        if faulted:
            dirty.difference_update(faulted)  # a faulted machine's state is not committed again
        rows = self.uncommitted
        half = self.checkpoint_s / 2
        checkpoint = force or now - self._last_checkpoint >= half
        engines = self.engines
        urgent = self.urgent
        if not rows and not (dirty and (checkpoint or urgent)):
            return
        # The snapshot of a machine goes with the events derived from it (and urgent state: reset-on-read deltas, an
        # order change). Other machines' counters are their own durable log: their snapshots wait for the checkpoint,
        # so a commit does not serialise every engine of a large gateway (nor look at each of them: ``urgent`` is
        # the set of machines seen urgent after an engine call, kept by the core).
        # The checkpoint (every half CHECKPOINT_S) takes the dirty machines whose state was last committed half
        # CHECKPOINT_S ago or more: no machine's committed state gets older than CHECKPOINT_S, and a machine that
        # reports every few seconds (its snapshot goes with its reports) is not snapshotted a second time.
        if force:
            committed = list(dirty)
        else:
            committed = [m for m in {r.machine for r in rows} | urgent if m in dirty]
            if checkpoint:
                snapped = self._snapped
                taken = set(committed)
                committed += [m for m in dirty if m not in taken and now - snapped.get(m, -math.inf) >= half]
        if not rows and not committed:  # e.g. a checkpoint with nothing old enough
            if checkpoint:
                self._last_checkpoint = now
            return
        states: dict[str, Any] = {}
        for m in committed:
            try:
                states[m] = engines[m].snapshot_json()
            except Exception as exc:  # noqa: BLE001 - one machine's bug: it faults (its rows go with it), not the core
                self.fault(m, exc, frozen=True)
        if faulted:
            committed = [m for m in committed if m in states]
            rows = self.uncommitted
        started = time.monotonic()
        self._committing = True
        try:
            committed_rows = await self.store.commit(states, rows, self.next_seq)
        except StoreError as exc:
            self.stats.commit_failures += 1
            kind = getattr(exc, "kind", "disk_full" if exc.disk_full else "other")
            metrics.COMMIT_FAILURES.labels(kind).inc()
            if self._commit_failing is None:
                self._commit_failing = str(exc)
                # while nothing can be committed, reporting windows stay open (their quantities accumulate in the
                # engines, as with a full store), so the rows held in memory do not grow with every report
                for e in engines.values():
                    e.hold_reports = True
                log.error("store.commit_failed", error=str(exc), pending_rows=len(rows), kind=kind,
                          action="events and state stay staged, reports held; retried every 0.5 s")
                self.alarms.raise_("store_commit_failing", "critical",
                                   "commits to the store fail: events are held in memory, nothing is published",
                                   error=str(exc)[:300], kind=kind)
            self._update_full()
            # rows stay staged with their sequence numbers and the state with them; retried after a pause
            self._commit_backoff_until = time.monotonic() + 0.5
            return
        finally:
            self._committing = False
        if self._commit_failing is not None:
            self._commit_failing = None
            self.alarms.clear("store_commit_failing", failures=self.stats.commit_failures)
            for mid, e in engines.items():
                e.hold_reports = self._full
                if not self._full:
                    self._schedule(mid)  # the windows held meanwhile report at their next slot
        snapped = self._snapped
        for m in committed:
            e = engines[m]
            e.dirty = e.urgent = False
            dirty.discard(m)
            snapped[m] = now
        urgent.difference_update(committed)
        self.uncommitted = []
        self._drafts = {}
        if checkpoint:
            self._last_checkpoint = now
        self.stats.commits += 1
        if self.on_commit is not None:
            self.on_commit(rows, time.monotonic() - started)
        if rows:
            self.stats.events_committed += len(rows)
            self._notify(committed_rows)
            if self.ticker is not None:
                self.ticker.committed(rows)
            crash_point("core.handed_over")

    @property
    def commit_failing(self) -> str | None:
        return self._commit_failing

    def cancel_cuts(self) -> None:
        read = {i.machine for i in self.inbox if isinstance(i, CutDone)}  # drain() applies those commands
        for machine, cut in self.cuts.items():
            if cut.task is not None:
                cut.task.cancel()
            if machine not in read:
                self._not_applied(cut.commands, "the gateway stopped before the machine's changeover counter read")

    @staticmethod
    def _not_applied(commands: Any, why: str) -> None:
        """Order commands dropped at a stop: a retained MQTT dispatch comes again at the next start, a local order
        (``edge-gateway order set``, the HTTP API) does not. Each local one is logged, to be set again."""
        for cmd in commands:
            # an ERP clear (an empty retained payload) deleted its retained dispatch: nothing comes again either
            if isinstance(cmd, OrderCommand) and (cmd.source == "local" or (cmd.source == "mqtt" and cmd.context is None)):
                ctx = cmd.context
                log.warning("order.not_applied", machine=cmd.machine, source=cmd.source,
                            order=ctx.order if ctx else None, operation=ctx.operation if ctx else None, reason=why,
                            action="set it again once the gateway runs" if cmd.source == "local" else
                            "the ERP's clear left nothing retained: publish it again once the gateway runs")
