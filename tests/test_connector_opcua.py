"""OpcUaConnector against the real asyncua machine simulator (simulators/opcua_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
import structlog
from asyncua import ua

from connectors.base import CounterType, TagBinding, TagType
from connectors.errors import ConnectorUnavailable, ReadFailed
from connectors.opcua.config import OpcUaConnectorConfig, OpcUaTagConfig
from connectors.opcua.connector import OpcUaConnector, datavalue_to_sample
from gateway.component import Backoff, ComponentState
from simulators.machine import MachineModel
from simulators.opcua_server import OpcUaMachineServer
from simulators.ports import free_port
from tests.faults import BlackHole, Gate, Recorder, eventually, restart, start_on_free_port

SIGNALS = ("good", "scrap", "state", "order", "operation")


async def start_server(model: MachineModel) -> OpcUaMachineServer:
    return await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port))


@pytest.fixture
def model() -> MachineModel:
    return MachineModel("Press1", cycle_time=0.005, scrap_rate=0.2, seed=7)


@pytest.fixture
async def server(model: MachineModel) -> AsyncIterator[OpcUaMachineServer]:
    srv = await start_server(model)
    try:
        yield srv
    finally:
        await srv.stop()


def make_connector(endpoint: str, node_ids: dict[str, str], sink: Recorder, **cfg: object) -> OpcUaConnector:
    config = OpcUaConnectorConfig.model_validate(
        {
            "type": "opcua",
            "id": "line1-opc",
            "endpoint": endpoint,
            "publishing_interval_ms": 50,
            "sampling_interval_ms": 0,
            "watchdog_interval_s": 0.3,
            "timeout_s": 1.0,
            "security": "none",  # the simulator's default endpoint is unsecured
            **cfg,
        }
    )
    tags = [TagBinding(f"press-1/{sig}", OpcUaTagConfig(node_id=nid)) for sig, nid in node_ids.items()]
    return OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.5))


@contextlib.asynccontextmanager
async def running(conn: OpcUaConnector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(conn.run(), name="connector")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


# ---------------------------------------------------------------------- pure conversion


def test_datavalue_quality_and_timestamps() -> None:
    src = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    srv = datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone.utc)
    good = ua.DataValue(ua.Variant(42, ua.VariantType.UInt32), SourceTimestamp=src, ServerTimestamp=srv)
    s = datavalue_to_sample("k", good, 1.0)
    assert (s.value, s.good, s.status, s.source_time, s.recv_time) == (42, True, "Good", src.timestamp(), 1.0)

    no_source = ua.DataValue(ua.Variant("run"), ServerTimestamp=srv)
    assert datavalue_to_sample("k", no_source, 1.0).source_time == srv.timestamp()
    assert datavalue_to_sample("k", ua.DataValue(ua.Variant(1)), 1.0).source_time is None

    for code in (ua.StatusCodes.UncertainLastUsableValue, ua.StatusCodes.BadCommunicationError):
        s = datavalue_to_sample("k", ua.DataValue(ua.Variant(7), StatusCode=ua.StatusCode(code)), 1.0)
        assert (s.good, s.value) == (False, None)  # a stale/bad value is not handed on
        assert s.status == ua.StatusCode(code).name

    null = datavalue_to_sample("k", ua.DataValue(ua.Variant(None, ua.VariantType.Null)), 1.0)
    assert (null.good, null.value) == (False, None)


# ---------------------------------------------------------------------- against the simulator


async def test_samples_follow_the_model(model: MachineModel, server: OpcUaMachineServer) -> None:
    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    async with running(conn):
        await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
        await eventually(lambda: all(f"press-1/{s}" in sink.last for s in SIGNALS), what="initial values")
        assert sink.value("press-1/good") == 0 and sink.value("press-1/state") == "idle"

        model.set_order("4711", "0010")
        await model.produce(60)
        await server.flush()
        await eventually(
            lambda: (sink.value("press-1/good"), sink.value("press-1/scrap")) == (model.good_raw, model.scrap_raw),
            what="counters to match the model",
        )
        assert model.good_raw + model.scrap_raw == 60 and model.scrap_raw > 0
        assert sink.value("press-1/order") == "4711" and sink.value("press-1/operation") == "0010"
        last = sink.last["press-1/good"]
        assert last.status == "Good" and last.source_time is not None
        assert abs(last.source_time - time.time()) < 5 and last.recv_time >= last.source_time - 1
        # one sink call per publish response, not one per value change
        assert max(len(b) for b in sink.batches) > 1
        # counters never go backwards inside the stream
        goods = [s.value for b in sink.batches for s in b if s.key == "press-1/good" and s.good]
        assert goods == sorted(goods)


async def test_bad_status_gives_samples_without_value(model: MachineModel, server: OpcUaMachineServer) -> None:
    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    async with running(conn):
        await eventually(lambda: "press-1/good" in sink.last, what="initial values")
        await server.set_bad("good", True)
        await eventually(lambda: not sink.last["press-1/good"].good, what="a BAD sample")
        bad = sink.last["press-1/good"]
        assert bad.value is None and bad.status == "BadCommunicationError"
        assert sink.last["press-1/scrap"].good  # only the bad signal is affected

        await model.produce(5)
        await server.set_bad("good", False)
        await server.flush()
        await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="good values again")
        # read() reports the same quality
        await server.set_bad("scrap", True)
        (s,) = await conn.read(["press-1/scrap"])
        assert (s.good, s.value, s.status) == (False, None, "BadCommunicationError")


async def test_read_returns_current_values(model: MachineModel, server: OpcUaMachineServer) -> None:
    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    with pytest.raises(ConnectorUnavailable):  # not started
        await conn.read(["press-1/good"])
    async with running(conn):
        await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
        model.set_order("900001", "0020")
        await model.produce(25)
        await server.flush()
        samples = await conn.read(["press-1/good", "press-1/scrap", "press-1/order", "press-1/good"], timeout=2)
        assert [s.key for s in samples] == ["press-1/good", "press-1/scrap", "press-1/order", "press-1/good"]
        assert [s.value for s in samples] == [model.good_raw, model.scrap_raw, "900001", model.good_raw]
        assert all(s.good and s.source_time is not None for s in samples)
        with pytest.raises(ReadFailed):
            await conn.read(["press-9/good"])


async def test_unknown_node_is_reported_not_fatal(model: MachineModel, server: OpcUaMachineServer) -> None:
    sink = Recorder()
    nodes = {"good": server.node_ids["good"], "ghost": "ns=2;s=Press1.DoesNotExist"}
    conn = make_connector(server.endpoint, nodes, sink)
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: "press-1/ghost" in sink.last and "press-1/good" in sink.last, what="samples")
            ghost = sink.last["press-1/ghost"]
            assert (ghost.good, ghost.value, ghost.status) == (False, None, "BadNodeIdUnknown")
            # the refused item's samples are delivered while connecting, before the state is set: wait for the state
            await eventually(lambda: conn.status.state == ComponentState.DEGRADED, what="DEGRADED")
            assert conn.status.detail["refused_items"] == {"press-1/ghost": f"{nodes['ghost']}: BadNodeIdUnknown"}
            assert conn.alarms.ids() == ["tag_refused:press-1/ghost"]
            alarm = conn.alarms.active()[0]
            assert alarm.severity == "critical" and "machine press-1 ghost" in alarm.message
            assert (alarm.evidence["machine"], alarm.evidence["counter"]) == ("press-1", "ghost")
            await model.produce(3)
            await server.flush()
            await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="the good node to work")
    failed = [e for e in logs if e["event"] == "opcua.monitor_failed"]
    assert [(e["node_id"], e["machine"], e["counter"]) for e in failed] == [(nodes["ghost"], "press-1", "ghost")]


async def test_refused_node_is_retried_while_connected(model: MachineModel, server: OpcUaMachineServer) -> None:
    """A node the server refused (not there yet) is created again while the session lives: once it appears its
    values flow and its alarm clears, without a reconnect."""
    sink = Recorder()
    nodes = {"good": server.node_ids["good"], "late": f"ns={server.namespace_index};s=Press1.Late"}
    conn = make_connector(server.endpoint, nodes, sink)
    conn.retry_refused_s = 0.2
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.DEGRADED, what="DEGRADED")
            assert conn.alarms.ids() == ["tag_refused:press-1/late"]
            subscription = conn.status.detail["subscription_id"]
            assert await server.add_node("Late", 41) == nodes["late"]
            await eventually(lambda: sink.value("press-1/late") == 41, what="the late node's value")
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="CONNECTED")
            assert conn.alarms.ids() == []
            assert conn.status.detail["refused_items"] == {}
            assert conn.status.detail["monitored_items"] == 2
            assert (conn.status.detail["subscription_id"], conn.status.detail["reconnects"]) == (subscription, 0), [e for e in logs if e["event"] == "opcua.disconnected"]
            await model.produce(2)
            await server.flush()
            await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="the other node still read")
    recovered = [e for e in logs if e["event"] == "opcua.monitor_recovered"]
    assert [(e["node_id"], e["machine"], e["counter"]) for e in recovered] == [(nodes["late"], "press-1", "late")]


async def test_counter_types_from_the_server_and_mismatches() -> None:
    """At connect the connector reads every counter's DataType: the runtime gets the types (a counter without
    configured bits wraps where its node does), a mismatch with the config is logged and in status, naming machine
    and counter."""
    model = MachineModel("Press1", cycle_time=0.005, counter_bits=16, seed=3)
    server = await start_server(model)
    sink = Recorder()
    config = OpcUaConnectorConfig.model_validate({"type": "opcua", "id": "line1-opc", "endpoint": server.endpoint,
                                                  "security": "none", "watchdog_interval_s": 0.3, "timeout_s": 1.0})
    tags = [TagBinding("press-1/good", OpcUaTagConfig(node_id=server.node_ids["good"]), counter=CounterType()),
            TagBinding("press-1/scrap", OpcUaTagConfig(node_id=server.node_ids["scrap"]), counter=CounterType(bits=32)),
            TagBinding("press-1/material:RM-OIL", OpcUaTagConfig(node_id=server.material_node_id),
                       counter=CounterType(float_meter=True)),
            TagBinding("press-1/material:RM-GAS", OpcUaTagConfig(node_id=server.material_node_id), counter=CounterType()),
            TagBinding("press-1/state", OpcUaTagConfig(node_id=server.node_ids["state"]))]
    conn = OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.5))
    seen: list[dict[str, TagType]] = []
    conn.on_tag_types = seen.append
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: bool(seen) and "press-1/good" in sink.last, what="types and samples")
    finally:
        await server.stop()
    assert seen[0] == {"press-1/good": TagType("UInt16", "integer", 16, False),
                       "press-1/scrap": TagType("UInt16", "integer", 16, False),
                       "press-1/material:RM-OIL": TagType("Float", "float"),
                       "press-1/material:RM-GAS": TagType("Float", "float")}
    assert conn.status.detail["type_mismatches"] == {
        "press-1/material:RM-GAS": "the node is Float: a float totaliser needs a resolution (e.g. resolution: 0.01)",
        "press-1/scrap": "bits: 32 is configured but the node is UInt16 (16 bits): the configured width is used and "
                         "would wrap at the wrong value; set bits: 16 or remove it"}
    mismatches = [(e["machine"], e["counter"], e["data_type"]) for e in logs if e["event"] == "opcua.counter_type_mismatch"]
    assert sorted(mismatches) == [("press-1", "material:RM-GAS", "Float"), ("press-1", "scrap", "UInt16")]
    assert isinstance(sink.value("press-1/material:RM-OIL"), float)


async def test_server_restart_recreates_subscription(model: MachineModel) -> None:
    server = await start_server(model)
    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
                await model.produce(10)
                await server.flush()
                await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="first values")

                await server.stop()
                await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 3, "DISCONNECTED")
                with pytest.raises(ConnectorUnavailable):
                    await conn.read(["press-1/good"])
                await model.produce(7)  # made while the server is down
                await asyncio.sleep(0.8)  # several reconnect attempts fail

                n_batches = len(sink.batches)
                await restart(server)  # same port, a fresh server: the old subscription is gone
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 5, "reconnected")
                await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="values after restart")
                await model.produce(5)
                await server.flush()
                await eventually(
                    lambda: (sink.value("press-1/good"), sink.value("press-1/scrap")) == (model.good_raw, model.scrap_raw),
                    what="new changes through the re-created subscription",
                )
                assert len(sink.batches) > n_batches
                assert conn.status.detail["reconnects"] == 1
                assert conn.status.detail["subscription_id"] is not None
                (s,) = await conn.read(["press-1/good"])
                assert s.value == model.good_raw
    finally:
        await server.stop()
    events = [e["event"] for e in logs if e["event"].startswith("opcua.")]
    # one line per state change, not one per failed reconnect attempt
    assert events == ["opcua.connected", "opcua.disconnected", "opcua.recovered"]
    assert next(e for e in logs if e["event"] == "opcua.disconnected")["log_level"] == "error"


async def test_unreachable_server_then_available(model: MachineModel) -> None:
    server = OpcUaMachineServer(model, port=free_port())
    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    try:
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 3, "DISCONNECTED")
            assert conn.status.last_error
            await restart(server)
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 5, "connected")
            await eventually(lambda: "press-1/good" in sink.last, what="initial values")
    finally:
        await server.stop()


async def test_blackholed_connection_is_detected_and_bounded(model: MachineModel, server: OpcUaMachineServer) -> None:
    hole = BlackHole(server.port)
    await hole.start()
    sink = Recorder()
    conn = make_connector(f"opc.tcp://127.0.0.1:{hole.port}", server.node_ids, sink)
    try:
        async with running(conn) as task:
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
            hole.frozen = True
            t0 = time.monotonic()
            # watchdog interval + read timeout, plus slack
            await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 4, "DISCONNECTED")
            assert time.monotonic() - t0 < 3.0
            with pytest.raises(ConnectorUnavailable):
                await conn.read(["press-1/good"], timeout=0.5)
            await asyncio.sleep(1.0)  # reconnect attempts into the black hole: each must give up in time

            hole.frozen = False
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 6, "recovered")
            await model.produce(4)
            await server.flush()
            await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="values after recovery")

            hole.frozen = True  # cancellation while the peer is a black hole must still be prompt
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
            assert time.monotonic() - t0 < 3.5
            assert conn.status.state == ComponentState.STOPPED
    finally:
        await hole.close()


async def test_cancel_is_prompt_and_password_never_logged(
    model: MachineModel, server: OpcUaMachineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("EDGE_TEST_OPC_PASSWORD", secret)
    sink = Recorder()
    # the simulator only accepts anonymous logins: the user login is refused and retried
    conn = make_connector(server.endpoint, server.node_ids, sink, username="gw", password_env="EDGE_TEST_OPC_PASSWORD")
    with structlog.testing.capture_logs() as logs:
        async with running(conn) as task:
            await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 4, "refused login")
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 2.0
    assert conn.status.state == ComponentState.STOPPED
    assert logs and all(secret not in repr(e) for e in logs)
    assert secret not in repr(conn.status.as_dict())
    assert [e["event"] for e in logs] == ["opcua.disconnected"]  # logged once, not per attempt

    # a missing password variable is a clear error, not a crash
    monkeypatch.delenv("EDGE_TEST_OPC_PASSWORD")
    conn2 = make_connector(server.endpoint, server.node_ids, sink, username="gw", password_env="EDGE_TEST_OPC_PASSWORD")
    async with running(conn2):
        await eventually(lambda: conn2.status.state == ComponentState.DISCONNECTED, 3, "DISCONNECTED")
        assert "EDGE_TEST_OPC_PASSWORD" in (conn2.status.last_error or "")


async def test_stop_is_bounded_when_the_librarys_close_hangs(
    model: MachineModel, server: OpcUaMachineServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncua's ``Client.disconnect()`` swallows a cancellation while it stops its helper tasks: ``wait_for`` on it
    then waits for as long as the close takes. The connector waits on its own clock instead: a close that hangs (here
    one that ignores every cancellation for 30 s) loses its socket and is abandoned with a warning, and stopping the
    connector takes the close's time (timeout_s) and the grace after the drop, not the 30 s."""
    from asyncua import Client

    real = Client.disconnect
    released = asyncio.Event()

    async def hanging_disconnect(self: Client) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # what the library does with a cancellation
                await asyncio.sleep(0.05)
        await real(self)

    sink = Recorder()
    conn = make_connector(server.endpoint, server.node_ids, sink)
    with structlog.testing.capture_logs() as logs:
        async with running(conn) as task:
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 5, "connected")
            monkeypatch.setattr(Client, "disconnect", hanging_disconnect)
            t0 = time.monotonic()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            stopped_in = time.monotonic() - t0
    try:
        assert conn.status.state == ComponentState.STOPPED
        assert 1.9 <= stopped_in < 6.0  # 1 s polite close + 1 s grace after the socket is dropped (30 s unbounded)
        [abandoned] = [e for e in logs if e["event"] == "opcua.close_abandoned"]
        assert abandoned["log_level"] == "warning" and abandoned["connector"] == "line1-opc"
        assert 1.9 <= abandoned["waited_s"] < 6.0
        assert len(conn._closing) == 1  # still referenced while it runs on
    finally:
        released.set()
        await eventually(lambda: not conn._closing, 5, "the abandoned close to end")


