"""Modbus byte orders (ABCD/CDAB/BADC/DCBA), coils and discrete inputs, float32 meters, per-block exceptions;
against the real pymodbus simulator (simulators/modbus_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
import structlog
from pymodbus.constants import ExcCodes

from connectors.base import TagBinding
from connectors.modbus.config import ModbusConnectorConfig, ModbusTagConfig
from connectors.modbus.connector import ModbusConnector, decode_registers
from gateway.component import Backoff, ComponentState
from simulators.machine import MachineModel
from simulators.modbus_server import ADDRESSES, ModbusMachineServer, layout_words
from tests.faults import Recorder, eventually, start_on_free_port

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


# ---------------------------------------------------------------------- pure decoding


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("data_type,value", [("uint32", 0x11223344), ("int32", -123456789), ("float32", 1234.5)])
def test_decode_each_layout(order: str, data_type: str, value: float) -> None:
    fmt = {"uint32": ">I", "int32": ">i", "float32": ">f"}[data_type]
    pattern = struct.unpack(">I", struct.pack(fmt, value))[0]
    regs = layout_words(pattern, order)
    assert decode_registers(regs, data_type, order) == value


def test_layout_words_by_hand() -> None:
    # 0x11223344: A=11 B=22 C=33 D=44
    assert decode_registers([0x1122, 0x3344], "uint32", "ABCD") == 0x11223344
    assert decode_registers([0x3344, 0x1122], "uint32", "CDAB") == 0x11223344
    assert decode_registers([0x2211, 0x4433], "uint32", "BADC") == 0x11223344
    assert decode_registers([0x4433, 0x2211], "uint32", "DCBA") == 0x11223344
    # 'big'/'little' keep meaning ABCD/CDAB; a byte-swapping order swaps 16-bit values too
    assert decode_registers([0x3344, 0x1122], "uint32", "little") == 0x11223344
    assert decode_registers([0x3412], "uint16", "BADC") == 0x1234
    assert decode_registers([0x1234], "uint16", "CDAB") == 0x1234
    assert decode_registers([0x7788, 0x5566, 0x3344, 0x1122], "uint64", "CDAB") == 0x1122334455667788
    assert decode_registers([0x2211, 0x4433, 0x6655, 0x8877], "uint64", "BADC") == 0x1122334455667788


def test_bit_tables_config() -> None:
    coil = ModbusTagConfig(address=7, table="coil")
    assert (coil.data_type, coil.count) == ("bool", 1)
    assert ModbusTagConfig(address=7, table="discrete_input", data_type="bool").table == "discrete_input"
    with pytest.raises(ValueError, match="a coil holds one bit: data_type must be 'bool'"):
        ModbusTagConfig(address=7, table="coil", data_type="uint32")
    with pytest.raises(ValueError, match="'bool' is read from a coil or discrete_input table"):
        ModbusTagConfig(address=7, table="holding", data_type="bool")
    with pytest.raises(ValueError, match="word_order does not apply"):
        ModbusTagConfig(address=7, table="coil", word_order="DCBA")
    assert ModbusTagConfig(address=0, data_type="float32", word_order="BADC").word_order == "BADC"


# ---------------------------------------------------------------------- against the simulator


@pytest.fixture
def model() -> MachineModel:
    return MachineModel("Press2", cycle_time=0.002, scrap_rate=0.1, seed=11)


@contextlib.asynccontextmanager
async def device(model: MachineModel) -> AsyncIterator[ModbusMachineServer]:
    srv = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port))
    try:
        yield srv
    finally:
        await srv.stop()


def make(port: int, names: list[str], sink: Recorder, **cfg: object) -> ModbusConnector:
    config = ModbusConnectorConfig.model_validate({"type": "modbus", "id": "press2-mb", "host": "127.0.0.1",
                                                   "port": port, "unit_id": 1, "poll_interval_s": 0.05,
                                                   "timeout_s": 0.5, **cfg})
    tags = [TagBinding(n, ModbusTagConfig.model_validate(ADDRESSES[n])) for n in names]
    return ModbusConnector(config, tags, sink, backoff=Backoff(initial=0.05, maximum=0.2))


@contextlib.asynccontextmanager
async def running(conn: ModbusConnector) -> AsyncIterator[None]:
    task = asyncio.create_task(conn.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)


async def test_every_layout_bits_and_float_meter(model: MachineModel) -> None:
    names = [f"good_{o}" for o in ORDERS] + [f"material_{o}" for o in ORDERS] + [
        "running_coil", "complete_coil", "running_input", "complete_input"]
    async with device(model) as srv:
        sink = Recorder()
        conn = make(srv.port, names, sink)
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
            await eventually(lambda: sink.value("running_coil") is False, what="flags")
            model.set_order("4711", "0010")
            await model.produce(123)  # ends paused ("idle")
            model.set_state("running")
            expect_material = struct.unpack(">f", struct.pack(">f", model.good_raw * 0.25))[0]
            await eventually(lambda: all(sink.value(f"good_{o}") == model.good_raw for o in ORDERS)
                             and all(sink.value(f"material_{o}") == expect_material for o in ORDERS)
                             and sink.value("running_coil") is True and sink.value("running_input") is True,
                             what="every layout decoded to the model's value")
            assert model.good_raw > 100 and isinstance(sink.value("material_DCBA"), float)
            assert sink.value("complete_coil") is False
            model.complete_operation()
            await eventually(lambda: sink.value("complete_coil") is True and sink.value("complete_input") is True,
                             what="complete flag via FC1 and FC2")
            read = await conn.read(["complete_input", "good_DCBA"])
            assert [s.value for s in read] == [True, model.good_raw]
        tables = sorted({b.table for b in conn.blocks})
        assert tables == ["coil", "discrete_input", "holding"]


async def test_exception_on_one_block_keeps_the_others_polling(model: MachineModel) -> None:
    names = ["good_ABCD", "material_CDAB", "running_coil", "complete_coil"]
    async with device(model) as srv:
        sink = Recorder()
        conn = make(srv.port, names, sink, max_gap_registers=0)  # 100..101 and 112..113: two blocks
        assert [(b.table, b.start, b.count) for b in conn.blocks] == [
            ("coil", 3200, 2), ("holding", 100, 2), ("holding", 112, 2)]
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
                srv.set_exception(ExcCodes.DEVICE_FAILURE, addresses=range(3200, 3201), function_code=1)
                await eventually(lambda: not sink.last["running_coil"].good, what="the coil block failing")
                status = sink.last["complete_coil"].status
                assert status == "ReadFailed: exception 4 (DEVICE_FAILURE) for FC1 address 3200 count 2"
                n = len(sink.batches)
                await model.produce(40)
                await eventually(lambda: sink.value("good_ABCD") == model.good_raw and len(sink.batches) > n + 3,
                                 what="the register blocks still polled")
                assert sink.value("material_CDAB") == pytest.approx(model.good_raw * 0.25)
                assert all(not s.good for b in sink.batches[n:] for s in b if s.key.endswith("_coil"))
                assert conn.status.state == ComponentState.DEGRADED
                assert "FC1 address 3200" in (conn.status.last_error or "")
                srv.set_exception(None)
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="recovered")
        failed = [e for e in logs if e["event"] == "modbus.read_failed"]
        assert len(failed) == 1
        f = failed[0]
        assert (f["endpoint"], f["unit"], f["function_code"], f["address"], f["count"]) == (
            f"127.0.0.1:{srv.port}/1", 1, 1, 3200, 2)
        assert f["error"] == "exception 4 (DEVICE_FAILURE) for FC1 address 3200 count 2"
        assert [e["event"] for e in logs].count("modbus.recovered") == 1


async def test_exceptions_on_two_blocks_are_each_reported(model: MachineModel) -> None:
    """Two blocks refused in the same poll: one modbus.read_failed line each, with its own function code, address and
    exception (the second block's were only in the first line's block list)."""
    async with device(model) as srv:
        sink = Recorder()
        conn = make(srv.port, ["good_ABCD", "material_CDAB", "running_coil"], sink, max_gap_registers=0)
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
                srv.set_exception(ExcCodes.DEVICE_FAILURE, addresses=range(3200, 3201), function_code=1)
                srv.set_exception(ExcCodes.DEVICE_BUSY, addresses=range(112, 113), function_code=3)
                await eventually(lambda: not sink.last["running_coil"].good and not sink.last["material_CDAB"].good,
                                 what="both blocks failing")
                assert sink.last["good_ABCD"].good
        failed = sorted((e["function_code"], e["address"], e["count"], e["blocks"], e["error"], e["unit"])
                        for e in logs if e["event"] == "modbus.read_failed")
        assert failed == [
            (1, 3200, 1, ["coil[3200..3200]"], "exception 4 (DEVICE_FAILURE) for FC1 address 3200 count 1", 1),
            (3, 112, 2, ["holding[112..113]"], "exception 6 (DEVICE_BUSY) for FC3 address 112 count 2", 1),
        ]


async def test_rtu_framing_over_tcp(model: MachineModel) -> None:
    """A serial-to-Ethernet converter speaks RTU frames (unit + PDU + CRC) over TCP, not the MBAP header."""
    srv = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port, framing="rtu"))
    try:
        model.set_counters(good=777, scrap=5)
        sink = Recorder()
        conn = make(srv.port, ["good_CDAB", "running_coil"], sink, framing="rtu")
        async with running(conn):
            await eventually(lambda: sink.value("good_CDAB") == 777 and sink.value("running_coil") is False,
                             what="values over RTU framing")
            read = await conn.read(["good_CDAB"])
            assert read[0].value == 777
        wrong = make(srv.port, ["good_CDAB"], Recorder(), framing="tcp", timeout_s=0.3)
        samples = await wrong.poll_once()
        assert not samples[0].good
        from tests.test_cli_tools import edge_gateway

        rc, out, _ = await edge_gateway("probe", "modbus", "127.0.0.1", "--port", str(srv.port), "--framing", "rtu",
                                        "--address", "102", "--count", "2", "--type", "uint32", "--word-order", "CDAB")
        assert rc == 0 and out.splitlines()[-1] == "uint32 CDAB @102: 777"
    finally:
        await srv.stop()
