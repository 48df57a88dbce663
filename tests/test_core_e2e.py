"""The two-phase changeover cut against real simulators, a real mosquitto and the ERP consumer.

A changeover needs a fresh read of the machine's counters (the cut). The core asks the connector for it in a task of
its own and goes on; a PLC that does not answer delays only its own machine, and the changeover is held until the
first good read (parts made before it are never booked to the new order). A gateway stopped while a cut is pending
loses nothing: the retained dispatch comes back after the restart and the cut is done then.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import (
    HIERARCHY,
    Production,
    RunningGateway,
    assert_ledger_matches,
    dispatch_order,
    gateway_config,
    stream_report,
    wait_until,
    workdir,
)
from tests.faults import BlackHole


def plc_tag_orders(n: dict[str, str]) -> dict[str, object]:
    """The machine keys of an order from the PLC's tags (order, operation, completion flag) on the OPC UA simulator."""
    return {"order_source": "tag", "order_tag": {"connector": "opc", "node_id": n["order"]},
            "operation_tag": {"connector": "opc", "node_id": n["operation"]},
            "complete_tag": {"connector": "opc", "node_id": n["complete"]}}


def press_on_opcua(tmp_path, broker, opc, **machine: object):
    """press-1 on the plaintext OPC UA simulator (good and scrap counters), reporting every 0.2 s; ``machine`` adds
    keys of the machine (order source, tags)."""
    from gateway.config import parse_config
    from tests.e2e import IDENT

    n = opc.node_ids
    return parse_config({
        "gateway": IDENT, "mqtt": {"port": broker.port, "keepalive_s": 2},
        "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": opc.endpoint, "watchdog_interval_s": 0.5,
                        "security": "none"}],
        "machines": [{"id": "press-1",
                      "counters": {"good": {"connector": "opc", "node_id": n["good"], "max_rate": 500},
                                   "scrap": {"connector": "opc", "node_id": n["scrap"], "max_rate": 500}},
                      "reporting": {"interval_s": 0.2}, **machine}]}, "<test>")


def reports_of(erp: ErpConsumer, machine: str) -> int:
    return sum(1 for e in erp.events("operation.quantity_reported") if e["data"]["machine"] == machine)


async def test_slow_cut_delays_only_its_machine_and_a_stop_mid_cut_loses_nothing(tmp_path, mqtt_broker):
    m1 = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=31, counter_bits=32)
    m2 = MachineModel("Press2", cycle_time=0.01, scrap_rate=0.05, seed=32, counter_bits=16, start_good=60_000)
    async with OpcUaMachineServer(m1, host="127.0.0.1", port=free_port()) as opc, \
            ModbusMachineServer(m2, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        hole = BlackHole(mb.port)  # press-2's PLC behind a switch that can stop forwarding
        await hole.start()
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-cut")
        await erp.start()
        cfg = gateway_config(broker_port=mqtt_broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc,
                             modbus=SimpleNamespace(port=hole.port, tag_addresses=mb.tag_addresses), interval_s=0.2)
        rgw = RunningGateway(cfg)
        try:
            await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m1, "A1", "0010")
            await dispatch_order(erp, rgw, "press-2", m2, "B1", "0010")
            async with Production(m1, m2):
                m1.start()
                m2.start()
                await wait_until(lambda: m2.parts_made >= 80, 20)
                m2.pause()
                await assert_ledger_matches(erp, {"press-2": m2})
                hole.frozen = True
                await asyncio.to_thread(erp.dispatch, *HIERARCHY, "press-2", "B2", "0010")
                await wait_until(lambda: rgw.gw.status()["machines"]["press-2"]["changeover_pending"], 10)
                # press-2's cut read cannot be done; press-1 keeps reporting every 0.2 s meanwhile
                n0, t0 = reports_of(erp, "press-1"), time.monotonic()
                await wait_until(lambda: reports_of(erp, "press-1") >= n0 + 4, 2.5,
                                 message="press-1 stalled while press-2's changeover cut was pending")
                print(f"press-1: 4 reports {time.monotonic() - t0:.2f} s after press-2's cut began")
                assert rgw.gw.status()["machines"]["press-2"]["changeover_pending"]
                assert rgw.gw.engines["press-2"].context.ref == ("B1", "0010")  # held until the first good read
                await rgw.stop()  # stopped with the cut pending; press-1 goes on producing
                hole.frozen = False
                await rgw.start()
                await rgw.wait_dispatch_applied("press-2", "B2", "0010", 20)
                m2.set_order("B2", "0010")
                m2.start()
                made = m2.parts_made
                await wait_until(lambda: m2.parts_made >= made + 80, 20)
            await assert_ledger_matches(erp, {"press-1": m1, "press-2": m2})
            assert ("B2", "0010") in m2.truth and ("A1", "0010") in m1.truth
            assert stream_report(erp)["gaps"] == {}
        finally:
            await rgw.stop()
            await erp.stop()
            await hole.close()


