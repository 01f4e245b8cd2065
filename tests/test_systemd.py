"""The shipped systemd unit: it verifies, and it is as locked down as the daemon allows."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "egressd.service"


def service_section() -> dict[str, list[str]]:
    """Every key=value line of the unit, by key."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, val = line.partition("=")
            out.setdefault(key.strip(), []).append(val.strip())
    return out


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the systemd package")
    exe = shutil.which("egressd") or f"{sys.executable} -m egressd"
    unit = tmp_path / "egressd.service"
    # The unit names /usr/bin/egressd, where a package installs it; point it at
    # this installation so verify can check the command exists.
    unit.write_text(UNIT.read_text().replace("/usr/bin/egressd", exe))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_unit_runs_unprivileged_and_hardened() -> None:
    s = service_section()
    assert s["Type"] == ["notify"] and s["User"] == ["egressd"]
    assert s["AmbientCapabilities"] == ["CAP_NET_RAW"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    for key, expected in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                          "ProtectHome": "yes", "PrivateTmp": "yes",
                          "Restart": "on-failure", "PrivateMounts": "yes",
                          "StateDirectory": "egressd", "ConfigurationDirectory": "egressd"}.items():
        assert s[key] == [expected], key
    assert set(s["RestrictAddressFamilies"][0].split()) == {
        "AF_PACKET", "AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"}
    assert s["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "check-config /etc/egressd/egressd.yaml" in s["ExecStartPre"][0]
    assert "run --config /etc/egressd/egressd.yaml" in s["ExecStart"][0]
    assert "WatchdogSec" in s


def test_example_config_the_unit_points_at_is_valid() -> None:
    res = subprocess.run([sys.executable, "-m", "egressd", "check-config",
                          str(ROOT / "examples" / "egressd.yaml")], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "ok (1 route)" in res.stdout


def test_exposure_level_is_ok_or_better(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the systemd package")
    unit = tmp_path / "egressd.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/egressd", shutil.which("egressd") or
                                             f"{sys.executable} -m egressd"))
    res = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, check=False)
    last = [ln for ln in res.stdout.splitlines() if "Overall exposure level" in ln]
    assert last, res.stdout + res.stderr
    score = float(last[0].split(":")[1].split()[0])
    assert score <= 2.0, last[0]
