"""Posting alerts to a Prometheus Alertmanager (API v2).

``POST {base}/api/v2/alerts`` with a JSON array of alerts.  Alertmanager
identifies an alert by its label set; egressd's labels are

``alertname``  ``EgressViolation`` (verdict violation) or ``EgressUnknownCountry``
``severity``   ``critical`` for violations, ``warning`` for unknown
``country``, ``zone``, ``route``, ``reason``  from the flow (left out when empty)
``sensor``     the gateway that saw the flow
``alert_group`` the de-duplication group (:mod:`egressd.alerts.dedup`), so that
               two groups with the same country and reason stay two alerts

Annotations carry the details of the latest flow (``summary``,
``description``, ``community_id``, ``remote_ip``, ``server_name``, ``name_source``, ``bytes_out``,
``first_seen``, ``count``, …).

**Firing and resolving.**  Every alert has ``startsAt`` (when it was raised)
and ``endsAt = raised + 3 × resend interval``.  Alertmanager treats an alert
as resolved once ``endsAt`` passes without a newer post.  The alerter re-posts
an active group at most once per resend interval (see
:func:`egressd.alerts.dedup.default_resend_ns`), so an alert stays firing as
long as its group sees a flow at least every two resend intervals, and
resolves by itself between two and three intervals after the group went
quiet.  An alert delivered late (it waited in the spool) whose ``endsAt`` has
passed is sent with ``endsAt = now + resend interval``, so Alertmanager still
notifies it instead of taking it as already resolved.

**Outcomes.**  2xx: delivered.  429, 5xx, connection errors and timeouts:
:class:`OSError`, the spool retries later.  Any other status (4xx): the
request is malformed and would be refused forever, so
:class:`~egressd.alerts.sinks.AlertRejected` is raised and the spool discards
the alerts (counted as failed and logged) instead of blocking every later alert
behind them.

Proxies from the environment are ignored (Alertmanager is reached directly);
user and password in the URL are sent as HTTP basic authentication.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from egressd.model import Alert, VerdictKind
from egressd.report import rfc3339

from .dedup import MAX_RESEND_NS, internal_ip
from .sinks import AlertRejected, alert_summary, suppressed_flows

ALERTS_PATH = "/api/v2/alerts"
DEFAULT_TIMEOUT = 5.0
NAME_VIOLATION = "EgressViolation"
NAME_UNKNOWN = "EgressUnknownCountry"
LIFETIME_FACTOR = 3
"""``endsAt`` is this many resend intervals after the alert was raised."""
_MAX_ERROR_BODY = 512


class DeliveryError(ConnectionError):
    """Alertmanager answered with a status worth retrying (429, 5xx)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if body else f"HTTP {status}")
        self.status = status


def alert_labels(alert: Alert) -> dict[str, str]:
    """The label set that identifies the alert in Alertmanager."""
    rec = alert.record
    v = rec.verdict
    violation = v.verdict is VerdictKind.VIOLATION
    labels = {
        "alertname": NAME_VIOLATION if violation else NAME_UNKNOWN,
        "severity": "critical" if violation else "warning",
        "country": rec.geo.country or "",
        "zone": rec.zone or "",
        "route": v.route or "",
        "reason": v.reason.value if v.reason is not None else "",
        "sensor": alert.sensor,
        "alert_group": alert.group,
    }
    return {k: val for k, val in labels.items() if val}


def alert_annotations(alert: Alert) -> dict[str, str]:
    """Details of the alert's (latest) flow; every value is a string."""
    rec = alert.record
    v = rec.verdict
    what = "sent data abroad without an approved route"
    if v.verdict is not VerdictKind.VIOLATION:
        what = "sent data to a destination without a known country"
    notes = {
        "summary": f"{internal_ip(rec)} {what}",
        "description": alert_summary(alert),
        "community_id": rec.community_id,
        "internal_ip": internal_ip(rec),
        "remote_ip": rec.remote_ip or rec.dst_ip,
        "server_name": rec.server_name or "",
        "name_source": rec.name_source.value if rec.name_source is not None else "",
        "dst_port": "" if rec.dst_port is None else str(rec.dst_port),
        "bytes_out": str(rec.bytes_out),
        "first_seen": rfc3339(rec.first_seen_ns),
        "last_seen": rfc3339(rec.last_seen_ns),
        "count": str(alert.flow_count),
        "suppressed_flows": str(suppressed_flows(alert)),
        "interface": alert.interface or "",
        "approval": v.approval or "",
    }
    return {k: val for k, val in notes.items() if val}


def alert_payload(
    alert: Alert,
    *,
    resend_ns: int,
    now_ns: int,
    generator_url: str | None = None,
) -> dict[str, Any]:
    """One element of the ``POST /api/v2/alerts`` array."""
    ends = alert.raised_ns + LIFETIME_FACTOR * resend_ns
    if ends <= now_ns:
        ends = now_ns + resend_ns
    out: dict[str, Any] = {
        "labels": alert_labels(alert),
        "annotations": alert_annotations(alert),
        "startsAt": rfc3339(alert.raised_ns),
        "endsAt": rfc3339(ends),
    }
    if generator_url:
        out["generatorURL"] = generator_url
    return out


def _split_credentials(base_url: str) -> tuple[str, str | None]:
    """The URL without user:password, and the basic ``Authorization`` header for them."""
    parts = urlsplit(base_url)
    if parts.username is None:
        return base_url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    user = unquote(parts.username)
    password = unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


class AlertmanagerSink:
    """Posts batches of alerts to Alertmanager; always used through the spool."""

    name = "alertmanager"
    spooled = True
    refresh = True

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        resend_ns: int = MAX_RESEND_NS,
        generator_url: str | None = None,
        clock: Callable[[], int] = time.time_ns,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url, self._auth = _split_credentials(base_url)
        self.url = url.rstrip("/") + ALERTS_PATH
        self.timeout = timeout
        self.resend_ns = resend_ns
        self.generator_url = generator_url
        self.clock = clock
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def payload(self, batch: Sequence[Alert]) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            alert_payload(a, resend_ns=self.resend_ns, now_ns=now,
                          generator_url=self.generator_url)
            for a in batch
        ]

    def deliver(self, batch: Sequence[Alert]) -> None:
        if not batch:
            return
        body = json.dumps(self.payload(batch), ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if self._auth is not None:
            request.add_header("Authorization", self._auth)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            text = _error_body(exc)
            if status == 429 or status >= 500:
                raise DeliveryError(status, text) from None
            if 300 <= status < 400:
                raise DeliveryError(status, "unexpected redirect") from None
            raise AlertRejected(f"HTTP {status}: {text}" if text else f"HTTP {status}") from None
        except http.client.HTTPException as exc:
            # Broken responses (bad status line, short body) are not OSErrors.
            raise ConnectionError(f"bad response from Alertmanager: {exc!r}") from exc

    def close(self) -> None:
        pass


def _error_body(exc: urllib.error.HTTPError) -> str:
    try:
        data = exc.read(_MAX_ERROR_BODY)
    except (OSError, http.client.HTTPException):
        data = b""
    finally:
        exc.close()
    return " ".join(data.decode("utf-8", "replace").split())
