"""Names reach flows: DNS answers, TLS ClientHellos (split too) and QUIC Initials.

Packets are built with scapy around payloads from real implementations:
ClientHellos from Python's ``ssl`` (OpenSSL), QUIC Initials from ``aioquic``,
DNS answers from ``dnspython``.  They go through the same stages as an audit
(decode → names → flow table → classify) in batches of several sizes, so a
name never depends on where a batch boundary falls.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import dns.message
import dns.rrset
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from mmdb_builder import build_mmdb
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from egressd.audit import Audit, AuditOptions
from egressd.classify import Classifier, addr16
from egressd.config import parse_policy
from egressd.decode.batch import decode_batch
from egressd.decode.linktypes import LINKTYPE_RAW
from egressd.flows import FlowTable, flow_key
from egressd.geo import CachedResolver, MaxMindResolver
from egressd.model import (
    PROTO_TCP,
    PROTO_UDP,
    FlowRecord,
    NameSource,
    Reason,
    RecordBatch,
    VerdictKind,
)
from egressd.names.tracker import NameTracker
from egressd.report import flow_json, flow_line

NS = 10**9
MS = NS // 1000
T0 = 1_772_352_000 * NS
CLIENT, OTHER, RESOLVER = "10.20.1.5", "10.20.1.9", "10.20.0.53"
HK1, HK2, US1 = "203.0.113.10", "203.0.113.20", "198.51.100.7"
PUBLIC_DNS = "192.0.2.53"

POLICY = b"""
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16]
routes:
  - name: vendor-backup
    approval: CAC-2026-7
    from: [customer-data]
    to:
      countries: [HK]
      names: [backup.vendor.example, "*.files.vendor.example"]
    protocols: [tcp, udp]
    ports: [443]
"""


def client_hello(name: str | None, *, big: bool = False) -> bytes:
    """A ClientHello as OpenSSL sends it (``big``: padded past one TCP segment)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if big:
        ctx.set_alpn_protocols([f"proto-{i:03d}-" + "x" * 40 for i in range(40)])
    out = ssl.MemoryBIO()
    sock = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        sock.do_handshake()
    return out.read()


def quic_initials(name: str) -> list[bytes]:
    conn = QuicConnection(configuration=QuicConfiguration(
        is_client=True, server_name=name, alpn_protocols=["h3"]))
    conn.connect(("192.0.2.1", 443), now=0.0)
    return [d for d, _ in conn.datagrams_to_send(now=0.0)]


def dns_answer(qname: str, chain: list[str], address: str, ttl: int = 300) -> bytes:
    """A NOERROR response: qname → CNAMEs in ``chain`` → A/AAAA ``address``."""
    rdtype = "AAAA" if ":" in address else "A"
    query = dns.message.make_query(qname, rdtype)
    resp = dns.message.make_response(query)
    owner = qname
    for target in chain:
        resp.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", "CNAME", target + "."))
        owner = target
    resp.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", rdtype, address))
    return bytes(resp.to_wire())


