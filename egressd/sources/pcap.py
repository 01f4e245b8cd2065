"""Reader for classic pcap files (the libpcap / tcpdump savefile format).

Handles both byte orders, microsecond (``a1b2c3d4``) and nanosecond
(``a1b23c4d``) timestamps, and the "modified" pcap written by some patched
libpcaps (``a1b2cd34``, 24-byte record headers).  The link type is the low 16
bits of the header's link-type word: the upper bits carry FCS information that
the pipeline does not need.

The reader takes the input in large chunks and walks the 16-byte record
headers with one ``struct`` call per record; everything else (timestamps,
lengths) is computed with numpy once per batch, so a batch costs a few hundred
nanoseconds per record in Python.  The packet bytes are never copied out of the
chunk: a batch's ``data`` is a read-only view of it.

This module also holds the input plumbing that the pcapng reader shares:
:class:`ByteSource` (what a reader accepts) and :class:`ChunkedInput`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Generator, Iterator
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from egressd.model import RecordBatch
from egressd.sources.base import CaptureError, CaptureInfo
from egressd.sources.inputs import READ_CHUNK_BYTES

__all__ = [
    "DEFAULT_BATCH_RECORDS",
    "DEFAULT_CHUNK_BYTES",
    "MAX_RECORD_BYTES",
    "PCAP_MAGICS",
    "ByteSource",
    "ChunkWalker",
    "ChunkedInput",
    "PcapReader",
]

DEFAULT_BATCH_RECORDS: Final = 65536
DEFAULT_CHUNK_BYTES: Final = READ_CHUNK_BYTES
"""How much a reader asks its input for at a time (16 MiB, the read-ahead's piece:
measured, batches of this size cost less per packet than smaller or larger ones)."""
MAX_RECORD_BYTES: Final = 256 << 20
"""No record or block larger than this is believed, whatever the file header says."""
TYPICAL_MAX_CAPLEN: Final = 262144
"""libpcap's largest snapshot length; real tools write records up to this size
even when the file header announces a smaller snaplen."""

PCAP_HEADER_LEN: Final = 24

# magic bytes as they appear in the file -> (struct byte order, nanosecond, record header length)
PCAP_MAGICS: Final[dict[bytes, tuple[str, bool, int]]] = {
    b"\xd4\xc3\xb2\xa1": ("<", False, 16),
    b"\xa1\xb2\xc3\xd4": (">", False, 16),
    b"\x4d\x3c\xb2\xa1": ("<", True, 16),
    b"\xa1\xb2\x3c\x4d": (">", True, 16),
    b"\x34\xcd\xb2\xa1": ("<", False, 24),
    b"\xa1\xb2\xcd\x34": (">", False, 24),
}

I64 = npt.NDArray[np.int64]

# What a decompressing stream (gzip) raises when its compressed bytes are damaged.
_STREAM_ERRORS: Final = (EOFError, zlib.error, gzip.BadGzipFile)


class ByteSource(Protocol):
    """What the readers accept: anything with a binary ``read``.

    Open files, ``BytesIO``, ``gzip.GzipFile``, ``sys.stdin.buffer`` and
    :class:`~egressd.sources.files.HashingReader` all qualify.  The readers
    never seek, so pipes work.
    """

    def read(self, size: int = -1, /) -> bytes: ...


class ChunkedInput:
    """Reads a byte source in large pieces, first handing out bytes a sniffer already read.

    Keeps count of the bytes handed out, so readers can name absolute offsets in
    their damage messages, and can drain the rest of the input when a reader stops
    early (so that a hashing wrapper underneath sees every byte of the file).
    A source that fails to decompress (a damaged gzip file) does not raise here:
    the input ends where the failure happened and :attr:`error` says why.
    """

    __slots__ = ("_f", "_prefix", "eof", "error", "offset")

    def __init__(self, f: ByteSource, prefix: bytes = b"") -> None:
        self._f = f
        self._prefix = bytes(prefix)
        self.eof = False
        """True once the source returned end of input (or failed)."""
        self.error: str | None = None
        """Why the source failed, when it did."""
        self.offset = 0
        """Bytes handed out so far (the offset of the next byte)."""

    def read(self, size: int, at_least: int | None = None) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the input.

        With ``at_least``, fewer also once that many are in hand: a source that
        hands out its input in large pieces (a read-ahead) then has its pieces
        passed on as they are, instead of copied together to fill ``size``.
        """
        need = size if at_least is None else max(1, min(at_least, size))
        parts: list[bytes] = []
        got = 0
        if self._prefix:
            part = self._prefix[:size]
            self._prefix = self._prefix[size:]
            parts.append(part)
            got = len(part)
        # read1 where there is one: a gzip stream that fails part-way through
        # then still hands out what it decompressed before the failure.
        read = getattr(self._f, "read1", None) or self._f.read
        while got < need and not self.eof:
            try:
                part = read(min(size - got, MAX_RECORD_BYTES))
            except _STREAM_ERRORS as exc:
                self.eof = True
                self.error = f"{type(exc).__name__}: {exc}"
                break
            if not part:
                self.eof = True
                break
            parts.append(part)
            got += len(part)
        self.offset += got
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def drain(self) -> None:
        """Read and discard the rest of the input.

        When a decompressing source has failed, the compressed file underneath
        (the ``fileobj`` of a ``gzip.GzipFile``) is drained instead.
        """
        self._prefix = b""
        f = self._f
        failed = self.error is not None
        if not failed:
            try:
                while f.read(DEFAULT_CHUNK_BYTES):
                    pass
            except _STREAM_ERRORS:
                failed = True
        if failed:
            inner = getattr(f, "fileobj", None)
            if inner is not None:
                while inner.read(DEFAULT_CHUNK_BYTES):
                    pass
        self.eof = True


