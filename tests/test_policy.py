"""Policy evaluation: every verdict and reason, route order, expiry, zones, warnings."""

from __future__ import annotations

import ipaddress
import textwrap
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.config import parse_policy
from egressd.model import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    FlowEndpoints,
    GeoInfo,
    Reason,
    Verdict,
    VerdictKind,
)
from egressd.policy import Policy, Route, UnknownCountry, merge_port_ranges, ns_to_text

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SEC = 1_000_000_000
T_2027 = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()) * SEC
T_2026 = int(datetime(2026, 6, 1, tzinfo=UTC).timestamp()) * SEC

APPROVED = VerdictKind.APPROVED
VIOLATION = VerdictKind.VIOLATION

BASE = """\
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16, "fd00:20::/32"]
  corp: [10.30.0.0/16, 10.20.99.0/24]
  dev: [10.40.0.0/16]
routes:
  - name: hk-backup
    approval: CAC-2025-0142
    from: [customer-data]
    to:
      countries: [HK]
    protocols: [tcp]
    ports: [443, "8000-8100"]
    expires: 2027-01-01
  - name: vendor
    approval: SCC-1
    from: [corp, 10.50.0.0/16]
    to:
      networks: [203.0.113.0/24, "2001:db8:500::/48"]
      asns: [64500]
    protocols: [tcp, udp]
  - name: sg-any
    approval: SG-1
    to:
      countries: [SG]
"""


def load(text: str = BASE, now: datetime = NOW) -> Policy:
    return parse_policy(textwrap.dedent(text).encode(), "policy.yaml", now=now)


def flow(
    internal: str | None = "10.20.1.1",
    remote: str | None = "198.51.100.7",
    proto: int = PROTO_TCP,
    port: int | None = 443,
    first_seen: int = T_2026,
) -> FlowEndpoints:
    return FlowEndpoints(proto, internal, remote, port, first_seen)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load()


# -- the verdict table ---------------------------------------------------------

