"""pcapng reader: sections, interfaces, timestamps, packet block kinds, damage."""

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
from egressd.sources.pcapng import PcapngReader, ticks_to_ns

NS = 1_000_000_000


# -- block builders (order: "<" or ">") ----------------------------------------------


def pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)


def block(order: str, btype: int, body: bytes) -> bytes:
    body = pad4(body)
    length = 12 + len(body)
    return struct.pack(order + "II", btype, length) + body + struct.pack(order + "I", length)


def opt(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + pad4(value)


def opts(order: str, *items: tuple[int, bytes]) -> bytes:
    if not items:
        return b""
    return b"".join(opt(order, c, v) for c, v in items) + struct.pack(order + "HH", 0, 0)


def shb(order: str = "<", version: tuple[int, int] = (1, 0), options: bytes = b"") -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, *version, -1) + options
    return block(order, 0x0A0D0D0A, body)


def idb(
    order: str = "<",
    linktype: int = 1,
    snaplen: int = 0,
    tsresol: int | None = None,
    tsoffset: int | None = None,
) -> bytes:
    items: list[tuple[int, bytes]] = [(2, b"eth0")]
    if tsresol is not None:
        items.append((9, bytes([tsresol])))
    if tsoffset is not None:
        items.append((14, struct.pack(order + "q", tsoffset)))
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts(order, *items))


def epb(
    order: str, ifid: int, ticks: int, data: bytes, wirelen: int | None = None, options: bytes = b""
) -> bytes:
    wl = len(data) if wirelen is None else wirelen
    fixed = struct.pack(order + "5I", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data), wl)
    return block(order, 6, fixed + pad4(data) + options)


def spb(order: str, data: bytes, wirelen: int | None = None) -> bytes:
    wl = len(data) if wirelen is None else wirelen
    return block(order, 3, struct.pack(order + "I", wl) + data)


def pb(order: str, ifid: int, ticks: int, data: bytes, drops: int = 0) -> bytes:
    fixed = struct.pack(
        order + "HH4I", ifid, drops, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
    )
    return block(order, 2, fixed + pad4(data))


def read_all(reader: PcapngReader) -> tuple[list[RecordBatch], list[tuple[int, int, bytes, int]]]:
    batches = list(reader.batches())
    rows = []
    for b in batches:
        for i in range(len(b)):
            rows.append((int(b.ts_ns[i]), int(b.linktypes[i]), b.packet(i), int(b.wirelens[i])))
    return batches, rows


def read(data: bytes) -> tuple[PcapngReader, list[tuple[int, int, bytes, int]]]:
    reader = PcapngReader(io.BytesIO(data))
    _, rows = read_all(reader)
    return reader, rows


T0 = 1_700_000_000_123_456  # microseconds


def simple_file(order: str = "<", count: int = 4) -> bytes:
    parts = [shb(order), idb(order)]
    for i in range(count):
        parts.append(epb(order, 0, T0 + i, bytes([i]) * (i * 7 + 1)))
    return b"".join(parts)


# -- basics ------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_basic_epb(order: str) -> None:
    reader, rows = read(simple_file(order))
    assert rows == [((T0 + i) * 1000, 1, bytes([i]) * (i * 7 + 1), i * 7 + 1) for i in range(4)]
    assert reader.info == CaptureInfo(format="pcapng", link_types={1}, packets=4)
    assert reader.sections == 1