async def test_commit_failures_raise_an_alarm_and_recover_without_loss(tmp_path, mqtt_broker):
    """A store that refuses writes (here SQLite's own read-only refusal, as after a read-only remount) is not retried
    silently with /health green: the alarm is up and the gateway unhealthy while it lasts; the staged events and
    state are kept and committed once writes work again, exactly."""
    m1 = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=41, counter_bits=32)
    async with OpcUaMachineServer(m1, host="127.0.0.1", port=free_port()) as opc:
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-ro")
        await erp.start()
        cfg = gateway_config(broker_port=mqtt_broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc,
                             interval_s=0.2)
        rgw = RunningGateway(cfg)
        try:
            gw = await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m1, "A1", "0010")
            async with Production(m1):
                m1.start()
                await wait_until(lambda: reports_of(erp, "press-1") >= 2, 15)
                failed0 = metric_sum("edge_gateway_store_commit_failures_total")
                await gw.store.db.execute("PRAGMA query_only=1")  # every write now fails with SQLITE_READONLY
                await wait_until(lambda: "store_commit_failing" in gw.status()["alarms"], 10)
                assert gw.status()["healthy"] is False
                failures = gw.stats.commit_failures
                held = len(gw.core.uncommitted)
                await wait_until(lambda: gw.stats.commit_failures >= failures + 2, 10)  # retried, with a pause
                # reports every 0.2 s are held meanwhile (red before: a row each, growing without bound)
                assert len(gw.core.uncommitted) <= held + 1, (held, len(gw.core.uncommitted))
                assert metric_sum("edge_gateway_store_commit_failures_total") - failed0 == gw.stats.commit_failures
                await gw.store.db.execute("PRAGMA query_only=0")
                await wait_until(lambda: "store_commit_failing" not in gw.status()["alarms"], 10)
                made = m1.parts_made
                await wait_until(lambda: m1.parts_made >= made + 50, 20)
            await assert_ledger_matches(erp, {"press-1": m1})
            assert stream_report(erp)["gaps"] == {}
        finally:
            await rgw.stop()
            await erp.stop()


async def test_plc_clock_steps_of_an_hour_neither_lose_nor_invent_units(tmp_path, mqtt_broker):
    """The PLC's clock (OPC UA source timestamps) steps back one hour mid-run (NTP correction; local time at the
    DST change), later forward again. Plausibility and windows run on the gateway's monotonic clock: every unit is
    booked once, no sample is dropped as stale, nothing is held as an implausible jump."""
    m1 = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=51, counter_bits=32)
    async with OpcUaMachineServer(m1, host="127.0.0.1", port=free_port()) as opc:
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-clock")
        await erp.start()
        cfg = gateway_config(broker_port=mqtt_broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc,
                             interval_s=0.2, max_rate=200)
        rgw = RunningGateway(cfg)
        try:
            await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m1, "A1", "0010")
            async with Production(m1):
                m1.start()
                for offset in (-3600.0, 3600.0):
                    made = m1.parts_made
                    await wait_until(lambda: m1.parts_made >= made + 60, 20)
                    opc.clock_offset_s = offset  # and it stays there: time does not "catch up" within the test
                    made = m1.parts_made
                    await wait_until(lambda: m1.parts_made >= made + 60, 20)
                    m1.pause()
                    await assert_ledger_matches(erp, {"press-1": m1}, timeout=10)
                    m1.start()
            await assert_ledger_matches(erp, {"press-1": m1})
            assert erp.events("counter.anomaly") == []
        finally:
            await rgw.stop()
            await erp.stop()


