"""Configuration of the ERP posting service (YAML, validated by pydantic; ``edge-gateway-erp validate``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PostgresConfig(_Model):
    dsn: str = Field("postgresql://postgres@127.0.0.1:5432/edge_erp", description="libpq connection string / URL.")
    backoff_initial_s: float = Field(0.5, gt=0, description="At start, the first wait before trying an unreachable "
                                     "database again (doubles on every failure, ±20 % jitter).")
    backoff_max_s: float = Field(30, gt=0, description="Cap of that wait; the service retries for as long as it takes.")

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(v)
        except ProgrammingError as exc:
            # libpq quotes the offending part, which may be (part of) the password: hidden
            why = re.sub(r'"([^"]*)"', lambda m: m[0] if m[1] == "=" else '"…"', str(exc).strip())
            raise ValueError(f"not a libpq connection string or URL: {why} (e.g. 'postgresql://user@host:5432/db' "
                             f"or 'host=... dbname=...'; quoted parts hidden)") from None
        if parts.get("password"):
            raise ValueError("holds a password: give it in the environment (PGPASSWORD) or a password file (PGPASSFILE, "
                             "~/.pgpass), never in the YAML")
        return v


class NatsSourceConfig(_Model):
    """JetStream: one durable pull consumer, shared by every worker of every service process."""

    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1,
                               description="NATS client URLs of the cluster's nodes (the client fails over).")
    stream: str = Field("$MQTT_msgs", description="Stream holding the events. '$MQTT_msgs' is where the NATS MQTT "
                        "endpoint stores QoS 1 messages (while some consumer has interest).")
    subject_prefix: str = Field("$MQTT.msgs.", description="Prefix of the stream's subjects before the MQTT topic "
                                "(topic levels '/' become '.').")
    durable: str = Field("edge-erp", pattern=r"^[A-Za-z0-9_-]+$", description="Durable consumer name (shared).")
    batch: int = Field(64, ge=1, le=10_000, description="Messages fetched per pull request.")
    ack_wait_s: float = Field(30, gt=0, description="Redelivery after this long without an ack.")
    max_ack_pending: int = Field(10_000, ge=1)
    mqtt_endpoints: list[str] = Field(default_factory=list, description="host:port of MQTT endpoints of the "
                                      "cluster; used once at start to make the server create its MQTT streams when "
                                      "they do not exist yet.")
    user: str | None = Field(None, description="NATS user (with password_env or password_file).")
    password_env: str | None = Field(None, description="Environment variable holding the NATS user's password.")
    password_file: str | None = Field(None, description="File holding the NATS user's password (first line); a "
                                      "relative path is relative to this config file.")
    creds_file: str | None = Field(None, description="NATS credentials file (user JWT and NKey seed), instead of a "
                                   "user and password; a relative path is relative to this config file.")

    @field_validator("servers")
    @classmethod
    def _no_credentials_in_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
                raise ValueError("a server URL holds a user or password: set nats.user with nats.password_env (or "
                                 "password_file), or nats.creds_file, never credentials in the YAML")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> "NatsSourceConfig":
        password = self.password_env is not None or self.password_file is not None
        if (self.user is None) != (not password):
            raise ValueError("nats.user and nats.password_env (or password_file) go together")
        if self.creds_file is not None and self.user is not None:
            raise ValueError("nats.creds_file or nats.user with a password: one of them")
        return self

    def auth(self) -> dict[str, str]:
        """The keyword arguments of ``nats.connect`` for the configured credentials (ConfigError when the password
        cannot be read)."""
        if self.creds_file is not None:
            return {"user_credentials": self.creds_file}
        if self.user is None:
            return {}
        from connectors.secrets import read_secret

        try:
            password = read_secret(self.password_env, self.password_file, field="nats.password")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return {"user": self.user, "password": password or ""}


class MqttSourceConfig(_Model):
    """MQTT 5 shared subscription ($share/{group}/...): the broker spreads the messages over the workers."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    group: str = Field("edge-erp", pattern=r"^[A-Za-z0-9_-]+$", description="Shared-subscription group name.")
    client_id_prefix: str = Field("edge-erp", description="Worker i uses client id '{prefix}-{i}' (persistent "
                                  "session: QoS 1 messages queued while it is away).")
    session_expiry_s: int = Field(3600, ge=0)
    keepalive_s: int = Field(10, ge=1)


