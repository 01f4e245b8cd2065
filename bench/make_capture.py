"""Write a large, realistic gateway capture for benchmarking (classic pcap, Ethernet).

The traffic looks like what a mirror port behind an office gateway sees:
internal hosts (10.x, fd00::/8) talking to public servers in a mix of
countries, ~84 % IPv4 / ~15 % IPv6 / ~1 % ARP, ~10 % of the packets 802.1Q
tagged, ~75 % TCP / ~20 % UDP / ~4 % ICMP / the rest ESP, and flow sizes
following a Zipf law (a few elephants, a long tail of one- and two-packet
flows).  TCP flows have handshakes, consistent sequence numbers and FIN
teardowns; frames shorter than 60 bytes are padded as on the wire.

Speed comes from building only a few hundred header templates with scapy and
then stamping addresses, ports, lengths, sequence numbers and timestamps into
a preallocated buffer with ``struct``; payload bytes stay zero.  Checksums are
left as the templates have them (not valid for the stamped fields), as in
captures taken with checksum offload.

Everything is drawn from a seeded generator: the same arguments give the same
file, byte for byte.

    python bench/make_capture.py --packets 1000000 --out gateway.pcap
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import iptocc
import numpy as np

START_EPOCH = 1772352000  # 2026-03-01T08:00:00Z

LINKTYPE_ETHERNET = 1
PCAP_MAGIC_US = 0xA1B2C3D4

# Packet kinds (a template exists per kind, flow variant and direction).
K_SYN, K_SYNACK, K_ACK, K_DATA, K_FIN, K_RST = range(6)
K_UDP = 6
K_ECHO_REQ, K_ECHO_REP = 7, 8
K_ESP = 9
K_ARP_REQ, K_ARP_REP = 10, 11

# Flow classes: (name, ip version, target share of all packets, max packets per flow).
CLASSES: list[tuple[str, int, float, int]] = [
    ("tcp", 4, 0.630, 1 << 60),
    ("udp", 4, 0.168, 1 << 60),
    ("icmp", 4, 0.0336, 60),
    ("esp", 4, 0.008, 1 << 60),
    ("tcp", 6, 0.1125, 1 << 60),
    ("udp", 6, 0.030, 1 << 60),
    ("icmp", 6, 0.006, 60),
    ("esp", 6, 0.0015, 1 << 60),
    ("arp", 0, 0.010, 2),
]

VLAN_IDS = (10, 20, 30, 40)
GATEWAY_MAC = "00:1b:21:3a:4f:01"

# Remote prefixes by country (registry country checked against iptocc when drawing).
REMOTE_V4: dict[str, list[str]] = {
    "CN": ["36.112.0.0/16", "39.156.0.0/16", "42.120.0.0/16", "58.250.0.0/16",
           "59.36.0.0/16", "61.135.0.0/16", "101.226.0.0/16", "111.13.0.0/16",
           "112.80.0.0/16", "113.108.0.0/16", "114.80.0.0/16", "115.239.0.0/16",
           "117.184.0.0/16", "119.29.0.0/16", "120.92.0.0/16", "121.14.0.0/16",
           "123.125.0.0/16", "180.101.0.0/16", "182.61.0.0/16", "183.232.0.0/16",
           "220.181.0.0/16", "222.73.0.0/16", "223.5.0.0/16"],
    "HK": ["1.36.0.0/16", "14.0.128.0/17", "58.176.0.0/16", "112.118.0.0/16",
           "113.252.0.0/16", "119.236.0.0/16", "203.198.0.0/16", "218.102.0.0/16"],
    "US": ["8.8.0.0/16", "23.0.0.0/16", "52.0.0.0/16", "104.16.0.0/16",
           "140.82.0.0/16", "151.101.0.0/16", "157.240.0.0/16", "172.217.0.0/16"],
    "DE": ["5.9.0.0/16", "46.4.0.0/16", "78.46.0.0/16", "85.214.0.0/16", "88.198.0.0/16"],
    "JP": ["126.0.0.0/16", "133.0.0.0/16", "153.120.0.0/16", "160.16.0.0/16"],
    "GB": ["81.2.0.0/16", "86.0.0.0/16", "90.192.0.0/16", "212.58.0.0/16"],
    "SG": ["8.210.0.0/16"],
}
REMOTE_V6: dict[str, list[str]] = {
    "CN": ["2408:8000::/32", "2409:8000::/32", "240e:0::/32", "2400:da00::/32",
           "2402:4e00::/32"],
    "HK": ["2403:e800::/32", "2404:c800::/32"],
    "US": ["2001:4860::/32", "2620:fe::/48", "2400:cb00::/32", "2001:470::/32"],
    "DE": ["2a01:4f8::/32", "2a02:c207::/32"],
    "JP": ["2400:8500::/32", "2001:218::/32"],
    "GB": ["2a00:23c0::/32"],
    "IE": ["2a00:1450::/32"],
}
COUNTRY_WEIGHTS = {"CN": 0.40, "HK": 0.06, "US": 0.24, "DE": 0.08, "JP": 0.08,
                   "GB": 0.06, "SG": 0.03, "IE": 0.03}
UNKNOWN_V4 = "102.230.0.0/16"  # no registry country (checked when drawing)

TCP_SERVICES = [(443, 0.66), (80, 0.14), (22, 0.04), (993, 0.03), (587, 0.02),
                (8443, 0.04), (5222, 0.03), (3389, 0.02), (25, 0.02)]
INTERACTIVE_PORTS = frozenset({22, 3389, 5222})
INBOUND_SERVICES = [443, 22, 25]


@dataclass(slots=True)
class Template:
    hdr: bytes
    ip_off: int
    l4_off: int
    hdr_len: int
    """Bytes of L2 + L3 + L4 headers: the packet is hdr + payload."""
    ipver: int
    kind: int


class TemplateCache:
    """Header templates built with scapy once per (variant, kind, direction)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, bool, int, bool], Template] = {}
        # scapy is slow to import; only load it when a template is needed.
        from scapy.layers.inet import ICMP, IP, TCP, UDP
        from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
        from scapy.layers.ipsec import ESP
        from scapy.layers.l2 import ARP, Dot1Q, Ether

        self._s = {
            "Ether": Ether, "Dot1Q": Dot1Q, "IP": IP, "IPv6": IPv6, "TCP": TCP,
            "UDP": UDP, "ICMP": ICMP, "ESP": ESP, "ARP": ARP,
            "E6req": ICMPv6EchoRequest, "E6rep": ICMPv6EchoReply,
        }

    def get(self, vlan: int, ipver: int, ts_opt: bool, kind: int, outbound: bool) -> Template:
        key = (vlan, ipver, ts_opt, kind, outbound)
        t = self._cache.get(key)
        if t is None:
            t = self._build(*key)
            self._cache[key] = t
        return t

    def __len__(self) -> int:
        return len(self._cache)

    def _build(self, vlan: int, ipver: int, ts_opt: bool, kind: int, outbound: bool) -> Template:
        s = self._s
        host_mac = f"3c:ec:ef:10:{vlan:02x}:{ipver:02x}"
        src_mac, dst_mac = (host_mac, GATEWAY_MAC) if outbound else (GATEWAY_MAC, host_mac)
        if kind in (K_ARP_REQ, K_ARP_REP):
            eth = s["Ether"](src=src_mac, dst="ff:ff:ff:ff:ff:ff" if kind == K_ARP_REQ
                             else dst_mac)
            if kind == K_ARP_REQ:
                arp = s["ARP"](op=1, hwsrc=src_mac, psrc="10.20.0.1", pdst="10.20.0.2")
            else:
                arp = s["ARP"](op=2, hwsrc=src_mac, psrc="10.20.0.2", hwdst=dst_mac,
                               pdst="10.20.0.1")
            pkt = eth / arp
            raw = bytes(pkt)
            return Template(raw, 14, 14, len(raw), 0, kind)
        eth = s["Ether"](src=src_mac, dst=dst_mac)
        if vlan:
            eth = eth / s["Dot1Q"](vlan=vlan, prio=0)
        if ipver == 4:
            l3 = s["IP"](src="10.0.0.1", dst="192.0.2.1", ttl=64 if outbound else 54,
                         flags="DF", id=0)
        else:
            l3 = s["IPv6"](src="fd00::1", dst="2001:db8::1", hlim=64 if outbound else 54)
        if kind in (K_SYN, K_SYNACK, K_ACK, K_DATA, K_FIN, K_RST):
            flags = {K_SYN: "S", K_SYNACK: "SA", K_ACK: "A", K_DATA: "PA", K_FIN: "FA",
                     K_RST: "RA"}[kind]
            opts: list[tuple[str, object]] = []
            if kind in (K_SYN, K_SYNACK):
                opts = [("MSS", 1460 if ipver == 4 else 1440), ("SAckOK", b"")]
                if ts_opt:
                    opts.append(("Timestamp", (0x1A2B3C4D, 0 if kind == K_SYN else 0x0BADCAFE)))
                opts += [("NOP", None), ("WScale", 7)]
            elif ts_opt and kind != K_RST:
                opts = [("NOP", None), ("NOP", None), ("Timestamp", (0x1A2B3C4D, 0x0BADCAFE))]
            l4 = s["TCP"](sport=1, dport=1, flags=flags, window=502, options=opts)
        elif kind == K_UDP:
            l4 = s["UDP"](sport=1, dport=1)
        elif kind in (K_ECHO_REQ, K_ECHO_REP):
            if ipver == 4:
                l4 = s["ICMP"](type=8 if kind == K_ECHO_REQ else 0, id=1, seq=1)
            else:
                l4 = (s["E6req"] if kind == K_ECHO_REQ else s["E6rep"])(id=1, seq=1)
        else:
            l4 = s["ESP"](spi=0x1000, seq=1)
        pkt = eth / l3 / l4
        raw = bytes(pkt)
        ip_off = 18 if vlan else 14
        l4_off = ip_off + (20 if ipver == 4 else 40)
        return Template(raw, ip_off, l4_off, len(raw), ipver, kind)


