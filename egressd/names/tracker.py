"""Give flows their server names: the stage between decoding and the flow table.

For each decoded batch, :meth:`NameTracker.observe` picks out with a few
vectorized tests the rare packets that can carry a name — DNS responses (UDP
or TCP from port 53), the first bytes of a TLS ClientHello, QUIC long-header
Initial packets, and the segments that continue a ClientHello cut in two —
and parses only those in Python.  Every other packet costs a few numpy
element operations.

Names reach the flows in two ways:

* when a flow starts (:meth:`on_new`, the flow table's new-flow hook) it gets
  the DNS name its client asked for that resolved to the remote address (the
  query name at the head of the CNAME chain), or a ClientHello seen in the
  same batch;
* after the batch is counted, :meth:`attach` gives TLS/QUIC names seen on
  flows that already existed (the ClientHello follows the TCP handshake) and
  returns the flows whose name changed, so that the live daemon can decide
  them again.

A name read from the ClientHello (``sni``, ``quic``) wins over the DNS name:
it is what the client's TLS session asked for.  The DNS chain is kept for
route matching only when its head is that same name, so a client that
resolves one name and then asks the server for another (domain fronting)
is judged by the name it sent.

All state is bounded: the DNS map by ``dns_entries``, the unfinished
ClientHellos by ``max_pending``; everything is keyed by packet time, so an
audit of the same capture always names the same flows.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from egressd.decode.batch import Decoded
from egressd.flows import Flow, FlowTable, flow_key
from egressd.model import PROTO_TCP, PROTO_UDP, FlowName, NameSource, RecordBatch
from egressd.names.dns import PassiveDns, parse_response, parse_tcp_stream
from egressd.names.quic import QuicHelloAssembler
from egressd.names.tls import Incomplete, client_hello_sni

DNS_PORT = 53
MAX_HELLO_SEGMENTS = 8
"""A ClientHello spread over more TCP segments than this is given up."""

_PRIORITY = {NameSource.DNS: 0, NameSource.QUIC: 1, NameSource.SNI: 2}
_QUIC_V1 = 0x00000001
_QUIC_V2 = 0x6B3343CF
_MIX = np.uint64(0x9E3779B97F4A7C15)


class _Pending(NamedTuple):
    """A ClientHello whose first segment was seen and whose rest is awaited."""

    key: bytes
    """Flow key."""
    data: bytes
    next_seq: int
    segments: int
    ts_ns: int
    dir_hash: int
    """The direction's hash, as :meth:`NameTracker._continuations` looks it up."""


