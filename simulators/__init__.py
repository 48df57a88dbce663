"""Machine simulators: deterministic machine models served over real OPC UA and Modbus TCP servers.

``MachineModel`` (simulators.machine) holds raw PLC counters plus the ground truth of parts made;
``OpcUaMachineServer`` and ``ModbusMachineServer`` expose a model on the network.
Server classes are imported lazily so that using the model does not load asyncua/pymodbus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .machine import MachineModel

if TYPE_CHECKING:  # pragma: no cover
    from .modbus_server import ModbusMachineServer
    from .opcua_server import OpcUaMachineServer

__all__ = ["MachineModel", "ModbusMachineServer", "OpcUaMachineServer"]

_LAZY = {
    "OpcUaMachineServer": ".opcua_server",
    "ModbusMachineServer": ".modbus_server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
