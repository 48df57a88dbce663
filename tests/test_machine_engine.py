"""Machine engine: windows, order context, changeover, unassigned counts, total-minus-scrap, restore."""

from decimal import Decimal

from mappings.counters import CounterSpec
from mappings.machine import CounterBinding, MachineEngine, MachineSpec, OrderContext, Component
from mappings.samples import Sample


def spec(**kw):
    counters = kw.pop("counters", {"good": CounterBinding(CounterSpec("good")), "scrap": CounterBinding(CounterSpec("scrap"))})
    return MachineSpec(id="m1", counters=counters, interval_s=kw.pop("interval_s", 5.0), **kw)


def s(sig, v, t):
    return Sample(f"m1/{sig}", v, True, recv_time=t, source_time=t)


def feed(eng, items):
    out = []
    for sig, v, t in items:
        out += eng.apply(s(sig, v, t), sig)
    return out


def reported(events):
    return [(e.data["order"], e.data["quantities"]["yield"], e.data["quantities"]["scrap"], e.data["reason"])
            for e in events if e.type == "operation.quantity_reported"]


def test_unassigned_counts_are_kept_and_reported():
    eng = MachineEngine(spec())
    feed(eng, [("good", 100, 0), ("scrap", 5, 0), ("good", 110, 1), ("scrap", 6, 1)])
    ev = eng.tick(10)
    assert reported(ev) == [(None, "10", "1", "periodic")]
    assert ev[0].data["unassigned"] is True


def test_changeover_cuts_the_window():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 0, 0), ("good", 7, 1)])
    ev = eng.dispatch(OrderContext("B", "10"), 2)
    assert reported(ev) == [("A", "7", "0", "changeover")]
    assert [e.type for e in ev] == ["operation.quantity_reported", "operation.started"]
    feed(eng, [("good", 9, 3)])
    assert reported(eng.tick(100)) == [("B", "2", "0", "periodic")]


def test_completion_reports_final_totals_then_unassigned():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 0, 0), ("good", 4, 1)])
    eng.tick(100)
    feed(eng, [("good", 6, 101)])
    ev = eng.dispatch(OrderContext("A", "10", status="completed"), 102)
    assert [e.type for e in ev] == ["operation.quantity_reported", "operation.completed"]
    assert ev[-1].data["totals"]["yield"] == "6"
    assert eng.context is None
    assert eng.dispatch(OrderContext("A", "10", status="completed"), 103) == []  # retained again: idempotent


def test_max_units_flushes():
    eng = MachineEngine(spec(max_units=10))
    feed(eng, [("good", 0, 0)])
    ev = feed(eng, [("good", 4, 1), ("good", 12, 2)])
    assert reported(ev) == [(None, "12", "0", "units")]


def test_total_minus_scrap():
    eng = MachineEngine(spec(counters={"total": CounterBinding(CounterSpec("total")),
                                       "scrap": CounterBinding(CounterSpec("scrap"))}))
    feed(eng, [("total", 0, 0), ("scrap", 0, 0), ("total", 10, 1), ("scrap", 2, 1)])
    assert reported(eng.tick(100)) == [(None, "8", "2", "periodic")]
    # scrap counted before the total moved: carried, never negative
    feed(eng, [("scrap", 3, 101)])
    assert reported(eng.tick(200)) == [(None, "0", "1", "periodic")]
    feed(eng, [("total", 14, 201)])
    assert reported(eng.tick(300)) == [(None, "3", "0", "periodic")]
    feed(eng, [("scrap", 4, 301)])
    eng.tick(400)
    feed(eng, [("total", 15, 401)])  # the total catches up with that scrap: nothing to report, no empty document
    assert reported(eng.tick(500)) == []


