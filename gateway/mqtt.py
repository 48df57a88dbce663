"""A thin asyncio driver for paho-mqtt, and the outbox publisher.

Why not aiomqtt: its ``publish()`` is one awaitable per message (a future and usually a task each), and it hides
the message ids we need to delete outbox rows in batches. Here paho's socket is driven by the asyncio loop (no
network thread, no lock contention), PUBACKs arrive as plain callbacks, and a sliding window of in-flight QoS 1
messages is kept by the publisher. With the paho version it was checked against, the client is
:class:`gateway.paho_fast.FastClient`: QoS 1 publishes without paho's per-message objects, written in one ``send()``
per burst, PUBACKs read in bulk and the success PUBACK reported without a ``ReasonCode`` / ``Properties`` (every
other packet, refusals included, is decoded by paho itself).

Connections
-----------
One paho ``Client`` per connection, wrapped in a :class:`Connection` with its own ``id`` (1, 2, ... per link). paho
numbers the messages of every new client from 1 again, so a message id means nothing without its connection: the
link publishes only on the connection the caller names (``publish(..., connection=conn)`` returns None when that
connection is gone), and reports every PUBACK as ``on_puback(connection_id, mid, reason_code)``. The publisher keeps
its in-flight map in a session object that belongs to one connection and is discarded with it; a PUBACK of any other
connection is ignored. After a disconnect the publisher resends from the outbox (duplicates are expected with QoS 1
and are recognised by event id).

PUBACK reason codes (MQTT 5; MQTT 3.1.1 has none: a broker refusal there is a dropped connection, or worse, a positive
PUBACK for a message it discarded, e.g. mosquitto's ACL denial)
--------------------------------------------------------------------------------------------------------------------
A row is moved to the quarantine only on evidence against *that row*; a dropped connection is no evidence (a flapping
WAN drops connections with good events in flight). Evidence: the payload is over ``mqtt.max_message_bytes``; the
packet is over the Maximum Packet Size the broker announced in its CONNACK (checked before sending); paho refuses the
topic (``+`` / ``#`` in it, e.g. a subject injected via an ERP ack); or the broker refused it with a permanent code:

=====  ==============================  =========  ==============================================================
code   name                            class      why
=====  ==============================  =========  ==============================================================
0x00   Success                         ok         deleted from the outbox
0x10   No matching subscribers         ok         the broker accepted it (nobody listening is not our problem)
0x80   Unspecified error               transient  says nothing about the row; brokers use it for internal trouble
0x83   Implementation specific error   transient  "valid but not accepted now" (plugins, overload); no evidence
0x87   Not authorized                  permanent  an ACL refuses the topic: resending changes nothing
0x89   Server busy                     transient  overload (a DISCONNECT code: paho_fast reads it in a PUBACK)
0x90   Topic Name invalid              permanent  the topic itself is bad
0x91   Packet identifier in use        transient  protocol state, not the row
0x95   Packet too large                permanent  too big for this broker (mosquitto's message_size_limit; see 0x89)
0x97   Quota exceeded                  transient  rate / quota limits lift with time
0x99   Payload format invalid          permanent  the payload itself is refused
other  >= 0x80                         transient  unknown: no evidence against the row
=====  ==============================  =========  ==============================================================

A transient refusal keeps the row in the outbox: the session stops sending, waits for the PUBACKs still in flight,
backs off (``retry_backoff``: doubling, capped, reset by the next success) and then restarts every lane from the oldest
row still in the outbox, so the refused row is resent before anything of its machine that was not yet acknowledged.
A permanent refusal quarantines the row with the reason (``edge-gateway buffer`` lists and retries it).

A broker may refuse by closing the connection instead. mosquitto does so at a PUBLISH over its
``message_size_limit`` (not announced in the CONNACK), and its 0x95 PUBACK is often lost in the reset. The row at
which it happens would be resent first at every connection, for ever. So connections lost with the same row oldest
in flight are counted (``publisher.connection_lost_at_row``, warning). After CAREFUL_AFTER such losses the next
sessions send one event at a time (in batch mode a batch of one, still on the batch topic) until that row is
acknowledged: a batch too large for the broker goes through as single events. If the connection is still lost right
after that row went out alone (within CONDEMN_WITHIN_S, at most half the keepalive: a dead network is noticed later,
by the keepalive), CONDEMN_AFTER times, the row is quarantined as the cause. A 0x95 for a batch of several events
halves the batch size from then on (``publisher.batch_too_large``) and resends its rows; for a single event it
quarantines it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway import metrics, paho_fast
from gateway.component import Backoff, ComponentState, ComponentStatus
from gateway.config import MqttConfig
from gateway.faults import crash_point
from gateway.store import PendingRow, Store, StoreError

log = structlog.get_logger(__name__)
_FAST_OFF_LOGGED: list[bool] = []  # the warning that FastClient is not in use, once per process

MessageHandler = Callable[[str, bytes, bool], None]
PubackHandler = Callable[[int, int, int], None]  # (connection id, mid, reason code)
SUBSCRIBE_RETRY_S = 1.0  # first retry of a refused subscription; doubles up to SUBSCRIBE_RETRY_MAX_S
SUBSCRIBE_RETRY_MAX_S = 60.0
SUBACK_TIMEOUT_S = 10.0  # a SUBSCRIBE with no SUBACK by then is taken as refused (alarm, asked again)

ACK_BATCH = 1000  # acknowledged rows that are deleted at once, without waiting for the ack interval
# acknowledged rows wait this long for a commit to delete them with its own (at 10,000 tags @ 1 s the core commits
# about twice a second) before they get a transaction of their own
ACK_HOLD_S = 1.0

PUBACK_PERMANENT = frozenset({0x87, 0x90, 0x95, 0x99})


def classify_puback(code: int) -> str | None:
    """None for an accepted message (< 0x80), else "permanent" (quarantine the row) or "transient" (keep, retry)."""
    if code < 0x80:
        return None
    return "permanent" if code in PUBACK_PERMANENT else "transient"


def reason_text(code: int, packet: int = PacketTypes.PUBACK) -> str:
    """``0x87 Not authorized``: the code and paho's name for it (when paho knows one for this packet type)."""
    try:
        name = str(ReasonCode(packet, identifier=code))
    except ValueError:
        name = "unknown reason"
    return f"0x{code:02X} {name}"


# CONNACK refusals about who we are (credentials, client id, ACL): retrying as is will not help, a person must act
AUTH_REFUSALS = {
    0x84: "the broker does not speak this MQTT version (mqtt.protocol)",
    0x85: "the client id is not accepted (mqtt.client_id)",
    0x86: "bad user name or password (mqtt.username, mqtt.password_env / mqtt.password_file)",
    0x87: "not authorized: the broker refuses this client (anonymous not allowed, or the user's ACL)",
    0x8A: "this client is banned by the broker",
    0x8C: "bad authentication method",
}

# what a DISCONNECT sent by the broker (MQTT 5) means for an operator
DISCONNECT_HINTS = {
    0x87: "not authorized any more (credentials or ACL changed)",
    0x89: "the broker is busy",
    0x8B: "the broker is shutting down",
    0x8D: "the broker saw nothing from us within the keepalive",
    0x8E: "another client connected with the same client id (two gateways with one mqtt.client_id take the "
          "session from each other)",
    0x93: "we exceeded the broker's receive maximum (in-flight window)",
    0x95: "a packet was larger than the broker's maximum packet size",
    0x97: "quota exceeded",
    0x98: "an administrator disconnected this client",
    0x9C: "the broker asks us to use another server",
    0x9D: "the broker moved to another server",
}


def describe_disconnect(reason: Any, from_broker: bool, keepalive_s: int) -> str:
    """One line for a lost connection, saying what happened (paho's reason alone is often 'Unspecified error')."""
    code = getattr(reason, "value", None)
    tail = f" (0x{code:02X})" if isinstance(code, int) else ""
    if from_broker:
        hint = DISCONNECT_HINTS.get(code) if isinstance(code, int) else None
        return f"the broker closed the connection: {reason}{tail}" + (f": {hint}" if hint else "")
    return (f"connection lost without a DISCONNECT from the broker{tail}: the broker stopped or crashed, the network "
            f"dropped the TCP connection, or nothing came back within the keepalive ({keepalive_s} s)")