def gather_u32(buf: bytes, order: str, positions: I64, nfields: int) -> I64:
    """The ``nfields`` unsigned 32-bit words starting at each of ``positions`` in ``buf``.

    Record headers sit at arbitrary byte offsets; numpy copies them out of an
    overlapping view with one item per byte offset.  Every position must have
    ``4 * nfields`` bytes after it.  Returns a ``(len(positions), nfields)`` int64 array.
    """
    size = 4 * nfields
    count = positions.shape[0]
    if count == 0:
        return np.empty((0, nfields), dtype=np.int64)
    # One overlapping item of `size` bytes at every byte offset (a view, no copy).
    items = np.ndarray(shape=(len(buf) - size + 1,), dtype=f"V{size}", buffer=buf, strides=(1,))
    words = items[positions].view(order + "u4").reshape(count, nfields)
    return words.astype(np.int64)


def int64_array(values: list[int]) -> I64:
    """``values`` as an int64 array; packing them with struct beats ``np.array`` on a list."""
    return np.frombuffer(struct.pack(f"{len(values)}q", *values), dtype=np.int64)


def read_head(inp: ChunkedInput, size: int) -> bytes:
    """The first ``size`` bytes of the input (fewer if it is shorter); empty input raises."""
    head = inp.read(size)
    if not head:
        if inp.error is not None:
            raise CaptureError(f"input unreadable: {inp.error}")
        raise CaptureError("empty file")
    return head


