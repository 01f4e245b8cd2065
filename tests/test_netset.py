"""NetworkSet membership, first match, IPv4-mapped handling and multicast checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.netset import (
    DEFAULT_INTERNAL_NETWORKS,
    NetworkSet,
    is_multicast_or_broadcast,
    pack_ip,
    parse_network,
)


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.0.0.0", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("9.255.255.255", False),
        ("172.16.0.1", True),
        ("172.31.255.255", True),
        ("172.32.0.0", False),
        ("172.15.255.255", False),
        ("192.168.1.1", True),
        ("192.169.0.0", False),
        ("100.64.0.1", True),
        ("100.127.255.255", True),
        ("100.128.0.0", False),
        ("169.254.10.10", True),
        ("8.8.8.8", False),
        ("fc00::1", True),
        ("fdff:ffff::1", True),
        ("fe00::1", False),
        ("fe80::1", True),
        ("febf:ffff::1", True),
        ("fec0::1", False),
        ("2001:db8::1", False),
        ("::ffff:10.1.2.3", True),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_default_internal_networks(ip: str, expected: bool) -> None:
    nets = NetworkSet(DEFAULT_INTERNAL_NETWORKS)
    assert nets.contains(packed(ip)) is expected
    assert nets.contains_ip(ip) is expected


def test_ipv4_mapped_address_matches_ipv4_network_only() -> None:
    v4 = NetworkSet(["203.0.113.0/24"])
    assert v4.contains(packed("::ffff:203.0.113.9"))
    assert not v4.contains(packed("::203.0.113.9"))  # IPv4-compatible, not mapped
    v6_all = NetworkSet(["::/0"])
    assert v6_all.contains(packed("2001:db8::1"))
    assert not v6_all.contains(packed("::ffff:203.0.113.9"))
    assert not v6_all.contains(packed("203.0.113.9"))


def test_network_written_in_mapped_form_is_the_ipv4_network() -> None:
    nets = NetworkSet(["::ffff:10.0.0.0/104"])
    assert nets.contains(packed("10.9.9.9"))
    assert nets.contains(packed("::ffff:10.9.9.9"))
    assert not nets.contains(packed("11.0.0.1"))
    assert nets.first_match(packed("10.0.0.1")) == 0


def test_zero_length_prefixes() -> None:
    v4_all = NetworkSet(["0.0.0.0/0"])
    assert v4_all.contains(packed("255.255.255.255"))
    assert v4_all.contains(packed("::ffff:1.2.3.4"))
    assert not v4_all.contains(packed("2001:db8::1"))


def test_empty_set_contains_nothing() -> None:
    nets = NetworkSet([])
    assert len(nets) == 0
    assert not nets.contains(packed("10.0.0.1"))
    assert not nets.contains(packed("fc00::1"))
    assert nets.first_match(packed("10.0.0.1")) is None


def test_first_match_is_the_earliest_listed_network() -> None:
    nets = NetworkSet(["10.1.0.0/16", "10.0.0.0/8", "10.1.2.0/24", "fd00::/8", "10.0.0.0/8"])
    assert nets.first_match(packed("10.1.2.3")) == 0
    assert nets.first_match(packed("10.2.0.1")) == 1
    assert nets.first_match(packed("fd00::1")) == 3
    assert nets.first_match(packed("192.0.2.1")) is None
    wide_first = NetworkSet(["10.0.0.0/8", "10.1.0.0/16"])
    assert wide_first.first_match(packed("10.1.0.1")) == 0


def test_networks_keep_order_and_accept_objects() -> None:
    given_nets = [ipaddress.ip_network("fd00::/8"), "10.0.0.0/8", "192.0.2.7"]
    nets = NetworkSet(given_nets)
    assert [str(n) for n in nets.networks] == ["fd00::/8", "10.0.0.0/8", "192.0.2.7/32"]
    assert list(nets) == list(nets.networks)
    assert nets.contains_ip("192.0.2.7")
    assert not nets.contains_ip("192.0.2.8")
    assert "10.0.0.0/8" in repr(nets)


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "fd00::1/8", "nonsense", ""])
def test_bad_networks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        NetworkSet([bad])
    with pytest.raises(ValueError):
        parse_network(bad)


@pytest.mark.parametrize("size", [0, 3, 5, 15, 17])
def test_wrong_address_length_is_refused(size: int) -> None:
    nets = NetworkSet(["10.0.0.0/8"])
    with pytest.raises(ValueError):
        nets.contains(b"\x0a" * size)
    with pytest.raises(ValueError):
        nets.first_match(b"\x0a" * size)
    with pytest.raises(ValueError):
        is_multicast_or_broadcast(b"\xe0" * size)


def test_pack_ip() -> None:
    assert pack_ip("10.1.2.3") == bytes([10, 1, 2, 3])
    assert pack_ip("fe80::1%eth0") == packed("fe80::1")
    assert pack_ip("::ffff:1.2.3.4") == packed("::ffff:1.2.3.4")
    for bad in ["10.1.2", "1.2.3.4.5", "gg::1", "", "10.0.0.256"]:
        with pytest.raises(ValueError):
            pack_ip(bad)
    with pytest.raises(ValueError):
        NetworkSet(["10.0.0.0/8"]).contains_ip("not-an-ip")


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("224.0.0.1", True),
        ("239.255.255.250", True),
        ("223.255.255.255", False),
        ("240.0.0.1", False),
        ("255.255.255.255", True),
        ("255.255.255.254", False),
        ("10.0.0.255", False),
        ("ff02::1", True),
        ("ff0e::1234", True),
        ("fe80::1", False),
        ("2001:db8::1", False),
        ("::ffff:224.0.0.251", True),
        ("::ffff:255.255.255.255", True),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_multicast_or_broadcast(ip: str, expected: bool) -> None:
    assert is_multicast_or_broadcast(packed(ip)) is expected


_v4_nets = st.builds(
    lambda addr, plen: ipaddress.IPv4Network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_v6_nets = st.builds(
    lambda addr, plen: ipaddress.IPv6Network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)

_mapped_nets = st.builds(
    lambda addr, plen: ipaddress.IPv6Network(((0xFFFF << 32) | addr, 96 + plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
_v6_addrs = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**32 - 1).map(lambda a: (0xFFFF << 32) | a),
)


@settings(max_examples=300, deadline=None)
@given(
    nets=st.lists(st.one_of(_v4_nets, _v6_nets, _mapped_nets), max_size=12),
    v4=st.lists(st.integers(0, 2**32 - 1), max_size=10),
    v6=st.lists(_v6_addrs, max_size=10),
)
def test_agrees_with_ipaddress(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], v4: list[int], v6: list[int]
) -> None:
    netset = NetworkSet(nets)
    # Probe random addresses and each network's first and last address.
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        *(ipaddress.IPv4Address(a) for a in v4),
        *(ipaddress.IPv6Address(a) for a in v6),
    ]
    for net in nets:
        addrs += [net.network_address, net.broadcast_address]
    for addr in addrs:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            as_v4: ipaddress.IPv4Address | ipaddress.IPv6Address = addr.ipv4_mapped
        else:
            as_v4 = addr
        matches = [i for i, net in enumerate(nets) if _reference_contains(net, as_v4)]
        assert netset.contains(addr.packed) is bool(matches), (nets, addr)
        assert netset.first_match(addr.packed) == (matches[0] if matches else None)


def _reference_contains(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = ipaddress.IPv6Network("::ffff:0:0/96")
        if net.subnet_of(mapped):
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    if net.version != addr.version:
        return False
    return addr in net
