"""OPC UA security against the real asyncua simulator: policies, modes, PKI trust workflow, user tokens."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.base import TagBinding
from connectors.opcua.config import OpcUaConnectorConfig, OpcUaTagConfig
from connectors.opcua.connector import OpcUaConnector
from connectors.opcua.pki import Pki, san_uris, thumbprint
from gateway.component import Backoff, ComponentState
from gateway.config import ConfigError, load_config
from simulators.machine import MachineModel
from simulators.opcua_server import OpcUaMachineServer
from tests.faults import Recorder, eventually, start_on_free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Tr0ub4dor&3-opc"


def make_connector(srv: OpcUaMachineServer, sink: Recorder, pki: Path, **cfg: object) -> OpcUaConnector:
    config = OpcUaConnectorConfig.model_validate({
        "type": "opcua", "id": "press-opc", "endpoint": srv.endpoint, "pki_dir": str(pki),
        "publishing_interval_ms": 50, "sampling_interval_ms": 0, "watchdog_interval_s": 0.5, "timeout_s": 3.0, **cfg,
    })
    tags = [TagBinding(f"press-1/{s}", OpcUaTagConfig(node_id=srv.node_id(s))) for s in ("good", "scrap", "state")]
    return OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.3))


@contextlib.asynccontextmanager
async def running(conn: OpcUaConnector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def simulator(model: MachineModel, **opts: object) -> AsyncIterator[OpcUaMachineServer]:
    srv = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, **opts))
    try:
        yield srv
    finally:
        await srv.stop()


def trust(pki: Path, srv: OpcUaMachineServer) -> None:
    Pki(pki).ensure_dirs()
    (pki / "trusted" / "certs" / "simulator.der").write_bytes(srv.certificate_der)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture
def model() -> MachineModel:
    return MachineModel("Press1", cycle_time=0.002, scrap_rate=0.1, seed=3)


async def test_sign_and_encrypt_with_user_login_counts_exactly(model: MachineModel, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESS_OPC_PASSWORD", PASSWORD)
    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Basic256Sha256_SignAndEncrypt"], users={"gateway": PASSWORD}) as srv:
        trust(pki, srv)
        sink = Recorder()
        conn = make_connector(srv, sink, pki, username="gateway", password_env="PRESS_OPC_PASSWORD")
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 15, "connected over SignAndEncrypt")
                model.set_order("4711", "0010")
                await model.produce(250)
                await srv.flush()
                await eventually(lambda: (sink.value("press-1/good"), sink.value("press-1/scrap"))
                                 == (model.good_raw, model.scrap_raw), 10, "counters equal to the machine's")
                # the one-shot read (order changeover cut) works over the secured session too
                cut = await conn.read(["press-1/good", "press-1/scrap"])
                assert [s.value for s in cut] == [model.good_raw, model.scrap_raw]
        assert model.good_raw + model.scrap_raw == 250
        st = conn.status.as_dict()
        assert (st["security_policy"], st["security_mode"], st["user_token"]) == ("Basic256Sha256", "SignAndEncrypt", "username")
        assert st["server_certificate_thumbprint"] == srv.thumbprint
        assert 700 < st["own_certificate_days_left"] <= 730
        assert PASSWORD not in repr(logs) and PASSWORD not in repr(st)
        created = [e for e in logs if e["event"] == "opcua.certificate_created"]
        assert len(created) == 1

    # our certificate: generated once, in own/, application URI + host in the SAN, kept for the next start
    own = x509.load_der_x509_certificate((pki / "own" / "certs" / "edge-gateway.der").read_bytes())
    assert san_uris(own) == [conn.config.own_application_uri]
    san = own.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)
    assert (pki / "own" / "private" / "edge-gateway.pem").stat().st_mode & 0o077 == 0
    again, generated = Pki(pki).own_certificate("urn:other", key_size=2048)
    assert not generated and again.thumbprint == thumbprint(own)


async def test_wrong_password_is_refused(model: MachineModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESS_OPC_PASSWORD", "not-the-password")
    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Basic256Sha256_SignAndEncrypt"], users={"gateway": PASSWORD}) as srv:
        trust(pki, srv)
        conn = make_connector(srv, Recorder(), pki, username="gateway", password_env="PRESS_OPC_PASSWORD")
        async with running(conn):
            await eventually(lambda: "BadUserAccessDenied" in (conn.status.last_error or ""), 15, "login refused")
        assert conn.status.state == ComponentState.STOPPED


async def test_untrusted_server_refused_then_trusted_by_the_cli(model: MachineModel, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Aes128Sha256RsaOaep_SignAndEncrypt"]) as srv:
        sink = Recorder()
        conn = make_connector(srv, sink, pki)
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED
                                 and "not trusted" in (conn.status.last_error or ""), 15, "refused as untrusted")
                rejected = list((pki / "rejected" / "certs").iterdir())
                assert [thumbprint(x509.load_der_x509_certificate(p.read_bytes())) for p in rejected] == [srv.thumbprint]
                assert not sink.batches  # not a single value from an untrusted server

                untrusted = [e for e in logs if e["event"] == "opcua.certificate_untrusted"]
                assert len(untrusted) == 1  # once, not per retry
                line = untrusted[0]
                assert line["endpoint"] == srv.endpoint and line["thumbprint"] == srv.thumbprint
                assert line["command"] == f"edge-gateway pki trust --pki-dir {pki} {srv.thumbprint}"

                listed = cli("pki", "list", "--pki-dir", str(pki))
                assert listed.returncode == 0, listed.stderr
                assert f"rejected/ (1)\n    {srv.thumbprint}" in listed.stdout

                # the engineer runs the command from the log line (a thumbprint prefix is enough)
                args = line["command"].split()[1:]
                args[-1] = srv.thumbprint[:12]
                done = cli(*args)
                assert done.returncode == 0, done.stderr
                assert done.stdout.startswith(f"trusted {srv.thumbprint}")
                assert not list((pki / "rejected" / "certs").iterdir())

                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 15, "connected once trusted")
                await model.produce(20)
                await srv.flush()
                await eventually(lambda: sink.value("press-1/good") == model.good_raw, 10, "values after trust")
        assert conn.status.detail["security_policy"] == "Aes128_Sha256_RsaOaep"

        shown = cli("pki", "show", srv.thumbprint, "--pki-dir", str(pki))
        assert shown.returncode == 0 and "store: trusted" in shown.stdout
        assert f"application_uri: {srv.application_uri}" in shown.stdout
        # reject again: the next connect is refused
        back = cli("pki", "reject", srv.thumbprint, "--pki-dir", str(pki))
        assert back.returncode == 0 and back.stdout.startswith(f"rejected {srv.thumbprint}")
        assert not list((pki / "trusted" / "certs").iterdir())
        assert cli("pki", "trust", "0000", "--pki-dir", str(pki)).returncode == 1


async def test_pinned_thumbprint(model: MachineModel, tmp_path: Path) -> None:
    async with simulator(model, security_policies=["Basic256Sha256_Sign"]) as srv:
        # auto is encrypted only: a server offering only Sign is refused with a hint (red before: Sign picked silently)
        auto = make_connector(srv, Recorder(), tmp_path / "c", server_certificate_thumbprint=srv.thumbprint)
        async with running(auto):
            await eventually(lambda: "security_mode: Sign" in (auto.status.last_error or ""), 15, "Sign refused")
        assert "security_policy" not in auto.status.detail
        wrong = make_connector(srv, Recorder(), tmp_path / "a", server_certificate_thumbprint="AB" * 20,
                               security_mode="Sign")
        async with running(wrong):
            await eventually(lambda: "pinned" in (wrong.status.last_error or ""), 15, "pin mismatch refused")
        pinned = make_connector(srv, Recorder(), tmp_path / "b", server_certificate_thumbprint=srv.thumbprint,
                                security_mode="Sign")
        async with running(pinned):
            await eventually(lambda: pinned.status.state == ComponentState.CONNECTED, 15, "pinned server accepted")
        assert pinned.status.detail["security_mode"] == "Sign"


async def test_deprecated_policies_are_refused(model: MachineModel, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Basic256_SignAndEncrypt", "Basic128Rsa15_SignAndEncrypt",
                                                   "NoSecurity"]) as srv:
        trust(pki, srv)
        conn = make_connector(srv, Recorder(), pki)
        async with running(conn):
            await eventually(lambda: "only deprecated" in (conn.status.last_error or ""), 15, "deprecated refused")
            assert conn.status.state == ComponentState.DISCONNECTED
        assert "allow_deprecated_policies" in (conn.status.last_error or "")
        assert "security_policy" not in conn.status.detail  # never connected, in particular not over None

        allowed = make_connector(srv, Recorder(), pki, allow_deprecated_policies=True)
        with structlog.testing.capture_logs() as logs:
            async with running(allowed):
                await eventually(lambda: allowed.status.state == ComponentState.CONNECTED, 15, "connected when allowed")
        assert allowed.status.detail["security_policy"] == "Basic256"
        assert any(e["event"] == "opcua.security_warning" and "deprecated" in e["warning"] for e in logs)


async def test_auto_picks_the_most_secure_endpoint_and_never_none(model: MachineModel, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    offered = ["NoSecurity", "Basic256Sha256_SignAndEncrypt", "Aes256Sha256RsaPss_Sign",
               "Aes128Sha256RsaOaep_SignAndEncrypt", "Aes256Sha256RsaPss_SignAndEncrypt"]
    async with simulator(model, security_policies=offered) as srv:
        trust(pki, srv)
        conn = make_connector(srv, Recorder(), pki)
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 15, "connected")
        assert (conn.status.detail["security_policy"], conn.status.detail["security_mode"]) == (
            "Aes256_Sha256_RsaPss", "SignAndEncrypt")
    async with simulator(model) as plain:  # only policy None
        conn = make_connector(plain, Recorder(), pki)
        async with running(conn):
            await eventually(lambda: "no acceptable endpoint" in (conn.status.last_error or ""), 10, "None refused")
        assert "security: none" in (conn.status.last_error or "")


async def test_password_never_sent_in_clear(model: MachineModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRESS_OPC_PASSWORD", PASSWORD)
    async with simulator(model, users={"gateway": PASSWORD}) as srv:  # policy None only: no way to protect it
        conn = make_connector(srv, Recorder(), tmp_path / "pki", security="none", username="gateway",
                              password_env="PRESS_OPC_PASSWORD")
        async with running(conn):
            await eventually(lambda: "travel in clear" in (conn.status.last_error or ""), 10, "refused")
        opted_in = make_connector(srv, Recorder(), tmp_path / "pki", security="none", username="gateway",
                                  password_env="PRESS_OPC_PASSWORD", allow_plaintext_password=True)
        async with running(opted_in):
            await eventually(lambda: opted_in.status.state == ComponentState.CONNECTED, 10, "connected when allowed")


def test_config_validation(tmp_path: Path) -> None:
    base = {"type": "opcua", "id": "c"}
    for bad, expect in [
        ({"endpoint": "opc.tcp://gw:secret@10.0.0.5:4840"}, "no user name or password in the endpoint URL"),
        ({"endpoint": "opc.tcp://10.0.0.5:4840", "security": "Basic128Rsa15"}, "deprecated"),
        ({"endpoint": "opc.tcp://10.0.0.5:4840", "security": "sign"}, "Input should be"),
        ({"endpoint": "opc.tcp://10.0.0.5:4840", "password_env": "X"}, "without username"),
    ]:
        with pytest.raises(ValueError, match=expect) as info:
            OpcUaConnectorConfig.model_validate(base | bad)
        assert "secret" not in str(info.value) or "user name" in expect
    assert OpcUaConnectorConfig.model_validate(base | {"endpoint": "opc.tcp://h:4840"}).security == "auto"

    # pki_dir is relative to the config file, not to the working directory
    cfgdir = tmp_path / "etc"
    cfgdir.mkdir()
    (cfgdir / "gw.yaml").write_text(
        "gateway: {id: gw-1, enterprise: acme, site: p1, area: a1, line: l1}\n"
        "connectors:\n  - {type: opcua, id: opc, endpoint: 'opc.tcp://10.0.0.5:4840'}\n"
        "  - {type: opcua, id: opc2, endpoint: 'opc.tcp://10.0.0.6:4840', pki_dir: /var/lib/gw/pki}\n")
    cfg = load_config(cfgdir / "gw.yaml")
    assert [c.pki_dir for c in cfg.connectors] == [str(cfgdir / "pki"), "/var/lib/gw/pki"]
    (cfgdir / "bad.yaml").write_text(
        "gateway: {id: gw-1, enterprise: acme, site: p1, area: a1, line: l1}\n"
        "connectors:\n  - {type: opcua, id: opc, endpoint: 'opc.tcp://u:p@10.0.0.5:4840'}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfgdir / "bad.yaml")
    assert "bad.yaml:3: connectors[0].endpoint: no user name or password in the endpoint URL" in err.value.render()


def test_generated_certificate_options(tmp_path: Path) -> None:
    own, generated = Pki(tmp_path).own_certificate("urn:plant-7:edge-gateway", key_size=3072, validity_days=90)
    assert generated
    cert = own.certificate
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert round((cert.not_valid_after_utc - cert.not_valid_before_utc).days) == 90
    assert san_uris(cert) == ["urn:plant-7:edge-gateway"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.data_encipherment
    for d in ("own/certs", "own/private", "trusted/certs", "rejected/certs", "issuer/certs"):
        assert (tmp_path / d).is_dir()


async def test_end_to_end_over_sign_and_encrypt_ledger_equals_truth(tmp_path: Path, mqtt_broker,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated machine behind a SignAndEncrypt-only server with user login → gateway → mosquitto → ERP ledger,
    with a server restart in the middle of the run: the ledger equals the machine's truth exactly."""
    from gateway.config import parse_config
    from simulators.erp import ErpConsumer
    from tests.e2e import (
        IDENT,
        RunningGateway,
        assert_ledger_matches,
        dispatch_order,
        workdir,
    )
    from tests.faults import restart

    monkeypatch.setenv("PRESS1_OPC_PASSWORD", PASSWORD)
    m = MachineModel("Press1", cycle_time=0.01, scrap_rate=0.07, seed=21, counter_bits=32)
    async with simulator(m, security_policies=["Basic256Sha256_SignAndEncrypt"], users={"gateway": PASSWORD}) as srv:
        trust(tmp_path / "pki", srv)
        doc = {
            "gateway": IDENT,
            "mqtt": {"host": "127.0.0.1", "port": mqtt_broker.port, "keepalive_s": 2},
            "store": {"path": workdir(tmp_path, "gw") + "/gw.db"},
            "connectors": [{"type": "opcua", "id": "opc", "endpoint": srv.endpoint, "pki_dir": "pki",
                            "username": "gateway", "password_env": "PRESS1_OPC_PASSWORD",
                            "watchdog_interval_s": 0.5, "timeout_s": 3}],
            "machines": [{"id": "press-1", "counters": {
                "good": {"connector": "opc", "node_id": srv.nsu_node_id("good"), "bits": 32, "max_rate": 500},
                "scrap": {"connector": "opc", "node_id": srv.nsu_node_id("scrap"), "bits": 32, "max_rate": 500},
            }, "state": {"connector": "opc", "node_id": srv.nsu_node_id("state")}, "reporting": {"interval_s": 0.5}}],
        }
        cfg = parse_config(doc, str(tmp_path / "gateway.yaml"))  # pki_dir relative to this (virtual) file
        assert cfg.connectors[0].pki_dir == str(tmp_path / "pki")
        erp = ErpConsumer("127.0.0.1", mqtt_broker.port, db_path=str(tmp_path / "erp.db"), client_id="erp-sec")
        await erp.start()
        rgw = RunningGateway(cfg)
        try:
            await rgw.start()
            await dispatch_order(erp, rgw, "press-1", m, "4711", "0010")
            await m.produce(120, timeout=30)
            await srv.stop()
            srv.extra_namespaces = ["urn:other"]  # the namespace index moves; the nsu= ids follow
            await restart(srv)
            await m.produce(130, timeout=30)
            await assert_ledger_matches(erp, {"press-1": m})
            status = rgw.gw.connectors["opc"].status.as_dict()
            assert (status["security_policy"], status["security_mode"], status["reconnects"]) == (
                "Basic256Sha256", "SignAndEncrypt", 1)
        finally:
            await rgw.stop()
            await erp.stop()


