"""`egressd audit --verify REPORT.json`: a stored report against a fresh run of the audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from mmdb_builder import build_mmdb
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapWriter

from egressd.cli import main
from egressd.verify import differences

T0 = 1_772_352_000.0
PAYLOAD = b"payload-" * 16

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

COUNTRIES_A = {
    "203.0.113.0/24": {"country": {"iso_code": "HK"}, "registered_country": {"iso_code": "HK"}},
    "198.51.100.0/24": {"country": {"iso_code": "US"}, "registered_country": {"iso_code": "US"}},
}
COUNTRIES_B = {  # the same networks, one of them moved
    "203.0.113.0/24": {"country": {"iso_code": "HK"}, "registered_country": {"iso_code": "HK"}},
    "198.51.100.0/24": {"country": {"iso_code": "DE"}, "registered_country": {"iso_code": "DE"}},
}


def _conv(src: str, dst: str, sport: int, t: float) -> list[Any]:
    pkts = []
    for i, (s, d, sp, dp, flags, data) in enumerate([
            (src, dst, sport, 443, "S", b""), (dst, src, 443, sport, "SA", b""),
            (src, dst, sport, 443, "PA", PAYLOAD), (dst, src, 443, sport, "A", b""),
            (src, dst, sport, 443, "FA", b""), (dst, src, 443, sport, "FA", b"")]):
        p = Ether() / IP(src=s, dst=d) / TCP(sport=sp, dport=dp, flags=flags) / Raw(data)
        p.time = t + i * 0.01
        pkts.append(p)
    return pkts


def _build_db(path: Path, records: dict[str, Any], epoch: int,
              monkeypatch: pytest.MonkeyPatch) -> Path:
    with monkeypatch.context() as m:  # the writer stamps the build time from the clock
        m.setattr("mmdb_writer.time.time", lambda: float(epoch))
        return build_mmdb(path, "GeoLite2-Country", records)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    cap = tmp_path / "gw.pcap"
    w = PcapWriter(str(cap), linktype=1, sync=True)
    for p in _conv("10.20.0.5", "203.0.113.9", 50000, T0) + _conv("10.20.0.5", "198.51.100.7",
                                                                  50001, T0 + 1):
        w.write(p)
    w.close()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    db = _build_db(tmp_path / "country.mmdb", COUNTRIES_A, 1_772_000_000, monkeypatch)
    monkeypatch.chdir(tmp_path)
    return {"cap": cap, "policy": policy, "db": db, "tmp": tmp_path}


def _args(env: dict[str, Path]) -> list[str]:
    return ["audit", "--policy", "policy.yaml", "--geoip-db", "country.mmdb", "gw.pcap"]


def _store(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    report = env["tmp"] / "report.json"
    assert main([*_args(env), "--format", "json", "--output", str(report),
                 "--fail-on", "never"]) == 0
    capsys.readouterr()
    return report


def _verify(env: dict[str, Path], report: Path, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, str, str]:
    code = main([*_args(env), "--verify", str(report)])
    out, err = capsys.readouterr()
    return code, out, err


def test_unchanged_report_matches(env: dict[str, Path], capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    report = _store(env, capsys)
    # generated_at is the one field that may differ.
    data = json.loads(report.read_text())
    data["generated_at"] = "2000-01-01T00:00:00Z"
    report.write_text(json.dumps(data))
    code, out, _ = _verify(env, report, capsys)
    assert (code, out.strip()) == (0, f"{report}: report matches")


def test_flipped_capture_byte_names_the_sha256(env: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    report = _store(env, capsys)
    raw = bytearray(env["cap"].read_bytes())
    at = raw.index(PAYLOAD) + 3  # inside a packet's payload: same flows, other file
    raw[at] ^= 0xFF
    env["cap"].write_bytes(bytes(raw))
    code, out, _ = _verify(env, report, capsys)
    assert code == 1
    assert "captures[0].sha256: report " in out
    assert "captures[0].bytes" not in out and "flows[" not in out


def test_changed_policy_names_policy_sha256(env: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    report = _store(env, capsys)
    env["policy"].write_text(POLICY + "# reviewed\n")
    code, out, _ = _verify(env, report, capsys)
    assert code == 1
    assert "policy.sha256: report " in out


def test_policy_change_that_changes_verdicts(env: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    report = _store(env, capsys)
    env["policy"].write_text(POLICY.replace("[HK]", "[HK, US]"))
    code, out, _ = _verify(env, report, capsys)
    assert code == 1
    assert "policy.sha256" in out
    assert 'flows[1].verdict: report "violation", now "approved"' in out
    assert "summary.verdicts.violation: report 1, now 0" in out


def test_other_geoip_database_names_build_epoch_and_flows(
        env: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    report = _store(env, capsys)
    other = _build_db(env["tmp"] / "other.mmdb", COUNTRIES_B, 1_772_100_000, monkeypatch)
    shutil.copyfile(other, env["db"])
    code, out, _ = _verify(env, report, capsys)
    assert code == 1
    assert "geoip[0].build_epoch: report 1772000000, now 1772100000" in out
    assert 'flows[1].country: report "US", now "DE"' in out
    assert "summary.bytes_out_by_country.DE: missing from the report" in out


def test_output_is_bounded(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = _store(env, capsys)
    data = json.loads(report.read_text())
    for flow in data["flows"]:
        for key in ("bytes_out", "bytes_in", "packets_out", "packets_in", "first_seen",
                    "last_seen", "src_port", "community_id", "zone", "country", "asn", "proto"):
            flow[key] = "changed"
    report.write_text(json.dumps(data))
    code, out, _ = _verify(env, report, capsys)
    lines = out.splitlines()
    assert code == 1
    assert "(24 differences)" in lines[0]
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "... and 4 more"
    assert lines[1].strip().startswith("flows[0].community_id: report \"changed\", now ")


@pytest.mark.parametrize("content", [
    None,                                   # no such file
    "{not json",
    '{"schema": "something.else/1"}',
    "[1, 2, 3]",
    b"\xff\xfe\x00",
])
def test_unreadable_or_foreign_report_is_exit_2(env: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str],
                                                content: str | bytes | None) -> None:
    report = env["tmp"] / "stored.json"
    if isinstance(content, bytes):
        report.write_bytes(content)
    elif content is not None:
        report.write_text(content)
    code, out, err = _verify(env, report, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("egressd: error: ") and str(report) in err


def test_differences_paths() -> None:
    a = {"schema": "s", "generated_at": "x", "captures": [{"sha256": "a"}],
         "summary": {"verdicts": {"violation": 2}}, "flows": [{"bytes_out": 1}, {"x": True}]}
    b = {"schema": "s", "generated_at": "y", "captures": [{"sha256": "b"}],
         "summary": {"verdicts": {"violation": 3}}, "flows": [{"bytes_out": 2}, {"x": 1}, {}]}
    assert list(differences(a, b)) == [
        'captures[0].sha256: report "a", now "b"',
        "summary.verdicts.violation: report 2, now 3",
        "flows[0].bytes_out: report 1, now 2",
        "flows[1].x: report true, now 1",
        "flows: 2 entries in the report, 3 now",
    ]
