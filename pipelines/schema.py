"""Warehouse schema, defined once in SQLAlchemy Core and identical on SQLite and PostgreSQL.

Schema changes are versioned: :data:`SCHEMA_VERSION` is stored in ``schema_version``
and :func:`migrate` applies the steps in :data:`MIGRATIONS` that a database has not
seen yet. Analyst views live in ``sql/views.sql`` and are re-created on every
migration (they hold no data).

Design notes
------------
* ``procedure`` / ``complication`` hold the *current* version of each business key.
  ``procedure_version`` / ``complication_version`` keep every version ever delivered
  (the correction history). The current version is the one from the newest delivery,
  ordered by ``(extract_ts, source_checksum)`` so the result does not depend on the
  order in which files were loaded.
* ``pending_complication`` holds the current version of complications whose procedure
  is not yet known; they move to ``complication`` when the procedure arrives.
* Patient and operator references are stored only as keyed HMAC digests
  (``patient_hash``, ``operator_hash``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

SCHEMA_VERSION = 11

metadata = sa.MetaData()

# Width of a hex SHA-256 digest.
DIGEST = 64


def _procedure_columns() -> list[sa.Column]:
    return [
        sa.Column("site_id", sa.String(8), nullable=False),
        sa.Column("patient_hash", sa.String(DIGEST), nullable=False),
        sa.Column("operator_hash", sa.String(DIGEST)),
        sa.Column("procedure_date", sa.Date, nullable=False),
        sa.Column("levels_treated", sa.SmallInteger, nullable=False),
        sa.Column("indication", sa.String(16), nullable=False),
        sa.Column("anaesthesia", sa.String(8), nullable=False),
        sa.Column("balloons", sa.SmallInteger, nullable=False),
        sa.Column("age_years", sa.SmallInteger, nullable=False),
        sa.Column("sex", sa.String(1), nullable=False),
        sa.Column("steroid_use", sa.Boolean, nullable=False),
        sa.Column("mdt_discussed", sa.Boolean, nullable=False),
        sa.Column("source_checksum", sa.String(DIGEST), nullable=False),
        sa.Column("extract_ts", sa.String(32), nullable=False),
        *_device_columns(),
    ]


def _device_columns() -> list[sa.Column]:
    """Version 8: the optional device columns of a procedure (reference names, lot, UDI-DI)."""
    return [
        sa.Column("balloon_product", sa.String(64)),
        sa.Column("cement_product", sa.String(64)),
        sa.Column("cement_lot", sa.String(32)),
        sa.Column("udi_di", sa.String(40)),
    ]


def _complication_columns() -> list[sa.Column]:
    return [
        sa.Column("procedure_id", sa.String(64), nullable=False),
        sa.Column("site_id", sa.String(8), nullable=False),
        sa.Column("event_date", sa.Date, nullable=False),
        sa.Column("event_type", sa.String(24), nullable=False),
        sa.Column("symptomatic", sa.Boolean, nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("vertebral_level", sa.String(8)),
        sa.Column("source_checksum", sa.String(DIGEST), nullable=False),
        sa.Column("extract_ts", sa.String(32), nullable=False),
    ]


procedure = sa.Table(
    "procedure",
    metadata,
    sa.Column("procedure_id", sa.String(64), primary_key=True),
    *_procedure_columns(),
    sa.Index("ix_procedure_site_date", "site_id", "procedure_date"),
    # No index on patient_hash: nothing looks a patient up (outcomes read whole sites), and
    # a b-tree on random digests made every bulk load ~25% slower (benchmarks/bench_ingest).
)

procedure_version = sa.Table(
    "procedure_version",
    metadata,
    sa.Column("procedure_id", sa.String(64)),
    *_procedure_columns(),
    # one version per (key, delivery); source_checksum is part of the key
    sa.PrimaryKeyConstraint("procedure_id", "source_checksum", name="pk_procedure_version"),
)

complication = sa.Table(
    "complication",
    metadata,
    sa.Column("complication_id", sa.String(64), primary_key=True),
    *_complication_columns(),
    sa.Index("ix_complication_procedure", "procedure_id"),
    sa.Index("ix_complication_site_date", "site_id", "event_date"),
)

complication_version = sa.Table(
    "complication_version",
    metadata,
    sa.Column("complication_id", sa.String(64)),
    *_complication_columns(),
    sa.PrimaryKeyConstraint("complication_id", "source_checksum", name="pk_complication_version"),
)

pending_complication = sa.Table(
    "pending_complication",
    metadata,
    sa.Column("complication_id", sa.String(64), primary_key=True),
    *_complication_columns(),
    sa.Column("source_record", sa.Integer, nullable=False),
    sa.Index("ix_pending_procedure", "procedure_id"),
)

file_ledger = sa.Table(
    "file_ledger",
    metadata,
    sa.Column("source_checksum", sa.String(DIGEST), primary_key=True),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16)),
    sa.Column("extract_ts", sa.String(32)),
    sa.Column("status", sa.String(16), nullable=False),  # loaded | rejected
    sa.Column("reason", sa.Text),
    sa.Column("rows_read", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_inserted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_updated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_quarantined", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rows_pending", sa.Integer, nullable=False, server_default="0"),
    sa.Column("quarantine_reasons", sa.Text),  # JSON object reason -> count
    sa.Column("dropped_columns", sa.Text),  # JSON list of unknown columns dropped
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("source_checksum", sa.String(DIGEST), primary_key=True),
    # data record number within the file (1 = first row after the header)
    sa.Column("record_number", sa.Integer, primary_key=True),
    sa.Column("file_name", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("site_id", sa.String(64)),
    sa.Column("record_id", sa.String(255)),
    # JSON object of the raw values; patient_ref/operator_ref are replaced by their HMAC.
    sa.Column("raw_values", sa.Text, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of reason codes
    sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
)

# --- surveillance (issue 3) -------------------------------------------------------

monitor_run = sa.Table(
    "monitor_run",
    metadata,
    sa.Column("run_key", sa.String(DIGEST), primary_key=True),  # hash(as_of, profile, data)
    sa.Column("as_of", sa.Date, nullable=False),
    sa.Column("profile_name", sa.String(64), nullable=False),
    sa.Column("profile_version", sa.String(32), nullable=False),
    sa.Column("data_fingerprint", sa.String(DIGEST), nullable=False),
    sa.Column("models", sa.Text),  # JSON: risk models and their fit statistics
    sa.Column("summary", sa.Text),  # JSON: counts per metric and method
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
)

signal = sa.Table(
    "signal",
    metadata,
    # deterministic: hash(profile, site, metric, method, direction, episode_start)
    sa.Column("signal_key", sa.String(DIGEST), primary_key=True),
    sa.Column("site_id", sa.String(8), nullable=False),
    sa.Column("metric", sa.String(48), nullable=False),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("direction", sa.String(8), nullable=False),  # up | down
    sa.Column("category", sa.String(16), nullable=False),  # safety | under_reporting | process
    sa.Column("episode_start", sa.Date, nullable=False),
    sa.Column("signal_date", sa.Date, nullable=False),
    sa.Column("observed", sa.Float),
    sa.Column("expected", sa.Float),
    sa.Column("n", sa.Integer),
    sa.Column("ci_low", sa.Float),
    sa.Column("ci_high", sa.Float),
    sa.Column("statistic", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("p_value", sa.Float),
    sa.Column("baseline", sa.Float, nullable=False),
    sa.Column("citation", sa.String(128), nullable=False),
    sa.Column("profile_name", sa.String(64), nullable=False),
    sa.Column("profile_version", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text),  # JSON: method-specific detail
    sa.Column("active", sa.Boolean, nullable=False),  # still present in the latest recompute
    sa.Column("first_seen_run", sa.String(DIGEST), nullable=False),
    sa.Column("last_seen_run", sa.String(DIGEST), nullable=False),
    sa.Index("ix_signal_site_metric", "site_id", "metric"),
)

# --- alerts (issue 4) ------------------------------------------------------------

alert = sa.Table(
    "alert",
    metadata,
    sa.Column("alert_id", sa.String(DIGEST), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # safety | data_quality
    sa.Column("dedupe_key", sa.String(255), nullable=False),
    sa.Column("episode", sa.Integer, nullable=False, server_default="1"),
    sa.Column("signal_key", sa.String(DIGEST)),
    sa.Column("site_id", sa.String(8)),
    sa.Column("metric", sa.String(48)),
    sa.Column("title", sa.String(255), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # JSON; never a patient/operator reference
    sa.Column("state", sa.String(16), nullable=False),  # open | acknowledged | resolved
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("dedupe_key", "episode", name="uq_alert_dedupe_episode"),
)

alert_audit = sa.Table(
    "alert_audit",
    metadata,
    sa.Column("audit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.String(DIGEST), nullable=False),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

alert_outbox = sa.Table(
    "alert_outbox",
    metadata,
    sa.Column("alert_id", sa.String(DIGEST), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),  # email | webhook
    sa.Column("status", sa.String(16), nullable=False),  # queued | sending | sent | failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("message_id", sa.String(255), nullable=False),  # idempotency key for receivers
    sa.Column("last_error", sa.Text),
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
)

# --- analyst tables (issue 5): the monitor's current picture, for SQL tools ------------
# Written by the monitor in the same transaction as its signals. Each holds only the newest
# as_of per profile: a backfill for an earlier date leaves them alone.

site_month_metric = sa.Table(
    "site_month_metric",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("site_id", sa.String(8), primary_key=True),
    sa.Column("metric", sa.String(48), primary_key=True),
    sa.Column("month", sa.String(7), primary_key=True),  # YYYY-MM of the unit's index date
    sa.Column("denominator", sa.String(16), nullable=False),  # procedure | patient
    sa.Column("units", sa.Integer, nullable=False),  # mature units (the monitor's n)
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("expected", sa.Float, nullable=False),  # sum of case-mix expected risks
    sa.Column("baseline", sa.Float, nullable=False),
    # 0 for the month of as_of, 11 for the oldest month of the last twelve
    sa.Column("months_before_as_of", sa.Integer, nullable=False),
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
)

chart_status = sa.Table(
    "chart_status",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("site_id", sa.String(8), primary_key=True),
    sa.Column("metric", sa.String(48), primary_key=True),
    # signal | under_reporting | immature | in_control (pipelines.evidence)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("n", sa.Integer),
    sa.Column("events", sa.Integer),
    sa.Column("rate", sa.Float),
    sa.Column("ci_low", sa.Float),
    sa.Column("ci_high", sa.Float),
    sa.Column("expected", sa.Float),
    sa.Column("baseline", sa.Float, nullable=False),
    sa.Column("cusum_chart", sa.String(48)),
    sa.Column("cusum_value", sa.Float),
    sa.Column("cusum_threshold", sa.Float),
    sa.Column("funnel_position", sa.String(16)),
    sa.Column("signals_recent", sa.Integer, nullable=False),
    sa.Column("signals_total", sa.Integer, nullable=False),
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
    sa.Column("profile_version", sa.String(32), nullable=False),
    # Version 5: the level (status) since when, and its evidence as JSON (levels.grade)
    sa.Column("level_since", sa.Date),
    sa.Column("level_detail", sa.Text),
)

# The stored monitor run (pipelines.surveillance.runs): the one hand-off from computing to
# reading. Part "core" and one part per site, zlib-compressed JSON.
monitor_run_part = sa.Table(
    "monitor_run_part",
    metadata,
    sa.Column("run_key", sa.String(DIGEST), primary_key=True),
    sa.Column("part", sa.String(64), primary_key=True),
    sa.Column("payload", sa.LargeBinary, nullable=False),
)

# Every alarm, watch and under-reporting episode of the newest run (levels.level_episodes):
# the alert sync summarises past episodes in one digest instead of e-mailing each.
level_episode = sa.Table(
    "level_episode",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("site_id", sa.String(8), primary_key=True),
    sa.Column("metric", sa.String(48), primary_key=True),
    sa.Column("direction", sa.String(8), primary_key=True),
    sa.Column("level", sa.String(16), primary_key=True),
    sa.Column("start_date", sa.Date, primary_key=True),  # first detectable day
    sa.Column("last_date", sa.Date, nullable=False),  # last day flagged
    sa.Column("end_date", sa.Date),  # last + hold_days; NULL while current
    sa.Column("signals", sa.Integer, nullable=False),
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
    sa.Column("profile_version", sa.String(32), nullable=False),
)

# --- beyond the site (issue 12, version 8): operators, devices, the regulator ---------
# Operators appear only by their display pseudonym (pipelines.surveillance.operators), never
# by reference or digest. Each chart table holds the newest run per profile.

operator_chart = sa.Table(
    "operator_chart",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("site_id", sa.String(8), primary_key=True),
    sa.Column("operator", sa.String(16), primary_key=True),  # display pseudonym OP-xxxxxxxxxx
    sa.Column("metric", sa.String(48), primary_key=True),
    sa.Column("method", sa.String(16), nullable=False),  # fir_cusum | rare
    sa.Column("procedures", sa.Integer, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("expected", sa.Float, nullable=False),
    sa.Column("statistic", sa.Float),  # CUSUM now, or the smallest p-value
    sa.Column("threshold", sa.Float),  # h, or alpha
    sa.Column("head_start", sa.Float),
    sa.Column("signal_date", sa.Date),  # latest signal (NULL: none)
    sa.Column("signal_procedure", sa.Integer),  # the operator's procedure count at that signal
    sa.Column("signals", sa.Integer, nullable=False),
    sa.Column("first_procedure_date", sa.Date, nullable=False),
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
)

device_product_chart = sa.Table(
    "device_product_chart",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("product", sa.String(64), primary_key=True),
    sa.Column("metric", sa.String(48), primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),  # balloon | cement
    sa.Column("procedures", sa.Integer, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("expected", sa.Float, nullable=False),  # from the other products' risk model
    sa.Column("observed_expected", sa.Float),
    sa.Column("statistic", sa.Float),  # sequential test: CUSUM of the O/E log-likelihood ratio
    sa.Column("threshold", sa.Float),
    sa.Column("signal_date", sa.Date),
    sa.Column("device_failures", sa.Integer, nullable=False),  # balloon rupture etc.
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
)

device_lot_test = sa.Table(
    "device_lot_test",
    metadata,
    sa.Column("profile_name", sa.String(64), primary_key=True),
    sa.Column("product", sa.String(64), primary_key=True),
    sa.Column("lot", sa.String(32), primary_key=True),
    sa.Column("metric", sa.String(48), primary_key=True),
    sa.Column("procedures", sa.Integer, nullable=False),
    sa.Column("sites", sa.Integer, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("expected", sa.Float, nullable=False),
    sa.Column("p_value", sa.Float, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("signal_date", sa.Date),
    sa.Column("run_key", sa.String(DIGEST), nullable=False),
    sa.Column("as_of", sa.Date, nullable=False),
)

# One Yellow Card draft per device-related complication, ever (pipelines.alerts.regulator).
yellow_card = sa.Table(
    "yellow_card",
    metadata,
    sa.Column("complication_id", sa.String(64), primary_key=True),
    sa.Column("site_id", sa.String(8), nullable=False),
    sa.Column("event_date", sa.Date, nullable=False),
    sa.Column("event_type", sa.String(24), nullable=False),
    sa.Column("severity", sa.String(8), nullable=False),
    sa.Column("draft", sa.Text, nullable=False),  # JSON; pseudonymised
    sa.Column("state", sa.String(16), nullable=False),  # drafted | exported | sent
    sa.Column("drafted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("exported_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("sent_by", sa.String(128)),
    sa.Column("mhra_reference", sa.String(64)),
    sa.Index("ix_yellow_card_site_state", "site_id", "state"),
)

BEYOND_SITE_TABLES = (operator_chart, device_product_chart, device_lot_test, yellow_card)

# Version 9: CUSUM thresholds and ARL curves, computed once per design and profile version
# and read by every later monitor (pipelines.surveillance.threshold_store).
threshold_design = sa.Table(
    "threshold_design",
    metadata,
    sa.Column("design_key", sa.String(DIGEST), primary_key=True),  # hash(kind, design, profile)
    sa.Column("kind", sa.String(48), nullable=False),
    sa.Column("design", sa.Text, nullable=False),  # JSON: the design's parameters
    sa.Column("profile_name", sa.String(64), nullable=False),
    sa.Column("profile_version", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # JSON: h, or the curve's arrays
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_threshold_design_profile", "profile_name", "profile_version"),
)

# Version 10 (11: in parts): the monitor's snapshot columns for every loaded row, kept by
# pipelines.surveillance.snapshot_cache and brought up to date from the rows written since
# its watermark, so a nightly monitor does not read a million rows again. Per set of read
# columns: part 0 holds all rows, parts 1.. each one night's changed rows (so a night writes
# only those); Arrow IPC (compressed) blobs. Deleting rows is safe: the next run reads all.
snapshot_cache = sa.Table(
    "snapshot_cache",
    metadata,
    sa.Column("cache_key", sa.String(DIGEST), primary_key=True),  # hash(format, columns read)
    sa.Column("part", sa.Integer, primary_key=True),  # 0: every row; 1..: later changes
    sa.Column("watermark", sa.Text, nullable=False),  # JSON: ledger, key and row counts
    sa.Column("procedures", sa.LargeBinary, nullable=False),
    sa.Column("complications", sa.LargeBinary, nullable=False),
    sa.Column("built_at", sa.DateTime(timezone=True), nullable=False),
)

# Digest of the views.sql last applied, so views are re-created only when the file changes.
schema_views = sa.Table(
    "schema_views",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("digest", sa.String(DIGEST), nullable=False),
)

# The pseudonym key in force (pipelines.ingest.keys): the HMAC of a fixed label under the key,
# never the key. One row has retired_at NULL; a rotation retires it and adds the new one.
pseudonym_key = sa.Table(
    "pseudonym_key",
    metadata,
    sa.Column("fingerprint", sa.String(DIGEST), primary_key=True),
    sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("retired_at", sa.DateTime(timezone=True)),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


def _migration_1(conn: sa.Connection) -> None:
    """Version 1: the initial schema."""
    metadata.create_all(conn, checkfirst=True)


def _migration_2(conn: sa.Connection) -> None:
    """Version 2: remember which views.sql is applied (avoids re-creating views on every start)."""
    schema_views.create(conn, checkfirst=True)


def _migration_3(conn: sa.Connection) -> None:
    """Version 3: drop the unused index on procedure.patient_hash (bulk-load cost)."""
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_procedure_patient")


def _migration_4(conn: sa.Connection) -> None:
    """Version 4: the monitor's current picture for analysts (site_month_metric, chart_status)."""
    site_month_metric.create(conn, checkfirst=True)
    chart_status.create(conn, checkfirst=True)


