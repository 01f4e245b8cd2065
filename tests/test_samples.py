"""The committed sample captures give the audit outcome written beside them.

Every ``pcaps/NAME.expected.json`` names a capture (``NAME.pcap`` or
``NAME.pcapng``), the policy to audit it with and what the audit must find.
Each one becomes a test that runs ``python -m egressd audit --format json`` on
the capture as a separate process, exactly as a user would, and compares:

* the exit status (default ``--fail-on violation``);
* packets read, whether the capture is truncated, decode errors (when stated);
* the verdict counts;
* the flows, as a multiset keyed by (proto, src_ip, src_port, dst_ip, dst_port):
  every expected flow must be in the report with every field it states, and
  the report must have no other flows.  A field absent from an expected flow
  is not compared (the samples leave out what the contract leaves open, such
  as the zone of a flow between two internal hosts).

A last test regenerates the samples into a temporary folder and checks that
the result is byte-identical to the committed files, so the generator stays
deterministic and the committed samples stay current.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
SUFFIX = ".expected.json"
EXPECTED = sorted(PCAPS.glob("*" + SUFFIX))
KEY_FIELDS = ("proto", "src_ip", "src_port", "dst_ip", "dst_port")
IP_FIELDS = ("src_ip", "dst_ip", "remote_ip")


def _name(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


def _capture(expected_path: Path) -> Path:
    name = _name(expected_path)
    found = [p for p in (PCAPS / f"{name}.pcap", PCAPS / f"{name}.pcapng") if p.exists()]
    assert len(found) == 1, f"{expected_path.name}: expected one capture named {name}.pcap(ng)"
    return found[0]


def _canonical_ip(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value


def _normalise(flow: dict[str, Any]) -> dict[str, Any]:
    out = dict(flow)
    for name in IP_FIELDS:
        if name in out:
            out[name] = _canonical_ip(out[name])
    return out


def _key(flow: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(flow.get(name) for name in KEY_FIELDS)


def _differences(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """The fields an expected flow states that the actual flow has otherwise."""
    return {
        name: {"expected": value, "actual": actual.get(name, "<missing>")}
        for name, value in expected.items()
        if actual.get(name, "<missing>") != value
    }


def _match_group(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """Problems pairing the expected and reported flows that share one key."""
    if len(expected) != len(actual):
        return [f"{len(expected)} flow(s) expected, {len(actual)} reported"]
    if len(expected) <= 6:
        for order in itertools.permutations(actual):
            if all(not _differences(e, a) for e, a in zip(expected, order, strict=True)):
                return []
    else:
        left = list(actual)
        for e in expected:
            hit = next((a for a in left if not _differences(e, a)), None)
            if hit is None:
                break
            left.remove(hit)
        else:
            return []
    problems = []
    for i, e in enumerate(expected):
        closest = min(actual, key=lambda a: len(_differences(e, a)))
        problems.append(f"flow #{i + 1}: {json.dumps(_differences(e, closest), sort_keys=True)}")
    return problems


def compare_flows(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """Problems comparing the expected flows with the report's, as a keyed multiset."""
    want: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    got: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for flow in expected:
        f = _normalise(flow)
        want[_key(f)].append(f)
    for flow in actual:
        f = _normalise(flow)
        got[_key(f)].append(f)
    problems = []
    for key in sorted(set(want) | set(got), key=repr):
        for problem in _match_group(want.get(key, []), got.get(key, [])):
            problems.append(f"{key}: {problem}")
    return problems


def _nonzero(counts: dict[str, int] | None) -> dict[str, int]:
    return {k: v for k, v in (counts or {}).items() if v}


def run_audit(policy: str, capture: Path, geoip: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "egressd", "audit", "--policy", policy, "--format", "json"]
    if geoip != "embedded":
        cmd += ["--geoip-db", geoip]
    cmd.append(str(capture.relative_to(ROOT)))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.parametrize("expected_path", EXPECTED, ids=[_name(p) for p in EXPECTED])
def test_sample(expected_path: Path) -> None:
    exp = json.loads(expected_path.read_text())
    capture = _capture(expected_path)
    proc = run_audit(exp["policy"], capture, exp.get("geoip", "embedded"))
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (exit status {proc.returncode}); stderr:\n{proc.stderr}")

    problems: list[str] = []
    if proc.returncode != exp["exit_status"]:
        problems.append(f"exit status {proc.returncode}, expected {exp['exit_status']}")
    summary = report["summary"]
    captures = report["captures"]
    if len(captures) != 1:
        problems.append(f"{len(captures)} captures in the report, expected 1")
    cap = captures[0] if captures else {}
    if cap.get("packets") != exp["packets"] or summary.get("packets") != exp["packets"]:
        problems.append(f"packets: capture {cap.get('packets')}, summary "
                        f"{summary.get('packets')}, expected {exp['packets']}")
    if cap.get("truncated") != exp["truncated"]:
        problems.append(f"truncated {cap.get('truncated')}, expected {exp['truncated']}")
    if "decode_errors" in exp and _nonzero(cap.get("decode_errors")) != exp["decode_errors"]:
        problems.append(f"decode_errors {cap.get('decode_errors')}, "
                        f"expected {exp['decode_errors']}")
    if _nonzero(summary.get("verdicts")) != _nonzero(exp["verdicts"]):
        problems.append(f"verdicts {_nonzero(summary.get('verdicts'))}, "
                        f"expected {exp['verdicts']}")
    if summary.get("flows") != len(exp["flows"]):
        problems.append(f"summary.flows {summary.get('flows')}, expected {len(exp['flows'])}")
    problems += compare_flows(exp["flows"], report["flows"])
    if problems:
        pytest.fail(f"{capture.name} audited with {exp['policy']}:\n  " + "\n  ".join(problems)
                    + (f"\nstderr:\n{proc.stderr}" if proc.stderr.strip() else ""))


def test_samples_found() -> None:
    assert EXPECTED, "no pcaps/*.expected.json found"


def test_samples_are_current(tmp_path: Path) -> None:
    """Regenerating gives the committed files, byte for byte."""
    proc = subprocess.run(
        [sys.executable, str(PCAPS / "make_samples.py"), "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated, "the generator wrote nothing"
    stale = [name for name in generated
             if not (PCAPS / name).exists() or (PCAPS / name).read_bytes()
             != (tmp_path / name).read_bytes()]
    assert not stale, (f"not current (run python pcaps/make_samples.py and commit): "
                       f"{', '.join(stale)}")
    orphans = sorted(p.name for p in EXPECTED if p.name not in generated)
    assert not orphans, f"committed but no longer generated: {', '.join(orphans)}"


def test_compare_flows_is_a_keyed_multiset() -> None:
    """The comparison itself: order-free, duplicate keys counted, absent fields ignored."""
    a = {"proto": "tcp", "src_ip": "fd00::1", "src_port": 1, "dst_ip": "2001:db8::1",
         "dst_port": 443, "packets_out": 3}
    b = dict(a, packets_out=5)
    reported = [dict(b, zone="x", dst_ip="2001:0db8::0001"), dict(a, zone="y")]
    assert compare_flows([a, b], reported) == []
    assert compare_flows([a, a], reported)
    assert compare_flows([a], reported)
    assert compare_flows([a, b, dict(a, src_port=2)], reported)
