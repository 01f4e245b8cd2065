"""Reading the YAML file that holds the policy and the daemon's settings.

One file serves both commands: ``egressd audit --policy FILE`` reads only the
policy keys (:func:`load_policy`; the daemon keys may be present and are not
checked), ``egressd run --config FILE`` reads everything (:func:`load_config`).
Every key is described in ``docs/configuration.md``.

The file is data: it is parsed with YAML's safe loader into plain nodes,
nothing in it is ever run or turned into a Python object of its choosing.
Every problem is reported as a :class:`ConfigError` whose text is one line,
``FILE:LINE: KEY.PATH: VALUE: what was expected``, for example::

    policy.yaml:14: routes[0].to.countries[1]: 'UK' is not an ISO 3166-1 alpha-2
    country code (use GB for the United Kingdom)

(one line in reality), so that an operator (or an editor) can jump straight to the line.  Only the
first problem, in file order, is reported.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import iso3166
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

if TYPE_CHECKING:
    from egressd.metrics_http import WebConfig

from egressd.model import PROTO_NAMES, PROTO_NUMBERS, PROTO_TCP, PROTO_UDP
from egressd.netset import DEFAULT_INTERNAL_NETWORKS, IPNetwork
from egressd.policy import Policy, Route, UnknownCountry, datetime_to_ns

MAX_FILE_BYTES: Final = 4 * 1024 * 1024
"""Larger files are refused unread: a policy is a few kilobytes."""
MAX_ALIASES: Final = 100
"""YAML aliases (``*name``) allowed in one file."""
MAX_NODES: Final = 100_000
"""Values allowed in one file, counting each alias as often as it is used
(this is what stops "billion laughs" documents)."""
MAX_DEPTH: Final = 32
"""How deeply lists and mappings may nest."""

PathPart = str | int
KeyPath = tuple[PathPart, ...]


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: Final = _NoValue()
"""``ConfigError.value`` when the error is not about one value (missing key, bad file)."""


_PREDICATES: Final = ("is ", "has ", "duplicates ")


class ConfigError(ValueError):
    """The configuration file is unusable; ``str()`` says where and why, in one line.

    The CLI prints the text and exits with status 2.  ``line`` is 1-based
    (None when the problem is the file itself, e.g. unreadable), ``key_path``
    is like ``routes[0].to.countries[1]`` (empty when not about a key), and
    ``value`` is the offending value (:data:`NO_VALUE` when there is none).
    """

    def __init__(
        self,
        file: str,
        line: int | None,
        key_path: str,
        message: str,
        value: object = NO_VALUE,
    ) -> None:
        self.file = file
        self.line = line
        self.key_path = key_path
        self.value = value
        self.message = message
        parts = [file if line is None else f"{file}:{line}"]
        if key_path:
            parts.append(key_path)
        text = ": ".join(parts)
        if value is not NO_VALUE:
            # "'UK' is not ..." reads as a sentence; "70000: expected ..." does not.
            sep = " " if message.startswith(_PREDICATES) else ": "
            text = f"{text}: {_show(value)}{sep}{message}"
        else:
            text = f"{text}: {message}"
        super().__init__(_one_line(text))

    def __str__(self) -> str:
        return str(self.args[0])


def _one_line(text: str) -> str:
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def _plain(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: object) -> str:
    """How a value appears in messages: as close to YAML as repr allows."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    text = repr(_plain(value))
    if len(text) > 80:
        text = text[:77] + "..."
    return _one_line(text)


