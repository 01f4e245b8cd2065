"""Checking a configuration file as a whole and building the :class:`Policy` it describes.

:func:`load_config` (for ``egressd run``) and :func:`load_policy` (for
``egressd audit``) read a file; :func:`parse_config` and :func:`parse_policy`
do the same for bytes already in memory.  Besides the checks of single keys,
this is where routes are cross-checked (unique names, ``from`` entries that
name a zone or a CIDR), where the metrics endpoint's web config file is
loaded, and where a metrics endpoint served without TLS or a password is
added to ``policy.warnings``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from datetime import datetime
from typing import TypeVar

from pydantic import ValidationError

from egressd.config.errors import _first_error
from egressd.config.models import Config, _FullDocument, _PolicyDocument, _PolicyKeys
from egressd.config.yaml_doc import (
    MAX_FILE_BYTES,
    ConfigError,
    KeyPath,
    _Document,
    _read_document,
    read_limited,
)
from egressd.netset import DEFAULT_INTERNAL_NETWORKS, IPNetwork
from egressd.policy import Policy, Route, UnknownCountry


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
    return read_limited(path, MAX_FILE_BYTES), os.fspath(path)


def load_config(path: str | os.PathLike[str], *, now: datetime | None = None) -> Config:
    """Read and check a configuration file for ``egressd run``; raises :class:`ConfigError`."""
    data, name = _read(path)
    return parse_config(data, name, now=now)


def load_policy(path: str | os.PathLike[str], *, now: datetime | None = None) -> Policy:
    """Read and check the policy keys of a file for ``egressd audit``."""
    data, name = _read(path)
    return parse_policy(data, name, now=now)
