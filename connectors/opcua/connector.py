"""OPC UA connector: one session, one subscription, every tag a monitored item.

Life of a connection (one loop iteration of :meth:`OpcUaConnector.run`):

1. A fresh asyncua ``Client`` is prepared by :func:`connectors.opcua.session.prepare_client` (endpoint chosen
   by security policy, our certificate from the PKI folder, server certificate checked against it, user token),
   then connects (the whole sequence bounded by ``timeout_s``). The client's own auto-reconnect is off: this
   connector owns reconnects. A refused server certificate is logged once per thumbprint with the command that
   trusts it; the connector keeps retrying, so trusting it is enough.
2. The server's OperationLimits (MaxMonitoredItemsPerCall, MaxNodesPerRead) and, for ``nsu=`` node ids, its
   namespace array are read. ONE subscription is created and all monitored items are created in as few
   CreateMonitoredItems calls as the limits allow (one when unlimited); ``read()`` chunks the same way.
   Notifications use the raw service path (``uaclient.create_subscription`` with a plain callback): one
   callback per Publish response, turned into one batch of Samples and one ``sink`` call. No per-item
   handler tasks, no bounded iterator queue that could drop values.
3. A watchdog checks every ``watchdog_interval_s``: transport state, a read of Server.CurrentTime
   (bounded by ``timeout_s``) and that Publish responses (data or keep-alive) still arrive. A socket
   loss is also seen at once through the library's connection-lost callback.
4. On any failure: status DISCONNECTED, the client is torn down (bounded; a dead peer is not waited
   for), back off, and start again at 1 with a NEW session and a NEW subscription (servers seldom keep
   subscriptions across a restart, and asyncua's live subscriptions go silent when they don't).

Quality: status Good → ``good=True``; Uncertain and Bad → ``good=False, value=None``.

Queues: a delta / reset-on-read counter asks for a 1000-deep queue that discards nothing, a state or completion flag
for 10 (a short state or pulse between two publishes is delivered), a cumulative counter of a machine whose changeover
comes from PLC tags (order tags, completion flag) for 1000 (the value before the change is the cut: a late publish must
not merge it into a later one), anything else for 10. A server may revise the queue size down (RevisedQueueSize): a
tag that loses counts, states or its changeover boundary when a value is discarded and got less than it needs is logged
(``opcua.queue_revised``) at every connect, listed in status ``queue_revised`` and raised as the warning alarm
``queue_revised:<machine>/<signal>`` (cleared by a connect that gets the size it asked for). Any other cumulative
counter carries its own delta in its latest value: a smaller queue costs it nothing (debug line only). Values the
server delivers with the Overflow info bit (it discarded values of that item) are counted per tag in status
``queue_overflows`` and, once per value, in the connector's ``queue_overflows`` (the metric
``edge_gateway_opcua_queue_overflows_total``). On a delta / reset-on-read counter such a value means counts were lost
at the server: the warning alarm ``queue_overflow:<machine>/<signal>`` is raised (evidence refreshed at each one) and
cleared by the watchdog once no overflow was seen on the tag for ``OVERFLOW_HOLD_S`` and its queue is not revised
below need (a connect got the size it asked for). A reconnect loses the same values (the new subscription gets only the
current value): the warning alarm ``delta_gap:<machine>/<signal>`` is raised for each such counter, cleared alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import shlex
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse, urlunparse

import structlog
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState

from connectors.base import Connector, CounterType, SampleSink, TagBinding, TagType
from connectors.errors import ConnectorUnavailable, ReadFailed
from connectors.opcua.config import OpcUaConnectorConfig, OpcUaTagConfig
from connectors.opcua.inspect import INTEGER_TYPES, type_name
from connectors.opcua.pki import CertificateRefused, Pki
from connectors.opcua.session import SessionSecurity, prepare_client
from gateway import metrics
from gateway.component import Backoff, ComponentState, rfc3339
from mappings.samples import Sample, Value

log = structlog.get_logger(__name__)

_SEVERITY_MASK = 0xC000_0000  # top two bits of a StatusCode: 00 Good, 01 Uncertain, 1x Bad
_CODE_MASK = 0xFFFF_0000  # the low 16 bits are info bits (overflow, limits), not part of the name
_TEARDOWN_TIMEOUT_S = 3.0
_TEARDOWN_GRACE_S = 1.0  # after the socket is dropped, for disconnect()'s local cleanup
_CURRENT_TIME = ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime)
_UNKNOWN_NODE = "BadNodeIdUnknown"  # status of a tag whose nsu= namespace the server does not have
_LIMIT_NODES = {
    "max_monitored_items_per_call": ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall),
    "max_nodes_per_read": ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),
}
_QUEUE_SIZE = 10  # per monitored item: short glitches between two publishes are delivered, not merged
_EVERY_VALUE_QUEUE_SIZE = 1000  # delta / reset-on-read counters: each queued value is a count
_EVERY_VALUE_FILTER = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)
# InfoType "DataValue" (bit 10) + Overflow (bit 7) in a DataValue's StatusCode (OPC 10000-4, 7.39): the server's queue
# for the item was full and discarded a value. asyncua decodes the StatusCode as its raw UInt32 and has no helper for it.
_OVERFLOW_BITS = 0x0400 | 0x0080
# what a tag loses when the server discards one of its queued values (log lines, status, alarms)
_RISK_COUNT = ("every value is a count (mode delta / reset_on_read): a value the server discards between two publishes "
               "is production never counted")
_RISK_STATE = ("a state held shorter than a publishing interval (a brief stop) can be discarded: its "
               "machine.state_changed is missed")
_RISK_PULSE = "a completion pulse shorter than a publishing interval can be discarded: the operation's completion is missed"
_RISK_CUT = ("the changeover comes from PLC tags: when the server discards the counter's values made before an order "
             "change or completion (a late publish), the parts made before it are booked to the next order")
# what an overflow (values the server discarded) costs, in the queue_overflow alarm
_OVERFLOW_COUNT = ("delta / reset_on_read counter: production was lost at the server and not counted (check the "
                   "machine's quantities in the ERP)")
_OVERFLOW_CUT = ("counter: the count is whole (its latest value carries it), but if the PLC's order tags or completion "
                 "flag changed meanwhile, parts made before the change may be booked to the next order (check that "
                 "order's quantities in the ERP)")
RETRY_REFUSED_S = 30.0
"""While connected, monitored items the server refused (a node not there yet: a PLC program loaded later, a namespace
added) are created again this often, so a node that appears is read and its alarm clears without a reconnect."""
OVERFLOW_HOLD_S = 3600.0
"""``queue_overflow:<machine>/<signal>`` (counts lost at the server) stays raised at least this long after the tag's
last overflow (like ``alarms.anomaly_hold_s`` for held counts), and as long as its queue is revised below need."""


class _ConnectionLost(Exception):
    """Internal: the watchdog (or the library) found the connection or the subscription dead."""


@functools.lru_cache(maxsize=256)
def status_name(code: int) -> str:
    """Symbolic name of a StatusCode value, info bits ignored (``0x80310000`` → ``BadNothingToDo``)."""
    return ua.StatusCode(code & _CODE_MASK).name


def _posix(ts: datetime | None) -> float | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # asyncua decodes UTC; be explicit for values built by hand
        ts = ts.replace(tzinfo=timezone.utc)
    t = ts.timestamp()
    return t if t > 0 else None  # DateTime 0 (1601) means "no timestamp"


def _py_value(v: Any) -> Value:
    t = type(v)
    if v is None or t is int or t is float or t is str or t is bool:
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):  # IntEnum and friends
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, ua.LocalizedText):
        return v.Text
    if isinstance(v, datetime):
        return _posix(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return str(v)


def datavalue_to_sample(key: str, dv: ua.DataValue, recv_time: float, *, server_time: bool = True) -> Sample:
    """Turn one DataValue into a Sample. Uncertain/Bad → not good, no value (the value is not used). The sample's
    source time is the SourceTimestamp, else (``server_time``) the ServerTimestamp."""
    sc = dv.StatusCode
    code = sc.value if sc is not None else 0
    source_time = _posix(dv.SourceTimestamp) or (_posix(dv.ServerTimestamp) if server_time else None)
    if code & _SEVERITY_MASK:
        return Sample(key, None, False, recv_time, source_time, status_name(code))
    variant = dv.Value
    value = variant.Value if variant is not None else None
    if value is None:  # Good without a value: nothing a counter could use
        return Sample(key, None, False, recv_time, source_time, f"{status_name(code)} (null value)")
    return Sample(key, _py_value(value), True, recv_time, source_time, status_name(code), mono=time.monotonic())


def _redact(endpoint: str) -> str:
    """The endpoint without user info (a URL may carry ``user:password@``)."""
    u = urlparse(endpoint)
    if "@" not in u.netloc:
        return endpoint
    return urlunparse(u._replace(netloc=u.netloc.rpartition("@")[2]))


class OpcUaConnector(Connector):
    """Subscribes to the configured node ids of one OPC UA server; see the module docstring."""

    type = "opcua"

    def __init__(
        self,
        config: OpcUaConnectorConfig,
        tags: Sequence[TagBinding],
        sink: SampleSink,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(config, tags, sink)
        self.config: OpcUaConnectorConfig = config
        self.endpoint = _redact(config.endpoint)
        self._backoff = backoff or Backoff()
        # unique node ids (two keys may watch the same node) → the keys fed by it
        self._node_keys: dict[str, list[str]] = {}
        self._every_value: set[str] = set()  # nodes whose every value counts (delta / reset-on-read counters)
        self._deep_queue: set[str] = set()  # nodes whose every value must arrive (those + counters cut by PLC tags)
        self._key_node: dict[str, str] = {}  # tag key -> configured node id (string, possibly nsu=)
        self._counter_types: dict[str, CounterType] = {}  # counter / meter keys -> what the config says of the type
        # tag key -> (the monitored item queue it needs, what it loses when a queued value is discarded), for delta /
        # reset-on-read counters, states and completion flags; a cumulative tag needs 1 and is not listed
        self._queue_need: dict[str, tuple[int, str]] = {}
        for b in self.tags:
            if b.counter is not None:
                self._counter_types[b.key] = b.counter
            addr = b.address if isinstance(b.address, OpcUaTagConfig) else OpcUaTagConfig.model_validate(b.address)
            self._node_keys.setdefault(addr.node_id, []).append(b.key)
            self._key_node[b.key] = addr.node_id
            if getattr(b, "every_value", False):
                self._every_value.add(addr.node_id)
                self._deep_queue.add(addr.node_id)
                self._queue_need[b.key] = (_EVERY_VALUE_QUEUE_SIZE, _RISK_COUNT)
            elif getattr(b, "cut_by_tags", False):
                self._deep_queue.add(addr.node_id)
                self._queue_need[b.key] = (_EVERY_VALUE_QUEUE_SIZE, _RISK_CUT)
            elif getattr(b, "every_change", False):
                self._queue_need[b.key] = (_QUEUE_SIZE, _RISK_PULSE if b.key.endswith("/complete") else _RISK_STATE)
        # configured node id -> NodeId on the current server (nsu= resolved at every connect), or None when
        # its namespace URI is not in the server's namespace array
        self._resolved: dict[str, ua.NodeId | None] = {}
        self._limits: dict[str, int] = {}  # the server's OperationLimits, read at every connect
        self._unknown_ns_logged: set[str] = set()
        self._client: Client | None = None
        self._closing: set[asyncio.Future[None]] = set()  # closes that outlived their time (see _teardown)
        self._ready = False  # session up and subscription created: read() may use the client
        self._generation = 0  # bumped per connection; callbacks of an old connection are ignored
        self._handles: dict[int, tuple[str, ...]] = {}
        # handles of delta / reset-on-read items whose first notification on this subscription is still to come (see
        # _first_value)
        self._fresh: set[int] = set()
        # handles whose first good value of this subscription has not come yet: it is marked ``reread`` (the current
        # value again, not a change seen as it happened: after a reconnect the core counts it before the order tags
        # of the same publish, as in a Modbus scan)
        self._first: set[int] = set()
        # SequenceNumber of the subscription's last data notification message: a gap is lost notifications (delta /
        # reset-on-read counts gone: alarm delta_gap); None until the first one of a subscription
        self._pub_seq: int | None = None
        self._lost: asyncio.Event | None = None
        self._lost_reason: str | None = None
        self._last_publish = 0.0
        self._stale_after = math.inf
        self._outage_since: float | None = None
        self._ever_connected = False
        self._failed_items: set[str] = set()  # node ids whose monitored item failed (logged once)
        self._logged_refusal: str | None = None  # the security refusal last logged (logged once per cause)
        self._warned: set[str] = set()
        self._refused: dict[str, str] = {}  # tag key -> why the server refused its monitored item (alarm raised)
        self._refused_nodes: dict[str, str] = {}  # node id -> why it is refused on the current connection
        self._subscription_id: int | None = None
        self.retry_refused_s = RETRY_REFUSED_S
        self._type_problems: dict[str, str] = {}  # tag key -> config/server type mismatch (logged once)
        self._cert_not_after: dict[str, float | None] = {}  # "own" / "server" -> expiry (POSIX seconds)
        self._queue_revised: dict[str, dict[str, Any]] = {}  # tag key -> its queue revised below need (alarm raised)
        self._overflows: dict[str, int] = {}  # tag key -> values delivered with the Overflow bit (since start)
        self._overflow_logged: set[str] = set()  # tag keys whose overflow was logged on this connection
        # values delivered with the Overflow bit, all items (a plain int: exported at scrape time, gateway/exporter.py)
        self.queue_overflows = 0
        self.overflow_hold_s = OVERFLOW_HOLD_S
        self._count_keys = {b.key for b in self.tags if getattr(b, "every_value", False)}  # delta / reset-on-read
        # cumulative counters whose values up to a PLC-tag changeover make the cut (see TagBinding.cut_by_tags)
        self._cut_keys = {b.key for b in self.tags if getattr(b, "cut_by_tags", False) and b.key not in self._count_keys}
        # tag key -> monotonic time of its last overflow or delta gap (alarm raised)
        self._overflow_alarms: dict[str, float] = {}
        self.status.detail.update(endpoint=self.endpoint, reconnects=0, monitored_items=0, queue_revised={},
                                  queue_overflows={})

    # ------------------------------------------------------------------ run loop

    async def run(self) -> None:
        try:
            while True:
                error: BaseException | None = None
                client: Client | None = None
                try:
                    client = await self._connect()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every connect failure is retried
                    error = exc
                if error is None:
                    assert client is not None
                    self._on_up()
                    try:
                        await self._watch(client)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        error = exc
                await self._teardown(polite=not isinstance(error, (asyncio.TimeoutError, _ConnectionLost)))
                self._on_down(error)
                await asyncio.sleep(self._backoff.next())
        finally:
            self._ready = False
            await self._teardown(polite=True)
            self.status.set(ComponentState.STOPPED)

    async def _connect(self) -> Client:
        cfg = self.config
        client = Client(
            cfg.endpoint,
            timeout=cfg.timeout_s,
            # the library's own probe is only a backstop: this connector's watchdog does the checking
            watchdog_intervall=max(60.0, 10 * cfg.watchdog_interval_s),
        )
        client.name = client.description = f"edge-gateway {self.id}"
        client.application_uri = cfg.own_application_uri
        client.session_timeout = int(max(60.0, 10 * cfg.watchdog_interval_s) * 1000)
        self._generation += 1
        gen = self._generation
        self._client = client
        self._lost = asyncio.Event()
        self._lost_reason = None
        try:
            security = await prepare_client(client, cfg, cfg.timeout_s)
        except CertificateRefused as exc:
            self._log_refused(exc)
            raise
        self._note_security(security)

        async def on_connection_lost(exc: Exception) -> None:
            self._mark_lost(gen, f"connection lost: {exc!r}")

        client.connection_lost_callback = on_connection_lost
        async with asyncio.timeout(cfg.timeout_s):
            await client.connect(auto_reconnect=False)
        async with asyncio.timeout(cfg.timeout_s):
            await self._subscribe(client, gen)
        return client

    def _log_refused(self, exc: CertificateRefused) -> None:
        key = f"{exc.reason}:{exc.thumbprint}"
        if self._logged_refusal == key:
            return  # log state changes, not every retry
        self._logged_refusal = key
        if exc.reason == "untrusted":
            log.error("opcua.certificate_untrusted", connector=self.id, endpoint=self.endpoint, thumbprint=exc.thumbprint,
                      rejected_dir=str(Pki(self.config.pki_dir).dir("rejected")),
                      command=f"edge-gateway pki trust --pki-dir {shlex.quote(str(Pki(self.config.pki_dir).root))} {exc.thumbprint}",
                      error=str(exc))
        else:
            log.error("opcua.certificate_refused", connector=self.id, endpoint=self.endpoint, thumbprint=exc.thumbprint,
                      reason=exc.reason, error=str(exc))

    def _note_security(self, sec: SessionSecurity) -> None:
        self._logged_refusal = None
        self.status.detail.update(sec.as_status())
        if sec.own_generated:
            log.info("opcua.certificate_created", connector=self.id, pki_dir=self.config.pki_dir,
                     thumbprint=sec.own_thumbprint, application_uri=self.config.own_application_uri)
        for w in sec.warnings:
            if w not in self._warned:
                self._warned.add(w)
                log.warning("opcua.security_warning", connector=self.id, endpoint=self.endpoint, warning=w)
        self._cert_not_after = {"own": sec.own_cert_not_after, "server": sec.server_cert_not_after}
        self._check_expiry()

    def _check_expiry(self, now: float | None = None) -> None:
        """Days to expiry of our own and the server's certificate: status detail, gauge, and within
        ``certificate_expiry_days`` one log line and an alarm (cleared when a renewed certificate is seen)."""
        now = time.time() if now is None else now
        limit = self.config.certificate_expiry_days
        for which, not_after in self._cert_not_after.items():
            alarm = f"certificate_expiring:{self.id}:{which}"
            if not_after is None:  # security none: no certificate
                self.alarms.set(alarm, False, "warning", "")
                continue
            days = round((not_after - now) / 86400, 1)
            self.status.detail[f"{which}_certificate_days_left"] = days
            metrics.OPCUA_CERTIFICATE_EXPIRY_DAYS.labels(self.id, self.endpoint, which).set(days)
            expiring = days <= limit
            whose = "our own application certificate" if which == "own" else "the server's certificate"
            if expiring and alarm not in self._warned:
                self._warned.add(alarm)
                log.warning("opcua.certificate_expiring", connector=self.id, endpoint=self.endpoint, certificate=which,
                            days_left=days, warn_days=limit,
                            action="renew it: " + (f"replace the files in {Pki(self.config.pki_dir).dir('own')} "
                                                   "(or delete them: a new one is generated; the server must trust it)"
                                                   if which == "own" else "ask the server's owner"))
            elif not expiring:
                self._warned.discard(alarm)
            self.alarms.set(alarm, expiring, "warning", f"connector {self.id} ({self.endpoint}): {whose} expires in "
                            f"{days} days", connector=self.id, endpoint=self.endpoint, certificate=which, days_left=days)

    async def _subscribe(self, client: Client, gen: int) -> None:
        cfg = self.config
        # keep-alives at least once per watchdog interval, so a silent subscription is noticed
        keepalive = max(1, math.ceil(cfg.watchdog_interval_s * 1000 / cfg.publishing_interval_ms))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=float(cfg.publishing_interval_ms),
            RequestedLifetimeCount=keepalive * 10,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,  # no limit
            PublishingEnabled=True,
            Priority=0,
        )
        self._handles = {}
        self._overflow_logged = set()
        self._last_publish = time.monotonic()
        result = await client.uaclient.create_subscription(params, functools.partial(self._on_publish, gen))
        interval_s = (result.RevisedPublishingInterval or cfg.publishing_interval_ms) / 1000.0
        self._stale_after = 2 * interval_s * max(1, result.RevisedMaxKeepAliveCount or keepalive) + cfg.timeout_s
        self.status.detail["subscription_id"] = result.SubscriptionId
        self._note_revised_publishing(float(result.RevisedPublishingInterval or cfg.publishing_interval_ms))
        self._subscription_id = result.SubscriptionId
        self._refused_nodes = {}

        if not self._node_keys:
            return
        self._limits = await self._operation_limits(client)
        self._resolved = await self._resolve(client)
        items: list[ua.MonitoredItemCreateRequest] = []
        handles: dict[int, tuple[str, ...]] = {}
        node_ids = [n for n in self._node_keys if self._resolved.get(n) is not None]
        await self._check_types(client, node_ids)
        for handle, node_id in enumerate(node_ids, start=1):
            handles[handle] = tuple(self._node_keys[node_id])
            items.append(self._item_request(handle, node_id))
        # register the handles first: the first notification may overtake the CreateMonitoredItems response
        self._handles = handles
        self._fresh = {h for h, n in enumerate(node_ids, start=1) if n in self._every_value}
        self._first = set(handles)
        self._pub_seq = None
        results = await self._create_items(client, result.SubscriptionId, items)
        failed: list[Sample] = []
        now = time.time()
        refused: dict[str, str] = {}  # node id -> status
        unresolved = [n for n in self._node_keys if self._resolved.get(n) is None]
        for node_id in unresolved:
            self._failed_items.add(node_id)
            refused[node_id] = f"{_UNKNOWN_NODE} (namespace URI not in the server's namespace array)"
            failed.extend(Sample(k, None, False, now, None, _UNKNOWN_NODE) for k in self._node_keys[node_id])
        for node_id, res in zip(node_ids, results):
            if res.StatusCode.is_good():
                self._failed_items.discard(node_id)
                continue
            name = status_name(res.StatusCode.value)
            refused[node_id] = name
            if node_id not in self._failed_items:
                self._failed_items.add(node_id)
                for k in self._node_keys[node_id]:
                    machine, _, signal = k.partition("/")
                    log.error("opcua.monitor_failed", connector=self.id, endpoint=self.endpoint, machine=machine,
                              counter=signal, node_id=node_id, status=name)
            failed.extend(Sample(k, None, False, now, None, name) for k in self._node_keys[node_id])
        self._refused_nodes = refused
        self._report_refused(refused)
        self._report_queues(self._revised_queues(items, node_ids, results))
        self._note_revised_sampling(results)
        self.status.detail["monitored_items"] = sum(1 for r in results if r.StatusCode.is_good())
        if failed:
            self._deliver(failed)

    def _note_revised_publishing(self, revised_ms: float) -> None:
        """The publishing interval the server granted: in status (``publishing_interval_ms``); a slower one than asked
        for is logged at warning (``opcua.publishing_interval_revised``) when it changes: every change then reaches the
        gateway up to that much later (nothing is lost: the monitored item queues hold the values in between)."""
        requested = float(self.config.publishing_interval_ms)
        previous = self.status.detail.get("publishing_interval_ms")
        self.status.detail["publishing_interval_ms"] = revised_ms
        if revised_ms > requested and revised_ms != previous:
            log.warning("opcua.publishing_interval_revised", connector=self.id, endpoint=self.endpoint,
                        requested_ms=requested, revised_ms=revised_ms,
                        effect=f"changes reach the gateway up to {revised_ms:g} ms after they happen; the server's "
                        "minimum publishing interval sets it")

    def _note_revised_sampling(self, results: list[ua.MonitoredItemCreateResult]) -> None:
        """The slowest sampling interval the server granted to an accepted item: in status
        (``sampling_interval_ms``), logged (``opcua.sampling_interval_revised``, info) when slower than asked for and
        changed. A server samples each node on its own: a state shorter than that, or the moment of a PLC-tag
        changeover, is seen to within one sampling interval (docs/counting.md)."""
        granted = [float(r.RevisedSamplingInterval) for r in results if r.StatusCode.is_good()]
        if not granted:
            return
        slowest = max(granted)
        requested = float(self.config.sampling_interval_ms)
        previous = self.status.detail.get("sampling_interval_ms")
        self.status.detail["sampling_interval_ms"] = slowest
        if 0 < requested < slowest and slowest != previous:  # (0 asks for the server's fastest rate: any is granted)
            log.info("opcua.sampling_interval_revised", connector=self.id, endpoint=self.endpoint,
                     requested_ms=requested, revised_ms=slowest,
                     items=sum(1 for g in granted if g > requested), of=len(granted))

    def _item_request(self, handle: int, node_id: str) -> ua.MonitoredItemCreateRequest:
        every = node_id in self._every_value
        # every value must arrive: a count each (delta), or the cut of a PLC-tag changeover (a cumulative counter whose
        # value before the change must not be merged into a later one when the publish comes late)
        deep = node_id in self._deep_queue
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=self._resolved[node_id], AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=float(self.config.sampling_interval_ms),
                # a delta value repeated with a new source timestamp is a new count: report on the
                # timestamp too, and queue enough that none is discarded between two publishes
                Filter=_EVERY_VALUE_FILTER if every else None,
                QueueSize=_EVERY_VALUE_QUEUE_SIZE if deep else _QUEUE_SIZE,
                DiscardOldest=not every,
            ),
        )

    async def _create_items(self, client: Client, subscription_id: int,
                            items: list[ua.MonitoredItemCreateRequest]) -> list[ua.MonitoredItemCreateResult]:
        """CreateMonitoredItems in chunks of the server's MaxMonitoredItemsPerCall (one call when unlimited)."""
        results: list[ua.MonitoredItemCreateResult] = []
        for chunk in _chunks(items, self._limits.get("max_monitored_items_per_call", 0)):
            part = await client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=subscription_id,
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    ItemsToCreate=chunk,
                )
            )
            if len(part) != len(chunk):
                raise _ConnectionLost(f"server answered {len(part)} results for {len(chunk)} monitored items")
            results.extend(part)
        return results

    async def _retry_refused(self, client: Client) -> None:
        """Create the refused monitored items again on the live subscription (see ``RETRY_REFUSED_S``). A node now
        accepted is read from then on (its counter type checked first, like at connect), its alarm cleared and
        ``opcua.monitor_recovered`` logged; the others stay refused."""
        if not self._refused_nodes or self._subscription_id is None:
            return
        gen = self._generation
        if any(self._resolved.get(n) is None for n in self._refused_nodes):  # an nsu= namespace may have appeared
            namespaces = list(await client.get_namespace_array())
            for text in self._refused_nodes:
                nid = ua.NodeId.from_string(text)
                uri = getattr(nid, "NamespaceUri", None)
                if uri and uri in namespaces:
                    self._resolved[text] = ua.NodeId(nid.Identifier, namespaces.index(uri), nid.NodeIdType)
                    self._unknown_ns_logged.discard(text)
        candidates = [n for n in self._refused_nodes if self._resolved.get(n) is not None]
        if not candidates:
            return
        monitored = {n for n in self._node_keys if self._resolved.get(n) is not None and n not in self._refused_nodes}
        await self._check_types(client, [n for n in self._node_keys if n in monitored or n in candidates])
        first = max(self._handles, default=0) + 1
        numbered = list(enumerate(candidates, start=first))
        items = [self._item_request(handle, node_id) for handle, node_id in numbered]
        if gen != self._generation:
            return  # the connection went while we were asking
        # register the handles first: the first notification may overtake the CreateMonitoredItems response
        self._handles.update((handle, tuple(self._node_keys[node_id])) for handle, node_id in numbered)
        self._fresh.update(handle for handle, node_id in numbered if node_id in self._every_value)
        self._first.update(handle for handle, _ in numbered)
        results = await self._create_items(client, self._subscription_id, items)
        refused = dict(self._refused_nodes)
        for (handle, node_id), res in zip(numbered, results):
            if res.StatusCode.is_good():
                refused.pop(node_id, None)
                self._failed_items.discard(node_id)
                for k in self._node_keys[node_id]:
                    machine, _, signal = k.partition("/")
                    log.info("opcua.monitor_recovered", connector=self.id, endpoint=self.endpoint, machine=machine,
                             counter=signal, node_id=node_id)
            else:
                self._handles.pop(handle, None)
                refused[node_id] = status_name(res.StatusCode.value)
        revised = self._revised_queues(items, [node_id for _, node_id in numbered], results)  # the accepted ones
        if revised:
            self._report_queues({**self._queue_revised, **revised})
        if refused == self._refused_nodes:
            return
        self._refused_nodes = refused
        self._report_refused(refused)
        self.status.detail["monitored_items"] = sum(1 for n in self._node_keys if self._resolved.get(n) is not None
                                                    and n not in refused)
        if not self._failed_items:
            self.status.set(ComponentState.CONNECTED)

    def _report_refused(self, refused: dict[str, str]) -> None:
        """Monitored items the server refused (BadNodeIdUnknown, ...): one alarm per machine signal, listed in status
        (``refused_items``); cleared when a later connection monitors it."""
        now: dict[str, str] = {}
        for node_id, why in refused.items():
            for k in self._node_keys[node_id]:
                now[k] = f"{node_id}: {why}"
        for k in set(self._refused) | set(now):
            machine, _, signal = k.partition("/")
            self.alarms.set(f"tag_refused:{k}", k in now, "critical",
                            f"machine {machine} {signal}: the server refused the monitored item {now.get(k, '')}; "
                            "this tag is not read", connector=self.id, endpoint=self.endpoint, machine=machine,
                            counter=signal, node_id=self._key_node[k], status=now.get(k, "").partition(": ")[2])
        self._refused = now
        self.status.detail["refused_items"] = dict(sorted(now.items()))

    def _revised_queues(self, items: list[ua.MonitoredItemCreateRequest], node_ids: list[str],
                        results: list[ua.MonitoredItemCreateResult]) -> dict[str, dict[str, Any]]:
        """The accepted items whose RevisedQueueSize is below what one of their tags needs: tag key -> evidence, each
        logged (``opcua.queue_revised``, a warning; at every connect). A cumulative tag's smaller queue is only a debug
        line: its latest value carries the whole delta."""
        out: dict[str, dict[str, Any]] = {}
        for item, node_id, res in zip(items, node_ids, results):
            if not res.StatusCode.is_good():
                continue
            requested = item.RequestedParameters.QueueSize
            revised = int(res.RevisedQueueSize)
            if revised >= requested:
                continue
            for k in self._node_keys[node_id]:
                machine, _, signal = k.partition("/")
                need, risk = self._queue_need.get(k, (1, ""))
                if revised >= need:  # e.g. a cumulative counter: its latest value carries the whole delta
                    log.debug("opcua.queue_revised", connector=self.id, endpoint=self.endpoint, machine=machine,
                              counter=signal, node_id=node_id, requested_queue_size=requested,
                              revised_queue_size=revised, needed_queue_size=need)
                    continue
                evidence = {"node_id": node_id, "requested_queue_size": requested, "revised_queue_size": revised,
                            "revised_sampling_interval_ms": res.RevisedSamplingInterval, "risk": risk}
                out[k] = evidence
                log.warning("opcua.queue_revised", connector=self.id, endpoint=self.endpoint, machine=machine,
                            counter=signal, **evidence)
        return out

    def _report_queues(self, revised: dict[str, dict[str, Any]]) -> None:
        """Tags whose queue the server revised below their need: one warning alarm each and status ``queue_revised``;
        an alarm clears when a later connect (or the retry of a refused item) gets the size it needs."""
        for k in set(self._queue_revised) | set(revised):
            machine, _, signal = k.partition("/")
            ev = revised.get(k) or self._queue_revised[k]
            self.alarms.set(f"queue_revised:{k}", k in revised, "warning",
                            f"machine {machine} {signal}: the server revised the monitored item's queue from "
                            f"{ev['requested_queue_size']} to {ev['revised_queue_size']} values: {ev['risk']}; raise "
                            "the server's maximum queue size", connector=self.id, endpoint=self.endpoint,
                            machine=machine, counter=signal, **ev)
        self._queue_revised = revised
        self.status.detail["queue_revised"] = dict(sorted(revised.items()))

    def _note_overflow(self, keys: tuple[str, ...]) -> None:
        """A value arrived with the Overflow bit: the server discarded values of this item before it. Counted once
        per value for the connector (``queue_overflows``, the metric) and per tag (status ``queue_overflows``); logged
        once per connection for a tag that loses counts or states by it; on a delta / reset-on-read counter, and on a
        counter cut by PLC tags (its split at a changeover may be off), the alarm ``queue_overflow:<machine>/<signal>``
        is raised, its evidence refreshed (see :meth:`_check_overflows`)."""
        self.queue_overflows += 1
        for k in keys:
            n = self._overflows[k] = self._overflows.get(k, 0) + 1
            machine, _, signal = k.partition("/")
            if k in self._queue_need and k not in self._overflow_logged:
                self._overflow_logged.add(k)
                log.warning("opcua.queue_overflow", connector=self.id, endpoint=self.endpoint, machine=machine,
                            counter=signal, node_id=self._key_node[k], overflows=n, risk=self._queue_need[k][1])
            effect = (_OVERFLOW_COUNT if k in self._count_keys else _OVERFLOW_CUT if k in self._cut_keys else None)
            if effect is not None:
                self._overflow_alarms[k] = time.monotonic()
                self.alarms.set(f"queue_overflow:{k}", True, "warning",
                                f"machine {machine} {signal}: the server's monitored item queue overflowed and "
                                f"discarded values of this {effect}; raise the server's maximum queue size",
                                connector=self.id, endpoint=self.endpoint, machine=machine, counter=signal,
                                node_id=self._key_node[k], overflows=n, last_overflow=rfc3339(time.time()))
        self.status.detail["queue_overflows"] = dict(sorted(self._overflows.items()))

    def _note_gap(self, since: float, down_s: float) -> None:
        """Connected again after an outage, with a new session and subscription: the values a delta / reset-on-read
        counter's node took meanwhile were queued for the old subscription and are gone (OPC UA gives a new one only
        the current value). The warning alarm ``delta_gap:<machine>/<signal>``, cleared like ``queue_overflow``."""
        keys = sorted(k for k in self._count_keys if k not in self._refused)  # a refused one is not read at all
        if not keys:
            return
        for k in keys:
            self._count_alarm("delta_gap", k, f"the connection to the server was lost for {down_s:g} s; the values "
                              "this delta / reset_on_read counter took meanwhile were queued for the old subscription "
                              "and are not counted (check the machine's quantities for that span in the ERP)",
                              down_since=rfc3339(since), down_s=down_s)
        log.warning("opcua.delta_gap", connector=self.id, endpoint=self.endpoint, down_s=down_s,
                    counters=keys, risk="values written while disconnected are not counted")

    def _note_lost_publish(self, last: int, seq: int) -> None:
        """Notification messages ``last + 1 .. seq - 1`` of the subscription never came (the server or asyncua
        dropped them): what delta / reset-on-read counters took in them is not counted (cumulative counters lose
        nothing: the next value carries the delta). Alarm ``delta_gap:<machine>/<signal>``, logged."""
        keys = sorted(k for k in self._count_keys if k not in self._refused)
        for k in keys:
            self._count_alarm("delta_gap", k, f"notification messages {last + 1} to {seq - 1} of the subscription "
                              "never came: the values this delta / reset_on_read counter took in them are not counted "
                              "(check the machine's quantities in the ERP)", lost_from=last + 1, lost_to=seq - 1)
        log.warning("opcua.notifications_lost", connector=self.id, endpoint=self.endpoint, lost_from=last + 1,
                    lost_to=seq - 1, counters=keys)

    def _count_alarm(self, kind: str, key: str, text: str, **evidence: Any) -> None:
        """The warning alarm ``kind:<machine>/<signal>`` about what a delta / reset-on-read counter may not have
        counted, with the connector, machine, counter and node as evidence; cleared like ``queue_overflow``."""
        machine, _, signal = key.partition("/")
        self._overflow_alarms[key] = time.monotonic()
        self.alarms.set(f"{kind}:{key}", True, "warning", f"machine {machine} {signal}: {text}", connector=self.id,
                        endpoint=self.endpoint, machine=machine, counter=signal, node_id=self._key_node.get(key),
                        **evidence)

    def _check_overflows(self, now: float | None = None) -> None:
        """Clear ``queue_overflow:<machine>/<signal>`` (and ``delta_gap`` / ``delta_unverified``) once the tag had no overflow for ``overflow_hold_s`` (monotonic)
        and its queue is not revised below need; called by the watchdog, so only while connected."""
        now = time.monotonic() if now is None else now
        for k, last in list(self._overflow_alarms.items()):
            if now - last >= self.overflow_hold_s and k not in self._queue_revised:
                del self._overflow_alarms[k]
                self.alarms.set(f"queue_overflow:{k}", False, "warning", "")
                self.alarms.set(f"delta_gap:{k}", False, "warning", "")
                self.alarms.set(f"delta_unverified:{k}", False, "warning", "")

    async def _check_types(self, client: Client, node_ids: list[str]) -> None:
        """Read the DataType of every counter / meter node: report a mismatch with the config (log once, status
        ``type_mismatches``, naming machine and counter) and hand the types to the runtime (``on_tag_types``), which
        takes a counter's width from the server unless it is configured."""
        wanted = [n for n in node_ids if any(k in self._counter_types for k in self._node_keys[n])]
        if not wanted:
            return
        dvs: list[ua.DataValue] = []
        for chunk in _chunks([self._resolved[n] for n in wanted], self._limits.get("max_nodes_per_read", 0)):
            dvs.extend(await client.uaclient.read_attributes(chunk, ua.AttributeIds.DataType))
        found: dict[str, TagType] = {}
        problems: dict[str, str] = {}
        for node_id, dv in zip(wanted, dvs):
            if not dv.StatusCode.is_good() or dv.Value is None:
                continue  # the monitored item reports the node (refused)
            dt = type_name(dv.Value.Value)
            for k in self._node_keys[node_id]:
                want = self._counter_types.get(k)
                if want is None:
                    continue
                found[k], problem = _judge_type(dt, want, material=k.partition("/")[2].startswith("material:"))
                if problem:
                    problems[k] = problem
        self.status.detail["counter_types"] = {k: t.data_type for k, t in sorted(found.items())}
        self.status.detail["type_mismatches"] = dict(sorted(problems.items()))
        for k, problem in problems.items():
            if self._type_problems.get(k) != problem:
                machine, _, signal = k.partition("/")
                log.warning("opcua.counter_type_mismatch", connector=self.id, endpoint=self.endpoint, machine=machine,
                            counter=signal, node_id=self._key_node[k], data_type=found[k].data_type, problem=problem)
        self._type_problems = problems
        if found and self.on_tag_types is not None:
            self.on_tag_types(found)

    async def _operation_limits(self, client: Client) -> dict[str, int]:
        """The server's OperationLimits this connector must respect (0 = no limit). Read one node per request,
        so even a server allowing one node per Read answers; a server without the nodes has no limits."""
        limits: dict[str, int] = {}
        for name, nid in _LIMIT_NODES.items():
            dv = (await client.uaclient.read_attributes([nid], ua.AttributeIds.Value))[0]
            value = dv.Value.Value if dv.StatusCode.is_good() and dv.Value is not None else None
            limits[name] = int(value) if isinstance(value, int) and value > 0 else 0
        self.status.detail["operation_limits"] = limits
        return limits

    async def _resolve(self, client: Client) -> dict[str, ua.NodeId | None]:
        """Configured node ids → NodeIds of this server. ``nsu=`` ids go through the server's namespace array,
        read at every connect (a server may reorder it across a restart); the request carries a plain NodeId."""
        out: dict[str, ua.NodeId | None] = {}
        namespaces: list[str] | None = None
        for text in self._node_keys:
            nid = ua.NodeId.from_string(text)
            uri = getattr(nid, "NamespaceUri", None)
            if not uri:
                out[text] = ua.NodeId(nid.Identifier, nid.NamespaceIndex, nid.NodeIdType)
                continue
            if namespaces is None:
                namespaces = list(await client.get_namespace_array())
                self.status.detail["namespaces"] = len(namespaces)
            if uri in namespaces:
                out[text] = ua.NodeId(nid.Identifier, namespaces.index(uri), nid.NodeIdType)
                self._unknown_ns_logged.discard(text)
            else:
                out[text] = None
                if text not in self._unknown_ns_logged:
                    self._unknown_ns_logged.add(text)
                    log.error("opcua.namespace_unknown", connector=self.id, endpoint=self.endpoint, node_id=text,
                              namespace_uri=uri, server_namespaces=namespaces,
                              keys=self._node_keys[text])
        return out

    # ------------------------------------------------------------------ notifications

    def _on_publish(self, gen: int, result: ua.PublishResult) -> None:
        """Publish loop callback: one Publish response → one batch of Samples → one sink call."""
        if gen != self._generation:
            return
        self._last_publish = time.monotonic()
        msg = result.NotificationMessage
        data = msg.NotificationData
        if not data:
            return  # keep-alive (it carries the next sequence number, not a new one)
        seq = msg.SequenceNumber
        last, self._pub_seq = self._pub_seq, seq
        if last is not None and seq > last + 1:  # (a wrap, or a repeat, is no gap)
            self._note_lost_publish(last, seq)
        recv = time.time()
        handles = self._handles
        fresh = self._fresh
        first_of = self._first
        samples: list[Sample] = []
        for notif in data:
            items = getattr(notif, "MonitoredItems", None)
            if items is not None:  # DataChangeNotification
                for item in items:
                    keys = handles.get(item.ClientHandle)
                    if keys is None:
                        continue
                    sc = item.Value.StatusCode
                    if sc is not None and sc.value & _OVERFLOW_BITS == _OVERFLOW_BITS:
                        self._note_overflow(keys)
                    if fresh and item.ClientHandle in fresh:
                        decided = self._first_value(keys, item.Value, recv)
                        if decided is not None:  # a good value: the first one (a Bad or null one keeps it first)
                            fresh.discard(item.ClientHandle)
                            if not decided:
                                first_of.discard(item.ClientHandle)  # the next value is a change: not marked
                                continue
                    first = datavalue_to_sample(keys[0], item.Value, recv)
                    if first_of and item.ClientHandle in first_of and first.good:
                        first_of.discard(item.ClientHandle)
                        first = dataclasses.replace(first, reread=True)
                    samples.append(first)
                    for k in keys[1:]:
                        samples.append(Sample(k, first.value, first.good, recv, first.source_time, first.status, first.mono,
                                              first.reread))
            elif isinstance(notif, ua.StatusChangeNotification):
                # asyncua sends BadShutdown when it sees the transport go; a server sends BadTimeout when
                # the subscription expired. Either way this subscription delivers nothing more.
                self._mark_lost(gen, f"subscription status {status_name(notif.Status.value)}")
        if samples:
            self._deliver(samples)

    def _first_value(self, keys: tuple[str, ...], dv: ua.DataValue, recv: float) -> bool | None:
        """The first notification of a delta / reset-on-read item on a new subscription: the node's current value,
        which the old subscription (or the gateway before a restart) may have delivered and counted already. With a
        SourceTimestamp the engine knows it again (its identity: source time and value). Without one it has none:
        many servers stamp the ServerTimestamp when they send, so a value counted before looks new. Such a value is
        not counted (False: not delivered); when it is not zero it may also have been a count the gateway never
        saw, so it raises the alarm ``delta_unverified:<machine>/<signal>`` (cleared like ``queue_overflow``), naming
        the value, and is logged. None: not a value yet (Bad, e.g. BadWaitingForInitialData of a server that proxies a
        PLC, or null): delivered (it counts nothing), and the next notification is still the first value."""
        if _posix(dv.SourceTimestamp) is not None:
            return True
        sample = datavalue_to_sample(keys[0], dv, recv)
        if not sample.good:
            return None
        if not sample.value:
            return True  # nothing a delta counter would count; what comes next is a change
        for k in keys:
            self._count_alarm("delta_unverified", k, f"the server sent this delta / reset_on_read counter's current "
                              f"value ({sample.value}) without a source timestamp when the gateway subscribed; it may "
                              "have been counted already, or be a count made while the gateway was not subscribed: "
                              "not counted (check the machine's quantities in the ERP)",
                              value=sample.value, server_time=sample.source_time)
        log.warning("opcua.delta_unverified", connector=self.id, endpoint=self.endpoint, counters=list(keys),
                    value=sample.value, risk="the first value of a new subscription has no source timestamp: not "
                                             "counted, as it may have been counted already")
        return False

    def _deliver(self, samples: list[Sample]) -> None:
        try:
            self.sink(samples)
        except Exception:
            log.exception("opcua.sink_failed", connector=self.id, samples=len(samples))

    def _mark_lost(self, gen: int, reason: str) -> None:
        if gen != self._generation or self._lost is None or self._lost.is_set():
            return
        self._lost_reason = reason
        self._lost.set()

    # ------------------------------------------------------------------ watchdog

    async def _watch(self, client: Client) -> None:
        """Return never; raise when the connection or the subscription is found dead."""
        cfg = self.config
        lost = self._lost
        assert lost is not None
        healthy_checks = 0
        retry_at = time.monotonic() + self.retry_refused_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.watchdog_interval_s):
                    await lost.wait()
            if lost.is_set():
                raise _ConnectionLost(self._lost_reason or "connection lost")
            if client.uaclient.state is not UaClientState.CONNECTED:
                raise _ConnectionLost(f"transport {client.uaclient.state.value}")
            started = time.monotonic()
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    await client.uaclient.read_attributes([_CURRENT_TIME], ua.AttributeIds.Value)
            except asyncio.TimeoutError:
                raise _ConnectionLost(f"watchdog read timed out after {cfg.timeout_s}s") from None
            self.observe_read("watchdog", time.monotonic() - started)
            silent = time.monotonic() - self._last_publish
            if silent > self._stale_after:
                raise _ConnectionLost(f"subscription silent for {silent:.1f}s (no data, no keep-alive)")
            healthy_checks += 1
            self._check_expiry()
            self._check_overflows()
            if self._refused_nodes and time.monotonic() >= retry_at:
                retry_at = time.monotonic() + self.retry_refused_s
                try:
                    async with asyncio.timeout(cfg.timeout_s):
                        await self._retry_refused(client)
                except TimeoutError:  # asyncio.TimeoutError is TimeoutError since 3.11
                    raise _ConnectionLost(f"retry of the refused monitored items timed out after {cfg.timeout_s}s") from None
            if healthy_checks == 1:
                # reset only once the connection has proven itself: a server that accepts and then drops
                # every connection must not be hammered at the initial delay
                self._backoff.reset()

    # ------------------------------------------------------------------ state changes

    def _on_up(self) -> None:
        self._ready = True
        state = ComponentState.DEGRADED if self._failed_items else ComponentState.CONNECTED
        self.status.set(state, f"monitored items failed: {sorted(self._failed_items)}" if self._failed_items else None)
        if self._outage_since is not None:
            down_s = round(time.time() - self._outage_since, 3)
            log.info("opcua.recovered", connector=self.id, endpoint=self.endpoint, downtime_s=down_s)
            self._note_gap(self._outage_since, down_s)
            self._outage_since = None
            self.status.detail["reconnects"] += 1
        elif not self._ever_connected:
            log.info("opcua.connected", connector=self.id, endpoint=self.endpoint, tags=len(self._key_node))
        self._ever_connected = True

    def _on_down(self, error: BaseException | None) -> None:
        self._ready = False
        reason = _describe(error)
        self.status.set(ComponentState.DISCONNECTED, reason)
        if self._outage_since is None:
            self._outage_since = time.time()
            log.error("opcua.disconnected", connector=self.id, endpoint=self.endpoint, error=reason)

    async def _teardown(self, *, polite: bool) -> None:
        """Close the current client within a fixed time, whatever the library does. ``polite=False``: the peer is
        presumed dead, drop the socket first.

        The library's ``disconnect()`` runs in a task of its own that is waited on, never awaited: it swallows a
        cancellation while it stops its helper tasks, so ``wait_for`` on it could wait for as long as it likes, and a
        stop of the gateway must not. A close that outlives its time loses its socket and is left to finish alone."""
        client, self._client = self._client, None
        self._generation += 1  # late callbacks from this client are ignored from now on
        self._handles = {}
        if client is None:
            return
        if not polite:
            _drop_socket(client)
        started = time.monotonic()
        closing = asyncio.ensure_future(client.disconnect())
        closing.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait({closing}, timeout=min(self.config.timeout_s, _TEARDOWN_TIMEOUT_S))
            if not done:
                # the polite close hangs: without its socket, disconnect() only has its local cleanup left
                _drop_socket(client)
                await asyncio.wait({closing}, timeout=_TEARDOWN_GRACE_S)
        finally:
            if not closing.done():
                _drop_socket(client)
                closing.cancel()
                self._closing.add(closing)  # referenced until it ends; nobody waits for it
                closing.add_done_callback(self._closing.discard)
                log.warning("opcua.close_abandoned", connector=self.id, endpoint=self.endpoint,
                            waited_s=round(time.monotonic() - started, 3))

    # ------------------------------------------------------------------ one-shot read

    async def read(self, keys: Sequence[str], timeout: float = 2.0) -> list[Sample]:
        unknown = [k for k in keys if k not in self._key_node]
        if unknown:
            raise ReadFailed(f"unknown tag keys {unknown}", connector=self.id, endpoint=self.endpoint, tag=unknown[0])
        client = self._client
        if client is None or not self._ready or client.uaclient.state is not UaClientState.CONNECTED:
            raise ConnectorUnavailable("not connected", connector=self.id, endpoint=self.endpoint)
        node_ids: list[ua.NodeId] = []
        index: dict[str, int] = {}
        for k in keys:
            text = self._key_node[k]
            nid = self._resolved.get(text)
            if nid is not None and text not in index:
                index[text] = len(node_ids)
                node_ids.append(nid)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                results = await self._read_chunked(client, node_ids)
            self.observe_read("read", time.monotonic() - started)
        except asyncio.TimeoutError as exc:
            raise ConnectorUnavailable(f"read timed out after {timeout}s", connector=self.id, endpoint=self.endpoint) from exc
        except (ua.UaError, ConnectionError, OSError) as exc:
            raise ConnectorUnavailable(f"read failed: {_describe(exc)}", connector=self.id, endpoint=self.endpoint) from exc
        if len(results) != len(node_ids):
            raise ConnectorUnavailable(
                f"server answered {len(results)} values for {len(node_ids)} nodes", connector=self.id, endpoint=self.endpoint
            )
        now = time.time()
        # a delta / reset-on-read value's time is its identity (the engine counts a value again only with another
        # time): a server's ServerTimestamp of a Read is often the time of the read, so without a SourceTimestamp
        # such a value has no time, and the cut read of a delta counter is then not counted (docs/counting.md)
        count = self._count_keys
        return [datavalue_to_sample(k, results[index[self._key_node[k]]], now, server_time=k not in count)
                if self._key_node[k] in index else Sample(k, None, False, now, None, _UNKNOWN_NODE) for k in keys]


    async def _read_chunked(self, client: Client, node_ids: list[ua.NodeId]) -> list[ua.DataValue]:
        """One Read per ``max_nodes_per_read`` nodes (the server's OperationLimits; one Read when unlimited)."""
        results: list[ua.DataValue] = []
        for chunk in _chunks(node_ids, self._limits.get("max_nodes_per_read", 0)):
            results.extend(await client.uaclient.read(ua.ReadParameters(
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[ua.ReadValueId(NodeId=nid, AttributeId=ua.AttributeIds.Value) for nid in chunk],
            )))
        return results


