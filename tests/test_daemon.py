"""The live daemon, for real: `egressd run` in a network namespace, capturing on a veth.

A client namespace (the office network, 10.20.0.0/24 and fd00:20::/64) talks
through a veth to the gateway namespace, where the remote "internet" servers
are addresses on the gateway's loopback and egressd captures on the veth.
Real TCP, UDP and ICMP (IPv4 and IPv6) cross the veth; the test reads what a
user would: systemd notifications, the JSON-lines alert log, /metrics over
HTTP and what an Alertmanager endpoint receives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mmdb_builder import build_mmdb
from netns import Lab, call_in, ip, require_netns, veth_pair, wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]

POLICY = """\
home_countries: [CN]
internal_networks: {internal}
zones:
  customer-data: [10.20.0.0/24, "fd00:20::/64"]
routes:
  - name: hk-backup
    approval: CAC-2025-0142
    from: [customer-data]
    to: {{countries: [HK]}}
    protocols: [udp]
    expires: 2099-01-01
{extra_routes}
interfaces: [veth-b]
geoip: {{country_db: {db}}}
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
alerts:
  jsonl: {jsonl}
  alertmanager: "http://127.0.0.1:{am_port}"
  suppress_seconds: 60
  spool_dir: {spool}
flows:
  idle_timeout_seconds: {{tcp: 30, udp: 5, other: 5}}
  active_timeout_seconds: 10
  max_flows: 1000
"""

US_ROUTE = """\
  - name: us-partner
    approval: SCC-9
    to: {countries: [US]}
    protocols: [tcp]
    ports: [8443]
"""


class Notify:
    """A NOTIFY_SOCKET like systemd's: a thread collects what the service sends.

    Read continuously, as systemd does: the service never blocks on this
    socket, so a datagram that finds the queue full is dropped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in list(self.messages)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the daemon; got {self.messages}")


