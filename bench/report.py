"""Print bench/results/latest.json as the markdown table of the README's "Performance" section.

    .venv/bin/python bench/report.py [path]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "latest.json"


def fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = f"{v:,.0f}"
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.3g}"
    else:
        s = f"{v:,}" if isinstance(v, int) else str(v)
    return f"{s} {unit}".strip()


def met(r: dict) -> str:
    if r.get("status") == "not_built":
        return "not built"
    if r.get("status") == "failed":
        return "FAILED"
    if r.get("target") is None:
        return ""
    return {True: "**met**", False: "**not met**", None: "n/a (size)"}[r.get("met")]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    doc = json.loads(path.read_text())
    rows = doc["results"]
    print("| figure | ours | baseline (same run) | ratio | target | |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") == "failed":
            print(f"| `{r['name']}` | FAILED: {r.get('error', '')} | | | | FAILED |")
            continue
        unit = r.get("unit", "")
        short = unit.split(" (")[0]
        base = fmt(r.get("baseline"), short) if r.get("baseline") is not None else "—"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "—"
        print(f"| `{r['name']}` | {fmt(r.get('value'), short)} | {base} | {ratio} | {r.get('target') or ''} | "
              f"{met(r)} |")
    m = rows[0].get("machine", {}) if rows else {}
    loads = sorted({tuple(round(x, 2) for x in r.get("machine", {}).get("loadavg_at_start", [])) for r in rows})
    print()
    print(f"Machine: {m.get('cpu')} ({m.get('hypervisor') or 'bare metal'}), {m.get('nproc')} cores, "
          f"{m.get('mem_total_mb')} MB, Linux {m.get('kernel')}, Python {m.get('python')}, SQLite {m.get('sqlite')}, "
          f"paho-mqtt {m.get('paho_mqtt')}, mosquitto {m.get('mosquitto')}, asyncua {m.get('asyncua')}, "
          f"pymodbus {m.get('pymodbus')}; commit {m.get('git', {}).get('commit')}; "
          f"load average at the start of each benchmark: {', '.join(str(list(x)) for x in loads)}.")


if __name__ == "__main__":
    main()
