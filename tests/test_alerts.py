"""Alert life cycle and delivery against real SMTP and HTTP servers, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal as os_signal
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_alerts_support import (
    DATA_TO,
    SAFETY_TO,
    WebhookRecorder,
    insert_episode,
    insert_ledger,
    insert_level,
    insert_signal,
)

from pipelines import cli
from pipelines.alerts import (
    acknowledge,
    deliver_outbox,
    list_alerts,
    requeue,
    resolve,
    sync_alerts,
)
from pipelines.alerts.lifecycle import alert_detail, alert_id_for
from pipelines.db import make_engine
from pipelines.errors import InputRejected
from pipelines.mailsink import MailSink, free_port
from pipelines.schema import alert, alert_audit, alert_outbox, procedure

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sink(tmp_path):
    with MailSink(tmp_path / "mail") as running:
        yield running


@pytest.fixture
def hook():
    with WebhookRecorder() as recorder:
        yield recorder


@pytest.fixture
def make_settings(settings_for):
    def _make(db_url, smtp_url=None, webhook_url=None):
        return settings_for(
            db_url,
            smtp_url=smtp_url,
            webhook_url=webhook_url,
            recipients_safety=(SAFETY_TO,),
            recipients_data=(DATA_TO,),
            report_base_url="https://reports.example.org/kyphowatch/report",
        )

    return _make


def _rows(db_url, table, *where):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(table).where(*where)).mappings()]
    engine.dispose()
    return rows


def _message_ids(sink):
    return [m["Message-ID"] for m in sink.messages()]


def test_each_alert_goes_out_once_per_channel_to_the_right_people(db_url, sink, hook,
                                                                 make_settings):
    settings = make_settings(db_url, sink.url, hook.url)
    insert_level(db_url, site="S003", metric="cement_leak")  # every method: one alert
    insert_level(db_url, site="S007", metric="cement_leak", level="under_reporting",
                 direction="down")
    insert_level(db_url, site="S009", metric="cement_leak", level="in_control")
    insert_ledger(db_url, name="procedures_20240201.csv", status="rejected",
                  reason="missing required column procedure_date")

    created = sync_alerts(settings).created
    assert len(created) == 3
    result = deliver_outbox(settings)
    assert len(result.sent) == 6 and not result.retrying

    messages = sink.messages()
    assert len(messages) == 3
    by_to = {}
    for message in messages:
        by_to.setdefault(message["To"], []).append(message)
    assert len(by_to[SAFETY_TO]) == 1 and len(by_to[DATA_TO]) == 2
    assert len(hook.requests) == 3

    outbox = _rows(db_url, alert_outbox)
    assert {r["status"] for r in outbox} == {"sent"}
    assert sorted(_message_ids(sink)) == sorted(
        r["message_id"] for r in outbox if r["channel"] == "email"
    )
    assert sorted(hook.keys()) == sorted(r["message_id"] for r in outbox if r["channel"] == "webhook")
    assert all(r["body"]["id"] == r["headers"]["Idempotency-Key"] for r in hook.requests)

    # the safety e-mail carries the content a clinician needs
    safety = by_to[SAFETY_TO][0]
    text = safety.get_body(("plain",)).get_content()
    assert "ALARM" in safety["Subject"] and "S003" in safety["Subject"]
    for expected in ("S003", "21%", "HTG108", "2024-01-01", "risk-adjusted CUSUM", "5.3",
                     "4.5", "funnel (last 12 months)",
                     "https://reports.example.org/kyphowatch/report/latest/sites/S003.html",
                     "kyphowatch alerts resolve", "screening results"):
        assert expected in text, expected
    # the earliest evidence is listed, and only once
    assert text.count("risk-adjusted CUSUM") == 1
    html_part = safety.get_body(("html",)).get_content()
    assert "href=\"https://reports.example.org/kyphowatch/report/latest/sites/S003.html" in (
        html_part.replace("'", '"'))
    assert "kyphowatch alerts resolve" in html_part and "screening results" in html_part

    # a second run sends nothing more
    again = deliver_outbox(settings)
    assert again.sent == [] and len(sink.messages()) == 3 and len(hook.requests) == 3


def test_persisting_alarm_raises_nothing_new_and_rebreach_after_resolve_does(
        db_url, sink, make_settings):
    settings = make_settings(db_url, sink.url)
    insert_level(db_url)
    first = sync_alerts(settings).created
    assert len(first) == 1
    assert sync_alerts(settings).created == []  # persisting
    deliver_outbox(settings)

    acknowledge(settings, first[0][:10], by="dr.lee", reason="looking at S003 cases")
    resolve(settings, first[0][:10], by="dr.lee", reason="case review done")
    # still at alarm after a human resolved it: the same breach, not a new one
    assert sync_alerts(settings).created == []

    insert_level(db_url, level="in_control")
    assert sync_alerts(settings).cleared == 1
    assert sync_alerts(settings).cleared == 0  # recorded once
    insert_level(db_url, since=date(2024, 6, 1), signal_keys=("k2",))
    second = sync_alerts(settings).created
    key = "level:htg108:S003:cement_leak:up"
    assert second == [alert_id_for(key, 2)]
    episodes = sorted(r["episode"] for r in _rows(db_url, alert))
    assert episodes == [1, 2]

    # a new crossing of the alarm chart after the alert was resolved is a new alert
    resolve(settings, second[0], by="dr.lee", reason="reviewed")
    insert_level(db_url, since=date(2024, 6, 1), signal_keys=("k2", "k3"))
    assert sync_alerts(settings).created == [alert_id_for(key, 3)]
    deliver_outbox(settings)
    assert len(sink.messages()) == 3


def test_cleared_level_closes_its_alert_automatically_with_an_audit_row(db_url, make_settings):
    settings = make_settings(db_url)
    insert_level(db_url)
    (alert_id,) = sync_alerts(settings).created
    insert_level(db_url, level="watch")  # below alarm now: the alarm condition cleared
    result = sync_alerts(settings)
    assert result.closed == 1
    (row,) = _rows(db_url, alert, alert.c.alert_id == alert_id)
    assert row["state"] == "resolved"
    trail = _rows(db_url, alert_audit, alert_audit.c.alert_id == alert_id)
    assert (trail[-1]["from_state"], trail[-1]["to_state"], trail[-1]["actor"],
            trail[-1]["reason"]) == ("open", "resolved", "kyphowatch", "condition cleared")


def test_new_crossings_while_open_belong_to_that_alert(db_url, make_settings):
    settings = make_settings(db_url)
    insert_level(db_url)
    (first,) = sync_alerts(settings).created
    insert_level(db_url, signal_keys=("k1", "k2"))  # the chart crossed again: same breach
    result = sync_alerts(settings)
    assert result.created == [] and result.absorbed == 1
    reasons = [r["reason"] for r in _rows(db_url, alert_audit, alert_audit.c.alert_id == first)]
    assert "1 further signal episode(s) of the same breach" in reasons


def test_watch_is_one_weekly_digest_and_history_one_summary(db_url, sink, make_settings):
    """A first sync with past episodes and sites at watch sends one summary e-mail beside the
    current alarm: the week's watch list rides in the history summary and is not sent again
    that week; the next week's watch list is its own digest."""
    settings = make_settings(db_url, sink.url)
    for site in ("S001", "S002", "S004"):
        insert_level(db_url, site=site, level="watch")
    insert_level(db_url, site="S003")  # one current alarm
    for n, site in enumerate(("S005", "S006", "S007", "S008")):  # past episodes
        insert_episode(db_url, site=site, start=date(2021, 1 + n, 1), end=date(2022, 1, 1))
    created = sync_alerts(settings).created
    rows = {r["alert_id"]: r for r in _rows(db_url, alert)}
    keys = sorted(rows[a]["dedupe_key"] for a in created)
    assert keys == ["digest:history:htg108:2024-03-31", "level:htg108:S003:cement_leak:up"]
    assert sync_alerts(settings).created == []  # the same week, nothing new
    deliver_outbox(settings)
    messages = sink.messages()
    assert len(messages) == 2
    history = next(json.loads(r["payload"]) for r in rows.values()
                   if r["dedupe_key"].startswith("digest:history"))
    assert [i["site_id"] for i in history["items"]] == ["S005", "S006", "S007", "S008"]
    assert history["watch"]["period"] == "2024-W13"
    assert [i["site_id"] for i in history["watch"]["items"]] == ["S001", "S002", "S004"]
    summary = next(m for m in messages if "backfill summary" in m["Subject"])
    assert "watch list 2024-W13: 3 site-metrics" in summary["Subject"]
    body = summary.get_body(("plain",)).get_content()
    assert body.index("At watch now (2024-W13)") < body.index("- S001") < body.index(
        "Past episodes") < body.index("- S005")
    # a later run: the past episodes are covered, so no second summary
    for site in ("S001", "S002", "S003", "S004"):
        insert_level(db_url, site=site, level="watch", as_of=date(2024, 4, 30))
    created = set(sync_alerts(settings).created)
    new_keys = [r["dedupe_key"] for r in _rows(db_url, alert) if r["alert_id"] in created]
    assert new_keys == ["digest:watch:htg108:2024-W18"]  # only the new week's watch digest
    assert not [r for r in _rows(db_url, alert) if r["dedupe_key"].startswith("digest:history")
                and r["dedupe_key"] != "digest:history:htg108:2024-03-31"]


