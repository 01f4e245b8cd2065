"""Decoders: every link type and layout, damage at every byte, and scalar == vectorized."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from egressd.decode import linktypes as lt
from egressd.decode.batch import Decoded, decode_batch, decode_scalar_batch
from egressd.decode.scalar import FRAG_FIRST, FRAG_LATER, FRAG_NONE, Packet, decode_packet
from egressd.model import RecordBatch

V4 = b"\x00" * 10 + b"\xff\xff"
TS = 1_772_352_000 * 10**9


def mapped(ip: str) -> bytes:
    return V4 + bytes(int(x) for x in ip.split("."))


def decode(linktype: int, pkt: ScapyPacket | bytes) -> Packet | str:
    return decode_packet(linktype, bytes(pkt))


def batch_of(items: list[tuple[int, bytes]]) -> RecordBatch:
    return RecordBatch.from_packets([(TS + i, ltype, data) for i, (ltype, data) in
                                     enumerate(items)])


def assert_same(a: Decoded, b: Decoded) -> None:
    for name in Decoded.__slots__:
        left, right = getattr(a, name), getattr(b, name)
        assert np.array_equal(left, right), f"column {name} differs: {left} != {right}"


TCP4 = IP(src="10.0.0.1", dst="203.0.113.9") / TCP(sport=40000, dport=443, flags="S")
UDP6 = IPv6(src="fd00::1", dst="2001:db8::9") / UDP(sport=5353, dport=53) / Raw(b"q" * 10)


def sll2(proto: int, payload: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x00" * 8) + payload


LAYOUTS: list[tuple[str, int, bytes]] = [
    ("ethernet", lt.LINKTYPE_ETHERNET, bytes(Ether() / TCP4)),
    ("dot1q", lt.LINKTYPE_ETHERNET, bytes(Ether() / Dot1Q(vlan=10) / TCP4)),
    ("qinq-88a8", lt.LINKTYPE_ETHERNET, bytes(Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=10) / TCP4)),
    ("qinq-9100", lt.LINKTYPE_ETHERNET,
     bytes(Ether(type=0x9100) / Dot1Q(vlan=5) / Dot1Q(vlan=10) / TCP4)),
    ("sll", lt.LINKTYPE_LINUX_SLL, bytes(CookedLinux(proto=0x0800) / TCP4)),
    ("sll2", lt.LINKTYPE_LINUX_SLL2, sll2(0x0800, bytes(TCP4))),
    ("raw101", lt.LINKTYPE_RAW, bytes(TCP4)),
    ("raw12", lt.LINKTYPE_RAW_OLD_12, bytes(TCP4)),
    ("raw14", lt.LINKTYPE_RAW_OLD_14, bytes(TCP4)),
    ("ipv4", lt.LINKTYPE_IPV4, bytes(TCP4)),
    ("null-le", lt.LINKTYPE_NULL, struct.pack("<I", 2) + bytes(TCP4)),
    ("null-be", lt.LINKTYPE_NULL, struct.pack(">I", 2) + bytes(TCP4)),
    ("loop", lt.LINKTYPE_LOOP, struct.pack(">I", 2) + bytes(TCP4)),
]


@pytest.mark.parametrize(("name", "linktype", "data"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_every_link_layout_gives_the_same_ipv4_tcp_fields(name: str, linktype: int,
                                                          data: bytes) -> None:
    pkt = decode_packet(linktype, data)
    assert isinstance(pkt, Packet), pkt
    assert pkt[:10] == Packet(4, 6, mapped("10.0.0.1"), mapped("203.0.113.9"), 40000, 443, 0x02,
                              40, FRAG_NONE, 0)[:10]
    # The transport header and the end of the IP payload, in the packet's own bytes.
    assert pkt.l4_end == len(data) and pkt.l4 == len(data) - 20
    assert data[pkt.l4:pkt.l4 + 2] == (40000).to_bytes(2, "big")


@pytest.mark.parametrize(("linktype", "prefix"), [
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x86DD))[:14]),
    (lt.LINKTYPE_IPV6, b""),
    (lt.LINKTYPE_RAW, b""),
    (lt.LINKTYPE_NULL, struct.pack("<I", 30)),
    (lt.LINKTYPE_NULL, struct.pack("<I", 24)),
    (lt.LINKTYPE_LOOP, struct.pack(">I", 28)),
    (lt.LINKTYPE_LINUX_SLL2, sll2(0x86DD, b"")),
])
def test_ipv6_udp_on_each_link(linktype: int, prefix: bytes) -> None:
    pkt = decode_packet(linktype, prefix + bytes(UDP6))
    assert isinstance(pkt, Packet)
    assert (pkt.version, pkt.proto, pkt.sport, pkt.dport, pkt.ip_bytes) == (6, 17, 5353, 53, 58)
    assert pkt.src == bytes.fromhex("fd000000000000000000000000000001")


def test_ipv6_extension_header_chain_reaches_tcp() -> None:
    chain = (IPv6(src="fd00::1", dst="2001:db8::9") / IPv6ExtHdrHopByHop()
             / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=["2001:db8::1"])
             / AH(nh=6, payloadlen=4, icv=b"\x00" * 12) / TCP(sport=1, dport=2, flags="PA"))
    pkt = decode(lt.LINKTYPE_RAW, chain)
    assert isinstance(pkt, Packet)
    assert (pkt.proto, pkt.sport, pkt.dport, pkt.tcp_flags) == (6, 1, 2, 0x18)


def test_ipv4_options_are_skipped() -> None:
    pkt = decode(lt.LINKTYPE_RAW, IP(src="10.0.0.1", dst="1.2.3.4", options=b"\x01" * 8)
                 / UDP(sport=7, dport=9))
    assert isinstance(pkt, Packet)
    assert (pkt.sport, pkt.dport, pkt.ip_bytes) == (7, 9, 36)


def test_ipv4_fragments_first_carries_ports_later_do_not() -> None:
    big = IP(src="10.0.0.1", dst="1.2.3.4", id=777) / UDP(sport=5000, dport=53) / Raw(b"x" * 3000)
    from scapy.layers.inet import fragment

    frags = fragment(big, fragsize=1000)
    first = decode(lt.LINKTYPE_RAW, frags[0])
    later = decode(lt.LINKTYPE_RAW, frags[1])
    assert isinstance(first, Packet) and isinstance(later, Packet)
    assert (first.frag, first.frag_id, first.sport, first.dport) == (FRAG_FIRST, 777, 5000, 53)
    assert (later.frag, later.frag_id, later.sport, later.dport) == (FRAG_LATER, 777, -1, -1)
    assert later.proto == 17


def test_ipv6_fragments() -> None:
    base = IPv6(src="fd00::1", dst="2001:db8::9")
    first = decode(lt.LINKTYPE_RAW, base / IPv6ExtHdrFragment(id=99, m=1, offset=0)
                   / UDP(sport=1, dport=2) / Raw(b"a" * 8))
    later = decode(lt.LINKTYPE_RAW, base / IPv6ExtHdrFragment(id=99, m=0, offset=2, nh=17)
                   / Raw(b"b" * 8))
    atomic = decode(lt.LINKTYPE_RAW, base / IPv6ExtHdrFragment(id=5, m=0, offset=0)
                    / UDP(sport=1, dport=2))
    assert isinstance(first, Packet) and isinstance(later, Packet) and isinstance(atomic, Packet)
    assert (first.frag, first.frag_id, first.sport) == (FRAG_FIRST, 99, 1)
    assert (later.frag, later.frag_id, later.proto, later.sport) == (FRAG_LATER, 99, 17, -1)
    assert atomic.frag == FRAG_NONE


def test_icmp_type_and_code_in_port_fields() -> None:
    pkt = decode(lt.LINKTYPE_RAW, IP(src="10.0.0.1", dst="1.2.3.4") / ICMP(type=3, code=4))
    assert isinstance(pkt, Packet)
    assert (pkt.proto, pkt.sport, pkt.dport) == (1, 3, 4)


def test_sctp_ports_and_other_protocols_without_ports() -> None:
    sctp = decode(lt.LINKTYPE_RAW, IP(src="10.0.0.1", dst="1.2.3.4") / SCTP(sport=9, dport=10))
    gre = decode(lt.LINKTYPE_RAW, IP(src="10.0.0.1", dst="1.2.3.4", proto=47) / Raw(b"\0" * 8))
    assert isinstance(sctp, Packet) and isinstance(gre, Packet)
    assert (sctp.proto, sctp.sport, sctp.dport) == (132, 9, 10)
    assert (gre.proto, gre.sport, gre.dport) == (47, -1, -1)


@pytest.mark.parametrize(("linktype", "data", "reason"), [
    (lt.LINKTYPE_ETHERNET, b"\x00" * 13, "truncated_link"),
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x0806)) + b"\0" * 28, "non_ip"),
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x8100)) + b"\0\x05", "truncated_link"),
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x8100)) + (b"\0\x05\x81\x00" * 4) + bytes(TCP4),
     "too_many_vlan_tags"),
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x0800)), "truncated_ip"),
    (lt.LINKTYPE_RAW, b"\x45" + b"\0" * 10, "truncated_ip"),
    (lt.LINKTYPE_RAW, b"\x75" + b"\0" * 40, "bad_ip_version"),
    (lt.LINKTYPE_IPV4, bytes(UDP6), "bad_ip_version"),
    (lt.LINKTYPE_RAW, b"\x44" + b"\0" * 39, "bad_ipv4_header"),
    (lt.LINKTYPE_RAW, bytes(TCP4)[:24], "truncated_transport"),
    (lt.LINKTYPE_RAW, bytes(IPv6(nh=0) / IPv6ExtHdrHopByHop())[:44], "truncated_ipv6_ext"),
    (lt.LINKTYPE_RAW, bytes(IPv6(nh=60, plen=8 * 20)) + b"\x3c\x00" + b"\0" * 6 * 1
     + (b"\x3c\x00" + b"\0" * 6) * 19, "ipv6_ext_chain_too_long"),
    (lt.LINKTYPE_NULL, struct.pack("<I", 7) + bytes(TCP4), "non_ip"),
    (147, bytes(TCP4), "undecoded_linktype_147"),
])
def test_malformed_packets_get_a_fixed_reason(linktype: int, data: bytes, reason: str) -> None:
    assert decode_packet(linktype, data) == reason
    dec = decode_batch(batch_of([(linktype, data)]))
    assert dict(dec.error_counts()) == {reason: 1}


def test_offload_packets_with_zero_length_use_the_wire_length() -> None:
    data = bytearray(bytes(TCP4))
    data[2:4] = b"\0\0"
    pkt = decode_packet(lt.LINKTYPE_RAW, bytes(data), 9000)
    assert isinstance(pkt, Packet) and pkt.ip_bytes == 9000


SAMPLES = [(ltype, data) for _, ltype, data in LAYOUTS] + [
    (lt.LINKTYPE_RAW, bytes(UDP6)),
    (lt.LINKTYPE_RAW, bytes(IPv6(src="fd00::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop()
                            / TCP(sport=3, dport=4))),
    (lt.LINKTYPE_RAW, bytes(IP(src="10.0.0.1", dst="1.2.3.4", flags="MF", id=3)
                            / UDP(sport=1, dport=2))),
    (lt.LINKTYPE_RAW, bytes(IP(src="10.0.0.1", dst="1.2.3.4", frag=10, proto=17, id=3)
                            / Raw(b"z" * 16))),
    (lt.LINKTYPE_RAW, bytes(IP(src="10.0.0.1", dst="1.2.3.4") / ICMP(type=8))),
    (lt.LINKTYPE_ETHERNET, bytes(Ether(type=0x0806)) + b"\0" * 28),
    (200, b"\x01\x02"),
]


def test_vectorized_equals_scalar_on_every_layout_and_every_cut() -> None:
    items = []
    for ltype, data in SAMPLES:
        for cut in range(len(data) + 1):
            items.append((ltype, data[:cut]))
    batch = batch_of(items)
    assert_same(decode_batch(batch), decode_scalar_batch(batch))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(lt.SUPPORTED_LINKTYPES | {3, 105})),
                          st.binary(max_size=120)), min_size=1, max_size=30))
def test_fuzzed_bytes_never_raise_and_both_paths_agree(items: list[tuple[int, bytes]]) -> None:
    batch = batch_of(items)
    assert_same(decode_batch(batch), decode_scalar_batch(batch))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                          max_size=6))
def test_mutated_packets_never_raise_and_both_paths_agree(
        sample: tuple[int, bytes], edits: list[tuple[int, int]]) -> None:
    ltype, data = sample
    buf = bytearray(data)
    for pos, val in edits:
        if buf:
            buf[pos % len(buf)] = val
    batch = batch_of([(ltype, bytes(buf))])
    dec = decode_batch(batch)
    assert_same(dec, decode_scalar_batch(batch))
    ok = dec.err == 0
    # Whatever decoded must make a usable flow key.
    assert np.all(np.isin(dec.version[ok], [4, 6]))
    assert np.all((dec.sport[ok] >= -1) & (dec.sport[ok] <= 65535))
    assert np.all(dec.ip_bytes[ok] >= 20)