def zipf_sizes(total: int, flows: int, exponent: float) -> np.ndarray:
    """Flow sizes ~ K / rank**exponent (each at least 1) adding up to ``total``."""
    ranks = np.arange(1, flows + 1, dtype=np.float64) ** exponent
    lo, hi = 0.0, float(total)
    for _ in range(100):
        k = (lo + hi) / 2
        if np.maximum(1, np.floor(k / ranks)).sum() > total:
            hi = k
        else:
            lo = k
    sizes = np.maximum(1, np.floor(lo / ranks)).astype(np.int64)
    sizes[0] += total - int(sizes.sum())
    return sizes


def assign_classes(sizes: np.ndarray, rng: random.Random) -> list[int]:
    """Give each flow a class so that packet shares follow CLASSES' targets."""
    weights = np.array([c[2] for c in CLASSES])
    weights = weights / weights.sum()
    got = np.zeros(len(CLASSES))
    out = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), rng.random()))
    total = float(sizes.sum())
    done = 0.0
    for i in order:
        n = int(sizes[i])
        done += n
        deficit = weights * done - got
        room = weights * total - got
        fits = [c for c in range(len(CLASSES)) if n <= CLASSES[c][3] and n <= room[c]]
        if fits:
            c = max(fits, key=lambda c: deficit[c])
        else:
            c = max((c for c in range(len(CLASSES)) if n <= CLASSES[c][3]),
                    key=lambda c: room[c])
        out[i] = c
        got[c] += n
    return out