CASES: list[tuple[str, FlowEndpoints, GeoInfo, Verdict]] = [
    ("home country", flow(), GeoInfo("CN"), Verdict(VerdictKind.DOMESTIC)),
    (
        "home country wins over a route",
        flow(remote="203.0.113.5"),
        GeoInfo("CN", asn=64500),
        Verdict(VerdictKind.DOMESTIC),
    ),
    (
        "approved by country",
        flow(),
        GeoInfo("HK"),
        Verdict(APPROVED, "hk-backup", "CAC-2025-0142"),
    ),
    (
        "approved by port range",
        flow(port=8100),
        GeoInfo("HK"),
        Verdict(APPROVED, "hk-backup", "CAC-2025-0142"),
    ),
    (
        "approved by network with no country",
        flow(internal="10.30.0.9", remote="203.0.113.5", proto=PROTO_UDP, port=53),
        GeoInfo(None),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "approved by ASN with no country",
        flow(internal="10.30.0.9", remote="192.0.2.1"),
        GeoInfo(None, asn=64500),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "approved by ASN in a foreign country",
        flow(internal="10.30.0.9", remote="192.0.2.1"),
        GeoInfo("US", asn=64500),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "approved by IPv6 network",
        flow(internal="10.30.0.9", remote="2001:db8:500:1::1"),
        GeoInfo("DE"),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "from by CIDR",
        flow(internal="10.50.3.3", remote="203.0.113.5"),
        GeoInfo("US"),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "route without from: any source, protocol, port",
        flow(internal="10.40.1.1", proto=PROTO_ICMP, port=None),
        GeoInfo("SG"),
        Verdict(APPROVED, "sg-any", "SG-1"),
    ),
    (
        "IPv6 zone",
        flow(internal="fd00:20::5", remote="2001:db8:1::1"),
        GeoInfo("HK"),
        Verdict(APPROVED, "hk-backup", "CAC-2025-0142"),
    ),
    (
        "IPv4-mapped internal address",
        flow(internal="::ffff:10.20.1.1"),
        GeoInfo("HK"),
        Verdict(APPROVED, "hk-backup", "CAC-2025-0142"),
    ),
    (
        "IPv4-mapped remote address",
        flow(internal="10.30.1.1", remote="::ffff:203.0.113.5"),
        GeoInfo(None),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "containment, not the assigned zone: 10.20.99.0/24 is customer-data first",
        flow(internal="10.20.99.1", remote="203.0.113.5"),
        GeoInfo("US"),
        Verdict(APPROVED, "vendor", "SCC-1"),
    ),
    (
        "no route",
        flow(),
        GeoInfo("US"),
        Verdict(VIOLATION, reason=Reason.NO_ROUTE),
    ),
    (
        "zone not allowed",
        flow(internal="10.30.0.1"),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.ZONE_NOT_ALLOWED),
    ),
    (
        "internal address in no zone",
        flow(internal="192.168.1.1"),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.ZONE_NOT_ALLOWED),
    ),
    (
        "protocol not allowed",
        flow(proto=PROTO_UDP),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PROTOCOL_NOT_ALLOWED),
    ),
    (
        "port not allowed",
        flow(port=22),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PORT_NOT_ALLOWED),
    ),
    (
        "port just past a range",
        flow(port=8101),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PORT_NOT_ALLOWED),
    ),
    (
        "port between ranges",
        flow(port=444),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PORT_NOT_ALLOWED),
    ),
    (
        "flow without ports against a route with ports",
        flow(port=None),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PORT_NOT_ALLOWED),
    ),
    (
        "expired",
        flow(first_seen=T_2027 + 1),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.ROUTE_EXPIRED),
    ),
    (
        "expiry boundary: first seen exactly at expiry is expired",
        flow(first_seen=T_2027),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.ROUTE_EXPIRED),
    ),
    (
        "expiry boundary: one ns before is approved",
        flow(first_seen=T_2027 - 1),
        GeoInfo("HK"),
        Verdict(APPROVED, "hk-backup", "CAC-2025-0142"),
    ),
    (
        "precedence: zone before protocol, port and expiry",
        flow(internal="10.40.0.1", proto=PROTO_UDP, port=22, first_seen=T_2027),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.ZONE_NOT_ALLOWED),
    ),
    (
        "precedence: protocol before port and expiry",
        flow(proto=PROTO_UDP, port=22, first_seen=T_2027),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PROTOCOL_NOT_ALLOWED),
    ),
    (
        "precedence: port before expiry",
        flow(port=22, first_seen=T_2027),
        GeoInfo("HK"),
        Verdict(VIOLATION, "hk-backup", reason=Reason.PORT_NOT_ALLOWED),
    ),
    (
        "network matched but protocol not: route named",
        flow(internal="10.30.0.9", remote="203.0.113.5", proto=PROTO_ICMP, port=None),
        GeoInfo("US"),
        Verdict(VIOLATION, "vendor", reason=Reason.PROTOCOL_NOT_ALLOWED),
    ),
    (
        "no country and no route: unknown",
        flow(remote="192.0.2.1"),
        GeoInfo(None, asn=1),
        Verdict(VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY),
    ),
    (
        "no country, a route matched by network but failed: unknown_country decides",
        flow(internal="10.40.0.1", remote="203.0.113.5"),
        GeoInfo(None),
        Verdict(VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY),
    ),
]


@pytest.mark.parametrize(
    ("ep", "geo", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_evaluate(policy: Policy, ep: FlowEndpoints, geo: GeoInfo, expected: Verdict) -> None:
    assert policy.evaluate(ep, geo, None) == expected


def test_zone_argument_is_not_what_from_checks(policy: Policy) -> None:
    # The caller's zone says customer-data, but the address is in corp.
    ep = flow(internal="10.30.0.1")
    assert policy.evaluate(ep, GeoInfo("HK"), "customer-data").reason == Reason.ZONE_NOT_ALLOWED


def test_zone_argument_used_when_there_is_no_internal_address(policy: Policy) -> None:
    ep = flow(internal=None)
    assert policy.evaluate(ep, GeoInfo("HK"), "customer-data").verdict == APPROVED
    assert policy.evaluate(ep, GeoInfo("HK"), "corp").reason == Reason.ZONE_NOT_ALLOWED
    assert policy.evaluate(ep, GeoInfo("HK"), None).reason == Reason.ZONE_NOT_ALLOWED


def test_unparsable_remote_does_not_match_networks(policy: Policy) -> None:
    ep = flow(internal="10.30.0.9", remote="not-an-ip")
    assert policy.evaluate(ep, GeoInfo("US"), None) == Verdict(VIOLATION, reason=Reason.NO_ROUTE)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("unknown", Verdict(VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY)),
        ("violation", Verdict(VIOLATION, reason=Reason.NO_COUNTRY)),
        ("allow", Verdict(APPROVED, None, None)),
    ],
)
def test_unknown_country_modes(mode: str, expected: Verdict) -> None:
    pol = load(BASE + f"unknown_country: {mode}\n")
    assert pol.unknown_country == UnknownCountry(mode)
    assert pol.evaluate(flow(remote="192.0.2.1"), GeoInfo(None), None) == expected
    # A country-less remote approved by network stays approved in every mode.
    approved = pol.evaluate(flow(internal="10.30.0.9", remote="203.0.113.5"), GeoInfo(None), None)
    assert approved == Verdict(APPROVED, "vendor", "SCC-1")
    # A remote with a country is never judged by unknown_country.
    assert pol.evaluate(flow(), GeoInfo("US"), None).reason == Reason.NO_ROUTE