def test_batch_arrays() -> None:
    batches, _ = read_all(PcapngReader(io.BytesIO(simple_file(count=10)), batch_records=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b.data.dtype == np.uint8
    for arr in (b.offsets, b.caplens, b.wirelens, b.ts_ns):
        assert arr.dtype == np.int64
    assert b.linktypes.dtype == np.uint16


def test_epb_options_and_snaplen_cut() -> None:
    data = shb() + idb(snaplen=64) + epb("<", 0, 5, b"z" * 64, 1500, opts("<", (1, b"hi")))
    _batches, rows = read_all(PcapngReader(io.BytesIO(data)))
    assert rows == [(5000, 1, b"z" * 64, 1500)]


@pytest.mark.parametrize(
    ("tsresol", "ticks", "expected"),
    [
        (None, 1_700_000_000_123_456, 1_700_000_000_123_456_000),
        (6, 1_700_000_000_123_456, 1_700_000_000_123_456_000),
        (9, 1_700_000_000_123_456_789, 1_700_000_000_123_456_789),
        (3, 1_700_000_000_123, 1_700_000_000_123_000_000),
        (0, 1_700_000_000, 1_700_000_000 * NS),
        (1, 17, 1_700_000_000),
        (12, 1_700_000_000_123_456_789, 1_700_000_000_123_456),  # picoseconds, rounded down
        (0x80 | 20, (1_700_000_000 << 20) + (1 << 19), 1_700_000_000 * NS + NS // 2),
        (0x80 | 10, (5 << 10) + 1, 5 * NS + NS // 1024),  # 976562.5 ns -> 976562
        (0x80 | 0, 7, 7 * NS),
        (0x80 | 40, (3 << 40) + 1, 3 * NS),  # 2**-40 s, below a nanosecond
    ],
)
def test_if_tsresol(tsresol: int | None, ticks: int, expected: int) -> None:
    data = shb() + idb(tsresol=tsresol) + epb("<", 0, ticks, b"p")
    _, rows = read(data)
    assert rows[0][0] == expected


@pytest.mark.parametrize("offset", [0, 3600, -86400, 1_000_000_000])
def test_if_tsoffset(offset: int) -> None:
    data = shb(">") + idb(">", tsresol=9, tsoffset=offset) + epb(">", 0, 42, b"p")
    _, rows = read(data)
    assert rows[0][0] == 42 + offset * NS


def test_ticks_to_ns_clamps_and_stays_exact() -> None:
    huge = np.array([(1 << 64) - 1, 0], dtype=np.uint64)
    assert ticks_to_ns(huge, 1).tolist() == [(1 << 63) - 1, 0]
    us = np.array([1_700_000_000_999_999, 5], dtype=np.uint64)
    offs = np.array([-5, 1 << 62], dtype=np.int64)  # the second overflows int64 ns
    assert ticks_to_ns(us, 10**6, offs).tolist() == [
        1_700_000_000_999_999_000 - 5 * NS,
        (1 << 63) - 1,
    ]
    odd = np.array([10**9 + 1], dtype=np.uint64)  # 1/3 s units: python path is exact
    assert ticks_to_ns(odd, 3).tolist() == [(10**9 + 1) * NS // 3]
    neg = np.array([0, 10], dtype=np.uint64)
    assert ticks_to_ns(neg, 10**9, np.array([-(1 << 62)] * 2, dtype=np.int64)).tolist() == [
        -(1 << 63),
        -(1 << 63),
    ]


def test_many_interfaces_with_distinct_offsets() -> None:
    parts = [shb()]
    for i in range(300):
        parts.append(idb(linktype=i % 3, tsresol=6 + i % 4, tsoffset=i))
    for i in range(300):
        parts.append(epb("<", i, 1000 + i, b"x"))
    _, rows = read(b"".join(parts))
    assert [r[0] for r in rows] == [
        (1000 + i) * NS // 10 ** (6 + i % 4) + i * NS for i in range(300)
    ]
    assert [r[1] for r in rows] == [i % 3 for i in range(300)]


def test_multiple_interfaces_interleave() -> None:
    data = b"".join(
        [
            shb(),
            idb(linktype=1),
            idb(linktype=113, tsresol=9),
            idb(linktype=101, tsresol=0x80 | 10),
            epb("<", 0, 1_000_001, b"eth"),
            epb("<", 1, 2_000_000_002, b"sll"),
            epb("<", 2, 3 << 10, b"raw"),
            epb("<", 0, 4_000_000, b"eth2"),
            epb("<", 1, 5, b"sll2"),
        ]
    )
    reader, rows = read(data)
    assert rows == [
        (1_000_001_000, 1, b"eth", 3),
        (2_000_000_002, 113, b"sll", 3),
        (3 * NS, 101, b"raw", 3),
        (4_000_000_000, 1, b"eth2", 4),
        (5, 113, b"sll2", 4),
    ]
    assert reader.info.link_types == {1, 113, 101}
    assert [i.linktype for i in reader.interfaces] == [1, 113, 101]


def test_sections_of_different_byte_order() -> None:
    data = b"".join(
        [
            shb("<"),
            idb("<", linktype=1),
            epb("<", 0, 10, b"a"),
            shb(">"),
            idb(">", linktype=101, tsresol=9),
            idb(">", linktype=12),
            epb(">", 1, 20, b"b"),
            epb(">", 0, 30, b"c"),
            shb("<"),
            idb("<", linktype=0, tsresol=3),
            epb("<", 0, 40, b"d"),
        ]
    )
    reader, rows = read(data)
    assert rows == [
        (10_000, 1, b"a", 1),
        (20_000, 12, b"b", 1),
        (30, 101, b"c", 1),
        (40_000_000, 0, b"d", 1),
    ]
    assert reader.sections == 3
    assert reader.info.link_types == {0, 1, 12, 101}


def test_interface_ids_restart_per_section() -> None:
    data = shb() + idb() + idb() + shb() + idb() + epb("<", 1, 1, b"x")
    reader, rows = read(data)
    assert rows == []
    assert reader.info.truncated
    assert "interface id 1 has no interface description block (the section has 1)" in (
        reader.info.damage or ""
    )


def test_simple_packet_blocks() -> None:
    data = b"".join(
        [
            shb(),
            idb(snaplen=5),
            spb("<", b"first", 300),  # before any timestamp: 0
            epb("<", 0, 7_000_000, b"e"),
            spb("<", b"abcdefgh"[:5], 8),  # stored 5 of 8 (snaplen 5)
            spb("<", b"xy"),
        ]
    )
    _reader, rows = read(data)
    assert rows == [
        (0, 1, b"first", 300),
        (7 * NS, 1, b"e", 1),
        (7 * NS, 1, b"abcde", 8),
        (7 * NS, 1, b"xy", 2),
    ]


def test_simple_packet_block_timestamp_carries_across_batches() -> None:
    data = shb() + idb() + epb("<", 0, 3, b"e") + spb("<", b"s") + spb("<", b"t")
    batches, rows = read_all(PcapngReader(io.BytesIO(data), batch_records=1, chunk_bytes=64))
    assert [r[0] for r in rows] == [3000, 3000, 3000]
    assert [len(b) for b in batches] == [1, 1, 1]


def test_obsolete_packet_block() -> None:
    data = shb(">") + idb(">", linktype=101) + pb(">", 0, 99, b"\x45abc", drops=3)
    _reader, rows = read(data)
    assert rows == [(99_000, 101, b"\x45abc", 4)]


def test_skipped_blocks_are_counted() -> None:
    data = b"".join(
        [
            shb(),
            block("<", 4, b"\x01\x00\x08\x00" + b"\x7f\x00\x00\x01lo\x00\x00" + bytes(4)),  # NRB
            idb(),
            block("<", 5, struct.pack("<III", 0, 0, 0)),  # ISB
            block("<", 10, struct.pack("<II", 0x544C534B, 4) + b"keys"),  # DSB
            block("<", 0x00000BAD, struct.pack("<I", 32473) + b"custom"),  # CB
            block("<", 0x40000BAD, struct.pack("<I", 32473) + b"custom"),  # CB, no copy
            block("<", 9, b"journal"),  # SJE
            block("<", 0x12345678, b""),  # unknown
            epb("<", 0, 1, b"x"),
            block("<", 0x80000001, b"local use"),  # unknown
        ]
    )
    reader, rows = read(data)
    assert len(rows) == 1
    assert reader.info.skipped_blocks == {
        "NRB": 1,
        "ISB": 1,
        "DSB": 1,
        "CB": 2,
        "SJE": 1,
        "unknown": 2,
    }
    assert not reader.info.truncated


def test_scapy_written_pcapng(tmp_path: Path) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgWriter

    path = tmp_path / "s.pcapng"
    pkts = []
    for i in range(4):
        p = (
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(dst=f"198.51.100.{i}")
            / UDP(dport=443)
            / (b"w" * i)
        )
        p.time = 1_700_000_000 + i
        pkts.append(p)
    with PcapNgWriter(str(path)) as w:
        for p in pkts:
            w.write(p)
    with path.open("rb") as f:
        reader = PcapngReader(f)
        _, rows = read_all(reader)
    assert [r[2] for r in rows] == [bytes(p) for p in pkts]
    assert [r[0] for r in rows] == [(1_700_000_000 + i) * NS for i in range(4)]
    assert [r[1] for r in rows] == [1] * 4


# -- chunks ------------------------------------------------------------------------


def mixed_file() -> bytes:
    parts = [shb(), idb(), idb(linktype=101, tsresol=9)]
    for i in range(30):
        parts.append(epb("<", i % 2, 1000 + i, bytes([i]) * (i * 13 % 200)))
        if i % 7 == 0:
            parts.append(block("<", 5, bytes(12)))
        if i % 11 == 0:
            parts.append(spb("<", b"spb" * i))
        if i % 13 == 0:
            parts.append(pb("<", 1, 5000 + i, b"pb"))
        if i == 15:
            parts.append(shb(">") + idb(">", linktype=12) + epb(">", 0, 1, b"be"))
            parts.append(shb() + idb() + idb(linktype=101, tsresol=9))
    return b"".join(parts)


@pytest.mark.parametrize("chunk", [64, 100, 257, 1000, 1 << 20])
@pytest.mark.parametrize("batch", [1, 5, 65536])
def test_chunk_and_batch_sizes_do_not_change_records(chunk: int, batch: int) -> None:
    data = mixed_file()
    _, expected = read(data)
    reader = PcapngReader(io.BytesIO(data), chunk_bytes=chunk, batch_records=batch)
    batches, rows = read_all(reader)
    assert rows == expected
    assert len(rows) == 30 + 1 + 3 + 3  # EPBs, the big-endian one, SPBs, PBs
    assert not reader.info.truncated
    assert all(1 <= len(b) <= batch for b in batches)


# -- not pcapng / first block -----------------------------------------------------------


def test_empty() -> None:
    with pytest.raises(CaptureError, match="empty file"):
        PcapngReader(io.BytesIO(b""))


def test_first_block_must_be_a_section_header() -> None:
    # a file starting with an EPB (no SHB before it) is not pcapng at all
    with pytest.raises(CaptureError, match=r"not a pcapng capture \(starts with 0x06000000\)"):
        PcapngReader(io.BytesIO(epb("<", 0, 1, b"x")))


def test_bad_byte_order_magic_in_first_section() -> None:
    data = bytearray(simple_file())
    data[8:12] = b"\x00\x00\x00\x00"
    with pytest.raises(CaptureError, match="byte-order magic"):
        PcapngReader(io.BytesIO(bytes(data)))


def test_header_bytes_already_consumed() -> None:
    f = io.BytesIO(simple_file())
    head = f.read(4)
    _, rows = read_all(PcapngReader(f, header=head))
    assert len(rows) == 4


# -- damage ------------------------------------------------------------------------


def damaged(data: bytes) -> tuple[CaptureInfo, int]:
    reader, rows = read(data)
    assert reader.info.truncated
    assert reader.info.damage is not None and "\n" not in reader.info.damage
    assert reader.info.packets == len(rows)
    return reader.info, len(rows)


def good_prefix() -> bytes:
    return shb() + idb() + epb("<", 0, 1, b"ok")


def test_block_length_not_multiple_of_4() -> None:
    prefix = good_prefix()
    bad = bytearray(epb("<", 0, 2, b"abcd"))
    struct.pack_into("<I", bad, 4, len(bad) + 1)
    info, n = damaged(prefix + bytes(bad) + epb("<", 0, 3, b"later"))
    assert n == 1
    assert info.damage == (
        f"enhanced packet block at offset {len(prefix)}: block length {len(bad) + 1} "
        "is not a multiple of 4"
    )


def test_block_length_below_minimum() -> None:
    prefix = good_prefix()
    bad = struct.pack("<II", 6, 24) + bytes(12) + struct.pack("<I", 24)
    info, n = damaged(prefix + bad)
    assert n == 1
    assert info.damage == (
        f"enhanced packet block at offset {len(prefix)}: block length 24 is less than "
        "the minimum 32"
    )
    info, _ = damaged(shb() + struct.pack("<II", 0x77, 8) + bytes(4))
    assert (
        info.damage
        == "block of type 0x00000077 at offset 28: block length 8 is less than the minimum 12"
    )


def test_trailing_length_mismatch() -> None:
    prefix = good_prefix()
    bad = bytearray(epb("<", 0, 2, b"abcd"))
    struct.pack_into("<I", bad, len(bad) - 4, 999)
    info, n = damaged(prefix + bytes(bad))
    assert n == 1
    assert info.damage == (
        f"enhanced packet block at offset {len(prefix)}: trailing block length 999 differs "
        f"from {len(bad)}"
    )
    bad_idb = bytearray(idb())
    struct.pack_into("<I", bad_idb, len(bad_idb) - 4, 4)
    info, _ = damaged(shb() + bytes(bad_idb))
    assert info.damage is not None and info.damage.startswith(
        "interface description block at offset 28: trailing block length 4"
    )


def test_block_past_end_of_file() -> None:
    prefix = good_prefix()
    bad = epb("<", 0, 2, b"a" * 100)
    info, n = damaged(prefix + bad[:60])
    assert n == 1
    assert info.damage == (
        f"file ends inside the enhanced packet block at offset {len(prefix)} "
        f"(60 of {len(bad)} bytes)"
    )


def test_block_length_over_the_limit() -> None:
    prefix = good_prefix()
    info, _ = damaged(prefix + struct.pack("<II", 6, 0x7FFFFFF0) + bytes(100))
    assert info.damage == (
        f"enhanced packet block at offset {len(prefix)}: block length {0x7FFFFFF0} "
        f"exceeds {256 << 20}"
    )


def test_captured_length_exceeds_block() -> None:
    prefix = good_prefix()
    bad = bytearray(epb("<", 0, 2, b"abcd"))
    struct.pack_into("<I", bad, 20, 5000)
    info, n = damaged(prefix + bytes(bad))
    assert n == 1
    assert info.damage == (
        f"enhanced packet block at offset {len(prefix)}: captured length 5000 exceeds "
        f"the block length {len(bad)}"
    )


def test_epb_without_interface() -> None:
    info, n = damaged(shb() + epb("<", 0, 1, b"x"))
    assert n == 0
    assert info.damage == (
        "enhanced packet block at offset 28: interface id 0 has no interface description "
        "block (the section has 0)"
    )
    info, n = damaged(good_prefix() + epb("<", 4, 1, b"x"))
    assert n == 1 and "interface id 4" in (info.damage or "")


def test_packet_block_and_spb_without_interface() -> None:
    info, _ = damaged(shb() + pb("<", 0, 1, b"x"))
    assert info.damage == (
        "packet block at offset 28: interface id 0 has no interface description block "
        "(the section has 0)"
    )
    info, _ = damaged(shb() + spb("<", b"x"))
    assert info.damage == (
        "simple packet block at offset 28: the section has no interface description block"
    )


def test_option_runs_past_block() -> None:
    bad_opt = struct.pack("<HH", 3, 200) + b"long"
    info, n = damaged(shb(options=bad_opt) + idb() + epb("<", 0, 1, b"x"))
    assert n == 0
    assert info.damage == (
        "section header block at offset 0: option 3 of length 200 runs past the end of the block"
    )
    bad_idb = block("<", 1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 9, 50) + b"\x09")
    info, _ = damaged(shb() + bad_idb)
    assert info.damage is not None and info.damage.startswith(
        "interface description block at offset 28: option 9 of length 50 runs past"
    )


def test_unsupported_version_and_bad_later_section() -> None:
    at = len(good_prefix())
    info, n = damaged(good_prefix() + shb(version=(2, 0)) + idb() + epb("<", 0, 1, b"x"))
    assert n == 1
    assert info.damage == f"section header block at offset {at}: unsupported pcapng version 2.0"
    later = bytearray(shb(">"))
    later[8:12] = b"\x01\x02\x03\x04"
    info, n = damaged(good_prefix() + bytes(later))
    assert n == 1
    assert info.damage == (
        f"section header block at offset {at}: byte-order magic 0x01020304 is not 1a2b3c4d"
    )


def test_damage_in_a_run_of_epbs_keeps_the_good_ones() -> None:
    good = [epb("<", 0, i, bytes([i]) * 10) for i in range(50)]
    bad = bytearray(good[30])
    struct.pack_into("<I", bad, 8, 9)  # interface 9
    data = shb() + idb() + b"".join(good[:30]) + bytes(bad) + b"".join(good[31:])
    _info, n = damaged(data)
    assert n == 30


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_cut_at_every_offset(order: str, chunk: int) -> None:
    parts = [
        shb(order),
        idb(order),
        epb(order, 0, 10, b"one"),
        block(order, 5, bytes(12)),
        spb(order, b"two!"),
        idb(order, linktype=101, tsresol=9),
        epb(order, 1, 20, b"three" * 9),
        pb(order, 0, 30, b"4"),
    ]
    data = b"".join(parts)
    ends = [0]
    for p in parts:
        ends.append(ends[-1] + len(p))
    packet_ends = [ends[i + 1] for i in (2, 4, 6, 7)]
    for cut in range(len(data) + 1):
        if cut < 4:
            with pytest.raises(CaptureError):
                PcapngReader(io.BytesIO(data[:cut]))
            continue
        reader = PcapngReader(io.BytesIO(data[:cut]), chunk_bytes=chunk)
        _batches, rows = read_all(reader)
        info = reader.info
        assert info.packets == len(rows) == sum(1 for e in packet_ends if e <= cut), cut
        if cut in ends:
            assert not info.truncated, cut
        else:
            assert info.truncated, cut
            assert info.damage is not None and info.damage.startswith("file ends inside"), cut


# -- property tests ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tail=st.binary(max_size=800),
    order=st.sampled_from(["<", ">"]),
    chunk=st.sampled_from([64, 1 << 20]),
)
def test_random_bytes_after_header_never_raise(tail: bytes, order: str, chunk: int) -> None:
    reader = PcapngReader(
        io.BytesIO(shb(order) + idb(order) + tail), chunk_bytes=chunk, batch_records=5
    )
    batches = list(reader.batches())
    assert isinstance(reader.info, CaptureInfo)
    assert reader.info.packets == sum(len(b) for b in batches)
    for b in batches:
        assert int((b.offsets + b.caplens).max()) <= b.data.shape[0]


@st.composite
def block_soup(draw: st.DrawFn) -> bytes:
    """Plausible blocks in random order: the walk must cope with any sequence."""
    order = draw(st.sampled_from(["<", ">"]))
    parts = [shb(order)]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["idb", "epb", "spb", "pb", "isb", "shb", "junk"]))
        ifid = draw(st.integers(0, 3))
        data = draw(st.binary(max_size=40))
        if kind == "idb":
            parts.append(idb(order, draw(st.integers(0, 300)), tsresol=draw(st.integers(0, 255))))
        elif kind == "epb":
            parts.append(epb(order, ifid, draw(st.integers(0, (1 << 64) - 1)), data))
        elif kind == "spb":
            parts.append(spb(order, data))
        elif kind == "pb":
            parts.append(pb(order, ifid, draw(st.integers(0, (1 << 64) - 1)), data))
        elif kind == "isb":
            parts.append(block(order, 5, data))
        elif kind == "shb":
            order = draw(st.sampled_from(["<", ">"]))
            parts.append(shb(order))
        else:
            parts.append(data)
    return b"".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=block_soup(), chunk=st.sampled_from([64, 1 << 20]))
def test_random_block_sequences_never_raise(data: bytes, chunk: int) -> None:
    reader = PcapngReader(io.BytesIO(data), chunk_bytes=chunk)
    batches = list(reader.batches())
    assert reader.info.packets == sum(len(b) for b in batches)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    cut=st.integers(min_value=0, max_value=3000),
    chunk=st.sampled_from([64, 1 << 20]),
)
def test_random_mutations_never_raise(
    mutations: list[tuple[int, int]], cut: int, chunk: int
) -> None:
    base = mixed_file()
    data = bytearray(base)
    for where, value in mutations:
        data[where % len(data)] = value
    if cut < len(data):
        data = data[: max(cut, 1)]
    ident = {0, 1, 2, 3, 8, 9, 10, 11}
    ident_hit = any(where % len(base) in ident for where, _ in mutations) or len(data) < 4
    try:
        reader = PcapngReader(io.BytesIO(bytes(data)), chunk_bytes=chunk)
    except CaptureError:
        assert ident_hit
        return
    batches = list(reader.batches())
    assert reader.info.packets == sum(len(b) for b in batches)
    for b in batches:
        assert int((b.offsets + b.caplens).max()) <= b.data.shape[0]