def _migration_5(conn: sa.Connection) -> None:
    """Version 5: graded levels (chart_status.level_since / level_detail, level_episode)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("chart_status")}
    for column in ("level_since", "level_detail"):
        if column not in present:
            kind = "DATE" if column == "level_since" else "TEXT"
            # fixed identifiers from this module, no user input
            conn.exec_driver_sql(f"ALTER TABLE chart_status ADD COLUMN {column} {kind}")
    level_episode.create(conn, checkfirst=True)


def _migration_6(conn: sa.Connection) -> None:
    """Version 6: the stored monitor run (monitor_run_part), read by report, CLI and alerts."""
    monitor_run_part.create(conn, checkfirst=True)


def _migration_7(conn: sa.Connection) -> None:
    """Version 7: the pseudonym key fingerprint (pseudonym_key), recorded on the next load."""
    pseudonym_key.create(conn, checkfirst=True)


def _migration_8(conn: sa.Connection) -> None:
    """Version 8: device columns on procedures; operator, device and Yellow Card tables.

    Independent of version 7: it only adds columns and tables, so it applies after 6 or 7.
    """
    inspector = sa.inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    for table in (procedure, procedure_version):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in _device_columns():
            if column.name not in present:
                # fixed identifiers and types from this module, no user input
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(" ".join(
                    ["ALTER TABLE", quote(table.name), "ADD COLUMN", quote(column.name), kind]))
    for table in BEYOND_SITE_TABLES:
        table.create(conn, checkfirst=True)


def _migration_9(conn: sa.Connection) -> None:
    """Version 9: stored threshold designs (threshold_design); only adds a table."""
    threshold_design.create(conn, checkfirst=True)


def _migration_10(conn: sa.Connection) -> None:
    """Version 10: the monitor's snapshot cache (snapshot_cache); only adds a table."""
    _create_snapshot_cache(conn)


