"""gateway/paho_fast.py: FastClient decodes every PUBACK as paho does (compared byte sequence by byte sequence with
paho's own Client, and against a real mosquitto refusing by ACL), the version guard, and the publisher on paho's own
Client when the guard says no."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess

import paho.mqtt.client as paho
import pytest
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion

from gateway import paho_fast
from gateway.config import MqttConfig
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store
from tests.broker import MosquittoBroker, free_port
from tests.e2e import wait_until


# --------------------------------------------------------------------------------------------------- helpers
def props(*items: tuple[int, bytes]) -> bytes:
    """An MQTT 5 property block: its length (one byte here) and the properties."""
    body = b"".join(bytes([pid]) + value for pid, value in items)
    return bytes([len(body)]) + body


REASON_STRING = 0x1F  # UTF-8 string property
USER_PROPERTY = 0x26  # UTF-8 string pair


def s16(text: str) -> bytes:
    b = text.encode()
    return len(b).to_bytes(2, "big") + b


def puback(mid: int, rest: bytes = b"") -> bytes:
    body = mid.to_bytes(2, "big") + rest
    return bytes([0x40, len(body)]) + body


class Harness:
    """A client of either kind on one end of a socket pair, one QoS 1 message in flight (mid 1): feed it bytes as
    the broker would, see what it reports (mid, reason code) and whether it dropped the connection."""

    def __init__(self, fast: bool, protocol: int, logger: logging.Logger | None = None) -> None:
        cls = paho_fast.FastClient if fast else paho.Client
        self.c = cls(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol)
        if logger is not None:
            self.c.enable_logger(logger)
        self.fast = fast
        self.acks: list[tuple[int, int]] = []
        self.dropped = False
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.c._sock = self.a
        self.c._state = _ConnectionState.MQTT_CS_CONNECTED
        self.c.on_socket_register_write = lambda *a: None  # driven by an event loop: nothing queued is written here
        self.c.on_disconnect = lambda *a: setattr(self, "dropped", True)
        if fast:
            assert paho_fast.usable(self.c)
            self.c.on_fast_puback = lambda mid, code: self.acks.append((mid, code))
            self.c.on_publish = lambda *a: pytest.fail("on_publish for a publish_fast message")
            assert self.c.publish_fast("t/m1/events/x", b"{}") == 1
        else:
            self.c.on_publish = lambda c, u, mid, reason, p: self.acks.append((mid, reason.value))
            assert self.c.publish("t/m1/events/x", b"{}", qos=1).mid == 1

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.b.sendall(chunk)
            if self.c._sock is not None:
                self.c.loop_read()

    def close(self) -> None:
        self.a.close()
        self.b.close()


V5_CASES = {
    "success, 2 bytes": puback(1),
    "success, reason byte": puback(1, b"\x00"),
    "success, reason byte and empty properties": puback(1, b"\x00\x00"),
    "no matching subscribers": puback(1, b"\x10"),
    "no matching subscribers, empty properties": puback(1, b"\x10\x00"),
    "success with a reason string": puback(1, b"\x00" + props((REASON_STRING, s16("ok")))),
    "no matching subscribers with a user property": puback(1, b"\x10" + props((USER_PROPERTY, s16("k") + s16("v")))),
    "unspecified error": puback(1, b"\x80"),
    "implementation specific error": puback(1, b"\x83"),
    "not authorized": puback(1, b"\x87"),
    "not authorized, empty properties": puback(1, b"\x87\x00"),
    "not authorized with a reason string": puback(1, b"\x87" + props((REASON_STRING, s16("acl")))),
    "topic name invalid": puback(1, b"\x90"),
    "packet identifier in use": puback(1, b"\x91"),
    "quota exceeded": puback(1, b"\x97"),
    "quota exceeded with a reason string": puback(1, b"\x97" + props((REASON_STRING, s16("slow down")))),
    "payload format invalid": puback(1, b"\x99"),

    "unknown code 0x01": puback(1, b"\x01"),
    "properties cut short": puback(1, b"\x00\x05"),
    "too short": bytes([0x40, 1, 0]),
    "another mid": puback(2),
    "another mid, refused": puback(2, b"\x87"),
    "twice": puback(1) + puback(1),
    "refused, then success again": puback(1, b"\x87") + puback(1),
}


@pytest.mark.parametrize("code", [0x89, 0x95])
def test_a_refusal_paho_cannot_decode_in_a_puback_is_reported_not_a_dropped_connection(code: int) -> None:
    """0x89 Server busy and 0x95 Packet too large are DISCONNECT codes to paho, which takes a PUBACK with them for a
    malformed packet and drops the connection; mosquitto answers a PUBLISH over its message_size_limit with a 0x95
    PUBACK. Dropped, the row was sent again at every connection, ahead of every other row (red before). Reported with
    its code, the publisher quarantines (0x95) or retries (0x89) it; paho's own client still drops the connection."""
    for data in (puback(1, bytes([code])), puback(1, bytes([code]) + props((REASON_STRING, s16("too big"))))):
        h = Harness(True, paho.MQTTv5)
        try:
            h.feed(data)
            assert (h.acks, h.dropped) == ([(1, code)], False)
        finally:
            h.close()
        h = Harness(False, paho.MQTTv5)
        try:
            h.feed(data)
            assert (h.acks, h.dropped) == ([], True)
        finally:
            h.close()


