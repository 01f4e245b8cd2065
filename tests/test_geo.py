"""Tests for egressd.geo: MaxMind and registry resolvers, the cache, reloads.

Most tests use small databases built here (see mmdb_builder).  Tests marked
``shared`` read MaxMind's own test databases from the shared reference folder
beside the checkout (``../shared/geoip``, or ``$EGRESSD_SHARED_DIR/geoip``) and
are skipped when it is absent.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import maxminddb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mmdb_builder import build_mmdb

from egressd.geo import (
    REGISTRY_NOTICE,
    CachedResolver,
    CompositeResolver,
    MaxMindResolver,
    RegistryResolver,
    Resolver,
    open_resolver,
)
from egressd.model import GeoInfo, GeoSource

# ---------------------------------------------------------------------------
# Self-built databases
# ---------------------------------------------------------------------------

COUNTRY_RECORDS: dict[str, dict[str, Any]] = {
    "81.2.69.0/24": {
        "country": {"iso_code": "GB"},
        "registered_country": {"iso_code": "US"},
    },
    # More specific than the /24 above: must win whatever the insertion order.
    "81.2.69.128/25": {
        "country": {"iso_code": "IE"},
        "registered_country": {"iso_code": "IE"},
    },
    "175.16.199.0/24": {
        "country": {"iso_code": "CN"},
        "registered_country": {"iso_code": "CN"},
    },
    "203.198.0.0/16": {
        "country": {"iso_code": "HK"},
        "registered_country": {"iso_code": "HK"},
    },
    # Anycast: a country in the record must not be reported as the location.
    "214.1.1.0/24": {
        "country": {"iso_code": "US"},
        "registered_country": {"iso_code": "US"},
        "traits": {"is_anycast": True},
    },
    # A record with a registered country but no location.
    "192.0.2.0/24": {"registered_country": {"iso_code": "DE"}},
    "2001:250::/31": {
        "country": {"iso_code": "CN"},
        "registered_country": {"iso_code": "CN"},
    },
    "2a02:d000::/29": {
        "country": {"iso_code": "CH"},
        "registered_country": {"iso_code": "CH"},
    },
}

ASN_RECORDS: dict[str, dict[str, Any]] = {
    "81.2.0.0/16": {
        "autonomous_system_number": 2856,
        "autonomous_system_organization": "BTnet UK Regional network",
    },
    "175.16.0.0/16": {
        "autonomous_system_number": 4134,
        "autonomous_system_organization": "Chinanet",
    },
    # Organization absent, as in some MaxMind records.
    "67.43.152.0/21": {"autonomous_system_number": 35908},
    "240e::/24": {
        "autonomous_system_number": 4134,
        "autonomous_system_organization": "Chinanet",
    },
}

WRONG_AS_COUNTRY = (
    "database type is 'GeoLite2-ASN', expected a Country, City or Enterprise database "
    "(GeoIP2/GeoLite2)"
)
WRONG_AS_ASN = "database type is '{}', expected an ASN database (GeoLite2-ASN)"


@pytest.fixture(scope="module")
def dbdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("geo")


@pytest.fixture(scope="module")
def country_db(dbdir: Path) -> Path:
    return build_mmdb(dbdir / "country.mmdb", "GeoLite2-Country", COUNTRY_RECORDS)


@pytest.fixture(scope="module")
def asn_db(dbdir: Path) -> Path:
    return build_mmdb(dbdir / "asn.mmdb", "GeoLite2-ASN", ASN_RECORDS)


@pytest.fixture(scope="module")
def country_v4_db(dbdir: Path) -> Path:
    v4_only = {net: rec for net, rec in COUNTRY_RECORDS.items() if ":" not in net}
    return build_mmdb(dbdir / "country4.mmdb", "GeoLite2-Country", v4_only, ip_version=4)


@pytest.fixture(scope="module")
def maxmind(country_db: Path, asn_db: Path) -> Iterator[MaxMindResolver]:
    with MaxMindResolver(country_db, asn_db) as r:
        yield r


@pytest.fixture(scope="module")
def maxmind_v4(country_v4_db: Path) -> Iterator[MaxMindResolver]:
    with MaxMindResolver(country_v4_db) as r:
        yield r


@pytest.fixture(scope="module")
def registry() -> RegistryResolver:
    return RegistryResolver()


# ---------------------------------------------------------------------------
# The test database builder itself
# ---------------------------------------------------------------------------


def test_builder_ipv4_in_ipv6_tree_found_by_ipv4_lookup(country_db: Path) -> None:
    with maxminddb.open_database(country_db) as reader:
        assert reader.metadata().ip_version == 6
        assert reader.metadata().database_type == "GeoLite2-Country"
        rec = reader.get("81.2.69.1")
        assert isinstance(rec, dict)
        assert rec["country"] == {"iso_code": "GB"}
        # No aliases in self-built files: the resolver has to map these itself.
        assert reader.get("::ffff:81.2.69.1") is None
        assert reader.get("2002:5102:4501::") is None


def test_builder_more_specific_network_wins(tmp_path: Path) -> None:
    for order in (["10.0.0.0/8", "10.1.2.0/24"], ["10.1.2.0/24", "10.0.0.0/8"]):
        recs = {
            net: {"country": {"iso_code": "AA" if net.endswith("/8") else "BB"}} for net in order
        }
        path = build_mmdb(tmp_path / "o.mmdb", "GeoLite2-Country", recs)
        with MaxMindResolver(path) as r:
            assert r.lookup("10.1.2.3").country == "BB"
            assert r.lookup("10.1.3.3").country == "AA"


# ---------------------------------------------------------------------------
# MaxMindResolver: answers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("81.2.69.1", GeoInfo("GB", "US", 2856, "BTnet UK Regional network")),
        ("81.2.69.200", GeoInfo("IE", "IE", 2856, "BTnet UK Regional network")),
        ("175.16.199.1", GeoInfo("CN", "CN", 4134, "Chinanet")),
        ("203.198.7.7", GeoInfo("HK", "HK")),
        ("214.1.1.1", GeoInfo(None, "US")),  # anycast: no location
        ("192.0.2.10", GeoInfo(None, "DE")),  # no country in the record
        ("67.43.156.1", GeoInfo(None, None, 35908, None)),  # ASN only, no organization
        ("2001:250::1", GeoInfo("CN", "CN")),
        ("2001:251:ffff::1", GeoInfo("CN", "CN")),
        ("2a02:d000::1", GeoInfo("CH", "CH")),
        ("240e::1", GeoInfo(None, None, 4134, "Chinanet")),
    ],
)
def test_maxmind_answers(maxmind: MaxMindResolver, ip: str, expected: GeoInfo) -> None:
    assert maxmind.lookup(ip) == expected


@pytest.mark.parametrize(
    "ip",
    ["1.1.1.1", "8.8.8.8", "10.0.0.1", "127.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "::",
     "fe80::1", "fe80::1%eth0", "2001:db8::1"],
)  # fmt: skip
def test_maxmind_not_found(maxmind: MaxMindResolver, ip: str) -> None:
    assert maxmind.lookup(ip) == GeoInfo()


@pytest.mark.parametrize(
    "ip",
    [
        "::ffff:81.2.69.1",  # IPv4-mapped
        "::FFFF:5102:4501",  # IPv4-mapped, hex and upper case
        "::81.2.69.1",  # IPv4-compatible (deprecated)
        "2002:5102:4501::",  # 6to4
        "2002:5102:4501:1234::99",
        "64:ff9b::81.2.69.1",  # NAT64 well-known prefix
    ],
)
def test_embedded_ipv4_forms(
    maxmind: MaxMindResolver, maxmind_v4: MaxMindResolver, ip: str
) -> None:
    expected = GeoInfo("GB", "US", 2856, "BTnet UK Regional network")
    assert maxmind.lookup(ip) == expected
    # Works on an IPv4-only database too (which cannot take IPv6 queries at all).
    assert maxmind_v4.lookup(ip) == GeoInfo("GB", "US")


def test_ipv4_only_database_ipv6_address_not_found(maxmind_v4: MaxMindResolver) -> None:
    assert maxmind_v4.lookup("2001:250::1") == GeoInfo()
    assert maxmind_v4.lookup("::1") == GeoInfo()
    assert maxmind_v4.lookup("175.16.199.1") == GeoInfo("CN", "CN")


@pytest.mark.parametrize(
    "bad",
    ["", "garbage", "1.2.3", "01.2.3.4", "0x7f.0.0.1", "1.2.3.4 ", " 1.2.3.4", "256.1.1.1",
     "1.2.3.4/32", "::g", "1:2:3:4:5:6:7:8:9", "1.2.3.4\x00", "%eth0"],
)  # fmt: skip
def test_invalid_address_raises(
    maxmind: MaxMindResolver, registry: RegistryResolver, bad: str
) -> None:
    # Some readers accept "1.2.3" or octal parts and look up another address:
    # the resolvers refuse them.
    with pytest.raises(ValueError, match="not an IP address"):
        maxmind.lookup(bad)
    with pytest.raises(ValueError, match="not an IP address"):
        registry.lookup(bad)
    cached = CachedResolver(registry, 4)
    with pytest.raises(ValueError, match="not an IP address"):
        cached.lookup(bad)
    assert len(cached) == 0


def test_sources(maxmind: MaxMindResolver, country_db: Path, asn_db: Path) -> None:
    sources = maxmind.sources()
    assert [(s.source, s.path, s.database_type) for s in sources] == [
        ("maxmind", str(country_db), "GeoLite2-Country"),
        ("maxmind", str(asn_db), "GeoLite2-ASN"),
    ]
    for s in sources:
        assert isinstance(s, GeoSource)
        assert isinstance(s.build_epoch, int) and s.build_epoch > 1_600_000_000


def test_country_only_and_asn_only(country_db: Path, asn_db: Path) -> None:
    with MaxMindResolver(country_db) as r:
        assert r.lookup("81.2.69.1") == GeoInfo("GB", "US")
        assert len(r.sources()) == 1
    with MaxMindResolver(None, asn_db) as r:
        assert r.lookup("81.2.69.1") == GeoInfo(None, None, 2856, "BTnet UK Regional network")
        assert [s.database_type for s in r.sources()] == ["GeoLite2-ASN"]
    with pytest.raises(ValueError, match="needs a country database"):
        MaxMindResolver(None, None)


@pytest.mark.parametrize("dbtype", ["GeoIP2-City", "GeoLite2-City", "GeoIP2-Enterprise",
                                    "GeoIP2-Country", "DBIP-Country-Lite"])  # fmt: skip
def test_country_database_types_accepted(tmp_path: Path, dbtype: str) -> None:
    path = build_mmdb(
        tmp_path / "c.mmdb", dbtype, {"81.2.69.0/24": COUNTRY_RECORDS["81.2.69.0/24"]}
    )
    with MaxMindResolver(path) as r:
        assert r.lookup("81.2.69.1").country == "GB"
        assert r.sources()[0].database_type == dbtype


# ---------------------------------------------------------------------------
# MaxMindResolver: errors on open
# ---------------------------------------------------------------------------


def test_asn_file_as_country_db(asn_db: Path) -> None:
    with pytest.raises(ValueError) as exc:
        MaxMindResolver(asn_db)
    assert str(exc.value) == f"{asn_db}: {WRONG_AS_COUNTRY}"


def test_country_file_as_asn_db(country_db: Path) -> None:
    with pytest.raises(ValueError) as exc:
        MaxMindResolver(country_db, country_db)
    assert str(exc.value) == f"{country_db}: " + WRONG_AS_ASN.format("GeoLite2-Country")


def test_other_database_type_rejected(tmp_path: Path) -> None:
    path = build_mmdb(
        tmp_path / "anon.mmdb", "GeoIP2-Anonymous-IP", {"1.2.3.0/24": {"is_vpn": True}}
    )
    with pytest.raises(ValueError, match=r"database type is 'GeoIP2-Anonymous-IP', expected a"):
        MaxMindResolver(path)
    with pytest.raises(ValueError, match=r"expected an ASN database"):
        MaxMindResolver(None, path)


@pytest.mark.parametrize("content", [b"", b"not a database\n" * 100, b"\xab\xcd\xefMaxMind.com"])
def test_not_an_mmdb_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.mmdb"
    path.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        MaxMindResolver(path)
    assert str(exc.value) == f"{path}: not a MaxMind database (.mmdb) file"
    assert exc.value.__cause__ is not None


def test_missing_file(tmp_path: Path, country_db: Path) -> None:
    missing = tmp_path / "nope" / "GeoLite2-Country.mmdb"
    with pytest.raises(FileNotFoundError) as exc:
        MaxMindResolver(missing)
    assert exc.value.filename == str(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(FileNotFoundError, match="ASN database not found"):
        MaxMindResolver(country_db, missing)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as exc:
        MaxMindResolver(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_close(country_db: Path) -> None:
    r = MaxMindResolver(country_db)
    r.close()
    r.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        r.lookup("81.2.69.1")
    assert r.sources() == []


# ---------------------------------------------------------------------------
# MaxMindResolver: reload after the file is replaced
# ---------------------------------------------------------------------------


def _replace_with_db(path: Path, dbtype: str, records: dict[str, dict[str, Any]]) -> None:
    """Put a new database in place the way geoipupdate does: write beside, rename over."""
    tmp = build_mmdb(path.with_suffix(".tmp"), dbtype, records)
    os.replace(tmp, path)


def _replace_with_bytes(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


GB: dict[str, dict[str, Any]] = {
    "81.2.69.0/24": {"country": {"iso_code": "GB"}, "registered_country": {"iso_code": "GB"}}
}
FR: dict[str, dict[str, Any]] = {
    "81.2.69.0/24": {"country": {"iso_code": "FR"}, "registered_country": {"iso_code": "FR"}}
}
NL: dict[str, dict[str, Any]] = {
    "81.2.69.0/24": {"country": {"iso_code": "NL"}, "registered_country": {"iso_code": "NL"}}
}
AS1: dict[str, dict[str, Any]] = {
    "81.2.0.0/16": {"autonomous_system_number": 1, "autonomous_system_organization": "One"}
}
AS2: dict[str, dict[str, Any]] = {
    "81.2.0.0/16": {"autonomous_system_number": 2, "autonomous_system_organization": "Two"}
}


def test_reload_after_atomic_replace(tmp_path: Path) -> None:
    cpath = build_mmdb(tmp_path / "c.mmdb", "GeoLite2-Country", GB)
    apath = build_mmdb(tmp_path / "a.mmdb", "GeoLite2-ASN", AS1)
    with MaxMindResolver(cpath, apath) as r:
        assert r.reload_if_changed() is False
        assert r.lookup("81.2.69.1") == GeoInfo("GB", "GB", 1, "One")

        _replace_with_db(cpath, "GeoLite2-Country", FR)
        assert r.reload_if_changed() is True
        assert r.lookup("81.2.69.1") == GeoInfo("FR", "FR", 1, "One")
        assert r.reload_if_changed() is False

        _replace_with_db(apath, "GeoLite2-ASN", AS2)
        assert r.reload_if_changed() is True
        assert r.lookup("81.2.69.1") == GeoInfo("FR", "FR", 2, "Two")


def test_bad_replacement_keeps_old_answers(tmp_path: Path) -> None:
    cpath = build_mmdb(tmp_path / "c.mmdb", "GeoLite2-Country", GB)
    apath = build_mmdb(tmp_path / "a.mmdb", "GeoLite2-ASN", AS1)
    before = GeoInfo("GB", "GB", 1, "One")
    with MaxMindResolver(cpath, apath) as r:
        # Cut short / not a database.
        _replace_with_bytes(cpath, b"\x00" * 64)
        with pytest.raises(ValueError, match="not a MaxMind database") as exc:
            r.reload_if_changed()
        assert str(cpath) in str(exc.value)
        assert any("stay in use" in note for note in exc.value.__notes__)
        assert r.lookup("81.2.69.1") == before
        # Still failing on the next try (nothing was recorded as loaded).
        with pytest.raises(ValueError, match="not a MaxMind database"):
            r.reload_if_changed()

        # Wrong type in place of the country database.
        _replace_with_db(cpath, "GeoLite2-ASN", AS2)
        with pytest.raises(ValueError, match="database type is 'GeoLite2-ASN'"):
            r.reload_if_changed()
        assert r.lookup("81.2.69.1") == before

        # All or nothing: a good country file with a bad ASN file loads neither.
        _replace_with_db(cpath, "GeoLite2-Country", FR)
        _replace_with_bytes(apath, b"junk")
        with pytest.raises(ValueError, match="not a MaxMind database"):
            r.reload_if_changed()
        assert r.lookup("81.2.69.1") == before

        # The file gone.
        apath.unlink()
        with pytest.raises(FileNotFoundError, match="ASN database not found"):
            r.reload_if_changed()
        assert r.lookup("81.2.69.1") == before

        # Both good again: both switch.
        _replace_with_db(apath, "GeoLite2-ASN", AS2)
        assert r.reload_if_changed() is True
        assert r.lookup("81.2.69.1") == GeoInfo("FR", "FR", 2, "Two")


def test_cached_resolver_reload_clears_cache(tmp_path: Path) -> None:
    cpath = build_mmdb(tmp_path / "c.mmdb", "GeoLite2-Country", GB)
    cached = open_resolver(str(cpath), None, cache_size=16)
    try:
        assert cached.lookup("81.2.69.1").country == "GB"
        assert cached.reload_if_changed() is False
        assert len(cached) == 1

        _replace_with_bytes(cpath, b"junk")
        with pytest.raises(ValueError):
            cached.reload_if_changed()
        assert len(cached) == 1  # old databases still in use: their answers stay
        assert cached.lookup("81.2.69.1").country == "GB"

        _replace_with_db(cpath, "GeoLite2-Country", NL)
        assert cached.reload_if_changed() is True
        assert len(cached) == 0
        assert cached.lookup("81.2.69.1").country == "NL"
    finally:
        cached.close()


# ---------------------------------------------------------------------------
# CachedResolver
# ---------------------------------------------------------------------------


class CountingResolver:
    """A fake inner resolver that answers from the address and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def lookup(self, ip: str) -> GeoInfo:
        self.calls += 1
        ipaddress.ip_address(ip)
        return GeoInfo("ZZ", None, len(ip), ip)

    def sources(self) -> list[GeoSource]:
        return [GeoSource("fake", None, "counting", None)]


