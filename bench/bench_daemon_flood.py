"""Peak memory of the whole daemon under a flood of distinct remote addresses.

Two network namespaces joined by a veth pair; the real daemon (``egressd run``)
captures on the receiving end with ``flows.max_flows`` set, and a sender in
the other namespace writes UDP frames with a raw packet socket, each to a
remote address never used before (a scan, or a host spraying the internet),
round after round.  Every frame is a new flow, a new GeoIP lookup (embedded
registry data, so remotes get real countries) and, for most, a new alert
group (alerts go to a JSON-lines sink on /dev/null: serialized, not stored).

While the flood runs, the daemon's VmRSS is sampled from /proc and its
metrics are scraped.  Per run it reports:

* idle RSS after READY (the baseline, same process, same run), peak RSS
  (sampled max and the kernel's VmHWM) and their ratio;
* flows in the table (``egressd_active_flows``, sampled; never above
  ``max_flows``), evictions and kernel drops;
* metric series in the scrape after each round: must stay bounded (labels
  carry countries, never addresses), whatever the number of remotes.

The GeoIP cache is bounded by ``geoip.cache_size`` but not exported as a
metric, so it is not measured here.  Medians over ``--runs`` runs, each with a
fresh daemon.  Needs root.

    python bench/bench_daemon_flood.py                  # 3 runs x 3 rounds x 100k remotes
    python bench/bench_daemon_flood.py --remotes 200000 --rounds 5 --max-flows 100000
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import vethlab

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")
TX_IF, RX_IF = "flood-tx", "flood-rx"
RX_MAC = vethlab.RX_MAC
CLONE_NEWNET = 0x4000_0000
FIRST, LAST = 0x0100_0000, 0xDF00_0000  # 1.0.0.0 up to the multicast range
STRIDE = 2_654_435_761  # odd and prime: i -> FIRST + i * STRIDE mod span is one-to-one

CONFIG = """\
home_countries: [CN]
internal_networks: [10.0.0.0/8]
interfaces: [{iface}]
geoip: {{cache_size: {cache}}}
metrics: {{listen: "127.0.0.1:{port}"}}
alerts: {{jsonl: /dev/null, suppress_seconds: 300, spool_dir: {spool}}}
flows:
  idle_timeout_seconds: {{tcp: 600, udp: 600, other: 600}}
  active_timeout_seconds: 600
  max_flows: {max_flows}
capture_workers: {workers}
"""


# -- the sender (child process in the sending namespace) ---------------------------------------


def remote(i: int) -> int:
    """The ``i``-th remote address: distinct for every i below the span, spread everywhere."""
    span = LAST - FIRST
    return FIRST + (i * STRIDE) % span


def _frame(dst: int) -> bytes:
    udp = struct.pack("!HHHH", 40000, 53, 8 + 18, 0) + b"egressd-flood-test"
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      socket.inet_aton("10.0.0.2"), dst.to_bytes(4, "big"))
    total = sum(struct.unpack("!10H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~total & 0xFFFF) + hdr[12:]
    eth = bytes.fromhex(RX_MAC.replace(":", "") + "020000000001" + "0800")
    return eth + hdr + udp


def child_send(ifname: str, start: int, count: int, rate: int) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, 0))
    t0 = time.perf_counter()
    sent = 0
    while sent < count:
        due = min(count, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            try:
                sock.send(_frame(remote(start + sent)))
            except BlockingIOError:
                time.sleep(0.001)
                continue
            sent += 1
        time.sleep(0.0005)
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - t0}), flush=True)


# -- namespaces --------------------------------------------------------------------------------


def setup(tag: str) -> tuple[str, str]:
    return vethlab.setup("egf", tag, TX_IF, RX_IF)


teardown = vethlab.teardown


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread inside namespace ``ns`` (this process stays where it is)."""
    with ThreadPoolExecutor(1, initializer=_setns, initargs=(ns,)) as pool:
        return pool.submit(fn).result()


# -- the daemon --------------------------------------------------------------------------------


