"""Reading capture files ahead of the decoder: the hash, the size, pieces, errors, closing;
and which files a command line names."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sources_files import Pipe, drain, pcap_bytes

from egressd.sources.files import open_capture
from egressd.sources.inputs import HashingReader, expand_capture_args, open_input
from egressd.sources.pcap import ChunkedInput


class FailingSource(io.RawIOBase):
    """Hands out ``data``, then fails with ``OSError`` (like a disk with a bad sector)."""

    def __init__(self, data: bytes, step: int = 1000) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        if self._pos >= len(self._data):
            raise OSError(5, "Input/output error")
        n = self._step if size < 0 else min(size, self._step)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


def read_ahead_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "read-ahead")


# -- hashing and counting ------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_hash_covers_the_stored_bytes(gz: bool) -> None:
    data = pcap_bytes(50)
    stored = gzip.compress(data) if gz else data
    hashing = HashingReader(io.BytesIO(stored))
    drain(open_capture(hashing))
    assert hashing.size == len(stored)
    assert hashing.sha256() == hashlib.sha256(stored).hexdigest()


def test_hash_covers_the_whole_file_after_damage() -> None:
    data = bytearray(pcap_bytes(50) + bytes(100_000))
    struct.pack_into("<I", data, 24 + 8, 0xFFFFFFF0)  # first record absurd
    hashing = HashingReader(Pipe(bytes(data), step=4096))
    reader = open_capture(hashing)
    assert drain(reader) == []
    assert reader.info.truncated
    assert hashing.size == len(data)
    assert hashing.sha256() == hashlib.sha256(bytes(data)).hexdigest()


def test_hashing_reader_readinto_and_close() -> None:
    raw = io.BytesIO(b"abcdefgh")
    h = HashingReader(raw)
    buf = bytearray(5)
    assert h.readinto(buf) == 5 and bytes(buf) == b"abcde"
    assert h.read() == b"fgh"
    assert h.read(10) == b""
    assert h.size == 8 and h.sha256() == hashlib.sha256(b"abcdefgh").hexdigest()
    assert h.readable()
    h.close()
    assert not raw.closed  # the owner of the file closes it (it may be stdin)


def test_hashing_reader_count_only() -> None:
    h = HashingReader(io.BytesIO(b"abcdefgh"), sha256=False)
    buf = bytearray(5)
    assert h.readinto(buf) == 5 and bytes(buf) == b"abcde"
    assert h.read() == b"fgh"
    assert h.size == 8 and h.sha256() == ""


# -- reading ahead -------------------------------------------------------------------


def test_pieces_are_full_chunks_even_from_a_pipe_and_handed_out_whole() -> None:
    data = os.urandom(10_000)
    h = HashingReader(Pipe(data, step=7), chunk_bytes=1024)
    pieces = []
    while piece := h.read(4096):
        pieces.append(piece)
    assert b"".join(pieces) == data
    # every piece but the last is one whole chunk, although the pipe gave 7 bytes a read
    assert [len(p) for p in pieces] == [1024] * 9 + [784]
    assert h.sha256() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("sizes", [(1,), (3, 1000, 5), (1023, 1025), (4096,), (1, 4096)])
def test_any_read_sizes_give_the_bytes_in_order(sizes: tuple[int, ...]) -> None:
    data = os.urandom(20_000)
    h = HashingReader(io.BytesIO(data), chunk_bytes=1024, ahead_bytes=2048)
    out = []
    i = 0
    while part := h.read(sizes[i % len(sizes)]):
        assert len(part) <= sizes[i % len(sizes)]
        out.append(part)
        i += 1
    assert b"".join(out) == data
    assert h.size == len(data)
    assert h.read() == b"" and h.read(5) == b""


def test_readall_and_read_minus_one() -> None:
    data = os.urandom(5000)
    h = HashingReader(io.BytesIO(data), chunk_bytes=999)
    assert h.read(10) == data[:10]
    assert h.read() == data[10:]
    assert h.size == 5000


def test_an_error_of_the_source_is_raised_where_it_happened() -> None:
    data = os.urandom(5000)
    h = HashingReader(FailingSource(data), chunk_bytes=1024)
    got = []
    with pytest.raises(OSError, match="Input/output error"):
        while True:
            part = h.read(600)
            assert part, "the error must be raised, not read as the end"
            got.append(part)
    assert b"".join(got) == data  # everything before the error was handed out
    assert h.read(10) == b""  # and after it, the end
    assert h.sha256() == hashlib.sha256(data).hexdigest()


def test_a_source_error_inside_a_capture_reaches_the_caller() -> None:
    data = pcap_bytes(40)
    h = HashingReader(FailingSource(data, step=100), chunk_bytes=256)
    reader = open_capture(h)
    with pytest.raises(OSError):
        drain(reader)


def test_stays_at_most_ahead_bytes_ahead() -> None:
    class Counting(io.BytesIO):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.handed = 0

        def read(self, size: int | None = -1, /) -> bytes:
            out = super().read(size)
            self.handed += len(out)
            return out

    src = Counting(bytes(1 << 20))
    h = HashingReader(src, chunk_bytes=1024, ahead_bytes=8192)
    h.read(1)
    time.sleep(0.3)
    # the queue holds 8 chunks, one is in hand, one more waits to be queued
    assert src.handed <= 8192 + 2 * 1024
    h.close()


def test_close_stops_the_thread_of_an_abandoned_reader() -> None:
    before = read_ahead_threads()
    readers = [HashingReader(io.BytesIO(bytes(1 << 20)), chunk_bytes=1024, ahead_bytes=4096)
               for _ in range(5)]
    for r in readers:
        r.read(10)
    time.sleep(0.1)
    assert read_ahead_threads() == before + 5  # all blocked on a full queue
    for r in readers:
        r.close()
    assert read_ahead_threads() == before
    with pytest.raises(ValueError):
        readers[0].read(1)  # a closed file, as for any io object


def test_context_manager_closes() -> None:
    before = read_ahead_threads()
    with HashingReader(io.BytesIO(bytes(100_000)), chunk_bytes=100, ahead_bytes=200) as h:
        h.read(1)
    assert h.closed and read_ahead_threads() == before


def test_open_input_owns_the_file_but_not_stdin(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap_bytes(3))
    h = open_input(str(path))
    raw = h._raw  # the file it opened
    assert h.read() == pcap_bytes(3)
    h.close()
    assert raw.closed  # type: ignore[attr-defined]

    stdin = io.BytesIO(b"from a pipe")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
    s = open_input("-")
    assert s.read() == b"from a pipe"
    s.close()
    assert not stdin.closed

    with pytest.raises(FileNotFoundError):
        open_input(str(tmp_path / "missing.pcap"))


def test_capture_pieces_are_walked_without_being_copied_together() -> None:
    """Behind a read-ahead, the reader's input passes the pieces on as they are."""
    data = os.urandom(10_000)
    inp = ChunkedInput(HashingReader(io.BytesIO(data), chunk_bytes=1000), b"")
    first = inp.read(20)
    assert first == data[:20]  # exact, as a header read must be
    rest = inp.read(4000, at_least=500)
    assert rest == data[20:1000]  # the rest of the piece, not filled up to 4000
    whole = inp.read(4000, at_least=500)
    assert whole == data[1000:2000]
    assert inp.read(4000) == data[2000:6000]  # without at_least: exactly 4000
    assert inp.offset == 6000


