"""``edge-gateway demo``: everything in one process, no external service.

An embedded MQTT broker (mosquitto when it is on PATH, else the pure-Python amqtt), one simulated OPC UA press and
one simulated Modbus press (16-bit counters, so a rollover happens during the demo), the gateway, and the ERP-side
consumer. Orders are dispatched over MQTT; halfway through, press-1 changes over to a new order. The terminal shows
what each machine made (simulator ground truth) next to what the ERP ledger holds.

With ``--outage S`` the broker is stopped for S seconds early in the run (mosquitto only: it saves the ERP's session
on a clean stop): the machines keep producing, the gateway keeps counting into its outbox (the live table shows the
events buffered in the gateway), and when the broker is back the backlog is delivered; the final comparison is
still exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.config import GatewayConfig, parse_config
from gateway.runtime import Gateway

IDENT = {"id": "demo-gw", "enterprise": "acme", "site": "plant-1", "area": "assembly", "line": "line-1"}


def _events(n: float) -> str:
    """The count with its noun: 1 event, 3 events."""
    return f"{int(n)} event" + ("" if int(n) == 1 else "s")


def demo_config(*, broker_port: int, opc_endpoint: str, opc_nodes: dict[str, str], modbus_port: int,
                modbus_tags: dict[str, dict[str, Any]], store_path: str, interval_s: float = 1.0,
                protocol: str = "5") -> GatewayConfig:
    doc = {
        "gateway": IDENT,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": 5, "protocol": protocol},
        "store": {"path": store_path},
        "connectors": [
            {"type": "opcua", "id": "press1-opc", "endpoint": opc_endpoint, "security": "none"},
            {"type": "modbus", "id": "press2-mb", "host": "127.0.0.1", "port": modbus_port, "unit_id": 1,
             "poll_interval_s": 0.1},
        ],
        "machines": [
            {"id": "press-1", "name": "Press 1 (OPC UA)",
             "counters": {"good": {"connector": "press1-opc", "node_id": opc_nodes["good"], "max_rate": 50},
                          "scrap": {"connector": "press1-opc", "node_id": opc_nodes["scrap"], "max_rate": 50}},
             "state": {"connector": "press1-opc", "node_id": opc_nodes["state"]},
             "reporting": {"interval_s": interval_s}},
            {"id": "press-2", "name": "Press 2 (Modbus)",
             "counters": {"good": {"connector": "press2-mb", **modbus_tags["good"], "max_rate": 50},
                          "scrap": {"connector": "press2-mb", **modbus_tags["scrap"], "max_rate": 50}},
             "state": {"connector": "press2-mb", **modbus_tags["state"],
                       "values": {"0": "idle", "1": "running", "2": "stopped"}},
             "reporting": {"interval_s": interval_s, "max_units": 50}},
        ],
    }
    return parse_config(doc, "<demo>")


class Demo:
    def __init__(self, workdir: Path, seed: int, outage: float | None = None) -> None:
        self.workdir = workdir
        self.seed = seed
        self.outage = outage
        self.broker_down = False
        self.outage_report: dict[str, float] = {}
        self.orders: dict[str, list[tuple[str, str]]] = {"press-1": [], "press-2": []}
        self.header: list[str] = []

    async def run(self, duration: float | None) -> int:
        from simulators.broker import EmbeddedBroker
        from simulators.erp import ErpConsumer
        from simulators.machine import MachineModel
        from simulators.modbus_server import ModbusMachineServer
        from simulators.opcua_server import OpcUaMachineServer
        from simulators.ports import free_port

        async with contextlib.AsyncExitStack() as stack:
            broker = EmbeddedBroker(workdir=self.workdir, persistence=bool(self.outage))
            if self.outage and not broker.can_restart:
                print("--outage needs mosquitto (the broker is stopped and started again with the ERP's session "
                      "saved): install it, e.g. `apt-get install mosquitto`", file=sys.stderr)
                return 2
            self.broker = broker
            await broker.start()
            stack.push_async_callback(broker.stop)
            self._say(f"broker      {broker.kind} on 127.0.0.1:{broker.port}")

            self.m1 = MachineModel("Press1", cycle_time=0.2, scrap_rate=0.06, seed=self.seed, counter_bits=32)
            self.m2 = MachineModel("Press2", cycle_time=0.12, scrap_rate=0.04, seed=self.seed + 1, counter_bits=16,
                                   start_good=65_500, start_scrap=120)
            opc = OpcUaMachineServer(self.m1, host="127.0.0.1", port=free_port())
            mb = ModbusMachineServer(self.m2, host="127.0.0.1", port=free_port(), unit_id=1)
            await stack.enter_async_context(opc)
            await stack.enter_async_context(mb)
            self._say(f"press-1     OPC UA  {opc.endpoint}  (32-bit counters)")
            self._say(f"press-2     Modbus  127.0.0.1:{mb.port}  (16-bit counters starting at 65500: watch the rollover)")

            # with an outage the ERP keeps a persistent session (fixed client id), as a production consumer must
            erp = ErpConsumer("127.0.0.1", broker.port, db_path=str(self.workdir / "erp.db"),
                              client_id="demo-erp" if self.outage else None)
            await stack.enter_async_context(erp)
            self.erp = erp

            cfg = demo_config(broker_port=broker.port, opc_endpoint=opc.endpoint, opc_nodes=opc.node_ids,
                              modbus_port=mb.port, modbus_tags=mb.tag_addresses(),
                              store_path=str(self.workdir / "gateway.db"),
                              protocol="5" if broker.kind == "mosquitto" else "3.1.1")
            self.gw = Gateway(cfg)
            gw_task = asyncio.create_task(self.gw.run(), name="gateway")
            stack.push_async_callback(self._stop_task, gw_task)
            producers = [asyncio.create_task(self.m1.run_forever()), asyncio.create_task(self.m2.run_forever())]
            for p in producers:
                stack.push_async_callback(self._stop_task, p)

            await self._dispatch("press-1", self.m1, "1000001", "0010")
            await self._dispatch("press-2", self.m2, "1000002", "0010")
            self.m1.start()
            self.m2.start()

            stop = asyncio.Event()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            t0 = time.monotonic()
            changed = False
            next_render = 0.0
            outage_at = (duration * 0.2 if duration is not None else 10.0) if self.outage else None
            try:
                while (duration is None or time.monotonic() - t0 < duration) and not stop.is_set():
                    if outage_at is not None:
                        await self._outage_step(time.monotonic() - t0, outage_at)
                    if not changed and duration is not None and time.monotonic() - t0 >= duration / 2 \
                            and not self.broker_down:
                        changed = True
                        self._say("--> changeover: press-1 switches to order 1000003 / 0010")
                        self.m1.pause()
                        await erp.wait_connected(30)  # after an outage the ERP may still be reconnecting
                        await self._dispatch("press-1", self.m1, "1000003", "0010")
                        self.m1.start()
                    if time.monotonic() >= next_render:
                        self.render(final=False)
                        next_render = time.monotonic() + 1.0
                    await asyncio.sleep(0.1)
            except (KeyboardInterrupt, asyncio.CancelledError):
                pass
            if self.broker_down:  # stopped during the outage: bring the broker back so the backlog is delivered
                await self._outage_step(float("inf"), 0.0)
            self.m1.pause()
            self.m2.pause()
            print("\nmachines stopped; waiting for the ERP ledger to settle ...")
            ok = await self._settle(timeout=30)
            self.render(final=True)
            st = self.gw.status()
            print(f"\nevents committed {st['stats']['events_committed']}, acked {st['acked']}, "
                  f"outbox pending {st['outbox_pending']}, ERP duplicates dropped {erp.stats['duplicates']}")
            if self.outage_report:
                r = self.outage_report
                delivered = (f"all delivered {r['drained_s']:.1f} s after the broker came back" if "drained_s" in r
                             else "not all delivered yet")
                print(f"broker outage {r['lasted_s']:.1f} s: up to {_events(r['peak_buffered'])} buffered in the "
                      f"gateway, {delivered}")
            print("RESULT: ledger == truth for both machines" if ok else "RESULT: MISMATCH between ledger and truth")
            return 0 if ok else 1

    async def _outage_step(self, elapsed: float, outage_at: float) -> None:
        """--outage: stop the broker at ``outage_at`` for ``self.outage`` seconds, then track the backlog's delivery."""
        r = self.outage_report
        pending = self.gw.store.pending
        if not r and elapsed >= outage_at:
            self._say(f"--> broker stopped for {self.outage:g} s: the machines keep producing, the gateway buffers "
                      "their events in its outbox")
            await self.broker.outage_begin()
            self.broker_down = True
            r.update(down_at=time.monotonic(), peak_buffered=pending)
        elif self.broker_down:
            r["peak_buffered"] = max(r["peak_buffered"], pending)
            if time.monotonic() - r["down_at"] >= self.outage:  # type: ignore[operator]
                await self.broker.outage_end()
                self.broker_down = False
                r.update(up_at=time.monotonic(), lasted_s=time.monotonic() - r["down_at"])
                self._say(f"--> broker back after {r['lasted_s']:.1f} s: {_events(pending)} buffered in the gateway, "
                          "delivering them")
        elif "up_at" in r and "drained_s" not in r and pending == 0:
            r["drained_s"] = time.monotonic() - r["up_at"]
            self._say(f"--> backlog delivered {r['drained_s']:.1f} s after the broker came back "
                      f"(peak {_events(r['peak_buffered'])} buffered)")

    def _say(self, line: str) -> None:
        self.header.append(line)
        print(line, flush=True)

    async def _stop_task(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        await asyncio.wait({task}, timeout=10)  # bounded, also for a task that ignores its cancellation
        if task.done() and not task.cancelled():
            task.exception()  # retrieved (the demo's result says what went wrong)

    async def _dispatch(self, machine: str, model: Any, order: str, op: str) -> None:
        # the consumer blocks until PUBACK: off the loop, so an in-process broker (amqtt) can answer
        await asyncio.to_thread(self.erp.dispatch, IDENT["enterprise"], IDENT["site"], IDENT["area"], IDENT["line"],
                                machine, order, op)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            eng = self.gw.engines.get(machine)
            if eng is not None and eng.context is not None and eng.context.ref == (order, op):
                model.set_order(order, op)
                self.orders[machine].append((order, op))
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the gateway did not apply the dispatch of {order}/{op} to {machine}")

    def comparison(self) -> list[tuple[str, str, str, int, int, Decimal, Decimal]]:
        ledger = self.erp.ledger()
        rows = []
        for machine, model in (("press-1", self.m1), ("press-2", self.m2)):
            for key, truth in sorted(model.truth.items(), key=lambda kv: str(kv[0])):
                order, op = key if key else (None, None)
                led = ledger.get((machine, order, op), {})
                rows.append((machine, order or "-", op or "-", truth["good"], truth["scrap"],
                             led.get("yield", Decimal(0)), led.get("scrap", Decimal(0))))
            # ledger entries the machine never produced for are mismatches too
            for (m, order, op), led in ledger.items():
                if m == machine and ((order, op) if order else None) not in model.truth:
                    rows.append((machine, order or "-", op or "-", 0, 0, led["yield"], led["scrap"]))
        return rows

    def matches(self) -> bool:
        return all(Decimal(g) == y and Decimal(s) == sc for _, _, _, g, s, y, sc in self.comparison())

    async def _settle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.matches() and self.gw.store.pending == 0:
                return True
            await asyncio.sleep(0.25)
        return self.matches()

    def render(self, *, final: bool) -> None:
        rows = self.comparison()
        head = f"{'machine':<9} {'order':<9} {'op':<5} {'made good':>10} {'made scrap':>10} {'ERP yield':>10} {'ERP scrap':>10}  "
        st = self.gw.status()
        link = "DOWN (outage)" if self.broker_down else st["components"]["mqtt"]["state"]
        gw_line = (f"broker {link}; buffered in the gateway: {_events(st['outbox_pending'])}; "
                   f"delivered to the broker (PUBACKed): {st['acked']}")
        lines = ["", time.strftime("%H:%M:%S") + ("  FINAL" if final else ""), gw_line, head, "-" * len(head)]
        for machine, order, op, g, s, y, sc in rows:
            same = Decimal(g) == y and Decimal(s) == sc
            mark = "ok" if same else ("MISMATCH" if final else "in transit")
            lines.append(f"{machine:<9} {order:<9} {op:<5} {g:>10} {s:>10} {y!s:>10} {sc!s:>10}  {mark}")
        if sys.stdout.isatty() and not final:
            print("\x1b[H\x1b[J" + "\n".join(self.header + lines), flush=True)  # redraw in place
        else:
            print("\n".join(lines), flush=True)


def run_demo(*, duration: float | None, workdir: str | None, seed: int, outage: float | None = None) -> int:
    if outage is not None and (outage <= 0 or (duration is not None and duration < outage + 8)):
        print(f"--outage {outage:g}: give a positive number of seconds"
              + (f", and a --duration of at least {outage + 8:g} s (the outage starts at 20 % of the run)"
                 if duration is not None else ""), file=sys.stderr)
        return 2
    logs.configure("console", os.environ.get("EDGE_GATEWAY_LOG_LEVEL", "warning"))
    with contextlib.ExitStack() as stack:
        if workdir:
            wd = Path(workdir)
            wd.mkdir(parents=True, exist_ok=True)
        else:
            wd = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-gateway-demo-")))
        print(f"edge-gateway demo (files in {wd}); Ctrl-C to stop" + (f"; runs {duration:g} s" if duration else ""))
        try:
            return asyncio.run(Demo(wd, seed, outage).run(duration))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
