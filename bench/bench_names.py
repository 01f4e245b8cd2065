"""Passive DNS: bytes per entry, flat memory under a name flood, and parse speed.

Reports, each against a baseline measured in the same run:

* bytes per (client, address) key held by ``PassiveDns`` (tracemalloc, Python
  allocations; the table keeps a per-client and an any-client index), against
  a plain dict ``{(client, addr): chain}``, the least a Python map can hold;
* resident memory while a flood of distinct names (one new name and address
  per answer) passes a table bounded at ``--max-entries``: sampled during the
  flood, it should stay flat once the table is full;
* responses parsed per second by ``parse_response`` against a bare
  ``dns.message.from_wire`` of the same messages.

    python bench/bench_names.py --entries 200000 --flood 1000000 --max-entries 100000
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sized
from pathlib import Path

import dns.message
import dns.rrset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egressd.names.dns import DnsAnswer, DnsAnswers, PassiveDns, parse_response

S = 1_000_000_000
T0 = 1_700_000_000 * S
MAPPED = b"\0" * 10 + b"\xff\xff"


def client_pool(n: int) -> list[bytes]:
    return [MAPPED + bytes((10, 20, i >> 8 & 255, i & 255)) for i in range(n)]


def answer(i: int) -> DnsAnswers:
    """Answer number ``i``: a distinct name and address; every third behind a CNAME."""
    addr = MAPPED + (0x01000000 + i * 7919 % 0xDE000000).to_bytes(4, "big")
    q = f"host{i}.svc{i % 997}.example.com"
    chain = (q, f"edge{i % 5003}.cdn.example.net") if i % 3 == 0 else (q,)
    return DnsAnswers(q, (DnsAnswer(addr, chain, 300),))


Feed = list[tuple[bytes, DnsAnswers]]


def traced_bytes_per_entry(n: int, seed: int, fill: Callable[[Feed], Sized]) -> tuple[float, int]:
    """Bytes Python allocates per entry of what ``fill`` builds from ``n`` answers.

    The seeded feed is built before tracing starts, so only the structure
    that ``fill`` returns is counted (it stays alive until measured).
    """
    rng = random.Random(seed)
    clients = client_pool(1000)
    feed = [(clients[rng.randrange(1000)], answer(i)) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    built = fill(feed)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(built), len(built)


def table_bytes_per_entry(n: int, seed: int) -> tuple[float, int]:
    """The passive DNS map itself."""
    def fill(feed: Feed) -> PassiveDns:
        table = PassiveDns(max_entries=n)
        for k, (client, ans) in enumerate(feed):
            table.observe(client, ans, T0 + k * 1000)
        return table
    return traced_bytes_per_entry(n, seed, fill)


def dict_bytes_per_entry(n: int, seed: int) -> float:
    """The baseline: a plain dict of (client, address) to the CNAME chain."""
    def fill(feed: Feed) -> dict[tuple[bytes, bytes], tuple[str, ...]]:
        table: dict[tuple[bytes, bytes], tuple[str, ...]] = {}
        for client, ans in feed:
            for a in ans.answers:
                table[(client, a.addr)] = a.chain
        return table
    return traced_bytes_per_entry(n, seed, fill)[0]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def flood(total: int, max_entries: int) -> None:
    clients = client_pool(1000)
    table = PassiveDns(max_entries=max_entries)
    samples = []
    step = max(total // 10, 1)
    start_rss = rss_mib()
    t = time.perf_counter()
    for i in range(total):
        table.observe(clients[i % 1000], answer(i), T0 + i * 1000)
        if (i + 1) % step == 0:
            samples.append(f"{(i + 1) // 1000}k:{rss_mib():.0f}")
    took = time.perf_counter() - t
    print(f"flood of {total} distinct names into a table bounded at {max_entries}: "
          f"RSS before {start_rss:.0f} MiB; during (answers:MiB) {' '.join(samples)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS {peak:.0f} MiB, {len(table)} keys, {table.addresses} addresses, "
          f"{table.evictions} evictions, {total / took:,.0f} answers/s")


def responses(n: int, seed: int) -> list[bytes]:
    """``n`` responses: half plain A (1-4 records), 30 % CNAME chains, 20 % AAAA."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"host{i}.svc{rng.randrange(1000)}.example.com."
        kind = rng.random()
        rdtype = "AAAA" if kind >= 0.8 else "A"
        q = dns.message.make_query(name, rdtype)
        r = dns.message.make_response(q)
        owner = name
        if 0.5 <= kind < 0.8:
            for j in range(rng.randrange(1, 4)):
                target = f"c{j}-{rng.randrange(10_000)}.cdn.example.net."
                r.answer.append(dns.rrset.from_text(owner, 300, "IN", "CNAME", target))
                owner = target
        if rdtype == "A":
            addrs = [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
                     f"{rng.randrange(256)}" for _ in range(rng.randrange(1, 5))]
        else:
            addrs = [f"2001:db8::{rng.randrange(65536):x}"]
        r.answer.append(dns.rrset.from_text(owner, 60, "IN", rdtype, *addrs))
        out.append(r.to_wire())
    return out


def time_parse(msgs: list[bytes], runs: int) -> tuple[list[float], list[float]]:
    ours, base = [], []
    for _ in range(runs):  # alternate so background load hits both alike
        t = time.perf_counter()
        for m in msgs:
            dns.message.from_wire(m, ignore_trailing=True)
        base.append(len(msgs) / (time.perf_counter() - t))
        t = time.perf_counter()
        for m in msgs:
            parse_response(m)
        ours.append(len(msgs) / (time.perf_counter() - t))
    return ours, base


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--entries", type=int, default=200_000, help="keys for bytes per entry")
    ap.add_argument("--flood", type=int, default=1_000_000, help="distinct names in the flood")
    ap.add_argument("--max-entries", type=int, default=100_000)
    ap.add_argument("--messages", type=int, default=20_000, help="responses for parse speed")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    flood(args.flood, args.max_entries)  # first, so that the RSS figures are its own

    ours, base = [], []
    for run in range(args.runs):
        per_entry, n = table_bytes_per_entry(args.entries, run)
        ours.append(per_entry)
        base.append(dict_bytes_per_entry(args.entries, run))
        print(f"run {run + 1}: PassiveDns {per_entry:6.0f} B/key ({n} keys), "
              f"plain dict {base[-1]:6.0f} B/key")
    mo, mb = statistics.median(ours), statistics.median(base)
    print(f"median bytes per key: PassiveDns {mo:.0f}, plain dict {mb:.0f}, ratio {mo / mb:.2f}")

    msgs = responses(args.messages, 7)
    p_ours, p_base = time_parse(msgs, max(args.runs, 5))
    po, pb = statistics.median(p_ours), statistics.median(p_base)
    print(f"parse ({len(msgs)} responses, median of {len(p_ours)} runs): parse_response "
          f"{po:,.0f}/s, dns.message.from_wire {pb:,.0f}/s, time ratio {pb / po:.2f}")


if __name__ == "__main__":
    main()
