"""Fleet benchmark: K gateways (subprocesses) x M simulated machines → 3-node NATS cluster (MQTT endpoints,
JetStream) → W ERP posting workers (subprocesses, one shared durable consumer) → PostgreSQL → simulated SAP endpoint.

The scenario itself (``run_fleet``) lives in ``simulators/fleet.py``, shared with ``tests/test_erp_service_fleet.py``
(with chaos) and ``edge-gateway demo --fleet``; here it runs without chaos, with 1 / 2 / 4 workers.

Benchmark: ``python bench/fleet.py [--seconds 20] [--workers 1 2 4] [--events 6000]`` prints one JSON line per
worker count with two measurements:

- ``drain`` (capacity of the ERP tier): N events are published over MQTT QoS 1 into the cluster first (the rate the
  cluster PUBACKs them is the raw publish rate of the same run), then W worker processes drain them: committed
  events/s (PostgreSQL) and posted documents/s (ERP endpoint);
- ``live`` (the whole chain at the load the simulated machines make): events/s committed and event time →
  ERP-acknowledged latency p50 / p99 of the posted documents.

Demo: ``python bench/fleet.py --demo [--chaos] [--seconds 20]`` is ``edge-gateway demo --fleet`` (live table of
each machine's truth next to what the ERP has posted, exact comparison at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from erp_service.testing import throwaway_database
from simulators.erp_endpoint import ErpEndpoint
from simulators.fleet import Proc, _q, _wait, run_fleet, worker_doc
from simulators.nats_cluster import NatsCluster


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
        from gateway.demo_fleet import run_fleet_demo

        return run_fleet_demo(duration=a.seconds, chaos=a.chaos)
    return asyncio.run(_bench(a))


if __name__ == "__main__":
    sys.exit(main())
