"""Machine simulators: the model's counter semantics and the real OPC UA / Modbus servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from simulators.__main__ import SUBCOMMANDS, build_parser
from simulators.machine import MachineModel
from simulators.modbus_server import LAYOUT, ModbusMachineServer, encode_string
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[1]


def decode_string(regs: list[int]) -> str:
    return b"".join(struct.pack(">H", r) for r in regs).rstrip(b"\0").decode("ascii")


# ---------------------------------------------------------------------------- model


def test_unsigned_wrap_uses_modulus_2_pow_n():
    m = MachineModel("M", scrap_rate=0.0, counter_bits=16, start_good=65534)
    m.make_part()
    assert m.good_raw == 65535
    m.make_part()
    assert m.good_raw == 0  # 65535 -> 0, not -> 1
    m.make_part()
    assert m.good_raw == 1
    assert m.truth_totals() == {"good": 3, "scrap": 0}

    m32 = MachineModel("M", scrap_rate=0.0, counter_bits=32, start_good=2**32 - 1)
    m32.make_part()
    assert m32.good_raw == 0
    assert MachineModel("M", counter_bits=16, start_good=70000).good_raw == 70000 - 65536


def test_signed_wrap_and_register_pattern():
    m = MachineModel("M", scrap_rate=1.0, counter_bits=16, signed=True, start_scrap=32766)
    m.make_part()
    assert m.scrap_raw == 32767
    m.make_part()
    assert m.scrap_raw == -32768
    assert m.raw_register_value("scrap") == 0x8000
    m.make_part()
    assert m.scrap_raw == -32767
    assert m.raw_register_value("scrap") == 0x8001
    assert m.truth_totals() == {"good": 0, "scrap": 3}
    assert m.counter_min == -32768 and m.counter_max == 32767


def test_determinism_same_seed_same_scrap_sequence():
    a = MachineModel("A", scrap_rate=0.3, seed=42)
    b = MachineModel("B", scrap_rate=0.3, seed=42)
    c = MachineModel("C", scrap_rate=0.3, seed=43)
    seq_a = [a.make_part() for _ in range(300)]
    seq_b = [b.make_part() for _ in range(300)]
    seq_c = [c.make_part() for _ in range(300)]
    assert seq_a == seq_b
    assert seq_a != seq_c
    assert 0 < seq_a.count(False) < 300
    assert a.truth_totals() == {"good": seq_a.count(True), "scrap": seq_a.count(False)}


def test_truth_per_order_survives_reset_and_listeners_fire():
    m = MachineModel("M", scrap_rate=0.0, start_good=100)
    calls = []
    m.add_listener(lambda: calls.append((m.good_raw, m.state, m.order)))
    m.make_part()  # unassigned
    m.set_order("4711", "0010")
    for _ in range(5):
        m.make_part()
    m.reset_counters()
    assert (m.good_raw, m.scrap_raw) == (0, 0)
    m.make_part()
    m.set_order("4712", "0020")
    m.make_part()
    m.clear_order()
    assert m.truth == {
        None: {"good": 1, "scrap": 0},
        ("4711", "0010"): {"good": 6, "scrap": 0},
        ("4712", "0020"): {"good": 1, "scrap": 0},
    }
    assert m.truth_for("4711", "0010") == {"good": 6, "scrap": 0}
    assert m.truth_totals() == {"good": 8, "scrap": 0}
    assert m.parts_made == 8
    assert m.good_raw == 2
    # one call per change: 8 parts, 3 order changes, 1 reset
    assert len(calls) == 12
    assert calls[-1] == (2, "idle", None)


async def test_produce_makes_exactly_n_parts_at_the_cycle_rate():
    m = MachineModel("M", cycle_time=0.01, scrap_rate=0.2, seed=7)
    states = []
    m.add_listener(lambda: states.append(m.state))
    t0 = time.monotonic()
    await m.produce(30)
    elapsed = time.monotonic() - t0
    assert m.parts_made == 30
    assert m.state == "idle"
    assert 0.25 <= elapsed < 1.5
    assert states[0] == "running" and states[-1] == "idle"
    total = m.truth_totals()
    assert total["good"] + total["scrap"] == 30
    assert (m.good_raw, m.scrap_raw) == (total["good"], total["scrap"])
    # no parts while idle
    await asyncio.sleep(0.05)
    assert m.parts_made == 30


async def test_produce_with_background_run_forever_and_wait_parts():
    m = MachineModel("M", cycle_time=0.005, scrap_rate=0.0)
    task = asyncio.create_task(m.run_forever())
    try:
        await m.produce(10, timeout=5)
        assert m.parts_made == 10 and m.state == "idle"
        m.start()
        await m.wait_parts(20, timeout=5)
        m.pause()
        await asyncio.sleep(0.03)
        made = m.parts_made
        await asyncio.sleep(0.03)
        assert m.parts_made == made >= 20
        with pytest.raises(TimeoutError):
            await m.wait_parts(made + 1, timeout=0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------- OPC UA


async def test_opcua_counters_truth_order_state_and_bad_status():
    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.2, seed=5)
    m.set_order("4711000123", "0010")
    port = free_port()
    async with OpcUaMachineServer(m, port=port) as srv:
        assert srv.endpoint == f"opc.tcp://127.0.0.1:{port}"
        assert srv.node_ids == {
            "good": "ns=2;s=Press1.GoodCount",
            "scrap": "ns=2;s=Press1.ScrapCount",
            "state": "ns=2;s=Press1.State",
            "order": "ns=2;s=Press1.OrderNumber",
            "operation": "ns=2;s=Press1.OperationNumber",
            "complete": "ns=2;s=Press1.OperationComplete",
        }
        async with Client(srv.endpoint, timeout=5) as client:
            assert await client.get_namespace_index("urn:edge-gateway:simulator") == 2
            nodes = {k: client.get_node(v) for k, v in srv.node_ids.items()}
            assert await nodes["good"].read_value() == 0
            assert await nodes["state"].read_value() == "idle"
            assert await nodes["order"].read_value() == "4711000123"
            assert await nodes["operation"].read_value() == "0010"

            seen: list[int] = []

            class Handler:
                def datachange_notification(self, node, val, data):
                    seen.append(val)

            sub = await client.create_subscription(20, Handler())
            await sub.subscribe_data_change(nodes["good"])

            await m.produce(25)
            await srv.flush()
            truth = m.truth_for("4711000123", "0010")
            assert truth["good"] + truth["scrap"] == 25
            dv = await nodes["good"].read_data_value()
            assert dv.Value.Value == truth["good"] == m.good_raw
            assert dv.Value.VariantType == ua.VariantType.UInt32
            assert dv.StatusCode.is_good()
            assert dv.SourceTimestamp is not None
            assert await nodes["scrap"].read_value() == truth["scrap"]
            assert await nodes["state"].read_value() == "idle"

            for _ in range(100):  # subscription: values arrive in order and end at the final count
                if seen and seen[-1] == truth["good"]:
                    break
                await asyncio.sleep(0.02)
            assert seen[-1] == truth["good"]
            assert seen == sorted(seen)

            m.clear_order()
            await srv.flush()
            assert await nodes["order"].read_value() == ""

            await srv.set_bad("good", True)
            dv = await nodes["good"].read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode.is_bad()
            assert dv.StatusCode.value == ua.StatusCodes.BadCommunicationError
            with pytest.raises(ua.UaStatusCodeError):
                await nodes["good"].read_value()
            m.make_part()  # a change while bad stays hidden
            await srv.flush()
            assert (await nodes["good"].read_data_value(raise_on_bad_status=False)).StatusCode.is_bad()
            await srv.set_bad("good", False)
            dv = await nodes["good"].read_data_value()
            assert dv.StatusCode.is_good()
            assert dv.Value.Value == m.good_raw
            await sub.delete()


async def test_opcua_16bit_wrap_and_restart_on_same_port():
    m = MachineModel("Lathe2", cycle_time=0.005, scrap_rate=0.0, counter_bits=16, start_good=65530)
    port = free_port()
    srv = OpcUaMachineServer(m, port=port)
    await srv.start()
    try:
        async with Client(srv.endpoint, timeout=5) as client:
            node = client.get_node(srv.node_ids["good"])
            dv = await node.read_data_value()
            assert dv.Value.VariantType == ua.VariantType.UInt16
            assert dv.Value.Value == 65530
            await m.produce(10)
            await srv.flush()
            assert await node.read_value() == 4  # (65530 + 10) mod 65536
            assert m.truth_totals()["good"] == 10

        t0 = time.monotonic()
        await srv.stop()
        assert time.monotonic() - t0 < 5
        m.make_part()  # produced while the server is down
        await srv.start()  # same port again
        async with Client(srv.endpoint, timeout=5) as client:
            assert await client.get_node(srv.node_ids["good"]).read_value() == 5
    finally:
        await srv.stop()


async def test_opcua_signed_counter_type():
    m = MachineModel("S", counter_bits=32, signed=True, start_good=-5)
    srv = OpcUaMachineServer(m, port=free_port())
    assert srv.counter_type == ua.VariantType.Int32
    assert OpcUaMachineServer(MachineModel("T", counter_bits=16, signed=True)).counter_type == ua.VariantType.Int16
    with pytest.raises(ValueError):
        OpcUaMachineServer(MachineModel("U", counter_bits=24))


# ---------------------------------------------------------------------------- Modbus


async def _client(port: int) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, reconnect_delay=0.2)
    assert await client.connect()
    return client


async def test_modbus_32bit_layout_truth_and_input_mirror():
    m = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.3, seed=11, start_good=2**32 - 3)
    m.set_order("4711000123", "0010")
    port = free_port()
    async with ModbusMachineServer(m, port=port, unit_id=3) as srv:
        assert srv.tag_addresses() == {
            "good": {"address": 0, "data_type": "uint32"},
            "scrap": {"address": 2, "data_type": "uint32"},
            "state": {"address": 4, "data_type": "uint16"},
            "complete": {"address": 5, "data_type": "uint16"},
        }
        client = await _client(port)
        try:
            rr = await client.read_holding_registers(0, count=24, device_id=3)
            assert not rr.isError()
            assert rr.registers[0:2] == [0xFFFF, 0xFFFD]
            assert decode_string(rr.registers[10:20]) == "4711000123"
            assert decode_string(rr.registers[20:24]) == "0010"

            await m.produce(20)
            rr = await client.read_holding_registers(0, count=24, device_id=3)
            regs = rr.registers
            good = (regs[0] << 16) | regs[1]
            scrap = (regs[2] << 16) | regs[3]
            truth = m.truth_for("4711000123", "0010")
            assert truth["good"] + truth["scrap"] == 20
            assert good == (2**32 - 3 + truth["good"]) % 2**32  # wrapped past 2**32
            assert good == m.good_raw and scrap == truth["scrap"] == m.scrap_raw
            assert regs[4] == 0  # idle

            m.start()
            ir = await client.read_input_registers(0, count=24, device_id=3)
            assert ir.registers[4] == 1  # running, input registers mirror holding
            assert ir.registers[:4] == regs[:4]
            m.stop()
            assert (await client.read_holding_registers(4, count=1, device_id=3)).registers == [2]

            # writes are refused, addresses outside the layout are illegal
            assert (await client.write_register(0, 5, device_id=3)).isError()
            assert (await client.read_holding_registers(20, count=10, device_id=3)).isError()

            srv.set_exception(ExcCodes.DEVICE_BUSY)
            assert (await client.read_holding_registers(0, count=2, device_id=3)).isError()
            srv.set_exception(None)
            assert not (await client.read_holding_registers(0, count=2, device_id=3)).isError()
        finally:
            client.close()


async def test_modbus_tag_addresses_fit_the_gateway_config():
    from connectors.modbus.config import ModbusTagConfig

    for bits, signed in ((16, False), (16, True), (32, False), (32, True)):
        srv = ModbusMachineServer(MachineModel("M", counter_bits=bits, signed=signed))
        tags = {k: ModbusTagConfig(**v) for k, v in srv.tag_addresses().items()}
        assert tags["good"].data_type == f"{'int' if signed else 'uint'}{bits}"
        assert tags["good"].count == bits // 16
    assert LAYOUT[16]["scrap"]["address"] == 1 and LAYOUT[32]["scrap"]["address"] == 2
    assert encode_string("AB", 2) == [0x4142, 0]


async def test_modbus_16bit_wrap_and_signed():
    m = MachineModel("M", cycle_time=0.005, scrap_rate=0.0, counter_bits=16, start_good=65530)
    s = MachineModel("S", scrap_rate=1.0, counter_bits=16, signed=True, start_scrap=32766)
    p1, p2 = free_ports(2)  # two calls of free_port() may give the same port
    async with ModbusMachineServer(m, port=p1) as srv, ModbusMachineServer(s, port=p2, unit_id=1) as ssrv:
        assert srv.tag_addresses()["scrap"] == {"address": 1, "data_type": "uint16"}
        assert ssrv.tag_addresses()["scrap"]["data_type"] == "int16"
        c1, c2 = await _client(p1), await _client(p2)
        try:
            assert (await c1.read_holding_registers(0, count=2, device_id=1)).registers == [65530, 0]
            await m.produce(10)
            assert (await c1.read_holding_registers(0, count=2, device_id=1)).registers == [4, 0]
            assert (await c1.read_input_registers(0, count=1, device_id=1)).registers == [4]
            assert m.truth_totals() == {"good": 10, "scrap": 0}

            for _ in range(3):
                s.make_part()
            assert s.scrap_raw == -32767
            regs = (await c2.read_holding_registers(0, count=2, device_id=1)).registers
            assert regs == [0, 0x8001]
            assert struct.unpack(">h", struct.pack(">H", regs[1]))[0] == -32767
        finally:
            c1.close()
            c2.close()


async def test_modbus_stop_and_restart_on_same_port():
    m = MachineModel("M", cycle_time=0.005, scrap_rate=0.0)
    port = free_port()
    srv = ModbusMachineServer(m, port=port)
    await srv.start()
    try:
        client = await _client(port)
        await m.produce(3)
        assert (await client.read_holding_registers(0, count=2, device_id=1)).registers == [0, 3]
        client.close()

        t0 = time.monotonic()
        await srv.stop()
        assert time.monotonic() - t0 < 2
        assert not srv.running
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0, reconnect_delay=0.2)
        assert not await client.connect()  # unreachable
        client.close()

        await m.produce(2)  # the machine keeps producing while unreachable
        await srv.start()
        client = await _client(port)
        assert (await client.read_holding_registers(0, count=2, device_id=1)).registers == [0, 5]

        await srv.stop()  # stop while a client is connected: its connection is dropped
        with pytest.raises(Exception):
            rr = await client.read_holding_registers(0, count=2, device_id=1)
            assert not rr.isError()
            raise AssertionError("read succeeded on a stopped server")
        client.close()
        await srv.start()
        client = await _client(port)
        assert (await client.read_holding_registers(0, count=2, device_id=1)).registers == [0, 5]
        client.close()
    finally:
        await srv.stop()


# ---------------------------------------------------------------------------- CLI


def test_cli_parser_has_subcommands():
    assert {"opcua", "modbus"} <= set(SUBCOMMANDS)
    args = build_parser().parse_args(
        ["opcua", "--host", "127.0.0.1", "--port", "4841", "--name", "P", "--cycle-time", "0.2",
         "--scrap-rate", "0.1", "--seed", "3", "--bits", "16"]
    )
    assert (args.command, args.port, args.name, args.cycle_time, args.scrap_rate, args.seed, args.bits) == (
        "opcua", 4841, "P", 0.2, 0.1, 3, 16,
    )


async def test_cli_modbus_runs_until_ctrl_c():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators", "modbus", "--port", str(port), "--cycle-time", "0.01",
         "--seed", "1", "--order", "4711"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        regs = None
        for _ in range(100):
            await asyncio.sleep(0.05)
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
            if await client.connect():
                rr = await client.read_holding_registers(0, count=24, device_id=1)
                client.close()
                if not rr.isError() and rr.registers[1] > 0:
                    regs = rr.registers
                    break
            client.close()
        assert regs is not None, proc.stderr.read() if proc.poll() is not None else "no registers"
        assert regs[4] == 1 and decode_string(regs[10:20]) == "4711"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    info_text, _, last = out.strip().rpartition("\n")
    info = json.loads(info_text)
    assert info["tags"]["good"] == {"address": 0, "data_type": "uint32"}
    summary = json.loads(last)
    assert summary["parts_made"] > 0
    assert sum(summary["truth"]["4711/0010"].values()) == summary["parts_made"]


async def test_cli_opcua_secured_with_login_as_an_engineer_uses_it(tmp_path):
    """`python -m simulators opcua --security ... --user ... --password-env ...` offers only that endpoint and
    requires the login: the engineer's workflow (browse refused as untrusted, pki trust, browse with login) works."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIM_PW": "pw-9-sim"}
    bad = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "simulators", "opcua", "--security", "Basic999"],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("--security: unknown Basic999; one of NoSecurity,")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read in a thread
        [sys.executable, "-m", "simulators", "opcua", "--port", str(port), "--security", "Basic256Sha256_SignAndEncrypt",
         "--user", "gw", "--password-env", "SIM_PW"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )

    def gw(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    try:
        lines = []
        while not lines or lines[-1] != "}\n":  # the info JSON, printed once the server listens
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, proc.stderr.read()
            lines.append(line)
        info = json.loads("".join(lines))
        assert (info["security"], info["login"]) == (["Basic256Sha256_SignAndEncrypt"], "username")
        pki = str(tmp_path / "pki")
        browse = ["browse", info["endpoint"], "--pki-dir", pki, "--depth", "0"]
        first = await asyncio.to_thread(gw, *browse)
        assert first.returncode == 1 and "is not trusted" in first.stderr
        assert (await asyncio.to_thread(gw, "pki", "trust", "--pki-dir", pki, info["certificate_thumbprint"])).returncode == 0
        anonymous = await asyncio.to_thread(gw, *browse)
        assert anonymous.returncode == 1 and "the server requires a login" in anonymous.stderr
        ok = await asyncio.to_thread(gw, *browse, "--username", "gw", "--password-env", "SIM_PW")
        assert (ok.returncode, ok.stderr) == (0, "")
        assert ok.stdout.splitlines()[0] == f"# {info['endpoint']} (Basic256Sha256/SignAndEncrypt, username)"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may answer bind(0) with a port it gave before (both free again): free_port() skips it."""
    import simulators.ports as ports

    answers = iter([40001, 40002, 40001, 40003])

    class FakeSocket:
        def __init__(self, *a):
            self.port = next(answers)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(ports, "_given", set())
    monkeypatch.setattr(ports.socket, "socket", FakeSocket)
    assert [ports.free_port() for _ in range(3)] == [40001, 40002, 40003]
