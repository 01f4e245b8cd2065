"""SNI of QUIC Initial packets: RFC 9001 vectors, real aioquic datagrams, captures, fuzz."""

from __future__ import annotations

import datetime
from collections import defaultdict
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicProtocolVersion
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.names.quic import (
    VERSION_1,
    VERSION_2,
    Incomplete,
    QuicHelloAssembler,
    client_initial_keys,
    looks_like_initial,
    quic_initial_sni,
)
from egressd.names.tls import MAX_HANDSHAKE_BYTES
from tests.conftest import require_shared
from tests.test_names_tls import tshark_names

DCID = bytes.fromhex("8394c8f03e515708")

# RFC 9001 Appendix A.2: the client Initial for "example.com", protected.
RFC9001_CLIENT_INITIAL = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934"
)

SERVER_ADDR = ("192.0.2.1", 443)


def client(name: str = "www.Example.org", alpn: list[str] | None = None,
           version: int = VERSION_1) -> tuple[QuicConnection, list[bytes]]:
    """A real aioquic client and the datagrams it sends first."""
    config = QuicConfiguration(is_client=True, server_name=name, alpn_protocols=alpn or ["h3"])
    config.original_version = version
    config.supported_versions = [version]
    conn = QuicConnection(configuration=config)
    conn.connect(SERVER_ADDR, now=0.0)
    return conn, [data for data, _ in conn.datagrams_to_send(now=0.0)]


def big_alpn() -> list[str]:
    return ["h3", *(f"vendor-protocol-{i:03d}-" + "x" * 200 for i in range(8))]


def check_type(result: object) -> None:
    assert result is None or isinstance(result, (str, Incomplete))


# -- key derivation and the RFC packet ---------------------------------------------------------


def test_client_keys_match_rfc9001_a1() -> None:
    keys = client_initial_keys(DCID)
    assert keys.key.hex() == "1f369613dd76d5467730efcbe3b1a22d"
    assert keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"
    assert keys.hp.hex() == "9f50449e04a0e810283a1e9933adedd2"


def test_client_keys_match_rfc9369_a1() -> None:
    keys = client_initial_keys(DCID, VERSION_2)
    assert keys.key.hex() == "8b1a0bc121284290a29e0971b5cd045d"
    assert keys.iv.hex() == "91f73e2351d8fa91660e909f"
    assert keys.hp.hex() == "45b95e15235d6f45a6b19cbcb0294ba9"


def test_rfc9001_client_initial_decrypts_to_example_com() -> None:
    assert len(RFC9001_CLIENT_INITIAL) == 1200
    assert looks_like_initial(RFC9001_CLIENT_INITIAL)
    assert quic_initial_sni(RFC9001_CLIENT_INITIAL) == "example.com"


def test_coalesced_packets_are_walked_by_length() -> None:
    # Twice the same packet in one datagram, then a short-header packet.
    datagram = RFC9001_CLIENT_INITIAL * 2 + b"\x40" + bytes(30)
    assert quic_initial_sni(datagram) == "example.com"


@pytest.mark.parametrize("index", [30, 600, 1199])  # ciphertext, ciphertext, tag
def test_corrupted_packet_gives_none(index: int) -> None:
    broken = bytearray(RFC9001_CLIENT_INITIAL)
    broken[index] ^= 0x01
    assert quic_initial_sni(bytes(broken)) is None


def test_other_dcid_or_version_gives_none() -> None:
    other_dcid = bytearray(RFC9001_CLIENT_INITIAL)
    other_dcid[6] ^= 0x01
    assert quic_initial_sni(bytes(other_dcid)) is None
    v2 = RFC9001_CLIENT_INITIAL[:1] + VERSION_2.to_bytes(4, "big") + RFC9001_CLIENT_INITIAL[5:]
    assert quic_initial_sni(v2) is None
    unknown = RFC9001_CLIENT_INITIAL[:1] + b"\x1a\x2a\x3a\x4a" + RFC9001_CLIENT_INITIAL[5:]
    assert not looks_like_initial(unknown)
    assert quic_initial_sni(unknown) is None


def test_truncated_packet_gives_none() -> None:
    for cut in (0, 1, 5, 7, 18, 19, 20, 40, 600, 1199):
        assert quic_initial_sni(RFC9001_CLIENT_INITIAL[:cut]) is None


# -- real aioquic clients ----------------------------------------------------------------------


def test_real_client_initial_gives_name() -> None:
    _, datagrams = client("WWW.Example.ORG.")
    assert len(datagrams) == 1 and looks_like_initial(datagrams[0])
    assert quic_initial_sni(datagrams[0]) == "www.example.org"


