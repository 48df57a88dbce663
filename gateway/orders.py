"""Order sources: where a machine's production-order context comes from, as commands for the core.

Four sources, one per machine (``order_source``), plus the optional PLC completion flag. Each is a small plugin
that turns its input into :class:`OrderCommand` / :class:`CompleteCommand` values for the core (gateway/core.py),
which applies them; none of them touches machine state.

- ``mqtt``  – :class:`MqttDispatchSource`: the ERP's retained dispatch on ``.../{machine}/dispatch`` (parsed in
  gateway/dispatch.py). A dispatch that is refused (malformed, unknown machine, another order source, an operation
  already completed) is answered on ``.../{machine}/dispatch/rejected`` with the reason, so the ERP can see it;
- ``local`` – :class:`LocalOrderSource`: the local order command (CLI → HTTP API), answered synchronously;
- ``tag``   – :class:`PlcTagOrders`: the PLC's order and operation tags, read by a connector like any other tag
  (a tag whose text holds a control character changes nothing, like an unreadable one, and is logged);
- ``complete_tag`` – the PLC's "operation complete" flag (rising edge), with any of the above (also
  :class:`PlcTagOrders`).

Dispatches from MQTT or the local command need a *cut* (a fresh read of the machine's counters, so counts up to the
change go to the old order); the core asks the connectors for it and applies the command when the read comes back
(two-phase, so a slow PLC delays only its own machine). Changes seen in the PLC's own tags need no extra read: the
scan that shows the new order *is* the cut. That takes every counter value up to the change: a connector that merged
the last value before it into a later one would carry the parts made before the change into the next order, so the
counters of such a machine are bound with ``cut_by_tags`` (OPC UA: a queue deep enough for a late publish).

The tag tracker below is pure (no I/O, no clock): it is handed samples in time order and says when to switch.
Rule at the sample boundary: counter samples and a completion flag seen in the same scan as the order-tag change
(same sample time) belong to the *old* order — a PLC finishes the part and the operation, then shows the next
order —, and the switch happens before the first sample of the machine with a later time (or when the settle time
has passed, for a machine that makes nothing after the change). Order and operation tags that change in the same
scan are applied together as one changeover; so are two that change a scan or a poll apart: while only one of them
has changed, the machine's samples after the change are held (``HOLD``), up to ``ORDER_PAIR_WINDOW_S`` of sample time,
then applied after the switch (no phantom operation of the new order with the old operation number).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.dispatch import MAX_DISPATCH_BYTES, DispatchRejected, parse_dispatch
from mappings.events import ORDER_TEXT_PATTERN, rfc3339
from mappings.machine import OrderContext, OrderRefused
from mappings.samples import Sample

log = structlog.get_logger(__name__)

ORDER_TAG_SETTLE_S = 0.2  # a pending PLC-tag order switch of a machine that makes nothing is applied after this
# sample time: after one tag of the pair (order, operation) changed, the other may still follow, a scan or a poll later
# (a PLC that writes them one after the other); the machine's samples meanwhile wait, so the switch takes both tags
ORDER_PAIR_WINDOW_S = 2.0
HOLD = "hold"  # PlcTagOrders.before_sample: keep this sample until the order pair is known


@dataclass(frozen=True, slots=True)
class OrderCommand:
    """Set (or clear, ``context=None``) the machine's order context; ``source`` says who asked."""

    machine: str
    context: OrderContext | None
    source: str = "mqtt"  # mqtt | local | tag | complete_tag
    needs_cut: bool = True


@dataclass(frozen=True, slots=True)
class CompleteCommand:
    """Complete the operation active on the machine when the core applies it (the PLC's completion flag)."""

    machine: str
    source: str = "complete_tag"


_ORDER_TEXT = re.compile(ORDER_TEXT_PATTERN)  # fullmatch: no control character (C0, DEL, C1); empty = no order


def _cut(value: object) -> str:
    """An order or operation tag's text up to its first NUL (a PLC string's padding, as a C string ends; PostgreSQL
    and JSON consumers refuse the character)."""
    return "" if value is None else str(value).split("\0", 1)[0]


def _tag_text(value: object) -> str | None:
    """An order or operation tag's text (``_cut``) without surrounding blanks; None when it holds a control character
    (C0, DEL or C1, anywhere: ``str.strip`` would take some of them for blanks): no ERP order or operation number has
    one (the event contract's ORDER_TEXT_PATTERN), so such a tag is handled like an unreadable one."""
    text = _cut(value)
    return text.strip() if _ORDER_TEXT.fullmatch(text) else None


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no")
    return bool(value)


