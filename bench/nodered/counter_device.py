"""The device of the Node-RED peer benchmark (bench/peer_nodered.py), run in its own process.

    python bench/nodered/counter_device.py --registers 10000 --port 5020

One Modbus TCP unit (id 1) serving N holding registers; register a holds ``(a + t) & 0xFFFF`` where t counts 100 ms
ticks since start, so every register advances by one every 100 ms (10 per second). Values are computed when a
block is read (nothing runs between reads), so the device costs the same whoever polls it.

Counts what it serves: on SIGUSR1 it prints ``STATS <requests> <registers> <monotonic>`` on stdout; the benchmark
takes the registers served in a window as the tags polled, the same count for Node-RED and the gateway.
Prints ``READY <port>`` when serving; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

TICK_S = 0.1


async def serve(registers: int, port: int) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    t0 = time.monotonic()
    served = [0, 0]  # requests, registers

    async def action(fc: int, start: int, address: int, count: int, regs: list[int], values: object) -> None:
        t = int((time.monotonic() - t0) / TICK_S)
        off = address - start
        regs[off:off + count] = [(a + t) & 0xFFFF for a in range(address, address + count)]
        served[0] += 1
        served[1] += count
        return None

    def stats() -> None:
        print(f"STATS {served[0]} {served[1]} {time.monotonic():.6f}", flush=True)

    device = SimDevice(id=1, simdata=[SimData(address=0, count=registers, values=0, datatype=DataType.REGISTERS,
                                              readonly=True)], action=action)
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, stats)
    print(f"READY {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--registers", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def run() -> None:
        task = asyncio.create_task(serve(args.registers, args.port))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
