"""Shared fixtures: a fresh SQLite warehouse and, when the server answers, a real PostgreSQL one.

PostgreSQL tests use ``KYPHOWATCH_TEST_PG_URL`` (CI sets it to the local server). Each
test gets its own freshly created database, so tests never see each other's rows.
Without a reachable server those tests skip with the reason printed.
"""

from __future__ import annotations

import os
import uuid

import hypothesis  # noqa: F401 -- imported first, see below
import pytest
import sqlalchemy as sa

from pipelines.settings import load_settings

# hypothesis is imported up front: its pytest plugin otherwise imports (and compiles) it at
# session end, after libraries have raised the recursion limit, which trips a CPython 3.11
# compiler check ("AST constructor recursion depth mismatch") and fails the whole run.

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _pg_admin_url() -> str:
    return os.environ.get("KYPHOWATCH_TEST_PG_URL", DEFAULT_PG_ADMIN_URL)


def _pg_available() -> tuple[bool, str]:
    try:
        engine = sa.create_engine(_pg_admin_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True, ""
    except Exception as exc:  # any connection failure means "skip", with the reason
        return False, f"PostgreSQL not reachable at {_pg_admin_url()}: {type(exc).__name__}"


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    ok, reason = _pg_available()
    if not ok:
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    return _pg_admin_url()


@pytest.fixture
def pg_url(pg_admin_url: str):
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"kw_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # Identifiers cannot be bound parameters: quote with the dialect's own rules.
        conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
    url = sa.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "DROP DATABASE IF EXISTS "
            + conn.dialect.identifier_preparer.quote(name) + " WITH (FORCE)"
        )
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a new, empty SQLite warehouse file."""
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """Run a test once on SQLite and once on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def settings_for(tmp_path):
    """Build demo-mode settings for a given warehouse URL."""

    def _make(db_url: str, env: dict[str, str] | None = None, **overrides):
        base = {"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports")}
        return load_settings({**base, **(env or {})}, db_url=db_url, **overrides)

    return _make


@pytest.fixture
def rebuilt(monkeypatch) -> list[tuple]:
    """Force the loader's bulk path for small files; record the indexes each rebuild restores.

    For the bulk-load tests (test_load_bulk_indexes, test_load_bulk_complications): the
    indexes set aside for a bulk first load are rebuilt once per load; a failed load
    records none.
    """
    from pipelines.ingest import load

    monkeypatch.setattr(load, "BULK_LOAD_BYTES", 0)
    calls: list[tuple] = []
    real = load._rebuild_indexes

    def recording(conn, indexes):
        calls.append(indexes)
        real(conn, indexes)

    monkeypatch.setattr(load, "_rebuild_indexes", recording)
    return calls
