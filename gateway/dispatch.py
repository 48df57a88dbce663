"""Messages that reach the gateway from the network, validated before they touch any machine: production-order
dispatches (ERP → gateway over MQTT, retained), the local order command (``POST /machines/{id}/order``) and the
ERP's acknowledgements of delivered events.

Every parser takes the raw payload bytes and either returns a valid value or raises ``DispatchRejected(reason,
detail)`` - never anything else, whatever the bytes (a retained payload that raised inside the core would crash-loop
the gateway). Decimals are bounded (finite, non-negative, at most 15 digits of which at most 6 decimal places, so at
most 999 999 999.999999) and text is bounded and free of control characters, so everything accepted survives the
engines, the snapshots and the event encoding (order and operation numbers: not even a C1 control character, as
the event contract says).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from mappings.events import CONTROL_CHARACTERS, ORDER_TEXT_PATTERN
from mappings.machine import Component, OrderContext

QUANTITY_MAX_DIGITS = 15
QUANTITY_DECIMAL_PLACES = 6
QUANTITY_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,6})?$"
Quantity = Annotated[
    Decimal,
    Field(ge=0, max_digits=QUANTITY_MAX_DIGITS, decimal_places=QUANTITY_DECIMAL_PLACES, allow_inf_nan=False),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0, "maximum": 999_999_999.999999},
                              {"type": "string", "pattern": QUANTITY_PATTERN}]}),
]
# no control character, C0, DEL or C1 (they end up in payloads, logs and internal keys): the contract's rule for order
# numbers (ORDER_TEXT_PATTERN), for every text field of a dispatch and an ERP answer, and never empty
_TEXT = r"^[^\x00-\x1f\x7f-\x9f]+$"
_PATTERN_MESSAGES = {  # what a pattern's mismatch means, for the detail (pydantic's message quotes the pattern)
    _TEXT: f"must not contain {CONTROL_CHARACTERS}",
    ORDER_TEXT_PATTERN: f"must not contain {CONTROL_CHARACTERS}",
}


def _text(max_length: int, description: str, pattern: str = _TEXT) -> Any:
    return Field(min_length=1, max_length=max_length, pattern=pattern, description=description)


class DispatchComponent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    material: str = _text(64, "Component material number.")
    quantity_per_unit: Quantity = Field(description="Quantity consumed per unit produced (decimal, <= 6 places).")
    unit: str = _text(8, "Unit of measure of the component.")


class DispatchMessage(BaseModel):
    """Retained per machine on ``.../{machine}/dispatch``; an empty payload clears the dispatch."""

    model_config = ConfigDict(extra="forbid")
    # an order or operation number has no C1 control character either (the contract's ORDER_TEXT_PATTERN)
    order: str = _text(40, "Production order number.", ORDER_TEXT_PATTERN)
    operation: str = _text(16, "Operation / activity number.", ORDER_TEXT_PATTERN)
    status: Literal["active", "completed"] = "active"
    unit: str | None = Field(None, min_length=1, max_length=8, pattern=_TEXT)
    planned_quantity: Quantity | None = Field(None, description="Planned quantity (decimal, <= 6 places).")
    components: list[DispatchComponent] = Field(default_factory=list, max_length=100)
    dispatched_at: str | None = Field(None, max_length=64)

    def context(self) -> OrderContext:
        return OrderContext(
            order=self.order,
            operation=self.operation,
            status=self.status,
            unit=self.unit,
            planned_quantity=self.planned_quantity,
            components=tuple(Component(c.material, c.quantity_per_unit, c.unit) for c in self.components),
        )


class DispatchRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


MAX_DISPATCH_BYTES = 64 * 1024
MAX_ACK_BYTES = 256 * 1024
MAX_REASON_CHARS = 500


def _load_json(payload: bytes, limit: int) -> Any:
    if len(payload) > limit:
        raise DispatchRejected("too_large", f"{len(payload)} bytes > {limit}")
    try:
        return json.loads(payload)
    except RecursionError:
        raise DispatchRejected("invalid_json", "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise DispatchRejected("invalid_json", _clean(str(exc))[:200]) from None


def _clean(text: str) -> str:
    """Text safe to log and encode: lone surrogates and control characters (C0, DEL, C1) replaced."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c >= " " and not "\x7f" <= c <= "\x9f" else "?" for c in text)


def _message(e: Any) -> str:
    if e["type"] == "string_pattern_mismatch":
        return _PATTERN_MESSAGES.get(e.get("ctx", {}).get("pattern"), e["msg"])
    return e["msg"]


def _schema_error(exc: ValidationError) -> DispatchRejected:
    detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {_message(e)}" for e in exc.errors())
    return DispatchRejected("schema", _clean(detail)[:2000])


def _validate(model: type[BaseModel], doc: Any) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    except RecursionError:
        raise DispatchRejected("schema", "nested too deeply") from None


