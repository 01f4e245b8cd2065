"""Reading the configuration file: good files, every kind of bad file, and fuzzing."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import string
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from egressd.config import (
    MAX_FILE_BYTES,
    NO_VALUE,
    AlertsConfig,
    Config,
    ConfigError,
    FlowsConfig,
    GeoIPConfig,
    MetricsConfig,
    format_key_path,
    load_config,
    load_policy,
    parse_config,
    parse_policy,
    split_host_port,
)
from egressd.model import PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP
from egressd.netset import DEFAULT_INTERNAL_NETWORKS
from egressd.policy import UnknownCountry

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 1, 1, tzinfo=UTC)
SEC = 1_000_000_000


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text).encode(), "policy.yaml", now=NOW)


def error_of(text: str | bytes) -> ConfigError:
    data = text if isinstance(text, bytes) else textwrap.dedent(text).encode()
    with pytest.raises(ConfigError) as info:
        parse_config(data, "policy.yaml", now=NOW)
    return info.value


ROUTE = """\
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16]
routes:
  - name: hk-backup
    approval: CAC-2025-0142
    from: [customer-data]
    to:
      countries: [HK]
    protocols: [tcp]
    ports: [443, "8000-8100"]
    expires: 2027-01-01
"""


def route_with(old: str, new: str) -> str:
    assert old in ROUTE
    return ROUTE.replace(old, new, 1)


TOP_KEYS = (
    "home_countries, internal_networks, zones, unknown_country, routes, interfaces, "
    "capture_workers, capture_filter, promiscuous, geoip, metrics, alerts, flows, names, sensor"
)
ROUTE_KEYS = "name, approval, from, to, protocols, ports, expires"

BAD: list[tuple[str, str | bytes, str]] = [
    # -- countries
    (
        "UK",
        route_with("[HK]", "[HK, UK]"),
        "policy.yaml:9: routes[0].to.countries[1]: 'UK' is not an ISO 3166-1 alpha-2 country "
        "code (use GB for the United Kingdom)",
    ),
    (
        "EU",
        "home_countries: [EU]\n",
        "policy.yaml:1: home_countries[0]: 'EU' is not an ISO 3166-1 alpha-2 country code "
        "(the European Union is not a country: list its member states)",
    ),
    (
        "alpha-3",
        "home_countries: [CHN]\n",
        "policy.yaml:1: home_countries[0]: 'CHN' is not an ISO 3166-1 alpha-2 country code "
        "(use CN)",
    ),
    (
        "not a code",
        "home_countries:\n  - CN\n  - XX\n",
        "policy.yaml:3: home_countries[1]: 'XX' is not an ISO 3166-1 alpha-2 country code",
    ),
    (
        "country as number",
        "home_countries: [86]\n",
        "policy.yaml:1: home_countries[0]: 86: expected a two-letter country code such as CN",
    ),
    (
        "home_countries not a list",
        "home_countries: CN\n",
        "policy.yaml:1: home_countries: 'CN': expected a list",
    ),
    (
        "home_countries empty",
        "home_countries: []\n",
        "policy.yaml:1: home_countries: []: expected at least one entry",
    ),
    (
        "home_countries missing",
        "# a comment\n\nunknown_country: allow\n",
        "policy.yaml:3: home_countries: required key is missing (the countries data may "
        "move freely between, such as [CN])",
    ),
    # -- keys
    (
        "unknown top-level key",
        "home_countries: [CN]\nzonez: {}\n",
        f"policy.yaml:2: zonez: unknown key (expected one of: {TOP_KEYS})",
    ),
    (
        "unknown route key (typo wins over the missing key)",
        route_with("    approval:", "    aproval:"),
        f"policy.yaml:6: routes[0].aproval: unknown key (expected one of: {ROUTE_KEYS})",
    ),
    (
        "unknown key in to",
        route_with("      countries:", "      country:"),
        "policy.yaml:9: routes[0].to.country: unknown key (expected one of: countries, "
        "networks, asns, names)",
    ),
    (
        "unknown daemon key",
        "home_countries: [CN]\nflows:\n  idle_timeout_seconds: {tcp: 1, icmp: 2}\n",
        "policy.yaml:3: flows.idle_timeout_seconds.icmp: unknown key (expected one of: "
        "tcp, udp, other)",
    ),
    (
        "duplicate key",
        "home_countries: [CN]\nunknown_country: allow\nhome_countries: [HK]\n",
        "policy.yaml:3: home_countries: duplicates the key at line 1",
    ),
    (
        "key that is not a name",
        "home_countries: [CN]\n? [a, b]\n: 1\n",
        "policy.yaml:2: keys must be plain names",
    ),
    # -- routes
    (
        "route without approval",
        route_with("    approval: CAC-2025-0142\n", ""),
        "policy.yaml:5: routes[0].approval: required key is missing (every route needs the "
        "reference of its consent or authority approval)",
    ),
    (
        "route without name",
        route_with("  - name: hk-backup\n    approval:", "  - approval:"),
        "policy.yaml:5: routes[0].name: required key is missing (every route needs a unique name)",
    ),
    (
        "route without to",
        route_with("    to:\n      countries: [HK]\n", ""),
        "policy.yaml:5: routes[0].to: required key is missing (where the route leads: "
        "countries, networks, asns and/or names)",
    ),
    (
        "to with nothing",
        route_with("      countries: [HK]\n", "      countries: []\n      asns: []\n"),
        "policy.yaml:9: routes[0].to: {'countries': [], 'asns': []}: expected at least one of "
        "countries, networks, asns or names",
    ),
    (
        "route name pattern with a star inside a label",
        route_with("      countries: [HK]\n",
                   "      countries: [HK]\n      names: ['b*.vendor.example']\n"),
        "policy.yaml:10: routes[0].to.names[0]: 'b*.vendor.example': expected a host name such "
        "as backup.vendor.example, or *.vendor.example for every name below vendor.example",
    ),
    (
        "route name wildcard over a top-level domain",
        route_with("      countries: [HK]\n", "      countries: [HK]\n      names: ['*.com']\n"),
        "policy.yaml:10: routes[0].to.names[0]: '*.com': expected a host name such as "
        "backup.vendor.example, or *.vendor.example for every name below vendor.example; a "
        "wildcard needs at least two labels after '*.'",
    ),
    (
        "route name that is not a string",
        route_with("      countries: [HK]\n", "      countries: [HK]\n      names: [443]\n"),
        "policy.yaml:10: routes[0].to.names[0]: 443: expected a host name such as "
        "backup.vendor.example, or *.vendor.example for every name below vendor.example",
    ),
    (
        "names section key typo",
        "home_countries: [CN]\nnames:\n  hold_second: 1\n",
        "policy.yaml:3: names.hold_second: unknown key (expected one of: enabled, dns_entries, "
        "hold_seconds)",
    ),
    (
        "no capture process",
        "home_countries: [CN]\ncapture_workers: 0\n",
        "policy.yaml:2: capture_workers: 0: expected a number of at least 1",
    ),
    (
        "negative hold",
        "home_countries: [CN]\nnames:\n  hold_seconds: -1\n",
        "policy.yaml:3: names.hold_seconds: -1: expected a number of at least 0",
    ),
    (
        "approval read as a number",
        route_with("CAC-2025-0142", "20250142"),
        "policy.yaml:6: routes[0].approval: 20250142: expected a string (quote it if YAML "
        "reads it as a number, date or boolean)",
    ),
    (
        "empty approval",
        route_with("CAC-2025-0142", "''"),
        "policy.yaml:6: routes[0].approval: '': expected a non-empty string",
    ),
    (
        "duplicate route names",
        ROUTE
        + "  - name: other\n    approval: B\n    to: {asns: [1]}\n"
        + "  - name: hk-backup\n    approval: C\n    to: {asns: [2]}\n",
        "policy.yaml:16: routes[2].name: 'hk-backup' duplicates the route at line 5",
    ),
    (
        "routes not a list",
        "home_countries: [CN]\nroutes:\n  name: x\n",
        "policy.yaml:3: routes: {'name': 'x'}: expected a list",
    ),
    (
        "route not a mapping",
        "home_countries: [CN]\nroutes:\n  - hk-backup\n",
        "policy.yaml:3: routes[0]: 'hk-backup': expected a mapping",
    ),
    # -- from / zones
    (
        "unknown zone in from",
        route_with("[customer-data]", "[customer-data, custmer-data]"),
        "policy.yaml:7: routes[0].from[1]: 'custmer-data' is not a zone name or a CIDR "
        "(zones: customer-data)",
    ),
    (
        "from with no zones defined",
        "home_countries: [CN]\nroutes:\n  - name: a\n    approval: b\n    from: [corp]\n"
        "    to: {countries: [US]}\n",
        "policy.yaml:5: routes[0].from[0]: 'corp' is not a zone name or a CIDR (zones: none "
        "are defined)",
    ),
    (
        "from CIDR with host bits",
        route_with("[customer-data]", "[10.1.1.1/16]"),
        "policy.yaml:7: routes[0].from[0]: '10.1.1.1/16' has host bits set (did you mean "
        "10.1.0.0/16?)",
    ),
    (
        "from empty",
        route_with("[customer-data]", "[]"),
        "policy.yaml:7: routes[0].from: []: expected at least one entry",
    ),
    (
        "bad CIDR in a zone",
        route_with("[10.20.0.0/16]", "[10.20.0.0/16, 10.300.0.0/16]"),
        "policy.yaml:3: zones.customer-data[1]: '10.300.0.0/16' is not a valid CIDR (expected "
        "a CIDR such as 10.0.0.0/8 or fd00::/8)",
    ),
    (
        "CIDR with host bits in a zone",
        route_with("[10.20.0.0/16]", "['fd00:20::1/32']"),
        "policy.yaml:3: zones.customer-data[0]: 'fd00:20::1/32' has host bits set (did you "
        "mean fd00:20::/32?)",
    ),
    (
        "CIDR as a number",
        "home_countries: [CN]\nzones:\n  z: [10]\n",
        "policy.yaml:3: zones.z[0]: 10: expected a CIDR such as 10.0.0.0/8 or fd00::/8",
    ),
    (
        "zone without networks",
        "home_countries: [CN]\nzones:\n  z: []\n",
        "policy.yaml:3: zones.z: []: expected at least one entry",
    ),
    (
        "zone named like an address",
        "home_countries: [CN]\nzones:\n  10.1.0.0: [10.1.0.0/16]\n",
        "policy.yaml:3: zones['10.1.0.0']: '10.1.0.0': a zone name must not look like an "
        "address or a CIDR",
    ),
    (
        "zone name with a space",
        "home_countries: [CN]\nzones:\n  my zone: [10.1.0.0/16]\n",
        "policy.yaml:3: zones['my zone']: 'my zone': expected a zone name of up to 64 "
        "letters, digits, '-', '_' or '.'",
    ),
    (
        "bad internal network",
        "home_countries: [CN]\ninternal_networks: [10.0.0.0/8, automatic]\n",
        "policy.yaml:2: internal_networks[1]: 'automatic' is not a valid CIDR (expected a "
        "CIDR such as 10.0.0.0/8 or fd00::/8)",
    ),
    (
        "internal networks empty",
        "home_countries: [CN]\ninternal_networks: []\n",
        "policy.yaml:2: internal_networks: []: expected at least one entry",
    ),
    (
        "bad route network",
        route_with("      countries: [HK]\n", "      networks: [203.0.113.0/24, 2001:db8::/129]\n"),
        "policy.yaml:9: routes[0].to.networks[1]: '2001:db8::/129' is not a valid CIDR "
        "(expected a CIDR such as 10.0.0.0/8 or fd00::/8)",
    ),
    # -- asns, protocols, ports
    (
        "bad ASN",
        route_with("      countries: [HK]\n", "      asns: [AS4134, 0]\n"),
        "policy.yaml:9: routes[0].to.asns[1]: 0: expected an AS number 1-4294967295 such as "
        "4134 or 'AS4134'",
    ),
    (
        "ASN as text",
        route_with("      countries: [HK]\n", "      asns: [ASN4134]\n"),
        "policy.yaml:9: routes[0].to.asns[0]: 'ASN4134': expected an AS number 1-4294967295 "
        "such as 4134 or 'AS4134'",
    ),
    (
        "unknown protocol",
        route_with("[tcp]", "[tcp, quic]"),
        "policy.yaml:10: routes[0].protocols[1]: 'quic' is not a protocol (expected tcp, udp, "
        "sctp, icmp, icmpv6 or an IANA number 0-255)",
    ),
    (
        "protocol number out of range",
        route_with("[tcp]", "[256]"),
        "policy.yaml:10: routes[0].protocols[0]: 256 is not a protocol (expected tcp, udp, "
        "sctp, icmp, icmpv6 or an IANA number 0-255)",
    ),
    (
        "port 0",
        route_with('[443, "8000-8100"]', "[0]"),
        "policy.yaml:11: routes[0].ports[0]: 0: expected a port 1-65535",
    ),
    (
        "port too high",
        route_with('[443, "8000-8100"]', "[443, 65536]"),
        "policy.yaml:11: routes[0].ports[1]: 65536: expected a port 1-65535",
    ),
    (
        "range out of order",
        route_with('"8000-8100"', '"8100-8000"'),
        "policy.yaml:11: routes[0].ports[1]: '8100-8000': expected a range LOW-HIGH with "
        "LOW <= HIGH",
    ),
    (
        "range past 65535",
        route_with('"8000-8100"', '"60000-70000"'),
        "policy.yaml:11: routes[0].ports[1]: '60000-70000': expected ports 1-65535",
    ),
    (
        "port by name",
        route_with('"8000-8100"', "https"),
        "policy.yaml:11: routes[0].ports[1]: 'https': expected a port 1-65535 or a range such "
        "as '8000-8100'",
    ),
    (
        "port as boolean",
        route_with('"8000-8100"', "true"),
        "policy.yaml:11: routes[0].ports[1]: true: expected a port 1-65535 or a range such as "
        "'8000-8100'",
    ),
    (
        "ports empty",
        route_with('[443, "8000-8100"]', "[]"),
        "policy.yaml:11: routes[0].ports: []: expected at least one entry",
    ),
    # -- dates
    (
        "impossible date",
        route_with("2027-01-01", "2027-02-30"),
        "policy.yaml:12: routes[0].expires: '2027-02-30' is not a valid date",
    ),
    (
        "naive YAML time",
        route_with("2027-01-01", "2027-01-01 08:00:00"),
        "policy.yaml:12: routes[0].expires: 2027-01-01T08:00:00: a time without a time zone "
        "is ambiguous: add Z or an offset such as +08:00",
    ),
    (
        "naive quoted time",
        route_with("2027-01-01", '"2027-01-01T08:00:00"'),
        "policy.yaml:12: routes[0].expires: '2027-01-01T08:00:00': a time without a time zone "
        "is ambiguous: add Z or an offset such as +08:00",
    ),
    (
        "quoted impossible time",
        route_with("2027-01-01", '"2027-01-01T25:00:00Z"'),
        "policy.yaml:12: routes[0].expires: '2027-01-01T25:00:00Z' is not a valid date or time",
    ),
    (
        "date in another format",
        route_with("2027-01-01", "01/01/2027"),
        "policy.yaml:12: routes[0].expires: '01/01/2027': expected a date such as 2027-01-01 "
        "or an RFC 3339 time such as 2027-01-01T00:00:00Z",
    ),
    (
        "date as a number",
        route_with("2027-01-01", "20270101"),
        "policy.yaml:12: routes[0].expires: 20270101: expected a date such as 2027-01-01 or "
        "an RFC 3339 time such as 2027-01-01T00:00:00Z",
    ),
    # -- unknown_country
    (
        "bad unknown_country",
        "home_countries: [CN]\nunknown_country: deny\n",
        "policy.yaml:2: unknown_country: 'deny': expected 'unknown', 'violation' or 'allow'",
    ),
    # -- daemon keys
    (
        "timeout in quotes",
        "home_countries: [CN]\nflows:\n  idle_timeout_seconds: {tcp: '300'}\n",
        "policy.yaml:3: flows.idle_timeout_seconds.tcp: '300': expected a number",
    ),
    (
        "zero timeout",
        "home_countries: [CN]\nflows:\n  active_timeout_seconds: 0\n",
        "policy.yaml:3: flows.active_timeout_seconds: 0: expected a number greater than 0",
    ),
    (
        "negative grace",
        "home_countries: [CN]\nflows:\n  tcp_close_grace_seconds: -1\n",
        "policy.yaml:3: flows.tcp_close_grace_seconds: -1: expected a number of at least 0",
    ),
    (
        "infinite timeout",
        "home_countries: [CN]\nflows:\n  active_timeout_seconds: .inf\n",
        "policy.yaml:3: flows.active_timeout_seconds: inf: expected a finite number",
    ),
    (
        "fractional count",
        "home_countries: [CN]\nflows:\n  max_flows: 1.5\n",
        "policy.yaml:3: flows.max_flows: 1.5: expected an integer",
    ),
    (
        "boolean count",
        "home_countries: [CN]\ngeoip:\n  cache_size: true\n",
        "policy.yaml:3: geoip.cache_size: true: expected an integer",
    ),
    (
        "number for a boolean",
        "home_countries: [CN]\nalerts:\n  syslog: 1\n",
        "policy.yaml:3: alerts.syslog: 1: expected true or false",
    ),
    (
        "section not a mapping",
        "home_countries: [CN]\ngeoip: /var/lib/GeoIP/x.mmdb\n",
        "policy.yaml:2: geoip: '/var/lib/GeoIP/x.mmdb': expected a mapping",
    ),
    (
        "interfaces as a string",
        "home_countries: [CN]\ninterfaces: eth0\n",
        "policy.yaml:2: interfaces: 'eth0': expected a list",
    ),
    (
        "interface listed twice",
        "home_countries: [CN]\ninterfaces:\n  - eth0\n  - eth1\n  - eth0\n",
        "policy.yaml:5: interfaces[2]: 'eth0' is listed twice",
    ),
    (
        "bad interface name",
        "home_countries: [CN]\ninterfaces: [eth0, a-very-long-interface-name]\n",
        "policy.yaml:2: interfaces[1]: 'a-very-long-interface-name': expected a network "
        "interface name such as eth0 (1-15 characters, no '/')",
    ),
    (
        "IPv6 listen without brackets",
        "home_countries: [CN]\nmetrics:\n  listen: '::1:9855'\n",
        "policy.yaml:3: metrics.listen: '::1:9855': an IPv6 address needs brackets, as in "
        "'[::1]:9855'",
    ),
    (
        "listen without port",
        "home_countries: [CN]\nmetrics:\n  listen: 127.0.0.1\n",
        "policy.yaml:3: metrics.listen: '127.0.0.1': expected HOST:PORT such as "
        "'127.0.0.1:9855' or '[::1]:9855'",
    ),
    (
        "listen port out of range",
        "home_countries: [CN]\nmetrics:\n  listen: '[::]:99999'\n",
        "policy.yaml:3: metrics.listen: '[::]:99999': the port must be 1-65535",
    ),
    (
        "listen with a bad IPv6 address",
        "home_countries: [CN]\nmetrics:\n  listen: '[fe80::zz]:9855'\n",
        "policy.yaml:3: metrics.listen: '[fe80::zz]:9855': 'fe80::zz' is not an IPv6 address "
        "(expected HOST:PORT such as '127.0.0.1:9855' or '[::1]:9855')",
    ),
    (
        "listen as a number",
        "home_countries: [CN]\nmetrics:\n  listen: 9855\n",
        "policy.yaml:3: metrics.listen: 9855: expected HOST:PORT such as '127.0.0.1:9855' or "
        "'[::1]:9855'",
    ),
    (
        "alertmanager not http",
        "home_countries: [CN]\nalerts:\n  alertmanager: ftp://127.0.0.1:9093\n",
        "policy.yaml:3: alerts.alertmanager: 'ftp://127.0.0.1:9093': expected an http:// or "
        "https:// URL such as http://127.0.0.1:9093",
    ),
    (
        "alertmanager without host",
        "home_countries: [CN]\nalerts:\n  alertmanager: 'http://:9093'\n",
        "policy.yaml:3: alerts.alertmanager: 'http://:9093': expected an http:// or https:// "
        "URL such as http://127.0.0.1:9093",
    ),
    (
        "sensor as a number",
        "home_countries: [CN]\nsensor: 7\n",
        "policy.yaml:2: sensor: 7: expected a string (quote it if YAML reads it as a number, "
        "date or boolean)",
    ),
    # -- the file itself
    (
        "YAML syntax error",
        "home_countries: [CN]\nzones:\n  a: [10.0.0.0/8\nroutes: []\n",
        "policy.yaml:4: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow "
        "sequence)",
    ),
    (
        "bad indentation",
        "home_countries: [CN]\n  routes: []\n",
        "policy.yaml:2: invalid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping)",
    ),
    (
        "two documents",
        "home_countries: [CN]\n---\nhome_countries: [HK]\n",
        "policy.yaml:2: invalid YAML: expected a single document in the stream, but found "
        "another document",
    ),
    (
        "undefined alias",
        "home_countries: *countries\n",
        "policy.yaml:1: invalid YAML: found undefined alias 'countries'",
    ),
    (
        "control character",
        "home_countries: [CN]\nsensor: a\x07b\n",
        "policy.yaml:2: invalid YAML: character U+0007 is not allowed",
    ),
    ("empty file", "", "policy.yaml:1: the file is empty: expected a mapping with home_countries"),
    (
        "only comments",
        "# nothing here\n",
        "policy.yaml:1: the file is empty: expected a mapping with home_countries",
    ),
    (
        "top level is a list",
        "- home_countries: [CN]\n",
        "policy.yaml:1: the top level must be a mapping of keys such as home_countries, not a list",
    ),
    (
        "top level is a scalar",
        "\n\nCN\n",
        "policy.yaml:3: the top level must be a mapping of keys such as home_countries, not the "
        "value 'CN'",
    ),
    (
        "not UTF-8",
        b"home_countries: [CN]\nsensor: caf\xe9\n",
        "policy.yaml:2: not UTF-8 text (byte 0xe9 at offset 32)",
    ),
    (
        "UTF-16",
        "home_countries: [CN]\n".encode("utf-16"),
        "policy.yaml:1: not UTF-8 text (byte 0xff at offset 0)",
    ),
    (
        "unsafe tag",
        "home_countries: [CN]\nsensor: !!python/object/apply:os.system [id]\n",
        "policy.yaml:2: sensor: unsupported YAML tag !!python/object/apply:os.system",
    ),
    (
        "local tag",
        "home_countries: !countries [CN]\n",
        "policy.yaml:1: home_countries: unsupported YAML tag !countries",
    ),
    (
        "binary",
        "home_countries: [CN]\nsensor: !!binary aGVsbG8=\n",
        "policy.yaml:2: sensor: 'aGVsbG8=': unsupported YAML tag !!binary",
    ),
    (
        "bad explicit boolean",
        "home_countries: [CN]\npromiscuous: !!bool maybe\n",
        "policy.yaml:2: promiscuous: 'maybe' is not a valid bool",
    ),
    (
        "merge key",
        "defaults: &d {approval: X}\nhome_countries: [CN]\nroutes:\n"
        "  - <<: *d\n    name: a\n    to: {asns: [1]}\n",
        "policy.yaml:4: routes[0]: YAML merge keys (<<) are not supported: write the keys out",
    ),
    (
        "recursive alias",
        "home_countries: [CN]\nzones: &z\n  a: [10.0.0.0/8]\n  b: *z\n",
        "policy.yaml:2: zones.b: a YAML alias refers to a list or mapping that contains it",
    ),
    (
        "too many aliases",
        "home_countries: &c [CN]\nx: [" + ", ".join(["*c"] * 101) + "]\n",
        "policy.yaml:2: more than 100 YAML aliases (*name)",
    ),
    (
        "billion laughs",
        "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
            for i in range(8)
        ),
        "policy.yaml:1: more than 100000 values (aliases count each use)",
    ),
    (
        "too deeply nested",
        "home_countries: [CN]\nx: " + "[" * 40 + "]" * 40 + "\n",
        "policy.yaml:2: lists and mappings nested more than 32 deep",
    ),
    (
        "over 4 MiB",
        b"home_countries: [CN]\n" + b"#" * MAX_FILE_BYTES,
        f"policy.yaml: file is {MAX_FILE_BYTES + 21} bytes, more than the limit of 4 MiB",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config(text: str | bytes, expected: str) -> None:
    err = error_of(text)
    assert str(err) == expected
    assert "\n" not in str(err)


def test_error_attributes() -> None:
    err = error_of(route_with("[HK]", "[HK, UK]"))
    assert isinstance(err, ValueError)
    assert (err.file, err.line, err.key_path, err.value) == (
        "policy.yaml",
        9,
        "routes[0].to.countries[1]",
        "UK",
    )
    missing = error_of(route_with("    approval: CAC-2025-0142\n", ""))
    assert (missing.line, missing.key_path, missing.value) == (5, "routes[0].approval", NO_VALUE)
    syntax = error_of("a: [\n")
    assert syntax.key_path == ""
    assert syntax.value is NO_VALUE


def test_error_for_daemon_keys_does_not_stop_an_audit() -> None:
    text = "home_countries: [CN]\nflows: {max_flows: lots}\ngeoip: nope\n"
    with pytest.raises(ConfigError):
        parse_config(text.encode(), "c.yaml")
    policy = parse_policy(text.encode(), "c.yaml")
    assert policy.home_countries == frozenset({"CN"})
    # Unknown keys and policy errors are still refused.
    with pytest.raises(ConfigError, match=re.escape("c.yaml:2: flow: unknown key")):
        parse_policy(b"home_countries: [CN]\nflow: {}\n", "c.yaml")
    with pytest.raises(ConfigError, match="'UK' is not"):
        parse_policy(b"home_countries: [UK]\ninterfaces: 7\n", "c.yaml")


# -- files ----------------------------------------------------------------------


def test_load_config_from_a_file(tmp_path: Path) -> None:
    data = textwrap.dedent(ROUTE).encode()
    path = tmp_path / "policy.yaml"
    path.write_bytes(data)
    config = load_config(path, now=NOW)
    assert config.policy.path == str(path)
    assert config.policy.sha256 == hashlib.sha256(data).hexdigest()
    policy = load_policy(str(path), now=NOW)
    assert policy.sha256 == config.policy.sha256
    assert [r.name for r in policy.routes] == ["hk-backup"]


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: cannot read the file: No such file or directory"
    assert info.value.line is None
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_large_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file is larger than the limit of 4 MiB"


def test_byte_order_mark_is_accepted() -> None:
    config = parse_config(b"\xef\xbb\xbfhome_countries: [CN]\n", "p.yaml")
    assert config.policy.home_countries == frozenset({"CN"})


# -- good files -------------------------------------------------------------------


def test_minimal_config_has_every_default() -> None:
    config = parse("home_countries: [cn]\n")
    policy = config.policy
    assert policy.home_countries == frozenset({"CN"})
    assert [str(n) for n in policy.internal_networks] == list(DEFAULT_INTERNAL_NETWORKS)
    assert policy.internal_auto is False
    assert dict(policy.zones) == {}
    assert policy.unknown_country is UnknownCountry.UNKNOWN
    assert policy.routes == ()
    assert policy.warnings == []
    assert config.interfaces == ()
    assert config.capture_filter == "ip or ip6"
    assert config.promiscuous is False
    assert config.sensor is None
    assert config.geoip == GeoIPConfig(country_db=None, asn_db=None, cache_size=65536)
    assert config.metrics == MetricsConfig(listen="127.0.0.1:9855")
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9855)
    assert config.alerts == AlertsConfig(
        jsonl=None,
        syslog=False,
        alertmanager=None,
        suppress_seconds=300,
        alert_on_unknown=False,
        spool_dir="/var/lib/egressd/spool",
        spool_max_bytes=104857600,
    )
    flows = config.flows
    assert flows == FlowsConfig()
    assert flows.idle_timeout_ns(PROTO_TCP) == 300 * SEC
    assert flows.idle_timeout_ns(PROTO_UDP) == 60 * SEC
    assert flows.idle_timeout_ns(PROTO_ICMP) == 30 * SEC
    assert flows.idle_timeout_ns(PROTO_SCTP) == 30 * SEC
    assert flows.tcp_close_grace_ns == 5 * SEC
    assert flows.active_timeout_ns == 300 * SEC
    assert flows.max_flows == 1_000_000


def test_empty_sections_mean_defaults() -> None:
    config = parse(
        "home_countries: [CN]\nzones:\nroutes:\ngeoip:\nmetrics:\nalerts:\n"
        "flows:\n  idle_timeout_seconds:\ninterfaces:\n"
    )
    assert config.geoip == GeoIPConfig()
    assert config.flows == FlowsConfig()
    assert config.interfaces == ()
    assert config.policy.routes == ()


def docs_example() -> str:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split("## Complete example", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_complete_example_in_the_docs() -> None:
    config = parse(docs_example())
    policy = config.policy
    assert policy.warnings == []
    assert policy.internal_auto is True
    assert [str(n) for n in policy.internal_networks] == [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]
    assert list(policy.zones) == ["customer-data", "corp", "dev"]
    assert [str(n) for n in policy.zones["customer-data"]] == ["10.20.0.0/16", "fd00:20::/32"]
    hk, crm, sftp = policy.routes
    assert hk.name == "hk-backup"
    assert hk.approval == "CAC-2025-0142"
    assert hk.from_zones == ("customer-data",)
    assert hk.countries == frozenset({"HK"})
    assert hk.protocols == frozenset({PROTO_TCP})
    assert hk.ports == ((443, 443),)
    assert hk.expires_ns == int(datetime(2027, 6, 30, tzinfo=UTC).timestamp()) * SEC
    assert crm.asns == frozenset({64500})
    assert crm.networks == (ipaddress.ip_network("203.0.113.0/24"),)
    assert crm.expires_ns is None
    assert sftp.from_zones == ("customer-data",)
    assert sftp.from_networks == (ipaddress.ip_network("10.50.1.10/32"),)
    assert sftp.expires_ns == int(datetime(2027, 12, 31, 16, tzinfo=UTC).timestamp()) * SEC
    assert config.interfaces == ("eth0",)
    assert config.sensor == "gw-shanghai-1"
    assert config.sensor_name == "gw-shanghai-1"
    assert config.geoip.country_db == "/var/lib/GeoIP/GeoLite2-Country.mmdb"
    assert config.geoip.asn_db == "/var/lib/GeoIP/GeoLite2-ASN.mmdb"
    assert config.alerts.jsonl == "/var/log/egressd/alerts.jsonl"
    assert config.alerts.alertmanager == "http://127.0.0.1:9093"
    assert config.flows.idle_timeout_ns(PROTO_UDP) == 60 * SEC


def test_docs_name_every_key() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    models: list[type[BaseModel]] = [GeoIPConfig, MetricsConfig, AlertsConfig, FlowsConfig]
    keys = {name for model in models for name in model.model_fields}
    keys |= {"home_countries", "internal_networks", "zones", "unknown_country", "routes"}
    keys |= {"interfaces", "capture_filter", "promiscuous", "sensor", "geoip", "metrics"}
    keys |= {"alerts", "flows", "name", "approval", "from", "to", "countries", "networks"}
    keys |= {"asns", "protocols", "ports", "expires", "tcp", "udp", "other"}
    assert sorted(k for k in keys if f"`{k}`" not in text) == []
    for mode in UnknownCountry:
        assert f"`{mode.value}`" in text
    for reason in ("no_route", "route_expired", "zone_not_allowed", "protocol_not_allowed"):
        assert f"`{reason}`" in text
    assert "`port_not_allowed`" in text
    assert "`no_country`" in text


def test_example_policy_file() -> None:
    path = ROOT / "examples" / "policy.yaml"
    before = load_policy(path, now=datetime(2026, 6, 1, tzinfo=UTC))
    assert before.warnings == []
    after = load_policy(path, now=datetime(2026, 7, 1, tzinfo=UTC))
    assert after.warnings == [
        f"{path}:62: routes[2] ('dev-mirrors'): expired at 2026-06-30; it approves only "
        "flows first seen before then"
    ]
    assert [r.name for r in after.routes] == ["hk-backup", "crm-vendor", "dev-mirrors"]
    assert list(after.zones) == ["customer-data", "corp", "dev"]
    assert after.home_countries == frozenset({"CN"})


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
        ("'2027-01-01'", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T08:00:00+08:00", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2026-12-31T20:00:00-04:00", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01 00:00:00Z", datetime(2027, 1, 1, tzinfo=UTC)),
        ("'2027-01-01T00:00:00Z'", datetime(2027, 1, 1, tzinfo=UTC)),
        ("'2027-01-01t08:00:00+08:00'", datetime(2027, 1, 1, tzinfo=UTC)),
        ("1969-12-31T00:00:00Z", datetime(1969, 12, 31, tzinfo=UTC)),
    ],
)
def test_expires_forms(written: str, expected: datetime) -> None:
    config = parse(route_with("2027-01-01", written))
    assert config.policy.routes[0].expires_ns == int(expected.timestamp()) * SEC


def test_expires_keeps_nanoseconds() -> None:
    config = parse(route_with("2027-01-01", "'2027-01-01T00:00:00.000000001Z'"))
    base = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()) * SEC
    assert config.policy.routes[0].expires_ns == base + 1
    config = parse(route_with("2027-01-01", "2027-01-01T00:00:00.25Z"))
    assert config.policy.routes[0].expires_ns == base + SEC // 4


def test_values_are_normalised() -> None:
    config = parse(
        """\
        home_countries: [cn, NO, "no"]
        internal_networks: [AUTO, 10.0.0.0/8, 192.0.2.1]
        routes:
          - name: r
            approval: "0142"
            to:
              countries: [hk]
              asns: [as4134, 'AS 7', 9808]
            protocols: [TCP, Udp, 132]
            ports: ["22", 443, " 8000 - 8100 ", 8080]
        """.replace("'AS 7', ", "")
    )
    policy = config.policy
    assert policy.home_countries == frozenset({"CN", "NO"})
    assert policy.internal_auto is True
    assert [str(n) for n in policy.internal_networks] == ["10.0.0.0/8", "192.0.2.1/32"]
    (route,) = policy.routes
    assert route.approval == "0142"
    assert route.countries == frozenset({"HK"})
    assert route.asns == frozenset({4134, 9808})
    assert route.protocols == frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})
    assert route.ports == ((22, 22), (443, 443), (8000, 8100), (8080, 8080))


def test_aliases_are_followed() -> None:
    config = parse(
        """\
        home_countries: &home [CN]
        zones:
          a: &nets [10.1.0.0/16]
          b: *nets
        routes:
          - name: r
            approval: X
            to: {countries: *home}
        """
    )
    assert config.policy.zones["a"] == config.policy.zones["b"]
    assert config.policy.routes[0].countries == frozenset({"CN"})


def test_daemon_keys() -> None:
    config = parse(
        """\
        home_countries: [CN]
        interfaces: [eth0, "br-lan"]
        capture_filter: null
        promiscuous: true
        sensor: gw-1
        geoip: {cache_size: 10}
        metrics: {listen: "[::1]:9100"}
        alerts:
          jsonl: "-"
          syslog: true
          alertmanager: https://am.example:9093/
          suppress_seconds: 0
          alert_on_unknown: true
          spool_max_bytes: 1024
        flows:
          idle_timeout_seconds: {udp: 1.5}
          tcp_close_grace_seconds: 0
          active_timeout_seconds: 60
          max_flows: 10
        """
    )
    assert config.interfaces == ("eth0", "br-lan")
    assert config.capture_filter is None
    assert config.promiscuous is True
    assert config.geoip.cache_size == 10
    assert (config.metrics.host, config.metrics.port) == ("::1", 9100)
    assert config.alerts.jsonl == "-"
    assert config.alerts.suppress_seconds == 0
    assert config.alerts.spool_dir == "/var/lib/egressd/spool"
    flows = config.flows
    assert flows.idle_timeout_ns(PROTO_UDP) == 1_500_000_000
    assert flows.idle_timeout_ns(PROTO_TCP) == 300 * SEC
    assert flows.tcp_close_grace_ns == 0
    assert flows.active_timeout_ns == 60 * SEC
    with pytest.raises(ValidationError):
        config.flows.max_flows = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sensor = "other"  # type: ignore[misc]


def test_sensor_name_defaults_to_the_host_name() -> None:
    import socket

    assert parse("home_countries: [CN]\n").sensor_name == socket.gethostname()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9855", ("127.0.0.1", 9855)),
        ("localhost:1", ("localhost", 1)),
        ("metrics.example.com:65535", ("metrics.example.com", 65535)),
        ("[::]:9855", ("::", 9855)),
    ],
)
def test_split_host_port(listen: str, expected: tuple[str, int]) -> None:
    assert split_host_port(listen) == expected


@pytest.mark.parametrize("bad", [":9855", "host:", "host:0", "a b:1", "[::1]", "[::1]9855", "h:x"])
def test_split_host_port_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(bad)


def test_format_key_path() -> None:
    assert format_key_path(("routes", 0, "to", "countries", 1)) == "routes[0].to.countries[1]"
    assert format_key_path(("zones", "a.b", 0)) == "zones['a.b'][0]"
    assert format_key_path(()) == ""


# -- fuzzing: anything but a ConfigError is a bug -----------------------------------


def must_be_config_error_or_config(data: bytes) -> None:
    try:
        config = parse_config(data, "fuzz.yaml", now=NOW)
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text
        assert text.startswith("fuzz.yaml")
    else:
        assert isinstance(config, Config)
    try:
        policy = parse_policy(data, "fuzz.yaml", now=NOW)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert policy.home_countries


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(alphabet=st.sampled_from(string.printable + "&*!|>%@`é中\x00\x85\u2028")))
def test_fuzz_text(text: str) -> None:
    must_be_config_error_or_config(text.encode())


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_bytes(data: bytes) -> None:
    must_be_config_error_or_config(data)


_keys = st.sampled_from(
    [
        "home_countries",
        "internal_networks",
        "zones",
        "unknown_country",
        "routes",
        "name",
        "approval",
        "from",
        "to",
        "countries",
        "networks",
        "asns",
        "protocols",
        "ports",
        "expires",
        "flows",
        "idle_timeout_seconds",
        "tcp",
        "geoip",
        "metrics",
        "listen",
        "alerts",
        "interfaces",
        "x",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["CN", "HK", "UK", "10.0.0.0/8", "fd00::/8", "auto", "tcp", "443", "1-2"]),
    st.dates(),
    st.datetimes(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_nested_mappings(doc: dict[str, object]) -> None:
    must_be_config_error_or_config(yaml.safe_dump(doc, allow_unicode=True).encode())


def _replace_at(doc: object, path: list[int], value: object) -> object:
    """Replace one value, chosen by ``path``, anywhere in a nested document."""
    if not path:
        return value
    if isinstance(doc, dict) and doc:
        keys = list(doc)
        key = keys[path[0] % len(keys)]
        return {**doc, key: _replace_at(doc[key], path[1:], value)}
    if isinstance(doc, list) and doc:
        i = path[0] % len(doc)
        return [*doc[:i], _replace_at(doc[i], path[1:], value), *doc[i + 1 :]]
    return value


@FUZZ
@given(
    path=st.lists(st.integers(0, 20), max_size=6),
    value=_values,
)
def test_fuzz_one_value_of_a_good_file(path: list[int], value: object) -> None:
    good = yaml.safe_load(docs_example())
    must_be_config_error_or_config(
        yaml.safe_dump(_replace_at(good, path, value), allow_unicode=True).encode()
    )
