"""The publisher against a real mosquitto: in-flight state per connection, refusals by evidence (PUBACK / SUBACK reason
codes, the broker's Maximum Packet Size, topics paho refuses), per-machine order with the live lane, rows handed over by
the commit. A tiny in-process MQTT 5 broker is used only where mosquitto cannot produce the signal (a transient PUBACK
reason code such as 0x97 Quota exceeded: mosquitto 2.0 never sends one)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttConfig
from gateway.mqtt import Connection, MqttLink, Publisher
from gateway.store import OutboxRow, Store
from tests.broker import MosquittoBroker
from tests.e2e import wait_until

DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


# --------------------------------------------------------------------------------------------------- helpers
class Collector:
    """A subscriber on ``t/#`` (QoS 1) recording (seq, machine) in arrival order; resubscribes on every connect."""

    def __init__(self, port: int, protocol: int = paho.MQTTv311) -> None:
        self.msgs: list[tuple[int, str]] = []
        self.subscribed = 0
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="collector", protocol=protocol)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("t/#", qos=1)
        self.c.on_subscribe = self._sub
        self.c.on_message = self._msg
        self.c.reconnect_delay_set(0.1, 0.3)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _sub(self, c, u, mid, rcs, p) -> None:
        with self.lock:
            self.subscribed += 1

    def _msg(self, c, u, m) -> None:
        d = json.loads(m.payload)
        items = d if isinstance(d, list) else [d]
        with self.lock:
            self.msgs.extend((x["seq"], x["m"]) for x in items)

    def seqs(self) -> set[int]:
        with self.lock:
            return {s for s, _ in self.msgs}

    def first_arrivals(self) -> dict[str, list[int]]:
        seen: set[int] = set()
        out: dict[str, list[int]] = {}
        with self.lock:
            for s, m in self.msgs:
                if s not in seen:
                    seen.add(s)
                    out.setdefault(m, []).append(s)
        return out

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def row(seq: int, machine: str = "m1", *, topic: str | None = None, size: int = 0) -> OutboxRow:
    doc = {"seq": seq, "m": machine}
    if size:
        doc["pad"] = "x" * size
    return OutboxRow(seq, machine, "x", topic or f"t/{machine}/events/x", json.dumps(doc).encode())


async def commit(store: Store, rows: list[OutboxRow]):
    return await store.commit({}, rows, max(r.seq for r in rows) + 1)


async def outbox_seqs(store: Store) -> set[int]:
    return {r["seq"] for r in await store.list_rows("outbox", limit=10**6)}


async def quarantine(store: Store) -> dict[int, str]:
    return {r["seq"]: r["reason"] for r in await store.list_rows("quarantine", limit=10**6)}


