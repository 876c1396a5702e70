"""The alert defects a user audit reproduced (task alertsfix), on SQLite and PostgreSQL.

1. a site at alarm only because of a sentinel event older than ``backfill_max_age_days``
   has an open alert that says so (the first sync put it in the history digest only);
2. the sentinel e-mail names the event, its date, the guidance and a next step, no "n/a";
3. an alert raised while no recipient was configured is delivered once one is.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa
from test_alerts_support import (
    DATA_TO,
    SAFETY_TO,
    insert_episode,
    insert_level,
    insert_signal,
)

from pipelines import cli
from pipelines.alerts import deliver_outbox, requeue, sync_alerts
from pipelines.alerts.lifecycle import TRAINING_REVIEW, Condition, _create, warehouse
from pipelines.alerts.render import render
from pipelines.db import make_engine
from pipelines.errors import InputRejected
from pipelines.mailsink import MailSink
from pipelines.schema import alert, alert_audit, alert_outbox, signal

AS_OF = date(2024, 3, 31)


@pytest.fixture
def sink(tmp_path):
    with MailSink(tmp_path / "mail") as running:
        yield running


@pytest.fixture
def make_settings(settings_for):
    def _make(db_url, smtp_url=None, **overrides):
        return settings_for(db_url, smtp_url=smtp_url, recipients_safety=(SAFETY_TO,),
                            recipients_data=(DATA_TO,),
                            report_base_url="https://reports.example.org/kyphowatch/report",
                            **overrides)  # fmt: skip

    return _make


def _rows(db_url, table, *where):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(table).where(*where)).mappings()]
    engine.dispose()
    return rows


def _sentinel(db_url, site, day, types=None):
    """Insert an active sentinel signal of the profile's sentinel metric, with its types."""
    key = insert_signal(db_url, site=site, metric="sentinel_event", method="sentinel",
                        episode_start=day, signal_date=day)  # fmt: skip
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(signal.update().where(signal.c.signal_key == key).values(
            detail=json.dumps({"event_types": types or {"death": 1},
                               "rule": "any single event is a signal"}),
            citation="NICE HTG108 section 2.4.4", profile_name="htg108"))  # fmt: skip
    engine.dispose()
    return key


# -- 1. a site at alarm always has an open alert that says so -------------------------------


def test_old_sentinel_event_at_a_site_still_at_alarm_has_an_open_alert(db_url, make_settings):
    settings = make_settings(db_url)
    # S008: a death 200 days before as_of, so older than backfill_max_age_days (90), but
    # within hold_days (365): the site is at alarm (audit: only in the history digest).
    _sentinel(db_url, "S008", date(2023, 9, 13), {"paralysis": 1})
    insert_level(db_url, site="S008", metric="sentinel_event", since=date(2023, 9, 13))
    # ... and an earlier one whose own alarm ended (> hold_days ago): history only
    _sentinel(db_url, "S008", date(2022, 6, 1), {"cord_compression": 1})
    # S009: an old event whose alarm ended: history only
    _sentinel(db_url, "S009", date(2022, 1, 10))
    insert_episode(
        db_url, site="S009", metric="sentinel_event", start=date(2022, 1, 10), end=date(2023, 1, 10)
    )
    # S010: a recent death (30 days): its own sentinel e-mail, no second alert for the site
    _sentinel(db_url, "S010", date(2024, 3, 1))
    insert_level(db_url, site="S010", metric="sentinel_event", since=date(2024, 3, 1))

    first = sync_alerts(settings)
    alerts = {r["dedupe_key"]: r for r in _rows(db_url, alert)}
    assert sorted(alerts) == [
        "digest:history:htg108:2024-03-31",
        "level:htg108:S008:sentinel_event:up",
        f"sentinel:htg108:{next(k for k in alerts if k.startswith('sentinel:')).split(':')[2]}",
    ]
    assert len(first.created) == 3  # small: one per current alarm plus one digest
    s008 = alerts["level:htg108:S008:sentinel_event:up"]
    assert s008["state"] == "open" and s008["kind"] == "safety"
    payload = json.loads(s008["payload"])
    assert payload["alarm_until"] == "2024-09-12"  # 2023-09-13 + 365 days
    assert payload["events"] == [{"date": "2023-09-13", "event_types": {"paralysis": 1}}]
    assert s008["title"] == "Alarm at S008: paralysis on 2023-09-13; at alarm until 2024-09-12"
    history = json.loads(alerts["digest:history:htg108:2024-03-31"]["payload"])
    # S008's current event is not in the digest (its alarm is current); the 2022 one is
    assert sorted((i["site_id"], i["since"], i["until"]) for i in history["items"]) == [
        ("S008", "2022-06-01", "2023-06-01"),
        ("S009", "2022-01-10", "2023-01-10"),
    ]

    # the next sync keeps it open (the digest closes; the audit saw S008 lose its alert)
    sync_alerts(settings)
    states = {r["dedupe_key"]: r["state"] for r in _rows(db_url, alert)}
    assert states["level:htg108:S008:sentinel_event:up"] == "open"
    assert states["digest:history:htg108:2024-03-31"] == "resolved"
    # ... and no later history digest lists the event again
    assert not [
        k
        for k in states
        if k.startswith("digest:history") and k != "digest:history:htg108:2024-03-31"
    ]

    # once the site leaves alarm, the alert closes by itself
    insert_level(db_url, site="S008", metric="sentinel_event", level="in_control")
    assert sync_alerts(settings).closed == 1
    states = {r["dedupe_key"]: r["state"] for r in _rows(db_url, alert)}
    assert states["level:htg108:S008:sentinel_event:up"] == "resolved"


