"""``edge-gateway probe`` / ``browse`` / ``validate --online`` run as a user runs them (a real process against the
project's simulators), output asserted."""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

import pytest

from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from tests.faults import start_on_free_port

ROOT = Path(__file__).resolve().parent.parent


async def edge_gateway(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``edge-gateway ARGS`` in a subprocess without blocking the loop that serves the simulators."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def model() -> MachineModel:
    m = MachineModel("Press2", cycle_time=0.001, seed=2)
    m.set_counters(good=0x12345, scrap=7)  # 74565: both words non-zero, so a wrong layout shows
    return m


async def test_probe_modbus(model: MachineModel) -> None:
    srv = await start_on_free_port(lambda port: ModbusMachineServer(model, port=port))
    try:
        host = ["probe", "modbus", "127.0.0.1", "--port", str(srv.port), "--unit", "1"]
        rc, out, err = await edge_gateway(*host, "--address", "0", "--count", "2", "--type", "uint32",
                                          "--word-order", "ABCD")
        assert (rc, err) == (0, "")
        assert out.splitlines() == [
            f"modbus 127.0.0.1:{srv.port} unit 1: FC3 (holding) address 0 count 2",
            "registers: 0=0x0001(1) 1=0x2345(9029)",
            "uint32 ABCD @0: 74565",
        ]
        # the engineer does not know the layout: every one is printed, the right one shows the counter
        rc, out, _ = await edge_gateway(*host, "--address", "102", "--count", "2", "--type", "uint32",
                                        "--word-order", "all")
        assert rc == 0
        assert out.splitlines()[2:] == ["uint32 ABCD @102: 591724545", "uint32 CDAB @102: 74565",
                                        "uint32 BADC @102: 1159921920", "uint32 DCBA @102: 16794915"]
        rc, out, _ = await edge_gateway(*host, "--address", "116", "--count", "2", "--type", "float32",
                                        "--word-order", "DCBA", "--table", "input")
        expect = struct.unpack(">f", struct.pack(">f", 0x12345 * 0.25))[0]
        assert rc == 0 and out.splitlines()[0].endswith("FC4 (input) address 116 count 2")
        assert out.splitlines()[2] == f"float32 DCBA @116: {expect}"
        model.complete_operation()
        rc, out, _ = await edge_gateway(*host, "--address", "3200", "--count", "3", "--table", "coil")
        assert rc == 0 and out.splitlines()[1] == "bits: 3200=0 3201=1 3202=0"
        rc, out, _ = await edge_gateway(*host, "--address", "10", "--count", "10", "--type", "string")
        assert rc == 0 and out.splitlines()[2] == "string @10: ''"

        # problems: one line on stderr, exit code 1, no traceback
        rc, out, err = await edge_gateway(*host, "--address", "50", "--count", "2")
        assert (rc, out) == (1, "")
        assert err == "probe failed: exception 2 (ILLEGAL_ADDRESS) for FC3 (holding) address 50 count 2, unit 1\n"
        rc, _, err = await edge_gateway(*host, "--address", "0", "--count", "3", "--type", "uint32")
        assert rc == 1 and err == "probe failed: uint32 takes 2 registers: --count must be a multiple of 2\n"
    finally:
        await srv.stop()
    rc, _, err = await edge_gateway("probe", "modbus", "127.0.0.1", "--port", str(srv.port), "--address", "0",
                                    "--timeout", "0.5")
    assert rc == 1 and err == f"probe failed: cannot connect to 127.0.0.1:{srv.port}\n"
