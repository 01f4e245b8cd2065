"""Where alerts go: the sink protocol and the two local sinks (JSON lines, syslog).

A sink takes a batch of alerts and either delivers all of them or raises:

* :class:`OSError` (``ConnectionError``, ``TimeoutError``, …) when delivery
  failed for now and may work later (socket missing, disk full, server down);
* :class:`AlertRejected` when the receiver refused the alerts for good (a
  malformed request): retrying the same alerts would fail forever.

Local sinks (:class:`JsonlSink`, :class:`SyslogSink`) are called inline by the
:class:`~egressd.alerts.alerter.Alerter`, so they must be cheap and must not
block: a file append, a non-blocking datagram.  A failed local delivery is
counted and logged, never retried.  Network sinks set ``spooled = True`` and
get their alerts through the on-disk spool (:mod:`egressd.alerts.spool`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from egressd.metrics import Metrics
from egressd.model import Alert, FlowRecord, VerdictKind
from egressd.report import flow_json, flow_line, rfc3339

from .dedup import internal_ip

log = logging.getLogger("egressd.alerts")


class Sink(Protocol):
    """Something alerts are delivered to.

    Optional class attributes the alerter looks at (absent means False):
    ``spooled`` (deliver through the durable spool, from a thread of its own)
    and ``refresh`` (also wants the periodic refreshes of still-active groups).
    """

    name: str

    def deliver(self, batch: Sequence[Alert]) -> None:
        """Deliver every alert of ``batch`` or raise (see the module text)."""
        ...

    def close(self) -> None: ...


class AlertRejected(Exception):
    """The receiver refused the alerts permanently; retrying cannot help."""


# ---------------------------------------------------------------------------
# Helpers shared by the sinks, the spool and the alerter
# ---------------------------------------------------------------------------


class LogThrottle:
    """Logs a warning per key at most once per ``interval`` seconds.

    A sink that is down fails on every alert; the log gets one line a minute
    saying so, with the number of similar messages left out since.  Keys are
    few and fixed (one per sink and kind of failure).  Thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger = log,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged recently; True when logged."""
        with self._lock:
            now = self.clock()
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        if skipped:
            message += " (%d similar messages suppressed)"
            args = (*args, skipped)
        self.logger.warning(message, *args)
        return True


class SinkCounters:
    """The per-sink alert metrics (all no-ops without a :class:`Metrics`)."""

    def __init__(self, metrics: Metrics | None, sink: str) -> None:
        self.sink = sink
        self._metrics = metrics
        if metrics is not None:
            self._sent = metrics.alerts_sent.labels(sink=sink)
            self._failed = metrics.alerts_failed.labels(sink=sink)
            self._dropped = metrics.alerts_dropped.labels(sink=sink)
            self._spooled = metrics.alerts_spooled.labels(sink=sink)

    def sent(self, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._sent.inc(n)

    def failed(self, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._failed.inc(n)

    def dropped(self, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._dropped.inc(n)

    def spooled(self, waiting: int) -> None:
        if self._metrics is not None:
            self._spooled.set(waiting)


def suppressed_flows(alert: Alert) -> int:
    """Flows of the group folded into this alert (0 for a group's first alert)."""
    return max(alert.flow_count - 1, 0)


def summary(record: FlowRecord) -> str:
    """One line for humans.

    ``10.20.1.7 sent 3200 bytes to 81.2.69.142 (GB): violation no_route``, or with the
    remote's server name ``… to api.vendor.example (81.2.69.142, GB): …``
    """
    v = record.verdict
    remote = record.remote_ip if record.remote_ip is not None else record.dst_ip
    country = record.geo.country or "no country"
    where = (f"{record.server_name} ({remote}, {country})" if record.server_name
             else f"{remote} ({country})")
    text = f"{internal_ip(record)} sent {record.bytes_out} bytes to {where}: "
    text += v.verdict.value
    if v.reason is not None:
        text += f" {v.reason.value}"
    if v.route:
        text += f" (route {v.route})"
    return text


def alert_summary(alert: Alert) -> str:
    """:func:`summary` plus how many flows were folded into the alert."""
    text = summary(alert.record)
    n = suppressed_flows(alert)
    if n:
        text += f"; {n} more flow{'s' if n != 1 else ''} of this group since the last alert"
    return text


# ---------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------

ALERT_FIELDS = ("sensor", "interface", "alert_group", "suppressed_flows", "raised_at")
"""Fields an alert line has besides those of the report's flow object."""


def alert_json(alert: Alert) -> dict[str, Any]:
    """An alert as a JSON object: the report's flow fields plus :data:`ALERT_FIELDS`."""
    out = flow_json(alert.record)
    out["sensor"] = alert.sensor
    out["interface"] = alert.interface
    out["alert_group"] = alert.group
    out["suppressed_flows"] = suppressed_flows(alert)
    out["raised_at"] = rfc3339(alert.raised_ns)
    return out


@functools.lru_cache(maxsize=256)
def _js_cached(value: str | None) -> str:
    """JSON text of a value that repeats (sensor and interface names)."""
    return _js(value)


def _js(value: str | None) -> str:
    return "null" if value is None else json.dumps(value, ensure_ascii=False)


def alert_line(alert: Alert) -> str:
    """``json.dumps(alert_json(alert), ensure_ascii=False, separators=(",", ":"))``, faster."""
    return (
        f'{flow_line(alert.record)[:-1]},"sensor":{_js_cached(alert.sensor)},'
        f'"interface":{_js_cached(alert.interface)},"alert_group":{_js(alert.group)},'
        f'"suppressed_flows":{suppressed_flows(alert)},"raised_at":"{rfc3339(alert.raised_ns)}"}}'
    )


class JsonlSink:
    """Appends one JSON object per alert to a file, or writes them to stdout (``-``).

    The file is opened in append mode and created ``0640`` if missing.  Each
    batch is written with one ``write`` call and no user-space buffering, so a
    line is in the file (and visible to ``tail -f``) as soon as it is sent, and
    concurrent appenders never interleave inside a line.  Before each batch the
    file's inode is compared with the path's: when logrotate moved the file away
    (or it was deleted), a new file is opened under the path.
    """

    name = "jsonl"
    ROTATION_CHECK_SECONDS = 1.0
    """How often the path is compared with the open file (a ``stat`` each time)."""

    def __init__(self, path: str, *, mode: int = 0o640,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.mode = mode
        self.monotonic = monotonic
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._checked = -float("inf")

    def deliver(self, batch: Sequence[Alert]) -> None:
        if not batch:
            return
        text = "".join(alert_line(a) + "\n" for a in batch)
        if self.path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        fd = self._file()
        data = text.encode("utf-8")
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError:
            self._close_file()
            raise

    def _file(self) -> int:
        """The open descriptor for ``path``, reopened when the file was rotated away.

        The path is looked at no more than once per :data:`ROTATION_CHECK_SECONDS`:
        a flood of alerts costs one ``stat`` a second, not one per alert.
        """
        if self._fd is not None:
            now = self.monotonic()
            if now - self._checked < self.ROTATION_CHECK_SECONDS:
                return self._fd
            self._checked = now
            try:
                st = os.stat(self.path)
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                current = None
            if current == self._ident:
                return self._fd
            self._close_file()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, self.mode)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._checked = self.monotonic()
        return fd

    def _close_file(self) -> None:
        fd, self._fd, self._ident = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._close_file()


# ---------------------------------------------------------------------------
# syslog (RFC 5424 over the local datagram socket)
# ---------------------------------------------------------------------------

FACILITY_DAEMON = 3
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
SD_ID = "egressd@32473"
"""SD-ID of the structured data element (32473: the example enterprise number of RFC 5612)."""
SD_PARAMS = ("verdict", "country", "zone", "route", "reason", "community_id", "server_name",
             "name_source")
APP_NAME = "egressd"
MSGID = "EGRESS"
_BOM = "\ufeff"


def sd_escape(value: str) -> str:
    """Escape a structured-data parameter value: ``"``, ``\\`` and ``]`` get a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(text: str, limit: int) -> str:
    """A header field of printable US-ASCII without spaces (``-`` when empty)."""
    token = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return token or "-"


def syslog_severity(alert: Alert) -> int:
    """warning for violations, notice for the rest (``unknown``)."""
    kind = alert.record.verdict.verdict
    return SEVERITY_WARNING if kind is VerdictKind.VIOLATION else SEVERITY_NOTICE


def syslog_message(
    alert: Alert,
    *,
    facility: int = FACILITY_DAEMON,
    hostname: str | None = None,
    app_name: str = APP_NAME,
    procid: int | None = None,
) -> bytes:
    """The RFC 5424 message for an alert.

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [egressd@32473 …] MSG``;
    HOSTNAME is the sensor name unless given; parameters whose value is null
    are left out; MSG gets a BOM only when it is not plain ASCII.
    """
    rec = alert.record
    v = rec.verdict
    values = {
        "verdict": v.verdict.value,
        "country": rec.geo.country,
        "zone": rec.zone,
        "route": v.route,
        "reason": v.reason.value if v.reason is not None else None,
        "community_id": rec.community_id,
        "server_name": rec.server_name,
        "name_source": rec.name_source.value if rec.name_source is not None else None,
    }
    params = "".join(
        f' {name}="{sd_escape(value)}"' for name, value in values.items() if value is not None
    )
    pri = facility * 8 + syslog_severity(alert)
    host = _header_token(hostname if hostname is not None else alert.sensor, 255)
    pid = os.getpid() if procid is None else procid
    msg = alert_summary(alert)
    if not msg.isascii():
        msg = _BOM + msg
    head = (
        f"<{pri}>1 {rfc3339(alert.raised_ns)} {host} {_header_token(app_name, 48)} "
        f"{pid} {MSGID} [{SD_ID}{params}] "
    )
    return (head + msg).encode("utf-8")


class SyslogSink:
    """Sends each alert as an RFC 5424 datagram to the local syslog socket.

    The socket is non-blocking: when the syslog daemon does not keep up, the
    alert fails (counted) instead of stalling the capture loop.  When the
    socket is missing the sink raises; the next batch connects again.
    """

    name = "syslog"

    def __init__(
        self,
        address: str = "/dev/log",
        *,
        facility: int = FACILITY_DAEMON,
        hostname: str | None = None,
        app_name: str = APP_NAME,
    ) -> None:
        if not 0 <= facility <= 23:
            raise ValueError("syslog facility must be 0-23")
        self.address = address
        self.facility = facility
        self.hostname = hostname
        self.app_name = app_name
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def deliver(self, batch: Sequence[Alert]) -> None:
        for alert in batch:
            data = syslog_message(
                alert, facility=self.facility, hostname=self.hostname, app_name=self.app_name
            )
            sock = self._connect()
            try:
                sock.send(data)
            except BlockingIOError:
                raise  # the receiver is full; keep the connection
            except OSError:
                self.close()  # the receiver went away: reconnect next time
                raise

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
