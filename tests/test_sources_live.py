"""Live AF_PACKET capture on veth pairs and loopback inside test namespaces.

Real traffic only: sockets are created inside the test namespaces (a socket
stays in the namespace it was created in, whichever thread uses it), the
capture runs on a thread inside namespace ``a`` and the peer sends from
namespace ``b``.  Waits poll for what they expect; a marker datagram sent
last proves that nothing sent before it is still on its way.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import fcntl
import json
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
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from netns import Lab, executor, ip, require_netns, veth_pair, wait_for

from egressd.decode.batch import decode_batch
from egressd.decode.linktypes import LINKTYPE_ETHERNET, LINKTYPE_RAW
from egressd.model import PROTO_UDP, RecordBatch
from egressd.sources.live import DEFAULT_FILTER, FilterError, LiveSource, compile_program

HAVE_LIBPCAP = ctypes.util.find_library("pcap") is not None
needs_libpcap = pytest.mark.skipif(not HAVE_LIBPCAP, reason="needs the libpcap library "
                                   "(libpcap0.8) to compile filters other than the default")
ETH = 14
MARK_PORT = 9999
ND_TYPES = {133, 134, 135, 136, 137, 143}  # router/neighbour discovery, redirect, MLDv2


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    with veth_pair() as made:
        yield made


# -- capture on a thread inside a namespace -------------------------------------------------


class Running:
    """A :class:`LiveSource` iterating on its own thread; what it yielded so far."""

    def __init__(self, source: LiveSource) -> None:
        self.source = source
        self.records: list[tuple[str, RecordBatch]] = []
        self.yields: list[float] = []
        self._lock = threading.Lock()

    def loop(self, stop: threading.Event) -> None:
        for name, batch in self.source.batches(stop):
            with self._lock:
                self.yields.append(time.monotonic())
                self.records.append((name, batch))

    def rows(self, iface: str | None = None) -> list[Row]:
        with self._lock:
            records = list(self.records)
        return [r for name, b in records if iface in (None, name) for r in decode(name, b)]


@contextlib.contextmanager
def capturing(ns: str, ifaces: list[str], **kwargs: Any) -> Iterator[Running]:
    """Capture in namespace ``ns`` until the block ends (errors of the loop re-raised)."""
    stop = threading.Event()
    with executor(ns) as pool:
        source = pool.submit(LiveSource, ifaces, **kwargs).result()
        run = Running(source)
        future = pool.submit(run.loop, stop)
        try:
            yield run
        finally:
            stop.set()
            try:
                future.result(timeout=10)
            finally:
                source.close()


@dataclass(frozen=True)
class Row:
    iface: str
    err: int
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    ip_bytes: int
    tcp_flags: int
    caplen: int
    wirelen: int
    ts_ns: int
    linktype: int
    frame: bytes

    @property
    def key(self) -> tuple[int, str, int, str, int]:
        return self.proto, self.src, self.sport, self.dst, self.dport


def _addr(words: Any) -> str:
    a = IPv6Address((int(words[0]) << 64) | int(words[1]))
    return str(a.ipv4_mapped or a)


def decode(iface: str, batch: RecordBatch) -> list[Row]:
    d = decode_batch(batch)
    return [Row(iface, int(d.err[i]), int(d.proto[i]), _addr(d.src[i]), int(d.sport[i]),
                _addr(d.dst[i]), int(d.dport[i]), int(d.ip_bytes[i]), int(d.tcp_flags[i]),
                int(batch.caplens[i]),
                int(batch.wirelens[i]), int(batch.ts_ns[i]), int(batch.linktypes[i]),
                batch.packet(i)) for i in range(len(batch))]


# -- traffic, from sockets made inside the namespaces ---------------------------------------


def ns_socket(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace ``ns`` (usable from any thread)."""
    with executor(ns) as pool:
        sock = pool.submit(socket.socket, family, kind, proto).result()
    sock.settimeout(5)
    return sock


def fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp_sink(ns: str, addr: str, port: int) -> socket.socket:
    sock = ns_socket(ns, fam(addr), socket.SOCK_DGRAM)
    sock.bind((addr, port))
    return sock


