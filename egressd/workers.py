"""Several capture processes: ``capture_workers: N`` in the daemon's config.

One Python process decides a few tens of thousands of new flows per second
(``bench/bench_new_flows.py``); a busier gateway needs more cores, and the
interpreter lock gives a process one.  With ``capture_workers: N`` the daemon
starts N capture processes that join one ``PACKET_FANOUT`` group per
interface in hash mode: the kernel hands each flow (both directions, IP
fragments reassembled first) to one of them, and each runs the whole
pipeline — decode, names, flow table, GeoIP, policy — for its share.

The first process (the supervisor) captures nothing.  It serves the metrics,
owns the alert sinks and their spool, talks to systemd and handles reloads:

* each capture process sends its alerts (the decided flow) to the
  supervisor, whose single :class:`~egressd.alerts.Alerter` groups them
  across all processes, so one group gives one alert whoever saw its flows;
* each capture process sends a snapshot of its pipeline metrics every
  second; ``/metrics`` serves their sums (:class:`~egressd.metrics.WorkerMetrics`);
* SIGHUP is checked by the supervisor first (a bad file keeps everything as
  it was) and then passed on; SIGTERM is passed on, and the supervisor waits
  for every capture process to account its flows and send its last alerts;
* a capture process that dies stops the daemon with exit status 1, so that
  systemd restarts it whole.

Every capture process also reads all DNS answers through a socket of its own
outside the fanout group (a DNS answer and the connection it leads to are
different flows, which the hash may give to different processes), so DNS
names do not depend on which process a flow went to; with
``internal_networks: auto`` each follows the gateway's networks itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from egressd.decode.batch import decode_batch
from egressd.metrics import WorkerMetrics, snapshot
from egressd.model import FlowRecord, RecordBatch
from egressd.sources.live import LiveSource

if TYPE_CHECKING:
    from egressd.daemon import Daemon, Runtime

log = logging.getLogger("egressd")

DNS_FILTER = "(udp or tcp) and src port 53"
"""What the capture processes' own DNS sockets take in."""
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0


class WorkerLink:
    """A capture process's side of its pipe to the supervisor."""

    def __init__(self, index: int, conn: Connection) -> None:
        self.index = index
        self.conn = conn
        self._lock = threading.Lock()
        self._alerts: list[tuple[FlowRecord, str | None, int]] = []

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)

    def ready(self) -> None:
        self._send(("ready", self.index))

    def alert(self, record: FlowRecord, interface: str | None, now_ns: int) -> None:
        """Queue an alert; :meth:`flush` sends the queue (one message per capture batch)."""
        self._alerts.append((record, interface, now_ns))

    def flush(self) -> None:
        if self._alerts:
            alerts, self._alerts = self._alerts, []
            self._send(("alerts", alerts))

    def metrics(self, registry: Any) -> None:
        self.flush()
        self._send(("metrics", self.index, snapshot(registry)))

    def close(self) -> None:
        self.conn.close()


class DnsFeed:
    """Every DNS answer on the interfaces, read on a thread, for a capture process.

    The capture loop calls :meth:`drain` before each of its own batches, so
    that an answer is in the DNS map before the connection it leads to.
    """

    def __init__(self, interfaces: tuple[str, ...]) -> None:
        self.source = LiveSource(interfaces, bpf_filter=DNS_FILTER, ring=False,
                                 batch_timeout=0.005)
        self.queue: queue.Queue[RecordBatch] = queue.Queue(maxsize=1024)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dns-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        for _, batch in self.source.batches(self._stop):
            if len(batch):
                # When the capture loop is far behind, names may be missed.
                with contextlib.suppress(queue.Full):
                    self.queue.put_nowait(batch)

    def drain(self, observe: Callable[[RecordBatch], None]) -> None:
        while True:
            try:
                batch = self.queue.get_nowait()
            except queue.Empty:
                return
            observe(batch)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.source.close()


def fanout_group(interfaces: int) -> int:
    """A PACKET_FANOUT group id (one per interface from it) for this daemon."""
    return 0x4000 + (os.getpid() * 16) % (0xC000 - interfaces)


