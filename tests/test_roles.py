"""Least-privilege roles on the real PostgreSQL: connect as each role, prove what it can and cannot do.

Roles are cluster-wide, so every test uses role and database names with a random suffix and
drops them afterwards (engineers and CI runs share the server). The local server trusts
127.0.0.1, so connecting as a role does not check its password; passwords are still set and
checked to be present and distinct.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts.lifecycle import sync_alerts
from pipelines.alerts.outbox import deliver_outbox
from pipelines.errors import ConfigError
from pipelines.ingest import ingest_paths
from pipelines.roles import RoleSet, apply_roles, roles_from_env
from pipelines.surveillance.engine import run_monitor
from tests.ingest_helpers import COMP_HEADER, PROC_HEADER, comp_row, csv_text, proc_row, write
from tests.test_engine import build_sites

REPO = Path(__file__).resolve().parents[1]
DENIED = "permission denied|must be owner"


def _role_set() -> RoleSet:
    suffix = uuid.uuid4().hex[:10]
    return RoleSet(owner_role=f"kw_owner_{suffix}", loader_role=f"kw_loader_{suffix}",
                   analyst_role=f"kw_analyst_{suffix}", owner_password=secrets.token_hex(16),
                   loader_password=secrets.token_hex(16), analyst_password=secrets.token_hex(16))


def _psql_apply(admin_url: str, database: str, roles: RoleSet) -> None:
    """Apply sql/roles.sql with psql, exactly as deploy/postgres-init.sh does."""
    url = sa.make_url(admin_url)
    variables = ["database=" + database]
    for name in ("owner", "loader", "analyst"):
        variables += [f"{name}_role={getattr(roles, name + '_role')}",
                      f"{name}_password={getattr(roles, name + '_password')}"]
    command = ["psql", "-v", "ON_ERROR_STOP=1", "-h", url.host or "127.0.0.1",
               "-p", str(url.port or 5432), "-U", url.username or "postgres", "-d", database,
               "--single-transaction", "-f", str(REPO / "sql" / "roles.sql")]
    for variable in variables:
        command[1:1] = ["-v", variable]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _run_init_script(admin_url: str, database: str, airflow_db: str, roles: RoleSet) -> None:
    """Run deploy/postgres-init.sh itself against the local server, with test names."""
    url = sa.make_url(admin_url)
    env = {"PATH": os.environ["PATH"], "PGHOST": url.host or "127.0.0.1",
           "PGPORT": str(url.port or 5432), "POSTGRES_PASSWORD": secrets.token_hex(16),
           "AIRFLOW_DB_PASSWORD": secrets.token_hex(16), "AIRFLOW_DB_NAME": airflow_db,
           "KYPHOWATCH_DB_NAME": database,
           "KYPHOWATCH_OWNER_ROLE": roles.owner_role,
           "KYPHOWATCH_LOADER_ROLE": roles.loader_role,
           "KYPHOWATCH_ANALYST_ROLE": roles.analyst_role,
           "KYPHOWATCH_OWNER_PASSWORD": roles.owner_password,
           "KYPHOWATCH_LOADER_PASSWORD": roles.loader_password,
           "KYPHOWATCH_ANALYST_PASSWORD": roles.analyst_password}
    result = subprocess.run(["bash", str(REPO / "deploy" / "postgres-init.sh")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(params=["python", "psql", "init-script"])
def warehouse(request, pg_admin_url):
    """A fresh database with the three roles: by pipelines.roles, by psql, or by the init script."""
    if request.param != "python" and not shutil.which("psql"):
        pytest.skip("psql not installed: the deploy script's path cannot run here")
    roles = _role_set()
    suffix = uuid.uuid4().hex[:10]
    database, airflow_db = f"kw_roles_{suffix}", f"kw_roles_airflow_{suffix}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    if request.param != "init-script":
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE " + quote(database))
    try:
        if request.param == "python":
            apply_roles(pg_admin_url, database, roles)
        elif request.param == "psql":
            _psql_apply(pg_admin_url, database, roles)
        else:
            _run_init_script(pg_admin_url, database, airflow_db, roles)

        def url(role: str) -> str:
            return sa.make_url(pg_admin_url).set(
                database=database, username=getattr(roles, role + "_role"),
                password=getattr(roles, role + "_password"),
            ).render_as_string(hide_password=False)

        yield roles, url, admin
    finally:
        with admin.connect() as conn:
            for name in (database, airflow_db):
                conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
            for role in (roles.analyst_role, roles.loader_role, roles.owner_role, airflow_db):
                conn.exec_driver_sql("DROP ROLE IF EXISTS " + quote(role))
        admin.dispose()


def _denied(engine: sa.Engine, statement: str) -> None:
    with pytest.raises(sa.exc.ProgrammingError, match=DENIED), engine.begin() as conn:
        conn.exec_driver_sql(statement)


def _extracts(directory: Path) -> Path:
    write(directory / "procedures_20240201.csv", csv_text(PROC_HEADER, [
        proc_row("P1", patient="PT-1"), proc_row("P2", patient="PT-2", age_years="x")]))
    write(directory / "complications_20240202.csv", csv_text(COMP_HEADER, [comp_row("C1", "P1")]))
    return directory


def test_each_role_does_its_job_and_nothing_more(warehouse, settings_for, tmp_path):
    roles, url, admin = warehouse
    # Owner: migrates a fresh database (tables and views are the owner's).
    owner = schema_engine = sa.create_engine(url("owner"))
    assert schema.migrate(schema_engine) == schema.SCHEMA_VERSION
    with owner.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE owner_scratch (x integer)")
        conn.exec_driver_sql("DROP TABLE owner_scratch")
        table_owners = set(conn.scalars(sa.text(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")))
    assert table_owners == {roles.owner_role}

    # Loader: a real ingest (file ledger, staging TEMP table, quarantine, key fingerprint).
    report = ingest_paths(settings_for(url("loader"), max_bad_row_share=1.0),
                          [_extracts(tmp_path / "in")])
    assert [f.status for f in report.files] == ["loaded", "loaded"]
    assert sum(f.inserted for f in report.files) == 2 and report.files[0].quarantined == 1
    loader = sa.create_engine(url("loader"))
    with loader.begin() as conn:
        conn.execute(schema.procedure.update().where(schema.procedure.c.procedure_id == "P1")
                     .values(balloons=1))
        conn.execute(schema.quarantine.delete())
    with loader.connect() as conn:
        assert conn.scalar(sa.select(schema.procedure.c.balloons)) == 1
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.quarantine)) == 0
    for ddl in ("CREATE TABLE loader_scratch (x integer)", "DROP TABLE procedure",
                "ALTER TABLE procedure ADD COLUMN extra integer", "TRUNCATE alert",
                "CREATE VIEW v_loader AS SELECT 1 AS x", "CREATE INDEX ix_x ON alert (kind)"):
        _denied(loader, ddl)

    # Monitor as the loader: its run, signals and analyst tables are rows, not DDL.
    end = build_sites(loader, sites=3, per_site=120, seed=3)
    result = run_monitor(settings_for(url("loader")), as_of=end + timedelta(days=1))
    assert result.persisted
    with loader.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.monitor_run)) == 1
    # A rerun updates its signals through a staged TEMPORARY table: the loader may.
    assert result.signals
    rerun = run_monitor(settings_for(url("loader")), as_of=end + timedelta(days=1))
    assert rerun.persisted and not rerun.new_signal_keys
    # Alerts as the loader: the half-quarantined file raises a data-quality alert; delivery to
    # a closed port records a failed attempt (rows again).
    alert_settings = settings_for(url("loader"), smtp_url="smtp://127.0.0.1:9",
                                  recipients_data=("data@example.org",),
                                  recipients_safety=("safety@example.org",))
    sync_alerts(alert_settings, result.as_of)
    deliver_outbox(alert_settings)
    with loader.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.alert)) >= 1
        attempts = conn.scalar(sa.select(sa.func.sum(schema.alert_outbox.c.attempts)))
    assert attempts and attempts >= 1

    # Analyst: reads every view, no table, writes nothing.
    analyst = sa.create_engine(url("analyst"))
    with owner.connect() as conn:
        views = sorted(conn.scalars(sa.text(
            "SELECT viewname FROM pg_views WHERE schemaname = 'public'")))
    assert len(views) >= 9
    with analyst.connect() as conn:
        for view in views:
            conn.exec_driver_sql("SELECT * FROM " + analyst.dialect.identifier_preparer.quote(view))
        assert conn.exec_driver_sql("SELECT count(*) FROM v_chart_status").scalar() > 0
    for statement in ("SELECT * FROM procedure", "SELECT * FROM quarantine",
                      "SELECT * FROM pseudonym_key",
                      "INSERT INTO alert_audit (alert_id, to_state, actor, at) "
                      "VALUES ('a', 'open', 'x', now())",
                      "CREATE TABLE analyst_scratch (x int)"):
        _denied(analyst, statement)

    # Views re-created by a later migration keep the analyst's SELECT.
    with owner.begin() as conn:
        conn.execute(schema.schema_views.delete())
    schema.migrate(owner)
    with analyst.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM v_chart_status").scalar() > 0
    # ... and the loader cannot be the one to migrate.
    with owner.begin() as conn:
        conn.execute(schema.schema_views.delete())
    with pytest.raises(sa.exc.ProgrammingError, match=DENIED):
        schema.migrate(loader)

    # Three separate secrets were set.
    with admin.connect() as conn:
        hashes = conn.execute(sa.text(
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN (:o, :l, :a)"),
            {"o": roles.owner_role, "l": roles.loader_role, "a": roles.analyst_role}).all()
    assert len(hashes) == 3 and len({h for _, h in hashes}) == 3 and all(h for _, h in hashes)
    for engine in (owner, loader, analyst):
        engine.dispose()


def test_roles_need_three_distinct_secrets():
    env = {"KYPHOWATCH_OWNER_PASSWORD": "a1", "KYPHOWATCH_LOADER_PASSWORD": "b2",
           "KYPHOWATCH_ANALYST_PASSWORD": "c3"}
    assert "a1" not in repr(roles_from_env(env))
    with pytest.raises(ConfigError, match="KYPHOWATCH_ANALYST_PASSWORD"):
        roles_from_env({**env, "KYPHOWATCH_ANALYST_PASSWORD": ""})
    with pytest.raises(ConfigError, match="different"):
        roles_from_env({**env, "KYPHOWATCH_LOADER_PASSWORD": "a1"})


@pytest.mark.parametrize("override", [
    {"KYPHOWATCH_LOADER_PASSWORD": ""},
    {"KYPHOWATCH_LOADER_PASSWORD": "same-as-superuser"},
])
def test_init_script_refuses_missing_or_shared_secrets_before_touching_the_server(override):
    env = {"PATH": os.environ["PATH"], "POSTGRES_PASSWORD": "same-as-superuser",
           "AIRFLOW_DB_PASSWORD": "p1", "KYPHOWATCH_OWNER_PASSWORD": "p2",
           "KYPHOWATCH_LOADER_PASSWORD": "p3", "KYPHOWATCH_ANALYST_PASSWORD": "p4", **override}
    result = subprocess.run(["bash", str(REPO / "deploy" / "postgres-init.sh")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "postgres-init:" in result.stderr
