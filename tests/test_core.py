"""The core loop: staging, PLC-tag changeover at the sample boundary, fault containment, bounded input.

These drive the real ``Gateway`` core methods synchronously (no connector, broker or store I/O is involved in what
they check): samples in, staged outbox rows out, decoded back to events. End-to-end versions of the same rules run
against the simulators in tests/test_order_sources.py, tests/test_scenarios.py and tests/test_core_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway import core
from gateway.config import parse_config
from gateway.events import EventEncoder
from gateway.orders import OrderCommand
from gateway.runtime import Gateway
from mappings.machine import OrderContext
from mappings.samples import Sample
from tests.e2e import IDENT, wait_until


def tag(node: str) -> dict[str, Any]:
    return {"connector": "opc", "node_id": f"ns=2;s={node}"}


def make_gateway(tmp_path, *, order_source: str = "tag", complete: bool = True, mode: str = "cumulative",
                 machines: tuple[str, ...] = ("m1",), interval_s: float = 3600) -> Gateway:
    ms = []
    for m in machines:
        doc: dict[str, Any] = {"id": m, "order_source": order_source,
                               "counters": {"good": {**tag(f"{m}.good"), "max_rate": 1000, "mode": mode}},
                               "reporting": {"interval_s": interval_s}}
        if order_source == "tag":
            doc["order_tag"] = tag(f"{m}.order")
            doc["operation_tag"] = tag(f"{m}.op")
        if complete:
            doc["complete_tag"] = tag(f"{m}.complete")
        ms.append(doc)
    cfg = parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
                        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1"}],
                        "machines": ms}, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    return gw


def s(key: str, value: Any, t: float) -> Sample:
    return Sample(key, value, True, recv_time=t, source_time=t)


def feed(gw: Gateway, *batches: list[Sample]) -> None:
    for b in batches:
        gw.core.stage(gw.core.apply_samples(b))


def staged(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(r.payload) for r in gw.core.uncommitted]


def booked(gw: Gateway) -> dict[tuple[str | None, str | None], int]:
    """Yield per (order, operation) in the staged quantity reports, plus completions as ('completed', order)."""
    out: dict[Any, int] = {}
    for ev in staged(gw):
        d = ev["data"]
        if ev["type"] == "operation.quantity_reported":
            out[(d["order"], d["operation"])] = out.get((d["order"], d["operation"]), 0) + int(d["quantities"]["yield"])
        elif ev["type"] == "operation.completed":
            out[("completed", d["order"])] = int(d["totals"]["yield"])
    return out


def test_tag_changeover_same_scan_counters_and_complete_go_to_the_old_order(tmp_path):
    """One Modbus-like scan (one time for every sample) shows the new order tags, the completion flag rising and
    the counter advanced: the counts and the completion belong to the old order, the switch follows the scan."""
    gw = make_gateway(tmp_path)
    feed(gw, [s("m1/good", 100, 10), s("m1/order", "A", 10), s("m1/operation", "10", 10), s("m1/complete", 0, 10)])
    assert gw.engines["m1"].context is None  # the switch follows the scan: before the next sample
    # same scan: counter +5, complete rises, order tags switch to B/20 (in any order inside the batch)
    feed(gw, [s("m1/order", "B", 11), s("m1/complete", 1, 11), s("m1/operation", "20", 11), s("m1/good", 105, 11)])
    feed(gw, [s("m1/good", 107, 12)])
    gw.core.stage(gw.engines["m1"].flush("test", 13))
    assert booked(gw) == {("A", "10"): 5, ("completed", "A"): 5, ("B", "20"): 2}
    started = [e["data"]["order"] for e in staged(gw) if e["type"] == "operation.started"]
    assert started == ["A", "B"]
    assert gw.engines["m1"].context.ref == ("B", "20")


def test_tag_changeover_with_source_times_switches_at_the_exact_sample(tmp_path):
    """OPC UA delivers source timestamps: counts stamped before the order tag's change go to the old order, counts
    stamped after it to the new one, whatever their position in the notification batch."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 10, 2.0)])
    # one notification batch, out of time order: 13 @2.5 (old), tags @3.0, 20 @3.5 (new), 25 @4.0 (new)
    feed(gw, [s("m1/good", 25, 4.0), s("m1/order", "B", 3.0), s("m1/good", 13, 2.5), s("m1/operation", "20", 3.0),
              s("m1/good", 20, 3.5)])
    gw.core.stage(gw.engines["m1"].flush("test", 5))
    assert booked(gw) == {("A", "10"): 13, ("B", "20"): 12}


def test_half_written_tag_pair_waits_and_settles_without_samples(tmp_path, monkeypatch):
    """Order and operation tags arriving in separate batches with the same time switch once, to the full pair;
    a machine that then makes nothing still switches once the change has settled."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/order", "B", 2)])
    feed(gw, [s("m1/operation", "20", 2)])
    assert gw.engines["m1"].context.ref == ("A", "10")  # no later sample yet: still pending
    monkeypatch.setattr(gw.core.tags, "settle_s", 0.0)
    gw.core.settle_order_tags()
    gw.core.settle_order_tags()
    assert gw.engines["m1"].context.ref == ("B", "20")
    assert [e["data"]["order"] for e in staged(gw) if e["type"] == "operation.started"] == ["A", "B"]


def _started(gw: Gateway) -> list[tuple[str, str]]:
    return [(e["data"]["order"], e["data"]["operation"]) for e in staged(gw) if e["type"] == "operation.started"]


def test_order_and_operation_tags_written_in_two_scans_make_one_changeover(tmp_path):
    """The PLC writes the new order at 3.0 and its operation one scan later, at 3.1, and a part is counted at 3.05,
    between the two. One changeover, to B/20, with that part: no operation.started for B/10, an operation the ERP
    never dispatched, and no part booked to it. Red before: B/10 started (a phantom) and got the part."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 10, 2.0)])
    feed(gw, [s("m1/order", "B", 3.0)])
    feed(gw, [s("m1/good", 11, 3.05)])
    feed(gw, [s("m1/operation", "20", 3.1)])
    feed(gw, [s("m1/good", 14, 4.0)])
    gw.core.stage(gw.engines["m1"].flush("test", 5))
    assert _started(gw) == [("A", "10"), ("B", "20")]
    assert booked(gw) == {("A", "10"): 10, ("B", "20"): 4}