class TagOrderTracker:
    """Order/operation tags and the completion flag of one machine."""

    __slots__ = ("changed", "complete_level", "complete_time", "held", "machine", "pending_since", "refused",
                 "values")

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.values: dict[str, str] = {}
        self.pending_since: float | None = None  # sample time of an order-tag change not yet applied
        self.complete_level: bool | None = None
        self.complete_time: float | None = None  # source time of the flag's last value (late deliveries are skipped)
        self.changed: set[str] = set()  # the tags of the pair that changed since pending_since
        self.held: list[Sample] = []  # the machine's samples after pending_since, while the pair is not known
        self.refused: dict[str, str] = {}  # signal -> the unusable text it shows (logged once, until a usable one)

    def paired(self) -> bool:
        """Both tags of the pending change are known: both changed, or the order was cleared (no order: the operation
        does not matter). Else the other one may still follow (see ORDER_PAIR_WINDOW_S)."""
        return len(self.changed) == 2 or not self.values.get("order")

    def changes_again(self, signal: str, s: Sample) -> bool:
        """This tag changes again while it is the only one of a pending change: the other did not follow, and the
        earlier change stands alone (to be applied before this one)."""
        if self.pending_since is None or signal not in self.changed or self.paired() or not s.good:
            return False
        value = _tag_text(s.value)
        return value is not None and self.values.get(signal) != value

    def order_tag(self, signal: str, s: Sample) -> bool:
        """An order or operation tag sample; True when it changed the tag values (a switch is now pending)."""
        if not s.good:
            return False  # an unreadable order tag changes nothing
        value = _tag_text(s.value)
        if value is None:  # a text with a control character is no ERP order (or operation) number
            text = _cut(s.value)
            if self.refused.get(signal) == text:
                return False
            self.refused[signal] = text
            log.warning("order_tag.refused", machine=self.machine, signal=signal, value=repr(text)[:120],
                        reason="control character in the tag's text: not an order number; the machine's counts are "
                               "reported unassigned until both tags show a usable order and operation")
            # unlike an unreadable tag (a failed read: the PLC still runs what it ran), a good read of a new text
            # says the tag no longer shows the order the counts were booked to, and which one it shows is not
            # known: a change, taken as unassigned (take_switch)
            if self.pending_since is None:
                self.pending_since = s.time
                self.changed.clear()
            self.changed.add(signal)
            return True
        self.refused.pop(signal, None)
        if self.values.get(signal) == value:
            return False
        self.values[signal] = value
        if self.pending_since is None:
            self.pending_since = s.time
            self.changed.clear()
        self.changed.add(signal)
        return True

    def due(self, t: float) -> bool:
        """A sample of this machine with time ``t`` is next: must the pending switch be applied first?"""
        return self.pending_since is not None and t > self.pending_since

    def take_switch(self) -> OrderContext | None | bool:
        """The context to switch to, or False when nothing is pending or the pair is half written."""
        if self.pending_since is None:
            return False
        if self.refused:
            # a tag of the pair shows an unusable text: which order the machine now runs is not known. Its counts go
            # unassigned, never to the old order nor to a pair made of one tag's old and the other's new value; the
            # refused tag's next usable text is a change, whatever it is (the old order again, too)
            refused = sorted(self.refused)
            for signal in refused:
                self.values.pop(signal, None)
            self.pending_since = None
            self.changed.clear()
            log.warning("order_tag.unassigned", machine=self.machine, refused=refused,
                        reason="an order tag shows an unusable text: counts are reported unassigned until both "
                               "tags show a usable order and operation")
            return None
        order, op = self.values.get("order", ""), self.values.get("operation", "")
        if order and not op:
            return False  # half-written pair: wait for the operation tag
        self.pending_since = None
        self.changed.clear()
        return OrderContext(order, op) if order else None

    def complete_flag(self, s: Sample) -> bool:
        """True on a rising edge. The first value seen only sets the level (a flag already up at start completes
        nothing)."""
        if not s.good:
            return False
        t = s.source_time
        if t is not None:
            last = self.complete_time
            if last is not None and t < last and last - t < FLAG_REORDER_S:
                return False  # a late delivery, older than a value seen already (the cut read took the flag first)
            self.complete_time = t
        up = _flag(s.value)
        prev, self.complete_level = self.complete_level, up
        return up and prev is False


