"""Machine-readable event contract: JSON Schemas and an AsyncAPI document, generated from the code.

The ``data`` of each event type is the very type ``mappings.machine.MachineEngine`` builds, defined once in
``mappings.events`` (``DATA_MODELS`` here is its ``DATA_TYPES``; pydantic reads their ``Field`` metadata). This
module adds the CloudEvents 1.0 envelope written by ``gateway.events.EventEncoder`` (``EVENT_MODELS``: one pydantic
model per event type, ``data`` typed), the dispatch, status and ack messages, and generates the files in
``docs/schemas/`` (``edge-gateway schema --out docs/schemas``); a test compares the committed files with what this
module generates, so they cannot drift. ``EVENT_MODELS[t].model_validate_json(payload)`` parses an event into the
typed data (JSON mode: the models are strict).

``validate_event(payload)`` checks one received MQTT payload against both the JSON Schema of its type and the
CloudEvents SDK, and raises ``EventValidationError`` listing every problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from gateway.events import CONTRACT_VERSION
from mappings.events import (  # noqa: F401 - re-exported: the contract's patterns and types
    DATA_TYPES,
    DECIMAL_PATTERN,
    MACHINE_ID_PATTERN,
    ORDER_TEXT_PATTERN,
    RFC3339_PATTERN,
    TEXT_PATTERN,
    DecimalStr,
    EventData,
    Timestamp,
)

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
MQTT_BINDING_VERSION = "0.2.0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


# The event data types live in mappings.events (the engine builds them); re-exported here for schema users.
DATA_MODELS: dict[str, type[EventData]] = dict(DATA_TYPES)
EVENT_TYPES = tuple(DATA_MODELS)


# ---------------------------------------------------------------------------------------------------- envelope
# the envelope's texts hold no control character either (every text of an event: mappings.events.TEXT_PATTERN); the
# id is the UUID the gateway derives (gateway.events.event_id), in its canonical lower-case form
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_SOURCE = r"^(/[^/\x00-\x1f\x7f-\x9f]+){5}$"


class CloudEventEnvelope(_Model):
    """CloudEvents 1.0, structured JSON mode, as published by the gateway (one event per MQTT message)."""

    specversion: Literal["1.0"] = Field(description="CloudEvents specification version.")
    id: str = Field(min_length=1, pattern=_UUID,
                    description="Deterministic event id (UUIDv5 of source, epoch and seq): a retry or replay carries "
                                "the same id. Dedup key together with source; use it as SAP "
                                "ExternalSystemConfirmation.")
    source: str = Field(min_length=1, pattern=_SOURCE,
                        description="/{enterprise}/{site}/{area}/{line}/{gateway_id}.")
    type: str = Field(min_length=1, description="Event type.")
    subject: str = Field(min_length=1, pattern=MACHINE_ID_PATTERN,
                         description="Machine id (the topic's {machine} level).")
    time: Timestamp = Field(description="Source time of the last sample in the event where there is one (RFC 3339).")
    datacontenttype: Literal["application/json"] = Field(description="Content type of data.")
    seq: int = Field(ge=1, le=2**63 - 1,
                     description="Extension: per-source sequence number, strictly increasing within an epoch, "
                                 "persisted (survives restarts). A gap means lost events.")
    epoch: str = Field(min_length=1, pattern=TEXT_PATTERN,
                       description="Extension: identifies the gateway's store; a new store starts a new sequence at "
                                   "1.")
    data: dict[str, Any] = Field(description="Event payload, by type.")


def _class_name(event_type: str) -> str:
    return "".join(p.capitalize() for p in event_type.replace(".", "_").split("_")) + "Event"


EVENT_MODELS: dict[str, type[CloudEventEnvelope]] = {
    t: create_model(  # type: ignore[call-overload]
        _class_name(t),
        __base__=CloudEventEnvelope,
        __doc__=f"CloudEvent of type {t}. {m.__doc__}",
        type=(Literal[t], Field(description="Event type.")),  # type: ignore[valid-type]
        data=(m, Field(description=m.__doc__)),
    )
    for t, m in DATA_MODELS.items()
}


class StatusAlarm(_Model):
    """An active alarm (gateway/alarms.py, gateway/health.py; the table is in docs/operations.md)."""

    id: str = Field(min_length=1, description="Stable alarm id, e.g. broker_unreachable, connector_down:<connector>.")
    severity: Literal["critical", "warning"] = Field(description="critical or warning.")
    message: str = Field(description="What it means and what to do, for people.")
    since: str = Field(description="When it was raised (RFC 3339 UTC).")
    evidence: dict[str, Any] = Field(description="Values that show it (durations, counts, last error...).")


class GatewayStatus(_Model):
    """Retained gateway status; the broker publishes the offline variant as the gateway's last will."""

    gateway: str = Field(min_length=1, description="Gateway id.")
    state: Literal["online", "offline"] = Field(description="online after connect; offline as last will / on stop.")
    time: str | None = Field(
        None, description="When the gateway built this status (RFC 3339, UTC): at each connect for online, at a clean "
        "stop for offline. Absent in the last will, which is built at start-up and published by the broker when the "
        "connection dies: the time of death is when it arrives.")
    cause: Literal["stopped", "connection_lost"] | None = Field(
        None, description="offline only: 'stopped' (a clean stop) or 'connection_lost' (the last will).")
    started: str | None = Field(None, description="When the gateway process started (RFC 3339, UTC).")
    alarms: list[StatusAlarm] = Field(
        default_factory=list, description="Active alarms, republished (retained) whenever one is raised or cleared; "
                                          "absent in the offline variant.")