def test_a_new_order_with_the_same_operation_switches_with_every_part_after_it(tmp_path):
    """Only the order tag changes (the operation number stays 10: the usual case). Whether the operation tag follows
    can only be known a moment later (ORDER_PAIR_WINDOW_S of sample time); the parts counted meanwhile wait, and go
    to the new order as they were made after its tag changed."""
    gw = make_gateway(tmp_path, complete=False)
    from gateway.orders import ORDER_PAIR_WINDOW_S as w
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 10, 2.0)])
    feed(gw, [s("m1/order", "B", 3.0), s("m1/good", 11, 3.0)])  # same scan: that part is A's
    feed(gw, [s("m1/good", 12, 3.0 + w / 2)])
    assert gw.engines["m1"].context.ref == ("A", "10")  # waiting for the operation tag
    feed(gw, [s("m1/good", 15, 3.0 + w + 0.5)])
    gw.core.stage(gw.engines["m1"].flush("test", 10))
    assert _started(gw) == [("A", "10"), ("B", "10")]
    assert booked(gw) == {("A", "10"): 11, ("B", "10"): 4}


def test_a_new_order_alone_on_an_idle_machine_switches_once_the_pair_window_passed(tmp_path, monkeypatch):
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 3, 1.5)])
    feed(gw, [s("m1/order", "B", 3.0)])
    gw.core.settle_order_tags()
    assert gw.engines["m1"].context.ref == ("A", "10")
    monkeypatch.setattr(gw.core.tags, "pair_wait_s", 0.0)
    monkeypatch.setattr(gw.core.tags, "settle_s", 0.0)
    gw.core.settle_order_tags()
    gw.core.settle_order_tags()
    assert gw.engines["m1"].context.ref == ("B", "10")
    assert _started(gw) == [("A", "10"), ("B", "10")]


def test_quick_changeovers_of_the_order_tag_alone_with_completions_are_exact(tmp_path):
    """Changeovers faster than the pair window: the order tag changes again before the window has passed. The
    operation did not follow, so the earlier change stands alone and is applied first, with the parts and the
    completion made under it; a completion in the same scan as an order change belongs to the order before it."""
    gw = make_gateway(tmp_path)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1), s("m1/complete", 0, 1)])
    feed(gw, [s("m1/good", 5, 2.0)])
    feed(gw, [s("m1/complete", 1, 3.0), s("m1/order", "B", 3.0)])  # A completed, B shown, in one scan
    feed(gw, [s("m1/complete", 0, 3.05), s("m1/good", 7, 3.1)], [s("m1/good", 9, 3.2)])
    feed(gw, [s("m1/order", "C", 3.25), s("m1/complete", 1, 3.25)])  # B completed, C shown, in one scan
    feed(gw, [s("m1/complete", 0, 3.3), s("m1/good", 10, 3.4)])
    feed(gw, [s("m1/good", 12, 9.0)])
    gw.core.stage(gw.engines["m1"].flush("test", 10))
    assert _started(gw) == [("A", "10"), ("B", "10"), ("C", "10")]
    assert booked(gw) == {("A", "10"): 5, ("completed", "A"): 5, ("B", "10"): 4, ("completed", "B"): 4,
                          ("C", "10"): 3}


def test_samples_held_for_an_order_pair_are_applied_at_a_stop(tmp_path):
    """The gateway stops while samples wait for the operation tag: the switch is applied, then they (a delta or
    reset-on-read value would not come again)."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/order", "B", 3.0)], [s("m1/good", 4, 3.5)])
    assert gw.engines["m1"].context.ref == ("A", "10")
    gw.core.drain()
    gw.core.stage(gw.engines["m1"].flush("test", 10))
    assert _started(gw) == [("A", "10"), ("B", "10")]
    assert booked(gw) == {("B", "10"): 4}


def test_a_reload_applies_the_samples_held_for_the_machines_it_rebuilds(tmp_path):
    """A reload rebuilds a changed machine's engine from its snapshot and drops its order-tag tracker: what the
    tracker holds is applied first (gateway/reload.py), for those machines only; another machine's pending pair
    keeps waiting for its operation tag."""
    gw = make_gateway(tmp_path, complete=False, machines=("m1", "m2"))
    for m in ("m1", "m2"):
        feed(gw, [s(f"{m}/good", 0, 1), s(f"{m}/order", "A", 1), s(f"{m}/operation", "10", 1)])
        feed(gw, [s(f"{m}/order", "B", 3.0)], [s(f"{m}/good", 4, 3.5)])
    gw.core.settle_order_tags(all_now=True, machines={"m1"})
    assert gw.engines["m1"].context.ref == ("B", "10")
    assert gw.engines["m2"].context.ref == ("A", "10") and "m2" in gw.core.tags.pending
    gw.core.stage(gw.engines["m1"].flush("test", 10))
    assert booked(gw) == {("B", "10"): 4}


def test_an_order_tag_ends_at_its_first_nul(tmp_path):
    """A PLC string read over OPC UA may carry its padding: the order number ends at the first NUL (a NUL in an
    event made the ERP posting service unable to store it)."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "4711\x00\x00\x00", 1), s("m1/operation", " 0010\x00x", 1)])
    feed(gw, [s("m1/good", 2, 2)])
    assert gw.engines["m1"].context.ref == ("4711", "0010")


