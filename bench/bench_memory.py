"""Memory of the flow table: bytes per live flow, and flat memory under a flow flood.

Feeds the flow table decoded batches of distinct flows (a SYN flood / port
scan: every packet a new 5-tuple), as the daemon would see them, and reports:

* bytes per flow held in the table (tracemalloc, Python allocations), against
  a baseline in the same run: a plain dict of 5-tuple -> [packets, bytes]
  counters, the least a Python flow table can hold;
* peak resident memory when the table is bounded (``--max-flows``, evicting
  the oldest flow as the daemon does) while many more distinct flows arrive.

    python bench/bench_memory.py --flows 200000 --flood 2000000 --max-flows 100000
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egressd.decode.batch import Decoded
from egressd.flows import FlowTable

BATCH = 65536
MAPPED = 0xFFFF_0000_0000


def flood_batch(rng: np.random.Generator, n: int, t0: int) -> Decoded:
    """``n`` TCP SYNs from random internal sources to random remotes: n new flows."""
    src = np.zeros((n, 2), dtype=np.uint64)
    dst = np.zeros((n, 2), dtype=np.uint64)
    src[:, 1] = MAPPED | (0x0A000000 + rng.integers(0, 1 << 24, n, dtype=np.uint64))
    dst[:, 1] = MAPPED | rng.integers(0x01000000, 0xDF000000, n, dtype=np.uint64)
    return Decoded(
        ts_ns=t0 + np.arange(n, dtype=np.int64) * 1000,
        err=np.zeros(n, dtype=np.uint8), version=np.full(n, 4, dtype=np.uint8),
        proto=np.full(n, 6, dtype=np.uint8), src=src, dst=dst,
        sport=rng.integers(1024, 65536, n).astype(np.int32),
        dport=rng.integers(1, 65536, n).astype(np.int32),
        tcp_flags=np.full(n, 0x02, dtype=np.uint8), ip_bytes=np.full(n, 40, dtype=np.int64),
        frag=np.zeros(n, dtype=np.uint8), frag_id=np.zeros(n, dtype=np.int64),
        linktypes=np.ones(n, dtype=np.uint16))


def table_bytes_per_flow(nflows: int, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    batches = [flood_batch(rng, min(BATCH, nflows - i), i * 1000)
               for i in range(0, nflows, BATCH)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    table = FlowTable()
    for b in batches:
        table.process(b)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(table), len(table)


def dict_bytes_per_flow(nflows: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    cols = []
    for i in range(0, nflows, BATCH):
        b = flood_batch(rng, min(BATCH, nflows - i), 0)
        cols.append((b.src[:, 1].tolist(), b.sport.tolist(), b.dst[:, 1].tolist(),
                     b.dport.tolist()))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    table: dict[tuple[int, ...], list[int]] = {}
    for srcs, sports, dsts, dports in cols:
        for k in zip(srcs, sports, dsts, dports, strict=True):  # the key tuple is counted
            table[(6, *k)] = [1, 40]
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(table)


def flood_rss(total: int, max_flows: int, seed: int) -> tuple[float, float, int]:
    """Peak RSS (MiB) after the table filled to max_flows, and at the end of the flood."""
    rng = np.random.default_rng(seed)
    table = FlowTable()
    evicted = 0
    at_full = 0.0
    for i in range(0, total, BATCH):
        table.process(flood_batch(rng, min(BATCH, total - i), i * 1000))
        while len(table) > max_flows:
            table.evict_oldest()
            evicted += 1
        table.finished.clear()
        if not at_full and i + BATCH >= max_flows * 2:
            at_full = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return at_full, end, evicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--flood", type=int, default=2_000_000)
    ap.add_argument("--max-flows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ours, base = [], []
    for run in range(args.runs):
        per_flow, n = table_bytes_per_flow(args.flows, run)
        ours.append(per_flow)
        base.append(dict_bytes_per_flow(args.flows, run))
        print(f"run {run + 1}: flow table {per_flow:7.0f} B/flow ({n} flows), "
              f"plain dict {base[-1]:7.0f} B/flow")
    mo, mb = statistics.median(ours), statistics.median(base)
    print(f"median bytes per flow: flow table {mo:.0f}, plain dict {mb:.0f}, ratio {mo / mb:.2f}")
    t = time.perf_counter()
    at_full, end, evicted = flood_rss(args.flood, args.max_flows, 99)
    print(f"flood of {args.flood} distinct flows into a table bounded at {args.max_flows}: "
          f"peak RSS {at_full:.0f} MiB when full, {end:.0f} MiB at the end "
          f"({evicted} evicted, {time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
