"""CloudEvents 1.0 envelopes and the topic layout (see docs/event-contract.md)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from gateway.config import GatewayIdentity
from mappings.machine import EventDraft

CONTRACT_VERSION = "v1"
_ID_NAMESPACE = uuid.UUID("5b0c7c2e-3a8e-4b8f-9a43-0e7f1d5c2a11")
_FORMAT = JSONFormat()


class Topics:
    def __init__(self, root: str, ident: GatewayIdentity) -> None:
        self.base = f"{root}/{CONTRACT_VERSION}/{ident.enterprise}/{ident.site}/{ident.area}/{ident.line}"
        self.gateway_id = ident.id

    def event(self, machine: str, event_type: str) -> str:
        return f"{self.base}/{machine}/events/{event_type}"

    def dispatch(self, machine: str) -> str:
        return f"{self.base}/{machine}/dispatch"

    def dispatch_filter(self) -> str:
        return f"{self.base}/+/dispatch"

    def machine_of_dispatch(self, topic: str) -> str | None:
        prefix = self.base + "/"
        if not topic.startswith(prefix) or not topic.endswith("/dispatch"):
            return None
        machine = topic[len(prefix):-len("/dispatch")]
        return machine if machine and "/" not in machine else None

    def acks_filter(self) -> str:
        """ERP acknowledgements / rejections of delivered events (ERP → gateway)."""
        return f"{self.base}/+/acks"

    def acks(self, machine: str) -> str:
        return f"{self.base}/{machine}/acks"

    def status(self) -> str:
        return f"{self.base}/_gateways/{self.gateway_id}/status"


def event_source(ident: GatewayIdentity) -> str:
    return f"/{ident.enterprise}/{ident.site}/{ident.area}/{ident.line}/{ident.id}"


def event_id(source: str, epoch: str, seq: int) -> str:
    """Deterministic: the same (source, store epoch, sequence) always gives the same id."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{source}|{epoch}|{seq}"))


class EventEncoder:
    def __init__(self, ident: GatewayIdentity, topics: Topics, epoch: str) -> None:
        self.source = event_source(ident)
        self.topics = topics
        self.epoch = epoch

    def encode(self, draft: EventDraft, seq: int) -> tuple[str, bytes]:
        attrs = {
            "specversion": "1.0",
            "id": event_id(self.source, self.epoch, seq),
            "source": self.source,
            "type": draft.type,
            "subject": draft.subject,
            "time": datetime.fromtimestamp(draft.time, tz=timezone.utc),
            "datacontenttype": "application/json",
            "seq": seq,
            "epoch": self.epoch,
        }
        payload = _FORMAT.write(CloudEvent(attrs, draft.data))
        return self.topics.event(draft.subject, draft.type), payload
