"""Machine engine: windows, order context, changeover, unassigned counts, total-minus-scrap, restore."""

from decimal import Decimal

import pytest

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


def test_a_text_state_is_cut_at_its_nul_padding_and_escapes_control_characters():
    """A PLC string state tag (OPC UA String, NUL-padded like an S7 string) reported as read put NULs and other
    control characters into the event, which the contract refuses and PostgreSQL cannot store (jsonb): the ERP
    service rejected the event. The text is cut at its first NUL (the padding; the mapping then matches) and any
    other control character is written as \\xNN; every event is valid (red before: "RUN\\x00\\x00" unmapped, a NUL
    in state and raw). A state restored from an older snapshot is cleaned the same way."""
    from gateway.config import GatewayIdentity
    from gateway.events import EventEncoder, Topics
    from gateway.schema import validate_event

    eng = MachineEngine(spec(state_values={"RUN": "running"}))
    ev = eng.apply(s("state", "RUN\x00\x00\x00", 0), "state") + eng.apply(s("state", "RUN\x00XY", 1), "state")
    ev += eng.apply(s("state", "ERR\x1b[31m\x9f\x00pad", 2), "state")
    assert [(e.data["previous"], e.data["state"], e.data["raw"]) for e in ev] == [
        (None, "running", "RUN"), ("running", "ERR\\x1b[31m\\x9f", "ERR\\x1b[31m\\x9f")]
    ident = GatewayIdentity(id="gw", enterprise="e", site="s", area="a", line="l")
    enc = EventEncoder(ident, Topics("edge", ident), "epoch1")
    for i, e in enumerate(ev, 1):
        validate_event(enc.encode(e, i)[1])
    snap = eng.snapshot()
    snap["machine_state"] = "OLD\x00pad"
    again = MachineEngine(spec(state_values={"RUN": "running"}), snap)
    [e] = again.apply(s("state", "RUN", 3), "state")
    assert (e.data["previous"], e.data["state"]) == ("OLD", "running")


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


# ---------------------------------------------------------------------------------------------------- issue 8
# Times: ``src`` is the device's source time and ``wall`` the gateway's receive time (both may step: NTP, a PLC on
# local time at DST); ``mono`` is the gateway's monotonic receive time (never steps).

def sm(sig, v, src, mono, wall=None, reread=False):
    return Sample(f"m1/{sig}", v, True, recv_time=src if wall is None else wall, source_time=src, mono=mono,
                  reread=reread)


def yields(events):
    return sum(Decimal(e.data["quantities"]["yield"]) for e in events if e.type == "operation.quantity_reported")


def anomalies(events):
    return [e.data for e in events if e.type == "counter.anomaly"]


def _clock_step_run(mode, step_s, *, bits=16, with_source=True):
    """Two hours at 5 parts/s, read every second; at 10 min the device's source clock and the gateway's wall clock
    step by ``step_s`` (monotonic time advances normally). A cumulative counter is also reset by an operator right
    then (the decrease must be a reset, not a rollover made plausible by an hour the wall clock jumped)."""
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", mode=mode, modulus=2**bits,
                                                                          max_rate=10))}, interval_s=60))
    wall, mono, reg, made, events = 1_800_000_000.0, 5_000.0, 40_000, 0, []
    first = True
    for i in range(7200):
        if i == 600:
            wall += step_s
        if not first:
            made += 5
            reg = 5 if (mode == "cumulative" and i == 600) else reg + 5  # reset right after the previous read
        value = reg if mode == "cumulative" else 5
        if first and mode != "cumulative":
            made += 5  # a delta counter's first value is production
        src = wall if with_source else None
        events += eng.apply(Sample("m1/good", value, True, recv_time=wall, source_time=src, mono=mono), "good")
        events += eng.tick(mono)
        first = False
        wall += 1.0
        mono += 1.0
    events += eng.flush("periodic", wall)
    return eng, events, made