def _ips(n: int, start: int = 0) -> list[str]:
    return [str(ipaddress.IPv4Address(0x0A000000 + start + i)) for i in range(n)]


def test_cache_is_bounded() -> None:
    inner = CountingResolver()
    cached = CachedResolver(inner, maxsize=100)
    for ip in _ips(300):
        assert cached.lookup(ip).as_org == ip
        assert len(cached) <= 100
    assert len(cached) == 100
    assert (cached.misses, cached.hits, cached.evictions) == (300, 0, 200)
    assert inner.calls == 300


def test_cache_hits_and_lru_order() -> None:
    inner = CountingResolver()
    cached = CachedResolver(inner, maxsize=3)
    a, b, c, d = _ips(4)
    for ip in (a, b, c):
        cached.lookup(ip)
    assert cached.lookup(a) == GeoInfo("ZZ", None, len(a), a)  # hit; a is now most recent
    assert (cached.hits, cached.misses, inner.calls) == (1, 3, 3)
    cached.lookup(d)  # evicts b, the least recently used
    assert cached.evictions == 1
    cached.lookup(a)
    cached.lookup(c)
    assert (cached.hits, inner.calls) == (3, 4)
    cached.lookup(b)
    assert (cached.misses, inner.calls) == (5, 5)


def test_cache_clear_and_sources() -> None:
    inner = CountingResolver()
    cached = CachedResolver(inner, maxsize=10)
    for ip in _ips(5):
        cached.lookup(ip)
    cached.clear()
    assert len(cached) == 0
    assert cached.misses == 5  # counters keep counting across clears
    cached.lookup(_ips(1)[0])
    assert (cached.misses, inner.calls) == (6, 6)
    assert cached.sources() == inner.sources()
    assert cached.inner is inner and cached.maxsize == 10
    assert cached.reload_if_changed() is False  # inner has no reload: nothing to do
    cached.close()


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CachedResolver(CountingResolver(), 0)


