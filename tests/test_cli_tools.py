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
from simulators.opcua_server import OpcUaMachineServer
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
        # out-of-range arguments are refused before any I/O (an address of -1 was a pymodbus traceback)
        rc, out, err = await edge_gateway("probe", "modbus", "127.0.0.1", "--port", str(srv.port), "--address", "-1")
        assert (rc, out) == (1, "")
        assert err == "probe failed: --address must be 0..65535 (0-based: register 40001 is 0), not -1\n"
        rc, _, err = await edge_gateway(*host[:-1], "300", "--address", "65535", "--count", "2")
        assert rc == 1 and err == "probe failed: --unit must be 0..255, not 300\n"
    finally:
        await srv.stop()
    rc, _, err = await edge_gateway("probe", "modbus", "127.0.0.1", "--port", str(srv.port), "--address", "0",
                                    "--timeout", "0.5")
    assert rc == 1 and err == f"probe failed: cannot connect to 127.0.0.1:{srv.port}\n"


async def test_browse_with_the_connectors_security_and_trust(tmp_path: Path) -> None:
    model = MachineModel("Press1", seed=1)
    model.set_counters(good=42, scrap=3)
    srv = await start_on_free_port(lambda port: OpcUaMachineServer(
        model, port=port, security_policies=["Basic256Sha256_SignAndEncrypt"], extra_namespaces=["urn:other"]))
    pki = tmp_path / "pki"
    try:
        args = ["browse", srv.endpoint, "--pki-dir", str(pki), "--node", "nsu=urn:edge-gateway:simulator;s=Press1",
                "--depth", "1"]
        rc, out, err = await edge_gateway(*args)
        assert (rc, out) == (1, "")
        assert f"trust it with: edge-gateway pki trust --pki-dir {pki} {srv.thumbprint}" in err
        rc, _, _ = await edge_gateway("pki", "trust", "--pki-dir", str(pki), srv.thumbprint)
        assert rc == 0
        rc, out, err = await edge_gateway(*args)
        assert (rc, err) == (0, "")
        ns = "nsu=urn:edge-gateway:simulator;s=Press1"
        assert out.splitlines() == [
            f"# {srv.endpoint} (Basic256Sha256/SignAndEncrypt, anonymous)",
            f"Press1  {ns}  Object",
            f"├─ GoodCount  {ns}.GoodCount  Variable UInt32 r- = 42",
            f"├─ GoodDelta  {ns}.GoodDelta  Variable UInt32 r- = 0",
            f"├─ Material  {ns}.Material  Variable Float r- = 0.0",
            f"├─ OperationComplete  {ns}.OperationComplete  Variable Boolean r- = False",
            f"├─ OperationNumber  {ns}.OperationNumber  Variable String r- = ''",
            f"├─ OrderNumber  {ns}.OrderNumber  Variable String r- = ''",
            f"├─ ScrapCount  {ns}.ScrapCount  Variable UInt32 r- = 3",
            f"└─ State  {ns}.State  Variable String r- = 'idle'",
        ]
        assert srv.namespace_index == 3  # the nsu= form is what a config should use, not ns=3

        rc, out, _ = await edge_gateway(*args, "--config-lines", "press1-opc")
        assert rc == 0
        assert out.splitlines()[10:] == [
            "# config lines (connector press1-opc); pick the ones you need:",
            f'GoodCount: {{connector: press1-opc, node_id: "{ns}.GoodCount", bits: 32}}',
            f'GoodDelta: {{connector: press1-opc, node_id: "{ns}.GoodDelta", bits: 32}}',
            f'Material: {{connector: press1-opc, node_id: "{ns}.Material", resolution: 0.01}}  # Float: a material '
            "meter (under materials:, with its unit); set the resolution",
            f'OperationComplete: {{connector: press1-opc, node_id: "{ns}.OperationComplete"}}',
            f'OperationNumber: {{connector: press1-opc, node_id: "{ns}.OperationNumber"}}',
            f'OrderNumber: {{connector: press1-opc, node_id: "{ns}.OrderNumber"}}',
            f'ScrapCount: {{connector: press1-opc, node_id: "{ns}.ScrapCount", bits: 32}}',
            f'State: {{connector: press1-opc, node_id: "{ns}.State"}}',
        ]
        rc, out, _ = await edge_gateway("browse", srv.endpoint, "--pki-dir", str(pki), "--depth", "1")
        assert rc == 0 and f"├─ Press1  {ns}  Object" in out.splitlines() and "└─ Server  i=2253  Object" in out
        rc, _, err = await edge_gateway("browse", srv.endpoint, "--security", "none", "--depth", "1")
        assert rc == 1 and "security: none, but the server offers no unsecured endpoint" in err
        # bad input: one line naming what is wrong, no traceback (these said "cannot connect" or were tracebacks)
        rc, out, err = await edge_gateway("browse", srv.endpoint, "--pki-dir", str(pki), "--node", "ns=3;s=Nope")
        assert (rc, out) == (1, "")
        assert err == (f"browse failed: node ns=3;s=Nope does not exist on {srv.endpoint}; browse without --node, "
                       "or from a parent node, to find its id\n")
        rc, _, err = await edge_gateway("browse", srv.endpoint, "--node", "Press1.GoodCount")
        assert rc == 2 and err.startswith("browse: --node 'Press1.GoodCount' is not a node id; expected e.g.")
        rc, _, err = await edge_gateway("browse")
        assert rc == 2 and err.startswith("browse: give the server's endpoint URL (opc.tcp://HOST:PORT)")
        # the hints name the flags the user typed, not config keys
        rc, _, err = await edge_gateway("browse", srv.endpoint, "--pki-dir", str(pki), "--username", "gw")
        assert (rc, err) == (1, "browse failed: --username needs --password-env or --password-file\n")
    finally:
        await srv.stop()


