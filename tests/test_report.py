"""The HTML evidence report, the drill-down commands and the analyst views."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import os
import re
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from pipelines import report as report_module
from pipelines.alerts.lifecycle import sync_alerts
from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.evidence import csv_cell, write_csv
from pipelines.report import ReportData, publish_report, write_report
from pipelines.report.charts import funnel_template
from pipelines.schema import file_ledger, migrate, pending_complication, quarantine
from pipelines.surveillance.engine import run_monitor
from tests.test_engine import build_sites
from tests.test_outcomes import complication_row, digest, insert, procedure_row

SECRET_PATIENT_REF = "NHS-9434765919"


def _data_quality_rows(engine):
    now = datetime(2024, 1, 2, tzinfo=UTC)
    with engine.begin() as conn:
        for row in (
            dict(source_checksum=digest("f1"), file_name="procedures_20240101.csv",
                 kind="procedures", extract_ts="20240101T000000", status="loaded",
                 rows_read=10, rows_inserted=9, rows_quarantined=1,
                 quarantine_reasons=json.dumps({"bad_date": 1}), processed_at=now),
            dict(source_checksum=digest("f2"), file_name="complications_x.csv", kind=None,
                 status="rejected", reason="missing column event_date", processed_at=now),
        ):
            conn.execute(file_ledger.insert().values(**row))
        conn.execute(quarantine.insert().values(
            source_checksum=digest("f1"), record_number=5, file_name="procedures_20240101.csv",
            kind="procedures", site_id="S001", record_id="P-bad",
            raw_values=json.dumps({"patient_ref": SECRET_PATIENT_REF, "procedure_date": "x"}),
            reasons=json.dumps(["bad_date"]), quarantined_at=now))
        pending = complication_row("C-pending", "P-unknown", "S001", date(2023, 5, 1))
        if "source_record" in pending_complication.c:
            pending["source_record"] = 1
        conn.execute(pending_complication.insert().values(**pending))


def _report_registry(db_url, settings_for, *, alerts=True):
    """Four sites, S004 leaking at 35% (baseline 10.6%), data-quality rows, alerts raised."""
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=300, leak={"S004": 0.35}, seed=2)
    _data_quality_rows(engine)
    settings = settings_for(db_url)
    run_monitor(settings)
    if alerts:
        sync_alerts(settings)
    return engine, settings


class _Fields(HTMLParser):
    """Collect ``data-field`` spans (metric, field -> value) and grid status cells."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[tuple[str, str], str] = {}
        self.status_cells: list[str] = []
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-field" in attrs:
            self.fields[(attrs.get("data-metric"), attrs["data-field"])] = attrs["data-value"]
        if tag == "td" and (attrs.get("class") or "").startswith("st-"):
            self.status_cells.append(attrs["class"][3:])
        if tag == "svg":
            self.svgs += 1


def _parse(path: Path) -> _Fields:
    parser = _Fields()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _grid_row(index_html: str, site: str) -> str:
    start = index_html.index(f"<a href='sites/{site}.html'>{site}</a>")
    return index_html[start:index_html.index("</tr>", start)]