FLAG_REORDER_S = 130.0
"""A completion flag value whose source time is older than the last one seen, by less than this, is a late
delivery (an OPC UA publish of values queued before the changeover's cut read took the flag: up to twice the longest
publishing interval plus a timeout); older by more is a clock step, and used."""


class PlcTagOrders:
    """The ``tag`` order source and the completion flag, for every machine that has such tags. The core hands it
    the control samples (and asks before each sample of such a machine) in sample-time order; it answers with the
    command to apply at that boundary."""

    def __init__(self, machines: dict[str, bool], settle_s: float = ORDER_TAG_SETTLE_S,
                 pair_window_s: float = ORDER_PAIR_WINDOW_S) -> None:
        """``machines``: machine id -> True when its order comes from the tags (False: completion flag only)."""
        self.trackers = {m: TagOrderTracker(m) for m in machines}
        self.from_tags = {m for m, tags in machines.items() if tags}
        self.pending: set[str] = set()  # machines with an order-tag switch not yet applied
        self.settle_s = settle_s
        self.pair_window_s = pair_window_s
        self.pair_wait_s = pair_window_s  # monotonic: an idle machine's half-known pair is applied after this
        self._settle_since: dict[str, float] = {}

    def before_sample(self, machine: str, t: float) -> OrderCommand | str | None:
        """A sample of ``machine`` with time ``t`` comes next: the pending switch to apply before it, if due; or
        ``HOLD`` while only one tag of the pair changed and the other may still follow (the caller keeps the sample
        with ``hold`` and gets it back from ``release`` once the switch is applied)."""
        tracker = self.trackers.get(machine)
        if tracker is None or not tracker.due(t):
            return None
        if not tracker.paired() and t <= tracker.pending_since + self.pair_window_s:  # type: ignore[operator]
            return HOLD
        return self._take(machine)

    def hold(self, machine: str, s: Sample) -> None:
        self.trackers[machine].held.append(s)

    def release(self, machine: str) -> list[Sample]:
        """The samples held for ``machine`` (in order), given back once: apply them now."""
        tracker = self.trackers.get(machine)
        if tracker is None or not tracker.held:
            return []
        held, tracker.held = tracker.held, []
        return held

    def control_sample(self, machine: str, signal: str, s: Sample) -> OrderCommand | CompleteCommand | None:
        tracker = self.trackers.get(machine)
        if tracker is None:
            return None
        if signal == "complete":
            return CompleteCommand(machine) if tracker.complete_flag(s) else None
        if machine not in self.from_tags:
            return None
        # the same tag changed twice, the other not at all: the earlier change is applied first, on its own
        earlier = self._take(machine) if tracker.changes_again(signal, s) else None
        if tracker.order_tag(signal, s):
            self.pending.add(machine)
            if earlier is None and tracker.held and tracker.paired():
                return self._take(machine)  # the other tag followed: switch now, the held samples after it
        return earlier

    def _take(self, machine: str) -> OrderCommand | None:
        ctx = self.trackers[machine].take_switch()
        if ctx is False:
            return None
        self.pending.discard(machine)
        self._settle_since.pop(machine, None)
        return OrderCommand(machine, ctx, "tag", needs_cut=False)  # type: ignore[arg-type]

    def _settle_after(self, machine: str) -> float:
        return self.settle_s if self.trackers[machine].paired() else max(self.settle_s, self.pair_wait_s)

    def next_settle(self) -> float | None:
        """Monotonic time by which the core should look at pending switches again (None: nothing pending)."""
        if not self.pending:
            return None
        if len(self._settle_since) < len(self.pending):
            return 0.0  # not yet timed: look now (starts their settle time)
        return min(t + self._settle_after(m) for m, t in self._settle_since.items())

    def settled(self, now: float, *, all_now: bool = False,
                machines: set[str] | None = None) -> Iterator[tuple[str, OrderCommand | None]]:
        """Pending switches of machines that sent nothing after the change for ``settle_s`` (a half-known pair:
        ``pair_wait_s``), as (machine, command or None for a half-written pair); the caller applies the command,
        then the machine's held samples (``release``). ``all_now``: every pending one (the gateway is stopping)."""
        for machine in list(self.pending):
            if machines is not None and machine not in machines:
                continue
            first = self._settle_since.setdefault(machine, now)
            if all_now or now - first >= self._settle_after(machine):
                del self._settle_since[machine]
                yield machine, self._take(machine)


