"""The local status page (``GET /``) in a real browser: headless Chromium driven by selenium (chromedriver of the
Debian package ``chromium-driver``), against a running gateway with the OPC UA and Modbus simulators, a real
mosquitto and the ERP consumer. It asserts what the page shows while the plant runs, after a PLC outage and after a
broker outage, and saves the screenshot the README shows (docs/status-page.png).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import HttpConfig
from simulators.erp import ErpConsumer
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.e2e import (
    Production,
    RunningGateway,
    dispatch_order,
    gateway_config,
    wait_until,
    workdir,
)

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
# the README's screenshot is rewritten only on request (EDGE_GATEWAY_SCREENSHOT=1); a normal run writes a copy into
# its tmp dir, so running the suite does not leave the work tree modified
UPDATE_SCREENSHOT = os.environ.get("EDGE_GATEWAY_SCREENSHOT") == "1"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1440,1000", "--hide-scrollbars"]

# What the page shows, read from the DOM as a user sees it (element texts), in one round trip.
READ_PAGE = """
const q = (root, sel) => root.querySelector(sel);
const txt = (root, sel) => { const e = q(root, sel); return e && !e.closest('[hidden]') ? e.textContent.trim() : null; };
const machines = {};
for (const card of document.querySelectorAll('[data-machine]')) {
  machines[card.dataset.machine] = {
    connection: txt(card, '[data-field="connection"]'), error: txt(card, '[data-field="fault"] .err'),
    order: txt(card, '[data-field="order"]'), yield: txt(card, '[data-field="total-yield"]'),
    scrap: txt(card, '[data-field="total-scrap"]'), rate: txt(card, '[data-field="rate"]'),
    last_event: txt(card, '[data-field="last-event"]'), erp: txt(card, '[data-field="erp"]'),
    chart_points: (q(card, '[data-field="chart"] polyline') || {getAttribute: () => ''}).getAttribute('points'),
    css: card.className};
}
return JSON.stringify({updated: document.body.dataset.updated || null, stale: document.body.classList.contains('stale'),
  gateway: txt(document, '#gw-id'), version: txt(document, '#gw-version'), overall: txt(document, '#overall'),
  broker: txt(document, '#broker-state'), broker_error: txt(document, '#broker-error'),
  outbox: txt(document, '#outbox-depth'), oldest: txt(document, '#outbox-oldest'), uptime: txt(document, '#gw-uptime'),
  machines});
