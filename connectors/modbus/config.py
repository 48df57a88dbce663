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
DataType = Literal["uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64", "string"]


class ModbusTagConfig(BaseModel):
    """Where a Modbus value lives: register table, 0-based address, data type and word order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: int = Field(ge=0, le=65535, description="0-based register address (40001 is address 0).")
    table: Literal["holding", "input"] = Field("holding", description="Register table: holding (FC3) or input (FC4).")
    data_type: DataType = Field("uint16", description="How the registers are decoded.")
    word_order: Literal["big", "little"] = Field(
        "big", description="Order of 16-bit words in multi-register values ('big' = high word first)."
    )
    length: int | None = Field(None, ge=1, le=125, description="Number of registers of a 'string' value.")

    @property
    def count(self) -> int:
        if self.data_type == "string":
            return self.length or 0
        return DATA_TYPE_REGISTERS[self.data_type]

    @model_validator(mode="after")
    def _check(self) -> "ModbusTagConfig":
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
    poll_interval_s: float = Field(0.5, ge=0.01, le=3600, description="Polling interval.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Request timeout.")
    max_block_registers: int = Field(
        120, ge=1, le=125, description="Largest block read in one request; adjacent tags are read together."
    )
