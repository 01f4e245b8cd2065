"""Benchmark ``egressd audit`` against tshark and a plain reference aggregator.

Generates (once, cached in the temp dir) a gateway capture with
``bench/make_capture.py``, reads it once so it sits in the page cache, then
runs the tools in alternation, ``--runs`` times each, timing every run as a
whole process (start-up included):

* egressd:   python -m egressd audit --policy examples/policy.yaml --format json
             --output /dev/null --fail-on never FILE     (default --jobs: the cores)
* egressd-j1, egressd-j2: the same with --jobs 1 and --jobs 2
* tshark:    tshark -q -n -r FILE -z conv,ip
* reference: python bench/ref_aggregator.py FILE
* sha256:    python -c <hashlib SHA-256 of FILE in 8 MiB reads>: only the digest
             that the report carries for each capture (captures[].sha256), so
             the floor under any audit that reports it

and prints the median wall time and packets/s per tool and how egressd
compares with the others.

    python bench/bench_audit.py --packets 1000000 --runs 5
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("egressd", "egressd-j1", "egressd-j2", "tshark", "reference", "sha256")

# The digest alone, computed as the audit computes it (hashlib, 8 MiB reads).
SHA256_ONLY = (
    "import hashlib, sys\n"
    "h = hashlib.sha256()\n"
    "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
    "    while b := f.read(8 << 20):\n"
    "        h.update(b)\n"
    "print(h.hexdigest())\n"
)


def capture_path(packets: int, seed: int, cache_dir: Path) -> Path:
    """The cached capture for these parameters, generated when missing.

    The name carries a digest of the generator, so a changed generator makes a
    new capture instead of reusing one it would no longer write.
    """
    maker = ROOT / "bench" / "make_capture.py"
    digest = hashlib.sha256(maker.read_bytes()).hexdigest()[:10]
    path = cache_dir / f"gateway-{packets}-seed{seed}-{digest}.pcap"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        print(f"generating {path} ...", flush=True)
        subprocess.run(
            [sys.executable, str(maker), "--packets", str(packets),
             "--seed", str(seed), "--out", str(tmp)],
            check=True,
        )
        # the generator's truth (see check_totals) first, then the capture itself
        tmp.with_name(tmp.name + ".truth.json").replace(path.with_name(path.name + ".truth.json"))
        tmp.replace(path)
    return path


def warm(path: Path) -> None:
    """Read the file once so that every timed run finds it in the page cache.

    Also byte-compile egressd as ``pip install`` does: where the environment
    says not to write bytecode (``PYTHONDONTWRITEBYTECODE``), every run would
    otherwise compile the whole package again on start-up (about 0.1 s here),
    which an installed egressd never does.
    """
    compileall.compile_dir(str(ROOT / "egressd"), quiet=1)
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass


def commands(path: Path, policy: Path) -> dict[str, list[str] | None]:
    tshark = shutil.which("tshark")
    egressd = [sys.executable, "-m", "egressd", "audit", "--policy", str(policy),
               "--format", "json", "--output", os.devnull, "--fail-on", "never", str(path)]
    return {
        "egressd": egressd,
        "egressd-j1": [*egressd[:-1], "--jobs", "1", egressd[-1]],
        "egressd-j2": [*egressd[:-1], "--jobs", "2", egressd[-1]],
        "tshark": None if tshark is None else [tshark, "-q", "-n", "-r", str(path),
                                               "-z", "conv,ip"],
        "reference": [sys.executable, str(ROOT / "bench" / "ref_aggregator.py"), str(path)],
        "sha256": [sys.executable, "-c", SHA256_ONLY, str(path)],
    }


def check_totals(path: Path, policy: Path) -> bool:
    """Run egressd once (untimed) and compare its flows with the generator's truth.

    Every IP packet of the generated capture belongs to exactly one flow with
    an internal and a remote end, so the flows of the report must add up to
    the generator's counts of flows, packets and IP-layer bytes out and in.
    """
    truth_path = path.with_name(path.name + ".truth.json")
    if not truth_path.exists():
        print(f"note: no {truth_path.name} beside the capture; flow totals not checked")
        return True
    truth = json.loads(truth_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "egressd", "audit", "--policy", str(policy),
                        "--format", "json", "--output", str(out), "--fail-on", "never",
                        str(path)], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    flows = report["flows"]
    found = {
        "records": report["summary"]["packets"],
        "ip_flows": len(flows),
        **{k: sum(f[k] for f in flows)
           for k in ("packets_out", "packets_in", "bytes_out", "bytes_in")},
    }
    wrong = {k: (found[k], truth[k]) for k in truth if found.get(k) != truth[k]}
    if wrong:
        print("flow totals DIFFER from the generator's truth (egressd, truth): "
              + ", ".join(f"{k} {a:,} vs {b:,}" for k, (a, b) in wrong.items()))
        return False
    print("flow totals equal the generator's truth: "
          + ", ".join(f"{k} {v:,}" for k, v in found.items()))
    return True


def time_run(cmd: list[str], cpus: set[int] | None = None) -> tuple[float, int, str]:
    """Wall time, exit status and stderr of one run (on ``cpus`` only, when given)."""
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=False, preexec_fn=pin if cpus else None)
    return time.perf_counter() - t0, proc.returncode, proc.stderr


def parse_cpus(text: str) -> set[int]:
    """``0`` or ``0,1`` or ``0-3``: the CPUs every tool is confined to."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help=f"comma-separated subset of {', '.join(TOOLS)} (default: all)")
    ap.add_argument("--policy", type=Path, default=ROOT / "examples" / "policy.yaml")
    ap.add_argument("--cpus", type=parse_cpus, default=None, metavar="LIST",
                    help="run every tool on these CPUs only, e.g. 0 for one core "
                         "(default: all the CPUs the script may use)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "egressd-bench",
                    help="where the generated capture is kept between runs")
    args = ap.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        ap.error(f"--tools: unknown {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(TOOLS)}")

    path = capture_path(args.packets, args.seed, args.cache_dir)
    size_mb = path.stat().st_size / 1e6
    cmds = commands(path, args.policy)
    active: list[str] = []
    for tool in tools:
        if cmds[tool] is None:
            print(f"note: {tool} is not installed; skipping it")
        else:
            active.append(tool)
    if not args.policy.exists():
        for tool in ("egressd", "egressd-j1", "egressd-j2"):
            if tool in active:
                print(f"note: policy {args.policy} not found; skipping {tool}")
                active.remove(tool)
    if not active:
        print("nothing to run")
        return 1

    warm(path)
    totals_ok = True
    if any(t.startswith("egressd") for t in active):
        totals_ok = check_totals(path, args.policy)
    print(f"capture: {path} ({args.packets} packets, {size_mb:.0f} MB), "
          f"{args.runs} runs per tool, alternating")
    usable = sorted(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    print(f"CPUs: {','.join(map(str, usable))}"
          + ("" if args.cpus else " (all this script may use; --cpus to confine the tools)"))
    times: dict[str, list[float]] = {t: [] for t in active}
    failed: dict[str, str] = {}
    for run in range(args.runs):
        for tool in active:
            if tool in failed:
                continue
            cmd = cmds[tool]
            assert cmd is not None
            elapsed, rc, err = time_run(cmd, args.cpus)
            if rc != 0:
                last = (err.strip().splitlines() or [""])[-1]
                failed[tool] = f"exit status {rc}: {last}"
                print(f"  {tool}: failed ({failed[tool]}); not timed further")
                continue
            times[tool].append(elapsed)
            print(f"  run {run + 1} {tool:<9} {elapsed:7.2f} s", flush=True)

    print()
    print(f"{'tool':<11} {'median s':>9} {'packets/s':>12}   runs")
    medians: dict[str, float] = {}
    for tool in active:
        if not times[tool]:
            print(f"{tool:<11} {'-':>9} {'-':>12}   failed: {failed.get(tool, '')}")
            continue
        med = statistics.median(times[tool])
        medians[tool] = med
        spread = ", ".join(f"{t:.2f}" for t in times[tool])
        print(f"{tool:<11} {med:9.2f} {args.packets / med:12,.0f}   {spread}")
    for base in ("egressd", "egressd-j1", "egressd-j2"):
        if base not in medians:
            continue
        for other in ("egressd-j1", "egressd-j2", "tshark", "reference", "sha256"):
            if other in medians and other != base and not (
                    base.startswith("egressd-") and other.startswith("egressd-") and other < base):
                ratio = medians[base] / medians[other]
                faster = (f"{base} {1 / ratio:.1f}x faster" if ratio < 1
                          else f"{base} {ratio:.1f}x slower")
                print(f"{base}/{other} wall-time ratio: {ratio:.2f} ({faster})")
    if "sha256" in medians:
        print(f"ceiling of any audit whose report carries the capture's SHA-256 here: "
              f"{args.packets / medians['sha256']:,.0f} packets/s (the digest alone)")
    return 1 if failed or not totals_ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
