"""A bench-only device with thousands of changing tags, run in its own process by bench/tags.py and bench/memory.py.

    python bench/tag_server.py modbus --machines 2500 --port 5020
    python bench/tag_server.py opcua  --machines 600  --port 4840

Each machine i has four tags: good, scrap and rework counters and a state. The counters of machine i change at
``1 + i % 10`` Hz (1-10 Hz), all three on each tick of that machine; the state alternates running / stopped once per
second (``--state-hz``) at a per-machine phase.

- Modbus: one unit, holding registers, machine i at addresses 4i..4i+3 (good, scrap, rework uint16; state uint16
  1 running / 2 stopped). Registers are served from an image updated in place.
- OPC UA: variables ``ns=2;s=m{i}.good`` (UInt32), ``.scrap``, ``.rework``, ``.state`` (String), each write with
  the time of the change as SourceTimestamp (same host clock as the gateway: the latency reference).

Prints ``READY <port>`` on stdout when serving; runs until SIGTERM.

bench/tags.py runs the OPC UA device by default on node-opcua instead (bench/opcua_device/server.mjs: the same
address space, schedule and READY line, at a sixth of this one's CPU); ``--opcua-device asyncua`` runs this one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from datetime import datetime, timezone

TICK_S = 0.01


class Schedule:
    """Which machines are due: counters at 1 + i % 10 Hz, state at ``state_hz`` with a per-machine phase."""

    def __init__(self, machines: int, state_hz: float) -> None:
        now = time.monotonic()
        self.period = [1.0 / (1 + i % 10) for i in range(machines)]
        self.next_count = [now + (i % 97) / 97 * self.period[i] for i in range(machines)]
        self.state_period = 1.0 / state_hz if state_hz > 0 else 0.0
        self.next_state = [now + (i % 89) / 89 * (self.state_period or 1) for i in range(machines)]

    def due(self, now: float) -> tuple[list[int], list[int]]:
        counts, states = [], []
        nc, ns, per = self.next_count, self.next_state, self.period
        for i in range(len(nc)):
            if nc[i] <= now:
                counts.append(i)
                nc[i] += per[i]
                if nc[i] <= now:  # fell behind: no bursts
                    nc[i] = now + per[i]
            if self.state_period and ns[i] <= now:
                states.append(i)
                ns[i] += self.state_period
                if ns[i] <= now:
                    ns[i] = now + self.state_period
        return counts, states


async def serve_modbus(machines: int, port: int, state_hz: float) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    n = 4 * machines
    img = [0] * n
    for i in range(machines):
        img[4 * i + 3] = 1

    async def action(fc: int, start: int, address: int, count: int, regs: list[int], values: object) -> None:
        off = address - start
        regs[off:off + count] = img[address:address + count]
        return None

    device = SimDevice(id=1, simdata=[SimData(address=0, count=n, values=0, datatype=DataType.REGISTERS,
                                              readonly=True)], action=action)
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print(f"READY {port}", flush=True)
    sched = Schedule(machines, state_hz)
    try:
        while True:
            await asyncio.sleep(TICK_S)
            counts, states = sched.due(time.monotonic())
            for i in counts:
                b = 4 * i
                img[b] = (img[b] + 1) & 0xFFFF
                img[b + 1] = (img[b + 1] + 1) & 0xFFFF
                img[b + 2] = (img[b + 2] + 1) & 0xFFFF
            for i in states:
                img[4 * i + 3] = 3 - img[4 * i + 3]
    finally:
        await server.shutdown()


async def serve_opcua(machines: int, port: int, state_hz: float) -> None:
    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:edge-gateway:bench")
    objects = server.nodes.objects
    ids: list[list[ua.NodeId]] = []
    for i in range(machines):
        obj = await objects.add_object(ua.NodeId(f"m{i}", ns), ua.QualifiedName(f"m{i}", ns))
        row = []
        for sig in ("good", "scrap", "rework"):
            v = await obj.add_variable(ua.NodeId(f"m{i}.{sig}", ns), ua.QualifiedName(sig, ns),
                                       ua.Variant(0, ua.VariantType.UInt32), varianttype=ua.VariantType.UInt32)
            row.append(v.nodeid)
        v = await obj.add_variable(ua.NodeId(f"m{i}.state", ns), ua.QualifiedName("state", ns),
                                   ua.Variant("running", ua.VariantType.String), varianttype=ua.VariantType.String)
        row.append(v.nodeid)
        ids.append(row)
    await server.start()
    print(f"READY {port} ns={ns}", flush=True)
    counters = [0] * machines
    state = ["running"] * machines
    sched = Schedule(machines, state_hz)
    write = server.write_attribute_value
    try:
        while True:
            await asyncio.sleep(TICK_S)
            counts, states = sched.due(time.monotonic())
            ts = datetime.now(timezone.utc)
            for i in counts:
                counters[i] += 1
                dv = ua.DataValue(ua.Variant(counters[i], ua.VariantType.UInt32), SourceTimestamp=ts,
                                  ServerTimestamp=ts)
                row = ids[i]
                await write(row[0], dv)
                await write(row[1], dv)
                await write(row[2], dv)
            for i in states:
                state[i] = "stopped" if state[i] == "running" else "running"
                await write(ids[i][3], ua.DataValue(ua.Variant(state[i], ua.VariantType.String), SourceTimestamp=ts,
                                                    ServerTimestamp=ts))
    finally:
        await server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("protocol", choices=("modbus", "opcua"))
    p.add_argument("--machines", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state-hz", type=float, default=1.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    fn = serve_modbus if args.protocol == "modbus" else serve_opcua

    async def run() -> None:
        task = asyncio.create_task(fn(args.machines, args.port, args.state_hz))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())


if __name__ == "__main__":
    main()
