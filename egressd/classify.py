"""Turn a finished (or, live, a new) flow into a report row with its verdict.

Direction comes from the policy's internal networks: the remote end is the
non-internal endpoint, ``*_out`` counts what the internal end sent to it.  The
remote's country and ASN come from the resolver; the verdict from the policy.
Both answers are cached: a gateway talks to the same few thousand remotes and
services millions of times, so the policy runs once per distinct
(zone, remote, protocol, service port, route-expiry epoch), not once per flow.
"""

from __future__ import annotations

import bisect
import socket
import struct
from collections import OrderedDict
from typing import NamedTuple

from egressd.community import community_id
from egressd.decode.scalar import V4_MAPPED_PREFIX
from egressd.flows import Flow
from egressd.geo import Resolver
from egressd.model import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    FlowEndpoints,
    FlowRecord,
    GeoInfo,
    Initiator,
    Verdict,
    VerdictKind,
)
from egressd.netset import is_multicast_or_broadcast, pack_ip
from egressd.policy import Policy


class _Addr(NamedTuple):
    """What the classifier needs about one address, worked out once per address.

    Everything here depends on the address alone (the policy and the resolver
    are fixed for a classifier's lifetime), so a flow only looks it up.
    """

    internal: bool
    text: str
    packed: bytes
    zone: str | None
    multicast: bool
    geo: GeoInfo
    """The resolver's answer for a remote address; ``GeoInfo()`` for an internal one."""
    mask: int
    """:meth:`Policy.source_mask` of an internal address, ``destination_mask`` of a remote."""


_INTERNAL = Verdict(VerdictKind.INTERNAL)
_TRANSIT = Verdict(VerdictKind.TRANSIT)
_NO_GEO = GeoInfo()
_PORT_PROTOS = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)
_ICMP_PROTOS = (PROTO_ICMP, PROTO_ICMPV6)
_KEY_PORTS = struct.Struct("!xHH")
"""``a_port`` and ``b_port`` in a flow key (see :func:`egressd.flows.flow_key`)."""
_record = tuple.__new__
"""Builds a FlowRecord from a tuple without the NamedTuple's Python-level ``__new__``."""


def ip_text(addr16: bytes, version: int = 4) -> str:
    """Text form of a 16-byte address of an IPv4 (mapped) or IPv6 packet."""
    if version == 4 and addr16[:12] == V4_MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, addr16[12:])
    return socket.inet_ntop(socket.AF_INET6, addr16)


def addr16(ip: str) -> bytes:
    """The pipeline's 16-byte form of a textual address (IPv4 becomes IPv4-mapped)."""
    raw = pack_ip(ip)
    return V4_MAPPED_PREFIX + raw if len(raw) == 4 else raw


def packed(addr16: bytes, version: int = 4) -> bytes:
    """The address as Community ID hashes it: 4 bytes for IPv4, 16 for IPv6."""
    return addr16[12:] if version == 4 and addr16[:12] == V4_MAPPED_PREFIX else addr16


