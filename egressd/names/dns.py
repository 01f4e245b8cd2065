"""Passive DNS: which name a client looked up before it connected to an address.

Most connections start with a DNS lookup in the clear.  Reading the answers
that pass the capture point lets a report say "``api.example.com``
(via ``example.com.cdn.net``)" next to a remote address, which is what a
person approving an export route thinks in.

What it can tell, and what it cannot:

* The name is what the client *asked for*, followed through the CNAME chain
  to the address record; it says nothing about what the server at that
  address really is or which site the connection then carried.
* One address can serve many names (CDNs, shared hosting, cloud load
  balancers).  The table keeps the latest answer per client and address, and
  falls back to the latest answer given to any client: this is a hint, not a
  proof, and may name another tenant of the same address.
* Only answers actually seen count.  DNS over HTTPS (DoH), DNS over TLS (DoT),
  DNS over QUIC, answers cached before capture started, hosts files and
  addresses used without a lookup are invisible.  A resolver on the inside
  hides its clients: the gateway then sees only the resolver's own queries,
  hence the any-client fallback.
* DNS over TCP is read one segment at a time: messages that span segments are
  skipped (large answers, zone transfers).

Addresses are 16-byte ``bytes`` (IPv4 as IPv4-mapped ``::ffff:a.b.c.d``) and
times are integer nanoseconds taken from packet timestamps, never the clock.
"""

from __future__ import annotations

import re
import struct
import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

from egressd.decode.scalar import V4_MAPPED_PREFIX

if TYPE_CHECKING:
    import dns.name

MAX_CHAIN = 16
"""Longest CNAME chain followed (names, question included); longer ones are cut."""
MIN_TTL_S = 60
"""Answers count for at least this long: stub resolvers and clients keep them about that long."""
MAX_TTL_S = 86_400
"""TTLs are capped at one day: a stale week-long answer is more likely wrong than right."""
ANSWERS_PER_KEY = 4
"""Recent answers kept per key, so an older valid answer is found when a newer one is later."""
DEFAULT_MAX_ENTRIES = 100_000
GRACE_S = 300
"""Expired answers are dropped this long after expiry, measured on the newest answer time."""

_NS = 1_000_000_000
# dnspython is imported on first use (the first DNS payload), not with this module;
# these are the values of dns.rdataclass.IN, dns.rdatatype.A, AAAA and CNAME,
# dns.flags.QR, dns.opcode.QUERY and dns.rcode.NOERROR (dnspython's enums are ints).
_IN = 1
_A = 1
_AAAA = 28
_CNAME = 5
_QR = 0x8000
_QUERY = 0
_NOERROR = 0


class DnsAnswer(NamedTuple):
    """One answered address, the names that led to it (question first) and their minimum TTL."""

    addr: bytes
    chain: tuple[str, ...]
    ttl: int


class DnsAnswers(NamedTuple):
    """The addresses a DNS response gave for its question."""

    qname: str
    answers: tuple[DnsAnswer, ...]


