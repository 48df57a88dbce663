"""Event contract: engine events validate against the generated JSON Schemas and the CloudEvents SDK; tampered
events do not; the AsyncAPI document covers every topic; the committed docs/schemas files equal the generated ones."""

import copy
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from jsonschema import Draft202012Validator

from gateway import schema
from gateway.cli import main
from gateway.config import GatewayIdentity
from gateway.events import EventEncoder, Topics
from mappings import events as ev
from mappings.counters import CounterSpec
from mappings.machine import (
    Component,
    CounterBinding,
    MachineEngine,
    MachineSpec,
    OrderContext,
)
from mappings.samples import Sample

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = ROOT / "docs" / "schemas"
IDENT = GatewayIdentity(id="gw-01", enterprise="acme", site="plant-1", area="assembly", line="line-1")
TOPICS = Topics("edge", IDENT)


def _s(machine, sig, v, t):
    return Sample(f"{machine}/{sig}", v, True, recv_time=t, source_time=t)


def _feed(eng, items):
    out = []
    for sig, v, t in items:
        out += eng.apply(_s(eng.spec.id, sig, v, t), sig)
    return out


def engine_events():
    """Drafts of every event type, from two machines driven through a realistic history."""
    out = []
    # press-1: good + scrap counters, a state tag, backflush, a jump, completion
    m1 = MachineEngine(MachineSpec(
        id="press-1",
        counters={"good": CounterBinding(CounterSpec("good")), "scrap": CounterBinding(CounterSpec("scrap"))},
        state_values={"1": "running", "0": "idle"}))
    out += m1.apply(_s("press-1", "state", 1, 0), "state")  # previous: null
    out += _feed(m1, [("good", 100, 0), ("scrap", 5, 0), ("good", 110, 1), ("scrap", 6, 1)])
    out += m1.tick(10)  # unassigned report
    ctx = OrderContext("1000123", "0010", unit="PCE", planned_quantity=Decimal("500"),
                       components=(Component("RM-100", Decimal("0.25"), "KG"), Component("RM-200", Decimal("2"), "PCE")))
    out += m1.dispatch(ctx, 11)  # operation.started
    out += _feed(m1, [("good", 118, 12), ("scrap", 8, 12)])
    out += m1.tick(30)  # quantity_reported + material.consumed
    out += _feed(m1, [("good", 100_000, 31)])  # implausible jump: counter.anomaly with an order
    out += m1.apply(_s("press-1", "state", 0, 32), "state")
    out += _feed(m1, [("good", 100_004, 33)])
    out += m1.dispatch(OrderContext("1000123", "0010", status="completed"), 34)  # completion report + completed
    # press-2: total - scrap, reset_on_read counter (evidence 'from' is null), fractional scale, rollover, no order
    m2 = MachineEngine(MachineSpec(
        id="press-2",
        counters={"total": CounterBinding(CounterSpec("total", modulus=2**16)),
                  "scrap": CounterBinding(CounterSpec("scrap", mode="reset_on_read"), scale=Decimal("0.5"))},
        state_values={}, unit="KG"))
    out += m2.apply(_s("press-2", "state", "AUTO", 0), "state")  # raw text is the state
    out += _feed(m2, [("total", 65530, 0), ("total", 4, 1), ("scrap", 3, 1)])
    out += m2.tick(10)
    out += _feed(m2, [("total", 60_000, 11)])  # jump without an order
    out += m2.dispatch(OrderContext("2000001", "0020"), 12)  # no planned quantity, no components
    out += _feed(m2, [("total", 60_010, 13)])
    out += m2.dispatch(OrderContext("2000002", "0010"), 14)  # changeover
    return out


def encoded():
    enc = EventEncoder(IDENT, TOPICS, epoch="3f2a9c")
    return [(d, *enc.encode(d, seq)) for seq, d in enumerate(engine_events(), start=1)]


@pytest.fixture(scope="module")
def events():
    return encoded()


def test_the_scenario_covers_every_event_type(events):
    assert {d.type for d, _, _ in events} == set(schema.EVENT_TYPES)
    reasons = {d.data["reason"] for d, _, _ in events if d.type == "operation.quantity_reported"}
    assert reasons == {"periodic", "changeover", "completion"}


