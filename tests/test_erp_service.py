"""ERP posting service core against a real PostgreSQL (a throwaway database per test): validation, dedup with
content comparison, conflicts, ledger, seq tracking, completions held behind gaps, SAP-shaped outbox documents."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import psycopg
import pytest

from erp_service.config import ServiceConfig
from erp_service.ledger import Ledger, ensure_schema
from erp_service.testing import EventFactory


@pytest.fixture
async def conn(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        await ensure_schema(c)
        yield c


def _b(x) -> bytes:
    return json.dumps(x).encode()


async def _rows(conn, sql, *args):
    cur = await conn.execute(sql, args or None)
    return await cur.fetchall()


async def test_duplicate_is_absorbed_and_counted(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    ev = f.report("press-1", "1000123", "0010", y=12, s=1)
    r1 = await led.process(conn, f.topic("press-1"), _b(ev))
    r2 = await led.process(conn, f.topic("press-1"), _b([ev]), redelivered=True)  # again, in a batch
    assert [r.outcome for r in r1 + r2] == ["accepted", "duplicate"]
    assert r2[0].ack() == {"status": "accepted", "id": ev["id"], "source": ev["source"]}
    assert await _rows(conn, "SELECT machine, order_id, operation, yield, scrap, rework FROM erp_ledger") == [
        ("press-1", "1000123", "0010", Decimal(12), Decimal(1), Decimal(0))]
    assert await _rows(conn, "SELECT duplicates, redeliveries FROM erp_events") == [(1, 1)]
    assert await _rows(conn, "SELECT external_id, kind FROM erp_outbox") == [(ev["id"], "partial")]


async def test_conflicting_duplicate_is_recorded_never_booked(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    ev = f.report("press-1", "1000123", "0010", y=12)
    forged = json.loads(json.dumps(ev))
    forged["data"]["quantities"]["yield"] = "13"
    forged["data"]["totals"]["yield"] = "13"
    assert [r.outcome for r in await led.process(conn, "t/events/batch", _b(ev))] == ["accepted"]
    [r] = await led.process(conn, "t/events/batch", _b(forged))
    assert r.outcome == "conflict"
    ack = r.ack()
    assert ack["status"] == "rejected" and "conflict" in ack["reason"] and ack["event"] == forged
    assert await _rows(conn, "SELECT yield FROM erp_ledger") == [(Decimal(12),)]  # first wins
    rows = await _rows(conn, "SELECT kind, first_id, body FROM erp_conflicts")
    assert [(k, i, b["data"]["quantities"]["yield"]) for k, i, b in rows] == [("same_id", ev["id"], "13")]
    assert led.metrics.conflicts._value.get() == 1


async def test_same_seq_with_other_id_is_a_conflict(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    ev = f.report("press-1", "1000123", "0010", y=5)
    other = dict(ev, id="00000000-0000-5000-8000-000000000001")
    await led.process(conn, "t/events/batch", _b(ev))
    [r] = await led.process(conn, "t/events/batch", _b(other))
    assert r.outcome == "conflict" and "same_seq" in r.reason
    assert await _rows(conn, "SELECT kind, id, first_id FROM erp_conflicts") == [("same_seq", other["id"], ev["id"])]
    assert await _rows(conn, "SELECT yield FROM erp_ledger") == [(Decimal(5),)]


async def test_invalid_event_rejected_with_reason_rest_of_batch_booked(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    good = f.report("press-1", "1000123", "0010", y=3)
    bad = f.report("press-1", "1000123", "0010", y=4)
    bad["data"]["quantities"]["yield"] = 4  # a JSON number: the contract wants a decimal string
    results = await led.process(conn, "edge/v1/a/b/c/d/press-1/events/batch", _b([good, bad]))
    assert [r.outcome for r in results] == ["accepted", "rejected"]
    ack = results[1].ack()
    assert ack["status"] == "rejected" and ack["id"] == bad["id"] and ack["event"] == bad
    assert "data.quantities.yield" in ack["reason"]
    assert await _rows(conn, "SELECT yield FROM erp_ledger") == [(Decimal(3),)]
    assert await _rows(conn, "SELECT id FROM erp_rejected") == [(bad["id"],)]
    [r] = await led.process(conn, "x/events/batch", b"{not json")
    assert r.outcome == "rejected" and "not JSON" in r.reason


async def test_an_assigned_consumption_without_its_order_is_rejected_alone(conn):
    """A material.consumed marked assigned (unassigned: false) but with no order / operation cannot be booked: the
    contract refuses it (as for quantity reports), so it is rejected alone and the rest of its batch is booked. Red
    before: the contract let it through, the outbox insert failed (NOT NULL) and took the whole broker message with
    it, dead-lettered after its redeliveries with the report in it."""
    f = EventFactory()
    led = Ledger(ServiceConfig())
    report = f.report("press-1", "1000123", "0010", y=40, s=2)
    odd = f._env("material.consumed", "press-1", {
        "machine": "press-1", "order": None, "operation": None, "unassigned": False, "method": "metered",
        "basis": None, "movement_type": "261", "components": [{"material": "RM-1", "quantity": "2.5", "unit": "KG"}]})
    results = await led.process(conn, "t/events/batch", _b([report, odd]))
    assert [r.outcome for r in results] == ["accepted", "rejected"]
    assert "data.order" in results[1].reason
    assert await _rows(conn, "SELECT yield FROM erp_ledger") == [(Decimal(40),)]


async def test_a_rejected_event_that_books_nothing_does_not_hold_the_final_confirmation(conn):
    """A rejected machine.state_changed (a newer gateway's format, a bug) leaves its seq open: the final confirmation
    behind it was held for ever (red before). Its seq is filled (erp_filled): the final goes out. A rejected quantity
    report still holds the final (its quantity is not booked: posting the final first would close the operation
    without it); the gap alarm tells."""
    f = EventFactory()
    led = Ledger(ServiceConfig())
    bad = f.state("press-1", "running")
    bad["data"]["raw"] = {"not": "a scalar"}
    evs = [f.report("press-1", "1", "0010", y=5), bad, f.report("press-1", "1", "0010", y=3, reason="completion"),
           f.completed("press-1", "1", "0010")]
    outcomes = [(await led.process(conn, "t/events/batch", _b(e)))[0].outcome for e in evs]
    assert outcomes == ["accepted", "rejected", "accepted", "accepted"]
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("partial",), ("final",)]
    assert await _rows(conn, "SELECT seq FROM erp_filled") == [(bad["seq"],)]

    g = EventFactory()
    report = g.report("press-2", "2", "0010", y=4)
    report["data"]["quantities"]["yield"] = 4  # not a decimal string: rejected
    for e in (report, g.completed("press-2", "2", "0010")):
        await led.process(conn, "t/events/batch", _b(e))
    assert await _rows(conn, "SELECT kind FROM erp_outbox WHERE order_id = '2'") == []  # held: the gap is open
    assert await _rows(conn, "SELECT count(*) FROM erp_filled") == [(1,)]


async def test_an_event_the_database_cannot_store_is_rejected_alone(conn):
    """A contract-valid event PostgreSQL refuses to store failed the whole broker message at every redelivery, until
    the dead letter took the good events in it too (red before: DataError). Now that message is booked event by
    event: that one is rejected, with the database's reason, the others are booked. The contract now refuses every
    text PostgreSQL cannot hold (a NUL: in an order number from a PLC string tag, then in a unit, then in a counter
    name, each an example of this test in turn), so the database's refusal is a CHECK constraint of this throwaway
    database here, as a site's DBA may add (an integrity error: the same path as a data error)."""
    await conn.execute("ALTER TABLE erp_ledger ADD CONSTRAINT no_blocked_order CHECK (order_id <> '1000124')")
    f = EventFactory()
    led = Ledger(ServiceConfig())
    good = f.report("press-1", "1000123", "0010", y=7)
    bad = f.report("press-1", "1000124", "0010", y=3)
    nul_order = f.report("press-1", "10\u00001", "0010", y=2)
    results = await led.process(conn, "t/events/batch", _b([good, bad, nul_order]))
    assert [r.outcome for r in results] == ["accepted", "rejected", "rejected"]
    assert "cannot be booked" in results[1].reason and results[1].ack()["id"] == bad["id"]
    assert results[2].reason.startswith("data.order: ") and results[2].ack()["id"] == nul_order["id"]
    assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger") == [("1000123", Decimal(7))]
    assert sorted(await _rows(conn, "SELECT id FROM erp_rejected")) == sorted([(bad["id"],), (nul_order["id"],)])
    # redelivered: the same outcome, nothing booked twice
    again = await led.process(conn, "t/events/batch", _b([good, bad, nul_order]), redelivered=True)
    assert [r.outcome for r in again] == ["duplicate", "rejected", "rejected"]
    assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger") == [("1000123", Decimal(7))]


async def test_completion_held_until_the_reports_before_it_arrive(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    e1 = f.started("press-1", "1000123", "0010")
    e2 = f.report("press-1", "1000123", "0010", y=10)
    e3 = f.report("press-1", "1000123", "0010", y=2, s=1, reason="completion")
    e4 = f.completed("press-1", "1000123", "0010")
    for ev in (e1, e2, e4):  # e3 is late (QoS 1 redelivery after a reconnect)
        await led.process(conn, "t/events/batch", _b(ev))
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",)]
    assert await _rows(conn, "SELECT id, applied FROM erp_events WHERE type = 'operation.completed'") == [
        (e4["id"], False)]
    assert await _rows(conn, "SELECT low, high, reorders FROM erp_streams") == [(2, 4, 0)]
    gaps = await led.gaps(conn)
    assert list(gaps.values())[0]["missing"] == 1
    await led.process(conn, "t/events/batch", _b(e3))
    rows = await _rows(conn, "SELECT external_id, kind, body FROM erp_outbox ORDER BY n")
    assert [(i, k) for i, k, _ in rows] == [(e2["id"], "partial"), (e3["id"], "partial"), (e4["id"], "final")]
    final = rows[2][2]
    assert final["IsFinalConfirmation"] is True and final["FinalConfirmationType"] == "X"
    assert final["ExternalSystemConfirmation"] == e4["id"]
    assert final["ConfirmationYieldQuantity"] == "0"
    assert await _rows(conn, "SELECT low, high, reorders, gap_since FROM erp_streams") == [(4, 4, 1, None)]
    assert await _rows(conn, "SELECT order_id, operation, final_id FROM erp_operations") == [
        ("1000123", "0010", e4["id"])]


async def test_documents_are_shaped_like_prodnordconf2(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig(unit_map={"PCE": "ST"}, scrap_reason_code="0002"))
    rep = f.report("press-1", "1000123", "0010", y=12, s=1, r=2)
    con = f.consumed("press-1", "1000123", "0010", 12, 1, [("RM-100", "3.25", "KG"), ("RM-200", "13", "PCE")])
    zero = f.report("press-1", "1000123", "0010")
    una = f.report("press-1", None, None, y=7)
    await led.process(conn, "t/events/batch", _b([rep, con, zero, una]))
    docs = {k: b for k, b in await _rows(conn, "SELECT kind, body FROM erp_outbox")}
    assert set(docs) == {"partial", "goods_issue"}  # zero report and unassigned counts are not posted
    p = docs["partial"]
    assert {k: p[k] for k in ("OrderID", "OrderOperation", "ConfirmationYieldQuantity", "ConfirmationScrapQuantity",
                              "ConfirmationReworkQuantity", "ConfirmationUnit", "IsFinalConfirmation",
                              "ExternalSystemConfirmation", "VarianceReasonCode")} == {
        "OrderID": "1000123", "OrderOperation": "0010", "ConfirmationYieldQuantity": "12",
        "ConfirmationScrapQuantity": "1", "ConfirmationReworkQuantity": "2", "ConfirmationUnit": "ST",
        "IsFinalConfirmation": False, "ExternalSystemConfirmation": rep["id"], "VarianceReasonCode": "0002"}
    assert p["PostingDate"] == "/Date(1795305600000)/"  # 2026-11-22
    g = docs["goods_issue"]
    assert g["ExternalSystemConfirmation"] == con["id"] and g["ConfirmationYieldQuantity"] == "0"
    assert "VarianceReasonCode" not in g
    assert g["to_ProdnOrdConfMatlDocItm"]["results"] == [
        {"Material": "RM-100", "GoodsMovementType": "261", "QuantityInEntryUnit": "3.25", "EntryUnit": "KG"},
        {"Material": "RM-200", "GoodsMovementType": "261", "QuantityInEntryUnit": "13", "EntryUnit": "ST"}]
    assert await _rows(conn, "SELECT material, quantity FROM erp_consumption ORDER BY material") == [
        ("RM-100", Decimal("3.25")), ("RM-200", Decimal(13))]
    assert await _rows(conn, "SELECT id FROM erp_unassigned") == [(una["id"],)]
    assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger ORDER BY order_id") == [
        ("", Decimal(7)), ("1000123", Decimal(12))]


async def test_sap_backflush_mode_posts_no_goods_movement(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig(consumption="sap_backflush"))
    await led.process(conn, "t/events/batch", _b([f.report("m", "1", "0010", y=1),
                                                  f.consumed("m", "1", "0010", 1, 0, [("RM", "1", "KG")])]))
    assert await _rows(conn, "SELECT kind FROM erp_outbox") == [("partial",)]
    assert await _rows(conn, "SELECT material, quantity FROM erp_consumption") == [("RM", Decimal(1))]


async def test_concurrent_workers_book_each_event_once(dsn):
    """Two workers (own connections) get the same messages at the same time (a redelivery racing the first)."""
    f = EventFactory()
    events = [f.report("press-1", "1000123", "0010", y=1) for _ in range(40)]
    conns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(2)]
    try:
        await ensure_schema(conns[0])
        led = Ledger(ServiceConfig())

        async def worker(c, order):
            return [r for ev in order for r in await led.process(c, "t/events/batch", _b(ev))]

        a, b = await asyncio.gather(worker(conns[0], events), worker(conns[1], list(reversed(events))))
        outcomes = sorted(r.outcome for r in a + b)
        assert outcomes == ["accepted"] * 40 + ["duplicate"] * 40
        assert await _rows(conns[0], "SELECT yield, reports FROM erp_ledger") == [(Decimal(40), 40)]
        assert await _rows(conns[0], "SELECT count(*) FROM erp_outbox") == [(40,)]
        assert await _rows(conns[0], "SELECT low, high, received FROM erp_streams") == [(40, 40, 40)]
    finally:
        for c in conns:
            await c.close()


