"""The ERP posting service process: consumer workers (one PostgreSQL connection each), outbox posters, HTTP surface.

GET /health   200 while the process runs (liveness); while start() waits for PostgreSQL, says so under "waiting"
GET /ready    200 when the database answers, the consumer is connected and the workers are up, else 503 and why
GET /status   JSON: counts by outcome, open seq gaps, held completions, seqs released by hand, outbox by state,
              consumer lag
GET /metrics  Prometheus text format (edge_erp_*)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg.conninfo import conninfo_to_dict

from erp_service.config import ConfigError, ServiceConfig
from erp_service.consumers import MqttWorker, NatsSource
from erp_service.ledger import Ledger, Result, ensure_schema
from erp_service.metrics import Metrics
from erp_service.poster import Poster
from gateway.component import Backoff

log = structlog.get_logger(__name__)


class ErpService:
    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.ledger = Ledger(cfg, self.metrics)
        self.stop_event = asyncio.Event()
        self.nats: NatsSource | None = None
        self.mqtt_workers: list[MqttWorker] = []
        self.posters = [Poster(cfg.erp, cfg.postgres.dsn, self.metrics, f"poster-{i}") for i in range(cfg.erp.posters)]
        e = cfg.erp
        if e.lease_s < 2 * e.timeout_s + e.settle_s:  # a row could be taken over while the ERP still books it
            log.warning("erp.lease_short", lease_s=e.lease_s, needed_s=2 * e.timeout_s + e.settle_s,
                        hint="set erp.lease_s above 2 x erp.timeout_s + erp.settle_s (docs/erp-service.md, outbox)")
        self._conns: dict[int, psycopg.AsyncConnection[Any]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._poster_tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.started_at = time.time()
        self.workers_up = 0
        #: while start() waits for PostgreSQL: where, the last error, attempts, next retry (shown on /health, /ready)
        self.waiting: dict[str, Any] | None = None
        self.started = False  # start() has started the workers: before that, /ready is 503 ("starting")

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> "ErpService":
        """HTTP first (liveness and readiness answer while dependencies are awaited), then the source's durable
        interest, then PostgreSQL, then the workers.

        The durable interest comes before the database wait: on first deployment with the database still down, the
        gateways' events must already be kept for this service. NATS's ``$MQTT_msgs`` has interest retention (a
        message PUBACKed while no consumer exists is deleted at once) and mosquitto keeps QoS 1 messages only for
        sessions that subscribed; without the durable consumer or the persistent sessions, what gateways publish
        meanwhile would be acknowledged to them and then dropped. Messages wait there, unacknowledged, until the
        workers start."""
        if self.cfg.http.enabled:
            await self._start_http()
        if self.cfg.source == "nats":
            self.nats = NatsSource(self.cfg.nats, self.cfg.topic_root, self.metrics, self.cfg.acks)
            self.nats.dead_letter = self._dead_letter
            await self.nats.connect()
        else:
            for i in range(self.cfg.workers):
                w = MqttWorker(self.cfg.mqtt, self.cfg.topic_root, i, self.metrics, self.cfg.acks)
                w.dead_letter = self._dead_letter
                await w.connect()
                self.mqtt_workers.append(w)
        await self._prepare_database()
        if self.nats is not None:
            for i in range(self.cfg.workers):
                self._tasks.append(asyncio.create_task(self._guard(f"worker-{i}", self.nats.run_worker, i,
                                                                   self._handle, self.stop_event)))
            self._tasks.append(asyncio.create_task(self._lag_loop()))
        for i, w in enumerate(self.mqtt_workers):
            self._tasks.append(asyncio.create_task(self._guard(f"worker-{i}", w.run, self._handle, self.stop_event)))
        for p in self.posters:
            self._poster_tasks.append(asyncio.create_task(self._guard(p.name, p.run, self.stop_event)))
        self._tasks += self._poster_tasks
        self._tasks.append(asyncio.create_task(self._gauges_loop()))
        self.started = True
        log.info("erp.started", source=self.cfg.source, workers=self.cfg.workers, posters=len(self.posters),
                 http_port=self.http_port)
        return self

    async def _prepare_database(self) -> None:
        """Connect and create the tables, retrying for as long as it takes (capped, jittered exponential backoff):
        under systemd the database may come up after the service. Every server-side refusal is retried too (an
        unknown role or database, a wrong password, too many connections: each can be fixed on the server while the
        service waits). Only a connection string libpq refuses before contacting any server (``port=abc``,
        ``sslmode=bogus``) raises ``ConfigError``: retrying cannot fix it. An unparsable DSN never gets here (config
        validation). Cancel the task to give up (SIGTERM)."""
        pg = self.cfg.postgres
        params = conninfo_to_dict(pg.dsn)
        port = params.get("port")
        target = {"host": params.get("host") or params.get("hostaddr"),
                  "port": int(port) if port and port.isdigit() else port, "dbname": params.get("dbname")}  # no password
        timeout = {} if "connect_timeout" in params else {"connect_timeout": 10}  # a black-holed host
        backoff = Backoff(pg.backoff_initial_s, pg.backoff_max_s)
        t0, attempts, last = time.monotonic(), 0, ""
        while True:
            attempts += 1
            try:
                async with await psycopg.AsyncConnection.connect(pg.dsn, **timeout) as c:
                    await ensure_schema(c)
                break
            except psycopg.OperationalError as exc:
                error = " ".join(str(exc).split())[:500]
                if error.startswith("connection is bad: invalid "):
                    raise ConfigError(f"postgres.dsn: {error.removeprefix('connection is bad: ')} (libpq refuses "
                                      f"the connection string; retrying cannot fix it)") from None
                delay = round(backoff.next(), 2)
                self.waiting = {"for": "postgres", **target, "error": error, "attempts": attempts,
                                "retry_in_s": delay, "waiting_s": round(time.monotonic() - t0, 1)}
                if error != last:  # a state change, not every repeat (the current state is on /health)
                    log.warning("erp.postgres_unreachable", **target, error=error, attempt=attempts,
                                retry_in_s=delay)
                last = error
                await asyncio.sleep(delay)
        if attempts > 1:
            log.info("erp.postgres_reachable", **target, attempts=attempts,
                     waited_s=round(time.monotonic() - t0, 1))
        self.waiting = None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("ERP service not ready")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stop_event.set()
        # posters finish the row they are posting and give the rest of their claim back (not held for the lease
        # until a restart); bounded by one ERP request
        if self._poster_tasks:
            await asyncio.wait(self._poster_tasks, timeout=self.cfg.erp.timeout_s + 2)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._poster_tasks.clear()
        if self.nats is not None:
            await self.nats.close()
        for w in self.mqtt_workers:
            await w.close()
        for c in self._conns.values():
            await c.close()
        self._conns.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("erp.stopped")

    async def _guard(self, name: str, fn: Any, *args: Any) -> None:
        """Run a loop; an unexpected crash is logged and the loop restarted (never a silent dead worker)."""
        while not self.stop_event.is_set():
            try:
                await fn(*args)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("erp.task_crashed", task=name, error=f"{type(exc).__name__}: {exc}"[:500])
                await asyncio.sleep(1)

    # ------------------------------------------------------------------------------------------ processing
    async def _conn(self, index: int) -> psycopg.AsyncConnection[Any]:
        c = self._conns.get(index)
        if c is None or c.closed or c.broken:
            # autocommit: every Ledger.process() transaction is a real BEGIN/COMMIT, never a savepoint inside an
            # implicit transaction left open by some other statement (the broker ack relies on that commit)
            c = await psycopg.AsyncConnection.connect(self.cfg.postgres.dsn, autocommit=True)
            self._conns[index] = c
        return c

    async def _handle(self, index: int, topic: str, payload: bytes, redelivered: bool = False) -> list[Result]:
        try:
            conn = await self._conn(index)
            results = await self.ledger.process(conn, topic, payload, redelivered=redelivered)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self.metrics.db_retries.inc()
            c = self._conns.pop(index, None)
            if c is not None:
                await c.close()
            raise
        if any(r.outcome == "accepted" for r in results):
            for p in self.posters:
                p.kick.set()
        return results

    async def _dead_letter(self, index: int, topic: str, payload: bytes, error: str) -> None:
        conn = await self._conn(index)
        await self.ledger.dead_letter(conn, topic, payload, error)

    async def _lag_loop(self) -> None:
        while not self.stop_event.is_set():
            if self.nats is not None:
                lag = await self.nats.lag()
                if lag is not None:
                    self.metrics.consumer_lag.set(lag)
            await asyncio.sleep(2)

    async def _gauges_loop(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.cfg.postgres.dsn, autocommit=True)
                await self.refresh_gauges(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                conn = None
            await asyncio.sleep(2)

    async def refresh_gauges(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        """Outbox, held completions, open gaps and the gap alarm from the database (every 2 s)."""
        s = await self._db_status(conn)
        self.metrics.outbox_pending.set(s["outbox"].get("pending", 0))
        self.metrics.held.set(s["completions_held"])
        self.metrics.seqs_released.set(s["seqs_released"])
        self.metrics.seq_gaps.set(sum(g["missing"] for g in s["gaps"]))
        alarm = any(g["gap_age_s"] > self.cfg.gap_alarm_s for g in s["gaps"])
        if alarm and not self.metrics.gap_alarm._value.get():
            log.error("erp.seq_gap_alarm", gaps=s["gaps"][:10])
        self.metrics.gap_alarm.set(1 if alarm else 0)
        return s

    async def _db_status(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        cur = await conn.execute("SELECT state, count(*) FROM erp_outbox GROUP BY state")
        outbox = {s: n for s, n in await cur.fetchall()}
        cur = await conn.execute("SELECT count(*) FROM erp_events WHERE NOT applied")
        held = (await cur.fetchone())[0]  # type: ignore[index]
        cur = await conn.execute("SELECT count(*), coalesce(sum(duplicates), 0), coalesce(sum(redeliveries), 0) "
                                 "FROM erp_events")
        n_events, n_dups, n_redel = await cur.fetchone()  # type: ignore[misc]
        cur = await conn.execute("SELECT count(*) FROM erp_outbox WHERE found_by_lookup")
        found = (await cur.fetchone())[0]  # type: ignore[index]
        cur = await conn.execute("SELECT count(*) FROM erp_conflicts")
        conflicts = (await cur.fetchone())[0]  # type: ignore[index]
        cur = await conn.execute("SELECT count(*) FROM erp_releases")
        releases = (await cur.fetchone())[0]  # type: ignore[index]
        gaps = await self.ledger.gaps(conn)
        return {"events": n_events, "duplicates": int(n_dups), "duplicates_redelivered_by_broker": int(n_redel),
                "documents_found_by_lookup": found, "conflicts": conflicts, "outbox": outbox,
                "completions_held": held, "seqs_released": releases,
                "gaps": [{"source": s, "epoch": e, **g} for (s, e), g in gaps.items()]}

    async def ready(self) -> bool:
        return await self.not_ready_reason() is None

    async def not_ready_reason(self) -> str | None:
        if self.stop_event.is_set():
            return "stopping"
        if self.waiting is not None:
            return f"waiting for PostgreSQL: {self.waiting['error']}"
        if not self.started:
            return "starting"  # e.g. the durable interest is there, the tables are being created
        if self.cfg.source == "nats":
            if self.nats is None or not self.nats.ready or self.nats.nc is None or not self.nats.nc.is_connected:
                return "NATS consumer not connected"
        elif not self.mqtt_workers or not all(w.ready for w in self.mqtt_workers):
            return "MQTT workers not subscribed"
        try:
            async with await psycopg.AsyncConnection.connect(self.cfg.postgres.dsn, connect_timeout=2) as c:
                await c.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"database: {' '.join(str(exc).split())}"[:300]
        return None

    # ------------------------------------------------------------------------------------------ HTTP
    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._h_health)
        app.router.add_get("/ready", self._h_ready)
        app.router.add_get("/status", self._h_status)
        app.router.add_get("/metrics", self._h_metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.http.host, self.cfg.http.port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("erp.http_listening", host=self.cfg.http.host, port=self.http_port)

    async def _h_health(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok", "uptime_s": round(time.time() - self.started_at, 1)}
        if self.waiting is not None:
            body["waiting"] = self.waiting
        return web.json_response(body)

    async def _h_ready(self, request: web.Request) -> web.Response:
        reason = await self.not_ready_reason()
        if reason is None:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)

    async def _h_status(self, request: web.Request) -> web.Response:
        try:
            async with await psycopg.AsyncConnection.connect(self.cfg.postgres.dsn, connect_timeout=2) as c:
                body = await self._db_status(c)
        except psycopg.Error as exc:
            return web.json_response({"error": f"database: {exc}"[:300]}, status=503)
        body["source"] = self.cfg.source
        body["posters_healthy"] = all(p.healthy for p in self.posters)
        if self.nats is not None:
            body["consumer_lag"] = await self.nats.lag()
        return web.Response(text=json.dumps(body, default=str), content_type="application/json")

    async def _h_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
