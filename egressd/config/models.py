"""The keys the configuration file may hold, their types and their defaults.

The policy keys (``home_countries``, ``internal_networks``, ``zones``,
``unknown_country``, ``routes``) are read by both ``egressd audit`` and
``egressd run``; the daemon's sections (``geoip``, ``metrics``, ``alerts``,
``flows``, ``names``, the capture keys and ``sensor``) only by ``egressd run``.
Every model is strict: a quoted number is not a number and an unknown key is
an error.  :class:`Config` is what ``egressd run`` gets once the file is checked.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from egressd.metrics_http import WebConfig

from egressd.config.values import (
    Asn,
    Cidr,
    CidrOrAuto,
    Count,
    Country,
    Expires,
    Interface,
    Listen,
    Name,
    NonNegativeSeconds,
    PortRange,
    Protocol,
    Seconds,
    ServerName,
    Text,
    Url,
    ZoneName,
    _fail,
    _section,
    split_host_port,
)
from egressd.model import PROTO_TCP, PROTO_UDP
from egressd.policy import Policy


class _Model(BaseModel):
    """Strict: a quoted "300" is not a number, 1 is not true, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# -- policy keys ------------------------------------------------------------


class _To(_Model):
    countries: tuple[Country, ...] = ()
    networks: tuple[Cidr, ...] = ()
    asns: tuple[Asn, ...] = ()
    names: tuple[ServerName, ...] = ()

    @model_validator(mode="after")
    def _something(self) -> _To:
        if not (self.countries or self.networks or self.asns or self.names):
            raise _fail("expected at least one of countries, networks, asns or names")
        return self


class _Route(_Model):
    name: Name
    approval: Text
    from_: Annotated[tuple[Text, ...], Field(min_length=1)] | None = Field(None, alias="from")
    to: _To
    protocols: Annotated[tuple[Protocol, ...], Field(min_length=1)] | None = None
    ports: Annotated[tuple[PortRange, ...], Field(min_length=1)] | None = None
    expires: Expires = None


class _PolicyKeys(_Model):
    home_countries: Annotated[tuple[Country, ...], Field(min_length=1)]
    internal_networks: Annotated[tuple[CidrOrAuto, ...], Field(min_length=1)] | None = None
    zones: dict[ZoneName, Annotated[tuple[Cidr, ...], Field(min_length=1)]] | None = None
    unknown_country: Literal["unknown", "violation", "allow"] = "unknown"
    routes: tuple[_Route, ...] | None = None


# -- daemon keys ------------------------------------------------------------


class GeoIPConfig(_Model):
    """``geoip:`` where the GeoIP databases are and how many lookups to cache."""

    country_db: Text | None = None
    """MaxMind-format country (or city) database; None: the embedded registry data."""
    asn_db: Text | None = None
    """MaxMind-format ASN database; None: no ASNs (routes by ``asns`` never match)."""
    cache_size: Count = 65536
    """Addresses whose lookup result is kept in memory."""


class MetricsConfig(_Model):
    """``metrics:`` where the Prometheus ``/metrics`` endpoint listens."""

    listen: Listen = "127.0.0.1:9855"
    web_config: Text | None = None
    """Web config file (Prometheus exporter format) adding TLS and basic auth; None: plain."""

    def load_web_config(self) -> WebConfig | None:
        """The checked ``web_config`` file, or None; raises :class:`ConfigError`."""
        if self.web_config is None:
            return None
        from egressd.metrics_http import load_web_config

        return load_web_config(self.web_config)

    @property
    def host(self) -> str:
        """The address to bind (brackets removed from IPv6)."""
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]


class AlertsConfig(_Model):
    """``alerts:`` where violations are sent and how often they are repeated."""

    jsonl: Text | None = None
    """File that gets one JSON line per alert; ``-`` for stdout; None: off."""
    syslog: bool = False
    alertmanager: Url | None = None
    """Base URL of a Prometheus Alertmanager; None: off."""
    suppress_seconds: NonNegativeSeconds = 300.0
    """An alert that repeats an earlier one is not sent again within this time."""
    alert_on_unknown: bool = False
    """Also alert on ``unknown`` verdicts (remote without a country)."""
    spool_dir: Text = "/var/lib/egressd/spool"
    """Where alerts wait while Alertmanager is unreachable."""
    spool_max_bytes: Count = 104857600


