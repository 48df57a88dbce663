"""ModbusConnector: pure decoding and block planning, then against the real pymodbus simulator."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import struct
import time
import types
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import structlog
from pymodbus.constants import ExcCodes

import connectors.modbus.connector as modbus_connector
from connectors.base import TagBinding
from connectors.errors import ConnectorUnavailable, ReadFailed
from connectors.modbus.config import ModbusConnectorConfig, ModbusTagConfig
from connectors.modbus.connector import (
    MAX_GAP,
    ModbusConnector,
    decode_registers,
    plan_blocks,
)
from gateway.component import Backoff, ComponentState
from mappings.samples import Readings
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.faults import BlackHole, Recorder, eventually, restart, start_on_free_port

# ---------------------------------------------------------------------- decoding (pure)

# (data_type, registers in big word order, expected value); little word order = the words reversed
NUMBERS = [
    ("uint16", [0x0000], 0),
    ("uint16", [0xFFFF], 65535),
    ("int16", [0x7FFF], 32767),
    ("int16", [0x8000], -32768),
    ("int16", [0xFFFE], -2),
    ("uint32", [0x1234, 0x5678], 0x12345678),
    ("uint32", [0xFFFF, 0xFFFF], 2**32 - 1),
    ("uint32", [0x0001, 0x0000], 65536),
    ("int32", [0xFFFF, 0xFFFE], -2),
    ("int32", [0x8000, 0x0000], -(2**31)),
    ("int32", [0x0000, 0xFFFF], 65535),
    ("uint64", [0x0102, 0x0304, 0x0506, 0x0708], 0x0102030405060708),
    ("uint64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], 2**64 - 1),
    ("int64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], -1),
    ("int64", [0x8000, 0x0000, 0x0000, 0x0000], -(2**63)),
    ("float32", [0x3FC0, 0x0000], 1.5),
    ("float32", [0xC2F6, 0xE979], -123.45600128173828),
    ("float64", [0xC004, 0x0000, 0x0000, 0x0000], -2.5),
    ("float64", [0x4093, 0x4A44, 0x9BA5, 0xE354], 1234.567),
]


@pytest.mark.parametrize("data_type,regs,expected", NUMBERS)
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_decode_numbers(data_type: str, regs: list[int], expected: float, word_order: str) -> None:
    words = regs if word_order == "big" else regs[::-1]
    value = decode_registers(words, data_type, word_order)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "regs,expected",
    [
        ([0x3437, 0x3131, 0x0000, 0x0000], "4711"),  # NUL padded
        ([0x4142, 0x4344], "ABCD"),  # full length, no terminator
        ([0x2020, 0x5831, 0x2020], "X1"),  # space padded both sides
        ([0x4100, 0x4242], "A"),  # cut at the first NUL
        ([0x0000, 0x0000], ""),
        ([0x4142, 0x4320], "ABC"),  # odd length, high byte first
    ],
)
def test_decode_strings(regs: list[int], expected: str) -> None:
    assert decode_registers(regs, "string", length=len(regs)) == expected
    assert decode_registers(regs, "string", "little", length=len(regs)) == expected  # word order does not apply


def test_decode_rejects_wrong_register_count() -> None:
    with pytest.raises(ValueError):
        decode_registers([1], "uint32")


# ---------------------------------------------------------------------- block planning (pure)


def tb(key: str, address: int, data_type: str = "uint16", table: str = "holding", length: int | None = None) -> TagBinding:
    return TagBinding(key, ModbusTagConfig(address=address, data_type=data_type, table=table, length=length))


def spans(blocks: list) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table, b.start, b.count, [s.key for s in b.slots]) for b in blocks]


def test_plan_merges_adjacent_and_close_tags_per_table() -> None:
    tags = [
        tb("good", 0, "uint32"),
        tb("scrap", 2, "uint32"),
        tb("state", 4),
        tb("order", 10, "string", length=10),  # gap of 5 registers: merged
        tb("far", 20 + MAX_GAP + 1),  # gap of MAX_GAP + 1: a new block
        tb("in_a", 0, table="input"),
        tb("in_b", 1, "float32", table="input"),
    ]
    assert spans(plan_blocks(tags, 120)) == [
        ("holding", 0, 20, ["good", "scrap", "state", "order"]),
        ("holding", 29, 1, ["far"]),
        ("input", 0, 3, ["in_a", "in_b"]),
    ]
    blocks = plan_blocks(tags, 120)
    assert [s.offset for s in blocks[0].slots] == [0, 2, 4, 10]
    assert not blocks[0].gapless and blocks[1].gapless and blocks[2].gapless


def test_plan_respects_max_block_size_and_gap_limit() -> None:
    tags = [tb(f"t{i}", i * 2, "uint32") for i in range(10)]  # registers 0..19, contiguous
    assert [(b.start, b.count) for b in plan_blocks(tags, 8)] == [(0, 8), (8, 8), (16, 4)]
    assert [(b.start, b.count) for b in plan_blocks(tags, 120)] == [(0, 20)]
    exact = [tb("a", 0), tb("b", MAX_GAP + 1)]  # gap of exactly MAX_GAP
    assert len(plan_blocks(exact, 120)) == 1
    assert len(plan_blocks(exact, 120, max_gap=0)) == 2


def test_plan_overlapping_tags_and_large_tags() -> None:
    tags = [tb("u32", 0, "uint32"), tb("hi", 0), tb("lo", 1), tb("again", 0, "uint32"), tb("big", 2, "string", length=125)]
    blocks = plan_blocks(tags, 120)
    # one read of 0..1 feeds four tags; a 125-register tag gets a block of its own
    assert spans(blocks) == [("holding", 0, 2, ["hi", "u32", "again", "lo"]), ("holding", 2, 125, ["big"])]
    assert blocks[0].gapless


def test_one_block_feeds_many_tags() -> None:
    tags = [tb("g", 0, "uint32"), tb("s", 2, "int32"), tb("state", 4), tb("f", 5, "float32")]
    (block,) = plan_blocks(tags, 120)
    regs = [0x0001, 0x0002, 0xFFFF, 0xFFFF, 2, 0x3FC0, 0x0000]
    raw = struct.pack(">7H", *regs)
    assert [s.decode(raw, regs) for s in block.slots] == [65538, -1, 2, 1.5]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=0xFFFF), min_size=9, max_size=9))
def test_plain_uint16_registers_skip_the_decoder_with_the_same_values(regs: list[int]) -> None:
    """A plain uint16 register (``TagSlot.direct``) is the register itself; every other layout and type in the same
    block still goes through its decoder, and both agree with the decoders on any register values."""
    tags = [tb("a", 0), tb("i16", 1, "int16"), tb("u32", 2, "uint32"), tb("b", 4), tb("s", 5, "string", length=2),
            TagBinding("badc", ModbusTagConfig(address=7, word_order="BADC")), tb("c", 8)]
    (block,) = plan_blocks(tags, 120)
    assert {s.key: s.direct for s in block.slots} == {
        "a": True, "i16": False, "u32": False, "b": True, "s": False, "badc": False, "c": True}
    assert not block.direct and plan_blocks([tb("a", 0), tb("c", 1)], 120)[0].direct
    raw = struct.pack(">9H", *regs)
    # _decode uses its connector only for the changed-only filter (off here)
    got = {smp.key: smp.value for smp in ModbusConnector._decode(None, block, regs, 1.0)}  # type: ignore[arg-type]
    assert got == {s.key: s.decode(raw, regs) for s in block.slots}
    assert got["badc"] == ((regs[7] & 0xFF) << 8) | (regs[7] >> 8)
    (direct_block,) = plan_blocks([tb("a", 0), tb("c", 1)], 120)
    assert [smp.value for smp in ModbusConnector._decode(None, direct_block, regs[:2], 1.0)] == regs[:2]  # type: ignore[arg-type]


@pytest.mark.parametrize("data_type", ["uint16", "int16"])  # a direct block, and one through the decoders
def test_changed_only_decode_hands_on_changed_tags_and_a_heartbeat(data_type: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = plan_blocks([tb(f"t{i}", i, data_type) for i in range(5)], 120)
    assert block.direct == (data_type == "uint16")
    conn = make_connector(free_port(), [], Recorder())  # never connected: only what _decode keeps between polls

    def decode(regs: list[int]) -> list[tuple[str, object]]:
        return [(smp.key, smp.value) for smp in conn._decode(block, regs, 1.0, changed_only=True)]

    assert decode([1, 2, 3, 4, 5]) == [("t0", 1), ("t1", 2), ("t2", 3), ("t3", 4), ("t4", 5)]
    assert decode([1, 2, 3, 4, 5]) == []
    assert decode([1, 2, 9, 4, 6]) == [("t2", 9), ("t4", 6)]
    monkeypatch.setattr(modbus_connector, "HEARTBEAT_S", 0.0)
    assert [k for k, _ in decode([1, 2, 9, 4, 6])] == ["t0", "t1", "t2", "t3", "t4"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([[0, 1, 2, 3, 4], [0, 2, 3, 7, 8]]),  # a gapless block (the registers are the values as
       # they are) and one with gaps (picked by offset)
       st.lists(st.lists(st.integers(min_value=0, max_value=3), min_size=9, max_size=9), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6),
       st.lists(st.booleans(), min_size=5, max_size=5))  # which tags count every value (reset-on-read, delta)
def test_a_poll_s_runs_are_the_samples_of_the_changed_only_decode(addresses: list[int], polls: list[list[int]],
                                                                  heartbeat: list[bool], every: list[bool]) -> None:
    """A block of plain registers reaches the core as a run (``Readings``, keys and values in columns): the same
    readings, in the same order, as ``_decode`` with ``changed_only`` gives as ``Sample`` objects, poll after poll
    (unchanged registers, every tag again at a heartbeat, a tag whose every value counts at every poll)."""
    (block,) = plan_blocks([TagBinding(f"t{a}", ModbusTagConfig(address=a), every_value=e)
                            for a, e in zip(addresses, every)], 120)
    assert block.direct and block.contiguous == (addresses == [0, 1, 2, 3, 4])
    by_runs, by_samples = make_connector(free_port(), [], Recorder()), make_connector(free_port(), [], Recorder())
    for regs, beat in zip(polls, heartbeat):
        regs = regs[:block.count]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(modbus_connector, "HEARTBEAT_S", 0.0 if beat else 10.0)
            readings = Readings()
            by_runs._run(readings, block, list(regs), 5.0)
            expected = by_samples._decode(block, list(regs), 5.0, changed_only=True)
        got = list(readings)
        assert {s.key for s in got} >= {f"t{a}" for a, e in zip(addresses, every) if e}  # changed or not
        assert len(readings) == len(expected)
        assert [(s.key, s.value, s.good, s.recv_time, s.source_time, s.status) for s in got] == \
            [(s.key, s.value, s.good, s.recv_time, s.source_time, s.status) for s in expected]
        assert all(s.mono is not None for s in got)


def test_responses_decode_into_quiet_classes_with_the_same_values() -> None:
    """The client's decoder builds our response subclasses (short ``str()``: pymodbus formats every decoded response
    for a debug line): same registers and bits, and a string without the register list."""
    from pymodbus.pdu.decoders import DecodePDU

    from connectors.modbus.connector import QUIET_RESPONSES

    decoder = DecodePDU(is_server=False)
    for cls in QUIET_RESPONSES:
        decoder.register(cls)
    regs = decoder.decode(bytes([3, 6, 0, 1, 0xFF, 0xFF, 0x12, 0x34]))
    assert type(regs).__name__ == "QuietReadHoldingRegistersResponse" and regs.registers == [1, 0xFFFF, 0x1234]
    assert "1234" not in str(regs) and "4660" not in str(regs) and str(regs).startswith("ReadHoldingRegistersResponse(")
    bits = decoder.decode(bytes([1, 1, 0b101]))
    assert type(bits).__name__ == "QuietReadCoilsResponse" and bits.bits[:3] == [True, False, True]
    assert decoder.decode(bytes([4, 2, 0, 7])).registers == [7]
    assert decoder.decode(bytes([2, 1, 1])).bits[0] is True


# ---------------------------------------------------------------------- against the simulator


async def start_server(model: MachineModel) -> ModbusMachineServer:
    return await start_on_free_port(lambda port: ModbusMachineServer(model, port=port, unit_id=1))


@pytest.fixture
def model() -> MachineModel:
    return MachineModel("Press2", cycle_time=0.002, scrap_rate=0.2, seed=3)


@pytest.fixture
async def server(model: MachineModel) -> AsyncIterator[ModbusMachineServer]:
    srv = await start_server(model)
    try:
        yield srv
    finally:
        await srv.stop()


def make_connector(port: int, tags: list[TagBinding], sink: Recorder, **cfg: object) -> ModbusConnector:
    config = ModbusConnectorConfig.model_validate(
        {
            "type": "modbus",
            "id": "press2-mb",
            "host": "127.0.0.1",
            "port": port,
            "unit_id": 1,
            "poll_interval_s": 0.05,
            "timeout_s": 0.5,
            **cfg,
        }
    )
    return ModbusConnector(config, tags, sink, backoff=Backoff(initial=0.05, maximum=0.2))


def press_tags(table: str = "holding", bits: int = 32) -> list[TagBinding]:
    t = "uint32" if bits == 32 else "uint16"
    scrap = 2 if bits == 32 else 1
    return [
        tb("press-2/good", 0, t, table),
        tb("press-2/scrap", scrap, t, table),
        tb("press-2/state", 4, "uint16", table),
        tb("press-2/order", 10, "string", table, length=10),
    ]


@contextlib.asynccontextmanager
async def running(conn: ModbusConnector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run(), name="connector")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)


async def test_samples_follow_the_model(model: MachineModel, server: ModbusMachineServer) -> None:
    sink = Recorder()
    conn = make_connector(server.port, press_tags(), sink)
    assert len(conn.blocks) == 1  # counters, state and order: one read per poll
    async with running(conn):
        await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
        model.set_order("4711", "0010")
        await model.produce(100)
        await eventually(
            lambda: (sink.value("press-2/good"), sink.value("press-2/scrap")) == (model.good_raw, model.scrap_raw),
            what="counters to match the model",
        )
        assert model.scrap_raw > 0 and model.good_raw + model.scrap_raw == 100
        assert sink.value("press-2/order") == "4711" and sink.value("press-2/state") == 0
        # every poll: ONE sink call; the first carries every tag, later ones the tags whose registers changed
        assert sorted(s.key for s in sink.batches[0]) == sorted(t.key for t in press_tags())
        assert all({s.key for s in b} <= {t.key for t in press_tags()} and len({s.key for s in b}) == len(b)
                   for b in sink.batches)
        last = sink.last["press-2/good"]
        assert last.good and last.status == "Good" and last.source_time is None
        goods = [s.value for b in sink.batches for s in b if s.key == "press-2/good"]
        assert goods == sorted(goods)


@pytest.mark.parametrize("table", ["holding", "input"])
async def test_16_bit_counters_and_rollover(table: str) -> None:
    model = MachineModel("Press2", cycle_time=0.002, scrap_rate=0.0, seed=1, counter_bits=16, start_good=65530)
    server = await start_server(model)
    try:
        sink = Recorder()
        conn = make_connector(server.port, press_tags(table, bits=16), sink)
        async with running(conn):
            await eventually(lambda: sink.value("press-2/good") == 65530, what="initial value")
            await model.produce(10)
            await eventually(lambda: sink.value("press-2/good") == 4, what="the wrapped value")
            (s,) = await conn.read(["press-2/good"])
            assert s.value == model.good_raw == 4
    finally:
        await server.stop()


async def test_exception_response_fails_the_block_not_the_connection(
    model: MachineModel, server: ModbusMachineServer
) -> None:
    sink = Recorder()
    conn = make_connector(server.port, press_tags(), sink)
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
            server.set_exception(ExcCodes.DEVICE_BUSY)
            await eventually(lambda: not sink.last["press-2/good"].good, what="failed samples")
            n = len(sink.batches)
            await eventually(lambda: len(sink.batches) >= n + 5, what="more polls")
            for batch in sink.batches[n:]:
                assert all(not s.good and s.value is None for s in batch)
                assert all(s.status.startswith("ReadFailed: exception 6 (DEVICE_BUSY) for FC3 address ") for s in batch)
            assert conn.status.state == ComponentState.DEGRADED  # the device answers: still connected
            # read() reports the block as not good rather than raising: the device did answer
            samples = await conn.read(["press-2/good", "press-2/order"])
            assert [(s.good, s.value) for s in samples] == [(False, None), (False, None)]

            server.set_exception(None)
            await model.produce(5)
            await eventually(lambda: sink.value("press-2/good") == model.good_raw, what="good samples again")
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="CONNECTED")
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("modbus.connected", "info"), ("modbus.read_failed", "error"), ("modbus.recovered", "info")]


async def test_server_restart(model: MachineModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device restart: polls go on reporting every tag not good, never a value; the recovery line says how long the
    device was away, the same number as status's downtime_s (status's clock advances 1 ms at every reading here, so a
    second reading of the clock for the log line would differ)."""
    import gateway.component

    ticks = [0.0]

    def monotonic() -> float:
        ticks[0] += 0.001
        return time.monotonic() + ticks[0]

    monkeypatch.setattr(gateway.component, "time", types.SimpleNamespace(monotonic=monotonic, time=time.time))
    server = await start_server(model)
    sink = Recorder()
    conn = make_connector(server.port, press_tags(), sink)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await model.produce(10)
                await eventually(lambda: sink.value("press-2/good") == model.good_raw, what="first values")

                await server.stop()
                await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 2, "DISCONNECTED")
                with pytest.raises(ConnectorUnavailable):
                    await conn.read(["press-2/good"])
                n = len(sink.batches)
                await eventually(lambda: len(sink.batches) >= n + 5, what="polls while down")
                for batch in sink.batches[n:]:  # the poll goes on, every tag reported not good, never a value
                    assert len(batch) == 4
                    assert all(not s.good and s.value is None and s.status.startswith("ReadFailed:") for s in batch)
                await model.produce(7)  # made while the device is unreachable

                await restart(server)  # same port
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 3, "reconnected")
                await eventually(lambda: sink.value("press-2/good") == model.good_raw, what="values after restart")
                samples = await conn.read(["press-2/scrap", "press-2/good"])
                assert [s.value for s in samples] == [model.scrap_raw, model.good_raw]
                assert conn.status.detail["reconnects"] >= 1
    finally:
        await server.stop()
    events = [e["event"] for e in logs]
    assert events == ["modbus.connected", "modbus.read_failed", "modbus.recovered"]  # not one per poll
    recovered = next(e for e in logs if e["event"] == "modbus.recovered")
    assert recovered["downtime_s"] > 0 and recovered["downtime_s"] == conn.status.downtime_s


