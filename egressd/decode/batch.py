"""Decode a whole :class:`~egressd.model.RecordBatch` at once with numpy.

The common layouts — Ethernet with up to four VLAN tags, Linux cooked
(SLL/SLL2), raw IP, BSD NULL/LOOP; IPv4 with options and fragments; IPv6 whose
next header is the transport — are decoded column by column over all packets
of the batch, so the cost per packet is a few numpy element operations instead
of a Python function call.  Packets outside those layouts (IPv6 extension
header chains) go through the scalar reference decoder
(:func:`egressd.decode.scalar.decode_packet`).  Both paths give identical
fields; the test suite checks that on sample captures and fuzzed bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from egressd.decode import linktypes as lt
from egressd.decode.linktypes import ERR_CODE, ERR_NAMES, ERR_UNDECODED, Err
from egressd.decode.scalar import FRAG_FIRST, FRAG_LATER, decode_packet
from egressd.model import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    RecordBatch,
)

_V4_MAPPED = np.uint64(0xFFFF_0000_0000)  # low word of ::ffff:0.0.0.0
def _table(values: Iterable[int], size: int) -> npt.NDArray[np.bool_]:
    """A lookup table: ``table[v]`` is True for the listed values (faster than np.isin)."""
    table = np.zeros(size, dtype=bool)
    table[sorted(values)] = True
    return table


def _any_of(a: npt.NDArray[Any], values: Iterable[int]) -> npt.NDArray[np.bool_]:
    """``np.isin(a, values)`` for a handful of values: one comparison each."""
    out = np.zeros(a.shape, dtype=bool)
    for v in values:
        out |= a == v
    return out


_EXT = _table(lt.IPV6_EXT_HEADERS, 256)
_SUPPORTED = _table(lt.SUPPORTED_LINKTYPES, 65536)
_VLAN = tuple(sorted(lt.VLAN_TPIDS))
_AF4 = tuple(sorted(lt.AF_INET_VALUES))
_AF6 = tuple(sorted(lt.AF_INET6_VALUES))

E_TRUNC_LINK = ERR_CODE[Err.TRUNCATED_LINK]
E_NON_IP = ERR_CODE[Err.NON_IP]
E_TRUNC_IP = ERR_CODE[Err.TRUNCATED_IP]
E_BAD_VER = ERR_CODE[Err.BAD_IP_VERSION]
E_BAD_V4 = ERR_CODE[Err.BAD_IPV4_HEADER]
E_TRUNC_L4 = ERR_CODE[Err.TRUNCATED_TRANSPORT]
E_VLAN = ERR_CODE[Err.TOO_MANY_VLAN_TAGS]
E_SCALAR = 254  # internal marker: decode this row with the scalar decoder

Arr = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class Decoded:
    """Columns of decoded packet fields, one row per record of the batch.

    Rows with ``err != 0`` carry no flow; their reason is
    :data:`~egressd.decode.linktypes.ERR_NAMES` ``[err]``, or, for
    ``err == 255``, ``undecoded_linktype_<linktypes[row]>``.
    """

    ts_ns: npt.NDArray[np.int64]
    err: npt.NDArray[np.uint8]
    version: npt.NDArray[np.uint8]
    proto: npt.NDArray[np.uint8]
    src: npt.NDArray[np.uint64]
    """(n, 2): the 16-byte address (IPv4 mapped) as two big-endian 64-bit words."""
    dst: npt.NDArray[np.uint64]
    sport: npt.NDArray[np.int32]  # -1: none
    dport: npt.NDArray[np.int32]
    tcp_flags: npt.NDArray[np.uint8]
    ip_bytes: npt.NDArray[np.int64]
    frag: npt.NDArray[np.uint8]
    frag_id: npt.NDArray[np.int64]
    linktypes: npt.NDArray[np.uint16]
    l4: npt.NDArray[np.int64]
    """Where the transport header starts in the batch buffer (-1: none)."""
    l4_end: npt.NDArray[np.int64]
    """Where the IP payload ends in the batch buffer (the IP length, or the capture's end)."""

    def __len__(self) -> int:
        return int(self.err.shape[0])

    def error_counts(self) -> Counter[str]:
        """How many rows failed, by reason code."""
        out: Counter[str] = Counter()
        bad = np.flatnonzero(self.err)
        if bad.size == 0:
            return out
        codes = self.err[bad]
        for code, count in zip(*np.unique(codes[codes != ERR_UNDECODED], return_counts=True),
                               strict=True):
            out[ERR_NAMES[int(code)]] += int(count)
        und = bad[codes == ERR_UNDECODED]
        if und.size:
            for ltype, count in zip(*np.unique(self.linktypes[und], return_counts=True),
                                    strict=True):
                out[Err.undecoded(int(ltype))] += int(count)
        return out


class _Bytes:
    """Gathers from the batch buffer without copying it.

    :meth:`win` takes a window of ``w`` bytes at each position in one numpy
    call (a strided view of the buffer indexed by row), which is much cheaper
    than one gather per field.  Reads past the end of the buffer give its last
    byte: only rows whose captured length covers a field use what is read for
    it, so that is enough to stay in bounds.
    """

    __slots__ = ("d", "last", "views")

    def __init__(self, d: npt.NDArray[np.uint8]) -> None:
        self.d = d if d.size else np.zeros(1, dtype=np.uint8)
        self.last = self.d.size - 1
        self.views: dict[int, npt.NDArray[np.uint8]] = {}

    def __getitem__(self, pos: Arr) -> npt.NDArray[np.uint8]:
        return self.d[np.minimum(pos, self.last)]

    def win(self, pos: Arr, w: int) -> npt.NDArray[np.uint8]:
        """``(len(pos), w)`` bytes starting at each position."""
        size = self.d.size
        if size < w:
            return self.d[np.minimum(pos[:, None] + np.arange(w), self.last)]  # type: ignore[no-any-return]
        view = self.views.get(w)
        if view is None:
            view = np.lib.stride_tricks.as_strided(self.d, shape=(size - w + 1, w),
                                                   strides=(1, 1), writeable=False)
            self.views[w] = view
        over = pos > size - w
        if not over.any():
            return view[pos]
        out = view[np.minimum(pos, size - w)]
        out[over] = self.d[np.minimum(pos[over, None] + np.arange(w), self.last)]
        return out


def _u16(d: _Bytes, pos: Arr) -> Arr:
    return (d[pos].astype(np.int64) << 8) | d[pos + 1]


def _u32(d: _Bytes, pos: Arr) -> Arr:
    return (_u16(d, pos) << 16) | _u16(d, pos + 2)


def _columns(n: int) -> tuple[Any, ...]:
    """Empty output columns for ``n`` rows: "no field" everywhere."""
    return (np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8),
            np.zeros((n, 2), dtype=np.uint64), np.zeros((n, 2), dtype=np.uint64),
            np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32),
            np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.int64),
            np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64))


