"""Classic pcap reader: formats, timestamps, batching, chunking and damage."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.model import RecordBatch
from egressd.sources.base import CaptureError, CaptureInfo
from egressd.sources.pcap import PcapReader

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
MAGIC_MODIFIED = 0xA1B2CD34

Rec = tuple[int, int, bytes, int]  # seconds, fraction, packet bytes, wire length


def pcap_header(
    order: str = "<",
    magic: int = MAGIC_US,
    snaplen: int = 65535,
    linkword: int = 1,
    version: tuple[int, int] = (2, 4),
) -> bytes:
    return struct.pack(order + "IHHiIII", magic, *version, 0, 0, snaplen, linkword)


def pcap_file(
    records: list[Rec],
    order: str = "<",
    magic: int = MAGIC_US,
    snaplen: int = 65535,
    linkword: int = 1,
) -> bytes:
    out = [pcap_header(order, magic, snaplen, linkword)]
    for sec, frac, data, wirelen in records:
        out.append(struct.pack(order + "IIII", sec, frac, len(data), wirelen))
        if magic == MAGIC_MODIFIED:
            out.append(struct.pack(order + "IHBB", 7, 0x0800, 0, 0))
        out.append(data)
    return b"".join(out)


def sample_records(count: int = 5) -> list[Rec]:
    sizes = [60, 1514, 0, 61, 1, 3, 98, 590, 17, 4]
    return [
        (1_700_000_000 + i, (i * 12345) % 1_000_000, bytes([i % 256]) * sizes[i % len(sizes)], 0)
        for i in range(count)
    ]


def with_wirelen(records: list[Rec]) -> list[Rec]:
    return [(s, f, d, w or len(d)) for s, f, d, w in records]


def read_all(reader: PcapReader) -> tuple[list[RecordBatch], list[tuple[int, int, bytes, int]]]:
    batches = list(reader.batches())
    rows = []
    for b in batches:
        for i in range(len(b)):
            rows.append((int(b.ts_ns[i]), int(b.linktypes[i]), b.packet(i), int(b.wirelens[i])))
    return batches, rows


def boundaries(records: list[Rec], header: int = 24, rec_header: int = 16) -> list[int]:
    """Byte offsets where a file of ``records`` may end cleanly."""
    out = [header]
    for r in records:
        out.append(out[-1] + rec_header + len(r[2]))
    return out


class NoSeek(io.RawIOBase):
    """A pipe-like stream: short reads, and seek/tell fail."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        raise io.UnsupportedOperation("not seekable")

    def tell(self) -> int:
        raise io.UnsupportedOperation("not seekable")

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    @property
    def consumed(self) -> int:
        return self._pos


# -- formats and timestamps ------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic", [MAGIC_US, MAGIC_NS])
def test_byte_orders_and_resolutions(order: str, magic: int) -> None:
    recs = with_wirelen(sample_records(6))
    data = pcap_file(recs, order=order, magic=magic, linkword=113)
    reader = PcapReader(io.BytesIO(data))
    assert reader.nanosecond == (magic == MAGIC_NS)
    _, rows = read_all(reader)
    mult = 1 if magic == MAGIC_NS else 1000
    assert rows == [(s * 1_000_000_000 + f * mult, 113, d, w) for s, f, d, w in recs]
    info = reader.info
    assert info == CaptureInfo(format="pcap", link_types={113}, packets=6)


def test_exact_nanoseconds_and_unsigned_seconds() -> None:
    recs: list[Rec] = [
        (0, 0, b"a", 1),
        (1_700_000_000, 999_999_999, b"b", 1),
        (0xFFFFFFFF, 5, b"c", 1),  # seconds are unsigned (after 2106)
        (3, 1_000_000_000, b"d", 1),  # out-of-range fraction: kept as written
    ]
    _, rows = read_all(PcapReader(io.BytesIO(pcap_file(recs, magic=MAGIC_NS))))
    assert [r[0] for r in rows] == [
        0,
        1_700_000_000_999_999_999,
        0xFFFFFFFF * 1_000_000_000 + 5,
        4_000_000_000,
    ]


