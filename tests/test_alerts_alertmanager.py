"""Alertmanager: payload, and delivery through the spool to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_alerts_dedup import SEC, T0, flow, metrics, sample

from egressd.alerts import Alerter, AlertmanagerSink, DeliveryError, SpoolOptions, alert_payload
from egressd.alerts.alertmanager import alert_annotations, alert_labels
from egressd.alerts.sinks import AlertRejected
from egressd.config import AlertsConfig
from egressd.metrics import Metrics
from egressd.model import Alert, NameSource, Reason, VerdictKind

FAST = SpoolOptions(backoff_initial=0.02, backoff_max=0.1, idle_poll=0.05, lock_wait=2.0)


class AMServer:
    """A stand-in Alertmanager on 127.0.0.1 that records what it accepted.

    ``statuses``: answers to give to the next posts (then 200); ``delay``:
    seconds to sleep before answering; ``reject``: community IDs whose
    presence in a post makes it answer 400.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.accepted: list[dict[str, Any]] = []
        self.posts: list[tuple[str, int, list[dict[str, Any]], dict[str, str]]] = []
        self.statuses: deque[int] = deque()
        self.delay = 0.0
        self.reject: set[str] = set()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AMServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = {a["annotations"].get("community_id") for a in body}
                with owner.lock:
                    status = owner.statuses.popleft() if owner.statuses else 200
                    if ids & owner.reject:
                        status = 400
                    owner.posts.append((self.path, status, body, dict(self.headers)))
                    if status == 200:
                        owner.accepted.extend(body)
                    delay = owner.delay
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self.lock:
            return [a["annotations"]["community_id"] for a in self.accepted]


@pytest.fixture
def server() -> Iterator[AMServer]:
    srv = AMServer().start()
    yield srv
    srv.stop()


def cid(i: int) -> str:
    return f"1:test-{i:04d}"


def make_alerter(tmp_path: Path, url: str, m: Metrics | None = None, **kw: Any) -> Alerter:
    cfg = AlertsConfig(alertmanager=url, suppress_seconds=0.0, spool_dir=str(tmp_path / "spool"),
                       spool_max_bytes=kw.pop("spool_max_bytes", 10_000_000))
    return Alerter(cfg, sensor="gw1", metrics=m, spool_options=kw.pop("options", FAST), **kw)


def send(alerter: Alerter, ids: range) -> None:
    for i in ids:
        assert alerter.observe(flow(cid=cid(i)), interface="eth0", now_ns=time.time_ns())


# -- payload ---------------------------------------------------------------------------


def test_labels_and_annotations_of_a_violation() -> None:
    a = Alert(flow(zone="crm", route="gb-crm", reason=Reason.PORT_NOT_ALLOWED), "gw1", "eth0",
              "grp", T0, 4)
    assert alert_labels(a) == {
        "alertname": "EgressViolation", "severity": "critical", "country": "GB", "zone": "crm",
        "route": "gb-crm", "reason": "port_not_allowed", "sensor": "gw1", "alert_group": "grp"}
    notes = alert_annotations(a)
    assert notes["community_id"] == a.record.community_id
    assert notes["remote_ip"] == "81.2.69.142"
    assert notes["bytes_out"] == "3200"
    assert notes["first_seen"] == "2026-01-01T00:00:00.000000Z"
    assert notes["count"] == "4"
    assert notes["description"].startswith("10.20.1.7 sent 3200 bytes to 81.2.69.142 (GB)")
    assert "summary" in notes
    assert all(isinstance(v, str) and v for v in notes.values())
    assert "server_name" not in notes and "name_source" not in notes  # none known


def test_annotations_carry_the_server_name_but_labels_do_not() -> None:
    a = Alert(flow(reason=Reason.NAME_NOT_ALLOWED, route="gb-crm",
                   server_name="api.crm-vendor.example", name_source=NameSource.QUIC),
              "gw1", "eth0", "grp", T0, 1)
    notes = alert_annotations(a)
    assert (notes["server_name"], notes["name_source"]) == ("api.crm-vendor.example", "quic")
    assert notes["description"].startswith(
        "10.20.1.7 sent 3200 bytes to api.crm-vendor.example (81.2.69.142, GB): violation "
        "name_not_allowed")
    labels = alert_labels(a)
    assert labels["reason"] == "name_not_allowed"
    assert "api.crm-vendor.example" not in labels.values()


