"""What a new flow costs the live daemon, against the flow table alone.

Under a scan or a flood every packet is a new flow to a remote never seen
before, and the daemon's capture thread decides each one: names, GeoIP,
policy, Community ID, metrics and, for a violation in a new alert group, an
alert written to its sinks.  That per-flow work, not the packet decode, sets
how many new flows per second a gateway can take before the kernel ring
overflows.

This benchmark feeds the daemon's per-batch path (:meth:`Daemon.process_batch`,
the same code the capture loop runs; no sockets) batches of UDP packets, each
to a distinct remote address, and times it against a baseline on the same
batches: decode and the flow table alone, without deciding anything.  Runs
alternate; medians, min–max and the ratio are printed, with the cost per new
flow in microseconds and the new-flow rate one core sustains.

    python bench/bench_new_flows.py                      # 40,000 flows, 5 runs
    python bench/bench_new_flows.py --flows 100000 --runs 3 --alerts none

``--alerts jsonl`` (default) makes every flow a violation in its own alert
group (remotes in distinct /24s) written to a JSON-lines file on /dev/null;
``--alerts none`` leaves alerting out (the decisions and metrics only).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egressd.daemon import Daemon  # noqa: E402
from egressd.decode.batch import decode_batch  # noqa: E402
from egressd.decode.linktypes import LINKTYPE_RAW  # noqa: E402
from egressd.flows import FlowTable  # noqa: E402
from egressd.model import RecordBatch  # noqa: E402

FIRST, LAST = 0x0100_0000, 0xDF00_0000  # 1.0.0.0 up to the multicast range
STRIDE = 2_654_435_761  # odd and prime: one-to-one over the span, neighbours far apart

CONFIG = """\
home_countries: [CN]
internal_networks: [10.0.0.0/8]
interfaces: [lo]
alerts: {alerts}
flows:
  idle_timeout_seconds: {{tcp: 600, udp: 600, other: 600}}
  max_flows: {max_flows}
"""


def packet(i: int) -> bytes:
    """UDP from 10.0.0.2 to the ``i``-th remote (distinct for every i)."""
    dst = FIRST + (i * STRIDE) % (LAST - FIRST)
    udp = struct.pack("!HHHH", 40000, 53, 8 + 18, 0) + b"egressd-flood-test"
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton("10.0.0.2"), dst.to_bytes(4, "big")) + udp


def batches(flows: int, size: int, start_ns: int) -> list[RecordBatch]:
    return [RecordBatch.from_packets([(start_ns + i * 1000, LINKTYPE_RAW, packet(i))
                                      for i in range(s, min(s + size, flows))])
            for s in range(0, flows, size)]


def run_daemon(config: Path, work: list[RecordBatch]) -> float:
    d = Daemon(str(config), serve_metrics=False)
    d.rt = d._first_load()
    d.build_pipeline()
    t0 = time.perf_counter()
    for b in work:
        d.process_batch("bench0", b)
    elapsed = time.perf_counter() - t0
    assert d.alerter is not None
    d.alerter.close(5)
    return elapsed


def run_table(work: list[RecordBatch]) -> float:
    table = FlowTable()
    t0 = time.perf_counter()
    for b in work:
        table.process(decode_batch(b))
        table.finished.clear()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=40_000, help="new flows per run")
    ap.add_argument("--batch", type=int, default=400, help="packets per capture batch")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--alerts", choices=("jsonl", "none"), default="jsonl")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="egressd-bench-") as tmp:
        alerts = ("{jsonl: /dev/null, suppress_seconds: 300, spool_dir: " + tmp + "/spool}"
                  if args.alerts == "jsonl" else "{spool_dir: " + tmp + "/spool}")
        config = Path(tmp) / "egressd.yaml"
        config.write_text(CONFIG.format(alerts=alerts, max_flows=args.flows + 1))
        tools: dict[str, Callable[[list[RecordBatch]], float]] = {
            "daemon": lambda w: run_daemon(config, w),
            "table only": run_table,
        }
        times: dict[str, list[float]] = {name: [] for name in tools}
        print(f"{args.flows} new flows (one packet each) in batches of {args.batch}, "
              f"alerts: {args.alerts}, {args.runs} runs, alternating")
        for run in range(args.runs):
            for name, fn in tools.items():
                work = batches(args.flows, args.batch, time.time_ns())
                elapsed = fn(work)
                times[name].append(elapsed)
                print(f"  run {run + 1} {name:<11} {elapsed:6.2f} s")
    print()
    print(f"{'path':<12}{'median s':>9}{'us/flow':>9}{'flows/s':>10}   min-max")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:<12}{med[name]:>9.2f}{med[name] / args.flows * 1e6:>9.1f}"
              f"{args.flows / med[name]:>10,.0f}   {min(t):.2f}-{max(t):.2f}")
    ratio = med["daemon"] / med["table only"]
    extra = (med["daemon"] - med["table only"]) / args.flows * 1e6
    print(f"daemon/table-only time ratio: {ratio:.2f}; deciding a new flow costs "
          f"{extra:.1f} us beyond decoding and counting it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
