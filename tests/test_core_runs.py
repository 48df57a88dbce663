"""A poll's ``Readings`` (runs of plain registers, keys and values in columns) through ``Core.apply_readings``
against the same readings as ``Sample`` objects through ``Core.apply_samples``: the same staged events, engine
states, dirty machines, timers and counts, with the route cache following faults, reloads and order tags."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.runtime import Gateway
from mappings.machine import MachineEngine
from mappings.samples import Readings, Sample
from tests.e2e import IDENT

KEYS = ("m1/good", "m1/scrap", "m2/good", "nowhere/good", "m3/good", "m2/scrap", "m3/state")


def make_gateway(tmp_path: Any, name: str, order_tags: bool = False, interval_s: float = 3600) -> Gateway:
    def tag(a: int) -> dict[str, Any]:
        return {"connector": "plc", "address": a}

    machines = []
    for i, m in enumerate(("m1", "m2", "m3")):
        doc: dict[str, Any] = {"id": m, "order_source": "tag" if order_tags else "mqtt",
                               "counters": {"good": {**tag(10 * i), "max_rate": 50},
                                            "scrap": {**tag(10 * i + 1), "max_rate": 50}},
                               "reporting": {"interval_s": interval_s}}
        if m == "m3":
            doc["state"] = {**tag(10 * i + 2), "values": {"0": "idle", "1": "running"}}
        if order_tags:
            doc["order_tag"] = tag(10 * i + 3)
            doc["operation_tag"] = tag(10 * i + 4)
        machines.append(doc)
    cfg = parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / f"{name}.db")},
                        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1"}],
                        "machines": machines}, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    return gw


def state(gw: Gateway, *, wall: bool = True) -> dict[str, Any]:
    """What the core holds; ``wall=False``: events compared without their envelope (an order switch is stamped
    with the wall clock)."""
    core = gw.core
    return {"staged": [(r.seq, r.machine, r.type, r.topic, r.payload if wall else json.loads(r.payload)["data"])
                       for r in core.uncommitted],
            "dirty": sorted(core.dirty), "urgent": sorted(core.urgent), "scheduled": sorted(core.scheduled.items()),
            "samples": core.stats.samples, "faulted": sorted(core.faulted),
            "engines": {m: e.snapshot_json() for m, e in core.engines.items()}}


polls = st.lists(st.tuples(
    st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=12), st.integers(min_value=0, max_value=70_000)),
             min_size=len(KEYS), max_size=len(KEYS)),
    st.floats(min_value=0.05, max_value=20),  # time to the next poll
    st.booleans(),  # a single sample (a tag through its decoder) after the run
    st.booleans()), min_size=1, max_size=25)  # a commit after the poll (else the machines stay dirty into the next)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(polls)
def test_readings_are_applied_as_their_samples(tmp_path, program):
    by_runs, by_samples = make_gateway(tmp_path, "runs", interval_s=5), make_gateway(tmp_path, "samples", interval_s=5)
    regs = dict.fromkeys(KEYS, 0)
    recv, mono = 1.7e9, 1000.0
    for gw in (by_runs, by_samples):
        gw.core.now = lambda: mono  # type: ignore[method-assign]  # the timers run on the program's clock
    for steps, dt, single, commit in program:
        values: list[int | None] = []
        for k, step_ in zip(KEYS, steps):
            if step_ is None:
                values.append(None)
                continue
            regs[k] = regs[k] + step_ if step_ <= 12 else step_
            values.append(regs[k])
        r = Readings()
        r.add_run(KEYS, values, recv, mono, len(values) - values.count(None))
        if single:
            r.extend([Sample("m1/good", regs["m1/good"] + 1, True, recv + 0.01, None, "Good", mono + 0.01)])
            regs["m1/good"] += 1
        as_samples = list(r)
        assert len(as_samples) == len(r)
        by_runs.core.stage(by_runs.core.apply_readings(r))
        by_samples.core.stage(by_samples.core.apply_samples(as_samples))
        assert state(by_runs) == state(by_samples)
        for gw in (by_runs, by_samples):  # the reporting windows due, then what a commit clears
            gw.core.run_timers()
        assert state(by_runs) == state(by_samples)
        for gw in (by_runs, by_samples):
            for m, e in gw.core.engines.items():  # each engine's flag says whether the core holds it as dirty
                assert e.dirty == (m in gw.core.dirty), m
        if commit:
            for gw in (by_runs, by_samples):
                gw.core.dirty.clear()
                gw.core.urgent.clear()
                for e in gw.core.engines.values():
                    e.dirty = e.urgent = False
        recv += dt
        mono += dt
    for gw in (by_runs, by_samples):
        for m, e in gw.core.engines.items():
            gw.core.stage(e.flush("test", recv))
    assert state(by_runs) == state(by_samples)


def run(values: list[int | None], t: float) -> Readings:
    r = Readings()
    r.add_run(KEYS, values, 1.7e9 + t, 1000.0 + t, len(values) - values.count(None))
    return r


def test_the_route_cache_follows_a_fault_and_a_reload(tmp_path):
    gw = make_gateway(tmp_path, "gw")
    core = gw.core
    core.apply_readings(run([10, 0, 20, 1, 30, 0, 1], 0))
    core.apply_readings(run([12, 0, 21, 1, 33, 0, 1], 1))
    assert [core.engines[m].window.q["good"] for m in ("m1", "m2", "m3")] == [2, 1, 3]

    def boom(sample, signal):
        raise ArithmeticError("engine bug")

    core.engines["m2"].apply = boom  # type: ignore[method-assign]
    core.apply_readings(run([13, 0, 5, 1, 34, 0, 1], 2))  # m2: a decrease, off the fast path: its engine raises
    assert core.faulted.keys() == {"m2"}
    core.apply_readings(run([14, 0, 25, 1, 35, 0, 1], 3))  # m2 is not routed any more: its counts are ignored
    assert [core.engines[m].window.q["good"] for m in ("m1", "m2", "m3")] == [4, 1, 5]
    # a reload replaces the engines (gateway/reload.py): the runs count into the new ones
    fresh = {m: MachineEngine(core.specs[m], json.loads(e.snapshot_json())) for m, e in core.engines.items()}
    core.engines = fresh
    core.apply_readings(run([16, 0, 26, 1, 36, 0, 1], 4))
    assert fresh["m1"].window.q["good"] == 6 and fresh["m3"].window.q["good"] == 6


def test_a_machine_that_faults_in_a_run_counts_nothing_more_of_it(tmp_path):
    """m2's engine raises on m2/good (a decrease: off the fast path); m2/scrap, later in the same run, is a plain
    increase. As samples, nothing of m2 is applied after its fault (fault() unroutes it); the run must skip the
    rest of m2's values too: its engine's state, dirty set and timers as with the samples."""
    by_runs, by_samples = make_gateway(tmp_path, "runs"), make_gateway(tmp_path, "samples")

    def boom(sample, signal):
        raise ArithmeticError("engine bug")

    for gw in (by_runs, by_samples):
        gw.core.stage(gw.core.apply_samples(list(run([10, 0, 20, 1, 30, 0, 1], 0))))
        gw.core.engines["m2"].apply = boom  # type: ignore[method-assign]
    faulting = run([11, 0, 5, 1, 31, 3, 1], 1)  # m2/good 20 -> 5 raises; m2/scrap 0 -> 3 comes after it
    by_runs.core.stage(by_runs.core.apply_readings(faulting))
    by_samples.core.stage(by_samples.core.apply_samples(list(faulting)))
    assert by_runs.core.faulted.keys() == by_samples.core.faulted.keys() == {"m2"}
    assert json.loads(by_runs.core.engines["m2"].snapshot_json())["counters"]["scrap"]["last"] == 0
    assert state(by_runs) == state(by_samples)


def test_a_run_with_order_tags_is_applied_in_sample_order(tmp_path):
    """Order tags in a run (a register holding the order number): the whole poll goes through the ordered path, as
    its samples would."""
    keys = ("m1/good", "m1/order", "m1/operation", "m2/good")
    by_runs, by_samples = make_gateway(tmp_path, "runs", True), make_gateway(tmp_path, "samples", True)
    for i, values in enumerate(([100, 4711, 10, 5], [103, 4711, 10, 7], [108, 4712, 20, 9], [110, 4712, 20, 9])):
        r = Readings()
        r.add_run(keys, list(values), 1.7e9 + i, 1000.0 + i, len(values))
        by_runs.core.stage(by_runs.core.apply_readings(r))
        by_samples.core.stage(by_samples.core.apply_samples(list(r)))
        for gw in (by_runs, by_samples):
            gw.core.settle_order_tags()
        assert state(by_runs, wall=False) == state(by_samples, wall=False)
    assert by_runs.core.engines["m1"].context is not None and by_runs.core.engines["m1"].context.order == "4712"


def test_queued_readings_are_coalesced_under_overload_without_losing_a_part(tmp_path, monkeypatch):
    """The bounded inbox (Core._coalesce) takes a poll's Readings as it takes sample lists: the latest value of each
    cumulative counter is kept, and the round applies what is left; the quantities are those of every poll."""
    from gateway import core as core_module

    monkeypatch.setattr(core_module, "MAX_QUEUED_SAMPLES", 40)
    gw = make_gateway(tmp_path, "gw")
    gw.core.now = lambda: 1000.0  # type: ignore[method-assign]  # no reporting window is due in the round
    keys = ("m1/good", "m2/good")
    for i in range(100):
        r = Readings()
        r.add_run(keys, [i + 1, i + 5], 1.7e9 + i * 0.01, 1000.0 + i * 0.01, 2)
        gw.core.on_samples(r)
    assert gw.core.queued_samples <= 40 + 2 and gw.stats.samples_coalesced > 100
    gw.core.round()
    assert not gw.core.inbox and gw.core.queued_samples == 0
    assert [gw.core.engines[m].window.q["good"] for m in ("m1", "m2")] == [99, 99]