async def test_read_current_values(model: MachineModel, server: ModbusMachineServer) -> None:
    sink = Recorder()
    tags = press_tags() + [tb("press-2/operation", 20, "string", length=4)]
    conn = make_connector(server.port, tags, sink, poll_interval_s=60)  # polls stay out of the way
    with pytest.raises(ConnectorUnavailable):
        await conn.read(["press-2/good"])  # not started
    async with running(conn):
        await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
        model.set_order("900001", "0020")
        await model.produce(30)
        samples = await conn.read(["press-2/order", "press-2/good", "press-2/scrap", "press-2/operation"], timeout=1)
        assert [s.value for s in samples] == ["900001", model.good_raw, model.scrap_raw, "0020"]
        assert all(s.good for s in samples)
        with pytest.raises(ReadFailed):
            await conn.read(["nope"])


async def test_block_with_unreadable_gap_is_split(model: MachineModel, server: ModbusMachineServer) -> None:
    # the simulator has registers 0..23 only: a block 20..27 is refused, 20..23 alone is fine
    tags = [tb("op", 20, "string", length=4), tb("ghost", 27)]
    sink = Recorder()
    conn = make_connector(server.port, tags, sink)
    assert [(b.start, b.count) for b in conn.blocks] == [(20, 8)]
    model.set_order("1", "0030")
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: sink.value("op") == "0030", what="the string after the split")
            assert [(b.start, b.count) for b in conn.blocks] == [(20, 4), (27, 1)]
            ghost = sink.last["ghost"]
            assert (ghost.good, ghost.value, ghost.status) == (False, None, "ReadFailed: exception 2 (ILLEGAL_ADDRESS) for FC3 address 27 count 1")
            assert conn.status.state == ComponentState.DEGRADED
    assert sum(e["event"] == "modbus.block_split" for e in logs) == 1


