"""The flow table: packets become bidirectional flows.

A flow is one 5-tuple seen both ways.  A TCP connection is one flow from its
first packet until it is torn down — a RST, or a FIN from each side — plus a
short grace period for the last ACKs and retransmissions; after that a new
packet (typically a new SYN) on the same 5-tuple starts a new flow, and so does
a SYN during the grace period (a reused port).  Every flow also ends after an
idle timeout that depends on its protocol.  All times are packet timestamps,
so the same capture always gives the same flows.

Packets arrive as :class:`~egressd.decode.batch.Decoded` columns.  A batch is
grouped by flow key with one sort; for each flow of the batch the packets
before its first "event" (FIN, RST, or a gap longer than the idle timeout) are
added with prefix sums in one step, and only the few packets from the event on
are walked one by one.  So the Python work is per flow and per teardown, not
per packet.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from egressd.decode.batch import Decoded
from egressd.decode.linktypes import Err
from egressd.decode.scalar import FRAG_FIRST, FRAG_LATER
from egressd.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, FlowName

NS = 1_000_000_000
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

# ICMP message types that have a reply type: request and reply are one flow
# (the same pairing Community ID uses).  Other types form one-way flows.
_ICMP4_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_PAIRS = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131,
                131: 130, 139: 140, 140: 139, 144: 145, 145: 144}


def _pair_table(pairs: dict[int, int]) -> npt.NDArray[np.int32]:
    table = np.full(256, -1, dtype=np.int32)
    for k, v in pairs.items():
        table[k] = v
    return table


_CP4 = _pair_table(_ICMP4_PAIRS)
_CP6 = _pair_table(_ICMP6_PAIRS)
_BIG = np.iinfo(np.int64).max


@dataclass(frozen=True, slots=True)
class FlowTimeouts:
    """Timeouts of the flow table, in seconds (defaults are the documented ones)."""

    tcp: float = 300.0
    udp: float = 60.0
    other: float = 30.0
    tcp_close_grace: float = 5.0

    def idle_ns(self, proto: int) -> int:
        """Idle timeout for an IP protocol, in nanoseconds."""
        if proto == PROTO_TCP:
            return int(self.tcp * NS)
        if proto == PROTO_UDP:
            return int(self.udp * NS)
        return int(self.other * NS)


def flow_key(proto: int, version: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """The table's key of the flow a TCP/UDP/SCTP packet belongs to (either direction).

    ``src``/``dst`` are 16-byte addresses (IPv4 mapped).  The same layout as
    the vectorized keys of :meth:`FlowTable.process`: 5 big-endian words.
    """
    if (dst, dport) < (src, sport):
        src, sport, dst, dport = dst, dport, src, sport
    return (((proto << 56) | (sport << 40) | (dport << 24) | (version << 16)).to_bytes(8, "big")
            + src + dst)


class Flow:
    """One live flow; owned by the table, read by the classifier when it ends.

    Endpoint ``a`` is the one whose (address, port) sorts first; direction 0 is
    a → b.  ``initiator`` is 0 when a started the flow, 1 when b did.
    """

    __slots__ = (
        "by0", "by1", "closing_at", "fin", "first_ns",
        "icmp_code", "icmp_type", "initiator", "key", "last_ns", "name", "pk0", "pk1", "proto",
        "syn_seen", "verdict", "version",
    )

    def __init__(self, key: bytes, proto: int, version: int, initiator: int, first_ns: int,
                 icmp_type: int = -1, icmp_code: int = -1) -> None:
        self.key = key
        self.proto = proto
        self.version = version
        self.initiator = initiator
        self.syn_seen = False
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.pk0 = self.by0 = self.pk1 = self.by1 = 0
        self.fin = 0
        self.closing_at = -1
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code
        self.verdict: object = None  # set by a live classifier when it decides early
        self.name: FlowName | None = None  # set by a NameTracker

    # Endpoints are read from the key when asked (once, when the flow is
    # classified) rather than stored: a table of a million flows is smaller.
    @property
    def a(self) -> bytes:
        return self.key[8:24]

    @property
    def b(self) -> bytes:
        return self.key[24:40]

    @property
    def a_port(self) -> int:
        return (self.key[1] << 8) | self.key[2]

    @property
    def b_port(self) -> int:
        return (self.key[3] << 8) | self.key[4]

    @property
    def packets(self) -> int:
        return self.pk0 + self.pk1


class FlowTable:
    """Aggregates decoded packets into flows.

    ``on_new`` is called with each new flow, in order of first packet, once
    the batch that started it is counted — within one batch of its first
    packet (the live daemon decides the verdict there).  Finished flows are
    appended to :attr:`finished`; the caller drains that list.
    """

    def __init__(self, timeouts: FlowTimeouts | None = None, *,
                 on_new: Callable[[Flow], None] | None = None,
                 max_fragments: int = 65536,
                 partition: tuple[int, int] | None = None) -> None:
        self.timeouts = timeouts or FlowTimeouts()
        if partition is not None and not 0 <= partition[0] < partition[1]:
            raise ValueError(f"partition {partition}: expected (index, count), 0 <= index < count")
        self.partition = partition
        """``(index, count)``: keep only the flows whose key hash is ``index`` modulo ``count``.

        Flows of different keys never influence each other, so ``count`` tables
        fed the same packets, each with its own index, together hold exactly the
        flows one table would (an audit on several cores)."""
        self.on_new = on_new
        self.finished: list[Flow] = []
        self.errors: Counter[str] = Counter()
        # One LRU dict per timeout class, so expiry pops from the front only.
        self._lru: dict[int, OrderedDict[bytes, Flow]] = {
            PROTO_TCP: OrderedDict(), PROTO_UDP: OrderedDict(), 0: OrderedDict()}
        self._closing: deque[tuple[int, Flow]] = deque()
        self._frags: OrderedDict[tuple[int, ...], tuple[int, int]] = OrderedDict()
        self._max_frags = max_fragments
        self._grace = int(self.timeouts.tcp_close_grace * NS)
        self._new: list[Flow] = []
        self.now_ns = 0

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return sum(len(d) for d in self._lru.values())

    def get(self, key: bytes) -> Flow | None:
        return self._lru[self._cls(key[0])].get(key)

    def process(self, dec: Decoded) -> None:
        """Add a decoded batch; flows that ended are appended to :attr:`finished`."""
        ok = dec.err == 0
        if not ok.any():
            return
        rows = np.flatnonzero(ok)
        sport = dec.sport[rows].astype(np.int64)
        dport = dec.dport[rows].astype(np.int64)
        frag = dec.frag[rows]
        if frag.any():
            keep = self._resolve_fragments(dec, rows, frag, sport, dport)
            rows, sport, dport = rows[keep], sport[keep], dport[keep]
            if rows.size == 0:
                return
        self._aggregate(dec, rows, sport, dport)
        if self._new:
            # Decide new flows in the order they started, not in hash order.
            new, self._new = self._new, []
            new.sort(key=lambda f: f.first_ns)
            assert self.on_new is not None
            for flow in new:
                self.on_new(flow)
        self.expire(int(dec.ts_ns[rows].max()))

    def expire(self, now_ns: int) -> None:
        """Finish the flows idle for longer than their timeout at ``now_ns``."""
        self.now_ns = max(self.now_ns, now_ns)
        now = self.now_ns
        while self._closing and self._closing[0][0] + self._grace < now:
            _, flow = self._closing.popleft()
            if self.get(flow.key) is flow:
                self._finish(flow)
        for cls, lru in self._lru.items():
            limit = now - self.timeouts.idle_ns(cls)
            while lru:
                flow = next(iter(lru.values()))
                if flow.last_ns >= limit:
                    break
                self._finish(flow)

    def flush(self) -> None:
        """Finish every open flow (end of a capture, or shutdown)."""
        for lru in self._lru.values():
            for flow in list(lru.values()):
                self._finish(flow)
        self._closing.clear()

    def set_timeouts(self, timeouts: FlowTimeouts) -> None:
        """Apply new timeouts (a config reload); open flows keep their counters."""
        self.timeouts = timeouts
        self._grace = int(timeouts.tcp_close_grace * NS)

    def flows_active_since(self, since_ns: int) -> list[Flow]:
        """The flows that saw a packet at or after ``since_ns`` (newest activity first).

        Cheap: each per-protocol table is kept in order of last activity, so
        only the recently active flows are visited.
        """
        out: list[Flow] = []
        for lru in self._lru.values():
            for flow in reversed(lru.values()):
                if flow.last_ns < since_ns:
                    break
                out.append(flow)
        return out

    def evict_oldest(self) -> Flow | None:
        """Finish and return the least recently active flow (for a bounded table)."""
        oldest: Flow | None = None
        for lru in self._lru.values():
            if lru:
                cand = next(iter(lru.values()))
                if oldest is None or cand.last_ns < oldest.last_ns:
                    oldest = cand
        if oldest is not None:
            self._finish(oldest)
        return oldest

    # ------------------------------------------------------------ internals
    @staticmethod
    def _cls(proto: int) -> int:
        return proto if proto in (PROTO_TCP, PROTO_UDP) else 0

    def _finish(self, flow: Flow) -> None:
        lru = self._lru[self._cls(flow.proto)]
        if lru.get(flow.key) is flow:
            del lru[flow.key]
        self.finished.append(flow)

    def _resolve_fragments(self, dec: Decoded, rows: npt.NDArray[np.int64],
                           frag: npt.NDArray[np.uint8], sport: npt.NDArray[np.int64],
                           dport: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Give later fragments the ports of their first fragment (file order)."""
        keep = np.ones(rows.size, dtype=bool)
        frags = self._frags
        for j in np.flatnonzero(frag).tolist():
            i = int(rows[j])
            fkey = (int(dec.src[i, 0]), int(dec.src[i, 1]), int(dec.dst[i, 0]),
                    int(dec.dst[i, 1]), int(dec.proto[i]), int(dec.frag_id[i]))
            if frag[j] == FRAG_FIRST:
                frags[fkey] = (int(sport[j]), int(dport[j]))
                frags.move_to_end(fkey)
                if len(frags) > self._max_frags:
                    frags.popitem(last=False)
            elif frag[j] == FRAG_LATER:
                ports = frags.get(fkey)
                if ports is None:
                    keep[j] = False
                    self.errors[Err.ORPHAN_FRAGMENT] += 1
                else:
                    sport[j], dport[j] = ports
        return keep

    def _aggregate(self, dec: Decoded, rows: npt.NDArray[np.int64],
                   sport: npt.NDArray[np.int64], dport: npt.NDArray[np.int64]) -> None:
        n = rows.size
        proto = dec.proto[rows].astype(np.int64)
        src = dec.src[rows]
        dst = dec.dst[rows]
        # Ports used in the key: ICMP pairs request and reply types.
        kdport = dport
        icmp4 = proto == PROTO_ICMP
        icmp6 = proto == PROTO_ICMPV6
        if icmp4.any() or icmp6.any():
            kdport = dport.copy()
            t = np.clip(sport, 0, 255)
            cp = np.where(icmp4, _CP4[t], np.where(icmp6, _CP6[t], -1))
            pair = (icmp4 | icmp6) & (cp >= 0)
            kdport[pair] = cp[pair]
        ksport = np.where(sport < 0, 0, sport)
        kdport = np.where(kdport < 0, 0, kdport)
        s64 = src
        d64 = dst
        swap = (s64[:, 0] > d64[:, 0]) | ((s64[:, 0] == d64[:, 0]) & (
            (s64[:, 1] > d64[:, 1]) | ((s64[:, 1] == d64[:, 1]) & (ksport > kdport))))
        # Key: 5 big-endian words, i.e. the bytes proto, lo port, hi port, IP
        # version, 2 zero bytes, lo address, hi address ("lo" is the endpoint
        # that sorts first).  The version keeps an IPv6 packet that carries
        # IPv4-mapped addresses apart from IPv4.
        keys = np.empty((n, 5), dtype=">u8")
        lo_port = np.where(swap, kdport, ksport)
        hi_port = np.where(swap, ksport, kdport)
        version = dec.version[rows].astype(np.int64)
        keys[:, 0] = (proto << 56) | (lo_port << 40) | (hi_port << 24) | (version << 16)
        sw = swap[:, None]
        keys[:, 1:3] = np.where(sw, d64, s64)
        keys[:, 3:5] = np.where(sw, s64, d64)
        k64 = keys.view(np.uint64)
        h = k64[:, 0].copy()
        for j in range(1, 5):
            h ^= k64[:, j]
            h *= np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
        if self.partition is not None:
            index, count = self.partition
            sel = (h % np.uint64(count)) == np.uint64(index)
            if not sel.all():
                n = int(sel.sum())
                if n == 0:
                    return
                rows, keys, k64, h = rows[sel], keys[sel], k64[sel], h[sel]
                swap, proto, sport, dport = swap[sel], proto[sel], sport[sel], dport[sel]
        order = np.argsort(h, kind="stable")
        hs = h[order]
        ks = k64[order]
        newgrp = np.empty(n, dtype=bool)
        newgrp[0] = True
        newgrp[1:] = hs[1:] != hs[:-1]
        gid = np.cumsum(newgrp) - 1
        starts = np.flatnonzero(newgrp)
        if not np.array_equal(ks, ks[starts[gid]]):
            # Two different keys share a 64-bit hash in this batch: sort by the
            # full key instead (exact, slower, practically never needed).
            kv = keys.view("V40").ravel()
            order = np.argsort(kv, kind="stable")
            kvs = kv[order]
            newgrp[1:] = kvs[1:] != kvs[:-1]
            gid = np.cumsum(newgrp) - 1
            starts = np.flatnonzero(newgrp)
            ks = k64[order]
        ends = np.append(starts[1:], n)

        ts = dec.ts_ns[rows][order]
        dirs = swap[order].astype(np.int64)  # 0: packet goes a -> b
        ipb = dec.ip_bytes[rows][order]
        flg = dec.tcp_flags[rows][order].astype(np.int64)
        pr_s = proto[order]
        is_tcp = pr_s == PROTO_TCP
        pos = np.arange(n, dtype=np.int64)
        syn = is_tcp & ((flg & (TCP_SYN | TCP_ACK)) == TCP_SYN)
        # TCP teardown, per flow of the batch: the flow closes at a RST or at the
        # later of the first FIN of each side.  Packets after that stay in it
        # while they are within the grace period and are not a new SYN; the
        # first packet that is neither starts the per-packet state machine.
        fin = is_tcp & ((flg & TCP_FIN) != 0)
        fin0 = np.minimum.reduceat(np.where(fin & (dirs == 0), pos, _BIG), starts)
        fin1 = np.minimum.reduceat(np.where(fin & (dirs == 1), pos, _BIG), starts)
        rst = np.minimum.reduceat(np.where(is_tcp & ((flg & TCP_RST) != 0), pos, _BIG), starts)
        cpos = np.minimum(rst, np.maximum(fin0, fin1))
        closes = cpos < _BIG
        cts = np.full(starts.size, _BIG, dtype=np.int64)
        cts[closes] = ts[cpos[closes]]
        g_cpos = cpos[gid]
        after_close = pos > g_cpos
        event = after_close & (syn | (ts - cts[gid] > self._grace))
        # Idle gaps inside a flow of the batch end it too.
        idle = np.where(is_tcp, self.timeouts.idle_ns(PROTO_TCP),
                        np.where(pr_s == PROTO_UDP, self.timeouts.idle_ns(PROTO_UDP),
                                 self.timeouts.idle_ns(0)))
        gap = np.zeros(n, dtype=np.int64)
        gap[1:] = ts[1:] - ts[:-1]
        gap[starts] = 0
        event |= gap > idle
        first_ev = np.minimum.reduceat(np.where(event, pos, _BIG), starts)
        pend = np.minimum(first_ev, ends)  # prefix is [start, pend)
        fin_bits = (fin0 < pend).astype(np.int64) | ((fin1 < pend).astype(np.int64) << 1)
        closing_at = np.where(cpos < pend, cts, -1)
        out = dirs == 0
        c_pk0 = np.concatenate(([0], np.cumsum(out)))
        c_by0 = np.concatenate(([0], np.cumsum(np.where(out, ipb, 0))))
        c_pk1 = np.concatenate(([0], np.cumsum(~out)))
        c_by1 = np.concatenate(([0], np.cumsum(np.where(out, 0, ipb))))
        pk0 = c_pk0[pend] - c_pk0[starts]
        by0 = c_by0[pend] - c_by0[starts]
        pk1 = c_pk1[pend] - c_pk1[starts]
        by1 = c_by1[pend] - c_by1[starts]
        # Timestamps of the prefix: min and max (captures may be out of order).
        # reduceat over [start, pend) pairs; a sentinel keeps pend == n in range.
        tsx = np.append(ts, ts[-1])
        bounds = np.empty(2 * starts.size, dtype=np.int64)
        bounds[0::2] = starts
        bounds[1::2] = pend
        tmin = np.minimum.reduceat(tsx, bounds)[0::2]
        tmax = np.maximum.reduceat(tsx, bounds)[0::2]
        synack = is_tcp & ((flg & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))
        syn_pos = np.minimum.reduceat(np.where(syn, pos, _BIG), starts)
        synack_pos = np.minimum.reduceat(np.where(synack, pos, _BIG), starts)
        init = dirs[starts].copy()
        has_synack = synack_pos < pend
        init[has_synack] = 1 - dirs[synack_pos[has_synack]]
        has_syn = syn_pos < pend
        init[has_syn] = dirs[syn_pos[has_syn]]
        sp_s = sport[order]
        dp_s = dport[order]
        ver_s = dec.version[rows][order]

        keyb = np.ascontiguousarray(ks[starts]).view("V40").ravel().tolist()
        self._walk_groups(keyb, starts.tolist(), ends.tolist(), pend.tolist(), pk0.tolist(),
                          by0.tolist(), pk1.tolist(), by1.tolist(), tmin.tolist(), tmax.tolist(),
                          init.tolist(), has_syn.tolist(), pr_s[starts].tolist(),
                          ver_s[starts].tolist(), fin_bits.tolist(), closing_at.tolist(), ts,
                          dirs, ipb, flg, sp_s, dp_s)

    def _walk_groups(self, keyb: list[bytes], starts: list[int], ends: list[int],
                     pend: list[int], pk0: list[int], by0: list[int], pk1: list[int],
                     by1: list[int], tmin: list[int], tmax: list[int], init: list[int],
                     has_syn: list[bool], protos: list[int], versions: list[int],
                     fin_bits: list[int], closing_at: list[int], ts: npt.NDArray[np.int64],
                     dirs: npt.NDArray[np.int64],
                     ipb: npt.NDArray[np.int64], flg: npt.NDArray[np.int64],
                     sp: npt.NDArray[np.int64], dp: npt.NDArray[np.int64]) -> None:
        lrus = self._lru
        tcp_lru, udp_lru, other_lru = lrus[PROTO_TCP], lrus[PROTO_UDP], lrus[0]
        new_flows = self._new if self.on_new is not None else None
        idle = {PROTO_TCP: self.timeouts.idle_ns(PROTO_TCP),
                PROTO_UDP: self.timeouts.idle_ns(PROTO_UDP)}
        idle_other = self.timeouts.idle_ns(0)
        for g, key in enumerate(keyb):
            proto = protos[g]
            lru = tcp_lru if proto == PROTO_TCP else udp_lru if proto == PROTO_UDP else other_lru
            start, end, pe = starts[g], ends[g], pend[g]
            flow = lru.get(key)
            if flow is not None and (
                    flow.closing_at >= 0 or flow.fin
                    or int(ts[start]) - flow.last_ns > idle.get(proto, idle_other)):
                pe = start  # the first packet already needs the state machine
            if pe > start:
                if flow is None:
                    f0 = start
                    flow = Flow(key, proto, versions[g], init[g], tmin[g])
                    if proto in (PROTO_ICMP, PROTO_ICMPV6):
                        flow.icmp_type, flow.icmp_code = int(sp[f0]), int(dp[f0])
                    flow.syn_seen = has_syn[g]
                    flow.pk0, flow.by0, flow.pk1, flow.by1 = pk0[g], by0[g], pk1[g], by1[g]
                    flow.last_ns = tmax[g]
                    lru[key] = flow
                    if new_flows is not None:
                        new_flows.append(flow)
                else:
                    flow.pk0 += pk0[g]
                    flow.by0 += by0[g]
                    flow.pk1 += pk1[g]
                    flow.by1 += by1[g]
                    if tmin[g] < flow.first_ns:
                        flow.first_ns = tmin[g]
                    if tmax[g] > flow.last_ns:
                        flow.last_ns = tmax[g]
                    if has_syn[g] and not flow.syn_seen:
                        flow.syn_seen = True
                        flow.initiator = init[g]
                    lru.move_to_end(key)
                if fin_bits[g] or closing_at[g] >= 0:
                    flow.fin = fin_bits[g]
                    if closing_at[g] >= 0:
                        flow.closing_at = closing_at[g]
                        self._closing.append((closing_at[g], flow))
            for i in range(pe, end):
                flow = self._step(lru, key, flow, proto, versions[g], int(ts[i]), int(dirs[i]),
                                  int(ipb[i]), int(flg[i]), int(sp[i]), int(dp[i]))

    def _step(self, lru: OrderedDict[bytes, Flow], key: bytes, flow: Flow | None, proto: int,
              version: int, ts: int, d: int, ipb: int, flags: int, sp: int, dp: int) -> Flow:
        """Add one packet with the full state machine (teardown, reuse, idle gap)."""
        is_tcp = proto == PROTO_TCP
        syn = is_tcp and (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN
        if flow is not None:
            ended = ts - flow.last_ns > self.timeouts.idle_ns(proto)
            if not ended and flow.closing_at >= 0:
                ended = syn or ts - flow.closing_at > self._grace
            if ended:
                self._finish(flow)
                flow = None
        if flow is None:
            init = d
            if is_tcp and (flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK):
                init = 1 - d
            flow = Flow(key, proto, version, init, ts)
            if proto in (PROTO_ICMP, PROTO_ICMPV6):
                flow.icmp_type, flow.icmp_code = sp, dp
            lru[key] = flow
            new = True
        else:
            new = False
            lru.move_to_end(key)
        if d == 0:
            flow.pk0 += 1
            flow.by0 += ipb
        else:
            flow.pk1 += 1
            flow.by1 += ipb
        if ts > flow.last_ns:
            flow.last_ns = ts
        if ts < flow.first_ns:
            flow.first_ns = ts
        if is_tcp:
            if syn and not flow.syn_seen:
                flow.syn_seen = True
                flow.initiator = d
            if flow.closing_at < 0:
                if flags & TCP_FIN:
                    flow.fin |= 1 << d
                if flags & TCP_RST or flow.fin == 3:
                    flow.closing_at = ts
                    self._closing.append((ts, flow))
        if new and self.on_new is not None:
            self._new.append(flow)
        return flow

