"""The ERP service end to end from a broker: MQTT 5 shared subscription on mosquitto, and a JetStream durable pull
consumer on a 3-node NATS cluster fed through its MQTT endpoint; real PostgreSQL, real HTTP ERP endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal

import aiohttp
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from erp_service.config import ErpEndpointConfig, HttpConfig, MqttSourceConfig, NatsSourceConfig, PostgresConfig, \
    ServiceConfig
from erp_service.service import ErpService
from erp_service.testing import EventFactory
from simulators.erp_endpoint import ErpEndpoint
from simulators.nats_cluster import NatsCluster
from tests.e2e import wait_until


@pytest.fixture
async def endpoint():
    async with ErpEndpoint() as ep:
        yield ep


@pytest.fixture
def nats_cluster():
    c = NatsCluster().start()
    yield c
    c.stop()


class Client:
    """A paho client (gateway stand-in): publishes QoS 1 and waits for each PUBACK; collects what it receives."""

    def __init__(self, host: str, port: int, client_id: str, protocol: int = mqtt.MQTTv311) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                             **({"clean_session": False} if protocol == mqtt.MQTTv311 else {}))
        self.got: list[tuple[str, dict]] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = lambda cl, u, m: self.got.append((m.topic, json.loads(m.payload)))
        self.c.connect(host, port)
        self.c.loop_start()
        assert self.connected.wait(10)

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)

    def publish(self, topic: str, payload: object) -> None:
        info = self.c.publish(topic, json.dumps(payload).encode(), qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def _lag_settles(source, expected: int, timeout: float = 10.0) -> int | None:
    """The consumer lag once it reads ``expected`` or the timeout has passed (then the last reading, for the assert).
    JetStream counts a stored message on the consumer leader, which may apply it after the stream's quorum did."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        lag = await source.lag()
        if lag == expected or asyncio.get_running_loop().time() > deadline:
            return lag
        await asyncio.sleep(0.05)


def _cfg(dsn: str, ep: ErpEndpoint, **kw) -> ServiceConfig:
    return ServiceConfig(postgres=PostgresConfig(dsn=dsn), http=HttpConfig(port=0),
                         erp=ErpEndpointConfig(url=ep.url, poll_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.3,
                                               timeout_s=2), **kw)


async def _ledger(dsn: str) -> dict:
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        cur = await c.execute("SELECT machine, order_id, operation, yield, scrap FROM erp_ledger")
        return {(m, o, op): (y, s) for m, o, op, y, s in await cur.fetchall()}


async def test_mqtt_shared_subscription_two_workers(mqtt_broker, dsn, endpoint):
    cfg = _cfg(dsn, endpoint, source="mqtt", workers=2,
               mqtt=MqttSourceConfig(host=mqtt_broker.host, port=mqtt_broker.port))
    svc = await ErpService(cfg).start()
    gw = Client(mqtt_broker.host, mqtt_broker.port, "gw-01", protocol=mqtt.MQTTv5)
    try:
        await svc.wait_ready()
        gw.subscribe("edge/v1/+/+/+/+/+/acks")
        f = EventFactory()
        sent = []
        for i in range(30):
            ev = f.report(f"press-{i % 3}", "1000123", "0010", y=i + 1)
            sent.append(ev)
            gw.publish(f.topic(ev["subject"]), [ev])
        bad = f.report("press-0", "1000123", "0010", y=1)
        bad["data"]["unit"] = ""
        gw.publish(f.topic("press-0", "operation.quantity_reported"), bad)
        gw.publish(f.topic("press-1"), [sent[4]])  # a QoS 1 redelivery
        await wait_until(lambda: len(gw.got) == 32, timeout=20, message=f"acks: {len(gw.got)}")
        await wait_until(lambda: len(endpoint.by_external) == 30, timeout=20)
        ledger = await _ledger(dsn)
        assert ledger == {(f"press-{m}", "1000123", "0010"): (Decimal(sum(i + 1 for i in range(30) if i % 3 == m)),
                                                              Decimal(0)) for m in range(3)}
        statuses = [(t, a["status"], a["id"]) for t, a in gw.got]
        assert sorted(s for _, s, _ in statuses) == ["accepted"] * 31 + ["rejected"]
        [rej] = [a for _, a in gw.got if a["status"] == "rejected"]
        assert rej["id"] == bad["id"] and rej["event"] == bad and "data.unit" in rej["reason"]
        assert all(t == f"{f.base}/{a['event']['subject'] if a.get('event') else t.split('/')[-2]}/acks"
                   for t, a in gw.got)
        assert endpoint.duplicates == {}
        assert svc.metrics.events.labels("duplicate")._value.get() == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{svc.http_port}/metrics") as r:
                text = await r.text()
            async with http.get(f"http://127.0.0.1:{svc.http_port}/ready") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{svc.http_port}/status") as r:
                status = await r.json()
        assert 'edge_erp_events_total{outcome="accepted"} 30.0' in text
        assert 'edge_erp_events_total{outcome="rejected"} 1.0' in text
        assert status["events"] == 30 and status["duplicates"] == 1 and status["conflicts"] == 0
    finally:
        gw.close()
        await svc.stop()


