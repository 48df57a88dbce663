"""Command line: ``edge-gateway-erp run|validate|gaps|release-gap --config service.yaml``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _load(path: str):  # type: ignore[no-untyped-def]
    from erp_service.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    print(f"{args.config}: OK (source {cfg.source}, {cfg.workers} workers, {cfg.erp.posters} posters)")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs

    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    logs.configure(args.log_format or cfg.logging.format, cfg.logging.level)
    import structlog

    log = structlog.get_logger("erp_service")

    async def main() -> int:
        from erp_service.config import ConfigError
        from erp_service.service import ErpService

        try:
            svc = ErpService(cfg)
        except ConfigError as exc:  # e.g. erp.password_env names a variable that is not set
            log.error("erp.config_invalid", error=str(exc)[:500])
            return EXIT_CONFIG
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # start() keeps retrying an unreachable broker: a SIGTERM / Ctrl-C meanwhile must still stop the process
        starting = asyncio.create_task(svc.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            log.info("erp.start_interrupted", reason="stop requested before the service was started")
            await svc.stop()
            return EXIT_OK
        try:
            starting.result()
        except ConfigError as exc:  # found only when used (postgres.dsn values libpq refuses): not retried
            log.error("erp.config_invalid", error=str(exc)[:500])
            await svc.stop()
            return EXIT_CONFIG
        except Exception as exc:
            log.error("erp.start_failed", error=f"{type(exc).__name__}: {exc}"[:500])
            await svc.stop()
            return EXIT_FAILED
        await stop.wait()
        await svc.stop()
        return EXIT_OK

    return asyncio.run(main())


class _DatabaseError(Exception):
    """One line for the operator (no traceback); ``config`` when retrying cannot help (the DSN itself)."""

    def __init__(self, message: str, config: bool = False) -> None:
        super().__init__(message)
        self.config = config


async def _with_database(cfg: Any, fn: Any) -> Any:
    """Connect once (no retry: an operator is waiting), make sure the tables exist (a database last used by an
    older version gets the new ones), run ``fn(ledger, conn)``."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from erp_service.ledger import Ledger, ensure_schema

    timeout = {} if "connect_timeout" in conninfo_to_dict(cfg.postgres.dsn) else {"connect_timeout": 10}
    try:
        conn = await psycopg.AsyncConnection.connect(cfg.postgres.dsn, autocommit=True, **timeout)
    except psycopg.OperationalError as exc:
        error = " ".join(str(exc).split())[:500]
        if error.startswith("connection is bad: invalid "):
            raise _DatabaseError(f"postgres.dsn: {error.removeprefix('connection is bad: ')}", config=True) from None
        raise _DatabaseError(f"database unreachable: {error}") from None
    try:
        async with conn:
            await ensure_schema(conn)
            return await fn(Ledger(cfg), conn)
    except psycopg.Error as exc:
        raise _DatabaseError(f"database: {' '.join(str(exc).split())}"[:500]) from None


def _os_user() -> str | None:
    """Who runs the command, for the audit: the login name; under sudo, the user who called sudo as well."""
    try:
        user: str | None = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a container)
        user = None
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != user:
        return f"{sudo} (sudo as {user})" if user else sudo
    return user


def _run_db_command(args: argparse.Namespace, fn: Any) -> tuple[int, Any]:
    """Config, logging and one database session for an operator command; (exit code, fn's result)."""
    from gateway import logs

    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG, None
    logs.configure(args.log_format or cfg.logging.format, cfg.logging.level)
    from erp_service.ledger import ReleaseRefused

    try:
        return EXIT_OK, asyncio.run(_with_database(cfg, fn))
    except ReleaseRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
    except _DatabaseError as exc:
        print(str(exc), file=sys.stderr)
        return (EXIT_CONFIG if exc.config else EXIT_FAILED), None
    return EXIT_FAILED, None


def _seq_ranges(seqs: list[int]) -> str:
    parts, i = [], 0
    while i < len(seqs):
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        parts.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return ", ".join(parts)


