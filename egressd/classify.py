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
    internal: bool
    text: str
    packed: bytes
    zone: str | None
    multicast: bool


_INTERNAL = Verdict(VerdictKind.INTERNAL)
_TRANSIT = Verdict(VerdictKind.TRANSIT)
_NO_GEO = GeoInfo()


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
        self._addrs: dict[tuple[bytes, int], _Addr] = {}
        self._src_masks: dict[bytes | None, int] = {}
        self._dst_masks: dict[str, int] = {}
        self._expiries = sorted({r.expires_ns for r in policy.routes if r.expires_ns is not None})

    def _addr(self, addr16: bytes, version: int) -> _Addr:
        """Everything the classifier needs about one address, computed once."""
        key = (addr16, version)
        info = self._addrs.get(key)
        if info is None:
            internal = self.policy.is_internal(addr16)
            info = _Addr(internal, ip_text(addr16, version), packed(addr16, version),
                         self.policy.zone_of(addr16) if internal else None,
                         is_multicast_or_broadcast(addr16))
            if len(self._addrs) >= self._cache_size:
                self._addrs.clear()
            self._addrs[key] = info
        return info

    def is_internal(self, addr16: bytes) -> bool:
        """True when the 16-byte address is in the policy's internal networks."""
        return self._addr(addr16, 6 if addr16[:12] != V4_MAPPED_PREFIX else 4).internal

    def classify(self, flow: Flow, *, judged_at_ns: int | None = None) -> FlowRecord:
        """The report row for ``flow`` as it stands now.

        Route expiry is judged at the flow's first packet, or at
        ``judged_at_ns`` when given (the live daemon judges long flows again
        at each active timeout).
        """
        if flow.initiator == 0:
            src, sport, dst, dport = flow.a, flow.a_port, flow.b, flow.b_port
            out_pk, out_by, in_pk, in_by = flow.pk0, flow.by0, flow.pk1, flow.by1
        else:
            src, sport, dst, dport = flow.b, flow.b_port, flow.a, flow.a_port
            out_pk, out_by, in_pk, in_by = flow.pk1, flow.by1, flow.pk0, flow.by0
        proto = flow.proto
        src_port: int | None
        dst_port: int | None
        if proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP):
            src_port, dst_port = sport, dport
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            src_port, dst_port = flow.icmp_type, flow.icmp_code
        else:
            src_port = dst_port = None
        ver = flow.version
        fname = flow.name
        server_name = name_source = None
        names: tuple[str, ...] = ()
        if fname is not None:
            server_name, name_source, names = fname
        s = self._addr(src, ver)
        d = self._addr(dst, ver)
        cid = community_id(proto, s.packed, d.packed, src_port, dst_port)
        if (s.internal and d.internal) or d.multicast:
            return FlowRecord(cid, proto, s.text, src_port, d.text, dst_port,
                              Initiator.INTERNAL if s.internal else Initiator.REMOTE, None,
                              _NO_GEO, s.zone, flow.first_ns, flow.last_ns, out_pk, out_by,
                              in_pk, in_by, _INTERNAL, server_name, name_source)
        if not s.internal and not d.internal:
            return FlowRecord(cid, proto, s.text, src_port, d.text, dst_port, None, d.text,
                              self.resolver.lookup(d.text), None, flow.first_ns, flow.last_ns,
                              out_pk, out_by, in_pk, in_by, _TRANSIT, server_name, name_source)
        if s.internal:
            initiator, internal, remote = Initiator.INTERNAL, src, d
        else:
            initiator, internal, remote = Initiator.REMOTE, dst, s
            out_pk, out_by, in_pk, in_by = in_pk, in_by, out_pk, out_by
        zone = s.zone if s.internal else d.zone
        geo = self.resolver.lookup(remote.text)
        at = flow.first_ns if judged_at_ns is None else judged_at_ns
        verdict = self.verdict(proto, internal, remote.text, dst_port, at, geo, zone, names)
        return FlowRecord(cid, proto, s.text, src_port, d.text, dst_port, initiator, remote.text,
                          geo, zone, flow.first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by,
                          verdict, server_name, name_source)

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
        src = self._src_masks.get(internal)
        if src is None:
            src = self.policy.source_mask(
                None if internal is None else packed(internal, 4 if internal[:12]
                                                     == V4_MAPPED_PREFIX else 6), zone)
            if len(self._src_masks) >= self._cache_size:
                self._src_masks.clear()
            self._src_masks[internal] = src
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
        key = (geo.country, geo.asn, src, zone if internal is None else None, dst, proto,
               service_port, epoch, names)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ep = FlowEndpoints(proto, ip_text(internal) if internal else None, remote_ip,
                           service_port, first_ns, names)
        result = self.policy.evaluate(ep, geo, zone)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
