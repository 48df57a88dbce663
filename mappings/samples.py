"""The value type every connector produces and the mapping core consumes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union, overload

Value = Union[int, float, str, bool, None]


@dataclass(slots=True)
class Sample:
    """One reading of one tag.

    ``key`` is the gateway-internal tag key (``"<machine>/<signal>"``, e.g. ``"press-1/good"``).
    ``good`` is False for an OPC UA BAD/UNCERTAIN status or a failed Modbus read; the value of a
    sample that is not good is never used as a counter value.
    Times are POSIX seconds: ``source_time`` from the device when it has one, ``recv_time`` when the
    gateway received it (gateway wall clock). Both are data for payloads and ordering only: they can step (NTP, a PLC
    on local time at a DST change). ``mono`` is the gateway's monotonic clock (``time.monotonic()``) when the sample
    was received; elapsed time, plausibility and reporting windows are measured with it. None when the producer has
    no monotonic time (tests, old callers): the engines then fall back to the wall-clock difference.
    ``reread`` marks a sample that re-reads a value the regular poll/subscription may already have delivered (the
    cut read at a changeover); see docs/counting.md for how delta counters treat it.

    Treat a Sample as immutable (derive a changed copy with ``dataclasses.replace``). It is not a frozen dataclass
    because a frozen one costs 1.3 µs to construct against 0.2 µs (measured on the bench machine), and every polled
    tag is one Sample.
    """

    key: str
    value: Value
    good: bool
    recv_time: float
    source_time: float | None = None
    status: str = "Good"
    mono: float | None = None
    reread: bool = False

    @property
    def time(self) -> float:
        return self.source_time if self.source_time is not None else self.recv_time


class Readings(Sequence[Sample]):
    """One poll's readings in reading order, as a sequence of ``Sample``: runs of good integer readings taken
    together (a block of plain registers: the tag keys and values in two columns, one receive time, no source time),
    and single samples.

    Every polled tag of a Modbus block of plain registers is in a run, so the mapping core can count it without a
    ``Sample`` object: the core applies a run column by column (``gateway/core.py``, ``mappings.machine.apply_run``),
    with the route of each key looked up once per ``keys`` tuple (a run keeps its block's tuple: the same object at
    every poll). Iterating (or indexing) makes the samples on demand, equal to those the connector made before runs
    existed, for every other reader (the ordered path of PLC-tag orders, the overload coalescing, tests).

    A value of None in a run is a tag whose value did not change since the last poll (not a reading: skipped).
    """

    __slots__ = ("count", "parts")

    def __init__(self) -> None:
        # (keys, values, recv_time, mono) for a run, a list[Sample] otherwise
        self.parts: list[tuple[tuple[str, ...], list[int | None], float, float] | list[Sample]] = []
        self.count = 0

    def add_run(self, keys: tuple[str, ...], values: list[int | None], recv_time: float, mono: float,
                count: int) -> None:
        """Add a run: ``values[i]`` is the reading of ``keys[i]`` (None: unchanged, skipped); ``count`` is the number
        of values that are not None."""
        if count:
            self.parts.append((keys, values, recv_time, mono))
            self.count += count

    def extend(self, samples: list[Sample]) -> None:
        if samples:
            self.parts.append(samples)
            self.count += len(samples)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts:
            if type(part) is list:
                yield from part
            else:
                keys, values, recv, mono = part
                for k, v in zip(keys, values):
                    if v is not None:
                        yield Sample(k, v, True, recv, None, "Good", mono)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        return list(self)[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Readings, list)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Readings({list(self)!r})"
