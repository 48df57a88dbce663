"""What one quantity report costs in the engine and the encoder, in this process (no gateway, no store, no MQTT).

The Node-RED peer's gateway config (``bench/peer_nodered.gateway_config``: 3,333 machines of three uint16 counters,
reporting every 5 s): every machine gets a baseline, then four polls of plain increases through
``mappings.machine.apply_run`` (as a Modbus block of plain registers reaches the core), then each stage once per
machine: ``MachineEngine.tick`` at the window's end (the fold, the report and its data), ``EventEncoder.encode`` of
the report, ``MachineEngine.snapshot_json`` after it (what the commit stores with the report). Prints one JSON line:
median µs per machine (= per report) of each stage over ``--rounds`` rounds (``time.process_time``, garbage
collector off while timing). The gateway pays about twice these (bench/README.md, "eighth session": ``--insitu`` of
``bench/ab_gateway.py``): compare checkouts with this, not with the README's figures.

    .venv/bin/python bench/report_cost.py [--rounds 7]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import argparse
import gc
import json
import statistics
import time

from bench.common import ident
from bench.peer_nodered import gateway_config
from gateway.config import parse_config
from gateway.events import EventEncoder, Topics
from gateway.runtime import machine_specs
from mappings.machine import MachineEngine, apply_run
from mappings.samples import Sample

SIGNALS = ("good", "scrap", "rework")


def _slow(i: int) -> None:
    raise AssertionError(f"reading {i} left the fast path")


def one_round(specs: list, enc: EventEncoder) -> dict[str, float]:
    engines = [MachineEngine(s) for s in specs]
    routes = [(e, e.cell(sig)) for e in engines for sig in SIGNALS]
    t0, m0 = 1_800_000_000.0, 1000.0
    for e in engines:
        for sig in SIGNALS:
            e.apply(Sample(f"{e.spec.id}/{sig}", 0, True, t0, mono=m0), sig)
    gc.collect()
    gc.disable()
    try:
        a = time.process_time()
        for k in range(1, 5):
            apply_run(routes, [10 * k] * len(routes), t0 + k, m0 + k, _slow)
        b = time.process_time()
        drafts = []
        for e in engines:
            drafts += e.tick(m0 + 6)
        c = time.process_time()
        for seq, d in enumerate(drafts, 1):
            enc.encode(d, seq)
        d_ = time.process_time()
        for e in engines:
            e.snapshot_json()
        f = time.process_time()
    finally:
        gc.enable()
    n = len(engines)
    assert len(drafts) == n, f"{len(drafts)} reports from {n} machines"
    return {"apply_run_4_polls": (b - a) / n * 1e6, "tick": (c - b) / n * 1e6, "encode": (d_ - c) / n * 1e6,
            "snapshot": (f - d_) / n * 1e6, "report": (f - b) / n * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    cfg = parse_config(gateway_config(10000, 1.0, 1, 1, "/nonexistent/gw.db", 5.0), "<bench>")
    specs = machine_specs(cfg)
    enc = EventEncoder(ident(), Topics("edge", ident()), "0" * 32)
    rounds = [one_round(specs, enc) for _ in range(args.rounds)]
    print(json.dumps({"name": "report_cost", "unit": "us per report", "machines": len(specs),
                      **{k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}}))


if __name__ == "__main__":
    main()
