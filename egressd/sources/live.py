"""Live capture from network interfaces with Linux AF_PACKET sockets.

:class:`LiveSource` is what the daemon reads instead of a capture file: it
opens one packet socket per interface and yields
:class:`~egressd.model.RecordBatch` objects, so the rest of the pipeline is
the same as for an offline audit.

How it captures, and why:

* **No per-packet objects.**  Each frame is received with one ``recvmsg``
  straight into the batch buffer; nothing dissects it (the batch decoder does
  that later, for the whole batch at once with numpy).
* **Filtering happens in the kernel.**  ``bpf_filter`` (tcpdump syntax) is
  compiled to classic BPF and attached to the socket before it is bound, so
  frames the filter rejects never reach user space and never count as kernel
  drops.  The default ``ip or ip6`` (and no filter at all) are built in;
  any other expression is compiled by libpcap through scapy, which needs the
  libpcap shared library (``libpcap0.8`` on Debian/Ubuntu) but not tcpdump.
  Like in tcpdump, ``ip or ip6`` does not match frames that still carry an
  802.1Q tag (a trunk without tag offload): capture on the VLAN interfaces.
* **Both directions, each frame once.**  A packet socket sees what the
  interface receives and what it sends (``PACKET_OUTGOING``), which is what a
  gateway interface needs.  On loopback the kernel shows every frame twice (as
  sent and as received); the filter drops the sent copy there.
* **A receive ring, if asked for.**  With ``ring=True`` each socket gets a
  memory-mapped ``TPACKET_V3`` ring (:mod:`egressd.sources.ring`) of
  ``ring_bytes``: the kernel packs frames into large blocks, and a whole
  block becomes one batch for one wake-up instead of one ``recvmsg`` per
  frame.  A block is handed over when full or ``batch_timeout`` after its
  first frame.  If the ring cannot be set up (old kernel, no memory) the
  socket falls back to ``recvmsg`` with a warning.  The ring replaces the
  socket buffer (``buffer_bytes`` applies to the ``recvmsg`` path only) and
  is kernel memory held for as long as the interface is captured.
* **Kernel timestamps and real lengths.**  The time stamp of a record is the
  kernel's receive time (``SO_TIMESTAMPNS``, delivered with the frame by the
  same ``recvmsg``), so frames that waited in the socket buffer keep their
  own time; ``clock`` is only the fallback should a frame arrive without one.
  Frames longer than ``snaplen`` are cut in user space and ``MSG_TRUNC``
  gives their real length, which becomes the wire length.  On NICs that
  strip VLAN tags in hardware the frame arrives untagged, like in libpcap
  captures without tag re-insertion.
* **Link types.**  Ethernet and loopback interfaces (Linux gives loopback
  frames a zeroed Ethernet header) are captured as ``LINKTYPE_ETHERNET``;
  every other interface (tun/WireGuard, ip tunnels, PPP) is captured at the
  network layer as ``LINKTYPE_RAW``.  The interface type is read from the
  socket, so it is right inside network namespaces too.
* **Interfaces come and go.**  When an interface goes down or is deleted its
  socket reports an error: that socket is closed, :meth:`LiveSource.state`
  says ``down`` or ``missing``, and it is reopened every ``reopen_interval``
  seconds until the interface is up again (also when it was deleted and
  created again under the same name).  The other interfaces go on
  capturing.

Privileges: ``CAP_NET_RAW`` only.  Promiscuous mode is asked for per socket
with ``PACKET_ADD_MEMBERSHIP``/``PACKET_MR_PROMISC``, which needs no
``CAP_NET_ADMIN`` and ends by itself when the socket closes (the interface's
``promiscuity`` count shows it, not its ``PROMISC`` flag).  ``CAP_NET_ADMIN``
is used only if present, to get a socket buffer larger than
``net.core.rmem_max`` (without it, raise that sysctl for busy links).

A source captures in the network namespace of the thread that creates it and
iterates it (the daemon runs wholly inside one namespace, e.g. under
``ip netns exec``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from egressd.decode.linktypes import LINKTYPE_ETHERNET, LINKTYPE_RAW
from egressd.model import RecordBatch
from egressd.sources.ring import STATS_V3, RxRing

log = logging.getLogger(__name__)

DEFAULT_FILTER = "ip or ip6"

# Linux constants (linux/if_packet.h, linux/if_ether.h, asm-generic/socket.h,
# linux/sockios.h, linux/if_arp.h, linux/filter.h).
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
SIOCGIFFLAGS = 0x8913
SIOCGIFINDEX = 0x8933
IFF_UP = 0x1
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4

# Classic BPF opcodes used by the built-in programs.
_BPF_LD_W_ABS = 0x20
_BPF_LD_H_ABS = 0x28
_BPF_LD_B_ABS = 0x30
_BPF_ALU_AND_K = 0x54
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06

_TIMESPEC = struct.Struct("@ll")  # struct timespec: two C longs
_TS_DTYPE = np.dtype(f"=i{struct.calcsize('@l')}")
_NO_TS = bytes(_TIMESPEC.size)
_STATS = struct.Struct("=II")  # struct tpacket_stats
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)

_DOWN_ERRNOS = frozenset({errno.ENETDOWN, errno.ENODEV, errno.ENXIO, errno.EBADFD})
_DRAIN_PER_ROUND = 512
"""Frames read from one socket before the others get their turn."""
_BLOCKS_PER_ROUND = 4
"""Ring blocks taken from one socket before the others get their turn."""
_AVG_FRAME = 1600
"""Bytes per record the batch buffer is sized for (a full-size Ethernet frame)."""


class FilterError(ValueError):
    """The capture filter is not valid tcpdump syntax, or cannot be compiled here."""


Insn = tuple[int, int, int, int]
"""One classic BPF instruction: (code, jt, jf, k)."""


def _builtin_program(expr: str | None, linktype: int) -> list[Insn] | None:
    """Hand-written programs for "no filter" and the default filter (no libpcap needed)."""
    accept, reject = (_BPF_RET_K, 0, 0, 0xFFFF_FFFF), (_BPF_RET_K, 0, 0, 0)
    if expr is None or not expr.strip():
        return [accept]
    if " ".join(expr.lower().split()) != DEFAULT_FILTER:
        return None
    if linktype == LINKTYPE_ETHERNET:
        return [(_BPF_LD_H_ABS, 0, 0, 12),
                (_BPF_JEQ_K, 1, 0, 0x0800),
                (_BPF_JEQ_K, 0, 1, 0x86DD),
                accept, reject]
    return [(_BPF_LD_B_ABS, 0, 0, 0),
            (_BPF_ALU_AND_K, 0, 0, 0xF0),
            (_BPF_JEQ_K, 1, 0, 0x40),
            (_BPF_JEQ_K, 0, 1, 0x60),
            accept, reject]


def _libpcap_program(expr: str, linktype: int) -> list[Insn]:
    """Compile a tcpdump expression with libpcap (through scapy) for a link type."""
    try:
        from scapy.arch.common import compile_filter
        from scapy.error import Scapy_Exception
    except ImportError as exc:  # pragma: no cover - scapy is a dependency
        raise FilterError(f"cannot compile capture filter {expr!r}: {exc}") from exc
    try:
        prog = compile_filter(expr, linktype=linktype)
    except ImportError as exc:
        raise FilterError(f"cannot compile capture filter {expr!r}: the libpcap library is "
                          f"not installed (only {DEFAULT_FILTER!r} works without it)") from exc
    except Scapy_Exception as exc:
        raise FilterError(f"invalid capture filter {expr!r}: {exc}") from exc
    try:
        n = int(prog.bf_len)
        raw = ctypes.string_at(prog.bf_insns, 8 * n)
    finally:
        try:
            from scapy.arch.common import free_filter
            free_filter(prog)
        except ImportError:  # pragma: no cover - older scapy without free_filter
            pass
    return [struct.unpack_from("=HBBI", raw, 8 * i) for i in range(n)]


def compile_program(expr: str | None, linktype: int, *,
                    drop_outgoing: bool = False) -> list[Insn]:
    """The classic BPF program a capture socket gets for ``expr`` on ``linktype``.

    Accepting returns keep the whole frame (libpcap compiles for its own snap
    length; a frame cut by the filter would hide its real length from
    ``MSG_TRUNC``).  With ``drop_outgoing`` the program first rejects frames
    the host sends (loopback shows each frame as sent and as received).
    Raises :class:`FilterError` for an expression libpcap refuses.
    """
    prog = _builtin_program(expr, linktype)
    if prog is None:
        assert expr is not None
        prog = _libpcap_program(expr, linktype)
    prog = [(code, jt, jf, 0xFFFF_FFFF if code == _BPF_RET_K and k else k)
            for code, jt, jf, k in prog]
    if drop_outgoing:
        prog = [(_BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFF_FFFF),
                (_BPF_JEQ_K, 0, 1, PACKET_OUTGOING),
                (_BPF_RET_K, 0, 0, 0),
                *prog]
    return prog


def _attach(sock: socket.socket, prog: list[Insn]) -> None:
    insns = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _ifreq(sock: socket.socket, request: int, name: str, fmt: str) -> int:
    """One integer field of ``struct ifreq`` (``h``: ifr_flags, ``i``: ifr_ifindex)."""
    req = struct.pack("16s24x", name.encode())
    res = fcntl.ioctl(sock.fileno(), request, req)
    return int(struct.unpack_from("16s" + fmt, res)[1])


class _Capture:
    """The open socket of one interface and the batch it is filling.

    Per record only the wire length and the raw ``struct timespec`` are kept;
    offsets, captured lengths and nanosecond times are worked out for the
    whole batch in :meth:`take`.
    """

    __slots__ = ("buf", "linktype", "ring", "sock", "ts", "used", "view", "wirelens")

    def __init__(self, sock: socket.socket, linktype: int, capacity: int,
                 ring: RxRing | None = None) -> None:
        self.sock = sock
        self.linktype = linktype
        self.ring = ring
        self.buf = bytearray(0 if ring is not None else capacity)
        self.view = memoryview(self.buf)
        self.used = 0
        self.wirelens: list[int] = []
        self.ts = bytearray()

    def take(self, snaplen: int, clock: Callable[[], int]) -> RecordBatch:
        wirelens = np.array(self.wirelens, dtype=np.int64)
        caplens = np.minimum(wirelens, snaplen)
        offsets = np.zeros(len(wirelens), dtype=np.int64)
        np.cumsum(caplens[:-1], out=offsets[1:])
        spec = np.frombuffer(self.ts, dtype=_TS_DTYPE).reshape(-1, 2).astype(np.int64)
        ts = spec[:, 0] * 1_000_000_000 + spec[:, 1]
        missing = ts == 0
        if missing.any():
            ts[missing] = clock()
        batch = RecordBatch(
            np.frombuffer(bytes(self.view[: self.used]), dtype=np.uint8),
            offsets, caplens, wirelens, ts,
            np.full(len(wirelens), self.linktype, dtype=np.uint16),
        )
        self.used = 0
        self.wirelens = []
        self.ts = bytearray()
        return batch

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.sock.close()


@dataclass(slots=True)
class _Iface:
    name: str
    state: str = "missing"
    cap: _Capture | None = None
    retry_at: float = 0.0
    packets: int = 0
    drops: int = 0
    pending: list[RecordBatch] = field(default_factory=list)


def _empty_batch() -> RecordBatch:
    z = np.zeros(0, dtype=np.int64)
    return RecordBatch(np.zeros(0, dtype=np.uint8), z, z, z, z, np.zeros(0, dtype=np.uint16))


class LiveSource:
    """Captures from network interfaces; iterate :meth:`batches` in one thread.

    ``interfaces`` may name interfaces that do not exist yet (a VPN's tun
    device): they are opened when they appear.  ``bpf_filter`` is a tcpdump
    expression applied in the kernel (``None``: everything).  ``batch_packets``
    and ``batch_timeout`` bound how many records a batch holds and how long a
    record waits before it is handed on.  ``snaplen`` caps the bytes kept per
    frame; the wire length is kept regardless.  ``buffer_bytes`` is the socket
    receive buffer asked for per interface (it absorbs bursts while the
    pipeline is busy; the kernel drops what does not fit and counts it in
    :meth:`stats`).  ``reopen_interval`` is how often a failed interface is
    tried again.  ``clock`` (nanoseconds since the epoch) stamps a frame only
    if the kernel gave it no time stamp.  ``ring`` captures through a
    ``TPACKET_V3`` receive ring of ``ring_bytes`` per interface (falling back
    to ``recvmsg`` where it cannot be set up); its frames wait at most
    ``batch_timeout`` in the kernel.

    ``fanout`` joins each interface's socket to the ``PACKET_FANOUT`` group
    ``fanout + i`` (``i``: the interface's place in ``interfaces``) in hash
    mode, with IP fragments reassembled before the hash: sources in several
    processes with the same ``fanout`` share the traffic, each flow (both
    directions) going to one of them.

    Raises :class:`FilterError` for a filter that does not compile and
    ``PermissionError`` without ``CAP_NET_RAW``.
    """

    def __init__(self, interfaces: Sequence[str], *, bpf_filter: str | None = DEFAULT_FILTER,
                 promiscuous: bool = False, batch_packets: int = 4096,
                 batch_timeout: float = 0.05, clock: Callable[[], int] = time.time_ns,
                 snaplen: int = 262144, buffer_bytes: int = 8 << 20,
                 reopen_interval: float = 2.0, ring: bool = True,
                 ring_bytes: int = 32 << 20, fanout: int | None = None) -> None:
        names = list(dict.fromkeys(interfaces))
        if not names:
            raise ValueError("no interface to capture from")
        for name in names:
            if not name or len(name.encode()) > 15 or "/" in name or name.strip() != name:
                raise ValueError(f"not a valid interface name: {name!r}")
        if batch_packets < 1 or batch_timeout <= 0 or snaplen < 64 or reopen_interval <= 0:
            raise ValueError("batch_packets, batch_timeout, snaplen (>= 64) and "
                             "reopen_interval must be positive")
        if ring and ring_bytes < 2 * 4096:
            raise ValueError("ring_bytes must be at least two pages")
        self.bpf_filter = bpf_filter
        self.promiscuous = promiscuous
        self.batch_packets = batch_packets
        self.batch_timeout = batch_timeout
        self.clock = clock
        self.snaplen = min(snaplen, 0xFFFF_FFFF)
        self.buffer_bytes = buffer_bytes
        self.reopen_interval = reopen_interval
        self.ring = ring
        self.ring_bytes = ring_bytes
        self.fanout = fanout
        self._index = {name: i for i, name in enumerate(names)}
        self._capacity = batch_packets * _AVG_FRAME + self.snaplen
        self._programs: dict[tuple[int, bool], list[Insn]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # A filter error is a configuration error: report it now, not when an
        # interface first comes up.
        self._program(LINKTYPE_ETHERNET, False)
        self._ifaces = {name: _Iface(name, state="") for name in names}
        now = time.monotonic()
        for iface in self._ifaces.values():
            self._open(iface, now)

    # -- public -----------------------------------------------------------------------------

    def state(self) -> dict[str, str]:
        """``up`` (capturing), ``down`` (exists but not up) or ``missing``, per interface."""
        with self._lock:
            return {name: i.state for name, i in self._ifaces.items()}

    def stats(self) -> dict[str, tuple[int, int]]:
        """Kernel counters per interface since the source was created: (packets, drops).

        ``packets`` counts frames that passed the filter, including the
        dropped ones; ``drops`` those the kernel discarded because the socket
        buffer was full (libpcap's ``ps_recv``/``ps_drop``).  Totals survive
        reopening an interface; the caller turns them into counter increments.
        Safe to call from another thread while :meth:`batches` runs.
        """
        with self._lock:
            for iface in self._ifaces.values():
                self._read_stats(iface)
            return {name: (i.packets, i.drops) for name, i in self._ifaces.items()}

    def batches(self, stop: threading.Event) -> Iterator[tuple[str, RecordBatch]]:
        """Yield ``(interface, batch)`` until ``stop`` is set.

        A batch is handed on when it holds ``batch_packets`` records or at the
        latest ``batch_timeout`` after the previous hand-over.  When no packet
        arrived in a whole ``batch_timeout``, an empty batch (of the first
        interface) is yielded instead, so the caller's loop runs its timers
        and watchdog even on an idle link.  Once ``stop`` is set, the records
        already read are yielded before the iterator ends.
        """
        poller = select.poll()
        registered: dict[int, _Iface] = {}
        next_tick = time.monotonic() + self.batch_timeout
        yielded = False
        first = next(iter(self._ifaces))
        while not stop.is_set() and not self._closed:
            now = time.monotonic()
            self._sync_poller(poller, registered, now)
            if now >= next_tick:
                for iface in self._ifaces.values():
                    cap = iface.cap
                    if cap is not None and cap.wirelens:
                        iface.pending.append(cap.take(self.snaplen, self.clock))
                    while iface.pending:
                        yielded = True
                        yield iface.name, iface.pending.pop(0)
                if not yielded:
                    yield first, _empty_batch()
                yielded = False
                next_tick = time.monotonic() + self.batch_timeout
                continue
            events = poller.poll(max(0.0, (next_tick - now) * 1000.0))
            for fd, _ in events:
                ready = registered.get(fd)
                if ready is None or ready.cap is None:
                    continue
                self._drain(ready)
                while ready.pending:
                    yielded = True
                    yield ready.name, ready.pending.pop(0)
        for iface in self._ifaces.values():
            if iface.cap is not None and iface.cap.ring is not None:
                self._flush_ring(iface, iface.cap.ring)
            if iface.cap is not None and iface.cap.wirelens:
                iface.pending.append(iface.cap.take(self.snaplen, self.clock))
            while iface.pending:
                yield iface.name, iface.pending.pop(0)

    def close(self) -> None:
        """Close every socket (after :meth:`batches` has returned); idempotent."""
        with self._lock:
            self._closed = True
            for iface in self._ifaces.values():
                if iface.cap is not None:
                    self._read_stats(iface)
                    iface.cap.close()
                    iface.cap = None

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sockets ----------------------------------------------------------------------------

    def _program(self, linktype: int, drop_outgoing: bool) -> list[Insn]:
        key = (linktype, drop_outgoing)
        prog = self._programs.get(key)
        if prog is None:
            prog = compile_program(self.bpf_filter, linktype, drop_outgoing=drop_outgoing)
            self._programs[key] = prog
        return prog

    def _open(self, iface: _Iface, now: float) -> None:
        """Open the interface's socket; on failure set its state and when to retry."""
        old = iface.state
        try:
            cap = self._open_socket(iface.name)
        except PermissionError:
            raise
        except FilterError as exc:
            # The filter compiled for Ethernet but not for this raw-IP
            # interface (e.g. it names MAC addresses).
            iface.retry_at = now + self.reopen_interval
            with self._lock:
                iface.state = "down"
            if old != "down":
                log.error("cannot capture on %s: %s", iface.name, exc)
            return
        except OSError as exc:
            iface.retry_at = now + self.reopen_interval
            new = "missing" if exc.errno in (errno.ENODEV, errno.ENXIO) else "down"
            with self._lock:
                iface.state = new
            if new != old:
                log.warning("cannot capture on %s: %s (%s); retrying every %g s", iface.name,
                            new, exc.strerror or exc, self.reopen_interval)
            return
        with self._lock:
            iface.cap = cap
            iface.state = "up"
        log.info("capturing on %s (%s, %s)", iface.name,
                 "ethernet" if cap.linktype == LINKTYPE_ETHERNET else "raw ip",
                 "recvmsg" if cap.ring is None else
                 f"{cap.ring.blocks} x {cap.ring.block_size >> 10} KiB ring")

    def _open_socket(self, name: str) -> _Capture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        ring: RxRing | None = None
        try:
            # Protocol 0: bound to the interface but receiving nothing yet, so
            # no frame slips in before the filter is attached.
            sock.bind((name, 0))
            if not _ifreq(sock, SIOCGIFFLAGS, name, "h") & IFF_UP:
                raise OSError(errno.ENETDOWN, "interface is down")
            hatype = sock.getsockname()[3]
            if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                linktype = LINKTYPE_ETHERNET
            else:
                # Network-layer capture: the kernel strips whatever link
                # header the device has (none on tun/WireGuard).
                sock.close()
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
                sock.bind((name, 0))
                linktype = LINKTYPE_RAW
            if self.ring:
                try:
                    ring = RxRing(sock, self.ring_bytes,
                                  max(1, round(self.batch_timeout * 1000)))
                except OSError as exc:
                    log.warning("no receive ring on %s (%s): capturing with recvmsg",
                                name, exc.strerror or exc)
            prog = self._program(linktype, hatype == ARPHRD_LOOPBACK)
            if ring is not None:
                # The kernel copies no more than snaplen bytes into the ring
                # (it reports the real length regardless).
                prog = [(c, jt, jf, min(k, self.snaplen) if c == _BPF_RET_K else k)
                        for c, jt, jf, k in prog]
            _attach(sock, prog)
            if self.promiscuous:
                ifindex = _ifreq(sock, SIOCGIFINDEX, name, "i")
                mreq = struct.pack("=iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            if ring is None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.buffer_bytes)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((name, ETH_P_ALL))
            if self.fanout is not None:
                group = (self.fanout + self._index[name]) & 0xFFFF
                mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
                sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", group | mode << 16))
            sock.setblocking(False)
            # Counters start from this socket's first frame.
            sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATS_V3.size)
        except BaseException:
            if ring is not None:
                ring.close()
            sock.close()
            raise
        return _Capture(sock, linktype, self._capacity, ring)

    def _read_stats(self, iface: _Iface) -> None:
        """Add the socket's counters (reset by reading) to the totals; caller holds the lock."""
        if iface.cap is None:
            return
        try:
            # struct tpacket_stats, or tpacket_stats_v3 (one more field,
            # tp_freeze_q_cnt) on a ring socket: the kernel copies what it has.
            raw = iface.cap.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATS_V3.size)
        except OSError:
            return
        packets, drops = _STATS.unpack_from(raw)
        iface.packets += packets
        iface.drops += drops

    def _fail(self, iface: _Iface, exc: OSError) -> None:
        """The interface's socket reported an error: close it and retry later."""
        cap = iface.cap
        assert cap is not None
        if cap.ring is not None:
            self._flush_ring(iface, cap.ring)
        if cap.wirelens:
            iface.pending.append(cap.take(self.snaplen, self.clock))
        with self._lock:
            self._read_stats(iface)
            cap.close()
            iface.cap = None
        if exc.errno in _DOWN_ERRNOS:
            log.warning("capture on %s stopped: interface went down or away", iface.name)
        else:
            log.warning("capture on %s stopped: %s", iface.name, exc)
        # Try once at once: this tells "down" from "missing", and an interface
        # that only bounced is captured again without waiting.
        self._open(iface, time.monotonic())

    def _sync_poller(self, poller: select.poll, registered: dict[int, _Iface],
                     now: float) -> None:
        for iface in self._ifaces.values():
            if iface.cap is None and now >= iface.retry_at:
                self._open(iface, now)
        want = {i.cap.sock.fileno(): i for i in self._ifaces.values() if i.cap is not None}
        for fd in [fd for fd, i in registered.items() if want.get(fd) is not i]:
            poller.unregister(fd)
            del registered[fd]
        for fd, iface in want.items():
            if fd not in registered:
                poller.register(fd, select.POLLIN)
                registered[fd] = iface

    def _drain(self, iface: _Iface) -> None:
        """Read what the socket holds (up to a fair share) into the interface's batch."""
        cap = iface.cap
        assert cap is not None
        if cap.ring is not None:
            self._drain_ring(iface, cap, cap.ring)
            return
        recv = cap.sock.recvmsg_into
        snaplen, limit, view = self.snaplen, self.batch_packets, cap.view
        room = len(cap.buf) - snaplen
        wirelens, ts, used = cap.wirelens, cap.ts, cap.used
        try:
            for _ in range(_DRAIN_PER_ROUND):
                if len(wirelens) >= limit or used > room:
                    cap.used = used
                    iface.pending.append(cap.take(snaplen, self.clock))
                    wirelens, ts, used = cap.wirelens, cap.ts, 0
                try:
                    n, anc, _flags, _addr = recv([view[used:used + snaplen]], _ANC_SIZE,
                                                 socket.MSG_TRUNC)
                except BlockingIOError:
                    return
                except InterruptedError:
                    continue
                wirelens.append(n)
                # SO_TIMESTAMPNS is the only control message asked for.
                ts += anc[0][2] if anc else _NO_TS
                used += n if n < snaplen else snaplen
        except OSError as exc:
            cap.used = used
            self._fail(iface, exc)
            return
        finally:
            if iface.cap is cap:
                cap.used = used
        if len(wirelens) >= limit:
            iface.pending.append(cap.take(snaplen, self.clock))

    def _take_blocks(self, iface: _Iface, ring: RxRing, limit: int) -> int:
        """Turn up to ``limit`` ready blocks into pending batches; how many there were."""
        assert iface.cap is not None
        return ring.take_into(iface.pending, limit, iface.cap.linktype, self.snaplen,
                              self.batch_packets)

    def _drain_ring(self, iface: _Iface, cap: _Capture, ring: RxRing) -> None:
        """Take the blocks the kernel handed over; on a wake-up without one, check for errors."""
        if self._take_blocks(iface, ring, _BLOCKS_PER_ROUND):
            return
        # Frames never pass through recvmsg here, so an interface that went
        # down or away shows only as the socket's pending error.
        err = cap.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(iface, OSError(err, os.strerror(err)))

    def _flush_ring(self, iface: _Iface, ring: RxRing) -> None:
        """Take every block, waiting (bounded) for the kernel to retire one it is filling."""
        self._take_blocks(iface, ring, ring.blocks)
        deadline = time.monotonic() + 2 * ring.retire_ms / 1000 + 0.02
        while ring.filling() and time.monotonic() < deadline:
            time.sleep(0.002)
        self._take_blocks(iface, ring, ring.blocks)

