"""Local HTTP API (off unless ``http.enabled``; binds to loopback by default).

GET  /                            the status page (read-only, no token; gateway/statuspage.py)
GET  /livez                       liveness: 200 {"live": true, ...} while the core loop runs rounds (at least one a
                                  second; none for 10 s: 503). For a restart policy: not live = restart the process
GET  /readyz                      readiness: 200 {"ready": true, ...} when events can be taken and durably buffered:
                                  core loop running, store open, its last commit not failed, not full; else 503 with
                                  "reasons". The broker is not part of it (buffering through an outage is the point)
GET  /health                      {"status": "ok" | "degraded" | "failed", "live", "ready", "reasons", "components":
                                  {name: {"state", "since", "last_error"}}, "alarms", "outbox_pending",
                                  "oldest_unsent_age_s"}: failed (503) when not live or not ready; degraded (200) when
                                  a component (a PLC connector, the broker) is not connected or an alarm is active
GET  /status                      component states, outbox, per-machine order and totals
GET  /metrics                     Prometheus text format (docs/metrics.md)
POST /machines/{machine}/order    local order command: {"order", "operation", "status"?} or {"clear": true}
                                  (machines with order_source: local; bearer token when http.token_env is set)

Every POST must carry ``Content-Type: application/json`` (415 otherwise: no cross-site form post from a browser). A
listener on an address other than loopback needs ``http.token_env`` (refused at config validation otherwise). A
listener on loopback answers only requests whose ``Host`` is a loopback name (421 otherwise): a hostile page whose
name is made to resolve to 127.0.0.1 (DNS rebinding) is same-origin for the browser, so neither the JSON rule nor
CORS would stop its POST.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import health, statuspage
from gateway.component import HttpListenError  # raised here; defined there so the CLI catches it without aiohttp
from gateway.config import HttpConfig, is_loopback
from gateway.dispatch import DispatchRejected, parse_local_order

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger(__name__)


@web.middleware
async def require_json_body(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every request that changes something must say ``Content-Type: application/json``, else 415. A web page cannot
    send that header cross-site without a CORS preflight (which this API never grants), so a browser on the HMI PC
    that visits a hostile page cannot post an order change to the gateway (a plain form or ``fetch`` with a
    ``text/plain`` body could)."""
    if request.method not in ("GET", "HEAD", "OPTIONS") and request.content_type != "application/json":
        log.warning("http.unsupported_media_type", path=request.path, method=request.method,
                    content_type=request.headers.get("Content-Type"), peer=request.remote)
        return _json({"error": "Content-Type must be application/json"}, 415)
    return await handler(request)


def _host_name(header: str) -> str:
    """The name in a ``Host`` header: ``[::1]:8080`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def loopback_host_only(enabled: bool, allowed: list[str] | None = None) -> Any:
    """Middleware: on a loopback listener, a request whose ``Host`` is not a loopback name (nor one of ``allowed``:
    ``http.allowed_hosts``, e.g. the name a local reverse proxy passes on) is refused (421), so a page that rebinds
    its own name to 127.0.0.1 gets nothing, neither the status nor an order change."""
    extra = {h.lower() for h in allowed or ()}

    @web.middleware
    async def check_host(request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host")
        if enabled and host is not None and not is_loopback(name := _host_name(host)) and name.lower() not in extra:
            log.warning("http.host_refused", path=request.path, method=request.method, host=host[:200],
                        peer=request.remote)
            return _json({"error": "this API answers only requests to a loopback host name (DNS rebinding)"}, 421)
        return await handler(request)
    return check_host


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


class HttpApi:
    def __init__(self, cfg: HttpConfig, gateway: "Gateway") -> None:
        self.cfg = cfg
        self.gw = gateway
        self._token = os.environ.get(cfg.token_env) if cfg.token_env else None
        if cfg.token_env and not self._token:
            raise ValueError(f"http.token_env: environment variable {cfg.token_env} is not set")
        app = web.Application(client_max_size=64 * 1024,
                              middlewares=[loopback_host_only(is_loopback(cfg.host), cfg.allowed_hosts),
                                           require_json_body])
        app.router.add_get("/health", self.health)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/readyz", self.readyz)
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
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise HttpListenError(self.cfg.host, self.cfg.port, exc) from None
        log.info("http.listening", host=self.cfg.host, port=self.cfg.port, auth=bool(self._token))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def health(self, request: web.Request) -> web.Response:
        body = health.report(self.gw)
        return _json(body, 503 if body["status"] == "failed" else 200)

    async def livez(self, request: web.Request) -> web.Response:
        body = health.liveness(self.gw)
        return _json(body, 200 if body["live"] else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        body = health.readiness(self.gw)
        return _json(body, 200 if body["ready"] else 503)

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
            if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), f"Bearer {self._token}".encode()):
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
