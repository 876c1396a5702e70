"""The HTML report in a real browser: Debian's headless Chromium, driven by Playwright.

A small registry (four sites, one with a high cement-leak rate) goes through the monitor
and the report writer, then:

* A: the report opened from disk (``file://``): charts render with a non-zero size, the
  console shows no error, no page error is raised, nothing is fetched from outside, and the
  link to a site page leads to a page whose charts render too;
* B: the same report published with ``publish_report`` and served by the Airflow plugin
  (``plugins/kyphowatch_report.py``) from a real ``airflow api-server`` with the simple auth
  manager: anonymous requests are refused, ``/kyphowatch/report/`` lands on
  ``latest/index.html`` for a logged-in user (the UI's ``_token`` cookie), the report's
  Content-Security-Policy causes no violation, traversal is 404, and the plugin's
  navigation link is listed by ``/api/v2/plugins``;
* C (slow, about a minute): a simulated 60-site, 4-year registry with two planted drifts,
  ingested, monitored and reported, served over HTTP: the drifting sites head the grid with
  level, since-date and strength as visible text; the site page's first sentence names the
  metric, the rate in % and the guidance range; every chart's CSV link downloads its data;
  Tab reaches the first site link and Enter opens it; at 400 px the page never scrolls
  sideways, chart text is at least 11 px on screen and the site column stays in view; no
  console error and no request outside the server.

Playwright's Python package brings only its driver; the browser is ``/usr/bin/chromium``
(``apt-get install chromium``; ``.ci/run`` installs it). Without it the tests skip with the
reason printed, except under ``CI=true`` where they fail. Full-page screenshots are saved
to ``test-artifacts/report-browser/`` (git-ignored); their paths are printed.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pytest

from pipelines.airflow_stack import wait_for_port
from pipelines.db import make_engine
from pipelines.mailsink import free_port
from pipelines.report import publish_report, write_report
from pipelines.surveillance.engine import run_monitor
from tests.test_engine import build_sites

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("KYPHOWATCH_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "report-browser"
CHROMIUM_ARGS = [
    # Playwright adds --headless itself (headless=True) and a fresh --user-data-dir is given
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
DRIFT_SITE = "S004"
PREFIX = "/kyphowatch/report"
# every chart (an inline <svg>) with its rendered size and how many shapes it drew
CHARTS_JS = """() => [...document.querySelectorAll('svg.chart')].map(e => {
    const r = e.getBoundingClientRect();
    return {width: r.width, height: r.height,
            shapes: e.querySelectorAll('polyline, circle, rect, path').length};
})"""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1", "yes"}


@pytest.fixture(scope="module")
def playwright():
    if not CHROMIUM.exists():
        reason = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
        if _in_ci():
            pytest.fail(f"CI must run the browser tests: {reason}")
        print(f"\nskipping browser tests: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@contextmanager
def _browser(playwright, profile: Path) -> Iterator:
    """A Chromium context with a fresh profile, closed afterwards."""
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
    )  # fmt: skip
    try:
        yield context
    finally:
        context.close()


class PageWatch:
    """Console messages, page errors and requests of one page."""

    def __init__(self, page, allowed_origins: tuple[str, ...]) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url}: {r.failure}"))
        page.on("request", lambda r: None if r.url.startswith(allowed_origins)
                else self.outside.append(r.url))  # fmt: skip

    def check_clean(self) -> None:
        problems = [m for m in self.console if m.startswith(("error", "warning"))]
        assert problems == [], problems
        assert self.errors == [], self.errors
        assert self.failed == [], self.failed
        assert self.outside == [], self.outside


def _check_charts(page, at_least: int = 1) -> list[dict]:
    charts = page.evaluate(CHARTS_JS)
    assert len(charts) >= at_least, f"{page.url}: {len(charts)} charts"
    for chart in charts:
        assert chart["width"] > 0 and chart["height"] > 0, (page.url, chart)
        assert chart["shapes"] > 2, (page.url, chart)  # more than the frame: data was drawn
    return charts


def _screenshot(page, name: str, capsys) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def _settings_with_data(sqlite_url, settings_for):
    engine = make_engine(sqlite_url)
    build_sites(engine, sites=4, per_site=300, leak={DRIFT_SITE: 0.35}, seed=2)
    engine.dispose()
    settings = settings_for(sqlite_url)
    run_monitor(settings)
    return settings


def _visit_index_and_site(page, watch: PageWatch, url: str, name: str, capsys) -> None:
    page.goto(url, wait_until="load")
    assert page.url.endswith("/index.html"), page.url
    # the overview is a status grid, not charts; the drifting site is marked as a signal
    assert page.locator(f"tr:has(a[href='sites/{DRIFT_SITE}.html']) td.st-alarm").count() >= 1
    _screenshot(page, f"{name}-index", capsys)
    page.locator('a[href$="funnels.html"]').first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/funnels.html"), page.url
    _check_charts(page, at_least=4)  # one funnel per outcome metric
    _screenshot(page, f"{name}-funnels", capsys)
    page.go_back(wait_until="load")
    link = page.locator(f'a[href$="sites/{DRIFT_SITE}.html"]').first
    link.click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/sites/{DRIFT_SITE}.html"), page.url
    assert DRIFT_SITE in page.content()
    _check_charts(page, at_least=4)  # cement leak: CUSUM up and down, risk-adjusted, p-chart
    _screenshot(page, f"{name}-{DRIFT_SITE}", capsys)
    watch.check_clean()


def test_report_from_disk_renders_without_errors(playwright, sqlite_url, settings_for,
                                                 tmp_path, capsys):  # fmt: skip
    settings = _settings_with_data(sqlite_url, settings_for)
    index = write_report(settings, tmp_path / "report")
    with _browser(playwright, tmp_path / "profile") as context:
        page = context.new_page()
        watch = PageWatch(page, allowed_origins=("file://", "data:"))
        _visit_index_and_site(page, watch, index.as_uri(), "disk", capsys)
        # printed (the safety committee's paper copy): navigation hidden, charts kept
        page.emulate_media(media="print")
        assert page.locator("nav").is_hidden()
        _check_charts(page, at_least=4)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pdf = ARTIFACTS / f"disk-{DRIFT_SITE}.pdf"
        page.pdf(path=str(pdf), format="A4", print_background=False)
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 20_000
        with capsys.disabled():
            print(f"\nprinted: {pdf}")
        _check_shared_funnel_layers(page, watch, index.parent)


FUNNELS_ON_PAGE = "svg.chart:has(title:text-matches('highlighted'))"


def _check_shared_funnel_layers(page, watch: PageWatch, out: Path) -> None:
    """A site page's funnels draw the network's curves and cloud from a shared file (an
    ``<image>``): on screen and in print they must look pixel for pixel as the same page
    with the file's elements inline, as funnels were drawn before (a second page beside
    it, so its links are the same)."""
    from tests.test_report import inline_layer

    layers = {p.name: p.read_text(encoding="utf-8") for p in out.glob("funnel-*.svg")}
    shared = (out / "sites" / f"{DRIFT_SITE}.html").read_text(encoding="utf-8")
    inline = inline_layer(shared, layers)
    assert shared.count("<image ") >= 4 and "<image " not in inline
    (out / "sites" / "inline.html").write_text(inline, encoding="utf-8")
    for media in ("screen", "print"):
        page.emulate_media(media=media)
        shots = []
        for name in (f"{DRIFT_SITE}.html", "inline.html"):
            page.goto((out / "sites" / name).as_uri(), wait_until="load")
            funnels = page.locator(FUNNELS_ON_PAGE)
            shots.append([funnels.nth(i).screenshot() for i in range(funnels.count())])
        assert len(shots[0]) >= 4 and len(shots[0]) == len(shots[1]), media
        assert shots[0] == shots[1], media  # the same PNG bytes: the same pixels
    watch.check_clean()


# ---------------------------------------------------------------- through the Airflow plugin


def _http(url: str, token: str | None = None, data: dict | None = None):
    """(status, headers, body) of a GET, or of a JSON POST when ``data`` is given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = None
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def api_server(tmp_path, sqlite_url, settings_for):
    """A real ``airflow api-server`` with the plugin, serving a published report."""
    settings = _settings_with_data(sqlite_url, settings_for)
    publish_report(settings)
    password = secrets.token_urlsafe(12)
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"analyst": password}))
    empty_dags = tmp_path / "dags"
    empty_dags.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(empty_dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "analyst:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "PYTHONPATH": str(REPO),
        "KYPHOWATCH_REPORT_DIR": str(settings.report_dir),
    }  # fmt: skip
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    log_path = tmp_path / "api-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    failed = True
    try:
        assert wait_for_port(port, time.monotonic() + 120), "api-server did not listen"
        deadline = time.monotonic() + 60
        while _http(base + "/api/v2/monitor/health")[0] != 200:
            assert process.poll() is None, "api-server exited"
            assert time.monotonic() < deadline, "api-server never became healthy"
            time.sleep(0.5)
        status, _, body = _http(base + "/auth/token",
                                data={"username": "analyst", "password": password})  # fmt: skip
        assert status == 201, body
        yield {"base": base, "token": json.loads(body)["access_token"], "settings": settings}
        failed = False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        if failed:
            print(log_path.read_bytes()[-12_000:].decode("utf-8", "replace"))


