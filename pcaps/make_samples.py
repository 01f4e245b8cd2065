"""Write the sample captures of this folder and the audit outcome expected for each.

Every sample ``NAME.pcap`` / ``NAME.pcapng`` gets ``NAME.expected.json`` beside
it: the policy to audit it with, the exit status, packet count, damage, decode
errors, verdict counts and every flow with its counters, server name and
verdict.  The expectations are worked out here from the packets as they are
built (IP lengths, who sent what, the DNS answers and ClientHellos sent), from
the registry country of each remote address (``iptocc``, asserted where the
address is chosen so that a change of that data is noticed when regenerating)
and from the documented policy semantics, never by running egressd.

Output is deterministic: fixed timestamps from 2026-03-01T08:00:00Z, fixed
addresses, ports, sequence numbers and payloads.  Run it again after changing
it and commit the result; ``tests/test_samples.py`` checks that a fresh run
gives byte-identical files.

    python pcaps/make_samples.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import iptocc
import yaml
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import PcapNgWriter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_POLICY = "examples/policy.yaml"

START_NS = 1_772_352_000 * 1_000_000_000  # 2026-03-01T08:00:00Z
MS = 1_000_000
SEC = 1_000_000_000

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

GATEWAY_MAC = "00:1b:21:3a:4f:01"

DEFAULT_INTERNAL = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                    "169.254.0.0/16", "fc00::/7", "fe80::/10")
PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}


def cc(ip: str, country: str | None) -> str:
    """``ip``, after checking that its registry country is ``country`` (None: no country)."""
    got = iptocc.country_code(ip)
    if got != country:
        raise SystemExit(f"iptocc says {ip} is {got!r}, the samples expect {country!r}: "
                         "pick another address and regenerate")
    return ip


def payload(n: int, seed: int) -> bytes:
    """``n`` deterministic pseudo-random bytes (a fixed congruential sequence per seed)."""
    out = bytearray(n)
    x = (seed * 2654435761 + 12345) & 0xFFFFFFFF
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = (x >> 16) & 0xFF
    return bytes(out)


def host_mac(ip: str) -> str:
    packed = ipaddress.ip_address(ip).packed
    return "3c:ec:ef:{:02x}:{:02x}:{:02x}".format(*packed[-3:])


# ---------------------------------------------------------------------------
# Link layers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """How IP packets are framed on one capture interface."""

    linktype: int
    vlans: tuple[tuple[int, int], ...] = ()
    """(TPID, VLAN id) tags, outermost first (Ethernet only)."""
    pad: bool = True
    """Pad Ethernet frames to the 60-byte minimum, as a mirror port sees them."""
    af6: int = 30
    """Address family number for IPv6 on NULL / LOOP (BSD AF_INET6 differs by OS)."""
    iface: str | None = None
    """pcapng interface name (None: the first interface)."""

    def frame(self, ip: bytes, src_mac: str, dst_mac: str, outbound: bool) -> bytes:
        v6 = ip[0] >> 4 == 6
        ethertype = 0x86DD if v6 else 0x0800
        if self.linktype == LINKTYPE_ETHERNET:
            types = [tpid for tpid, _ in self.vlans] + [ethertype]
            pkt: Packet = Ether(src=src_mac, dst=dst_mac, type=types[0])
            for (_, vid), inner in zip(self.vlans, types[1:], strict=True):
                # every tag is TCI + type, whatever its TPID (0x8100, 0x88a8, 0x9100)
                pkt = pkt / Dot1Q(vlan=vid, prio=0, type=inner)
            raw = bytes(pkt) + ip
            if self.pad and len(raw) < 60:
                raw += bytes(60 - len(raw))
            return raw
        if self.linktype == LINKTYPE_LINUX_SLL:
            mac = bytes.fromhex(src_mac.replace(":", "")) + b"\x00\x00"
            return bytes(CookedLinux(pkttype=4 if outbound else 0, lladdrtype=1, lladdrlen=6,
                                     src=mac, proto=ethertype)) + ip
        if self.linktype == LINKTYPE_LINUX_SLL2:
            mac = bytes.fromhex(src_mac.replace(":", "")) + b"\x00\x00"
            return bytes(CookedLinuxV2(proto=ethertype, ifindex=2, lladdrtype=1,
                                       pkttype=4 if outbound else 0, lladdrlen=6,
                                       src=mac)) + ip
        if self.linktype == LINKTYPE_RAW:
            return ip
        if self.linktype == LINKTYPE_NULL:  # address family in the file's byte order
            return struct.pack("<I", self.af6 if v6 else 2) + ip
        if self.linktype == LINKTYPE_LOOP:  # address family in network byte order
            return struct.pack(">I", self.af6 if v6 else 2) + ip
        raise ValueError(self.linktype)


ETH = Link(LINKTYPE_ETHERNET)


# ---------------------------------------------------------------------------
# Policy semantics (the documented contract, applied to the sample's policy)
# ---------------------------------------------------------------------------


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(str(text), strict=False)


def _contains(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in nets)


def _expiry_ns(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.astimezone(UTC).timestamp()) * SEC
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()) * SEC
    return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()) * SEC


def _ports(items: list[object]) -> list[tuple[int, int]]:
    out = []
    for item in items:
        if isinstance(item, int):
            out.append((item, item))
        else:
            low, _, high = str(item).partition("-")
            out.append((int(low), int(high or low)))
    return out


def _host(name: str) -> str:
    """A server name as reports give it: lower-case, no trailing dot."""
    return name.lower().rstrip(".")


def _name_matches(name: str, pattern: str) -> bool:
    """``pattern`` is a host name or ``*.domain`` (one or more labels before ``domain``)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


class PolicyModel:
    """Just enough of a policy to state what each sample flow must get."""

    def __init__(self, text: str) -> None:
        doc = yaml.safe_load(text)
        self.home = {c.upper() for c in doc["home_countries"]}
        self.internal = [_net(n) for n in (doc.get("internal_networks") or DEFAULT_INTERNAL)
                         if n != "auto"]
        self.zones = {name: [_net(n) for n in nets]
                      for name, nets in (doc.get("zones") or {}).items()}
        self.unknown_country = doc.get("unknown_country", "unknown")
        self.routes = doc.get("routes") or []

    def is_internal(self, ip: str) -> bool:
        return _contains(self.internal, ip)

    def zone_of(self, ip: str) -> str | None:
        for name, nets in self.zones.items():
            if _contains(nets, ip):
                return name
        return None

    def evaluate(self, proto: str, internal_ip: str, remote_ip: str, service_port: int,
                 first_ns: int, names: tuple[str, ...] = ()
                 ) -> tuple[str, str | None, str | None]:
        country = iptocc.country_code(remote_ip)
        if country in self.home:
            return "domestic", None, None
        failed: tuple[str, str | None, str | None] | None = None
        for route in self.routes:
            to = route["to"]
            patterns = [_host(str(n)) for n in to.get("names") or []]
            if to.get("countries") or to.get("networks") or to.get("asns"):
                dest = (country is not None and country in to.get("countries", [])) or \
                    _contains([_net(n) for n in to.get("networks", [])], remote_ip)
            else:
                dest = bool(patterns)  # a names-only route: its location is anywhere
            if not dest:
                continue
            problem = None
            sources = route.get("from")
            if sources:
                nets = [n for s in sources for n in (self.zones[s] if s in self.zones
                                                     else [_net(s)])]
                if not _contains(nets, internal_ip):
                    problem = "zone_not_allowed"
            if problem is None and patterns:
                if not names:
                    problem = "name_unknown"
                elif not any(_name_matches(n, p) for n in names for p in patterns):
                    problem = "name_not_allowed"
            protocols = route.get("protocols")
            if problem is None and protocols is not None and PROTO_NUMBERS.get(proto, proto) \
                    not in [PROTO_NUMBERS.get(str(p).lower(), p) for p in protocols]:
                problem = "protocol_not_allowed"
            ports = route.get("ports")
            if problem is None and ports is not None and not any(
                    lo <= service_port <= hi for lo, hi in _ports(ports)):
                problem = "port_not_allowed"
            expires = _expiry_ns(route.get("expires"))
            if problem is None and expires is not None and first_ns >= expires:
                problem = "route_expired"
            if problem is None:
                return "approved", route["name"], None
            if failed is None:
                failed = ("violation", route["name"], problem)
        if country is None:
            if self.unknown_country == "allow":
                return "approved", None, None
            return self.unknown_country, None, "no_country"
        return failed or ("violation", None, "no_route")


# ---------------------------------------------------------------------------
# Samples: packets plus what each flow must add up to
# ---------------------------------------------------------------------------


@dataclass
class Flow:
    proto: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    intent: str | None = None
    """The verdict the sample means to show (checked against the policy)."""
    packets: list[tuple[bool, int]] = field(default_factory=list)
    """(from initiator, IP bytes) per packet."""
    first_ns: int | None = None
    hello: tuple[str, str] | None = None
    """The server name of the ClientHello the initiator sent, and ``sni`` or ``quic``."""


