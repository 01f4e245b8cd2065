"""Capture files as an audit reads them: which files a command line names, and their bytes.

:func:`expand_capture_args` turns the command line's paths into the list of
files to read.  :class:`HashingReader` reads a file (or standard input) on a
thread of its own, ahead of the decoder, hashing (SHA-256) and counting every
byte, so that the report can give each capture's digest and size as stored
while the file is read only once.

This module imports nothing heavy on purpose: the command line starts reading
(and hashing) the first capture before it loads the policy, the GeoIP data and
the decoders, so that the digest — on CPUs without SHA extensions slower than
everything else an audit does — starts at once.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import sys
import threading
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_CHUNK_BYTES",
    "HashingReader",
    "expand_capture_args",
    "input_size",
    "open_input",
]

READ_CHUNK_BYTES: Final = 16 << 20
"""Size of the pieces the read-ahead thread reads (the decoders' chunk size)."""
READ_AHEAD_BYTES: Final = 128 << 20
"""How far the read-ahead thread may get ahead of its consumer, at most."""


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class _End:
    """The read-ahead thread's last item: the end of the input, or why reading failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class HashingReader(io.RawIOBase):
    """Reads a byte source ahead on a thread, hashing (SHA-256) and counting what it reads.

    Wrap the file as opened (before any gzip layer) and give the wrapper to
    :func:`~egressd.sources.files.open_capture`: once the reader's batches are
    exhausted, :meth:`sha256` and :attr:`size` describe the whole file as
    stored, because the readers read to the end of their input even when they
    stop at damage.

    The thread starts at once and reads pieces of ``chunk_bytes`` (full pieces
    also from pipes, which hand out less per read), at most ``ahead_bytes``
    ahead of the consumer.  Reading (the kernel's copy) and hashing thus run
    beside the decoder instead of in its way; both release the GIL.  A piece is
    handed out whole when the consumer asks for at least as much, without a
    copy.  An error of the source (``OSError``) is raised to the consumer at the
    offset where it happened, as if it had read the source itself.

    :meth:`close` stops the thread (a consumer that gives up early must close
    the wrapper, or use it as a context manager).  The wrapped file stays open
    (whoever opened it closes it: it may be standard input) unless
    ``close_raw`` hands it over.

    With ``sha256=False`` the bytes are only counted: :meth:`sha256` then
    returns an empty string (for readers whose caller does not need the digest).
    """

    def __init__(self, raw: _Readable, *, sha256: bool = True,
                 chunk_bytes: int = READ_CHUNK_BYTES,
                 ahead_bytes: int = READ_AHEAD_BYTES, close_raw: bool = False) -> None:
        super().__init__()
        self._raw = raw
        self._close_raw = close_raw
        self._hashing = sha256
        self._hash = hashlib.sha256()
        self._chunk = max(int(chunk_bytes), 1)
        self._queue: queue.Queue[bytes | _End] = queue.Queue(
            maxsize=max(2, ahead_bytes // self._chunk))
        self._stop = threading.Event()
        self._piece = b""
        self._pos = 0
        self._ended = False
        self.size = 0
        """Bytes handed to the consumer so far."""
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    # -- the read-ahead thread ----------------------------------------------------

    def _run(self) -> None:
        read = self._raw.read
        update = self._hash.update if self._hashing else None
        chunk = self._chunk
        put = self._put
        while not self._stop.is_set():
            parts: list[bytes] = []
            got = 0
            end: _End | None = None
            while got < chunk:
                try:
                    part = read(chunk - got)
                except BaseException as exc:  # handed to the consumer, raised there
                    end = _End(exc)
                    break
                if not part:
                    end = _End()
                    break
                parts.append(part)
                got += len(part)
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if type(data) is not bytes:  # a source that hands out bytearrays
                    data = bytes(data)
                if update is not None:
                    update(data)
                if not put(data):
                    return
            if end is not None:
                put(end)
                return

    def _put(self, item: bytes | _End) -> bool:
        """Queue ``item``; False when the consumer closed the reader meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    # -- the consumer's side ------------------------------------------------------

    def _next_piece(self) -> bool:
        """Make the next piece current; False at the end of the input."""
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, _End):
            self._ended = True
            self._join()
            if item.error is not None:
                raise item.error
            return False
        self._piece, self._pos = item, 0
        return True

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        if self._pos >= len(self._piece):
            if self.closed:
                raise ValueError("read of a closed capture reader")
            if not self._next_piece():
                return b""
        piece, pos = self._piece, self._pos
        if pos == 0 and size >= len(piece):
            out = piece
            self._piece = b""
        else:
            out = piece[pos : pos + size]
            self._pos = pos + len(out)
        self.size += len(out)
        return out

    def readall(self) -> bytes:
        parts = []
        while part := self.read(self._chunk):
            parts.append(part)
        return b"".join(parts)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        with memoryview(buffer) as view, view.cast("B") as target:
            data = self.read(len(target))
            target[: len(data)] = data
        return len(data)

    def sha256(self) -> str:
        """Hex SHA-256 of the bytes read from the source; empty when hashing is off.

        Once the input has been read to its end (the capture readers always
        do), that is the digest of the whole file; before, the read-ahead may
        have hashed more than it handed out.
        """
        if not self._hashing:
            return ""
        if self._ended:
            self._join()
            return self._hash.hexdigest()
        return self._hash.copy().hexdigest()

    def close(self) -> None:
        """Stop the read-ahead thread and drop what it read ahead.

        A thread still waiting inside a read of its source (a pipe whose
        writer is silent, after an interrupt) is left behind as it is: it
        stops at its next piece, and it does not keep the process alive.  Its
        source is then not closed under it.
        """
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)
            if not thread.is_alive():
                self._thread = None
        self._piece = b""
        if self._close_raw and self._thread is None and not self.closed:
            self._raw.close()
        super().close()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def open_input(path: str, *, sha256: bool = True) -> HashingReader:
    """Start reading (and hashing) the capture at ``path``; ``-`` is standard input.

    Closing the returned reader closes the file (standard input stays open).
    Raises ``OSError`` when the file cannot be opened.
    """
    if path == "-":
        return HashingReader(sys.stdin.buffer, sha256=sha256)
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - the reader owns and closes it
    try:
        return HashingReader(f, sha256=sha256, close_raw=True)
    except BaseException:
        f.close()
        raise


def input_size(path: str) -> int | None:
    """Size on disk, for a progress bar (None for stdin and pipes)."""
    if path == "-":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if st.st_size > 0 else None


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
