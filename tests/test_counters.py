"""Counter engine rules, table-driven: (value, good, t) samples -> total counted, outcomes."""

import pytest

from mappings.counters import CounterSpec, CounterState, step
from mappings.samples import Sample

U16 = CounterSpec("good", modulus=2**16, max_rate=10)
U32 = CounterSpec("good", modulus=2**32, max_rate=10)
S16 = CounterSpec("good", modulus=2**16, signed=True, max_rate=10)


def sample(v, good, t, mono=None, *, src=True, reread=False):
    return Sample("m/good", v, good, recv_time=t, source_time=t if src else None, mono=mono, reread=reread)


def run(spec, samples, st=None):
    """samples: (value, good, t) with t the source, receive and monotonic time, or (value, good, t, mono)."""
    st = CounterState() if st is None else st
    results = [step(spec, st, sample(*x) if len(x) == 4 else sample(*x, x[2])) for x in samples]
    return sum(r.delta for r in results), [r.outcome for r in results], st


CASES = {
    "first value is a baseline": (U32, [(1000, True, 0)], 0, ["baseline"]),
    "increase": (U32, [(10, True, 0), (15, True, 1)], 5, ["baseline", "increase"]),
    "rollover at 2^16": (U16, [(65530, True, 0), (3, True, 1)], 9, ["baseline", "rollover"]),
    "rollover at 2^32": (U32, [(2**32 - 2, True, 0), (1, True, 1)], 3, ["baseline", "rollover"]),
    "signed 16-bit wraps to negative": (S16, [(32766, True, 0), (-32767, True, 1)], 3, ["baseline", "increase"]),
    "rollover exactly to zero is not a glitch": (U16, [(65535, True, 0), (0, True, 1), (2, True, 2)], 3,
                                                 ["baseline", "rollover", "increase"]),
    "reset (implausible rollover)": (U16, [(1000, True, 0), (10, True, 1)], 10, ["baseline", "reset"]),
    "transient zero glitch": (U32, [(1000, True, 0), (0, True, 1), (1002, True, 2)], 2,
                              ["baseline", "held_zero", "glitch"]),
    "zero then smaller value is a reset": (U32, [(1000, True, 0), (0, True, 1), (10, True, 2)], 10,
                                           ["baseline", "held_zero", "reset"]),
    # a decrease to more than max_rate x (elapsed + 2 s) is no reset: held, the next value decides (red before: each
    # of these booked the whole value as a reset, thousands to millions of phantom units)
    "a stale read below the counter is a glitch": (U32, [(5_000_000, True, 0), (4_999_990, True, 1),
                                                        (5_000_003, True, 2)], 3, ["baseline", "held_zero", "glitch"]),
    "a 32-bit counter read half updated at a carry (low word first)": (
        U32, [(0x000FFFFF, True, 0), (0x000F0000, True, 1), (0x00100000, True, 2), (0x00100002, True, 3)], 3,
        ["baseline", "held_zero", "glitch", "increase"]),
    "a retained value restored below the last read after a PLC restart": (
        U32, [(1000, True, 0), (0, True, 1), (995, True, 2), (1000, True, 3), (1003, True, 4)], 8,
        ["baseline", "held_zero", "preset", "increase", "increase"]),
    "a preset confirmed by the same value": (U32, [(1000, True, 0), (500, True, 1), (500, True, 2), (503, True, 3)],
                                             3, ["baseline", "held_zero", "preset", "increase"]),
    "a preset, then production": (U32, [(1000, True, 0), (500, True, 1), (505, True, 2)], 5,
                                  ["baseline", "held_zero", "preset"]),
    "a preset, then lower again": (U32, [(1000, True, 0), (500, True, 1), (400, True, 2), (400, True, 3)], 0,
                                   ["baseline", "held_zero", "held_zero", "preset"]),
    "a suspect decrease, then a reset to a plausible value": (U32, [(1000, True, 0), (500, True, 1), (7, True, 2)],
                                                              7, ["baseline", "held_zero", "reset"]),
    # an increase beyond max_rate x (elapsed + 2 s) is held too: the next value decides between a counter set higher
    # (the set amount not counted, what it made after counted) and a spike (red before: the spike moved the baseline)
    "implausible jump is held": (U32, [(10, True, 0), (100_000, True, 1), (100_003, True, 2)], 3,
                                 ["baseline", "held_zero", "jump"]),
    "a jump confirmed by the same value": (U32, [(10, True, 0), (100_000, True, 1), (100_000, True, 2),
                                                 (100_004, True, 3)], 4, ["baseline", "held_zero", "jump", "increase"]),
    "an upward spike is a glitch": (U32, [(10, True, 0), (100_000, True, 1), (12, True, 2), (15, True, 3)], 5,
                                    ["baseline", "held_zero", "glitch", "increase"]),
    "a 32-bit counter read half updated at a carry (high word first)": (
        U32, [(0x000FFFFF, True, 0), (0x0010FFFF, True, 1), (0x00100000, True, 2), (0x00100002, True, 3)], 3,
        ["baseline", "held_zero", "glitch", "increase"]),
    "an upward spike, then lower but still implausible": (
        U32, [(10, True, 0), (100_000, True, 1), (50_000, True, 2), (50_000, True, 3)], 0,
        ["baseline", "held_zero", "held_zero", "jump"]),
    "an upward spike, then a reset below the baseline": (U32, [(1000, True, 0), (100_000, True, 1), (7, True, 2)], 7,
                                                         ["baseline", "held_zero", "reset"]),
    "bad samples never move the baseline": (U32, [(10, True, 0), (0, False, 1), (99, False, 2), (14, True, 3)], 4,
                                            ["baseline", "bad", "bad", "increase"]),
    "stale sample ignored": (U32, [(10, True, 5), (8, True, 4), (12, True, 6)], 2, ["baseline", "stale", "increase"]),
    "non-integer value rejected": (U32, [(10, True, 0), (10.5, True, 1), ("x", True, 2), (11, True, 3)], 1,
                                   ["baseline", "invalid", "invalid", "increase"]),
    "reset_on_read counts every value": (CounterSpec("good", mode="reset_on_read"), [(3, True, 0), (0, True, 1), (4, True, 2)],
                                         7, ["delta", "none", "delta"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counter_rules(name):
    spec, samples, expected_total, expected_outcomes = CASES[name]
    total, outcomes, _ = run(spec, samples)
    assert outcomes == expected_outcomes
    assert total == expected_total


def test_gap_shorter_than_one_wrap_period_allows_rollover():
    # 16-bit counter, 10/s max: one wrap takes 6553.6 s; 1 hour later a wrap of 6036 is plausible
    total, outcomes, _ = run(U16, [(60000, True, 0), (500, True, 3600)])
    assert outcomes == ["baseline", "rollover"] and total == 500 + 65536 - 60000


def test_gap_longer_than_one_wrap_period_makes_a_decrease_ambiguous():
    # 2 hours later the counter may have wrapped any number of times, or been reset: counted as a reset, with the
    # rollover it might have been as evidence
    st = CounterState()
    step(U16, st, sample(60000, True, 0, 0))
    r = step(U16, st, sample(500, True, 7200, 7200))
    assert (r.outcome, r.delta, r.previous, r.value, r.possible, r.elapsed) == \
        ("ambiguous", 500, 60000, 500, 500 + 65536 - 60000, 7200)
    # no modulus: a decrease can only be a reset
    st = CounterState()
    spec = CounterSpec("good", modulus=None, max_rate=10)
    step(spec, st, sample(60000, True, 0, 0))
    assert step(spec, st, sample(500, True, 7200, 7200)).outcome == "reset"


def test_unknown_gap_after_restart():
    """After a restart the monotonic time is unknown: the wall-clock gap is used when it is not negative, else the gap
    is unknown (any increase plausible, any decrease ambiguous)."""
    _, _, st = run(U16, [(1000, True, 100.0, 5.0)])
    assert "last_mono" not in st.to_dict()
    restored = CounterState.from_dict(st.to_dict())
    assert restored.last_mono is None and restored.last_wall == 100.0
    r = step(U16, CounterState.from_dict(st.to_dict()), sample(500, True, 50.0, 1.0))
    assert r.outcome == "ambiguous" and r.elapsed is None          # wall clock went back 50 s across the restart
    r = step(U16, CounterState.from_dict(st.to_dict()), sample(1500, True, 50.0, 1.0))
    assert r.outcome == "increase" and r.delta == 500              # unknown gap: plausible
    r = step(U16, CounterState.from_dict(st.to_dict()), sample(1500, True, 101.0, 1.0))
    assert r.outcome == "held_zero"                                 # 1 s on the wall clock: 500 at 10/s is held
    old = {"last": 1000, "last_time": 100.0, "held_zero": False}    # a snapshot from before last_wall existed
    assert CounterState.from_dict(old).last_wall == 100.0


def test_unchanged_value_only_moves_in_memory_times():
    st = CounterState()
    step(U32, st, sample(10, True, 0.0, 0.0))
    before = st.to_dict()
    assert step(U32, st, sample(10, True, 5.0, 5.0)).outcome == "none"
    assert st.last_mono == 5.0 and st.last_time == 5.0
    # plausibility of the next change is measured from the unchanged read: 35 in 1 s at 10/s is a jump
    assert step(U32, st, sample(45, True, 6.0, 6.0)).outcome == "held_zero"
    assert before["last"] == 10


@pytest.mark.parametrize("mode", ["delta", "reset_on_read"])
def test_delta_identity(mode):
    spec = CounterSpec("good", mode=mode)
    st = CounterState()
    outs = [step(spec, st, s) for s in (
        sample(5, True, 10.0, 1.0),
        sample(5, True, 10.0, 2.0),               # the same value, same source time: delivered again
        sample(5, True, 11.0, 3.0),               # a new delta that happens to be equal
        sample(7, True, 11.0, 4.0),               # same time, another value: a new delta
        sample(3, True, 5.0, 5.0),                # source clock stepped back: still a delta, never "stale"
        sample(0, True, 12.0, 6.0),
        sample(3, True, 5.0, 7.0),                # the last counted value again (the zero did not replace it)
    )]
    assert [o.outcome for o in outs] == ["delta", "duplicate", "delta", "delta", "delta", "none", "duplicate"]
    assert sum(o.delta for o in outs) == 20


@pytest.mark.parametrize("mode", ["delta", "reset_on_read"])
@pytest.mark.parametrize("restart", [False, True])
def test_a_late_publish_after_the_cut_read_counts_each_value_once(mode, restart):
    """The PLC wrote 3 parts at t=1, then 2 at t=2. The changeover's cut read returns the node's current value (2 at
    t=2); the subscription's publish, late, then delivers its queue: 3 at t=1, and 2 at t=2 again. 5 parts, not 7
    (the identity to compare with is the newest value counted, not the last one: the 3 came after the 2). Also across
    a restart between the cut and the publish (the state is persisted with the cut's report)."""
    spec = CounterSpec("good", mode=mode)
    st = CounterState()
    outs = [step(spec, st, sample(2, True, 2.0, 1.0, reread=True))]
    for s in (sample(3, True, 1.0, 2.0), sample(2, True, 2.0, 3.0), sample(4, True, 3.0, 4.0),
              sample(4, True, 3.0, 5.0)):
        if restart:
            st = CounterState.from_dict(st.to_dict())
        outs.append(step(spec, st, s))
    assert [o.outcome for o in outs] == ["delta", "delta", "duplicate", "delta", "duplicate"]
    assert sum(o.delta for o in outs) == 9


def test_delta_reread_without_source_time():
    for mode, outcome in (("delta", "duplicate"), ("reset_on_read", "delta")):
        st = CounterState()
        spec = CounterSpec("good", mode=mode)
        assert step(spec, st, sample(4, True, 1.0, 1.0, src=False)).outcome == "delta"
        assert step(spec, st, sample(4, True, 2.0, 2.0, src=False, reread=True)).outcome == outcome
        assert step(spec, st, sample(4, True, 3.0, 3.0, src=False)).outcome == "delta"  # no identity: counted


def test_late_delivery_versus_clock_step():
    # older source time by less than the reorder window: a late delivery, ignored
    _, outcomes, _ = run(U32, [(100, True, 1000.0, 1.0), (90, True, 995.0, 2.0), (101, True, 1001.0, 3.0)])
    assert outcomes == ["baseline", "stale", "increase"]
    # older by an hour: the clock stepped; the value is used (here a reset, told apart by the monotonic time)
    total, outcomes, _ = run(U16, [(40000, True, 5000.0, 1.0), (5, True, 1401.0, 2.0), (10, True, 1402.0, 3.0)])
    assert outcomes == ["baseline", "reset", "increase"] and total == 10
    # without a source time the monotonic arrival order decides
    st = CounterState()
    assert step(U32, st, sample(100, True, 10.0, 5.0, src=False)).outcome == "baseline"
    assert step(U32, st, sample(90, True, 11.0, 4.0, src=False)).outcome == "stale"
    assert step(U32, st, sample(20, True, 5.0, 6.0, src=False)).outcome == "reset"  # wall clock stepped back


def test_a_held_decrease_survives_a_restart():
    st = CounterState()
    for x in [(1000, True, 0, 0), (500, True, 1, 1)]:
        step(U32, st, sample(*x))
    d = st.to_dict()
    assert d["held_zero"] and d["held"] == 500
    again = CounterState.from_dict(d)
    r = step(U32, again, sample(1004, True, 2.0, 2.0))
    assert (r.outcome, r.delta) == ("glitch", 4)
    assert "held" not in again.to_dict()


def test_a_baseline_outside_a_narrowed_counter_is_a_new_baseline():
    """The counter's width narrowed under a stored baseline (an OPC UA node's DataType from DINT to INT after a PLC
    program change): 70010 -> 5 on a 16-bit counter is no rollover of -4452 parts (red before: a negative yield)."""
    st = CounterState(last=70010, last_time=0.0, last_wall=0.0, last_mono=0.0)
    total, outcomes, _ = run(U16, [(5, True, 1.0, 1.0), (8, True, 2.0, 2.0)], st)
    assert (total, outcomes) == (3, ["baseline", "increase"])


def test_state_roundtrip():
    _, _, st = run(U32, [(10, True, 0), (0, True, 1)])
    again = CounterState.from_dict(st.to_dict())
    assert again.to_dict() == st.to_dict() and again.held_zero and again.last_mono is None


def test_a_preset_is_reported_and_the_production_after_it_counted():
    """Engine level: the held decrease is in the snapshot (byte for byte its JSON), the preset an anomaly with
    from / to / counted, the production after it in the report."""
    import json

    from mappings.machine import CounterBinding, MachineEngine, MachineSpec

    spec = MachineSpec(id="m", counters={"good": CounterBinding(CounterSpec("good", max_rate=10))}, interval_s=1e9)
    eng = MachineEngine(spec)
    out = []
    for v, t in ((1000, 1.0), (500, 2.0)):
        out += eng.apply(Sample("m/good", v, True, recv_time=t, source_time=t, mono=t), "good")
    text = eng.snapshot_json()
    assert text == json.dumps(eng.snapshot(), separators=(",", ":")) and '"held_zero":true,"held":500' in text
    assert MachineEngine(spec, json.loads(text)).snapshot_json() == text
    out += eng.apply(Sample("m/good", 505, True, recv_time=3.0, source_time=3.0, mono=3.0), "good")
    out += eng.flush("test", 4.0)
    [anomaly] = [e.data for e in out if e.type == "counter.anomaly"]
    assert (anomaly.kind, anomaly.from_, anomaly.to, anomaly.held, anomaly.counted) == \
        ("implausible_jump", 1000, 500, "0", "5")
    [report] = [json.loads(e.data.to_json()) for e in out if e.type == "operation.quantity_reported"]
    assert report["quantities"]["yield"] == "5" and report["evidence"][0]["resets"] == 1


def test_a_late_publish_behind_a_cut_read_with_a_long_publishing_interval_is_late_not_a_decrease():
    """An OPC UA subscription publishing every 20 s: the changeover's cut read returns the current value (52 at
    t=100) while the values queued before it come later, up to ~20 s older. With the spec's window (2 x publishing
    interval + timeout) they are late deliveries (red with the fixed 10 s: the oldest looked like a decrease, the next
    confirmed a 'preset' and the queued values were counted again to the new order)."""
    import dataclasses

    from gateway.config import parse_config
    from gateway.runtime import machine_specs

    cfg = parse_config({"gateway": {"enterprise": "e", "site": "s", "area": "a", "line": "l", "id": "gw"},
                        "mqtt": {"port": 1}, "store": {"path": "/tmp/x.db"},
                        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1",
                                        "publishing_interval_ms": 20000, "timeout_s": 5}],
                        "machines": [{"id": "m1", "counters": {"good": {"connector": "opc", "node_id": "ns=2;s=g"}}}]},
                       "<test>")
    spec = machine_specs(cfg)[0].counters["good"].spec
    assert spec.reorder_window_s == 45.0
    st = CounterState()
    outcomes = [step(spec, st, Sample("m/good", v, True, recv_time=t, source_time=src, mono=t, reread=reread)).outcome
                for v, src, t, reread in [(40, 80.0, 80.5, False), (52, 100.0, 100.2, True), (44, 83.0, 101.0, False),
                                          (47, 88.0, 101.0, False), (52, 100.0, 101.0, False), (55, 105.0, 106.0, False)]]
    assert outcomes == ["baseline", "increase", "stale", "stale", "none", "increase"] and st.last == 55
    short = dataclasses.replace(spec, reorder_window_s=10.0)
    st = CounterState()
    total = sum(step(short, st, Sample("m/good", v, True, recv_time=t, source_time=src, mono=t, reread=rr)).delta
                for v, src, t, rr in [(40, 80.0, 80.5, False), (52, 100.0, 100.2, True), (44, 83.0, 101.0, False),
                                      (47, 88.0, 101.0, False), (52, 100.0, 101.0, False), (55, 105.0, 106.0, False)])
    assert total > 15  # what the fixed 10 s window did: the queued parts counted again


@pytest.mark.parametrize("after, outcome, counted", [(100_003, "jump", 3), (13, "glitch", 3)])
def test_a_held_upward_value_survives_a_restart(after, outcome, counted):
    """A spike or a preset upward is held across a restart (held_zero with a held value above ``last``): the reading
    after the restart decides as it would have without it."""
    _, outcomes, st = run(U32, [(10, True, 0.0), (100_000, True, 1.0)])
    assert outcomes == ["baseline", "held_zero"]
    d = st.to_dict()
    assert d["held_zero"] is True and d["held"] == 100_000 and d["last"] == 10
    again = CounterState.from_dict(d)
    r = step(U32, again, sample(after, True, 2.0))  # wall clock only after a restart: 2 s since the baseline
    assert (r.outcome, r.delta) == (outcome, counted)
    assert again.last == after and not again.held_zero