def format_key_path(path: KeyPath) -> str:
    """``("routes", 0, "to", "countries", 1)`` → ``routes[0].to.countries[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------
# YAML → plain values, remembering the line of every key and value
# ---------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))


class _Refused(Exception):
    """Raised inside the loader; turned into a ConfigError by the caller."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _CountingLoader(yaml.SafeLoader):
    """The safe loader, limited in aliases and nesting while it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(line, f"more than {MAX_ALIASES} YAML aliases (*name)")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(line, f"lists and mappings nested more than {MAX_DEPTH} deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Document:
    """A YAML document as plain values plus the line of each key and value."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: dict[KeyPath, int] = {}
        self.key_lines: dict[KeyPath, int] = {}
        self.nodes = 0
        self._constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()

    def error(self, path: KeyPath, message: str, value: object = NO_VALUE) -> ConfigError:
        return ConfigError(self.name, self.line_of(path), format_key_path(path), message, value)

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the value at ``path``, or of the nearest enclosing value."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def convert(self, node: Node, path: KeyPath) -> object:
        self.nodes += 1
        line = node.start_mark.line + 1
        if self.nodes > MAX_NODES:
            raise ConfigError(
                self.name, line, "", f"more than {MAX_NODES} values (aliases count each use)"
            )
        self.lines[path] = line
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._open:
            raise self.error(path, "a YAML alias refers to a list or mapping that contains it")
        self._open.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _TAG + "seq":
                    raise self.error(path, f"unsupported YAML tag {_short_tag(node.tag)}")
                return tuple(self.convert(item, (*path, i)) for i, item in enumerate(node.value))
            if isinstance(node, MappingNode):
                if node.tag != _TAG + "map":
                    raise self.error(path, f"unsupported YAML tag {_short_tag(node.tag)}")
                return self._mapping(node, path)
        finally:
            self._open.discard(id(node))
        raise self.error(path, "unsupported YAML node")  # pragma: no cover

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, object]:
        out: dict[str, object] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                raise ConfigError(
                    self.name, key_line, format_key_path(path), "keys must be plain names"
                )
            if key_node.tag == _TAG + "merge":
                raise ConfigError(
                    self.name,
                    key_line,
                    format_key_path(path),
                    "YAML merge keys (<<) are not supported: write the keys out",
                )
            # Keys are names: a key YAML would read as a number, a date or
            # true/false is taken as written.
            key = key_node.value if key_node.tag != _TAG + "str" else str(key_node.value)
            key_path = (*path, key)
            if key in out:
                raise ConfigError(
                    self.name,
                    key_line,
                    format_key_path(key_path),
                    f"duplicates the key at line {self.key_lines[key_path]}",
                )
            self.key_lines[key_path] = key_line
            out[key] = self.convert(value_node, key_path)
        return out

    def _scalar(self, node: ScalarNode, path: KeyPath) -> object:
        tag = node.tag
        if tag == _TAG + "str":
            return node.value
        if tag not in _SCALAR_TAGS:
            raise self.error(path, f"unsupported YAML tag {_short_tag(tag)}", node.value)
        if tag == _TAG + "bool" and node.style is None and _wants_text(path):
            # A bare NO in a list of countries is Norway, not false.
            return node.value
        try:
            return self._constructor.construct_object(node)
        except (ValueError, KeyError, TypeError, OverflowError, yaml.YAMLError):
            kind = tag.removeprefix(_TAG)
            what = "date" if kind == "timestamp" else kind
            raise self.error(path, f"is not a valid {what}", node.value) from None


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _wants_text(path: KeyPath) -> bool:
    """Paths whose values are country codes, where a bare ``NO`` means Norway."""
    return (len(path) == 2 and path[0] == "home_countries") or (
        len(path) == 5 and path[0] == "routes" and path[2:4] == ("to", "countries")
    )


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            name, None, "", f"file is {len(data)} bytes, more than the limit of 4 MiB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            name, line, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return text.removeprefix("\ufeff")


