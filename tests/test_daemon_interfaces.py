"""The live daemon when one of its interfaces goes down, comes back, is deleted and recreated.

Two veth pairs join the client and gateway namespaces; the daemon captures on
the gateway end of both.  US traffic (203.0.113.0/24) crosses the first pair,
``veth-b``, and HK traffic (198.51.100.0/24) the second, ``veth-d``.  While
``veth-d`` bounces and is replaced, the daemon must say so in its log, keep
counting on ``veth-b`` without reopening it, and count on the new ``veth-d``
as soon as it exists again, without a restart or a signal.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

from netns import Lab, call_in, ip, wait_for
from test_daemon import (
    Daemon,
    free_port,
    geodb,  # noqa: F401  (fixture)
    lab,  # noqa: F401  (fixture)
    scrape,
    udp_send,
    value,
    write_config,
)

SECOND = ("veth-c", "veth-d")
SECOND_V4 = ("10.30.0.5/24", "10.30.0.1/24")

STOPPED = "WARNING egressd.sources.live: capture on veth-d stopped: interface went down or away"
DOWN = "WARNING egressd.sources.live: cannot capture on veth-d: down (interface is down); " \
       "retrying every 2 s"
MISSING = "WARNING egressd.sources.live: cannot capture on veth-d: missing (No such device); " \
          "retrying every 2 s"
CAPTURING = re.compile(r"^INFO egressd\.sources\.live: capturing on (veth-[bd]) \(ethernet, ",
                       re.MULTILINE)


def add_second_pair(pairs: Lab) -> None:
    """The second veth pair, and HK traffic from the client routed over it."""
    pairs.veth(*SECOND, a_v4=SECOND_V4[0], b_v4=SECOND_V4[1])
    ip("route", "replace", "198.51.100.0/24", "via", SECOND_V4[1].split("/")[0],
       ns=pairs.a.ns)


def test_interface_down_up_deleted_recreated_while_the_other_keeps_counting(
        lab: Lab, geodb: Path, tmp_path: Path) -> None:  # noqa: F811
    ns_a, ns_b = lab.a.ns, lab.b.ns
    add_second_pair(lab)
    mport = free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, free_port(), internal='[10.0.0.0/8, "fd00::/8"]')
    text = config.read_text()
    assert "interfaces: [veth-b]\n" in text
    config.write_text(text.replace("interfaces: [veth-b]\n", "interfaces: [veth-b, veth-d]\n"))
    sink = call_in(ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("203.0.113.9", 9999))  # takes the US datagrams: no ICMP error comes back

    def metric(name: str, **labels: str) -> float:
        return value(scrape(ns_b, mport), name, **labels)

    def us_flows() -> float:
        return metric("egressd_flows_total", verdict="violation", country="US", route="")

    def hk_flows() -> float:
        # From 10.30.0.5, outside the customer-data zone the HK route is for.
        return metric("egressd_flows_total", verdict="violation", country="HK",
                      route="hk-backup")

    def counted(addr: str, flows: Callable[[], float], iface: str) -> None:
        """Send datagrams (each a new flow) until one is counted on ``iface``; check no loss."""
        flows_before = flows()
        packets_before = metric("egressd_packets_total", interface=iface)

        def sent_and_counted() -> bool:
            udp_send(ns_a, addr, 9999, b"x" * 64)
            return flows() > flows_before

        # Right after a link comes up the first datagrams may find no
        # neighbour yet: keep sending until the daemon counts one.
        wait_for(sent_and_counted, timeout=20, what=f"a flow to {addr} counted on {iface}")
        assert metric("egressd_packets_total", interface=iface) > packets_before

    def us_keeps_counting() -> None:
        """Three flows over veth-b, each counted: nothing there waits for veth-d."""
        for _ in range(3):
            before = us_flows()
            udp_send(ns_a, "203.0.113.9", 9999, b"u" * 64)
            wait_for(lambda b=before: us_flows() == b + 1, timeout=10,
                     what="a US flow counted on veth-b")

    def captures(iface: str) -> int:
        return sum(1 for m in CAPTURING.finditer(d.output()) if m.group(1) == iface)

    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        assert (captures("veth-b"), captures("veth-d")) == (1, 1), d.output()
        counted("203.0.113.9", us_flows, "veth-b")
        counted("198.51.100.9", hk_flows, "veth-d")

        # Down: reported, and veth-b goes on.
        ip("link", "set", "veth-d", "down", ns=ns_b)
        wait_for(lambda: DOWN in d.output(), timeout=10, what="veth-d reported down")
        assert STOPPED in d.output()
        us_keeps_counting()

        # Up again: captured again, without a restart.
        ip("link", "set", "veth-d", "up", ns=ns_b)
        wait_for(lambda: captures("veth-d") == 2, timeout=10, what="veth-d captured again")
        counted("198.51.100.10", hk_flows, "veth-d")

        # Deleted (with its peer): reported missing, and veth-b goes on.
        stopped = d.output().count(STOPPED)
        ip("link", "del", "veth-d", ns=ns_b)
        wait_for(lambda: MISSING in d.output(), timeout=10, what="veth-d reported missing")
        assert d.output().count(STOPPED) == stopped + 1
        us_keeps_counting()

        # Created again under the same name: captured and counted.
        add_second_pair(lab)
        wait_for(lambda: captures("veth-d") == 3, timeout=10, what="new veth-d captured")
        counted("198.51.100.11", hk_flows, "veth-d")
        us_keeps_counting()

        assert d.proc.poll() is None
        assert captures("veth-b") == 1  # never reopened
        assert value(scrape(ns_b, mport), "egressd_kernel_packets_total",
                     interface="veth-d") > 0
    finally:
        code = d.stop()
        d.log.close()
        sink.close()
    assert code == 0, d.output()
