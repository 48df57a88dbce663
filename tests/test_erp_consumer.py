"""ERP consumer against a real mosquitto: dedup, conflicts (same id or same seq, different content), decimal ledger,
unassigned bucket, malformed input, seq gaps, retained dispatch, persistence across consumer restarts, reconnect after
a broker restart."""

from __future__ import annotations

import json
import threading
import uuid
from decimal import Decimal

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from simulators.erp import ErpConsumer

SOURCE = "/acme/p1/a1/l1/gw-test"
HIER = ("acme", "p1", "a1", "l1")
EPOCH = "epoch-a"


def event(seq: int, *, type: str = "operation.quantity_reported", source: str = SOURCE, epoch: str = EPOCH,
          machine: str = "press-1", order: str | None = "4711", operation: str | None = "0010",
          qty: tuple[str, str, str] = ("1", "0", "0"), data: dict | None = None, **overrides) -> dict:
    if data is None:
        data = {"machine": machine}
        if type == "operation.quantity_reported":
            data.update({"order": order, "operation": operation, "unassigned": order is None, "reason": "periodic",
                         "quantities": dict(zip(("yield", "scrap", "rework"), qty)), "unit": "PCE"})
    ev = {"specversion": "1.0", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{source}|{epoch}|{seq}")),
          "source": source, "type": type, "subject": machine, "time": "2026-11-22T08:15:02.120000Z",
          "datacontenttype": "application/json", "seq": seq, "epoch": epoch, "data": data}
    ev.update(overrides)
    return ev


def event_topic(ev: dict, machine: str = "press-1") -> str:
    return f"edge/v1/{'/'.join(HIER)}/{machine}/events/{ev.get('type', 'x')}"


