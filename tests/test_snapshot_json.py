"""``MachineEngine.snapshot_json`` (what the core commits with every event) is byte for byte
``json.dumps(snapshot(), separators=(",", ":"))``, in every state an engine can be in: counters of every mode
(float meters with their resolution), held zeros, evidence of rollovers / resets / glitches, materials, order
contexts with components and any text, machine states, completed operations and remembered order totals. What equals
its default is left out, and restores to that default: a snapshot written in full (as before) or compact loads as the
same engine."""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mappings.counters import CounterSpec
from mappings.machine import Component, CounterBinding, MachineEngine, MachineSpec, MaterialMeter, OrderContext
from mappings.samples import Sample


def make_spec() -> MachineSpec:
    return MachineSpec(
        id="m",
        counters={
            "good": CounterBinding(CounterSpec("good", modulus=2**16)),
            "scrap": CounterBinding(CounterSpec("scrap", mode="delta"), Decimal("0.5")),
            "total": CounterBinding(CounterSpec("total", modulus=None, resolution=Decimal("0.01"), max_rate=1e6)),
        },
        materials={"RM-\u00e9\"1": MaterialMeter(CounterBinding(CounterSpec("material:RM-\u00e9\"1", max_rate=1e6),
                                                                   Decimal("0.001")), "L")},
        state_values={"1": "running", "2": 'stop "E\\1"'},
        max_units=50,
    )


def make_total_spec() -> MachineSpec:
    """Yield from total − scrap − rework: scrap counted before the total catches up is carried (yield_carry)."""
    return MachineSpec(
        id="m",
        counters={"total": CounterBinding(CounterSpec("total", modulus=2**16)),
                  "scrap": CounterBinding(CounterSpec("scrap", modulus=2**16)),
                  "rework": CounterBinding(CounterSpec("rework", mode="reset_on_read"))},
        max_units=50,
    )


def expected(eng: MachineEngine) -> str:
    return json.dumps(eng.snapshot(), separators=(",", ":"))


def in_full(snap: dict) -> dict:
    """``snap`` with every default written out, as snapshots were written before defaults were left out."""
    full = {"v": 1, "counters": {}, "context": None,
            "window": {"start": None, "end": None, "q": {"good": "0", "scrap": "0", "rework": "0", "total": "0"},
                       "evidence": {}, "materials": {}},
            "totals": None, "yield_carry": "0", "machine_state": None, "completed": [], "order_totals": {}}
    full.update(snap)
    full["counters"] = {n: {"last_wall": c["last_time"], "held_zero": False, **c} for n, c in snap["counters"].items()}
    return full


def persisted(eng: MachineEngine) -> tuple:
    """The engine's persisted state read from its attributes (not through snapshot(), which leaves defaults out)."""
    w = eng.window
    counters = {n: (c.last, type(c.last_time), c.last_time, type(c.last_wall), c.last_wall, c.held_zero, c.held,
                    c.resolution, c.newest) for n, c in eng.counters.items()}
    return (counters, eng.context, w.start, w.end, w.q, {n: vars(e) if hasattr(e, "__dict__") else repr(e)
                                                           for n, e in w.evidence.items()},
            w.materials, eng.totals, eng.yield_carry, eng.machine_state, list(eng.completed), eng.order_totals,
            eng.complete_flag)


def assert_restores(spec: MachineSpec, eng: MachineEngine) -> None:
    """The compact text and the same state written in full load as this engine."""
    snap = eng.snapshot()
    assert persisted(MachineEngine(spec, json.loads(eng.snapshot_json()))) == persisted(eng)
    assert persisted(MachineEngine(spec, in_full(snap))) == persisted(eng)


text = st.text(min_size=1, max_size=8)
times = st.one_of(st.none(), st.floats(min_value=0, max_value=2.5e11, allow_nan=False),  # what connectors deliver
                  st.integers(min_value=0, max_value=2**32))
values = st.one_of(st.integers(min_value=-5, max_value=70_000), st.floats(allow_nan=True, allow_infinity=True),
                   st.none(), st.booleans(), st.text(max_size=3))
