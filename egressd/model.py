"""The values passed between pipeline stages.

source ──► decode ──► flows ──► geo ──► policy ──► report / alerts / metrics

Everything here is immutable once built: a stage never changes what it was
handed, so the audit and the live daemon can share the same stages and a test
can feed any stage on its own.  The one mutable object of the pipeline (the
per-flow counters while a flow is live) is private to :mod:`egressd.flows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

# IP protocol numbers the pipeline names; anything else is reported by number.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

PROTO_NAMES: dict[int, str] = {
    PROTO_TCP: "tcp",
    PROTO_UDP: "udp",
    PROTO_SCTP: "sctp",
    PROTO_ICMP: "icmp",
    PROTO_ICMPV6: "icmpv6",
}
PROTO_NUMBERS: dict[str, int] = {v: k for k, v in PROTO_NAMES.items()}

# Protocols whose flows carry ports (ICMP carries type/code in the port fields).
PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6})


def proto_name(proto: int) -> str | int:
    """The report's name for an IP protocol: ``tcp`` … or the IANA number."""
    return PROTO_NAMES.get(proto, proto)


U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]


@dataclass(frozen=True, slots=True, eq=False)
class RecordBatch:
    """A run of capture records, as read from a file or a socket.

    The packet bytes of record ``i`` are ``data[offsets[i]:offsets[i] + caplens[i]]``.
    Holding many records in one buffer lets the decoder work on all of them at
    once with numpy instead of building a Python object per packet.
    """

    data: U8
    """uint8 array that holds the records' packet bytes."""
    offsets: I64
    """Where each record's packet bytes start in ``data``."""
    caplens: I64
    """Bytes captured per record (may be less than ``wirelens`` when a snaplen cut it)."""
    wirelens: I64
    """Length of the packet on the wire."""
    ts_ns: I64
    """Timestamp per record, nanoseconds since the Unix epoch (UTC)."""
    linktypes: U16
    """LINKTYPE_* value per record (pcapng records may differ by interface)."""

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def packet(self, i: int) -> bytes:
        """The packet bytes of record ``i`` (for the scalar decoder and tests)."""
        start = int(self.offsets[i])
        return self.data[start : start + int(self.caplens[i])].tobytes()

    @classmethod
    def from_packets(cls, packets: list[tuple[int, int, bytes]]) -> RecordBatch:
        """Build a batch from ``(ts_ns, linktype, packet bytes)`` tuples.

        For live sources that receive one packet at a time and for tests; the
        wire length is taken to be the captured length.
        """
        n = len(packets)
        ts = np.fromiter((p[0] for p in packets), dtype=np.int64, count=n)
        lts = np.fromiter((p[1] for p in packets), dtype=np.uint16, count=n)
        caplens = np.fromiter((len(p[2]) for p in packets), dtype=np.int64, count=n)
        offsets = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(caplens[:-1], out=offsets[1:])
        data = np.frombuffer(b"".join(p[2] for p in packets), dtype=np.uint8)
        return cls(data, offsets, caplens, caplens.copy(), ts, lts)


class Initiator(StrEnum):
    """Which end started a flow (its first packet, or its SYN when seen)."""

    INTERNAL = "internal"
    REMOTE = "remote"


class VerdictKind(StrEnum):
    """The outcome of checking one flow against the policy."""

    DOMESTIC = "domestic"
    APPROVED = "approved"
    VIOLATION = "violation"
    UNKNOWN = "unknown"
    INTERNAL = "internal"
    TRANSIT = "transit"


class Reason(StrEnum):
    """Why a flow is a violation (or unknown); fixed codes that scripts match on."""

    NO_ROUTE = "no_route"
    ROUTE_EXPIRED = "route_expired"
    ZONE_NOT_ALLOWED = "zone_not_allowed"
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"
    PORT_NOT_ALLOWED = "port_not_allowed"
    NO_COUNTRY = "no_country"
    NAME_NOT_ALLOWED = "name_not_allowed"
    """The flow's server name is known, and the route lists names but not this one."""
    NAME_UNKNOWN = "name_unknown"
    """The route lists names, and the flow's server name is not known."""


class NameSource(StrEnum):
    """Where a flow's server name was read (``name_source``)."""

    SNI = "sni"
    """The server_name of the TLS ClientHello the client sent on this TCP flow."""
    QUIC = "quic"
    """The server_name of the ClientHello inside the flow's QUIC Initial packets."""
    DNS = "dns"
    """The name the client asked DNS for, whose answer was the remote address."""


class FlowName(NamedTuple):
    """The server name of one flow, and the names a route's ``names`` are matched against."""

    server_name: str
    source: NameSource
    names: tuple[str, ...]
    """``server_name`` and, when it is the head of a DNS CNAME chain, the rest of the chain."""


class GeoInfo(NamedTuple):
    """What the GeoIP databases say about one address."""

    country: str | None = None
    """ISO 3166-1 alpha-2 of the location (None: anycast, unknown, or not in the database)."""
    registered_country: str | None = None
    """Country the block is registered to, which can differ from the location."""
    asn: int | None = None
    as_org: str | None = None


class GeoSource(NamedTuple):
    """One database behind a resolver, as the report's ``geoip`` section lists it."""

    source: str
    """``maxmind`` or ``iptocc`` (the embedded registry-country default)."""
    path: str | None
    database_type: str
    build_epoch: int | None


class Verdict(NamedTuple):
    """The policy's answer for one flow."""

    verdict: VerdictKind
    route: str | None = None
    approval: str | None = None
    reason: Reason | None = None


class FlowEndpoints(NamedTuple):
    """What the policy needs to know about a flow, independent of its counters."""

    proto: int
    internal_ip: str | None
    """The internal endpoint (None for transit)."""
    remote_ip: str | None
    """The non-internal endpoint (the responder for transit; None for internal)."""
    service_port: int | None
    """The responder's port (``dst_port``); None for protocols without ports."""
    first_seen_ns: int
    names: tuple[str, ...] = ()
    """The flow's server name(s) (:attr:`FlowName.names`); empty when none is known."""


class FlowRecord(NamedTuple):
    """A finished (or, live, an interim) flow with its verdict: one row of the report.

    A NamedTuple rather than a frozen dataclass: an audit builds one per flow,
    and a tuple is several times cheaper to create.

    ``src_*`` is the initiator, ``dst_*`` the responder.  For flows with an
    internal end, ``*_out`` counts internal → remote; for transit and internal
    flows, initiator → responder.  Bytes are IP-layer bytes.
    """

    community_id: str
    proto: int
    src_ip: str
    src_port: int | None
    dst_ip: str
    dst_port: int | None
    initiator: Initiator | None
    remote_ip: str | None
    geo: GeoInfo
    zone: str | None
    first_seen_ns: int
    last_seen_ns: int
    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int
    verdict: Verdict
    server_name: str | None = None
    """The remote's name (TLS SNI, QUIC SNI or the DNS name asked); None when unknown."""
    name_source: NameSource | None = None


class Alert(NamedTuple):
    """One alert about an unapproved export, as the sinks deliver it.

    Repeated flows of the same group (internal source or zone, remote
    network, route or reason) within the suppression window are folded into
    the first alert: ``flow_count`` says how many flows it stands for so far.
    """

    record: FlowRecord
    sensor: str
    """Name of the gateway that saw the flow (default: its host name)."""
    interface: str | None
    group: str
    """Stable text key of the de-duplication group (also the Alertmanager fingerprint input)."""
    raised_ns: int
    flow_count: int = 1
