"""Releasing a seq gap by hand (``edge-gateway-erp gaps`` / ``release-gap``), against a real PostgreSQL (a throwaway
database per test).

A rejected event that books quantities leaves its seq open, and the final confirmation behind it is held for ever
(test_erp_service.test_a_rejected_event_that_books_nothing_does_not_hold_the_final_confirmation). An integrator who
dealt with the event by hand releases the seq: the watermark moves on and the held completion is applied, as when
the missing event arrives. Refused (exit 1, one line, nothing changed) when nothing is held behind the seq or its
event may still arrive; an event that arrives under a released seq later is a conflict, never booked."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml

from erp_service.cli import _os_user
from erp_service.config import ServiceConfig
from erp_service.ledger import Ledger, ReleaseRefused, ensure_schema, utc_text
from erp_service.testing import EventFactory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def conn(dsn):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await ensure_schema(c)
        yield c


@pytest.fixture
def config(tmp_path, dsn) -> Path:
    p = tmp_path / "erp.yaml"
    p.write_text(yaml.safe_dump({"postgres": {"dsn": dsn}, "logging": {"format": "json"}}))
    return p


def _b(x) -> bytes:
    return json.dumps(x).encode()


async def _rows(conn, sql, *args):
    cur = await conn.execute(sql, args or None)
    return await cur.fetchall()


async def _cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m erp_service.cli ...``."""
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "erp_service.cli", *args, cwd=ROOT,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, out.decode(), err.decode()


