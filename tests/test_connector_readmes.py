"""Each connector's README documents every option: its configuration sample is a valid config, and every field of
the connector's config model, of its tag model and of the counter / meter bindings is named in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from connectors import REGISTRY
from gateway.config import CounterConfig, MaterialMeterConfig, StateConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_readme_sample_is_valid_and_names_every_option(kind: str) -> None:
    path = ROOT / "connectors" / kind / "README.md"
    text = path.read_text()
    block = re.search(r"## Configuration\n\n```yaml\n(.*?)```", text, re.DOTALL)
    assert block, f"{path}: no '## Configuration' section with a yaml sample"
    doc = yaml.safe_load(block.group(1))
    doc["gateway"] = {"id": "gw", "enterprise": "e", "site": "s", "area": "a", "line": "l"}
    parse_config(doc, str(path))  # raises ConfigError naming the field
    k = REGISTRY[kind]
    fields = set(k.config_model.model_fields) | set(k.tag_model.model_fields) | set(CounterConfig.model_fields) \
        | set(MaterialMeterConfig.model_fields) | set(StateConfig.model_fields)
    missing = sorted(f for f in fields if not re.search(rf"\b{re.escape(f)}\b", text))
    assert not missing, f"{path}: options not documented: {missing}"
