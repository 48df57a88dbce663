"""Health endpoints and alarms against real parts: a mosquitto, the Modbus machine simulator, the ERP consumer, a
SQLite store, the gateway's HTTP API on a free loopback port.

- A PLC outage makes the gateway degraded (HTTP 200), not failed: ``connector_down:<id>`` is raised and cleared, the
  machine reports ``unreachable`` and, once back, its state from the tag; the retained status topic lists the alarm.
- A broker outage: still ready (buffering is the point); ``broker_unreachable`` and ``oldest_unsent_event`` raised and
  cleared; the store at its cap is not ready (503) and ``store_full`` is raised and cleared.
- ERP side: ``quarantine_not_empty``, ``completion_unacked:<machine>`` (an accepted ack clears it) and
  ``counter_anomaly:<machine>`` raised and cleared.
- Failing commits: not ready (503) while they fail.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import parse_config
from gateway.schema import status_schema
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import (
    HIERARCHY,
    IDENT,
    RunningGateway,
    assert_events_valid,
    dispatch_order,
    wait_until,
    workdir,
)
from tests.faults import restart

FAST_ALARMS = {"broker_unreachable_s": 1, "connector_down_s": 1, "machine_unreachable_s": 1, "oldest_unsent_s": 1,
               "completion_unacked_s": 1, "anomaly_hold_s": 2}


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Probe:
    """The gateway's HTTP API, polled from a thread (the gateway runs on the test's event loop)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return await asyncio.to_thread(http_get, self.base + path)

    async def wait(self, path: str, pred: Any, timeout: float = 15) -> dict[str, Any]:
        last: list[Any] = [None]

        async def poll() -> bool:
            last[0] = await self.get(path)
            return pred(*last[0])

        deadline = asyncio.get_running_loop().time() + timeout
        while not await poll():
            assert asyncio.get_running_loop().time() < deadline, f"GET {path}: condition not met; last: {last[0]}"
            await asyncio.sleep(0.1)
        return last[0][1]


class StatusWatcher:
    """Subscribes to the gateway's retained status topic; ``alarms()`` are the ids in the last message."""

    def __init__(self, port: int, topic: str) -> None:
        self.last: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="status-watcher")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.last = json.loads(msg.payload)

    def alarms(self) -> list[str]:
        with self._lock:
            return [a["id"] for a in (self.last or {}).get("alarms", [])]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def modbus_doc(tmp_path, broker_port: int, mb: Any, http_port: int, **extra: Any) -> dict[str, Any]:
    tags = mb.tag_addresses()
    return {
        "gateway": IDENT, "mqtt": {"port": broker_port, "keepalive_s": 2},
        "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
        "http": {"enabled": True, "port": http_port},
        "alarms": FAST_ALARMS,
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05,
                        "timeout_s": 0.5}],
        "machines": [{"id": "press-2", "counters": {
            "good": {"connector": "mb", **tags["good"], "max_rate": 500},
            "scrap": {"connector": "mb", **tags["scrap"], "max_rate": 500}},
            "state": {"connector": "mb", **tags["state"], "values": {"0": "idle", "1": "running", "2": "stopped"}},
            "reporting": {"interval_s": 0.2}}],
        **extra,
    }


@pytest.fixture
async def erp(tmp_path, mqtt_broker):
    c = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-health")
    await c.start()
    yield c
    await c.stop()


def states(erp: ErpConsumer) -> list[tuple[str | None, str, str]]:
    return [(e["data"]["previous"], e["data"]["state"], e["data"]["reason"])
            for e in erp.events("machine.state_changed")]


