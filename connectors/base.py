"""The seam every protocol adapter implements.

A connector owns its connection to one device or server. ``run()`` connects, retries with capped,
jittered exponential backoff and streams samples into the sink until cancelled; ``read()`` does a
one-shot read of the current values (used at an order changeover to cut the counters).
Connectors never interpret values: they hand raw, typed values with their quality to the sink.
"""

from __future__ import annotations

import abc
import enum
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from mappings.samples import Sample


def rfc3339(ts: float | None) -> str | None:
    """Wall-clock epoch seconds as RFC 3339 UTC with milliseconds (``2026-12-04T05:12:03.123Z``): the one format of
    times people read (``/status``, ``buffer list``, the status topic). None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


SampleSink = Callable[[list[Sample]], None]
"""Called from the event loop with a batch of samples; must not block."""


class ComponentState(str, enum.Enum):
    STARTING = "starting"
    CONNECTED = "connected"
    DEGRADED = "degraded"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass
class ComponentStatus:
    state: ComponentState = ComponentState.STARTING
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    #: seconds the last outage lasted (from leaving CONNECTED to CONNECTED again); None before the first one
    downtime_s: float | None = field(default=None, compare=False)
    _down_mono: float | None = field(default=None, repr=False, compare=False)

    def set(self, state: ComponentState, error: str | None = None) -> bool:
        """Set the state; returns True when it changed (log state changes, not repeats)."""
        changed = state != self.state
        if changed:
            if self.state == ComponentState.CONNECTED:
                self._down_mono = time.monotonic()
            elif state == ComponentState.CONNECTED and self._down_mono is not None:
                self.downtime_s = round(time.monotonic() - self._down_mono, 3)
                self._down_mono = None
            self.state = state
            self.since = time.time()
        if error is not None or state == ComponentState.CONNECTED:
            self.last_error = error
        return changed

    def down_for(self) -> float | None:
        """Seconds since it left CONNECTED (None while connected, or before it ever was): for 'recovered' lines."""
        return None if self._down_mono is None else round(time.monotonic() - self._down_mono, 3)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "since": rfc3339(self.since), "last_error": self.last_error, **self.detail}


@dataclass(frozen=True)
class TagBinding:
    """One tag a connector must deliver: the internal key and the connector-specific address model."""

    key: str
    address: Any  # the connector's TagConfig instance
    # every value is a count of its own (delta / reset-on-read counters): the connector must deliver each value, also
    # the same value again with a new source timestamp, and never merge or discard queued values
    every_value: bool = False


class Backoff:
    """Capped, jittered exponential backoff."""

    def __init__(self, initial: float = 0.2, maximum: float = 10.0, factor: float = 2.0) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._current = initial

    def reset(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * self.factor)
        return delay * random.uniform(0.8, 1.2)


class Connector(abc.ABC):
    """Base class of protocol adapters. Subclasses set ``type`` and implement run() and read()."""

    type: ClassVar[str]

    def __init__(self, config: Any, tags: Sequence[TagBinding], sink: SampleSink) -> None:
        self.config = config
        self.id: str = config.id
        self.tags = list(tags)
        self.sink = sink
        self.status = ComponentStatus()

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect and stream samples until cancelled. Never returns on its own; never raises on I/O errors."""

    @abc.abstractmethod
    async def read(self, keys: Sequence[str], timeout: float = 2.0) -> list[Sample]:
        """Read the current value of the given tag keys once. Raises ConnectorError when not possible."""
