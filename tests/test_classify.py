"""Classifier: direction, remote, zone, ports and verdict of finished flows."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mmdb_builder import build_mmdb
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from egressd.classify import Classifier, addr16, ip_text, packed
from egressd.community import community_id
from egressd.config import parse_config
from egressd.decode.batch import decode_batch
from egressd.decode.linktypes import LINKTYPE_RAW
from egressd.flows import Flow, FlowTable, flow_key
from egressd.geo import CachedResolver, MaxMindResolver, open_resolver
from egressd.model import (
    FlowEndpoints,
    FlowName,
    FlowRecord,
    GeoInfo,
    Initiator,
    NameSource,
    Reason,
    RecordBatch,
    Verdict,
    VerdictKind,
)
from egressd.netset import is_multicast_or_broadcast

NS = 10**9
T0 = 1_772_352_000 * NS

POLICY = b"""
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16, "fd00:20::/32"]
routes:
  - name: hk-backup
    approval: CAC-2025-0142
    from: [customer-data]
    to: {countries: [HK]}
    protocols: [tcp]
    ports: [443]
  - name: vendor
    approval: SCC-1
    to: {asns: [64500]}
"""


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    tmp: Path = tmp_path_factory.mktemp("geo")
    country = build_mmdb(tmp / "c.mmdb", "GeoLite2-Country", {
        "203.0.113.0/24": {"country": {"iso_code": "HK"}, "registered_country": {"iso_code": "HK"}},
        "198.51.100.0/24": {"country": {"iso_code": "US"},
                            "registered_country": {"iso_code": "GB"}},
        "192.0.2.0/24": {"country": {"iso_code": "CN"}, "registered_country": {"iso_code": "CN"}},
        "2001:db8:1::/48": {"country": {"iso_code": "DE"},
                            "registered_country": {"iso_code": "DE"}},
    })
    asn = build_mmdb(tmp / "a.mmdb", "GeoLite2-ASN", {
        "45.45.0.0/16": {"autonomous_system_number": 64500,
                           "autonomous_system_organization": "Vendor Ltd"},
    })
    config = parse_config(POLICY, "policy.yaml")
    return Classifier(config.policy, CachedResolver(MaxMindResolver(country, asn)))


def flows_of(clf: Classifier, packets: list[bytes]) -> list[FlowRecord]:
    table = FlowTable()
    table.process(decode_batch(RecordBatch.from_packets(
        [(T0 + i * NS // 100, LINKTYPE_RAW, p) for i, p in enumerate(packets)])))
    table.flush()
    return sorted((clf.classify(f) for f in table.finished), key=lambda r: r.first_seen_ns)


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, size: int = 0) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
                 / Raw(b"d" * size))


def test_approved_export_from_the_right_zone(classifier: Classifier) -> None:
    [r] = flows_of(classifier, [tcp("10.20.0.5", "203.0.113.9", 50000, 443, "S"),
                                tcp("203.0.113.9", "10.20.0.5", 443, 50000, "SA"),
                                tcp("10.20.0.5", "203.0.113.9", 50000, 443, "PA", 500)])
    assert (r.src_ip, r.src_port, r.dst_ip, r.dst_port) == ("10.20.0.5", 50000, "203.0.113.9", 443)
    assert r.initiator is Initiator.INTERNAL and r.remote_ip == "203.0.113.9"
    assert r.zone == "customer-data" and r.geo.country == "HK"
    assert (r.packets_out, r.bytes_out, r.packets_in, r.bytes_in) == (2, 580, 1, 40)
    assert r.verdict == (VerdictKind.APPROVED, "hk-backup", "CAC-2025-0142", None)


def test_remote_initiated_flow_counts_what_the_internal_host_sent(classifier: Classifier) -> None:
    [r] = flows_of(classifier, [tcp("198.51.100.7", "10.30.0.9", 40000, 22, "S"),
                                tcp("10.30.0.9", "198.51.100.7", 22, 40000, "SA"),
                                tcp("10.30.0.9", "198.51.100.7", 22, 40000, "PA", 2000)])
    assert r.initiator is Initiator.REMOTE
    assert (r.src_ip, r.dst_ip, r.dst_port) == ("198.51.100.7", "10.30.0.9", 22)
    assert (r.packets_out, r.bytes_out, r.packets_in, r.bytes_in) == (2, 2080, 1, 40)
    assert r.geo.country == "US" and r.geo.registered_country == "GB"
    assert r.verdict == (VerdictKind.VIOLATION, None, None, Reason.NO_ROUTE)
    assert r.zone is None


def test_wrong_port_names_the_route_that_matched_the_destination(classifier: Classifier) -> None:
    [r] = flows_of(classifier, [tcp("10.20.0.5", "203.0.113.9", 50000, 8443, "S")])
    assert r.verdict == (VerdictKind.VIOLATION, "hk-backup", None, Reason.PORT_NOT_ALLOWED)


def test_domestic_unknown_and_asn_route(classifier: Classifier) -> None:
    recs = flows_of(classifier, [
        bytes(IP(src="10.1.1.1", dst="192.0.2.8") / UDP(sport=1, dport=53)),
        bytes(IP(src="10.1.1.1", dst="8.8.8.8") / UDP(sport=2, dport=53)),
        bytes(IP(src="10.1.1.1", dst="45.45.3.3") / UDP(sport=3, dport=9999)),
    ])
    verdicts = {r.remote_ip: r.verdict for r in recs}
    assert verdicts["192.0.2.8"].verdict is VerdictKind.DOMESTIC
    assert verdicts["8.8.8.8"] == (VerdictKind.UNKNOWN, None, None, Reason.NO_COUNTRY)
    assert verdicts["45.45.3.3"] == (VerdictKind.APPROVED, "vendor", "SCC-1", None)


def test_internal_multicast_and_transit(classifier: Classifier) -> None:
    recs = flows_of(classifier, [
        bytes(IP(src="10.1.1.1", dst="10.20.0.5") / UDP(sport=1, dport=2)),
        bytes(IP(src="10.1.1.1", dst="239.1.1.1") / UDP(sport=5353, dport=5353)),
        bytes(IP(src="198.51.100.7", dst="203.0.113.9") / UDP(sport=3, dport=4) / Raw(b"t" * 10)),
    ])
    internal, mcast, transit = recs
    assert internal.verdict.verdict is VerdictKind.INTERNAL and internal.remote_ip is None
    assert internal.geo.country is None and internal.initiator is Initiator.INTERNAL
    assert mcast.verdict.verdict is VerdictKind.INTERNAL
    assert transit.verdict.verdict is VerdictKind.TRANSIT and transit.initiator is None
    assert transit.remote_ip == "203.0.113.9" and transit.geo.country == "HK"
    assert (transit.packets_out, transit.bytes_out) == (1, 38)


def test_icmp_ports_are_type_and_code_and_ipv6_works(classifier: Classifier) -> None:
    recs = flows_of(classifier, [
        bytes(IP(src="10.20.0.5", dst="198.51.100.7") / ICMP(type=8, code=0)),
        bytes(IP(src="198.51.100.7", dst="10.20.0.5") / ICMP(type=0, code=0)),
        bytes(IPv6(src="fd00:20::5", dst="2001:db8:1::1") / UDP(sport=7, dport=9)),
    ])
    icmp, v6 = recs
    assert (icmp.proto, icmp.src_port, icmp.dst_port, icmp.packets_in) == (1, 8, 0, 1)
    assert v6.zone == "customer-data" and v6.geo.country == "DE"
    assert v6.verdict == (VerdictKind.VIOLATION, None, None, Reason.NO_ROUTE)


def test_ip_text_prints_mapped_addresses_as_ipv4() -> None:
    assert ip_text(b"\x00" * 10 + b"\xff\xff" + bytes([1, 2, 3, 4])) == "1.2.3.4"
    assert ip_text(bytes(15) + b"\x01") == "::1"


CACHE_POLICY = b"""
home_countries: [CN]
zones:
  a: [10.1.0.0/16]
  b: [10.2.0.0/16, 10.1.5.0/24]