async def test_nsu_node_ids_follow_a_reordered_namespace_array(model: MachineModel) -> None:
    """``nsu=`` ids are resolved through the server's namespace array at every connect: after a restart that
    registers other namespaces first, the simulator's namespace moves from index 2 to 4 and the counters follow."""
    srv = await start_server(model)
    try:
        assert srv.namespace_index == 2
        sink = Recorder()
        nsu = {sig: srv.nsu_node_id(sig) for sig in SIGNALS}
        assert nsu["good"] == "nsu=urn:edge-gateway:simulator;s=Press1.GoodCount"
        conn = make_connector(srv.endpoint, nsu, sink)
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, what="connected")
            model.set_order("4711", "0010")
            await model.produce(30)
            await srv.flush()
            await eventually(lambda: sink.value("press-1/good") == model.good_raw and sink.value("press-1/order") == "4711",
                             what="values through nsu= ids")
            assert conn.status.detail["monitored_items"] == len(SIGNALS)

            await srv.stop()
            srv.extra_namespaces = ["urn:other:vendor", "urn:other:plant"]
            await restart(srv)
            assert srv.namespace_index == 4
            await model.produce(25)
            await srv.flush()
            await eventually(lambda: conn.status.detail["reconnects"] == 1 and
                             (sink.value("press-1/good"), sink.value("press-1/scrap")) == (model.good_raw, model.scrap_raw),
                             10, "counters after the namespace array changed order")
            assert conn.status.state == ComponentState.CONNECTED
            cut = await conn.read(["press-1/good", "press-1/order"])
            assert [s.value for s in cut] == [model.good_raw, "4711"]
    finally:
        await srv.stop()