class Client:
    """A plain paho client: publish with PUBACK wait, or collect messages of a subscription."""

    def __init__(self, port: int, subscribe: str | None = None) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.ready = threading.Event()
        self._sub = subscribe
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = lambda c, u, m: self.messages.append(m)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(5), "test client did not connect/subscribe"

    def _on_connect(self, c, u, flags, rc, props) -> None:
        if self._sub:
            c.subscribe(self._sub, qos=1)
        else:
            self.ready.set()

    def publish(self, topic: str, payload: bytes | str | dict, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def send(self, *events: dict) -> None:
        for ev in events:
            self.publish(event_topic(ev), ev)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
async def erp(mqtt_broker, tmp_path):
    consumer = ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-t")
    await consumer.start()
    yield consumer
    await consumer.stop()


@pytest.fixture
def pub(mqtt_broker):
    c = Client(mqtt_broker.port)
    yield c
    c.close()


def handled(erp: ErpConsumer) -> int:
    return erp.stats["accepted"] + erp.stats["duplicates"] + erp.stats["conflicts"]


async def test_duplicate_event_is_booked_once(erp, pub):
    ev = event(1, qty=("5", "1", "0"))
    pub.send(ev, ev)
    await erp.wait_for(lambda: handled(erp) == 2, 5)
    assert erp.stats["accepted"] == 1 and erp.stats["duplicates"] == 1 and erp.stats["conflicts"] == 0
    assert erp.conflicts() == []
    assert erp.ledger() == {("press-1", "4711", "0010"): {"yield": Decimal(5), "scrap": Decimal(1), "rework": Decimal(0)}}
    assert len(erp.events()) == 1


async def test_same_event_in_another_serialisation_or_in_a_batch_is_a_duplicate_not_a_conflict(erp, pub):
    """What may differ between two sends of one event is transport only: the JSON text (key order, spacing) and
    whether it came alone or inside a CloudEvents batch. Nothing of the CloudEvent itself."""
    ev = event(1, qty=("5", "1", "0"))
    pub.send(ev)
    pub.publish(event_topic(ev), json.dumps(dict(reversed(list(ev.items()))), indent=2))   # other key order/spacing
    pub.publish(f"edge/v1/{'/'.join(HIER)}/press-1/events/batch", json.dumps([event(2), ev]))
    await erp.wait_for(lambda: handled(erp) == 4, 5)
    assert (erp.stats["accepted"], erp.stats["duplicates"], erp.stats["conflicts"]) == (2, 2, 0)
    assert erp.conflicts() == []


@pytest.mark.erp_conflicts_expected
async def test_same_id_with_a_different_quantity_is_a_conflict(erp, pub):
    first = event(1, qty=("5", "1", "0"))
    second = event(1, qty=("6", "1", "0"))       # same source, epoch, seq and therefore id; another quantity
    assert first["id"] == second["id"]
    with structlog.testing.capture_logs() as logs:
        pub.send(first, second)
        await erp.wait_for(lambda: handled(erp) == 2, 5)
    assert (erp.stats["accepted"], erp.stats["duplicates"], erp.stats["conflicts"]) == (1, 0, 1)
    # the first version stays booked, the second is not: the conflict is recorded with both versions
    assert erp.ledger() == {("press-1", "4711", "0010"): {"yield": Decimal(5), "scrap": Decimal(1), "rework": Decimal(0)}}
    [c] = erp.conflicts()
    assert c["kind"] == "same_id" and c["source"] == SOURCE and c["id"] == first["id"] and c["seq"] == 1
    assert c["stored"] == first and c["received"] == second
    errors = [e for e in logs if e["event"] == "erp.conflict"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error" and errors[0]["id"] == first["id"]


@pytest.mark.erp_conflicts_expected
async def test_same_id_with_another_attribute_changed_is_a_conflict(erp, pub):
    """Not only the data: any CloudEvent attribute (here ``time``) differing under one id is a conflict."""
    first = event(1)
    pub.send(first, {**first, "time": "2026-11-22T08:15:03.000000Z"})
    await erp.wait_for(lambda: handled(erp) == 2, 5)
    assert erp.stats["conflicts"] == 1 and erp.stats["duplicates"] == 0
    assert erp.conflicts()[0]["received"]["time"] == "2026-11-22T08:15:03.000000Z"


@pytest.mark.erp_conflicts_expected
async def test_same_seq_under_a_different_id_is_a_conflict(erp, pub):
    first = event(7, qty=("5", "0", "0"))
    other = {**event(7, qty=("5", "0", "0")), "id": str(uuid.uuid4())}   # seq 7 of the same stream, a new id
    with structlog.testing.capture_logs() as logs:
        pub.send(first, other)
        await erp.wait_for(lambda: handled(erp) == 2, 5)
    assert erp.stats["conflicts"] == 1 and erp.stats["duplicates"] == 0
    [c] = erp.conflicts()
    assert c["kind"] == "same_seq" and c["seq"] == 7 and c["epoch"] == EPOCH
    assert c["stored"] == first and c["received"] == other
    assert [e["log_level"] for e in logs if e["event"] == "erp.conflict"] == ["error"]
    # the same seq in another epoch or from another source is a different stream: no conflict
    pub.send(event(7, epoch="epoch-b"), event(7, source="/acme/p1/a1/l1/gw-2"))
    await erp.wait_for(lambda: handled(erp) == 4, 5)
    assert erp.stats["conflicts"] == 1


@pytest.mark.erp_conflicts_expected
async def test_conflicts_are_detected_across_a_consumer_restart(mqtt_broker, tmp_path, pub):
    db = str(tmp_path / "erp.db")
    async with ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=db, client_id="erp-r") as first:
        pub.send(event(1, qty=("2", "0", "0")), event(2))
        await first.wait_for(lambda: first.stats["accepted"] == 2, 5)
    async with ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=db, client_id="erp-r") as second:
        pub.send(event(1, qty=("2", "0", "0")), event(1, qty=("3", "0", "0")),
                 {**event(2), "id": str(uuid.uuid4())})
        await second.wait_for(lambda: handled(second) == 3, 5)
        assert (second.stats["duplicates"], second.stats["conflicts"]) == (1, 2)
        assert [c["kind"] for c in second.conflicts()] == ["same_id", "same_seq"]
    async with ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=db, client_id="erp-r") as third:
        assert len(third.conflicts()) == 2        # the record survives a restart


