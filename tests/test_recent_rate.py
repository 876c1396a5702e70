"""The recent rate of a metric with a follow-up window is one figure, worded one way (fixrate).

A user audit: the S012 new-fracture alarm e-mail said "41% (144 of 355) in the last 12
months" for procedures of a year earlier (the rolling funnel's units), while the report
showed all mature units and "-" for the last 12 months. Now the e-mail (level alarm and
watch digest), the report's overview cell and site page, ``kyphowatch site`` and
``v_site_month_rates`` show the latest 12 index months of mature units, with those months.
"""

from __future__ import annotations

from datetime import date

import pytest
import sqlalchemy as sa

from pipelines.alerts import deliver_outbox, sync_alerts
from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.mailsink import MailSink
from pipelines.report import write_report
from pipelines.simulate import simulate
from pipelines.surveillance import levels
from pipelines.surveillance.engine import run_monitor

SITE, AS_OF = "S002", date(2023, 10, 31)
# as_of - 365 days is 2022-10-31: the newest index month with mature units is 2022-10
FROM, TO = "2021-11", "2022-10"
WORDS = f"procedures of {FROM} to {TO}, each followed for a year"


def test_recent_months_of_a_follow_up_window_end_with_the_newest_mature_month():
    assert levels.recent_months_before(365, date(2024, 11, 20)) == (12, 24)
    assert levels.recent_span(365, date(2024, 11, 20)) == {
        "months": 12,
        "index_from": "2022-12",
        "index_to": "2023-11",
        "follow_up_days": 365,
    }
    # a leap day in the year before a month's last day moves it back one month
    assert levels.recent_months_before(365, date(2024, 12, 31)) == (11, 23)
    # leaks and major events keep the last 12 index months, worded as such
    assert levels.recent_months_before(30, date(2024, 11, 20)) == (0, 12)
    assert levels.recent_words(levels.recent_span(30, AS_OF)) == "the last 12 months"
    assert levels.recent_words(levels.recent_span(365, AS_OF)) == WORDS


@pytest.fixture
def sink(tmp_path):
    with MailSink(tmp_path / "mail") as running:
        yield running


def test_email_report_and_cli_show_one_new_fracture_figure_with_its_index_months(
    sqlite_url, settings_for, sink, tmp_path, capsys, monkeypatch
):
    settings = settings_for(
        sqlite_url,
        smtp_url=sink.url,
        recipients_safety=("safety@example.org",),
        recipients_data=("data@example.org",),
    )
    out = tmp_path / "extracts"
    simulate(
        out,
        sites=5,
        start=date(2021, 1, 1),
        end=AS_OF,
        seed=7,
        drifts=[f"{SITE}:new_fracture:4.0:2021-03-01"],
    )
    ingest_paths(settings, sorted(out.glob("*.csv")))
    run_monitor(settings)

    # the view: the recent months of mature new-fracture units at the site
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT month, units, events, months_before_as_of FROM v_site_month_rates "
                "WHERE site_id = :site AND metric = 'new_fracture'"
            ),
            {"site": SITE},
        ).all()
    engine.dispose()
    recent = [r for r in rows if 12 <= r.months_before_as_of < 24]
    assert not any(r.units for r in rows if r.months_before_as_of < 12)
    assert (min(r.month for r in recent), max(r.month for r in recent)) == (FROM, TO)
    n, events = sum(r.units for r in recent), sum(r.events for r in recent)
    assert n > 10 and events

    # the alarm e-mail: rate, counts and the index months, not "the last 12 months"
    sync_alerts(settings)
    deliver_outbox(settings)
    texts = [
        m.get_body(("plain",)).get_content()
        for m in sink.messages()
        if SITE in m["Subject"] and "fracture" in m["Subject"]
    ]
    assert texts, [m["Subject"] for m in sink.messages()]
    text = " ".join(texts[0].split())
    assert f"({events} of {n}) among {WORDS}" in text
    assert f"Recent: {round(100 * events / n)}% ({events} of {n}) among {WORDS}" in text

    # the report: overview cell and site page
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    index = write_report(settings, tmp_path / "report")
    overview = index.read_text()
    assert f"{100 * events / n:.1f}% of {n} ({WORDS})" in overview
    page = (index.parent / "sites" / f"{SITE}.html").read_text()
    assert f"{100 * events / n:.1f}% ({FROM} to {TO})" in page

    # kyphowatch site
    capsys.readouterr()
    assert cli_main(["site", SITE, "--db", sqlite_url]) == 0
    shown = capsys.readouterr().out
    assert f"new_fracture: recent {100 * events / n:.3g}% ({events} of {n}) among {WORDS}" in shown


def test_level_email_and_digest_item_word_a_follow_up_figure_by_its_index_months():
    from pipelines.alerts.render import render

    # as levels.recent_span(365, date(2024, 11, 20)) gives them (first test)
    recent = {"months": 12, "index_from": "2022-12", "index_to": "2023-11",
              "follow_up_days": 365, "n": 355, "events": 144, "rate": 144 / 355}  # fmt: skip
    words = "41% (144 of 355) among procedures of 2022-12 to 2023-11, each followed for a year"
    level = {"type": "level", "site_id": "S012", "metric": "new_fracture",
             "metric_label": "New vertebral fracture within a year (per patient)",
             "level": "alarm", "direction": "up", "since": "2024-06-01", "recent": recent,
             "guidance": {"low": 0.18, "high": 0.23, "citation": "NICE HTG108 2.4.2"}}  # fmt: skip
    row = {"alert_id": "a" * 64, "kind": "safety", "title": "Alarm", "episode": 1}
    text = render({**row, "payload": level}).text
    assert f"at S012: {words} against 18–23%" in text
    assert f"Recent:   {words}" in text
    assert "last 12 months" not in text
    item = {"site_id": "S001", "metric": "new_fracture", "metric_label": "New fracture",
            "level": "watch", "since": "2024-09-01", "rate": recent["rate"],
            "recent": recent, "guidance": level["guidance"]}  # fmt: skip
    digest = {"type": "digest", "digest": "watch", "as_of": "2024-11-20",
              "period": "2024-W47", "items": [item]}  # fmt: skip
    (line,) = [x for x in render({**row, "payload": digest}).text.splitlines()
               if x.startswith("- S001")]  # fmt: skip
    assert f"{words} against 18–23%" in line