def _u16(d: npt.NDArray[np.uint8], pos: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return (d[pos].astype(np.int64) << 8) | d[pos + 1]


class NameTracker:
    """Reads server names off decoded batches and hands them to flows.

    ``dns_entries`` bounds the passive DNS map, ``max_pending`` the number of
    ClientHellos (TLS or QUIC) waiting for their next segment.
    """

    def __init__(self, *, dns_entries: int = 100_000, max_pending: int = 4096,
                 watch_payload: bool = False) -> None:
        self.dns = PassiveDns(max_entries=dns_entries)
        self.watch_payload = watch_payload
        """Note which flows sent data that is no ClientHello (see :meth:`watch`)."""
        self._plain = np.zeros(0, dtype=np.uint64)
        self._watched: dict[int, bytes] = {}
        self._no_hello: set[bytes] = set()
        self.max_pending = max_pending
        self.stats: Counter[str] = Counter()
        """Names found by source (``sni``, ``quic``, ``dns``: flows named at their start),
        ``dns_responses`` parsed, ClientHellos ``hellos_given_up`` (never completed) and
        ``hellos_without_name``."""
        self._tls: OrderedDict[bytes, _Pending] = OrderedDict()
        self._tls_hashes: dict[int, int] = {}
        self._quic: OrderedDict[bytes, QuicHelloAssembler] = OrderedDict()
        self._seen: dict[bytes, tuple[int, FlowName]] = {}

    # -- per batch ---------------------------------------------------------------

    def observe(self, batch: RecordBatch, dec: Decoded, *, dns: bool = True,
                hellos: bool = True) -> None:
        """Read the names a batch carries; call before the flow table counts it.

        ``dns=False`` leaves DNS answers out (a process that gets every DNS
        answer from a capture of its own); ``hellos=False`` reads DNS answers
        only (that capture).
        """
        d = batch.data
        if d.size == 0:
            return
        l4 = dec.l4
        proto = dec.proto
        ok = (l4 >= 0) & (dec.frag == 0) & (dec.err == 0)
        tcp = ok & (proto == PROTO_TCP)
        udp = ok & (proto == PROTO_UDP)
        if not (tcp.any() or udp.any()):
            return
        last = d.size - 1
        start = np.full(len(dec), -1, dtype=np.int64)
        it = np.flatnonzero(tcp)
        start[it] = l4[it] + (d[np.minimum(l4[it] + 12, last)].astype(np.int64) >> 4) * 4
        iu = np.flatnonzero(udp)
        start[iu] = l4[iu] + 8
        plen = np.where(start >= 0, dec.l4_end - start, 0)
        has = plen > 0
        dns_rows = has & (tcp | udp) & (dec.sport == DNS_PORT) & (plen >= 12)
        if not dns:
            dns_rows[:] = False
        head = np.flatnonzero(has & (plen >= 6)) if hellos else np.zeros(0, dtype=np.int64)
        tls = np.zeros(len(dec), dtype=bool)
        quic = np.zeros(len(dec), dtype=bool)
        if head.size:
            pos = start[head]
            b0 = d[np.minimum(pos, last)]
            b1 = d[np.minimum(pos + 1, last)]
            b5 = d[np.minimum(pos + 5, last)]
            is_tcp = tcp[head]
            tls[head[is_tcp & (b0 == 0x16) & (b1 == 0x03) & (b5 == 0x01)]] = True
            long_hdr = ~is_tcp & ((b0 & 0xC0) == 0xC0) & (plen[head] >= 21)
            if long_hdr.any():
                hq = head[long_hdr]
                version = ((_u16(d, np.minimum(start[hq] + 1, last - 1)) << 16)
                           | _u16(d, np.minimum(start[hq] + 3, last - 1)))
                kind = (d[start[hq]] >> 4) & 0x3
                initial = ((version == _QUIC_V1) & (kind == 0)) | ((version == _QUIC_V2)
                                                                   & (kind == 1))
                quic[hq[initial]] = True
        rows = np.flatnonzero(dns_rows | tls | quic)
        for i in rows.tolist():
            payload = d[start[i]:dec.l4_end[i]].tobytes()
            if dns_rows[i]:
                self._dns(dec, i, payload, bool(tcp[i]))
            elif tls[i]:
                self._hello_start(dec, i, payload, d)
            else:
                self._quic_datagram(dec, i, payload)
        if not hellos:
            return
        if self._tls:
            self._continuations(dec, d, tcp & has & ~tls, start)
        if self.watch_payload:
            self._watch_plain(dec, tcp & has & ~tls)

    # -- flows waiting for a ClientHello (the live daemon) ---------------------------

    def _watch_plain(self, dec: Decoded, plain: npt.NDArray[np.bool_]) -> None:
        """Remember which directions sent data that is no ClientHello, in this batch."""
        rows = np.flatnonzero(plain)
        self._plain = np.unique(self._dir_hash(dec, rows)) if rows.size else self._plain[:0]
        if self._watched and self._plain.size:
            wanted = np.fromiter(self._watched, dtype=np.uint64, count=len(self._watched))
            for h in wanted[np.isin(wanted, self._plain)].tolist():
                self._no_hello.add(self._watched.pop(h))

    @staticmethod
    def _client_hash(flow: Flow) -> int:
        key = flow.key
        words = np.frombuffer(key, dtype=">u8").astype(np.uint64)
        lo, hi = words[1:3][None, :], words[3:5][None, :]
        lo_port = np.array([(key[1] << 8) | key[2]], dtype=np.int64)
        hi_port = np.array([(key[3] << 8) | key[4]], dtype=np.int64)
        if flow.initiator == 0:
            return int(_hash_rows(lo, hi, lo_port, hi_port)[0])
        return int(_hash_rows(hi, lo, hi_port, lo_port)[0])

    def sent_plain_data(self, flow: Flow) -> bool:
        """True when the flow's client sent, in the batch just observed, data that starts
        no ClientHello: no TLS name is coming, so there is no reason to wait for one."""
        plain = self._plain
        if not plain.size:
            return False
        h = self._client_hash(flow)
        i = int(np.searchsorted(plain, np.uint64(h)))
        return i < plain.size and int(plain[i]) == h

    def watch(self, flow: Flow) -> None:
        """Report ``flow`` from :meth:`attach` once its client sends data that is no
        ClientHello (needs ``watch_payload``)."""
        self._watched[self._client_hash(flow)] = flow.key

    def unwatch(self, flow: Flow) -> None:
        self._watched.pop(self._client_hash(flow), None)

    def _dns(self, dec: Decoded, i: int, payload: bytes, over_tcp: bool) -> None:
        self.stats["dns_responses"] += 1
        answers = parse_tcp_stream(payload) if over_tcp else [
            a for a in (parse_response(payload),) if a is not None]
        client = dec.dst[i].astype(">u8").tobytes()
        for a in answers:
            self.dns.observe(client, a, int(dec.ts_ns[i]))

    def _key(self, dec: Decoded, i: int) -> tuple[bytes, bytes]:
        """(flow key, directional key) of row ``i``."""
        src = dec.src[i].astype(">u8").tobytes()
        dst = dec.dst[i].astype(">u8").tobytes()
        sport, dport = int(dec.sport[i]), int(dec.dport[i])
        key = flow_key(int(dec.proto[i]), int(dec.version[i]), src, sport, dst, dport)
        return key, src + sport.to_bytes(2, "big") + dst + dport.to_bytes(2, "big")

    def _found(self, key: bytes, ts_ns: int, name: str, source: NameSource) -> None:
        self.stats[source.value] += 1
        held = self._seen.get(key)
        if held is None or _PRIORITY[source] > _PRIORITY[held[1].source]:
            self._seen[key] = (ts_ns, FlowName(name, source, (name,)))

    def _hello_start(self, dec: Decoded, i: int, payload: bytes,
                     d: npt.NDArray[np.uint8]) -> None:
        key, dkey = self._key(dec, i)
        result = client_hello_sni(payload)
        ts = int(dec.ts_ns[i])
        if isinstance(result, str):
            self._found(key, ts, result, NameSource.SNI)
            self._drop_tls(dkey)
        elif isinstance(result, Incomplete):
            seq_pos = int(dec.l4[i]) + 4
            seq = int.from_bytes(d[seq_pos:seq_pos + 4].tobytes(), "big")
            self._drop_tls(dkey)
            h = int(self._dir_hash(dec, np.array([i]))[0])
            self._tls[dkey] = _Pending(key, payload, (seq + len(payload)) & 0xFFFFFFFF, 1, ts, h)
            self._tls_hashes[h] = self._tls_hashes.get(h, 0) + 1
            while len(self._tls) > self.max_pending:
                self._drop_tls(next(iter(self._tls)))
                self.stats["hellos_given_up"] += 1

    def _drop_tls(self, dkey: bytes) -> None:
        pending = self._tls.pop(dkey, None)
        if pending is None:
            return
        h = pending.dir_hash
        left = self._tls_hashes.get(h, 0) - 1
        if left > 0:
            self._tls_hashes[h] = left
        else:
            self._tls_hashes.pop(h, None)

    @staticmethod
    def _dir_hash(dec: Decoded, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        return _hash_rows(dec.src[rows], dec.dst[rows], dec.sport[rows].astype(np.int64),
                          dec.dport[rows].astype(np.int64))

    def _continuations(self, dec: Decoded, d: npt.NDArray[np.uint8],
                       cand: npt.NDArray[np.bool_], start: npt.NDArray[np.int64]) -> None:
        """Segments that continue a ClientHello awaited from an earlier segment."""
        rows = np.flatnonzero(cand)
        if rows.size == 0:
            return
        wanted = np.fromiter(self._tls_hashes, dtype=np.uint64, count=len(self._tls_hashes))
        rows = rows[np.isin(self._dir_hash(dec, rows), wanted)]
        for i in rows.tolist():
            dkey = self._key(dec, i)[1]
            pending = self._tls.get(dkey)
            ts = int(dec.ts_ns[i])
            if pending is None or ts < pending.ts_ns:
                continue
            seq_pos = int(dec.l4[i]) + 4
            seq = int.from_bytes(d[seq_pos:seq_pos + 4].tobytes(), "big")
            if seq != pending.next_seq:
                # A retransmission of what we have, or a gap: keep waiting for
                # the next byte in order; give up after a few segments.
                if pending.segments >= MAX_HELLO_SEGMENTS:
                    self._drop_tls(dkey)
                else:
                    self._tls[dkey] = pending._replace(segments=pending.segments + 1)
                continue
            part = d[start[i]:dec.l4_end[i]].tobytes()
            data = pending.data + part
            result = client_hello_sni(data)
            if isinstance(result, str):
                self._found(pending.key, ts, result, NameSource.SNI)
                self._drop_tls(dkey)
            elif isinstance(result, Incomplete) and pending.segments < MAX_HELLO_SEGMENTS:
                self._tls[dkey] = pending._replace(data=data,
                                                   next_seq=(seq + len(part)) & 0xFFFFFFFF,
                                                   segments=pending.segments + 1)
            else:
                if result is None:
                    self.stats["hellos_without_name"] += 1
                self._drop_tls(dkey)

    def _quic_datagram(self, dec: Decoded, i: int, payload: bytes) -> None:
        key, dkey = self._key(dec, i)
        asm = self._quic.pop(dkey, None)
        if asm is None:
            asm = QuicHelloAssembler()
        result = asm.feed(payload)
        if isinstance(result, str):
            self._found(key, int(dec.ts_ns[i]), result, NameSource.QUIC)
        elif isinstance(result, Incomplete):
            self._quic[dkey] = asm
            while len(self._quic) > self.max_pending:
                self._quic.popitem(last=False)
                self.stats["hellos_given_up"] += 1

    # -- handing names to flows ------------------------------------------------------

    def on_new(self, flow: Flow) -> None:
        """Name a flow when it starts (the flow table's new-flow hook)."""
        if flow.initiator == 0:
            client, remote = flow.a, flow.b
        else:
            client, remote = flow.b, flow.a
        chain = self.dns.lookup(client, remote, flow.first_ns)
        name = None
        if chain:
            name = FlowName(chain[0], NameSource.DNS, chain)
            self.stats[NameSource.DNS.value] += 1
        seen = self._seen.get(flow.key)
        if seen is not None and seen[0] >= flow.first_ns:
            del self._seen[flow.key]
            name = _combine(name, seen[1])
        flow.name = name

    def attach(self, table: FlowTable) -> list[Flow]:
        """Give the names of the batch to the flows they belong to.

        Call after :meth:`FlowTable.process`, before draining ``finished``.
        Returns the flows whose name changed, and the watched flows whose client
        sent data that is no ClientHello.
        """
        changed: list[Flow] = []
        if self._no_hello:
            for key in self._no_hello:
                flow = table.get(key)
                if flow is not None:
                    changed.append(flow)
            self._no_hello.clear()
        if not self._seen:
            return changed
        finished: dict[bytes, list[Flow]] | None = None
        for key, (ts, name) in self._seen.items():
            flow = table.get(key)
            if flow is None or flow.first_ns > ts:
                if finished is None:
                    finished = {}
                    for f in table.finished:
                        finished.setdefault(f.key, []).append(f)
                flow = next((f for f in reversed(finished.get(key, ()))
                             if f.first_ns <= ts <= f.last_ns), None)
                if flow is None:
                    continue
            old = flow.name
            if old is None or _PRIORITY[name.source] > _PRIORITY[old.source]:
                flow.name = _combine(old, name)
                changed.append(flow)
        self._seen.clear()
        return changed


def _combine(dns: FlowName | None, hello: FlowName) -> FlowName:
    """A ClientHello's name, with the DNS chain when the chain starts with that name."""
    if dns is not None and dns.source is NameSource.DNS and dns.names[0] == hello.server_name:
        return hello._replace(names=dns.names)
    return hello


def _hash_rows(src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
               sport: npt.NDArray[np.int64], dport: npt.NDArray[np.int64]
               ) -> npt.NDArray[np.uint64]:
    """A 64-bit hash of each row's directional 4-tuple (collisions are checked exactly)."""
    h = ((sport.astype(np.uint64) << np.uint64(16)) | dport.astype(np.uint64))
    for col in (src[:, 0], src[:, 1], dst[:, 0], dst[:, 1]):
        h = (h ^ col.astype(np.uint64)) * _MIX
        h ^= h >> np.uint64(29)
    return h