class GatedStore(Store):
    """A Store whose fetch waits for ``gate`` while ``gated`` is true: the test decides when the publisher may read."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = asyncio.Event()
        self.gated = False
        self.gated_when = None  # callable: gate from then on
        self.blocked = 0
        self.fetched: list[int] = []
        self.fetches = 0  # calls, empty ones included

    async def fetch(self, after_id, limit, upto_id=None):
        self.fetches += 1
        if self.gated_when is not None and self.gated_when():
            self.gated, self.gated_when = True, None
        if self.gated:
            self.blocked += 1
            while self.gated:
                self.gate.clear()
                await self.gate.wait()
        rows = await super().fetch(after_id, limit, upto_id)
        self.fetched.extend(r.seq for r in rows)
        return rows

    def release(self) -> None:
        self.gated = False
        self.gate.set()


def freeze(broker: MosquittoBroker) -> None:
    os.kill(broker.pid, signal.SIGSTOP)


async def run_all(*coros):
    return [asyncio.create_task(c) for c in coros]


async def cancel(tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def cfg(port: int, **kw) -> MqttConfig:
    return MqttConfig(port=port, keepalive_s=kw.pop("keepalive_s", 2), **kw)


# --------------------------------------------------------------------------------------------------- 1. sessions
async def test_puback_of_a_new_connection_never_deletes_rows_of_the_old_one(tmp_path, mqtt_broker):
    """The old connection's client wrapped its message ids (as after 65,535 messages), so its rows in flight have
    mids 1..5; the broker dies without having read them; the new connection's retained status gets mid 3. Its PUBACK
    must not delete the old row sent under mid 3 (never delivered)."""
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with GatedStore(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i) for i in range(1, 11)])
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw", subscriptions=["cmd/a", "cmd/b"],
                        online=("status/gw", b"online"))
        marker = asyncio.Event()
        link.on_puback = lambda *a: marker.set()
        tasks = await run_all(link.run())
        await wait_until(lambda: link.is_connected, 10)
        # subscriptions took mids 1-2 and the status 3: 65,531 QoS 0 messages and a QoS 1 marker use 4..65535
        for k in range(65_531):
            link.publish("warmup", b"", qos=0)
            if k % 5000 == 0:
                await asyncio.sleep(0)
        link.publish("warmup", b"marker", qos=1)
        await asyncio.wait_for(marker.wait(), 20)
        pub = Publisher(store, link, window=10, fetch_size=5)
        pubacks: list[tuple[int, int]] = []
        publisher_ack = link.on_puback

        def spy(connection_id: int, mid: int, code: int) -> None:
            pubacks.append((connection_id, mid))
            publisher_ack(connection_id, mid, code)

        link.on_puback = spy
        store.gated_when = lambda: pub.published >= 5  # the 2nd page waits: the old session is inside fetch
        freeze(mqtt_broker)  # rows 1..5 go to a broker that reads nothing
        tasks += await run_all(pub.run())
        await wait_until(lambda: store.blocked >= 1, 10)
        assert pub.published == 5
        await mqtt_broker.akill()
        await mqtt_broker.astart()
        await wait_until(lambda: link.connections >= 2 and col.subscribed >= 2, 15)
        new_conn = link.connection.id
        # the new connection's status PUBACK (mid 3) has arrived: the mid the old session's row 3 had
        await wait_until(lambda: (new_conn, 3) in pubacks, 10)
        store.release()
        try:
            await wait_until(lambda: store.pending == 0, 8)
        except AssertionError:
            pass
        left = await outbox_seqs(store)
        deleted = set(range(1, 11)) - left
        assert deleted <= col.seqs(), f"rows deleted from the outbox but never delivered: {sorted(deleted - col.seqs())}"
        await wait_until(lambda: store.pending == 0, 10)
        assert col.seqs() == set(range(1, 11))
        assert await quarantine(store) == {}
        await cancel(tasks)
    col.stop()


async def test_flapping_link_quarantines_nothing(tmp_path, mqtt_broker):
    """Three times: rows go to a frozen broker (in flight, never acknowledged), the broker dies and comes back. The
    same oldest row was in flight at every drop: that is no evidence against it (after two such drops the publisher
    sends one message at a time until that row is acknowledged: the drops come later than right after it)."""
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with GatedStore(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, f"m{i % 3}") for i in range(1, 61)])
        store.gated = True
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
        pub = Publisher(store, link, window=20)
        tasks = await run_all(link.run(), pub.run())
        for cycle in range(1, 4):
            await wait_until(lambda: link.connections >= cycle and store.blocked >= cycle, 15)
            freeze(mqtt_broker)
            before = pub.published
            store.release()
            # a window of 20 against mosquitto's Receive Maximum 20: 19 in flight (one left for the status message)
            await wait_until(lambda: pub.published >= before + (1 if pub._strike and pub._strike[1] >= 2 else 19), 10)
            store.gated = True
            await mqtt_broker.akill()
            await mqtt_broker.astart()
            await wait_until(lambda: col.subscribed >= cycle + 1, 15)
        await wait_until(lambda: link.connections >= 4 and store.blocked >= 4, 15)
        store.release()
        await wait_until(lambda: store.pending == 0 and store.quarantined == 0 and col.seqs() == set(range(1, 61)), 15)
        assert await quarantine(store) == {} and pub.quarantined == 0
        assert pub._strike is None and pub.session is not None and not pub.session.careful  # the full window again
        for m, seqs in col.first_arrivals().items():
            assert seqs == sorted(seqs), m
        await cancel(tasks)
    col.stop()


# --------------------------------------------------------------------------------------------------- 2. refusals
def test_puback_reason_code_table():
    from gateway.mqtt import classify_puback

    assert classify_puback(0x00) is None and classify_puback(0x10) is None  # success, no matching subscribers
    for code in (0x80, 0x83, 0x89, 0x91, 0x97):
        assert classify_puback(code) == "transient", hex(code)
    for code in (0x87, 0x90, 0x95, 0x99):
        assert classify_puback(code) == "permanent", hex(code)
    assert classify_puback(0xA0) == "transient"  # unknown: no evidence against the row


async def test_acl_refusal_on_puback_quarantines_that_row_only(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read t/#\ntopic readwrite t/m1/events/x\ntopic readwrite t/m2/events/x\n")
    broker = MosquittoBroker(tmp_path / "b", extra_config=f"acl_file {acl}\n").start()
    col = Collector(broker.port)
    try:
        await wait_until(lambda: col.subscribed >= 1, 10)
        async with Store(str(tmp_path / "s.db")) as store:
            await commit(store, [row(1), row(2, "m2"), row(3, topic="t/m1/events/denied"), row(4), row(5, "m2")])
            link = MqttLink(cfg(broker.port), client_id="gw")
            pub = Publisher(store, link, window=10)
            tasks = await run_all(link.run(), pub.run())
            await wait_until(lambda: store.pending == 0, 15)
            q = await quarantine(store)
            assert list(q) == [3] and "Not authorized" in q[3] and "0x87" in q[3]
            await wait_until(lambda: col.seqs() == {1, 2, 4, 5}, 10)
            await cancel(tasks)
    finally:
        col.stop()
        broker.close()


async def test_row_over_the_brokers_maximum_packet_size_is_quarantined_before_sending(tmp_path):
    broker = MosquittoBroker(tmp_path / "b", extra_config="max_packet_size 700\n").start()
    col = Collector(broker.port)
    try:
        await wait_until(lambda: col.subscribed >= 1, 10)
        async with Store(str(tmp_path / "s.db")) as store:
            await commit(store, [row(1), row(2, size=1000), row(3), row(4, size=660), row(5)])
            link = MqttLink(cfg(broker.port), client_id="gw")
            pub = Publisher(store, link, window=10)
            tasks = await run_all(link.run(), pub.run())
            await wait_until(lambda: store.pending == 0, 15)
            q = await quarantine(store)
            assert sorted(q) == [2, 4] and all("Maximum Packet Size 700" in r for r in q.values()), q
            await wait_until(lambda: col.seqs() == {1, 3, 5}, 10)
            assert link.connections == 1, "the broker had to drop the connection: the row was sent"
            await cancel(tasks)
    finally:
        col.stop()
        broker.close()


def sized(seq: int, machine: str, length: int) -> OutboxRow:
    """A row whose payload is exactly ``length`` bytes."""
    r = row(seq, machine, size=length - len(row(seq, machine, size=1).payload) + 1)
    assert len(r.payload) == length
    return r


def _batch_of_one_over_the_limit() -> list[OutboxRow]:
    """A row that fits the limit on its own topic, but not as "[row]" on .../events/batch."""
    c = Connection(0, True)
    n = max(n for n in range(600, 700) if c.packet_size("t/m1/events/x", n) <= 700)
    assert c.packet_size("t/m1/events/batch", n + 2) > 700
    return [row(1, "m2"), sized(2, "m1", n), row(3, "m2")]


def _batch_with_a_two_byte_length() -> list[OutboxRow]:
    """Two rows whose batch is exactly the limit less an empty packet's size: its length field takes two bytes, one
    more than for the empty packet (mosquitto accepts that byte over its limit; a strict broker drops the connection)."""
    c = Connection(0, True)
    cap = 700 - c.packet_size("t/m1/events/batch", 0)
    assert c.packet_size("t/m1/events/batch", cap) > 700
    return [row(1, "m2"), sized(2, "m1", 300), sized(3, "m1", cap - 303), row(4, "m2")]


@pytest.mark.parametrize("rows", [_batch_of_one_over_the_limit, _batch_with_a_two_byte_length])
async def test_a_batch_never_exceeds_the_brokers_maximum_packet_size(tmp_path, rows):
    """In batch mode a row goes out as a JSON array on .../events/batch: two bytes and a longer topic more than on its
    own. Checked against the broker's Maximum Packet Size as sent, a row too large that way is quarantined before
    sending (the broker would drop the connection at every resend: stuck), and every packet stays within the limit."""
    from tests.faults import MqttPacketDrop

    broker = MosquittoBroker(tmp_path / "b", extra_config="max_packet_size 700\n").start()
    sizes: list[int] = []
    proxy = await MqttPacketDrop(broker.port, lambda to_client, kind, packet: sizes.append(len(packet))
                                 if not to_client and kind == MqttPacketDrop.PUBLISH else False).start()
    try:
        async with Store(str(tmp_path / "s.db")) as store:
            rs = rows()
            await commit(store, rs)
            link = MqttLink(cfg(proxy.port, protocol="5"), client_id="gw")
            pub = Publisher(store, link, window=10, batch_max=10)
            tasks = await run_all(link.run(), pub.run())
            await wait_until(lambda: store.pending == 0 or link.connections >= 3, 15)
            assert store.pending == 0 and link.connections == 1, \
                f"{store.pending} rows left after {link.connections} connections: the broker dropped the batch"
            assert sizes and max(sizes) <= 700, sizes
            q = await quarantine(store)
            if rows is _batch_of_one_over_the_limit:
                assert list(q) == [2] and "as a batch of one" in q[2], q
            else:
                assert q == {}
            await cancel(tasks)
    finally:
        await proxy.close()
        broker.close()


async def test_topic_paho_refuses_is_quarantined_and_the_loop_goes_on(tmp_path, mqtt_broker):
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(1), row(2, topic="t/m1/events/#"), row(3), row(4, topic="t/+/events/x"), row(5)])
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
        pub = Publisher(store, link, window=10)
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: store.pending == 0 or tasks[1].done(), 15)
        assert not tasks[1].done(), tasks[1].exception() if tasks[1].done() else None
        q = await quarantine(store)
        assert sorted(q) == [2, 4] and all("topic" in r for r in q.values()), q
        await wait_until(lambda: col.seqs() == {1, 3, 5}, 10)
        await cancel(tasks)
    col.stop()


class FakeBroker:
    """Just enough MQTT 5 for one publisher: CONNACK, SUBACK, PINGRESP and a PUBACK whose reason code ``policy(seq,
    attempt)`` decides. Used only for transient PUBACK codes, which mosquitto never sends."""

    def __init__(self, policy, delay=None) -> None:
        self.policy = policy
        self.delay = delay or (lambda seq, attempt: 0.0)  # seconds before the PUBACK (the broker reads nothing meanwhile)
        self.attempts: dict[int, int] = {}
        self.accepted: list[int] = []
        self.refused: list[tuple[int, int]] = []
        self.closed_at: list[int] = []  # seqs at which the connection was closed (policy None)
        self.receive_maximum: int | None = None  # announced in the CONNACK when set
        # session-takeover churn (seen with nats-server's MQTT after a client moved nodes): this many connections are
        # closed ``churn_after_s`` after their CONNACK, whatever they send, and acknowledge nothing meanwhile
        self.churns = 0
        self.churn_after_s = 0.3
        # nats-server's MQTT: a topic with a '.' closes the connection ("characters ' ' and '.' not supported")
        self.refuse_dots = False
        self.topics: list[str] = []  # the topic of every PUBLISH taken
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    @staticmethod
    async def _read_varint(r: asyncio.StreamReader) -> int:
        value, mult = 0, 1
        while True:
            b = (await r.readexactly(1))[0]
            value += (b & 0x7F) * mult
            if not b & 0x80:
                return value
            mult *= 128

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        churned = False
        try:
            while True:
                head = (await r.readexactly(1))[0]
                body = await r.readexactly(await self._read_varint(r))
                kind = head >> 4
                if kind == 1:  # CONNECT
                    if self.churns > 0:
                        self.churns -= 1
                        churned = True
                        asyncio.get_running_loop().call_later(self.churn_after_s, w.transport.abort)
                    if self.receive_maximum is None:
                        w.write(bytes([0x20, 3, 0, 0, 0]))
                    else:  # CONNACK with the Receive Maximum property (0x21)
                        w.write(bytes([0x20, 6, 0, 0, 3, 0x21]) + self.receive_maximum.to_bytes(2, "big"))
                elif kind == 8:  # SUBSCRIBE
                    w.write(bytes([0x90, 4]) + body[:2] + bytes([0, 1]))
                elif kind == 12:  # PINGREQ
                    w.write(bytes([0xD0, 0]))
                elif kind == 14:  # DISCONNECT
                    break
                elif kind == 3:  # PUBLISH, QoS 1
                    (tlen,) = struct.unpack("!H", body[:2])
                    pid = body[2 + tlen:4 + tlen]
                    rest = body[4 + tlen:]
                    plen, i = 0, 0  # properties length (varint)
                    mult = 1
                    while True:
                        b = rest[i]
                        plen += (b & 0x7F) * mult
                        i += 1
                        if not b & 0x80:
                            break
                        mult *= 128
                    topic = body[2:2 + tlen].decode()
                    if self.refuse_dots and "." in topic:
                        w.transport.abort()
                        return
                    self.topics.append(topic)
                    doc = json.loads(rest[i + plen:])
                    seqs = [d["seq"] for d in doc] if isinstance(doc, list) else [doc["seq"]]  # a batch: its first
                    seq = seqs[0]
                    if churned:
                        continue  # taken in, never acknowledged: the connection goes anyway
                    n = self.attempts[seq] = self.attempts.get(seq, 0) + 1
                    code = self.policy(seq, n)
                    if code is None:  # no PUBACK: the broker closes the connection (mosquitto over its size limit)
                        self.closed_at.append(seq)
                        w.transport.abort()
                        return
                    if self.delay(seq, n):
                        await asyncio.sleep(self.delay(seq, n))
                    (self.refused.append((seq, code)) if code >= 0x80 else self.accepted.extend(seqs))
                    w.write(bytes([0x40, 4]) + pid + bytes([code, 0]))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def drain_logged(link: MqttLink, pub: Publisher, store: Store, timeout: float = 30) -> list[dict]:
    """Run the link and the publisher until the outbox is empty; the log entries meanwhile."""
    with structlog.testing.capture_logs() as logs:
        tasks = await run_all(link.run(), pub.run())
        try:
            await wait_until(lambda: store.pending == 0, timeout)
        finally:
            await cancel(tasks)
    return logs


async def test_a_row_at_which_the_broker_always_closes_the_connection_is_quarantined_and_the_rest_goes(tmp_path):
    """A broker that closes the connection at a message instead of answering it with a refusal (mosquitto over its
    message_size_limit, whose 0x95 PUBACK is often lost in the reset): the row was resent at every connection, ahead
    of every other row, for ever (red before: nothing after seq 3 was acknowledged). The publisher sends one message
    at a time once the connection was lost twice at that row, and quarantines it once the connection is lost each
    time right after it was sent alone; the other rows go, in order per machine."""
    fb = FakeBroker(lambda seq, n: None if seq == 3 else 0)
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "m1" if i % 2 else "m2") for i in range(1, 21)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=4, retry_backoff=(0.05, 0.2))
        logs = await drain_logged(link, pub, store)
        q = await quarantine(store)
        assert list(q) == [3] and "closed the connection each time this message was sent alone" in q[3]
        assert set(fb.accepted) == set(range(1, 21)) - {3}
        first = {}
        for seq in fb.accepted:
            first.setdefault(seq, len(first))
        for m in (1, 0):  # each machine's rows first arrived in order
            seqs = [s_ for s_ in sorted(first, key=first.get) if s_ % 2 == m]
            assert seqs == sorted(seqs)
        assert 4 <= len(fb.closed_at) <= 6 and link.connections <= 8
        lost = [e for e in logs if e["event"] == "publisher.connection_lost_at_row"]
        assert lost and all(e["log_level"] == "warning" for e in lost)
    await fb.stop()


async def test_a_broker_closing_each_new_connection_on_its_own_quarantines_nothing(tmp_path):
    """A broker that closes each new connection shortly after its CONNACK, whatever is sent, acknowledging nothing
    (nats-server's MQTT while a session is taken over between nodes: seen in the fleet chaos test): the same row is in
    flight at every loss, then sent alone; those losses are no evidence against it. A careful session waits a quiet
    while before it sends the row alone (red before: rows were quarantined as 'closed the connection each time this
    message was sent alone', the ERP got gaps)."""
    fb = FakeBroker(lambda seq, n: 0)
    fb.churns = 8
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "m1" if i % 2 else "m2") for i in range(1, 11)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=4, retry_backoff=(0.05, 0.2))
        await drain_logged(link, pub, store, 40)
        assert await quarantine(store) == {} and pub.quarantined == 0
        assert set(fb.accepted) == set(range(1, 11)) and fb.churns == 0
    await fb.stop()


