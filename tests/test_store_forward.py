"""Store-and-forward against real parts: poison events (quarantine), ERP rejections, the size cap, a full disk."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from gateway.config import parse_config
from gateway.store import OutboxRow, Store
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, assert_ledger_matches, assert_no_conflicts, wait_until

ROOT = Path(__file__).resolve().parents[1]
HIER = [IDENT[k] for k in ("enterprise", "site", "area", "line")]


def doc_for(mb, broker_port, store_path, **mqtt):
    tags = mb.tag_addresses()
    return {
        "gateway": IDENT,
        "mqtt": {"port": broker_port, "keepalive_s": 2, **mqtt},
        "store": {"path": str(store_path)},
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": mb.port, "poll_interval_s": 0.05}],
        "machines": [{"id": "press-2", "counters": {"good": {"connector": "mb", **tags["good"], "max_rate": 500},
                                                    "scrap": {"connector": "mb", **tags["scrap"], "max_rate": 500}},
                      "state": {"connector": "mb", **tags["state"], "values": {"0": "idle", "1": "running"}},
                      "reporting": {"interval_s": 0.2}}],
    }


@pytest.fixture
async def rig(tmp_path, mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.01, seed=21, counter_bits=32)
    mb = ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1)
    await mb.start()
    erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-sf")
    await erp.start()
    yield model, mb, erp
    await erp.stop()
    await mb.stop()


async def start_order(gw, erp, model, order):
    erp.dispatch(*HIER, "press-2", order, "0010")
    await gw.wait_dispatch_applied("press-2", order, "0010")
    model.set_order(order, "0010")


async def test_oversized_event_is_quarantined_and_does_not_block(tmp_path, mqtt_broker, rig):
    model, mb, erp = rig
    store_path = tmp_path / "gw.db"
    gw = RunningGateway(parse_config(doc_for(mb, mqtt_broker.port, store_path, max_message_bytes=4096)))
    await gw.start()
    try:
        await start_order(gw, erp, model, "Q-1")
        # a poison row lands in the outbox (as if an event had grown past the broker's limit); the running gateway
        # holds the store's lock, so it goes in through the gateway's own store
        other = gw.gw.store
        big = json.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "pad": "x" * 10_000}).encode()
        await other.commit({}, [OutboxRow(10**6, "press-2", "operation.quantity_reported",
                                          "edge/v1/acme/p1/a1/l1/press-2/events/x", big)], other.next_seq)
        gw.gw.publisher.notify()
        await model.produce(60, timeout=20)
        await assert_ledger_matches(erp, {"press-2": model})
        await wait_until(lambda: gw.gw.store.quarantined == 1, 10)
        assert gw.gw.publisher.quarantined == 1
    finally:
        await gw.stop()
    listed = subprocess.run([sys.executable, "-m", "gateway.cli", "buffer", "list", "--quarantine", "--config",
                             str(write_cfg(tmp_path, doc_for(mb, mqtt_broker.port, store_path)))],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    rows = json.loads(listed.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["reason"].startswith("too large")


async def test_broker_refusal_mqtt5_is_quarantined(tmp_path, rig):
    """mosquitto announces ``max_packet_size`` as the MQTT 5 Maximum Packet Size in its CONNACK (and drops a client
    that sends a larger packet): the publisher quarantines a larger row before sending it, the connection stays up."""
    from simulators.broker import MosquittoBroker

    model, mb, _ = rig
    broker = MosquittoBroker(tmp_path / "small-broker", extra_config="max_packet_size 300\n")
    broker.start()
    try:
        erp = ErpConsumer("127.0.0.1", broker.port, db_path=str(tmp_path / "erp2.db"), client_id="erp-small")
        await erp.start()
        gw = RunningGateway(parse_config(doc_for(mb, broker.port, tmp_path / "gw.db")))
        await gw.start()
        try:
            erp.dispatch(*HIER, "press-2", "R-1", "0010")
            await wait_until(lambda: gw.gw.store.quarantined >= 1, 15)  # every event is > 300 bytes
            assert gw.gw.publisher.quarantined >= 1
            assert "Maximum Packet Size 300" in json.dumps(await gw.gw.store.list_rows("quarantine"))
            assert gw.gw.link.connections == 1
            assert gw.task is not None and not gw.task.done()
            assert_no_conflicts(erp)
        finally:
            await gw.stop()
            await erp.stop()
    finally:
        broker.close()


def write_cfg(tmp_path, doc):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_erp_rejection_quarantine_retry(tmp_path, mqtt_broker, rig):
    """The ERP refuses the quantities of a locked order; the gateway quarantines them (nothing blocks). The order is
    unlocked; the operator stops the gateway, runs ``edge-gateway buffer retry``, starts it again: every refused event
    is delivered once more with its ORIGINAL id, seq and content (a new id or seq would be a second event to the ERP),
    the ledger equals the truth, the quarantine is empty."""
    model, mb, erp = rig
    store_path = tmp_path / "gw.db"
    doc = doc_for(mb, mqtt_broker.port, store_path)
    cfg_path = write_cfg(tmp_path, doc)
    refused: dict[str, dict] = {}   # id -> the CloudEvent as the ERP received (and refused) it

    def locked(ev):
        if ev["type"] == "operation.quantity_reported" and ev["data"].get("order") == "R-9":
            refused[ev["id"]] = ev
            return "order R-9 is locked in the ERP"
        return None

    def refused_total(kind):
        return sum(int(ev["data"]["quantities"][kind]) for ev in list(refused.values()))

    erp.reject_rule = locked
    gw = RunningGateway(parse_config(doc))
    await gw.start()
    try:
        await start_order(gw, erp, model, "R-9")
        await model.produce(40, timeout=20)
        truth = model.truth_for("R-9", "0010")
        # every part made was reported and refused, and every refusal is in the gateway's quarantine
        await wait_until(lambda: refused_total("yield") == truth["good"] and refused_total("scrap") == truth["scrap"]
                         and gw.gw.stats.erp_rejections == len(refused) and gw.gw.store.quarantined == len(refused)
                         and gw.gw.store.pending == 0, 15,
                         message=f"not every refused event reached the quarantine: {len(refused)} refused")
        assert erp.ledger().get(("press-2", "R-9", "0010")) is None
        # the ERP unlocks the order; the operator retries the quarantine: not behind the running gateway's back
        # (refused, exit 2), but with the gateway stopped, then starts it again
        erp.reject_rule = None
        retry = [sys.executable, "-m", "gateway.cli", "buffer", "retry", "--config", str(cfg_path)]
        r = await asyncio.to_thread(subprocess.run, retry, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and f"in use by process {os.getpid()}" in r.stderr, r.stdout + r.stderr
        await gw.stop()
        n_rejected = len(refused)
        assert n_rejected >= 1
        r = await asyncio.to_thread(subprocess.run, retry, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and f"moved {n_rejected} " in r.stdout, r.stdout + r.stderr
        await gw.start()
        assert gw.gw.store.quarantined == 0
        await assert_ledger_matches(erp, {"press-2": model})
        delivered = {ev["id"]: ev for ev in erp.events("operation.quantity_reported")}
        for id_, original in refused.items():
            assert delivered.get(id_) == original, f"retried event {id_} not delivered as it was first sent"
        await wait_until(lambda: gw.gw.store.pending == 0, 10)
        assert erp.gaps() == {}
    finally:
        await gw.stop()


async def test_size_cap_keeps_quantities_and_counts_drops(tmp_path, mqtt_broker, rig):
    model, mb, erp = rig
    doc = doc_for(mb, mqtt_broker.port, tmp_path / "gw.db")
    doc["store"]["max_size_mb"] = 0.004  # ~4 KB: a handful of events
    gw = RunningGateway(parse_config(doc))
    dropped_before = REGISTRY.get_sample_value("edge_gateway_events_dropped_total", {"type": "machine.state_changed"})
    await gw.start()
    try:
        await start_order(gw, erp, model, "C-1")
        await mqtt_broker.astop()
        for _ in range(6):  # state changes (droppable) and quantities while the broker is away
            await model.produce(25, timeout=20)
            await asyncio.sleep(0.3)
        await wait_until(lambda: gw.gw.store.full, 10)
        status = gw.gw.status()
        assert "store_full" in status["alarms"] and status["healthy"] is False
        assert sum(gw.gw.stats.dropped_while_full.values()) > 0
        assert set(gw.gw.stats.dropped_while_full) == {"machine.state_changed"}
        # the metrics an operator alerts on move with it (issue 9: dropped-while-full, store full, alarms active)
        dropped = REGISTRY.get_sample_value("edge_gateway_events_dropped_total", {"type": "machine.state_changed"}) or 0
        assert dropped - (dropped_before or 0) == gw.gw.stats.dropped_while_full["machine.state_changed"] > 0
        assert REGISTRY.get_sample_value("edge_gateway_store_full") == 1
        assert REGISTRY.get_sample_value("edge_gateway_alarms_active", {"severity": "critical"}) >= 1
        await mqtt_broker.astart()
        await assert_ledger_matches(erp, {"press-2": model}, timeout=30)
        await wait_until(lambda: not gw.gw.store.full, 10)
    finally:
        await gw.stop()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


async def test_disk_full_no_crash_alarm_and_exact_after_space_returns(tmp_path, mqtt_broker, rig):
    model, mb, erp = rig
    mnt = tmp_path / "small-fs"
    if not _mount_tmpfs(mnt, "3m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        gw = RunningGateway(parse_config(doc_for(mb, mqtt_broker.port, mnt / "gw.db")))
        await gw.start()
        try:
            await start_order(gw, erp, model, "D-1")
            await model.produce(20, timeout=20)
            await mqtt_broker.astop()
            # fill the filesystem to the last byte
            filler = mnt / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                for chunk in (65536, 512, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError:
                        pass
            finally:
                os.close(fd)
            for _ in range(5):
                await model.produce(30, timeout=20)
                await asyncio.sleep(0.4)
            await wait_until(lambda: gw.gw.store.full, 15, message="the store never noticed the full disk")
            assert "store_full" in gw.gw.status()["alarms"]
            assert gw.task is not None and not gw.task.done(), "the gateway crashed on a full disk"
            filler.unlink()
            await mqtt_broker.astart()
            await model.produce(20, timeout=20)
            await assert_ledger_matches(erp, {"press-2": model}, timeout=40)
            await wait_until(lambda: not gw.gw.store.full, 15)
        finally:
            await gw.stop()
        # the file is intact
        async with Store(str(mnt / "gw.db")) as s:
            rows = await s.db.execute_fetchall("PRAGMA integrity_check")
            assert rows[0][0] == "ok"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_a_crashing_component_is_restarted_and_counting_goes_on(tmp_path, mqtt_broker, rig):
    model, mb, erp = rig
    gw = RunningGateway(parse_config(doc_for(mb, mqtt_broker.port, tmp_path / "gw.db")))

    async def start_with_faulty_connector():
        from gateway.runtime import Gateway

        gw.gw = Gateway(gw.cfg)
        conn = gw.gw.connectors["mb"]
        real = conn.run
        calls = {"n": 0}

        async def flaky():
            calls["n"] += 1
            if calls["n"] == 1:
                await asyncio.sleep(0.2)
                raise RuntimeError("library surprise")
            await real()

        conn.run = flaky
        gw.task = asyncio.create_task(gw.gw.run())
        await wait_until(lambda: gw.gw.started.is_set(), 10)

    await start_with_faulty_connector()
    try:
        await wait_until(lambda: gw.gw.crashes.get("connector.mb") == 1, 10)
        await start_order(gw, erp, model, "S-1")
        await model.produce(30, timeout=20)
        await assert_ledger_matches(erp, {"press-2": model})
        assert gw.gw.status()["component_restarts"] == {"connector.mb": 1}
    finally:
        await gw.stop()


async def test_batch_mode_publishes_cloudevents_batches(tmp_path, mqtt_broker, rig):
    model, mb, erp = rig
    doc = doc_for(mb, mqtt_broker.port, tmp_path / "gw.db", batch_max_events=50)
    gw = RunningGateway(parse_config(doc))
    await gw.start()
    try:
        await wait_until(lambda: gw.gw.engines["press-2"].counters["good"].last is not None, 10)  # baseline read
        await mqtt_broker.astop()          # build a backlog so that batches form
        await model.produce(80, timeout=20)
        await wait_until(lambda: gw.gw.store.pending >= 3, 10, message="no backlog formed while the broker was down")
        await mqtt_broker.astart()
        await assert_ledger_matches(erp, {"press-2": model}, timeout=30)
        assert erp.stats.get("batches", 0) >= 1
        assert erp.stats["rejected"] == 0
    finally:
        await gw.stop()
