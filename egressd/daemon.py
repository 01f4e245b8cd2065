"""``egressd run``: the live daemon on a gateway.

The same stages as the audit — decode, flows, classify — fed by a live
capture instead of a file, with the wall clock instead of packet timestamps
for timers.  Around them:

* a flow's verdict is decided when the flow appears, so an alert goes out at
  once — except that a new TCP flow waits for its first data (up to
  ``names.hold_seconds``): when that is a TLS ClientHello, its alert carries
  the server name and routes that list names can approve it; bytes keep
  being counted into the metrics while the flow lasts, and a long flow is
  judged again every ``active_timeout`` (a route may expire, or a reload may
  change the policy, while a week-long upload runs);
* SIGHUP reloads the config, policy and GeoIP databases all-or-nothing: a
  bad new config is logged and the old one keeps running; a GeoIP file
  replaced on disk (geoipupdate) is picked up without a signal;
* SIGTERM (and SIGINT) stops the capture, accounts every open flow, writes
  out the alert spool and exits 0;
* systemd ``Type=notify``: READY once sockets, GeoIP and policy are loaded,
  WATCHDOG pings from the capture loop, STATUS with counts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from egressd.alerts import Alerter
from egressd.classify import Classifier
from egressd.config import Config, load_config
from egressd.decode.batch import decode_batch
from egressd.flows import Flow, FlowTable, FlowTimeouts
from egressd.geo import CachedResolver, open_resolver
from egressd.metrics import NO_LABEL, Metrics
from egressd.metrics_http import MetricsServer, serve_metrics
from egressd.model import PROTO_TCP, FlowRecord, Initiator, NameSource, RecordBatch, VerdictKind
from egressd.names.tracker import NameTracker
from egressd.notify import Notifier
from egressd.policy import Policy
from egressd.privileges import drop_privileges
from egressd.sources.live import LiveSource

if TYPE_CHECKING:
    from egressd.workers import DnsFeed, WorkerLink

log = logging.getLogger("egressd")

TICK_SECONDS = 1.0
"""How often timers run: flow expiry, byte accounting, kernel counters, STATUS."""
GEOIP_CHECK_SECONDS = 2.0
"""How often the GeoIP files are checked for a replacement on disk (a stat() each)."""
STOP_TIMEOUT_SECONDS = 20.0
"""Time given to the alert sinks to deliver what is pending at shutdown."""
_HELD = "held"
"""``Flow.verdict`` of a TCP flow that waits for its ClientHello before it is decided."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a reload replaces at once."""

    config: Config
    policy: Policy
    resolver: CachedResolver
    classifier: Classifier


class _Live:
    """What the daemon keeps per flow after deciding it."""

    __slots__ = ("alert_pending", "country", "kind", "out_dir", "reported", "route", "zone")

    def __init__(self, record: FlowRecord, out_dir: int) -> None:
        self.kind = record.verdict.verdict.value
        self.country = record.geo.country or NO_LABEL
        self.route = record.verdict.route or NO_LABEL
        self.zone = record.zone or NO_LABEL
        self.out_dir = out_dir
        self.reported = 0
        self.alert_pending = False


def _stat_id(path: str | None) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, None when there is none."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _timeouts(config: Config) -> FlowTimeouts:
    idle = config.flows.idle_timeout_seconds
    return FlowTimeouts(tcp=idle.tcp, udp=idle.udp, other=idle.other,
                        tcp_close_grace=config.flows.tcp_close_grace_seconds)


def load_runtime(path: str, *, auto_prefixes: list[Any] | None = None,
                 old: Runtime | None = None) -> Runtime:
    """Load the config and everything built from it; raises on any error, changes nothing.

    ``auto_prefixes`` are the gateway's own networks for ``internal_networks:
    auto``.  ``old`` lets an unchanged GeoIP configuration keep its open
    databases.
    """
    config = load_config(path)
    policy = config.policy
    if policy.internal_auto:
        policy = policy.resolve_auto(auto_prefixes or [])
    geo = config.geoip
    if old is not None and old.config.geoip == geo:
        resolver = old.resolver
        resolver.clear()
    else:
        resolver = open_resolver(geo.country_db, geo.asn_db, cache_size=geo.cache_size)
    return Runtime(config, policy, resolver, Classifier(policy, resolver))


