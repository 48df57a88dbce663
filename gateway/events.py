"""CloudEvents 1.0 envelopes and the topic layout (see docs/event-contract.md).

``EventEncoder`` writes the structured-mode JSON itself instead of going through the CloudEvents SDK (which builds
and validates a ``CloudEvent`` object, a datetime, and a dict per event: about half of the event path's CPU). The
bytes are exactly what the SDK's ``JSONFormat().write(CloudEvent(attrs, data))`` produced for the same event
(attribute order, ``json.dumps`` default separators, ASCII escapes, ``time`` as the SDK renders a UTC datetime);
tests/test_events_encoding.py checks that on many varied events against the SDK.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from gateway.config import GatewayIdentity
from mappings.events import EventData, rfc3339_event_time
from mappings.machine import EventDraft

CONTRACT_VERSION = "v1"
_ID_NAMESPACE = uuid.UUID("5b0c7c2e-3a8e-4b8f-9a43-0e7f1d5c2a11")


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
    """Drafts to (topic, CloudEvents structured JSON bytes). One per gateway store (source + epoch).

    Per event: the id's SHA-1 continues from a hasher already fed with namespace, source and epoch; the envelope's
    constant parts are rendered once per (machine, type); ``time`` is formatted by ``mappings.events.rfc3339``
    (remembered for recent times: ``rfc3339_event_time``); typed data renders itself (``EventData.to_json``), a
    plain dict goes through ``json.dumps``."""

    def __init__(self, ident: GatewayIdentity, topics: Topics, epoch: str) -> None:
        self.source = event_source(ident)
        self.topics = topics
        self.epoch = epoch
        # uuid5(ns, f"{source}|{epoch}|{seq}") = sha1(ns.bytes + name utf-8): everything up to seq is constant
        self._id_hash = hashlib.sha1(_ID_NAMESPACE.bytes + f"{self.source}|{epoch}|".encode())
        self._tail = ', "datacontenttype": "application/json", "seq": '
        self._epoch_part = f', "epoch": {json.dumps(epoch)}, "data": '
        self._heads: dict[tuple[str, str], tuple[str, str]] = {}

    def _head(self, subject: str, event_type: str) -> tuple[str, str]:
        head = (self.topics.event(subject, event_type),
                f'", "source": {json.dumps(self.source)}, "type": {json.dumps(event_type)}, '
                f'"subject": {json.dumps(subject)}, "time": ')
        if len(self._heads) < 4096:  # machines x event types; a bound against unexpected variety
            self._heads[(subject, event_type)] = head
        return head

    def event_id(self, seq: int) -> str:
        """``event_id(self.source, self.epoch, seq)``, computed from the prepared hasher."""
        h = self._id_hash.copy()
        h.update(str(seq).encode())
        x = h.hexdigest()
        # RFC 4122 version 5 and variant bits, as uuid.UUID(bytes=..., version=5) sets them
        return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{'89ab'[int(x[16], 16) & 3]}{x[17:20]}-{x[20:32]}"

    def encode(self, draft: EventDraft, seq: int) -> tuple[str, bytes]:
        head = self._heads.get((draft.subject, draft.type)) or self._head(draft.subject, draft.type)
        data = draft.data
        body = data.to_json() if isinstance(data, EventData) else json.dumps(data)
        t = rfc3339_event_time(draft.time)
        payload = (f'{{"specversion": "1.0", "id": "{self.event_id(seq)}{head[1]}"{t}"{self._tail}{int(seq)}'
                   f'{self._epoch_part}{body}}}')
        return head[0], payload.encode()
