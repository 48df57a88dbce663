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


async def test_samples_queued_when_the_gateway_stops_are_in_its_last_commit(tmp_path, monkeypatch):
    import gateway.faults as faults

    m = MachineModel("Press1", cycle_time=0.01, seed=11, counter_bits=16)
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as srv:
        store = tmp_path / "gw.db"
        cfg = parse_config({
            "gateway": IDENT, "mqtt": {"port": free_port()}, "store": {"path": str(store)},
            "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": srv.port, "unit_id": 1,
                            "poll_interval_s": 0.05, "timeout_s": 1}],
            "machines": [{"id": "m1", "counters": {
                "good": {"connector": "plc", "address": 300, "data_type": "uint16", "mode": "reset_on_read"}},
                "reporting": {"interval_s": 600}}]}, "<test>")
        # the core stops taking its inbox from the moment the file exists (the connectors go on polling)
        freeze = tmp_path / "freeze"
        monkeypatch.setattr(faults, "_FREEZE", ("core.round", "hang"))
        monkeypatch.setattr(faults, "_FREEZE_FILE", str(freeze))
        rgw = RunningGateway(cfg)
        gw = await rgw.start()
        try:
            m.set_counters(good=m.good_raw + 5)
            await wait_until(lambda: gw.engines["m1"].snapshot()["window"]["q"].get("good") == "5", 10)
            freeze.touch()
            await wait_until(lambda: time.monotonic() - gw.core.heartbeat > 0.5, 10, message="the core did not stop")
            m.set_counters(good=m.good_raw + 7)
            # read (and cleared) by the polls: the 7 parts are only in the inbox now
            await wait_until(lambda: srv._read_base[300] == m.good_raw and gw.core.queued_samples > 0, 10)
        finally:
            await rgw.stop()
    s = Store(str(store))
    await s.open()
    try:
        state = (await s.load_states())["m1"]
    finally:
        await s.close()
    state = json.loads(state) if isinstance(state, str) else state
    assert state["window"]["q"]["good"] == "12", "parts read before the stop were not in the last commit"