def test_an_order_tag_with_a_control_character_is_no_order(tmp_path):
    """A PLC order or operation tag whose text (after the NUL cut) holds a control character (C0, DEL or C1) is no
    order number: no order of that name (red before the contract's pattern: the tag became the order, an event the
    contract refuses). The tag no longer shows the order in force either, so the counts from that scan on are
    reported unassigned (an earlier version kept them with the old order). Each text is logged once, naming the
    tag; a good pair afterwards switches as usual."""
    import structlog

    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 5, 2)])
    with structlog.testing.capture_logs() as logs:
        feed(gw, [s("m1/order", "B\x01", 3)], [s("m1/good", 7, 4)])
        feed(gw, [s("m1/order", "B\x01", 5)], [s("m1/good", 8, 6)])  # the same value again: logged once
        feed(gw, [s("m1/operation", "20\x85\x00pad", 7)], [s("m1/good", 9, 8)])  # C1 before the NUL
        feed(gw, [s("m1/order", "\x9bB", 9), s("m1/operation", "2\x7f0", 9)], [s("m1/good", 10, 10)])
    assert gw.engines["m1"].context is None
    refused = [(e["signal"], e["value"]) for e in logs if e["event"] == "order_tag.refused"]
    assert refused == [("order", repr("B\x01")), ("operation", repr("20\x85")), ("order", repr("\x9bB")),
                       ("operation", repr("2\x7f0"))]  # escaped: a C1 CSI in a log line is a terminal escape
    assert all(e["machine"] == "m1" and e["log_level"] == "warning" and "control character" in e["reason"]
               for e in logs if e["event"] == "order_tag.refused")
    assert not any(e["event"] == "order.applied" and e.get("order") not in (None, "A", "B") for e in logs)
    feed(gw, [s("m1/order", "B", 11), s("m1/operation", "20", 11)], [s("m1/good", 12, 12)])
    assert gw.engines["m1"].context.ref == ("B", "20")
    gw.core.stage(gw.engines["m1"].flush("test", 13))
    assert _started(gw) == [("A", "10"), ("B", "20")]
    assert booked(gw) == {("A", "10"): 5, (None, None): 5, ("B", "20"): 2}


def test_a_pair_change_with_an_unusable_order_tag_counts_unassigned_not_to_a_mixed_pair(tmp_path):
    """The PLC writes a new order pair and the order tag's text is unusable (a control character) while the
    operation tag changes: which order the machine runs is not known, so its counts are reported unassigned, never
    to the old order with the new operation (red before: booked to ("A", "20") after the pair window). The order
    tag's next usable text is a change even when it is the old order: ("A", "20") is then a new pair."""
    import structlog

    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 5, 2)])
    with structlog.testing.capture_logs() as logs:
        feed(gw, [s("m1/order", "B\x01", 3), s("m1/operation", "20", 3)])
        feed(gw, [s("m1/good", 7, 4)], [s("m1/good", 9, 6)])  # held within the pair window, then applied
    assert gw.engines["m1"].context is None
    assert [(e["machine"], e["refused"]) for e in logs if e["event"] == "order_tag.unassigned"] == [("m1", ["order"])]
    feed(gw, [s("m1/order", "A", 7)], [s("m1/good", 10, 8)], [s("m1/good", 12, 10)])
    assert gw.engines["m1"].context.ref == ("A", "20")
    gw.core.stage(gw.engines["m1"].flush("test", 11))
    assert booked(gw) == {("A", "10"): 5, (None, None): 4, ("A", "20"): 3}
    assert _started(gw) == [("A", "10"), ("A", "20")]


def test_an_unusable_order_tag_alone_counts_unassigned_not_to_the_old_order(tmp_path):
    """The order tag alone changes to a text with a control character (a good read: the PLC shows something that is
    not an order number) and the operation tag stays. The machine no longer shows order A, and which order it runs is
    not known: its counts after that scan are reported unassigned, not booked to A (red before: the refused text
    changed nothing and the 4 parts went to ("A", "10")). The same text again is not a second change; the tag's next
    usable text is, even when it is A again."""
    import structlog

    from gateway.orders import ORDER_PAIR_WINDOW_S as w

    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 5, 2)])
    with structlog.testing.capture_logs() as logs:
        feed(gw, [s("m1/order", "A\x7f", 3), s("m1/operation", "10", 3), s("m1/good", 5, 3)])
        feed(gw, [s("m1/good", 7, 3 + w + 0.5)])  # held while the operation tag may still follow, then applied
        feed(gw, [s("m1/order", "A\x7f", 4 + w), s("m1/good", 9, 4 + w)])
    assert gw.engines["m1"].context is None
    assert [(e["machine"], e["refused"]) for e in logs if e["event"] == "order_tag.unassigned"] == [("m1", ["order"])]
    assert [e["signal"] for e in logs if e["event"] == "order_tag.refused"] == ["order"]  # once per text
    feed(gw, [s("m1/order", "A", 5 + w)], [s("m1/good", 10, 5 + 2 * w + 1)], [s("m1/good", 12, 6 + 3 * w)])
    assert gw.engines["m1"].context.ref == ("A", "10")
    gw.core.stage(gw.engines["m1"].flush("test", 7 + 3 * w))
    assert booked(gw) == {("A", "10"): 5 + 3, (None, None): 4}
    assert _started(gw) == [("A", "10"), ("A", "10")]