def _refusal(err: str) -> str:
    """The one line a refusal prints on stderr (no JSON log line, no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


async def _held(conn, led):
    """Gateway f: report 5 (seq 1), report 4 REJECTED (seq 2: yield not a decimal string), completion report 3
    (seq 3), operation.completed (seq 4): the final is held behind seq 2."""
    f = EventFactory()
    first = f.report("press-1", "1000123", "0010", y=5)
    bad = f.report("press-1", "1000123", "0010", y=4)
    bad["data"]["quantities"]["yield"] = 4
    evs = [first, bad,
           f.report("press-1", "1000123", "0010", y=3, reason="completion"), f.completed("press-1", "1000123", "0010")]
    done = evs[3]
    outcomes = [(await led.process(conn, f.topic("press-1"), _b(e)))[0].outcome for e in evs]
    assert outcomes == ["accepted", "rejected", "accepted", "accepted"]
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("partial",)]  # held
    return f, bad, done


async def test_gaps_lists_the_rejected_seq_and_the_completion_held_behind_it(conn, config):
    led = Ledger(ServiceConfig())
    f, bad, done = await _held(conn, led)
    # a second stream with a seq that never arrived (no rejection) and one with no gap
    g = EventFactory("gw-02")
    g.report("press-2", "2", "0010", y=1)  # seq 1: never delivered
    g_done = [g.report("press-2", "2", "0010", y=1, reason="completion"), g.completed("press-2", "2", "0010")]
    await led.process(conn, g.topic("press-2"), _b(g_done))
    h = EventFactory("gw-03")
    await led.process(conn, h.topic("m"), _b(h.report("m", "3", "0010", y=1)))
    [(rejected_at,)] = await _rows(conn, "SELECT received_at FROM erp_rejected")

    rc, out, err = await _cli("gaps", "--config", str(config))
    assert rc == 0, err
    assert re.sub(r"open \d+ s$", "open N s", out, flags=re.MULTILINE).splitlines() == [
        f"{f.source} epoch {f.epoch}: every seq up to 1 arrived, highest 4, 1 missing, open N s",
        (f"  seq 2: rejected {utc_text(rejected_at)}: operation.quantity_reported {bad['id']}: "
         f"data.quantities.yield: 4 is not of type 'string'"),
        f"  held: seq 4 operation.completed {done['id']} (order 1000123 operation 0010 machine press-1)",
        f"{g.source} epoch {g.epoch}: every seq up to 0 arrived, highest 3, 1 missing, open N s",
        "  seq 1: missing, no rejection recorded (may still arrive; release only with --event-lost if known lost)",
        f"  held: seq 3 operation.completed {g_done[1]['id']} (order 2 operation 0010 machine press-2)"]
    rc, out, err = await _cli("gaps", "--config", str(config), "--source", f.source, "--json")
    assert rc == 0, err
    [s] = json.loads(out)
    assert {k: s[k] for k in ("source", "epoch", "low", "high", "missing", "missing_ranges", "held")} == {
        "source": f.source, "epoch": f.epoch, "low": 1, "high": 4, "missing": 1, "missing_ranges": [[2, 2]],
        "held": [{"seq": 4, "id": done["id"], "order": "1000123", "operation": "0010", "machine": "press-1"}]}
    assert list(s["rejected"]) == ["2"] and s["rejected"]["2"]["id"] == bad["id"]
    assert s["rejected"]["2"]["type"] == "operation.quantity_reported"
    rc, out, _ = await _cli("gaps", "--config", str(config), "--source", h.source)
    assert rc == 0 and out == f"no open seq gap for source {h.source}\n"
    # a long run (a stream whose first events were never received), one rejection inside it
    k = EventFactory("gw-04")
    for _ in range(59):
        k.report("m", "4", "0010", y=1)
    odd = k.report("m", "4", "0010", y=1)
    odd["data"]["quantities"]["yield"] = 1
    await led.process(conn, k.topic("m"), _b([odd, k.report("m", "4", "0010", y=1)]))
    rc, out, _ = await _cli("gaps", "--config", str(config), "--source", k.source)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("  seq 60: rejected ") and odd["id"] in lines[1]
    assert lines[2] == ("  seq 1-60: 59 missing, no rejection recorded (may still arrive; release only with "
                        "--event-lost if known lost)")


async def test_release_gap_applies_the_held_final_confirmation(conn, config, dsn):
    led = Ledger(ServiceConfig())
    f, bad, done = await _held(conn, led)
    before = datetime.now(UTC)
    rc, out, err = await _cli("release-gap", "--config", str(config), "--source", f.source, "--epoch", f.epoch,
                              "--seq", "2", "--reason", "booked by hand in SAP, ticket 4711")
    assert rc == 0, err
    assert out.splitlines() == [
        f"released seq 2 of {f.source} epoch {f.epoch} (its rejected operation.quantity_reported {bad['id']})",
        "watermark 1 -> 4 (highest 4)",
        f"final confirmation applied: seq 4 {done['id']} (order 1000123 operation 0010 machine press-1)"]
    # the ledger: the rejected 4 is not in it (booked by hand in the ERP); the final went out, last
    assert await _rows(conn, "SELECT machine, order_id, operation, yield, scrap, rework, reports FROM erp_ledger") == [
        ("press-1", "1000123", "0010", Decimal(8), Decimal(0), Decimal(0), 2)]
    rows = await _rows(conn, "SELECT external_id, kind, state, body FROM erp_outbox ORDER BY n")
    assert [(k, s) for _, k, s, _ in rows] == [("partial", "pending"), ("partial", "pending"), ("final", "pending")]
    final = rows[2][3]
    assert {k: final[k] for k in ("OrderID", "OrderOperation", "ConfirmationYieldQuantity", "ConfirmationScrapQuantity",
                                  "ConfirmationReworkQuantity", "ConfirmationUnit", "FinalConfirmationType",
                                  "IsFinalConfirmation", "ExternalSystemConfirmation")} == {
        "OrderID": "1000123", "OrderOperation": "0010", "ConfirmationYieldQuantity": "0",
        "ConfirmationScrapQuantity": "0", "ConfirmationReworkQuantity": "0", "ConfirmationUnit": "PCE",
        "FinalConfirmationType": "X", "IsFinalConfirmation": True, "ExternalSystemConfirmation": done["id"]}
    assert rows[2][0] == done["id"]
    assert await _rows(conn, "SELECT order_id, operation, machine, final_id, totals FROM erp_operations") == [
        ("1000123", "0010", "press-1", done["id"], {"yield": "12", "scrap": "0", "rework": "0"})]
    assert await _rows(conn, "SELECT applied FROM erp_events WHERE id = %s", done["id"]) == [(True,)]
    assert await _rows(conn, "SELECT low, high, received, reorders, gap_since FROM erp_streams") == [
        (4, 4, 4, 0, None)]
    # the audit
    assert await _rows(conn, "SELECT source, epoch, seq, id FROM erp_filled") == [(f.source, f.epoch, 2, bad["id"])]
    [(reason, by, db_user, lost, rejected_n, rejected_id, at)] = await _rows(
        conn, "SELECT reason, released_by, db_user, event_lost, rejected_n, rejected_id, released_at FROM erp_releases")
    assert (reason, by, db_user, lost, rejected_id) == ("booked by hand in SAP, ticket 4711", _os_user(),
                                                        "postgres", False, bad["id"])
    assert await _rows(conn, "SELECT id FROM erp_rejected WHERE n = %s", rejected_n) == [(bad["id"],)]
    assert before - timedelta(seconds=5) < at < datetime.now(UTC)
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [rel] = [e for e in logged if e["event"] == "erp.gap_released"]
    assert {k: rel[k] for k in ("source", "epoch", "seq", "reason", "released_by", "event_lost", "rejected_id",
                                "rejected_type", "low_before", "low", "high", "completions_applied")} == {
        "source": f.source, "epoch": f.epoch, "seq": 2, "reason": "booked by hand in SAP, ticket 4711",
        "released_by": _os_user(), "event_lost": False, "rejected_id": bad["id"],
        "rejected_type": "operation.quantity_reported", "low_before": 1, "low": 4, "high": 4,
        "completions_applied": [done["id"]]}
    assert "erp.completion_released" in [e["event"] for e in logged]
    # the service counts it (from the database: the command runs in its own process) and /status shows it
    from erp_service.service import ErpService

    svc = ErpService(ServiceConfig(postgres={"dsn": dsn}))
    s = await svc.refresh_gauges(conn)
    assert s["seqs_released"] == 1 and s["gaps"] == [] and s["completions_held"] == 0
    assert svc.metrics.seqs_released._value.get() == 1
    rc, out, _ = await _cli("gaps", "--config", str(config))
    assert rc == 0 and out == "no open seq gap\n"


async def test_release_gap_refuses_what_holds_nothing_or_may_still_arrive(conn, config):
    led = Ledger(ServiceConfig())
    f, _, _ = await _held(conn, led)
    # a rejected state change: filled by itself (books nothing); a seq that never arrived (gw-02 seq 1)
    st = f.state("press-1", "running")
    st["data"]["raw"] = {"not": "a scalar"}
    await led.process(conn, f.topic("press-1"), _b(st))
    g = EventFactory("gw-02")
    g.report("press-2", "2", "0010", y=1)
    await led.process(conn, g.topic("press-2"), _b([g.report("press-2", "2", "0010", y=1, reason="completion"),
                                                    g.completed("press-2", "2", "0010")]))
    base = ("release-gap", "--config", str(config), "--reason", "booked by hand")
    cases = [
        (("--source", "/acme/nowhere/gw-9", "--epoch", f.epoch, "--seq", "2"),
         "unknown stream: no event of source '/acme/nowhere/gw-9' was ever received"),
        (("--source", f.source, "--epoch", "e0", "--seq", "2"),
         f"unknown stream: source '{f.source}' has no epoch 'e0' (its epochs: {f.epoch})"),
        (("--source", f.source, "--epoch", f.epoch, "--seq", "3"),
         f"seq 3 of {f.source} epoch {f.epoch}: its event arrived (operation.quantity_reported "),
        (("--source", f.source, "--epoch", f.epoch, "--seq", "5"),
         f"seq 5 of {f.source} epoch {f.epoch}: already filled (its rejected event {st['id']} books nothing)"),
        (("--source", f.source, "--epoch", f.epoch, "--seq", "6"),
         f"seq 6 of {f.source} epoch {f.epoch}: beyond the highest seq received (5): nothing is held behind it"),
        (("--source", f.source, "--epoch", f.epoch, "--seq", "0"), "seqs start at 1"),
        (("--source", g.source, "--epoch", g.epoch, "--seq", "1"),
         (f"seq 1 of {g.source} epoch {g.epoch}: no rejection recorded for it, its event may only be late and "
          f"still arrive; release it only if it is known lost (--event-lost)")),
        # all or nothing: seq 2 alone would be released
        (("--source", f.source, "--epoch", f.epoch, "--seq", "2", "--seq", "3"), "seq 3 of"),
    ]
    for args, why in cases:
        rc, out, err = await _cli(*base, *args)
        line = _refusal(err)
        assert rc == 1 and out == "" and line.startswith("refused: ") and why in line, (args, line)
    rc, out, err = await _cli("release-gap", "--config", str(config), "--source", f.source, "--epoch", f.epoch,
                              "--seq", "2", "--reason", "  ")
    assert rc == 1 and "the reason is empty" in _refusal(err)
    rc, out, err = await _cli("release-gap", "--config", str(config), "--source", f.source, "--epoch", f.epoch,
                              "--seq", "2")
    assert rc == 2 and "--reason" in err and "Traceback" not in err  # argparse: required
    assert await _rows(conn, "SELECT count(*) FROM erp_releases") == [(0,)]
    assert await _rows(conn, "SELECT seq FROM erp_filled ORDER BY seq") == [(5,)]
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",)] * 3  # g's completion report
    assert await _rows(conn, "SELECT source, low FROM erp_streams ORDER BY source") == [(f.source, 1), (g.source, 0)]
    # known lost: released with --event-lost, recorded as such
    rc, out, err = await _cli(*base, "--source", g.source, "--epoch", g.epoch, "--seq", "1", "--event-lost")
    assert rc == 0, err
    assert f"released seq 1 of {g.source} epoch {g.epoch} (no rejection recorded: released as lost)" in out
    assert await _rows(conn, "SELECT seq, event_lost, rejected_n, rejected_id FROM erp_releases") == [
        (1, True, None, None)]
    assert await _rows(conn, "SELECT kind FROM erp_outbox WHERE order_id = '2' ORDER BY n") == [("partial",),
                                                                                               ("final",)]
    # a database that cannot be reached: one line, exit 1
    down = config.parent / "down.yaml"
    down.write_text(yaml.safe_dump({"postgres": {"dsn": "postgresql://postgres@127.0.0.1:1/x?connect_timeout=2"}}))
    rc, out, err = await _cli("gaps", "--config", str(down))
    assert rc == 1 and _refusal(err).startswith("database unreachable: ")


async def test_a_repeated_release_is_refused_naming_the_first(conn, config):
    led = Ledger(ServiceConfig())
    f, _, _ = await _held(conn, led)
    args = ("release-gap", "--config", str(config), "--source", f.source, "--epoch", f.epoch, "--seq", "2")
    rc, _, err = await _cli(*args, "--reason", "booked by hand, ticket 1")
    assert rc == 0, err
    rc, out, err = await _cli(*args, "--reason", "booked by hand, ticket 2")
    line = _refusal(err)
    assert rc == 1 and out == ""
    assert line.startswith(f"refused: seq 2 of {f.source} epoch {f.epoch}: already released on ")
    assert line.endswith(f" by {_os_user()} (booked by hand, ticket 1)")
    assert await _rows(conn, "SELECT reason FROM erp_releases") == [("booked by hand, ticket 1",)]
    assert await _rows(conn, "SELECT kind, count(*) FROM erp_outbox GROUP BY kind ORDER BY kind") == [
        ("final", 1), ("partial", 2)]


async def test_an_event_arriving_under_a_released_seq_is_a_conflict_never_booked(conn):
    """The integrator booked the rejected report by hand and released its seq; then the gateway's operator fixes the
    quarantined event and retries it (same id, same seq, now valid). Booking it would book the 4 pieces twice and
    after the final confirmation: it is a conflict (erp_conflicts kind 'released', alarmed, rejected to the
    gateway), nothing is booked. Same for an event released as lost that turns up after all."""
    led = Ledger(ServiceConfig())
    f, bad, _ = await _held(conn, led)
    await led.release_gap(conn, f.source, f.epoch, [2], reason="booked by hand in SAP", released_by="integrator")
    fixed = json.loads(json.dumps(bad))
    fixed["data"]["quantities"]["yield"] = "4"
    for again in (fixed, [fixed]):  # alone, and in a batch: the second is the same conflict again
        [r] = await led.process(conn, f.topic("press-1"), _b(again))
        assert r.outcome == "conflict"
        ack = r.ack()
        assert ack["status"] == "rejected" and ack["event"] == fixed
        assert ack["reason"].startswith("conflict: released: seq 2 was released by hand on ")
        assert "by integrator (booked by hand in SAP); this event is not booked" in ack["reason"]
    assert led.metrics.conflicts._value.get() == 2
    rows = await _rows(conn, "SELECT kind, id, seq, first_id, first_body, body FROM erp_conflicts")
    assert [(k, i, s, fi) for k, i, s, fi, _, _ in rows] == [("released", bad["id"], 2, bad["id"])] * 2
    assert rows[0][4]["reason"] == "booked by hand in SAP" and rows[0][4]["released_by"] == "integrator"
    assert rows[0][5] == fixed
    assert await _rows(conn, "SELECT yield, reports FROM erp_ledger") == [(Decimal(8), 2)]
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("partial",), ("final",)]
    assert await _rows(conn, "SELECT count(*) FROM erp_events") == [(3,)]
    assert await _rows(conn, "SELECT low, high, received FROM erp_streams") == [(4, 4, 4)]

    g = EventFactory("gw-02")
    lost = g.report("press-2", "2", "0010", y=6)
    await led.process(conn, g.topic("press-2"), _b([g.report("press-2", "2", "0010", y=1, reason="completion"),
                                                    g.completed("press-2", "2", "0010")]))
    with pytest.raises(ReleaseRefused, match="no rejection recorded"):
        await led.release_gap(conn, g.source, g.epoch, [1], reason="store lost", released_by=None)
    await led.release_gap(conn, g.source, g.epoch, [1], reason="store lost", released_by=None, event_lost=True)
    [r] = await led.process(conn, g.topic("press-2"), _b(lost))
    assert r.outcome == "conflict" and "(store lost)" in r.reason
    assert await _rows(conn, "SELECT yield FROM erp_ledger WHERE order_id = '2'") == [(Decimal(1),)]


async def test_an_event_racing_the_release_is_not_booked_after_it(dsn):
    """The fixed report arrives while the release runs: inserted (not yet committed) before the release looked at
    the seq, so the release does not see it and goes ahead. Its transaction then finds the release under the stream
    lock, starts again and ends as a conflict: nothing booked twice."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as worker, \
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as operator:
        await ensure_schema(worker)
        led = Ledger(ServiceConfig())
        f, bad, done = await _held(worker, led)
        fixed = json.loads(json.dumps(bad))
        fixed["data"]["quantities"]["yield"] = "4"
        inserted, go = asyncio.Event(), asyncio.Event()
        advance = led._advance
        calls = []

        async def paused(conn, key, evs, fin, **kw):  # after the event's insert, before the stream lock
            calls.append([e["seq"] for e in evs])
            if len(calls) == 1:
                inserted.set()
                await go.wait()
            return await advance(conn, key, evs, fin, **kw)

        led._advance = paused
        arriving = asyncio.create_task(led.process(worker, f.topic("press-1"), _b(fixed)))
        await asyncio.wait_for(inserted.wait(), 10)
        out = await Ledger(ServiceConfig()).release_gap(operator, f.source, f.epoch, [2], reason="booked by hand",
                                                        released_by="integrator")
        assert [c["id"] for c in out["completions"]] == [done["id"]]
        go.set()
        [r] = await asyncio.wait_for(arriving, 10)
        assert calls == [[2]]  # the second run did not get as far as the stream: conflict at the insert
        assert r.outcome == "conflict" and r.reason.startswith("conflict: released: seq 2")
        assert led.metrics.db_retries._value.get() == 1
        assert await _rows(worker, "SELECT yield, reports FROM erp_ledger") == [(Decimal(8), 2)]
        assert await _rows(worker, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("partial",),
                                                                                ("final",)]
        assert await _rows(worker, "SELECT kind FROM erp_conflicts") == [("released",)]


