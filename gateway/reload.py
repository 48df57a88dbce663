"""Live reload of the configuration (SIGHUP, ``edge-gateway reload``): machines and connectors added, removed or
changed while the others keep counting.

Rules:

- **Validated first.** The file is loaded and validated exactly as at start; any problem is logged
  (``config.reload_failed`` with the file, the field path and the fix, ``reason: invalid``) and the running
  configuration stays, untouched.
- **All or nothing.** After a successful reload the gateway runs the new file; after a refused one it runs the old
  one. There is no half-applied state.
- **What cannot change live is refused**, naming the key (``reason: needs_restart``): ``gateway`` (the identity: topics
  and event sources), ``mqtt`` (the broker session, client id, TLS, topics), ``store`` (the outbox file and its
  lock) and ``http`` (the listener). Restart the gateway to change those. ``logging`` is applied live.
- **Unchanged machines keep their engine object**: counter baselines, open window, order context, totals; not one
  sample of theirs is dropped. Their connector is restarted only if its own settings or its set of tags changed
  (another machine added to it, say); a restarted connector's first reading continues the counter from the engine's
  last value, like a reconnect.
- **A changed machine** goes through what a restart with the new file would do to it: a new engine from its current
  state (``MachineEngine(new_spec, old.snapshot())``), so its counters continue from their last values (a counter
  moved to another tag or PLC is judged against that value by the usual rules: reset, rollover, implausible jump).
  Its fault, if it had one, is cleared (the new config may be the fix).
- **A removed machine**'s state is committed first (a checkpoint), then its engine is dropped; the state stays in the
  store, and the machine picks up from it if it is configured again (like after a restart).
- **Applied in the core task** (``Gateway.call_in_core``), between two rounds and right after a commit: no round is
  half done, no commit is in flight. Refused (``reason: busy``, retry later) while a changed or removed machine has a
  changeover cut in flight, or while staged events wait for a failing store.

Old connectors are cancelled before the new ones start, and their tasks are awaited (bounded), so a device that
accepts one connection only sees the old one closed first. What they read up to then is not dropped: the readings
still in the core's inbox and those a stopping connector hands on (a poll cut short hands on the blocks it has read)
are applied with the old wiring before the new one takes over (``Reloader._apply_read``; a reset-on-read register was
cleared by that read).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gateway.config import ConfigError, GatewayConfig, load_config

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger(__name__)

CONNECTOR_TAG_ALARMS = frozenset({"tag_refused", "queue_revised", "queue_overflow", "delta_gap", "delta_unverified"})
"""Alarms a connector raises about one of its tags (id ``kind:machine/signal``, evidence ``connector``)."""

RESTART_ONLY = ("gateway", "mqtt", "store", "http")
"""Sections that cannot change while the gateway runs."""
STOP_TIMEOUT_S = 5.0


class ReloadRefused(Exception):
    def __init__(self, reason: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


@dataclass
class Plan:
    """What a reload changes. Connector sets are by id; machine sets by id."""

    machines_added: list[str] = field(default_factory=list)
    machines_removed: list[str] = field(default_factory=list)
    machines_changed: list[str] = field(default_factory=list)
    connectors_added: list[str] = field(default_factory=list)
    connectors_removed: list[str] = field(default_factory=list)
    connectors_restarted: list[str] = field(default_factory=list)
    logging_changed: bool = False

    @property
    def empty(self) -> bool:
        return not any((self.machines_added, self.machines_removed, self.machines_changed, self.connectors_added,
                        self.connectors_removed, self.connectors_restarted, self.logging_changed))

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v}


def changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted paths of the leaves that differ between two config sections (dumped to plain data)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{path}.{k}")
        elif a != b:
            out.append(path)

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), prefix)
    return out


def _tag_bindings(cfg: GatewayConfig) -> dict[str, dict[str, tuple[Any, ...]]]:
    """connector id -> {tag key: (address, signal)} as the gateway would bind them (order does not matter)."""
    out: dict[str, dict[str, tuple[Any, ...]]] = defaultdict(dict)
    for m in cfg.machines:
        signals: list[tuple[str, Any]] = list(m.counters.items())
        signals += [(f"material:{n}", b) for n, b in m.materials.items()]
        signals += [(n, t) for n, t in (("state", m.state), ("order", m.order_tag), ("operation", m.operation_tag),
                                       ("complete", m.complete_tag)) if t is not None]
        for signal, b in signals:
            out[b.connector][f"{m.id}/{signal}"] = (cfg.tag_address(m.id, signal), getattr(b, "mode", None))
    return out


def _connectors_of(m: Any) -> set[str]:
    used = {b.connector for b in [*m.counters.values(), *m.materials.values()]}
    return used | {t.connector for t in (m.state, m.order_tag, m.operation_tag, m.complete_tag) if t is not None}


def plan(old: GatewayConfig, new: GatewayConfig) -> Plan:
    """The difference between the running and the new config (raises ReloadRefused for restart-only changes)."""
    keys = [k for section in RESTART_ONLY for k in changed_keys(getattr(old, section), getattr(new, section), section)]
    if keys:
        raise ReloadRefused("needs_restart", "these keys cannot change while the gateway runs; restart it to apply "
                            "them (the running configuration stays)", fields=keys)
    p = Plan(logging_changed=old.logging != new.logging)
    om = {m.id: m for m in old.machines}
    nm = {m.id: m for m in new.machines}
    p.machines_added = [i for i in nm if i not in om]
    p.machines_removed = [i for i in om if i not in nm]
    for i in nm.keys() & om.keys():
        addr_old = {s: a for (mid, s), a in old._tag_addresses.items() if mid == i}
        addr_new = {s: a for (mid, s), a in new._tag_addresses.items() if mid == i}
        if nm[i] != om[i] or addr_old != addr_new:
            p.machines_changed.append(i)
    p.machines_changed.sort(key=list(nm).index)
    oc = {c.id: c for c in old.connectors}
    nc = {c.id: c for c in new.connectors}
    ob, nb = _tag_bindings(old), _tag_bindings(new)
    p.connectors_added = [i for i in nc if i not in oc]
    p.connectors_removed = [i for i in oc if i not in nc]
    # a changed machine's connectors restart too: at connect they tell its new engine the counter widths found on
    # the server (a counter without configured bits), which a fresh engine would not know
    of_changed = {cid for i in p.machines_changed for cid in _connectors_of(nm[i])}
    p.connectors_restarted = [i for i in nc if i in oc and (nc[i] != oc[i] or ob.get(i, {}) != nb.get(i, {})
                                                            or i in of_changed)]
    return p


class Reloader:
    """One reload of ``gw`` from ``path``: validate, plan, apply in the core task. Never raises for a bad file."""

    def __init__(self, gw: Gateway, path: str, *, log_overrides: tuple[str | None, str | None] = (None, None)) -> None:
        self.gw = gw
        self.path = path
        self.log_overrides = log_overrides

    async def reload(self) -> Plan | None:
        """The plan applied, or None when the reload was refused (logged; the running configuration stays)."""
        gw = self.gw
        await gw.started.wait()
        log.info("config.reload_started", file=self.path)
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            log.error("config.reload_failed", file=self.path, reason="invalid",
                      problems=[{"field": p.path, "line": p.line, "error": p.message} for p in exc.problems],
                      error=exc.render(), action="the running configuration stays")
            return None
        try:
            p = plan(gw.cfg, new)
            if p.empty:
                log.info("config.reload_unchanged", file=self.path)
                return p
            await gw.call_in_core(lambda: self._apply(new, p))
        except ReloadRefused as exc:
            log.error("config.reload_failed", file=self.path, reason=exc.reason, error=str(exc), **exc.detail,
                      action="the running configuration stays")
            return None
        log.info("config.reloaded", file=self.path, **p.as_dict())
        return p

    # ------------------------------------------------------------------ in the core task
    async def _apply(self, new: GatewayConfig, p: Plan) -> None:
        from gateway.core import Routes, checkpoint_interval
        from gateway.orders import PlcTagOrders
        from gateway.runtime import machine_specs
        from mappings.machine import MachineEngine

        gw = self.gw
        core = gw.core
        touched = set(p.machines_changed) | set(p.machines_removed)
        busy = sorted(m for m in touched if m in core.cuts)
        if busy:
            raise ReloadRefused("busy", "a changeover of these machines waits for its counter read; reload again when "
                                "it is done", machines=busy)
        if core.uncommitted:
            raise ReloadRefused("busy", "staged events wait for the store (commits are failing); reload again when "
                                "the store accepts commits", staged=len(core.uncommitted))
        # samples held for the order pair of a machine whose engine is rebuilt or removed: the switch and they are
        # applied now, to the engine whose snapshot the new one is built from (its tracker goes with the old wiring)
        held = touched & core.tags.pending
        if held:
            core.settle_order_tags(all_now=True, machines=held)
        # a faulted machine's engine is not trusted: reconfigured, it starts again from its last committed state
        refaulted = {m for m in p.machines_changed if m in core.faulted}
        stored = await gw.store.load_states() if p.machines_added or refaulted else {}
        # everything that can fail is built before anything is stopped or changed: routes, connectors, engines
        # (the core is in here, so no sample reaches the engines meanwhile)
        routes = Routes()
        bindings = gw._bind(new, routes)
        starting = {c.id: gw._make_connector(c, bindings.get(c.id, [])) for c in new.connectors
                    if c.id in p.connectors_added or c.id in p.connectors_restarted}
        old_specs, old_cfg = core.specs, gw.cfg
        new_specs = {s.id: s for s in machine_specs(new)}

        def build(mid: str, spec: Any) -> MachineEngine:
            old = core.engines.get(mid)
            if mid in p.machines_added or mid in refaulted:
                eng = MachineEngine(spec, stored.get(mid))
            elif mid in p.machines_changed and (old is None or old_specs.get(mid) != spec):
                eng = MachineEngine(spec, old.snapshot() if old is not None else None)
                if old is not None:
                    eng.dirty, eng.urgent = old.dirty, old.urgent
                    eng.keep_window_time(old)
            else:
                eng = old if old is not None else MachineEngine(spec)
            eng.hold_reports = core._full
            return eng

        engines = {mid: build(mid, spec) for mid, spec in new_specs.items()}
        # then the awaits; a cancellation (shutdown) in here leaves the running wiring as it was
        # a faulted engine's state is not trusted: its last committed state stays
        # the removed machines' states go with the events their held order switch just staged (settle_order_tags):
        # one commit of the core's, rows and states together, never a state without its events
        removing = [m for m in p.machines_removed if m in core.engines and m not in core.faulted]
        if removing or core.uncommitted:
            for m in removing:
                core.dirty.add(m)
            await core.commit(force=True)
            if core.uncommitted or core.commit_failing:
                raise ReloadRefused("busy", "the state of the removed machines could not be committed; reload again "
                                    "when the store accepts commits", error=core.commit_failing)
        stopping = [*p.connectors_removed, *p.connectors_restarted]
        old_tasks = {t.get_name(): t for t in getattr(gw, "_tasks", [])}
        waits = []
        late: list[Any] = []  # what the stopping connectors still hand on (a poll cut short: the blocks it has read)
        for cid in stopping:
            gw.connectors[cid].sink = late.append
            task = old_tasks.get(f"connector.{cid}")
            if task is not None:
                task.cancel()
                waits.append(task)
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            if pending:
                log.warning("config.reload_connector_slow_to_stop", connectors=sorted(t.get_name() for t in pending))
        for mid in p.machines_removed:
            core.dirty.discard(mid)  # its state was committed above
        if self._apply_read(late, touched):
            # the old engines of changed machines counted more: their new engines are built again from them
            for mid in p.machines_changed:
                if mid in new_specs and engines[mid] is not core.engines.get(mid):
                    engines[mid] = build(mid, new_specs[mid])
            gone = sorted(m for m in p.machines_removed
                          if m in core.engines and m not in core.faulted and core.engines[m].dirty)
            if gone or core.uncommitted:
                await core.commit(force=True)  # their states with what they staged (the core's commit)
                if core.uncommitted or core.commit_failing:
                    log.error("config.reload_state_not_saved", machines=gone, error=core.commit_failing,
                              action="what their connector read during the reload is not in their stored state")

        # ---- from here on: no await until every table is consistent again
        for mid in p.machines_removed:
            core.dirty.discard(mid)  # its state is committed
        for mid in touched:
            core.scheduled.pop(mid, None)  # its old timer heap entries are skipped
            core._frozen.discard(mid)
            if core.faulted.pop(mid, None) is not None:
                gw.alarms.clear(f"machine_faulted:{mid}",
                                reason="machine reconfigured" if mid in new_specs else "machine removed")
        for mid in core.faulted:  # still faulted: its samples stay ignored
            for key in [k for k, (m, _) in routes.signal.items() if m == mid]:
                del routes.signal[key]
        # order tags: unchanged machines keep their tracker (a switch pending on them stays pending)
        old_tags = core.tags
        tags = PlcTagOrders({m.id: m.order_source == "tag" for m in new.machines
                             if m.order_tag is not None or m.complete_tag is not None}, settle_s=old_tags.settle_s)
        for mid in list(tags.trackers):
            if mid in old_tags.trackers and mid not in p.machines_changed:
                tags.trackers[mid] = old_tags.trackers[mid]
                if mid in old_tags.pending and mid in tags.from_tags:
                    tags.pending.add(mid)
                    if mid in old_tags._settle_since:
                        tags._settle_since[mid] = old_tags._settle_since[mid]
            elif mid in engines:  # a new tracker knows the completion flag as the engine last saw it
                tags.trackers[mid].complete_level = engines[mid].complete_flag
        core.tags = tags
        core.routes = routes
        core.specs = gw.specs = new_specs
        core.engines = engines
        core.urgent.intersection_update(engines)
        core.urgent.update(m for m, e in engines.items() if e.urgent and e.dirty)
        core.dirty.update(m for m, e in engines.items() if e.dirty)
        core.checkpoint_s = checkpoint_interval(new_specs.values())
        gw._order_source.clear()  # shared with the MQTT and local order sources
        gw._order_source.update({m.id: m.order_source for m in new.machines})
        gw.cfg = new
        for mid in [*p.machines_added, *p.machines_changed]:
            core._schedule(mid)
        self._status_page(new)

        for cid in p.connectors_removed:
            del gw.connectors[cid]
        # what a stopped connector raised about its tags has nobody left to clear it; a restarted one raises again
        # at its next connect what still holds
        for alarm in gw.alarms.active():
            if alarm.id.partition(":")[0] in CONNECTOR_TAG_ALARMS and alarm.evidence.get("connector") in stopping:
                gw.alarms.clear(alarm.id, reason="its connector was stopped by a config reload")
        stopped = {f"connector.{c}" for c in stopping}
        tasks = [t for t in getattr(gw, "_tasks", []) if t.get_name() not in stopped]
        for cid, conn in starting.items():
            gw.connectors[cid] = conn
            tasks.append(gw._tg.create_task(gw._supervise(f"connector.{cid}", conn.run), name=f"connector.{cid}"))
        gw._tasks = tasks
        # the connectors dict keeps the config's order (status pages list them as configured)
        gw.connectors = {c.id: gw.connectors[c.id] for c in new.connectors}
        old_mqtt = {m.id for m in old_cfg.machines if m.order_source == "mqtt"}
        if any(m.order_source == "mqtt" and m.id not in old_mqtt for m in new.machines):
            self._resubscribe_dispatch()
        if p.logging_changed:
            from gateway import logs

            fmt, level = self.log_overrides
            with contextlib.suppress(Exception):
                logs.configure(fmt or new.logging.format, level or new.logging.level)

    def _apply_read(self, late: list[Any], touched: set[str]) -> bool:
        """Apply with the old wiring (its routes and engines) the readings waiting in the core's inbox and ``late``
        (what the stopping connectors handed on as they stopped: a poll cut short hands on the blocks it has read).
        A reading counts under the wiring it was read with (a tag the new config gives to another machine does not
        count there), and is not dropped: a reset-on-read register was cleared by that read
        (tests/test_reload_drain.py). The inbox is taken in order up to its first other item (an order command or a
        call may need the new wiring); from there on, ``late`` included, it waits for the new wiring. Returns whether
        anything was applied."""
        from mappings.samples import Readings

        core = self.gw.core
        for item in late:
            core.on_samples(item)
        inbox = core.inbox
        applied = False
        while inbox and isinstance(inbox[0], (list, Readings)):
            core._handle(inbox.popleft())
            applied = True
        held = touched & core.tags.pending  # a PLC-tag switch these readings started: applied to the old engine
        if held:
            core.settle_order_tags(all_now=True, machines=held)
        return applied or bool(held)

    def _status_page(self, new: GatewayConfig) -> None:
        """The status page's per-machine figures (gateway/statuspage.py): new machines get theirs, changed ones keep
        their history with their new connectors, removed ones go."""
        act = getattr(self.gw, "activity", None)
        if act is None or not hasattr(act, "_m"):
            return
        fresh = type(act)(new)._m
        # a machine's index tags its rows in the page's ring of recent rows: never reuse one
        next_index = max([getattr(act, "_reload_next_index", 0), *(getattr(m, "index", -1) + 1 for m in act._m.values())])
        for mid, m in fresh.items():
            kept = act._m.get(mid)
            if kept is not None:
                kept.connectors = m.connectors
                fresh[mid] = kept
            elif hasattr(m, "index"):
                m.index = next_index
                next_index += 1
        act._reload_next_index = next_index
        act._m = fresh
        act._staged = {m for m in act._staged if any(m is v for v in fresh.values())}

    def _resubscribe_dispatch(self) -> None:
        """A machine newly taking orders from MQTT: subscribe to the dispatch filter again, so the broker sends the
        retained dispatches again (MQTT 3.1.1 and 5, retain handling 0) and the new machine gets its current order,
        which was refused as 'unknown machine' before. The others get theirs again too: the same order is a no-op,
        as after any reconnect. Not connected: the next connect subscribes anyway."""
        topic = self.gw.topics.dispatch_filter()
        if self.gw.link.resubscribe(topic):
            log.info("config.reload_resubscribed", topic=topic)


# --------------------------------------------------------------------------------------------------------------
# the command side: `edge-gateway reload --config FILE` signals the gateway that runs on the config's store


class NotRunning(Exception):
    """No gateway holds the store's lock."""