# ---------------------------------------------------------------------------
# RegistryResolver (embedded iptocc data)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "cc"),
    [
        ("8.8.8.8", "US"),
        ("114.114.114.114", "CN"),
        ("203.198.0.1", "HK"),  # HK block (203.198.0.0/16)
        ("223.255.128.1", "HK"),
        ("2001:250::1", "CN"),
        ("240e::1", "CN"),
        ("2001:4860:4860::8888", "US"),
        # Registered in AU at APNIC, used world-wide (anycast): a registry
        # country, not a location.
        ("1.1.1.1", "AU"),
        ("::ffff:8.8.8.8", "US"),
        ("::ffff:114.114.114.114", "CN"),
        ("2002:7272:7272::1", "CN"),  # 6to4 of 114.114.114.114
    ],
)
def test_registry_answers(registry: RegistryResolver, ip: str, cc: str) -> None:
    assert registry.lookup(ip) == GeoInfo(cc, cc, None, None)


@pytest.mark.parametrize("ip", ["10.0.0.1", "127.0.0.1", "192.168.1.1", "::1", "fe80::1%eth0"])
def test_registry_private_not_found(registry: RegistryResolver, ip: str) -> None:
    assert registry.lookup(ip) == GeoInfo()


def test_registry_sources(registry: RegistryResolver) -> None:
    version = importlib.metadata.version("iptocc")
    assert registry.sources() == [
        GeoSource(
            "iptocc", None, f"iptocc registry country (RIR delegated statistics) {version}", None
        )
    ]
    assert registry.reload_if_changed() is False