ORDER = """\
home_countries: [CN]
zones:
  a: [10.1.0.0/16]
  b: [10.2.0.0/16]
routes:
  - name: first-fails-zone
    approval: A
    from: [b]
    to: {countries: [US]}
  - name: second-fails-port
    approval: B
    to: {countries: [US]}
    ports: [22]
  - name: third-approves
    approval: C
    to: {countries: [US, JP]}
    protocols: [tcp]
  - name: fourth-also-approves
    approval: D
    to: {countries: [US]}
"""


def test_first_full_match_wins_after_failures() -> None:
    pol = load(ORDER)
    ep = flow(internal="10.1.0.1", port=443)
    assert pol.evaluate(ep, GeoInfo("US"), "a") == Verdict(APPROVED, "third-approves", "C")
    assert pol.evaluate(ep._replace(proto=PROTO_UDP), GeoInfo("US"), "a") == Verdict(
        APPROVED, "fourth-also-approves", "D"
    )


def test_violation_names_first_route_whose_destination_matched() -> None:
    pol = load(ORDER.split("  - name: third-approves")[0])
    ep = flow(internal="10.1.0.1", port=443)
    assert pol.evaluate(ep, GeoInfo("US"), "a") == Verdict(
        VIOLATION, "first-fails-zone", reason=Reason.ZONE_NOT_ALLOWED
    )
    # From zone b the first route passes the zone check and then fails nothing
    # else, so it approves.
    ep_b = flow(internal="10.2.0.1", port=443)
    assert pol.evaluate(ep_b, GeoInfo("US"), "b") == Verdict(APPROVED, "first-fails-zone", "A")


def test_protocols_by_number() -> None:
    pol = load(
        """\
        home_countries: [CN]
        routes:
          - name: ipsec
            approval: X
            to: {countries: [DE]}
            protocols: [50, udp]
        """
    )
    assert pol.routes[0].protocols == frozenset({50, PROTO_UDP})
    assert pol.evaluate(flow(proto=50, port=None), GeoInfo("DE"), None).verdict == APPROVED
    assert pol.evaluate(flow(proto=51, port=None), GeoInfo("DE"), None).reason == (
        Reason.PROTOCOL_NOT_ALLOWED
    )


# -- helpers on the policy --------------------------------------------------------


def test_is_internal_and_zone_of(policy: Policy) -> None:
    p = ipaddress.ip_address
    assert policy.is_internal(p("10.20.1.1").packed)
    assert policy.is_internal(p("192.168.0.1").packed)  # default internal networks
    assert policy.is_internal(p("fe80::1").packed)
    assert not policy.is_internal(p("8.8.8.8").packed)
    assert policy.zone_of(p("10.20.1.1").packed) == "customer-data"
    assert policy.zone_of(p("10.20.99.1").packed) == "customer-data"  # first zone wins
    assert policy.zone_of(p("10.30.1.1").packed) == "corp"
    assert policy.zone_of(p("fd00:20::1").packed) == "customer-data"
    assert policy.zone_of(p("::ffff:10.40.0.1").packed) == "dev"
    assert policy.zone_of(p("10.99.0.1").packed) is None


def test_zone_order_follows_the_file() -> None:
    pol = load(
        """\
        home_countries: [CN]
        zones:
          narrow-later: [10.0.0.0/8]
          wide: [10.1.0.0/16]
        """
    )
    assert pol.zone_of(bytes([10, 1, 0, 1])) == "narrow-later"


