"""docs/configuration.md and the config JSON Schema are generated from the models; these tests fail when a model key
is missing from the document (drift), when the document is stale, and when the schema disagrees with `validate`."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from connectors import REGISTRY
from gateway import config as gwconfig
from gateway.cli import main
from gateway.config_doc import (
    REGENERATE,
    config_json_schema,
    config_markdown,
    starter_config,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
BINDINGS = {gwconfig.CounterConfig, gwconfig.MaterialMeterConfig, gwconfig.StateConfig, gwconfig.TagConfig}


def _models_in(annotation: typing.Any) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) for every model an annotation holds: `X`, `X | None`, `list[X]` ('[]'),
    `dict[K, X]` ('.<name>'), a discriminated union of connector models ('[type=...]' per variant)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (typing.Union, types.UnionType):
        found = [m for a in args for m in _models_in(a)]
        if len(found) > 1:  # the connectors union: one variant per 'type'
            return [(f"[type={typing.get_args(m.model_fields['type'].annotation)[0]}]", m) for _, m in found]
        return found
    if origin is list:
        return [("[]" if not s.startswith("[type=") else s, m) for s, m in _models_in(args[0])]
    if origin is dict:
        return [(".<name>" + s, m) for s, m in _models_in(args[1])]
    return []


def model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the config, walked from the pydantic models (independently of the generator)."""
    out = []
    fields = list(model.model_fields)
    if model in BINDINGS:  # a tag binding also takes the address keys of every registered connector type
        fields += [f for kind in REGISTRY.values() for f in kind.tag_model.model_fields]
    for name in dict.fromkeys(fields):
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        info = model.model_fields.get(name)
        if info is None:
            continue
        for suffix, sub in _models_in(info.annotation):
            out += model_keys(sub, path + suffix)
    return out


def test_every_model_key_is_in_the_reference():
    text = DOC.read_text()
    keys = model_keys(gwconfig.GatewayConfig)
    assert len(keys) > 100
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"keys missing from {DOC.name}: {missing}; regenerate it: {REGENERATE}"


def test_keys_that_were_in_no_document_are_now_documented():
    text = DOC.read_text()
    for key in ("mqtt.tls.enabled", "mqtt.tls.ca_file", "http.enabled", "http.host", "http.token_env",
                "store.max_size_mb", "machines[].order_tag.connector", "machines[].operation_tag.node_id",
                "machines[].complete_tag.address", "connectors[type=modbus].framing"):
        assert f"| `{key}` |" in text, key


def test_reference_is_up_to_date():
    assert DOC.read_text() == config_markdown(), f"{DOC} is stale: {REGENERATE}"


def test_reference_is_what_the_cli_prints(capsys):
    assert main(["schema", "--config", "--markdown"]) == 0
    assert capsys.readouterr().out == DOC.read_text()


def _validator() -> jsonschema.protocols.Validator:
    schema = config_json_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_schema_accepts_the_examples(path):
    errors = list(_validator().iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


def test_schema_accepts_the_starter_config_and_catches_mistakes_as_validate_does(tmp_path):
    v = _validator()
    doc = yaml.safe_load(starter_config())
    assert not list(v.iter_errors(doc))
    bad = json.loads(json.dumps(doc))
    bad["mqtt"]["hots"] = "broker"  # typo
    bad["store"]["max_size_mb"] = "lots"  # wrong type
    bad["machines"][0]["counters"]["good"]["adress"] = 3  # typo in a binding
    bad["connectors"][0]["type"] = "profinet"  # unknown connector type
    paths = {tuple(e.absolute_path) for e in v.iter_errors(bad)}
    assert ("mqtt",) in paths and ("store", "max_size_mb") in paths
    assert ("machines", 0, "counters", "good") in paths and ("connectors", 0) in paths
    # validate rejects the same file, and points at the reference
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(gwconfig.ConfigError) as exc:
        gwconfig.load_config(f)
    found = {p.path for p in exc.value.problems}
    assert {"mqtt.hots", "store.max_size_mb"} <= found and any(p.startswith("connectors[0]") for p in found), found


def test_schema_tag_bindings_offer_the_connector_address_keys():
    defs = config_json_schema()["$defs"]
    for model in ("CounterConfig", "StateConfig", "TagConfig", "MaterialMeterConfig"):
        props = defs[model]["properties"]
        assert {"connector", "node_id", "address", "data_type", "word_order"} <= set(props), model
        assert defs[model]["additionalProperties"] is False


def test_validate_points_to_the_reference(tmp_path, capsys):
    f = tmp_path / "typo.yaml"
    f.write_text("gateway: {id: g, enterprise: e, site: s, area: a, line: l}\nmqtt: {hots: x}\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: mqtt.hots: unknown key; check the spelling (every key: docs/configuration.md" in err
    assert "every key, its type, default and allowed values: docs/configuration.md" in err
    assert "config/examples/ for every key" not in err
