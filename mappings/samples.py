"""The value type every connector produces and the mapping core consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Value = Union[int, float, str, bool, None]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one tag.

    ``key`` is the gateway-internal tag key (``"<machine>/<signal>"``, e.g. ``"press-1/good"``).
    ``good`` is False for an OPC UA BAD/UNCERTAIN status or a failed Modbus read; the value of a
    sample that is not good is never used as a counter value.
    Times are POSIX seconds: ``source_time`` from the device when it has one, ``recv_time`` when the
    gateway received it.
    """

    key: str
    value: Value
    good: bool
    recv_time: float
    source_time: float | None = None
    status: str = "Good"

    @property
    def time(self) -> float:
        return self.source_time if self.source_time is not None else self.recv_time
