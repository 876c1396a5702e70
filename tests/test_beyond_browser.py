"""Device and operator pages in a real browser (Debian's headless Chromium, Playwright).

A simulated registry (6 sites, 2.5 years, volume x3) with three planted drifts, the
simulator's own (docs/simulator.md): balloon ``VERTOBAL-15`` (leak odds x4 from 2024),
cement lot ``HVR-202406`` (leak odds x8) and operator ``OP-S001-01`` (leak odds x6 for their
first 40 procedures). It is ingested and monitored; the evidence report is written and
``kyphowatch beyond-report`` writes the confidential operator pages; both are served over
HTTP on localhost. Then:

* the overview names the drifting product and lot and links the devices page; the devices
  page shows both flagged, with the signal, its date and its strength as text, rates in %,
  a described chart per metric whose CSV link downloads its data;
* the operator page of S001 shows the drifting operator flagged, by pseudonym only; no
  raw operator reference from the extracts (nor its stored digest) is in any written
  HTML or CSV, and the network report holds no operator pseudonym at all;
* at 400 px no page scrolls sideways (tables scroll in their own box); no console error
  and no request outside the local server.

Browser set-up and skips as in ``tests/test_report_browser.py``. Screenshots go to
``test-artifacts/report-browser/beyond-*.png``.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.ingest.pseudonymise import pseudonymise
from pipelines.report import write_report
from pipelines.report.beyond import write_beyond_pages
from pipelines.simulate import simulate
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.operators import operator_pseudonym
from tests import test_report_browser
from tests.test_report_browser import PAGE_SCROLL_JS, PageWatch, _browser, _screenshot, _serve

pytestmark = pytest.mark.timeout(600)
playwright = test_report_browser.playwright  # the same fixture: Chromium found, or the skip

PRODUCT, LOT, OPERATOR = "VERTOBAL-15", "HVR-202406", "S001-01"
DRIFTS = [f"PRODUCT:{PRODUCT}:cement_leak:4:2024-01-01", f"LOT:{LOT}:cement_leak:8:2024-06-01",
          f"OPERATOR:{OPERATOR}:cement_leak:6:40"]
# every table sits in a box that scrolls on its own (the page must not)
UNBOXED_TABLES_JS = "() => [...document.querySelectorAll('table')]" \
                    ".filter(t => !t.closest('div.scroll')).length"


def _registry(tmp_path: Path, settings_for) -> dict:
    extracts = tmp_path / "extracts"
    simulate(extracts, sites=6, start=date(2023, 1, 1), end=date(2025, 6, 30), seed=5,
             drifts=DRIFTS, single_file=True, volume_scale=3.0)
    settings = settings_for(f"sqlite:///{tmp_path / 'warehouse.db'}")
    ingest_paths(settings, sorted(extracts.glob("*.csv*")))
    run_monitor(settings)
    report = write_report(settings, tmp_path / "report").parent
    beyond = tmp_path / "beyond"
    write_beyond_pages(settings, beyond)
    with open(next(extracts.glob("procedures_*.csv")), newline="", encoding="utf-8") as f:
        raw = {(r["site_id"], r["operator_ref"]) for r in csv.DictReader(f)}
    engine = make_engine(settings.db_url)
    with engine.connect() as conn:
        digests = set(conn.execute(sa.select(schema.procedure.c.operator_hash).distinct())
                      .scalars()) - {None}
        pseudonyms = set(conn.execute(sa.select(schema.operator_chart.c.operator)).scalars())
    engine.dispose()
    key = settings.require_pseudonym_key()
    drifting = operator_pseudonym(pseudonymise(key, "S001", f"OP-{OPERATOR}"))
    return {"report": report, "beyond": beyond, "raw": raw, "digests": digests,
            "pseudonyms": pseudonyms, "drifting_operator": drifting, "key": key}


def _flagged_row_text(page, row_id: str) -> str:
    row = page.locator(f"tr[id='{row_id}']")
    assert row.count() == 1, row_id
    assert row.get_attribute("class") == "flag", row_id
    return row.inner_text()


@pytest.mark.slow
def test_device_and_operator_pages_in_the_browser(playwright, settings_for, tmp_path, capsys):
    """About 45 s: most of it simulating, ingesting and monitoring 4,000 procedures."""
    made = _registry(tmp_path, settings_for)
    report, beyond = made["report"], made["beyond"]

    # privacy first, on every written file: raw operator references (and their digests)
    # nowhere; operator pseudonyms only on the confidential pages, never in the network report
    written = [p for p in [*report.rglob("*"), *beyond.rglob("*")]
               if p.is_file() and p.suffix in (".html", ".csv", ".json")]
    assert any(p.name == "devices.html" for p in written)
    raw_refs = {ref for _, ref in made["raw"]}
    assert f"OP-{OPERATOR}" in raw_refs and len(raw_refs) > 6
    for path in written:
        text = path.read_text(encoding="utf-8")
        leaked = [s for s in raw_refs | made["digests"] if s in text]
        assert not leaked, (path, leaked[:3])
        if report in path.parents:
            shown = [p for p in made["pseudonyms"] if p in text]
            assert not shown, (path, shown[:3])
    assert not list(report.rglob("operators*"))

    with (_serve(report) as base, _serve(beyond) as confidential,
          _browser(playwright, tmp_path / "profile") as context):
        page = context.new_page()
        watch = PageWatch(page, allowed_origins=(base + "/", confidential + "/", "data:"))
        page.goto(base + "/index.html", wait_until="load")
        # the overview names what signalled and links the devices page
        section = page.locator("h2#devices + ul").inner_text()
        assert f"product {PRODUCT}, Cement leakage" in section, section
        assert f"cement lot {LOT} (KYPHON-HV-R)" in section, section
        assert page.locator("a[href='operators'], a[href*='operators/']").count() == 0
        with page.expect_navigation(wait_until="load"):
            page.get_by_role("link", name=re.compile(r"^Devices and cement lots: every")).click()
        assert page.url == base + "/devices.html", page.url

        # the drifting product and lot, flagged, with signal date and strength as text
        text = _flagged_row_text(page, f"product-{PRODUCT}-cement_leak")
        assert "\u25b2 signal" in text
        assert re.search(r"last signal 20\d\d-\d\d-\d\d", text), text
        assert re.search(r"CUSUM now \d+\.\d\d, threshold \d+\.\d\d", text), text
        assert len(re.findall(r"\d+(\.\d+)?%", text)) == 2, text  # rate and expected rate
        text = _flagged_row_text(page, f"lot-{LOT}-cement_leak")
        assert re.search(r"signal as of 2025-06-30", text), text
        assert re.search(r"exact test p = \d(\.\d)?e-\d+ \(alpha", text), text
        # quiet rows say so, in words too
        quiet = page.locator("tr:not(.flag)[id^='product-']")
        assert quiet.count() >= 1 and "\u2713 no signal" in quiet.first.inner_text()

        # one described chart per metric charted; each CSV link names its metric and
        # downloads the rows behind the chart
        figures = page.locator("figure")
        assert figures.count() == page.locator("svg.chart").count() >= 2
        descs = page.evaluate("() => [...document.querySelectorAll('svg.chart desc')]"
                              ".map(d => d.textContent)")
        assert len(descs) == figures.count()
        leak_desc = [d for d in descs if d.startswith("Observed/expected ratio of cement "
                                                      "leakage (any)")]
        assert len(leak_desc) == 1 and PRODUCT in leak_desc[0], descs
        for i in range(figures.count()):
            link = figures.nth(i).locator("figcaption a[download]")
            assert "observed/expected per product" in link.inner_text()
            response = page.request.get(link.evaluate("a => a.href"))
            assert response.ok
            table = list(csv.DictReader(io.StringIO(response.text(), newline="")))
            assert PRODUCT in {row["product"] for row in table}
            if "cement leakage (any)" in link.inner_text():
                [row] = [r for r in table if r["product"] == PRODUCT]
                assert row["signal_date"] and float(row["observed_expected"]) > 1
        _screenshot(page, "beyond-devices-desktop", capsys)

        # the confidential page: the drifting operator, flagged, by pseudonym
        page.goto(confidential + "/operators/S001.html", wait_until="load")
        assert "confidential" in page.locator("h1").inner_text()
        drifting = made["drifting_operator"]
        assert re.fullmatch(r"OP-[0-9a-f]{10}", drifting)
        text = _flagged_row_text(page, f"op-{drifting}-cement_leak")
        assert "risk-adjusted CUSUM with head start (FIR)" in text
        assert re.search(r"at the operator's procedure \d+", text), text
        assert drifting in page.locator("p.lead").inner_text()
        # the other sites' operators are not on S001's page
        others = {operator_pseudonym(pseudonymise(made["key"], site, ref))
                  for site, ref in made["raw"] if site != "S001"}
        assert not [p for p in others if p in page.content()]
        _screenshot(page, "beyond-operators-S001-desktop", capsys)
        watch.check_clean()

    # phones: 400 px, the pages never scroll sideways; every table scrolls in its box
    with (_serve(report) as base, _serve(beyond) as confidential,
          _browser(playwright, tmp_path / "phone") as context):
        page = context.new_page()
        page.set_viewport_size({"width": 400, "height": 860})
        watch = PageWatch(page, allowed_origins=(base + "/", confidential + "/", "data:"))
        for url in (f"{base}/index.html", f"{base}/devices.html",
                    f"{confidential}/operators/S001.html", f"{confidential}/devices.html"):
            page.goto(url, wait_until="load")
            scroll_width, width = page.evaluate(PAGE_SCROLL_JS)
            assert scroll_width <= width, f"{url}: scrolls sideways ({scroll_width} > {width})"
            assert page.evaluate(UNBOXED_TABLES_JS) == 0, url
        _screenshot(page, "beyond-devices-phone", capsys)
        watch.check_clean()