routes:
  - name: nets-from-a
    approval: R1
    from: [a]
    to: {networks: [203.0.113.0/25, "2001:db8:1::/48"]}
  - name: hk-tcp-443
    approval: R2
    from: [b, 10.3.0.0/16]
    to: {countries: [HK]}
    protocols: [tcp]
    ports: [443]
    expires: 2026-03-01T08:00:30Z
  - name: asn-any
    approval: R3
    to: {asns: [64500], networks: [203.0.113.128/25]}
    protocols: [udp]
  - name: named
    approval: R4
    to: {countries: [US], names: ["*.vendor.example"]}
"""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["10.1.1.1", "10.1.5.9", "10.2.0.7", "10.3.3.3", "10.9.9.9", "fd00::1"]),
    st.sampled_from(["203.0.113.5", "203.0.113.200", "198.51.100.1", "45.45.1.1",
                     "2001:db8:1::9", "192.0.2.1"]),
    st.sampled_from([6, 17, 1]),  # tcp, udp, icmp
    st.sampled_from([443, 80, 53, None]),
    st.integers(0, 60),
    st.sampled_from([None, "HK", "US", "CN"]),
    st.sampled_from([None, 64500]),
    st.sampled_from([(), ("a.vendor.example",), ("other.example",)])), min_size=1, max_size=40))
def test_cached_verdicts_equal_the_policy_for_every_flow(
        flows: list[tuple[str, str, int, int | None, int, str | None, int | None,
                          tuple[str, ...]]]) -> None:
    """The verdict cache keys by route masks, not addresses: never a different answer."""
    from egressd.model import FlowEndpoints
    from egressd.model import GeoInfo as Geo
    from egressd.policy import Policy

    policy: Policy = parse_config(CACHE_POLICY, "policy.yaml").policy
    clf = Classifier(policy, open_resolver(None, None), cache_size=8)  # small: evictions too
    for internal, remote, proto, port, sec, country, asn, names in flows:
        internal16 = addr16(internal)
        zone = policy.zone_of(internal16)
        geo = Geo(country, country, asn)
        first = T0 + sec * NS
        got = clf.verdict(proto, internal16, remote, port, first, geo, zone, names)
        want = policy.evaluate(FlowEndpoints(proto, ip_text(internal16), remote, port, first,
                                             names), geo, zone)
        assert got == want, (internal, remote, proto, port, sec, country, asn, names)


def test_cached_verdicts_tell_sources_and_destinations_apart() -> None:
    """Same country, port and time; only the route masks of the two ends differ."""
    from egressd.model import GeoInfo as Geo

    policy = parse_config(CACHE_POLICY, "policy.yaml").policy
    clf = Classifier(policy, open_resolver(None, None))
    hk = Geo("HK", "HK")
    at = T0 + 5 * NS
    # From zone b the HK route applies; from a host in no zone it does not.
    ok = clf.verdict(6, addr16("10.2.0.7"), "198.51.100.1", 443, at, hk, "b")
    bad = clf.verdict(6, addr16("10.9.9.9"), "198.51.100.1", 443, at, hk, None)
    assert (ok.verdict, ok.route) == (VerdictKind.APPROVED, "hk-tcp-443")
    assert (bad.verdict, bad.reason) == (VerdictKind.VIOLATION, Reason.ZONE_NOT_ALLOWED)
    # Into the first /25 from zone a the network route applies; into the other /25 not.
    none = Geo()
    inside = clf.verdict(17, addr16("10.1.1.1"), "203.0.113.5", 53, at, none, "a")
    outside = clf.verdict(17, addr16("10.1.1.1"), "203.0.113.200", 53, at, none, "a")
    assert (inside.verdict, inside.route) == (VerdictKind.APPROVED, "nets-from-a")
    assert (outside.verdict, outside.route) == (VerdictKind.APPROVED, "asn-any")
    # The same questions again come from the cache, with the same answers.
    assert clf.verdict(6, addr16("10.9.9.9"), "198.51.100.1", 443, at, hk, None) == bad
    assert clf.verdict(17, addr16("10.1.1.1"), "203.0.113.5", 53, at, none, "a") == inside


PLAIN_POLICY = b"""
home_countries: [CN]
internal_networks: [10.0.0.0/8, "fd00::/8", 239.0.0.0/8, "::ffff:10.0.0.0/104"]
zones:
  a: [10.1.0.0/16]
