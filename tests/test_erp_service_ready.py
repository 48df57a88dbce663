"""The service's readiness follows its dependencies: /ready is 503 once its database is gone (while /health, the
liveness of the process, stays 200), and 200 again when the database answers."""

from __future__ import annotations

import aiohttp
import psycopg

from erp_service.config import MqttSourceConfig
from erp_service.service import ErpService
from erp_service.testing import ADMIN_DSN, throwaway_database
from simulators.erp_endpoint import ErpEndpoint
from tests.test_erp_service_consumers import _cfg


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