@dataclass(frozen=True)
class DnsAnswer:
    """One address a DNS response gave a client, as passive DNS must remember it."""

    ts_ns: int
    client: str
    address: str
    chain: tuple[str, ...]
    """The question name, then each CNAME target followed to the address."""
    ttl: int
    """Seconds: the least TTL along the chain, at most a day."""

    def covers(self, t_ns: int) -> bool:
        return self.ts_ns <= t_ns <= self.ts_ns + max(self.ttl, 60) * SEC


Rr = tuple[str, str, int, str]
"""A DNS answer record: owner name, type (A, AAAA, CNAME), TTL, data."""


@dataclass
class Record:
    ts_ns: int
    seq: int
    linktype: int
    iface: str | None
    data: bytes
    cut: int | None = None


class Sample:
    def __init__(self, name: str, fmt: str, description: str, policy_path: str,
                 policy_text: str) -> None:
        self.name = name
        self.fmt = fmt
        self.description = description
        self.policy_path = policy_path
        self.policy = PolicyModel(policy_text)
        self.policy_text = policy_text
        self.flows: list[Flow] = []
        self.records: list[Record] = []
        self.decode_errors: Counter[str] = Counter()
        self.truncated = False
        self._ip_id = 0x1000
        self.dns_answers: list[DnsAnswer] = []

    # -- names --------------------------------------------------------------

    def remember_dns(self, ts_ns: int, client: str, qname: str, rrs: list[Rr]) -> None:
        """A DNS response sent to ``client`` at ``ts_ns``: note each address it gives."""
        name = _host(qname)
        chain, ttls = [name], []
        while True:
            for owner, rtype, ttl, rdata in rrs:
                if _host(owner) == name and rtype in ("A", "AAAA"):
                    self.dns_answers.append(DnsAnswer(
                        ts_ns, str(ipaddress.ip_address(client)),
                        str(ipaddress.ip_address(rdata)), tuple(chain),
                        min([*ttls, ttl, 86400])))
            cname = next(((rdata, ttl) for owner, rtype, ttl, rdata in rrs
                          if _host(owner) == name and rtype == "CNAME"), None)
            if cname is None or _host(cname[0]) in chain:
                return
            name = _host(cname[0])
            chain.append(name)
            ttls.append(cname[1])

    def dns_chain(self, f: Flow) -> tuple[str, ...]:
        """The DNS chain that names flow ``f``: its client's answer, else anyone's."""
        assert f.first_ns is not None
        valid = [a for a in self.dns_answers
                 if a.address == f.dst_ip and a.covers(f.first_ns)]
        for pool in ([a for a in valid if a.client == f.src_ip], valid):
            if pool:
                return max(pool, key=lambda a: a.ts_ns).chain
        return ()

    def names_of(self, f: Flow) -> tuple[str | None, str | None, tuple[str, ...]]:
        """(server_name, name_source, the names routes are matched with) of flow ``f``."""
        chain = self.dns_chain(f)
        if f.hello is not None:
            name, source = f.hello
            return name, source, chain if chain and chain[0] == name else (name,)
        if chain:
            return chain[0], "dns", chain
        return None, None, ()

    # -- building ---------------------------------------------------------

    def flow(self, proto: str, src: str, sport: int, dst: str, dport: int,
             intent: str | None = None) -> Flow:
        f = Flow(proto, str(ipaddress.ip_address(src)), sport,
                 str(ipaddress.ip_address(dst)), dport, intent)
        self.flows.append(f)
        return f

    def ip_id(self) -> int:
        self._ip_id += 1
        return self._ip_id

    def raw(self, ts_ns: int, link: Link, data: bytes) -> None:
        """A record that belongs to no flow (ARP and the like)."""
        self.records.append(Record(ts_ns, len(self.records), link.linktype, link.iface, data))

    def emit(self, f: Flow | None, from_init: bool, ts_ns: int, ip_pkt: Packet | bytes,
             link: Link = ETH) -> int:
        """Record one IP packet of flow ``f``; returns its IP-layer length."""
        ip = bytes(ip_pkt)
        if ip[0] >> 4 == 4:
            ip_len = struct.unpack_from("!H", ip, 2)[0]
        else:
            ip_len = 40 + struct.unpack_from("!H", ip, 4)[0]
        assert ip_len == len(ip), (self.name, ip_len, len(ip))
        if f is not None:
            src, dst = (f.src_ip, f.dst_ip) if from_init else (f.dst_ip, f.src_ip)
            f.packets.append((from_init, ip_len))
            if f.first_ns is None:
                f.first_ns = ts_ns
            outbound = self.policy.is_internal(src) and not self.policy.is_internal(dst)
            frame = link.frame(ip, host_mac(src) if self.policy.is_internal(src)
                               else GATEWAY_MAC,
                               host_mac(dst) if self.policy.is_internal(dst) else GATEWAY_MAC,
                               outbound)
        else:
            frame = link.frame(ip, GATEWAY_MAC, GATEWAY_MAC, False)
        self.records.append(Record(ts_ns, len(self.records), link.linktype, link.iface, frame))
        return ip_len

    # -- expectations -------------------------------------------------------

    def expected_flow(self, f: Flow) -> dict[str, Any]:
        pol = self.policy
        src_int, dst_int = pol.is_internal(f.src_ip), pol.is_internal(f.dst_ip)
        dst = ipaddress.ip_address(f.dst_ip)
        multicast = dst.is_multicast or f.dst_ip == "255.255.255.255"
        out = {"proto": f.proto, "src_ip": f.src_ip, "src_port": f.src_port,
               "dst_ip": f.dst_ip, "dst_port": f.dst_port}
        p_init = sum(1 for d, _ in f.packets if d)
        b_init = sum(n for d, n in f.packets if d)
        p_resp = len(f.packets) - p_init
        b_resp = sum(n for d, n in f.packets if not d)
        assert f.first_ns is not None
        server_name, name_source, names = self.names_of(f)
        if multicast or (src_int and dst_int):
            # Both ends ours (or a group address): the zone and initiator of such
            # a flow are left open by the contract, so they are not stated.
            if not multicast:
                out.update(remote_ip=None, country=None)
            out.update(packets_out=p_init, bytes_out=b_init, packets_in=p_resp,
                       bytes_in=b_resp, verdict="internal", route=None, reason=None)
        elif not src_int and not dst_int:
            raise ValueError("the samples have no transit flows")
        else:
            internal, remote = (f.src_ip, f.dst_ip) if src_int else (f.dst_ip, f.src_ip)
            country = iptocc.country_code(remote)
            verdict, route, reason = pol.evaluate(f.proto, internal, remote, f.dst_port,
                                                  f.first_ns, names)
            if src_int:
                po, bo, pi, bi = p_init, b_init, p_resp, b_resp
            else:
                po, bo, pi, bi = p_resp, b_resp, p_init, b_init
            out.update(initiator="internal" if src_int else "remote", remote_ip=remote,
                       country=country, zone=pol.zone_of(internal), packets_out=po,
                       bytes_out=bo, packets_in=pi, bytes_in=bi, verdict=verdict,
                       route=route, reason=reason)
        out.update(server_name=server_name, name_source=name_source)
        if f.intent is not None and f.intent != _intent_of(out):
            raise SystemExit(f"{self.name}: flow {f.src_ip}:{f.src_port} -> {f.dst_ip}:"
                             f"{f.dst_port} ({f.proto}) is meant to be {f.intent} but the "
                             f"policy {self.policy_path} makes it {_intent_of(out)}")
        return out

    def expected(self) -> dict[str, Any]:
        flows = [self.expected_flow(f) for f in self.flows]
        verdicts = Counter(f["verdict"] for f in flows)
        packets = sum(1 for r in self.records if r.cut is None)
        return {
            "description": self.description,
            "policy": self.policy_path,
            "geoip": "embedded",
            "exit_status": 1 if verdicts["violation"] else 0,
            "packets": packets,
            "truncated": self.truncated,
            "decode_errors": dict(sorted(self.decode_errors.items())),
            "verdicts": dict(sorted(verdicts.items())),
            "flows": flows,
        }

    # -- writing ------------------------------------------------------------

    def sorted_records(self) -> list[Record]:
        return sorted(self.records, key=lambda r: (r.ts_ns, r.seq))

    def write(self, out_dir: Path, *, endian: str = "<", nano: bool = False) -> list[Path]:
        path = out_dir / f"{self.name}.{self.fmt}"
        if self.fmt == "pcapng":
            write_pcapng(path, self.sorted_records())
        else:
            write_pcap(path, self.sorted_records(), endian=endian, nano=nano)
        written = [path]
        if self.policy_path != DEMO_POLICY:
            policy_file = out_dir / Path(self.policy_path).name
            policy_file.write_text(self.policy_text)
            written.append(policy_file)
        exp = out_dir / f"{self.name}.expected.json"
        exp.write_text(json.dumps(self.expected(), indent=2, ensure_ascii=False) + "\n")
        written.append(exp)
        return written