def test_report_pages_show_the_drifting_site_and_no_references(sqlite_url, settings_for,
                                                               tmp_path):
    engine, settings = _report_registry(sqlite_url, settings_for)
    index = write_report(settings, tmp_path / "out")
    out = index.parent
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    pages = [f for f in files if not f.endswith((".csv", ".svg"))]
    assert pages == ["devices.html", "funnels.html", "index.html", "methods.html", "report.json",
                     "sites/S001.html", "sites/S002.html", "sites/S003.html", "sites/S004.html"]
    # the site pages' funnels show the shared curves and clouds: every image a page shows
    # is one of the files, and each cumulative one is shown (rolling: on flagged pages)
    layers = {f for f in files if f.endswith(".svg")}
    shown = {"funnel-" + name for page in pages if page.startswith("sites/") for name in
             re.findall(r'<image href="\.\./funnel-([^"]+)"', (out / page).read_text("utf-8"))}
    assert shown <= layers and all(f.startswith("funnel-") for f in layers)
    assert {f for f in layers if f.endswith("-cumulative.svg")} <= shown and shown
    # every chart links to its data: a short table inside the page (a data: link saved as
    # <SITE>-<chart>.csv), or a file that was written; a site's long series are in one file
    # per chart for every site, and the site's own rows are in it
    for page in pages:
        if not page.endswith(".html"):
            continue
        html_text = (out / page).read_text(encoding="utf-8")
        links = re.findall(r"<figcaption><a href='([^']+)' download(?:='([^']+)')?>", html_text)
        assert html_text.count("<svg") - html_text.count("class=\"spark\"") == len(links), page
        site = page.removeprefix("sites/").removesuffix(".html") if "sites/" in page else None
        for link, name in links:
            if link.startswith("data:"):
                head, _, payload = link.partition(",")
                assert head == "data:text/csv;charset=utf-8;base64", head
                assert site and name.startswith(f"{site}-") and name.endswith(".csv"), name
                text = base64.b64decode(payload).decode("utf-8")
            else:
                assert not name and link.endswith(".csv"), link
                text = (out / page).parent.joinpath(link).resolve().read_text(encoding="utf-8")
            table = list(csv.reader(io.StringIO(text, newline="")))
            assert len(table) >= 2 and all(len(r) == len(table[0]) for r in table), (page, link)
            if site and "series-" in link:
                assert table[0][0] == "site" and site in {r[0] for r in table[1:]}, link
    # a series file holds each site's stored points as they are drawn: dates, statistics
    # (5 decimals), signals and the site's threshold, as in the chart's description
    from pipelines.report.charts import CusumSeries, _iso_days
    from pipelines.report.data import ReportData
    from pipelines.report.site import series_csv_name

    charts = ReportData(settings, None).result.charts["cusum"]
    site_page_text = (out / "sites" / "S004.html").read_text(encoding="utf-8")
    checked = 0
    for key, chart in charts.items():
        series = CusumSeries(chart)
        code = series.code["S004"]
        start, stop = series.bounds[code], series.bounds[code + 1]
        rows = [r for r in csv.DictReader(io.StringIO(
            (out / series_csv_name(key)).read_text(encoding="utf-8"))) if r["site"] == "S004"]
        assert [r["date"] for r in rows] == _iso_days(series.day[start:stop])
        assert [float(r["statistic"]) for r in rows] == [
            round(v, 5) for v in series.statistic[start:stop].tolist()]
        assert [r["signal"] for r in rows] == [
            "1" if v else "0" for v in series.signal[start:stop].tolist()]
        h = {r["threshold_h"] for r in rows}
        assert len(h) == 1 and f"threshold h = {float(h.pop()):.3f}" in site_page_text
        checked += 1
    assert checked >= 3
    text = index.read_text(encoding="utf-8")
    # overview: S004 is marked as a signal on cement leak; S001 is in control everywhere
    assert "st-alarm" in _grid_row(text, "S004") and "st-alarm" not in _grid_row(text, "S001")
    assert "missing column event_date" in text and "bad_date" in text
    # open alerts carry their signal date and the level now; extracts show as dates
    alerts = text[text.index("<h2 id='alerts'>"):text.index("<h2 id='quality'>")]
    assert "<th>signal date</th>" in alerts and "<th>level now</th>" in alerts
    alert_row = alerts[alerts.index("sites/S004.html#alerts"):]
    alert_row = alert_row[:alert_row.index("</tr>")]
    assert re.search(r"<td>alarm</td>.*<td>\d{4}-\d{2}-\d{2}</td>", alert_row), alert_row
    assert not re.search(r"\d{8}T\d{6}", text)  # no raw extract stamps
    site_page = (out / "sites" / "S004.html").read_text(encoding="utf-8")
    parsed = _parse(out / "sites" / "S004.html")
    assert parsed.svgs >= 4  # CUSUM up, down, risk-adjusted, p-chart for cement leak at least
    assert "signal (chart resets)" in site_page and "threshold h = " in site_page
    assert "Case mix against the network" in site_page and "Recent complications" in site_page
    assert "raised: " in site_page and "(open, episode 1" in site_page  # alert and its audit
    funnels = (out / "funnels.html").read_text(encoding="utf-8")
    # a funnel labels exactly the sites outside its limits; its CSV gives every site's class
    for window in ("cumulative", "rolling"):
        rows = list(csv.DictReader(io.StringIO(
            (out / f"funnel-cement_leak-{window}.csv").read_text(encoding="utf-8"))))
        assert [r["site"] for r in rows] == ["S001", "S002", "S003", "S004"]
        svg = re.search(r"<svg.*?</svg>", funnels[funnels.index("units that matured" if
                        window == "rolling" else "Cement leakage (any) (cumulative"):],
                        re.S).group(0)
        for r in rows:
            outside = r["class"].startswith("outside")
            assert (f">{r['site']}</text>" in svg) == outside, (window, r)
        assert float(rows[3]["rate"]) > 0.25 and rows[3]["lower_limit"] != ""
    assert "funnel_12m" not in re.sub(r"<[^>]+>", " ", site_page)  # readable method names
    # rare events are drawn as counts, not as a row of zero proportions
    major = funnels[funnels.index("<h2 id='major_event'>"):]
    assert "expected events at the baseline" in major and "observed events" in major
    # the flag in words: the grid cell and the site page's first sentence
    row_text = re.sub(r"<[^>]+>", " ", _grid_row(text, "S004"))
    assert re.search(r"alarm .*since \d{4}-\d{2}-\d{2}.* of \d methods", row_text), row_text
    assert re.search(r"\d+\.\d% of \d+ .*guidance 7\.0%\u201311\.0%", row_text), row_text
    lead = re.search(r"<p class='lead'>(.*?)</p>", site_page).group(1)
    assert lead.startswith("Cement leakage (any) at S004 is at alarm since"), lead
    assert re.search(r"\d+\.\d% of \d+ procedures", lead) and "7.0%\u201311.0%" in lead
    methods = (out / "methods.html").read_text(encoding="utf-8")
    for needle in ("NICE HTG108 section 2.4.1", "NICE HTG108 section 2.4.2",
                   "NICE HTG108 section 2.4.4", "ARL0", "Benjamini-Hochberg"):
        assert needle in methods
    everything = "\n".join((out / p).read_text(encoding="utf-8") for p in pages)
    # offline: no script, no stylesheet or image fetched from anywhere
    assert "<script" not in everything
    assert set(re.findall(r"<link[^>]*>", everything)) == {"<link rel='icon' href='data:,'>"}
    assert not re.search(r"""src=["']?(https?:)?//""", everything)
    # no patient or operator reference, raw or pseudonymised, and no record id
    assert SECRET_PATIENT_REF not in everything
    with engine.connect() as conn:
        refs = conn.execute(sa.text(
            "select patient_hash, operator_hash, procedure_id from procedure")).all()
        refs += conn.execute(sa.text("select complication_id, procedure_id from complication")).all()
    leaked = {value for row in refs for value in row if value and value in everything}
    assert not leaked


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def test_report_bytes_do_not_depend_on_workers_and_a_rerun_rewrites_only_changes(
        sqlite_url, settings_for, tmp_path):
    _, settings = _report_registry(sqlite_url, settings_for)
    one = write_report(settings, tmp_path / "one", workers=1).parent
    three = write_report(settings, tmp_path / "three", workers=3).parent
    # 4 site pages, 5 network pages, the funnel and device CSVs and a series CSV per CUSUM
    # (every site in one); a site page's short tables are inside it
    assert _tree(one) == _tree(three) and len(_tree(one)) >= 20
    assert sum(name.startswith("series-") for name in _tree(one)) >= 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging
    # a rerun into the same folder: unchanged pages are not rewritten (same inode and
    # mtime), a page changed on disk is, and the page of a site no longer in the data goes
    (three / "sites" / "S002.html").write_text("edited", encoding="utf-8")
    (three / "sites" / "S999.html").write_text("a site that left", encoding="utf-8")
    # a chart's CSV beside a site page, as reports before the series files wrote them
    (three / "sites" / "S001-cement_leak-vlad.csv").write_text("month\r\n", encoding="utf-8")
    # a series file (handed to the writer as Arrow's bytes, not text) changed on disk
    series, same_size_series = sorted(name for name in _tree(one)
                                      if name.startswith("series-"))[:2]
    (three / series).write_bytes((three / series).read_bytes() + b"S999,2024-01-01,1,0,\r\n")
    # changed on disk at the same size (a page's text, an Arrow series file): the writer
    # must compare the bytes, not only the sizes
    _flip_last_digit(three / "sites" / "S003.html")
    _flip_last_digit(three / same_size_series)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in three.rglob("*")
              if p.is_file()}
    write_report(settings, three, workers=2)
    assert _tree(three) == _tree(one)
    changed = {p.relative_to(three).as_posix() for p, stamp in stamps.items()
               if not p.exists() or (p.stat().st_ino, p.stat().st_mtime_ns) != stamp}
    assert changed == {"sites/S002.html", "sites/S999.html", "sites/S001-cement_leak-vlad.csv",
                       series, "sites/S003.html", same_size_series}


