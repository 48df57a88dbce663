"""Float material meters (a totaliser read as float32/float64): rounded to the configured resolution, counted as exact
decimals, float noise never counted, a decrease is a reset (a float meter does not wrap). Engine tables, config, and
end to end: Modbus simulator (float32 totaliser) -> gateway -> mosquitto -> ERP, metered quantity == truth."""

from __future__ import annotations

import json
import struct
from decimal import Decimal

import pytest

from gateway.config import ConfigError, parse_config
from gateway.runtime import machine_specs
from mappings.counters import CounterSpec, CounterState, step
from mappings.samples import Sample
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ADDRESSES, ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import (
    IDENT,
    RunningGateway,
    assert_ledger_matches,
    dispatch_order,
    wait_until,
    workdir,
)


def f32(x: float) -> float:
    """What a float32 register holding ``x`` decodes to."""
    return struct.unpack(">f", struct.pack(">f", x))[0]


RES = Decimal("0.01")


def meter(**kw: object) -> CounterSpec:
    return CounterSpec("material:RM-OIL", modulus=None, max_rate=1e6, resolution=RES, **kw)  # type: ignore[arg-type]


def run(spec: CounterSpec, values: list[object], state: CounterState | None = None) -> list[tuple[str, int]]:
    st = state if state is not None else CounterState()
    return [(r.outcome, r.delta) for r in
            (step(spec, st, Sample("m/material:RM-OIL", v, True, float(i), mono=float(i))) for i, v in enumerate(values))]


def test_float_noise_is_not_counted_and_quantities_telescope() -> None:
    # float32(0.1 x n): 0.1 is not a binary fraction, every reading carries noise
    values = [f32(0.1 * n) for n in range(501)]
    assert values[3] != 0.3  # the noise is there
    out = run(meter(), values)
    assert out[0] == ("baseline", 0)
    steps = sum(d for _, d in out)
    assert steps * RES == Decimal("50.00")  # exactly 500 x 0.1, no phantom quantity
    assert all(o in ("increase", "baseline") for o, _ in out)


def test_noise_below_the_baseline_is_ignored_not_a_reset() -> None:
    # 12.345 sits on a rounding edge: readings just below and above flip between 1234 and 1235 steps
    out = run(meter(), [12.3449999, 12.3450001, 12.3449999, 12.3450001, 12.36])
    assert [o for o, _ in out] == ["baseline", "increase", "none", "none", "increase"]
    assert sum(d for _, d in out) == 2  # 12.34 -> 12.36: the flip is counted once, never twice


def test_a_decrease_is_a_reset_a_float_meter_does_not_wrap() -> None:
    out = run(meter(), [500.25, 510.5, 3.75])
    assert out == [("baseline", 0), ("increase", 1025), ("reset", 375)]  # 3.75 consumed since the reset
    # a zero is held (a comms glitch or a reset: the next value decides), as for integer counters
    out = run(meter(), [500.25, 0.0, 500.5])
    assert out == [("baseline", 0), ("held_zero", 0), ("glitch", 25)]
    # a configured noise band: a decrease of up to 5 steps is noise
    assert run(meter(jitter=5), [10.0, 9.95, 10.01])[1:] == [("none", 0), ("increase", 1)]
    assert run(meter(jitter=5), [10.0, 9.94])[1:] == [("reset", 994)]
    # a garbage read (held: no reset makes 500.00 within 1 s at 5 L/s), then back within noise of the baseline: a
    # glitch, nothing counted twice, no preset (red before: a preset anomaly and 0.01 counted again)
    slow = CounterSpec("material:RM-OIL", modulus=None, max_rate=500.0, resolution=RES)
    out = run(slow, [1000.00, 500.00, 999.99, 1000.00, 1000.01])
    assert out == [("baseline", 0), ("held_zero", 0), ("none", 0), ("none", 0), ("increase", 1)]