def test_microsecond_timestamps_are_exact() -> None:
    recs: list[Rec] = [(1_234_567_890, 123_456, b"x", 1), (1_234_567_890, 999_999, b"y", 1)]
    _, rows = read_all(PcapReader(io.BytesIO(pcap_file(recs))))
    assert [r[0] for r in rows] == [1_234_567_890_123_456_000, 1_234_567_890_999_999_000]


def test_linktype_word_upper_bits_are_fcs_info() -> None:
    data = pcap_file([(1, 2, b"\x45", 1)], linkword=0x30000065, snaplen=1)
    reader = PcapReader(io.BytesIO(data))
    _, rows = read_all(reader)
    assert reader.linktype == 101
    assert reader.info.link_types == {101}
    assert rows[0][1] == 101


def test_modified_pcap_24_byte_record_headers() -> None:
    recs = with_wirelen(sample_records(4))
    data = pcap_file(recs, magic=MAGIC_MODIFIED)
    _, rows = read_all(PcapReader(io.BytesIO(data)))
    assert [r[2] for r in rows] == [d for _, _, d, _ in recs]
    assert rows[1][0] == recs[1][0] * 1_000_000_000 + recs[1][1] * 1000


def test_caplen_above_wirelen_is_kept() -> None:
    reader = PcapReader(io.BytesIO(pcap_file([(1, 0, b"x" * 100, 60)])))
    batches, _ = read_all(reader)
    assert batches[0].caplens.tolist() == [100]
    assert batches[0].wirelens.tolist() == [60]
    assert not reader.info.truncated


def test_snaplen_cut_records() -> None:
    reader = PcapReader(io.BytesIO(pcap_file([(1, 0, b"x" * 96, 1514)], snaplen=96)))
    batches, _ = read_all(reader)
    assert (batches[0].caplens.tolist(), batches[0].wirelens.tolist()) == ([96], [1514])


def test_caplen_over_small_snaplen_up_to_262144_is_tolerated() -> None:
    recs = [(1, 0, b"y" * 262144, 262144), (2, 0, b"z" * 1000, 1000)]
    reader = PcapReader(io.BytesIO(pcap_file(recs, snaplen=96)))
    _batches, rows = read_all(reader)
    assert len(rows) == 2 and not reader.info.truncated


def test_large_snaplen_raises_the_limit() -> None:
    big = b"q" * 300_000
    reader = PcapReader(io.BytesIO(pcap_file([(1, 0, big, len(big))], snaplen=0x7FFFFFFF)))
    _, rows = read_all(reader)
    assert rows[0][2] == big and not reader.info.truncated


