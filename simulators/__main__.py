"""Run one simulated machine until Ctrl-C.

    python -m simulators opcua  --host 127.0.0.1 --port 4840 --name Press1 --cycle-time 0.1 \
        --scrap-rate 0.05 --seed 1 --bits 32
    python -m simulators modbus --port 5020 --unit-id 1 --name Press1

Adding a subcommand: write ``configure(parser)`` and ``async run(args)`` functions and add one entry
to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .machine import MachineModel


@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Awaitable[int | None]]


# ---------------------------------------------------------------------------- shared helpers


def add_machine_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port, help=f"TCP port (default {default_port})")
    p.add_argument("--name", default="Press1", help="machine name (default Press1)")
    p.add_argument("--cycle-time", type=float, default=0.1, help="seconds per part (default 0.1)")
    p.add_argument("--scrap-rate", type=float, default=0.05, help="scrap probability 0..1 (default 0.05)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the scrap sequence (default 1)")
    p.add_argument("--bits", type=int, choices=(16, 32), default=32, help="counter register width (default 32)")
    p.add_argument("--signed", action="store_true", help="signed counters (int16/int32)")
    p.add_argument("--start-good", type=int, default=0, help="initial raw good counter")
    p.add_argument("--start-scrap", type=int, default=0, help="initial raw scrap counter")
    p.add_argument("--order", default=None, help="active production order number")
    p.add_argument("--operation", default="0010", help="active operation number (with --order; default 0010)")


def build_model(args: argparse.Namespace) -> MachineModel:
    model = MachineModel(
        args.name,
        cycle_time=args.cycle_time,
        scrap_rate=args.scrap_rate,
        seed=args.seed,
        counter_bits=args.bits,
        signed=args.signed,
        start_good=args.start_good,
        start_scrap=args.start_scrap,
    )
    if args.order:
        model.set_order(args.order, args.operation)
    return model


async def wait_for_shutdown() -> None:
    """Return on SIGINT/SIGTERM (Ctrl-C)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def serve_machine(model: MachineModel, server: Any, info: dict[str, Any]) -> int:
    """Start ``server``, produce continuously until Ctrl-C, stop, print the ground truth."""
    async with server:
        print(json.dumps(info, indent=2), flush=True)
        producer = asyncio.create_task(model.run_forever(), name="machine-production")
        model.start()
        try:
            await wait_for_shutdown()
        finally:
            model.pause()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
    truth = {("/".join(k) if k else "unassigned"): v for k, v in model.truth.items()}
    print(json.dumps({"parts_made": model.parts_made, "truth": truth}), flush=True)
    return 0


# ---------------------------------------------------------------------------- opcua


def configure_opcua(p: argparse.ArgumentParser) -> None:
    add_machine_args(p, default_port=4840)
    p.add_argument("--namespace", default="urn:edge-gateway:simulator", help="namespace URI of the machine nodes")
    p.add_argument("--security", action="append", metavar="POLICY_MODE",
                   help="an endpoint to offer, e.g. Basic256Sha256_SignAndEncrypt, Aes256Sha256RsaPss_Sign, "
                        "Basic256_SignAndEncrypt (deprecated), NoSecurity; repeat for several (default: NoSecurity only). "
                        "The server certificate is generated at start: its thumbprint is printed")
    p.add_argument("--user", metavar="NAME", help="require user name login (anonymous refused); the password is read "
                   "from the environment variable named by --password-env")
    p.add_argument("--password-env", metavar="VAR", help="with --user: environment variable holding the password")
    p.add_argument("--max-queue-size", type=int, default=None, metavar="N",
                   help="revise every monitored item's queue down to N values (a server with a small maximum queue; "
                        "values it discards are flagged with the Overflow bit)")


async def run_opcua(args: argparse.Namespace) -> int:
    import os

    from asyncua import ua

    from .opcua_server import OpcUaMachineServer

    policies = args.security or ["NoSecurity"]
    unknown = [p for p in policies if p not in ua.SecurityPolicyType.__members__]
    if unknown:
        print(f"--security: unknown {', '.join(unknown)}; one of {', '.join(ua.SecurityPolicyType.__members__)}",
              file=sys.stderr)
        return 2
    users = None
    if args.user:
        password = os.environ.get(args.password_env or "")
        if not password:
            print("--user needs --password-env VAR naming a set environment variable (no default password)",
                  file=sys.stderr)
            return 2
        users = {args.user: password}
    model = build_model(args)
    server = OpcUaMachineServer(model, host=args.host, port=args.port, namespace=args.namespace,
                                security_policies=policies, users=users, max_queue_size=args.max_queue_size)
    info = {"protocol": "opcua", "endpoint": server.endpoint, "node_ids": server.node_ids, "security": policies,
            "login": "username" if users else "anonymous"}
    if server.secured:
        info["certificate_thumbprint"] = server.thumbprint
    return await serve_machine(model, server, info)


# ---------------------------------------------------------------------------- modbus


def configure_modbus(p: argparse.ArgumentParser) -> None:
    add_machine_args(p, default_port=5020)
    p.add_argument("--unit-id", type=int, default=1, help="Modbus unit id (default 1)")


async def run_modbus(args: argparse.Namespace) -> int:
    from .modbus_server import ModbusMachineServer

    model = build_model(args)
    server = ModbusMachineServer(model, host=args.host, port=args.port, unit_id=args.unit_id)
    info = {
        "protocol": "modbus",
        "host": args.host,
        "port": args.port,
        "unit_id": args.unit_id,
        "tags": server.tag_addresses(),
        "layout": server.layout,
        "state_codes": {"idle": 0, "running": 1, "stopped": 2},
    }
    return await serve_machine(model, server, info)


# ---------------------------------------------------------------------------- entry point

SUBCOMMANDS: dict[str, Subcommand] = {
    "opcua": Subcommand("simulated machine behind an OPC UA server", configure_opcua, run_opcua),
    "modbus": Subcommand("simulated machine behind a Modbus TCP server", configure_modbus, run_modbus),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulators", description="Edge gateway machine simulators.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(SUBCOMMANDS[args.command].run(args)) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
