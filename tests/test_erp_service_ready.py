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

from erp_service.config import MqttSourceConfig, PostgresConfig
from erp_service.service import ErpService
from erp_service.testing import ADMIN_DSN, EventFactory, throwaway_database
from simulators.erp_endpoint import ErpEndpoint
from tests.e2e import wait_until
from tests.faults import Gate
from tests.test_erp_service_consumers import Client, _cfg


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


async def test_start_waits_for_an_unreachable_database_then_consumes(mqtt_broker):
    """PostgreSQL is away when the service starts (systemd, a database that comes up later; here a proxy that drops
    every connection): the service stays up, logs erp.postgres_unreachable once (host, port, dbname, the error, the
    next retry; never the password), /ready is 503 with the reason, /health 200 and says what it waits for. Once the
    proxy forwards to the real PostgreSQL it creates its tables, subscribes and books. Then the database goes away
    while it runs and events arrive meanwhile: none is lost, none posted twice."""
    async with throwaway_database() as dsn, ErpEndpoint() as ep:
        name = dsn.rsplit("/", 1)[1]
        gate = await Gate(5432).start()
        cfg = _cfg(dsn, ep, source="mqtt", workers=1, mqtt=MqttSourceConfig(host=mqtt_broker.host,
                                                                             port=mqtt_broker.port))
        # trust authentication on the test server: the password is sent nowhere, it must also be logged nowhere
        cfg.postgres = PostgresConfig(dsn=f"postgresql://postgres:{SECRET}@127.0.0.1:{gate.port}/{name}",
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

                gate.open()
                await asyncio.wait_for(starting, 10)
                await svc.wait_ready()
                status, health = await _get_json(svc.http_port, "/health")
                assert status == 200 and "waiting" not in health
                assert [e["event"] for e in logs].count("erp.postgres_reachable") == 1
                f = EventFactory()
                first = f.report("press-1", "1000123", "0010", y=5)
                gw.publish(f.topic("press-1"), [first])
                await wait_until(lambda: first["id"] in ep.by_external, timeout=10)
                assert await _booked(dsn) == {"press-1": (5, 1)}

                # the database goes away while the service runs: connections cut, new ones dropped
                assert svc.metrics.processing_errors._value.get() == 0
                gate.shut()
                more = [f.report("press-1", "1000123", "0010", y=i) for i in range(1, 6)]
                for ev in more:
                    gw.publish(f.topic("press-1"), [ev])
                await wait_until(lambda: svc.metrics.processing_errors._value.get() >= 2, timeout=10)
                assert await svc.not_ready_reason() is not None
                gate.open()
                await wait_until(lambda: len(ep.by_external) == 6, timeout=20)
                assert set(ep.by_external) == {ev["id"] for ev in [first, *more]} and not ep.duplicates
                assert await _booked(dsn) == {"press-1": (5 + 15, 6)}
                await svc.wait_ready()
                assert SECRET not in json.dumps(logs, default=str)
            finally:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                gw.close()
                await svc.stop()
                await gate.close()
