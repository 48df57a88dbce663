"""Configuration of the Modbus TCP connector (the gateway polls a device)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DATA_TYPE_REGISTERS = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "uint64": 4,
    "int64": 4,
    "float32": 2,
    "float64": 4,
}
DataType = Literal["uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64", "string", "bool"]
WordOrder = Literal["big", "little", "ABCD", "CDAB", "BADC", "DCBA"]
BIT_TABLES = ("coil", "discrete_input")
#: function code of each table's read
FUNCTION_CODES = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}
MAX_GAP = 8
"""Default for ``max_gap_registers``: most unused registers read between two tags to merge them into one request."""


#: integer data types: (bits, signed) of a counter read from them
DATA_TYPE_WIDTH = {"uint16": (16, False), "int16": (16, True), "uint32": (32, False), "int32": (32, True),
                   "uint64": (64, False), "int64": (64, True)}
FLOAT_TYPES = ("float32", "float64")


class ModbusTagConfig(BaseModel):
    """Where a Modbus value lives: table, 0-based address, data type and layout (word and byte order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: int = Field(ge=0, le=65535, description="0-based register (or bit) address (40001 is address 0).")
    table: Literal["holding", "input", "coil", "discrete_input"] = Field(
        "holding", description="holding (FC3), input (FC4), coil (FC1) or discrete_input (FC2); the bit tables hold flags."
    )
    data_type: DataType = Field("uint16", description="How the registers are decoded; 'bool' for coil/discrete_input.")
    word_order: WordOrder = Field(
        "big",
        description="Layout of multi-register values, A = most significant byte: ABCD (= 'big', high word first), "
        "CDAB (= 'little', low word first), BADC and DCBA (bytes swapped inside each register; also for 16-bit values).",
    )
    length: int | None = Field(None, ge=1, le=125, description="Number of registers of a 'string' value.")

    @property
    def count(self) -> int:
        """Registers (bits for a coil / discrete input) the value occupies."""
        if self.data_type == "string":
            return self.length or 0
        if self.data_type == "bool":
            return 1
        return DATA_TYPE_REGISTERS[self.data_type]

    @property
    def words_swapped(self) -> bool:
        return self.word_order in ("little", "CDAB", "DCBA")

    @property
    def bytes_swapped(self) -> bool:
        return self.word_order in ("BADC", "DCBA")

    # ---- what the gateway's config checks ask a tag model about counters (gateway/config.py knows no protocol)

    def counter_width(self) -> tuple[int, bool] | None:
        """(bits, signed) a counter read from this address has by its data type; None: not an integer type."""
        return DATA_TYPE_WIDTH.get(self.data_type)

    @property
    def holds_float(self) -> bool:
        return self.data_type in FLOAT_TYPES

    def counter_problems(self, bits: int | None) -> list[tuple[str, str]]:
        """(field, message) of what is wrong with a piece counter (or integer meter) at this address."""
        dt = self.data_type
        if dt in FLOAT_TYPES:
            return [("data_type", (f"a piece counter must be an integer type (uint16, int16, uint32, int32, uint64, "
                                   f"int64), got {dt!r}; a float totaliser is a material meter (materials:) with a "
                                   "resolution"))]
        if dt not in DATA_TYPE_WIDTH:
            return [("data_type", (f"a counter must be an integer type (uint16, int16, uint32, int32, uint64, "
                                   f"int64), got {dt!r}"))]
        if bits is not None and bits != DATA_TYPE_WIDTH[dt][0]:
            return [("bits", f"bits={bits} contradicts data_type {dt} ({DATA_TYPE_WIDTH[dt][0]} bits); remove 'bits'")]
        return []

    def float_meter_problems(self, resolution_set: bool) -> list[tuple[str, str]]:
        """(field, message) of what is wrong with a float meter (a resolution given, or a float type) here."""
        dt = self.data_type
        if dt not in FLOAT_TYPES:
            return [("resolution", (f"resolution is for float meters (data_type float32/float64), not {dt}: "
                                    "remove it, or set data_type"))]
        if not resolution_set:
            return [("resolution", (f"a {dt} meter needs a resolution: the quantity step its reading is "
                                    "rounded to, e.g. resolution: 0.01"))]
        return []

    @model_validator(mode="before")
    @classmethod
    def _bit_default(cls, data: object) -> object:
        # a coil or discrete input is a bit: data_type defaults to bool there
        if isinstance(data, dict) and data.get("table") in BIT_TABLES and "data_type" not in data:
            return {**data, "data_type": "bool"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModbusTagConfig":
        if self.table in BIT_TABLES:
            if self.data_type != "bool":
                raise ValueError(f"a {self.table.replace('_', ' ')} holds one bit: data_type must be 'bool', "
                                 f"not '{self.data_type}'")
            if "word_order" in self.model_fields_set:
                raise ValueError(f"word_order does not apply to a {self.table.replace('_', ' ')} (one bit)")
        elif self.data_type == "bool":
            raise ValueError("data_type 'bool' is read from a coil or discrete_input table (FC1/FC2); "
                             "set table: coil or table: discrete_input")
        if self.data_type == "string" and self.length is None:
            raise ValueError("a 'string' value needs 'length' (number of registers, 2 characters each)")
        if self.data_type != "string" and self.length is not None:
            raise ValueError(f"'length' only applies to data_type 'string', not '{self.data_type}'")
        if self.address + self.count > 65536:
            raise ValueError(f"address {self.address} + {self.count} registers runs past the last register 65535")
        return self


class ModbusConnectorConfig(BaseModel):
    """A Modbus TCP device (or gateway) the connector polls."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["modbus"]
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique connector id, referenced by machine counters.")
    host: str = Field(min_length=1, description="Device host name or IP address.")
    port: int = Field(502, ge=1, le=65535, description="TCP port.")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (device/slave) id.")
    framing: Literal["tcp", "rtu"] = Field(
        "tcp", description="'tcp': Modbus TCP (MBAP header); 'rtu': RTU frames with CRC over the TCP connection, "
        "as spoken by many serial-to-Ethernet converters."
    )
    poll_interval_s: float = Field(0.5, ge=0.01, le=3600, description="Polling interval.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Request timeout.")
    max_block_registers: int = Field(
        120, ge=1, le=125, description="Largest block read in one request; adjacent tags are read together."
    )
    max_block_bits: int = Field(
        2000, ge=1, le=2000, description="Largest coil / discrete input block read in one request (Modbus allows 2000)."
    )
    max_gap_registers: int = Field(
        MAX_GAP, ge=0, le=124, description="Most unused registers (bits for coils) read inside a block to merge two "
        "tags into one request; 0 for devices that refuse any unmapped address."
    )