def test_auto_internal_networks_and_resolve() -> None:
    pol = load("home_countries: [cn]\ninternal_networks: [auto, 10.0.0.0/8]\n")
    assert pol.home_countries == frozenset({"CN"})
    assert pol.internal_auto is True
    assert [str(n) for n in pol.internal_networks] == ["10.0.0.0/8"]
    assert not pol.is_internal(bytes([198, 51, 100, 1]))
    resolved = pol.resolve_auto(["198.51.100.0/24", "2001:db8:1::/48"])
    assert resolved.internal_auto is False
    assert resolved.is_internal(bytes([198, 51, 100, 1]))
    assert resolved.is_internal(bytes([10, 0, 0, 1]))
    assert not pol.is_internal(bytes([198, 51, 100, 1]))  # the original is unchanged
    assert resolved.sha256 == pol.sha256


def test_policy_built_in_code() -> None:
    pol = Policy(
        home_countries=["cn"],
        zones={"z": ["10.1.0.0/16"]},
        routes=[Route("r", "APP", countries=frozenset({"US"}), from_zones=("z",))],
        now=NOW,
    )
    assert pol.evaluate(flow(internal="10.1.2.3"), GeoInfo("US"), None) == Verdict(
        APPROVED, "r", "APP"
    )
    assert pol.warnings == []
    with pytest.raises(ValueError, match="unknown zone 'nope'"):
        Policy(home_countries=["CN"], routes=[Route("r", "A", from_zones=("nope",))])
    with pytest.raises(ValueError, match="home country"):
        Policy(home_countries=[])


def test_merge_port_ranges_and_ns_to_text() -> None:
    assert merge_port_ranges([(8000, 8100), (443, 443), (444, 450), (8050, 8200)]) == (
        (443, 450),
        (8000, 8200),
    )
    assert ns_to_text(T_2027) == "2027-01-01"
    assert ns_to_text(T_2027 + 90 * SEC) == "2027-01-01T00:01:30Z"


# -- warnings -----------------------------------------------------------------------

ROUTE = """\
  - name: {name}
    approval: X
{body}"""


def policy_with_routes(*routes: tuple[str, str], now: datetime = NOW) -> Policy:
    text = "home_countries: [CN]\nzones:\n  a: [10.1.0.0/16]\n  b: [10.2.0.0/16]\nroutes:\n"
    for name, body in routes:
        text += ROUTE.format(name=name, body=textwrap.indent(textwrap.dedent(body), "    "))
    return load(text, now=now)


def test_warning_for_a_shadowed_route() -> None:
    pol = policy_with_routes(
        ("wide", "to: {countries: [HK, SG], asns: [1]}\n"),
        (
            "narrow",
            """\
            from: [a]
            to: {countries: [HK]}
            protocols: [tcp]
            ports: ["443-444"]
            expires: 2030-01-01
            """,
        ),
    )
    assert pol.warnings == [
        "policy.yaml:9: routes[1] ('narrow'): shadowed by routes[0] ('wide'): every flow "
        "it approves is approved by that earlier route first, so it never applies"
    ]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("to: {countries: [HK]}\n", "to: {countries: [HK, SG]}\n"),
        ("to: {countries: [HK]}\n", "to: {countries: [HK], asns: [1]}\n"),
        ("to: {networks: [10.9.0.0/16]}\n", "to: {networks: [10.0.0.0/8]}\n"),
        ("from: [a]\nto: {countries: [HK]}\n", "to: {countries: [HK]}\n"),
        ("from: [a]\nto: {countries: [HK]}\n", "from: [b]\nto: {countries: [HK]}\n"),
        ("to: {countries: [HK]}\nprotocols: [tcp]\n", "to: {countries: [HK]}\n"),
        ("to: {countries: [HK]}\nprotocols: [tcp]\n", "to: {countries: [HK]}\nprotocols: [udp]\n"),
        ("to: {countries: [HK]}\nports: [443]\n", "to: {countries: [HK]}\nports: ['443-444']\n"),
        ("to: {countries: [HK]}\nports: [443]\n", "to: {countries: [HK]}\n"),
        ("to: {countries: [HK]}\nexpires: 2030-01-01\n", "to: {countries: [HK]}\n"),
        (
            "to: {countries: [HK]}\nexpires: 2030-01-01\n",
            "to: {countries: [HK]}\nexpires: 2031-01-01\n",
        ),
    ],
)
def test_no_warning_when_the_later_route_reaches_further(first: str, second: str) -> None:
    assert policy_with_routes(("first", first), ("second", second)).warnings == []


