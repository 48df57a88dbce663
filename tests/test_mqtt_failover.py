"""Broker failover: ``mqtt.brokers`` lists the endpoints of one clustered broker; the gateway moves to the next one
when its broker dies, with the same client id, and resends what was not acknowledged."""

from __future__ import annotations

import asyncio
import json
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import ConfigError, MqttConfig, parse_config
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store
from tests.broker import MosquittoBroker
from tests.e2e import IDENT, wait_until


class Collector:
    def __init__(self, port: int) -> None:
        self.seqs: list[int] = []
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"col-{port}")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("t/#", qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = lambda c, u, m: self.seqs.append(json.loads(m.payload)["n"])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_brokers_are_validated():
    cfg = MqttConfig(brokers=["127.0.0.1:1884", "[::1]:1885", "node-3.plant:1883"])
    assert cfg.endpoints() == [("127.0.0.1", 1884), ("::1", 1885), ("node-3.plant", 1883)]
    assert MqttConfig(host="h", port=2).endpoints() == [("h", 2)]
    with pytest.raises(ConfigError) as err:
        parse_config({"gateway": IDENT, "mqtt": {"brokers": ["127.0.0.1"]}, "connectors": [], "machines": []},
                     "gw.yaml")
    assert "mqtt.brokers" in str(err.value) and "host:port" in str(err.value)


async def test_the_gateway_fails_over_to_the_next_broker_and_loses_nothing(tmp_path):
    a = MosquittoBroker(tmp_path / "a").start()
    b = MosquittoBroker(tmp_path / "b").start()
    cols = [Collector(a.port), Collector(b.port)]
    try:
        for c in cols:
            await asyncio.to_thread(c.subscribed.wait, 10)
        async with Store(str(tmp_path / "s.db")) as store:
            link = MqttLink(MqttConfig(brokers=[f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], keepalive_s=1),
                            client_id="gw")
            pub = Publisher(store, link, window=20)
            tasks = [asyncio.create_task(link.run()), asyncio.create_task(pub.run())]

            async def commit(first: int, n: int) -> None:
                rows = [OutboxRow(i, "m1", "x", "t/m1", json.dumps({"n": i}).encode()) for i in range(first, first + n)]
                pub.notify(await store.commit({}, rows, first + n))

            await wait_until(lambda: link.is_connected and link.port == a.port, 10)
            await commit(1, 200)
            await wait_until(lambda: store.pending == 0, 10)
            # the PUBACKs came; the broker's delivery to the collector may still be on its way: let it arrive before
            # the node dies with it
            await wait_until(lambda: set(range(1, 201)) <= set(cols[0].seqs), 10)
            await a.akill()  # the node dies: the gateway moves to the next endpoint with the same client id
            await commit(201, 200)
            await wait_until(lambda: link.is_connected and link.port == b.port, 10)
            await wait_until(lambda: store.pending == 0, 15)
            await wait_until(lambda: set(range(201, 401)) <= set(cols[1].seqs), 10)
            received = set(cols[0].seqs) | set(cols[1].seqs)
            assert received == set(range(1, 401))
            assert set(range(201, 401)) <= set(cols[1].seqs)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for c in cols:
            c.stop()
        a.close()
        b.close()


def test_a_socket_connected_to_itself_is_recognised():
    """With the broker down on a port of the ephemeral range, the kernel can connect the client's socket to itself
    (same local and remote port): the link must see that and close it, or it holds the port the broker needs."""
    import socket

    from gateway.mqtt import _self_connected
    from simulators.ports import free_port

    port = free_port()
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.connect(("127.0.0.1", port))  # simultaneous open with itself
    try:
        assert _self_connected(s)
    finally:
        s.close()
    server = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(server.getsockname())
    try:
        assert not _self_connected(c)
    finally:
        c.close()
        server.close()


async def test_a_handshake_that_completes_after_the_connect_timeout_sends_no_connect(tmp_path, mqtt_broker):
    """The TCP handshake runs in a thread, bounded by connect_timeout_s. One that completes after it (a slow resolver,
    a broker's full accept queue) while the link is connected again under the same client id must not send its
    CONNECT: the broker would hand it the session and drop the live connection. The first handshake here is held
    (a gate around paho's reconnect, the real one after it) until the link's second connection is up."""
    from structlog.testing import capture_logs

    gate, held_done = threading.Event(), threading.Event()
    made: list[paho.Client] = []
    make = MqttLink._make_client

    def make_client(self, conn):  # type: ignore[no-untyped-def]
        client = make(self, conn)
        made.append(client)
        if len(made) == 1:
            real = client.reconnect

            def held() -> object:
                gate.wait(30)
                try:
                    return real()
                finally:
                    held_done.set()

            client.reconnect = held  # type: ignore[method-assign]
        return client

    link = MqttLink(MqttConfig(port=mqtt_broker.port, keepalive_s=5), client_id="gw-late")
    link.connect_timeout_s = 0.5
    link._make_client = make_client.__get__(link)  # type: ignore[method-assign]
    task = asyncio.create_task(link.run())
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(link.connected.wait(), 20)
            live = link.connection
            assert live is not None and live.id >= 2  # the first connect timed out
            gate.set()  # the first handshake completes now, late
            assert await asyncio.to_thread(held_done.wait, 20)
            await wait_until(lambda: any(e["event"] == "mqtt.late_connect_dropped" for e in logs), 10)
            # a round trip on the live connection: the broker has read what the late socket sent before it
            info = link.connection.client.publish("t/probe", b"{}", qos=1)  # type: ignore[union-attr]
            await wait_until(info.is_published, 10)
        assert link.connection is live and live.alive
        connects = mqtt_broker.log_text().count(" as gw-late ")
        assert connects == 1, mqtt_broker.log_text()[-2000:]  # the live connection's CONNECT only
    finally:
        gate.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
