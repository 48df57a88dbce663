"""Machine engine: samples and dispatches in, production-order event drafts out. Pure code, no I/O, no clock reads.

One ``MachineEngine`` per machine. It owns the counter states, the active production-order context, the open
reporting window and the running totals, all serialisable with ``snapshot()`` so the store can persist them in the
same transaction as the events derived from them (the machine's cumulative counter is the durable log: after a
crash the engine restarts from the last committed snapshot and derives the same quantities again).

Quantities (SAP semantics): yield, scrap and rework are disjoint. A machine with a ``total`` counter instead of a
``good`` one reports yield = total - scrap - rework; a negative remainder (the scrap counter moved before the
total counter was read) is carried to the next window rather than reported.

Time: the reporting window is timed with the gateway's monotonic clock (``Sample.mono`` of the first counted change,
``tick(now)`` with ``time.monotonic()``); ``next_deadline()`` tells the caller when the next ``tick`` can do
anything. Source and wall-clock times only go into payloads. A completed order/operation is remembered (bounded,
persisted) and an ``active`` dispatch for it is refused with ``OrderRefused``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from mappings.counters import JUMP_TOLERANCE_S, QUIET, CounterSpec, CounterState, plain, plain_increase, step
from mappings.events import (
    ConsumedComponent,
    ConsumptionBasis,
    CounterAnomalyData,
    EventData,
    MachineStateChangedData,
    MaterialConsumedData,
    OperationCompletedData,
    OperationStartedData,
    QuantityReport,
    Totals,
    dec_str,
    plc_text,
    rfc3339_memo,
    rfc3339_opt,
)
from mappings.samples import Sample

ZERO = Decimal(0)
QUANTITY_KINDS = ("good", "scrap", "rework", "total")

iso = rfc3339_opt  # POSIX seconds (or None) as an RFC 3339 UTC timestamp with microseconds; kept for callers
# dec_str is re-exported from mappings.events (its home since the typed event data)


@dataclass(frozen=True)
class CounterBinding:
    spec: CounterSpec
    scale: Decimal = Decimal(1)


@dataclass(frozen=True)
class MaterialMeter:
    binding: CounterBinding
    unit: str


MATERIAL_PREFIX = "material:"


@dataclass(frozen=True)
class MachineSpec:
    id: str
    counters: dict[str, CounterBinding]
    unit: str = "PCE"
    state_values: dict[str, str] | None = None  # None: no state tag bound; {}: raw text is the state
    interval_s: float = 5.0
    max_units: int | None = None
    # fraction of interval_s by which a window may close early, drawn per window from a generator seeded with the
    # machine id (deterministic); > 0 also makes the first window after the engine is built close anywhere within
    # interval_s, so machines started together do not report in one burst. 0: every window is exactly interval_s.
    interval_jitter: float = 0.0
    materials: dict[str, "MaterialMeter"] = field(default_factory=dict)  # metered consumption, by material number

    def key(self, signal: str) -> str:
        return f"{self.id}/{signal}"

    def keys(self) -> list[str]:
        keys = [self.key(name) for name in self.counters] + [self.key(MATERIAL_PREFIX + m) for m in self.materials]
        if self.state_values is not None:
            keys.append(self.key("state"))
        return keys

    def counter_keys(self) -> list[str]:
        return [self.key(name) for name in self.counters]


@dataclass(frozen=True)
class Component:
    material: str
    quantity_per_unit: Decimal
    unit: str


@dataclass(frozen=True)
class OrderContext:
    order: str
    operation: str
    status: str = "active"  # active | completed
    unit: str | None = None
    planned_quantity: Decimal | None = None
    components: tuple[Component, ...] = ()

    @property
    def ref(self) -> tuple[str, str]:
        return (self.order, self.operation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "operation": self.operation,
            "status": self.status,
            "unit": self.unit,
            "planned_quantity": None if self.planned_quantity is None else dec_str(self.planned_quantity),
            "components": [
                {"material": c.material, "quantity_per_unit": dec_str(c.quantity_per_unit), "unit": c.unit}
                for c in self.components
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OrderContext":
        return cls(
            order=d["order"],
            operation=d["operation"],
            status=d.get("status", "active"),
            unit=d.get("unit"),
            planned_quantity=None if d.get("planned_quantity") is None else Decimal(d["planned_quantity"]),
            components=tuple(
                Component(c["material"], Decimal(c["quantity_per_unit"]), c["unit"]) for c in d.get("components", ())
            ),
        )


class OrderRefused(Exception):
    """``MachineEngine.dispatch`` refused an order context; nothing changed. ``reason`` is a stable key
    (``completed``: an active dispatch for an operation already completed on this machine)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


UNREACHABLE = "unreachable"  # machine.state_changed state: the PLC has been unreachable (alarms.machine_unreachable_s)
REACHABLE = "reachable"  # ... and is back, for a machine without a state tag


@dataclass(slots=True)
class EventDraft:
    """An event before the store gives it a sequence number and an id. ``data`` is the typed data of ``type``
    (``mappings.events.DATA_TYPES``); a plain JSON-shaped dict is accepted too (encoded with json.dumps)."""

    type: str
    subject: str
    time: float
    data: EventData | dict[str, Any]
    droppable: bool = False  # low-value (state changes): may be dropped, counted, when the store is full
    parts: Decimal | None = None  # a quantity report's yield + scrap + rework, as counted (the status page's figure)


@dataclass(slots=True)
class _Evidence:
    first: int | None = None
    last: int | None = None
    rollovers: int = 0
    resets: int = 0
    glitches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.first, "to": self.last, "rollovers": self.rollovers, "resets": self.resets, "glitches": self.glitches}


