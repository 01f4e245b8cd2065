"""Live capture through the TPACKET_V3 receive ring and through recvmsg, side by side.

The traffic checks of live capture (tuples, bytes, filters, loopback, snaplen,
batching, kernel counters, interfaces that go away) live here, run on both
paths; ``test_sources_live`` keeps the helpers and what does not depend on
the receive path.

Every check runs once with ``ring=True`` and once with ``ring=False`` on real
traffic between two test namespaces (see ``test_sources_live`` for the
helpers); with ``ring=True`` the test also makes sure the ring was really set
up, so a silent fall-back cannot pass for the ring.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from netns import Lab, executor, ip, require_netns, veth_pair, wait_for
from test_sources_live import (
    ETH,
    MARK_PORT,
    ND_TYPES,
    Running,
    capturing,
    mark,
    needs_libpcap,
    ns_socket,
    ping,
    send_arp,
    tcp_exchange,
    tcp_payload,
    udp_send,
    udp_sink,
)

from egressd.decode.linktypes import LINKTYPE_ETHERNET
from egressd.model import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from egressd.sources.live import LiveSource
from egressd.sources.ring import BLOCK_SIZE, parse_block, ring_geometry

MODES = pytest.mark.parametrize("ring", [True, False], ids=["ring", "recvmsg"])


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    with veth_pair() as made:
        yield made


def uses_ring(source: LiveSource) -> dict[str, bool]:
    """Per open interface: whether its socket captures through a ring."""
    return {name: i.cap.ring is not None
            for name, i in source._ifaces.items() if i.cap is not None}


@MODES
def test_tcp_udp_icmp_exact_tuples_counts_bytes_and_times(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    a6, b6 = str(lab.a.v6.ip), str(lab.b.v6.ip)  # type: ignore[union-attr]
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, a6, 6001),
             udp_sink(lab.b.ns, b4, 6002), udp_sink(lab.a.ns, a4, MARK_PORT)]
    t0 = time.time_ns()
    with capturing(lab.a.ns, [lab.a.ifname], ring=ring) as run:
        assert uses_ring(run.source) == {lab.a.ifname: ring}
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 3)
        udp_send(lab.b.ns, b6, 40002, a6, 6001, 4, size=333)
        udp_send(lab.a.ns, a4, 40003, b4, 6002, 2)  # outgoing on the captured interface
        tcp_exchange(lab, a4, b4, 8080, 40010)
        tcp_exchange(lab, a6, b6, 8081, 40011)
        ping(lab.b.ns, a4)
        ping(lab.b.ns, a6)
        mark(lab, run, 1)
        t1 = time.time_ns()
        rows = run.rows()
        stats = run.source.stats()
    for s in sinks:
        s.close()

    ours = {a4, b4, a6, b6}
    flows = [r for r in rows if r.err == 0 and {r.src, r.dst} <= ours
             and not (r.proto == PROTO_ICMPV6 and r.sport in ND_TYPES)]
    count = Counter(r.key for r in flows)
    udp = {k: v for k, v in count.items() if k[0] == PROTO_UDP and k[4] != MARK_PORT}
    assert udp == {(17, b4, 40001, a4, 6000): 3, (17, b6, 40002, a6, 6001): 4,
                   (17, a4, 40003, b4, 6002): 2}
    assert {k for k in count if k[0] == PROTO_TCP} == {
        (6, b4, 40010, a4, 8080), (6, a4, 8080, b4, 40010),
        (6, b6, 40011, a6, 8081), (6, a6, 8081, b6, 40011)}
    assert {k: v for k, v in count.items() if k[0] in (PROTO_ICMP, PROTO_ICMPV6)} == {
        (1, b4, 8, a4, 0): 1, (1, a4, 0, b4, 0): 1,
        (58, b6, 128, a6, 0): 1, (58, a6, 129, b6, 0): 1}
    # Bytes: UDP exactly (IP and wire), ICMP exactly, TCP payload per direction.
    for r in flows:
        if r.proto == PROTO_UDP and r.dport != MARK_PORT:
            payload = 333 if r.dport == 6001 else 100
            assert r.ip_bytes == (20 if ":" not in r.src else 40) + 8 + payload
            assert r.wirelen == r.caplen == ETH + r.ip_bytes
        if r.proto in (PROTO_ICMP, PROTO_ICMPV6):
            assert r.ip_bytes == (20 if r.proto == PROTO_ICMP else 40) + 4 + 36
    for server, client in ((a4, b4), (a6, b6)):
        up = sum(tcp_payload(r) for r in flows if r.proto == PROTO_TCP and r.src == client)
        down = sum(tcp_payload(r) for r in flows if r.proto == PROTO_TCP and r.src == server)
        assert (up, down) == (1000, 300)
    syn, syn_ack = 0x02, 0x12
    assert {(r.sport, r.tcp_flags) for r in flows if r.tcp_flags & syn} == {
        (40010, syn), (8080, syn_ack), (40011, syn), (8081, syn_ack)}
    for r in rows:
        assert r.linktype == LINKTYPE_ETHERNET
        assert r.caplen == r.wirelen == len(r.frame)
        assert t0 <= r.ts_ns <= t1  # the kernel's receive time, inside the test's window
        if r.err == 0:
            assert r.ip_bytes == r.wirelen - ETH
    packets, drops = stats[lab.a.ifname]
    assert packets >= len(rows) and drops == 0


@MODES
def test_default_filter_drops_arp_and_no_filter_keeps_it(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sink = udp_sink(lab.a.ns, a4, MARK_PORT)
    with capturing(lab.a.ns, [lab.a.ifname], ring=ring) as filtered, \
            capturing(lab.a.ns, [lab.a.ifname], bpf_filter=None, ring=ring) as everything:
        send_arp(lab.b.ns, lab.b.ifname, b4, a4)
        mark(lab, filtered, 1)
        mark(lab, everything, 1)
        arp = bytes.fromhex("0806")
        assert any(r.frame[12:14] == arp for r in everything.rows())
        assert all(r.frame[12:14] in (b"\x08\x00", b"\x86\xdd") for r in filtered.rows())
        stats = filtered.source.stats()[lab.a.ifname]
    sink.close()
    assert stats[0] >= 1 and stats[1] == 0


@needs_libpcap
@MODES
def test_custom_filter_udp_excludes_tcp_and_icmp(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sink = udp_sink(lab.a.ns, a4, MARK_PORT)
    with capturing(lab.a.ns, [lab.a.ifname], bpf_filter="udp", ring=ring) as run:
        assert uses_ring(run.source) == {lab.a.ifname: ring}
        tcp_exchange(lab, a4, b4, 8080, 40010)
        ping(lab.b.ns, a4)
        mark(lab, run, 1)
        rows = run.rows()
    sink.close()
    assert rows and {r.proto for r in rows} == {PROTO_UDP}


@MODES
def test_loopback_frames_are_seen_once(lab: Lab, ring: bool) -> None:
    sinks = [udp_sink(lab.a.ns, "127.0.0.1", 7000), udp_sink(lab.a.ns, "::1", 7001)]
    with capturing(lab.a.ns, ["lo"], ring=ring) as run:
        udp_send(lab.a.ns, "127.0.0.1", 41000, "127.0.0.1", 7000, 3)
        udp_send(lab.a.ns, "::1", 41001, "::1", 7001, 2)
        wait_for(lambda: sum(r.proto == PROTO_UDP for r in run.rows()) >= 5, what="loopback")
        time.sleep(0.15)  # a duplicate would have arrived by now
        rows = run.rows()
    for s in sinks:
        s.close()
    assert Counter(r.key for r in rows if r.proto == PROTO_UDP) == {
        (17, "127.0.0.1", 41000, "127.0.0.1", 7000): 3, (17, "::1", 41001, "::1", 7001): 2}
    assert {r.linktype for r in rows} == {LINKTYPE_ETHERNET}


@MODES
def test_snaplen_cuts_frames_but_keeps_wire_length(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, a4, MARK_PORT)]
    with capturing(lab.a.ns, [lab.a.ifname], snaplen=100, ring=ring) as run:
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 2, size=1400)
        mark(lab, run, 1)
        rows = [r for r in run.rows() if r.dport == 6000]
    for s in sinks:
        s.close()
    assert len(rows) == 2
    for r in rows:
        assert (r.caplen, len(r.frame), r.wirelen) == (100, 100, ETH + 20 + 8 + 1400)
        assert r.err == 0 and r.ip_bytes == 20 + 8 + 1400


@MODES
def test_many_small_packets_across_blocks_in_order(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    n = 6000
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, a4, MARK_PORT)]
    # 8 blocks of 128 KiB: the traffic fills several of them, and fits even
    # if the reader fell behind, so there is no excuse for a drop.
    with capturing(lab.a.ns, [lab.a.ifname], ring=ring, ring_bytes=1 << 20,
                   buffer_bytes=4 << 20, batch_packets=1000) as run:
        with ns_socket(lab.b.ns, socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.bind((b4, 40001))
            for seq in range(n):
                sender.sendto(struct.pack("!I", seq), (a4, 6000))
        mark(lab, run, 1)
        rows = [r for r in run.rows() if r.dport == 6000]
        stats = run.source.stats()[lab.a.ifname]
        batches = [b for _, b in run.records if len(b)]
    for s in sinks:
        s.close()
    assert [struct.unpack_from("!I", r.frame, ETH + 28)[0] for r in rows] == list(range(n))
    assert {r.wirelen for r in rows} == {ETH + 20 + 8 + 4}
    assert stats[1] == 0 and stats[0] >= n
    assert max(len(b) for b in batches) <= 1000
    if ring:
        blocks = {id(b.data) for b in batches}
        assert len(blocks) >= 3  # one buffer per ring block
        # A batch's records lie inside its block's copy.
        for b in batches:
            assert int((b.offsets + b.caplens).max()) <= len(b.data)


@MODES
def test_batch_size_limit_and_idle_ticks(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, a4, MARK_PORT)]
    with capturing(lab.a.ns, [lab.a.ifname], batch_packets=4, batch_timeout=0.05,
                   ring=ring) as run:
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 10)
        mark(lab, run, 1)
        k = len(run.yields)
        cpu0 = time.process_time()
        wait_for(lambda: len(run.yields) >= k + 10, what="idle ticks")
        cpu = time.process_time() - cpu0
        sizes = [len(b) for _, b in run.records]
        gaps = [y - x for x, y in zip(run.yields[k:], run.yields[k + 1:], strict=False)]
    for s in sinks:
        s.close()
    assert max(sizes) <= 4 and 0 in sizes
    assert sum(1 for r in run.rows() if r.dport == 6000) == 10
    assert max(gaps) < 0.5
    assert cpu < 0.4  # idle means waiting in poll, not spinning


@MODES
def test_kernel_statistics_count_drops(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sink = udp_sink(lab.a.ns, a4, 6000)
    # Room for a few dozen frames (4 ring blocks of 4 KiB, or a minimal socket
    # buffer) that nobody reads yet: the kernel must drop.
    small: dict[str, Any] = {"ring_bytes": 16 << 10} if ring else {"buffer_bytes": 1}
    with executor(lab.a.ns) as pool:
        source = pool.submit(LiveSource, [lab.a.ifname], ring=ring, **small).result()
        try:
            assert uses_ring(source) == {lab.a.ifname: ring}
            udp_send(lab.b.ns, b4, 40001, a4, 6000, 300, size=1000)
            wait_for(lambda: source.stats()[lab.a.ifname][0] >= 300, what="kernel counters")
            packets, drops = source.stats()[lab.a.ifname]
            assert drops > 100
            run = Running(source)
            stop = threading.Event()
            future = pool.submit(run.loop, stop)
            try:
                def settled() -> bool:
                    p, d = source.stats()[lab.a.ifname]
                    return sum(len(b) for _, b in run.records) == p - d
                wait_for(settled, what="captured == packets - drops")
            finally:
                stop.set()
                future.result(timeout=10)
        finally:
            source.close()
    sink.close()
    assert source.stats()[lab.a.ifname][0] >= packets


@MODES
def test_interface_down_up_deleted_recreated(lab: Lab, ring: bool) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    name = lab.a.ifname

    def got(sport: int) -> int:
        return sum(1 for r in run.rows() if r.sport == sport)

    sink = udp_sink(lab.a.ns, a4, 6000)
    with capturing(lab.a.ns, [name], reopen_interval=0.1, ring=ring) as run:
        assert uses_ring(run.source) == {name: ring}
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 2)
        wait_for(lambda: got(40001) == 2, what="first datagrams")

        ip("link", "set", name, "down", ns=lab.a.ns)
        wait_for(lambda: run.source.state()[name] == "down", what="state down")
        ip("link", "set", name, "up", ns=lab.a.ns)
        wait_for(lambda: run.source.state()[name] == "up", what="state up again")
        assert uses_ring(run.source) == {name: ring}
        udp_send(lab.b.ns, b4, 40002, a4, 6000, 3)
        wait_for(lambda: got(40002) == 3, what="datagrams after down/up")

        sink.close()
        ip("link", "del", name, ns=lab.a.ns)
        wait_for(lambda: run.source.state()[name] == "missing", what="state missing")
        ticks = len(run.yields)
        wait_for(lambda: len(run.yields) > ticks + 2, what="loop alive while missing")
        lab.recreate()
        sink = udp_sink(lab.a.ns, a4, 6000)
        wait_for(lambda: run.source.state()[name] == "up", what="state up after recreate")
        assert uses_ring(run.source) == {name: ring}
        udp_send(lab.b.ns, b4, 40003, a4, 6000, 4)
        wait_for(lambda: got(40003) == 4, what="datagrams after recreate")
        time.sleep(0.15)
        packets, drops = run.source.stats()[name]
    sink.close()
    assert packets >= 9 and drops == 0
    assert [got(p) for p in (40001, 40002, 40003)] == [2, 3, 4]


def test_ring_that_cannot_be_set_up_falls_back_to_recvmsg(
        lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, a4, MARK_PORT)]
    caplog.set_level(logging.WARNING, logger="egressd.sources.live")
    # More than the kernel accepts for one ring (block size x count > 4 GiB).
    with capturing(lab.a.ns, [lab.a.ifname], ring=True, ring_bytes=1 << 40) as run:
        assert uses_ring(run.source) == {lab.a.ifname: False}
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 3)
        mark(lab, run, 1)
        rows = [r for r in run.rows() if r.dport == 6000]
    for s in sinks:
        s.close()
    assert len(rows) == 3
    assert any("no receive ring" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="ring_bytes"):
        LiveSource(["lo"], ring=True, ring_bytes=4096)


def test_ring_geometry() -> None:
    assert ring_geometry(32 << 20) == (BLOCK_SIZE, 32)
    assert ring_geometry(1 << 20) == (128 << 10, 8)
    assert ring_geometry(16 << 10) == (4096, 4)
    assert ring_geometry(8192) == (4096, 2)


def _block(frames: list[tuple[int, int, int, int, bytes]], mac: int = 82) -> np.ndarray:
    """A retired block as the kernel lays it out: (sec, nsec, snaplen, len, bytes) frames."""
    first = 48
    out = bytearray(first)
    offs = []
    for sec, nsec, snap, wire, data in frames:
        offs.append(len(out))
        size = (mac + len(data) + 15) & ~15
        hdr = struct.pack("=IIIIIIHH", 0, sec, nsec, snap, wire, 1, mac, mac + 14)
        out += hdr + bytes(mac - len(hdr)) + data + bytes(size - mac - len(data))
    for a, b in itertools.pairwise(offs):
        struct.pack_into("=I", out, a, b - a)
    struct.pack_into("=6I", out, 0, 3, 0, 1, len(frames), first, len(out))
    return np.frombuffer(bytes(out), dtype=np.uint8).copy()


def test_parse_block_reads_headers() -> None:
    frames = [(1_700_000_000, 5, 60, 60, b"a" * 60), (1_700_000_001, 999_999_999, 20, 1514,
                                                       b"b" * 20), (0, 0, 1, 1, b"c")]
    data = _block(frames)
    batch = parse_block(data, 3, 48, LINKTYPE_ETHERNET, 50)
    assert batch.ts_ns.tolist() == [1_700_000_000_000_000_005, 1_700_000_001_999_999_999, 0]
    assert batch.caplens.tolist() == [50, 20, 1]  # the snaplen cuts the first
    assert batch.wirelens.tolist() == [60, 1514, 1]
    assert [batch.packet(i) for i in range(3)] == [b"a" * 50, b"b" * 20, b"c"]
    assert batch.linktypes.tolist() == [LINKTYPE_ETHERNET] * 3
    # A broken chain keeps the records before the break.
    assert len(parse_block(data, 5, 48, LINKTYPE_ETHERNET, 50)) == 3
    assert len(parse_block(data[:200], 3, 48, LINKTYPE_ETHERNET, 50)) == 1  # cut after one
    assert parse_block(data, 0, 48, LINKTYPE_ETHERNET, 50).offsets.tolist() == []


def test_ring_with_cap_net_raw_only(lab: Lab) -> None:
    """The production path: a process under ``ip netns exec`` with CAP_NET_RAW only."""
    if subprocess.run(["setpriv", "--help"], capture_output=True, check=False).returncode:
        pytest.skip("needs setpriv (util-linux)")
    script = textwrap.dedent("""
        import json, socket, threading
        from egressd.sources.live import LiveSource
        src = LiveSource(["lo"], promiscuous=True, ring=True)
        ring = src._ifaces["lo"].cap.ring is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \\
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("127.0.0.1", 7000))
            for _ in range(5):
                tx.sendto(b"x", ("127.0.0.1", 7000))
            stop, n = threading.Event(), 0
            for _, batch in src.batches(stop):
                n += len(batch)
                if n >= 5:
                    stop.set()
        print(json.dumps({"ring": ring, "n": n, "stats": src.stats()["lo"]}))
        src.close()
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run(
        ["ip", "netns", "exec", lab.a.ns, "setpriv", "--inh-caps=-all",
         "--bounding-set=-all,+net_raw", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, env=env, check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"ring": True, "n": 5, "stats": [out["stats"][0], 0]}
    assert out["stats"][0] >= 5


@MODES
def test_fanout_shares_flows_between_sources_whole_flows_each(lab: Lab, ring: bool) -> None:
    """Sources in one PACKET_FANOUT group split the traffic by flow, both directions together."""
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    sink_a = udp_sink(lab.a.ns, a4, 6100)
    sink_b = udp_sink(lab.b.ns, b4, 6101)
    group = 0x4000 + (os.getpid() & 0x0FFF)
    with capturing(lab.a.ns, [lab.a.ifname], ring=ring, fanout=group) as one, \
            capturing(lab.a.ns, [lab.a.ifname], ring=ring, fanout=group) as two:
        for port in range(40):
            udp_send(lab.b.ns, b4, 20000 + port, a4, 6100, 3)   # to a ...
            udp_send(lab.a.ns, a4, 6101, b4, 30000 + port, 2)   # ... and flows from a
            sink_a.sendto(b"r" * 10, (b4, 20000 + port))        # answers on the first flows

        def both() -> tuple[list[Any], list[Any]] | None:
            r1 = [r for r in one.rows() if r.proto == PROTO_UDP]
            r2 = [r for r in two.rows() if r.proto == PROTO_UDP]
            return (r1, r2) if len(r1) + len(r2) >= 40 * 6 else None

        r1, r2 = wait_for(both, timeout=10, what="every datagram, in one source or the other")
    sink_a.close()
    sink_b.close()
    assert len(r1) + len(r2) == 40 * 6  # nothing twice, nothing lost
    assert r1 and r2  # both members got a share

    def flows(rows: list[Any]) -> set[frozenset[tuple[str, int]]]:
        return {frozenset({(r.src, r.sport), (r.dst, r.dport)}) for r in rows}

    # A flow (both directions) is seen by one member only.
    assert not flows(r1) & flows(r2)
