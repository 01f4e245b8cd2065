"""The HTML report: its numbers equal the JSON report's, data is escaped, nothing is fetched.

The browser tests run the page in headless Chromium (Debian package
``chromium``): the initial sort from the URL fragment, the click sort, a
screenshot, and the DevTools Network domain to prove the page makes no request.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from egressd.model import FlowRecord, GeoInfo, GeoSource, Initiator, Reason, Verdict, VerdictKind
from egressd.policy import Policy, Route
from egressd.report import AuditResult, CaptureSummary
from egressd.report_html import write_html

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>alert(1)</script>"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--disable-extensions",
    # Belt and braces: even if the page tried, no host name would resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


# -- parsing -----------------------------------------------------------------------------


class Page(HTMLParser):
    """The parts of the report the tests check."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.bars: dict[str, int] = {}
        self.series: dict[str, int] = {}  # timeline: verdict -> bytes out
        self.rows: list[str] = []          # findings table rows: Community IDs, in order
        self.row_cells: list[list[str]] = []
        self.routes: dict[str, tuple[int, int]] = {}
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.scripts = 0
        self.csp = ""
        self.styles_with_url = 0
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._in_findings = False
        self._cell: list[str] | None = None
        self._id_stack: list[str] = []
        self.pre: dict[str, str] = {}
        self._pre_id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
            if key in a:
                self.links.append((tag, key, a[key]))
        if "style" in a and "url(" in a["style"]:
            self.styles_with_url += 1
        if tag == "script":
            self.scripts += 1
        if tag == "meta" and a.get("http-equiv", "").lower() == "content-security-policy":
            self.csp = a.get("content", "")
        if tag == "polyline" and a.get("class") == "series":
            self.series[a["data-verdict"]] = int(a["data-bytes"])
        if tag == "rect" and a.get("class") == "bar":
            self.bars[a["data-country"]] = int(a["data-bytes"])
        if tag == "table" and a.get("id") == "findings-table":
            self._in_findings = True
        if tag == "tr" and "data-route" in a:
            self.routes[a["data-route"]] = (int(a["data-flows"]), int(a["data-bytes"]))
        if self._in_findings and tag == "tr" and "data-community-id" in a:
            self.rows.append(a["data-community-id"])
            self.row_cells.append([])
        if self._in_findings and tag == "td":
            self._cell = []
        if tag == "pre":
            self._pre_id = a.get("id")
            self.pre[self._pre_id or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_findings = False
        if tag == "td" and self._cell is not None:
            self.row_cells[-1].append("".join(self._cell))
            self._cell = None
        if tag == "pre":
            self._pre_id = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._pre_id is not None:
            self.pre[self._pre_id] += data


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


# -- the demo audit, rendered ------------------------------------------------------------


def _audit(fmt: str, out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "egressd", "audit", "--policy", "examples/policy.yaml",
         "--format", fmt, "--output", str(out), "pcaps/demo.pcapng", "--fail-on", "never"],
        cwd=ROOT, check=True, capture_output=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("html")
    _audit("html", tmp / "demo.html")
    _audit("json", tmp / "demo.json")
    html = (tmp / "demo.html").read_text(encoding="utf-8")
    return {"path": tmp / "demo.html", "html": html,
            "report": json.loads((tmp / "demo.json").read_text(encoding="utf-8"))}


def _findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["flows"]
            if f["verdict"] in ("violation", "unknown") and f["bytes_out"] > 0]


def test_country_bars_carry_the_json_bytes(demo: dict[str, Any]) -> None:
    page = parse(demo["html"])
    assert page.bars == demo["report"]["summary"]["bytes_out_by_country"]
    assert page.bars  # the demo has exports
    by_verdict = demo["report"]["summary"]["bytes_out_by_verdict"]
    assert page.series == {v: n for v, n in by_verdict.items() if n > 0}


def test_violation_table_rows_are_the_json_findings(demo: dict[str, Any]) -> None:
    page = parse(demo["html"])
    expected = _findings(demo["report"])
    assert Counter(page.rows) == Counter(f["community_id"] for f in expected)
    assert len(page.rows) == len(expected) > 0
    # Each row's bytes column is the flow's exact bytes_out (largest first by default).
    by_id = {f["community_id"]: f for f in expected}
    sizes = [int(cells[11]) for cells in page.row_cells]
    assert sizes == [by_id[cid]["bytes_out"] for cid in page.rows]
    assert sizes == sorted(sizes, reverse=True)
    # The server name column: the flow's name and where it was read.
    names = [cells[6] for cells in page.row_cells]
    assert names == [f"{by_id[cid]['server_name']} ({by_id[cid]['name_source']})"
                     if by_id[cid]["server_name"] else "" for cid in page.rows]
    # Flows that sent nothing out are no findings.
    silent = [f["community_id"] for f in demo["report"]["flows"]
              if f["verdict"] in ("violation", "unknown") and f["bytes_out"] == 0]
    assert not set(silent) & set(page.rows)