@pytest.mark.parametrize("mode", ["cumulative", "delta", "reset_on_read"])
@pytest.mark.parametrize("step_s", [-3600.0, 3600.0])
def test_clock_step_neither_loses_nor_invents_a_unit(mode, step_s):
    _, events, made = _clock_step_run(mode, step_s)
    assert anomalies(events) == []
    assert yields(events) == made
    # the window is timed with the monotonic clock: one periodic report a minute, whatever the wall clock did
    periodic = [e for e in events if e.type == "operation.quantity_reported" and e.data["reason"] == "periodic"]
    assert 115 <= len(periodic) <= 121
    resets = sum(ev["resets"] for e in events if e.type == "operation.quantity_reported" for ev in e.data["evidence"])
    assert resets == (1 if mode == "cumulative" else 0)


@pytest.mark.parametrize("step_s", [-3600.0, 3600.0])
def test_clock_step_without_source_time(step_s):
    """A Modbus counter has no source time: the receive (wall) time steps with NTP."""
    _, events, made = _clock_step_run("cumulative", step_s, with_source=False)
    assert anomalies(events) == [] and yields(events) == made


def test_genuine_reorder_is_still_ignored():
    """A notification delivered after the cut read that already returned a newer value (older source time by less
    than the reorder window) is stale: it must not be taken for a decrease (reset or rollover)."""
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=50))}))
    ev = []
    ev += eng.apply(sm("good", 65_530, 10.0, 1.0), "good")
    ev += eng.apply(sm("good", 2, 11.0, 2.0), "good")        # rollover: +8
    ev += eng.apply(sm("good", 65_534, 10.5, 2.1), "good")   # late delivery of an older value
    ev += eng.apply(sm("good", 4, 12.0, 3.0), "good")
    ev += eng.flush("periodic", 13.0)
    assert yields(ev) == 10 and anomalies(ev) == []


def test_small_clock_step_back_loses_nothing():
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", max_rate=10))}))
    ev = []
    for i, (src, v) in enumerate([(100.0, 0), (101.0, 5), (99.0, 10), (100.0, 15), (101.5, 20), (102.5, 25)]):
        ev += eng.apply(sm("good", v, src, 1000.0 + i), "good")
    ev += eng.flush("periodic", 200.0)
    assert yields(ev) == 25 and anomalies(ev) == []


def test_plausibility_uses_monotonic_elapsed_time():
    """Source time says an hour passed, the gateway's monotonic clock says one second: a jump of 10,000 at 10/s is
    implausible (held), not production."""
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", max_rate=10))}))
    ev = eng.apply(sm("good", 100, 0.0, 50.0), "good") + eng.apply(sm("good", 10_100, 3600.0, 51.0), "good")
    assert anomalies(ev) == [] and yields(eng.flush("test", 52.0)) == 0  # held: the next reading decides
    ev = eng.apply(sm("good", 10_102, 3601.0, 52.0), "good")  # it went on from there: the counter was set higher
    assert [a["kind"] for a in anomalies(ev)] == ["implausible_jump"]


def test_ambiguous_decrease_after_a_long_gap_is_a_reset_with_evidence():
    """Issue 8 example: 16-bit counter at 40,000, max_rate 50/s (one wrap = 21.8 min), offline 30 min, back at 12:
    not 25,548 phantom units but a reset (+12) and an anomaly with the possible rollover quantity."""
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=50))}))
    eng.dispatch(OrderContext("A", "10"), 0.0)
    ev = eng.apply(sm("good", 40_000, 1000.0, 10.0), "good")
    ev += eng.apply(sm("good", 12, 2800.0, 1810.0), "good")
    ev += eng.flush("periodic", 2800.0)
    assert yields(ev) == 12
    (a,) = anomalies(ev)
    assert a["kind"] == "ambiguous_decrease" and a["from"] == 40_000 and a["to"] == 12
    assert a["possible_rollover"] == "25548" and a["counted"] == "12" and a["elapsed_s"] == 1800.0
    assert a["order"] == "A" and a["held"] == "25536"


def test_decrease_within_one_wrap_period_is_still_a_rollover():
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=50))}))
    ev = eng.apply(sm("good", 40_000, 1000.0, 10.0), "good")
    ev += eng.apply(sm("good", 12, 2200.0, 1210.0), "good")  # 20 min < 21.8 min
    ev += eng.flush("periodic", 2200.0)
    assert yields(ev) == 25_548 and anomalies(ev) == []


