"""The kyphowatch command: every sub-command registers, errors are one line with a meaningful exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"simulate", "ingest", "monitor", "site", "report", "alerts"}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=300)


def test_every_command_registers(capsys):
    parser = build_parser()
    choices = set(parser._subparsers._group_actions[0].choices)
    assert EXPECTED <= choices
    assert "unavailable" not in capsys.readouterr().err


def test_command_map_matches_what_the_modules_register():
    """``pipelines.cli.COMMANDS`` (which module to import for a command) says the truth."""
    from pipelines.cli import COMMANDS

    everything = set(build_parser()._subparsers._group_actions[0].choices)
    assert set(COMMANDS) == everything
    for command, module in COMMANDS.items():
        # only that command's module is imported, and it registers the command
        alone = set(build_parser(command)._subparsers._group_actions[0].choices)
        assert command in alone, (command, module)


def test_ingest_exit_codes_and_json(tmp_path):
    good = write(tmp_path / "ok" / "procedures_20240201.csv",
                 csv_text(PROC_HEADER, [proc_row("P1", patient="PT-SECRET-1")]))
    bad = write(tmp_path / "bad" / "procedures_20240202.csv", "a;b;c\n1;2;3\n")
    db = f"sqlite:///{tmp_path / 'w.db'}"
    ok = run("ingest", "--db", db, "--json", str(good), env={"KYPHOWATCH_DEMO": "1"})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["files"][0]["inserted"] == 1
    rejected = run("ingest", "--db", db, str(bad), env={"KYPHOWATCH_DEMO": "1"})
    assert rejected.returncode == 2
    assert "wrong delimiter" in rejected.stdout
    assert "Traceback" not in rejected.stderr
    for out in (ok, rejected):
        assert "PT-SECRET" not in out.stdout + out.stderr


def test_a_site_new_to_the_warehouse_is_named(tmp_path):
    """A first extract from a site is named (a mistyped site id would otherwise become a
    phantom site unnoticed; user audit); a first load into an empty warehouse names none."""
    env = {"KYPHOWATCH_DEMO": "1"}
    db = f"sqlite:///{tmp_path / 'w.db'}"
    first = write(tmp_path / "procedures_20240201.csv",
                  csv_text(PROC_HEADER, [proc_row("P1"), proc_row("P2", site="S002")]))
    loaded = run("ingest", "--db", db, "--json", str(first), env=env)
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["new_sites"] == []
    typo = write(tmp_path / "procedures_ZZ9_20240202.csv",
                 csv_text(PROC_HEADER, [proc_row("P3", site="ZZ9"), proc_row("P4")]))
    shown = run("ingest", "--db", db, str(typo), env=env)
    assert shown.returncode == 0, shown.stderr
    assert "NEW SITE(S), first procedures in this warehouse: ZZ9" in shown.stdout
    assert "ZZ9" in shown.stderr  # the log line a scheduler keeps
    again = write(tmp_path / "procedures_ZZ9_20240203.csv",
                  csv_text(PROC_HEADER, [proc_row("P5", site="ZZ9")]))
    later = run("ingest", "--db", db, "--json", str(again), env=env)
    assert json.loads(later.stdout)["new_sites"] == []


def test_refuses_to_load_without_a_pseudonym_key(tmp_path):
    good = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KYPHOWATCH_")}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--db",
                             f"sqlite:///{tmp_path / 'w.db'}", str(good)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3
    assert "KYPHOWATCH_PSEUDONYM_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_warehouse_is_exit_4(tmp_path):
    good = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    result = run("ingest", "--db", "postgresql://nobody:secret@127.0.0.1:1/none", str(good),
                 env={"KYPHOWATCH_DEMO": "1"})
    assert result.returncode == 4
    assert "cannot open warehouse" in result.stderr
    assert "secret" not in result.stderr  # password redacted
    assert "Traceback" not in result.stderr


def test_read_commands_never_create_a_warehouse_and_say_where_they_looked(tmp_path):
    missing = tmp_path / "typo" / "warehouse.db"
    for command in (["sites"], ["site", "S001"], ["report"], ["alerts", "list"]):
        result = run(*command, "--db", f"sqlite:///{missing}", env={"KYPHOWATCH_DEMO": "1"})
        assert result.returncode == 3, (command, result.stderr)
        assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not missing.parent.exists()  # no directory, no empty warehouse


@pytest.mark.parametrize("db, says", [
    ("w.db", "is not a database URL"),
    ("nobody:hunter2@db.example/x", "is not a database URL"),
    ("sqlite:///", "in-memory SQLite"),
    ("sqlite://", "in-memory SQLite"),
    ("sqlite:///:memory:", "in-memory SQLite"),
    ("sqlit:///w.db", "unknown database 'sqlit'"),
    ("sqlite://w.db", "did you mean sqlite:///w.db"),
])
def test_a_db_that_is_not_a_warehouse_url_is_exit_3(tmp_path, db, says):
    """Not a traceback (a bare path), not a silent loss (in memory): one line, exit 3."""
    good = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    for command in (["ingest", str(good)], ["sites"], ["alerts", "list"]):
        result = subprocess.run([sys.executable, "-m", "pipelines.cli", *command, "--db", db],
                                cwd=tmp_path, env=dict(os.environ, KYPHOWATCH_DEMO="1",
                                                       PYTHONPATH=str(REPO)),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 3, (command, result.stderr)
        assert says in result.stderr and "Traceback" not in result.stderr
        assert "hunter2" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["procedures_20240201.csv"]


def test_no_command_but_ingest_creates_a_warehouse(tmp_path):
    missing = tmp_path / "typo" / "warehouse.db"
    for command in (["alerts", "sync"], ["alerts", "deliver"],
                    ["alerts", "ack", "abc", "--by", "me", "--reason", "typo"],
                    ["alerts", "resolve", "abc", "--by", "me", "--reason", "typo"],
                    ["regulator", "list"], ["runs", "prune", "--keep-days", "30"],
                    ["monitor"], ["beyond-report", "--out", str(tmp_path / "beyond")]):
        result = run(*command, "--db", f"sqlite:///{missing}", env={"KYPHOWATCH_DEMO": "1"})
        assert result.returncode == 3, (command, result.stderr)
        assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not missing.parent.exists()


def test_drilldown_says_when_extracts_were_loaded_after_the_stored_run(tmp_path):
    """A site loaded after the monitor ran is not 'unknown' without a word about why."""
    first = write(tmp_path / "a" / "procedures_20240201.csv",
                  csv_text(PROC_HEADER, [proc_row(f"P{i}") for i in range(1, 6)]))
    later = write(tmp_path / "b" / "procedures_20240202.csv",
                  csv_text(PROC_HEADER, [proc_row(f"Q{i}", site="S007") for i in range(1, 6)]))
    db = f"sqlite:///{tmp_path / 'w.db'}"
    env = {"KYPHOWATCH_DEMO": "1"}
    assert run("ingest", "--db", db, str(first), env=env).returncode == 0
    assert run("monitor", "--db", db, env=env).returncode == 0
    fresh = run("sites", "--db", db, env=env)
    assert fresh.returncode == 0 and "note:" not in fresh.stderr
    assert run("ingest", "--db", db, str(later), env=env).returncode == 0
    stale = run("site", "S007", "--db", db, env=env)
    assert stale.returncode == 2
    assert "not in the monitor run as of 2024-01-05" in stale.stderr
    assert "extracts loaded since" in stale.stderr and "kyphowatch monitor" in stale.stderr
    assert "extracts loaded since" in run("sites", "--db", db, env=env).stderr
    assert run("monitor", "--db", db, env=env).returncode == 0
    again = run("site", "S007", "--db", db, env=env)
    assert again.returncode == 0 and "note:" not in again.stderr, again.stderr


def test_report_out_must_be_a_directory(tmp_path):
    """``--out`` naming a file, or empty (the current directory), is exit 2 before any work;
    a place that cannot be created is exit 3 naming it."""
    good = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    db = f"sqlite:///{tmp_path / 'w.db'}"
    assert run("ingest", "--db", db, str(good), env={"KYPHOWATCH_DEMO": "1"}).returncode == 0
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for command in ("report", "beyond-report"):
        for out, code, says in ((str(a_file), 2, "is not a directory"),
                                ("", 2, "empty --out"),
                                (str(a_file / "below"), 3, "cannot create the output directory")):
            result = subprocess.run([sys.executable, "-m", "pipelines.cli", command, "--db", db,
                                     "--out", out], cwd=tmp_path, capture_output=True, text=True,
                                    env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
            assert result.returncode == code, (command, out, result.stderr)
            assert says in result.stderr and "Traceback" not in result.stderr
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("w.db")) == [
        "a_file", "procedures_20240201.csv"]


def test_a_reader_leaving_early_keeps_the_commands_exit_code(tmp_path):
    """``kyphowatch ingest --json F | head -1`` on a rejected file still exits 2."""
    bad = write(tmp_path / "procedures_20240202.csv", "a;b;c\n1;2;3\n")
    db = f"sqlite:///{tmp_path / 'w.db'}"
    shell = (f"{sys.executable} -m pipelines.cli ingest --json --db {db} {bad} | true; "
             "exit ${PIPESTATUS[0]}")
    piped = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, KYPHOWATCH_DEMO="1"), timeout=300)
    assert piped.returncode == 2, piped.stderr
    assert "BrokenPipe" not in piped.stderr and "Traceback" not in piped.stderr


def test_broken_pipe_is_quiet_and_future_dates_are_rejected(tmp_path):
    good = write(tmp_path / "procedures_20240201.csv",
                 csv_text(PROC_HEADER, [proc_row(f"P{i}") for i in range(1, 40)]))
    db = f"sqlite:///{tmp_path / 'w.db'}"
    env = dict(os.environ, KYPHOWATCH_DEMO="1", KYPHOWATCH_REPORT_DIR=str(tmp_path / "r"))
    assert run("ingest", "--db", db, str(good), env=env).returncode == 0
    # `kyphowatch sites | head -1`: the reader is gone before the output is written (`true`
    # exits at once, long before Python has started), so every write hits a closed pipe
    shell = f"{sys.executable} -m pipelines.cli sites --db {db} | true; exit ${{PIPESTATUS[0]}}"
    piped = subprocess.run(["bash", "-c", shell], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "BrokenPipe" not in piped.stderr and "Traceback" not in piped.stderr
    future = run("sites", "--db", db, "--as-of", "2030-01-01", env=env)
    assert future.returncode == 2
    assert "2030-01-01 is after the newest procedure" in future.stderr
    assert "longest outcome window" in future.stderr


def _terminated_connection(pg_url: str, pg_admin_url: str):
    """Return a SQLAlchemy connection whose server process was just terminated (real)."""
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    conn = engine.connect()
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as other:
        other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    return conn


@pytest.mark.postgres
@pytest.mark.parametrize("route", ["sqlalchemy", "driver", "integrity"])
def test_a_warehouse_lost_mid_command_is_exit_4_and_a_bug_stays_internal(
        pg_url, pg_admin_url, monkeypatch, capsys, route):
    """The server going away during a command (here its backend is terminated, then the
    command's statement runs on it) is one line and exit 4, whether SQLAlchemy raised it
    or the driver did (the bulk COPY paths write through psycopg directly); a statement's
    own error (a duplicate key) is a bug: exit 1, traceback in the log."""
    import sqlalchemy as sa

    from pipelines.cli import main
    from pipelines.surveillance import engine as monitor_engine

    def failing_monitor(settings, as_of=None):
        if route == "integrity":
            engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
            with engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE once (id int PRIMARY KEY)")
                conn.exec_driver_sql("INSERT INTO once VALUES (1), (1)")
        conn = _terminated_connection(pg_url, pg_admin_url)
        try:
            if route == "sqlalchemy":
                conn.exec_driver_sql("SELECT 1")
            conn.connection.driver_connection.cursor().execute("SELECT 1")
        finally:
            conn.invalidate()  # no reset attempted on the dead connection

    monkeypatch.setattr(monitor_engine, "run_monitor", failing_monitor)
    code = main(["monitor", "--db", pg_url])
    err = capsys.readouterr().err
    if route == "integrity":
        assert code == 1 and "internal error: IntegrityError" in err
        return
    assert code == 4
    assert err.startswith("kyphowatch: error: the warehouse failed during 'monitor' "
                          "(AdminShutdown: terminating connection")
    assert "rerun the command" in err and "Traceback" not in err