async def test_batches_over_the_brokers_message_size_limit_go_as_single_messages(tmp_path):
    """mosquitto with message_size_limit 1000 (not announced in its CONNACK) and batch mode: every batch of these
    300-byte events is over the limit, and mosquitto closes the connection at it (or answers 0x95 and closes): the
    outbox never drained (red before). After two losses at one row the publisher sends single messages, which the
    broker takes: every event is delivered, none quarantined, in order; a single event over the limit is quarantined
    (by mosquitto's 0x95 when it arrives before the reset, else by the losses), and only it."""
    await _message_size_limit(tmp_path)


def test_batches_over_the_brokers_message_size_limit_on_uvloop(tmp_path):
    """The same on uvloop, the loop of ``edge-gateway run``: the resets close uvloop's poll of the socket, and paho's
    next write registration raised into the publisher, whose task ended (nothing published any more; red in most
    runs before: MqttLink's ``watch``)."""
    import uvloop

    uvloop.run(_message_size_limit(tmp_path))


async def _message_size_limit(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b", extra_config="message_size_limit 1000\n").start()
    col = Collector(broker.port)
    try:
        await wait_until(lambda: col.subscribed >= 1, 10)
        async with Store(str(tmp_path / "s.db")) as store:
            await commit(store, [row(i, size=300 if i != 13 else 3000) for i in range(1, 21)])
            link = MqttLink(cfg(broker.port), client_id="gw")
            pub = Publisher(store, link, window=10, batch_max=10, retry_backoff=(0.05, 0.2))
            tasks = await run_all(link.run(), pub.run())
            try:
                await wait_until(lambda: store.pending == 0, 40)
            finally:
                await cancel(tasks)
            assert list(await quarantine(store)) == [13]
            await wait_until(lambda: col.seqs() == set(range(1, 21)) - {13}, 10)
            assert col.first_arrivals()["m1"] == [i for i in range(1, 21) if i != 13]
    finally:
        col.stop()
        broker.close()


async def test_a_careful_session_in_batch_mode_keeps_to_the_batch_topic(tmp_path):
    """Batch mode, as nats-server's MQTT requires (it closes the connection at a '.' in a topic, and the events' own
    topics have one: operation.quantity_reported). The connection is lost twice at seq 1 (a node of the cluster
    going away), so the next sessions are careful: one event at a time. They sent it on its own, dotted topic, the
    broker closed each such connection, and seq 1 was quarantined as 'closed the connection each time this message
    was sent alone' (the fleet chaos test: the ERP short of it; red before). Now a batch of one on the batch topic:
    every row delivered, nothing quarantined, no dotted topic sent."""
    fb = FakeBroker(lambda seq, n: None if seq == 1 and n <= 2 else 0)
    fb.refuse_dots = True
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "m1" if i % 2 else "m2", topic=f"t/{'m1' if i % 2 else 'm2'}/events/a.b")
                             for i in range(1, 11)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=4, batch_max=4, retry_backoff=(0.05, 0.2))
        logs = await drain_logged(link, pub, store)
        assert await quarantine(store) == {} and pub.quarantined == 0
        assert set(fb.accepted) == set(range(1, 11)) and fb.closed_at == [1, 1]
        assert fb.topics and all(t.endswith("/events/batch") for t in fb.topics)
        lost = [(e["row"], e["losses"]) for e in logs if e["event"] == "publisher.connection_lost_at_row"]
        assert lost == [(1, 1), (1, 2)]  # then careful: seq 1 alone, as a batch of one, taken
    await fb.stop()