class ErpAck(BaseModel):
    """ERP → gateway on ``.../{machine}/acks``: the ERP refused a delivered event. The gateway keeps the event in its
    quarantine (``edge-gateway buffer list --quarantine``) until an operator retries or purges it. Positive
    acknowledgements (``status: accepted``) are allowed and ignored."""

    model_config = ConfigDict(extra="allow")
    status: Literal["accepted", "rejected"] = Field(description="'rejected' quarantines the event.")
    id: str = Field(description="The event id (CloudEvents id).")
    source: str | None = Field(None, description="The event source.")
    reason: str | None = Field(None, description="Why the ERP refused it (shown to the operator).")
    event: dict[str, Any] | None = Field(None, description="The refused CloudEvent, required with status rejected.")


# ---------------------------------------------------------------------------------------------------- JSON Schema
def _schema_of(model: type[BaseModel], schema_id: str) -> dict[str, Any]:
    body = model.model_json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id, **body}


def schema_id(name: str) -> str:
    return f"urn:edge-gateway:{CONTRACT_VERSION}:{name}"


def event_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (Draft 2020-12) per event type: the envelope with ``type`` const and ``data`` of that type."""
    return {t: _schema_of(m, schema_id(t)) for t, m in EVENT_MODELS.items()}


def dispatch_schema() -> dict[str, Any]:
    """JSON Schema of the dispatch message (ERP → gateway), from ``gateway.dispatch.DispatchMessage``."""
    from gateway.dispatch import DispatchMessage

    return _schema_of(DispatchMessage, schema_id("dispatch"))


def status_schema() -> dict[str, Any]:
    return _schema_of(GatewayStatus, schema_id("status"))


def ack_schema() -> dict[str, Any]:
    return _schema_of(ErpAck, schema_id("ack"))


# ---------------------------------------------------------------------------------------------------- AsyncAPI
_HIERARCHY = {
    "enterprise": "ISA-95 enterprise (gateway.enterprise).",
    "site": "ISA-95 site / plant (gateway.site).",
    "area": "ISA-95 area (gateway.area).",
    "line": "ISA-95 production line (gateway.line).",
}


def _key(name: str) -> str:
    return name.replace(".", "_")


def asyncapi_document(topic_root: str = "edge") -> dict[str, Any]:
    """AsyncAPI 3.0 document of the gateway's MQTT interface (the application described is the gateway)."""
    from gateway.dispatch import DispatchMessage

    models: list[type[BaseModel]] = [*EVENT_MODELS.values(), DispatchMessage, GatewayStatus, ErpAck]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = defs["$defs"]
    base = f"{topic_root}/{CONTRACT_VERSION}/{{enterprise}}/{{site}}/{{area}}/{{line}}"
    params = {k: {"description": d} for k, d in _HIERARCHY.items()}
    machine_param = {"description": "Machine id (ISA-95 work cell); the event's subject."}
    qos1 = {"mqtt": {"qos": 1, "retain": False, "bindingVersion": MQTT_BINDING_VERSION}}
    qos1_retained = {"mqtt": {"qos": 1, "retain": True, "bindingVersion": MQTT_BINDING_VERSION}}

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for t, model in EVENT_MODELS.items():
        k = _key(t)
        messages[k] = {
            "name": t,
            "title": t,
            "summary": DATA_MODELS[t].__doc__,
            "contentType": "application/cloudevents+json",
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
            "correlationId": {"description": "CloudEvents source + id: the dedup key.", "location": "$message.payload#/id"},
            "bindings": {"mqtt": {"payloadFormatIndicator": 1, "contentType": "application/cloudevents+json",
                                  "bindingVersion": MQTT_BINDING_VERSION}},
        }
        channels[f"events_{k}"] = {
            "address": f"{base}/{{machine}}/events/{t}",
            "title": f"{t} events",
            "description": f"Events of type {t}, not retained, QoS 1: duplicates are possible, deduplicate on "
                           "source + id.",
            "parameters": {**params, "machine": machine_param},
            "messages": {k: {"$ref": f"#/components/messages/{k}"}},
        }
        operations[f"send_{k}"] = {
            "action": "send",
            "title": f"Publish {t}",
            "channel": {"$ref": f"#/channels/events_{k}"},
            "messages": [{"$ref": f"#/channels/events_{k}/messages/{k}"}],
            "bindings": qos1,
        }
    messages["events_batch"] = {
        "name": "events_batch",
        "title": "CloudEvents batch",
        "summary": "Only with mqtt.batch_max_events > 0: consecutive events of one machine, in order, as a JSON array "
                   "(CloudEvents JSON batch format). Each element is a structured event as on the per-type topics.",
        "contentType": "application/cloudevents-batch+json",
        "payload": {"type": "array", "minItems": 1,
                    "items": {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in EVENT_MODELS.values()]}},
    }
    channels["events_batch"] = {
        "address": f"{base}/{{machine}}/events/batch",
        "title": "Event batches (batch mode)",
        "description": "Not retained, QoS 1. Consumers subscribed to .../events/# receive batches here when the "
                       "gateway runs in batch mode; deduplicate each element on source + id.",
        "parameters": {**params, "machine": machine_param},
        "messages": {"events_batch": {"$ref": "#/components/messages/events_batch"}},
    }
    operations["send_events_batch"] = {
        "action": "send",
        "title": "Publish event batches",
        "channel": {"$ref": "#/channels/events_batch"},
        "messages": [{"$ref": "#/channels/events_batch/messages/events_batch"}],
        "bindings": qos1,
    }
    messages["dispatch"] = {
        "name": "dispatch",
        "title": "Production-order dispatch",
        "summary": "The production order / operation active on a machine. Retained; an empty payload (zero bytes, "
                   "not JSON) clears the machine's order. Unknown keys, a missing order/operation or invalid JSON "
                   "are rejected and logged.",
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/DispatchMessage"},
    }
    channels["dispatch"] = {
        "address": f"{base}/{{machine}}/dispatch",
        "title": "Dispatch (ERP → gateway)",
        "description": "Retained, QoS 1. The ERP (or MES) publishes; the gateway subscribes to "
                       f"{base}/+/dispatch.",
        "parameters": {**params, "machine": machine_param},
        "messages": {"dispatch": {"$ref": "#/components/messages/dispatch"}},
    }
    operations["receive_dispatch"] = {
        "action": "receive",
        "title": "Receive dispatch",
        "channel": {"$ref": "#/channels/dispatch"},
        "messages": [{"$ref": "#/channels/dispatch/messages/dispatch"}],
        "bindings": qos1_retained,
    }
    messages["ack"] = {
        "name": "ack",
        "title": "ERP acknowledgement / rejection",
        "summary": ErpAck.__doc__,
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/ErpAck"},
    }
    channels["acks"] = {
        "address": f"{base}/{{machine}}/acks",
        "title": "ERP acknowledgements (ERP → gateway)",
        "description": f"QoS 1, not retained. The gateway subscribes to {base}/+/acks.",
        "parameters": {**params, "machine": machine_param},
        "messages": {"ack": {"$ref": "#/components/messages/ack"}},
    }
    operations["receive_acks"] = {
        "action": "receive",
        "title": "Receive ERP rejections",
        "channel": {"$ref": "#/channels/acks"},
        "messages": [{"$ref": "#/channels/acks/messages/ack"}],
        "bindings": qos1,
    }
    messages["status"] = {
        "name": "status",
        "title": "Gateway status",
        "summary": GatewayStatus.__doc__,
        "contentType": "application/json",
        "payload": {"$ref": "#/components/schemas/GatewayStatus"},
    }
    channels["status"] = {
        "address": f"{base}/_gateways/{{gateway_id}}/status",
        "title": "Gateway status",
        "description": "Retained, QoS 1; the offline status is also the gateway's MQTT last will.",
        "parameters": {**params, "gateway_id": {"description": "Gateway id (gateway.id)."}},
        "messages": {"status": {"$ref": "#/components/messages/status"}},
    }
    operations["send_status"] = {
        "action": "send",
        "title": "Publish status",
        "channel": {"$ref": "#/channels/status"},
        "messages": [{"$ref": "#/channels/status/messages/status"}],
        "bindings": qos1_retained,
    }
    return {
        "asyncapi": "3.0.0",
        "id": f"urn:edge-gateway:{CONTRACT_VERSION}",
        "info": {
            "title": "edge-gateway",
            "version": CONTRACT_VERSION,
            "description": "Machine counters → production-order events (CloudEvents 1.0, structured JSON) over MQTT. "
                           "Topics follow the ISA-95 equipment hierarchy. See docs/event-contract.md and "
                           "docs/sap-mapping.md.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "localhost:1883",
                "protocol": "mqtt",
                "description": "The plant's MQTT broker (mqtt.host / mqtt.port in the gateway config).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


# ---------------------------------------------------------------------------------------------------- files
def generated_files(topic_root: str = "edge") -> dict[str, str]:
    """File name → content, exactly as ``write_schemas`` writes them."""

    def dump(doc: Any) -> str:
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    files = {f"{t}.schema.json": dump(s) for t, s in event_schemas().items()}
    files["dispatch.schema.json"] = dump(dispatch_schema())
    files["status.schema.json"] = dump(status_schema())
    files["ack.schema.json"] = dump(ack_schema())
    files["asyncapi.json"] = dump(asyncapi_document(topic_root))
    return files


def write_schemas(out_dir: str | Path, topic_root: str = "edge") -> list[Path]:
    """Write ``<type>.schema.json`` per event type, ``dispatch.schema.json``, ``status.schema.json`` and
    ``asyncapi.json`` into ``out_dir`` (created if needed); return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated_files(topic_root).items():
        p = out / name
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written


# ---------------------------------------------------------------------------------------------------- validation
class EventValidationError(ValueError):
    """A payload is not a valid event of the contract; ``problems`` lists every reason."""

    def __init__(self, problems: list[str], event: Mapping[str, Any] | None = None) -> None:
        self.problems = problems
        self.event = event
        what = "event"
        if isinstance(event, Mapping):
            what = f"{event.get('type', '?')} event {event.get('id', '?')}"
        super().__init__(f"invalid {what}: " + "; ".join(problems))


@cache
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled for ``re.search`` as ECMA-262 reads it: its final ``$`` is the end of the text (Python's
    also matches before a final newline, so "1000\\n" would pass ``ORDER_TEXT_PATTERN``). The contract's patterns
    anchor only there."""
    backslashes = len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))
    if pattern.endswith("$") and backslashes % 2 == 0:
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """The ``pattern`` keyword as JSON Schema defines it (ECMA-262), not as jsonschema's ``re.search`` reads it."""
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@lru_cache(maxsize=None)
def _validator(event_type: str) -> Any:
    from jsonschema import Draft202012Validator, validators

    schema = event_schemas()[event_type]
    Draft202012Validator.check_schema(schema)
    return validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})(schema)


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(root)"


