"""How metric levels combine into a site's status; the level rules are in test_levels.py."""

from __future__ import annotations

from datetime import date, timedelta
from types import SimpleNamespace

from pipelines import evidence

AS_OF = date(2024, 6, 30)
PROFILE = SimpleNamespace(design=SimpleNamespace(funnel_rolling_days=365, hold_days=365),
                          metrics=())
LEVEL_OF = {"safety": "alarm", "watch": "watch", "under_reporting": "under_reporting",
            "immature": "immature", "ok": "in_control"}


def _result(statuses: dict[str, list[str]]):
    """A monitor result whose sites have the given per-metric states.

    Every site also has a sentinel and a process metric, as with the HTG108 profile; those
    are never immature.
    """
    metrics, signals = [], []
    for site, states in statuses.items():
        for kind in ("sentinel", "process"):
            metrics.append({"site_id": site, "metric": kind, "kind": kind, "n": 10,
                            "baseline": 0.0, "level": {"level": "in_control", "reason": "-"}})
        for i, state in enumerate(states):
            metric = f"m{i}"
            metrics.append({"site_id": site, "metric": metric, "kind": "outcome",
                            "n": 0 if state == "immature" else 50, "window_days": 30,
                            "baseline": 0.1,
                            "level": {"level": LEVEL_OF[state], "reason": state}})
            if state in ("safety", "under_reporting"):
                signals.append({"site_id": site, "metric": metric, "category": state,
                                "method": "bernoulli_cusum", "signal_date": AS_OF})
    return SimpleNamespace(as_of=AS_OF, site_metrics=metrics, signals=signals)


def test_site_status_is_the_most_severe_metric_but_immature_only_when_nothing_is_mature():
    result = _result({
        "S001": ["immature", "ok"],
        "S002": ["immature", "immature"],
        "S003": ["ok", "safety", "under_reporting"],
        "S004": ["under_reporting", "immature"],
        "S005": ["watch", "under_reporting"],
    })
    rows = {r["site_id"]: r for r in evidence.sites_payload(result, PROFILE,
                                                            evidence.SiteFacts())}
    assert {s: r["status"] for s, r in rows.items()} == {
        "S001": "in_control", "S002": "immature", "S003": "alarm", "S004": "under_reporting",
        "S005": "watch"}
    assert [s for s, r in rows.items() if r["flagged"]] == ["S003", "S004", "S005"]


def test_engine_pchart_episodes_say_when_they_were_last_flagged(sqlite_url, settings_for):
    from pipelines.db import make_engine
    from pipelines.surveillance.engine import evaluate
    from tests.test_engine import build_sites

    build_sites(make_engine(sqlite_url), sites=3, per_site=600, leak={"S003": 0.4}, seed=8)
    result = evaluate(settings_for(sqlite_url))
    episodes = [s for s in result.signals if s["method"] == "pchart" and s["site_id"] == "S003"]
    assert episodes
    for s in episodes:
        detail = evidence._detail(s)
        last = date.fromisoformat(detail["last_flagged"])
        assert s["signal_date"] <= last <= result.as_of
        after = last + timedelta(days=1)
        assert after.day == 1 and after.month in (1, 4, 7, 10)  # the end of a quarter
    newest = max(episodes, key=lambda s: s["signal_date"])
    assert evidence._detail(newest)["ongoing"] is True  # the site leaks to the end


def test_the_recent_interval_kernel_is_the_beta_quantile_bit_for_bit():
    # recent_observed_expected uses scipy.special.betaincinv (a light import) for the
    # Clopper-Pearson limits; it must equal stats.beta.ppf exactly, so the report's figures
    # match the engine's exact_interval to the last bit.
    import numpy as np
    from scipy import special, stats

    rng = np.random.default_rng(11)
    n = rng.integers(1, 5000, 20_000).astype(float)
    k = np.floor(rng.random(20_000) * n)
    low, high = k > 0, k < n
    assert np.array_equal(special.betaincinv(k[low], n[low] - k[low] + 1, 0.025),
                          stats.beta.ppf(0.025, k[low], n[low] - k[low] + 1))
    assert np.array_equal(special.betaincinv(k[high] + 1, n[high] - k[high], 0.975),
                          stats.beta.ppf(0.975, k[high] + 1, n[high] - k[high]))