def test_registry_notice_is_one_line() -> None:
    assert "\n" not in REGISTRY_NOTICE
    assert "registry" in REGISTRY_NOTICE and "not where" in REGISTRY_NOTICE
    assert "GeoLite2" in REGISTRY_NOTICE


# ---------------------------------------------------------------------------
# open_resolver and the composite
# ---------------------------------------------------------------------------


def test_open_resolver_default_is_registry() -> None:
    r = open_resolver(None, None)
    assert isinstance(r, CachedResolver)
    assert isinstance(r.inner, RegistryResolver)
    assert [s.source for s in r.sources()] == ["iptocc"]
    assert r.maxsize == 65536
    assert r.lookup("8.8.8.8") == GeoInfo("US", "US")


def test_open_resolver_maxmind(country_db: Path, asn_db: Path) -> None:
    r = open_resolver(str(country_db), str(asn_db), cache_size=8)
    try:
        assert isinstance(r.inner, MaxMindResolver)
        assert r.maxsize == 8
        assert [s.database_type for s in r.sources()] == ["GeoLite2-Country", "GeoLite2-ASN"]
        assert r.lookup("175.16.199.1") == GeoInfo("CN", "CN", 4134, "Chinanet")
    finally:
        r.close()


def test_open_resolver_asn_only_combines_registry_and_maxmind(asn_db: Path) -> None:
    r = open_resolver(None, str(asn_db))
    try:
        assert isinstance(r.inner, CompositeResolver)
        assert [(s.source, s.database_type.split()[0]) for s in r.sources()] == [
            ("iptocc", "iptocc"),
            ("maxmind", "GeoLite2-ASN"),
        ]
        # Registry country with the MaxMind ASN.
        assert r.lookup("175.16.199.1") == GeoInfo("CN", "CN", 4134, "Chinanet")
        assert r.lookup("10.0.0.1") == GeoInfo()
        assert r.reload_if_changed() is False
    finally:
        r.close()


