"""Gateway configuration: YAML validated by pydantic models, with errors a plant engineer can act on.

Every problem is reported as ``FILE:LINE: field.path: what is wrong (what is expected)``, all problems at once.
Unknown keys are errors. Secrets are never read from YAML: ``password_env`` / ``password_file`` only.
"""

from __future__ import annotations

import os
import re
from collections import Counter as _Counter
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from connectors import REGISTRY
from connectors.secrets import absolute_file_keys, read_secret
from mappings.events import CONTROL_CHARACTERS, MACHINE_ID_PATTERN, TEXT_PATTERN

_TOPIC_LEVEL = MACHINE_ID_PATTERN  # one MQTT topic level (also the gateway and ISA-95 ids)
_TOPIC_HINT = "letters, digits, '_', '.', '-' (it is used as an MQTT topic level)"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewayIdentity(_Model):
    """Who this gateway is and where it sits in the ISA-95 equipment hierarchy."""

    id: str = Field(pattern=_TOPIC_LEVEL, description="Gateway id, unique in the enterprise.")
    enterprise: str = Field(pattern=_TOPIC_LEVEL, description="ISA-95 enterprise.")
    site: str = Field(pattern=_TOPIC_LEVEL, description="ISA-95 site (plant).")
    area: str = Field(pattern=_TOPIC_LEVEL, description="ISA-95 area.")
    line: str = Field(pattern=_TOPIC_LEVEL, description="ISA-95 production line.")


class TlsConfig(_Model):
    """TLS to the broker (server verification, optionally a client certificate)."""

    enabled: bool = Field(False, description="Connect with TLS.")
    ca_file: str | None = Field(None, description="CA bundle to verify the broker; system CAs when omitted.")
    cert_file: str | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: str | None = Field(None, description="Client private key (mutual TLS).")

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both for mutual TLS, or neither")
        return self


class MqttConfig(_Model):
    """The broker events are published to (QoS 1) and dispatch messages are received from."""

    host: str = Field("127.0.0.1", min_length=1, description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    brokers: list[str] = Field(
        default_factory=list, max_length=16,
        description="Several endpoints of one clustered broker ('host:port', e.g. the nodes of a NATS cluster), tried "
        "in turn with the same client id: on a failed connect or a lost connection the gateway moves to the next one "
        "(backing off only after a full round). Empty: host and port above.",
    )
    client_id: str | None = Field(None, description="MQTT client id; defaults to the gateway id.")
    tls: TlsConfig = Field(default_factory=TlsConfig)
    username: str | None = Field(None, description="User name; the password comes from password_env or password_file.")
    password_env: str | None = Field(None, description="Environment variable that holds the password.")
    password_file: str | None = Field(None, description="File that holds the password (first line).")
    allow_plaintext_password: bool = Field(False, description=(
        "Send the password to a broker beyond loopback without TLS (a trusted plant network only): refused at "
        "validation otherwise."))
    keepalive_s: int = Field(5, ge=1, le=600, description="MQTT keepalive: a dead broker is noticed within ~1.5x.")
    topic_root: str = Field("edge", pattern=_TOPIC_LEVEL, description="First topic level of everything published.")
    max_inflight: int = Field(100, ge=1, le=1000, description=(
        "Sliding window of unacknowledged QoS 1 messages; MQTT 5: at most the broker's Receive Maximum less one "
        "(mosquitto announces its max_inflight_messages, 20 by default: raise it there for a larger window)."))
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version; 5 lets the broker refuse a message in its PUBACK (then quarantined)."
    )
    puback_timeout_s: float = Field(
        30, ge=0, le=3600, description="A message in flight this long without its PUBACK ends the connection (sent "
        "again on the next one; its event id keeps it once at the ERP) when nothing was acknowledged meanwhile, or a "
        "message sent after it was (MQTT acknowledges in order: its PUBACK was lost). A slow link working through "
        "the window is no timeout. 0 = wait for ever."
    )
    max_message_bytes: int = Field(
        256 * 1024, ge=1024, le=268_435_455, description="Larger events are quarantined instead of published."
    )
    batch_max_events: int = Field(
        0, ge=0, le=10_000, description="CloudEvents batch mode: up to this many events of one machine per MQTT message "
        "on .../{machine}/events/batch (0 = one event per message). Consumers must accept JSON arrays."
    )
    backlog_rate: float = Field(
        0, ge=0, description="Max events/s when draining a backlog after an outage (0 = as fast as the broker acks); "
        "live events are not limited."
    )
    dispatch_resync_s: float = Field(
        300, ge=0, le=86_400, description="Every this many seconds the gateway subscribes to its dispatch topics again, "
        "so the broker sends the retained dispatches again: a dispatch the broker failed to deliver live (seen with "
        "nats-server clusters) is applied at the latest one period later. 0 = only at each connect."
    )
    broker_kind: Literal["mqtt", "nats"] = Field(
        "mqtt", description="'nats': the broker is the MQTT endpoint of nats-server (2.9), which closes the connection "
        "on a topic containing '.'. Then validate (and start-up) require protocol 3.1.1, batch mode "
        "(batch_max_events >= 2: everything on .../events/batch) and no '.' in topic_root, the gateway identity and "
        "machine ids. 'mqtt' (default): any MQTT broker (mosquitto, ...)."
    )

    @model_validator(mode="after")
    def _password(self) -> "MqttConfig":
        if self.password_env and self.password_file:
            raise ValueError("set password_env or password_file, not both")
        return self

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, v: list[str]) -> list[str]:
        for i, b in enumerate(v):
            host, sep, port = b.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"brokers[{i}] {b!r}: expected 'host:port', e.g. '10.0.0.5:1883'")
        return v

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of each broker endpoint, in the order they are tried."""
        if not self.brokers:
            return [(self.host, self.port)]
        return [(h.strip("[]"), int(p)) for h, _, p in (b.rpartition(":") for b in self.brokers)]

    def password(self) -> str | None:
        """Resolve the password from the environment or a file (ValueError naming the field when it cannot)."""
        return read_secret(self.password_env, self.password_file, field="mqtt.password")


class StoreConfig(_Model):
    """The local SQLite store: outbox of unsent events, quarantine and the machines' counter state."""

    path: str = Field(
        "./data/edge-gateway.db",
        description="SQLite file of the outbox and counter state. A relative path is relative to the directory of the "
        "config file (not the working directory), so the gateway finds its backlog wherever it is started from.",
    )
    synchronous: Literal["normal", "full"] = Field(
        "full",
        description="'full' (default): a committed event survives power loss (one WAL fsync per group commit). "
        "'normal': it survives a process crash only; after a power loss the last commits may roll back and an event "
        "already published can be re-derived with other content under the same id (explicit opt-out).",
    )
    max_size_mb: float = Field(
        512, gt=0, description="Cap on event bytes held (outbox + quarantine). When reached, quantities accumulate in "
        "the machine state (nothing is lost), low-value events are dropped with an exact count, an alarm is raised.",
    )