def parse_dispatch(payload: bytes) -> OrderContext | None:
    """Parse an MQTT dispatch payload; None (an empty payload) clears the machine's order. Raises DispatchRejected."""
    if not payload:
        return None
    return _validate(DispatchMessage, _load_json(payload, MAX_DISPATCH_BYTES)).context()


class _Clear(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clear: Literal[True]


def parse_local_order(payload: bytes) -> OrderContext | None:
    """Parse the body of the local order command (``POST /machines/{id}/order``): a dispatch message
    (``{"order", "operation", "status"?, ...}``, the same model and bounds as an MQTT dispatch) or exactly
    ``{"clear": true}`` (returns None: clear the machine's order). Raises DispatchRejected; unlike an MQTT dispatch
    an empty body is an error, not a clear."""
    doc = _load_json(payload, MAX_DISPATCH_BYTES) if payload else _reject_empty()
    if isinstance(doc, dict) and "clear" in doc:
        _validate(_Clear, doc)
        return None
    return _validate(DispatchMessage, doc).context()


def _reject_empty() -> Any:
    raise DispatchRejected("invalid_json", "empty body")


# ------------------------------------------------------------------------------------------------ ERP acks
_TOPIC_LEVEL = r"^[^/#+\x00-\x1f\x7f]+$"  # usable as one MQTT topic level: no separator, no wildcard


class _AckedEvent(BaseModel):
    """The CloudEvent the ERP acknowledges (as the gateway published it; other attributes and data pass through)."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=128, pattern=_TEXT)
    source: str = Field(min_length=1, max_length=512, pattern=_TEXT)
    type: str = Field(min_length=1, max_length=64, pattern=_TOPIC_LEVEL)
    subject: str = Field(min_length=1, max_length=64, pattern=_TOPIC_LEVEL)
    seq: int | None = Field(None, ge=1, le=2**63 - 1)
    epoch: str | None = Field(None, min_length=1, max_length=128, pattern=_TEXT)


class _ErpAckMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["accepted", "rejected"]
    id: str | None = Field(None, max_length=128)
    source: str | None = Field(None, max_length=512)
    reason: str | None = None  # bounded by MAX_ACK_BYTES; cleaned and cut to MAX_REASON_CHARS
    event: _AckedEvent | None = None


@dataclass(frozen=True)
class ErpAck:
    """A validated ERP acknowledgement. For ``rejected``: the refused event of this gateway and store, with its
    machine (``subject``, a valid topic level), type (a valid topic level), id, seq (None if absent) and the ERP's
    reason (cleaned, at most 500 characters); ``event`` is the CloudEvent as received (JSON-serialisable)."""

    status: Literal["accepted", "rejected"]
    event_id: str | None
    machine: str | None = None
    type: str | None = None
    seq: int | None = None
    reason: str = ""
    event: dict[str, Any] | None = None


def parse_erp_ack(payload: bytes, *, source: str, epoch: str) -> ErpAck:
    """Parse an ERP acknowledgement (``.../{machine}/acks``): ``{"status": "accepted"|"rejected", "event": {CloudEvent},
    "reason": ...}``. A rejection must carry the rejected event, and that event must be one of this gateway's
    (``source``) from this store (``epoch`` extension): otherwise DispatchRejected ``foreign_source`` /
    ``foreign_epoch``. An acceptance needs no event (it changes nothing). Raises DispatchRejected (``too_large``,
    ``invalid_json``, ``schema``, ``foreign_source``, ``foreign_epoch``)."""
    doc = _load_json(payload, MAX_ACK_BYTES)
    msg: _ErpAckMessage = _validate(_ErpAckMessage, doc)
    ev = msg.event
    if msg.status == "accepted":
        return ErpAck("accepted", msg.id if msg.id is not None else (ev.id if ev else None))
    if ev is None:
        raise DispatchRejected("schema", "event: a rejection must carry the rejected CloudEvent")
    if msg.id is not None and msg.id != ev.id:
        raise DispatchRejected("schema", f"id {_clean(msg.id)[:128]!r} is not the event's id {ev.id!r}")
    if ev.source != source:
        raise DispatchRejected("foreign_source", f"event {ev.id} has source {ev.source!r}, not this gateway's "
                                                 f"{source!r}")
    if ev.epoch != epoch:
        raise DispatchRejected("foreign_epoch", f"event {ev.id} has epoch {ev.epoch!r}, not this store's {epoch!r}")
    reason = _clean(msg.reason)[:MAX_REASON_CHARS] if msg.reason else "rejected by the ERP"
    event = doc["event"]
    try:
        json.dumps(event).encode("utf-8")
    except (ValueError, RecursionError):  # e.g. NaN is fine, but a nested structure too deep to re-encode is not
        raise DispatchRejected("schema", "event: cannot be re-encoded") from None
    return ErpAck("rejected", ev.id, machine=ev.subject, type=ev.type, seq=ev.seq, reason=reason, event=event)