def test_open_resolver_errors(tmp_path: Path, asn_db: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_resolver(str(tmp_path / "missing.mmdb"), None)
    with pytest.raises(ValueError, match="expected a Country"):
        open_resolver(str(asn_db), None)


# ---------------------------------------------------------------------------
# Properties: any address string is answered, never an exception
# ---------------------------------------------------------------------------

_any_ip = st.ip_addresses().map(str)
_mapped = st.ip_addresses(v=4).map(lambda a: (str(a), f"::ffff:{a}"))


@pytest.fixture(scope="module")
def all_resolvers(
    maxmind: MaxMindResolver, maxmind_v4: MaxMindResolver, registry: RegistryResolver, asn_db: Path
) -> Iterator[list[Resolver]]:
    asn_only = MaxMindResolver(None, asn_db)
    composite = CompositeResolver(registry, asn_only)
    yield [maxmind, maxmind_v4, registry, composite, CachedResolver(maxmind, 64)]
    asn_only.close()


@settings(max_examples=400, deadline=None)
@given(ip=_any_ip)
def test_lookup_never_raises_on_valid_addresses(all_resolvers: list[Resolver], ip: str) -> None:
    for r in all_resolvers:
        info = r.lookup(ip)
        assert isinstance(info, GeoInfo)
        assert info.country is None or (len(info.country) == 2 and info.country.isupper())


@settings(max_examples=200, deadline=None)
@given(pair=_mapped)
def test_ipv4_mapped_same_as_ipv4(all_resolvers: list[Resolver], pair: tuple[str, str]) -> None:
    v4, mapped = pair
    for r in all_resolvers:
        assert r.lookup(mapped) == r.lookup(v4)


# ---------------------------------------------------------------------------
# MaxMind's own test databases (shared reference folder)
# ---------------------------------------------------------------------------


def _shared_geoip_dir() -> Path:
    env = os.environ.get("EGRESSD_SHARED_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return base / "geoip" / "test-data"


@pytest.fixture(scope="module")
def shared_geoip() -> Path:
    path = _shared_geoip_dir()
    if not (path / "GeoIP2-Country-Test.mmdb").is_file():
        pytest.skip(
            f"MaxMind test databases not found in ../shared/geoip ({path}); "
            "set EGRESSD_SHARED_DIR to the shared folder"
        )
    return path


@pytest.mark.shared
@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("81.2.69.142", GeoInfo("GB", "US", None, None)),
        ("81.2.69.160", GeoInfo("GB", "US", None, None)),
        ("2.125.160.216", GeoInfo("GB", "FR", None, None)),
        ("89.160.20.128", GeoInfo("SE", "DE", 29518, "Bredband2 AB")),
        ("67.43.156.1", GeoInfo("BT", "RO", 35908, None)),
        ("216.160.83.57", GeoInfo("US", "GB", 209, None)),
        ("175.16.199.1", GeoInfo("CN", "CN", None, None)),
        ("214.78.120.1", GeoInfo("US", "US", 721, "DoD Network Information Center")),
        ("214.1.1.1", GeoInfo(None, None, 721, "DoD Network Information Center")),  # anycast
        ("1.128.0.1", GeoInfo(None, None, 1221, "Telstra Pty Ltd")),
        ("12.81.92.1", GeoInfo(None, None, 7018, "AT&T Services")),
        ("2001:250::1", GeoInfo("CN", "CN", None, None)),
        ("2001:218::1", GeoInfo("JP", "JP", None, None)),
        ("2a02:d000::1", GeoInfo("CH", "CH", None, None)),
        ("2001:480:10::1", GeoInfo("US", "US", None, None)),
        ("240e::1", GeoInfo(None, None, 4134, "Chinanet")),
        ("::ffff:81.2.69.160", GeoInfo("GB", "US", None, None)),
        ("2002:5102:45a0::", GeoInfo("GB", "US", None, None)),
        ("::ffff:89.160.20.128", GeoInfo("SE", "DE", 29518, "Bredband2 AB")),
        ("64:ff9b::5102:45a0", GeoInfo("GB", "US", None, None)),
    ],
)
def test_shared_geoip2_country_and_asn(shared_geoip: Path, ip: str, expected: GeoInfo) -> None:
    with MaxMindResolver(
        shared_geoip / "GeoIP2-Country-Test.mmdb", shared_geoip / "GeoLite2-ASN-Test.mmdb"
    ) as r:
        assert r.lookup(ip) == expected


