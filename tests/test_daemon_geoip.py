"""The live daemon and a GeoIP database rewritten in place while it runs.

``geoipupdate`` renames a complete new file into place, but an operator may
just as well ``cp`` a download over the configured file: the file is then
truncated and written again while egressd has it open, and for a moment (or
for good, if the copy fails half-way) it holds a partial database.  The
daemon must keep answering from the database it loaded, say clearly which
file it cannot use, and take the next good file that is renamed into place.

Every check looks up an address the daemon has not seen before, so the
answer comes from the database and not from the lookup cache.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from mmdb_builder import build_mmdb
from netns import Lab, call_in, wait_for
from test_daemon import (
    Daemon,
    free_port,
    geodb,  # noqa: F401  (fixture)
    lab,  # noqa: F401  (fixture)
    scrape,
    udp_send,
    value,
    write_config,
)

from egressd.daemon import GEOIP_CHECK_SECONDS

BAD_DB = "GeoIP database changed on disk but cannot be loaded, keeping the old one: {path}: " \
         "not a MaxMind database (.mmdb) file"
RELOADED = "GeoIP database reloaded from disk"


def filler(n: int, country: str) -> dict[str, dict[str, Any]]:
    """``n`` /24 networks elsewhere, so the file spans many pages like a real database."""
    return {f"45.{i // 128}.{i % 128 * 2}.0/24": {"country": {"iso_code": country},
                                                   "registered_country": {"iso_code": country}}
            for i in range(n)}


def build_big_geodb(path: Path, us_country: str) -> Path:
    records = filler(8000, "FR")
    records.update({
        "203.0.113.0/24": {"country": {"iso_code": us_country},
                           "registered_country": {"iso_code": us_country}},
        "198.51.100.0/24": {"country": {"iso_code": "HK"},
                            "registered_country": {"iso_code": "HK"}},
    })
    return build_mmdb(path, "GeoLite2-Country", records)


def test_partial_and_garbage_geoip_copies_keep_the_loaded_database(
        lab: Lab, geodb: Path, tmp_path: Path) -> None:  # noqa: F811
    ns_a, ns_b = lab.a.ns, lab.b.ns
    db = build_big_geodb(geodb, "US")
    good = db.read_bytes()
    assert len(good) > 16 * 4096  # a truncated copy ends pages before the data section
    mport = free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, db, mport, free_port())
    sink = call_in(ns_b, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("203.0.113.9", 9999))  # takes the datagrams: no ICMP error comes back
    expected = BAD_DB.format(path=db)

    def flows(verdict: str, country: str) -> float:
        return value(scrape(ns_b, mport), "egressd_flows_total", verdict=verdict,
                     country=country, route="")

    def flow_to(addr: str, verdict: str, country: str) -> None:
        before = flows(verdict, country)
        udp_send(ns_a, addr, 9999, b"x" * 64)
        wait_for(lambda: flows(verdict, country) == before + 1, timeout=10,
                 what=f"a {verdict} flow to {country} for {addr}")

    d = Daemon(lab, tmp_path, config)
    try:
        d.notify.wait("READY=1")
        flow_to("203.0.113.9", "violation", "US")

        # A partial copy: `cp` truncates the file and dies half-way.
        with open(db, "wb") as f:
            f.write(good[: len(good) // 2])
        wait_for(lambda: expected in d.output(), timeout=10, what="the partial copy reported")
        flow_to("203.0.113.20", "violation", "US")
        udp_send(ns_a, "198.51.100.20", 53, b"q" * 64)  # approved route to HK, over UDP
        wait_for(lambda: value(scrape(ns_b, mport), "egressd_flows_total", verdict="approved",
                               country="HK", route="hk-backup") == 1, timeout=10,
                 what="the HK flow approved")
        assert flows("violation", "") == 0

        # Garbage of the same size as the good file.
        seen = d.output().count(expected)
        with open(db, "wb") as f:
            f.write(os.urandom(len(good)))
        wait_for(lambda: d.output().count(expected) > seen, timeout=10,
                 what="the garbage file reported")
        # Reported once per version of the file, not at every check.
        reported = d.output().count(expected)
        time.sleep(2 * GEOIP_CHECK_SECONDS + 0.5)
        assert d.output().count(expected) == reported
        flow_to("203.0.113.21", "violation", "US")
        assert d.proc.poll() is None
        assert RELOADED not in d.output()
        assert flows("violation", "") == 0

        # A good database renamed into place (as geoipupdate does) is taken.
        new = build_big_geodb(tmp_path / "new.mmdb", "CN")
        os.replace(new, db)
        wait_for(lambda: RELOADED in d.output(), timeout=10, what="the new database loaded")
        flow_to("203.0.113.22", "domestic", "CN")
        # The error is not repeated once a good file is in place (an absence:
        # give the daemon two more file checks).
        errors = d.output().count(expected)
        time.sleep(2 * GEOIP_CHECK_SECONDS + 0.5)
        assert d.output().count(expected) == errors
        flow_to("203.0.113.23", "domestic", "CN")
    finally:
        code = d.stop()
        d.log.close()
        sink.close()
    assert code == 0, d.output()
