"""The checks applied to single values of the configuration file.

Country codes, CIDRs, AS numbers, protocols, ports, expiry dates, zone and
interface names, server names, listen addresses and URLs.  Each check accepts
the forms documented in ``docs/configuration.md`` and otherwise fails with a
one-line message that says what was expected; the ``Annotated`` types at the
end attach the checks to the keys of :mod:`egressd.config.models`.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

import iso3166
from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from egressd.model import PROTO_NAMES, PROTO_NUMBERS
from egressd.netset import IPNetwork
from egressd.policy import datetime_to_ns


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("egressd", "{detail}", {"detail": message})


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _fail("expected a string (quote it if YAML reads it as a number, date or boolean)")
    if not value.strip():
        raise _fail("expected a non-empty string")
    return value


def _name(value: object) -> str:
    text = _text(value)
    if len(text) > 128 or not text.isprintable() or text != text.strip():
        raise _fail("expected a name of at most 128 printable characters")
    return text


_CUSTOM_HINTS: Final = {
    "UK": "use GB for the United Kingdom",
    "EU": "the European Union is not a country: list its member states",
    "EL": "use GR for Greece",
}


def _country(value: object) -> str:
    if not isinstance(value, str):
        raise _fail("expected a two-letter country code such as CN")
    code = value.strip().upper()
    if code in iso3166.countries_by_alpha2:
        return code
    hint = _CUSTOM_HINTS.get(code)
    if hint is None and code in iso3166.countries_by_alpha3:
        hint = f"use {iso3166.countries_by_alpha3[code].alpha2}"
    suffix = f" ({hint})" if hint else ""
    raise _fail(f"is not an ISO 3166-1 alpha-2 country code{suffix}")


_CIDR_EXAMPLE: Final = "expected a CIDR such as 10.0.0.0/8 or fd00::/8"


def _parse_cidr(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _fail(f"is not a valid CIDR ({_CIDR_EXAMPLE})") from None
    raise _fail(f"has host bits set (did you mean {loose}?)")


def _cidr(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise _fail(_CIDR_EXAMPLE)
    return _parse_cidr(value)


def _cidr_or_auto(value: object) -> IPNetwork | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if not isinstance(value, str):
        raise _fail(f"{_CIDR_EXAMPLE}, or auto")
    return _parse_cidr(value)


def _asn(value: object) -> int:
    number: object = value
    if isinstance(value, str) and re.fullmatch(r"(?i)AS\d{1,10}", value.strip()):
        number = int(value.strip()[2:])
    if type(number) is int and 1 <= number <= 0xFFFFFFFF:
        return number
    raise _fail("expected an AS number 1-4294967295 such as 4134 or 'AS4134'")


_PROTO_LIST: Final = ", ".join(PROTO_NAMES[n] for n in sorted(PROTO_NAMES, key=str))


def _protocol(value: object) -> int:
    if type(value) is int and 0 <= value <= 255:
        return value
    if isinstance(value, str) and value.strip().lower() in PROTO_NUMBERS:
        return PROTO_NUMBERS[value.strip().lower()]
    names = ", ".join(PROTO_NAMES.values())
    raise _fail(f"is not a protocol (expected {names} or an IANA number 0-255)")


def _port(value: object) -> tuple[int, int]:
    if type(value) is int:
        if 1 <= value <= 65535:
            return (value, value)
        raise _fail("expected a port 1-65535")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", value)
        if match:
            low = int(match[1])
            high = int(match[2]) if match[2] else low
            if not (1 <= low <= 65535 and 1 <= high <= 65535):
                raise _fail("expected ports 1-65535")
            if low > high:
                raise _fail("expected a range LOW-HIGH with LOW <= HIGH")
            return (low, high)
    raise _fail("expected a port 1-65535 or a range such as '8000-8100'")


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})?)?"
)


def _expires(value: object) -> int | None:
    """A date (00:00 UTC that day) or an RFC 3339 time → ns since the epoch."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _fail(
                "a time without a time zone is ambiguous: add Z or an offset such as +08:00"
            )
        return datetime_to_ns(value)
    if isinstance(value, date):
        return datetime_to_ns(datetime(value.year, value.month, value.day, tzinfo=UTC))
    if isinstance(value, str):
        match = _RFC3339.fullmatch(value.strip())
        if match:
            year, month, day, hour, minute, second, frac, offset = match.groups()
            if hour is not None and offset is None:
                raise _fail(
                    "a time without a time zone is ambiguous: add Z or an offset such as +08:00"
                )
            try:
                tz = UTC
                if offset and offset not in "Zz":
                    sign = -1 if offset[0] == "-" else 1
                    delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
                    tz = timezone(sign * delta)
                moment = datetime(
                    int(year),
                    int(month),
                    int(day),
                    int(hour or 0),
                    int(minute or 0),
                    int(second or 0),
                    tzinfo=tz,
                )
            except ValueError:
                raise _fail("is not a valid date or time") from None
            return datetime_to_ns(moment) + int((frac or "0").ljust(9, "0"))
    raise _fail(
        "expected a date such as 2027-01-01 or an RFC 3339 time such as 2027-01-01T00:00:00Z"
    )


_ZONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _zone_name(value: object) -> str:
    if not isinstance(value, str) or not _ZONE_NAME.fullmatch(value):
        raise _fail("expected a zone name of up to 64 letters, digits, '-', '_' or '.'")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return value
    raise _fail("a zone name must not look like an address or a CIDR")


def _interface(value: object) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value.encode()) <= 15
        or not value.isprintable()
        or any(c in value for c in " /\t")
        or value in (".", "..")
    ):
        raise _fail("expected a network interface name such as eth0 (1-15 characters, no '/')")
    return value


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NAME_HELP: Final = ("expected a host name such as backup.vendor.example, or *.vendor.example "
                     "for every name below vendor.example")


def _server_name(value: object) -> str:
    """A route's ``to.names`` entry: a host name or ``*.domain``, returned lower-case."""
    if not isinstance(value, str):
        raise _fail(_NAME_HELP)
    name = value.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    rest = name[2:] if name.startswith("*.") else name
    labels = rest.split(".")
    if (not rest or len(rest) > 253 or not rest.isascii() or "*" in rest
            or not all(_DNS_LABEL.fullmatch(label) for label in labels)):
        raise _fail(_NAME_HELP)
    if name.startswith("*.") and len(labels) < 2:
        raise _fail(f"{_NAME_HELP}; a wildcard needs at least two labels after '*.'")
    return name


_LISTEN_HELP: Final = "expected HOST:PORT such as '127.0.0.1:9855' or '[::1]:9855'"


def split_host_port(value: str) -> tuple[str, int]:
    """``'127.0.0.1:9855'`` → ``('127.0.0.1', 9855)``; ``'[::1]:9855'`` → ``('::1', 9855)``.

    Raises :class:`ValueError` with a one-line explanation for anything else.
    """
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\]:(\d{1,5})", value)
        if not match:
            raise ValueError(_LISTEN_HELP)
        host = match[1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address ({_LISTEN_HELP})") from None
        port_text = match[2]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(_LISTEN_HELP)
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets, as in '[::1]:9855'")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address ({_LISTEN_HELP})")
        if not port_text.isdigit() or len(port_text) > 5:
            raise ValueError(_LISTEN_HELP)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("the port must be 1-65535")
    return host, port


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise _fail(_LISTEN_HELP)
    try:
        split_host_port(value)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return value


def _url(value: object) -> str:
    help_text = "expected an http:// or https:// URL such as http://127.0.0.1:9093"
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise _fail(help_text)
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise _fail(help_text)
    return value


def _section(value: object) -> object:
    """An empty section (``geoip:`` with nothing under it) means all defaults."""
    return {} if value is None else value


Text = Annotated[str, BeforeValidator(_text)]
Name = Annotated[str, BeforeValidator(_name)]
Country = Annotated[str, BeforeValidator(_country)]
Cidr = Annotated[IPNetwork, BeforeValidator(_cidr)]
CidrOrAuto = Annotated[IPNetwork | Literal["auto"], BeforeValidator(_cidr_or_auto)]
Asn = Annotated[int, BeforeValidator(_asn)]
Protocol = Annotated[int, BeforeValidator(_protocol)]
PortRange = Annotated[tuple[int, int], BeforeValidator(_port)]
Expires = Annotated[int | None, BeforeValidator(_expires)]
ZoneName = Annotated[str, BeforeValidator(_zone_name)]
Interface = Annotated[str, BeforeValidator(_interface)]
Listen = Annotated[str, BeforeValidator(_listen)]
Url = Annotated[str, BeforeValidator(_url)]
ServerName = Annotated[str, BeforeValidator(_server_name)]
Seconds = Annotated[float, Field(gt=0)]
NonNegativeSeconds = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(gt=0)]
