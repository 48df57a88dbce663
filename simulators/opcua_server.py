"""OPC UA server exposing one :class:`~simulators.machine.MachineModel`.

Nodes (string node ids in the simulator namespace, index 2 on a fresh server)::

    ns=2;s={name}                  Object   the machine
    ns=2;s={name}.GoodCount        UInt32 / UInt16 / Int32 / Int16 (counter_bits, signed)
    ns=2;s={name}.ScrapCount       same type as GoodCount
    ns=2;s={name}.State            String   "idle" | "running" | "stopped"
    ns=2;s={name}.OrderNumber      String   "" when no order is active
    ns=2;s={name}.OperationNumber  String   "" when no order is active
    ns=2;s={name}.Material         Float    a material totaliser: good parts made x material_per_part (float32)

Values are published from a model listener through one writer task, so the server sees the model's
changes complete and in order, each with the time of the change as source timestamp.
:meth:`OpcUaMachineServer.set_bad` publishes a signal with status BadCommunicationError (value null)
until cleared.

Security (constructor options; the defaults keep the old behaviour: one endpoint, policy None, anonymous):

- ``security_policies``: the endpoints offered, as ``ua.SecurityPolicyType`` names, e.g.
  ``["Basic256Sha256_SignAndEncrypt"]`` or ``["Basic256_Sign", "Basic128Rsa15_SignAndEncrypt"]``.
- ``users``: ``{user: password}``; when set, user name login is accepted (anonymous refused).
- ``user_certificates``: DER user certificates accepted for X.509 login (anonymous refused).
- ``certificate``: ``(certificate DER, private key PEM)``; generated once per simulator instance when a
  secured endpoint is offered and none is given (kept across restarts, like a PLC's). ``certificate_der``
  and ``thumbprint`` expose it. Client certificates are all accepted (the simulator trusts everyone).

Queues: ``max_queue_size`` caps every monitored item's queue (asyncua's own
``InternalServer.max_monitored_item_queue_size``: a larger request is answered with this RevisedQueueSize), as
servers with a small maximum queue do. With a cap, a value that follows a discarded one carries the Overflow info bit
(OPC 10000-4, 5.13.1.5), which asyncua's server does not set itself; asyncua discards the oldest value whatever
the client's discardOldest asks. Change the attribute between ``stop()`` and ``start()`` to change the cap across a
restart. ``async with publishing_held():`` holds the server's publishes (a late publish: a loaded server, or the
client's next Publish request not there yet) while the queues fill.

Namespaces: ``extra_namespaces`` are registered before the simulator's own namespace, so its index moves
(``namespace_index``); change the attribute between ``stop()`` and ``start()`` to reorder the namespace array
across a restart, as real servers may. ``nsu_node_id(signal)`` gives the restart-proof ``nsu=`` form.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from datetime import datetime, timedelta, timezone
from typing import Any

from asyncua import Server, ua

from .machine import MachineModel

__all__ = ["OpcUaMachineServer", "SIGNALS"]

_log = logging.getLogger(__name__)

#: signal -> node-id suffix; also the order in which one change is written to the server
SIGNALS: dict[str, str] = {
    "complete": "OperationComplete",
    "state": "State",
    "order": "OrderNumber",
    "operation": "OperationNumber",
    "good": "GoodCount",
    "scrap": "ScrapCount",
}

DELTA_NODE = "GoodDelta"
MATERIAL_NODE = "Material"

_COUNTER_TYPES = {
    (16, False): ua.VariantType.UInt16,
    (32, False): ua.VariantType.UInt32,
    (16, True): ua.VariantType.Int16,
    (32, True): ua.VariantType.Int32,
}

_BAD = ua.StatusCodes.BadCommunicationError
_OVERFLOW_BITS = 0x0400 | 0x0080  # StatusCode InfoType DataValue + Overflow (OPC 10000-4, 7.39)

_STOP_TIMEOUT = 5.0


def quiet_asyncua_logging(level: int = logging.WARNING) -> None:
    """asyncua logs a lot at INFO; keep it at WARNING unless asked otherwise."""
    logging.getLogger("asyncua").setLevel(level)


class _Users:
    """asyncua user manager: user name login with the configured passwords, or a configured user certificate
    (DER; the server has checked the token's signature), nothing else."""

    def __init__(self, users: dict[str, str], certificates: list[bytes]) -> None:
        self.users = users
        self.certificates = certificates

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username is not None and username in self.users and self.users[username] == password:
            return User(role=UserRole.User, name=username)
        if certificate is not None and bytes(certificate) in self.certificates:
            return User(role=UserRole.User, name="certificate")
        return None


def _flag_overflows(server: Server) -> None:
    """Set the Overflow info bit where asyncua's capped monitored item queue discards a value: on the value that
    becomes the oldest in the queue (discardOldest, the only policy asyncua implements; OPC 10000-4, 5.13.1.5). Hooks
    each new subscription's ``enqueue_datachange_event``; the queued notification gets a copy of the DataValue (the
    address space keeps the original)."""
    iserver = server.iserver
    make_session = iserver.create_session

    def create_session(*args: Any, **kwargs: Any) -> Any:
        session = make_session(*args, **kwargs)
        create = session.create_subscription

        async def create_subscription(*a: Any, **kw: Any) -> Any:
            result = await create(*a, **kw)
            isub = iserver.subscription_service.subscriptions[result.SubscriptionId]
            enqueue = isub.enqueue_datachange_event

            async def enqueue_flagged(mid: int, event: ua.MonitoredItemNotification, size: int) -> None:
                queue = isub._triggered_datachanges.get(mid)
                if size > 1 and queue is not None and len(queue) >= size:  # asyncua pops queue[0]: [1] is next
                    dv = queue[1].Value
                    code = dv.StatusCode.value if dv.StatusCode is not None else 0
                    queue[1].Value = dataclasses.replace(dv, StatusCode=ua.StatusCode(code | _OVERFLOW_BITS))
                await enqueue(mid, event, size)

            isub.enqueue_datachange_event = enqueue_flagged
            return result

        session.create_subscription = create_subscription
        return session

    iserver.create_session = create_session


class OpcUaMachineServer:
    """A real asyncua server for one simulated machine.

    Use ``async with OpcUaMachineServer(model, port=...) as srv:`` or ``await srv.start()`` /
    ``await srv.stop()``. ``stop()`` is bounded and frees the port; ``start()`` may be called again
    afterwards (a fresh asyncua server is built each time, like a PLC restart; the model is kept).
    """

    def __init__(
        self,
        model: MachineModel,
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        namespace: str = "urn:edge-gateway:simulator",
        security_policies: list[str] | None = None,
        users: dict[str, str] | None = None,
        user_certificates: list[bytes] | None = None,
        certificate: tuple[bytes, bytes] | None = None,
        extra_namespaces: list[str] | None = None,
        max_monitored_items_per_call: int | None = None,
        max_nodes_per_read: int | None = None,
        material_per_part: float = 0.1,
        max_queue_size: int | None = None,
        min_publishing_interval_ms: float | None = None,
        min_sampling_interval_ms: float | None = None,
        source_timestamps: bool = True,
    ) -> None:
        key = (model.counter_bits, bool(model.signed))
        if key not in _COUNTER_TYPES:
            raise ValueError(f"OPC UA simulator supports 16 or 32 bit counters, not {model.counter_bits}")
        self.model = model
        self.host = host
        self.port = port
        self.namespace = namespace
        self.counter_type: ua.VariantType = _COUNTER_TYPES[key]
        self._ns = 2
        self.security_policies = [ua.SecurityPolicyType[p] for p in (security_policies or ["NoSecurity"])]
        self.users = dict(users) if users else None
        self.user_certificates = list(user_certificates) if user_certificates else None
        self._certificate = certificate
        self.extra_namespaces = list(extra_namespaces or [])
        self.max_monitored_items_per_call = max_monitored_items_per_call
        self.max_nodes_per_read = max_nodes_per_read
        self.material_per_part = material_per_part
        self.max_queue_size = max_queue_size
        # the fastest publishing / sampling this server grants: a faster request is revised to it, as PLC servers do
        self.min_publishing_interval_ms = min_publishing_interval_ms
        self.min_sampling_interval_ms = min_sampling_interval_ms
        #: False: values carry no SourceTimestamp, only the ServerTimestamp (servers that have no device time)
        self.source_timestamps = source_timestamps
        #: (service, number of operations) of every Read / CreateMonitoredItems a client sent, when limits are set
        self.requests: list[tuple[str, int]] = []
        self._server: Server | None = None
        self._queue: asyncio.Queue[tuple[dict[str, Any], datetime, set[str], asyncio.Future | None]] | None = None
        self._writer: asyncio.Task | None = None
        self._bad: dict[str, bool] = {s: False for s in SIGNALS}
        self._published: dict[str, tuple[Any, bool]] = {}
        quiet_asyncua_logging()

    # ------------------------------------------------------------------ addressing

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def namespace_index(self) -> int:
        return self._ns

    def node_id(self, signal: str) -> str:
        return f"ns={self._ns};s={self.model.name}.{SIGNALS[signal]}"

    def nsu_node_id(self, signal: str) -> str:
        """The node id with the namespace URI instead of its index (valid across namespace reorders)."""
        return f"nsu={self.namespace};s={self.model.name}.{SIGNALS[signal]}"

    @property
    def application_uri(self) -> str:
        return f"{self.namespace}:{self.model.name}"

    @property
    def secured(self) -> bool:
        return any(p != ua.SecurityPolicyType.NoSecurity for p in self.security_policies)

    @property
    def certificate_der(self) -> bytes:
        """The server's certificate (DER), generated on first use."""
        return self._cert_and_key()[0]

    @property
    def thumbprint(self) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        return x509.load_der_x509_certificate(self.certificate_der).fingerprint(hashes.SHA1()).hex().upper()

    def _cert_and_key(self) -> tuple[bytes, bytes]:
        if self._certificate is None:
            from cryptography.hazmat.primitives import serialization

            from connectors.opcua.pki import generate_certificate

            cert, key = generate_certificate(self.application_uri, common_name_=f"simulator {self.model.name}",
                                             hostnames=["localhost", socket.gethostname(), self.host], ips=["127.0.0.1", self.host],
                                             server=True)
            self._certificate = (
                cert.public_bytes(serialization.Encoding.DER),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
            )
        return self._certificate

    @property
    def node_ids(self) -> dict[str, str]:
        """{"good","scrap","state","order","operation","complete"} -> node id string."""
        return {s: self.node_id(s) for s in ("good", "scrap", "state", "order", "operation", "complete")}

    @property
    def running(self) -> bool:
        return self._server is not None

    def _ua_node_id(self, signal: str) -> ua.NodeId:
        if signal == "material":
            return ua.NodeId(f"{self.model.name}.{MATERIAL_NODE}", self._ns)
        if signal == "good_delta":
            return ua.NodeId(f"{self.model.name}.{DELTA_NODE}", self._ns)
        return ua.NodeId(f"{self.model.name}.{SIGNALS[signal]}", self._ns)

    @property
    def delta_node_id(self) -> str:
        """``{name}.GoodDelta`` (UInt32): the good parts made since its previous write, written (with the part's time
        as source timestamp) after every good part — the same value again with a new timestamp is a new count. It
        is 0 after a (re)start. For ``mode: delta`` counters; tests count it against the ground truth."""
        return f"ns={self._ns};s={self.model.name}.{DELTA_NODE}"

    @property
    def material_node_id(self) -> str:
        """``{name}.Material`` (Float): a totaliser of the material used (see :meth:`material_value`), a float32
        like a PLC's REAL. For float material meters (``resolution``)."""
        return f"ns={self._ns};s={self.model.name}.{MATERIAL_NODE}"

    def material_value(self) -> float:
        """The totaliser: every good part made since the model was created x ``material_per_part`` (it does not
        wrap with the 16-bit counter), rounded to float32."""
        raw = self.model.truth_totals()["good"] * self.material_per_part
        return struct.unpack("<f", struct.pack("<f", raw))[0]

    def _variant(self, signal: str, value: Any) -> ua.Variant:
        if signal == "good_delta":
            return ua.Variant(int(value), ua.VariantType.UInt32)
        if signal in ("good", "scrap"):
            return ua.Variant(int(value), self.counter_type)
        if signal == "complete":
            return ua.Variant(bool(value), ua.VariantType.Boolean)
        return ua.Variant(str(value), ua.VariantType.String)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "OpcUaMachineServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            return
        login = self.users is not None or self.user_certificates is not None
        server = Server(user_manager=_Users(self.users or {}, self.user_certificates or []) if login else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"edge-gateway simulator {self.model.name}")
        server.set_security_policy(self.security_policies)
        tokens: list[type] = [ua.AnonymousIdentityToken] if not login else []
        tokens += [ua.UserNameIdentityToken] if self.users else []
        tokens += [ua.X509IdentityToken] if self.user_certificates else []
        server.set_identity_tokens(tokens)
        if self.secured:
            cert, key = self._cert_and_key()
            await server.load_certificate(cert, format="der")
            await server.load_private_key(key, format="pem")
        await server.set_application_uri(self.application_uri)
        if self.max_monitored_items_per_call or self.max_nodes_per_read:
            await self._enforce_limits(server)
        if self.max_queue_size:
            server.iserver.max_monitored_item_queue_size = self.max_queue_size
            _flag_overflows(server)
        if self.min_publishing_interval_ms or self.min_sampling_interval_ms:
            self._revise_intervals(server)
        for uri in self.extra_namespaces:
            await server.register_namespace(uri)
        self._ns = await server.register_namespace(self.namespace)

        name = self.model.name
        obj = await server.nodes.objects.add_object(ua.NodeId(name, self._ns), ua.QualifiedName(name, self._ns))
        snap = self.model.snapshot()
        for signal, suffix in SIGNALS.items():
            # variables are read-only for clients by default: the machine owns these values
            await obj.add_variable(
                self._ua_node_id(signal),
                ua.QualifiedName(suffix, self._ns),
                self._variant(signal, snap[signal]),
                varianttype=self.counter_type if signal in ("good", "scrap") else
                ua.VariantType.Boolean if signal == "complete" else ua.VariantType.String,
            )
        await obj.add_variable(self._ua_node_id("good_delta"), ua.QualifiedName(DELTA_NODE, self._ns),
                               ua.Variant(0, ua.VariantType.UInt32), varianttype=ua.VariantType.UInt32)
        await obj.add_variable(self._ua_node_id("material"), ua.QualifiedName(MATERIAL_NODE, self._ns),
                               ua.Variant(self.material_value(), ua.VariantType.Float), varianttype=ua.VariantType.Float)
        self._delta_base = self.model.truth_totals()["good"]
        self._server = server
        self._published = {}
        self._queue = asyncio.Queue()
        # listener and the forced initial write are registered in the same synchronous step,
        # so no change can slip between the initial values and the first update
        self.model.add_listener(self._on_model_change)
        self._queue.put_nowait((self.model.snapshot(), self._now(), set(SIGNALS), None))
        self._writer = asyncio.create_task(self._writer_loop(), name=f"opcua-sim-writer-{name}")
        try:
            await server.start()
        except BaseException:
            await self._abort_start(server)
            raise
        await self.flush()
        _log.info("OPC UA simulator %s listening on %s", name, self.endpoint)

    async def add_node(self, name: str, value: int) -> str:
        """Add a UInt32 variable ``<machine>.<name>`` to the running server (a PLC program loaded while clients are
        connected); returns its node id. Gone again at the next restart."""
        assert self._server is not None, "server not started"
        machine = self.model.name
        parent = self._server.get_node(ua.NodeId(machine, self._ns))
        await parent.add_variable(ua.NodeId(f"{machine}.{name}", self._ns), ua.QualifiedName(name, self._ns),
                                  ua.Variant(value, ua.VariantType.UInt32), varianttype=ua.VariantType.UInt32)
        return f"ns={self._ns};s={machine}.{name}"

    async def _enforce_limits(self, server: Server) -> None:
        """Publish the OperationLimits and refuse larger requests with BadTooManyOperations, as strict servers do."""
        from asyncua.common.utils import ServiceError

        limits = {ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall:
                  self.max_monitored_items_per_call or 0,
                  ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead: self.max_nodes_per_read or 0}
        for nid, value in limits.items():
            await server.write_attribute_value(ua.NodeId(nid), ua.DataValue(ua.Variant(value, ua.VariantType.UInt32)))
        iserver = server.iserver
        make_session = iserver.create_session
        sim = self

        def create_session(*args: Any, **kwargs: Any) -> Any:
            session = make_session(*args, **kwargs)
            read, create = session.read, session.create_monitored_items

            async def limited_read(params: ua.ReadParameters) -> Any:
                if session.external:
                    sim.requests.append(("Read", len(params.NodesToRead)))
                    if sim.max_nodes_per_read and len(params.NodesToRead) > sim.max_nodes_per_read:
                        raise ServiceError(ua.StatusCodes.BadTooManyOperations)
                return await read(params)

            async def limited_create(params: ua.CreateMonitoredItemsParameters) -> Any:
                sim.requests.append(("CreateMonitoredItems", len(params.ItemsToCreate)))
                if sim.max_monitored_items_per_call and len(params.ItemsToCreate) > sim.max_monitored_items_per_call:
                    raise ServiceError(ua.StatusCodes.BadTooManyOperations)
                return await create(params)

            session.read = limited_read
            session.create_monitored_items = limited_create
            return session

        iserver.create_session = create_session

    def _revise_intervals(self, server: Server) -> None:
        """Requests for a publishing or sampling interval below the minimum are granted the minimum (the server's
        Revised... answer), as a PLC's server does."""
        iserver = server.iserver
        subs = iserver.subscription_service
        create_sub = subs.create_subscription
        make_session = iserver.create_session
        sim = self

        async def create_subscription(params: ua.CreateSubscriptionParameters, *args: Any, **kwargs: Any) -> Any:
            if sim.min_publishing_interval_ms:
                params.RequestedPublishingInterval = max(params.RequestedPublishingInterval,
                                                         float(sim.min_publishing_interval_ms))
            return await create_sub(params, *args, **kwargs)

        subs.create_subscription = create_subscription

        def create_session(*args: Any, **kwargs: Any) -> Any:
            session = make_session(*args, **kwargs)
            create = session.create_monitored_items

            async def revised_create(params: ua.CreateMonitoredItemsParameters) -> Any:
                if sim.min_sampling_interval_ms:
                    for item in params.ItemsToCreate:
                        p = item.RequestedParameters
                        p.SamplingInterval = max(p.SamplingInterval, float(sim.min_sampling_interval_ms))
                return await create(params)

            session.create_monitored_items = revised_create
            return session

        iserver.create_session = create_session

    async def _abort_start(self, server: Server) -> None:
        self._server = server
        with contextlib.suppress(Exception):
            await self.stop()

    async def stop(self) -> None:
        """Stop serving (bounded, ~1 s); the port is free afterwards. Idempotent."""
        server, self._server = self._server, None
        self.model.remove_listener(self._on_model_change)
        writer, self._writer = self._writer, None
        self._queue = None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        if server is not None:
            try:
                async with asyncio.timeout(_STOP_TIMEOUT):
                    await server.stop()
            except asyncio.TimeoutError:
                _log.warning("OPC UA simulator %s: stop timed out after %ss", self.model.name, _STOP_TIMEOUT)
            except Exception:
                _log.exception("OPC UA simulator %s: error while stopping", self.model.name)

    # ------------------------------------------------------------------ publishing

    def _on_model_change(self) -> None:
        if self._queue is not None:
            snap = self.model.snapshot()
            good = self.model.truth_totals()["good"]
            force: set[str] = set()
            if good > self._delta_base:
                snap["good_delta"], self._delta_base = good - self._delta_base, good
                force.add("good_delta")
            self._queue.put_nowait((snap, self._now(), force, None))

    @contextlib.asynccontextmanager
    async def publishing_held(self) -> Any:
        """While inside, the server publishes nothing to its clients (no data, no keep-alive): a late publish, as from
        a loaded server or a client whose next Publish request is not there yet. Values keep going into the monitored
        items' queues (a full queue discards its oldest value, as always); on exit the next publishing cycle sends what
        the queues hold. Only the subscriptions that exist on entry are held."""
        assert self._server is not None, "server not started"
        held = list(self._server.iserver.subscription_service.subscriptions.values())

        async def nothing(*args: Any, **kwargs: Any) -> bool:
            return False  # "not published": the subscription loop tries again at its next cycle

        for isub in held:
            isub.publish_results = nothing  # shadows the method on this instance
        try:
            yield
        finally:
            for isub in held:
                with contextlib.suppress(AttributeError):
                    del isub.publish_results

    async def flush(self) -> None:
        """Return once every model change seen so far has been written to the server."""
        if self._queue is None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((self.model.snapshot(), self._now(), set(), fut))
        await fut

    async def set_bad(self, signal: str, bad: bool = True) -> None:
        """Publish ``signal`` with status BadCommunicationError while ``bad``; Good + current value when cleared.

        Returns after the server has the new status.
        """
        if signal not in SIGNALS:
            raise KeyError(f"unknown signal {signal!r}, expected one of {list(SIGNALS)}")
        self._bad[signal] = bool(bad)
        if self._queue is None:
            return  # applied on start
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((self.model.snapshot(), self._now(), {signal}, fut))
        await fut

    _delta_base = 0  # good parts already written to the delta node
    #: seconds added to the source timestamps: a PLC whose clock is stepped (NTP correction, local time at DST)
    clock_offset_s: float = 0.0

    def _now(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=self.clock_offset_s)

    def _source(self, ts: datetime) -> datetime | None:
        return ts if self.source_timestamps else None

    async def restamp_delta(self) -> None:
        """Give the delta node's current value a new ServerTimestamp, value and status unchanged: what a server that
        stamps a value when it sends it shows a new subscription (asyncua keeps the stamp of the write). Without
        source timestamps the value then looks new."""
        server = self._server
        assert server is not None
        nid = self._ua_node_id("good_delta")
        dv = server.iserver.aspace.read_attribute_value(nid, ua.AttributeIds.Value)
        await server.write_attribute_value(nid, dataclasses.replace(dv, ServerTimestamp=datetime.now(timezone.utc)))

    def is_bad(self, signal: str) -> bool:
        return self._bad[signal]

    async def _writer_loop(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            snap, ts, force, fut = await queue.get()
            try:
                await self._write_snapshot(snap, ts, force)
            except Exception:
                _log.exception("OPC UA simulator %s: write failed", self.model.name)
            finally:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def _write_snapshot(self, snap: dict[str, Any], ts: datetime, force: set[str]) -> None:
        server = self._server
        if server is None:
            return
        for signal in (*SIGNALS, "good_delta"):
            if signal == "good_delta":
                if "good_delta" not in force:
                    continue  # written only with a new count (its value may repeat: the timestamp makes it new)
                bad, value = False, snap.get("good_delta", 0)
                current = (value, bad)
                dv = ua.DataValue(Value=self._variant(signal, value), StatusCode=ua.StatusCode(ua.StatusCodes.Good),
                                  SourceTimestamp=self._source(ts), ServerTimestamp=datetime.now(timezone.utc))
                await server.write_attribute_value(self._ua_node_id(signal), dv)
                continue
            bad = self._bad[signal]
            value = None if bad else snap[signal]
            current = (value, bad)
            if signal not in force and self._published.get(signal) == current:
                continue
            if bad:
                dv = ua.DataValue(
                    Value=ua.Variant(None, ua.VariantType.Null),
                    StatusCode=ua.StatusCode(_BAD),
                    SourceTimestamp=self._source(ts),
                    ServerTimestamp=datetime.now(timezone.utc),
                )
            else:
                dv = ua.DataValue(
                    Value=self._variant(signal, value),
                    StatusCode=ua.StatusCode(ua.StatusCodes.Good),
                    SourceTimestamp=self._source(ts),
                    ServerTimestamp=datetime.now(timezone.utc),
                )
            await server.write_attribute_value(self._ua_node_id(signal), dv)
            self._published[signal] = current
        material = self.material_value()
        if self._published.get("material") != material:
            await server.write_attribute_value(self._ua_node_id("material"), ua.DataValue(
                Value=ua.Variant(material, ua.VariantType.Float), StatusCode=ua.StatusCode(ua.StatusCodes.Good),
                SourceTimestamp=self._source(ts), ServerTimestamp=datetime.now(timezone.utc)))
            self._published["material"] = material
