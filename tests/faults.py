"""Connector test kit: a TCP proxy that can black-hole a connection, simulators on free ports, a recording sink."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from mappings.samples import Sample
from simulators.ports import free_port


class BlackHole:
    """A TCP proxy that can stop forwarding without closing anything (a dead switch, a pulled cable)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer, False), self._pump(up_reader, writer, True))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_client: bool) -> None:
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                if not self.frozen:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()


class Gate:
    """A TCP proxy in front of a server that is away until ``open()``. While shut it accepts every connection and
    drops it at once (the client sees the server gone), and ``shut()`` also cuts the connections it forwards. Its
    port stays bound throughout: with nothing listening on an ephemeral-range port a client can connect to itself
    (TCP simultaneous open). ``refused`` counts the connections dropped while shut."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.is_open = False
        self.refused = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Gate:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def open(self) -> None:
        self.is_open = True

    def shut(self) -> None:
        self.is_open = False
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self._writers |= pair

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= pair

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.shut()


async def start_on_free_port(make: Callable[[int], Any], attempts: int = 5) -> Any:
    """A simulator on a free port. A port picked with bind(0) is from the ephemeral range: another process's
    outgoing connection may take it before the server binds it, so on EADDRINUSE pick another one."""
    for attempt in range(attempts):
        srv = make(free_port())
        try:
            await srv.start()
            return srv
        except OSError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def restart(server: Any) -> None:
    """(Re)start on the same port; wait a little if something holds the port for a moment."""
    for attempt in range(30):
        try:
            await server.start()
            return
        except OSError:
            if attempt == 29:
                raise
            await asyncio.sleep(0.1)


async def eventually(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """A connector sink: keeps every batch (with its arrival time) and the latest sample per key."""

    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []
        self.times: list[float] = []
        self.last: dict[str, Sample] = {}

    def __call__(self, samples: list[Sample]) -> None:
        self.batches.append(samples)
        self.times.append(time.monotonic())
        for s in samples:
            self.last[s.key] = s

    def value(self, key: str) -> object:
        s = self.last.get(key)
        return s.value if s is not None and s.good else None


class MqttPacketDrop(BlackHole):
    """A TCP proxy in front of a real MQTT broker that forwards whole MQTT packets and drops the ones ``drop`` picks:
    a broker that never delivers a message, or never answers a SUBSCRIBE, on a connection that otherwise works
    (PINGRESPs, PUBACKs). ``drop(to_client, packet_type, packet)`` sees each packet (fixed header included);
    ``dropped`` lists what it dropped as (to_client, packet_type, topic or None)."""

    PUBLISH, SUBACK = 3, 9

    def __init__(self, upstream_port: int, drop: Any, delay: Any = None) -> None:
        super().__init__(upstream_port)
        self.drop = drop
        self.delay = delay  # delay(to_client, packet_type, packet): seconds to hold a packet before forwarding it
        self.dropped: list[tuple[bool, int, str | None]] = []

    async def start(self) -> MqttPacketDrop:  # type: ignore[override]
        await super().start()
        return self

    @staticmethod
    def publish_topic(packet: bytes) -> str:
        """The topic of a PUBLISH packet."""
        i = 1
        while packet[i] & 0x80:  # the remaining length: 1 to 4 bytes
            i += 1
        n = int.from_bytes(packet[i + 1:i + 3], "big")
        return packet[i + 3:i + 3 + n].decode()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_client: bool) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await src.readexactly(1)
                length, shift, raw = 0, 0, b""
                while True:
                    b = await src.readexactly(1)
                    raw += b
                    length |= (b[0] & 0x7F) << shift
                    shift += 7
                    if not b[0] & 0x80:
                        break
                packet = head + raw + await src.readexactly(length)
                kind = head[0] >> 4
                if self.drop(to_client, kind, packet):
                    self.dropped.append((to_client, kind, self.publish_topic(packet) if kind == self.PUBLISH
                                         else None))
                    continue
                if self.delay is not None and (wait := self.delay(to_client, kind, packet)):
                    await asyncio.sleep(wait)
                dst.write(packet)
                await dst.drain()
        dst.close()
