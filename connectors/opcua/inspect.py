"""One-shot OPC UA tools for engineers: ``browse`` (address space as a tree) and the node checks of
``validate --online``. Both open the session exactly like the connector (:mod:`connectors.opcua.session`):
same endpoint selection, certificate, trust store and user token.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua

from connectors.opcua.config import OpcUaConnectorConfig
from connectors.opcua.pki import CertificateRefused, Pki
from connectors.opcua.session import SecurityRefused, SessionSecurity, prepare_client

INTEGER_TYPES = {"SByte": 8, "Byte": 8, "Int16": 16, "UInt16": 16, "Int32": 32, "UInt32": 32, "Int64": 64, "UInt64": 64}
_SERVER_OBJECT = ua.NodeId(ua.ObjectIds.Server)
_MAX_NODES_PER_READ = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
#: client of an open tool session -> the server's MaxNodesPerRead (0: no limit)
_read_limits: weakref.WeakKeyDictionary[Client, int] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def session(cfg: OpcUaConnectorConfig) -> AsyncIterator[tuple[Client, SessionSecurity, list[str]]]:
    """A connected client (and what security was chosen, and the namespace array); closed on exit."""
    client = Client(cfg.endpoint, timeout=cfg.timeout_s)
    client.name = client.description = f"edge-gateway tools {cfg.id}"
    client.application_uri = cfg.own_application_uri
    security = await prepare_client(client, cfg, cfg.timeout_s)
    await asyncio.wait_for(client.connect(), cfg.timeout_s)
    try:
        namespaces = list(await client.get_namespace_array())
        dv = (await client.uaclient.read_attributes([_MAX_NODES_PER_READ], ua.AttributeIds.Value))[0]
        limit = dv.Value.Value if dv.StatusCode.is_good() and dv.Value is not None else None
        _read_limits[client] = int(limit) if isinstance(limit, int) and limit > 0 else 0
        yield client, security, namespaces
    finally:
        _read_limits.pop(client, None)
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(client.disconnect(), 3)


def resolve(text: str, namespaces: list[str]) -> ua.NodeId:
    """``ns=``/``nsu=`` node id string → NodeId of this server (KeyError: namespace URI unknown)."""
    nid = ua.NodeId.from_string(text)
    uri = getattr(nid, "NamespaceUri", None)
    if uri:
        if uri not in namespaces:
            raise KeyError(f"namespace {uri} is not on the server (it has: {', '.join(namespaces)})")
        return ua.NodeId(nid.Identifier, namespaces.index(uri), nid.NodeIdType)
    return ua.NodeId(nid.Identifier, nid.NamespaceIndex, nid.NodeIdType)


def nsu(nid: ua.NodeId, namespaces: list[str]) -> str:
    """The node id in the restart-proof ``nsu=URI;s=...`` form (namespace 0 stays ``i=...``)."""
    kind = {ua.NodeIdType.String: "s", ua.NodeIdType.Guid: "g", ua.NodeIdType.ByteString: "b"}.get(nid.NodeIdType, "i")
    ident = nid.Identifier.hex() if isinstance(nid.Identifier, bytes) else nid.Identifier
    if nid.NamespaceIndex == 0 or nid.NamespaceIndex >= len(namespaces):
        return nid.to_string()
    return f"nsu={namespaces[nid.NamespaceIndex]};{kind}={ident}"


def type_name(dt: Any) -> str:
    """Name of a DataType node id (built-in types by name, others as their node id)."""
    if isinstance(dt, ua.NodeId) and dt.NamespaceIndex == 0 and isinstance(dt.Identifier, int):
        try:
            return ua.VariantType(dt.Identifier).name
        except ValueError:
            return ua.ObjectIdNames.get(dt.Identifier, dt.to_string())
    return dt.to_string() if isinstance(dt, ua.NodeId) else str(dt)


def _access(level: Any) -> str:
    if not isinstance(level, int):
        return "-"
    return ("r" if level & 1 else "-") + ("w" if level & 2 else "-")


def _show(value: Any) -> str:
    if isinstance(value, ua.LocalizedText):
        value = value.Text
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class VariableInfo:
    node_class: str
    data_type: str | None = None
    access: str = "-"
    value: Any = None
    status: str = "Good"


async def read_info(client: Client, nid: ua.NodeId) -> VariableInfo:
    """Node class, and for a variable its data type, access level and current value (one Read)."""
    attrs = [ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.AccessLevel, ua.AttributeIds.Value]
    # one Read, or several when the server's MaxNodesPerRead is smaller (a strict server refuses the request whole)
    size = _read_limits.get(client) or len(attrs)
    dvs: list[ua.DataValue] = []
    for i in range(0, len(attrs), size):
        dvs.extend(await client.uaclient.read(ua.ReadParameters(
            NodesToRead=[ua.ReadValueId(NodeId=nid, AttributeId=a) for a in attrs[i:i + size]])))
    if not dvs[0].StatusCode.is_good():
        return VariableInfo("?", status=dvs[0].StatusCode.name)
    node_class = ua.NodeClass(dvs[0].Value.Value).name
    if node_class != "Variable":
        return VariableInfo(node_class)
    value_dv = dvs[3]
    return VariableInfo(
        node_class,
        data_type=type_name(dvs[1].Value.Value) if dvs[1].StatusCode.is_good() else None,
        access=_access(dvs[2].Value.Value if dvs[2].StatusCode.is_good() else None),
        value=value_dv.Value.Value if value_dv.Value is not None else None,
        status=value_dv.StatusCode.name if value_dv.StatusCode is not None else "Good",
    )


async def browse(client: Client, namespaces: list[str], start: ua.NodeId, depth: int,
                 variables: list[tuple[str, str, str | None]] | None = None) -> list[str]:
    """The tree under ``start`` (``depth`` levels), one line per node:
    ``name  node-id  Variable DataType access = value``. The standard Server object is not descended into.
    ``variables``, when given, receives (browse name, nsu= node id, data type) of every variable listed."""
    lines: list[str] = []
    root_name = (await client.get_node(start).read_browse_name()).Name
    info = await read_info(client, start)
    lines.append(_line("", root_name, start, info, namespaces))

    async def walk(nid: ua.NodeId, prefix: str, level: int) -> None:
        if level >= depth or nid == _SERVER_OBJECT and nid != start:
            return
        refs = await client.get_node(nid).get_references(
            refs=ua.ObjectIds.HierarchicalReferences, direction=ua.BrowseDirection.Forward)
        refs = sorted(refs, key=lambda r: r.BrowseName.Name or "")
        for i, ref in enumerate(refs):
            last = i == len(refs) - 1
            child = ua.NodeId(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex, ref.NodeId.NodeIdType)
            child_info = await read_info(client, child)
            if variables is not None and child_info.node_class == "Variable":
                variables.append((ref.BrowseName.Name, nsu(child, namespaces), child_info.data_type))
            lines.append(_line(prefix + ("└─ " if last else "├─ "), ref.BrowseName.Name, child, child_info, namespaces))
            await walk(child, prefix + ("   " if last else "│  "), level + 1)

    await walk(start, "", 0)
    return lines


def _line(prefix: str, name: str, nid: ua.NodeId, info: VariableInfo, namespaces: list[str]) -> str:
    out = f"{prefix}{name}  {nsu(nid, namespaces)}  {info.node_class}"
    if info.node_class == "Variable":
        out += f" {info.data_type or '?'} {info.access}"
        out += f" = {_show(info.value)}" if info.status == "Good" else f" ({info.status})"
    return out


def config_line(connector: str, name: str, node_id: str, data_type: str | None) -> str:
    """A YAML binding for a variable found by browse (counter width from the data type)."""
    extra = ""
    width = INTEGER_TYPES.get(data_type or "")
    if width in (16, 32, 64):
        extra = f", bits: {width}" + (", signed: true" if (data_type or "").startswith("Int") else "")
    elif data_type == "Byte":
        extra = ", max_value: 255"
    line = f'{name}: {{connector: {connector}, node_id: "{node_id}"{extra}}}'
    if data_type in ("Float", "Double"):
        line = (f'{name}: {{connector: {connector}, node_id: "{node_id}", resolution: 0.01}}  # {data_type}: a material '
                "meter (under materials:, with its unit); set the resolution")
    return line


async def check_tag(client: Client, namespaces: list[str], node_id: str, kind: str, bits: int | None) -> tuple[bool, str]:
    """Does ``node_id`` exist, is it a readable variable, and does its type fit a tag of ``kind``
    (counter, material, integer: a counter with max_value, flag, text, state)? ``bits``: the counter width
    configured, if any. Returns (ok, what was found or what is wrong)."""
    try:
        nid = resolve(node_id, namespaces)
    except KeyError as exc:
        return False, str(exc.args[0])
    info = await read_info(client, nid)
    if info.node_class == "?":
        return False, f"node does not exist ({info.status})"
    if info.node_class != "Variable":
        return False, f"node is a {info.node_class}, not a variable"
    if "r" not in info.access:
        return False, "variable is not readable"
    dt = info.data_type or "?"
    found = f"{dt} = {_show(info.value)}" if info.status == "Good" else f"{dt} ({info.status})"
    if kind == "float":  # a float meter (resolution configured)
        if dt not in ("Float", "Double"):
            return False, f"resolution is configured (a float meter) but the node is {dt}: remove resolution"
        return True, found
    if kind in ("counter", "material", "integer"):
        width = INTEGER_TYPES.get(dt)
        if width is None:
            if kind == "material" and dt in ("Float", "Double"):
                return False, f"the node is {dt}: a float totaliser needs a resolution (e.g. resolution: 0.01)"
            return False, f"a counter needs an integer node, this one is {dt}"
        if kind == "integer":  # max_value given: the width does not matter
            return True, found
        if bits is None:  # the gateway takes the width from the node at every connect
            return True, f"{found} (wraps at 2^{width}, from the node's data type)"
        if width != bits:
            return False, (f"bits: {bits} is configured but the node is {dt} ({width} bits): it would wrap at a "
                           f"different value; set bits: {width} or remove it")
    elif kind == "flag" and dt != "Boolean" and dt not in INTEGER_TYPES:
        return False, f"a flag needs a Boolean or integer node, this one is {dt}"
    elif kind == "text" and dt != "String" and dt not in INTEGER_TYPES:
        return False, f"an order/operation number needs a String or integer node, this one is {dt}"
    return True, found


def failure_text(exc: BaseException, cfg: OpcUaConnectorConfig) -> str:
    """One line (two for an untrusted certificate: the command that trusts it) for a failed tool session."""
    if isinstance(exc, CertificateRefused):
        if exc.reason == "untrusted":
            return f"{exc}\ntrust it with: edge-gateway pki trust --pki-dir {Pki(cfg.pki_dir).root} {exc.thumbprint}"
        return str(exc)
    if isinstance(exc, SecurityRefused):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer from {cfg.endpoint} within {cfg.timeout_s}s"
    return f"cannot connect to {cfg.endpoint}: {type(exc).__name__}: {exc}"


async def check_online(c: OpcUaConnectorConfig, items: list[tuple[str, str, Any, Any]]) -> int:
    """``validate --online`` for one OPC UA connector (see connectors/__init__.py): connect like the connector, check
    every tag with :func:`check_tag`, one line each; returns the number of problems."""
    import logging

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    problems = 0
    try:
        async with session(c) as (client, security, namespaces):
            print(f"connector {c.id} ({c.endpoint}): connected, {security.policy}/{security.mode}, "
                  f"{security.user_token}")
            for label, kind, b, addr in items:
                ok, what = await check_tag(client, namespaces, addr.node_id, kind, getattr(b, "bits", None))
                problems += not ok
                print(f"  {label}: {addr.node_id}: {'ok, ' if ok else 'PROBLEM: '}{what}")
    except Exception as exc:  # noqa: BLE001 - every failure is one line for the engineer, never a traceback
        problems += 1
        print(f"connector {c.id} ({c.endpoint}): PROBLEM: {failure_text(exc, c)}")
    return problems