def scrape(ns: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    out = {}
    for fam in text_string_to_metric_families(call_in(ns, get)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


def _own_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def status_kib(pid: int, field: str) -> int:
    """``field`` of ``/proc/PID/status`` summed over the daemon and its capture processes."""
    total = _own_kib(pid, field)
    for child in _children(pid):
        with contextlib.suppress(OSError, KeyError):
            total += _own_kib(child, field)
    return total


class Sampler:
    """Samples the daemon's VmRSS every ``period`` seconds on a thread."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self._stop.wait(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def one_run(run: int, tx: str, rx: str, args: argparse.Namespace) -> dict[str, float]:
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="egressd-flood-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])  # free in the host, so almost surely in rx too
        config = Path(tmp) / "egressd.yaml"
        config.write_text(CONFIG.format(iface=RX_IF, cache=args.cache_size, port=port,
                                        spool=Path(tmp) / "spool", max_flows=args.max_flows,
                                        workers=args.workers))
        log = open(Path(tmp) / "daemon.log", "w")  # noqa: SIM115
        daemon = subprocess.Popen(["ip", "netns", "exec", rx, sys.executable, "-m", "egressd",
                                   "run", "--config", str(config)], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "INFO egressd: capturing on" not in (Path(tmp) / "daemon.log").read_text():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start:\n"
                                       + (Path(tmp) / "daemon.log").read_text())
                time.sleep(0.1)
            pid = daemon.pid  # `ip netns exec` runs the daemon in its own process
            scrape(rx, port)
            time.sleep(1.0)
            idle_samples = []
            for _ in range(10):
                idle_samples.append(status_kib(pid, "VmRSS"))
                time.sleep(0.1)
            idle = statistics.median(idle_samples)
            sampler = Sampler(pid)
            max_active = 0.0
            series: list[int] = []
            sent_total = 0
            t0 = time.perf_counter()
            for rnd in range(args.rounds):
                start = (run * args.rounds + rnd) * args.remotes
                sender = subprocess.Popen(["ip", "netns", "exec", tx, *me, "--child-send",
                                           TX_IF, "--start", str(start), "--count",
                                           str(args.remotes), "--rate", str(args.rate)],
                                          stdout=subprocess.PIPE, text=True)
                while sender.poll() is None:
                    m = scrape(rx, port)
                    max_active = max(max_active, total(m, "egressd_active_flows"))
                    time.sleep(0.5)
                assert sender.stdout is not None
                sent_total += json.loads(sender.stdout.read())["sent"]
                # Let the daemon catch up with what the kernel holds for it.
                catch_up = time.monotonic() + 300
                while True:
                    m = scrape(rx, port)
                    max_active = max(max_active, total(m, "egressd_active_flows"))
                    seen = total(m, "egressd_packets_total")
                    drops = total(m, "egressd_kernel_drops_total")
                    if seen + drops >= sent_total or time.monotonic() > catch_up:
                        break
                    time.sleep(0.5)
                series.append(len(m))
                print(f"  run {run + 1} round {rnd + 1}: {sent_total} remotes sent, "
                      f"{seen:.0f} captured, {drops:.0f} dropped, "
                      f"{total(m, 'egressd_flows_total'):.0f} flows decided, "
                      f"{total(m, 'egressd_active_flows'):.0f} in the table, "
                      f"{len(m)} series, RSS {status_kib(pid, 'VmRSS') / 1024:.0f} MiB",
                      flush=True)
            elapsed = time.perf_counter() - t0
            peak_sampled = sampler.stop()
            hwm = status_kib(pid, "VmHWM")
            flow_labels = [dict(labels) for name, labels in m if name == "egressd_flows_total"]
            return {
                "idle_mib": idle / 1024, "peak_mib": max(peak_sampled, hwm) / 1024,
                "peak_sampled_mib": peak_sampled / 1024, "hwm_mib": hwm / 1024,
                "max_active": max_active, "active_end": total(m, "egressd_active_flows"),
                "evictions": total(m, "egressd_flow_table_evictions_total"),
                "flows": total(m, "egressd_flows_total"), "drops": drops, "sent": sent_total,
                "series_first": series[0], "series_last": series[-1],
                "flow_series": len(flow_labels),
                "countries": len({labels["country"] for labels in flow_labels}),
                "seconds": elapsed,
            }
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remotes", type=int, default=100_000,
                    help="distinct remote addresses (one packet each) per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run, new remotes each")
    ap.add_argument("--runs", type=int, default=3, help="runs, each with a fresh daemon")
    ap.add_argument("--max-flows", type=int, default=50_000, help="flows.max_flows")
    ap.add_argument("--cache-size", type=int, default=65536, help="geoip.cache_size")
    ap.add_argument("--rate", type=int, default=8_000,
                    help="frames per second sent (each a new flow: keep it below what the "
                    "daemon decides per second, or the kernel drops the excess)")
    ap.add_argument("--workers", type=int, default=1,
                    help="capture_workers of the daemon (PACKET_FANOUT processes)")
    ap.add_argument("--child-send", metavar="IF")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    args = ap.parse_args()
    if args.child_send:
        child_send(args.child_send, args.start, args.count, args.rate)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, packet sockets)", file=sys.stderr)
        return 2
    if args.remotes * args.rounds * args.runs > LAST - FIRST:
        print("more remotes than IPv4 unicast addresses", file=sys.stderr)
        return 2
    # SIGTERM: remove the namespaces and stop the daemon on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    tx, rx = setup(str(os.getpid()))
    results = []
    try:
        for run in range(args.runs):
            r = one_run(run, tx, rx, args)
            results.append(r)
            print(f"run {run + 1}: idle {r['idle_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
                  f"(sampled {r['peak_sampled_mib']:.0f}, VmHWM {r['hwm_mib']:.0f}), "
                  f"ratio {r['peak_mib'] / r['idle_mib']:.2f}; table max {r['max_active']:.0f} "
                  f"of {args.max_flows}; {r['evictions']:.0f} evictions; series "
                  f"{r['series_first']} -> {r['series_last']} "
                  f"({r['flow_series']} of egressd_flows_total, {r['countries']} countries); "
                  f"{r['drops']:.0f} kernel drops; "
                  f"{r['seconds']:.0f} s", flush=True)
    finally:
        teardown(tx, rx)

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in results))

    print(f"\nmedians over {args.runs} runs of {args.rounds} rounds x {args.remotes} distinct "
          f"remotes at {args.rate}/s, {args.workers} capture process(es), "
          f"max_flows {args.max_flows}, "
          f"geoip.cache_size {args.cache_size}:")
    print(f"  idle RSS {med('idle_mib'):.0f} MiB, peak RSS {med('peak_mib'):.0f} MiB, "
          f"peak/idle {statistics.median(r['peak_mib'] / r['idle_mib'] for r in results):.2f}")
    print(f"  flows decided {med('flows'):.0f} of {med('sent'):.0f} sent; most flows in the "
          f"table {med('max_active'):.0f} (max_flows {args.max_flows}); "
          f"evictions {med('evictions'):.0f}; kernel drops {med('drops'):.0f}")
    print(f"  metric series after the first round {med('series_first'):.0f}, after the last "
          f"{med('series_last'):.0f} (egressd_flows_total: {med('flow_series'):.0f})")
    over = [r for r in results if r["max_active"] > args.max_flows]
    if over:
        print("FAIL: the flow table went above max_flows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