"""


def _count(text: str | None) -> float:
    return float((text or "nan").replace(",", ""))


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the status page test needs Chromium and chromedriver: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in CHROMIUM_ARGS:
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


class Page:
    """The browser, driven from a thread (selenium blocks) while the gateway runs in the test's event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.driver: Any = None
        self.last: dict[str, Any] = {}

    async def open(self) -> None:
        self.driver = await asyncio.to_thread(_browser)
        await asyncio.to_thread(self.driver.get, self.url)

    async def close(self) -> None:
        if self.driver is not None:
            await asyncio.to_thread(self.driver.quit)

    async def read(self) -> dict[str, Any]:
        self.last = json.loads(await asyncio.to_thread(self.driver.execute_script, READ_PAGE))
        return self.last

    async def wait_for(self, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """Until the page shows ``pred`` (it refreshes itself from /status every 2 s; polled, not slept on)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = await self.read()
            try:
                if pred(shown):
                    return shown
            except (KeyError, TypeError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the status page did not show {what} within {timeout} s; it shows:\n"
                                     f"{json.dumps(shown, indent=1)}")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path) -> None:
        def shot() -> None:
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1440, max(900, int(height)))
            self.driver.save_screenshot(str(path))

        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shot)


async def _erp_accepts(broker_port: int, gw: Any, erp: ErpConsumer, machine: str) -> str:
    """The ERP acknowledges (``accepted``) the last event of ``machine`` it booked, as the ERP posting service does
    with ``acks: all`` (the test's ERP consumer only answers rejections). Returns the event type."""
    from paho.mqtt import publish

    ev = [e for e in erp.events() if e["subject"] == machine][-1]
    body = json.dumps({"status": "accepted", "id": ev["id"], "source": ev["source"]})
    await asyncio.to_thread(publish.single, gw.topics.acks(machine), body, qos=1, hostname="127.0.0.1",
                            port=broker_port)
    return ev["type"]


RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
TIME_KEYS = {"time", "since", "started", "committed"}


def assert_times_are_rfc3339(obj: Any, path: str = "status") -> None:
    """Every point in time of /status (keys named time, since, started, committed) is an RFC 3339 UTC string."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in TIME_KEYS and v is not None:
                assert isinstance(v, str) and RFC3339.fullmatch(v), f"{path}.{k} is {v!r}, not RFC 3339"
            assert_times_are_rfc3339(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert_times_are_rfc3339(v, f"{path}[{i}]")


async def test_status_page_shows_plant_plc_outage_and_broker_outage(tmp_path, mqtt_broker):
    broker = mqtt_broker
    m1 = MachineModel("Press1", cycle_time=0.08, scrap_rate=0.04, seed=21, counter_bits=32)
    m2 = MachineModel("Press2", cycle_time=0.12, scrap_rate=0.06, seed=22, counter_bits=16)
    opc = OpcUaMachineServer(m1, host="127.0.0.1", port=free_port())
    mb = ModbusMachineServer(m2, host="127.0.0.1", port=free_port(), unit_id=1)
    await opc.start()
    await mb.start()
    erp = ErpConsumer("127.0.0.1", broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-page")
    await erp.start()
    cfg = gateway_config(broker_port=broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db", opc=opc, modbus=mb)
    port = free_port()
    cfg = cfg.model_copy(update={"http": HttpConfig(enabled=True, port=port)})  # loopback, no token
    rgw = RunningGateway(cfg)
    page = Page(f"http://127.0.0.1:{port}/")
    try:
        gw = await rgw.start()
        async with Production(m1, m2):
            await dispatch_order(erp, rgw, "press-1", m1, "1000471", "0010")
            await dispatch_order(erp, rgw, "press-2", m2, "1000472", "0020")
            m1.start()
            m2.start()
            await page.open()

            # --- normal running: both machines connected, their order, counts moving, broker up, ERP acks shown
            await page.wait_for("both machines running with counts", lambda s: (
                s["broker"] == "connected" and s["outbox"] is not None
                and all(s["machines"][m]["connection"] == "connected" and _count(s["machines"][m]["yield"]) > 0
                        and s["machines"][m]["error"] is None and _count(s["machines"][m]["rate"]) > 0
                        for m in ("press-1", "press-2"))))
            shown = page.last
            assert shown["gateway"] == "gw-test" and not shown["stale"]
            assert shown["machines"]["press-1"]["order"] == "1000471 / 0010"
            assert shown["machines"]["press-2"]["order"] == "1000472 / 0020"
            assert shown["machines"]["press-1"]["last_event"].startswith("operation.")
            # the page's totals are the gateway's (this order), not something of its own
            y1 = _count(shown["machines"]["press-1"]["yield"])
            assert 0 < y1 <= m1.truth_for("1000471", "0010")["good"]
            assert "no acknowledgement yet" in shown["machines"]["press-1"]["erp"]
            await wait_until(lambda: any(e["subject"] == "press-1" for e in erp.events()), 10)
            acked_type = await _erp_accepts(broker.port, gw, erp, "press-1")
            await page.wait_for("the ERP acknowledgement", lambda s: s["machines"]["press-1"]["erp"].startswith(
                "1 accepted · 0 rejected · last: accepted " + acked_type))
            await page.wait_for("a chart of parts per minute", lambda s: all(
                len(s["machines"][m]["chart_points"].split()) >= 3 for m in ("press-1", "press-2")))
            # /status gives every time as RFC 3339 (issue 9: human outputs), and the page reads them as times
            assert_times_are_rfc3339(gw.status())
            shown = page.last
            for m in ("press-1", "press-2"):
                assert re.search(r"#\d+ · \d\d:\d\d:\d\d \(\d+ s ago\)$", shown["machines"][m]["last_event"]), shown
            assert re.search(r" · \d+ s ago$", shown["machines"]["press-1"]["erp"]), shown["machines"]["press-1"]["erp"]
            assert re.fullmatch(r"\d+ (min \d+ )?s", shown["uptime"]), shown["uptime"]

            # --- PLC outage: the Modbus PLC of press-2 goes away; the page shows it disconnected with its error
            await mb.stop()
            shown = await page.wait_for("press-2 disconnected with its last error", lambda s: (
                s["machines"]["press-2"]["connection"] == "disconnected" and s["machines"]["press-2"]["error"]
                and "bad" in s["machines"]["press-2"]["css"]))
            assert shown["machines"]["press-1"]["connection"] == "connected"
            assert shown["machines"]["press-1"]["error"] is None
            await page.wait_for("the connector's own last error", lambda s: gw.connectors["mb"].status.last_error
                                in s["machines"]["press-2"]["error"])
            await page.wait_for("press-1 still counting", lambda s: _count(s["machines"]["press-1"]["yield"]) > y1)
            shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "status-page.png"
            await page.screenshot(shot)
            assert shot.stat().st_size > 10_000

            # --- broker outage: the link is down and the outbox fills (buffered, not lost)
            await asyncio.to_thread(broker.stop)
            shown = await page.wait_for("the broker link down with events buffered", lambda s: (
                s["broker"] == "disconnected" and _count(s["outbox"]) > 0 and s["oldest"] not in (None, "none")))
            depth = _count(shown["outbox"])
            shown = await page.wait_for("the outbox depth growing", lambda s: _count(s["outbox"]) > depth)
            assert shown["broker_error"], "the broker tile shows why the link is down"
            assert shown["overall"] != "running"
            assert gw.store.pending >= _count(shown["outbox"])  # the page shows the store's depth (of 2 s ago)

        # --- the gateway stops: the page says its figures are stale instead of showing them as current
        await rgw.stop()
        shown = await page.wait_for("the stale banner", lambda s: s["stale"] and s["overall"] == "no data")
    finally:
        await page.close()
        await rgw.stop()
        await erp.stop()
        await mb.stop()
        await opc.stop()


async def test_status_page_is_self_contained_and_read_only_without_token(tmp_path, mqtt_broker, monkeypatch):
    """GET / needs no token (like every GET; the token guards the order command, a POST), loads nothing from
    elsewhere (no external asset: the CSP allows only this origin and the page's own inline script and style), and
    /status carries the fields the page draws."""
    import aiohttp

    monkeypatch.setenv("PAGE_TEST_TOKEN", "s3cret-token")
    cfg = gateway_config(broker_port=mqtt_broker.port, store_path=workdir(tmp_path, "gw") + "/gw.db")
    port = free_port()
    cfg = cfg.model_copy(update={"http": HttpConfig(enabled=True, port=port, token_env="PAGE_TEST_TOKEN")})
    rgw = RunningGateway(cfg)
    await rgw.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/") as r:
                assert r.status == 200 and r.content_type == "text/html"
                html = await r.text()
                csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
            assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) is None, "no external asset"
            assert "innerHTML" not in html, "texts from the network go through textContent only"
            async with http.post(f"http://127.0.0.1:{port}/machines/x/order", json={"clear": True}) as r:
                assert r.status == 401
            async with http.get(f"http://127.0.0.1:{port}/status") as r:
                st = await r.json()
            assert st["identity"]["id"] == "gw-test" and st["identity"]["version"]
            assert "outbox_oldest_age_s" in st
    finally:
        await rgw.stop()


def test_parts_per_minute_and_erp_ack_from_the_commits(monkeypatch):
    """The gateway-side figures the page draws: parts per minute over the trailing minute from the committed quantity
    reports (staged but uncommitted parts do not count), falling when nothing more is reported; the last committed
    event; an ERP acceptance (which carries only the event id) named by type and sequence number."""
    from gateway import statuspage
    from gateway.component import rfc3339
    from gateway.config import parse_config
    from gateway.dispatch import ErpAck
    from gateway.events import EventEncoder, Topics
    from gateway.store import PendingRow
    from mappings.machine import EventDraft
    from tests.e2e import IDENT

    clock = [1000.0]
    monkeypatch.setattr(statuspage.time, "time", lambda: clock[0])
    cfg = parse_config({"gateway": IDENT, "mqtt": {"port": 1}, "store": {"path": "/nonexistent/gw.db"},
                        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:1"}],
                        "machines": [{"id": "m1", "counters": {"good": {"connector": "opc", "node_id": "ns=2;s=g"}}}]},
                       "<test>")
    act = statuspage.Activity(cfg)
    enc = EventEncoder(cfg.gateway, Topics(cfg.mqtt.topic_root, cfg.gateway), "e" * 32)
    act.event_id = enc.event_id
    report = EventDraft("operation.quantity_reported", "m1", 0.0,
                        {"quantities": {"yield": "9", "scrap": "1", "rework": "0"}})
    for seq in range(1, 91):  # 10 parts committed every 2 s: 300 parts per minute
        clock[0] += 2
        act.staged([report])
        act.committed([PendingRow(seq, f"edge/v1/acme/p1/a1/l1/m1/events/{report.type}", b"", "m1", seq)])
    act.staged([report])  # staged, the commit has not happened: not produced yet
    m = act.machine("m1", {"opc": {"state": "connected"}})
    assert m["parts_per_minute"] == 300 and m["parts_produced"] == 900
    assert m["connectors"] == {"opc": {"state": "connected"}}
    assert m["last_event"] == {"type": report.type, "seq": 90, "time": rfc3339(clock[0])}
    series = m["parts_per_minute_history"]  # [seconds before now, parts per minute]: an age, not a time
    assert series[-1][0] == 0 and 0 < series[0][0] <= statuspage.CHART_SPAN_S
    assert all(p[1] == 300 for p in series if p[0] <= clock[0] - 1000 - 62)  # after the first minute, steady
    clock[0] += 30  # nothing reported for 30 s: half the trailing minute is empty
    assert act.machine("m1", {})["parts_per_minute"] == 150

    assert act.machine("m1", {})["erp_acks"] == {"accepted": 0, "rejected": 0, "last": None}
    act.erp_ack("m1", ErpAck("accepted", enc.event_id(88)))
    act.erp_ack("unknown-machine", ErpAck("accepted", enc.event_id(89)))  # ignored
    acks = act.machine("m1", {})["erp_acks"]
    assert acks["accepted"] == 1 and acks["last"] == {"status": "accepted", "id": enc.event_id(88),
                                                       "time": rfc3339(clock[0]),
                                                       "type": report.type, "seq": 88}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=1e6)), min_size=1, max_size=40)
       | st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=1e6)), min_size=700, max_size=900))
def test_history_ring_keeps_the_last_points_like_a_bounded_deque(ops):
    """The per-machine history (two arrays used as a ring) holds what a deque of [t, c] with maxlen HISTORY_POINTS
    would: the last points, oldest first, the last one replaceable."""
    import collections

    from gateway.statuspage import HISTORY_POINTS, _History

    ring, ref = _History(1.0, 0.0), collections.deque([[1.0, 0.0]], maxlen=HISTORY_POINTS)
    for i, (replace, c) in enumerate(ops):
        t = 2.0 + i
        if replace and len(ref) > 1:
            assert ring.time_before_last() == ref[-2][0]
            ring.set_last(t, c)
            ref[-1] = [t, c]
        else:
            ring.append(t, c)
            ref.append([t, c])
        assert len(ring) == len(ref)
    assert ring.points() == [list(p) for p in ref]