async def test_a_connection_that_dies_later_is_no_evidence_against_the_row_in_flight(tmp_path):
    """The network, not the row: the broker stops answering while seq 3 is in flight (no PUBACK, no reset) and the
    connection is lost only by the keepalive, each time. Seq 3 is never quarantined for it; once the broker answers
    again it is delivered."""
    answer = {"on": False}
    fb = FakeBroker(lambda seq, n: 0, delay=lambda seq, n: 0.0 if answer["on"] or seq != 3 else 30.0)
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i) for i in range(1, 6)])
        link = MqttLink(cfg(fb.port, keepalive_s=1), client_id="gw")
        pub = Publisher(store, link, window=4, retry_backoff=(0.05, 0.2))
        tasks = await run_all(link.run(), pub.run())
        try:
            await wait_until(lambda: link.connections >= 5, 30)
            assert await quarantine(store) == {} and pub._condemned is None
            answer["on"] = True
            await wait_until(lambda: store.pending == 0, 30)
        finally:
            await cancel(tasks)
        assert await quarantine(store) == {}
    await fb.stop()


async def test_the_brokers_receive_maximum_bounds_the_messages_in_flight(tmp_path):
    """A broker that announces Receive Maximum 5 (mosquitto: max_inflight_messages; others disconnect with 0x93 when a
    client exceeds it): never more than 4 of our messages unacknowledged (one left for the retained status at
    connect), although the window is 50 (red before: up to 50)."""
    fb = FakeBroker(lambda seq, n: 0, delay=lambda seq, n: 0.002)
    fb.receive_maximum = 5
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, f"m{i % 3}") for i in range(1, 121)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=50)
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, pub.inflight)
                await asyncio.sleep(0)

        tasks = await run_all(link.run(), pub.run(), watch())
        try:
            await wait_until(lambda: store.pending == 0, 30)
            assert link.connection is not None and link.connection.receive_maximum == 5
        finally:
            await cancel(tasks)
        assert 1 <= most <= 4
        assert set(fb.accepted) == set(range(1, 121))
    await fb.stop()