def pick_vlan_flows(sizes: np.ndarray, share: float, rng: random.Random) -> list[int]:
    """VLAN id (0: untagged) per flow, tagging about ``share`` of all packets."""
    budget = share * float(sizes.sum())
    out = [0] * len(sizes)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    tagged = 0
    for i in order:
        n = int(sizes[i])
        if tagged + n <= budget:
            out[i] = rng.choice(VLAN_IDS)
            tagged += n
    return out


class RemotePool:
    """Public addresses whose registry country is checked with iptocc."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.v4 = {c: [ipaddress.ip_network(p) for p in ps] for c, ps in REMOTE_V4.items()}
        self.v6 = {c: [ipaddress.ip_network(p) for p in ps] for c, ps in REMOTE_V6.items()}
        self.unknown = ipaddress.ip_network(UNKNOWN_V4)
        self.countries = Counter[str]()

    def _host(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
        span = net.num_addresses - 2 if net.version == 4 else min(net.num_addresses, 1 << 64)
        return str(net.network_address + 1 + self.rng.randrange(span))

    def draw(self, ipver: int) -> str:
        table = self.v4 if ipver == 4 else self.v6
        if ipver == 4 and self.rng.random() < 0.01:
            for _ in range(20):
                ip = self._host(self.unknown)
                if iptocc.country_code(ip) is None:
                    self.countries["(none)"] += 1
                    return ip
        names = [c for c in COUNTRY_WEIGHTS if c in table]
        country = self.rng.choices(names, [COUNTRY_WEIGHTS[c] for c in names])[0]
        for _ in range(50):
            ip = self._host(self.rng.choice(table[country]))
            if iptocc.country_code(ip) == country:
                self.countries[country] += 1
                return ip
        raise SystemExit(f"no {country} address found in the prefixes: update the tables")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--flows", type=int, default=None,
                    help="flows to generate (default: packets / 18, ~90 %% of them IP)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds the capture spans")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    n_packets = args.packets
    n_flows = args.flows or max(1, n_packets // 18)
    n_flows = min(n_flows, n_packets)
    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)

    sizes = zipf_sizes(n_packets, n_flows, 1.0)
    classes = assign_classes(sizes, rng)
    vlans = pick_vlan_flows(sizes, 0.10, rng)
    pool = RemotePool(rng)
    internal_v4 = [f"10.{net}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                   for net in (20, 30, 40, 50, 60) for _ in range(600)]
    internal_v6 = [f"fd00:{net}::{rng.randrange(1, 0xFFFF):x}:{rng.randrange(1, 0xFFFF):x}"
                   for net in (20, 30, 40) for _ in range(300)]
    remotes_v4 = [pool.draw(4) for _ in range(8000)]
    remotes_v6 = [pool.draw(6) for _ in range(2000)]

    # Per-flow description.
    f_ipver: list[int] = []
    f_vlan: list[int] = vlans
    f_ts: list[bool] = []
    f_init_internal: list[bool] = []
    f_addr: list[tuple[bytes, bytes]] = []  # (initiator, responder) packed
    f_ports: list[tuple[int, int]] = []
    kinds_l: list[np.ndarray] = []
    sides_l: list[np.ndarray] = []
    pay_l: list[np.ndarray] = []

    for f in range(n_flows):
        n = int(sizes[f])
        cname, ipver, _, _ = CLASSES[classes[f]]
        f_ts.append(rng.random() < 0.8)
        if cname == "arp":
            f_ipver.append(0)
            f_init_internal.append(True)
            f_addr.append((b"", b""))
            f_ports.append((0, 0))
            kinds_l.append(np.array([K_ARP_REQ, K_ARP_REP][:n], dtype=np.int8))
            sides_l.append(np.array([0, 1][:n], dtype=np.int8))
            pay_l.append(np.zeros(n, dtype=np.int32))
            continue
        f_ipver.append(ipver)
        internal = rng.choice(internal_v4 if ipver == 4 else internal_v6)
        remote = rng.choice(remotes_v4 if ipver == 4 else remotes_v6)
        inbound = cname == "tcp" and rng.random() < 0.03
        f_init_internal.append(not inbound)
        ia, ra = ipaddress.ip_address(internal).packed, ipaddress.ip_address(remote).packed
        f_addr.append((ra, ia) if inbound else (ia, ra))
        eph = rng.randrange(32768, 61000)
        kinds, sides, pays = flow_packets(cname, ipver, n, rng, nrng, f_ts[-1])
        if cname == "tcp":
            service = rng.choice(INBOUND_SERVICES) if inbound else weighted(rng, TCP_SERVICES)
            if service in INTERACTIVE_PORTS:
                big = pays > 400
                pays[big] = nrng.integers(36, 400, int(big.sum()))
        elif cname == "udp":
            service = 53 if n <= 2 else (123 if n <= 4 else
                                         weighted(rng, [(443, 0.7), (4500, 0.1),
                                                        (3478, 0.1), (51820, 0.1)]))
        else:
            service = 0
        if cname == "icmp":
            f_ports.append((rng.randrange(1, 65535), 0))  # echo identifier
        else:
            f_ports.append((eph, service))
        kinds_l.append(kinds)
        sides_l.append(sides)
        pay_l.append(pays)

    # Timestamps: each flow gets a start and a span; its packets keep their order.
    lens = sizes.astype(np.int64)
    pf = np.repeat(np.arange(n_flows, dtype=np.int64), lens)
    within = np.arange(n_packets, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    gap_us = nrng.lognormal(np.log(30_000), 1.0, n_flows).clip(200, 900_000)
    span = np.minimum(lens * gap_us, args.duration * 0.95 * 1e6)
    start = nrng.random(n_flows) * (args.duration * 1e6 - span)
    jitter = nrng.random(n_packets)
    ts_us = (start[pf] + span[pf] * (within + jitter) / lens[pf]).astype(np.int64)
    order = np.argsort(ts_us, kind="stable")

    pkinds = np.concatenate(kinds_l)[order].tolist()
    psides = np.concatenate(sides_l)[order].tolist()
    ppays = np.concatenate(pay_l)[order].tolist()
    pflow = pf[order].tolist()
    pts = (ts_us[order] + START_EPOCH * 1_000_000).tolist()

    truth = [0, 0, 0, 0]  # IP packets out, in; IP bytes out, in (internal -> remote = out)
    counts = write_pcap(args.out, pflow, psides, pkinds, ppays, pts, f_ipver, f_vlan, f_ts,
                        f_init_internal, f_addr, f_ports, rng, truth)
    # What any correct flow meter must find in this capture, for bench_audit.py to check.
    truth_path = truth_file(args.out)
    truth_path.write_text(json.dumps({
        "records": n_packets,
        "ip_flows": sum(1 for v in f_ipver if v),
        "packets_out": truth[0], "packets_in": truth[1],
        "bytes_out": truth[2], "bytes_in": truth[3],
    }, indent=2) + "\n")
    elapsed = time.perf_counter() - t_start
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {n_packets} packets, {n_flows} flows, {size / 1e6:.1f} MB "
          f"in {elapsed:.1f} s ({counts['templates']} templates)", file=sys.stderr)
    total = n_packets
    mix = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(counts.items())
                    if k != "templates")
    print(f"  mix: {mix}", file=sys.stderr)
    drawn = sum(pool.countries.values())
    print("  remote hosts by registry country: "
          + ", ".join(f"{c} {v / drawn:.0%}" for c, v in pool.countries.most_common()),
          file=sys.stderr)
    return 0


def truth_file(capture: Path) -> Path:
    """Where the generator's truth about ``capture`` is written (beside it)."""
    return capture.with_name(capture.name + ".truth.json")