async def test_a_service_of_an_older_version_cannot_store_an_event_under_a_released_seq(conn):
    """During an upgrade a service process of a version before the release (it inserts every new event and books it,
    no erp_releases check) may still run beside this one. Its insert of the fixed event under the released seq fails
    in the database (a trigger: an integrity error, which such a process does not book), so the pieces booked by hand
    are not booked twice (red before: the row was stored, the old process would book it). This version's own insert
    skips the seq as before (a conflict), and other seqs are stored as ever."""
    from psycopg import errors as pgerr
    from psycopg.types.json import Jsonb

    from erp_service.ledger import digest, parse_time

    led = Ledger(ServiceConfig())
    f, bad, _ = await _held(conn, led)
    await led.release_gap(conn, f.source, f.epoch, [2], reason="booked by hand in SAP", released_by="integrator")
    fixed = json.loads(json.dumps(bad))
    fixed["data"]["quantities"]["yield"] = "4"

    async def old_version_insert(ev):  # what such a process sends for a new event, before booking it
        await conn.execute(
            "INSERT INTO erp_events (source, id, epoch, seq, type, subject, event_time, body, digest, applied) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, true)",
            (ev["source"], ev["id"], ev["epoch"], ev["seq"], ev["type"], ev["subject"], parse_time(ev["time"]),
             Jsonb(ev), digest(ev)))

    with pytest.raises(pgerr.CheckViolation, match="seq 2 of .* was released by hand"):
        async with conn.transaction():
            await old_version_insert(fixed)
    assert await _rows(conn, "SELECT count(*) FROM erp_events WHERE seq = 2") == [(0,)]
    [r] = await led.process(conn, f.topic("press-1"), _b(fixed))
    assert r.outcome == "conflict"
    assert await _rows(conn, "SELECT yield, reports FROM erp_ledger") == [(Decimal(8), 2)]
    async with conn.transaction():
        await old_version_insert(f.report("press-1", "1000123", "0010", y=1))  # seq 5: not released
    assert await _rows(conn, "SELECT seq FROM erp_events ORDER BY seq") == [(1,), (3,), (4,), (5,)]