async def test_validate_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opc_model = MachineModel("Press1", seed=1, counter_bits=16)
    mb_model = MachineModel("Press2", seed=2)
    mb_model.set_counters(good=0x12345, scrap=0)
    opc = await start_on_free_port(lambda port: OpcUaMachineServer(
        opc_model, port=port, security_policies=["Basic256Sha256_SignAndEncrypt"], users={"gw": "pw-123"}))
    mb = await start_on_free_port(lambda port: ModbusMachineServer(mb_model, port=port))
    try:
        (tmp_path / "pki" / "trusted" / "certs").mkdir(parents=True)
        (tmp_path / "pki" / "trusted" / "certs" / "press1.der").write_bytes(opc.certificate_der)
        ns = "nsu=urn:edge-gateway:simulator;s=Press1"
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(f"""
gateway: {{id: gw-1, enterprise: acme, site: p1, area: a1, line: l1}}
connectors:
  - {{type: opcua, id: opc, endpoint: "{opc.endpoint}", username: gw, password_env: PRESS1_PW}}
  - {{type: modbus, id: mb, host: 127.0.0.1, port: {mb.port}, unit_id: 1}}
machines:
  - id: press-1
    counters:
      good: {{connector: opc, node_id: "{ns}.GoodCount", bits: 16}}
      scrap: {{connector: opc, node_id: "{ns}.ScrapCount", bits: 32}}
      rework: {{connector: opc, node_id: "{ns}.Rework"}}
    state: {{connector: opc, node_id: "{ns}.State"}}
    materials:
      RM-OIL: {{connector: opc, node_id: "{ns}.Material", unit: L, resolution: 0.01}}
  - id: press-3
    counters:
      total: {{connector: opc, node_id: "{ns}.GoodDelta"}}
  - id: press-2
    counters:
      good: {{connector: mb, address: 0, data_type: uint32}}
      scrap: {{connector: mb, address: 50, data_type: uint32}}
    complete_tag: {{connector: mb, table: coil, address: 3201}}
""")
        env = {**__import__("os").environ, "PRESS1_PW": "pw-123"}
        rc, out, err = await edge_gateway("validate", "--online", str(cfg), env=env)
        assert rc == 1
        assert out.splitlines() == [
            f"{cfg}: OK (2 connectors, 3 machines)",
            f"connector opc ({opc.endpoint}): connected, Basic256Sha256/SignAndEncrypt, username",
            f"  press-1 counter good: {ns}.GoodCount: ok, UInt16 = 0",
            f"  press-1 counter scrap: {ns}.ScrapCount: PROBLEM: bits: 32 is configured but the node is "
            "UInt16 (16 bits): it would wrap at a different value; set bits: 16 or remove it",
            f"  press-1 counter rework: {ns}.Rework: PROBLEM: node does not exist (BadNodeIdUnknown)",
            f"  press-1 material RM-OIL: {ns}.Material: ok, Float = 0.0",
            f"  press-1 state: {ns}.State: ok, String = 'idle'",
            f"  press-3 counter total: {ns}.GoodDelta: ok, UInt32 = 0 (wraps at 2^32, from the node's data type)",
            f"connector mb (127.0.0.1:{mb.port} unit 1)",
            "  press-2 counter good: holding 0 uint32: ok, = 74565",
            "  press-2 counter scrap: holding 50 uint32: PROBLEM: exception 2 (ILLEGAL_ADDRESS) for FC3 (holding) "
            "address 50 count 2, unit 1",
            "  press-2 complete_tag: coil 3201 bool: ok, = False",
        ]
        assert err == f"{cfg}: 3 problems found online\n"
        assert "pw-123" not in out + err

        env["PRESS1_PW"] = "wrong"
        rc, out, _ = await edge_gateway("validate", "--online", str(cfg), env=env)
        assert rc == 1 and f"connector opc ({opc.endpoint}): PROBLEM: cannot connect to {opc.endpoint}: " in out
        assert "BadUserAccessDenied" in out and "wrong" not in out
        # several files: a problem in one does not stop the check of the next
        ok_cfg = tmp_path / "ok.yaml"
        ok_cfg.write_text(f"""
gateway: {{id: gw-2, enterprise: acme, site: p1, area: a1, line: l1}}
connectors:
  - {{type: modbus, id: mb, host: 127.0.0.1, port: {mb.port}, unit_id: 1}}
machines:
  - id: press-2
    counters:
      good: {{connector: mb, address: 0, data_type: uint32}}
""")
        rc, out, err = await edge_gateway("validate", "--online", str(cfg), str(ok_cfg), env=env)
        assert rc == 1 and err.endswith(f"{cfg}: 2 problems found online\n")
        assert out.endswith(f"{ok_cfg}: online OK (every endpoint, device, node and register checked)\n")
    finally:
        await opc.stop()
        await mb.stop()