def test_recent_complications_are_each_sites_newest_in_order(db_url, settings_for):
    """The ranked rows equal a plain sort of every complication, ties included.

    The query ranks only rows on or after a site's ``limit``-th newest date; many rows share
    that date here, some sites have fewer rows than the limit, and one has none before
    ``as_of``, so a cut that lost a tied row or a short site's rows would show.
    """
    import random

    import sqlalchemy as sa

    from pipelines.db import open_warehouse
    from pipelines.schema import complication

    rng = random.Random(11)
    rows = []
    for s, count in enumerate((0, 1, 3, 7, 25, 60)):
        site = f"S{s:03d}"
        for i in range(count):
            rows.append({
                "complication_id": f"c{rng.randrange(10**6):06d}-{site}-{i}",
                "procedure_id": f"p-{site}-{i}", "site_id": site,
                # few distinct dates: the limit-th newest date is shared by several rows
                "event_date": date(2024, 1, 1) + timedelta(days=rng.randrange(6) * 30),
                "event_type": rng.choice(["cement_leak", "new_fracture", "death"]),
                "symptomatic": rng.random() < 0.3, "severity": rng.choice(["minor", "major"]),
                "vertebral_level": rng.choice(["L1", "T12", None]),
                "source_checksum": "x", "extract_ts": "2024-07-01T00:00:00",
            })
    rows.append({**rows[0], "complication_id": "late", "site_id": "S009",
                 "event_date": date(2024, 12, 1)})  # after every as_of below
    engine = open_warehouse(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(complication), rows)
    engine.dispose()
    settings = settings_for(db_url)

    def expected(as_of, limit, site=None):
        out: dict[str, list[dict]] = {}
        for r in sorted((r for r in rows if (as_of is None or r["event_date"] <= as_of)
                         and site in (None, r["site_id"])),
                        key=lambda r: (r["site_id"], -r["event_date"].toordinal(),
                                       r["event_type"], r["complication_id"])):
            kept = out.setdefault(r["site_id"], [])
            if len(kept) < limit:
                kept.append({"event_date": r["event_date"].isoformat(),
                             "event_type": r["event_type"], "severity": r["severity"],
                             "symptomatic": r["symptomatic"],
                             "vertebral_level": r["vertebral_level"]})
        return out

    for as_of in (None, date(2024, 6, 30), date(2024, 3, 15)):
        for limit in (1, 4, 20):
            got = evidence.recent_complications_by_site(settings, as_of, limit=limit)
            assert got == expected(as_of, limit), (as_of, limit)
    got = evidence.recent_complications_by_site(settings, date(2024, 6, 30), "S005", limit=20)
    assert list(got) == ["S005"] and got == expected(date(2024, 6, 30), 20, "S005")
    assert "S009" not in evidence.recent_complications_by_site(settings, date(2024, 6, 30))


def test_recent_complications_find_each_sites_cut_once_per_site(pg_url, settings_for):
    """On PostgreSQL the ``limit``-th newest date is looked up once per site, not per row.

    Inlined, the planner evaluated that lookup as a join filter for every complication
    (12,788 index scans, 0.6-1.3 s of the nightly report's reads on a 60-site registry);
    the materialised ``cut`` runs it once per site. Checked on the executed statement's
    plan: no node runs more often than there are sites.
    """
    import sqlalchemy as sa

    from pipelines.db import open_warehouse
    from pipelines.schema import complication

    sites, per_site = 4, 50
    rows = [{"complication_id": f"c-{s}-{i}", "procedure_id": f"p-{s}-{i}",
             "site_id": f"S{s:03d}", "event_date": date(2024, 1, 1) + timedelta(days=i),
             "event_type": "cement_leak", "symptomatic": False, "severity": "minor",
             "vertebral_level": None, "source_checksum": "x",
             "extract_ts": "2024-07-01T00:00:00"}
            for s in range(sites) for i in range(per_site)]
    engine = open_warehouse(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(complication), rows)
    statements = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _keep(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        statements.append((statement, parameters))

    with engine.connect() as conn:
        got = evidence.recent_complications_by_site(settings_for(pg_url), date(2024, 6, 30),
                                                    limit=5, conn=conn)
        assert {site: len(found) for site, found in got.items()} == {
            f"S{s:03d}": 5 for s in range(sites)}
        statement, parameters = statements[-1]
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement,
                                    parameters).scalar()
    engine.dispose()

    def loops(node):
        yield node.get("Actual Loops", 1)
        for child in node.get("Plans", []):
            yield from loops(child)

    assert max(loops(plan[0]["Plan"])) <= sites
