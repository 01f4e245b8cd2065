"""Report rendering: the fast flow encoder equals json.dumps, summaries, times, text view."""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.model import (
    FlowRecord,
    GeoInfo,
    GeoSource,
    Initiator,
    NameSource,
    Reason,
    Verdict,
    VerdictKind,
)
from egressd.report import (
    AuditResult,
    CaptureSummary,
    flow_json,
    flow_line,
    flow_lines,
    rfc3339,
    write_json,
)
from egressd.report_text import write_text

TEXT = st.one_of(st.none(), st.text(max_size=12))
NS = st.integers(0, 4_000_000_000 * 10**9)


@st.composite
def records(draw: st.DrawFn) -> FlowRecord:
    verdict = draw(st.sampled_from(list(VerdictKind)))
    return FlowRecord(
        community_id="1:" + draw(st.text("abcXYZ019+/=", min_size=28, max_size=28)),
        proto=draw(st.integers(0, 255)),
        src_ip=draw(st.sampled_from(["10.0.0.1", "fd00::1"])),
        src_port=draw(st.one_of(st.none(), st.integers(0, 65535))),
        dst_ip=draw(st.sampled_from(["203.0.113.5", "2001:db8::5"])),
        dst_port=draw(st.one_of(st.none(), st.integers(0, 65535))),
        initiator=draw(st.one_of(st.none(), st.sampled_from(list(Initiator)))),
        remote_ip=draw(st.one_of(st.none(), st.just("203.0.113.5"))),
        geo=GeoInfo(draw(TEXT), draw(TEXT), draw(st.one_of(st.none(), st.integers(0, 2**32))),
                    draw(TEXT)),
        zone=draw(TEXT),
        first_seen_ns=draw(NS), last_seen_ns=draw(NS),
        packets_out=draw(st.integers(0, 10**9)), bytes_out=draw(st.integers(0, 10**15)),
        packets_in=draw(st.integers(0, 10**9)), bytes_in=draw(st.integers(0, 10**15)),
        verdict=Verdict(verdict, draw(TEXT), draw(TEXT),
                        draw(st.one_of(st.none(), st.sampled_from(list(Reason))))),
        server_name=draw(TEXT),
        name_source=draw(st.one_of(st.none(), st.sampled_from(list(NameSource)))),
    )


@settings(max_examples=300, deadline=None)
@given(records())
def test_fast_flow_line_is_exactly_json_dumps(rec: FlowRecord) -> None:
    expected = json.dumps(flow_json(rec), ensure_ascii=False, separators=(",", ":"))
    assert flow_line(rec) == expected


