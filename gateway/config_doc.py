"""The configuration described from its models: a JSON Schema for editors (``edge-gateway schema --config``), the
key reference ``docs/configuration.md`` (``edge-gateway schema --config --markdown``) and the annotated starter config
(``edge-gateway init``).

Everything here is derived from the pydantic models of ``gateway/config.py`` and the connector models registered in
``connectors/__init__.py``, so a new key shows up in the schema and the reference by regenerating them
(``tests/test_config_reference.py`` fails until ``docs/configuration.md`` is regenerated).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from connectors import REGISTRY

REFERENCE = "docs/configuration.md"
REGENERATE = "edge-gateway schema --config --markdown > docs/configuration.md"

# models whose extra keys are the connector-specific address of a tag (node_id, address, ...)
_BINDING_MODELS = ("CounterConfig", "MaterialMeterConfig", "StateConfig", "TagConfig")


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the gateway config, usable as a ``yaml-language-server`` ``$schema``.

    The tag bindings (counters, materials, state and order tags) accept the address keys of every registered
    connector type (OPC UA ``node_id``, Modbus ``address`` ...); which of them apply depends on the connector the
    binding names, which ``edge-gateway validate`` checks."""
    from gateway.config import GatewayConfig

    schema = GatewayConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    address: dict[str, Any] = {}
    for kind in REGISTRY.values():
        tag_schema = kind.tag_model.model_json_schema()
        defs.update(tag_schema.pop("$defs", {}))
        for name, prop in tag_schema.get("properties", {}).items():
            prop = copy.deepcopy(prop)
            prop["description"] = f"({kind.type} connectors) " + prop.get("description", "")
            if name in address:  # the same key in two protocols: either form
                address[name] = {"anyOf": [address[name], prop], "description": address[name].get("description", "")}
            else:
                address[name] = prop
    for model in _BINDING_MODELS:
        d = defs.get(model)
        if d is None:
            continue
        for name, prop in address.items():
            d["properties"].setdefault(name, prop)
        d["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edge-gateway configuration"
    schema["description"] = (f"Configuration of edge-gateway (reference: {REFERENCE}). Check a file with "
                             "`edge-gateway validate FILE` (cross-field rules, connector addresses, line numbers).")
    head = ("$schema", "title", "description")
    return {k: schema[k] for k in head} | {k: v for k, v in schema.items() if k not in head}


# ---------------------------------------------------------------------------------------------------------------
# the Markdown reference


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _non_null(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The non-null alternative of an ``X | None`` (and whether null is allowed)."""
    alts = node.get("anyOf")
    if alts and any(a.get("type") == "null" for a in alts):
        rest = [a for a in alts if a.get("type") != "null"]
        if len(rest) == 1:
            return _resolve(rest[0], defs), True
    return _resolve(node, defs), False


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    node = _resolve(node, defs)
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "anyOf" in node:
        return " or ".join(dict.fromkeys(_type(a, defs) for a in node["anyOf"]))
    t = node.get("type", "any")
    if t == "array":
        return f"list of {_type(node.get('items', {}), defs)}"
    if t == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"mapping of {_type(node['additionalProperties'], defs)}"
    return {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean", "null": "null",
            "object": "mapping"}.get(t, t)


def _constraints(node: dict[str, Any], defs: dict[str, Any]) -> str:
    node, _ = _non_null(node, defs)
    out = []
    for key, text in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"),
                      ("exclusiveMaximum", "< {}"), ("minLength", "at least {} characters"),
                      ("maxLength", "at most {} characters"), ("maxItems", "at most {} items")):
        if key in node:
            out.append(text.format(node[key]))
    if "pattern" in node:
        out.append(f"pattern `{node['pattern']}`")
    for alt in node.get("anyOf", []):
        out += [c for c in _constraints(alt, defs).split("; ") if c]
    return "; ".join(dict.fromkeys(out))


def _default(node: dict[str, Any], required: bool, defs: dict[str, Any] | None = None) -> str:
    if required:
        return "**required**"
    if "default" in node:
        return f"`{json.dumps(node['default'], ensure_ascii=False)}`"
    target = _resolve(node, defs or {})
    if _is_model(target):
        return "(its defaults)"
    return {"array": "`[]`", "object": "`{}`"}.get(target.get("type", ""), "—")


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _is_model(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" in node


class _Sections:
    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.sections: list[tuple[str, str, list[str]]] = []  # (path, description, table rows)

    def model(self, path: str, model: dict[str, Any], description: str = "") -> None:
        rows: list[str] = []
        self.sections.append((path, description or model.get("description", ""), rows))
        nested: list[tuple[str, dict[str, Any], str]] = []
        required = set(model.get("required", []))
        for name, prop in model["properties"].items():
            key = f"{path}.{name}" if path else name
            target, _ = _non_null(prop, self.defs)
            desc = prop.get("description") or target.get("description", "")
            if name == "type" and "const" in target or (name == "type" and len(target.get("enum", [])) == 1):
                desc = desc or "Connector type."
            if _is_model(target):
                rows.append(f"| `{key}` | section | {_default(prop, name in required, self.defs)} "
                            f"| {_cell(desc)} (see [`{key}`](#{_anchor(key)})) |")
                nested.append((key, target, desc))
                continue
            if target.get("type") == "array":
                items = _resolve(target.get("items", {}), self.defs)
                variants = [_resolve(v, self.defs) for v in items.get("oneOf", [])]
                if variants:
                    tags = [v["properties"]["type"].get("const") or v["properties"]["type"]["enum"][0]
                            for v in variants]
                    links = ", ".join(f"[`{key}[type={t}]`](#{_anchor(f'{key}[type={t}]')})" for t in tags)
                    rows.append(f"| `{key}` | list | `[]` | {_cell(desc)}: one of {links} |")
                    nested += [(f"{key}[type={t}]", v, v.get("description", "")) for t, v in zip(tags, variants)]
                    continue
                if _is_model(items):
                    rows.append(f"| `{key}` | list | {_default(prop, name in required, self.defs)} | {_cell(desc)} "
                                f"(see [`{key}[]`](#{_anchor(key + '[]')})) |")
                    nested.append((f"{key}[]", items, items.get("description", "")))
                    continue
            extra = target.get("additionalProperties")
            if target.get("type") == "object" and isinstance(extra, dict) and _is_model(_resolve(extra, self.defs)):
                key_rules = target.get("propertyNames", {})
                names = key_rules.get("enum")
                sub = f"{key}.<name>"
                allowed = f" (names: {', '.join(f'`{n}`' for n in names)})" if names else ""
                if not names and key_rules:
                    allowed = f" (names: {_cell(_constraints(key_rules, self.defs))})"
                rows.append(f"| `{key}` | mapping | {_default(prop, name in required, self.defs)} | {_cell(desc)}"
                            f"{allowed} (see [`{sub}`](#{_anchor(sub)})) |")
                resolved = _resolve(extra, self.defs)
                nested.append((sub, resolved, (f"`<name>` is one of {', '.join(f'`{n}`' for n in names)}. "
                                               if names else "") + resolved.get("description", "")))
                continue
            cons = _constraints(prop, self.defs)
            rows.append(f"| `{key}` | {_type(prop, self.defs)} | {_default(prop, name in required, self.defs)} | "
                        f"{_cell(desc)}{' (' + _cell(cons) + ')' if cons else ''} |")
        for key, target, desc in nested:
            self.model(key, target, desc)


def _anchor(key: str) -> str:
    # GitHub heading anchors: lower case, punctuation dropped, spaces to '-'
    return "".join(ch for ch in key.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


_INTRO = """\
# Configuration reference

<!-- generated from the pydantic models by `{regenerate}`; do not edit by hand (tests/test_config_reference.py fails when a key is missing) -->

One YAML file describes the gateway: its identity, the MQTT broker, the store, logging, the local HTTP API, the connectors (one per PLC or device) and the machines with their counter bindings. Unknown keys are errors. `edge-gateway validate FILE` checks a file and names file, line, key and fix for every problem; `edge-gateway init` writes an annotated starter config; a worked example with two machines is [config/examples/two-machines.yaml](../config/examples/two-machines.yaml).

**Editor support**: `edge-gateway schema --config > edge-gateway.schema.json` writes a JSON Schema of this file. With the YAML language server (VS Code's YAML extension, neovim, ...) the first line

```yaml
# yaml-language-server: $schema=./edge-gateway.schema.json
```

gives completion, these descriptions on hover and errors as you type (the schema is looser than `validate`: cross-field rules and the connector-specific address keys are checked by `validate` only).

**Secrets** are never written in the file: passwords come from `*_env` (an environment variable) or `*_file` (a file's first line); a `password:` key is rejected.

**Tag bindings** (`counters`, `materials`, `state`, `order_tag`, `operation_tag`, `complete_tag`) name a connector and hold that connector type's address keys: `node_id` for OPC UA; `address`, `table`, `data_type`, `word_order`, `length` for Modbus.
"""


def config_markdown() -> str:
    """docs/configuration.md: every key of the config, generated from the models."""
    schema = config_json_schema()
    defs = schema["$defs"]
    s = _Sections(defs)
    s.model("", schema)
    out = [*_INTRO.format(regenerate=REGENERATE).splitlines(), ""]
    for path, desc, rows in s.sections:
        title = f"`{path}`" if path else "Top level"
        out += [f"## {title}" if path.count(".") == 0 and "[" not in path else f"### {title}", ""]
        if desc and path:
            out += [_cell(desc), ""]
        out += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# the starter config of `edge-gateway init`

STARTER = """\
# yaml-language-server: $schema=./edge-gateway.schema.json
# ^ editor completion and checks: write the schema next to this file with
#     edge-gateway schema --config > edge-gateway.schema.json
#
# edge-gateway starter configuration. Every key is described in docs/configuration.md
# (or: edge-gateway schema --config --markdown). Check this file with:
#     edge-gateway validate {name}
# and run it with:
#     edge-gateway run --config {name}

# Who this gateway is: the ISA-95 hierarchy is the topic layout (edge/v1/ENTERPRISE/SITE/AREA/LINE/MACHINE/...).
# Each value is one MQTT topic level: letters, digits, '_', '.', '-'.
gateway:
  id: gw-line-1
  enterprise: acme
  site: plant-1
  area: assembly
  line: line-1

# The MQTT broker the events go to (QoS 1) and ERP dispatches come from.
mqtt:
  host: 127.0.0.1
  port: 1883
  # username: edge-gateway
  # password_env: EDGE_GATEWAY_MQTT_PASSWORD   # the password comes from the environment (or password_file), never from here
  # tls:
  #   enabled: true
  #   ca_file: /etc/edge-gateway/ca.pem

# The local store-and-forward outbox (SQLite). A relative path is relative to this file's directory.
store:
  path: ./data/edge-gateway.db
  max_size_mb: 512            # cap on buffered events; past it quantities accumulate and an alarm is raised

logging:
  format: console             # json in production (one JSON object per line, for journald / a log shipper)
  level: info

# Local HTTP API (/health, /status, /metrics): off unless enabled; loopback only by default.
http:
  enabled: false
  host: 127.0.0.1
  port: 8780

# One connector per PLC / device. Find node ids with `edge-gateway browse opc.tcp://HOST:4840` and check Modbus
# registers with `edge-gateway probe modbus HOST --address N`.
connectors:
  - type: modbus
    id: press1-plc
    host: 192.0.2.10          # the PLC's address (this one is a documentation address: change it)
    port: 502
    unit_id: 1
    poll_interval_s: 0.5
  # - type: opcua
  #   id: press2-opc
  #   endpoint: opc.tcp://192.0.2.11:4840
  #   security: auto           # the strongest endpoint the server offers; never falls back to no security

# Machines whose counters are posted to production orders.
machines:
  - id: press-1
    name: Press 1
    order_source: mqtt        # the ERP dispatches orders (retained message); or 'tag' (PLC tags) or 'local'
    counters:
      good:                   # cumulative counter of good parts
        connector: press1-plc
        address: 0            # holding register 40001
        data_type: uint32
      scrap:
        connector: press1-plc
        address: 2
        data_type: uint32
    state:                    # optional machine state tag
      connector: press1-plc
      address: 4
      values: {{"0": idle, "1": running, "2": stopped}}
    reporting:
      interval_s: 5           # send a quantity report at least every 5 s while counts change
"""


def starter_config(name: str = "edge-gateway.yaml") -> str:
    return STARTER.format(name=name)
