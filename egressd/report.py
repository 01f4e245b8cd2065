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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from egressd import __version__
from egressd.model import FlowRecord, GeoInfo, GeoSource, Verdict, VerdictKind, proto_name

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
        """Put flows in the report's fixed order (first seen, then the 5-tuple)."""
        self.flows.sort(key=lambda f: (f.first_seen_ns, f.community_id, f.src_ip,
                                       f.src_port or 0, f.dst_ip, f.dst_port or 0, f.proto))

    def verdict_counts(self) -> dict[str, int]:
        counts = Counter(f.verdict.verdict.value for f in self.flows)
        return {v: counts.get(v, 0) for v in VERDICT_ORDER}

    def summary(self) -> dict[str, Any]:
        by_verdict: Counter[str] = Counter()
        by_country: Counter[str] = Counter()
        for f in self.flows:
            v = f.verdict.verdict
            by_verdict[v.value] += f.bytes_out
            if v not in (VerdictKind.INTERNAL, VerdictKind.TRANSIT):
                by_country[f.geo.country or NO_COUNTRY_KEY] += f.bytes_out
        return {
            "packets": sum(c.packets for c in self.captures),
            "flows": len(self.flows),
            "verdicts": self.verdict_counts(),
            "bytes_out_by_verdict": {v: by_verdict.get(v, 0) for v in VERDICT_ORDER},
            "bytes_out_by_country": dict(sorted(by_country.items())),
        }


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
    _write_lines(out, (flow_line(f) for f in result.flows))
    out.write("]\n}\n")


def _write_lines(out: IO[str], lines: Iterable[str]) -> None:
    first = True
    for line in lines:
        out.write("\n    " if first else ",\n    ")
        out.write(line)
        first = False
    if not first:
        out.write("\n  ")