async def test_transient_puback_refusal_is_retried_in_order_not_quarantined(tmp_path):
    # 0x97 Quota exceeded for seq 3 (twice), 0x80 Unspecified error for seq 7 (once) and 0x89 Server busy for seq 11
    # (once: a DISCONNECT code paho cannot decode in a PUBACK; paho_fast reads it)
    refuse = {3: (0x97, 2), 7: (0x80, 1), 11: (0x89, 1)}
    fb = FakeBroker(lambda seq, n: refuse[seq][0] if seq in refuse and n <= refuse[seq][1] else 0)
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "m1" if i % 2 else "m2") for i in range(1, 21)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=4, retry_backoff=(0.05, 0.2))
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: store.pending == 0, 15)
        assert await quarantine(store) == {} and pub.quarantined == 0
        assert fb.refused == [(3, 0x97), (3, 0x97), (7, 0x80), (11, 0x89)]
        assert set(fb.accepted) == set(range(1, 21))
        assert link.connections == 1
        assert pub.retried == 4  # exported as edge_gateway_mqtt_retried_events_total (gateway/exporter.py)
        # the retry restarts from the oldest unacknowledged row: seq 3 before any row sent after its refusal
        first = []
        for s in fb.accepted:
            if s not in first:
                first.append(s)
        assert first.index(3) < first.index(9) and first.index(7) < first.index(13), first
        await cancel(tasks)
    await fb.stop()


