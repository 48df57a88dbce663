"""Command line: ``edge-gateway run|validate|demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _cmd_validate(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config

    ok = True
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            ok = False
            print(exc.render(), file=sys.stderr)
            n = len(exc.problems)
            print(f"{path}: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
            continue
        print(f"{path}: OK ({len(cfg.connectors)} connectors, {len(cfg.machines)} machines)")
    return EXIT_OK if ok else EXIT_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(args.log_format or cfg.logging.format, args.log_level or cfg.logging.level)
    try:
        password = cfg.mqtt.password()
    except ValueError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.http.enabled and cfg.http.token_env and not os.environ.get(cfg.http.token_env):
        print(f"{args.config}: http.token_env: environment variable {cfg.http.token_env} is not set", file=sys.stderr)
        return EXIT_CONFIG

    from gateway.runtime import Gateway

    async def main() -> None:
        gw = Gateway(cfg, password=password)
        await run_until_signal(gw.run)

    from gateway.store import StoreError, StoreLocked

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except StoreLocked as exc:  # another gateway runs on this store
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


async def run_until_signal(coro_fn: Callable[[], object], *, grace_s: float = 10.0) -> None:
    """Run ``coro_fn()`` until SIGINT/SIGTERM, then cancel it and wait (bounded) for it to finish."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro_fn())  # type: ignore[arg-type]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        task.result()
        return
    task.cancel()
    try:
        await asyncio.wait_for(task, timeout=grace_s)
    except (asyncio.CancelledError, asyncio.TimeoutError):
        pass


def _cmd_order(args: argparse.Namespace) -> int:
    """Local order command: POST to the running gateway's local HTTP API (see gateway/http.py)."""
    import urllib.error
    import urllib.request

    from gateway.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.http.enabled:
        print(f"{args.config}: http.enabled is false: the local order command needs the local HTTP API", file=sys.stderr)
        return EXIT_CONFIG
    if args.action == "clear":
        body: dict[str, object] = {"clear": True}
    else:
        if not args.order or not args.operation:
            print("order set needs ORDER and OPERATION", file=sys.stderr)
            return EXIT_CONFIG
        body = {"order": args.order, "operation": args.operation, "status": "completed" if args.complete else "active"}
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    req = urllib.request.Request(f"http://{host}:{cfg.http.port}/machines/{args.machine}/order",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if cfg.http.token_env:
        token = os.environ.get(cfg.http.token_env)
        if not token:
            print(f"environment variable {cfg.http.token_env} (http.token_env) is not set", file=sys.stderr)
            return EXIT_CONFIG
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.read().decode())
            return EXIT_OK
    except urllib.error.HTTPError as exc:
        print(f"refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
    except OSError as exc:
        print(f"cannot reach the gateway at {host}:{cfg.http.port}: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _cmd_buffer(args: argparse.Namespace) -> int:
    """Operator tools on the store: list / export / retry / purge pending and quarantined events.

    ``list`` and ``export`` open the store read-only and work next to a running gateway; ``retry`` and ``purge``
    write, so they take the store's lock and refuse (exit 2, naming the process) while a gateway runs on it."""
    from gateway import logs
    from gateway.config import ConfigError, load_config
    from gateway.store import Store, StoreError, StoreLocked

    logs.configure("console", "warning")  # stdout carries the data
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    if not os.path.exists(cfg.store.path):
        print(f"no store at {cfg.store.path} (store.path in {args.config})", file=sys.stderr)
        return EXIT_FAILED
    table = "quarantine" if args.quarantine else "outbox"
    ids = [int(x) for x in args.ids.split(",")] if args.ids else None
    readonly = args.action in ("list", "export")

    async def go() -> int:
        async with Store(cfg.store.path, synchronous=cfg.store.synchronous, readonly=readonly) as store:
            if args.action == "list":
                rows = await store.list_rows(table, limit=args.limit)
                print(json.dumps({"table": table, "pending": store.pending, "quarantined": store.quarantined,
                                  "rows": rows}, indent=2, default=str))
            elif args.action == "export":
                rows = await store.export_rows(table)
                out = open(args.out, "w") if args.out else sys.stdout
                try:
                    for r in rows:
                        out.write(json.dumps(r, default=str) + "\n")
                finally:
                    if args.out:
                        out.close()
                print(f"exported {len(rows)} {table} rows" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
            elif args.action == "retry":
                n = await store.retry_quarantined(ids)
                print(f"moved {n} quarantined events back to the outbox (sent when the gateway starts; rows from the "
                      "outbox keep their original place)")
            elif args.action == "purge":
                if not args.yes:
                    print(f"purge deletes {table} rows for good: add --yes", file=sys.stderr)
                    return EXIT_FAILED
                n = await store.purge(table, ids)
                print(f"purged {n} {table} rows")
        return EXIT_OK

    try:
        return asyncio.run(go())
    except StoreLocked as exc:
        print(f"buffer {args.action}: {exc} (list and export work while it runs)", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"store error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(duration=args.duration, workdir=args.workdir, seed=args.seed)


def _cmd_schema(args: argparse.Namespace) -> int:
    from gateway import schema

    if args.out is None:
        print(json.dumps(schema.asyncapi_document(args.topic_root), indent=2, ensure_ascii=False))
        return EXIT_OK
    for path in schema.write_schemas(args.out, args.topic_root):
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-gateway", description="Machine counters → production-order events → MQTT.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check config files; every problem with file, line and field path")
    v.add_argument("files", nargs="+", metavar="CONFIG")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run the gateway")
    r.add_argument("--config", "-c", required=True, metavar="FILE")
    r.add_argument("--log-format", choices=["console", "json"])
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(fn=_cmd_run)

    o = sub.add_parser("order", help="set or clear a machine's production order (order_source: local)")
    o.add_argument("action", choices=["set", "clear"])
    o.add_argument("machine")
    o.add_argument("order", nargs="?")
    o.add_argument("operation", nargs="?")
    o.add_argument("--complete", action="store_true", help="mark the operation completed (final confirmation)")
    o.add_argument("--config", "-c", required=True, metavar="FILE")
    o.set_defaults(fn=_cmd_order)

    b = sub.add_parser("buffer", help="list, export, retry or purge pending and quarantined events")
    b.add_argument("action", choices=["list", "export", "retry", "purge"])
    b.add_argument("--config", "-c", required=True, metavar="FILE")
    b.add_argument("--quarantine", action="store_true", help="act on the quarantine (retry always does)")
    b.add_argument("--ids", help="comma-separated row ids (default: all)")
    b.add_argument("--limit", type=int, default=100, help="rows shown by list")
    b.add_argument("--out", help="export to this file (JSON lines) instead of stdout")
    b.add_argument("--yes", action="store_true", help="confirm purge")
    b.set_defaults(fn=_cmd_buffer)

    d = sub.add_parser("demo", help="simulated machines + broker + gateway + ERP consumer in one process")
    d.add_argument("--duration", type=float, default=None, help="stop after SECONDS and compare ledger to truth")
    d.add_argument("--workdir", default=None, help="where to keep the demo's files (default: a temp dir)")
    d.add_argument("--seed", type=int, default=7)
    d.set_defaults(fn=_cmd_demo)

    sc = sub.add_parser("schema", help="event contract: AsyncAPI document (stdout) or all JSON Schemas (--out DIR)")
    sc.add_argument("--out", "-o", default=None, metavar="DIR", help="write the schema files into DIR and list them")
    sc.add_argument("--topic-root", default="edge", help="first topic level in the AsyncAPI addresses (default: edge)")
    sc.set_defaults(fn=_cmd_schema)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
