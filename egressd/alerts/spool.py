"""The durable on-disk queue between the alerter and a network sink.

Alerts for Alertmanager must survive an unreachable receiver and a restart of
the daemon, and handing one over must never block the capture loop.  So
:meth:`Spool.append` only encodes the alert and queues it in memory; two
threads of the spool do the rest:

* the **writer** appends queued alerts as JSON lines to the newest *segment*
  file and ``fsync``\\ s after each batch (group commit: under load one
  ``fsync`` covers many alerts);
* the **sender** reads the oldest segment from the *committed offset*, hands
  batches to the sink, and after each success persists the new offset
  atomically (write a temporary file, ``fsync``, rename, ``fsync`` the
  directory).  Fully delivered segments are deleted.  When the sink fails, the
  same batch is retried with exponential backoff and jitter.

Directory layout (one directory per sink, mode 0700)::

    0000000000000001.jsonl  segment files, delivered in the order of their numbers
    committed.json          {"segment": N, "offset": BYTES}: everything before is delivered
    lock                    flock()ed by the one process (spool) that uses the directory

**Guarantees.**  Delivery is *at least once* and in order: an alert is only
forgotten after the sink accepted it.  A crash between the sink accepting a
batch and the offset being persisted makes that batch be sent again after the
restart (Alertmanager de-duplicates identical alerts by their labels);
without crashes every alert arrives exactly once.  Alerts queued in memory
but not yet written (milliseconds' worth) are lost if the process is killed;
:meth:`Spool.close` writes them out.  Every run writes to a new segment, so a
line cut short by a crash is never continued: the reader skips and counts such
a line (and any undecodable line) instead of failing.

**Bound.**  Undelivered alerts (on disk and queued) may take at most
``max_bytes``; past that, new alerts are dropped and counted, the spool never
blocks the caller.  Disk use stays below ``max_bytes`` plus one segment
(segments are a quarter of the bound, 64 KiB … 8 MiB).  When the directory
cannot be created or written (read-only, disk full, a file in the way), the
alerts that cannot be written are counted as dropped, a warning is logged (at
most once a minute), and the next batch tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from egressd.metrics import Metrics
from egressd.model import (
    Alert,
    FlowRecord,
    GeoInfo,
    Initiator,
    NameSource,
    Reason,
    Verdict,
    VerdictKind,
)

from .sinks import AlertRejected, LogThrottle, Sink, SinkCounters

log = logging.getLogger("egressd.alerts.spool")

FORMAT_VERSION = 1
COMMIT_FILE = "committed.json"
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".jsonl"
_SEGMENT_RE = re.compile(r"^(\d{16})\.jsonl$")
_CHUNK = 1 << 20
"""Bytes read at a time; also the longest line the reader accepts."""
MIN_SEGMENT_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpoolOptions:
    """Tuning of the spool threads (the defaults suit production; tests shorten them)."""

    batch_size: int = 100
    """Most alerts handed to the sink at once."""
    backoff_initial: float = 0.5
    """Seconds before the first retry; doubles per failure …"""
    backoff_max: float = 60.0
    """… up to this.  The actual wait is drawn between half of it and all of it."""
    segment_bytes: int | None = None
    """Size at which a new segment starts; None: a quarter of the bound, 64 KiB … 8 MiB."""
    idle_poll: float = 1.0
    """How often an idle sender looks for work without being woken (a safety net)."""
    lock_wait: float = 10.0
    """How long a new spool waits for an earlier one on the same directory to let go."""


# ---------------------------------------------------------------------------
# The line format
# ---------------------------------------------------------------------------


def encode_alert(alert: Alert) -> bytes:
    """One spool line (with its newline) holding every field of ``alert`` losslessly."""
    r = alert.record
    g = r.geo
    v = r.verdict
    obj = {
        "v": FORMAT_VERSION,
        "sensor": alert.sensor,
        "interface": alert.interface,
        "group": alert.group,
        "raised_ns": alert.raised_ns,
        "flow_count": alert.flow_count,
        "flow": {
            "community_id": r.community_id,
            "proto": r.proto,
            "src_ip": r.src_ip,
            "src_port": r.src_port,
            "dst_ip": r.dst_ip,
            "dst_port": r.dst_port,
            "initiator": r.initiator.value if r.initiator is not None else None,
            "remote_ip": r.remote_ip,
            "server_name": r.server_name,
            "name_source": r.name_source.value if r.name_source is not None else None,
            "geo": {"country": g.country, "registered_country": g.registered_country,
                    "asn": g.asn, "as_org": g.as_org},
            "zone": r.zone,
            "first_seen_ns": r.first_seen_ns,
            "last_seen_ns": r.last_seen_ns,
            "packets_out": r.packets_out,
            "bytes_out": r.bytes_out,
            "packets_in": r.packets_in,
            "bytes_in": r.bytes_in,
            "verdict": {"verdict": v.verdict.value, "route": v.route, "approval": v.approval,
                        "reason": v.reason.value if v.reason is not None else None},
        },
    }
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _get(obj: Any, key: str, kind: type, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise ValueError("expected an object")
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {kind.__name__}")
    return value


def decode_alert(line: bytes) -> Alert:
    """The alert of one spool line; :class:`ValueError` when it is not one."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if _get(obj, "v", int) != FORMAT_VERSION:
        raise ValueError("unknown spool format version")
    f = obj.get("flow")
    g = _get(f, "geo", dict)
    v = _get(f, "verdict", dict)
    initiator = _get(f, "initiator", str, True)
    reason = _get(v, "reason", str, True)
    source = _get(f, "name_source", str, True)
    record = FlowRecord(
        community_id=_get(f, "community_id", str),
        proto=_get(f, "proto", int),
        src_ip=_get(f, "src_ip", str),
        src_port=_get(f, "src_port", int, True),
        dst_ip=_get(f, "dst_ip", str),
        dst_port=_get(f, "dst_port", int, True),
        initiator=Initiator(initiator) if initiator is not None else None,
        remote_ip=_get(f, "remote_ip", str, True),
        geo=GeoInfo(_get(g, "country", str, True), _get(g, "registered_country", str, True),
                    _get(g, "asn", int, True), _get(g, "as_org", str, True)),
        zone=_get(f, "zone", str, True),
        first_seen_ns=_get(f, "first_seen_ns", int),
        last_seen_ns=_get(f, "last_seen_ns", int),
        packets_out=_get(f, "packets_out", int),
        bytes_out=_get(f, "bytes_out", int),
        packets_in=_get(f, "packets_in", int),
        bytes_in=_get(f, "bytes_in", int),
        verdict=Verdict(VerdictKind(_get(v, "verdict", str)), _get(v, "route", str, True),
                        _get(v, "approval", str, True),
                        Reason(reason) if reason is not None else None),
        server_name=_get(f, "server_name", str, True),
        name_source=NameSource(source) if source is not None else None,
    )
    return Alert(record, _get(obj, "sensor", str), _get(obj, "interface", str, True),
                 _get(obj, "group", str), _get(obj, "raised_ns", int),
                 _get(obj, "flow_count", int))


