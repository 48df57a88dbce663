"""Stopping the MQTT link right as its CONNACK arrives: Python 3.11's asyncio.wait_for can swallow that cancel, and
the link then waited forever for a connection loss (a gateway stop hung until the grace period ran out)."""

from __future__ import annotations

import asyncio

from gateway.config import MqttConfig
from gateway.mqtt import MqttLink


async def test_cancel_as_the_connack_arrives_stops_the_link(mqtt_broker):
    for _ in range(3):
        link = MqttLink(MqttConfig(port=mqtt_broker.port), client_id="gw-cancel")
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        task.cancel()  # in the same step as the CONNACK: the run task is still inside wait_for
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the link did not stop within 5 s of its cancel"
        assert task.cancelled()


async def test_clean_stop_right_after_connect_does_not_trigger_the_last_will(mqtt_broker):
    """A clean stop publishes 'stopped' and disconnects; closing the socket with the broker's SUBACKs still unread
    used to send a RST, and mosquitto then dropped our DISCONNECT unread and published the last will too."""
    import json

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.e2e import wait_until

    got: list[bytes] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="watch", protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    subscribed = []
    sub.on_subscribe = lambda c, u, mid, rc, p: subscribed.append(mid)
    sub.connect("127.0.0.1", mqtt_broker.port)
    sub.subscribe("gw/status", qos=1)
    sub.loop_start()
    try:
        await wait_until(lambda: subscribed, 10)
        for i in range(10):
            link = MqttLink(MqttConfig(port=mqtt_broker.port), client_id="gw-stop", will=("gw/status", b"will"),
                            online=("gw/status", b"online"), offline=lambda i=i: json.dumps(["stopped", i]).encode(),
                            subscriptions=["a/#", "b/#", "c/#"])
            task = asyncio.create_task(link.run())
            await asyncio.wait_for(link.connected.wait(), 10)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await wait_until(lambda: got and got[-1] not in (b"online",), 10)
            # the last message of this round must stay 'stopped': a will would arrive right after it
            marker = f"round-{i}".encode()
            sub.publish("gw/status", marker, qos=1)
            await wait_until(lambda marker=marker: got[-1] == marker, 10)
            assert got[-2] == json.dumps(["stopped", i]).encode(), got[-4:]
    finally:
        sub.loop_stop()
        sub.disconnect()
