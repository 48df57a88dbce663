"""A changeover's cut read and registers the device clears when they are read (``reset_on_read``): every value such
a read returned is counted, whoever asked for it. Against the real Modbus simulator (simulators/modbus_server.py).

Red before: the cut read of m1 read the whole block, which also held m2's reset-on-read register; the device cleared
it and only m1's keys were returned (m2's parts lost). And a cut attempt that failed on another block (the device
busy there) was discarded whole, though it had read (and cleared) the machine's reset-on-read register: the parts of
every attempt were lost. Found by an outside review."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pymodbus.constants import ExcCodes

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.runtime import Gateway
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from tests.e2e import IDENT
from tests.faults import start_on_free_port


def _gateway(tmp: Path, port: int, machines: list[dict]) -> Gateway:
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp / "gw.db")},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": port, "unit_id": 1,
                        "timeout_s": 2}],
        "machines": machines}, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    return gw


def _rr(address: int, data_type: str = "uint16") -> dict:
    return {"connector": "plc", "address": address, "data_type": data_type, "mode": "reset_on_read"}


def _run_inbox(gw: Gateway) -> None:
    core = gw.core
    while core.inbox:
        core._handle(core.inbox.popleft())


def _booked(gw: Gateway, machine: str) -> int:
    return int(gw.core.engines[machine].window.q["good"])


async def test_a_cut_read_hands_on_the_cleared_register_of_another_machine_in_its_block(tmp_path):
    model = MachineModel("P", cycle_time=0.002, seed=1)
    server = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port, unit_id=1))
    gw = _gateway(tmp_path, server.port, [{"id": "m1", "counters": {"good": _rr(301, "uint32")}},
                                          {"id": "m2", "counters": {"good": _rr(300)}}])
    conn = gw.connectors["plc"]
    assert len(conn.blocks) == 1
    made = 0
    try:
        await conn.poll_once()
        _run_inbox(gw)
        for step in range(3):
            model.set_counters(good=model.good_raw + 5)
            made += 5
            if step == 1:  # m1's changeover: the core's cut read of m1's keys
                cut = await conn.read(["m1/good"], timeout=2)
                assert [s.key for s in cut] == ["m1/good"]
                gw.core.on_samples(cut)
            await conn.poll_once()
            _run_inbox(gw)
    finally:
        conn._drop(conn._client, "test over", backoff=False)
        await server.stop()
    assert (_booked(gw, "m1"), _booked(gw, "m2")) == (made, made)


async def test_a_failed_cut_attempt_counts_the_reset_on_read_value_it_read(tmp_path):
    model = MachineModel("P", cycle_time=0.002, seed=1)
    server = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port, unit_id=1))
    gw = _gateway(tmp_path, server.port, [{"id": "m1", "counters": {
        "good": _rr(300), "scrap": {"connector": "plc", "address": 1, "data_type": "uint16"}}}])
    conn = gw.connectors["plc"]
    assert len(conn.blocks) == 2
    made = 0
    try:
        await conn.poll_once()
        _run_inbox(gw)
        server.set_exception(ExcCodes.DEVICE_BUSY, addresses=range(0, 24))  # the scrap module is busy a while
        cut = asyncio.create_task(gw.core._cut_read("m1"))  # the changeover's phase one: retried until good
        for _ in range(4):
            model.set_counters(good=model.good_raw + 5)
            made += 5
            await asyncio.sleep(0.3)  # cut attempts, each reading (and clearing) register 300
            await conn.poll_once()
            _run_inbox(gw)
        assert gw.core.stats.cut_read_failures >= 1
        server.set_exception(None)
        await asyncio.wait_for(cut, 5)
        _run_inbox(gw)  # the cut (CutDone)
        await conn.poll_once()
        _run_inbox(gw)
    finally:
        conn._drop(conn._client, "test over", backoff=False)
        await server.stop()
    assert _booked(gw, "m1") == made


async def test_a_cut_attempt_cut_short_by_a_lost_link_hands_on_what_it_read(tmp_path):
    """The link fails at the second block of the attempt (a timeout): the first block's reset-on-read value goes to
    the core as a reading before the error is raised."""
    model = MachineModel("P", cycle_time=0.002, seed=1)
    server = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port, unit_id=1))
    gw = _gateway(tmp_path, server.port, [{"id": "m1", "counters": {
        "good": _rr(300), "scrap": {"connector": "plc", "address": 1, "data_type": "uint16", "table": "input"}}}])
    conn = gw.connectors["plc"]
    try:
        await conn.poll_once()
        _run_inbox(gw)
        model.set_counters(good=model.good_raw + 7)
        release = server.hold(addresses=range(1, 2), function_code=4)  # the input register block never answers
        try:
            try:
                await conn.read(["m1/good", "m1/scrap"], timeout=0.5)
            except Exception as exc:  # noqa: BLE001 - the attempt fails: ConnectorUnavailable
                assert "timed out" in str(exc)
            else:
                raise AssertionError("the read should have failed")
        finally:
            release.set()
        _run_inbox(gw)
    finally:
        conn._drop(conn._client, "test over", backoff=False)
        await server.stop()
    assert _booked(gw, "m1") == 7
