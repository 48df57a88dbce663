"""Event data types: the ``data`` of every event ``MachineEngine`` emits, defined once. Pure code, no I/O.

Each event type's data is a slotted stdlib dataclass built by the engine without validation (the hot path: a
pydantic model validated per event is several times slower). The field metadata (wire name, description, pattern,
examples, bounds) rides along as pydantic ``Field`` in ``Annotated``; it is read only by ``gateway.schema``, which
generates the JSON Schemas and the AsyncAPI document from these classes (pydantic's support for stdlib
dataclasses), so the contract is written down exactly once.

Wire names: a field whose name is a Python keyword carries an ``alias`` (``yield_`` -> ``"yield"``,
``from_`` -> ``"from"``); every other field is written under its own name.

Every data object is also a read-only mapping in wire names (``data["yield"]``, ``data.get("order")``, iteration
over the wire keys, ``==`` with a plain dict compares the JSON shape), and renders itself as JSON:
``to_json()`` returns exactly the text ``json.dumps(data.to_dict())`` returns (default separators, ASCII escapes),
from code generated once per class (``@event_data``), so encoding an event needs no intermediate dict.

Values are already in their wire form: quantities are decimal strings (``dec_str``), times RFC 3339 strings
(``rfc3339``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from json.encoder import encode_basestring_ascii as _json_str
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import ConfigDict, Field

DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?$"
"""Quantities are non-negative decimal strings in plain notation ("12", "0.25"; never 1.2E+1 nor a JSON number)."""
RFC3339_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"

ORDER_TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
"""Order and operation numbers are text without control characters: no C0 (U+0000-U+001F), DEL (U+007F) nor C1
(U+0080-U+009F). An ERP's never has one (SAP AUFNR / VORNR); the gateway refuses them where they enter (the MQTT
dispatch and the local command in gateway/dispatch.py, the PLC's order tags in gateway/orders.py). Lengths are
bounded separately (``min_length``)."""
CONTROL_CHARACTERS = "control characters (U+0000-U+001F, U+007F-U+009F)"  # what these patterns refuse, for messages
TEXT_PATTERN = ORDER_TEXT_PATTERN
"""Every other text of an event that comes from a config or an ERP dispatch (units of measure, the anomaly's
explanation) follows the same rule: no control character."""
MACHINE_ID_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""Machine ids are the config's (``machines[].id``): one MQTT topic level of letters, digits, ``_``, ``.``, ``-``."""

DecimalStr = Annotated[str, Field(pattern=DECIMAL_PATTERN, examples=["12", "0.25"])]
Timestamp = Annotated[str, Field(pattern=RFC3339_PATTERN, examples=["2026-11-22T08:15:02.120000Z"])]


# ---------------------------------------------------------------------------------------------------- formatting
def dec_str(d: Decimal | int) -> str:
    """Decimal as a plain string: 12, 0.25, 100 (never 1E+2), no trailing fraction zeros, "0" for any zero. An int
    (an unscaled counter's quantity) as ``str`` writes it.

    Total for every finite Decimal, however large or small its exponent: it works on the digits and never uses a
    decimal context (quantize/normalize raise InvalidOperation or Overflow beyond the context's precision)."""
    if type(d) is int:
        return int.__repr__(d)
    s = str(d)
    if "E" not in s:  # plain already (the common case); "NaN"/"Infinity" are caught below
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s[-1:].isdigit():
            return "0" if s == "-0" else s
    sign, digits, exp = d.as_tuple()
    if not isinstance(exp, int):
        raise ValueError(f"not a finite decimal: {d}")
    s = "".join(map(str, digits))
    if exp >= 0:
        s = (s.lstrip("0") + "0" * exp) if s.strip("0") else "0"
    else:
        s = s.rjust(1 - exp, "0")
        whole, frac = s[:exp].lstrip("0") or "0", s[exp:].rstrip("0")
        s = f"{whole}.{frac}" if frac else whole
    return "-" + s if sign and s != "0" else s


@lru_cache(maxsize=4096)
def _second(whole: int) -> str:
    """"YYYY-MM-DDTHH:MM:SS" of a whole POSIX second (UTC); raises like datetime for times it cannot represent."""
    return datetime.fromtimestamp(whole, tz=timezone.utc).isoformat()[:19]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plc_text(value: str) -> str:
    """A text read from a PLC, for an event: up to its first NUL (a PLC string's padding, as a C string ends), other
    control characters written as ``\\xNN`` (no event text holds one: TEXT_PATTERN)."""
    text = value.split("\0", 1)[0]
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


