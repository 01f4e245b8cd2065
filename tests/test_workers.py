"""Several capture processes (``capture_workers``): one daemon, its flows shared by the kernel.

A real daemon in the gateway namespace runs two capture processes in one
PACKET_FANOUT group; the test checks what a user sees: every flow counted
once in /metrics (the sums of both processes), an alert per flow through the
supervisor's one alert sink, DNS names whichever process got the DNS answer,
a reload, and a clean stop with every process gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from netns import Lab, wait_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import (  # noqa: F401  (lab and geodb are fixtures)
    Daemon,
    alerts,
    free_port,
    geodb,
    lab,
    scrape,
    serve_tcp,
    tcp_upload,
    udp_send,
    value,
    write_config,
)
from test_daemon_names import dns_reply

from egressd.metrics import Metrics, WorkerMetrics, snapshot


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def test_worker_metrics_serve_the_sums_of_every_process() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    m1, m2 = Metrics(one), Metrics(two)
    m1.flows.labels("violation", "US", "").inc(3)
    m2.flows.labels("violation", "US", "").inc(4)
    m2.flows.labels("approved", "HK", "hk-backup").inc(1)
    m1.active_flows.set(10)
    m2.active_flows.set(5)
    m1.alerts_sent.labels("jsonl").inc(9)  # not a pipeline metric: never summed
    parent = CollectorRegistry()
    supervisor = Metrics(parent)
    supervisor.unregister_pipeline()
    merged = WorkerMetrics()
    parent.register(merged)
    merged.update(0, snapshot(one))
    merged.update(1, snapshot(two))
    merged.update(1, snapshot(two))  # a newer snapshot replaces the older one
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(generate_latest(parent).decode())
           for s in f.samples}
    assert got[("egressd_flows_total", (("country", "US"), ("route", ""),
                                        ("verdict", "violation")))] == 7
    assert got[("egressd_flows_total", (("country", "HK"), ("route", "hk-backup"),
                                        ("verdict", "approved")))] == 1
    assert got[("egressd_active_flows", ())] == 15
    # The capture processes' own alert counters are not summed: the supervisor sends alerts.
    assert ("egressd_alerts_sent_total", (("sink", "jsonl"),)) not in got
    # Every pipeline metric is served once, with its help and type, even before a snapshot.
    empty = CollectorRegistry()
    Metrics(empty, pipeline=False)
    empty.register(WorkerMetrics())
    names = [f.name for f in text_string_to_metric_families(generate_latest(empty).decode())]
    assert len(names) == len(set(names)) and "egressd_flows" in names


def cap_eff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for {pid}")


def test_two_capture_processes_count_alert_and_name_every_flow_once(
        lab: Lab, geodb: Path, tmp_path: Path) -> None:  # noqa: F811
    ns_a, ns_b = lab.a.ns, lab.b.ns
    mport, aport = free_port(), free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, geodb, mport, aport)
    config.write_text(config.read_text().replace("suppress_seconds: 60", "suppress_seconds: 0")
                      + "capture_workers: 2\nnames: {hold_seconds: 30}\n")
    serve_tcp(ns_b, "203.0.113.10", 443)
    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1", timeout=30)
        supervisor = d.proc.pid  # `ip netns exec` runs the daemon in its own process

        def two() -> list[int] | None:
            found = children(supervisor)
            return found if len(found) == 2 else None

        workers = wait_for(two, timeout=10, what="two capture processes")
        # Least privilege: capture processes keep CAP_NET_RAW, the supervisor nothing.
        assert cap_eff(supervisor) == 0
        assert [cap_eff(w) for w in workers] == [1 << 13, 1 << 13]
        # 24 UDP flows to the US (violations), each its own alert group member.
        for port in range(24):
            udp_send(ns_a, "203.0.113.9", 5000 + port, b"x" * (100 + port))
        # A DNS answer, then a plain upload to the answered address.
        dns_reply(ns_b, "203.0.113.10", "10.20.0.5", "files.other.example", "203.0.113.10")
        time.sleep(0.2)
        tcp_upload(ns_a, "203.0.113.10", 443, 2000)

        def counted() -> dict[Any, float] | None:
            m = scrape(ns_b, mport)
            udp = value(m, "egressd_flows_total", verdict="violation", country="US", route="")
            return m if udp >= 28 else None

        m = wait_for(counted, timeout=15, what="every flow counted by the two processes")
        # Each flow once: 24 UDP, the port-unreachable errors they get back (one ICMP
        # flow), the upload, the DNS answer's flow and the ICMP error the client sends
        # back for it (no socket on the answer's port).
        time.sleep(1.5)  # a second round of metric snapshots: nothing counted twice
        m = scrape(ns_b, mport)
        assert value(m, "egressd_flows_total", verdict="violation", country="US",
                     route="") == 28
        try:
            got = wait_for(lambda: a if len(a := alerts(tmp_path)) >= 26 else None, timeout=15,
                           what="an alert per exporting flow")
        except pytest.fail.Exception:
            have = alerts(tmp_path)
            pytest.fail(f"{len(have)} of 26 alerts after 15 s: "
                        f"{sorted((a['proto'], a['dst_ip'], a['dst_port']) for a in have)}\n"
                        f"daemon output:\n{d.output()}")
        udp_ports = sorted(a["dst_port"] for a in got if a["proto"] == "udp"
                           and a["dst_ip"] == "203.0.113.9")
        assert udp_ports == list(range(5000, 5024))
        (upload,) = [a for a in got if a["proto"] == "tcp"]
        assert (upload["server_name"], upload["name_source"]) == ("files.other.example", "dns")
        assert value(m, "egressd_packets_total", interface="veth-b") >= 24

        # A reload is checked by the supervisor and passed on.
        os.kill(supervisor, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.output(), timeout=10, what="the reload")
        assert all(os.path.exists(f"/proc/{w}") for w in workers)
    finally:
        code = d.stop()
    assert code == 0, d.output()
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)