class CounterConfig(BaseModel):
    """A machine counter bound to a connector tag. The address fields depend on the connector type
    (OPC UA: ``node_id``; Modbus: ``address``, ``table``, ``data_type``, ``word_order``)."""

    model_config = ConfigDict(extra="allow", frozen=True)  # shared between machines: see _share_bindings

    connector: str = Field(description="Id of the connector that reads this counter.")
    mode: Literal["cumulative", "reset_on_read", "delta"] = Field(
        "cumulative", description="How the counter behaves: cumulative (usual PLC counter), reset on read, or delta."
    )
    bits: Literal[16, 32, 64] | None = Field(
        None, description="Register width; rollover modulus is 2**bits. Defaults from the Modbus data type, else 32."
    )
    signed: bool | None = Field(None, description="Signed register (two's complement). Defaults from the data type.")
    max_value: int | None = Field(None, ge=1, description="Explicit maximum before the counter wraps to 0 (overrides bits).")
    scale: Decimal = Field(Decimal(1), gt=0, description="Quantity per counter increment.")
    max_rate: float = Field(
        50.0, gt=0, description="Highest plausible rate in counts per second; larger jumps are held as anomalies."
    )


class MaterialMeterConfig(CounterConfig):
    """A meter of consumed material (a flow or weight totaliser): counted like a counter, reported as
    ``material.consumed`` (method ``metered``) with its unit of measure."""

    unit: str = Field(min_length=1, max_length=8, pattern=TEXT_PATTERN,
                      description="Unit of measure of the metered material (ISO), e.g. KG.")
    resolution: Decimal | None = Field(
        None, gt=0, description="Float meter (a totaliser read as float32/float64, or an OPC UA Float/Double node): "
        "each reading is rounded to a whole number of this step (e.g. 0.01), so quantities are exact decimals and "
        "float noise is never counted. Required for a Modbus float32/float64 meter. A float meter does not wrap: a "
        "decrease is a reset. max_rate is then in meter units per second.",
    )
    noise: Decimal | None = Field(
        None, gt=0, description="Float meter: a decrease of at most this quantity is float noise, ignored (not a "
        "reset). Default: one resolution step.",
    )