steps = st.lists(st.one_of(
    st.tuples(st.just("sample"), st.sampled_from(["good", "scrap", "total", "rework", "material:RM-\u00e9\"1",
                                                  "state"]),
              values, times, st.booleans()),
    st.tuples(st.just("dispatch"), text, text, st.sampled_from(["active", "completed"]),
              st.one_of(st.none(), st.decimals(allow_nan=False, allow_infinity=False, places=3))),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=1e6)),
    st.tuples(st.just("restart")),
), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([make_spec, make_total_spec]), steps)
def test_snapshot_json_is_the_json_of_snapshot_in_any_state(make, program):
    spec = make()
    eng = MachineEngine(spec)
    mono = 0.0
    for op in program:
        if op[0] == "sample":
            _, signal, value, t, good = op
            mono += 1.0
            eng.apply(Sample(f"m/{signal}", value, good, recv_time=1e9 + mono, source_time=t, mono=mono), signal)
        elif op[0] == "dispatch":
            _, order, operation, status, planned = op
            ctx = OrderContext(order, operation, status, unit="PCE", planned_quantity=planned,
                               components=(Component("RM-\u00e9\"1", Decimal("0.25"), "KG"),))
            try:
                eng.dispatch(ctx, 1e9 + mono)
            except Exception:  # noqa: BLE001 - refusals (a completed operation): the state is what it is
                pass
        elif op[0] == "tick":
            eng.tick(op[1])
        else:
            eng = MachineEngine(spec, json.loads(eng.snapshot_json()))
        assert eng.snapshot_json() == expected(eng)
        assert_restores(spec, eng)


def test_snapshot_json_covers_every_field():
    """One engine with every field set to something other than its default (the property test above may not reach
    all of them in every run): a held zero, a float meter's resolution, evidence of each kind, materials, a
    context with components, a machine state with quotes, completed operations and order totals."""
    spec = make_spec()
    eng = MachineEngine(spec)
    eng.dispatch(OrderContext("A\"1", "10", planned_quantity=Decimal("1e3"),
                              components=(Component("RM-\u00e9\"1", Decimal("0.25"), "KG"),)), 1.0)
    for i, (signal, v) in enumerate([("good", 65_530), ("good", 4), ("good", 0), ("total", 1.25), ("total", 3.5),
                                     ("scrap", 3), ("material:RM-\u00e9\"1", 10), ("material:RM-\u00e9\"1", 20),
                                     ("state", 2)]):
        eng.apply(Sample(f"m/{signal}", v, True, recv_time=1e9 + i, source_time=1.7e9 + i / 3, mono=float(i)),
                  signal)
    eng.dispatch(OrderContext("A\"1", "10", status="completed"), 20.0)
    eng.dispatch(OrderContext("B", "20"), 21.0)
    eng.apply(Sample("m/good", 9, True, recv_time=1e9 + 30, source_time=1.7e9 + 30, mono=30.0), "good")
    snap = eng.snapshot()
    assert "held_zero" not in snap["counters"]["good"] and snap["counters"]["total"]["resolution"] == "0.01"
    assert snap["window"]["evidence"] and snap["completed"] and snap["order_totals"] and snap["machine_state"]
    assert eng.snapshot_json() == expected(eng)
    eng.apply(Sample("m/good", 0, True, recv_time=1e9 + 31, source_time=1.7e9 + 31, mono=31.0), "good")
    assert eng.snapshot()["counters"]["good"]["held_zero"] is True
    assert eng.snapshot_json() == expected(eng)
    assert_restores(spec, eng)


