"""systemd notifications over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from egressd.notify import Notifier


def receiver(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    return s


def test_ready_status_stopping_and_watchdog(tmp_path: Path) -> None:
    sock = receiver(tmp_path / "n.sock")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "2000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("3 packets")
    assert sock.recv(100) == b"READY=1\nSTATUS=3 packets"
    n.watchdog(now=100.0)
    n.watchdog(now=100.5)  # within half the timeout: no second ping
    n.watchdog(now=101.0)
    assert [sock.recv(100), sock.recv(100)] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    n.stopping()
    assert sock.recv(100) == b"STOPPING=1"
    n.close()


def test_abstract_socket_and_watchdog_for_another_pid() -> None:
    name = f"egressd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # the watchdog is for another process
    n.status("x")
    assert sock.recv(100) == b"STATUS=x"


def test_without_systemd_nothing_happens_and_a_full_socket_never_blocks(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready()
    sock = receiver(tmp_path / "full.sock")
    busy = Notifier({"NOTIFY_SOCKET": str(tmp_path / "full.sock")})
    for i in range(10_000):  # nobody reads: the socket fills up, sends must not block
        busy.status(f"status {i}")
    assert sock.recv(100).startswith(b"STATUS=")
