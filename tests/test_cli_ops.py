"""Operator commands: --version, init, schema --config, and bad input answered with a clear error (no traceback):
a closed pipe, non-numeric --ids, retrying an id that is not quarantined."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

from gateway.config import load_config
from gateway.store import OutboxRow, Store

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(EXE + list(args), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, **kw)


def closed_pipe(*args: str) -> tuple[int, str]:
    """Run with stdout a pipe whose reader is already gone (`... | head` once head has exited)."""
    proc = subprocess.Popen(EXE + list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    return proc.wait(timeout=60), err


def test_version_is_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"edge-gateway {version}"


def test_init_writes_a_starter_config_that_validates_and_never_overwrites(tmp_path):
    path = tmp_path / "gw.yaml"
    proc = run("init", str(path))
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    assert "edge-gateway validate gw.yaml" in text
    cfg = load_config(path)
    assert cfg.machines[0].counters["good"].connector == cfg.connectors[0].id
    # the starter config is annotated: most keys carry a comment
    assert sum(1 for ln in text.splitlines() if "#" in ln) > 30
    schema = json.loads(run("schema", "--config").stdout)
    jsonschema.validators.validator_for(schema)(schema).validate(yaml.safe_load(text))
    assert run("validate", str(path)).returncode == 0

    path.write_text("mine\n")
    proc = run("init", str(path))
    assert proc.returncode == 1
    assert "exists; not overwritten" in proc.stderr and "Traceback" not in proc.stderr
    assert path.read_text() == "mine\n"


def test_schema_config_to_a_file_is_a_json_schema(tmp_path):
    out = tmp_path / "edge-gateway.schema.json"
    assert run("schema", "--config", "--out", str(out)).returncode == 0
    schema = json.loads(out.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "connectors" in schema["properties"] and "tls" in schema["$defs"]["MqttConfig"]["properties"]


def test_schema_into_a_closed_pipe_stops_quietly():
    for args in (("schema", "--config"), ("schema",), ("schema", "--config", "--markdown")):
        rc, err = closed_pipe(*args)
        assert rc == 141, (args, err)
        assert err == "", (args, err)


def _store_with_rows(tmp_path: Path) -> Path:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"id": "g", "enterprise": "e", "site": "s", "area": "a", "line": "l"},
                                   "store": {"path": "gw.db"}}))

    async def fill() -> None:
        async with Store(str(tmp_path / "gw.db")) as s:
            rows = [OutboxRow(i, "m1", "t", "edge/t", json.dumps({"seq": i}).encode()) for i in range(1, 6)]
            committed = await s.commit({}, rows, 6)
            await s.quarantine(committed[0].id, "refused by the broker (test)")

    asyncio.run(fill())
    return cfg


def test_buffer_export_into_a_closed_pipe_stops_quietly(tmp_path):
    cfg = _store_with_rows(tmp_path)
    rc, err = closed_pipe("buffer", "export", "--config", str(cfg))
    assert rc == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_non_numeric_ids_is_a_usage_error(tmp_path):
    cfg = _store_with_rows(tmp_path)
    for bad in ("abc", "1,x", "1;2", "-3"):
        proc = run("buffer", "retry", "--config", str(cfg), "--ids", bad)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert re.search(r"--ids: expected comma-separated row ids .* got '" + re.escape(bad) + "'", proc.stderr), \
            proc.stderr


def test_retry_of_an_id_that_is_not_quarantined_names_it_and_changes_nothing(tmp_path):
    cfg = _store_with_rows(tmp_path)
    db = tmp_path / "gw.db"
    with sqlite3.connect(db) as c:
        (qid,) = c.execute("SELECT qid FROM quarantine").fetchone()
    before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM outbox").fetchone()
    proc = run("buffer", "retry", "--config", str(cfg), "--ids", f"{qid},999")
    assert proc.returncode == 1, proc.stderr
    assert "no quarantined event with id 999; nothing changed" in proc.stderr
    assert "buffer list --quarantine" in proc.stderr and "Traceback" not in proc.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM quarantine").fetchone() == (1,)
        assert c.execute("SELECT COUNT(*) FROM outbox").fetchone() == before
    # the right id works
    proc = run("buffer", "retry", "--config", str(cfg), "--ids", str(qid))
    assert proc.returncode == 0, proc.stderr
    assert "moved 1 quarantined events" in proc.stdout
    # purging an id that is not there is refused the same way
    proc = run("buffer", "purge", "--config", str(cfg), "--ids", "424242", "--yes")
    assert proc.returncode == 1 and "no outbox row with id 424242" in proc.stderr


def test_buffer_list_shows_rfc3339_times(tmp_path):
    cfg = _store_with_rows(tmp_path)
    out = json.loads(run("buffer", "list", "--config", str(cfg)).stdout)
    assert out["rows"] and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", r["created"]) for r in out["rows"])
    q = json.loads(run("buffer", "list", "--quarantine", "--config", str(cfg)).stdout)
    assert q["rows"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", q["rows"][0]["at"])


def test_license_file_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    # the full text: all nine sections and the appendix
    for section in ("1. Definitions.", "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS", "APPENDIX: How to apply the Apache License to your work."):
        assert section in text, section


def test_readme_leads_with_what_a_user_does():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[1] == ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[demo]' && .venv/bin/edge-gateway "
                        "demo --duration 30")
    assert block[4] == "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
    heads = re.findall(r"(?m)^## (.+)$", text)
    user = ["Quick start with your machines", "Configure", "Run as a service", "Monitor", "Integrate with the ERP"]
    assert [h for h in heads if h in user] == user
    assert heads.index("Integrate with the ERP") < heads.index("Commands") < heads.index("How it works") \
        < heads.index("Performance")
    assert "docs/configuration.md" in text and "# yaml-language-server: $schema=" in text
    # the profiling notes live with the benchmarks; the performance table stays
    assert "| `throughput.one_event_per_message` |" in text
    assert "## The last measurement, in short" in (ROOT / "bench" / "README.md").read_text()


def test_a_store_of_a_newer_schema_is_refused_in_one_line_and_left_as_it_is(tmp_path):
    """An upgrade rolled back: the older version refuses the store (it would start every machine afresh), one line
    naming the store and the way out, non-zero exit, no traceback; ``run`` likewise (before it connects anywhere)."""
    cfg = _store_with_rows(tmp_path)
    db = tmp_path / "gw.db"
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value = '7' WHERE key = 'schema'")
    for argv in (("buffer", "list"), ("run",)):
        proc = run(*argv, "--config", str(cfg))
        assert proc.returncode == 1, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert f"{db} was written by a newer edge-gateway (store schema 7; this version reads schema 3 and older): " \
               "run that version, or start this one on a new store file" in proc.stderr, proc.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("7",)
        assert c.execute("SELECT COUNT(*) FROM outbox").fetchone() == (4,)
