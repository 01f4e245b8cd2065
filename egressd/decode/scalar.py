"""Decode one packet from raw bytes: the reference decoder.

Used for the packets the vectorized decoder (:mod:`egressd.decode.batch`) leaves
aside (IPv6 extension-header chains, odd layouts) and as the specification
the vectorized path is tested against: both must give identical fields for
every input.  Nothing here allocates more than the result; nothing raises on
malformed input — a packet that cannot be placed in a flow comes back as one of
the fixed reason codes of :class:`~egressd.decode.linktypes.Err`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from egressd.decode.linktypes import (
    AF_INET6_VALUES,
    AF_INET_VALUES,
    ETH_IPV4,
    ETH_IPV6,
    IPV6_AH,
    IPV6_EXT_HEADERS,
    IPV6_FRAGMENT,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    MAX_IPV6_EXT_HEADERS,
    MAX_VLAN_TAGS,
    RAW_LINKTYPES,
    VLAN_TPIDS,
    Err,
)
from egressd.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

FRAG_NONE = 0
FRAG_FIRST = 1
"""First fragment of a fragmented datagram: carries the transport ports."""
FRAG_LATER = 2
"""A later fragment: no transport header; belongs to the first fragment's flow."""

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U32LE = struct.Struct("<I")


class Packet(NamedTuple):
    """The fields of one IP packet that flows are built from.

    Addresses are 16 bytes; IPv4 addresses are IPv4-mapped (``::ffff:a.b.c.d``)
    so both families share one key layout.  ``sport``/``dport`` are -1 for
    protocols without ports and for later fragments; for ICMP/ICMPv6 they are
    the type and the code.
    """

    version: int
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    tcp_flags: int
    ip_bytes: int
    frag: int
    frag_id: int
    l4: int = -1
    """Offset of the transport header in the packet bytes (-1: later fragment)."""
    l4_end: int = -1
    """Where the IP payload ends in the packet bytes: the IP length, or less if cut short."""


def _l3(linktype: int, data: bytes) -> tuple[int, int] | str:
    """Find the network layer: ``(offset, 4 | 6 | 0)`` (0 = judge by version nibble)."""
    n = len(data)
    if linktype == LINKTYPE_ETHERNET:
        if n < 14:
            return Err.TRUNCATED_LINK
        etype = _U16.unpack_from(data, 12)[0]
        off = 14
        return _after_ethertype(data, etype, off)
    if linktype == LINKTYPE_LINUX_SLL:
        if n < 16:
            return Err.TRUNCATED_LINK
        return _after_ethertype(data, _U16.unpack_from(data, 14)[0], 16)
    if linktype == LINKTYPE_LINUX_SLL2:
        if n < 20:
            return Err.TRUNCATED_LINK
        return _after_ethertype(data, _U16.unpack_from(data, 0)[0], 20)
    if linktype in RAW_LINKTYPES:
        return (0, 0)
    if linktype == LINKTYPE_IPV4:
        return (0, 4)
    if linktype == LINKTYPE_IPV6:
        return (0, 6)
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if n < 4:
            return Err.TRUNCATED_LINK
        fam = _U32.unpack_from(data, 0)[0]
        if linktype == LINKTYPE_NULL and fam not in AF_INET_VALUES and fam not in AF_INET6_VALUES:
            fam = _U32LE.unpack_from(data, 0)[0]  # written in little-endian host order
        if fam in AF_INET_VALUES:
            return (4, 4)
        if fam in AF_INET6_VALUES:
            return (4, 6)
        return Err.NON_IP
    return Err.undecoded(linktype)


def _after_ethertype(data: bytes, etype: int, off: int) -> tuple[int, int] | str:
    tags = 0
    while etype in VLAN_TPIDS:
        if tags == MAX_VLAN_TAGS:
            return Err.TOO_MANY_VLAN_TAGS
        if len(data) < off + 4:
            return Err.TRUNCATED_LINK
        etype = _U16.unpack_from(data, off + 2)[0]
        off += 4
        tags += 1
    if etype == ETH_IPV4:
        return (off, 4)
    if etype == ETH_IPV6:
        return (off, 6)
    return Err.NON_IP


