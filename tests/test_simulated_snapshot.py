"""The in-memory snapshot (``simulate_snapshot``) against the files -> warehouse -> snapshot path."""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest

from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.simulate import FRACTURE_REPORT_LAG, simulate, simulate_snapshot
from pipelines.surveillance.outcomes import load_snapshot, snapshot_needs
from pipelines.surveillance.profile import load_profile

START, END = date(2022, 1, 1), date(2023, 6, 30)
SITES, SEED = 4, 11
DRIFTS = ("S002:cement_leak:2:2022-09-01",)
# The longest reporting lag: an event dated this long before the end date has been reported.
LONGEST_LAG = max(FRACTURE_REPORT_LAG)


@pytest.fixture(scope="module")
def profile():
    return load_profile(Path(__file__).resolve().parents[1] / "profiles" / "htg108.yaml")


def per_site(snapshot) -> dict[str, int]:
    return {str(k): int(v) for k, v in
            snapshot.procedures["site_id"].value_counts().sort_index().items()}


def per_type(snapshot) -> Counter:
    return Counter(snapshot.complications["event_type"].astype(str).tolist())


def in_memory(profile, **over):
    arguments = dict(sites=SITES, start=START, end=END, seed=SEED, drifts=DRIFTS)
    arguments.update(over)
    return simulate_snapshot(profile, **arguments)


@pytest.mark.slow
def test_in_memory_snapshot_matches_the_warehouse(tmp_path, sqlite_url, settings_for, profile):
    # One file per kind: no corrections are pending at the end date, so every value the
    # warehouse holds is the true one; no bad rows.
    manifest = simulate(tmp_path / "sim", sites=SITES, start=START, end=END, seed=SEED,
                        drifts=DRIFTS, bad_row_rate=0.0, single_file=True)
    assert ingest_paths(settings_for(sqlite_url), [tmp_path / "sim"]).exit_code == 0
    engine = make_engine(sqlite_url)

    # Well before the end every event dated up to as_of has been reported: the snapshots
    # are the same, value for value (the fingerprint hashes every value the metrics read).
    early = END - timedelta(days=LONGEST_LAG)
    with engine.connect() as conn:
        stored = load_snapshot(conn, profile, early)
    memory, info = in_memory(profile, as_of=early)
    assert memory.as_of == stored.as_of == early
    assert per_site(memory) == per_site(stored)
    assert per_type(memory) == per_type(stored)
    assert len(memory.complications) > 0
    assert memory.fingerprint == stored.fingerprint
    assert info["site_ids"] == ["S001", "S002", "S003", "S004"]
    assert info["annual_volume"] == {site: pytest.approx(row["annual_volume"], abs=0.051)
                                     for site, row in manifest["sites"].items()}
    assert [drift.spec() for drift in info["drifts"]] == list(DRIFTS)

    # At the end date the warehouse lacks the events whose reporting lag has not passed;
    # the in-memory snapshot has every event. Procedures are all there either way.
    with engine.connect() as conn:
        stored = load_snapshot(conn, profile, END)
    memory, _ = in_memory(profile)
    assert memory.as_of == END
    assert per_site(memory) == per_site(stored)
    assert sum(per_site(memory).values()) == manifest["counts"]["procedures"]
    _, event_types = snapshot_needs(profile)
    delivered = manifest["counts"]["delivered_clean"]["complications_by_type"]
    assert per_type(stored) == Counter({t: delivered[t] for t in event_types if delivered[t]})
    missing = per_type(memory) - per_type(stored)
    assert not per_type(stored) - per_type(memory)  # nothing stored that memory lacks
    assert 0 < sum(missing.values()) <= manifest["counts"]["unreported_complications"]
    engine.dispose()


def test_same_seed_same_fingerprint(profile):
    first, _ = in_memory(profile)
    second, _ = in_memory(profile)
    assert first.fingerprint == second.fingerprint
    assert first.procedures.equals(second.procedures)
    assert in_memory(profile, seed=SEED + 1)[0].fingerprint != first.fingerprint
    assert in_memory(profile, drifts=())[0].fingerprint != first.fingerprint
    # as_of only cuts: an earlier as_of keeps the earlier procedures, unchanged.
    earlier, _ = in_memory(profile, as_of=date(2022, 12, 31))
    assert earlier.procedures["procedure_day"].max() <= first.procedures["procedure_day"].max()
    assert set(earlier.procedures["procedure_id"]) < set(first.procedures["procedure_id"])


def test_as_of_before_the_start_gives_an_empty_snapshot(profile):
    empty, info = in_memory(profile, as_of=START - timedelta(days=1))
    assert len(empty.procedures) == 0 and len(empty.complications) == 0
    assert set(info["annual_volume"]) == set(info["site_ids"])