def test_engine_events_validate_against_their_schema_and_the_sdk(events):
    schemas = schema.event_schemas()
    for draft, topic, payload in events:
        doc = json.loads(payload)
        validator = Draft202012Validator(schemas[draft.type])
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (draft.type, errors, doc)
        # the pydantic model accepts the same data (python side)
        schema.EVENT_MODELS[draft.type].model_validate_json(payload)

        ce = JSONFormat().read(None, payload)
        assert ce.get_id() == doc["id"]
        assert ce.get_source() == "/acme/plant-1/assembly/line-1/gw-01"
        assert ce.get_type() == draft.type
        assert ce.get_subject() == draft.subject
        assert ce.get_extension("seq") == doc["seq"] and isinstance(doc["seq"], int)
        assert ce.get_extension("epoch") == "3f2a9c"
        assert ce.get_data() == draft.data
        assert topic == TOPICS.event(draft.subject, draft.type)

        assert schema.validate_event(payload) == doc
        assert schema.validate_event(doc) == doc  # already parsed (e.g. ErpConsumer.events())


def test_engine_data_matches_the_data_models_exactly(events):
    """The engine builds the very types the schemas come from, and the schema's properties are exactly the keys on
    the wire (none missing, none invented)."""
    schemas = schema.event_schemas()
    for draft, _, payload in events:
        model = schema.DATA_MODELS[draft.type]
        # a quantity report is a QuantityReport: the model's fields, rendered in one step (checked byte for byte
        # against the model in tests/test_events_encoding.py)
        assert type(draft.data) is model or (type(draft.data) is ev.QuantityReport and model is ev.QuantityReportedData), (
            draft.type)
        data_ref = schemas[draft.type]["properties"]["data"]["$ref"].rsplit("/", 1)[1]
        props = set(schemas[draft.type]["$defs"][data_ref]["properties"])
        assert props == set(json.loads(payload)["data"]) == set(draft.data), draft.type


def _one(events, etype, pred=lambda d: True):
    return next(json.loads(p) for d, _, p in events if d.type == etype and pred(d.data))


def _data_tamper(name: str, etype: str, key: str, value: str) -> tuple[str, str, Any, str]:
    """A TAMPERS entry that sets ``data[key]`` to ``value``: the problem is reported at ``data.<key>``."""
    return name, etype, lambda e: e["data"].__setitem__(key, value), f"data.{key}"


TAMPERS = [
    ("missing data field", "operation.quantity_reported", lambda e: e["data"].pop("unit"), "'unit' is a required"),
    ("missing envelope attr", "operation.started", lambda e: e.pop("id"), "'id' is a required"),
    ("extra data field", "operation.completed", lambda e: e["data"].__setitem__("plant", "1000"), "plant"),
    ("extra envelope attr", "machine.state_changed", lambda e: e.__setitem__("foo", "x"), "foo"),
    ("number for a decimal", "operation.quantity_reported",
     lambda e: e["data"]["quantities"].__setitem__("yield", 12), "data.quantities.yield"),
    ("exponent decimal", "material.consumed",
     lambda e: e["data"]["components"][0].__setitem__("quantity", "1E+1"), "data.components[0].quantity"),
    ("seq as text", "counter.anomaly", lambda e: e.__setitem__("seq", "7"), "seq"),
    ("seq zero", "counter.anomaly", lambda e: e.__setitem__("seq", 0), "seq"),
    ("bad time", "operation.started", lambda e: e.__setitem__("time", "yesterday"), "time"),
    ("assigned without order", "operation.quantity_reported",
     lambda e: e["data"].__setitem__("order", None), "data.order"),
    ("unknown reason", "operation.quantity_reported", lambda e: e["data"].__setitem__("reason", "manual"), "reason"),
    ("data of another type", "operation.completed",
     lambda e: e.__setitem__("type", "operation.started"), "final"),
    ("wrong specversion", "operation.started", lambda e: e.__setitem__("specversion", "0.3"), "specversion"),
    # an order / operation number never holds a control character (C0, DEL, C1); red before
    _data_tamper("C0 in an order", "operation.started", "order", "1000\x01123"),
    _data_tamper("tab in an operation", "operation.started", "operation", "00\t10"),
    _data_tamper("DEL in a reported order", "operation.quantity_reported", "order", "1000123\x7f"),
    _data_tamper("C1 in a reported operation", "operation.quantity_reported", "operation", "0010\x85"),
    _data_tamper("C1 in a completed order", "operation.completed", "order", "\x9f1000123"),
    _data_tamper("C1 in a consumed order", "material.consumed", "order", "1000\x80123"),
    _data_tamper("C1 in an anomaly's operation", "counter.anomaly", "operation", "0010\x9b"),
    # units, the anomaly's explanation and machine ids follow the same rules as where they come from (config,
    # dispatch); red before: no pattern
    _data_tamper("C1 in a reported unit", "operation.quantity_reported", "unit", "PC\x85"),
    _data_tamper("newline in a started unit", "operation.started", "unit", "PC\nE"),
    _data_tamper("C0 in a completed unit", "operation.completed", "unit", "K\x1bG"),
    _data_tamper("C1 in an anomaly's detail", "counter.anomaly", "detail", "jump\x9b31m"),
    _data_tamper("a machine id that is no topic level", "operation.quantity_reported", "machine", "press 1/a"),
    # material numbers and counter names: as in the dispatch and the config they come from; red before: no pattern
    ("C0 in a consumed material", "material.consumed",
     lambda e: e["data"]["components"][0].__setitem__("material", "RM\x001"), "data.components[0].material"),
    ("C1 in an evidence counter", "operation.quantity_reported",
     lambda e: e["data"]["evidence"][0].__setitem__("counter", "good\x85"), "data.evidence[0].counter"),
    _data_tamper("tab in an anomaly's counter", "counter.anomaly", "counter", "material:RM\t1"),
    # a state, its previous one and a text raw value: as the engine cleans a PLC string (plc_text); red before
    _data_tamper("NUL in a state", "machine.state_changed", "state", "RUN\x00\x00"),
    _data_tamper("C1 in a previous state", "machine.state_changed", "previous", "RUN\x9b"),
    _data_tamper("NUL in a raw state text", "machine.state_changed", "raw", "RUN\x00"),
    # the envelope: nothing PostgreSQL could not store (a NUL, a seq beyond bigint); red before
    ("NUL in the subject", "operation.started", lambda e: e.__setitem__("subject", "press-1\x00"), "subject"),
    ("a subject that is no machine id", "operation.started", lambda e: e.__setitem__("subject", "press 1"), "subject"),
    ("C1 in the epoch", "operation.started", lambda e: e.__setitem__("epoch", "ab\x9bcd"), "epoch"),
    ("C0 in the source", "operation.started", lambda e: e.__setitem__("source", "/a/b/c/d/gw\x01"), "source"),
    ("an id that is no UUID", "operation.started", lambda e: e.__setitem__("id", "evt-1"), "id"),
    ("seq beyond 64 bits", "operation.started", lambda e: e.__setitem__("seq", 2**63), "seq"),
]


