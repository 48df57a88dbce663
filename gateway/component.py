"""Infrastructure shared by every long-lived component (connectors, the MQTT link, the runtime's loops): the
component status shown on /status and the reconnect backoff. Neither the domain (mappings/) nor a protocol lives
here; connectors and the gateway both import this module, and it imports neither."""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any


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