def test_invalid_readings_and_a_changed_resolution() -> None:
    out = run(meter(), [1.0, float("nan"), float("inf"), "1.5", True, 1.5])
    assert [o for o, _ in out] == ["baseline", "invalid", "invalid", "invalid", "invalid", "increase"]
    st = CounterState()
    run(meter(), [7.5], st)
    assert st.to_dict()["resolution"] == "0.01" and st.last == 750
    restored = CounterState.from_dict(st.to_dict())
    finer = CounterSpec("material:RM-OIL", modulus=None, max_rate=1e6, resolution=Decimal("0.001"))
    # the baseline was counted in another unit: dropped, the next reading is a new baseline (no phantom 6750 steps)
    assert run(finer, [7.6], restored) == [("baseline", 0)] and restored.last == 7600


def test_integer_counters_are_untouched() -> None:
    spec = CounterSpec("good", modulus=2**16, max_rate=10)
    out = [step(spec, st := CounterState(), Sample("m/good", 65535, True, 0.0, mono=0.0))]
    out.append(step(spec, st, Sample("m/good", 1, True, 1.0, mono=1.0)))
    assert [(r.outcome, r.delta) for r in out] == [("baseline", 0), ("rollover", 2)]
    assert "resolution" not in st.to_dict()


BASE = {"gateway": {"id": "gw-1", "enterprise": "acme", "site": "p1", "area": "a1", "line": "l1"},
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1"},
                       {"type": "opcua", "id": "plc", "endpoint": "opc.tcp://127.0.0.1:4840", "security": "none"}]}


def machine(material: dict[str, object], good: dict[str, object] | None = None) -> dict[str, object]:
    return {**BASE, "machines": [{"id": "m1", "counters": {"good": good or {"connector": "mb", "address": 0}},
                                  "materials": {"RM-OIL": {"unit": "L", **material}}}]}


def test_config_builds_a_float_meter() -> None:
    cfg = parse_config(machine({"connector": "mb", "address": 110, "data_type": "float32", "resolution": "0.01",
                                "max_rate": 2}), "<t>")
    b = machine_specs(cfg)[0].materials["RM-OIL"].binding
    assert (b.spec.resolution, b.spec.modulus, b.scale, b.spec.jitter) == (RES, None, RES, 1)
    assert b.spec.max_rate == pytest.approx(200)  # 2 L/s = 200 steps/s
    cfg = parse_config(machine({"connector": "plc", "node_id": "ns=2;s=Oil", "resolution": "0.5", "noise": "2",
                                "scale": 2}), "<t>")
    b = machine_specs(cfg)[0].materials["RM-OIL"].binding
    assert (b.spec.jitter, b.scale) == (4, Decimal("1.0"))
    # integer meters keep their modulus
    b = machine_specs(parse_config(machine({"connector": "mb", "address": 120, "data_type": "uint16"}), "<t>"))[0]
    assert b.materials["RM-OIL"].binding.spec.modulus == 2**16 and b.materials["RM-OIL"].binding.spec.resolution is None


