"""The export policy: which flows out of the country are approved, and why not.

A :class:`Policy` is built once (normally by :func:`egressd.config.load_config`
from the YAML file, see ``docs/configuration.md``) and then answers
:meth:`Policy.evaluate` for every flow whose remote end is not internal.  The
answer depends only on the arguments, so an offline audit and the live daemon
give the same verdict for the same flow.

Evaluation order for one flow:

1. The remote's country is a home country → ``domestic``.
2. The routes, in file order: the first route whose destination (country,
   network or ASN), source (``from``), server name (``names``), protocol,
   service port and expiry all match → ``approved`` with that route's name and
   approval reference.
3. The remote has no country → ``unknown_country`` decides: ``unknown`` (reason
   ``no_country``), ``violation`` (reason ``no_country``) or ``approved``
   without a route.
4. Otherwise ``violation``.  Its ``route`` is the first route whose destination
   matched but which failed on something else, and its ``reason`` says what
   that route failed on first, checked in the order zone, name, protocol,
   port, expiry (``no_route`` when no route's destination matched).

A route that lists ``names`` needs the name *and* its location to match: a
name can resolve to any address in any country, which is exactly the risk an
export approval is about, so a name alone never moves data to a country the
route does not list.  A route with ``names`` and no countries, networks or
ASNs approves the names wherever they resolve (legal, with a load-time
warning).  Flows whose name is not known (no DNS answer seen, an encrypted
ClientHello) never match a route that lists names.
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Final

from egressd.model import FlowEndpoints, GeoInfo, Reason, Verdict, VerdictKind
from egressd.netset import (
    DEFAULT_INTERNAL_NETWORKS,
    IPNetwork,
    NetworkSet,
    pack_ip,
    parse_network,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class UnknownCountry(StrEnum):
    """What a flow to a remote without a known country gets (``unknown_country``).

    GeoIP databases have no country for anycast, satellite and some freshly
    allocated blocks.  ``unknown`` keeps such flows apart for review,
    ``violation`` treats them as unapproved exports, ``allow`` approves them.
    """

    UNKNOWN = "unknown"
    VIOLATION = "violation"
    ALLOW = "allow"


@dataclass(frozen=True, slots=True)
class Route:
    """One approved export route of the policy (an entry of ``routes:``).

    A flow is approved by the route when all of these hold:

    * destination: the remote's country is in ``countries``, or its ASN is in
      ``asns``, or its address is in ``networks`` (any one is enough);
    * source: the internal address lies in a network of one of ``from_zones``
      or in one of ``from_networks``; both empty means any internal source;
    * ``names`` (host names, or ``*.domain`` for any name below ``domain``) is
      empty, or one of the flow's names matches one of them;
    * ``protocols`` (IP protocol numbers) contains the flow's protocol, or is None;
    * ``ports`` (sorted, merged inclusive ranges) contains the service port, or
      is None;
    * the flow was first seen before ``expires_ns`` (ns since the epoch), or it
      is None.
    """

    name: str
    approval: str
    countries: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    asns: frozenset[int] = frozenset()
    from_zones: tuple[str, ...] = ()
    from_networks: tuple[IPNetwork, ...] = ()
    protocols: frozenset[int] | None = None
    ports: tuple[tuple[int, int], ...] | None = None
    expires_ns: int | None = None
    line: int | None = None
    """Line of the route in the policy file, for warnings (None when built in code)."""
    names: tuple[str, ...] = ()
    """Lower-case host names and ``*.domain`` wildcards (empty: any name, or none)."""

    @property
    def any_source(self) -> bool:
        """True when the route has no ``from`` and so covers every internal source."""
        return not self.from_zones and not self.from_networks

    @property
    def any_location(self) -> bool:
        """True when the route lists no country, network or ASN (a names-only route)."""
        return not self.countries and not self.networks and not self.asns


class NamePatterns:
    """A route's ``names``: exact host names and ``*.domain`` wildcards.

    ``*.vendor.example`` matches ``a.vendor.example`` and ``a.b.vendor.example``
    (one label or more in place of the star) but not ``vendor.example`` itself,
    as in TLS certificates' wildcards, except that a star may stand for several
    labels: services move between sub-domains more often than approvals are
    rewritten.  Names are compared lower-case, without a trailing dot.
    """

    __slots__ = ("exact", "suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: list[str] = []
        for pattern in patterns:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                suffixes.append(pattern[1:])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.suffixes = tuple(suffixes)

    def match(self, names: Iterable[str]) -> bool:
        """True when any of ``names`` matches any pattern."""
        exact, suffixes = self.exact, self.suffixes
        return any(n in exact or (suffixes and n.endswith(suffixes)) for n in names)

    def covers(self, pattern: str) -> bool:
        """True when every name ``pattern`` matches is also matched here."""
        if pattern.startswith("*."):
            return any(pattern[1:].endswith(s) for s in self.suffixes)
        return self.match((pattern,))


def merge_port_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort inclusive port ranges and merge the ones that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return tuple(merged)


def ns_to_text(ns: int) -> str:
    """An expiry in ns since the epoch as RFC 3339 UTC text, for messages."""
    moment = _EPOCH + timedelta(microseconds=ns // 1000)
    if moment.hour == moment.minute == moment.second == moment.microsecond == 0:
        return moment.date().isoformat()
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def datetime_to_ns(moment: datetime) -> int:
    """ns since the epoch of a timezone-aware datetime (exact, no float rounding)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a datetime without a time zone is ambiguous")
    return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1000


