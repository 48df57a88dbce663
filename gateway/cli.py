"""Command line: ``edge-gateway run|validate|reload|init|order|buffer|demo|schema|pki|browse|probe``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away (`... | head`)
REFERENCE_HINT = "docs/configuration.md (or `edge-gateway schema --config --markdown`)"


def _cmd_validate(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config

    ok = online_ok = True
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            ok = False
            print(exc.render(), file=sys.stderr)
            n = len(exc.problems)
            print(f"{path}: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
            print(f"{path}: every key, its type, default and allowed values: {REFERENCE_HINT}", file=sys.stderr)
            continue
        print(f"{path}: OK ({len(cfg.connectors)} connectors, {len(cfg.machines)} machines)")
        if args.online:
            problems = asyncio.run(_validate_online(cfg))
            if problems:
                print(f"{path}: {problems} problem{'s' if problems != 1 else ''} found online", file=sys.stderr)
                online_ok = False  # the next files are checked too
                continue
            print(f"{path}: online OK (every endpoint, device, node and register checked)")
    return EXIT_CONFIG if not ok else EXIT_OK if online_ok else EXIT_FAILED


def _bindings(cfg: object) -> dict[str, list[tuple[str, str, object, object]]]:
    """connector id -> [(label "machine signal", kind, binding, address)] for every tag of the config."""
    out: dict[str, list[tuple[str, str, object, object]]] = {}
    for m in cfg.machines:  # type: ignore[attr-defined]
        items: list[tuple[str, str, str, object]] = []
        items += [(name, f"counter {name}", "counter", b) for name, b in m.counters.items()]
        items += [(f"material:{name}", f"material {name}", "material", b) for name, b in m.materials.items()]
        for sig, field, kind in (("state", "state", "state"), ("order", "order_tag", "text"),
                                 ("operation", "operation_tag", "text"), ("complete", "complete_tag", "flag")):
            b = getattr(m, field)
            if b is not None:
                items.append((sig, field, kind, b))
        for sig, label, kind, b in items:
            if kind in ("counter", "material") and b.max_value is not None:
                kind = "integer"
            if kind == "material" and getattr(b, "resolution", None) is not None:
                kind = "float"
            out.setdefault(b.connector, []).append((f"{m.id} {label}", kind, b, cfg.tag_address(m.id, sig)))  # type: ignore[attr-defined]
    return out


async def _validate_online(cfg: object) -> int:
    """Connect to every endpoint and device of ``cfg``; check every node / register. Prints one line per tag;
    returns the number of problems."""
    from connectors import REGISTRY

    problems = 0
    tags = _bindings(cfg)
    for c in cfg.connectors:  # type: ignore[attr-defined]
        check = REGISTRY[c.type].load_online_check()
        if check is None:
            print(f"connector {c.id}: {c.type} connectors have no online check (not checked)")
            continue
        problems += await check(c, tags.get(c.id, []))
    return problems


def _cmd_run(args: argparse.Namespace) -> int:
    # Start-up builds the long-lived objects of every machine (config models, engines, connector plans: millions at
    # 3,333 machines); cyclic GC passes over them while they are being built cost half of the start time (1.1 s of
    # 2.3 s, bench/startup.py). No collection until the gateway runs, then they go to the permanent generation
    # (gc.freeze) so later collections do not walk them again either.
    gc.disable()
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
        # systemd notifications and SIGHUP reload (deploy/edge-gateway.service)
        from gateway.service import Service

        gw = Gateway(cfg, password=password)
        collect = asyncio.get_running_loop().create_task(_collect_after_start(gw))  # noqa: F841 - kept referenced
        await run_until_signal(Service(gw, config_path=args.config, log_overrides=(args.log_format, args.log_level)).run)

    from gateway import loops
    from gateway.component import HttpListenError
    from gateway.store import StoreError, StoreLocked

    try:
        loops.run(main(), loop=args.event_loop)
    except loops.LoopUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    except HttpListenError as exc:  # e.g. the port is taken: one line, no traceback
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StoreLocked as exc:  # another gateway runs on this store
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


GC_YOUNG_THRESHOLD = 20_000


async def _collect_after_start(gw: Any) -> None:
    try:
        await gw.started.wait()
    finally:
        gc.freeze()
        # A young-generation collection after 20,000 new containers instead of 700: most of what a report makes
        # (its draft, data, row, the window it closes) is freed by reference counting within seconds, and with
        # the default a collection every ~0.3 s at 667 reports/s walked them while they were still alive
        # (~1.9 ms/s of CPU at the Node-RED peer load, bench/README.md "eleventh session").
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        gc.enable()


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
    # at most grace_s: asyncio.wait does not wait for a task that ignores its cancellation (wait_for would, in 3.11)
    await asyncio.wait({task}, timeout=grace_s)
    if task.done() and not task.cancelled():
        task.result()  # an error of its shutdown goes to the caller, as when it ends by itself


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
    if ":" in host:  # an IPv6 address in a URL
        host = f"[{host}]"
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
        # straight to the gateway: never through a proxy from http_proxy (it would get the bearer token)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
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
    from gateway.component import rfc3339
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
    ids = args.ids
    readonly = args.action in ("list", "export")

    async def go() -> int:
        async with Store(cfg.store.path, synchronous=cfg.store.synchronous, readonly=readonly) as store:
            if args.action == "list":
                rows = await store.list_rows(table, limit=args.limit)
                for r in rows:  # times for people: RFC 3339 UTC, not epoch floats
                    for k in ("created", "at"):
                        if isinstance(r.get(k), (int, float)):
                            r[k] = rfc3339(r[k])
                print(json.dumps({"table": table, "pending": store.pending, "quarantined": store.quarantined,
                                  "rows": rows}, indent=2, default=str))
            elif args.action == "export":
                rows = await store.export_rows(table)
                # production data: readable by this user only (a file of that name is replaced)
                out = os.fdopen(os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") \
                    if args.out else sys.stdout
                try:
                    for r in rows:
                        out.write(json.dumps(r, default=str) + "\n")
                    out.flush()  # a closed pipe shows here, inside main()'s BrokenPipeError handling
                finally:
                    if args.out:
                        out.close()
                print(f"exported {len(rows)} {table} rows" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
            elif args.action == "retry":
                missing = await store.missing_ids("quarantine", ids) if ids else []
                if missing:
                    print(f"buffer retry: no quarantined event with id {', '.join(map(str, missing))}; nothing changed "
                          "(`edge-gateway buffer list --quarantine` shows the quarantined ids)", file=sys.stderr)
                    return EXIT_FAILED
                n = await store.retry_quarantined(ids)
                print(f"moved {n} quarantined events back to the outbox (sent when the gateway starts; rows from the "
                      "outbox keep their original place)")
            elif args.action == "purge":
                if not args.yes:
                    print(f"purge deletes {table} rows for good: add --yes", file=sys.stderr)
                    return EXIT_FAILED
                missing = await store.missing_ids(table, ids) if ids else []
                if missing:
                    print(f"buffer purge: no {table} row with id {', '.join(map(str, missing))}; nothing changed "
                          f"(`edge-gateway buffer list{' --quarantine' if args.quarantine else ''}` shows the ids)",
                          file=sys.stderr)
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


def _row_ids(text: str) -> list[int]:
    """``--ids 3,7,12``: argparse type (a clear usage error, exit 2, for anything else)."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated row ids (whole numbers) such as 3,7,12, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated row ids (whole numbers) such as 3,7,12, got {text!r}")
    return ids