async def test_plc_tag_changeovers_while_running_are_exact(tmp_path, mqtt_broker):
    """order_source: tag over OPC UA with the machine running (no pause at the changeover): the PLC completes the
    operation and shows the next order between two parts, every ~0.25 s, while parts come every 10 ms. Every unit
    is booked to the order it was made for, each completion carries its order's exact totals."""
    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=61, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        n = opc.node_ids
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-tags")
        await erp.start()
        cfg = press_on_opcua(tmp_path, mqtt_broker, opc, **plc_tag_orders(n))
        rgw = RunningGateway(cfg)
        try:
            await rgw.start()
            m.set_order("700000", "0010")
            await rgw.wait_dispatch_applied("press-1", "700000", "0010")
            orders = [f"7000{i:02d}" for i in range(1, 9)]
            async with Production(m):
                m.start()
                for order in orders:
                    made = m.parts_made
                    await m.wait_parts(made + 25, timeout=10)
                    m.complete_operation()  # between two parts: final for the running order ...
                    m.set_order(order, "0010")  # ... then the next order, while the machine keeps running
                await m.wait_parts(m.parts_made + 25, timeout=10)
                m.pause()
            await assert_ledger_matches(erp, {"press-1": m})
            completed = {e["data"]["order"]: e["data"]["totals"] for e in erp.events("operation.completed")}
            for order in ["700000", *orders[:-1]]:
                truth = m.truth[(order, "0010")]
                assert (completed[order]["yield"], completed[order]["scrap"]) == (str(truth["good"]),
                                                                                  str(truth["scrap"])), order
            assert stream_report(erp)["gaps"] == {}
        finally:
            await rgw.stop()
            await erp.stop()


async def test_plc_tag_changeover_is_exact_when_the_servers_publish_comes_late(tmp_path, mqtt_broker):
    """The changeover of the test above, with the server's publish late around it (a loaded server or gateway: the
    client's next Publish request not there yet): the machine makes parts before and after the changeover, more than a
    publishing interval's worth (100 ms, a part every 10 ms), and the server sends them all in one late publish. The
    counter value of the last part before the order change is the cut, so the server must not discard it: every unit
    made for 700000 is booked to 700000 (with the counters' queue at 10 values and discard-oldest, the parts made
    before the change were booked to 700001)."""
    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=62, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        n = opc.node_ids
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-late")
        await erp.start()
        cfg = press_on_opcua(tmp_path, mqtt_broker, opc, **plc_tag_orders(n))
        rgw = RunningGateway(cfg)
        try:
            await rgw.start()
            m.set_order("700000", "0010")
            await rgw.wait_dispatch_applied("press-1", "700000", "0010")
            async with Production(m):
                m.start()
                await m.wait_parts(25, timeout=10)
                async with opc.publishing_held():
                    await m.wait_parts(m.parts_made + 8, timeout=10)
                    m.complete_operation()
                    m.set_order("700001", "0010")
                    await m.wait_parts(m.parts_made + 30, timeout=10)  # three publishing intervals' worth
                    await opc.flush()  # all of it is in the server's queues before the publish
                await m.wait_parts(m.parts_made + 25, timeout=10)
                m.pause()
            before = m.truth[("700000", "0010")]
            assert before["good"] + before["scrap"] >= 33  # the changeover came after the hold began
            await assert_ledger_matches(erp, {"press-1": m})
            completed = {e["data"]["order"]: e["data"]["totals"] for e in erp.events("operation.completed")}
            assert (completed["700000"]["yield"], completed["700000"]["scrap"]) == (str(before["good"]),
                                                                                    str(before["scrap"]))
            assert stream_report(erp)["gaps"] == {}
        finally:
            await rgw.stop()
            await erp.stop()