class ErpEndpointConfig(_Model):
    url: str = Field("http://127.0.0.1:8088/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV",
                     description="Base URL of the OData service; documents go to {url}/ProdnOrdConf2.")
    timeout_s: float = Field(10, gt=0)
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30, gt=0)
    settle_s: float = Field(30, ge=0, description="After a timeout or a dropped connection the ERP may still be "
                            "booking the document: the lookup before the retry waits at least this long.")
    lease_s: float = Field(60, gt=0, description="A claimed outbox row is re-claimable after this long (a poster "
                           "that died while posting); the retry looks the external id up first.")
    batch: int = Field(50, ge=1, le=1000)
    poll_s: float = Field(0.2, gt=0, description="Idle poll interval of the poster.")
    posters: int = Field(1, ge=0, le=64, description="Concurrent poster tasks in this process (0 = do not post).")
    username: str | None = Field(None, description="HTTP basic auth user of the ERP endpoint (with password_env).")
    password_env: str | None = Field(None, description="Environment variable holding that user's password; the "
                                     "service does not start without it.")

    @model_validator(mode="after")
    def _credentials(self) -> "ErpEndpointConfig":
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together: set both for basic auth, or neither")
        return self


class HttpConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535, description="0 = a free port (tests).")


class LoggingConfig(_Model):
    format: Literal["console", "json"] = "json"
    level: str = "info"


class ServiceConfig(_Model):
    source: Literal["nats", "mqtt"] = "nats"
    workers: int = Field(2, ge=1, le=256, description="Consumer workers in this process (one DB connection each).")
    topic_root: str = Field("edge", description="First topic level (mqtt.topic_root of the gateways).")
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)
    nats: NatsSourceConfig = Field(default_factory=NatsSourceConfig)
    mqtt: MqttSourceConfig = Field(default_factory=MqttSourceConfig)
    erp: ErpEndpointConfig = Field(default_factory=ErpEndpointConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    acks: Literal["all", "rejected", "none"] = Field(
        "all", description="Answers on .../{machine}/acks: every event (accepted / rejected), only rejections, none.")
    consumption: Literal["post", "sap_backflush"] = Field(
        "post", description="post: material.consumed becomes a 261 goods movement; sap_backflush: SAP backflushes "
        "on the confirmation, material.consumed is booked in the ledger only (never both, see sap-mapping.md).")
    scrap_reason_code: str | None = Field("0001", description="VarianceReasonCode sent with scrap (None: not sent).")
    unit_map: dict[str, str] = Field(default_factory=dict, description="ISO unit → SAP unit (e.g. PCE: ST).")
    timezone: str = Field("UTC", description="Plant time zone for PostingDate.")
    gap_alarm_s: float = Field(60, gt=0, description="An open seq gap older than this raises the gap alarm.")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):  # ZoneInfoNotFoundError is a KeyError: pydantic would not catch it
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. 'Europe/Berlin', 'UTC')") from None
        return v


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> ServiceConfig:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        # the problem and its line, not the text around it (which may be a secret written where it does not belong)
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or type(exc).__name__}{where}") \
            from None
    try:
        cfg = ServiceConfig.model_validate(doc)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from None
    # relative secret files are relative to the config file (as the gateway's are): started from another working
    # directory, or by systemd, the service reads the same files
    from connectors.secrets import absolute_file_keys

    absolute_file_keys(cfg.nats, str(Path(path).resolve().parent))
    return cfg