def _judge_type(dt: str, want: CounterType, *, material: bool) -> tuple[TagType, str | None]:
    """The server's DataType of a counter / meter node against the config: (type found, mismatch or None)."""
    if dt in INTEGER_TYPES:
        bits, signed = INTEGER_TYPES[dt], dt.startswith("Int") or dt == "SByte"
        found = TagType(dt, "integer", bits, signed)
        if want.float_meter:
            return found, f"resolution is configured (a float meter) but the node is {dt}, an integer: remove resolution"
        if want.max_value:
            return found, None
        if want.bits is not None and want.bits != bits:
            return found, (f"bits: {want.bits} is configured but the node is {dt} ({bits} bits): the configured width "
                           f"is used and would wrap at the wrong value; set bits: {bits} or remove it")
        if want.signed is not None and want.signed != signed:
            return found, f"signed: {str(want.signed).lower()} is configured but the node is {dt}"
        return found, None
    if dt in ("Float", "Double"):
        found = TagType(dt, "float")
        if want.float_meter:
            return found, None
        if material:
            return found, f"the node is {dt}: a float totaliser needs a resolution (e.g. resolution: 0.01)"
        return found, f"the node is {dt}: a piece counter needs an integer node (a float totaliser is a material meter)"
    return TagType(dt, "other"), f"the node is {dt}, not a number: it cannot be counted"


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` in lists of at most ``size`` (0 = no limit: one list); no list when ``items`` is empty."""
    if not items:
        return []
    if size <= 0:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _retrieve(task: asyncio.Future[None]) -> None:
    """Done callback of a close nobody awaits: its error is of no use (the socket is gone either way), but unretrieved
    it would be logged by asyncio as "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _drop_socket(client: Client) -> None:
    """Close the transport without talking to the peer, and stop the client's background loops."""
    with contextlib.suppress(Exception):
        client.uaclient.request_disconnect()
    with contextlib.suppress(Exception):
        client.uaclient.disconnect_socket()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection lost"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