def test_real_client_quic_v2() -> None:
    _, datagrams = client("v2.example", version=QuicProtocolVersion.VERSION_2)
    assert datagrams[0][1:5] == VERSION_2.to_bytes(4, "big")
    assert looks_like_initial(datagrams[0])
    assert quic_initial_sni(datagrams[0]) == "v2.example"


def test_hello_over_several_datagrams_in_any_order() -> None:
    _, datagrams = client("split.example", alpn=big_alpn())
    assert len(datagrams) >= 2
    first = quic_initial_sni(datagrams[0])
    assert isinstance(first, Incomplete) and first.needed > 1200
    assembler = QuicHelloAssembler()
    results = [assembler.feed(d) for d in datagrams]
    assert all(r == first for r in results[:-1])
    assert results[-1] == "split.example"
    assert assembler.feed(b"anything") == "split.example"  # the answer stays
    backwards = QuicHelloAssembler()
    results = [backwards.feed(d) for d in reversed(datagrams)]
    assert results[-1] == "split.example"
    assert all(isinstance(r, Incomplete) for r in results[:-1])


def test_garbage_between_datagrams_keeps_the_state() -> None:
    _, datagrams = client("keep.example", alpn=big_alpn())
    assembler = QuicHelloAssembler()
    assert isinstance(assembler.feed(datagrams[0]), Incomplete)
    assert isinstance(assembler.feed(b"\x40" + bytes(50)), Incomplete)
    for d in datagrams[1:]:
        result = assembler.feed(d)
    assert result == "keep.example"


def test_one_assembler_caches_keys_per_dcid() -> None:
    assembler = QuicHelloAssembler()
    _, datagrams = client("cache.example", alpn=big_alpn())
    for d in datagrams:
        assembler.feed(d)
    assert len(assembler._keys) == 1  # derived once for the flow's DCID