def _worker_main(config_path: str, index: int, group: int, conn: Connection,
                 daemon_factory: Callable[..., Daemon]) -> None:
    """A capture process: the daemon's pipeline on its fanout share."""
    code = 1
    try:
        os.environ.pop("NOTIFY_SOCKET", None)  # the supervisor talks to systemd
        daemon = daemon_factory(config_path, serve_metrics=False)
        daemon.install_signal_handlers()
        daemon.link = WorkerLink(index, conn)
        daemon.fanout = group
        code = daemon.run_capture_process()
    except BaseException:  # reported to the journal; the supervisor sees the pipe close
        log.exception("capture process %d failed", index)
    finally:
        conn.close()
        logging.shutdown()
        os._exit(code)


def supervise(daemon: Daemon, rt: Runtime) -> int:
    """Run the supervisor of ``rt.config.capture_workers`` capture processes."""
    from egressd.alerts import Alerter
    from egressd.metrics_http import serve_metrics
    from egressd.privileges import drop_privileges

    config = rt.config
    count = config.capture_workers
    group = fanout_group(len(config.interfaces))
    ctx = multiprocessing.get_context("fork")
    conns: dict[Connection, int] = {}
    procs: list[Any] = []
    for index in range(count):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, name=f"egressd-capture-{index}",
                           args=(daemon.config_path, index, group, sender, type(daemon)))
        proc.start()
        sender.close()
        conns[receiver] = index
        procs.append(proc)
    drop_privileges(keep=())  # the supervisor captures nothing: no capability at all
    daemon.metrics.unregister_pipeline()
    workers = WorkerMetrics()
    daemon.registry.register(workers)
    web_config = config.metrics.load_web_config()
    if daemon.serve_metrics:
        daemon.metrics_server = serve_metrics(daemon.registry, config.metrics.host,
                                              config.metrics.port, web_config)
        log.info("metrics on %s", daemon.metrics_server.url)
    daemon.alerter = Alerter(config.alerts, sensor=config.sensor_name, metrics=daemon.metrics,
                             clock=daemon.clock, batch_lines=True)
    daemon._publish_static(rt)
    daemon.metrics.reload_success.set(1)
    daemon.metrics.reload_time.set(time.time())

    status = 0
    waiting = set(conns.values())
    stopping = False
    stop_deadline = 0.0
    last_status = 0.0

    def signal_workers(signum: int) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    while conns:
        if daemon.stop_event.is_set() and not stopping:
            stopping = True
            stop_deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            daemon.notifier.stopping()
            signal_workers(signal.SIGTERM)
        if stopping and time.monotonic() > stop_deadline:
            log.error("capture processes did not stop in time; killing them")
            signal_workers(signal.SIGKILL)
            break
        for conn in wait(list(conns), timeout=0.25):
            assert isinstance(conn, Connection)
            try:
                message = conn.recv()
            except (EOFError, OSError):
                index = conns.pop(conn)
                conn.close()
                if not stopping:
                    log.error("capture process %d ended; stopping the daemon", index)
                    status = 1
                    daemon.stop_event.set()
                continue
            kind = message[0]
            if kind == "alerts":
                for record, interface, now_ns in message[1]:
                    if daemon.alerter.observe(record, interface=interface,
                                              now_ns=now_ns) is not None:
                        daemon.alerts += 1
            elif kind == "metrics":
                workers.update(message[1], message[2])
            elif kind == "ready":
                waiting.discard(message[1])
                if not waiting:
                    daemon.notifier.ready(f"capturing with {count} processes")
                    log.info("capturing on %s with %d processes",
                             ", ".join(config.interfaces), count)
        daemon.alerter.flush_lines()
        now = time.monotonic()
        daemon.notifier.watchdog(now)
        if not stopping and now - last_status >= 1.0:
            last_status = now
            daemon.notifier.status(f"{daemon.alerts} alerts; {count} capture processes")
        if not stopping and daemon._reload_requested and daemon.reload_supervisor():
            signal_workers(signal.SIGHUP)
    for proc in procs:
        proc.join(timeout=5)
    daemon.alerter.flush(STOP_TIMEOUT_SECONDS / 2)
    daemon.alerter.close(STOP_TIMEOUT_SECONDS / 2)
    daemon.notifier.close()
    if daemon.metrics_server is not None:
        daemon.metrics_server.close()
    log.info("stopped; %d alerts", daemon.alerts)
    return status


def observe_dns(daemon: Daemon) -> Callable[[RecordBatch], None]:
    """What a capture process does with a batch from its DNS feed."""
    def observe(batch: RecordBatch) -> None:
        names = daemon.names
        if names is not None:
            names.observe(batch, decode_batch(batch), hellos=False)
    return observe
