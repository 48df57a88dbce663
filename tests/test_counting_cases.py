"""Table-driven counting cases: each folder in tests/counting_cases/ holds a case.yaml with a machine, a sequence of
steps (samples, bad reads, dispatches, ticks, restarts) and the events the engine must emit, in order."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from mappings.counters import CounterSpec
from mappings.machine import CounterBinding, EventDraft, MachineEngine, MachineSpec, OrderContext, OrderRefused
from mappings.samples import Sample

CASES = sorted(p for p in (Path(__file__).parent / "counting_cases").iterdir() if p.is_dir())
QUANTITY_KEYS = ("yield", "scrap", "rework")
EVIDENCE_KEYS = ("rollovers", "resets", "glitches")


def build_spec(m: dict[str, Any]) -> MachineSpec:
    counters = {}
    for name, c in m["counters"].items():
        modulus = c["max_value"] + 1 if "max_value" in c else 2 ** c.get("bits", 32)
        counters[name] = CounterBinding(
            CounterSpec(name, mode=c.get("mode", "cumulative"), modulus=modulus, signed=c.get("signed", False),
                        max_rate=c.get("max_rate", 50)),
            Decimal(str(c.get("scale", 1))),
        )
    return MachineSpec(id="m1", counters=counters, interval_s=m.get("interval_s", 5), max_units=m.get("max_units"))


def run_case(case: dict[str, Any]) -> list[Any]:
    """Steps: ``t`` is the wall-clock receive time and, unless ``src`` is given (null: no source time, as on Modbus),
    the source time; ``mono`` is the monotonic receive time (default: none, the engine falls back to the wall clock);
    ``tick`` is a monotonic time; ``reread: true`` marks the step's samples as the cut read. A refused dispatch shows
    as a pseudo-event ``dispatch.refused`` with its reason."""
    spec = build_spec(case["machine"])
    eng = MachineEngine(spec)
    events = []
    for step in case["steps"]:
        t = step.get("t", 0)
        src = step.get("src", t)
        mono = step.get("mono")
        if step.get("restart"):
            eng = MachineEngine(spec, eng.snapshot())
            continue
        if "tick" in step:
            events += eng.tick(step["tick"])
            continue
        if "dispatch" in step:
            d = step["dispatch"]
            ctx = None if d is None else OrderContext(str(d["order"]), str(d["operation"]), d.get("status", "active"))
            try:
                events += eng.dispatch(ctx, t)
            except OrderRefused as exc:
                events.append(EventDraft("dispatch.refused", "m1", t, {"reason": exc.reason}))
            continue
        for name in spec.counters:
            if name in step:
                events += eng.apply(Sample(f"m1/{name}", step[name], True, recv_time=t, source_time=src, mono=mono,
                                           reread=step.get("reread", False)), name)
        for name in step.get("bad", []):
            events += eng.apply(Sample(f"m1/{name}", step.get("bad_value"), False, recv_time=t, source_time=src,
                                       status="BadCommunicationError", mono=mono), name)
    return events


def matches(ev: Any, exp: dict[str, Any]) -> list[str]:
    problems = []
    if ev.type != exp["type"]:
        return [f"type {ev.type} != {exp['type']}"]
    d = ev.data
    for key, want in exp.items():
        if key == "type":
            continue
        if key in QUANTITY_KEYS:
            got = d["quantities"][key]
        elif key == "totals":
            got = {k: d["totals"][k] for k in want}
        elif key in EVIDENCE_KEYS:
            got = {e["counter"]: e[key] for e in d["evidence"] if e["counter"] in want}
        else:
            got = d.get(key)
        if got != want:
            problems.append(f"{key}: got {got!r}, expected {want!r}")
    return problems


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_counting_case(case_dir: Path) -> None:
    case = yaml.safe_load((case_dir / "case.yaml").read_text())
    events = run_case(case)
    expected = case["expected"]
    summary = "\n".join(f"  {e.type} {e.data}" for e in events)
    assert len(events) == len(expected), f"{case['description']}\nexpected {len(expected)} events, got:\n{summary}"
    for i, (ev, exp) in enumerate(zip(events, expected)):
        problems = matches(ev, exp)
        assert not problems, f"{case['description']}\nevent {i}: " + "; ".join(problems) + f"\nall events:\n{summary}"


def test_required_cases_present() -> None:
    names = {c.name for c in CASES}
    required = {"rollover_u16", "rollover_u32", "rollover_s16", "rollover_s32", "reset", "zero_glitch",
                "implausible_jump", "bad_quality_span", "first_sample_after_restart", "reset_on_read", "delta_mode",
                "total_minus_scrap", "changeover_mid_window", "unassigned_counts", "ambiguous_decrease",
                "clock_step_back", "clock_step_forward_reset", "delta_redelivered", "completed_not_reopened"}
    assert required <= names, required - names
