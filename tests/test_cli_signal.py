"""`edge-gateway run`'s signal handling (gateway.cli.run_until_signal): a stop is bounded by its grace time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from gateway.cli import run_until_signal


async def test_a_task_that_ignores_its_cancellation_does_not_hold_the_stop_beyond_the_grace_time():
    """SIGTERM cancels the gateway's task and waits at most grace_s for it. A task that ignores the cancellation (a
    library that swallows it) must not keep the process alive (red before: asyncio.wait_for in Python 3.11 waits for
    the cancelled task to finish, here for ever)."""
    release = asyncio.Event()
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels += 1  # swallowed

    runner = asyncio.ensure_future(run_until_signal(stubborn, grace_s=0.3))
    await asyncio.sleep(0.1)  # the handlers are installed
    t0 = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(runner), 5)
        assert time.monotonic() - t0 < 2.0
        assert cancels >= 1
    finally:
        release.set()  # let the stubborn task end
        await asyncio.sleep(0.05)
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().remove_signal_handler(sig)
