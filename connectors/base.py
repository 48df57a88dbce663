"""The seam every protocol adapter implements.

A connector owns its connection to one device or server. ``run()`` connects, retries with capped,
jittered exponential backoff and streams samples into the sink until cancelled; ``read()`` does a
one-shot read of the current values (used at an order changeover to cut the counters).
Connectors never interpret values: they hand raw, typed values with their quality to the sink.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.component import ComponentStatus
from mappings.samples import Sample

SampleSink = Callable[[list[Sample]], None]
"""Called from the event loop with a batch of samples; must not block."""


@dataclass(frozen=True)
class TagBinding:
    """One tag a connector must deliver: the internal key and the connector-specific address model."""

    key: str
    address: Any  # the connector's TagConfig instance
    # every value is a count of its own (delta / reset-on-read counters): the connector must deliver each value, also
    # the same value again with a new source timestamp, and never merge or discard queued values
    every_value: bool = False


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
