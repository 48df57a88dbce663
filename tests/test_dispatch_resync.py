"""A dispatch the broker never delivered is applied at the next resync; a SUBSCRIBE never answered is an alarm.

A nats-server cluster was seen losing a retained QoS 1 dispatch (published while the gateway's subscription was being
created, or after a node restart): the gateway never learnt that the operation was completed. Here a real mosquitto
stands in for the broker, behind a proxy that drops exactly the packet the broker "lost"."""

from __future__ import annotations

import asyncio

from gateway.config import MqttConfig
from gateway.mqtt import MqttLink
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import HIERARCHY, RunningGateway, gateway_config, wait_until, workdir
from tests.faults import MqttPacketDrop


async def test_a_dispatch_the_broker_never_delivered_is_applied_at_the_next_resync(tmp_path, mqtt_broker):
    """The ERP dispatches order B (retained, PUBACKed by the broker), but the broker never sends it to the gateway.
    The gateway re-subscribes to its dispatch filter every ``mqtt.dispatch_resync_s``: the broker sends the retained
    dispatch again and B is applied, one resync later, with one operation.started."""
    lose: list[str] = []  # dispatch topics whose next delivery of order B to the gateway the "broker" loses
    proxy = await MqttPacketDrop(mqtt_broker.port, lambda to_client, kind, packet: to_client
                                 and kind == MqttPacketDrop.PUBLISH and lose and b'"order": "B"' in packet
                                 and MqttPacketDrop.publish_topic(packet) == lose[0] and bool(lose.pop())).start()
    m = MachineModel("Press2", cycle_time=0.01, seed=5, counter_bits=16)
    srv = ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1)
    await srv.start()
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"))
    await erp.start()
    cfg = gateway_config(broker_port=proxy.port, store_path=workdir(tmp_path, "gw") + "/gw.db", modbus=srv)
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"dispatch_resync_s": 1.0})})
    rgw = RunningGateway(cfg)
    try:
        gw = await rgw.start()
        assert gw.link.resync == [gw.topics.dispatch_filter()]  # not the ERP acks: never retained
        await rgw.wait_subscribed()
        await asyncio.to_thread(erp.dispatch, *HIERARCHY, "press-2", "A", "0010")
        await rgw.wait_dispatch_applied("press-2", "A", "0010")
        topic = erp.dispatch_topic(*HIERARCHY, "press-2")
        lose.append(topic)
        await asyncio.to_thread(erp.dispatch, *HIERARCHY, "press-2", "B", "0010")
        await wait_until(lambda: proxy.dropped == [(True, MqttPacketDrop.PUBLISH, topic)], 10,
                         message="the broker's delivery of dispatch B was not dropped")
        resyncs = gw.link.resyncs
        await rgw.wait_dispatch_applied("press-2", "B", "0010", timeout=10)
        assert gw.link.resyncs > resyncs, "B came by another way than a resync"
        await wait_until(lambda: len(erp.events("operation.started")) == 2, 10)
        started = [(e["data"]["order"], e["data"]["operation"]) for e in erp.events("operation.started")]
        assert started == [("A", "0010"), ("B", "0010")]
        # the resyncs go on, and the order in force seen again changes nothing (no cut, no second operation.started)
        await wait_until(lambda: gw.stats.dispatch_unchanged >= 2, 10)
        assert gw.engines["press-2"].context.ref == ("B", "0010")
        assert len(erp.events("operation.started")) == 2
    finally:
        await rgw.stop()
        await erp.stop()
        await srv.stop()
        await proxy.close()


async def test_a_subscribe_never_answered_is_refused_then_asked_again(mqtt_broker, monkeypatch):
    """A broker that takes a SUBSCRIBE and never answers it never delivers on it either: after the SUBACK timeout the
    subscription counts as refused (the alarm's source, with the reason), is asked for again, and is granted."""
    import gateway.mqtt as mqtt_module

    monkeypatch.setattr(mqtt_module, "SUBSCRIBE_RETRY_S", 0.2)
    suback_drops = [1]  # the first SUBACK is lost
    proxy = await MqttPacketDrop(mqtt_broker.port, lambda to_client, kind, packet: to_client
                                 and kind == MqttPacketDrop.SUBACK and bool(suback_drops)
                                 and bool(suback_drops.pop())).start()
    received: list[tuple[str, bytes, bool]] = []
    changes: list[dict[str, str]] = []
    cfg = MqttConfig(host="127.0.0.1", port=proxy.port, keepalive_s=5, protocol="3.1.1")
    link = MqttLink(cfg, client_id="gw-suback", subscriptions=["edge/+/dispatch"], suback_timeout_s=1.0,
                    on_message=lambda t, p, r: received.append((t, p, r)))
    link.on_subscriptions_changed = lambda: changes.append(dict(link.refused_subscriptions))
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=":memory:")
    await erp.start()
    # retained before the link subscribes: every copy it gets comes from a SUBSCRIBE (retain flag set)
    await asyncio.to_thread(erp.publish_raw, "edge/m1/dispatch", b"x", True)
    task = asyncio.create_task(link.run())
    try:
        await wait_until(lambda: len(changes) == 2, 10, message="refused, then granted")
        assert changes == [{"edge/+/dispatch": "no SUBACK within 1 s"}, {}]
        assert proxy.dropped == [(True, MqttPacketDrop.SUBACK, None)]
        await wait_until(lambda: received, 5)
        assert received[-1] == ("edge/m1/dispatch", b"x", True)
        assert link.connections == 1  # the same connection: nothing was reconnected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await erp.stop()
        await proxy.close()

