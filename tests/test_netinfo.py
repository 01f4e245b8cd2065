"""The gateway's own networks, read and watched inside test namespaces.

Routes to private prefixes are only installed (never used for traffic) in the
isolated namespaces; they are what ``internal_networks: auto`` must pick up.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest
from netns import Lab, call_in, executor, ip, require_netns, veth_pair, wait_for
from pyroute2 import IPRoute

from egressd.netinfo import NetlinkWatcher, local_prefixes
from egressd.netset import IPNetwork


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    with veth_pair() as made:
        yield made


def nets(*cidrs: str) -> list[IPNetwork]:
    return [ip_network(c) for c in cidrs]


BASE = nets("192.0.2.0/24", "2001:db8:0:1::/64", "fe80::/64")


def test_connected_and_routed_internal_prefixes(lab: Lab) -> None:
    ns = lab.a.ns
    assert call_in(ns, local_prefixes) == BASE
    for spec in ("default via 192.0.2.2",               # the internet: never internal
                 "198.51.100.0/24 via 192.0.2.2",       # public routed: not internal
                 "10.99.0.0/16 via 192.0.2.2",          # private behind another router
                 "100.64.8.0/24 dev veth-a",            # private, directly reachable
                 "default via 2001:db8:0:1::2",
                 "2001:db8:ff::/48 via 2001:db8:0:1::2",
                 "fd00:99::/48 via 2001:db8:0:1::2"):
        lab.route(ns, spec)
    ip("route", "add", "blackhole", "172.16.0.0/12", ns=ns)
    ip("route", "add", "10.77.0.0/16", "via", "192.0.2.2", "table", "100", ns=ns)
    ip("addr", "add", "203.0.113.1", "peer", "203.0.113.2/32", "dev", lab.a.ifname, ns=ns)
    ip("addr", "add", "198.18.0.1/15", "dev", "lo", ns=ns)  # loopback: ignored

    def read_both() -> tuple[list[IPNetwork], list[IPNetwork]]:
        with IPRoute() as ipr:
            return local_prefixes(ipr), local_prefixes()

    with_ipr, own = call_in(ns, read_both)
    assert with_ipr == own == nets(
        "10.99.0.0/16", "100.64.8.0/24", "192.0.2.0/24",
        "203.0.113.1/32", "203.0.113.2/32",
        "2001:db8:0:1::/64", "fd00:99::/48", "fe80::/64")


def test_namespaces_are_separate(lab: Lab) -> None:
    ip("addr", "add", "192.168.50.1/24", "dev", lab.b.ifname, ns=lab.b.ns)
    assert call_in(lab.a.ns, local_prefixes) == BASE
    assert ip_network("192.168.50.0/24") in call_in(lab.b.ns, local_prefixes)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[float, list[IPNetwork]]] = []
        self.lock = threading.Lock()

    def __call__(self, prefixes: list[IPNetwork]) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), prefixes))

    def after(self, n: int) -> list[tuple[float, list[IPNetwork]]]:
        with self.lock:
            return self.calls[n:]


def test_watcher_reports_each_change_within_a_second(lab: Lab) -> None:
    ns, dev = lab.a.ns, lab.a.ifname
    rec = Recorder()
    watcher = NetlinkWatcher(rec, netns=ns)
    assert watcher.start() == BASE
    try:
        steps: list[tuple[tuple[str, ...], list[IPNetwork]]] = [
            (("addr", "add", "10.20.30.1/24", "dev", dev), nets("10.20.30.0/24", *map(str, BASE))),
            (("route", "add", "10.99.0.0/16", "via", "192.0.2.2"),
             nets("10.20.30.0/24", "10.99.0.0/16", *map(str, BASE))),
            (("-6", "route", "add", "fd00:99::/48", "via", "2001:db8:0:1::2"),
             nets("10.20.30.0/24", "10.99.0.0/16", *map(str, BASE[:2]), "fd00:99::/48",
                  "fe80::/64")),
            (("addr", "del", "10.20.30.1/24", "dev", dev),
             nets("10.99.0.0/16", *map(str, BASE[:2]), "fd00:99::/48", "fe80::/64")),
            (("route", "del", "10.99.0.0/16"),
             nets(*map(str, BASE[:2]), "fd00:99::/48", "fe80::/64")),
        ]
        for args, expected in steps:
            n = len(rec.calls)
            t0 = time.monotonic()
            ip(*args, ns=ns)
            (t1, got), = wait_for(lambda n=n: rec.after(n), what=" ".join(args))  # type: ignore[misc]
            assert got == expected
            assert t1 - t0 < 1.0
            assert watcher.prefixes == expected

        # A change that leaves the list as it was (a public route) calls nobody:
        # the next call is the one for the following real change.
        n = len(rec.calls)
        ip("route", "add", "198.51.100.0/24", "via", "192.0.2.2", ns=ns)
        ip("addr", "add", "10.1.1.1/24", "dev", dev, ns=ns)
        wait_for(lambda: any(ip_network("10.1.1.0/24") in c[1] for c in rec.after(n)),
                 what="marker change")
        calls = rec.after(n)
        assert len(calls) == 1
        assert ip_network("198.51.100.0/24") not in calls[0][1]
        lists = [BASE] + [c[1] for c in rec.calls]
        assert all(x != y for x, y in itertools.pairwise(lists))
    finally:
        watcher.stop()
    watcher.stop()  # idempotent


def test_watcher_debounces_a_burst(lab: Lab) -> None:
    ns, dev = lab.a.ns, lab.a.ifname
    rec = Recorder()
    with NetlinkWatcher(rec, netns=ns, debounce=0.2):
        batch = "".join(f"route add 10.{i}.0.0/16 via 192.0.2.2\n" for i in range(50, 70))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
        ip("addr", "add", "10.200.0.1/24", "dev", dev, ns=ns)
        wait_for(lambda: rec.calls and ip_network("10.200.0.0/24") in rec.calls[-1][1])
    assert len(rec.calls) <= 2
    assert all(ip_network(f"10.{i}.0.0/16") in rec.calls[-1][1] for i in range(50, 70))


def test_watcher_survives_a_failing_callback(lab: Lab) -> None:
    seen: list[list[IPNetwork]] = []

    def flaky(prefixes: list[IPNetwork]) -> None:
        seen.append(prefixes)
        if len(seen) == 1:
            raise RuntimeError("boom")

    with NetlinkWatcher(flaky, netns=lab.a.ns, debounce=0.05):
        ip("addr", "add", "10.5.0.1/24", "dev", lab.a.ifname, ns=lab.a.ns)
        wait_for(lambda: len(seen) == 1)
        ip("addr", "add", "10.6.0.1/24", "dev", lab.a.ifname, ns=lab.a.ns)
        wait_for(lambda: len(seen) == 2)
    assert ip_network("10.6.0.0/24") in seen[1]


def test_watcher_in_the_calling_threads_namespace(lab: Lab) -> None:
    """Without ``netns`` the watcher reads the namespace its starter is in."""
    rec = Recorder()
    with executor(lab.a.ns) as pool:
        watcher = pool.submit(lambda: NetlinkWatcher(rec)).result()
        assert pool.submit(watcher.start).result() == BASE
    try:
        ip("addr", "add", "10.7.0.1/24", "dev", lab.a.ifname, ns=lab.a.ns)
        wait_for(lambda: rec.calls, what="change in the namespace")
        assert ip_network("10.7.0.0/24") in rec.calls[-1][1]
    finally:
        watcher.stop()


def test_missing_namespace_raises() -> None:
    require_netns()
    watcher = NetlinkWatcher(lambda p: None, netns="egt-no-such-namespace")
    with pytest.raises(FileNotFoundError):
        watcher.start()
    watcher.stop()


def test_under_ip_netns_exec(lab: Lab) -> None:
    """The production path: the whole process inside the namespace, plain IPRoute()."""
    script = textwrap.dedent("""
        import json, sys, threading
        from egressd.netinfo import NetlinkWatcher, local_prefixes
        changed = threading.Event()
        got = []
        w = NetlinkWatcher(lambda p: (got.append([str(n) for n in p]), changed.set()))
        start = [str(n) for n in w.start()]
        print(json.dumps(start), flush=True)
        sys.stdin.readline()
        ok = changed.wait(5)
        w.stop()
        print(json.dumps({"ok": ok, "got": got[-1] if got else None,
                          "direct": [str(n) for n in local_prefixes()]}))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(["ip", "netns", "exec", lab.a.ns, sys.executable, "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert json.loads(proc.stdout.readline()) == [str(n) for n in BASE]
        ip("addr", "add", "192.168.9.1/24", "dev", lab.a.ifname, ns=lab.a.ns)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = json.loads(proc.stdout.readline())
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out["ok"]
    assert out["got"] == out["direct"] == ["192.0.2.0/24", "192.168.9.0/24",
                                           "2001:db8:0:1::/64", "fe80::/64"]