def _raise_if_cancelling() -> None:
    """asyncio.wait_for (Python 3.11) can swallow a cancel that arrives just as the awaited thing completes (a
    CONNACK, a refusal): the task is then 'cancelling' but nothing raises any more. Honour such a cancel here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Connection:
    """One MQTT connection: one paho client, its CONNACK properties, and whether it is lost.

    ``id`` is unique per link (1, 2, ...). ``max_packet_size`` is the broker's Maximum Packet Size from the MQTT 5
    CONNACK (None when not announced), ``receive_maximum`` its Receive Maximum (the most QoS 1 messages it takes
    unacknowledged; None: not announced, 65,535). ``lost`` is set once, when the connection is gone; it is never
    reused."""

    __slots__ = ("id", "client", "protocol5", "max_packet_size", "receive_maximum", "lost", "sub_mids", "sub_retry",
                 "fast", "resync")

    def __init__(self, conn_id: int, protocol5: bool) -> None:
        self.id = conn_id
        self.client: paho.Client | None = None
        self.protocol5 = protocol5
        self.max_packet_size: int | None = None
        self.receive_maximum: int | None = None
        self.lost = asyncio.Event()
        self.sub_mids: dict[int, str] = {}
        self.sub_retry: dict[str, float] = {}  # refused subscription -> its current retry delay (s)
        self.fast = False  # the client is a gateway.paho_fast.FastClient: QoS 1 publishes use publish_fast
        self.resync: asyncio.TimerHandle | None = None  # the next re-subscription of the resync filters

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()

    def packet_size(self, topic: str, payload_len: int) -> int:
        """Size on the wire of a QoS 1 PUBLISH of this topic and payload (no properties)."""
        remaining = 2 + len(topic.encode()) + 2 + (1 if self.protocol5 else 0) + payload_len
        n = 1
        while remaining >= 128 ** n:
            n += 1
        return 1 + n + remaining

    def __repr__(self) -> str:
        return f"Connection(id={self.id}, alive={self.alive})"


def _self_connected(sock: Any) -> bool:
    """A TCP socket connected to itself (same local and remote address and port)."""
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except (OSError, AttributeError):
        return False


class MqttLink:
    """Keeps one MQTT connection up; exposes publish() and PUBACK / message callbacks.

    ``connection`` is the current :class:`Connection` (None while down). ``on_puback(connection_id, mid,
    reason_code)`` is called for every PUBACK (reason code 0 on MQTT 3.1.1). ``refused_subscriptions`` maps each
    subscription filter the broker refused in its SUBACK to the reason (also in ``status.detail``); it is updated on
    every (re)connect.

    ``resync`` filters (the retained dispatches) are subscribed to again every ``resync_s`` seconds on a live
    connection, so the broker sends their retained messages again: a live message the broker never delivered (seen
    with a nats-server cluster while it creates a subscription's JetStream consumer, or after a node restart) is
    received at the latest one period later. A SUBSCRIBE with no SUBACK within ``SUBACK_TIMEOUT_S`` counts as
    refused: an alarm, and asked again."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        online: tuple[str, bytes | Callable[[], bytes]] | None = None,
        offline: Callable[[], bytes] | None = None,
        subscriptions: list[str] | None = None,
        on_message: MessageHandler | None = None,
        resync: list[str] | None = None,
        resync_s: float = 0.0,
        suback_timeout_s: float = SUBACK_TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._password = password
        self.will = will
        self.online = online  # (topic, payload or a function making it at each connect)
        self.offline = offline  # the offline status published on a clean stop (the will's payload when None)
        self.auth_refused: str | None = None  # why the broker refused our login, until a connect succeeds
        self.subscriptions = subscriptions or []
        self.resync = [t for t in resync or () if t in self.subscriptions]
        self.resync_s = resync_s
        self.suback_timeout_s = suback_timeout_s
        # the TCP (and TLS) handshake runs in a thread (paho's connect blocks), bounded by this; a handshake that
        # completes after it (a slow resolver, a broker's full accept queue) is dropped before its CONNECT (sock_open)
        self.connect_timeout_s = 15.0
        self.resyncs = 0  # re-subscriptions of the resync filters (each brings their retained messages again)
        self.on_message = on_message
        self.on_puback: PubackHandler = lambda connection_id, mid, reason_code: None
        self.status = ComponentStatus()
        self.connected = asyncio.Event()
        self.connection: Connection | None = None
        self.refused_subscriptions: dict[str, str] = {}
        self._endpoint = 0  # index into cfg.endpoints(): the broker endpoint tried now
        self.host, self.port = cfg.endpoints()[0]
        self.on_subscriptions_changed: Callable[[], None] = lambda: None  # after a SUBACK changed the refused set
        self._lost = asyncio.Event()
        self._current: Connection | None = None  # the connection being set up or up
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections = 0
        self.resubscribes = 0  # refused subscriptions asked for again (see _retry_subscription)

    # ----------------------------------------------------------------- public
    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                connection: Connection | None = None) -> int | None:
        """Queue a message on the current connection (or only on ``connection``, when given); returns its mid, or
        None when not connected (or ``connection`` is not the current one). Raises ValueError for a topic paho
        refuses (empty, or with ``+`` / ``#``)."""
        conn = self.connection
        if conn is None or (connection is not None and connection is not conn):
            return None
        if conn.fast and qos == 1 and not retain and type(payload) is bytes:
            return conn.client.publish_fast(topic, payload)  # type: ignore[union-attr]
        info = conn.client.publish(topic, payload, qos=qos, retain=retain)  # type: ignore[union-attr]
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def resubscribe(self, topic: str) -> bool:
        """Subscribe to ``topic`` again on the live connection, so the broker sends its retained messages again (MQTT
        3.1.1 and 5, retain handling 0). False when not connected: the next CONNACK subscribes anyway."""
        conn = self.connection
        if conn is None or not conn.alive or conn.client is None:
            return False
        self._subscribe(conn.client, conn, topic)
        return True

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def run(self) -> None:
        """Connect, stay connected, reconnect with backoff. Runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        # a broker on the plant network is cheap to retry: cap the wait at 1 s so a restarted broker gets the
        # backlog within ~1 s (bench/backlog.py measures time to first PUBACK after a broker restart)
        backoff = Backoff(0.1, 1.0)
        endpoints = self.cfg.endpoints()
        while True:
            try:
                await self._connect_once()
                _raise_if_cancelling()
                backoff.reset()
                await self._lost.wait()
            except asyncio.CancelledError:
                await self._close(graceful=True)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: not connected, retry
                # an authentication refusal was logged as such (mqtt.auth_refused) when the CONNACK came
                if self.status.set(ComponentState.DISCONNECTED, str(exc) or type(exc).__name__) and \
                        not self.auth_refused:
                    log.error("mqtt.connect_failed", host=self.host, port=self.port,
                              error=str(exc) or type(exc).__name__)
            await self._close(graceful=False)
            _raise_if_cancelling()
            if len(endpoints) > 1:
                # a clustered broker: the next node at once, with the same client id; back off after a full round
                self._endpoint = (self._endpoint + 1) % len(endpoints)
                self.host, self.port = endpoints[self._endpoint]
                if self._endpoint != 0:
                    await asyncio.sleep(0.05)
                    continue
            await asyncio.sleep(backoff.next())

    # ----------------------------------------------------------------- internals
    def _make_client(self, conn: Connection) -> paho.Client:
        # FastClient: paho's Client with a cheaper QoS 1 publish / PUBACK path (gateway/paho_fast.py), only with a
        # paho version it was checked against; else paho's own Client and publish()
        cls = paho_fast.FastClient if paho_fast.ENABLED else paho.Client
        if self.cfg.protocol == "5":
            c = cls(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5, userdata=conn)
        else:
            c = cls(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                    protocol=paho.MQTTv311, userdata=conn)
        if paho_fast.usable(c):
            conn.fast = True
            c.on_fast_puback = functools.partial(self._on_fast_puback, conn.id)  # type: ignore[attr-defined]
        elif not _FAST_OFF_LOGGED:
            _FAST_OFF_LOGGED.append(True)
            log.warning("mqtt.fast_path_off", paho_mqtt=paho_fast.PAHO_VERSION, checked=list(paho_fast.CHECKED_PAHO),
                        effect="paho's own publish and PUBACK path: about twice the CPU per published event")
        # the publisher keeps its own window (mqtt.max_inflight): paho's would only repeat it, at a cost: with a limit
        # paho walks every in-flight message after each PUBACK (O(window) per acknowledgement); 0 = no limit of its own
        c.max_inflight_messages_set(0)
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
        c.enable_logger(logging.getLogger("paho.mqtt.client"))  # paho's own lines through structlog (gateway/logs.py)
        loop = self._loop
        assert loop is not None

        loop_thread = threading.get_ident()

        def on_loop(fn: Callable[..., Any], *args: Any) -> None:
            # paho calls these from the executor thread during reconnect(); the selector is not thread-safe
            if loop.is_closed():
                return  # a client collected after its loop ended (its socket closed in __del__): nothing to update
            if threading.get_ident() == loop_thread:
                fn(*args)
            else:
                loop.call_soon_threadsafe(fn, *args)

        def sock_open(client: paho.Client, userdata: Any, sock: Any) -> None:
            if conn.lost.is_set():
                # the link gave this connection up while its handshake ran (connect_timeout_s) and may be connected
                # again already, under the same client id: a CONNECT sent now would take that session over (the
                # broker drops the live connection). paho writes it after this callback: on this socket it cannot
                log.warning("mqtt.late_connect_dropped", host=self.host, port=self.port, connection=conn.id,
                            timeout_s=self.connect_timeout_s)
                sock.shutdown(socket.SHUT_RDWR)
                return
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            if _self_connected(sock):
                # a broker on this host that is down, on a port inside the ephemeral range: the kernel may give the
                # client that very port and connect it to itself (TCP simultaneous open). The gateway would then
                # talk to itself and hold the port the broker needs to start again (seen in bench/backlog.py)
                log.warning("mqtt.self_connected", host=self.host, port=self.port,
                            action="closed; the broker is not running there, retried")
                sock.shutdown(socket.SHUT_RDWR)
            on_loop(watch, client, sock, False)

        def watch(client: paho.Client, sock: Any, write: bool) -> None:
            """The loop's reader (``write``: its writer) for ``sock``. uvloop closes an fd's poll after an error on it
            (a connection reset) and runs its reader once; when that read found nothing yet, the socket was watched
            no more and registering it again raised RuntimeError into paho's caller (the publisher's task ended,
            nothing was published until a restart: tests/test_publisher_sessions.py, the message size limit test,
            on uvloop). Then the closed poll is dropped and the socket watched anew: its next read reports the reset
            (or, when even that fails, it is shut down and read now)."""
            try:
                if write:
                    loop.add_writer(sock, client.loop_write)
                else:
                    loop.add_reader(sock, client.loop_read)
                return
            except RuntimeError as exc:
                log.warning("mqtt.socket_watched_again", host=self.host, port=self.port, connection=conn.id,
                            error=str(exc))
            for remove in (loop.remove_reader, loop.remove_writer):
                with contextlib.suppress(Exception):
                    remove(sock)
            try:
                loop.add_reader(sock, client.loop_read)
                if write or client.want_write():
                    loop.add_writer(sock, client.loop_write)
            except (RuntimeError, OSError, ValueError):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                loop.call_soon(client.loop_read)  # paho sees the end: the connection is lost, reconnected

        def sock_close(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(loop.remove_reader, sock)
            on_loop(loop.remove_writer, sock)

        def reg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(watch, client, sock, True)

        def unreg_write(client: paho.Client, userdata: Any, sock: Any) -> None:
            on_loop(loop.remove_writer, sock)

        c.on_socket_open = sock_open
        c.on_socket_close = sock_close
        c.on_socket_register_write = reg_write
        c.on_socket_unregister_write = unreg_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    async def _connect_once(self) -> None:
        assert self._loop is not None
        self._lost.clear()
        self.connected.clear()
        conn = Connection(next(self._ids), self.cfg.protocol == "5")
        client = conn.client = self._make_client(conn)
        self._current = conn
        client.connect_timeout = 5.0
        if self.cfg.protocol == "5":
            client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive_s, clean_start=True)
        else:
            client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive_s)
        # the TCP (and TLS) handshake blocks: run it off the loop, bounded by connect_timeout_s
        async with asyncio.timeout(self.connect_timeout_s):
            await self._loop.run_in_executor(None, client.reconnect)
        misc = asyncio.create_task(self._misc_loop(client), name="mqtt.misc")
        try:
            async with asyncio.timeout(10):
                await self._wait_connack()
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
    _refused: Connection | None = None  # the connection whose CONNACK refused us
    _misc: asyncio.Task[None] | None = None

    async def _misc_loop(self, client: paho.Client) -> None:
        while True:
            await asyncio.sleep(0.5)
            if client.loop_misc() != paho.MQTT_ERR_SUCCESS and not self._lost.is_set():
                self._mark_lost(f"no answer from the broker within the keepalive ({self.cfg.keepalive_s} s), or the "
                                "socket failed")

    def _on_connect(self, client: paho.Client, conn: Connection, flags: Any, reason: Any, props: Any) -> None:
        if conn is not self._current:
            return
        if reason.is_failure:
            code = reason.value
            if code in AUTH_REFUSALS:
                who = f"user {self.cfg.username!r}" if self.cfg.username else "anonymous (no mqtt.username)"
                self._last_reason = (f"broker refused the login of {who}: {reason} (0x{code:02X}): "
                                     f"{AUTH_REFUSALS[code]}")
                if self.auth_refused != self._last_reason:  # once per refusal streak, not at every retry
                    log.error("mqtt.auth_refused", host=self.host, port=self.port, client_id=self.client_id,
                              username=self.cfg.username, reason=str(reason), reason_code=f"0x{code:02X}",
                              hint=AUTH_REFUSALS[code])
                self.auth_refused = self._last_reason
            else:
                self._last_reason = f"broker refused the connection: {reason} (0x{code:02X})"
            self._refused = conn  # its socket closing next is not news: keep the refusal as the reason
            self._mark_lost(self._last_reason)
            return
        self.auth_refused = None
        self.connections += 1
        conn.max_packet_size = getattr(props, "MaximumPacketSize", None) if props is not None else None
        conn.receive_maximum = getattr(props, "ReceiveMaximum", None) if props is not None else None
        for topic in self.subscriptions:
            self._subscribe(client, conn, topic)
        self._schedule_resync(client, conn)
        if self.online:
            payload = self.online[1]() if callable(self.online[1]) else self.online[1]
            client.publish(self.online[0], payload, qos=1, retain=True)
        self.connection = conn
        self.connected.set()
        if self.status.set(ComponentState.CONNECTED):
            # how long the broker was unreachable (None at the first connect): the value /status shows, not a second
            # clock reading (two readings rounded to ms can differ: 1.539 logged, 1.54 in the status)
            down_s = self.status.downtime_s
            log.info("mqtt.connected", host=self.host, port=self.port, client_id=self.client_id,
                     reason=str(reason), connection=conn.id, session_present=bool(getattr(flags, "session_present", False)),
                     max_packet_size=conn.max_packet_size, receive_maximum=conn.receive_maximum,
                     **({"downtime_s": down_s} if down_s is not None else {}))

    def _subscribe(self, client: paho.Client, conn: Connection, topic: str) -> None:
        rc, mid = client.subscribe(topic, qos=1)
        if rc != paho.MQTT_ERR_SUCCESS:
            return  # the connection is going: the next CONNACK subscribes again
        conn.sub_mids[mid] = topic
        if self._loop is not None:
            self._loop.call_later(self.suback_timeout_s, self._suback_overdue, client, conn, mid)

    def _suback_overdue(self, client: paho.Client, conn: Connection, mid: int) -> None:
        """No SUBACK for this SUBSCRIBE: as good as refused (a broker that never answers it never delivers on it)."""
        if conn is not self.connection or not conn.alive or mid not in conn.sub_mids:
            return
        topic = conn.sub_mids.pop(mid)
        self._subscription_refused(client, conn, topic, f"no SUBACK within {self.suback_timeout_s:g} s", None)

    def _schedule_resync(self, client: paho.Client, conn: Connection) -> None:
        if not self.resync or self.resync_s <= 0 or self._loop is None:
            return

        def again() -> None:
            if conn is not self.connection or not conn.alive:
                return
            pending = set(conn.sub_mids.values())
            for topic in self.resync:
                # a refused or unanswered filter is already being asked for again (see _retry_subscription)
                if topic not in pending and topic not in self.refused_subscriptions:
                    self._subscribe(client, conn, topic)
                    self.resyncs += 1
                    log.debug("mqtt.resubscribed", topic=topic, connection=conn.id)
            self._schedule_resync(client, conn)

        conn.resync = self._loop.call_later(self.resync_s, again)

    def _on_subscribe(self, client: paho.Client, conn: Connection, mid: int, reason_codes: Any, props: Any) -> None:
        topic = conn.sub_mids.pop(mid, None)
        if topic is None:
            return
        rc = reason_codes[0] if reason_codes else None
        if rc is not None and rc.is_failure:
            self._subscription_refused(client, conn, topic, str(rc), rc.value)
            return
        if topic not in self.refused_subscriptions:
            return
        del self.refused_subscriptions[topic]
        log.info("mqtt.subscription_granted", topic=topic)
        self._refused_changed()

    def _subscription_refused(self, client: paho.Client, conn: Connection, topic: str, reason: str,
                              code: int | None) -> None:
        self._retry_subscription(client, conn, topic)
        if self.refused_subscriptions.get(topic) == reason:
            return
        self.refused_subscriptions[topic] = reason
        log.error("mqtt.subscription_refused", topic=topic, reason=reason,
                  reason_code=None if code is None else f"0x{code:02X}", host=self.host, port=self.port,
                  action=f"asked again every {SUBSCRIBE_RETRY_MAX_S:.0f} s at most")
        self._refused_changed()

    def _refused_changed(self) -> None:
        if self.refused_subscriptions:
            self.status.detail["refused_subscriptions"] = dict(self.refused_subscriptions)
        else:
            self.status.detail.pop("refused_subscriptions", None)
        self.on_subscriptions_changed()

    def _retry_subscription(self, client: paho.Client, conn: Connection, topic: str) -> None:
        """A refused subscription is asked for again on the same connection, with backoff: an ACL fixed by the
        broker's administrator, or a clustered broker that could not create the subscription while it was electing
        new leaders after a node died (nats-server answers 0x80 then), starts working without a reconnect."""
        delays = conn.sub_retry
        delay = delays[topic] = min(SUBSCRIBE_RETRY_MAX_S, delays.get(topic, SUBSCRIBE_RETRY_S / 2) * 2)
        loop = self._loop
        if loop is None:
            return

        def again() -> None:
            if conn is not self.connection or not conn.alive:
                return
            self._subscribe(client, conn, topic)
            self.resubscribes += 1

        loop.call_later(delay, again)

    def _on_disconnect(self, client: paho.Client, conn: Connection, flags: Any, reason: Any, props: Any) -> None:
        if conn is self._current and conn is not self._refused:
            from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            self._mark_lost(describe_disconnect(reason, from_broker, self.cfg.keepalive_s))

    def drop(self, why: str) -> None:
        """End the current connection from our side (a PUBACK overdue): the link reconnects as after a loss."""
        if self._current is not None and not self._lost.is_set():
            self._mark_lost(why)

    def _mark_lost(self, why: str) -> None:
        was = self.connected.is_set()
        conn = self._current
        if conn is not None:
            conn.lost.set()
            if conn.resync is not None:
                conn.resync.cancel()
        self.connection = None
        self.connected.clear()
        self._lost.set()
        if self.status.set(ComponentState.DISCONNECTED, why) and was:
            log.error("mqtt.disconnected", host=self.host, port=self.port, reason=why,
                      connection=conn.id if conn is not None else None)

    def _on_publish(self, client: paho.Client, conn: Connection, mid: int, reason: Any, props: Any) -> None:
        # the PUBACK of a message of connection `conn` (paho passes a reason code on 3.1.1 too: 0)
        self._on_fast_puback(conn.id, mid, reason.value if reason is not None else 0)

    def _on_fast_puback(self, conn_id: int, mid: int, code: int) -> None:
        # FastClient's PUBACK of a publish_fast message (the reason code as paho decodes it; 0 on 3.1.1)
        try:
            self.on_puback(conn_id, mid, code)
        except Exception:  # noqa: BLE001 - a bug in the handler: the PUBACKs read with this one are still handled
            log.exception("mqtt.puback_handler_failed", connection=conn_id, mid=mid, code=code,
                          action="its message stays in flight: sent again after mqtt.puback_timeout_s")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(msg.topic, msg.payload, msg.retain)

    async def _close(self, *, graceful: bool) -> None:
        conn, self._current = self._current, None
        self.connection = None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self.connected.clear()
        if conn is None:
            return
        conn.lost.set()
        if conn.resync is not None:
            conn.resync.cancel()
        client = conn.client
        if client is None:
            return
        try:
            if graceful:
                # publish the offline status ourselves: the will is only sent on an unclean disconnect
                if self.will and client.is_connected():
                    payload = self.offline() if self.offline is not None else self.will[1]
                    info = client.publish(self.will[0], payload, qos=1, retain=True)
                    # wait (bounded) for its PUBACK: by then everything the broker sent before is read too, so
                    # closing the socket sends a FIN, not a RST that can make the broker drop our DISCONNECT
                    # unread and publish the last will after all ("offline, stopped" then "connection_lost")
                    deadline = time.monotonic() + 1.0
                    while not info.is_published() and client.is_connected() and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                client.disconnect()
                client.loop_write()
            sock = client.socket()
            if sock is not None:
                self._loop.remove_reader(sock)  # type: ignore[union-attr]
                self._loop.remove_writer(sock)  # type: ignore[union-attr]
                sock.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


QUARANTINE = -2  # Publisher._send: the row was taken off its lane for the quarantine
# A broker that closes the connection at a message instead of refusing it with a PUBACK code (mosquitto over its
# message_size_limit: its 0x95 PUBACK is often lost in the reset; a batch over that limit too): the connection is
# lost with that row the oldest in flight. After CAREFUL_AFTER such losses at one row, the next sessions send one
# event at a time, in batch mode as a batch of one (a batch too large for the broker goes through as single rows, on
# the batch topic: nats-server refuses the events' own, dotted topics); if the connection is then lost within
# CONDEMN_WITHIN_S (at most half the keepalive) of sending that row alone, CONDEMN_AFTER times, the row is
# quarantined as the cause. A dead network is no such evidence: it is noticed later (the keepalive), at whichever
# row is in flight. A row quarantined wrongly is not lost: `edge-gateway buffer retry` sends it again.
CAREFUL_AFTER = 2
CONDEMN_AFTER = 2
CONDEMN_WITHIN_S = 2.0


class _Lane:
    """A cursor over a range of outbox ids, read ahead in pages."""

    __slots__ = ("name", "cursor", "upto", "buffer", "exhausted")

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


class _Session:
    """The publisher's state for ONE connection: its in-flight map (mid -> row, or tuple of rows for a batch), its
    lanes, and which machines still have backlog. Discarded with the connection; a new connection gets a new one.

    Per-machine order with the live lane: ``hold[machine]`` is the highest id of that machine in the backlog range
    (``id <= boundary``), or an upper bound of it: known at once from the rows the store wrote
    (``Store.backlog_bounds``), then narrowed by a scan in the background (None until known, after a start with rows
    in the store: the live lane waits). A held
    machine's live rows are parked (in id order); it is released once every backlog row up to ``hold[machine]`` was
    taken off the backlog lane (``taken_upto()``) and none of its backlog rows is still in flight (``backlog_inflight``)
    — i.e. all were acknowledged or quarantined. Its parked rows then move to ``released``, sent before any other
    live row. Rows deleted before the scan's snapshot were acknowledged: a smaller or missing ``hold`` entry is
    right."""

    __slots__ = ("conn", "conn_id", "inflight", "boundary", "backlog", "live", "hold", "backlog_inflight", "parked",
                 "parked_n", "released", "bucket", "rewind_at", "waiting", "learn", "checked_upto", "careful",
                 "last_sent_at", "ack_seen", "ack_check_at", "acks", "acks_newer")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.conn_id = conn.id
        self.inflight: dict[int, PendingRow | tuple[PendingRow, ...]] = {}
        self.boundary = 0
        self.backlog: _Lane | None = None
        self.live = _Lane("live", 0, None)
        self.hold: dict[str, int] | None = {}
        self.backlog_inflight: dict[str, int] = {}
        self.parked: dict[str, collections.deque[PendingRow]] = {}
        self.parked_n = 0
        self.released: collections.deque[PendingRow] = collections.deque()
        self.bucket: _TokenBucket | None = None
        self.rewind_at: float | None = None  # a transient refusal: restart the lanes at this loop time
        self.waiting = False  # idle, waiting for a commit or a PUBACK (tests observe it)
        self.learn: asyncio.Task[None] | None = None
        self.checked_upto = 0
        self.careful = False  # one event at a time (in batch mode a batch of one: Publisher._send, _note_loss)
        self.last_sent_at = 0.0  # loop time of the last publish, kept while careful
        # the PUBACK timeout (Publisher._overdue): what was in flight at the last check, and when to check next
        self.ack_seen: dict[int, PendingRow | tuple[PendingRow, ...]] = {}
        self.ack_check_at = 0.0
        self.acks = 0  # PUBACKs since the last check
        self.acks_newer = 0  # of those, of messages sent after it (not in ack_seen)

    def reset(self, boundary: int, rate: float) -> None:
        if self.learn is not None:
            self.learn.cancel()
            self.learn = None
        self.boundary = boundary
        self.backlog = _Lane("backlog", 0, boundary) if boundary > 0 else None
        self.live = _Lane("live", boundary, None)
        self.hold = {} if boundary == 0 else None
        self.backlog_inflight = {}
        self.parked = {}
        self.parked_n = 0
        self.released = collections.deque()
        self.bucket = _TokenBucket(rate) if rate > 0 else None
        self.checked_upto = 0

    @property
    def tracking(self) -> bool:
        """Backlog rows in flight must be counted per machine (some machine is, or may be, held)."""
        return self.hold is None or bool(self.hold)

    def taken_upto(self) -> int:
        """Every backlog row with an id up to this one was taken off the backlog lane (sent or quarantined)."""
        b = self.backlog
        if b is None:
            return self.boundary
        return b.buffer[0].id - 1 if b.buffer else b.cursor

    def backlog_settled(self, machine: str, n: int) -> None:
        """``n`` backlog rows of ``machine`` that were in flight got their PUBACK (or a permanent refusal)."""
        left = self.backlog_inflight.get(machine, 0) - n
        if left > 0:
            self.backlog_inflight[machine] = left
            return
        self.backlog_inflight.pop(machine, None)
        self.check(machine)

    def check(self, machine: str) -> None:
        hold = self.hold
        if hold:
            last = hold.get(machine)
            if last is not None and last <= self.taken_upto() and machine not in self.backlog_inflight:
                self.release(machine)

    def sweep(self) -> None:
        """Release the machines whose backlog was taken and settled (after the backlog lane moved)."""
        hold = self.hold
        if hold is None:
            if self.backlog is None and not self.backlog_inflight:
                self.hold = {}  # the scan failed or is slow: the backlog is done anyway
                self.release_all()
            return
        upto = self.taken_upto()
        if hold and upto != self.checked_upto:
            self.checked_upto = upto
            for m, last in list(hold.items()):
                if last <= upto and m not in self.backlog_inflight:
                    self.release(m)

    def release(self, machine: str) -> None:
        del self.hold[machine]  # type: ignore[union-attr]
        parked = self.parked.pop(machine, None)
        if parked:
            self.parked_n -= len(parked)
            self.released.extend(parked)

    def release_all(self) -> None:
        for m in list(self.parked):
            parked = self.parked.pop(m)
            self.parked_n -= len(parked)
            self.released.extend(parked)

    def learnt(self, last: dict[str, int]) -> None:
        """The highest backlog id per machine: an upper bound (``Store.backlog_bounds``) or the scan's. When
        machines are held already, it only narrows: a machine released stays released, one held that ``last`` does
        not name has no backlog left (released once none of its rows is in flight)."""
        hold = self.hold
        if hold is None:
            self.hold = dict(last)
        else:
            for m, upto in hold.items():
                hold[m] = min(upto, last.get(m, 0))
        self.checked_upto = -1
        self.sweep()


class Publisher:
    """Publishes the outbox with a sliding window of unacknowledged QoS 1 messages.

    Per connection a session (:class:`_Session`) with two lanes: the *backlog* (rows committed before this connection
    came up, oldest first, at most ``backlog_rate`` events/s when set) and the *live* lane (rows committed since). The
    live lane keeps fresh events fast during a long drain, but only for machines with nothing left in the backlog: a
    machine's live rows are parked while it still has rows in the backlog range not yet acknowledged, and go out,
    oldest first, once they are. So every machine's rows are first sent in id (= seq) order, on every path (live,
    backlog, batch mode, retry after a transient refusal); see docs/event-contract.md for the exact guarantee.

    A row is deleted only after a positive PUBACK *on the connection that sent it*. On a lost connection the session is
    dropped with its in-flight map and the next one restarts both lanes from the oldest row still in the outbox
    (at-least-once; event ids make duplicates recognisable). Refusals (see the module docstring): a row over
    ``max_message_bytes`` or the broker's Maximum Packet Size, with a topic paho refuses, or refused by a permanent
    MQTT 5 PUBACK code is quarantined and does not block the rows behind it; a transient code is retried.

    Rows handed over by the commit (``notify(rows)``) are taken from memory instead of being read back from SQLite,
    as long as they continue the live lane's cursor without a gap; at most ``handover_max`` rows are held, beyond
    that the queue is dropped and the live lane reads from the store from its cursor. With ``batch_max`` > 1,
    consecutive events of one machine go out as one CloudEvents batch message (a JSON array,
    ``application/cloudevents-batch+json``) on ``.../{machine}/events/batch``: the per-message cost of the MQTT client
    is paid once per batch.
    """

    PARK_MAX = 10_000  # parked live rows per session; beyond, the live lane waits for the backlog

    def __init__(self, store: Store, link: MqttLink, *, window: int = 100, fetch_size: int = 1000,
                 ack_interval: float = 0.5, backlog_rate: float = 0.0, max_message_bytes: int = 256 * 1024,
                 batch_max: int = 0, retry_backoff: tuple[float, float] = (0.5, 30.0), handover_max: int = 10_000,
                 idle_poll_s: float = 1.0, puback_timeout_s: float = 30.0) -> None:
        self.store = store
        self.link = link
        self.window = window
        self.fetch_size = fetch_size
        self.ack_interval = ack_interval
        self.backlog_rate = backlog_rate
        self.max_message_bytes = max_message_bytes
        self.batch_max = batch_max
        self.handover_max = handover_max
        self.idle_poll_s = idle_poll_s
        self.puback_timeout_s = puback_timeout_s
        self.puback_timeouts = 0
        self._retry = Backoff(*retry_backoff)
        self._retry_armed = False
        self._wake = asyncio.Event()
        self._ack_wake = asyncio.Event()  # set when ACK_BATCH acknowledged rows wait for their delete
        self._handed: collections.deque[PendingRow] = collections.deque()
        self._refused: list[tuple[PendingRow, str]] = []
        self._bad: list[tuple[PendingRow, str]] = []  # rows _send took off a lane for the quarantine
        # connections lost with the same row the oldest in flight: (row id, losses, losses within CONDEMN_WITHIN_S of
        # sending it alone); a row found to be the cause: (row id, reason), quarantined when it is next sent
        self._strike: tuple[int, int, int] | None = None
        self._condemned: tuple[int, str] | None = None
        self._batch_cap: int | None = None  # bytes: learnt from a batch the broker refused as too large (0x95)
        self._gen = 0
        self.session: _Session | None = None
        self.published = 0
        self.quarantined = 0
        self.retried = 0  # transient refusals (rows kept and resent)
        self.handover_dropped = 0  # times the in-memory queue overflowed (the live lane read from the store)
        self.backlog_remaining = 0
        self._ack_error_logged = False
        self._ack_failing_since = 0.0
        link.on_puback = self._on_puback

    # ----------------------------------------------------------------- API
    def notify(self, rows: list[PendingRow] | None = None) -> None:
        """New rows were committed: ``rows`` as returned by ``Store.commit`` (taken from memory), or None (read
        them from the store)."""
        self._gen += 1
        handed = False
        if rows:
            h = self._handed
            if len(h) + len(rows) > self.handover_max:
                h.clear()
                self.handover_dropped += 1
            else:
                h.extend(rows)
                handed = True
        s = self.session
        if s is not None and not handed:
            # rows handed over are read from memory (``_next_live``: rows that do not continue the lane's cursor
            # send it back to the store); only rows it was not given make the live lane read the store again
            s.live.exhausted = False
        self._wake.set()

    @property
    def inflight(self) -> int:
        s = self.session
        return len(s.inflight) if s is not None else 0

    @property
    def _live(self) -> _Lane | None:  # bench/throughput.py waits on it: the session is set up
        s = self.session
        return s.live if s is not None else None

    # ----------------------------------------------------------------- PUBACKs (paho callback, event loop)
    def _on_puback(self, connection_id: int, mid: int, code: int) -> None:
        s = self.session
        if s is None or connection_id != s.conn_id:
            return  # another connection's message id: nothing of ours
        rows = s.inflight.pop(mid, None)
        if rows is None:
            return
        s.acks += 1
        if s.ack_seen.get(mid) is not rows:
            s.acks_newer += 1
        try:
            self._acknowledged(s, rows, code)
        except BaseException:
            s.inflight[mid] = rows  # not handled: still in flight (the PUBACK timeout sends it again)
            raise

    def _acknowledged(self, s: _Session, rows: PendingRow | tuple[PendingRow, ...], code: int) -> None:
        crash_point("publisher.puback")
        if code < 0x80:
            # handed to the store now, deleted by the core's next commit (or by _ack_loop's transaction)
            store = self.store
            if type(rows) is PendingRow:
                store.ack_later((rows.id,))
                if rows.id <= s.boundary and s.tracking:
                    s.backlog_settled(rows.machine, 1)
            else:  # a batch: rows of one machine from one lane
                store.ack_later([r.id for r in rows])
                if rows[0].id <= s.boundary and s.tracking:
                    s.backlog_settled(rows[0].machine, len(rows))
            if store.acks_waiting >= ACK_BATCH:
                self._ack_wake.set()
            if self._retry_armed and s.rewind_at is None:
                self._retry_armed = False
                self._retry.reset()
            if self._strike is not None and self._strike[0] in (
                    (rows.id,) if type(rows) is PendingRow else tuple(r.id for r in rows)):
                self._strike = None  # that row went through: it was not the cause
                s.careful = self._condemned is not None  # the full window again
        else:
            self._refusal(s, rows if type(rows) is tuple else (rows,), code)
        self._wake.set()

    def _refusal(self, s: _Session, rows: tuple[PendingRow, ...], code: int) -> None:
        text = reason_text(code)
        if code == 0x95 and len(rows) > 1:
            # a batch too large for the broker (mosquitto's message_size_limit is not in its CONNACK): its rows are
            # not; batches are kept to half this size from now on (down to single events), the rows resent
            size = sum(len(r.payload) + 1 for r in rows) + 1
            self._batch_cap = max(1, size // 2)
            log.warning("publisher.batch_too_large", bytes=size, events=len(rows), batch_cap_bytes=self._batch_cap,
                        connection=s.conn_id)
        elif classify_puback(code) == "permanent":
            for r in rows:
                self._refused.append((r, f"broker refused (MQTT 5 PUBACK {text})"))
            self._ack_wake.set()  # quarantined by _ack_loop now
            if rows[0].id <= s.boundary and s.tracking:
                s.backlog_settled(rows[0].machine, len(rows))
            return
        self.retried += len(rows)
        if s.rewind_at is None:
            delay = self._retry.next()
            self._retry_armed = True
            s.rewind_at = asyncio.get_running_loop().time() + delay
            log.warning("publisher.refused_transient", row=rows[0].id, topic=rows[0].topic, reason=text,
                        retry_in_s=round(delay, 2), connection=s.conn_id)

    # ----------------------------------------------------------------- main loop
    async def run(self) -> None:
        flusher = asyncio.create_task(self._ack_loop(), name="publisher.acks")
        try:
            while True:
                await self.link.connected.wait()
                conn = self.link.connection
                if conn is None or not conn.alive:
                    await asyncio.sleep(0.01)
                    continue
                await self._run_session(conn)
        finally:
            flusher.cancel()
            try:
                await self._settle()
            except Exception:  # noqa: BLE001 - best effort at shutdown; unacked rows are resent
                pass

    async def _run_session(self, conn: Connection) -> None:
        s = _Session(conn)
        st = self._strike
        s.careful = self._condemned is not None or (st is not None and (st[1] >= CAREFUL_AFTER or st[2] > 0))
        self._handed.clear()  # rows committed so far are in the store: this session reads them as backlog
        await self._start_lanes(s)
        if not conn.alive:
            return
        self.session = s
        loop = asyncio.get_running_loop()
        lost = asyncio.ensure_future(conn.lost.wait())
        timeout_s = self.puback_timeout_s
        s.ack_check_at = loop.time() + timeout_s
        try:
            if s.careful:
                # a connection the broker closes on its own soon after it was made (nats-server's MQTT while it takes
                # a session over between nodes) must not count against the row sent alone on it: wait as long as
                # such a loss would count (_note_loss), and send nothing on a connection that does not last that long
                done, _ = await asyncio.wait({lost}, timeout=self._condemn_within())
                if done or not conn.alive:
                    return
                s.ack_check_at = loop.time() + timeout_s
            while conn.alive:
                self._wake.clear()
                if timeout_s and loop.time() >= s.ack_check_at and self._overdue(s, loop.time()):
                    break
                if s.rewind_at is not None:
                    now = loop.time()
                    if not s.inflight and now >= s.rewind_at:
                        await self._start_lanes(s)  # from the oldest row still in the outbox
                        s.rewind_at = None
                        continue
                    timeout = self.idle_poll_s if s.inflight else s.rewind_at - now
                    await self._wait(s, lost, timeout)
                    continue
                progressed, throttled = await self._fill(s)
                if not conn.alive:
                    break
                if not progressed:
                    timeout = s.bucket.wait_time() if throttled and s.bucket else self.idle_poll_s
                    if not await self._wait(s, lost, timeout):
                        s.live.exhausted = False  # poll now and then: rows may come from `buffer retry`
            self._note_loss(s, loop.time())
        finally:
            lost.cancel()
            if s.learn is not None:
                s.learn.cancel()
            if self.session is s:
                self.session = None
            self.backlog_remaining = 0

    def _overdue(self, s: _Session, now: float) -> bool:
        """Every ``puback_timeout_s``: a message in flight at the last check and still now waited that long at least
        (at most twice that) for its PUBACK. The connection is ended and the message is sent again on the next one;
        MQTT resends an unacknowledged message only on a new connection."""
        seen, inflight = s.ack_seen, s.inflight
        s.ack_check_at = now + self.puback_timeout_s
        overdue = [rows for mid, rows in seen.items() if inflight.get(mid) is rows] if seen else None
        acks, newer = s.acks, s.acks_newer
        s.ack_seen = dict(inflight)
        s.acks = s.acks_newer = 0
        if not overdue:
            return False
        if acks and not newer:
            # PUBACKs come, in order (MQTT), for messages sent before these: a slow link working through the window
            # (large batches on a thin uplink), not a lost PUBACK
            return False
        first = min((r if type(r) is PendingRow else r[0] for r in overdue),  # type: ignore[misc]
                    key=lambda r: r.id)
        self.puback_timeouts += 1
        metrics.PUBACK_TIMEOUTS.inc()
        log.warning("publisher.puback_timeout", connection=s.conn_id, overdue=len(overdue), in_flight=len(inflight),
                    row=first.id, topic=first.topic, timeout_s=self.puback_timeout_s,
                    action="connection ended; the messages are sent again on the next one")
        drop = getattr(self.link, "drop", None)
        if drop is not None:
            drop(f"no PUBACK within {self.puback_timeout_s:g} s for {len(overdue)} message(s) in flight")
        return True

    def _condemn_within(self) -> float:
        """Seconds after sending a row alone within which a lost connection counts against that row."""
        return min(CONDEMN_WITHIN_S, 0.5 * getattr(getattr(self.link, "cfg", None), "keepalive_s", 60))

    def _note_loss(self, s: _Session, now: float) -> None:
        """The session's connection was lost: count it against the oldest row in flight (see CAREFUL_AFTER)."""
        if not s.inflight:
            return
        row = min((r if type(r) is PendingRow else r[0] for r in s.inflight.values()),  # type: ignore[misc]
                  key=lambda r: r.id)
        oldest = row.id
        row_id, losses, alone = self._strike if self._strike is not None else (0, 0, 0)
        if oldest != row_id:
            losses = alone = 0
        losses += 1
        # lost right after that row went out alone: the broker's doing, not a dead network (noticed by the keepalive)
        within = self._condemn_within()
        if s.careful and len(s.inflight) == 1 and now - s.last_sent_at <= within:
            alone += 1
        self._strike = (oldest, losses, alone)
        log.warning("publisher.connection_lost_at_row", connection=s.conn_id, row=oldest, topic=row.topic,
                    losses=losses, alone=alone, in_flight=len(s.inflight), careful=s.careful)
        if alone >= CONDEMN_AFTER:
            self._condemned = (oldest, f"the broker closed the connection each time this message was sent alone "
                                       f"({alone} times, within {CONDEMN_WITHIN_S:g} s), while others went through: "
                                       f"larger than it accepts (mosquitto's message_size_limit), or refused by it "
                                       f"without a PUBACK")

    async def _wait(self, s: _Session, lost: asyncio.Future[Any], timeout: float) -> bool:
        """Wait for a wake-up (commit, PUBACK) or the connection's end; False on timeout."""
        waiter = asyncio.ensure_future(self._wake.wait())
        s.waiting = True
        try:
            done, _ = await asyncio.wait({waiter, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            s.waiting = False
            waiter.cancel()
        return bool(done)

    async def _start_lanes(self, s: _Session) -> None:
        await self._settle()
        boundary, bound = await self.store.backlog_bounds()
        s.reset(boundary, self.backlog_rate)
        self.backlog_remaining = 1 if boundary else 0
        if boundary:
            if bound is not None:
                # an upper bound per machine, known at once (the rows this store wrote): the live lane starts now
                # for every machine outside it, instead of after the scan (~1.5 s per million rows)
                s.learnt(bound)
            s.learn = asyncio.create_task(self._learn_backlog(s, boundary), name="publisher.backlog_scan")

    async def _learn_backlog(self, s: _Session, boundary: int) -> None:
        """Which machines have backlog (highest id each), by a scan: until known (``Store.backlog_bounds`` knows it
        at once unless the store was opened with rows), the live lane waits; the backlog lane does not (a scan of a
        large outbox takes a while, the first publish after a reconnect must not). With the bound known, the scan
        releases the machines it held whose rows were all deleted since."""
        try:
            last = await self.store.last_ids_by_machine(boundary)
        except Exception as exc:  # noqa: BLE001 - the live lane then waits for the whole backlog (sweep)
            log.error("publisher.backlog_scan_failed", error=str(exc))
            return
        if s.boundary == boundary:
            s.learnt(last)
            self._wake.set()

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

    async def _next_live(self, lane: _Lane) -> PendingRow | None:
        """The live lane's next row: from the rows handed over by the commit when they continue the cursor, else
        from the store (a gap: rows of another writer, or the in-memory queue overflowed)."""
        h = self._handed
        if h:
            cursor = lane.cursor
            while h and h[0].id <= cursor:
                h.popleft()
            if h and h[0].id == cursor + 1:
                buf = lane.buffer
                while h and h[0].id == cursor + 1:
                    r = h.popleft()
                    buf.append(r)
                    cursor = r.id
                lane.cursor = cursor
                return buf[0]
            if h:
                lane.exhausted = False
        return await self._next(lane)

    async def _fill(self, s: _Session) -> tuple[bool, bool]:
        sent = 0
        throttled = False
        inflight = s.inflight
        window = 1 if s.careful else self.window
        rm = s.conn.receive_maximum
        if rm is not None and rm <= window:
            # the broker's Receive Maximum (MQTT 5): more unacknowledged messages is a protocol error (0x93) it
            # may disconnect for; one is left for the link's own (the retained status at connect)
            window = max(1, rm - 1)
        conn = s.conn
        live = s.live
        # live rows first: parked rows of machines whose backlog is done, then the live lane (once the backlog's
        # machines are known)
        while len(inflight) < window and conn.alive and s.rewind_at is None and s.hold is not None:
            if s.released:
                buf = s.released
            else:
                if s.parked_n >= self.PARK_MAX:
                    break  # bounded: the live lane waits until the backlog releases a machine
                buf = live.buffer
                if buf:
                    row = buf[0]
                else:
                    row = await self._next_live(live)
                    if row is None:
                        break
                    if s.released:
                        continue  # a machine was released while we read: its parked rows go first
                if s.hold and row.machine in s.hold:
                    buf.popleft()
                    parked = s.parked.get(row.machine)
                    if parked is None:
                        parked = s.parked[row.machine] = collections.deque()
                    parked.append(row)
                    s.parked_n += 1
                    continue
            n = self._send(s, buf, False)
            if n > 0:
                sent += n
            elif n == QUARANTINE:
                await self._quarantine_bad(s)
            else:
                return sent > 0, throttled
        backlog = s.backlog
        if backlog is not None:
            bucket = s.bucket
            while len(inflight) < window and conn.alive and s.rewind_at is None:
                if bucket is not None and not bucket.take():
                    throttled = True
                    break
                row = backlog.buffer[0] if backlog.buffer else await self._next(backlog)
                if row is None:
                    break
                n = self._send(s, backlog.buffer, True)
                if n > 0:
                    sent += n
                elif n == QUARANTINE:
                    await self._quarantine_bad(s)
                else:
                    return sent > 0, throttled
            self.backlog_remaining = len(backlog.buffer) + (0 if backlog.exhausted else 1)
            if backlog.done:
                s.backlog = None
                self.backlog_remaining = 0
                log.info("publisher.backlog_drained", connection=s.conn_id)
        if s.hold is None or s.hold:
            s.sweep()
            if s.released and len(inflight) < window:
                return True, throttled  # machines were released: their parked rows go on the next round
        return sent > 0, throttled

    def _send(self, s: _Session, buf: collections.deque[PendingRow], backlog: bool) -> int:
        """Publish the row at the front of ``buf`` (or, in batch mode, a batch of its machine): the number of rows
        sent; QUARANTINE when the row(s) were taken off ``buf`` for the quarantine instead (``self._bad``: the caller
        awaits ``_quarantine_bad``); -1 when the connection is gone. Not a coroutine: no allocation per row."""
        row = buf[0]
        if self._condemned is not None and row.id == self._condemned[0]:
            buf.popleft()
            self._bad.append((row, self._condemned[1]))
            self._condemned = self._strike = None
            return QUARANTINE
        limit = s.conn.max_packet_size
        # what goes on the wire: in batch mode the row alone is the message "[row]" on .../events/batch; a careful
        # session sends one row at a time, still on the batch topic (a batch of one): the events' own topics may be
        # refused by the broker (nats-server's MQTT closes the connection at a '.' in a topic, as in
        # operation.quantity_reported: the reason batch mode is required with it)
        batch = self.batch_max > 1
        topic = row.topic.rpartition("/events/")[0] + "/events/batch" if batch else row.topic
        size = len(row.payload) + 2 if batch else len(row.payload)
        how = " (as a batch of one)" if batch else ""
        if size > self.max_message_bytes:
            buf.popleft()
            self._bad.append((row, f"too large: {size} bytes{how} > mqtt.max_message_bytes {self.max_message_bytes}"))
            return QUARANTINE
        if limit is not None and size + 4 * len(topic) + 16 > limit:
            packet = s.conn.packet_size(topic, size)
            if packet > limit:
                buf.popleft()
                self._bad.append((row, f"too large for the broker: a {packet}-byte packet{how} > its Maximum Packet "
                                       f"Size {limit} (MQTT 5 CONNACK)"))
                return QUARANTINE
        if batch and s.careful:
            rows, payload = (row,), b"[" + row.payload + b"]"
        elif batch:
            cap = self.max_message_bytes if self._batch_cap is None else min(self.max_message_bytes, self._batch_cap)
            if limit is not None:
                # the packet's length field grows with the payload (1 to 4 bytes): 3 more than for an empty one
                cap = min(cap, limit - s.conn.packet_size(topic, 0) - 3)
            rows = self._take_batch(buf, cap, s.bucket if backlog else None)
            payload = b"[" + b",".join(r.payload for r in rows) + b"]"
        else:
            rows, payload = (), row.payload
        try:
            mid = self.link.publish(topic, payload, connection=s.conn)
        except ValueError as exc:  # a topic paho refuses: '+' / '#' in it, or empty
            for r in rows or (row,):
                buf.popleft()
                self._bad.append((r, f"topic refused by the MQTT client: {exc} (topic {r.topic!r})"))
            return QUARANTINE
        if mid is None:
            return -1
        if s.careful:
            s.last_sent_at = asyncio.get_running_loop().time()
        crash_point("publisher.published")
        if rows:
            for _ in rows:
                buf.popleft()
            s.inflight[mid] = rows if len(rows) > 1 else rows[0]
            n = len(rows)
        else:
            buf.popleft()
            s.inflight[mid] = row
            n = 1
        if backlog and s.tracking:
            ib = s.backlog_inflight
            ib[row.machine] = ib.get(row.machine, 0) + n
        self.published += n
        return n

    def _take_batch(self, buf: collections.deque[PendingRow], cap: int,
                    bucket: _TokenBucket | None) -> tuple[PendingRow, ...]:
        """Buffered rows of the machine of the first row, in order, up to batch_max events and ``cap`` bytes:
        one CloudEvents batch message (a JSON array) on ``.../{machine}/events/batch``. Rows of other machines are
        skipped, not passed: each machine's events keep their order. The batch is left at the front of ``buf`` (the
        caller pops it after a successful publish), the rest in order."""
        first = buf[0]
        prefix = first.topic.rpartition("/events/")[0]
        rows = [first]
        keep: list[PendingRow] = []
        size = len(first.payload) + 2
        it = itertools.islice(buf, 1, None)
        for r in it:
            if r.topic.rpartition("/events/")[0] != prefix:
                keep.append(r)
                continue
            if len(rows) >= self.batch_max or size + len(r.payload) + 1 > cap or (
                    bucket is not None and not bucket.take()):
                keep.append(r)
                break
            rows.append(r)
            size += len(r.payload) + 1
        keep.extend(it)
        buf.clear()
        buf.extend(rows)
        buf.extend(keep)
        return tuple(rows)

    # ----------------------------------------------------------------- quarantine and acks
    async def _quarantine_bad(self, s: _Session) -> None:
        bad, self._bad = self._bad, []
        for row, reason in bad:
            await self._quarantine(row, reason)
            if row.id <= s.boundary:
                s.check(row.machine)

    async def _quarantine(self, row: PendingRow, reason: str) -> None:
        try:
            if await self.store.quarantine(row.id, reason):
                self.quarantined += 1
                log.error("publisher.quarantined", row=row.id, topic=row.topic, machine=row.machine, seq=row.seq,
                          reason=reason)
        except StoreError as exc:
            log.error("publisher.quarantine_failed", row=row.id, error=str(exc))

    async def _settle(self) -> None:
        """Apply what the broker told us: quarantine the refused rows, delete the acknowledged ones."""
        if self._refused:
            refused, self._refused = self._refused, []
            for row, reason in refused:
                await self._quarantine(row, reason)
        await self.flush_acks()

    async def _ack_loop(self) -> None:
        # Acknowledged rows are handed to the store at their PUBACK and deleted by the next transaction that takes
        # them: a delete only frees space (an acknowledged row left behind by a crash is sent again, same id and
        # content: a duplicate the consumer drops). A transaction of their own every 10 ms was up to 100
        # transactions a second, each a few round trips to SQLite's thread: ~9 % of the gateway's CPU at 10,000 tags
        # @ 1 s (bench/peer_nodered.py); one every 0.1 s still a few % (bench/README.md, thirteenth session). So
        # they are deleted by the core's next commit (one statement in a transaction it runs anyway); by a
        # transaction of their own here when ACK_BATCH of them wait (a backlog drain's ~50,000 PUBACKs/s: a delete
        # of 5,000 rows would hold the store, and the drain's next fetch, for tens of milliseconds) or no commit took
        # the oldest within ACK_HOLD_S (an idle gateway; not while a transaction runs: a commit may be deleting them
        # right now). Refused rows are quarantined here at once. This loop wakes for those (``_ack_wake``) and
        # every ack_interval (0.5 s) to look at the oldest's age: at the Node-RED peer's load it woke 10 times a
        # second to hand the PUBACKs over (bench/README.md, sixteenth session). Shutdown flushes them.
        wake = self._ack_wake
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ack_interval):
                    await wake.wait()
            wake.clear()
            store = self.store
            if self._refused or store.acks_waiting >= ACK_BATCH or (
                    store.acks_waiting and not store.busy and time.monotonic() - store.acks_since >= ACK_HOLD_S):
                await self._settle()

    @property
    def acked(self) -> int:
        """Rows acknowledged by the broker and handed to the store for their delete (``store.pending`` counts the
        others: the two add up to what was committed)."""
        return self.store.acked_total + self.store.acks_waiting

    @property
    def last_ack_time(self) -> float | None:
        return self.store.acked_at

    async def flush_acks(self) -> None:
        """Delete every acknowledged row now, in a transaction of its own."""
        if not self.store.acks_waiting:
            return
        try:
            await self.store.ack()
        except StoreError as exc:
            # e.g. a full disk: they wait in the store and are retried; worst case they are re-published after a
            # restart (same ids)
            if not self._ack_error_logged:
                self._ack_error_logged = True
                self._ack_failing_since = time.monotonic()
                log.error("publisher.ack_failed", error=str(exc), pending_acks=self.store.acks_waiting)
            return
        if self._ack_error_logged:
            self._ack_error_logged = False
            log.info("publisher.ack_recovered", downtime_s=round(time.monotonic() - self._ack_failing_since, 3))