def test_a_watch_list_already_sent_this_week_is_not_folded(db_url, make_settings):
    """Folding happens only when both digests are new: a history summary that appears after
    the week's watch digest went out is its own e-mail, without the watch list."""
    settings = make_settings(db_url)
    insert_level(db_url, site="S001", level="watch")
    created = set(sync_alerts(settings).created)
    assert [r["dedupe_key"] for r in _rows(db_url, alert) if r["alert_id"] in created] == [
        "digest:watch:htg108:2024-W13"]
    insert_episode(db_url, site="S005", start=date(2021, 1, 1), end=date(2022, 1, 1))
    created = set(sync_alerts(settings).created)
    new = [r for r in _rows(db_url, alert) if r["alert_id"] in created]
    assert [r["dedupe_key"] for r in new] == ["digest:history:htg108:2024-03-31"]
    assert "watch" not in json.loads(new[0]["payload"])


def test_an_old_sentinel_event_is_listed_once_in_the_history_summary(db_url, make_settings):
    """A sentinel event is an alarm by rule, so its ended episode is in level_episode too:
    the summary lists it once, as the episode, naming the event (user audit: listed twice)."""
    settings = make_settings(db_url)
    insert_level(db_url, site="S003")
    insert_episode(db_url, site="S009", metric="major_event", start=date(2021, 3, 1),
                   end=date(2022, 3, 1))
    insert_signal(db_url, site="S009", metric="major_event", method="sentinel",
                  episode_start=date(2021, 3, 1), signal_date=date(2021, 3, 1))
    insert_signal(db_url, site="S010", metric="major_event", method="sentinel",
                  episode_start=date(2021, 5, 1), signal_date=date(2021, 5, 1))
    sync_alerts(settings)
    (history,) = [json.loads(r["payload"]) for r in _rows(db_url, alert)
                  if r["dedupe_key"].startswith("digest:history")]
    assert [(i["site_id"], i["since"]) for i in history["items"]] == [
        ("S009", "2021-03-01"), ("S010", "2021-05-01")]
    assert "sentinel event 2021-03-01" in history["items"][0]["reason"]
    assert "2 past episode(s)" in next(r["title"] for r in _rows(db_url, alert)
                                       if r["dedupe_key"].startswith("digest:history"))
    assert not [r for r in _rows(db_url, alert) if r["dedupe_key"].startswith("sentinel:")]