class Capture:
    """Packets at increasing times; TCP segments carry real sequence numbers."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []
        self.t = T0

    def add(self, pkt: bytes, gap_ms: int = 10) -> None:
        self.t += gap_ms * MS
        self.packets.append((self.t, pkt))

    def dns(self, client: str, server: str, payload: bytes, *, over_tcp: bool = False) -> None:
        if over_tcp:
            body = len(payload).to_bytes(2, "big") + payload
            self.add(bytes(IP(src=server, dst=client) / TCP(sport=53, dport=53000, flags="PA",
                                                            seq=1) / Raw(body)))
        else:
            self.add(bytes(IP(src=server, dst=client) / UDP(sport=53, dport=53000)
                           / Raw(payload)))

    def tcp(self, src: str, dst: str, sport: int, data: list[bytes], dport: int = 443,
            v6: bool = False) -> None:
        """Handshake, client segments ``data`` (acked), teardown."""
        ip = (lambda s, d: IPv6(src=s, dst=d)) if v6 else (lambda s, d: IP(src=s, dst=d))
        seq, rseq = 1000, 5000
        self.add(bytes(ip(src, dst) / TCP(sport=sport, dport=dport, flags="S", seq=seq)))
        self.add(bytes(ip(dst, src) / TCP(sport=dport, dport=sport, flags="SA", seq=rseq,
                                          ack=seq + 1)))
        seq += 1
        self.add(bytes(ip(src, dst) / TCP(sport=sport, dport=dport, flags="A", seq=seq,
                                          ack=rseq + 1)))
        for chunk in data:
            self.add(bytes(ip(src, dst) / TCP(sport=sport, dport=dport, flags="PA", seq=seq,
                                              ack=rseq + 1) / Raw(chunk)))
            seq += len(chunk)
        self.add(bytes(ip(dst, src) / TCP(sport=dport, dport=sport, flags="A", seq=rseq + 1,
                                          ack=seq)))
        self.add(bytes(ip(src, dst) / TCP(sport=sport, dport=dport, flags="FA", seq=seq,
                                          ack=rseq + 1)))
        self.add(bytes(ip(dst, src) / TCP(sport=dport, dport=sport, flags="FA", seq=rseq + 1,
                                          ack=seq + 1)))

    def udp(self, src: str, dst: str, sport: int, datagrams: list[bytes], dport: int = 443) -> None:
        for d in datagrams:
            self.add(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(d)))
        self.add(bytes(IP(src=dst, dst=src) / UDP(sport=dport, dport=sport) / Raw(b"r" * 50)))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    tmp: Path = tmp_path_factory.mktemp("geo")
    def cc(code: str) -> dict[str, dict[str, str]]:
        return {"country": {"iso_code": code}, "registered_country": {"iso_code": code}}

    country = build_mmdb(tmp / "c.mmdb", "GeoLite2-Country", {
        "203.0.113.0/24": cc("HK"), "198.51.100.0/24": cc("US"),
        "2001:db8:1::/48": cc("HK"), "192.0.2.0/24": cc("CN"),
    })
    return Classifier(parse_policy(POLICY, "policy.yaml"),
                      CachedResolver(MaxMindResolver(country, None)))


def run(classifier: Classifier, cap: Capture, batch: int) -> list[FlowRecord]:
    """The audit's stages over ``cap`` in batches of ``batch`` packets."""
    audit = Audit(classifier.policy, classifier.resolver, AuditOptions())
    audit.classifier = classifier
    pk = cap.packets
    for i in range(0, len(pk), batch):
        rb = RecordBatch.from_packets([(t, LINKTYPE_RAW, p) for t, p in pk[i:i + batch]])
        dec = decode_batch(rb)
        assert audit.names is not None
        audit.names.observe(rb, dec)
        audit.table.process(dec)
        audit.names.attach(audit.table)
        audit._drain()
    audit.table.flush()
    audit._drain()
    return sorted(audit.flows, key=lambda r: r.first_seen_ns)


def by_port(flows: list[FlowRecord]) -> dict[tuple[int, int], FlowRecord]:
    return {(f.proto, f.src_port or 0): f for f in flows if f.dst_port != 53}


BATCHES = [1, 2, 3, 7, 1000]


