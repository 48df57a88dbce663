"""Modbus TCP server exposing one :class:`~simulators.machine.MachineModel`.

Register layout (0-based addresses; holding registers, mirrored 1:1 in input registers)::

    counter_bits = 32                         counter_bits = 16
    addr   content                            addr   content
    0-1    good   uint32, high word first     0      good   uint16
    2-3    scrap  uint32, high word first     1      scrap  uint16
                                              2-3    reserved (0)
    4      state  uint16: 0 idle, 1 running, 2 stopped
    5      operation complete flag: 1 after model.complete_operation(), 0 after set_order()
    6-9    reserved (0)
    10-19  order number, ASCII, 20 chars, 2 per register (high byte first), NUL padded
    20-23  operation number, ASCII, 8 chars, same encoding

Signed models (``signed=True``) hold the two's complement bit pattern: data type int32 / int16.
Registers 0..23 are readable; anything else is an ILLEGAL_ADDRESS exception; writes are refused.

The register image is updated synchronously by a model listener and copied into pymodbus's store on
every request, so a block read always returns one consistent state of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .machine import MachineModel

__all__ = ["LAYOUT", "REGISTER_COUNT", "STATE_CODES", "ModbusMachineServer", "encode_string", "layout_for"]

_log = logging.getLogger(__name__)

STATE_CODES = {"idle": 0, "running": 1, "stopped": 2}

_STRINGS = {
    "state": {"address": 4, "count": 1, "data_type": "uint16"},
    "complete": {"address": 5, "count": 1, "data_type": "uint16"},
    "order": {"address": 10, "count": 10, "data_type": "string", "length": 10, "chars": 20},
    "operation": {"address": 20, "count": 4, "data_type": "string", "length": 4, "chars": 8},
}

#: counter_bits -> signal -> {address, count, data_type[, length, chars]} (unsigned counter types;
#: signed models use int16/int32 at the same addresses, see :func:`layout_for`)
LAYOUT: dict[int, dict[str, dict[str, Any]]] = {
    32: {
        "good": {"address": 0, "count": 2, "data_type": "uint32"},
        "scrap": {"address": 2, "count": 2, "data_type": "uint32"},
        **_STRINGS,
    },
    16: {
        "good": {"address": 0, "count": 1, "data_type": "uint16"},
        "scrap": {"address": 1, "count": 1, "data_type": "uint16"},
        **_STRINGS,
    },
}

#: registers 0..REGISTER_COUNT-1 exist
REGISTER_COUNT = 24

_STOP_TIMEOUT = 5.0


def layout_for(counter_bits: int, signed: bool = False) -> dict[str, dict[str, Any]]:
    """The register layout of a model with this counter width/signedness (a copy)."""
    if counter_bits not in LAYOUT:
        raise ValueError(f"Modbus simulator supports 16 or 32 bit counters, not {counter_bits}")
    out = {k: dict(v) for k, v in LAYOUT[counter_bits].items()}
    if signed:
        for c in ("good", "scrap"):
            out[c]["data_type"] = out[c]["data_type"].replace("uint", "int")
    return out


def encode_string(text: str, registers: int) -> list[int]:
    """ASCII, 2 chars per register, high byte first, NUL padded, truncated to ``2 * registers`` chars."""
    raw = text.encode("ascii", errors="replace")[: 2 * registers].ljust(2 * registers, b"\0")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


class ModbusMachineServer:
    """A real pymodbus TCP server for one simulated machine.

    Use ``async with ModbusMachineServer(model, port=...) as srv:`` or ``await srv.start()`` /
    ``await srv.stop()``. ``stop()`` closes the listener and all client connections (the device becomes
    unreachable); ``start()`` again on the same port brings it back with the model's current values.
    """

    def __init__(self, model: MachineModel, *, host: str = "127.0.0.1", port: int = 5020, unit_id: int = 1) -> None:
        self.layout = layout_for(model.counter_bits, model.signed)
        if not 0 <= unit_id <= 255:
            raise ValueError("unit_id must be within 0..255")
        self.model = model
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self._image: list[int] = [0] * REGISTER_COUNT
        self._server: ModbusTcpServer | None = None
        self._exception: ExcCodes | None = None
        self._refresh()

    # ------------------------------------------------------------------ addressing

    @property
    def endpoint(self) -> str:
        return f"modbus-tcp://{self.host}:{self.port}/{self.unit_id}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def tag_addresses(self, table: str | None = None) -> dict[str, dict[str, Any]]:
        """``{"good"|"scrap"|"state"|"complete": {"address": int, "data_type": str}}`` (valid ModbusTagConfig fields).

        With ``table="holding"`` or ``"input"`` the entries also carry ``table``.
        """
        out: dict[str, dict[str, Any]] = {}
        for sig in ("good", "scrap", "state", "complete"):
            entry: dict[str, Any] = {"address": self.layout[sig]["address"], "data_type": self.layout[sig]["data_type"]}
            if table is not None:
                entry["table"] = table
            out[sig] = entry
        return out

    def registers(self) -> list[int]:
        """Current register image (a copy), addresses 0..23."""
        return list(self._image)

    # ------------------------------------------------------------------ image

    def _refresh(self) -> None:
        m = self.model
        img = [0] * REGISTER_COUNT
        for sig in ("good", "scrap"):
            raw = m.raw_register_value(sig)
            addr = self.layout[sig]["address"]
            if self.layout[sig]["count"] == 2:
                img[addr] = (raw >> 16) & 0xFFFF
                img[addr + 1] = raw & 0xFFFF
            else:
                img[addr] = raw & 0xFFFF
        img[self.layout["state"]["address"]] = STATE_CODES[m.state]
        img[self.layout["complete"]["address"]] = 1 if m.operation_complete else 0
        order, operation = m.order if m.order else ("", "")
        for sig, text in (("order", order), ("operation", operation)):
            addr, count = self.layout[sig]["address"], self.layout[sig]["count"]
            img[addr : addr + count] = encode_string(text, count)
        self._image = img  # replaced as a whole: a request never sees half an update

    def _on_model_change(self) -> None:
        self._refresh()

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus hook, called on every request before the registers are read."""
        if self._exception is not None:
            return self._exception
        img = self._image
        n = min(len(img), len(current_registers) - start_address)
        current_registers[0:n] = img[start_address : start_address + n]
        return None

    def set_exception(self, code: ExcCodes | None) -> None:
        """Answer every request with this Modbus exception (e.g. ``ExcCodes.DEVICE_BUSY``) until set to None."""
        self._exception = code

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "ModbusMachineServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            return
        device = SimDevice(
            id=self.unit_id,
            simdata=[SimData(address=0, count=REGISTER_COUNT, values=0, datatype=DataType.REGISTERS, readonly=True)],
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port))
        self.model.add_listener(self._on_model_change)
        self._refresh()
        try:
            await server.serve_forever(background=True)
        except Exception as exc:
            self.model.remove_listener(self._on_model_change)
            with contextlib.suppress(Exception):
                await server.shutdown()
            raise OSError(f"Modbus simulator cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._server = server
        _log.info("Modbus simulator %s listening on %s:%s unit %s", self.model.name, self.host, self.port, self.unit_id)

    async def stop(self) -> None:
        """Close the listener and every client connection (bounded). Idempotent."""
        server, self._server = self._server, None
        self.model.remove_listener(self._on_model_change)
        if server is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await server.shutdown()
        except asyncio.TimeoutError:
            _log.warning("Modbus simulator %s: stop timed out", self.model.name)
        except Exception:
            _log.exception("Modbus simulator %s: error while stopping", self.model.name)
        await asyncio.sleep(0)  # let the transports run their close callbacks
