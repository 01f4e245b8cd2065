"""Live capture under load: egressd's LiveSource (ring and recvmsg) against tcpdump.

Two network namespaces joined by a veth pair; a sender process in one writes
prebuilt UDP frames with a raw packet socket at a fixed rate for a few
seconds, and one capturing tool at a time listens on the other end:

* ``ring``     LiveSource(ring=True): TPACKET_V3 receive ring;
* ``recvmsg``  LiveSource(ring=False): one recvmsg per frame;
* ``tcpdump``  ``tcpdump -i IF -w /dev/null`` (when installed).

All three use the filter ``ip or ip6`` and the same kernel buffer size
(``--buffer-mib``: ring size, socket buffer, ``tcpdump -B``).  The tools run in
alternation at every rate, so background load hits all of them alike.  Per
tool and rate it prints the median over runs of frames sent, received by the
tool and dropped by the kernel, then the highest rate with zero drops in
every run and the ratio egressd/tcpdump.  Needs root.

    python bench/bench_capture.py                       # default rates, 3 runs
    python bench/bench_capture.py --rates 50000,100000,200000 --seconds 2 --runs 5
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TX_IF, RX_IF = "bench-tx", "bench-rx"
TOOLS = ("ring", "recvmsg", "tcpdump")


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


def child_send(ifname: str, rate: int, seconds: float, size: int) -> None:
    frames = _frames(size)
    nframes = len(frames)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, 0))
    send = sock.send
    sent = 0
    chunk = max(1, min(256, rate // 2000))
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        due = int((now - start) * rate)
        while sent < due:
            for _ in range(chunk):
                try:
                    send(frames[sent % nframes])
                except BlockingIOError:
                    continue
                sent += 1
        now = time.perf_counter()
        if sent >= int((now - start) * rate) + chunk:
            time.sleep(0.0002)
            now = time.perf_counter()
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - start}), flush=True)


def child_recv(ifname: str, ring: bool, buffer_bytes: int, decode: bool) -> None:
    from egressd.decode.batch import decode_batch
    from egressd.sources.live import LiveSource

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    source = LiveSource([ifname], ring=ring, ring_bytes=buffer_bytes,
                        buffer_bytes=buffer_bytes)
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


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setup(tag: str) -> tuple[str, str]:
    tx, rx = f"egb-{tag}-tx", f"egb-{tag}-rx"
    for ns in (tx, rx):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # No IPv6 neighbour discovery or MLD: the sender's frames are all there is.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "link", "add", TX_IF, "netns", tx, "type", "veth", "peer", RX_IF, "netns", rx)
    sh("ip", "-n", tx, "link", "set", TX_IF, "up")
    sh("ip", "-n", rx, "link", "set", RX_IF, "up")
    sh("ip", "-n", rx, "link", "set", RX_IF, "address", "02:00:00:00:00:03")
    return tx, rx


def teardown(tx: str, rx: str) -> None:
    for ns in (tx, rx):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _tcpdump_counts(text: str) -> tuple[int, int, int]:
    def grab(what: str) -> int:
        m = re.search(r"(\d+) packets? " + what, text)
        return int(m.group(1)) if m else -1
    return grab("captured"), grab("received by filter"), grab("dropped by kernel")


def one_run(tool: str, tx: str, rx: str, rate: int, args: argparse.Namespace) -> dict[str, int]:
    me = [sys.executable, str(Path(__file__).resolve())]
    if tool == "tcpdump":
        kib = str(args.buffer_mib * 1024)
        cap = subprocess.Popen(["ip", "netns", "exec", rx, "tcpdump", "-i", RX_IF, "-n", "-B",
                                kib, "-w", "/dev/null", "ip or ip6"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cap.stderr is not None
        cap.stderr.readline()  # "listening on …": the ring is set up
    else:
        cap = subprocess.Popen(["ip", "netns", "exec", rx, *me, "--child-recv", RX_IF,
                                "--mode", tool, "--buffer-mib", str(args.buffer_mib),
                                *(["--decode"] if args.decode else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cap.stdout is not None
        if cap.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{tool} did not start: {cap.stderr.read() if cap.stderr else ''}")
    try:
        snd = subprocess.run(["ip", "netns", "exec", tx, *me, "--child-send", TX_IF,
                              "--rate", str(rate), "--seconds", str(args.seconds),
                              "--size", str(args.size)],
                             capture_output=True, text=True, check=True)
        sent = json.loads(snd.stdout)
        time.sleep(args.settle)
    finally:
        cap.send_signal(signal.SIGINT if tool == "tcpdump" else signal.SIGTERM)
        out, err = cap.communicate(timeout=60)
    if tool == "tcpdump":
        received, _filtered, drops = _tcpdump_counts(err)
    else:
        res = json.loads(out.strip().splitlines()[-1])
        received, drops = res["received"], res["drops"]
    return {"sent": sent["sent"], "pps": int(sent["sent"] / sent["seconds"]),
            "received": received, "drops": drops}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="50000,100000,200000,300000,400000,600000",
                    help="frames per second, comma-separated (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=3.0, help="sending time per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and rate")
    ap.add_argument("--size", type=int, default=64, help="frame size in bytes")
    ap.add_argument("--buffer-mib", type=int, default=32,
                    help="kernel buffer per tool: ring size, socket buffer, tcpdump -B")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--decode", action="store_true",
                    help="egressd also decodes every batch (the daemon's next stage)")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds the tool gets to catch up after the sender stops")
    ap.add_argument("--child-send", metavar="IF")
    ap.add_argument("--child-recv", metavar="IF")
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--mode", choices=("ring", "recvmsg"), default="ring")
    args = ap.parse_args()
    if args.child_send:
        child_send(args.child_send, args.rate, args.seconds, args.size)
        return 0
    if args.child_recv:
        child_recv(args.child_recv, args.mode == "ring", args.buffer_mib << 20, args.decode)
        return 0

    if os.geteuid() != 0:
        print("needs root (network namespaces, packet sockets)", file=sys.stderr)
        return 2
    tools = [t for t in args.tools.split(",") if t]
    if "tcpdump" in tools and shutil.which("tcpdump") is None:
        print("tcpdump is not installed: skipped", file=sys.stderr)
        tools.remove("tcpdump")
    rates = [int(r) for r in args.rates.split(",")]
    tx, rx = setup(str(os.getpid()))
    results: dict[tuple[str, int], list[dict[str, int]]] = {}
    try:
        for rate in rates:
            for run in range(args.runs):
                for tool in tools:  # alternate the tools at every rate
                    r = one_run(tool, tx, rx, rate, args)
                    results.setdefault((tool, rate), []).append(r)
                    print(f"  run {run + 1} rate {rate:>7} {tool:<8} sent {r['sent']:>8} "
                          f"({r['pps']:>7}/s) received {r['received']:>8} "
                          f"drops {r['drops']:>8}", flush=True)
    finally:
        teardown(tx, rx)

    med = statistics.median
    print(f"\nmedians over {args.runs} runs, {args.size}-byte frames, {args.seconds:g} s "
          f"per run, {args.buffer_mib} MiB kernel buffer{', decode' if args.decode else ''}")
    print("(sent/s: the rate the sender reached; delivering to a slow socket slows it down)")
    print(f"{'rate':>8} " + " ".join(
        f"{t + ' sent/s':>15} {t + ' recv':>13} {t + ' drop':>13}" for t in tools))
    for rate in rates:
        row = [f"{rate:>8}"]
        for t in tools:
            rs = results[t, rate]
            row.append(f"{med(r['pps'] for r in rs):>15.0f}")
            row.append(f"{med(r['received'] for r in rs):>13.0f}")
            row.append(f"{med(r['drops'] for r in rs):>13.0f}")
        print(" ".join(row))
    best: dict[str, float] = {}
    for t in tools:
        # The rate the sender really reached, not the one asked for.
        clean = [med(r["pps"] for r in results[t, rate]) for rate in rates
                 if all(r["drops"] == 0 for r in results[t, rate])]
        best[t] = max(clean, default=0)
        print(f"highest rate with zero drops in every run, {t}: "
              f"{f'{best[t]:.0f}/s' if best[t] else 'none'}")

    def share(t: str, rate: int) -> float:
        return float(med(r["received"] / max(1, r["sent"]) for r in results[t, rate]))

    if "tcpdump" in tools:
        for t in ("ring", "recvmsg"):
            if t not in tools:
                continue
            ratio = best[t] / best["tcpdump"] if best["tcpdump"] else float("nan")
            got = [share(t, rate) / max(1e-9, share("tcpdump", rate)) for rate in rates]
            print(f"egressd {t}/tcpdump: zero-drop rate ratio {ratio:.2f}; share of sent "
                  "frames received, ratio per rate " + ", ".join(f"{g:.2f}" for g in got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
