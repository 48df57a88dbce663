"""An MQTT broker for tests and the demo: a real mosquitto process on a free loopback port with a generated config
(stoppable, killable and restartable on the same port, for outage tests), or, for the demo only when mosquitto is not
installed, the pure-Python amqtt broker in-process. Nothing here touches a system broker."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from simulators.ports import free_port

INSTALL_HINT = "install it with `apt-get install mosquitto` (Debian/Ubuntu)"


def find_mosquitto() -> str:
    """Path of the mosquitto binary; raises (never skips) when it is missing."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"mosquitto binary not found on PATH nor in /usr/sbin: {INSTALL_HINT}")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process listening on ``host:port`` with a generated config in ``workdir``.

    ``extra_config`` is appended verbatim to the generated config (e.g. ``"max_inflight_messages 10\\n"``).
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, port: int | None = None,
                 host: str = "127.0.0.1", extra_config: str = "", binary: str | None = None,
                 persistence: bool = False) -> None:
        self.binary = binary or find_mosquitto()
        self.host = host
        self.port = port or free_port(host)
        self._tmp = tempfile.TemporaryDirectory(prefix="mosquitto-") if workdir is None else None
        self.dir = Path(self._tmp.name if self._tmp is not None else workdir)  # type: ignore[arg-type]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.stderr_path = self.dir / "mosquitto.stderr"
        self.extra_config = extra_config
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- config ------------------------------------------------------------------------------------------------
    def config_text(self) -> str:
        # Run as the current user: as root, mosquitto would otherwise switch to user "mosquitto" and could not write
        # its log into a private (0700) temp dir.
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            f"user {user}",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            *(("persistence true", f"persistence_location {self.dir}/", "persistence_file mosquitto.db")
              if self.persistence else ("persistence false",)),
            # no per-client queue limit: a slow subscriber must not lose QoS 1 messages in tests
            "max_queued_messages 0",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        return "\n".join(lines) + "\n" + self.extra_config + ("\n" if self.extra_config and not self.extra_config.endswith("\n") else "")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        """Start (or restart, same port) and wait until the port accepts connections. Idempotent when running."""
        if self.running:
            return self
        self.conf_path.write_text(self.config_text())
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"mosquitto exited with code {rc} on start (port {self.port})\n{self.diagnostics()}")
            if _accepts(self.host, self.port):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{self.port} "
                                   f"within {timeout}s\n{self.diagnostics()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. No-op when not running."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: an abrupt broker crash."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self, timeout: float = 10.0) -> "MosquittoBroker":
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and remove the temp dir if this object created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- diagnostics -------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        try:
            err = self.stderr_path.read_text(errors="replace")
        except OSError:
            err = ""
        return f"--- mosquitto log ({self.log_path}) ---\n{self.log_text()}--- stderr ---\n{err}"

    # -- asyncio helpers (the process calls block briefly) -------------------------------------------------------
    async def astart(self) -> "MosquittoBroker":
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.host}:{self.port}, running={self.running})"


def _has_mosquitto() -> bool:
    try:
        find_mosquitto()
        return True
    except RuntimeError:
        return False


class EmbeddedBroker:
    """For the demo: mosquitto when it is on PATH, else amqtt in this process."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, persistence: bool = False) -> None:
        self.workdir = workdir
        self.persistence = persistence  # mosquitto saves sessions on a clean stop (the demo's --outage)
        self.port = free_port()
        forced = os.environ.get("EDGE_GATEWAY_DEMO_BROKER")  # "mosquitto" | "amqtt"
        self.kind = forced or ("mosquitto" if _has_mosquitto() else "amqtt")
        self._mosq: MosquittoBroker | None = None
        self._amqtt = None

    async def start(self) -> None:
        if self.kind == "mosquitto":
            self._mosq = MosquittoBroker(self.workdir, port=self.port, persistence=self.persistence)
            await self._mosq.astart()
            return
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise RuntimeError("no MQTT broker available: install mosquitto, or `pip install amqtt` for the demo") from exc
        self._amqtt = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await self._amqtt.start()

    @property
    def can_restart(self) -> bool:
        """An outage (stop, then start on the same port with the sessions saved) needs mosquitto."""
        return self.kind == "mosquitto"

    async def outage_begin(self) -> None:
        """Stop the broker (SIGTERM: it saves its sessions), keeping its port for outage_end()."""
        assert self._mosq is not None, "outages need mosquitto"
        await self._mosq.astop()

    async def outage_end(self) -> None:
        assert self._mosq is not None, "outages need mosquitto"
        await self._mosq.astart()

    async def stop(self) -> None:
        if self._mosq is not None:
            await asyncio.to_thread(self._mosq.close)
        if self._amqtt is not None:
            await self._amqtt.shutdown()