def rfc3339(t: float, *, always_fraction: bool = True) -> str:
    """POSIX seconds as an RFC 3339 UTC timestamp ("2026-11-22T08:15:02.120000Z"). Pure: formats the value it is
    given. Identical to ``datetime.fromtimestamp(t, timezone.utc).isoformat(...)`` with "+00:00" written "Z"
    (microseconds rounded half to even, as datetime does); ``always_fraction=False`` omits a zero fraction like
    ``isoformat()`` without a timespec (the CloudEvents SDK's rendering of ``time``). About 4x faster than datetime:
    the date and clock part is cached per whole second."""
    frac, whole = math.modf(t)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    elif us < 0:
        us += 1_000_000
        whole -= 1.0
    if us or always_fraction:
        return f"{_second(int(whole))}.{us:06d}Z"
    return _second(int(whole)) + "Z"


def rfc3339_opt(t: float | None) -> str | None:
    """``rfc3339(t)``, None for None."""
    return None if t is None else rfc3339(t)


_MEMO_MAX = 4096
_memo: dict[float, str] = {}
_memo_nf: dict[float, str] = {}


def _remembered(memo: dict[float, str], t: float, always_fraction: bool) -> str:
    s = memo.get(t)
    if s is None:
        s = rfc3339(t, always_fraction=always_fraction)
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[t] = s
    return s


def rfc3339_memo(t: float | None) -> str | None:
    """``rfc3339_opt(t)``, remembered for the last few thousand times: the machines of one Modbus block (or one OPC
    UA notification) are read at the same time, and every one's report carries it (its window's start and end, the
    event's time): one formatting instead of one per machine (~0.45 µs a time)."""
    return None if t is None else _remembered(_memo, t, True)


def rfc3339_event_time(t: float) -> str:
    """``rfc3339(t, always_fraction=False)`` (an event's ``time``), remembered like ``rfc3339_memo``."""
    return _remembered(_memo_nf, t, False)


# ---------------------------------------------------------------------------------------------------- base
class EventData:
    """Base of the event data types: read-only mapping access in wire names and JSON rendering (see module doc)."""

    __slots__ = ()
    _wire: ClassVar[tuple[tuple[str, str], ...]] = ()  # (attribute, wire name), in field order
    _attr_of: ClassVar[dict[str, str]] = {}  # wire name -> attribute

    def to_json(self) -> str:  # replaced per class by @event_data
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-shaped dict (nested data objects converted too), as the consumer parses it."""
        return {k: _plain(getattr(self, a)) for a, k in self._wire}

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, self._attr_of[key])
        except KeyError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        a = self._attr_of.get(key)
        return default if a is None else getattr(self, a)

    def __contains__(self, key: object) -> bool:
        return key in self._attr_of

    def __iter__(self) -> typing.Iterator[str]:
        return (k for _, k in self._wire)

    def __len__(self) -> int:
        return len(self._wire)

    def keys(self) -> list[str]:
        return [k for _, k in self._wire]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, a)) for a, k in self._wire]

    def values(self) -> list[Any]:
        return [getattr(self, a) for a, _ in self._wire]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EventData):
            return type(self) is type(other) and self.items() == other.items()
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _plain(v: Any) -> Any:
    if isinstance(v, EventData):
        return v.to_dict()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _json_any(v: Any) -> str:
    return json.dumps(_plain(v))


def _json_opt_str(v: str | None) -> str:
    return "null" if v is None else _json_str(v)


def _json_opt_int(v: int | None) -> str:
    return "null" if v is None else int.__repr__(v)


_CONFIG = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
T = TypeVar("T", bound=type)


def _render(tp: Any, expr: str, ns: dict[str, Any]) -> str:
    """Python expression rendering ``expr`` (a value of type ``tp``) as JSON text, like json.dumps would."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _render(typing.get_args(tp)[0], expr, ns)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = rest[0]
            base = typing.get_args(inner)[0] if typing.get_origin(inner) is Annotated else inner
            if base is str:
                return f"_opt_str({expr})"
            if base is int:
                return f"_opt_int({expr})"
            if isinstance(base, type) and issubclass(base, EventData):
                return f'("null" if {expr} is None else {expr}.to_json())'
        return f"_any({expr})"
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            return f"_str({expr})"
        if all(a is True or a is False for a in args):
            return f'("true" if {expr} else "false")'
        return f"_any({expr})"
    if origin is list:
        (item,) = args
        base = typing.get_args(item)[0] if typing.get_origin(item) is Annotated else item
        if isinstance(base, type) and issubclass(base, EventData):
            return f'("[" + ", ".join([x.to_json() for x in {expr}]) + "]")'
        return f"_any({expr})"
    if tp is str:
        return f"_str({expr})"
    if tp is bool:
        return f'("true" if {expr} else "false")'
    if tp is int:
        return f"_int({expr})"
    if isinstance(tp, type) and issubclass(tp, EventData):
        return f"{expr}.to_json()"
    return f"_any({expr})"