class Daemon:
    """The live daemon; :meth:`run` blocks until stopped and returns the exit status."""

    def __init__(self, config_path: str, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], int] = time.time_ns, notifier: Notifier | None = None,
                 serve_metrics: bool = True) -> None:
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.serve_metrics = serve_metrics
        self.metrics_server: MetricsServer | None = None
        self.stop_event = threading.Event()
        self._interrupt = threading.Event()
        """Set to leave the capture loop: to stop, or to reopen the capture."""
        self._reload_requested = False
        self._auto_prefixes: list[Any] | None = None
        self._auto_changed = False
        self._interface: str | None = None
        self.rt: Runtime | None = None
        self.alerter: Alerter | None = None
        self.table: FlowTable | None = None
        self._active: deque[tuple[int, Flow]] = deque()
        self._held: deque[tuple[int, Flow]] = deque()
        self.names: NameTracker | None = None
        self.link: WorkerLink | None = None
        """Set in a capture process: alerts and metrics go to the supervisor."""
        self.fanout: int | None = None
        """PACKET_FANOUT group of a capture process."""
        self._dns_feed: DnsFeed | None = None
        self._names_seen: dict[str, int] = {}
        self._geoip_error: tuple[object, ...] | None = None
        # Metric children by label values: labels() checks and locks on every
        # call, and under a flood it runs for every new flow.  Label sets are
        # bounded (countries, routes, zones, reasons), so these dicts are too.
        self._flow_counters: dict[tuple[str, str, str], Any] = {}
        self._violation_counters: dict[tuple[str, str, str], Any] = {}
        self._kernel_seen: dict[str, tuple[int, int]] = {}
        self.packets = 0
        self.alerts = 0

    # -- control from signal handlers or other threads --------------------------------

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()
        self._interrupt.set()

    def request_reload(self, *_: object) -> None:
        self._reload_requested = True

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Load, capture until stopped, shut down cleanly.  Config errors raise before start."""
        rt = self._first_load()
        self.rt = rt
        config = rt.config
        if config.capture_workers > 1:
            from egressd.workers import supervise

            return supervise(self, rt)
        web_config = config.metrics.load_web_config()
        # Open the capture sockets, then give up every capability but
        # CAP_NET_RAW before any other thread starts: capabilities are per
        # thread, and the metrics, alert and netlink threads need none.
        source = self._open_source(config)
        drop_privileges()
        if self.serve_metrics:
            self.metrics_server = serve_metrics(self.registry, config.metrics.host,
                                                config.metrics.port, web_config)
            log.info("metrics on %s", self.metrics_server.url)
        self.build_pipeline()
        watcher = self._start_watcher(config.policy)
        self._publish_static(rt)
        self.metrics.reload_success.set(1)
        self.metrics.reload_time.set(time.time())
        self.notifier.ready(self._status())
        log.info("capturing on %s", ", ".join(config.interfaces))
        try:
            while not self.stop_event.is_set():
                self._capture(source)
                if not self.stop_event.is_set():  # interrupted to reopen the capture
                    self._interrupt.clear()
                    source.close()
                    assert self.rt is not None
                    source = self._open_source(self.rt.config)
        finally:
            self.notifier.stopping()
            source.close()
            if watcher is not None:
                watcher.stop()
            self._shutdown()
        return 0

    def _first_load(self) -> Runtime:
        config = load_config(self.config_path)
        if config.policy.internal_auto:
            from egressd.netinfo import local_prefixes

            self._auto_prefixes = list(local_prefixes())
        return load_runtime(self.config_path, auto_prefixes=self._auto_prefixes)

    def _start_watcher(self, policy: Policy) -> Any:
        if not policy.internal_auto:
            return None
        from egressd.netinfo import NetlinkWatcher

        def changed(prefixes: list[Any]) -> None:
            self._auto_prefixes = list(prefixes)
            self._auto_changed = True

        watcher = NetlinkWatcher(changed)
        watcher.start()
        return watcher

    def _open_source(self, config: Config) -> LiveSource:
        return LiveSource(config.interfaces, bpf_filter=config.capture_filter,
                          promiscuous=config.promiscuous, fanout=self.fanout)

    def run_capture_process(self) -> int:
        """A capture process of several (see :mod:`egressd.workers`); needs :attr:`link`."""
        from egressd.workers import DnsFeed

        link = self.link
        assert link is not None
        self.rt = self._first_load()
        config = self.rt.config
        source = self._open_source(config)
        self._dns_feed = DnsFeed(config.interfaces)
        drop_privileges()
        self._dns_feed.start()
        # Each capture process follows the gateway's networks itself (``auto``).
        watcher = self._start_watcher(config.policy)
        self.build_pipeline(alerts=False)
        link.ready()
        try:
            while not self.stop_event.is_set():
                self._capture(source)
                if not self.stop_event.is_set():
                    self._interrupt.clear()
                    source.close()
                    source = self._open_source(self.rt.config)
        finally:
            source.close()
            if watcher is not None:
                watcher.stop()
            self._dns_feed.close()
            self._shutdown()
            link.metrics(self.registry)
            link.close()
        return 0

    def reload_supervisor(self) -> bool:
        """The supervisor's part of a reload: check the files, then take the new settings."""
        self._reload_requested = False
        old = self.rt
        assert old is not None
        self.notifier.reloading()
        try:
            new = load_runtime(self.config_path, old=old)
        except Exception as e:  # any failure keeps the running config
            log.error("reload failed, keeping the running configuration: %s", e)
            self.metrics.reload_success.set(0)
            self.notifier.ready(self._status())
            return False
        self.rt = new
        oc, nc = old.config, new.config
        if nc.alerts != oc.alerts or nc.sensor_name != oc.sensor_name:
            if self.alerter is not None:
                self.alerter.close(STOP_TIMEOUT_SECONDS)
            self.alerter = Alerter(nc.alerts, sensor=nc.sensor_name, metrics=self.metrics,
                                   clock=self.clock, batch_lines=True)
        if nc.capture_workers != oc.capture_workers or nc.interfaces != oc.interfaces:
            log.warning("capture_workers and interfaces with several processes change at the "
                        "next restart")
        self._publish_static(new)
        self.metrics.reload_success.set(1)
        self.metrics.reload_time.set(time.time())
        log.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready(self._status())
        return True

    def build_pipeline(self, *, alerts: bool = True) -> None:
        """The stages after the capture source: alerts, names, the flow table.

        Needs :attr:`rt` loaded.  Separate from :meth:`run` so that the
        per-batch path can be measured and tested without capture sockets.
        """
        rt = self.rt
        assert rt is not None
        config = rt.config
        if alerts:
            self.alerter = Alerter(config.alerts, sensor=config.sensor_name,
                                   metrics=self.metrics, clock=self.clock, batch_lines=True)
        self.names = self._name_tracker(config)
        self.table = FlowTable(_timeouts(config), on_new=self._on_new)

    def process_batch(self, iface: str, batch: RecordBatch) -> None:
        """Everything one captured batch goes through: decode, names, flows, decisions."""
        table = self.table
        assert table is not None
        m = self.metrics
        self._interface = iface
        dec = decode_batch(batch)
        n = len(batch)
        self.packets += n
        m.packets.labels(iface).inc(n)
        m.ip_bytes.labels(iface).inc(int(dec.ip_bytes.sum()))
        for reason, count in dec.error_counts().items():
            m.decode_errors.labels(reason).inc(count)
        before = dict(table.errors)
        names = self.names
        feed = self._dns_feed
        if feed is not None:
            from egressd.workers import observe_dns

            feed.drain(observe_dns(self))
        if names is not None:
            names.observe(batch, dec, dns=feed is None)
        table.process(dec)
        if names is not None:
            for flow in names.attach(table):
                self._renamed(flow)
        for reason, count in table.errors.items():
            if count != before.get(reason, 0):
                m.decode_errors.labels(reason).inc(count - before.get(reason, 0))
        self._drain(table)
        if self.alerter is not None:
            self.alerter.flush_lines()
        if self.link is not None:
            self.link.flush()

    def _capture(self, source: LiveSource) -> None:
        """Run the capture loop until stop or restart is requested."""
        last_tick = 0.0
        last_geo = time.monotonic()
        for iface, batch in source.batches(self._interrupt):
            if len(batch):
                self.process_batch(iface, batch)
            if self._held:
                self._release_held(self.clock())
            now = time.monotonic()
            self.notifier.watchdog(now)
            if now - last_tick >= TICK_SECONDS:
                last_tick = now
                self._tick(source)
            if now - last_geo >= GEOIP_CHECK_SECONDS:
                last_geo = now
                self._check_geoip()
            if self._reload_requested or self._auto_changed:
                self._reload()
            if self.alerter is not None:
                self.alerter.flush_lines()  # alerts of held flows and of the timers
            if self.link is not None:
                self.link.flush()

    # -- per flow ----------------------------------------------------------------------

    def _name_tracker(self, config: Config) -> NameTracker | None:
        names = config.names
        return (NameTracker(dns_entries=names.dns_entries, watch_payload=True)
                if names.enabled else None)

    def _on_new(self, flow: Flow) -> None:
        """Decide a new flow: metrics, and an alert when it is not approved.

        A TCP flow without a name from its ClientHello yet is held for up to
        ``names.hold_seconds`` (the ClientHello follows the handshake); every
        other flow is decided at once.
        """
        rt = self.rt
        assert rt is not None
        names = self.names
        if names is not None:
            names.on_new(flow)
            hold = rt.config.names.hold_seconds
            if hold > 0 and flow.proto == PROTO_TCP and (
                    flow.name is None or flow.name.source is not NameSource.SNI) and (
                    not names.sent_plain_data(flow)):
                flow.verdict = _HELD
                self._held.append((flow.first_ns + round(hold * 1e9), flow))
                names.watch(flow)
                return
        self._decide_new(flow)

    def _decide_new(self, flow: Flow) -> None:
        rt = self.rt
        assert rt is not None
        if flow.verdict is _HELD and self.names is not None:
            self.names.unwatch(flow)
        self._decided(flow, rt.classifier.classify(flow))
        self._active.append((flow.first_ns + rt.config.flows.active_timeout_ns, flow))

    def _renamed(self, flow: Flow) -> None:
        """A flow got its name from a ClientHello, or its client sent data that is no
        ClientHello: decide it now, or again."""
        if flow.verdict is _HELD:
            self._decide_new(flow)
        elif isinstance(flow.verdict, _Live) and self.rt is not None:
            self._decided(flow, self.rt.classifier.classify(flow))

    def _release_held(self, now_ns: int) -> None:
        """Decide the held flows whose wait is over (or that were decided meanwhile)."""
        held = self._held
        while held and (held[0][0] <= now_ns or held[0][1].verdict is not _HELD):
            _, flow = held.popleft()
            if flow.verdict is _HELD:
                self._decide_new(flow)

    def _decided(self, flow: Flow, record: FlowRecord) -> None:
        out_dir = self._out_dir(flow, record)
        previous = flow.verdict if isinstance(flow.verdict, _Live) else None
        live = _Live(record, out_dir)
        if previous is not None:
            live.reported = previous.reported
            if previous.kind == live.kind and previous.route == live.route:
                flow.verdict = live
                return
        flow.verdict = live
        key = (live.kind, live.country, live.route)
        counter = self._flow_counters.get(key)
        if counter is None:
            counter = self._flow_counters[key] = self.metrics.flows.labels(*key)
        counter.inc()
        kind = record.verdict.verdict
        if kind is VerdictKind.VIOLATION:
            reason = record.verdict.reason.value if record.verdict.reason else NO_LABEL
            vkey = (live.country, live.zone, reason)
            counter = self._violation_counters.get(vkey)
            if counter is None:
                counter = self._violation_counters[vkey] = self.metrics.violations.labels(*vkey)
            counter.inc()
        if kind in (VerdictKind.VIOLATION, VerdictKind.UNKNOWN):
            if record.bytes_out > 0:
                self._alert(record)
            else:
                # Nothing has left yet (an inbound connection attempt, a probe):
                # alert once the internal end sends something back, if ever.
                live.alert_pending = True

    def _alert(self, record: FlowRecord) -> None:
        if self.link is not None:
            self.link.alert(record, self._interface, self.clock())
            self.alerts += 1
            return
        if self.alerter is not None and self.alerter.observe(
                record, interface=self._interface, now_ns=self.clock()) is not None:
            self.alerts += 1

    @staticmethod
    def _out_dir(flow: Flow, record: FlowRecord) -> int:
        """Direction (0: a → b) whose bytes are ``bytes_out`` for this flow."""
        initiator_dir = flow.initiator  # 0: a started it, so a -> b is initiator -> responder
        if record.initiator is Initiator.REMOTE:
            return 1 - initiator_dir
        return initiator_dir

    def _account(self, flow: Flow, *, ended: bool = False) -> None:
        if flow.verdict is _HELD:
            if not ended:
                return  # counted once it is decided
            self._decide_new(flow)  # ended (or evicted) before its wait was over
        live = flow.verdict
        if not isinstance(live, _Live):
            return
        out = flow.by0 if live.out_dir == 0 else flow.by1
        delta = out - live.reported
        if delta > 0:
            live.reported = out
            self.metrics.bytes_out.labels(live.kind, live.country, live.route).inc(delta)
            if live.alert_pending and self.rt is not None:
                live.alert_pending = False
                self._alert(self.rt.classifier.classify(flow))

    def _drain(self, table: FlowTable) -> None:
        for flow in table.finished:
            self._account(flow, ended=True)
        table.finished.clear()
        limit = 0
        if self.rt is not None:
            flows = self.rt.config
            # Several capture processes share flows.max_flows.
            limit = -(-flows.flows.max_flows // flows.capture_workers)
        while limit and len(table) > limit:
            evicted = table.evict_oldest()
            if evicted is None:
                break
            self.metrics.evictions.inc()
            self._account(evicted, ended=True)
            table.finished.clear()

    # -- timers ------------------------------------------------------------------------

    def _tick(self, source: LiveSource) -> None:
        table = self.table
        rt = self.rt
        assert table is not None and rt is not None
        now_ns = self.clock()
        table.expire(now_ns)
        self._drain(table)
        for flow in table.flows_active_since(now_ns - int(2e9 * TICK_SECONDS)):
            self._account(flow)
        # Long flows: judge them again (a route may have expired meanwhile).
        period = rt.config.flows.active_timeout_ns
        if len(self._active) > 2 * len(table) + 1024:
            # Ended flows linger here until due; under a flood of short flows
            # drop them now, so memory stays proportional to live flows.
            self._active = deque(e for e in self._active if table.get(e[1].key) is e[1])
        while self._active and self._active[0][0] <= now_ns:
            _, flow = self._active.popleft()
            if table.get(flow.key) is not flow:
                continue
            self._account(flow)
            self._decided(flow, rt.classifier.classify(flow, judged_at_ns=now_ns))
            self._active.append((now_ns + period, flow))
        self.metrics.active_flows.set(len(table))
        self._publish_names()
        if self.link is not None:
            self.link.metrics(self.registry)
        for iface, (packets, drops) in source.stats().items():
            seen = self._kernel_seen.get(iface, (0, 0))
            if packets > seen[0]:
                self.metrics.kernel_packets.labels(iface).inc(packets - seen[0])
            if drops > seen[1]:
                self.metrics.kernel_drops.labels(iface).inc(drops - seen[1])
            self._kernel_seen[iface] = (packets, drops)
        self.notifier.status(self._status())

    def _publish_names(self) -> None:
        names = self.names
        if names is None:
            return
        m = self.metrics
        for source in ("sni", "quic", "dns"):
            delta = names.stats[source] - self._names_seen.get(source, 0)
            if delta > 0:
                m.names.labels(source).inc(delta)
        delta = names.stats["dns_responses"] - self._names_seen.get("dns_responses", 0)
        if delta > 0:
            m.dns_responses.inc(delta)
        self._names_seen = dict(names.stats)
        m.dns_entries.set(len(names.dns))

    def _status(self) -> str:
        flows = len(self.table) if self.table is not None else 0
        return f"{self.packets} packets, {flows} active flows, {self.alerts} alerts"

    def _check_geoip(self) -> None:
        rt = self.rt
        assert rt is not None
        try:
            changed = rt.resolver.reload_if_changed()
        except (OSError, ValueError) as e:
            # Checked every 2 s: say it once per problem and version of the file.
            problem = (str(e), *(_stat_id(p) for p in (rt.config.geoip.country_db,
                                                       rt.config.geoip.asn_db)))
            if problem != self._geoip_error:
                self._geoip_error = problem
                log.error("GeoIP database changed on disk but cannot be loaded, keeping the "
                          "old one: %s", e)
            return
        self._geoip_error = None
        if changed:
            log.info("GeoIP database reloaded from disk")
            self.rt = Runtime(rt.config, rt.policy, rt.resolver,
                              Classifier(rt.policy, rt.resolver))
            self._publish_static(self.rt)

    def _reload(self) -> None:
        """All-or-nothing reload; on any error the running configuration stays."""
        self._reload_requested = False
        self._auto_changed = False
        old = self.rt
        assert old is not None
        self.notifier.reloading()
        try:
            new = load_runtime(self.config_path, auto_prefixes=self._auto_prefixes, old=old)
        except Exception as e:  # any failure keeps the running config
            log.error("reload failed, keeping the running configuration: %s", e)
            self.metrics.reload_success.set(0)
            self.notifier.ready(self._status())
            return
        self.rt = new
        assert self.table is not None
        self.table.set_timeouts(_timeouts(new.config))
        oc, nc = old.config, new.config
        if nc.names != oc.names:
            # The DNS answers seen so far are kept unless the map's size changes.
            if nc.names.enabled and self.names is not None and (
                    nc.names.dns_entries == oc.names.dns_entries):
                pass
            else:
                self.names = self._name_tracker(nc)
                self._names_seen = {}
            if self.names is None:
                self._release_held(2**63 - 1)
        # (A capture process of several has no sinks: the supervisor owns them.)
        if self.link is None and (nc.alerts != oc.alerts or nc.sensor_name != oc.sensor_name):
            if self.alerter is not None:
                self.alerter.close(STOP_TIMEOUT_SECONDS)
            self.alerter = Alerter(nc.alerts, sensor=nc.sensor_name, metrics=self.metrics,
                                   clock=self.clock, batch_lines=True)
        if (nc.interfaces, nc.capture_filter, nc.promiscuous) != (
                oc.interfaces, oc.capture_filter, oc.promiscuous):
            self._interrupt.set()
        if nc.metrics != oc.metrics:
            log.warning("metrics.listen changed: takes effect at the next restart")
        self._publish_static(new)
        self.metrics.reload_success.set(1)
        self.metrics.reload_time.set(time.time())
        log.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready(self._status())

    def _publish_static(self, rt: Runtime) -> None:
        m = self.metrics
        m.route_expiry.clear()
        for route in rt.policy.routes:
            if route.expires_ns is not None:
                m.route_expiry.labels(route.name, route.approval).set(route.expires_ns / 1e9)
        m.geoip_build.clear()
        for src in rt.resolver.sources():
            if src.build_epoch is not None:
                m.geoip_build.labels(src.path or src.source, src.database_type).set(
                    src.build_epoch)

    def _shutdown(self) -> None:
        table = self.table
        flushed = 0
        if table is not None:
            flushed = len(table)
            table.flush()
            self._drain(table)
            self.metrics.active_flows.set(0)
        if self.alerter is not None:
            self.alerter.flush(STOP_TIMEOUT_SECONDS / 2)
            self.alerter.close(STOP_TIMEOUT_SECONDS / 2)
        self.notifier.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        who = "" if self.link is None else f"capture process {self.link.index} "
        log.info("%sstopped after %d packets, %d alerts; %d open flows accounted", who,
                 self.packets, self.alerts, flushed)