async def test_nsu_with_unknown_namespace_is_reported(model: MachineModel, server: OpcUaMachineServer) -> None:
    sink = Recorder()
    ids = dict(server.node_ids, scrap="nsu=urn:not:there;s=Press1.ScrapCount")
    conn = make_connector(server.endpoint, ids, sink)
    with structlog.testing.capture_logs() as logs:
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.DEGRADED, what="degraded")
            await eventually(lambda: "press-1/scrap" in sink.last and "press-1/good" in sink.last, what="samples")
            assert sink.last["press-1/scrap"].good is False
            assert sink.last["press-1/scrap"].status == "BadNodeIdUnknown"
            assert sink.value("press-1/good") == 0
            read = await conn.read(["press-1/scrap", "press-1/good"])
            assert (read[0].good, read[0].status, read[1].value) == (False, "BadNodeIdUnknown", 0)
    unknown = [e for e in logs if e["event"] == "opcua.namespace_unknown"]
    assert len(unknown) == 1 and unknown[0]["namespace_uri"] == "urn:not:there"
    assert "urn:edge-gateway:simulator" in unknown[0]["server_namespaces"]


async def test_server_operation_limits_are_respected(model: MachineModel) -> None:
    """A strict server (MaxMonitoredItemsPerCall=2, MaxNodesPerRead=2) refuses larger requests with
    BadTooManyOperations: the connector reads the OperationLimits and chunks, instead of reconnecting forever."""
    srv = await start_on_free_port(lambda port: OpcUaMachineServer(
        model, port=port, max_monitored_items_per_call=2, max_nodes_per_read=2))
    try:
        sink = Recorder()
        ids = srv.node_ids  # six nodes
        conn = make_connector(srv.endpoint, ids, sink)
        async with running(conn):
            await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 5, "connected")
            assert conn.status.detail["monitored_items"] == 6
            assert conn.status.detail["operation_limits"] == {"max_monitored_items_per_call": 2, "max_nodes_per_read": 2}
            model.set_order("4711", "0010")
            await model.produce(40)
            await srv.flush()
            await eventually(lambda: (sink.value("press-1/good"), sink.value("press-1/scrap"), sink.value("press-1/order"))
                             == (model.good_raw, model.scrap_raw, "4711"), 5, "values of every item")
            cut = await conn.read([f"press-1/{s}" for s in ids])
            assert [s.value for s in cut][:3] == [model.good_raw, model.scrap_raw, model.state]
            assert conn.status.detail["reconnects"] == 0
        creates = [n for service, n in srv.requests if service == "CreateMonitoredItems"]
        assert creates == [2, 2, 2]
        assert max(n for service, n in srv.requests if service == "Read") <= 2
    finally:
        await srv.stop()


