"""Operators are compared with their colleagues at the same site, not with the network.

Tiny deterministic frames: three operators share a site, each doing every third case over
two years at the network's expected risk 0.1; an operator's events are every ``k``-th of
their cases. A site drifting for everyone (each operator at 3 times the network's rate)
must not signal any operator (the chart against the network sent a training review to
all three); a bad operator among good ones still signals, at a normal site and at a
drifting one, and the good ones do not; an operator alone at a site has no within-site
comparator, so no evidence: no threshold and no signal, however high their rate.
"""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.settings import REPO_DIR
from pipelines.surveillance.beyond import parse_beyond_site
from pipelines.surveillance.operators import (
    operator_charts,
    operator_pseudonym,
    operator_rare_tests,
)
from pipelines.surveillance.profile import load_profile

RISK = 0.1
DAYS = 730


def _site(site_id: str, every: dict[str, int]) -> pd.DataFrame:
    """One case a day, operators in turn; operator ``o``'s every ``every[o]``-th case leaks."""
    names = list(every)
    rows = []
    seen = dict.fromkeys(names, 0)
    for day in range(DAYS):
        name = names[day % len(names)]
        seen[name] += 1
        rows.append((site_id, name * 64, day, int(seen[name] % every[name] == 0), RISK))
    return pd.DataFrame(rows, columns=["site_id", "operator_hash", "index_day", "y", "risk"])


CASES = [
    # (what, {operator: every k-th case an event}, operators that must signal)
    ("site drifting, every operator at 3x the network rate", {"a": 3, "b": 3, "c": 3}, set()),
    ("site in control, every operator at the network rate", {"a": 10, "b": 10, "c": 10}, set()),
    ("bad operator among good ones", {"a": 2, "b": 10, "c": 10}, {"a"}),
    ("bad operator at a drifting site", {"a": 2, "b": 4, "c": 4}, {"a"}),
]


@pytest.mark.parametrize(("what", "every", "signalled"), CASES, ids=[c[0] for c in CASES])
def test_operators_signal_only_against_their_colleagues(what, every, signalled):
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design = parse_beyond_site(profile).operators
    rows = operator_charts(_site("S1", every), profile, design, as_of_day=DAYS - 1)
    got = {name for name in every if next(
        r for r in rows if r["operator"] == operator_pseudonym(name * 64))["signals"]}
    assert got == signalled, what
    for row in rows:  # every operator had colleagues in every quarter: charted
        assert row["threshold"] is not None and row["procedures"] > 0


def test_a_lone_operator_at_a_site_has_no_evidence():
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design = parse_beyond_site(profile).operators
    units = pd.concat([_site("S1", {"a": 10, "b": 10}), _site("S2", {"z": 2})],
                      ignore_index=True)
    rows = {r["operator"]: r for r in operator_charts(units, profile, design, DAYS - 1)}
    lone = rows[operator_pseudonym("z" * 64)]
    # half of the lone operator's cases leak (5x the network): the network chart signalled
    assert (lone["procedures"], lone["events"], lone["expected"]) == (0, 0, 0.0)
    assert (lone["statistic"], lone["threshold"], lone["signals"]) == (0.0, None, 0)
    assert lone["signal_date"] is None
    assert rows[operator_pseudonym("a" * 64)]["threshold"] is not None


def test_the_major_event_test_compares_with_colleagues_too():
    """Major events (risk 0.004): every fifth case at the drifting site, every other case for
    the lone operator. The test against the network's expected count signalled a, b, c, z, p."""
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design = parse_beyond_site(profile).operators
    units = pd.concat([_site("S1", {"a": 5, "b": 5, "c": 5}), _site("S2", {"z": 2}),
                       _site("S3", {"p": 2, "q": 40, "r": 40})], ignore_index=True)
    units["risk"] = 0.004
    rows = {r["operator"]: r for r in operator_rare_tests(units, profile, design, DAYS - 1)}
    signalled = {name for name in "abczpqr" if rows[operator_pseudonym(name * 64)]["signals"]}
    assert signalled == {"p"}  # a bad operator among good ones still signals
    lone = rows[operator_pseudonym("z" * 64)]
    assert (lone["procedures"], lone["events"], lone["statistic"]) == (0, 0, 1.0)
