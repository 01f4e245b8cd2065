"""Opening capture files: format sniffing, gzip, directories, and the file hash.

:func:`open_capture` looks at the first bytes of a stream and hands it to the
right reader, so the command line accepts pcap, pcapng and gzip-compressed
captures alike, whatever their names say, and from a pipe as well as from a
file.  :func:`expand_capture_args` turns the command line's paths into the list
of files to read, and :class:`HashingReader` lets the report give the SHA-256
and size of each file as stored, computed while the file is read once.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import queue
import threading
import zlib
from typing import TYPE_CHECKING, Final

from egressd.sources.base import CaptureError, CaptureReader
from egressd.sources.pcap import DEFAULT_BATCH_RECORDS, PCAP_MAGICS, ByteSource, PcapReader
from egressd.sources.pcapng import PCAPNG_MAGIC, PcapngReader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["GZIP_MAGIC", "HashingReader", "expand_capture_args", "open_capture"]

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


def expand_capture_args(args: list[str]) -> list[str]:
    """The capture files the command line names, in a fixed order.

    A directory stands for every regular file below it, recursively, sorted by
    path, leaving out hidden files and hidden directories (names starting with
    ``.``) and not following symbolic links to directories.  ``-`` (standard
    input) and plain files are kept as given, in the order given.  A path that
    does not exist raises :class:`FileNotFoundError` naming it.
    """
    out: list[str] = []
    for arg in args:
        if arg == "-":
            out.append(arg)
        elif os.path.isdir(arg):
            out.extend(_files_below(arg))
        elif os.path.exists(arg):
            out.append(arg)
        else:
            raise FileNotFoundError(errno.ENOENT, "no such capture file or directory", arg)
    return out


def _files_below(top: str) -> list[str]:
    found: list[tuple[tuple[str, ...], str]] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, top)
        parts: tuple[str, ...] = () if rel == os.curdir else tuple(rel.split(os.sep))
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                found.append(((*parts, name), path))
    found.sort()
    return [path for _, path in found]


class HashingReader(io.RawIOBase):
    """A read-only wrapper that hashes (SHA-256) and counts every byte read through it.

    Wrap the file as opened (before any gzip layer) and give the wrapper to
    :func:`open_capture`: once the reader's batches are exhausted,
    :meth:`sha256` and :attr:`size` describe the whole file as stored, because
    the readers read to the end of their input even when they stop at damage.
    (Not so when :func:`open_capture` raises :class:`CaptureError`: then only
    the first bytes have been read.)  Closing the wrapper leaves the wrapped
    file open: whoever opened it closes it (it may be standard input).

    With ``sha256=False`` the bytes are only counted: :meth:`sha256` then
    returns an empty string (for readers whose caller does not need the digest).
    """

    def __init__(self, raw: ByteSource, *, sha256: bool = True) -> None:
        super().__init__()
        self._raw = raw
        self._hashing = sha256
        self._hash = hashlib.sha256()
        self.size = 0
        """Bytes read so far."""
        # SHA-256 runs at a few hundred MB/s on CPUs without SHA extensions,
        # slower than the rest of an audit: it is computed on a thread of its
        # own (hashlib releases the GIL for large buffers), in read order.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread: threading.Thread | None = None

    def _update(self, data: bytes) -> None:
        if not self._hashing:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _run(self) -> None:
        update = self._hash.update
        get = self._queue.get
        while True:
            data = get()
            if data is None:
                return
            update(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        data = self._raw.read(-1 if size is None else size)
        if data:
            self._update(data)
            self.size += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            raw_readinto = getattr(self._raw, "readinto", None)
            if raw_readinto is not None:
                got = int(raw_readinto(target) or 0)
            else:
                data = self._raw.read(len(target))
                got = len(data)
                target[:got] = data
            if got and self._hashing:
                self._update(bytes(target[:got]))  # the caller reuses its buffer
        self.size += got
        return got

    def sha256(self) -> str:
        """Hex SHA-256 of the bytes read so far (waits for the hashing thread);
        empty when hashing is off."""
        if not self._hashing:
            return ""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return self._hash.hexdigest()