async def test_a_dead_lettered_event_is_a_recorded_rejection_released_without_event_lost(conn):
    """A message the service failed on again and again is dead-lettered. Its events were stored in one row without a
    source, so `gaps` called their seqs "no rejection recorded" and `release-gap` wanted --event-lost although the
    events had arrived (red before). Each readable event of it is now its own rejection (source, id, body)."""
    led = Ledger(ServiceConfig())
    f = EventFactory()
    first = f.report("press-1", "1", "0010", y=5)
    lost, also = f.report("press-1", "1", "0010", y=4), f.report("press-1", "1", "0010", y=3)
    await led.process(conn, f.topic("press-1"), _b(first))
    await led.dead_letter(conn, f.topic("press-1"), _b([lost, also]), "RuntimeError: a bug")
    await led.process(conn, f.topic("press-1"), _b([f.report("press-1", "1", "0010", y=1, reason="completion"),
                                                     f.completed("press-1", "1", "0010")]))
    found = await led._rejections(conn, f.source, f.epoch)
    assert sorted(found) == [2, 3] and found[2]["id"] == lost["id"] and "internal error" in found[2]["reason"]
    await led.release_gap(conn, f.source, f.epoch, [2, 3], reason="booked by hand", released_by="integrator")
    assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("partial",), ("final",)]
    await led.dead_letter(conn, "t", b"\x00 not json", "ValueError")  # nothing readable: one row, as received
    assert await _rows(conn, "SELECT count(*) FROM erp_rejected WHERE source IS NULL") == [(1,)]


