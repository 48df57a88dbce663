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
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from connectors.base import Backoff, ComponentState, ComponentStatus
from gateway.config import MqttConfig
from gateway.store import PendingRow, Store

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
        self.on_puback: Callable[[int], None] = lambda mid: None
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
        backoff = Backoff(0.1, 5.0)
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

        def sock_open(client: paho.Client, userdata: Any, sock: Any) -> None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            loop.call_soon_threadsafe(loop.add_reader, sock, client.loop_read)

        def sock_close(client: paho.Client, userdata: Any, sock: Any) -> None:
            loop.remove_reader(sock)
            loop.remove_writer(sock)

        def reg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            loop.add_writer(sock, client.loop_write)

        def unreg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            loop.remove_writer(sock)

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
            self.on_puback(mid)

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


class Publisher:
    """Publishes the outbox in id order with a sliding window of unacknowledged QoS 1 messages.

    A row is deleted only after its PUBACK. On a lost connection the in-flight set is forgotten and publishing
    resumes from the oldest row still in the outbox (at-least-once; ids make duplicates recognisable).
    """

    def __init__(self, store: Store, link: MqttLink, *, window: int = 100, fetch_size: int = 1000,
                 ack_interval: float = 0.01) -> None:
        self.store = store
        self.link = link
        self.window = window
        self.fetch_size = fetch_size
        self.ack_interval = ack_interval
        self._wake = asyncio.Event()
        self._inflight: dict[int, int] = {}
        self._acked: list[int] = []
        self._buffer: collections.deque[PendingRow] = collections.deque()
        self._cursor = 0
        self._exhausted = False
        self._gen = 0
        self.published = 0
        self.acked = 0
        self.last_ack_time: float | None = None
        link.on_puback = self._on_puback

    def notify(self) -> None:
        """New rows were committed."""
        self._gen += 1
        self._exhausted = False
        self._wake.set()

    def _on_puback(self, mid: int) -> None:
        row_id = self._inflight.pop(mid, None)
        if row_id is not None:
            self._acked.append(row_id)
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
        self._buffer.clear()
        self._cursor = 0
        self._exhausted = False
        lost = asyncio.create_task(self.link.wait_lost())
        try:
            while self.link.is_connected:
                self._wake.clear()
                progressed = await self._fill()
                if not self.link.is_connected:
                    break
                if not progressed:
                    waiter = asyncio.create_task(self._wake.wait())
                    await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
        finally:
            lost.cancel()
        self._inflight.clear()
        self._buffer.clear()

    async def _fill(self) -> bool:
        sent = 0
        while len(self._inflight) < self.window:
            if not self._buffer:
                if self._exhausted:
                    break
                gen = self._gen
                rows = await self.store.fetch(self._cursor, self.fetch_size)
                if not rows:
                    self._exhausted = gen == self._gen  # a commit during the fetch means: look again
                    break
                self._buffer.extend(rows)
                self._cursor = rows[-1].id
                if not self.link.is_connected:
                    return False
            row = self._buffer[0]
            mid = self.link.publish(row.topic, row.payload)
            if mid is None:
                return False
            self._buffer.popleft()
            self._inflight[mid] = row.id
            self.published += 1
            sent += 1
        return sent > 0

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            if self._acked:
                await self.flush_acks()

    async def flush_acks(self) -> None:
        if not self._acked:
            return
        ids, self._acked = self._acked, []
        await self.store.ack(ids)
        self.acked += len(ids)
        self.last_ack_time = time.time()

    @property
    def inflight(self) -> int:
        return len(self._inflight)
