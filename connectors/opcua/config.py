"""Configuration of the OPC UA connector (client side: the gateway connects to a machine's server)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    security: Literal["none"] = Field(
        "none", description="Security policy. Only 'none' is supported in this release (sign/encrypt come next)."
    )
    username: str | None = Field(None, description="User name for user/password authentication.")
    password_env: str | None = Field(None, description="Name of the environment variable holding the password.")
    password_file: str | None = Field(None, description="Path of a file holding the password.")
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
        return v
