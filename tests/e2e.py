"""Building blocks of end-to-end tests: real simulators, a real mosquitto, the ERP consumer and the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, parse_config
from gateway.runtime import Gateway
from simulators.machine import MachineModel

IDENT = {"id": "gw-test", "enterprise": "acme", "site": "p1", "area": "a1", "line": "l1"}


def gateway_config(*, broker_port: int, store_path: str, opc: Any = None, modbus: Any = None,
                   interval_s: float = 0.5, max_units: int | None = None, max_rate: float = 200,
                   keepalive_s: int = 2) -> GatewayConfig:
    """press-1 on the OPC UA simulator, press-2 on the Modbus simulator (either may be omitted)."""
    connectors: list[dict[str, Any]] = []
    machines: list[dict[str, Any]] = []
    reporting = {"interval_s": interval_s, **({"max_units": max_units} if max_units else {})}
    if opc is not None:
        connectors.append({"type": "opcua", "id": "opc", "endpoint": opc.endpoint, "watchdog_interval_s": 0.5,
                           "timeout_s": 2, "security": "none"})
        machines.append({"id": "press-1", "counters": {
            "good": {"connector": "opc", "node_id": opc.node_ids["good"], "bits": opc.model.counter_bits, "max_rate": max_rate},
            "scrap": {"connector": "opc", "node_id": opc.node_ids["scrap"], "bits": opc.model.counter_bits, "max_rate": max_rate},
        }, "state": {"connector": "opc", "node_id": opc.node_ids["state"]}, "reporting": reporting})
    if modbus is not None:
        tags = modbus.tag_addresses()
        connectors.append({"type": "modbus", "id": "mb", "host": "127.0.0.1", "port": modbus.port, "unit_id": 1,
                           "poll_interval_s": 0.05, "timeout_s": 1})
        machines.append({"id": "press-2", "counters": {
            "good": {"connector": "mb", **tags["good"], "max_rate": max_rate},
            "scrap": {"connector": "mb", **tags["scrap"], "max_rate": max_rate},
        }, "state": {"connector": "mb", **tags["state"], "values": {"0": "idle", "1": "running", "2": "stopped"}},
            "reporting": reporting})
    doc = {
        "gateway": IDENT,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "keepalive_s": keepalive_s},
        "store": {"path": store_path},
        "connectors": connectors,
        "machines": machines,
    }
    return parse_config(doc, "<test>")


class RunningGateway:
    """A gateway in a task of the test's event loop: start / stop (clean) / restart."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.gw: Gateway | None = None
        self.task: asyncio.Task[None] | None = None
        self.generations = 0

    async def start(self) -> Gateway:
        self.gw = Gateway(self.cfg)
        self.task = asyncio.create_task(self.gw.run(), name="gateway")
        self.generations += 1
        await wait_until(lambda: self.gw is not None and self.gw.started.is_set() or self.task.done(), 15)
        if self.task.done():
            self.task.result()
        return self.gw

    async def stop(self) -> None:
        if self.task is None:
            return
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, timeout=15)
        self.task = None

    async def wait_subscribed(self, timeout: float = 10) -> None:
        """The gateway's subscriptions (dispatch, acks) are acknowledged by the broker: a non-retained message the
        ERP publishes from now on reaches it."""
        await wait_until(lambda: self.gw is not None and (c := self.gw.link.connection) is not None and not c.sub_mids,
                         timeout, message="the gateway's subscriptions were not acknowledged")

    async def wait_counters_read(self, machine: str, timeout: float = 15) -> None:
        """Every counter of ``machine`` has its first good reading (its baseline): parts made from now on are counted.
        Parts made before it are part of the baseline, as on any gateway's first start."""
        await wait_until(lambda: (e := self.gw.engines.get(machine)) is not None
                         and all(c.last is not None for c in e.counters.values()), timeout,
                         message=f"{machine}: its counters were not read")

    async def wait_dispatch_applied(self, machine: str, order: str, op: str, timeout: float = 15) -> None:
        await wait_until(lambda: (e := self.gw.engines.get(machine)) is not None and e.context is not None
                         and e.context.ref == (order, op), timeout)