def _migration_11(conn: sa.Connection) -> None:
    """Version 11: snapshot_cache in parts (a night's changes apart from all rows).

    A cache created by the first version 10 (no ``part``) is dropped and created again:
    it holds nothing the next monitor run cannot read again.
    """
    if "part" not in {c["name"] for c in sa.inspect(conn).get_columns("snapshot_cache")}:
        conn.exec_driver_sql("DROP TABLE snapshot_cache")
    _create_snapshot_cache(conn)


def _create_snapshot_cache(conn: sa.Connection) -> None:
    if sa.inspect(conn).has_table("snapshot_cache"):
        return
    snapshot_cache.create(conn)
    if conn.dialect.name == "postgresql":
        # The blobs are compressed already: out-of-line storage without another pglz pass.
        for column in ("procedures", "complications"):
            conn.exec_driver_sql("ALTER TABLE snapshot_cache ALTER COLUMN "  # fixed names
                                 + column + " SET STORAGE EXTERNAL")
        # A cache needs no WAL (30 MB per full write): a crash empties an unlogged table,
        # and the next monitor run then reads everything.
        conn.exec_driver_sql("ALTER TABLE snapshot_cache SET UNLOGGED")


MIGRATIONS = {1: _migration_1, 2: _migration_2, 3: _migration_3, 4: _migration_4,
              5: _migration_5, 6: _migration_6, 7: _migration_7,
              8: _migration_8, 9: _migration_9, 10: _migration_10,
              11: _migration_11}