async def test_revised_publishing_and_sampling_intervals_are_reported(model: MachineModel) -> None:
    """A server that grants a slower publishing interval than asked for (its minimum): the connector shows what it
    got in status and logs the revision once (a warning: changes arrive that much later), and values still flow. An
    unrevised connect shows the intervals without a warning."""
    srv = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, min_publishing_interval_ms=400))
    try:
        sink = Recorder()
        conn = make_connector(srv.endpoint, srv.node_ids, sink, sampling_interval_ms=100)  # and 50 ms publishing
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.state == ComponentState.CONNECTED, 5, "connected")
                await eventually(lambda: "sampling_interval_ms" in conn.status.detail, 5, "items created")
                assert (conn.status.detail["publishing_interval_ms"], conn.status.detail["sampling_interval_ms"]) \
                    == (400.0, 400.0)  # (asyncua answers the subscription's interval as every item's sampling)
                await model.produce(5)
                await srv.flush()
                await eventually(lambda: sink.value("press-1/good") == model.good_raw, 5, "values flow")
        revised = [(e["log_level"], e["requested_ms"], e["revised_ms"]) for e in logs
                   if e["event"] == "opcua.publishing_interval_revised"]
        assert revised == [("warning", 50.0, 400.0)]
        sampling = [(e["log_level"], e["requested_ms"], e["revised_ms"], e["items"], e["of"]) for e in logs
                    if e["event"] == "opcua.sampling_interval_revised"]
        assert sampling == [("info", 100.0, 400.0, 6, 6)]
    finally:
        await srv.stop()
    srv = await start_server(model)
    try:
        conn = make_connector(srv.endpoint, srv.node_ids, Recorder(), publishing_interval_ms=200, sampling_interval_ms=200)
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: "sampling_interval_ms" in conn.status.detail, 5, "items created")
                assert (conn.status.detail["publishing_interval_ms"], conn.status.detail["sampling_interval_ms"]) \
                    == (200.0, 200.0)
        assert not [e for e in logs if e["event"].endswith("_interval_revised")]
    finally:
        await srv.stop()