def test_the_fast_client_never_hands_out_a_message_id_still_in_flight() -> None:
    """paho's publish() (the retained status message) took its id from the same counter and checked only paho's own
    messages: after 65,535 ids, it could get the id of a row still waiting for its PUBACK, and the status message's
    PUBACK was then taken for the row's, which was deleted unacknowledged (red before)."""
    h = Harness(True, paho.MQTTv5)
    try:
        statuses: list[int] = []
        h.c.on_publish = lambda c, u, mid, reason, p: statuses.append(mid)
        h.c._last_mid = 65535  # the counter wraps to 1: the row's id, still in flight
        info = h.c.publish("t/status", b"online", qos=1, retain=True)
        assert info.mid != 1
        h.feed(puback(info.mid))
        assert statuses == [info.mid] and h.acks == [] and h.c._fast_mids == {1}
        h.feed(puback(1))
        assert h.acks == [(1, 0)]
    finally:
        h.close()


def test_publish_fast_takes_the_next_free_id_and_wraps_at_65535() -> None:
    """publish_fast's own id: the counter's next one, 65,535 wrapping to 1, skipping ids still in flight (its own rows'
    and paho's messages'); the counter paho's publish() then continues from."""
    h = Harness(True, paho.MQTTv5)  # id 1 in flight
    try:
        h.c._last_mid = 65534
        assert [h.c.publish_fast("t/a", b"{}") for _ in range(2)] == [65535, 2]  # wrapped, 1 skipped
        info = h.c.publish("t/status", b"online", qos=1, retain=True)  # paho's own: id 3, in flight
        h.c._last_mid = 2
        assert h.c.publish_fast("t/a", b"{}") == 4  # 3 is paho's message, still in flight
        assert info.mid == 3 and h.c._last_mid == 4 and h.c._fast_mids == {1, 65535, 2, 4}
    finally:
        h.close()


@pytest.mark.parametrize("case", sorted(V5_CASES))
def test_every_puback_is_decoded_as_paho_decodes_it_mqtt5(case: str) -> None:
    data = V5_CASES[case]
    seen = []
    for fast in (False, True):
        h = Harness(fast, paho.MQTTv5)
        try:
            h.feed(data)
            seen.append((h.acks, h.dropped))
        finally:
            h.close()
    assert seen[1] == seen[0], f"{case}: FastClient {seen[1]} != paho {seen[0]}"


@pytest.mark.parametrize("data", [puback(1), puback(1, b"\x00"), puback(1, b"\x87"), puback(2), bytes([0x40, 1, 0])],
                         ids=["success", "3 bytes", "refusal bytes", "another mid", "too short"])
def test_every_puback_is_decoded_as_paho_decodes_it_mqtt311(data: bytes) -> None:
    seen = []
    for fast in (False, True):
        h = Harness(fast, paho.MQTTv311)
        try:
            h.feed(data)
            seen.append((h.acks, h.dropped))
        finally:
            h.close()
    assert seen[1] == seen[0]


def test_the_fast_path_reports_exact_codes_and_keeps_packets_split_across_reads() -> None:
    """The expected values spelled out (not only 'as paho'): a refusal is never reported as a success, and a packet
    arriving in pieces (one byte per read), or many in one read, is handled once complete."""
    h = Harness(True, paho.MQTTv5)
    try:
        for _ in range(5):
            h.c.publish_fast("t/m1/events/x", b"{}")  # mids 2..6
        data = (puback(1, b"\x87" + props((REASON_STRING, s16("acl")))) + puback(2) + puback(3, b"\x10")
                + puback(4, b"\x00" + props((REASON_STRING, s16("ok")))) + puback(5, b"\x97") + puback(6, b"\x99\x00"))
        h.feed(*[data[k:k + 1] for k in range(len(data))])
        assert h.acks == [(1, 0x87), (2, 0), (3, 0x10), (4, 0), (5, 0x97), (6, 0x99)]
        assert not h.dropped and h.c._rbuf == b""
        assert h.c._fast_mids == set()
    finally:
        h.close()


