"""The gateway's own networks, for ``internal_networks: auto``.

A policy that lists ``auto`` treats the networks this gateway serves as
internal in addition to the CIDRs it names.  :func:`local_prefixes` reads them
from the kernel over netlink; :class:`NetlinkWatcher` follows changes (an
interface gets an address, a VPN adds a route) so the daemon can re-resolve
the policy without a restart.

What counts as the gateway's own networks, precisely:

1. **Directly connected prefixes**: for every address on every interface
   except loopback, the network of that address (``192.0.2.1/24`` gives
   ``192.0.2.0/24``; IPv6 link-local addresses give ``fe80::/64``).  For a
   point-to-point address with a peer, the peer's prefix and the local
   address itself (as a host prefix).  This includes the uplink's prefix:
   hosts on the uplink segment (the provider's router, neighbours sharing a
   public /24) count as internal, and the gateway's own public address does
   too, which is what makes its NATed traffic internal-to-remote.
2. **Routed internal prefixes**: unicast routes of the main routing table
   whose destination lies inside private space (RFC 1918, 100.64.0.0/10,
   169.254.0.0/16, fc00::/7, fe80::/10: the default internal networks),
   i.e. networks reached through another internal router or a VPN.

Not included: default routes; routes to public destinations (a route to the
internet, or to a partner's public network, is not internal even when it has
a gateway); ``blackhole``/``unreachable``/``prohibit`` routes; routes of
other tables (policy routing, VRFs); anything on loopback interfaces.

Everything is read from the network namespace of the calling thread; the
daemon runs inside the namespace it monitors (``ip netns exec``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from ipaddress import ip_address, ip_network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from egressd.netset import DEFAULT_INTERNAL_NETWORKS, IPNetwork

log = logging.getLogger(__name__)

IFF_LOOPBACK = 0x8
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
WATCH_GROUPS = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
NETLINK_ROUTE = 0
CLONE_NEWNET = 0x4000_0000
NETNS_RUN_DIR = "/run/netns"

_PRIVATE: tuple[IPNetwork, ...] = tuple(ip_network(n) for n in DEFAULT_INTERNAL_NETWORKS)


def _is_private(net: IPNetwork) -> bool:
    return any(net.version == p.version and net.subnet_of(p)  # type: ignore[arg-type]
               for p in _PRIVATE)


def _sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


def _connected(addrs: Iterable[Any], loopback: set[int]) -> set[IPNetwork]:
    out: set[IPNetwork] = set()
    for msg in addrs:
        if msg["index"] in loopback:
            continue
        plen = int(msg["prefixlen"])
        address = msg.get_attr("IFA_ADDRESS")
        local = msg.get_attr("IFA_LOCAL")
        if address:
            net = ip_network(f"{address}/{plen}", strict=False)
            if not net.is_loopback:
                out.add(net)
        if local and local != address:
            host = ip_address(local)
            if not host.is_loopback:
                out.add(ip_network(host))
    return out


def _routed(routes: Iterable[Any]) -> set[IPNetwork]:
    out: set[IPNetwork] = set()
    for msg in routes:
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST or not msg["dst_len"]:
            continue
        dst = msg.get_attr("RTA_DST")
        if not dst:
            continue
        net = ip_network(f"{dst}/{msg['dst_len']}", strict=False)
        if _is_private(net):
            out.add(net)
    return out


def local_prefixes(ipr: IPRoute | None = None) -> list[IPNetwork]:
    """The gateway's own networks (see the module text for the rules), sorted, no duplicates.

    IPv4 first, then IPv6, each by address and prefix length.  Uses ``ipr``
    when given (a caller that asks often keeps one open), else opens and
    closes its own netlink socket.
    """
    if ipr is None:
        with IPRoute() as own:
            return local_prefixes(own)
    for attempt in range(5):
        try:
            loopback = {int(m["index"]) for m in ipr.get_links()
                        if int(m["flags"]) & IFF_LOOPBACK}
            found = _connected(ipr.get_addr(), loopback) | _routed(ipr.get_routes())
            return sorted(found, key=_sort_key)
        except NetlinkDumpInterrupted:
            # The tables changed during the dump; the next one is consistent.
            if attempt == 4:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only) into a network namespace, by name or path."""
    path = netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetlinkWatcher:
    """Calls ``on_change(prefixes)`` when the gateway's own networks change.

    A background thread listens to the kernel's address and route
    notifications (IPv4 and IPv6).  Changes usually come in bursts (an
    interface coming up adds addresses and several routes), so after an
    event it waits until ``debounce`` seconds pass without another one (at
    most ``5 * debounce`` after the first), then reads :func:`local_prefixes`
    again and calls ``on_change`` only if the list differs from the last one.
    ``on_change`` runs on the watcher's thread; an exception in it is logged
    and the watcher carries on.  If the kernel's notification queue overflows,
    the next read is a full one, so no change is lost.

    ``netns`` (a name under /run/netns, or a path such as
    ``/proc/PID/ns/net``) makes the watcher read that namespace instead of the
    calling thread's; the rest of the process stays where it is.
    """

    def __init__(self, on_change: Callable[[list[IPNetwork]], None], *,
                 netns: str | None = None, debounce: float = 0.2) -> None:
        self.on_change = on_change
        self.netns = netns
        self.debounce = debounce
        self._prefixes: list[IPNetwork] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._wake_r, self._wake_w = -1, -1

    @property
    def prefixes(self) -> list[IPNetwork]:
        """The current list (read when :meth:`start` returned, then after each change)."""
        with self._lock:
            return list(self._prefixes)

    def start(self) -> list[IPNetwork]:
        """Subscribe, read the current prefixes and return them; changes are reported after.

        Raises ``OSError`` when the namespace or the netlink socket cannot be opened.
        """
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._wake_r, self._wake_w = os.pipe()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="netlink-watcher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            self._close_pipe()
            raise self._error
        return self.prefixes

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its sockets; safe to call more than once."""
        thread = self._thread
        if thread is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread.join(timeout)
        self._thread = None
        self._close_pipe()

    def __enter__(self) -> NetlinkWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r, self._wake_w = -1, -1

    def _run(self) -> None:
        try:
            sock, ipr = self._open()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            try:
                first = local_prefixes(ipr)
            except BaseException as exc:
                self._error = exc
                return
            finally:
                if self._error is None:
                    with self._lock:
                        self._prefixes = first
                self._ready.set()
            self._loop(sock, ipr)
        except Exception:
            log.exception("watching the gateway's networks stopped")
        finally:
            ipr.close()
            sock.close()

    def _open(self) -> tuple[socket.socket, IPRoute]:
        if self.netns is not None:
            _enter_netns(self.netns)
        # Subscribe before the first read, so that no change falls between the
        # read and the subscription.
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, WATCH_GROUPS))
            sock.setblocking(False)
            return sock, IPRoute()
        except BaseException:
            sock.close()
            raise

    def _loop(self, sock: socket.socket, ipr: IPRoute) -> None:
        first_event: float | None = None
        due: float | None = None
        while True:
            timeout = None if due is None else max(0.0, due - time.monotonic())
            readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                return
            now = time.monotonic()
            if sock.fileno() in readable:
                self._drain(sock)
                first_event = first_event if first_event is not None else now
                due = min(now + self.debounce, first_event + 5 * self.debounce)
            if due is None or time.monotonic() < due:
                continue
            first_event = due = None
            try:
                current = local_prefixes(ipr)
            except Exception:
                log.exception("reading the gateway's networks failed; trying again in 1 s")
                due = time.monotonic() + 1.0
                continue
            with self._lock:
                changed = current != self._prefixes
                self._prefixes = current
            if changed:
                try:
                    self.on_change(list(current))
                except Exception:
                    log.exception("internal network change handler failed")

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Discard queued notifications: any of them means "read everything again"."""
        while True:
            try:
                sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # overflow: the full re-read covers it
                    raise