async def test_revised_queue_sizes_are_reported_and_overflows_counted() -> None:
    """A server that caps every monitored item's queue at 4 values (RevisedQueueSize 4). The delta counter (asks for
    1000), the state and the completion flag (ask for 10) lose counts or states when a queued value is discarded: each
    is logged once per connect, listed in status ``queue_revised`` and alarmed; the cumulative counter is not (its
    latest value carries the count). A node accepted later (the refused-item retry) is judged the same way. Values the
    server discarded arrive with the Overflow bit: counted per tag and for the connector (the metric's figure), and the
    delta counter really lost parts: the alarm queue_overflow is raised for it (not for the state, the flag or the
    cumulative counter). A restart of the server without the cap clears the queue_revised alarms; queue_overflow stays
    while the queue is too small and until no overflow was seen for overflow_hold_s."""
    model = MachineModel("Press1", cycle_time=0.002, scrap_rate=0.2, seed=11)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, max_queue_size=4))
    sink = Recorder()
    config = OpcUaConnectorConfig.model_validate({
        "type": "opcua", "id": "line1-opc", "endpoint": server.endpoint, "security": "none",
        "publishing_interval_ms": 400,  # values pile up between two publishes
        "sampling_interval_ms": 0, "watchdog_interval_s": 0.3, "timeout_s": 1.0})
    late = f"ns={server.namespace_index};s=Press1.LateDelta"
    tags = [TagBinding("press-1/good", OpcUaTagConfig(node_id=server.node_ids["good"]), counter=CounterType()),
            TagBinding("press-1/delta", OpcUaTagConfig(node_id=server.delta_node_id), True, CounterType()),
            TagBinding("press-1/late", OpcUaTagConfig(node_id=late), True, CounterType()),
            TagBinding("press-1/state", OpcUaTagConfig(node_id=server.node_ids["state"]), every_change=True),
            TagBinding("press-1/complete", OpcUaTagConfig(node_id=server.node_ids["complete"]), every_change=True)]
    conn = OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.5))
    conn.retry_refused_s = 0.2
    at_risk = ["press-1/complete", "press-1/delta", "press-1/state"]

    def revised() -> dict[str, tuple[int, int]]:
        return {k: (v["requested_queue_size"], v["revised_queue_size"])
                for k, v in conn.status.detail["queue_revised"].items()}

    try:
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: conn.status.detail["monitored_items"] == 4 and "press-1/delta" in sink.last,
                                 what="connected")
                assert revised() == {"press-1/complete": (10, 4), "press-1/delta": (1000, 4), "press-1/state": (10, 4)}
                delta = conn.status.detail["queue_revised"]["press-1/delta"]
                assert delta["node_id"] == server.delta_node_id and "production never counted" in delta["risk"]
                assert "brief stop" in conn.status.detail["queue_revised"]["press-1/state"]["risk"]
                assert conn.alarms.ids() == [f"queue_revised:{k}" for k in at_risk] + ["tag_refused:press-1/late"]
                alarm = next(a for a in conn.alarms.active() if a.id == "queue_revised:press-1/delta")
                assert alarm.severity == "warning" and "from 1000 to 4 values" in alarm.message
                assert (alarm.evidence["machine"], alarm.evidence["counter"], alarm.evidence["revised_queue_size"]) \
                    == ("press-1", "delta", 4)

                # a delta node that appears later is accepted by the retry with the same small queue
                await server.add_node("LateDelta", 0)
                await eventually(lambda: "queue_revised:press-1/late" in conn.alarms, what="the late node's alarm")
                assert revised()["press-1/late"] == (1000, 4) and "press-1/delta" in revised()

                # parts faster than publishes: the capped queue discards delta values and flags the next one
                made_before = model.truth_totals()["good"]
                await model.produce(150)
                await server.flush()
                made = model.truth_totals()["good"] - made_before
                await eventually(lambda: conn.status.detail["queue_overflows"].get("press-1/delta", 0) > 0,
                                 what="an overflow counted on the delta tag")
                # the last delta value is never discarded (discard oldest) and carries the source time of the last
                # good part, like the good counter's last value: wait for both
                await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="the last good count")
                await eventually(lambda: sink.last["press-1/delta"].source_time
                                 == sink.last["press-1/good"].source_time,
                                 what="the last delta value")
                counted = sum(s.value for b in sink.batches for s in b if s.key == "press-1/delta" and s.good)
                assert counted < made, "values were discarded by the server: parts lost"
                assert all(s.status == "Good" for b in sink.batches for s in b if s.key == "press-1/delta")
                # parts lost at the server: an alarm for the delta counter only, with the tag's count and when
                overflows = conn.status.detail["queue_overflows"]
                assert conn.queue_overflows == sum(overflows.values())  # one tag per node here
                assert [a for a in conn.alarms.ids() if a.startswith("queue_overflow:")] \
                    == ["queue_overflow:press-1/delta"]
                alarm = next(a for a in conn.alarms.active() if a.id == "queue_overflow:press-1/delta")
                ev = alarm.evidence
                assert alarm.severity == "warning" and "production was lost" in alarm.message
                assert (ev["machine"], ev["counter"], ev["node_id"], ev["overflows"]) == (
                    "press-1", "delta", server.delta_node_id, overflows["press-1/delta"])
                last = datetime.fromisoformat(ev["last_overflow"]).timestamp()
                assert alarm.since - 0.001 <= last <= time.time()  # RFC 3339 in milliseconds
                # the queue is still too small: no hold clears it
                conn._check_overflows(time.monotonic() + 2 * conn.overflow_hold_s)
                assert "queue_overflow:press-1/delta" in conn.alarms

                # the server restarts with its full queue: the next connect gets what it asks for
                await server.stop()
                await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 3, "DISCONNECTED")
                assert "queue_revised:press-1/delta" in conn.alarms  # kept while nothing says otherwise
                server.max_queue_size = None
                await restart(server)
                await eventually(lambda: conn.status.state == ComponentState.DEGRADED and
                                 conn.status.detail["reconnects"] == 1, 5, "reconnected")
                assert conn.status.detail["queue_revised"] == {}
                # the late node is gone with the restart; the loss stays on record until the hold has passed
                conn._check_overflows()  # what the watchdog does: the queue is large enough, the hold has not passed
                # and what the delta node took while the server was down is lost with the old subscription
                assert conn.alarms.ids() == ["delta_gap:press-1/delta", "queue_overflow:press-1/delta",
                                             "tag_refused:press-1/late"]
                gap = next(a for a in conn.alarms.active() if a.id == "delta_gap:press-1/delta")
                assert (gap.evidence["machine"], gap.evidence["counter"], gap.evidence["node_id"]) == (
                    "press-1", "delta", server.delta_node_id)
                assert gap.evidence["down_s"] > 0
                assert conn.status.detail["queue_overflows"]["press-1/delta"] > 0
                conn.overflow_hold_s = 0.2
                await eventually(lambda: "queue_overflow:press-1/delta" not in conn.alarms
                                 and "delta_gap:press-1/delta" not in conn.alarms, 3,
                                 "the overflow and gap alarms cleared by the watchdog once the hold has passed")
                assert conn.alarms.ids() == ["tag_refused:press-1/late"]
                assert conn.status.detail["queue_overflows"]["press-1/delta"] > 0  # the count is not reset
    finally:
        await server.stop()
    warned = [(e["machine"], e["counter"], e["node_id"], e["requested_queue_size"], e["revised_queue_size"])
              for e in logs if e["event"] == "opcua.queue_revised" and e["log_level"] == "warning"]
    assert sorted(warned) == [("press-1", "complete", server.node_ids["complete"], 10, 4),
                              ("press-1", "delta", server.delta_node_id, 1000, 4),
                              ("press-1", "late", late, 1000, 4),
                              ("press-1", "state", server.node_ids["state"], 10, 4)]  # once each, none for good
    overflow = [e for e in logs if e["event"] == "opcua.queue_overflow"]
    assert [(e["machine"], e["counter"], e["node_id"]) for e in overflow] == [
        ("press-1", "delta", server.delta_node_id)]
    cleared = sorted(e["alarm"] for e in logs if e["event"] == "alarm.cleared" and e["alarm"].startswith("queue_"))
    assert cleared == sorted([*(f"queue_revised:{k}" for k in [*at_risk, "press-1/late"]),
                              "queue_overflow:press-1/delta"])


