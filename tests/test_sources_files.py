"""Opening captures: sniffing, gzip, pipes, damage through the hashing reader, and the
shared corpus of real-world captures."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
from pathlib import Path

import pytest

from egressd.sources.base import CaptureError, CaptureInfo, CaptureReader
from egressd.sources.files import open_capture
from egressd.sources.inputs import HashingReader
from egressd.sources.pcap import PcapReader
from egressd.sources.pcapng import PcapngReader

# -- small capture builders ------------------------------------------------------


def pcap_bytes(count: int = 3, order: str = "<", magic: int = 0xA1B2C3D4) -> bytes:
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)]
    for i in range(count):
        data = bytes([i % 256]) * (20 + i % 200)
        out.append(struct.pack(order + "IIII", 1_600_000_000 + i, i, len(data), len(data)))
        out.append(data)
    return b"".join(out)


def _block(btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def pcapng_bytes(count: int = 3) -> bytes:
    out = [
        _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)),
        _block(1, struct.pack("<HHI", 1, 0, 0)),
    ]
    for i in range(count):
        data = bytes([i]) * (20 + i)
        out.append(_block(6, struct.pack("<5I", 0, 0, i, len(data), len(data)) + data))
    return b"".join(out)


def drain(reader: CaptureReader) -> list[bytes]:
    return [b.packet(i) for b in reader.batches() for i in range(len(b))]


class Pipe(io.RawIOBase):
    """Like stdin on a pipe: short reads, no seek, no tell; counts what was read."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self._data = data
        self.pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        raise io.UnsupportedOperation("pipe")

    def tell(self) -> int:
        raise io.UnsupportedOperation("pipe")

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self.pos)
        b[:n] = self._data[self.pos : self.pos + n]
        self.pos += n
        return n


# -- sniffing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (pcap_bytes(), PcapReader),
        (pcap_bytes(order=">"), PcapReader),
        (pcap_bytes(magic=0xA1B23C4D), PcapReader),
        (pcap_bytes(order=">", magic=0xA1B23C4D), PcapReader),
        (pcapng_bytes(), PcapngReader),
    ],
)
def test_sniffs_format_not_name(data: bytes, kind: type) -> None:
    reader = open_capture(io.BytesIO(data))
    assert isinstance(reader, kind)
    assert len(drain(reader)) == 3
    assert reader.info.packets == 3 and not reader.info.truncated


@pytest.mark.parametrize("make", [pcap_bytes, pcapng_bytes])
def test_gzip(make: object) -> None:
    assert callable(make)
    plain = make()
    reader = open_capture(io.BytesIO(gzip.compress(plain)))
    assert drain(reader) == drain(open_capture(io.BytesIO(plain)))
    assert not reader.info.truncated


def test_batch_records_is_passed_on() -> None:
    reader = open_capture(io.BytesIO(pcapng_bytes(5)), batch_records=2)
    assert [len(b) for b in reader.batches()] == [2, 2, 1]


def test_empty_input() -> None:
    with pytest.raises(CaptureError, match=r"^empty file$"):
        open_capture(io.BytesIO(b""))
    with pytest.raises(CaptureError, match="empty file"):
        open_capture(io.BytesIO(gzip.compress(b"")))


def test_not_a_capture() -> None:
    with pytest.raises(CaptureError) as err:
        open_capture(io.BytesIO(b"GET / HTTP/1.1\r\n"))
    assert str(err.value) == "not a pcap or pcapng capture (starts with 0x47455420)"
    with pytest.raises(CaptureError, match=r"starts with 0x0a0d\)"):
        open_capture(io.BytesIO(b"\x0a\x0d"))
    with pytest.raises(CaptureError, match="inside the gzip compression"):
        open_capture(io.BytesIO(gzip.compress(b"plain text, compressed")))


