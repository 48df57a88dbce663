"""Modbus TCP connector: polls register blocks on a fixed schedule and fans each block out to its tags.

Blocks: the tags of each table (holding FC3, input FC4, coil FC1, discrete_input FC2) are sorted by
address and merged into one block while the gap between them is at most ``max_gap_registers`` (bits in
the bit tables) and the block stays within ``max_block_registers`` (``max_block_bits``). Each block is read once per poll and feeds every tag in it. If a merged block
that spans unused registers is refused with ILLEGAL ADDRESS (a device with holes in its map), it is
split into gap-free blocks for good.

Schedule: polls start at t0 + k * poll_interval_s on the monotonic clock (no drift). A poll that overruns
skips the slots it missed (counted in ``status.detail["skipped_polls"]``) instead of bursting.
Every poll hands ONE batch to the sink: a Sample for each tag whose registers changed since the previous poll, and
for every tag of a block at least every ``HEARTBEAT_S`` (so the counter engine's plausibility checks see fresh
readings) and after the block failed; a tag whose every value counts (``TagBinding.every_value``: reset-on-read and
delta counters) at every good read, changed or not. An idle machine costs the block read and one list comparison
per poll.

Failures: an exception response fails only its block (reported with device, unit, function code and
address; the other blocks keep being polled); a timeout or a lost connection fails the block,
drops the connection (a late answer must not be taken for the next request's) and reconnects with
capped, jittered backoff. pymodbus's own automatic reconnect is kept out of the way: its delay is set
far beyond any backoff here and each client is closed (which cancels it) when its connection is dropped.
A failed block yields ``good=False, value=None`` for each of its tags, status ``"ReadFailed: ..."``.

Decoding uses ``struct`` on the raw register bytes (pymodbus's ``convert_from_registers`` is ~40x slower), in
the tag's layout: ABCD (= big), CDAB (= little), BADC, DCBA. Coils and discrete inputs are ``bool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import bit_message, register_message

from connectors.base import Connector, SampleSink, TagBinding
from connectors.errors import ConnectorUnavailable, ReadFailed
from gateway.component import Backoff, ComponentState

HEARTBEAT_S = 10.0
"""Unchanged tags are reported at least this often (the counter engine measures plausibility between readings)."""
from connectors.modbus.config import (
    BIT_TABLES,
    FUNCTION_CODES,
    MAX_GAP,
    ModbusConnectorConfig,
    ModbusTagConfig,
)
from mappings.samples import Readings, Sample, Value

log = structlog.get_logger(__name__)

_NO_AUTO_RECONNECT = 3600.0  # pymodbus reconnect delay: never reached, the client is closed long before
_ILLEGAL_ADDRESS = 2

Decoder = Callable[[bytes, Sequence[int]], Value]

_FORMATS = {
    "uint16": "H",
    "int16": "h",
    "uint32": "I",
    "int32": "i",
    "uint64": "Q",
    "int64": "q",
    "float32": "f",
    "float64": "d",
}


# ---------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=64)
def _struct(fmt: str) -> struct.Struct:
    """One Struct per format for all tags (one per tag was ~2.4 MB at 10,000 tags)."""
    return struct.Struct(fmt)


def make_decoder(tag: ModbusTagConfig, offset: int) -> Decoder:
    """A function ``(block_bytes, block_registers) -> value`` for a tag ``offset`` registers into its block.

    ``block_bytes`` is the block packed as big-endian 16-bit words. Numbers are assembled in the tag's
    layout (word order reversed for CDAB/DCBA, the bytes of each register swapped for BADC/DCBA), then
    unpacked big-endian. Strings: two ASCII characters per register, high byte first, cut at the first NUL,
    surrounding spaces stripped (the layout does not apply). ``bool`` (coils, discrete inputs): the second
    argument is then the block's list of bits. Tags of the same type and layout at the same offset share one
    decoder (a closure per tag was ~2 MB at 10,000 tags).
    """
    return _decoder(tag.data_type, tag.count, tag.words_swapped, tag.bytes_swapped, offset)


@functools.lru_cache(maxsize=4096)
def _decoder(data_type: str, n: int, words_swapped: bool, bytes_swapped: bool, offset: int) -> Decoder:
    start = offset * 2
    if data_type == "string":
        end = start + 2 * n

        def dec_string(raw: bytes, regs: Sequence[int]) -> Value:
            return raw[start:end].split(b"\0", 1)[0].decode("ascii", errors="replace").strip(" ")

        return dec_string
    if data_type == "bool":

        def dec_bit(raw: bytes, bits: Sequence[int]) -> Value:
            return bool(bits[offset])

        return dec_bit
    unpack_from = _struct(">" + _FORMATS[data_type]).unpack_from
    words_swapped = words_swapped and n > 1
    if not words_swapped and not bytes_swapped:

        def dec_big(raw: bytes, regs: Sequence[int]) -> Value:
            return unpack_from(raw, start)[0]

        return dec_big
    pack_words = _struct(f">{n}H").pack
    pack_swapped = _struct(f"<{n}H").pack  # little-endian words: the two bytes of each register swapped

    if bytes_swapped:
        pack = pack_swapped
    else:
        pack = pack_words

    def dec_layout(raw: bytes, regs: Sequence[int]) -> Value:
        words = regs[offset : offset + n]
        return unpack_from(pack(*(reversed(words) if words_swapped else words)))[0]

    return dec_layout


def decode_registers(
    registers: Sequence[int], data_type: str, word_order: str = "big", length: int | None = None
) -> Value:
    """Decode one value from its registers (pure helper; the poll loop uses precompiled decoders)."""
    tag = ModbusTagConfig(address=0, data_type=data_type, word_order=word_order, length=length)  # type: ignore[arg-type]
    if data_type == "bool":
        raise ValueError("bool values are bits (coil / discrete_input), not registers")
    if len(registers) != tag.count:
        raise ValueError(f"{data_type} needs {tag.count} registers, got {len(registers)}")
    return make_decoder(tag, 0)(struct.pack(f">{len(registers)}H", *registers), registers)


# ---------------------------------------------------------------------- responses


def _quiet(cls: type) -> type:
    """``cls`` with a short ``str()``: pymodbus's decoder formats every response it decodes (``str(pdu)``, the whole
    register list, ~4 % of the gateway's CPU at 25,000 tags/s) for a debug line even when debug logging is off.
    Registered with the client (``register``, pymodbus's public API for response classes), so the decoder builds
    these instead; they are subclasses, nothing else changes but ``decode`` of a register response (below)."""

    def __str__(self: object) -> str:
        return f"{cls.__name__}(dev_id={getattr(self, 'dev_id', None)}, count={getattr(self, 'count', None)})"

    body: dict[str, object] = {"__str__": __str__, "__doc__": cls.__doc__}
    if issubclass(cls, register_message.ReadHoldingRegistersResponse):
        body["decode"] = _decode_registers
    return type(f"Quiet{cls.__name__}", (cls,), body)


def _decode_registers(self: register_message.ReadHoldingRegistersResponse, data: bytes) -> None:
    """``ReadHoldingRegistersResponse.decode`` (also of input registers) with one ``struct`` call: pymodbus unpacks
    each register with a call of its own (~45 µs of a 125-register response; the gateway reads 80 of those per
    second at the Node-RED peer's load). Same registers, same error (tests/test_connector_modbus.py checks it
    against pymodbus's own on any bytes)."""
    data_len = int(data[0])
    if data_len >= len(data):
        raise ModbusIOException(f"byte_count {data_len} > length of packet {len(data)}",
                                function_code=self.function_code)
    self.registers = list(_struct(f">{data_len // 2}H").unpack_from(data, 1))


QUIET_RESPONSES = tuple(_quiet(c) for c in (
    register_message.ReadHoldingRegistersResponse, register_message.ReadInputRegistersResponse,
    bit_message.ReadCoilsResponse, bit_message.ReadDiscreteInputsResponse))


# ---------------------------------------------------------------------- block planning


@dataclass(frozen=True, slots=True)
class TagSlot:
    key: str
    tag: ModbusTagConfig
    offset: int  # registers from the block start
    decode: Decoder = field(repr=False, compare=False)
    count: int = field(default=0, compare=False)  # registers / bits: ``tag.count`` read once (a property per poll)
    # a plain uint16 register: its value is the register as the client returned it (no packing, no decoder call)
    direct: bool = field(default=False, compare=False)
    # every value is a count of its own (a delta or reset-on-read counter: ``TagBinding.every_value``): handed on at
    # every good read, also when the register equals the last poll's (two reads of 3 are 6 parts)
    every: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.count:
            object.__setattr__(self, "count", self.tag.count)
        object.__setattr__(self, "direct", self.tag.data_type == "uint16" and not self.tag.bytes_swapped
                           and self.tag.table in ("holding", "input"))


@dataclass(frozen=True)
class Block:
    table: str
    start: int
    count: int
    slots: tuple[TagSlot, ...]
    gapless: bool  # every register of the block belongs to some tag
    direct: bool = field(default=False, compare=False)  # every slot is ``direct``: the block is never packed
    # direct blocks: the slots' keys (one tuple for the block's life: the core looks its routes up once per tuple,
    # see mappings.samples.Readings), their offsets, and whether the offsets are 0..count-1 (the register list is
    # the value column as it is)
    run_keys: tuple[str, ...] = field(default=(), compare=False)
    offsets: tuple[int, ...] = field(default=(), compare=False)
    contiguous: bool = field(default=False, compare=False)
    # the indexes (in ``slots`` order) of the slots whose every value counts (``TagSlot.every``): never filtered out
    # as unchanged
    every: frozenset[int] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        direct = all(s.direct for s in self.slots)
        object.__setattr__(self, "direct", direct)
        object.__setattr__(self, "every", frozenset(i for i, s in enumerate(self.slots) if s.every))
        if direct:
            offsets = tuple(s.offset for s in self.slots)
            object.__setattr__(self, "run_keys", tuple(s.key for s in self.slots))
            object.__setattr__(self, "offsets", offsets)
            object.__setattr__(self, "contiguous", offsets == tuple(range(self.count)))

    @property
    def name(self) -> str:
        return f"{self.table}[{self.start}..{self.start + self.count - 1}]"

    @property
    def function_code(self) -> int:
        return FUNCTION_CODES[self.table]

    @property
    def bits(self) -> bool:
        return self.table in BIT_TABLES


def plan_blocks(
    bindings: Sequence[TagBinding], max_registers: int, max_gap: int = MAX_GAP, max_bits: int = 2000
) -> list[Block]:
    """Group tags into read blocks: per table, by address, merging across gaps of at most ``max_gap``
    registers (bits) while the block is at most ``max_registers`` long (``max_bits`` in the coil and
    discrete input tables). A tag longer than ``max_registers`` gets a block of its own (a Modbus read
    may carry 125 registers)."""
    by_table: dict[str, list[TagBinding]] = {}
    for b in bindings:
        by_table.setdefault(b.address.table, []).append(b)
    blocks: list[Block] = []
    for table in sorted(by_table):
        limit = max_bits if table in BIT_TABLES else max_registers
        group: list[TagBinding] = []
        g_start = g_end = 0
        for b in sorted(by_table[table], key=lambda b: (b.address.address, b.address.count)):
            s, e = b.address.address, b.address.address + b.address.count
            if group and s - g_end <= max_gap and max(g_end, e) - g_start <= limit:
                group.append(b)
                g_end = max(g_end, e)
                continue
            if group:
                blocks.append(_make_block(table, g_start, g_end, group))
            group, g_start, g_end = [b], s, e
        if group:
            blocks.append(_make_block(table, g_start, g_end, group))
    return blocks


def _make_block(table: str, start: int, end: int, group: list[TagBinding]) -> Block:
    covered = 0
    reach = start
    for b in group:  # sorted by address
        s, e = b.address.address, b.address.address + b.address.count
        if e > reach:
            covered += e - max(s, reach)
            reach = e
    slots = tuple(
        TagSlot(b.key, b.address, b.address.address - start, make_decoder(b.address, b.address.address - start),
                every=b.every_value)
        for b in group
    )
    return Block(table, start, end - start, slots, gapless=covered == end - start)


# ---------------------------------------------------------------------- errors


class _LinkError(Exception):
    """The connection is unusable (lost, timed out, out of step): drop it and reconnect."""


class _BlockError(Exception):
    """The device answered this block with an error; the connection is fine."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _exc_name(code: int) -> str:
    try:
        return ExcCodes(code).name
    except ValueError:
        return "UNKNOWN"


# ---------------------------------------------------------------------- connector


class ModbusConnector(Connector):
    """Polls one Modbus TCP device (unit); see the module docstring."""

    type = "modbus"

    def __init__(
        self,
        config: ModbusConnectorConfig,
        tags: Sequence[TagBinding],
        sink: SampleSink,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(config, tags, sink)
        self.config: ModbusConnectorConfig = config
        self.endpoint = f"{config.host}:{config.port}/{config.unit_id}"
        self._backoff = backoff or Backoff()
        bindings = [
            b if isinstance(b.address, ModbusTagConfig) else TagBinding(b.key, ModbusTagConfig.model_validate(b.address))
            for b in self.tags
        ]
        self.blocks: list[Block] = plan_blocks(bindings, config.max_block_registers, config.max_gap_registers,
                                               config.max_block_bits)
        self._block_of: dict[str, Block] = {s.key: blk for blk in self.blocks for s in blk.slots}
        # tags whose every value counts (reset-on-read, delta): a one-shot read hands on what it read of them
        self._every_keys = frozenset(s.key for blk in self.blocks for s in blk.slots if s.every)
        self._last_regs: dict[str, list[int]] = {}  # block name -> registers of its last good read (poll)
        self._last_full: dict[str, float] = {}  # block name -> monotonic time it last reported every tag
        self._client: AsyncModbusTcpClient | None = None
        self._retry_at = 0.0  # loop time of the next connect attempt
        self._down_reason = "not connected yet"
        self._failing: dict[str, str] = {}  # block name -> error, for logging state changes once
        self._ever_connected = False
        self.polls = 0
        self.skipped_polls = 0
        self.status.detail.update(
            endpoint=self.endpoint, blocks=len(self.blocks), polls=0, skipped_polls=0, reconnects=0
        )

    # ------------------------------------------------------------------ run loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval_s
        next_slot = loop.time()
        try:
            while True:
                now = loop.time()
                if now < next_slot:
                    await asyncio.sleep(next_slot - now)
                else:
                    missed = int((now - next_slot) // interval)
                    if missed:
                        self.skipped_polls += missed
                        self.status.detail["skipped_polls"] = self.skipped_polls
                        next_slot += missed * interval
                next_slot += interval
                await self.poll_once()
        finally:
            self._drop(self._client, "stopped", backoff=False)
            self.status.set(ComponentState.STOPPED)

    async def poll_once(self) -> Readings:
        """One poll: (re)connect if due, read every block, hand one batch to the sink; returns the batch."""
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and not client.connected:
            self._drop(client, "connection lost")
            client = None
        if client is None and loop.time() >= self._retry_at:
            client = await self._connect()

        samples = Readings()
        errors: dict[str, str] = {}
        failed_blocks: dict[str, Block] = {}
        any_ok = False
        started = time.monotonic() if client is not None else None
        try:
            for block in list(self.blocks):
                client = self._client
                if client is None:
                    error = f"not connected ({self._down_reason})"
                else:
                    try:
                        regs = await self._read_block(client, block)
                    except _LinkError as exc:
                        error = str(exc)
                        self._drop(client, error)
                    except _BlockError as exc:
                        error = str(exc)
                        if exc.code == _ILLEGAL_ADDRESS and not block.gapless:
                            self._split(block)
                    else:
                        if block.direct:
                            self._run(samples, block, regs, time.time())
                        else:
                            samples.extend(self._decode(block, regs, time.time(), changed_only=True))
                        any_ok = True
                        continue
                errors[block.name] = error
                failed_blocks[block.name] = block
                self._last_regs.pop(block.name, None)  # the next good read reports every tag of the block
                samples.extend(self._failed(block, error, time.time()))
        except asyncio.CancelledError:
            # stopped in the middle of a poll: the blocks already read go on (a reset-on-read register was cleared by
            # its read; the gateway's stop applies what reached the core before its last commit)
            if samples:
                with contextlib.suppress(Exception):
                    self.sink(samples)
            raise

        self.polls += 1
        self.status.detail["polls"] = self.polls
        if started is not None:  # a poll that talked to the device (not one that only found it unreachable)
            self.observe_read("poll", time.monotonic() - started)
        if any_ok:
            self._backoff.reset()
        self._report(errors, failed_blocks)
        if samples:
            try:
                self.sink(samples)
            except Exception:
                log.exception("modbus.sink_failed", connector=self.id, samples=len(samples))
        return samples

    async def _connect(self) -> AsyncModbusTcpClient | None:
        cfg = self.config
        client = AsyncModbusTcpClient(
            cfg.host,
            port=cfg.port,
            name=f"modbus:{self.id}",
            timeout=cfg.timeout_s,
            retries=0,  # one attempt per request; a timeout drops the connection (see _read_block)
            reconnect_delay=_NO_AUTO_RECONNECT,  # never 0 (busy loop in some pymodbus versions)
            reconnect_delay_max=_NO_AUTO_RECONNECT,
            framer=FramerType.RTU if cfg.framing == "rtu" else FramerType.SOCKET,
        )
        for response in QUIET_RESPONSES:
            client.register(response)
        try:
            async with asyncio.timeout(cfg.timeout_s + 0.5):  # not wait_for: it can swallow a cancellation (3.11)
                ok = await client.connect()
        except (asyncio.TimeoutError, OSError, ModbusException) as exc:
            ok, detail = False, f": {exc!r}"
        else:
            detail = ""
        if not ok:
            client.close()
            self._down_reason = f"cannot connect to {cfg.host}:{cfg.port}{detail}"
            self._retry_at = asyncio.get_running_loop().time() + self._backoff.next()
            return None
        self._client = client
        if self._ever_connected:
            self.status.detail["reconnects"] += 1
        else:
            log.info("modbus.connected", connector=self.id, endpoint=self.endpoint, blocks=len(self.blocks))
        self._ever_connected = True
        return client

    def _drop(self, client: AsyncModbusTcpClient | None, reason: str, *, backoff: bool = True) -> None:
        """Close ``client`` if it is the current one; the next connect waits for the backoff delay."""
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.close()  # also cancels any pymodbus reconnect task
        if client is self._client:
            self._client = None
            self._down_reason = reason
            if backoff:
                self._retry_at = asyncio.get_running_loop().time() + self._backoff.next()

    async def _read_block(self, client: AsyncModbusTcpClient, block: Block) -> list[int]:
        """The block's registers, or its bits (a list of bools) for a coil / discrete input block."""
        cfg = self.config
        fn = {"holding": client.read_holding_registers, "input": client.read_input_registers,
              "coil": client.read_coils, "discrete_input": client.read_discrete_inputs}[block.table]
        try:
            # pymodbus bounds the request by timeout_s; the outer bound only guards against a hang in it
            async with asyncio.timeout(cfg.timeout_s * 1.5 + 0.5):
                rr = await fn(block.start, count=block.count, device_id=cfg.unit_id)
        except asyncio.TimeoutError as exc:
            raise _LinkError(f"no valid response within {cfg.timeout_s}s") from exc
        except ConnectionException as exc:
            raise _LinkError("connection lost") from exc
        except ModbusIOException as exc:  # no response, or an answer out of step with the request
            raise _LinkError(f"no valid response within {cfg.timeout_s}s") from exc
        except (ModbusException, OSError) as exc:
            raise _LinkError(f"{type(exc).__name__}: {exc}") from exc
        if rr.isError():
            where = f"FC{block.function_code} address {block.start} count {block.count}"
            code = getattr(rr, "exception_code", None)
            if code is None:
                raise _BlockError(f"error response (function code {rr.function_code}) for {where}")
            raise _BlockError(f"exception {code} ({_exc_name(code)}) for {where}", code)
        regs = rr.bits if block.bits else rr.registers
        if len(regs) < block.count:
            where = f"FC{block.function_code} address {block.start} count {block.count}"
            raise _BlockError(f"short response: {len(regs)} of {block.count} {'bits' if block.bits else 'registers'} for {where}")
        return regs

    def _changed(self, block: Block, regs: list[int], mono: float) -> list[int] | None:
        """The block's registers of the last poll, to hand on only the tags that changed (and remember these); None
        when every tag is handed on: the first good read, and every HEARTBEAT_S."""
        name = block.name
        prev = self._last_regs.get(name)
        if prev is not None and mono - self._last_full.get(name, 0.0) >= HEARTBEAT_S:
            prev = None  # heartbeat: every tag again
        self._last_regs[name] = regs
        if prev is None:
            self._last_full[name] = mono
        return prev

    def _run(self, out: Readings, block: Block, regs: list[int], now: float) -> None:
        """A poll's read of a block of plain uint16 registers, as a run (keys and values in columns): the tags
        whose registers changed, every tag on the first read and every HEARTBEAT_S. Same readings as ``_decode``
        with ``changed_only`` (tests/test_connector_modbus.py compares them)."""
        mono = time.monotonic()  # one reading of the block: one receive time for all its tags
        regs = list(regs[: block.count])
        prev = self._changed(block, regs, mono)
        n = len(block.run_keys)
        if prev is None:
            values: list[int | None] = (
                regs if block.contiguous else [regs[o] for o in block.offsets])  # type: ignore[assignment]
            out.add_run(block.run_keys, values, now, mono, n)
            return
        every = block.every
        if every:  # delta / reset-on-read registers: every read counts, changed or not
            values = [v if (v := regs[o]) != prev[o] or i in every else None for i, o in enumerate(block.offsets)]
        elif regs == prev:
            return
        elif block.contiguous:
            values = [v if v != p else None for v, p in zip(regs, prev)]
        else:
            values = [v if (v := regs[o]) != prev[o] else None for o in block.offsets]
        out.add_run(block.run_keys, values, now, mono, n - values.count(None))

    def _decode(self, block: Block, regs: list[int], now: float, *, changed_only: bool = False) -> list[Sample]:
        mono = time.monotonic()  # one reading of the block: one receive time for all its tags
        regs = list(regs[: block.count])
        prev: list[int] | None = None
        every = block.every
        if changed_only:
            prev = self._changed(block, regs, mono)
            if prev is not None and regs == prev and not every:
                return []
        if block.direct:  # plain uint16 registers only (the common counter block): one comprehension
            keyed = zip(block.run_keys, block.offsets)
            if prev is None:
                return [Sample(k, regs[o], True, now, None, "Good", mono) for k, o in keyed]
            return [Sample(k, v, True, now, None, "Good", mono) for i, (k, o) in enumerate(keyed)
                    if (v := regs[o]) != prev[o] or i in every]
        raw = b"" if block.bits else struct.pack(f">{block.count}H", *regs)
        out = []
        for slot in block.slots:
            o = slot.offset
            if prev is not None and not slot.every:
                n = slot.count
                if (regs[o] == prev[o]) if n == 1 else (regs[o:o + n] == prev[o:o + n]):
                    continue
            if slot.direct:
                out.append(Sample(slot.key, regs[o], True, now, None, "Good", mono))
                continue
            try:
                out.append(Sample(slot.key, slot.decode(raw, regs), True, now, None, "Good", mono))
            except Exception as exc:  # cannot happen with valid registers; never let one tag kill the poll
                out.append(Sample(slot.key, None, False, now, None, f"ReadFailed: decode error {exc}"))
        return out

    def _hand_on(self, samples: list[Sample]) -> None:
        """Hand the good readings of tags whose every value counts (reset-on-read, delta) that a one-shot read took
        and does not return to the sink, as a poll's (marked ``reread``: a delta register, which the device does not
        clear, is counted by the poll instead; a reset-on-read one counts)."""
        every = self._every_keys
        out = [dataclasses.replace(s, reread=True) for s in samples if s.good and s.key in every]
        if out:
            try:
                self.sink(out)
            except Exception:  # noqa: BLE001 - as a poll's: logged, the read goes on
                log.exception("modbus.sink_failed", connector=self.id, samples=len(out))

    @staticmethod
    def _failed(block: Block, error: str, now: float) -> list[Sample]:
        status = f"ReadFailed: {error}"
        return [Sample(s.key, None, False, now, None, status) for s in block.slots]

    def _split(self, block: Block) -> None:
        """The device refused a block spanning unused registers: read its tags in gap-free blocks from now on."""
        if block not in self.blocks:
            return
        parts = plan_blocks([TagBinding(s.key, s.tag, every_value=s.every) for s in block.slots],
                            self.config.max_block_registers, 0,
                            self.config.max_block_bits)
        i = self.blocks.index(block)
        self.blocks[i : i + 1] = parts
        for part in parts:
            for s in part.slots:
                self._block_of[s.key] = part
        self.status.detail["blocks"] = len(self.blocks)
        log.warning(
            "modbus.block_split",
            connector=self.id,
            endpoint=self.endpoint,
            block=block.name,
            into=[p.name for p in parts],
            reason="device refused the unused registers inside the block (ILLEGAL ADDRESS)",
        )

    def _report(self, errors: dict[str, str], blocks: dict[str, Block]) -> None:
        """Status and logs from one poll's block errors; logs only changes (an outage once, recovery once)."""
        new = {name: err for name, err in errors.items() if name not in self._failing}
        live = {blk.name for blk in self.blocks}
        recovered = [name for name in self._failing if name not in errors and name in live]
        self._failing = dict(errors)  # a block replaced by a split is neither failing nor recovered
        if new:
            # the device answered (exception responses): each block's failure is news of its own, with its function
            # code, address and exception; the connection lost: one line for the outage, not one per block
            lines = list(new.items()) if self._client is not None else [next(iter(new.items()))]
            for name, error in lines:
                blk = blocks.get(name)
                log.error(
                    "modbus.read_failed",
                    connector=self.id,
                    endpoint=self.endpoint,
                    unit=self.config.unit_id,
                    function_code=blk.function_code if blk else None,
                    address=blk.start if blk else None,
                    count=blk.count if blk else None,
                    blocks=[name] if self._client is not None else sorted(new),
                    error=error,
                )
        if self._client is None:
            self.status.set(ComponentState.DISCONNECTED, self._down_reason)
        elif errors:
            self.status.set(ComponentState.DEGRADED, next(iter(errors.values())))
        else:
            self.status.set(ComponentState.CONNECTED)
        if recovered:
            # back to CONNECTED: the outage's length as status has it (one clock reading); still degraded by other
            # blocks: the outage so far
            down = self.status.downtime_s if self.status.state == ComponentState.CONNECTED else self.status.down_for()
            log.info("modbus.recovered", connector=self.id, endpoint=self.endpoint, blocks=sorted(recovered),
                     downtime_s=down)

    # ------------------------------------------------------------------ one-shot read

    async def read(self, keys: Sequence[str], timeout: float = 2.0) -> list[Sample]:
        unknown = [k for k in keys if k not in self._block_of]
        if unknown:
            raise ReadFailed(f"unknown tag keys {unknown}", connector=self.id, endpoint=self.endpoint, tag=unknown[0])
        client = self._client
        if client is None or not client.connected:
            raise ConnectorUnavailable(
                f"not connected ({self._down_reason})", connector=self.id, endpoint=self.endpoint
            )
        blocks: list[Block] = []
        for k in keys:
            blk = self._block_of[k]
            if blk not in blocks:
                blocks.append(blk)

        wanted = set(keys)

        async def read_all() -> dict[str, Sample]:
            by_key: dict[str, Sample] = {}
            try:
                for blk in blocks:
                    try:
                        regs = await self._read_block(client, blk)
                    except _LinkError as exc:
                        self._drop(client, str(exc))
                        raise ConnectorUnavailable(
                            f"read of {blk.name} failed: {exc}", connector=self.id, endpoint=self.endpoint
                        ) from exc
                    except _BlockError as exc:  # the device answered: not-good samples, like a BAD OPC UA value
                        batch = self._failed(blk, str(exc), time.time())
                    else:
                        batch = self._decode(blk, regs, time.time())
                    by_key.update((s.key, s) for s in batch)
            except BaseException:
                # the attempt fails (a later block, the timeout): the reset-on-read registers it read were cleared
                # by that read, their values are the only copy
                self._hand_on([s for s in by_key.values()])
                raise
            # the block also held tags of other machines: those the device cleared count too
            self._hand_on([s for k, s in by_key.items() if k not in wanted])
            return by_key

        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                by_key = await read_all()
            self.observe_read("read", time.monotonic() - started)
        except asyncio.TimeoutError as exc:
            self._drop(client, f"read timed out after {timeout}s")
            raise ConnectorUnavailable(
                f"read timed out after {timeout}s", connector=self.id, endpoint=self.endpoint
            ) from exc
        return [by_key[k] for k in keys]