async def test_overflow_on_a_counter_cut_by_plc_tags_is_alarmed() -> None:
    """A cumulative counter of a machine whose changeover comes from PLC tags (``cut_by_tags``) asks for the deep
    queue; a server capping it at 4 gets the queue_revised alarm, and values it discards (Overflow bit) raise the
    queue_overflow alarm for that counter: its count is whole, its split at a changeover may not be. A plain
    cumulative counter on the same server gets neither."""
    model = MachineModel("Press1", cycle_time=0.002, scrap_rate=0.2, seed=13)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, max_queue_size=4))
    sink = Recorder()
    config = OpcUaConnectorConfig.model_validate({
        "type": "opcua", "id": "line1-opc", "endpoint": server.endpoint, "security": "none",
        "publishing_interval_ms": 400, "sampling_interval_ms": 0, "watchdog_interval_s": 0.3, "timeout_s": 1.0})
    tags = [TagBinding("press-1/good", OpcUaTagConfig(node_id=server.node_ids["good"]), counter=CounterType(),
                       cut_by_tags=True),
            TagBinding("press-1/scrap", OpcUaTagConfig(node_id=server.node_ids["scrap"]), counter=CounterType())]
    conn = OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.5))
    try:
        async with running(conn):
            await eventually(lambda: conn.status.detail["monitored_items"] == 2 and "press-1/good" in sink.last,
                             what="connected")
            assert {k: (v["requested_queue_size"], v["revised_queue_size"])
                    for k, v in conn.status.detail["queue_revised"].items()} == {"press-1/good": (1000, 4)}
            assert "booked to the next order" in conn.status.detail["queue_revised"]["press-1/good"]["risk"]
            await model.produce(150)
            await server.flush()
            await eventually(lambda: conn.status.detail["queue_overflows"].get("press-1/good", 0) > 0
                             and conn.status.detail["queue_overflows"].get("press-1/scrap", 0) > 0,
                             what="overflows on both counters")
            await eventually(lambda: sink.value("press-1/good") == model.good_raw, what="the whole count")
            assert [a for a in conn.alarms.ids() if a.startswith("queue_")] \
                == ["queue_overflow:press-1/good", "queue_revised:press-1/good"]
            alarm = next(a for a in conn.alarms.active() if a.id == "queue_overflow:press-1/good")
            assert alarm.severity == "warning" and "booked to the next order" in alarm.message
            assert (alarm.evidence["counter"], alarm.evidence["overflows"]) \
                == ("good", conn.status.detail["queue_overflows"]["press-1/good"])
    finally:
        await server.stop()


async def test_queue_overflows_are_exported_and_alarmed_by_the_gateway(tmp_path, mqtt_broker) -> None:
    """The same capped server behind a running gateway: a delta counter whose values the server discards moves
    ``edge_gateway_opcua_queue_overflows_total{connector}`` (scraped from /metrics, parsed by prometheus-client; 0
    before, one series per connector, none per tag) and raises ``queue_overflow:<machine>/<signal>`` in the gateway's
    alarms (/status with its evidence, ``edge_gateway_alarms_by_kind``)."""
    from gateway.config import parse_config
    from tests.e2e import IDENT, RunningGateway, wait_until
    from tests.test_metrics import documented, scrape, val

    model = MachineModel("Press1", cycle_time=0.002, scrap_rate=0.2, seed=12)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, max_queue_size=4))
    port = free_port()
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"host": "127.0.0.1", "port": mqtt_broker.port, "keepalive_s": 2},
        "store": {"path": str(tmp_path / "gw.db")}, "http": {"enabled": True, "port": port},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": server.endpoint, "security": "none",
                        "publishing_interval_ms": 400, "sampling_interval_ms": 0, "watchdog_interval_s": 0.3,
                        "timeout_s": 2}],
        "machines": [{"id": "press-1", "counters": {
            "good": {"connector": "opc", "node_id": server.delta_node_id, "mode": "delta"}}}]}, "<test>")
    rg = RunningGateway(cfg)
    try:
        gw = await rg.start()
        conn = gw.connectors["opc"]
        await wait_until(lambda: conn.status.state == ComponentState.CONNECTED, 10)
        before = await scrape(port)
        assert val(before, "edge_gateway_opcua_queue_overflows_total", connector="opc") == 0
        assert ("edge_gateway_opcua_queue_overflows_total", frozenset({("connector", "opc")})) in before
        assert "queue_revised:press-1/good" in gw.alarms and "queue_overflow:press-1/good" not in gw.alarms

        await model.produce(150)
        await server.flush()
        await wait_until(lambda: "queue_overflow:press-1/good" in gw.alarms, 10,
                         message="no queue_overflow alarm for the delta counter")
        after = await scrape(port)
        assert 0 < val(after, "edge_gateway_opcua_queue_overflows_total", connector="opc") <= conn.queue_overflows
        assert [k for k in after if k[0] == "edge_gateway_opcua_queue_overflows_total"] == [
            ("edge_gateway_opcua_queue_overflows_total", frozenset({("connector", "opc")}))]  # no per-tag series
        assert val(after, "edge_gateway_alarms_by_kind", alarm="queue_overflow") == 1
        assert "edge_gateway_opcua_queue_overflows_total" in documented()  # docs/metrics.md
        status = gw.status()
        detail = next(a for a in status["alarm_details"] if a["id"] == "queue_overflow:press-1/good")
        assert detail["severity"] == "warning"
        assert (detail["evidence"]["machine"], detail["evidence"]["counter"]) == ("press-1", "good")
        assert detail["evidence"]["overflows"] >= 1 and detail["evidence"]["last_overflow"].endswith("Z")
    finally:
        await rg.stop()
        await server.stop()


