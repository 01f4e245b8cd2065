"""Prometheus metrics of the live daemon, on a registry the caller passes in.

Names follow Prometheus conventions (``_total`` counters, base units, no
unit-less gauges of timestamps) and label sets stay bounded: countries
(~250 plus ``unknown``), routes and zones from the policy, verdicts, interfaces,
sinks and decode reasons — never addresses or ports.  Dashboards and alert
rules depend on these names: they are a contract.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.metrics_core import Metric

from egressd import __version__

NO_LABEL = ""
"""Label value for "none" (a flow without route, zone or country)."""


class Metrics:
    """Every collector of the daemon, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, pipeline: bool = True) -> None:
        """``pipeline=False``: the capture's metrics are left out (the processes that
        capture report them, see :class:`WorkerMetrics`); they are then kept on a
        private registry that nothing serves."""
        self.registry = registry
        self.pipeline = pipeline
        r = registry if pipeline else CollectorRegistry()
        self.packets = Counter("egressd_packets", "Packets captured, per interface",
                               ["interface"], registry=r)
        self.ip_bytes = Counter("egressd_ip_bytes", "IP-layer bytes of captured packets",
                                ["interface"], registry=r)
        self.kernel_packets = Counter(
            "egressd_kernel_packets", "Packets the kernel passed to the capture socket "
            "(PACKET_STATISTICS)", ["interface"], registry=r)
        self.kernel_drops = Counter(
            "egressd_kernel_drops", "Packets the kernel dropped because the capture socket "
            "was full (PACKET_STATISTICS)", ["interface"], registry=r)
        self.decode_errors = Counter("egressd_decode_errors",
                                     "Packets that are in no flow, by reason", ["reason"],
                                     registry=r)
        self.flows = Counter("egressd_flows", "Flows decided, by verdict, country and route",
                             ["verdict", "country", "route"], registry=r)
        self.bytes_out = Counter(
            "egressd_bytes_out", "IP bytes sent from internal hosts to remote ones, by the "
            "flow's verdict, remote country and route", ["verdict", "country", "route"],
            registry=r)
        self.violations = Counter("egressd_violations",
                                  "Flows that exported data without an approved route",
                                  ["country", "zone", "reason"], registry=r)
        self.active_flows = Gauge("egressd_active_flows", "Flows in the flow table",
                                  registry=r)
        self.evictions = Counter("egressd_flow_table_evictions",
                                 "Flows ended early because the flow table was full",
                                 registry=r)
        self.names = Counter("egressd_server_names",
                             "Server names given to flows, by source (sni, quic, dns)",
                             ["source"], registry=r)
        self.dns_responses = Counter("egressd_dns_responses",
                                     "DNS responses read for the passive DNS map", registry=r)
        self.dns_entries = Gauge("egressd_dns_map_entries",
                                 "(client, address) pairs in the passive DNS map", registry=r)
        r = registry
        self.alerts_sent = Counter("egressd_alerts_sent", "Alerts delivered, per sink",
                                   ["sink"], registry=r)
        self.alerts_failed = Counter("egressd_alerts_failed",
                                     "Failed delivery attempts, per sink", ["sink"], registry=r)
        self.alerts_spooled = Gauge("egressd_alerts_spooled",
                                    "Alerts waiting in the on-disk spool, per sink", ["sink"],
                                    registry=r)
        self.alerts_dropped = Counter("egressd_alerts_dropped",
                                      "Alerts dropped because the spool was full, per sink",
                                      ["sink"], registry=r)
        self.alerts_suppressed = Counter(
            "egressd_alerts_suppressed", "Flows folded into an earlier alert of the same "
            "group within the suppression window", registry=r)
        self.geoip_build = Gauge("egressd_geoip_database_build_timestamp_seconds",
                                 "Build time of each GeoIP database in use",
                                 ["database", "type"], registry=r)
        self.route_expiry = Gauge("egressd_route_approval_expiry_timestamp_seconds",
                                  "When each route's approval expires", ["route", "approval"],
                                  registry=r)
        self.reload_success = Gauge("egressd_config_last_reload_successful",
                                    "1 if the last configuration (re)load succeeded", registry=r)
        self.reload_time = Gauge("egressd_config_last_reload_success_timestamp_seconds",
                                 "Time of the last successful configuration (re)load",
                                 registry=r)
        self.build_info = Info("egressd_build", "egressd version", registry=r)
        self.build_info.info({"version": __version__})

    def unregister_pipeline(self) -> None:
        """Stop serving the capture's metrics here (other processes report them)."""
        if self.pipeline:
            for collector in _pipeline_collectors(self):
                self.registry.unregister(collector)
            self.pipeline = False


def _pipeline_collectors(m: Metrics) -> list[Any]:
    return [m.packets, m.ip_bytes, m.kernel_packets, m.kernel_drops, m.decode_errors, m.flows,
            m.bytes_out, m.violations, m.active_flows, m.evictions, m.names, m.dns_responses,
            m.dns_entries]


PIPELINE_METRICS = frozenset({
    "egressd_packets", "egressd_ip_bytes", "egressd_kernel_packets", "egressd_kernel_drops",
    "egressd_decode_errors", "egressd_flows", "egressd_bytes_out", "egressd_violations",
    "egressd_active_flows", "egressd_flow_table_evictions", "egressd_server_names",
    "egressd_dns_responses", "egressd_dns_map_entries",
})
"""The metrics of the capture pipeline: what each capture process reports."""

Snapshot = list[tuple[str, str, tuple[tuple[str, str], ...], float]]
"""(family, sample name, labels, value) of a process's pipeline metrics."""


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The current values of the pipeline metrics on ``registry`` (counters and gauges)."""
    out: Snapshot = []
    for family in registry.collect():
        if family.name not in PIPELINE_METRICS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.append((family.name, sample.name, tuple(sorted(sample.labels.items())),
                        sample.value))
    return out


class WorkerMetrics:
    """A collector that serves the sum of the pipeline metrics of several processes.

    Each capture process sends its :func:`snapshot` now and then
    (:meth:`update`); a scrape sees, per series, the sum of the latest values
    of every process — counters add up, and so do the gauges (flows in each
    table, entries in each DNS map).  Help texts and types are those of
    :class:`Metrics`.
    """

    def __init__(self) -> None:
        template = CollectorRegistry()
        Metrics(template)
        self._families = {f.name: (f.documentation, f.type) for f in template.collect()
                          if f.name in PIPELINE_METRICS}
        self._latest: dict[int, Snapshot] = {}

    def update(self, worker: int, values: Snapshot) -> None:
        self._latest[worker] = values

    def collect(self) -> Iterator[Metric]:
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {
            name: {} for name in self._families}
        for values in list(self._latest.values()):
            for family, sample, labels, value in values:
                series = sums.setdefault(family, {})
                series[(sample, labels)] = series.get((sample, labels), 0.0) + value
        for name, (doc, kind) in self._families.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in sorted(sums.get(name, {}).items()):
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def describe(self) -> list[Any]:
        return []