@pytest.mark.parametrize("batch", BATCHES)
def test_names_from_dns_tls_and_quic(classifier: Classifier, batch: int) -> None:
    cap = Capture()
    # 1: DNS through a CNAME chain, then a plain TCP flow: the question is the name,
    #    and the route's name matches the chain's end.
    cap.dns(CLIENT, PUBLIC_DNS, dns_answer("api.customer.example", ["backup.vendor.example"],
                                           HK1))
    cap.tcp(CLIENT, HK1, 40001, [b"PUT /data HTTP/1.1\r\n\r\n"])
    # 2: a ClientHello in one segment; 3: one cut across two segments.
    cap.tcp(CLIENT, HK2, 40002, [client_hello("Backup.Vendor.Example")])
    big = client_hello("eu.files.vendor.example", big=True)
    assert len(big) > 1500
    cap.tcp(CLIENT, HK2, 40003, [big[:1000], big[1000:]])
    # 4: a name the route does not list; 5: no name at all.
    cap.tcp(CLIENT, HK2, 40004, [client_hello("files.vendor.example")])
    cap.tcp(CLIENT, HK2, 40005, [b"no tls here"])
    # 6: QUIC v1 Initial.
    cap.udp(CLIENT, HK2, 40006, quic_initials("backup.vendor.example"))
    # 7: DNS says one name, the ClientHello another (domain fronting): the hello counts.
    cap.dns(CLIENT, PUBLIC_DNS, dns_answer("backup.vendor.example", [], US1))
    cap.tcp(CLIENT, US1, 40007, [client_hello("evil.example")])
    flows = by_port(run(classifier, cap, batch))

    f = flows[(PROTO_TCP, 40001)]
    assert (f.server_name, f.name_source) == ("api.customer.example", NameSource.DNS)
    assert (f.verdict.verdict, f.verdict.route) == (VerdictKind.APPROVED, "vendor-backup")
    f = flows[(PROTO_TCP, 40002)]
    assert (f.server_name, f.name_source) == ("backup.vendor.example", NameSource.SNI)
    assert f.verdict.verdict is VerdictKind.APPROVED
    f = flows[(PROTO_TCP, 40003)]
    assert (f.server_name, f.name_source) == ("eu.files.vendor.example", NameSource.SNI)
    assert f.verdict.verdict is VerdictKind.APPROVED
    f = flows[(PROTO_TCP, 40004)]
    assert (f.server_name, f.verdict.reason, f.verdict.route) == (
        "files.vendor.example", Reason.NAME_NOT_ALLOWED, "vendor-backup")
    f = flows[(PROTO_TCP, 40005)]
    assert (f.server_name, f.name_source, f.verdict.reason) == (None, None, Reason.NAME_UNKNOWN)
    f = flows[(PROTO_UDP, 40006)]
    assert (f.server_name, f.name_source) == ("backup.vendor.example", NameSource.QUIC)
    assert f.verdict.verdict is VerdictKind.APPROVED
    f = flows[(PROTO_TCP, 40007)]
    assert (f.server_name, f.name_source) == ("evil.example", NameSource.SNI)
    assert (f.verdict.verdict, f.verdict.reason) == (VerdictKind.VIOLATION, Reason.NO_ROUTE)


@pytest.mark.parametrize("batch", BATCHES)
def test_dns_timing_clients_and_transport(classifier: Classifier, batch: int) -> None:
    cap = Capture()
    # An answer that comes after the flow started names nothing.
    cap.tcp(CLIENT, HK1, 41001, [b"early"])
    cap.dns(CLIENT, PUBLIC_DNS, dns_answer("late.vendor.example", [], HK1, ttl=30))
    # Within max(ttl, 60 s) it names the flow ...
    cap.add(bytes(IP(src=CLIENT, dst=HK1) / UDP(sport=41002, dport=443) / Raw(b"u")), 50_000)
    # ... after that it does not.
    cap.add(bytes(IP(src=CLIENT, dst=HK1) / UDP(sport=41003, dport=443) / Raw(b"u")), 20_000)
    # The resolver's upstream answer names another client's flow (no own answer seen).
    cap.dns(RESOLVER, PUBLIC_DNS, dns_answer("shared.vendor.example", [], HK2))
    cap.tcp(OTHER, HK2, 41004, [b"x"])
    # A client's own answer wins over another client's, for the same address.
    cap.dns(CLIENT, PUBLIC_DNS, dns_answer("mine.vendor.example", [], HK2))
    cap.tcp(CLIENT, HK2, 41005, [b"x"])
    # DNS over TCP, and AAAA answers for IPv6 flows.
    cap.dns(CLIENT, PUBLIC_DNS, dns_answer("v6.vendor.example", [], "2001:db8:1::7"),
            over_tcp=True)
    cap.tcp(CLIENT.replace("10.20.1.5", "fd00::5"), "2001:db8:1::7", 41006, [b"x"], v6=True)
    flows = by_port(run(classifier, cap, batch))
    assert flows[(PROTO_TCP, 41001)].server_name is None
    assert flows[(PROTO_UDP, 41002)].server_name == "late.vendor.example"
    assert flows[(PROTO_UDP, 41003)].server_name is None
    assert flows[(PROTO_TCP, 41004)].server_name == "shared.vendor.example"
    assert flows[(PROTO_TCP, 41005)].server_name == "mine.vendor.example"
    # fd00::5 did not ask itself: another client's answer (over TCP) is used.
    assert flows[(PROTO_TCP, 41006)].server_name == "v6.vendor.example"


