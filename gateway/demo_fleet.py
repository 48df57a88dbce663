"""``edge-gateway demo --fleet``: the small fleet on this machine, machine truth next to what the ERP has posted.

Two gateways (``edge-gateway run`` subprocesses, two simulated Modbus presses each) → a three-node NATS cluster
(``nats-server`` processes, MQTT endpoints, JetStream R3) → two ERP posting workers (``edge-gateway-erp run``
subprocesses sharing one durable consumer) → PostgreSQL (a throwaway database, dropped at the end) → the simulated
SAP endpoint. The scenario is ``simulators.fleet.run_fleet`` (the same one the fleet test and benchmark run).

While the presses produce, a table shows each order/operation's parts made (simulator ground truth) next to the
yield / scrap the ERP has booked. After ``duration`` seconds the orders are completed, and the demo ends with one
comparison line: ``fleet demo: EQUAL ...`` (exit 0) only when every order/operation's posted yield and scrap equal
the machine's truth exactly and carries a final confirmation; otherwise ``fleet demo: DIFFERENT ...`` (exit 1).
A missing ``nats-server`` or an unreachable PostgreSQL is reported in one line saying what to install (exit 2).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

EXIT_EQUAL, EXIT_DIFFERENT, EXIT_MISSING = 0, 1, 2


def preflight(admin_dsn: str) -> str | None:
    """None when nats-server and PostgreSQL are there; else one line saying what is missing and what to install."""
    from simulators.nats_cluster import find_nats_server

    try:
        find_nats_server()
    except RuntimeError as exc:
        return f"edge-gateway demo --fleet: {exc}"
    import psycopg
    import psycopg.conninfo

    try:
        psycopg.conninfo.conninfo_to_dict(admin_dsn)
    except psycopg.ProgrammingError as exc:  # a malformed DSN is not a missing server: do not say "install"
        return (f"edge-gateway demo --fleet: --postgres-dsn is not a valid libpq DSN ({' '.join(str(exc).split())}); e.g. "
                "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        with psycopg.connect(admin_dsn, connect_timeout=5, autocommit=True):
            pass
    except psycopg.Error as exc:
        why = " ".join(str(exc).split())[:200]
        hint = ("install and start it (`apt-get install postgresql`, then `pg_ctlcluster <version> main start`) and "
                "let the demo create a database: trust or a password in PGPASSWORD for the user of --postgres-dsn")
        return f"edge-gateway demo --fleet: PostgreSQL not reachable at {_safe(admin_dsn)} ({why}): {hint}"
    return None


def _safe(dsn: str) -> str:
    """The DSN without a password (never printed)."""
    import psycopg.conninfo

    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the given DSN"
    parts.pop("password", None)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)} as {parts.get('user', 'the current user')}"


class Table:
    """Machine truth next to ERP postings; redrawn in place on a terminal, printed every few ticks otherwise."""

    def __init__(self, out: TextIO, every: int = 5) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self.n = 0

    def render(self, truth: dict[str, dict[str, int]], posted: dict[str, dict[str, Any]]) -> str:
        rows = [(f"{'order/operation':<16} {'made good':>10} {'ERP yield':>10} {'made scrap':>11} {'ERP scrap':>10} "
                f"{'final':>6}")]
        for k in sorted(truth):
            t, e = truth[k], posted.get(k, {})
            rows.append(f"{k:<16} {t['good']:>10} {e.get('yield', 0)!s:>10} {t['scrap']:>11} "
                        f"{e.get('scrap', 0)!s:>10} {'yes' if e.get('final') else 'no':>6}")
        return "\n".join(rows)

    def __call__(self, truth: dict[str, dict[str, int]], posted: dict[str, dict[str, Any]]) -> None:
        self.n += 1
        if self.tty:
            self.out.write("\x1b[H\x1b[J" + self.render(truth, posted) + "\n")
        elif self.n % self.every == 1 or self.every == 1:
            self.out.write(self.render(truth, posted) + "\n\n")
        self.out.flush()


def compare(truth: dict[str, dict[str, int]], posted: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(equal, the comparison line). Equal: same order/operations, posted yield and scrap == truth exactly, each with
    a final confirmation."""
    diffs = []
    for k in sorted(set(truth) | set(posted)):
        t, e = truth.get(k), posted.get(k)
        if t is None:
            diffs.append(f"{k}: posted but never made")
        elif e is None:
            diffs.append(f"{k}: made {t['good']}/{t['scrap']}, nothing posted")
        elif str(e["yield"]) != str(t["good"]) or str(e["scrap"]) != str(t["scrap"]) or not e["final"]:
            diffs.append(f"{k}: made {t['good']} good / {t['scrap']} scrap, ERP {e['yield']} / {e['scrap']}"
                         f"{'' if e['final'] else ', no final confirmation'}")
    good = sum(t["good"] for t in truth.values())
    scrap = sum(t["scrap"] for t in truth.values())
    if not diffs and truth:
        return True, (f"fleet demo: EQUAL: the ERP's postings equal the machines' truth for all {len(truth)} "
                      f"order/operations ({good} good, {scrap} scrap, {len(truth)} final confirmations)")
    return False, "fleet demo: DIFFERENT: " + ("; ".join(diffs) or "nothing was produced")