class IdleTimeouts(_Model):
    """``flows.idle_timeout_seconds``: a flow ends after this long without a packet."""

    tcp: Seconds = 300.0
    udp: Seconds = 60.0
    other: Seconds = 30.0


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


class FlowsConfig(_Model):
    """``flows:`` when the live daemon considers a flow finished, and how many it tracks."""

    idle_timeout_seconds: Annotated[IdleTimeouts, BeforeValidator(_section)] = IdleTimeouts()
    tcp_close_grace_seconds: NonNegativeSeconds = 5.0
    """How long a closed TCP flow (FIN or RST seen) is kept for late packets."""
    active_timeout_seconds: Seconds = 300.0
    """A long-lived flow is reported (as an interim record) at least this often."""
    max_flows: Count = 1_000_000

    def idle_timeout_ns(self, proto: int) -> int:
        """Idle timeout for an IP protocol number: tcp, udp, or the ``other`` value."""
        idle = self.idle_timeout_seconds
        if proto == PROTO_TCP:
            return _ns(idle.tcp)
        if proto == PROTO_UDP:
            return _ns(idle.udp)
        return _ns(idle.other)

    @property
    def tcp_close_grace_ns(self) -> int:
        return _ns(self.tcp_close_grace_seconds)

    @property
    def active_timeout_ns(self) -> int:
        return _ns(self.active_timeout_seconds)


class NamesConfig(_Model):
    """``names:`` how server names are read off the wire (DNS, TLS SNI, QUIC)."""

    enabled: bool = True
    """Read server names; off: no names, and routes that list names never match."""
    dns_entries: Count = 100_000
    """(client, address) pairs whose DNS answers are remembered."""
    hold_seconds: NonNegativeSeconds = 2.0
    """How long a new TCP flow waits for its TLS ClientHello before it is decided."""


class _FullDocument(_PolicyKeys):
    interfaces: tuple[Interface, ...] | None = None
    capture_workers: Annotated[int, Field(ge=1, le=64)] = 1
    capture_filter: Text | None = "ip or ip6"
    promiscuous: bool = False
    geoip: Annotated[GeoIPConfig, BeforeValidator(_section)] = GeoIPConfig()
    metrics: Annotated[MetricsConfig, BeforeValidator(_section)] = MetricsConfig()
    alerts: Annotated[AlertsConfig, BeforeValidator(_section)] = AlertsConfig()
    flows: Annotated[FlowsConfig, BeforeValidator(_section)] = FlowsConfig()
    names: Annotated[NamesConfig, BeforeValidator(_section)] = NamesConfig()
    sensor: Name | None = None


class _PolicyDocument(_PolicyKeys):
    """The policy keys checked; the daemon's keys allowed but not looked at."""

    interfaces: Any = None
    capture_workers: Any = None
    capture_filter: Any = None
    promiscuous: Any = None
    geoip: Any = None
    metrics: Any = None
    alerts: Any = None
    flows: Any = None
    names: Any = None
    sensor: Any = None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``egressd run`` needs: the policy and the daemon's settings."""

    policy: Policy
    interfaces: tuple[str, ...] = ()
    """Interfaces to capture on (empty: the daemon refuses to start live capture)."""
    capture_workers: int = 1
    """Processes that share the capture (PACKET_FANOUT by flow hash)."""
    capture_filter: str | None = "ip or ip6"
    """BPF filter for the capture; None: every packet."""
    promiscuous: bool = False
    geoip: GeoIPConfig = field(default_factory=GeoIPConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    flows: FlowsConfig = field(default_factory=FlowsConfig)
    names: NamesConfig = field(default_factory=NamesConfig)
    sensor: str | None = None
    """Name of this sensor in alerts; None: the host name (see :attr:`sensor_name`)."""

    @property
    def sensor_name(self) -> str:
        """``sensor``, or the host name when the file sets none."""
        return self.sensor if self.sensor is not None else socket.gethostname()
