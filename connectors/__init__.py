"""Protocol adapters. Adding a protocol: one folder plus one line in REGISTRY (no import-time magic).

The line names the connector's config model (joins the config's ``connectors`` union), its tag model (the address
keys of a binding), the connector class and, optionally, its ``validate --online`` check. gateway/config.py asks a tag
model about counters through optional methods: ``counter_width()`` (bits, signed) implied by the address,
``counter_problems(bits)``, ``float_meter_problems(resolution_set)`` and ``holds_float`` (see connectors/modbus/config.py);
a protocol whose widths come from the server (OPC UA) has none of them."""

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
    # "module:function" of ``validate --online``: ``async (connector config, [(label, kind, binding, address)]) ->
    # number of problems``, printing one line per tag (kind: counter, material, integer, float, flag, text, state)
    online_check: str | None = None

    def load(self) -> Any:
        return _load(self.factory)

    def load_online_check(self) -> Any:
        return None if self.online_check is None else _load(self.online_check)


def _load(ref: str) -> Any:
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, ConnectorKind] = {
    "opcua": ConnectorKind("opcua", OpcUaConnectorConfig, OpcUaTagConfig, "connectors.opcua.connector:OpcUaConnector",
                           "connectors.opcua.inspect:check_online"),
    "modbus": ConnectorKind("modbus", ModbusConnectorConfig, ModbusTagConfig, "connectors.modbus.connector:ModbusConnector",
                            "connectors.modbus.probe:check_online"),
}
