"""Monitoring for real: the shipped Prometheus rules, Grafana dashboard and
Alertmanager config against real Prometheus and Alertmanager processes.

* ``promtool`` checks and unit-tests the shipped rules and configs;
* egressd runs in a network namespace fed by real traffic, Prometheus and
  Alertmanager run in the same namespace, and every query of every dashboard
  panel returns data, the EgressViolation rule fires, and egressd's own
  Alertmanager alerts arrive — also across an Alertmanager restart;
* an OpenMetrics audit export is backfilled with ``promtool tsdb
  create-blocks-from openmetrics`` and queried back.

The binaries come from Debian's ``prometheus`` and ``prometheus-alertmanager``
packages.  Without them the tests skip naming the missing one — or fail, when
the environment variable CI is set, so that CI never passes without them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns import Lab, call_in, ip, require_netns, veth_pair, wait_for
from test_daemon import (
    Daemon,
    build_geodb,
    free_port,
    scrape,
    serve_tcp,
    tcp_upload,
    udp_send,
    value,
    write_config,
)

from egressd.report import AuditResult
from egressd.report_openmetrics import sample_times, write_openmetrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "egressd-rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "egressd-rules.test.yml"
PROM_EXAMPLE = DEPLOY / "prometheus" / "prometheus.example.yml"
AM_EXAMPLE = DEPLOY / "alertmanager" / "alertmanager.example.yml"
DASHBOARD = DEPLOY / "grafana" / "egressd-dashboard.json"
APT_HINT = ("apt-get install -y --no-install-recommends prometheus prometheus-alertmanager")
UNKNOWN_NET = "192.0.2.0/24"
"""Routed through the gateway but in no GeoIP data: unknown-country traffic."""


def binary(name: str) -> str:
    """Path of a Prometheus tool: skip (fail under CI) naming it when it is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK)
                                  else None)
    if path is None:
        msg = f"`{name}` not found; install it with: {APT_HINT}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {msg}", pytrace=False)
        pytest.skip(msg)
    return path


def test_a_missing_binary_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "egressd-no-such-prometheus-tool"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=name):
        binary(name)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI is set and `{name}` not found"):
        binary(name)


def run(*cmd: str, cwd: Path | None = None, timeout: float = 60) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                         check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n" \
                                f"{res.stderr}"
    return res.stdout + res.stderr


# -- processes ---------------------------------------------------------------------------