def test_server_certificate_checks(tmp_path: Path) -> None:
    """Trust by the certificate itself or by a CA in trusted/ (not issuer/), validity period, application URI."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from connectors.opcua.pki import CertificateRefused, generate_certificate

    pki = Pki(tmp_path)
    pki.ensure_dirs()
    cert, _ = generate_certificate("urn:plc:1", common_name_="plc 1", hostnames=["plc1"], ips=[], validity_days=10)
    with pytest.raises(CertificateRefused) as err:
        pki.check_server(cert, application_uri="urn:plc:1")
    assert err.value.reason == "untrusted" and err.value.thumbprint == thumbprint(cert)
    assert [thumbprint(c) for _, c in pki.certificates("rejected")] == [thumbprint(cert)]
    pki.move(thumbprint(cert)[:8], "trusted")
    pki.check_server(cert, application_uri="urn:plc:1")  # trusted now
    with pytest.raises(CertificateRefused, match="does not carry the server's application URI 'urn:plc:2'"):
        pki.check_server(cert, application_uri="urn:plc:2")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=11)
    with pytest.raises(CertificateRefused, match="expired") as err:
        pki.check_server(cert, application_uri="urn:plc:1", now=later)
    assert err.value.reason == "expired"

    # a plant CA: trusted in trusted/, only a chain helper in issuer/
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plant CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=99))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plc 2")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:plc:2")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "issuer" / "certs" / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    with pytest.raises(CertificateRefused, match="not trusted"):
        pki.check_server(leaf, application_uri="urn:plc:2")
    (tmp_path / "trusted" / "certs" / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    pki.check_server(leaf, application_uri="urn:plc:2")
    # a pin accepts exactly one certificate, whatever the folders say
    pki.check_server(cert, pin=thumbprint(cert).lower())
    with pytest.raises(CertificateRefused, match="pinned"):
        pki.check_server(leaf, pin=thumbprint(cert))


async def test_x509_user_token(model: MachineModel, tmp_path: Path) -> None:
    """Login with a user certificate (X.509 identity token); its private key from a file, never from YAML."""
    from cryptography.hazmat.primitives import serialization

    from connectors.opcua.pki import generate_certificate

    def user_files(name: str) -> tuple[Path, Path, bytes]:
        cert, key = generate_certificate(f"urn:user:{name}", common_name_=name, hostnames=[], ips=[])
        der = cert.public_bytes(serialization.Encoding.DER)
        (tmp_path / f"{name}.der").write_bytes(der)
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return tmp_path / f"{name}.der", tmp_path / f"{name}.pem", der

    op_cert, op_key, op_der = user_files("operator")
    other_cert, other_key, _ = user_files("intruder")
    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Basic256Sha256_SignAndEncrypt"], user_certificates=[op_der]) as srv:
        trust(pki, srv)
        sink = Recorder()
        conn = make_connector(srv, sink, pki, user_certificate_file=str(op_cert), user_private_key_file=str(op_key))
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 15, "connected with a user cert")
            await model.produce(15)
            await srv.flush()
            await eventually(lambda: sink.value("press-1/good") == model.good_raw, 10, "values")
        assert conn.status.detail["user_token"] == "certificate"
        refused = make_connector(srv, Recorder(), pki, user_certificate_file=str(other_cert),
                                 user_private_key_file=str(other_key))
        async with running(refused):
            await eventually(lambda: "BadUserAccessDenied" in (refused.status.last_error or ""), 15, "unknown user cert")
    with pytest.raises(ValueError, match="user_certificate_file and user_private_key_file go together"):
        OpcUaConnectorConfig.model_validate({"type": "opcua", "id": "c", "endpoint": "opc.tcp://h:1",
                                             "user_certificate_file": "/x.der"})
    with pytest.raises(ValueError, match="a user name or a user certificate, not both"):
        OpcUaConnectorConfig.model_validate({"type": "opcua", "id": "c", "endpoint": "opc.tcp://h:1", "username": "u",
                                             "user_certificate_file": "/x.der", "user_private_key_file": "/x.pem"})


async def test_connectors_sharing_a_pki_folder_generate_one_certificate(tmp_path: Path) -> None:
    from connectors.opcua.pki import Pki as _Pki

    results = await asyncio.gather(*(asyncio.to_thread(_Pki(tmp_path).own_certificate, "urn:gw", key_size=2048)
                                     for _ in range(4)))
    assert [generated for _, generated in results].count(True) == 1
    assert len({own.thumbprint for own, _ in results}) == 1


async def test_certificate_expiry_in_status_metrics_and_alarms(model: MachineModel, tmp_path: Path) -> None:
    """Days to expiry of our own and the server's certificate: in status and the gauge; within
    certificate_expiry_days a log line and an alarm per certificate, cleared when no longer within."""
    from prometheus_client import REGISTRY

    pki = tmp_path / "pki"
    async with simulator(model, security_policies=["Basic256Sha256_SignAndEncrypt"]) as srv:
        trust(pki, srv)
        conn = make_connector(srv, Recorder(), pki, certificate_expiry_days=60, certificate_validity_days=45)
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 15, "connected")
                st = conn.status.as_dict()
                own, server = st["own_certificate_days_left"], st["server_certificate_days_left"]
                assert 44 < own <= 45 and server > 60  # our certificate: 45 days, the simulator's: a year or more
                for which, days in (("own", own), ("server", server)):
                    assert REGISTRY.get_sample_value("edge_gateway_opcua_certificate_expiry_days", {
                        "connector": "press-opc", "endpoint": srv.endpoint, "which": which}) == pytest.approx(days, abs=0.1)
                assert conn.alarms.ids() == ["certificate_expiring:press-opc:own"]  # 45 days <= 60: warned
                alarm = conn.alarms.active()[0]
                assert alarm.severity == "warning" and "our own application certificate expires in" in alarm.message
                # time passes (the check runs with every watchdog round): the server's certificate comes within 60 days
                later = __import__("time").time() + (server - 30) * 86400
                conn._check_expiry(now=later)
                assert conn.alarms.ids() == ["certificate_expiring:press-opc:own", "certificate_expiring:press-opc:server"]
                assert conn.status.detail["server_certificate_days_left"] == pytest.approx(30, abs=0.2)
                conn._check_expiry()  # back to now (as after a renewal): the server's alarm clears
                assert conn.alarms.ids() == ["certificate_expiring:press-opc:own"]
    warned = [(e["certificate"], e["warn_days"]) for e in logs if e["event"] == "opcua.certificate_expiring"]
    assert warned == [("own", 60), ("server", 60)]
    own_line = next(e for e in logs if e["event"] == "opcua.certificate_expiring")
    assert own_line["endpoint"] == srv.endpoint and str(pki / "own") in own_line["action"]
