"""Outbox poster against the simulated SAP endpoint (real HTTP) and a real PostgreSQL: retries, backoff, lost
responses, idempotency by external id, final confirmation ordered after the partials."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import aiohttp
import psycopg
import pytest

from erp_service.config import ErpEndpointConfig, ServiceConfig
from erp_service.ledger import Ledger, ensure_schema
from erp_service.metrics import Metrics
from erp_service.poster import Poster
from erp_service.testing import EventFactory
from simulators.erp_endpoint import ErpEndpoint
from tests.e2e import wait_until


@pytest.fixture
async def conn(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        await ensure_schema(c)
        yield c


@pytest.fixture
async def endpoint():
    async with ErpEndpoint() as ep:
        yield ep


def _cfg(ep: ErpEndpoint, **kw) -> ErpEndpointConfig:
    return ErpEndpointConfig(url=ep.url, backoff_initial_s=0.05, backoff_max_s=0.2, poll_s=0.02, timeout_s=2, **kw)


async def _feed(conn, events) -> None:
    led = Ledger(ServiceConfig())
    for ev in events:
        await led.process(conn, "t/events/batch", json.dumps(ev).encode())


async def _states(conn):
    cur = await conn.execute("SELECT external_id, state, attempts FROM erp_outbox ORDER BY n")
    return await cur.fetchall()


async def _run_poster(poster: Poster, until, timeout: float = 20.0) -> None:
    """Run the poster until ``until()`` (a bool, or a coroutine of one) holds, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(poster.run(stop))
    try:
        await wait_until(until, timeout)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_posts_every_document_once(conn, dsn, endpoint):
    f = EventFactory()
    evs = [f.report("press-1", "1000123", "0010", y=10, s=1),
           f.consumed("press-1", "1000123", "0010", 10, 1, [("RM-100", "2.75", "KG")]),
           f.report("press-1", "1000123", "0010", y=5, reason="completion"),
           f.completed("press-1", "1000123", "0010")]
    await _feed(conn, evs)
    metrics = Metrics()
    poster = Poster(_cfg(endpoint), dsn, metrics)
    await _run_poster(poster, lambda: poster.posted == 4)
    assert [p["ExternalSystemConfirmation"] for p in endpoint.postings] == [e["id"] for e in evs]
    assert endpoint.duplicates == {}
    assert endpoint.totals() == {("1000123", "0010"): {
        "yield": Decimal(15), "scrap": Decimal(1), "rework": Decimal(0), "final": True,
        "goods": {("RM-100", "KG"): Decimal("2.75")}}}
    assert {s for _, s, _ in await _states(conn)} == {"sent"}
    cur = await conn.execute("SELECT response->>'ConfirmationGroup' FROM erp_outbox WHERE external_id = %s",
                             (evs[0]["id"],))
    assert (await cur.fetchone())[0] == "1"
    assert metrics.posted.labels("final")._value.get() == 1
    assert metrics.posting_latency._sum.get() > 0


