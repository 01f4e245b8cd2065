"""The audit as one self-contained HTML page: the evidence an auditor files.

The page fetches nothing: styles, the sorting script and the SVG charts are
all inline, and a Content-Security-Policy forbids any request, so the file can
be archived, mailed and opened offline and always shows the same thing.  Every
string that comes from the captures, the policy or the GeoIP data is escaped.

The violation table sorts on a header click (numbers numerically); an initial
sort can be given in the URL fragment, e.g. ``report.html#sort=bytes_out:desc``.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import IO, Any

from egressd import __version__
from egressd.model import FlowRecord, GeoSource, Initiator, VerdictKind, proto_name
from egressd.policy import Policy, ns_to_text
from egressd.report import NO_COUNTRY_KEY, VERDICT_ORDER, AuditResult, rfc3339

GEOIP_MAX_AGE_DAYS = 30
"""A GeoIP database older than this at the time of the capture gets a warning."""

FINDING_VERDICTS = (VerdictKind.VIOLATION, VerdictKind.UNKNOWN)
TIMELINE_BUCKETS = 60

VERDICT_COLORS = {
    "domestic": "#2e7d32",
    "approved": "#1565c0",
    "violation": "#c62828",
    "unknown": "#ef6c00",
    "internal": "#757575",
    "transit": "#6a1b9a",
}


# -- evidence shared with the text report -----------------------------------------------


@dataclass(frozen=True, slots=True)
class GeoEvidence:
    """One GeoIP database as evidence: what it is, when it was built, whether it was stale."""

    source: GeoSource
    built: str | None
    """Build time (RFC 3339 UTC), None when the data carries none."""
    age_days: int | None
    """Whole days between the build and the first packet of the audit."""
    warning: str | None


def capture_start_ns(result: AuditResult) -> int | None:
    """The first packet of all captures (None without packets)."""
    starts = [c.first_ns for c in result.captures if c.first_ns is not None]
    return min(starts) if starts else None


def geoip_evidence(result: AuditResult) -> list[GeoEvidence]:
    """Build date and age of each GeoIP database, with a warning when it was stale."""
    start = capture_start_ns(result)
    out = []
    for g in result.geoip:
        if g.build_epoch is None:
            out.append(GeoEvidence(g, None, None, None))
            continue
        built = datetime.fromtimestamp(g.build_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if start is None:
            out.append(GeoEvidence(g, built, None, None))
            continue
        age = (start // 1_000_000_000 - g.build_epoch) // 86400
        warning = None
        if age > GEOIP_MAX_AGE_DAYS:
            warning = (f"database was {age} days old at the time of the capture "
                       f"(more than {GEOIP_MAX_AGE_DAYS}): countries and ASNs may be out of date")
        elif age < 0:
            warning = ("database was built after the capture: it is not the data that was "
                       "current when the traffic was seen")
        out.append(GeoEvidence(g, built, age, warning))
    return out


def command_text(command: Sequence[str]) -> str:
    """The command line as a shell would read it back."""
    return shlex.join(command)


def findings(flows: Iterable[FlowRecord]) -> list[FlowRecord]:
    """Violations and unknown-country flows that sent data out, largest first."""
    found = [f for f in flows if f.bytes_out > 0 and f.verdict.verdict in FINDING_VERDICTS]
    found.sort(key=lambda f: (-f.bytes_out, f.first_seen_ns, f.community_id))
    return found


# -- HTML --------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Escaped text of anything (None becomes an empty string)."""
    return "" if value is None else escape(str(value), quote=True)