def _intent_of(flow: dict[str, Any]) -> str:
    """``verdict`` or ``verdict/reason`` or ``verdict/route``: what a flow is meant to show."""
    if flow["verdict"] == "violation":
        return f"violation/{flow['reason']}"
    if flow["verdict"] == "approved" and flow.get("route"):
        return f"approved/{flow['route']}"
    return str(flow["verdict"])


def write_pcap(path: Path, records: list[Record], *, endian: str = "<",
               nano: bool = False) -> None:
    linktypes = {r.linktype for r in records}
    assert len(linktypes) == 1, linktypes
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = bytearray(struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 262144,
                                linktypes.pop()))
    for r in records:
        sec, frac = divmod(r.ts_ns, SEC)
        if not nano:
            assert frac % 1000 == 0, "microsecond pcap needs whole microseconds"
            frac //= 1000
        head = struct.pack(endian + "IIII", sec, frac, len(r.data), len(r.data))
        data = head + r.data
        if r.cut is not None:
            data = data[:r.cut]
        out += data
    path.write_bytes(bytes(out))


def write_pcapng(path: Path, records: list[Record]) -> None:
    """pcapng through scapy's writer: one interface block per (link type, name)."""
    packets: list[Packet] = []
    for r in records:
        if r.linktype == LINKTYPE_ETHERNET:
            p: Packet = Ether(r.data)
        elif r.linktype == LINKTYPE_LINUX_SLL:
            p = CookedLinux(r.data)
        else:
            raise ValueError(r.linktype)
        assert bytes(p) == r.data
        p.time = r.ts_ns / SEC
        if r.iface is not None:
            p.sniffed_on = r.iface
        packets.append(p)
    writer = PcapNgWriter(str(path))
    # The first interface block (unnamed) is Ethernet; each named interface gets its own.
    writer.linktype = LINKTYPE_ETHERNET
    writer.write_header(None)
    for p in packets:
        writer.write_packet(p)
    writer.close()
    check_pcapng_times(path, [r.ts_ns for r in records])


def check_pcapng_times(path: Path, want_ns: list[int]) -> None:
    """The writer takes float seconds: make sure every microsecond came out exact."""
    data = path.read_bytes()
    pos, got = 0, []
    while pos < len(data):
        btype, blen = struct.unpack_from("<II", data, pos)
        if btype == 6:
            hi, lo = struct.unpack_from("<II", data, pos + 12)
            got.append(((hi << 32) | lo) * 1000)
        pos += blen
    assert got == want_ns, "pcapng timestamps came out rounded"


# ---------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------


def ip_layer(s: Sample, src: str, dst: str, **kw: Any) -> Packet:
    if ":" in src:
        return IPv6(src=src, dst=dst, hlim=64 if s.policy.is_internal(src) else 52,
                    **kw)
    return IP(src=src, dst=dst, id=s.ip_id(), flags="DF",
              ttl=64 if s.policy.is_internal(src) else 52, **kw)


class Tcp:
    """A TCP connection of one flow: handshake, data, teardown, with real sequence numbers."""

    def __init__(self, s: Sample, f: Flow, t_ns: int, link: Link = ETH, *,
                 rtt_ms: float = 20.0, mss: int = 1460,
                 wrap: Callable[[Packet, bool], Packet] | None = None) -> None:
        self.s, self.f, self.t, self.link = s, f, t_ns, link
        self.half = int(rtt_ms * MS / 2)
        self.mss = mss
        base = (f.src_port * 7919 + f.dst_port * 104729) & 0xFFFFFFFF
        self.seq = {True: base, False: (base * 31 + 0x5EED) & 0xFFFFFFFF}
        self.wrap = wrap

    def _send(self, from_init: bool, flags: str, data: bytes = b"", *,
              options: list[tuple[str, Any]] | None = None, gap_ns: int | None = None,
              consume: int = 0) -> None:
        f = self.f
        src, dst = (f.src_ip, f.dst_ip) if from_init else (f.dst_ip, f.src_ip)
        sport, dport = (f.src_port, f.dst_port) if from_init else (f.dst_port, f.src_port)
        ack = self.seq[not from_init] if "A" in flags else 0
        tcp = TCP(sport=sport, dport=dport, seq=self.seq[from_init], ack=ack, flags=flags,
                  window=64240 if "S" in flags else 502, options=options or [])
        l4 = tcp / Raw(data) if data else tcp
        pkt = ip_layer(self.s, src, dst) / l4
        if self.wrap is not None:
            pkt = self.wrap(pkt, from_init)
        self.s.emit(f, from_init, self.t, pkt, self.link)
        self.seq[from_init] = (self.seq[from_init] + len(data) + consume) & 0xFFFFFFFF
        self.t += self.half if gap_ns is None else gap_ns

    def handshake(self) -> Tcp:
        opts = [("MSS", self.mss), ("NOP", None), ("WScale", 7), ("SAckOK", b"")]
        self._send(True, "S", options=opts, consume=1)
        self._send(False, "SA", options=opts, consume=1)
        self._send(True, "A", gap_ns=MS)
        return self

    def data(self, from_init: bool, nbytes: int, seed: int = 0) -> Tcp:
        """``nbytes`` from one side in MSS-sized segments, ACKed every second segment."""
        return self.send(from_init, payload(nbytes, seed or self.f.src_port + nbytes))

    def send(self, from_init: bool, body: bytes) -> Tcp:
        """``body`` from one side in MSS-sized segments, ACKed every second segment."""
        segs = [body[i:i + self.mss] for i in range(0, len(body), self.mss)]
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            self._send(from_init, "PA" if last else "A", seg, gap_ns=MS // 2)
            if i % 2 == 1 or last:
                self.t += self.half
                self._send(not from_init, "A", gap_ns=MS)
        return self

    def client_hello(self, server_name: str, size: int = 0) -> Tcp:
        """A TLS ClientHello record naming ``server_name`` (padded to ``size`` bytes)."""
        self.f.hello = (_host(server_name), "sni")
        return self.send(True, tls_record(client_hello(server_name, size)))

    def request_response(self, request: int, response: int) -> Tcp:
        return self.data(True, request).data(False, response)

    def close(self, from_init: bool = True) -> Tcp:
        self._send(from_init, "FA", consume=1)
        self._send(not from_init, "FA", consume=1)
        self._send(from_init, "A")
        return self

    def reset(self, from_init: bool) -> Tcp:
        self._send(from_init, "RA")
        return self

    def wait(self, ns: int) -> Tcp:
        self.t += ns
        return self


def dns_query(qid: int, qname: str, qtype: str = "A") -> Packet:
    return DNS(id=qid, rd=1, qd=DNSQR(qname=qname, qtype=qtype))


def dns_answer(qid: int, qname: str, qtype: str, rdatas: list[Any]) -> Packet:
    return DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=qname, qtype=qtype),
               an=[DNSRR(rrname=qname, type=qtype, ttl=300, rdata=r) for r in rdatas])


def dns(s: Sample, f: Flow, t_ns: int, qname: str, answer: str, link: Link = ETH,
        qtype: str = "A") -> int:
    """One DNS query and its answer (UDP)."""
    return resolve(s, f, t_ns, qname, [(qname, qtype, 300, answer)], link, qtype)


def resolve(s: Sample, f: Flow, t_ns: int, qname: str, rrs: list[Rr], link: Link = ETH,
            qtype: str = "A") -> int:
    """One DNS query and its answer (UDP) with the records ``rrs``; returns the answer's time."""
    qid = (f.src_port * 31) & 0xFFFF
    q = ip_layer(s, f.src_ip, f.dst_ip) / UDP(sport=f.src_port, dport=f.dst_port) / \
        dns_query(qid, qname, qtype)
    s.emit(f, True, t_ns, q, link)
    r = ip_layer(s, f.dst_ip, f.src_ip) / UDP(sport=f.dst_port, dport=f.src_port) / DNS(
        id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=qname, qtype=qtype),
        an=[DNSRR(rrname=owner, type=rtype, ttl=ttl, rdata=rdata)
            for owner, rtype, ttl, rdata in rrs])
    s.emit(f, False, t_ns + 18 * MS, r, link)
    s.remember_dns(t_ns + 18 * MS, f.src_ip, qname, rrs)
    return t_ns + 18 * MS


# ---------------------------------------------------------------------------
# TLS ClientHello and QUIC Initial (RFC 8446, RFC 9000 / 9001)
# ---------------------------------------------------------------------------


def _u8(data: bytes) -> bytes:
    return struct.pack("!B", len(data)) + data


def _u16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!H", ext_type) + _u16(data)