def validate_event(payload: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """Validate one event as received from MQTT (bytes), or already parsed (dict).

    Checks the JSON Schema of its ``type`` (Draft 2020-12) and that the CloudEvents SDK reads it with the same
    id / source / type / subject / seq / epoch. Returns the parsed event; raises ``EventValidationError`` (a
    ``ValueError``) whose message lists every problem (JSON path: reason).
    """
    from cloudevents.core.formats.json import JSONFormat

    if isinstance(payload, Mapping):
        doc: Any = dict(payload)
        try:
            raw = json.dumps(doc).encode()
        except (ValueError, TypeError, RecursionError) as exc:  # a 4,300-digit number, deep nesting
            raise EventValidationError([f"not JSON: {type(exc).__name__}: {exc}"[:300]]) from None
    else:
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, a 4,300-digit number
            raise EventValidationError([f"not JSON: {type(exc).__name__}: {exc}"[:300]]) from None
    if not isinstance(doc, dict):
        raise EventValidationError([f"not a JSON object: {type(doc).__name__}"])
    etype = doc.get("type")
    if not isinstance(etype, str) or etype not in EVENT_MODELS:
        raise EventValidationError([f"type: unknown event type {etype!r} (known: {', '.join(EVENT_TYPES)})"], doc)

    problems = [f"{_path(e.absolute_path)}: {e.message}"
                for e in sorted(_validator(etype).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    try:
        ce = JSONFormat().read(None, raw)
    except Exception as exc:  # the SDK raises several exception types (validation, parse, key errors)
        problems.append(f"cloudevents SDK: {type(exc).__name__}: {exc}")
    else:
        attrs = ce.get_attributes()
        for name in ("specversion", "id", "source", "type", "subject", "seq", "epoch"):
            if attrs.get(name) != doc.get(name):
                problems.append(f"cloudevents SDK: attribute {name} read as {attrs.get(name)!r}, "
                                f"payload has {doc.get(name)!r}")
        if ce.get_data() != doc.get("data"):
            problems.append("cloudevents SDK: data differs from the payload's data")
    if problems:
        raise EventValidationError(problems, doc)
    return doc