@pytest.mark.shared
@pytest.mark.parametrize(
    ("ip", "country"),
    [("81.2.69.142", "GB"), ("214.1.1.1", None), ("2001:480::1", "US"), ("175.16.199.1", None)],
)
def test_shared_geolite2_country(shared_geoip: Path, ip: str, country: str | None) -> None:
    with MaxMindResolver(shared_geoip / "GeoLite2-Country-Test.mmdb") as r:
        assert r.lookup(ip).country == country


@pytest.mark.shared
def test_shared_city_database_as_country_db(shared_geoip: Path) -> None:
    with MaxMindResolver(shared_geoip / "GeoIP2-City-Test.mmdb") as r:
        assert r.lookup("81.2.69.142") == GeoInfo("GB", "US")
        assert r.lookup("2a02:d000::1") == GeoInfo("CH", "CH")
        assert r.sources()[0].database_type == "GeoIP2-City"


@pytest.mark.shared
@pytest.mark.parametrize(
    "ip", ["1.1.1.1", "8.8.8.8", "10.0.0.1", "127.0.0.1", "192.168.1.1", "::1", "fe80::1"]
)
def test_shared_not_in_any_database(shared_geoip: Path, ip: str) -> None:
    with MaxMindResolver(
        shared_geoip / "GeoIP2-Country-Test.mmdb", shared_geoip / "GeoLite2-ASN-Test.mmdb"
    ) as r:
        assert r.lookup(ip) == GeoInfo()


@pytest.mark.shared
def test_shared_sources_and_wrong_types(shared_geoip: Path) -> None:
    country = shared_geoip / "GeoIP2-Country-Test.mmdb"
    asn = shared_geoip / "GeoLite2-ASN-Test.mmdb"
    with MaxMindResolver(country, asn) as r:
        assert r.sources() == [
            GeoSource("maxmind", str(country), "GeoIP2-Country", 1770245369),
            GeoSource("maxmind", str(asn), "GeoLite2-ASN", 1770245369),
        ]
    with pytest.raises(ValueError) as exc:
        MaxMindResolver(asn)
    assert str(exc.value) == f"{asn}: {WRONG_AS_COUNTRY}"
    with pytest.raises(ValueError) as exc:
        MaxMindResolver(country, country)
    assert str(exc.value) == f"{country}: " + WRONG_AS_ASN.format("GeoIP2-Country")
