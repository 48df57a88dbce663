"""A three-node NATS cluster with JetStream and MQTT endpoints, for tests, the benchmark and the demo.

Every node is a real ``nats-server`` process on free loopback ports (client, cluster route, MQTT, monitoring), with
its own JetStream store directory under ``workdir``. Nodes can be killed (SIGKILL), stopped and restarted on the same
ports and store (outage tests). Nothing here touches a system NATS server.

``mqtt_stream_replicas`` sets ``mqtt { stream_replicas }``: the replica count of the streams the MQTT side creates
(``$MQTT_msgs`` holds every QoS 1 message published over MQTT, ``$MQTT_sess`` the sessions, ``$MQTT_rmsgs`` the
retained messages). With 3, a message stored there survives the loss of any one node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


INSTALL_HINT = "install it with `apt-get install nats-server` (Debian/Ubuntu)"


def find_nats_server() -> str:
    """Path of the nats-server binary (``$EDGE_NATS_SERVER`` when set, else PATH, else the usual places); raises
    (never skips) when it is missing."""
    explicit = os.environ.get("EDGE_NATS_SERVER")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise RuntimeError(f"nats-server binary not found at EDGE_NATS_SERVER={explicit!r}: {INSTALL_HINT}, or point "
                           "EDGE_NATS_SERVER at it")
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"nats-server binary not found: {INSTALL_HINT}")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


@dataclass
class NatsNode:
    name: str
    host: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    dir: Path
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def conf_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats.log"

    def config_text(self, cluster_name: str, mqtt_stream_replicas: int, max_file_store: str) -> str:
        routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in self.routes)
        return "\n".join([
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.client_port}"',
            f'http: "{self.host}:{self.http_port}"',
            f'jetstream {{ store_dir: "{self.dir / "js"}", max_memory_store: 64MB, max_file_store: {max_file_store} }}',
            f'cluster {{ name: "{cluster_name}", listen: "{self.host}:{self.cluster_port}", routes: [{routes}] }}',
            f'mqtt {{ listen: "{self.host}:{self.mqtt_port}", stream_replicas: {mqtt_stream_replicas} }}',
            "",
        ])

    def varz(self, what: str = "varz", timeout: float = 1.0) -> dict:
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/{what}", timeout=timeout) as r:
            return json.loads(r.read())


class NatsCluster:
    """``size`` nats-server processes forming one cluster (JetStream + MQTT on every node)."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, size: int = 3, host: str = "127.0.0.1",
                 mqtt_stream_replicas: int | None = None, binary: str | None = None,
                 max_file_store: str = "1GB", name: str = "edge") -> None:
        self.binary = binary or find_nats_server()
        self.host = host
        self.name = name
        self.max_file_store = max_file_store
        self.mqtt_stream_replicas = mqtt_stream_replicas if mqtt_stream_replicas is not None else min(size, 3)
        self._tmp = tempfile.TemporaryDirectory(prefix="nats-cluster-") if workdir is None else None
        self.dir = Path(self._tmp.name if self._tmp is not None else workdir)  # type: ignore[arg-type]
        self.size = size
        self.nodes: list[NatsNode] = []
        self._allocate()

    def _allocate(self) -> None:
        """Distinct free ports for every listener of every node (all sockets held open together while choosing)."""
        socks = []
        try:
            for _ in range(4 * self.size):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((self.host, 0))
                socks.append(s)
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        self.nodes = []
        for i in range(self.size):
            d = self.dir / f"n{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(NatsNode(f"n{i + 1}", self.host, *ports[4 * i:4 * i + 4], d))
        for n in self.nodes:
            n.routes = [m.cluster_port for m in self.nodes if m is not n]

    # -- addresses ---------------------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        """NATS client URLs of every node (give them all to a client: it fails over between them)."""
        return [n.url for n in self.nodes]

    @property
    def mqtt_endpoints(self) -> list[tuple[str, int]]:
        return [(n.host, n.mqtt_port) for n in self.nodes]

    def running_nodes(self) -> list[NatsNode]:
        return [n for n in self.nodes if n.running]

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def _spawn(self, n: NatsNode) -> None:
        n.conf_path.write_text(n.config_text(self.name, self.mqtt_stream_replicas, self.max_file_store))
        with open(n.log_path, "ab") as err:
            n.proc = subprocess.Popen([self.binary, "-c", str(n.conf_path)], stdin=subprocess.DEVNULL,
                                      stdout=err, stderr=err, start_new_session=True)

    def _wait_listening(self, n: NatsNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (_accepts(n.host, n.client_port) and _accepts(n.host, n.mqtt_port)):
            if n.proc is None or n.proc.poll() is not None:
                rc = n.proc.returncode if n.proc is not None else None
                n.proc = None
                raise RuntimeError(f"nats-server {n.name} exited with code {rc}\n{self.diagnostics(n)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {n.name} did not accept connections\n{self.diagnostics(n)}")
            time.sleep(0.05)

    def start_node(self, node: NatsNode | int, timeout: float = 30.0) -> NatsNode:
        """(Re)start one node on its ports and store; waits until it is routed and JetStream has a leader."""
        n = self.nodes[node] if isinstance(node, int) else node
        if not n.running:
            self._spawn(n)
        self._wait_listening(n, timeout)
        self.wait_ready(timeout)
        return n

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "NatsCluster":
        """Start every node and wait until JetStream has a meta leader and every node sees the others. A port taken
        by another process between choosing and binding (other test runs on the machine) → new ports, retried."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except BaseException as exc:
                for n in self.nodes:  # never leave a half-started cluster behind
                    self.kill(n)
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir.mkdir(parents=True, exist_ok=True)
                self._allocate()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "NatsCluster":
        # the MQTT listener of a clustered node waits for JetStream, which waits for the cluster: spawn all first
        for n in self.nodes:
            if not n.running:
                self._spawn(n)
        for n in self.nodes:
            self._wait_listening(n, timeout)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running node is routed to every other running node and JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            running = self.running_nodes()
            try:
                ok = True
                for n in running:
                    routez = n.varz("routez")
                    peers = {r.get("remote_id") for r in routez.get("routes", [])}
                    if len(peers) < len(running) - 1:
                        ok = False
                        last = f"{n.name} has {len(peers)} routes"
                        break
                    jsz = n.varz("jsz")
                    meta = jsz.get("meta_cluster") or {}
                    if not meta.get("leader"):
                        ok = False
                        last = f"{n.name}: no JetStream meta leader yet"
                        break
                if ok:
                    return
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS cluster not ready within {timeout}s: {last}")
            time.sleep(0.1)

    def kill(self, node: NatsNode | int) -> None:
        """SIGKILL one node (no clean shutdown, no flush)."""
        n = self.nodes[node] if isinstance(node, int) else node
        if n.proc is not None and n.proc.poll() is None:
            os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait(10)
        n.proc = None

    def stop_node(self, node: NatsNode | int, timeout: float = 10.0) -> None:
        n = self.nodes[node] if isinstance(node, int) else node
        if n.proc is not None and n.proc.poll() is None:
            n.proc.terminate()
            try:
                n.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(n.proc.pid, signal.SIGKILL)
                n.proc.wait(10)
        n.proc = None

    def stop(self) -> None:
        for n in self.nodes:
            self.stop_node(n)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def diagnostics(self, node: NatsNode | None = None, tail: int = 40) -> str:
        out = []
        for n in [node] if node else self.nodes:
            try:
                lines = n.log_path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                lines = []
            out.append(f"--- {n.name} ({n.log_path})\n" + "\n".join(lines))
        return "\n".join(out)


def main() -> None:  # pragma: no cover - manual use: python -m simulators.nats_cluster
    c = NatsCluster().start()
    print(json.dumps({"nats": c.urls, "mqtt": [f"{h}:{p}" for h, p in c.mqtt_endpoints], "dir": str(c.dir)}))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
