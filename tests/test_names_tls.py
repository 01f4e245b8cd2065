"""SNI of TLS ClientHellos: real hellos from OpenSSL (via ``ssl``), split, re-framed, broken."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.names.tls import (
    MAX_HANDSHAKE_BYTES,
    MAX_HELLO_BYTES,
    Incomplete,
    client_hello_sni,
    hello_sni,
    looks_like_client_hello,
    normalize_hostname,
)
from tests.conftest import require_shared

NAME = "api.backup-vendor.example"


def real_hello(server_hostname: str | None = NAME, *, alpn: list[str] | None = None,
               ciphers: str | None = None) -> bytes:
    """The first flight of an OpenSSL client: one handshake record holding the ClientHello."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if ciphers:
        ctx.set_ciphers(ciphers)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


HELLO = real_hello()


def message_of(record_stream: bytes) -> bytes:
    """The handshake message of a single-record hello."""
    assert record_stream[0] == 22
    assert len(record_stream) == 5 + int.from_bytes(record_stream[3:5], "big")
    return record_stream[5:]


def records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """``message`` re-framed into handshake records of the given sizes (the last takes the rest)."""
    out, pos = bytearray(), 0
    for size in [*sizes, len(message)]:
        chunk = message[pos:pos + size]
        if not chunk:
            break
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def split_hello(message: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(fixed fields up to the extensions, [(type, body)]) of a ClientHello message."""
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    head, ext_block = body[:pos], body[pos + 2:]
    exts, i = [], 0
    while i < len(ext_block):
        etype = int.from_bytes(ext_block[i:i + 2], "big")
        n = int.from_bytes(ext_block[i + 2:i + 4], "big")
        exts.append((etype, ext_block[i + 4:i + 4 + n]))
        i += 4 + n
    return head, exts


def join_hello(head: bytes, exts: list[tuple[int, bytes]]) -> bytes:
    block = b"".join(t.to_bytes(2, "big") + len(b).to_bytes(2, "big") + b for t, b in exts)
    body = head + len(block).to_bytes(2, "big") + block
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_body(name: bytes, name_type: int = 0) -> bytes:
    entry = bytes([name_type]) + len(name).to_bytes(2, "big") + name
    return len(entry).to_bytes(2, "big") + entry


def with_sni(message: bytes, body: bytes) -> bytes:
    head, exts = split_hello(message)
    return join_hello(head, [(t, body if t == 0 else b) for t, b in exts])


def padded_to(message: bytes, size: int) -> bytes:
    """The hello grown to ``size`` bytes with its padding extension (RFC 7685)."""
    head, exts = split_hello(message)
    bare = [(t, b) for t, b in exts if t != 21]
    grown = join_hello(head, [*bare, (21, b"")])
    return join_hello(head, [*bare, (21, bytes(size - len(grown)))])


def check_type(result: object) -> None:
    assert result is None or isinstance(result, (str, Incomplete))
    if isinstance(result, Incomplete):
        assert type(result.needed) is int and 0 < result.needed <= MAX_HELLO_BYTES


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given_name", "expected"), [
    (NAME, NAME),
    ("API.Backup-Vendor.EXAMPLE", NAME),
    ("api.backup-vendor.example.", NAME),
    ("localhost", "localhost"),
    ("_dmarc.x-1.example", "_dmarc.x-1.example"),
])
def test_real_hello_gives_normalized_name(given_name: str, expected: str) -> None:
    hello = real_hello(given_name)
    assert looks_like_client_hello(hello)
    assert client_hello_sni(hello) == expected
    assert hello_sni(message_of(hello)) == expected


def test_no_server_hostname_gives_none() -> None:
    hello = real_hello(None)
    assert looks_like_client_hello(hello)
    assert client_hello_sni(hello) is None


def test_every_split_point_asks_for_the_right_total() -> None:
    for cut in range(len(HELLO)):
        expected = Incomplete(5) if cut < 5 else Incomplete(len(HELLO))
        assert client_hello_sni(HELLO[:cut]) == expected, cut
    assert client_hello_sni(HELLO) == NAME


@pytest.mark.parametrize("sizes", [[1], [3], [1, 1, 1, 1], [100, 100], [4, 200, 7], [50] * 20])
def test_hello_reframed_into_several_records(sizes: list[int]) -> None:
    stream = records(message_of(HELLO), sizes)
    assert client_hello_sni(stream) == NAME
    last = 0
    for cut in range(len(stream)):
        result = client_hello_sni(stream[:cut])
        assert isinstance(result, Incomplete), cut
        assert cut < result.needed <= len(stream)
        assert result.needed >= last  # the need only grows as more is known
        last = result.needed
    assert last == len(stream)


def test_records_may_use_any_tls_record_version() -> None:
    for version in (b"\x03\x00", b"\x03\x01", b"\x03\x03"):
        assert client_hello_sni(records(message_of(HELLO), [200], version)) == NAME
    assert client_hello_sni(records(message_of(HELLO), [], b"\x03\x09")) is None


def test_bytes_after_the_hello_are_ignored() -> None:
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert client_hello_sni(HELLO + ccs + b"\x17\x03\x03\x00\x10" + bytes(16)) == NAME


def test_big_hello_from_many_alpn_protocols_and_ciphers() -> None:
    alpn = ["h2", "http/1.1"] + [f"vendor-protocol-{i:04d}-" + "x" * 40 for i in range(60)]
    hello = real_hello("Big.Example", alpn=alpn, ciphers="ALL:@SECLEVEL=0")
    assert len(hello) > 3000
    assert client_hello_sni(hello) == "big.example"
    # Two TCP segments of an ordinary MSS.
    assert client_hello_sni(hello[:1448]) == Incomplete(len(hello))
    assert client_hello_sni(records(message_of(hello), [1000, 1000])) == "big.example"


def test_padded_hello_up_to_the_cap() -> None:
    message = message_of(HELLO)
    biggest = padded_to(message, MAX_HANDSHAKE_BYTES)
    assert len(biggest) == MAX_HANDSHAKE_BYTES
    assert hello_sni(biggest) == NAME
    assert client_hello_sni(records(biggest, [])) == NAME
    stream = records(biggest, [1400] * 16)
    assert len(stream) <= MAX_HELLO_BYTES
    assert client_hello_sni(stream) == NAME
    # Two records known (one partly here), and at least one more header to come.
    assert client_hello_sni(stream[:1500]) == Incomplete(2 * 1405 + 5 + len(biggest) - 2800)


def test_hello_over_the_cap_gives_none() -> None:
    message = message_of(HELLO)
    too_big = padded_to(message, MAX_HANDSHAKE_BYTES + 1)
    assert hello_sni(too_big) is None
    stream = records(too_big, [16384])
    assert client_hello_sni(stream) is None
    assert client_hello_sni(stream[:100]) is None  # known too big from the header already
    # Many tiny records: the headers alone push the stream past the cap.
    tiny = records(padded_to(message, 3000), [1] * 3000)
    assert client_hello_sni(tiny) is None


def test_ech_outer_name_is_returned() -> None:
    head, exts = split_hello(message_of(HELLO))
    outer = join_hello(head, [(t, sni_body(b"public.ech.example") if t == 0 else b)
                              for t, b in exts] + [(0xFE0D, b"\x00" + bytes(40))])
    assert client_hello_sni(records(outer, [])) == "public.ech.example"


def test_first_host_name_entry_is_used() -> None:
    other = b"\x01\x00\x03abc"
    body = b"\x00\x00" + other + b"\x00\x00\x0chost.example"
    body = (len(body) - 2).to_bytes(2, "big") + body[2:]
    assert hello_sni(with_sni(message_of(HELLO), body)) == "host.example"


@pytest.mark.parametrize("raw", [
    b"", b"has space.example", b"a..b", b".example", b"example..", b"x" * 64 + b".example",
    (b"a" * 63 + b".") * 4, b"caf\xc3\xa9.example", b"\xff", b"a/b.example", b"a\x00b",
    b"*.example",
])
def test_invalid_hostnames_give_none(raw: bytes) -> None:
    assert normalize_hostname(raw) is None
    assert hello_sni(with_sni(message_of(HELLO), sni_body(raw))) is None


def test_longest_valid_hostname() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert hello_sni(with_sni(message_of(HELLO), sni_body(name.encode() + b"."))) == name
    assert hello_sni(with_sni(message_of(HELLO), sni_body(b"x" + name.encode()))) is None


# -- not a ClientHello -------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"\x17\x03\x03\x00\x05hello",  # application data
    b"\x15\x03\x03\x00\x02\x02\x28",  # alert
    b"\x14\x03\x03\x00\x01\x01",  # change cipher spec
    b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",  # ServerHello type
    b"\x16\x03\x03\x00\x00",  # empty handshake record
    b"\x16\x03\x03\x40\x01" + bytes(10),  # record longer than TLS allows
    b"\x80\x2e\x01\x00\x02\x00\x15",  # SSLv2-compatible hello
    b"\x16\x02\x00",
    b"GET / HTTP/1.1\r\nHost: x.example\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
])
def test_not_a_client_hello_gives_none(payload: bytes) -> None:
    assert client_hello_sni(payload) is None


def test_short_prefixes_of_a_handshake_record() -> None:
    assert client_hello_sni(b"") == Incomplete(5)
    assert client_hello_sni(b"\x16") == Incomplete(5)
    assert client_hello_sni(b"\x16\x03\x01\x02") == Incomplete(5)


def test_inconsistent_lengths_give_none() -> None:
    message = bytearray(message_of(HELLO))
    longer = bytes(message[:3]) + bytes([message[3] + 1]) + bytes(message[4:]) + b"\x00"
    assert hello_sni(longer) is None  # extensions no longer fill the body
    assert hello_sni(bytes(message[:-1])) is None
    # The message claims one byte more than the record carries: the next "record" is garbage.
    short_record = bytearray(HELLO)
    short_record[6:9] = (len(message) - 3).to_bytes(3, "big")
    assert client_hello_sni(bytes(short_record) + b"\x00" * 8) is None
    head, exts = split_hello(bytes(message))
    assert hello_sni(join_hello(head, [*exts, exts[0]])) is None  # duplicate extension


def test_prefilter() -> None:
    assert looks_like_client_hello(HELLO)
    assert not looks_like_client_hello(HELLO[:5])
    assert not looks_like_client_hello(b"\x17" + HELLO[1:])
    assert not looks_like_client_hello(b"\x16\x03\x03\x00\x10\x02" + bytes(16))


def test_every_truncation_and_every_byte_flip_never_raises() -> None:
    for cut in range(len(HELLO) + 1):
        check_type(client_hello_sni(HELLO[:cut]))
        check_type(hello_sni(message_of(HELLO)[:cut]))
    for i in range(len(HELLO)):
        mutated = bytearray(HELLO)
        mutated[i] ^= 0xFF
        check_type(client_hello_sni(bytes(mutated)))


@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_type(client_hello_sni(data))
    check_type(client_hello_sni(b"\x16\x03\x01" + data))
    assert hello_sni(data) is None or isinstance(hello_sni(data), str)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(HELLO)))
def test_fuzz_mutated_real_hello(flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(HELLO)
    for index, value in flips:
        mutated[index] = value
    check_type(client_hello_sni(bytes(mutated)))
    check_type(client_hello_sni(bytes(mutated[:cut])))
    check_type(hello_sni(bytes(mutated[5:])))


# -- real captures -----------------------------------------------------------------------------


def tshark_names(path: Path) -> set[str]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    out = subprocess.run(
        ["tshark", "-r", str(path), "-Y", "tls.handshake.type==1",
         "-T", "fields", "-e", "tls.handshake.extensions_server_name"],
        check=True, capture_output=True, text=True).stdout
    return {n.strip().lower() for line in out.splitlines() for n in line.split(",") if n.strip()}


def tcp_client_names(path: Path) -> set[str]:
    """Names from the first payload bytes of every TCP direction, fed segment by segment."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    segments: dict[tuple[object, ...], list[tuple[int, bytes]]] = defaultdict(list)
    for pkt in rdpcap(str(path)):
        if TCP not in pkt:
            continue
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        payload = bytes(pkt[TCP].payload)
        if ip is None or not payload:
            continue
        key = (ip.src, pkt[TCP].sport, ip.dst, pkt[TCP].dport)
        segments[key].append((pkt[TCP].seq, payload))
    names: set[str] = set()
    for segs in segments.values():
        stream, next_seq = b"", segs[0][0]
        for seq, payload in sorted(segs):
            if seq != next_seq:
                continue  # retransmission or gap
            stream += payload
            next_seq = seq + len(payload)
            result = client_hello_sni(stream)
            if not isinstance(result, Incomplete):
                if result is not None:
                    names.add(result)
                break
    return names


@pytest.mark.shared
@pytest.mark.parametrize("file", ["zeek-chrome-34-google.pcap", "PcapPlusPlus-tls2.pcap"])
def test_names_match_tshark_on_real_captures(file: str) -> None:
    path = require_shared("pcaps-external") / file
    expected = tshark_names(path)
    assert expected
    assert tcp_client_names(path) == expected
