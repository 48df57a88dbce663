"""Production-order dispatch messages (ERP → gateway), validated before they touch any machine."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mappings.machine import Component, OrderContext


class DispatchComponent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    material: str = Field(min_length=1, max_length=64)
    quantity_per_unit: Decimal = Field(ge=0)
    unit: str = Field(min_length=1, max_length=8)


class DispatchMessage(BaseModel):
    """Retained per machine on ``.../{machine}/dispatch``; an empty payload clears the dispatch."""

    model_config = ConfigDict(extra="forbid")
    order: str = Field(min_length=1, max_length=40, description="Production order number.")
    operation: str = Field(min_length=1, max_length=16, description="Operation / activity number.")
    status: Literal["active", "completed"] = "active"
    unit: str | None = Field(None, min_length=1, max_length=8)
    planned_quantity: Decimal | None = Field(None, ge=0)
    components: list[DispatchComponent] = Field(default_factory=list, max_length=100)
    dispatched_at: str | None = None

    def context(self) -> OrderContext:
        return OrderContext(
            order=self.order,
            operation=self.operation,
            status=self.status,
            unit=self.unit,
            planned_quantity=self.planned_quantity,
            components=tuple(Component(c.material, c.quantity_per_unit, c.unit) for c in self.components),
        )


class DispatchRejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


MAX_DISPATCH_BYTES = 64 * 1024


def parse_dispatch(payload: bytes) -> OrderContext | None:
    """Parse a dispatch payload; None clears the machine's order. Raises DispatchRejected."""
    if not payload:
        return None
    if len(payload) > MAX_DISPATCH_BYTES:
        raise DispatchRejected("too_large", f"{len(payload)} bytes > {MAX_DISPATCH_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DispatchRejected("invalid_json", str(exc)) from None
    try:
        return DispatchMessage.model_validate(doc).context()
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise DispatchRejected("schema", detail) from None