class StateConfig(BaseModel):
    """Machine state tag and how its raw values map to states."""

    model_config = ConfigDict(extra="allow", frozen=True)  # shared between machines: see _share_bindings

    connector: str = Field(description="Id of the connector that reads the state tag.")
    values: dict[str, Annotated[str, Field(min_length=1, pattern=TEXT_PATTERN)]] = Field(
        default_factory=dict,
        description="Raw value → state name, e.g. {'0': idle, '1': running, '2': stopped}; raw text when omitted "
                    "(a text tag's text up to its first NUL, other control characters written as \\xNN).",
    )


class TagConfig(BaseModel):
    """A tag read through a connector; the address fields depend on the connector type."""

    model_config = ConfigDict(extra="allow", frozen=True)  # shared between machines: see _share_bindings

    connector: str = Field(description="Id of the connector that reads the tag.")


class ReportingConfig(_Model):
    """When a machine's accumulated quantities are reported (a window closes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # shared between machines: see _share_bindings

    interval_s: float = Field(5.0, gt=0, le=86400, description="Send a quantity report at least this often.")
    max_units: int | None = Field(None, ge=1, description="Also send a report once this many units accumulate.")
    jitter: float = Field(0.1, ge=0, le=0.5, description=(
        "Each window closes up to this fraction of interval_s early, drawn per machine and window; with jitter > 0 "
        "the first window after a start closes anywhere within interval_s. Spreads the reports of machines that "
        "start or resume together over time instead of one burst (which queues every other event behind it). "
        "0: every window lasts exactly interval_s."))


CounterName = Literal["good", "scrap", "rework", "total"]


# a material number as in a dispatch's components (gateway/dispatch.py): no control character, at most 64 characters
MaterialNumber = Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)]


def _keys_by_pattern(schema: dict[str, Any]) -> None:
    """JSON Schema of a mapping whose keys have a pattern: pydantic writes ``patternProperties``, which lets a key
    that does not match through unchecked; ``propertyNames`` refuses it, as the model does."""
    patterns = schema.pop("patternProperties", None)
    if patterns:
        ((pattern, value),) = patterns.items()
        schema["additionalProperties"] = value
        schema.setdefault("propertyNames", {})["pattern"] = pattern


class MachineConfig(_Model):
    """A machine (ISA-95 work cell / SAP work center) whose counters are posted to production orders."""

    id: str = Field(pattern=_TOPIC_LEVEL, description="Machine id (work cell); used in topics and events.")
    name: str | None = Field(None, description="Human-readable name.")
    work_center: str | None = Field(None, description="ERP work center.")
    unit: str = Field("PCE", min_length=1, pattern=TEXT_PATTERN,
                      description="Unit of measure of the counted quantity (ISO code).")
    counters: dict[CounterName, CounterConfig] = Field(description="Counter bindings: good, scrap, rework, total.")
    state: StateConfig | None = Field(None, description="Optional machine state tag.")
    materials: dict[MaterialNumber, MaterialMeterConfig] = Field(
        default_factory=dict, description="Material meters by material number: metered consumption (goods issue 261).",
        json_schema_extra=_keys_by_pattern,
    )
    order_source: Literal["mqtt", "tag", "local"] = Field(
        "mqtt",
        description="Where the active production order comes from: 'mqtt' (ERP dispatch, retained), 'tag' (PLC tags "
        "order_tag / operation_tag) or 'local' (`edge-gateway order set` / HTTP).",
    )
    order_tag: TagConfig | None = Field(None, description="PLC tag holding the order number (order_source: tag).")
    operation_tag: TagConfig | None = Field(None, description="PLC tag holding the operation number (order_source: tag).")
    complete_tag: TagConfig | None = Field(
        None, description="PLC flag 'operation complete': its rising edge completes the active operation (final "
        "confirmation), whatever the order source."
    )
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)

    @model_validator(mode="after")
    def _order_tags(self) -> "MachineConfig":
        if self.order_source == "tag" and (self.order_tag is None or self.operation_tag is None):
            raise ValueError("order_source 'tag' needs order_tag and operation_tag (the PLC tags with the order and operation numbers)")
        if self.order_source != "tag" and (self.order_tag is not None or self.operation_tag is not None):
            raise ValueError(f"order_tag / operation_tag are only read with order_source: tag (it is {self.order_source!r})")
        return self

    @field_validator("counters")
    @classmethod
    def _has_quantity(cls, v: dict[str, CounterConfig]) -> dict[str, CounterConfig]:
        if "good" not in v and "total" not in v:
            raise ValueError("a machine needs a 'good' counter or a 'total' counter (yield = total - scrap - rework)")
        if "good" in v and "total" in v:
            raise ValueError("bind either 'good' or 'total', not both (yield would be counted twice)")
        return v


class HttpConfig(_Model):
    """Local HTTP API: /health, /status, /metrics and the local order command. Off unless enabled."""

    enabled: bool = Field(False, description="Serve the local HTTP API.")
    host: str = Field("127.0.0.1", description="Listen address; loopback unless you mean to expose it.")
    port: int = Field(8780, ge=1, le=65535, description="Listen port.")
    token_env: str | None = Field(
        None, description="Environment variable with a bearer token required for POST requests (order commands). "
        "Required when host is not a loopback address.",
    )
    allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Host names (without port) a loopback listener answers besides loopback ones: the name a reverse proxy on "
        "this host passes on. Other Host headers get 421 (DNS rebinding)."))


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses (127.0.0.0/8, ::1); a name or any other address is not."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class LoggingConfig(_Model):
    """Structured logs (structlog) on stderr; third-party libraries' logs come out in the same format."""

    format: Literal["console", "json"] = Field("console", description="'json' in production.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")


