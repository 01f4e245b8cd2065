"""End to end on MaxMind's own test databases (from the shared reference folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require_shared
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapWriter

from egressd.cli import main

pytestmark = pytest.mark.shared

POLICY = """\
home_countries: [CN]
routes:
  - name: se-partner
    approval: DPA-7
    to: {countries: [SE]}
  - name: dod-asn
    approval: ASN-APPROVAL-1
    to: {asns: [721]}
"""

REMOTES = ["81.2.69.142", "89.160.20.129", "214.1.1.1", "175.16.199.1", "1.1.1.1",
           "::ffff:81.2.69.160", "2001:218::1", "2001:250::1"]


def test_report_fields_from_maxmind_test_databases(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    geo = require_shared("geoip") / "test-data"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    cap = tmp_path / "c.pcap"
    w = PcapWriter(str(cap), linktype=1, sync=True)
    for i, remote in enumerate(REMOTES):
        ip = (IPv6(src="fd00::5", dst=remote) if ":" in remote
              else IP(src="10.0.0.5", dst=remote))
        p = Ether() / ip / TCP(sport=40000 + i, dport=443, flags="PA") / Raw(b"z" * 10)
        p.time = 1_772_352_000 + i
        w.write(p)
    w.close()
    code = main(["audit", "--policy", str(policy), "--geoip-db",
                 str(geo / "GeoIP2-Country-Test.mmdb"), "--asn-db",
                 str(geo / "GeoLite2-ASN-Test.mmdb"), "--format", "json", str(cap)])
    rep = json.loads(capsys.readouterr().out)
    assert code == 1
    flows = {f["remote_ip"]: f for f in rep["flows"]}
    gb = flows["81.2.69.142"]
    assert (gb["country"], gb["registered_country"], gb["verdict"], gb["reason"]) == (
        "GB", "US", "violation", "no_route")
    se = flows["89.160.20.129"]
    assert (se["country"], se["asn"], se["as_org"], se["verdict"], se["approval"]) == (
        "SE", 29518, "Bredband2 AB", "approved", "DPA-7")
    anycast = flows["214.1.1.1"]  # anycast: no country, but the ASN route still applies
    assert (anycast["country"], anycast["asn"], anycast["verdict"], anycast["route"]) == (
        None, 721, "approved", "dod-asn")
    assert flows["175.16.199.1"]["verdict"] == "domestic"
    assert (flows["1.1.1.1"]["verdict"], flows["1.1.1.1"]["reason"]) == ("unknown", "no_country")
    assert flows["::ffff:81.2.69.160"]["country"] == "GB"
    assert flows["2001:218::1"]["country"] == "JP"
    assert flows["2001:250::1"]["verdict"] == "domestic"
    types = [g["database_type"] for g in rep["geoip"]]
    assert types == ["GeoIP2-Country", "GeoLite2-ASN"]
    assert all(g["build_epoch"] == 1770245369 for g in rep["geoip"])
