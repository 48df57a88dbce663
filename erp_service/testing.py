"""Helpers for tests, the benchmark and the demo: throwaway PostgreSQL databases and contract-valid events."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import psycopg

from gateway.events import event_id

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@asynccontextmanager
async def throwaway_database(admin_dsn: str = ADMIN_DSN, prefix: str = "edge_erp_test") -> AsyncIterator[str]:
    """Create a fresh database, yield its DSN, drop it (terminating leftover connections) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as c:
        await c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as c:
            await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _ts(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventFactory:
    """Builds contract-valid CloudEvents for one gateway (source) and store epoch, seq 1, 2, 3, ..."""

    def __init__(self, gateway: str = "gw-01", *, enterprise: str = "acme", site: str = "plant-1",
                 area: str = "assembly", line: str = "line-1", epoch: str | None = None, root: str = "edge") -> None:
        self.source = f"/{enterprise}/{site}/{area}/{line}/{gateway}"
        self.base = f"{root}/v1/{enterprise}/{site}/{area}/{line}"
        self.epoch = epoch or uuid.uuid4().hex
        self.seq = 0
        self.t0 = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)
        self.totals: dict[tuple[str, str | None, str | None], dict[str, int]] = {}

    def topic(self, machine: str, event_type: str = "batch") -> str:
        return f"{self.base}/{machine}/events/{event_type}"

    def _env(self, etype: str, machine: str, data: dict[str, Any], time: datetime | None = None) -> dict[str, Any]:
        self.seq += 1
        t = time or (self.t0 + timedelta(seconds=self.seq))
        return {"specversion": "1.0", "id": event_id(self.source, self.epoch, self.seq), "source": self.source,
                "type": etype, "subject": machine, "time": _ts(t), "datacontenttype": "application/json",
                "seq": self.seq, "epoch": self.epoch, "data": data}

    def started(self, machine: str, order: str, operation: str, unit: str = "PCE") -> dict[str, Any]:
        self.totals[(machine, order, operation)] = {"yield": 0, "scrap": 0, "rework": 0}
        return self._env("operation.started", machine, {"machine": machine, "order": order, "operation": operation,
                                                        "planned_quantity": "500", "unit": unit})

    def report(self, machine: str, order: str | None, operation: str | None, y: int = 0, s: int = 0, r: int = 0,
               reason: str = "periodic", unit: str = "PCE", time: datetime | None = None) -> dict[str, Any]:
        tot = self.totals.setdefault((machine, order, operation), {"yield": 0, "scrap": 0, "rework": 0})
        for k, v in (("yield", y), ("scrap", s), ("rework", r)):
            tot[k] += v
        seq_next = self.seq + 1
        t = time or (self.t0 + timedelta(seconds=seq_next))
        data = {"machine": machine, "order": order, "operation": operation, "unassigned": order is None,
                "reason": reason, "window": {"start": _ts(t - timedelta(seconds=1)), "end": _ts(t)},
                "quantities": {"yield": str(y), "scrap": str(s), "rework": str(r)}, "unit": unit,
                "totals": {k: str(v) for k, v in tot.items()},
                "evidence": [{"counter": "good", "from": 0, "to": y, "rollovers": 0, "resets": 0, "glitches": 0}]}
        return self._env("operation.quantity_reported", machine, data, t)

    def consumed(self, machine: str, order: str, operation: str, y: int, s: int,
                 components: list[tuple[str, str, str]]) -> dict[str, Any]:
        return self._env("material.consumed", machine, {
            "machine": machine, "order": order, "operation": operation, "unassigned": False, "method": "backflush",
            "basis": {"yield": str(y), "scrap": str(s), "unit": "PCE"}, "movement_type": "261",
            "components": [{"material": m, "quantity": q, "unit": u} for m, q, u in components]})

    def completed(self, machine: str, order: str, operation: str, unit: str = "PCE") -> dict[str, Any]:
        tot = self.totals.get((machine, order, operation), {"yield": 0, "scrap": 0, "rework": 0})
        return self._env("operation.completed", machine, {
            "machine": machine, "order": order, "operation": operation, "final": True,
            "totals": {k: str(v) for k, v in tot.items()}, "unit": unit})

    def state(self, machine: str, state: str = "running", previous: str | None = None) -> dict[str, Any]:
        return self._env("machine.state_changed", machine, {"machine": machine, "state": state, "previous": previous,
                                                            "raw": 1, "reason": "tag"})