@pytest.mark.parametrize("batch", BATCHES)
def test_ipv6_dns_answer_names_the_asking_clients_flow(classifier: Classifier,
                                                       batch: int) -> None:
    cap = Capture()
    payload = dns_answer("v6.vendor.example", ["backup.vendor.example"], "2001:db8:1::7")
    cap.add(bytes(IPv6(src="2001:db8:53::1", dst="fd00::5") / UDP(sport=53, dport=5300)
                  / Raw(payload)))
    cap.tcp("fd00::5", "2001:db8:1::7", 42001, [b"x"], v6=True)
    flows = by_port(run(classifier, cap, batch))
    f = flows[(PROTO_TCP, 42001)]
    assert (f.server_name, f.name_source) == ("v6.vendor.example", NameSource.DNS)


def test_split_hello_waits_for_the_segment_in_order(classifier: Classifier) -> None:
    """A retransmitted first segment is skipped; the next in-order segment completes it."""
    hello = client_hello("backup.vendor.example", big=True)
    cap = Capture()
    cap.tcp(CLIENT, HK2, 43001, [hello[:700], hello[700:1400], hello[1400:]])
    # Resend the first segment after the handshake: the flow keeps the same name.
    seg = cap.packets[3]
    cap.packets.insert(4, (seg[0] + 1, seg[1]))
    flows = by_port(run(classifier, cap, 1000))
    assert flows[(PROTO_TCP, 43001)].server_name == "backup.vendor.example"


def test_flow_key_matches_the_table(classifier: Classifier) -> None:
    table = FlowTable()
    pkts = [bytes(IP(src=CLIENT, dst=HK1) / TCP(sport=40000, dport=443, flags="S")),
            bytes(IPv6(src="fd00::5", dst="2001:db8:1::7") / UDP(sport=5, dport=443))]
    table.process(decode_batch(RecordBatch.from_packets(
        [(T0 + i, LINKTYPE_RAW, p) for i, p in enumerate(pkts)])))
    for key in (flow_key(PROTO_TCP, 4, addr16(CLIENT), 40000, addr16(HK1), 443),
                flow_key(PROTO_TCP, 4, addr16(HK1), 443, addr16(CLIENT), 40000),
                flow_key(PROTO_UDP, 6, addr16("fd00::5"), 5, addr16("2001:db8:1::7"), 443)):
        assert table.get(key) is not None


def test_pending_hellos_are_bounded(classifier: Classifier) -> None:
    """First halves of many ClientHellos never completed: the waiting list stays bounded."""
    hello = client_hello("backup.vendor.example", big=True)
    tracker = NameTracker(max_pending=16)
    pkts = [bytes(IP(src=CLIENT, dst=HK2) / TCP(sport=20000 + i, dport=443, flags="PA", seq=1)
                  / Raw(hello[:1000])) for i in range(200)]
    rb = RecordBatch.from_packets([(T0 + i, LINKTYPE_RAW, p) for i, p in enumerate(pkts)])
    tracker.observe(rb, decode_batch(rb))
    assert len(tracker._tls) == 16
    assert tracker.stats["hellos_given_up"] == 200 - 16


def test_audit_report_carries_names(tmp_path: Path, classifier: Classifier) -> None:
    """End to end through a capture file: the JSON report has the fields."""
    from scapy.utils import wrpcap

    cap = Capture()
    cap.tcp(CLIENT, HK2, 44001, [client_hello("backup.vendor.example")])
    path = tmp_path / "names.pcap"
    wrpcap(str(path), [IP(p) for _, p in cap.packets])
    audit = Audit(classifier.policy, classifier.resolver)
    audit.add_capture(str(path))
    result = audit.finish(policy_path="policy.yaml", policy_sha256="0" * 64)
    (flow,) = result.flows
    assert (flow.server_name, flow.name_source) == ("backup.vendor.example", NameSource.SNI)
    assert json.loads(flow_line(flow)) == flow_json(flow)
    assert flow_json(flow)["server_name"] == "backup.vendor.example"
    assert flow_json(flow)["name_source"] == "sni"