def test_publish_fast_sends_the_bytes_paho_sends() -> None:
    for protocol in (paho.MQTTv5, paho.MQTTv311):
        out = []
        for fast in (False, True):
            h = Harness(fast, protocol)
            try:
                for k in range(6):  # each topic twice: checked and encoded once, then from publish_fast's cache
                    topic, payload = f"t/m{k % 3}/events/x", json.dumps({"k": k, "pad": "x" * 200 * k}).encode()
                    if fast:
                        h.c.publish_fast(topic, payload)
                    else:
                        h.c.publish(topic, payload, qos=1)
                h.c.loop_write()
                h.b.setblocking(False)
                out.append(h.b.recv(1 << 20))
            finally:
                h.close()
        assert out[1] == out[0] and len(out[0]) > 600
    h = Harness(True, paho.MQTTv5)
    try:
        for bad in ("t/+/x", "t/#", "t/+/x"):  # refused every time (a topic is kept only once it passed)
            with pytest.raises(ValueError, match="wildcards"):
                h.c.publish_fast(bad, b"{}")
    finally:
        h.close()


def test_paho_debug_lines_are_kept(caplog) -> None:
    """With paho's logger at DEBUG the fast path logs what paho logs for a publish and its PUBACK."""
    caplog.set_level(logging.DEBUG, logger="test.paho")
    lines = []
    for fast in (False, True):
        caplog.clear()
        h = Harness(fast, paho.MQTTv5, logging.getLogger("test.paho"))
        try:
            h.feed(puback(1, b"\x10"))
            lines.append([r.getMessage() for r in caplog.records])
        finally:
            h.close()
    assert lines[1] == lines[0] and any("Sending PUBLISH" in x for x in lines[0]), lines


def test_publish_fast_with_paho_writing() -> None:
    """Without an event loop's write callback paho queues and writes the message itself (here: at once, as it
    does with neither a network thread nor the callback); the PUBACK still reaches on_fast_puback."""
    c = paho_fast.FastClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv5)
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        c._sock = a
        c._state = _ConnectionState.MQTT_CS_CONNECTED
        acks = []
        c.on_fast_puback = lambda mid, code: acks.append((mid, code))
        assert c.publish_fast("t/x", b"{}") == 1
        b.setblocking(False)
        assert b.recv(100) == bytes([0x32, 10]) + b"\x00\x03t/x\x00\x01\x00{}"
        b.sendall(puback(1, b"\x87"))
        c.loop_read()
        assert acks == [(1, 0x87)]
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------------- the guard
def test_the_fast_client_is_used_only_with_a_checked_paho_version(monkeypatch) -> None:
    assert paho_fast.check(paho_fast.PAHO_VERSION), "the installed paho is the checked one: the fast path is on"
    assert not paho_fast.check("2.3.0") and not paho_fast.check("1.6.1")
    assert not paho_fast.usable(paho.Client(CallbackAPIVersion.VERSION2))
    monkeypatch.setattr(paho_fast, "ENABLED", False)
    assert not paho_fast.usable(paho_fast.FastClient(CallbackAPIVersion.VERSION2))


async def test_a_link_without_the_fast_client_says_so_once(monkeypatch) -> None:
    """IT sees why publishing costs more (another paho version): one warning per process, with the version."""
    import structlog

    from gateway import mqtt as mqtt_module
    from gateway.mqtt import Connection

    monkeypatch.setattr(paho_fast, "ENABLED", False)
    monkeypatch.setattr(mqtt_module, "_FAST_OFF_LOGGED", [])
    link = MqttLink(cfg(1883), client_id="gw")
    link._loop = asyncio.get_running_loop()  # what run() sets; no connection is made here
    with structlog.testing.capture_logs() as logs:
        link._make_client(Connection(1, True))
        link._make_client(Connection(2, True))
    off = [e for e in logs if e["event"] == "mqtt.fast_path_off"]
    assert len(off) == 1 and off[0]["paho_mqtt"] == paho_fast.PAHO_VERSION and off[0]["log_level"] == "warning"
    monkeypatch.setattr(paho_fast, "ENABLED", True)
    with structlog.testing.capture_logs() as logs:
        link._make_client(Connection(3, True))
    assert not [e for e in logs if e["event"] == "mqtt.fast_path_off"]


# --------------------------------------------------------------------------------------------------- real broker
def cfg(port: int) -> MqttConfig:
    return MqttConfig(port=port, keepalive_s=5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "paho"])
