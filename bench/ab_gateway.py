"""A/B of the gateway process alone at the Node-RED peer's load, for two or more checkouts of this repository.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/ab_gateway.py /tmp/before . --rounds 3            # 10,000 tags @ 1 s, 25 s windows
    .venv/bin/python bench/ab_gateway.py /tmp/before . --load 5000@0.2 --window 20

Each round runs every checkout once, in turn (interleaved, so a drift of the machine hits all alike), on
``bench/peer_nodered.py``'s device, broker and gateway config: one gateway process (``python -m gateway.cli run`` from
that checkout, this venv), warmed up, then measured over the window. Per run it prints one JSON line: CPU µs per
polled tag, CPU of the whole process and per thread (the main thread, SQLite's, paho's...; user and system, from
``/proc/PID/task``), RSS, and the events delivered per second. A developer's tool, not part of ``bench/run``: it
writes no results file.

Compare only runs with the same ``delivered_per_s``: a change that moves where reporting windows close changes the
amount of work, not its cost (bench/README.md, sixth session: 1 s timer slots made 806 reports/s instead of 667).
The summary at the end warns when the rates of the checkouts differ by more than 2 %.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.peer_nodered as peer  # noqa: E402
from bench.common import BenchBroker  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
INSITU = Path(__file__).resolve().parent / "insitu"  # its sitecustomize.py times hot functions (--insitu)


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of ``pid``: (user s, system s). The main thread is "main", others "<comm>/<tid>"."""
    out: dict[str, tuple[float, float]] = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            stat = Path(task, "stat").read_text()
            comm = Path(task, "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        tid = task.rsplit("/", 1)[1]
        name = "main" if tid == str(pid) else f"{comm}/{tid}"
        out[name] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def run_one(root: str, n: int, poll_s: float, broker: BenchBroker, sub: Any, work: str, args: Any) -> dict[str, Any]:
    peer.ROOT = Path(root).resolve()  # start_gateway runs the gateway from (and with PYTHONPATH on) this checkout
    window = peer.window_for(args.window, poll_s)
    per_thread: dict[str, Any] = {}
    measure = peer.measure

    spy: Any = None
    insitu: dict[str, Any] = {}
    insitu_out = os.path.join(work, "insitu.jsonl")

    def measured(proc: Any, *a: Any, **kw: Any) -> dict[str, Any]:
        # per-thread CPU over the middle of the window (from after the warm-up to just before the window's end)
        def sample() -> None:
            nonlocal spy
            time.sleep(args.warm + 6)
            t0 = thread_times(proc.pid)
            i0 = last_line(insitu_out) if args.insitu else None
            if args.profile:  # py-spy over the same span, collapsed stacks (one file per run)
                out = f"{args.profile}.{os.path.basename(os.path.abspath(root))}.{proc.pid}.txt"
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "500",
                                        "--threads",
                                        "--duration", str(int(max(1.0, window - 8))), "--output", out, "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(max(1.0, window - 8))
            t1 = thread_times(proc.pid)
            if args.insitu:
                insitu.update(insitu_delta(i0, last_line(insitu_out)))
            if spy is not None:
                spy.wait()
            span = max(1.0, window - 8)
            for name, (u, s) in t1.items():
                u0, s0 = t0.get(name, (0.0, 0.0))
                if u - u0 or s - s0:
                    per_thread[name] = {"user_ms_per_s": round((u - u0) * 1000 / span, 1),
                                        "sys_ms_per_s": round((s - s0) * 1000 / span, 1)}

        threading.Thread(target=sample, daemon=True).start()
        return measure(proc, *a, **kw)

    peer.measure = measured
    proc_cls = peer.Proc
    if args.insitu:  # the gateway process loads bench/insitu/sitecustomize.py
        with contextlib.suppress(FileNotFoundError):
            os.unlink(insitu_out)

        class InsituProc(proc_cls):  # type: ignore[misc, valid-type]
            def __init__(self, name: str, argv: list[str], **kw: Any) -> None:
                env = dict(kw.pop("env", None) or os.environ)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INSITU), env.get("PYTHONPATH")]))
                env["EDGE_GATEWAY_INSITU_OUT"] = insitu_out
                super().__init__(name, argv, env=env, **kw)

        peer.Proc = InsituProc
    try:
        r = peer.run_peer("gateway", None, n, poll_s, broker, sub, args, work, window)
    finally:
        peer.measure = measure
        peer.Proc = proc_cls
    gw = r.get("gateway", {})
    return {"checkout": root, "us_per_tag": round(r["us_per_tag"], 3), "cpu_pct": round(r["cpu_cores"] * 100, 2),
            "threads": per_thread, "rss_mb": round(r["rss_mb"], 1), "delivered_per_s": round(r["delivered_per_s"], 1),
            "committed_per_s": round(gw.get("events_committed_per_s", 0.0), 1),
            "outbox_pending": [gw.get("outbox_pending_start"), gw.get("outbox_pending_end")],
            **({"insitu": insitu} if args.insitu else {})}