async def test_live_rows_wait_for_their_machines_backlog_in_flight(tmp_path):
    """m1's last backlog row is in flight (the broker holds its PUBACK, then refuses it: 0x97) when m1's live rows are
    committed. They must not be sent behind it: the broker would accept them before the resent backlog row."""
    fb = FakeBroker(lambda seq, n: 0x97 if seq == 10 and n == 1 else 0, delay=lambda seq, n: 0.5 if seq == 10 and n == 1 else 0)
    await fb.start()
    async with Store(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "m1" if i % 2 == 0 else "m2") for i in range(1, 11)])
        link = MqttLink(cfg(fb.port), client_id="gw")
        pub = Publisher(store, link, window=20, retry_backoff=(0.05, 0.2))
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: fb.attempts.get(10) == 1 and pub.session is not None and pub.session.hold is not None, 10)
        live = await commit(store, [row(11, "m1"), row(12, "m1"), row(13, "m3")])
        pub.notify(live)
        await wait_until(lambda: store.pending == 0, 15)
        first: dict[str, list[int]] = {}
        for seq in fb.accepted:
            m = "m1" if seq in (11, 12) or (seq <= 10 and seq % 2 == 0) else ("m3" if seq == 13 else "m2")
            if seq not in first.get(m, []):
                first.setdefault(m, []).append(seq)
        assert first["m1"] == [2, 4, 6, 8, 10, 11, 12], first
        assert fb.refused == [(10, 0x97)] and await quarantine(store) == {}
        await cancel(tasks)
    await fb.stop()


