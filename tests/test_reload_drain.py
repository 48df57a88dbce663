"""A config reload that restarts a connector loses no unit that connector has read. Its poll cut short by the restart
hands on the blocks it has already read (connectors/modbus/connector.py); a reset-on-read register was cleared by
that read, so those readings are the only copy of the parts. They, and whatever still waits in the core's inbox, are
applied with the wiring they were read under, before the new one takes over (gateway/reload.py). Red before: the
stopping connector's sink dropped them."""

from __future__ import annotations

import pytest
import yaml

from gateway.config import load_config
from gateway.reload import Reloader
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, wait_until


def _doc(store, port: int, *, poll_s: float = 0.05, max_rate: int = 200) -> dict:
    """m1: good on the reset-on-read holding register 300, scrap on the input register 1 (FC4): the blocks are read
    table by table, 300 first."""
    return {
        "gateway": IDENT, "mqtt": {"port": free_port()}, "store": {"path": str(store)},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": port, "unit_id": 1,
                        "poll_interval_s": poll_s, "timeout_s": 5}],
        "machines": [{"id": "m1", "reporting": {"interval_s": 600}, "counters": {
            "good": {"connector": "plc", "address": 300, "data_type": "uint16", "mode": "reset_on_read",
                     "max_rate": max_rate},
            "scrap": {"connector": "plc", "table": "input", "address": 1, "data_type": "uint16"}}}]}


def _good(gw) -> str | None:
    return gw.engines["m1"].snapshot().get("window", {}).get("q", {}).get("good")  # an empty window is left out


@pytest.mark.parametrize("change", ["connector", "machine"])
async def test_a_reload_applies_what_the_restarted_connector_has_read(tmp_path, change):
    """``connector``: the connector's poll interval changes (it restarts, the machine's engine stays); ``machine``:
    the counter's spec changes (the engine is rebuilt from the old one, the connector restarts with it)."""
    m = MachineModel("Press1", cycle_time=0.01, seed=21, counter_bits=16)
    path = tmp_path / "gw.yaml"
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as srv:
        doc = _doc(tmp_path / "gw.db", srv.port)
        path.write_text(yaml.safe_dump(doc))
        rgw = RunningGateway(load_config(path))
        gw = await rgw.start()
        release2 = None
        try:
            m.set_counters(good=m.good_raw + 5)
            await wait_until(lambda: _good(gw) == "5", 10)
            release = srv.hold(addresses=range(1, 2), function_code=4)  # the input register block stalls
            await wait_until(lambda: srv.held == 1, 10)
            m.set_counters(good=m.good_raw + 7)
            release.set()  # the stalled poll ends; the next one reads 300 (the 7 parts, clearing it), then stalls
            release2 = srv.hold(addresses=range(1, 2), function_code=4)
            await wait_until(lambda: srv._read_base[300] == m.good_raw and srv.held == 1, 10)
            assert _good(gw) == "5", "the 7 parts must still be in the held poll"
            if change == "connector":
                doc["connectors"][0]["poll_interval_s"] = 0.06
            else:
                doc["machines"][0]["counters"]["good"]["max_rate"] = 300
            path.write_text(yaml.safe_dump(doc))
            p = await Reloader(gw, str(path)).reload()
            assert p is not None and p.connectors_restarted == ["plc"]
            assert p.machines_changed == ([] if change == "connector" else ["m1"])
            release2.set()
            # the new connector reads 300 again: it was cleared, so nothing more comes from there
            await wait_until(lambda: gw.connectors["plc"].polls > 2, 10)
            assert _good(gw) == "12", "the parts read by the restarted connector's last poll were lost"
        finally:
            if release2 is not None:
                release2.set()
            await rgw.stop()
