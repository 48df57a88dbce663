"""Memory: resident set size of a gateway process with 10,000 tags configured and 1,000,000 events in the backlog.

This process fills an outbox file with N realistic events (Store.commit, as bench/backlog.py) and starts a bench
Modbus device (bench/tag_server.py, 2,500 machines x 4 registers = 10,000 tags, changing at 1-10 Hz). A fresh child
process (so nothing of the fill counts) then runs the gateway (gateway.runtime.Gateway, config built in code, one
Modbus connector polling every 0.5 s, the connector default) on that store:

- phase 1, ``--hold`` s: the broker is down, the backlog stays in the store (it only grows by the gateway's own
  events); the gateway polls all 10,000 tags;
- phase 2, ``--drain`` s: the child starts mosquitto (default config) and the publisher drains the backlog.

Reported: VmHWM (peak RSS) of the gateway process over both phases, VmRSS at the end of each phase. Baseline in the
same run: a fresh child that imports the same modules (gateway, connectors, asyncua, pymodbus, paho, aiosqlite) and
nothing else: the interpreter + libraries floor.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from typing import Any

from bench.common import BenchBroker, BenchFailed, ident, main, quiet_logs, rss_mb, scratch_dir
from gateway import loops

HERE = Path(__file__).resolve().parent


async def fill(path: str, n: int) -> float:
    from bench.backlog import FILL_BATCH, Filler
    from gateway.events import EventEncoder, Topics
    from gateway.store import Store

    store = Store(path)
    await store.open()
    try:
        ids = ident()
        filler = Filler(EventEncoder(ids, Topics("edge", ids), store.epoch))
        t0 = time.perf_counter()
        while filler.seq <= n:
            await store.commit({}, filler.rows(min(FILL_BATCH, n - filler.seq + 1)), filler.seq)
        return time.perf_counter() - t0
    finally:
        await store.close()


# ------------------------------------------------------------------------------------------------ child process
def child(args: argparse.Namespace) -> None:
    quiet_logs()
    import aiosqlite  # noqa: F401
    import asyncua  # noqa: F401
    import paho.mqtt.client  # noqa: F401
    import pymodbus.client  # noqa: F401

    import connectors.modbus.connector  # noqa: F401
    import connectors.opcua.connector  # noqa: F401
    from gateway.runtime import Gateway

    out: dict[str, Any] = {"imports": rss_mb()}
    if args.child == "baseline":
        print(json.dumps(out), flush=True)
        return
    from bench.tags import modbus_config
    from simulators.ports import free_port

    broker_port = free_port()
    cfg = modbus_config(args.machines, args.modbus_port, broker_port, args.store, 0.5)
    out["config"] = rss_mb()

    async def run() -> None:
        gw = Gateway(cfg)
        task = asyncio.create_task(gw.run(), name="gateway")
        broker = None
        try:
            await asyncio.wait_for(gw.started.wait(), 120)
            out["started"] = rss_mb()
            out["pending_at_start"] = gw.store.pending
            t0 = time.monotonic()
            peak1 = 0.0
            while time.monotonic() - t0 < args.hold:
                await asyncio.sleep(0.25)
                peak1 = max(peak1, rss_mb()["VmRSS"])
                if task.done():
                    task.result()
            out["hold"] = {**rss_mb(), "max_VmRSS": peak1, "samples": gw.stats.samples, "pending": gw.store.pending,
                           "skipped_polls": gw.connectors["mb"].skipped_polls, "tags": len(gw.core.routes.signal)}
            broker = BenchBroker(os.path.join(os.path.dirname(args.store), "broker"), port=broker_port)
            await broker.astart()
            t0 = time.monotonic()
            peak2 = 0.0
            while time.monotonic() - t0 < args.drain:
                await asyncio.sleep(0.25)
                peak2 = max(peak2, rss_mb()["VmRSS"])
                if task.done():
                    task.result()
            out["drain"] = {**rss_mb(), "max_VmRSS": peak2, "acked": gw.publisher.acked, "pending": gw.store.pending,
                            "samples": gw.stats.samples}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 30)
            if broker is not None:
                broker.close()
        out["end"] = rss_mb()

    loops.run(run())
    print(json.dumps(out), flush=True)


def run_child(kind: str, extra: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "memory.py"), "--child", kind, *extra]
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        err.seek(0)
        stderr = err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise BenchFailed(f"memory child ({kind}) failed with code {p.returncode}: {stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ main
def body(args: Any, res: Any) -> None:
    from bench.tags import TagServer

    quiet_logs()
    n = args.rows
    machines = args.tags // 4
    args.hold = args.hold or (120.0 if args.long else 15.0)
    args.drain = args.drain or (60.0 if args.long else 10.0)
    workdir = scratch_dir("memory")
    store = os.path.join(workdir, "outbox.db")
    fill_s = loops.run(fill(store, n))
    db_mb = sum(os.path.getsize(store + s) for s in ("", "-wal") if os.path.exists(store + s)) / 2**20
    print(f"# filled {n:,} rows in {fill_s:.1f} s ({db_mb:.0f} MB)", flush=True)
    base = run_child("baseline", [], 120)
    srv = TagServer("modbus", machines).wait_ready()
    try:
        ours = run_child("gateway", ["--store", store, "--modbus-port", str(srv.port), "--machines", str(machines),
                                     "--hold", str(args.hold), "--drain", str(args.drain)],
                         120 + args.hold + args.drain)
    finally:
        srv.stop()
    if ours.get("pending_at_start", 0) < n:
        raise BenchFailed(f"the gateway saw {ours.get('pending_at_start')} rows in the backlog, expected {n}")
    if ours["hold"]["tags"] < args.tags or ours["hold"]["samples"] < args.tags:
        raise BenchFailed(f"the gateway did not poll its {args.tags} tags: {ours['hold']}")
    peak = ours["end"]["VmHWM"]
    floor = base["imports"]["VmRSS"]
    full = n >= 1_000_000 and args.tags >= 10_000
    settings = {"tags": args.tags, "machines": machines, "connector": "modbus, 1 device, poll 0.5 s, 84 blocks",
                "backlog_rows": n, "db_mb": round(db_mb), "hold_s": args.hold, "drain_s": args.drain,
                "measure": "VmHWM of the gateway process (fresh child), over start, hold (broker down) and drain"}
    res.add("rss_peak", peak, "MB", baseline=floor,
            baseline_name="fresh interpreter importing the same modules (gateway, asyncua, pymodbus, paho, aiosqlite)",
            target="< 150 MB", met=(peak < 150) if full else None, settings=settings,
            rss_after_imports_mb=round(ours["imports"]["VmRSS"], 1),
            rss_after_config_mb=round(ours["config"]["VmRSS"], 1),
            rss_started_mb=round(ours["started"]["VmRSS"], 1),
            rss_hold_end_mb=round(ours["hold"]["VmRSS"], 1), rss_hold_max_mb=round(ours["hold"]["max_VmRSS"], 1),
            rss_drain_end_mb=round(ours["drain"]["VmRSS"], 1), rss_drain_max_mb=round(ours["drain"]["max_VmRSS"], 1),
            drained_during_phase2=ours["drain"]["acked"], skipped_polls_hold=ours["hold"]["skipped_polls"])


def add_args(p: Any) -> None:
    p.add_argument("--rows", type=int, default=1_000_000, help="backlog rows")
    p.add_argument("--tags", type=int, default=10_000, help="Modbus tags (4 per machine)")
    p.add_argument("--hold", type=float, default=0.0, help="seconds with the broker down (15; --long 120)")
    p.add_argument("--drain", type=float, default=0.0, help="seconds with the broker up (10; --long 60)")


if __name__ == "__main__":
    if "--child" in sys.argv:
        cp = argparse.ArgumentParser()
        cp.add_argument("--child", choices=("baseline", "gateway"))
        cp.add_argument("--store")
        cp.add_argument("--modbus-port", type=int)
        cp.add_argument("--machines", type=int)
        cp.add_argument("--hold", type=float)
        cp.add_argument("--drain", type=float)
        child(cp.parse_args())
    else:
        main("memory", body, add_args, __doc__ or "")
