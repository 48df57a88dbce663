"""Local HTTP API (off unless ``http.enabled``; binds to loopback by default).

GET  /                            the status page (read-only, no token; gateway/statuspage.py)
GET  /health                      200 when every component is connected, else 503 (JSON body either way)
GET  /status                      component states, outbox, per-machine order and totals
GET  /metrics                     Prometheus text format (docs/metrics.md)
POST /machines/{machine}/order    local order command: {"order", "operation", "status"?} or {"clear": true}
                                  (machines with order_source: local; bearer token when http.token_env is set)
"""

from __future__ import annotations

import hmac
import json
import os
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from gateway import statuspage
from gateway.config import HttpConfig
from gateway.dispatch import DispatchRejected, parse_local_order

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger(__name__)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


class HttpApi:
    def __init__(self, cfg: HttpConfig, gateway: "Gateway") -> None:
        self.cfg = cfg
        self.gw = gateway
        self._token = os.environ.get(cfg.token_env) if cfg.token_env else None
        if cfg.token_env and not self._token:
            raise ValueError(f"http.token_env: environment variable {cfg.token_env} is not set")
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/machines/{machine}/order", self.order)
        statuspage.add_routes(app)
        self.app = app
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        await site.start()
        log.info("http.listening", host=self.cfg.host, port=self.cfg.port, auth=bool(self._token))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def health(self, request: web.Request) -> web.Response:
        st = self.gw.status()
        body = {"healthy": st["healthy"], "components": {k: v["state"] for k, v in st["components"].items()},
                "outbox_pending": st["outbox_pending"]}
        return _json(body, 200 if st["healthy"] else 503)

    async def status(self, request: web.Request) -> web.Response:
        st = self.gw.status()
        if "outbox_oldest_age_s" not in st:  # needs a store read (async): added here, not in Gateway.status()
            st["outbox_oldest_age_s"] = await statuspage.oldest_unsent_age_s(self.gw.store)
        return _json(st)

    async def metrics(self, request: web.Request) -> web.Response:
        # the process-wide registry (alarms, dispatches, process_*) and this gateway's own (gateway/exporter.py)
        body = generate_latest() + generate_latest(self.gw.exporter.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def order(self, request: web.Request) -> web.Response:
        if self._token is not None:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self._token}".encode()):
                log.warning("http.unauthorized", path=request.path, peer=request.remote)
                return _json({"error": "missing or wrong bearer token"}, 401)
        machine = request.match_info["machine"]
        try:
            ctx = parse_local_order(await request.read())
        except DispatchRejected as exc:
            return _json({"error": "invalid order", "reason": exc.reason, "detail": exc.detail}, 400)
        try:
            self.gw.set_local_order(machine, ctx)
        except ValueError as exc:
            return _json({"error": str(exc)}, 409 if machine in self.gw.specs else 404)
        log.info("http.order_command", machine=machine, order=ctx.order if ctx else None,
                 operation=ctx.operation if ctx else None)
        return _json({"accepted": True, "machine": machine}, 202)
