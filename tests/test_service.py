"""Running as a systemd service: the real gateway process against a notify socket the test binds (READY after the
store is open, WATCHDOG=1 pings from the core loop's progress, STATUS= lines, a frozen core stops the pings), the unit
file checked by systemd-analyze, and the sd_notify sender itself."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from gateway.service import notify
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import IDENT, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]
UNIT = ROOT / "deploy" / "edge-gateway.service"
WATCHDOG_S = 1.0


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; a thread records (monotonic arrival time, message)
    pairs as they arrive (so a test that waits in between still knows when each one came)."""

    def __init__(self, address: str) -> None:
        self.address = address  # as it goes into NOTIFY_SOCKET: a path or @abstract
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.wall: list[float] = []  # wall-clock arrival time of each message (to compare with file times)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode()))
            self.wall.append(time.time())

    def drain(self) -> list[tuple[float, str]]:
        return list(self.messages)

    def lines(self, prefix: str, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, line) for t, m in self.drain() if t >= since for line in m.split("\n") if line.startswith(prefix)]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _config(tmp_path: Path, broker_port: int, modbus: ModbusMachineServer) -> Path:
    tags = modbus.tag_addresses()
    cfg = {
        "gateway": IDENT,
        "mqtt": {"port": broker_port},
        "store": {"path": str(tmp_path / "gw.db")},
        "logging": {"format": "json"},
        "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": modbus.port,
                        "poll_interval_s": 0.05}],
        "machines": [{"id": "press-2", "counters": {"good": {"connector": "mb", **tags["good"]},
                                                    "scrap": {"connector": "mb", **tags["scrap"]}}}],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lock_held_by(lock_path: Path, pid: int) -> bool:
    """The store's lock file names ``pid`` and its flock is taken (a second opener could not write the store)."""
    if not lock_path.exists() or lock_path.read_text().split("\n", 1)[0] != str(pid):
        return False
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["hang", "block"])
async def test_notify_ready_watchdog_status_and_a_frozen_core_stops_the_pings(tmp_path, mqtt_broker, mode):
    """``hang``: the core awaits forever while the rest of the process runs on (an independent timer would go on
    pinging: ours must not). ``block``: the core blocks the event loop synchronously (a thread pinging on its own
    would go on: ours must not)."""
    model = MachineModel("Press2", cycle_time=0.05, seed=3, counter_bits=32)
    ns = NotifySocket(f"@edge-gateway-test-{uuid.uuid4().hex}")
    freeze = tmp_path / "freeze-now"
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        path = _config(tmp_path, mqtt_broker.port, mb)
        env = {**os.environ, "NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
               "EDGE_GATEWAY_FREEZE_AT": f"core.round:{mode}", "EDGE_GATEWAY_FREEZE_FILE": str(freeze)}
        env.pop("WATCHDOG_PID", None)
        err = (tmp_path / "gw.err").open("wb")
        proc = await asyncio.create_subprocess_exec(*EXE, "run", "--config", str(path), cwd=ROOT, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=err)
        production = asyncio.create_task(model.run_forever())
        try:
            # READY=1, and at that moment the store is open: its lock file names the process and the flock is held
            ready_lock: list[bool] = []

            def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError((tmp_path / "gw.err").read_text()[-3000:])
                if ns.lines("READY=1") and not ready_lock:
                    ready_lock.append(_lock_held_by(tmp_path / "gw.db.lock", proc.pid))
                return bool(ready_lock)

            await wait_until(ready, 30)
            assert ready_lock == [True], "the store is not open (lock not held by the gateway) after READY=1"
            lock = tmp_path / "gw.db.lock"
            assert lock.stat().st_mtime <= ns.wall[0], "READY=1 came before the store's lock was taken"
            t_ready = ns.lines("READY=1")[0][0]
            first = ns.drain()[0][1]
            assert first.startswith("READY=1") and "STATUS=" in first, first
            assert "MAINPID=" + str(proc.pid) in first

            # pings while the core makes progress (the machine runs: samples; then idle ticks)
            await wait_until(lambda: len(ns.lines("WATCHDOG=1", since=t_ready)) >= 6, 10)
            pings = [t for t, _ in ns.lines("WATCHDOG=1", since=t_ready)]
            assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_S, pings
            await wait_until(lambda: any("machines 1/1 connected" in line for _, line in ns.lines("STATUS=")), 10)
            status = [line for _, line in ns.lines("STATUS=")]
            assert any("outbox" in s and "alarms: none" in s and "mqtt connected" in s for s in status), status

            # an idle core pings too: the machine stops, no samples come (only changed registers are handed on)
            model.pause()
            t_idle = time.monotonic() + 0.5
            await wait_until(lambda: len(ns.lines("WATCHDOG=1", since=t_idle)) >= 8, 10)
            pings = [t for t, _ in ns.lines("WATCHDOG=1", since=t_idle)]
            assert max(b - a for a, b in itertools.pairwise(pings)) < WATCHDOG_S, pings

            # freeze the core: the pings stop (the process is alive all the while)
            freeze.touch()
            t_freeze = time.monotonic()
            await wait_until(lambda: "frozen at core.round" in (tmp_path / "gw.err").read_text(), 5)
            settle = t_freeze + WATCHDOG_S  # a ping already on its way may still land
            if mode == "hang":  # the pinger runs on (each round says why it does not ping): watch 4 of its rounds
                await wait_until(lambda: len([1 for _, line in ns.lines("STATUS=", settle)
                                              if "core loop stalled" in line]) >= 4, 5)
            else:
                await asyncio.sleep(2 * WATCHDOG_S)  # an absence is only observed over time: two watchdog intervals
            assert proc.returncode is None, "the frozen gateway died instead of staying frozen"
            late = ns.lines("WATCHDOG=1", since=settle)
            assert not late, f"WATCHDOG=1 went on while the core was frozen: {late}"
            if mode == "hang":
                assert '"event": "service.core_stalled"' in (tmp_path / "gw.err").read_text()
        finally:
            model.pause()
            production.cancel()
            proc.kill()
            await asyncio.wait_for(proc.wait(), timeout=10)
            err.close()
            ns.close()