@pytest.mark.airflow_e2e
def test_report_through_the_airflow_plugin(playwright, api_server, tmp_path, capsys):
    base, token = api_server["base"], api_server["token"]
    report = base + PREFIX

    # anonymous callers get nothing, not even a 404 that tells what exists
    for path in ("/", "/latest/index.html", "/latest/report.json"):
        status, _, _ = _http(report + path)
        assert status == 401, path

    status, headers, _ = _http(report + "/", token)
    assert status == 307 and headers["Location"] == "latest/index.html"
    status, headers, body = _http(report + "/latest/index.html", token)
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for path in ("/..%2f..%2fetc/passwd", "/latest/..%2f..%2f..%2f..%2fetc/passwd",
                 "/%2fetc/passwd", "/latest/../../../../etc/passwd"):  # fmt: skip
        status, _, body = _http(report + path, token)
        assert status == 404, (path, body[:200])
        assert b"root:" not in body

    # the plugin is registered, with its app and its navigation link
    status, _, body = _http(base + "/api/v2/plugins", token)
    assert status == 200, body
    plugins = {p["name"]: p for p in json.loads(body)["plugins"]}
    plugin = plugins["kyphowatch_report"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == [PREFIX]
    [view] = plugin["external_views"]
    assert view["destination"] == "nav" and view["href"] == PREFIX.lstrip("/") + "/"

    with _browser(playwright, tmp_path / "profile") as context:
        # the cookie the Airflow UI login sets
        context.add_cookies([{"name": "_token", "value": token, "url": base}])
        page = context.new_page()
        watch = PageWatch(page, allowed_origins=(base + "/", "data:"))
        _visit_index_and_site(page, watch, report + "/", "plugin", capsys)
        assert page.url.startswith(report + "/latest/sites/"), page.url


# ---------------------------------------------------------------- a 60-site network, by HTTP

NETWORK_DRIFTS = {"S012": "cement_leak:3.0:2025-03-01", "S031": "new_fracture:2.5:2024-01-01"}
# Each SVG text's on-screen font size: its computed size times the chart's scale on screen.
CHART_TEXT_JS = """() => [...document.querySelectorAll('svg.chart')].flatMap(svg => {
    const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
    return [...svg.querySelectorAll('text')].filter(t => t.textContent.trim()).map(t => ({
        text: t.textContent, px: parseFloat(getComputedStyle(t).fontSize) * scale,
        height: t.getBoundingClientRect().height}));
})"""
PAGE_SCROLL_JS = "() => [document.documentElement.scrollWidth, window.innerWidth]"


@contextmanager
def _serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on localhost (downloads need a real origin)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _network_report(tmp_path, settings_for) -> Path:
    """Simulate 60 sites over four years with two planted drifts; monitor; write the report."""
    from pipelines.ingest import ingest_paths
    from pipelines.simulate import simulate

    extracts = tmp_path / "extracts"
    simulate(extracts, sites=60, start=date(2022, 1, 1), end=date(2025, 12, 31), seed=11,
             drifts=[f"{site}:{spec}" for site, spec in NETWORK_DRIFTS.items()],
             single_file=True)
    settings = settings_for(f"sqlite:///{tmp_path / 'warehouse.db'}")
    ingest_paths(settings, sorted(extracts.glob("*.csv*")))
    run_monitor(settings)
    return write_report(settings, tmp_path / "report").parent


def _check_phone_layout(page, url: str) -> None:
    page.goto(url, wait_until="load")
    scroll_width, width = page.evaluate(PAGE_SCROLL_JS)
    assert scroll_width <= width, f"{url}: the page scrolls sideways ({scroll_width} > {width})"
    texts = page.evaluate(CHART_TEXT_JS)
    assert texts, url
    small = [t for t in texts if t["px"] < 11 or t["height"] < 11]
    assert not small, (url, small[:5])


@pytest.mark.slow
def test_network_report_reads_in_ten_seconds(playwright, settings_for, tmp_path, capsys):
    """60 sites, 4 years, two planted drifts: what an analyst must see without hovering."""
    report = _network_report(tmp_path, settings_for)
    with _serve(report) as base, _browser(playwright, tmp_path / "profile") as context:
        page = context.new_page()
        watch = PageWatch(page, allowed_origins=(base + "/", "data:"))
        page.goto(base + "/index.html", wait_until="load")
        _screenshot(page, "network-index-desktop", capsys)
        # the drifting sites head the grid, with level, since-date and strength as text
        rows = page.locator("table.grid").first.locator("tbody tr")
        top = [rows.nth(i).locator("th a").inner_text() for i in range(2)]
        assert sorted(top) == sorted(NETWORK_DRIFTS), top
        for site, spec in NETWORK_DRIFTS.items():
            metric = spec.split(":")[0]
            cell = page.locator(f"tr#site-{site} td:has(a[href='sites/{site}.html#{metric}'])")
            text = cell.inner_text()
            assert "alarm" in text, text
            assert re.search(r"since \d{4}-\d{2}-\d{2}", text), text
            assert re.search(r"p = \d(\.\d+)?e-\d+, \d of \d methods", text), text
            assert re.search(r"\d+(\.\d)?% of \d+ .*guidance \d+(\.\d)?%", text), text
        # in-control sites are folded away, yet listed
        assert page.locator("details#in-control tbody tr").count() >= 20
        assert not page.locator("details#in-control").get_attribute("open")

        # keyboard only: tabbing from the top reaches the first drifting site's link
        wanted = {f"sites/{site}.html" for site in top[:1]}
        reached = None
        for _ in range(30):
            page.keyboard.press("Tab")
            href = page.evaluate("() => document.activeElement.getAttribute('href')")
            if href in wanted:
                reached = href
                break
        assert reached, "the first site link is not reachable by Tab"
        with page.expect_navigation(wait_until="load"):
            page.keyboard.press("Enter")
        assert page.url.endswith("/" + reached), page.url

        # the site page opens with a sentence naming metric, rate in % and guidance range
        page.goto(f"{base}/sites/S012.html", wait_until="load")
        lead = page.locator("p.lead").first.inner_text()
        assert lead.startswith("Cement leakage (any) at S012 is at alarm since"), lead
        assert re.search(r"\d+\.\d% of \d+ procedures", lead), lead
        assert "guidance range of 7.0%\u201311.0%" in lead, lead
        _screenshot(page, "network-S012-desktop", capsys)
        # every chart has its data next to it, and the link downloads it
        figures = page.locator("figure")
        assert figures.count() == page.locator("svg.chart").count() >= 8
        # short tables are in the page (data: links saved as S012-<chart>.csv); long
        # series and funnels are one file per chart for every site
        clicked_file = False
        kinds = set()
        for i in range(figures.count()):
            link = figures.nth(i).locator("figcaption a[download]")
            assert "S012" in link.inner_text()  # link texts name the site
            href = link.evaluate("a => a.href")
            inline = href.startswith("data:text/csv;charset=utf-8;base64,")
            kinds.add(inline)
            if inline:
                assert re.fullmatch(r"S012-[\w-]+\.csv", link.get_attribute("download"))
            # the first three links and the first file link are clicked and must arrive
            # as downloads; the others are read directly (clicking all only adds time)
            if i < 3 or not (inline or clicked_file):
                clicked_file = clicked_file or not inline
                with page.expect_download(timeout=60_000) as download:
                    link.click()
                assert download.value.url == href
                text = Path(download.value.path()).read_text(encoding="utf-8")
                if inline:
                    assert download.value.suggested_filename == link.get_attribute("download")
            elif inline:
                text = base64.b64decode(href.partition(",")[2]).decode("utf-8")
            else:
                response = page.request.get(href)
                assert response.ok, href
                text = response.text()
            table = list(csv.reader(io.StringIO(text, newline="")))
            assert len(table) >= 2 and len(table[0]) >= 2, href
            assert all(len(row) == len(table[0]) for row in table), href
            if not inline:  # every site's data: this site's rows are in it
                assert table[0][0] == "site" and "S012" in {r[0] for r in table[1:]}, href
        assert kinds == {True, False} and clicked_file
        descs = page.evaluate("() => [...document.querySelectorAll('svg.chart desc')]"
                              ".map(d => d.textContent)")
        assert len(descs) == figures.count() and all(len(d) > 40 for d in descs)
        watch.check_clean()

    # phones: 400 px wide, nothing scrolls sideways but tables and charts in their boxes
    with _serve(report) as base, _browser(playwright, tmp_path / "phone") as context:
        page = context.new_page()
        page.set_viewport_size({"width": 400, "height": 860})
        watch = PageWatch(page, allowed_origins=(base + "/", "data:"))
        for path in ("sites/S012.html", "sites/S031.html", "funnels.html"):
            _check_phone_layout(page, f"{base}/{path}")
        _screenshot(page, "network-funnels-phone", capsys)
        page.goto(f"{base}/index.html", wait_until="load")
        scroll_width, width = page.evaluate(PAGE_SCROLL_JS)
        assert scroll_width <= width
        # the site column stays in view while the grid scrolls inside its box
        grid = page.locator("table.grid").first
        box = page.locator("div.scroll:has(table.grid)").first
        box.evaluate("b => b.scrollLeft = 600")
        first = grid.locator("tbody tr th").first.bounding_box()
        assert first and first["x"] >= 0 and first["x"] + first["width"] <= width
        _screenshot(page, "network-index-phone", capsys)
        page.goto(f"{base}/sites/S012.html", wait_until="load")
        _screenshot(page, "network-S012-phone", capsys)
        watch.check_clean()