async def test_report_after_final_confirmation_is_flagged(conn):
    f = EventFactory()
    led = Ledger(ServiceConfig())
    await led.process(conn, "t/events/batch", _b([f.report("m", "1", "0010", y=2, reason="completion"),
                                                  f.completed("m", "1", "0010")]))
    late = f.report("m", "1", "0010", y=1)
    await led.process(conn, "t/events/batch", _b(late))
    await led.process(conn, "t/events/batch", _b([f.report("m", "2", "0010", y=1), f.report("m", "1", "0010", y=1)]))
    assert await _rows(conn, "SELECT order_id, late_reports FROM erp_operations") == [("1", 2)]
    assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger ORDER BY order_id") == [
        ("1", Decimal(4)), ("2", Decimal(1))]


async def test_gap_alarm_and_held_completion_gauges(dsn, conn):
    """A gap open longer than gap_alarm_s raises edge_erp_seq_gap_alarm; closing it clears the alarm and releases
    the held completion."""
    from erp_service.service import ErpService

    cfg = ServiceConfig(postgres={"dsn": dsn}, gap_alarm_s=0.2)
    svc = ErpService(cfg)
    f = EventFactory()
    e1 = f.report("m", "1", "0010", y=1)
    e2 = f.report("m", "1", "0010", y=1, reason="completion")
    e3 = f.completed("m", "1", "0010")
    await svc.ledger.process(conn, "t/events/batch", _b([e1, e3]))
    status = await psycopg.AsyncConnection.connect(dsn, autocommit=True)  # like the service's gauge loop
    s = await svc.refresh_gauges(status)
    assert s["completions_held"] == 1 and [g["missing"] for g in s["gaps"]] == [1]
    assert svc.metrics.gap_alarm._value.get() == 0  # not old enough yet
    alarm = {}

    async def refresh():
        alarm["v"] = (await svc.refresh_gauges(status), svc.metrics.gap_alarm._value.get())

    for _ in range(100):
        await refresh()
        if alarm["v"][1] == 1:
            break
        await asyncio.sleep(0.05)
    assert alarm["v"][1] == 1 and svc.metrics.held._value.get() == 1 and svc.metrics.seq_gaps._value.get() == 1
    await svc.ledger.process(conn, "t/events/batch", _b(e2))
    s = await svc.refresh_gauges(status)
    await status.close()
    assert s["gaps"] == [] and s["completions_held"] == 0 and svc.metrics.gap_alarm._value.get() == 0
    assert s["outbox"] == {"pending": 3}