async def test_mqtt_worker_away_its_share_waits_in_its_session(mqtt_broker, dsn, endpoint):
    """mosquitto keeps dealing shared-subscription messages to a member whose persistent session is offline: they
    wait in its session until the worker (same client id) comes back. Nothing is lost; the ledger ends exact."""
    mq = MqttSourceConfig(host=mqtt_broker.host, port=mqtt_broker.port, client_id_prefix="erp-a")
    cfg = _cfg(dsn, endpoint, source="mqtt", workers=1, mqtt=mq)
    cfg_b = cfg.model_copy(update={"mqtt": mq.model_copy(update={"client_id_prefix": "erp-b"})})
    a = await ErpService(cfg).start()
    b = await ErpService(cfg_b).start()
    gw = Client(mqtt_broker.host, mqtt_broker.port, "gw-01", protocol=mqtt.MQTTv5)
    f = EventFactory()
    try:
        await a.wait_ready()
        await b.wait_ready()
        for i in range(20):
            gw.publish(f.topic("press-1"), [f.report("press-1", "1", "0010", y=1)])
        await a.stop()
        for i in range(20):
            gw.publish(f.topic("press-1"), [f.report("press-1", "1", "0010", y=1)])
        a = await ErpService(cfg).start()  # the worker slot returns with its client id
        await wait_until(lambda: len(endpoint.by_external) == 40, timeout=20)
        assert (await _ledger(dsn)) == {("press-1", "1", "0010"): (Decimal(40), Decimal(0))}
        assert endpoint.duplicates == {}
    finally:
        gw.close()
        await a.stop()
        await b.stop()