# --------------------------------------------------------------------------------------------------- 3. SUBACK
@pytest.mark.parametrize("protocol,reason", [("5", "Not authorized"), ("3.1.1", "Unspecified error")])
async def test_refused_subscription_is_exposed_and_logged_once(tmp_path, protocol, reason, monkeypatch):
    """A refused subscription is an alarm-worthy state, logged once, and asked for again with backoff on the same
    connection (an ACL fixed later, or a clustered broker electing leaders, starts working without a reconnect)."""
    import gateway.mqtt as mqtt_module

    monkeypatch.setattr(mqtt_module, "SUBSCRIBE_RETRY_S", 0.1)
    monkeypatch.setattr(mqtt_module, "SUBSCRIBE_RETRY_MAX_S", 0.2)
    if not Path(DYNSEC).exists():
        pytest.fail(f"mosquitto dynamic security plugin not found at {DYNSEC} (it ships with mosquitto 2.0)")
    dyn = tmp_path / "dynsec.json"
    dyn.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                             "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anon", "roles": [{"rolename": "r"}]}], "anonymousGroup": "anon",
        "roles": [{"rolename": "r", "acls": [{"acltype": "subscribePattern", "topic": "edge/+/dispatch",
                                              "allow": False, "priority": 0}]}]}))
    broker = MosquittoBroker(tmp_path / "b", extra_config=f"plugin {DYNSEC}\nplugin_opt_config_file {dyn}\n").start()
    try:
        with structlog.testing.capture_logs() as logs:
            link = MqttLink(cfg(broker.port, protocol=protocol), client_id="gw",
                            subscriptions=["edge/+/dispatch", "edge/+/acks"])
            tasks = await run_all(link.run())
            await wait_until(lambda: link.refused_subscriptions, 10)
            assert link.refused_subscriptions == {"edge/+/dispatch": reason}
            assert link.status.as_dict()["refused_subscriptions"] == {"edge/+/dispatch": reason}
            first = link.connection
            await broker.astop()
            await broker.astart()
            await wait_until(lambda: link.connections >= 2, 15)
            # both SUBACKs of the new connection handled (each one pops its mid)
            await wait_until(lambda: link.connection not in (None, first) and not link.connection.sub_mids, 10)
            assert link.refused_subscriptions == {"edge/+/dispatch": reason}
            asked = link.resubscribes
            await wait_until(lambda: link.resubscribes >= asked + 3, 10)  # asked again, refused again
            assert link.refused_subscriptions == {"edge/+/dispatch": reason}
            await cancel(tasks)
        refused = [e for e in logs if e["event"] == "mqtt.subscription_refused"]
        assert len(refused) == 1 and refused[0]["log_level"] == "error"
        assert refused[0]["topic"] == "edge/+/dispatch" and refused[0]["reason"] == reason
    finally:
        broker.close()


# --------------------------------------------------------------------------------------------------- 5./6. order
@pytest.mark.parametrize("handover", ["store", "memory"])
async def test_live_lane_keeps_each_machines_order(tmp_path, mqtt_broker, handover):
    """A backlog of three machines drains slowly (backlog_rate); live rows of those machines and of a fourth one are
    committed meanwhile. Per machine the first arrivals are in seq order; the fourth machine's live rows do not wait
    for the backlog."""
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with Store(str(tmp_path / "s.db")) as store:
        machines = ["a", "b", "c"]
        await commit(store, [row(i, machines[i % 3]) for i in range(1, 601)])
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
        pub = Publisher(store, link, window=20, backlog_rate=300)
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: len(col.msgs) >= 50, 10)
        seq = 601
        for _ in range(5):
            live = [row(s, m) for s, m in zip(range(seq, seq + 8), ["a", "b", "c", "d"] * 2)]
            seq += 8
            committed = await commit(store, live)
            pub.notify(committed) if handover == "memory" else pub.notify()
            await asyncio.sleep(0.1)
        await wait_until(lambda: store.pending == 0, 20)
        await wait_until(lambda: col.seqs() == set(range(1, seq)), 10)
        first = col.first_arrivals()
        for m in ("a", "b", "c", "d"):
            assert first[m] == sorted(first[m]), f"machine {m}: first arrivals out of seq order: {first[m]}"
        arrival = {s: i for i, (s, _) in reversed(list(enumerate(col.msgs)))}
        assert max(arrival[s] for s in first["d"]) < arrival[600], "the free machine's live rows waited for the backlog"
        await cancel(tasks)
    col.stop()


