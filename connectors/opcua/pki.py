"""The OPC UA PKI folder: our application instance certificate and the servers we trust.

Layout (OPC UA Part 12, "directory store")::

    PKI/
      own/certs/edge-gateway.der      our application instance certificate (DER)
      own/private/edge-gateway.pem    its private key (PEM, PKCS#8, file mode 0600)
      trusted/certs/                  server certificates (or CAs) we trust
      rejected/certs/                 server certificates we refused, waiting for an engineer's decision
      issuer/certs/                   CA certificates used to build chains (not trusted by themselves)

Our certificate is generated on first use (application URI in the SAN together with the host's DNS name and
IP address; key size and validity configurable) and then kept: a restart or reinstall that keeps the folder
keeps the identity the servers have trusted. Certificates are named ``<common name> [<thumbprint>].der``;
the thumbprint is the SHA-1 of the DER bytes, upper-case hex, as OPC UA tools show it.

A server certificate is trusted when it is in ``trusted/certs`` itself, or was signed by a CA certificate
there; when ``pin`` is set, only the certificate with that thumbprint is accepted. A trusted certificate
is still refused when it is outside its validity period, lacks the key usages OPC UA needs, or does not
carry the server's application URI in its SAN.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OWN_NAME = "edge-gateway"
SUBDIRS = ("own/certs", "own/private", "trusted/certs", "trusted/crl", "rejected/certs", "issuer/certs", "issuer/crl")
EXPIRY_WARNING_DAYS = 30
_OWN_LOCK = threading.Lock()


class CertificateRefused(Exception):
    """A server certificate the gateway will not talk to (untrusted, expired, wrong URI, pin mismatch)."""

    def __init__(self, message: str, *, thumbprint: str, reason: str) -> None:
        super().__init__(message)
        self.thumbprint = thumbprint
        self.reason = reason


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER encoding, upper-case hex (what UaExpert and friends show)."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - OPC UA defines the thumbprint as SHA-1


def first_certificate(der: bytes) -> x509.Certificate:
    """The leading certificate of a DER blob (servers may send their certificate followed by its chain)."""
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        der = der[: int.from_bytes(der[2:4], "big") + 4]
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.timezone.utc)
    return round((cert.not_valid_after_utc - now).total_seconds() / 86400, 1)


def _file_name(cert: x509.Certificate) -> str:
    cn = re.sub(r"[^A-Za-z0-9_.-]+", "_", common_name(cert))[:60] or "certificate"
    return f"{cn} [{thumbprint(cert)}].der"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_cert_file(path: Path) -> x509.Certificate | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return first_certificate(data)
    except ValueError:
        return None


def generate_certificate(
    application_uri: str,
    *,
    common_name_: str,
    hostnames: list[str],
    ips: list[str],
    key_size: int = 2048,
    validity_days: int = 730,
    server: bool = False,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed OPC UA application instance certificate (Part 6 §6.2.2) and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name_),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-gateway")])
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    alt += [x509.DNSName(h) for h in dict.fromkeys(hostnames) if h]
    for ip in dict.fromkeys(ips):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            continue
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a server clock slightly behind ours
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                          data_encipherment=True, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                                  if server else [ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256()), key


def host_names_and_ips() -> tuple[list[str], list[str]]:
    """This host's DNS names and IP addresses, for the certificate's SAN."""
    names = [socket.gethostname()]
    try:
        fqdn = socket.getfqdn()
        if fqdn and fqdn not in names:
            names.append(fqdn)
    except OSError:
        pass
    ips: list[str] = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            ips.append(str(info[4][0]))
    except OSError:
        pass
    return names, list(dict.fromkeys(ips))


@dataclass(frozen=True)
class OwnCertificate:
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate

    @property
    def application_uri(self) -> str:
        uris = san_uris(self.certificate)
        return uris[0] if uris else ""

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.certificate)


class Pki:
    """One PKI folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    def ensure_dirs(self) -> None:
        for d in SUBDIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def dir(self, store: str) -> Path:
        if store not in ("own", "trusted", "rejected", "issuer"):
            raise ValueError(f"unknown store {store!r}")
        return self.root / store / "certs"

    # ------------------------------------------------------------------ own certificate

    @property
    def own_cert_path(self) -> Path:
        return self.root / "own" / "certs" / f"{OWN_NAME}.der"

    @property
    def own_key_path(self) -> Path:
        return self.root / "own" / "private" / f"{OWN_NAME}.pem"

    def own_certificate(self, application_uri: str, *, key_size: int = 2048, validity_days: int = 730) -> tuple[OwnCertificate, bool]:
        """Our certificate, generated when missing. Returns it and whether it was generated now.

        An existing certificate is kept as it is (servers trust it by its thumbprint), even when
        ``application_uri`` differs: the client then uses the URI in the certificate."""
        self.ensure_dirs()
        # several connectors (threads) or gateway processes may share the folder: generate once, under a lock,
        # so a key of one generation never pairs with the certificate of another
        with _OWN_LOCK, open(self.root / "own" / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._own_certificate_locked(application_uri, key_size, validity_days)

    def _own_certificate_locked(self, application_uri: str, key_size: int, validity_days: int) -> tuple[OwnCertificate, bool]:
        cert = _load_cert_file(self.own_cert_path) if self.own_key_path.exists() else None
        if cert is not None:
            return OwnCertificate(self.own_cert_path, self.own_key_path, cert), False
        names, ips = host_names_and_ips()
        cert, key = generate_certificate(application_uri, common_name_=f"edge-gateway@{names[0]}", hostnames=names,
                                         ips=ips, key_size=key_size, validity_days=validity_days)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_atomic(self.own_key_path, key_pem, 0o600)
        _write_atomic(self.own_cert_path, cert.public_bytes(serialization.Encoding.DER))
        return OwnCertificate(self.own_cert_path, self.own_key_path, cert), True

    # ------------------------------------------------------------------ stores

    def certificates(self, store: str) -> list[tuple[Path, x509.Certificate]]:
        d = self.dir(store)
        out = []
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    c = _load_cert_file(p)
                    if c is not None:
                        out.append((p, c))
        return out

    def find(self, prefix: str, stores: tuple[str, ...] = ("rejected", "trusted", "issuer", "own")) -> list[tuple[str, Path, x509.Certificate]]:
        """Certificates whose thumbprint starts with ``prefix`` (case and ':' ignored), in the given stores."""
        want = prefix.replace(":", "").replace(" ", "").upper()
        if not want:
            return []
        out = []
        for store in stores:
            for p, c in self.certificates(store):
                if thumbprint(c).startswith(want):
                    out.append((store, p, c))
        return out

    def move(self, prefix: str, to: str) -> tuple[x509.Certificate, Path]:
        """Move the certificate with this thumbprint (prefix) from rejected/ (or trusted/) to ``to``.
        Raises KeyError when none or several match."""
        src_stores = ("rejected", "trusted") if to == "trusted" else ("trusted", "rejected")
        matches = self.find(prefix, src_stores)
        thumbs = {thumbprint(c) for _, _, c in matches}
        if not matches:
            raise KeyError(f"no certificate with thumbprint {prefix} in {', '.join(s + '/' for s in src_stores)}")
        if len(thumbs) > 1:
            raise KeyError(f"thumbprint prefix {prefix} is ambiguous: {', '.join(sorted(thumbs))}")
        self.ensure_dirs()
        store, path, cert = matches[0]
        dest = self.dir(to) / _file_name(cert)
        if store == to:
            return cert, path
        _write_atomic(dest, cert.public_bytes(serialization.Encoding.DER))
        for _, p, _ in matches:
            if p != dest:
                p.unlink(missing_ok=True)
        return cert, dest

    def reject(self, cert: x509.Certificate) -> Path:
        """Write a refused server certificate to rejected/ (idempotent)."""
        self.ensure_dirs()
        dest = self.dir("rejected") / _file_name(cert)
        if not dest.exists():
            _write_atomic(dest, cert.public_bytes(serialization.Encoding.DER))
        return dest

    # ------------------------------------------------------------------ validation

    def check_server(
        self,
        cert: x509.Certificate,
        *,
        application_uri: str | None = None,
        pin: str | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        """Raise :class:`CertificateRefused` unless ``cert`` may be used (see the module docstring).
        An untrusted certificate is written to rejected/."""
        tp = thumbprint(cert)
        now = now or dt.datetime.now(dt.timezone.utc)
        if pin is not None:
            if tp != pin.replace(":", "").replace(" ", "").upper():
                raise CertificateRefused(f"certificate {tp} does not match the pinned thumbprint {pin}",
                                         thumbprint=tp, reason="pin_mismatch")
        elif not self._trusted(cert):
            path = self.reject(cert)
            raise CertificateRefused(f"server certificate {tp} ({common_name(cert)}) is not trusted; written to {path}",
                                     thumbprint=tp, reason="untrusted")
        if cert.not_valid_after_utc < now:
            raise CertificateRefused(f"server certificate {tp} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                                     thumbprint=tp, reason="expired")
        if cert.not_valid_before_utc > now + dt.timedelta(minutes=5):
            raise CertificateRefused(f"server certificate {tp} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z",
                                     thumbprint=tp, reason="not_yet_valid")
        if application_uri and application_uri not in san_uris(cert):
            raise CertificateRefused(
                f"server certificate {tp} does not carry the server's application URI {application_uri!r} "
                f"(certificate has {san_uris(cert)})", thumbprint=tp, reason="application_uri")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not (ku.digital_signature and ku.key_encipherment):
                raise CertificateRefused(f"server certificate {tp} lacks the key usages digitalSignature/keyEncipherment",
                                         thumbprint=tp, reason="key_usage")
        except x509.ExtensionNotFound:
            pass

    def _trusted(self, cert: x509.Certificate) -> bool:
        tp = thumbprint(cert)
        for _, t in self.certificates("trusted"):
            if thumbprint(t) == tp:
                return True
            if t.subject == cert.issuer and _is_ca(t) and _signed_by(cert, t):
                return True
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    pub = issuer.public_key()
    if not isinstance(pub, rsa.RSAPublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        return True
    except InvalidSignature:
        return False


def describe(cert: x509.Certificate) -> dict[str, object]:
    """What ``pki show`` and ``pki list`` print about a certificate."""
    return {
        "thumbprint": thumbprint(cert),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "application_uri": (san_uris(cert) or [None])[0],
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": days_left(cert),
        "key_size": getattr(cert.public_key(), "key_size", None),
    }
