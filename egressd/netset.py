"""Fast "is this address in one of these networks?" for the per-packet path.

The capture pipeline asks this question for every packet (is an end internal?)
and the policy asks it for every flow (which zone is the source in, does a
route's destination network cover the remote?).  :mod:`ipaddress` objects are
too slow for that, so a :class:`NetworkSet` keeps, per prefix length present,
a dict of the networks as plain ints, and an address is looked up with one
shift and one dict probe per prefix length.

Addresses are the packed bytes the decoder produces: 4 bytes for IPv4 and
16 bytes for IPv6.  An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, as seen
on dual-stack sockets) is an IPv4 address and matches IPv4 networks; an IPv6
network written inside ``::ffff:0:0/96`` is treated as the IPv4 network it
spells.  Other IPv6 networks never match IPv4 addresses, even ``::/0``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network

IPNetwork = IPv4Network | IPv6Network

DEFAULT_INTERNAL_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)
"""The networks a policy treats as internal when it names none: RFC 1918
private space, carrier-grade NAT space (RFC 6598), IPv6 unique local
addresses, and IPv4/IPv6 link-local addresses."""

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MAPPED_NET = IPv6Network("::ffff:0:0/96")

# (shift, {network_int >> shift: index of the first network with that value})
_Table = tuple[tuple[int, dict[int, int]], ...]


def parse_network(value: str | IPNetwork) -> IPNetwork:
    """Turn ``"10.0.0.0/8"`` (or a bare address, taken as /32 or /128) into a network.

    Host bits must be clear: ``10.0.0.1/8`` raises :class:`ValueError`, because
    such an entry is usually a typo for a single host or for ``10.0.0.0/8``.
    """
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    return ip_network(value.strip(), strict=True)


def pack_ip(ip: str) -> bytes:
    """The packed form of a textual address: 4 bytes for IPv4, 16 for IPv6.

    Flow records carry addresses as text; the policy packs them once per
    evaluation with this (much faster than :func:`ipaddress.ip_address`).  A
    scope suffix such as ``%eth0`` is ignored.  Raises :class:`ValueError` for
    anything that is not an address.
    """
    try:
        if ":" in ip:
            pct = ip.find("%")
            return socket.inet_pton(socket.AF_INET6, ip if pct < 0 else ip[:pct])
        return socket.inet_pton(socket.AF_INET, ip)
    except (OSError, TypeError) as exc:
        raise ValueError(f"{ip!r} is not an IP address") from exc


def _as_v4(net: IPv6Network) -> IPv4Network | None:
    """The IPv4 network an IPv6 network inside ``::ffff:0:0/96`` stands for."""
    if net.prefixlen >= 96 and net.subnet_of(_MAPPED_NET):
        v4 = int(net.network_address) & 0xFFFFFFFF
        return IPv4Network((v4, net.prefixlen - 96))
    return None


def _build(entries: list[tuple[int, int, int]], bits: int) -> _Table:
    by_len: dict[int, dict[int, int]] = {}
    for prefixlen, value, index in entries:
        shift = bits - prefixlen
        nets = by_len.setdefault(shift, {})
        key = value >> shift
        if key not in nets:  # entries arrive in index order: keep the first
            nets[key] = index
    # Longest prefixes first: the most specific networks are usually the most
    # numerous, so most hits are found early.
    return tuple(sorted(by_len.items()))


class NetworkSet:
    """An immutable set of IPv4 and IPv6 networks with fast membership tests.

    Build one when a policy or config is loaded and query it per packet or per
    flow.  The networks keep their order: :meth:`first_match` tells which one
    (by position) contains an address, so that the first zone listed in a
    policy file wins when zones overlap.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[str | IPNetwork]) -> None:
        nets = tuple(parse_network(n) for n in networks)
        v4: list[tuple[int, int, int]] = []
        v6: list[tuple[int, int, int]] = []
        for index, net in enumerate(nets):
            if isinstance(net, IPv6Network):
                mapped = _as_v4(net)
                if mapped is None:
                    v6.append((net.prefixlen, int(net.network_address), index))
                    continue
                net4: IPv4Network = mapped
            else:
                net4 = net
            v4.append((net4.prefixlen, int(net4.network_address), index))
        self._networks = nets
        self._v4 = _build(v4, 32)
        self._v6 = _build(v6, 128)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The networks, in the order they were given."""
        return self._networks

    def __len__(self) -> int:
        return len(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __repr__(self) -> str:
        return f"NetworkSet({[str(n) for n in self._networks]!r})"

    def contains(self, addr: bytes) -> bool:
        """True when a packed address lies in any of the networks.

        ``addr`` is 4 bytes (IPv4) or 16 bytes (IPv6); any other length raises
        :class:`ValueError`.
        """
        size = len(addr)
        if size == 4:
            value = int.from_bytes(addr)
            table = self._v4
        elif size == 16:
            value = int.from_bytes(addr)
            if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
                value &= 0xFFFFFFFF
                table = self._v4
            else:
                table = self._v6
        else:
            raise ValueError(f"a packed address has 4 or 16 bytes, not {size}")
        # A plain loop: measurably faster than any() over a generator here.
        for shift, nets in table:  # noqa: SIM110
            if (value >> shift) in nets:
                return True
        return False

    def contains_ip(self, ip: str) -> bool:
        """:meth:`contains` for a textual address (slower; for tools and tests)."""
        return self.contains(pack_ip(ip))

    def first_match(self, addr: bytes) -> int | None:
        """Position of the first network (in the given order) containing ``addr``.

        None when no network contains it.  Costs a probe per prefix length
        present, like :meth:`contains`, since a later prefix length may hold an
        earlier network.
        """
        size = len(addr)
        if size == 4:
            value = int.from_bytes(addr)
            table = self._v4
        elif size == 16:
            value = int.from_bytes(addr)
            if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
                value &= 0xFFFFFFFF
                table = self._v4
            else:
                table = self._v6
        else:
            raise ValueError(f"a packed address has 4 or 16 bytes, not {size}")
        best: int | None = None
        for shift, nets in table:
            index = nets.get(value >> shift)
            if index is not None and (best is None or index < best):
                best = index
        return best


def is_multicast_or_broadcast(addr: bytes) -> bool:
    """True for IPv4 multicast (224.0.0.0/4), 255.255.255.255 and IPv6 ff00::/8.

    Such traffic never leaves for a remote country (it stays on the link or is
    routed within the site), so the pipeline does not treat it as egress.
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
    """
    size = len(addr)
    if size == 16:
        if addr[0] == 0xFF:
            return True
        if addr[:12] != _MAPPED_PREFIX:
            return False
        addr = addr[12:]
    elif size != 4:
        raise ValueError(f"a packed address has 4 or 16 bytes, not {size}")
    return 224 <= addr[0] <= 239 or addr == b"\xff\xff\xff\xff"