async def test_plc_outage_is_degraded_with_an_alarm_and_the_machine_unreachable(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press2", cycle_time=0.01, seed=11, counter_bits=32)
    mb = ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1)
    await mb.start()
    port = free_port()
    rgw = RunningGateway(parse_config(modbus_doc(tmp_path, mqtt_broker.port, mb, port)))
    watcher = None
    try:
        gw = await rgw.start()
        watcher = StatusWatcher(mqtt_broker.port, gw.topics.status())
        probe = Probe(port)
        body = await probe.wait("/health", lambda code, b: code == 200 and b["status"] == "ok")
        assert body["components"]["connector.mb"]["state"] == "connected" and body["live"] and body["ready"]
        assert (await probe.get("/livez"))[0] == 200 and (await probe.get("/readyz"))[0] == 200
        await wait_until(lambda: states(erp), 10)
        first = states(erp)[-1][1]  # the state read from the machine's tag

        await mb.stop()  # the PLC goes away
        await wait_until(lambda: "connector_down:mb" in gw.alarms, 10)
        body = await probe.wait("/health", lambda code, b: code == 200 and b["status"] == "degraded")
        assert body["ready"] and body["components"]["connector.mb"]["state"] != "connected"
        assert "connector_down:mb" in body["alarms"]
        assert (await probe.get("/readyz"))[0] == 200  # it still takes and buffers events
        detail = next(a for a in gw.status()["alarm_details"] if a["id"] == "connector_down:mb")
        assert detail["severity"] == "critical" and detail["evidence"]["machines"] == ["press-2"]
        await wait_until(lambda: states(erp)[-1:] == [(first, "unreachable", "connection")], 10)
        await wait_until(lambda: "connector_down:mb" in watcher.alarms(), 10)
        jsonschema.validate(watcher.last, status_schema())  # the retained status with alarms, as documented

        await restart(mb)  # back: the state is read from the machine again
        await wait_until(lambda: "connector_down:mb" not in gw.alarms, 10)
        await wait_until(lambda: states(erp)[-1:] == [("unreachable", first, "tag")], 10)
        assert_events_valid(erp)  # 'unreachable' (raw null, reason connection) against the generated JSON Schema
        await probe.wait("/health", lambda code, b: code == 200 and b["status"] == "ok")
        await wait_until(lambda: watcher.last is not None and watcher.alarms() == [], 10)
    finally:
        if watcher is not None:
            watcher.close()
        await rgw.stop()
        await mb.stop()