routes:
  - name: nets-from-a
    approval: R1
    from: [a]
    to: {networks: [203.0.113.0/25, "2001:db8:1::/48"]}
  - name: hk-tcp-443
    approval: R2
    to: {countries: [HK]}
    protocols: [tcp]
    ports: [443]
    expires: 2026-03-01T08:00:30Z
  - name: named
    approval: R4
    to: {countries: [US], names: ["*.vendor.example"]}
"""

V4_ADDRS = ["10.1.1.1", "10.9.9.9", "203.0.113.5", "198.51.100.1", "239.1.1.1", "224.0.0.251",
            "255.255.255.255", "192.0.2.1"]
V6_ADDRS = ["fd00::1", "2001:db8:1::9", "ff02::fb", "::ffff:10.1.1.1", "::ffff:203.0.113.5",
            "2001:db8::77"]


def plain_classify(clf: Classifier, flow: Flow) -> FlowRecord:
    """What :meth:`Classifier.classify` must give, step by step from the public pieces."""
    policy = clf.policy
    if flow.initiator == 0:
        src, sport, dst, dport = flow.a, flow.a_port, flow.b, flow.b_port
        out = (flow.pk0, flow.by0, flow.pk1, flow.by1)
    else:
        src, sport, dst, dport = flow.b, flow.b_port, flow.a, flow.a_port
        out = (flow.pk1, flow.by1, flow.pk0, flow.by0)
    sp: int | None
    dp: int | None
    if flow.proto in (6, 17, 132):
        sp, dp = sport, dport
    elif flow.proto in (1, 58):
        sp, dp = flow.icmp_type, flow.icmp_code
    else:
        sp = dp = None
    server_name, name_source, names = flow.name or (None, None, ())
    s_text, d_text = ip_text(src, flow.version), ip_text(dst, flow.version)
    cid = community_id(flow.proto, packed(src, flow.version), packed(dst, flow.version), sp, dp)
    s_in, d_in = policy.is_internal(src), policy.is_internal(dst)
    base = (cid, flow.proto, s_text, sp, d_text, dp)
    times = (flow.first_ns, flow.last_ns)
    if (s_in and d_in) or is_multicast_or_broadcast(dst):
        return FlowRecord(*base, Initiator.INTERNAL if s_in else Initiator.REMOTE, None,
                          GeoInfo(), policy.zone_of(src) if s_in else None, *times, *out,
                          Verdict(VerdictKind.INTERNAL), server_name, name_source)
    if not s_in and not d_in:
        return FlowRecord(*base, None, d_text, clf.resolver.lookup(d_text), None, *times, *out,
                          Verdict(VerdictKind.TRANSIT), server_name, name_source)
    if s_in:
        initiator, internal, remote = Initiator.INTERNAL, src, d_text
    else:
        initiator, internal, remote = Initiator.REMOTE, dst, s_text
        out = (out[2], out[3], out[0], out[1])
    zone = policy.zone_of(internal)
    geo = clf.resolver.lookup(remote)
    verdict = policy.evaluate(FlowEndpoints(flow.proto, ip_text(internal), remote, dp,
                                            flow.first_ns, names), geo, zone)
    return FlowRecord(*base, initiator, remote, geo, zone, *times, *out, verdict,
                      server_name, name_source)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([4, 6]), st.integers(0, 7), st.integers(0, 7),
    st.sampled_from([6, 17, 132, 1, 58, 50]), st.integers(0, 65535), st.sampled_from([443, 53, 0]),
    st.integers(0, 1), st.integers(0, 60), st.integers(0, 99),
    st.sampled_from([None, FlowName("a.vendor.example", NameSource.SNI, ("a.vendor.example",)),
                     FlowName("x.example", NameSource.DNS, ("x.example", "y.example"))])),
    min_size=1, max_size=30))
def test_classify_equals_the_plain_steps(
        flows: list[tuple[int, int, int, int, int, int, int, int, int, FlowName | None]]) -> None:
    """The per-address caches and the direct reading of the flow key change nothing."""
    policy = parse_config(PLAIN_POLICY, "policy.yaml").policy
    clf = Classifier(policy, open_resolver(None, None), cache_size=4)  # small: evictions too
    for version, i, j, proto, sport, dport, initiator, sec, n, name in flows:
        addrs = V4_ADDRS if version == 4 else V6_ADDRS
        a, b = addr16(addrs[i % len(addrs)]), addr16(addrs[j % len(addrs)])
        flow = Flow(flow_key(proto, version, a, sport, b, dport), proto, version, initiator,
                    T0 + sec * NS, icmp_type=sport % 256, icmp_code=dport % 256)
        flow.last_ns = flow.first_ns + n
        flow.pk0, flow.by0, flow.pk1, flow.by1 = n, 40 * n, n // 2, 1500 * n
        flow.name = name
        assert (flow.a, flow.b) in ((a, b), (b, a))
        assert clf.classify(flow) == plain_classify(clf, flow)
