"""Live capture under load: egressd's LiveSource (ring and recvmsg) against tcpdump.

Two network namespaces joined by a veth pair; a sender in one writes 64-byte
UDP frames at a given rate for a few seconds, and one capturing tool at a time
listens on the other end:

* ``ring``           LiveSource(ring=True): TPACKET_V3 receive ring (the default);
* ``ring-decode``    the same, and ``decode_batch`` on every batch (the daemon's next stage);
* ``recvmsg``        LiveSource(ring=False): one recvmsg per frame;
* ``recvmsg-decode`` the same with ``decode_batch`` (not in the default list);
* ``ring-fanout2``, ``ring-decode-fanout2``  ``ring``/``ring-decode`` in two receiving
  processes sharing the interface through one ``PACKET_FANOUT`` group (``fanout=``, flow
  hash, as the daemon's ``capture_workers: 2``), counts summed (not in the default list);
* ``tcpdump``        ``tcpdump -i IF -Z root -w /dev/null`` (when installed; ``-Z root``
  so that tcpdump, started as root, does not hand the output file to its own
  user: for /dev/null that would change the device's owner).

The sender is ``tcpreplay`` (``--pps``/``--topspeed``, looping over a generated
pcap held in memory) when installed, else a Python loop on a raw packet socket.
All tools use the filter ``ip or ip6`` and the same kernel buffer size
(``--buffer-mib``: ring size, socket buffer, ``tcpdump -B`` -- per process).  The
sender and the capturing tool are pinned to two different CPUs (``--pin``), so
that a tool that burns more CPU does not slow the sender down by taking its core;
of the two fanout members the first gets the capture's CPU, the second the
sender's (with two CPUs there is no third).  The generated frames are 1000
(tcpreplay) or 64 (Python sender) UDP flows, one source port each, for every
tool alike, so that the fanout hash spreads them over the members.

The rates are a ladder (``max``: as fast as the sender goes); at every step the
tools still in the race run in alternation, ``--runs`` times, so background load
hits all of them alike.  A tool leaves the ladder at the first rate with kernel
drops in any run, or when the sender could not reach the rate asked (its
ceiling, not the tool's).  Then ``--bisect`` rounds halve the gap between each
tool's last clean rate and its first rate with drops.  It prints every run, the
medians per step, per tool the highest rate with zero drops in every run (and
the rate the sender really reached there), and the ratios to tcpdump.  Needs root.

    python bench/bench_capture.py                            # default ladder, 3 runs
    python bench/bench_capture.py --rates 500000,1000000,max --runs 5 --bisect 3
    python bench/bench_capture.py --tools ring,ring-decode,ring-fanout2,ring-decode-fanout2,tcpdump
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import vethlab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TX_IF, RX_IF = "bench-tx", "bench-rx"
TOOLS = ("ring", "ring-decode", "ring-fanout2", "ring-decode-fanout2", "recvmsg",
         "recvmsg-decode", "tcpdump")
DEFAULT_TOOLS = "ring,ring-decode,recvmsg,tcpdump"
SATURATED = 0.95
"""A sender that reaches less than this share of the rate asked is at its ceiling."""
FANOUT_GROUP = 0x4567
"""The PACKET_FANOUT group id of the fanout tools (ids are per network namespace)."""
STEP = 10_000
"""Bisection stops when the gap is this small (frames/s); midpoints are rounded to it."""

Run = dict[str, float]


# -- child processes (run inside a namespace) ----------------------------------------------


def _frames(size: int, count: int = 64) -> list[bytes]:
    """``count`` UDP/IPv4 Ethernet frames of ``size`` bytes (different source ports)."""
    payload = bytes(max(0, size - 14 - 20 - 8))
    out = []
    for i in range(count):
        udp = struct.pack("!HHHH", 10000 + i, 5000, 8 + len(payload), 0) + payload
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                          socket.inet_aton("192.0.2.1"), socket.inet_aton("198.51.100.7"))
        words = struct.unpack("!10H", hdr)
        total = sum(words)
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        hdr = hdr[:10] + struct.pack("!H", ~total & 0xFFFF) + hdr[12:]
        # To a unicast address nobody owns: the receiving stack drops it at once.
        eth = bytes.fromhex("020000000002" "020000000001" "0800")
        out.append(eth + hdr + udp)
    return out


def write_pcap(path: Path, frames: list[bytes]) -> None:
    """A classic pcap (Ethernet, microseconds) of ``frames``, one microsecond apart."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", i // 1_000_000, i % 1_000_000, len(frame), len(frame)))
            f.write(frame)


