"""Issue 10's seams, checked on the import statements (AST): the domain (mappings/) imports no connector and nothing
of the gateway; the gateway's config and MQTT link import no protocol package (connectors reach the config through
connectors.REGISTRY only); the shared infrastructure (backoff, component status) comes from gateway.component, not
connectors/base.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = sorted(p.name for p in (ROOT / "connectors").iterdir() if (p / "__init__.py").exists())


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, at any depth (lazy imports inside functions too)."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "mappings").glob("*.py")), ids=lambda p: p.name)
def test_the_domain_imports_no_connector_and_no_gateway(path: Path) -> None:
    bad = [m for m, _ in imports(path) if m.split(".")[0] in ("connectors", "gateway")]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", ["config.py", "mqtt.py", "core.py", "store.py", "counter_specs.py", "runtime.py"])
def test_the_gateway_knows_no_protocol_package(name: str) -> None:
    assert PROTOCOLS == ["modbus", "opcua"]
    bad = [m for m, _ in imports(ROOT / "gateway" / name) if m.split(".")[:2][-1] in PROTOCOLS
           and m.startswith("connectors.")]
    assert bad == [], f"gateway/{name} imports {bad}: go through connectors.REGISTRY"


def test_shared_infrastructure_comes_from_gateway_component() -> None:
    for path in sorted((ROOT / "gateway").glob("*.py")) + sorted((ROOT / "connectors").rglob("*.py")):
        for module, names in imports(path):
            if module == "connectors.base":
                shared = {"Backoff", "ComponentState", "ComponentStatus"} & set(names)
                assert not shared, f"{path.relative_to(ROOT)} imports {shared} from connectors.base"


def test_gateway_config_names_no_protocol() -> None:
    """gateway/config.py builds the connector union from the registry and asks the tag models about counters: no
    branch on a protocol's name (``ctype == "modbus"``) and no table of a protocol's data types."""
    tree = ast.parse((ROOT / "gateway" / "config.py").read_text())
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in PROTOCOLS]
    assert names == []
    types = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in ("uint16", "float32")]
    assert types == []


def test_a_gateway_without_its_http_api_does_not_load_aiohttp() -> None:
    """The HTTP API is off by default; what `edge-gateway run` imports without it must not pull aiohttp in (~9 MB
    of RSS and ~0.1 s of start time at every start, bench/startup.py and bench/memory.py)."""
    import subprocess
    import sys

    code = ("import sys; import gateway.cli, gateway.runtime, gateway.service, gateway.reload, gateway.component; "
            "from gateway.component import HttpListenError; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out


def _wait_for_calls(path: Path) -> list[int]:
    """Lines of ``asyncio.wait_for(...)`` calls in ``path``."""
    return [n.lineno for n in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "wait_for"
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "asyncio"]


LONG_RUNNING = ["connectors/modbus/connector.py", "connectors/opcua/connector.py", "gateway/core.py",
                "gateway/mqtt.py", "gateway/store.py", "erp_service/consumers.py", "erp_service/poster.py"]


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_loops_that_are_cancelled_bound_their_awaits_with_asyncio_timeout(name: str) -> None:
    """On Python 3.11, ``asyncio.wait_for`` returns the awaited result, and loses the cancellation, when the task is
    cancelled in the same loop iteration as the awaited call completes (CPython gh-86296, fixed in 3.12). A
    connector's poll or watchdog loop awaits such a call every few hundred ms: a stop landing there was lost, and
    the loop ran on (CI: an OPC UA connector still running 9 s after its cancel). ``asyncio.timeout`` runs the call
    in the task itself, so a cancellation always arrives; these long-running loops use it."""
    assert _wait_for_calls(ROOT / name) == [], f"{name}: use `async with asyncio.timeout(...)`"
