"""Configuration of the OPC UA connector (client side: the gateway connects to a machine's server)."""

from __future__ import annotations

import os
import socket
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

#: the policies we speak, most secure first; the deprecated ones only with ``allow_deprecated_policies``
SECURE_POLICIES = ("Aes256_Sha256_RsaPss", "Aes128_Sha256_RsaOaep", "Basic256Sha256")
DEPRECATED_POLICIES = ("Basic256", "Basic128Rsa15")
SecurityChoice = Literal["auto", "none", "Aes256_Sha256_RsaPss", "Aes128_Sha256_RsaOaep", "Basic256Sha256",
                         "Basic256", "Basic128Rsa15"]


def default_application_uri() -> str:
    return f"urn:{socket.gethostname()}:edge-gateway"


class OpcUaTagConfig(BaseModel):
    """Where an OPC UA value lives: a node id (``ns=2;s=Press1.Good`` or ``ns=2;i=1002``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str = Field(description="OPC UA node id, e.g. 'ns=2;s=Press1.GoodCount' or 'ns=2;i=1002'.")

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        from asyncua import ua

        try:
            ua.NodeId.from_string(v)
        except Exception as exc:  # asyncua raises several types for a bad string
            raise ValueError(f"not a valid OPC UA node id ({exc}); expected e.g. 'ns=2;s=Press1.Good' or 'ns=2;i=1002'") from None
        return v


class OpcUaConnectorConfig(BaseModel):
    """An OPC UA server the gateway subscribes to."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["opcua"]
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique connector id, referenced by machine counters.")
    endpoint: str = Field(description="Server endpoint URL, e.g. 'opc.tcp://10.0.0.5:4840'.")
    security: SecurityChoice = Field(
        "auto",
        description="Security policy. 'auto': the most secure endpoint the server offers among the allowed policies "
        "(Aes256_Sha256_RsaPss > Aes128_Sha256_RsaOaep > Basic256Sha256), encrypted; never falls "
        "back to no security. 'none': no signing, no encryption (must be chosen explicitly). Or one policy by name.",
    )
    security_mode: Literal["auto", "Sign", "SignAndEncrypt"] = Field(
        "auto", description="Message security mode; 'auto': SignAndEncrypt only (a server offering only Sign is "
        "refused, with a hint); 'Sign' (signed, not encrypted) must be set explicitly. Ignored with security: none."
    )
    allow_deprecated_policies: bool = Field(
        False, description="Accept the deprecated policies Basic256 and Basic128Rsa15 (SHA-1); a warning is logged."
    )
    pki_dir: str = Field(
        "pki", validate_default=True,
        description="PKI folder (own/ trusted/ rejected/ issuer/); a relative path is relative to the config file."
    )
    application_uri: str | None = Field(
        None, description="Application URI written into our certificate when it is generated "
        "(default 'urn:HOSTNAME:edge-gateway'). An existing certificate is kept and its URI used."
    )
    certificate_key_size: Literal[2048, 3072, 4096] = Field(2048, description="RSA key size of a generated certificate.")
    certificate_validity_days: int = Field(730, ge=1, le=7300, description="Validity of a generated certificate.")
    certificate_expiry_days: int = Field(
        30, ge=0, le=3650, description="Warn (log line and alarm 'certificate_expiring:<connector>:own|server') when our "
        "own or the server's certificate expires within this many days; 0: only once expired.",
    )
    server_certificate_thumbprint: str | None = Field(
        None, pattern=r"^[0-9A-Fa-f:]{40,59}$",
        description="Pin: accept only the server certificate with this SHA-1 thumbprint (the trusted/ folder is then not consulted).",
    )
    username: str | None = Field(None, description="User name for user/password authentication (anonymous when unset).")
    password_env: str | None = Field(None, description="Name of the environment variable holding the password.")
    password_file: str | None = Field(None, description="Path of a file holding the password (first line).")
    user_certificate_file: str | None = Field(
        None, description="X.509 user token: the user certificate to log in with instead of a password (PEM when the file name ends in .pem, else DER)."
    )
    user_private_key_file: str | None = Field(
        None, description="The user certificate's private key (PEM when the name ends in .pem, else DER; unencrypted, keep it mode 0600)."
    )
    allow_plaintext_password: bool = Field(
        False, description="Send the password even when neither the channel nor the token is encrypted (it travels in clear)."
    )
    publishing_interval_ms: int = Field(100, ge=10, le=60_000, description="Subscription publishing interval.")
    sampling_interval_ms: int = Field(50, ge=0, le=60_000, description="Monitored item sampling interval.")
    timeout_s: float = Field(5.0, gt=0, le=120, description="Request timeout; bounds connect and reads.")
    watchdog_interval_s: float = Field(2.0, gt=0, le=60, description="How often the connection is checked.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme != "opc.tcp" or not u.hostname:
            raise ValueError("expected an OPC UA endpoint URL like 'opc.tcp://host:4840'")
        try:
            u.port
        except ValueError:
            raise ValueError("the port in the endpoint URL is not a number 0..65535") from None
        if "@" in u.netloc:
            raise ValueError("no user name or password in the endpoint URL: use username and password_env/password_file")
        return v

    @field_validator("pki_dir")
    @classmethod
    def _pki_dir(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("config_dir") if isinstance(info.context, dict) else None
        v = os.path.expanduser(v)
        if base and not os.path.isabs(v):
            v = os.path.normpath(os.path.join(base, v))
        return v

    @model_validator(mode="after")
    def _checks(self) -> "OpcUaConnectorConfig":
        if self.security in DEPRECATED_POLICIES and not self.allow_deprecated_policies:
            raise ValueError(f"security policy {self.security} is deprecated (SHA-1): choose one of "
                             f"{', '.join(SECURE_POLICIES)} or 'auto', or set allow_deprecated_policies: true")
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("password_env/password_file given without username")
        if (self.user_certificate_file is None) != (self.user_private_key_file is None):
            raise ValueError("user_certificate_file and user_private_key_file go together")
        if self.username and self.user_certificate_file:
            raise ValueError("log in with a user name or a user certificate, not both")
        return self

    @property
    def own_application_uri(self) -> str:
        return self.application_uri or default_application_uri()