def test_an_order_tag_unusable_for_one_scan_leaves_the_order_as_it_was(tmp_path):
    """The order tag shows an unusable text and, within the pair window, its old usable text again (a string read
    while the PLC rewrote it): the order pair did not change, the counts stay with it and no changeover is made."""
    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 5, 2)])
    feed(gw, [s("m1/order", "A\x01", 3), s("m1/good", 6, 3)])
    feed(gw, [s("m1/order", "A", 3.1), s("m1/good", 7, 3.1)], [s("m1/good", 9, 10)])
    assert gw.engines["m1"].context.ref == ("A", "10")
    gw.core.stage(gw.engines["m1"].flush("test", 11))
    assert booked(gw) == {("A", "10"): 9}
    assert _started(gw) == [("A", "10")]


def test_a_faulting_engine_stops_its_machine_only(tmp_path):
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=("m1", "m2"))
    faults0 = REGISTRY.get_sample_value("edge_gateway_machine_faults_total")
    feed(gw, [s("m1/good", 0, 1), s("m2/good", 0, 1)])

    def boom(sample, signal):
        raise ArithmeticError("engine bug")

    gw.engines["m1"].apply = boom  # type: ignore[method-assign]
    feed(gw, [s("m1/good", 5, 2), s("m2/good", 7, 2)], [s("m1/good", 9, 3), s("m2/good", 9, 3)])
    gw.core.stage(gw.engines["m2"].flush("test", 4))
    assert booked(gw) == {(None, None): 9}
    assert [e["subject"] for e in staged(gw)] == ["m2"]
    st = gw.status()
    assert "machine_faulted:m1" in st["alarms"] and not st["healthy"]
    assert st["machines"]["m1"]["faulted"] == "ArithmeticError: engine bug"
    assert st["machines"]["m2"]["faulted"] is None
    assert REGISTRY.get_sample_value("edge_gateway_machine_faults_total") - faults0 == 1


def test_bounded_inbox_coalesces_cumulative_samples_only(tmp_path, monkeypatch):
    """Under overload the inbox keeps only the latest value of each cumulative counter (it carries the delta);
    nothing is lost: the quantities booked are the same as without coalescing."""
    monkeypatch.setattr(core, "MAX_QUEUED_SAMPLES", 50)
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=("m1", "m2"))
    coalesced0 = REGISTRY.get_sample_value("edge_gateway_input_coalesced_samples_total")
    for i in range(200):
        gw.core.on_samples([s("m1/good", i, 1 + i * 0.01), s("m2/good", 2 * i, 1 + i * 0.01)])
    assert gw.core.queued_samples <= 50 + 2
    assert gw.stats.samples_coalesced > 300
    assert REGISTRY.get_sample_value("edge_gateway_input_coalesced_samples_total") - coalesced0 == \
        gw.stats.samples_coalesced
    while gw.core.inbox:
        item = gw.core.inbox.popleft()
        gw.core.queued_samples -= len(item)
        feed(gw, item)
    gw.core.stage(gw.engines["m1"].flush("test", 9))
    gw.core.stage(gw.engines["m2"].flush("test", 9))
    totals = {e["subject"]: int(e["data"]["quantities"]["yield"]) for e in staged(gw)}
    # the first sample of each counter is its baseline
    assert totals == {"m1": 199, "m2": 398}


@pytest.mark.parametrize("values", [
    [1000, 1010, 1020, 3, 50, 1200],  # a reset (or a preset) in the middle: 20 + 3 + 1197 parts
    [1000, 1010, 1011, 3, 4, 5, 2, 1200, 1300],  # two of them
])
def test_bounded_inbox_keeps_a_counter_reset(tmp_path, monkeypatch, values):
    """A cumulative counter that goes back (a reset, a preset) between queued samples: the value after it does not
    carry the deltas before it. Coalesced, the quantities booked are those without coalescing."""
    def book(coalesce: bool, name: str) -> dict[Any, int]:
        monkeypatch.setattr(core, "MAX_QUEUED_SAMPLES", 2 if coalesce else 10_000)
        gw = make_gateway(tmp_path / name, order_source="mqtt", complete=False)
        for i, v in enumerate(values):
            gw.core.on_samples([s("m1/good", v, 1 + i)])
        if coalesce:
            assert gw.stats.samples_coalesced > 0
        while gw.core.inbox:
            item = gw.core.inbox.popleft()
            gw.core.queued_samples -= len(item)
            feed(gw, item)
        gw.core.stage(gw.engines["m1"].flush("test", 99))
        return booked(gw)

    assert book(True, "coalesced") == book(False, "as read")


def test_bounded_inbox_keeps_every_delta_value(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "MAX_QUEUED_SAMPLES", 50)
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, mode="delta")
    for i in range(100):
        gw.core.on_samples([s("m1/good", 1, 1 + i)])
    assert gw.core.queued_samples == 100  # nothing to coalesce: every delta value counts
    while gw.core.inbox:
        feed(gw, gw.core.inbox.popleft())
    gw.core.stage(gw.engines["m1"].flush("test", 999))
    assert booked(gw) == {(None, None): 100}


@pytest.mark.parametrize("batches", [1, 3])
def test_idle_machines_have_no_timer_and_cost_no_commit(tmp_path, batches):
    """A machine whose counters do not change gets no timer and no snapshot."""
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=("m1", "m2"))
    feed(gw, [s("m1/good", 0, 1), s("m2/good", 0, 1)])
    gw.core.dirty.clear()
    for e in gw.engines.values():
        e.dirty = False
    for i in range(batches):
        feed(gw, [s("m1/good", 0, 2 + i), s("m2/good", 3 + i, 2 + i)])
    assert "m1" not in gw.core.scheduled and "m2" in gw.core.scheduled
    assert "m2" in gw.core.dirty