def test_scapy_written_capture(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    pkts = []
    for i in range(5):
        p = (
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(dst=f"192.0.2.{i}")
            / UDP(dport=53)
            / (b"q" * i)
        )
        p.time = 1_700_000_000 + i
        pkts.append(p)
    path = tmp_path / "s.pcap"
    wrpcap(str(path), pkts)
    with path.open("rb") as f:
        reader = PcapReader(f)
        _, rows = read_all(reader)
    assert [r[2] for r in rows] == [bytes(p) for p in pkts]
    assert [r[0] for r in rows] == [(1_700_000_000 + i) * 1_000_000_000 for i in range(5)]
    assert reader.info.link_types == {1}


# -- batches and chunks ------------------------------------------------------------


def test_batch_arrays_and_data_view() -> None:
    recs = with_wirelen(sample_records(10))
    batches, _ = read_all(PcapReader(io.BytesIO(pcap_file(recs)), batch_records=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b.data.dtype == np.uint8 and not b.data.flags.writeable
    for arr in (b.offsets, b.caplens, b.wirelens, b.ts_ns):
        assert arr.dtype == np.int64
    assert b.linktypes.dtype == np.uint16
    # all batches of one chunk share its buffer: no copy of the packet bytes
    assert batches[0].data is batches[1].data


@pytest.mark.parametrize("chunk", [64, 65, 100, 333, 1000, 4096])
def test_chunk_boundaries_do_not_change_records(chunk: int) -> None:
    recs = with_wirelen(sample_records(40))
    data = pcap_file(recs)
    _, expected = read_all(PcapReader(io.BytesIO(data)))
    reader = PcapReader(io.BytesIO(data), chunk_bytes=chunk, batch_records=3)
    batches, rows = read_all(reader)
    assert rows == expected
    assert reader.info.packets == 40 and not reader.info.truncated
    assert all(1 <= len(b) <= 3 for b in batches)


def test_record_larger_than_chunk() -> None:
    recs = [(1, 0, b"a" * 10, 10), (2, 0, bytes(range(256)) * 40, 10240), (3, 0, b"c", 1)]
    reader = PcapReader(io.BytesIO(pcap_file(recs)), chunk_bytes=100)
    _, rows = read_all(reader)
    assert [r[2] for r in rows] == [r[2] for r in recs]


def test_header_bytes_already_consumed() -> None:
    data = pcap_file(with_wirelen(sample_records(3)))
    f = io.BytesIO(data)
    head = f.read(4)
    _, rows = read_all(PcapReader(f, header=head))
    assert len(rows) == 3


def test_non_seekable_short_reads() -> None:
    data = pcap_file(with_wirelen(sample_records(12)))
    _, expected = read_all(PcapReader(io.BytesIO(data)))
    src = NoSeek(data, step=5)
    _, rows = read_all(PcapReader(src, chunk_bytes=128))
    assert rows == expected


def test_batches_only_once() -> None:
    reader = PcapReader(io.BytesIO(pcap_file([])))
    assert list(reader.batches()) == []
    with pytest.raises(RuntimeError):
        list(reader.batches())


# -- not pcap / header problems -----------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(CaptureError, match="empty file"):
        PcapReader(io.BytesIO(b""))


def test_not_pcap() -> None:
    with pytest.raises(CaptureError, match=r"not a pcap capture \(starts with 0x0a0d0d0a\)"):
        PcapReader(io.BytesIO(b"\x0a\x0d\x0d\x0a" + bytes(40)))


def test_header_only_is_a_valid_empty_capture() -> None:
    reader = PcapReader(io.BytesIO(pcap_header()))
    assert list(reader.batches()) == []
    assert reader.info == CaptureInfo(format="pcap", link_types={1})


@pytest.mark.parametrize("cut", range(4, 24))
def test_cut_inside_file_header(cut: int) -> None:
    reader = PcapReader(io.BytesIO(pcap_header()[:cut]))
    assert list(reader.batches()) == []
    assert reader.info.truncated
    assert (
        reader.info.damage
        == f"file ends inside the file header at offset {cut} ({cut} of 24 bytes)"
    )


# -- damage ------------------------------------------------------------------------


def test_absurd_caplen_stops_reading() -> None:
    recs = with_wirelen(sample_records(3))
    data = bytearray(pcap_file(recs + [(9, 9, b"", 0)] + recs))
    bad_at = boundaries(recs)[-1]
    struct.pack_into("<I", data, bad_at + 8, 0xFFFFFFFF)
    reader = PcapReader(io.BytesIO(bytes(data)))
    _, rows = read_all(reader)
    assert len(rows) == 3 == reader.info.packets
    assert reader.info.truncated
    assert reader.info.damage == (
        f"record 4 at offset {bad_at}: captured length 4294967295 exceeds 262144"
    )


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_absurd_caplen_mid_chunk_that_stays_inside_the_chunk(chunk: int) -> None:
    # A damaged length that points inside the buffer must still be caught.
    recs = [(i, 0, b"p" * 300, 300) for i in range(4)]
    data = bytearray(pcap_file(recs * 1000, snaplen=96))
    at = boundaries(recs)[2]
    struct.pack_into("<I", data, at + 8, 262145)
    reader = PcapReader(io.BytesIO(bytes(data)), chunk_bytes=chunk)
    _, rows = read_all(reader)
    assert len(rows) == 2
    assert reader.info.damage == f"record 3 at offset {at}: captured length 262145 exceeds 262144"


def test_absolute_cap_with_huge_snaplen() -> None:
    data = bytearray(pcap_file([(1, 0, b"a", 1), (2, 0, b"b", 1)], snaplen=0xFFFFFFFF))
    struct.pack_into("<I", data, 24 + 17 + 8, (256 << 20) + 1)
    reader = PcapReader(io.BytesIO(bytes(data)))
    _, rows = read_all(reader)
    assert len(rows) == 1
    assert reader.info.damage == (
        f"record 2 at offset 41: captured length {(256 << 20) + 1} exceeds {256 << 20}"
    )


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic", [MAGIC_US, MAGIC_MODIFIED])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_cut_at_every_offset(order: str, magic: int, chunk: int) -> None:
    recs = with_wirelen(sample_records(5))
    data = pcap_file(recs, order=order, magic=magic)
    hl = 24 if magic == MAGIC_MODIFIED else 16
    ends = boundaries(recs, rec_header=hl)
    for cut in range(len(data) + 1):
        if cut < 4:
            with pytest.raises(CaptureError):
                PcapReader(io.BytesIO(data[:cut]))
            continue
        reader = PcapReader(io.BytesIO(data[:cut]), chunk_bytes=chunk)
        _batches, rows = read_all(reader)
        info = reader.info
        complete = sum(1 for e in ends[1:] if e <= cut)
        assert info.packets == complete == len(rows), cut
        assert rows == [(s * 10**9 + f * 1000, 1, d, w) for s, f, d, w in recs[:complete]]
        if cut in ends:
            assert not info.truncated and info.damage is None, cut
        else:
            assert info.truncated, cut
            assert info.damage is not None and "file ends inside" in info.damage, cut
            assert "\n" not in info.damage


def test_cut_messages() -> None:
    recs = [(1, 0, b"A" * 50, 50), (2, 0, b"B" * 50, 50)]
    data = pcap_file(recs)
    r = PcapReader(io.BytesIO(data[: 24 + 66 + 10]))
    list(r.batches())
    assert r.info.damage == "file ends inside the header of record 2 at offset 90 (10 of 16 bytes)"
    r = PcapReader(io.BytesIO(data[: 24 + 66 + 16 + 7]))
    list(r.batches())
    assert r.info.damage == (
        "file ends inside the packet data of record 2 at offset 90 (7 of 50 bytes)"
    )


def test_damage_drains_the_input() -> None:
    recs = with_wirelen(sample_records(3))
    data = bytearray(pcap_file(recs) + bytes(5000))
    struct.pack_into("<I", data, 24 + 8, 0x7FFFFFFF)
    src = NoSeek(bytes(data), step=100)
    reader = PcapReader(src, chunk_bytes=64)
    assert list(reader.batches()) == []
    assert reader.info.truncated
    assert src.consumed == len(data)


# -- property tests ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tail=st.binary(max_size=600),
    order=st.sampled_from(["<", ">"]),
    magic=st.sampled_from([MAGIC_US, MAGIC_NS, MAGIC_MODIFIED]),
    snaplen=st.sampled_from([0, 64, 65535, 0xFFFFFFFF]),
    chunk=st.sampled_from([64, 97, 1 << 20]),
)
def test_random_bytes_after_header_never_raise(
    tail: bytes, order: str, magic: int, snaplen: int, chunk: int
) -> None:
    reader = PcapReader(
        io.BytesIO(pcap_header(order, magic, snaplen) + tail), chunk_bytes=chunk, batch_records=7
    )
    batches = list(reader.batches())
    assert isinstance(reader.info, CaptureInfo)
    assert reader.info.packets == sum(len(b) for b in batches)
    assert reader.info.truncated == (reader.info.damage is not None)
    for b in batches:
        assert 1 <= len(b) <= 7
        assert int((b.offsets + b.caplens).max()) <= b.data.shape[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    cut=st.integers(min_value=0, max_value=4000),
    chunk=st.sampled_from([64, 1 << 20]),
)
def test_random_mutations_never_raise(
    mutations: list[tuple[int, int]], cut: int, chunk: int
) -> None:
    base = pcap_file(with_wirelen(sample_records(8)))
    data = bytearray(base)
    for where, value in mutations:
        data[where % len(data)] = value
    data = data[: max(cut, 1)] if cut < len(data) else data
    magic_hit = any(where % len(base) < 4 for where, _ in mutations) or len(data) < 4
    try:
        reader = PcapReader(io.BytesIO(bytes(data)), chunk_bytes=chunk)
    except CaptureError:
        assert magic_hit
        return
    batches = list(reader.batches())
    assert reader.info.packets == sum(len(b) for b in batches)
    for b in batches:
        assert int((b.offsets + b.caplens).max()) <= b.data.shape[0]