def _views_sql(sql_dir: Path) -> list[str]:
    path = sql_dir / "views.sql"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _is_current(engine: sa.Engine, digest: str | None) -> bool:
    """True when every migration and the current views are already applied (no lock needed)."""
    try:
        with engine.connect() as conn:
            versions = set(conn.scalars(sa.select(schema_version.c.version)))
            views = conn.execute(
                sa.select(schema_views.c.digest).where(schema_views.c.name == "views")
            ).scalar_one_or_none()
    except sa.exc.DBAPIError:
        return False  # tables missing: a first start
    return versions >= set(MIGRATIONS) and (digest is None or views == digest)


@contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[None]:
    """Serialise migrations across processes (a file lock beside a SQLite database).

    PostgreSQL is serialised inside the migration transaction with an advisory lock.
    """
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    import fcntl

    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _grant_view_reads(conn: sa.Connection) -> None:
    """Grant SELECT on every view to the database's analyst role (PostgreSQL, sql/roles.sql).

    Views are dropped and re-created when views.sql changes, which drops their grants; the
    role is named by the database setting ``kyphowatch.analyst_role`` (unset: nothing to do).
    """
    if conn.dialect.name != "postgresql":
        return
    analyst = conn.execute(sa.text("SELECT current_setting('kyphowatch.analyst_role', true)")
                           ).scalar_one_or_none()
    if not analyst:
        return
    quote = conn.dialect.identifier_preparer.quote
    views = conn.scalars(sa.text(
        "SELECT viewname FROM pg_views WHERE schemaname = current_schema() ORDER BY viewname"))
    for view in list(views):
        # Identifiers cannot be bound parameters: quoted with the dialect's own rules.
        conn.exec_driver_sql("GRANT SELECT ON " + quote(view) + " TO " + quote(analyst))