def _flip_last_digit(path: Path) -> None:
    """Change the file's last digit, keeping its size."""
    blob = bytearray(path.read_bytes())
    where = max(i for i, byte in enumerate(blob) if chr(byte).isdigit())
    blob[where] = ord("1") if blob[where] != ord("1") else ord("2")
    path.write_bytes(bytes(blob))


def test_reads_beside_the_run_in_a_forked_process_are_the_same_data(db_url, settings_for,
                                                                   tmp_path, monkeypatch):
    """write_report reads everything but the stored run in a forked process while this one
    reads the run (ReportData(parallel_reads=True)); what it hands over is what this
    process reads itself, and reads made for another run, or a failed child, are read
    again here."""
    from pipelines.report import data as report_data

    _, settings = _report_registry(db_url, settings_for)

    def gathered(data):
        return (data.result.run_key, data.as_of, data.months, data.quality, data.facts,
                data.evidence.complications, data.sites, data.recent_oe)

    here = gathered(ReportData(settings, None))
    assert here[2] and here[5]  # monthly figures and complications to compare
    forks = []
    real_forked = report_data._ForkedReads

    def counted(*args):
        forks.append(args)
        return real_forked(*args)

    monkeypatch.setattr(report_data, "_ForkedReads", counted)
    monkeypatch.setattr(report_data, "_may_fork", lambda: True)  # other tests' threads
    assert gathered(ReportData(settings, None, parallel_reads=True)) == here
    assert len(forks) == 1  # the forked path ran, not the threaded one
    real = report_data._side_reads
    for broken in ("another run", "failure"):
        def side_reads(settings, profile, as_of, broken=broken):
            if broken == "failure":
                raise RuntimeError("the warehouse went away")
            return {**real(settings, profile, as_of), "run_key": "another run",
                    "months": {}, "complications": {}}

        monkeypatch.setattr(report_data, "_side_reads", side_reads)
        assert gathered(ReportData(settings, None, parallel_reads=True)) == here
    # and the report from them is the one drawn without the forked reads
    one = write_report(settings, tmp_path / "one", workers=1).parent
    monkeypatch.setattr(report_data, "_side_reads", real)
    two = write_report(settings, tmp_path / "two", workers=2).parent
    assert _tree(one) == _tree(two)


