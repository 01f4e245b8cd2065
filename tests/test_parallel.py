"""``egressd audit --jobs N``: the same report, byte for byte, whatever N.

Each case runs the command line as a user would, once with one process and
once with several, and compares the JSON reports (all but ``generated_at``).
The captures: the committed samples (fragments, names, TCP port reuse, link
types, damage), a generated capture with thousands of flows of every kind,
and, when the shared reference folder is present, real captures from it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_shared
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.utils import wrpcap

from egressd.parallel import MIN_CORES, MIN_PARALLEL_BYTES, default_jobs

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"
DEMO_POLICY = ROOT / "examples" / "policy.yaml"


def audit(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "egressd", "audit", "--format", "json",
                           "--fail-on", "never", "--no-progress", *args],
                          cwd=ROOT, capture_output=True, input=stdin, timeout=600, check=False)


def report(*args: str) -> dict[str, Any]:
    proc = audit(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    doc: dict[str, Any] = json.loads(proc.stdout)
    doc.pop("generated_at")
    return doc


def policy_of(capture: Path) -> Path:
    own = capture.with_name(capture.name.split(".")[0] + ".policy.yaml")
    return own if own.exists() else DEMO_POLICY


@pytest.mark.parametrize("name", ["demo.pcapng", "names.pcap", "fragments.pcap",
                                  "tcp-reuse.pcap", "truncated.pcap", "vlan-qinq.pcap"])
def test_samples_give_the_same_report_with_several_jobs(name: str) -> None:
    capture = PCAPS / name
    policy = str(policy_of(capture))
    one = report("--policy", policy, "--jobs", "1", str(capture))
    assert one["flows"]
    for jobs in ("2", "3"):
        assert report("--policy", policy, "--jobs", jobs, str(capture)) == one


def generated(path: Path, seed: int) -> Path:
    """Thousands of flows: TCP with teardown and reuse, UDP, ICMP, IPv6, fragments, DNS."""
    rng = random.Random(seed)
    t = 1_772_352_000.0
    pkts = []
    for i in range(3000):
        t += rng.random() * 0.05
        client = f"10.20.{rng.randrange(4)}.{rng.randrange(1, 250)}"
        remote = f"{rng.choice([1, 8, 36, 49, 52, 81, 133, 203])}.{rng.randrange(256)}." \
                 f"{rng.randrange(256)}.{rng.randrange(1, 255)}"
        kind = rng.randrange(6)
        sport = 30000 + rng.randrange(200)  # reused often
        if kind == 0:
            for flags, size, back in (("S", 0, False), ("SA", 0, True), ("PA", rng.randrange(900),
                                      False), ("FA", 0, False), ("FA", 0, True), ("A", 0, False)):
                src, dst, sp, dp = (remote, client, 443, sport) if back else \
                    (client, remote, sport, 443)
                pkts.append((t, IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags)
                             / Raw(b"d" * size)))
                t += 0.001
        elif kind == 1:
            pkts.append((t, IP(src=client, dst=remote) / UDP(sport=sport, dport=53)
                         / DNS(rd=1, qd=DNSQR(qname=f"h{i}.example"))))
            pkts.append((t + 0.01, IP(src=remote, dst=client) / UDP(sport=53, dport=sport)
                         / DNS(qr=1, qd=DNSQR(qname=f"h{i}.example"),
                               an=DNSRR(rrname=f"h{i}.example", rdata="203.0.113.7", ttl=60))))
            pkts.append((t + 0.02, IP(src=client, dst="203.0.113.7")
                         / TCP(sport=sport, dport=8443, flags="S")))
        elif kind == 2:
            pkt = IP(src=client, dst=remote, id=i) / UDP(sport=sport, dport=4500) \
                / Raw(b"f" * 1400)
            pkts.extend((t, f) for f in fragment(pkt, fragsize=512))
        elif kind == 3:
            pkts.append((t, IP(src=client, dst=remote) / ICMP(type=8, id=i % 7)))
            pkts.append((t + 0.01, IP(src=remote, dst=client) / ICMP(type=0, id=i % 7)))
        elif kind == 4:
            pkts.append((t, IPv6(src=f"fd00::{i % 50:x}", dst=f"2001:db8:{i % 9}::1")
                         / UDP(sport=sport, dport=443) / Raw(b"q" * 64)))
        else:
            pkts.append((t, IP(src=remote, dst=client) / TCP(sport=sport, dport=22, flags="S")))
    pkts.sort(key=lambda p: p[0])
    packets = []
    for ts, p in pkts:
        p.time = ts
        packets.append(p)
    wrpcap(str(path), packets, linktype=101)  # raw IP: IPv4 and IPv6 alike
    return path


def test_many_flows_give_the_same_report_with_several_jobs(tmp_path: Path) -> None:
    capture = generated(tmp_path / "many.pcap", seed=7)
    one = report("--policy", str(DEMO_POLICY), "--jobs", "1", str(capture))
    assert len(one["flows"]) > 2000
    assert any(f["name_source"] == "dns" for f in one["flows"])
    for jobs in ("2", "4"):
        assert report("--policy", str(DEMO_POLICY), "--jobs", jobs, str(capture)) == one
    # Several captures read as one long capture, split the same way.
    second = generated(tmp_path / "more.pcap", seed=8)
    both = report("--policy", str(DEMO_POLICY), "--jobs", "1", str(capture), str(second))
    assert report("--policy", str(DEMO_POLICY), "--jobs", "3", str(capture),
                  str(second)) == both


def test_default_is_one_process_here_or_several_on_bigger_machines(tmp_path: Path) -> None:
    """Whatever the default picks, the report is the one of a single process."""
    capture = generated(tmp_path / "many.pcap", seed=9)
    assert report("--policy", str(DEMO_POLICY), str(capture)) == report(
        "--policy", str(DEMO_POLICY), "--jobs", "1", str(capture))


@pytest.mark.shared
def test_real_captures_give_the_same_report_with_several_jobs() -> None:
    corpus = require_shared("pcaps-external")
    names = ["PcapPlusPlus-example.pcap", "PcapPlusPlus-tls2.pcap",
             "zeek-firefox-102.13.0esr-blog-cloudflare-com.pcap", "zeek-ipv6-fragmented-dns.pcap"]
    for name in names:
        capture = str(corpus / name)
        one = report("--policy", str(DEMO_POLICY), "--jobs", "1", capture)
        assert report("--policy", str(DEMO_POLICY), "--jobs", "2", capture) == one, name


def test_errors_are_the_same_with_several_jobs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture file at all" * 10)
    one = audit("--policy", str(DEMO_POLICY), "--jobs", "1", str(junk))
    many = audit("--policy", str(DEMO_POLICY), "--jobs", "3", str(junk))
    assert one.returncode == many.returncode == 2
    assert one.stderr == many.stderr


def test_stdin_needs_one_process() -> None:
    data = (PCAPS / "names.pcap").read_bytes()
    proc = audit("--policy", str(policy_of(PCAPS / "names.pcap")), "--jobs", "2", "-",
                 stdin=data)
    assert proc.returncode == 2
    assert b"standard input can be read by one process only" in proc.stderr
    # Without --jobs, standard input is read by one process, as always.
    ok = audit("--policy", str(policy_of(PCAPS / "names.pcap")), "-", stdin=data)
    assert ok.returncode == 0 and json.loads(ok.stdout)["flows"]


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_jobs_must_be_a_positive_number(value: str) -> None:
    proc = audit("--policy", str(DEMO_POLICY), "--jobs", value, str(PCAPS / "demo.pcapng"))
    assert proc.returncode == 2
    assert b"--jobs" in proc.stderr


def test_default_jobs(tmp_path: Path) -> None:
    small = PCAPS / "demo.pcapng"
    assert default_jobs([str(small)]) == 1  # small input: one process
    assert default_jobs(["-"]) == 1
    big = tmp_path / "big.pcap"
    with open(big, "wb") as f:
        f.truncate(MIN_PARALLEL_BYTES)  # sparse: only its size matters here
    import os

    cores = len(os.sched_getaffinity(0))
    assert default_jobs([str(big)]) == (1 if cores < MIN_CORES else min(cores - 1, 8))
