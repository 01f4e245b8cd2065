"""The audit report: JSON schema ``egressd.audit/1`` and the terminal text view.

The JSON report is the contract auditors and scripts rely on; its fields are
documented in ``docs/report-schema.md`` and never change meaning within a
schema version.  The same captures, policy and databases always give the same
report byte for byte, except ``generated_at``: flows are sorted, maps are
emitted in a fixed order, and nothing depends on batch sizes or timing.
"""

from __future__ import annotations

import functools
import json
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from itertools import compress, count, islice
from typing import IO, Any

from egressd import __version__
from egressd.model import (
    FlowRecord,
    GeoInfo,
    GeoSource,
    Initiator,
    NameSource,
    Verdict,
    VerdictKind,
    proto_name,
)

SCHEMA = "egressd.audit/1"
VERDICT_ORDER = tuple(v.value for v in VerdictKind)
NO_COUNTRY_KEY = "unknown"
"""Key of ``bytes_out_by_country`` for remotes without a country."""


@functools.lru_cache(maxsize=65536)
def _second(sec: int) -> str:
    # Flows cluster in time: formatting each second once saves most of the cost.
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(ns: int) -> str:
    """UTC RFC 3339 time with microseconds, from nanoseconds since the epoch."""
    sec, rem = divmod(ns, 1_000_000_000)
    return f"{_second(sec)}.{rem // 1000:06d}Z"


@dataclass(slots=True)
class CaptureSummary:
    """What the report says about one capture file."""

    path: str
    sha256: str
    format: str
    link_types: list[int]
    packets: int
    bytes: int
    """Size of the file as stored (what ``sha256`` covers)."""
    first_ns: int | None
    last_ns: int | None
    truncated: bool
    damage: str | None
    decode_errors: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "format": self.format,
            "link_types": sorted(self.link_types),
            "packets": self.packets,
            "bytes": self.bytes,
            "first_ts": rfc3339(self.first_ns) if self.first_ns is not None else None,
            "last_ts": rfc3339(self.last_ns) if self.last_ns is not None else None,
            "truncated": self.truncated,
            "damage": self.damage,
            "decode_errors": dict(sorted(self.decode_errors.items())),
        }


def flow_order(f: FlowRecord) -> tuple[int, str, str, int, str, int, int]:
    """The report's sort key of a flow: first seen, then the 5-tuple."""
    return (f.first_seen_ns, f.community_id, f.src_ip, f.src_port or 0, f.dst_ip,
            f.dst_port or 0, f.proto)


_FIRST_SEEN = operator.attrgetter("first_seen_ns")
"""Sort key of :meth:`AuditResult.sort_flows` (an int per flow, cheaper than a tuple)."""


@dataclass(slots=True)
class AuditResult:
    """Everything an audit found; rendered by :func:`write_json` or :func:`write_text`."""

    policy_path: str
    policy_sha256: str
    geoip: list[GeoSource]
    captures: list[CaptureSummary]
    flows: list[FlowRecord]
    warnings: list[str] = field(default_factory=list)

    def sort_flows(self) -> None:
        """Put flows in the report's fixed order (first seen, then the 5-tuple).

        The order is that of :func:`flow_order`.  Sorting by the first-seen
        time alone is several times cheaper (an int per flow instead of a
        tuple) and almost always decides; only runs of flows first seen in
        the same nanosecond are then sorted again by the whole key.  Both sorts
        are stable, so ties of the whole key keep their order as before.
        """
        flows = self.flows
        flows.sort(key=_FIRST_SEEN)
        times = list(map(_FIRST_SEEN, flows))
        # Indexes i where flow i was first seen when flow i - 1 was (all in C).
        ties = list(compress(count(1), map(operator.eq, islice(times, 1, None), times)))
        i = 0
        while i < len(ties):
            start = end = ties[i]
            while i < len(ties) and ties[i] == end:
                i += 1
                end += 1
            flows[start - 1:end] = sorted(flows[start - 1:end], key=flow_order)

    def verdict_counts(self) -> dict[str, int]:
        counts, _, _ = self._tally()
        return {v.value: counts[v] for v in VerdictKind}

    def summary(self) -> dict[str, Any]:
        counts, by_verdict, by_country = self._tally()
        countries: Counter[str] = Counter()
        for country, out in by_country.items():
            countries[country or NO_COUNTRY_KEY] += out
        return {
            "packets": sum(c.packets for c in self.captures),
            "flows": len(self.flows),
            "verdicts": {v.value: counts[v] for v in VerdictKind},
            "bytes_out_by_verdict": {v.value: by_verdict[v] for v in VerdictKind},
            "bytes_out_by_country": dict(sorted(countries.items())),
        }

    def _tally(self) -> tuple[dict[VerdictKind, int], dict[VerdictKind, int],
                              dict[str | None, int]]:
        """Flows and bytes out per verdict, and bytes out per country of the exports.

        One pass keyed by the enum members themselves: their ``.value`` is a
        Python-level property, too slow to read once per flow.
        """
        counts = dict.fromkeys(VerdictKind, 0)
        by_verdict = dict.fromkeys(VerdictKind, 0)
        by_country: dict[str | None, int] = {}
        internal, transit = VerdictKind.INTERNAL, VerdictKind.TRANSIT
        for f in self.flows:
            kind = f.verdict.verdict
            out = f.bytes_out
            counts[kind] += 1
            by_verdict[kind] += out
            if kind is not internal and kind is not transit:
                country = f.geo.country
                by_country[country] = by_country.get(country, 0) + out
        return counts, by_verdict, by_country


