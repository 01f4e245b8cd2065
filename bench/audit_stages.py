"""Where an audit's time goes: CPU time per stage, against the SHA-256 of the file alone.

Runs the stages of ``egressd audit`` one after the other in this process, on
one thread, timing each with that thread's CPU clock (the read-ahead thread's
reading from the file is not in it, as in a real audit): reading the records,
decoding, names, the flow table, classification (GeoIP, policy, Community
ID), sorting and the JSON report; then, in the same run, the SHA-256 of the
file (which the real audit computes on a second thread) and the import of
the pipeline in a fresh interpreter.  Prints the median of ``--runs`` runs
per stage, in seconds and nanoseconds per packet.

    python bench/audit_stages.py                  # the 1,000,000-packet capture of bench_audit.py
    python bench/audit_stages.py --runs 5 FILE
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_audit import ROOT, capture_path, warm

from egressd.audit import Audit, AuditOptions
from egressd.config import load_policy
from egressd.decode.batch import decode_batch
from egressd.geo import open_resolver
from egressd.report import write_json
from egressd.sources.files import open_capture
from egressd.sources.inputs import HashingReader

STAGES = ("read records", "decode", "names", "flow table", "classify", "sort", "JSON report")


def one_run(path: Path, policy_path: Path) -> dict[str, float]:
    """CPU seconds per stage for one audit of ``path`` (no hashing: timed apart)."""
    policy = load_policy(str(policy_path))
    audit = Audit(policy, open_resolver(None, None), AuditOptions(sha256=False))
    cpu = time.thread_time
    t = dict.fromkeys(STAGES, 0.0)
    names, table = audit.names, audit.table
    assert names is not None
    gc.disable()
    try:
        with path.open("rb", buffering=0) as raw, HashingReader(raw, sha256=False) as src:
            batches = open_capture(src).batches()
            while True:
                t0 = cpu()
                batch = next(batches, None)
                t1 = cpu()
                t["read records"] += t1 - t0
                if batch is None:
                    break
                dec = decode_batch(batch)
                t2 = cpu()
                names.observe(batch, dec)
                t3 = cpu()
                table.process(dec)
                names.attach(table)
                t4 = cpu()
                audit._drain()
                t5 = cpu()
                t["decode"] += t2 - t1
                t["names"] += t3 - t2
                t["flow table"] += t4 - t3
                t["classify"] += t5 - t4
        t0 = cpu()
        table.flush()
        t1 = cpu()
        audit._drain()
        t2 = cpu()
        result = audit.finish(policy_path=str(policy_path), policy_sha256="")
        t3 = cpu()
        with open("/dev/null", "w", encoding="utf-8") as out:
            write_json(result, out)
        t4 = cpu()
        t["flow table"] += t1 - t0
        t["classify"] += t2 - t1
        t["sort"] += t3 - t2
        t["JSON report"] += t4 - t3
    finally:
        gc.enable()
    return t


def sha256_cpu(path: Path) -> float:
    """CPU seconds of the file's SHA-256 alone (8 MiB reads, as the audit reads)."""
    t0 = time.process_time()
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while data := f.read(8 << 20):
            h.update(data)
    h.hexdigest()
    return time.process_time() - t0


def import_seconds() -> float:
    """Wall time of a fresh interpreter that loads the audit pipeline."""
    code = ("import egressd.audit, egressd.config, egressd.report, egressd.geo, "
            "egressd.sources.files")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("capture", nargs="?", type=Path,
                    help="capture file (default: the generated 1,000,000-packet capture)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policy", type=Path, default=ROOT / "examples" / "policy.yaml")
    args = ap.parse_args(argv)
    path = args.capture or capture_path(1_000_000, 1, Path(tempfile.gettempdir()) / "egressd-bench")
    warm(path)
    runs: list[dict[str, float]] = []
    extra: dict[str, list[float]] = {"SHA-256 (second thread)": [], "imports (fresh process)": []}
    packets = 0
    for _ in range(args.runs):
        runs.append(one_run(path, args.policy))
        extra["SHA-256 (second thread)"].append(sha256_cpu(path))
        extra["imports (fresh process)"].append(import_seconds())
    with path.open("rb") as f:
        packets = sum(len(b) for b in open_capture(f).batches())

    def row(name: str, values: list[float]) -> None:
        med = statistics.median(values)
        print(f"{name:<26} {med:8.3f} s {med / packets * 1e9:9.0f} ns/packet")

    print(f"{path}: {packets:,} packets, medians of {args.runs} runs (CPU time of the "
          "thread running the stages)")
    total = 0.0
    for stage in STAGES:
        values = [r[stage] for r in runs]
        row(stage, values)
        total += statistics.median(values)
    print(f"{'all stages':<26} {total:8.3f} s {total / packets * 1e9:9.0f} ns/packet")
    for name, values in extra.items():
        row(name, values)
    sha = statistics.median(extra["SHA-256 (second thread)"])
    print(f"stages / SHA-256 alone: {total / sha:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
