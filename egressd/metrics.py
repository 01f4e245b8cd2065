"""Prometheus metrics of the live daemon, on a registry the caller passes in.

Names follow Prometheus conventions (``_total`` counters, base units, no
unit-less gauges of timestamps) and label sets stay bounded: countries
(~250 plus ``unknown``), routes and zones from the policy, verdicts, interfaces,
sinks and decode reasons — never addresses or ports.  Dashboards and alert
rules depend on these names: they are a contract.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from egressd import __version__

NO_LABEL = ""
"""Label value for "none" (a flow without route, zone or country)."""


class Metrics:
    """Every collector of the daemon, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
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
        self.names = Counter("egressd_server_names",
                             "Server names given to flows, by source (sni, quic, dns)",
                             ["source"], registry=r)
        self.dns_responses = Counter("egressd_dns_responses",
                                     "DNS responses read for the passive DNS map", registry=r)
        self.dns_entries = Gauge("egressd_dns_map_entries",
                                 "(client, address) pairs in the passive DNS map", registry=r)
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
