"""``kyphowatch site`` reads its site's own ``metrics:<id>`` part, not every site's figures.

The monitor stores, beside the ``core`` part, a copy of each site's figures and signals
(``runs.load_site``); ``site`` decodes that copy and the ``facts`` part instead of the whole
``core``. These tests hold the copy to the rows ``core`` holds for every site, the
command's output to the output of the path through ``core`` (every format, a metric, a
site in lower case, an unknown site), a run stored without the copies to that same
output, and the readers of the whole run to never reading the copies.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.schema import monitor_run_part
from pipelines.surveillance import runs
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from tests.test_drilldown import _outputs
from tests.test_engine import build_sites


def test_each_sites_part_holds_the_rows_of_core(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=5, per_site=300, leak={"S002": 0.3}, seed=11)
    settings = settings_for(db_url)
    result = run_monitor(settings)
    profile = load_profile(settings.profile_path)
    with engine.connect() as conn:
        whole = runs.load_run(conn, profile, result.as_of)
        names = set(conn.scalars(sa.select(monitor_run_part.c.part)))
        sites = sorted({m["site_id"] for m in whole.site_metrics})
        assert len(sites) == 5 and {f"metrics:{s}" for s in sites} <= names
        for site in sites:
            own = runs.load_site(conn, profile, result.as_of, site)
            assert own.run_key == whole.run_key and own.as_of == whole.as_of
            assert (own.profile_name, own.profile_version, own.data_fingerprint) == (
                whole.profile_name, whole.profile_version, whole.data_fingerprint)
            assert own.procedure_facts == whole.procedure_facts
            assert own.site_metrics == [m for m in whole.site_metrics if m["site_id"] == site]
            assert own.signals == [s for s in whole.signals if s["site_id"] == site]
        assert any(runs.load_site(conn, profile, result.as_of, s).signals for s in sites)
        unknown = runs.load_site(conn, profile, result.as_of, "S999")
        assert unknown.site_metrics == [] and unknown.signals == []
        # the whole run's readers never decode the copies: the same charts as with them gone
        conn.execute(monitor_run_part.delete().where(monitor_run_part.c.part.like("metrics:%")))
        without = runs.load_run(conn, profile, result.as_of)
        assert runs.load_site(conn, profile, result.as_of, sites[0]) is None  # an older run
    assert sorted(whole.charts["tte"]) == sorted(without.charts["tte"])
    for label, chart in whole.charts["cusum"].items():
        assert all((chart[k] == without.charts["cusum"][label][k]).all()
                   for k in ("group", "day", "signal"))
    for metric_id, chart in whole.charts["tte"].items():
        assert sorted(chart["series"]) == sorted(without.charts["tte"][metric_id]["series"])


def test_site_prints_the_same_from_its_part_from_core_and_from_an_older_run(
        db_url, settings_for, capsys, monkeypatch):
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    run_monitor(settings_for(db_url))
    assert cli_main(["alerts", "sync", "--db", db_url]) == 0  # alerts on the site page
    capsys.readouterr()
    commands = [[*c, "--db", db_url] for c in (
        ["site", "S004"], ["site", "S004", "--wide"], ["site", "S004", "--json"],
        ["site", "S004", "--csv"], ["site", "s001", "--json"], ["site", "S002", "--wide"],
        ["site", "S004", "--metric", "cement_leak", "--wide"], ["site", "S999"])]

    load_run, load_site = runs.load_run, runs.load_site

    def no_core(*args, **kwargs):
        raise AssertionError("site read the whole run")

    monkeypatch.setattr(runs, "load_run", no_core)
    own_part = _outputs(commands, capsys)
    assert own_part[-1][0] == 2 and "unknown site 'S999'" in own_part[-1][2]
    payload = json.loads(own_part[2][1])
    assert payload["site_id"] == "S004" and payload["metrics"] and payload["alerts"]

    # through core, as before the per-site parts
    monkeypatch.setattr(runs, "load_run", load_run)
    monkeypatch.setattr(runs, "load_site", lambda *a, **k: None)
    assert _outputs(commands, capsys) == own_part
    monkeypatch.setattr(runs, "load_site", load_site)

    # a run stored before the per-site parts: read through core, the same output
    with engine.begin() as conn:
        conn.execute(monitor_run_part.delete().where(monitor_run_part.c.part.like("metrics:%")))
    assert _outputs(commands, capsys) == own_part
