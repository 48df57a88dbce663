"""Live reload of the config (gateway/reload.py): machines and connectors added, changed and removed while the other
machines keep counting exactly (ERP ledger == the simulators' ground truth); an invalid file or a restart-only change
leaves the running configuration untouched. Real mosquitto, real Modbus simulators, real SQLite."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from structlog.testing import capture_logs

from gateway.config import load_config
from gateway.reload import Reloader, gateway_pid
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import (
    HIERARCHY,
    IDENT,
    Production,
    RunningGateway,
    assert_ledger_matches,
    dispatch_order,
    expected_ledger,
    ledger_view,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def write_config(path: Path, broker_port: int, machines: dict[str, str], connectors: dict[str, tuple[Any, float]],
                 **extra: Any) -> None:
    """machines: machine id -> connector id; connectors: connector id -> (Modbus simulator, poll interval)."""
    cfg: dict[str, Any] = {
        "gateway": IDENT,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 2},
        "store": {"path": str(path.parent / "gw.db")},
        "connectors": [{"type": "modbus", "id": cid, "host": "127.0.0.1", "port": sim.port, "unit_id": 1,
                        "poll_interval_s": poll, "timeout_s": 1} for cid, (sim, poll) in connectors.items()],
        "machines": [],
        **extra,
    }
    for mid, cid in machines.items():
        tags = connectors[cid][0].tag_addresses()
        cfg["machines"].append({"id": mid, "counters": {"good": {"connector": cid, **tags["good"], "max_rate": 200},
                                                        "scrap": {"connector": cid, **tags["scrap"], "max_rate": 200}},
                                "reporting": {"interval_s": 0.3}})
    path.write_text(yaml.safe_dump(cfg))


def _failed(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "config.reload_failed"]


async def test_reload_adds_changes_and_removes_machines_while_the_others_count_exactly(tmp_path, mqtt_broker):
    ma = MachineModel("PressA", cycle_time=0.02, seed=1, counter_bits=32)
    mb = MachineModel("PressB", cycle_time=0.02, seed=2, counter_bits=32)
    port = mqtt_broker.port
    path = tmp_path / "gw.yaml"
    async with ModbusMachineServer(ma, host="127.0.0.1", port=free_port(), unit_id=1) as sa, \
            ModbusMachineServer(mb, host="127.0.0.1", port=free_port(), unit_id=1) as sb:
        write_config(path, port, {"press-a": "mba"}, {"mba": (sa, 0.05)})
        erp = ErpConsumer("127.0.0.1", port, db_path=str(tmp_path / "erp.db"), client_id="erp-reload")
        await erp.start()
        rgw = RunningGateway(load_config(path))
        gw = await rgw.start()
        try:
            async with Production(ma, mb):
                await dispatch_order(erp, rgw, "press-a", ma, "1001", "0010")
                ma.start()
                await ma.wait_parts(20, timeout=20)

                # 1. add press-b on a connector of its own: press-a's engine and connector are left alone
                engine_a, conn_a = gw.engines["press-a"], gw.connectors["mba"]
                await asyncio.to_thread(erp.dispatch, *HIERARCHY, "press-b", "2001", "0010")
                await wait_until(lambda: gw.stats.dispatch_rejected_by_reason.get("unknown_machine"), 10)
                write_config(path, port, {"press-a": "mba", "press-b": "mbb"}, {"mba": (sa, 0.05), "mbb": (sb, 0.05)})
                p = await Reloader(gw, str(path)).reload()
                assert p is not None and p.machines_added == ["press-b"] and p.connectors_added == ["mbb"]
                assert not (p.machines_changed or p.machines_removed or p.connectors_restarted or p.connectors_removed)
                assert gw.engines["press-a"] is engine_a and gw.connectors["mba"] is conn_a
                assert set(gw.status()["machines"]) == {"press-a", "press-b"}
                # its order was dispatched (retained) before it existed here: refused then, taken now
                mb.set_order("2001", "0010")
                await wait_until(lambda: gw.engines["press-b"].context is not None
                                 and gw.engines["press-b"].context.ref == ("2001", "0010"), 15)
                mb.start()
                await mb.wait_parts(20, timeout=20)

                # 2. press-a moves to another connector (same PLC, another poll interval): press-b is left alone
                engine_b, conn_b = gw.engines["press-b"], gw.connectors["mbb"]
                task_a = next(t for t in gw._tasks if t.get_name() == "connector.mba")
                write_config(path, port, {"press-a": "mba2", "press-b": "mbb"},
                             {"mba2": (sa, 0.03), "mbb": (sb, 0.05)})
                # per-tag alarms a connector raises about its tags (as the OPC UA connector's tag_refused and
                # queue_revised): only the stopped connector's go, nobody would be left to clear them
                gw.alarms.raise_("tag_refused:press-a/good", "critical", "refused", connector="mba", machine="press-a")
                gw.alarms.raise_("queue_revised:press-b/good", "warning", "revised", connector="mbb", machine="press-b")
                p = await Reloader(gw, str(path)).reload()
                assert "tag_refused:press-a/good" not in gw.alarms and "queue_revised:press-b/good" in gw.alarms
                assert p is not None and p.machines_changed == ["press-a"]
                assert p.connectors_added == ["mba2"] and p.connectors_removed == ["mba"]
                assert gw.engines["press-b"] is engine_b and gw.connectors["mbb"] is conn_b
                assert list(gw.connectors) == ["mba2", "mbb"]
                machines = gw.status()["machines"]  # the status page's figures follow the machines' connectors
                assert list(machines["press-a"]["connectors"]) == ["mba2"], machines["press-a"]
                assert list(machines["press-b"]["connectors"]) == ["mbb"]
                assert gw.engines["press-a"] is engine_a  # same counter specs: its engine (baselines, window) is kept
                assert task_a.done(), "the old connector still runs"
                assert sorted(t.get_name() for t in gw._tasks if t.get_name().startswith("connector.")
                              and not t.done()) == ["connector.mba2", "connector.mbb"]
                await wait_until(lambda: gw.status()["components"]["connector.mba2"]["state"] == "connected", 10)
                n = ma.parts_made
                await ma.wait_parts(n + 20, timeout=20)

                # 3. an invalid file: refused with the file and the field, the running configuration stays
                running = gw.cfg
                good = path.read_text()
                path.write_text(good.replace("poll_interval_s: 0.03", "poll_interval_s: 0.03\n  polling_interval: 1"))
                with capture_logs() as logs:
                    assert await Reloader(gw, str(path)).reload() is None
                failed = _failed(logs)
                assert failed and failed[0]["reason"] == "invalid" and failed[0]["file"] == str(path), logs
                assert any(pr["field"] == "connectors[0].polling_interval" for pr in failed[0]["problems"]), failed
                assert gw.cfg is running and gw.connectors["mba2"].config.poll_interval_s == 0.03

                # 4. a key that cannot change live: refused, naming it
                cfg = yaml.safe_load(good)
                cfg["mqtt"]["keepalive_s"] = 7
                path.write_text(yaml.safe_dump(cfg))
                with capture_logs() as logs:
                    assert await Reloader(gw, str(path)).reload() is None
                failed = _failed(logs)
                assert failed and failed[0]["reason"] == "needs_restart" and failed[0]["fields"] == ["mqtt.keepalive_s"]
                assert gw.cfg is running

                # 5. remove press-b (once all it made is in the ERP): its state is committed, press-a counts on
                mb.pause()
                await assert_ledger_matches(erp, {"press-b": mb})
                b_at_removal = expected_ledger("press-b", mb)
                path.write_text(good)
                write_config(path, port, {"press-a": "mba2"}, {"mba2": (sa, 0.03)})
                p = await Reloader(gw, str(path)).reload()
                assert p is not None and p.machines_removed == ["press-b"] and p.connectors_removed == ["mbb"]
                assert "queue_revised:press-b/good" not in gw.alarms
                assert "press-b" not in gw.engines and "connector.mbb" not in gw.status()["components"]
                assert set(gw.status()["machines"]) == {"press-a"}
                assert "press-b" in await gw.store.load_states()
                mb.start()  # press-b goes on making parts: nobody reads them now
                n = ma.parts_made
                await mb.wait_parts(mb.parts_made + 10, timeout=20)
                await ma.wait_parts(n + 20, timeout=20)
                ma.pause()
                await assert_ledger_matches(erp, {"press-a": ma})  # press-a's events flowed all the while
                assert ledger_view(erp, {"press-b"}) == b_at_removal

                # 6. press-b configured again: it picks up from its stored state, and its counter (the durable log)
                # still holds the parts it made meanwhile: they are counted now, to the order it had
                write_config(path, port, {"press-a": "mba2", "press-b": "mbb"}, {"mba2": (sa, 0.03), "mbb": (sb, 0.05)})
                p = await Reloader(gw, str(path)).reload()
                assert p is not None and p.machines_added == ["press-b"] and p.connectors_added == ["mbb"]
                ma.start()
                await mb.wait_parts(mb.parts_made + 10, timeout=20)
                ma.pause()
                mb.pause()
            await assert_ledger_matches(erp, {"press-a": ma, "press-b": mb})
            assert not gw.crashes, gw.crashes
        finally:
            await rgw.stop()
            await erp.stop()


async def test_edge_gateway_reload_command_signals_the_running_gateway(tmp_path, mqtt_broker):
    """`edge-gateway reload --config` validates, finds the gateway by its store lock, sends SIGHUP; an invalid file
    is not sent at all (exit 2), and without a running gateway it says so (exit 1)."""
    ma = MachineModel("PressA", cycle_time=0.05, seed=5, counter_bits=32)
    path = tmp_path / "gw.yaml"
    async with ModbusMachineServer(ma, host="127.0.0.1", port=free_port(), unit_id=1) as sa:
        write_config(path, mqtt_broker.port, {"press-a": "mba"}, {"mba": (sa, 0.05)}, logging={"format": "json"})
        proc = await asyncio.to_thread(subprocess.run, EXE + ["reload", "--config", str(path)], cwd=ROOT,
                                       capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1 and "no gateway runs on store" in proc.stderr, proc.stderr
        gw = await asyncio.create_subprocess_exec(*EXE, "run", "--config", str(path), cwd=ROOT,
                                                  stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        log: list[str] = []

        async def read_log() -> None:
            assert gw.stderr is not None
            async for line in gw.stderr:
                log.append(line.decode())

        reader = asyncio.create_task(read_log())
        try:
            await wait_until(lambda: any('"event": "gateway.started"' in line for line in log), 30)
            assert gateway_pid(str(tmp_path / "gw.db")) == gw.pid

            bad = tmp_path / "bad.yaml"
            bad.write_text(path.read_text().replace("keepalive_s: 2", "keepalive_s: two"))
            proc = await asyncio.to_thread(subprocess.run, EXE + ["reload", "--config", str(bad)], cwd=ROOT,
                                           capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 2 and "mqtt.keepalive_s" in proc.stderr and "not reloaded" in proc.stderr

            write_config(path, mqtt_broker.port, {"press-a": "mba"}, {"mba": (sa, 0.04)}, logging={"format": "json"})
            proc = await asyncio.to_thread(subprocess.run, EXE + ["reload", "--config", str(path)], cwd=ROOT,
                                           capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0 and f"process {gw.pid}" in proc.stdout, proc.stderr
            assert "note:" not in proc.stderr, proc.stderr
            await wait_until(lambda: any('"event": "config.reloaded"' in line for line in log), 15)
            line = next(line for line in log if '"event": "config.reloaded"' in line)
            assert '"connectors_restarted": ["mba"]' in line, line
            assert sum('"event": "config.reload_started"' in line for line in log) == 1  # the bad file never got there

            # a valid file that is not the one the gateway runs with: signalled, with a note saying which it re-reads
            other = tmp_path / "other.yaml"
            other.write_text(path.read_text())
            proc = await asyncio.to_thread(subprocess.run, EXE + ["reload", "--config", str(other)], cwd=ROOT,
                                           capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
            assert f"was started with {path}; it re-reads that file, not this one" in proc.stderr, proc.stderr
            await wait_until(lambda: sum('"event": "config.reload_started"' in line for line in log) == 2, 15)
        finally:
            gw.send_signal(signal.SIGTERM)
            await asyncio.wait_for(gw.wait(), timeout=30)
            await reader
        assert gw.returncode == 0, "".join(log)[-3000:]
        assert os.path.exists(path)


def test_plan_restarts_a_connector_whose_tags_changed_and_names_restart_only_keys():
    """A connector whose own settings are unchanged is restarted when the set of tags it must read changed (a machine
    bound to it was changed, added or removed); unchanged connectors and machines are left alone."""
    from gateway.config import parse_config
    from gateway.reload import ReloadRefused, plan

    def cfg(good_address: int, keepalive: int = 5, extra_machine: bool = False):
        def machine(mid: str, addr: int) -> dict[str, Any]:
            return {"id": mid, "counters": {"good": {"connector": "plc", "address": addr, "data_type": "uint32"}}}

        return parse_config({
            "gateway": IDENT, "mqtt": {"keepalive_s": keepalive},
            "connectors": [{"type": "modbus", "id": "plc", "host": "10.0.0.5"},
                           {"type": "modbus", "id": "other", "host": "10.0.0.6"}],
            "machines": [machine("m1", good_address),
                         {"id": "m2", "counters": {"good": {"connector": "other", "address": 0, "data_type": "uint32"}}},
                         *([machine("m3", 100)] if extra_machine else [])]})

    p = plan(cfg(0), cfg(10))
    assert (p.machines_changed, p.connectors_restarted, p.connectors_added, p.connectors_removed) == (["m1"], ["plc"], [], [])
    p = plan(cfg(0), cfg(0, extra_machine=True))
    assert (p.machines_added, p.machines_changed, p.connectors_restarted) == (["m3"], [], ["plc"])
    assert plan(cfg(0), cfg(0)).empty
    # a machine changed without touching its tags (another reporting interval): its connector restarts all the same,
    # so its new engine learns the counter widths on the server at connect
    changed = cfg(0)
    changed.machines[0].__dict__["reporting"] = changed.machines[0].reporting.model_copy(update={"interval_s": 9})
    p = plan(cfg(0), changed)
    assert (p.machines_changed, p.connectors_restarted) == (["m1"], ["plc"])
    try:
        plan(cfg(0), cfg(0, keepalive=9))
    except ReloadRefused as exc:
        assert exc.reason == "needs_restart" and exc.detail["fields"] == ["mqtt.keepalive_s"]
    else:
        raise AssertionError("an mqtt change was not refused")


async def test_a_changed_machine_keeps_its_open_windows_time(tmp_path, mqtt_broker):
    """A reload that changes a machine's counters rebuilds its engine from its snapshot. The open window keeps the
    time it opened (the snapshot has none): its report is not put off by up to interval_s (with interval_s 60 the
    report came up to 2 minutes after the first count)."""
    m = MachineModel("PressA", cycle_time=0.05, seed=3, counter_bits=32)
    path = tmp_path / "gw.yaml"
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as srv:
        write_config(path, mqtt_broker.port, {"press-a": "mb"}, {"mb": (srv, 0.05)})
        doc = yaml.safe_load(path.read_text())
        doc["machines"][0]["reporting"] = {"interval_s": 60}
        path.write_text(yaml.safe_dump(doc))
        rgw = RunningGateway(load_config(path))
        gw = await rgw.start()
        try:
            async with Production(m):
                await rgw.wait_counters_read("press-a")
                m.start()
                await wait_until(lambda: gw.engines["press-a"].next_deadline() not in (None, float("-inf")), 15,
                                 message="no window opened")
                old = gw.engines["press-a"]
                opened = old._opened_at()
                doc["machines"][0]["counters"]["good"]["max_rate"] = 300  # the counter's spec changes
                path.write_text(yaml.safe_dump(doc))
                p = await Reloader(gw, str(path)).reload()
                assert p is not None and p.machines_changed == ["press-a"]
                new = gw.engines["press-a"]
                assert new is not old
                assert new.next_deadline() != float("-inf"), "the window waits to be timed again from now"
                assert new._opened_at() == opened
        finally:
            await rgw.stop()