def flow_json(f: FlowRecord) -> dict[str, Any]:
    """One flow as the report's ``flows[]`` object."""
    v = f.verdict
    return {
        "community_id": f.community_id,
        "proto": proto_name(f.proto),
        "src_ip": f.src_ip,
        "src_port": f.src_port,
        "dst_ip": f.dst_ip,
        "dst_port": f.dst_port,
        "initiator": f.initiator.value if f.initiator is not None else None,
        "remote_ip": f.remote_ip,
        "server_name": f.server_name,
        "name_source": f.name_source.value if f.name_source is not None else None,
        "country": f.geo.country,
        "registered_country": f.geo.registered_country,
        "asn": f.geo.asn,
        "as_org": f.geo.as_org,
        "zone": f.zone,
        "first_seen": rfc3339(f.first_seen_ns),
        "last_seen": rfc3339(f.last_seen_ns),
        "packets_out": f.packets_out,
        "bytes_out": f.bytes_out,
        "packets_in": f.packets_in,
        "bytes_in": f.bytes_in,
        "verdict": v.verdict.value,
        "route": v.route,
        "approval": v.approval,
        "reason": v.reason.value if v.reason is not None else None,
    }


@functools.lru_cache(maxsize=65536)
def _js(value: str | None) -> str:
    """JSON text of a string from the policy or the GeoIP data (escaped once, then cached)."""
    return "null" if value is None else json.dumps(value, ensure_ascii=False)


def _jip(value: str | None) -> str:
    """JSON text of an address (never needs escaping; too many distinct ones to cache)."""
    return "null" if value is None else f'"{value}"'


def _jn(value: int | None) -> str:
    return "null" if value is None else str(value)


_PROTO_JSON = {p: json.dumps(proto_name(p)) for p in range(256)}
_ENUM_JSON: dict[StrEnum | None, str] = {
    None: "null", **{m: json.dumps(m.value) for e in (Initiator, NameSource) for m in e}}
"""JSON text of the enum fields of a flow (formatting an enum member is a Python call)."""


def _fragment(key: GeoInfo | Verdict) -> str:
    """The JSON text of the geo or verdict fields (few distinct values: cached)."""
    if isinstance(key, GeoInfo):
        return _geo_fragment(key)
    return _verdict_fragment(key)


@functools.lru_cache(maxsize=65536)
def _geo_fragment(g: GeoInfo) -> str:
    return (f'"country":{_js(g.country)},"registered_country":{_js(g.registered_country)},'
            f'"asn":{_jn(g.asn)},"as_org":{_js(g.as_org)}')


@functools.lru_cache(maxsize=4096)
def _verdict_fragment(v: Verdict) -> str:
    return (f'"verdict":{_js(v.verdict)},"route":{_js(v.route)},'
            f'"approval":{_js(v.approval)},"reason":{_js(v.reason)}')


def flow_line(f: FlowRecord) -> str:
    """``json.dumps(flow_json(f), separators=(",", ":"))``, several times faster.

    Addresses and Community IDs never need escaping; every other string goes
    through :func:`json.dumps` once, and the geo and verdict fields, which
    repeat across flows, are formatted once per distinct value.  The test
    suite checks both agree.
    """
    return (
        f'{{"community_id":"{f.community_id}","proto":{_PROTO_JSON[f.proto]},'
        f'"src_ip":"{f.src_ip}","src_port":{_jn(f.src_port)},'
        f'"dst_ip":"{f.dst_ip}","dst_port":{_jn(f.dst_port)},'
        f'"initiator":{_js(f.initiator)},"remote_ip":{_jip(f.remote_ip)},'
        f'"server_name":{_js(f.server_name)},"name_source":{_js(f.name_source)},'
        f'{_fragment(f.geo)},"zone":{_js(f.zone)},'
        f'"first_seen":"{rfc3339(f.first_seen_ns)}","last_seen":"{rfc3339(f.last_seen_ns)}",'
        f'"packets_out":{f.packets_out},"bytes_out":{f.bytes_out},'
        f'"packets_in":{f.packets_in},"bytes_in":{f.bytes_in},{_fragment(f.verdict)}}}'
    )