def test_shadow_by_network_containment_and_zone_cidr() -> None:
    pol = policy_with_routes(
        ("wide", "from: [a, 10.3.0.0/16]\nto: {networks: [10.0.0.0/8, 'fd00::/8']}\n"),
        ("narrow", "from: [10.1.2.0/24, 10.3.0.0/24]\nto: {networks: ['fd00:1::/32']}\n"),
    )
    assert len(pol.warnings) == 1
    assert "routes[1] ('narrow'): shadowed by routes[0] ('wide')" in pol.warnings[0]


def test_warning_for_an_expired_route() -> None:
    text = BASE.replace("2027-01-01", "2025-12-31T16:00:00Z")
    pol = load(text, now=NOW)
    assert pol.warnings == [
        "policy.yaml:7: routes[0] ('hk-backup'): expired at 2025-12-31T16:00:00Z; "
        "it approves only flows first seen before then"
    ]
    # Expiring exactly now counts as expired; a moment later does not.
    assert (
        load(BASE.replace("2027-01-01", "2026-01-01"), now=NOW)
        .warnings[0]
        .endswith("expired at 2026-01-01; it approves only flows first seen before then")
    )
    assert load(BASE.replace("2027-01-01", "2026-01-01T00:00:01Z"), now=NOW).warnings == []


def test_warning_for_a_zone_outside_the_internal_networks() -> None:
    text = (
        "home_countries: [CN]\ninternal_networks: [10.0.0.0/8]\n"
        "zones:\n  z: [10.1.0.0/16, 192.0.2.0/24]\n"
    )
    assert load(text).warnings == [
        "policy.yaml: zones.z: '192.0.2.0/24' is not inside internal_networks: its "
        "addresses count as remote, not as this zone"
    ]
    assert load(text.replace("[10.0.0.0/8]", "[10.0.0.0/8, auto]")).warnings == []


# -- the fast evaluator agrees with a plain reading of the rules -------------------

_COUNTRIES = ["CN", "HK", "US", "SG"]
_NETS = ["10.1.0.0/16", "10.2.0.0/16", "203.0.113.0/24", "2001:db8::/32", "fd00:1::/32"]
_INTERNAL = ["10.1.0.5", "10.2.0.5", "10.3.0.5", "fd00:1::5", "::ffff:10.1.0.6"]
_REMOTE = ["203.0.113.9", "198.51.100.1", "2001:db8::9", "2001:db9::1", "::ffff:203.0.113.10"]


