"""Shared pytest fixtures. Keep each fixture small and documented; add new ones in their own section."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.broker import MosquittoBroker, find_mosquitto


# --- MQTT broker ---------------------------------------------------------------------------------------------------

@pytest.fixture
def mqtt_broker(tmp_path) -> Iterator[MosquittoBroker]:
    """A started mosquitto on a free loopback port (own process, own config); stopped at teardown.

    Persistence is on, so sessions of subscribers with a fixed client id (the ERP consumer) survive a clean broker
    restart, as they would in production; a SIGKILL loses what was not saved, as it would in production.

    ``mqtt_broker.stop()`` / ``.kill()`` / ``.start()`` simulate outages on the same port; ``.log_text()`` shows the
    broker's log. Fails (does not skip) when mosquitto is not installed.
    """
    try:
        find_mosquitto()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    broker = MosquittoBroker(tmp_path / "mosquitto", persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


# --- ERP conflicts: checked after every test that started an ErpConsumer -----------------------------------------

def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "erp_conflicts_expected: the test creates ERP conflicts on purpose")


@pytest.fixture(autouse=True)
def _no_erp_conflicts(request, monkeypatch):
    """Safety net behind ``tests.e2e.assert_ledger_matches``: after any test that started an ``ErpConsumer``, the
    consumer must have recorded no conflict (two versions of one event), unless the test is marked
    ``erp_conflicts_expected``. Fails the test at teardown with the conflicts."""
    from simulators.erp import ErpConsumer

    started: list[ErpConsumer] = []
    start = ErpConsumer.start

    async def recording_start(self, *args, **kwargs):
        started.append(self)
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(ErpConsumer, "start", recording_start)
    yield
    if request.node.get_closest_marker("erp_conflicts_expected") is None:
        conflicts = [c for erp in started for c in erp.conflicts()]
        assert not conflicts, f"the ERP recorded {len(conflicts)} conflict(s), first: {conflicts[:3]}"


# --- PostgreSQL: a throwaway database per test ---------------------------------------------------------------------

@pytest.fixture
async def dsn():
    """The DSN of a fresh database on the local PostgreSQL, dropped at teardown (``erp_service.testing``)."""
    from erp_service.testing import throwaway_database  # psycopg only for the tests that ask for a database

    async with throwaway_database() as d:
        yield d


# --- the event loop of in-process tests ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def event_loop_policy():
    """asyncio's own loop by default; ``EDGE_GATEWAY_TEST_LOOP=uvloop`` runs the in-process tests on uvloop, the loop
    ``edge-gateway run`` uses by default (gateway/loops.py; its subprocess tests run on it either way)."""
    import asyncio
    import os

    if os.environ.get("EDGE_GATEWAY_TEST_LOOP") == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
