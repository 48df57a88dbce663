"""Protocol adapters. Adding a protocol: one folder plus one line in REGISTRY (no import-time magic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.modbus.config import ModbusConnectorConfig, ModbusTagConfig
from connectors.opcua.config import OpcUaConnectorConfig, OpcUaTagConfig


@dataclass(frozen=True)
class ConnectorKind:
    type: str
    config_model: type
    tag_model: type
    factory: str  # "module:Class", imported lazily so `validate` does not load protocol stacks

    def load(self) -> Any:
        import importlib

        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, ConnectorKind] = {
    "opcua": ConnectorKind("opcua", OpcUaConnectorConfig, OpcUaTagConfig, "connectors.opcua.connector:OpcUaConnector"),
    "modbus": ConnectorKind("modbus", ModbusConnectorConfig, ModbusTagConfig, "connectors.modbus.connector:ModbusConnector"),
}