_UNSET: Final = b""
_DOMESTIC: Final = Verdict(VerdictKind.DOMESTIC)
_NO_ROUTE: Final = Verdict(VerdictKind.VIOLATION, reason=Reason.NO_ROUTE)
_NO_COUNTRY: Final = {
    UnknownCountry.UNKNOWN: Verdict(VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY),
    UnknownCountry.VIOLATION: Verdict(VerdictKind.VIOLATION, reason=Reason.NO_COUNTRY),
    UnknownCountry.ALLOW: Verdict(VerdictKind.APPROVED),
}


class _Compiled:
    """A route in the shape :meth:`Policy.evaluate` checks fastest."""

    __slots__ = (
        "any_location",
        "approved",
        "asns",
        "countries",
        "dest_nets",
        "expired",
        "expires_ns",
        "name_not_allowed",
        "name_unknown",
        "names",
        "port_ends",
        "port_not_allowed",
        "port_starts",
        "protocol_not_allowed",
        "protocols",
        "src_nets",
        "src_zones",
        "zone_not_allowed",
    )

    def __init__(self, route: Route, zones: Mapping[str, tuple[IPNetwork, ...]]) -> None:
        self.countries = route.countries
        self.asns = route.asns
        self.any_location = route.any_location
        self.dest_nets = NetworkSet(route.networks) if route.networks else None
        if route.any_source:
            self.src_nets: NetworkSet | None = None
        else:
            nets = [n for z in route.from_zones for n in zones[z]]
            self.src_nets = NetworkSet([*nets, *route.from_networks])
        self.src_zones = frozenset(route.from_zones)
        self.names = NamePatterns(route.names) if route.names else None
        self.protocols = route.protocols
        if route.ports is None:
            self.port_starts: list[int] | None = None
            self.port_ends: list[int] = []
        else:
            merged = merge_port_ranges(route.ports)
            self.port_starts = [low for low, _ in merged]
            self.port_ends = [high for _, high in merged]
        self.expires_ns = route.expires_ns
        name = route.name
        self.approved = Verdict(VerdictKind.APPROVED, name, route.approval)
        self.zone_not_allowed = Verdict(VerdictKind.VIOLATION, name, reason=Reason.ZONE_NOT_ALLOWED)
        self.name_not_allowed = Verdict(VerdictKind.VIOLATION, name, reason=Reason.NAME_NOT_ALLOWED)
        self.name_unknown = Verdict(VerdictKind.VIOLATION, name, reason=Reason.NAME_UNKNOWN)
        self.protocol_not_allowed = Verdict(
            VerdictKind.VIOLATION, name, reason=Reason.PROTOCOL_NOT_ALLOWED
        )
        self.port_not_allowed = Verdict(VerdictKind.VIOLATION, name, reason=Reason.PORT_NOT_ALLOWED)
        self.expired = Verdict(VerdictKind.VIOLATION, name, reason=Reason.ROUTE_EXPIRED)