def test_labels_of_unknown_leave_empty_values_out() -> None:
    a = Alert(flow(verdict=VerdictKind.UNKNOWN, reason=Reason.NO_COUNTRY, country=None), "gw1",
              None, "grp", T0, 1)
    assert alert_labels(a) == {"alertname": "EgressUnknownCountry", "severity": "warning",
                               "reason": "no_country", "sensor": "gw1", "alert_group": "grp"}


def test_starts_and_ends() -> None:
    a = Alert(flow(), "gw1", None, "g", T0, 1)
    p = alert_payload(a, resend_ns=60 * SEC, now_ns=T0 + SEC)
    assert (p["startsAt"], p["endsAt"]) == ("2026-01-01T00:00:00.000000Z",
                                            "2026-01-01T00:03:00.000000Z")
    assert "generatorURL" not in p
    # Delivered late (it waited in the spool): still fires for one resend interval.
    late = alert_payload(a, resend_ns=60 * SEC, now_ns=T0 + 3600 * SEC, generator_url="http://x/")
    assert late["endsAt"] == "2026-01-01T01:01:00.000000Z"
    assert late["generatorURL"] == "http://x/"


# -- the sink on its own ---------------------------------------------------------------


def test_sink_posts_a_json_array(server: AMServer) -> None:
    AlertmanagerSink(server.url + "/").deliver([Alert(flow(cid=cid(1)), "gw1", None, "g", T0, 1)])
    path, status, body, headers = server.posts[0]
    assert (path, status) == ("/api/v2/alerts", 200)
    assert headers["Content-Type"] == "application/json"
    assert isinstance(body, list) and body[0]["labels"]["alertname"] == "EgressViolation"


@pytest.mark.parametrize(("status", "error"), [(500, DeliveryError), (503, DeliveryError),
                                               (429, DeliveryError), (400, AlertRejected),
                                               (404, AlertRejected)])
def test_sink_status_handling(server: AMServer, status: int, error: type[Exception]) -> None:
    server.statuses.append(status)
    with pytest.raises(error):
        AlertmanagerSink(server.url).deliver([Alert(flow(), "gw1", None, "g", T0, 1)])
    assert issubclass(DeliveryError, OSError)  # the spool retries OSErrors


def test_sink_connection_refused_is_an_oserror(server: AMServer) -> None:
    url = server.url
    server.stop()
    with pytest.raises(OSError):
        AlertmanagerSink(url, timeout=1.0).deliver([Alert(flow(), "gw1", None, "g", T0, 1)])


