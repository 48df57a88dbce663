"""A simulated production machine: counters, state, active order and ground truth.

No networking here. :class:`MachineModel` holds what a PLC would hold (raw cumulative counters
that wrap like a register of ``counter_bits`` width and can be reset) next to what *really* happened
(:attr:`MachineModel.truth`: parts made per order/operation, never wrapped, never reset), so tests can
compare what a gateway reported with the parts that were actually produced.

Everything is deterministic from ``seed``: whether the n-th part is scrap depends only on the seed
and n, not on timing. A part is made atomically: raw counter, truth and ``parts_made`` change in the
same synchronous step, then the listeners are called (servers use them to publish new values).

The model is meant to be used from one asyncio event loop (listeners are called synchronously in the
thread that changed the model).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

__all__ = ["STATES", "MachineModel", "OrderKey"]

_log = logging.getLogger(__name__)

STATES = ("idle", "running", "stopped")

#: key of :attr:`MachineModel.truth`: (order number, operation number) or None (no order active)
OrderKey = tuple[str, str] | None

Listener = Callable[[], Any]


class MachineModel:
    """State of one simulated machine.

    :param name: machine name, used in OPC UA node ids (``{name}.GoodCount``).
    :param cycle_time: seconds per part while running.
    :param scrap_rate: probability that a part is scrap (0..1).
    :param seed: seed of the scrap decisions (``random.Random(seed)``).
    :param counter_bits: register width of the raw counters (16 or 32 for the servers).
    :param signed: the counters are signed (two's complement) registers.
    :param start_good: initial raw good counter (wrapped into the register range).
    :param start_scrap: initial raw scrap counter (wrapped into the register range).
    """

    def __init__(
        self,
        name: str,
        *,
        cycle_time: float = 0.1,
        scrap_rate: float = 0.05,
        seed: int = 0,
        counter_bits: int = 32,
        signed: bool = False,
        start_good: int = 0,
        start_scrap: int = 0,
    ) -> None:
        if not name:
            raise ValueError("name must not be empty")
        if not cycle_time > 0:
            raise ValueError("cycle_time must be > 0")
        if not 0.0 <= scrap_rate <= 1.0:
            raise ValueError("scrap_rate must be within 0..1")
        if not 2 <= counter_bits <= 64:
            raise ValueError("counter_bits must be within 2..64")
        self.name = name
        self.cycle_time = float(cycle_time)
        self.scrap_rate = float(scrap_rate)
        self.seed = seed
        self.counter_bits = counter_bits
        self.signed = signed
        self._modulus = 1 << counter_bits
        self._mask = self._modulus - 1
        self._rng = random.Random(seed)

        self.good_raw: int = self._wrap(start_good)
        self.scrap_raw: int = self._wrap(start_scrap)
        self.order: OrderKey = None
        self.state: str = "idle"
        self.operation_complete: bool = False
        self.truth: dict[OrderKey, dict[str, int]] = {}
        self.parts_made: int = 0
        self.resets: int = 0
        #: increases on every change (counters, state, order); lets observers detect missed updates
        self.version: int = 0

        self._listeners: list[Listener] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self._stop_at: int | None = None
        self._loop_active = False

    # ------------------------------------------------------------------ counters

    @property
    def counter_min(self) -> int:
        return -(1 << (self.counter_bits - 1)) if self.signed else 0

    @property
    def counter_max(self) -> int:
        return (1 << (self.counter_bits - 1)) - 1 if self.signed else self._mask

    def _wrap(self, value: int) -> int:
        """Wrap ``value`` exactly like a register of ``counter_bits`` width (modulus 2**bits)."""
        v = int(value) & self._mask
        if self.signed and v >= (1 << (self.counter_bits - 1)):
            v -= self._modulus
        return v

    def raw_register_value(self, counter: str) -> int:
        """Unsigned bit pattern (0 .. 2**bits-1) of counter ``"good"`` or ``"scrap"``, for register encoding."""
        if counter == "good":
            return self.good_raw & self._mask
        if counter == "scrap":
            return self.scrap_raw & self._mask
        raise KeyError(f"unknown counter {counter!r} (expected 'good' or 'scrap')")

    def make_part(self) -> bool:
        """Make one part now (whatever the state). Returns True if the part is good.

        Raw counter, truth and ``parts_made`` are updated in one synchronous step, then listeners run.
        """
        good = not (self._rng.random() < self.scrap_rate)
        entry = self.truth.setdefault(self.order, {"good": 0, "scrap": 0})
        if good:
            self.good_raw = self._wrap(self.good_raw + 1)
            entry["good"] += 1
        else:
            self.scrap_raw = self._wrap(self.scrap_raw + 1)
            entry["scrap"] += 1
        self.parts_made += 1
        self._changed_now()
        return good

    def reset_counters(self) -> None:
        """A PLC reset: raw counters go to 0. Truth is unchanged (the parts were made)."""
        self.good_raw = 0
        self.scrap_raw = 0
        self.resets += 1
        self._changed_now()

    def set_counters(self, good: int | None = None, scrap: int | None = None) -> None:
        """Force raw counter values (e.g. an operator preset). Truth is unchanged."""
        if good is not None:
            self.good_raw = self._wrap(good)
        if scrap is not None:
            self.scrap_raw = self._wrap(scrap)
        self._changed_now()

    def truth_for(self, order: str | None = None, operation: str | None = None) -> dict[str, int]:
        """Parts made for one order/operation (``truth_for()`` = parts made without an order)."""
        key: OrderKey = None if order is None else (str(order), str(operation))
        return dict(self.truth.get(key, {"good": 0, "scrap": 0}))

    def truth_totals(self) -> dict[str, int]:
        """All parts made, over all orders: ``{"good": n, "scrap": m}``."""
        good = sum(v["good"] for v in self.truth.values())
        scrap = sum(v["scrap"] for v in self.truth.values())
        return {"good": good, "scrap": scrap}

    # ------------------------------------------------------------------ order / state

    def set_order(self, order: str, operation: str) -> None:
        """Make (order, operation) active: parts made from now on are attributed to it."""
        self.order = (str(order), str(operation))
        self.operation_complete = False
        self._changed_now()

    def complete_operation(self) -> None:
        """The PLC raises its 'operation complete' flag (cleared by the next set_order)."""
        self.operation_complete = True
        self._changed_now()

    def clear_order(self) -> None:
        self.order = None
        self._changed_now()

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}, expected one of {STATES}")
        if state != self.state:
            self.state = state
            self._changed_now()

    def start(self) -> None:
        """State "running": a running :meth:`run` loop makes one part every ``cycle_time``."""
        self.set_state("running")

    def pause(self) -> None:
        """State "idle": no parts are made."""
        self.set_state("idle")

    def stop(self) -> None:
        """State "stopped" (machine stopped / fault): no parts are made."""
        self.set_state("stopped")

    # ------------------------------------------------------------------ listeners

    def add_listener(self, callback: Listener) -> None:
        """``callback()`` is called synchronously after every change of counters, state or order."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of what a PLC would expose (raw counters, state, order)."""
        return {
            "good": self.good_raw,
            "scrap": self.scrap_raw,
            "state": self.state,
            "order": self.order[0] if self.order else "",
            "operation": self.order[1] if self.order else "",
            "complete": self.operation_complete,
            "version": self.version,
            "parts_made": self.parts_made,
        }

    def _changed_now(self) -> None:
        self.version += 1
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:  # a broken observer must not stop the machine
                _log.exception("machine %s: listener %r failed", self.name, cb)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait_change(self, timeout: float | None = None) -> None:
        """Wait for the next change, or ``timeout`` seconds (no exception on timeout).

        A plain future + call_later rather than asyncio.wait_for: on Python 3.11 wait_for can swallow
        a cancellation that arrives together with the wake-up, leaving a cancelled task running.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        handle = None
        if timeout is not None:
            handle = loop.call_later(max(0.0, timeout), lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()
            self._waiters.discard(fut)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``predicate()`` is true (checked after every change). TimeoutError on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            if deadline is None:
                await self._wait_change()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"machine {self.name}: condition not reached within {timeout}s")
            await self._wait_change(remaining)

    async def wait_parts(self, total: int, timeout: float | None = None) -> None:
        """Wait until ``parts_made >= total``. TimeoutError on timeout."""
        await self.wait_until(lambda: self.parts_made >= total, timeout)

    # ------------------------------------------------------------------ production loop

    async def run(self) -> None:
        """Make one part every ``cycle_time`` while the state is "running"; return when it is not.

        The schedule is absolute (start + k * cycle_time on the monotonic loop clock), so the rate does
        not drift; parts missed by a short stall of the event loop are made at once (a stall longer
        than max(1 s, 10 cycles) restarts the schedule instead of producing a burst).
        Only one production loop runs at a time: a second concurrent call waits for the first.
        """
        if self._loop_active:
            await self.wait_until(lambda: not self._loop_active)
            if self._loop_active:  # pragma: no cover - defensive
                return
        self._loop_active = True
        loop = asyncio.get_running_loop()
        try:
            next_t = loop.time() + self.cycle_time
            max_lag = max(1.0, 10 * self.cycle_time)
            while self.state == "running":
                now = loop.time()
                if now - next_t > max_lag:
                    next_t = now
                while next_t <= now and self.state == "running":
                    self.make_part()
                    next_t += self.cycle_time
                    if self._stop_at is not None and self.parts_made >= self._stop_at:
                        self._stop_at = None
                        self.pause()
                if self.state != "running":
                    break
                await self._wait_change(next_t - loop.time())
                # a state change wakes us early: the loop condition re-checks it
        finally:
            self._loop_active = False
            self._wake_waiters()  # whoever waits for the loop to end

    async def run_forever(self) -> None:
        """Production driver for servers/demos: produce whenever the state is "running", until cancelled."""
        while True:
            await self.wait_until(lambda: self.state == "running" and not self._loop_active)
            await self.run()
            if self.state == "running":  # another loop was active; avoid a busy loop
                await self._wait_change()

    async def produce(self, n: int, timeout: float | None = None) -> None:
        """Start, make exactly ``n`` more parts at the machine's rate, then pause (state "idle").

        Works with or without a concurrent :meth:`run_forever`.
        """
        if n <= 0:
            return
        target = self.parts_made + n
        self._stop_at = target
        self.start()
        try:
            if self._loop_active:
                await self.wait_parts(target, timeout)
            else:
                async with asyncio.timeout(timeout):
                    await self.run()
        except BaseException:  # timeout or cancellation: leave the machine idle, not running
            self._stop_at = None
            if self.state == "running":
                self.pause()
            raise
        if self.parts_made < target:
            # paused/stopped from outside before the target was reached
            self._stop_at = None
            raise RuntimeError(
                f"machine {self.name}: production interrupted after {n - (target - self.parts_made)} of {n} parts"
            )
