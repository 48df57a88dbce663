"""``edge-gateway probe modbus``: read once and decode, to check a register map before writing the config.

The same decoding as the connector (:func:`connectors.modbus.connector.decode_registers`), so what the probe
prints is what the gateway would read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from connectors.modbus.config import (
    BIT_TABLES,
    DATA_TYPE_REGISTERS,
    FUNCTION_CODES,
    ModbusConnectorConfig,
)
from connectors.modbus.connector import _exc_name, decode_registers

LAYOUTS = ("ABCD", "CDAB", "BADC", "DCBA")


class ProbeError(Exception):
    """The device could not be read (message for the user, no traceback)."""


@dataclass
class ProbeRequest:
    host: str
    port: int = 502
    unit: int = 1
    address: int = 0
    count: int = 1
    table: str = "holding"
    data_type: str | None = None
    word_order: str = "ABCD"  # or "all"
    timeout_s: float = 3.0
    framing: str = "tcp"  # or "rtu" (RTU frames over TCP)


async def read_raw(req: ProbeRequest) -> list[int] | list[bool]:
    client = AsyncModbusTcpClient(req.host, port=req.port, timeout=req.timeout_s, retries=0,
                                  reconnect_delay=3600.0, reconnect_delay_max=3600.0,
                                  framer=FramerType.RTU if req.framing == "rtu" else FramerType.SOCKET)
    try:
        try:
            ok = await asyncio.wait_for(client.connect(), req.timeout_s + 0.5)
        except (asyncio.TimeoutError, OSError, ModbusException):
            ok = False
        if not ok:
            raise ProbeError(f"cannot connect to {req.host}:{req.port}")
        fn = {"holding": client.read_holding_registers, "input": client.read_input_registers,
              "coil": client.read_coils, "discrete_input": client.read_discrete_inputs}[req.table]
        try:
            rr = await asyncio.wait_for(fn(req.address, count=req.count, device_id=req.unit), req.timeout_s * 1.5 + 0.5)
        except (asyncio.TimeoutError, ModbusException, OSError) as exc:
            raise ProbeError(f"no valid response from {req.host}:{req.port} unit {req.unit} within {req.timeout_s}s "
                             f"({type(exc).__name__})") from None
        where = f"FC{FUNCTION_CODES[req.table]} ({req.table}) address {req.address} count {req.count}, unit {req.unit}"
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise ProbeError(f"exception {code} ({_exc_name(code) if code is not None else '?'}) for {where}")
        return list(rr.bits[: req.count]) if req.table in BIT_TABLES else list(rr.registers[: req.count])
    finally:
        client.close()


def render(req: ProbeRequest, raw: list[int] | list[bool]) -> list[str]:
    """The lines the probe prints for ``raw`` (pure; tested through the CLI)."""
    fc = FUNCTION_CODES[req.table]
    lines = [f"modbus {req.host}:{req.port} unit {req.unit}: FC{fc} ({req.table}) address {req.address} count {req.count}"]
    if req.table in BIT_TABLES:
        lines.append("bits: " + " ".join(f"{req.address + i}={int(bool(b))}" for i, b in enumerate(raw)))
        return lines
    regs = [int(r) for r in raw]
    lines.append("registers: " + " ".join(f"{req.address + i}=0x{r:04X}({r})" for i, r in enumerate(regs)))
    if req.data_type is None:
        return lines
    if req.data_type == "string":
        lines.append(f"string @{req.address}: {decode_registers(regs, 'string', length=len(regs))!r}")
        return lines
    size = DATA_TYPE_REGISTERS[req.data_type]
    layouts = LAYOUTS if req.word_order == "all" else (req.word_order,)
    for off in range(0, len(regs) - size + 1, size):
        for layout in layouts:
            value = decode_registers(regs[off:off + size], req.data_type, layout)
            lines.append(f"{req.data_type} {layout} @{req.address + off}: {value}")
    return lines


def check(req: ProbeRequest) -> None:
    """Argument problems, before any I/O."""
    if not 0 <= req.unit <= 255:
        raise ProbeError(f"--unit must be 0..255, not {req.unit}")
    if not 0 <= req.address <= 65535:
        raise ProbeError(f"--address must be 0..65535 (0-based: register 40001 is 0), not {req.address}")
    if req.address + req.count > 65536:
        raise ProbeError(f"--address {req.address} + --count {req.count} runs past the last address 65535")
    if req.table in BIT_TABLES:
        if req.data_type not in (None, "bool"):
            raise ProbeError(f"a {req.table.replace('_', ' ')} is one bit: --type does not apply (or use bool)")
        if not 1 <= req.count <= 2000:
            raise ProbeError("--count must be 1..2000 for coils and discrete inputs")
        return
    if not 1 <= req.count <= 125:
        raise ProbeError("--count must be 1..125 registers")
    if req.data_type == "bool":
        raise ProbeError("--type bool needs --table coil or --table discrete_input")
    if req.data_type not in (None, "string"):
        size = DATA_TYPE_REGISTERS[req.data_type]
        if req.count < size or req.count % size:
            raise ProbeError(f"{req.data_type} takes {size} register{'s' if size > 1 else ''}: "
                             f"--count must be a multiple of {size}")


async def probe(req: ProbeRequest) -> list[str]:
    check(req)
    return render(req, await read_raw(req))


async def check_online(c: ModbusConnectorConfig, items: list[tuple[str, str, Any, Any]]) -> int:
    """``validate --online`` for one Modbus device (see connectors/__init__.py): read every tag once, decoded as the
    connector would, one line each; returns the number of problems. A device that cannot be reached is one problem
    (its other tags are not checked)."""
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    problems = 0
    print(f"connector {c.id} ({c.host}:{c.port} unit {c.unit_id})")
    for label, _kind, _b, addr in items:
        req = ProbeRequest(c.host, c.port, c.unit_id, addr.address, addr.count, addr.table, timeout_s=c.timeout_s,
                           framing=c.framing)
        where = f"{addr.table} {addr.address} {addr.data_type}"
        try:
            raw = await read_raw(req)
        except ProbeError as exc:
            problems += 1
            print(f"  {label}: {where}: PROBLEM: {exc}")
            if str(exc).startswith("cannot connect"):
                print(f"  (the other tags of {c.id} not checked)")
                break
            continue
        value = bool(raw[0]) if addr.data_type == "bool" else decode_registers(
            [int(r) for r in raw], addr.data_type, addr.word_order, addr.length)
        print(f"  {label}: {where}: ok, = {value!r}")
    return problems
