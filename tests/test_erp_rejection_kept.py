"""An ERP rejection (on .../acks) is the only copy of the rejected event the gateway has: its outbox row went at the
PUBACK and the ERP does not send the rejection again. It is kept until its quarantine row is committed: retried while
the store refuses writes (a short full-disk spell), written at a stop that comes first. Real gateway, Modbus
simulator, mosquitto; the ERP's rejection is published as the ERP service would."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.store import Store
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import RunningGateway, gateway_config, wait_until, workdir


class Erp:
    """Subscribes to the gateway's events; publishes on its acks topic."""

    def __init__(self, port: int, topic: str) -> None:
        self.events: list[dict] = []
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="erp-test", protocol=paho.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _msg(self, c, u, m) -> None:
        d = json.loads(m.payload)
        with self.lock:
            self.events.extend(d if isinstance(d, list) else [d])

    def first(self, etype: str) -> dict | None:
        with self.lock:
            return next((e for e in self.events if e["type"] == etype), None)

    def reject(self, topic: str, ev: dict) -> None:
        ack = {"status": "rejected", "id": ev["id"], "event": ev, "reason": "posting period closed"}
        self.c.publish(topic, json.dumps(ack).encode(), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


async def _running(tmp_path, mqtt_broker, model, mb):
    rgw = RunningGateway(gateway_config(broker_port=mqtt_broker.port, modbus=mb, interval_s=0.2,
                                        store_path=workdir(tmp_path, "gw") + "/gw.db"))
    gw = await rgw.start()
    erp = Erp(mqtt_broker.port, f"{gw.topics.base}/+/events/#")
    await asyncio.to_thread(erp.ready.wait, 10)
    await rgw.wait_subscribed()
    await rgw.wait_counters_read("press-2")
    await model.produce(20, timeout=20)
    await wait_until(lambda: erp.first("operation.quantity_reported") is not None, 20)
    await wait_until(lambda: gw.store.pending == 0, 10)
    return rgw, gw, erp, erp.first("operation.quantity_reported")


async def test_an_erp_rejection_while_the_store_refuses_writes_is_quarantined_once_it_takes_them(tmp_path,
                                                                                                mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.01, seed=12, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        rgw, gw, erp, ev = await _running(tmp_path, mqtt_broker, model, mb)
        try:
            failed = 0

            async def disk_full() -> None:  # every write transaction fails at its COMMIT
                nonlocal failed
                failed += 1
                raise sqlite3.OperationalError("database or disk is full")

            arrived = asyncio.Event()
            orig = gw.link.on_message

            def on_message(topic: str, payload: bytes, retained: bool) -> None:
                orig(topic, payload, retained)
                if topic.endswith("/acks"):
                    arrived.set()

            gw.link.on_message = on_message
            gw.store.before_commit = disk_full
            await asyncio.to_thread(erp.reject, gw.topics.acks("press-2"), ev)
            await asyncio.wait_for(arrived.wait(), 10)
            seen = failed
            # the core tries its commit every 0.5 s: a few more refused writes, the rejection's among them
            await wait_until(lambda: failed >= seen + 4, 15)
            assert gw.stats.erp_rejections == 0
            gw.store.before_commit = None  # the disk has room again
            await wait_until(lambda: gw.stats.erp_rejections == 1, 15)
            [q] = await gw.store.export_rows("quarantine")
            assert q["payload"] == ev and q["reason"] == "ERP: posting period closed"
            assert "erp_rejected" in gw.alarms
        finally:
            await rgw.stop()
            erp.close()


async def test_an_erp_rejection_just_before_a_stop_is_quarantined(tmp_path, mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.01, seed=12, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        rgw, gw, erp, ev = await _running(tmp_path, mqtt_broker, model, mb)
        try:
            stopping = asyncio.Event()
            orig = gw.link.on_message

            def on_message(topic: str, payload: bytes, retained: bool) -> None:
                orig(topic, payload, retained)
                if topic.endswith("/acks"):
                    stopping.set()  # the operator stops the gateway now, before the core's next round

            gw.link.on_message = on_message
            await asyncio.to_thread(erp.reject, gw.topics.acks("press-2"), ev)
            await asyncio.wait_for(stopping.wait(), 10)
            await rgw.stop()
            async with Store(rgw.cfg.store.path) as store:
                q = await store.export_rows("quarantine")
            assert [r["payload"] for r in q] == [ev], "the rejection was lost at the stop"
        finally:
            await rgw.stop()
            erp.close()


async def test_the_same_rejection_is_quarantined_once(tmp_path):
    """Written twice (a stop cut the first write's answer short, and the stop wrote it again; or the ERP sent its ack
    twice): one quarantine row. Another event, or another content under the same seq, is a row of its own."""
    async with Store(str(tmp_path / "s.db")) as store:
        for payload in (b'{"id":"a"}', b'{"id":"a"}', b'{"id":"b"}'):
            await store.quarantine_external(seq=7, machine="m1", type="t", topic="x/m1/events/t", payload=payload,
                                            reason="ERP: closed")
        await store.quarantine_external(seq=8, machine="m1", type="t", topic="x/m1/events/t", payload=b'{"id":"a"}',
                                        reason="ERP: closed")
        rows = await store.export_rows("quarantine")
        assert [(r["seq"], r["payload"]) for r in rows] == [(7, {"id": "a"}), (7, {"id": "b"}), (8, {"id": "a"})]
        assert store.quarantined == 3
