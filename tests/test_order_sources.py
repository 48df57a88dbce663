"""Production-order context from PLC tags (OPC UA string nodes, Modbus string registers) and from the local command
(CLI → local HTTP API), plus the health endpoint. Ledger == truth per order in each case."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from gateway.config import parse_config
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, assert_ledger_matches, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def erp(tmp_path, mqtt_broker):
    c = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-orders")
    await c.start()
    yield c
    await c.stop()


def base_doc(broker_port, store):
    return {"gateway": IDENT, "mqtt": {"port": broker_port, "keepalive_s": 2}, "store": {"path": store}}


def opcua_tag_doc(broker_port, tmp_path, opc, *, complete: bool) -> dict:
    """press-1 on the OPC UA simulator: good and scrap counters, its order from the PLC's order and operation tags
    (and the completion flag with ``complete``), a report every 0.3 s."""
    n = opc.node_ids
    doc = base_doc(broker_port, str(tmp_path / "gw.db"))
    doc["connectors"] = [{"type": "opcua", "id": "opc", "endpoint": opc.endpoint, "security": "none"}]
    machine = {"id": "press-1", "order_source": "tag",
               "counters": {"good": {"connector": "opc", "node_id": n["good"], "max_rate": 500},
                            "scrap": {"connector": "opc", "node_id": n["scrap"], "max_rate": 500}},
               "order_tag": {"connector": "opc", "node_id": n["order"]},
               "operation_tag": {"connector": "opc", "node_id": n["operation"]},
               "reporting": {"interval_s": 0.3}}
    if complete:
        machine["complete_tag"] = {"connector": "opc", "node_id": n["complete"]}
    doc["machines"] = [machine]
    return doc


async def changeover(model, order, op, gw, machine):
    model.pause()
    model.set_order(order, op)  # the PLC writes its order tags
    await wait_until(lambda: (e := gw.gw.engines[machine]).context is not None and e.context.ref == (order, op), 15)


async def test_order_from_opcua_tags(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press1", cycle_time=0.01, seed=5, counter_bits=32)
    async with OpcUaMachineServer(model, host="127.0.0.1", port=free_port()) as opc:
        gw = RunningGateway(parse_config(opcua_tag_doc(mqtt_broker.port, tmp_path, opc, complete=True)))
        await gw.start()
        try:
            await changeover(model, "800100", "0010", gw, "press-1")
            await model.produce(50, timeout=20)
            model.complete_operation()  # the PLC raises 'operation complete': final confirmation
            await wait_until(lambda: erp.events("operation.completed"), 15)
            done = erp.events("operation.completed")[0]["data"]
            truth = model.truth[("800100", "0010")]
            assert (done["order"], done["totals"]["yield"], done["totals"]["scrap"]) == \
                ("800100", str(truth["good"]), str(truth["scrap"]))
            assert gw.gw.engines["press-1"].context is None
            await changeover(model, "800200", "0020", gw, "press-1")
            await model.produce(30, timeout=20)
            await assert_ledger_matches(erp, {"press-1": model})
            # an MQTT dispatch is refused for a machine whose order comes from its PLC
            erp.dispatch(IDENT["enterprise"], IDENT["site"], IDENT["area"], IDENT["line"], "press-1", "X", "1")
            await wait_until(lambda: gw.gw.stats.dispatch_rejected_by_reason["order_source"] == 1, 10)
            assert gw.gw.engines["press-1"].context.ref == ("800200", "0020")
        finally:
            await gw.stop()


async def test_an_unusable_order_text_on_the_plc_books_the_parts_unassigned(tmp_path, mqtt_broker, erp):
    """The PLC's order tag (an OPC UA String) shows a text with a control character while the operation tag keeps its
    value: no order number, and no longer the order the parts were booked to. The parts made meanwhile reach the ERP
    unassigned (order null), none under the old order or the bad text; a usable order afterwards is a changeover
    as usual (red before: the 20 parts went to 800100)."""
    model = MachineModel("Press1", cycle_time=0.01, seed=9, counter_bits=32)
    async with OpcUaMachineServer(model, host="127.0.0.1", port=free_port()) as opc:
        gw = RunningGateway(parse_config(opcua_tag_doc(mqtt_broker.port, tmp_path, opc, complete=False)))
        await gw.start()
        try:
            await changeover(model, "800100", "0010", gw, "press-1")
            await model.produce(30, timeout=20)
            model.pause()
            model.set_order("800\x01100", "0010")  # the order tag's text is garbled; the operation tag stays
            await wait_until(lambda: gw.gw.engines["press-1"].context is None, 15)
            await model.produce(20, timeout=20)
            await changeover(model, "800200", "0020", gw, "press-1")
            await model.produce(10, timeout=20)
            truth = {k: v for k, v in model.truth.items() if v["good"] or v["scrap"]}

            def ledger() -> dict:
                return {(o, op): (int(v["yield"]), int(v["scrap"])) for (m, o, op), v in erp.ledger().items()
                        if m == "press-1" and (v["yield"] or v["scrap"])}

            expected = {("800100", "0010"): truth[("800100", "0010")], (None, None): truth[("800\x01100", "0010")],
                        ("800200", "0020"): truth[("800200", "0020")]}
            expected = {k: (v["good"], v["scrap"]) for k, v in expected.items()}
            try:
                await wait_until(lambda: ledger() == expected, 20)
            except AssertionError:
                raise AssertionError(f"ledger {ledger()} != truth {expected}") from None
            assert sum(v[0] + v[1] for v in expected.values()) == 60
            assert not erp.conflicts() and erp.stats["rejected"] == 0
            assert [e["data"]["order"] for e in erp.events("operation.started")] == ["800100", "800200"]
        finally:
            await gw.stop()


async def test_order_from_modbus_string_registers(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press2", cycle_time=0.01, seed=6, counter_bits=16)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        tags = mb.tag_addresses()
        doc = base_doc(mqtt_broker.port, str(tmp_path / "gw.db"))
        doc["connectors"] = [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05}]
        doc["machines"] = [{"id": "press-2", "order_source": "tag",
                            "counters": {"good": {"connector": "mb", **tags["good"], "max_rate": 500},
                                         "scrap": {"connector": "mb", **tags["scrap"], "max_rate": 500}},
                            "order_tag": {"connector": "mb", "address": 10, "data_type": "string", "length": 10},
                            "operation_tag": {"connector": "mb", "address": 20, "data_type": "string", "length": 4},
                            "reporting": {"interval_s": 0.3}}]
        gw = RunningGateway(parse_config(doc))
        await gw.start()
        try:
            await changeover(model, "ORD-77", "0010", gw, "press-2")
            await model.produce(40, timeout=20)
            await changeover(model, "ORD-78", "0010", gw, "press-2")
            await model.produce(40, timeout=20)
            await assert_ledger_matches(erp, {"press-2": model})
        finally:
            await gw.stop()


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_http_status(url, code, timeout=15):
    deadline = asyncio.get_running_loop().time() + timeout
    while (await asyncio.to_thread(http_get, url))[0] != code:
        assert asyncio.get_running_loop().time() < deadline, f"{url} never answered {code}"
        await asyncio.sleep(0.1)


async def test_local_order_command_and_health(tmp_path, mqtt_broker, erp, monkeypatch):
    model = MachineModel("Press3", cycle_time=0.01, seed=7, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        tags = mb.tag_addresses()
        port = free_port()
        monkeypatch.setenv("EG_TEST_TOKEN", "s3cret-token")
        doc = base_doc(mqtt_broker.port, str(tmp_path / "gw.db"))
        doc["http"] = {"enabled": True, "port": port, "token_env": "EG_TEST_TOKEN"}
        doc["connectors"] = [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05}]
        doc["machines"] = [{"id": "press-3", "order_source": "local",
                            "counters": {"good": {"connector": "mb", **tags["good"], "max_rate": 500},
                                         "scrap": {"connector": "mb", **tags["scrap"], "max_rate": 500}},
                            "reporting": {"interval_s": 0.3}}]
        cfg_path = tmp_path / "gw.yaml"
        cfg_path.write_text(yaml.safe_dump(doc))
        gw = RunningGateway(parse_config(doc))
        await gw.start()
        try:
            await wait_http_status(f"http://127.0.0.1:{port}/health", 200)
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/health")
            assert json.loads(body)["healthy"] is True

            def order_cmd(*args):
                return subprocess.run([sys.executable, "-m", "gateway.cli", "order", *args, "--config", str(cfg_path)],
                                      cwd=ROOT, capture_output=True, text=True, timeout=30,
                                      env={**__import__("os").environ, "EG_TEST_TOKEN": "s3cret-token",
                                           # a proxy in the environment is not used: it would get the token (red
                                           # before: the command went to this dead proxy and failed)
                                           "http_proxy": f"http://127.0.0.1:{free_port()}", "no_proxy": ""})

            r = await asyncio.to_thread(order_cmd, "set", "press-3", "L-1", "0010")
            assert r.returncode == 0, r.stderr
            await wait_until(lambda: (e := gw.gw.engines["press-3"]).context is not None and e.context.order == "L-1", 10)
            model.set_order("L-1", "0010")
            await model.produce(30, timeout=20)
            r = await asyncio.to_thread(order_cmd, "set", "press-3", "L-1", "0010", "--complete")
            assert r.returncode == 0, r.stderr
            await wait_until(lambda: erp.events("operation.completed"), 10)
            await assert_ledger_matches(erp, {"press-3": model})
            # unknown machine and wrong token are refused
            r = await asyncio.to_thread(order_cmd, "set", "press-9", "L-2", "0010")
            assert r.returncode == 1 and "404" in r.stderr
            req = urllib.request.Request(f"http://127.0.0.1:{port}/machines/press-3/order", method="POST",
                                         data=b'{"order": "Z", "operation": "1"}', headers={"Authorization": "Bearer nope",
                                                                                              "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
            assert exc.value.code == 401
            status, text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and "edge_gateway_events_committed_total" in text
            # the broker goes away: degraded (200), not failed: still ready, it buffers
            await mqtt_broker.astop()
            await wait_until(lambda: gw.gw.link.status.state.value != "connected", 10)
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/health")
            assert status == 200 and json.loads(body)["status"] == "degraded"
            await wait_http_status(f"http://127.0.0.1:{port}/readyz", 200)
        finally:
            await gw.stop()


async def test_the_local_order_command_refuses_a_control_character_in_the_order_number(tmp_path, mqtt_broker, erp):
    """`edge-gateway order set` (and a POST to the HTTP API) with a control character (C0, DEL or C1) in the order
    or operation number is refused with 400 and a detail naming the field; the machine keeps its order. Red before
    for the C1 range (U+0080-U+009F)."""
    model = MachineModel("Press4", cycle_time=0.01, seed=8, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        tags = mb.tag_addresses()
        port = free_port()
        doc = base_doc(mqtt_broker.port, str(tmp_path / "gw.db"))
        doc["http"] = {"enabled": True, "port": port}
        doc["connectors"] = [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05}]
        doc["machines"] = [{"id": "press-4", "order_source": "local",
                            "counters": {"good": {"connector": "mb", **tags["good"], "max_rate": 500}},
                            "reporting": {"interval_s": 0.3}}]
        cfg_path = tmp_path / "gw.yaml"
        cfg_path.write_text(yaml.safe_dump(doc))
        gw = RunningGateway(parse_config(doc))
        await gw.start()
        try:
            await wait_http_status(f"http://127.0.0.1:{port}/health", 200)

            def order_cmd(*args):
                return subprocess.run([sys.executable, "-m", "gateway.cli", "order", *args, "--config", str(cfg_path)],
                                      cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)

            r = await asyncio.to_thread(order_cmd, "set", "press-4", "L-1", "0010")
            assert r.returncode == 0, r.stderr
            await wait_until(lambda: (e := gw.gw.engines["press-4"]).context is not None and e.context.order == "L-1", 10)
            for order, op, field in (("L-2\x85", "0010", "order"), ("L-2", "0010\x9f", "operation"),
                                     ("L-2\x01", "0010", "order"), ("L-2", "00\x7f10", "operation")):
                r = await asyncio.to_thread(order_cmd, "set", "press-4", order, op)
                assert r.returncode == 1 and "refused (400)" in r.stderr, (order, op, r.stderr)
                body = json.loads(r.stderr.split(": ", 1)[1])
                assert body["error"] == "invalid order" and body["reason"] == "schema", body
                assert body["detail"].startswith(f"{field}: ") and "control character" in body["detail"], body
            req = urllib.request.Request(f"http://127.0.0.1:{port}/machines/press-4/order", method="POST",
                                         data=json.dumps({"order": "L-2\u009b", "operation": "0010"}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
            assert exc.value.code == 400 and "order: " in json.loads(exc.value.read())["detail"]
            await asyncio.sleep(0.5)  # an accepted order would be applied after its cut read (a poll away)
            assert gw.gw.engines["press-4"].context.ref == ("L-1", "0010")
            await wait_until(lambda: erp.events("operation.started"), 10)
            assert [e["data"]["order"] for e in erp.events("operation.started")] == ["L-1"]
        finally:
            await gw.stop()