def test_forked_reads_travel_as_columns_and_come_back_the_same():
    """The forked reads send the monthly figures and complications as columns (one
    pickle of a few tuples, not thousands of objects) and the recent O/E computed there;
    what the report looks up from them equals what was read, missing keys included."""
    import pickle

    from pipelines import evidence
    from pipelines.report import data as report_data

    months = {("S001", "cement_leak"): evidence.MonthSeries(
                  ("2024-01", "2024-02"), (3, 4), (0, 1), (0.5, 0.25), (1, 0)),
              ("S002", "cement_leak"): evidence.MonthSeries((), (), (), (), ())}
    complications = {"S001": [{"event_date": "2024-01-02", "event_type": "cement_leak",
                               "severity": None, "symptomatic": False,
                               "vertebral_level": "L1"}]}
    reads = {"day": date(2024, 2, 29), "run_key": "k", "quality": {"files": []},
             "months": months, "complications": complications}

    def through_the_pipe(answer):
        return report_data._from_the_pipe(pickle.loads(pickle.dumps(
            report_data._for_the_pipe(answer), protocol=pickle.HIGHEST_PROTOCOL)))

    got = through_the_pipe(reads)
    assert got["months"] == months and got["complications"] == complications
    assert got["months"][("S001", "cement_leak")] == months[("S001", "cement_leak")]
    assert got["months"].get(("S009", "cement_leak")) is None
    assert got["complications"].get("S009", []) == []
    assert got["recent_oe"] == evidence.recent_observed_expected(months)
    assert got["quality"] == reads["quality"] and got["run_key"] == "k"
    empty = through_the_pipe({**reads, "months": None, "complications": {}})
    assert empty["months"] is None and not empty["complications"]
    assert empty["recent_oe"] == {}


def test_reads_are_not_forked_beside_other_threads_or_without_a_process(
        sqlite_url, settings_for, monkeypatch):
    """A child forked while another thread runs could inherit a lock held there and hang the
    report: then, and when no process can be forked (OSError), the report reads in this
    process, the same data, and leaves no pipe open."""
    import threading

    from pipelines.report import data as report_data

    _, settings = _report_registry(sqlite_url, settings_for)
    here = ReportData(settings, None)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert not report_data._may_fork()
    finally:
        release.set()
        other.join()

    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    pipes, closed = [], []
    real_pipe, real_close = os.pipe, os.close

    def recorded_pipe():
        pipes.append(real_pipe())
        return pipes[-1]

    def recorded_close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(report_data, "_may_fork", lambda: True)
    monkeypatch.setattr(report_data.os, "fork", no_fork)
    monkeypatch.setattr(report_data.os, "pipe", recorded_pipe)
    monkeypatch.setattr(report_data.os, "close", recorded_close)
    again = ReportData(settings, None, parallel_reads=True)
    monkeypatch.undo()
    assert len(pipes) == 1 and set(pipes[0]) <= set(closed)
    assert (again.result.run_key, again.months, again.quality, again.facts) == (
        here.result.run_key, here.months, here.quality, here.facts)


def test_site_pages_are_written_as_the_utf8_of_their_text(sqlite_url, settings_for):
    """write_report encodes a site page part by part (site_page_bytes): the same bytes as
    encoding site_page's text, non-ASCII dashes and minus signs included."""
    from pipelines.report.funnels import build_funnel_templates
    from pipelines.report.site import site_page, site_page_bytes

    _, settings = _report_registry(sqlite_url, settings_for)
    data = ReportData(settings, None)
    build_funnel_templates(data)
    for site in data.sites:
        text = site_page(data, site["site_id"])
        assert not text.isascii()
        assert site_page_bytes(data, site["site_id"]) == text.encode("utf-8")