def test_totals_continue_when_an_operation_comes_back():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 0, 0), ("good", 5, 1)])
    eng.dispatch(OrderContext("B", "10"), 2)
    feed(eng, [("good", 7, 3)])
    ev = eng.dispatch(OrderContext("A", "10"), 4)
    assert ev[0].data["totals"]["yield"] == "2"  # B
    feed(eng, [("good", 10, 5)])
    ev = MachineEngine(spec(), eng.snapshot()).dispatch(OrderContext("A", "10", status="completed"), 6)
    assert ev[-1].type == "operation.completed" and ev[-1].data["totals"]["yield"] == "8"


def test_completion_of_an_order_that_is_not_running_changes_nothing():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 0, 0), ("good", 5, 1)])
    assert eng.dispatch(OrderContext("Z", "10", status="completed"), 2) == []
    assert eng.context.ref == ("A", "10") and reported(eng.tick(100)) == [("A", "5", "0", "periodic")]


def test_backflush_consumption():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10", components=(Component("RM-1", Decimal("0.25"), "KG"),)), 0)
    feed(eng, [("good", 0, 0), ("scrap", 0, 0), ("good", 8, 1), ("scrap", 2, 1)])
    ev = eng.tick(100)
    mat = [e for e in ev if e.type == "material.consumed"]
    assert mat and mat[0].data["components"] == [{"material": "RM-1", "quantity": "2.5", "unit": "KG"}]


def test_snapshot_restore_continues_exactly():
    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 50, 0), ("good", 53, 1)])
    snap = eng.snapshot()
    again = MachineEngine(spec(), snap)
    feed(again, [("good", 60, 2)])
    assert reported(again.tick(100)) == [("A", "10", "0", "periodic")]
    assert again.snapshot()["totals"]["yield"] == "10"


def test_state_changes():
    eng = MachineEngine(spec(state_values={"1": "running", "0": "idle"}))
    ev = eng.apply(s("state", 1, 0), "state") + eng.apply(s("state", 1, 1), "state") + eng.apply(s("state", 0, 2), "state")
    assert [(e.data["previous"], e.data["state"]) for e in ev] == [(None, "running"), ("running", "idle")]


def test_metered_material_consumption_validates_against_the_contract():
    from gateway.config import GatewayIdentity
    from gateway.events import EventEncoder, Topics
    from gateway.schema import validate_event
    from mappings.machine import MaterialMeter

    meter = MaterialMeter(CounterBinding(CounterSpec("material:RM-OIL", modulus=2**32, max_rate=10_000), Decimal("0.001")), "L")
    eng = MachineEngine(spec(materials={"RM-OIL": meter}))
    feed(eng, [("material:RM-OIL", 1000, 0), ("material:RM-OIL", 3500, 1)])   # unassigned: no order yet
    ev = eng.tick(10)
    assert [e.type for e in ev] == ["material.consumed"]
    assert ev[0].data["components"] == [{"material": "RM-OIL", "quantity": "2.5", "unit": "L"}]
    assert ev[0].data["unassigned"] is True and ev[0].data["method"] == "metered"
    eng.dispatch(OrderContext("A", "10"), 11)
    feed(eng, [("good", 0, 11), ("good", 4, 12), ("material:RM-OIL", 4000, 12)])
    ev += eng.tick(30)
    assert [e.type for e in ev[1:]] == ["operation.quantity_reported", "material.consumed"]
    assert ev[-1].data["order"] == "A" and ev[-1].data["components"][0]["quantity"] == "0.5"
    ident = GatewayIdentity(id="gw", enterprise="e", site="s", area="a", line="l")
    enc = EventEncoder(ident, Topics("edge", ident), "epoch1")
    for i, e in enumerate(ev, 1):
        validate_event(enc.encode(e, i)[1])


def test_reset_on_read_delta_asks_for_an_immediate_commit():
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", mode="reset_on_read"))}))
    feed(eng, [("good", 0, 0)])
    assert not eng.urgent
    feed(eng, [("good", 3, 1)])
    assert eng.urgent and eng.snapshot()["window"]["q"]["good"] == "3"