class ScanGatedStore(Store):
    """A Store whose backlog scan (``last_ids_by_machine``) waits for ``scan_gate``: the scan of a large outbox."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.scan_gate = asyncio.Event()
        self.scans_waiting = 0

    async def last_ids_by_machine(self, upto_id):
        self.scans_waiting += 1
        try:
            await self.scan_gate.wait()
        finally:
            self.scans_waiting -= 1
        return await super().last_ids_by_machine(upto_id)


async def test_live_rows_do_not_wait_for_the_backlog_scan(tmp_path, mqtt_broker):
    """A session starting with a backlog knows at once which machines may have rows in it (the rows this store
    wrote): a machine outside it publishes live rows while the scan of the outbox still runs (it took ~1.2 s per
    million rows, and every live event waited for it: bench/backlog.py's live latency). A machine inside that bound
    whose rows are all gone (here purged) is held until the scan says so, then released while the backlog still
    drains. Per machine, first arrivals stay in seq order."""
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with ScanGatedStore(str(tmp_path / "s.db")) as store:
        await commit(store, [row(i, "a") for i in range(1, 601)])
        gone = await commit(store, [row(i, "b") for i in range(601, 611)])
        assert await store.purge("outbox", [r.id for r in gone]) == 10  # b has no backlog, the bound still names it
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
        pub = Publisher(store, link, window=20, backlog_rate=300)
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: store.scans_waiting == 1 and len(col.msgs) >= 20, 10)
        live = await commit(store, [row(611, "a"), row(612, "b"), row(613, "c"), row(614, "c")])
        pub.notify(live)
        await wait_until(lambda: {613, 614} <= col.seqs(), 10)  # c: not in the bound, not held by the scan
        assert 600 not in col.seqs(), "c's live rows waited for the backlog"
        assert store.scans_waiting == 1
        assert not {611, 612} & col.seqs(), "a live row of a machine that may have backlog went before the scan"
        store.scan_gate.set()
        await wait_until(lambda: 612 in col.seqs(), 10)  # b: released by the scan ...
        assert 600 not in col.seqs(), "b waited for a's backlog"  # ... before a's backlog is through
        await wait_until(lambda: store.pending == 0 and col.seqs() == set(range(1, 601)) | {611, 612, 613, 614}, 20)
        first = col.first_arrivals()
        assert first["a"] == list(range(1, 601)) + [611] and first["b"] == [612] and first["c"] == [613, 614]
        await cancel(tasks)
    col.stop()


async def test_rows_handed_over_are_published_from_memory_with_bounded_queue(tmp_path, mqtt_broker):
    col = Collector(mqtt_broker.port)
    await wait_until(lambda: col.subscribed >= 1, 10)
    async with GatedStore(str(tmp_path / "s.db")) as store:
        link = MqttLink(cfg(mqtt_broker.port), client_id="gw")
        pub = Publisher(store, link, window=20, handover_max=50, idle_poll_s=60)
        tasks = await run_all(link.run(), pub.run())
        await wait_until(lambda: pub.session is not None and pub.session.waiting, 10)
        fetches = store.fetches
        small = await commit(store, [row(i, "m1") for i in range(1, 21)])
        pub.notify(small)
        await wait_until(lambda: col.seqs() == set(range(1, 21)) and pub.inflight == 0, 10)
        assert store.fetched == [], "rows handed over were read back from the store"
        # nor was the store asked for more after them (one round trip to SQLite's thread per commit)
        assert store.fetches == fetches
        # more than handover_max at once: the queue is dropped, the live lane reads from the store from its cursor
        big = await commit(store, [row(i, "m1") for i in range(21, 121)])
        pub.notify(big)
        more = await commit(store, [row(i, "m1") for i in range(121, 131)])
        pub.notify(more)
        pub.notify()  # no rows: read from the store
        await wait_until(lambda: col.seqs() == set(range(1, 131)) and store.pending == 0, 10)
        assert set(store.fetched) >= set(range(21, 121))
        assert col.first_arrivals()["m1"] == list(range(1, 131))
        await cancel(tasks)
    col.stop()


def test_a_socket_the_loop_will_not_watch_again_is_given_up_and_the_link_reconnects(tmp_path):
    """The last resort of MqttLink's socket watch: the loop refuses the socket even after its old poll was dropped
    (uvloop, after a connection reset, for a socket it already closed the poll of). The link must not leave that
    connection half alive, with paho's writes queued and nothing read: the socket is shut down and read at once,
    paho sees the connection lost, the link connects again and the publisher sends what is left. Here the loop's
    add_reader / add_writer raise for the first connection's socket once the test says so (red before that branch:
    the RuntimeError reached the publisher's task, which ended: the rows after the break were never sent). On
    asyncio's loop whatever EDGE_GATEWAY_TEST_LOOP says: uvloop's methods cannot be replaced on its loop."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(_refused_watch(tmp_path))


async def _refused_watch(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b").start()
    col = Collector(broker.port)
    loop = asyncio.get_running_loop()
    refused: list[object] = []  # sockets whose watch the loop refuses
    raised = []
    real = {"add_reader": loop.add_reader, "add_writer": loop.add_writer}

    def refusing(name):
        def add(fd, *args):
            if any(fd is sock for sock in refused):
                raised.append(name)
                raise RuntimeError("the loop closed this file descriptor's poll (as uvloop does after a reset)")
            return real[name](fd, *args)
        return add

    loop.add_reader, loop.add_writer = refusing("add_reader"), refusing("add_writer")
    try:
        await wait_until(lambda: col.subscribed >= 1, 10)
        async with Store(str(tmp_path / "s.db")) as store:
            await commit(store, [row(i) for i in range(1, 6)])
            # a keepalive far beyond the waits below: only the link's own reaction finds the connection lost
            link = MqttLink(cfg(broker.port, keepalive_s=60), client_id="gw")
            pub = Publisher(store, link, window=4, retry_backoff=(0.05, 0.2))
            with structlog.testing.capture_logs() as logs:
                tasks = await run_all(link.run(), pub.run())
                try:
                    await wait_until(lambda: store.pending == 0, 20)
                    first = link.connection
                    refused.append(first.client.socket())
                    await commit(store, [row(i) for i in range(6, 21)])
                    pub.notify()
                    await wait_until(lambda: store.pending == 0, 10)
                    assert link.connection is not first and link.connections >= 2
                    assert not any(t.done() for t in tasks), "the link's or the publisher's task ended"
                finally:
                    await cancel(tasks)
            assert raised[:2] == ["add_writer", "add_reader"], raised  # the write watch, then the fresh one
            assert any(e["event"] == "mqtt.socket_watched_again" for e in logs)
            await wait_until(lambda: col.seqs() == set(range(1, 21)), 10)
            assert col.first_arrivals()["m1"] == list(range(1, 21))
    finally:
        loop.add_reader, loop.add_writer = real["add_reader"], real["add_writer"]
        col.stop()
        broker.close()