async def test_browse_and_validate_online_against_a_strict_server(tmp_path: Path) -> None:
    """A server with MaxNodesPerRead=2 refuses a Read of a node's four attributes (BadTooManyOperations): the tools
    read in chunks of the server's limit, like the connector."""
    model = MachineModel("Press1", seed=1)
    model.set_counters(good=42, scrap=3)
    srv = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, max_nodes_per_read=2))
    ns = "nsu=urn:edge-gateway:simulator;s=Press1"
    try:
        rc, out, err = await edge_gateway("browse", srv.endpoint, "--security", "none", "--node", f"{ns}.GoodCount")
        assert (rc, err) == (0, "")
        assert out.splitlines()[1] == f"GoodCount  {ns}.GoodCount  Variable UInt32 r- = 42"
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(f"""
gateway: {{id: gw-1, enterprise: acme, site: p1, area: a1, line: l1}}
connectors:
  - {{type: opcua, id: opc, endpoint: "{srv.endpoint}", security: none}}
machines:
  - id: press-1
    counters:
      good: {{connector: opc, node_id: "{ns}.GoodCount"}}
""")
        rc, out, err = await edge_gateway("validate", "--online", str(cfg))
        assert rc == 0, out + err
        assert f"  press-1 counter good: {ns}.GoodCount: ok, UInt32 = 42 (wraps at 2^32, from the node's data type)" in out
        assert max(n for service, n in srv.requests if service == "Read") <= 2
    finally:
        await srv.stop()
