"""The local sinks: JSON lines (file, rotation, stdout) and RFC 5424 syslog over AF_UNIX."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_alerts_dedup import SEC, T0, flow, metrics, sample

from egressd.alerts import Alerter, JsonlSink, SyslogSink, alert_json, alert_line
from egressd.alerts.sinks import (
    ALERT_FIELDS,
    SD_PARAMS,
    LogThrottle,
    alert_summary,
    sd_escape,
    syslog_message,
)
from egressd.config import AlertsConfig
from egressd.model import Alert, NameSource, Reason, VerdictKind
from egressd.report import flow_json

GROUP = "violation|10.20.1.7|81.2.69.0/24||no_route"


def alert(count: int = 1, **kw: object) -> Alert:
    return Alert(flow(**kw), "gw1", "eth0", GROUP, T0 + 5 * SEC, count)  # type: ignore[arg-type]


# -- the JSON object -----------------------------------------------------------------


def test_alert_json_is_the_flow_object_plus_alert_fields() -> None:
    a = alert(4)
    obj = alert_json(a)
    flow_part = {k: v for k, v in obj.items() if k not in ALERT_FIELDS}
    assert flow_part == flow_json(a.record)
    assert list(obj)[: len(flow_part)] == list(flow_json(a.record))  # same order, flow first
    assert {k: obj[k] for k in ALERT_FIELDS} == {
        "sensor": "gw1",
        "interface": "eth0",
        "alert_group": GROUP,
        "suppressed_flows": 3,
        "raised_at": "2026-01-01T00:00:05.000000Z",
    }
    assert obj["community_id"] == a.record.community_id


@pytest.mark.parametrize(
    "a",
    [
        alert(),
        Alert(flow(zone="zoné", route='r"\\]x', country=None, dst_port=None), 'gw "ü"', None,
              "g|ü", T0 + 123_456_789, 7),
        Alert(flow(verdict=VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY), "", "br-lan",
              "x", 0, 1),
    ],
)
def test_fast_alert_line_equals_json_dumps(a: Alert) -> None:
    assert alert_line(a) == json.dumps(alert_json(a), ensure_ascii=False, separators=(",", ":"))


# -- JSON lines file -------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_jsonl_appends_lines_to_a_new_or_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"old":1}\n')
    sink = JsonlSink(str(path))
    sink.deliver([alert(1)])
    sink.deliver([alert(2), alert(3)])
    lines = read_lines(path)
    assert lines[0] == {"old": 1}
    assert [line["suppressed_flows"] for line in lines[1:]] == [0, 1, 2]
    assert lines[1] == alert_json(alert(1))
    sink.close()

    fresh = tmp_path / "new.jsonl"
    JsonlSink(str(fresh)).deliver([alert()])
    assert stat.S_IMODE(fresh.stat().st_mode) & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_jsonl_follows_rotation_and_deletion(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    now = [100.0]
    sink = JsonlSink(str(path), monotonic=lambda: now[0])
    sink.deliver([alert(1)])
    path.rename(tmp_path / "alerts.jsonl.1")  # what logrotate does
    # Within a second of the last look the path is not looked at again: the
    # alert still goes to the open (rotated) file ...
    now[0] += 0.5
    sink.deliver([alert(2)])
    # ... and after that the file at the path is opened anew.
    now[0] += 1.0
    sink.deliver([alert(3)])
    assert [x["suppressed_flows"] for x in read_lines(tmp_path / "alerts.jsonl.1")] == [0, 1]
    assert [x["suppressed_flows"] for x in read_lines(path)] == [2]
    path.unlink()
    now[0] += 1.0
    sink.deliver([alert(4)])
    assert [x["suppressed_flows"] for x in read_lines(path)] == [3]
    sink.close()


def test_jsonl_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    JsonlSink("-").deliver([alert(), alert(2)])
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in out] == [alert_json(alert()), alert_json(alert(2))]


def test_jsonl_in_missing_directory_fails_then_recovers_through_the_alerter(
    tmp_path: Path,
) -> None:
    target = tmp_path / "logs" / "alerts.jsonl"
    m = metrics()
    cfg = AlertsConfig(jsonl=str(target), suppress_seconds=0.0, spool_dir=str(tmp_path / "s"))
    with Alerter(cfg, sensor="gw1", metrics=m) as alerter:
        assert alerter.observe(flow(), interface="eth0", now_ns=T0) is not None
        assert sample(m, "egressd_alerts_failed_total", sink="jsonl") == 1
        target.parent.mkdir()
        alerter.observe(flow(), interface="eth0", now_ns=T0 + 1)
    assert sample(m, "egressd_alerts_sent_total", sink="jsonl") == 1
    assert len(read_lines(target)) == 1


# -- syslog ----------------------------------------------------------------------------

HEADER = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (.*)", re.S)


def parse_sd(text: str) -> tuple[str, dict[str, str], str]:
    """One SD-ELEMENT at the start of ``text``: (SD-ID, params, the rest after it)."""
    assert text[0] == "["
    i = 1
    while text[i] not in " ]":
        i += 1
    sd_id = text[1:i]
    params: dict[str, str] = {}
    while text[i] == " ":
        eq = text.index("=", i)
        name = text[i + 1 : eq]
        assert text[eq + 1] == '"'
        i = eq + 2
        value = []
        while text[i] != '"':
            if text[i] == "\\" and text[i + 1] in '"\\]':
                i += 1
            else:
                assert text[i] != "]", "unescaped ] in a parameter value"
            value.append(text[i])
            i += 1
        params[name] = "".join(value)
        i += 1
    assert text[i] == "]"
    return sd_id, params, text[i + 1 :]


def parse_5424(data: bytes) -> dict[str, object]:
    m = HEADER.fullmatch(data.decode("utf-8"))
    assert m is not None, data
    sd_id, params, rest = parse_sd(m[7])
    assert rest.startswith(" ")
    return {"pri": int(m[1]), "timestamp": m[2], "hostname": m[3], "app": m[4],
            "procid": m[5], "msgid": m[6], "sd_id": sd_id, "params": params, "msg": rest[1:]}


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def test_syslog_message_has_every_part(syslog_socket: tuple[str, socket.socket]) -> None:
    path, receiver = syslog_socket
    sink = SyslogSink(path)
    sink.deliver([alert(route='gb "crm" \\ [x]', zone="customer-data",
                        reason=Reason.ZONE_NOT_ALLOWED, server_name="api.crm-vendor.example",
                        name_source=NameSource.SNI)])
    got = parse_5424(receiver.recv(65536))
    assert got == {
        "pri": 3 * 8 + 4,
        "timestamp": "2026-01-01T00:00:05.000000Z",
        "hostname": "gw1",
        "app": "egressd",
        "procid": str(os.getpid()),
        "msgid": "EGRESS",
        "sd_id": "egressd@32473",
        "params": {
            "verdict": "violation",
            "country": "GB",
            "zone": "customer-data",
            "route": 'gb "crm" \\ [x]',
            "reason": "zone_not_allowed",
            "community_id": "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
            "server_name": "api.crm-vendor.example",
            "name_source": "sni",
        },
        "msg": '10.20.1.7 sent 3200 bytes to api.crm-vendor.example (81.2.69.142, GB): '
               'violation zone_not_allowed (route gb "crm" \\ [x])',
    }
    assert list(got["params"]) == list(SD_PARAMS)  # type: ignore[call-overload]
    sink.close()


def test_syslog_short_message_matches_the_example() -> None:
    assert alert_summary(alert()) == (
        "10.20.1.7 sent 3200 bytes to 81.2.69.142 (GB): violation no_route")
    assert alert_summary(alert(3)).endswith("; 2 more flows of this group since the last alert")


def test_sd_escape() -> None:
    assert sd_escape('a"b\\c]d[e') == 'a\\"b\\\\c\\]d[e'


def test_syslog_unknown_is_notice_and_nulls_are_left_out() -> None:
    a = Alert(flow(verdict=VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY, country=None),
              "gw one", None, "g", T0, 1)
    got = parse_5424(syslog_message(a, facility=16, procid=42))
    assert got["pri"] == 16 * 8 + 5
    assert got["hostname"] == "gw_one"
    assert got["procid"] == "42"
    assert got["params"] == {"verdict": "unknown", "reason": "no_country",
                             "community_id": a.record.community_id}
    assert got["msg"] == "10.20.1.7 sent 3200 bytes to 81.2.69.142 (no country): unknown no_country"


def test_syslog_non_ascii_message_gets_a_bom() -> None:
    data = syslog_message(alert(route="grün"))
    assert "] \ufeff10.20.1.7 sent" in data.decode("utf-8")


def test_syslog_socket_missing_is_counted_logged_once_and_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "log")
    m = metrics()
    sink = SyslogSink(path)
    cfg = AlertsConfig(suppress_seconds=0.0, spool_dir=str(tmp_path / "s"))
    caplog.set_level(logging.WARNING, "egressd.alerts")
    with Alerter(cfg, sensor="gw1", metrics=m, sinks=[sink]) as alerter:
        for i in range(3):
            alerter.observe(flow(), interface=None, now_ns=T0 + i)
        assert sample(m, "egressd_alerts_failed_total", sink="syslog") == 3
        warnings = [r for r in caplog.records if "syslog: alert not delivered" in r.getMessage()]
        assert len(warnings) == 1

        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.settimeout(2.0)
        alerter.observe(flow(bytes_out=7), interface=None, now_ns=T0 + 10)
        assert "sent 7 bytes" in receiver.recv(65536).decode()
        assert sample(m, "egressd_alerts_sent_total", sink="syslog") == 1

        # The receiver goes away and comes back (syslog daemon restart).
        receiver.close()
        os.unlink(path)
        alerter.observe(flow(), interface=None, now_ns=T0 + 11)
        assert sample(m, "egressd_alerts_failed_total", sink="syslog") == 4
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.settimeout(2.0)
        alerter.observe(flow(bytes_out=8), interface=None, now_ns=T0 + 12)
        assert "sent 8 bytes" in receiver.recv(65536).decode()
        receiver.close()


def test_syslog_full_receiver_fails_without_blocking(
    syslog_socket: tuple[str, socket.socket],
) -> None:
    path, _receiver = syslog_socket  # never read: its queue fills up
    sink = SyslogSink(path)
    with pytest.raises(BlockingIOError):
        for _ in range(100_000):
            sink.deliver([alert()])
    sink.close()


def test_syslog_rejects_bad_facility() -> None:
    with pytest.raises(ValueError):
        SyslogSink("/nonexistent", facility=24)


# -- throttled logging -----------------------------------------------------------------


def test_log_throttle(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("t"), 60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "t")
    assert throttle.warning("k", "down %s", 1)
    assert not throttle.warning("k", "down %s", 2)
    assert throttle.warning("other", "other")
    now[0] = 61.0
    assert throttle.warning("k", "down %s", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "down 1", "other", "down 3 (1 similar messages suppressed)"]
