"""Network namespaces for tests that need real interfaces and real traffic.

:func:`veth_pair` creates two fresh namespaces joined by a veth pair with
documentation addresses and removes them afterwards, whatever happens in the
test.  Code runs inside a namespace on a thread of its own
(:func:`executor`, :func:`call_in`): ``setns`` switches only the calling
thread, and every socket a thread opens stays in the namespace the thread was
in, so the test process itself never leaves its own namespace and nothing
ever reaches the host's network.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and ``ip`` from iproute2; tests
skip with a message without them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface, ip_interface
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

CLONE_NEWNET = 0x4000_0000
NETNS_DIR = "/run/netns"
PREFIX = "egt-"
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def require_netns() -> None:
    """Skip the calling test unless namespaces can be made here."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` from iproute2")


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n ns] args…`` and return its output; raise with its stderr on failure."""
    cmd = ["ip", *(("-n", ns) if ns else ()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


def setns(name: str) -> None:
    """Move the calling thread into namespace ``name`` (a name under /run/netns or a path)."""
    path = name if "/" in name else f"{NETNS_DIR}/{name}"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def executor(name: str) -> Iterator[ThreadPoolExecutor]:
    """A one-thread executor whose thread lives in namespace ``name``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{name}",
                              initializer=setns, initargs=(name,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def call_in(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on a thread inside namespace ``name``."""
    with executor(name) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def ns_exec(name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``name`` (``ip netns exec``)."""
    return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True,
                          text=True, timeout=timeout, check=False)


def wait_for(pred: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``pred`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@dataclass(frozen=True)
class End:
    """One end of a veth pair: its namespace, interface and addresses."""

    ns: str
    ifname: str
    v4: IPv4Interface | None
    v6: IPv6Interface | None


@dataclass
class Lab:
    """Two namespaces ``a`` and ``b`` and the veth pairs between them."""

    a: End
    b: End
    namespaces: tuple[str, str]
    links: list[tuple[End, End]] = field(default_factory=list)

    def veth(self, a_if: str, b_if: str, *, a_v4: str | None = None, b_v4: str | None = None,
             a_v6: str | None = None, b_v6: str | None = None) -> tuple[End, End]:
        """Add (or re-add, after it was deleted) a veth pair between the two namespaces."""
        ns_a, ns_b = self.namespaces
        ip("link", "add", a_if, "netns", ns_a, "type", "veth", "peer", b_if, "netns", ns_b)
        ends = (_configure(ns_a, a_if, a_v4, a_v6), _configure(ns_b, b_if, b_v4, b_v6))
        self.links.append(ends)
        return ends

    def recreate(self) -> None:
        """Create the first pair again with the same names and addresses (after deleting it)."""
        a, b = self.a, self.b
        self.veth(a.ifname, b.ifname, a_v4=_s(a.v4), b_v4=_s(b.v4), a_v6=_s(a.v6),
                  b_v6=_s(b.v6))

    def route(self, ns: str, spec: str) -> None:
        """``ip route add spec`` in namespace ``ns`` (e.g. ``default via 192.0.2.2``)."""
        family = ("-6",) if ":" in spec else ()
        ip(*family, "route", "add", *spec.split(), ns=ns)


def _s(addr: IPv4Interface | IPv6Interface | None) -> str | None:
    return None if addr is None else addr.with_prefixlen


def _configure(ns: str, ifname: str, v4: str | None, v6: str | None) -> End:
    if v4:
        ip("addr", "add", v4, "dev", ifname, ns=ns)
    if v6:
        ip("-6", "addr", "add", v6, "dev", ifname, "nodad", ns=ns)
    ip("link", "set", ifname, "up", ns=ns)
    i4 = ip_interface(v4) if v4 else None
    i6 = ip_interface(v6) if v6 else None
    assert i4 is None or isinstance(i4, IPv4Interface)
    assert i6 is None or isinstance(i6, IPv6Interface)
    return End(ns, ifname, i4, i6)


def _remove_stale() -> None:
    """Remove namespaces left behind by test runs that were killed."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            if not name.startswith(PREFIX):
                continue
            pid = name[len(PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                ip("netns", "del", name, check=False)


@contextlib.contextmanager
def veth_pair(*, a_v4: str | None = "192.0.2.1/24", b_v4: str | None = "192.0.2.2/24",
              a_v6: str | None = "2001:db8:0:1::1/64", b_v6: str | None = "2001:db8:0:1::2/64",
              a_routes: tuple[str, ...] = (), b_routes: tuple[str, ...] = (),
              a_if: str = "veth-a", b_if: str = "veth-b") -> Iterator[Lab]:
    """Namespaces ``a`` and ``b`` joined by ``a_if``/``b_if``; both removed on exit.

    IPv6 addresses are added with ``nodad`` so they work at once.  Routes are
    ``ip route`` specs, e.g. ``198.51.100.0/24 via 192.0.2.2`` to make traffic
    to an "internet" test address go over the veth.  Loopback is up in both.
    """
    _remove_stale()
    n = next(_counter)
    ns_a, ns_b = f"{PREFIX}{os.getpid()}-{n}-a", f"{PREFIX}{os.getpid()}-{n}-b"
    made: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "set", "lo", "up", ns=ns)
        lab = Lab(End(ns_a, a_if, None, None), End(ns_b, b_if, None, None), (ns_a, ns_b))
        lab.a, lab.b = lab.veth(a_if, b_if, a_v4=a_v4, b_v4=b_v4, a_v6=a_v6, b_v6=b_v6)
        for spec in a_routes:
            lab.route(ns_a, spec)
        for spec in b_routes:
            lab.route(ns_b, spec)
        yield lab
    finally:
        for ns in made:
            ip("netns", "del", ns, check=False)
