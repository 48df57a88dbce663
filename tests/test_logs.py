"""Logs an operator can act on: third-party libraries' records as JSON too (one record per traceback), the broker's
refusal of our login logged as such, disconnect reasons that say what happened, the downtime on recovery lines, and
a status topic whose last will does not pretend the start time is the time of death."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import structlog
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig
from gateway.mqtt import MqttLink, describe_disconnect
from tests.broker import MosquittoBroker
from tests.e2e import IDENT, wait_until

ROOT = Path(__file__).resolve().parents[1]
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def test_third_party_records_come_out_as_json_lines_with_one_record_per_traceback():
    script = textwrap.dedent("""
        import logging, structlog
        from gateway import logs
        logs.configure("json", "info")
        structlog.get_logger("gateway.x").info("x.happened", n=1)
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("asyncua.client.ua_client").exception("Error in watchdog loop")
        logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.0.0.9")
        logging.getLogger("aiosqlite").warning("slow %d ms", 120, extra={"db": "gw.db"})
        logging.getLogger("pymodbus.logging").warning("pymodbus chatter")  # errors only from pymodbus
        logging.getLogger("paho.mqtt.client").debug("Sending PUBLISH")  # debug: not at info
        logs.configure("json", "info")  # configuring again must not duplicate lines
        structlog.get_logger("gateway.x").warning("x.again")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert [r["event"] for r in records] == ["x.happened", "Error in watchdog loop",
                                             "Error handling request from 10.0.0.9", "slow 120 ms", "x.again"], lines
    ours, ua, web, sql, _again = records
    assert ours["level"] == "info" and ours["n"] == 1 and RFC3339.fullmatch(ours["timestamp"])
    assert ua["level"] == "error" and ua["logger"] == "asyncua.client.ua_client"
    assert ua["exception"].startswith("Traceback (most recent call last)") and "ZeroDivisionError" in ua["exception"]
    assert web["logger"] == "aiohttp.server" and web["level"] == "error"
    assert sql["db"] == "gw.db" and sql["level"] == "warning"


@pytest.mark.parametrize("loop_args, loop_name", [([], "uvloop"), (["--event-loop", "asyncio"], "asyncio")])
def test_gateway_run_logs_paho_and_its_own_events_as_json(tmp_path, mqtt_broker, loop_args, loop_name):
    cfg = {"gateway": IDENT, "mqtt": {"port": mqtt_broker.port}, "store": {"path": str(tmp_path / "gw.db")},
           "logging": {"format": "json", "level": "debug"}}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path), *loop_args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        lines.extend(proc.stderr)  # type: ignore[arg-type]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        def seen(pred) -> bool:
            return any(pred(json.loads(ln)) for ln in list(lines) if ln.startswith("{"))

        import time
        deadline = time.monotonic() + 30
        while not (seen(lambda r: r.get("logger", "").startswith("paho")) and seen(lambda r: r["event"] == "mqtt.connected")):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-30:])
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(10)
    records = [json.loads(ln) for ln in lines]  # every line, ours and paho's, is JSON
    paho_lines = [r for r in records if r.get("logger", "").startswith("paho")]
    assert any("CONNECT" in r["event"] for r in paho_lines) and all(r["level"] == "debug" for r in paho_lines)
    # the process ran on the event loop asked for (uvloop by default: gateway/loops.py)
    assert [r["event_loop"] for r in records if r["event"] == "gateway.started"] == [loop_name]


async def test_broker_refusing_our_login_is_logged_as_such(tmp_path):
    passwd = tmp_path / "passwd"
    await asyncio.to_thread(subprocess.run, ["mosquitto_passwd", "-b", "-c", str(passwd), "gw", "right"], check=True,
                            capture_output=True)
    extra = f"password_file {passwd}\n"
    broker = MosquittoBroker(tmp_path / "mq", extra_config=extra)
    broker.config_text = lambda orig=broker.config_text: orig().replace("allow_anonymous true", "allow_anonymous false")
    broker.start()
    try:
        # mosquitto answers a wrong password with 0x87 'Not authorized' (MQTT 5 allows 0x86 'Bad user name or
        # password' too); an anonymous client with 0x87
        for username, password in (("gw", "wrong"), (None, None)):
            link = MqttLink(MqttConfig(port=broker.port, username=username), client_id=f"gw-{username}", password=password)
            attempts = []
            make = link._make_client
            link._make_client = lambda conn, make=make, attempts=attempts: attempts.append(conn) or make(conn)
            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(link.run())
                try:
                    # it keeps retrying; the refusal is logged once, not at each attempt
                    await wait_until(lambda attempts=attempts: len(attempts) >= 3, 20)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            refused = [e for e in logs if e["event"] == "mqtt.auth_refused"]
            assert len(refused) == 1, logs
            assert refused[0]["reason_code"] in ("0x86", "0x87") and refused[0]["log_level"] == "error"
            assert ("user 'gw'" if username else "anonymous") in link.status.last_error
            assert refused[0]["username"] == username
            assert not [e for e in logs if e["event"] == "mqtt.connect_failed"]  # not a generic failure
            assert "refused the login" in link.status.last_error and link.auth_refused
        # the right password connects, and clears the refusal
        link = MqttLink(MqttConfig(port=broker.port, username="gw"), client_id="gw-ok", password="right")
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)
            assert link.auth_refused is None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        broker.close()


