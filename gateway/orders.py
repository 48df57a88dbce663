"""Order sources: where a machine's production-order context comes from, as commands for the core.

Four sources, one per machine (``order_source``), plus the optional PLC completion flag:

- ``mqtt``  – the ERP's retained dispatch on ``.../{machine}/dispatch`` (parsed in gateway/dispatch.py);
- ``local`` – the local order command (CLI → HTTP API);
- ``tag``   – the PLC's order and operation tags, read by a connector like any other tag;
- ``complete_tag`` – the PLC's "operation complete" flag (rising edge), with any of the above.

Each emits :class:`OrderCommand` values; the core applies them. Dispatches from MQTT or the local command need a
*cut* (a fresh read of the machine's counters, so counts up to the change go to the old order); the core asks the
connectors for it and applies the command when the read comes back (two-phase, so a slow PLC delays only its own
machine). Changes seen in the PLC's own tags need no extra read: the scan that shows the new order *is* the cut.

The tag tracker below is pure (no I/O, no clock): it is handed samples in time order and says when to switch.
Rule at the sample boundary: counter samples and a completion flag seen in the same scan as the order-tag change
(same sample time) belong to the *old* order — a PLC finishes the part and the operation, then shows the next
order —, and the switch happens before the first sample of the machine with a later time (or when the core's
settle timer fires, for a machine that makes nothing after the change). Order and operation tags that change in
the same scan are applied together as one changeover.
"""

from __future__ import annotations

from dataclasses import dataclass

from mappings.machine import OrderContext
from mappings.samples import Sample


@dataclass(frozen=True, slots=True)
class OrderCommand:
    """Set (or clear, ``context=None``) the machine's order context; ``source`` says who asked."""

    machine: str
    context: OrderContext | None
    source: str = "mqtt"  # mqtt | local | tag | complete_tag
    needs_cut: bool = True


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no")
    return bool(value)


class TagOrderTracker:
    """Order/operation tags and the completion flag of one machine."""

    __slots__ = ("machine", "values", "pending_since", "complete_level")

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.values: dict[str, str] = {}
        self.pending_since: float | None = None  # sample time of an order-tag change not yet applied
        self.complete_level: bool | None = None

    def order_tag(self, signal: str, s: Sample) -> bool:
        """An order or operation tag sample; True when it changed the tag values (a switch is now pending)."""
        if not s.good:
            return False  # an unreadable order tag changes nothing
        value = "" if s.value is None else str(s.value).strip()
        if self.values.get(signal) == value:
            return False
        self.values[signal] = value
        if self.pending_since is None:
            self.pending_since = s.time
        return True

    def due(self, t: float) -> bool:
        """A sample of this machine with time ``t`` is next: must the pending switch be applied first?"""
        return self.pending_since is not None and t > self.pending_since

    def take_switch(self) -> OrderContext | None | bool:
        """The context to switch to, or False when nothing is pending or the pair is half written."""
        if self.pending_since is None:
            return False
        order, op = self.values.get("order", ""), self.values.get("operation", "")
        if order and not op:
            return False  # half-written pair: wait for the operation tag
        self.pending_since = None
        return OrderContext(order, op) if order else None

    def complete_flag(self, s: Sample) -> bool:
        """True on a rising edge. The first value seen only sets the level (a flag already up at start completes
        nothing)."""
        if not s.good:
            return False
        up = _flag(s.value)
        prev, self.complete_level = self.complete_level, up
        return up and prev is False