@dataclass(slots=True)
class _Window:
    opened_at: float | None = None  # monotonic time the window got its first count; drives the periodic flush
    start: float | None = None  # source time of the first counted change
    end: float | None = None
    q: dict[str, Decimal] = field(default_factory=lambda: dict.fromkeys(QUANTITY_KINDS, ZERO))
    evidence: dict[str, _Evidence] = field(default_factory=dict)
    materials: dict[str, Decimal] = field(default_factory=dict)  # metered consumption in this window

    def empty(self) -> bool:
        return not any(self.q.values())  # a zero Decimal is false (0.15 µs against 0.8 for a generator of == 0)

    def blank(self) -> bool:
        """Nothing in it at all (no times, evidence or materials either): a snapshot leaves it out."""
        return self.start is None and self.end is None and not self.evidence and not self.materials and self.empty()

    def units(self) -> Decimal:
        return self.q["good"] + self.q["total"] + self.q["scrap"] + self.q["rework"]


class _Cell(CounterState):
    """A counter's state as the engine keeps it: the persisted ``CounterState`` plus what the fast path needs next
    to it (the spec's modulus and max_rate) and what it accumulates for the open window until the engine folds it
    in (``MachineEngine._fold``): the sum of plain increases, the value before the first and the last value. One
    object per counted sample instead of the window, its quantity and evidence dicts and their entries: a
    gateway's working set is larger than the CPU caches, and every object a sample touches is a likely miss."""

    __slots__ = ("signal", "spec", "binding", "material", "fast", "modulus", "max_rate", "acc", "first_prev", "last_u",
                 "pending")

    def __init__(self, state: CounterState | None = None, spec: CounterSpec | None = None) -> None:
        if state is None:
            super().__init__()
        else:
            super().__init__(last=state.last, last_time=state.last_time, last_wall=state.last_wall,
                             held_zero=state.held_zero, last_mono=state.last_mono, marked_wall=state.marked_wall,
                             resolution=state.resolution, newest=state.newest, held=state.held)
        # routing, set by MachineEngine._bind: signal name, spec, binding, material number (None: a counter), and
        # whether the fast path takes its samples
        self.signal = ""
        self.spec: CounterSpec | None = spec
        self.binding: CounterBinding | None = None
        self.material: str | None = None
        self.fast = False
        self.modulus: int | None = None if spec is None else spec.modulus
        self.max_rate = 0.0 if spec is None else spec.max_rate
        self.acc = 0
        self.first_prev: int | None = None
        self.last_u: int | None = None
        self.pending = False


_COMPLETE_FLAG = {None: "", True: ',"complete_flag":true', False: ',"complete_flag":false'}

_MASK64 = (1 << 64) - 1

# one encoder: json.dumps(x, separators=...) builds a new one per call
_encode = json.JSONEncoder(separators=(",", ":")).encode
_JSON_CONST = {None: "null", True: "true", False: "false"}


def _jnum(x: float | int | None) -> str:
    """A number (or None) as ``json.dumps`` writes it."""
    t = type(x)
    if t is float:
        return float.__repr__(x) if math.isfinite(x) else _encode(x)  # type: ignore[arg-type]
    if t is int:
        return int.__repr__(x)  # type: ignore[arg-type]
    if x is None or t is bool:
        return _JSON_CONST[x]
    return _encode(x)


_KEYS: dict[str, str] = {}  # JSON of the fixed keys of quantity dicts ("good", "yield", ...)
_STATE_JSON: dict[str, str] = {}  # ',"machine_state":' + JSON of machine states seen (a few configured names)
_TOTAL_KEYS = ("yield", "scrap", "rework")
_ZERO_Q: dict[str, Decimal] = dict.fromkeys(QUANTITY_KINDS, ZERO)  # a window's quantities before anything counted


def _jdecs(d: dict[str, Decimal]) -> str:
    """``{key: dec_str(value)}`` as JSON (dec_str gives ASCII digits, sign and point only: nothing to escape)."""
    if not d:
        return "{}"
    parts = []
    for k, v in d.items():
        kj = _KEYS.get(k)
        if kj is None:
            kj = _encode(k)
            if len(_KEYS) < 64:
                _KEYS[k] = kj
        parts.append(f'{kj}:"{"0" if not v else dec_str(v)}"')
    return "{" + ",".join(parts) + "}"