def test_a_periodic_reports_snapshot_leaves_the_defaults_out():
    """What the core commits with each periodic report of a Modbus machine (no source time, no order, the window
    just closed): its counters' values and times and the totals, ~200 bytes for three counters."""
    spec = MachineSpec(id="m", counters={n: CounterBinding(CounterSpec(n, modulus=2**16))
                                         for n in ("good", "scrap", "rework")}, max_units=50)
    eng = MachineEngine(spec)
    for k, mono in ((0, 1.0), (40, 5.0)):
        for n in ("good", "scrap", "rework"):
            eng.apply(Sample(f"m/{n}", k, True, recv_time=1.8e9 + mono, mono=mono), n)
    assert [e.type for e in eng.flush("periodic", 6.0)] == ["operation.quantity_reported"]
    text = eng.snapshot_json()
    assert text == ('{"v":1,"counters":{"good":{"last":40,"last_time":1800000005.0},"scrap":{"last":40,'
                    '"last_time":1800000005.0},"rework":{"last":40,"last_time":1800000005.0}},'
                    '"totals":{"yield":"40","scrap":"40","rework":"40"}}')
    assert_restores(spec, eng)


def test_snapshot_json_keeps_int_and_float_times_apart():
    """Equal times of different types (a source time given as an int, a receive time as a float) are written as
    json.dumps writes each: 5 and 5.0."""
    spec = make_spec()
    eng = MachineEngine(spec)
    for signal, v, src in (("scrap", 3, 6), ("total", 1.0, 5.0), ("total", 2.0, 6.0)):
        eng.apply(Sample(f"m/{signal}", v, True, recv_time=6.0, source_time=src, mono=float(v)), signal)
        assert eng.snapshot_json() == expected(eng)


def test_the_newest_delta_identity_is_written_and_restored():
    """A delta counter that counted a late delivery after a newer value remembers the newest one (the cut read's
    value, which the late publish delivers again): in the snapshot, and after a restore."""
    spec = make_spec()
    eng = MachineEngine(spec)
    for v, src, mono in ((2, 20.5, 1.0), (3, 19.25, 2.0)):  # the cut read's value, then an older one
        eng.apply(Sample("m/scrap", v, True, recv_time=30.0, source_time=src, mono=mono), "scrap")
    assert eng.counters["scrap"].newest == (20.5, 2)
    assert eng.snapshot_json() == expected(eng)
    assert '"newest":[20.5,2]' in eng.snapshot_json()
    again = MachineEngine(spec, json.loads(eng.snapshot_json()))
    assert again.counters["scrap"].newest == (20.5, 2)
    again.apply(Sample("m/scrap", 2, True, recv_time=31.0, source_time=20.5, mono=3.0), "scrap")  # delivered again
    [report] = [e for e in again.flush("periodic", 32.0) if e.type == "operation.quantity_reported"]
    assert report.data.quantities["scrap"] == "2.5"  # (2 + 3) x 0.5, not (2 + 3 + 2) x 0.5


def test_a_yield_carry_is_written_and_restored():
    """Scrap counted before the total caught up: the negative yield is carried to the next report, across a restart
    too (it is left out of the snapshot only when zero)."""
    spec = make_total_spec()
    eng = MachineEngine(spec)
    for i, (signal, v) in enumerate([("total", 0), ("scrap", 0), ("total", 10), ("scrap", 15)]):
        eng.apply(Sample(f"m/{signal}", v, True, recv_time=1e9 + i, source_time=1.7e9 + i, mono=float(i)), signal)
    eng.flush("periodic", 10.0)
    assert eng.yield_carry == -5 and '"yield_carry":"-5"' in eng.snapshot_json()
    assert eng.snapshot_json() == expected(eng)
    assert_restores(spec, eng)


def test_a_window_of_material_consumption_only_is_written_and_restored():
    """A window that metered material and counted no units is not empty: it is written and restored."""
    spec = make_spec()
    eng = MachineEngine(spec)
    for i, v in enumerate((10, 25)):
        eng.apply(Sample("m/material:RM-\u00e9\"1", v, True, recv_time=1e9 + i, source_time=1.7e9 + i,
                         mono=float(i)), "material:RM-\u00e9\"1")
    assert not any(eng.window.q.values()) and eng.window.materials
    assert '"window":' in eng.snapshot_json() and eng.snapshot_json() == expected(eng)
    assert_restores(spec, eng)
