"""What the durable-by-default commit costs: ``Store.commit`` with ``synchronous=full`` vs ``normal``.

Commits groups of 1, 10, 100 and 500 events (about 360-byte payloads, one machine snapshot per commit, like the
runtime's group commit) into a fresh store on the disk of ``--dir`` for ``--seconds`` each, ``--rounds`` times with
full and normal alternating (the machine is shared: medians of the rounds), and prints one JSON object: for every
(synchronous, group) commits/s, events/s and µs per commit.

    python bench/commit_cost.py [--seconds 1.0] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.store import OutboxRow, Store  # noqa: E402

GROUPS = (1, 10, 100, 500)
PAYLOAD = json.dumps({"specversion": "1.0", "type": "operation.quantity_reported", "source": "gw/acme/p1/a1/l1/m1",
                      "data": {"order": "4711", "operation": "0010", "good": "12", "scrap": "0"},
                      "pad": "x" * 180}).encode()


async def measure(directory: str, synchronous: str, group: int, seconds: float) -> dict[str, object]:
    path = os.path.join(directory, f"cost-{synchronous}-{group}.db")
    times: list[float] = []
    async with Store(path, synchronous=synchronous) as store:
        seq = store.next_seq
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            rows = [OutboxRow(s, "m1", "operation.quantity_reported", "edge/v1/m1/events/x", PAYLOAD)
                    for s in range(seq, seq + group)]
            t0 = time.perf_counter()
            await store.commit({"m1": {"seq": seq + group, "window": [seq, group]}}, rows, seq + group)
            times.append(time.perf_counter() - t0)
            seq += group
            if store.pending > 20_000:  # keep the file small: the publisher would have acked these
                await store.ack([r.id for r in await store.fetch(0, 20_000)])
    total = sum(times)
    for suffix in ("", "-wal", "-shm", ".lock"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    return {"synchronous": synchronous, "group": group, "commits": len(times),
            "commits_per_s": round(len(times) / total, 1), "events_per_s": round(len(times) * group / total),
            "us_per_commit_median": round(statistics.median(times) * 1e6, 1),
            "us_per_commit_mean": round(total / len(times) * 1e6, 1)}


async def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))  # stdout is the result
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per (synchronous, group)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is reported")
    ap.add_argument("--dir", default=None, help="where the store files go (default: a temp dir); its disk is measured")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        runs: dict[tuple[str, int], list[dict[str, object]]] = {}
        for _ in range(args.rounds):
            for g in GROUPS:
                for sync in ("full", "normal"):
                    runs.setdefault((sync, g), []).append(await measure(d, sync, g, args.seconds))
        fs = os.statvfs(d)
    results = []
    for (sync, g), rs in runs.items():
        rs.sort(key=lambda r: r["us_per_commit_mean"])  # type: ignore[arg-type, return-value]
        results.append({**rs[len(rs) // 2], "rounds_us_per_commit_mean": [r["us_per_commit_mean"] for r in rs]})
    by = {(r["synchronous"], r["group"]): r for r in results}
    print(json.dumps({
        "benchmark": "commit_cost",
        "results": results,
        "full_vs_normal_time_ratio": {g: round(by["full", g]["us_per_commit_mean"] / by["normal", g]["us_per_commit_mean"], 2)
                                      for g in GROUPS},
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "payload_bytes": len(PAYLOAD), "dir": args.dir or tempfile.gettempdir(),
                     "fs_block_size": fs.f_bsize},
        "machine": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "nproc": os.cpu_count(),
                    "loadavg": os.getloadavg()},
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