async def test_ledger_sums_decimals_per_order_and_keeps_unassigned(erp, pub):
    pub.send(event(1, qty=("1.25", "0.5", "0")),
             event(2, qty=("2.5", "0.25", "0.1")),
             event(3, order="4712", qty=("10", "0", "0")),
             event(4, order=None, operation=None, qty=("3", "1", "0")),
             event(5, type="operation.started", data={"machine": "press-1", "order": "4711", "operation": "0010"}),
             event(6, machine="press-2", order=None, operation=None, qty=("7", "0", "0")))
    led = await erp.wait_for(lambda: erp.stats["accepted"] == 6, 5)
    assert led[("press-1", "4711", "0010")] == {"yield": Decimal("3.75"), "scrap": Decimal("0.75"), "rework": Decimal("0.1")}
    assert led[("press-1", "4712", "0010")]["yield"] == Decimal(10)
    assert led[("press-1", None, None)] == {"yield": Decimal(3), "scrap": Decimal(1), "rework": Decimal(0)}
    assert led[("press-2", None, None)]["yield"] == Decimal(7)
    assert all(isinstance(v, Decimal) for q in led.values() for v in q.values())
    assert erp.totals_by_machine()["press-1"] == {"yield": Decimal("16.75"), "scrap": Decimal("1.75"), "rework": Decimal("0.1")}
    assert erp.stats["by_type"] == {"operation.quantity_reported": 5, "operation.started": 1}
    assert [e["seq"] for e in erp.events("operation.quantity_reported")] == [1, 2, 3, 4, 6]


async def test_malformed_messages_are_rejected_and_consumer_keeps_working(erp, pub):
    topic = event_topic(event(0))
    good = event(1)
    bad = [b"{not json", b"\xff\xfe", b"", json.dumps([good]).encode(),
           {k: v for k, v in good.items() if k != "id"},
           {**good, "specversion": "0.3"},
           {**good, "source": 42},
           {**good, "seq": "seven"},
           event(2, qty=("-1", "0", "0")),
           event(3, qty=("1e3", "0", "0")),
           event(4, data={"machine": "press-1", "order": "4711", "operation": "0010"})]
    for payload in bad:
        pub.publish(topic, payload)
    pub.send(good)
    await erp.wait_for(lambda: erp.stats["accepted"] == 1, 5)
    assert erp.stats["rejected"] == len(bad)
    assert erp.stats["rejected_by_reason"]["invalid_json"] == 3
    assert erp.stats["rejected_by_reason"]["wrong_specversion"] == 1
    assert erp.stats["rejected_by_reason"]["bad_quantity"] == 2
    assert erp.ledger() == {("press-1", "4711", "0010"): {"yield": Decimal(1), "scrap": Decimal(0), "rework": Decimal(0)}}
    assert erp.gaps() == {}  # rejected events do not count as seen sequence numbers


async def test_gaps_per_source_and_epoch(erp, pub):
    pub.send(*(event(s) for s in (3, 4, 6, 9)))          # first seen is 3: 1..2 are not a gap
    pub.send(*(event(s, epoch="epoch-b") for s in (1, 2, 3)))
    pub.send(*(event(s, source="/acme/p1/a1/l1/gw-2") for s in (10, 12)))
    pub.send(event(6))                                      # a duplicate changes nothing
    await erp.wait_for(lambda: erp.stats["accepted"] == 9 and erp.stats["duplicates"] == 1, 5)
    assert erp.gaps() == {(SOURCE, EPOCH): [5, 7, 8], ("/acme/p1/a1/l1/gw-2", EPOCH): [11]}
    pub.send(event(5), event(7), event(8), event(11, source="/acme/p1/a1/l1/gw-2"))
    await erp.wait_for(lambda: erp.stats["accepted"] == 13, 5)
    assert erp.gaps() == {}