def gateway_pid(store_path: str) -> int:
    """PID of the gateway that runs on ``store_path``: the holder of the flock on ``<store>.lock`` as the kernel lists
    it in /proc/locks (not merely the PID written in the file, which a crashed gateway leaves behind)."""
    import os

    lock = os.path.abspath(store_path) + ".lock"
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        raise NotRunning(f"no gateway runs on store {os.path.abspath(store_path)} (no lock file {lock})") from None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2149101 0 EOF" (a blocked waiter has "->" after the id)
                if "->" in parts:
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE" and parts[5] == dev:
                    return int(parts[4])
    except OSError:  # no /proc/locks: trust the file, if that process is alive
        with open(lock) as f:
            first = f.readline().strip()
        if first.isdigit() and os.path.exists(f"/proc/{first}"):
            return int(first)
    raise NotRunning(f"no gateway runs on store {os.path.abspath(store_path)} (nobody holds {lock})")


def started_with(pid: int, store_path: str) -> str | None:
    """The config file the gateway ``pid`` was started with (absolute), from the command line it wrote into the store
    lock (and its working directory for a relative path); None when it cannot be told."""
    import os
    import shlex

    try:
        with open(os.path.abspath(store_path) + ".lock") as f:
            first, _, command = f.read().partition("\n")
        if first.strip() != str(pid):
            return None
        args = shlex.split(command.strip())
    except (OSError, ValueError):
        return None
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            continue
        if not os.path.isabs(path):
            try:
                path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
            except OSError:
                return None
        return os.path.realpath(path)
    return None
