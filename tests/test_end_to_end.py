"""End to end: simulated OPC UA and Modbus machines → gateway → real mosquitto → ERP consumer ledger.

Every test asserts that the ERP ledger equals the simulators' ground truth exactly, per production order.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, assert_ledger_matches, gateway_config, wait_until, workdir

HIER = (IDENT["enterprise"], IDENT["site"], IDENT["area"], IDENT["line"])


@pytest.fixture
async def plant(tmp_path, mqtt_broker):
    """Broker, two simulated machines (OPC UA 32-bit, Modbus 16-bit near rollover), ERP consumer."""
    broker = mqtt_broker
    m1 = MachineModel("Press1", cycle_time=0.02, scrap_rate=0.07, seed=11, counter_bits=32)
    m2 = MachineModel("Press2", cycle_time=0.02, scrap_rate=0.05, seed=12, counter_bits=16,
                      start_good=65_400, start_scrap=65_530)
    opc = OpcUaMachineServer(m1, host="127.0.0.1", port=free_port())
    mb = ModbusMachineServer(m2, host="127.0.0.1", port=free_port(), unit_id=1)
    await opc.start()
    await mb.start()
    erp = ErpConsumer("127.0.0.1", broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-test")
    await erp.start()
    cfg = gateway_config(broker_port=broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc, modbus=mb)
    gw = RunningGateway(cfg)
    p = type("Plant", (), {"broker": broker, "m1": m1, "m2": m2, "opc": opc, "mb": mb, "erp": erp, "gw": gw})
    try:
        yield p
    finally:
        await gw.stop()
        await erp.stop()
        await mb.stop()
        await opc.stop()


async def dispatch(p, machine, model, order, op):
    p.erp.dispatch(*HIER, machine, order, op)
    await p.gw.wait_dispatch_applied(machine, order, op)
    model.set_order(order, op)


async def test_two_machines_fixed_run_ledger_equals_truth(plant):
    p = plant
    await p.gw.start()
    await dispatch(p, "press-1", p.m1, "4711", "0010")
    await dispatch(p, "press-2", p.m2, "4712", "0020")
    await asyncio.gather(p.m1.produce(150, timeout=30), p.m2.produce(200, timeout=30))
    await assert_ledger_matches(p.erp, {"press-1": p.m1, "press-2": p.m2})
    # the Modbus machine's 16-bit counters rolled over during the run
    assert p.m2.good_raw < 65_400 and p.m2.scrap_raw < 65_530
    assert p.erp.gaps() == {}
    types = {e["type"] for e in p.erp.events()}
    assert {"operation.started", "operation.quantity_reported", "machine.state_changed"} <= types


async def test_restart_in_the_middle_of_a_run_stays_exact(plant):
    p = plant
    await p.gw.start()
    await dispatch(p, "press-1", p.m1, "5001", "0010")
    await dispatch(p, "press-2", p.m2, "5002", "0010")
    run = asyncio.gather(p.m1.produce(300, timeout=60), p.m2.produce(300, timeout=60))
    # in the middle of the run: both machines' quantities are flowing to the ERP
    await wait_until(lambda: all(k in p.erp.ledger() for k in (("press-1", "5001", "0010"), ("press-2", "5002", "0010")))
                     and p.m1.parts_made >= 60 and p.m2.parts_made >= 60, 20)
    await p.gw.stop()                 # clean stop while both machines keep producing
    made_while_down = p.m1.parts_made
    await asyncio.sleep(1.0)          # the outage (the scenario, not a wait)
    assert p.m1.parts_made > made_while_down, "the machine kept producing while the gateway was down"
    assert p.m1.parts_made < 300, "the run ended before the gateway came back: not a restart in the middle"
    await p.gw.start()
    await run
    await assert_ledger_matches(p.erp, {"press-1": p.m1, "press-2": p.m2})
    assert p.gw.generations == 2


async def test_changeover_mid_run_attributes_to_the_right_order(plant):
    p = plant
    await p.gw.start()
    await dispatch(p, "press-1", p.m1, "6001", "0010")
    await p.m1.produce(60, timeout=30)
    await dispatch(p, "press-1", p.m1, "6002", "0010")
    await p.m1.produce(40, timeout=30)
    await assert_ledger_matches(p.erp, {"press-1": p.m1})
    assert set(p.m1.truth) == {("6001", "0010"), ("6002", "0010")}


async def test_counts_without_order_are_kept_as_unassigned(plant):
    p = plant
    await p.gw.start()
    await p.gw.wait_counters_read("press-2")  # parts made before the first reading would be the baseline
    await p.m2.produce(30, timeout=30)
    await assert_ledger_matches(p.erp, {"press-2": p.m2})
    assert (("press-2", None, None)) in p.erp.ledger()


async def test_malformed_dispatch_is_rejected_counted_and_gateway_keeps_running(plant):
    p = plant
    gw = await p.gw.start()
    await p.gw.wait_subscribed()  # the malformed dispatches are not retained: published before that, they are lost
    topic = f"edge/v1/{'/'.join(HIER)}/press-1/dispatch"
    bad = [b"{not json", json.dumps({"order": "1"}).encode(), json.dumps({"order": "1", "operation": "10", "qty": 3}).encode(),
           b"\xff\xfe", json.dumps(["order"]).encode()]
    for payload in bad:
        p.erp.publish_raw(topic, payload)
    p.erp.publish_raw(f"edge/v1/{'/'.join(HIER)}/press-9/dispatch", json.dumps({"order": "1", "operation": "10"}).encode())
    await wait_until(lambda: gw.stats.dispatch_rejected >= len(bad) + 1, 10)
    assert gw.stats.dispatch_rejected_by_reason["invalid_json"] == 2
    assert gw.stats.dispatch_rejected_by_reason["unknown_machine"] == 1
    assert p.gw.task is not None and not p.gw.task.done()
    # still works: a good dispatch after the bad ones is applied and counts flow to the order
    await dispatch(p, "press-1", p.m1, "7001", "0010")
    await p.m1.produce(20, timeout=30)
    await assert_ledger_matches(p.erp, {"press-1": p.m1})
