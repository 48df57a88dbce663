"""The fleet on one machine: K gateways (``edge-gateway run`` subprocesses) x M simulated Modbus machines → a
three-node NATS cluster (MQTT endpoints, JetStream) → W ERP posting workers (``edge-gateway-erp run`` subprocesses,
one shared durable consumer) → PostgreSQL (a throwaway database) → the simulated SAP endpoint.

``run_fleet`` is the one scenario behind the fleet test (``tests/test_erp_service_fleet.py``, with chaos: a NATS node,
a worker and a gateway SIGKILLed, the ERP failing for a while), the benchmark (``bench/fleet.py``, no chaos) and
``edge-gateway demo --fleet`` (``gateway/demo_fleet.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from erp_service.testing import ADMIN_DSN, throwaway_database
from simulators.erp_endpoint import ErpEndpoint
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.nats_cluster import NatsCluster
from simulators.ports import free_port

# the subprocesses import the gateway and the service from the tree this module belongs to
ROOT = Path(__file__).resolve().parents[1]

ENTERPRISE, SITE, AREA = "acme", "plant-1", "assembly"


class Proc:
    """A subprocess generation manager (spawn / SIGKILL / SIGTERM), logs to one file per generation."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.generation = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.generation:02d}.log"

    async def spawn(self) -> None:
        self.generation += 1
        log = await asyncio.to_thread(open, self.log_path, "wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=log, stderr=log)
        finally:
            log.close()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 30)

    async def terminate(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Dispatcher:
    """ERP → gateways over the cluster's MQTT endpoint: retained QoS 1 dispatch messages."""

    def __init__(self, host: str, port: int) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"erp-dispatch-{os.getpid()}",
                             protocol=mqtt.MQTTv311)
        ok = threading.Event()
        self.c.on_connect = lambda *a: ok.set()
        self.c.connect(host, port)
        self.c.loop_start()
        if not ok.wait(15):
            raise RuntimeError("dispatcher could not connect")

    def dispatch(self, line: str, machine: str, order: str, op: str, status: str = "active") -> None:
        topic = f"edge/v1/{ENTERPRISE}/{SITE}/{AREA}/{line}/{machine}/dispatch"
        body = json.dumps({"order": order, "operation": op, "status": status, "unit": "PCE"}).encode()
        info = self.c.publish(topic, body, qos=1, retain=True)
        info.wait_for_publish(15)
        if not info.is_published():
            raise RuntimeError(f"no PUBACK for the dispatch on {topic}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def gateway_doc(g: int, endpoints: list[tuple[str, int]], store: Path, machines: dict[str, ModbusMachineServer]) -> dict:
    conns, ms = [], []
    for i, (mid, srv) in enumerate(machines.items()):
        tags = srv.tag_addresses()
        conns.append({"type": "modbus", "id": f"mb{i}", "host": "127.0.0.1", "port": srv.port, "unit_id": 1,
                      "poll_interval_s": 0.05, "timeout_s": 1})
        ms.append({"id": mid, "counters": {
            "good": {"connector": f"mb{i}", **tags["good"], "max_rate": 400},
            "scrap": {"connector": f"mb{i}", **tags["scrap"], "max_rate": 400}},
            "state": {"connector": f"mb{i}", **tags["state"], "values": {"0": "idle", "1": "running", "2": "stopped"}},
            "reporting": {"interval_s": 0.5, "max_units": 20}})
    return {
        "gateway": {"id": f"gw-{g}", "enterprise": ENTERPRISE, "site": SITE, "area": AREA, "line": f"line-{g}"},
        # NATS 2.9 refuses MQTT topics containing '.', so the per-type topics cannot be used: batch mode
        # every node's MQTT endpoint, tried in turn (the gateway fails over when its node dies)
        # nats-server 2.9 was seen not delivering a retained dispatch (published while the subscription's JetStream
        # consumer was being created): the resync brings it within a few seconds here (default 300 s)
        "mqtt": {"broker_kind": "nats", "brokers": [f"{h}:{p}" for h, p in endpoints], "protocol": "3.1.1",
                 "keepalive_s": 2, "batch_max_events": 50, "dispatch_resync_s": 3},
        "store": {"path": str(store)},
        "logging": {"format": "json", "level": "info"},
        "connectors": conns,
        "machines": ms,
    }


def worker_doc(dsn: str, cluster: NatsCluster, erp_url: str, threads: int, ack_wait_s: float = 3) -> dict:
    return {
        "source": "nats", "workers": threads,
        "postgres": {"dsn": dsn},
        "nats": {"servers": cluster.urls, "ack_wait_s": ack_wait_s, "batch": 16,
                 "mqtt_endpoints": [f"{h}:{p}" for h, p in cluster.mqtt_endpoints]},
        "erp": {"url": erp_url, "poll_s": 0.05, "backoff_initial_s": 0.1, "backoff_max_s": 1, "timeout_s": 3,
                "settle_s": 3,
                "lease_s": 10},
        "http": {"port": 0},
        "logging": {"format": "json", "level": "info"},
    }


async def _q(dsn: str, sql: str, *args: Any) -> list[tuple]:
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        cur = await c.execute(sql, args or None)
        return await cur.fetchall()


async def _wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def _ports_connected(proc: Proc, generation: int) -> list[int]:
    """The broker ports one generation of a gateway process connected to, in order (its JSON log lines)."""
    path = proc.log_dir / f"{proc.name}-{generation:02d}.log"
    out: list[int] = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
        if '"mqtt.connected"' in line:
            try:
                out.append(json.loads(line).get("port"))
            except ValueError:
                continue
    return out


def _nodes_connected(proc: Proc, node_of: dict[int, str]) -> list[str]:
    """The NATS nodes a gateway process connected to, in order, over all its generations (its JSON log lines)."""
    out: list[str] = []
    for gen in range(1, proc.generation + 1):
        for port in _ports_connected(proc, gen):
            node = node_of.get(port, str(port))
            if not out or out[-1] != node:
                out.append(node)
    return out


async def run_fleet(workdir: Path, *, gateways: int = 2, machines_per_gateway: int = 2, workers: int = 2,
                    produce_s: float = 20.0, chaos: bool = True, cycle_time: float = 0.03,
                    say: Callable[[str], Any] = print, admin_dsn: str = ADMIN_DSN,
                    on_tick: Callable[[dict[str, dict[str, int]], dict[str, dict[str, Any]]], Any] | None = None,
                    tick_s: float = 1.0, match_timeout_s: float = 120.0,
                    summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the fleet scenario; returns a summary. Raises AssertionError when the ERP's postings differ from the
    machines' ground truth, a document was posted twice, or a conflict was recorded.

    ``on_tick(truth, posted)`` is called every ``tick_s`` from the start of production to the end (the demo's live
    table): ``truth`` = parts made per "order/operation" so far ({good, scrap}), ``posted`` = what the ERP endpoint has
    booked ({yield, scrap (Decimal), final}). ``summary``, when given, is filled in place (so a caller still has the
    truth and the postings when the scenario raised)."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    summary = {} if summary is None else summary
    summary.update({"gateways": gateways, "machines": gateways * machines_per_gateway, "workers": workers,
                    "chaos": chaos})
    cluster = await asyncio.to_thread(lambda: NatsCluster(workdir / "nats").start())
    endpoint = await ErpEndpoint().start()
    models: dict[str, MachineModel] = {}
    servers: dict[str, ModbusMachineServer] = {}
    gws: list[Proc] = []
    wks: list[Proc] = []
    producers: list[asyncio.Task[None]] = []
    ticker: asyncio.Task[None] | None = None
    dispatcher: Dispatcher | None = None
    try:
        async with throwaway_database(admin_dsn, prefix="edge_erp_fleet") as dsn:
            # ERP workers first: their durable consumer must exist before anything is published
            cfg_path = workdir / "erp.yaml"
            cfg_path.write_text(yaml.safe_dump(worker_doc(dsn, cluster, endpoint.url, threads=2)))
            for w in range(workers):
                p = Proc(f"erp-{w}", [sys.executable, "-m", "erp_service.cli", "run", "--config", str(cfg_path)], logs)
                await p.spawn()
                wks.append(p)
            import nats

            nc = await nats.connect(servers=cluster.urls)
            js = nc.jetstream()

            async def consumer_exists() -> bool:
                try:
                    await js.consumer_info("$MQTT_msgs", "edge-erp")
                    return True
                except (nats.errors.Error, TimeoutError):
                    return False

            await _wait(consumer_exists, 60, "the ERP's durable consumer")
            await nc.close()
            # the workers create the consumer before they wait for PostgreSQL and create their tables: the queries
            # below need the tables
            async def tables_exist() -> bool:
                return (await _q(dsn, "SELECT to_regclass('erp_events') IS NOT NULL"))[0][0]

            await _wait(tables_exist, 60, "the ERP's tables", interval=0.1)

            lines: dict[str, str] = {}
            for g in range(gateways):
                ms = {}
                for k in range(machines_per_gateway):
                    mid = f"press-{g}-{k}"
                    m = MachineModel(f"P{g}{k}", cycle_time=cycle_time, scrap_rate=0.06, seed=100 * g + k,
                                     counter_bits=16)
                    srv = ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1)
                    await srv.start()
                    models[mid], servers[mid], ms[mid] = m, srv, srv
                    lines[mid] = f"line-{g}"
                # gw-0 starts on node 1, gw-1 on node 3 (the one killed: it fails over to node 1, then 2)
                first = (2 * g) % 3
                ep = cluster.mqtt_endpoints[first:] + cluster.mqtt_endpoints[:first]
                (workdir / f"gw-{g}").mkdir(exist_ok=True)
                path = workdir / f"gw-{g}.yaml"
                path.write_text(yaml.safe_dump(gateway_doc(g, ep, workdir / f"gw-{g}" / "store.db", ms)))
                p = Proc(f"gw-{g}", [sys.executable, "-m", "gateway.cli", "run", "--config", str(path)], logs)
                await p.spawn()
                gws.append(p)

            dispatcher = await asyncio.to_thread(Dispatcher, *cluster.mqtt_endpoints[0])
            orders = {mid: (f"{4000000 + i}", "0010") for i, mid in enumerate(models)}
            for mid, (o, op) in orders.items():
                await asyncio.to_thread(dispatcher.dispatch, lines[mid], mid, o, op)

            async def all_started() -> bool:
                rows = await _q(dsn, "SELECT count(DISTINCT subject) FROM erp_events WHERE type='operation.started'")
                return rows[0][0] == len(models)

            await _wait(all_started, 90, "operation.started of every machine at the ERP")
            for mid, (o, op) in orders.items():
                models[mid].set_order(o, op)
            producers = [asyncio.create_task(m.run_forever()) for m in models.values()]
            for m in models.values():
                m.start()
            t_start = time.monotonic()
            if on_tick is not None:
                async def tick() -> None:
                    while True:
                        on_tick({f"{o}/{op}": models[mid].truth_for(o, op) for mid, (o, op) in orders.items()},
                                {f"{k[0]}/{k[1]}": v for k, v in endpoint.totals().items()})
                        await asyncio.sleep(tick_s)

                ticker = asyncio.create_task(tick())
            say(f"fleet: producing for {produce_s}s ({len(models)} machines, {gateways} gateways, {workers} workers)")

            chaos_log = summary["chaos_log"] = []
            if chaos:
                async def at(frac: float) -> None:
                    await asyncio.sleep(max(0.0, t_start + frac * produce_s - time.monotonic()))

                await at(0.15)
                await asyncio.to_thread(cluster.kill, 2)
                chaos_log.append("nats n3 SIGKILL")
                await at(0.25)
                await wks[0].kill()
                chaos_log.append("worker erp-0 SIGKILL")
                await at(0.35)
                await gws[0].kill()
                chaos_log.append("gateway gw-0 SIGKILL")
                await asyncio.sleep(0.5)
                await gws[0].spawn()
                chaos_log.append("gateway gw-0 restarted")
                if len(gws) > 1:
                    # gw-1 lists the dead node 3 first: after its restart it must move on to node 1
                    await at(0.42)
                    await gws[1].kill()
                    chaos_log.append("gateway gw-1 SIGKILL")
                    await asyncio.sleep(0.5)
                    await gws[1].spawn()
                    chaos_log.append("gateway gw-1 restarted (its first node still dead)")
                    # node 3 comes back only once gw-1 is connected elsewhere: taking over an MQTT session on a
                    # surviving node can take nats-server seconds on a loaded machine (CI once saw gw-1 still
                    # trying when node 3 returned, and it connected there)
                    alive = {port for i, (_, port) in enumerate(cluster.mqtt_endpoints) if i != 2}
                    await _wait(lambda: set(_ports_connected(gws[1], gws[1].generation)) & alive, 60,
                                "gw-1 connected to a surviving node after its restart")
                    chaos_log.append("gateway gw-1 connected to a surviving node")
                await at(0.5)
                endpoint.set_failing(True)
                chaos_log.append("ERP failing (503)")
                await _wait(lambda: endpoint.failed >= 3, 60, "postings refused by the failing ERP")
                await at(0.6)
                await asyncio.to_thread(cluster.start_node, 2)
                chaos_log.append("nats n3 restarted")
                await at(0.7)
                endpoint.set_failing(False)
                # and the next postings are booked but their answer is lost (the outcome-unknown case): the poster's
                # lookup before the retry must find them instead of posting them again
                endpoint.fail_after_commit_next(2)
                chaos_log.append("ERP back (the answers to its next 2 bookings lost)")
                await wks[0].spawn()
                chaos_log.append("worker erp-0 restarted")
            await asyncio.sleep(max(0.0, t_start + produce_s - time.monotonic()))
            for m in models.values():
                m.pause()
            for t in producers:
                t.cancel()
            await asyncio.gather(*producers, return_exceptions=True)
            producers = []
            t_stop = time.monotonic()
            # complete every operation: final confirmations
            for mid, (o, op) in orders.items():
                await asyncio.to_thread(dispatcher.dispatch, lines[mid], mid, o, op, "completed")

            truth = {orders[mid]: m.truth_for(*orders[mid]) for mid, m in models.items()}

            def matches() -> bool:
                got = endpoint.totals()
                return all(k in got and got[k]["yield"] == Decimal(t["good"]) and got[k]["scrap"] == Decimal(t["scrap"])
                           and got[k]["final"] for k, t in truth.items())

            try:
                await _wait(matches, match_timeout_s, "ERP postings == ground truth (with final confirmations)")
            finally:
                if ticker is not None:
                    ticker.cancel()
                    await asyncio.gather(ticker, return_exceptions=True)
                    on_tick({f"{k[0]}/{k[1]}": t for k, t in truth.items()},
                            {f"{k[0]}/{k[1]}": v for k, v in endpoint.totals().items()})
                got = endpoint.totals()
                node_of = {port: f"n{i + 1}" for i, (_, port) in enumerate(cluster.mqtt_endpoints)}
                summary["gateway_nodes"] = {p.name: _nodes_connected(p, node_of) for p in gws}
                summary["truth"] = {f"{k[0]}/{k[1]}": t for k, t in truth.items()}
                summary["erp_posted"] = {f"{k[0]}/{k[1]}": {"yield": str(v["yield"]), "scrap": str(v["scrap"]),
                                                           "final": v["final"]} for k, v in got.items()}
            t_done = time.monotonic()
            [(n_events, dups, redel)] = await _q(dsn, "SELECT count(*), coalesce(sum(duplicates), 0), "
                                                      "coalesce(sum(redeliveries), 0) FROM erp_events")
            [(found,)] = await _q(dsn, "SELECT count(*) FROM erp_outbox WHERE found_by_lookup")
            [(conflicts,)] = await _q(dsn, "SELECT count(*) FROM erp_conflicts")
            [(rejected,)] = await _q(dsn, "SELECT count(*) FROM erp_rejected")
            [(t_first, t_last)] = await _q(dsn, "SELECT extract(epoch FROM min(received_at)), "
                                                "extract(epoch FROM max(received_at)) FROM erp_events")
            lat = await _q(dsn, "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - "
                                "event_time)), percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM "
                                "sent_at - event_time)), count(*) FROM erp_outbox WHERE state='sent'")
            gaps = await _q(dsn, "SELECT source, epoch, low, high FROM erp_streams WHERE low < high")
            summary.update({
                "chaos_log": chaos_log,
                "parts_made": sum(m.parts_made for m in models.values()),
                "events_committed": n_events,
                "duplicates_absorbed_by_erp_service": int(dups),
                "of_which_broker_redeliveries": int(redel),
                "of_which_gateway_republished": int(dups) - int(redel),
                "documents_found_by_lookup_not_reposted": found,
                "erp_endpoint_postings": len(endpoint.postings),
                "erp_endpoint_repeated_external_ids": dict(endpoint.duplicates),
                "erp_endpoint_503": endpoint.failed,
                "erp_lookups_before_retry": endpoint.lookups,
                "conflicts": conflicts,
                "rejected": rejected,
                "open_gaps": [list(map(str, g)) for g in gaps],
                "events_per_s": round(n_events / max(1e-6, float(t_last) - float(t_first)), 1),
                "latency_p50_s": round(float(lat[0][0]), 3) if lat[0][0] is not None else None,
                "latency_p99_s": round(float(lat[0][1]), 3) if lat[0][1] is not None else None,
                "documents_posted": lat[0][2],
                "drain_after_stop_s": round(t_done - t_stop, 2),
            })
            assert conflicts == 0, f"{conflicts} conflicting duplicates"
            assert not endpoint.duplicates, f"documents posted twice: {endpoint.duplicates}"
            assert rejected == 0, f"{rejected} events rejected"
            if chaos and len(gws) > 1:  # gw-1 started on node 3, which died: it must have published through another
                assert set(summary["gateway_nodes"]["gw-1"]) - {"n3"}, f"gw-1 never failed over: {summary}"
            for p in wks + gws:
                await p.terminate()
            summary["ok"] = True
            return summary
    finally:
        if ticker is not None:
            ticker.cancel()
        if dispatcher is not None:
            dispatcher.close()
        for t in producers:
            t.cancel()
        for p in wks + gws:
            with contextlib.suppress(Exception):
                await p.kill()
        for srv in servers.values():
            with contextlib.suppress(Exception):
                await srv.stop()
        await endpoint.stop()
        await asyncio.to_thread(cluster.stop)
        say("fleet summary: " + json.dumps(summary, sort_keys=True, default=str))