def test_sink_basic_auth_and_no_proxy(server: AMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would break delivery: it must not be used.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    url = server.url.replace("http://", "http://am%20user:s3cr%3At@")
    AlertmanagerSink(url).deliver([Alert(flow(), "gw1", None, "g", T0, 1)])
    auth = server.posts[0][3]["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"am user:s3cr:t"


# -- through the alerter and its spool -----------------------------------------------


def test_alerts_arrive_with_metrics(tmp_path: Path, server: AMServer) -> None:
    m = metrics()
    with make_alerter(tmp_path, server.url, m) as alerter:
        send(alerter, range(5))
        assert alerter.flush(5.0)
    assert server.ids() == [cid(i) for i in range(5)]
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 5
    assert sample(m, "egressd_alerts_spooled", sink="alertmanager") == 0
    assert sample(m, "egressd_alerts_failed_total", sink="alertmanager") == 0


def test_server_errors_are_retried_without_duplicates(tmp_path: Path, server: AMServer) -> None:
    m = metrics()
    server.statuses.extend([500, 503, 429])
    with make_alerter(tmp_path, server.url, m) as alerter:
        send(alerter, range(3))
        assert alerter.flush(5.0)
    assert server.ids() == [cid(i) for i in range(3)]
    assert sample(m, "egressd_alerts_failed_total", sink="alertmanager") == 3
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 3


def test_rejected_alert_is_dropped_and_does_not_block_the_rest(tmp_path: Path,
                                                                 server: AMServer) -> None:
    m = metrics()
    server.reject.add(cid(2))
    server.delay = 0.05  # let alerts pile up so that some share a post
    with make_alerter(tmp_path, server.url, m) as alerter:
        send(alerter, range(6))
        assert alerter.flush(10.0)
    assert server.ids() == [cid(i) for i in range(6) if i != 2]
    assert sample(m, "egressd_alerts_failed_total", sink="alertmanager") == 1
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 5
    assert alerter.spools["alertmanager"].rejected == 1


def test_server_down_then_up_on_the_same_port_delivers_each_alert_once_in_order(
    tmp_path: Path, server: AMServer
) -> None:
    m = metrics()
    with make_alerter(tmp_path, server.url, m) as alerter:
        send(alerter, range(3))
        assert alerter.flush(5.0)
        server.stop()
        send(alerter, range(3, 20))
        assert not alerter.flush(0.3)
        assert sample(m, "egressd_alerts_spooled", sink="alertmanager") == 17
        assert sample(m, "egressd_alerts_failed_total", sink="alertmanager") >= 1
        server.start()  # same port
        send(alerter, range(20, 25))
        assert alerter.flush(5.0)
    assert server.ids() == [cid(i) for i in range(25)]
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 25
    assert sample(m, "egressd_alerts_spooled", sink="alertmanager") == 0


def test_alerts_spooled_while_down_survive_a_restart(tmp_path: Path, server: AMServer) -> None:
    url = server.url
    server.stop()
    first = make_alerter(tmp_path, url)
    send(first, range(10))
    assert not first.flush(0.2)
    assert first.close(5.0)
    assert server.ids() == []

    m = metrics()
    with make_alerter(tmp_path, url, m) as second:  # restarted while the server is still down
        assert second.spools["alertmanager"].wait_open(5.0)
        send(second, range(10, 12))
        assert not second.flush(0.2)
        assert sample(m, "egressd_alerts_spooled", sink="alertmanager") == 12
        server.start()
        assert second.flush(5.0)
    assert server.ids() == [cid(i) for i in range(12)]
    assert sample(m, "egressd_alerts_sent_total", sink="alertmanager") == 12


def test_slow_server_never_slows_observe(tmp_path: Path, server: AMServer) -> None:
    server.delay = 2.0
    with make_alerter(tmp_path, server.url) as alerter:
        worst = 0.0
        for i in range(20):
            start = time.perf_counter()
            alerter.observe(flow(cid=cid(i)), interface="eth0", now_ns=time.time_ns())
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.01)
        assert worst < 0.05
        server.delay = 0.0
        assert alerter.flush(10.0)
    assert sorted(server.ids()) == [cid(i) for i in range(20)]
    assert server.ids() == [cid(i) for i in range(20)]


def test_timeout_is_retried(tmp_path: Path, server: AMServer) -> None:
    server.delay = 1.0
    m = metrics()
    with make_alerter(tmp_path, server.url, m, http_timeout=0.2) as alerter:
        send(alerter, range(1))
        time.sleep(0.3)
        server.delay = 0.0
        assert alerter.flush(5.0)
    # The first post reached the server before the client gave up: at least once.
    assert set(server.ids()) == {cid(0)}
    assert sample(m, "egressd_alerts_failed_total", sink="alertmanager") >= 1


def test_resend_keeps_a_busy_group_firing(tmp_path: Path, server: AMServer) -> None:
    cfg = AlertsConfig(alertmanager=server.url, suppress_seconds=600.0,
                       spool_dir=str(tmp_path / "spool"))
    with Alerter(cfg, sensor="gw1", metrics=None, spool_options=FAST,
                 resend_seconds=60.0) as alerter:
        for t in (0, 30, 61, 90, 125):
            alerter.observe(flow(bytes_out=t), interface=None, now_ns=T0 + t * SEC)
        assert alerter.flush(5.0)
    posted = [(a["annotations"]["bytes_out"], a["annotations"]["count"]) for a in server.accepted]
    assert posted == [("0", "1"), ("61", "3"), ("125", "5")]
    labels = {json.dumps(a["labels"], sort_keys=True) for a in server.accepted}
    assert len(labels) == 1  # the same Alertmanager alert, refreshed
