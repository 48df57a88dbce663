"""``edge-gateway demo --fleet``: the small fleet (2 gateway processes, a 3-node NATS cluster, 2 ERP workers,
PostgreSQL, the simulated SAP endpoint) run short through the real CLI; it ends with one exact comparison line and
exits 0 only when the ERP's postings equal the machines' truth. Missing nats-server / PostgreSQL: one line saying
what to install, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import yaml

from erp_service.testing import ADMIN_DSN
from gateway.demo_fleet import compare
from simulators.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli", "demo", "--fleet"]


def _fleet_databases() -> set[str]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
        return {r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname LIKE 'edge_erp_fleet_%'")}


def test_fleet_demo_short_run_ends_equal(tmp_path):
    proc = subprocess.run(EXE + ["--duration", "6", "--workdir", str(tmp_path)], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[-1].startswith("fleet demo: EQUAL: the ERP's postings equal the machines' truth for all 4 "
                                "order/operations"), lines[-3:]
    assert "order/operation" in proc.stdout and "ERP yield" in proc.stdout  # the table
    # the table's last rows: made good == ERP yield, made scrap == ERP scrap, final confirmation, per order
    rows = [ln.split() for ln in lines if ln.startswith("400000")][-4:]
    assert len(rows) == 4 and all(r[1] == r[2] and r[3] == r[4] and r[5] == "yes" for r in rows), rows
    assert sum(int(r[1]) for r in rows) > 0
    assert "Traceback" not in proc.stderr
    assert "fleet summary:" not in proc.stderr  # the scenario's JSON summary line is for tests, not the user
    # its throwaway database (named in the workers' config) was dropped
    dsn = yaml.safe_load((tmp_path / "erp.yaml").read_text())["postgres"]["dsn"]
    assert dsn.rsplit("/", 1)[1].startswith("edge_erp_fleet_")
    assert dsn.rsplit("/", 1)[1] not in _fleet_databases()


def test_fleet_demo_without_nats_server_says_what_to_install(tmp_path):
    env = dict(os.environ, EDGE_NATS_SERVER=str(tmp_path / "no-such-nats-server"))
    proc = subprocess.run(EXE + ["--duration", "5"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "nats-server binary not found" in err[0] and "apt-get install nats-server" in err[0], err
    assert proc.stdout == ""


def test_fleet_demo_without_postgres_says_what_to_install():
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    proc = subprocess.run(EXE + ["--duration", "5", "--postgres-dsn", dsn], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "PostgreSQL not reachable" in err[0] and "apt-get install postgresql" in err[0], err


def test_comparison_is_exact():
    truth = {"1/0010": {"good": 10, "scrap": 2}, "2/0010": {"good": 5, "scrap": 0}}
    posted = {"1/0010": {"yield": "10", "scrap": "2", "final": True}, "2/0010": {"yield": "5", "scrap": "0",
                                                                                  "final": True}}
    assert compare(truth, posted)[0]
    one_less = {**posted, "2/0010": {"yield": "4", "scrap": "0", "final": True}}
    ok, line = compare(truth, one_less)
    assert not ok and line == "fleet demo: DIFFERENT: 2/0010: made 5 good / 0 scrap, ERP 4 / 0", line
    assert not compare(truth, {**posted, "2/0010": {"yield": "5", "scrap": "0", "final": False}})[0]
    assert not compare(truth, {"1/0010": posted["1/0010"]})[0]
    assert not compare(truth, {**posted, "3/0010": {"yield": "1", "scrap": "0", "final": True}})[0]
    assert not compare({}, {})[0]  # nothing produced is not a success


def test_fleet_demo_refuses_a_bad_dsn_or_duration_in_one_line():
    for args, want in ((["--postgres-dsn", "garbage=="], "--postgres-dsn is not a valid libpq DSN"),
                       (["--duration", "-1"], "--duration must be a number of seconds > 0")):
        proc = subprocess.run(EXE + args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and want in err[0] and "install" not in err[0], err
        assert proc.stdout == ""