def test_long_chart_paths_are_written_as_formatting_writes_them():
    """Long paths take their coordinates' texts from a table (svgplot._tenths_pairs); the
    text must be byte for byte what "%.1f,%.1f " formatting gives, halves and all."""
    from pipelines.report.svgplot import _LONG_PATH, _pair_format, _tenths_pairs

    rng = np.random.default_rng(3)
    halves = [k / 20 for k in range(1, 2000, 2)]  # 0.05, 0.15, ...: ties in decimal
    cases = [halves, [0.35, 2.675, 1.05, 0.25, 0.05, 0.04999, 3999.95, 3999.96],
             [-0.04, 1.0], [0.0, 1.0], [float("nan"), 1.0], [5000.0, 1.0], [1e-300, 1.0]]
    for scale in (1, 10, 300, 720, 3990):
        cases += [(rng.random(2 * _LONG_PATH) * scale).tolist() for _ in range(50)]
        cases.append((np.round(rng.random(2 * _LONG_PATH) * scale, 2)).tolist())
    for flat in cases:
        flat = flat[:len(flat) // 2 * 2]
        assert _tenths_pairs(flat) == (_pair_format(len(flat) // 2) % tuple(flat)).rstrip()


def test_a_failing_site_page_fails_the_report_and_leaves_no_folder(sqlite_url, settings_for,
                                                                   tmp_path, monkeypatch):
    from pipelines.report import publish

    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    def failing(real):
        def site_page(data, site_id):
            if site_id == "S003":
                raise ValueError("S003 cannot be drawn")
            return real(data, site_id)
        return site_page

    # the page as text (render_report) and as the bytes write_report writes
    monkeypatch.setattr(publish, "site_page", failing(publish.site_page))
    monkeypatch.setattr(publish, "site_page_bytes", failing(publish.site_page_bytes))
    for workers in (1, 2):  # in this process, or in a forked worker
        with pytest.raises((ValueError, RuntimeError), match="S003 cannot be drawn"):
            write_report(settings, tmp_path / "out", workers=workers)
        assert not (tmp_path / "out").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_numbers_equal_site_json(db_url, settings_for, tmp_path, capsys):
    _, settings = _report_registry(db_url, settings_for)
    out = write_report(settings, tmp_path / "out").parent
    assert cli_main(["site", "S004", "--db", db_url, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    fields = _parse(out / "sites" / "S004.html").fields
    compared = 0
    for metric in payload["metrics"]:
        expected = {name: metric.get(name) for name in
                    ("n", "events", "rate", "ci_low", "ci_high", "baseline")}
        for name, value in (metric.get("observed_expected") or {}).items():
            if name != "observed":
                expected[name] = value
        for chart, values in (metric.get("cusum") or {}).items():
            expected[f"cusum.{chart}.value"] = values["value"]
            expected[f"cusum.{chart}.h"] = values["h"]
        for name, value in expected.items():
            shown = fields[(metric["metric"], name)]
            assert (shown or None) == (None if value is None else repr(value)), (metric, name)
            compared += 1
    assert compared > 40
    leak = next(m for m in payload["metrics"] if m["metric"] == "cement_leak")
    assert leak["status"] == "alarm" and payload["status"] == "alarm"
    # the overview data equals `kyphowatch sites --json`
    assert cli_main(["sites", "--db", db_url, "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    report_json = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report_json["sites"] == sites["sites"]
    assert report_json["run_key"] == sites["run_key"] == payload["run_key"]


def test_sites_command_flagged_json_and_csv(sqlite_url, settings_for, capsys):
    _report_registry(sqlite_url, settings_for, alerts=False)
    assert cli_main(["sites", "--db", sqlite_url, "--flagged", "--json"]) == 0
    flagged = json.loads(capsys.readouterr().out)["sites"]
    assert "S004" in {s["site_id"] for s in flagged}
    assert all(s["flagged"] and s["status"] in ("alarm", "watch", "under_reporting") for s in flagged)
    assert "S001" not in {s["site_id"] for s in flagged}
    assert cli_main(["sites", "--db", sqlite_url, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["site"] for r in rows] == ["S001", "S002", "S003", "S004"]
    assert rows[3]["cement_leak"] == "alarm" and rows[3]["procedures"] == "300"
    assert cli_main(["site", "S004", "--db", sqlite_url, "--csv", "--metric", "cement_leak"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["metric"] for r in rows] == ["cement_leak"] and rows[0]["status"] == "alarm"
    # tidy CSV: one value per column, missing values empty (never a formula-guarded "'-")
    assert rows[0]["alarm_chart"] == "ra_cusum_up" and float(rows[0]["alarm_statistic"]) >= 0
    assert "'-" not in json.dumps(rows)
    assert cli_main(["sites", "--db", sqlite_url]) == 0
    grid = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in grid) <= 100
    assert grid[3].startswith("S004  ALARM")  # most severe first, under the two header rows
    assert cli_main(["site", "S004", "--db", sqlite_url]) == 0
    text = capsys.readouterr().out
    assert text.startswith("site S004: alarm") and "cement_leak: alarm since" in text
    assert max(len(line) for line in text.splitlines()) <= 100  # fits a terminal
    assert cli_main(["site", "S004", "--db", sqlite_url, "--wide"]) == 0
    assert "ra_cusum" in capsys.readouterr().out  # every column and the signals table
    # mistakes get one line and exit 2
    assert cli_main(["site", "S999", "--db", sqlite_url]) == 2
    assert "unknown site" in capsys.readouterr().err
    assert cli_main(["site", "S004", "--db", sqlite_url, "--metric", "leaks"]) == 2
    assert cli_main(["sites", "--db", sqlite_url, "--as-of", "2024-13-01"]) == 2
    # an unreachable warehouse is an external failure: exit 4, one line, no traceback
    capsys.readouterr()
    assert cli_main(["sites", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"]) == 4
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: --json and --csv exclude each other
        cli_main(["sites", "--db", sqlite_url, "--json", "--csv"])
    assert usage.value.code == 2


@pytest.mark.parametrize(("value", "expected"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+1+1", "'+1+1"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tcmd", "'\tcmd"),
    ("\rcmd", "'\rcmd"), ("S004", "S004"), ("in control", "in control"), (-0.5, -0.5),
    (3, 3), (None, ""),
])
def test_csv_cells_that_look_like_formulas_are_neutralised(value, expected):
    assert csv_cell(value) == expected
    buffer = io.StringIO()
    write_csv(buffer, ["h"], [[value]])
    assert list(csv.reader(io.StringIO(buffer.getvalue(), newline="")))[1][0] == str(expected)


def test_sites_on_an_empty_warehouse_lists_nothing(sqlite_url, capsys):
    migrate(make_engine(sqlite_url))
    assert cli_main(["sites", "--db", sqlite_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"as_of": None, "sites": []}
    assert cli_main(["site", "S001", "--db", sqlite_url]) == 2
    assert "no procedures yet" in capsys.readouterr().err


def _link(path: Path) -> str:
    return os.readlink(path)


def test_publish_report_keeps_latest_on_the_newest_as_of(sqlite_url, settings_for):
    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    root = Path(settings.report_dir)
    newest = publish_report(settings)
    assert _link(root / "latest") == newest.parent.name == "2023-06-24"
    older = publish_report(settings, date(2023, 1, 31))
    assert older.parent.name == "2023-01-31" and older.exists()
    # a backfill for an older date does not move `latest`
    assert _link(root / "latest") == "2023-06-24"
    assert "data as of <b>2023-01-31</b>" in older.read_text(encoding="utf-8")
    # republishing a date swaps in a whole new build; the old one stays for readers a while
    first_build = _link(root / "2023-06-24")
    publish_report(settings)
    assert _link(root / "2023-06-24") != first_build
    assert (root / first_build / "index.html").exists()
    assert (root / "latest" / "sites" / "S004.html").exists()


def test_a_look_ahead_report_never_becomes_latest(sqlite_url, settings_for):
    """A report dated after the newest procedure (a mistyped year) is published under its
    date but leaves ``latest`` on the data; a ``latest`` left on one yields (user audit)."""
    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    root = Path(settings.report_dir)
    publish_report(settings)
    ahead = publish_report(settings, date(2023, 9, 30))
    assert ahead.parent.name == "2023-09-30" and ahead.exists()
    assert _link(root / "latest") == "2023-06-24"
    os.unlink(root / "latest")
    os.symlink("2023-09-30", root / "latest")  # as an older kyphowatch left it
    publish_report(settings)
    assert _link(root / "latest") == "2023-06-24"


def test_latest_moves_from_the_empty_page_to_the_first_data(sqlite_url, settings_for):
    migrate(make_engine(sqlite_url))
    settings = settings_for(sqlite_url)
    root = Path(settings.report_dir)
    empty = publish_report(settings)
    assert _link(root / "latest") == "empty" and "no procedures yet" in empty.read_text()
    build_sites(make_engine(sqlite_url), sites=2, per_site=50, seed=5)
    publish_report(settings)
    assert _link(root / "latest") == "2023-06-24"
    publish_report(settings)  # an empty page never replaces real data
    assert _link(root / "latest") == "2023-06-24"


def test_old_dated_reports_are_pruned_but_never_latest(sqlite_url, settings_for):
    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    settings = dataclasses.replace(settings, report_keep=2)
    root = Path(settings.report_dir)
    for day in (date(2023, 6, 24), date(2023, 3, 31), date(2023, 4, 30), date(2023, 5, 31)):
        publish_report(settings, day)
    dated = sorted(p.name for p in root.iterdir() if p.is_symlink() and p.name[0].isdigit())
    # the newest two dates, plus the one `latest` points to
    assert dated == ["2023-05-31", "2023-06-24"]
    assert _link(root / "latest") == "2023-06-24"
    # builds nobody links to are removed once they are ten minutes old; the build that a
    # republish just replaced is kept for readers still paging through it
    for build in (root / "builds").iterdir():
        os.utime(build, (0, 0))
    replaced = Path(_link(root / "2023-06-24")).name
    publish_report(settings, date(2023, 6, 24))
    remaining = {p.name for p in (root / "builds").iterdir()}
    linked = {Path(_link(root / d)).name for d in ("2023-05-31", "2023-06-24")}
    assert remaining == linked | {replaced} and len(remaining) == 3


def test_report_command(sqlite_url, tmp_path, capsys, monkeypatch):
    engine = make_engine(sqlite_url)
    insert(engine, [procedure_row("P1", "S001", date(2024, 1, 1))])
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    monkeypatch.setenv("KYPHOWATCH_REPORT_DIR", str(tmp_path / "reports"))
    assert cli_main(["report", "--db", sqlite_url, "--out", str(tmp_path / "one"),
                     "--as-of", "2024-03-01"]) == 0
    assert (tmp_path / "one" / "sites" / "S001.html").exists()
    # an immature site: no unit has completed its outcome window
    assert "st-immature" in (tmp_path / "one" / "index.html").read_text(encoding="utf-8")
    assert cli_main(["report", "--db", sqlite_url]) == 0
    assert (tmp_path / "reports" / "latest" / "index.html").exists()
    assert cli_main(["report", "--db", sqlite_url, "--as-of", "March"]) == 2


def test_views_return_rows(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=2, per_site=200, leak={"S002": 0.4}, seed=4)
    insert(engine, [procedure_row("PX", "S001", date(2023, 1, 3), mdt=False)],
           [complication_row("CX", "PX", "S001", date(2023, 1, 3), "paralysis",
                             severity="major", symptomatic=True)])
    _data_quality_rows(engine)
    run_monitor(settings_for(db_url))
    with engine.connect() as conn:
        def rows(view):
            return [dict(r._mapping) for r in conn.execute(
                sa.select(sa.literal_column("*")).select_from(sa.table(view)))]

        assert rows("v_active_signals")
        assert [r["reasons"] for r in rows("v_quarantine_summary")] == ['["bad_date"]']
        assert {r["status"] for r in rows("v_file_ledger_recent")} == {"loaded", "rejected"}
        assert [r["complication_id"] for r in rows("v_pending_complications")] == ["C-pending"]
        for view in ("v_quarantine_summary", "v_file_ledger_recent"):
            assert SECRET_PATIENT_REF not in json.dumps(rows(view), default=str)


@pytest.mark.parametrize(("leak", "seed"), [({"S004": 0.35}, 2), ({}, 11)])
def test_funnel_plot_draws_the_limits_the_engine_decided_with(sqlite_url, settings_for, leak,
                                                              seed):
    from pipelines.surveillance.engine import evaluate
    from pipelines.surveillance.exact_limits import coverage_limits

    build_sites(make_engine(sqlite_url), sites=6, per_site=300, leak=leak, seed=seed)
    result = evaluate(settings_for(sqlite_url))
    modes = set()
    for chart in result.charts["funnel"].values():
        mode = chart["overdispersion_mode"]
        modes.add(mode)
        for m in result.site_metrics:
            stored = (m.get("funnel") or {}).get(chart["window"])
            if m["metric"] != chart["metric"] or not stored or not stored["n"]:
                continue
            # the curve the report draws, evaluated at this site's n, is the engine's limit
            lower, upper = coverage_limits(np.array([stored["n"]], float), chart["p0"],
                                           chart["limit"], mode, chart["phi"])
            assert upper[0] == pytest.approx(stored["upper"]), (chart["metric"], m["site_id"])
            assert lower[0] == pytest.approx(stored["lower"]), (chart["metric"], m["site_id"])
        svg = report_module.funnel_svg(chart, "t", {})
        decision = "overdispersion" if mode != "none" else "(exact), decision"
        assert decision in svg and svg.count("decision") == 1
        # a site page's funnel with the network's curves and cloud in a shared file: put
        # the file's elements where its <image> is, and it is the funnel drawn whole
        sites = chart["sites"]
        classes = {sites[0]: "significant", sites[1]: "outside"}
        whole = funnel_template(chart, "t", classes, True)
        shared = funnel_template(chart, "t", classes, True, layer="../funnel-m-w.svg")
        assert shared.svg.count('<image href="../funnel-m-w.svg"') == 1
        assert 'h0" stroke=' in shared.layer and 'h0" stroke=' not in shared.svg  # the cloud
        assert shared.layer.count("<polyline") >= 4  # the 95% and decision limits
        for site in sites:
            assert inline_layer(shared.for_site(site), {"funnel-m-w.svg": shared.layer}) == (
                whole.for_site(site))
    assert modes  # at least one funnel was drawn


def inline_layer(page: str, layers: dict[str, str]) -> str:
    """Return ``page`` with each shared funnel layer's ``<image>`` replaced by the layer
    file's elements (the funnel as drawn before the layers were shared)."""
    def elements(match: re.Match) -> str:
        head, _, rest = layers[match.group(1)].partition(">\n")
        # the file is drawn at the chart's own size and place, in the chart's units
        size = f'width="{match.group(2)}" height="{match.group(3)}"'
        assert head == (f'<svg xmlns="http://www.w3.org/2000/svg" {size} viewBox="0 0 '
                        f'{match.group(2)} {match.group(3)}"'), head
        assert page[:match.start()].rsplit("<svg ", 1)[1].startswith(
            f'xmlns="http://www.w3.org/2000/svg" role="img" class="chart" viewBox="0 0 '
            f'{match.group(2)} {match.group(3)}" {size}')
        assert rest.endswith("\n</svg>\n")
        return rest[:-len("\n</svg>\n")]

    return re.sub(r'<image href="\.\./(funnel-[^"]+\.svg)" x="0" y="0" width="(\d+)" '
                  r'height="(\d+)"/>', elements, page)


def test_a_past_as_of_shows_only_data_up_to_that_date(sqlite_url, settings_for, tmp_path,
                                                      capsys):
    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    out = write_report(settings, tmp_path / "past", as_of=date(2023, 1, 31)).parent
    assert cli_main(["site", "S004", "--db", sqlite_url, "--json", "--as-of", "2023-01-31"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["as_of"] == "2023-01-31"
    assert payload["data_quality"]["last_procedure_date"] <= "2023-01-31"
    assert all(c["event_date"] <= "2023-01-31" for c in payload["recent_complications"])
    fields = _parse(out / "sites" / "S004.html").fields
    leak = next(m for m in payload["metrics"] if m["metric"] == "cement_leak")
    assert fields[("cement_leak", "n")] == repr(leak["n"]) and leak["n"] < 279
    report_json = json.loads((out / "report.json").read_text(encoding="utf-8"))
    row = next(s for s in report_json["sites"] if s["site_id"] == "S004")
    assert row["last_procedure_date"] == payload["data_quality"]["last_procedure_date"]


def test_chart_labels_never_overlap():
    from pipelines.report.svgplot import LABEL_CHAR_W, LABEL_H, place_labels

    rng = np.random.default_rng(3)
    points = [(float(x), float(y), f"S{i:03d}") for i, (x, y) in
              enumerate(zip(rng.uniform(100, 140, 25), rng.uniform(60, 90, 25), strict=True))]
    texts = [t for t in place_labels(points, (0, 0, 700, 300)) if t.startswith("<text")]
    boxes = []
    for element in texts:
        x, y = (float(v) for v in re.search(r'x="([\d.]+)" y="([\d.]+)"', element).groups())
        name = re.search(r">([^<]+)</text>", element).group(1)
        boxes.append((x - 1, y + 2 - LABEL_H, x - 1 + LABEL_CHAR_W * len(name) + 2, y + 2))
    assert len(boxes) >= 20  # crowded, yet most labels found a place
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] - 1e-6 and b[0] < a[2] - 1e-6 and a[1] < b[3] - 1e-6
                        and b[1] < a[3] - 1e-6), (a, b)


def test_chart_csv_is_tidy_and_formula_safe():
    from pipelines.report.common import csv_text

    text = csv_text(["site", "value", "note"],
                    [["S001", -0.5, "=HYPERLINK(1)"], ["S002", None, "@x"],
                     ["S003", float("nan"), None], ["S004", 2, "ok"]])
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows == [["site", "value", "note"], ["S001", "-0.5", "'=HYPERLINK(1)"],
                    ["S002", "", "'@x"], ["S003", "", ""], ["S004", "2", "ok"]]
    assert text.endswith("\r\n")


def test_rounded_chart_cells_read_as_repr_of_the_rounded_value():
    # The chart series' CSV cells are formatted in fixed point with trailing zeros cut; a
    # reader must get exactly repr(round(v, digits)), the text csv_text writes for a float.
    import numpy as np

    from pipelines.report.common import rounded_texts

    rng = np.random.default_rng(7)
    edges = [0.0, -0.0, 1e-5, -3e-5, 5e-05, 0.00005, 0.00015, 0.12345, 2.5, 1e9 + 0.5,
             123456789.98765, 1e10, 1e17, float("inf"), float("-inf"), float("nan")]
    for digits in (4, 5):
        values = [*edges, *(rng.standard_normal(20_000) * 10.0 ** rng.integers(-6, 12, 20_000))
                  .tolist(), *((rng.integers(-10**9, 10**9, 5_000) + 0.5) / 10**digits).tolist()]
        expected = ["" if v != v else repr(round(v, digits)) for v in values]
        assert rounded_texts(values, digits) == expected
        assert rounded_texts(np.asarray(values), digits) == expected


def test_series_files_are_tidy_and_refuse_malformed_site_ids():
    from pipelines.errors import ExternalSystemError
    from pipelines.report.charts import cusum_csv, tte_csv

    chart = dict(sites=["S001", "S002"], group=np.array([0, 0, 1]),
                 day=np.array([19000, 19001, 19001]), statistic=np.array([0.5, 1e-5, 2.0]),
                 signal=np.array([False, False, True]), h=4.0, h_sites=np.array([3.25, np.nan]))
    rows = list(csv.reader(io.StringIO(cusum_csv(chart), newline="")))
    # the site's own threshold, else the chart's; statistics rounded to 5 decimals
    assert rows == [["site", "date", "statistic", "signal", "threshold_h"],
                    ["S001", "2022-01-08", "0.5", "0", "3.25"],
                    ["S001", "2022-01-09", "0.00001", "0", "3.25"],
                    ["S002", "2022-01-09", "2", "1", "4"]]
    tte = {"series": {"S001": {"day": [19000], "statistic": [0.123456789], "h": None},
                      "S002": {"day": [], "statistic": [], "h": 2.0}}}
    assert tte_csv(tte) == "site,date,statistic,threshold_h\r\nS001,2022-01-08,0.12346,\r\n"
    # ids are written unquoted: one that could run as a formula is refused, not written
    # ("S001\n": `$` would match before a trailing newline; the check is a full match)
    for bad in ("=1+2", "S0,1", "S001\n"):
        with pytest.raises(ExternalSystemError, match="malformed site id"):
            cusum_csv({**chart, "sites": ["S001", bad]})
        with pytest.raises(ExternalSystemError, match="malformed site id"):
            tte_csv({"series": {bad: tte["series"]["S001"]}})


def test_report_intervals_equal_the_engines_bit_for_bit():
    """The report's exact intervals (scipy.special kernels, no scipy.stats import) give
    the engine's and scipy.stats' numbers exactly, so funnels.html and devices.html keep
    their bytes."""
    from scipy import stats

    from pipelines.report.beyond import chi2_ppf
    from pipelines.report.funnels import exact_interval
    from pipelines.surveillance.engine import exact_interval as engine_interval

    rng = np.random.default_rng(11)
    n = np.concatenate([[0, 0, 1, 1, 2, 5, 40, 3000], rng.integers(0, 5000, 2000)])
    events = np.concatenate([[0, 0, 0, 1, 2, 1, 0, 2999],
                             np.floor(rng.random(2000) ** 3 * (n[8:] + 1))]).clip(0, n)
    for mine, theirs in zip(exact_interval(events, n), engine_interval(events, n),
                            strict=True):
        assert np.array_equal(mine, theirs, equal_nan=True)
        assert np.isnan(mine[n == 0]).all() and np.isfinite(mine[n > 0]).all()
    for events in [*range(0, 60), 137, 1000, 25_000]:
        for q, df in ((0.025, 2 * events), (0.975, 2 * events + 2)):
            if df:
                assert chi2_ppf(q, df) == stats.chi2.ppf(q, df)


def test_report_does_not_import_the_monitor(sqlite_url, settings_for, tmp_path):
    """Writing a report in a fresh process imports neither the monitor engine nor
    scipy.stats (with pandas and statsmodels, about 1.9 s of a 1,000-site report), nor
    pandas (pyarrow's ``pa.array`` imports it: 1.5 s; the series CSVs avoid it)."""
    import subprocess
    import sys

    _, settings = _report_registry(sqlite_url, settings_for, alerts=False)
    code = (
        "import sys\n"
        "from pipelines.report import write_report\n"
        "from pipelines.settings import load_settings\n"
        "write_report(load_settings(db_url=sys.argv[1]), __import__('pathlib').Path(sys.argv[2]))\n"
        "print(sorted(m for m in ('pipelines.surveillance.engine', 'scipy.stats', "
        "'statsmodels', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sqlite_url, str(tmp_path / "fresh")],
        env={**os.environ, "KYPHOWATCH_DEMO": "1"}, capture_output=True, text=True,
        check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "fresh" / "funnels.html").exists()
    assert (tmp_path / "fresh" / "devices.html").exists()