def test_ambiguous_decrease_after_a_restart_uses_the_wall_clock_gap():
    cb = {"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=50))}
    eng = MachineEngine(spec(counters=cb))
    eng.apply(sm("good", 40_000, 1000.0, 10.0), "good")
    again = MachineEngine(spec(counters=cb), eng.snapshot())   # the monotonic clock of the old process is gone
    ev = again.apply(sm("good", 12, 2800.0, 7.0), "good")      # 30 min later on the wall clock
    ev += again.flush("periodic", 2800.0)
    assert yields(ev) == 12 and [a["kind"] for a in anomalies(ev)] == ["ambiguous_decrease"]
    # 1000 s later on the wall clock (less than one wrap period, 1310.72 s): a plausible rollover
    again = MachineEngine(spec(counters=cb), eng.snapshot())
    ev = again.apply(sm("good", 12, 2000.0, 7.0), "good") + again.flush("periodic", 2000.0)
    assert yields(ev) == 25_548 and anomalies(ev) == []
    # the wall clock went backwards across the restart: the gap is unknown, so the decrease is ambiguous
    again = MachineEngine(spec(counters=cb), eng.snapshot())
    ev = again.apply(sm("good", 12, 500.0, 7.0), "good") + again.flush("periodic", 500.0)
    assert yields(ev) == 12 and anomalies(ev)[0]["elapsed_s"] is None


def test_ambiguous_zero_after_a_long_gap_is_held_then_decided():
    eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", modulus=2**16, max_rate=50))}))
    ev = eng.apply(sm("good", 40_000, 0.0, 0.0), "good")
    ev += eng.apply(sm("good", 0, 1800.0, 1800.0), "good")
    ev += eng.apply(sm("good", 7, 1801.0, 1801.0), "good")
    ev += eng.flush("periodic", 1802.0)
    assert yields(ev) == 7 and [(a["kind"], a["possible_rollover"]) for a in anomalies(ev)] == \
        [("ambiguous_decrease", "25543")]


@pytest.mark.parametrize("mode", ["delta", "reset_on_read"])
def test_delta_value_delivered_again_is_not_counted_twice(mode):
    """The changeover cut and an OPC UA re-subscription deliver the current value again with the same source
    timestamp: it was counted once."""
    cb = {"good": CounterBinding(CounterSpec("good", mode=mode))}
    eng = MachineEngine(spec(counters=cb))
    eng.dispatch(OrderContext("A", "10"), 0.0)
    ev = eng.apply(sm("good", 5, 100.0, 1.0), "good")
    ev += eng.apply(sm("good", 5, 100.0, 2.0, wall=101.0, reread=True), "good")   # the cut read
    ev += eng.dispatch(OrderContext("B", "10"), 101.0)
    ev += eng.apply(sm("good", 5, 100.0, 3.0, wall=102.0), "good")                # re-subscription
    ev += eng.apply(sm("good", 5, 103.0, 4.0), "good")                             # a new delta of 5
    again = MachineEngine(spec(counters=cb), eng.snapshot())
    ev += again.apply(sm("good", 5, 103.0, 1.0, wall=104.0), "good")              # re-delivered after a restart
    ev += again.flush("periodic", 105.0)
    assert reported(ev) == [("A", "5", "0", "changeover"), ("B", "5", "0", "periodic")]


def test_delta_reread_without_source_time():
    """Modbus has no source time: a delta register re-read at the cut is not counted; a reset-on-read register is
    cleared by every read, so its cut read is counted."""
    for mode, expected in (("delta", 5), ("reset_on_read", 8)):
        eng = MachineEngine(spec(counters={"good": CounterBinding(CounterSpec("good", mode=mode))}))
        ev = eng.apply(Sample("m1/good", 5, True, recv_time=100.0, mono=1.0), "good")
        ev += eng.apply(Sample("m1/good", 5 if mode == "delta" else 3, True, recv_time=101.0, mono=2.0,
                               reread=True), "good")
        ev += eng.flush("periodic", 102.0)
        assert yields(ev) == expected, mode


def test_a_completed_operation_is_not_reopened():
    from mappings.machine import OrderRefused

    eng = MachineEngine(spec())
    eng.dispatch(OrderContext("A", "10"), 0)
    feed(eng, [("good", 0, 0), ("good", 4, 1)])
    ev = eng.dispatch(OrderContext("A", "10", status="completed"), 2)
    assert ev[-1].type == "operation.completed"
    for e in (eng, MachineEngine(spec(), eng.snapshot())):   # also after a restart
        before = e.snapshot()
        with pytest.raises(OrderRefused) as exc:
            e.dispatch(OrderContext("A", "10"), 3)           # the retained "active" dispatch seen again
        assert exc.value.reason == "completed" and "A" in exc.value.detail
        assert e.snapshot() == before and e.context is None
        feed(e, [("good", 9, 4)])
        assert reported(e.flush("periodic", 5)) == [(None, "5", "0", "periodic")]   # unassigned, not booked to A
    # another operation of the same order is fine
    assert [x.type for x in eng.dispatch(OrderContext("A", "20"), 6)] == ["operation.started"]


def test_completed_refs_are_bounded():
    eng = MachineEngine(spec())
    for i in range(eng.MAX_REMEMBERED_COMPLETED + 5):
        eng.dispatch(OrderContext(str(i), "10"), i)
        eng.dispatch(OrderContext(str(i), "10", status="completed"), i)
    snap = eng.snapshot()
    assert len(snap["completed"]) == eng.MAX_REMEMBERED_COMPLETED
    assert snap["completed"][-1] == [str(eng.MAX_REMEMBERED_COMPLETED + 4), "10"]
    eng.dispatch(OrderContext("0", "10"), 100)   # forgotten: the oldest completion may run again
    assert eng.context.ref == ("0", "10")


def test_unchanged_sample_does_not_make_the_engine_dirty():
    eng = MachineEngine(spec())
    eng.apply(sm("good", 10, 0.0, 0.0), "good")
    eng.dirty = False
    for i in range(1, 5):
        assert eng.apply(sm("good", 10, float(i), float(i)), "good") == []
    assert not eng.dirty


def test_next_deadline_and_monotonic_window():
    eng = MachineEngine(spec(interval_s=5.0))
    assert eng.next_deadline() is None
    eng.apply(sm("good", 10, 1e9, 100.0), "good")
    assert eng.next_deadline() is None                      # a baseline opens no window
    eng.apply(sm("good", 12, 1e9 + 1, 101.0), "good")
    assert eng.next_deadline() == 106.0
    assert eng.tick(105.9) == []
    restored = MachineEngine(spec(interval_s=5.0), eng.snapshot())
    assert reported(eng.tick(106.0)) == [(None, "2", "0", "periodic")]
    assert eng.next_deadline() is None
    # restored in a new process: the open window is re-armed at the first tick, then flushed interval_s later
    assert restored.next_deadline() is not None and restored.next_deadline() <= 3.0
    assert restored.tick(3.0) == [] and restored.next_deadline() == 8.0
    assert reported(restored.tick(8.0)) == [(None, "2", "0", "periodic")]
    restored.hold_reports = True
    restored.apply(sm("good", 13, 1e9 + 9, 9.0), "good")
    assert restored.next_deadline() is None


def test_idle_counter_persists_its_reading_time_once_a_minute():
    """An unchanged counter does not dirty the engine, except once per IDLE_PERSIST_S: after a crash the gap to the
    last persisted reading is then at most about a minute too long, and a preset/jump after hours of idling is still
    recognised as implausible."""
    from mappings.counters import IDLE_PERSIST_S

    cb = {"good": CounterBinding(CounterSpec("good", max_rate=10))}
    eng = MachineEngine(spec(counters=cb))
    eng.apply(sm("good", 10, 0.0, 0.0), "good")
    snap, dirty_at = eng.snapshot(), []
    for i in range(1, 3 * 3600):   # three idle hours, read every second
        eng.dirty = False
        eng.apply(sm("good", 10, float(i), float(i)), "good")
        if eng.dirty:
            dirty_at.append(i)
            snap = eng.snapshot()  # what a runtime would commit
    assert len(dirty_at) == int(3 * 3600 / IDLE_PERSIST_S) - 1
    # crash; back 10 s after the last reading: the counter jumped by 5,000 (a preset), implausible at 10/s
    again = MachineEngine(spec(counters=cb), snap)
    ev = again.apply(sm("good", 5010, 3 * 3600 + 10.0, 3.0), "good")
    ev += again.apply(sm("good", 5010, 3 * 3600 + 11.0, 4.0), "good")  # the same again: set there
    assert [a["kind"] for a in anomalies(ev)] == ["implausible_jump"]


def _window_lengths(jitter, machine="m1", windows=50, interval=5.0):
    """Lengths of consecutive reporting windows of one engine, each opened by a count and closed by tick."""
    eng = MachineEngine(MachineSpec(id=machine, counters={"good": CounterBinding(CounterSpec("good"))},
                                    interval_s=interval, interval_jitter=jitter))
    t, v, out = 1000.0, 0, []
    eng.apply(Sample(f"{machine}/good", v, True, recv_time=t, source_time=t, mono=t), "good")  # baseline
    for _ in range(windows):
        v += 1
        t += 0.01
        opened = t
        eng.apply(Sample(f"{machine}/good", v, True, recv_time=t, source_time=t, mono=t), "good")
        deadline = eng.next_deadline()
        assert deadline is not None
        assert eng.tick(deadline - 1e-6) == []  # not before its deadline
        assert reported(eng.tick(deadline)) == [(None, "1", "0", "periodic")]
        out.append(deadline - opened)
        t = deadline
    return out


def test_windows_without_jitter_last_exactly_interval_s():
    assert _window_lengths(0.0) == pytest.approx([5.0] * 50)


def test_jitter_closes_windows_early_within_bounds_and_reproducibly():
    lengths = _window_lengths(0.1)
    assert 0 < lengths[0] <= 5.0  # the first window after a start: anywhere within the interval
    assert all(4.5 - 1e-9 <= x <= 5.0 for x in lengths[1:])  # then at most 10 % early, never late
    assert len({round(x, 6) for x in lengths[1:]}) > 40  # drawn per window, not one fixed offset
    assert _window_lengths(0.1) == lengths  # seeded with the machine id: the same machine, the same windows
    assert _window_lengths(0.1, machine="m2") != lengths


def test_jitter_spreads_the_first_reports_of_machines_started_together():
    """2,500 machines whose first counts come in the same poll: without jitter all their reports fall in one instant
    (one commit and one burst of 2,500 messages, every other event queued behind it); with it, over the interval."""
    def first_deadlines(jitter):
        out = []
        for i in range(2500):
            eng = MachineEngine(MachineSpec(id=f"press-{i}", counters={"good": CounterBinding(CounterSpec("good"))},
                                            interval_s=5.0, interval_jitter=jitter))
            for v, t in ((0, 100.0), (1, 100.25)):
                eng.apply(Sample(f"press-{i}/good", v, True, recv_time=t, source_time=t, mono=t), "good")
            out.append(eng.next_deadline())
        return out

    assert len({round(d, 6) for d in first_deadlines(0.0)}) == 1
    per_slot = {}
    for d in first_deadlines(0.1):
        per_slot[int(d * 10)] = per_slot.get(int(d * 10), 0) + 1  # 100 ms slots, as the core's timer heap
    assert max(per_slot.values()) < 120  # uniform over 50 slots: ~50 each (all 2,500 in one slot without jitter)


@pytest.mark.parametrize("history", [[], [("A", "10", "active")], [("A", "10", "active"), ("A", "10", "completed")],
                                     [("A", "10", "active"), ("B", "20", "active")]])
@pytest.mark.parametrize("ctx", [None, ("A", "10", "active"), ("A", "10", "completed"), ("B", "20", "active"),
                                 ("B", "20", "completed"), ("C", "30", "completed")])
def test_unchanged_by_is_exactly_a_dispatch_that_changes_nothing(history, ctx):
    """The core skips a dispatch ``unchanged_by`` calls a no-op (the retained dispatch seen again at each resync):
    it must be one, and every dispatch that would change something must not be skipped."""
    import copy

    eng = MachineEngine(spec())
    feed(eng, [("good", 0, 0), ("good", 3, 1)])
    for order, op, status in history:
        eng.dispatch(OrderContext(order, op, status=status), 2)
    eng.dirty = False
    new = None if ctx is None else OrderContext(ctx[0], ctx[1], status=ctx[2])
    if eng.refusal(new) is not None:
        return  # refused before the question is asked (answered on .../dispatch/rejected)
    before = copy.deepcopy(eng.snapshot())
    predicted = eng.unchanged_by(new)
    drafts = eng.dispatch(new, 3)
    changed = bool(drafts) or eng.dirty or eng.snapshot() != before
    assert predicted == (not changed), (history, ctx, drafts)