_PLAIN = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _norm(name: dns.name.Name) -> str:
    """Lower-case text without the trailing dot; IDNA stays in its ``xn--`` form."""
    labels = name.labels[:-1] if name.is_absolute() else name.labels
    text = b".".join(labels)
    if _PLAIN.fullmatch(text) and text.count(b".") == len(labels) - 1:
        return text.decode("ascii").lower()  # the common case, without dnspython's escaping
    import dns.name

    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def parse_response(payload: bytes) -> DnsAnswers | None:
    """Addresses answered by a DNS response, or None if it is not a usable answer.

    Usable: a response (QR set), opcode QUERY, rcode NOERROR, one question of
    class IN.  CNAMEs in the answer section are followed by owner name from
    the question; address records off that chain, and the authority and
    additional sections, are ignored.  Never raises on malformed input.
    """
    import dns.ipv4
    import dns.ipv6
    import dns.message

    try:
        # keyring=False: read TSIG-signed answers without checking them (no keys here).
        msg = dns.message.from_wire(payload, keyring=False, ignore_trailing=True)
    except Exception:  # any malformed packet must be skipped, never stop the monitor
        return None
    if (not msg.flags & _QR or msg.opcode() != _QUERY
            or msg.rcode() != _NOERROR or len(msg.question) != 1
            or msg.question[0].rdclass != _IN):
        return None
    cnames: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    addrs: dict[dns.name.Name, list[tuple[bytes, int]]] = {}
    try:
        for rrset in msg.answer:
            if rrset.rdclass != _IN or not rrset:
                continue
            if rrset.rdtype == _CNAME:
                cnames.setdefault(rrset.name, (next(iter(rrset)).target, rrset.ttl))
            elif rrset.rdtype == _A:
                addrs.setdefault(rrset.name, []).extend(
                    (V4_MAPPED_PREFIX + dns.ipv4.inet_aton(rd.address), rrset.ttl)
                    for rd in rrset)
            elif rrset.rdtype == _AAAA:
                addrs.setdefault(rrset.name, []).extend(
                    (dns.ipv6.inet_aton(rd.address), rrset.ttl) for rd in rrset)
    except Exception:  # rdata that dnspython accepted but cannot be turned into bytes
        return None
    name = msg.question[0].name
    chain = [_norm(name)]
    seen = {name}
    chain_ttl: int | None = None
    out: list[DnsAnswer] = []
    got: set[bytes] = set()
    while True:
        here = tuple(chain)
        for addr, ttl in addrs.get(name, ()):
            if addr not in got:
                got.add(addr)
                out.append(DnsAnswer(addr, here,
                                     ttl if chain_ttl is None else min(ttl, chain_ttl)))
        nxt = cnames.get(name)
        if nxt is None or nxt[0] in seen or len(chain) >= MAX_CHAIN:
            break
        name, ttl = nxt[0], nxt[1]
        seen.add(name)
        chain.append(_norm(name))
        chain_ttl = ttl if chain_ttl is None else min(ttl, chain_ttl)
    return DnsAnswers(chain[0], tuple(out))


def parse_tcp_stream(payload: bytes) -> list[DnsAnswers]:
    """Usable responses among the length-prefixed DNS messages of one TCP segment.

    Only messages wholly inside ``payload`` are read: one that continues in a
    later segment is skipped, and so is the rest of that segment.  A segment
    that starts inside a message (its beginning was in an earlier segment) is
    misframed; such bytes almost never form a valid response and are dropped.
    """
    out: list[DnsAnswers] = []
    off, end = 0, len(payload)
    while off + 2 <= end:
        (n,) = struct.unpack_from("!H", payload, off)
        off += 2
        if off + n > end:
            break
        parsed = parse_response(payload[off:off + n])
        if parsed is not None:
            out.append(parsed)
        off += n
    return out


# A key's value: (ts_ns, expiry_ns, chain) triples flattened into one tuple, newest first
# (one object per key instead of one per answer).
_Entries = tuple[Any, ...]


