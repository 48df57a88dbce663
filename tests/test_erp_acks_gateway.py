"""The acks loop between the two programs of this repository: a real gateway publishes to mosquitto, the real ERP
posting service (MQTT 5 shared subscription, PostgreSQL) answers on the acks topic, and a rejection (here: a
conflicting duplicate of one of the gateway's events) ends in the gateway's quarantine and raises its
``erp_rejected`` alarm, again after a restart while the row is still quarantined, not once it was purged."""

from __future__ import annotations

import asyncio
import json

import psycopg

from erp_service.config import MqttSourceConfig
from erp_service.service import ErpService
from erp_service.testing import throwaway_database
from gateway.store import Store
from simulators.erp_endpoint import ErpEndpoint
from simulators.machine import MachineModel
from simulators.modbus_server import ModbusMachineServer
from simulators.ports import free_port
from tests.e2e import RunningGateway, gateway_config, wait_until, workdir
from tests.test_erp_service_consumers import Client, _cfg


async def _first_report(dsn: str) -> dict | None:
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        cur = await c.execute("SELECT body FROM erp_events WHERE type = 'operation.quantity_reported' ORDER BY seq "
                              "LIMIT 1")
        row = await cur.fetchone()
    return row[0] if row else None


async def test_a_conflict_at_the_erp_service_is_quarantined_and_alarmed_at_the_gateway(tmp_path, mqtt_broker):
    m = MachineModel("Press2", cycle_time=0.01, seed=12, counter_bits=32)
    async with ModbusMachineServer(m, host="127.0.0.1", port=free_port(), unit_id=1) as mb, \
            throwaway_database() as dsn, ErpEndpoint() as ep:
        svc = await ErpService(_cfg(dsn, ep, source="mqtt", workers=1, mqtt=MqttSourceConfig(
            host=mqtt_broker.host, port=mqtt_broker.port))).start()
        forger = Client(mqtt_broker.host, mqtt_broker.port, "forger", protocol=5)
        rgw = RunningGateway(gateway_config(broker_port=mqtt_broker.port, modbus=mb, interval_s=0.2,
                                            store_path=workdir(tmp_path, "gw") + "/gw.db"))
        try:
            await svc.wait_ready()
            gw = await rgw.start()
            await m.produce(30, timeout=20)
            deadline = asyncio.get_running_loop().time() + 20
            while (genuine := await _first_report(dsn)) is None:
                assert asyncio.get_running_loop().time() < deadline, "no quantity report reached the ERP service"
                await asyncio.sleep(0.1)
            assert "erp_rejected" not in gw.alarms.ids() and gw.store.quarantined == 0
            # the same id with another quantity (a store re-deriving an event differently): a conflict
            forged = json.loads(json.dumps(genuine))
            forged["data"]["quantities"]["yield"] = str(int(forged["data"]["quantities"]["yield"]) + 1)
            topic = gw.topics.event(forged["subject"], forged["type"])
            await asyncio.to_thread(forger.publish, topic, forged)
            await wait_until(lambda: gw.stats.erp_rejections == 1 and gw.store.quarantined == 1, 20)
            [alarm] = [a for a in gw.alarms.active() if a.id == "erp_rejected"]
            assert alarm.evidence["last_id"] == genuine["id"] and "conflict" in alarm.evidence["last_reason"]
            assert not gw.status()["healthy"]
            [row] = await gw.store.export_rows("quarantine")
            assert row["reason"].startswith("ERP: conflict") and row["payload"] == forged
            # the first one stays booked: the ledger holds the genuine quantity only
            assert (await _first_report(dsn)) == genuine

            await rgw.stop()  # a restart while the rejection is still quarantined: the alarm is raised again
            gw = await rgw.start()
            assert "erp_rejected" in gw.alarms.ids()
            await rgw.stop()  # the operator purges the quarantine (gateway stopped): no alarm at the next start
            async with Store(rgw.cfg.store.path) as store:
                assert await store.purge("quarantine") == 1
            gw = await rgw.start()
            assert "erp_rejected" not in gw.alarms.ids()
        finally:
            await rgw.stop()
            forger.close()
            await svc.stop()
