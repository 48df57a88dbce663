"""The gateway fails over between NATS nodes with a CLEAN session (docs/erp-service.md, "Failover with a clean
session"): what a persistent broker session would keep is restored by the gateway itself on the new node. Its
subscriptions are made again at each CONNACK (the retained dispatch arrives again), and events committed while its
node was dead are resent from its outbox to the next node and stored in the cluster."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config import MqttConfig
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store
from simulators.nats_cluster import NatsCluster
from tests.e2e import wait_until
from tests.test_nats_cluster import (
    TOPIC,
    Pub,
    _js,
    _mqtt_streams_led_without,
    _retry,
    _stored,
    _with_consumer,
)

DISPATCH = "edge/v1/acme/plant-1/assembly/line-1/press-1/dispatch"


@pytest.fixture
def cluster():
    c = NatsCluster().start()
    yield c
    c.stop()


async def test_clean_session_failover_resubscribes_and_resends(cluster, tmp_path):
    nc, js = await _with_consumer(cluster)
    await nc.close()
    erp = Pub(*cluster.mqtt_endpoints[2], "erp-dispatch")
    info = erp.c.publish(DISPATCH, b'{"order":"1"}', qos=1, retain=True)  # retained, like the ERP's dispatch
    info.wait_for_publish(10)
    assert info.is_published()
    got: list[tuple[str, bytes, bool]] = []
    a, b = cluster.nodes[0], cluster.nodes[1]
    cfg = MqttConfig(brokers=[f"{a.host}:{a.mqtt_port}", f"{b.host}:{b.mqtt_port}"], protocol="3.1.1",
                     keepalive_s=2, broker_kind="nats")
    async with Store(str(tmp_path / "s.db")) as store:
        link = MqttLink(cfg, client_id="gw-clean", subscriptions=[DISPATCH],
                        on_message=lambda t, p, r: got.append((t, p, r)))
        pub = Publisher(store, link, window=10)
        tasks = [asyncio.create_task(link.run()), asyncio.create_task(pub.run())]

        async def commit(first: int, n: int) -> None:
            rows = [OutboxRow(i, "press-1", "batch", TOPIC, json.dumps([{"n": i}]).encode())
                    for i in range(first, first + n)]
            pub.notify(await store.commit({}, rows, first + n))

        try:
            await wait_until(lambda: link.is_connected and link.port == a.mqtt_port and len(got) == 1, 20)
            await commit(1, 5)
            await wait_until(lambda: store.pending == 0, 15)
            cluster.kill(0)
            await commit(6, 5)  # committed while its node is dead: not acknowledged, kept in the outbox
            await _mqtt_streams_led_without(cluster, a.name)
            await wait_until(lambda: link.is_connected and link.port == b.mqtt_port, 30)
            await wait_until(lambda: store.pending == 0, 30)
            # no session on node 2 (clean session): the gateway subscribed again, the retained dispatch came again
            # (more than once when node 2 refused the first SUBSCRIBE while electing leaders: asked again)
            await wait_until(lambda: len(got) >= 2, 15)
            assert set(got[1:]) == {(DISPATCH, b'{"order":"1"}', True)}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            erp.close()
    nc, js = await _js(cluster)
    try:
        stored = await _retry(lambda: _stored(js))
        assert {json.loads(m)[0]["n"] for m in stored if m.startswith(b"[")} == set(range(1, 11))
    finally:
        await nc.close()
