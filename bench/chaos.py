"""Long chaos run: SIGKILL the gateway process 100+ times and crash it at every named crash point while two simulated
machines produce; print a JSON summary.

    python bench/chaos.py                      # 100 kills + 18 armed generations (~4 minutes on 2 cores)
    python bench/chaos.py --kills 300 --crash-repeats 5 --seed 7 --workdir /tmp/chaos

The same scenario and checks as ``tests/test_chaos.py::test_sigkill_chaos`` (which runs 6 random kills and
18 armed generations in the default suite; ``EDGE_GATEWAY_CHAOS_KILLS=100 pytest tests/test_chaos.py`` is the
equivalent pytest run): a persistent mosquitto on a free loopback port, an OPC UA and a Modbus machine simulator, the
ERP consumer, the gateway as a subprocess killed at seeded random instants (some before it has connected) and
restarted at once or after a pause; generations with a crash point armed (``EDGE_GATEWAY_CRASH_AT=point:n`` for every
point of ``gateway/faults.py`` and n = 1..``--crash-repeats``) that must end with exit code 86 when the point is
reached; one broker SIGKILL + restart and one frozen broker (SIGSTOP 2.5 s); one order changeover dispatched while the
gateway is down. At the end the ledger must equal the machines' ground truth per order, the ERP must have recorded no
conflict (an id or seq seen twice with different content), every committed sequence number must have reached the
ERP, and the outbox must be empty.

Output: one JSON object on stdout (``ok``, counts, ERP duplicates dropped, kill phases, crash points reached,
per-kill log); progress and logs go to stderr. Exit status 0 when every check held, 1 otherwise. Needs mosquitto on
PATH.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import argparse
import asyncio
import json
import tempfile
import traceback

from gateway import logs
from simulators.broker import MosquittoBroker
from tests.test_chaos import DEFAULT_SEED, run_chaos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100, help="random SIGKILLs")
    ap.add_argument("--crash-repeats", type=int, default=3,
                    help="arm every crash point at n = 1..N, one generation each (0: no crash points)")
    ap.add_argument("--no-broker-faults", action="store_true", help="no broker SIGKILL / freeze")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--workdir", default=None, help="keep the run's files (logs per gateway generation) here")
    args = ap.parse_args(argv)
    logs.configure("console", "warning")  # the ERP consumer's logs: to stderr, warnings only

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="edge-chaos-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        broker = MosquittoBroker(work / "mosquitto", persistence=True)
        broker.start()
        try:
            asyncio.run(run_chaos(work, broker, kills=args.kills, seed=args.seed, say=say, summary=summary,
                                  crash_repeats=tuple(range(1, args.crash_repeats + 1)),
                                  broker_faults=not args.no_broker_faults))
        except AssertionError as exc:
            summary["ok"] = False
            summary["failure"] = str(exc)[:4000]
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            summary["ok"] = False
            summary["failure"] = "".join(traceback.format_exception(exc))[-4000:]
        finally:
            broker.close()
        summary["workdir"] = str(work) if args.workdir else None
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
