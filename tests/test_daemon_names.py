"""Server names in the live daemon: real TLS ClientHellos and DNS answers on a veth.

The client namespace sends OpenSSL's ClientHello (from Python's ``ssl``) to a
server on the gateway side, and the gateway side answers a DNS query; the
daemon must name the flows, approve the one a route lists by name, and put
the name into the alerts of the others, after holding TCP flows until their
ClientHello is read.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
from netns import Lab, call_in, wait_for
from test_daemon import (  # noqa: F401  (lab and geodb are fixtures)
    Daemon,
    alerts,
    free_port,
    geodb,
    lab,
    scrape,
    serve_tcp,
    tcp_upload,
    value,
    write_config,
)

NAME_ROUTE = """\
  - name: us-vendor
    approval: SCC-NAMES-1
    from: [customer-data]
    to:
      countries: [US]
      names: [backup.vendor.example]
    protocols: [tcp]
    ports: [443]
"""


def client_hello(name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    sock = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        sock.do_handshake()
    return out.read()


def tls_upload(ns: str, addr: str, port: int, name: str, nbytes: int) -> None:
    """A ClientHello for ``name``, then ``nbytes`` more, over a real TCP connection."""
    def go() -> None:
        with socket.create_connection((addr, port), timeout=5) as c:
            c.sendall(client_hello(name))
            time.sleep(0.05)
            c.sendall(b"u" * nbytes)
            c.shutdown(socket.SHUT_WR)
            c.recv(16)

    call_in(ns, go)


def dns_reply(ns: str, server: str, client: str, qname: str, address: str) -> None:
    """The gateway side's resolver answers ``qname`` → ``address`` to the client."""
    query = dns.message.make_query(qname, "A")
    resp = dns.message.make_response(query)
    resp.answer.append(dns.rrset.from_text(qname + ".", 300, "IN", "A", address))

    def go() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((server, 53))
            s.sendto(resp.to_wire(), (client, 53000))

    call_in(ns, go)


def test_daemon_names_flows_and_routes_by_name(lab: Lab, geodb: Path,  # noqa: F811
                                               tmp_path: Path) -> None:
    ns_a, ns_b = lab.a.ns, lab.b.ns
    mport, aport = free_port(), free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, aport, extra_routes=NAME_ROUTE)
    config.write_text(config.read_text().replace("suppress_seconds: 60", "suppress_seconds: 0")
                      + "names: {hold_seconds: 30}\n")
    serve_tcp(ns_b, "203.0.113.9", 443)
    serve_tcp(ns_b, "203.0.113.10", 443)
    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        # Approved by name: no alert.  A name the route does not list: alert with it.
        tls_upload(ns_a, "203.0.113.9", 443, "backup.vendor.example", 3000)
        tls_upload(ns_a, "203.0.113.9", 443, "Evil.Example", 2000)
        # The hold is 30 s: every flow below sends data at once, and is decided then —
        # by its ClientHello, or by data that is no ClientHello — not when the hold ends.
        got = wait_for(lambda: alerts(tmp_path) or None, timeout=15, what="a JSON alert")
        (evil,) = got
        assert (evil["server_name"], evil["name_source"]) == ("evil.example", "sni")
        assert (evil["reason"], evil["route"]) == ("name_not_allowed", "us-vendor")

        # A DNS answer names a plain (non-TLS) upload; a flow without any name is
        # decided as name_unknown once its first data shows no ClientHello is coming.
        dns_reply(ns_b, "203.0.113.10", "10.20.0.5", "files.other.example", "203.0.113.10")
        tcp_upload(ns_a, "203.0.113.10", 443, 1500)
        # (The client has no socket on the answer's port: its ICMP port-unreachable
        # back to the resolver is an export too, and alerts of its own.)
        got = wait_for(lambda: tcp_alerts(tmp_path) if len(tcp_alerts(tmp_path)) >= 2 else None,
                       timeout=15, what="the DNS-named alert")
        named = got[1]
        assert (named["server_name"], named["name_source"]) == ("files.other.example", "dns")
        assert named["reason"] == "name_not_allowed"
        serve_tcp(ns_b, "203.0.113.9", 8443)
        tcp_upload(ns_a, "203.0.113.9", 8443, 1500)
        got = wait_for(lambda: tcp_alerts(tmp_path) if len(tcp_alerts(tmp_path)) >= 3 else None,
                       timeout=15, what="the unnamed alert")
        unnamed = got[2]
        assert unnamed["dst_port"] == 8443
        assert (unnamed["server_name"], unnamed["name_source"]) == (None, None)
        assert (unnamed["reason"], unnamed["route"]) == ("name_unknown", "us-vendor")

        def counted() -> dict[Any, float] | None:
            s = scrape(ns_b, mport)
            done = value(s, "egressd_flows_total", verdict="approved", country="US",
                         route="us-vendor") >= 1 and value(s, "egressd_dns_map_entries") >= 1
            return s if done else None

        # A connection that ends without sending any data is decided when it ends
        # (after the close grace), not when its hold runs out.
        def connect_and_close() -> None:
            with socket.create_connection(("203.0.113.9", 443), timeout=5) as c:
                c.shutdown(socket.SHUT_WR)
                c.recv(16)

        call_in(ns_a, connect_and_close)
        got = wait_for(lambda: tcp_alerts(tmp_path) if len(tcp_alerts(tmp_path)) >= 4 else None,
                       timeout=20, what="the alert of the connection without data")
        assert (got[3]["reason"], got[3]["dst_ip"]) == ("name_unknown", "203.0.113.9")

        m = wait_for(counted, timeout=10, what="the approved flow and the names counted")
        assert value(m, "egressd_flows_total", verdict="violation", country="US",
                     route="us-vendor") == 6
        # (evil, the DNS-named and the unnamed upload, the empty connection, the DNS
        # answer's own UDP flow — counted, not alerted: the client sent nothing back on
        # it — and the ICMP error.)
        assert value(m, "egressd_server_names_total", source="sni") == 2
        assert value(m, "egressd_server_names_total", source="dns") >= 1
        assert value(m, "egressd_dns_responses_total") == 1
        assert value(m, "egressd_dns_map_entries") == 1
        # Names are never metric labels.
        text = "\n".join(str(k) for k in m)
        assert "evil.example" not in text and "backup.vendor.example" not in text
    finally:
        assert d.stop() == 0
    assert len(tcp_alerts(tmp_path)) == 4, d.output()