def test_routes_and_evidence(demo: dict[str, Any]) -> None:
    page = parse(demo["html"])
    report = demo["report"]
    approved = [f for f in report["flows"] if f["verdict"] == "approved"]
    for name in ("hk-backup", "crm-vendor", "dev-mirrors"):
        mine = [f for f in approved if f["route"] == name]
        assert page.routes[name] == (len(mine), sum(f["bytes_out"] for f in mine))
    html = demo["html"]
    assert "CAC-2025-0142" in html and "2027-06-30" in html
    cap = report["captures"][0]
    for value in (cap["sha256"], str(cap["bytes"]), cap["first_ts"], cap["last_ts"],
                  report["policy"]["sha256"], report["egressd_version"]):
        assert value in html
    policy_text = (ROOT / "examples/policy.yaml").read_text(encoding="utf-8")
    assert page.pre["policy-text"] == policy_text
    assert "audit --policy examples/policy.yaml --format html" in page.pre["command"]
    assert {"country-chart", "timeline-chart", "findings-table", "evidence"} <= page.ids


def test_page_references_nothing_outside(demo: dict[str, Any]) -> None:
    page = parse(demo["html"])
    assert page.links == []
    assert page.styles_with_url == 0
    html = demo["html"]
    assert "http://" not in html and "https://" not in html
    assert "url(" not in html and "@import" not in html
    assert "default-src 'none'" in page.csp  # the CSP forbids any fetch


def _hostile_result() -> tuple[AuditResult, Policy]:
    geo = GeoInfo("US", "US", 64512, HOSTILE)
    flows = [
        FlowRecord("1:aaaa", 6, "10.0.0.1", 40000, "198.51.100.7", 443, Initiator.INTERNAL,
                   "198.51.100.7", geo, HOSTILE, 10**18, 10**18 + 10**9, 3, 900, 2, 100,
                   Verdict(VerdictKind.VIOLATION, HOSTILE, None, Reason.ZONE_NOT_ALLOWED)),
        FlowRecord("1:bbbb", 6, "10.0.0.1", 40001, "198.51.100.8", 443, Initiator.INTERNAL,
                   "198.51.100.8", geo, HOSTILE, 10**18 + 5, 10**18 + 10**9, 3, 700, 2, 100,
                   Verdict(VerdictKind.APPROVED, HOSTILE, HOSTILE, None)),
    ]
    cap = CaptureSummary(f"caps/{HOSTILE}.pcap", "ab" * 32, "pcap", [1], 10, 1234,
                         10**18, 10**18 + 10**9, False, None)
    # A database built 100 days before the capture.
    db = GeoSource("maxmind", f"/db/{HOSTILE}.mmdb", HOSTILE, 10**9 - 100 * 86400)
    result = AuditResult(f"{HOSTILE}.yaml", "cd" * 32, [db], [cap], flows, [HOSTILE])
    policy = Policy(home_countries=["CN"], zones={HOSTILE: ["10.0.0.0/8"]},
                    routes=[Route(HOSTILE, HOSTILE, countries=frozenset({"US"}),
                                  from_zones=(HOSTILE,))])
    return result, policy


def test_data_is_escaped_everywhere() -> None:
    result, policy = _hostile_result()
    buf = io.StringIO()
    write_html(result, buf, command=["egressd", "audit", HOSTILE],
               policy_text=f"routes:\n  - name: '{HOSTILE}'\n", policy=policy)
    html = buf.getvalue()
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = parse(html)
    assert page.scripts == 1  # only the page's own script
    assert page.rows == ["1:aaaa"]
    assert HOSTILE in "".join(page.row_cells[0])  # shown as text, intact
    assert HOSTILE in page.pre["policy-text"] and HOSTILE in page.pre["command"]
    assert page.routes[HOSTILE] == (1, 700)