def _pack_or_none(ip: str | None) -> bytes | None:
    if ip is None:
        return None
    try:
        return pack_ip(ip)
    except ValueError:
        return None


class Policy:
    """A loaded export policy: built once, then asked about every flow.

    Attributes are read-only by convention; :meth:`resolve_auto` returns a new
    policy instead of changing this one, so a policy can be shared between
    threads.  ``warnings`` lists legal but suspicious things found at load time
    (a route that can never approve anything because an earlier route covers
    it, a route already expired, a zone outside the internal networks); the
    CLI prints them and carries on.
    """

    __slots__ = (
        "_compiled",
        "_home",
        "_internal",
        "_no_country",
        "_zone_names",
        "_zone_set",
        "home_countries",
        "internal_auto",
        "internal_networks",
        "path",
        "routes",
        "sha256",
        "unknown_country",
        "warnings",
        "zones",
    )

    def __init__(
        self,
        *,
        home_countries: Iterable[str],
        internal_networks: Iterable[str | IPNetwork] = DEFAULT_INTERNAL_NETWORKS,
        internal_auto: bool = False,
        zones: Mapping[str, Iterable[str | IPNetwork]] | None = None,
        unknown_country: UnknownCountry | str = UnknownCountry.UNKNOWN,
        routes: Iterable[Route] = (),
        path: str | None = None,
        sha256: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Build and precompute a policy.

        Raises :class:`ValueError` when a route's ``from_zones`` names a zone
        that ``zones`` does not define, or when there is no home country.
        ``now`` (timezone-aware; default: the current time) only decides which
        routes are reported as already expired in ``warnings``.
        """
        self.home_countries: frozenset[str] = frozenset(c.upper() for c in home_countries)
        if not self.home_countries:
            raise ValueError("a policy needs at least one home country")
        self.internal_networks: tuple[IPNetwork, ...] = tuple(
            parse_network(n) for n in internal_networks
        )
        self.internal_auto: bool = internal_auto
        zone_map = {
            name: tuple(parse_network(n) for n in nets) for name, nets in (zones or {}).items()
        }
        self.zones: Mapping[str, tuple[IPNetwork, ...]] = MappingProxyType(zone_map)
        self.unknown_country: UnknownCountry = UnknownCountry(unknown_country)
        self.routes: tuple[Route, ...] = tuple(routes)
        for route in self.routes:
            for zone in route.from_zones:
                if zone not in zone_map:
                    raise ValueError(f"route {route.name!r} names unknown zone {zone!r}")
        self.path: str | None = path
        self.sha256: str | None = sha256

        self._home = self.home_countries
        self._internal = NetworkSet(self.internal_networks)
        self._zone_names = tuple(name for name, nets in zone_map.items() for _ in nets)
        self._zone_set = NetworkSet(n for nets in zone_map.values() for n in nets)
        self._compiled = tuple(_Compiled(r, zone_map) for r in self.routes)
        self._no_country = _NO_COUNTRY[self.unknown_country]
        self.warnings: list[str] = self._find_warnings(now)

    # -- per-address helpers --------------------------------------------------

    def is_internal(self, addr: bytes) -> bool:
        """True when a packed address is in ``internal_networks``.

        With ``internal_auto`` the gateway's own prefixes count only after the
        daemon has added them with :meth:`resolve_auto`.
        """
        return self._internal.contains(addr)

    def zone_of(self, addr: bytes) -> str | None:
        """The first zone (in file order) whose networks contain a packed address."""
        index = self._zone_set.first_match(addr)
        return None if index is None else self._zone_names[index]

    def resolve_auto(self, prefixes: Iterable[str | IPNetwork]) -> Policy:
        """A copy whose internal networks also hold ``prefixes``; ``internal_auto`` off.

        The live daemon calls this with the prefixes of the gateway's own
        interfaces when the policy lists ``auto`` in ``internal_networks``.
        Warnings are kept as they were at load time.
        """
        clone = copy.copy(self)
        extra = tuple(parse_network(p) for p in prefixes)
        clone.internal_networks = (*self.internal_networks, *extra)
        clone.internal_auto = False
        clone._internal = NetworkSet(clone.internal_networks)
        clone.warnings = list(self.warnings)
        return clone

    # -- evaluation -----------------------------------------------------------

    def source_mask(self, internal: bytes | None, zone: str | None) -> int:
        """Which routes' ``from`` the packed internal address (or, without one, the
        zone) satisfies: bit ``i`` for route ``i``.

        With :meth:`destination_mask`, the country, the ASN, the protocol, the
        service port, the expiries passed and the names, it is all
        :meth:`evaluate` depends on: flows alike in these get the same verdict,
        so a caller may cache verdicts by them.
        """
        mask = 0
        for i, cr in enumerate(self._compiled):
            src_nets = cr.src_nets
            if src_nets is None:
                ok = True
            elif internal is None:
                ok = zone is not None and zone in cr.src_zones
            else:
                ok = src_nets.contains(internal)
            if ok:
                mask |= 1 << i
        return mask

    def destination_mask(self, remote: bytes | None) -> int:
        """Which routes' ``to.networks`` contain the packed remote address (bit ``i``)."""
        mask = 0
        if remote is not None:
            for i, cr in enumerate(self._compiled):
                if cr.dest_nets is not None and cr.dest_nets.contains(remote):
                    mask |= 1 << i
        return mask

    def evaluate(self, ep: FlowEndpoints, geo: GeoInfo, zone: str | None) -> Verdict:
        """The verdict for one flow whose remote end is not internal.

        ``geo`` describes the remote address; ``zone`` is the internal
        address's zone (:meth:`zone_of`), used for ``from`` only when the
        flow has no internal address.  Internal and transit flows are the
        caller's business.  Pure: the same arguments always give the same
        verdict.
        """
        country = geo.country
        if country is not None and country in self._home:
            return _DOMESTIC
        asn = geo.asn
        remote: bytes | None = _UNSET
        internal: bytes | None = _UNSET
        failed: Verdict | None = None
        for cr in self._compiled:
            if (country is None or country not in cr.countries) and (
                asn is None or asn not in cr.asns
            ):
                dest_nets = cr.dest_nets
                if dest_nets is not None:
                    if remote is _UNSET:
                        remote = _pack_or_none(ep.remote_ip)
                    if remote is None or not dest_nets.contains(remote):
                        continue
                elif not cr.any_location:
                    continue
                # else: a names-only route, whose location is anywhere
            # The destination matches: now source zone, protocol, port, expiry.
            src_nets = cr.src_nets
            if src_nets is not None:
                if internal is _UNSET:
                    internal = _pack_or_none(ep.internal_ip)
                if internal is None:
                    source_ok = zone is not None and zone in cr.src_zones
                else:
                    source_ok = src_nets.contains(internal)
                if not source_ok:
                    if failed is None:
                        failed = cr.zone_not_allowed
                    continue
            names = cr.names
            if names is not None:
                if not ep.names:
                    if failed is None:
                        failed = cr.name_unknown
                    continue
                if not names.match(ep.names):
                    if failed is None:
                        failed = cr.name_not_allowed
                    continue
            protocols = cr.protocols
            if protocols is not None and ep.proto not in protocols:
                if failed is None:
                    failed = cr.protocol_not_allowed
                continue
            starts = cr.port_starts
            if starts is not None:
                port = ep.service_port
                at = -1 if port is None else bisect_right(starts, port) - 1
                if at < 0 or port is None or port > cr.port_ends[at]:
                    if failed is None:
                        failed = cr.port_not_allowed
                    continue
            expires = cr.expires_ns
            if expires is not None and ep.first_seen_ns >= expires:
                if failed is None:
                    failed = cr.expired
                continue
            return cr.approved
        if country is None:
            return self._no_country
        return _NO_ROUTE if failed is None else failed

    # -- load-time checks -----------------------------------------------------

    def _where(self, index: int) -> str:
        route = self.routes[index]
        prefix = ""
        if self.path is not None and route.line is not None:
            prefix = f"{self.path}:{route.line}: "
        return f"{prefix}routes[{index}] ({route.name!r})"

    def _find_warnings(self, now: datetime | None) -> list[str]:
        warnings: list[str] = []
        now_ns = datetime_to_ns(now if now is not None else datetime.now(UTC))
        if not self.internal_auto:
            for name, nets in self.zones.items():
                for net in nets:
                    if not any(_within(net, inner) for inner in self.internal_networks):
                        warnings.append(
                            f"{self.path or 'policy'}: zones.{name}: {str(net)!r} is not inside "
                            "internal_networks: its addresses count as remote, not as this zone"
                        )
        for index, route in enumerate(self.routes):
            if route.names and route.any_location:
                warnings.append(
                    f"{self._where(index)}: lists names but no countries, networks or ASNs: "
                    "it approves those names wherever they resolve, in any country"
                )
            if route.expires_ns is not None and route.expires_ns <= now_ns:
                warnings.append(
                    f"{self._where(index)}: expired at {ns_to_text(route.expires_ns)}; "
                    "it approves only flows first seen before then"
                )
            for earlier in range(index):
                if self._covers(self.routes[earlier], route):
                    warnings.append(
                        f"{self._where(index)}: shadowed by routes[{earlier}] "
                        f"({self.routes[earlier].name!r}): every flow it approves is "
                        "approved by that earlier route first, so it never applies"
                    )
                    break
        return warnings

    def _sources(self, route: Route) -> list[IPNetwork]:
        return [n for z in route.from_zones for n in self.zones[z]] + list(route.from_networks)

    def _covers(self, first: Route, later: Route) -> bool:
        """True when ``first`` approves every flow that ``later`` would approve."""
        if first.names:
            if not later.names:
                return False
            patterns = NamePatterns(first.names)
            if not all(patterns.covers(p) for p in later.names):
                return False
        if first.any_location and first.names:
            pass  # anywhere: covers every location of the later route
        elif not later.countries <= first.countries or not later.asns <= first.asns:
            return False
        elif later.any_location and later.names:
            return False  # the later route reaches places the earlier one does not
        if not (first.any_location and first.names) and not all(
            any(_within(n, m) for m in first.networks) for n in later.networks
        ):
            return False
        if not first.any_source:
            if later.any_source:
                return False
            outer = self._sources(first)
            if not all(any(_within(n, m) for m in outer) for n in self._sources(later)):
                return False
        if first.protocols is not None and (
            later.protocols is None or not later.protocols <= first.protocols
        ):
            return False
        if first.ports is not None:
            if later.ports is None:
                return False
            outer_ports = merge_port_ranges(first.ports)
            for low, high in later.ports:
                if not any(a <= low and high <= b for a, b in outer_ports):
                    return False
        if first.expires_ns is not None:
            return later.expires_ns is not None and later.expires_ns <= first.expires_ns
        return True


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, IPv4Network) and isinstance(outer, IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, IPv6Network) and isinstance(outer, IPv6Network):
        return inner.subnet_of(outer)
    return False
