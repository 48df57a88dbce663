"""The gateway with an OPC UA machine whose counters are UInt16 and whose config gives no width: the width comes from
the server at connect, so a wrap at 65,536 counts exactly; a float totaliser (Float node) is metered exactly; a node
the server refuses is an alarm in /status naming machine and counter. Real simulator, mosquitto, ERP consumer."""

from __future__ import annotations

from decimal import Decimal

from gateway.config import parse_config
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import (
    IDENT,
    RunningGateway,
    assert_ledger_matches,
    dispatch_order,
    wait_until,
    workdir,
)


async def test_width_from_server_float_meter_and_refused_node(tmp_path, mqtt_broker) -> None:
    model = MachineModel("Press1", cycle_time=0.004, scrap_rate=0.05, seed=41, counter_bits=16,
                         start_good=65_300, start_scrap=65_530)
    srv = OpcUaMachineServer(model, host="127.0.0.1", port=free_port(), material_per_part=0.1)
    await srv.start()
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-types")
    await erp.start()
    ids = srv.node_ids
    doc = {"gateway": IDENT, "mqtt": {"host": "127.0.0.1", "port": mqtt_broker.port, "keepalive_s": 2},
           "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
           "connectors": [{"type": "opcua", "id": "opc", "endpoint": srv.endpoint, "security": "none",
                           "watchdog_interval_s": 0.5, "timeout_s": 2}],
           "machines": [
               {"id": "press-1", "reporting": {"interval_s": 0.3}, "counters": {  # no bits: the nodes are UInt16
                   "good": {"connector": "opc", "node_id": ids["good"], "max_rate": 1000},
                   "scrap": {"connector": "opc", "node_id": ids["scrap"], "max_rate": 1000}},
                "materials": {"RM-OIL": {"connector": "opc", "node_id": srv.material_node_id, "unit": "L",
                                         "resolution": "0.01", "max_rate": 100}}},
               {"id": "press-9", "counters": {"good": {"connector": "opc", "node_id": "ns=2;s=Press9.GoodCount"}}}]}
    gw = RunningGateway(parse_config(doc, "<test>"))
    try:
        g = await gw.start()
        await wait_until(lambda: g.engines["press-1"]._signals["good"].spec.modulus == 2**16, 10,
                         message="the width of the UInt16 node applied to the counter")
        await dispatch_order(erp, gw, "press-1", model, "9001", "0010")
        start_good = model.good_raw
        await model.produce(500, timeout=30)
        assert model.good_raw < start_good  # both counters wrapped at 65,536
        await assert_ledger_matches(erp, {"press-1": model})
        assert erp.events("counter.anomaly") == []

        made = Decimal(model.truth_for("9001", "0010")["good"])

        def metered() -> Decimal:
            return sum((Decimal(c["quantity"]) for ev in erp.events("material.consumed")
                        if ev["data"]["method"] == "metered" for c in ev["data"]["components"]), Decimal(0))

        await wait_until(lambda: metered() == made * Decimal("0.1"), 15,
                         message=f"metered {metered()} != {made * Decimal('0.1')}")

        status = g.status()
        assert "tag_refused:press-9/good" in status["alarms"]
        detail = next(a for a in status["alarm_details"] if a["id"] == "tag_refused:press-9/good")
        assert (detail["evidence"]["machine"], detail["evidence"]["counter"]) == ("press-9", "good")
        opc = status["components"]["connector.opc"]
        assert opc["refused_items"] == {"press-9/good": "ns=2;s=Press9.GoodCount: BadNodeIdUnknown"}
        assert opc["counter_types"]["press-1/good"] == "UInt16" and opc["type_mismatches"] == {}
    finally:
        await gw.stop()
        await erp.stop()
        await srv.stop()