class Server:
    """A Prometheus or Alertmanager process, in a namespace or on the host's loopback."""

    def __init__(self, cmd: list[str], port: int, log: Path, ns: str | None = None) -> None:
        self.port, self.ns, self.log_path = port, ns, log
        self.log = open(log, "ab")  # noqa: SIM115
        self.name = Path(cmd[0]).name
        self.cmd = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        """GET a JSON API path on the server (from a thread in its namespace)."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read().decode())

        return call_in(self.ns, fetch) if self.ns else fetch()

    def ready(self, timeout: float = 30) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"{' '.join(self.cmd)} exited {self.proc.returncode}:\n"
                            f"{self.log_path.read_text(errors='replace')}")
            url = f"http://127.0.0.1:{self.port}/-/ready"

            def probe() -> bool:
                try:
                    with urllib.request.urlopen(url, timeout=1) as r:
                        return bool(r.status == 200)
                except OSError:
                    return False

            ok = call_in(self.ns, probe) if self.ns else probe()
            if not ok:
                time.sleep(0.1)
            return ok

        wait_for(up, timeout=timeout, what=f"{self.name} ready on port {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


@contextlib.contextmanager
def prometheus(config: Path, data: Path, *, ns: str | None = None,
               extra: tuple[str, ...] = ()) -> Iterator[Server]:
    exe = binary("prometheus")
    port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    srv = Server([exe, f"--config.file={config}", f"--storage.tsdb.path={data}",
                  f"--web.listen-address=127.0.0.1:{port}", *extra], port,
                 data.parent / f"prometheus-{port}.log", ns)
    try:
        srv.ready()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)


def start_alertmanager(config: Path, data: Path, port: int, ns: str) -> Server:
    exe = binary("prometheus-alertmanager")
    data.mkdir(parents=True, exist_ok=True)
    srv = Server([exe, f"--config.file={config}", f"--storage.path={data}",
                  f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                 port, data.parent / f"alertmanager-{port}.log", ns)
    try:
        srv.ready()
    except BaseException:
        srv.stop()
        raise
    return srv


def query(prom: Server, expr: str, **params: str) -> list[dict[str, Any]]:
    res = prom.get("/api/v1/query", query=expr, **params)
    assert res["status"] == "success", (expr, res)
    data = res["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


# -- shipped files -----------------------------------------------------------------------


def test_promtool_checks_and_unit_tests_the_shipped_rules_and_configs() -> None:
    promtool = binary("promtool")
    out = run(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in out
    run(promtool, "check", "config", str(PROM_EXAMPLE))
    out = run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert "SUCCESS" in out
    # Every rule has firing and quiet checks in the unit tests.
    alerts = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"]]
    firing: set[str] = set()
    quiet: set[str] = set()
    for t in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert all(a.startswith("Egress") for a in alerts)
    assert set(alerts) == firing == quiet, (alerts, firing, quiet)
    amtool = shutil.which("amtool")
    if amtool:
        run(amtool, "check-config", str(AM_EXAMPLE))
    am = yaml.safe_load(AM_EXAMPLE.read_text())
    assert any('alertname=~"Egress.*"' in m for r in am["route"]["routes"]
               for m in r.get("matchers", []))


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"]
            for t in p.get("targets", [])]


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    assert 36 <= d["schemaVersion"] <= 39
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "interface", "country", "zone"}
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    for name in ("instance", "interface", "country", "zone"):
        assert variables[name]["definition"].startswith("label_values(")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    exprs = " ".join(q for _, q in panel_queries())
    for metric in ("egressd_bytes_out_total", "egressd_violations_total",
                   "egressd_route_approval_expiry_timestamp_seconds", "egressd_packets_total",
                   "egressd_kernel_drops_total", "egressd_decode_errors_total",
                   "egressd_flow_table_evictions_total", "egressd_active_flows",
                   "egressd_alerts_sent_total", "egressd_alerts_failed_total",
                   "egressd_alerts_spooled", "egressd_alerts_dropped_total",
                   "egressd_geoip_database_build_timestamp_seconds",
                   "egressd_config_last_reload_successful"):
        assert metric in exprs, metric


def grafana_to_promql(expr: str) -> str:
    """A panel query with Grafana's variables replaced as Grafana would for "All"."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
    return re.sub(r"\$\{?(instance|interface|country|zone)\}?", ".*", expr)


# -- live: egressd, Prometheus and Alertmanager in one namespace ----------------------------


@pytest.fixture
def gateway() -> Iterator[Lab]:
    require_netns()
    with veth_pair(a_v4="10.20.0.5/24", b_v4="10.20.0.1/24", a_v6="fd00:20::5/64",
                   b_v6="fd00:20::1/64",
                   a_routes=("203.0.113.0/24 via 10.20.0.1", "198.51.100.0/24 via 10.20.0.1",
                             f"{UNKNOWN_NET} via 10.20.0.1",
                             "2001:db8:100::/48 via fd00:20::1")) as lab:
        ip("addr", "add", "203.0.113.9/32", "dev", "lo", ns=lab.b.ns)
        ip("-6", "addr", "add", "2001:db8:100::9/128", "dev", "lo", ns=lab.b.ns)
        yield lab


@pytest.fixture
def country_db(tmp_path: Path) -> Path:
    return build_geodb(tmp_path / "country.mmdb")


def am_alerts(am: Server) -> list[dict[str, Any]]:
    try:
        return list(am.get("/api/v2/alerts"))
    except OSError:
        return []


def egressd_alert(am: Server, country: str) -> dict[str, str] | None:
    for a in am_alerts(am):
        labels = a["labels"]
        if labels.get("country") == country and "sensor" in labels:
            return dict(labels)
    return None


