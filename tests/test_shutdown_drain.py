"""A gateway stopped cleanly (SIGTERM: an update, a reboot) loses no unit that it has read: samples still waiting in
the core's inbox when it stops are applied before the last commit. For a cumulative counter that only saves a re-read
(the counter is its own durable log), but a reset-on-read register was cleared by the read that delivered them."""

from __future__ import annotations

import json
import time

from gateway.config import parse_config
from gateway.store import Store
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, wait_until


def _config(store, srv, *, timeout_s: float, scrap_input: bool = False):
    """m1: good on the reset-on-read holding register 300; with ``scrap_input``, scrap on the input register 1 (FC4)."""
    counters = {"good": {"connector": "plc", "address": 300, "data_type": "uint16", "mode": "reset_on_read"}}
    if scrap_input:
        counters["scrap"] = {"connector": "plc", "table": "input", "address": 1, "data_type": "uint16"}
    return parse_config({
        "gateway": IDENT, "mqtt": {"port": free_port()}, "store": {"path": str(store)},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": srv.port, "unit_id": 1,
                        "poll_interval_s": 0.05, "timeout_s": timeout_s}],
        "machines": [{"id": "m1", "counters": counters, "reporting": {"interval_s": 600}}]}, "<test>")


async def _committed_good(store) -> str:
    """m1's good quantity in its open window, as committed in the store."""
    s = Store(str(store))
    await s.open()
    try:
        state = (await s.load_states())["m1"]
    finally:
        await s.close()
    state = json.loads(state) if isinstance(state, str) else state
    return state.get("window", {}).get("q", {}).get("good", "0")  # an empty window is left out


async def test_samples_queued_when_the_gateway_stops_are_in_its_last_commit(tmp_path, monkeypatch):
    import gateway.faults as faults

    m = MachineModel("Press1", cycle_time=0.01, seed=11, counter_bits=16)
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as srv:
        store = tmp_path / "gw.db"
        cfg = _config(store, srv, timeout_s=1)
        # the core stops taking its inbox from the moment the file exists (the connectors go on polling)
        freeze = tmp_path / "freeze"
        monkeypatch.setattr(faults, "_FREEZE", ("core.round", "hang"))
        monkeypatch.setattr(faults, "_FREEZE_FILE", str(freeze))
        rgw = RunningGateway(cfg)
        gw = await rgw.start()
        try:
            m.set_counters(good=m.good_raw + 5)
            await wait_until(lambda: gw.engines["m1"].window.q["good"] == 5, 10)
            freeze.touch()
            await wait_until(lambda: time.monotonic() - gw.core.heartbeat > 0.5, 10, message="the core did not stop")
            m.set_counters(good=m.good_raw + 7)
            # read (and cleared) by the polls: the 7 parts are only in the inbox now
            await wait_until(lambda: srv._read_base[300] == m.good_raw and gw.core.queued_samples > 0, 10)
        finally:
            await rgw.stop()
    assert await _committed_good(store) == "12", "parts read before the stop were not in the last commit"


async def test_a_poll_cut_short_by_the_stop_hands_on_the_blocks_it_has_read(tmp_path):
    """The gateway stops while a poll waits for its second block: the first block, already read, held a reset-on-read
    register (cleared by that read). Its readings go to the core, which applies them before the last commit. Red
    before: the poll's readings were dropped with the cancelled poll."""
    m = MachineModel("Press1", cycle_time=0.01, seed=12, counter_bits=16)
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as srv:
        store = tmp_path / "gw.db"
        # blocks are read table by table: the holding register 300 first, then the input register 1 (FC4)
        cfg = _config(store, srv, timeout_s=5, scrap_input=True)
        rgw = RunningGateway(cfg)
        gw = await rgw.start()
        try:
            m.set_counters(good=m.good_raw + 5)
            await wait_until(lambda: gw.engines["m1"].window.q["good"] == 5, 10)
            release = srv.hold(addresses=range(1, 2), function_code=4)  # the input register block stalls
            await wait_until(lambda: srv.held == 1, 10)
            m.set_counters(good=m.good_raw + 7)
            release.set()  # the poll that was stalled ends; the next one reads 300 (the 7 parts), then stalls
            release2 = srv.hold(addresses=range(1, 2), function_code=4)
            await wait_until(lambda: srv._read_base[300] == m.good_raw and srv.held == 1, 10)
        finally:
            await rgw.stop()
            release2.set()
    assert await _committed_good(store) == "12", "the parts of the cut-short poll were not in the last commit"
