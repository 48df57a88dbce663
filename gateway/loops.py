"""The event loop a gateway process runs on: uvloop (libuv's loop, a maintained drop-in for asyncio's) by default
where it is installed, asyncio's own selector loop on request or where it is not (e.g. Windows).

Why: at the Node-RED peer's load (10,000 Modbus tags @ 1 s, 667 reports/s) the event loop's own work (the
selector, handles, transports, the self-pipe of SQLite's thread) is a large share of the main thread; uvloop cut
the gateway's CPU per polled tag by about a tenth (bench/README.md, ninth session). Every library the gateway uses
(pymodbus, asyncua, aiosqlite, aiohttp, nats-py, and the paho driver's add_reader / add_writer) runs on both; the
suite's subprocess tests run the gateway on the default, its in-process tests on asyncio's loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


class LoopUnavailable(RuntimeError):
    """``uvloop`` was asked for and cannot be imported."""


def resolve(name: str) -> str:
    """``auto`` → ``uvloop`` if it can be imported, else ``asyncio``; ``uvloop`` must be importable."""
    if name not in CHOICES:
        raise ValueError(f"unknown event loop {name!r}: one of {', '.join(CHOICES)}")
    if name == "asyncio":
        return name
    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    if name == "uvloop":
        raise LoopUnavailable("--event-loop uvloop: the uvloop package is not installed "
                              "(pip install uvloop, or use --event-loop asyncio)")
    return "asyncio"


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``asyncio.Runner`` (None: asyncio's default)."""
    if resolve(name) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    with asyncio.Runner(loop_factory=factory(loop)) as runner:
        return runner.run(main)


def running_name() -> str:
    """``uvloop`` or ``asyncio``: the loop the calling coroutine runs on (for the start log line)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