def test_prometheus_and_alertmanager_with_a_live_daemon(gateway: Lab, country_db: Path,
                                                        tmp_path: Path) -> None:
    binary("promtool")
    ns_a, ns_b = gateway.a.ns, gateway.b.ns
    mport, aport = free_port(), free_port()
    config = tmp_path / "egressd.yaml"
    write_config(config, tmp_path, country_db, mport, aport)
    rules = tmp_path / "egressd-rules.yml"
    shutil.copy(RULES, rules)
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "egressd",
                            "static_configs": [{"targets": [f"127.0.0.1:{mport}"]}]}],
    }))
    am_cfg = tmp_path / "alertmanager.yml"
    shutil.copy(AM_EXAMPLE, am_cfg)
    serve_tcp(ns_b, "203.0.113.9", 443)
    serve_tcp(ns_b, "2001:db8:100::9", 443)

    am = start_alertmanager(am_cfg, tmp_path / "am-data", aport, ns_b)
    d: Daemon | None = None
    try:
        with prometheus(prom_cfg, tmp_path / "prom-data", ns=ns_b) as prom:
            d = Daemon(gateway, tmp_path, config)
            d.notify.wait("READY=1")
            wait_for(lambda: query(prom, 'up{job="egressd"} == 1'), timeout=20,
                     what="Prometheus scraping egressd")

            def traffic() -> None:
                tcp_upload(ns_a, "203.0.113.9", 443, 4000)            # violation, US
                udp_send(ns_a, "198.51.100.7", 53, b"q" * 200)         # approved, hk-backup
                udp_send(ns_a, "192.0.2.77", 5000, b"u" * 300)         # unknown country

            traffic()
            wait_for(lambda: query(prom, 'egressd_violations_total{country="US"}'), timeout=20,
                     what="violations scraped")
            time.sleep(2)
            traffic()  # a second round: rates and increases over more than one scrape
            def unknown_accounted() -> dict[Any, float] | None:
                m = scrape(ns_b, mport)
                return m if value(m, "egressd_bytes_out_total", verdict="unknown", country="",
                                  route="") > 0 else None

            m = wait_for(unknown_accounted, timeout=15, what="unknown-country bytes accounted")
            assert m is not None
            assert value(m, "egressd_flows_total", verdict="approved", country="HK",
                         route="hk-backup") >= 1

            # Every query of every panel, and every template variable, has data.
            missing: dict[str, str] = {}

            def all_panels_answer() -> bool:
                missing.clear()
                for title, expr in panel_queries():
                    promql = grafana_to_promql(expr)
                    if not query(prom, promql):
                        missing[title] = promql
                return not missing

            deadline = time.monotonic() + 30
            while not all_panels_answer() and time.monotonic() < deadline:
                time.sleep(1)
            assert not missing, f"panels without data: {json.dumps(missing, indent=1)}"
            for v in dashboard()["templating"]["list"]:
                if v["type"] != "query":
                    continue
                mt = re.fullmatch(r"label_values\((.*), *(\w+)\)", v["definition"])
                assert mt, v["definition"]
                values = prom.get(f"/api/v1/label/{mt.group(2)}/values",
                                  **{"match[]": grafana_to_promql(mt.group(1))})["data"]
                assert values, v["name"]
            countries = prom.get("/api/v1/label/country/values")["data"]
            assert {"US", "HK"} <= set(countries)

            # The EgressViolation rule fires in Prometheus.
            def firing() -> list[dict[str, Any]]:
                return [a for a in prom.get("/api/v1/alerts")["data"]["alerts"]
                        if a["labels"]["alertname"] == "EgressViolation"
                        and a["state"] == "firing"]

            fired = wait_for(firing, timeout=20, what="EgressViolation firing in Prometheus")
            assert fired[0]["labels"]["country"] == "US"
            assert fired[0]["labels"]["zone"] == "customer-data"
            assert fired[0]["labels"]["severity"] == "critical"

            # egressd's own alert arrives in Alertmanager.
            labels = wait_for(lambda: egressd_alert(am, "US"), timeout=20,
                              what="egressd's US alert in Alertmanager")
            assert labels is not None
            assert labels["alertname"] == "EgressViolation"
            assert labels["zone"] == "customer-data" and labels["reason"] == "no_route"
            assert labels["sensor"]

            # Alertmanager restarts; an alert raised meanwhile arrives after it.
            am.stop()
            tcp_upload(ns_a, "2001:db8:100::9", 443, 2500)           # violation, DE
            wait_for(lambda: value(scrape(ns_b, mport), "egressd_alerts_spooled",
                                   sink="alertmanager") >= 1 or value(
                scrape(ns_b, mport), "egressd_alerts_failed_total", sink="alertmanager") >= 1,
                timeout=15, what="DE alert waiting for Alertmanager")
            am = start_alertmanager(am_cfg, tmp_path / "am-data", aport, ns_b)
            labels = wait_for(lambda: egressd_alert(am, "DE"), timeout=45,
                              what="DE alert delivered after the Alertmanager restart")
            assert labels is not None
            assert labels["alertname"] == "EgressViolation"
            assert labels["zone"] == "customer-data" and labels["reason"] == "no_route"
    finally:
        am.stop()
        shutil.rmtree(tmp_path / "am-data", ignore_errors=True)
        if d is not None:
            code = d.stop()
            d.log.close()
            assert code == 0, d.output()


