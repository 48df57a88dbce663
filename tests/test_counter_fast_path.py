"""``counters.plain_increase`` (the engine's fast path for every polled tag of a running machine) is ``step``'s
``increase`` case and nothing else: whatever the input, a counter state and an engine that take it give the same
states, results and events as ``step`` alone."""

from __future__ import annotations

import copy
import dataclasses
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappings.counters import CounterSpec, CounterState, plain, plain_increase, step
import json

from mappings.machine import CounterBinding, MachineEngine, MachineSpec, MaterialMeter, OrderContext, OrderRefused
from mappings.samples import Sample

SPECS = [CounterSpec("good", modulus=2**16, max_rate=50.0), CounterSpec("good", modulus=None, max_rate=5.0),
         CounterSpec("good", modulus=2**32, signed=True, max_rate=1e6)]

samples = st.lists(st.tuples(
    st.one_of(st.integers(min_value=-10, max_value=2**17), st.integers(min_value=0, max_value=40),
              st.floats(min_value=0, max_value=100), st.none(), st.booleans()),
    st.booleans() | st.just(True),  # good
    st.floats(min_value=-30, max_value=600),  # recv time step (a wall-clock step back sometimes)
    st.one_of(st.none(), st.sampled_from([-5.0, -0.5, 0.0, 0.5]),  # source time step (late deliveries), or none
              st.floats(min_value=-30, max_value=600)),
    st.one_of(st.none(), st.floats(min_value=0, max_value=600)),  # monotonic step, or no monotonic time
), max_size=60)


def run(spec: CounterSpec, program: list, fast: bool) -> list:
    state = CounterState()
    recv, src, mono = 1e9, 1.7e9, 100.0
    out = []
    for value, good, d_recv, d_src, d_mono in program:
        recv += d_recv
        src = None if d_src is None else (src or 1.7e9) + d_src
        mono = None if d_mono is None else (mono or 100.0) + d_mono
        s = Sample("m/good", value, good, recv_time=recv, source_time=src, mono=mono)
        if fast and plain(spec):
            delta = plain_increase(state, s, spec.modulus, spec.max_rate)
            if delta:
                out.append(("increase", delta, state.last - delta, state.last, dataclasses.astuple(state)))
                continue
        r = step(spec, state, s)
        if r.outcome == "increase":
            out.append(("increase", r.delta, r.previous, r.value, dataclasses.astuple(state)))
        else:
            out.append((r.outcome, dataclasses.astuple(r), dataclasses.astuple(state)))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SPECS), samples)
def test_plain_increase_is_steps_increase_case(spec, program):
    assert run(spec, program, fast=True) == run(spec, program, fast=False)


def test_plain_increase_takes_the_common_case_and_leaves_the_rest_untouched():
    spec = SPECS[0]
    state = CounterState()
    assert plain_increase(state, Sample("m/good", 5, True, recv_time=10.0, mono=1.0), 2**16, 50.0) == 0  # no baseline
    step(spec, state, Sample("m/good", 5, True, recv_time=10.0, mono=1.0))
    assert plain_increase(state, Sample("m/good", 9, True, recv_time=11.0, mono=2.0), 2**16, 50.0) == 4
    assert (state.last, state.last_time, state.last_mono) == (9, 11.0, 2.0)
    before = copy.copy(state)
    for s in (Sample("m/good", 3, True, recv_time=12.0, mono=3.0),  # a decrease: rollover / reset, not here
              Sample("m/good", 9000, True, recv_time=12.0, mono=3.0),  # implausible
              Sample("m/good", 10, True, recv_time=12.0, mono=1.5),  # arrived before the baseline
              Sample("m/good", 10, True, recv_time=10.5),  # no monotonic time: older than the baseline's wall time
              Sample("m/good", 10, True, recv_time=12.0, source_time=5.0, mono=3.0),  # older source time
              Sample("m/good", 10.0, True, recv_time=12.0, mono=3.0),  # a float reading
              Sample("m/good", 10, False, recv_time=12.0, mono=3.0)):  # bad
        assert plain_increase(state, s, spec.modulus, spec.max_rate) == 0
        assert state == before
    assert not plain(CounterSpec("good", mode="delta")) and not plain(CounterSpec("m", resolution=Decimal("0.1")))