def test_no_site_alarm_alert_while_the_event_has_its_own_open_alert(db_url, make_settings):
    """A sentinel alert raised while recent stays open after the event ages past 90 days:
    the site needs no second alert then (no flood, no duplicate)."""
    settings = make_settings(db_url)
    _sentinel(db_url, "S010", date(2024, 3, 1))
    insert_level(db_url, site="S010", metric="sentinel_event", since=date(2024, 3, 1))
    (raised,) = sync_alerts(settings).created
    insert_level(
        db_url,
        site="S010",
        metric="sentinel_event",
        since=date(2024, 3, 1),
        as_of=date(2024, 7, 31),
    )  # the event is 152 days old now
    assert sync_alerts(settings).created == []
    assert [r["alert_id"] for r in _rows(db_url, alert) if r["state"] == "open"] == [raised]


# -- 2. the sentinel e-mail says what happened ---------------------------------------------


def test_sentinel_email_names_event_date_guidance_and_next_step(db_url, sink, make_settings):
    settings = make_settings(db_url, sink.url)
    _sentinel(db_url, "S005", date(2024, 3, 20), {"death": 1})
    insert_level(db_url, site="S005", metric="sentinel_event", since=date(2024, 3, 20))
    (alert_id,) = sync_alerts(settings).created
    row = _rows(db_url, alert, alert.c.alert_id == alert_id)[0]
    message = render(row)
    assert message.subject.startswith("[kyphowatch] SENTINEL S005: death on 2024-03-20")
    for part in (message.text, message.html):
        assert "death on 2024-03-20" in part
        assert "HTG108" in part
        assert "about 33 major complications per 40,000-60,000 procedures" in part
        assert "Next step" in part and "morbidity and mortality review" in part
        assert "at alarm until 2025-03-20" in part
        assert "n/a" not in part
        assert "sentinel_event …" not in part and "expected" not in part
    assert "viewport" in message.html  # readable on a phone, like the alarm e-mail
    assert not [value for _, value in message.lines if "n/a" in value]
    assert row["title"] == "Sentinel event at S005: death on 2024-03-20"
    deliver_outbox(settings)
    (mail,) = sink.messages()
    assert "death" in mail["Subject"]


def test_a_sentinel_alert_stored_before_the_fix_renders_without_na():
    """Alerts already in the warehouse (payload type ``signal``) get the same body."""
    payload = {
        "type": "signal",
        "method": "sentinel",
        "site_id": "S005",
        "metric": "sentinel_event",
        "signal_date": "2026-04-15",
        "episode_start": "2026-04-15",
        "observed": 1.0,
        "expected": None,
        "citation": "NICE HTG108 section 2.4.4",
        "profile_name": "htg108",
        "profile_version": "1.4.0",
        "where": "https://r.example/latest/sites/S005.html",
    }
    message = render(
        {
            "alert_id": "ab" * 32,
            "kind": "safety",
            "episode": 1,
            "title": "Sentinel event at S005: sentinel_event",
            "payload": payload,
        }
    )
    assert "n/a" not in message.text and "n/a" not in message.html
    assert "on 2026-04-15" in message.text and "HTG108" in message.text
    assert "Next step" in message.text


# -- 3. an alert without a recipient is delivered once there is one -------------------------


