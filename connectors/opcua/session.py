"""Shared OPC UA client setup: endpoint selection, our certificate, server trust, user token.

Used by the connector (every connect) and by the ``browse`` / ``validate --online`` tools, so all of them
talk to a server with the same security and trust settings.

:func:`prepare_client` runs before ``Client.connect()``:

1. GetEndpoints over a transient unsecured channel (allowed by the spec for discovery; nothing secret
   travels on it).
2. :func:`select_endpoint`: with ``security: auto`` the most secure endpoint among the allowed policies
   (see ``SECURE_POLICIES``), SignAndEncrypt only unless ``security_mode: Sign`` is set; never the None policy unless
   ``security: none``.
   Deprecated policies only with ``allow_deprecated_policies`` (and a warning).
3. Our application instance certificate from the PKI folder (generated on first use).
4. The server certificate of the chosen endpoint checked against the PKI (trusted/ or a pin); an
   untrusted one is written to rejected/ and refused (:class:`~connectors.opcua.pki.CertificateRefused`).
5. The user token: anonymous; user name/password, refused when the password would travel in clear
   (neither the channel encrypted nor the token encrypted) unless ``allow_plaintext_password``; or an
   X.509 user certificate with its private key (files).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from cryptography.hazmat.primitives.serialization import Encoding

from connectors.opcua.config import DEPRECATED_POLICIES, SECURE_POLICIES, OpcUaConnectorConfig
from connectors.opcua.pki import CertificateRefused, OwnCertificate, Pki, days_left, first_certificate, thumbprint
from connectors.secrets import read_secret

NONE_URI = sp.SecurityPolicyNone.URI
POLICY_CLASSES: dict[str, type[sp.SecurityPolicy]] = {
    "Aes256_Sha256_RsaPss": sp.SecurityPolicyAes256Sha256RsaPss,
    "Aes128_Sha256_RsaOaep": sp.SecurityPolicyAes128Sha256RsaOaep,
    "Basic256Sha256": sp.SecurityPolicyBasic256Sha256,
    "Basic256": sp.SecurityPolicyBasic256,
    "Basic128Rsa15": sp.SecurityPolicyBasic128Rsa15,
}
URI_NAMES: dict[str, str] = {cls.URI: name for name, cls in POLICY_CLASSES.items()} | {NONE_URI: "None"}
_RANK = {name: len(SECURE_POLICIES) + len(DEPRECATED_POLICIES) - i for i, name in enumerate(SECURE_POLICIES + DEPRECATED_POLICIES)}
_MODE_NAMES = {ua.MessageSecurityMode.None_: "None", ua.MessageSecurityMode.Sign: "Sign",
               ua.MessageSecurityMode.SignAndEncrypt: "SignAndEncrypt"}


class SecurityRefused(Exception):
    """No endpoint, user token or password handling this configuration allows. Not retried faster: a config
    or server change is needed."""


def policy_name(uri: str | None) -> str:
    return URI_NAMES.get(uri or "", uri or "?")


def mode_name(mode: ua.MessageSecurityMode) -> str:
    return _MODE_NAMES.get(mode, str(mode))


def offered(endpoints: list[ua.EndpointDescription]) -> str:
    return ", ".join(sorted({f"{policy_name(e.SecurityPolicyUri)}/{mode_name(e.SecurityMode)}" for e in endpoints}))


def select_endpoint(endpoints: list[ua.EndpointDescription], cfg: OpcUaConnectorConfig) -> ua.EndpointDescription:
    """The endpoint to use (see the module docstring); :class:`SecurityRefused` when none is acceptable."""
    if cfg.security == "none":
        for e in endpoints:
            if e.SecurityPolicyUri == NONE_URI and e.SecurityMode == ua.MessageSecurityMode.None_:
                return e
        raise SecurityRefused(f"security: none, but the server offers no unsecured endpoint (it offers {offered(endpoints)})")
    allowed = [cfg.security] if cfg.security != "auto" else list(SECURE_POLICIES) + (
        list(DEPRECATED_POLICIES) if cfg.allow_deprecated_policies else [])
    # auto: encrypted only. Sign (signed, readable by anyone on the path) must be asked for: the endpoint list comes
    # over an unsecured channel, so someone in the middle could strip the SignAndEncrypt entries to force it
    modes = {"auto": (ua.MessageSecurityMode.SignAndEncrypt,),
             "Sign": (ua.MessageSecurityMode.Sign,),
             "SignAndEncrypt": (ua.MessageSecurityMode.SignAndEncrypt,)}[cfg.security_mode]
    candidates = [e for e in endpoints if policy_name(e.SecurityPolicyUri) in allowed and e.SecurityMode in modes]
    if not candidates:
        deprecated = [e for e in endpoints if policy_name(e.SecurityPolicyUri) in DEPRECATED_POLICIES]
        hint = ""
        if deprecated and not cfg.allow_deprecated_policies and all(
                policy_name(e.SecurityPolicyUri) in DEPRECATED_POLICIES + ("None",) for e in endpoints):
            hint = ("; the server offers only deprecated (SHA-1) policies: update the server, or set "
                    "allow_deprecated_policies: true to accept them")
        elif all(e.SecurityPolicyUri == NONE_URI for e in endpoints):
            hint = "; the server offers no security at all: enable security on the server, or set security: none"
        elif cfg.security_mode == "auto" and any(e.SecurityMode == ua.MessageSecurityMode.Sign
                                                 and policy_name(e.SecurityPolicyUri) in allowed for e in endpoints):
            hint = ("; it offers only Sign (signed, not encrypted) with these policies: enable SignAndEncrypt on the "
                    "server, or set security_mode: Sign to accept that")
        want = f"{cfg.security if cfg.security != 'auto' else '/'.join(allowed)} with mode {cfg.security_mode}"
        raise SecurityRefused(f"no acceptable endpoint: wanted {want}, the server offers {offered(endpoints)}{hint}")
    # SignAndEncrypt before Sign, then our policy ranking (the server's SecurityLevel is vendor-defined)
    return max(candidates, key=lambda e: (e.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt,
                                          _RANK[policy_name(e.SecurityPolicyUri)]))


@dataclass
class SessionSecurity:
    """What :func:`prepare_client` chose; shown in status."""

    policy: str
    mode: str
    server_thumbprint: str | None = None
    server_cert_days_left: float | None = None
    own_thumbprint: str | None = None
    own_cert_days_left: float | None = None
    own_generated: bool = False
    user_token: str = "anonymous"
    warnings: list[str] = field(default_factory=list)
    own_cert_not_after: float | None = None  # POSIX seconds: days left are recomputed while the session lives
    server_cert_not_after: float | None = None

    def as_status(self) -> dict[str, Any]:
        return {"security_policy": self.policy, "security_mode": self.mode, "user_token": self.user_token,
                "server_certificate_thumbprint": self.server_thumbprint,
                "server_certificate_days_left": self.server_cert_days_left,
                "own_certificate_days_left": self.own_cert_days_left}


def password(cfg: OpcUaConnectorConfig) -> str:
    try:
        pw = read_secret(cfg.password_env, cfg.password_file, field=f"connectors[{cfg.id}].password")
    except ValueError as exc:
        raise SecurityRefused(str(exc)) from None
    if pw is None:
        raise SecurityRefused("username is set but neither password_env nor password_file")
    return pw


def own_certificate(cfg: OpcUaConnectorConfig) -> tuple[Pki, OwnCertificate, bool]:
    pki = Pki(cfg.pki_dir)
    own, generated = pki.own_certificate(cfg.own_application_uri, key_size=cfg.certificate_key_size,
                                         validity_days=cfg.certificate_validity_days)
    return pki, own, generated


async def prepare_client(client: Client, cfg: OpcUaConnectorConfig, timeout: float) -> SessionSecurity:
    """Configure ``client`` (not yet connected) per the module docstring. Raises :class:`SecurityRefused`,
    :class:`CertificateRefused`, or the transport's error when the server cannot be reached."""
    pw = password(cfg) if cfg.username else None  # a missing secret is reported before anything else
    endpoints = await asyncio.wait_for(client.connect_and_get_server_endpoints(), timeout)
    ep = select_endpoint(endpoints, cfg)
    info = SessionSecurity(policy=policy_name(ep.SecurityPolicyUri), mode=mode_name(ep.SecurityMode))
    if info.policy in DEPRECATED_POLICIES:
        info.warnings.append(f"using deprecated security policy {info.policy} (allowed by allow_deprecated_policies)")
    if ep.SecurityPolicyUri != NONE_URI:
        pki, own, generated = await asyncio.to_thread(own_certificate, cfg)
        info.own_thumbprint, info.own_cert_days_left, info.own_generated = own.thumbprint, days_left(own.certificate), generated
        info.own_cert_not_after = own.certificate.not_valid_after_utc.timestamp()
        if not ep.ServerCertificate:
            raise SecurityRefused(f"the server's {info.policy} endpoint carries no certificate")
        server_cert = first_certificate(ep.ServerCertificate)
        info.server_thumbprint = thumbprint(server_cert)
        info.server_cert_days_left = days_left(server_cert)
        info.server_cert_not_after = server_cert.not_valid_after_utc.timestamp()
        pki.check_server(server_cert, application_uri=ep.Server.ApplicationUri if ep.Server else None,
                         pin=cfg.server_certificate_thumbprint)
        client.application_uri = own.application_uri
        await client.set_security(POLICY_CLASSES[info.policy], str(own.cert_path), str(own.key_path),
                                  server_certificate=server_cert.public_bytes(Encoding.DER), mode=ep.SecurityMode)
    if cfg.username:
        token = next((t for t in ep.UserIdentityTokens if t.TokenType == ua.UserTokenType.UserName), None)
        if token is None:
            raise SecurityRefused(f"the server's {info.policy}/{info.mode} endpoint does not offer user name login "
                                  f"(it offers: {', '.join(t.TokenType.name for t in ep.UserIdentityTokens) or 'nothing'})")
        token_uri = token.SecurityPolicyUri or ep.SecurityPolicyUri
        encrypted = ep.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt or token_uri != NONE_URI
        if not encrypted:
            if not cfg.allow_plaintext_password:
                raise SecurityRefused("the password would travel in clear (no encryption on this endpoint): use a "
                                      "secure endpoint, or set allow_plaintext_password: true")
            info.warnings.append("the password travels in clear (allow_plaintext_password)")
        client.set_user(cfg.username)
        client.set_password(pw or "")
        info.user_token = "username"
    elif cfg.user_certificate_file and cfg.user_private_key_file:
        if not any(t.TokenType == ua.UserTokenType.Certificate for t in ep.UserIdentityTokens):
            raise SecurityRefused(f"the server's {info.policy}/{info.mode} endpoint does not offer certificate login")
        try:
            await client.load_client_certificate(cfg.user_certificate_file)
            await client.load_private_key(Path(cfg.user_private_key_file))
        except (OSError, ValueError) as exc:
            raise SecurityRefused(f"cannot load the user certificate or key ({type(exc).__name__}: "
                                  f"{getattr(exc, 'strerror', None) or 'not a certificate/key'})") from None
        info.user_token = "certificate"
    elif not any(t.TokenType == ua.UserTokenType.Anonymous for t in ep.UserIdentityTokens):
        raise SecurityRefused("the server requires a login: set username and password_env or password_file, "
                              "or user_certificate_file and user_private_key_file")
    return info

__all__ = ["CertificateRefused", "SecurityRefused", "SessionSecurity", "prepare_client", "select_endpoint"]
