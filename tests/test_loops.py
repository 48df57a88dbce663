"""The event-loop choice of ``edge-gateway run`` (gateway/loops.py); the process itself on each loop:
tests/test_logs.py::test_gateway_run_logs_paho_and_its_own_events_as_json."""

import asyncio
import importlib.util

import pytest

from gateway import loops


def test_auto_is_uvloop_where_it_is_installed_and_asyncio_where_it_is_not(monkeypatch):
    assert loops.resolve("auto") == "uvloop"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert loops.resolve("auto") == "asyncio"
    assert loops.factory("auto") is None
    with pytest.raises(loops.LoopUnavailable, match="--event-loop asyncio"):
        loops.resolve("uvloop")  # asked for by name: no silent fallback
    assert loops.resolve("asyncio") == "asyncio"


def test_run_runs_the_coroutine_on_the_chosen_loop():
    async def which() -> str:
        await asyncio.sleep(0)
        return loops.running_name()

    assert loops.run(which(), loop="uvloop") == "uvloop"
    assert loops.run(which(), loop="asyncio") == "asyncio"
    with pytest.raises(ValueError, match="unknown event loop"):
        loops.resolve("trio")
