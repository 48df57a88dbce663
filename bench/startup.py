"""Start time: from ``edge-gateway run`` to the first sample in the core, with 10,000 Modbus tags / 3,333 machines.

    python bench/startup.py [--registers 10000] [--rounds 3]

The device (``bench/nodered/counter_device.py``, 10,000 holding registers) and a private mosquitto run in their own
processes; the gateway is started as an operator starts it (``python -m gateway.cli run --config FILE``, a YAML file
of 3,333 machines of three counters, the Node-RED peer benchmark's map), ``--rounds`` times on a fresh store. The
figure is the gateway's own ``core.first_samples`` log line, ``process_age_s`` (seconds since the process started:
interpreter start, imports, config load and validation, store open, Modbus connect and first poll), next to the
wall time seen from outside (spawn → that line). Baseline in the same run: a bare ``python -c "import yaml,
pydantic"`` (the floor of starting any Python program with these libraries on this machine). Target: under 2 s.

The project's modules are byte-compiled first (``compileall``), as ``pip install`` does for an installed gateway
and any start after the first does where Python may write its cache: with an editable install and
``PYTHONDONTWRITEBYTECODE=1`` (set on some build machines) every start compiled ~12,000 lines again, ~0.3 s of a
1.7 s start on a slow guest (bench/README.md, fourteenth session).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

from bench.common import BenchBroker, BenchFailed, ROOT, main
from bench.peer_nodered import Device, gateway_config


def one_start(registers: int, device_port: int, broker_port: int, workdir: str) -> tuple[float, float]:
    cfg = gateway_config(registers, 1.0, device_port, broker_port, os.path.join(workdir, "gw.db"), 5.0)
    cfg["logging"] = {"format": "json", "level": "info"}
    path = os.path.join(workdir, "gateway.yaml")
    Path(path).write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", path], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"core.first_samples"' in line:
                wall = time.monotonic() - t0
                return float(json.loads(line)["process_age_s"]), wall
        raise BenchFailed(f"the gateway ended without a first sample (exit {proc.wait()})")
    finally:
        proc.terminate()
        proc.wait(30)


def body(args: Any, res: Any) -> None:
    workdir = tempfile.mkdtemp(prefix="bench-startup-")
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "import yaml, pydantic"], check=True)
    floor = time.monotonic() - t
    # the bytecode an installed gateway has (pip compiles at install); written into __pycache__ (git-ignored)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "gateway", "connectors", "mappings"], cwd=str(ROOT),
                   check=True)
    device = Device(args.registers, workdir)
    broker = BenchBroker(workdir).start()
    try:
        ages, walls = [], []
        for i in range(args.rounds):
            run_dir = os.path.join(workdir, f"run{i}")
            os.makedirs(run_dir)
            age, wall = one_start(args.registers, device.port, broker.port, run_dir)
            ages.append(age)
            walls.append(wall)
    finally:
        broker.stop()
        device.stop()
    med = statistics.median(ages)
    res.add("first_sample", med, "s", baseline=floor, baseline_name="python -c 'import yaml, pydantic'",
            target="< 2 s", met=med < 2.0,
            settings={"registers": args.registers, "machines": args.registers // 3, "rounds": args.rounds,
                      "bytecode": "compiled before the rounds (compileall), as after pip install"},
            process_age_s=ages, wall_s=[round(w, 3) for w in walls])


def add_args(p: Any) -> None:
    p.add_argument("--registers", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)


if __name__ == "__main__":
    main("startup", body, add_args, __doc__ or "")