def _say(message: str) -> None:
    """The scenario's progress lines to stderr; its machine-readable summary (a long JSON line, for the test and the
    benchmark) is left out: the demo prints its own summary below the table."""
    if not message.startswith("fleet summary: "):
        print(message, file=sys.stderr)


async def _run(duration: float, workdir: Path, chaos: bool, admin_dsn: str, out: TextIO) -> int:
    from simulators.fleet import run_fleet

    summary: dict[str, Any] = {}
    failure = None
    try:
        await run_fleet(workdir, gateways=2, machines_per_gateway=2, workers=2, produce_s=duration, chaos=chaos,
                        cycle_time=0.05, admin_dsn=admin_dsn, on_tick=Table(out), summary=summary,
                        say=_say, match_timeout_s=60)
    except AssertionError as exc:  # the scenario's own checks: postings != truth, a double posting, a conflict
        failure = str(exc)
    truth = summary.get("truth", {})
    posted = summary.get("erp_posted", {})
    out.write(Table(out).render(truth, posted) + "\n")
    if "events_committed" in summary:
        out.write(f"events committed {summary['events_committed']}, documents posted {summary['documents_posted']}, "
                  f"duplicates absorbed {summary['duplicates_absorbed_by_erp_service']}, conflicts "
                  f"{summary['conflicts']}, documents posted twice {len(summary['erp_endpoint_repeated_external_ids'])}"
                  f", latency event→ERP p50 {summary['latency_p50_s']} s\n")
    equal, line = compare(truth, posted)
    if failure is not None and equal:  # equal totals but a conflict or a document posted twice
        equal, line = False, f"fleet demo: DIFFERENT: {failure}"
    out.write(line + "\n")
    out.flush()
    return EXIT_EQUAL if equal else EXIT_DIFFERENT


def run_fleet_demo(duration: float | None = None, workdir: str | None = None, chaos: bool = False,
                   admin_dsn: str | None = None, out: TextIO | None = None) -> int:
    from erp_service.testing import ADMIN_DSN
    from gateway import logs

    out = out or sys.stdout
    admin_dsn = admin_dsn or ADMIN_DSN
    if duration is not None and not duration > 0:
        print(f"edge-gateway demo --fleet: --duration must be a number of seconds > 0, not {duration}", file=sys.stderr)
        return EXIT_MISSING
    problem = preflight(admin_dsn)
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_MISSING
    logs.configure("console", "warning")
    duration = 20.0 if duration is None else duration
    try:
        if workdir is not None:
            path = Path(workdir)
            for old in ("nats", "logs", "gw-0", "gw-1"):  # a previous run's JetStream state, logs, gateway stores
                shutil.rmtree(path / old, ignore_errors=True)
            return asyncio.run(_run(duration, path, chaos, admin_dsn, out))
        with tempfile.TemporaryDirectory(prefix="edge-fleet-demo-") as d:
            return asyncio.run(_run(duration, Path(d), chaos, admin_dsn, out))
    except KeyboardInterrupt:  # asyncio.run cancelled the scenario: its processes are stopped, the database dropped
        print("fleet demo: interrupted", file=sys.stderr)
        return 130
