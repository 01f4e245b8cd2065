"""The audit as a terminal report: verdicts, where the bytes went, what broke the rules.

For people at a terminal; scripts read the JSON report instead.  Long lists
are cut to the largest entries with a line saying how many more there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from rich.console import Console
from rich.table import Table

from egressd import __version__
from egressd.model import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    FlowRecord,
    Initiator,
    VerdictKind,
    proto_name,
)
from egressd.report import AuditResult, rfc3339
from egressd.report_html import command_text, geoip_evidence

MAX_ROWS = 50


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _endpoint(ip: str, port: int | None) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def write_text(result: AuditResult, out: IO[str], *, color: bool = False,
               width: int | None = None, command: Sequence[str] | None = None) -> None:
    """Render ``result`` as tables on ``out``, then the evidence block.

    ``command`` is the command line that ran the audit, for the evidence block.
    """
    # On a terminal, fit its width; into a file or pipe, never cut a cell.
    con = Console(file=out, force_terminal=color, no_color=not color, width=width or 400,
                  highlight=False, soft_wrap=True)
    summary = result.summary()

    caps = Table(title="Captures", title_justify="left")
    for col in ("file", "format", "packets", "first", "last", "sha256", "status"):
        caps.add_column(col, justify="right" if col == "packets" else "left")
    for c in result.captures:
        status = "TRUNCATED" if c.truncated else "ok"
        if c.decode_errors:
            status += f", {sum(c.decode_errors.values())} undecoded"
        caps.add_row(c.path, c.format, str(c.packets),
                     rfc3339(c.first_ns) if c.first_ns is not None else "-",
                     rfc3339(c.last_ns) if c.last_ns is not None else "-",
                     c.sha256[:16] + "…", status)
    con.print(caps)
    for c in result.captures:
        if c.damage:
            con.print(f"  {c.path}: {c.damage}")
        if c.decode_errors:
            errs = ", ".join(f"{k} {v}" for k, v in sorted(c.decode_errors.items()))
            con.print(f"  {c.path}: not in any flow: {errs}")
    geo = "; ".join(f"{g.source} {g.database_type}" + (f" ({g.path})" if g.path else "")
                    for g in result.geoip)
    con.print(f"Policy: {result.policy_path} (sha256 {result.policy_sha256[:16]}…)")
    con.print(f"GeoIP: {geo}")
    con.print()

    verdicts = Table(title="Verdicts", title_justify="left")
    verdicts.add_column("verdict")
    verdicts.add_column("flows", justify="right")
    verdicts.add_column("bytes out", justify="right")
    for v, count in summary["verdicts"].items():
        verdicts.add_row(v, str(count), _human(summary["bytes_out_by_verdict"][v]))
    con.print(verdicts)

    countries = Table(title="Bytes out by country", title_justify="left")
    countries.add_column("country")
    countries.add_column("bytes out", justify="right")
    by_country = sorted(summary["bytes_out_by_country"].items(), key=lambda kv: (-kv[1], kv[0]))
    for country, nbytes in by_country[:MAX_ROWS]:
        countries.add_row(country, _human(nbytes))
    con.print(countries)
    if len(by_country) > MAX_ROWS:
        con.print(f"  … {len(by_country) - MAX_ROWS} more countries")

    findings = [f for f in result.flows if f.bytes_out > 0
                and f.verdict.verdict in (VerdictKind.VIOLATION, VerdictKind.UNKNOWN)]
    findings.sort(key=lambda f: (-f.bytes_out, f.first_seen_ns, f.community_id))
    table = Table(title=f"Violations and unknown-country exports ({len(findings)})",
                  title_justify="left")
    for col in ("verdict", "reason", "route", "zone", "internal", "remote", "name", "country",
                "proto", "bytes out", "first seen"):
        table.add_column(col, justify="right" if col == "bytes out" else "left")
    for f in findings[:MAX_ROWS]:
        table.add_row(*_finding_row(f))
    con.print(table)
    if len(findings) > MAX_ROWS:
        con.print(f"  … {len(findings) - MAX_ROWS} more; use --format json for all flows")
    for w in result.warnings:
        con.print(f"warning: {w}")
    _evidence(con, result, command)


def _evidence(con: Console, result: AuditResult, command: Sequence[str] | None) -> None:
    """What the audit ran on, precisely enough to re-run and check it."""
    con.print()
    con.print("Evidence", markup=False)
    con.print(f"  policy {result.policy_path}: sha256 {result.policy_sha256}", markup=False)
    for c in result.captures:
        span = (f"{rfc3339(c.first_ns)} .. {rfc3339(c.last_ns)}"
                if c.first_ns is not None and c.last_ns is not None else "no packets")
        con.print(f"  capture {c.path}: {c.bytes} bytes, sha256 {c.sha256}, {span}, "
                  f"{c.packets} packets" + (", TRUNCATED" if c.truncated else ""), markup=False)
    for g in geoip_evidence(result):
        line = (f"  geoip {g.source.source} {g.source.database_type}"
                + (f" ({g.source.path})" if g.source.path else "")
                + f": built {g.built or 'unknown'}")
        if g.age_days is not None:
            line += f", {g.age_days} days before the capture"
        con.print(line, markup=False)
        if g.warning:
            con.print(f"  WARNING: geoip {g.source.path or g.source.source}: {g.warning}",
                      markup=False)
    con.print(f"  egressd {__version__}", markup=False)
    if command:
        con.print(f"  command: {command_text(command)}", markup=False)


def _finding_row(f: FlowRecord) -> list[str]:
    v = f.verdict
    if f.proto in (PROTO_ICMP, PROTO_ICMPV6):  # type/code are no service port
        return [v.verdict.value, v.reason.value if v.reason else "-", v.route or "-",
                f.zone or "-", f.src_ip if f.initiator is Initiator.INTERNAL else f.dst_ip,
                f.remote_ip or "-", _name(f), f.geo.country or "??", str(proto_name(f.proto)),
                _human(f.bytes_out), rfc3339(f.first_seen_ns)]
    if f.initiator is Initiator.REMOTE:
        internal, remote = _endpoint(f.dst_ip, f.dst_port), _endpoint(f.src_ip, None)
    else:
        internal, remote = f.src_ip, _endpoint(f.dst_ip, f.dst_port)
    return [v.verdict.value, v.reason.value if v.reason else "-", v.route or "-", f.zone or "-",
            internal, remote, _name(f), f.geo.country or "??", str(proto_name(f.proto)),
            _human(f.bytes_out), rfc3339(f.first_seen_ns)]


def _name(f: FlowRecord) -> str:
    """The remote's name and where it was read: ``api.vendor.example (sni)``."""
    if f.server_name is None or f.name_source is None:
        return "-"
    return f"{f.server_name} ({f.name_source.value})"
