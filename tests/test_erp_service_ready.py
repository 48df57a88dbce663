"""The service's readiness follows its dependencies: /ready is 503 once its database is gone (while /health, the
liveness of the process, stays 200), and 200 again when the database answers; a database that is unreachable at
start is waited for (the process does not exit)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import paho.mqtt.client as mqtt
import psycopg
import structlog

from erp_service.config import MqttSourceConfig, NatsSourceConfig, PostgresConfig
from erp_service.service import ErpService
from erp_service.testing import ADMIN_DSN, EventFactory, throwaway_database
from simulators.erp_endpoint import ErpEndpoint
from tests.e2e import wait_until
from tests.faults import Gate
from tests.test_erp_service_consumers import Client, _cfg, _lag_settles, nats_cluster  # noqa: F401 (a fixture)


async def _get(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status


async def _admin(sql: str) -> None:
    async with await psycopg.AsyncConnection.connect(ADMIN_DSN, autocommit=True) as c:
        await c.execute(sql)


async def test_ready_is_503_while_the_database_is_unavailable(mqtt_broker):
    async with throwaway_database() as dsn, ErpEndpoint() as ep:
        name = dsn.rsplit("/", 1)[1]
        svc = await ErpService(_cfg(dsn, ep, source="mqtt", workers=1, mqtt=MqttSourceConfig(
            host=mqtt_broker.host, port=mqtt_broker.port))).start()
        try:
            await svc.wait_ready()
            assert await _get(svc.http_port, "/ready") == 200
            # the database refuses new connections (as during a failover or maintenance)
            await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            assert await _get(svc.http_port, "/ready") == 503
            assert await _get(svc.http_port, "/health") == 200
            assert await _get(svc.http_port, "/status") == 503
            await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            assert await _get(svc.http_port, "/ready") == 200
        finally:
            await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            await svc.stop()


SECRET = "n0t-in-any-log"


async def _get_json(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json()


async def _booked(dsn: str) -> dict:
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        cur = await c.execute("SELECT machine, yield, reports FROM erp_ledger")
        return {m: (y, n) for m, y, n in await cur.fetchall()}


async def _shut(starting: asyncio.Task, gw: Client, svc: ErpService, gate: Gate) -> None:
    """End a test whose service started behind the database gate, whatever state its start() is in."""
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    gw.close()
    await svc.stop()
    await gate.close()


async def test_start_waits_for_an_unreachable_database_then_consumes(mqtt_broker, monkeypatch):
    """PostgreSQL is away when the service starts (systemd, a database that comes up later; here a proxy that drops
    every connection): the service stays up, logs erp.postgres_unreachable once (host, port, dbname, the error, the
    next retry; never the password), /ready is 503 with the reason, /health 200 and says what it waits for. Once the
    proxy forwards to the real PostgreSQL it creates its tables and books, also an event published while it waited:
    its workers' persistent sessions subscribed before the wait, so mosquitto kept the event for them (a first
    deployment with the database still down loses nothing). Then the database goes away while it runs and events
    arrive meanwhile: none is lost, none posted twice."""
    async with throwaway_database() as dsn, ErpEndpoint() as ep:
        name = dsn.rsplit("/", 1)[1]
        gate = await Gate(5432).start()
        cfg = _cfg(dsn, ep, source="mqtt", workers=1, mqtt=MqttSourceConfig(host=mqtt_broker.host,
                                                                             port=mqtt_broker.port))
        # trust authentication on the test server: the password (from the environment, as the config wants it) is
        # sent nowhere, it must also be logged nowhere
        monkeypatch.setenv("PGPASSWORD", SECRET)
        cfg.postgres = PostgresConfig(dsn=f"postgresql://postgres@127.0.0.1:{gate.port}/{name}",
                                      backoff_initial_s=0.05, backoff_max_s=0.2)
        gw = Client(mqtt_broker.host, mqtt_broker.port, "gw-01", protocol=mqtt.MQTTv5)
        svc = ErpService(cfg)
        with structlog.testing.capture_logs() as logs:
            starting = asyncio.create_task(svc.start())
            try:
                await wait_until(lambda: gate.refused >= 3 and svc.http_port is not None, timeout=10)
                assert not starting.done()
                warned = [e for e in logs if e["event"] == "erp.postgres_unreachable"]
                assert len(warned) == 1, warned  # a state change, not every attempt
                assert warned[0]["log_level"] == "warning"
                assert {k: warned[0][k] for k in ("host", "port", "dbname", "attempt")} == {
                    "host": "127.0.0.1", "port": gate.port, "dbname": name, "attempt": 1}
                assert "server closed the connection" in warned[0]["error"] and warned[0]["retry_in_s"] > 0
                status, ready = await _get_json(svc.http_port, "/ready")
                assert status == 503 and ready["reason"].startswith("waiting for PostgreSQL: "), ready
                status, health = await _get_json(svc.http_port, "/health")
                assert status == 200 and health["waiting"]["for"] == "postgres", health
                assert health["waiting"]["attempts"] >= 2 and health["waiting"]["port"] == gate.port
                assert SECRET not in json.dumps([ready, health, logs], default=str)
                await wait_until(lambda: svc.mqtt_workers and all(w.subscribed.is_set() for w in svc.mqtt_workers),
                                 timeout=10, message="the workers' sessions did not subscribe while PostgreSQL was away")
                f = EventFactory()
                early = f.report("press-1", "1000123", "0010", y=2)
                gw.publish(f.topic("press-1"), [early])  # kept in the worker's session, not acknowledged yet

                gate.open()
                await asyncio.wait_for(starting, 10)
                await svc.wait_ready()
                status, health = await _get_json(svc.http_port, "/health")
                assert status == 200 and "waiting" not in health
                assert [e["event"] for e in logs].count("erp.postgres_reachable") == 1
                first = f.report("press-1", "1000123", "0010", y=5)
                gw.publish(f.topic("press-1"), [first])
                await wait_until(lambda: {first["id"], early["id"]} <= set(ep.by_external), timeout=10)
                assert await _booked(dsn) == {"press-1": (7, 2)}

                # the database goes away while the service runs: connections cut, new ones dropped
                assert svc.metrics.processing_errors._value.get() == 0
                gate.shut()
                more = [f.report("press-1", "1000123", "0010", y=i) for i in range(1, 6)]
                for ev in more:
                    gw.publish(f.topic("press-1"), [ev])
                await wait_until(lambda: svc.metrics.processing_errors._value.get() >= 2, timeout=10)
                assert await svc.not_ready_reason() is not None
                gate.open()
                await wait_until(lambda: len(ep.by_external) == 7, timeout=20)
                assert set(ep.by_external) == {ev["id"] for ev in [early, first, *more]} and not ep.duplicates
                assert await _booked(dsn) == {"press-1": (7 + 15, 7)}
                await svc.wait_ready()
                assert SECRET not in json.dumps(logs, default=str)
            finally:
                await _shut(starting, gw, svc, gate)


async def test_nats_events_published_while_the_database_is_awaited_are_kept(nats_cluster):  # noqa: F811 (the fixture)
    """First deployment, PostgreSQL still down: the durable consumer is created before the database is awaited. On
    ``$MQTT_msgs`` (interest retention) a message PUBACKed while no consumer exists is deleted at once, so events the
    gateways publish while the service waits would otherwise be acknowledged to them and lost. Here they wait in the
    stream (the consumer's lag) and are booked once the database answers, each once."""
    async with throwaway_database() as dsn, ErpEndpoint() as ep:
        name = dsn.rsplit("/", 1)[1]
        gate = await Gate(5432).start()
        ncfg = NatsSourceConfig(servers=nats_cluster.urls,
                                mqtt_endpoints=[f"{h}:{p}" for h, p in nats_cluster.mqtt_endpoints])
        cfg = _cfg(dsn, ep, source="nats", workers=1, nats=ncfg)
        cfg.postgres = PostgresConfig(dsn=f"postgresql://postgres@127.0.0.1:{gate.port}/{name}",
                                      backoff_initial_s=0.05, backoff_max_s=0.2)
        svc = ErpService(cfg)
        starting = asyncio.create_task(svc.start())
        h, p = nats_cluster.mqtt_endpoints[0]
        gw = Client(h, p, "gw-01")  # MQTT 3.1.1: nats-server 2.9 refuses MQTT 5
        try:
            await wait_until(lambda: svc.waiting is not None, timeout=30, message="not waiting for PostgreSQL")
            f = EventFactory()
            evs = [f.report("press-1", "1000123", "0010", y=i) for i in range(1, 6)]
            for ev in evs:
                gw.publish(f.topic("press-1"), [ev])
            assert await _lag_settles(svc.nats, 5) == 5  # kept for the service while it waits
            assert not ep.by_external and not starting.done()
            gate.open()
            await asyncio.wait_for(starting, 10)
            await wait_until(lambda: len(ep.by_external) == 5, timeout=30, message=f"posted {len(ep.by_external)}")
            assert set(ep.by_external) == {ev["id"] for ev in evs} and not ep.duplicates
            assert await _booked(dsn) == {"press-1": (15, 5)}
        finally:
            await _shut(starting, gw, svc, gate)
