"""Where the events come from: a NATS JetStream durable pull consumer, or an MQTT 5 shared subscription.

Both hand each broker message to ``handle(topic, payload) -> list[Result]`` (the PostgreSQL transaction) and
acknowledge the message **only after it returned** (the commit happened). A message whose processing raised is not
acknowledged: the broker redelivers it (JetStream after a NAK delay / ack_wait, MQTT on the next connection).

NATS: the gateways publish over MQTT to the cluster's MQTT endpoints; the NATS server stores QoS 1 messages in the
JetStream stream ``$MQTT_msgs`` (subjects ``$MQTT.msgs.<topic with / as .>``, interest retention, replicas =
``mqtt.stream_replicas``). The service reads that stream natively with ONE durable pull consumer shared by every
worker of every process; the consumer must exist before the gateways publish (interest retention: a message nobody
has interest in is dropped right after the PUBACK). See docs/erp-service.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any, Awaitable, Callable

import structlog

from erp_service.config import MqttSourceConfig, NatsSourceConfig
from erp_service.ledger import Result
from erp_service.metrics import Metrics

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """A URL (or a text holding URLs) without the user and password of each: ``nats://erp:pw@host`` -> ``nats://***@host``
    (what a log line may show)."""
    return _USERINFO.sub("***@", text)

log = structlog.get_logger(__name__)

Handler = Callable[[int, str, bytes, bool], Awaitable[list[Result]]]


def acks_topic(topic: str) -> str | None:
    """``.../{machine}/events/{type}`` → ``.../{machine}/acks``."""
    base, sep, _ = topic.rpartition("/events/")
    return f"{base}/acks" if sep else None


def ack_payloads(results: list[Result], mode: str) -> list[bytes]:
    out = []
    for r in results:
        if mode == "none" or (mode == "rejected" and r.outcome in ("accepted", "duplicate")):
            continue
        if r.id is None or (r.outcome in ("rejected", "conflict") and r.event is None):
            continue  # nothing the gateway could match (not JSON, no id): recorded in erp_rejected only
        out.append(json.dumps(r.ack(), default=str).encode())
    return out


# ---------------------------------------------------------------------------------------------------- NATS
async def cancel_until_done(task: asyncio.Future[Any], within: float = 5.0) -> bool:
    """Cancel ``task`` and keep cancelling it (every 0.1 s) until it is done or ``within`` seconds have passed, for a
    library coroutine that may swallow one cancellation. True when it is done (cancelled, failed or finished)."""
    deadline = time.monotonic() + within
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a failed attempt after a stop is of no interest
    return task.done()


class NatsSource:
    """One NATS connection per process; ``workers`` tasks pull from the shared durable consumer."""

    def __init__(self, cfg: NatsSourceConfig, topic_root: str, metrics: Metrics, acks: str) -> None:
        self.cfg = cfg
        self.topic_root = topic_root
        self.metrics = metrics
        self.acks = acks
        self.nc: Any = None
        self.js: Any = None
        self.ready = False
        self.filter_subject = f"{cfg.subject_prefix}{topic_root}.v1.*.*.*.*.*.events.>"
        #: after this many failed deliveries of one message (not a database outage) it goes to dead_letter
        self.max_attempts = 10
        self.dead_letter: Callable[[int, str, bytes, str], Awaitable[None]] | None = None
        self._failure_log = OutageLog()

    async def connect(self) -> None:
        import nats

        last_error: list[str] = []

        async def _err(exc: Exception) -> None:
            # nats-py calls this on every failed attempt (every reconnect_time_wait): log a change, not each repeat
            text = str(exc)[:300]
            if last_error != [text]:
                last_error[:] = [text]
                log.warning("erp.nats_error", error=redact(text), servers=[redact(u) for u in self.cfg.servers])

        async def _disc() -> None:
            log.warning("erp.nats_disconnected")

        async def _reconn() -> None:
            last_error.clear()
            url = self.nc.connected_url if self.nc else None
            log.info("erp.nats_reconnected", server=f"{url.hostname}:{url.port}" if url is not None else "")

        log.info("erp.nats_connecting", servers=[redact(u) for u in self.cfg.servers])
        # nats-py retries an unreachable server for ever here, and swallows a cancellation that lands while it closes
        # a failed attempt (Client._close): a SIGTERM during start would then never end it. Cancelled, the attempt
        # is cancelled again until it ends (see cancel_until_done).
        auth = self.cfg.auth()  # ConfigError: the password cannot be read (erp.config_invalid)
        connecting = asyncio.ensure_future(nats.connect(
            servers=self.cfg.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=_err,
            disconnected_cb=_disc, reconnected_cb=_reconn, name="edge-gateway-erp", **auth))
        try:
            self.nc = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            if not await cancel_until_done(connecting):
                log.warning("erp.nats_connect_abandoned", servers=[redact(u) for u in self.cfg.servers])
            elif not connecting.cancelled() and connecting.exception() is None:
                await connecting.result().close()  # connected just as the stop came
            raise
        self.js = self.nc.jetstream(timeout=10)
        await self.ensure_consumer()
        self.ready = True

    async def ensure_consumer(self, timeout: float = 60.0) -> None:
        """Create (or keep) the durable consumer; if the MQTT streams do not exist yet, make the server create them
        (one MQTT connection to an endpoint) and wait."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        deadline = time.monotonic() + timeout
        poked = False
        while True:
            try:
                await self.js.stream_info(self.cfg.stream)
                break
            except NotFoundError:
                if not poked and self.cfg.mqtt_endpoints:
                    await asyncio.to_thread(_poke_mqtt, self.cfg.mqtt_endpoints)
                    poked = True
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JetStream stream {self.cfg.stream!r} does not exist (no MQTT client has "
                                       f"connected yet and no nats.mqtt_endpoints configured)") from None
                log.info("erp.stream_missing", stream=self.cfg.stream)
                await asyncio.sleep(0.5)
            except Exception as exc:  # no JetStream leader yet (cluster starting), timeouts
                if time.monotonic() > deadline:
                    raise
                log.info("erp.stream_unavailable", stream=self.cfg.stream, error=str(exc)[:200])
                await asyncio.sleep(0.5)
        cc = ConsumerConfig(durable_name=self.cfg.durable, ack_policy=AckPolicy.EXPLICIT,
                            deliver_policy=DeliverPolicy.ALL, filter_subject=self.filter_subject,
                            ack_wait=self.cfg.ack_wait_s, max_ack_pending=self.cfg.max_ack_pending,
                            max_deliver=-1)
        while True:
            try:
                await self.js.add_consumer(self.cfg.stream, cc)
                log.info("erp.consumer_ready", stream=self.cfg.stream, durable=self.cfg.durable,
                         filter=self.filter_subject)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("erp.consumer_unavailable", error=str(exc)[:200])
                await asyncio.sleep(0.5)

    def topic_of(self, subject: str) -> str:
        return subject[len(self.cfg.subject_prefix):].replace(".", "/")

    async def run_worker(self, index: int, handle: Handler, stop: asyncio.Event) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        sub = None
        while not stop.is_set():
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe_bind(self.cfg.durable, self.cfg.stream)
                try:
                    msgs = await sub.fetch(self.cfg.batch, timeout=1.0)
                except (NatsTimeout, asyncio.TimeoutError):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # cluster leader change, node loss: retry
                log.warning("erp.fetch_failed", worker=index, error=f"{type(exc).__name__}: {exc}"[:300])
                sub = None
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                topic = self.topic_of(msg.subject)
                delivered = getattr(getattr(msg, "metadata", None), "num_delivered", 1) or 1
                try:
                    results = await handle(index, topic, msg.data, delivered > 1)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.metrics.processing_errors.inc()
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    self._failure_log.failed(exc, worker=index, topic=topic, error=error)
                    if delivered >= self.max_attempts and self.dead_letter is not None and not _is_outage(exc):
                        try:
                            await self.dead_letter(index, topic, msg.data, error)
                            await msg.ack()
                            continue
                        except Exception as exc2:
                            log.error("erp.dead_letter_failed", worker=index, error=str(exc2)[:300])
                    try:
                        await msg.nak(delay=1)
                    except Exception:
                        pass
                    continue
                try:
                    await msg.ack()
                except Exception as exc:  # redelivered later: a duplicate the dedup absorbs
                    log.warning("erp.ack_failed", worker=index, error=str(exc)[:200])
                await self._answer(topic, results)

    async def _answer(self, topic: str, results: list[Result]) -> None:
        t = acks_topic(topic)
        if t is None:
            return
        subject = t.replace("/", ".")
        for body in ack_payloads(results, self.acks):
            try:
                await self.nc.publish(subject, body)
            except Exception as exc:
                log.warning("erp.ack_publish_failed", subject=subject, error=str(exc)[:200])

    async def lag(self) -> int | None:
        try:
            info = await self.js.consumer_info(self.cfg.stream, self.cfg.durable)
        except Exception:
            return None
        return int(info.num_pending) + int(info.num_ack_pending)

    async def close(self) -> None:
        self.ready = False
        if self.nc is not None:
            try:
                async with asyncio.timeout(5):
                    await self.nc.drain()
            except Exception:
                try:
                    await self.nc.close()
                except Exception:
                    pass
            self.nc = None


