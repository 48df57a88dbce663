"""Crash points for tests: kill the process at a named step of the event path.

The chaos and crash-point tests start the gateway with ``EDGE_GATEWAY_CRASH_AT=<point>:<n>`` in its environment; the
n-th time the code passes ``crash_point("<point>")`` the process ends at once with ``os._exit(CRASH_EXIT_CODE)`` (no
cleanup, no flush, no shutdown checkpoint: as close to SIGKILL as Python gets, but at an exact place). Without the
variable ``crash_point`` is a dictionary lookup on a constant: nothing to measure on the hot path.

Points, in the order an event passes them:

- ``store.inserted``      outbox rows inserted, transaction not yet committed
- ``store.committed``     COMMIT returned (durable per ``store.synchronous``), rows not yet handed to the publisher
- ``core.handed_over``    the publisher has been given the committed rows
- ``publisher.published`` a message was handed to the MQTT client (may or may not be on the wire)
- ``publisher.puback``    a PUBACK arrived, the row is not yet deleted
- ``store.deleted``       acknowledged rows deleted, before the next step
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 86
POINTS = ("store.inserted", "store.committed", "core.handed_over", "publisher.published", "publisher.puback",
          "store.deleted")


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise SystemExit(f"EDGE_GATEWAY_CRASH_AT: unknown crash point {name!r}; one of {', '.join(POINTS)}")
    return name, int(count or "1")


_ARMED = _parse(os.environ.get("EDGE_GATEWAY_CRASH_AT"))
_hits = 0


def crash_point(name: str) -> None:
    """End the process here if this is the armed point and its n-th pass."""
    global _hits
    if _ARMED is None or _ARMED[0] != name:
        return
    _hits += 1
    if _hits >= _ARMED[1]:
        os._exit(CRASH_EXIT_CODE)
