"""Event encoding micro-benchmark: CPU per event of the engine's event data and of the CloudEvents encoding.

The workload is bench/throughput.py's: 20 machines, one ``good`` counter each, max_units=1, so every sample closes a
window and gives one ``operation.quantity_reported`` event with an order, evidence and totals (the common event).

Measured in this process (``time.process_time``, best of ``--repeat`` runs of ``--events`` events):

- ``engine``: ``MachineEngine.apply`` per event (counter rules, window, the event's typed data);
- ``data_dict`` / ``data_typed``: building the data of one quantity report as the untyped dict the engine built
  before (with ``datetime`` timestamps) vs the typed ``QuantityReportedData`` it builds now (same values);
- ``encode_sdk``: the encoder before the fast path: ``CloudEvent(attrs, data)`` + ``JSONFormat().write``, uuid5 and a
  datetime per event (kept here as the reference);
- ``encode``: ``EventEncoder.encode`` now; both produce the same bytes (asserted before timing).

Usage: ``python bench/encoding.py [--events 20000] [--repeat 5]``. Prints one line per measure (µs per event) and
a JSON line with all values.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench/ is a package of the repo

import argparse
import gc
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from bench.common import ident
from bench.throughput import Producer
from gateway.events import EventEncoder, Topics, event_id
from mappings import events as ev
from mappings.events import dec_str

_FORMAT = JSONFormat()


def encode_sdk(enc: EventEncoder, draft, seq: int) -> tuple[str, bytes]:
    """EventEncoder.encode as of 207d9ef (before the fast path)."""
    attrs = {
        "specversion": "1.0",
        "id": event_id(enc.source, enc.epoch, seq),
        "source": enc.source,
        "type": draft.type,
        "subject": draft.subject,
        "time": datetime.fromtimestamp(draft.time, tz=timezone.utc),
        "datacontenttype": "application/json",
        "seq": seq,
        "epoch": enc.epoch,
    }
    data = draft.data.to_dict() if isinstance(draft.data, ev.EventData) else draft.data
    return enc.topics.event(draft.subject, draft.type), _FORMAT.write(CloudEvent(attrs, data))


def _iso_datetime(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def data_dict(start: float, end: float, q: Decimal, totals: dict[str, Decimal]) -> dict:
    """The quantity report's data as MachineEngine built it before (207d9ef)."""
    return {
        "machine": "press-001", "order": "10000001", "operation": "0010", "unassigned": False, "reason": "units",
        "window": {"start": _iso_datetime(start), "end": _iso_datetime(end)},
        "quantities": {"yield": dec_str(q), "scrap": dec_str(Decimal(0)), "rework": dec_str(Decimal(0))},
        "unit": "PCE",
        "totals": {k: dec_str(v) for k, v in totals.items()},
        "evidence": [{"counter": "good", "from": 41, "to": 42, "rollovers": 0, "resets": 0, "glitches": 0}],
    }


def data_typed(start: float, end: float, q: Decimal, totals: dict[str, Decimal]) -> ev.QuantityReportedData:
    """The same data as MachineEngine builds it now."""
    return ev.QuantityReportedData(
        machine="press-001", order="10000001", operation="0010", unassigned=False, reason="units",
        window=ev.Window(start=ev.rfc3339_opt(start), end=ev.rfc3339_opt(end)),
        quantities=ev.Quantities(yield_=dec_str(q), scrap=dec_str(Decimal(0)), rework=dec_str(Decimal(0))),
        unit="PCE",
        totals=ev.Totals(yield_=dec_str(totals["yield"]), scrap=dec_str(totals["scrap"]),
                         rework=dec_str(totals["rework"])),
        evidence=[ev.CounterEvidence(counter="good", from_=41, to=42, rollovers=0, resets=0, glitches=0)],
    )


def best_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        fn()
        runs.append(time.process_time() - t0)
    return min(runs) / n * 1e6


def run(n: int, repeat: int) -> dict[str, float]:
    ids = ident()
    enc = EventEncoder(ids, Topics("edge", ids), "0" * 32)
    producer = Producer(None, enc)
    drafts: list = []

    def make() -> None:
        drafts[:] = producer.drafts(n)

    res = {"engine": best_us(make, n, repeat)}
    for seq, d in enumerate(drafts[:2000], start=1):  # same bytes, or the comparison is meaningless
        assert enc.encode(d, seq) == encode_sdk(enc, d, seq), (seq, d)

    t0, totals = 1_767_225_600.123456, {"yield": Decimal(4711), "scrap": Decimal(3), "rework": Decimal(0)}
    times = [t0 + i * 0.05 for i in range(n)]
    def build_all(f: Callable) -> Callable[[], None]:
        def go() -> None:
            for t in times:  # built, used, dropped, as in the gateway (keeping 20,000 alive would time the GC)
                f(t, t, Decimal(1), totals)
        return go

    res["data_dict"] = best_us(build_all(data_dict), n, repeat)
    res["data_typed"] = best_us(build_all(data_typed), n, repeat)
    assert data_typed(t0, t0, Decimal(1), totals) == data_dict(t0, t0, Decimal(1), totals)

    def encode_all(f: Callable) -> Callable[[], None]:
        def go() -> None:
            for seq, d in enumerate(drafts, start=1):
                f(d, seq)
        return go

    res["encode_sdk"] = best_us(encode_all(lambda d, s: encode_sdk(enc, d, s)), n, repeat)
    res["encode"] = best_us(encode_all(enc.encode), n, repeat)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    res = run(args.events, args.repeat)
    for k, v in res.items():
        print(f"{k:12s} {v:7.2f} µs/event")
    print(f"encode speed-up {res['encode_sdk'] / res['encode']:.1f}x, data build {res['data_dict'] / res['data_typed']:.1f}x")
    print(json.dumps({"benchmark": "encoding", "unit": "us/event", **{k: round(v, 3) for k, v in res.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
