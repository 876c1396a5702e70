"""A time-to-event chart, once charted, stays charted; a chart not charted is not cleared."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

import numpy as np
import sqlalchemy as sa

from pipelines.alerts.lifecycle import sync_alerts
from pipelines.db import make_engine, open_warehouse
from pipelines.schema import alert, alert_audit, alert_outbox, complication, monitor_run, procedure
from pipelines.surveillance import survival
from pipelines.surveillance.engine import evaluate, run_monitor
from pipelines.surveillance.runs import tte_charted_since
from tests.test_outcomes import complication_row, insert, procedure_row

START = date(2022, 1, 1)
KEY = "level:htg108:S001:new_fracture:up"
# S001 fractures at 60 %, far above the guidance's 23 %: its time-to-event chart alarms.
RATES = (0.6, 0.2, 0.2, 0.2)


def _network(engine, first: int, days: int, seed: int, prefix: str) -> None:
    """Insert about 0.7 procedures a day per site over ``days`` from day ``first``, with
    front-loaded new fractures (onset 10 + 356 Beta(1, 2.5) days, as the simulator draws)
    known up to the last day."""
    rng = np.random.default_rng(seed)
    end = START + timedelta(days=first + days)
    procs, comps = [], []
    for s, rate in enumerate(RATES, 1):
        site = f"S{s:03d}"
        n = rng.poisson(0.7 * days)
        offsets = np.sort(rng.integers(first, first + days, n))
        hit = rng.random(n) < rate
        delay = 10 + (356 * rng.beta(1, 2.5, n)).astype(int)
        for i, (offset, fractured, wait) in enumerate(
            zip(offsets.tolist(), hit.tolist(), delay.tolist(), strict=True)
        ):
            pid = f"{prefix}{site}-{i:05d}"
            day = START + timedelta(days=offset)
            procs.append(procedure_row(pid, site, day))
            if fractured and day + timedelta(days=wait) < end:
                comps.append(
                    complication_row(
                        f"F{pid}", pid, site, day + timedelta(days=wait), "new_fracture"
                    )
                )
    insert(engine, procs, comps)


def _correct_away_early_patients(engine) -> None:
    """Remove the other sites' procedures of the first 40 days (and their fractures): the
    patients followed through the window's last days fall below the start rule."""
    cut = START + timedelta(days=40)
    early = sa.and_(procedure.c.site_id != "S001", procedure.c.procedure_date < cut)
    with engine.begin() as conn:
        conn.execute(
            complication.delete().where(
                complication.c.procedure_id.in_(sa.select(procedure.c.procedure_id).where(early))
            )
        )
        conn.execute(procedure.delete().where(early))


def _tte_sites(result) -> set[str]:
    return {s["site_id"] for s in result.signals if s["method"] == "tte_cusum"}


