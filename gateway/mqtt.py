"""A thin asyncio driver for paho-mqtt, and the outbox publisher.

Why not aiomqtt: its ``publish()`` is one awaitable per message (a future and usually a task each), and it hides
the message ids we need to delete outbox rows in batches. Here paho's socket is driven by the asyncio loop (no
network thread, no lock contention), PUBACKs arrive as plain callbacks, and a sliding window of in-flight QoS 1
messages is kept by the publisher. One paho ``Client`` per connection: after a disconnect the old client, with
whatever it still held in flight, is dropped, and the publisher resends from the outbox (duplicates are expected
with QoS 1 and are recognised by event id).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from connectors.base import Backoff, ComponentState, ComponentStatus
from gateway.config import MqttConfig
from gateway.store import PendingRow, Store, StoreError

log = structlog.get_logger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]


class MqttLink:
    """Keeps one MQTT connection up; exposes publish() and PUBACK / message callbacks."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        online: tuple[str, bytes] | None = None,
        subscriptions: list[str] | None = None,
        on_message: MessageHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._password = password
        self.will = will
        self.online = online
        self.subscriptions = subscriptions or []
        self.on_message = on_message
        self.on_puback: Callable[[int, str | None], None] = lambda mid, refused: None
        self.status = ComponentStatus()
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections = 0

    # ----------------------------------------------------------------- public
    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message on the current connection; returns its mid, or None when not connected."""
        c = self._client
        if c is None or not self.connected.is_set():
            return None
        info = c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def run(self) -> None:
        """Connect, stay connected, reconnect with backoff. Runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        # a broker on the plant network is cheap to retry: cap the wait at 1 s so a restarted broker gets the
        # backlog within ~1 s (bench/backlog.py measures time to first PUBACK after a broker restart)
        backoff = Backoff(0.1, 1.0)
        while True:
            try:
                await self._connect_once()
                backoff.reset()
                await self._lost.wait()
            except asyncio.CancelledError:
                await self._close(graceful=True)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: not connected, retry
                if self.status.set(ComponentState.DISCONNECTED, str(exc)):
                    log.error("mqtt.connect_failed", host=self.cfg.host, port=self.cfg.port, error=str(exc))
            await self._close(graceful=False)
            await asyncio.sleep(backoff.next())

    # ----------------------------------------------------------------- internals
    def _make_client(self) -> paho.Client:
        if self.cfg.protocol == "5":
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        else:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                            protocol=paho.MQTTv311)
        c.max_inflight_messages_set(max(self.cfg.max_inflight, 20))  # the publisher keeps its own, smaller window
        c.max_queued_messages_set(0)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self._password)
        if self.cfg.tls.enabled:
            ctx = ssl.create_default_context(cafile=self.cfg.tls.ca_file)
            if self.cfg.tls.cert_file:
                ctx.load_cert_chain(self.cfg.tls.cert_file, self.cfg.tls.key_file)
            c.tls_set_context(ctx)
        if self.will:
            c.will_set(self.will[0], self.will[1], qos=1, retain=True)
        loop = self._loop
        assert loop is not None

        loop_thread = threading.get_ident()

        def on_loop(fn: Callable[..., Any], *args: Any) -> None:
            # paho calls these from the executor thread during reconnect(); the selector is not thread-safe
            if threading.get_ident() == loop_thread:
                fn(*args)
            else:
                loop.call_soon_threadsafe(fn, *args)

        def sock_open(client: paho.Client, userdata: Any, sock: Any) -> None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            on_loop(loop.add_reader, sock, client.loop_read)

        def sock_close(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(loop.remove_reader, sock)
            on_loop(loop.remove_writer, sock)

        def reg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(loop.add_writer, sock, client.loop_write)

        def unreg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(loop.remove_writer, sock)

        c.on_socket_open = sock_open
        c.on_socket_close = sock_close
        c.on_socket_register_write = reg_write
        c.on_socket_unregister_write = unreg_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    async def _connect_once(self) -> None:
        assert self._loop is not None
        self._lost.clear()
        self.connected.clear()
        client = self._make_client()
        self._client = client
        client.connect_timeout = 5.0
        if self.cfg.protocol == "5":
            client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, clean_start=True)
        else:
            client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        # the TCP (and TLS) handshake blocks: run it off the loop, bounded by connect_timeout
        await asyncio.wait_for(self._loop.run_in_executor(None, client.reconnect), timeout=15)
        misc = asyncio.create_task(self._misc_loop(client), name="mqtt.misc")
        try:
            await asyncio.wait_for(self._wait_connack(), timeout=10)
        except BaseException:
            misc.cancel()
            raise
        self._misc = misc

    async def _wait_connack(self) -> None:
        connected = asyncio.create_task(self.connected.wait())
        lost = asyncio.create_task(self._lost.wait())
        done, pending = await asyncio.wait({connected, lost}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if not self.connected.is_set():
            raise ConnectionError(self._last_reason or "connection refused")

    _last_reason: str | None = None
    _misc: asyncio.Task[None] | None = None

    async def _misc_loop(self, client: paho.Client) -> None:
        while True:
            await asyncio.sleep(0.5)
            if client.loop_misc() != paho.MQTT_ERR_SUCCESS and not self._lost.is_set():
                self._mark_lost("keepalive or socket failure")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return
        if reason.is_failure:
            self._last_reason = f"broker refused the connection: {reason}"
            self._mark_lost(self._last_reason)
            return
        self.connections += 1
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        if self.online:
            client.publish(self.online[0], self.online[1], qos=1, retain=True)
        self.connected.set()
        if self.status.set(ComponentState.CONNECTED):
            log.info("mqtt.connected", host=self.cfg.host, port=self.cfg.port, client_id=self.client_id)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is self._client:
            self._mark_lost(f"disconnected: {reason}")

    def _mark_lost(self, why: str) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._lost.set()
        if self.status.set(ComponentState.DISCONNECTED, why) and was:
            log.error("mqtt.disconnected", host=self.cfg.host, port=self.cfg.port, reason=why)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if client is self._client:
            # MQTT 5: a PUBACK can refuse the message (reason code >= 0x80); 3.1.1 has no such signal
            refused = str(reason) if reason is not None and getattr(reason, "is_failure", False) else None
            self.on_puback(mid, refused)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(msg.topic, msg.payload, msg.retain)

    async def _close(self, *, graceful: bool) -> None:
        client, self._client = self._client, None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self.connected.clear()
        if client is None:
            return
        try:
            if graceful:
                # publish the offline status ourselves: the will is only sent on an unclean disconnect
                if self.will and client.is_connected():
                    client.publish(self.will[0], self.will[1], qos=1, retain=True)
                client.disconnect()
                client.loop_write()
            sock = client.socket()
            if sock is not None:
                self._loop.remove_reader(sock)  # type: ignore[union-attr]
                self._loop.remove_writer(sock)  # type: ignore[union-attr]
                sock.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


STRIKES = 3


class _Lane:
    """A cursor over a range of outbox ids, read ahead in pages."""

    def __init__(self, name: str, after: int, upto: int | None) -> None:
        self.name = name
        self.cursor = after
        self.upto = upto
        self.buffer: collections.deque[PendingRow] = collections.deque()
        self.exhausted = False

    @property
    def done(self) -> bool:
        return self.upto is not None and self.exhausted and not self.buffer


class _TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = min(rate, 1000.0)
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_time(self) -> float:
        return max(0.001, (1 - self.tokens) / self.rate)


class Publisher:
    """Publishes the outbox with a sliding window of unacknowledged QoS 1 messages.

    Two lanes per connection: the *backlog* (rows committed before this connection came up, oldest first, at most
    ``backlog_rate`` events/s when set) and the *live* lane (rows committed since, published first so fresh events
    keep a low latency during a long drain). Within each lane rows go out in id order, so each machine's events keep
    their order within a lane; the ``seq`` extension gives the total order across lanes. A row is deleted only after
    its PUBACK. On a lost connection the in-flight set is forgotten and both lanes restart from the oldest row still
    in the outbox (at-least-once; event ids make duplicates recognisable). A row larger than ``max_message_bytes``
    or refused by an MQTT 5 PUBACK is moved to the quarantine and does not block the rows behind it.
    With ``batch_max`` > 1, consecutive events of one machine go out as one CloudEvents batch message (a JSON array,
    ``application/cloudevents-batch+json``) on ``.../{machine}/events/batch``: the per-message cost of the MQTT client
    is paid once per batch.
    """

    def __init__(self, store: Store, link: MqttLink, *, window: int = 100, fetch_size: int = 1000,
                 ack_interval: float = 0.01, backlog_rate: float = 0.0, max_message_bytes: int = 256 * 1024,
                 batch_max: int = 0) -> None:
        self.store = store
        self.link = link
        self.window = window
        self.fetch_size = fetch_size
        self.ack_interval = ack_interval
        self.backlog_rate = backlog_rate
        self.max_message_bytes = max_message_bytes
        self.batch_max = batch_max
        self._wake = asyncio.Event()
        self._inflight: dict[int, tuple[PendingRow, ...]] = {}
        self._acked: list[tuple[int, int]] = []
        self._refused: list[tuple[PendingRow, str]] = []
        self._gen = 0
        self._live: _Lane | None = None
        self._backlog: _Lane | None = None
        self.published = 0
        self.acked = 0
        self.quarantined = 0
        self.backlog_remaining = 0
        self.last_ack_time: float | None = None
        self._ack_error_logged = False
        self._strikes: dict[int, int] = {}  # row id -> connections lost while it was in flight
        link.on_puback = self._on_puback

    def notify(self) -> None:
        """New rows were committed."""
        self._gen += 1
        if self._live is not None:
            self._live.exhausted = False
        self._wake.set()

    def _on_puback(self, mid: int, refused: str | None) -> None:
        rows = self._inflight.pop(mid, None)
        if rows is None:
            return
        for row in rows:
            if self._strikes:
                self._strikes.pop(row.id, None)
            if refused is None:
                self._acked.append((row.id, len(row.payload)))
            else:
                self._refused.append((row, f"broker refused: {refused}"))
        self._wake.set()

    async def run(self) -> None:
        flusher = asyncio.create_task(self._ack_loop(), name="publisher.acks")
        try:
            while True:
                await self.link.connected.wait()
                await self._session()
        finally:
            flusher.cancel()
            try:
                await self.flush_acks()
            except Exception:  # noqa: BLE001 - best effort at shutdown; unacked rows are resent
                pass

    async def _session(self) -> None:
        await self.flush_acks()
        self._inflight.clear()
        boundary = await self.store.max_id()
        self._backlog = _Lane("backlog", 0, boundary)
        self._live = _Lane("live", boundary, None)
        self._bucket = _TokenBucket(self.backlog_rate) if self.backlog_rate > 0 else None
        lost = asyncio.create_task(self.link.wait_lost())
        try:
            while self.link.is_connected:
                self._wake.clear()
                progressed, throttled = await self._fill()
                if not self.link.is_connected:
                    break
                if not progressed:
                    waiter = asyncio.create_task(self._wake.wait())
                    timeout = self._bucket.wait_time() if throttled and self._bucket else 1.0
                    await asyncio.wait({waiter, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if self._live is not None:
                        self._live.exhausted = False  # poll now and then: rows may come from `buffer retry`
        finally:
            lost.cancel()
        poison = self._strike([r for rows in self._inflight.values() for r in rows])
        self._inflight.clear()
        self._live = self._backlog = None
        if poison is not None:
            await self._quarantine(poison, f"the broker closed the connection {STRIKES} times while this event was "
                                           "the oldest in flight (refused: too large, or not allowed)")

    def _strike(self, inflight: list[PendingRow]) -> PendingRow | None:
        """A broker that refuses a message over MQTT 3.1.1 (or mosquitto over 5) just drops the connection. The row
        that is still the oldest unacknowledged one after STRIKES dropped connections is a poison row."""
        for row in inflight:
            self._strikes[row.id] = self._strikes.get(row.id, 0) + 1
        if not inflight:
            return None
        oldest = min(inflight, key=lambda r: r.id)
        if self._strikes.get(oldest.id, 0) >= STRIKES:
            self._strikes.pop(oldest.id, None)
            return oldest
        return None

    async def _next(self, lane: _Lane) -> PendingRow | None:
        if not lane.buffer:
            if lane.exhausted:
                return None
            gen = self._gen
            rows = await self.store.fetch(lane.cursor, self.fetch_size, lane.upto)
            if not rows:
                lane.exhausted = lane.upto is not None or gen == self._gen  # a commit during the fetch: look again
                return None
            lane.buffer.extend(rows)
            lane.cursor = rows[-1].id
        return lane.buffer[0]

    async def _fill(self) -> tuple[bool, bool]:
        sent = 0
        throttled = False
        for lane in (self._live, self._backlog):
            if lane is None:
                continue
            while len(self._inflight) < self.window and self.link.is_connected:
                if lane is self._backlog and self._bucket is not None and not self._bucket.take():
                    throttled = True
                    break
                row = await self._next(lane)
                if row is None:
                    break
                if len(row.payload) > self.max_message_bytes:
                    lane.buffer.popleft()
                    await self._quarantine(row, f"too large: {len(row.payload)} bytes > mqtt.max_message_bytes "
                                                f"{self.max_message_bytes}")
                    continue
                if self.batch_max > 1:
                    rows = self._take_batch(lane, throttle=lane is self._backlog)
                    topic = row.topic.rpartition("/events/")[0] + "/events/batch"
                    payload = b"[" + b",".join(r.payload for r in rows) + b"]"
                else:
                    rows, topic, payload = (row,), row.topic, row.payload
                mid = self.link.publish(topic, payload)
                if mid is None:
                    return sent > 0, throttled
                for _ in rows:
                    lane.buffer.popleft()
                self._inflight[mid] = rows
                self.published += len(rows)
                sent += len(rows)
        if self._backlog is not None:
            self.backlog_remaining = len(self._backlog.buffer) + (0 if self._backlog.exhausted else 1)
            if self._backlog.done:
                self._backlog = None
                self.backlog_remaining = 0
                log.info("publisher.backlog_drained")
        return sent > 0, throttled

    def _take_batch(self, lane: _Lane, *, throttle: bool) -> tuple[PendingRow, ...]:
        """Buffered rows of the machine of the first row, in order, up to batch_max events and max_message_bytes:
        one CloudEvents batch message (a JSON array) on ``.../{machine}/events/batch``. Rows of other machines are
        skipped, not passed: each machine's events keep their order; the batch is removed from the buffer."""
        first = lane.buffer[0]
        prefix = first.topic.rpartition("/events/")[0]
        rows = [first]
        keep: list[PendingRow] = []
        size = len(first.payload) + 2
        it = itertools.islice(lane.buffer, 1, None)
        for r in it:
            if r.topic.rpartition("/events/")[0] != prefix:
                keep.append(r)
                continue
            if len(rows) >= self.batch_max or size + len(r.payload) + 1 > self.max_message_bytes or (
                    throttle and self._bucket is not None and not self._bucket.take()):
                keep.append(r)
                break
            rows.append(r)
            size += len(r.payload) + 1
        keep.extend(it)
        # leave the batch at the front (the caller pops len(rows) after a successful publish), the rest in order
        lane.buffer.clear()
        lane.buffer.extend(rows)
        lane.buffer.extend(keep)
        return tuple(rows)

    async def _quarantine(self, row: PendingRow, reason: str) -> None:
        try:
            if await self.store.quarantine(row.id, reason):
                self.quarantined += 1
                log.error("publisher.quarantined", row=row.id, topic=row.topic, reason=reason)
        except StoreError as exc:
            log.error("publisher.quarantine_failed", row=row.id, error=str(exc))

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            if self._refused:
                refused, self._refused = self._refused, []
                for row, reason in refused:
                    await self._quarantine(row, reason)
            if self._acked:
                await self.flush_acks()

    async def flush_acks(self) -> None:
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            await self.store.ack(acked)
        except StoreError as exc:
            # e.g. a full disk: keep them and retry; worst case they are re-published after a restart (same ids)
            self._acked = acked + self._acked
            if not self._ack_error_logged:
                self._ack_error_logged = True
                log.error("publisher.ack_failed", error=str(exc), pending_acks=len(self._acked))
            return
        if self._ack_error_logged:
            self._ack_error_logged = False
            log.info("publisher.ack_recovered")
        self.acked += len(acked)
        self.last_ack_time = time.time()

    @property
    def inflight(self) -> int:
        return len(self._inflight)