def event_data(cls: T) -> T:
    """Class decorator: a slotted dataclass (no validation, mapping access, ``to_json`` generated from the fields).

    Field metadata: ``Annotated[type, Field(description=..., alias=..., pattern=...)]``; the class docstring is the
    schema description. Pydantic config for schema generation: extra keys forbidden, strict."""
    if "__pydantic_config__" not in cls.__dict__:
        cls.__pydantic_config__ = _CONFIG  # type: ignore[attr-defined]
    dc = dataclasses.dataclass(slots=True, eq=False)(cls)
    hints = typing.get_type_hints(dc, include_extras=True)
    wire: list[tuple[str, str]] = []
    parts: list[str] = []
    ns: dict[str, Any] = {"_str": _json_str, "_int": int.__repr__, "_any": _json_any, "_opt_str": _json_opt_str,
                          "_opt_int": _json_opt_int}
    for f in dataclasses.fields(dc):
        tp = hints[f.name]
        alias = None
        if typing.get_origin(tp) is Annotated:
            for meta in typing.get_args(tp)[1:]:
                alias = getattr(meta, "alias", None) or alias
        key = alias or f.name
        wire.append((f.name, key))
        parts.append(f"{json.dumps(key)}: {{{_render(tp, 'self.' + f.name, ns)}}}")
    body = ", ".join(parts)
    assert "'" not in body and "\\" not in body, body  # the generated expressions only use double quotes
    src = f"def to_json(self):\n    return f'{{{{{body}}}}}'\n"
    exec(compile(src, f"<event_data {dc.__name__}.to_json>", "exec"), ns)  # noqa: S102 - generated from the fields
    dc.to_json = ns["to_json"]  # type: ignore[attr-defined]
    dc.to_json.__doc__ = "The data as JSON text, exactly as json.dumps(self.to_dict()) writes it."
    dc._wire = tuple(wire)  # type: ignore[attr-defined]
    dc._attr_of = {k: a for a, k in wire}  # type: ignore[attr-defined]
    return dc


# ---------------------------------------------------------------------------------------------------- parts
@event_data
class Quantities(EventData):
    """Disjoint quantities (SAP semantics: yield, scrap and rework never overlap)."""

    yield_: Annotated[DecimalStr, Field(alias="yield", description="Good quantity (SAP ConfirmationYieldQuantity).")]
    scrap: Annotated[DecimalStr, Field(description="Scrap quantity (SAP ConfirmationScrapQuantity).")]
    rework: Annotated[DecimalStr, Field(description="Rework quantity (SAP ConfirmationReworkQuantity).")]


@event_data
class Totals(Quantities):
    """Cumulative quantities reported for this machine + order + operation since the operation started here
    (for unassigned counts: since the last order ended)."""


@event_data
class Window(EventData):
    """Source-time span of the counted changes in a reporting window."""

    start: Annotated[Timestamp | None, Field(description="Source time of the first counted change (RFC 3339, UTC).")]
    end: Annotated[Timestamp | None, Field(description="Source time of the last counted change (RFC 3339, UTC).")]


@event_data
class CounterEvidence(EventData):
    """How a counter moved during the window: raw values and what the counter rules recognised."""

    counter: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Counter name in the machine "
                                                                                "config (good, scrap, rework, total).")]
    from_: Annotated[int | None, Field(alias="from", description="Counter value before the first counted change; "
                                                                 "null for reset_on_read / delta counters.")]
    to: Annotated[int, Field(description="Counter value after the last counted change.")]
    rollovers: Annotated[int, Field(ge=0, description="Rollovers (wrap at the counter's modulus) recognised in the "
                                                      "window.")]
    resets: Annotated[int, Field(ge=0, description="Counter resets recognised in the window.")]
    glitches: Annotated[int, Field(ge=0, description="Transient zero reads recognised (and bridged) in the window.")]