def tcp_alerts(tmp: Path) -> list[dict[str, object]]:
    return [a for a in alerts(tmp) if a["proto"] == "tcp"]


# -- the per-batch path without sockets: holds and names switched off -------------------

LOCAL = """\
home_countries: [CN]
internal_networks: [10.0.0.0/8]
interfaces: [lo]
geoip: {{country_db: {db}}}
alerts: {{jsonl: {jsonl}, suppress_seconds: 0, spool_dir: {spool}}}
names: {{enabled: {enabled}, hold_seconds: 2}}
"""
SEC = 1_000_000_000


def local_daemon(tmp: Path, geodb_path: Path, *, enabled: bool) -> Any:
    """The daemon's pipeline on ``process_batch`` (no sockets), on a clock the test sets."""
    from egressd.daemon import Daemon as LiveDaemon

    cfg = tmp / "local.yaml"
    cfg.write_text(LOCAL.format(db=geodb_path, jsonl=tmp / "alerts.jsonl", spool=tmp / "spool",
                                enabled="true" if enabled else "false"))
    d = LiveDaemon(str(cfg), serve_metrics=False, clock=lambda: now[0])
    d.rt = d._first_load()
    d.build_pipeline()
    return d


now = [1_772_352_000 * SEC]


def feed(d: Any, *packets: bytes) -> None:
    from egressd.decode.linktypes import LINKTYPE_RAW
    from egressd.model import RecordBatch

    batch = RecordBatch.from_packets([(now[0] + i, LINKTYPE_RAW, p)
                                      for i, p in enumerate(packets)])
    d.process_batch("lo", batch)


def test_hold_until_data_or_timeout_and_names_off(geodb: Path, tmp_path: Path) -> None:  # noqa: F811
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.packet import Raw

    answer = dns.message.make_response(dns.message.make_query("api.vendor.example", "A"))
    answer.answer.append(dns.rrset.from_text("api.vendor.example.", 300, "IN", "A",
                                             "203.0.113.9"))
    dns_pkt = bytes(IP(src="8.8.8.8", dst="10.0.0.5") / UDP(sport=53, dport=5353)
                    / Raw(answer.to_wire()))
    syn = bytes(IP(src="10.0.0.5", dst="203.0.113.9") / TCP(sport=40000, dport=443, flags="S"))
    syn2 = bytes(IP(src="10.0.0.5", dst="203.0.113.9") / TCP(sport=40001, dport=443, flags="S"))

    d = local_daemon(tmp_path, geodb, enabled=True)
    feed(d, dns_pkt, syn)
    feed(d, syn2)
    # Both TCP flows wait: no data yet on either.
    assert [a["dst_port"] for a in alerts(tmp_path) if a["proto"] == "tcp"] == []
    # Data that is no ClientHello decides the second at once, with its DNS name.
    feed(d, bytes(IP(src="10.0.0.5", dst="203.0.113.9") / TCP(sport=40001, dport=443,
                                                              flags="PA") / Raw(b"GET /")))
    got = [a for a in alerts(tmp_path) if a["proto"] == "tcp"]
    assert [(a["src_port"], a["server_name"], a["name_source"]) for a in got] == [
        (40001, "api.vendor.example", "dns")]
    # The first is decided when its hold runs out (the wall clock of the daemon).
    now[0] += 3 * SEC
    d._release_held(now[0])
    d.alerter.flush_lines()
    got = [a for a in alerts(tmp_path) if a["proto"] == "tcp"]
    assert sorted(a["src_port"] for a in got) == [40000, 40001]
    assert all(a["server_name"] == "api.vendor.example" for a in got)
    d.alerter.close(2)

    # names.enabled: false — no names, nothing held.
    other = tmp_path / "off"
    other.mkdir()
    d = local_daemon(other, geodb, enabled=False)
    assert d.names is None
    feed(d, dns_pkt, syn)
    got = [a for a in alerts(other) if a["proto"] == "tcp"]
    assert [(a["src_port"], a["server_name"]) for a in got] == [(40000, None)]
    d.alerter.close(2)
