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


# --- freeze points: a core that stops making progress (the watchdog test) ------------------------------------------
#
# ``EDGE_GATEWAY_FREEZE_AT=<point>:<mode>`` freezes the code at ``await freeze_point("<point>")``, from the first pass
# after the file named by ``EDGE_GATEWAY_FREEZE_FILE`` exists (at the first pass when that variable is not set):
#
# - ``hang``  the task awaits forever; the rest of the process runs on (a core stuck in an await, e.g. a hung commit)
# - ``block`` the thread sleeps forever, synchronously: the whole event loop stops (a core stuck in a computation)
#
# Points: ``core.round`` (the top of each round of the core loop, before its heartbeat).

FREEZE_POINTS = ("core.round",)
FREEZE_MODES = ("hang", "block")


def _parse_freeze(spec: str | None) -> tuple[str, str] | None:
    if not spec:
        return None
    name, _, mode = spec.partition(":")
    if name not in FREEZE_POINTS or (mode or "hang") not in FREEZE_MODES:
        raise SystemExit(f"EDGE_GATEWAY_FREEZE_AT: expected <point>:<mode> with point one of {', '.join(FREEZE_POINTS)}"
                         f" and mode one of {', '.join(FREEZE_MODES)}, got {spec!r}")
    return name, mode or "hang"


_FREEZE = _parse_freeze(os.environ.get("EDGE_GATEWAY_FREEZE_AT"))
_FREEZE_FILE = os.environ.get("EDGE_GATEWAY_FREEZE_FILE")


async def freeze_point(name: str) -> None:
    """Freeze here if this is the armed freeze point (and its trigger file exists). Unarmed: returns at once."""
    if _FREEZE is None or _FREEZE[0] != name or (_FREEZE_FILE and not os.path.exists(_FREEZE_FILE)):
        return
    import asyncio
    import sys
    import time

    print(f"EDGE_GATEWAY_FREEZE_AT: frozen at {name} ({_FREEZE[1]})", file=sys.stderr, flush=True)
    if _FREEZE[1] == "block":
        while True:
            time.sleep(3600)  # noqa: ASYNC251 - on purpose: this freeze blocks the event loop
    await asyncio.Event().wait()