async def wait_until(pred: Any, timeout: float = 20.0, interval: float = 0.05, message: str = "") -> None:
    """Wait until ``pred()`` is true (``pred`` may return an awaitable: it is awaited), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def expected_ledger(machine: str, model: MachineModel) -> dict[tuple[str, str | None, str | None], dict[str, Decimal]]:
    out = {}
    for key, t in model.truth.items():
        order, op = key if key else (None, None)
        if t["good"] or t["scrap"]:
            out[(machine, order, op)] = {"yield": Decimal(t["good"]), "scrap": Decimal(t["scrap"])}
    return out


def ledger_view(erp: Any, machines: set[str]) -> dict[tuple[str, str | None, str | None], dict[str, Decimal]]:
    out = {}
    for key, v in erp.ledger().items():
        if key[0] in machines and (v["yield"] or v["scrap"]):
            out[key] = {"yield": v["yield"], "scrap": v["scrap"]}
    return out


async def wait_idle_at_the_erp(erp: Any, machines: Any, timeout: float = 30) -> None:
    """Wait until the last ``machine.state_changed`` the ERP has for each of ``machines`` says "idle". A model's
    ``pause()`` is a state change: the gateway commits its event a poll later, possibly after the ledger already
    matched the truth, so an outbox seen empty before that is not yet the end of the stream (seen on CI: one row
    left after the outbox had been empty)."""
    wanted = set(machines)

    def idle() -> bool:
        last: dict[str, str] = {}
        for e in erp.events("machine.state_changed"):
            last[e["data"]["machine"]] = e["data"]["state"]
        return all(last.get(m) == "idle" for m in wanted)

    await wait_until(idle, timeout, message=f"the idle state of {sorted(wanted)} did not reach the ERP")


async def assert_ledger_matches(erp: Any, models: dict[str, MachineModel], timeout: float = 30) -> None:
    """Ledger == the machines' ground truth, per machine and order (waits up to ``timeout``); then: no conflict (a
    second version of an event: same id or same seq, other content) and every event valid. Every end-to-end test
    goes through here, so none can forget the conflict check."""
    expected: dict[Any, Any] = {}
    for machine, model in models.items():
        expected.update(expected_ledger(machine, model))
    try:  # a conflict ends the wait at once: the ledger may never match, and the conflict is the precise message
        await wait_until(lambda: erp.conflicts() or ledger_view(erp, set(models)) == expected, timeout)
    except AssertionError:
        assert_no_conflicts(erp)
        raise AssertionError(f"ERP ledger != ground truth\n ledger: {ledger_view(erp, set(models))}\n truth:  {expected}") from None
    assert_no_conflicts(erp)
    assert_events_valid(erp)


def assert_no_conflicts(erp: Any) -> None:
    """The ERP consumer recorded no conflict: no event id arrived twice with different content, no seq of one
    (source, epoch) arrived under two ids (``ErpConsumer.conflicts()``, which survives a consumer restart)."""
    conflicts = erp.conflicts()
    assert not conflicts, f"{len(conflicts)} conflict(s) at the ERP (two versions of one event), first: {conflicts[:3]}"


def assert_events_valid(erp: Any) -> None:
    """Every event the ERP received validates against its generated JSON Schema and the CloudEvents SDK."""
    from gateway.schema import validate_event

    for ev in erp.events():
        validate_event(ev)


def workdir(tmp_path: Path, name: str) -> str:
    p = tmp_path / name
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


# --- scenario helpers (tests/test_scenarios.py) ----------------------------------------------------------------------

HIERARCHY = (IDENT["enterprise"], IDENT["site"], IDENT["area"], IDENT["line"])


async def dispatch_order(erp: Any, rgw: RunningGateway, machine: str, model: MachineModel | None, order: str, op: str,
                         *, components: list[dict[str, Any]] | None = None, timeout: float = 15) -> None:
    """ERP dispatch (published off the event loop, so the machines keep their rate), wait until the gateway applied
    it (its cut is done), then switch the simulated machine's order (``model=None``: leave the machine alone)."""
    await asyncio.to_thread(erp.dispatch, *HIERARCHY, machine, order, op, components=components)
    await rgw.wait_dispatch_applied(machine, order, op, timeout)
    if model is not None:
        model.set_order(order, op)


class Production:
    """A background ``run_forever()`` loop per machine: ``start()`` / ``pause()`` the models, the loops keep going."""

    def __init__(self, *models: MachineModel) -> None:
        self.models = models
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> "Production":
        self.tasks = [asyncio.create_task(m.run_forever(), name=f"production-{m.name}") for m in self.models]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for m in self.models:
            m.pause()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def stream_report(erp: Any) -> dict[str, Any]:
    """What the ERP consumer saw of the event stream: seq gaps (must be none), duplicates dropped, conflicts (must be
    none), rejects."""
    return {"gaps": erp.gaps(), "duplicates": erp.stats["duplicates"], "rejected": erp.stats["rejected"],
            "accepted": erp.stats["accepted"], "conflicts": len(erp.conflicts())}


def consumed_by_component(erp: Any, machine: str, order: str, op: str) -> dict[str, Decimal]:
    """Sum of the backflushed ``material.consumed`` quantities the ERP booked, per component material."""
    out: dict[str, Decimal] = {}
    for ev in erp.events("material.consumed"):
        d = ev["data"]
        if (d["machine"], d["order"], d["operation"]) != (machine, order, op):
            continue
        for c in d["components"]:
            out[c["material"]] = out.get(c["material"], Decimal(0)) + Decimal(c["quantity"])
    return out


def rollovers_reported(erp: Any, machine: str) -> dict[str, int]:
    """Rollovers the gateway documented in the evidence of its quantity reports, per counter."""
    out: dict[str, int] = {}
    for ev in erp.events("operation.quantity_reported"):
        if ev["data"]["machine"] != machine:
            continue
        for e in ev["data"]["evidence"]:
            out[e["counter"]] = out.get(e["counter"], 0) + e["rollovers"]
    return out
