"""A machine whose engine raised (``machine_faulted``) keeps its last committed state: nothing of the engine after the
fault is committed, and the events it staged since that commit are dropped with it (the rows behind them take their
sequence numbers: no gap). After a restart the machine counts again from that state, so the parts of the report that
could not be made, or of a sample half applied, are counted again from the PLC's counter instead of lost.

Red before: the state the engine had after the fault was committed (with the window of a report whose encoding
failed already emptied, or a sample half applied), and a snapshot that raised ended the core's commit with it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.runtime import Gateway
from mappings.samples import Sample
from tests.e2e import IDENT

QTY = "operation.quantity_reported"


def _cfg(tmp: Path, m1_interval_s: float = 3600):
    def machine(m: str) -> dict[str, Any]:
        return {"id": m, "order_source": "mqtt",
                "counters": {"good": {"connector": "opc", "node_id": f"ns=2;s={m}.good", "max_rate": 1000}},
                "reporting": {"interval_s": m1_interval_s if m == "m1" else 3600}}
    return parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp / "gw.db")},
                         "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1"}],
                         "machines": [machine("m1"), machine("m2")]}, "<test>")


def _s(key: str, value: Any, t: float) -> Sample:
    return Sample(key, value, True, recv_time=t, source_time=t)


async def _start(cfg) -> Gateway:
    gw = Gateway(cfg)
    await gw.store.open()
    gw.core.restore(await gw.store.load_states(), gw.store.next_seq, EventEncoder(cfg.gateway, gw.topics,
                                                                                  gw.store.epoch))
    return gw


def _feed(gw: Gateway, *samples: Sample) -> None:
    gw.core.stage(gw.core.apply_samples(list(samples)))


def _flush(gw: Gateway, t: float) -> None:
    for m in ("m1", "m2"):
        if m not in gw.core.faulted:
            gw.core.stage(gw.engines[m].flush("test", t))


async def _outbox(gw: Gateway) -> list[dict[str, Any]]:
    out = []
    for r in await gw.store.export_rows("outbox"):
        p = r["payload"]
        out.append(p if isinstance(p, dict) else json.loads(p))
    return out


def _booked(events: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        if e["type"] == QTY:
            out[e["subject"]] = out.get(e["subject"], 0) + int(e["data"]["quantities"]["yield"])
    return out


async def _restart_and_count(gw: Gateway, cfg, t: float) -> list[dict[str, Any]]:
    """Stop ``gw``, start again on its store, read both counters at 15 once more and report: every event in the
    outbox of both generations, in sequence order."""
    await gw.store.close()
    gw2 = await _start(cfg)
    try:
        _feed(gw2, _s("m1/good", 15, t), _s("m2/good", 15, t))
        _flush(gw2, t + 1)
        await gw2.core.commit(force=True)
        assert not gw2.core.faulted
        events = await _outbox(gw2)
    finally:
        await gw2.store.close()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # no gap, nothing twice
    assert len({e["id"] for e in events}) == len(events)
    return events


async def _counted_to_15(cfg) -> Gateway:
    """Both machines counted 10 parts (committed, not reported yet), then 5 more (not committed)."""
    gw = await _start(cfg)
    _feed(gw, _s("m1/good", 0, 1), _s("m2/good", 0, 1))
    _feed(gw, _s("m1/good", 10, 2), _s("m2/good", 10, 2))
    await gw.core.commit(force=True)
    _feed(gw, _s("m1/good", 15, 3), _s("m2/good", 15, 3))
    return gw


async def test_a_report_that_cannot_be_encoded_is_counted_again_after_the_restart(tmp_path):
    cfg = _cfg(tmp_path)
    gw = await _counted_to_15(cfg)
    encoder = gw.core.encoder
    real = encoder.encode

    def encode(draft, seq):
        if draft.subject == "m1" and draft.type == QTY:
            raise ValueError("cannot encode")
        return real(draft, seq)

    encoder.encode = encode  # type: ignore[method-assign]
    _flush(gw, 4)
    assert set(gw.core.faulted) == {"m1"}
    await gw.core.commit(force=True)
    first = await _outbox(gw)
    assert _booked(first) == {"m2": 15}
    events = await _restart_and_count(gw, cfg, 5)
    assert _booked(events) == {"m1": 15, "m2": 15}


async def test_a_sample_half_applied_when_the_engine_raised_is_counted_again_after_the_restart(tmp_path):
    """The engine raised after it had taken part of a sample (here: all of it) and staged a report of m1 before:
    that report goes with the engine's state, not committed; its parts are counted again after the restart."""
    cfg = _cfg(tmp_path)
    gw = await _counted_to_15(cfg)
    _flush(gw, 4)  # both report 15, staged
    assert [e.machine for e in gw.core.uncommitted] == ["m1", "m2"]
    eng = gw.engines["m1"]
    real = eng.apply

    def half(sample, signal):
        real(sample, signal)
        raise ArithmeticError("engine bug")

    eng.apply = half  # type: ignore[method-assign]
    _feed(gw, _s("m1/good", 18, 5), _s("m2/good", 18, 5))
    assert set(gw.core.faulted) == {"m1"}
    _flush(gw, 6)
    await gw.core.commit(force=True)
    first = await _outbox(gw)
    assert _booked(first) == {"m2": 18}
    assert [e["seq"] for e in first] == list(range(first[0]["seq"], first[0]["seq"] + len(first)))
    events = await _restart_and_count(gw, cfg, 7)
    # m1 back at its committed state (10 counted, last value 10): 15 is 5 more; m2 saw 18 and then 15: a reset
    booked = _booked(events)
    assert booked["m1"] == 15 and "m1" not in _booked(first)