def _cmd_reload(args: argparse.Namespace) -> int:
    """Validate the config, then SIGHUP the gateway that runs on its store: it re-reads the file (gateway/reload.py)."""
    from gateway.config import ConfigError, load_config
    from gateway.reload import NotRunning, gateway_pid, started_with

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        print(f"{args.config}: not reloaded (the gateway keeps its running configuration)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        pid = gateway_pid(cfg.store.path)
    except NotRunning as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    started = started_with(pid, cfg.store.path)
    if started is not None and started != os.path.realpath(args.config):
        print(f"{args.config}: note: the gateway (process {pid}) was started with {started}; it re-reads that file, "
              "not this one", file=sys.stderr)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        print(f"{args.config}: not allowed to signal the gateway (process {pid}); run as its user or root, or "
              "`systemctl reload edge-gateway`", file=sys.stderr)
        return EXIT_FAILED
    except ProcessLookupError:
        print(f"{args.config}: the gateway (process {pid}) has just ended", file=sys.stderr)
        return EXIT_FAILED
    print(f"sent SIGHUP to the gateway (process {pid}); it re-reads {args.config}: the outcome is in its log "
          "(config.reloaded, or config.reload_failed with the field)")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.fleet:
        from gateway.demo_fleet import run_fleet_demo

        return run_fleet_demo(duration=args.duration, workdir=args.workdir, chaos=args.chaos,
                              admin_dsn=args.postgres_dsn)
    from gateway.demo import run_demo

    return run_demo(duration=args.duration, workdir=args.workdir, seed=args.seed, outage=args.outage)


def _cmd_schema(args: argparse.Namespace) -> int:
    from gateway import schema

    if args.config or args.markdown:
        from gateway import config_doc

        text = config_doc.config_markdown() if args.markdown else \
            json.dumps(config_doc.config_json_schema(), indent=2, ensure_ascii=False) + "\n"
        if args.out is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            with open(args.out, "w") as f:
                f.write(text)
            print(args.out)
        return EXIT_OK
    if args.out is None:
        print(json.dumps(schema.asyncapi_document(args.topic_root), indent=2, ensure_ascii=False))
        return EXIT_OK
    for path in schema.write_schemas(args.out, args.topic_root):
        print(path)
    return EXIT_OK


def _pki_dirs(args: argparse.Namespace) -> list[str] | int:
    """The PKI folder(s) named by --pki-dir, or those of the OPC UA connectors in --config."""
    if args.pki_dir:
        return [args.pki_dir]
    from gateway.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_CONFIG
    dirs = [c.pki_dir for c in cfg.connectors if c.type == "opcua" and (args.connector in (None, c.id))]
    if not dirs:
        print(f"{args.config}: no OPC UA connector" + (f" with id {args.connector!r}" if args.connector else ""),
              file=sys.stderr)
        return EXIT_CONFIG
    return list(dict.fromkeys(dirs))


def _cmd_pki(args: argparse.Namespace) -> int:
    """OPC UA certificate trust: list / trust / reject / show (see connectors/opcua/pki.py)."""
    from connectors.opcua.pki import Pki, describe

    dirs = _pki_dirs(args)
    if isinstance(dirs, int):
        return dirs
    rc = EXIT_OK
    for d in dirs:
        pki = Pki(d)
        if args.action == "list":
            print(f"PKI {pki.root}")
            for store in ("own", "trusted", "issuer", "rejected"):
                certs = pki.certificates(store)
                print(f"  {store}/ ({len(certs)})")
                for _, c in certs:
                    info = describe(c)
                    print(f"    {info['thumbprint']}  {info['subject']}  uri={info['application_uri']}  "
                          f"expires={info['not_after'][:10]} ({info['days_left']} days)")
        elif args.action == "show":
            if args.thumbprint:
                found = pki.find(args.thumbprint)
                if not found:
                    print(f"no certificate {args.thumbprint} in {pki.root}", file=sys.stderr)
                    rc = EXIT_FAILED
                    continue
                store, path, cert = found[0]
            else:
                found = pki.certificates("own")
                if not found:
                    print(f"no own certificate in {pki.root} yet (generated when a connector first connects securely)",
                          file=sys.stderr)
                    rc = EXIT_FAILED
                    continue
                store, (path, cert) = "own", found[0]
            print(f"store: {store}\nfile: {path}")
            for k, v in describe(cert).items():
                print(f"{k}: {v}")
        else:
            to = "trusted" if args.action == "trust" else "rejected"
            try:
                cert, path = pki.move(args.thumbprint, to)
            except KeyError as exc:
                print(f"{pki.root}: {exc.args[0]}", file=sys.stderr)
                rc = EXIT_FAILED
                continue
            info = describe(cert)
            print(f"{args.action}ed {info['thumbprint']} ({info['subject']}): {path}")
            if args.action == "trust":
                print("a running gateway uses it at its next connect attempt")
    return rc


def _cmd_probe(args: argparse.Namespace) -> int:
    """Read once from a device and decode (``probe modbus``): check a register map before writing the config."""
    import logging

    from connectors.modbus.probe import ProbeError, ProbeRequest, probe

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # its connect errors are reported below, once
    req = ProbeRequest(host=args.host, port=args.port, unit=args.unit, address=args.address, count=args.count,
                       table=args.table, data_type=args.type, word_order=args.word_order, timeout_s=args.timeout,
                       framing=args.framing)
    try:
        lines = asyncio.run(probe(req))
    except ProbeError as exc:
        print(f"probe failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK


def _opcua_tool_config(args: argparse.Namespace, endpoint: str | None) -> object | int:
    """The OPC UA connector settings a tool uses: a connector of --config, or built from the flags."""
    from pydantic import ValidationError

    from connectors.opcua.config import OpcUaConnectorConfig

    if args.config:
        from gateway.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_CONFIG
        found = [c for c in cfg.connectors if c.type == "opcua" and args.connector in (None, c.id)]
        if len(found) != 1:
            ids = ", ".join(c.id for c in cfg.connectors if c.type == "opcua") or "none"
            print(f"{args.config}: name the OPC UA connector with --connector (OPC UA connectors: {ids})", file=sys.stderr)
            return EXIT_CONFIG
        base = found[0]
        return base.model_copy(update={"endpoint": endpoint}) if endpoint else base
    data = {"type": "opcua", "id": "browse", "endpoint": endpoint, "security": args.security,
            "allow_deprecated_policies": args.allow_deprecated_policies, "pki_dir": args.pki_dir,
            "timeout_s": args.timeout}
    if args.username:
        data.update(username=args.username, password_env=args.password_env, password_file=args.password_file)
    try:
        return OpcUaConnectorConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"{'.'.join(str(x) for x in err['loc']) or 'options'}: {err['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return EXIT_CONFIG


def _opcua_failure(exc: BaseException, cfg: object) -> str:
    """One line for a failed OPC UA tool session (no traceback)."""
    from connectors.opcua.inspect import failure_text

    return failure_text(exc, cfg)  # type: ignore[arg-type]


_BROWSE_FLAG_HINTS = (
    ("set security: none", "use --security none"),
    ("set allow_deprecated_policies: true", "use --allow-deprecated-policies"),
    ("set username and password_env or password_file, or user_certificate_file and user_private_key_file",
     ("give --username with --password-env or --password-file (or --config FILE for a connector with a user "
      "certificate)")),
    ("username is set but neither password_env nor password_file", "--username needs --password-env or --password-file"),
    ("connectors[browse].password_env", "--password-env"),
    ("connectors[browse].password_file", "--password-file"),
)
"""Connector config keys in session errors -> the browse flags that set them (when no --config is used)."""


def _browse_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with browse's arguments before connecting (None: nothing)."""
    if not args.endpoint and not args.config:
        return "give the server's endpoint URL (opc.tcp://HOST:PORT), or --config FILE to use a connector's"
    if args.depth < 0:
        return f"--depth must be 0 or more, not {args.depth}"
    if (args.password_env or args.password_file) and not args.username and not args.config:
        return "--password-env / --password-file go with --username"
    if args.node:
        from asyncua import ua

        try:
            ua.NodeId.from_string(args.node)
        except Exception:  # noqa: BLE001 - asyncua raises several types for a bad string
            return (f"--node {args.node!r} is not a node id; expected e.g. 'nsu=urn:vendor:machine;s=Press1' or "
                    "'ns=2;s=Press1' or 'i=85'")
    return None


def _cmd_browse(args: argparse.Namespace) -> int:
    """Print an OPC UA server's address space as a tree with nsu= node ids, data types, access and values."""
    import logging

    from connectors.opcua import inspect

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    problem = _browse_args_problem(args)
    if problem:
        print(f"browse: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _opcua_tool_config(args, args.endpoint)
    if isinstance(cfg, int):
        return cfg

    async def go() -> list[str]:
        async with inspect.session(cfg) as (client, security, namespaces):  # type: ignore[arg-type]
            start = inspect.resolve(args.node, namespaces) if args.node else client.nodes.objects.nodeid
            if args.node and (await inspect.read_info(client, start)).node_class == "?":
                raise KeyError(f"node {args.node} does not exist on {cfg.endpoint}; browse without --node, or "  # type: ignore[attr-defined]
                               "from a parent node, to find its id")
            head = f"# {cfg.endpoint} ({security.policy}/{security.mode}, {security.user_token})"  # type: ignore[attr-defined]
            found: list[tuple[str, str, str | None]] = []
            lines = [head] + await inspect.browse(client, namespaces, start, args.depth, found)
            if args.config_lines:
                lines.append(f"# config lines (connector {args.config_lines}); pick the ones you need:")
                lines += [inspect.config_line(args.config_lines, *v) for v in found]
            return lines

    try:
        lines = asyncio.run(go())
    except KeyError as exc:
        print(f"browse failed: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        text = _opcua_failure(exc, cfg)
        if not args.config:  # the settings came from flags: name the flag, not the config key
            for key, flag in _BROWSE_FLAG_HINTS:
                text = text.replace(key, flag)
        print(f"browse failed: {text}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-gateway", description="Machine counters → production-order events → MQTT.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    it = sub.add_parser("init", help="write an annotated starter config (refuses to overwrite)")
    it.add_argument("path", nargs="?", default="edge-gateway.yaml", metavar="PATH",
                    help="file to write (default: edge-gateway.yaml)")
    it.set_defaults(fn=_cmd_init)

    v = sub.add_parser("validate", help="check config files; every problem with file, line and field path")
    v.add_argument("files", nargs="+", metavar="CONFIG")
    v.add_argument("--online", action="store_true",
                   help="also connect to every endpoint and device and check every node id and register")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run the gateway")
    r.add_argument("--config", "-c", required=True, metavar="FILE")
    r.add_argument("--log-format", choices=["console", "json"])
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="auto (default): uvloop where it is installed, else asyncio's own loop")
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
    b.add_argument("--ids", type=_row_ids, help="comma-separated row ids, e.g. 3,7,12 (default: all)")
    b.add_argument("--limit", type=int, default=100, help="rows shown by list")
    b.add_argument("--out", help="export to this file (JSON lines) instead of stdout")
    b.add_argument("--yes", action="store_true", help="confirm purge")
    b.set_defaults(fn=_cmd_buffer)

    rl = sub.add_parser("reload", help="validate the config and make the running gateway re-read it (SIGHUP)")
    rl.add_argument("--config", "-c", required=True, metavar="FILE",
                    help="the config the gateway was started with (its store.path finds the gateway)")
    rl.set_defaults(fn=_cmd_reload)

    d = sub.add_parser("demo", help="simulated machines + broker + gateway + ERP consumer in one process")
    d.add_argument("--duration", type=float, default=None, help="stop after SECONDS and compare ledger to truth")
    d.add_argument("--workdir", default=None, help="where to keep the demo's files (default: a temp dir)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--outage", type=float, default=None, metavar="S",
                   help="stop the demo's broker for S seconds mid-run (needs mosquitto): watch the gateway buffer the "
                        "events, then deliver them")
    d.add_argument("--fleet", action="store_true", help="the small fleet instead: 2 gateways, a 3-node NATS cluster, "
                   "2 ERP workers, PostgreSQL (needs nats-server and a PostgreSQL server; default 20 s)")
    d.add_argument("--chaos", action="store_true", help="with --fleet: kill a NATS node, a worker and a gateway")
    d.add_argument("--postgres-dsn", default=None, help="with --fleet: admin DSN used to create and drop a "
                   "throwaway database (default postgresql://postgres@127.0.0.1:5432/postgres)")
    d.set_defaults(fn=_cmd_demo)

    sc = sub.add_parser("schema", help="event contract: AsyncAPI document (stdout) or all JSON Schemas (--out DIR)")
    sc.add_argument("--out", "-o", default=None, metavar="DIR", help="write the schema files into DIR and list them")
    sc.add_argument("--topic-root", default="edge", help="first topic level in the AsyncAPI addresses (default: edge)")
    sc.add_argument("--config", action="store_true",
                    help="the JSON Schema of the config file instead (for editors: `# yaml-language-server: "
                         "$schema=./edge-gateway.schema.json`); with --out, the FILE to write")
    sc.add_argument("--markdown", action="store_true",
                    help="with --config: the reference of every config key as Markdown (docs/configuration.md)")
    sc.set_defaults(fn=_cmd_schema)

    k = sub.add_parser("pki", help="OPC UA certificates: list, trust, reject or show (own/ trusted/ rejected/ issuer/)")
    ksub = k.add_subparsers(dest="action", required=True)
    for action, text in (("list", "list the certificates of each store"),
                         ("trust", "move a rejected server certificate to trusted/"),
                         ("reject", "move a trusted server certificate to rejected/"),
                         ("show", "details of a certificate (ours without THUMBPRINT)")):
        ka = ksub.add_parser(action, help=text)
        if action in ("trust", "reject"):
            ka.add_argument("thumbprint", help="SHA-1 thumbprint (a unique prefix is enough)")
        elif action == "show":
            ka.add_argument("thumbprint", nargs="?", help="SHA-1 thumbprint (a unique prefix is enough)")
        else:
            ka.set_defaults(thumbprint=None)
        kg = ka.add_mutually_exclusive_group(required=True)
        kg.add_argument("--pki-dir", help="the PKI folder")
        kg.add_argument("--config", "-c", metavar="FILE", help="use the pki_dir of the OPC UA connectors in this config")
        ka.add_argument("--connector", help="with --config: only this connector's PKI folder")
        ka.set_defaults(fn=_cmd_pki)

    pr = sub.add_parser("probe", help="read once from a device and decode, to check a register map")
    prs = pr.add_subparsers(dest="protocol", required=True)
    pm = prs.add_parser("modbus", help="Modbus TCP: read registers, coils or discrete inputs once")
    pm.add_argument("host")
    pm.add_argument("--port", type=int, default=502)
    pm.add_argument("--unit", type=int, default=1, help="unit (device/slave) id")
    pm.add_argument("--address", type=int, required=True, help="0-based address (register 40001 is 0)")
    pm.add_argument("--count", type=int, default=1, help="registers (bits for coils) to read")
    pm.add_argument("--table", choices=["holding", "input", "coil", "discrete_input"], default="holding")
    pm.add_argument("--type", choices=["uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64",
                                       "string", "bool"], help="decode as (default: raw registers only)")
    pm.add_argument("--word-order", choices=["ABCD", "CDAB", "BADC", "DCBA", "big", "little", "all"], default="ABCD",
                    help="layout of multi-register values; 'all' prints every layout")
    pm.add_argument("--timeout", type=float, default=3.0, help="seconds")
    pm.add_argument("--framing", choices=["tcp", "rtu"], default="tcp", help="rtu: RTU frames over TCP (serial gateways)")
    pm.set_defaults(fn=_cmd_probe)

    bw = sub.add_parser("browse", help="print an OPC UA server's address space (nsu= node ids, types, values)")
    bw.add_argument("endpoint", nargs="?", help="opc.tcp://HOST:PORT (default: the connector's, with --config)")
    bw.add_argument("--node", help="start here (ns= or nsu= node id; default: the Objects folder)")
    bw.add_argument("--depth", type=int, default=3, help="levels below the start node (default 3)")
    bw.add_argument("--config", "-c", metavar="FILE", help="use the security, PKI and login of a connector in FILE")
    bw.add_argument("--connector", help="with --config: which OPC UA connector")
    bw.add_argument("--security", default="auto", choices=["auto", "none", "Aes256_Sha256_RsaPss",
                                                          "Aes128_Sha256_RsaOaep", "Basic256Sha256", "Basic256",
                                                          "Basic128Rsa15"])
    bw.add_argument("--allow-deprecated-policies", action="store_true")
    bw.add_argument("--pki-dir", default="pki", help="PKI folder (default ./pki)")
    bw.add_argument("--username")
    bw.add_argument("--password-env", help="environment variable with the password")
    bw.add_argument("--password-file", help="file holding the password (first line)")
    bw.add_argument("--timeout", type=float, default=5.0)
    bw.add_argument("--config-lines", metavar="CONNECTOR_ID",
                    help="also print a config binding for every variable listed, for this connector id")
    bw.set_defaults(fn=_cmd_browse)
    return p


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("edge-gateway")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_init(args: argparse.Namespace) -> int:
    from gateway.config_doc import starter_config

    path = args.path
    if os.path.isdir(path):
        path = os.path.join(path, "edge-gateway.yaml")
    try:
        with open(path, "x") as f:  # "x": never overwrite
            f.write(starter_config(os.path.basename(path)))
    except FileExistsError:
        print(f"init: {path} exists; not overwritten (remove it, or give another PATH)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"init: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {path}: edit the connectors and machines, then `edge-gateway validate {path}`")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return rc
    except BrokenPipeError:
        # the reader of our stdout went away (`edge-gateway schema | head`): stop quietly, like any Unix filter.
        # stdout is pointed at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