def _training_review(db_url, settings):
    engine = warehouse(settings)
    condition = Condition(
        kind=TRAINING_REVIEW, dedupe_key="training:htg108:S003:OP-0123456789:cement_leak",
        title="Training review at S003: OP-0123456789 cement leakage", site_id="S003",
        metric="cement_leak",
        payload={"type": "operator", "site_id": "S003", "profile_name": "htg108",
                 "profile_version": "1.4.0", "where": "operators/S003.html",
                 "lines": [["Operator", "OP-0123456789"]]},
    )  # fmt: skip
    alert_id = _create(engine, settings, condition, 1, datetime.now(UTC))
    engine.dispose()
    return alert_id


def test_training_review_without_a_lead_is_reported_then_requeued(db_url, sink, make_settings):
    before = make_settings(db_url, sink.url)  # no KYPHOWATCH_CLINICAL_LEADS
    alert_id = _training_review(db_url, before)
    assert _rows(db_url, alert_outbox) == []
    result = sync_alerts(before)
    assert [(a, k, s) for a, k, s, _ in result.no_recipient] == [
        (alert_id, TRAINING_REVIEW, "S003")
    ]
    assert "KYPHOWATCH_CLINICAL_LEADS=S003=" in result.no_recipient[0][3]
    with pytest.raises(InputRejected, match="no recipient is configured"):
        requeue(before, alert_id[:12], by="dr.lee", reason="lead set", channel="email")

    after = make_settings(db_url, sink.url, clinical_leads={"S003": ("lead@s003.example",)})
    assert requeue(after, alert_id[:12], by="dr.lee", reason="lead set",
                   channel="email") == ["email"]  # fmt: skip
    deliver_outbox(after)
    (mail,) = sink.messages()
    assert "lead@s003.example" in mail["To"]
    assert sync_alerts(after).no_recipient == []
    reasons = [r["reason"] for r in _rows(db_url, alert_audit, alert_audit.c.alert_id == alert_id)]
    assert "queued email delivery (none before): lead set" in reasons


def test_next_sync_queues_an_alert_once_its_recipient_is_configured(db_url, sink, make_settings):
    alert_id = _training_review(db_url, make_settings(db_url, sink.url))
    after = make_settings(db_url, sink.url, clinical_leads={"S003": ("lead@s003.example",)})
    result = sync_alerts(after)
    assert result.queued_late == [alert_id] and result.no_recipient == []
    assert [(r["channel"], r["status"]) for r in _rows(db_url, alert_outbox)] == [
        ("email", "queued")
    ]
    assert sync_alerts(after).queued_late == []  # once
    deliver_outbox(after)
    assert len(sink.messages()) == 1


def test_cli_sync_says_on_stderr_that_an_alert_has_no_recipient(
    db_url, sink, make_settings, monkeypatch, capsys, tmp_path
):
    alert_id = _training_review(db_url, make_settings(db_url, sink.url))
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    monkeypatch.setenv("KYPHOWATCH_REPORT_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("KYPHOWATCH_SMTP_URL", sink.url)
    monkeypatch.delenv("KYPHOWATCH_CLINICAL_LEADS", raising=False)
    assert cli.main(["alerts", "sync", "--db", db_url]) == 0
    captured = capsys.readouterr()
    assert f"alert {alert_id[:12]} (training_review, S003) has no recipient" in captured.err
    assert "KYPHOWATCH_CLINICAL_LEADS" in captured.err
    assert json.loads(captured.out)["no_recipient"][0][0] == alert_id


def test_an_open_alert_about_an_earlier_event_does_not_hide_the_current_alarm(
    db_url, make_settings
):
    """The site's open sentinel alert is about an event whose alarm ended long ago: the
    alarm of today's (older than 90 days) event still gets its alert."""
    settings = make_settings(db_url)
    _sentinel(db_url, "S011", date(2022, 1, 10))
    insert_level(db_url, site="S011", metric="sentinel_event", since=date(2022, 1, 10),
                 as_of=date(2022, 2, 1))  # fmt: skip
    (first,) = sync_alerts(settings).created  # that event's own e-mail; left open
    _sentinel(db_url, "S011", date(2023, 9, 13), {"cord_compression": 1})
    insert_level(db_url, site="S011", metric="sentinel_event", since=date(2023, 9, 13))
    sync_alerts(settings)
    open_keys = sorted(r["dedupe_key"] for r in _rows(db_url, alert) if r["state"] == "open")
    assert "level:htg108:S011:sentinel_event:up" in open_keys
    title = next(r["title"] for r in _rows(db_url, alert)
                 if r["dedupe_key"] == "level:htg108:S011:sentinel_event:up")  # fmt: skip
    assert title == "Alarm at S011: cord compression on 2023-09-13; at alarm until 2024-09-12"