class AlarmsConfig(_Model):
    """Alarm thresholds, in seconds: a condition raises its alarm once it has lasted this long, and clears it when it
    ends (see docs/operations.md, the alarm table). Evaluated once a second."""

    broker_unreachable_s: float = Field(
        60, gt=0, description="Raise broker_unreachable when the MQTT broker has been unreachable this long (events "
        "are buffered meanwhile).")
    connector_down_s: float = Field(
        60, gt=0, description="Raise connector_down:<connector> when a connector has not been connected this long.")
    machine_unreachable_s: float = Field(
        30, gt=0, description="A machine one of whose connectors has been down this long emits machine.state_changed "
        "with state 'unreachable' (its figures are stale); the state is reported again when it comes back.")
    oldest_unsent_s: float = Field(
        300, gt=0, description="Raise oldest_unsent_event when the oldest event not yet acknowledged by the broker was "
        "committed longer ago than this.")
    completion_unacked_s: float | None = Field(
        600, gt=0, description="Raise completion_unacked:<machine> when an operation.completed event has not been "
        "acknowledged by the ERP (status accepted on .../{machine}/acks) within this time. null: off (an ERP that "
        "sends no positive acknowledgements).")
    anomaly_hold_s: float = Field(
        3600, gt=0, description="counter_anomaly:<machine> stays raised this long after the machine's last "
        "counter.anomaly event with a quantity held (not counted).")


# every registered connector contributes its config model (adding a protocol: one folder + one REGISTRY line)
ConnectorConfig = Annotated[Union[tuple(k.config_model for k in REGISTRY.values())], Field(discriminator="type")]  # type: ignore[valid-type]


class GatewayConfig(_Model):
    gateway: GatewayIdentity
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    alarms: AlarmsConfig = Field(default_factory=AlarmsConfig)
    connectors: list[ConnectorConfig] = Field(
        default_factory=list, description="The PLCs and devices read, one entry per connection; 'type' selects the protocol")
    machines: list[MachineConfig] = Field(default_factory=list, description="The machines whose counters are posted")

    # filled by load_config after cross-checks: (machine, signal) -> validated tag address model
    _tag_addresses: dict[tuple[str, str], Any] = PrivateAttr(default_factory=dict)

    def connector(self, connector_id: str) -> Any:
        return next(c for c in self.connectors if c.id == connector_id)

    def tag_address(self, machine_id: str, signal: str) -> Any:
        return self.__pydantic_private__["_tag_addresses"][(machine_id, signal)]  # type: ignore[index]


# --------------------------------------------------------------------------------------------------------------
# errors and loading


class ConfigProblem(BaseModel):
    path: str
    message: str
    line: int | None = None


