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
from typing import Any, ClassVar, Protocol

from gateway.alarms import Alarms
from gateway.component import ComponentStatus
from mappings.samples import Sample

SampleSink = Callable[[Sequence[Sample]], None]
"""Called from the event loop with a batch of samples; must not block."""


@dataclass(frozen=True)
class CounterType:
    """What the config says about a counter's (or meter's) register, for the check against the server's DataType at
    connect. None: not configured (the width is taken from the server)."""

    bits: int | None = None
    signed: bool | None = None
    max_value: bool = False  # an explicit max_value: the width does not matter
    float_meter: bool = False  # a resolution is configured: the node should be Float/Double


@dataclass(frozen=True)
class TagType:
    """What the server says a counter's node holds (OPC UA DataType), reported to the runtime at every connect."""

    data_type: str  # e.g. "UInt16", "Float"
    kind: str  # "integer", "float" or "other"
    bits: int | None = None
    signed: bool = False


TagTypesSink = Callable[[dict[str, TagType]], None]
"""Called with tag key -> TagType once per connect, before the first sample of that connection."""


class AlarmSink(Protocol):
    """The runtime's Alarms (gateway/alarms.py): connectors raise and clear conditions an operator must act on."""

    def set(self, id: str, active: bool, severity: Any, message: str, **evidence: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class TagBinding:
    """One tag a connector must deliver: the internal key and the connector-specific address model."""

    key: str
    address: Any  # the connector's TagConfig instance
    # every value is a count of its own (delta / reset-on-read counters): the connector must deliver each value, also
    # the same value again with a new source timestamp, and never merge or discard queued values
    every_value: bool = False
    counter: CounterType | None = None  # set for counters and material meters
    # a change must not be merged with the next one (a machine state, a completion pulse): a short state or pulse
    # between two reads is still delivered (OPC UA: a monitored item queue deeper than one)
    every_change: bool = False
    # a cumulative counter or meter of a machine whose changeover comes from PLC tags (order tags, completion flag):
    # the value just before the tag changed is the cut, so every value between two reads must be delivered, not only
    # the latest (a later value would carry the parts made before the change into the next order). OPC UA: a queue
    # that holds every value between two publishes, even a late one
    cut_by_tags: bool = False


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
        # hooks the runtime sets (gateway/runtime.py): its Alarms, so a connector's alarms show in /status and metrics,
        # and a sink for the counter types found on the server. Standalone (tests, tools): a private Alarms, no sink.
        self.alarms: AlarmSink = Alarms()
        self.on_tag_types: TagTypesSink | None = None

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect and stream samples until cancelled. Never returns on its own; never raises on I/O errors."""

    @abc.abstractmethod
    async def read(self, keys: Sequence[str], timeout: float = 2.0) -> list[Sample]:
        """Read the current value of the given tag keys once. Raises ConnectorError when not possible."""
