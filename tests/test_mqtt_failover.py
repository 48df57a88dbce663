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