async def test_erp_unavailable_retried_with_backoff_then_posted(conn, dsn, endpoint):
    f = EventFactory()
    evs = [f.report("press-1", "1", "0010", y=i + 1) for i in range(3)]
    await _feed(conn, evs)
    endpoint.set_failing(True)
    metrics = Metrics()
    poster = Poster(_cfg(endpoint), dsn, metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(poster.run(stop))
    try:
        await wait_until(lambda: endpoint.failed >= 6)
        assert endpoint.postings == [] and not poster.healthy
        endpoint.set_failing(False)
        await wait_until(lambda: poster.posted == 3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert sorted(p["ExternalSystemConfirmation"] for p in endpoint.postings) == sorted(e["id"] for e in evs)
    assert endpoint.duplicates == {}
    assert metrics.erp_errors.labels("unavailable")._value.get() >= 6
    cur = await conn.execute("SELECT min(attempts) FROM erp_outbox")
    assert (await cur.fetchone())[0] >= 2


async def test_lost_response_is_looked_up_never_posted_twice(conn, dsn, endpoint):
    """The ERP booked the document but the answer was lost (503 after commit): the retry must find it, not re-POST."""
    f = EventFactory()
    evs = [f.report("press-1", "1", "0010", y=1), f.report("press-1", "1", "0010", y=2)]
    await _feed(conn, evs)
    endpoint.fail_after_commit_next(2)
    poster = Poster(_cfg(endpoint), dsn, Metrics())
    await _run_poster(poster, lambda: poster.posted == 2)
    assert endpoint.lost_responses == 2 and endpoint.lookups >= 2
    assert endpoint.duplicates == {}
    assert len(endpoint.postings) == 2
    assert [s for _, s, _ in await _states(conn)] == ["sent", "sent"]
    cur = await conn.execute("SELECT found_by_lookup, response->>'ConfirmationGroup' FROM erp_outbox ORDER BY n")
    assert await cur.fetchall() == [(True, "1"), (True, "2")]


async def test_answers_that_are_no_odata_document_neither_crash_the_poster_nor_post_twice(conn, dsn, endpoint):
    """A 2xx answer whose body is JSON but not an object (a proxy, an odd ERP build) and a lookup answer of an unknown
    shape raised AttributeError in the poster's task (red before): its claim waited a lease, and a lookup like that
    crashed it again at every attempt, so the row was never posted. Now the posting is recorded as sent (the body
    kept as text), an unknown lookup answer is a failed lookup (retried, never a blind POST), and the OData V1 shape
    ({"d": [...]}) is understood."""
    f = EventFactory()
    await _feed(conn, [f.report("press-1", "1", "0010", y=1), f.report("press-1", "1", "0010", y=2)])
    endpoint.fail_after_commit_next(1)  # the first: booked, its answer lost: the retry looks it up
    endpoint.odd_answers_n = 1  # the second: booked, answered with a JSON null
    endpoint.lookup_shape = "null"
    poster = Poster(_cfg(endpoint), dsn, Metrics())
    stop = asyncio.Event()
    task = asyncio.create_task(poster.run(stop))
    try:
        await wait_until(lambda: poster.posted == 1 and endpoint.lookups >= 2, 20)
        assert not task.done()
        cur = await conn.execute("SELECT state, last_error FROM erp_outbox ORDER BY n")
        rows = await cur.fetchall()
        assert rows[0][0] == "pending" and "lookup answer not understood" in rows[0][1] and rows[1][0] == "sent"
        endpoint.lookup_shape = "v1"
        await wait_until(lambda: poster.posted == 2, 20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert len(endpoint.postings) == 2 and endpoint.duplicates == {}
    cur = await conn.execute("SELECT state, found_by_lookup, response FROM erp_outbox ORDER BY n")
    first, second = await cur.fetchall()
    assert first[:2] == ("sent", True) and first[2]["ConfirmationGroup"] == "1"
    assert second == ("sent", False, {"raw": "null"})


async def test_poster_crash_mid_call_lease_expires_no_double_post(conn, dsn, endpoint):
    """A poster claimed a row and posted it, then died before marking it sent: after the lease another poster takes
    it over and finds the posting instead of sending it again."""
    f = EventFactory()
    ev = f.report("press-1", "1", "0010", y=7)
    await _feed(conn, [ev])
    cur = await conn.execute("UPDATE erp_outbox SET attempts = 1, next_attempt_at = now() RETURNING body")
    body = (await cur.fetchone())[0]
    await conn.commit()
    async with aiohttp.ClientSession() as http:  # the dead poster's POST reached the ERP
        async with http.post(f"{endpoint.url}/ProdnOrdConf2", json=body) as r:
            assert r.status == 201
    poster = Poster(_cfg(endpoint), dsn, Metrics())
    await _run_poster(poster, lambda: poster.posted == 1)
    assert len(endpoint.postings) == 1 and endpoint.duplicates == {}


async def test_final_confirmation_waits_for_earlier_partials(conn, dsn, endpoint):
    f = EventFactory()
    evs = [f.report("press-1", "1", "0010", y=3, reason="completion"), f.completed("press-1", "1", "0010")]
    await _feed(conn, evs)
    endpoint.fail_next(3)  # the partial fails three times; the final must not overtake it
    poster = Poster(_cfg(endpoint), dsn, Metrics())
    await _run_poster(poster, lambda: poster.posted == 2)
    assert [p["IsFinalConfirmation"] for p in endpoint.postings] == [False, True]


async def test_refused_document_is_failed_and_alarmed(conn, dsn, endpoint):
    f = EventFactory()
    await _feed(conn, [f.report("press-1", "1", "0010", y=3)])
    await conn.execute("UPDATE erp_outbox SET body = body - 'OrderID'")  # the ERP answers 400
    await conn.commit()
    metrics = Metrics()
    poster = Poster(_cfg(endpoint), dsn, metrics)
    await _run_poster(poster, lambda: metrics.erp_errors.labels("refused")._value.get() == 1)
    cur = await conn.execute("SELECT state, last_error FROM erp_outbox")
    state, err = await cur.fetchone()
    assert state == "failed" and err.startswith("HTTP 400")


async def test_slow_erp_books_after_the_client_timed_out_no_double_post(conn, dsn, endpoint):
    """The ERP takes longer than the poster's timeout but books the document anyway: the retry waits settle_s
    before its lookup, finds the booking, and does not post again."""
    f = EventFactory()
    ev = f.report("press-1", "1", "0010", y=4)
    await _feed(conn, [ev])
    endpoint.set_delay(1.0)
    cfg = ErpEndpointConfig(url=endpoint.url, backoff_initial_s=0.05, backoff_max_s=0.2, poll_s=0.02, timeout_s=0.3,
                            settle_s=2.0)
    metrics = Metrics()
    poster = Poster(cfg, dsn, metrics)
    await _run_poster(poster, lambda: poster.posted == 1)
    assert len(endpoint.postings) == 1 and endpoint.duplicates == {}
    assert metrics.erp_errors.labels("timeout")._value.get() == 1
    cur = await conn.execute("SELECT found_by_lookup, attempts FROM erp_outbox")
    assert await cur.fetchall() == [(True, 2)]


async def test_a_lost_database_connection_mid_batch_releases_the_claimed_rows(conn, dsn, endpoint):
    """PostgreSQL drops the poster's connection while it posts a claimed batch: the rows it had not settled are given
    back at the next connection (each one looked up before any POST, as for every retry), not left to wait out the
    lease (60 s here): every document is posted within seconds, none twice."""
    import structlog

    f = EventFactory()
    evs = [f.report("press-1", "1", "0010", y=i) for i in range(1, 7)]
    await _feed(conn, evs)
    await conn.commit()
    endpoint.set_delay(0.3)  # a batch takes ~2 s: the kill lands inside it
    poster = Poster(_cfg(endpoint, lease_s=60), dsn, Metrics())
    dbname = dsn.rsplit("/", 1)[1]
    ours = conn.pgconn.backend_pid
    with structlog.testing.capture_logs() as logs:
        stop = asyncio.Event()
        task = asyncio.create_task(poster.run(stop))
        try:
            await wait_until(lambda: poster.posted >= 1, timeout=10)
            async with await psycopg.AsyncConnection.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                                                             autocommit=True) as admin:
                cur = await admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                          "WHERE datname = %s AND pid <> %s", (dbname, ours))
                assert (await cur.fetchone())[0] == 1  # the poster's
            t0 = asyncio.get_running_loop().time()
            await wait_until(lambda: len(endpoint.postings) == len(evs), timeout=15,
                             message=f"posted {len(endpoint.postings)} of {len(evs)}")
            assert asyncio.get_running_loop().time() - t0 < 15  # well inside the 60 s lease
            await wait_until(lambda: poster.posted == len(evs), timeout=10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert [p["ExternalSystemConfirmation"] for p in endpoint.postings] == [e["id"] for e in evs]
    assert endpoint.duplicates == {}
    [lost] = [e for e in logs if e["event"] == "erp.poster_db_error"]
    [released] = [e for e in logs if e["event"] == "erp.poster_released"]
    assert lost["claimed_unsettled"] >= 1 and released["rows"] == lost["claimed_unsettled"]
    assert [s for _, s, _ in await _states(conn)] == ["sent"] * len(evs)


async def test_a_stop_mid_batch_gives_the_rest_of_the_claim_back(conn, dsn, endpoint):
    """A stop (SIGTERM, a deploy) while a poster works through a claimed batch: it finishes the row it is posting and
    gives the rest back at once, so a restarted service posts them within seconds instead of after the lease (60 s
    here). The rows were claimed once: each is looked up before its POST; none is posted twice."""
    f = EventFactory()
    evs = [f.report("press-1", "1", "0010", y=i) for i in range(1, 7)]
    await _feed(conn, evs)
    await conn.commit()
    endpoint.set_delay(0.3)
    poster = Poster(_cfg(endpoint, lease_s=60), dsn, Metrics())
    stop = asyncio.Event()
    task = asyncio.create_task(poster.run(stop))
    await wait_until(lambda: poster.posted >= 1, timeout=10)
    stop.set()
    await asyncio.wait_for(task, 5)
    cur = await conn.execute("SELECT count(*) FROM erp_outbox WHERE state = 'pending' AND next_attempt_at <= now()")
    pending = (await cur.fetchone())[0]
    assert pending >= 1 and pending + len(endpoint.postings) == len(evs)  # given back, none held for the lease
    await conn.commit()
    endpoint.set_delay(0)
    again = Poster(_cfg(endpoint, lease_s=60), dsn, Metrics())
    await _run_poster(again, lambda: len(endpoint.postings) == len(evs), timeout=10)
    assert [p["ExternalSystemConfirmation"] for p in endpoint.postings] == [e["id"] for e in evs]
    assert endpoint.duplicates == {} and endpoint.lookups >= pending


# --------------------------------------------------------------------------------- the lease (found by a review)
def _fed(n: int):
    f = EventFactory()
    return [f.report("press-1", "1000123", "0010", y=i) for i in range(1, n + 1)]


async def _all_sent(dsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        cur = await c.execute("SELECT count(*) FROM erp_outbox WHERE state <> 'sent'")
        return (await cur.fetchone())[0] == 0




async def test_a_batch_longer_than_the_lease_is_not_posted_twice_by_two_posters(conn, dsn, endpoint):
    """The lease is renewed before each row: a batch that takes longer than ``lease_s`` (a slow ERP) is not claimed
    again by a second poster while the first still works through it (which then POSTed it a second time, without a
    lookup: its claim said attempt 1). Red before: 6 documents posted twice."""
    evs = _fed(12)
    await _feed(conn, evs)
    await conn.commit()
    endpoint.set_delay(0.5)  # each posting takes 0.5 s: the 12-row batch takes 6 s, twice the lease
    cfg = ErpEndpointConfig(url=endpoint.url, timeout_s=1, settle_s=1, lease_s=3, backoff_initial_s=0.05,
                            backoff_max_s=0.2, poll_s=0.05)
    a, b = Poster(cfg, dsn, Metrics(), "poster-0"), Poster(cfg, dsn, Metrics(), "poster-1")
    stop = asyncio.Event()
    ta = asyncio.create_task(a.run(stop))
    await wait_until(lambda: endpoint.requests >= 1, timeout=5)  # poster-0 holds the whole batch
    tb = asyncio.create_task(b.run(stop))
    try:
        # every row sent, and poster-0 through its claimed batch (the duplicates came from its last rows)
        await wait_until(lambda: _idle_and_sent(dsn, a, endpoint), 30)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(ta, tb), 10)
    assert len(endpoint.by_external) == 12
    assert dict(endpoint.duplicates) == {}, f"posted twice: {len(endpoint.duplicates)} documents"


async def _idle_and_sent(dsn: str, poster: Poster, endpoint: ErpEndpoint) -> bool:
    return not poster._claimed and endpoint.in_flight == 0 and await _all_sent(dsn)


async def test_a_poster_killed_late_in_its_batch_is_not_posted_twice_after_a_restart(conn, dsn, endpoint, tmp_path):
    """A poster SIGKILLed during a POST late in its batch: the row's lease runs from that row's start (not from the
    claim, long past), so the restarted poster takes it over only after ``lease_s``, once the ERP has booked the
    killed request, and finds it by the lookup. Red before: the restarted poster looked it up while the ERP was still
    booking, found nothing and posted it again."""
    import subprocess
    import sys

    evs = _fed(8)
    await _feed(conn, evs)
    await conn.commit()
    endpoint.set_delay(0.8)  # the ERP books each posting after 0.8 s (also when the client is gone)
    lease, timeout, settle = 3.0, 1.0, 1.0  # lease_s >= 2 x timeout_s + settle_s
    script = tmp_path / "poster.py"
    script.write_text(
        "import asyncio, sys\n"
        "from erp_service.config import ErpEndpointConfig\n"
        "from erp_service.metrics import Metrics\n"
        "from erp_service.poster import Poster\n"
        f"cfg = ErpEndpointConfig(url={endpoint.url!r}, lease_s={lease}, timeout_s={timeout}, settle_s={settle}, "
        "backoff_initial_s=0.05, backoff_max_s=0.2, poll_s=0.05)\n"
        f"asyncio.run(Poster(cfg, {dsn!r}, Metrics(), 'victim').run(asyncio.Event()))\n")
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_until(lambda: endpoint.requests >= 6, timeout=20)  # the 6th POST is in flight (~4 s after claim)
    finally:
        proc.kill()
        proc.wait()
    cfg = ErpEndpointConfig(url=endpoint.url, lease_s=lease, timeout_s=timeout, settle_s=settle,
                            backoff_initial_s=0.05, backoff_max_s=0.2, poll_s=0.05)
    again = Poster(cfg, dsn, Metrics(), "restarted")  # systemd restarts the service at once
    await _run_poster(again, lambda: _idle_and_sent(dsn, again, endpoint), 30)
    assert len(endpoint.by_external) == 8
    assert dict(endpoint.duplicates) == {}, f"posted twice after the kill: {sorted(endpoint.duplicates)}"


async def test_a_504_from_a_proxy_waits_settle_s_before_the_lookup(conn, dsn, endpoint):
    """A 504 (or 502, 408) from a proxy in front of a slow ERP: the ERP may still be booking, as after a client
    timeout, so the lookup and retry wait ``settle_s``. Red before: retried at once (backoff), booked 3 times."""
    from aiohttp import web

    from simulators.erp_endpoint import BASE

    class TimeoutProxy:
        """Answers 504 when the backend takes longer than ``limit`` seconds (the backend goes on)."""

        def __init__(self, backend: str, limit: float) -> None:
            self.backend, self.limit, self.gateway_timeouts = backend, limit, 0

        async def _any(self, request: web.Request) -> web.Response:
            body = await request.read()
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.limit)) as s, \
                        s.request(request.method, self.backend + request.rel_url.path_qs, data=body,
                                  headers={"Content-Type": request.content_type}) as r:
                    return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            except TimeoutError:
                self.gateway_timeouts += 1
                return web.Response(status=504, text="upstream timed out")

    proxy = TimeoutProxy(f"http://{endpoint.host}:{endpoint.port}", 0.3)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy._any)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{BASE}"
    try:
        await _feed(conn, _fed(1))
        await conn.commit()
        endpoint.set_delay(1.0)  # the backend books after 1 s; the proxy gives up after 0.3 s
        cfg = ErpEndpointConfig(url=url, timeout_s=5, settle_s=2, lease_s=30, backoff_initial_s=0.05,
                                backoff_max_s=0.2, poll_s=0.05)
        poster = Poster(cfg, dsn, Metrics())
        await _run_poster(poster, lambda: _idle_and_sent(dsn, poster, endpoint), 30)
        assert proxy.gateway_timeouts >= 1
        assert len(endpoint.by_external) == 1
        assert dict(endpoint.duplicates) == {}, f"booked {len(endpoint.postings)} times"
    finally:
        await runner.cleanup()


async def test_a_long_erp_outage_does_not_crash_the_backoff(conn, dsn, endpoint):
    """After 1024 attempts (some 8.5 hours of ERP outage at the defaults) ``2 ** attempts`` is no float: the retry
    must still be written, after backoff_max_s (red before: OverflowError, the row held for the whole lease)."""
    await _feed(conn, _fed(2))
    await conn.execute("UPDATE erp_outbox SET attempts = 1024")
    await conn.commit()
    endpoint.set_failing(True)
    cfg = ErpEndpointConfig(url=endpoint.url, backoff_initial_s=0.5, backoff_max_s=30, lease_s=60)
    poster = Poster(cfg, dsn, Metrics())
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c, aiohttp.ClientSession() as http:
        assert await poster.post_once(c, http) == 2
        cur = await c.execute("SELECT count(*) FROM erp_outbox WHERE next_attempt_at > now() + interval '31 s'")
        assert (await cur.fetchone())[0] == 0  # retried after backoff_max_s, not held for the lease