def udp_send(ns: str, src: str, sport: int, dst: str, dport: int, count: int,
             size: int = 100) -> None:
    with ns_socket(ns, fam(src), socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
        for _ in range(count):
            sock.sendto(b"u" * size, (dst, dport))


def tcp_exchange(lab: Lab, server: str, client: str, port: int, cport: int,
                 up: int = 1000, down: int = 300) -> None:
    """Client in ``b`` sends ``up`` bytes to a server in ``a``, which answers ``down`` bytes."""
    with ns_socket(lab.a.ns, fam(server), socket.SOCK_STREAM) as srv, \
            ns_socket(lab.b.ns, fam(client), socket.SOCK_STREAM) as cli:
        srv.bind((server, port))
        srv.listen()
        cli.bind((client, cport))
        cli.connect((server, port))
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"c" * up)
            got = b""
            while len(got) < up:
                got += conn.recv(65536)
            conn.sendall(b"s" * down)
            got = b""
            while len(got) < down:
                got += cli.recv(65536)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(ns: str, dst: str) -> None:
    """One ICMP/ICMPv6 echo from namespace ``ns`` to ``dst``, waiting for the reply."""
    v6 = ":" in dst
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    req, rep = (128, 129) if v6 else (8, 0)
    with ns_socket(ns, fam(dst), socket.SOCK_RAW, proto) as sock:
        body = struct.pack("!HH", 0x4567, 1) + b"ping" * 8
        msg = struct.pack("!BBH", req, 0, 0) + body
        if not v6:  # the kernel fills in ICMPv6 checksums itself
            msg = struct.pack("!BBH", req, 0, _checksum(msg)) + body
        sock.sendto(msg, (dst, 0))
        while True:
            data = sock.recv(2048)
            icmp = data if v6 else data[(data[0] & 0xF) * 4:]
            if icmp[0] == rep and icmp[4:6] == b"\x45\x67":
                return


def send_arp(ns: str, ifname: str, spa: str, tpa: str) -> None:
    """A broadcast ARP request sent as a raw frame from ``ifname``."""
    mac = bytes.fromhex("020000000001")
    frame = (b"\xff" * 6 + mac + b"\x08\x06"
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(spa)
             + b"\0" * 6 + socket.inet_aton(tpa))
    with ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sock.send(frame)


def mark(lab: Lab, run: Running, tag: int) -> None:
    """Send a marker datagram b → a and wait until the capture has it."""
    a, b = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    udp_send(lab.b.ns, b, 30000 + tag, a, MARK_PORT, 1, size=10)
    wait_for(lambda: any(r.proto == PROTO_UDP and r.sport == 30000 + tag for r in run.rows()),
             what=f"marker {tag}")


def tcp_payload(row: Row) -> int:
    """TCP payload bytes of an Ethernet frame, from its own headers."""
    first = row.frame[ETH]
    ip_header = (first & 0xF) * 4 if first >> 4 == 4 else 40
    return row.ip_bytes - ip_header - (row.frame[ETH + ip_header + 12] >> 4) * 4


# -- tests ----------------------------------------------------------------------------------


@needs_libpcap
def test_builtin_default_filter_is_what_libpcap_compiles() -> None:
    from egressd.sources.live import _libpcap_program

    builtin = compile_program(DEFAULT_FILTER, LINKTYPE_ETHERNET)
    libpcap = [(c, jt, jf, 0xFFFF_FFFF if c == 0x06 and k else k)
               for c, jt, jf, k in _libpcap_program(DEFAULT_FILTER, LINKTYPE_ETHERNET)]
    assert builtin == libpcap


def test_filter_errors() -> None:
    if HAVE_LIBPCAP:
        with pytest.raises(FilterError, match="invalid capture filter"):
            compile_program("udp and and", LINKTYPE_ETHERNET)
    with pytest.raises(ValueError, match="not a valid interface name"):
        LiveSource(["this-name-is-too-long"])
    with pytest.raises(ValueError, match="no interface"):
        LiveSource([])


def test_two_interfaces_and_a_missing_one(lab: Lab) -> None:
    a4, b4 = str(lab.a.v4.ip), str(lab.b.v4.ip)  # type: ignore[union-attr]
    a2, b2 = lab.veth("veth-a2", "veth-b2", a_v4="198.51.100.1/24", b_v4="198.51.100.2/24")
    x4, y4 = str(a2.v4.ip), str(b2.v4.ip)  # type: ignore[union-attr]
    sinks = [udp_sink(lab.a.ns, a4, 6000), udp_sink(lab.a.ns, x4, 6000)]
    ifaces = [lab.a.ifname, a2.ifname, "absent0"]
    with capturing(lab.a.ns, ifaces, reopen_interval=0.1) as run:
        assert run.source.state() == {lab.a.ifname: "up", a2.ifname: "up", "absent0": "missing"}
        udp_send(lab.b.ns, b4, 40001, a4, 6000, 2)
        udp_send(lab.b.ns, y4, 40002, x4, 6000, 3)

        def by_iface() -> Counter[tuple[str, int]]:
            return Counter((r.iface, r.sport) for r in run.rows() if r.dport == 6000)

        wait_for(lambda: by_iface() == {(lab.a.ifname, 40001): 2, (a2.ifname, 40002): 3},
                 what="datagrams on both interfaces")
        stats = run.source.stats()
    for s in sinks:
        s.close()
    assert stats["absent0"] == (0, 0)
    assert stats[lab.a.ifname][0] >= 2 and stats[a2.ifname][0] >= 3