@event_data
class ConsumptionBasis(EventData):
    """The produced quantity the backflushed consumption was computed from."""

    yield_: Annotated[DecimalStr, Field(alias="yield", description="Yield of the window.")]
    scrap: Annotated[DecimalStr, Field(description="Scrap of the window (scrapped parts consumed material too).")]
    unit: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Unit of measure of yield and scrap.")]


@event_data
class ConsumedComponent(EventData):
    """One component (BOM item) consumed."""

    material: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Material number of the "
                                                                                  "component.")]
    quantity: Annotated[DecimalStr, Field(description="Quantity consumed: (yield + scrap) x quantity_per_unit, or "
                                                      "the metered quantity.")]
    unit: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Unit of measure of the component.")]


# ---------------------------------------------------------------------------------------------------- data
Machine = Annotated[str, Field(min_length=1, pattern=MACHINE_ID_PATTERN, description="Machine id (ISA-95 work cell).")]


@event_data
class OperationStartedData(EventData):
    """A production-order operation became active on the machine (dispatch or changeover)."""

    machine: Machine
    order: Annotated[str, Field(min_length=1, pattern=ORDER_TEXT_PATTERN, description="Production order number.")]
    operation: Annotated[str, Field(min_length=1, pattern=ORDER_TEXT_PATTERN,
                                    description="Operation / activity number.")]
    planned_quantity: Annotated[DecimalStr | None, Field(description="Planned quantity from the dispatch; null when "
                                                                     "not given.")]
    unit: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN,
                               description="Unit of measure: the dispatch's unit, else the machine's.")]


@event_data
class QuantityReportedData(EventData):
    """Yield / scrap / rework deltas counted in one reporting window."""

    __pydantic_config__ = ConfigDict(**_CONFIG, json_schema_extra={
        "if": {"properties": {"unassigned": {"const": True}}},
        "then": {"properties": {"order": {"type": "null"}, "operation": {"type": "null"}}},
        "else": {"properties": {"order": {"type": "string"}, "operation": {"type": "string"}}},
    })

    machine: Machine
    order: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Production order number; null when "
                                                                               "unassigned.")]
    operation: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Operation number; null when "
                                                                                   "unassigned.")]
    unassigned: Annotated[bool, Field(description="True when no order was active: the counts belong to no order "
                                                  "yet.")]
    reason: Annotated[Literal["periodic", "units", "changeover", "completion"], Field(
        description="Why the window closed: periodic (interval_s elapsed), units (max_units reached), changeover "
                    "(another order was dispatched, or the running operation's unit or components changed), "
                    "completion (the operation was completed).")]
    window: Annotated[Window, Field(description="Source-time span of the counted changes.")]
    quantities: Annotated[Quantities, Field(description="Deltas of this window.")]
    unit: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Unit of measure of all quantities.")]
    totals: Annotated[Totals, Field(description="Cumulative quantities for this machine + order + operation, this "
                                                "event included.")]
    evidence: Annotated[list[CounterEvidence], Field(description="Per counter: raw values and recognised "
                                                                 "rollovers/resets/glitches.")]


_EVIDENCE_HEAD: dict[str, str] = {}  # counter name -> the start of its evidence object, up to "from"
_EVIDENCE_QUIET = ', "rollovers": 0, "resets": 0, "glitches": 0}'  # the end of a counter's that only counted