def test_the_runtime_tells_which_tags_need_a_queue(tmp_path) -> None:
    """The gateway's bindings say which tags lose something when a queued value is discarded: a delta counter (every
    value), the state and the completion flag (every change), and the cumulative counters of a machine whose changeover
    comes from PLC tags (the value before the change is the cut: a late publish must not merge it into a later one);
    the order tags and a cumulative counter of a machine whose order comes by MQTT do not."""
    from gateway.config import parse_config
    from gateway.runtime import Gateway
    from tests.e2e import IDENT

    opc = {"connector": "opc"}
    cfg = parse_config({
        "gateway": IDENT, "mqtt": {"host": "127.0.0.1", "port": free_port()},
        "store": {"path": str(tmp_path / "gw.db")},
        "connectors": [{"type": "opcua", "id": "opc", "endpoint": "opc.tcp://127.0.0.1:4840", "security": "none"}],
        "machines": [{"id": "press-1", "order_source": "tag",
                      "counters": {"good": {**opc, "node_id": "ns=2;s=Good"},
                                   "scrap": {**opc, "node_id": "ns=2;s=Scrap", "mode": "delta"}},
                      "state": {**opc, "node_id": "ns=2;s=State"},
                      "order_tag": {**opc, "node_id": "ns=2;s=Order"},
                      "operation_tag": {**opc, "node_id": "ns=2;s=Operation"},
                      "complete_tag": {**opc, "node_id": "ns=2;s=Complete"}},
                     {"id": "press-2", "counters": {"good": {**opc, "node_id": "ns=2;s=Good2"}}},
                     {"id": "press-3", "counters": {"good": {**opc, "node_id": "ns=2;s=Good3"}},
                      "complete_tag": {**opc, "node_id": "ns=2;s=Complete3"}}]}, "<test>")
    conn = Gateway(cfg).connectors["opc"]
    assert {b.key: (b.every_value, b.every_change, b.cut_by_tags) for b in conn.tags} == {
        "press-1/good": (False, False, True), "press-1/scrap": (True, False, False),
        "press-1/state": (False, True, False), "press-1/order": (False, False, False),
        "press-1/operation": (False, False, False), "press-1/complete": (False, True, False),
        "press-2/good": (False, False, False),
        "press-3/good": (False, False, True), "press-3/complete": (False, True, False)}
    assert isinstance(conn, OpcUaConnector)
    assert {k: need for k, (need, _risk) in conn._queue_need.items()} == {
        "press-1/good": 1000, "press-1/scrap": 1000, "press-1/state": 10, "press-1/complete": 10,
        "press-3/good": 1000, "press-3/complete": 10}
    conn._resolved = {n: ua.NodeId.from_string(n) for n in conn._node_keys}
    asked = {n: conn._item_request(1, n).RequestedParameters.QueueSize for n in conn._node_keys}
    assert (asked["ns=2;s=Good"], asked["ns=2;s=Good3"], asked["ns=2;s=Good2"]) == (1000, 1000, 10)


def _offline_connector(tags: list[TagBinding], got: list) -> OpcUaConnector:
    """A connector never connected: its publish callback (``_on_publish``) is driven with built DataValues."""
    cfg = OpcUaConnectorConfig.model_validate({"type": "opcua", "id": "c", "endpoint": "opc.tcp://x:4840",
                                               "security": "none"})
    return OpcUaConnector(cfg, tags, got.extend)


def test_a_bad_first_notification_does_not_use_up_the_delta_guard() -> None:
    """The new subscription's first notification of a delta counter without SourceTimestamp is Bad
    (BadWaitingForInitialData: a server that proxies a PLC) or null; the next one is the current value, counted before
    the reconnect and restamped: it is not delivered either (red before: the Bad value used up the guard and the value
    was counted again). A good zero decides: the value after it is a change."""
    from mappings.counters import CounterSpec
    from mappings.machine import CounterBinding, MachineEngine, MachineSpec

    got: list = []
    conn = _offline_connector([TagBinding("m1/good", OpcUaTagConfig(node_id="ns=2;s=D"), True, CounterType())], got)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def dv(value, seconds, status=0):
        return ua.DataValue(Value=ua.Variant(value, ua.VariantType.Int32) if value is not None else ua.Variant(),
                            StatusCode=ua.StatusCode(status), ServerTimestamp=t0 + timedelta(seconds=seconds),
                            SourceTimestamp=None)

    def publish(*dvs):
        r = ua.PublishResult()
        r.NotificationMessage = ua.NotificationMessage(NotificationData=[ua.DataChangeNotification(
            MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=1, Value=d) for d in dvs])])
        conn._on_publish(conn._generation, r)

    def subscribe():  # what a new subscription sets up for its handles
        conn._handles, conn._fresh = {1: ("m1/good",)}, {1}

    subscribe()
    publish(dv(0, 0))
    publish(dv(3, 1))  # one part: delta 3
    subscribe()  # reconnect
    publish(dv(None, 120, ua.StatusCodes.BadWaitingForInitialData))
    publish(dv(None, 121))  # Good, but null
    publish(dv(3, 122))  # the current value again, restamped
    subscribe()  # reconnect: a good zero first, then a real new delta
    publish(dv(0, 200))
    publish(dv(2, 201))
    subscribe()  # reconnect: the current value again (suppressed), then a new delta: a change, not marked reread
    conn._first = {1}
    publish(dv(2, 300))
    publish(dv(4, 301))
    assert (got[-1].value, got[-1].reread) == (4, False)
    spec = MachineSpec("m1", {"good": CounterBinding(CounterSpec("good", mode="delta"))}, interval_s=3600)
    eng = MachineEngine(spec)
    for sample in got:
        eng.apply(sample, "good")
    [report] = eng.flush("test", 400)
    assert report.data.quantities.yield_ == "9"
    assert conn.alarms.ids() == ["delta_unverified:m1/good"]