async def test_nats_cluster_durable_consumer_shared_by_workers(nats_cluster, dsn, endpoint):
    """Gateway → NATS MQTT endpoint (3.1.1) → $MQTT_msgs (R3) → one durable pull consumer, 2 processes' worth of
    workers (two services) → PostgreSQL → ERP. Acks reach the gateway over MQTT."""
    from erp_service.consumers import NatsSource
    from erp_service.metrics import Metrics

    ncfg = NatsSourceConfig(servers=nats_cluster.urls,
                            mqtt_endpoints=[f"{h}:{p}" for h, p in nats_cluster.mqtt_endpoints])
    # the durable consumer exists before the gateway publishes (interest retention); no worker runs yet
    probe = NatsSource(ncfg, "edge", Metrics(), "none")
    await probe.connect()
    h, p = nats_cluster.mqtt_endpoints[0]
    gw = Client(h, p, "gw-01")
    s1 = s2 = None
    try:
        gw.subscribe("edge/v1/+/+/+/+/+/acks")
        f = EventFactory()
        evs = [f.started("press-1", "1000123", "0010")]
        evs += [f.report("press-1", "1000123", "0010", y=3, s=1) for _ in range(20)]
        evs += [f.report("press-1", "1000123", "0010", y=2, reason="completion"), f.completed("press-1", "1000123",
                                                                                               "0010")]
        for i in range(0, len(evs), 4):
            gw.publish(f.topic("press-1"), evs[i:i + 4])
        # the consumer lag of /status and edge_erp_consumer_lag: 6 messages waiting. A PUBACK means a quorum stored
        # the message; the consumer leader may count it a moment later (CI once read 5), so wait, never beyond 6
        assert await _lag_settles(probe, 6) == 6
        await probe.close()
        s1 = await ErpService(_cfg(dsn, endpoint, source="nats", workers=2, nats=ncfg)).start()
        s2 = await ErpService(_cfg(dsn, endpoint, source="nats", workers=2, nats=ncfg)).start()
        await s1.wait_ready()
        await s2.wait_ready()
        await wait_until(lambda: len(endpoint.by_external) == 22, timeout=30,
                         message=f"posted {len(endpoint.by_external)}")
        assert endpoint.totals() == {("1000123", "0010"): {"yield": Decimal(62), "scrap": Decimal(20),
                                                           "rework": Decimal(0), "final": True, "goods": {}}}
        assert endpoint.postings[-1]["IsFinalConfirmation"] is True
        await wait_until(lambda: len(gw.got) == len(evs), timeout=20, message=f"acks {len(gw.got)}")
        assert {a["id"] for _, a in gw.got} == {e["id"] for e in evs}
        got = s1.metrics.messages._value.get() + s2.metrics.messages._value.get()
        assert got == 6  # every message processed once (shared durable consumer, not one copy per service)
        assert await _lag_settles(s1.nats, 0) == 0
    finally:
        gw.close()
        await probe.close()
        for s in (s1, s2):
            if s is not None:
                await s.stop()


async def test_poison_message_dead_lettered_after_retries_stream_goes_on(mqtt_broker, dsn, endpoint):
    """A message that fails every time (here: a database trigger refuses its event) is retried, then recorded in
    erp_rejected as an internal error and acknowledged; the messages after it are processed."""
    f = EventFactory()
    poison = f.report("press-1", "1", "0010", y=5)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        from erp_service.ledger import ensure_schema

        await ensure_schema(c)
        await c.execute(f"""CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
            IF NEW.id = '{poison["id"]}' THEN RAISE EXCEPTION 'refused by test trigger'; END IF; RETURN NEW;
            END $$ LANGUAGE plpgsql""")
        await c.execute("CREATE TRIGGER refuse BEFORE INSERT ON erp_events FOR EACH ROW EXECUTE FUNCTION refuse()")
    cfg = _cfg(dsn, endpoint, source="mqtt", workers=1,
               mqtt=MqttSourceConfig(host=mqtt_broker.host, port=mqtt_broker.port))
    svc = ErpService(cfg)
    await svc.start()
    for w in svc.mqtt_workers:
        w.max_attempts = 3
    gw = Client(mqtt_broker.host, mqtt_broker.port, "gw-01", protocol=mqtt.MQTTv5)
    try:
        await svc.wait_ready()
        gw.publish(f.topic("press-1"), [poison])
        after = f.report("press-1", "1", "0010", y=7)
        gw.publish(f.topic("press-1"), [after])
        await wait_until(lambda: after["id"] in endpoint.by_external, timeout=30)
        async with await psycopg.AsyncConnection.connect(dsn) as c:
            cur = await c.execute("SELECT source, id, reason, body FROM erp_rejected")
            [(source, eid, reason, body)] = await cur.fetchall()
        assert reason.startswith("internal error: RaiseException: refused by test trigger")
        assert (source, eid, json.loads(body)) == (poison["source"], poison["id"], poison)  # each event: a rejection
        assert svc.metrics.processing_errors._value.get() == 3
        assert (await _ledger(dsn)) == {("press-1", "1", "0010"): (Decimal(7), Decimal(0))}
    finally:
        gw.close()
        await svc.stop()


