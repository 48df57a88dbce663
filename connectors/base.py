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
from typing import Any, ClassVar

from mappings.samples import Sample

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

    def set(self, state: ComponentState, error: str | None = None) -> bool:
        """Set the state; returns True when it changed (log state changes, not repeats)."""
        changed = state != self.state
        if changed:
            self.state = state
            self.since = time.time()
        if error is not None or state == ComponentState.CONNECTED:
            self.last_error = error
        return changed

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "since": self.since, "last_error": self.last_error, **self.detail}


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


def _no_observer(op: str, seconds: float) -> None:
    pass


class Connector(abc.ABC):
    """Base class of protocol adapters. Subclasses set ``type`` and implement run() and read()."""

    type: ClassVar[str]

    def __init__(self, config: Any, tags: Sequence[TagBinding], sink: SampleSink) -> None:
        self.config = config
        self.id: str = config.id
        self.tags = list(tags)
        self.status = ComponentStatus()
        self.samples = 0  # samples delivered to the sink (a plain int: exported at scrape time, gateway/exporter.py)
        # called with (op, seconds) after each poll / read: "poll", "read", "watchdog"; the gateway wires it to a
        # histogram (no-op by default, so a connector works without the gateway)
        self.observe_read: Callable[[str, float], None] = _no_observer

        def counted(samples: list[Sample]) -> None:
            self.samples += len(samples)
            sink(samples)

        self.sink: SampleSink = counted

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect and stream samples until cancelled. Never returns on its own; never raises on I/O errors."""

    @abc.abstractmethod
    async def read(self, keys: Sequence[str], timeout: float = 2.0) -> list[Sample]:
        """Read the current value of the given tag keys once. Raises ConnectorError when not possible."""