async def test_dispatch_is_retained_for_late_subscribers_and_can_be_cleared(erp, mqtt_broker):
    topic = erp.dispatch_topic(*HIER, "press-1")
    sent = erp.dispatch(*HIER, "press-1", "1000123", "0010", planned_quantity=Decimal("500"),
                        components=[{"material": "RM-100", "quantity_per_unit": Decimal("0.25"), "unit": "KG"}])
    late = Client(mqtt_broker.port, subscribe=topic)
    try:
        await erp.wait_for(lambda: late.messages, 5)
        m = late.messages[0]
        assert m.retain and m.topic == topic
        body = json.loads(m.payload)
        assert body == sent == {"order": "1000123", "operation": "0010", "status": "active", "unit": "PCE",
                                "planned_quantity": "500",
                                "components": [{"material": "RM-100", "quantity_per_unit": "0.25", "unit": "KG"}]}
    finally:
        late.close()

    minimal = erp.dispatch(*HIER, "press-2", "7", "20", unit=None)
    assert minimal == {"order": "7", "operation": "20", "status": "active"}

    erp.clear_dispatch(*HIER, "press-1")
    marker = f"edge/v1/{'/'.join(HIER)}/zz-marker/dispatch"
    again = Client(mqtt_broker.port, subscribe=f"edge/v1/{'/'.join(HIER)}/+/dispatch")
    try:
        erp.publish_raw(marker, b"m")      # arrives after any retained message the subscription delivers
        await erp.wait_for(lambda: any(m.topic == marker for m in again.messages), 5)
        assert [m.topic for m in again.messages if m.retain] == [erp.dispatch_topic(*HIER, "press-2")]
    finally:
        again.close()


async def test_ledger_and_dedup_survive_a_consumer_restart(mqtt_broker, tmp_path, pub):
    db = str(tmp_path / "erp.db")
    async with ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=db) as first:
        pub.send(event(1, qty=("2", "0", "0")), event(2, qty=("3", "1", "0")))
        await first.wait_for(lambda: first.stats["accepted"] == 2, 5)
    async with ErpConsumer(mqtt_broker.host, mqtt_broker.port, db_path=db) as second:
        assert second.ledger() == {("press-1", "4711", "0010"): {"yield": Decimal(5), "scrap": Decimal(1), "rework": Decimal(0)}}
        pub.send(event(2, qty=("3", "1", "0")), event(4))   # a redelivery of 2 after the restart, and a gap at 3
        await second.wait_for(lambda: second.stats["accepted"] + second.stats["duplicates"] == 2, 5)
        assert second.stats["duplicates"] == 1
        assert second.ledger()[("press-1", "4711", "0010")]["yield"] == Decimal(6)
        assert second.gaps() == {(SOURCE, EPOCH): [3]}
        assert [e["seq"] for e in second.events()] == [1, 2, 4]


@pytest.mark.parametrize("outage", ["stop", "kill"])
async def test_consumer_keeps_receiving_after_broker_restart_on_same_port(erp, mqtt_broker, outage):
    port = mqtt_broker.port
    p1 = Client(port)
    p1.send(event(1))
    await erp.wait_for(lambda: erp.stats["accepted"] == 1, 5)
    p1.close()

    getattr(mqtt_broker, outage)()              # SIGTERM, or SIGKILL (a crash)
    assert not mqtt_broker.running
    await erp.wait_for(lambda: not erp.connected, 5)
    mqtt_broker.start()
    assert mqtt_broker.port == port
    await erp.wait_connected(10)               # reconnected and resubscribed by itself
    assert erp.stats["connects"] >= 2

    p2 = Client(port)
    try:
        p2.send(event(2, qty=("4", "0", "0")))
        await erp.wait_for(lambda led: led.get(("press-1", "4711", "0010"), {}).get("yield") == Decimal(5), 5)
    finally:
        p2.close()
    assert erp.gaps() == {}
    assert "mosquitto" in mqtt_broker.log_text()


@pytest.mark.erp_conflicts_expected
async def test_the_shared_ledger_assertion_fails_on_a_conflict(erp, pub):
    """tests/e2e.assert_ledger_matches (used by every end-to-end test) fails on a conflict even when the ledger of
    the machines under test equals their truth."""
    from simulators.machine import MachineModel
    from tests.e2e import assert_ledger_matches

    idle = MachineModel("Press1", cycle_time=0.01, seed=1, counter_bits=32)   # made nothing: truth is empty
    pub.send(event(1, machine="press-9"), event(1, machine="press-9", qty=("2", "0", "0")))
    await erp.wait_for(lambda: handled(erp) == 2, 5)
    with pytest.raises(AssertionError, match="1 conflict"):
        await assert_ledger_matches(erp, {"press-1": idle}, timeout=1)