def engine_spec(max_units: int | None) -> MachineSpec:
    return MachineSpec(
        id="m",
        counters={"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=20.0)),
                  "scrap": CounterBinding(CounterSpec("scrap", modulus=2**16), Decimal("0.5")),
                  "rework": CounterBinding(CounterSpec("rework", mode="delta"))},
        materials={"RM-1": MaterialMeter(CounterBinding(CounterSpec("material:RM-1", modulus=None, max_rate=1e4),
                                                        Decimal("0.001")), "L")},
        interval_s=10.0, max_units=max_units)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([None, 40]),
       st.lists(st.tuples(st.sampled_from(["good", "scrap", "rework", "material:RM-1", "dispatch", "restart",
                                           "counter_spec"]),
                          st.one_of(st.integers(min_value=-3, max_value=40), st.integers(min_value=0, max_value=70_000)),
                          st.floats(min_value=0, max_value=30),
                          st.sampled_from(["none", "tick", "snapshot", "deadline"])), max_size=60))
def test_engine_events_and_state_are_the_same_without_the_fast_path(max_units, program):
    """The engine's fast path (increases accumulated in the counter's cell, folded into the window when anything
    looks at it) against the same engine taking every sample through ``step`` and ``_count``: the same events, the
    same snapshots, the same deadlines, the same dirty / urgent flags, whatever the mix of samples, dispatches,
    restarts, ticks and spec changes."""
    spec = engine_spec(max_units)

    def slow_engine(eng: MachineEngine) -> MachineEngine:
        for cell in eng._signals.values():
            cell.fast = False
        return eng

    fast, slow = MachineEngine(spec), slow_engine(MachineEngine(spec))
    mono = 0.0
    reg: dict[str, int] = {}

    def same(a, b):
        assert [(e.type, e.subject, e.time, e.data) for e in a] == [(e.type, e.subject, e.time, e.data) for e in b]
        # the bytes the encoder writes, too (a periodic report of fast-path increases only is made by
        # MachineEngine._flush_pending, without the window's objects)
        assert [e.data.to_json() for e in a] == [e.data.to_json() for e in b]
        for e in a:  # the parts the status page adds up are the report's own quantities
            if e.type == "operation.quantity_reported":
                q = e.data.quantities
                assert e.parts == Decimal(q.yield_) + Decimal(q.scrap) + Decimal(q.rework)

    for what, value, dt, then in program:
        mono += dt if dt > 5 else dt / 10  # mostly polls, sometimes gaps
        if what == "dispatch":
            ctx = OrderContext(f"A{value % 3}", "10", "completed" if value % 5 == 0 else "active")
            try:
                a = fast.dispatch(ctx, 1e9 + mono)
            except OrderRefused:
                a = None
            try:
                b = slow.dispatch(ctx, 1e9 + mono)
            except OrderRefused:
                b = None
            assert (a is None) == (b is None)
            if a is not None:
                same(a, b)
        elif what == "restart":
            fast = MachineEngine(spec, json.loads(fast.snapshot_json()))
            slow = slow_engine(MachineEngine(spec, slow.snapshot()))
        elif what == "counter_spec":
            new = CounterSpec("good", modulus=2**32 if value % 2 else 2**16, max_rate=20.0 + value % 7)
            assert fast.set_counter_spec("good", new) == slow.set_counter_spec("good", new)
        else:  # mostly small steps of a running counter (the fast path), sometimes any value
            reg[what] = reg.get(what, 0) + value if -3 <= value <= 40 else value
            s = Sample(f"m/{what}", reg[what], True, recv_time=1e9 + mono, mono=mono)
            same(fast.apply(s, what), slow.apply(s, what))
        if then == "tick":
            same(fast.tick(mono), slow.tick(mono))
        elif then == "snapshot":
            assert fast.snapshot_json() == json.dumps(slow.snapshot(), separators=(",", ":"))
        elif then == "deadline":
            assert fast.next_deadline() == slow.next_deadline()
        assert (fast.dirty, fast.urgent) == (slow.dirty, slow.urgent)
        fast.dirty = slow.dirty = fast.urgent = slow.urgent = False  # as a commit does
    same(fast.flush("periodic", 2e9), slow.flush("periodic", 2e9))
    assert fast.snapshot() == slow.snapshot()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([None, 40]),
       st.lists(st.tuples(
           st.lists(st.tuples(st.sampled_from(["good", "scrap", "rework", "material:RM-1", "state", "unrouted"]),
                              st.one_of(st.integers(min_value=-3, max_value=40),
                                        st.integers(min_value=0, max_value=70_000), st.none())),
                    max_size=8),
           st.one_of(st.floats(min_value=0, max_value=30), st.just(-0.5)),  # a run older than the last reading
           st.sampled_from(["none", "tick", "snapshot", "restart"])), max_size=40))