async def test_schedule_has_no_drift(model: MachineModel, server: ModbusMachineServer,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modbus_connector, "HEARTBEAT_S", 0.0)  # every poll reports every tag: one batch per poll
    sink = Recorder()
    conn = make_connector(server.port, press_tags(), sink, poll_interval_s=0.02)
    async with running(conn):
        await eventually(lambda: len(sink.batches) >= 3, what="first polls")
        start_n = len(sink.batches)
        await asyncio.sleep(1.0)
        times = sink.times[start_n - 1:]  # the poll before the second, and every poll during it
    polls = len(times) - 1
    assert 45 <= polls <= 51  # 1 s / 20 ms
    assert conn.skipped_polls == 0  # batch k is poll k
    # poll k sits at t0 + k * interval: a poll may be late (a loaded machine), but errors do not add up. A schedule
    # that sleeps the interval after each poll drifts by the poll's duration every time: its later polls are later
    # than its first ones, by 1 ms per poll or more. Medians of ten, so a few late polls do not decide it.
    late = [t - (times[0] + k * 0.02) for k, t in enumerate(times)]
    assert abs(statistics.median(late[-10:]) - statistics.median(late[1:11])) < 0.01, late


async def test_idle_device_reports_only_changes_and_a_heartbeat(
    model: MachineModel, server: ModbusMachineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle is free: an unchanged block yields no samples, a change yields only the changed tags, and every tag is
    reported again after HEARTBEAT_S (fresh readings for the counter engine's plausibility checks)."""
    monkeypatch.setattr(modbus_connector, "HEARTBEAT_S", 0.5)
    sink = Recorder()
    conn = make_connector(server.port, press_tags(), sink, poll_interval_s=0.02)
    all_keys = sorted(t.key for t in press_tags())
    async with running(conn):
        await eventually(lambda: len(sink.batches) >= 1, what="first poll")
        assert sorted(s.key for s in sink.batches[0]) == all_keys
        polls = conn.polls
        await eventually(lambda: conn.polls >= polls + 10, what="ten idle polls")
        assert len(sink.batches) == 1  # nothing changed: nothing handed on
        model.set_counters(good=model.good_raw + 3)
        await eventually(lambda: len(sink.batches) >= 2, what="the change")
        assert [(s.key, s.value) for s in sink.batches[1]] == [("press-2/good", model.good_raw)]
        await eventually(lambda: len(sink.batches) >= 3, 2, "the heartbeat")
        assert sorted(s.key for s in sink.batches[2]) == all_keys


async def test_unresponsive_device_times_out_skips_slots_and_recovers(
    model: MachineModel, server: ModbusMachineServer
) -> None:
    hole = BlackHole(server.port)
    await hole.start()
    sink = Recorder()
    conn = make_connector(hole.port, press_tags(), sink, poll_interval_s=0.05, timeout_s=0.3)
    try:
        async with running(conn) as task:
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
            hole.frozen = True
            await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 2, "DISCONNECTED")
            failed = sink.last["press-2/good"]
            assert (failed.good, failed.value) == (False, None)
            assert "no valid response within 0.3s" in failed.status
            with pytest.raises(ConnectorUnavailable):
                await conn.read(["press-2/good"], timeout=0.2)
            await asyncio.sleep(0.8)
            assert conn.skipped_polls > 0  # 300 ms timeouts overran 50 ms slots: skipped, counted, no burst

            hole.frozen = False
            await model.produce(5)
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 3, "recovered")
            await eventually(lambda: sink.value("press-2/good") == model.good_raw, what="values after recovery")

            hole.frozen = True  # cancel while a request hangs: prompt
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 0.5
            assert conn.status.state == ComponentState.STOPPED
    finally:
        await hole.close()


