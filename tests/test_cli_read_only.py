"""Read commands change nothing when their arguments are wrong or their --db is no warehouse.

User audit (2026-12-07): after a new ingest, ``kyphowatch site S777`` (a typo) computed and
stored a monitor run before saying "unknown site"; ``kyphowatch sites --db`` pointed at an
empty PostgreSQL database created the whole schema in it. Both through the real command
line, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write
from tests.test_cli import run

ENV = {"KYPHOWATCH_DEMO": "1"}


@pytest.fixture
def empty_pg(pg_url: str) -> str:
    """URL of a new, empty PostgreSQL database (conftest's ``pg_url``, dropped afterwards)."""
    return pg_url


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse_url(request, tmp_path) -> str:
    """An empty database (no file yet for SQLite) that ``kyphowatch ingest`` turns into a
    warehouse; on PostgreSQL a new database from conftest's ``pg_url``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'w.db'}"
    return request.getfixturevalue("empty_pg")


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _monitor_runs(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM monitor_run")).scalar_one()
    finally:
        engine.dispose()


def test_a_wrong_site_or_metric_is_refused_before_anything_is_computed(tmp_path, warehouse_url):
    """Data loaded, no run stored for it yet: an unknown site (or metric, or a site whose
    procedures all come after ``--as-of``) is exit 2 with the "unknown site" message, and no
    monitor run is computed or stored; a known site then computes and stores the one run."""
    rows = [proc_row(f"P{i}", date=f"2024-01-{i + 1:02d}") for i in range(1, 6)]
    rows.append(proc_row("Q1", site="S002", date="2024-01-20"))
    extract = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, rows))
    assert run("ingest", "--db", warehouse_url, str(extract), env=ENV).returncode == 0
    assert _monitor_runs(warehouse_url) == 0
    for command, says in (
        (["site", "S777"], "unknown site 'S777'"),
        (["site", "s777", "--csv"], "unknown site 's777'"),
        (["site", "S002", "--as-of", "2024-01-10"], "unknown site 'S002'"),
        (["site", "S001", "--metric", "cement_leek"], "unknown metric 'cement_leek'"),
    ):
        refused = run(*command, "--db", warehouse_url, env=ENV)
        assert refused.returncode == 2, (command, refused.stderr)
        assert says in refused.stderr and "Traceback" not in refused.stderr
        assert _monitor_runs(warehouse_url) == 0, command  # nothing computed, nothing stored
    shown = run("site", "s001", "--db", warehouse_url, env=ENV)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("site S001:")
    assert _monitor_runs(warehouse_url) == 1  # the implicit compute the README documents
    # with the run stored, the stored run's own check answers, as before
    stored = run("site", "S777", "--db", warehouse_url, env=ENV)
    assert stored.returncode == 2 and "not in the monitor run as of 2024-01-20" in stored.stderr


@pytest.mark.postgres
def test_read_commands_on_an_empty_postgres_database_create_nothing(empty_pg, tmp_path):
    """``sites``, ``site``, ``report``, ``beyond-report``, ``regulator list``, ``keys check``
    and the alerts actions on existing alerts, on a database without the kyphowatch schema:
    exit 3 naming the URL without its password and how to create a warehouse; not one
    table created."""
    url = sa.make_url(empty_pg).set(password="hunter2").render_as_string(hide_password=False)
    for command in (
        ["sites"],
        ["site", "S001"],
        ["report"],
        ["regulator", "list"],
        ["keys", "check"],
        ["beyond-report", "--out", str(tmp_path / "b")],
        ["alerts", "list"],
        ["alerts", "show", "abc"],
        ["alerts", "ack", "abc", "--by", "me", "--reason", "typo"],
    ):
        result = run(*command, "--db", url, env=ENV)
        assert result.returncode == 3, (command, result.stderr)
        assert "holds no kyphowatch warehouse" in result.stderr, command
        assert "kyphowatch ingest" in result.stderr and "Traceback" not in result.stderr
        assert sa.make_url(url).database in result.stderr and "hunter2" not in result.stderr
        assert _tables(empty_pg) == set(), command


def test_read_commands_leave_a_sqlite_file_that_is_no_warehouse_as_it_was(tmp_path):
    """An existing SQLite file without the kyphowatch schema (empty, or another
    application's): exit 3, and not a byte of it changes (no tables, no WAL journal)."""
    other = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{other}", poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.exec_driver_sql("INSERT INTO notes VALUES (1, 'mine')")
    engine.dispose()
    empty = tmp_path / "empty.db"
    empty.touch()
    before = {path: path.read_bytes() for path in (other, empty)}
    for path in (other, empty):
        for command in (["sites"], ["site", "S001"], ["report", "--out", str(tmp_path / "r")]):
            result = run(*command, "--db", f"sqlite:///{path}", env=ENV)
            assert result.returncode == 3, (command, result.stderr)
            assert "holds no kyphowatch warehouse" in result.stderr and str(path) in result.stderr
    assert {path: path.read_bytes() for path in (other, empty)} == before
    # no journal beside them (the report may have made its empty --out folder)
    assert {p.name for p in tmp_path.iterdir()} - {"r"} == {"empty.db", "other.db"}


def test_a_read_command_brings_an_older_warehouse_up_to_date(tmp_path):
    """A kyphowatch warehouse whose schema is older than the code is migrated by a read
    command, as by the writers (README): the read then works."""
    from pipelines import schema

    url = f"sqlite:///{tmp_path / 'w.db'}"
    extract = write(
        tmp_path / "procedures_20240201.csv",
        csv_text(PROC_HEADER, [proc_row(f"P{i}") for i in range(1, 4)]),
    )
    assert run("ingest", "--db", url, str(extract), env=ENV).returncode == 0
    assert run("monitor", "--db", url, env=ENV).returncode == 0  # `sites` computes nothing
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:  # as if version 11 had not run yet
        conn.execute(
            schema.schema_version.delete().where(
                schema.schema_version.c.version == schema.SCHEMA_VERSION
            )
        )
    result = run("sites", "--db", url, "--json", env=ENV)
    assert result.returncode == 0, result.stderr
    assert _monitor_runs(url) == 1
    with engine.connect() as conn:
        versions = set(conn.scalars(sa.select(schema.schema_version.c.version)))
    engine.dispose()
    assert schema.SCHEMA_VERSION in versions