def test_a_run_is_applied_as_its_samples_would_be(max_units, polls):
    """``apply_run`` (a poll's block of plain registers, counted without a ``Sample`` per value) against the same
    engine taking each value as a ``Sample`` through ``MachineEngine.apply``: the same events in the same order, the
    same snapshots and deadlines, the same dirty / urgent flags, whatever the mix of plain increases, decreases,
    jumps, unchanged values (None), other signals and unrouted keys; an engine it reports as touched is dirty."""
    from mappings.machine import apply_run

    spec = engine_spec(max_units)
    by_run, by_samples = MachineEngine(spec), MachineEngine(spec)
    mono, recv = 0.0, 1e9
    reg: dict[str, int] = {}

    def same(a, b):
        assert [(e.type, e.subject, e.time, e.data) for e in a] == [(e.type, e.subject, e.time, e.data) for e in b]

    for poll, dt, then in polls:
        mono += dt if dt > 5 else dt / 10
        recv += dt
        keys, values = [], []
        for signal, step_ in poll:
            if step_ is not None:
                reg[signal] = reg.get(signal, 0) + step_ if -3 <= step_ <= 40 else step_
            keys.append(signal)
            values.append(None if step_ is None else reg[signal])
        routes = [None if k == "unrouted" else (by_run, by_run.cell(k)) for k in keys]
        got: list = []

        def slow(i: int) -> None:
            got.extend(by_run.apply(Sample(f"m/{keys[i]}", values[i], True, recv_time=recv, mono=mono), keys[i]))

        touched = apply_run(routes, values, recv, mono, slow)
        want: list = []
        for k, v in zip(keys, values):
            if v is not None and k != "unrouted":
                want.extend(by_samples.apply(Sample(f"m/{k}", v, True, recv_time=recv, mono=mono), k))
        same(got, want)
        assert all(e is by_run for e in touched) and (not touched or by_run.dirty)
        assert (by_run.dirty, by_run.urgent) == (by_samples.dirty, by_samples.urgent)
        assert by_run.next_deadline() == by_samples.next_deadline()
        if then == "tick":
            same(by_run.tick(mono), by_samples.tick(mono))
        elif then == "snapshot":
            assert by_run.snapshot_json() == by_samples.snapshot_json()
        elif then == "restart":
            by_run = MachineEngine(spec, json.loads(by_run.snapshot_json()))
            by_samples = MachineEngine(spec, json.loads(by_samples.snapshot_json()))
        by_run.dirty = by_samples.dirty = by_run.urgent = by_samples.urgent = False
    same(by_run.flush("periodic", 2e9), by_samples.flush("periodic", 2e9))
    assert by_run.snapshot() == by_samples.snapshot()


def test_a_run_takes_plain_increases_itself_and_hands_on_the_rest_in_place():
    """What ``apply_run`` counts itself (no ``Sample``): a plain increase within max_rate over the elapsed time plus
    the jump tolerance; a first reading, a decrease, an implausible jump, a reading older than the last one and
    another signal go to ``slow`` at their index, unrouted keys and unchanged values (None) nowhere."""
    from mappings.machine import apply_run

    eng = MachineEngine(engine_spec(None))
    good, state = eng.cell("good"), eng.cell("state")
    assert state is None and good is not None and good.fast
    slow: list[int] = []
    keys = ["good", "unrouted", "state"]

    def apply(i: int) -> None:  # what the core does with a reading the run hands on
        slow.append(i)
        eng.apply(Sample(f"m/{keys[i]}", [100, 5, 1][i], True, recv_time=1e9, mono=10.0), keys[i])

    routes = [(eng, good), None, (eng, state)]
    assert apply_run(routes, [100, 5, 1], 1e9, 10.0, apply) == [] and slow == [0, 2]  # the baseline, state
    assert good.last == 100
    slow.clear()
    # max_rate 20/s: 0.5 s after the baseline, 50 = 20 * (0.5 + 2.0 of tolerance) is plausible, 51 is not
    assert apply_run([(eng, good), None], [150, 7], 1e9 + 0.5, 10.5, slow.append) == [eng] and slow == []
    assert (good.last, good.acc, good.first_prev, eng._pend_opened, eng.dirty) == (150, 50, 100, 10.5, True)
    for values, mono in (([201], 11.0), ([149], 11.0), ([160], 10.4)):  # jump, decrease, older reading
        eng2 = MachineEngine(engine_spec(None), json.loads(eng.snapshot_json()))
        eng2.cell("good").last_mono = 10.5
        slow.clear()
        assert apply_run([(eng2, eng2.cell("good"))], values, 1e9 + 1, mono, slow.append) == [] and slow == [0]
    slow.clear()
    assert apply_run([(eng, good), (eng, good)], [None, None], 1e9 + 1, 11.0, slow.append) == [] and slow == []
