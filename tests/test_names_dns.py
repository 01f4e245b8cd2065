"""Passive DNS: response parsing, CNAME chains, TCP framing, the TTL-bounded table."""

from __future__ import annotations

import ipaddress
import json
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.names.dns import (
    MAX_CHAIN,
    MAX_TTL_S,
    MIN_TTL_S,
    DnsAnswer,
    DnsAnswers,
    PassiveDns,
    parse_response,
    parse_tcp_stream,
)

S = 1_000_000_000
T0 = 1_700_000_000 * S


def a16(text: str) -> bytes:
    """16-byte address as the pipeline holds it (IPv4 mapped)."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


CLIENT = a16("10.0.0.5")
OTHER = a16("10.0.0.6")
ADDR = a16("93.184.216.34")


def response(qname: str, records: Iterable[tuple[str, int, str, str | list[str]]] = (),
             rdtype: str = "A", rcode: dns.rcode.Rcode = dns.rcode.NOERROR, rdclass: str = "IN",
             additional: Iterable[tuple[str, int, str, str]] = ()) -> dns.message.Message:
    q = dns.message.make_query(qname, rdtype, rdclass=rdclass)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for name, ttl, rtype, data in records:
        values = data if isinstance(data, list) else [data]
        r.answer.append(dns.rrset.from_text(name, ttl, rdclass, rtype, *values))
    for name, ttl, rtype, data in additional:
        r.additional.append(dns.rrset.from_text(name, ttl, rdclass, rtype, data))
    return r


def wire(qname: str, records: Iterable[tuple[str, int, str, str | list[str]]] = (),
         **kw: object) -> bytes:
    return response(qname, records, **kw).to_wire()  # type: ignore[arg-type]


def answers(payload: bytes) -> DnsAnswers:
    got = parse_response(payload)
    assert got is not None
    return got


def check_types(got: object) -> None:
    if got is None:
        return
    assert isinstance(got, DnsAnswers)
    assert isinstance(got.qname, str)
    assert isinstance(got.answers, tuple)
    for ans in got.answers:
        assert isinstance(ans, DnsAnswer)
        assert isinstance(ans.addr, bytes) and len(ans.addr) == 16
        assert isinstance(ans.chain, tuple) and 1 <= len(ans.chain) <= MAX_CHAIN
        assert all(isinstance(n, str) for n in ans.chain)
        assert ans.chain[0] == got.qname
        assert isinstance(ans.ttl, int) and ans.ttl >= 0


# --- parsing ---------------------------------------------------------------------------------


def test_a_record() -> None:
    got = answers(wire("WWW.Example.COM.", [("www.example.com.", 300, "A", ["93.184.216.34",
                                                                           "1.2.3.4"])]))
    assert got.qname == "www.example.com"
    assert set(got.answers) == {  # dnspython shuffles the records of an RRset when rendering
        DnsAnswer(ADDR, ("www.example.com",), 300),
        DnsAnswer(a16("1.2.3.4"), ("www.example.com",), 300)}


def test_aaaa_record() -> None:
    got = answers(wire("v6.example.", [("v6.example.", 120, "AAAA", "2001:db8::1")],
                       rdtype="AAAA"))
    assert got.answers == (DnsAnswer(a16("2001:db8::1"), ("v6.example",), 120),)


def test_idna_stays_ascii() -> None:
    got = answers(wire("xn--bcher-kva.example.", [("xn--bcher-kva.example.", 60, "A", "1.1.1.1")]))
    assert got.answers[0].chain == ("xn--bcher-kva.example",)


def test_cname_chain_head_first_min_ttl() -> None:
    got = answers(wire("q.example.", [
        ("q.example.", 3600, "CNAME", "c1.cdn.example."),
        ("c1.cdn.example.", 120, "CNAME", "C2.edge.example."),
        ("c2.edge.example.", 600, "A", "5.6.7.8"),
    ]))
    assert got.answers == (
        DnsAnswer(a16("5.6.7.8"), ("q.example", "c1.cdn.example", "c2.edge.example"), 120),)


def test_cname_chain_out_of_order() -> None:
    got = answers(wire("q.example.", [
        ("c2.edge.example.", 30, "A", "5.6.7.8"),
        ("c1.cdn.example.", 300, "CNAME", "c2.edge.example."),
        ("q.example.", 300, "CNAME", "c1.cdn.example."),
    ]))
    assert got.answers == (
        DnsAnswer(a16("5.6.7.8"), ("q.example", "c1.cdn.example", "c2.edge.example"), 30),)


def test_cname_loop_stops() -> None:
    got = answers(wire("a.example.", [
        ("a.example.", 60, "CNAME", "b.example."),
        ("b.example.", 60, "CNAME", "a.example."),
    ]))
    assert got.qname == "a.example" and got.answers == ()


def test_long_chain_is_cut() -> None:
    recs: list[tuple[str, int, str, str | list[str]]] = [
        (f"n{i}.example.", 60, "CNAME", f"n{i + 1}.example.") for i in range(40)]
    recs.append(("n40.example.", 60, "A", "1.2.3.4"))
    recs.append(("n3.example.", 60, "A", "4.3.2.1"))
    got = answers(wire("n0.example.", recs))
    assert got.answers == (DnsAnswer(a16("4.3.2.1"), tuple(f"n{i}.example" for i in range(4)),
                                     60),)


def test_dangling_cname() -> None:
    got = answers(wire("q.example.", [("q.example.", 60, "CNAME", "gone.example.")]))
    assert got.answers == ()


def test_unrelated_and_additional_records_ignored() -> None:
    got = answers(wire("q.example.", [
        ("q.example.", 300, "CNAME", "c.example."),
        ("c.example.", 300, "A", "5.6.7.8"),
        ("bank.example.", 300, "A", "6.6.6.6"),
        ("other.example.", 300, "AAAA", "2001:db8::666"),
    ], additional=[("q.example.", 300, "A", "7.7.7.7"), ("c.example.", 300, "A", "8.8.8.8")]))
    assert [a.addr for a in got.answers] == [a16("5.6.7.8")]


def test_empty_noerror_answer() -> None:
    got = answers(wire("nodata.example.", []))
    assert got == DnsAnswers("nodata.example", ())


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_error_rcodes_rejected(rcode: dns.rcode.Rcode) -> None:
    assert parse_response(wire("q.example.", [("q.example.", 60, "A", "1.2.3.4")],
                               rcode=rcode)) is None


def test_query_rejected() -> None:
    assert parse_response(dns.message.make_query("q.example.", "A").to_wire()) is None


def test_non_in_class_rejected() -> None:
    assert parse_response(wire("version.bind.", [("version.bind.", 0, "TXT", '"9"')],
                               rdtype="TXT", rdclass="CH")) is None


def test_other_opcode_rejected() -> None:
    r = response("q.example.", [("q.example.", 60, "A", "1.2.3.4")])
    r.set_opcode(dns.opcode.NOTIFY)
    assert parse_response(r.to_wire()) is None


def test_multiple_questions_rejected() -> None:
    r = response("q.example.", [("q.example.", 60, "A", "1.2.3.4")])
    r.question.append(dns.rrset.RRset(dns.name.from_text("r.example."), dns.rdataclass.IN,
                                      dns.rdatatype.A))
    assert parse_response(r.to_wire()) is None


def test_no_question_rejected() -> None:
    r = response("q.example.", [("q.example.", 60, "A", "1.2.3.4")])
    r.question = []
    assert parse_response(r.to_wire()) is None


def test_truncated_and_garbage() -> None:
    good = wire("q.example.", [("q.example.", 60, "A", "1.2.3.4")])
    for cut in range(len(good)):
        assert parse_response(good[:cut]) is None
    assert parse_response(b"") is None
    assert parse_response(b"\xff" * 64) is None
    assert answers(good + b"trailing junk").answers[0].addr == a16("1.2.3.4")


# --- TCP framing -----------------------------------------------------------------------------


def framed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


def test_tcp_two_messages_then_partial() -> None:
    one = wire("a.example.", [("a.example.", 60, "A", "1.1.1.1")])
    two = wire("b.example.", [("b.example.", 60, "AAAA", "2001:db8::2")], rdtype="AAAA")
    three = wire("c.example.", [("c.example.", 60, "A", "3.3.3.3")])
    got = parse_tcp_stream(framed(one) + framed(two) + framed(three)[:-5])
    assert [g.qname for g in got] == ["a.example", "b.example"]
    assert parse_tcp_stream(framed(one)[:-1]) == []


def test_tcp_garbage() -> None:
    assert parse_tcp_stream(b"") == []
    assert parse_tcp_stream(b"\x00") == []
    assert parse_tcp_stream(b"\x00\x00\x00\x00") == []
    assert parse_tcp_stream(b"\x00\x05hello") == []


# --- fuzz ------------------------------------------------------------------------------------

SEED = wire("q.example.", [("q.example.", 300, "CNAME", "c.example."),
                           ("c.example.", 60, "A", ["1.2.3.4", "5.6.7.8"]),
                           ("c.example.", 60, "AAAA", "2001:db8::1")])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_types(parse_response(data))
    for got in parse_tcp_stream(data):
        check_types(got)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(SEED)))
def test_fuzz_mutated_response(edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(SEED)
    for pos, val in edits:
        buf[pos] = val
    data = bytes(buf[:cut])
    check_types(parse_response(data))
    for got in parse_tcp_stream(framed(data) + framed(bytes(buf))):
        check_types(got)


# --- the table -------------------------------------------------------------------------------


def one(name: str, addr: str = "93.184.216.34", ttl: int = 300) -> DnsAnswers:
    return answers(wire(name, [(name, ttl, "A" if "." in addr else "AAAA", addr)]))


def test_lookup_valid_until_ttl() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("a.example.", ttl=300), T0)
    assert t.lookup(CLIENT, ADDR, T0) == ("a.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 300 * S - 1) == ("a.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 300 * S) is None
    assert t.lookup(CLIENT, a16("1.1.1.1"), T0) is None


def test_min_ttl_applies() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("a.example.", ttl=0), T0)
    assert t.lookup(CLIENT, ADDR, T0 + MIN_TTL_S * S - 1) == ("a.example",)
    assert t.lookup(CLIENT, ADDR, T0 + MIN_TTL_S * S) is None


def test_max_ttl_cap() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("a.example.", ttl=7 * 86_400), T0)
    assert t.lookup(CLIENT, ADDR, T0 + MAX_TTL_S * S - 1) == ("a.example",)
    assert t.lookup(CLIENT, ADDR, T0 + MAX_TTL_S * S) is None


def test_answer_after_lookup_time_not_used() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("late.example."), T0 + 10 * S)
    assert t.lookup(CLIENT, ADDR, T0) is None
    assert t.lookup(OTHER, ADDR, T0) is None
    assert t.lookup(CLIENT, ADDR, T0 + 10 * S) == ("late.example",)


def test_older_valid_answer_when_newer_is_in_the_future() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("old.example."), T0)
    t.observe(CLIENT, one("new.example."), T0 + 100 * S)
    assert t.lookup(CLIENT, ADDR, T0 + 50 * S) == ("old.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 150 * S) == ("new.example",)
    assert t.lookup(CLIENT, ADDR, T0 - 1) is None


def test_out_of_order_observe() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("new.example."), T0 + 100 * S)
    t.observe(CLIENT, one("old.example."), T0)
    assert t.lookup(CLIENT, ADDR, T0 + 50 * S) == ("old.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 150 * S) == ("new.example",)


def test_older_longer_ttl_still_found_when_newest_expired() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("long.example.", ttl=3600), T0)
    t.observe(CLIENT, one("short.example.", ttl=60), T0 + 10 * S)
    assert t.lookup(CLIENT, ADDR, T0 + 20 * S) == ("short.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 200 * S) == ("long.example",)


def test_keeps_a_few_answers_per_key() -> None:
    t = PassiveDns(per_key=4)
    for i in range(6):
        t.observe(CLIENT, one(f"n{i}.example.", ttl=3600), T0 + i * S)
    assert t.lookup(CLIENT, ADDR, T0 + 2 * S) == ("n2.example",)
    assert t.lookup(CLIENT, ADDR, T0 + 1 * S) is None  # fell out with the 5th and 6th answer


def test_per_client_preferred_over_any_client() -> None:
    t = PassiveDns()
    t.observe(CLIENT, one("mine.example."), T0)
    t.observe(OTHER, one("theirs.example."), T0 + S)
    assert t.lookup(CLIENT, ADDR, T0 + 2 * S) == ("mine.example",)
    assert t.lookup(OTHER, ADDR, T0 + 2 * S) == ("theirs.example",)


def test_any_client_fallback() -> None:
    t = PassiveDns()
    resolver = a16("10.0.0.53")
    t.observe(resolver, one("via-resolver.example."), T0)
    assert t.lookup(CLIENT, ADDR, T0 + S) == ("via-resolver.example",)
    # the client's own answer has expired: the any-client one still counts
    t2 = PassiveDns()
    t2.observe(CLIENT, one("mine.example.", ttl=60), T0)
    t2.observe(resolver, one("resolver.example.", ttl=3600), T0 + S)
    assert t2.lookup(CLIENT, ADDR, T0 + 120 * S) == ("resolver.example",)


def test_cname_chain_in_table() -> None:
    t = PassiveDns()
    got = answers(wire("q.example.", [("q.example.", 300, "CNAME", "edge.cdn.example."),
                                      ("edge.cdn.example.", 300, "A", "93.184.216.34")]))
    t.observe(CLIENT, got, T0)
    assert t.lookup(CLIENT, ADDR, T0) == ("q.example", "edge.cdn.example")


def test_duplicate_answer_does_not_fill_slots() -> None:
    t = PassiveDns(per_key=2)
    t.observe(CLIENT, one("old.example.", ttl=3600), T0)
    for _ in range(5):
        t.observe(CLIENT, one("dup.example.", ttl=3600), T0 + 10 * S)
    assert t.lookup(CLIENT, ADDR, T0 + 5 * S) == ("old.example",)


def test_lru_bound_under_flood() -> None:
    cap = 500
    t = PassiveDns(max_entries=cap)
    for i in range(10 * cap):
        addr = f"100.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        client = a16(f"10.1.{(i >> 8) & 255}.{i & 255}")
        t.observe(client, one(f"h{i}.flood.example.", addr, ttl=3600), T0 + i * 1000)
        assert len(t) <= cap and t.addresses <= cap
    assert len(t) == cap
    assert t.evictions == 2 * (10 * cap - cap)  # both indexes evicted the same keys
    assert len(t._chains) <= cap + 1024 and len(t._names) <= cap + 1024
    t._purge_interned()  # what only the intern tables still hold goes
    assert len(t._chains) == len(t._names) == cap
    last = 10 * cap - 1
    last_addr = a16(f"100.{(last >> 16) & 255}.{(last >> 8) & 255}.{last & 255}")
    assert t.lookup(OTHER, last_addr, T0 + S) == (f"h{last}.flood.example",)
    assert t.lookup(OTHER, a16("100.0.0.0"), T0 + S) is None


def test_lru_keeps_recently_used() -> None:
    t = PassiveDns(max_entries=2)
    a, b, c = a16("1.0.0.1"), a16("1.0.0.2"), a16("1.0.0.3")
    t.observe(CLIENT, one("a.example.", "1.0.0.1"), T0)
    t.observe(CLIENT, one("b.example.", "1.0.0.2"), T0)
    assert t.lookup(CLIENT, a, T0) == ("a.example",)  # a is now the most recent
    t.observe(CLIENT, one("c.example.", "1.0.0.3"), T0)
    assert t.lookup(CLIENT, b, T0) is None
    assert t.lookup(CLIENT, a, T0) == ("a.example",)
    assert t.lookup(CLIENT, c, T0) == ("c.example",)


def test_expired_dropped_lazily_and_when_full() -> None:
    t = PassiveDns(max_entries=2, grace_s=0)
    t.observe(CLIENT, one("a.example.", "1.0.0.1", ttl=60), T0)
    t.observe(CLIENT, one("b.example.", "1.0.0.2", ttl=60), T0 + 1000 * S)
    assert t.lookup(CLIENT, a16("1.0.0.1"), T0 + 1000 * S) is None
    assert len(t) == 1 and t.expired == 2  # per-client and any-client key of 1.0.0.1
    t.observe(CLIENT, one("c.example.", "1.0.0.3", ttl=60), T0 + 2000 * S)
    t.observe(CLIENT, one("d.example.", "1.0.0.4", ttl=60), T0 + 2000 * S)
    assert len(t) == 2 and t.evictions == 0 and t.expired == 4


def test_names_interned() -> None:
    t = PassiveDns()
    for i in range(3):
        t.observe(a16(f"10.9.0.{i}"), one("same.example."), T0)
    chains = [t.lookup(a16(f"10.9.0.{i}"), ADDR, T0) for i in range(3)]
    assert chains[0] is chains[1] is chains[2]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PassiveDns(max_entries=0)


# --- real captures against tshark ------------------------------------------------------------

def tshark_pairs(path: Path) -> dict[int, set[tuple[bytes, str]]]:
    """(address, owner) of the answer-section A/AAAA records of usable UDP responses, by frame.

    Read from tshark's JSON tree, whose "Answers" node holds exactly the answer
    section (the flat field list mixes in NSEC type bitmaps and other sections).
    """
    cmd = ["tshark", "-n", "-r", str(path), "-Y",
           "dns.flags.response==1 && udp.srcport==53 && !icmp && !icmpv6",
           "-T", "json", "-J", "frame dns"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result: dict[int, set[tuple[bytes, str]]] = {}
    for pkt in json.loads(out):
        layers = pkt["_source"]["layers"]
        msg, flags = layers["dns"], layers["dns"]["dns.flags_tree"]
        questions = list(msg.get("Queries", {}).values())
        if (flags["dns.flags.opcode"], flags["dns.flags.rcode"], msg["dns.count.queries"]) \
                != ("0", "0", "1") or questions[0]["dns.qry.class"] != "0x0001":
            continue
        pairs = set()
        for rec in msg.get("Answers", {}).values():
            if rec["dns.resp.class"] != "0x0001":
                continue
            value = rec.get("dns.a") if rec["dns.resp.type"] == "1" else (
                rec.get("dns.aaaa") if rec["dns.resp.type"] == "28" else None)
            if value is not None:
                pairs.add((a16(value), rec["dns.resp.name"].lower()))
        result[int(layers["frame"]["frame.number"])] = pairs
    return result


def our_pairs(path: Path) -> dict[int, set[tuple[bytes, str]]]:
    """The same from parse_response, by frame; IPv4 fragments reassembled as tshark does."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.inet6 import _ICMPv6
    from scapy.utils import rdpcap

    result: dict[int, set[tuple[bytes, str]]] = {}
    frags: dict[tuple[str, str, int], dict[int, bytes]] = {}

    def use(frame: int, udp_bytes: bytes) -> None:
        sport, _, ulen = struct.unpack_from("!HHH", udp_bytes)
        if sport == 53:
            got = parse_response(udp_bytes[8:ulen])
            if got is not None:
                result[frame] = {(a.addr, a.chain[-1]) for a in got.answers}

    for i, pkt in enumerate(rdpcap(str(path)), start=1):
        if pkt.haslayer(ICMP) or pkt.haslayer(_ICMPv6):
            continue
        if pkt.haslayer(IP) and (pkt[IP].flags.MF or pkt[IP].frag):
            ip = pkt[IP]
            if ip.proto != 17:
                continue
            parts = frags.setdefault((ip.src, ip.dst, ip.id), {})
            parts[ip.frag * 8] = bytes(ip.original[ip.ihl * 4:ip.len])
            if ip.flags.MF:
                continue
            data, off = b"", 0
            for start in sorted(parts):
                if start != off:
                    break
                data += parts[start]
                off += len(parts[start])
            else:
                del frags[(ip.src, ip.dst, ip.id)]
                use(i, data)
            continue
        if pkt.haslayer(UDP):
            use(i, bytes(pkt[UDP].original))
    return result


@pytest.mark.shared
@pytest.mark.parametrize("name", ["zeek-dns-edns-ecs.pcap", "PcapPlusPlus-example.pcap"])
def test_real_captures_match_tshark(name: str) -> None:
    from tests.conftest import require_shared

    path = require_shared("pcaps-external") / name
    if not path.is_file():
        pytest.skip(f"{name} not in the shared pcaps-external folder")
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    theirs = tshark_pairs(path)
    ours = our_pairs(path)
    assert sum(len(v) for v in ours.values()) > 10
    assert ours == theirs
