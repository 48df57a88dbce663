"""Counter engine: raw counter samples in, counted deltas out. Pure code, no I/O, no clock.

Rules (see ../shared/domain.md section 3 and docs/counting.md):

- The first good value with no baseline is a baseline, never production.
- Cumulative counters: an increase is a delta. A decrease is a rollover (delta = value + modulus - previous) when the
  rate it implies is plausible (``max_rate`` x elapsed), otherwise a reset (delta = value). A zero that is not a
  plausible rollover is held: if the next value is >= the previous one it was a glitch (delta = next - previous),
  otherwise the counter was reset (delta = next).
- An increase larger than ``max_rate`` x (elapsed + tolerance) is an implausible jump: it is not counted, the
  baseline moves to the new value and the held quantity is reported as an anomaly.
- A sample that is not good (OPC UA BAD/UNCERTAIN, failed Modbus read) never moves the baseline: deltas are taken
  between good samples only, so a gap loses nothing.
- A sample older than the baseline (out-of-order delivery) is ignored.
- ``reset_on_read`` / ``delta`` counters: every good value is itself a delta.

The state is a small dict-friendly dataclass so it can be persisted with the events derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["cumulative", "reset_on_read", "delta"]

JUMP_TOLERANCE_S = 2.0
"""Slack added to the elapsed time when checking plausibility (sampling jitter, clock skew between source stamps)."""


@dataclass(frozen=True, slots=True)
class CounterSpec:
    name: str
    mode: Mode = "cumulative"
    modulus: int | None = 2**32
    signed: bool = False
    max_rate: float = 50.0

    def normalize(self, raw: int) -> int:
        """Map a raw register value to its position in [0, modulus): two's complement for signed counters."""
        if self.modulus is None:
            return raw
        return raw % self.modulus

    def allowance(self, elapsed: float) -> float:
        return self.max_rate * (max(elapsed, 0.0) + JUMP_TOLERANCE_S)


@dataclass(slots=True)
class CounterState:
    last: int | None = None  # normalized value of the last accepted good sample
    last_time: float | None = None
    held_zero: bool = False  # a zero was seen that may be a glitch or a reset

    def to_dict(self) -> dict:
        return {"last": self.last, "last_time": self.last_time, "held_zero": self.held_zero}

    @classmethod
    def from_dict(cls, d: dict) -> "CounterState":
        return cls(**d)


Outcome = Literal["none", "baseline", "increase", "rollover", "reset", "glitch", "held_zero", "jump", "bad", "stale",
                  "delta", "invalid"]


@dataclass(frozen=True, slots=True)
class CounterResult:
    outcome: Outcome
    delta: int = 0
    previous: int | None = None
    value: int | None = None
    held: int = 0  # quantity not counted (implausible jump)


_NONE = CounterResult("none")


def step(spec: CounterSpec, state: CounterState, value: object, good: bool, t: float) -> CounterResult:
    """Apply one sample to ``state`` (mutated in place) and return what it meant."""
    if not good:
        return CounterResult("bad")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return CounterResult("invalid")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            return CounterResult("invalid")
        value = int(value)
    if state.last_time is not None and t < state.last_time:
        return CounterResult("stale")

    if spec.mode != "cumulative":
        if value < 0:
            return CounterResult("invalid")
        state.last, state.last_time = value, t
        if value == 0:
            return _NONE
        return CounterResult("delta", delta=value, value=value)

    u = spec.normalize(value)
    prev = state.last
    if prev is None:
        state.last, state.last_time, state.held_zero = u, t, False
        return CounterResult("baseline", value=u)
    elapsed = t - (state.last_time if state.last_time is not None else t)

    if state.held_zero:
        if u == 0:
            return _NONE  # still zero: undecided; the time of a suspect zero is not a baseline time
        state.held_zero = False
        if u >= prev:
            return _increase(spec, state, prev, u, t, elapsed, outcome="glitch")
        state.last, state.last_time = u, t
        return CounterResult("reset", delta=u, previous=prev, value=u)

    if u == prev:
        state.last_time = t
        return _NONE
    if u > prev:
        return _increase(spec, state, prev, u, t, elapsed, outcome="increase")

    # decrease: rollover, glitch candidate, or reset
    if spec.modulus is not None:
        wrapped = u + spec.modulus - prev
        if wrapped <= spec.allowance(elapsed):
            state.last, state.last_time = u, t
            return CounterResult("rollover", delta=wrapped, previous=prev, value=u)
    if u == 0:
        state.held_zero = True  # the baseline (value and time) stays until the next good value decides
        return CounterResult("held_zero", previous=prev, value=0)
    state.last, state.last_time = u, t
    return CounterResult("reset", delta=u, previous=prev, value=u)


def _increase(spec: CounterSpec, state: CounterState, prev: int, u: int, t: float, elapsed: float, *, outcome: Outcome) -> CounterResult:
    delta = u - prev
    state.last, state.last_time = u, t
    if delta > spec.allowance(elapsed):
        return CounterResult("jump", previous=prev, value=u, held=delta)
    return CounterResult(outcome, delta=delta, previous=prev, value=u)