def _compose(text: str, name: str) -> Node | None:
    loader: _CountingLoader | None = None
    try:
        loader = _CountingLoader(text)
        return loader.get_single_node()
    except _Refused as exc:
        raise ConfigError(name, exc.line, "", exc.message) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "unreadable"
        if exc.context and exc.problem:
            if exc.problem.startswith("but "):
                what = f"{exc.context}, {exc.problem}"
            else:
                what = f"{exc.problem} ({exc.context})"
        raise ConfigError(name, line, "", f"invalid YAML: {what}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            name, line, "", f"invalid YAML: character U+{exc.character:04X} is not allowed"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, None, "", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(name, None, "", "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_document(data: bytes, name: str) -> tuple[_Document, dict[str, object]]:
    text = _decode(data, name)
    node = _compose(text, name)
    if node is None:
        raise ConfigError(name, 1, "", "the file is empty: expected a mapping with home_countries")
    doc = _Document(name)
    value = doc.convert(node, ())
    if not isinstance(value, dict):
        raise ConfigError(
            name,
            node.start_mark.line + 1,
            "",
            "the top level must be a mapping of keys such as home_countries, not "
            + ("a list" if isinstance(value, tuple) else f"the value {_show(value)}"),
        )
    return doc, value


# ---------------------------------------------------------------------------
# Value checks (pydantic validators raising one-line messages)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# pydantic errors → one line
# ---------------------------------------------------------------------------

_TYPE_WORDS: Final = {
    "int_type": "expected an integer",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "finite_number": "expected a finite number",
    "too_short": "expected at least one entry",
}


_MISSING_HINTS: Final = {
    "home_countries": "the countries data may move freely between, such as [CN]",
    "name": "every route needs a unique name",
    "approval": "every route needs the reference of its consent or authority approval",
    "to": "where the route leads: countries, networks, asns and/or names",
}


def _model_below(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_below(arg)
        if found is not None:
            return found
    return None


def _expected_keys(root: type[BaseModel], parent: KeyPath) -> list[str]:
    model: type[BaseModel] | None = root
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        info = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = None if info is None else _model_below(info.annotation)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _describe(err: Mapping[str, Any], root: type[BaseModel], path: KeyPath) -> str:
    kind = str(err["type"])
    if kind == "egressd":
        return str(err["msg"])
    if kind == "missing":
        hint = _MISSING_HINTS.get(str(path[-1]) if path else "")
        return "required key is missing" + (f" ({hint})" if hint else "")
    if kind == "extra_forbidden":
        keys = _expected_keys(root, path[:-1])
        return f"unknown key (expected one of: {', '.join(keys)})"
    if kind in _TYPE_WORDS:
        return _TYPE_WORDS[kind]
    ctx = err.get("ctx") or {}
    if kind == "greater_than":
        return f"expected a number greater than {_number(ctx.get('gt'))}"
    if kind == "greater_than_equal":
        return f"expected a number of at least {_number(ctx.get('ge'))}"
    msg = str(err["msg"])
    return "expected " + msg.removeprefix("Input should be ") if msg.startswith("Input") else msg


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _lookup(data: object, path: KeyPath) -> object:
    for part in path:
        if isinstance(data, dict):
            if part not in data:
                return NO_VALUE
            data = data[part]
        elif isinstance(data, tuple) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return NO_VALUE
    return data


def _first_error(
    exc: ValidationError, doc: _Document, data: dict[str, object], root: type[BaseModel]
) -> ConfigError:
    errors = exc.errors()
    # A misspelt key also shows up as the right key missing: report the typo.
    misspelt = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "extra_forbidden"}
    found: list[tuple[int, int, ConfigError]] = []
    for order, err in enumerate(errors):
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "missing" and loc[:-1] in misspelt:
            continue
        on_key = bool(loc) and loc[-1] == "[key]"
        path: KeyPath = tuple(p for p in loc if p != "[key]")
        message = _describe(err, root, path)
        value: object = NO_VALUE
        if kind == "missing":
            line = doc.line_of(path[:-1])
        elif kind == "extra_forbidden" or on_key:
            line = doc.key_lines.get(path, doc.line_of(path))
            if on_key:
                value = path[-1]
        else:
            line = doc.line_of(path)
            value = _lookup(data, path)
        error = ConfigError(doc.name, line, format_key_path(path), message, value)
        found.append((line or 0, order, error))
    return min(found, key=lambda item: item[:2])[2]


# ---------------------------------------------------------------------------
# Cross-checks and building the Policy
# ---------------------------------------------------------------------------


def _build_policy(
    parsed: _PolicyKeys,
    doc: _Document,
    sha256: str,
    now: datetime | None,
) -> Policy:
    problems: list[ConfigError] = []
    zones = parsed.zones or {}
    routes: list[Route] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(parsed.routes or ()):
        base: KeyPath = ("routes", index)
        route_line = doc.line_of(base)
        if raw.name in seen:
            problems.append(
                doc.error(
                    (*base, "name"), f"duplicates the route at line {seen[raw.name]}", raw.name
                )
            )
        else:
            seen[raw.name] = route_line or 0
        from_zones: list[str] = []
        from_nets: list[IPNetwork] = []
        for i, source in enumerate(raw.from_ or ()):
            if source in zones:
                from_zones.append(source)
                continue
            try:
                from_nets.append(ipaddress.ip_network(source.strip(), strict=True))
                continue
            except ValueError:
                pass
            try:
                loose = ipaddress.ip_network(source.strip(), strict=False)
                message = f"has host bits set (did you mean {loose}?)"
            except ValueError:
                known = ", ".join(zones) if zones else "none are defined"
                message = f"is not a zone name or a CIDR (zones: {known})"
            problems.append(doc.error((*base, "from", i), message, source))
        routes.append(
            Route(
                name=raw.name,
                approval=raw.approval,
                countries=frozenset(raw.to.countries),
                networks=raw.to.networks,
                asns=frozenset(raw.to.asns),
                from_zones=tuple(from_zones),
                from_networks=tuple(from_nets),
                protocols=None if raw.protocols is None else frozenset(raw.protocols),
                ports=raw.ports,
                expires_ns=raw.expires,
                line=route_line,
                names=tuple(dict.fromkeys(raw.to.names)),
            )
        )
    if problems:
        raise min(problems, key=lambda e: e.line or 0)

    if parsed.internal_networks is None:
        internal: tuple[IPNetwork | str, ...] = DEFAULT_INTERNAL_NETWORKS
        auto = False
    else:
        auto = "auto" in parsed.internal_networks
        internal = tuple(n for n in parsed.internal_networks if n != "auto")
    return Policy(
        home_countries=parsed.home_countries,
        internal_networks=internal,
        internal_auto=auto,
        zones=zones,
        unknown_country=UnknownCountry(parsed.unknown_country),
        routes=routes,
        path=doc.name,
        sha256=sha256,
        now=now,
    )


def _check_metrics(parsed: _FullDocument, doc: _Document, policy: Policy) -> None:
    """Load ``metrics.web_config`` (errors name both files); warn about an open endpoint."""
    metrics = parsed.metrics
    path: KeyPath = ("metrics", "web_config")
    try:
        web = metrics.load_web_config()
    except ConfigError as exc:
        raise doc.error(path, str(exc)) from None
    host = metrics.host
    try:
        loopback = host.lower().rstrip(".") == "localhost" or ipaddress.ip_address(
            host
        ).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    where = f"{doc.name}:{doc.line_of(('metrics', 'listen')) or 1}: metrics"
    if web is None or (web.tls is None and not web.basic_auth_users):
        policy.warnings.append(
            f"{where}.listen: {host!r} is not a loopback address and metrics.web_config is "
            "not set (or sets nothing): the metrics are served without TLS or a password"
        )
    elif web.tls is None and web.basic_auth_users:
        policy.warnings.append(
            f"{where}.web_config: basic auth without tls_server_config sends passwords "
            "in clear text"
        )


def _check_interfaces(parsed: _FullDocument, doc: _Document) -> None:
    if parsed.capture_workers > 1 and parsed.internal_networks and "auto" in (
            parsed.internal_networks):
        raise doc.error(("capture_workers",), "needs internal_networks listed: 'auto' (the "
                        "gateway's own networks, followed over netlink) works with one capture "
                        "process only", parsed.capture_workers)
    seen: set[str] = set()
    for i, name in enumerate(parsed.interfaces or ()):
        if name in seen:
            raise doc.error(("interfaces", i), "is listed twice", name)
        seen.add(name)


_M = TypeVar("_M", bound=_PolicyKeys)


def _validate(model: type[_M], doc: _Document, data: dict[str, object]) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, doc, data, model) from None