async def test_urgent_state_is_committed_at_once_without_a_checkpoint(tmp_path):
    """A delta value exists nowhere else once read (the device forgot it): the machine's state is committed by the
    next commit, not at the checkpoint; a machine whose plain counter moved waits for the checkpoint. The core finds
    them through its ``urgent`` set, without looking at every dirty engine."""
    import time as _time

    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, mode="delta", machines=("m1",))
    gw2 = make_gateway(tmp_path / "b", order_source="mqtt", complete=False, machines=("m2",))
    for g in (gw, gw2):
        await g.store.open()
        g.core._last_checkpoint = _time.monotonic()  # no checkpoint due in this test
    try:
        feed(gw2, [s("m2/good", 0, 1)])  # a first value (baseline) is urgent too
        await gw2.core.commit()
        before = (await gw2.store.load_states())["m2"]
        feed(gw, [s("m1/good", 5, 1)])
        feed(gw2, [s("m2/good", 7, 2)])
        assert gw.core.urgent == {"m1"} and not gw2.core.urgent
        await gw.core.commit()
        await gw2.core.commit()
        assert "m1" in await gw.store.load_states()
        assert (await gw2.store.load_states())["m2"] == before and "m2" in gw2.core.dirty
        assert not gw.core.urgent and not gw.core.dirty
    finally:
        await gw.store.close()
        await gw2.store.close()


async def test_checkpoint_takes_only_machines_whose_committed_state_is_old(tmp_path):
    """The checkpoint snapshots a dirty machine whose state was committed half CHECKPOINT_S ago or more, not one
    committed recently (e.g. with its last report); a clean stop commits every dirty machine."""
    import time as _time

    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=("m1", "m2"))
    await gw.store.open()
    try:
        feed(gw, [s("m1/good", 0, 1), s("m2/good", 0, 1)])  # baselines: urgent, committed at once
        await gw.core.commit()
        feed(gw, [s("m1/good", 4, 2), s("m2/good", 6, 2)])  # plain increases: dirty, not urgent
        now = _time.monotonic()
        half = gw.core.checkpoint_s / 2
        gw.core._last_checkpoint = now - half  # a checkpoint is due
        gw.core._snapped["m1"] = now  # m1: committed just now
        gw.core._snapped["m2"] = now - half  # m2: committed half CHECKPOINT_S ago
        await gw.core.commit()
        states = await gw.store.load_states()
        assert states["m2"]["counters"]["good"]["last"] == 6 and "m2" not in gw.core.dirty
        assert states["m1"]["counters"]["good"]["last"] == 0 and "m1" in gw.core.dirty
        await gw.core.commit(force=True)  # the stop
        assert (await gw.store.load_states())["m1"]["counters"]["good"]["last"] == 4 and not gw.core.dirty
    finally:
        await gw.store.close()


def test_report_windows_close_in_timer_slots_never_after_their_deadline(tmp_path, monkeypatch):
    """Windows due in one timer slot close together (one round, one commit), at the slot's start: up to one slot
    early, never late (a report at least every interval_s), and with the default jitter spread over the interval."""
    clock = [1000.0]
    monkeypatch.setattr(core.Core, "now", staticmethod(lambda: clock[0]))
    machines = tuple(f"m{i}" for i in range(60))
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=machines)  # interval_s 3600
    feed(gw, [s(f"{m}/good", 0, 1000.0) for m in machines])
    feed(gw, [s(f"{m}/good", 5, 1000.25) for m in machines])  # every window opens at 1000.25
    deadlines = {m: gw.engines[m].next_deadline() for m in machines}
    assert all(1000.25 < d <= 1000.25 + 3600 for d in deadlines.values())
    gw.core.uncommitted.clear()
    fired: dict[str, float] = {}
    slot = core.TIMER_SLOT_S
    k = int(1000.0 / slot)
    while len(fired) < len(machines) and clock[0] < 1000.25 + 3600 + 2:
        k += 1
        clock[0] = k * slot
        gw.core.run_timers()
        for row in gw.core.uncommitted:
            if row.type == "operation.quantity_reported":
                fired.setdefault(row.machine, clock[0])
        gw.core.uncommitted.clear()
    assert set(fired) == set(machines)
    late = {m: (t, deadlines[m]) for m, t in fired.items() if t > deadlines[m]}
    assert late == {}, "reports after their window's deadline"
    assert all(deadlines[m] - t < slot for m, t in fired.items())
    assert len(set(fired.values())) > 40  # spread over the hour, not one burst


def test_the_windows_of_one_timer_slot_close_in_one_round_in_machine_order_once_each(tmp_path, monkeypatch):
    """The core keeps its windows in a timer wheel (the machines of each slot): the windows due in one slot close in
    one round, each once (a machine scheduled to a slot twice, after a detour to another, too), their reports staged
    in machine order whatever the order they opened in, and a machine moved to a later slot is not closed early."""
    clock = [1000.0]
    monkeypatch.setattr(core.Core, "now", staticmethod(lambda: clock[0]))
    machines = tuple(f"m{i:02d}" for i in range(30))
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=machines)
    feed(gw, [s(f"{m}/good", 0, 1000.0) for m in machines])
    for m in reversed(machines):  # opened in reverse order
        gw.engines[m]._window_s = 100.0  # no jitter: one deadline for all
        feed(gw, [s(f"{m}/good", 5, 1000.25)])
    gw.core.uncommitted.clear()
    late = gw.engines["m07"]
    late._window_s = 200.0  # m07's window now closes a slot range later
    gw.core._schedule("m07")
    again = gw.engines["m03"]
    again._window_s = 150.0
    gw.core._schedule("m03")
    again._window_s = 100.0
    gw.core._schedule("m03")  # back to the first slot: listed there twice
    clock[0] = 1000.25 + 100.0
    gw.core.run_timers()
    reports = [r.machine for r in gw.core.uncommitted if r.type == "operation.quantity_reported"]
    assert reports == sorted(set(machines) - {"m07"})
    gw.core.uncommitted.clear()
    clock[0] = 1000.25 + 200.0
    gw.core.run_timers()
    assert [r.machine for r in gw.core.uncommitted if r.type == "operation.quantity_reported"] == ["m07"]