async def test_completed_operation_is_not_reopened_by_the_retained_dispatch(tmp_path, mqtt_broker):
    """The PLC's completion flag finishes the operation the ERP dispatched (retained, 'active'). After a restart the
    broker delivers that retained dispatch again: the operation stays completed (the dispatch is refused and counted),
    and parts made afterwards are unassigned, not booked to a finally confirmed operation."""
    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.05, seed=71, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        n = opc.node_ids
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-reopen")
        await erp.start()
        cfg = press_on_opcua(tmp_path, mqtt_broker, opc, complete_tag={"connector": "opc", "node_id": n["complete"]})
        rgw = RunningGateway(cfg)
        answers = Answers(mqtt_broker.port, rejected_topic(cfg, "press-1"))
        try:
            await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m, "900100", "0010")
            await m.produce(40, timeout=20)
            m.complete_operation()
            await wait_until(lambda: erp.events("operation.completed"), 15)
            m.clear_order()  # the machine makes parts for no order now
            await rgw.stop()
            gw = await rgw.start()  # the retained 'active' dispatch of 900100 arrives again
            await wait_until(lambda: gw.stats.dispatch_rejected_by_reason["completed"] >= 1, 15)
            assert gw.engines["press-1"].context is None
            # the ERP is told why its retained dispatch is not in force
            await wait_until(lambda: answers.get(), 10)
            assert answers.get()[-1]["reason"] == "completed"
            assert answers.get()[-1]["received"] == {"order": "900100", "operation": "0010", "status": "active"}
            await m.produce(30, timeout=20)
            await assert_ledger_matches(erp, {"press-1": m})
            assert len(erp.events("operation.completed")) == 1
            assert not [e for e in erp.events("operation.started") if e["time"] > erp.events("operation.completed")[0]["time"]]
        finally:
            answers.close()
            await rgw.stop()
            await erp.stop()


def rejected_topic(cfg, machine: str) -> str:
    from gateway.events import Topics

    return Topics(cfg.mqtt.topic_root, cfg.gateway).dispatch(machine) + "/rejected"


def metric_sum(name: str, **labels: str) -> float:
    """The process-wide Prometheus registry (the counters of rare events, gateway/metrics.py): the sum of the
    samples of ``name`` whose labels include ``labels``."""
    from prometheus_client import REGISTRY

    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


