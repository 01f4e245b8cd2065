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

from egressd.community import community_id
from egressd.decode.scalar import V4_MAPPED_PREFIX
from egressd.flows import Flow
from egressd.geo import Resolver
from egressd.model import (
    PORT_PROTOS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    FlowEndpoints,
    FlowRecord,
    GeoInfo,
    Initiator,
    Verdict,
    VerdictKind,
)
from egressd.netset import is_multicast_or_broadcast, pack_ip
from egressd.policy import Policy

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
        self._internal: dict[bytes, bool] = {}
        self._expiries = sorted({r.expires_ns for r in policy.routes if r.expires_ns is not None})

    def is_internal(self, addr16: bytes) -> bool:
        known = self._internal.get(addr16)
        if known is None:
            known = self.policy.is_internal(addr16)
            if len(self._internal) >= self._cache_size:
                self._internal.clear()
            self._internal[addr16] = known
        return known

    def classify(self, flow: Flow) -> FlowRecord:
        """The report row for ``flow`` as it stands now."""
        if flow.initiator == 0:
            src, sport, dst, dport = flow.a, flow.a_port, flow.b, flow.b_port
            out_pk, out_by, in_pk, in_by = flow.pk0, flow.by0, flow.pk1, flow.by1
        else:
            src, sport, dst, dport = flow.b, flow.b_port, flow.a, flow.a_port
            out_pk, out_by, in_pk, in_by = flow.pk1, flow.by1, flow.pk0, flow.by0
        proto = flow.proto
        src_port: int | None
        dst_port: int | None
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            src_port, dst_port = flow.icmp_type, flow.icmp_code
        elif proto in PORT_PROTOS:
            src_port, dst_port = sport, dport
        else:
            src_port = dst_port = None
        src_int = self.is_internal(src)
        dst_int = self.is_internal(dst)
        ver = flow.version
        src_ip, dst_ip = ip_text(src, ver), ip_text(dst, ver)
        cid = community_id(proto, packed(src, ver), packed(dst, ver), src_port, dst_port)
        zone: str | None = None
        if (src_int and dst_int) or is_multicast_or_broadcast(dst):
            return FlowRecord(cid, proto, src_ip, src_port, dst_ip, dst_port,
                              Initiator.INTERNAL if src_int else Initiator.REMOTE, None, _NO_GEO,
                              self.policy.zone_of(src) if src_int else None, flow.first_ns,
                              flow.last_ns, out_pk, out_by, in_pk, in_by, _INTERNAL)
        if not src_int and not dst_int:
            return FlowRecord(cid, proto, src_ip, src_port, dst_ip, dst_port, None, dst_ip,
                              self.resolver.lookup(dst_ip), None, flow.first_ns, flow.last_ns,
                              out_pk, out_by, in_pk, in_by, _TRANSIT)
        if src_int:
            initiator, internal, remote_ip = Initiator.INTERNAL, src, dst_ip
        else:
            initiator, internal, remote_ip = Initiator.REMOTE, dst, src_ip
            out_pk, out_by, in_pk, in_by = in_pk, in_by, out_pk, out_by
        zone = self.policy.zone_of(internal)
        geo = self.resolver.lookup(remote_ip)
        verdict = self.verdict(proto, internal, remote_ip, dst_port, flow.first_ns, geo, zone)
        return FlowRecord(cid, proto, src_ip, src_port, dst_ip, dst_port, initiator, remote_ip,
                          geo, zone, flow.first_ns, flow.last_ns, out_pk, out_by, in_pk, in_by,
                          verdict)

    def verdict(self, proto: int, internal: bytes | None, remote_ip: str, service_port: int | None,
                first_ns: int, geo: GeoInfo, zone: str | None) -> Verdict:
        """The policy's verdict, cached by everything it depends on."""
        epoch = bisect.bisect_right(self._expiries, first_ns)
        key = (internal, zone, remote_ip, proto, service_port, epoch)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ep = FlowEndpoints(proto, ip_text(internal) if internal else None, remote_ip,
                           service_port, first_ns)
        result = self.policy.evaluate(ep, geo, zone)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
