"""Every capture of the shared external corpus through the whole audit.

Real captures from public projects — odd link types, tunnels, IPv6 extension
chains, fragments, broken files.  For each: no exception, and every packet
record read is accounted for, either in a flow or under a decode-error reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import require_shared

from egressd.audit import Audit
from egressd.config import parse_policy
from egressd.geo import open_resolver
from egressd.sources.base import CaptureError

pytestmark = pytest.mark.shared

POLICY = b"home_countries: [CN]\n"


def corpus() -> list[tuple[Path, dict[str, str]]]:
    folder = require_shared("pcaps-external")
    lines = [ln for ln in (folder / "MANIFEST.tsv").read_text().splitlines()
             if not ln.startswith("#")]
    return [(folder / row["file"], row) for row in csv.DictReader(lines, delimiter="\t")]


def test_every_packet_of_every_capture_is_accounted_for() -> None:
    resolver = open_resolver(None, None)
    checked = 0
    for path, row in corpus():
        audit = Audit(parse_policy(POLICY, "policy.yaml"), resolver)
        try:
            summary = audit.add_capture(str(path))
        except CaptureError:
            assert row["read_status"] in ("not_capture", "unsupported"), path.name
            continue
        result = audit.finish(policy_path="p", policy_sha256="s")
        in_flows = sum(f.packets_out + f.packets_in for f in result.flows)
        undecoded = sum(summary.decode_errors.values())
        assert in_flows + undecoded == summary.packets, (path.name, summary.decode_errors)
        if row["read_status"] in ("cut_short", "damaged"):
            assert summary.truncated, path.name
        checked += 1
    assert checked >= 60