def test_gzip_that_cannot_be_decompressed() -> None:
    with pytest.raises(CaptureError, match="cannot be decompressed"):
        open_capture(io.BytesIO(b"\x1f\x8b\x08\x00garbage-garbage-garbage"))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("make", [pcap_bytes, pcapng_bytes])
def test_non_seekable_stream(gz: bool, make: object) -> None:
    assert callable(make)
    data = make(10)
    raw = gzip.compress(data) if gz else data
    pipe = Pipe(raw, step=3)
    reader = open_capture(pipe)
    assert drain(reader) == drain(open_capture(io.BytesIO(data)))
    assert pipe.pos == len(raw)


def test_cut_gzip_stream_is_damage_not_an_error() -> None:
    data = pcap_bytes(200)
    packed = gzip.compress(data)
    cut = packed[: len(packed) * 2 // 3]
    hashing = HashingReader(io.BytesIO(cut))
    reader = open_capture(hashing)
    packets = drain(reader)
    info = reader.info
    assert info.truncated and info.damage is not None
    assert 0 < len(packets) == info.packets < 200
    assert info.damage.startswith("input unreadable after offset ")
    assert "EOFError" in info.damage
    assert (hashing.size, hashing.sha256()) == (len(cut), hashlib.sha256(cut).hexdigest())


def test_corrupt_gzip_middle_still_hashes_the_whole_file() -> None:
    data = pcap_bytes(3000)
    packed = bytearray(gzip.compress(data, compresslevel=1))
    middle = len(packed) // 2
    packed[middle : middle + 64] = bytes(64)
    stored = bytes(packed) + bytes(200_000)  # plenty left after the damage
    hashing = HashingReader(Pipe(stored, step=65536))
    reader = open_capture(hashing)
    packets = drain(reader)
    assert reader.info.truncated
    assert len(packets) == reader.info.packets
    assert hashing.size == len(stored)
    assert hashing.sha256() == hashlib.sha256(stored).hexdigest()


def test_trailing_garbage_after_gzip_member() -> None:
    packed = gzip.compress(pcap_bytes(4)) + b"trailing junk"
    hashing = HashingReader(io.BytesIO(packed))
    reader = open_capture(hashing)
    assert len(drain(reader)) == 4
    assert reader.info.truncated
    assert reader.info.damage is not None and "input unreadable" in reader.info.damage
    assert hashing.size == len(packed)


@pytest.mark.parametrize("gz", [False, True])
def test_cut_at_every_offset_through_open_capture(gz: bool) -> None:
    data = pcapng_bytes(3)
    for cut in range(4, len(data) + 1):
        raw = gzip.compress(data[:cut]) if gz else data[:cut]
        reader = open_capture(io.BytesIO(raw))
        drain(reader)
        assert isinstance(reader.info, CaptureInfo)


# -- the shared corpus -----------------------------------------------------------


def shared_corpus() -> Path:
    env = os.environ.get("EGRESSD_SHARED_DIR")
    shared = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return shared / "pcaps-external"


# Simple Packet Blocks whose data was stored only up to the interface's snaplen
# (128 and 96 of 314 bytes): they are snaplen-cut records, but the manifest's
# own header walk counted cut records among EPBs only.
SPB_CUT = {
    "pcapng-test-generator-le-test202.pcapng": 2,
    "pcapng-test-generator-be-test102.pcapng": 1,
}

# Files whose capinfos count is "-" (capinfos refused them): what this reader
# gets instead, and why that is right.
UNCOUNTED = {
    # Header says version 1.4, which libpcap refuses; the one record has the
    # usual 2.4 layout and is a sound IPv6 packet, so it is read.
    "libpcap-pcap-invalid-version-1.pcap": 1,
    # Link type 284 (DSA tags) was unknown to tshark 4.0; the file is sound:
    # 8 records, which the decoder will report as an unsupported link type.
    "tcpdump-dsa.pcap": 8,
    # Header only; reserved bits in the link-type word are ignored (low 16 bits: 0).
    "libpcap-linktype-reserved-field-not-zero.pcap": 0,
    # Damaged in the very first block (SHB): nothing is read, truncated is set.
    "libpcap-shb-option-too-long.pcapng": 0,
}


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    lines = (folder / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line and not line.startswith("#")]
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


@pytest.mark.shared
def test_shared_corpus() -> None:
    folder = shared_corpus()
    if not folder.is_dir():
        pytest.skip(
            "shared capture corpus ../shared/pcaps-external not found "
            f"(looked in {folder}; set EGRESSD_SHARED_DIR to the shared folder)"
        )
    rows = manifest_rows(folder)
    assert rows, "MANIFEST.tsv lists no files"
    listed = {r["file"] for r in rows}
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.name != "MANIFEST.tsv"}
    assert on_disk <= listed, f"files not in MANIFEST.tsv: {sorted(on_disk - listed)}"
    problems: list[str] = []
    for row in rows:
        problems.extend(check_corpus_file(folder, row))
    assert not problems, "\n".join(problems)