async def test_several_seqs_released_on_a_database_from_before_the_release_existed(dsn, config):
    """A database the previous version created and used (every table but erp_releases; its rejections stored then):
    the command creates the table and finds those rejections (read from the stored events). Two rejected seqs, a
    report PostgreSQL could not store and an invalid consumption, released in one command: the final goes out."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await ensure_schema(conn)
        led = Ledger(ServiceConfig())
        f = EventFactory()
        # contract-valid, and this database refuses to store it (a CHECK constraint: the contract refuses every text
        # PostgreSQL cannot hold, such as a NUL)
        await conn.execute("ALTER TABLE erp_ledger ADD CONSTRAINT no_small_report CHECK (yield <> 3)")
        nul = f.report("press-1", "1", "0010", y=3)
        con = f.consumed("press-1", "1", "0010", 3, 0, [("RM-1", "2", "KG")])
        con["data"]["components"][0]["quantity"] = 2  # not a decimal string
        results = await led.process(conn, f.topic("press-1"), _b([nul, con]))
        results += await led.process(conn, f.topic("press-1"), _b([f.report("press-1", "1", "0010", y=7,
                                                                              reason="completion"),
                                                                     f.completed("press-1", "1", "0010")]))
        assert [r.outcome for r in results] == ["rejected", "rejected", "accepted", "accepted"]
        assert results[0].reason.startswith("cannot be booked")  # by the database, not the contract
        await conn.execute("ALTER TABLE erp_ledger DROP CONSTRAINT no_small_report")
        await conn.execute("DROP TABLE erp_releases")  # what the previous version left: the rest is the same
        rc, out, err = await _cli("release-gap", "--config", str(config), "--source", f.source, "--epoch", f.epoch,
                                  "--seq", "2", "--seq", "1", "--reason", "posted by hand")
        assert rc == 0, err
        assert out.splitlines()[:3] == [
            f"released seq 1 of {f.source} epoch {f.epoch} (its rejected operation.quantity_reported {nul['id']})",
            f"released seq 2 of {f.source} epoch {f.epoch} (its rejected material.consumed {con['id']})",
            "watermark 0 -> 4 (highest 4)"]
        assert await _rows(conn, "SELECT seq, rejected_id, event_lost FROM erp_releases ORDER BY seq") == [
            (1, nul["id"], False), (2, con["id"], False)]
        assert await _rows(conn, "SELECT kind FROM erp_outbox ORDER BY n") == [("partial",), ("final",)]
        assert await _rows(conn, "SELECT order_id, yield FROM erp_ledger") == [("1", Decimal(7))]
        assert await _rows(conn, "SELECT count(*) FROM erp_consumption") == [(0,)]
        assert await _rows(conn, "SELECT low, high, received FROM erp_streams") == [(4, 4, 4)]


async def test_an_event_arriving_under_a_seq_its_rejected_version_filled_is_counted_once(conn):
    """A state event rejected (it books nothing: its seq is filled at once), then the same event valid under the same
    seq (sent again after a fix): it is stored and the stream counts seq 2 once (red before: ``received`` counted it
    twice, so ``gaps`` showed one missing seq too few)."""
    led = Ledger(ServiceConfig())
    f = EventFactory()
    first = f.report("press-1", "1000123", "0010", y=5)
    bad = f.state("press-1", "running")
    bad["data"]["state"] = 7
    third = f.report("press-1", "1000123", "0010", y=2)
    for e in (first, bad, third):
        await led.process(conn, f.topic("press-1"), _b(e))
    assert await _rows(conn, "SELECT low, high, received FROM erp_streams") == [(3, 3, 3)]
    fixed = json.loads(json.dumps(bad))
    fixed["data"]["state"] = "running"
    [r] = await led.process(conn, f.topic("press-1"), _b(fixed))
    assert r.outcome == "accepted"
    assert await _rows(conn, "SELECT low, high, received FROM erp_streams") == [(3, 3, 3)]
    fifth = f.report("press-1", "1000123", "0010", y=1)
    fifth["seq"] += 1  # seq 4 never arrives: one missing
    await led.process(conn, f.topic("press-1"), _b(fifth))
    assert [(g["low"], g["high"], g["missing"]) for g in await led.open_gaps(conn)] == [(3, 5, 1)]