class OutageLog:
    """``erp.processing_failed`` for a database outage: every message fails the same way (about every 0.5 s per
    worker while the database is away), so the first failure is logged, then one line per ``interval_s`` with how
    many were not logged meanwhile (``suppressed``). Other failures are logged every time. The metric
    ``processing_errors`` counts every failure either way."""

    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[Any, float] = {}
        self._suppressed: dict[Any, int] = {}

    def failed(self, exc: BaseException, **fields: Any) -> None:
        if not _is_outage(exc):
            log.error("erp.processing_failed", **fields)
            return
        key = (fields.get("worker"), type(exc).__name__)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        log.error("erp.processing_failed", outage=True, suppressed=self._suppressed.pop(key, 0),
                  repeats_logged_every_s=self.interval_s, **fields)


def _is_outage(exc: BaseException) -> bool:
    import psycopg

    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, ConnectionError, OSError))


def _poke_mqtt(endpoints: list[str]) -> None:
    """Connect once over MQTT so that the NATS server creates its MQTT streams ($MQTT_msgs, ...)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-erp-init-{int(time.time() * 1000)}",
                        clean_session=True, protocol=mqtt.MQTTv311)
        done = threading.Event()
        c.on_connect = lambda *a: done.set()
        try:
            c.connect(host or "127.0.0.1", int(port), keepalive=10)
            c.loop_start()
            done.wait(15)
            c.disconnect()
            c.loop_stop()
            if done.is_set():
                log.info("erp.mqtt_streams_initialised", endpoint=ep)
                return
        except OSError as exc:
            log.warning("erp.mqtt_init_failed", endpoint=ep, error=str(exc))


# ---------------------------------------------------------------------------------------------------- MQTT
class MqttWorker:
    """One MQTT 5 client in the shared-subscription group; messages are handled one at a time and PUBACKed after
    the commit (paho manual_ack). Persistent session: QoS 1 messages wait at the broker while it is away."""

    def __init__(self, cfg: MqttSourceConfig, topic_root: str, index: int, metrics: Metrics, acks: str) -> None:
        self.cfg = cfg
        self.index = index
        self.metrics = metrics
        self.acks = acks
        self.filter = f"$share/{cfg.group}/{topic_root}/v1/+/+/+/+/+/events/#"
        self.client_id = f"{cfg.client_id_prefix}-{index}"
        self._client: Any = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.subscribed = threading.Event()
        self.max_attempts = 10
        self.dead_letter: Callable[[int, str, bytes, str], Awaitable[None]] | None = None
        self._failures: dict[int, int] = {}
        self._failure_log = OutageLog()

    @property
    def ready(self) -> bool:
        return self.subscribed.is_set()

    async def connect(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._loop = asyncio.get_running_loop()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(0.1, 2)
        c.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, clean_start=False,
                        properties=props)
        c.loop_start()
        self._client = c

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("erp.mqtt_connect_failed", worker=self.index, reason=str(rc))
            return
        client.subscribe(self.filter, qos=1)
        log.info("erp.mqtt_connected", worker=self.index, session_present=getattr(flags, "session_present", None))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        if any(r.is_failure for r in rcs):
            log.error("erp.mqtt_subscribe_failed", worker=self.index, reasons=[str(r) for r in rcs])
            return
        self.subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.subscribed.clear()
        log.info("erp.mqtt_disconnected", worker=self.index, reason=str(rc))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, msg)

    async def run(self, handle: Handler, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.5):  # not wait_for: it can swallow the stop's cancellation (3.11)
                    msg = await self._queue.get()
            except TimeoutError:
                continue
            try:
                results = await handle(self.index, msg.topic, msg.payload, bool(msg.dup))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not acknowledged: redelivered on the next connection
                self.metrics.processing_errors.inc()
                error = f"{type(exc).__name__}: {exc}"[:500]
                self._failure_log.failed(exc, worker=self.index, topic=msg.topic, error=error)
                key = hash((msg.topic, bytes(msg.payload)))
                self._failures[key] = self._failures.get(key, 0) + 1
                if self._failures[key] >= self.max_attempts and self.dead_letter is not None and not _is_outage(exc):
                    try:
                        await self.dead_letter(self.index, msg.topic, msg.payload, error)
                        self._failures.pop(key, None)
                        self._client.ack(msg.mid, msg.qos)
                        continue
                    except Exception as exc2:
                        log.error("erp.dead_letter_failed", worker=self.index, error=str(exc2)[:300])
                await self._reconnect()
                continue
            self._client.ack(msg.mid, msg.qos)
            t = acks_topic(msg.topic)
            if t is not None:
                for body in ack_payloads(results, self.acks):
                    self._client.publish(t, body, qos=1)

    async def _reconnect(self) -> None:
        """Drop the connection so the broker redelivers the unacknowledged message (MQTT has no NAK)."""
        self.subscribed.clear()
        while not self._queue.empty():
            self._queue.get_nowait()  # redelivered after the reconnect
        c = self._client

        def _cycle() -> None:
            c.disconnect()
            c.loop_stop()
            time.sleep(0.5)
            c.reconnect()
            c.loop_start()

        try:
            await asyncio.to_thread(_cycle)
        except OSError as exc:  # broker away: paho's loop keeps retrying
            log.warning("erp.mqtt_reconnect_failed", worker=self.index, error=str(exc))
            c.loop_start()

    async def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            def _shutdown() -> None:
                c.disconnect()
                c.loop_stop()
            await asyncio.to_thread(_shutdown)