def decode_batch(batch: RecordBatch) -> Decoded:
    """Decode every record of ``batch`` into :class:`Decoded` columns."""
    n = len(batch)
    d = _Bytes(batch.data)
    off = batch.offsets
    end = off + batch.caplens
    ltypes = batch.linktypes
    err = np.zeros(n, dtype=np.uint8)
    l3 = off.copy()
    want = np.zeros(n, dtype=np.int64)

    # ---- link layer -------------------------------------------------------
    etype = np.full(n, -1, dtype=np.int64)
    for ltype, hdr, epos in ((lt.LINKTYPE_ETHERNET, 14, 12), (lt.LINKTYPE_LINUX_SLL, 16, 14),
                             (lt.LINKTYPE_LINUX_SLL2, 20, 0)):
        m = ltypes == ltype
        if not m.any():
            continue
        short = m & (batch.caplens < hdr)
        err[short] = E_TRUNC_LINK
        ok = m & ~short
        etype[ok] = _u16(d, off[ok] + epos)
        l3[ok] = off[ok] + hdr
    tagged = _any_of(etype, _VLAN)
    for _ in range(lt.MAX_VLAN_TAGS):
        if not tagged.any():
            break
        short = tagged & (end < l3 + 4)
        err[short] = E_TRUNC_LINK
        etype[short] = -1
        go = tagged & ~short
        etype[go] = _u16(d, l3[go] + 2)
        l3[go] += 4
        tagged = go & _any_of(etype, _VLAN)
    err[tagged] = E_VLAN
    carried = (etype >= 0) & (err == 0)
    want[carried & (etype == lt.ETH_IPV4)] = 4
    want[carried & (etype == lt.ETH_IPV6)] = 6
    err[carried & (want == 0)] = E_NON_IP

    want[ltypes == lt.LINKTYPE_IPV4] = 4
    want[ltypes == lt.LINKTYPE_IPV6] = 6
    for ltype in (lt.LINKTYPE_NULL, lt.LINKTYPE_LOOP):
        m = ltypes == ltype
        if not m.any():
            continue
        short = m & (batch.caplens < 4)
        err[short] = E_TRUNC_LINK
        ok = m & ~short
        pos = off[ok]
        fam = _u32(d, pos)
        if ltype == lt.LINKTYPE_NULL:
            known = _any_of(fam, _AF4) | _any_of(fam, _AF6)
            le = (d[pos].astype(np.int64) | (d[pos + 1].astype(np.int64) << 8)
                  | (d[pos + 2].astype(np.int64) << 16) | (d[pos + 3].astype(np.int64) << 24))
            fam = np.where(known, fam, le)
        w = np.where(_any_of(fam, _AF4), 4, np.where(_any_of(fam, _AF6), 6, 0))
        idx = np.flatnonzero(ok)
        want[idx] = w
        err[idx[w == 0]] = E_NON_IP
        l3[idx] = off[idx] + 4
    known_lt = _SUPPORTED[ltypes]
    err[~known_lt] = ERR_UNDECODED

    # ---- network layer ----------------------------------------------------
    live = err == 0
    err[live & (end <= l3)] = E_TRUNC_IP
    live = err == 0
    first = d[l3]
    ver = (first >> 4).astype(np.int64)
    badver = live & (((want != 0) & (ver != want)) | ((ver != 4) & (ver != 6)))
    err[badver] = E_BAD_VER
    live = err == 0

    version, proto, src, dst, sport, dport, flags, ipb, frag, frag_id, l4, l4_end = _columns(n)
    want_ports = np.zeros(n, dtype=bool)

    # IPv4
    v4 = live & (ver == 4)
    short = v4 & (end - l3 < 20)
    err[short] = E_TRUNC_IP
    v4 &= ~short
    if v4.any():
        i4 = np.flatnonzero(v4)
        p = l3[i4]
        h = d.win(p, 20)
        w16 = h.view(">u2")  # 16-bit header words, network order
        ihl = (h[:, 0] & 0x0F).astype(np.int64) * 4
        total = w16[:, 1].astype(np.int64)
        bad = (ihl < 20) | ((total != 0) & (total < ihl))
        if bad.any():
            err[i4[bad]] = E_BAD_V4
            keep = ~bad
            i4, p, ihl, total, h = i4[keep], p[keep], ihl[keep], total[keep], h[keep]
            w16 = h.view(">u2")
        wire_total = np.maximum(batch.wirelens[i4] - (p - off[i4]), ihl)
        total = np.where(total == 0, wire_total, total)
        fragword = w16[:, 3]
        version[i4] = 4
        proto[i4] = h[:, 9]
        w32 = h.view(">u4")
        src[i4, 1] = w32[:, 3].astype(np.uint64) | _V4_MAPPED
        dst[i4, 1] = w32[:, 4].astype(np.uint64) | _V4_MAPPED
        ipb[i4] = total
        later = (fragword & 0x1FFF) != 0
        more = (fragword & 0x2000) != 0
        ident = w16[:, 2]
        frag[i4[later]] = FRAG_LATER
        frag_id[i4[later]] = ident[later]
        firstf = ~later & more
        frag[i4[firstf]] = FRAG_FIRST
        frag_id[i4[firstf]] = ident[firstf]
        notlater = ~later
        hdr_short = notlater & (end[i4] < p + ihl)
        err[i4[hdr_short]] = E_TRUNC_IP
        go = notlater & ~hdr_short
        l4[i4[go]] = p[go] + ihl[go]
        l4_end[i4[go]] = np.minimum(end[i4[go]], p[go] + total[go])
        want_ports[i4[go]] = True

    # IPv6
    v6 = live & (ver == 6)
    short = v6 & (end - l3 < 40)
    err[short] = E_TRUNC_IP
    v6 &= ~short
    if v6.any():
        i6 = np.flatnonzero(v6)
        p = l3[i6]
        h6 = d.win(p, 40)
        nh = h6[:, 6]
        ext = _EXT[nh]
        if ext.any():
            err[i6[ext]] = E_SCALAR
            keep = ~ext
            i6, p, nh, h6 = i6[keep], p[keep], nh[keep], h6[keep]
        plen = (h6[:, 4].astype(np.int64) << 8) | h6[:, 5]
        wire_total = np.maximum(batch.wirelens[i6] - (p - off[i6]), 40)
        version[i6] = 6
        proto[i6] = nh
        words = np.ascontiguousarray(h6[:, 8:40]).view(">u8")
        src[i6] = words[:, 0:2]
        dst[i6] = words[:, 2:4]
        ipb[i6] = np.where(plen == 0, wire_total, plen + 40)
        l4[i6] = p + 40
        l4_end[i6] = np.maximum(p + 40, np.minimum(end[i6], p + ipb[i6]))
        want_ports[i6] = True

    # ---- transport ports --------------------------------------------------
    if want_ports.any():
        iw = np.flatnonzero(want_ports)
        pr = proto[iw]
        p = l4[iw]
        avail = end[iw] - p
        tcp = pr == PROTO_TCP
        udpish = (pr == PROTO_UDP) | (pr == PROTO_SCTP)
        icmp = (pr == PROTO_ICMP) | (pr == PROTO_ICMPV6)
        need = np.where(tcp, 14, np.where(udpish, 4, np.where(icmp, 2, 0)))
        trunc = avail < need
        err[iw[trunc]] = E_TRUNC_L4
        ok4 = ~trunc & (tcp | udpish | icmp)
        t = d.win(p[ok4], 14)
        t16 = t.view(">u2")
        tcp, udpish, icmp, io = tcp[ok4], udpish[ok4], icmp[ok4], iw[ok4]
        ported = tcp | udpish
        sport[io[ported]] = t16[ported, 0]
        dport[io[ported]] = t16[ported, 1]
        flags[io[tcp]] = t[tcp, 13]
        sport[io[icmp]] = t[icmp, 0]
        dport[io[icmp]] = t[icmp, 1]

    # ---- rows for the scalar reference decoder ------------------------------
    slow = np.flatnonzero(err == E_SCALAR)
    if slow.size:
        _scalar_rows(batch, slow, err, version, proto, src, dst, sport, dport, flags, ipb, frag,
                     frag_id, l4, l4_end)
    # Rows that failed carry no fields, so both paths agree on every column.
    failed = err != 0
    if failed.any():
        for col in (version, proto, flags, frag):
            col[failed] = 0
        ipb[failed] = 0
        frag_id[failed] = 0
        sport[failed] = -1
        dport[failed] = -1
        src[failed] = 0
        dst[failed] = 0
        l4[failed] = -1
        l4_end[failed] = -1
    return Decoded(batch.ts_ns, err, version, proto, src, dst, sport, dport, flags, ipb, frag,
                   frag_id, ltypes, l4, l4_end)


