"""Schema migrations: identical tables on SQLite and PostgreSQL, safe to run concurrently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from pipelines import schema
from pipelines.db import make_engine

REPO = Path(__file__).resolve().parents[1]


def _shape(url: str) -> dict:
    engine = make_engine(url)
    inspector = sa.inspect(engine)
    shape = {
        table: sorted(c["name"] for c in inspector.get_columns(table))
        for table in inspector.get_table_names()
    }
    shape["__views__"] = sorted(inspector.get_view_names())
    with engine.connect() as conn:
        shape["__version__"] = sorted(conn.scalars(sa.select(schema.schema_version.c.version)))
    engine.dispose()
    return shape


def test_same_schema_on_sqlite_and_postgres(sqlite_url, pg_url):
    assert _shape(sqlite_url) == _shape(pg_url)
    assert _shape(sqlite_url)["__version__"] == sorted(schema.MIGRATIONS)


def test_migrate_is_idempotent(db_url):
    first = _shape(db_url)
    assert _shape(db_url) == first


def test_concurrent_first_start(db_url):
    code = f"from pipelines.db import make_engine; make_engine({db_url!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert _shape(db_url)["__version__"] == sorted(schema.MIGRATIONS)