def _gaps_text(streams: list[dict[str, Any]]) -> list[str]:
    from erp_service.ledger import utc_text

    lines = []
    for g in streams:
        lines.append(f"{g['source']} epoch {g['epoch']}: every seq up to {g['low']} arrived, highest {g['high']}, "
                     f"{g['missing']} missing, open {g['gap_age_s']:.0f} s")
        for first, last in g["missing_ranges"]:
            unknown = []
            for sq in range(first, last + 1) if last - first < 50 else ():
                r = g["rejected"].get(sq)
                if r is None:
                    unknown.append(sq)
                    continue
                lines.append(f"  seq {sq}: rejected {utc_text(r['at'])}: {r['type']} {r['id']}: "
                             f"{' '.join(str(r['reason']).split())[:300]}")
            if last - first >= 50:  # a long run (e.g. events never received at all): rejected ones, then the rest
                inside = sorted(sq for sq in g["rejected"] if first <= sq <= last)
                for sq in inside:
                    r = g["rejected"][sq]
                    lines.append(f"  seq {sq}: rejected {utc_text(r['at'])}: {r['type']} {r['id']}: "
                                 f"{' '.join(str(r['reason']).split())[:300]}")
                lines.append(f"  seq {first}-{last}: {last - first + 1 - len(inside)} missing, no rejection "
                             f"recorded (may still arrive; release only with --event-lost if known lost)")
            elif unknown:
                lines.append(f"  seq {_seq_ranges(unknown)}: missing, no rejection recorded (may still arrive; "
                             f"release only with --event-lost if known lost)")
        for h in g["held"]:
            lines.append(f"  held: seq {h['seq']} operation.completed {h['id']} (order {h['order']} operation "
                         f"{h['operation']} machine {h['machine']})")
    return lines


def _cmd_gaps(args: argparse.Namespace) -> int:
    async def fn(ledger: Any, conn: Any) -> Any:
        return await ledger.open_gaps(conn, args.source)

    rc, streams = _run_db_command(args, fn)
    if rc != EXIT_OK:
        return rc
    if args.json:
        for g in streams:
            g["rejected"] = {str(sq): {**r, "at": r["at"].isoformat()} for sq, r in g["rejected"].items()}
        print(json.dumps(streams, indent=2))
    elif not streams:
        print("no open seq gap" + (f" for source {args.source}" if args.source else ""))
    else:
        print("\n".join(_gaps_text(streams)))
    return EXIT_OK


def _cmd_release_gap(args: argparse.Namespace) -> int:
    user = _os_user()

    async def fn(ledger: Any, conn: Any) -> Any:
        return await ledger.release_gap(conn, args.source, args.epoch, args.seq, reason=args.reason,
                                        released_by=user, event_lost=args.event_lost)

    rc, out = _run_db_command(args, fn)
    if rc != EXIT_OK:
        return rc
    for s in out["seqs"]:
        r = s["rejected"]
        what = f"its rejected {r['type']} {r['id']}" if r else "no rejection recorded: released as lost"
        print(f"released seq {s['seq']} of {out['source']} epoch {out['epoch']} ({what})")
    print(f"watermark {out['low_before']} -> {out['low']} (highest {out['high']})"
          + ("" if out["low"] == out["high"] else "; the gap is still open above it: edge-gateway-erp gaps"))
    for c in out["completions"]:
        print(f"final confirmation applied: seq {c['seq']} {c['id']} (order {c['order']} operation {c['operation']} "
              f"machine {c['machine']})")
    if not out["completions"]:
        print("no completion was held behind it")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-gateway-erp", description="ERP posting service for edge-gateway events")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="consume, book and post")
    r.add_argument("--config", required=True)
    r.add_argument("--log-format", choices=["console", "json"])
    r.set_defaults(fn=_cmd_run)
    v = sub.add_parser("validate", help="check a configuration file")
    v.add_argument("--config", required=True)
    v.set_defaults(fn=_cmd_validate)
    g = sub.add_parser("gaps", help="list the streams with an open seq gap: the missing seqs, why (a rejection, "
                       "if recorded) and the final confirmations held behind them")
    g.add_argument("--config", required=True)
    g.add_argument("--source", help="only this gateway (CloudEvents source)")
    g.add_argument("--json", action="store_true", help="JSON instead of text")
    g.add_argument("--log-format", choices=["console", "json"])
    g.set_defaults(fn=_cmd_gaps)
    rg = sub.add_parser("release-gap", help="release missing seqs whose events were dealt with by hand, so the final "
                        "confirmations held behind them are applied (audited: reason, time, OS user)")
    rg.add_argument("--config", required=True)
    rg.add_argument("--source", required=True, help="the gateway's CloudEvents source (edge-gateway-erp gaps)")
    rg.add_argument("--epoch", required=True, help="its store epoch")
    rg.add_argument("--seq", required=True, type=int, action="append",
                    help="a missing seq (repeat for several: all released, or none)")
    rg.add_argument("--reason", required=True, help="what was done about the event (recorded), e.g. 'booked by hand "
                    "in SAP, ticket 4711'")
    rg.add_argument("--event-lost", action="store_true", help="also release a seq with no rejection recorded: its "
                    "event is known lost (an event arriving later under a released seq is a conflict, not booked)")
    rg.add_argument("--log-format", choices=["console", "json"])
    rg.set_defaults(fn=_cmd_release_gap)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
