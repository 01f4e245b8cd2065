"""A plain flow aggregator: the baseline that egressd's audit is measured against.

It walks the records of a classic pcap file with ``struct.unpack_from`` and
counts packets and IP-layer bytes per bidirectional 5-tuple in a dict: the
most direct pure-Python way to do the job, without geolocation, policy or
TCP state.  Handles Ethernet (with 802.1Q / 802.1ad / QinQ tags), Linux SLL
and raw-IP link types, IPv4 and IPv6 (no extension headers walked; IPv4
non-first fragments get ports 0).

    python bench/ref_aggregator.py capture.pcap
"""

from __future__ import annotations

import argparse
import mmap
import socket
import struct
import sys
import time
from pathlib import Path

LINK_ETHERNET = 1
LINK_RAW = (101, 12, 14)
LINK_SLL = 113
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
PORT_PROTOS = (6, 17, 132)


def aggregate(path: Path) -> tuple[int, dict[tuple[object, ...], list[int]]]:
    flows: dict[tuple[object, ...], list[int]] = {}
    packets = 0
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        magic = mm[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            endian = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            endian = ">"
        else:
            raise SystemExit(f"{path}: not a classic pcap file")
        linktype = struct.unpack_from(endian + "I", mm, 20)[0] & 0x0FFFFFFF
        rec = struct.Struct(endian + "IIII")
        rec_unpack = rec.unpack_from
        u16 = struct.Struct("!H").unpack_from
        ports = struct.Struct("!HH").unpack_from
        end = len(mm)
        pos = 24
        get = flows.get
        while pos + 16 <= end:
            _, _, caplen, _ = rec_unpack(mm, pos)
            p = pos + 16
            pos = p + caplen
            if pos > end:
                break
            packets += 1
            if linktype == LINK_ETHERNET:
                etype = u16(mm, p + 12)[0]
                off = p + 14
                while etype in VLAN_TPIDS:
                    etype = u16(mm, off + 2)[0]
                    off += 4
            elif linktype == LINK_SLL:
                etype = u16(mm, p + 14)[0]
                off = p + 16
            elif linktype in LINK_RAW:
                off = p
                etype = 0x0800 if mm[p] >> 4 == 4 else 0x86DD
            else:
                continue
            if etype == 0x0800:
                ihl = (mm[off] & 0x0F) * 4
                length = u16(mm, off + 2)[0]
                frag = u16(mm, off + 6)[0] & 0x1FFF
                proto = mm[off + 9]
                a = mm[off + 12:off + 16]
                b = mm[off + 16:off + 20]
                l4 = off + ihl
            elif etype == 0x86DD:
                length = 40 + u16(mm, off + 4)[0]
                frag = 0
                proto = mm[off + 6]
                a = mm[off + 8:off + 24]
                b = mm[off + 24:off + 40]
                l4 = off + 40
            else:
                continue
            if proto in PORT_PROTOS and frag == 0 and l4 + 4 <= pos:
                pa, pb = ports(mm, l4)
            else:
                pa = pb = 0
            key = (proto, a, pa, b, pb) if (a, pa) <= (b, pb) else (proto, b, pb, a, pa)
            c = get(key)
            if c is None:
                flows[key] = [1, length]
            else:
                c[0] += 1
                c[1] += length
    return packets, flows


def _addr(raw: object) -> str:
    assert isinstance(raw, bytes)
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("capture", type=Path)
    ap.add_argument("--top", type=int, default=0, help="also print the N biggest flows")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    packets, flows = aggregate(args.capture)
    elapsed = time.perf_counter() - t0
    total_bytes = sum(c[1] for c in flows.values())
    print(f"{packets} packets, {len(flows)} flows, {total_bytes} IP bytes in {elapsed:.2f} s: "
          f"{packets / elapsed:,.0f} packets/s")
    for key, (n, nbytes) in sorted(flows.items(), key=lambda kv: -kv[1][1])[: args.top]:
        proto, a, pa, b, pb = key
        print(f"  {proto:>3} {_addr(a)}:{pa} <-> {_addr(b)}:{pb}  {n} packets {nbytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