class QuantityReport(QuantityReportedData):
    """A ``QuantityReportedData`` made from plain values, for the hot path (one per reporting window of every
    machine): ``to_json`` renders them in one step, byte for byte what the typed object renders, and the typed
    parts (``Window``, ``Quantities``, ``Totals``, ``CounterEvidence``) are only built when a field is read (the
    status page, tests). Instead of seven objects and a walk over them per report: ~3 µs less per report
    in-process (bench/README.md, eighth session). ``tests/test_events_encoding.py`` checks it against the typed object.

    ``values``: (machine, order, operation, unassigned, reason, window start, window end (RFC 3339 text or None),
    yield, scrap, rework, unit, total yield, total scrap, total rework (decimal text), evidence: a tuple of
    (counter, from, to, rollovers, resets, glitches) tuples). Immutable values only: the report never changes after
    it is made."""

    __slots__ = ("_values",)

    def __init__(self, values: tuple[Any, ...]) -> None:  # the fields are filled on first read
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        # a field not read yet: build the typed parts once, then every field is a plain slot
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        (machine, order, operation, unassigned, reason, start, end, y, s, r, unit, ty, ts, tr,
         evidence) = self._values
        QuantityReportedData.__init__(
            self, machine=machine, order=order, operation=operation, unassigned=unassigned, reason=reason,
            window=Window(start=start, end=end), quantities=Quantities(yield_=y, scrap=s, rework=r), unit=unit,
            totals=Totals(yield_=ty, scrap=ts, rework=tr),
            evidence=[CounterEvidence(counter=c, from_=f, to=t, rollovers=ro, resets=re, glitches=g)
                      for c, f, t, ro, re, g in evidence])
        return object.__getattribute__(self, name)

    def to_json(self) -> str:
        (machine, order, operation, unassigned, reason, start, end, y, s, r, unit, ty, ts, tr,
         evidence) = self._values
        # written as they are (nothing to escape): the quantities (``dec_str``: ASCII digits, sign and point), the
        # timestamps (``rfc3339``) and the reason (one of four words), as the engine makes them
        r_ = int.__repr__
        heads = _EVIDENCE_HEAD
        parts = []
        for c, f, t, ro, rs, g in evidence:
            head = heads.get(c)
            if head is None:
                head = f'{{"counter": {_json_str(c)}, "from": '
                if len(heads) < 1024:
                    heads[c] = head
            tail = _EVIDENCE_QUIET if not (ro or rs or g) else \
                f', "rollovers": {r_(ro)}, "resets": {r_(rs)}, "glitches": {r_(g)}}}'
            parts.append(f'{head}{"null" if f is None else r_(f)}, "to": {r_(t)}{tail}')
        ev = ", ".join(parts)
        start = "null" if start is None else f'"{start}"'
        end = "null" if end is None else f'"{end}"'
        return (f'{{"machine": {_json_str(machine)}, "order": {_json_opt_str(order)}, '
                f'"operation": {_json_opt_str(operation)}, "unassigned": {"true" if unassigned else "false"}, '
                f'"reason": "{reason}", "window": {{"start": {start}, "end": {end}}}, '
                f'"quantities": {{"yield": "{y}", "scrap": "{s}", "rework": "{r}"}}, "unit": {_json_str(unit)}, '
                f'"totals": {{"yield": "{ty}", "scrap": "{ts}", "rework": "{tr}"}}, "evidence": [{ev}]}}')


@event_data
class OperationCompletedData(EventData):
    """The operation was completed (final confirmation); emitted after the last quantity report of the operation."""

    machine: Machine
    order: Annotated[str, Field(min_length=1, pattern=ORDER_TEXT_PATTERN, description="Production order number.")]
    operation: Annotated[str, Field(min_length=1, pattern=ORDER_TEXT_PATTERN,
                                    description="Operation / activity number.")]
    final: Annotated[Literal[True], Field(description="Always true: this is the final confirmation of the "
                                                      "operation.")]
    totals: Annotated[Totals, Field(description="Quantities reported for the operation on this machine.")]
    unit: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Unit of measure of the totals.")]


@event_data
class MaterialConsumedData(EventData):
    """Material consumed in one window: backflushed from the order's components for the window's yield + scrap,
    or metered by a material meter on the machine."""

    # as for quantity reports: an assigned consumption names its order and operation (an ERP cannot book it
    # otherwise: the posting service refused the whole broker message it came in)
    __pydantic_config__ = ConfigDict(**_CONFIG, json_schema_extra={
        "if": {"properties": {"unassigned": {"const": True}}},
        "then": {"properties": {"order": {"type": "null"}, "operation": {"type": "null"}}},
        "else": {"properties": {"order": {"type": "string"}, "operation": {"type": "string"}}},
    })

    machine: Machine
    order: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Production order number; null when "
                                                                               "metered with no active order.")]
    operation: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Operation / activity number; "
                                                                                   "null when unassigned.")]
    unassigned: Annotated[bool, Field(description="True when no order was active (metered consumption only).")]
    method: Annotated[Literal["backflush", "metered"], Field(
        description="backflush: computed from the dispatch's components; metered: read from a material meter.")]
    basis: Annotated[ConsumptionBasis | None, Field(
        description="Produced quantity a backflush was computed from; null for metered consumption.")]
    movement_type: Annotated[Literal["261"], Field(description="SAP goods movement type: 261 = goods issue for the "
                                                               "order.")]
    components: Annotated[list[ConsumedComponent], Field(min_length=1, description="Consumed components.")]