def weighted(rng: random.Random, table: list[tuple[int, float]]) -> int:
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def flow_packets(cname: str, ipver: int, n: int, rng: random.Random,
                 nrng: np.random.Generator, ts_opt: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinds, sides (0 initiator, 1 responder) and payload sizes of one flow's packets."""
    kinds = np.empty(n, dtype=np.int8)
    sides = np.empty(n, dtype=np.int8)
    pays = np.zeros(n, dtype=np.int32)
    if cname == "tcp":
        mss = (1460 if ipver == 4 else 1440) - (12 if ts_opt else 0)
        heavy = 1 if rng.random() < 0.75 else 0  # mostly downloads
        head: list[tuple[int, int]] = []
        tail: list[tuple[int, int]] = []
        if n == 1:
            head = [(K_SYN, 0)]
        elif n == 2:
            head = [(K_SYN, 0), (K_RST, 1)]
        else:
            head = [(K_SYN, 0), (K_SYNACK, 1), (K_ACK, 0)]
            if n >= 7:
                tail = [(K_FIN, 0), (K_FIN, 1), (K_ACK, 0)]
        m = n - len(head) - len(tail)
        for i, (k, s) in enumerate(head):
            kinds[i], sides[i] = k, s
        for i, (k, s) in enumerate(tail):
            kinds[n - len(tail) + i], sides[n - len(tail) + i] = k, s
        if m > 0:
            b = slice(len(head), len(head) + m)
            # request, then bursts of two full segments and one ACK from the other side
            cyc_side = np.resize(np.array([heavy, heavy, 1 - heavy], dtype=np.int8), m)
            cyc_kind = np.resize(np.array([K_DATA, K_DATA, K_ACK], dtype=np.int8), m)
            cyc_pay = np.resize(np.array([mss, mss, 0], dtype=np.int32), m)
            cyc_side[0], cyc_kind[0] = 0, K_DATA
            cyc_pay[0] = int(nrng.integers(120, 900))
            if m > 3:
                last = int(np.flatnonzero(cyc_kind == K_DATA)[-1])
                if last > 0:
                    cyc_pay[last] = int(nrng.integers(1, mss))
            sides[b], kinds[b], pays[b] = cyc_side, cyc_kind, cyc_pay
    elif cname == "udp":
        kinds[:] = K_UDP
        sides[:] = np.resize(np.array([0, 1], dtype=np.int8), n)
        if n <= 2:  # DNS
            pays[:] = np.where(sides == 0, nrng.integers(28, 60, n), nrng.integers(60, 280, n))
        elif n <= 4:  # NTP
            pays[:] = 48
        else:  # QUIC-like: big datagrams one way, short ones back
            heavy = 1 if rng.random() < 0.7 else 0
            sides[:] = np.where(nrng.random(n) < 0.7, heavy, 1 - heavy)
            sides[0] = 0
            pays[:] = np.where(sides == heavy, nrng.integers(1200, 1353, n),
                               nrng.integers(25, 70, n))
    elif cname == "icmp":
        kinds[:] = np.resize(np.array([K_ECHO_REQ, K_ECHO_REP], dtype=np.int8), n)
        sides[:] = np.resize(np.array([0, 1], dtype=np.int8), n)
        pays[:] = 56  # ping's default 56 data bytes after the 8-byte echo header
    else:  # ESP tunnel
        kinds[:] = K_ESP
        sides[:] = np.where(nrng.random(n) < 0.5, 0, 1)
        pays[:] = np.where(nrng.random(n) < 0.5, nrng.integers(1300, 1400, n),
                           nrng.integers(60, 200, n))
    return kinds, sides, pays


def write_pcap(out: Path, pflow: list[int], psides: list[int], pkinds: list[int],
               ppays: list[int], pts: list[int], f_ipver: list[int], f_vlan: list[int],
               f_ts: list[bool], f_init_internal: list[bool],
               f_addr: list[tuple[bytes, bytes]], f_ports: list[tuple[int, int]],
               rng: random.Random, truth: list[int]) -> Counter[str]:
    """Write the capture; ``truth`` gets the IP packets and IP-layer bytes out and in."""
    templates = TemplateCache()
    n_flows = len(f_ipver)
    # next sequence number per (flow, side)
    nxt = [rng.getrandbits(32) for _ in range(2 * n_flows)]
    counts: Counter[str] = Counter()
    pack_into = struct.pack_into
    rec_hdr = struct.Struct("<IIII")
    chunk = 65536
    with out.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", PCAP_MAGIC_US, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET))
        total = len(pflow)
        for c0 in range(0, total, chunk):
            c1 = min(total, c0 + chunk)
            # size the buffer: headers + payload + padding, at most 16 + 1600 per packet
            buf = bytearray((c1 - c0) * 1620)
            pos = 0
            for i in range(c0, c1):
                f = pflow[i]
                side = psides[i]
                kind = pkinds[i]
                pay = ppays[i]
                ipver = f_ipver[f]
                outbound = (side == 0) == f_init_internal[f]
                t = templates.get(f_vlan[f] if ipver else 0, ipver, f_ts[f], kind, outbound)
                frame_len = t.hdr_len + pay
                cap = frame_len if frame_len >= 60 else 60
                ts = pts[i]
                rec_hdr.pack_into(buf, pos, ts // 1_000_000, ts % 1_000_000, cap, cap)
                p = pos + 16
                buf[p:p + t.hdr_len] = t.hdr
                pos = p + cap
                if ipver == 0:
                    counts["arp"] += 1
                    continue
                src, dst = f_addr[f]
                sport, dport = f_ports[f]
                if side:
                    src, dst, sport, dport = dst, src, dport, sport
                ip = p + t.ip_off
                l4 = p + t.l4_off
                ip_len = frame_len - t.ip_off
                truth[0 if outbound else 1] += 1
                truth[2 if outbound else 3] += ip_len
                if ipver == 4:
                    pack_into("!H", buf, ip + 2, ip_len)
                    buf[ip + 12:ip + 16] = src
                    buf[ip + 16:ip + 20] = dst
                    counts["ipv4"] += 1
                else:
                    pack_into("!H", buf, ip + 4, ip_len - 40)
                    buf[ip + 8:ip + 24] = src
                    buf[ip + 24:ip + 40] = dst
                    counts["ipv6"] += 1
                if kind <= K_RST:
                    k = 2 * f + side
                    seq = nxt[k]
                    ack = nxt[k ^ 1] if kind != K_SYN else 0
                    pack_into("!HHII", buf, l4, sport, dport, seq, ack)
                    nxt[k] = (seq + pay + (1 if kind in (K_SYN, K_SYNACK, K_FIN) else 0)) \
                        & 0xFFFFFFFF
                    counts["tcp"] += 1
                elif kind == K_UDP:
                    pack_into("!HHH", buf, l4, sport, dport, 8 + pay)
                    counts["udp"] += 1
                elif kind == K_ESP:
                    counts["esp"] += 1
                else:
                    # echo identifier (kept in the flow's first port field) and sequence
                    k = 2 * f
                    if side == 0:
                        nxt[k] += 1
                    pack_into("!HH", buf, l4 + 4, f_ports[f][0], nxt[k] & 0xFFFF)
                    counts["icmp"] += 1
                if f_vlan[f]:
                    counts["vlan"] += 1
            fh.write(memoryview(buf)[:pos])
    counts["templates"] = len(templates)
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