async def test_unreachable_device_from_the_start() -> None:
    sink = Recorder()
    conn = make_connector(free_port(), press_tags(), sink)
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: len(sink.batches) >= 10, what="polls")
            assert conn.status.state == ComponentState.DISCONNECTED
            assert "cannot connect" in (conn.status.last_error or "")
            assert all(not s.good for b in sink.batches for s in b)
    assert [e["event"] for e in logs] == ["modbus.read_failed"]


# a block of plain registers (a run), and one through the decoders
@pytest.mark.parametrize("data_type", ["uint16", "uint32"])
async def test_a_reset_on_read_register_counts_every_read(model: MachineModel, server: ModbusMachineServer,
                                                          tmp_path, data_type: str) -> None:
    """A reset-on-read register holds the parts made since it was last read, and the read clears it: two reads of 3
    are 6 parts. Unchanged registers are not handed on (idle is free), but such a register's every read is a count
    of its own: it is handed on at every poll, changed or not. From the config through the gateway's wiring (the
    binding's ``every_value``) to the counted window, against the simulator's reset-on-read registers."""
    from gateway.config import parse_config
    from gateway.events import EventEncoder
    from gateway.runtime import Gateway
    from tests.e2e import IDENT

    address = {"uint16": 300, "uint32": 301}[data_type]
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "s.db")},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": server.port, "unit_id": 1,
                        "timeout_s": 2}],
        "machines": [{"id": "m1", "counters": {
            "good": {"connector": "plc", "address": address, "data_type": data_type, "mode": "reset_on_read"},
            "scrap": {"connector": "plc", "address": 1, "data_type": "uint16"}}}]}, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    conn = gw.connectors["plc"]
    made = 0
    try:
        for parts in (3, 3, 3, 0, 2, 2):  # equal reads in a row, and a read of nothing
            model.set_counters(good=model.good_raw + parts)
            made += parts
            await conn.poll_once()
            gw.core.round()
    finally:
        conn._drop(conn._client, "test over", backoff=False)
    engine = gw.core.engines["m1"]
    assert engine.window.q["good"] == made == 13
    assert [(e.first, e.last) for n, e in engine.window.evidence.items() if n == "good"] == [(None, 2)]


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(min_size=1, max_size=260) | st.integers(0, 125).flatmap(
    lambda n: st.binary(min_size=2 * n, max_size=2 * n).map(lambda regs: bytes([2 * n]) + regs)))
def test_the_quick_register_decode_equals_pymodbuss(data):
    """The register responses the connector registers with pymodbus decode a block with one struct call
    (``_decode_registers``); pymodbus's own decode unpacks register by register. Same registers or the same error,
    for any bytes (a well-formed response, a short one, a count byte that lies)."""
    from pymodbus.exceptions import ModbusIOException
    from pymodbus.pdu import register_message

    for base, quick in zip((register_message.ReadHoldingRegistersResponse,
                            register_message.ReadInputRegistersResponse), modbus_connector.QUIET_RESPONSES[:2]):
        assert issubclass(quick, base)
        want, got = base(), quick()
        try:
            want.decode(data)
        except ModbusIOException as exc:
            with pytest.raises(ModbusIOException) as raised:
                got.decode(data)
            assert str(raised.value) == str(exc)
            continue
        got.decode(data)
        assert got.registers == want.registers and type(got.registers) is list