def backoff_delay(failures: int, options: SpoolOptions, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` failures in a row (1, 2, …).

    Exponential (``backoff_initial × 2^(failures-1)``, at most ``backoff_max``)
    with "equal jitter": a random point in the upper half, so that sensors that
    lost the same Alertmanager do not all come back at the same instant.
    """
    exp = min(max(failures, 1) - 1, 60)
    delay: float = min(options.backoff_max, options.backoff_initial * 2.0**exp)
    return delay / 2 + rng.uniform(0, delay / 2)


def _segment_name(seq: int) -> str:
    return f"{seq:016d}{SEGMENT_SUFFIX}"


class _Busy(Exception):
    """Another spool holds the directory's lock."""


@dataclass(frozen=True, slots=True)
class _Item:
    alert: Alert | None
    """None: the line was unreadable."""
    end: int
    """Offset just after the line."""


# ---------------------------------------------------------------------------
# The spool
# ---------------------------------------------------------------------------


class Spool:
    """A durable queue in ``directory`` feeding ``sink`` from a thread of its own."""

    def __init__(
        self,
        directory: str,
        sink: Sink,
        *,
        max_bytes: int,
        metrics: Metrics | None = None,
        options: SpoolOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = directory
        self.sink = sink
        self.max_bytes = max_bytes
        self.options = opts = options or SpoolOptions()
        self.segment_bytes = opts.segment_bytes or min(
            MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, max_bytes // 4))
        self.counters = SinkCounters(metrics, sink.name)
        self._rng = rng or random.Random()
        self._throttle = LogThrottle(log)
        self.dropped = 0
        """Alerts dropped: spool full, not writable, or closed."""
        self.corrupt = 0
        """Unreadable lines skipped (also counted in the dropped metric)."""
        self.rejected = 0
        """Alerts the receiver refused for good (counted in the failed metric), discarded."""

        self._lock = threading.Lock()
        self._wake_writer = threading.Condition(self._lock)
        self._wake_sender = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)
        # Shared state, guarded by _lock.
        self._queue: deque[bytes] = deque()
        self._count = 0
        self._bytes = 0
        self._segments: list[int] = []
        self._active: int | None = None
        self._durable = 0
        self._ends: dict[int, int] = {}
        self._opened = False
        self._open_tried = False
        self._closed = False
        self._stop_sender = False
        self._done = {"writer": False, "sender": False}
        self._read_seq: int | None = None
        self._read_off = 0
        # Writer-only state.
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._size = 0
        self._next_seq = 1
        # Sender-only state.
        self._rfd: int | None = None
        self._rfd_seq: int | None = None

        self.counters.spooled(0)
        self._writer = threading.Thread(target=self._run_writer, daemon=True,
                                        name=f"egressd-spool-writer-{sink.name}")
        self._sender = threading.Thread(target=self._run_sender, daemon=True,
                                        name=f"egressd-spool-sender-{sink.name}")
        self._writer.start()
        self._sender.start()

    # -- the caller's side --------------------------------------------------

    @property
    def waiting(self) -> int:
        """Alerts not yet delivered (queued or on disk)."""
        with self._lock:
            return self._count

    def append(self, alert: Alert) -> bool:
        """Queue ``alert``; False when it was dropped (spool full or closed).  Never blocks."""
        line = encode_alert(alert)
        with self._lock:
            if self._closed:
                reason = "the spool is closed"
            elif self._bytes + len(line) > self.max_bytes:
                reason = f"the spool is full ({self.max_bytes} bytes)"
            else:
                self._queue.append(line)
                self._count += 1
                self._bytes += len(line)
                self.counters.spooled(self._count)
                self._wake_writer.notify()
                return True
            self.dropped += 1
        self.counters.dropped()
        self._throttle.warning(f"drop:{reason}", "%s: alert dropped: %s", self.sink.name, reason)
        return False

    def wait_open(self, timeout: float) -> bool:
        """Wait for the first attempt to open the directory; True when it is in use.

        Until then, alerts left from an earlier run are not counted yet.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._open_tried:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._opened

    def flush(self, timeout: float) -> bool:
        """Wait until every alert is delivered; False when ``timeout`` seconds passed first.

        This includes alerts left from an earlier run (it first waits for the
        directory to be opened and counted).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while (not self._open_tried or self._count > 0) and not self._done["sender"]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return self._count == 0

    def close(self, timeout: float = 5.0) -> bool:
        """Write out queued alerts, stop both threads; True when they stopped in time.

        Undelivered alerts stay on disk for the next start.  A delivery in
        progress is not interrupted: if it outlasts ``timeout`` its thread
        finishes it (and records it) in the background.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            self._wake_writer.notify_all()
        self._writer.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._stop_sender = True
            self._wake_sender.notify_all()
            self._changed.notify_all()
        self._sender.join(max(0.0, deadline - time.monotonic()))
        self._release_if_done()
        return not (self._writer.is_alive() or self._sender.is_alive())

    def _finished(self, role: str) -> None:
        with self._lock:
            self._done[role] = True
            self._open_tried = True
            self._changed.notify_all()
        self._release_if_done()

    def _release_if_done(self) -> None:
        with self._lock:
            if not all(self._done.values()):
                return
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # -- the writer ---------------------------------------------------------

    def _run_writer(self) -> None:
        try:
            self._open(wait=True)
            with self._lock:
                self._open_tried = True
                self._changed.notify_all()
            while True:
                with self._lock:
                    while not self._queue and not self._closed:
                        self._wake_writer.wait()
                    if not self._queue:
                        return
                    batch = list(self._queue)
                    self._queue.clear()
                if not self._opened:
                    self._open(wait=False)
                self._write(batch)
        except Exception:  # pragma: no cover - a bug; keep the daemon alive
            log.exception("%s: spool writer failed", self.sink.name)
        finally:
            self._close_segment()
            self._finished("writer")

    def _open(self, *, wait: bool) -> None:
        """Take the lock, read the committed offset and count what is waiting."""
        deadline = time.monotonic() + self.options.lock_wait
        while True:
            try:
                self._open_once()
                return
            except _Busy:
                with self._lock:
                    if not wait or self._closed or time.monotonic() >= deadline:
                        break
                    self._wake_writer.wait(0.05)
            except OSError as exc:
                self._throttle.warning("open", "%s: cannot use spool directory %s: %s",
                                       self.sink.name, self.directory, exc)
                return
        self._throttle.warning("open", "%s: spool directory %s is in use by another spool",
                               self.sink.name, self.directory)

    def _open_once(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _Busy from None
        except OSError:
            os.close(fd)
            raise
        try:
            seqs = sorted(int(m[1]) for m in map(_SEGMENT_RE.match, os.listdir(self.directory))
                          if m)
            committed = self._read_commit()
            start_seq, start_off = committed if committed is not None else (0, 0)
            for seq in [s for s in seqs if s < start_seq]:
                with contextlib.suppress(OSError):
                    os.unlink(self._path(seq))
                seqs.remove(seq)
            count = size = 0
            for seq in seqs:
                off = start_off if seq == start_seq else 0
                n, b = self._measure(seq, off)
                count += n
                size += b
            read_off = start_off if seqs and seqs[0] == start_seq else 0
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._next_seq = max([*seqs, start_seq]) + 1
        with self._lock:
            self._segments = seqs
            self._read_seq = seqs[0] if seqs else None
            self._read_off = min(read_off, self._size_of(seqs[0])) if seqs else 0
            self._count += count
            self._bytes += size
            self._opened = True
            self.counters.spooled(self._count)
            self._wake_sender.notify_all()
        if count:
            log.info("%s: %d alerts waiting in spool %s", self.sink.name, count, self.directory)

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, _segment_name(seq))

    def _size_of(self, seq: int) -> int:
        try:
            return os.stat(self._path(seq)).st_size
        except OSError:
            return 0

    def _measure(self, seq: int, off: int) -> tuple[int, int]:
        """Complete lines and bytes of segment ``seq`` from ``off`` on."""
        lines = size = 0
        with open(self._path(seq), "rb") as f:
            f.seek(off)
            while chunk := f.read(_CHUNK):
                lines += chunk.count(b"\n")
                size += len(chunk)
        return lines, size

    def _read_commit(self) -> tuple[int, int] | None:
        path = os.path.join(self.directory, COMMIT_FILE)
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read(4096))
            seq, off = obj["segment"], obj["offset"]
            if isinstance(seq, int) and isinstance(off, int) and seq >= 0 and off >= 0:
                return seq, off
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("%s: %s is unreadable: delivering the spool from its start",
                    self.sink.name, path)
        return None

    def _write(self, batch: list[bytes]) -> None:
        data = b"".join(batch)
        try:
            if not self._opened:
                raise OSError("the spool directory is not usable")
            if self._fd is None or self._size >= self.segment_bytes:
                self._new_segment()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            self._abandon_tail()
            with self._lock:
                self._count -= len(batch)
                self._bytes -= len(data)
                self.dropped += len(batch)
                self.counters.spooled(self._count)
                self._changed.notify_all()
            self.counters.dropped(len(batch))
            self._throttle.warning("write", "%s: %d alerts dropped: cannot write the spool %s: %s",
                                   self.sink.name, len(batch), self.directory, exc)
            return
        self._size += len(data)
        with self._lock:
            self._durable = self._size
            self._wake_sender.notify()

    def _new_segment(self) -> None:
        self._close_segment()
        seq = self._next_seq
        fd = os.open(self._path(seq),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._next_seq = seq + 1
        self._fd, self._size = fd, 0
        with self._lock:
            self._segments.append(seq)
            self._active, self._durable = seq, 0
            if self._read_seq is None:
                self._read_seq, self._read_off = seq, 0
        _fsync_dir(self.directory)  # the new name must survive a crash too

    def _abandon_tail(self) -> None:
        """After a failed write: cut off a partial line, or give the segment up."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._close_segment()

    def _close_segment(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(fd)
        with self._lock:
            if self._active is not None:
                self._ends[self._active] = self._size
            self._active = None
            self._wake_sender.notify()

    # -- the sender ---------------------------------------------------------

    def _run_sender(self) -> None:
        failures = 0
        try:
            with self._lock:
                while not self._opened and not self._stop_sender:
                    self._wake_sender.wait(self.options.idle_poll)
            while not self._stop_sender:
                try:
                    items = self._next_batch()
                except OSError as exc:
                    self._throttle.warning("read", "%s: cannot read the spool %s: %s",
                                           self.sink.name, self.directory, exc)
                    failures += 1
                    self._backoff(failures)
                    continue
                if not items:
                    with self._lock:
                        if not self._stop_sender and not self._has_new_data():
                            self._wake_sender.wait(self.options.idle_poll)
                    continue
                if self._deliver(items):
                    failures = 0
                    continue
                failures += 1
                self._backoff(failures)
        except Exception:  # pragma: no cover - a bug; keep the daemon alive
            log.exception("%s: spool sender failed", self.sink.name)
        finally:
            if self._rfd is not None:
                os.close(self._rfd)
                self._rfd = None
            self._finished("sender")

    def _has_new_data(self) -> bool:
        """Whether the sender would find something to read (called under the lock)."""
        seq = self._read_seq
        if seq is None:
            return bool(self._segments)
        if seq == self._active:
            return self._durable > self._read_off
        return True

    def _backoff(self, failures: int) -> None:
        deadline = time.monotonic() + backoff_delay(failures, self.options, self._rng)
        with self._lock:
            while not self._stop_sender:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake_sender.wait(left)

    def _reader(self, seq: int) -> int | None:
        """A descriptor to read segment ``seq``; None when the file is gone."""
        if self._rfd_seq != seq or self._rfd is None:
            if self._rfd is not None:
                os.close(self._rfd)
            self._rfd = self._rfd_seq = None
            try:
                fd = os.open(self._path(seq), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            self._rfd, self._rfd_seq = fd, seq
        return self._rfd

    def _next_batch(self) -> list[_Item]:
        """The next lines to deliver (from one segment), finishing used-up segments."""
        while True:
            with self._lock:
                seq, off = self._read_seq, self._read_off
                if seq is None:
                    if not self._segments:
                        return []
                    seq, off = self._read_seq, self._read_off = self._segments[0], 0
                sealed = seq != self._active
                limit = self._ends.get(seq) if sealed else self._durable
            fd = self._reader(seq)
            if fd is None:  # removed behind our back: nothing to read there
                self._finish_segment(seq)
                continue
            want = _CHUNK if limit is None else min(_CHUNK, limit - off)
            data = os.pread(fd, want, off) if want > 0 else b""
            if not data:
                if not sealed:
                    return []
                self._finish_segment(seq)
                continue
            end = data.rfind(b"\n")
            if end < 0:
                at_eof = len(data) < want or (limit is not None and off + len(data) >= limit)
                if (sealed and at_eof) or len(data) >= _CHUNK:
                    self._skip(seq, off + len(data), "a line cut short (crash while writing?)")
                    continue
                return []
            items: list[_Item] = []
            pos = off
            for line in data[:end].split(b"\n")[: self.options.batch_size]:
                pos += len(line) + 1
                try:
                    items.append(_Item(decode_alert(line), pos))
                except ValueError:
                    items.append(_Item(None, pos))
            return items

    def _skip(self, seq: int, end: int, what: str) -> None:
        """Skip the unreadable bytes up to ``end`` (not a complete line: not counted waiting)."""
        with self._lock:
            self._bytes -= end - self._read_off
            self._read_off = end
            self.corrupt += 1
            self.dropped += 1
            self._changed.notify_all()
        self.counters.dropped()
        log.warning("%s: skipped %s in spool segment %s", self.sink.name, what,
                    _segment_name(seq))
        self._commit(seq, end)

    def _finish_segment(self, seq: int) -> None:
        if self._rfd_seq == seq and self._rfd is not None:
            os.close(self._rfd)
            self._rfd = self._rfd_seq = None
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._throttle.warning("unlink", "%s: cannot remove delivered spool segment: %s",
                                   self.sink.name, exc)
        with self._lock:
            if seq in self._segments:
                self._segments.remove(seq)
            self._ends.pop(seq, None)
            self._read_seq = self._segments[0] if self._segments else None
            self._read_off = 0
        self._commit(seq + 1, 0)

    def _deliver(self, items: list[_Item]) -> bool:
        """Hand ``items`` to the sink; True when they are done with (delivered or discarded)."""
        alerts = [i.alert for i in items if i.alert is not None]
        try:
            if alerts:
                self.sink.deliver(alerts)
        except AlertRejected:
            if len(alerts) > 1:
                return self._deliver_each(items)
            self._rejected(alerts[0])
        except Exception as exc:
            self.counters.failed()
            self._throttle.warning("deliver", "%s: delivery failed, will retry: %s",
                                   self.sink.name, exc)
            return False
        else:
            self.counters.sent(len(alerts))
        self._advance(items)
        return True

    def _deliver_each(self, items: list[_Item]) -> bool:
        """One alert at a time, to discard only the ones the receiver rejects."""
        for item in items:
            if item.alert is not None:
                try:
                    self.sink.deliver([item.alert])
                except AlertRejected:
                    self._rejected(item.alert)
                except Exception as exc:
                    self.counters.failed()
                    self._throttle.warning("deliver", "%s: delivery failed, will retry: %s",
                                           self.sink.name, exc)
                    return False
                else:
                    self.counters.sent()
            self._advance([item])
        return True

    def _rejected(self, alert: Alert) -> None:
        self.counters.failed()
        with self._lock:
            self.rejected += 1
        log.warning("%s: alert rejected by the receiver, discarded (group %s)", self.sink.name,
                    alert.group)

    def _advance(self, items: list[_Item]) -> None:
        """Mark ``items`` (consecutive, from the read offset) as done and persist that."""
        corrupt = sum(1 for i in items if i.alert is None)
        with self._lock:
            seq = self._read_seq
            assert seq is not None
            self._bytes -= items[-1].end - self._read_off
            self._count -= len(items)
            self._read_off = items[-1].end
            self.corrupt += corrupt
            self.dropped += corrupt
            self.counters.spooled(self._count)
            self._changed.notify_all()
        if corrupt:
            self.counters.dropped(corrupt)
            log.warning("%s: skipped %d unreadable lines in spool segment %s", self.sink.name,
                        corrupt, _segment_name(seq))
        self._commit(seq, items[-1].end)

    def _commit(self, seq: int, off: int) -> None:
        """Persist the read position atomically (temporary file, fsync, rename, fsync dir)."""
        path = os.path.join(self.directory, COMMIT_FILE)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps({"segment": seq, "offset": off}).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(self.directory)
        except OSError as exc:
            self._throttle.warning("commit", "%s: cannot record the spool position: %s",
                                   self.sink.name, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

