"""Property: for any production history inside the documented counter rules (rollovers, resets, zero glitches, bad
reads, restarts, order changeovers with a cut read), the sum of reported yield per order equals what was made."""

from __future__ import annotations

from collections import defaultdict
import json
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappings.counters import JUMP_TOLERANCE_S, CounterSpec
from mappings.machine import CounterBinding, MachineEngine, MachineSpec, OrderContext
from mappings.samples import Sample

RATE = 100.0  # the machine's max plausible rate (units/s)

step_strategy = st.tuples(
    st.floats(min_value=0.05, max_value=3.0, allow_nan=False),            # elapsed time
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),             # fraction of the max rate produced
    st.sampled_from(["read", "read", "read", "bad", "glitch", "reset", "dispatch", "restart"]),
    st.sampled_from([None, ("A", "10"), ("B", "20"), ("C", "10")]),       # order for "dispatch"
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([16, 32]), start=st.integers(min_value=0, max_value=2**32 - 1),
       steps=st.lists(step_strategy, min_size=1, max_size=60))
def test_reported_yield_equals_production_per_order(bits, start, steps):
    modulus = 2**bits
    spec = MachineSpec(id="m", counters={"good": CounterBinding(CounterSpec("good", modulus=modulus, max_rate=RATE))},
                       interval_s=1e9)
    eng = MachineEngine(spec)
    reg = start % modulus          # the PLC register
    t = 0.0
    order = None
    truth: dict[object, int] = defaultdict(int)
    reported: dict[object, Decimal] = defaultdict(Decimal)
    last_read = None               # (value, time) of the last good read the engine accepted
    glitch_pending = False

    def collect(events):
        for e in events:
            if e.type == "operation.quantity_reported":
                key = (e.data["order"], e.data["operation"]) if e.data["order"] else None
                reported[key] += Decimal(e.data["quantities"]["yield"])

    def read(value):
        nonlocal last_read
        collect(eng.apply(Sample("m/good", value, True, recv_time=t, source_time=t), "good"))
        if value != 0 or not glitch_pending:
            last_read = (value, t)

    read(reg)  # baseline
    for dt, frac, kind, new_order in steps:
        if glitch_pending and kind in ("reset", "glitch", "dispatch", "restart", "bad"):
            kind = "read"  # after a transient zero, the next good read must be >= the previous one (rule)
        elapsed = t + dt - last_read[1]
        parts = int(RATE * dt * frac)
        allowance = RATE * (elapsed + JUMP_TOLERANCE_S)
        if kind == "reset":
            # a reset is only recognisable when it cannot be a plausible rollover and lands below the last read;
            # parts made after the last good read and before a reset were never visible: no history can hold them
            if not (0 < parts < last_read[0] and modulus - last_read[0] > allowance and reg == last_read[0]):
                kind = "read"
        if kind == "glitch":
            if not (last_read[0] > 0 and modulus - last_read[0] > allowance and reg + parts < modulus):
                kind = "read"
        if glitch_pending and reg + parts >= modulus:
            parts = modulus - 1 - reg  # no wrap right after a glitch
        t += dt
        truth[order] += parts
        if kind == "reset":
            reg = parts
            read(reg)
        else:
            reg = (reg + parts) % modulus
        if kind == "read":
            read(reg)
            glitch_pending = False
        elif kind == "bad":
            collect(eng.apply(Sample("m/good", None, False, recv_time=t, source_time=t), "good"))
        elif kind == "glitch":
            collect(eng.apply(Sample("m/good", 0, True, recv_time=t, source_time=t), "good"))
            glitch_pending = True
        elif kind == "restart":
            # the core commits snapshot_json: byte for byte the JSON of snapshot(), and what the restart reads
            text = eng.snapshot_json()
            assert text == json.dumps(eng.snapshot(), separators=(",", ":"))
            eng = MachineEngine(spec, json.loads(text))
        elif kind == "dispatch":
            read(reg)  # the cut
            ctx = None if new_order is None else OrderContext(*new_order)
            collect(eng.dispatch(ctx, t))
            order = new_order
    t += 0.5
    read(reg)
    collect(eng.flush("periodic", t))
    expected = {k: Decimal(v) for k, v in truth.items() if v}
    got = {k: v for k, v in reported.items() if v}
    assert got == expected