def _seed(machine: str) -> int:
    """A non-zero 64-bit seed from a machine id (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(machine.encode(), digest_size=8).digest(), "big") or 1


class MachineEngine:
    # every counted sample reads several of these: slots (no instance-dict probing; a fraction of the cache lines
    # touched per sample). "__dict__" keeps instances open to tests that replace a method on one engine.
    __slots__ = ("_json_ctx", "_json_keys", "_rearm", "_rng", "_signals", "_window_s", "anomalies", "completed",
                 "context", "counters", "dirty", "hold_reports", "machine_state", "order_totals", "spec", "totals",
                 "urgent", "_window", "yield_carry", "_pending", "_pend_start", "_pend_opened", "_pend_end",
                 "_totals_json", "__dict__")

    def __init__(self, spec: MachineSpec, snapshot: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.counters: dict[str, _Cell] = {name: _Cell() for name in spec.counters}
        self.counters.update({MATERIAL_PREFIX + m: _Cell() for m in spec.materials})
        self.context: OrderContext | None = None
        # cells with plain increases not yet in the window, in the order of their first one (see _fold), and the
        # window times those increases carry: the first one's time and opening time, the last one's time
        self._pending: list[_Cell] = []
        self._pend_start: float | None = None
        self._pend_opened: float | None = None
        self._pend_end: float | None = None
        self._window = _Window()
        # jitter draws: xorshift64 seeded with the machine id (random.Random would hold 2.5 KB of state per machine)
        self._rng = _seed(spec.id) if spec.interval_jitter > 0 else 0
        # length of the current window: the first after a start is spread over the whole interval (see MachineSpec)
        self._window_s = spec.interval_s if not self._rng else spec.interval_s * (1.0 - self._draw())
        self.totals: dict[str, Decimal] = {"yield": ZERO, "scrap": ZERO, "rework": ZERO}
        # the totals' snapshot text as the last report rendered it: (the totals dict, its three values, the text);
        # valid while that dict holds those very objects (Decimals are immutable)
        self._totals_json: tuple[Any, ...] = (None, None, None, None, "")
        self.yield_carry = ZERO
        self.machine_state: str | None = None
        self.completed: dict[tuple[str, str], None] = {}  # recently completed (order, operation), oldest first
        self.order_totals: dict[str, dict[str, str]] = {}  # totals of recently active order/operations
        # the PLC's completion flag as last seen (None: no flag, or not seen yet): persisted, so a flag that rose
        # while the gateway was stopped (or reloading) is a rising edge when it is seen again
        self.complete_flag: bool | None = None
        self.anomalies = 0
        self._json_keys: dict[str, str] = {}  # counter name -> its JSON string (snapshot_json)
        self._json_ctx: tuple[OrderContext | None, str] = (None, "")
        self.dirty = False
        # set while the store is full: periodic / unit windows stay open (quantities keep accumulating in the
        # persisted window) until space returns; changeover and completion still close them
        self.hold_reports = False
        self.urgent = False  # state that only exists here (reset-on-read deltas): commit without waiting
        self._rearm = False  # a restored window with counts waits for the first tick to be timed again
        if snapshot:
            self._restore(snapshot)
        # signal -> its cell (state and routing): one lookup per sample
        self._signals: dict[str, _Cell] = {}
        for name, b in spec.counters.items():
            self._bind(name, b, None)
        for m, mm in spec.materials.items():
            self._bind(MATERIAL_PREFIX + m, mm.binding, m)

    def _bind(self, signal: str, binding: CounterBinding, material: str | None) -> None:
        """Route ``signal`` to its cell. The fast path (counters.plain_increase, increases accumulated in the cell)
        takes a cumulative integer counter of a machine without ``max_units`` (that one looks at the window's units
        at every count)."""
        cell = self.counters[signal]
        cell.signal, cell.spec, cell.binding, cell.material = signal, binding.spec, binding, material
        cell.modulus, cell.max_rate = binding.spec.modulus, binding.spec.max_rate
        cell.fast = plain(binding.spec) and not self.spec.max_units
        self._signals[signal] = cell

    def cell(self, signal: str) -> _Cell | None:
        """The state cell of a counter or meter signal (None for any other signal): a route of ``apply_run``."""
        return self._signals.get(signal)

    @property
    def window(self) -> _Window:
        """The open reporting window, with every increase counted so far (the fast path's are folded in first)."""
        if self._pending:
            self._fold()
        return self._window

    @window.setter
    def window(self, w: _Window) -> None:
        if self._pending:
            self._fold()
        self._window = w

    def _fold(self) -> None:
        """Add the plain increases accumulated in the cells to the window, as ``_count`` would have one by one:
        evidence and materials created in the order of each signal's first increase, the quantities summed, the
        window's opening time and start from the first increase, its end from the last."""
        w = self._window
        for cell in self._pending:
            signal, binding, material = cell.signal, cell.binding, cell.material
            ev = w.evidence.get(signal)
            if ev is None:
                ev = w.evidence[signal] = _Evidence(first=cell.first_prev)
            ev.last = cell.last_u
            scale = binding.scale  # type: ignore[union-attr]
            q = cell.acc if scale == 1 else cell.acc * scale
            if material is None:
                w.q[signal] += q
            else:
                w.materials[material] = w.materials.get(material, ZERO) + q
            cell.acc = 0
            cell.pending = False
        self._pending = []
        if w.opened_at is None:
            w.opened_at = self._pend_opened
            self._rearm = False
        if w.start is None:
            w.start = self._pend_start
        w.end = self._pend_end

    def _draw(self) -> float:
        """Next number in [0, 1) of this machine's jitter sequence (xorshift64)."""
        x = self._rng
        x ^= (x << 13) & _MASK64
        x ^= x >> 7
        x ^= (x << 17) & _MASK64
        self._rng = x
        return x / 18446744073709551616.0

    def set_counter_spec(self, signal: str, counter: CounterSpec) -> bool:
        """Replace the spec of a counter / meter signal (its width found on the server at connect); the state is
        kept. Returns True when it changed."""
        cell = self._signals.get(signal)
        if cell is None or cell.spec == counter:
            return False
        if self._pending:
            self._fold()
        self._bind(signal, CounterBinding(counter, cell.binding.scale), cell.material)  # type: ignore[union-attr]
        return True

    # ------------------------------------------------------------------ persistence
    def snapshot_json(self) -> str:
        """``json.dumps(self.snapshot(), separators=(",", ":"))``, byte for byte, written directly: every event is
        committed with its machine's snapshot, and building the dicts and walking them took ~30 % of the event path's
        CPU in the gateway (tests/test_counting_property.py and tests/test_fuzz_inputs.py check the bytes)."""
        keys = self._json_keys
        counters = []
        memo_t: float | int | None = None
        memo_s = "null"
        for n, c in self.counters.items():
            k = keys.get(n)
            if k is None:
                k = keys[n] = _encode(n)
            lt, lw = c.last_time, c.last_wall
            # the counters of a machine are usually read together: one time, one repr (~0.4 µs each)
            if lt != memo_t or type(lt) is not type(memo_t):
                memo_t, memo_s = lt, _jnum(lt)
            # defaults are left out (CounterState.to_dict): a wall time equal to the time, no held value
            rest = "" if lw == lt and type(lw) is type(lt) else ',"last_wall":' + _jnum(lw)
            if c.held_zero:
                rest += ',"held_zero":true,"held":' + _jnum(c.held) if c.held else ',"held_zero":true'
            if c.resolution is not None:
                rest += ',"resolution":' + _encode(c.resolution)
            if c.newest is not None:
                rest += f',"newest":[{_jnum(c.newest[0])},{_jnum(c.newest[1])}]'
            counters.append(f'{k}:{{"last":{_jnum(c.last)},"last_time":{memo_s}{rest}}}')
        ctx = self.context
        if ctx is not self._json_ctx[0]:  # OrderContext is immutable: encoded once per dispatch
            self._json_ctx = (ctx, "" if ctx is None else ',"context":' + _encode(ctx.to_dict()))
        w = self.window
        start, end = w.start, w.end
        q = w.q
        if w.blank():
            window = ""  # a window just closed: left out (the default)
        else:
            starts = _jnum(start)
            if end == memo_t and type(end) is type(memo_t):  # the window ends with the last counted change
                ends = memo_s
            else:
                ends = starts if end == start and type(end) is type(start) else _jnum(end)
            evidence = ",".join(
                f'{_encode(n)}:{{"from":{_jnum(e.first)},"to":{_jnum(e.last)},"rollovers":{_jnum(e.rollovers)},'
                f'"resets":{_jnum(e.resets)},"glitches":{_jnum(e.glitches)}}}' for n, e in w.evidence.items())
            window = (f',"window":{{"start":{starts},"end":{ends},"q":{_jdecs(q)},"evidence":{{{evidence}}},'
                      f'"materials":{_jdecs(w.materials)}}}')
        state = self.machine_state
        if state is None:
            tail = ""
        elif type(state) is str:
            tail = _STATE_JSON.get(state)  # type: ignore[assignment]
            if tail is None:
                tail = ',"machine_state":' + _encode(state)
                if len(_STATE_JSON) < 256:
                    _STATE_JSON[state] = tail
        else:  # a number (not cached: 1 and True are one key of a dict)
            tail = ',"machine_state":' + _encode(state)
        if self.yield_carry:
            tail = f',"yield_carry":"{dec_str(self.yield_carry)}"' + tail
        if self.completed:
            tail += ',"completed":' + _encode([list(ref) for ref in self.completed])
        if self.order_totals:
            tail += ',"order_totals":' + _encode(self.order_totals)
        return (f'{{"v":1,"counters":{{{",".join(counters)}}}{self._json_ctx[1]}{window},'
                f'"totals":{self._totals_text()}{tail}{_COMPLETE_FLAG[self.complete_flag]}}}')

    def _totals_text(self) -> str:
        """``_jdecs(self.totals)``, from the last report's rendering when the totals are still the ones it saw."""
        t = self.totals
        d, y, sc, rw, text = self._totals_json
        if t is d and t.get("yield") is y and t.get("scrap") is sc and t.get("rework") is rw:
            return text
        return _jdecs(t)

    def snapshot(self) -> dict[str, Any]:
        """The engine's persisted state. What equals its default is left out (``_restore`` restores it): an empty
        window, no order context, no yield carry, no machine state, no completions or order totals; a report's
        snapshot of three counters is ~200 bytes instead of ~540 (one is committed with every report)."""
        w = self.window
        snap: dict[str, Any] = {"v": 1, "counters": {n: s.to_dict() for n, s in self.counters.items()}}
        if self.context is not None:
            snap["context"] = self.context.to_dict()
        if not w.blank():
            snap["window"] = {  # opened_at is monotonic time: meaningless in another process, not persisted
                "start": w.start,
                "end": w.end,
                "q": {k: dec_str(v) for k, v in w.q.items()},
                "evidence": {n: e.to_dict() for n, e in w.evidence.items()},
                "materials": {m: dec_str(v) for m, v in w.materials.items()},
            }
        snap["totals"] = {k: dec_str(v) for k, v in self.totals.items()}
        if self.yield_carry:
            snap["yield_carry"] = dec_str(self.yield_carry)
        if self.machine_state is not None:
            snap["machine_state"] = self.machine_state
        if self.completed:
            snap["completed"] = [list(ref) for ref in self.completed]
        if self.order_totals:
            snap["order_totals"] = self.order_totals
        if self.complete_flag is not None:
            snap["complete_flag"] = self.complete_flag
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        for name, d in snap.get("counters", {}).items():
            if name in self.counters:  # a counter removed from the config is forgotten
                self.counters[name] = _Cell(CounterState.from_dict(d))
        if snap.get("context"):
            self.context = OrderContext.from_dict(snap["context"])
        w = snap.get("window") or {}
        self.window = _Window(
            opened_at=None,  # re-armed by the first tick (the old process's clock means nothing here)
            start=w.get("start"),
            end=w.get("end"),
            q={k: Decimal(w.get("q", {}).get(k, "0")) for k in QUANTITY_KINDS},
            evidence={
                n: _Evidence(e["from"], e["to"], e["rollovers"], e["resets"], e.get("glitches", 0))
                for n, e in w.get("evidence", {}).items()
            },
            materials={m: Decimal(v) for m, v in w.get("materials", {}).items()},
        )
        self.totals = {k: Decimal(v) for k, v in snap.get("totals", {}).items()} or self.totals
        self.yield_carry = Decimal(snap.get("yield_carry", "0"))
        state = snap.get("machine_state")
        # a state persisted before texts were cleaned (plc_text) would be the next event's `previous`
        self.machine_state = plc_text(state) if isinstance(state, str) else state
        self.order_totals = dict(snap.get("order_totals", {}))
        flag = snap.get("complete_flag")
        self.complete_flag = flag if isinstance(flag, bool) else None
        refs = snap.get("completed")
        if refs is None:  # older snapshots remembered the last completion only
            refs = [snap["last_completed"]] if snap.get("last_completed") else []
        self.completed = {(r[0], r[1]): None for r in refs}
        self._rearm = not self.window.empty() or any(self.window.materials.values())

    # ------------------------------------------------------------------ inputs
    def apply(self, sample: Sample, signal: str) -> list[EventDraft]:
        """Apply one sample of ``signal`` (counter name, ``material:<number>`` or 'state').

        An unchanged counter value (and a bad, stale, duplicate or invalid sample) changes no persisted state: it
        does not mark the engine dirty (an unchanged value does, once per ``counters.IDLE_PERSIST_S``)."""
        cell = self._signals.get(signal)
        if cell is None:
            return self._apply_state(sample) if signal == "state" else []
        if cell.fast:  # the common case first: a plausible increase of a cumulative counter (not urgent)
            delta = plain_increase(cell, sample, cell.modulus, cell.max_rate)
            if delta:
                t = sample.source_time
                if t is None:
                    t = sample.recv_time
                if not cell.pending:
                    cell.pending = True
                    cell.first_prev = cell.last - delta  # type: ignore[operator]
                    if not self._pending:
                        self._pend_start = t
                        self._pend_opened = sample.mono if sample.mono is not None else sample.recv_time
                    self._pending.append(cell)
                cell.acc += delta
                cell.last_u = cell.last
                self._pend_end = t
                self.dirty = True
                return []
        if self._pending:  # anything else sees (and counts after) the increases before it
            self._fold()
        res = step(cell.spec, cell, sample)  # type: ignore[arg-type]
        outcome = res.outcome
        if outcome in QUIET:
            return []
        if outcome == "seen":  # an unchanged reading whose times are due to be persisted (once a minute)
            self.dirty = True
            return []
        binding, material = cell.binding, cell.material
        self.dirty = True
        if outcome != "increase" or binding.spec.mode != "cumulative":
            # state the counter cannot give back after a crash: a reset-on-read or delta value (the device forgot
            # it when it was read), a rollover, reset, glitch or held zero seen: persist it now, not at the next
            # checkpoint (plain increases are re-derived from the counter)
            self.urgent = True
        out: list[EventDraft] = []
        scale = binding.scale
        if outcome == "jump":  # an implausible increase, confirmed by the reading after it: the counter was set
            self.anomalies += 1
            res_step = binding.spec.resolution
            if res_step is None:
                prev_v, value_v, jump, rate = res.previous, res.possible, str(res.held), binding.spec.max_rate
            else:  # a float meter counts resolution steps: report its readings and rate in the meter's unit
                prev_v = None if res.previous is None else dec_str(res.previous * res_step)
                value_v = dec_str(res.possible * res_step)
                jump, rate = dec_str(res.held * res_step), f"{binding.spec.max_rate * float(res_step):g}"
            out.append(self._anomaly(signal, "implausible_jump", prev_v, value_v, sample.time,  # type: ignore[arg-type]
                                     held=dec_str(res.held * scale), counted=dec_str(res.delta * scale),
                                     possible_rollover=None, elapsed_s=_secs(res.elapsed),
                                     detail=f"increase of {jump} exceeds max_rate {rate}/s for the elapsed time and "
                                            f"the next reading confirmed it (the counter was set there): not "
                                            f"counted, baseline moved"))
        if outcome == "preset":
            self.anomalies += 1
            res_step = binding.spec.resolution
            f, to = res.previous, res.possible
            if res_step is not None:  # a float meter counts resolution steps: its readings in the meter's unit
                f = None if f is None else dec_str(f * res_step)  # type: ignore[assignment]
                to = dec_str(to * res_step)  # type: ignore[assignment]
            out.append(self._anomaly(signal, "implausible_jump", f, to, sample.time,  # type: ignore[arg-type]
                                     held="0", counted=dec_str(res.delta * scale), possible_rollover=None,
                                     elapsed_s=_secs(res.elapsed),
                                     detail=f"decrease from {f} to {to} is no reset (more than max_rate "
                                            f"{binding.spec.max_rate}/s can make in the elapsed time) and the next "
                                            f"reading confirmed it: the counter was set there (a preset, a retained "
                                            f"value restored); not counted, baseline moved"))
        if outcome == "ambiguous":
            self.anomalies += 1
            gap = "an unknown time" if res.elapsed is None else f"{res.elapsed:.1f} s"
            out.append(self._anomaly(signal, "ambiguous_decrease", res.previous, res.value, sample.time,
                                     held=dec_str((res.possible - res.delta) * scale),
                                     counted=dec_str(res.delta * scale),
                                     possible_rollover=dec_str(res.possible * scale), elapsed_s=_secs(res.elapsed),
                                     detail=f"decrease from {res.previous} to {res.value} after {gap}, longer than "
                                            f"one wrap period at max_rate {binding.spec.max_rate}/s: counted as a "
                                            f"reset ({res.delta}); had it been a rollover it would be {res.possible}"))
        if res.delta:
            out.extend(self._count(signal, binding, material, res.delta, res.previous, res.value, outcome, sample))
        return out

    def _count(self, signal: str, binding: CounterBinding, material: str | None, delta: int, previous: int | None,
               value: int | None, outcome: str, sample: Sample) -> list[EventDraft]:
        """Add a counted change to the open window (and its evidence); a window at max_units is flushed."""
        w = self.window
        ev = w.evidence.get(signal)
        if ev is None:
            ev = w.evidence[signal] = _Evidence(first=previous)
        ev.last = value
        if outcome != "increase":
            if outcome == "rollover":
                ev.rollovers += 1
            elif outcome == "reset" or outcome == "ambiguous" or outcome == "preset" or outcome == "jump":
                ev.resets += 1
            elif outcome == "glitch":
                ev.glitches += 1
        scale = binding.scale
        q = delta if scale == 1 else delta * scale
        if material is None:
            w.q[signal] += q
        else:
            w.materials[material] = w.materials.get(material, ZERO) + q
        t = sample.source_time
        if t is None:
            t = sample.recv_time
        if w.opened_at is None:
            w.opened_at = sample.mono if sample.mono is not None else sample.recv_time
            self._rearm = False
        if w.start is None:
            w.start = t
        w.end = t
        if self.spec.max_units and w.units() >= self.spec.max_units and not self.hold_reports:
            return self.flush("units", sample.recv_time)
        return []

    def _apply_state(self, sample: Sample) -> list[EventDraft]:
        if not sample.good or sample.value is None or self.spec.state_values is None:
            return []
        value = sample.value
        if type(value) is str:  # a PLC string: up to its NUL padding, no control character (an event's text)
            value = plc_text(value)
        raw = str(value)
        new = self.spec.state_values.get(raw, raw) if self.spec.state_values else raw
        if new == self.machine_state:
            return []
        prev, self.machine_state = self.machine_state, new
        self.dirty = True
        return [EventDraft("machine.state_changed", self.spec.id, sample.time,
                           MachineStateChangedData(machine=self.spec.id, state=new, previous=prev, raw=value,
                                                   reason="tag"), droppable=True)]

    def set_reachable(self, reachable: bool, t: float) -> list[EventDraft]:
        """The gateway lost (``reachable=False``) or regained the machine's PLC: ``t`` is the wall-clock time of the
        change. Lost: state ``unreachable`` (the ERP knows the figures are stale). Regained: a machine with a state tag
        reports its state again from the tag's next sample (the state stays ``unreachable`` until then, so that sample
        is a change); one without a state tag reports ``reachable``. Not droppable: one event per outage edge."""
        if not reachable and self.machine_state != UNREACHABLE:
            new = UNREACHABLE
        elif reachable and self.machine_state == UNREACHABLE and self.spec.state_values is None:
            new = REACHABLE
        else:
            return []
        prev, self.machine_state = self.machine_state, new
        self.dirty = self.urgent = True
        return [EventDraft("machine.state_changed", self.spec.id, t,
                           MachineStateChangedData(machine=self.spec.id, state=new, previous=prev, raw=None,
                                                   reason="connection"))]

    def tick(self, now: float) -> list[EventDraft]:
        """Periodic flush; ``now`` is the gateway's MONOTONIC clock (``time.monotonic()``), the clock of
        ``Sample.mono``. Closes the window ``interval_s`` (less the jitter drawn for it) after its first count. A
        window restored from a snapshot is re-armed by the first tick (``now`` becomes its opening time). Nothing to
        do before ``next_deadline()``."""
        if self.hold_reports:
            return []
        opened = self._opened_at()  # without folding the fast path's increases in: most ticks find nothing due
        if opened is None:
            if self._rearm:
                self._window.opened_at = now
                self._rearm = False
            return []
        if now >= opened + self._window_s:  # the expression of next_deadline(): tick(next_deadline()) flushes
            w = self._window
            if self._pending and w.opened_at is None and w.start is None and not w.evidence and not w.materials \
                    and not any(w.q.values()):
                out = self._flush_pending("periodic")
                if out is not None:
                    return out
            w = self.window
            return self.flush("periodic", w.end if w.end is not None else now)
        return []

    def _opened_at(self) -> float | None:
        """The window's opening time, as it is once the pending increases are folded in (see _fold)."""
        opened = self._window.opened_at
        if opened is None and self._pending:
            return self._pend_opened
        return opened

    def keep_window_time(self, old: MachineEngine) -> None:
        """This engine was rebuilt from ``old.snapshot()`` in the same process (a config reload): its open window
        keeps the opening time it had (a snapshot has none: a monotonic time means nothing to another process), so
        the reload does not put off its report by up to ``interval_s``."""
        opened = old._opened_at()
        if self._rearm and opened is not None:
            self._window.opened_at = opened
            self._rearm = False

    def next_deadline(self) -> float | None:
        """Monotonic time at which ``tick`` will next do something: the open window's flush time, ``-inf`` when a
        restored window waits to be re-armed (tick it once), None when no window is open or reports are held
        (``hold_reports``; ask again after changing it). Changes only through ``apply`` / ``dispatch`` / ``tick`` /
        ``flush``: a caller keeping a heap re-reads it after calling one of them."""
        if self.hold_reports:
            return None
        opened = self._opened_at()
        if opened is None:
            return -math.inf if self._rearm else None
        return opened + self._window_s

    MAX_REMEMBERED_COMPLETED = 64

    def refusal(self, ctx: OrderContext | None) -> OrderRefused | None:
        """Why ``dispatch(ctx)`` would be refused, or None. Lets a caller skip the cut read for a refused order."""
        if ctx is None or ctx.status == "completed" or ctx.ref not in self.completed:
            return None
        cur = self.context
        if cur is not None and cur.ref == ctx.ref:
            return None
        return OrderRefused("completed", f"order {ctx.order} operation {ctx.operation} was completed on machine "
                                         f"{self.spec.id}; a completed operation is not reopened")

    def unchanged_by(self, ctx: OrderContext | None) -> bool:
        """True when ``dispatch(ctx)`` would change nothing: the order in force again (a retained dispatch seen again
        after a reconnect or a resync), or the completion of an operation not running here (already completed)."""
        cur = self.context
        if ctx is not None and ctx.status == "completed" and (cur is None or cur.ref != ctx.ref):
            return not self.ran_here(ctx)  # an operation that ran here earlier is completed with its totals
        if ctx is None or cur is None:
            return ctx is cur
        return cur == ctx

    def ran_here(self, ctx: OrderContext) -> bool:
        """The operation ran on this machine earlier (its totals are remembered) and is not completed yet."""
        return ctx.ref not in self.completed and self._totals_key(ctx) in self.order_totals

    def dispatch(self, ctx: OrderContext | None, now: float) -> list[EventDraft]:
        """A new production-order context for this machine (None = no order). The caller must have applied a
        fresh read of all counters first (the cut): counts up to here belong to the current context. ``now`` is
        wall-clock time (the time of operation.started / operation.completed).

        Raises ``OrderRefused`` (nothing changed) for an ``active`` dispatch of an order/operation completed here
        (a retained dispatch seen again after a restart or reconnect must not bring it back to life)."""
        refused = self.refusal(ctx)
        if refused is not None:
            raise refused
        cur = self.context
        if ctx is not None and ctx.status == "completed":
            if cur is not None and cur.ref == ctx.ref:
                return self._complete(now)
            if self.ran_here(ctx):
                return self._complete_earlier(ctx, now)
            return []  # already completed, or never ran here: nothing was counted for it
        if cur is not None and ctx is not None and cur.ref == ctx.ref:
            out = []
            if cur != ctx:
                if (cur.unit, cur.components) != (ctx.unit, ctx.components):
                    # what was counted so far is reported in the unit it was made in, backflushed with the components
                    # it was made with: the window closes first (reason changeover)
                    out = self.flush("changeover", now)
                self.context = ctx  # e.g. a planned quantity updated: no report
                self.dirty = True
            return out
        if cur is None and ctx is None:
            return []
        out = self.flush("changeover", now)
        self._switch_totals(ctx)
        self.context = ctx
        self.dirty = True
        if ctx is not None:
            out.append(EventDraft("operation.started", self.spec.id, now, OperationStartedData(
                machine=self.spec.id, order=ctx.order, operation=ctx.operation,
                planned_quantity=None if ctx.planned_quantity is None else dec_str(ctx.planned_quantity),
                unit=ctx.unit or self.spec.unit,
            )))
        return out

    MAX_REMEMBERED_ORDERS = 32

    def _switch_totals(self, new: OrderContext | None) -> None:
        """Totals are per order/operation: an operation that comes back (A -> B -> A) continues its own totals."""
        old_key = self._totals_key(self.context)
        self.order_totals.pop(old_key, None)
        self.order_totals[old_key] = {k: dec_str(v) for k, v in self.totals.items()}
        while len(self.order_totals) > self.MAX_REMEMBERED_ORDERS:
            self.order_totals.pop(next(iter(self.order_totals)))
        saved = self.order_totals.get(self._totals_key(new))
        self.totals = {k: Decimal(saved[k]) for k in ("yield", "scrap", "rework")} if saved else \
            {"yield": ZERO, "scrap": ZERO, "rework": ZERO}

    @staticmethod
    def _totals_key(ctx: OrderContext | None) -> str:
        return "" if ctx is None else f"{ctx.order}\x1f{ctx.operation}"

    def _complete_earlier(self, ctx: OrderContext, now: float) -> list[EventDraft]:
        """The completion of an operation that ran here before the current one (the ERP completes A after it
        dispatched B): final, with the totals remembered for it; the current operation goes on."""
        key = self._totals_key(ctx)
        saved = self.order_totals.pop(key)
        self.completed.pop(ctx.ref, None)
        self.completed[ctx.ref] = None
        while len(self.completed) > self.MAX_REMEMBERED_COMPLETED:
            self.completed.pop(next(iter(self.completed)))
        self.dirty = True
        return [EventDraft("operation.completed", self.spec.id, now, OperationCompletedData(
            machine=self.spec.id, order=ctx.order, operation=ctx.operation, final=True,
            totals=Totals(yield_=saved.get("yield", "0"), scrap=saved.get("scrap", "0"),
                          rework=saved.get("rework", "0")),
            unit=ctx.unit or self.spec.unit,
        ))]

    def _complete(self, now: float) -> list[EventDraft]:
        cur = self.context
        assert cur is not None
        out = self.flush("completion", now)
        out.append(EventDraft("operation.completed", self.spec.id, now, OperationCompletedData(
            machine=self.spec.id, order=cur.order, operation=cur.operation, final=True,
            totals=self._totals_data(), unit=cur.unit or self.spec.unit,
        )))
        self.completed.pop(cur.ref, None)
        self.completed[cur.ref] = None
        while len(self.completed) > self.MAX_REMEMBERED_COMPLETED:
            self.completed.pop(next(iter(self.completed)))
        self.order_totals.pop(self._totals_key(cur), None)  # final: a later restart of the operation starts at 0
        self.totals = {"yield": ZERO, "scrap": ZERO, "rework": ZERO}
        self._switch_totals(None)
        self.context = None
        self.dirty = True
        return out

    # ------------------------------------------------------------------ reporting
    def flush(self, reason: str, now: float) -> list[EventDraft]:
        """Close the reporting window: one quantity report (plus backflushed consumption) if anything was counted,
        and one metered consumption report if a material meter moved."""
        w = self.window
        metered = [(m, q) for m, q in w.materials.items() if q] if w.materials else None
        self.window = _Window()
        if self._rng:
            self._window_s = self.spec.interval_s * (1.0 - self.spec.interval_jitter * self._draw())
        empty = w.empty()
        if empty and not metered:
            return []
        self.dirty = True
        ctx = self.context
        unit = (ctx.unit if ctx and ctx.unit else None) or self.spec.unit
        t = w.end if w.end is not None else now
        out = self._quantity_report(
            w.q, w.start, w.end, tuple([(n, e.first, e.last, e.rollovers, e.resets, e.glitches)
                                        for n, e in w.evidence.items() if not n.startswith(MATERIAL_PREFIX)]),
            reason, ctx, unit, t) if not empty else []
        if metered:
            out.append(EventDraft("material.consumed", self.spec.id, t, MaterialConsumedData(
                machine=self.spec.id, order=ctx.order if ctx else None,
                operation=ctx.operation if ctx else None, unassigned=ctx is None, method="metered",
                basis=None, movement_type="261",
                components=[ConsumedComponent(material=m, quantity=dec_str(q), unit=self.spec.materials[m].unit)
                            for m, q in metered],
            )))
        return out

    def _flush_pending(self, reason: str) -> list[EventDraft] | None:
        """``flush(reason, now)`` of a window that holds nothing but the fast path's pending increases (nothing
        folded in, counted by the slow path or metered yet: the common periodic report): the same report, engine
        state and jitter draw, without building the window's evidence and quantity objects first (``_fold``) and a
        new window after (the window stays empty). None, having changed nothing: a pending cell this does not take
        (a material meter), use ``flush``. tests/test_counter_fast_path.py checks it against ``flush``."""
        pending = self._pending
        q = dict(_ZERO_Q)
        evidence = []
        for cell in pending:
            if cell.material is not None:
                return None
            scale = cell.binding.scale  # type: ignore[union-attr]
            acc = cell.acc
            q[cell.signal] = acc if scale == 1 else acc * scale  # an int until rendered (dec_str), when unscaled
            evidence.append((cell.signal, cell.first_prev, cell.last_u, 0, 0, 0))
        for cell in pending:
            cell.acc = 0
            cell.pending = False
        self._pending = []
        self._rearm = False
        if self._rng:
            self._window_s = self.spec.interval_s * (1.0 - self.spec.interval_jitter * self._draw())
        if not any(q.values()):
            return []
        self.dirty = True
        ctx = self.context
        unit = (ctx.unit if ctx and ctx.unit else None) or self.spec.unit
        start, end = self._pend_start, self._pend_end
        return self._quantity_report(q, start, end, tuple(evidence), reason, ctx, unit, end)  # type: ignore[arg-type]

    def _quantity_report(self, q: dict[str, Decimal], start: float | None, end: float | None,
                         evidence: tuple[tuple[Any, ...], ...], reason: str, ctx: OrderContext | None, unit: str,
                         t: float) -> list[EventDraft]:
        """The window's report (plus backflushed consumption): ``q`` its quantities, ``start`` / ``end`` its times,
        ``evidence`` its counters' (name, from, to, rollovers, resets, glitches), material meters left out."""
        if "good" in self.spec.counters:
            yld = q["good"]
        else:
            yld = q["total"] - q["scrap"] - q["rework"] + self.yield_carry
            if yld < 0:
                self.yield_carry, yld = yld, ZERO
            else:
                self.yield_carry = ZERO
        scrap, rework = q["scrap"], q["rework"]
        if not (yld or scrap or rework):  # e.g. the total only caught up with scrap reported earlier
            return []
        self.totals["yield"] += yld
        self.totals["scrap"] += scrap
        self.totals["rework"] += rework
        tot = self.totals
        ty, ts, tr = tot["yield"], tot["scrap"], tot["rework"]
        tys, tss, trs = dec_str(ty), dec_str(ts), dec_str(tr)
        if tuple(tot) == _TOTAL_KEYS:  # the snapshot's text of these totals (_jdecs), for the commit that follows
            self._totals_json = (tot, ty, ts, tr, f'{{"yield":"{tys}","scrap":"{tss}","rework":"{trs}"}}')
        # the typed parts are built only if a field is read (QuantityReport): the encoder renders the values
        data = QuantityReport((
            self.spec.id, ctx.order if ctx else None, ctx.operation if ctx else None, ctx is None, reason,
            rfc3339_memo(start), rfc3339_memo(end), dec_str(yld), dec_str(scrap), dec_str(rework), unit,
            tys, tss, trs, evidence,
        ))
        out = [EventDraft("operation.quantity_reported", self.spec.id, t, data, parts=yld + scrap + rework)]
        if ctx and ctx.components and (yld or scrap):
            consumed = yld + scrap
            out.append(EventDraft("material.consumed", self.spec.id, t, MaterialConsumedData(
                machine=self.spec.id, order=ctx.order, operation=ctx.operation, unassigned=False,
                method="backflush",
                basis=ConsumptionBasis(yield_=dec_str(yld), scrap=dec_str(scrap), unit=unit),
                movement_type="261",
                components=[
                    ConsumedComponent(material=c.material, quantity=dec_str(consumed * c.quantity_per_unit),
                                      unit=c.unit)
                    for c in ctx.components
                ],
            )))
        return out

    def _totals_data(self) -> Totals:
        t = self.totals
        return Totals(yield_=dec_str(t["yield"]), scrap=dec_str(t["scrap"]), rework=dec_str(t["rework"]))

    def _anomaly(self, counter: str, kind: str, prev: int | str | None, value: int | str | None, t: float, *, held: str,
                 counted: str, possible_rollover: str | None, elapsed_s: float | None, detail: str) -> EventDraft:
        ctx = self.context
        return EventDraft("counter.anomaly", self.spec.id, t, CounterAnomalyData(
            machine=self.spec.id, counter=counter, kind=kind, from_=prev, to=value,  # type: ignore[arg-type]
            order=ctx.order if ctx else None, operation=ctx.operation if ctx else None,
            held=held, counted=counted, possible_rollover=possible_rollover, elapsed_s=elapsed_s, detail=detail,
        ))


def _secs(elapsed: float | None) -> float | None:
    return None if elapsed is None else round(elapsed, 3)


RunRoute = tuple[MachineEngine, "_Cell | None"] | None
"""Where one key of a run goes: its machine's engine and the key's counter cell (None: another signal, applied as a
``Sample`` by the caller), or None: the key is not routed (ignored)."""


def apply_run(routes: Sequence[RunRoute], values: Sequence[int | None], recv: float, mono: float,
              slow: Callable[[int], None]) -> list[MachineEngine]:
    """Apply a run of readings (``mappings.samples.Readings``: good integer values read together at ``recv`` / the
    monotonic ``mono``, no source time) without a ``Sample`` per value: ``values[i]`` to ``routes[i]`` (a value of
    None is no reading). A plain increase of a counter on the fast path (``MachineEngine.apply``'s first branch,
    with ``counters.plain_increase`` written out for a sample of that shape) is counted here; any other value is
    handed to ``slow(i)`` at its place in the run (the caller applies it as a ``Sample``), so each machine sees its
    readings in the order given. Returns, in order, each engine this run made dirty (it was not) and each engine
    whose window it opened (again after a window the slow path closed in the same run): the caller adds them to its
    dirty set and its timer heap. An engine already dirty with a
    window open is not returned (the caller has it in both: ``MachineEngine.dirty`` set means the core's dirty set
    holds the machine, and a window open since the last report was scheduled when it opened), so a poll's cost for
    the machines between two reports stays in this loop.

    tests/test_counter_fast_path.py checks this against ``MachineEngine.apply`` sample by sample."""
    touched: list[MachineEngine] = []
    i = -1
    for route, v in zip(routes, values):
        i += 1
        if v is None or route is None:
            continue
        eng, cell = route
        if cell is not None and cell.fast and type(v) is int:
            prev = cell.last
            lm = cell.last_mono
            if prev is not None and lm is not None and mono >= lm and not cell.held_zero and cell.resolution is None:
                mod = cell.modulus
                u = v if mod is None else v % mod
                delta = u - prev
                if delta > 0 and delta <= cell.max_rate * (mono - lm + JUMP_TOLERANCE_S):
                    cell.last = cell.last_u = u
                    cell.last_time = cell.last_wall = cell.marked_wall = recv
                    cell.last_mono = mono
                    if not cell.pending:
                        cell.pending = True
                        cell.first_prev = prev
                        if not eng._pending:
                            eng._pend_start = recv
                            eng._pend_opened = mono
                            if eng.dirty:
                                touched.append(eng)  # a window opened (a newly dirty engine is appended below)
                        eng._pending.append(cell)
                    cell.acc += delta
                    eng._pend_end = recv
                    if not eng.dirty:
                        eng.dirty = True
                        touched.append(eng)
                    continue
        slow(i)
    return touched