class Classifier:
    """Decides flows under one policy and one resolver (both fixed for its lifetime).

    A reload builds a new classifier; one never changes under a running flow.
    """

    def __init__(self, policy: Policy, resolver: Resolver, *, cache_size: int = 65536) -> None:
        self.policy = policy
        self.resolver = resolver
        self._cache: OrderedDict[tuple[object, ...], Verdict] = OrderedDict()
        self._cache_size = cache_size
        # Per IP version of the packet: an IPv4-mapped address in an IPv6
        # packet is printed and hashed as IPv6.
        self._addrs4: dict[bytes, _Addr] = {}
        self._addrs6: dict[bytes, _Addr] = {}
        self._src_masks: dict[bytes | None, int] = {}
        self._dst_masks: dict[str, int] = {}
        self._expiries = sorted({r.expires_ns for r in policy.routes if r.expires_ns is not None})

    def _addr(self, addr16: bytes, version: int) -> _Addr:
        """Everything the classifier needs about one address, computed once."""
        addrs = self._addrs4 if version == 4 else self._addrs6
        info = addrs.get(addr16)
        if info is None:
            internal = self.policy.is_internal(addr16)
            text = ip_text(addr16, version)
            if internal:
                zone = self.policy.zone_of(addr16)
                geo, mask = _NO_GEO, self._source_mask(addr16, zone)
            else:
                zone = None
                geo, mask = self.resolver.lookup(text), self._destination_mask(text)
            info = _Addr(internal, text, packed(addr16, version), zone,
                         is_multicast_or_broadcast(addr16), geo, mask)
            if len(addrs) >= self._cache_size:
                addrs.clear()
            addrs[addr16] = info
        return info

    def is_internal(self, addr16: bytes) -> bool:
        """True when the 16-byte address is in the policy's internal networks."""
        return self._addr(addr16, 6 if addr16[:12] != V4_MAPPED_PREFIX else 4).internal

    def classify(self, flow: Flow, *, judged_at_ns: int | None = None) -> FlowRecord:
        """The report row for ``flow`` as it stands now.

        Route expiry is judged at the flow's first packet, or at
        ``judged_at_ns`` when given (the live daemon judges long flows again
        at each active timeout).

        An audit calls this once per flow, so it does per flow only what
        depends on the flow: what depends on an address alone comes from
        :meth:`_addr`, and the verdict from the same cache as :meth:`verdict`.
        """
        # Flow.a, .b, .a_port and .b_port, read from the key directly: four
        # property calls cost more than the slices (tests check both agree).
        fkey = flow.key
        a_port, b_port = _KEY_PORTS.unpack_from(fkey)
        if flow.initiator == 0:
            src, sport, dst, dport = fkey[8:24], a_port, fkey[24:40], b_port
            out_pk, out_by, in_pk, in_by = flow.pk0, flow.by0, flow.pk1, flow.by1
        else:
            src, sport, dst, dport = fkey[24:40], b_port, fkey[8:24], a_port
            out_pk, out_by, in_pk, in_by = flow.pk1, flow.by1, flow.pk0, flow.by0
        proto = flow.proto
        src_port: int | None
        dst_port: int | None
        if proto in _PORT_PROTOS:
            src_port, dst_port = sport, dport
        elif proto in _ICMP_PROTOS:
            src_port, dst_port = flow.icmp_type, flow.icmp_code
        else:
            src_port = dst_port = None
        ver = flow.version
        addrs = self._addrs4 if ver == 4 else self._addrs6
        s = addrs.get(src)
        if s is None:
            s = self._addr(src, ver)
        d = addrs.get(dst)
        if d is None:
            d = self._addr(dst, ver)
        fname = flow.name
        server_name = name_source = None
        names: tuple[str, ...] = ()
        if fname is not None:
            server_name, name_source, names = fname
        cid = community_id(proto, s.packed, d.packed, src_port, dst_port)
        first_ns = flow.first_ns
        if s.internal:
            if d.internal or d.multicast:
                return _record(FlowRecord, (
                    cid, proto, s.text, src_port, d.text, dst_port, Initiator.INTERNAL, None,
                    _NO_GEO, s.zone, first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by,
                    _INTERNAL, server_name, name_source))
            initiator, internal, local, remote = Initiator.INTERNAL, src, s, d
        elif d.multicast:
            return _record(FlowRecord, (
                cid, proto, s.text, src_port, d.text, dst_port, Initiator.REMOTE, None,
                _NO_GEO, None, first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by,
                _INTERNAL, server_name, name_source))
        elif d.internal:
            initiator, internal, local, remote = Initiator.REMOTE, dst, d, s
            out_pk, out_by, in_pk, in_by = in_pk, in_by, out_pk, out_by
        else:
            return _record(FlowRecord, (
                cid, proto, s.text, src_port, d.text, dst_port, None, d.text, d.geo, None,
                first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by, _TRANSIT, server_name,
                name_source))
        geo = remote.geo
        at = first_ns if judged_at_ns is None else judged_at_ns
        # The key of :meth:`verdict`, from what the two addresses already know.
        key = (geo.country, geo.asn, local.mask, None, remote.mask, proto, dst_port,
               bisect.bisect_right(self._expiries, at) if self._expiries else 0, names)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self._decide(key, proto, internal, remote.text, dst_port, at, geo,
                                   local.zone, names)
        return _record(FlowRecord, (
            cid, proto, s.text, src_port, d.text, dst_port, initiator, remote.text, geo,
            local.zone, first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by, verdict,
            server_name, name_source))

    def _source_mask(self, internal: bytes | None, zone: str | None) -> int:
        """:meth:`Policy.source_mask` of a 16-byte internal address (cached)."""
        src = self._src_masks.get(internal)
        if src is None:
            src = self.policy.source_mask(
                None if internal is None else packed(internal, 4 if internal[:12]
                                                     == V4_MAPPED_PREFIX else 6), zone)
            if len(self._src_masks) >= self._cache_size:
                self._src_masks.clear()
            self._src_masks[internal] = src
        return src

    def _destination_mask(self, remote_ip: str) -> int:
        """:meth:`Policy.destination_mask` of a remote address (cached)."""
        dst = self._dst_masks.get(remote_ip)
        if dst is None:
            try:
                remote_packed: bytes | None = pack_ip(remote_ip)
            except ValueError:
                remote_packed = None
            dst = self.policy.destination_mask(remote_packed)
            if len(self._dst_masks) >= self._cache_size:
                self._dst_masks.clear()
            self._dst_masks[remote_ip] = dst
        return dst

    def verdict(self, proto: int, internal: bytes | None, remote_ip: str, service_port: int | None,
                first_ns: int, geo: GeoInfo, zone: str | None,
                names: tuple[str, ...] = ()) -> Verdict:
        """The policy's verdict, cached by everything it depends on.

        Not by the addresses themselves: by which routes' ``from`` the internal
        address satisfies and which routes' networks hold the remote one
        (:meth:`Policy.source_mask`), so that the thousands of flows between
        different hosts that the routes treat alike share one answer.
        """
        epoch = bisect.bisect_right(self._expiries, first_ns)
        src = self._source_mask(internal, zone)
        dst = self._destination_mask(remote_ip)
        key = (geo.country, geo.asn, src, zone if internal is None else None, dst, proto,
               service_port, epoch, names)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        return self._decide(key, proto, internal, remote_ip, service_port, first_ns, geo, zone,
                            names)

    def _decide(self, key: tuple[object, ...], proto: int, internal: bytes | None,
                remote_ip: str, service_port: int | None, first_ns: int, geo: GeoInfo,
                zone: str | None, names: tuple[str, ...]) -> Verdict:
        """Ask the policy (a miss of the verdict cache) and remember the answer under ``key``."""
        ep = FlowEndpoints(proto, ip_text(internal) if internal else None, remote_ip,
                           service_port, first_ns, names)
        result = self.policy.evaluate(ep, geo, zone)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
