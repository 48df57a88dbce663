"""The command line as a plant engineer uses it: real processes, exit codes, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, assert_ledger_matches, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def test_demo_exits_zero_with_ledger_equal_to_truth(tmp_path):
    proc = subprocess.run(EXE + ["demo", "--duration", "8", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT: ledger == truth for both machines" in proc.stdout
    assert "FINAL" in proc.stdout


def test_run_rejects_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: {id: g}\n")
    proc = subprocess.run(EXE + ["run", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}:1: gateway.enterprise: required field is missing" in proc.stderr


def test_run_refuses_a_missing_password_variable(tmp_path, mqtt_broker):
    cfg = {"gateway": IDENT, "mqtt": {"port": mqtt_broker.port, "username": "gw", "password_env": "NO_SUCH_VAR_FOR_TEST"}}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "NO_SUCH_VAR_FOR_TEST"}
    proc = subprocess.run(EXE + ["run", "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "NO_SUCH_VAR_FOR_TEST is not set" in proc.stderr


async def test_run_process_counts_and_stops_cleanly_on_sigterm(tmp_path, mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.02, seed=3, counter_bits=32)
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        tags = mb.tag_addresses()
        cfg = {
            "gateway": IDENT,
            "mqtt": {"port": mqtt_broker.port},
            "store": {"path": str(tmp_path / "gw.db")},
            "logging": {"format": "json"},
            "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05}],
            "machines": [{"id": "press-2", "counters": {"good": {"connector": "mb", **tags["good"]},
                                                        "scrap": {"connector": "mb", **tags["scrap"]}},
                          "reporting": {"interval_s": 0.5}}],
        }
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(cfg))
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-cli")
        await erp.start()
        proc = await asyncio.create_subprocess_exec(*EXE, "run", "--config", str(path), cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # parts made before the gateway first reads the counter are its baseline, not production: dispatch an
            # order and wait for operation.started (the changeover cut has read the counters by then)
            erp.dispatch(*[IDENT[k] for k in ("enterprise", "site", "area", "line")], "press-2", "9001", "0010")
            await wait_until(lambda: erp.events("operation.started"), timeout=30)
            model.set_order("9001", "0010")
            await model.produce(40, timeout=30)
            await assert_ledger_matches(erp, {"press-2": model})
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
            await erp.stop()
        assert proc.returncode == 0, err.decode()[-2000:]
        log = err.decode()
        assert '"event": "gateway.stopped"' in log, log[-2000:]
        assert '"event": "store.opened"' in log