@pytest.mark.parametrize("interval", [0.001, 0.01, 0.2, 1.0, 4.99, 5.0, 60.0, 3600.0])
def test_a_timer_slot_is_at_most_a_fifth_of_the_interval_and_divides_the_largest(interval):
    """A window closes at the start of its deadline's slot: at most a fifth of its interval early (one slot); the
    slots of all intervals nest, so windows of machines with different intervals still close in one round."""
    slot = core.timer_slot(interval)
    assert slot <= max(interval / 5, core.MIN_TIMER_SLOT_S)
    assert (core.TIMER_SLOT_S / slot).is_integer()
    assert slot == core.TIMER_SLOT_S or slot * 2 > interval / 5 or slot * 2 <= core.MIN_TIMER_SLOT_S  # the largest


def test_a_short_window_is_not_closed_a_slot_early_at_every_round(tmp_path, monkeypatch):
    """A 0.2 s window closes 0.2 s (less its jitter and a slot of 1/32 s) after its first count, not in the next
    round: with one slot for every interval (0.5 s) it closed whenever its deadline's slot had begun."""
    from tests.test_core_runs import make_gateway as make_modbus_gateway

    clock = [1000.25]
    monkeypatch.setattr(core.Core, "now", staticmethod(lambda: clock[0]))
    gw = make_modbus_gateway(tmp_path, "short", interval_s=0.2)
    for t, v in ((1000.2, 10), (1000.25, 12)):  # the baseline, then the first count: the window opens at 1000.25
        gw.core.stage(gw.core.apply_samples([Sample("m1/good", v, True, 1.7e9 + t, None, "Good", t)]))
    opened, deadline = 1000.25, gw.engines["m1"].next_deadline()
    assert opened < deadline <= opened + 0.2  # the first window after a start: anywhere in the interval (jitter)
    fired = None
    while fired is None and clock[0] < 1001:
        clock[0] += 0.01
        gw.core.run_timers()
        if any(r.type == "operation.quantity_reported" for r in gw.core.uncommitted):
            fired = clock[0]
    assert fired is not None and deadline - 0.2 / 5 <= fired <= deadline + 0.01


def test_a_window_after_a_changeover_is_not_closed_by_the_old_windows_timer(tmp_path, monkeypatch):
    """A changeover closes the open window; its timer stays in the heap. The next window opens before that old
    deadline and must be closed at its own (interval_s, early by at most one slot), not by the old timer."""
    from types import SimpleNamespace

    clock = SimpleNamespace(mono=1000.0, wall=1.7e9)
    monkeypatch.setattr(core, "time", SimpleNamespace(monotonic=lambda: clock.mono, time=lambda: clock.wall))
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": str(tmp_path / "gw.db")},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1"}],
        "machines": [{"id": "m1", "order_source": "mqtt", "counters": {"good": {"connector": "plc", "address": 0}},
                      "reporting": {"interval_s": 10, "jitter": 0}}]}, "<test>")
    gw = Gateway(cfg)
    gw.core.restore({}, 1, EventEncoder(cfg.gateway, gw.topics, "e" * 32))
    reports: list[tuple[float, str]] = []
    gw.core.on_staged = lambda drafts: reports.extend(
        (clock.mono, d.data["reason"]) for d in drafts if d.type == "operation.quantity_reported")

    def at(t: float, value: int | None = None) -> None:
        clock.wall += t - clock.mono
        clock.mono = t
        if value is not None:
            gw.core.stage(gw.core.apply_samples([Sample("m1/good", value, True, clock.wall, None, "Good", t)]))
        gw.core.run_timers()

    at(1000, 100)  # the baseline
    at(1001, 105)  # a window opens: due at 1011
    at(1009)
    gw.core.stage(gw.core.apply_order(OrderCommand("m1", OrderContext("A", "10"), "mqtt", needs_cut=False)))
    at(1009.5, 107)  # the next window opens: due at 1019.5 (its slot starts at 1019.5)
    t = 1009.5
    while t < 1021:
        t += 0.25
        at(t, 107 + int(t - 1009.5))
    assert reports == [(1009.0, "changeover"), (1019.5, "periodic")]


@pytest.mark.parametrize("http", [False, True])
def test_the_status_pages_figures_are_kept_only_where_the_http_api_serves_them(tmp_path, http):
    """The per-machine figures of the status page (parts produced, last event) cost ~5 µs per report; only the HTTP
    API serves them (``http`` needs a restart to change), so a gateway without it does not keep them."""
    from gateway.config import HttpConfig

    base = make_gateway(tmp_path, order_source="mqtt", complete=False)
    gw = Gateway(base.cfg.model_copy(update={"http": HttpConfig(enabled=http, port=1)}))
    gw.core.restore({}, 1, EventEncoder(gw.cfg.gateway, gw.topics, "e" * 32))
    feed(gw, [s("m1/good", 0, 1000.0)], [s("m1/good", 4, 1001.0)])
    gw.core.stage(gw.engines["m1"].flush("periodic", 1002.0))
    rows = [core.PendingRow(i + 1, r.topic, r.payload, r.machine, r.seq) for i, r in enumerate(gw.core.uncommitted)]
    gw._committed(rows)
    figures = gw.activity.machine("m1", {})
    if http:
        assert figures["parts_produced"] == 4 and figures["last_event"]["type"] == "operation.quantity_reported"
    else:
        assert figures["parts_produced"] == 0 and figures["last_event"] is None


