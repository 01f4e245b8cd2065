"""Country and ASN of a remote address, for the policy stage.

The pipeline asks once per new remote address (never per packet), through a
:class:`CachedResolver`.  Two kinds of data sit behind it:

* **MaxMind** GeoIP2 / GeoLite2 databases (:class:`MaxMindResolver`): where an
  address *is* (``country``) and which country its block is registered to
  (``registered_country``), plus the autonomous system from an ASN database.
  Use these whenever the answer matters: a data-export policy is about where
  the data goes.
* The **embedded registry data** of the ``iptocc`` package
  (:class:`RegistryResolver`): the country an address block is delegated to
  by the regional internet registries.  It needs no download and no licence
  key, so it is the default, but it is not a location: a block registered in
  one country is often used in another (cloud regions, CDNs, anycast).

:func:`open_resolver` picks between them from the two configured paths.

Addresses that embed an IPv4 address (``::ffff:a.b.c.d`` IPv4-mapped,
``::a.b.c.d`` IPv4-compatible, ``2002:AABB:CCDD::/48`` 6to4 and the NAT64
well-known prefix ``64:ff9b::a.b.c.d``) are looked up as that IPv4 address, so
they get the same answer whether or not the database aliases those ranges,
including from an IPv4-only database.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import socket
import stat
from collections import OrderedDict
from typing import Any, Final, Literal, Protocol

import iptocc
import maxminddb

from egressd.model import GeoInfo, GeoSource

__all__ = [
    "REGISTRY_NOTICE",
    "CachedResolver",
    "CompositeResolver",
    "MaxMindResolver",
    "RegistryResolver",
    "Resolver",
    "StrPath",
    "open_resolver",
]

StrPath = str | os.PathLike[str]

REGISTRY_NOTICE: Final = (
    "no MaxMind country database configured, so countries come from the embedded "
    "registry data: the country an address block is registered to at the RIRs, not "
    "where the address is; configure a GeoLite2 or GeoIP2 Country/City database for "
    "locations (and a GeoLite2-ASN database for AS numbers)"
)
"""One line for the CLI to print once on stderr when the embedded default is in use.

No program-name prefix: the caller adds its own (e.g. ``egressd: warning:``).

A resolver uses the embedded default when one of its :meth:`Resolver.sources`
has ``source == "iptocc"``.
"""


class Resolver(Protocol):
    """Answers "which country and AS is this address in?" for the policy stage."""

    def lookup(self, ip: str) -> GeoInfo:
        """The answer for one address (``GeoInfo()`` when the data has none).

        Raises ValueError when ``ip`` is not an IPv4 or IPv6 address.
        """
        ...

    def sources(self) -> list[GeoSource]:
        """The databases behind the answers, for the report's ``geoip`` section."""
        ...


# ---------------------------------------------------------------------------
# Address normalization
# ---------------------------------------------------------------------------

_AF_INET: Final = socket.AF_INET
_AF_INET6: Final = socket.AF_INET6
_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96
_COMPAT_PREFIX: Final = b"\x00" * 12  # ::/96 (deprecated IPv4-compatible form)
_NAT64_PREFIX: Final = b"\x00\x64\xff\x9b" + b"\x00" * 8  # 64:ff9b::/96 (RFC 6052)
_SIXTOFOUR_PREFIX: Final = b"\x20\x02"  # 2002::/16