class Answers:
    """The ERP's side of the dispatch answers: a subscriber on ``.../{machine}/dispatch/rejected``."""

    def __init__(self, port: int, topic: str) -> None:
        import json
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._got: list[dict] = []
        subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"erp-answers-{port}")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = lambda c, u, m: self._got.append(json.loads(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert subscribed.wait(10), "answer subscription not acknowledged"

    def get(self) -> list[dict]:
        return list(self._got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def test_a_rejected_dispatch_is_answered_with_the_reason(tmp_path, mqtt_broker):
    """A dispatch the gateway cannot take is not only counted and logged: the ERP reads why on
    ``.../{machine}/dispatch/rejected`` (an out-of-range quantity, a machine on another order source, JSON that is
    not a dispatch), and the gateway keeps running."""
    m = MachineModel("Press1", cycle_time=0.05, seed=5, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-answers")
        await erp.start()
        cfg = press_on_opcua(tmp_path, mqtt_broker, opc)
        rgw = RunningGateway(cfg)
        answers = Answers(mqtt_broker.port, rejected_topic(cfg, "+"))
        try:
            gw = await rgw.start()
            # the gateway's dispatch subscription is acknowledged (SUBACKs handled) before the ERP publishes
            await rgw.wait_subscribed()
            schema0 = metric_sum("edge_gateway_dispatch_rejected_total", reason="schema")
            unknown0 = metric_sum("edge_gateway_dispatch_rejected_total", reason="unknown_machine")
            topic = rejected_topic(cfg, "press-1")[:-len("/rejected")]
            erp.publish_raw(topic, b'{"order":"1","operation":"1","planned_quantity":"1e100"}')
            erp.publish_raw(topic, b"[1, 2, 3]")
            erp.publish_raw(rejected_topic(cfg, "press-9")[:-len("/rejected")], b'{"order":"1","operation":"1"}')
            await wait_until(lambda: len(answers.get()) == 3, 10)
            got = sorted(answers.get(), key=lambda a: (a["topic"], a["received"].get("size", 0)))

            assert [(a["topic"], a["reason"], a["received"]) for a in got] == [
                (topic, "schema", {"order": "1", "operation": "1"}),
                (topic, "schema", {"size": 9}),
                (topic.replace("press-1", "press-9"), "unknown_machine", {"order": "1", "operation": "1"})]
            assert "planned_quantity" in got[0]["detail"]
            assert gw.stats.dispatch_rejected == 3
            assert metric_sum("edge_gateway_dispatch_rejected_total", reason="schema") - schema0 == 2
            assert metric_sum("edge_gateway_dispatch_rejected_total", reason="unknown_machine") - unknown0 == 1
            # still running: a valid dispatch is applied
            await dispatch_order(erp, rgw, "press-1", m, "900200", "0010")
        finally:
            answers.close()
            await rgw.stop()
            await erp.stop()


async def test_a_dispatch_with_a_control_character_in_its_order_number_is_refused(tmp_path, mqtt_broker):
    """An ERP order or operation number never holds a control character (C0, DEL or C1): a dispatch with one is
    refused (reason schema, the detail names the field), counted, logged and answered on .../dispatch/rejected; the
    machine keeps its order, even when the bad dispatch is the retained one, and the gateway keeps running. Red
    before for the C1 range (U+0080-U+009F), which the dispatch took and published."""
    import json

    import structlog

    m = MachineModel("Press1", cycle_time=0.05, seed=5, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-ctl")
        await erp.start()
        cfg = press_on_opcua(tmp_path, mqtt_broker, opc)
        rgw = RunningGateway(cfg)
        answers = Answers(mqtt_broker.port, rejected_topic(cfg, "press-1"))
        try:
            gw = await rgw.start()
            await rgw.wait_subscribed()
            await dispatch_order(erp, rgw, "press-1", m, "900100", "0010")
            schema0 = metric_sum("edge_gateway_dispatch_rejected_total", reason="schema")
            rejected0 = gw.stats.dispatch_rejected
            topic = rejected_topic(cfg, "press-1")[:-len("/rejected")]
            bad = [("900200\x85", "0010", "order"), ("900200", "0010\x9f", "operation"),
                   ("9002\u009b00", "0010", "order"), ("900200\x01", "0010", "order"),
                   ("900200", "0010\x7f", "operation")]
            with structlog.testing.capture_logs() as logs:
                for order, op, _ in bad:  # retained, as the ERP publishes: the last one stays at the broker
                    await asyncio.to_thread(erp.publish_raw, topic, json.dumps({"order": order, "operation": op}),
                                            True)
                await wait_until(lambda: len(answers.get()) == len(bad), 10)
            got = answers.get()
            assert [(a["reason"], a["received"]) for a in got] == \
                [("schema", {"order": order, "operation": op}) for order, op, _ in bad]
            for a, (_, _, field) in zip(got, bad):
                assert a["detail"].startswith(f"{field}: ") and "control character" in a["detail"], a["detail"]
            assert gw.stats.dispatch_rejected - rejected0 == len(bad)
            assert metric_sum("edge_gateway_dispatch_rejected_total", reason="schema") - schema0 == len(bad)
            logged = [e for e in logs if e["event"] == "dispatch.rejected"]
            assert [e["detail"].split(":")[0] for e in logged] == [field for _, _, field in bad]
            assert gw.engines["press-1"].context.ref == ("900100", "0010")  # still the last good order
            assert not [e for e in erp.events("operation.started") if e["data"]["order"] != "900100"]
            assert rgw.task is not None and not rgw.task.done()
            await dispatch_order(erp, rgw, "press-1", m, "900300", "0010")  # a good dispatch is applied after them
        finally:
            answers.close()
            await rgw.stop()
            await erp.stop()


async def test_acks_from_outside_this_gateway_are_refused(tmp_path, mqtt_broker):
    """Anyone who can publish on an acks topic must not fill the quarantine: a rejection of an event that is not
    this gateway's (other source), not from this store (other epoch), with a topic-breaking subject, or malformed is
    refused and counted; a genuine rejection of one of its events is quarantined."""
    import json

    m1 = MachineModel("Press1", cycle_time=0.01, seed=81, counter_bits=32)
    async with OpcUaMachineServer(m1, host="127.0.0.1", port=free_port()) as opc:
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-acks")
        await erp.start()
        cfg = gateway_config(broker_port=mqtt_broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc,
                             interval_s=0.2)
        rgw = RunningGateway(cfg)
        try:
            gw = await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m1, "A1", "0010")
            await m1.produce(20, timeout=20)
            await wait_until(lambda: erp.events("operation.quantity_reported"), 15)
            genuine = erp.events("operation.quantity_reported")[0]
            topic = gw.topics.acks("press-1")

            def rejection(**changes):
                return json.dumps({"status": "rejected", "reason": "locked", "event": {**genuine, **changes}})

            refused0 = metric_sum("edge_gateway_erp_acks_rejected_total")
            forged = [rejection(source="/acme/p1/a1/l1/other-gw"), rejection(epoch="0" * 32),
                      rejection(subject="press-1/#"), b"{not json", json.dumps({"status": "rejected"})]
            for payload in forged:
                await asyncio.to_thread(erp.publish_raw, topic, payload)
            await wait_until(lambda: gw.stats.acks_malformed == len(forged), 10)
            assert metric_sum("edge_gateway_erp_acks_rejected_total") - refused0 == len(forged)
            assert dict(gw.stats.acks_rejected_by_reason) == {"foreign_source": 1, "foreign_epoch": 1, "schema": 2,
                                                               "invalid_json": 1}
            assert gw.store.quarantined == 0 and gw.stats.erp_rejections == 0
            await asyncio.to_thread(erp.publish_raw, topic, rejection())
            await wait_until(lambda: gw.stats.erp_rejections == 1 and gw.store.quarantined == 1, 10)
            assert rgw.task is not None and not rgw.task.done()
        finally:
            await rgw.stop()
            await erp.stop()


async def test_a_refused_subscription_is_an_alarm(tmp_path):
    """A broker ACL that denies the dispatch subscription would leave every count unassigned with health green:
    it is a critical alarm, the gateway is unhealthy, and the alarm clears once the subscription is granted."""
    import json
    from pathlib import Path

    from gateway.config import parse_config
    from tests.broker import MosquittoBroker
    from tests.e2e import IDENT
    from tests.test_publisher_sessions import DYNSEC

    assert Path(DYNSEC).exists(), f"mosquitto dynamic security plugin not found at {DYNSEC}"
    cfg = parse_config({"gateway": IDENT, "mqtt": {"port": 1, "keepalive_s": 2},
                        "store": {"path": workdir(tmp_path, "gw") + "/gw.db"}, "connectors": [], "machines": []},
                       "<test>")
    from gateway.events import Topics

    dispatch_filter = Topics(cfg.mqtt.topic_root, cfg.gateway).dispatch_filter()
    dyn = tmp_path / "dynsec.json"
    dyn.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                             "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anon", "roles": [{"rolename": "r"}]}], "anonymousGroup": "anon",
        "roles": [{"rolename": "r", "acls": [{"acltype": "subscribePattern", "topic": dispatch_filter,
                                              "allow": False, "priority": 0}]}]}))
    broker = MosquittoBroker(tmp_path / "b", extra_config=f"plugin {DYNSEC}\nplugin_opt_config_file {dyn}\n").start()
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"port": broker.port})})
    rgw = RunningGateway(cfg)
    try:
        gw = await rgw.start()
        alarm = f"subscription_refused:{dispatch_filter}"
        await wait_until(lambda: alarm in gw.status()["alarms"], 15)
        st = gw.status()
        assert st["healthy"] is False
        detail = next(a for a in st["alarm_details"] if a["id"] == alarm)
        assert detail["severity"] == "critical" and detail["evidence"]["reason"] == "Not authorized"
        assert not any(a.startswith("subscription_refused:") and a != alarm for a in st["alarms"])
        await broker.astop()  # the ACL is fixed; the broker comes back and grants the subscription
        doc = json.loads(dyn.read_text())
        doc["roles"][0]["acls"][0]["allow"] = True
        dyn.write_text(json.dumps(doc))
        await broker.astart()
        await wait_until(lambda: alarm not in gw.status()["alarms"], 15)
    finally:
        await rgw.stop()
        broker.close()