async def test_broker_outage_stays_ready_until_the_store_is_full(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press2", cycle_time=0.01, seed=12, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        port = free_port()
        doc = modbus_doc(tmp_path, mqtt_broker.port, mb, port)
        doc["store"]["max_size_mb"] = 0.01  # ~10 KB: a dozen events
        rgw = RunningGateway(parse_config(doc))
        try:
            gw = await rgw.start()
            probe = Probe(port)
            await dispatch_order(erp, rgw, "press-2", model, "B-1", "0010")
            await model.produce(10, timeout=20)
            await wait_until(lambda: gw.store.pending == 0 and erp.events("operation.quantity_reported"), 10)
            await mqtt_broker.astop()
            await model.produce(10, timeout=20)  # a report or two wait in the store
            await wait_until(lambda: {"broker_unreachable", "oldest_unsent_event"} <= set(gw.alarms.ids()), 10)
            assert not gw.store.full
            body = await probe.wait("/health", lambda code, b: code == 200 and b["status"] == "degraded")
            assert body["ready"] and body["oldest_unsent_age_s"] >= 1 and body["components"]["mqtt"]["state"] != "connected"
            assert (await probe.get("/readyz"))[0] == 200  # readiness does not depend on the broker

            while not gw.store.full:  # until the store reaches its cap
                await model.produce(20, timeout=20)
            await wait_until(lambda: "store_full" in gw.alarms, 10)
            code, body = await probe.get("/readyz")
            assert code == 503 and body["reasons"] == ["store full"]
            code, body = await probe.get("/health")
            assert code == 503 and body["status"] == "failed" and body["components"]["store"]["state"] == "full"
            assert (await probe.get("/livez"))[0] == 200  # full, not dead

            await mqtt_broker.astart()
            await wait_until(lambda: not ({"broker_unreachable", "oldest_unsent_event", "store_full"}
                                          & set(gw.alarms.ids())), 20)
            await probe.wait("/health", lambda code, b: code == 200 and b["status"] == "ok")
            assert (await probe.get("/readyz"))[0] == 200
        finally:
            await rgw.stop()


async def test_erp_side_alarms_quarantine_unacknowledged_completion_and_anomaly(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press2", cycle_time=0.01, seed=13, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        port = free_port()
        rgw = RunningGateway(parse_config(modbus_doc(tmp_path, mqtt_broker.port, mb, port)))
        try:
            gw = await rgw.start()
            await dispatch_order(erp, rgw, "press-2", model, "C-1", "0010")
            await model.produce(10, timeout=20)
            await wait_until(lambda: erp.events("operation.quantity_reported"), 10)
            acks = gw.topics.acks("press-2")

            # the ERP rejects an event: quarantined, alarm; purged: cleared
            report = erp.events("operation.quantity_reported")[0]
            rejection = json.dumps({"status": "rejected", "reason": "order locked", "event": report})
            await asyncio.to_thread(erp.publish_raw, acks, rejection)
            await wait_until(lambda: "quarantine_not_empty" in gw.alarms, 10)
            body = await Probe(port).wait("/health", lambda code, b: code == 200 and b["status"] == "degraded")
            # every component connected: the alarms degrade it (erp_rejected: the runtime's, raised with the rejection)
            assert body["alarms"] == ["erp_rejected", "quarantine_not_empty"]
            # an alarm never makes the gateway not live or not ready (a liveness probe must not restart it for one)
            assert (await Probe(port).get("/livez"))[0] == 200 and (await Probe(port).get("/readyz"))[0] == 200
            assert next(a for a in gw.alarms.active() if a.id == "quarantine_not_empty").evidence["quarantined"] == 1
            await gw.store.purge("quarantine")
            await wait_until(lambda: not {"quarantine_not_empty", "erp_rejected"} & set(gw.alarms.ids()), 10)

            # completed on the machine, not acknowledged by the ERP: alarm; the ERP's accepted ack clears it
            await asyncio.to_thread(erp.dispatch, *HIERARCHY, "press-2", "C-1", "0010", status="completed")
            await wait_until(lambda: erp.events("operation.completed"), 10)
            completed = erp.events("operation.completed")[0]
            await wait_until(lambda: "completion_unacked:press-2" in gw.alarms, 10)
            ev = next(a for a in gw.alarms.active() if a.id == "completion_unacked:press-2").evidence
            assert ev["oldest"][0]["event_id"] == completed["id"] and ev["oldest"][0]["order"] == "C-1"
            await asyncio.to_thread(erp.publish_raw, acks, json.dumps({"status": "accepted", "id": completed["id"]}))
            await wait_until(lambda: "completion_unacked:press-2" not in gw.alarms, 10)

            # an implausible counter jump: a quantity held, alarm; cleared after anomaly_hold_s
            model.set_counters(good=model.good_raw + 1_000_000)
            await wait_until(lambda: "counter_anomaly:press-2" in gw.alarms, 10)
            ev = next(a for a in gw.alarms.active() if a.id == "counter_anomaly:press-2").evidence
            assert ev["kind"] == "implausible_jump" and ev["held"] == "1000000" and ev["counter"] == "good"
            await wait_until(lambda: "counter_anomaly:press-2" not in gw.alarms, 10)
            assert "counter_anomaly:press-2" not in gw.alarms.ids()
        finally:
            await rgw.stop()


async def test_failing_commits_make_the_gateway_not_ready(tmp_path, mqtt_broker, erp):
    model = MachineModel("Press2", cycle_time=0.01, seed=14, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        port = free_port()
        rgw = RunningGateway(parse_config(modbus_doc(tmp_path, mqtt_broker.port, mb, port)))
        try:
            gw = await rgw.start()
            probe = Probe(port)
            await dispatch_order(erp, rgw, "press-2", model, "D-1", "0010")
            await probe.wait("/readyz", lambda code, b: code == 200)
            await gw.store.db.execute("PRAGMA query_only=1")  # every write now fails (a read-only remount)
            await model.produce(10, timeout=20)
            body = await probe.wait("/readyz", lambda code, b: code == 503)
            assert body["reasons"][0].startswith("store commits failing")
            assert (await probe.get("/health"))[1]["status"] == "failed"
            assert (await probe.get("/livez"))[0] == 200
            await gw.store.db.execute("PRAGMA query_only=0")
            await probe.wait("/readyz", lambda code, b: code == 200)
        finally:
            await rgw.stop()


async def test_a_stalled_core_is_not_live(tmp_path, mqtt_broker, monkeypatch):
    """An idle core loop still runs a round a second (live); when it stops running rounds (here it hangs in its
    health evaluation) /livez and /readyz turn 503, /health failed; once it runs again it is live."""
    import gateway.health

    monkeypatch.setattr(gateway.health, "CORE_STALL_S", 1.5)
    port = free_port()
    rgw = RunningGateway(parse_config({"gateway": IDENT, "mqtt": {"port": mqtt_broker.port},
                                       "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
                                       "http": {"enabled": True, "port": port}}))
    try:
        gw = await rgw.start()
        probe = Probe(port)
        await probe.wait("/livez", lambda code, b: code == 200)
        # idle (no machine, nothing to commit) it still runs a round a second: live after more than CORE_STALL_S
        hb = gw.core_heartbeat
        await wait_until(lambda: gw.core_heartbeat > hb + 1.6, 5)
        assert (await probe.get("/livez"))[0] == 200
        release = asyncio.Event()
        evaluate = gw.health.evaluate

        async def stuck():
            await release.wait()
            return await evaluate()

        gw.health.evaluate = stuck  # the core's next round hangs here
        body = await probe.wait("/livez", lambda code, b: code == 503)
        assert body["live"] is False and body["core_heartbeat_age_s"] >= 1.5
        assert (await probe.get("/readyz"))[0] == 503
        assert (await probe.get("/health"))[1]["status"] == "failed"
        release.set()
        await probe.wait("/livez", lambda code, b: code == 200)
    finally:
        await rgw.stop()


def test_a_machine_without_state_tag_reports_unreachable_then_reachable():
    """Pure engine: unreachable once per outage (not droppable, persisted at once); back: 'reachable' for a machine
    without a state tag; with a state tag the tag's next sample reports the state (a change from 'unreachable')."""
    from mappings.counters import CounterSpec
    from mappings.machine import CounterBinding, MachineEngine, MachineSpec
    from mappings.samples import Sample

    counters = {"good": CounterBinding(CounterSpec(name="good", mode="cumulative", modulus=2**32, signed=False,
                                                   max_rate=100), 1)}
    eng = MachineEngine(MachineSpec(id="m1", counters=counters), None)
    (ev,) = eng.set_reachable(False, 1000.0)
    assert (ev.type, ev.time, ev.droppable) == ("machine.state_changed", 1000.0, False)
    assert (ev.data.state, ev.data.previous, ev.data.raw, ev.data.reason) == ("unreachable", None, None, "connection")
    assert eng.dirty and eng.urgent
    assert eng.set_reachable(False, 1001.0) == []  # once per outage
    (ev,) = eng.set_reachable(True, 1002.0)
    assert (ev.data.state, ev.data.previous) == ("reachable", "unreachable")
    assert eng.set_reachable(True, 1003.0) == []

    tagged = MachineEngine(MachineSpec(id="m2", counters=counters, state_values={"1": "running"}), None)
    tagged.set_reachable(False, 1000.0)
    assert tagged.set_reachable(True, 1001.0) == []  # the tag tells
    (ev,) = tagged.apply(Sample("m2/state", 1, True, 1002.0), "state")
    assert (ev.data.state, ev.data.previous, ev.data.reason) == ("running", "unreachable", "tag")
    snap = tagged.snapshot()
    assert MachineEngine(tagged.spec, snap).machine_state == "running"


async def test_a_machine_unreachable_at_a_restart_is_reported_reachable_when_back(tmp_path, mqtt_broker, erp):
    """A machine without a state tag: 'unreachable' during the outage; the gateway is restarted before the PLC is
    back; once it is, the machine reports 'reachable' (the state was persisted with the event)."""
    model = MachineModel("Press2", cycle_time=0.01, seed=15, counter_bits=32)
    mb = ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1)
    await mb.start()
    doc = modbus_doc(tmp_path, mqtt_broker.port, mb, free_port())
    del doc["machines"][0]["state"]
    rgw = RunningGateway(parse_config(doc))
    try:
        gw = await rgw.start()
        await wait_until(lambda: gw.connectors["mb"].status.state.value == "connected", 10)
        await mb.stop()
        await wait_until(lambda: states(erp) == [(None, "unreachable", "connection")], 10)
        await rgw.stop()
        await restart(mb)
        gw = await rgw.start()
        await wait_until(lambda: states(erp)[-1:] == [("unreachable", "reachable", "connection")], 10)
        assert len(states(erp)) == 2
        assert_events_valid(erp)
    finally:
        await rgw.stop()
        await mb.stop()