def child_send(ifname: str, rate: int, seconds: float, size: int) -> None:
    """The Python sender: paced to ``rate`` frames/s, or unpaced when ``rate`` is 0."""
    frames = _frames(size)
    nframes = len(frames)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, 0))
    send = sock.send
    sent = 0
    chunk = max(1, min(256, rate // 2000)) if rate > 0 else 256
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        due = int((now - start) * rate) if rate > 0 else sent + chunk
        while sent < due:
            for _ in range(chunk):
                try:
                    send(frames[sent % nframes])
                except BlockingIOError:
                    continue
                sent += 1
        now = time.perf_counter()
        if rate > 0 and sent >= int((now - start) * rate) + chunk:
            time.sleep(0.0002)
            now = time.perf_counter()
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - start}), flush=True)


def child_recv(ifname: str, ring: bool, buffer_bytes: int, decode: bool,
               fanout: int | None) -> None:
    from egressd.decode.batch import decode_batch
    from egressd.sources.live import LiveSource

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    source = LiveSource([ifname], ring=ring, ring_bytes=buffer_bytes,
                        buffer_bytes=buffer_bytes, fanout=fanout)
    got = 0
    print("ready", flush=True)
    for _, batch in source.batches(stop):
        got += len(batch)
        if decode and len(batch):
            decode_batch(batch)
    packets, drops = source.stats()[ifname]
    source.close()
    print(json.dumps({"received": got, "packets": packets, "drops": drops}), flush=True)


# -- the run -------------------------------------------------------------------------------


def setup(tag: str) -> tuple[str, str]:
    return vethlab.setup("egb", tag, TX_IF, RX_IF)


teardown = vethlab.teardown


def _tcpdump_counts(text: str) -> tuple[int, int, int]:
    def grab(what: str) -> int:
        m = re.search(r"(\d+) packets? " + what, text)
        return int(m.group(1)) if m else -1
    return grab("captured"), grab("received by filter"), grab("dropped by kernel")