class ChunkWalker:
    """What the pcap and pcapng readers share: reading the input chunk by chunk.

    A subclass walks the complete records of one chunk (:meth:`_walk_buffer`)
    and says how long a record is from its first bytes (:meth:`_record_size`).
    Packet bytes are never copied out of a chunk, except for the one record that
    straddles two chunks: it is put together on its own and walked as a chunk of
    one record, so every batch's ``data`` is a single buffer.
    """

    info: CaptureInfo
    _input: ChunkedInput
    _chunk_bytes: int
    _batch_records: int
    _size_head = 12
    """Bytes of a record needed to know its size."""

    def _set_damage(self, what: str) -> None:
        self.info.truncated = True
        self.info.damage = what

    def _record_size(self, head: bytes, offset: int) -> int:
        """Size of the record whose first bytes are ``head``; -1 (and damage set) if absurd."""
        raise NotImplementedError

    def _cut_message(self, tail: bytes, offset: int) -> str:
        """What to say when the input ends after ``tail``, a record's first bytes."""
        raise NotImplementedError

    def _walk_buffer(self, buf: bytes, base: int, pos: int) -> Generator[RecordBatch, None, int]:
        """Yield the records of ``buf`` from ``pos``; return where the first incomplete
        one starts, or -1 after setting damage.  ``base`` is the stream offset of ``buf[0]``."""
        raise NotImplementedError

    def _drive(self, buf: bytes) -> Iterator[RecordBatch]:
        """Walk the whole input; ``buf`` holds bytes already read (stream offsets end at
        ``self._input.offset``)."""
        inp = self._input
        chunk = self._chunk_bytes
        need_head = self._size_head
        base = inp.offset - len(buf)
        pos = 0
        if buf:
            pos = yield from self._walk_buffer(buf, base, 0)
        while pos >= 0:
            tail_len = len(buf) - pos
            want = chunk
            if tail_len >= need_head:
                size = self._record_size(buf[pos : pos + need_head], base + pos)
                if size < 0:
                    break
                want = max(want, size - tail_len)
            if inp.eof:
                if inp.error is not None:
                    self._set_damage(f"input unreadable after offset {inp.offset}: {inp.error}")
                elif tail_len:
                    self._set_damage(self._cut_message(buf[pos:], base + pos))
                break
            # Pieces of at least half a chunk are walked as the source gives them
            # (no copy); a record longer than that is read whole.
            more = inp.read(want, at_least=chunk // 2 if want == chunk else want)
            more_base = inp.offset - len(more)
            if tail_len:
                tail = buf[pos:]
                head = tail if tail_len >= need_head else tail + more[: need_head - tail_len]
                if len(head) < need_head:
                    buf, base, pos = tail + more, base + pos, 0
                    continue
                size = self._record_size(head[:need_head], base + pos)
                if size < 0:
                    break
                k = size - tail_len
                if k > len(more):
                    # a record larger than a chunk: grow the buffer until it is complete
                    buf, base, pos = tail + more, base + pos, 0
                    continue
                end = yield from self._walk_buffer(tail + more[:k], base + pos, 0)
                if end < 0:
                    break
                buf, base, pos = more, more_base, k
            else:
                buf, base, pos = more, more_base, 0
            pos = yield from self._walk_buffer(buf, base, pos)
        if self.info.truncated:
            inp.drain()


class PcapReader(ChunkWalker):
    """Reads a classic pcap capture from a binary stream into record batches.

    The file header is read when the reader is made: a stream that is not pcap
    raises :class:`CaptureError` then, before any record (an empty one with
    "empty file").  A stream cut inside the 24-byte file header is not an error
    but a truncated capture with no records.  Damage after that never raises;
    :meth:`batches` stops at it and says what and where in :attr:`info`
    (``truncated``, ``damage``).  A record whose captured length exceeds
    ``max(snaplen, 262144)`` (and never more than 256 MiB) is damage: real
    writers exceed a small snaplen up to libpcap's 262144, but not beyond.
    Records whose captured length exceeds their wire length are kept as they are.

    The version field is not checked: all writers use 2.4, and the rare other
    values (old test files, fuzzers) come with the same record layout.
    Nanosecond fractions of a second are taken as written even when they are out
    of range (1e9 or more).  Seconds are unsigned, as the format defines them.

    ``header`` holds bytes a format sniffer already took from ``f``; they are
    read first.  ``batch_records`` bounds the records per batch; a batch also
    ends where the reader's input chunk (``chunk_bytes``) ends.  When reading
    stops early because of damage, the rest of ``f`` is read and discarded, so a
    hashing wrapper sees the whole file.  Offsets in messages count from the
    start of the (decompressed) stream; record numbers count from 1.
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
        self.info = CaptureInfo(format="pcap")
        self.linktype = 0
        """Link type of every record (low 16 bits of the header's link-type word)."""
        self.snaplen = 0
        self.nanosecond = False
        self._caplen_limit = TYPICAL_MAX_CAPLEN

        head = read_head(self._input, PCAP_HEADER_LEN)
        magic = head[:4]
        if magic not in PCAP_MAGICS:
            raise CaptureError(f"not a pcap capture (starts with 0x{magic.hex()})")
        self._order, self.nanosecond, self._rec_len = PCAP_MAGICS[magic]
        self._caplen_at = struct.Struct(self._order + "8xI").unpack_from
        if len(head) < PCAP_HEADER_LEN:
            self._set_damage(
                f"input unreadable after offset {len(head)}: {self._input.error}"
                if self._input.error is not None
                else f"file ends inside the file header at offset {len(head)} "
                f"({len(head)} of {PCAP_HEADER_LEN} bytes)"
            )
            return
        snaplen, linkword = struct.unpack_from(self._order + "II", head, 16)
        self.snaplen = snaplen
        self.linktype = linkword & 0xFFFF
        self.info.link_types.add(self.linktype)
        self._caplen_limit = min(max(snaplen, TYPICAL_MAX_CAPLEN), MAX_RECORD_BYTES)

    def batches(self) -> Iterator[RecordBatch]:
        """Yield the records as batches, in file order; can be iterated once."""
        if self._used:
            raise RuntimeError("PcapReader.batches() can only be iterated once")
        self._used = True
        if self.info.truncated:
            self._input.drain()
            return
        yield from self._drive(b"")

    def _too_long(self, caplen: int, offset: int, record_no: int) -> str:
        return (
            f"record {record_no} at offset {offset}: "
            f"captured length {caplen} exceeds {self._caplen_limit}"
        )

    def _record_size(self, head: bytes, offset: int) -> int:
        caplen: int = self._caplen_at(head, 0)[0]
        if caplen > self._caplen_limit:
            self._set_damage(self._too_long(caplen, offset, self.info.packets + 1))
            return -1
        return self._rec_len + caplen

    def _cut_message(self, tail: bytes, offset: int) -> str:
        hl = self._rec_len
        have = len(tail)
        where = f"record {self.info.packets + 1} at offset {offset}"
        if have < hl:
            return f"file ends inside the header of {where} ({have} of {hl} bytes)"
        caplen = self._caplen_at(tail, 0)[0]
        return f"file ends inside the packet data of {where} ({have - hl} of {caplen} bytes)"

    def _walk_buffer(self, buf: bytes, base: int, pos: int) -> Generator[RecordBatch, None, int]:
        hl = self._rec_len
        caplen_at = self._caplen_at
        n = len(buf)
        # The hot loop: follow the captured lengths and remember where each record
        # starts.  It ends when a record header is not (fully) in the buffer, where
        # unpack_from raises.  Unrolled four times: the loop itself is a measurable
        # part of the few hundred nanoseconds a record costs here.
        starts: list[int] = []
        append = starts.append
        p = pos
        try:
            while True:
                append(p)
                p += caplen_at(buf, p)[0] + hl
                append(p)
                p += caplen_at(buf, p)[0] + hl
                append(p)
                p += caplen_at(buf, p)[0] + hl
                append(p)
                p += caplen_at(buf, p)[0] + hl
        except struct.error:
            pass
        # The last start has no readable header; when it lies past the end of the
        # buffer, the record before it is the incomplete one.
        pos = starts.pop()
        if pos > n:
            pos = starts.pop()
        if not starts:
            return pos

        info = self.info
        positions = int64_array(starts)
        words = gather_u32(buf, self._order, positions, 4)
        caplens = words[:, 2]
        damage: str | None = None
        bad = np.flatnonzero(caplens > self._caplen_limit)
        if bad.size:
            k = int(bad[0])
            pos = starts[k]
            damage = self._too_long(int(caplens[k]), base + pos, info.packets + k + 1)
            positions = positions[:k]
            words = words[:k]
        count = positions.shape[0]
        if count:
            data = np.frombuffer(buf, dtype=np.uint8)
            offsets = positions + hl
            caplens = np.ascontiguousarray(words[:, 2])
            wirelens = np.ascontiguousarray(words[:, 3])
            ts = words[:, 0] * 1_000_000_000 + words[:, 1] * (1 if self.nanosecond else 1000)
            linktypes = np.full(count, self.linktype, dtype=np.uint16)
            step = self._batch_records
            for i in range(0, count, step):
                j = min(i + step, count)
                info.packets += j - i
                yield RecordBatch(
                    data, offsets[i:j], caplens[i:j], wirelens[i:j], ts[i:j], linktypes[i:j]
                )
        if damage is not None:
            self._set_damage(damage)
            return -1
        return pos
