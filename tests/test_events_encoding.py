"""The fast event encoder writes exactly what the CloudEvents SDK wrote, and the typed event data renders itself
exactly as json.dumps renders its dict.

``sdk_encode`` below is the encoder as it was before the fast path (CloudEvent object + JSONFormat.write): the
reference. Varied events (engine histories from tests/test_schema.py, hypothesis-built data of every type with
awkward strings, times on microsecond ties, None everywhere it is allowed) must give the same topic and the same
bytes, read back by the SDK with equal attributes and data, and ids identical to ``event_id`` (ids of an existing
store must not change)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1.http import from_json as legacy_from_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import schema
from gateway.config import GatewayIdentity
from gateway.events import EventEncoder, Topics, event_id
from mappings import events as ev
from mappings.machine import EventDraft, iso
from tests.test_schema import engine_events

IDENT = GatewayIdentity(id="gw-01", enterprise="acme", site="plant-1", area="assembly", line="line-1")
TOPICS = Topics("edge", IDENT)
FORMAT = JSONFormat()
ATTRS = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "seq", "epoch")


def sdk_encode(enc: EventEncoder, draft: EventDraft, seq: int) -> tuple[str, bytes]:
    """The encoder before the fast path (gateway/events.py up to the typed event data), verbatim but for the data:
    the SDK gets the plain JSON-shaped dict the engine used to build."""
    data = draft.data.to_dict() if isinstance(draft.data, ev.EventData) else draft.data
    attrs = {
        "specversion": "1.0",
        "id": event_id(enc.source, enc.epoch, seq),
        "source": enc.source,
        "type": draft.type,
        "subject": draft.subject,
        "time": datetime.fromtimestamp(draft.time, tz=timezone.utc),
        "datacontenttype": "application/json",
        "seq": seq,
        "epoch": enc.epoch,
    }
    return enc.topics.event(draft.subject, draft.type), FORMAT.write(CloudEvent(attrs, data))


def assert_same_as_sdk(enc: EventEncoder, draft: EventDraft, seq: int) -> None:
    topic, payload = enc.encode(draft, seq)
    ref_topic, ref_payload = sdk_encode(enc, draft, seq)
    assert topic == ref_topic
    assert payload == ref_payload  # byte for byte: what consumers and existing stores have seen
    got, want = FORMAT.read(None, payload), FORMAT.read(None, ref_payload)
    for name in ATTRS:
        assert got.get_attributes().get(name) == want.get_attributes().get(name), name
    assert got.get_data() == want.get_data() == json.loads(payload)["data"]
    legacy = legacy_from_json(payload)  # the SDK's other reader agrees too
    assert legacy["id"] == want.get_id() and legacy["seq"] == seq and legacy.data == want.get_data()
    assert draft.data == got.get_data()  # mapping view of the typed data == the parsed JSON


# ------------------------------------------------------------------------------------------------ engine events
@pytest.mark.parametrize("epoch", ["3f2a9c", "0" * 32, "épоch-ü"])
def test_engine_events_encode_exactly_as_the_sdk_did(epoch):
    enc = EventEncoder(IDENT, TOPICS, epoch)
    drafts = engine_events()
    assert {d.type for d in drafts} == set(ev.EVENT_TYPES)
    for seq, d in enumerate(drafts, start=1):
        assert_same_as_sdk(enc, d, seq)
    for seq in (10**6, 2**31 + 7, 2**63 - 1):
        assert_same_as_sdk(enc, drafts[0], seq)


def test_a_plain_dict_draft_is_encoded_like_the_sdk():
    enc = EventEncoder(IDENT, TOPICS, "e1")
    assert_same_as_sdk(enc, EventDraft("dispatch.refused", "m1", 12.5, {"reason": "completed", "n": [1, None]}), 3)


# ------------------------------------------------------------------------------------------------ generated data
text = st.text(st.characters(codec="utf-8"), max_size=12)  # quotes, backslashes, controls, astral planes
name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
dec = st.decimals(allow_nan=False, allow_infinity=False, places=4).map(lambda d: ev.dec_str(abs(d)))
opt = lambda s: st.none() | s  # noqa: E731
big = st.integers(min_value=-(2**70), max_value=2**70)
posix = st.floats(min_value=-1e10, max_value=2.5e11, allow_nan=False, allow_infinity=False) | \
    st.integers(min_value=0, max_value=4_000_000_000).map(lambda s: s + 0.5e-6)  # ties in the microseconds
ts = opt(posix.map(ev.rfc3339))
quantities = st.builds(ev.Quantities, yield_=dec, scrap=dec, rework=dec)
totals = st.builds(ev.Totals, yield_=dec, scrap=dec, rework=dec)
component = st.builds(ev.ConsumedComponent, material=name, quantity=dec, unit=name)

DATA = {
    "operation.started": st.builds(ev.OperationStartedData, machine=name, order=name, operation=name,
                                   planned_quantity=opt(dec), unit=name),
    "operation.quantity_reported": st.builds(
        ev.QuantityReportedData, machine=name, order=opt(name), operation=opt(name), unassigned=st.booleans(),
        reason=st.sampled_from(["periodic", "units", "changeover", "completion"]),
        window=st.builds(ev.Window, start=ts, end=ts), quantities=quantities, unit=name, totals=totals,
        evidence=st.lists(st.builds(ev.CounterEvidence, counter=name, from_=opt(big), to=big,
                                    rollovers=st.integers(0, 10**9), resets=st.integers(0, 9),
                                    glitches=st.integers(0, 9)), max_size=4)),
    "operation.completed": st.builds(ev.OperationCompletedData, machine=name, order=name, operation=name,
                                     final=st.just(True), totals=totals, unit=name),
    "material.consumed": st.builds(
        ev.MaterialConsumedData, machine=name, order=opt(name), operation=opt(name), unassigned=st.booleans(),
        method=st.sampled_from(["backflush", "metered"]),
        basis=opt(st.builds(ev.ConsumptionBasis, yield_=dec, scrap=dec, unit=name)),
        movement_type=st.just("261"), components=st.lists(component, min_size=0, max_size=4)),
    "machine.state_changed": st.builds(
        ev.MachineStateChangedData, machine=name, state=text, previous=opt(text),
        raw=st.booleans() | big | st.floats(allow_nan=False) | text, reason=st.just("tag")),
    "counter.anomaly": st.builds(
        ev.CounterAnomalyData, machine=name, counter=name,
        kind=st.sampled_from(["implausible_jump", "ambiguous_decrease"]), from_=opt(big), to=opt(big),
        order=opt(name), operation=opt(name), held=dec, counted=dec, possible_rollover=opt(dec),
        elapsed_s=opt(st.floats(min_value=0, allow_nan=False)), detail=text),
}
drafts = st.sampled_from(sorted(DATA)).flatmap(
    lambda t: st.builds(EventDraft, type=st.just(t), subject=name, time=posix, data=DATA[t]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draft=drafts, seq=st.integers(min_value=1, max_value=2**63), epoch=st.sampled_from(["3f2a9c", "épоch\"\\"]))
def test_varied_events_encode_exactly_as_the_sdk_did(draft, seq, epoch):
    enc = EventEncoder(IDENT, TOPICS, epoch)
    assert_same_as_sdk(enc, draft, seq)
    assert draft.data.to_json() == json.dumps(draft.data.to_dict())


def _values(d: ev.QuantityReportedData) -> tuple:
    q, t = d.quantities, d.totals
    return (d.machine, d.order, d.operation, d.unassigned, d.reason, d.window.start, d.window.end, q.yield_, q.scrap,
            q.rework, d.unit, t.yield_, t.scrap, t.rework,
            tuple((e.counter, e.from_, e.to, e.rollovers, e.resets, e.glitches) for e in d.evidence))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(typed=DATA["operation.quantity_reported"], seq=st.integers(min_value=1, max_value=2**63))
def test_the_engines_quantity_report_renders_exactly_as_the_typed_data(typed, seq):
    """The engine makes its quantity reports as ``QuantityReport`` (plain values, rendered in one step, typed parts
    built on first read): the same bytes as the typed object, the same fields once read, through the encoder too."""
    lazy = ev.QuantityReport(_values(typed))
    assert lazy.to_json() == typed.to_json()
    enc = EventEncoder(IDENT, TOPICS, "3f2a9c")
    assert_same_as_sdk(enc, EventDraft("operation.quantity_reported", typed.machine, 1.8e9, lazy), seq)
    read = ev.QuantityReport(_values(typed))
    assert isinstance(read, ev.QuantityReportedData)
    assert read.to_dict() == typed.to_dict()  # every field read: the typed parts are built
    assert read.quantities.yield_ == typed.quantities.yield_ and read["evidence"] == typed["evidence"]
    assert read.to_json() == typed.to_json()


# ------------------------------------------------------------------------------------------------ parts
@settings(max_examples=3000, deadline=None)
@given(epoch=text, seq=st.integers(min_value=0, max_value=2**64))
def test_event_ids_are_unchanged(epoch, seq):
    enc = EventEncoder(IDENT, TOPICS, epoch)
    assert enc.event_id(seq) == event_id(enc.source, epoch, seq) == str(uuid.uuid5(
        uuid.UUID("5b0c7c2e-3a8e-4b8f-9a43-0e7f1d5c2a11"), f"{enc.source}|{epoch}|{seq}"))


def test_known_event_ids_of_existing_stores():
    """Pinned values: an id computed differently would re-send every pending event of an upgraded gateway as new."""
    enc = EventEncoder(IDENT, TOPICS, "3f2a9c")
    # computed with gateway/events.py as of 207d9ef (before the fast encoder)
    assert enc.event_id(1) == "56541928-3121-5aca-a69f-f687bc41baa5"
    assert enc.event_id(123456789) == "d4238c9c-acf6-5e4c-ae52-c400397f4ab8"
    assert json.loads(enc.encode(EventDraft("x.y", "m", 0.0, {}), 1)[1])["id"] == "56541928-3121-5aca-a69f-f687bc41baa5"


def _dt(t: float, **kw: str) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(**kw).replace("+00:00", "Z")


@settings(max_examples=5000, deadline=None)
@given(t=posix | st.floats(min_value=-6e10, max_value=2.5e11, allow_nan=False))
def test_rfc3339_equals_datetime(t):
    assert ev.rfc3339(t) == _dt(t, timespec="microseconds") == iso(t)
    assert ev.rfc3339(t, always_fraction=False) == _dt(t)


@pytest.mark.parametrize("t", [0.0, -0.0, 1.0, -1.0, 0.5e-6, 1.5e-6, 2.5e-6, -0.5e-6, 0.9999995, 1.9999995,
                               1_767_225_599.9999996, 1_767_225_600.0000004, 1_767_225_600.000001, 253402300799.0,
                               -62135596800.0])
def test_rfc3339_edges(t):
    assert ev.rfc3339(t) == _dt(t, timespec="microseconds")
    assert ev.rfc3339(t, always_fraction=False) == _dt(t)


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf, 1e20, 253402300800.0, -62135596801.0])
def test_rfc3339_refuses_what_datetime_refuses(t):
    with pytest.raises((ValueError, OverflowError, OSError)):
        _dt(t)
    with pytest.raises((ValueError, OverflowError, OSError)):
        ev.rfc3339(t)


def test_typed_data_is_a_read_only_view_in_wire_names():
    q = ev.QuantityReportedData(
        machine="m1", order=None, operation=None, unassigned=True, reason="units",
        window=ev.Window(start=ev.rfc3339(1.0), end=None), quantities=ev.Quantities(yield_="1", scrap="0", rework="0"),
        unit="PCE", totals=ev.Totals(yield_="7", scrap="0", rework="0"),
        evidence=[ev.CounterEvidence(counter="good", from_=None, to=3, rollovers=0, resets=1, glitches=0)])
    assert q["quantities"]["yield"] == "1" and q.get("order", "-") is None and q.get("nope", "-") == "-"
    assert "yield" in q["totals"] and "yield_" not in q["totals"]
    assert list(q["evidence"][0]) == ["counter", "from", "to", "rollovers", "resets", "glitches"]
    assert q["evidence"][0]["from"] is None and len(q) == 10
    with pytest.raises(KeyError):
        q["yield_"]
    assert q == json.loads(q.to_json()) and json.loads(q.to_json()) == q
    assert q != {**json.loads(q.to_json()), "unit": "KG"}
    assert q["totals"] != ev.Quantities(yield_="7", scrap="0", rework="0")  # same fields, another type
    assert q["totals"] == ev.Totals(yield_="7", scrap="0", rework="0")
    with pytest.raises(AttributeError):
        q.plant = "1000"  # slotted: no stray fields


def test_every_event_type_has_a_data_type_and_a_schema():
    assert set(ev.DATA_TYPES) == set(schema.EVENT_MODELS) == set(schema.event_schemas())
    for t, cls in ev.DATA_TYPES.items():
        s = schema.event_schemas()[t]
        ref = s["properties"]["data"]["$ref"].rsplit("/", 1)[1]
        assert ref == cls.__name__
        assert list(s["$defs"][ref]["properties"]) == [k for _, k in cls._wire]  # noqa: SLF001