@event_data
class MachineStateChangedData(EventData):
    """The machine's state changed: its state tag, or the gateway lost or regained its PLC."""

    machine: Machine
    state: Annotated[str, Field(pattern=TEXT_PATTERN, description="New state (mapped through state_values, else the "
                                                                  "raw value as text); "
                                            "'unreachable' when the gateway has lost the machine's PLC for longer "
                                            "than alarms.machine_unreachable_s (its figures are stale), 'reachable' "
                                            "when it is back, for a machine without a state tag (with one, the tag's "
                                            "state is reported again).")]
    previous: Annotated[str | None, Field(pattern=TEXT_PATTERN, description="Previous state; null for the first state "
                                                                           "seen.")]
    raw: Annotated[bool | int | float | Annotated[str, Field(pattern=TEXT_PATTERN)] | None, Field(
        description="Raw tag value as read from the device (a text up to its first NUL, a PLC string's padding, other "
                    "control characters written as \\xNN); null when reason is connection.")]
    reason: Annotated[Literal["tag", "connection"], Field(
        description="What reported the change: tag (the machine's state tag), connection (the gateway lost or "
                    "regained the PLC: state unreachable / reachable).")]


@event_data
class CounterAnomalyData(EventData):
    """A counter change the gateway could not count with certainty: a supervisor (or the ERP) should look at it."""

    machine: Machine
    counter: Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN, description="Counter name in the machine "
                                                                                "config.")]
    kind: Annotated[Literal["implausible_jump", "ambiguous_decrease"], Field(
        description="implausible_jump: an increase larger than max_rate x elapsed time, or a decrease to a value "
                    "above it that the next reading confirmed (a preset, a restored or half-written counter: no "
                    "reset); not counted, baseline moved. "
                    "ambiguous_decrease: a decrease after a gap longer than one wrap period (modulus / max_rate) or "
                    "an unknown gap; counted as a reset (counted), it may have been a rollover (possible_rollover).")]
    from_: Annotated[int | DecimalStr | None, Field(alias="from", description="Counter value before the change; for "
                                                        "a float meter (resolution set) its reading as a decimal string "
                                                        "rounded to the resolution, e.g. \"1234.56\".")]
    to: Annotated[int | DecimalStr | None, Field(description="Counter value after the change (the new baseline); a "
                                                           "float meter's reading as a decimal string.")]
    order: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Active production order; null "
                                                                               "when none.")]
    operation: Annotated[str | None, Field(pattern=ORDER_TEXT_PATTERN, description="Active operation; null when "
                                                                                   "none.")]
    held: Annotated[DecimalStr, Field(description="Quantity not counted that may have been produced (scaled like the "
                                                  "counter's quantities): the jump; for an ambiguous decrease "
                                                  "possible_rollover - counted.")]
    counted: Annotated[DecimalStr, Field(description="Quantity counted for this change (scaled): 0 for a jump; the "
                                                     "reset delta (the new value) for an ambiguous decrease.")]
    possible_rollover: Annotated[DecimalStr | None, Field(
        description="Ambiguous decrease: the quantity had it been one rollover (value + modulus - previous, scaled); "
                    "null for a jump.")]
    elapsed_s: Annotated[float | None, Field(ge=0, description="Seconds between the two readings (gateway monotonic "
                                                               "clock; wall clock after a restart); null when "
                                                               "unknown.")]
    detail: Annotated[str, Field(pattern=TEXT_PATTERN, description="Human-readable explanation.")]


DATA_TYPES: dict[str, type[EventData]] = {
    "operation.started": OperationStartedData,
    "operation.quantity_reported": QuantityReportedData,
    "operation.completed": OperationCompletedData,
    "material.consumed": MaterialConsumedData,
    "machine.state_changed": MachineStateChangedData,
    "counter.anomaly": CounterAnomalyData,
}
"""Event type -> its data type: every event type of the contract."""
EVENT_TYPES = tuple(DATA_TYPES)