async def test_delta_counter_through_opcua_with_changeovers_and_resubscriptions(tmp_path, mqtt_broker):
    """A ``mode: delta`` counter over a real OPC UA subscription (the simulator's GoodDelta node: the good parts since
    its previous write, repeated values with new source timestamps). The changeover cut reads the node again and a
    re-subscription after a lost connection delivers its current value again: neither is a new count. Yield ==
    truth per order."""
    from gateway.config import parse_config
    from tests.e2e import IDENT

    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.1, seed=91, counter_bits=32)
    async with OpcUaMachineServer(m, host="127.0.0.1", port=free_port()) as opc:
        hole = BlackHole(opc.port)
        await hole.start()
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-delta")
        await erp.start()
        n = opc.node_ids
        cfg = parse_config({
            "gateway": IDENT, "mqtt": {"port": mqtt_broker.port, "keepalive_s": 2},
            "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
            "connectors": [{"type": "opcua", "id": "opc", "endpoint": f"opc.tcp://127.0.0.1:{hole.port}",
                            "watchdog_interval_s": 0.5, "timeout_s": 1, "security": "none"}],
            "machines": [{"id": "press-1",
                          "counters": {"good": {"connector": "opc", "node_id": opc.delta_node_id, "mode": "delta",
                                                "max_rate": 500},
                                       "scrap": {"connector": "opc", "node_id": n["scrap"], "max_rate": 500}},
                          "reporting": {"interval_s": 0.2}}]}, "<test>")
        rgw = RunningGateway(cfg)
        try:
            gw = await rgw.start()
            connected = lambda: gw.status()["components"]["connector.opc"]["state"] == "connected"
            await wait_until(connected, 15)
            for i, order in enumerate(("D1", "D2", "D3")):
                await dispatch_order(erp, rgw, "press-1", m, order, "0010")  # the cut re-reads GoodDelta
                await m.produce(60, timeout=20)
                # every delta notification has arrived (a delta value still queued in the server when the changeover
                # is applied or the session is lost is booked to the next order or lost: OPC UA gives a delta node
                # no history; that is what cumulative counters are for)
                await assert_ledger_matches(erp, {"press-1": m})
                if i == 1:  # a lost connection: the new subscription delivers GoodDelta's current value again
                    assert not [a for a in gw.status()["alarms"] if a.startswith("delta_gap:")]
                    hole.frozen = True
                    await wait_until(lambda: not connected(), 10)
                    hole.frozen = False
                    await wait_until(connected, 15)
                    # what the node took while the connection was down is lost with the old subscription: said so,
                    # for the delta counter only (the cumulative scrap counter's next value carries its parts)
                    alarms = [a for a in gw.status()["alarms"] if a.startswith("delta_gap:")]
                    assert alarms == ["delta_gap:press-1/good"], gw.status()["alarms"]
            await assert_ledger_matches(erp, {"press-1": m})
            assert erp.events("counter.anomaly") == []
        finally:
            await rgw.stop()
            await erp.stop()
            await hole.close()