class PassiveDns:
    """Bounded map from answered address to the names that led to it, per client.

    ``max_entries`` bounds the (client, address) keys and, separately, the
    addresses of the any-client index; beyond it the least recently used key
    goes.  Answers are valid from their packet time for ``max(ttl, min_ttl_s)``
    seconds, TTLs capped at ``max_ttl_s``.  Answers that expired more than
    ``grace_s`` before the newest answer seen are dropped when their key is
    next touched, and a full table first gives up its least recently used key.
    Name strings and chains are shared between entries (interned); the intern
    tables forget what no entry uses once they grow by a quarter of the bound.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *, min_ttl_s: int = MIN_TTL_S,
                 max_ttl_s: int = MAX_TTL_S, per_key: int = ANSWERS_PER_KEY,
                 grace_s: int = GRACE_S) -> None:
        if max_entries < 1 or per_key < 1:
            raise ValueError("max_entries and per_key must be at least 1")
        self.max_entries = max_entries
        self.min_ttl_ns = min_ttl_s * _NS
        self.max_ttl_ns = max_ttl_s * _NS
        self.per_key = per_key
        self.grace_ns = grace_s * _NS
        self.evictions = 0
        """Keys removed to make room while they still held a valid answer."""
        self.expired = 0
        """Keys removed because all their answers had expired."""
        self._by_client: OrderedDict[bytes, _Entries] = OrderedDict()
        self._by_addr: OrderedDict[bytes, _Entries] = OrderedDict()
        self._names: dict[str, str] = {}
        self._chains: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._intern_limit = max(max_entries // 4, 1024)
        self._clock = 0  # newest answer time seen: the reference for dropping expired answers

    def __len__(self) -> int:
        return len(self._by_client)

    @property
    def addresses(self) -> int:
        """Number of addresses in the any-client index."""
        return len(self._by_addr)

    def _intern(self, chain: tuple[str, ...]) -> tuple[str, ...]:
        got = self._chains.get(chain)
        if got is not None:
            return got
        if len(self._chains) >= self._intern_limit:
            self._purge_interned()
        names = self._names
        if not all(names.setdefault(n, n) is n for n in chain):  # some name already known
            chain = tuple(names.setdefault(n, n) for n in chain)
        self._chains[chain] = chain
        return chain

    def _purge_interned(self) -> None:
        """Forget interned chains and names that no answer in the tables uses any more.

        Held only by the intern dict means four references here: key, value,
        loop variable and the argument of ``getrefcount``.
        """
        refs = sys.getrefcount
        self._chains = {c: c for c in self._chains if refs(c) > 4}
        self._names = {n: n for n in self._names if refs(n) > 4}
        self._intern_limit = len(self._chains) + max(self.max_entries // 4, 1024)

    def observe(self, client: bytes, answers: DnsAnswers, ts_ns: int) -> None:
        """Record a response sent to ``client`` (the asker) at packet time ``ts_ns``."""
        if ts_ns > self._clock:
            self._clock = ts_ns
        for ans in answers.answers:
            ttl_ns = max(min(ans.ttl * _NS, self.max_ttl_ns), self.min_ttl_ns)
            entry = (ts_ns, ts_ns + ttl_ns, self._intern(ans.chain))
            self._put(self._by_client, client + ans.addr, entry)
            self._put(self._by_addr, ans.addr, entry)  # a new key shares the tuple

    def lookup(self, client: bytes, addr: bytes, at_ns: int) -> tuple[str, ...] | None:
        """Names (question first) that led ``client`` to ``addr``, valid at ``at_ns``.

        The latest answer given to ``client`` at or before ``at_ns`` and not
        expired at ``at_ns``; failing that, the latest such answer given to
        any client.  Answers seen after ``at_ns`` are never used.
        """
        found = self._find(self._by_client, client + addr, at_ns)
        if found is None:
            return self._find(self._by_addr, addr, at_ns)
        if addr in self._by_addr:  # the address is in use: keep its any-client answers too
            self._by_addr.move_to_end(addr)
        return found

    def _live(self, entries: _Entries) -> _Entries:
        cut = self._clock - self.grace_ns
        if all(entries[i + 1] > cut for i in range(0, len(entries), 3)):
            return entries
        return tuple(x for i in range(0, len(entries), 3)
                     if entries[i + 1] > cut for x in entries[i:i + 3])

    def _find(self, table: OrderedDict[bytes, _Entries], key: bytes,
              at_ns: int) -> tuple[str, ...] | None:
        entries = table.get(key)
        if entries is None:
            return None
        live = self._live(entries)
        if not live:
            del table[key]
            self.expired += 1
            return None
        if live is not entries:
            table[key] = live
        for i in range(0, len(live), 3):
            ts, exp = live[i], live[i + 1]
            if ts <= at_ns < exp:
                table.move_to_end(key)
                chain: tuple[str, ...] = live[i + 2]
                return chain
        return None

    def _put(self, table: OrderedDict[bytes, _Entries], key: bytes, entry: _Entries) -> None:
        old = table.get(key)
        if old is None:
            if len(table) >= self.max_entries:
                self._make_room(table)
            table[key] = entry
            return
        ts, exp, chain = entry
        old = self._live(old)
        n = len(old)
        at = 0  # newest first; an answer at the same time as a stored one goes before it
        while at < n and old[at] > ts:
            at += 3
        if at < n and old[at] == ts and old[at + 2] == chain:  # the same answer seen twice
            exp = max(exp, old[at + 1])
            old = old[:at] + old[at + 3:]
        new = (*old[:at], ts, exp, chain, *old[at:])
        table[key] = new[:3 * self.per_key]
        table.move_to_end(key)

    def _make_room(self, table: OrderedDict[bytes, _Entries]) -> None:
        """Remove the least recently used key (counted as expired if nothing in it is valid)."""
        _, entries = table.popitem(last=False)
        if self._live(entries):
            self.evictions += 1
        else:
            self.expired += 1
