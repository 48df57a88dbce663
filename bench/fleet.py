"""Fleet: K gateways (subprocesses) x M simulated machines → 3-node NATS cluster (MQTT endpoints, JetStream) → W
ERP posting workers (subprocesses, one shared durable consumer) → PostgreSQL → simulated SAP endpoint.

``run_fleet`` is the scenario shared by ``tests/test_erp_service_fleet.py`` (with chaos: a NATS node, a worker and a
gateway SIGKILLed, the ERP failing for a while) and the benchmark below (no chaos, 1 / 2 / 4 workers).

Benchmark: ``python bench/fleet.py [--seconds 20] [--workers 1 2 4] [--events 6000]`` prints one JSON line per
worker count with two measurements:

- ``drain`` (capacity of the ERP tier): N events are published over MQTT QoS 1 into the cluster first (the rate the
  cluster PUBACKs them is the raw publish rate of the same run), then W worker processes drain them: committed
  events/s (PostgreSQL) and posted documents/s (ERP endpoint);
- ``live`` (the whole chain at the load the simulated machines make): events/s committed and event time →
  ERP-acknowledged latency p50 / p99 of the posted documents.

Demo: ``python bench/fleet.py --demo [--chaos] [--seconds 20]`` runs the small fleet once and prints each machine's
truth next to what the ERP has posted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from erp_service.testing import throwaway_database  # noqa: E402
from simulators.erp_endpoint import ErpEndpoint  # noqa: E402
from simulators.machine import MachineModel  # noqa: E402
from simulators.modbus_server import ModbusMachineServer  # noqa: E402
from simulators.nats_cluster import NatsCluster  # noqa: E402
from simulators.ports import free_port  # noqa: E402

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
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=log, stderr=log)

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
        except asyncio.TimeoutError:
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
        "mqtt": {"brokers": [f"{h}:{p}" for h, p in endpoints], "protocol": "3.1.1", "keepalive_s": 2,
                 "batch_max_events": 50},
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


async def run_fleet(workdir: Path, *, gateways: int = 2, machines_per_gateway: int = 2, workers: int = 2,
                    produce_s: float = 20.0, chaos: bool = True, cycle_time: float = 0.03,
                    say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the fleet scenario; returns a summary. Raises AssertionError when the ERP's postings differ from the
    machines' ground truth, a document was posted twice, or a conflict was recorded."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"gateways": gateways, "machines": gateways * machines_per_gateway, "workers": workers,
                               "chaos": chaos}
    cluster = await asyncio.to_thread(lambda: NatsCluster(workdir / "nats").start())
    endpoint = await ErpEndpoint().start()
    models: dict[str, MachineModel] = {}
    servers: dict[str, ModbusMachineServer] = {}
    gws: list[Proc] = []
    wks: list[Proc] = []
    producers: list[asyncio.Task[None]] = []
    dispatcher: Dispatcher | None = None
    try:
        async with throwaway_database(prefix="edge_erp_fleet") as dsn:
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
                except Exception:
                    return False

            await _wait(consumer_exists, 60, "the ERP's durable consumer")
            await nc.close()

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
            say(f"fleet: producing for {produce_s}s ({len(models)} machines, {gateways} gateways, {workers} workers)")

            chaos_log = []
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
                await at(0.5)
                endpoint.set_failing(True)
                chaos_log.append("ERP failing (503)")
                await _wait(lambda: endpoint.failed >= 3, 60, "postings refused by the failing ERP")
                await at(0.6)
                await asyncio.to_thread(cluster.start_node, 2)
                chaos_log.append("nats n3 restarted")
                await at(0.7)
                endpoint.set_failing(False)
                chaos_log.append("ERP back")
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
                await _wait(matches, 120, "ERP postings == ground truth (with final confirmations)")
            finally:
                got = endpoint.totals()
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
            for p in wks + gws:
                await p.terminate()
            summary["ok"] = True
            return summary
    finally:
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


async def drain_bench(workdir: Path, workers: int, *, events: int = 6000, batch: int = 10,
                      gateways: int = 4) -> dict[str, Any]:
    """Capacity of the ERP tier: ``events`` contract-valid events (``gateways`` sources, batches of ``batch``) are
    published over MQTT QoS 1 to the cluster while no worker runs (the durable consumer exists, so they are kept);
    then ``workers`` worker processes (one consumer task and one poster each) start and drain them into PostgreSQL
    and the ERP endpoint. Also returns the MQTT QoS 1 publish rate of that load (PUBACKed by the cluster)."""
    from erp_service.config import NatsSourceConfig
    from erp_service.consumers import NatsSource
    from erp_service.metrics import Metrics
    from erp_service.testing import EventFactory

    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    cluster = await asyncio.to_thread(lambda: NatsCluster(workdir / "nats").start())
    endpoint = await ErpEndpoint().start()
    procs: list[Proc] = []
    try:
        async with throwaway_database(prefix="edge_erp_bench") as dsn:
            src = NatsSource(NatsSourceConfig(servers=cluster.urls, mqtt_endpoints=[
                f"{h}:{p}" for h, p in cluster.mqtt_endpoints]), "edge", Metrics(), "none")
            await src.connect()
            await src.close()
            from erp_service.ledger import ensure_schema

            async with await psycopg.AsyncConnection.connect(dsn) as c:
                await ensure_schema(c)
            factories = [EventFactory(f"gw-{g}", line=f"line-{g}") for g in range(gateways)]
            messages = []
            for i in range(events // batch):
                f = factories[i % gateways]
                messages.append((f.topic(f"press-{i % 3}"),
                                 json.dumps([f.report(f"press-{i % 3}", "1000", "0010", y=1)
                                             for _ in range(batch)]).encode()))

            def publish_all() -> float:
                c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-load", protocol=mqtt.MQTTv311)
                c.max_inflight_messages_set(100)
                ok = threading.Event()
                c.on_connect = lambda *a: ok.set()
                c.connect(*cluster.mqtt_endpoints[0])
                c.loop_start()
                ok.wait(15)
                t0 = time.monotonic()
                infos = [c.publish(t, b, qos=1) for t, b in messages]
                for info in infos:
                    info.wait_for_publish(60)
                dt = time.monotonic() - t0
                c.disconnect()
                c.loop_stop()
                return dt

            pub_s = await asyncio.to_thread(publish_all)
            doc = worker_doc(dsn, cluster, endpoint.url, threads=1, ack_wait_s=30)
            doc["logging"]["level"] = "warning"
            cfg_path = workdir / "erp.yaml"
            cfg_path.write_text(yaml.safe_dump(doc))
            t0 = time.monotonic()
            for w in range(workers):
                p = Proc(f"erp-{w}", [sys.executable, "-m", "erp_service.cli", "run", "--config", str(cfg_path)],
                         logs)
                await p.spawn()
                procs.append(p)

            async def committed() -> bool:
                return (await _q(dsn, "SELECT count(*) FROM erp_events"))[0][0] >= events

            await _wait(committed, 600, "all events committed", interval=0.1)
            t_commit = time.monotonic() - t0
            await _wait(lambda: len(endpoint.by_external) >= events, 600, "all documents posted", interval=0.1)
            t_posted = time.monotonic() - t0
            # rates between the first and the last commit / posting (process start-up excluded)
            [(c0, c1)] = await _q(dsn, "SELECT extract(epoch FROM min(received_at)), extract(epoch FROM "
                                       "max(received_at)) FROM erp_events")
            [(p0, p1)] = await _q(dsn, "SELECT extract(epoch FROM min(sent_at)), extract(epoch FROM max(sent_at)) "
                                       "FROM erp_outbox")
            [(dups,)] = await _q(dsn, "SELECT coalesce(sum(duplicates), 0) FROM erp_events")
            for p in procs:
                await p.terminate()
            return {"workers": workers, "redelivered_duplicates": int(dups), "events": events, "batch": batch,
                    "mqtt_qos1_publish_msgs_per_s": round(len(messages) / pub_s, 1),
                    "mqtt_qos1_publish_events_per_s": round(events / pub_s, 1),
                    "committed_events_per_s": round(events / max(1e-3, float(c1) - float(c0)), 1),
                    "posted_documents_per_s": round(events / max(1e-3, float(p1) - float(p0)), 1),
                    "drain_wall_s_incl_startup": {"committed": round(t_commit, 2), "posted": round(t_posted, 2)},
                    "erp_repeated_external_ids": len(endpoint.duplicates)}
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                await p.kill()
        await endpoint.stop()
        await asyncio.to_thread(cluster.stop)


async def _bench(args: argparse.Namespace) -> int:
    rc = 0
    for w in args.workers:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as d:
            rec: dict[str, Any] = {"benchmark": "fleet", "workers": w, "nproc": os.cpu_count()}
            try:
                if not args.skip_drain:
                    rec["drain"] = await drain_bench(Path(d) / "drain", w, events=args.events)
                if not args.skip_live:
                    s = await run_fleet(Path(d) / "live", gateways=args.gateways, machines_per_gateway=args.machines,
                                        workers=w, produce_s=args.seconds, chaos=False, cycle_time=args.cycle_time,
                                        say=lambda m: print(m[:200], file=sys.stderr))
                    rec["live"] = {k: s[k] for k in ("events_per_s", "latency_p50_s", "latency_p99_s",
                                                     "events_committed", "documents_posted", "machines",
                                                     "gateways", "drain_after_stop_s")}
                rec["status"] = "measured"
            except AssertionError as exc:
                rec.update(status="failed", error=str(exc)[:500])
                rc = 1
            rec["loadavg"] = os.getloadavg()
            print(json.dumps(rec), flush=True)
    return rc


async def demo(seconds: float = 20.0, chaos: bool = False) -> int:
    """The small fleet for people: 2 gateways x 2 machines, a NATS cluster, 2 workers, PostgreSQL; prints machine
    truth next to what the ERP has posted (``python bench/fleet.py --demo [--chaos]``)."""
    with tempfile.TemporaryDirectory(prefix="fleet-demo-") as d:
        s = await run_fleet(Path(d), gateways=2, machines_per_gateway=2, workers=2, produce_s=seconds, chaos=chaos,
                            cycle_time=0.05, say=lambda m: print(m[:300], file=sys.stderr))
    print(f"{'order/operation':<18} {'machine good':>12} {'ERP yield':>10} {'machine scrap':>14} {'ERP scrap':>10} "
          f"{'final':>6}")
    for k, t in s["truth"].items():
        e = s["erp_posted"].get(k, {})
        print(f"{k:<18} {t['good']:>12} {e.get('yield', '-'):>10} {t['scrap']:>14} {e.get('scrap', '-'):>10} "
              f"{str(e.get('final', '-')):>6}")
    print(f"events {s['events_committed']}, documents posted {s['documents_posted']}, duplicates absorbed "
          f"{s['duplicates_absorbed_by_erp_service']}, conflicts {s['conflicts']}, latency p50 {s['latency_p50_s']} s")
    return 0


def main() -> int:
    from gateway import logs

    logs.configure("console", "warning")  # stdout carries only the JSON result lines
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--machines", type=int, default=2)
    p.add_argument("--cycle-time", type=float, default=0.01)
    p.add_argument("--events", type=int, default=6000, help="events of the drain measurement")
    p.add_argument("--skip-drain", action="store_true")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--demo", action="store_true", help="run the small fleet once and print truth vs ERP")
    p.add_argument("--chaos", action="store_true", help="with --demo: kill a node, a worker, a gateway")
    a = p.parse_args()
    if a.demo:
        return asyncio.run(demo(a.seconds, a.chaos))
    return asyncio.run(_bench(a))


if __name__ == "__main__":
    sys.exit(main())
