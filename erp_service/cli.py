"""Command line: ``edge-gateway-erp run|validate --config service.yaml``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

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

        svc = ErpService(cfg)
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
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