def _ports(proto: int, data: bytes, l4: int) -> tuple[int, int, int] | str:
    """``(sport, dport, tcp_flags)`` from the transport header at ``l4``."""
    avail = len(data) - l4
    if proto == PROTO_TCP:
        if avail < 14:
            return Err.TRUNCATED_TRANSPORT
        return (_U16.unpack_from(data, l4)[0], _U16.unpack_from(data, l4 + 2)[0], data[l4 + 13])
    if proto in (PROTO_UDP, PROTO_SCTP):
        if avail < 4:
            return Err.TRUNCATED_TRANSPORT
        return (_U16.unpack_from(data, l4)[0], _U16.unpack_from(data, l4 + 2)[0], 0)
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if avail < 2:
            return Err.TRUNCATED_TRANSPORT
        return (data[l4], data[l4 + 1], 0)
    return (-1, -1, 0)


def decode_packet(linktype: int, data: bytes, wirelen: int | None = None) -> Packet | str:
    """Decode one captured packet; return its :class:`Packet` or an error reason code.

    ``wirelen`` is the packet's length on the wire; it is used only when the IP
    header's length field is 0 (segmentation offload captures), so that such
    packets are still counted with their real size.
    """
    if wirelen is None:
        wirelen = len(data)
    found = _l3(linktype, data)
    if isinstance(found, str):
        return found
    off, want = found
    n = len(data)
    if n <= off:
        return Err.TRUNCATED_IP
    version = data[off] >> 4
    if want and version != want:
        return Err.BAD_IP_VERSION
    if version == 4:
        return _ipv4(data, off, wirelen)
    if version == 6:
        return _ipv6(data, off, wirelen)
    return Err.BAD_IP_VERSION


def _ipv4(data: bytes, off: int, wirelen: int) -> Packet | str:
    if len(data) < off + 20:
        return Err.TRUNCATED_IP
    ihl = (data[off] & 0x0F) * 4
    total = _U16.unpack_from(data, off + 2)[0]
    if ihl < 20 or (total and total < ihl):
        return Err.BAD_IPV4_HEADER
    if total == 0:
        total = max(wirelen - off, ihl)
    fragword = _U16.unpack_from(data, off + 6)[0]
    proto = data[off + 9]
    src = V4_MAPPED_PREFIX + data[off + 12 : off + 16]
    dst = V4_MAPPED_PREFIX + data[off + 16 : off + 20]
    frag_off = fragword & 0x1FFF
    more = fragword & 0x2000
    frag_id = _U16.unpack_from(data, off + 4)[0]
    if frag_off:
        return Packet(4, proto, src, dst, -1, -1, 0, total, FRAG_LATER, frag_id, -1, -1)
    frag = FRAG_FIRST if more else FRAG_NONE
    if len(data) < off + ihl:
        return Err.TRUNCATED_IP
    ports = _ports(proto, data, off + ihl)
    if isinstance(ports, str):
        return ports
    return Packet(4, proto, src, dst, ports[0], ports[1], ports[2], total, frag,
                  frag_id if frag else 0, off + ihl, min(len(data), off + total))


def _ipv6(data: bytes, off: int, wirelen: int) -> Packet | str:
    n = len(data)
    if n < off + 40:
        return Err.TRUNCATED_IP
    plen = _U16.unpack_from(data, off + 4)[0]
    total = plen + 40 if plen else max(wirelen - off, 40)
    nh = data[off + 6]
    src = data[off + 8 : off + 24]
    dst = data[off + 24 : off + 40]
    pos = off + 40
    frag = FRAG_NONE
    frag_id = 0
    seen = 0
    while nh in IPV6_EXT_HEADERS:
        if seen == MAX_IPV6_EXT_HEADERS:
            return Err.IPV6_EXT_CHAIN_TOO_LONG
        seen += 1
        if n < pos + 8:
            return Err.TRUNCATED_IPV6_EXT
        if nh == IPV6_FRAGMENT:
            word = _U16.unpack_from(data, pos + 2)[0]
            fid = _U32.unpack_from(data, pos + 4)[0]
            nh = data[pos]
            pos += 8
            if word & 0xFFF8:  # offset > 0: a later fragment, no transport header here
                return Packet(6, nh, src, dst, -1, -1, 0, total, FRAG_LATER, fid, -1, -1)
            if word & 1:
                frag, frag_id = FRAG_FIRST, fid
            continue
        hlen = (data[pos + 1] + 2) * 4 if nh == IPV6_AH else (data[pos + 1] + 1) * 8
        nh = data[pos]
        pos += hlen
    ports = _ports(nh, data, pos) if pos <= n else Err.TRUNCATED_IPV6_EXT
    if isinstance(ports, str):
        return ports
    return Packet(6, nh, src, dst, ports[0], ports[1], ports[2], total, frag, frag_id, pos,
                  max(pos, min(n, off + total)))