@settings(max_examples=200, deadline=None)
@given(NS)
def test_rfc3339_matches_datetime(ns: int) -> None:
    dt = datetime.fromtimestamp(ns // 10**9, UTC)
    assert rfc3339(ns) == dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9 // 1000:06d}Z"


def _rec(verdict: VerdictKind, country: str | None, out: int) -> FlowRecord:
    return FlowRecord("1:x", 6, "10.0.0.1", 1, "203.0.113.5", 443, Initiator.INTERNAL,
                      "203.0.113.5", GeoInfo(country), "corp", 10**18, 10**18 + 5, 1, out, 1, 7,
                      Verdict(verdict, reason=Reason.NO_ROUTE
                              if verdict is VerdictKind.VIOLATION else None))


def _result() -> AuditResult:
    cap = CaptureSummary("a.pcap", "00" * 32, "pcap", [1], 10, 999, 10**18, 10**18 + 5, False,
                         None, Counter({"non_ip": 2}))
    flows = [_rec(VerdictKind.VIOLATION, "US", 100)._replace(
                 server_name="api.crm-vendor.example", name_source=NameSource.QUIC),
             _rec(VerdictKind.DOMESTIC, "CN", 50),
             _rec(VerdictKind.UNKNOWN, None, 7), _rec(VerdictKind.TRANSIT, "DE", 1000),
             _rec(VerdictKind.VIOLATION, "US", 1)]
    return AuditResult("p.yaml", "ab" * 32, [GeoSource("maxmind", "/x.mmdb", "GeoLite2-Country",
                                                        1)], [cap], flows, ["w1"])


def test_summary_counts_every_verdict_and_exports_by_country() -> None:
    s = _result().summary()
    assert s["verdicts"] == {"domestic": 1, "approved": 0, "violation": 2, "unknown": 1,
                             "internal": 0, "transit": 1}
    assert s["bytes_out_by_verdict"]["violation"] == 101
    assert s["bytes_out_by_country"] == {"CN": 50, "US": 101, "unknown": 7}  # no transit
    assert s["packets"] == 10 and s["flows"] == 5


def test_json_document_layout_is_valid_and_fixed() -> None:
    out = io.StringIO()
    write_json(_result(), out, generated_at=datetime(2026, 3, 1, tzinfo=UTC))
    doc = json.loads(out.getvalue())
    assert list(doc) == ["schema", "egressd_version", "generated_at", "policy", "geoip",
                         "captures", "summary", "warnings", "flows"]
    assert doc["generated_at"] == "2026-03-01T00:00:00Z"
    assert doc["captures"][0]["decode_errors"] == {"non_ip": 2}
    assert len(doc["flows"]) == 5
    empty = io.StringIO()
    write_json(AuditResult("p", "s", [], [], []), empty)
    assert json.loads(empty.getvalue())["flows"] == []


def test_text_report_lists_findings_largest_first() -> None:
    out = io.StringIO()
    write_text(_result(), out)
    text = out.getvalue()
    assert "Violations and unknown-country exports (3)" in text
    lines = [ln for ln in text.splitlines() if "no_route" in ln or "no_country" in ln]
    assert "100 B" in lines[0] and "1 B" in lines[-1]
    assert "api.crm-vendor.example (quic)" in lines[0]
    assert "warning: w1" in text


@settings(max_examples=100, deadline=None)
@given(st.lists(records(), max_size=8), st.lists(st.integers(0, 7), max_size=40))
def test_flow_lines_equal_flow_line_with_shared_geo_and_verdicts(
        distinct: list[FlowRecord], picks: list[int]) -> None:
    """The report's encoder memoizes by object identity: objects shared by many flows
    (as the classifier shares them) and equal but distinct objects give the same text."""
    if not distinct:
        return
    flows = [distinct[i % len(distinct)] for i in picks]
    flows += [f._replace(geo=GeoInfo(*f.geo), verdict=Verdict(*f.verdict)) for f in distinct]
    assert list(flow_lines(flows)) == [flow_line(f) for f in flows]
    assert list(flow_lines(flows)) == [json.dumps(flow_json(f), ensure_ascii=False,
                                                  separators=(",", ":")) for f in flows]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["1:a", "1:b"]),
                          st.sampled_from(["10.0.0.1", "10.0.0.2"]),
                          st.sampled_from([None, 0, 80]), st.integers(0, 2)), max_size=40))
def test_sort_flows_is_a_stable_sort_by_the_whole_key(
        rows: list[tuple[int, str, str, int | None, int]]) -> None:
    """Sorting by the first-seen time, then only its ties by the whole key, gives the
    order (ties of the whole key included) of one stable sort by the whole key."""
    flows = [FlowRecord(cid, 6, ip, port, "203.0.113.5", 443, None, None, GeoInfo(), None,
                        first, first, i, 0, 0, 0, Verdict(VerdictKind.TRANSIT))
             for i, (first, cid, ip, port, _) in enumerate(rows)]
    want = sorted(flows, key=lambda f: (f.first_seen_ns, f.community_id, f.src_ip,
                                        f.src_port or 0, f.dst_ip, f.dst_port or 0, f.proto))
    result = AuditResult("p", "s", [], [], list(flows))
    result.sort_flows()
    assert result.flows == want  # packets_out tells apart ties of the whole key


def test_json_flow_lines_are_written_in_chunks() -> None:
    """More flows than one write holds: every line once, separators as with one line each."""
    rec = _rec(VerdictKind.DOMESTIC, "CN", 5)
    result = AuditResult("p", "s", [], [], [rec._replace(packets_out=i) for i in range(9000)])
    out = io.StringIO()
    write_json(result, out)
    text = out.getvalue()
    assert [f["packets_out"] for f in json.loads(text)["flows"]] == list(range(9000))
    assert text.endswith('}\n  ]\n}\n') and '  "flows": [\n    {' in text
    assert text.count("},\n    {") == 8999
