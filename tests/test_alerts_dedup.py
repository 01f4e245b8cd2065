"""Which flows alert, the de-duplication groups and window, and the alerter around them.

``flow()`` and ``RecordingSink`` are also used by the other ``test_alerts_*`` modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from egressd.alerts import Alerter
from egressd.alerts.dedup import (
    MAX_RESEND_NS,
    MIN_RESEND_NS,
    Action,
    Deduplicator,
    GroupKey,
    default_resend_ns,
    remote_network,
    should_alert,
)
from egressd.config import AlertsConfig
from egressd.metrics import Metrics
from egressd.model import (
    PROTO_TCP,
    Alert,
    FlowRecord,
    GeoInfo,
    Initiator,
    NameSource,
    Reason,
    Verdict,
    VerdictKind,
)

SEC = 1_000_000_000
T0 = 1_767_225_600 * SEC  # 2026-01-01T00:00:00Z


def flow(
    *,
    src: str = "10.20.1.7",
    dst: str = "81.2.69.142",
    zone: str | None = None,
    verdict: VerdictKind = VerdictKind.VIOLATION,
    reason: Reason | None = Reason.NO_ROUTE,
    route: str | None = None,
    country: str | None = "GB",
    bytes_out: int = 3200,
    cid: str = "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
    first_ns: int = T0,
    initiator: Initiator = Initiator.INTERNAL,
    dst_port: int | None = 443,
    server_name: str | None = None,
    name_source: NameSource | None = None,
) -> FlowRecord:
    """A decided flow from internal ``src`` to remote ``dst`` (or the reverse for REMOTE)."""
    internal, remote = src, dst
    if initiator is Initiator.REMOTE:
        src, dst = remote, internal
    return FlowRecord(
        community_id=cid, proto=PROTO_TCP, src_ip=src, src_port=40000, dst_ip=dst,
        dst_port=dst_port, initiator=initiator, remote_ip=remote,
        geo=GeoInfo(country, country, 64500, "Example AS"), zone=zone,
        first_seen_ns=first_ns, last_seen_ns=first_ns + 2 * SEC,
        packets_out=10, bytes_out=bytes_out, packets_in=8, bytes_in=900,
        verdict=Verdict(verdict, route, None, reason),
        server_name=server_name, name_source=name_source,
    )


class RecordingSink:
    """A sink that remembers what it got; ``fail`` makes it raise OSError."""

    def __init__(self, name: str = "rec", *, spooled: bool = False, refresh: bool = False):
        self.name = name
        self.spooled = spooled
        self.refresh = refresh
        self.got: list[Alert] = []
        self.fail = False
        self.closed = False

    def deliver(self, batch: Sequence[Alert]) -> None:
        if self.fail:
            raise ConnectionRefusedError("sink is down")
        self.got.extend(batch)

    def close(self) -> None:
        self.closed = True


def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- which flows alert ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "on_unknown", "expected"),
    [
        (VerdictKind.VIOLATION, False, True),
        (VerdictKind.VIOLATION, True, True),
        (VerdictKind.UNKNOWN, False, False),
        (VerdictKind.UNKNOWN, True, True),
        (VerdictKind.APPROVED, True, False),
        (VerdictKind.DOMESTIC, True, False),
        (VerdictKind.INTERNAL, True, False),
        (VerdictKind.TRANSIT, True, False),
    ],
)
def test_should_alert(kind: VerdictKind, on_unknown: bool, expected: bool) -> None:
    assert should_alert(flow(verdict=kind), alert_on_unknown=on_unknown) is expected


# -- group keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("81.2.69.142", "81.2.69.0/24"),
        ("81.2.69.0", "81.2.69.0/24"),
        ("2001:db8:1234:5678::1", "2001:db8:1234::/48"),
        ("::ffff:81.2.69.142", "81.2.69.0/24"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_remote_network(address: str, network: str) -> None:
    assert remote_network(address) == network


def test_group_key_uses_zone_else_internal_address() -> None:
    assert GroupKey.of(flow(zone="customer-data")).source == "customer-data"
    assert GroupKey.of(flow()).source == "10.20.1.7"
    # The remote end started the flow: the internal address is the responder.
    reverse = flow(initiator=Initiator.REMOTE)
    assert reverse.src_ip == "81.2.69.142"
    assert GroupKey.of(reverse).source == "10.20.1.7"
    assert GroupKey.of(reverse) == GroupKey.of(flow())


def test_group_key_text() -> None:
    key = GroupKey.of(flow(zone="customer-data", route="gb|crm%1",
                           reason=Reason.ZONE_NOT_ALLOWED))
    assert key.text() == "violation|customer-data|81.2.69.0/24|gb%7Ccrm%251|zone_not_allowed"
    assert GroupKey.of(flow(reason=None)).text() == "violation|10.20.1.7|81.2.69.0/24||"


# -- the window ----------------------------------------------------------------------


def observe(d: Deduplicator, rec: FlowRecord, t: int) -> tuple[Action, Alert | None]:
    out = d.observe(rec, sensor="gw1", interface="eth0", now_ns=t)
    return out.action, out.alert


def test_same_group_within_window_is_suppressed_then_a_new_alert_counts_them() -> None:
    d = Deduplicator(300 * SEC)
    action, first = observe(d, flow(), T0)
    assert action is Action.ALERT and first is not None
    assert (first.flow_count, first.sensor, first.interface, first.raised_ns) == (1, "gw1",
                                                                                  "eth0", T0)
    assert first.group == "violation|10.20.1.7|81.2.69.0/24||no_route"
    # Same host, another address of the same /24, within the window.
    assert observe(d, flow(dst="81.2.69.7"), T0 + 10 * SEC)[0] is Action.SUPPRESS
    assert observe(d, flow(), T0 + 299 * SEC)[0] is Action.SUPPRESS
    action, again = observe(d, flow(bytes_out=1), T0 + 300 * SEC)
    assert action is Action.ALERT and again is not None
    assert again.flow_count == 3  # itself + the two folded into the group meanwhile
    assert again.record.bytes_out == 1
    # The new window starts at the new alert.
    assert observe(d, flow(), T0 + 599 * SEC)[0] is Action.SUPPRESS
    assert observe(d, flow(), T0 + 600 * SEC)[1] == Alert(
        flow(), "gw1", "eth0", again.group, T0 + 600 * SEC, 2)


def test_different_reason_route_network_or_source_is_another_group() -> None:
    d = Deduplicator(300 * SEC)
    assert observe(d, flow(), T0)[0] is Action.ALERT
    others = [
        flow(reason=Reason.ROUTE_EXPIRED, route="gb-crm"),
        flow(reason=Reason.ZONE_NOT_ALLOWED, route="gb-crm"),
        flow(reason=Reason.ZONE_NOT_ALLOWED, route="gb-backup"),
        flow(dst="81.2.70.1"),
        flow(src="10.20.1.8"),
        flow(verdict=VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY, country=None),
    ]
    for i, rec in enumerate(others):
        assert observe(d, rec, T0 + i)[0] is Action.ALERT, rec
    assert len(d) == 1 + len(others)


def test_zone_groups_hosts_together() -> None:
    d = Deduplicator(300 * SEC)
    assert observe(d, flow(src="10.20.1.7", zone="crm"), T0)[0] is Action.ALERT
    assert observe(d, flow(src="10.20.9.9", zone="crm"), T0 + 1)[0] is Action.SUPPRESS
    assert observe(d, flow(src="10.20.9.9"), T0 + 2)[0] is Action.ALERT


def test_ipv6_groups_by_48() -> None:
    d = Deduplicator(300 * SEC)
    assert observe(d, flow(src="fd00::7", dst="2001:db8:1:2::1"), T0)[0] is Action.ALERT
    assert observe(d, flow(src="fd00::7", dst="2001:db8:1:ff::9"), T0)[0] is Action.SUPPRESS
    assert observe(d, flow(src="fd00::7", dst="2001:db8:2::1"), T0)[0] is Action.ALERT


def test_zero_window_alerts_every_flow() -> None:
    d = Deduplicator(0)
    assert [observe(d, flow(), T0)[0] for _ in range(3)] == [Action.ALERT] * 3


def test_refresh_for_stateful_sinks_while_the_group_stays_active() -> None:
    d = Deduplicator(600 * SEC, resend_ns=60 * SEC)
    assert observe(d, flow(), T0)[0] is Action.ALERT
    assert observe(d, flow(), T0 + 30 * SEC)[0] is Action.SUPPRESS
    action, refresh = observe(d, flow(bytes_out=5), T0 + 61 * SEC)
    assert action is Action.REFRESH and refresh is not None
    assert refresh.flow_count == 3 and refresh.record.bytes_out == 5
    assert refresh.raised_ns == T0 + 61 * SEC
    assert observe(d, flow(), T0 + 100 * SEC)[0] is Action.SUPPRESS
    assert observe(d, flow(), T0 + 121 * SEC)[0] is Action.REFRESH
    # Refreshes are still suppressed flows: the next window's alert counts them.
    action, alert = observe(d, flow(), T0 + 600 * SEC)
    assert action is Action.ALERT and alert is not None and alert.flow_count == 5


def test_default_resend_interval() -> None:
    assert default_resend_ns(0) == MIN_RESEND_NS
    assert default_resend_ns(120 * SEC) == 120 * SEC
    assert default_resend_ns(3600 * SEC) == MAX_RESEND_NS
    assert Deduplicator(300 * SEC).resend_ns == 300 * SEC


def test_groups_are_bounded_least_recently_seen_first_out() -> None:
    d = Deduplicator(300 * SEC, max_groups=3)
    for i in range(3):
        observe(d, flow(src=f"10.0.0.{i}"), T0)
    observe(d, flow(src="10.0.0.0"), T0 + 1)  # 10.0.0.0 is now the most recent
    assert observe(d, flow(src="10.0.0.9"), T0 + 2)[0] is Action.ALERT
    assert len(d) == 3 and d.evicted == 1
    assert observe(d, flow(src="10.0.0.0"), T0 + 3)[0] is Action.SUPPRESS
    assert observe(d, flow(src="10.0.0.1"), T0 + 4)[0] is Action.ALERT  # was evicted


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Deduplicator(-1)
    with pytest.raises(ValueError):
        Deduplicator(1, max_groups=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200)), max_size=60),
       st.integers(0, 100))
def test_window_property(steps: list[tuple[int, int]], window: int) -> None:
    """Alerts of one group are at least a window apart and account for every flow."""
    d = Deduplicator(window * SEC, resend_ns=10**18)
    t = T0
    last: dict[int, int] = {}
    flows: dict[int, int] = {}
    reported: dict[int, int] = {}
    for group, dt in steps:
        t += dt * SEC
        flows[group] = flows.get(group, 0) + 1
        action, alert = observe(d, flow(src=f"10.0.0.{group}"), t)
        if action is Action.ALERT:
            assert alert is not None
            assert group not in last or t - last[group] >= window * SEC
            last[group] = t
            reported[group] = reported.get(group, 0) + alert.flow_count
        else:
            assert action is Action.SUPPRESS
            assert t - last[group] < window * SEC
    # Flows after each group's last alert are the ones not reported yet.
    for group, n in flows.items():
        assert reported[group] <= n


# -- the alerter around it ---------------------------------------------------------


def config(tmp_path: Path, **kw: object) -> AlertsConfig:
    values: dict[str, object] = {"spool_dir": str(tmp_path / "spool"), "suppress_seconds": 300.0}
    values.update(kw)
    return AlertsConfig.model_validate(values)


def test_alerter_sends_one_alert_per_group_and_counts_the_rest(tmp_path: Path) -> None:
    m = metrics()
    line = RecordingSink("line")
    with Alerter(config(tmp_path), sensor="gw1", metrics=m, sinks=[line]) as alerter:
        assert alerter.observe(flow(), interface="eth0", now_ns=T0) is not None
        for i in range(4):
            assert alerter.observe(flow(), interface="eth0", now_ns=T0 + i * SEC) is None
        assert alerter.observe(flow(reason=Reason.ROUTE_EXPIRED, route="r"), interface="eth0",
                               now_ns=T0) is not None
        later = alerter.observe(flow(), interface="eth1", now_ns=T0 + 301 * SEC)
        assert later is not None and later.flow_count == 5 and later.interface == "eth1"
    assert [a.flow_count for a in line.got] == [1, 1, 5]
    assert sample(m, "egressd_alerts_suppressed_total") == 4
    assert sample(m, "egressd_alerts_sent_total", sink="line") == 3
    assert line.closed


def test_alerter_ignores_unknown_unless_configured(tmp_path: Path) -> None:
    unknown = flow(verdict=VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY, country=None)
    approved = flow(verdict=VerdictKind.APPROVED, reason=None, route="r")
    for on_unknown, expected in ((False, 0), (True, 1)):
        sink = RecordingSink()
        with Alerter(config(tmp_path, alert_on_unknown=on_unknown), sensor="gw1",
                     metrics=None, sinks=[sink]) as alerter:
            alerter.observe(unknown, interface=None, now_ns=T0)
            alerter.observe(approved, interface=None, now_ns=T0)
        assert len(sink.got) == expected


def test_failing_line_sink_is_counted_never_raised(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    m = metrics()
    bad, good = RecordingSink("bad"), RecordingSink("good")
    bad.fail = True
    with Alerter(config(tmp_path, suppress_seconds=0.0), sensor="gw1", metrics=m,
                 sinks=[bad, good]) as alerter:
        for i in range(3):
            assert alerter.observe(flow(), interface=None, now_ns=T0 + i) is not None
    assert len(good.got) == 3
    assert sample(m, "egressd_alerts_failed_total", sink="bad") == 3
    assert sample(m, "egressd_alerts_sent_total", sink="good") == 3
    # Logged once, not once per alert.
    assert len([r for r in caplog.records if "bad: alert not delivered" in r.getMessage()]) == 1


def test_refreshes_go_only_to_sinks_that_want_them(tmp_path: Path) -> None:
    line = RecordingSink("line")
    stateful = RecordingSink("stateful", spooled=True, refresh=True)
    alerter = Alerter(config(tmp_path, suppress_seconds=600.0), sensor="gw1", metrics=None,
                      sinks=[line, stateful], resend_seconds=60.0)
    try:
        for t in (0, 30, 61, 90):
            alerter.observe(flow(bytes_out=t), interface=None, now_ns=T0 + t * SEC)
        assert alerter.flush(5.0)
    finally:
        assert alerter.close(5.0)
    assert [a.record.bytes_out for a in line.got] == [0]
    assert [(a.record.bytes_out, a.flow_count) for a in stateful.got] == [(0, 1), (61, 3)]
    assert (tmp_path / "spool" / "stateful").is_dir()


def test_observe_after_close_does_nothing(tmp_path: Path) -> None:
    sink = RecordingSink()
    alerter = Alerter(config(tmp_path), sensor="gw1", metrics=None, sinks=[sink])
    assert alerter.close() and alerter.close()
    assert alerter.observe(flow(), interface=None, now_ns=T0) is None
    assert sink.got == []


def test_sink_names_must_be_unique(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        Alerter(config(tmp_path), sensor="gw1", sinks=[RecordingSink(), RecordingSink()])
