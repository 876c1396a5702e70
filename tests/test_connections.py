"""Each documented connection form works: stored by the real Airflow CLI, read back, mapped.

The postgres, http and smtp providers are pinned, so ``--conn-type postgres`` and ``http``
keep their type (without the provider Airflow stored "generic" and the task failed on
"unsupported conn_type"). The postgres form is also used to open the real PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.airflow_helpers import migrated_airflow_env

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    """Environment for Airflow subprocesses, with a freshly migrated SQLite metadata DB."""
    return migrated_airflow_env(tmp_path_factory.mktemp("airflow_home"))


def _airflow(env: dict, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _resolve(env: dict, conn_id: str) -> dict:
    """Read a connection back through Airflow's secrets chain and map it with kyphowatch_config."""
    code = textwrap.dedent(f"""
        import json
        from airflow.models import Connection
        import kyphowatch_config as config
        conn = Connection.get_connection_from_secrets({conn_id!r})
        mapper = {{"kyphowatch_warehouse": config.warehouse_url, "kyphowatch_smtp": config.smtp_url,
                   "kyphowatch_webhook": config.webhook_url}}[{conn_id!r}]
        print(json.dumps({{"conn_type": conn.conn_type, "url": mapper(conn)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.postgres
def test_postgres_typed_warehouse_connection_opens_the_real_database(airflow_env, pg_url):
    url = make_url(pg_url)
    _airflow(airflow_env, "connections", "add", "kyphowatch_warehouse", "--conn-type", "postgres",
             "--conn-host", url.host, "--conn-port", str(url.port or 5432),
             "--conn-login", url.username, "--conn-schema", url.database)  # fmt: skip
    found = _resolve(airflow_env, "kyphowatch_warehouse")
    assert found["conn_type"] == "postgres"
    engine = sa.create_engine(found["url"])
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT current_database()")) == url.database
    engine.dispose()


@pytest.mark.parametrize(
    ("conn_id", "cli_args", "conn_type", "expected"),
    [
        ("kyphowatch_warehouse",
         ["--conn-json", json.dumps({"conn_type": "generic",
                                     "extra": {"url": "postgresql+psycopg://kw@db/kyphowatch"}})],
         "generic", "postgresql+psycopg://kw@db/kyphowatch"),
        ("kyphowatch_warehouse",
         ["--conn-type", "postgres", "--conn-host", "db", "--conn-login", "kyphowatch_loader",
          "--conn-password", "p@ss:word", "--conn-schema", "kyphowatch", "--conn-port", "5432"],
         "postgres", "postgresql+psycopg://kyphowatch_loader:p%40ss%3Aword@db:5432/kyphowatch"),
        ("kyphowatch_smtp",
         ["--conn-type", "smtp", "--conn-host", "mailpit", "--conn-port", "1025"],
         "smtp", "smtp://mailpit:1025"),
        ("kyphowatch_smtp",
         ["--conn-type", "smtp", "--conn-host", "mail.example.org", "--conn-port", "465",
          "--conn-login", "kw", "--conn-password", "pw", "--conn-extra", '{"ssl": true}'],
         "smtp", "smtps://kw:pw@mail.example.org:465"),
        ("kyphowatch_webhook",
         ["--conn-type", "http", "--conn-host", "https://hooks.example.org/kyphowatch"],
         "http", "https://hooks.example.org/kyphowatch"),
        ("kyphowatch_webhook",
         ["--conn-type", "http", "--conn-extra", '{"url": "https://hooks.example.org/a?b=1"}'],
         "http", "https://hooks.example.org/a?b=1"),
    ],
    ids=["warehouse-extra-url", "warehouse-postgres", "smtp", "smtps", "webhook-host",
         "webhook-extra-url"],
)
def test_documented_connection_forms(airflow_env, conn_id, cli_args, conn_type, expected):
    # start from nothing: an earlier case may have stored the same id (exit 1 if absent)
    subprocess.run([sys.executable, "-m", "airflow", "connections", "delete", conn_id],
                   env=airflow_env, capture_output=True, timeout=120)  # fmt: skip
    _airflow(airflow_env, "connections", "add", conn_id, *cli_args)
    assert _resolve(airflow_env, conn_id) == {"conn_type": conn_type, "url": expected}


def test_connection_from_the_environment(airflow_env):
    env = {**airflow_env, "AIRFLOW_CONN_KYPHOWATCH_WEBHOOK": json.dumps(
        {"conn_type": "http", "host": "https://hooks.example.org/env"})}  # fmt: skip
    assert _resolve(env, "kyphowatch_webhook") == {
        "conn_type": "http", "url": "https://hooks.example.org/env"}