def test_the_core_sleeps_until_its_next_timer_slot_on_uvloop(tmp_path, monkeypatch):
    """uvloop keeps time in whole milliseconds and ends a wait up to ~1 ms before ``time.monotonic()`` reaches its
    deadline (40 % of waits here). The core then found nothing due and waited again and again, a fraction of a
    millisecond at a time (~20 rounds a second instead of ~4 at the Node-RED peer's load). With ``WAKE_SLACK_S`` every
    round that ends a timer wait runs a slot."""
    import time

    import uvloop

    machines = tuple(f"m{i}" for i in range(10))
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False, machines=machines, interval_s=0.5)
    assert core.timer_slot(0.5) == 0.0625
    gw.core.ticker = None  # no health evaluation: timer slots only
    popped: list[int] = []
    reported: set[str] = set()
    run_timers = gw.core.run_timers

    def counted() -> None:
        before = len(gw.core._timers)
        run_timers()
        popped.append(before - len(gw.core._timers))

    async def no_commit(**_: Any) -> None:
        reported.update(r.machine for r in gw.core.uncommitted if r.type == "operation.quantity_reported")
        gw.core.uncommitted.clear()
        gw.core.dirty.clear()

    monkeypatch.setattr(gw.core, "run_timers", counted)
    monkeypatch.setattr(gw.core, "commit", no_commit)

    async def go() -> None:
        t = time.monotonic()
        feed(gw, [Sample(f"{m}/good", 0, True, recv_time=time.time(), mono=t) for m in machines])
        feed(gw, [Sample(f"{m}/good", 5, True, recv_time=time.time(), mono=t) for m in machines])
        for i, m in enumerate(machines):  # one deadline every 70 ms: ten slots of 62.5 ms
            gw.engines[m]._window_s = 0.1 + 0.07 * i
            gw.core._schedule(m)
        task = asyncio.ensure_future(gw.core.run())
        try:
            await wait_until(lambda: reported == set(machines), 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    uvloop.run(go())
    assert 0 not in popped[1:], f"rounds that found no timer due: {popped}"


async def test_a_local_order_dropped_at_a_stop_is_logged_to_be_set_again(tmp_path):
    """A local order (`edge-gateway order set`, the HTTP API: answered "accepted") waits for the machine's counter
    read, which its unreachable PLC does not give, or is still in the inbox, when the gateway stops: it is dropped.
    A retained MQTT dispatch comes again at the next start; a local order does not, so each is logged
    (order.not_applied, warning) to be set again (red before: dropped without a word)."""
    import structlog

    from gateway.orders import OrderCommand
    from mappings.machine import OrderContext

    gw = make_gateway(tmp_path, order_source="local", complete=False, machines=("m1", "m2"))
    feed(gw, [s("m1/good", 0, 1), s("m2/good", 0, 1)])
    with structlog.testing.capture_logs() as logs:
        gw.core._order_command(OrderCommand("m1", OrderContext("A", "10"), "local"))  # its cut read cannot answer
        await asyncio.sleep(0.05)
        assert "m1" in gw.core.cuts
        gw.core.inbox.append(OrderCommand("m2", OrderContext("B", "20"), "local"))
        gw.core.inbox.append(OrderCommand("m2", OrderContext("C", "30"), "mqtt"))  # retained: comes again
        # an ERP clear is an empty retained payload, which deletes the retained dispatch: it does not come again
        gw.core.inbox.append(OrderCommand("m2", None, "mqtt"))
        gw.core.cancel_cuts()
        gw.core.drain()
    lost = [(e["machine"], e["order"], e["source"], e["log_level"]) for e in logs if e["event"] == "order.not_applied"]
    assert lost == [("m1", "A", "local", "warning"), ("m2", "B", "local", "warning"), ("m2", None, "mqtt", "warning")]


def test_an_order_command_for_a_machine_a_reload_removed_is_dropped_not_a_crash(tmp_path):
    """A dispatch queued in the core's inbox while a reload removes its machine (the order sources take the new
    table only at the reload's end): the next round drops it with a warning (red before: KeyError in the core's
    round, which ended the core task and with it the gateway)."""
    import structlog

    gw = make_gateway(tmp_path, order_source="mqtt", complete=False)
    gw.core.put(OrderCommand("m2", OrderContext("B", "20"), "mqtt"))
    with structlog.testing.capture_logs() as logs:
        gw.core.round()
    assert [(e["event"], e["machine"]) for e in logs if e["event"] == "order.machine_removed"] == [("order.machine_removed", "m2")]
    assert not gw.core.inbox


def test_plc_tags_back_on_a_completed_operation_count_unassigned(tmp_path):
    """A/10 completed by the flag, B/20 runs, then the PLC shows A/10 again (a rework run, an operator's slip): the
    completed operation is not reopened, and what is made now goes unassigned, not to B/20; the next flag completes
    nothing (red before: B/20 got those parts and the flag final-confirmed B/20 with them)."""
    gw = make_gateway(tmp_path, order_source="tag", complete=True)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1), s("m1/complete", 0, 1)])
    feed(gw, [s("m1/good", 5, 2)])
    feed(gw, [s("m1/complete", 1, 3), s("m1/order", "B", 3), s("m1/operation", "20", 3)])
    feed(gw, [s("m1/complete", 0, 4), s("m1/good", 8, 4)])
    feed(gw, [s("m1/order", "A", 5), s("m1/operation", "10", 5)])
    feed(gw, [s("m1/good", 20, 6)])
    feed(gw, [s("m1/complete", 1, 8), s("m1/good", 21, 8)])
    gw.core.stage(gw.engines["m1"].flush("test", 9))
    assert booked(gw) == {("A", "10"): 5, ("completed", "A"): 5, ("B", "20"): 3, (None, None): 13}
    assert gw.engines["m1"].context is None