@pytest.mark.parametrize("material,good,path,fragment", [
    ({"connector": "mb", "address": 110, "data_type": "float32"}, None, "machines[0].materials.RM-OIL.resolution",
     "needs a resolution"),
    ({"connector": "mb", "address": 120, "data_type": "uint32", "resolution": "0.1"}, None,
     "machines[0].materials.RM-OIL.resolution", "not uint32"),
    ({"connector": "plc", "node_id": "ns=2;s=Oil", "resolution": "0.1", "max_value": 99}, None,
     "machines[0].materials.RM-OIL.max_value", "does not wrap"),
    ({"connector": "plc", "node_id": "ns=2;s=Oil", "resolution": "0.1", "noise": "0.05"}, None,
     "machines[0].materials.RM-OIL.noise", "below the resolution"),
    ({"connector": "mb", "address": 110, "data_type": "float32", "resolution": "0.1"},
     {"connector": "mb", "address": 0, "resolution": "0.1"}, "machines[0].counters.good.resolution", "unknown key"),
])
def test_config_errors_name_the_field(material, good, path, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(machine(material, good), "<t>")
    problems = {p.path: p.message for p in err.value.problems}
    assert path in problems and fragment in problems[path], problems


async def test_float32_totaliser_end_to_end_is_exact(tmp_path, mqtt_broker) -> None:
    """The Modbus simulator's float32 totaliser (good parts x 0.1 L, each reading carrying float32 noise) -> gateway ->
    mosquitto -> ERP: the metered consumption booked equals parts x 0.1 exactly, and the pieces match the truth."""
    model = MachineModel("Press2", cycle_time=0.005, scrap_rate=0.1, seed=31, start_good=123)
    srv = ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1, material_per_part=0.1)
    await srv.start()
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-float")
    await erp.start()
    tags = srv.tag_addresses()
    doc = {"gateway": IDENT, "mqtt": {"host": "127.0.0.1", "port": mqtt_broker.port, "keepalive_s": 2},
           "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
           "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": srv.port, "unit_id": 1,
                           "poll_interval_s": 0.02, "timeout_s": 1}],
           "machines": [{"id": "press-2", "reporting": {"interval_s": 0.3}, "counters": {
               "good": {"connector": "mb", **tags["good"], "max_rate": 1000},
               "scrap": {"connector": "mb", **tags["scrap"], "max_rate": 1000}},
               "materials": {"RM-OIL": {"connector": "mb", **ADDRESSES["material_CDAB"], "unit": "L",
                                        "resolution": "0.01", "max_rate": 100}}}]}
    gw = RunningGateway(parse_config(doc, "<test>"))
    try:
        await gw.start()
        await dispatch_order(erp, gw, "press-2", model, "8001", "0010")
        start_good = model.good_raw
        await model.produce(400, timeout=30)
        made = model.good_raw - start_good
        assert made > 300
        # the register values carry float noise (0.1 is no binary fraction)
        assert sum(Decimal(f32(n * 0.1)) != Decimal(n) / 10 for n in range(start_good, model.good_raw)) > made // 2

        def metered() -> Decimal:
            return sum((Decimal(c["quantity"]) for ev in erp.events("material.consumed")
                        if ev["data"]["method"] == "metered" for c in ev["data"]["components"]
                        if c["material"] == "RM-OIL"), Decimal(0))

        expected = Decimal(made) * Decimal("0.1")
        try:
            await wait_until(lambda: metered() == expected, 20)
        except AssertionError:
            raise AssertionError(f"metered {metered()} != {expected}") from None
        await assert_ledger_matches(erp, {"press-2": model})
        assert all(str(c["quantity"]).count(".") <= 1 and len(str(c["quantity"]).partition(".")[2]) <= 2
                   for ev in erp.events("material.consumed") for c in ev["data"]["components"])
        assert erp.events("counter.anomaly") == []
    finally:
        await gw.stop()
        await erp.stop()
        await srv.stop()


def test_implausible_jump_of_a_float_meter_is_reported_in_the_meters_unit() -> None:
    """The engine counts a float meter in resolution steps; its anomaly speaks the meter's unit: from/to are the
    readings (decimal strings rounded to the resolution), held the quantity, the detail the jump and the configured
    max_rate (they were 123456 steps and 200 steps/s for readings of 1234.56 L and max_rate 2 L/s)."""
    from jsonschema import Draft202012Validator

    from gateway import schema
    from mappings.machine import MachineEngine

    cfg = parse_config(machine({"connector": "mb", "address": 110, "data_type": "float32", "resolution": "0.01",
                                "max_rate": 2}), "<t>")
    eng = MachineEngine(machine_specs(cfg)[0])
    sig = "material:RM-OIL"
    ev = eng.apply(Sample(f"m1/{sig}", f32(1234.56), True, 100.0, mono=100.0), sig)
    ev += eng.apply(Sample(f"m1/{sig}", f32(1734.56), True, 101.0, mono=101.0), sig)  # 500 L in 1 s at 2 L/s
    assert not [e for e in ev if e.type == "counter.anomaly"]  # held: the next reading decides
    ev += eng.apply(Sample(f"m1/{sig}", f32(1734.6), True, 102.0, mono=102.0), sig)  # on from there: set higher
    [anomaly] = [e for e in ev if e.type == "counter.anomaly"]
    data = json.loads(anomaly.data.to_json())
    assert (data["kind"], data["from"], data["to"], data["held"], data["counted"]) == (
        "implausible_jump", "1234.56", "1734.56", "500", "0.04")
    assert data["detail"] == ("increase of 500 exceeds max_rate 2/s for the elapsed time and the next reading "
                              "confirmed it (the counter was set there): not counted, baseline moved")
    full = schema.event_schemas()["counter.anomaly"]
    Draft202012Validator({**full["properties"]["data"], "$defs": full["$defs"]}).validate(data)