async def test_mosquitto_refusal_and_success_pubacks_reach_the_link_the_same_either_way(tmp_path, monkeypatch, fast):
    """A real mosquitto: an ACL denial (0x87, a 3-byte PUBACK), accepted messages with and without a subscriber (the
    2-byte form / 0x10): the link reports the same codes with FastClient as with paho's own Client."""
    monkeypatch.setattr(paho_fast, "ENABLED", fast)
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite t/ok/#\n")
    broker = MosquittoBroker(tmp_path / "b", extra_config=f"acl_file {acl}\n").start()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="sub", protocol=paho.MQTTv5)
    subscribed = asyncio.Event()
    loop = asyncio.get_running_loop()
    sub.on_subscribe = lambda *a: loop.call_soon_threadsafe(subscribed.set)
    sub.on_connect = lambda c, *a: c.subscribe("t/ok/sub", qos=1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        link = MqttLink(cfg(broker.port), client_id="gw")
        acks: dict[int, int] = {}
        link.on_puback = lambda conn_id, mid, code: acks.__setitem__(mid, code)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        assert link.connection.fast is fast
        # the denied message last: mosquitto 2.0.11 closes the connection after its 0x87 PUBACK (with paho's own
        # Client too), so what follows it in the same burst would be lost
        mids = {name: link.publish(topic, b'{"x":1}') for name, topic in
                [("subscriber", "t/ok/sub"), ("nobody", "t/ok/nobody"), ("denied", "t/denied/x")]}
        assert None not in mids.values()
        await wait_until(lambda: len(acks) == 3, 10)
        codes = {name: acks[mid] for name, mid in mids.items()}
        assert codes == {"subscriber": 0x00, "nobody": 0x10, "denied": 0x87}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "paho"])
async def test_publisher_on_either_client(tmp_path, mqtt_broker, monkeypatch, fast):
    """The publisher end to end on FastClient and on paho's own Client (the fallback): every row published,
    acknowledged and deleted, the payloads intact at a subscriber."""
    monkeypatch.setattr(paho_fast, "ENABLED", fast)
    got: list[bytes] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="sub")
    subscribed = asyncio.Event()
    loop = asyncio.get_running_loop()
    sub.on_subscribe = lambda *a: loop.call_soon_threadsafe(subscribed.set)
    sub.on_connect = lambda c, *a: c.subscribe("t/#", qos=1)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", mqtt_broker.port)
    sub.loop_start()
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        n = 3000
        rows = [OutboxRow(i, f"m{i % 7}", "x", f"t/m{i % 7}/events/x",
                          json.dumps({"seq": i, "pad": "y" * (i % 300)}).encode()) for i in range(1, n + 1)]
        async with Store(str(tmp_path / "s.db")) as store:
            await store.commit({}, rows, n + 1)
            link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
            pub = Publisher(store, link, window=100)
            tasks = [asyncio.create_task(link.run()), asyncio.create_task(pub.run())]
            await wait_until(lambda: store.pending == 0, 30)
            assert link.connection.fast is fast
            assert pub.acked == n and pub.quarantined == 0
            await wait_until(lambda: len(got) >= n, 10)
            assert sorted(json.loads(p)["seq"] for p in got) == list(range(1, n + 1))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        sub.loop_stop()
        sub.disconnect()


# --------------------------------------------------------------------------------------------------- TLS
@pytest.fixture
def tls_cert(tmp_path):
    """A self-signed certificate for 127.0.0.1: (key file, certificate file)."""
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, crt


async def test_publisher_over_tls_with_the_fast_client(tmp_path, tls_cert):
    """The read loop over TLS (bytes decrypted but not yet read wait in the SSL object, unseen by the event loop)."""
    key, crt = tls_cert
    tls_port = free_port()
    broker = MosquittoBroker(tmp_path / "b", extra_config=f"listener {tls_port} 127.0.0.1\ncertfile {crt}\n"
                                                           f"keyfile {key}\n").start()
    try:
        n = 2000
        rows = [OutboxRow(i, "m1", "x", "t/m1/events/x", json.dumps({"seq": i, "pad": "z" * 500}).encode())
                for i in range(1, n + 1)]
        async with Store(str(tmp_path / "s.db")) as store:
            await store.commit({}, rows, n + 1)
            c = MqttConfig(port=tls_port, keepalive_s=5, tls={"enabled": True, "ca_file": str(crt)})
            link = MqttLink(c, client_id="gw")
            pub = Publisher(store, link, window=100)
            tasks = [asyncio.create_task(link.run()), asyncio.create_task(pub.run())]
            await wait_until(lambda: store.pending == 0, 30)
            assert link.connection.fast and pub.acked == n
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        broker.close()