def test_stale_geoip_database_is_flagged() -> None:
    result, policy = _hostile_result()
    buf = io.StringIO()
    write_html(result, buf, command=["egressd"], policy_text="", policy=policy)
    assert "100 days old at the time of the capture" in buf.getvalue()

    from egressd.report_text import write_text
    text = io.StringIO()
    write_text(result, text, command=["egressd", "audit", "x.pcap"])
    out = text.getvalue()
    assert "WARNING" in out and "100 days old" in out
    assert "cd" * 32 in out and "ab" * 32 in out and "1234 bytes" in out
    assert "command: egressd audit x.pcap" in out


# -- in a real browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.access("/usr/bin/chromium", os.X_OK):
        path = "/usr/bin/chromium"
    if path is None:
        msg = ("headless Chromium is needed for the HTML report's browser tests: "
               "install the Debian package 'chromium' "
               "(apt-get install --no-install-recommends chromium)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


@pytest.mark.parametrize(("fragment", "key"), [
    ("#sort=bytes_out:asc", lambda cells: int(cells[11])),
    ("#sort=bytes_out:desc", lambda cells: -int(cells[11])),
    ("#sort=remote:asc", lambda cells: cells[5]),
])
def test_fragment_sorts_the_table_after_js(chromium: str, demo: dict[str, Any],
                                           tmp_path: Path, fragment: str, key: Any) -> None:
    dom = _dump_dom(chromium, demo["path"].as_uri() + fragment, tmp_path / "profile")
    page = parse(dom)
    assert len(page.rows) == len(_findings(demo["report"]))
    keys = [key(c) for c in page.row_cells]
    assert keys == sorted(keys)
    assert f'data-sort="{fragment.removeprefix("#sort=")}"' in dom


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:
            # Chromium reads commands on fd 3 and writes answers on fd 4.
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "--window-size=1280,2000", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 65536)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        data: dict[str, Any] = json.loads(msg)
        return data

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             browser: bool = False, timeout: float = 60) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            data = self._read(deadline)
            if data.get("id") == self._next:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result
            if "method" in data:
                self.events.append(data)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method:
                    return self.events.pop(i)
            data = self._read(deadline)
            if "method" in data:
                self.events.append(data)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = self.call("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, browser=True)
        self.session = attached["sessionId"]
        self.call("Network.enable")
        self.call("Page.enable")
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def requests(self) -> list[str]:
        return [ev["params"]["request"]["url"] for ev in self.events
                if ev["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, EOFError, OSError):
            self.call("Browser.close", browser=True, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def devtools(chromium: str, tmp_path: Path) -> Any:
    dt = DevTools(chromium, tmp_path / "profile")
    try:
        yield dt
    finally:
        dt.close()


ROW_BYTES = ("Array.from(document.querySelectorAll('#findings-table tbody tr'))"
             ".map(r => Number(r.getAttribute('data-bytes')))")
ROW_COUNTRIES = ("Array.from(document.querySelectorAll('#findings-table tbody tr'))"
                 ".map(r => r.cells[8].textContent)")


def test_click_sort_screenshot_and_no_network(devtools: DevTools, demo: dict[str, Any]) -> None:
    devtools.open(demo["path"].as_uri())
    # Nothing but the file itself was requested.
    urls = devtools.requests()
    assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls
    assert not [ev for ev in devtools.events if ev["method"] == "Network.loadingFailed"]

    n = len(_findings(demo["report"]))
    assert len(devtools.evaluate(ROW_BYTES)) == n
    click = "document.querySelector('#findings-table th[data-key=\"{}\"]').click()"
    devtools.evaluate(click.format("bytes_out"))
    asc = devtools.evaluate(ROW_BYTES)
    assert asc == sorted(asc) and len(asc) == n
    devtools.evaluate(click.format("bytes_out"))
    desc = devtools.evaluate(ROW_BYTES)
    assert desc == sorted(desc, reverse=True)
    assert devtools.evaluate(
        "document.querySelector('#findings-table th[data-key=\"bytes_out\"]')"
        ".getAttribute('aria-sort')") == "descending"
    devtools.evaluate(click.format("country"))
    countries = devtools.evaluate(ROW_COUNTRIES)
    assert countries == sorted(countries)

    shot = devtools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # Still no request after the interaction.
    assert all(u.startswith(("file:", "data:", "about:")) for u in devtools.requests())


def test_network_check_does_see_requests(devtools: DevTools, tmp_path: Path) -> None:
    """Control: a page that does fetch something is caught by the same check."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><img src="http://tracker.example/pixel.png">'
                    '<link rel="stylesheet" href="https://cdn.example/x.css">')
    devtools.open(page.as_uri())
    external = [u for u in devtools.requests() if not u.startswith(("file:", "data:"))]
    assert "http://tracker.example/pixel.png" in external
