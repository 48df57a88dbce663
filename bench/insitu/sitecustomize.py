"""In-situ cost per call of the gateway's hot functions, for ``bench/ab_gateway.py --insitu`` (a developer's tool).

Python imports ``sitecustomize`` at start when its folder is on PYTHONPATH; ``ab_gateway.py --insitu`` puts this
folder there and sets ``EDGE_GATEWAY_INSITU_OUT``. Once ``gateway.runtime`` is imported, the functions in ``HOT`` are
wrapped to add their ``time.thread_time()`` (CPU of the calling thread) and call count to totals, which a thread
writes to that file every second as one JSON line ``{"t": wall time, "cpu_s": {...}, "calls": {...}}``. Nested
wrapped calls are counted in both (a caller's figure includes its callees'); each wrapper adds ~0.5 µs per call.
The cyclic garbage collector's passes are timed too (``gc.gen0`` ... ``gc.gen2``, from ``gc.callbacks``).
Without the variable nothing is patched."""

from __future__ import annotations

import builtins
import collections
import gc
import importlib
import json
import os
import sys
import threading
import time

HOT = [
    ("gateway.core", "Core", ["round", "run_timers", "stage", "apply_readings", "_schedule"]),
    ("mappings.machine", "MachineEngine", ["tick", "flush", "_flush_pending", "_fold", "snapshot_json"]),
    ("gateway.events", "EventEncoder", ["encode"]),
    ("gateway.statuspage", "Activity", ["staged", "committed"]),
    ("gateway.mqtt", "Publisher", ["notify", "_on_puback"]),
    ("gateway.paho_fast", "FastClient", ["publish_fast"]),
    ("connectors.modbus.connector", "ModbusConnector", ["_run", "_changed"]),
    ("aiosqlite.core", "Connection", ["_execute"]),  # async: the call count is the round trips to SQLite's thread
    ("gateway.mqtt", "Publisher", ["_send", "_acknowledged"]),
    ("gateway.paho_fast", "FastClient", ["loop_read", "_handle_packets"]),
    ("pymodbus.transport.transport", "ModbusProtocol", ["data_received"]),
    ("pymodbus.transaction.transaction", "TransactionManager", ["pdu_send"]),
]
#: Coroutine functions timed step by step (each resumption's thread time, summed over the coroutine's life; the
#: call count is the coroutines made): what they spend while they run, not while they wait.
HOT_ASYNC = [
    ("gateway.core", "Core", ["commit"]),
    ("gateway.store", "Store", ["commit", "ack", "_write"]),
    ("gateway.mqtt", "Publisher", ["_fill", "flush_acks", "_settle"]),
    ("connectors.modbus.connector", "ModbusConnector", ["poll_once", "_read_block"]),
]

OUT = os.environ.get("EDGE_GATEWAY_INSITU_OUT")
_cpu: collections.Counter[str] = collections.Counter()
_calls: collections.Counter[str] = collections.Counter()


def _patch() -> None:
    tt = time.thread_time

    def timed(fn, key):  # type: ignore[no-untyped-def]
        def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
            t = tt()
            try:
                return fn(*a, **kw)
            finally:
                _cpu[key] += tt() - t
                _calls[key] += 1

        return wrapped

    class Timed:
        """Awaitable proxy of a coroutine: adds the thread time of each of its steps to ``key``."""

        __slots__ = ("coro", "key")

        def __init__(self, coro, key):  # type: ignore[no-untyped-def]
            self.coro, self.key = coro, key

        def __await__(self):  # type: ignore[no-untyped-def]
            it = self.coro.__await__()
            value, exc = None, None
            while True:
                t = tt()
                try:
                    y = it.send(value) if exc is None else it.throw(exc)
                except StopIteration as stop:
                    return stop.value
                finally:
                    _cpu[self.key] += tt() - t
                try:
                    value, exc = (yield y), None
                except BaseException as e:  # noqa: BLE001 - handed on to the coroutine
                    value, exc = None, e

    def timed_async(fn, key):  # type: ignore[no-untyped-def]
        async def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
            _calls[key] += 1
            return await Timed(fn(*a, **kw), key)

        return wrapped

    for table, wrap in ((HOT, timed), (HOT_ASYNC, timed_async)):
        for mod, cls_name, names in table:
            cls = getattr(importlib.import_module(mod), cls_name)
            for name in names:
                fn = getattr(cls, name, None)
                if fn is not None:
                    setattr(cls, name, wrap(fn, f"{cls_name}.{name}"))

    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # the collector's own time, per generation
        if phase == "start":
            gc_start[0] = tt()
        else:
            key = f"gc.gen{info['generation']}"
            _cpu[key] += tt() - gc_start[0]
            _calls[key] += 1

    gc.callbacks.append(on_gc)

    def dump() -> None:
        while True:
            time.sleep(1.0)
            line = json.dumps({"t": time.time(), "cpu_s": dict(_cpu), "calls": dict(_calls)})
            with open(OUT, "a") as fh:  # type: ignore[arg-type]
                fh.write(line + "\n")

    threading.Thread(target=dump, name="insitu", daemon=True).start()


if OUT:
    _import = builtins.__import__

    def _hook(name, *a, **kw):  # type: ignore[no-untyped-def]
        m = _import(name, *a, **kw)
        rt = sys.modules.get("gateway.runtime")
        if rt is not None and hasattr(rt, "Gateway"):
            builtins.__import__ = _import
            _patch()
        return m

    builtins.__import__ = _hook
