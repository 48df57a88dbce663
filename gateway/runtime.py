"""The gateway runtime: connectors → machine engines → store (outbox) → MQTT publisher.

One asyncio task group holds named long-lived tasks: one per connector, the MQTT link, the publisher and the core
loop. The core loop is the only writer of machine state: it drains the input queue (sample batches, dispatches,
ticks), runs the pure engines, and group-commits snapshots + events in one transaction, then wakes the publisher.
``stop()`` is bounded: a stuck peer cannot hang shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import contextlib
import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog

from connectors import REGISTRY
from connectors.base import ComponentState, Connector, TagBinding, rfc3339
from connectors.errors import ConnectorError, ConnectorUnavailable
from gateway import metrics
from gateway.alarms import Alarms
from gateway.config import GatewayConfig, counter_modulus
from gateway.dispatch import DispatchRejected, parse_dispatch, parse_erp_ack
from gateway.faults import crash_point
from gateway.orders import OrderCommand, TagOrderTracker
from gateway.events import EventEncoder, Topics
from gateway.mqtt import MqttLink, Publisher
from gateway.store import OutboxRow, Store, StoreError
from mappings.counters import CounterSpec
from mappings.machine import (
    CounterBinding,
    EventDraft,
    MachineEngine,
    MachineSpec,
    MaterialMeter,
    OrderContext,
    OrderRefused,
)
from mappings.samples import Sample

log = structlog.get_logger(__name__)

CHECKPOINT_S = 30.0
"""How often the state of machines whose only change is counted production is snapshotted. Their counters are the
durable log: a crash re-derives the quantities since the last snapshot from the counter, so a snapshot is needed only
before a counter can wrap twice (the interval is capped at half the shortest wrap period at max_rate) — state that
exists nowhere else (an order change, reset-on-read and delta values, a counter reset or rollover seen, a held zero)
is committed at once (``urgent``), and every event is committed with the state that produced it."""
CUT_READ_TIMEOUT_S = 3.0  # one attempt of a cut read
CUT_RETRY_MAX_S = 1.0  # a cut read of a connector that is not connected is retried, with backoff up to this
ORDER_TAG_SETTLE_S = 0.2  # a pending PLC-tag order switch of a machine that makes nothing is applied after this
MAX_QUEUED_SAMPLES = 200_000  # above this, queued cumulative samples are coalesced (the latest carries the delta)
CORE_BATCH = 10_000  # inbox items handled per round before a commit


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


def checkpoint_interval(specs: Any) -> float:
    """CHECKPOINT_S, or half the shortest wrap period (modulus / max_rate) of any cumulative counter, at least 1 s."""
    wraps = [b.spec.modulus / b.spec.max_rate
             for spec in specs for b in [*spec.counters.values(), *(m.binding for m in spec.materials.values())]
             if b.spec.mode == "cumulative" and b.spec.modulus and b.spec.max_rate > 0]
    return max(1.0, min([CHECKPOINT_S, *(w / 2 for w in wraps)]))


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
class _CutDone:
    """The cut read of one machine came back (tagged sample batch), or failed for good."""

    machine: str
    samples: list[Sample]


@dataclass
class _ErpRejection:
    event: dict[str, Any]
    reason: str


@dataclass
class _Cut:
    """A changeover waiting for its cut read; commands that arrive meanwhile queue behind it, in order."""

    machine: str
    commands: list[OrderCommand]
    task: "asyncio.Task[None] | None" = None


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
    acks_rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples_coalesced: int = 0
    machine_faults: int = 0


class Gateway:
    """Wiring and supervision around one core loop.

    The core loop (``_core``) is the only writer of machine state. It takes commands from one inbox (sample
    batches from connectors, order commands, cut results), applies each synchronously to the pure engines and
    stages the resulting event drafts (sequence number, id, payload) in the same step — it never awaits while it
    holds work that is not staged. The only await of a round is the group commit of staged rows and the snapshots
    of the machines they came from; a commit that fails keeps both staged and is retried. Changeover cuts are
    two-phase: the core asks the connectors for a read in a task of its own and goes on; the read comes back
    through the inbox as a tagged batch, so a slow PLC delays only its own machine.
    """

    def __init__(self, cfg: GatewayConfig, *, password: str | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root, cfg.gateway)
        self.store = Store(cfg.store.path, synchronous=cfg.store.synchronous,
                           max_bytes=int(cfg.store.max_size_mb * 1024 * 1024))
        self.specs = {s.id: s for s in machine_specs(cfg)}
        self.engines: dict[str, MachineEngine] = {}
        self.stats = Stats()
        self.alarms = Alarms()
        self._inbox: collections.deque[Any] = collections.deque()
        self._inbox_ready = asyncio.Event()
        self._queued_samples = 0
        self._routes: dict[str, tuple[str, str]] = {}  # tag key -> (machine, signal)
        self._control_keys: set[str] = set()
        self._control_rank: dict[str, int] = {}  # order / operation / complete tags: samples handled in time order
        self._coalescable: set[str] = set()  # cumulative counter keys: the latest value carries the delta
        self._machine_connectors: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self._order_source = {m.id: m.order_source for m in cfg.machines}
        self._trackers: dict[str, TagOrderTracker] = {}
        self._settle_since: dict[str, float] = {}
        self._switch_pending: set[str] = set()  # machines with a PLC-tag order switch not yet applied
        self._cuts: dict[str, _Cut] = {}
        self._dirty: set[str] = set()  # machines whose engine state is not committed
        self._timers: list[tuple[float, str]] = []  # heap of (deadline, machine): reporting windows
        self._scheduled: dict[str, float] = {}
        self._faulted: dict[str, str] = {}  # machine -> error: its engine raised; its samples are ignored
        self._rejections: list[_ErpRejection] = []
        self.connectors: dict[str, Connector] = {}
        status_topic = self.topics.status()
        self._started_at = time.time()
        self.link = MqttLink(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or cfg.gateway.id,
            password=password,
            will=(status_topic, self._status_payload("offline", will=True)),
            online=(status_topic, lambda: self._status_payload("online")),
            offline=lambda: self._status_payload("offline"),
            subscriptions=[self.topics.dispatch_filter(), self.topics.acks_filter()],
            on_message=self._on_message,
        )
        self.link.on_subscriptions_changed = self._subscriptions_changed
        self.publisher = Publisher(self.store, self.link, window=cfg.mqtt.max_inflight,
                                   backlog_rate=cfg.mqtt.backlog_rate, max_message_bytes=cfg.mqtt.max_message_bytes,
                                   batch_max=cfg.mqtt.batch_max_events)
        self.encoder: EventEncoder | None = None
        self._next_seq = 1
        self._uncommitted: list[OutboxRow] = []
        self._last_checkpoint = 0.0
        self.checkpoint_s = checkpoint_interval(self.specs.values())
        self._commit_backoff_until = 0.0
        self.core_heartbeat = 0.0  # monotonic time of the core loop's last round
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
            if m.order_tag is not None or m.complete_tag is not None:
                self._trackers[m.id] = TagOrderTracker(m.id)
            for signal, b in signals:
                key = f"{m.id}/{signal}"
                every = signal not in ("state", "order", "operation", "complete") and \
                    getattr(b, "mode", "cumulative") != "cumulative"
                bindings[b.connector].append(TagBinding(key, self.cfg.tag_address(m.id, signal), every))
                self._routes[key] = (m.id, signal)
                if signal in ("order", "operation", "complete"):
                    self._control_keys.add(key)
                    # same sample time: counters first, then the completion flag, then the order tags
                    self._control_rank[key] = 1 if signal == "complete" else 2
                elif signal != "state" and getattr(b, "mode", "cumulative") == "cumulative":
                    self._coalescable.add(key)
                if signal not in ("state", "complete", "order", "operation"):  # the cut reads the counters
                    self._machine_connectors[m.id][b.connector].append(key)
        for c in self.cfg.connectors:
            cls = REGISTRY[c.type].load()
            self.connectors[c.id] = cls(c, bindings.get(c.id, []), self._on_samples)

    def _status_payload(self, state: str, *, will: bool = False) -> bytes:
        """The retained status topic. ``time`` is when the message was made (RFC 3339): at each connect for
        'online', at a clean stop for 'offline'. The last will is made at start-up and published by the broker
        when the connection dies, so it carries no time (the time of death is when it arrives), only ``cause``."""
        body: dict[str, Any] = {"gateway": self.cfg.gateway.id, "state": state}
        if will:
            body["cause"] = "connection_lost"
        else:
            body["time"] = rfc3339(time.time())
            if state == "offline":
                body["cause"] = "stopped"
        body["started"] = rfc3339(self._started_at)
        return json.dumps(body).encode()

    # ------------------------------------------------------------------ inbox (event loop callbacks, non-blocking)
    def _put(self, item: Any) -> None:
        self._inbox.append(item)
        self._inbox_ready.set()

    def _on_samples(self, samples: list[Sample]) -> None:
        self._inbox.append(samples)
        self._inbox_ready.set()
        self._queued_samples += len(samples)
        if self._queued_samples > MAX_QUEUED_SAMPLES:
            self._coalesce()

    def _coalesce(self) -> None:
        """Bound the inbox under overload: merge runs of queued sample batches, keeping only the latest sample of
        each cumulative counter (its value carries every delta before it). Delta / reset-on-read counters, state
        and order tags are kept in full and in order; a batch with order tags is a barrier nothing moves across."""
        out: collections.deque[Any] = collections.deque()
        run: dict[str, Sample] = {}
        first: dict[str, Sample] = {}
        rest: list[Sample] = []
        before = self._queued_samples
        coalescable, control = self._coalescable, self._control_keys

        def close_run() -> None:
            if run or rest:
                out.append(rest + list(run.values()))

        for item in self._inbox:
            if isinstance(item, list) and not any(s.key in control for s in item):
                for s in item:
                    if s.key in coalescable and s.good:
                        if s.key in first:
                            run.pop(s.key, None)
                            run[s.key] = s
                        else:
                            first[s.key] = s  # kept: it may be the engine's first value (a baseline)
                            rest.append(s)
                    else:
                        rest.append(s)
                continue
            close_run()
            run, rest, first = {}, [], {}
            out.append(item)
        close_run()
        self._inbox = out
        self._queued_samples = sum(len(i) for i in out if isinstance(i, list))
        dropped = before - self._queued_samples
        if dropped > 0:
            self.stats.samples_coalesced += dropped
            metrics.INPUT_COALESCED.inc(dropped)
        self.alarms.raise_("input_overflow", "warning",
                           "the core cannot keep up with the connectors: queued counter samples are coalesced "
                           "(no quantity is lost; windows get coarser)",
                           queued_before=before, queued_after=self._queued_samples,
                           coalesced_total=self.stats.samples_coalesced)

    def _subscriptions_changed(self) -> None:
        """A refused subscription means dispatches or ERP acks never arrive (an ACL denial): an alarm, not silence."""
        refused = self.link.refused_subscriptions
        for topic in self.link.subscriptions:
            self.alarms.set(f"subscription_refused:{topic}", topic in refused, "critical",
                            "the broker refused this subscription: orders or ERP acknowledgements on it never arrive",
                            topic=topic, reason=refused.get(topic))

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
            self._count_rejected_dispatch(exc, topic=topic, size=len(payload))
            return
        self._put(OrderCommand(machine, ctx, "mqtt"))

    def _count_rejected_dispatch(self, exc: DispatchRejected, **where: Any) -> None:
        self.stats.dispatch_rejected += 1
        self.stats.dispatch_rejected_by_reason[exc.reason] += 1
        metrics.DISPATCH_REJECTED.labels(exc.reason).inc()
        log.warning("dispatch.rejected", reason=exc.reason, detail=exc.detail[:500], **where)

    def _on_erp_ack(self, topic: str, payload: bytes) -> None:
        """The ERP rejected an event it received: keep it in the quarantine, visible and retryable. Only a rejection
        of one of this gateway's events from this store (source and epoch) is taken: anyone able to publish on an
        acks topic cannot fill the quarantine with made-up events."""
        if self.encoder is None:
            return
        try:
            ack = parse_erp_ack(payload, source=self.encoder.source, epoch=self.store.epoch)
        except DispatchRejected as exc:
            self.stats.acks_malformed += 1
            self.stats.acks_rejected_by_reason[exc.reason] += 1
            metrics.ACKS_REJECTED.labels(exc.reason).inc()
            log.warning("erp_ack.rejected", topic=topic, reason=exc.reason, detail=exc.detail[:300], size=len(payload))
            return
        if ack.status != "rejected":
            return  # positive acknowledgements carry no action here
        self._rejections.append(_ErpRejection(ack.event, ack.reason or "rejected by the ERP"))
        self._inbox_ready.set()

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
            for mid in self.engines:
                self._schedule(mid)
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
                ]
                for cid, conn in self.connectors.items():
                    tasks.append(tg.create_task(self._supervise(f"connector.{cid}", conn.run), name=f"connector.{cid}"))
                self._tasks = tasks
                self.started.set()
        finally:
            await self._shutdown()

    http: Any = None

    async def _shutdown(self) -> None:
        for cut in self._cuts.values():
            if cut.task is not None:
                cut.task.cancel()
        if self.http is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.http.stop(), timeout=5)
        # the task group has cancelled everything; persist what the engines hold (staged rows and their state)
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

    # ------------------------------------------------------------------ the core loop
    async def _core(self) -> None:
        while True:
            if not self._inbox and not self._rejections:
                timeout = self._next_wakeup()
                self._inbox_ready.clear()
                if timeout is None or timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await self._inbox_ready.wait()
            self.core_heartbeat = time.monotonic()
            if self._queued_samples < MAX_QUEUED_SAMPLES // 2 and "input_overflow" in self.alarms:
                self.alarms.clear("input_overflow", coalesced_total=self.stats.samples_coalesced)
            inbox = self._inbox
            n = 0
            while inbox and n < CORE_BATCH:
                item = inbox.popleft()
                n += 1
                if isinstance(item, list):
                    self._queued_samples -= len(item)
                    self._stage(self._apply_samples(item))
                elif isinstance(item, OrderCommand):
                    self._order_command(item)
                elif isinstance(item, _CutDone):
                    self._cut_done(item)
            self._run_timers()
            await self._commit()
            if self._rejections:
                rejections, self._rejections = self._rejections, []
                for r in rejections:
                    await self._quarantine_rejection(r)

    def _next_wakeup(self) -> float | None:
        """Seconds until the core has timed work: the next reporting window, a settling order switch, the
        checkpoint of dirty machines, a commit retry. None: nothing timed (idle costs nothing)."""
        now = time.monotonic()
        due: list[float] = []
        if self._timers:
            due.append(self._timers[0][0])
        if self._dirty or self._uncommitted:
            due.append(max(self._last_checkpoint + self.checkpoint_s, self._commit_backoff_until))
        if self._switch_pending:
            due.append(now + ORDER_TAG_SETTLE_S)
        if not due:
            return None
        return max(0.0, min(due) - now)

    @staticmethod
    def _now() -> float:
        """Reporting windows run on the monotonic clock (a wall-clock step neither closes nor stretches them)."""
        return time.monotonic()

    # ------------------------------------------------------------------ samples
    def _apply_samples(self, samples: list[Sample]) -> list[EventDraft]:
        routes = self._routes
        control = self._control_keys
        if control:
            if self._switch_pending:
                return self._apply_samples_ordered(samples)
            for s in samples:
                if s.key in control:
                    return self._apply_samples_ordered(samples)
        out: list[EventDraft] = []
        engines = self.engines
        dirty = self._dirty
        scheduled = self._scheduled
        unscheduled: list[str] = []
        for s in samples:
            route = routes.get(s.key)
            if route is None:
                continue
            machine, signal = route
            eng = engines[machine]
            try:
                drafts = eng.apply(s, signal)
            except Exception as exc:  # noqa: BLE001 - one machine's fault must not stop the others
                self._fault(machine, exc, s)
                continue
            if drafts:
                out.extend(drafts)
            if eng.dirty:
                dirty.add(machine)
                if machine not in scheduled:
                    unscheduled.append(machine)
        self.stats.samples += len(samples)
        for machine in unscheduled:  # only machines whose window may just have opened
            self._schedule(machine)
        return out

    def _apply_samples_ordered(self, samples: list[Sample]) -> list[EventDraft]:
        """A batch with order tags or a completion flag: applied in sample-time order, so a PLC-tag changeover
        switches at the exact sample boundary (see gateway/orders.py for the rule)."""
        out: list[EventDraft] = []
        routes, engines, trackers = self._routes, self.engines, self._trackers
        touched: set[str] = set()
        rank = self._control_rank
        for s in sorted(samples, key=lambda s: (s.time, rank.get(s.key, 0))):
            route = routes.get(s.key)
            if route is None:
                continue
            machine, signal = route
            tracker = trackers.get(machine)
            if tracker is not None and tracker.due(s.time):
                out.extend(self._switch_from_tags(machine))
            if signal == "order" or signal == "operation":
                if tracker is not None and self._order_source[machine] == "tag" and tracker.order_tag(signal, s):
                    self._switch_pending.add(machine)
                continue
            if signal == "complete":
                if tracker is not None and tracker.complete_flag(s):
                    out.extend(self._complete_now(machine))
                continue
            eng = engines[machine]
            try:
                out.extend(eng.apply(s, signal))
            except Exception as exc:  # noqa: BLE001
                self._fault(machine, exc, s)
                continue
            if eng.dirty:
                self._dirty.add(machine)
                touched.add(machine)
        self.stats.samples += len(samples)
        for machine in touched:
            self._schedule(machine)
        return out

    def _switch_from_tags(self, machine: str) -> list[EventDraft]:
        ctx = self._trackers[machine].take_switch()
        if ctx is False:
            return []
        self._switch_pending.discard(machine)
        self._settle_since.pop(machine, None)
        return self._apply_order(OrderCommand(machine, ctx, "tag", needs_cut=False))  # type: ignore[arg-type]

    def _complete_now(self, machine: str) -> list[EventDraft]:
        """Rising edge of the PLC's 'operation complete' flag: complete the operation active at that sample."""
        cur = self.engines[machine].context
        if cur is None:
            log.warning("order.complete_without_order", machine=machine)
            return []
        return self._apply_order(OrderCommand(machine, dataclasses.replace(cur, status="completed"), "complete_tag",
                                              needs_cut=False))

    def _fault(self, machine: str, exc: BaseException, sample: Sample | None = None) -> None:
        """An engine raised (a bug, or input nothing validated): this machine stops counting, the others go on.
        Its last committed state stays; the parts it makes meanwhile are still in its counters."""
        if machine in self._faulted:
            return
        self._faulted[machine] = f"{type(exc).__name__}: {exc}"[:500]
        self.stats.machine_faults += 1
        metrics.MACHINE_FAULTS.inc()
        self.alarms.raise_(f"machine_faulted:{machine}", "critical",
                           "the machine's engine raised; it stops counting until the gateway is restarted (its "
                           "counter keeps the parts)", machine=machine, error=self._faulted[machine])
        for key in [k for k, (m, _) in self._routes.items() if m == machine]:
            del self._routes[key]
        # what it staged before the fault is committed with its state as it is: never rows without their state
        log.error("machine.faulted", machine=machine, error=self._faulted[machine],
                  sample=None if sample is None else {"key": sample.key, "value": repr(sample.value)[:100]},
                  exc_info=exc)

    # ------------------------------------------------------------------ order commands
    def set_local_order(self, machine: str, ctx: OrderContext | None) -> None:
        """The local order command (CLI / HTTP). Raises ValueError for an unknown machine or another order source."""
        if machine not in self.specs:
            raise ValueError(f"unknown machine {machine!r}")
        if self._order_source[machine] != "local":
            raise ValueError(f"machine {machine!r} takes its order from {self._order_source[machine]!r}; "
                             "set order_source: local to use the local command")
        eng = self.engines.get(machine)
        refused = eng.refusal(ctx) if eng is not None else None
        if refused is not None:
            raise ValueError(refused.detail)
        self._put(OrderCommand(machine, ctx, "local"))

    def _order_command(self, cmd: OrderCommand) -> None:
        """An order command from MQTT or the local command: apply now, or after the machine's cut read."""
        machine = cmd.machine
        if machine in self._faulted:
            log.warning("order.ignored_machine_faulted", machine=machine, source=cmd.source)
            return
        cut = self._cuts.get(machine)
        if cut is not None:
            cut.commands.append(cmd)
            return
        eng = self.engines[machine]
        refused = eng.refusal(cmd.context)
        if refused is not None:  # no cut read for an order that will not be applied
            self._refused(cmd, refused)
            return
        cur, new = eng.context, cmd.context
        changes = (cur is None) != (new is None) or (
            cur is not None and new is not None and (cur.ref != new.ref or new.status != cur.status))
        if changes and cmd.needs_cut and self._machine_connectors.get(machine):
            cut = self._cuts[machine] = _Cut(machine, [cmd])
            cut.task = asyncio.get_running_loop().create_task(self._cut_read(machine), name=f"cut.{machine}")
            return
        self._stage(self._apply_order(cmd))

    async def _cut_read(self, machine: str) -> None:
        """Phase one of a changeover: read every counter of the machine, and hand the result to the core. A
        connector that cannot answer is retried (with backoff) until it can: the changeover is held until the
        first good read, so parts made before it are never booked to the new order."""
        from connectors.base import Backoff

        samples: list[Sample] = []
        for cid, keys in list(self._machine_connectors[machine].items()):
            backoff = Backoff(0.05, CUT_RETRY_MAX_S)
            started = time.monotonic()
            reported = False
            while True:
                try:
                    read = await self.connectors[cid].read(keys, timeout=CUT_READ_TIMEOUT_S)
                    # a re-read: the current value again (a delta register re-read at the cut is not new production)
                    samples.extend(dataclasses.replace(s, reread=True) for s in read)
                    break
                except (ConnectorError, asyncio.TimeoutError) as exc:
                    # a connector still connecting (typically right after a restart) is waited for quietly
                    if not reported and (not isinstance(exc, ConnectorUnavailable)
                                         or time.monotonic() - started >= CUT_READ_TIMEOUT_S):
                        reported = True
                        self.stats.cut_read_failures += 1
                        log.warning("changeover.cut_read_failed", machine=machine, connector=cid,
                                    error=str(exc) or type(exc).__name__, action="held until the first good read")
                await asyncio.sleep(backoff.next())
            if reported:
                log.info("changeover.cut_read_recovered", machine=machine, connector=cid,
                         held_s=round(time.monotonic() - started, 3))
        self._put(_CutDone(machine, samples))

    def _cut_done(self, done: _CutDone) -> None:
        """Phase two: the read is the cut — apply it, then the commands that waited for it, in order."""
        cut = self._cuts.pop(done.machine, None)
        self._stage(self._apply_samples(done.samples))
        if cut is None:
            return
        for cmd in cut.commands:
            self._stage(self._apply_order(cmd))

    def _apply_order(self, cmd: OrderCommand) -> list[EventDraft]:
        machine = cmd.machine
        if machine in self._faulted:
            return []
        eng = self.engines[machine]
        try:
            out = eng.dispatch(cmd.context, time.time())
        except OrderRefused as exc:
            self._refused(cmd, exc)
            return []
        except Exception as exc:  # noqa: BLE001 - e.g. a value nothing validated: this machine faults, not all
            self._fault(machine, exc)
            return []
        if eng.dirty:
            self._dirty.add(machine)
            eng.urgent = True  # an order change is persisted now, not at the next checkpoint
        self.stats.dispatch_accepted += 1
        metrics.DISPATCH_ACCEPTED.inc()
        ctx = cmd.context
        log.info("order.applied", machine=machine, source=cmd.source,
                 order=ctx.order if ctx else None, operation=ctx.operation if ctx else None,
                 status=ctx.status if ctx else "cleared")
        self._schedule(machine)
        return out

    def _refused(self, cmd: OrderCommand, exc: OrderRefused) -> None:
        self._count_rejected_dispatch(DispatchRejected(exc.reason, exc.detail), machine=cmd.machine, source=cmd.source)

    # ------------------------------------------------------------------ reporting windows (timer heap)
    def _schedule(self, machine: str) -> None:
        eng = self.engines.get(machine)
        if eng is None:
            return
        d = eng.next_deadline()
        if d is None or self._scheduled.get(machine) == d:
            return
        self._scheduled[machine] = d
        heapq.heappush(self._timers, (d, machine))

    def _run_timers(self) -> None:
        timers = self._timers
        if not timers:
            self._settle_order_tags()
            return
        now = self._now()
        while timers and timers[0][0] <= now:
            d, machine = heapq.heappop(timers)
            if self._scheduled.get(machine) != d:
                continue  # superseded
            del self._scheduled[machine]
            eng = self.engines[machine]
            if machine in self._faulted:
                continue
            try:
                drafts = eng.tick(now)
            except Exception as exc:  # noqa: BLE001
                self._fault(machine, exc)
                continue
            if eng.dirty:
                self._dirty.add(machine)
            self._stage(drafts)
            self._schedule(machine)
        self._settle_order_tags()

    def _settle_order_tags(self) -> None:
        """A pending PLC-tag switch of a machine that sends nothing after it is applied once it has settled."""
        now = time.monotonic()
        settle = self._settle_since
        for machine in list(self._switch_pending):
            first = settle.setdefault(machine, now)
            if now - first >= ORDER_TAG_SETTLE_S:
                del settle[machine]
                self._stage(self._switch_from_tags(machine))

    # ------------------------------------------------------------------ staging and the group commit
    def _update_full(self) -> None:
        full = self.store.full
        if full != self._full:
            self._full = full
            for e in self.engines.values():
                e.hold_reports = full
            if full:
                self._full_since = time.monotonic()
                log.error("store.full", pending_bytes=self.store.pending_bytes, max_bytes=self.store.max_bytes,
                          disk_full=self.store.disk_full,
                          action="quantities accumulate in machine state; state-change events are dropped")
            else:
                log.info("store.space_recovered", pending_bytes=self.store.pending_bytes,
                         downtime_s=round(time.monotonic() - self._full_since, 3),
                         dropped=dict(self.stats.dropped_while_full))
                for mid in self.engines:
                    self._schedule(mid)
            metrics.STORE_FULL.set(1 if full else 0)
            self.alarms.set("store_full", full, "critical",
                            "the store is at its size cap or the disk is full: quantities accumulate in machine "
                            "state, state-change events are dropped (counted)",
                            pending_bytes=self.store.pending_bytes, max_bytes=self.store.max_bytes,
                            disk_full=self.store.disk_full)

    _full = False

    def _stage(self, events: list[EventDraft]) -> None:
        """Give drafts their sequence numbers and payloads, in the same synchronous step as the engine change that
        made them: from here on they are committed with that state, or not at all (never one without the other)."""
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
        encode = self.encoder.encode
        for ev in events:
            seq = self._next_seq
            try:
                topic, payload = encode(ev, seq)
            except Exception as exc:  # noqa: BLE001 - a draft that cannot be encoded is a bug in one machine
                log.error("event.encode_failed", machine=ev.subject, type=ev.type, data=repr(ev.data)[:2000])
                self._fault(ev.subject, exc)
                continue
            self._next_seq = seq + 1
            self._uncommitted.append(OutboxRow(seq, ev.subject, ev.type, topic, payload))
            self._dirty.add(ev.subject)

    async def _commit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._commit_backoff_until and not force:
            return
        self._update_full()
        dirty = self._dirty
        rows = self._uncommitted
        checkpoint = force or now - self._last_checkpoint >= self.checkpoint_s
        engines = self.engines
        if not rows and not (dirty and (checkpoint or any(engines[m].urgent for m in dirty))):
            return
        # The snapshot of a machine goes with the events derived from it (and urgent state: reset-on-read deltas, an
        # order change). Other machines' counters are their own durable log: their snapshots wait for the checkpoint,
        # so a commit does not serialise every engine of a large gateway.
        with_rows = {r.machine for r in rows}
        committed = [m for m in dirty if checkpoint or m in with_rows or engines[m].urgent]
        states = {m: engines[m].snapshot() for m in committed}
        try:
            committed_rows = await self.store.commit(states, rows, self._next_seq)
        except StoreError as exc:
            self.stats.commit_failures += 1
            kind = getattr(exc, "kind", "disk_full" if exc.disk_full else "other")
            metrics.COMMIT_FAILURES.labels(kind).inc()
            if self._commit_failing is None:
                self._commit_failing = str(exc)
                log.error("store.commit_failed", error=str(exc), pending_rows=len(rows), kind=kind,
                          action="events and state stay staged; retried every 0.5 s")
                self.alarms.raise_("store_commit_failing", "critical",
                                   "commits to the store fail: events are held in memory, nothing is published",
                                   error=str(exc)[:300], kind=kind)
            self._update_full()
            # rows stay staged with their sequence numbers and the state with them; retried after a pause
            self._commit_backoff_until = time.monotonic() + 0.5
            return
        if self._commit_failing is not None:
            self._commit_failing = None
            self.alarms.clear("store_commit_failing", failures=self.stats.commit_failures)
        for m in committed:
            e = engines[m]
            e.dirty = e.urgent = False
            dirty.discard(m)
        self._uncommitted = []
        if checkpoint:
            self._last_checkpoint = now
        self.stats.commits += 1
        if rows:
            self.stats.events_committed += len(rows)
            for r in rows:
                metrics.EVENTS_COMMITTED.labels(r.type).inc()
            self.publisher.notify(committed_rows)
            crash_point("core.handed_over")
        metrics.OUTBOX_PENDING.set(self.store.pending)

    _commit_failing: str | None = None
    _full_since = 0.0  # monotonic time the store became full (the downtime in store.space_recovered)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        comps = {f"connector.{cid}": c.status.as_dict() for cid, c in self.connectors.items()}
        comps["mqtt"] = self.link.status.as_dict()
        alarms = self.alarms.ids()
        healthy = all(c.status.state == ComponentState.CONNECTED for c in self.connectors.values()) and \
            self.link.status.state == ComponentState.CONNECTED and not alarms
        return {
            "gateway": self.cfg.gateway.id,
            "healthy": healthy,
            "components": comps,
            "outbox_pending": self.store.pending,
            "outbox_bytes": self.store.pending_bytes,
            "quarantined": self.store.quarantined,
            "backlog_remaining": self.publisher.backlog_remaining,
            "alarms": alarms,
            "alarm_details": [a.as_dict() for a in self.alarms.active()],
            "component_restarts": dict(self.crashes),
            "published": self.publisher.published,
            "acked": self.publisher.acked,
            "stats": {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self.stats).items()},
            "machines": {
                mid: {"order": e.context.order if e.context else None,
                      "operation": e.context.operation if e.context else None,
                      "state": e.machine_state,
                      "faulted": self._faulted.get(mid),
                      "changeover_pending": mid in self._cuts,
                      "totals": {k: str(v) for k, v in e.totals.items()}}
                for mid, e in self.engines.items()
            },
        }