def last_line(path: str) -> dict[str, Any] | None:
    """The last complete JSON line of the in-situ dump (bench/insitu/sitecustomize.py), or None."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def insitu_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """Per wrapped function between two dumps: CPU ms per second, calls per second, µs per call."""
    if not a or not b or b["t"] <= a["t"]:
        return {}
    dt = b["t"] - a["t"]
    out = {}
    for k, cpu in sorted(b["cpu_s"].items(), key=lambda kv: a["cpu_s"].get(kv[0], 0.0) - kv[1]):
        d_cpu = cpu - a["cpu_s"].get(k, 0.0)
        d_calls = b["calls"][k] - a["calls"].get(k, 0)
        out[k] = {"ms_per_s": round(d_cpu * 1000 / dt, 2), "calls_per_s": round(d_calls / dt, 1),
                  "us_per_call": round(d_cpu * 1e6 / d_calls, 2) if d_calls else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkouts", nargs="+", help="checkouts of this repository (work trees) to compare")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--load", default="10000@1", help="TAGS@POLL_S (default %(default)s)")
    p.add_argument("--window", type=float, default=25.0, help="measuring window per run (s)")
    p.add_argument("--warm", type=float, default=12.0, help="warm-up after the first delivered message (s)")
    p.add_argument("--profile", metavar="PREFIX", help="also record a py-spy profile of each run (collapsed stacks "
                   "in PREFIX.<checkout>.<pid>.txt; it costs the measured process CPU: do not compare those figures)")
    p.add_argument("--reporting-s", type=float, default=5.0, help="the gateway's reporting interval")
    p.add_argument("--insitu", action="store_true", help="also time the gateway's hot functions in the process "
                   "(bench/insitu/sitecustomize.py: CPU per call, 'insitu' in each run's line; the wrappers cost "
                   "CPU: do not compare those runs' figures with others)")
    args = p.parse_args()
    (n, poll_s), = peer.parse_loads(args.load)
    work = tempfile.mkdtemp(prefix="ab-gateway-")
    broker = BenchBroker(os.path.join(work, "broker"))
    broker.start()
    sub = peer.Subscriber(broker.port)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.checkouts}
    try:
        for rnd in range(args.rounds):
            for c in args.checkouts:
                r = run_one(c, n, poll_s, broker, sub, work, args)
                r["round"] = rnd + 1
                runs[c].append(r)
                print(json.dumps(r), flush=True)
    finally:
        sub.close()
        broker.close()
    summary = {c: {"us_per_tag": [r["us_per_tag"] for r in rs],
                   "median_us_per_tag": statistics.median(r["us_per_tag"] for r in rs),
                   "delivered_per_s": statistics.median(r["delivered_per_s"] for r in rs)} for c, rs in runs.items()}
    print(json.dumps({"summary": summary}), flush=True)
    rates = [s["delivered_per_s"] for s in summary.values()]
    if rates and max(rates) > 1.02 * min(rates):
        print(f"# WARNING: the checkouts delivered different numbers of events per second {rates}: they did different "
              "work, their CPU per polled tag does not compare", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