async def test_a_snapshot_that_raises_faults_its_machine_and_the_commit_goes_on(tmp_path):
    cfg = _cfg(tmp_path)
    gw = await _counted_to_15(cfg)
    _flush(gw, 4)
    eng = gw.engines["m1"]

    def boom() -> str:
        raise RecursionError("snapshot bug")

    eng.snapshot_json = boom  # type: ignore[method-assign]
    await gw.core.commit(force=True)  # red before: the error ended the commit (and the core task with it)
    assert set(gw.core.faulted) == {"m1"}
    assert not gw.core.uncommitted
    first = await _outbox(gw)
    assert _booked(first) == {"m2": 15}
    events = await _restart_and_count(gw, cfg, 5)
    assert _booked(events) == {"m1": 15, "m2": 15}


async def test_a_faulted_machine_reconfigured_by_a_reload_counts_again_from_its_committed_state(tmp_path):
    """A reload that changes the faulted machine clears its fault; its new engine starts from the state last
    committed, not from the engine that raised (red before: built from that engine's snapshot, the report's 15
    parts, already taken out of its window, were gone)."""
    from gateway.reload import Reloader, plan

    cfg = _cfg(tmp_path)
    gw = await _counted_to_15(cfg)
    try:
        encoder = gw.core.encoder
        real = encoder.encode
        encoder.encode = lambda d, seq: (_ for _ in ()).throw(ValueError("x")) if d.subject == "m1" else real(d, seq)
        _flush(gw, 4)
        encoder.encode = real  # type: ignore[method-assign]
        await gw.core.commit(force=True)
        assert set(gw.core.faulted) == {"m1"}
        new = _cfg(tmp_path, m1_interval_s=1800)
        p = plan(gw.cfg, new)
        assert set(p.machines_changed) == {"m1"}
        async with asyncio.TaskGroup() as tg:  # the reload restarts m1's connector (it cannot connect: stopped)
            gw._tg = tg
            await Reloader(gw, "reload")._apply(new, p)
            for t in gw._tasks:
                t.cancel()
        assert not gw.core.faulted
        _feed(gw, _s("m1/good", 15, 5))
        gw.core.stage(gw.engines["m1"].flush("test", 6))
        await gw.core.commit(force=True)
        assert _booked(await _outbox(gw)) == {"m1": 15, "m2": 15}
    finally:
        await gw.store.close()


async def test_a_faulted_machine_with_a_reset_on_read_counter_keeps_what_it_read(tmp_path):
    """A reset-on-read register was cleared when it was read: the engine holds the only copy. Such a machine's state
    at the fault is committed with what it staged, as before the rule above (red with the rule applied to every
    machine: the 5 parts were neither in an event nor in the stored state)."""
    cfg = parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
                        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1"}],
                        "machines": [{"id": "m1", "order_source": "mqtt", "reporting": {"interval_s": 3600},
                                      "counters": {"good": {"connector": "opc", "node_id": "ns=2;s=g",
                                                            "mode": "reset_on_read"}},
                                      "state": {"connector": "opc", "node_id": "ns=2;s=st"}}]}, "<test>")
    gw = await _start(cfg)
    try:
        eng = gw.engines["m1"]
        real = eng.apply

        def apply(sample, signal):  # a bug on the state sample (any engine exception)
            if signal == "state":
                raise RuntimeError("boom")
            return real(sample, signal)

        eng.apply = apply  # type: ignore[method-assign]
        _feed(gw, _s("m1/good", 5, 1.0), _s("m1/state", "RUN", 1.0))
        await gw.core.commit(force=True)
        assert set(gw.core.faulted) == {"m1"}
        stored = await gw.store.load_states()
        assert stored["m1"]["window"]["q"]["good"] == "5"
    finally:
        await gw.store.close()
