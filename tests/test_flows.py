"""Flow table: bidirectional flows, TCP teardown and reuse, idle timeouts, fragments.

A small independent model of the documented semantics (one packet at a time)
is the oracle: whatever the batch sizes, the table must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.packet import Raw

from egressd.decode.batch import decode_batch
from egressd.decode.linktypes import LINKTYPE_RAW
from egressd.flows import Flow, FlowTable, FlowTimeouts
from egressd.model import RecordBatch

NS = 10**9
T0 = 1_772_352_000 * NS
C, S = "10.0.0.1", "198.51.100.7"


def run(packets: list[tuple[int, bytes]], batch: int = 10_000,
        timeouts: FlowTimeouts | None = None) -> tuple[list[Flow], FlowTable]:
    table = FlowTable(timeouts)
    for i in range(0, len(packets), batch):
        chunk = packets[i:i + batch]
        table.process(decode_batch(RecordBatch.from_packets(
            [(ts, LINKTYPE_RAW, data) for ts, data in chunk])))
    table.flush()
    return sorted(table.finished, key=lambda f: (f.first_ns, f.key)), table


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, size: int = 0) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
                 / Raw(b"x" * size))


def conversation(t: int, sport: int = 40000) -> list[tuple[int, bytes]]:
    return [
        (t, tcp(C, S, sport, 443, "S")),
        (t + 1 * NS // 10, tcp(S, C, 443, sport, "SA")),
        (t + 2 * NS // 10, tcp(C, S, sport, 443, "A")),
        (t + 3 * NS // 10, tcp(C, S, sport, 443, "PA", 1000)),
        (t + 4 * NS // 10, tcp(S, C, 443, sport, "A")),
        (t + 5 * NS // 10, tcp(C, S, sport, 443, "FA")),
        (t + 6 * NS // 10, tcp(S, C, 443, sport, "FA")),
        (t + 7 * NS // 10, tcp(C, S, sport, 443, "A")),
    ]


def totals(f: Flow) -> tuple[int, int, int, int]:
    """(packets, bytes) sent by the initiator, then by the responder."""
    if f.initiator == 0:
        return f.pk0, f.by0, f.pk1, f.by1
    return f.pk1, f.by1, f.pk0, f.by0


def test_handshake_data_and_teardown_make_one_flow() -> None:
    flows, _ = run(conversation(T0))
    assert len(flows) == 1
    f = flows[0]
    assert totals(f) == (5, 40 * 4 + 1040, 3, 120)
    assert f.first_ns == T0 and f.last_ns == T0 + 7 * NS // 10
    assert f.syn_seen


def test_capture_starting_at_the_syn_ack_still_finds_the_initiator() -> None:
    flows, _ = run(conversation(T0)[1:])
    init = flows[0].b if flows[0].initiator == 1 else flows[0].a
    assert init.endswith(bytes([10, 0, 0, 1]))


def test_new_syn_after_teardown_and_grace_starts_a_new_flow() -> None:
    late_ack = (T0 + 2 * NS, tcp(C, S, 40000, 443, "A"))
    pkts = [*conversation(T0), late_ack, *conversation(T0 + 30 * NS)]
    flows, _ = run(pkts)
    assert len(flows) == 2
    # The late ACK 1.3 s after the close is within the grace period: first flow.
    assert totals(flows[0])[0] == 6
    assert totals(flows[1])[0] == 5


def test_syn_during_grace_period_starts_a_new_flow() -> None:
    pkts = conversation(T0) + conversation(T0 + 1 * NS)
    assert len(run(pkts)[0]) == 2


def test_rst_ends_the_connection() -> None:
    pkts = conversation(T0)[:4] + [(T0 + NS, tcp(S, C, 443, 40000, "R")),
                                   (T0 + 20 * NS, tcp(C, S, 40000, 443, "PA", 10))]
    flows, _ = run(pkts)
    assert [totals(f)[0] for f in flows] == [3, 1]


def test_half_close_keeps_the_flow_open() -> None:
    pkts = conversation(T0)[:5] + [(T0 + NS, tcp(C, S, 40000, 443, "FA"))] + [
        (T0 + (2 + i) * 10 * NS, tcp(S, C, 443, 40000, "PA", 500)) for i in range(5)]
    flows, _ = run(pkts)
    assert len(flows) == 1


@pytest.mark.parametrize(("gap", "expected"), [(59, 1), (61, 2)])
def test_udp_idle_timeout(gap: int, expected: int) -> None:
    def udp(t: int) -> tuple[int, bytes]:
        return (t, bytes(IP(src=C, dst=S) / UDP(sport=5000, dport=53)))

    flows, _ = run([udp(T0), udp(T0 + gap * NS)])
    assert len(flows) == expected


def test_idle_timeouts_are_configurable() -> None:
    pkts = [(T0, tcp(C, S, 1, 2, "A")), (T0 + 20 * NS, tcp(C, S, 1, 2, "A"))]
    assert len(run(pkts, timeouts=FlowTimeouts(tcp=10))[0]) == 2
    assert len(run(pkts)[0]) == 1


def test_icmp_echo_request_and_reply_are_one_flow_other_types_are_separate() -> None:
    pkts = [(T0, bytes(IP(src=C, dst=S) / ICMP(type=8, id=1))),
            (T0 + 1, bytes(IP(src=S, dst=C) / ICMP(type=0, id=1))),
            (T0 + 2, bytes(IP(src=S, dst=C) / ICMP(type=3, code=1)))]
    flows, _ = run(pkts)
    assert len(flows) == 2
    echo = next(f for f in flows if f.icmp_type == 8)
    assert (echo.pk0 + echo.pk1, echo.icmp_code) == (2, 0)


def test_later_fragments_join_the_first_fragments_flow() -> None:
    big = IP(src=C, dst=S, id=4242) / UDP(sport=5000, dport=53) / Raw(b"y" * 2800)
    frags = fragment(big, fragsize=1000)
    pkts = [(T0 + i, bytes(p)) for i, p in enumerate(frags)]
    orphan = IP(src=C, dst=S, id=9, frag=100, proto=17) / Raw(b"o" * 16)
    pkts.append((T0 + 10, bytes(orphan)))
    flows, table = run(pkts, batch=2)
    assert len(flows) == 1
    assert flows[0].pk0 + flows[0].pk1 == len(frags)
    assert flows[0].by0 + flows[0].by1 == sum(len(bytes(p)) for p in frags)
    assert table.errors == {"orphan_fragment": 1}


def test_on_new_is_called_once_per_flow_with_counters() -> None:
    seen: list[int] = []
    table = FlowTable(on_new=lambda f: seen.append(f.packets))
    pkts = conversation(T0) + conversation(T0 + 100 * NS, sport=40001)
    table.process(decode_batch(RecordBatch.from_packets(
        [(ts, LINKTYPE_RAW, d) for ts, d in pkts])))
    assert len(seen) == 2 and all(n >= 1 for n in seen)


def test_expire_and_evict() -> None:
    table = FlowTable()
    pkts = [(T0, bytes(IP(src=C, dst=S) / UDP(sport=1, dport=2))),
            (T0 + 10 * NS, tcp(C, S, 3, 4, "A"))]
    table.process(decode_batch(RecordBatch.from_packets(
        [(ts, LINKTYPE_RAW, d) for ts, d in pkts])))
    assert len(table) == 2
    table.expire(T0 + 70 * NS)  # the UDP flow is idle for 70 s > 60 s
    assert len(table) == 1 and table.finished[0].proto == 17
    evicted = table.evict_oldest()
    assert evicted is not None and evicted.proto == 6 and len(table) == 0


# --------------------------------------------------------------------------
# Oracle: the documented semantics, one packet at a time, no batching tricks.

@dataclass
class RefFlow:
    first: int
    last: int
    packets: int
    nbytes: int
    fins: set[int]
    closing_at: int | None


def reference(packets: list[tuple[int, int, str, int]], to: FlowTimeouts) -> list[tuple[int, ...]]:
    """packets: (ts, direction 0/1, flags, ip bytes) of ONE tcp 5-tuple."""
    done: list[RefFlow] = []
    cur: RefFlow | None = None
    grace = int(to.tcp_close_grace * NS)
    for ts, d, flags, size in packets:
        syn = "S" in flags and "A" not in flags
        if cur is not None:
            ended = ts - cur.last > to.idle_ns(6)
            if not ended and cur.closing_at is not None:
                ended = syn or ts - cur.closing_at > grace
            if ended:
                done.append(cur)
                cur = None
        if cur is None:
            cur = RefFlow(ts, ts, 0, 0, set(), None)
        cur.packets += 1
        cur.nbytes += size
        cur.last = max(cur.last, ts)
        cur.first = min(cur.first, ts)
        if cur.closing_at is None:
            if "F" in flags:
                cur.fins.add(d)
            if "R" in flags or len(cur.fins) == 2:
                cur.closing_at = ts
    if cur is not None:
        done.append(cur)
    return sorted((f.first, f.last, f.packets, f.nbytes) for f in done)


FLAGS = st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA", "F"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 1), FLAGS, st.integers(0, 50)),
                min_size=1, max_size=40),
       st.integers(1, 12))
def test_batches_of_any_size_agree_with_the_one_packet_model(
        steps: list[tuple[int, int, str, int]], batch: int) -> None:
    to = FlowTimeouts(tcp=120, tcp_close_grace=5)
    t = T0
    packets: list[tuple[int, bytes]] = []
    model: list[tuple[int, int, str, int]] = []
    for gap, d, flags, size in steps:
        t += gap * NS // 2
        src, dst, sp, dp = (C, S, 40000, 443) if d == 0 else (S, C, 443, 40000)
        data = tcp(src, dst, sp, dp, flags, size)
        packets.append((t, data))
        model.append((t, d, flags, len(data)))
    flows, _ = run(packets, batch=batch, timeouts=to)
    got = sorted((f.first_ns, f.last_ns, f.packets, f.by0 + f.by1) for f in flows)
    assert got == reference(model, to)


def _summary(flows: list[Flow]) -> list[tuple[object, ...]]:
    return sorted((f.key, f.first_ns, f.last_ns, f.initiator, f.pk0, f.by0, f.pk1, f.by1,
                   f.icmp_type, f.icmp_code) for f in flows)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 400), st.integers(0, 1), FLAGS,
                          st.integers(0, 30), st.booleans()),
                min_size=1, max_size=60),
       st.integers(1, 12), st.integers(2, 5))
def test_partitioned_tables_together_hold_exactly_the_flows_of_one(
        steps: list[tuple[int, int, int, str, int, bool]], batch: int, count: int) -> None:
    """Tables fed the same packets, each keeping one hash partition, find the same flows."""
    t = T0
    packets: list[tuple[int, bytes]] = []
    for conn, gap, d, flags, size, fragmented in steps:
        t += gap * NS // 2
        src, dst, sp, dp = (C, S, 40000 + conn, 443) if d == 0 else (S, C, 443, 40000 + conn)
        if conn == 7:  # UDP, in IP fragments (later fragments belong by the first one's ports)
            pkt = IP(src=src, dst=dst, id=gap) / UDP(sport=sp, dport=dp) / Raw(b"u" * 60)
            for frag in (fragment(pkt, fragsize=32) if fragmented else [pkt]):
                packets.append((t, bytes(frag)))
            continue
        packets.append((t, tcp(src, dst, sp, dp, flags, size)))
    whole, table = run(packets, batch=batch)
    parts: list[Flow] = []
    errors: list[object] = []
    for index in range(count):
        ptable = FlowTable(partition=(index, count))
        for i in range(0, len(packets), batch):
            ptable.process(decode_batch(RecordBatch.from_packets(
                [(ts, LINKTYPE_RAW, data) for ts, data in packets[i:i + batch]])))
        ptable.flush()
        parts.extend(ptable.finished)
        errors.append(dict(ptable.errors))
    assert _summary(parts) == _summary(whole)
    # Table-level errors (orphan fragments) are seen by every partition alike.
    assert all(e == dict(table.errors) for e in errors)


def test_partition_must_be_an_index_below_the_count() -> None:
    with pytest.raises(ValueError, match="partition"):
        FlowTable(partition=(3, 3))
