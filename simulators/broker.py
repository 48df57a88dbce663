"""An MQTT broker for tests and the demo: a real mosquitto process on a free loopback port, or, for the demo only
when mosquitto is not installed, the pure-Python amqtt broker in-process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from simulators.ports import free_port


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """A mosquitto broker process with a generated config (default settings otherwise: Nagle on, as shipped).
    ``stop()`` / ``kill()`` / ``start()`` again on the same port, for outage tests."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int | None = None,
                 host: str = "127.0.0.1", extra_conf: str = "", persistence: bool = False) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: run `apt-get install -y mosquitto` (Debian/Ubuntu)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mosquitto-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / f"mosquitto-{self.port}.conf"
        self.log_file = self.dir / f"mosquitto-{self.port}.log"
        self.conf.write_text(
            f"listener {self.port} {host}\nallow_anonymous true\n"
            + (f"persistence true\npersistence_location {self.dir}/\npersistence_file mosquitto-{self.port}.db\n"
               if persistence else "persistence false\n")
            + f"log_dest file {self.log_file}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"max_queued_messages 0\n{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start_sync(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err or self.log_text()}")
            if _port_open(self.host, self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop_sync(self, timeout: float = 5.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)

    def kill_sync(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_file.read_text()
        except OSError:
            return ""

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def kill(self) -> None:
        await asyncio.to_thread(self.kill_sync)

    def cleanup(self) -> None:
        self.stop_sync()
        if self._tmp is not None:
            self._tmp.cleanup()


class EmbeddedBroker:
    """For the demo: mosquitto when it is on PATH, else amqtt in this process."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.kind = "mosquitto" if mosquitto_binary() else "amqtt"
        self._mosq: MosquittoProcess | None = None
        self._amqtt = None

    async def start(self) -> None:
        if self.kind == "mosquitto":
            self._mosq = MosquittoProcess(self.workdir, port=self.port)
            await self._mosq.start()
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

    async def stop(self) -> None:
        if self._mosq is not None:
            await self._mosq.stop()
            self._mosq.cleanup()
        if self._amqtt is not None:
            await self._amqtt.shutdown()