# -- OpenMetrics backfill ----------------------------------------------------------------


def test_openmetrics_of_an_empty_audit_is_just_eof() -> None:
    out = io.StringIO()
    write_openmetrics(AuditResult("p.yaml", "", [], [], []), out)
    text = out.getvalue()
    assert text.endswith("# EOF\n")
    assert "_total" not in text


def test_sample_times_cover_the_capture_on_step_boundaries() -> None:
    s = 1_000_000_000
    assert sample_times(10 * s, 130 * s + 5, 60) == [10 * s, 60 * s, 120 * s, 130 * s + 5]
    assert sample_times(60 * s, 60 * s, 60) == [60 * s]


def _audit(fmt: str, out: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "egressd", "audit", "--policy", "examples/policy.yaml",
         "--format", fmt, "--output", str(out), "pcaps/demo.pcapng", "--fail-on", "never",
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr


def test_openmetrics_audit_backfills_prometheus(tmp_path: Path) -> None:
    promtool = binary("promtool")
    binary("prometheus")
    om, report = tmp_path / "demo.om", tmp_path / "demo.json"
    _audit("openmetrics", om)
    _audit("json", report)
    text = om.read_text()
    assert text.endswith("# EOF\n")
    rep = json.loads(report.read_text())
    summary = rep["summary"]
    end = rep["captures"][0]["last_ts"]
    data = tmp_path / "tsdb"
    out = run(promtool, "tsdb", "create-blocks-from", "openmetrics", str(om), str(data),
              timeout=120)
    assert "NUM SAMPLES" in out or "BLOCK ULID" in out, out
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1m}\n")
    with prometheus(cfg, data, extra=("--storage.tsdb.retention.time=100y",)) as prom:
        def q(expr: str) -> dict[str, float]:
            got = {}
            for r in query(prom, expr, time=end):
                labels = r["metric"]
                key = next(iter(labels.values()), "") if labels else ""
                got[key] = float(r["value"][1])
            return got

        by_country = {("" if k == "unknown" else k): float(v)
                      for k, v in summary["bytes_out_by_country"].items()}
        expr = ('sum by (country) (egressd_bytes_out_total{verdict!~"internal|transit"})')
        deadline = time.monotonic() + 20
        while q(expr) != by_country and time.monotonic() < deadline:
            time.sleep(0.2)  # the blocks are loaded at start; give it a moment
        assert q(expr) == by_country
        verdicts = {k: float(v) for k, v in summary["verdicts"].items() if v}
        assert q("sum by (verdict) (egressd_flows_total)") == verdicts
        bytes_by_verdict = {k: float(v) for k, v in summary["bytes_out_by_verdict"].items()
                            if v or k in verdicts}
        assert q("sum by (verdict) (egressd_bytes_out_total)") == bytes_by_verdict
        assert q('sum(egressd_packets_total{interface="audit"})') == {"": summary["packets"]}
        violations = sum(1 for f in rep["flows"] if f["verdict"] == "violation")
        assert q("sum(egressd_violations_total)") == {"": float(violations)}
        decode = rep["captures"][0]["decode_errors"]
        assert q("sum by (reason) (egressd_decode_errors_total)") == {
            k: float(v) for k, v in decode.items()}
        # The counters grew over the capture: at its start nothing was out yet.
        start = rep["captures"][0]["first_ts"]
        first = query(prom, "sum(egressd_bytes_out_total)", time=start)
        assert float(first[0]["value"][1]) < sum(summary["bytes_out_by_verdict"].values())
