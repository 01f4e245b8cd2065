"""Community ID: our fast path must give exactly what the reference package gives."""

from __future__ import annotations

import ipaddress

import communityid
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.community import community_id

REF = communityid.CommunityID()

ADDR4 = st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv4Address(i).packed)
ADDR6 = st.integers(0, 2**128 - 1).map(lambda i: ipaddress.IPv6Address(i).packed)
PORT = st.integers(0, 65535)


def reference(proto: int, s: bytes, d: bytes, sp: int | None, dp: int | None) -> str:
    tpl = communityid.FlowTuple(proto, s, d, sp, dp)
    return str(REF.calc(tpl))


def test_known_value_from_the_specification() -> None:
    # The Community ID spec's example: TCP 128.232.110.120:34855 -> 66.35.250.204:80.
    s = ipaddress.ip_address("128.232.110.120").packed
    d = ipaddress.ip_address("66.35.250.204").packed
    assert community_id(6, s, d, 34855, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([6, 17, 132]), st.one_of(st.tuples(ADDR4, ADDR4), st.tuples(ADDR6, ADDR6)),
       PORT, PORT)
def test_port_protocols_match_the_reference(proto: int, addrs: tuple[bytes, bytes], sp: int,
                                            dp: int) -> None:
    s, d = addrs
    assert community_id(proto, s, d, sp, dp) == reference(proto, s, d, sp, dp)
    # Bidirectional: both directions give the same ID.
    assert community_id(proto, d, s, dp, sp) == community_id(proto, s, d, sp, dp)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.tuples(st.just(1), ADDR4, ADDR4), st.tuples(st.just(58), ADDR6, ADDR6)),
       st.integers(0, 255), st.integers(0, 255))
def test_icmp_types_and_codes_match_the_reference(pa: tuple[int, bytes, bytes], mtype: int,
                                                  code: int) -> None:
    proto, s, d = pa
    assert community_id(proto, s, d, mtype, code) == reference(proto, s, d, mtype, code)


def test_icmp_echo_request_and_reply_share_an_id() -> None:
    s = ipaddress.ip_address("10.0.0.1").packed
    d = ipaddress.ip_address("8.8.8.8").packed
    assert community_id(1, s, d, 8, 0) == community_id(1, d, s, 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255).filter(lambda p: p not in (1, 6, 17, 58, 132)),
       st.one_of(st.tuples(ADDR4, ADDR4), st.tuples(ADDR6, ADDR6)))
def test_protocols_without_ports_match_the_reference(proto: int,
                                                     addrs: tuple[bytes, bytes]) -> None:
    s, d = addrs
    assert community_id(proto, s, d, None, None) == reference(proto, s, d, None, None)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 65535), st.sampled_from([6, 1, 47]), st.tuples(ADDR4, ADDR4), PORT, PORT)
def test_seeds_match_the_reference(seed: int, proto: int, addrs: tuple[bytes, bytes], sp: int,
                                   dp: int) -> None:
    s, d = addrs
    sport, dport = (None, None) if proto == 47 else (sp % 256, dp % 256) if proto == 1 else (sp, dp)
    want = str(communityid.CommunityID(seed).calc(communityid.FlowTuple(proto, s, d, sport,
                                                                         dport)))
    assert community_id(proto, s, d, sport, dport, seed) == want
