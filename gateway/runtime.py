"""The gateway runtime: connectors → machine engines → store (outbox) → MQTT publisher.

One asyncio task group holds named long-lived tasks: one per connector, the MQTT link, the publisher and the core
loop. The core loop is the only writer of machine state: it drains the input queue (sample batches, dispatches,
ticks), runs the pure engines, and group-commits snapshots + events in one transaction, then wakes the publisher.
``stop()`` is bounded: a stuck peer cannot hang shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog

from connectors import REGISTRY
from connectors.base import ComponentState, Connector, TagBinding
from connectors.errors import ConnectorError, ConnectorUnavailable
from gateway import metrics
from gateway.config import GatewayConfig, counter_modulus
from gateway.dispatch import DispatchRejected, parse_dispatch
from gateway.events import EventEncoder, Topics
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store, StoreError
from mappings.counters import CounterSpec
from mappings.machine import CounterBinding, EventDraft, MachineEngine, MachineSpec, MaterialMeter, OrderContext
from mappings.samples import Sample

log = structlog.get_logger(__name__)

TICK_S = 0.25
CHECKPOINT_S = 1.0
CUT_READ_TIMEOUT_S = 3.0
CUT_RETRY_S = 0.05  # a cut read of a connector that is not connected yet is retried this often


def machine_specs(cfg: GatewayConfig) -> list[MachineSpec]:
    specs = []
    for m in cfg.machines:
        counters = {}
        for name, b in m.counters.items():
            modulus, signed = counter_modulus(b, cfg.tag_address(m.id, name))
            counters[name] = CounterBinding(
                CounterSpec(name=name, mode=b.mode, modulus=modulus, signed=signed, max_rate=b.max_rate), b.scale
            )
        materials = {}
        for name, b in m.materials.items():
            modulus, signed = counter_modulus(b, cfg.tag_address(m.id, f"material:{name}"))
            materials[name] = MaterialMeter(CounterBinding(
                CounterSpec(name=f"material:{name}", mode=b.mode, modulus=modulus, signed=signed, max_rate=b.max_rate),
                b.scale), b.unit)
        specs.append(MachineSpec(
            id=m.id, counters=counters, unit=m.unit, materials=materials,
            state_values=None if m.state is None else dict(m.state.values),
            interval_s=m.reporting.interval_s, max_units=m.reporting.max_units,
        ))
    return specs


async def run_until_really_cancelled(fn: Any, name: str) -> Any:
    """Run ``fn()`` in its own task; when cancelled, cancel that task again until it has really ended.

    On Python 3.11 ``asyncio.wait_for`` returns the result instead of raising CancelledError when the awaited
    operation completes in the same loop iteration as the cancellation (CPython gh-86296, fixed in 3.12). A loop
    built on it — the Modbus connector polls with ``wait_for`` many times a second, and pymodbus uses it inside —
    then swallows the one cancel a TaskGroup sends when it shuts down, and runs on: the gateway never stopped.
    """
    task = asyncio.create_task(fn(), name=f"{name}.run")
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if not task.cancelled():
            task.exception()  # retrieved: an error while stopping is not what ends this task
        raise
    return task.result()


@dataclass
class _Dispatch:
    machine: str
    context: OrderContext | None
    source: str = "mqtt"


@dataclass
class _OrderTagChanged:
    machine: str


@dataclass
class _CompleteTag:
    machine: str


@dataclass
class _ErpRejection:
    event: dict[str, Any]
    reason: str


@dataclass
class Stats:
    samples: int = 0
    events_committed: int = 0
    commits: int = 0
    dispatch_accepted: int = 0
    dispatch_rejected: int = 0
    dispatch_rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cut_read_failures: int = 0
    commit_failures: int = 0
    dropped_while_full: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    erp_rejections: int = 0
    acks_malformed: int = 0


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, password: str | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root, cfg.gateway)
        self.store = Store(cfg.store.path, synchronous=cfg.store.synchronous,
                           max_bytes=int(cfg.store.max_size_mb * 1024 * 1024))
        self.specs = {s.id: s for s in machine_specs(cfg)}
        self.engines: dict[str, MachineEngine] = {}
        self.stats = Stats()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._routes: dict[str, tuple[str, str]] = {}  # tag key -> (machine, signal)
        self._machine_connectors: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self._order_source = {m.id: m.order_source for m in cfg.machines}
        self._order_tag_values: dict[str, dict[str, Any]] = defaultdict(dict)
        self._order_tag_pending: set[str] = set()
        self._complete_level: dict[str, bool] = {}
        self.connectors: dict[str, Connector] = {}
        status_topic = self.topics.status()
        self.link = MqttLink(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or cfg.gateway.id,
            password=password,
            will=(status_topic, self._status_payload("offline")),
            online=(status_topic, self._status_payload("online")),
            subscriptions=[self.topics.dispatch_filter(), self.topics.acks_filter()],
            on_message=self._on_message,
        )
        self.publisher = Publisher(self.store, self.link, window=cfg.mqtt.max_inflight,
                                   backlog_rate=cfg.mqtt.backlog_rate, max_message_bytes=cfg.mqtt.max_message_bytes,
                                   batch_max=cfg.mqtt.batch_max_events)
        self.encoder: EventEncoder | None = None
        self._next_seq = 1
        self._uncommitted: list[OutboxRow] = []
        self._last_checkpoint = 0.0
        self.started = asyncio.Event()
        self.crashes: dict[str, int] = {}
        self._stopping = False
        self._build_connectors()

    # ------------------------------------------------------------------ wiring
    def _build_connectors(self) -> None:
        bindings: dict[str, list[TagBinding]] = defaultdict(list)
        for m in self.cfg.machines:
            signals: list[tuple[str, Any]] = list(m.counters.items())
            signals += [(f"material:{name}", b) for name, b in m.materials.items()]
            for name, tag in (("state", m.state), ("order", m.order_tag), ("operation", m.operation_tag),
                              ("complete", m.complete_tag)):
                if tag is not None:
                    signals.append((name, tag))
            for signal, b in signals:
                key = f"{m.id}/{signal}"
                bindings[b.connector].append(TagBinding(key, self.cfg.tag_address(m.id, signal)))
                self._routes[key] = (m.id, signal)
                if signal not in ("state", "complete"):  # the cut reads counters and order tags together
                    self._machine_connectors[m.id][b.connector].append(key)
        for c in self.cfg.connectors:
            cls = REGISTRY[c.type].load()
            self.connectors[c.id] = cls(c, bindings.get(c.id, []), self._on_samples)

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"gateway": self.cfg.gateway.id, "state": state, "time": time.time()}).encode()

    # ------------------------------------------------------------------ callbacks (event loop, non-blocking)
    def _on_samples(self, samples: list[Sample]) -> None:
        self._queue.put_nowait(samples)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic.endswith("/acks"):
            self._on_erp_ack(topic, payload)
            return
        machine = self.topics.machine_of_dispatch(topic)
        try:
            if machine is None:
                raise DispatchRejected("topic", f"not a dispatch topic: {topic}")
            if machine not in self.specs:
                raise DispatchRejected("unknown_machine", f"machine {machine!r} is not configured on this gateway")
            if self._order_source[machine] != "mqtt":
                raise DispatchRejected("order_source", f"machine {machine!r} takes its order from "
                                                       f"{self._order_source[machine]!r}, not from MQTT dispatch")
            ctx = parse_dispatch(payload)
        except DispatchRejected as exc:
            self.stats.dispatch_rejected += 1
            self.stats.dispatch_rejected_by_reason[exc.reason] += 1
            metrics.DISPATCH_REJECTED.labels(exc.reason).inc()
            log.warning("dispatch.rejected", topic=topic, reason=exc.reason, detail=exc.detail[:500],
                        size=len(payload))
            return
        self._queue.put_nowait(_Dispatch(machine, ctx))

    def _on_erp_ack(self, topic: str, payload: bytes) -> None:
        """The ERP rejected an event it received: keep it in the quarantine, visible and retryable."""
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict) or doc.get("status") != "rejected":
                return  # positive acknowledgements carry no action here
            event = doc["event"]
            if not isinstance(event, dict) or not isinstance(event.get("id"), str):
                raise ValueError("'event' must be the rejected CloudEvent")
            reason = str(doc.get("reason", "rejected by the ERP"))[:500]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.stats.acks_malformed += 1
            log.warning("erp_ack.rejected", topic=topic, error=str(exc)[:200])
            return
        self._queue.put_nowait(_ErpRejection(event, reason))

    async def _quarantine_rejection(self, r: "_ErpRejection") -> None:
        ev = r.event
        machine = str(ev.get("subject", ""))
        etype = str(ev.get("type", ""))
        try:
            await self.store.quarantine_external(
                seq=ev.get("seq") if isinstance(ev.get("seq"), int) else None, machine=machine, type=etype,
                topic=self.topics.event(machine, etype), payload=json.dumps(ev).encode(), reason=f"ERP: {r.reason}")
        except StoreError as exc:
            log.error("erp_ack.quarantine_failed", id=ev.get("id"), error=str(exc))
            return
        self.stats.erp_rejections += 1
        log.error("erp_ack.event_rejected", id=ev.get("id"), type=etype, machine=machine, reason=r.reason)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Run until cancelled. Opens the store, restores state, starts every component."""
        await self.store.open()
        try:
            snapshots = await self.store.load_states()
            self.engines = {mid: MachineEngine(spec, snapshots.get(mid)) for mid, spec in self.specs.items()}
            self._next_seq = self.store.next_seq
            self.encoder = EventEncoder(self.cfg.gateway, self.topics, self.store.epoch)
            log.info("gateway.started", gateway=self.cfg.gateway.id, machines=len(self.engines),
                     connectors=len(self.connectors), pending=self.store.pending)
            if self.cfg.http.enabled:
                from gateway.http import HttpApi

                self.http = HttpApi(self.cfg.http, self)
                await self.http.start()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._supervise("mqtt.link", self.link.run), name="mqtt.link"),
                    tg.create_task(self._supervise("publisher", self.publisher.run), name="publisher"),
                    tg.create_task(run_until_really_cancelled(self._core, "core"), name="core"),
                    tg.create_task(self._ticker(), name="ticker"),
                ]
                for cid, conn in self.connectors.items():
                    tasks.append(tg.create_task(self._supervise(f"connector.{cid}", conn.run), name=f"connector.{cid}"))
                self._tasks = tasks
                self.started.set()
        finally:
            await self._shutdown()

    http: Any = None

    async def _shutdown(self) -> None:
        if self.http is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.http.stop(), timeout=5)
        # the task group has cancelled everything; persist what the engines hold
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._commit(force=True), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publisher.flush_acks(), timeout=2)
        await self.store.close()
        log.info("gateway.stopped", gateway=self.cfg.gateway.id)

    async def _supervise(self, name: str, run: Any) -> None:
        """Restart a component whose loop died of an unexpected error (a bug or a library surprise), with backoff;
        the rest of the gateway keeps counting. The core loop is not supervised: its state is the engines'."""
        from connectors.base import Backoff

        backoff = Backoff(0.5, 30.0)
        while True:
            started = time.monotonic()
            try:
                await run_until_really_cancelled(run, name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported and restarted
                self.crashes[name] = self.crashes.get(name, 0) + 1
                log.error("component.crashed", component=name, error=repr(exc)[:500], restarts=self.crashes[name])
                if time.monotonic() - started > 60:
                    backoff.reset()
                await asyncio.sleep(backoff.next())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._queue.put_nowait("tick")

    # ------------------------------------------------------------------ the core loop
    async def _core(self) -> None:
        while True:
            item = await self._queue.get()
            events: list[EventDraft] = []
            items = [item]
            while not self._queue.empty() and len(items) < 10_000:
                items.append(self._queue.get_nowait())
            for it in items:
                if isinstance(it, list):
                    events.extend(self._apply_samples(it))
                elif isinstance(it, _Dispatch):
                    events.extend(await self._apply_dispatch(it))
                elif isinstance(it, _CompleteTag):
                    events.extend(await self._apply_complete_tag(it.machine))
                elif isinstance(it, _OrderTagChanged):
                    events.extend(await self._apply_order_tags(it.machine))
                elif isinstance(it, _ErpRejection):
                    await self._quarantine_rejection(it)
                elif it == "tick":
                    now = time.time()
                    for eng in self.engines.values():
                        events.extend(eng.tick(now))
            self._stage(events)
            await self._commit()

    def _apply_samples(self, samples: list[Sample]) -> list[EventDraft]:
        out: list[EventDraft] = []
        routes = self._routes
        engines = self.engines
        for s in samples:
            route = routes.get(s.key)
            if route is None:
                continue
            machine, signal = route
            if signal == "order" or signal == "operation":
                self._order_tag_sample(machine, signal, s)
                continue
            if signal == "complete":
                self._complete_tag_sample(machine, s)
                continue
            out.extend(engines[machine].apply(s, signal))
        self.stats.samples += len(samples)
        return out

    # ------------------------------------------------------------------ order context from PLC tags
    def _order_tag_sample(self, machine: str, signal: str, s: Sample) -> None:
        if not s.good:
            return  # an unreadable order tag changes nothing
        value = "" if s.value is None else str(s.value).strip()
        vals = self._order_tag_values[machine]
        if vals.get(signal) == value:
            return
        vals[signal] = value
        if machine not in self._order_tag_pending:
            self._order_tag_pending.add(machine)
            self._queue.put_nowait(_OrderTagChanged(machine))

    def _complete_tag_sample(self, machine: str, s: Sample) -> None:
        """Rising edge of the PLC's 'operation complete' flag: complete the active operation. The first value seen
        only sets the level (a flag already up when the gateway starts completes nothing)."""
        if not s.good:
            return
        v = s.value
        up = v.strip().lower() not in ("", "0", "false", "no") if isinstance(v, str) else bool(v)
        prev = self._complete_level.get(machine)
        self._complete_level[machine] = up
        if up and prev is False:
            self._queue.put_nowait(_CompleteTag(machine))

    async def _apply_complete_tag(self, machine: str) -> list[EventDraft]:
        cur = self.engines[machine].context
        if cur is None:
            log.warning("order.complete_without_order", machine=machine)
            return []
        return await self._apply_dispatch(_Dispatch(machine, dataclasses.replace(cur, status="completed"),
                                                    source="complete_tag"))

    async def _apply_order_tags(self, machine: str) -> list[EventDraft]:
        """The PLC's order or operation tag changed: read tags and counters together (the cut), then apply."""
        self._order_tag_pending.discard(machine)
        out = await self._cut(machine)  # also refreshes the tag values from the same read
        vals = self._order_tag_values[machine]
        order, op = vals.get("order", ""), vals.get("operation", "")
        if order and not op:
            return out  # half-written pair: wait for the operation tag
        ctx = OrderContext(order, op) if order else None
        out.extend(self._dispatch_engine(_Dispatch(machine, ctx, source="tag")))
        return out

    def set_local_order(self, machine: str, ctx: OrderContext | None) -> None:
        """The local order command (CLI / HTTP). Raises ValueError for an unknown machine or another order source."""
        if machine not in self.specs:
            raise ValueError(f"unknown machine {machine!r}")
        if self._order_source[machine] != "local":
            raise ValueError(f"machine {machine!r} takes its order from {self._order_source[machine]!r}; "
                             "set order_source: local to use the local command")
        self._queue.put_nowait(_Dispatch(machine, ctx, source="local"))

    def _dispatch_engine(self, d: _Dispatch) -> list[EventDraft]:
        eng = self.engines[d.machine]
        out = eng.dispatch(d.context, time.time())
        if eng.dirty:
            eng.urgent = True  # a local order command is not redelivered like a retained dispatch: persist it now
        log.info("order.applied", machine=d.machine, source=d.source,
                 order=d.context.order if d.context else None,
                 operation=d.context.operation if d.context else None,
                 status=d.context.status if d.context else "cleared")
        return out

    async def _apply_dispatch(self, d: _Dispatch) -> list[EventDraft]:
        eng = self.engines[d.machine]
        cur = eng.context
        changes = (cur is None) != (d.context is None) or (
            cur is not None and d.context is not None and (cur.ref != d.context.ref or d.context.status != cur.status)
        )
        out: list[EventDraft] = []
        if changes:
            out.extend(await self._cut(d.machine))
        out.extend(self._dispatch_engine(d))
        self.stats.dispatch_accepted += 1
        metrics.DISPATCH_ACCEPTED.inc()
        return out

    async def _cut(self, machine: str) -> list[EventDraft]:
        """Read every counter of the machine now, so counts up to the changeover go to the old order.

        A connector that is not available yet is retried until ``CUT_READ_TIMEOUT_S``: typically the retained
        dispatch arrives right after a restart, a few ms before the OPC UA session is up, and a changeover applied
        without the cut would book every part made since the last committed read to the new order."""
        loop = asyncio.get_running_loop()
        out: list[EventDraft] = []
        for cid, keys in self._machine_connectors[machine].items():
            deadline = loop.time() + CUT_READ_TIMEOUT_S
            while True:
                try:
                    samples = await self.connectors[cid].read(keys, timeout=max(0.1, deadline - loop.time()))
                except (ConnectorUnavailable, asyncio.TimeoutError) as exc:
                    if loop.time() + CUT_RETRY_S < deadline:
                        await asyncio.sleep(CUT_RETRY_S)
                        continue
                    failure: Exception = exc
                except ConnectorError as exc:
                    failure = exc
                else:
                    out.extend(self._apply_samples(samples))
                    break
                self.stats.cut_read_failures += 1
                log.warning("changeover.cut_read_failed", machine=machine, connector=cid, error=str(failure))
                break
        return out

    def _update_full(self) -> None:
        full = self.store.full
        if full != self._full:
            self._full = full
            for e in self.engines.values():
                e.hold_reports = full
            if full:
                log.error("store.full", pending_bytes=self.store.pending_bytes, max_bytes=self.store.max_bytes,
                          disk_full=self.store.disk_full,
                          action="quantities accumulate in machine state; state-change events are dropped")
            else:
                log.info("store.space_recovered", pending_bytes=self.store.pending_bytes,
                         dropped=dict(self.stats.dropped_while_full))
            metrics.STORE_FULL.set(1 if full else 0)

    _full = False

    def _stage(self, events: list[EventDraft]) -> None:
        self._update_full()
        if not events:
            return
        assert self.encoder is not None
        if self._full:
            kept = []
            for ev in events:
                if ev.droppable:
                    self.stats.dropped_while_full[ev.type] += 1
                    metrics.DROPPED.labels(ev.type).inc()
                else:
                    kept.append(ev)
            events = kept
        for ev in events:
            seq = self._next_seq
            self._next_seq += 1
            topic, payload = self.encoder.encode(ev, seq)
            self._uncommitted.append(OutboxRow(seq, ev.subject, ev.type, topic, payload))

    async def _commit(self, *, force: bool = False) -> None:
        dirty = [e for e in self.engines.values() if e.dirty]
        now = time.monotonic()
        urgent = any(e.urgent for e in dirty)
        if not self._uncommitted and not (dirty and (force or urgent or now - self._last_checkpoint >= CHECKPOINT_S)):
            return
        rows = self._uncommitted
        # The snapshot of a machine goes with the events derived from it (and urgent state: reset-on-read deltas, an
        # order change). Other machines' counters are their own durable log: their snapshots wait for the checkpoint,
        # so a commit does not serialise every engine of a large gateway.
        checkpoint = force or now - self._last_checkpoint >= CHECKPOINT_S
        with_rows = {r.machine for r in rows}
        committed = [e for e in dirty if checkpoint or e.urgent or e.spec.id in with_rows]
        states = {e.spec.id: e.snapshot() for e in committed}
        try:
            await self.store.commit(states, rows, self._next_seq)
        except StoreError as exc:
            self.stats.commit_failures += 1
            if self.stats.commit_failures == 1 or not exc.disk_full:
                log.error("store.commit_failed", error=str(exc), pending_rows=len(rows), disk_full=exc.disk_full)
            self._update_full()
            await asyncio.sleep(0.5)  # rows stay staged with their sequence numbers; retried next round
            return
        for e in committed:
            e.dirty = e.urgent = False
        self._uncommitted = []
        if checkpoint:
            self._last_checkpoint = now
        self.stats.commits += 1
        if rows:
            self.stats.events_committed += len(rows)
            for r in rows:
                metrics.EVENTS_COMMITTED.labels(r.type).inc()
            self.publisher.notify()
        metrics.OUTBOX_PENDING.set(self.store.pending)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        comps = {f"connector.{cid}": c.status.as_dict() for cid, c in self.connectors.items()}
        comps["mqtt"] = self.link.status.as_dict()
        healthy = all(c.status.state == ComponentState.CONNECTED for c in self.connectors.values()) and \
            self.link.status.state == ComponentState.CONNECTED and not self.store.full
        return {
            "gateway": self.cfg.gateway.id,
            "healthy": healthy,
            "components": comps,
            "outbox_pending": self.store.pending,
            "outbox_bytes": self.store.pending_bytes,
            "quarantined": self.store.quarantined,
            "backlog_remaining": self.publisher.backlog_remaining,
            "alarms": (["store_full"] if self.store.full else []),
            "component_restarts": dict(self.crashes),
            "published": self.publisher.published,
            "acked": self.publisher.acked,
            "stats": {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self.stats).items()},
            "machines": {
                mid: {"order": e.context.order if e.context else None,
                      "operation": e.context.operation if e.context else None,
                      "state": e.machine_state,
                      "totals": {k: str(v) for k, v in e.totals.items()}}
                for mid, e in self.engines.items()
            },
        }