Publish = Callable[[str, bytes], Any]


class MqttDispatchSource:
    """The ``mqtt`` order source: the ERP's retained dispatches. A dispatch that cannot be taken is counted, logged
    and answered on ``.../{machine}/dispatch/rejected`` (QoS 1, not retained) with the reason and what was received,
    so the ERP sees why its dispatch is not in force."""

    def __init__(self, topics: Any, order_source: dict[str, str], emit: Callable[[OrderCommand], None],
                 count: Callable[[DispatchRejected, dict[str, Any]], None], publish: Publish) -> None:
        self.topics = topics
        self.order_source = order_source
        self._emit = emit
        self._count = count
        self._publish = publish

    def on_message(self, topic: str, payload: bytes) -> None:
        machine = self.topics.machine_of_dispatch(topic)
        try:
            if machine is None:
                raise DispatchRejected("topic", f"not a dispatch topic: {topic}")
            if machine not in self.order_source:
                raise DispatchRejected("unknown_machine", f"machine {machine!r} is not configured on this gateway")
            if self.order_source[machine] != "mqtt":
                raise DispatchRejected("order_source", f"machine {machine!r} takes its order from "
                                                       f"{self.order_source[machine]!r}, not from MQTT dispatch")
            ctx = parse_dispatch(payload)
        except DispatchRejected as exc:
            self.reject(topic, exc, payload)
            return
        self._emit(OrderCommand(machine, ctx, "mqtt"))

    def refused(self, cmd: OrderCommand, exc: OrderRefused) -> None:
        """The machine refused a parsed dispatch (e.g. an operation it already completed)."""
        ctx = cmd.context
        self.reject(self.topics.dispatch(cmd.machine), DispatchRejected(exc.reason, exc.detail), None,
                    received={"order": ctx.order, "operation": ctx.operation, "status": ctx.status} if ctx else None)

    def reject(self, topic: str, exc: DispatchRejected, payload: bytes | None,
               received: dict[str, Any] | None = None) -> None:
        self._count(exc, {"topic": topic, "size": None if payload is None else len(payload)})
        if not topic.endswith("/dispatch") or "+" in topic or "#" in topic:
            return  # nowhere sensible to answer
        if received is None and payload is not None:
            received = _received(payload)
        body = {"topic": topic, "reason": exc.reason, "detail": exc.detail[:500], "received": received,
                "time": rfc3339(time.time())}
        try:
            self._publish(topic + "/rejected", json.dumps(body, separators=(",", ":")).encode())
        except ValueError:  # a topic paho refuses: counted and logged above, nothing to answer on
            pass


def _received(payload: bytes) -> Any:
    """What was received, for the answer: the order and operation when the payload is a JSON object, else its size
    (also of a payload over MAX_DISPATCH_BYTES: parsed to answer, 24 MB of ``[{},{},...]`` took ~600 MB and held the
    event loop, and a retained one came back at every start)."""
    if len(payload) > MAX_DISPATCH_BYTES:
        return {"size": len(payload)}
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {"size": len(payload)}
    if isinstance(doc, dict):
        return {k: str(doc[k])[:64] for k in ("order", "operation", "status") if k in doc}
    return {"size": len(payload)}


class LocalOrderSource:
    """The ``local`` order source: the local order command (CLI → HTTP API), answered synchronously."""

    def __init__(self, order_source: dict[str, str], emit: Callable[[OrderCommand], None],
                 refusal: Callable[[OrderCommand], OrderRefused | None]) -> None:
        self.order_source = order_source
        self._emit = emit
        self._refusal = refusal

    def command(self, machine: str, ctx: OrderContext | None) -> None:
        """Raises ValueError for an unknown machine, another order source or an order the machine refuses."""
        if machine not in self.order_source:
            raise ValueError(f"unknown machine {machine!r}")
        if self.order_source[machine] != "local":
            raise ValueError(f"machine {machine!r} takes its order from {self.order_source[machine]!r}; "
                             "set order_source: local to use the local command")
        cmd = OrderCommand(machine, ctx, "local")
        refused = self._refusal(cmd)
        if refused is not None:
            raise ValueError(refused.detail)
        self._emit(cmd)