def client_hello(server_name: str, size: int = 0, *, quic: bool = False) -> bytes:
    """A TLS 1.3 ClientHello handshake message (no record header) naming ``server_name``.

    Fixed random, session id and key share.  ``size``: pad (extension 21) so that
    the TLS record carrying the message is ``size`` bytes long.
    """
    host = server_name.encode("ascii")
    suites = b"".join(struct.pack("!H", c) for c in (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F))
    exts = [
        _ext(0, _u16(b"\x00" + _u16(host))),  # server_name: one host_name entry
        _ext(10, _u16(struct.pack("!HH", 0x001D, 0x0017))),  # supported_groups
        _ext(13, _u16(struct.pack("!HHH", 0x0403, 0x0804, 0x0401))),  # signature_algorithms
        _ext(16, _u16(_u8(b"h3" if quic else b"h2"))),  # ALPN
        _ext(43, _u8(struct.pack("!H", 0x0304) + (b"" if quic else struct.pack("!H", 0x0303)))),
        _ext(45, _u8(b"\x01")),  # psk_key_exchange_modes: psk_dhe_ke
        _ext(51, _u16(struct.pack("!H", 0x001D) + _u16(payload(32, 51)))),  # key_share
    ]
    if quic:  # quic_transport_parameters: initial_max_data, initial_source_connection_id
        exts.append(_ext(0x39, b"\x04\x04\x80\x10\x00\x00" + b"\x0f" + _u8(QUIC_SCID)))
    body = struct.pack("!H", 0x0303) + payload(32, 32) + _u8(payload(32, 33)) + \
        _u16(suites) + _u8(b"\x00")
    unpadded = 5 + 4 + len(body) + 2 + sum(len(e) for e in exts)
    if size:
        assert size >= unpadded + 4, (size, unpadded)
        exts.append(_ext(21, bytes(size - unpadded - 4)))
    body += _u16(b"".join(exts))
    return b"\x01" + struct.pack("!I", len(body))[1:] + body


def tls_record(handshake: bytes) -> bytes:
    """``handshake`` in one TLS handshake record (legacy record version 0x0301)."""
    return b"\x16\x03\x01" + _u16(handshake)


QUIC_V1_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
QUIC_DCID = bytes.fromhex("8394c8f03e515708")
QUIC_SCID = bytes.fromhex("c3a1e5f7092b4d6f")


