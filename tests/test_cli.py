"""End to end: `egressd audit` on captures and GeoIP databases the tests build themselves."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mmdb_builder import build_mmdb
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, PcapWriter

from egressd.cli import main

T0 = 1_772_352_000.0

POLICY = """\
home_countries: [CN]
zones:
  customer-data: [10.20.0.0/16]
routes:
  - name: hk-backup
    approval: CAC-2025-0142
    from: [customer-data]
    to: {countries: [HK]}
    protocols: [tcp]
    ports: [443]
"""


def conv(src: str, dst: str, sport: int, dport: int, t: float, size: int) -> list[Any]:
    pkts = []
    for i, (s, d, sp, dp, flags, n) in enumerate([
        (src, dst, sport, dport, "S", 0), (dst, src, dport, sport, "SA", 0),
        (src, dst, sport, dport, "PA", size), (dst, src, dport, sport, "A", 0),
        (src, dst, sport, dport, "FA", 0), (dst, src, dport, sport, "FA", 0),
        (src, dst, sport, dport, "A", 0)]):
        p = Ether() / IP(src=s, dst=d) / TCP(sport=sp, dport=dp, flags=flags) / Raw(b"x" * n)
        p.time = t + i * 0.01
        pkts.append(p)
    return pkts


def packets() -> list[Any]:
    out = []
    out += conv("10.20.0.5", "203.0.113.9", 50000, 443, T0, 1000)      # approved (HK)
    out += conv("10.20.0.5", "198.51.100.7", 50001, 443, T0 + 1, 700)  # violation (US)
    out += conv("10.30.0.8", "192.0.2.8", 50002, 80, T0 + 2, 300)      # domestic (CN)
    u = Ether() / IP(src="10.30.0.8", dst="8.8.8.8") / UDP(sport=5353, dport=53) / Raw(b"q" * 20)
    u.time = T0 + 3
    out.append(u)                                                      # unknown (no country)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    db = build_mmdb(tmp / "country.mmdb", "GeoLite2-Country", {
        "203.0.113.0/24": {"country": {"iso_code": "HK"}, "registered_country": {"iso_code": "HK"}},
        "198.51.100.0/24": {"country": {"iso_code": "US"},
                            "registered_country": {"iso_code": "US"}},
        "192.0.2.0/24": {"country": {"iso_code": "CN"}, "registered_country": {"iso_code": "CN"}},
    })
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    pcap = tmp / "gw.pcap"
    w = PcapWriter(str(pcap), linktype=1, sync=True)
    for p in packets():
        w.write(p)
    w.close()
    ng = tmp / "gw.pcapng"
    wng = PcapNgWriter(str(ng))
    for p in packets():
        wng.write(p)
    wng.close()
    return {"db": db, "policy": policy, "pcap": pcap, "pcapng": ng, "tmp": tmp}


def audit(env: dict[str, Path], *args: str, capsys: pytest.CaptureFixture[str]
          ) -> tuple[int, str, str]:
    code = main(["audit", "--policy", str(env["policy"]), "--geoip-db", str(env["db"]), *args])
    out, err = capsys.readouterr()
    return code, out, err


def report(env: dict[str, Path], capsys: pytest.CaptureFixture[str], *args: str
           ) -> tuple[int, dict[str, Any]]:
    code, out, _ = audit(env, "--format", "json", *args, capsys=capsys)
    return code, json.loads(out)


def test_json_report_has_every_flow_and_verdict(env: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, rep = report(env, capsys, str(env["pcap"]))
    assert code == 1
    assert rep["schema"] == "egressd.audit/1"
    assert rep["summary"]["packets"] == 22 and rep["summary"]["flows"] == 4
    assert rep["summary"]["verdicts"] == {"domestic": 1, "approved": 1, "violation": 1,
                                          "unknown": 1, "internal": 0, "transit": 0}
    by_remote = {f["remote_ip"]: f for f in rep["flows"]}
    hk = by_remote["203.0.113.9"]
    assert (hk["verdict"], hk["route"], hk["approval"], hk["zone"]) == (
        "approved", "hk-backup", "CAC-2025-0142", "customer-data")
    assert hk["bytes_out"] == 40 * 3 + 1040 and hk["packets_out"] == 4
    assert hk["first_seen"] == "2026-03-01T08:00:00.000000Z"
    us = by_remote["198.51.100.7"]
    assert (us["verdict"], us["reason"], us["route"]) == ("violation", "no_route", None)
    assert by_remote["8.8.8.8"]["verdict"] == "unknown"
    assert by_remote["8.8.8.8"]["reason"] == "no_country"
    assert rep["summary"]["bytes_out_by_country"] == {"CN": 460, "HK": 1160, "US": 860,
                                                      "unknown": 48}
    cap = rep["captures"][0]
    assert (cap["format"], cap["link_types"], cap["packets"], cap["truncated"]) == (
        "pcap", [1], 22, False)
    assert cap["bytes"] == env["pcap"].stat().st_size
    assert cap["sha256"] == hashlib.sha256(env["pcap"].read_bytes()).hexdigest()
    assert rep["geoip"][0]["database_type"] == "GeoLite2-Country"


def test_same_inputs_give_the_same_report_byte_for_byte(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    def run() -> list[str]:
        _, out, _ = audit(env, "--format", "json", str(env["pcap"]), capsys=capsys)
        return [line for line in out.splitlines() if '"generated_at"' not in line]

    assert run() == run()


def test_pcapng_gzip_directory_and_stdin_give_the_same_flows(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, base = report(env, capsys, str(env["pcap"]))
    gz = env["tmp"] / "gw.pcap.gz"
    gz.write_bytes(gzip.compress(env["pcap"].read_bytes()))
    d = env["tmp"] / "dir"
    d.mkdir(exist_ok=True)
    shutil.copy(env["pcapng"], d / "a.pcapng")
    for path in (str(env["pcapng"]), str(gz), str(d)):
        _, rep = report(env, capsys, path)
        assert rep["flows"] == base["flows"], path
    proc = subprocess.run(
        [sys.executable, "-m", "egressd", "audit", "--policy", str(env["policy"]),
         "--geoip-db", str(env["db"]), "--format", "json", "-"],
        input=env["pcap"].read_bytes(), capture_output=True, check=False)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["flows"] == base["flows"]


@pytest.mark.parametrize(("fail_on", "expected"), [("violation", 1), ("unknown", 1),
                                                   ("never", 0)])
def test_fail_on(env: dict[str, Path], capsys: pytest.CaptureFixture[str], fail_on: str,
                 expected: int) -> None:
    code, _, _ = audit(env, "--fail-on", fail_on, str(env["pcap"]), capsys=capsys)
    assert code == expected


def test_fail_on_unknown_fails_where_violation_does_not(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    only_unknown = env["tmp"] / "unknown.pcap"
    w = PcapWriter(str(only_unknown), linktype=1, sync=True)
    w.write(packets()[-1])
    w.close()
    assert audit(env, str(only_unknown), capsys=capsys)[0] == 0
    assert audit(env, "--fail-on", "unknown", str(only_unknown), capsys=capsys)[0] == 1


def test_text_report_and_output_file(env: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = audit(env, str(env["pcap"]), capsys=capsys)
    assert code == 1
    assert "Verdicts" in out and "violation" in out and "198.51.100.7:443" in out
    target = env["tmp"] / "report.json"
    code, out, _ = audit(env, "--format", "json", "--output", str(target), str(env["pcap"]),
                         capsys=capsys)
    assert out == "" and json.loads(target.read_text())["summary"]["flows"] == 4
    assert not [p for p in os.listdir(env["tmp"]) if p.startswith(".egressd-report-")]


def test_output_to_a_device_or_fifo_writes_through_it(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Renaming a finished report over /dev/null would replace the device node.
    code, out, _ = audit(env, "--format", "json", "--output", os.devnull, str(env["pcap"]),
                         capsys=capsys)
    assert code == 1 and out == ""
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = env["tmp"] / "report.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, out, _ = audit(env, "--format", "json", "--output", str(fifo), str(env["pcap"]),
                         capsys=capsys)
    reader.join(10)
    assert code == 1 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(got[0])["summary"]["flows"] == 4
    assert not [p for p in os.listdir(env["tmp"]) if p.startswith(".egressd-report-")]


def test_truncated_capture_is_read_to_the_damage_and_reported(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cut = env["tmp"] / "cut.pcap"
    data = env["pcap"].read_bytes()
    cut.write_bytes(data[:-30])
    code, out, err = audit(env, "--format", "json", str(cut), capsys=capsys)
    rep = json.loads(out)
    assert code == 1
    assert rep["captures"][0]["truncated"] is True
    assert rep["captures"][0]["packets"] == 21
    assert rep["captures"][0]["sha256"] == hashlib.sha256(cut.read_bytes()).hexdigest()
    assert "damaged" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "pdf"], "invalid choice: 'pdf'"),
    (["NOPE.pcap"], "NOPE.pcap"),
])
def test_usage_errors_exit_2_with_one_line(env: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    extra = [] if args[-1].endswith(".pcap") else [str(env["pcap"])]
    try:
        code, _, err = audit(env, *args, *extra, capsys=capsys)
    except SystemExit as e:  # argparse: usage line, then the error line
        code, err = int(e.code or 0), capsys.readouterr().err
        err = err.strip().splitlines()[-1]
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "error:" in lines[0]


def test_not_a_capture_and_bad_policy_exit_2(env: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    junk = env["tmp"] / "junk.pcap"
    junk.write_bytes(b"hello, this is not a capture file at all")
    assert audit(env, str(junk), capsys=capsys)[0] == 2
    bad = env["tmp"] / "bad.yaml"
    bad.write_text("home_countries: [UK]\n")
    code = main(["audit", "--policy", str(bad), str(env["pcap"])])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:1: home_countries[0]: 'UK'" in err and "GB" in err


def test_first_capture_is_read_while_the_pipeline_loads(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import egressd.audit
    import egressd.cli

    opened: list[tuple[str, str]] = []

    def spy(where: str, real: Any) -> Any:
        def open_input(path: str, **kw: Any) -> Any:
            opened.append((where, path))
            return real(path, **kw)
        return open_input

    monkeypatch.setattr(egressd.cli, "open_input", spy("cli", egressd.cli.open_input))
    monkeypatch.setattr(egressd.audit, "open_input", spy("audit", egressd.audit.open_input))
    before = sum(1 for t in threading.enumerate() if t.name == "read-ahead")
    second = env["tmp"] / "second.pcap"
    shutil.copy(env["pcap"], second)
    code, rep = report(env, capsys, str(env["pcap"]), str(second))
    assert code == 1
    # the first file was opened (and its reading started) by the command line, the
    # second by the audit when it got there; both digests are right
    assert opened == [("cli", str(env["pcap"])), ("audit", str(second))]
    digest = hashlib.sha256(env["pcap"].read_bytes()).hexdigest()
    assert [c["sha256"] for c in rep["captures"]] == [digest, digest]
    assert sum(1 for t in threading.enumerate() if t.name == "read-ahead") == before
    # nothing is read early when the audit stops before reading: the thread ends too
    bad = env["tmp"] / "bad-early.yaml"
    bad.write_text("home_countries: [XX]\n")
    assert main(["audit", "--policy", str(bad), str(env["pcap"])]) == 2
    capsys.readouterr()
    assert sum(1 for t in threading.enumerate() if t.name == "read-ahead") == before


def test_the_command_line_loads_no_pipeline_before_it_reads() -> None:
    code = ("import sys, egressd.cli\n"
            "heavy = [m for m in ('numpy', 'pydantic', 'yaml', 'maxminddb', 'egressd.audit')\n"
            "         if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_bad_policy_with_a_fifo_capture_exits_without_waiting_for_a_writer(
        env: dict[str, Path]) -> None:
    fifo = env["tmp"] / "capture.fifo"
    os.mkfifo(fifo)
    bad = env["tmp"] / "bad-fifo.yaml"
    bad.write_text("home_countries: [UK]\n")
    proc = subprocess.run([sys.executable, "-m", "egressd", "audit", "--policy", str(bad),
                           str(fifo)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "home_countries[0]: 'UK'" in proc.stderr


def test_the_command_flushes_its_report_and_keeps_the_exit_status(env: dict[str, Path]) -> None:
    """``egressd audit`` leaves by os._exit after the report: nothing may be lost."""
    base = [sys.executable, "-m", "egressd", "audit", "--policy", str(env["policy"]),
            "--geoip-db", str(env["db"])]
    proc = subprocess.run([*base, "--format", "json", str(env["pcap"])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1  # the violation
    rep = json.loads(proc.stdout)  # the whole report arrived through the pipe
    assert rep["summary"]["flows"] == 4
    text = subprocess.run([*base, "--fail-on", "never", str(env["pcap"])], capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0
    # the text report ends with the evidence block's command line: all of it was written
    assert text.stdout.splitlines()[-1].strip().startswith("command:")
    assert text.stdout.endswith("\n")
    check = subprocess.run([sys.executable, "-m", "egressd", "check-config", str(env["policy"])],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.endswith("ok (1 route)\n")


def test_the_command_starts_no_blas_threads(env: dict[str, Path]) -> None:
    code = ("import os, sys\n"
            "os.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
            f"sys.argv = ['egressd', 'check-config', {str(env['policy'])!r}]\n"
            "import egressd.cli\n"
            "try:\n"
            "    egressd.cli.run()\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'numpy' in sys.modules\n"
            "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # the last line: the setting, and the threads of the process (numpy loaded, no BLAS pool)
    assert out.splitlines()[-1] == "1 1"


def test_argparse_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["audit"])
    assert exc.value.code == 2


def test_check_config_and_lookup(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(env["policy"])]) == 0
    assert "ok (1 route)" in capsys.readouterr().out
    assert main(["lookup", "--policy", str(env["policy"]), "--geoip-db", str(env["db"]),
                 "--from", "10.20.0.5", "203.0.113.9", "198.51.100.7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "country=HK" in out[0] and "verdict=approved" in out[0] and "route=hk-backup" in out[0]
    assert "country=US" in out[1] and "verdict=violation" in out[1]


def test_embedded_default_is_announced(env: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "--policy", str(env["policy"]), "--format", "json", str(env["pcap"])])
    out, err = capsys.readouterr()
    rep = json.loads(out)
    assert code in (0, 1)
    assert rep["geoip"][0]["source"] == "iptocc" and rep["geoip"][0]["path"] is None
    assert err.count("registry") == 1


def test_transit_heavy_capture_warns_about_internal_networks(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cap = env["tmp"] / "transit.pcap"
    w = PcapWriter(str(cap), linktype=1, sync=True)
    for i in range(3):
        p = Ether() / IP(src="198.51.100.7", dst=f"203.0.113.{i + 1}") / UDP(sport=1, dport=2)
        p.time = T0 + i
        w.write(p)
    w.close()
    code, out, err = audit(env, "--format", "json", str(cap), capsys=capsys)
    rep = json.loads(out)
    assert code == 0 and rep["summary"]["verdicts"]["transit"] == 3
    assert any("internal_networks is probably wrong" in w for w in rep["warnings"])
    assert "internal_networks is probably wrong" in err


def test_idle_timeout_flags(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cap = env["tmp"] / "udp-gap.pcap"
    w = PcapWriter(str(cap), linktype=1, sync=True)
    for t in (T0, T0 + 61):
        p = Ether() / IP(src="10.30.0.8", dst="192.0.2.8") / UDP(sport=5000, dport=53)
        p.time = t
        w.write(p)
    w.close()
    assert report(env, capsys, str(cap))[1]["summary"]["flows"] == 2
    assert report(env, capsys, "--idle-timeout", "udp=120", str(cap))[1]["summary"]["flows"] == 1
    code, _, err = audit(env, "--idle-timeout", "udp=-1", str(cap), capsys=capsys)
    assert code == 2 and "--idle-timeout 'udp=-1'" in err


def test_daemon_keys_are_ignored_by_the_audit(env: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = env["tmp"] / "daemon.yaml"
    cfg.write_text(POLICY + 'interfaces: [nonexistent0]\nmetrics: {listen: "127.0.0.1:9855"}\n')
    code = main(["audit", "--policy", str(cfg), "--geoip-db", str(env["db"]), "--format", "json",
                 str(env["pcap"])])
    assert code == 1 and json.loads(capsys.readouterr().out)["summary"]["flows"] == 4


def test_unanswered_inbound_probe_is_no_finding(env: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cap = env["tmp"] / "probe.pcap"
    w = PcapWriter(str(cap), linktype=1, sync=True)
    p = Ether() / IP(src="198.51.100.7", dst="10.20.0.5") / TCP(sport=5555, dport=22, flags="S")
    p.time = T0
    w.write(p)
    w.close()
    code, rep = report(env, capsys, str(cap))
    [flow] = rep["flows"]
    assert (flow["verdict"], flow["initiator"], flow["bytes_out"]) == ("violation", "remote", 0)
    assert code == 0


def test_progress_bar_advances_by_bytes_read(env: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import egressd.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    with cli._progress(str(env["pcap"]), True) as progress:
        assert progress is not None
        progress(100)  # a rich progress bar on stderr: must accept byte counts
    with cli._progress(str(env["pcap"]), False) as progress:
        assert progress is None
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 10**12)
    with cli._progress(str(env["pcap"]), True) as progress:
        assert progress is None  # small captures get no bar