class Sender:
    """Runs the sender in the sending namespace: tcpreplay, or the Python loop."""

    def __init__(self, kind: str, tx: str, args: argparse.Namespace, workdir: Path) -> None:
        self.kind, self.tx, self.args = kind, tx, args
        self.pin = _pin(args.pin, 0)
        self.pcap = workdir / f"frames-{args.size}.pcap"
        if kind == "tcpreplay":
            write_pcap(self.pcap, _frames(args.size, 1000))

    def describe(self) -> str:
        if self.kind == "tcpreplay":
            out = subprocess.run(["tcpreplay", "--version"], capture_output=True, text=True)
            m = re.search(r"version:\s*(\S+)", out.stdout + out.stderr)
            return (f"tcpreplay {m.group(1) if m else '?'} (--pps with --pps-multi and "
                    "--timer=select, or --topspeed; --preload-pcap, looping over 1000 frames)")
        missing = "" if shutil.which("tcpreplay") else " (tcpreplay is not installed)"
        return f"Python loop on a raw packet socket{missing}"

    def send(self, rate: int) -> tuple[int, float]:
        """Sends at ``rate`` frames/s (0: as fast as it goes); returns (frames, seconds)."""
        args = self.args
        if self.kind == "python":
            me = [sys.executable, str(Path(__file__).resolve())]
            snd = subprocess.run(["ip", "netns", "exec", self.tx, *self.pin, *me,
                                  "--child-send", TX_IF,
                                  "--rate", str(rate), "--seconds", str(args.seconds),
                                  "--size", str(args.size)],
                                 capture_output=True, text=True, check=True)
            res = json.loads(snd.stdout)
            return int(res["sent"]), float(res["seconds"])
        pace = (["--topspeed"] if rate <= 0 else
                ["--pps", str(rate), "--pps-multi", str(max(1, rate // 1000)),
                 "--timer", "select"])
        snd = subprocess.run(["ip", "netns", "exec", self.tx, *self.pin, "tcpreplay", "-i", TX_IF,
                              "--preload-pcap", "--no-flow-stats", "--loop", "0",
                              "--duration", str(max(1, round(args.seconds))), *pace,
                              str(self.pcap)], capture_output=True, text=True, check=False)
        text = snd.stdout + snd.stderr
        m = re.search(r"Actual: (\d+) packets .* sent in ([\d.]+) seconds", text)
        if snd.returncode != 0 or m is None:
            raise RuntimeError(f"tcpreplay failed ({snd.returncode}): {text.strip()}")
        ok = re.search(r"Successful packets:\s+(\d+)", text)
        return int(ok.group(1) if ok else m.group(1)), float(m.group(2))


def _pin(cpus: str, which: int) -> list[str]:
    """``taskset`` prefix for the sender (``which`` 0) or the capture (1), if asked for."""
    return ["taskset", "-c", cpus.split(",")[which]] if cpus else []


def _tool(tool: str) -> tuple[str, bool, int]:
    """``ring-decode-fanout2`` -> (capture mode, decode, processes in the fanout group; 0: none)."""
    parts = tool.split("-")
    members = next((int(p[6:]) for p in parts if p.startswith("fanout")), 0)
    return parts[0], "decode" in parts, members


def _pin_member(cpus: str, member: int) -> list[str]:
    """Pinning of fanout member ``member``: the capture's CPU, then the sender's, in turn."""
    return _pin(cpus, 1 - member % 2)


def _describe_pin(cpus: str, tools: list[str]) -> str:
    if not cpus:
        return "none"
    snd, capt = cpus.split(",")
    text = f"sender on CPU {snd}, capturing tool on CPU {capt}"
    members = max((_tool(t)[2] for t in tools if t != "tcpdump"), default=0)
    if members:
        where = ", ".join(f"{m + 1} on CPU {_pin_member(cpus, m)[-1]}" for m in range(members))
        text += (f"; fanout members {where} (with two CPUs one member shares the sender's CPU, "
                 "where veth also does the kernel's side of every capture)")
    return text


def one_run(tool: str, sender: Sender, rx: str, rate: int, args: argparse.Namespace) -> Run:
    me = [sys.executable, str(Path(__file__).resolve())]
    cap: subprocess.Popen[str] | None = None
    caps: list[subprocess.Popen[str]] = []
    if tool == "tcpdump":
        kib = str(args.buffer_mib * 1024)
        cap = subprocess.Popen(["ip", "netns", "exec", rx, *_pin(args.pin, 1), "tcpdump",
                                "-i", RX_IF, "-n", "-Z", "root", "-B", kib, "-w", "/dev/null",
                                "ip or ip6"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cap.stderr is not None
        cap.stderr.readline()  # "listening on …": the ring is set up
    elif tool != "none":
        mode, decode, members = _tool(tool)
        for member in range(max(1, members)):
            pin = _pin_member(args.pin, member) if members else _pin(args.pin, 1)
            caps.append(subprocess.Popen(
                ["ip", "netns", "exec", rx, *pin, *me, "--child-recv", RX_IF, "--mode", mode,
                 "--buffer-mib", str(args.buffer_mib), *(["--decode"] if decode else []),
                 *(["--fanout", str(FANOUT_GROUP)] if members else [])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for c in caps:
            # Every member has joined the group before the first frame.
            assert c.stdout is not None
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{tool} did not start: {c.stderr.read() if c.stderr else ''}")
        sent, seconds = sender.send(rate)
        if cap is not None or caps:
            time.sleep(args.settle)
    finally:
        outs: list[str] = []
        if cap is not None:
            cap.send_signal(signal.SIGINT)
            out, err = cap.communicate(timeout=60)
        for c in caps:
            c.send_signal(signal.SIGTERM)
        for c in caps:
            outs.append(c.communicate(timeout=60)[0])
    run: Run = {"received": 0, "packets": 0, "drops": 0}
    if cap is not None:
        run["received"], run["packets"], run["drops"] = _tcpdump_counts(err)
    for i, out in enumerate(outs):
        res = json.loads(out.strip().splitlines()[-1])
        for key in ("received", "packets", "drops"):
            run[key] += res[key]
        if len(outs) > 1:
            run[f"received{i}"] = res["received"]
    run.update(sent=sent, pps=sent / seconds,
               # Sent but neither captured nor counted as a kernel drop by the tool.
               lost=sent - run["received"] - run["drops"])
    return run


def _split(run: Run) -> str:
    """How the fanout members shared the frames received, if there were several."""
    parts = [f"{run[k]:.0f}" for k in sorted(run) if re.fullmatch(r"received\d+", k)]
    return f" (members {' + '.join(parts)})" if parts else ""


def _rate_name(rate: int) -> str:
    return "max" if rate <= 0 else str(rate)


def _parse_rates(text: str) -> list[int]:
    rates = [0 if r.strip() == "max" else int(r) for r in text.split(",") if r.strip()]
    return sorted(set(r for r in rates if r > 0)) + ([0] if 0 in rates else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="200000,400000,600000,700000,800000,900000,1000000,max",
                    help="ladder of frames per second, comma-separated; 'max': as fast as "
                         "the sender goes (default %(default)s)")
    ap.add_argument("--bisect", type=int, default=2,
                    help="rounds halving each tool's gap between its last clean rate and "
                         "its first rate with drops (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="sending time per run (whole seconds with tcpreplay)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and rate")
    ap.add_argument("--size", type=int, default=64, help="frame size in bytes")
    ap.add_argument("--buffer-mib", type=int, default=32,
                    help="kernel buffer per tool: ring size, socket buffer, tcpdump -B")
    ap.add_argument("--tools", default=DEFAULT_TOOLS,
                    help=f"comma-separated subset of {', '.join(TOOLS)} "
                         "(default %(default)s)")
    ap.add_argument("--sender", choices=("auto", "tcpreplay", "python"), default="auto",
                    help="auto: tcpreplay when installed, else the Python loop")
    ap.add_argument("--pin", metavar="S,C", default="auto",
                    help="run the sender on CPU S and the capturing tool on CPU C (taskset); "
                         "auto (default): the first two CPUs this process may use, if there "
                         "are two and taskset is installed; none: no pinning")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds the tool gets to catch up after the sender stops")
    ap.add_argument("--child-send", metavar="IF")
    ap.add_argument("--child-recv", metavar="IF")
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--mode", choices=("ring", "recvmsg"), default="ring")
    ap.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fanout", type=int, metavar="GROUP", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_send:
        child_send(args.child_send, args.rate, args.seconds, args.size)
        return 0
    if args.child_recv:
        child_recv(args.child_recv, args.mode == "ring", args.buffer_mib << 20, args.decode,
                   args.fanout)
        return 0

    if os.geteuid() != 0:
        print("needs root (network namespaces, packet sockets)", file=sys.stderr)
        return 2
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    if "tcpdump" in tools and shutil.which("tcpdump") is None:
        print("tcpdump is not installed: skipped", file=sys.stderr)
        tools.remove("tcpdump")
    kind = args.sender
    if kind == "auto":
        kind = "tcpreplay" if shutil.which("tcpreplay") else "python"
    elif kind == "tcpreplay" and shutil.which("tcpreplay") is None:
        ap.error("tcpreplay is not installed")
    if args.pin == "auto":
        cpus = sorted(os.sched_getaffinity(0))
        args.pin = (f"{cpus[0]},{cpus[1]}" if len(cpus) >= 2 and shutil.which("taskset")
                    else "")
    elif args.pin == "none":
        args.pin = ""
    elif not re.fullmatch(r"\d+,\d+", args.pin):
        ap.error("--pin takes S,C (two CPU numbers), auto or none")
    rates = _parse_rates(args.rates)
    started = time.monotonic()
    results: dict[tuple[str, int], list[Run]] = {}
    med = statistics.median

    def step(plan: dict[str, int]) -> None:
        """Runs every tool at its rate, alternating, ``--runs`` times."""
        for run in range(args.runs):
            for tool, rate in plan.items():
                r = one_run(tool, sender, rx, rate, args)
                results.setdefault((tool, rate), []).append(r)
                print(f"  run {run + 1} rate {_rate_name(rate):>8} {tool:<19} sent "
                      f"{r['sent']:>9.0f} ({r['pps']:>8.0f}/s) received {r['received']:>9.0f} "
                      f"drops {r['drops']:>8.0f} lost {r['lost']:>6.0f}{_split(r)}", flush=True)

    def clean(tool: str, rate: int) -> bool:
        return all(r["drops"] == 0 for r in results[tool, rate])

    def pps(tool: str, rate: int) -> float:
        return float(med(r["pps"] for r in results[tool, rate]))

    good: dict[str, int] = {}  # highest clean rate asked (0: max)
    bad: dict[str, int] = {}   # lowest rate asked with drops
    ceiling: set[str] = set()  # clean at the sender's ceiling: the limit was not reached
    with tempfile.TemporaryDirectory(prefix="egb-") as work:
        tx, rx = setup(str(os.getpid()))
        try:
            sender = Sender(kind, tx, args, Path(work))
            print(f"sender: {sender.describe()}")
            print("pinning: " + _describe_pin(args.pin, tools))
            alone = one_run("none", sender, rx, 0, args)
            print(f"sender alone (nothing capturing), as fast as it goes: "
                  f"{alone['pps']:.0f} frames/s", flush=True)
            active = list(tools)
            for rate in rates:
                if not active:
                    break
                print(f"rate {_rate_name(rate)}: {', '.join(active)}", flush=True)
                step({t: rate for t in active})
                for t in list(active):
                    if not clean(t, rate):
                        bad[t] = rate
                        active.remove(t)
                        continue
                    good[t] = rate
                    if rate <= 0 or pps(t, rate) < SATURATED * rate:
                        ceiling.add(t)
                        active.remove(t)
            for _ in range(args.bisect):
                plan: dict[str, int] = {}
                for t in bad:
                    lo = pps(t, good[t]) if t in good and good[t] <= 0 else good.get(t, 0)
                    hi = bad[t] if bad[t] > 0 else pps(t, bad[t])
                    mid = int(round((lo + hi) / 2 / STEP) * STEP)
                    if hi - lo > 2 * STEP and lo < mid < hi:
                        plan[t] = mid
                if not plan:
                    break
                print("bisect: " + ", ".join(f"{t} {r}" for t, r in plan.items()), flush=True)
                step(plan)
                for t, r in plan.items():
                    if clean(t, r):
                        good[t] = r
                    else:
                        bad[t] = r
        finally:
            teardown(tx, rx)

    print(f"\nmedians over {args.runs} runs, {args.size}-byte frames, {args.seconds:g} s per "
          f"run, {args.buffer_mib} MiB kernel buffer, sender {kind}, "
          f"{'pinned to CPUs ' + args.pin if args.pin else 'not pinned'} "
          f"(alone: {alone['pps']:.0f}/s); {time.monotonic() - started:.0f} s in all")
    print("(sender/s: the rate the sender reached; the kernel delivers to the capture on the "
          "sender's CPU, so a capture slows it down; lost: sent, neither received nor counted "
          "as a drop)")
    print(f"{'tool':<19} {'asked/s':>8} {'sender/s':>9} {'received':>10} {'drops':>9} "
          f"{'lost':>6}  zero drops")
    for (t, rate), rs in sorted(results.items(), key=lambda kv: (
            TOOLS.index(kv[0][0]), kv[0][1] <= 0, kv[0][1])):
        print(f"{t:<19} {_rate_name(rate):>8} {pps(t, rate):>9.0f} "
              f"{med(r['received'] for r in rs):>10.0f} {med(r['drops'] for r in rs):>9.0f} "
              f"{med(r['lost'] for r in rs):>6.0f}  {'yes' if clean(t, rate) else 'no'}")

    best: dict[str, float] = {}
    print("\nhighest rate with zero drops in every run (the rate the sender reached there):")
    for t in tools:
        if t not in good:
            best[t] = 0.0
            print(f"  {t:<19} none (drops already at {_rate_name(bad[t])})")
            continue
        # The highest rate the sender reached in a step without drops.
        top = max((r for u, r in results if u == t and clean(t, r)), key=lambda r: pps(t, r))
        best[t] = pps(t, top)
        if t in ceiling:
            note = (f"no drops; asked {_rate_name(good[t])}, the sender reached only "
                    f"{pps(t, good[t]):.0f}/s while it captured: its limit is higher")
        elif t in bad:
            rs = results[t, bad[t]]
            hit = [r["drops"] / max(1, r["sent"]) for r in rs if r["drops"]]
            note = (f"drops at {_rate_name(bad[t])} (sender {pps(t, bad[t]):.0f}/s) in "
                    f"{len(hit)} of {len(rs)} runs, up to {max(hit):.1%} of the frames")
        else:
            note = "the ladder ended"
        print(f"  {t:<19} asked {_rate_name(top):>8}, sender {best[t]:>8.0f}/s"
              f"{'+' if t in ceiling else ' '}  {note}")
    if "tcpdump" in tools and best.get("tcpdump"):
        for t in tools:
            if t == "tcpdump":
                continue
            ratio = best[t] / best["tcpdump"]
            bound = ("" if t not in ceiling and "tcpdump" not in ceiling else
                     " (one or both without drops up to where the sender fell short: "
                     "not their limits)")
            print(f"egressd {t}/tcpdump zero-drop rate ratio {ratio:.2f}{bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