clock_step_strategy = st.tuples(
    st.floats(min_value=0.05, max_value=3.0, allow_nan=False),             # elapsed (monotonic) time
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),              # fraction of the max rate produced
    st.sampled_from(["read", "read", "read", "bad", "step", "again"]),
    st.one_of(st.floats(min_value=-7200.0, max_value=7200.0, allow_nan=False),   # clock step of the source/wall clock
              st.sampled_from([-3600.0, 3600.0, -9.5, -0.5, 0.5, -10.0])),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["cumulative", "delta", "reset_on_read"]), bits=st.sampled_from([16, 32]),
       start=st.integers(min_value=0, max_value=2**32 - 1), with_source=st.booleans(),
       steps=st.lists(clock_step_strategy, min_size=1, max_size=60))
def test_clock_steps_and_redeliveries_neither_lose_nor_invent(mode, bits, start, with_source, steps):
    """Source and wall clocks step by arbitrary amounts (NTP, DST) while the monotonic clock advances; values are
    delivered again (the cut read, a re-subscription). For every counter mode the reported yield equals what was made,
    and no anomaly is raised."""
    modulus = 2**bits
    spec = MachineSpec(id="m", counters={"good": CounterBinding(CounterSpec("good", mode=mode, modulus=modulus,
                                                                            max_rate=RATE))}, interval_s=1e9)
    eng = MachineEngine(spec)
    reg = start % modulus
    mono, clock = 1000.0, 1_800_000_000.0
    made, reported, events = 0, Decimal(0), []
    pending = 0                   # delta modes: made since the last read
    last = None                   # the last good sample delivered

    def deliver(s):
        nonlocal last
        events.extend(eng.apply(s, "good"))
        last = s

    def read():
        nonlocal pending
        value = reg if mode == "cumulative" else pending
        pending = 0
        deliver(Sample("m/good", value, True, recv_time=clock, source_time=clock if with_source else None, mono=mono))

    if mode != "cumulative":
        pending = 3
        made += 3
    read()  # baseline (cumulative) / first delta
    latest = clock
    for dt, frac, kind, jump in steps:
        parts = int(RATE * dt * frac)
        mono += dt
        clock += dt
        made += parts
        reg = (reg + parts) % modulus
        pending += parts
        if kind == "step":
            clock += jump
            read()
        elif kind == "read":
            read()
        elif kind == "bad":
            eng.apply(Sample("m/good", None, False, recv_time=clock, mono=mono), "good")
        elif kind == "again":
            # the current value delivered again: same source time (OPC UA), or the flagged cut read (no source time)
            if with_source:
                deliver(Sample("m/good", last.value, True, recv_time=clock, source_time=last.source_time, mono=mono))
            elif mode == "reset_on_read":
                read()  # a read clears the device's register: the cut read is a real read
            else:
                deliver(Sample("m/good", last.value if mode == "delta" else reg, True, recv_time=clock, mono=mono,
                               reread=True))
        latest = max(latest, clock)
    # a cumulative reading older than the baseline by less than the reorder window is set aside (delayed, not lost):
    # the last reading is taken once the clock has passed every earlier reading
    mono += 0.5
    clock = latest + 0.5
    read()
    events.extend(eng.flush("periodic", clock))
    reported = sum(Decimal(e.data["quantities"]["yield"]) for e in events if e.type == "operation.quantity_reported")
    assert [e.data for e in events if e.type == "counter.anomaly"] == []
    assert reported == made