class FakeAlertmanager:
    """Records POST /api/v2/alerts on a loopback port inside a namespace."""

    def __init__(self, ns: str, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.extend(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = call_in(ns, ThreadingHTTPServer, ("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(ns: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    out = {}
    for fam in text_string_to_metric_families(call_in(ns, get)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def serve_tcp(ns: str, addr: str, port: int) -> socket.socket:
    """A listener in ``ns`` that reads whatever a client sends and answers 'ok'."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    srv = call_in(ns, socket.socket, fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"ok")

    threading.Thread(target=loop, daemon=True).start()
    return srv


def tcp_upload(ns: str, addr: str, port: int, nbytes: int) -> None:
    def go() -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect((addr, port))
            c.sendall(b"u" * nbytes)
            c.shutdown(socket.SHUT_WR)
            c.recv(16)

    call_in(ns, go)


def udp_send(ns: str, addr: str, port: int, payload: bytes) -> None:
    def go() -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.sendto(payload, (addr, port))

    call_in(ns, go)


def ping(ns: str, addr: str) -> None:
    """One echo request (ICMP, or ICMPv6 whose checksum the kernel fills in)."""
    def go() -> None:
        if ":" in addr:
            with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
                s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x1234, 1) + b"egressd-test",
                         (addr, 0))
            return
        body = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"egressd-test"
        csum = sum(struct.unpack(f"!{len(body) // 2}H", body))
        csum = (csum >> 16) + (csum & 0xFFFF)
        csum = ~(csum + (csum >> 16)) & 0xFFFF
        pkt = body[:2] + struct.pack("!H", csum) + body[4:]
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(pkt, (addr, 0))

    call_in(ns, go)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    with veth_pair(a_v4="10.20.0.5/24", b_v4="10.20.0.1/24", a_v6="fd00:20::5/64",
                   b_v6="fd00:20::1/64",
                   a_routes=("203.0.113.0/24 via 10.20.0.1", "198.51.100.0/24 via 10.20.0.1",
                             "2001:db8:100::/48 via fd00:20::1")) as lab:
        ns_b = lab.b.ns
        ip("addr", "add", "203.0.113.9/32", "dev", "lo", ns=ns_b)
        ip("addr", "add", "203.0.113.10/32", "dev", "lo", ns=ns_b)
        ip("-6", "addr", "add", "2001:db8:100::9/128", "dev", "lo", ns=ns_b)
        yield lab


def build_geodb(path: Path) -> Path:
    """The test "internet": 203.0.113.0/24 US, 198.51.100.0/24 HK, 2001:db8:100::/48 DE."""
    return build_mmdb(path, "GeoLite2-Country", {
        "203.0.113.0/24": {"country": {"iso_code": "US"}, "registered_country": {"iso_code": "US"}},
        "198.51.100.0/24": {"country": {"iso_code": "HK"},
                            "registered_country": {"iso_code": "HK"}},
        "2001:db8:100::/48": {"country": {"iso_code": "DE"},
                              "registered_country": {"iso_code": "DE"}},
    })


@pytest.fixture
def geodb(tmp_path: Path) -> Path:
    return build_geodb(tmp_path / "country.mmdb")


class Daemon:
    def __init__(self, lab: Lab, tmp: Path, config: Path) -> None:
        self.notify = Notify(tmp / "notify.sock")
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), PYTHONUNBUFFERED="1")
        self.log = open(tmp / "daemon.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.b.ns, sys.executable, "-m", "egressd", "run",
             "--config", str(config)], cwd=ROOT, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.tmp = tmp

    def output(self) -> str:
        return (self.tmp / "daemon.log").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return int(self.proc.returncode)


def write_config(path: Path, tmp: Path, db: Path, mport: int, aport: int, *,
                 internal: str = '[10.20.0.0/16, "fd00::/8"]', extra_routes: str = "") -> None:
    path.write_text(POLICY.format(internal=internal, extra_routes=extra_routes, db=db,
                                  metrics_port=mport, am_port=aport, jsonl=tmp / "alerts.jsonl",
                                  spool=tmp / "spool"))


def alerts(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "alerts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_daemon_captures_alerts_serves_metrics_reloads_and_stops(
        lab: Lab, geodb: Path, tmp_path: Path) -> None:
    ns_a, ns_b = lab.a.ns, lab.b.ns
    mport, aport = free_port(), free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, aport)
    for addr, port in (("203.0.113.9", 443), ("203.0.113.10", 8443), ("2001:db8:100::9", 443)):
        serve_tcp(ns_b, addr, port)
    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        # Violations: TCP upload to the US twice (one alert, the second folded
        # into it) and ICMP to the same network; IPv6 to DE; approved UDP to HK.
        tcp_upload(ns_a, "203.0.113.9", 443, 5000)
        tcp_upload(ns_a, "203.0.113.9", 443, 3000)
        ping(ns_a, "203.0.113.9")
        tcp_upload(ns_a, "2001:db8:100::9", 443, 2000)
        udp_send(ns_a, "2001:db8:100::9", 5353, b"v6" * 50)
        ping(ns_a, "2001:db8:100::9")
        udp_send(ns_a, "198.51.100.7", 53, b"q" * 100)

        got = wait_for(lambda: alerts(tmp_path) if len(alerts(tmp_path)) >= 2 else None,
                       timeout=15, what="two JSON alerts")
        time.sleep(1.5)  # let a folded flow or a wrong extra alert show up
        got = alerts(tmp_path)
        by_country = {a["country"]: a for a in got}
        assert sorted(by_country) == ["DE", "US"], got
        us = by_country["US"]
        assert us["verdict"] == "violation" and us["reason"] == "no_route"
        assert us["zone"] == "customer-data" and us["src_ip"] == "10.20.0.5"
        assert us["dst_ip"] == "203.0.113.9" and us["interface"] == "veth-b"
        assert us["community_id"].startswith("1:") and us["sensor"]
        assert us["proto"] == "tcp" and us["bytes_out"] > 5000  # the first flow of the group
        assert by_country["DE"]["remote_ip"] == "2001:db8:100::9"

        def metrics_ready() -> dict[Any, float] | None:
            m = scrape(ns_b, mport)
            ok = value(m, "egressd_bytes_out_total", verdict="violation", country="US",
                       route="") >= 8000
            return m if ok else None

        m = wait_for(metrics_ready, timeout=10, what="bytes_out accounted")
        assert value(m, "egressd_packets_total", interface="veth-b") > 10
        assert value(m, "egressd_ip_bytes_total", interface="veth-b") > 10000
        assert value(m, "egressd_kernel_packets_total", interface="veth-b") > 10
        assert value(m, "egressd_flows_total", verdict="violation", country="US", route="") == 3
        assert value(m, "egressd_flows_total", verdict="approved", country="HK",
                     route="hk-backup") == 1
        # IPv6 TCP, UDP and ICMPv6 to DE: one alert group, three flows (the UDP
        # datagram may draw an ICMPv6 error back: that is part of its flow's group).
        assert value(m, "egressd_flows_total", verdict="violation", country="DE", route="") >= 3
        assert value(m, "egressd_violations_total", country="US", zone="customer-data",
                     reason="no_route") == 3
        assert value(m, "egressd_alerts_suppressed_total") >= 2
        assert value(m, "egressd_alerts_sent_total", sink="jsonl") == 2
        assert value(m, "egressd_alerts_spooled", sink="alertmanager") >= 2  # it is down
        assert value(m, "egressd_route_approval_expiry_timestamp_seconds", route="hk-backup",
                     approval="CAC-2025-0142") == 4070908800
        assert value(m, "egressd_config_last_reload_successful") == 1
        assert ("egressd_build_info", (("version", "0.1.0"),)) in m

        # Alertmanager comes up: the spooled alerts are delivered.
        am = FakeAlertmanager(ns_b, aport)
        try:
            wait_for(lambda: len({a["labels"]["country"] for a in am.received}) >= 2,
                     timeout=20, what="alerts delivered to Alertmanager")
            labels = next(a["labels"] for a in am.received if a["labels"]["country"] == "US")
            assert labels["alertname"] == "EgressViolation"
            assert labels["reason"] == "no_route" and labels["zone"] == "customer-data"

            # A bad config on SIGHUP: logged, the old one keeps running.
            good = config.read_text()
            config.write_text(good.replace("home_countries: [CN]", "home_countries: [UK]"))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: value(scrape(ns_b, mport),
                                   "egressd_config_last_reload_successful") == 0,
                     timeout=10, what="failed reload reported")
            assert d.proc.poll() is None
            assert "'UK'" in d.output()

            # A good config: the new route approves at once.
            write_config(config, tmp_path, geodb, mport, aport, extra_routes=US_ROUTE)
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: value(scrape(ns_b, mport),
                                   "egressd_config_last_reload_successful") == 1,
                     timeout=10, what="successful reload")
            tcp_upload(ns_a, "203.0.113.10", 8443, 1000)
            wait_for(lambda: value(scrape(ns_b, mport), "egressd_flows_total",
                                   verdict="approved", country="US", route="us-partner") == 1,
                     timeout=10, what="flow approved by the reloaded route")
            assert len(alerts(tmp_path)) == 2
        finally:
            am.stop()
    finally:
        code = d.stop()
        d.log.close()
    assert code == 0, d.output()
    d.notify.wait("STOPPING=1", timeout=2)
    flushed = re.search(r"(\d+) open flows accounted", d.output())
    assert flushed is not None and int(flushed.group(1)) >= 1, d.output()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-capture-processes"])
def test_auto_internal_networks_follow_netlink_changes(lab: Lab, geodb: Path, tmp_path: Path,
                                                       workers: int) -> None:
    ns_a, ns_b = lab.a.ns, lab.b.ns
    ip("addr", "add", "10.77.0.5/24", "dev", lab.a.ifname, ns=ns_a)
    mport = free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, free_port(), internal="[auto]")
    config.write_text(config.read_text() + f"capture_workers: {workers}\n")

    def udp_from(src: str) -> None:
        def go() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((src, 0))
                s.sendto(b"x" * 64, ("203.0.113.9", 9999))

        call_in(ns_a, go)

    def flows(verdict: str) -> float:
        return value(scrape(ns_b, mport), "egressd_flows_total", verdict=verdict, country="US",
                     route="")

    sink = call_in(ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("203.0.113.9", 9999))  # takes the datagrams, so no ICMP error comes back
    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        # The gateway's own prefix (10.20.0.0/24) is internal at start.
        udp_from("10.20.0.5")
        wait_for(lambda: flows("violation") == 1, timeout=10, what="own prefix internal")
        # 10.77.0.0/24 is not (yet) one of the gateway's networks: transit.
        udp_from("10.77.0.5")
        wait_for(lambda: flows("transit") == 1, timeout=10, what="unknown prefix is transit")
        # A route to it through an internal router makes it internal, no restart.
        ip("route", "add", "10.77.0.0/24", "via", "10.20.0.5", ns=ns_b)
        deadline = time.monotonic() + 10
        while flows("violation") < 2 and time.monotonic() < deadline:
            udp_from("10.77.0.5")  # a new source port each time: a new flow
            time.sleep(0.3)
        assert flows("violation") >= 2
        assert any(a["src_ip"] == "10.77.0.5" for a in alerts(tmp_path))
    finally:
        code = d.stop()
        d.log.close()
        sink.close()
    assert code == 0, d.output()


def test_flow_flood_stays_bounded_and_geoip_file_swap_is_picked_up(
        lab: Lab, geodb: Path, tmp_path: Path) -> None:
    ns_a, ns_b = lab.a.ns, lab.b.ns
    mport = free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, free_port())
    # Long idle timeouts: under load the daemon may lag seconds behind the
    # packets, and idle expiry must not end the flows before eviction does.
    config.write_text(config.read_text().replace("max_flows: 1000", "max_flows: 50")
                      .replace("udp: 5,", "udp: 300,"))
    sink = call_in(ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("203.0.113.9", 9999))

    ports = iter(range(20000, 30000))

    def flood(n: int) -> None:
        def go() -> None:
            for _ in range(n):  # a new source port, so a new flow, each time
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("10.20.0.5", next(ports)))
                    s.sendto(b"f", ("203.0.113.9", 9999))

        call_in(ns_a, go)

    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        flood(500)
        wait_for(lambda: value(scrape(ns_b, mport), "egressd_flows_total", verdict="violation",
                               country="US", route="") >= 500, timeout=15, what="500 flows decided")
        # Flows are counted when decided, evictions right after the batch: a
        # scrape may fall in between, so wait for the table to catch up.
        wait_for(lambda: value(scrape(ns_b, mport), "egressd_flow_table_evictions_total") >= 440,
                 timeout=5, what="evictions counted")
        wait_for(lambda: value(scrape(ns_b, mport), "egressd_active_flows") <= 50, timeout=5,
                 what="active flows within max_flows")
        # geoipupdate-style swap: a new file renamed into place; no signal.
        new = build_mmdb(tmp_path / "new.mmdb", "GeoLite2-Country", {
            "203.0.113.0/24": {"country": {"iso_code": "CN"},
                               "registered_country": {"iso_code": "CN"}}})
        os.replace(new, geodb)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            flood(1)
            if value(scrape(ns_b, mport), "egressd_flows_total", verdict="domestic",
                     country="CN", route="") >= 1:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the replaced GeoIP database was not used")
    finally:
        code = d.stop()
        d.log.close()
        sink.close()
    assert code == 0, d.output()
    assert "stopped after" in d.output()