def _human(n: float) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222;background:#fff}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num,th.num{text-align:right}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.verdict{padding:.75rem 1rem;border-radius:4px;font-size:1.1rem;font-weight:600}
.fail{background:#fdecea;color:#8e1b1b}.pass{background:#e8f5e9;color:#1b5e20}
.warn{color:#8a4b00;font-weight:600}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.5rem;overflow:auto;font-size:.8rem}
.scroll{overflow-x:auto}svg text{font-size:11px;font-family:inherit}
.mono{font-family:ui-monospace,monospace}
"""

_JS = """
(function () {
  "use strict";
  var table = document.getElementById("findings-table");
  if (!table) { return; }
  var heads = table.tHead.rows[0].cells;
  var body = table.tBodies[0];
  function value(row, i, numeric) {
    var cell = row.cells[i];
    var v = cell.getAttribute("data-v");
    if (v === null) { v = cell.textContent; }
    if (numeric) { return v === "" ? null : Number(v); }
    return v;
  }
  function sortBy(key, dir) {
    var idx = -1, i;
    for (i = 0; i < heads.length; i++) {
      if (heads[i].getAttribute("data-key") === key) { idx = i; }
    }
    if (idx < 0) { return false; }
    if (dir !== "desc") { dir = "asc"; }
    var numeric = heads[idx].getAttribute("data-type") === "num";
    var rows = Array.prototype.slice.call(body.rows);
    var order = rows.map(function (r, n) { return n; });
    var sign = dir === "desc" ? -1 : 1;
    order.sort(function (a, b) {
      var x = value(rows[a], idx, numeric), y = value(rows[b], idx, numeric), c;
      if (x === null || y === null) {
        c = (x === null ? 1 : 0) - (y === null ? 1 : 0);  /* empty cells last */
      } else {
        c = sign * (x < y ? -1 : (x > y ? 1 : 0));
      }
      return c || a - b;
    });
    order.forEach(function (n) { body.appendChild(rows[n]); });
    for (i = 0; i < heads.length; i++) {
      if (i === idx) {
        heads[i].setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
      } else {
        heads[i].removeAttribute("aria-sort");
      }
    }
    table.setAttribute("data-sort", key + ":" + dir);
    return true;
  }
  Array.prototype.forEach.call(heads, function (th) {
    th.addEventListener("click", function () {
      var cur = table.getAttribute("data-sort") || "";
      var key = th.getAttribute("data-key");
      sortBy(key, cur === key + ":asc" ? "desc" : "asc");
    });
  });
  function fromFragment() {
    var m = /(?:^|[#&])sort=([A-Za-z_]+)(?::(asc|desc))?/.exec(window.location.hash);
    if (m) { sortBy(m[1], m[2] || "asc"); }
  }
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
"""

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'")


def write_html(result: AuditResult, out: IO[str], *, command: Sequence[str], policy_text: str,
               policy: Policy | None = None, generated_at: datetime | None = None) -> None:
    """Write ``result`` as one self-contained HTML page.

    ``command`` is the command line that produced the audit and
    ``policy_text`` the policy file's full text, both shown in the evidence
    block.  ``policy`` (optional) adds each approved route's expiry and the
    routes that approved nothing.
    """
    now = generated_at or datetime.now(UTC)
    summary = result.summary()
    parts: list[str] = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">\n',
        '<meta name="referrer" content="no-referrer">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>egressd audit report: {_e(result.policy_path)}</title>\n",
        f"<style>{_CSS}</style>\n</head>\n<body>\n",
        "<h1>Egress audit report</h1>\n",
        f"<p>Generated {_e(now.strftime('%Y-%m-%dT%H:%M:%SZ'))} by egressd "
        f"{_e(__version__)}.</p>\n",
    ]
    found = findings(result.flows)
    parts.append(_verdict_section(result, summary, found))
    parts.append(_country_section(summary["bytes_out_by_country"]))
    parts.append(_route_section(result, policy))
    parts.append(_findings_section(found))
    parts.append(_timeline_section(result))
    parts.append(_evidence_section(result, command, policy_text, now))
    parts.append(f"<script>{_JS}</script>\n</body>\n</html>\n")
    out.write("".join(parts))


def _verdict_section(result: AuditResult, summary: dict[str, Any],
                     found: list[FlowRecord]) -> str:
    violations = [f for f in found if f.verdict.verdict is VerdictKind.VIOLATION]
    unknown = [f for f in found if f.verdict.verdict is VerdictKind.UNKNOWN]
    if violations:
        cls = "fail"
        text = (f"FAIL: {len(violations)} flow{'s' if len(violations) != 1 else ''} exported "
                f"{sum(f.bytes_out for f in violations)} bytes without an approved route")
    else:
        cls = "pass"
        text = "PASS: no export without an approved route"
    if unknown:
        text += (f"; {len(unknown)} export{'s' if len(unknown) != 1 else ''} to remotes of "
                 f"unknown country ({sum(f.bytes_out for f in unknown)} bytes) need review")
    rows = "".join(
        f'<tr data-verdict="{_e(v)}"><td>{_e(v)}</td><td class="num">{count}</td>'
        f'<td class="num" data-v="{summary["bytes_out_by_verdict"][v]}">'
        f'{summary["bytes_out_by_verdict"][v]}</td></tr>'
        for v, count in summary["verdicts"].items())
    warn = ""
    if result.warnings:
        warn = "<h3>Warnings</h3><ul>" + "".join(
            f'<li class="warn">{_e(w)}</li>' for w in result.warnings) + "</ul>"
    return (f'<section id="summary"><h2>Verdict</h2>\n'
            f'<p class="verdict {cls}" id="verdict" data-violations="{len(violations)}" '
            f'data-unknown="{len(unknown)}">{_e(text)}</p>\n'
            f"<p>{summary['packets']} packets, {summary['flows']} flows.</p>\n"
            '<table id="verdicts"><thead><tr><th>verdict</th><th class="num">flows</th>'
            f'<th class="num">bytes out</th></tr></thead><tbody>{rows}</tbody></table>'
            f"{warn}</section>\n")


def _country_section(by_country: dict[str, int]) -> str:
    items = sorted(by_country.items(), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return ('<section id="countries"><h2>Outbound bytes by country</h2>'
                "<p>No outbound traffic to remotes.</p></section>\n")
    label_w, bar_w, row_h = 130, 560, 22
    height = row_h * len(items) + 10
    top = max(v for _, v in items) or 1
    svg = [f'<svg id="country-chart" role="img" '
           f'width="{label_w + bar_w + 150}" height="{height}" '
           'aria-label="Outbound bytes by country">']
    for i, (country, nbytes) in enumerate(items):
        y = 5 + i * row_h
        w = bar_w * nbytes / top
        color = "#9e9e9e" if country == NO_COUNTRY_KEY else "#1565c0"
        name = "unknown country" if country == NO_COUNTRY_KEY else country
        svg.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(name)}</text>'
            f'<rect class="bar" data-country="{_e(country)}" data-bytes="{nbytes}" '
            f'x="{label_w}" y="{y + 2}" width="{w:.2f}" height="{row_h - 6}" fill="{color}">'
            f"<title>{_e(name)}: {nbytes} bytes</title></rect>"
            f'<text x="{label_w + w + 6:.2f}" y="{y + 15}">{_e(_human(nbytes))} '
            f"({nbytes} B)</text>")
    svg.append("</svg>")
    return ('<section id="countries"><h2>Outbound bytes by country</h2>\n'
            + "".join(svg) + "</section>\n")


def _route_section(result: AuditResult, policy: Policy | None) -> str:
    stats: dict[str, list[Any]] = {}
    for f in result.flows:
        v = f.verdict
        if v.verdict is VerdictKind.APPROVED and v.route is not None:
            entry = stats.setdefault(v.route, [v.approval, 0, 0])
            entry[1] += 1
            entry[2] += f.bytes_out
    names: list[str] = []
    expiry: dict[str, str] = {}
    approvals: dict[str, str] = {}
    if policy is not None:
        for r in policy.routes:
            names.append(r.name)
            approvals[r.name] = r.approval
            expiry[r.name] = ns_to_text(r.expires_ns) if r.expires_ns is not None else "never"
    names += sorted(n for n in stats if n not in names)
    if not names:
        return ('<section id="routes"><h2>Approved routes</h2>'
                "<p>The policy has no approved export routes.</p></section>\n")
    rows = []
    for name in names:
        approval, flows, nbytes = stats.get(name, [approvals.get(name), 0, 0])
        rows.append(
            f'<tr data-route="{_e(name)}" data-flows="{flows}" data-bytes="{nbytes}">'
            f"<td>{_e(name)}</td><td>{_e(approval or approvals.get(name))}</td>"
            f"<td>{_e(expiry.get(name, '(not in the policy given)'))}</td>"
            f'<td class="num">{flows}</td><td class="num">{nbytes}</td></tr>')
    return ('<section id="routes"><h2>Approved routes</h2>\n'
            '<table id="routes-table"><thead><tr><th>route</th><th>approval</th>'
            '<th>expires</th><th class="num">flows</th><th class="num">bytes out</th>'
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>\n")


_FINDING_COLUMNS = (
    # key, title, numeric
    ("verdict", "verdict", False),
    ("reason", "reason", False),
    ("route", "route", False),
    ("internal", "internal host", False),
    ("zone", "zone", False),
    ("remote", "remote", False),
    ("server_name", "server name", False),
    ("proto", "proto", False),
    ("country", "country", False),
    ("asn", "ASN", True),
    ("as_org", "AS organisation", False),
    ("bytes_out", "bytes out", True),
    ("first_seen", "first seen", False),
    ("last_seen", "last seen", False),
    ("community_id", "Community ID", False),
)


def _endpoints(f: FlowRecord) -> tuple[str, str]:
    """(internal host, remote endpoint with the service port)."""
    internal = f.dst_ip if f.initiator is Initiator.REMOTE else f.src_ip
    remote = f.remote_ip or (f.src_ip if f.initiator is Initiator.REMOTE else f.dst_ip)
    port = f.dst_port if f.proto in (6, 17, 132) else None
    if port is not None and f.initiator is not Initiator.REMOTE:
        remote = f"[{remote}]:{port}" if ":" in remote else f"{remote}:{port}"
    return internal, remote


def _findings_section(found: list[FlowRecord]) -> str:
    head = "".join(
        f'<th data-key="{key}" data-type="num" class="num">{_e(title)}</th>' if num
        else f'<th data-key="{key}" data-type="str">{_e(title)}</th>'
        for key, title, num in _FINDING_COLUMNS)
    rows = []
    for f in found:
        internal, remote = _endpoints(f)
        v = f.verdict
        cells = {
            "verdict": v.verdict.value,
            "reason": v.reason.value if v.reason is not None else "",
            "route": v.route or "",
            "internal": internal,
            "zone": f.zone or "",
            "remote": remote,
            "server_name": (f"{f.server_name} ({f.name_source.value})"
                            if f.server_name is not None and f.name_source is not None else ""),
            "proto": str(proto_name(f.proto)),
            "country": f.geo.country or "",
            "asn": "" if f.geo.asn is None else str(f.geo.asn),
            "as_org": f.geo.as_org or "",
            "bytes_out": str(f.bytes_out),
            "first_seen": rfc3339(f.first_seen_ns),
            "last_seen": rfc3339(f.last_seen_ns),
            "community_id": f.community_id,
        }
        tds = []
        for key, _, num in _FINDING_COLUMNS:
            text = _e(cells[key])
            if num:
                tds.append(f'<td class="num" data-v="{text}">{text}</td>')
            elif key == "community_id":
                tds.append(f'<td class="mono">{text}</td>')
            else:
                tds.append(f"<td>{text}</td>")
        rows.append(f'<tr data-community-id="{_e(f.community_id)}" data-bytes="{f.bytes_out}">'
                    + "".join(tds) + "</tr>")
    empty = "" if rows else "<p>None: every export was domestic or approved.</p>"
    return ('<section id="findings"><h2>Violations and unknown-country exports '
            f"({len(found)})</h2>\n<p>Flows that sent data out (bytes out &gt; 0) with verdict "
            "violation or unknown. Click a header to sort.</p>\n"
            '<div class="scroll"><table id="findings-table" class="sortable"><thead><tr>' + head
            + "</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table></div>"
            + empty + "</section>\n")


def _timeline_section(result: AuditResult) -> str:
    flows = [f for f in result.flows if f.bytes_out > 0]
    title = '<section id="timeline"><h2>Outbound bytes over the capture, by verdict</h2>\n'
    if not flows:
        return title + "<p>No outbound bytes.</p></section>\n"
    t0 = min(f.first_seen_ns for f in flows)
    t1 = max(f.last_seen_ns for f in flows)
    span = max(t1 - t0, 1)
    n = TIMELINE_BUCKETS
    series: dict[str, list[float]] = {}
    totals: dict[str, int] = {}
    for f in flows:
        v = f.verdict.verdict.value
        buckets = series.setdefault(v, [0.0] * n)
        totals[v] = totals.get(v, 0) + f.bytes_out
        lo = min(int((f.first_seen_ns - t0) * n / span), n - 1)
        hi = min(int((f.last_seen_ns - t0) * n / span), n - 1)
        share = f.bytes_out / (hi - lo + 1)  # spread over the flow's lifetime
        for b in range(lo, hi + 1):
            buckets[b] += share
    left, width, height, top_pad = 70, 800, 220, 10
    peak = max(max(b) for b in series.values()) or 1.0
    step = width / (n - 1)
    svg = [f'<svg id="timeline-chart" role="img" '
           f'width="{left + width + 20}" height="{height + 70}" '
           'aria-label="Outbound bytes over time by verdict">',
           f'<line x1="{left}" y1="{top_pad + height}" x2="{left + width}" '
           f'y2="{top_pad + height}" stroke="#444"/>',
           f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + height}" stroke="#444"/>',
           f'<text x="{left - 4}" y="{top_pad + 10}" text-anchor="end">'
           f"{_e(_human(peak))}</text>",
           f'<text x="{left - 4}" y="{top_pad + height}" text-anchor="end">0</text>',
           f'<text x="{left}" y="{top_pad + height + 16}">{_e(rfc3339(t0))}</text>',
           f'<text x="{left + width}" y="{top_pad + height + 16}" text-anchor="end">'
           f"{_e(rfc3339(t1))}</text>"]
    legend_x = left
    for v in VERDICT_ORDER:
        if v not in series:
            continue
        points = " ".join(
            f"{left + i * step:.1f},{top_pad + height - height * b / peak:.1f}"
            for i, b in enumerate(series[v]))
        color = VERDICT_COLORS.get(v, "#000")
        svg.append(f'<polyline class="series" data-verdict="{_e(v)}" data-bytes="{totals[v]}" '
                   f'fill="none" stroke="{color}" stroke-width="2" points="{points}">'
                   f"<title>{_e(v)}: {totals[v]} bytes</title></polyline>")
        svg.append(f'<rect x="{legend_x}" y="{top_pad + height + 30}" width="12" height="12" '
                   f'fill="{color}"/><text x="{legend_x + 16}" y="{top_pad + height + 40}">'
                   f"{_e(v)} ({totals[v]} B)</text>")
        legend_x += 150
    svg.append("</svg>")
    bucket_s = span / n / 1e9
    return (title + "".join(svg)
            + f"<p>{n} intervals of {bucket_s:.3g} s; a flow's bytes are spread evenly "
            "over its lifetime.</p></section>\n")


def _evidence_section(result: AuditResult, command: Sequence[str], policy_text: str,
                      now: datetime) -> str:
    caps = []
    for i, c in enumerate(result.captures):
        status = "damaged: " + (c.damage or "") if c.truncated else "complete"
        caps.append(
            f'<tr data-index="{i}"><td>{_e(c.path)}</td><td>{_e(c.format)}</td>'
            f'<td class="num">{c.bytes}</td><td class="mono">{_e(c.sha256)}</td>'
            f"<td>{_e(rfc3339(c.first_ns) if c.first_ns is not None else '-')}</td>"
            f"<td>{_e(rfc3339(c.last_ns) if c.last_ns is not None else '-')}</td>"
            f'<td class="num">{c.packets}</td><td>{_e(status)}</td></tr>')
    geo = []
    for g in geoip_evidence(result):
        warn = f'<span class="warn">{_e(g.warning)}</span>' if g.warning else ""
        age = "" if g.age_days is None else f" ({g.age_days} days before the capture)"
        geo.append(
            f"<tr><td>{_e(g.source.source)}</td><td>{_e(g.source.path or '(embedded)')}</td>"
            f"<td>{_e(g.source.database_type)}</td>"
            f"<td>{_e((g.built or 'unknown') + age)}</td><td>{warn}</td></tr>")
    return (
        '<section id="evidence"><h2>Evidence</h2>\n'
        "<h3>Captures</h3>\n"
        '<table id="captures"><thead><tr><th>path</th><th>format</th>'
        '<th class="num">bytes</th><th>SHA-256</th><th>first packet</th><th>last packet</th>'
        '<th class="num">packets</th><th>status</th></tr></thead><tbody>'
        + "".join(caps) + "</tbody></table>\n"
        "<h3>GeoIP data</h3>\n"
        '<table id="geoip"><thead><tr><th>source</th><th>path</th><th>type</th>'
        "<th>built</th><th>warning</th></tr></thead><tbody>" + "".join(geo)
        + "</tbody></table>\n"
        "<h3>Policy</h3>\n"
        f'<p>{_e(result.policy_path)}, SHA-256 <code id="policy-sha256">'
        f"{_e(result.policy_sha256)}</code></p>\n"
        f'<pre id="policy-text">{_e(policy_text)}</pre>\n'
        "<h3>Run</h3>\n"
        f'<p>egressd version <code id="version">{_e(__version__)}</code>, report generated '
        f"{_e(now.strftime('%Y-%m-%dT%H:%M:%SZ'))}.</p>\n"
        f'<p>Command line:</p><pre id="command">{_e(command_text(command))}</pre>\n'
        "</section>\n")