@pytest.fixture(scope="module")
def server_datagrams() -> list[bytes]:
    """What a real aioquic server answers to a client Initial (Initial + Handshake)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.certificate, config.private_key = cert, key
    _, sent = client("server.example")
    dcid = sent[0][6:6 + sent[0][5]]
    server = QuicConnection(configuration=config, original_destination_connection_id=dcid)
    server.receive_datagram(sent[0], ("198.51.100.7", 50000), now=0.0)
    return [data for data, _ in server.datagrams_to_send(now=0.0)]


def test_server_initial_gives_none(server_datagrams: list[bytes]) -> None:
    assert server_datagrams
    assert looks_like_initial(server_datagrams[0])
    for d in server_datagrams:
        assert quic_initial_sni(d) is None


def test_not_quic_gives_none() -> None:
    for payload in (b"", b"\x00", b"\xc0\x00\x00\x00\x01", bytes(1200), b"GET / HTTP/1.1\r\n",
                    b"\xc0\x00\x00\x00\x01\xff" + bytes(1200)):
        assert quic_initial_sni(payload) is None


# -- hand-made frames, protected by aioquic ----------------------------------------------------


def varint(value: int) -> bytes:
    for size, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | prefix << (8 * size - 8)).to_bytes(size, "big")
    raise ValueError(value)


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def protect(frames: bytes, dcid: bytes = DCID, pn: int = 0, version: int = VERSION_1) -> bytes:
    """A client Initial carrying ``frames`` (padded to 1200 bytes), protected by aioquic."""
    payload = frames + bytes(max(0, 1100 - len(frames)))
    first = 0xC3 if version == VERSION_1 else 0xD3
    header = (bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
              + b"\x00\x00" + varint(4 + len(payload) + 16).rjust(2, b"\x40")
              + pn.to_bytes(4, "big"))
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=True, version=version)
    return pair.encrypt_packet(header, payload, pn)


def hello_message() -> bytes:
    """The ClientHello handshake message of a real aioquic client, decrypted by aioquic."""
    _, datagrams = client("frames.example")
    dcid = datagrams[0][6:6 + datagrams[0][5]]
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=False, version=VERSION_1)
    pn_offset = 6 + len(dcid) + 1 + datagrams[0][6 + len(dcid)] + 1 + 2
    end = pn_offset + (int.from_bytes(datagrams[0][pn_offset - 2:pn_offset], "big") & 0x3FFF)
    _, payload, _ = pair.decrypt_packet(datagrams[0][:end], pn_offset, 0)
    assert payload[:2] == b"\x06\x00" and payload[2] >> 6 == 1  # CRYPTO at 0, 2-byte length
    length = int.from_bytes(payload[2:4], "big") & 0x3FFF
    return payload[4:4 + length]


def test_protect_helper_round_trips_through_the_parser() -> None:
    assert quic_initial_sni(protect(crypto(0, hello_message()))) == "frames.example"
    v2 = protect(crypto(0, hello_message()), version=VERSION_2)
    assert looks_like_initial(v2)
    assert quic_initial_sni(v2) == "frames.example"


def test_ack_ping_padding_and_out_of_order_crypto_frames() -> None:
    msg = hello_message()
    a, b, c = msg[:10], msg[10:100], msg[100:]
    ack = b"\x02" + varint(7) + varint(100) + varint(2) + varint(1) + varint(0) + varint(1)
    ack += varint(2) + varint(0)
    ack_ecn = b"\x03" + varint(7) + varint(0) + varint(0) + varint(3) + varint(1) * 3
    frames = (ack + b"\x01" + crypto(100, c) + b"\x00\x00" + ack_ecn + crypto(0, a)
              + b"\x01" + crypto(10, b))
    assert quic_initial_sni(protect(frames, pn=1)) == "frames.example"


def test_crypto_frames_over_several_packets_and_datagrams() -> None:
    msg = hello_message()
    first, second = protect(crypto(0, msg[:50]), pn=0), protect(crypto(50, msg[50:]), pn=1)
    assert quic_initial_sni(first) == Incomplete(len(msg))
    assert quic_initial_sni(second) == Incomplete(4)  # data, but not from offset 0
    assert quic_initial_sni(first[:1200] + second[:1200]) == "frames.example"  # coalesced
    assembler = QuicHelloAssembler()
    assert assembler.feed(second) == Incomplete(4)
    assert assembler.feed(first) == "frames.example"


def test_walk_stops_at_other_frames() -> None:
    msg = hello_message()
    close = b"\x1c" + varint(0x0A) + varint(0) + varint(0)
    assert quic_initial_sni(protect(close + crypto(0, msg))) is None
    assert quic_initial_sni(protect(crypto(0, msg) + close)) == "frames.example"
    assert quic_initial_sni(protect(b"\x06" + varint(0) + varint(5000) + msg)) is None
    assert quic_initial_sni(protect(b"\x02" + varint(1))) is None  # truncated ACK


def test_hello_too_big_or_not_a_client_hello_gives_none() -> None:
    too_big = b"\x01" + (MAX_HANDSHAKE_BYTES).to_bytes(3, "big") + bytes(100)
    assert quic_initial_sni(protect(crypto(0, too_big))) is None
    server_hello = b"\x02" + hello_message()[1:]
    assert quic_initial_sni(protect(crypto(0, server_hello))) is None
    assert quic_initial_sni(protect(crypto(1 << 40, hello_message()))) is None
    assembler = QuicHelloAssembler()
    assert assembler.feed(protect(crypto(0, too_big))) is None
    assert assembler.feed(protect(crypto(0, hello_message()))) is None  # decided: no name


# -- never raises ------------------------------------------------------------------------------


@given(st.binary(max_size=1500))
def test_fuzz_random_datagrams(data: bytes) -> None:
    check_type(quic_initial_sni(data))
    check_type(quic_initial_sni(RFC9001_CLIENT_INITIAL[:7] + data))


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1199), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 1200))
def test_fuzz_mutated_rfc_packet(flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(RFC9001_CLIENT_INITIAL)
    for index, value in flips:
        mutated[index] = value
    check_type(quic_initial_sni(bytes(mutated)))
    check_type(quic_initial_sni(bytes(mutated[:cut])))


@settings(deadline=None, max_examples=50)
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_fuzz_assembler_sequences(extra: list[bytes]) -> None:
    _, datagrams = client("fuzz.example", alpn=big_alpn())
    assembler = QuicHelloAssembler()
    for d in [*extra, datagrams[0], *extra]:
        check_type(assembler.feed(d))
    for d in datagrams[1:]:
        result = assembler.feed(d)
    assert result == "fuzz.example"


# -- real captures -----------------------------------------------------------------------------


def quic_client_names(path: Path) -> tuple[set[str], int]:
    """Names from the client datagrams to UDP port 443, one assembler per flow."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    flows: dict[tuple[object, ...], QuicHelloAssembler] = defaultdict(QuicHelloAssembler)
    names: set[str] = set()
    incomplete = 0
    for pkt in rdpcap(str(path)):
        if UDP not in pkt or pkt[UDP].dport != 443:
            continue
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if ip is None:
            continue
        key = (ip.src, pkt[UDP].sport, ip.dst)
        result = flows[key].feed(bytes(pkt[UDP].payload))
        if isinstance(result, str):
            names.add(result)
        elif isinstance(result, Incomplete):
            incomplete += 1
    return names, incomplete


@pytest.mark.shared
@pytest.mark.parametrize("file", ["zeek-curl-8.1.2-dev-http3-www-google-de.pcap",
                                  "zeek-firefox-102.13.0esr-blog-cloudflare-com.pcap"])
def test_names_match_tshark_on_real_captures(file: str) -> None:
    path = require_shared("pcaps-external") / file
    expected = tshark_names(path)
    assert expected
    names, _ = quic_client_names(path)
    assert names == expected
