"""Outbox poster: sends ``erp_outbox`` documents to the ERP (``POST {erp.url}/ProdnOrdConf2``), idempotent by the
external id.

- A row is **claimed** by bumping ``attempts`` and pushing ``next_attempt_at`` one lease ahead, in a short
  transaction (``FOR UPDATE SKIP LOCKED``): several posters (tasks or processes) never post the same row at once, and
  no database lock is held during the HTTP call.
- 2xx: the row becomes ``sent`` (with the ERP's answer); it is never selected again, so an acknowledged document is
  never sent twice.
- The lease is renewed before each row is posted (``next_attempt_at = now() + lease_s``, only while ``attempts`` is
  still the claim's): another poster takes a row over only ``lease_s`` after this one started on it, so ``lease_s``
  must exceed the lookup and the POST (2 x ``timeout_s``) plus ``settle_s``.
- 5xx, timeout, connection error: the outcome is unknown. The row is retried with exponential backoff (after a
  timeout, a reset connection or a 502 / 504 / 408 from a proxy at least ``settle_s``: the ERP may still be booking
  the document), and every
  retry (``attempts > 1``, also after a poster crashed mid-call and the lease ran out) first **looks the external id
  up** (``GET ...?$filter=ExternalSystemConfirmation eq '...'``): found means posted, the row is marked sent without a
  second POST.
- Other 4xx: the ERP refused the document: ``failed``, alarmed (``edge_erp_erp_errors_total{reason="refused"}``);
  an operator decides.
- A final confirmation waits until every earlier document of its order / operation is sent.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
import psycopg
import structlog
from psycopg.types.json import Jsonb

from erp_service.config import ConfigError, ErpEndpointConfig
from erp_service.metrics import Metrics

log = structlog.get_logger(__name__)

_CLAIM = """
WITH c AS (
    SELECT o.external_id FROM erp_outbox o
    WHERE o.state = 'pending' AND o.next_attempt_at <= now()
      AND NOT (o.kind = 'final' AND EXISTS (
          SELECT 1 FROM erp_outbox p WHERE p.order_id = o.order_id AND p.operation = o.operation AND p.n < o.n
            AND p.state <> 'sent'))
    ORDER BY o.n LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
UPDATE erp_outbox o SET attempts = o.attempts + 1, next_attempt_at = now() + %(lease)s * interval '1 second'
FROM c WHERE o.external_id = c.external_id
RETURNING o.external_id, o.kind, o.body, o.attempts, o.event_time, o.n
"""


class Poster:
    def __init__(self, cfg: ErpEndpointConfig, dsn: str, metrics: Metrics, name: str = "poster") -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.metrics = metrics
        self.name = name
        self.kick = asyncio.Event()
        self.posted = 0
        # rows of the current claim not yet settled (sent / retry / failed written): external id -> (attempts as
        # claimed, the delay to release it with). Left over when the database connection dies mid-batch, they are
        # released at the next connection instead of waiting out the lease (see _release).
        self._claimed: dict[str, tuple[int, float]] = {}
        self._unreleased: dict[str, tuple[int, float]] = {}
        self.healthy = True          # last ERP call succeeded (or none failed yet)
        self._auth = None
        if cfg.username:
            password = os.environ.get(cfg.password_env or "")
            if not password:  # never an empty password in its place, silently
                raise ConfigError(f"erp.password_env: the environment variable {cfg.password_env} (the password of "
                                  f"erp.username) is not set")
            self._auth = aiohttp.BasicAuth(cfg.username, password)

    async def run(self, stop: asyncio.Event) -> None:
        """Post until ``stop`` is set; survives database and ERP outages (logs and retries)."""
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, auth=self._auth) as http:
            conn: psycopg.AsyncConnection[Any] | None = None
            while not stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                    if self._unreleased:
                        await self._release(conn)
                    n = await self.post_once(conn, http, stop)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._set_aside_claim()
                    log.warning("erp.poster_db_error", poster=self.name, error=str(exc)[:300],
                                claimed_unsettled=len(self._unreleased))
                    if conn is not None:
                        await conn.close()
                    conn = None
                    n = 0
                    await _wait(stop, 1.0)
                if n == 0:
                    await self._idle(stop)
            if conn is not None:
                await conn.close()

    async def _idle(self, stop: asyncio.Event) -> None:
        self.kick.clear()
        waiter = asyncio.ensure_future(self.kick.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, timeout=self.cfg.poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()

    async def post_once(self, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession,
                        stop: asyncio.Event | None = None) -> int:
        """Claim and post one batch; returns the number of rows claimed. A stop ends the batch after the row being
        posted, and the rest of the claim is given back at once (not held for the lease until a restart)."""
        cur = await conn.execute(_CLAIM, {"limit": self.cfg.batch, "lease": self.cfg.lease_s})
        rows = sorted(await cur.fetchall(), key=lambda r: r[5])
        self._claimed = {r[0]: (r[3], 0.0) for r in rows}
        for ext, kind, body, attempts, event_time, _n in rows:
            if stop is not None and stop.is_set():
                break
            # the lease runs from each row's own start, not from the claim: a batch that takes longer than the lease
            # (a slow ERP) is not claimed again by another poster while this one still posts it
            if await self._renew(conn, ext, attempts):
                await self._post_row(conn, http, ext, kind, body, attempts, event_time)
            self._claimed.pop(ext, None)
        if self._claimed:
            self._set_aside_claim()
            await self._release(conn)
        return len(rows)

    async def _renew(self, conn: psycopg.AsyncConnection[Any], ext: str, attempts: int) -> bool:
        """Push the row's lease one ``lease_s`` ahead from now, if it is still ours (pending, ``attempts`` as
        claimed); False: another poster has claimed it since (the lease had run out), or it is settled."""
        cur = await conn.execute("UPDATE erp_outbox SET next_attempt_at = now() + %s * interval '1 second' "
                                 "WHERE external_id = %s AND state = 'pending' AND attempts = %s",
                                 (self.cfg.lease_s, ext, attempts))
        if cur.rowcount == 1:
            return True
        log.warning("erp.claim_lost", poster=self.name, external_id=ext, attempts=attempts,
                    hint="the row was claimed again after lease_s: raise erp.lease_s above the time one posting takes")
        return False

    def _set_aside_claim(self) -> None:
        """The current claim's unsettled rows, to be given back by _release."""
        self._unreleased.update(self._claimed)
        self._claimed = {}

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back the rows a lost connection left claimed: due now, or after ``settle_s`` for one whose POST timed
        out (the ERP may still be booking it). Each was claimed once already, so its next attempt looks the external
        id up before any POST. A row another poster has claimed since (the lease ran out: ``attempts`` moved on) or
        that is no longer pending is left alone."""
        released = 0
        for ext, (attempts, delay) in list(self._unreleased.items()):
            cur = await conn.execute(
                "UPDATE erp_outbox SET next_attempt_at = LEAST(next_attempt_at, now() + %s * interval '1 second') "
                "WHERE external_id = %s AND state = 'pending' AND attempts = %s", (delay, ext, attempts))
            released += cur.rowcount
            del self._unreleased[ext]
        log.info("erp.poster_released", poster=self.name, rows=released)

    async def _post_row(self, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession, ext: str, kind: str,
                        body: dict[str, Any], attempts: int, event_time: datetime) -> None:
        url = f"{self.cfg.url}/ProdnOrdConf2"
        if attempts > 1:
            # the outcome of an earlier attempt is unknown: never POST blindly again
            try:
                found = await self._lookup(http, url, ext)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                await self._retry(conn, ext, attempts, f"lookup failed: {exc!r}"[:500], "unavailable")
                return
            if found is not None:
                log.info("erp.post_found_existing", external_id=ext, kind=kind, attempts=attempts)
                await self._sent(conn, ext, kind, found, event_time, via_lookup=True)
                return
        t0 = time.monotonic()
        try:
            async with http.post(url, json=body, headers={"Accept": "application/json"}) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionResetError) as exc:  # not sent, or reset
            settle = 0.0 if isinstance(exc, aiohttp.ClientConnectorError) else self.cfg.settle_s
            await self._retry(conn, ext, attempts, f"{type(exc).__name__}: {exc}"[:500], "unavailable", settle)
            return
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # sent, no answer: the ERP may still be booking it; look it up only after it had time to finish
            await self._retry(conn, ext, attempts, f"{type(exc).__name__}: {exc}"[:500], "timeout",
                              self.cfg.settle_s)
            return
        if 200 <= status < 300:
            try:
                import json

                doc = json.loads(text) if text else {}
            except (ValueError, RecursionError):
                doc = None
            # the document the ERP made (OData: {"d": {...}}); any other answer is kept as text: it was accepted
            answer = doc.get("d", {}) if isinstance(doc, dict) else None
            if not isinstance(answer, dict):
                answer = {"raw": text[:1000]}
            await self._sent(conn, ext, kind, answer, event_time)
            log.debug("erp.posted", external_id=ext, kind=kind, ms=round((time.monotonic() - t0) * 1000, 1))
        elif status in (408, 502, 504):
            # a proxy or gateway in front of the ERP gave up waiting: the ERP may still be booking it, as after our
            # own timeout; look it up only after it had time to finish
            await self._retry(conn, ext, attempts, f"HTTP {status}: {text[:300]}", "timeout", self.cfg.settle_s)
        elif status == 429 or status >= 500:
            await self._retry(conn, ext, attempts, f"HTTP {status}: {text[:300]}", "unavailable")
        else:
            self.metrics.erp_errors.labels("refused").inc()
            await conn.execute("UPDATE erp_outbox SET state = 'failed', last_error = %s WHERE external_id = %s",
                               (f"HTTP {status}: {text[:1000]}", ext))
            log.error("erp.post_refused", external_id=ext, kind=kind, status=status, body=text[:500])

    async def _lookup(self, http: aiohttp.ClientSession, url: str, ext: str) -> dict[str, Any] | None:
        params = {"$filter": f"ExternalSystemConfirmation eq '{ext}'", "$format": "json"}
        async with http.get(url, params=params) as resp:
            if resp.status != 200:
                raise ValueError(f"lookup HTTP {resp.status}")
            doc = await resp.json()
        # OData V2: {"d": {"results": [...]}}; V1: {"d": [...]}. Anything else cannot say whether the document
        # exists: an error (the row is retried, never posted blindly)
        d = doc.get("d") if isinstance(doc, dict) else None
        results = d.get("results") if isinstance(d, dict) else d
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise ValueError(f"lookup answer not understood: {str(doc)[:200]}")
        return results[0] if results else None

    async def _sent(self, conn: psycopg.AsyncConnection[Any], ext: str, kind: str, answer: dict[str, Any],
                    event_time: datetime, via_lookup: bool = False) -> None:
        await conn.execute("UPDATE erp_outbox SET state = 'sent', sent_at = now(), response = %s, last_error = NULL, "
                           "found_by_lookup = %s WHERE external_id = %s AND state = 'pending'",
                           (Jsonb(answer), via_lookup, ext))
        self.posted += 1
        self.healthy = True
        self.metrics.posted.labels(kind).inc()
        self.metrics.posting_latency.observe(max(0.0, (datetime.now(timezone.utc) - event_time).total_seconds()))

    async def _retry(self, conn: psycopg.AsyncConnection[Any], ext: str, attempts: int, error: str,
                     reason: str, settle: float = 0.0) -> None:
        self.healthy = False
        self.metrics.erp_errors.labels(reason).inc()
        # (the exponent capped: 2 ** 1024 is no float, after some 8 hours of an ERP outage at the defaults)
        backoff = self.cfg.backoff_initial_s * 2 ** min(40, max(0, attempts - 1))
        delay = max(settle, min(self.cfg.backoff_max_s, backoff))
        if settle and ext in self._claimed:  # should this write fail, the row is released only after settle_s
            self._claimed[ext] = (attempts, settle)
        # only while the row is still ours: another poster's claim (its lease) is not cut short
        await conn.execute("UPDATE erp_outbox SET next_attempt_at = now() + %s * interval '1 second', "
                           "last_error = %s WHERE external_id = %s AND state = 'pending' AND attempts = %s",
                           (delay, error, ext, attempts))
        log.warning("erp.post_failed", external_id=ext, attempts=attempts, retry_in_s=delay, error=error[:200])


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):  # not wait_for: it can swallow the stop's cancellation (3.11)
            await stop.wait()
    except TimeoutError:
        pass
