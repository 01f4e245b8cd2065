"""The alerter: from decided flows to alerts in every configured sink.

The capture loop calls :meth:`Alerter.observe` once per decided flow.  The
call must stay cheap and never wait for the network:

1. flows that do not alert (see :func:`~egressd.alerts.dedup.should_alert`)
   return at once;
2. the :class:`~egressd.alerts.dedup.Deduplicator` decides: a new alert, a
   refresh for stateful sinks, or a suppressed flow (counted in
   ``egressd_alerts_suppressed_total``);
3. a new alert is written inline to the local sinks (JSON lines file, syslog
   datagram: both cheap, neither waits for a peer) and queued in the spool of
   every network sink (Alertmanager); a refresh only goes to the spools of
   sinks that want refreshes.  Spools deliver from their own threads.  With
   ``batch_lines`` the local sinks get the alerts of a capture batch together
   at :meth:`flush_lines` (one write for many alerts under a flood).

A failing sink never makes :meth:`observe` raise: local failures are counted
(``egressd_alerts_failed_total``) and logged at most once a minute per sink.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from egressd.config import AlertsConfig
from egressd.metrics import Metrics
from egressd.model import Alert, FlowRecord

from .alertmanager import DEFAULT_TIMEOUT, AlertmanagerSink
from .dedup import DEFAULT_MAX_GROUPS, Action, Deduplicator, should_alert
from .sinks import JsonlSink, LogThrottle, Sink, SinkCounters, SyslogSink
from .spool import Spool, SpoolOptions

log = logging.getLogger("egressd.alerts")

DEFAULT_SYSLOG_ADDRESS = "/dev/log"


def build_sinks(
    config: AlertsConfig,
    *,
    resend_ns: int,
    clock: Callable[[], int] = time.time_ns,
    syslog_address: str = DEFAULT_SYSLOG_ADDRESS,
    http_timeout: float = DEFAULT_TIMEOUT,
) -> list[Sink]:
    """The sinks ``config`` turns on, in the order JSON lines, syslog, Alertmanager."""
    sinks: list[Sink] = []
    if config.jsonl is not None:
        sinks.append(JsonlSink(config.jsonl))
    if config.syslog:
        sinks.append(SyslogSink(syslog_address))
    if config.alertmanager is not None:
        sinks.append(AlertmanagerSink(config.alertmanager, timeout=http_timeout,
                                      resend_ns=resend_ns, clock=clock))
    return sinks


class Alerter:
    """Turns decided flows into alerts and hands them to the sinks.

    ``observe`` is called from one thread (the capture loop); ``flush`` and
    ``close`` may be called from another.  Spooled sinks deliver on threads of
    their own.  ``sinks`` replaces the sinks built from ``config`` (tests, other
    integrations); a sink with a true ``spooled`` attribute gets its alerts
    through a spool in ``config.spool_dir/<sink name>``.
    """

    def __init__(
        self,
        config: AlertsConfig,
        *,
        sensor: str,
        metrics: Metrics | None = None,
        clock: Callable[[], int] = time.time_ns,
        sinks: list[Sink] | None = None,
        spool_options: SpoolOptions | None = None,
        resend_seconds: float | None = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
        syslog_address: str = DEFAULT_SYSLOG_ADDRESS,
        http_timeout: float = DEFAULT_TIMEOUT,
        batch_lines: bool = False,
    ) -> None:
        self.config = config
        self.batch_lines = batch_lines
        self._pending: list[Alert] = []
        self.sensor = sensor
        self.metrics = metrics
        self.clock = clock
        resend_ns = None if resend_seconds is None else round(resend_seconds * 1e9)
        self.dedup = Deduplicator(round(config.suppress_seconds * 1e9), resend_ns=resend_ns,
                                  max_groups=max_groups)
        if sinks is None:
            sinks = build_sinks(config, resend_ns=self.dedup.resend_ns, clock=clock,
                                syslog_address=syslog_address, http_timeout=http_timeout)
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique: {names}")
        self._line: list[tuple[Sink, SinkCounters]] = []
        self.spools: dict[str, Spool] = {}
        self._refresh: list[Spool] = []
        for sink in self.sinks:
            if getattr(sink, "spooled", False):
                spool = Spool(os.path.join(config.spool_dir, sink.name), sink,
                              max_bytes=config.spool_max_bytes, metrics=metrics,
                              options=spool_options)
                self.spools[sink.name] = spool
                if getattr(sink, "refresh", False):
                    self._refresh.append(spool)
            else:
                self._line.append((sink, SinkCounters(metrics, sink.name)))
        self._throttle = LogThrottle(log)
        self._lock = threading.Lock()
        self._closed = False

    # -- the capture loop's side --------------------------------------------

    def observe(self, record: FlowRecord, *, interface: str | None, now_ns: int) -> Alert | None:
        """Consider one decided flow; the alert raised for it, or None.

        None: the flow does not alert, or it was folded into an earlier alert
        of its group (and perhaps passed on as a refresh).  Never raises for a
        sink's failure and never waits for the network.
        """
        if not self.sinks or not should_alert(record,
                                              alert_on_unknown=self.config.alert_on_unknown):
            return None  # no sink configured: nothing to group, count or send
        with self._lock:
            if self._closed:
                return None
            try:
                return self._observe(record, interface, now_ns)
            except Exception:  # a bug must not stop the capture loop
                if self._throttle.warning("observe", "alerting failed for a flow"):
                    log.debug("alerting failure", exc_info=True)
                return None

    def _observe(self, record: FlowRecord, interface: str | None, now_ns: int) -> Alert | None:
        outcome = self.dedup.observe(record, sensor=self.sensor, interface=interface,
                                     now_ns=now_ns)
        alert = outcome.alert
        if outcome.action is not Action.ALERT:
            if self.metrics is not None:
                self.metrics.alerts_suppressed.inc()
            if outcome.action is Action.REFRESH and alert is not None:
                for spool in self._refresh:
                    spool.append(alert)
            return None
        assert alert is not None
        if self.batch_lines:
            self._pending.append(alert)
        else:
            self._deliver_lines((alert,))
        for spool in self.spools.values():
            spool.append(alert)
        return alert

    def _deliver_lines(self, batch: tuple[Alert, ...] | list[Alert]) -> None:
        for sink, counters in self._line:
            try:
                sink.deliver(batch)
            except Exception as exc:
                counters.failed(len(batch))
                self._throttle.warning(f"sink:{sink.name}", "%s: alert not delivered: %s",
                                       sink.name, exc)
            else:
                counters.sent(len(batch))

    def flush_lines(self) -> None:
        """Hand the alerts raised since the last call to the local sinks (``batch_lines``)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
            if pending:
                self._deliver_lines(pending)

    # -- shutdown -------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until every spool is delivered; False when ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        self.flush_lines()
        ok = True
        for spool in self.spools.values():
            ok = spool.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def close(self, timeout: float = 5.0) -> bool:
        """Stop alerting: write out the spools, stop their threads, close the sinks.

        Alerts not yet delivered stay in the spool for the next start (call
        :meth:`flush` first to give them a chance to go out now).  True when
        every thread stopped within ``timeout`` seconds.  Idempotent.
        """
        deadline = time.monotonic() + timeout
        self.flush_lines()
        with self._lock:
            if self._closed:
                return True
            self._closed = True
        ok = True
        for spool in self.spools.values():
            ok = spool.close(max(0.0, deadline - time.monotonic())) and ok
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("%s: error while closing: %s", sink.name, exc)
        return ok

    def __enter__(self) -> Alerter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