def parse_config(data: bytes, name: str, *, now: datetime | None = None) -> Config:
    """Check and build a :class:`Config` from the bytes of a configuration file.

    ``name`` is how the file is named in messages (usually the path as the
    user gave it).  ``now`` (timezone-aware) decides which routes are reported
    as already expired in ``policy.warnings``.  Raises :class:`ConfigError`.
    """
    doc, values = _read_document(data, name)
    parsed = _validate(_FullDocument, doc, values)
    policy = _build_policy(parsed, doc, hashlib.sha256(data).hexdigest(), now)
    _check_interfaces(parsed, doc)
    _check_metrics(parsed, doc, policy)
    return Config(
        policy=policy,
        interfaces=parsed.interfaces or (),
        capture_workers=parsed.capture_workers,
        capture_filter=parsed.capture_filter,
        promiscuous=parsed.promiscuous,
        geoip=parsed.geoip,
        metrics=parsed.metrics,
        alerts=parsed.alerts,
        flows=parsed.flows,
        names=parsed.names,
        sensor=parsed.sensor,
    )


def parse_policy(data: bytes, name: str, *, now: datetime | None = None) -> Policy:
    """Like :func:`parse_config`, but only the policy keys are checked and kept.

    For ``egressd audit``: a file written for the daemon is accepted even when
    its daemon settings would not suit this machine.  Unknown keys are still
    refused.
    """
    doc, values = _read_document(data, name)
    parsed = _validate(_PolicyDocument, doc, values)
    return _build_policy(parsed, doc, hashlib.sha256(data).hexdigest(), now)


def _read(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    name = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(name, None, "", f"cannot read the file: {reason}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(name, None, "", "file is larger than the limit of 4 MiB")
    return data, name


def load_config(path: str | os.PathLike[str], *, now: datetime | None = None) -> Config:
    """Read and check a configuration file for ``egressd run``; raises :class:`ConfigError`."""
    data, name = _read(path)
    return parse_config(data, name, now=now)


def load_policy(path: str | os.PathLike[str], *, now: datetime | None = None) -> Policy:
    """Read and check the policy keys of a file for ``egressd audit``."""
    data, name = _read(path)
    return parse_policy(data, name, now=now)


__all__ = [
    "MAX_ALIASES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "NO_VALUE",
    "AlertsConfig",
    "Config",
    "ConfigError",
    "FlowsConfig",
    "GeoIPConfig",
    "IdleTimeouts",
    "MetricsConfig",
    "NamesConfig",
    "format_key_path",
    "load_config",
    "load_policy",
    "parse_config",
    "parse_policy",
    "split_host_port",
]
