"""The local HTTP API's defences: an exposed listener needs a token (refused at validation), every POST must be
JSON (a browser cannot post cross-site without a preflight), a taken port is one clear line and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from gateway.config import parse_config
from simulators.ports import free_port
from tests.e2e import IDENT, RunningGateway, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXE = [sys.executable, "-m", "gateway.cli"]


def _doc(tmp_path: Path, http: dict[str, Any]) -> dict[str, Any]:
    return {
        "gateway": IDENT,
        "mqtt": {"port": free_port()},  # nobody listens: the API works without a broker
        "store": {"path": str(tmp_path / "gw.db")},
        "http": {"enabled": True, **http},
        "connectors": [{"type": "modbus", "id": "plc", "host": "127.0.0.1", "port": free_port()}],
        "machines": [{"id": "press-1", "order_source": "local",
                      "counters": {"good": {"connector": "plc", "address": 0, "data_type": "uint32"}}}],
    }


def test_a_listener_beyond_loopback_without_a_token_is_refused_at_validation(tmp_path):
    path = tmp_path / "gw.yaml"
    for host in ("0.0.0.0", "192.168.10.5", "hmi.plant.local"):
        path.write_text(yaml.safe_dump(_doc(tmp_path, {"host": host})))
        proc = subprocess.run(EXE + ["validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, proc.stdout
        assert f"{path}:" in proc.stderr and f"http.host: {host!r} is not a loopback address" in proc.stderr
        assert "set http.token_env" in proc.stderr and "127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    for http in ({"host": "0.0.0.0", "token_env": "GW_TOKEN"}, {"host": "127.0.0.1"}, {"host": "::1"},
                 {"host": "0.0.0.0", "enabled": False}):
        path.write_text(yaml.safe_dump(_doc(tmp_path, http)))
        proc = subprocess.run(EXE + ["validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, (http, proc.stderr)


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, str]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    if content_type is None:
        req.remove_header("Content-type")  # urllib adds a form content type to every body otherwise
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_posts_must_be_json_so_a_browser_cannot_post_an_order_cross_site(tmp_path):
    port = free_port()
    rgw = RunningGateway(parse_config(_doc(tmp_path, {"port": port})))
    gw = await rgw.start()
    url = f"http://127.0.0.1:{port}/machines/press-1/order"
    body = json.dumps({"order": "4711", "operation": "0010"}).encode()
    try:
        # what a page on another site can send without a CORS preflight: a form, text/plain, or no type at all
        for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
            status, text = await asyncio.to_thread(_post, url, body, ctype)
            assert status == 415 and "application/json" in text, (ctype, status, text)
        # nothing reached the core (the PLC is not reachable: an accepted order would wait for its changeover read)
        assert gw.status()["machines"]["press-1"]["changeover_pending"] is False
        assert gw.engines["press-1"].context is None
        status, text = await asyncio.to_thread(_post, url, body, "application/json; charset=utf-8")
        assert status == 202, text
        await wait_until(lambda: gw.status()["machines"]["press-1"]["changeover_pending"], 10)
    finally:
        await rgw.stop()


def test_the_http_port_already_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(_doc(tmp_path, {"port": port})))
        proc = subprocess.run(EXE + ["run", "--config", str(path), "--log-level", "error"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"{path}: http.port: cannot listen on 127.0.0.1:{port}: address already in use; another "
                         "process listens there (stop it, or choose another http.port)"), proc.stderr


def _request(url: str, method: str, host: str, body: bytes | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_a_page_rebinding_its_name_to_loopback_gets_nothing(tmp_path):
    """DNS rebinding: a hostile page whose name now resolves to 127.0.0.1 is same-origin for the browser, so its JSON
    POST needs no preflight. The loopback listener answers only loopback Host names (red before: 202 for the order
    and 200 for /status with Host: attacker.example). A non-ASCII Authorization header is a 401, not a 500."""
    port = free_port()
    rgw = RunningGateway(parse_config(_doc(tmp_path, {"port": port, "allowed_hosts": ["gw-01.plant.local"]})))
    gw = await rgw.start()
    base = f"http://127.0.0.1:{port}"
    order = json.dumps({"order": "4711", "operation": "0010"}).encode()
    json_type = {"Content-Type": "application/json"}
    try:
        for host in (f"attacker.example:{port}", "attacker.example", "127.0.0.1.attacker.example", "10.0.0.5"):
            status, text = await asyncio.to_thread(_request, f"{base}/machines/press-1/order", "POST", host, order,
                                                   json_type)
            assert status == 421 and "DNS rebinding" in text, (host, status, text)
            status, _ = await asyncio.to_thread(_request, f"{base}/status", "GET", host)
            assert status == 421, host
        assert gw.engines["press-1"].context is None and not gw.core.cuts
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"[::ffff:127.0.0.1]:{port}",
                     f"GW-01.plant.local:{port}"):  # the last: http.allowed_hosts (a local reverse proxy's name)
            status, _ = await asyncio.to_thread(_request, f"{base}/status", "GET", host)
            assert status == 200, host
        status, _ = await asyncio.to_thread(_request, f"{base}/machines/press-1/order", "POST", f"127.0.0.1:{port}",
                                            order, json_type)
        assert status == 202
    finally:
        await rgw.stop()


async def test_a_non_ascii_authorization_header_is_refused_not_a_server_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GW_TEST_TOKEN", "s3cret")
    port = free_port()
    rgw = RunningGateway(parse_config(_doc(tmp_path, {"port": port, "token_env": "GW_TEST_TOKEN"})))
    await rgw.start()
    try:
        raw = (f"POST /machines/press-1/order HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer \xe9t\xe9\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode("latin-1")

        def send() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(raw)
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                return out

        answer = await asyncio.to_thread(send)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    finally:
        await rgw.stop()


def test_an_mqtt_password_for_a_remote_broker_needs_tls(tmp_path):
    """A password sent to a broker beyond loopback without TLS is refused at validation, naming the field and the
    fix (red before: accepted, and sent in clear); TLS, a loopback broker or allow_plaintext_password pass."""
    path = tmp_path / "gw.yaml"
    base = _doc(tmp_path, {"enabled": False})
    for mqtt in ({"host": "broker.plant.local", "username": "gw", "password_env": "PW"},
                 {"brokers": ["127.0.0.1:1883", "10.0.0.7:1883"], "username": "gw", "password_file": "pw"}):
        path.write_text(yaml.safe_dump({**base, "mqtt": mqtt}))
        proc = subprocess.run(EXE + ["validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 2, proc.stdout
        assert f"{path}:" in proc.stderr and "mqtt.tls.enabled: the MQTT password would cross the network in clear" \
            in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for mqtt in ({"host": "broker.plant.local", "username": "gw", "password_env": "PW", "tls": {"enabled": True}},
                 {"host": "broker.plant.local", "username": "gw", "password_env": "PW", "tls": {"enabled": "true"}},
                 {"host": "127.0.0.1", "username": "gw", "password_env": "PW"},
                 {"host": "broker.plant.local", "username": "gw", "password_env": "PW", "allow_plaintext_password": True},
                 {"host": "broker.plant.local"}):
        path.write_text(yaml.safe_dump({**base, "mqtt": mqtt}))
        proc = subprocess.run(EXE + ["validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, (mqtt, proc.stderr)