def flow_lines(flows: Iterable[FlowRecord]) -> Iterator[str]:
    """:func:`flow_line` of each flow, with less work per flow for a whole report.

    The geo and verdict fields are formatted once per distinct object (the
    classifier hands the same few objects to thousands of flows), looked up by
    ``id()`` rather than by hashing the tuple (a Verdict hashes its enum
    members in Python).  The tables hold every object they have an ``id()``
    of, so no id is reused while they exist.  The fields are unpacked in one
    step instead of read by name.  The test suite checks this equals
    :func:`flow_line` and ``json.dumps``.
    """
    held: list[object] = []
    geo_text: dict[int, str] = {}
    verdict_text: dict[int, str] = {}
    second_text: dict[int, str] = {}
    enum_text = _ENUM_JSON
    proto_text = _PROTO_JSON
    js = _js
    for f in flows:
        (cid, proto, src_ip, src_port, dst_ip, dst_port, initiator, remote_ip, geo, zone,
         first_ns, last_ns, packets_out, bytes_out, packets_in, bytes_in, verdict,
         server_name, name_source) = f
        g = geo_text.get(id(geo))
        if g is None:
            held.append(geo)
            g = geo_text[id(geo)] = _geo_fragment(geo)
        v = verdict_text.get(id(verdict))
        if v is None:
            held.append(verdict)
            v = verdict_text[id(verdict)] = _verdict_fragment(verdict)
        first_s, first_rem = divmod(first_ns, 1_000_000_000)
        first = second_text.get(first_s)
        if first is None:
            first = second_text[first_s] = _second(first_s)
        last_s, last_rem = divmod(last_ns, 1_000_000_000)
        last = second_text.get(last_s)
        if last is None:
            last = second_text[last_s] = _second(last_s)
        remote = "null" if remote_ip is None else f'"{remote_ip}"'
        yield (
            f'{{"community_id":"{cid}","proto":{proto_text[proto]},'
            f'"src_ip":"{src_ip}","src_port":{"null" if src_port is None else src_port},'
            f'"dst_ip":"{dst_ip}","dst_port":{"null" if dst_port is None else dst_port},'
            f'"initiator":{enum_text[initiator]},'
            f'"remote_ip":{remote},'
            f'"server_name":{js(server_name)},"name_source":{enum_text[name_source]},'
            f'{g},"zone":{js(zone)},'
            f'"first_seen":"{first}.{first_rem // 1000:06d}Z",'
            f'"last_seen":"{last}.{last_rem // 1000:06d}Z",'
            f'"packets_out":{packets_out},"bytes_out":{bytes_out},'
            f'"packets_in":{packets_in},"bytes_in":{bytes_in},{v}}}'
        )


def write_json(result: AuditResult, out: IO[str], *, generated_at: datetime | None = None) -> None:
    """Write the ``egressd.audit/1`` report.

    Top-level keys are indented; each flow is one compact line, which keeps
    large reports fast to write and easy to diff and grep.
    """
    now = generated_at or datetime.now(UTC)
    head: dict[str, Any] = {
        "schema": SCHEMA,
        "egressd_version": __version__,
        "generated_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policy": {"path": result.policy_path, "sha256": result.policy_sha256},
        "geoip": [
            {"source": g.source, "path": g.path, "database_type": g.database_type,
             "build_epoch": g.build_epoch} for g in result.geoip
        ],
        "captures": [c.to_json() for c in result.captures],
        "summary": result.summary(),
        "warnings": list(result.warnings),
    }
    out.write("{\n")
    for key, value in head.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n")
    out.write('  "flows": [')
    _write_lines(out, flow_lines(result.flows))
    out.write("]\n}\n")


_LINES_PER_WRITE = 4096
"""Flow lines joined into one write: fewer calls, and memory stays bounded."""


def _write_lines(out: IO[str], lines: Iterable[str]) -> None:
    sep = ",\n    "
    lead = "\n    "
    it = iter(lines)
    while chunk := list(islice(it, _LINES_PER_WRITE)):
        out.write(lead)
        out.write(sep.join(chunk))
        lead = sep
    if lead == sep:
        out.write("\n  ")
