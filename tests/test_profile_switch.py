"""Switching or versioning the profile (issue 13 item 6), on SQLite and PostgreSQL.

A version bump keeps the episode (no second e-mail) and retires what the old version found
but the new one does not; a renamed profile retires every signal and open alert of the old
one. Every retirement leaves an audit entry: the alert's audit trail, and for signals the
monitor run's summary.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_alerts_support import DATA_TO, SAFETY_TO, insert_signal

from pipelines.alerts import deliver_outbox, resolve, sync_alerts
from pipelines.alerts.lifecycle import alert_id_for
from pipelines.db import make_engine
from pipelines.mailsink import MailSink
from pipelines.schema import alert, alert_audit, monitor_run, signal
from pipelines.surveillance.engine import run_monitor
from tests.test_engine import build_sites

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "profiles" / "htg108.yaml"
ALARM_KEY = "level:htg108:S008:cement_leak:up"


def profile_copy(tmp_path: Path, *, name: str = "htg108", version: str = "1.4.0") -> Path:
    """Write the bundled profile under another name and/or version; thresholds unchanged."""
    text = BUNDLED.read_text(encoding="utf-8")
    assert 'name: htg108\nversion: "1.4.0"\n' in text, "bundled profile header changed"
    path = tmp_path / f"{name}-{version}.yaml"
    path.write_text(text.replace('name: htg108\nversion: "1.4.0"\n',
                                 f'name: {name}\nversion: "{version}"\n'), encoding="utf-8")
    return path


@pytest.fixture
def sink(tmp_path):
    with MailSink(tmp_path / "mail") as running:
        yield running


@pytest.fixture
def make_settings(settings_for, sink):
    def _make(db_url, profile_path=BUNDLED):
        return settings_for(db_url, smtp_url=sink.url, recipients_safety=(SAFETY_TO,),
                            recipients_data=(DATA_TO,), profile_path=profile_path)

    return _make


def _rows(db_url, table, *where):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(table).where(*where)).mappings()]
    engine.dispose()
    return rows


def _process_signal(db_url: str, version: str, episode_start: date = date(2024, 1, 1)) -> str:
    """Insert an active process failure raised by htg108 ``version`` (no monitor derives it)."""
    key = insert_signal(db_url, site="S001", metric="mdt_discussion", method="process",
                        category="process", episode_start=episode_start)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(signal.update().where(signal.c.signal_key == key)
                     .values(profile_version=version))
    engine.dispose()
    return key


def _reasons(db_url, alert_id):
    return [(r["from_state"], r["to_state"], r["actor"], r["reason"])
            for r in _rows(db_url, alert_audit, alert_audit.c.alert_id == alert_id)]


def test_version_bump_keeps_the_episode_and_retires_what_only_the_old_version_found(
        db_url, tmp_path, sink, make_settings):
    build_sites(make_engine(db_url), sites=8, per_site=500, leak={"S008": 0.3}, seed=3)
    old = make_settings(db_url)
    first = run_monitor(old)
    stale = _process_signal(db_url, "1.4.0")  # found by 1.4.0, not derived by 1.5.0
    created = sync_alerts(old).created
    assert alert_id_for(ALARM_KEY, 1) in created
    process_key = "signal:htg108:S001:mdt_discussion:up"  # the key carries the profile
    process_alert = alert_id_for(process_key, 1)
    assert process_alert in created
    deliver_outbox(old)
    mails_before = len(sink.messages())
    assert mails_before >= 2  # the alarm and the process failure (at least)

    new = make_settings(db_url, profile_copy(tmp_path, version="1.5.0"))
    bumped = run_monitor(new)
    reason = "profile htg108 1.4.0 replaced by 1.5.0"
    assert bumped.summary["retired_profiles"] == [
        {"profile_name": "htg108", "profile_version": "1.4.0", "signals": 1, "reason": reason}]
    (run,) = _rows(db_url, monitor_run, monitor_run.c.run_key == bumped.run_key)
    assert json.loads(run["summary"])["retired_profiles"][0]["reason"] == reason
    stored = {r["signal_key"]: r for r in _rows(db_url, signal)}
    assert stored[stale]["active"] is False or stored[stale]["active"] == 0
    # what both versions derive keeps its key and now belongs to 1.5.0
    assert {s["signal_key"] for s in bumped.signals} == {s["signal_key"] for s in first.signals}
    assert {stored[s["signal_key"]]["profile_version"] for s in bumped.signals} == {"1.5.0"}

    result = sync_alerts(new)
    assert result.created == []  # the alarm continues: the same episode, not a new e-mail
    assert result.retired == 1
    alarm = _rows(db_url, alert, alert.c.alert_id == alert_id_for(ALARM_KEY, 1))[0]
    assert alarm["state"] == "open"
    assert json.loads(alarm["payload"])["profile_version"] == "1.5.0"
    assert ("open", "open", "kyphowatch",
            "now confirmed under profile htg108 1.5.0 (was 1.4.0): the same episode"
            ) in _reasons(db_url, alarm["alert_id"])
    (closed,) = _rows(db_url, alert, alert.c.alert_id == process_alert)
    assert closed["state"] == "resolved"
    assert _reasons(db_url, process_alert)[-1] == ("open", "resolved", "kyphowatch", reason)
    assert sync_alerts(new).created == [] and sync_alerts(new).retired == 0  # recorded once
    deliver_outbox(new)
    assert len(sink.messages()) == mails_before


def test_renamed_profile_retires_every_signal_and_open_alert_of_the_old_one(
        db_url, tmp_path, make_settings):
    build_sites(make_engine(db_url), sites=8, per_site=500, leak={"S008": 0.3}, seed=3)
    old = make_settings(db_url)
    run_monitor(old)
    assert alert_id_for(ALARM_KEY, 1) in sync_alerts(old).created
    active_before = sum(1 for r in _rows(db_url, signal) if r["active"])
    assert active_before > 0

    new = make_settings(db_url, profile_copy(tmp_path, name="htg108x"))
    renamed = run_monitor(new)
    reason = "profile htg108 1.4.0 replaced by htg108x 1.4.0"
    assert renamed.summary["retired_profiles"] == [
        {"profile_name": "htg108", "profile_version": "1.4.0", "signals": active_before,
         "reason": reason}]
    assert not [r for r in _rows(db_url, signal) if r["active"] and r["profile_name"] == "htg108"]

    result = sync_alerts(new)
    # the new profile's alarm is raised by the normal rules, under its own key
    assert alert_id_for("level:htg108x:S008:cement_leak:up", 1) in result.created
    (old_alarm,) = _rows(db_url, alert, alert.c.dedupe_key == ALARM_KEY)
    assert old_alarm["state"] == "resolved"
    assert _reasons(db_url, old_alarm["alert_id"])[-1] == ("open", "resolved", "kyphowatch",
                                                           reason)
    still_open = [r for r in _rows(db_url, alert, alert.c.state != "resolved")
                  if json.loads(r["payload"]).get("profile_name") == "htg108"]
    assert still_open == []


def test_edited_profile_retires_nothing_until_the_monitor_runs_under_it(
        db_url, tmp_path, make_settings):
    _process_signal(db_url, "1.4.0")
    (process_alert,) = sync_alerts(make_settings(db_url)).created
    bumped = make_settings(db_url, profile_copy(tmp_path, version="1.5.0"))
    assert sync_alerts(bumped).retired == 0  # no monitor run of 1.5.0 yet
    assert _rows(db_url, alert, alert.c.alert_id == process_alert)[0]["state"] == "open"


def test_alert_stored_under_the_key_without_profile_is_still_that_conditions_alert(
        db_url, make_settings):
    """Process alerts raised before the key carried the profile are read, not re-sent."""
    settings = make_settings(db_url)
    _process_signal(db_url, "1.4.0")
    (first,) = sync_alerts(settings).created
    engine = make_engine(db_url)
    with engine.begin() as conn:  # as the previous release stored it
        conn.execute(alert.update().where(alert.c.alert_id == first)
                     .values(dedupe_key="signal:S001:mdt_discussion:up"))
    engine.dispose()
    result = sync_alerts(settings)
    assert result.created == [] and result.cleared == 0 and result.persisting == 1
    assert _rows(db_url, alert, alert.c.alert_id == first)[0]["state"] == "open"

    resolve(settings, first[:10], by="dr.lee", reason="audited the MDT list")
    _process_signal(db_url, "1.4.0", episode_start=date(2024, 2, 1))  # a new failure episode
    assert sync_alerts(settings).created == [
        alert_id_for("signal:htg108:S001:mdt_discussion:up", 2)]