async def test_disconnect_reasons_say_what_happened_and_reconnect_carries_the_downtime(mqtt_broker):
    link = MqttLink(MqttConfig(port=mqtt_broker.port, keepalive_s=2), client_id="gw-reasons")
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)

            # the broker goes away, comes back 1 s later
            n = len(logs)
            await mqtt_broker.astop()
            await wait_until(lambda: any(e["event"] == "mqtt.disconnected" for e in logs[n:]), 10)
            lost = next(e for e in logs[n:] if e["event"] == "mqtt.disconnected")
            assert ("shutting down" in lost["reason"] or "connection lost without a DISCONNECT" in lost["reason"]), lost
            await asyncio.sleep(1.0)
            await mqtt_broker.astart()
            await wait_until(lambda: any(e["event"] == "mqtt.connected" for e in logs[n:]), 15)
            back = next(e for e in logs[n:] if e["event"] == "mqtt.connected")
            assert back["downtime_s"] >= 1.0, back
            assert link.status.downtime_s == back["downtime_s"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    first = next(e for e in logs if e["event"] == "mqtt.connected")
    assert "downtime_s" not in first  # the first connect is not a recovery


async def test_the_logged_downtime_is_the_status_downtime_when_the_clock_moves_between_reads(mqtt_broker, monkeypatch):
    """One outage, one number: the mqtt.connected line and the link's status give the same downtime. A loaded machine
    lets time pass between two readings of the clock; here the status's clock advances 1 ms at every reading, so a
    second reading rounded to ms always differs (unpatched, the two differed only now and then: 1.539 vs 1.54)."""
    import time
    from types import SimpleNamespace

    import gateway.component

    ticks = [0.0]

    def monotonic() -> float:
        ticks[0] += 0.001
        return time.monotonic() + ticks[0]

    monkeypatch.setattr(gateway.component, "time", SimpleNamespace(monotonic=monotonic, time=time.time))
    link = MqttLink(MqttConfig(port=mqtt_broker.port, keepalive_s=2), client_id="gw-downtime")
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)
            await mqtt_broker.astop()
            await wait_until(lambda: link.status.state.value != "connected", 10)
            n = len(logs)
            await mqtt_broker.astart()
            await wait_until(lambda: any(e["event"] == "mqtt.connected" for e in logs[n:]), 15)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    back = next(e for e in logs[n:] if e["event"] == "mqtt.connected")
    assert back["downtime_s"] > 0 and link.status.downtime_s == back["downtime_s"], (back, link.status)


def test_a_disconnect_sent_by_the_broker_is_explained():
    # mosquitto 2.0 closes the socket without a DISCONNECT on a session takeover or shutdown; MQTT 5 brokers that do
    # send one (EMQX, HiveMQ, NATS) give a reason code, which the log line explains
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    text = describe_disconnect(taken, True, 5)
    assert text.startswith("the broker closed the connection: Session taken over (0x8E)") and "same client id" in text
    lost = describe_disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), False, 5)
    assert "connection lost without a DISCONNECT" in lost and "keepalive (5 s)" in lost


def test_status_topic_times_and_a_last_will_without_the_start_time(tmp_path, mqtt_broker):
    topic = f"edge/v1/{IDENT['enterprise']}/{IDENT['site']}/{IDENT['area']}/{IDENT['line']}/_gateways/{IDENT['id']}/status"
    got: list[dict] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-watch", protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    sub.connect("127.0.0.1", mqtt_broker.port)
    sub.loop_start()
    cfg = {"gateway": IDENT, "mqtt": {"port": mqtt_broker.port}, "store": {"path": str(tmp_path / "gw.db")},
           "logging": {"format": "json"}}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    import time

    def wait(pred, what: str) -> None:
        deadline = time.monotonic() + 20
        while not pred():
            assert time.monotonic() < deadline, f"{what}: {got}"
            time.sleep(0.05)

    try:
        run = [sys.executable, "-m", "gateway.cli", "run", "--config", str(path)]
        proc = subprocess.Popen(run, cwd=ROOT, stderr=subprocess.DEVNULL)
        wait(lambda: got and got[-1]["state"] == "online", "online")
        online = got[-1]
        assert RFC3339.fullmatch(online["time"]) and RFC3339.fullmatch(online["started"]), online
        time.sleep(1.1)
        os.kill(proc.pid, signal.SIGKILL)  # dies without a word: the broker publishes the last will
        proc.wait(10)
        wait(lambda: got[-1]["state"] == "offline", "last will")
        will = got[-1]
        assert "time" not in will and will["cause"] == "connection_lost", will
        assert will["started"] == online["started"]

        with open(tmp_path / "second.log", "w") as err:
            proc = subprocess.Popen(run, cwd=ROOT, stderr=err)
        wait(lambda: got[-1]["state"] == "online", "online again")
        proc.send_signal(signal.SIGTERM)  # a clean stop says so, with the time it stopped
        proc.wait(30)
        wait(lambda: got[-1]["state"] == "offline", "clean stop")
        stopped = got[-1]
        assert stopped["cause"] == "stopped" and RFC3339.fullmatch(stopped["time"]), (got, (tmp_path / "second.log").read_text())
        assert stopped["time"] > stopped["started"]
    finally:
        sub.loop_stop()
        sub.disconnect()
