"""``mqtt.broker_kind: nats``: nats-server 2.9 closes the MQTT connection on a topic containing '.'
(tests/test_nats_cluster.py::test_topic_with_a_dot_is_refused), so a config that would publish or subscribe to such a
topic is refused by validate and by start-up, naming the field and the fix. The accepted shape (3.1.1, batch mode)
is what the fleet test and `edge-gateway demo --fleet` run against a real NATS cluster."""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "examples" / "nats-cluster.yaml"


@contextlib.contextmanager
def nats_with_user(tmp_path: Path) -> Iterator[int]:
    """A bare nats-server (no JetStream) with the user erp / S3cretPw, on a free port (skips without nats-server)."""
    from simulators.nats_cluster import find_nats_server
    from simulators.ports import free_port

    try:
        exe = find_nats_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nauthorization {{ user: erp, password: "S3cretPw" }}\n')
    server = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        server.terminate()
        server.wait(10)


def _doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _problems(doc: dict) -> dict[str, str]:
    try:
        parse_config(doc, "nats.yaml")
    except ConfigError as exc:
        return {p.path: p.message for p in exc.problems}
    return {}


def _set(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def test_the_example_is_accepted():
    assert _problems(_doc()) == {}


@pytest.mark.parametrize("path,value,field", [
    (("mqtt", "batch_max_events"), 0, "mqtt.batch_max_events"),
    (("mqtt", "batch_max_events"), 1, "mqtt.batch_max_events"),  # 1 publishes on the per-type topics
    (("mqtt", "protocol"), "5", "mqtt.protocol"),
    (("mqtt", "topic_root"), "edge.v2", "mqtt.topic_root"),
    (("gateway", "line"), "line.1", "gateway.line"),
    (("gateway", "id"), "gw.01", "gateway.id"),
    (("machines", 0, "id"), "press.1", "machines[0].id"),
])
def test_each_dotted_topic_is_refused_for_nats(path, value, field):
    problems = _problems(_set(_doc(), path, value))
    assert list(problems) == [field], problems


def test_a_plain_mqtt_broker_keeps_accepting_dots():
    doc = _set(_set(_doc(), ("mqtt", "broker_kind"), "mqtt"), ("machines", 0, "id"), "press.1")
    doc = _set(_set(doc, ("mqtt", "batch_max_events"), 0), ("mqtt", "protocol"), "5")
    assert _problems(doc) == {}


def test_start_up_refuses_it_too(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(_set(_doc(), ("mqtt", "batch_max_events"), 0)))
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(cfg)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{cfg}" in proc.stderr and "mqtt.batch_max_events: is 0" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before opening the store


async def test_nats_credentials_come_from_the_environment_and_never_reach_the_log(tmp_path, monkeypatch):
    """The ERP service's NATS user and password: never in the YAML (a server URL with credentials is refused), the
    password from nats.password_env. Against a nats-server with a user: the right password connects; a wrong one is
    retried with erp.nats_error, and no log line shows it (nor any server URL's credentials: ``redact``)."""
    import asyncio

    import pydantic
    import pytest
    import structlog

    from erp_service.config import ServiceConfig
    from erp_service.consumers import NatsSource, redact
    from erp_service.metrics import Metrics

    assert redact("nats://erp:S3cretPw@10.0.0.1:4222, tls://u@h") == "nats://***@10.0.0.1:4222, tls://***@h"
    with pytest.raises(pydantic.ValidationError, match="never credentials in the YAML"):
        ServiceConfig.model_validate({"nats": {"servers": ["nats://erp:S3cretPw@127.0.0.1:4222"]}})
    with pytest.raises(pydantic.ValidationError, match="go together"):
        ServiceConfig.model_validate({"nats": {"user": "erp"}})
    with nats_with_user(tmp_path) as port:
        cfg = ServiceConfig.model_validate({"nats": {"servers": [f"nats://127.0.0.1:{port}"], "user": "erp",
                                                     "password_env": "ERP_TEST_NATS_PW"}})
        monkeypatch.setenv("ERP_TEST_NATS_PW", "S3cretPw")
        src = NatsSource(cfg.nats, cfg.topic_root, Metrics(), "all")
        # connected and authorized; the stream behind it is not there (no JetStream on this bare server), so the
        # consumer's set-up that follows fails: only the connection is looked at here
        src.ensure_consumer = lambda *a, **k: asyncio.sleep(0)  # type: ignore[method-assign]
        await asyncio.wait_for(src.connect(), 15)
        assert src.nc is not None and src.nc.is_connected
        await src.nc.close()
        monkeypatch.setenv("ERP_TEST_NATS_PW", "wrong-Pw-123")
        src = NatsSource(cfg.nats, cfg.topic_root, Metrics(), "all")
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(src.connect())
            for _ in range(200):
                if any(e["event"] == "erp.nats_error" for e in logs):
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert any(e["event"] == "erp.nats_error" for e in logs), logs
        assert "S3cretPw" not in repr(logs) and "wrong-Pw-123" not in repr(logs)
        monkeypatch.delenv("ERP_TEST_NATS_PW")
        with pytest.raises(ValueError, match="ERP_TEST_NATS_PW"):
            await NatsSource(cfg.nats, cfg.topic_root, Metrics(), "all").connect()


async def test_relative_nats_secret_files_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """``nats.password_file`` / ``nats.creds_file`` given relative: relative to the ERP service's config file (as the
    gateway's ``*_file`` keys are), not to the working directory it happens to be started from (systemd: /)."""
    import asyncio

    from erp_service.config import load_config
    from erp_service.consumers import NatsSource
    from erp_service.metrics import Metrics

    conf_dir = tmp_path / "etc"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "nats.pw").write_text("S3cretPw\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "secrets").mkdir()
    (elsewhere / "secrets" / "nats.pw").write_text("wrong-Pw-123\n")  # what the working directory would give
    monkeypatch.chdir(elsewhere)
    with_creds = conf_dir / "creds.yaml"
    with_creds.write_text(yaml.safe_dump({"nats": {"creds_file": "secrets/erp.creds"}}))
    assert load_config(with_creds).nats.auth() == {"user_credentials": str(conf_dir / "secrets" / "erp.creds")}
    absolute = conf_dir / "abs.yaml"
    absolute.write_text(yaml.safe_dump({"nats": {"creds_file": "/run/secrets/erp.creds"}}))
    assert load_config(absolute).nats.creds_file == "/run/secrets/erp.creds"
    with nats_with_user(tmp_path) as port:
        cfg_file = conf_dir / "erp.yaml"
        cfg_file.write_text(yaml.safe_dump({"nats": {"servers": [f"nats://127.0.0.1:{port}"], "user": "erp",
                                                     "password_file": "secrets/nats.pw"}}))
        cfg = load_config(cfg_file)
        assert cfg.nats.password_file == str(conf_dir / "secrets" / "nats.pw")
        src = NatsSource(cfg.nats, cfg.topic_root, Metrics(), "all")
        src.ensure_consumer = lambda *a, **k: asyncio.sleep(0)  # type: ignore[method-assign]
        await asyncio.wait_for(src.connect(), 15)  # the password from the config's folder: authorized
        assert src.nc is not None and src.nc.is_connected
        await src.nc.close()
