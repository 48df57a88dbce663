"""`edge-gateway demo --outage S`: the broker goes away mid-run, the live table shows the events buffered in the
gateway, then delivered, and the final ledger still equals what the machines made."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def test_demo_with_a_broker_outage_buffers_then_delivers_and_stays_exact(tmp_path):
    proc = subprocess.run(EXE + ["demo", "--duration", "12", "--outage", "3", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert "RESULT: ledger == truth for both machines" in out
    lines = out.splitlines()
    stopped = next(i for i, ln in enumerate(lines) if ln.startswith("--> broker stopped for 3 s"))
    back = next(i for i, ln in enumerate(lines) if ln.startswith("--> broker back after"))
    delivered = next(i for i, ln in enumerate(lines) if ln.startswith("--> backlog delivered"))
    assert stopped < back < delivered
    # during the outage the live table shows the events piling up in the gateway's outbox
    during = [int(m.group(1)) for ln in lines[stopped:back]
              if (m := re.match(r"broker DOWN \(outage\); buffered in the gateway: (\d+) events?", ln))]
    assert during and max(during) > 0, lines[stopped:back]
    assert int(re.search(r"broker back after [\d.]+ s: (\d+) events? buffered", lines[back]).group(1)) > 0
    # and after it they are delivered: nothing buffered at the end
    final = lines[next(i for i, ln in enumerate(lines) if ln.endswith("FINAL")) + 1]
    assert re.match(r"broker connected; buffered in the gateway: 0 events", final), final
    assert re.search(r"broker outage [\d.]+ s: up to [1-9]\d* events? buffered in the gateway, all delivered", out)


def test_demo_outage_needs_room_in_the_run():
    proc = subprocess.run(EXE + ["demo", "--duration", "6", "--outage", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert "--outage 5: give a positive number of seconds, and a --duration of at least 13 s" in proc.stderr
    assert "Traceback" not in proc.stderr
