"""``edge-gateway-erp`` as a process: config validation exit codes, run + HTTP surface, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import json
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from erp_service.testing import throwaway_database
from simulators.ports import free_port
from tests.faults import Gate

SECRET = "n0t-in-any-log"

ROOT = Path(__file__).resolve().parents[1]


async def _cli(*args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "erp_service.cli", *args, cwd=ROOT,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, out.decode()


async def test_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"source": "mqtt", "workers": 3}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"source": "kafka", "workers": 0, "nats": {"durable": "a b"}}))
    rc, out = await _cli("validate", "--config", str(good))
    assert rc == 0 and "OK (source mqtt, 3 workers" in out
    rc, out = await _cli("validate", "--config", str(bad))
    assert rc == 2
    assert "source" in out and "workers" in out and "nats.durable" in out and "Traceback" not in out


async def test_run_serves_health_and_stops_on_sigterm(tmp_path, mqtt_broker):
    port = free_port()
    async with throwaway_database() as dsn:
        cfg = tmp_path / "erp.yaml"
        cfg.write_text(yaml.safe_dump({"source": "mqtt", "workers": 1, "postgres": {"dsn": dsn},
                                       "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port},
                                       "http": {"port": port}, "logging": {"format": "json"}}))
        log = tmp_path / "erp.log"
        with open(log, "wb") as f:
            p = await asyncio.create_subprocess_exec(sys.executable, "-m", "erp_service.cli", "run", "--config",
                                                     str(cfg), cwd=ROOT, stdout=f, stderr=f)
        try:
            ready = {}

            async def probe() -> None:
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                        ready["status"] = r.status

            async def is_ready() -> bool:
                try:
                    await probe()
                except aiohttp.ClientError:
                    return False
                return ready.get("status") == 200

            deadline = asyncio.get_running_loop().time() + 30
            while not await is_ready():
                assert asyncio.get_running_loop().time() < deadline, log.read_text()[-2000:]
                await asyncio.sleep(0.1)
            p.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(p.wait(), 20) == 0
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()
        events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
        assert "erp.started" in events and events[-1] == "erp.stopped"


async def test_bad_timezone_and_top_level_are_named_without_traceback(tmp_path):
    tz = tmp_path / "tz.yaml"
    tz.write_text("timezone: Mars/Olympus\n")
    rc, out = await _cli("validate", "--config", str(tz))
    assert rc == 2 and "timezone: " in out and "'Mars/Olympus' is not an IANA time zone" in out
    assert "Traceback" not in out
    top = tmp_path / "list.yaml"
    top.write_text("- a\n")
    rc, out = await _cli("validate", "--config", str(top))
    assert rc == 2 and "(top level): " in out


async def test_sigterm_while_nats_is_unreachable_stops_it(tmp_path):
    """start() keeps retrying an unreachable NATS; a SIGTERM meanwhile ends the process (it used to hang forever),
    and the failed attempts (one every 0.5 s) are logged once, not each."""
    async with throwaway_database() as dsn:
        cfg = tmp_path / "erp.yaml"
        cfg.write_text(yaml.safe_dump({"source": "nats", "postgres": {"dsn": dsn},
                                       "nats": {"servers": [f"nats://127.0.0.1:{free_port()}"]},
                                       "http": {"port": 0}, "logging": {"format": "json"}}))
        log = tmp_path / "erp.log"
        with open(log, "wb") as f:
            p = await asyncio.create_subprocess_exec(sys.executable, "-m", "erp_service.cli", "run", "--config",
                                                     str(cfg), cwd=ROOT, stdout=f, stderr=f)

        def events() -> list[str]:
            return [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]

        try:
            deadline = asyncio.get_running_loop().time() + 30
            while "erp.nats_error" not in events():
                assert p.returncode is None and asyncio.get_running_loop().time() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # three more failed attempts: must not be logged again
            p.send_signal(signal.SIGTERM)
            try:
                assert await asyncio.wait_for(p.wait(), 15) == 0
            except TimeoutError:
                raise AssertionError(f"not stopped 15 s after SIGTERM:\n{log.read_text()[-3000:]}") from None
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()
        ev = events()
        assert ev.count("erp.nats_error") == 1, ev
        assert "erp.start_interrupted" in ev and ev[-1] == "erp.stopped" and "Traceback" not in log.read_text()


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def test_sigterm_while_waiting_for_postgres_exits_0(tmp_path):
    """PostgreSQL unreachable at start (a proxy that drops every connection): the process keeps running, logs
    erp.postgres_unreachable once, answers /ready 503 and /health 200; a SIGTERM meanwhile ends it with exit code 0,
    no traceback (it used to exit 1 at once: erp.start_failed)."""
    gate = await Gate(5432).start()
    cfg = tmp_path / "erp.yaml"
    cfg.write_text(yaml.safe_dump({"source": "mqtt", "logging": {"format": "json"}, "http": {"port": 0},
                                   "postgres": {"dsn": f"postgresql://postgres@127.0.0.1:{gate.port}/x",
                                                "backoff_initial_s": 0.05, "backoff_max_s": 0.2}}))
    log = tmp_path / "erp.log"
    with open(log, "wb") as f:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "erp_service.cli", "run", "--config", str(cfg),
                                                 cwd=ROOT, stdout=f, stderr=f,
                                                 env={**os.environ, "PGPASSWORD": f"pw-{SECRET}"})
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while gate.refused < 3 or "erp.http_listening" not in [e["event"] for e in _events(log)]:
            assert p.returncode is None and asyncio.get_running_loop().time() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        port = next(e["port"] for e in _events(log) if e["event"] == "erp.http_listening")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                assert r.status == 503 and (await r.json())["reason"].startswith("waiting for PostgreSQL")
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                assert r.status == 200 and (await r.json())["waiting"]["for"] == "postgres"
        p.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.wait(), 5) == 0
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
        await gate.close()
    ev = [e["event"] for e in _events(log)]
    assert ev.count("erp.postgres_unreachable") == 1, ev
    assert "erp.start_interrupted" in ev and ev[-1] == "erp.stopped"
    assert "Traceback" not in log.read_text() and SECRET not in log.read_text()


async def test_postgres_dsn_retrying_cannot_fix_exits_2(tmp_path):
    """Not retried: a DSN libpq cannot parse is refused by validate and run (exit 2, the field named, the quoted
    fragment that may be the password not echoed); one whose values libpq refuses before contacting any server
    (port=abc) stops run with erp.config_invalid, exit 2."""
    unparsable = tmp_path / "unparsable.yaml"
    unparsable.write_text(yaml.safe_dump({"postgres": {"dsn": f"host=127.0.0.1 password=pw {SECRET} dbname=x"}}))
    for cmd in ("validate", "run"):
        rc, out = await _cli(cmd, "--config", str(unparsable))
        assert rc == 2 and "postgres.dsn: " in out and "not a libpq connection string" in out, out
        assert SECRET not in out and "Traceback" not in out
    bad_port = tmp_path / "port.yaml"
    bad_port.write_text(yaml.safe_dump({"source": "mqtt", "http": {"port": 0}, "logging": {"format": "json"},
                                        "postgres": {"dsn": "host=127.0.0.1 port=abc dbname=x"}}))
    rc, out = await _cli("run", "--config", str(bad_port))
    errors = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"erp.config_invalid"' in line]
    assert rc == 2 and len(errors) == 1 and "invalid integer value" in errors[0]["error"], out
    assert "postgres.dsn" in errors[0]["error"] and "erp.postgres_unreachable" not in out and "Traceback" not in out


async def test_a_password_in_the_postgres_dsn_is_refused_and_a_yaml_error_echoes_no_text(tmp_path):
    """Secrets come from the environment or files, never the YAML: a DSN with a password is refused (exit 2, the field
    and the fix named, the password not echoed; red before: accepted, and one with an unencoded '@' was logged as the
    host). A YAML syntax error names the line, not the text there (red before: the line was printed)."""
    for dsn in (f"postgresql://erp:Sup3r@{SECRET}@127.0.0.1/x", f"host=127.0.0.1 password={SECRET} dbname=x"):
        cfg = tmp_path / "erp.yaml"
        cfg.write_text(yaml.safe_dump({"postgres": {"dsn": dsn}}))
        rc, out = await _cli("validate", "--config", str(cfg))
        assert rc == 2 and "postgres.dsn: " in out and "PGPASSWORD" in out, out
        assert SECRET not in out and "Traceback" not in out
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"postgres:\n  dsn: postgresql://erp:pa: {SECRET}@db/x\n")
    rc, out = await _cli("validate", "--config", str(broken))
    assert rc == 2 and "not valid YAML" in out and "line 2" in out, out
    assert SECRET not in out and "Traceback" not in out


async def test_erp_credentials_are_both_given_and_the_password_is_set(tmp_path):
    """erp.username needs erp.password_env (and the reverse): refused by validate; a password variable that is not
    set stops run with erp.config_invalid, exit 2 (red before: an empty password was sent in its place, silently)."""
    cfg = tmp_path / "erp.yaml"
    for erp in ({"username": "EDGE_ERP"}, {"password_env": "SAP_PW"}):
        cfg.write_text(yaml.safe_dump({"erp": erp}))
        rc, out = await _cli("validate", "--config", str(cfg))
        assert rc == 2 and "username and password_env go together" in out, out
    cfg.write_text(yaml.safe_dump({"source": "mqtt", "http": {"port": 0}, "logging": {"format": "json"},
                                   "erp": {"username": "EDGE_ERP", "password_env": "NO_SUCH_SAP_PW_FOR_TEST"}}))
    rc, out = await _cli("run", "--config", str(cfg))
    errors = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"erp.config_invalid"' in line]
    assert rc == 2 and errors and "NO_SUCH_SAP_PW_FOR_TEST" in errors[0]["error"], out
    assert "Traceback" not in out