def test_acks_follow_the_erpack_schema():
    from erp_service.consumers import ack_payloads, acks_topic
    from erp_service.ledger import Result
    from gateway.schema import ErpAck

    ev = EventFactory().report("m", "1", "0010", y=1)
    results = [Result("accepted", ev["id"], ev["source"], ev["type"]),
               Result("duplicate", ev["id"], ev["source"], ev["type"]),
               Result("rejected", ev["id"], ev["source"], ev["type"], "data.unit: too short", ev),
               Result("rejected", None, None, None, "not JSON: ...")]
    acks = [json.loads(b) for b in ack_payloads(results, "all")]
    assert [ErpAck.model_validate(a).status for a in acks] == ["accepted", "accepted", "rejected"]
    assert acks[2]["event"] == ev and acks[2]["reason"] == "data.unit: too short"
    assert [json.loads(b)["status"] for b in ack_payloads(results, "rejected")] == ["rejected"]
    assert ack_payloads(results, "none") == []
    assert acks_topic("edge/v1/a/s/ar/l/press-1/events/batch") == "edge/v1/a/s/ar/l/press-1/acks"
    assert acks_topic("edge/v1/a/s/ar/l/press-1/dispatch") is None


async def test_odd_elements_of_a_batch_are_rejected_alone_and_the_rest_is_booked(conn):
    """Elements validate_event did not expect made the whole message fail at every redelivery until the dead letter
    took the good events with it (red before: TypeError, ValueError, RecursionError, OverflowError out of process()):
    a type that is a list, a number of 5,000 digits, an element nested 400 deep, and a
    contract-valid time near year 1 whose posting date overflows. Each is rejected with its reason; the good report
    is booked. A message the parser cannot read at all (nested deeper, a raw NUL) or a bare 5,000-digit number is
    one rejection, recorded (PostgreSQL stores no NUL: escaped)."""
    f = EventFactory()
    good = f.report("press-1", "1000123", "0010", y=7)
    early = f.report("press-1", "1000124", "0010", y=3)
    early["time"] = "0001-01-01T00:00:00+01:00"
    deep = "[" * 400 + "]" * 400
    parts = [json.dumps(good), '{"type": [], "id": "x"}', '{"type": "operation.started", "seq": ' + "9" * 5000 + "}",
             deep, json.dumps(early)]
    payload = ("[" + ",".join(parts) + "]").encode()
    led = Ledger(ServiceConfig())
    results = await led.process(conn, "t/events/batch", payload)
    assert [r.outcome for r in results] == ["accepted", "rejected", "rejected", "rejected", "rejected"], results[0].reason
    assert "type" in results[1].reason
    assert results[4].reason.startswith("time: ") and results[4].ack()["id"] == early["id"]
    assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger") == [("1000123", Decimal(7))]
    assert (await _rows(conn, "SELECT count(*) FROM erp_rejected")) == [(4,)]
    # a whole message the parser refuses: one rejection, recorded, nothing raised
    for raw in (b"9" * 5000, ("[" * 100_000).encode(), b'{"x": "\x00"}'):
        [r] = await led.process(conn, "t/events/batch", raw)
        assert r.outcome == "rejected"
    assert (await _rows(conn, "SELECT count(*) FROM erp_rejected")) == [(7,)]


async def test_the_schema_is_set_up_without_waiting_for_a_reader_of_erp_events(conn, dsn):
    """Every worker start and every operator command runs ensure_schema: creating the release trigger each time (a
    DROP / CREATE TRIGGER) took a lock that waits for any open transaction that read erp_events (a report, a BI
    tool) and holds up every insert behind it (red before: LockNotAvailable under lock_timeout)."""
    async with await psycopg.AsyncConnection.connect(dsn) as reader:
        await reader.execute("SELECT count(*) FROM erp_events")  # a transaction stays open
        async with await psycopg.AsyncConnection.connect(dsn) as other:
            await other.execute("SET lock_timeout = '1s'")
            await other.commit()
            await ensure_schema(other)
        await reader.rollback()
