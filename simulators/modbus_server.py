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

Byte-order test area (always present; 32-bit values in each layout, A = most significant byte)::

    100-101  good uint32 ABCD    102-103  CDAB    104-105  BADC    106-107  DCBA
    110-111  material float32 ABCD (good parts x material_per_part)    112-113  CDAB    114-115  BADC    116-117  DCBA
    200      coil bits: coil 3200 = running (state == "running"), coil 3201 = operation complete
    201      discrete input bits: discrete input 3216 = running, 3217 = operation complete

Reset-on-read area: good parts made since the register was last read; a read returns them and clears the count
(a ``reset_on_read`` counter, e.g. a PLC's "parts since last poll")::

    300      uint16              301-302  uint32, high word first (cleared by a read of either word)

(The simulated device shares one memory for all tables: coil/discrete input N is bit N % 16 of register N // 16;
read the flags with FC1 / FC2 at the addresses above.) Registers 0..23, 100..107, 110..117, 200..201 and 300..302 are
readable; anything else is an ILLEGAL_ADDRESS exception; writes are refused. ``ADDRESSES`` lists the test area.

The register image is updated synchronously by a model listener and copied into pymodbus's store on
every request, so a block read always returns one consistent state of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .machine import MachineModel

__all__ = ["ADDRESSES", "LAYOUT", "REGISTER_COUNT", "STATE_CODES", "ModbusMachineServer", "encode_string",
           "layout_for", "layout_words"]

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

#: the byte-order / bit test area: name -> tag address fields (valid ModbusTagConfig fields)
ADDRESSES: dict[str, dict[str, Any]] = {
    **{f"good_{order}": {"address": 100 + 2 * i, "data_type": "uint32", "word_order": order}
       for i, order in enumerate(("ABCD", "CDAB", "BADC", "DCBA"))},
    **{f"material_{order}": {"address": 110 + 2 * i, "data_type": "float32", "word_order": order}
       for i, order in enumerate(("ABCD", "CDAB", "BADC", "DCBA"))},
    "running_coil": {"address": 3200, "table": "coil", "data_type": "bool"},
    "complete_coil": {"address": 3201, "table": "coil", "data_type": "bool"},
    "running_input": {"address": 3216, "table": "discrete_input", "data_type": "bool"},
    "complete_input": {"address": 3217, "table": "discrete_input", "data_type": "bool"},
    "good_since_read_16": {"address": 300, "data_type": "uint16"},
    "good_since_read_32": {"address": 301, "data_type": "uint32"},
}
_EXTRA_AREAS = ((100, 8), (110, 8), (200, 2), (300, 3))
_RESET_ON_READ = {300: 1, 301: 2}  # address -> registers


def layout_words(value: int, order: str) -> list[int]:
    """A 32-bit pattern as two registers in the layout ``order`` (ABCD, CDAB, BADC or DCBA)."""
    a, b, c, d = value.to_bytes(4, "big")
    seq = {"ABCD": (a, b, c, d), "CDAB": (c, d, a, b), "BADC": (b, a, d, c), "DCBA": (d, c, b, a)}[order]
    return [(seq[0] << 8) | seq[1], (seq[2] << 8) | seq[3]]

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
    ``await srv.stop()``. ``framing="rtu"``: RTU frames (with CRC) over TCP, like a serial-to-Ethernet
    converter. ``stop()`` closes the listener and all client connections (the device becomes
    unreachable); ``start()`` again on the same port brings it back with the model's current values.
    """

    def __init__(self, model: MachineModel, *, host: str = "127.0.0.1", port: int = 5020, unit_id: int = 1,
                 material_per_part: float = 0.25, framing: str = "tcp") -> None:
        self.layout = layout_for(model.counter_bits, model.signed)
        if not 0 <= unit_id <= 255:
            raise ValueError("unit_id must be within 0..255")
        self.model = model
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.material_per_part = material_per_part
        if framing not in ("tcp", "rtu"):
            raise ValueError("framing must be 'tcp' (MBAP header) or 'rtu' (RTU frames over TCP, like a serial gateway)")
        self.framing = framing
        self._image: list[int] = [0] * REGISTER_COUNT
        self._extra: dict[int, int] = {}
        self._server: ModbusTcpServer | None = None
        self._exception: ExcCodes | None = None
        self._block_exceptions: list[tuple[int | None, range, ExcCodes]] = []
        self._holds: list[tuple[int | None, range, asyncio.Event]] = []
        self.held = 0  # requests being held now (see hold)
        # the reset-on-read registers: the model's good count at their last read
        self._read_base: dict[int, int] = {a: model.good_raw for a in _RESET_ON_READ}
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
        extra: dict[int, int] = {}
        good = m.raw_register_value("good") & 0xFFFFFFFF
        material = struct.unpack(">I", struct.pack(">f", m.good_raw * self.material_per_part))[0]
        for i, order in enumerate(("ABCD", "CDAB", "BADC", "DCBA")):
            extra[100 + 2 * i], extra[101 + 2 * i] = layout_words(good, order)
            extra[110 + 2 * i], extra[111 + 2 * i] = layout_words(material, order)
        flags = (1 if m.state == "running" else 0) | (2 if m.operation_complete else 0)
        extra[200] = extra[201] = flags
        self._image, self._extra = img, extra  # replaced as a whole: a request never sees half an update

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
        for fc, addresses, release in list(self._holds):  # the holds in force when the request came
            if (fc is None or fc == function_code) and address in addresses and not release.is_set():
                self.held += 1
                try:
                    await release.wait()
                finally:
                    self.held -= 1
        if self._exception is not None:
            return self._exception
        for fc, addresses, code in self._block_exceptions:
            if (fc is None or fc == function_code) and address in addresses:
                return code
        img, extra = self._image, self._extra
        n = min(len(img), len(current_registers) - start_address)
        current_registers[0:n] = img[start_address : start_address + n]
        for a, v in extra.items():
            if 0 <= a - start_address < len(current_registers):
                current_registers[a - start_address] = v
        if function_code in (3, 4):
            for a, n in _RESET_ON_READ.items():
                if address < a + n and a < address + count:  # this read covers the register: it returns and clears
                    good = self.model.good_raw
                    since, self._read_base[a] = good - self._read_base[a], good
                    words = [since & 0xFFFF] if n == 1 else [(since >> 16) & 0xFFFF, since & 0xFFFF]
                    for k, w in enumerate(words):
                        if 0 <= a + k - start_address < len(current_registers):
                            current_registers[a + k - start_address] = w
        return None

    def hold(self, *, addresses: range, function_code: int | None = None) -> asyncio.Event:
        """Hold the answer to requests starting at one of these addresses (a slow module, a busy device) until the
        returned event is set; ``held`` counts the requests waiting."""
        release = asyncio.Event()
        self._holds.append((function_code, addresses, release))
        return release

    def set_exception(self, code: ExcCodes | None, *, addresses: range | None = None,
                      function_code: int | None = None) -> None:
        """Answer requests with this Modbus exception (e.g. ``ExcCodes.DEVICE_BUSY``) until set to None.

        Without ``addresses``: every request. With ``addresses`` (and optionally ``function_code``): only requests
        starting at one of these addresses (in the function's units: bits for FC1/FC2), like a device whose one
        module is faulty; ``set_exception(None)`` clears every rule."""
        if code is None:
            self._exception = None
            self._block_exceptions = []
        elif addresses is None:
            self._exception = code
        else:
            self._block_exceptions.append((function_code, addresses, code))

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
            simdata=[SimData(address=0, count=REGISTER_COUNT, values=0, datatype=DataType.REGISTERS, readonly=True)]
            + [SimData(address=a, count=n, values=0, datatype=DataType.REGISTERS, readonly=True) for a, n in _EXTRA_AREAS],
            use_bit_addressing=True,  # coil/discrete input N = bit N % 16 of register N // 16
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port),
                                 framer=FramerType.RTU if self.framing == "rtu" else FramerType.SOCKET)
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