@st.composite
def routes(draw: st.DrawFn) -> Route:
    def some(items: list[str], min_size: int = 0) -> list[str]:
        return draw(st.lists(st.sampled_from(items), min_size=min_size, max_size=2, unique=True))

    countries = some(_COUNTRIES)
    nets = some(_NETS)
    asns = draw(st.lists(st.sampled_from([1, 2, 3]), max_size=2, unique=True))
    if not (countries or nets or asns):
        countries = ["US"]
    ports = draw(
        st.none()
        | st.lists(
            st.tuples(st.integers(1, 600), st.integers(0, 100)).map(lambda t: (t[0], t[0] + t[1])),
            min_size=1,
            max_size=3,
        )
    )
    return Route(
        name=f"r{draw(st.integers(0, 10**6))}",
        approval="APP",
        countries=frozenset(countries),
        networks=tuple(ipaddress.ip_network(n) for n in nets),
        asns=frozenset(asns),
        from_zones=tuple(some(["a", "b"])),
        from_networks=tuple(ipaddress.ip_network(n) for n in some(_NETS[:2])),
        protocols=draw(st.none() | st.frozensets(st.sampled_from([1, 6, 17]), min_size=1)),
        ports=None if ports is None else tuple(ports),
        expires_ns=draw(st.none() | st.integers(0, 100)),
    )


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _in_any(text: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = _addr(text)
    return any(addr.version == n.version and addr in n for n in nets)


def reference(pol: Policy, ep: FlowEndpoints, geo: GeoInfo) -> Verdict:
    """The rules as written in docs/configuration.md, slowly."""
    if geo.country in pol.home_countries:
        return Verdict(VerdictKind.DOMESTIC)
    failures: list[tuple[str, Reason]] = []
    for r in pol.routes:
        assert ep.remote_ip is not None and ep.internal_ip is not None
        dest = (
            (geo.country is not None and geo.country in r.countries)
            or (geo.asn in r.asns)
            or _in_any(ep.remote_ip, list(r.networks))
        )
        if not dest:
            continue
        sources = [n for z in r.from_zones for n in pol.zones[z]] + list(r.from_networks)
        problems = []
        if sources and not _in_any(ep.internal_ip, sources):
            problems.append(Reason.ZONE_NOT_ALLOWED)
        if r.protocols is not None and ep.proto not in r.protocols:
            problems.append(Reason.PROTOCOL_NOT_ALLOWED)
        if r.ports is not None and not any(
            ep.service_port is not None and lo <= ep.service_port <= hi for lo, hi in r.ports
        ):
            problems.append(Reason.PORT_NOT_ALLOWED)
        if r.expires_ns is not None and ep.first_seen_ns >= r.expires_ns:
            problems.append(Reason.ROUTE_EXPIRED)
        if not problems:
            return Verdict(APPROVED, r.name, r.approval)
        failures.append((r.name, problems[0]))
    if geo.country is None:
        return {
            UnknownCountry.UNKNOWN: Verdict(VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY),
            UnknownCountry.VIOLATION: Verdict(VIOLATION, reason=Reason.NO_COUNTRY),
            UnknownCountry.ALLOW: Verdict(APPROVED),
        }[pol.unknown_country]
    if failures:
        return Verdict(VIOLATION, failures[0][0], reason=failures[0][1])
    return Verdict(VIOLATION, reason=Reason.NO_ROUTE)


@settings(max_examples=300, deadline=None)
@given(
    route_list=st.lists(routes(), max_size=5),
    mode=st.sampled_from(list(UnknownCountry)),
    flows=st.lists(
        st.tuples(
            st.sampled_from(_INTERNAL),
            st.sampled_from(_REMOTE),
            st.sampled_from([1, 6, 17, 47]),
            st.none() | st.integers(1, 700),
            st.integers(0, 110),
            st.sampled_from([None, *_COUNTRIES]),
            st.sampled_from([None, 1, 2, 3, 4]),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_evaluate_agrees_with_reference(
    route_list: list[Route],
    mode: UnknownCountry,
    flows: list[tuple[str, str, int, int | None, int, str | None, int | None]],
) -> None:
    pol = Policy(
        home_countries=["CN"],
        zones={"a": ["10.1.0.0/16", "fd00:1::/32"], "b": ["10.2.0.0/16"]},
        unknown_country=mode,
        routes=route_list,
        now=NOW,
    )
    for internal, remote, proto, port, seen, country, asn in flows:
        ep = FlowEndpoints(proto, internal, remote, port, seen)
        geo = GeoInfo(country, asn=asn)
        assert pol.evaluate(ep, geo, None) == reference(pol, ep, geo)


# -- routes by server name ----------------------------------------------------------

NAMES = """\
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16]
  corp: [10.30.0.0/16]
routes:
  - name: vendor-backup
    approval: CAC-2026-7
    from: [customer-data]
    to:
      countries: [HK]
      names: [backup.vendor.example, "*.files.vendor.example"]
    protocols: [tcp]
    ports: [443]
  - name: cdn-anywhere
    approval: DPA-9
    to:
      names: [static.cdn.example]
"""
HK = GeoInfo("HK", "HK")
US = GeoInfo("US", "US")


def named(names: tuple[str, ...], *, internal: str = "10.20.1.1", proto: int = PROTO_TCP,
          port: int = 443) -> FlowEndpoints:
    return FlowEndpoints(proto, internal, "198.51.100.7", port, T_2026, names)


@pytest.mark.parametrize(
    ("ep", "geo", "expected"),
    [
        # Name and location match.
        (named(("backup.vendor.example",)), HK,
         Verdict(APPROVED, "vendor-backup", "CAC-2026-7")),
        # A wildcard stands for one label or more, never for the domain itself.
        (named(("eu.files.vendor.example",)), HK,
         Verdict(APPROVED, "vendor-backup", "CAC-2026-7")),
        (named(("a.b.files.vendor.example",)), HK,
         Verdict(APPROVED, "vendor-backup", "CAC-2026-7")),
        (named(("files.vendor.example",)), HK,
         Verdict(VIOLATION, "vendor-backup", reason=Reason.NAME_NOT_ALLOWED)),
        # Any name of the CNAME chain may match.
        (named(("api.customer.example", "backup.vendor.example")), HK,
         Verdict(APPROVED, "vendor-backup", "CAC-2026-7")),
        # A known name the route does not list; no name at all.
        (named(("evil.example",)), HK,
         Verdict(VIOLATION, "vendor-backup", reason=Reason.NAME_NOT_ALLOWED)),
        (named(()), HK, Verdict(VIOLATION, "vendor-backup", reason=Reason.NAME_UNKNOWN)),
        # The right name in the wrong country: the located route does not match; the
        # names-only route is the first whose location (anywhere) matched.
        (named(("backup.vendor.example",)), US,
         Verdict(VIOLATION, "cdn-anywhere", reason=Reason.NAME_NOT_ALLOWED)),
        # Order of reasons: zone before name, name before protocol and port.
        (named((), internal="10.30.1.1"), HK,
         Verdict(VIOLATION, "vendor-backup", reason=Reason.ZONE_NOT_ALLOWED)),
        (named(("evil.example",), proto=PROTO_UDP), HK,
         Verdict(VIOLATION, "vendor-backup", reason=Reason.NAME_NOT_ALLOWED)),
        (named(("backup.vendor.example",), port=22), HK,
         Verdict(VIOLATION, "vendor-backup", reason=Reason.PORT_NOT_ALLOWED)),
        # A names-only route approves its names in any country ...
        (named(("static.cdn.example",), internal="10.30.1.1"), US,
         Verdict(APPROVED, "cdn-anywhere", "DPA-9")),
        # ... and it is the first route whose (any) location matched for other names.
        (named(("evil.example",), internal="10.30.1.1"), US,
         Verdict(VIOLATION, "cdn-anywhere", reason=Reason.NAME_NOT_ALLOWED)),
        (named((), internal="10.30.1.1"), US,
         Verdict(VIOLATION, "cdn-anywhere", reason=Reason.NAME_UNKNOWN)),
        # Home countries come before every route.
        (named(("evil.example",)), GeoInfo("CN", "CN"), Verdict(VerdictKind.DOMESTIC)),
    ],
)
def test_routes_by_name(ep: FlowEndpoints, geo: GeoInfo, expected: Verdict) -> None:
    assert load(NAMES).evaluate(ep, geo, None) == expected


def test_right_name_in_a_country_no_route_lists() -> None:
    pol = load(NAMES.split("  - name: cdn-anywhere")[0])
    assert pol.evaluate(named(("backup.vendor.example",)), US, None) == Verdict(
        VIOLATION, reason=Reason.NO_ROUTE)


def test_route_names_are_normalized_and_names_only_routes_warn() -> None:
    pol = load(NAMES.replace("backup.vendor.example", "Backup.Vendor.Example."))
    assert pol.routes[0].names == ("backup.vendor.example", "*.files.vendor.example")
    assert pol.warnings == [
        "policy.yaml:14: routes[1] ('cdn-anywhere'): lists names but no countries, networks "
        "or ASNs: it approves those names wherever they resolve, in any country"
    ]


@pytest.mark.parametrize(
    ("first", "second", "shadowed"),
    [
        ("to: {countries: [HK], names: ['*.v.example']}\n",
         "to: {countries: [HK], names: [a.v.example, '*.x.v.example']}\n", True),
        ("to: {countries: [HK]}\n", "to: {countries: [HK], names: [a.v.example]}\n", True),
        ("to: {names: ['*.v.example']}\n", "to: {countries: [HK], names: [a.v.example]}\n", True),
        # An exact name does not cover a wildcard; a wildcard not its own domain.
        ("to: {countries: [HK], names: [a.v.example]}\n",
         "to: {countries: [HK], names: ['*.a.v.example']}\n", False),
        ("to: {countries: [HK], names: ['*.v.example']}\n",
         "to: {countries: [HK], names: [v.example]}\n", False),
        # A route with names does not cover one without; a located one not a names-only one.
        ("to: {countries: [HK], names: [a.v.example]}\n", "to: {countries: [HK]}\n", False),
        ("to: {countries: [HK], names: [a.v.example]}\n", "to: {names: [a.v.example]}\n", False),
    ],
)
def test_shadowing_with_names(first: str, second: str, shadowed: bool) -> None:
    pol = policy_with_routes(("first", first), ("second", second))
    found = [w for w in pol.warnings if "shadowed by" in w]
    assert bool(found) is shadowed, pol.warnings