def _promiscuity(ns: str, ifname: str) -> int:
    return int(json.loads(ip("-d", "-j", "link", "show", ifname, ns=ns))[0]["promiscuity"])


def test_promiscuous_by_membership(lab: Lab) -> None:
    assert _promiscuity(lab.a.ns, lab.a.ifname) == 0
    with capturing(lab.a.ns, [lab.a.ifname], promiscuous=True):
        assert _promiscuity(lab.a.ns, lab.a.ifname) == 1
        flags = json.loads(ip("-j", "link", "show", lab.a.ifname, ns=lab.a.ns))[0]["flags"]
        assert "PROMISC" not in flags
    assert _promiscuity(lab.a.ns, lab.a.ifname) == 0


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001


@contextlib.contextmanager
def tun_device(ns: str, name: str) -> Iterator[int]:
    """A tun interface in ``ns``, up; yields the fd that writes what it receives."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    with executor(ns) as pool:  # the device is made in the namespace of the opener
        fd = pool.submit(os.open, "/dev/net/tun", os.O_RDWR).result()
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN))
        ip("link", "set", name, "up", ns=ns)
        yield fd
    finally:
        os.close(fd)


def test_tun_interface_is_raw_ip(lab: Lab) -> None:
    with tun_device(lab.a.ns, "egt-tun0") as fd:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.inet6 import IPv6

        v4 = bytes(IP(src="203.0.113.7", dst="198.51.100.9") / UDP(sport=1111, dport=53))
        v6 = bytes(IPv6(src="2001:db8:7::7", dst="2001:db8:9::9") / UDP(sport=2222, dport=53))
        with capturing(lab.a.ns, ["egt-tun0"]) as run:
            # Tun frames carry a 4-byte header: flags and the protocol.
            os.write(fd, b"\0\0\x08\x06" + bytes(28))  # not IP: the filter drops it
            os.write(fd, b"\0\0\x08\x00" + v4)
            os.write(fd, b"\0\0\x86\xdd" + v6)
            wait_for(lambda: len(run.rows()) >= 2, what="tun packets")
            os.write(fd, b"\0\0\x08\x00" + v4)
            wait_for(lambda: len(run.rows()) >= 3, what="tun marker")
            rows = run.rows()
    assert [r.key for r in rows] == [(17, "203.0.113.7", 1111, "198.51.100.9", 53),
                                     (17, "2001:db8:7::7", 2222, "2001:db8:9::9", 53),
                                     (17, "203.0.113.7", 1111, "198.51.100.9", 53)]
    assert {r.linktype for r in rows} == {LINKTYPE_RAW}
    assert [r.wirelen for r in rows] == [len(v4), len(v6), len(v4)]


@needs_libpcap
def test_filter_for_ethernet_only_leaves_raw_interfaces_down(lab: Lab) -> None:
    with tun_device(lab.a.ns, "egt-tun0"), \
            capturing(lab.a.ns, ["egt-tun0", lab.a.ifname], bpf_filter="ether broadcast or ip",
                      reopen_interval=0.05) as run:
        assert run.source.state() == {"egt-tun0": "down", lab.a.ifname: "up"}
        n = len(run.yields)
        wait_for(lambda: len(run.yields) > n + 2, what="loop alive")
        assert run.source.state() == {"egt-tun0": "down", lab.a.ifname: "up"}


def test_only_cap_net_raw_needed(lab: Lab) -> None:
    """The production path: a separate process under ``ip netns exec`` with CAP_NET_RAW only."""
    if subprocess.run(["setpriv", "--help"], capture_output=True, check=False).returncode:
        pytest.skip("needs setpriv (util-linux)")
    script = textwrap.dedent("""
        import json, socket, sys, threading
        from egressd.sources.live import LiveSource
        caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0]
        src = LiveSource(["lo"], promiscuous=True, buffer_bytes=1 << 20)
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
        print(json.dumps({"caps": caps.split()[1], "n": n, "stats": src.stats()["lo"]}))
        src.close()
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run(
        ["ip", "netns", "exec", lab.a.ns, "setpriv", "--inh-caps=-all",
         "--bounding-set=-all,+net_raw", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, env=env, check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert int(out["caps"], 16) == 1 << 13  # CAP_NET_RAW and nothing else
    assert out["n"] == 5 and out["stats"][0] >= 5


def test_address_helpers() -> None:
    assert _addr((0, 0xFFFF_0A00_0001)) == "10.0.0.1"
    assert str(ip_address(_addr((0x2001_0DB8_0000_0000, 1)))) == "2001:db8::1"
