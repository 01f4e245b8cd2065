"""Which flows alert, and folding repeated flows into one alert per group.

A busy host that breaks the policy does so with many flows: every DNS query,
every HTTP keep-alive that expired, every retry.  One alert per flow would
bury the operator, so flows are grouped by

* **source**: the internal end's zone when it has one, else the internal address
  (hosts in a zone are usually the same service, so one alert per zone is the
  useful granularity; without a zone each host stands for itself);
* **remote network**: the remote address cut to an IPv4 ``/24`` or an IPv6
  ``/48`` (the smallest prefixes routed on the internet: a service that uses
  several addresses of one block, such as a CDN or a load balancer, is one
  group, while different providers stay apart);
* **route and reason**: the route the flow failed on (if any) and the reason
  code, plus the verdict (``violation`` or ``unknown``).

The first flow of a group raises an alert.  Later flows of the group within
``suppress_seconds`` of that alert are *suppressed*: counted, not sent to the
line sinks (JSON lines, syslog).  The first flow after the window raises a new
alert, which carries the number of flows suppressed since the previous one.

Sinks that hold alert *state* (Alertmanager) additionally get a **refresh**
while a group keeps seeing flows: at most once per ``resend_ns`` a suppressed
flow is passed on to them so the alert stays firing (see
:mod:`egressd.alerts.alertmanager` for ``endsAt``).

Memory is bounded: at most ``max_groups`` groups (default 100 000, a few
hundred bytes each: tens of MB at most) are remembered, least recently seen
first out.  A group pushed out early simply alerts again on its next flow.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from egressd.model import Alert, FlowRecord, VerdictKind

DEFAULT_MAX_GROUPS = 100_000
IPV4_PREFIX = 24
IPV6_PREFIX = 48
MIN_RESEND_NS = 60 * 1_000_000_000
"""Alertmanager refreshes are never more frequent than this per group."""
MAX_RESEND_NS = 300 * 1_000_000_000
"""… and never rarer than this while the group is active (unless the window is shorter)."""


def should_alert(record: FlowRecord, *, alert_on_unknown: bool) -> bool:
    """Violations always alert; ``unknown`` verdicts only when configured."""
    kind = record.verdict.verdict
    return kind is VerdictKind.VIOLATION or (alert_on_unknown and kind is VerdictKind.UNKNOWN)


def default_resend_ns(suppress_ns: int) -> int:
    """The refresh interval for stateful sinks: the window, within 60 s … 300 s."""
    return min(max(suppress_ns, MIN_RESEND_NS), MAX_RESEND_NS)


def internal_ip(record: FlowRecord) -> str:
    """The internal end of a flow with an internal end (the one that is not remote)."""
    if record.remote_ip is not None and record.src_ip == record.remote_ip:
        return record.dst_ip
    return record.src_ip


def remote_network(address: str) -> str:
    """The remote address cut to its group network: ``81.2.69.142`` → ``81.2.69.0/24``.

    IPv4-mapped IPv6 addresses count as IPv4.  Text that is not an address
    (never produced by the decoder) is returned unchanged.
    """
    head, dot, last = address.rpartition(".")
    if dot and last.isdigit() and ":" not in address and head.count(".") == 2:
        return f"{head}.0/24"  # the decoder's addresses are canonical: no parsing needed
    return _network(address)


@functools.lru_cache(maxsize=65536)
def _network(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("|", "%7C")


@dataclass(frozen=True, slots=True)
class GroupKey:
    """What makes two flows "the same" for alerting."""

    verdict: str
    source: str
    """Zone of the internal end, or its address when it is in no zone."""
    network: str
    """Remote network (IPv4 /24, IPv6 /48)."""
    route: str
    """Name of the route the flow failed on; empty when none."""
    reason: str
    """Reason code; empty when none."""

    @classmethod
    def of(cls, record: FlowRecord) -> GroupKey:
        v = record.verdict
        remote = record.remote_ip if record.remote_ip is not None else record.dst_ip
        return cls(
            verdict=v.verdict.value,
            source=record.zone if record.zone else internal_ip(record),
            network=remote_network(remote),
            route=v.route or "",
            reason=v.reason.value if v.reason is not None else "",
        )

    def text(self) -> str:
        """Stable, readable text form: ``violation|customer-data|81.2.69.0/24||no_route``.

        ``%`` and ``|`` in route names are percent-escaped so that the text
        identifies the group unambiguously.
        """
        return "|".join(
            (self.verdict, _escape(self.source), self.network, _escape(self.route), self.reason)
        )


class Action(Enum):
    """What :meth:`Deduplicator.observe` decided for one flow."""

    ALERT = "alert"
    """First flow of a group or of a new window: every sink gets the alert."""
    REFRESH = "refresh"
    """Suppressed, but stateful sinks get it to keep the alert firing."""
    SUPPRESS = "suppress"
    """Suppressed: only counted."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one flow and the alert that goes with it."""

    action: Action
    alert: Alert | None
    """The alert to send; None for :attr:`Action.SUPPRESS`."""


_SUPPRESS = Outcome(Action.SUPPRESS, None)


@dataclass(slots=True)
class _Group:
    window_start_ns: int
    suppressed: int
    """Flows suppressed since the group's last line alert."""
    last_post_ns: int
    """When stateful sinks last got this group (alert or refresh)."""


class Deduplicator:
    """Decides, flow by flow, whether to alert, refresh or suppress.

    Not thread-safe: one caller (the capture loop) at a time.
    """

    def __init__(
        self,
        suppress_ns: int,
        *,
        resend_ns: int | None = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
    ) -> None:
        if suppress_ns < 0:
            raise ValueError("suppress_ns must be >= 0")
        if max_groups < 1:
            raise ValueError("max_groups must be positive")
        self.suppress_ns = suppress_ns
        self.resend_ns = default_resend_ns(suppress_ns) if resend_ns is None else resend_ns
        if self.resend_ns <= 0:
            raise ValueError("resend_ns must be positive")
        self.max_groups = max_groups
        self._groups: OrderedDict[GroupKey, _Group] = OrderedDict()
        self.evicted = 0
        """Groups forgotten because the table was full."""

    def __len__(self) -> int:
        return len(self._groups)

    def observe(
        self, record: FlowRecord, *, sensor: str, interface: str | None, now_ns: int
    ) -> Outcome:
        """Fold one alerting flow into its group and say what to send.

        ``flow_count`` of the returned alert is ``1 + suppressed_flows``: the flows
        it stands for since the group's previous line alert (for a refresh, the
        window's first flow plus those suppressed since).
        """
        key = GroupKey.of(record)
        groups = self._groups
        group = groups.get(key)
        if group is None or now_ns - group.window_start_ns >= self.suppress_ns:
            earlier = group.suppressed if group is not None else 0
            if group is None:
                group = _Group(now_ns, 0, now_ns)
                groups[key] = group
                if len(groups) > self.max_groups:
                    groups.popitem(last=False)
                    self.evicted += 1
            else:
                group.window_start_ns = now_ns
                group.suppressed = 0
                group.last_post_ns = now_ns
                groups.move_to_end(key)
            alert = Alert(record, sensor, interface, key.text(), now_ns, 1 + earlier)
            return Outcome(Action.ALERT, alert)
        groups.move_to_end(key)
        group.suppressed += 1
        if now_ns - group.last_post_ns >= self.resend_ns:
            group.last_post_ns = now_ns
            alert = Alert(record, sensor, interface, key.text(), now_ns, 1 + group.suppressed)
            return Outcome(Action.REFRESH, alert)
        return _SUPPRESS