def _scalar_rows(batch: RecordBatch, rows: Arr, err: npt.NDArray[np.uint8],
                 version: npt.NDArray[np.uint8], proto: npt.NDArray[np.uint8],
                 src: npt.NDArray[np.uint64], dst: npt.NDArray[np.uint64],
                 sport: npt.NDArray[np.int32], dport: npt.NDArray[np.int32],
                 flags: npt.NDArray[np.uint8], ipb: npt.NDArray[np.int64],
                 frag: npt.NDArray[np.uint8], frag_id: npt.NDArray[np.int64],
                 l4: npt.NDArray[np.int64], l4_end: npt.NDArray[np.int64]) -> None:
    for i in rows.tolist():
        pkt = decode_packet(int(batch.linktypes[i]), batch.packet(i), int(batch.wirelens[i]))
        if isinstance(pkt, str):
            err[i] = ERR_CODE.get(pkt, ERR_UNDECODED)
            continue
        err[i] = 0
        version[i] = pkt.version
        proto[i] = pkt.proto
        src[i] = (int.from_bytes(pkt.src[:8], "big"), int.from_bytes(pkt.src[8:], "big"))
        dst[i] = (int.from_bytes(pkt.dst[:8], "big"), int.from_bytes(pkt.dst[8:], "big"))
        sport[i] = pkt.sport
        dport[i] = pkt.dport
        flags[i] = pkt.tcp_flags
        ipb[i] = pkt.ip_bytes
        frag[i] = pkt.frag
        frag_id[i] = pkt.frag_id
        base = int(batch.offsets[i])
        l4[i] = base + pkt.l4 if pkt.l4 >= 0 else -1
        l4_end[i] = base + pkt.l4_end if pkt.l4_end >= 0 else -1


def decode_scalar_batch(batch: RecordBatch) -> Decoded:
    """Decode ``batch`` one packet at a time with the reference decoder.

    Slow; for tests that compare both paths and for debugging.
    """
    n = len(batch)
    rows = np.arange(n, dtype=np.int64)
    err = np.zeros(n, dtype=np.uint8)
    version, proto, src, dst, sport, dport, flags, ipb, frag, frag_id, l4, l4_end = _columns(n)
    _scalar_rows(batch, rows, err, version, proto, src, dst, sport, dport, flags, ipb, frag,
                 frag_id, l4, l4_end)
    return Decoded(batch.ts_ns, err, version, proto, src, dst, sport, dport, flags, ipb, frag,
                   frag_id, batch.linktypes, l4, l4_end)
