"""Reader for pcapng captures (the Wireshark / dumpcap format).

A pcapng file is a run of sections, each opened by a Section Header Block
(SHB) that fixes the byte order of the blocks after it; a file may hold several
sections of different byte order (``mergecap``, ``cat`` of captures).  Within a
section, Interface Description Blocks (IDB) declare the interfaces, each with
its own link type, snaplen and timestamp resolution (``if_tsresol``, power of 10
or power of 2) and offset (``if_tsoffset``).  Packets come in

* Enhanced Packet Blocks (EPB, the usual kind),
* Simple Packet Blocks (SPB): interface 0, no timestamp.  They get the timestamp
  of the packet before them in the file (0 when there is none), so that flows
  stay in time order instead of jumping to 1970;
* obsolete Packet Blocks (type 2), still written by some tools.

Every other block (NRB name resolution, ISB interface statistics, DSB
decryption secrets, CB custom blocks, SJE systemd journal entries and unknown
types) carries no packet and is skipped; :attr:`CaptureInfo.skipped_blocks`
counts them by those abbreviations, unknown types as ``unknown``.

Timestamps are converted to nanoseconds with integer arithmetic only:
``ticks * 10**9 // ticks_per_second + if_tsoffset * 10**9`` (rounded down).
Values beyond int64 nanoseconds (after the year 2262) are clamped.

Like the pcap reader, this one walks runs of EPBs with one ``struct`` call per
block and checks and decodes them with numpy once per chunk.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterator
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from egressd.model import RecordBatch
from egressd.sources.base import CaptureError, CaptureInfo
from egressd.sources.pcap import (
    DEFAULT_BATCH_RECORDS,
    DEFAULT_CHUNK_BYTES,
    MAX_RECORD_BYTES,
    ByteSource,
    ChunkedInput,
    ChunkWalker,
    gather_u32,
    int64_array,
    read_head,
)

__all__ = ["PCAPNG_MAGIC", "Interface", "PcapngReader"]

PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"
"""The first four bytes of a pcapng file (the SHB block type)."""

SHB: Final = 0x0A0D0D0A
IDB: Final = 1
PB: Final = 2
SPB: Final = 3
EPB: Final = 6

_BYTE_ORDERS: Final = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}

_SKIPPED_NAMES: Final = {
    4: "NRB",
    5: "ISB",
    9: "SJE",
    10: "DSB",
    0x00000BAD: "CB",
    0x40000BAD: "CB",
}

_KIND: Final = {
    SHB: "section header block",
    IDB: "interface description block",
    PB: "packet block",
    SPB: "simple packet block",
    EPB: "enhanced packet block",
    4: "name resolution block",
    5: "interface statistics block",
    9: "systemd journal export block",
    10: "decryption secrets block",
    0x00000BAD: "custom block",
    0x40000BAD: "custom block",
}

# Smallest valid total length per block type (header, fixed fields, trailer).
_MIN_LEN: Final = {SHB: 28, IDB: 20, PB: 32, SPB: 16, EPB: 32}

_SHORT_RUN: Final = 8
"""Runs of at most this many EPBs are checked one by one rather than with numpy."""

_OPT_IF_TSRESOL: Final = 9
_OPT_IF_TSOFFSET: Final = 14

_NS: Final = 1_000_000_000
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


_RUN_HEAD: Final = {order: struct.Struct(order + "II").unpack_from for order in "<>"}


def _kind(btype: int) -> str:
    return _KIND.get(btype, f"block of type 0x{btype:08x}")


class Interface(NamedTuple):
    """One interface (IDB) as the reader uses it."""

    linktype: int
    snaplen: int
    ticks_per_second: int
    """From ``if_tsresol``; 10**6 when the option is absent."""
    offset_seconds: int
    """``if_tsoffset``; 0 when absent."""


class _Damage(Exception):
    """Internal: a block is unreadable; the message says what and where."""


def ticks_to_ns(ticks: U64, ticks_per_second: int, offset_seconds: I64 | None = None) -> I64:
    """Convert raw pcapng timestamps to int64 nanoseconds since the epoch.

    ``ns = ticks * 10**9 // ticks_per_second + offset_seconds * 10**9``, exact
    and rounded down.  numpy does it for the usual resolutions (up to 2**33
    ticks per second) when nothing can overflow; otherwise Python integers do,
    and results beyond int64 are clamped.  ``offset_seconds`` is per record.
    """
    count = ticks.shape[0]
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    units = ticks_per_second
    lo_off = hi_off = 0
    if offset_seconds is not None:
        lo_off = int(offset_seconds.min()) * _NS
        hi_off = int(offset_seconds.max()) * _NS
    if units <= (1 << 33) and lo_off >= _INT64_MIN and hi_off <= _INT64_MAX:
        u = np.uint64(units)
        sec = ticks // u
        top = int(sec.max()) * _NS + _NS
        if top + max(hi_off, 0) <= _INT64_MAX:
            # frac < units <= 2**33, so frac * 10**9 fits in uint64
            frac = ticks - sec * u
            ns = sec.astype(np.int64) * _NS + ((frac * np.uint64(_NS)) // u).astype(np.int64)
            if offset_seconds is not None and (lo_off or hi_off):
                ns += offset_seconds * _NS
            return ns
    offs = [0] * count if offset_seconds is None else offset_seconds.tolist()
    values = [
        min(max((t * _NS) // units + o * _NS, _INT64_MIN), _INT64_MAX)
        for t, o in zip(ticks.tolist(), offs, strict=True)
    ]
    return np.array(values, dtype=np.int64)


class PcapngReader(ChunkWalker):
    """Reads a pcapng capture from a binary stream into record batches.

    The start of the first section header is read when the reader is made: a
    stream that does not start with a pcapng SHB (or whose SHB has no valid
    byte-order magic) raises :class:`CaptureError`, an empty one "empty file".
    Any damage after that never raises; :meth:`batches` stops at it and says
    what and at which byte offset in :attr:`info` (``truncated``, ``damage``):
    a block length that is not a multiple of 4, below the block type's minimum,
    over 256 MiB or running past the end of the file; a trailing length that
    differs from the leading one; a packet longer than its block; a packet for
    an interface the section has not described; an option running past its
    block (SHB and IDB); an unsupported SHB version.

    ``header`` holds bytes a format sniffer already took from ``f``.  Batches
    hold up to ``batch_records`` records and end where an input chunk
    (``chunk_bytes``) ends; records of different interfaces mix in a batch
    (``RecordBatch.linktypes`` is per record).  After damage the rest of ``f``
    is read and discarded, so that a hashing wrapper sees the whole file.
    Offsets count from the start of the (decompressed) stream.
    """

    def __init__(
        self,
        f: ByteSource,
        *,
        batch_records: int = DEFAULT_BATCH_RECORDS,
        header: bytes = b"",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if batch_records < 1:
            raise ValueError("batch_records must be at least 1")
        self._input = ChunkedInput(f, header)
        self._batch_records = batch_records
        self._chunk_bytes = max(int(chunk_bytes), 64)
        self._used = False
        self.info = CaptureInfo(format="pcapng")
        self.interfaces: list[Interface] = []
        """Every interface of the file, all sections, in file order."""
        self.sections = 0
        """Section headers read so far."""
        self._order: str | None = None
        self._section_base = 0  # index in self.interfaces of the section's interface 0
        self._last_ts = 0
        self._linktype_table = np.zeros(0, dtype=np.uint16)
        self._unit_table = np.zeros(0, dtype=np.int64)
        self._offset_table = np.zeros(0, dtype=np.int64)
        self._resolutions: list[int] = []
        self._any_offset = False

        head = read_head(self._input, 12)
        if head[:4] != PCAPNG_MAGIC:
            raise CaptureError(f"not a pcapng capture (starts with 0x{head[:4].hex()})")
        if len(head) >= 12 and head[8:12] not in _BYTE_ORDERS:
            raise CaptureError(
                f"not a pcapng capture: the section header's byte-order magic is "
                f"0x{head[8:12].hex()}, not 1a2b3c4d in either byte order"
            )
        self._head = head

    def batches(self) -> Iterator[RecordBatch]:
        """Yield the records as batches, in file order; can be iterated once."""
        if self._used:
            raise RuntimeError("PcapngReader.batches() can only be iterated once")
        self._used = True
        yield from self._drive(self._head)

    # -- block framing --------------------------------------------------------

    def _block_length(self, buf: bytes, pos: int, offset: int) -> int:
        """Total length of the block at ``pos`` (12 bytes must be there); raises _Damage."""
        btype = struct.unpack_from("<I", buf, pos)[0]  # SHB type reads the same both ways
        if btype == SHB:
            order = _BYTE_ORDERS.get(bytes(buf[pos + 8 : pos + 12]))
            if order is None:
                raise _Damage(
                    f"section header block at offset {offset}: byte-order magic "
                    f"0x{bytes(buf[pos + 8 : pos + 12]).hex()} is not 1a2b3c4d"
                )
        elif self._order is None:
            raise _Damage(f"block at offset {offset} comes before any section header block")
        else:
            order = self._order
            btype = struct.unpack_from(order + "I", buf, pos)[0]
        length: int = struct.unpack_from(order + "I", buf, pos + 4)[0]
        what = f"{_kind(btype)} at offset {offset}: block length {length}"
        if length % 4:
            raise _Damage(f"{what} is not a multiple of 4")
        if length < _MIN_LEN.get(btype, 12):
            raise _Damage(f"{what} is less than the minimum {_MIN_LEN.get(btype, 12)}")
        if length > MAX_RECORD_BYTES:
            raise _Damage(f"{what} exceeds {MAX_RECORD_BYTES}")
        return length

    def _record_size(self, head: bytes, offset: int) -> int:
        try:
            return self._block_length(head, 0, offset)
        except _Damage as exc:
            self._set_damage(str(exc))
            return -1

    def _cut_message(self, tail: bytes, offset: int) -> str:
        kind = "block"
        total = ""
        if len(tail) >= 4:
            order = self._order or "<"
            btype = struct.unpack_from(order + "I", tail, 0)[0]
            kind = _kind(btype)
            if len(tail) >= 12:
                order = _BYTE_ORDERS.get(tail[8:12], order) if btype == SHB else order
                total = f" of {struct.unpack_from(order + 'I', tail, 4)[0]}"
        return f"file ends inside the {kind} at offset {offset} ({len(tail)}{total} bytes)"

    # -- walking a chunk ------------------------------------------------------

    def _walk_buffer(self, buf: bytes, base: int, pos: int) -> Generator[RecordBatch, None, int]:
        n = len(buf)
        segments: list[tuple[I64, I64, I64, I64, U64, npt.NDArray[np.bool_]]] = []
        scalar: list[tuple[int, int, int, int, int, bool]] = []
        damage: str | None = None
        struct_error = struct.error

        while True:
            order = self._order
            if order is not None:
                # The hot loop: a run of EPBs.  It stops at any other block, at
                # an EPB too short to be valid, or where the buffer ends.
                head = _RUN_HEAD[order]
                starts: list[int] = []
                append = starts.append
                p = pos
                try:
                    while True:
                        btype, length = head(buf, p)
                        if btype != EPB or length < 32:
                            break
                        append(p)
                        p += length
                except struct_error:
                    if starts and p > n:
                        p = starts.pop()
                if len(starts) > _SHORT_RUN:
                    if scalar:
                        segments.append(_scalar_segment(scalar))
                        scalar = []
                    seg, bad, damage = self._epb_segment(buf, order, starts, base)
                    if seg is not None:
                        segments.append(seg)
                    if damage is not None:
                        pos = starts[bad]
                        break
                    pos = p
                # else: numpy costs more than it saves on a few blocks, so the
                # blocks from pos on are checked one by one below.
            if n - pos < 12:
                break
            try:
                length = self._block_length(buf, pos, base + pos)
                if pos + length > n:
                    break
                record = self._block(buf, pos, length, base + pos)
            except _Damage as exc:
                damage = str(exc)
                break
            if record is not None:
                scalar.append(record)
            pos += length

        if scalar:
            segments.append(_scalar_segment(scalar))
        if segments:
            yield from self._emit(buf, segments)
        if damage is not None:
            self._set_damage(damage)
            return -1
        return pos

    def _epb_segment(
        self, buf: bytes, order: str, starts: list[int], base: int
    ) -> tuple[tuple[I64, I64, I64, I64, U64, npt.NDArray[np.bool_]] | None, int, str | None]:
        """Check a run of complete EPBs; keep those before the first bad one."""
        positions = int64_array(starts)
        w = gather_u32(buf, order, positions, 7)
        length = w[:, 1]
        ifid = w[:, 2]
        caplen = w[:, 5]
        trailer = gather_u32(buf, order, positions + length - 4, 1)[:, 0]
        nif = len(self.interfaces) - self._section_base
        bad_len = (length & 3) != 0
        bad_if = ifid >= nif
        bad_cap = caplen > length - 32
        bad_trail = trailer != length
        bad = bad_len | bad_if | bad_cap | bad_trail
        damage: str | None = None
        k = len(starts)
        if bad.any():
            k = int(np.argmax(bad))
            where = f"enhanced packet block at offset {base + starts[k]}"
            if bad_len[k]:
                damage = f"{where}: block length {int(length[k])} is not a multiple of 4"
            elif bad_trail[k]:
                damage = (
                    f"{where}: trailing block length {int(trailer[k])} differs from "
                    f"{int(length[k])}"
                )
            elif bad_if[k]:
                damage = (
                    f"{where}: interface id {int(ifid[k])} has no interface description "
                    f"block (the section has {nif})"
                )
            else:
                damage = (
                    f"{where}: captured length {int(caplen[k])} exceeds the block "
                    f"length {int(length[k])}"
                )
            if k == 0:
                return None, 0, damage
            positions, w = positions[:k], w[:k]
        ticks = (w[:, 3].astype(np.uint64) << np.uint64(32)) | w[:, 4].astype(np.uint64)
        seg = (
            positions + 28,
            np.ascontiguousarray(w[:, 5]),
            np.ascontiguousarray(w[:, 6]),
            w[:, 2] + self._section_base,
            ticks,
            np.zeros(positions.shape[0], dtype=np.bool_),
        )
        return seg, k, damage

    def _block(
        self, buf: bytes, pos: int, length: int, offset: int
    ) -> tuple[int, int, int, int, int, bool] | None:
        """Handle one complete block other than a run of EPBs; a packet comes back as
        ``(data offset, caplen, wirelen, interface index, ticks, has_no_timestamp)``."""
        btype = struct.unpack_from("<I", buf, pos)[0]
        if btype == SHB:
            order = _BYTE_ORDERS[bytes(buf[pos + 8 : pos + 12])]
        else:
            assert self._order is not None
            order = self._order
            btype = struct.unpack_from(order + "I", buf, pos)[0]
        trailer = struct.unpack_from(order + "I", buf, pos + length - 4)[0]
        where = f"{_kind(btype)} at offset {offset}"
        if trailer != length:
            raise _Damage(f"{where}: trailing block length {trailer} differs from {length}")
        end = pos + length - 4  # end of the block body (options)

        if btype == SHB:
            major, minor = struct.unpack_from(order + "HH", buf, pos + 12)
            if major != 1:
                raise _Damage(f"{where}: unsupported pcapng version {major}.{minor}")
            _options(buf, pos + 24, end, order, where)
            self._order = order
            self._section_base = len(self.interfaces)
            self.sections += 1
            return None
        if btype == IDB:
            linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, pos + 8)
            units = 1_000_000
            tsoffset = 0
            for code, value in _options(buf, pos + 16, end, order, where):
                if code == _OPT_IF_TSRESOL and len(value) >= 1:
                    exp = value[0] & 0x7F
                    units = 2**exp if value[0] & 0x80 else 10**exp
                elif code == _OPT_IF_TSOFFSET and len(value) >= 8:
                    tsoffset = struct.unpack_from(order + "q", value, 0)[0]
            self.interfaces.append(Interface(linktype, snaplen, units, tsoffset))
            self.info.link_types.add(linktype)
            return None
        nif = len(self.interfaces) - self._section_base
        if btype in (EPB, PB):
            if btype == EPB:
                ifid, hi, lo, caplen, wirelen = struct.unpack_from(order + "5I", buf, pos + 8)
            else:
                ifid, _, hi, lo, caplen, wirelen = struct.unpack_from(order + "HH4I", buf, pos + 8)
            if ifid >= nif:
                raise _Damage(
                    f"{where}: interface id {ifid} has no interface description block "
                    f"(the section has {nif})"
                )
            if caplen > length - 32:
                raise _Damage(
                    f"{where}: captured length {caplen} exceeds the block length {length}"
                )
            return (pos + 28, caplen, wirelen, self._section_base + ifid, (hi << 32) | lo, False)
        if btype == SPB:
            if nif == 0:
                raise _Damage(f"{where}: the section has no interface description block")
            wirelen = struct.unpack_from(order + "I", buf, pos + 8)[0]
            caplen = min(wirelen, length - 16)
            snaplen = self.interfaces[self._section_base].snaplen
            if snaplen:
                caplen = min(caplen, snaplen)
            return (pos + 12, caplen, wirelen, self._section_base, 0, True)
        name = _SKIPPED_NAMES.get(btype, "unknown")
        skipped = self.info.skipped_blocks
        skipped[name] = skipped.get(name, 0) + 1
        return None

    # -- batches --------------------------------------------------------------

    def _refresh_tables(self) -> None:
        """Per-interface arrays (link type, resolution, offset) for numpy lookups."""
        ifaces = self.interfaces
        if self._linktype_table.shape[0] == len(ifaces):
            return
        resolutions: dict[int, int] = {}
        unit_ids = [resolutions.setdefault(i.ticks_per_second, len(resolutions)) for i in ifaces]
        self._resolutions = list(resolutions)
        self._linktype_table = np.array([i.linktype for i in ifaces], dtype=np.uint16)
        self._unit_table = np.array(unit_ids, dtype=np.int64)
        self._offset_table = np.array([i.offset_seconds for i in ifaces], dtype=np.int64)
        self._any_offset = bool(self._offset_table.any())

    def _timestamps(self, gif: I64, ticks: U64) -> I64:
        """Nanosecond timestamps for records of interfaces ``gif``, grouped by resolution
        (a handful per file, whatever the number of interfaces)."""
        uid = self._unit_table[gif]
        offs = self._offset_table[gif] if self._any_offset else None
        first = int(uid[0])
        if int(uid.min()) == first == int(uid.max()):
            return ticks_to_ns(ticks, self._resolutions[first], offs)
        ts = np.empty(gif.shape[0], dtype=np.int64)
        order = np.argsort(uid, kind="stable")
        cuts = np.flatnonzero(np.diff(uid[order])) + 1
        for group in np.split(order, cuts):
            units = self._resolutions[int(uid[group[0]])]
            ts[group] = ticks_to_ns(ticks[group], units, None if offs is None else offs[group])
        return ts

    def _emit(
        self,
        buf: bytes,
        segments: list[tuple[I64, I64, I64, I64, U64, npt.NDArray[np.bool_]]],
    ) -> Iterator[RecordBatch]:
        if len(segments) == 1:
            offsets, caplens, wirelens, gif, ticks, notime = segments[0]
        else:
            offsets = np.concatenate([s[0] for s in segments])
            caplens = np.concatenate([s[1] for s in segments])
            wirelens = np.concatenate([s[2] for s in segments])
            gif = np.concatenate([s[3] for s in segments])
            ticks = np.concatenate([s[4] for s in segments])
            notime = np.concatenate([s[5] for s in segments])
        count = offsets.shape[0]
        self._refresh_tables()
        ts = self._timestamps(gif, ticks)
        if notime.any():
            # Simple Packet Blocks take the timestamp of the packet before them.
            idx = np.where(notime, 0, np.arange(1, count + 1, dtype=np.int64))
            np.maximum.accumulate(idx, out=idx)
            ts = np.concatenate((np.array([self._last_ts], dtype=np.int64), ts))[idx]
        self._last_ts = int(ts[-1])
        linktypes = self._linktype_table[gif]
        data = np.frombuffer(buf, dtype=np.uint8)
        step = self._batch_records
        info = self.info
        for i in range(0, count, step):
            j = min(i + step, count)
            info.packets += j - i
            yield RecordBatch(
                data, offsets[i:j], caplens[i:j], wirelens[i:j], ts[i:j], linktypes[i:j]
            )


def _scalar_segment(
    records: list[tuple[int, int, int, int, int, bool]],
) -> tuple[I64, I64, I64, I64, U64, npt.NDArray[np.bool_]]:
    cols = list(zip(*records, strict=True))
    return (
        np.array(cols[0], dtype=np.int64),
        np.array(cols[1], dtype=np.int64),
        np.array(cols[2], dtype=np.int64),
        np.array(cols[3], dtype=np.int64),
        np.array(cols[4], dtype=np.uint64),
        np.array(cols[5], dtype=np.bool_),
    )


def _options(buf: bytes, start: int, end: int, order: str, where: str) -> list[tuple[int, bytes]]:
    """The options between ``start`` and ``end``; one running past ``end`` is damage."""
    out: list[tuple[int, bytes]] = []
    head = struct.Struct(order + "HH").unpack_from
    p = start
    while p + 4 <= end:
        code, size = head(buf, p)
        if code == 0:
            break
        if p + 4 + size > end:
            raise _Damage(f"{where}: option {code} of length {size} runs past the end of the block")
        out.append((code, bytes(buf[p + 4 : p + 4 + size])))
        p += 4 + ((size + 3) & ~3)
    return out
