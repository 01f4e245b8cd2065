"""The audit as OpenMetrics text, for backfilling Prometheus with a capture's history.

``egressd audit --format openmetrics`` writes the daemon's counters, with the
same names and labels (see ``docs/daemon.md``), as they would have grown while
the capture was taken: cumulative counters sampled every ``step`` seconds of
capture time, stamped with the capture's own timestamps, plus one sample at
the capture's last packet (where every counter holds the audit's totals).
``promtool tsdb create-blocks-from openmetrics FILE DIR`` turns the file into
TSDB blocks, so dashboards and queries written for the live daemon work on an
audit too.

How the flows' counts are placed in time (the audit keeps no per-packet
history):

* ``egressd_flows_total`` and ``egressd_violations_total`` count a flow at its
  ``first_seen``, as the daemon does when it decides a new flow;
* ``egressd_bytes_out_total`` and ``egressd_ip_bytes_total`` add a flow's
  bytes at its ``last_seen`` (a flow's bytes are all there once it ended);
* ``egressd_packets_total`` adds a flow's packets at its ``last_seen``; packets
  in no flow, and ``egressd_decode_errors_total``, are added at the end of
  their capture file;
* ``egressd_active_flows`` is the number of flows between their
  ``first_seen`` and ``last_seen`` at each sample time;
* ``egressd_geoip_database_build_timestamp_seconds`` is constant.

The interface label is ``audit``.  An empty label value means "none", as in
the daemon: no country (unknown), no route, no zone.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from typing import IO

from egressd.report import AuditResult

AUDIT_INTERFACE = "audit"
DEFAULT_STEP_SECONDS = 60
_NS = 1_000_000_000

LabelSet = tuple[tuple[str, str], ...]


def _ts(ns: int) -> str:
    """OpenMetrics timestamp (seconds, millisecond resolution, rounded down)."""
    ms = ns // 1_000_000
    return f"{ms // 1000}.{ms % 1000:03d}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: LabelSet) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def sample_times(first_ns: int, last_ns: int, step_seconds: int) -> list[int]:
    """Sample times: ``first_ns``, every multiple of the step after it, and ``last_ns``."""
    step = step_seconds * _NS
    times = {first_ns, last_ns}
    t = (first_ns // step + 1) * step
    while t < last_ns:
        times.add(t)
        t += step
    return sorted(times)


class _Family:
    """One metric family: its series, each a list of (time, delta) events."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.events: dict[LabelSet, list[tuple[int, float]]] = defaultdict(list)

    def add(self, labels: LabelSet, ns: int, delta: float) -> None:
        self.events[labels].append((ns, delta))

    def write(self, out: IO[str], times: list[int]) -> None:
        out.write(f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n")
        sample = f"{self.name}_total" if self.kind == "counter" else self.name
        for labels in sorted(self.events):
            events = sorted(self.events[labels])
            lbl = _labels(labels)
            total = 0.0
            i = 0
            for t in times:
                while i < len(events) and events[i][0] <= t:
                    total += events[i][1]
                    i += 1
                out.write(f"{sample}{lbl} {_num(total)} {_ts(t)}\n")


def _active(flows: Iterable[tuple[int, int]], times: list[int]) -> list[int]:
    """Number of (first, last) intervals that contain each time."""
    counts = [0] * (len(times) + 1)
    for first, last in flows:
        lo = bisect.bisect_left(times, first)
        hi = bisect.bisect_right(times, last)
        if lo < hi:
            counts[lo] += 1
            counts[hi] -= 1
    out, running = [], 0
    for c in counts[:-1]:
        running += c
        out.append(running)
    return out


def write_openmetrics(result: AuditResult, out: IO[str], *,
                      step_seconds: int = DEFAULT_STEP_SECONDS) -> None:
    """Write the audit's counters as OpenMetrics text with capture timestamps, ending ``# EOF``."""
    if step_seconds <= 0:
        raise ValueError("step_seconds must be positive")
    iface = (("interface", AUDIT_INTERFACE),)
    packets = _Family("egressd_packets", "counter", "Packets captured, per interface")
    ip_bytes = _Family("egressd_ip_bytes", "counter",
                       "IP-layer bytes of the flows' packets, per interface")
    decode = _Family("egressd_decode_errors", "counter", "Packets that are in no flow, by reason")
    flows = _Family("egressd_flows", "counter", "Flows decided, by verdict, country and route")
    bytes_out = _Family("egressd_bytes_out", "counter",
                        "IP bytes sent from internal hosts to remote ones, by the flow's "
                        "verdict, remote country and route")
    violations = _Family("egressd_violations", "counter",
                         "Flows that exported data without an approved route")
    active = _Family("egressd_active_flows", "gauge", "Flows in the flow table")
    geoip = _Family("egressd_geoip_database_build_timestamp_seconds", "gauge",
                    "Build time of each GeoIP database in use")

    starts = [c.first_ns for c in result.captures if c.first_ns is not None]
    ends = [c.last_ns for c in result.captures if c.last_ns is not None]
    starts += [f.first_seen_ns for f in result.flows]
    ends += [f.last_seen_ns for f in result.flows]
    families = [packets, ip_bytes, decode, flows, bytes_out, violations, active, geoip]
    if not starts:
        for fam in families:
            fam.write(out, [])
        out.write("# EOF\n")
        return
    first_ns, last_ns = min(starts), max(ends)
    times = sample_times(first_ns, last_ns, step_seconds)

    flow_packets = 0
    for f in result.flows:
        v = f.verdict
        country, route = f.geo.country or "", v.route or ""
        key = (("country", country), ("route", route), ("verdict", v.verdict.value))
        flows.add(key, f.first_seen_ns, 1)
        bytes_out.add(key, f.last_seen_ns, f.bytes_out)
        if v.verdict.value == "violation":
            reason = v.reason.value if v.reason is not None else ""
            violations.add((("country", country), ("reason", reason), ("zone", f.zone or "")),
                           f.first_seen_ns, 1)
        n = f.packets_in + f.packets_out
        flow_packets += n
        packets.add(iface, f.last_seen_ns, n)
        ip_bytes.add(iface, f.last_seen_ns, f.bytes_in + f.bytes_out)
    captured = 0
    for c in result.captures:
        captured += c.packets
        end = c.last_ns if c.last_ns is not None else last_ns
        for reason, count in sorted(c.decode_errors.items()):
            decode.add((("reason", reason),), end, count)
    # Packets in no flow (decode errors, non-IP) come in at the end of the capture.
    if captured > flow_packets:
        packets.add(iface, last_ns, captured - flow_packets)
    packets.events.setdefault(iface, [])
    ip_bytes.events.setdefault(iface, [])
    previous = 0
    counts = _active(((f.first_seen_ns, f.last_seen_ns) for f in result.flows), times)
    for t, n in zip(times, counts, strict=True):
        active.add((), t, n - previous)
        previous = n
    for src in result.geoip:
        if src.build_epoch is not None:
            geoip.add((("database", src.path or src.source), ("type", src.database_type)),
                      first_ns, src.build_epoch)

    for fam in families:
        fam.write(out, times)
    out.write("# EOF\n")
