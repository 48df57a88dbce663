"""The gateway runtime: wiring and supervision of connectors → core (engines) → store (outbox) → MQTT publisher.

One asyncio task group holds named long-lived tasks: one per connector, the MQTT link, the publisher and the core
loop (gateway/core.py, the only writer of machine state). Order sources (gateway/orders.py) turn dispatches, the
local command and PLC tags into commands for the core. Components other than the core are restarted with backoff
when they die of an unexpected error; shutdown is bounded: a stuck peer cannot hang it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog

from connectors import REGISTRY
from connectors.base import Connector, TagBinding, TagType
from gateway import loops, metrics
from gateway.alarms import Alarms
from gateway.component import ComponentState, rfc3339
from gateway.config import GatewayConfig
from gateway.core import (  # noqa: F401 - re-exported (tests, bench)
    CHECKPOINT_S,
    Core,
    CoreCall,
    Routes,
    Stats,
    checkpoint_interval,
)
from gateway.counter_specs import apply_tag_types, counter_binding, counter_type, reorder_windows
from gateway.dispatch import DispatchRejected, parse_erp_ack
from gateway.events import EventEncoder, Topics
from gateway.exporter import GatewayMetrics
from gateway.health import Health
from gateway.mqtt import MqttLink, Publisher
from gateway.orders import (
    LocalOrderSource,
    MqttDispatchSource,
    OrderCommand,
    PlcTagOrders,
)
from gateway.statuspage import Activity, identity
from gateway.store import PendingRow, Store, StoreError
from mappings.machine import (
    MachineEngine,
    MachineSpec,
    MaterialMeter,
    OrderContext,
    OrderRefused,
)
from mappings.samples import Sample

log = structlog.get_logger(__name__)

def machine_specs(cfg: GatewayConfig) -> list[MachineSpec]:
    specs = []
    windows = reorder_windows(cfg.connectors)
    for m in cfg.machines:
        counters = {}
        for name, b in m.counters.items():
            counters[name] = counter_binding(name, b, cfg.tag_address(m.id, name), windows[b.connector])
        materials = {}
        for name, b in m.materials.items():
            materials[name] = MaterialMeter(  # float meters (resolution) too: see gateway/counter_specs.py
                counter_binding(f"material:{name}", b, cfg.tag_address(m.id, f"material:{name}"),
                                windows[b.connector]), b.unit)
        specs.append(MachineSpec(
            id=m.id, counters=counters, unit=m.unit, materials=materials,
            state_values=None if m.state is None else dict(m.state.values),
            interval_s=m.reporting.interval_s, max_units=m.reporting.max_units,
            interval_jitter=m.reporting.jitter,
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


REJECTION_RETRY_S = 1.0  # an ERP rejection the store could not quarantine is tried again this often
ERP_REJECTED_ALARM = ("the ERP rejected events (acks topic): they are in the quarantine, not posted "
                      "(`edge-gateway buffer list --quarantine`); retry or purge them with the gateway stopped")


@dataclass
class _ErpRejection:
    event: dict[str, Any]
    reason: str
    failures: int = 0  # quarantine writes the store refused


class Gateway:
    """Wiring and supervision around one core (gateway/core.py).

    Builds the connectors, the order sources, the MQTT link and publisher from the config; routes connector samples
    and order commands into the core's inbox; answers the ERP's acknowledgements; restarts components that die;
    reports status. Machine state is the core's alone.
    """

    def __init__(self, cfg: GatewayConfig, *, password: str | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root, cfg.gateway)
        self.store = Store(cfg.store.path, synchronous=cfg.store.synchronous,
                           max_bytes=int(cfg.store.max_size_mb * 1024 * 1024))
        self.specs = {s.id: s for s in machine_specs(cfg)}
        self.stats = Stats()
        self.alarms = Alarms()
        self.activity = Activity(cfg)  # the status page's per-machine figures (gateway/statuspage.py)
        # kept up to date only where they can be read (the HTTP API serves them; ``http`` changes need a restart):
        # ~5 µs per report otherwise spent on figures nobody sees (bench/README.md, eighth session)
        self._track_activity = cfg.http.enabled
        self._order_source = {m.id: m.order_source for m in cfg.machines}
        self._rejections: collections.deque[_ErpRejection] = collections.deque()  # not yet in the quarantine
        self._rejections_queued = False
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
            resync=[self.topics.dispatch_filter()],
            resync_s=cfg.mqtt.dispatch_resync_s,
        )
        self.link.on_subscriptions_changed = self._subscriptions_changed
        self.publisher = Publisher(self.store, self.link, window=cfg.mqtt.max_inflight,
                                   backlog_rate=cfg.mqtt.backlog_rate, max_message_bytes=cfg.mqtt.max_message_bytes,
                                   batch_max=cfg.mqtt.batch_max_events, puback_timeout_s=cfg.mqtt.puback_timeout_s)
        routes = Routes()
        tag_machines = {m.id: m.order_source == "tag" for m in cfg.machines
                        if m.order_tag is not None or m.complete_tag is not None}
        self.core = Core(self.specs, routes, self.store, stats=self.stats, alarms=self.alarms,
                         tags=PlcTagOrders(tag_machines), read=self._cut_read, notify=self._committed,
                         on_refused=self._order_refused)
        if self._track_activity:
            self.core.on_staged = self.activity.staged
        self.dispatch = MqttDispatchSource(self.topics, self._order_source, self.core.put,
                                           self._count_rejected_dispatch, self._publish_answer)
        self.local_orders = LocalOrderSource(self._order_source, self.core.put, self.core.refusal)
        self.started = asyncio.Event()
        self.crashes: dict[str, int] = {}
        self._stopping = False
        self._build_connectors(routes)
        self.exporter = GatewayMetrics(self)  # this gateway's metrics registry, read at scrape time
        self.core.on_commit = self.exporter.committed
        self.health = Health(self)  # alarms evaluated once a second by the core (gateway/health.py)
        self.core.ticker = self.health

    def _committed(self, rows: list[PendingRow]) -> None:
        """The core committed rows: the publisher takes them; the status page notes them."""
        self.publisher.notify(rows)
        if self._track_activity:
            self.activity.committed(rows)

    # the core's state, read by status, the HTTP API and tests
    @property
    def engines(self) -> dict[str, MachineEngine]:
        return self.core.engines

    @property
    def encoder(self) -> EventEncoder | None:
        return self.core.encoder

    @property
    def core_heartbeat(self) -> float:
        return self.core.heartbeat

    def call_in_core(self, fn: Any) -> asyncio.Future[Any]:
        """Run ``await fn()`` in the core task right after its next commit: the one place where machine wiring may
        change (no round half done, no commit in flight). Returns a future of its result (gateway/reload.py)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def job() -> None:
            try:
                result = await fn()
            except Exception as exc:  # noqa: BLE001 - the caller gets the error; the core goes on
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)

        self.core.after_commit.append(job)
        self.core.wake()
        return fut

    # ------------------------------------------------------------------ wiring
    def _build_connectors(self, routes: Routes) -> None:
        bindings = self._bind(self.cfg, routes)
        for c in self.cfg.connectors:
            self.connectors[c.id] = self._make_connector(c, bindings.get(c.id, []))

    def _bind(self, cfg: GatewayConfig, routes: Routes) -> dict[str, list[TagBinding]]:
        """Fill ``routes`` from ``cfg``; return each connector's tag bindings (also used by a reload: gateway/reload.py)."""
        bindings: dict[str, list[TagBinding]] = defaultdict(list)
        for m in cfg.machines:
            signals: list[tuple[str, Any]] = list(m.counters.items())
            signals += [(f"material:{name}", b) for name, b in m.materials.items()]
            for name, tag in (("state", m.state), ("order", m.order_tag), ("operation", m.operation_tag),
                              ("complete", m.complete_tag)):
                if tag is not None:
                    signals.append((name, tag))
            # the changeover comes from the PLC's tags (no cut read): its scan is the cut, so the counters' values up
            # to it must all arrive (gateway/orders.py)
            tag_cut = m.order_source == "tag" or m.complete_tag is not None
            for signal, b in signals:
                key = f"{m.id}/{signal}"
                counted = signal not in ("state", "order", "operation", "complete")
                every = counted and getattr(b, "mode", "cumulative") != "cumulative"
                bindings[b.connector].append(TagBinding(key, cfg.tag_address(m.id, signal), every,
                                                        counter_type(b) if signal in m.counters or
                                                        signal.startswith("material:") else None,
                                                        every_change=signal in ("state", "complete"),
                                                        cut_by_tags=tag_cut and counted and not every))
                routes.signal[key] = (m.id, signal)
                if signal in ("order", "operation", "complete"):
                    routes.control.add(key)
                    # same sample time: counters first, then the completion flag, then the order tags
                    routes.rank[key] = 1 if signal == "complete" else 2
                elif signal != "state" and getattr(b, "mode", "cumulative") == "cumulative":
                    routes.coalescable.add(key)
                if signal not in ("state", "complete", "order", "operation"):  # the cut reads the counters
                    routes.cut_keys[m.id][b.connector].append(key)
                elif signal == "complete" and m.order_source != "tag":
                    # and the completion flag: one that rose before the cut completes the old operation first,
                    # whenever its notification would have come (a publish or a poll after the new order)
                    routes.cut_keys[m.id][b.connector].append(key)
        return bindings

    def _make_connector(self, c: Any, bindings: list[TagBinding]) -> Connector:
        """One connector of the config with its tag bindings, wired to the core (also used by a reload)."""
        conn = REGISTRY[c.type].load()(c, bindings, self.core.on_samples)
        conn.alarms = self.alarms  # connector alarms (refused tags, certificates) in /status
        conn.on_tag_types = self._on_tag_types
        return conn

    def _on_tag_types(self, types: dict[str, TagType]) -> None:
        """Counter types a connector found on its server at connect: applied by the core, in order, before the
        samples of that connection (a counter without configured bits takes its node's width)."""
        self.core.put(CoreCall(lambda core: apply_tag_types(self.cfg, self.specs, core, types)))

    async def _cut_read(self, connector: str, keys: list[str], timeout: float) -> list[Sample]:
        return await self.connectors[connector].read(keys, timeout=timeout)

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
        if state == "online":  # the active alarms (gateway/health.py republishes when they change)
            body["alarms"] = [a.as_dict() for a in self.alarms.active()]
        return json.dumps(body, default=str).encode()

    # ------------------------------------------------------------------ order sources, acks (event loop callbacks)
    def set_local_order(self, machine: str, ctx: OrderContext | None) -> None:
        """The local order command (CLI / HTTP). Raises ValueError for an unknown machine, another order source or
        an order the machine refuses."""
        self.local_orders.command(machine, ctx)

    def _order_refused(self, cmd: OrderCommand, exc: OrderRefused) -> None:
        if cmd.source == "mqtt":
            self.dispatch.refused(cmd, exc)
        else:
            self._count_rejected_dispatch(DispatchRejected(exc.reason, exc.detail),
                                          {"machine": cmd.machine, "source": cmd.source})

    def _publish_answer(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=1, retain=False)

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
        else:
            self.dispatch.on_message(topic, payload)

    def _count_rejected_dispatch(self, exc: DispatchRejected, where: dict[str, Any]) -> None:
        self.stats.dispatch_rejected += 1
        self.stats.dispatch_rejected_by_reason[exc.reason] += 1
        metrics.DISPATCH_REJECTED.labels(exc.reason).inc()
        log.warning("dispatch.rejected", reason=exc.reason, detail=exc.detail[:500],
                    **{k: v for k, v in where.items() if v is not None})

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
        self.activity.erp_ack(ack.machine or topic.rsplit("/", 2)[-2], ack)
        self.exporter.erp_ack(ack)  # counted; an accepted one is timed (sync latency)
        if ack.status != "rejected":
            self.health.erp_accepted(ack.event_id)  # a completion it acknowledged no longer waits (an alarm)
            return
        # kept in memory until its quarantine row is committed: its outbox row went at the PUBACK and the ERP does
        # not send the rejection again (retried while the store refuses writes, written at a stop)
        self._rejections.append(_ErpRejection(ack.event, ack.reason or "rejected by the ERP"))
        self._queue_rejections()

    def _queue_rejections(self) -> None:
        if not self._rejections_queued:
            self._rejections_queued = True
            self.core.after_commit.append(self._quarantine_rejections)
            self.core.wake()

    async def _quarantine_rejections(self, *, retry: bool = True) -> None:
        self._rejections_queued = False
        while self._rejections:
            r = self._rejections[0]
            try:
                await self._quarantine_rejection(r)
            except StoreError as exc:
                r.failures += 1
                if r.failures == 1:
                    log.error("erp_ack.quarantine_failed", id=r.event.get("id"), error=str(exc),
                              action=f"retried every {REJECTION_RETRY_S:g} s until the store takes it")
                if retry:
                    asyncio.get_running_loop().call_later(REJECTION_RETRY_S, self._queue_rejections)
                return
            self._rejections.popleft()

    async def _quarantine_rejection(self, r: _ErpRejection) -> None:
        ev = r.event
        machine = str(ev.get("subject", ""))
        etype = str(ev.get("type", ""))
        await self.store.quarantine_external(
            seq=ev.get("seq") if isinstance(ev.get("seq"), int) else None, machine=machine, type=etype,
            topic=self.topics.event(machine, etype), payload=json.dumps(ev).encode(), reason=f"ERP: {r.reason}")
        self.stats.erp_rejections += 1
        log.error("erp_ack.event_rejected", id=ev.get("id"), type=etype, machine=machine, reason=r.reason)
        self.alarms.raise_("erp_rejected", "warning", ERP_REJECTED_ALARM, rejected=self.stats.erp_rejections,
                           last_id=ev.get("id"), last_machine=machine, last_reason=r.reason[:300])

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Run until cancelled. Opens the store, restores state, starts every component."""
        await self.store.open()
        try:
            # (no local name: the parsed snapshots, ~3 KB per machine, are garbage once the engines are built)
            self.core.restore(await self.store.load_states(), self.store.next_seq,
                              EventEncoder(self.cfg.gateway, self.topics, self.store.epoch))
            self.activity.event_id = self.core.encoder.event_id
            if n := await self.store.count_quarantined_by_erp():  # still there from a previous run
                self.alarms.raise_("erp_rejected", "warning", ERP_REJECTED_ALARM, rejected=n)
            log.info("gateway.started", gateway=self.cfg.gateway.id, machines=len(self.engines),
                     connectors=len(self.connectors), pending=self.store.pending, event_loop=loops.running_name())
            if self.cfg.http.enabled:
                from gateway.http import HttpApi

                self.http = HttpApi(self.cfg.http, self)
                await self.http.start()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._supervise("mqtt.link", self.link.run), name="mqtt.link"),
                    tg.create_task(self._supervise("publisher", self.publisher.run), name="publisher"),
                    tg.create_task(run_until_really_cancelled(self.core.run, "core"), name="core"),
                ]
                for cid, conn in self.connectors.items():
                    tasks.append(tg.create_task(self._supervise(f"connector.{cid}", conn.run), name=f"connector.{cid}"))
                self._tasks = tasks
                self._tg = tg  # a reload starts the tasks of new connectors in it
                self.started.set()
        finally:
            await self._shutdown()

    http: Any = None

    async def _shutdown(self) -> None:
        self.core.cancel_cuts()
        if self.http is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.http.stop(), timeout=5)
        # the task group has cancelled everything; apply what the core's inbox still holds, then persist what the
        # engines hold (staged rows and their state)
        self.core.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.core.commit(force=True), timeout=5)
        if self._rejections:  # ERP rejections not yet in the quarantine: their last chance
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._quarantine_rejections(retry=False), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publisher.flush_acks(), timeout=2)
        await self.store.close()
        log.info("gateway.stopped", gateway=self.cfg.gateway.id)

    async def _supervise(self, name: str, run: Any) -> None:
        """Restart a component whose loop died of an unexpected error (a bug or a library surprise), with backoff;
        the rest of the gateway keeps counting. The core loop is not supervised: its state is the engines'."""
        from gateway.component import Backoff

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

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        comps = {f"connector.{cid}": c.status.as_dict() for cid, c in self.connectors.items()}
        comps["mqtt"] = self.link.status.as_dict()
        conns = {cid: comps[f"connector.{cid}"] for cid in self.connectors}
        alarms = self.alarms.ids()
        healthy = all(c.status.state == ComponentState.CONNECTED for c in self.connectors.values()) and \
            self.link.status.state == ComponentState.CONNECTED and not alarms
        return {
            "gateway": self.cfg.gateway.id,
            "identity": identity(self.cfg, self.activity.started),
            "healthy": healthy,
            "components": comps,
            "outbox_pending": self.store.pending,
            "outbox_bytes": self.store.pending_bytes - self.store.quarantined_bytes,
            "stored_bytes": self.store.pending_bytes,  # outbox + quarantine: what store.max_size_mb caps
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
                      "faulted": self.core.faulted.get(mid),
                      "changeover_pending": mid in self.core.cuts,
                      "totals": {k: str(v) for k, v in e.totals.items()},
                      **self.activity.machine(mid, conns)}
                for mid, e in self.engines.items()
            },
        }