def _alarm_e_mails(db_url) -> list[tuple[int, str]]:
    """Return (episode, state) of every alert on S001's new-fracture alarm with an e-mail."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(alert.c.episode, alert.c.state)
            .join(alert_outbox, alert_outbox.c.alert_id == alert.c.alert_id)
            .where(alert.c.dedupe_key == KEY, alert_outbox.c.channel == "email")
            .order_by(alert.c.episode)
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def _settings(settings_for, db_url):
    # An SMTP URL nothing listens on: the e-mails are queued (alert_outbox), never sent.
    return settings_for(
        db_url, smtp_url="smtp://127.0.0.1:9", recipients_safety=("safety@example.org",)
    )


def _rule_passes(result) -> bool:
    return "tte_kept" not in result.summary["metrics"]["new_fracture"]


def test_a_correction_below_the_rule_keeps_the_chart_and_sends_no_second_e_mail(
    db_url, settings_for
):
    engine = make_engine(db_url)
    settings = _settings(settings_for, db_url)
    _network(engine, 0, 430, seed=1, prefix="P")
    first = run_monitor(settings)
    assert first.summary["metrics"]["new_fracture"]["tte_charted_since"] == str(first.as_of)
    assert _rule_passes(first) and _tte_sites(first) == {"S001"}
    sync_alerts(settings, as_of=first.as_of)
    assert _alarm_e_mails(db_url) == [(1, "open")]

    _correct_away_early_patients(engine)
    corrected = run_monitor(settings)
    assert corrected.as_of == first.as_of and corrected.run_key != first.run_key
    noted = corrected.summary["metrics"]["new_fracture"]
    # Below the rule now (on main: "not charted yet", no chart, the alarm closed as cleared).
    assert "tte" not in noted and noted["tte_charted_since"] == str(first.as_of)
    assert noted["tte_kept"].startswith(f"charted since {first.as_of}")
    assert "new_fracture" in corrected.charts["tte"] and _tte_sites(corrected) == {"S001"}
    sync_alerts(settings, as_of=corrected.as_of)
    assert _alarm_e_mails(db_url) == [(1, "open")]

    # A month later the rule passes again; the alarm is the same episode, not a new e-mail.
    _network(engine, 430, 40, seed=2, prefix="Q")
    later = run_monitor(settings)
    assert _rule_passes(later) and _tte_sites(later) == {"S001"}
    assert later.summary["metrics"]["new_fracture"]["tte_charted_since"] == str(first.as_of)
    sync_alerts(settings, as_of=later.as_of)
    assert _alarm_e_mails(db_url) == [(1, "open")]

    # A backfill before the chart was first charted follows the rule alone.
    early = evaluate(settings, first.as_of - timedelta(days=100))
    assert early.summary["metrics"]["new_fracture"]["tte"].startswith("not charted yet")
    assert "tte_charted_since" not in early.summary["metrics"]["new_fracture"]
    engine.dispose()


def test_the_methods_page_says_since_when_the_chart_is_kept(db_url, settings_for):
    from pipelines.report.data import ReportData
    from pipelines.report.methods import methods_page

    engine = make_engine(db_url)
    settings = _settings(settings_for, db_url)
    _network(engine, 0, 430, seed=1, prefix="P")
    first = run_monitor(settings)
    _correct_away_early_patients(engine)
    run_monitor(settings)
    engine.dispose()
    page = methods_page(ReportData(settings, None))
    assert (
        f"New vertebral fracture within a year (per patient): charted since {first.as_of}" in page
    )


def test_an_alarm_whose_chart_was_not_charted_is_not_cleared(db_url, settings_for):
    # Runs stored before the decision was (no tte_charted_since in their summaries): the
    # corrected run does not chart the chart, and the sync must not read that as cleared.
    engine = make_engine(db_url)
    settings = _settings(settings_for, db_url)
    _network(engine, 0, 430, seed=1, prefix="P")
    first = run_monitor(settings)
    sync_alerts(settings, as_of=first.as_of)
    with engine.begin() as conn:
        conn.execute(monitor_run.update().values(summary="{}"))
    _correct_away_early_patients(engine)
    corrected = run_monitor(settings)
    assert corrected.summary["metrics"]["new_fracture"]["tte"].startswith("not charted yet")
    assert not _tte_sites(corrected)
    result = sync_alerts(settings, as_of=corrected.as_of)
    assert result.closed == 0
    assert _alarm_e_mails(db_url) == [(1, "open")]
    with engine.connect() as conn:
        reasons = (
            conn.execute(
                sa.select(alert_audit.c.reason)
                .join(alert, alert.c.alert_id == alert_audit.c.alert_id)
                .where(alert.c.dedupe_key == KEY)
            )
            .scalars()
            .all()
        )
    assert "condition cleared" not in reasons

    _network(engine, 430, 40, seed=2, prefix="Q")
    later = run_monitor(settings)
    assert _tte_sites(later) == {"S001"}
    sync_alerts(settings, as_of=later.as_of)
    assert _alarm_e_mails(db_url) == [(1, "open")]
    engine.dispose()


def test_charts_at_keeps_a_chart_from_the_day_it_was_charted():
    day = date(2023, 3, 6)
    assert survival.charts_at(True, None, day)
    assert not survival.charts_at(False, None, day)
    assert survival.charts_at(False, day, day)
    assert survival.charts_at(False, day, day + timedelta(days=1))
    assert not survival.charts_at(False, day, day - timedelta(days=1))  # a backfill


def test_tte_charted_since_reads_the_earliest_stored_run_up_to_as_of(db_url):
    engine = open_warehouse(db_url)

    def stored(key, as_of, since, profile="htg108"):
        metrics = {"new_fracture": {"tte_charted_since": since} if since else {"n": 1}}
        return {
            "run_key": key,
            "as_of": as_of,
            "profile_name": profile,
            "profile_version": "1",
            "data_fingerprint": key,
            "models": "{}",
            "summary": json.dumps({"metrics": metrics}),
            "computed_at": datetime(2026, 12, 7),
        }

    with engine.begin() as conn:
        conn.execute(
            monitor_run.insert(),
            [
                stored("a", date(2023, 1, 31), None),
                stored("b", date(2023, 2, 28), "2023-02-28"),
                stored("c", date(2023, 3, 31), "2023-02-28"),
                stored("d", date(2023, 1, 15), "2023-01-15", profile="other"),
            ],
        )
        assert tte_charted_since(conn, "htg108", date(2023, 4, 1), ["new_fracture"]) == {
            "new_fracture": date(2023, 2, 28)
        }
        assert tte_charted_since(conn, "htg108", date(2023, 2, 27), ["new_fracture"]) == {}
        assert tte_charted_since(conn, "htg108", date(2023, 4, 1), []) == {}
    engine.dispose()
