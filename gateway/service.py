"""Running under systemd: readiness, watchdog, status line and reload (``deploy/edge-gateway.service``).

The notification protocol of sd_notify(3) is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). It is written here (``notify()``, a dozen lines,
the standalone implementation the sd_notify(3) man page gives) rather than taken from a library: ``sdnotify`` on PyPI
has had no release since 2017 and drops errors silently, ``systemd-python`` is a C extension that needs the
libsystemd headers to build; the protocol itself is stable and documented.

What is sent, and when:

- ``READY=1`` once the gateway has started: store open (its lock taken), machine state restored, every component
  task started (``Gateway.started``). ``STATUS=`` with it.
- ``WATCHDOG=1`` only while the **core loop** makes progress: the pinger sends it when ``Gateway.core_heartbeat``
  (set by the core at every round) is younger than half the watchdog interval. The core is made to wake at least
  every quarter interval (``Core.tick_s``) so an idle gateway keeps pinging. A core stuck in an await (a hung
  commit) stops the pings while the rest of the process runs on; a blocked event loop stops them too; systemd then
  kills and restarts the service (``WatchdogSec=`` in the unit). A stall is logged once (``service.core_stalled``).
- ``STATUS=`` a one-line summary (machines connected, MQTT, outbox depth, alarms) whenever it changes.
- ``RELOADING=1`` on SIGHUP, then ``READY=1`` once the reload is done (applied or refused: see gateway/reload.py).
- ``STOPPING=1`` when the gateway shuts down.

Without ``$NOTIFY_SOCKET`` nothing is sent; SIGHUP reloads all the same.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from gateway.component import ComponentState

if TYPE_CHECKING:
    from gateway.runtime import Gateway

log = structlog.get_logger(__name__)

STATUS_EVERY_S = 2.0  # without a watchdog, how often the status line is refreshed (sent only when it changed)


def notify(message: str, *, socket_path: str | None = None) -> bool:
    """Send one sd_notify message (``"READY=1\\nSTATUS=..."``). False when there is no notify socket or the send
    failed (a notification is never worth stopping the gateway for)."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in ("/", "@"):
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("service.notify_failed", socket=path, error=str(exc))
        return False


def watchdog_interval() -> float | None:
    """The watchdog interval systemd asks for (``$WATCHDOG_USEC``, for this process per ``$WATCHDOG_PID``), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6


def status_line(gw: Gateway) -> str:
    """One line for ``systemctl status``: machines connected, MQTT, outbox depth, alarms."""
    connected = {cid for cid, c in gw.connectors.items() if c.status.state == ComponentState.CONNECTED}
    machines = gw.cfg.machines
    up = 0
    for m in machines:
        used = {b.connector for b in [*m.counters.values(), *m.materials.values()]}
        used |= {t.connector for t in (m.state, m.order_tag, m.operation_tag, m.complete_tag) if t is not None}
        up += used <= connected
    mqtt = "connected" if gw.link.status.state == ComponentState.CONNECTED else gw.link.status.state.value
    alarms = gw.alarms.ids()
    shown = ", ".join(alarms[:3]) + (f" (+{len(alarms) - 3})" if len(alarms) > 3 else "")
    return (f"machines {up}/{len(machines)} connected; mqtt {mqtt}; outbox {gw.store.pending} pending; "
            f"alarms: {shown or 'none'}")


class Service:
    """systemd notifications and SIGHUP reload around one running ``Gateway`` (see the module docstring)."""

    def __init__(self, gw: Gateway, *, config_path: str | None = None,
                 log_overrides: tuple[str | None, str | None] = (None, None)) -> None:
        self.gw = gw
        self.config_path = config_path
        self.log_overrides = log_overrides
        self.watchdog_s = watchdog_interval()
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._last_status: str | None = None
        self._stalled = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self.reloads = 0
        if self.watchdog_s is not None:
            gw.core.tick_s = self.watchdog_s / 4

    async def run(self) -> None:
        """Run ``gw.run()`` with the notifications and the SIGHUP handler; returns (or raises) as it does."""
        loop = asyncio.get_running_loop()
        gw_task = asyncio.ensure_future(self.gw.run())
        helper = asyncio.ensure_future(self._notifier(gw_task))
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await gw_task
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            if self.enabled:
                notify("STOPPING=1\nSTATUS=stopping")
            helper.cancel()
            for t in (helper, self._reload_task):
                if t is not None and not t.done():
                    t.cancel()
            if not gw_task.done():
                gw_task.cancel()

    # ------------------------------------------------------------------ notifications
    async def _notifier(self, gw_task: asyncio.Future[Any]) -> None:
        started = asyncio.ensure_future(self.gw.started.wait())
        await asyncio.wait({started, gw_task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            return
        line = status_line(self.gw)
        self._last_status = line
        if self.enabled:
            notify(f"READY=1\nSTATUS={line}\nMAINPID={os.getpid()}")
        log.info("service.ready", notify=self.enabled, watchdog_s=self.watchdog_s, status=line)
        period = self.watchdog_s / 4 if self.watchdog_s is not None else STATUS_EVERY_S
        while True:
            await asyncio.sleep(period)
            self.tick()

    def tick(self) -> None:
        """One pinger round: WATCHDOG=1 if the core made progress lately, STATUS= if it changed."""
        msgs = []
        if self.watchdog_s is not None:
            age = time.monotonic() - self.gw.core_heartbeat
            if age < self.watchdog_s / 2:
                msgs.append("WATCHDOG=1")
                if self._stalled:
                    self._stalled = False
                    log.info("service.core_recovered")
            elif not self._stalled:
                self._stalled = True
                log.error("service.core_stalled", since_s=round(age, 3), watchdog_s=self.watchdog_s,
                          action="watchdog pings stopped: systemd restarts the gateway after WatchdogSec")
        line = status_line(self.gw)
        if self._stalled:
            line = f"core loop stalled for {time.monotonic() - self.gw.core_heartbeat:.1f} s; " + line
        if line != self._last_status:
            self._last_status = line
            msgs.append(f"STATUS={line}")
        if msgs and self.enabled:
            notify("\n".join(msgs))

    # ------------------------------------------------------------------ reload (SIGHUP)
    def request_reload(self) -> None:
        """SIGHUP: re-read the config (one reload at a time; a SIGHUP during a reload runs one more after it)."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.ensure_future(self._reload())

    async def _reload(self) -> None:
        from gateway.reload import Reloader

        while True:
            self._reload_again = False
            if self.enabled:
                notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\n"
                       "STATUS=reloading the configuration")
            try:
                if self.config_path is None:
                    log.error("config.reload_failed", reason="no_config_file", error="started without a config file")
                else:
                    await Reloader(self.gw, self.config_path, log_overrides=self.log_overrides).reload()
            except Exception as exc:  # a reload must never take the gateway down
                log.error("config.reload_failed", file=self.config_path, reason="internal",
                          error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            self.reloads += 1
            line = status_line(self.gw)
            self._last_status = line
            if self.enabled:
                notify(f"READY=1\nSTATUS={line}")
            if not self._reload_again:
                return