def test_life_cycle_is_audited_and_invalid_transitions_are_refused(db_url, make_settings):
    settings = make_settings(db_url)
    insert_level(db_url)
    (alert_id,) = sync_alerts(settings).created
    acknowledge(settings, alert_id[:8], by="dr.lee", reason="reviewing")
    with pytest.raises(InputRejected, match="cannot become acknowledged"):
        acknowledge(settings, alert_id[:8], by="dr.lee", reason="again")
    resolve(settings, alert_id, by="dr.khan", reason="false alarm: coding error fixed")
    with pytest.raises(InputRejected):
        resolve(settings, alert_id, by="dr.khan", reason="twice")

    audit = _rows(db_url, alert_audit, alert_audit.c.alert_id == alert_id)
    transitions = [(r["from_state"], r["to_state"], r["actor"]) for r in audit]
    assert transitions == [
        (None, "open", "kyphowatch"),
        ("open", "acknowledged", "dr.lee"),
        ("acknowledged", "resolved", "dr.khan"),
    ]
    assert audit[2]["reason"] == "false alarm: coding error fixed"
    assert all(r["at"] is not None for r in audit)
    assert list_alerts(settings, state="resolved")[0]["alert_id"] == alert_id
    assert list_alerts(settings, state="open") == []


def test_cli_lists_shows_and_exits_2_on_mistakes(db_url, make_settings, capsys):
    settings = make_settings(db_url)
    insert_level(db_url)
    (alert_id,) = sync_alerts(settings).created
    assert cli.main(["alerts", "list", "--db", db_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [a["alert_id"] for a in listed] == [alert_id]
    assert cli.main(["alerts", "show", alert_id[:6], "--db", db_url]) == 0
    assert "cement_leak" in capsys.readouterr().out
    assert cli.main(["alerts", "ack", "ffff0000", "--by", "x", "--reason", "y", "--db", db_url]) == 2
    assert "no alert" in capsys.readouterr().err
    assert cli.main(["alerts", "resolve", alert_id[:6], "--by", "x", "--reason", "y",
                     "--db", db_url]) == 0  # fmt: skip
    assert cli.main(["alerts", "ack", alert_id[:6], "--by", "x", "--reason", "y",
                     "--db", db_url]) == 2  # fmt: skip
    assert "cannot become" in capsys.readouterr().err
    assert cli.main(["alerts", "sync", "--db", db_url]) == 0


def test_mail_server_down_then_up_delivers_every_alert_exactly_once(db_url, tmp_path, hook,
                                                                    make_settings):
    port = free_port()
    settings = make_settings(db_url, f"smtp://127.0.0.1:{port}", hook.url)
    for site in ("S001", "S002", "S003"):
        insert_level(db_url, site=site)
    sync_alerts(settings)

    down = deliver_outbox(settings)
    assert len(down.retrying) == 1  # first failure marks the channel down for this run
    assert len(down.sent) == 3  # the webhook does not wait for the mail server
    email_rows = _rows(db_url, alert_outbox, alert_outbox.c.channel == "email")
    assert {r["status"] for r in email_rows} == {"queued"}
    assert any("unreachable" in (r["last_error"] or "") for r in email_rows)

    with MailSink(tmp_path / "mail", port=port) as sink:
        up = deliver_outbox(settings)
        assert len(up.sent) == 3 and not up.retrying
        deliver_outbox(settings)
        ids = _message_ids(sink)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert len(hook.requests) == 3


def test_webhook_server_error_is_retried_with_the_same_key(db_url, make_settings):
    with WebhookRecorder(status=503) as failing:
        settings = make_settings(db_url, webhook_url=failing.url)
        insert_level(db_url)
        sync_alerts(settings)
        assert len(deliver_outbox(settings).retrying) == 1
        failing.status = 200
        assert len(deliver_outbox(settings).sent) == 1
        (row,) = _rows(db_url, alert_outbox)
        assert row["attempts"] == 2 and failing.keys() == [row["message_id"]]


_KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pipelines.alerts import deliver_outbox
    from pipelines.settings import load_settings

    config = json.loads(sys.argv[1])
    event, nth = config.pop("kill_at")
    seen = []

    def observer(name, alert_id, channel):
        if name == event and channel == "email":
            seen.append(alert_id)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    settings = load_settings({"KYPHOWATCH_DEMO": "1"}, **config)
    deliver_outbox(settings, observer=observer)
    sys.exit(3)  # never reached when the kill happens
    """
)


@pytest.mark.parametrize(
    "kill_at",
    [("claimed", 1), ("claimed", 3), ("sent", 2), ("accepted", 2)],
    ids=["after-first-claim", "after-third-claim", "after-two-sent", "after-server-accepted"],
)
def test_delivery_killed_part_way_then_retried_sends_nothing_twice_and_loses_nothing(
        db_url, sink, hook, make_settings, kill_at):
    settings = make_settings(db_url, sink.url, hook.url)
    for site in ("S001", "S002", "S003", "S004"):
        insert_level(db_url, site=site)
    alert_ids = sync_alerts(settings).created
    config = {
        "db_url": db_url, "smtp_url": sink.url, "webhook_url": hook.url,
        "recipients_safety": [SAFETY_TO], "recipients_data": [DATA_TO], "kill_at": list(kill_at),
    }  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -os_signal.SIGKILL, proc.stderr

    retry = deliver_outbox(settings, lease_seconds=0)
    assert not retry.retrying and not retry.failed
    deliver_outbox(settings, lease_seconds=0)

    ids = _message_ids(sink)
    assert len(ids) == len(set(ids)) == len(alert_ids), ids
    assert len(hook.keys()) == len(set(hook.keys())) == len(alert_ids)
    rows = _rows(db_url, alert_outbox)
    assert {r["status"] for r in rows} == {"sent"}
    unconfirmed = [r for r in rows if (r["last_error"] or "").startswith("unconfirmed:")]
    if kill_at[0] == "accepted":
        # the server had the message when the run died: recorded, flagged, not sent again
        assert len(unconfirmed) == 1 and retry.unconfirmed
    else:
        assert unconfirmed == []


def test_unconfirmed_delivery_can_be_requeued_by_an_operator(db_url, sink, make_settings):
    settings = make_settings(db_url, sink.url)
    insert_level(db_url)
    (alert_id,) = sync_alerts(settings).created
    engine = make_engine(db_url)
    with engine.begin() as conn:  # what a run that died right after hand-over leaves behind
        conn.execute(alert_outbox.update().values(
            status="sending", attempts=1, claimed_at=sa.func.now(), sent_at=sa.func.now()))
    engine.dispose()
    assert deliver_outbox(settings, lease_seconds=0).unconfirmed
    assert sink.messages() == []
    with pytest.raises(InputRejected):
        requeue(settings, alert_id, by="ops", reason="")
    assert requeue(settings, alert_id, by="ops", reason="receiver has no copy") == ["email"]
    assert len(deliver_outbox(settings).sent) == 1 and len(sink.messages()) == 1
    detail = alert_detail(settings, alert_id)
    assert "requeued email delivery" in detail["audit"][-1]["reason"]


def test_data_quality_rules_quarantine_share_and_silent_site(db_url, make_settings):
    settings = make_settings(db_url)
    insert_ledger(db_url, name="procedures_20240301.csv", status="loaded", rows_read=100,
                  quarantined=30)
    insert_ledger(db_url, name="procedures_20240302.csv", status="loaded", rows_read=100,
                  quarantined=2)
    engine = make_engine(db_url)
    start = date(2023, 1, 1)
    rows = []
    for site, days in (("S001", 540), ("S002", 300)):  # S002 stops after 300 days
        for day in range(0, days, 7):
            rows.append({
                "procedure_id": f"{site}-{day}", "site_id": site, "patient_hash": "0" * 64,
                "procedure_date": start + timedelta(days=day), "levels_treated": 1,
                "indication": "osteoporosis", "anaesthesia": "local", "balloons": 2,
                "age_years": 70, "sex": "F", "steroid_use": False, "mdt_discussed": True,
                "source_checksum": "1" * 64, "extract_ts": "20240101T000000",
            })  # fmt: skip
    with engine.begin() as conn:
        conn.execute(procedure.insert(), rows)
    engine.dispose()

    newest = start + timedelta(days=539)  # the silent rule counts from the clock: replay then
    sync_alerts(settings, newest)
    keys = {a["dedupe_key"]: a for a in list_alerts(settings)}
    assert [k.split(":")[0] for k in sorted(keys)] == ["quarantine", "silent"]
    assert keys["silent:S002"]["kind"] == "data_quality"
    payload = json.loads(keys["silent:S002"]["payload"])
    assert payload["days_silent"] > 60
    # the rerun is stable
    assert sync_alerts(settings, newest).created == []
    # by today's clock (years later) S002 is no longer an active site: the alert closes
    assert sync_alerts(settings).closed == 1


def test_concurrent_syncs_create_each_alert_once(db_url, make_settings):
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(db_url, webhook_url="http://127.0.0.1:9/never")
    for site in ("S001", "S002", "S003", "S004", "S005"):
        insert_level(db_url, site=site)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: sync_alerts(settings), range(4)))
    assert sum(len(r.created) for r in results) == 5
    assert len(_rows(db_url, alert)) == 5 and len(_rows(db_url, alert_outbox)) == 5


def test_no_patient_or_operator_reference_reaches_any_message(db_url, sink, hook, make_settings,
                                                            tmp_path):
    import csv

    from pipelines.ingest import ingest_paths
    from pipelines.simulate import simulate
    from pipelines.surveillance.engine import run_monitor

    settings = make_settings(db_url, sink.url, hook.url)
    out = tmp_path / "extracts"
    simulate(out, sites=3, start=date(2023, 1, 1), end=date(2023, 9, 30), seed=11,
             drifts=["S002:cement_leak:4.0:2023-03-01"], bad_row_rate=0.2)  # fmt: skip
    (out / "procedures_20231001.csv").write_text("garbage\n")  # a rejected file too
    ingest_paths(settings, sorted(out.glob("*.csv")))
    run_monitor(settings)
    assert sync_alerts(settings).created
    deliver_outbox(settings)

    secrets = set()
    for path in out.glob("*.csv"):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                secrets.update(v for k, v in row.items() if k in ("patient_ref", "operator_ref") and v)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        secrets.update(conn.execute(sa.select(procedure.c.patient_hash)).scalars())
        secrets.update(h for h in conn.execute(sa.select(procedure.c.operator_hash)).scalars() if h)
    engine.dispose()
    assert len(secrets) > 100

    texts = [path.read_text(errors="replace") for path in (tmp_path / "mail").glob("*.eml")]
    texts += [json.dumps(r["body"]) for r in hook.requests]
    assert texts and any("S002" in t for t in texts)
    for text in texts:
        leaked = [s for s in secrets if s in text]
        assert not leaked, leaked[:3]


def test_a_watch_list_is_not_folded_into_a_summary_already_sent(db_url, make_settings):
    """A rerun at the same as_of (a late file) finds the history summary already sent: the
    week's new watch list goes as its own digest, not into a summary that sends nothing
    (review: the list was e-mailed by nobody)."""
    settings = make_settings(db_url)
    insert_level(db_url, site="S003", level="in_control")
    insert_episode(db_url, site="S005", start=date(2021, 1, 1), end=date(2022, 1, 1))
    sync_alerts(settings)
    insert_episode(db_url, site="S006", start=date(2021, 6, 1), end=date(2022, 6, 1))
    insert_level(db_url, site="S001", level="watch")
    created = set(sync_alerts(settings).created)
    assert [r["dedupe_key"] for r in _rows(db_url, alert) if r["alert_id"] in created] == [
        "digest:watch:htg108:2024-W13"]