def test_large_capture_through_the_read_ahead_matches_a_plain_read() -> None:
    data = pcap_bytes(3000)
    plain = drain(open_capture(io.BytesIO(data)))
    for chunk in (64, 1000, 4096, 1 << 20):
        h = HashingReader(io.BytesIO(data), chunk_bytes=chunk)
        assert drain(open_capture(h)) == plain, chunk
        assert h.sha256() == hashlib.sha256(data).hexdigest()


# -- arguments -----------------------------------------------------------------------


def test_expand_capture_args(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.pcap").write_bytes(b"")
    (tmp_path / "b" / "a.pcap").write_bytes(b"")
    (tmp_path / "a.pcapng").write_bytes(b"")
    (tmp_path / "c.gz").write_bytes(b"")
    (tmp_path / ".hidden.pcap").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.pcap").write_bytes(b"")
    (tmp_path / "b" / "deeper").mkdir()
    (tmp_path / "b" / "deeper" / "0.pcap").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
    d = str(tmp_path)
    single = tmp_path / "b" / "z.pcap"
    got = expand_capture_args([str(single), d, "-"])
    assert got == [
        str(single),
        os.path.join(d, "a.pcapng"),
        os.path.join(d, "b", "a.pcap"),
        os.path.join(d, "b", "deeper", "0.pcap"),
        os.path.join(d, "b", "z.pcap"),
        os.path.join(d, "c.gz"),
        "-",
    ]
    assert expand_capture_args([str(tmp_path / "empty")]) == []


def test_expand_capture_args_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pcap")
    with pytest.raises(FileNotFoundError) as err:
        expand_capture_args([missing])
    assert missing in str(err.value)
    assert "no such capture file or directory" in str(err.value)


def test_close_does_not_wait_for_a_silent_pipe() -> None:
    before = read_ahead_threads()
    r, w = os.pipe()
    try:
        with open(r, "rb", buffering=0, closefd=False) as f:
            h = HashingReader(f)
            t0 = time.monotonic()
            h.close()  # the thread sits in read() of a pipe nobody writes to
            assert time.monotonic() - t0 < 5
            assert h.closed
            os.write(w, b"late")  # lets the thread go; it stops without handing anything out
            os.close(w)
            w = -1
            deadline = time.monotonic() + 5
            while read_ahead_threads() > before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert read_ahead_threads() == before
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