def test_completing_an_operation_that_ran_before_the_current_one(tmp_path):
    """The ERP dispatches B, then completes A (which ran before it here): A is final-confirmed with its totals, B goes
    on, and A is not reopened later (red before: dropped without a word; a later 'A active' reopened it)."""
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False)
    core = gw.core
    feed(gw, [s("m1/good", 0, 1)])
    core.stage(core.apply_order(OrderCommand("m1", OrderContext("A", "10"), "mqtt")))
    feed(gw, [s("m1/good", 7, 2)])
    core.stage(core.apply_order(OrderCommand("m1", OrderContext("B", "20"), "mqtt")))
    feed(gw, [s("m1/good", 9, 3)])
    core._order_command(OrderCommand("m1", OrderContext("A", "10", status="completed"), "mqtt"))
    assert not core.cuts  # no changeover, no cut read
    assert gw.engines["m1"].context.ref == ("B", "20")
    gw.core.stage(gw.engines["m1"].flush("test", 4))
    assert booked(gw) == {("A", "10"): 7, ("completed", "A"): 7, ("B", "20"): 2}
    assert core.refusal(OrderCommand("m1", OrderContext("A", "10"), "mqtt")) is not None
    before = len(core.uncommitted)
    core._order_command(OrderCommand("m1", OrderContext("A", "10", status="completed"), "mqtt"))  # again: nothing
    core._order_command(OrderCommand("m1", OrderContext("X", "99", status="completed"), "mqtt"))  # never ran here
    assert len(core.uncommitted) == before


def test_after_an_outage_that_spans_a_plc_order_change_the_gap_goes_to_the_old_order(tmp_path):
    """The OPC UA connection is down from t=10 to t=80; the PLC switched A/10 -> B/20 at t=50. The new subscription's
    first values are the counter now (300, time 90) and the tags (B/20, time 50): the split of the 200 parts is
    unknown. The connector marks a new subscription's first values ``reread`` (the current value, not a change seen
    as it happened), and the core counts them before the order tags of the batch, as in a Modbus scan: to the old
    order, like a changeover held by an unreadable PLC (red before: sorted by time, the whole gap went to B/20)."""
    import dataclasses

    gw = make_gateway(tmp_path, complete=False)
    feed(gw, [s("m1/good", 0, 1), s("m1/order", "A", 1), s("m1/operation", "10", 1)])
    feed(gw, [s("m1/good", 100, 10)])
    first = [dataclasses.replace(x, reread=True)
             for x in (s("m1/good", 300, 90), s("m1/order", "B", 50), s("m1/operation", "20", 50))]
    feed(gw, first)
    feed(gw, [s("m1/good", 310, 95)])
    gw.core.stage(gw.engines["m1"].flush("test", 100))
    assert booked(gw) == {("A", "10"): 300, ("B", "20"): 10}


def test_a_dispatch_changing_the_running_operations_unit_reports_what_was_counted_before_in_the_old_unit(tmp_path):
    """The ERP dispatches the running operation again with another unit: what was counted so far is reported first,
    in the unit it was made in (reason changeover); the parts after it in the new one (red before: the open window
    was reported later in the new unit)."""
    gw = make_gateway(tmp_path, order_source="mqtt", complete=False)
    core = gw.core
    feed(gw, [s("m1/good", 0, 1)])
    core.stage(core.apply_order(OrderCommand("m1", OrderContext("A", "10", unit="PCE"), "mqtt")))
    feed(gw, [s("m1/good", 7, 2)])
    core.stage(core.apply_order(OrderCommand("m1", OrderContext("A", "10", unit="BOX"), "mqtt")))
    feed(gw, [s("m1/good", 10, 3)])
    core.stage(gw.engines["m1"].flush("test", 4))
    reports = [(e["data"]["quantities"]["yield"], e["data"]["unit"], e["data"]["reason"]) for e in staged(gw)
               if e["type"] == "operation.quantity_reported"]
    assert reports == [("7", "PCE", "changeover"), ("3", "BOX", "test")]
    assert [e["type"] for e in staged(gw)].count("operation.started") == 1  # the same operation: not started again


def test_a_local_order_for_a_faulted_machine_is_refused_at_once(tmp_path):
    """The local command (CLI, HTTP API) answers at once; a faulted machine takes no order until a restart or a reload,
    so the answer is a refusal naming the fault (red before: 'accepted', then dropped when applied)."""
    gw = make_gateway(tmp_path, order_source="local", complete=False)
    gw.core.fault("m1", RuntimeError("engine bug"))
    with pytest.raises(ValueError, match="faulted"):
        gw.set_local_order("m1", OrderContext("A", "10"))
    assert not gw.core.inbox


def test_a_restored_window_reports_after_a_restart_without_new_samples(tmp_path, monkeypatch):
    """A window restored with counts in it (the machine stopped before the restart) is re-armed by its first timer
    and then reported one interval later, with no sample to schedule it again: the timer that re-arms it must be
    followed by the window's own."""
    gw = make_gateway(tmp_path, order_source="local", complete=False, interval_s=60)
    feed(gw, [s("m1/good", 100, 10)], [s("m1/good", 107, 11)])
    snap = json.loads(gw.engines["m1"].snapshot_json())
    assert snap["window"]["q"]["good"] == "7"

    clock = [1000.0]
    again = make_gateway(tmp_path / "again", order_source="local", complete=False, interval_s=60)
    monkeypatch.setattr(again.core, "now", lambda: clock[0])
    again.core.restore({"m1": snap}, 1, EventEncoder(again.cfg.gateway, again.topics, "e" * 32))
    again.core.run_timers()  # re-arms the restored window: it opens now
    assert staged(again) == []
    clock[0] += 61
    again.core.run_timers()
    assert [(e["type"], e["data"]["quantities"]["yield"]) for e in staged(again)] == \
        [("operation.quantity_reported", "7")]
