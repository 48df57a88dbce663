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