def check_corpus_file(folder: Path, row: dict[str, str]) -> list[str]:
    name = row["file"]
    status = row["read_status"]
    with (folder / name).open("rb") as raw:
        hashing = HashingReader(raw)
        try:
            reader = open_capture(hashing)
        except CaptureError as exc:
            if status == "not_capture" or (status == "unsupported" and "not a pcap" in str(exc)):
                return []
            return [f"{name}: unexpected CaptureError {exc} (read_status {status})"]
        if status == "not_capture":
            return [f"{name}: read as {reader.info.format}, manifest says not a capture"]
        wire_cut = 0
        for batch in reader.batches():
            wire_cut += int((batch.caplens < batch.wirelens).sum())
    info = reader.info
    out: list[str] = []
    if row["capinfos_packets"] == "-":
        if name not in UNCOUNTED:
            out.append(f"{name}: capinfos has no count; add the expected count to UNCOUNTED")
        elif info.packets != UNCOUNTED[name]:
            out.append(f"{name}: {info.packets} packets, expected {UNCOUNTED[name]}")
    elif info.packets != int(row["capinfos_packets"]):
        out.append(f"{name}: {info.packets} packets, capinfos says {row['capinfos_packets']}")
    # tshark 4.0 counts pcapng custom blocks as frames as well; nothing else differs.
    if status == "ok" and row["tshark_frames"] not in ("-", ""):
        custom = info.skipped_blocks.get("CB", 0)
        if int(row["tshark_frames"]) != info.packets + custom:
            out.append(
                f"{name}: tshark frames {row['tshark_frames']} != {info.packets} packets "
                f"+ {custom} custom blocks"
            )
    want_truncated = status in ("cut_short", "damaged")
    if info.truncated != want_truncated:
        out.append(f"{name}: truncated={info.truncated} ({info.damage}), read_status {status}")
    if info.truncated and not info.damage:
        out.append(f"{name}: truncated without a damage message")
    # The manifest's link type and cut-record columns come from its own header
    # walk, which went on past damage that tshark and this reader stop at; for a
    # file nobody could read (damaged, capinfos "-") they describe blocks never read.
    if not (status == "damaged" and row["capinfos_packets"] == "-"):
        link = row["link_type"]
        if link not in ("-", ""):
            want = {int(x) for x in link.split(" ")[0].split(",")}
            if info.link_types != want:
                out.append(f"{name}: link types {sorted(info.link_types)}, manifest {link}")
        cut = row["snaplen_cut_records"]
        if cut not in ("-", "") and wire_cut - SPB_CUT.get(name, 0) != int(cut):
            out.append(f"{name}: {wire_cut} records cut by snaplen, manifest {cut}")
    if hashing.size != int(row["size_bytes"]) or hashing.sha256() != row["sha256"]:
        out.append(f"{name}: file bytes were not all read through the hashing wrapper")
    return out
