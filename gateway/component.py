"""Infrastructure shared by every long-lived component (connectors, the MQTT link, the runtime's loops): the
component status shown on /status and the reconnect backoff. Neither the domain (mappings/) nor a protocol lives
here; connectors and the gateway both import this module, and it imports neither."""

from __future__ import annotations

import enum
import errno
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def rfc3339(ts: float | None) -> str | None:
    """Wall-clock epoch seconds as RFC 3339 UTC with milliseconds (``2026-12-04T05:12:03.123Z``): the one format of
    times people read (``/status``, ``buffer list``, the status topic). None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class HttpListenError(Exception):
    """The local HTTP API cannot listen (the port is taken, the address is not on this host): one line for the user."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            fix = "another process listens there (stop it, or choose another http.port)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "this host has no such address (fix http.host)"
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need privileges (choose http.port 1024 or above)"
        else:
            fix = "check http.host and http.port"
        super().__init__(f"http.port: cannot listen on {host}:{port}: {why}; {fix}")
        self.host, self.port, self.errno = host, port, exc.errno