@pytest.mark.parametrize("name,etype,tamper,expect", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_tampered_events_are_rejected(events, name, etype, tamper, expect):
    doc = _one(events, etype, lambda d: d.get("order", "-") is not None)
    schema.validate_event(json.dumps(doc).encode())  # valid before tampering
    bad = copy.deepcopy(doc)
    tamper(bad)
    with pytest.raises(schema.EventValidationError) as exc:
        schema.validate_event(json.dumps(bad).encode())
    assert expect in str(exc.value)
    assert exc.value.problems
    validator = Draft202012Validator(schema.event_schemas()[bad["type"]])
    assert not validator.is_valid(bad)


def test_order_numbers_are_text_without_control_characters(events):
    """The contract's order and operation numbers: every event type that carries them gives both a pattern that
    refuses C0, DEL and C1 (U+0000-U+001F, U+007F-U+009F) and takes any other text. ``validate_event`` reads the
    pattern as JSON Schema means it (ECMA-262: ``$`` is the end of the text), so a number ending in a newline is
    refused too (Python's ``$`` matches before a final newline). Red before: no pattern at all."""
    carriers = {t for t, m in schema.DATA_MODELS.items() if "order" in m._attr_of}
    assert carriers == {"operation.started", "operation.quantity_reported", "operation.completed",
                        "material.consumed", "counter.anomaly"}
    for etype in sorted(carriers):
        doc = _one(events, etype, lambda d: d.get("order") is not None)
        for field in ("order", "operation"):
            for value, ok in (("1000123\n", False), ("1000\r\n", False), ("\x00", False), ("A\u009fB", False),
                              ("1000\u00a0123", True), ("Auftr\u00e4ge/10 #2", True), ("~\u00ff", True)):
                bad = copy.deepcopy(doc)
                bad["data"][field] = value
                if ok:
                    schema.validate_event(json.dumps(bad).encode())
                    continue
                with pytest.raises(schema.EventValidationError) as exc:
                    schema.validate_event(json.dumps(bad).encode())
                assert [p.split(":")[0] for p in exc.value.problems] == [f"data.{field}"], (etype, value)


def test_validate_event_rejects_garbage_and_unknown_types():
    with pytest.raises(schema.EventValidationError, match="not JSON"):
        schema.validate_event(b"{nope")
    with pytest.raises(schema.EventValidationError, match="not a JSON object"):
        schema.validate_event(b"[1, 2]")
    with pytest.raises(schema.EventValidationError, match="unknown event type 'order.dispatched'"):
        schema.validate_event(b'{"type": "order.dispatched"}')
    assert issubclass(schema.EventValidationError, ValueError)


def test_sdk_failures_are_reported(events):
    doc = _one(events, "operation.started")
    doc["time"] = "2026-13-45T99:00:00Z"  # matches the pattern, not a date: only the SDK notices
    with pytest.raises(schema.EventValidationError, match="cloudevents SDK"):
        schema.validate_event(json.dumps(doc).encode())


def _fill(address, **values):
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], address)


