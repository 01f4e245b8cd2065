"""Opening capture streams: format sniffing and gzip.

:func:`open_capture` looks at the first bytes of a stream and hands it to the
right reader, so the command line accepts pcap, pcapng and gzip-compressed
captures alike, whatever their names say, and from a pipe as well as from a
file.  Which files to read and their digests: :mod:`egressd.sources.inputs`.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import Final

from egressd.sources.base import CaptureError, CaptureReader
from egressd.sources.pcap import DEFAULT_BATCH_RECORDS, PCAP_MAGICS, ByteSource, PcapReader
from egressd.sources.pcapng import PCAPNG_MAGIC, PcapngReader

__all__ = ["GZIP_MAGIC", "open_capture"]

GZIP_MAGIC: Final = b"\x1f\x8b"


def _read_upto(f: ByteSource, size: int) -> bytes:
    """Up to ``size`` bytes: short reads (pipes) are retried until end of input."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = f.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _Prefixed:
    """A stream whose first bytes were already read: gives them back, then the rest."""

    def __init__(self, prefix: bytes, f: ByteSource) -> None:
        self._prefix = prefix
        self._f = f

    def read(self, size: int = -1, /) -> bytes:
        if not self._prefix:
            return self._f.read(size)
        if size is None or size < 0:
            out = self._prefix + self._f.read()
            self._prefix = b""
            return out
        out = self._prefix[:size]
        self._prefix = self._prefix[size:]
        return out

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise io.UnsupportedOperation("capture input is read once, front to back")


def _reader_for(f: ByteSource, head: bytes, batch_records: int, note: str = "") -> CaptureReader:
    if head in PCAP_MAGICS:
        return PcapReader(f, batch_records=batch_records, header=head)
    if head == PCAPNG_MAGIC:
        return PcapngReader(f, batch_records=batch_records, header=head)
    raise CaptureError(f"not a pcap or pcapng capture{note} (starts with 0x{head.hex()})")


def open_capture(f: ByteSource, *, batch_records: int = DEFAULT_BATCH_RECORDS) -> CaptureReader:
    """A reader for the capture in ``f``, chosen by its first bytes, not its name.

    Accepts classic pcap (any byte order, micro- or nanosecond, "modified"),
    pcapng, and either of them gzip-compressed (one level).  Never seeks, so
    ``f`` may be a pipe such as ``sys.stdin.buffer``.  Raises
    :class:`CaptureError` for an empty input ("empty file"), for anything that
    is not one of those formats ("not a pcap or pcapng capture (starts with
    0x...)"), and for a gzip stream whose start cannot be decompressed.  Offsets
    in the reader's damage messages then count decompressed bytes.
    """
    head = _read_upto(f, 4)
    if not head:
        raise CaptureError("empty file")
    if head[:2] != GZIP_MAGIC:
        return _reader_for(f, head, batch_records)
    gz = gzip.GzipFile(fileobj=_Prefixed(head, f), mode="rb")
    try:
        inner = _read_upto(gz, 4)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CaptureError(f"gzip-compressed input that cannot be decompressed: {exc}") from exc
    if not inner:
        raise CaptureError("empty file (gzip-compressed, nothing inside)")
    return _reader_for(gz, inner, batch_records, " inside the gzip compression")