def test_no_ready_when_the_store_cannot_be_opened(tmp_path):
    """READY=1 means the store is open: with its lock held by someone else the gateway exits 2 and never says READY."""
    ns = NotifySocket(f"@edge-gateway-test-{uuid.uuid4().hex}")
    cfg = {"gateway": IDENT, "mqtt": {"port": free_port()}, "store": {"path": str(tmp_path / "gw.db")}}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fd = os.open(tmp_path / "gw.db.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\npytest holding the lock\n".encode())
        proc = subprocess.run(EXE + ["run", "--config", str(path)], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "NOTIFY_SOCKET": ns.address}, check=False)
    finally:
        os.close(fd)
        ns.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is in use by process" in proc.stderr
    assert not ns.lines("READY=1"), ns.drain()


async def test_stopping_is_announced_and_sighup_reloads_with_reloading_then_ready(tmp_path, mqtt_broker):
    model = MachineModel("Press2", cycle_time=0.05, seed=4, counter_bits=32)
    ns = NotifySocket(str(tmp_path / "notify.sock"))  # a path this time, not the abstract namespace
    async with ModbusMachineServer(model, host="127.0.0.1", port=free_port(), unit_id=1) as mb:
        path = _config(tmp_path, mqtt_broker.port, mb)
        env = {**os.environ, "NOTIFY_SOCKET": ns.address}
        env.pop("WATCHDOG_USEC", None)
        proc = await asyncio.create_subprocess_exec(*EXE, "run", "--config", str(path), cwd=ROOT, env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: ns.lines("READY=1"), 30)
            assert not ns.lines("WATCHDOG=1"), "no watchdog was asked for"
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: len(ns.lines("READY=1")) >= 2, 15)
            reloading = ns.lines("RELOADING=1")
            assert reloading and reloading[0][0] <= ns.lines("READY=1")[1][0]
            assert proc.returncode is None, "SIGHUP must not end the gateway"
            # an invalid file: refused, the gateway runs on (READY again, with the running configuration)
            path.write_text(path.read_text().replace("poll_interval_s: 0.05", "poll_interval_s: fast"))
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: len(ns.lines("READY=1")) >= 3, 15)
            assert proc.returncode is None
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
            ns.close()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert ns.lines("STOPPING=1")
        log = err.decode()
        assert '"event": "config.reload_unchanged"' in log
        failed = next(json.loads(line) for line in log.splitlines() if '"event": "config.reload_failed"' in line)
        assert failed["reason"] == "invalid" and failed["file"] == str(path), failed
        assert [p["field"] for p in failed["problems"]] == ["connectors[0].poll_interval_s"], failed
        assert failed["level"] == "error"


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(tmp_path, monkeypatch):
    for address in (str(tmp_path / "n.sock"), f"@edge-gateway-unit-{uuid.uuid4().hex}"):
        ns = NotifySocket(address)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert notify("READY=1\nSTATUS=one line")
            assert wait_for(ns.drain) == [(ns.messages[0][0], "READY=1\nSTATUS=one line")]
        finally:
            ns.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False  # not under systemd: nothing to do
    assert notify("READY=1", socket_path=str(tmp_path / "nobody-listens")) is False  # logged, never raised


def wait_for(fn, timeout: float = 5.0):
    """fn() once it returns something truthy (a synchronous wait on an observable condition)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    """The unit parses and every directive is known to this systemd (ExecStart pointed at an existing file)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found (Debian package systemd)"
    text = UNIT.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                      "DynamicUser=yes", "StateDirectory=edge-gateway", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "PrivateTmp=yes", "ProtectHome=yes", "RestrictAddressFamilies=", "CapabilityBoundingSet=\n",
                      "SystemCallFilter=@system-service", "RestartPreventExitStatus=2"):
        assert directive in text, directive
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    local = tmp_path / "edge-gateway.service"
    local.write_text(text.replace(exec_line, f"ExecStart={sys.executable} -m gateway.cli run --config /etc/x.yaml"))
    proc = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(local) in line or "Unknown" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    # the sandbox as systemd rates it (0 = locked down, 10 = exposed; "OK" is below 2)
    proc = subprocess.run([analyze, "security", "--offline=yes", str(local)], capture_output=True, text=True,
                          timeout=60, check=False)
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert level and float(level.group(1)) < 2.0, proc.stdout[-3000:] + proc.stderr