def test_asyncapi_document_covers_every_topic():
    doc = schema.asyncapi_document("edge")
    assert doc["asyncapi"].startswith("3.")
    where = dict(enterprise="acme", site="plant-1", area="assembly", line="line-1", machine="press-1", gateway_id="gw-01")
    channels = doc["channels"]
    for t in schema.EVENT_TYPES:
        ch = next(c for c in channels.values() if c["address"].endswith(f"/events/{t}"))
        assert _fill(ch["address"], **where) == TOPICS.event("press-1", t)
        assert set(re.findall(r"\{(\w+)\}", ch["address"])) == set(ch["parameters"])
        ops = [o for o in doc["operations"].values() if o["channel"]["$ref"] == f"#/channels/{_key(channels, ch)}"]
        assert [o["action"] for o in ops] == ["send"]
        assert ops[0]["bindings"]["mqtt"]["qos"] == 1 and ops[0]["bindings"]["mqtt"]["retain"] is False
    dispatch = next(c for c in channels.values() if c["address"].endswith("/dispatch"))
    assert _fill(dispatch["address"], **where) == TOPICS.dispatch("press-1")
    ops = [o for o in doc["operations"].values() if o["channel"]["$ref"] == f"#/channels/{_key(channels, dispatch)}"]
    assert [(o["action"], o["bindings"]["mqtt"]["qos"], o["bindings"]["mqtt"]["retain"]) for o in ops] == \
        [("receive", 1, True)]
    status = next(c for c in channels.values() if c["address"].endswith("/status"))
    assert _fill(status["address"], **where) == TOPICS.status()
    # every $ref resolves inside the document, and message payloads point at the event schemas
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    assert "$defs" not in text
    payloads = {m["payload"]["$ref"].rsplit("/", 1)[1] for m in doc["components"]["messages"].values()
                if "$ref" in m["payload"]}
    batch = doc["components"]["messages"]["events_batch"]["payload"]
    assert {r["$ref"].rsplit("/", 1)[1] for r in batch["items"]["oneOf"]} == \
        {m.__name__ for m in schema.EVENT_MODELS.values()}
    assert {m.__name__ for m in schema.EVENT_MODELS.values()} | {"DispatchMessage", "GatewayStatus", "ErpAck"} == payloads


def _key(channels, ch):
    return next(k for k, v in channels.items() if v is ch)


def test_asyncapi_topic_root():
    doc = schema.asyncapi_document("plant")
    assert all(c["address"].startswith("plant/v1/") for c in doc["channels"].values())


def test_schemas_are_valid_draft_2020_12():
    for s in [*schema.event_schemas().values(), schema.dispatch_schema(), schema.status_schema()]:
        Draft202012Validator.check_schema(s)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_dispatch_schema_agrees_with_the_parser():
    v = Draft202012Validator(schema.dispatch_schema())
    assert v.is_valid({"order": "1000123", "operation": "0010", "status": "active", "unit": "PCE",
                       "planned_quantity": "500",
                       "components": [{"material": "RM-100", "quantity_per_unit": "0.25", "unit": "KG"}]})
    assert not v.is_valid({"order": "1000123"})
    assert not v.is_valid({"order": "1", "operation": "2", "priority": 1})
    assert not v.is_valid({"order": "1", "operation": "2", "status": "released"})
    for bad in ({"order": "1\x85", "operation": "2"}, {"order": "1", "operation": "\x9f2"},
                {"order": "1\x01", "operation": "2"}):
        assert not v.is_valid(bad), bad
    assert v.is_valid({"order": "Auftr\u00e4ge\u00a01", "operation": "2"})


def test_committed_schema_files_equal_the_generated_ones():
    """docs/schemas is generated by `edge-gateway schema --out docs/schemas`: regenerate when this fails."""
    expected = schema.generated_files()
    committed = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(expected)
    for name, text in expected.items():
        assert committed[name] == text, f"docs/schemas/{name} is stale: run `edge-gateway schema --out docs/schemas`"


def test_cli_schema(tmp_path, capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema.asyncapi_document()
    assert main(["schema", "--out", str(tmp_path / "out")]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in listed) == sorted(schema.generated_files())
    for p in listed:
        assert Path(p).read_text(encoding="utf-8") == (SCHEMA_DIR / Path(p).name).read_text(encoding="utf-8")
