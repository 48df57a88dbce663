"""Simulated SAP endpoint for the ERP posting service: ``API_PROD_ORDER_CONFIRMATION_2_SRV`` / ``ProdnOrdConf2``.

- ``POST {base}/ProdnOrdConf2``: records every posting (all of them, in arrival order) and answers 201 with a
  ``ConfirmationGroup`` / ``ConfirmationCount``. Like a real ERP it **accepts** a repeated
  ``ExternalSystemConfirmation``; it flags it (``duplicates``) so a test can assert the service never sent one twice.
- ``GET {base}/ProdnOrdConf2?$filter=ExternalSystemConfirmation eq 'X'``: the lookup the service makes before
  retrying a posting whose outcome it does not know.
- Faults on demand (``fail_next(n)``, ``set_failing(True)``, ``set_delay(s)``, or ``POST /_control`` with
  ``{"failing": bool, "fail_next": n, "delay_s": x, "fail_after_commit_next": n}``): HTTP 503 before recording, or a
  response that is lost after the posting was recorded (the "unknown outcome" case), or slow answers.
- ``GET /_postings``: everything recorded (JSON), for the demo and for tests in other processes.

Run alone: ``python -m simulators.erp_endpoint --port 8088``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

BASE = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
_FILTER = re.compile(r"ExternalSystemConfirmation eq '([^']*)'")


class ErpEndpoint:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.postings: list[dict[str, Any]] = []       # every accepted POST body, in order
        self.by_external: dict[str, dict[str, Any]] = {}
        self.duplicates: Counter[str] = Counter()       # external id -> times posted beyond the first
        self.requests = 0
        self.failed = 0                                 # answered 503
        self.lost_responses = 0                         # recorded, but the client saw a failure
        self.lookups = 0
        self.failing = False
        self.fail_next_n = 0
        self.fail_after_commit_n = 0
        self.delay_s = 0.0
        self.odd_answers_n = 0                          # next successful postings answered with a JSON null
        self.lookup_shape = "v2"                        # v2: {"d": {"results": [...]}}, v1: {"d": [...]}, null
        self.in_flight = 0                              # postings being booked (also those whose client gave up)
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(f"{BASE}/ProdnOrdConf2", self._post)
        app.router.add_get(f"{BASE}/ProdnOrdConf2", self._get)
        app.router.add_get("/_postings", self._postings)
        app.router.add_post("/_control", self._control)
        self.app = app

    @property
    def url(self) -> str:
        """Base URL of the OData service (ServiceConfig.erp.url)."""
        return f"http://{self.host}:{self.port}{BASE}"

    async def start(self) -> "ErpEndpoint":
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("erp_endpoint.listening", url=self.url)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "ErpEndpoint":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- faults ------------------------------------------------------------------------------------------------
    def set_failing(self, failing: bool) -> None:
        self.failing = failing

    def fail_next(self, n: int) -> None:
        self.fail_next_n = n

    def fail_after_commit_next(self, n: int) -> None:
        """The next n postings are recorded but answered 503 (the client cannot know they were booked)."""
        self.fail_after_commit_n = n

    def set_delay(self, seconds: float) -> None:
        self.delay_s = seconds

    # -- views -------------------------------------------------------------------------------------------------
    def totals(self) -> dict[tuple[str, str], dict[str, Any]]:
        """{(order, operation): {yield, scrap, rework (Decimal), final (bool), goods: {(material, unit): qty}}}
        over the distinct external ids posted (what SAP would show with no double posting)."""
        from decimal import Decimal

        out: dict[tuple[str, str], dict[str, Any]] = {}
        for doc in self.by_external.values():
            t = out.setdefault((doc["OrderID"], doc["OrderOperation"]),
                               {"yield": Decimal(0), "scrap": Decimal(0), "rework": Decimal(0), "final": False,
                                "goods": {}})
            t["yield"] += Decimal(doc["ConfirmationYieldQuantity"])
            t["scrap"] += Decimal(doc["ConfirmationScrapQuantity"])
            t["rework"] += Decimal(doc["ConfirmationReworkQuantity"])
            t["final"] = t["final"] or bool(doc.get("IsFinalConfirmation"))
            for it in (doc.get("to_ProdnOrdConfMatlDocItm") or {}).get("results", []):
                k = (it["Material"], it["EntryUnit"])
                t["goods"][k] = t["goods"].get(k, Decimal(0)) + Decimal(it["QuantityInEntryUnit"])
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"postings": self.postings, "duplicates": dict(self.duplicates), "requests": self.requests,
                "failed": self.failed, "lost_responses": self.lost_responses, "lookups": self.lookups}

    # -- handlers ----------------------------------------------------------------------------------------------
    async def _post(self, request: web.Request) -> web.Response:
        self.requests += 1
        try:
            raw = await request.read()
        except ConnectionError:
            return web.Response(status=400)
        # like a real ERP, a posting whose client gave up (timeout) is still booked: shielded from cancellation
        return await asyncio.shield(self._book(raw))

    async def _book(self, raw: bytes) -> web.Response:
        self.in_flight += 1
        try:
            return await self._book_now(raw)
        finally:
            self.in_flight -= 1

    async def _book_now(self, raw: bytes) -> web.Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failing or self.fail_next_n > 0:
            self.fail_next_n = max(0, self.fail_next_n - 1)
            self.failed += 1
            return web.json_response({"error": {"code": "503", "message": "service unavailable (simulated)"}},
                                     status=503)
        try:
            doc = json.loads(raw)
            ext = doc["ExternalSystemConfirmation"]
            doc["OrderID"], doc["OrderOperation"]  # noqa: B018 - required keys
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": {"code": "400", "message": f"bad request: {exc}"}}, status=400)
        doc = dict(doc)
        doc["_received_at"] = time.time()
        self.postings.append(doc)
        if ext in self.by_external:
            self.duplicates[ext] += 1
            log.warning("erp_endpoint.duplicate_external_id", external_id=ext, times=self.duplicates[ext] + 1)
        else:
            self.by_external[ext] = doc
        group = str(list(self.by_external).index(ext) + 1)
        answer = {"d": {**{k: v for k, v in doc.items() if not k.startswith("_")}, "ConfirmationGroup": group,
                        "ConfirmationCount": "1"}}
        if self.fail_after_commit_n > 0:
            self.fail_after_commit_n -= 1
            self.lost_responses += 1
            return web.json_response({"error": {"code": "503", "message": "gateway timeout after commit"}},
                                     status=503)
        if self.odd_answers_n > 0:  # booked, answered with something that is not an OData document
            self.odd_answers_n -= 1
            return web.json_response(None, status=201)
        return web.json_response(answer, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        self.lookups += 1
        if self.failing:
            self.failed += 1
            return web.json_response({"error": {"code": "503"}}, status=503)
        m = _FILTER.search(request.query.get("$filter", ""))
        found = []
        if m and m.group(1) in self.by_external:
            doc = self.by_external[m.group(1)]
            found.append({**{k: v for k, v in doc.items() if not k.startswith("_")},
                          "ConfirmationGroup": str(list(self.by_external).index(m.group(1)) + 1),
                          "ConfirmationCount": "1"})
        if self.lookup_shape == "null":
            return web.json_response(None)
        return web.json_response({"d": found} if self.lookup_shape == "v1" else {"d": {"results": found}})

    async def _postings(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "failing" in body:
            self.set_failing(bool(body["failing"]))
        if "fail_next" in body:
            self.fail_next(int(body["fail_next"]))
        if "fail_after_commit_next" in body:
            self.fail_after_commit_next(int(body["fail_after_commit_next"]))
        if "delay_s" in body:
            self.set_delay(float(body["delay_s"]))
        return web.json_response({"failing": self.failing, "fail_next": self.fail_next_n, "delay_s": self.delay_s})


async def _serve(host: str, port: int) -> None:  # pragma: no cover - manual use
    ep = await ErpEndpoint(host, port).start()
    print(json.dumps({"url": ep.url}), flush=True)
    await asyncio.Event().wait()


def main() -> None:  # pragma: no cover
    p = argparse.ArgumentParser(description="Simulated SAP ProdnOrdConf2 endpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8088)
    a = p.parse_args()
    try:
        asyncio.run(_serve(a.host, a.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":  # pragma: no cover
    main()