class ConfigError(Exception):
    """A config file that cannot be used; carries every problem found."""

    def __init__(self, file: str, problems: list[ConfigProblem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        for p in self.problems:
            where = f"{self.file}:{p.line}" if p.line else self.file
            lines.append(f"{where}: {p.path or '(top level)'}: {p.message}")
        return "\n".join(lines)


def format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's mark of a problem with the key just named (the message quotes it)
        elif _CONTROL.search(str(part)):
            out += f"[{str(part)!r}]"  # a key with a control character: escaped, as the message quotes it
        else:
            out += ("." if out else "") + str(part)
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_HINTS = {
    "extra_forbidden": "unknown key; check the spelling (every key: docs/configuration.md, or "
                       "`edge-gateway schema --config --markdown`)",
    "missing": "required field is missing",
}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden" and loc and loc[-1] == "password":
        return "passwords are never written in the config: use password_env (environment variable) or password_file"
    if kind in _HINTS:
        return _HINTS[kind]
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"{msg}, got {err.get('input')!r}"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        msg = f"'type' must be one of: {', '.join(sorted(REGISTRY))}"
    if kind == "literal_error":
        msg = f"{msg}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        if (err.get("ctx") or {}).get("pattern") == TEXT_PATTERN:
            msg = f"got {err.get('input')!r}; remove the {CONTROL_CHARACTERS}"
        else:
            msg = f"got {err.get('input')!r}; use {_TOPIC_HINT}"
    return msg


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # discriminated unions add the tag ("opcua") after the list index: connectors[0].opcua.endpoint
    if len(loc) >= 3 and loc[0] == "connectors" and isinstance(loc[1], int) and loc[2] in REGISTRY:
        return loc[:2] + loc[3:]
    return loc


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~20x faster on a 3,000-machine file


class _LineIndex:
    """Maps a field path to the line of the YAML file it was written on (best effort). The file is composed into
    nodes (with their marks) only when a problem is reported: a valid config is parsed once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._root: Any = False

    @property
    def root(self) -> Any:
        if self._root is False:
            try:
                self._root = yaml.compose(self.text, Loader=_YAML_LOADER)
            except yaml.YAMLError:
                self._root = None
        return self._root

    def line(self, loc: tuple[Any, ...]) -> int | None:
        node = self.root
        best = None
        for part in loc:
            if node is None:
                break
            best = node.start_mark.line + 1
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == str(part):
                        nxt = v
                        best = k.start_mark.line + 1
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                nxt = node.value[part]
            node = nxt
        if node is not None:
            best = node.start_mark.line + 1
        return best



def _cross_check(data: dict[str, Any]) -> tuple[list[tuple[tuple[Any, ...], str]], dict[tuple[str, str], Any]]:
    """Checks across sections, on the raw document so they run even when other fields are invalid.
    Returns the problems and, per (machine, signal), the validated connector-specific tag address."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    addresses: dict[tuple[str, str], Any] = {}
    connectors = data.get("connectors") if isinstance(data.get("connectors"), list) else []
    machines = data.get("machines") if isinstance(data.get("machines"), list) else []

    by_id: dict[str, str] = {}  # connector id -> type
    ids = _Counter(c.get("id") for c in connectors if isinstance(c, dict) and isinstance(c.get("id"), str))
    for i, c in enumerate(connectors):
        if not isinstance(c, dict) or not isinstance(c.get("id"), str):
            continue
        if ids[c["id"]] > 1:
            problems.append((("connectors", i, "id"), f"duplicate connector id {c['id']!r}; connector ids must be unique"))
        if c.get("type") in REGISTRY:
            by_id.setdefault(c["id"], c["type"])
    problems.extend(_check_http_exposure(data.get("http")))
    problems.extend(_check_mqtt_plaintext_password(data.get("mqtt")))
    mids = _Counter(m.get("id") for m in machines if isinstance(m, dict) and isinstance(m.get("id"), str))
    for i, m in enumerate(machines):
        if isinstance(m, dict) and isinstance(m.get("id"), str) and mids[m["id"]] > 1:
            problems.append((("machines", i, "id"), f"duplicate machine id {m['id']!r}; machine ids must be unique"))

    own_fields = {
        "counter": set(CounterConfig.model_fields),
        "material": set(MaterialMeterConfig.model_fields),
        "state": set(StateConfig.model_fields),
        "order": set(TagConfig.model_fields),
        "operation": set(TagConfig.model_fields),
        "complete": set(TagConfig.model_fields),
    }
    non_counters = ("state", "order", "operation", "complete")
    seen: dict[tuple[str, Any], str] = {}
    for i, m in enumerate(machines):
        if not isinstance(m, dict):
            continue
        bindings: list[tuple[str, tuple[Any, ...], Any]] = []
        counters = m.get("counters")
        if isinstance(counters, dict):
            bindings += [(str(n), ("machines", i, "counters", n), b) for n, b in counters.items()]
        materials = m.get("materials")
        if isinstance(materials, dict):
            bindings += [(f"material:{n}", ("machines", i, "materials", n), b) for n, b in materials.items()]
        for sig in ("state", "order_tag", "operation_tag", "complete_tag"):
            if m.get(sig) is not None:
                bindings.append((sig.removesuffix("_tag"), ("machines", i, sig), m.get(sig)))
        for signal, base, b in bindings:
            if not isinstance(b, dict) or not isinstance(b.get("connector"), str):
                continue  # reported by the model validation
            cid = b["connector"]
            ctype = by_id.get(cid)
            if ctype is None:
                if cid not in ids:
                    known = ", ".join(sorted(str(k) for k in ids)) or "none defined"
                    problems.append((base + ("connector",), f"unknown connector {cid!r}; defined connectors: {known}"))
                continue
            kind = REGISTRY[ctype]
            fields = own_fields[signal if signal in non_counters else
                                "material" if signal.startswith("material:") else "counter"]
            address_part = {k: v for k, v in b.items() if k not in fields}
            try:
                addr = kind.tag_model.model_validate(address_part)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = base + tuple(err["loc"])
                    msg = _message(err)
                    if err["type"] == "extra_forbidden":
                        allowed = ", ".join(sorted(fields | set(kind.tag_model.model_fields)))
                        msg = f"unknown key for a {ctype} {(signal if signal in non_counters else 'counter')} binding (allowed: {allowed})"
                    elif err["type"] == "missing":
                        msg = f"required: this {signal} tag is read through {ctype} connector {cid!r}"
                    problems.append((loc, msg))
                continue
            if isinstance(m.get("id"), str):
                addresses[(m["id"], signal)] = addr
            key = (cid, addr)
            if key in seen:
                problems.append((base, f"same {ctype} address as {seen[key]}; bind each tag once"))
            else:
                seen[key] = f"machines[{i}].{signal if signal in non_counters else 'counters.' + signal}"
            if signal not in non_counters:
                problems.extend(_check_counter_type(base, b, addr, ctype))
    problems.extend(_check_nats_topics(data))
    return problems, addresses


def _check_http_exposure(http: Any) -> list[tuple[tuple[Any, ...], str]]:
    """The local API on an address other than loopback needs a token (``http.token_env``)."""
    if not isinstance(http, dict) or http.get("enabled") is not True or http.get("token_env"):
        return []
    host = http.get("host", HttpConfig.model_fields["host"].default)
    if not isinstance(host, str) or is_loopback(host):
        return []
    return [(("http", "host"), (f"{host!r} is not a loopback address, and without a token anyone on that network could "
                                "post order changes: set http.token_env (an environment variable holding a bearer "
                                "token), or listen on host: 127.0.0.1"))]


def _check_mqtt_plaintext_password(mqtt: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A password for a broker beyond loopback goes over TLS, unless ``allow_plaintext_password`` says otherwise."""
    if not isinstance(mqtt, dict) or not (mqtt.get("password_env") or mqtt.get("password_file")):
        return []
    def yes(v: Any) -> bool:  # as the model reads a boolean (a YAML 'true' quoted is one too)
        return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1")) or v == 1

    tls = mqtt.get("tls")
    if (isinstance(tls, dict) and yes(tls.get("enabled"))) or yes(mqtt.get("allow_plaintext_password")):
        return []
    brokers = mqtt.get("brokers")
    if isinstance(brokers, list) and brokers:
        hosts = [b.rpartition(":")[0].strip("[]") if isinstance(b, str) else "" for b in brokers]
    else:
        hosts = [mqtt.get("host", MqttConfig.model_fields["host"].default)]
    remote = [h for h in hosts if not (isinstance(h, str) and is_loopback(h))]
    if not remote:
        return []
    return [(("mqtt", "tls", "enabled"), (f"the MQTT password would cross the network in clear to {remote[0]!r}: set "
                                          "tls.enabled: true, or allow_plaintext_password: true if that network is "
                                          "trusted"))]


def _check_nats_topics(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """``mqtt.broker_kind: nats``: every topic the gateway publishes or subscribes to must be free of '.', which
    nats-server 2.9 refuses by closing the connection (the gateway would reconnect and resend forever)."""
    mqtt = data.get("mqtt") if isinstance(data.get("mqtt"), dict) else {}
    if mqtt.get("broker_kind") != "nats":
        return []
    why = "nats-server refuses MQTT topics containing '.' (mqtt.broker_kind: nats)"
    out: list[tuple[tuple[Any, ...], str]] = []
    if mqtt.get("protocol", "5") != "3.1.1":
        out.append((("mqtt", "protocol"), 'the MQTT endpoint of nats-server speaks MQTT 3.1.1 only: set protocol: "3.1.1"'))
    batch = mqtt.get("batch_max_events", 0)
    if isinstance(batch, int) and not isinstance(batch, bool) and batch < 2:
        msg = (f"is {batch}: the per-type event topics contain a '.' (.../events/operation.quantity_reported) and "
               f"{why}; set batch_max_events to 2 or more (batch mode: every event goes to .../events/batch; the "
               "ERP service accepts batches)")
        out.append((("mqtt", "batch_max_events"), msg))
    names = [(("mqtt", "topic_root"), mqtt.get("topic_root"))]
    ident = data.get("gateway") if isinstance(data.get("gateway"), dict) else {}
    names += [(("gateway", k), ident.get(k)) for k in ("id", "enterprise", "site", "area", "line")]
    machines = data.get("machines") if isinstance(data.get("machines"), list) else []
    names += [(("machines", i, "id"), m.get("id")) for i, m in enumerate(machines) if isinstance(m, dict)]
    for loc, name in names:
        if isinstance(name, str) and "." in name:
            out.append((loc, f"{name!r} is a topic level and {why}; use '-' or '_' instead of '.'"))
    return out


def _check_counter_type(base: tuple[Any, ...], b: dict[str, Any], addr: Any, ctype: str) -> list[tuple[tuple[Any, ...], str]]:
    """Counter / meter checks; what depends on the protocol the tag model answers (``counter_problems``,
    ``float_meter_problems``, ``holds_float``: optional methods of a connector's tag model, see connectors/modbus)."""
    out: list[tuple[tuple[Any, ...], str]] = []
    bits = b.get("bits") if isinstance(b.get("bits"), int) else None
    meter = len(base) > 2 and base[2] == "materials"
    if meter and (b.get("resolution") is not None or getattr(addr, "holds_float", False)):
        return _check_float_meter(base, b, addr)
    if meter and b.get("noise") is not None:
        out.append((base + ("noise",), "noise is for float meters (with a resolution): remove it or set resolution"))
    counter_problems = getattr(addr, "counter_problems", None)
    if counter_problems is not None:
        out += [(base + (field,), msg) for field, msg in counter_problems(bits)]
    max_value = b.get("max_value")
    if isinstance(max_value, int) and bits is not None and max_value >= 2**bits:
        out.append((base + ("max_value",), f"max_value {max_value} does not fit in {bits} bits"))
    return out


def _check_float_meter(base: tuple[Any, ...], b: dict[str, Any], addr: Any) -> list[tuple[tuple[Any, ...], str]]:
    out: list[tuple[tuple[Any, ...], str]] = []
    meter_problems = getattr(addr, "float_meter_problems", None)
    if meter_problems is not None:
        out += [(base + (field,), msg) for field, msg in meter_problems(b.get("resolution") is not None)]
    for key in ("bits", "max_value", "signed"):
        if b.get(key) is not None:
            out.append((base + (key,), f"a float meter does not wrap and has no width: remove '{key}'"))
    res, noise = b.get("resolution"), b.get("noise")
    try:
        if res is not None and noise is not None and Decimal(str(noise)) < Decimal(str(res)):
            out.append((base + ("noise",), f"noise {noise} is below the resolution {res}: use at least one step"))
    except ArithmeticError:
        pass  # reported by the model validation
    return out


def counter_modulus(binding: CounterConfig, addr: Any) -> tuple[int | None, bool]:
    """(modulus, signed) of a counter: explicit max_value, else bits, else the width of the address (the tag model's
    ``counter_width``: a Modbus data type), else 32-bit unsigned."""
    width = getattr(addr, "counter_width", None)
    bits, signed = (width() if width is not None else None) or (32, False)
    if binding.bits is not None:
        bits = binding.bits
    if binding.signed is not None:
        signed = binding.signed
    if binding.max_value is not None:
        return binding.max_value + 1, signed
    return 2**bits, signed


def parse_config(data: Any, file: str = "<config>", text: str | None = None) -> GatewayConfig:
    index = _LineIndex(text) if text is not None else None

    def problem(loc: tuple[Any, ...], message: str) -> ConfigProblem:
        return ConfigProblem(path=format_path(loc), message=message, line=index.line(loc) if index else None)

    if not isinstance(data, dict):
        raise ConfigError(file, [problem((), "the file must hold a YAML mapping with at least a 'gateway' section")])
    problems: list[ConfigProblem] = []
    cfg: GatewayConfig | None = None
    try:
        # relative paths in connector configs (the OPC UA pki_dir) are relative to the config file
        ctx = {"config_dir": os.path.dirname(os.path.abspath(file))} if not file.startswith("<") else None
        cfg = GatewayConfig.model_validate(data, context=ctx)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(problem(_clean_loc(tuple(err["loc"])), _message(err)))
    cross, addresses = _cross_check(data)
    reported = {p.path for p in problems}
    for loc, msg in cross:
        if format_path(loc) not in reported:
            problems.append(problem(loc, msg))
    if problems or cfg is None:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        raise ConfigError(file, problems)
    cfg._tag_addresses = addresses
    _share_bindings(cfg)
    return cfg


def _share_bindings(cfg: GatewayConfig) -> None:
    """Make equal tag bindings and reporting sections of the machines one object each (config memory: ~9 MB of
    RSS at 10,000 tags). A binding's address fields (the extra keys) are dropped from it first: they were validated
    into the connector's own address model, kept in ``cfg._tag_addresses`` and read from there (``tag_address``),
    so the bindings of 3,333 machines' ``good`` counters, say, are equal. Nothing mutates a loaded machine config;
    a reload builds a new one, and the shared models are frozen."""
    seen: dict[Any, Any] = {}

    def one(model: Any) -> Any:
        if model.__pydantic_extra__:
            model.__pydantic_extra__ = {}
        key = (type(model), tuple(model.__dict__.items()), frozenset(model.__pydantic_fields_set__))
        try:
            return seen.setdefault(key, model)
        except TypeError:  # an unhashable value (a state's value map): kept as it is
            return model

    for m in cfg.machines:
        for section in (m.counters, m.materials):
            for name, b in section.items():
                section[name] = one(b)
        for field in ("state", "order_tag", "operation_tag", "complete_tag", "reporting"):
            b = m.__dict__[field]
            if b is not None:
                m.__dict__[field] = one(b)  # (not setattr: that would mark a default section as set)


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(file, [ConfigProblem(path="", message=f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader (libyaml's when available)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        detail = re.sub(r"\s+", " ", str(getattr(exc, "problem", None) or exc))
        raise ConfigError(file, [ConfigProblem(path="", message=f"not valid YAML: {detail}", line=line)]) from None
    data = _fresh(data)  # (rebound: the loaded document goes now, before validation allocates among it)
    cfg = parse_config(data, file, text)
    resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def _fresh(x: Any) -> Any:
    """A copy of a loaded YAML document with new dicts, lists and strings. The loader builds a node (and two marks)
    for every scalar before the data, and the data's strings are the nodes' own: allocated among them, they keep
    the allocator's arenas of the whole node graph in use after it is gone. Copied, the arenas empty and go back to
    the system: ~20 MB of RSS for a 10,000-tag config (a 2 MB file; the node graph peaks at ~50 MB)."""
    t = type(x)
    if t is dict:
        return {_fresh(k): _fresh(v) for k, v in x.items()}
    if t is list:
        return [_fresh(v) for v in x]
    if t is str:
        return (x + " ")[:-1]  # a new string object (str(x), x[:] and "".join([x]) return x itself)
    return x


def resolve_paths(cfg: GatewayConfig, base: str | os.PathLike[str]) -> GatewayConfig:
    """Make relative file paths of the config absolute against ``base`` (the config file's directory):
    ``store.path``, and every ``*_file`` key of ``mqtt``, ``mqtt.tls`` and the connectors (password files, TLS and
    user certificates and keys). Started from another working directory the gateway must open the same store, not a
    fresh one with a new epoch next to an orphaned backlog, and read the same secrets."""
    root = os.fspath(base)
    if not os.path.isabs(cfg.store.path):
        cfg.store.path = os.path.normpath(os.path.join(root, cfg.store.path))
    for model in (cfg.mqtt, cfg.mqtt.tls, *cfg.connectors):
        absolute_file_keys(model, root)
    return cfg