def _normalize(ip: str) -> tuple[str, bool]:
    """Validate ``ip``; return the address to query and whether it is IPv6.

    IPv6 forms that carry an IPv4 address come back as that IPv4 address.
    The check is strict (no ``1.2.3``, octal or hex parts, no spaces), unlike
    the lenient parser some database readers use, so a typo is an error
    instead of a lookup of some other address.  A zone (``fe80::1%eth0``) is
    dropped: it never changes the answer.
    """
    if ":" not in ip:
        try:
            socket.inet_pton(_AF_INET, ip)
        except (OSError, ValueError):
            raise ValueError(f"not an IP address: {ip!r}") from None
        return ip, False
    addr = ip.partition("%")[0] if "%" in ip else ip
    try:
        packed = socket.inet_pton(_AF_INET6, addr)
    except (OSError, ValueError):
        raise ValueError(f"not an IP address: {ip!r}") from None
    head = packed[:12]
    if head in (_MAPPED_PREFIX, _NAT64_PREFIX):
        return socket.inet_ntop(_AF_INET, packed[12:]), False
    if packed[:2] == _SIXTOFOUR_PREFIX:
        return socket.inet_ntop(_AF_INET, packed[2:6]), False
    # ::/96 holds IPv4-compatible addresses, except ::/104 (::, ::1 and the rest of
    # 0.0.0.0/8, never a host on the internet).
    if head == _COMPAT_PREFIX and packed[12:15] != b"\x00\x00\x00":
        return socket.inet_ntop(_AF_INET, packed[12:]), False
    return addr, True


# ---------------------------------------------------------------------------
# MaxMind
# ---------------------------------------------------------------------------

_Kind = Literal["country", "asn"]

# Substrings of metadata().database_type accepted for each role.
_ACCEPTED_TYPES: Final[dict[_Kind, tuple[str, ...]]] = {
    "country": ("Country", "City", "Enterprise"),
    "asn": ("ASN",),
}
_KIND_NAME: Final[dict[_Kind, str]] = {"country": "country", "asn": "ASN"}
_EXPECTED_TEXT: Final[dict[_Kind, str]] = {
    "country": "a Country, City or Enterprise database (GeoIP2/GeoLite2)",
    "asn": "an ASN database (GeoLite2-ASN)",
}


_NOTHING: Final = GeoInfo()
# GeoInfo(...) goes through a Python-level __new__; building the tuple
# directly (as NamedTuple._make does) saves a third of a microsecond a lookup.
_geo_info = tuple.__new__


