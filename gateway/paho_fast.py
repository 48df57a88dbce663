"""A paho-mqtt client with a cheaper QoS 1 publish / PUBACK path for the outbox publisher (gateway/mqtt.py).

What paho-mqtt 2.2 pays per QoS 1 message, and what :class:`FastClient` does instead (measured with
``bench/throughput.py``; see the commit messages for the figures):

- ``publish()``: an ``MQTTMessage``, an ``MQTTMessageInfo`` with a ``threading.Condition``, a queued-packet dict,
  three mutexes, a debug log call. :meth:`FastClient.publish_fast` checks the topic and payload exactly as
  ``publish()`` does, builds the same PUBLISH bytes, remembers the message id in a set and appends the bytes to the
  last queued packet that is not being written yet: a burst of publishes goes out in one ``send()``, not one each.
  A topic is checked and encoded once (its bytes kept, for up to ``TOPICS_KEPT`` topics), and the message id is
  paho's next one taken under paho's own lock without a call (``_mid_generate`` when it is still in flight):
  2.4 → 1.5 µs a publish in-process.
- reading: three ``recv()`` calls per packet (command byte, remaining length, body), and per MQTT 5 PUBACK a
  ``Properties`` and two ``ReasonCode`` objects, handed to ``on_publish``. :meth:`FastClient.loop_read` reads up to
  64 KB per ``recv()`` and splits it into packets. A PUBACK of a ``publish_fast`` message in its success form — the
  2-byte form, or reason code 0x00 / 0x10 with no properties (remaining length 3, or 4 with a zero property length)
  — is reported as ``on_fast_puback(mid, reason_code)`` without any object. **Every other packet goes through
  paho's own code**: other PUBACKs of ``publish_fast`` messages (reason codes >= 0x80, properties, a malformed
  packet) are decoded by paho's ``decode_puback`` (same exceptions, same codes) before ``on_fast_puback``; PUBACKs
  of messages sent with paho's ``publish()`` (retained status messages), CONNACK, SUBACK, PUBLISH, DISCONNECT, ...
  by paho's ``_packet_handle``.

After each ``recv()`` the socket is put back in TCP quick-ACK mode (Linux): the broker sends PUBACKs in small
segments, and a broker with Nagle on (mosquitto's default: ``set_tcp_nodelay false``) holds its next PUBACK until
our kernel acknowledges the previous segment, which a delayed ACK postpones by up to 40 ms. ``bench/tags.py``:
publish -> PUBACK p99 48 ms -> 12 ms at the OPC UA load with a default mosquitto.

Like paho, a PUBACK is reported once, and only for a message id this client sent and that is not acknowledged yet.

The class overrides private methods of paho's ``Client`` (``loop_read``, ``_handle_pubackcomp``) and uses its
private state (``_out_packet``, ``_in_packet``, ``_out_messages``, ``_sock`` ...). It is used only with the paho
versions it was checked against (:data:`CHECKED_PAHO`, looked at on import) and only when the client has the
attributes it relies on (:func:`usable`); otherwise the link uses paho's own ``Client`` and ``publish()``
(``tests/test_paho_fast.py`` runs the publisher both ways and compares the decoding with paho's, byte for byte).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION

try:  # private or less stable names: another paho version may not have them (then FastClient is not used)
    from paho.mqtt import _packet as paho_packet
    from paho.mqtt.client import (
        MQTT_LOG_DEBUG,
        MQTT_LOG_ERR,
        MalformedPacket,
        MQTTErrorCode,
        time_func,
    )
except ImportError:  # pragma: no cover - not with the checked versions
    _IMPORTED = False
else:
    _IMPORTED = True

CHECKED_PAHO = ("2.2.0",)  # paho-mqtt versions whose private methods this module was written and tested against


def check(version: str) -> bool:
    """FastClient may be used with this paho-mqtt version."""
    return _IMPORTED and version in CHECKED_PAHO


ENABLED = check(PAHO_VERSION)  # checked once, on import

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
READ_SIZE = 65536  # bytes per recv()
READS_PER_CALL = 16  # recv() calls per loop_read(); more data left in the kernel wakes the event loop again
TOPICS_KEPT = 16384  # topics whose checked bytes publish_fast keeps (machines x event types; a bound)
MERGE_MAX = 65536  # a queued PUBLISH is extended with the next ones up to this many bytes

_PUBLISH_QOS1 = 0x32
_PUBACK = 0x40
_ACCEPTED = (0x00, 0x10)  # Success, No matching subscribers: the only codes the fast path decodes itself
_MID = struct.Struct("!H")

# what FastClient reads or calls on paho's Client (instance attributes are checked on the instance: usable())
_CLASS_ATTRS = ("_packet_handle", "_handle_pubackcomp", "_loop_rc_handle", "_mid_generate", "_raise_for_invalid_topic",
                "_call_socket_register_write", "_packet_queue", "_sock_recv", "_easy_log")
_INSTANCE_ATTRS = ("_sock", "_protocol", "_in_packet", "_out_packet", "_out_messages", "_msgtime_mutex",
                   "_last_bytes_received", "_registered_write", "_on_socket_register_write", "_thread", "_logger",
                   "suppress_exceptions", "_mid_generate_mutex", "_last_mid")


def _empty_in_packet() -> dict[str, Any]:
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1, "remaining_length": 0,
            "packet": bytearray(b""), "to_process": 0, "pos": 0}


class FastClient(paho.Client):
    """paho's ``Client`` with :meth:`publish_fast` and a batched read loop (see the module docstring).

    ``on_fast_puback(mid, reason_code)`` is called for the PUBACK of every ``publish_fast`` message (once);
    PUBACKs of messages sent with ``publish()`` still go to ``on_publish``. Driven by an external event loop
    (``on_socket_register_write`` set, no paho network thread); without one, ``publish_fast`` leaves the queueing
    and writing to paho (no merged writes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_mids: set[int] = set()
        self._topic_heads: dict[str, bytes] = {}  # topic -> its length and UTF-8 bytes, checked once
        self._rbuf = bytearray()
        self._rsock: Any = None
        self.on_fast_puback: Callable[[int, int], None] = lambda mid, reason_code: None

    # ----------------------------------------------------------------- publish
    def _mid_generate(self) -> int:
        """paho's message id counter, skipping the ids still in flight: paho's own ``publish()`` (the retained status,
        SUBSCRIBEs) checks only its own messages, and a PUBACK of a status message under an id a row still waits on
        would be taken for that row's (deleting it unacknowledged) after the counter wrapped at 65,535."""
        fast, own = self._fast_mids, self._out_messages
        mid = super()._mid_generate()
        for _ in range(65535):
            if mid not in fast and mid not in own:
                return mid
            mid = super()._mid_generate()
        return mid  # every id in flight: publish_fast refuses it, as paho's publish() would queue

    def publish_fast(self, topic: str, payload: bytes) -> int | None:
        """QoS 1, not retained, no properties: the message id, or None when not connected. Raises ValueError as
        ``publish()`` does (a topic with ``+`` / ``#``, empty on MQTT 3.1.1, too long; a payload too large)."""
        v5 = self._protocol == paho.MQTTv5
        head_t = self._topic_heads.get(topic)
        if head_t is None:
            if not v5 and not topic:
                raise ValueError('Invalid topic.')
            t = topic.encode("utf-8")
            if b"+" in t or b"#" in t or len(t) > 65535:
                self._raise_for_invalid_topic(t)  # paho's own message
            head_t = _MID.pack(len(t)) + t  # a valid topic as the PUBLISH carries it
            if len(self._topic_heads) < TOPICS_KEPT:
                self._topic_heads[topic] = head_t
        if len(payload) > 268435455:
            raise ValueError('Payload too large.')
        if self._sock is None:
            return None
        fast = self._fast_mids
        with self._mid_generate_mutex:  # paho's _mid_generate, without the call
            mid = self._last_mid + 1
            if mid == 65536:
                mid = 1
            self._last_mid = mid
        if mid in fast or mid in self._out_messages:
            mid = self._mid_generate()  # skips the ids in flight
            if mid in fast or mid in self._out_messages:
                return None  # paho: MQTT_ERR_QUEUE_SIZE (65,535 messages in flight)
        remaining = 2 + len(head_t) + len(payload) + (1 if v5 else 0)
        if remaining < 128:
            head = bytes((_PUBLISH_QOS1, remaining))
        else:
            h = bytearray((_PUBLISH_QOS1,))
            while True:
                b = remaining & 0x7F
                remaining >>= 7
                if remaining:
                    h.append(b | 0x80)
                else:
                    h.append(b)
                    break
            head = bytes(h)
        if self._debug():
            self._easy_log(MQTT_LOG_DEBUG, "Sending PUBLISH (d0, q1, r0, m%d), '%s', properties=None, ... (%d bytes)",
                           mid, head_t[2:], len(payload))
        pkt = b"".join((head, head_t, _MID.pack(mid), b"\x00" if v5 else b"", payload))
        fast.add(mid)
        if self._on_socket_register_write is None or self._thread is not None:
            # not driven by an event loop (paho's network thread, or loop() calls): paho queues and wakes it
            self._packet_queue(paho.PUBLISH, bytearray(pkt), mid, 1, None)
            return mid
        q = self._out_packet
        last = q[-1] if q else None
        if last is not None and last.get("fast") and last["pos"] == 0 and last["to_process"] < MERGE_MAX:
            last["packet"] += pkt
            last["to_process"] += len(pkt)
        else:
            q.append({"command": paho.PUBLISH, "mid": mid, "qos": 1, "pos": 0, "to_process": len(pkt),
                      "packet": bytearray(pkt), "info": None, "fast": True})  # type: ignore[typeddict-unknown-key]
        if not self._registered_write:
            self._call_socket_register_write()
        return mid

    # ----------------------------------------------------------------- read
    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        sock = self._sock
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if self._rsock is not sock:  # a new socket (reconnect): nothing of the old one's stream is kept
            self._rsock = sock
            self._rbuf = bytearray()
        buf = self._rbuf
        reads = 0
        while True:
            try:
                data = self._sock_recv(READ_SIZE)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except OSError as err:  # TimeoutError, ConnectionError included
                self._easy_log(MQTT_LOG_ERR, 'failed to receive on socket: %s', err)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            if not data:
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            if _QUICKACK is not None:  # (Linux resets quick-ACK mode by itself: set again after each read)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except (OSError, AttributeError):  # (a socket-like object without TCP options)
                    pass
            with self._msgtime_mutex:
                self._last_bytes_received = time_func()
            buf += data
            rc = self._handle_packets(buf)
            if rc:
                return self._loop_rc_handle(rc)
            if self._sock is not sock:
                return MQTTErrorCode.MQTT_ERR_NO_CONN if self._sock is None else MQTTErrorCode.MQTT_ERR_SUCCESS
            reads += 1
            if len(data) < READ_SIZE or reads >= READS_PER_CALL:
                # the kernel had no more (or more is left: the event loop wakes us again); with TLS, decrypted
                # bytes the event loop cannot see may wait in the SSL object: read those now
                pending = getattr(sock, "pending", None)
                if pending is None or not pending():
                    return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_packets(self, buf: bytearray) -> MQTTErrorCode:
        """Handle every complete packet at the start of ``buf`` and remove them from it; the rest waits."""
        n = len(buf)
        pos = 0
        v5 = self._protocol == paho.MQTTv5
        fast = self._fast_mids
        debug = self._debug()
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            while pos < n:
                cmd = buf[pos]
                i = pos + 1
                length = 0
                mult = 1
                complete = False
                while i < n:
                    b = buf[i]
                    i += 1
                    if i - pos - 1 > 4:  # paho: more than 4 remaining-length bytes is a protocol error
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
                    length += (b & 127) * mult
                    mult *= 128
                    if not b & 128:
                        complete = True
                        break
                if not complete or i + length > n:
                    break
                end = i + length
                if cmd & 0xF0 == _PUBACK:
                    if length == 2:
                        code = 0
                    elif v5 and (length == 3 or (length == 4 and buf[i + 3] == 0)) and buf[i + 2] in _ACCEPTED:
                        code = buf[i + 2]
                    else:
                        code = -1
                    if code >= 0:
                        mid = (buf[i] << 8) | buf[i + 1]
                        if mid in fast:
                            pos = end
                            fast.discard(mid)
                            if debug:
                                self._easy_log(MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d)", mid)
                            self._fast_puback(mid, code)
                            continue
                length_bytes = bytes(buf[pos + 1:i])
                pos = end
                rc = self._paho_handle(cmd, length_bytes, buf[i:end])
                if rc or self._sock is None:
                    return rc
            return rc
        finally:
            del buf[:pos]

    def _paho_handle(self, cmd: int, length_bytes: bytes, body: bytearray) -> MQTTErrorCode:
        """One packet through paho's own dispatch, as its ``_packet_read`` would hand it over."""
        self._in_packet = {"command": cmd, "have_remaining": 1, "remaining_count": list(length_bytes),
                           "remaining_mult": 128 ** len(length_bytes), "remaining_length": len(body),
                           "packet": body, "to_process": 0, "pos": 0}
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            self._in_packet = _empty_in_packet()  # type: ignore[assignment]
        return rc

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        """A PUBACK the fast path did not take (a refusal, properties, malformed) of a ``publish_fast`` message:
        decoded by paho, reported to ``on_fast_puback``. Anything else: paho's own handling."""
        if cmd == "PUBACK":
            pkt = self._in_packet["packet"]
            if len(pkt) >= 2:
                mid = (pkt[0] << 8) | pkt[1]
                if mid in self._fast_mids:
                    try:
                        code = paho_packet.decode_puback(self._in_packet["command"], pkt, self._protocol).reason.value
                    except MalformedPacket:
                        # paho knows some reason codes only for other packets (0x95 Packet too large, 0x89 Server
                        # busy: mosquitto answers a PUBLISH over its message_size_limit with a 0x95 PUBACK): the
                        # reason code is the byte after the message id whatever follows it. Dropping the connection
                        # instead would send the row again and again, ahead of every other row. Only a refusal
                        # (>= 0x80) is taken so: a malformed packet is never taken for a success (a deleted row)
                        if self._protocol != paho.MQTTv5 or len(pkt) < 3 or pkt[2] < 0x80:
                            raise
                        code = pkt[2]
                    self._easy_log(MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
                    self._fast_mids.discard(mid)
                    self._fast_puback(mid, code)
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _debug(self) -> bool:
        """paho would log its debug lines somewhere (on_log, or its logger at DEBUG): only then format them."""
        logger = self._logger
        return self.on_log is not None or (logger is not None and logger.isEnabledFor(logging.DEBUG))

    def _fast_puback(self, mid: int, code: int) -> None:
        # as paho's _do_on_publish: an exception in the callback is logged, and raised unless suppress_exceptions
        try:
            self.on_fast_puback(mid, code)
        except Exception as err:
            self._easy_log(MQTT_LOG_ERR, 'Caught exception in on_publish: %s', err)
            if not self.suppress_exceptions:
                raise


def usable(client: paho.Client) -> bool:
    """The client has every attribute FastClient relies on (and the module is enabled for this paho version)."""
    return (ENABLED and isinstance(client, FastClient) and all(hasattr(paho.Client, a) for a in _CLASS_ATTRS)
            and all(hasattr(client, a) for a in _INSTANCE_ATTRS))