async def test_database_connections_killed_mid_stream_nothing_lost(nats_cluster, dsn, endpoint):
    """PostgreSQL drops every connection of the service (pg_terminate_backend) while events flow: the messages in
    flight are not acknowledged, the workers and posters reconnect, JetStream redelivers; the ledger ends exact."""
    ncfg = NatsSourceConfig(servers=nats_cluster.urls, ack_wait_s=5,
                            mqtt_endpoints=[f"{h}:{p}" for h, p in nats_cluster.mqtt_endpoints])
    svc = await ErpService(_cfg(dsn, endpoint, source="nats", workers=2, nats=ncfg)).start()
    h, p = nats_cluster.mqtt_endpoints[1]
    gw = Client(h, p, "gw-01")
    dbname = dsn.rsplit("/", 1)[1]
    try:
        await svc.wait_ready()
        f = EventFactory()
        evs = [f.report(f"press-{i % 2}", "1000123", "0010", y=1, s=i % 2) for i in range(60)]
        for i in range(0, 30, 3):
            gw.publish(f.topic("press-0"), evs[i:i + 3])
        # a worker opens its connection with its first message: kill once one has (and the poster's) exists
        await wait_until(lambda: svc._conns, timeout=20, message="no worker took a message")
        async with await psycopg.AsyncConnection.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                                                         autocommit=True) as admin:
            cur = await admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
            killed = (await cur.fetchone())[0]
        assert killed >= 2
        for i in range(30, 60, 3):
            gw.publish(f.topic("press-0"), evs[i:i + 3])
        await wait_until(lambda: len(endpoint.by_external) == 60, timeout=40)
        assert endpoint.duplicates == {}
        assert (await _ledger(dsn)) == {("press-0", "1000123", "0010"): (Decimal(30), Decimal(0)),
                                        ("press-1", "1000123", "0010"): (Decimal(30), Decimal(30))}
        async with await psycopg.AsyncConnection.connect(dsn) as c:
            cur = await c.execute("SELECT low, high, received FROM erp_streams")
            assert await cur.fetchall() == [(60, 60, 60)]
    finally:
        gw.close()
        await svc.stop()


def test_a_database_outage_is_logged_once_per_interval_other_failures_every_time():
    """Every message fails the same way while PostgreSQL is away (about every 0.5 s per worker): the first failure
    is logged, then one line per interval with the number not logged meanwhile; other failures every time."""
    import structlog

    from erp_service.consumers import OutageLog

    now = [100.0]
    out = OutageLog(interval_s=30.0, clock=lambda: now[0])
    down = psycopg.OperationalError("connection refused")
    with structlog.testing.capture_logs() as logs:
        for _ in range(10):  # 5 s of failures
            out.failed(down, worker=0, topic="t", error="OperationalError")
            now[0] += 0.5
        out.failed(down, worker=1, topic="t", error="OperationalError")  # another worker: its own line
        out.failed(ValueError("bad payload"), worker=0, topic="t", error="ValueError")
        out.failed(ValueError("bad payload"), worker=0, topic="t", error="ValueError")
        now[0] += 30.0
        out.failed(down, worker=0, topic="t", error="OperationalError")
    lines = [(e.get("worker"), e.get("outage"), e.get("suppressed")) for e in logs
             if e["event"] == "erp.processing_failed"]
    assert lines == [(0, True, 0), (1, True, 0), (0, None, None), (0, None, None), (0, True, 9)]
    assert all(e["log_level"] == "error" for e in logs)


async def test_cancel_until_done_ends_a_coroutine_that_swallows_cancellations():
    """nats-py's connect swallows a cancellation that lands while it closes a failed attempt, then retries for ever:
    cancel_until_done cancels again until the task ends; one that never ends is given up after ``within``."""
    from erp_service.consumers import cancel_until_done

    swallowed, limit = [0], [2]

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed[0] >= limit[0]:
                    raise
                swallowed[0] += 1

    tasks: list[asyncio.Future[None]] = []
    try:
        t = asyncio.ensure_future(stubborn())
        tasks.append(t)
        await asyncio.sleep(0)
        assert await cancel_until_done(t, within=5) and t.cancelled() and swallowed[0] == 2

        swallowed[0], limit[0] = 0, 10**9
        forever = asyncio.ensure_future(stubborn())
        tasks.append(forever)
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert not await cancel_until_done(forever, within=0.5) and not forever.done()
        assert 0.5 <= loop.time() - t0 < 1.5 and swallowed[0] >= 3
    finally:
        limit[0] = -1  # let them end, whatever the outcome (a pending one would hang the loop's close)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
