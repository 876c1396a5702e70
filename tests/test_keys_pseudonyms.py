"""Key rotation keeps one training review per operator (user audit: a second e-mail).

The operator pseudonym is ``OP-`` and ten hex digits of the operator's keyed digest, and a
training review's dedupe key names it. A rotation re-keys the stored digests; unless it also
re-keys the pseudonyms stored in ``operator_chart`` and in the alerts, the next monitor and
sync open a second alert (and e-mail) for the same finding under the new pseudonym.
Runs on SQLite and the real PostgreSQL (database ``kw_fixkeys_*``, dropped after the test).
"""

from __future__ import annotations

import json
import secrets

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts import deliver_outbox, sync_alerts
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.ingest.keys import rotate
from pipelines.ingest.pseudonymise import pseudonymise
from pipelines.mailsink import MailSink
from pipelines.report.beyond import write_beyond_pages
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.operators import (
    operator_pseudonym,
    pseudonym_renames,
    rename_pseudonyms,
)
from tests.beyond_helpers import NEW_OPERATOR, write_registry

OLD_KEY = secrets.token_hex(32)
NEW_KEY = secrets.token_hex(32)
LEAD = "lead.s001@example.org"


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse_url(request, tmp_path):
    """A new, empty warehouse: a SQLite file, or a new PostgreSQL database (conftest's
    ``pg_url``, dropped afterwards)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("pg_url")


def _settings(settings_for, url, key, smtp_url):
    return settings_for(
        url,
        pseudonym_key=key,
        smtp_url=smtp_url,
        recipients_safety=("safety@example.org",),
        recipients_data=("data@example.org",),
        clinical_leads={"S001": (LEAD,)},
    )


def _rows(url, table):
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(table)).mappings()]
    engine.dispose()
    return rows


def _training(url):
    return [a for a in _rows(url, schema.alert) if a["kind"] == "training_review"]


def test_rotation_keeps_one_training_review_and_sends_nothing_new(
    warehouse_url, settings_for, tmp_path
):
    registry = write_registry(tmp_path / "in")
    with MailSink(tmp_path / "mail") as sink:
        settings = _settings(settings_for, warehouse_url, OLD_KEY, sink.url)
        ingest_paths(settings, registry["paths"])
        run_monitor(settings)
        sync_alerts(settings)
        deliver_outbox(settings)
        old_name = operator_pseudonym(pseudonymise(OLD_KEY.encode(), "S001", NEW_OPERATOR))
        new_name = operator_pseudonym(pseudonymise(NEW_KEY.encode(), "S001", NEW_OPERATOR))
        before = _training(warehouse_url)
        assert before and {json.loads(a["payload"])["operator"] for a in before} == {old_name}
        outbox_before = _rows(warehouse_url, schema.alert_outbox)
        sent_before = sink.messages()
        assert [m for m in sent_before if m["To"] == LEAD and old_name in m["Subject"]]

        rotated = rotate(
            make_engine(warehouse_url), OLD_KEY.encode(), NEW_KEY.encode(), registry["paths"]
        )
        settings = _settings(settings_for, warehouse_url, NEW_KEY, sink.url)
        run_monitor(settings)
        result = sync_alerts(settings)
        deliver_outbox(settings)
        sent_after = sink.messages()

    assert result.created == []
    assert rotated["rows_changed"]["alert"] == len(before)
    after = _training(warehouse_url)
    # one alert per finding, the same alert (id, state, creation), now under the new pseudonym
    assert [(a["alert_id"], a["state"], a["created_at"]) for a in after] == [
        (a["alert_id"], a["state"], a["created_at"]) for a in before
    ]
    assert all(a["state"] == "open" for a in after)
    for alert in after:
        assert old_name not in alert["dedupe_key"] + alert["title"] + alert["payload"]
        assert new_name in alert["dedupe_key"] and new_name in alert["title"]
        assert json.loads(alert["payload"])["operator"] == new_name
    assert _rows(warehouse_url, schema.alert_outbox) == outbox_before  # no new outbox row
    assert len(sent_after) == len(sent_before)  # and no second e-mail to the lead
    # the audit trail records the re-keying of each alert, state unchanged
    ids = {a["alert_id"] for a in after}
    notes = [
        r
        for r in _rows(warehouse_url, schema.alert_audit)
        if r["alert_id"] in ids and "key rotation" in (r["reason"] or "")
    ]
    assert len(notes) == len(after)
    assert all(
        f"{old_name} -> {new_name}" in r["reason"] and r["from_state"] == r["to_state"]
        for r in notes
    )
    # the chart rows and the confidential pages name the alert's pseudonym, not the old one
    charts = {
        r["operator"]
        for r in _rows(warehouse_url, schema.operator_chart)
        if r["signal_date"] is not None
    }
    assert charts == {new_name}
    pages = tmp_path / "beyond"
    write_beyond_pages(settings, pages)
    text = "".join(
        p.read_text(encoding="utf-8")
        for p in pages.rglob("*")
        if p.is_file() and p.suffix in (".html", ".csv", ".json")
    )
    assert new_name in text and old_name not in text


def test_renames_touch_only_whole_known_pseudonyms_and_refuse_ambiguity():
    old_a, old_b = "a1" * 32, "b2" * 32
    renames = pseudonym_renames(
        {old_a: "c3" * 32, old_b: "d4" * 32, "e5" * 32: "f6" * 32}, [old_a, old_b]
    )
    assert renames == {"OP-a1a1a1a1a1": "OP-c3c3c3c3c3", "OP-b2b2b2b2b2": "OP-d4d4d4d4d4"}
    text = (
        "training:S001:OP-a1a1a1a1a1:cement_leak OP-b2b2b2b2b2, OP-a1a1a1a1a1a1 "
        "XOP-a1a1a1a1a1 OP-S001-01 OP-9999999999"
    )
    assert rename_pseudonyms(text, renames) == (
        "training:S001:OP-c3c3c3c3c3:cement_leak OP-d4d4d4d4d4, OP-a1a1a1a1a1a1 "
        "XOP-a1a1a1a1a1 OP-S001-01 OP-9999999999"
    )
    # two operators with one old pseudonym, or one new pseudonym: no rename can be right
    with pytest.raises(ValueError, match="share"):
        pseudonym_renames(
            {old_a: "c3" * 32, "a1" * 5 + "0" * 54: "d4" * 32}, [old_a, "a1" * 5 + "0" * 54]
        )
    with pytest.raises(ValueError, match="share"):
        pseudonym_renames({old_a: "c3" * 32, old_b: "c3" * 5 + "0" * 54}, [old_a, old_b])