def test_a_new_subscriptions_first_good_values_are_marked_reread() -> None:
    """The first good value of each item on a new subscription is the current value (after a reconnect it may span an
    outage): marked ``reread``, so the core counts it before the order tags of the same publish; a Bad first
    notification does not use the mark up; the values after it are changes (not marked)."""
    got: list = []
    conn = _offline_connector([TagBinding("m1/good", OpcUaTagConfig(node_id="ns=2;s=G")),
                               TagBinding("m1/order", OpcUaTagConfig(node_id="ns=2;s=O"))], got)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def dv(value, seconds, status=0):
        return ua.DataValue(Value=ua.Variant(value) if value is not None else ua.Variant(),
                            StatusCode=ua.StatusCode(status), SourceTimestamp=t0 + timedelta(seconds=seconds))

    def publish(*items):
        r = ua.PublishResult()
        r.NotificationMessage = ua.NotificationMessage(NotificationData=[ua.DataChangeNotification(
            MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=h, Value=d) for h, d in items])])
        conn._on_publish(conn._generation, r)

    conn._handles, conn._fresh, conn._first = {1: ("m1/good",), 2: ("m1/order",)}, set(), {1, 2}
    publish((1, dv(None, 1, ua.StatusCodes.BadWaitingForInitialData)), (2, dv("B", 50)))
    publish((1, dv(300, 90)))
    publish((1, dv(301, 91)), (2, dv("C", 92)))
    assert [(x.key, x.value, x.reread) for x in got] == [
        ("m1/good", None, False), ("m1/order", "B", True), ("m1/good", 300, True), ("m1/good", 301, False),
        ("m1/order", "C", False)]


def test_lost_notification_messages_raise_the_delta_gap_alarm() -> None:
    """A gap in the subscription's notification SequenceNumbers (a message the server or the client library dropped)
    loses what a delta counter took in it: alarm delta_gap and opcua.notifications_lost (red before: nothing told).
    A keep-alive (no data, the next number) is no gap; nor is a new subscription's first message."""
    got: list = []
    conn = _offline_connector([TagBinding("m1/good", OpcUaTagConfig(node_id="ns=2;s=D"), True, CounterType())], got)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def publish(seq, value=None):
        r = ua.PublishResult()
        data = [] if value is None else [ua.DataChangeNotification(MonitoredItems=[ua.MonitoredItemNotification(
            ClientHandle=1, Value=ua.DataValue(Value=ua.Variant(value, ua.VariantType.Int32),
                                               SourceTimestamp=t0 + timedelta(seconds=seq)))])]
        r.NotificationMessage = ua.NotificationMessage(SequenceNumber=seq, NotificationData=data)
        conn._on_publish(conn._generation, r)

    conn._handles, conn._fresh, conn._first, conn._pub_seq = {1: ("m1/good",)}, set(), set(), None
    with structlog.testing.capture_logs() as logs:
        publish(5, 1)  # the first message this subscription: no gap whatever its number
        publish(6, 2)
        publish(7)  # keep-alive: the next number, not used
        publish(7, 3)
        assert not conn.alarms.ids()
        publish(10, 4)  # 8 and 9 never came
    assert conn.alarms.ids() == ["delta_gap:m1/good"]
    assert [(e["lost_from"], e["lost_to"]) for e in logs if e["event"] == "opcua.notifications_lost"] == [(8, 9)]
    assert [x.value for x in got] == [1, 2, 3, 4]


async def test_a_delta_value_without_source_timestamp_is_not_counted_again_after_a_reconnect() -> None:
    """A server that sends no SourceTimestamp and stamps the ServerTimestamp when it sends (emulated: the delta node's
    stamp renewed while the gateway is away). After a reconnect the new subscription's first notification is the
    value the old one delivered, with a new time: the engine would count it again (red before: the sink got 1 + 1
    for one part). It is not delivered; the alarm delta_unverified names the value (it may also have been a count
    made meanwhile; delta_gap is raised for the outage as before) and opcua.delta_unverified is logged. A cut read of such a node has no time either, so the
    engine's re-read rule (a delta re-read without time is not counted) applies; a cumulative counter keeps the
    ServerTimestamp."""
    model = MachineModel("Press1", cycle_time=0.005, scrap_rate=0.0, seed=3)
    server = await start_on_free_port(lambda port: OpcUaMachineServer(model, port=port, source_timestamps=False))
    gate = await Gate(server.port).start()
    gate.open()
    sink = Recorder()
    config = OpcUaConnectorConfig.model_validate({
        "type": "opcua", "id": "line1-opc", "endpoint": f"opc.tcp://127.0.0.1:{gate.port}", "security": "none",
        "publishing_interval_ms": 50, "sampling_interval_ms": 0, "watchdog_interval_s": 0.3, "timeout_s": 1.0})
    tags = [TagBinding("press-1/good", OpcUaTagConfig(node_id=server.node_ids["good"]), counter=CounterType()),
            TagBinding("press-1/delta", OpcUaTagConfig(node_id=server.delta_node_id), True, CounterType())]
    conn = OpcUaConnector(config, tags, sink, backoff=Backoff(initial=0.1, maximum=0.3))

    def delta_values() -> list[object]:
        return [s.value for b in sink.batches for s in b if s.key == "press-1/delta" and s.good and s.value]

    try:
        with structlog.testing.capture_logs() as logs:
            async with running(conn):
                await eventually(lambda: "press-1/delta" in sink.last, 5, "connected")  # its first value: 0
                assert not conn.alarms.ids()
                await model.produce(1)
                await eventually(lambda: delta_values() == [1], 5, "the part's delta value")
                assert sink.last["press-1/delta"].source_time is not None  # the ServerTimestamp, within a subscription
                gate.shut()
                await eventually(lambda: conn.status.state == ComponentState.DISCONNECTED, 5, "DISCONNECTED")
                await server.restamp_delta()
                batches = len(sink.batches)
                gate.open()
                await eventually(lambda: conn.status.detail["reconnects"] == 1
                                 and "delta_unverified:press-1/delta" in conn.alarms, 10, "reconnected, first value seen")
                await eventually(lambda: any(s.key == "press-1/good" for b in sink.batches[batches:] for s in b), 5,
                                 "the new subscription's first values")
                assert delta_values() == [1], "the value delivered before was delivered again as a new one"
                assert conn.alarms.ids() == ["delta_gap:press-1/delta", "delta_unverified:press-1/delta"]
                alarm = next(a for a in conn.alarms.active() if a.id == "delta_unverified:press-1/delta")
                assert alarm.severity == "warning" and "(1) without a source timestamp" in alarm.message
                assert (alarm.evidence["counter"], alarm.evidence["value"]) == ("delta", 1)
                read = {s.key: s for s in await conn.read(["press-1/delta", "press-1/good"])}
                assert (read["press-1/delta"].value, read["press-1/delta"].source_time) == (1, None)
                assert read["press-1/good"].source_time is not None
        unverified = [(e["counters"], e["value"]) for e in logs if e["event"] == "opcua.delta_unverified"]
        assert unverified == [(["press-1/delta"], 1)]
    finally:
        await gate.close()
        await server.stop()
