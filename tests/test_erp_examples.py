"""The shipped examples for the fleet side are valid: the ERP service's config (config/erp/erp-service.yaml)
and the NATS node config (deploy/nats-server.conf: nats-server's own check, MQTT streams at 3 replicas)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from erp_service.config import load_config
from simulators.nats_cluster import find_nats_server

ROOT = Path(__file__).resolve().parents[1]


def test_erp_service_example_validates():
    cfg = load_config(ROOT / "config/erp/erp-service.yaml")
    assert cfg.source == "nats" and len(cfg.nats.servers) == 3 and cfg.erp.password_env and ":@" not in cfg.postgres.dsn


def test_nats_node_example_is_valid_and_replicates_mqtt_streams_three_times():
    try:
        exe = find_nats_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    conf = ROOT / "deploy/nats-server.conf"
    proc = subprocess.run([exe, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = conf.read_text()
    assert re.search(r"mqtt\s*\{[^}]*stream_replicas:\s*3\b", text), "an acknowledged event must survive one node's loss"
    assert re.search(r"^server_name:", text, re.MULTILINE) and "jetstream" in text and "routes:" in text