def _file_id(st: os.stat_result) -> tuple[int, int, int]:
    # A file renamed into place has a new inode; a file rewritten in place a
    # new mtime or size.  Either way the triple changes.
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def _open_private_copy(path: str) -> maxminddb.Reader:
    """Open a private in-memory copy of the database file, memory-mapped.

    A reader that maps the configured file itself sees every later write to
    it: a file overwritten in place (``cp new.mmdb country.mmdb``) gives wrong
    answers, corrupt-tree errors, or SIGBUS once the file is shorter than the
    mapping.  A private copy in a memfd keeps the loaded database intact
    whatever happens to the file, at the cost of holding it in memory rather
    than in the (evictable) page cache.  Falls back to mapping the file where
    memfd is not available.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:  # pragma: no cover - not Linux
        return maxminddb.open_database(path, maxminddb.MODE_AUTO)
    with open(path, "rb") as src:
        fd = memfd_create("egressd-geoip", getattr(os, "MFD_CLOEXEC", 0))
        try:
            size = os.fstat(src.fileno()).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(fd, src.fileno(), offset, size - offset)
                if sent == 0:  # the file got shorter while being copied
                    break
                offset += sent
            # libmaxminddb opens a path: the memfd's own, then maps it; the
            # mapping keeps the copy alive after the descriptor is closed.
            return maxminddb.open_database(f"/proc/self/fd/{fd}", maxminddb.MODE_AUTO)
        finally:
            os.close(fd)


class _Database:
    """One open MaxMind file and what is needed to notice it was replaced."""

    __slots__ = ("build_epoch", "database_type", "file_id", "get", "ipv6", "kind", "path", "reader")

    def __init__(self, path: str, kind: _Kind) -> None:
        # stat before opening: if the file is replaced in between, the next
        # reload_if_changed() sees a different file id and reopens (harmless),
        # rather than keeping a stale reader forever.
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"MaxMind {_KIND_NAME[kind]} database not found", path
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(
                errno.EISDIR,
                f"MaxMind {_KIND_NAME[kind]} database path is a directory, not a file",
                path,
            )
        try:
            reader = _open_private_copy(path)
        except (maxminddb.InvalidDatabaseError, ValueError) as e:
            raise ValueError(f"{path}: not a MaxMind database (.mmdb) file") from e
        meta = reader.metadata()
        database_type = str(meta.database_type)
        if not any(t in database_type for t in _ACCEPTED_TYPES[kind]):
            reader.close()
            raise ValueError(
                f"{path}: database type is {database_type!r}, expected {_EXPECTED_TEXT[kind]}"
            )
        self.path = path
        self.kind: _Kind = kind
        self.reader = reader
        self.get = reader.get
        self.file_id = _file_id(st)
        self.ipv6 = meta.ip_version == 6
        self.database_type = database_type
        self.build_epoch: int | None = int(meta.build_epoch) if meta.build_epoch else None

    def source(self) -> GeoSource:
        return GeoSource("maxmind", self.path, self.database_type, self.build_epoch)

    def close(self) -> None:
        self.reader.close()


def _iso_code(rec: dict[str, Any], key: str) -> str | None:
    part = rec.get(key)
    if type(part) is dict:
        code = part.get("iso_code")
        return code if type(code) is str else None
    return None


class MaxMindResolver:
    """Location and AS from MaxMind GeoIP2/GeoLite2 databases.

    ``country_db`` is a Country, City or Enterprise database (GeoLite2 or
    GeoIP2); ``asn_db`` an optional GeoLite2-ASN database.  One of the two may
    be None (the daemon uses an ASN-only resolver beside the registry data
    when only an ASN database is configured), not both.

    ``country`` is the location (``country.iso_code``); it is None for anycast
    networks (served from many countries) and for records without a country,
    while ``registered_country`` may still be set.

    Raises FileNotFoundError for a missing file, ValueError for a file that is
    not a MaxMind database or holds the wrong kind of data (an ASN database
    given as the country database, or the other way round).

    The databases are memory-mapped, and read through the C extension of
    ``maxminddb`` when it is installed.  When an updater such as
    ``geoipupdate`` renames a new file into place, :meth:`reload_if_changed`
    switches to it.
    """

    def __init__(self, country_db: StrPath | None, asn_db: StrPath | None = None) -> None:
        if country_db is None and asn_db is None:
            raise ValueError("MaxMindResolver needs a country database, an ASN database or both")
        country = _Database(os.fspath(country_db), "country") if country_db is not None else None
        try:
            asn = _Database(os.fspath(asn_db), "asn") if asn_db is not None else None
        except BaseException:
            if country is not None:
                country.close()
            raise
        # One attribute holding both, replaced in a single assignment, so a
        # lookup never sees a new country database with an old ASN one.
        self._dbs: tuple[_Database | None, _Database | None] | None = (country, asn)

    def lookup(self, ip: str) -> GeoInfo:
        """Country, registered country, ASN and AS organization of ``ip``.

        Fields the databases do not have for the address are None; an address
        in neither database gives ``GeoInfo()``.  Raises ValueError when ``ip``
        is not an IP address and RuntimeError after :meth:`close`.
        """
        addr, v6 = _normalize(ip)
        dbs = self._dbs
        if dbs is None:
            raise RuntimeError("MaxMindResolver is closed")
        cdb, adb = dbs
        country = registered = asn = org = None
        if cdb is not None and (cdb.ipv6 or not v6):
            rec = cdb.get(addr)
            if type(rec) is dict:
                registered = _iso_code(rec, "registered_country")
                traits = rec.get("traits")
                if not (type(traits) is dict and traits.get("is_anycast")):
                    country = _iso_code(rec, "country")
        if adb is not None and (adb.ipv6 or not v6):
            rec = adb.get(addr)
            if type(rec) is dict:
                num = rec.get("autonomous_system_number")
                asn = num if type(num) is int else None
                name = rec.get("autonomous_system_organization")
                org = name if type(name) is str else None
        if country is None and registered is None and asn is None and org is None:
            return _NOTHING
        return _geo_info(GeoInfo, (country, registered, asn, org))

    def sources(self) -> list[GeoSource]:
        """One entry per open database: path, database type and build time."""
        dbs = self._dbs
        if dbs is None:
            return []
        return [db.source() for db in dbs if db is not None]

    def reload_if_changed(self) -> bool:
        """Reopen any database file replaced on disk since it was opened.

        Call it on SIGHUP or from a periodic timer.  Returns True when at least
        one database was reopened (clear any cache of lookups then), False when
        nothing changed.  All or nothing: when a changed file cannot be opened
        (cut short, wrong type, gone) the previously opened databases all stay
        in use and the error is raised, naming the file; the next call tries
        again.

        Old readers are not closed here but dropped, so that a lookup running
        in another thread can finish on them; they close when the last
        reference goes.
        """
        dbs = self._dbs
        if dbs is None:
            raise RuntimeError("MaxMindResolver is closed")
        fresh: list[_Database] = []
        new: list[_Database | None] = []
        try:
            for db in dbs:
                if db is None:
                    new.append(None)
                    continue
                try:
                    st = os.stat(db.path)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        errno.ENOENT, f"MaxMind {_KIND_NAME[db.kind]} database not found", db.path
                    ) from None
                if _file_id(st) == db.file_id:
                    new.append(db)
                    continue
                replacement = _Database(db.path, db.kind)
                fresh.append(replacement)
                new.append(replacement)
        except Exception as e:
            for db in fresh:
                db.close()
            e.add_note("the GeoIP databases loaded before stay in use")
            raise
        if not fresh:
            return False
        self._dbs = (new[0], new[1])
        return True

    def close(self) -> None:
        """Release the database files; lookups raise RuntimeError afterwards."""
        dbs, self._dbs = self._dbs, None
        if dbs is not None:
            for db in dbs:
                if db is not None:
                    db.close()

    def __enter__(self) -> MaxMindResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Embedded registry data
# ---------------------------------------------------------------------------


def _iptocc_version() -> str:
    try:
        return importlib.metadata.version("iptocc")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(iptocc, "__version__", "unknown version"))


class RegistryResolver:
    """Registry countries from the embedded ``iptocc`` data: the default.

    The answer is the country the address block is delegated to at the RIRs
    (from their delegated statistics), used for both ``country`` and
    ``registered_country`` because there is no separate location; ``asn`` and
    ``as_org`` are always None.  It works offline with nothing configured, but
    for where data actually goes configure a MaxMind database (see
    :data:`REGISTRY_NOTICE`).
    """

    def __init__(self) -> None:
        self._source = GeoSource(
            "iptocc",
            None,
            f"iptocc registry country (RIR delegated statistics) {_iptocc_version()}",
            None,
        )

    def lookup(self, ip: str) -> GeoInfo:
        """The registry country of ``ip`` (``GeoInfo()`` for unallocated/private space).

        Raises ValueError when ``ip`` is not an IP address.
        """
        addr, _ = _normalize(ip)
        cc = iptocc.country_code(addr)
        if cc is None:
            return _NOTHING
        return _geo_info(GeoInfo, (cc, cc, None, None))

    def sources(self) -> list[GeoSource]:
        """The embedded data set and its package version."""
        return [self._source]

    def reload_if_changed(self) -> bool:
        """Always False: the data ships with the package."""
        return False

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------------------
# Composition and caching
# ---------------------------------------------------------------------------


def _reload(resolver: object) -> bool:
    reload = getattr(resolver, "reload_if_changed", None)
    return bool(reload()) if callable(reload) else False


def _close(resolver: object) -> None:
    close = getattr(resolver, "close", None)
    if callable(close):
        close()


class CompositeResolver:
    """Countries from one resolver, AS numbers from another.

    Used when only an ASN database is configured: registry countries from the
    embedded data plus MaxMind ASNs.  Both resolvers are listed by
    :meth:`sources`.
    """

    def __init__(self, country: Resolver, asn: Resolver) -> None:
        self._country = country
        self._asn = asn

    def lookup(self, ip: str) -> GeoInfo:
        """``country``/``registered_country`` of the first, ``asn``/``as_org`` of the second."""
        c = self._country.lookup(ip)
        a = self._asn.lookup(ip)
        return GeoInfo(c.country, c.registered_country, a.asn, a.as_org)

    def sources(self) -> list[GeoSource]:
        """The country resolver's sources, then the ASN resolver's."""
        return self._country.sources() + self._asn.sources()

    def reload_if_changed(self) -> bool:
        """Reload both parts that support it; True when either changed.

        Each part is all-or-nothing on its own; when the country part fails the
        ASN part is not tried, and the error is raised.
        """
        changed = _reload(self._country)
        return _reload(self._asn) or changed

    def close(self) -> None:
        """Close both parts."""
        try:
            _close(self._country)
        finally:
            _close(self._asn)


class CachedResolver:
    """A bounded least-recently-used cache in front of another resolver.

    Flows to the same remote repeat constantly; a cached answer costs a dict
    access instead of a database walk and record decode.  At most ``maxsize``
    answers are kept (each a few hundred bytes); the least recently used is
    dropped first.  ``hits``, ``misses`` and ``evictions`` count since
    creation (for metrics); invalid addresses are counted as misses and never
    cached.

    Meant to be used from one thread (the pipeline's).  :meth:`clear` and
    :meth:`reload_if_changed` swap in a new table instead of emptying the old
    one, so a lookup interrupted by them (say from a signal handler) finishes
    on the old table and does not fail.
    """

    def __init__(self, inner: Resolver, maxsize: int = 65536) -> None:
        if maxsize < 1:
            raise ValueError(f"cache size must be at least 1, got {maxsize}")
        self._inner = inner
        self._inner_lookup = inner.lookup
        self._maxsize = maxsize
        self._cache: OrderedDict[str, GeoInfo] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def inner(self) -> Resolver:
        """The resolver behind the cache."""
        return self._inner

    @property
    def maxsize(self) -> int:
        """The most answers kept."""
        return self._maxsize

    def __len__(self) -> int:
        return len(self._cache)

    def lookup(self, ip: str) -> GeoInfo:
        """The inner resolver's answer for ``ip``, from the cache when present."""
        cache = self._cache
        info = cache.get(ip)
        if info is not None:
            cache.move_to_end(ip)
            self.hits += 1
            return info
        self.misses += 1
        info = self._inner_lookup(ip)
        cache[ip] = info
        if len(cache) > self._maxsize:
            cache.popitem(last=False)
            self.evictions += 1
        return info

    def sources(self) -> list[GeoSource]:
        """The inner resolver's sources."""
        return self._inner.sources()

    def clear(self) -> None:
        """Forget all cached answers (the counters keep counting)."""
        self._cache = OrderedDict()

    def reload_if_changed(self) -> bool:
        """Reload the inner resolver's databases if replaced on disk; clear on change.

        Errors from the inner resolver are raised and the cache is kept (the
        old databases stay in use, so the cached answers remain theirs).
        """
        changed = _reload(self._inner)
        if changed:
            self.clear()
        return changed

    def close(self) -> None:
        """Close the inner resolver and drop the cache."""
        self.clear()
        _close(self._inner)


def open_resolver(
    country_db: StrPath | None,
    asn_db: StrPath | None,
    *,
    cache_size: int = 65536,
) -> CachedResolver:
    """The resolver the configuration asks for, behind a cache.

    * ``country_db`` given: MaxMind for countries, and for ASNs when
      ``asn_db`` is given too.
    * only ``asn_db``: registry countries (embedded data) with MaxMind ASNs.
    * neither: registry countries only; print :data:`REGISTRY_NOTICE` once.

    Raises what :class:`MaxMindResolver` raises for a missing or unusable file.
    """
    inner: Resolver
    if country_db is not None:
        inner = MaxMindResolver(country_db, asn_db)
    elif asn_db is not None:
        inner = CompositeResolver(RegistryResolver(), MaxMindResolver(None, asn_db))
    else:
        inner = RegistryResolver()
    return CachedResolver(inner, cache_size)
