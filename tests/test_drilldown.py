"""``kyphowatch sites`` and ``site`` read the stored run by a shorter path with the same output.

Issue 10 asks for both commands under a second on 1,000 sites. Their read path skips work
that no drill-down shows (chart arrays, the levels' JSON detail), finds the newest procedure
date through the site index, reads on one connection, imports no numpy, pandas or scipy
and reads the profile with libyaml. These tests hold each shortcut to the output of the
full path it replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta

import sqlalchemy as sa
import yaml

from pipelines import db as db_module
from pipelines import evidence
from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.schema import procedure
from pipelines.settings import REPO_DIR, bundled_path
from pipelines.surveillance import levels, runs
from pipelines.surveillance import profile as profile_module
from pipelines.surveillance.engine import run_monitor
from tests.test_engine import build_sites
from tests.test_outcomes import insert, procedure_row

HEAVY = ("numpy", "pandas", "scipy", "pyarrow", "great_expectations", "matplotlib",
         "statsmodels", "airflow")


def test_newest_procedure_date_is_the_newest_of_every_site(db_url):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert runs.newest_procedure_date(conn) is None  # an empty warehouse
    end = build_sites(engine, sites=5, per_site=60, days=300, seed=3)
    # the newest procedure at a site in the middle of the key order, an older one at a site
    # that sorts first
    newest = end + timedelta(days=40)
    insert(engine, [procedure_row("PLATE-1", "S003", newest),
                    procedure_row("PLATE-2", "A01", end - timedelta(days=500))])
    with engine.connect() as conn:
        plain = conn.execute(sa.select(sa.func.max(procedure.c.procedure_date))).scalar()
        assert runs.newest_procedure_date(conn) == newest
    assert str(plain)[:10] == newest.isoformat()


def _outputs(commands: list[list[str]], capsys) -> list[tuple[int, str, str]]:
    out = []
    for command in commands:
        code = cli_main(command)
        captured = capsys.readouterr()
        out.append((code, captured.out, captured.err))
    return out


def test_the_drill_down_shortcuts_change_no_output(db_url, settings_for, capsys, monkeypatch):
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    settings = settings_for(db_url)
    result = run_monitor(settings)
    assert cli_main(["alerts", "sync", "--db", db_url]) == 0  # alerts on the site pages
    capsys.readouterr()
    commands = [[*c, "--db", db_url] for c in (
        ["sites"], ["sites", "--flagged"], ["sites", "--wide"], ["sites", "--json"],
        ["sites", "--csv"], ["site", "S004"], ["site", "S004", "--wide"],
        ["site", "S004", "--json"], ["site", "S004", "--csv"], ["site", "s001", "--json"],
        ["site", "S004", "--metric", "cement_leak", "--wide"], ["site", "S999"])]

    opened = []
    original_open = db_module.open_warehouse
    monkeypatch.setattr(db_module, "open_warehouse",
                        lambda *a, **k: opened.append(1) or original_open(*a, **k))
    fast = _outputs(commands, capsys)
    assert len(opened) == len(commands)  # one connection per command, the run stored
    sites = json.loads(fast[3][1])
    assert sites["run_key"] == result.run_key and len(sites["sites"]) == 4
    assert any(s["status"] == "alarm" for s in sites["sites"] if s["site_id"] == "S004")
    assert fast[-1][0] == 2 and "unknown site" in fast[-1][2]

    # The full path each shortcut replaced: chart arrays rebuilt, every level's detail
    # encoded, max() over every procedure, a new connection per read.
    load_run, status_rows = runs.load_run, levels.status_rows
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: load_run(*a, **{**k, "charts": True}))
    monkeypatch.setattr(levels, "status_rows",
                        lambda *a, **k: status_rows(*a, **{**k, "detail": True}))
    monkeypatch.setattr(runs, "newest_procedure_date", _newest_by_max)
    monkeypatch.setattr(evidence, "_connection",
                        lambda settings, conn: db_module.reading(settings.db_url))
    opened.clear()
    full = _outputs(commands, capsys)
    assert len(opened) > len(commands)
    assert full == fast

    # status rows without the detail are the full rows less that one column
    profile = profile_module.load_profile(settings.profile_path)
    with_detail = status_rows(result, profile)
    without = status_rows(result, profile, detail=False)
    assert [{k: v for k, v in r.items() if k != "level_detail"} for r in with_detail] == without
    assert all("level_detail" in r for r in with_detail)
    # one site's recent complications (read through the site index) are that site's rows
    # of the network-wide ranking
    every_site = evidence.recent_complications_by_site(settings, result.as_of)
    assert len(every_site["S004"]) == evidence.RECENT_COMPLICATIONS
    for site in ("S001", "S004"):
        assert evidence.recent_complications_by_site(settings, result.as_of,
                                                     site) == {site: every_site[site]}


def _newest_by_max(conn: sa.Connection) -> date:
    value = conn.execute(sa.select(sa.func.max(procedure.c.procedure_date))).scalar()
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def test_the_drill_down_imports_no_numpy_pandas_or_scipy(db_url, settings_for):
    """...and leaves the interpreter's final garbage collection nothing to walk."""
    build_sites(make_engine(db_url), sites=3, per_site=300, leak={"S003": 0.3}, seed=8)
    run_monitor(settings_for(db_url))
    code = (
        "import atexit, contextlib, gc, io, json, os, sys\n"
        "from pipelines.cli import main\n"
        # exit hooks run last-registered first: this one sees the CLI's freeze
        "atexit.register(lambda: os.write(1, b'frozen %d' % gc.get_freeze_count()))\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    codes = [main(['sites', '--db', {db_url!r}]),\n"
        f"             main(['site', 'S003', '--wide', '--db', {db_url!r}])]\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy, 'out': out.getvalue()}),\n"
        "      flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                          text=True, env=dict(os.environ, KYPHOWATCH_DEMO="1"), check=True)
    *_, line, frozen = done.stdout.splitlines()
    report = json.loads(line)
    assert report["codes"] == [0, 0]
    # the interpreter's last collection has nothing left to walk
    assert int(frozen.removeprefix("frozen ")) > 10_000
    assert "3 sites" in report["out"] and "site S003" in report["out"]
    assert report["heavy"] == []


def test_libyaml_reads_every_bundled_profile_as_the_python_loader_does():
    if yaml.__with_libyaml__:
        assert profile_module._SAFE_LOADER is yaml.CSafeLoader
    paths = sorted(bundled_path("profiles").glob("*.yaml"))
    assert paths
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert (yaml.load(text, Loader=profile_module._SAFE_LOADER)
                == yaml.load(text, Loader=yaml.SafeLoader))


def test_a_drill_down_for_a_date_without_a_stored_run_computes_it_once(sqlite_url,
                                                                       settings_for, capsys,
                                                                       monkeypatch):
    end = build_sites(make_engine(sqlite_url), sites=3, per_site=300, leak={"S003": 0.3},
                      seed=9)
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    newest = run_monitor(settings_for(sqlite_url))
    past = (end - timedelta(days=150)).isoformat()
    command = ["site", "S003", "--json", "--as-of", past, "--db", sqlite_url]
    assert cli_main(command) == 0
    computed = json.loads(capsys.readouterr().out)
    assert computed["as_of"] == past and computed["run_key"] != newest.run_key
    assert computed["metrics"] and computed["status"]
    opened = []
    original_open = db_module.open_warehouse
    monkeypatch.setattr(db_module, "open_warehouse",
                        lambda *a, **k: opened.append(1) or original_open(*a, **k))
    assert cli_main(command) == 0  # now stored: read on one connection, same payload
    assert json.loads(capsys.readouterr().out) == computed and len(opened) == 1