def _hkdf_label(secret: bytes, label: str, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with SHA-256 and an empty context."""
    info = struct.pack("!H", length) + _u8(b"tls13 " + label.encode()) + _u8(b"")
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(secret)


def _varint(n: int) -> bytes:
    if n < 0x40:
        return struct.pack("!B", n)
    if n < 0x4000:
        return struct.pack("!H", 0x4000 | n)
    return struct.pack("!I", 0x80000000 | n)


def quic_initial(server_name: str, datagram: int = 1200) -> bytes:
    """A client's QUIC v1 Initial packet: a ClientHello in a CRYPTO frame, padded to
    ``datagram`` bytes, protected with the Initial keys of the fixed DCID (RFC 9001 5)."""
    extract = hmac.HMAC(QUIC_V1_SALT, hashes.SHA256())
    extract.update(QUIC_DCID)
    client = _hkdf_label(extract.finalize(), "client in", 32)
    key, iv, hp = (_hkdf_label(client, "quic key", 16), _hkdf_label(client, "quic iv", 12),
                   _hkdf_label(client, "quic hp", 16))
    pn, pn_len = 0, 1
    hello = client_hello(server_name, quic=True)
    frames = b"\x06" + _varint(0) + _varint(len(hello)) + hello  # CRYPTO at offset 0
    head = struct.pack("!BI", 0xC0 | (pn_len - 1), 1) + _u8(QUIC_DCID) + _u8(QUIC_SCID) + \
        _varint(0)  # Initial, version 1, no token
    head_len = len(head) + 2 + pn_len  # with a 2-byte Length field
    plain_len = datagram - head_len - 16
    assert len(frames) <= plain_len
    frames += bytes(plain_len - len(frames))  # PADDING frames
    head += struct.pack("!H", 0x4000 | (pn_len + plain_len + 16)) + pn.to_bytes(pn_len, "big")
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, frames, head)
    sample = sealed[4 - pn_len:4 - pn_len + 16]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    first = bytes([head[0] ^ (mask[0] & 0x0F)])
    pn_bytes = bytes(b ^ m for b, m in zip(head[-pn_len:], mask[1:1 + pn_len], strict=True))
    packet = first + head[1:-pn_len] + pn_bytes + sealed
    assert len(packet) == datagram
    return packet


def ntp_packet(mode: int, t_ns: int) -> bytes:
    """A 48-byte NTPv4 client (3) or server (4) message sent at ``t_ns``."""
    era = 2_208_988_800  # seconds from 1900 to 1970
    sec, frac = divmod(t_ns, SEC)
    stamp = struct.pack("!II", sec + era, frac * (1 << 32) // SEC)
    if mode == 3:
        return bytes([0x23]) + bytes(39) + stamp
    head = bytes([0x24, 1, 0, 0xE9]) + bytes(8) + b"GPS\x00"
    return head + stamp * 4


def udp_exchange(s: Sample, f: Flow, t_ns: int, sizes: list[tuple[bool, int]],
                 link: Link = ETH, gap_ns: int = 15 * MS) -> int:
    """UDP datagrams of the given payload sizes, (from initiator, size) each."""
    for i, (from_init, n) in enumerate(sizes):
        src, dst = (f.src_ip, f.dst_ip) if from_init else (f.dst_ip, f.src_ip)
        sport, dport = (f.src_port, f.dst_port) if from_init else (f.dst_port, f.src_port)
        pkt = ip_layer(s, src, dst) / UDP(sport=sport, dport=dport) / Raw(payload(n, i + sport))
        s.emit(f, from_init, t_ns, pkt, link)
        t_ns += gap_ns
    return t_ns


def ping(s: Sample, f: Flow, t_ns: int, count: int, link: Link = ETH, size: int = 56) -> int:
    """``count`` echo requests from the initiator, each answered."""
    ident = 0x4D00 + len(s.flows)
    v6 = ":" in f.src_ip
    for seq in range(1, count + 1):
        data = payload(size, seq)
        if v6:
            req: Packet = ICMPv6EchoRequest(id=ident, seq=seq, data=data)
            rep: Packet = ICMPv6EchoReply(id=ident, seq=seq, data=data)
        else:
            req = ICMP(type=8, code=0, id=ident, seq=seq) / Raw(data)
            rep = ICMP(type=0, code=0, id=ident, seq=seq) / Raw(data)
        s.emit(f, True, t_ns, ip_layer(s, f.src_ip, f.dst_ip) / req, link)
        s.emit(f, False, t_ns + 31 * MS, ip_layer(s, f.dst_ip, f.src_ip) / rep, link)
        t_ns += SEC
    return t_ns


def arp_exchange(s: Sample, t_ns: int, asker: str, target: str, link: Link = ETH) -> None:
    """An ARP request and reply: no IP, so they count as non_ip decode errors."""
    req = Ether(src=host_mac(asker), dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=host_mac(asker), psrc=asker, pdst=target)
    rep = Ether(src=GATEWAY_MAC, dst=host_mac(asker)) / ARP(
        op=2, hwsrc=GATEWAY_MAC, psrc=target, hwdst=host_mac(asker), pdst=asker)
    for i, pkt in enumerate((req, rep)):
        raw = bytes(pkt)
        s.raw(t_ns + i * MS // 4, link, raw + bytes(max(0, 60 - len(raw))))
    s.decode_errors["non_ip"] += 2


# ---------------------------------------------------------------------------
# Policies of the focused samples
# ---------------------------------------------------------------------------


def focused_policy(name: str) -> str:
    return f"""\
# Policy for the sample capture {name} (written by make_samples.py).
# Same format as examples/policy.yaml; see docs/configuration.md.
home_countries: [CN]

zones:
  office:
    - 10.20.0.0/16
    - "fd00:20::/32"
  lab:
    - 10.40.0.0/16

routes:
  # HTTPS from the office to Hong Kong.
  - name: hk-https
    approval: SAMPLE-HK-1
    from: [office]
    to:
      countries: [HK]
    protocols: [tcp]
    ports: [443]

  # An archive route to Japan that ended before the samples were captured.
  - name: jp-archive
    approval: SAMPLE-JP-1
    from: [office]
    to:
      countries: [JP]
    protocols: [tcp]
    ports: [443]
    expires: 2026-02-01
"""


def focused(name: str, fmt: str, description: str) -> Sample:
    return Sample(name, fmt, description, f"pcaps/{name}.policy.yaml", focused_policy(name))


# Addresses the focused samples use (registry country checked).
CN_WEB = cc("220.181.38.148", "CN")
CN_DNS = cc("114.114.114.114", "CN")
CN_V6 = cc("240e:e9:6002::1", "CN")
CN_V6_DNS = cc("2400:3200::1", "CN")
HK_WEB = cc("1.36.10.20", "HK")
HK_V6 = cc("2404:c800::5", "HK")
US_DNS = cc("8.8.8.8", "US")
US_V6_DNS = cc("2001:4860:4860::8888", "US")
JP_WEB = cc("133.242.0.10", "JP")
DE_WEB = cc("5.9.16.20", "DE")
GB_WEB = cc("81.2.69.142", "GB")


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


def demo() -> Sample:
    text = (ROOT / DEMO_POLICY).read_text()
    s = Sample(
        "demo", "pcapng",
        "The README demo: a minute and a half at the gateway of a company in China, captured "
        "on the LAN (Ethernet, the dev VLAN tagged) and on the data-centre uplink (Linux "
        "cooked capture). Domestic traffic, the approved Hong Kong backup and its misuses, "
        "flows to the US, Germany, Japan and Great Britain without a route, the CRM vendor, "
        "dev mirrors, an inbound connection answered by a customer-data server, a remote "
        "with no registry country, ICMP, IPv6, internal and multicast traffic and ARP.",
        DEMO_POLICY, text)
    lan = Link(LINKTYPE_ETHERNET)
    dev_vlan = Link(LINKTYPE_ETHERNET, vlans=((0x8100, 40),))
    dc = Link(LINKTYPE_LINUX_SLL, iface="dc-uplink")
    t = START_NS

    # Data centre (zone customer-data, 10.20.0.0/16 and fd00:20::/32).
    backup, db = "10.20.1.10", "10.20.1.12"
    f = s.flow("udp", backup, 41522, CN_DNS, 53, "domestic")
    dns(s, f, t + 120 * MS, "backup.hk.example.com", cc("1.36.200.5", "HK"), dc)
    f = s.flow("tcp", backup, 50410, cc("1.36.200.5", "HK"), 443, "approved/hk-backup")
    Tcp(s, f, t + 200 * MS, dc, rtt_ms=9).handshake().data(True, 180).data(False, 600) \
        .data(True, 2900).data(False, 60).close()
    f = s.flow("tcp", "fd00:20::10", 50412, cc("2403:e800::10", "HK"), 443,
               "approved/hk-backup")
    Tcp(s, f, t + 2 * SEC, dc, rtt_ms=9, mss=1440).handshake().request_response(180, 300) \
        .data(True, 1000).close()
    f = s.flow("tcp", backup, 50422, cc("203.198.7.66", "HK"), 22,
               "violation/port_not_allowed")
    Tcp(s, f, t + 9 * SEC, dc, rtt_ms=11).handshake().request_response(41, 40) \
        .data(True, 300).close()
    f = s.flow("udp", db, 53211, cc("1.36.10.20", "HK"), 443, "violation/protocol_not_allowed")
    udp_exchange(s, f, t + 15 * SEC, [(True, 1250), (False, 1100), (True, 45)], dc)
    f = s.flow("tcp", db, 50433, cc("52.84.0.10", "US"), 443, "violation/no_route")
    Tcp(s, f, t + 21 * SEC, dc, rtt_ms=180).handshake().request_response(180, 450) \
        .data(True, 400).close()
    f = s.flow("tcp", backup, 50440, CN_WEB, 443, "domestic")
    Tcp(s, f, t + 27 * SEC, dc, rtt_ms=28).handshake().request_response(180, 650).close()
    f = s.flow("tcp", db, 50451, cc("102.230.9.9", None), 443, "unknown")
    Tcp(s, f, t + 33 * SEC, dc, rtt_ms=210).handshake().request_response(180, 200).close()
    # A client abroad connects to the customer portal; the server's answer leaves.
    f = s.flow("tcp", cc("45.33.32.156", "US"), 61002, "10.20.5.20", 443,
               "violation/no_route")
    Tcp(s, f, t + 40 * SEC, dc, rtt_ms=190).handshake().request_response(180, 1300).close(
        from_init=False)

    # Office (zone corp, 10.30.0.0/16 and fd00:30::/32) on the LAN.
    pc1, pc2, pc3 = "10.30.2.15", "10.30.2.16", "10.30.2.17"
    arp_exchange(s, t, pc1, "10.30.0.1", lan)
    f = s.flow("udp", pc1, 5353, "224.0.0.251", 5353, "internal")
    for i in range(2):
        mdns = IP(src=pc1, dst="224.0.0.251", id=s.ip_id(), ttl=255) / UDP(
            sport=5353, dport=5353) / DNS(id=0, qd=DNSQR(qname="_ipp._tcp.local", qtype="PTR"))
        s.emit(f, True, t + 80 * MS + i * SEC, mdns, lan)
    f = s.flow("udp", pc1, 49152, cc("223.5.5.5", "CN"), 53, "domestic")
    dns(s, f, t + 3 * SEC, "www.baidu.com", cc("39.156.66.10", "CN"), lan)
    f = s.flow("tcp", pc1, 51001, cc("39.156.66.10", "CN"), 443, "domestic")
    Tcp(s, f, t + 3 * SEC + 40 * MS, lan, rtt_ms=24).handshake().request_response(180, 600) \
        .close()
    f = s.flow("icmp", pc1, 8, CN_DNS, 0, "domestic")
    ping(s, f, t + 5 * SEC, 3, lan)
    f = s.flow("udp", pc2, 49200, US_DNS, 53, "violation/no_route")
    dns(s, f, t + 6 * SEC, "github.com", cc("140.82.112.3", "US"), lan)
    f = s.flow("tcp", pc2, 51010, cc("140.82.112.3", "US"), 443, "violation/no_route")
    Tcp(s, f, t + 6 * SEC + 30 * MS, lan, rtt_ms=170).handshake().request_response(180, 400) \
        .data(True, 700).close()
    f = s.flow("icmp", pc2, 8, US_DNS, 0, "violation/no_route")
    ping(s, f, t + 12 * SEC, 2, lan)
    f = s.flow("tcp", pc3, 51020, DE_WEB, 443, "violation/no_route")
    Tcp(s, f, t + 14 * SEC, lan, rtt_ms=230).handshake().request_response(180, 350).close()
    f = s.flow("tcp", pc3, 51030, GB_WEB, 443, "violation/no_route")
    Tcp(s, f, t + 18 * SEC, lan, rtt_ms=220).handshake().request_response(180, 250).close()
    f = s.flow("tcp", pc1, 51040, cc("1.36.10.20", "HK"), 443, "violation/zone_not_allowed")
    Tcp(s, f, t + 23 * SEC, lan, rtt_ms=12).handshake().request_response(180, 450).close()
    f = s.flow("tcp", pc3, 51050, cc("133.11.0.10", "JP"), 8080,
               "violation/zone_not_allowed")
    Tcp(s, f, t + 26 * SEC, lan, rtt_ms=60).handshake().reset(False)
    f = s.flow("tcp", pc1, 51060, cc("203.0.113.10", None), 443, "approved/crm-vendor")
    Tcp(s, f, t + 30 * SEC, lan, rtt_ms=40).handshake().request_response(180, 300) \
        .data(True, 800).data(False, 90).close()
    f = s.flow("udp", pc3, 123, cc("17.253.84.125", "US"), 123, "violation/no_route")
    for from_init, mode, ts in ((True, 3, t + 35 * SEC), (False, 4, t + 35 * SEC + 90 * MS)):
        src, dst = (pc3, f.dst_ip) if from_init else (f.dst_ip, pc3)
        s.emit(f, from_init, ts, ip_layer(s, src, dst) / UDP(sport=123, dport=123) / Raw(
            ntp_packet(mode, ts)), lan)
    f = s.flow("tcp", pc1, 51070, backup, 445, "internal")
    Tcp(s, f, t + 37 * SEC, lan, rtt_ms=1).handshake().request_response(180, 650).close()
    f = s.flow("tcp", "fd00:30::15", 51080, CN_V6, 443, "domestic")
    Tcp(s, f, t + 44 * SEC, lan, rtt_ms=26, mss=1440).handshake() \
        .request_response(180, 450).close()
    f = s.flow("tcp", "fd00:30::16", 51090, cc("2a00:1450:4001:80b::200e", "IE"), 443,
               "violation/no_route")
    Tcp(s, f, t + 47 * SEC, lan, rtt_ms=210, mss=1440).handshake() \
        .request_response(180, 350).close()
    f = s.flow("icmpv6", "fd00:30::16", 128, US_V6_DNS, 0, "violation/no_route")
    ping(s, f, t + 50 * SEC, 2, lan)

    # Build servers (zone dev, 10.40.0.0/16) on the tagged dev VLAN.
    b1, b2 = "10.40.3.5", "10.40.3.6"
    f = s.flow("tcp", b1, 52001, cc("133.242.0.10", "JP"), 443, "approved/dev-mirrors")
    Tcp(s, f, t + 60 * SEC, dev_vlan, rtt_ms=55).handshake().request_response(180, 1350) \
        .close()
    f = s.flow("tcp", b1, 52010, cc("8.210.16.10", "SG"), 8080, "approved/dev-mirrors")
    Tcp(s, f, t + 66 * SEC, dev_vlan, rtt_ms=70).handshake().request_response(180, 700) \
        .close()
    f = s.flow("tcp", b2, 52020, cc("160.16.0.5", "JP"), 22, "violation/port_not_allowed")
    Tcp(s, f, t + 72 * SEC, dev_vlan, rtt_ms=58).handshake().request_response(41, 40) \
        .data(True, 150).close()
    f = s.flow("tcp", b2, 52030, cc("151.101.0.223", "US"), 443, "violation/no_route")
    Tcp(s, f, t + 80 * SEC, dev_vlan, rtt_ms=160).handshake().request_response(180, 500) \
        .close()
    f = s.flow("tcp", b1, 52040, cc("101.226.4.6", "CN"), 443, "domestic")
    Tcp(s, f, t + 90 * SEC, dev_vlan, rtt_ms=30).handshake().request_response(180, 700) \
        .close()
    return s


# ---------------------------------------------------------------------------
# Focused samples
# ---------------------------------------------------------------------------


def standard_flows(s: Sample, link: Link, t: int) -> None:
    """The flows every link-type sample carries: IPv4 TCP, IPv4 UDP, IPv6 TCP, ICMP."""
    f = s.flow("tcp", "10.20.1.30", 40001, CN_WEB, 443, "domestic")
    Tcp(s, f, t, link).handshake().request_response(300, 1200).close()
    f = s.flow("udp", "10.20.1.30", 40002, US_DNS, 53, "violation/no_route")
    dns(s, f, t + 2 * SEC, "example.com", cc("93.184.215.14", "US"), link)
    f = s.flow("tcp", "fd00:20::30", 40003, HK_V6, 443, "approved/hk-https")
    Tcp(s, f, t + 3 * SEC, link, mss=1440).handshake().request_response(300, 1500).close()
    f = s.flow("icmp", "10.20.1.30", 8, CN_DNS, 0, "domestic")
    ping(s, f, t + 5 * SEC, 2, link)


def linktype_samples() -> list[Sample]:
    out = []
    cases = [
        ("linktypes-sll", Link(LINKTYPE_LINUX_SLL), "Linux cooked capture v1 (LINKTYPE 113)"),
        ("linktypes-sll2", Link(LINKTYPE_LINUX_SLL2), "Linux cooked capture v2 (LINKTYPE 276)"),
        ("linktypes-raw", Link(LINKTYPE_RAW), "raw IP, IPv4 and IPv6 (LINKTYPE 101)"),
        ("linktypes-null", Link(LINKTYPE_NULL, af6=30),
         "BSD loopback NULL (LINKTYPE 0): 4-byte address family in the file's byte order, "
         "2 for IPv4 and 30 (macOS AF_INET6) for IPv6"),
        ("linktypes-loop", Link(LINKTYPE_LOOP, af6=24),
         "OpenBSD loopback LOOP (LINKTYPE 108): 4-byte address family in network byte "
         "order, 2 for IPv4 and 24 (OpenBSD AF_INET6) for IPv6"),
    ]
    for name, link, what in cases:
        s = focused(name, "pcap", f"One capture per link type: {what}. IPv4 TCP to CN, DNS "
                    "to the US, IPv6 HTTPS to HK (approved) and ICMP echo to CN.")
        standard_flows(s, link, START_NS)
        out.append(s)
    return out


def vlan_qinq() -> Sample:
    s = focused("vlan-qinq", "pcap",
                "802.1Q and stacked VLAN tags on Ethernet: single 802.1Q, 802.1ad (0x88a8) "
                "over 802.1Q, the old 0x9100 QinQ over 802.1Q, two 802.1Q tags, and an "
                "untagged flow. The tags do not change the flows.")
    t = START_NS
    cases = [
        (Link(LINKTYPE_ETHERNET, vlans=((0x8100, 20),)), "10.20.7.1"),
        (Link(LINKTYPE_ETHERNET, vlans=((0x88A8, 100), (0x8100, 20))), "10.20.7.2"),
        (Link(LINKTYPE_ETHERNET, vlans=((0x9100, 200), (0x8100, 30))), "10.20.7.3"),
        (Link(LINKTYPE_ETHERNET, vlans=((0x8100, 300), (0x8100, 40))), "10.20.7.4"),
        (ETH, "10.20.7.5"),
    ]
    for i, (link, host) in enumerate(cases):
        t0 = t + i * 4 * SEC
        f = s.flow("tcp", host, 42000 + i, CN_WEB, 443, "domestic")
        Tcp(s, f, t0, link).handshake().request_response(200, 1000 + 100 * i).close()
        f = s.flow("udp", host, 43000 + i, US_DNS, 53, "violation/no_route")
        dns(s, f, t0 + SEC, f"host{i}.example.org", cc("93.184.215.14", "US"), link)
    link = Link(LINKTYPE_ETHERNET, vlans=((0x88A8, 100), (0x8100, 20)))
    f = s.flow("tcp", "fd00:20::7", 44000, HK_V6, 443, "approved/hk-https")
    Tcp(s, f, t + 30 * SEC, link, mss=1440).handshake().request_response(300, 1400).close()
    f = s.flow("icmp", "10.20.7.6", 8, JP_WEB, 0, "violation/protocol_not_allowed")
    ping(s, f, t + 33 * SEC, 2, Link(LINKTYPE_ETHERNET, vlans=((0x9100, 200), (0x8100, 30))))
    # the lab (VLAN 40) is not a zone the Hong Kong route allows
    f = s.flow("tcp", "10.40.7.1", 44001, HK_WEB, 443, "violation/zone_not_allowed")
    Tcp(s, f, t + 36 * SEC, Link(LINKTYPE_ETHERNET, vlans=((0x8100, 40),))).handshake() \
        .request_response(200, 600).close()
    return s


def ipv6_ext() -> Sample:
    s = focused("ipv6-ext", "pcap",
                "IPv6 extension-header chains before TCP and UDP: hop-by-hop, routing "
                "(type 0 and segment routing, no segments left), destination options, an "
                "atomic fragment header, AH, a chain of all of them, and a UDP datagram in "
                "two real fragments (the second fragment joins the first one's flow).")
    t = START_NS
    me = "fd00:20::40"

    def chain(*hdrs: Callable[[], Packet]) -> Callable[[Packet, bool], Packet]:
        def wrap(pkt: Packet, _from_init: bool) -> Packet:
            ip = pkt.copy()
            l4 = ip.payload.copy()
            ip.remove_payload()
            out = ip
            for h in hdrs:
                out = out / h()
            return out / l4
        return wrap

    def ah() -> Packet:
        # 12 fixed bytes + 12 bytes of ICV: payloadlen counts 4-byte words minus 2
        return AH(nh=0, payloadlen=4, spi=0x00000101, seq=1, icv=payload(12, 7))

    def fix_ah(pkt: Packet) -> Packet:
        """Set AH's next header to what follows it (scapy leaves it 0)."""
        layer = pkt.getlayer(AH)
        if layer is not None:
            nxt = layer.payload
            layer.nh = {"TCP": 6, "UDP": 17}.get(type(nxt).__name__, 60)
        return pkt

    def with_fix(w: Callable[[Packet, bool], Packet]) -> Callable[[Packet, bool], Packet]:
        return lambda p, d: fix_ah(w(p, d))

    hbh = IPv6ExtHdrHopByHop
    dst_opt = IPv6ExtHdrDestOpt

    def rh0() -> Packet:
        return IPv6ExtHdrRouting(type=0, segleft=0, addresses=[])

    def srh(final: str) -> Packet:
        return IPv6ExtHdrSegmentRouting(segleft=0, lastentry=0, addresses=[final])

    def atomic() -> Packet:
        return IPv6ExtHdrFragment(offset=0, m=0, id=0x51)

    f = s.flow("tcp", me, 45001, CN_V6, 443, "domestic")
    Tcp(s, f, t, mss=1440, wrap=chain(hbh)).handshake().request_response(300, 900).close()
    f = s.flow("tcp", me, 45002, HK_V6, 443, "approved/hk-https")
    Tcp(s, f, t + 2 * SEC, mss=1440, wrap=chain(rh0)).handshake() \
        .request_response(300, 1100).close()
    f = s.flow("udp", me, 45003, US_V6_DNS, 53, "violation/no_route")
    q = IPv6(src=me, dst=US_V6_DNS, hlim=64) / dst_opt() / UDP(sport=45003, dport=53) / \
        dns_query(0x4503, "example.com", "AAAA")
    s.emit(f, True, t + 4 * SEC, q)
    r = IPv6(src=US_V6_DNS, dst=me, hlim=52) / UDP(sport=53, dport=45003) / \
        dns_answer(0x4503, "example.com", "AAAA", ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
    s.emit(f, False, t + 4 * SEC + 20 * MS, r)
    s.remember_dns(t + 4 * SEC + 20 * MS, me, "example.com",
                   [("example.com", "AAAA", 300, "2606:2800:21f:cb07:6820:80da:af6b:8b2c")])
    f = s.flow("tcp", me, 45004, cc("2400:8500::10", "JP"), 443, "violation/route_expired")
    Tcp(s, f, t + 6 * SEC, mss=1440, wrap=chain(atomic)).handshake() \
        .request_response(300, 700).close()
    f = s.flow("tcp", me, 45005, cc("2a01:4f8::10", "DE"), 443, "violation/no_route")
    Tcp(s, f, t + 8 * SEC, mss=1440, wrap=with_fix(chain(ah))).handshake() \
        .request_response(300, 800).close()
    f = s.flow("udp", me, 45006, CN_V6_DNS, 53, "domestic")
    msgs = (dns_query(0x4506, "www.taobao.com", "AAAA"),
            dns_answer(0x4506, "www.taobao.com", "AAAA", [CN_V6]))
    for from_init, msg, ts in ((True, msgs[0], t + 10 * SEC),
                               (False, msgs[1], t + 10 * SEC + 9 * MS)):
        src, dst = (me, CN_V6_DNS) if from_init else (CN_V6_DNS, me)
        sport, dport = (45006, 53) if from_init else (53, 45006)
        pkt = IPv6(src=src, dst=dst, hlim=64 if from_init else 52) / hbh() / dst_opt() / \
            srh(dst) / atomic() / ah() / dst_opt() / UDP(sport=sport, dport=dport) / msg
        s.emit(f, from_init, ts, fix_ah(pkt))
    s.remember_dns(t + 10 * SEC + 9 * MS, me, "www.taobao.com",
                   [("www.taobao.com", "AAAA", 300, CN_V6)])
    # A UDP datagram too big for one packet: two fragments, the second without ports.
    f = s.flow("udp", me, 45007, cc("2400:da00::6666", "CN"), 4500, "domestic")
    whole = IPv6(src=me, dst=f.dst_ip, hlim=64) / UDP(sport=45007, dport=4500) / Raw(
        payload(2000, 4))
    body = bytes(whole)[40:]
    first, rest = body[:1232], body[1232:]
    frag1 = IPv6(src=me, dst=f.dst_ip, hlim=64) / IPv6ExtHdrFragment(
        nh=17, offset=0, m=1, id=0xE6001) / Raw(first)
    frag2 = IPv6(src=me, dst=f.dst_ip, hlim=64) / IPv6ExtHdrFragment(
        nh=17, offset=len(first) // 8, m=0, id=0xE6001) / Raw(rest)
    s.emit(f, True, t + 12 * SEC, frag1)
    s.emit(f, True, t + 12 * SEC + 100_000, frag2)
    reply = IPv6(src=f.dst_ip, dst=me, hlim=52) / UDP(sport=4500, dport=45007) / Raw(
        payload(80, 5))
    s.emit(f, False, t + 12 * SEC + 40 * MS, reply)
    return s


def ipv4_fragments(s: Sample, f: Flow, from_init: bool, t_ns: int, l4: Packet,
                   frag_size: int, ip_id: int) -> int:
    """Send ``l4`` (with its payload) in IPv4 fragments of ``frag_size`` data bytes."""
    src, dst = (f.src_ip, f.dst_ip) if from_init else (f.dst_ip, f.src_ip)
    whole = IP(src=src, dst=dst, id=ip_id, ttl=64 if from_init else 52) / l4
    raw = bytes(whole)
    proto, body = raw[9], raw[20:]
    assert frag_size % 8 == 0
    for off in range(0, len(body), frag_size):
        chunk = body[off:off + frag_size]
        more = off + frag_size < len(body)
        frag = IP(src=src, dst=dst, id=ip_id, ttl=64 if from_init else 52, proto=proto,
                  flags="MF" if more else 0, frag=off // 8) / Raw(chunk)
        s.emit(f, from_init, t_ns, frag)
        t_ns += 50_000
    return t_ns


def fragments() -> Sample:
    s = focused("fragments", "pcap",
                "IPv4 fragments: a 3000-byte ping to CN and its fragmented reply, a DNS answer "
                "from the US that arrives in two fragments, interleaved with each other; later "
                "fragments carry no ports and count in the first fragment's flow. Plus one "
                "orphan fragment (a non-first fragment whose first fragment never came).")
    t = START_NS
    me = "10.20.1.50"
    ping_flow = s.flow("icmp", me, 8, CN_DNS, 0, "domestic")
    data = payload(3000, 11)
    ipv4_fragments(s, ping_flow, True, t, ICMP(type=8, id=0x77, seq=1) / Raw(data), 1480,
                   0x3001)
    dns_flow = s.flow("udp", me, 46001, US_DNS, 53, "violation/no_route")
    q = IP(src=me, dst=US_DNS, id=0x3002, ttl=64) / UDP(sport=46001, dport=53) / DNS(
        id=0x4242, rd=1, qd=DNSQR(qname="example.com", qtype="TXT"))
    s.emit(dns_flow, True, t + 10 * MS, q)
    # the two replies overlap in time: their fragments interleave
    rep = ICMP(type=0, id=0x77, seq=1) / Raw(data)
    txt = [payload(115, 20 + i).hex() for i in range(10)]  # 230 characters each
    big = UDP(sport=53, dport=46001) / dns_answer(0x4242, "example.com", "TXT", [txt])
    recs_before = len(s.records)
    ipv4_fragments(s, ping_flow, False, t + 40 * MS, rep, 1480, 0x9A01)
    ipv4_fragments(s, dns_flow, False, t + 40 * MS + 25_000, big, 1480, 0x9A02)
    assert len(s.records) - recs_before == 5
    # A lone non-first fragment: nothing to attach it to.
    orphan = IP(src=cc("93.184.215.14", "US"), dst=me, id=0x9A77, ttl=52, proto=17,
                frag=185) / Raw(payload(200, 13))
    s.emit(None, False, t + 2 * SEC, orphan)
    s.decode_errors["orphan_fragment"] += 1
    # and a normal TCP connection around them
    f = s.flow("tcp", me, 46002, HK_WEB, 443, "approved/hk-https")
    Tcp(s, f, t + 3 * SEC).handshake().request_response(300, 2000).close()
    return s


def tcp_reuse() -> Sample:
    s = focused("tcp-reuse", "pcap",
                "One 5-tuple used twice: a connection closed with FIN from both sides, whose "
                "last FIN and ACK are retransmitted within the 5 s grace (still the first "
                "flow), then a new SYN 30 s later (a second flow). Another 5-tuple: a "
                "connection reset, then reused 10 s later.")
    me = "10.20.1.60"
    t = START_NS
    first = s.flow("tcp", me, 47001, CN_WEB, 443, "domestic")
    c = Tcp(s, first, t).handshake().request_response(300, 1800).close()
    # the server did not see our last ACK: it sends its FIN again, we ACK again
    c.seq[False] = (c.seq[False] - 1) & 0xFFFFFFFF
    c.wait(2 * SEC)._send(False, "FA", consume=1)
    c._send(True, "A")
    second = s.flow("tcp", me, 47001, CN_WEB, 443, "domestic")
    c2 = Tcp(s, second, c.t + 30 * SEC)
    c2.seq = {True: 0x10203040, False: 0x50607080}
    c2.handshake().request_response(300, 900).close()

    third = s.flow("tcp", me, 47002, US_DNS, 443, "violation/no_route")
    c3 = Tcp(s, third, t + 5 * SEC).handshake().request_response(300, 600).reset(True)
    fourth = s.flow("tcp", me, 47002, US_DNS, 443, "violation/no_route")
    c4 = Tcp(s, fourth, c3.t + 10 * SEC)
    c4.seq = {True: 0x0A0B0C0D, False: 0x01020304}
    c4.handshake().request_response(300, 700).close()
    return s


def nanosecond_be() -> Sample:
    s = focused("nanosecond-be", "pcap",
                "A big-endian pcap with nanosecond timestamps (magic a1b23c4d written "
                "big-endian), Ethernet: HTTPS to CN, HK and JP (a route that expired before "
                "the capture), DNS to the US, packets a few nanoseconds apart.")
    t = START_NS + 123_456_789
    me = "10.20.1.70"
    f = s.flow("tcp", me, 48001, CN_WEB, 443, "domestic")
    Tcp(s, f, t, rtt_ms=0.000011).handshake().request_response(300, 1500).close()
    f = s.flow("tcp", me, 48002, HK_WEB, 443, "approved/hk-https")
    Tcp(s, f, t + SEC + 7, rtt_ms=3.000001).handshake().request_response(300, 900).close()
    f = s.flow("tcp", me, 48003, JP_WEB, 443, "violation/route_expired")
    Tcp(s, f, t + 2 * SEC + 3, rtt_ms=48.000003).handshake().request_response(300, 600).close()
    f = s.flow("udp", me, 48004, US_DNS, 53, "violation/no_route")
    dns(s, f, t + 3 * SEC + 1, "example.net", cc("93.184.215.14", "US"))
    return s


def truncated() -> Sample:
    s = focused("truncated", "pcap",
                "A capture cut short in the middle of its last record (the record header "
                "promises more bytes than the file has): the complete records before it "
                "count, the cut one does not, and the capture is reported truncated.")
    me = "10.20.1.80"
    f = s.flow("tcp", me, 49001, CN_WEB, 443, "domestic")
    Tcp(s, f, START_NS).handshake().request_response(300, 1400).close()
    f = s.flow("udp", me, 49002, CN_DNS, 53, "domestic")
    dns(s, f, START_NS + SEC, "www.example.cn", CN_WEB)
    # one more packet of a new flow, of which only part of the record is in the file
    cut_flow = Flow("tcp", me, 49003, HK_WEB, 443)
    s.emit(cut_flow, True, START_NS + 2 * SEC,
           ip_layer(s, me, HK_WEB) / TCP(sport=49003, dport=443, flags="S", seq=1,
                                         window=64240, options=[("MSS", 1460)]))
    last = max(s.records, key=lambda r: (r.ts_ns, r.seq))
    last.cut = 16 + 30  # record header and 30 of its 58 bytes
    s.truncated = True
    return s


NAMES_POLICY = """\
# Policy for the sample capture names (written by make_samples.py).
# Same format as examples/policy.yaml; see docs/configuration.md.
home_countries: [CN]

zones:
  customer-data:
    - 10.20.0.0/16

routes:
  # The backup vendor in Hong Kong, by name: its own host and its file servers.
  - name: vendor-backup
    approval: SAMPLE-NAMES-1
    from: [customer-data]
    to:
      countries: [HK]
      names: [backup.vendor.example, "*.files.vendor.example"]
    protocols: [tcp, udp]
    ports: [443]

  # Static content from a CDN, wherever it is served from (names only).
  - name: cdn-static
    approval: SAMPLE-NAMES-2
    to:
      names: [static.cdn.example]
"""


def plain_request(seed: int) -> bytes:
    """A request that is not TLS: nothing in it names the server."""
    return b"PUT /chunks/0001 HTTP/1.1\r\nContent-Length: 256\r\n\r\n" + payload(256, seed)


def names_sample() -> Sample:
    s = Sample(
        "names", "pcap",
        "Server names (Ethernet): DNS answers with CNAME chains and TTLs, TLS ClientHellos "
        "(one split over two TCP segments) and a QUIC v1 Initial, judged by a route that "
        "lists names with its country and by a names-only route. Names from DNS (per "
        "client, then any client; the latest valid answer), SNI and QUIC; a wildcard; no "
        "name; an answer after the flow started; expired answers (TTL, 60 s floor, least "
        "TTL of a chain); domain fronting (the SNI counts, not the DNS name).",
        "pcaps/names.policy.yaml", NAMES_POLICY)
    t = START_NS
    resolver = "10.20.0.53"
    hk = [cc(f"1.36.60.{i}", "HK") for i in range(1, 14)]
    backup = [("backup.vendor.example", "A", 300, "")]
    api_chain = [("api.backup-vendor.example", "CNAME", 300, "backup.vendor.example"),
                 ("backup.vendor.example", "A", 300, "")]

    def ask(client: str, sport: int, t_ns: int, qname: str, rrs: list[Rr], addr: str) -> int:
        f = s.flow("udp", client, sport, CN_DNS, 53, "domestic")
        return resolve(s, f, t_ns, qname, [(o, ty, ttl, r or addr) for o, ty, ttl, r in rrs])

    def plain(client: str, sport: int, remote: str, t_ns: int, intent: str) -> None:
        f = s.flow("tcp", client, sport, remote, 443, intent)
        Tcp(s, f, t_ns, rtt_ms=12).handshake().send(True, plain_request(sport)) \
            .data(False, 400).close()

    def tls(client: str, sport: int, remote: str, t_ns: int, sni: str, intent: str,
            size: int = 517) -> None:
        f = s.flow("tcp", client, sport, remote, 443, intent)
        Tcp(s, f, t_ns, rtt_ms=12).handshake().client_hello(sni, size) \
            .data(False, 1300).data(True, 120).close()

    # a. The client's DNS answer names the flow; the chain's CNAME target is approved.
    #    A later answer for the same address to another client does not count: the
    #    client's own answer comes first.
    a = "10.20.1.1"
    ask(a, 50001, t, "api.backup-vendor.example", api_chain, hk[0])
    ask(resolver, 50100, t + 300 * MS, "mirror.files.vendor.example",
        [("mirror.files.vendor.example", "A", 300, "")], hk[0])
    plain(a, 41001, hk[0], t + SEC, "approved/vendor-backup")
    # b. A ClientHello of 1800 bytes in two TCP segments.
    tls("10.20.1.2", 41002, hk[1], t + 5 * SEC, "backup.vendor.example",
        "approved/vendor-backup", size=1800)
    # c. The wildcard covers names below files.vendor.example, not that name itself.
    tls("10.20.1.3", 41003, hk[2], t + 8 * SEC, "eu.files.vendor.example",
        "approved/vendor-backup")
    tls("10.20.1.3", 41004, hk[3], t + 10 * SEC, "files.vendor.example",
        "violation/name_not_allowed")
    # d. No DNS answer, no ClientHello: no name.
    plain("10.20.1.4", 41005, hk[4], t + 12 * SEC, "violation/name_unknown")
    # e. QUIC v1 Initial.
    f = s.flow("udp", "10.20.1.5", 41006, hk[5], 443, "approved/vendor-backup")
    q0 = t + 14 * SEC
    s.emit(f, True, q0, ip_layer(s, f.src_ip, f.dst_ip) / UDP(sport=41006, dport=443) / Raw(
        quic_initial("backup.vendor.example")))
    f.hello = ("backup.vendor.example", "quic")
    for i, (from_init, n) in enumerate([(False, 1200), (False, 900), (True, 60), (False, 400)]):
        src, dst = (f.src_ip, f.dst_ip) if from_init else (f.dst_ip, f.src_ip)
        sport, dport = (41006, 443) if from_init else (443, 41006)
        short = b"\x41" + QUIC_DCID + payload(n - 9, 60 + i)  # 1-RTT short header
        s.emit(f, from_init, q0 + (i + 1) * 15 * MS,
               ip_layer(s, src, dst) / UDP(sport=sport, dport=dport) / Raw(short))
    # f. The answer comes after the flow's first packet.
    plain("10.20.1.6", 41007, hk[6], t + 16 * SEC, "violation/name_unknown")
    ask("10.20.1.6", 50002, t + 17 * SEC, "backup.vendor.example", backup, hk[6])
    # g. Expiry: TTL 30 s lasts 60 s; past it no name.  A chain lasts as long as its
    #    least TTL (the CNAME's 90 s here, not the address record's hour).
    g = "10.20.1.7"
    ans = ask(g, 50003, t + 20 * SEC, "backup.vendor.example",
              [("backup.vendor.example", "A", 30, "")], hk[7])
    plain(g, 41008, hk[7], ans + 61 * SEC, "violation/name_unknown")
    ans = ask(g, 50004, t + 22 * SEC, "backup.vendor.example",
              [("backup.vendor.example", "A", 30, "")], hk[8])
    plain(g, 41009, hk[8], ans + 45 * SEC, "approved/vendor-backup")
    ans = ask(g, 50005, t + 24 * SEC, "api.backup-vendor.example",
              [("api.backup-vendor.example", "CNAME", 90, "backup.vendor.example"),
               ("backup.vendor.example", "A", 3600, "")], hk[9])
    plain(g, 41010, hk[9], ans + 100 * SEC, "violation/name_unknown")
    # h. Domain fronting: resolved as the approved name, the TLS session asks for another.
    ask("10.20.1.8", 50006, t + 30 * SEC, "backup.vendor.example", backup, hk[10])
    tls("10.20.1.8", 41011, hk[10], t + 31 * SEC, "evil.example",
        "violation/name_not_allowed")
    # i. The client's own query went to the internal resolver (not captured): the
    #    resolver's upstream answers name the flow, the latest of them.
    ask(resolver, 50101, t + 34 * SEC, "legacy.vendor.example",
        [("legacy.vendor.example", "A", 300, "")], hk[11])
    ask(resolver, 50102, t + 35 * SEC, "backup.vendor.example", backup, hk[11])
    plain("10.20.1.9", 41012, hk[11], t + 36 * SEC, "approved/vendor-backup")
    # j. The names-only route, in the US: with the name, and without any.
    tls("10.20.1.10", 41013, cc("52.84.0.10", "US"), t + 40 * SEC, "static.cdn.example",
        "approved/cdn-static")
    plain("10.20.1.10", 41014, cc("52.84.0.11", "US"), t + 42 * SEC,
          "violation/name_unknown")
    # k. The SNI is the head of the client's DNS chain: the chain still counts.
    ask("10.20.1.11", 50007, t + 45 * SEC, "api.backup-vendor.example", api_chain, hk[12])
    tls("10.20.1.11", 41015, hk[12], t + 46 * SEC, "api.backup-vendor.example",
        "approved/vendor-backup")
    return s


def all_samples() -> list[Sample]:
    return [demo(), vlan_qinq(), *linktype_samples(), ipv6_ext(), fragments(), tcp_reuse(),
            nanosecond_be(), truncated(), names_sample()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE,
                    help="where to write the samples (default: this folder)")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for sample in all_samples():
        endian, nano = (">", True) if sample.name == "nanosecond-be" else ("<", False)
        for path in sample.write(args.out_dir, endian=endian, nano=nano):
            size = path.stat().st_size
            assert size < 50_000, f"{path.name} is {size} bytes: keep samples small"
            print(f"{path.name:32} {size:6} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