# Arbitrary constant naming kyphowatch's migration lock among PostgreSQL advisory locks.
_ADVISORY_LOCK_KEY = 7_406_108


def migrate(engine: sa.Engine, sql_dir: Path | None = None) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`; return the version now in force.

    Safe to call on every start and from several processes at once: the steps run in
    one transaction under a lock, each recorded in ``schema_version``; views are
    re-created only when ``sql/views.sql`` changed.
    """
    import hashlib
    from datetime import UTC, datetime

    from pipelines.errors import ConfigError
    from pipelines.settings import bundled_path

    sql_dir = sql_dir or bundled_path("sql")
    views_path = sql_dir / "views.sql"
    if not views_path.exists():  # an incomplete install must not run without analyst views
        raise ConfigError(f"{views_path} is missing: the kyphowatch install is incomplete "
                          "(reinstall the package; the wheel ships sql/ as package data)")
    digest = hashlib.sha256(views_path.read_bytes()).hexdigest()
    if _is_current(engine, digest):
        return max(MIGRATIONS)
    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
        schema_version.create(conn, checkfirst=True)
        applied = set(conn.scalars(sa.select(schema_version.c.version)))
        for version in sorted(set(MIGRATIONS) - applied):
            MIGRATIONS[version](conn)
            conn.execute(
                schema_version.insert().values(version=version, applied_at=datetime.now(UTC))
            )
        current = conn.execute(
            sa.select(schema_views.c.digest).where(schema_views.c.name == "views")
        ).scalar_one_or_none()
        if digest is not None and current != digest:
            for statement in _views_sql(sql_dir):
                conn.exec_driver_sql(statement)
            _grant_view_reads(conn)
            conn.execute(schema_views.delete().where(schema_views.c.name == "views"))
            conn.execute(schema_views.insert().values(name="views", digest=digest))
    return max(MIGRATIONS)
