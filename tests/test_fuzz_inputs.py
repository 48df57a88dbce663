"""Fuzz what arrives from the network (issue 8): MQTT dispatch payloads, the local order command's body and the ERP's
acks. Each parser either returns a valid value or raises ``DispatchRejected`` - nothing else - and every accepted
order context survives the machine engine (dispatch, counting, backflush, completion), ``snapshot()`` ->
``json.dumps`` -> restore, and the CloudEvents encoding of every event it produced, which must also validate against
the published contract. One retained dispatch that raised inside the core would crash-loop the gateway."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayIdentity
from gateway.dispatch import DispatchRejected, parse_dispatch
from gateway.events import EventEncoder, Topics, event_source
from gateway.schema import validate_event
from mappings.counters import CounterSpec
from mappings.machine import CounterBinding, MachineEngine, MachineSpec, OrderContext
from mappings.samples import Sample

IDENT = GatewayIdentity(id="gw-01", enterprise="acme", site="plant-1", area="assembly", line="line-1")
TOPICS = Topics("edge", IDENT)
SOURCE = event_source(IDENT)
EPOCH = "epoch-1"
ENCODER = EventEncoder(IDENT, TOPICS, EPOCH)
SPEC = MachineSpec(id="press-1", counters={"good": CounterBinding(CounterSpec("good"), Decimal("2.5")),
                                           "scrap": CounterBinding(CounterSpec("scrap"))})
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.filter_too_much])

# ------------------------------------------------------------------------------------------------ strategies
tricky_text = st.sampled_from(["", " ", "0010", "A" * 41, "A" * 17, "a/b", "#", "+", "\x00", "\x1f", "\u00e9",
                               "\ud800", "\U0001f600", "1e100", "NaN", "-1", "KG", "PCE" * 3])
text = st.one_of(st.text(max_size=20), tricky_text)
numberish = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-(10**6), 10**6), st.integers(-400, 400)),
    st.builds(lambda m, e: f"{m}E{e}", st.integers(0, 999), st.sampled_from([100, 999999, 10**6, 10**9, -(10**6)])),
    st.sampled_from(["0", "-0", "0.000001", "0.0000001", "999999999.999999", "1000000000", "123456789012345",
                     "1e-6", "1E+8", "Infinity", "-Infinity", "sNaN", " 1", "1_000", "0x10", "1" * 5000]),
    text,
)
leaf = st.one_of(st.none(), st.booleans(), numberish, text)
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                          max_leaves=12)


def maybe(s):
    return st.one_of(s, s, s, json_value)


component = st.fixed_dictionaries(
    {"material": maybe(st.sampled_from(["RM-100", "RM-200"]) | text),
     "quantity_per_unit": maybe(numberish),
     "unit": maybe(st.sampled_from(["KG", "PCE", "L"]) | text)},
    optional={"extra": json_value})
dispatch_doc = st.fixed_dictionaries(
    {"order": maybe(st.sampled_from(["1000123", "1"]) | text), "operation": maybe(st.sampled_from(["0010", "1"]) | text)},
    optional={"status": maybe(st.sampled_from(["active", "completed", "released"])),
              "unit": maybe(st.sampled_from(["PCE", "KG"]) | text),
              "planned_quantity": maybe(numberish),
              "components": maybe(st.lists(maybe(component), max_size=4)),
              "dispatched_at": maybe(text),
              "clear": maybe(st.booleans()),
              "priority": json_value})
nested = st.integers(1, 200_000).map(lambda n: (b"[" * n) + (b"]" * n))


def as_bytes(doc) -> bytes:
    return json.dumps(doc).encode()  # NaN / Infinity allowed: Python's json reads them back


payloads = st.one_of(dispatch_doc.map(as_bytes), dispatch_doc.map(as_bytes), json_value.map(as_bytes),
                     st.binary(max_size=300), nested, st.just(b"\xff\xfe{}"), st.just(b'{"order": "1"' * 7000))

EXAMPLES = [
    b'{"order":"1","operation":"1","planned_quantity":"1e100"}',  # the crash-looping retained dispatch
    b'{"order":"1","operation":"1","planned_quantity":1e308}',
    b'{"order":"1","operation":"1","planned_quantity":"1E+999999999"}',
    b'{"order":"1","operation":"1","components":[{"material":"RM","quantity_per_unit":"1e-100","unit":"KG"}]}',
    b'{"order":"1","operation":"1","components":[{"material":"RM","quantity_per_unit":"1e100","unit":"KG"}]}',
    b'{"order":"1","operation":"1","planned_quantity":"NaN"}',
    b'{"order":"\\ud800","operation":"1"}',
    b'{"order":"1","operation":"1","planned_quantity":' + b"1" * 5000 + b"}",
    b"[" * 100_000,
]


# ------------------------------------------------------------------------------------------------ the engine check
def survives_engine(ctx: OrderContext) -> None:
    """Dispatch ``ctx`` to a fresh engine, count, restart from a JSON snapshot, complete: no exception anywhere, every
    event encodes and validates against the contract."""
    eng = MachineEngine(SPEC)
    events = eng.dispatch(ctx, 1_800_000_000.0)
    mono = 10.0
    for good, scrap in ((100, 0), (4_000_000_000, 2), (4_294_967_295, 3)):
        for name, v in (("good", good), ("scrap", scrap)):
            events += eng.apply(Sample(f"press-1/{name}", v, True, recv_time=1_800_000_000.0 + mono,
                                       source_time=1_800_000_000.0 + mono, mono=mono), name)
        mono += 10**8  # long enough for any increase to be plausible
    assert eng.snapshot_json() == json.dumps(eng.snapshot(), separators=(",", ":"))  # what the core commits
    snap = json.loads(eng.snapshot_json())
    again = MachineEngine(SPEC, snap)
    assert json.loads(json.dumps(again.snapshot())) == snap
    events += again.flush("periodic", 1_800_000_100.0)
    if ctx is not None and ctx.status == "active":
        events += again.dispatch(OrderContext(ctx.order, ctx.operation, status="completed"), 1_800_000_200.0)
    else:
        events += again.dispatch(ctx, 1_800_000_200.0)
    assert again.snapshot_json() == json.dumps(again.snapshot(), separators=(",", ":"))
    for seq, ev in enumerate(events, 1):
        topic, payload = ENCODER.encode(ev, seq)
        topic.encode("utf-8")
        validate_event(payload)


def check_dispatch(payload: bytes) -> None:
    try:
        ctx = parse_dispatch(payload)
    except DispatchRejected as exc:
        assert exc.reason and isinstance(exc.detail, str)
        exc.detail.encode("utf-8")
        return
    survives_engine(ctx)


# ------------------------------------------------------------------------------------------------ dispatch (MQTT)
@FUZZ
@given(payload=payloads)
@example(b'{"order":"1","operation":"1","planned_quantity":"1e100"}')
def test_fuzz_dispatch(payload):
    check_dispatch(payload)


@pytest.mark.parametrize("payload", EXAMPLES, ids=range(len(EXAMPLES)))
def test_dispatch_examples(payload):
    check_dispatch(payload)


def test_unbounded_decimals_are_rejected_with_a_reason():
    for payload in EXAMPLES[:6]:
        with pytest.raises(DispatchRejected) as exc:
            parse_dispatch(payload)
        assert exc.value.reason == "schema", payload
    ctx = parse_dispatch(b'{"order":"1","operation":"1","planned_quantity":"999999999.999999",'
                         b'"components":[{"material":"RM","quantity_per_unit":"0.000001","unit":"KG"}]}')
    assert ctx.planned_quantity == Decimal("999999999.999999")
    assert ctx.components[0].quantity_per_unit == Decimal("0.000001")


CONTROL = ["\x00", "\x01", "\n", "\x1f", "\x7f", "\x80", "\x85", "\x9b", "\x9f"]


@pytest.mark.parametrize("ch", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
def test_a_control_character_in_an_order_number_is_rejected_naming_the_field(ch):
    """An ERP order / operation number never holds a control character (C0, DEL or C1): the MQTT dispatch and the
    local order command refuse it, the detail naming the field. Red before for the C1 range (U+0080-U+009F)."""
    from gateway.dispatch import parse_local_order

    for doc, field in (({"order": f"1000{ch}123", "operation": "0010"}, "order"),
                       ({"order": "1000123", "operation": f"0010{ch}"}, "operation"),
                       ({"order": f"{ch}1000123", "operation": "0010", "status": "completed"}, "order")):
        for parse in (parse_dispatch, parse_local_order):
            with pytest.raises(DispatchRejected) as exc:
                parse(json.dumps(doc).encode())
            assert exc.value.reason == "schema", (parse.__name__, doc)
            assert exc.value.detail == f"{field}: must not contain control characters (U+0000-U+001F, " \
                                       "U+007F-U+009F)", (parse.__name__, doc)
    # the characters next to the ranges are text: taken (U+00A0 no-break space, U+00E9)
    for text in ("1000\u00a0123", "Ordre-\u00e9t\u00e9", "~"):
        ctx = parse_dispatch(json.dumps({"order": text, "operation": text}).encode())
        assert (ctx.order, ctx.operation) == (text, text)
        survives_engine(ctx)


@pytest.mark.parametrize("ch", CONTROL, ids=[f"U+{ord(c):04X}" for c in CONTROL])
def test_a_control_character_in_any_text_of_a_dispatch_is_rejected_naming_the_field(ch):
    """The units and material numbers of a dispatch end up in events and ERP documents like the order number: no
    control character (C0, DEL or C1) there either, the detail naming the field. Red before for the C1 range."""
    comp = {"material": "RM-1", "quantity_per_unit": "2", "unit": "KG"}
    for doc, field in (({"order": "1", "operation": "10", "unit": f"PC{ch}"}, "unit"),
                       ({"order": "1", "operation": "10", "components": [{**comp, "material": f"RM{ch}1"}]},
                        "components.0.material"),
                       ({"order": "1", "operation": "10", "components": [{**comp, "unit": f"K{ch}G"}]},
                        "components.0.unit")):
        with pytest.raises(DispatchRejected) as exc:
            parse_dispatch(json.dumps(doc).encode())
        assert exc.value.reason == "schema", doc
        assert exc.value.detail == f"{field}: must not contain control characters (U+0000-U+001F, U+007F-U+009F)", doc


def test_text_from_the_network_is_logged_without_control_characters():
    """What the gateway logs of a refused message (a detail, an ERP's reason) has its control characters, C1
    included, replaced: a log line cannot be split or garbled by a message. Red before for the C1 range."""
    from gateway.dispatch import _clean

    assert _clean("a\x00b\nc\x7fd\x85e\x9bf\x9fg\xa0h\u00e9") == "a?b?c?d?e?f?g\xa0h\u00e9"


def test_dec_str_is_total_and_plain():
    from mappings.machine import dec_str

    cases = {"12": "12", "12.000": "12", "0.25": "0.25", "1E+2": "100", "1e100": "1" + "0" * 100,
             "1e-10": "0.0000000001", "-0": "0", "0E-30": "0", "1.5E+1": "15", "123456789012345678901234567890.5":
             "123456789012345678901234567890.5", "1E+1000000": "1" + "0" * 1_000_000}
    for raw, want in cases.items():
        assert dec_str(Decimal(raw)) == want, raw
    # an unscaled counter's quantity stays an int until rendered: the same text as its Decimal
    for n in (0, 7, -5, 10**30, -(10**30)):
        assert dec_str(n) == dec_str(Decimal(n)) == str(n)


# ------------------------------------------------------------------------------------------------ local order (HTTP)
@FUZZ
@given(payload=payloads)
@example(b'{"clear": true}')
@example(b'{"clear": false}')
def test_fuzz_local_order(payload):
    from gateway.dispatch import parse_local_order

    try:
        ctx = parse_local_order(payload)
    except DispatchRejected as exc:
        assert exc.reason
        return
    if ctx is not None:
        survives_engine(ctx)


def test_local_order_examples():
    from gateway.dispatch import parse_local_order

    assert parse_local_order(b'{"clear": true}') is None
    ctx = parse_local_order(b'{"order": "L-1", "operation": "0010", "status": "completed"}')
    assert (ctx.order, ctx.operation, ctx.status) == ("L-1", "0010", "completed")
    for payload, reason in ((b'{"order":"1","operation":"1","planned_quantity":"1e100"}', "schema"),
                            (b"not json", "invalid_json"), (b"[]", "schema"), (b"", "invalid_json"),
                            (b'{"clear": false}', "schema"), (b'{"clear": true, "order": "1"}', "schema"),
                            (b"{" * 70_000, "too_large")):
        with pytest.raises(DispatchRejected) as exc:
            parse_local_order(payload)
        assert exc.value.reason == reason, payload


# ------------------------------------------------------------------------------------------------ ERP acks
def event_doc(**over):
    ev = {"specversion": "1.0", "id": "6f1c0b5e-5d0c-5b6e-9a55-2d0c6c1f8f3a", "source": SOURCE,
          "type": "operation.quantity_reported", "subject": "press-1", "time": "2026-11-22T08:15:02.120000Z",
          "datacontenttype": "application/json", "seq": 7, "epoch": EPOCH, "data": {"machine": "press-1"}}
    ev.update(over)
    return {k: v for k, v in ev.items() if v is not ...}


ack_event = st.fixed_dictionaries(
    {"id": maybe(st.just("6f1c0b5e") | text), "source": maybe(st.sampled_from([SOURCE, "/x/y/z/w/gw-02"]) | text),
     "type": maybe(st.sampled_from(["operation.quantity_reported", "counter.anomaly", "a/b", "#"]) | text),
     "subject": maybe(st.sampled_from(["press-1", "press/1", "+", "#", ""]) | text)},
    optional={"seq": maybe(st.integers(-5, 2**70)), "epoch": maybe(st.sampled_from([EPOCH, "epoch-0"]) | text),
              "data": json_value, "specversion": maybe(st.just("1.0")), "time": maybe(text)})
ack_doc = st.fixed_dictionaries(
    {"status": maybe(st.sampled_from(["accepted", "rejected"]))},
    optional={"event": maybe(ack_event), "reason": maybe(text | st.just("x" * 5000)), "id": maybe(text),
              "source": maybe(text), "extra": json_value})
ack_payloads = st.one_of(ack_doc.map(as_bytes), ack_doc.map(as_bytes), ack_doc.map(as_bytes), json_value.map(as_bytes),
                         st.binary(max_size=200), nested)


@FUZZ
@given(payload=ack_payloads)
def test_fuzz_erp_ack(payload):
    from gateway.dispatch import parse_erp_ack

    try:
        ack = parse_erp_ack(payload, source=SOURCE, epoch=EPOCH)
    except DispatchRejected as exc:
        assert exc.reason
        return
    assert ack.status in ("accepted", "rejected")
    if ack.status == "rejected":
        assert ack.event["source"] == SOURCE and ack.event.get("epoch", EPOCH) == EPOCH
        assert ack.machine and not set("/#+") & set(ack.machine)
        assert not set("/#+") & set(ack.type)
        topic = TOPICS.event(ack.machine, ack.type)
        topic.encode("utf-8")
        json.dumps(ack.event).encode("utf-8")
        ack.reason.encode("utf-8")
        assert len(ack.reason) <= 500


def test_erp_ack_examples():
    from gateway.dispatch import parse_erp_ack

    def ack(doc):
        return parse_erp_ack(json.dumps(doc).encode(), source=SOURCE, epoch=EPOCH)

    r = ack({"status": "rejected", "event": event_doc(), "reason": "order locked"})
    assert (r.status, r.event_id, r.machine, r.type, r.seq, r.reason) == \
        ("rejected", "6f1c0b5e-5d0c-5b6e-9a55-2d0c6c1f8f3a", "press-1", "operation.quantity_reported", 7,
         "order locked")
    assert r.event["data"] == {"machine": "press-1"}
    assert ack({"status": "accepted", "id": "x"}).status == "accepted"
    assert ack({"status": "rejected", "event": event_doc(seq=...)}).seq is None
    assert ack({"status": "rejected", "event": event_doc(), "reason": "r" * 900}).reason == "r" * 500
    for doc, reason in (
            ({"status": "rejected", "event": event_doc(source="/acme/plant-1/assembly/line-1/gw-02")}, "foreign_source"),
            ({"status": "rejected", "event": event_doc(epoch="epoch-0")}, "foreign_epoch"),
            ({"status": "rejected", "event": event_doc(epoch=...)}, "foreign_epoch"),
            ({"status": "rejected", "event": event_doc(subject="press/1")}, "schema"),
            ({"status": "rejected", "event": event_doc(subject="#")}, "schema"),
            ({"status": "rejected", "event": event_doc(type="a/+")}, "schema"),
            ({"status": "rejected", "event": event_doc(seq=0)}, "schema"),
            ({"status": "rejected"}, "schema"),
            ({"status": "maybe", "event": event_doc()}, "schema"),
            ({"status": "rejected", "event": "6f1c"}, "schema")):
        with pytest.raises(DispatchRejected) as exc:
            ack(doc)
        assert exc.value.reason == reason, doc
    with pytest.raises(DispatchRejected) as exc:
        parse_erp_ack(b"{", source=SOURCE, epoch=EPOCH)
    assert exc.value.reason == "invalid_json"


def test_an_oversized_dispatch_is_answered_by_its_size_without_being_parsed(monkeypatch):
    """A dispatch over MAX_DISPATCH_BYTES (here [{},{},...], 3 MB) is rejected too_large and answered with its size
    only; it is never parsed in full (red before: the answer parsed it: ~25x its size in memory, the event loop held,
    and a retained one came back at every start)."""
    import json as _json

    from gateway import orders as orders_module
    from gateway.orders import MqttDispatchSource

    class Topics:
        def machine_of_dispatch(self, t):
            return "press-1"

    parsed: list[int] = []
    real = _json.loads
    monkeypatch.setattr(orders_module.json, "loads", lambda b, *a, **k: (parsed.append(len(b)), real(b, *a, **k))[1])
    published: list[bytes] = []
    counted: list[str] = []
    src = MqttDispatchSource(Topics(), {"press-1": "mqtt"}, emit=lambda c: None,
                             count=lambda e, w: counted.append(e.reason), publish=lambda t, b: published.append(b))
    payload = b"[" + b"{}," * 1_000_000 + b"{}]"
    src.on_message("edge/v1/acme/p1/a1/l1/press-1/dispatch", payload)
    assert counted == ["too_large"]
    assert real(published[0])["received"] == {"size": len(payload)}
    assert not [n for n in parsed if n > 64 * 1024]
