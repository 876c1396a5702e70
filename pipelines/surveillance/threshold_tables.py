"""The per-site threshold tables of docs/statistics.md, computed as the engine computes them.

Why: the documented thresholds must be the ones the engine uses. The tables are generated
from the loaded profile with the engine's own functions and rounding; ``tests/test_budget.py``
regenerates them and compares with the Markdown, and ``python -m
pipelines.surveillance.threshold_tables`` prints them for the docs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.surveillance import budget, survival
from pipelines.surveillance.arl import arl_markov
from pipelines.surveillance.profile import Profile, load_profile

VOLUMES = (50, 100, 200, 400)
# Patients indexed per procedure (about 8 % have a second procedure; see the simulator).
PROCEDURES_PER_PATIENT = 1.08


def _shift(p: float, p_from: float, p_to: float) -> float:
    """Return ``p`` with its odds multiplied by odds(p_to) / odds(p_from)."""
    logit = math.log(p / (1 - p)) + math.log(p_to / (1 - p_to)) - math.log(p_from / (1 - p_from))
    return 1.0 / (1.0 + math.exp(-logit))


def _odds_shift(p: float, odds_ratio: float) -> float:
    """Return the rate whose odds are ``odds_ratio`` times those of ``p``."""
    return odds_ratio * p / (1 - p + odds_ratio * p)


@dataclass(frozen=True)
class BernoulliRow:
    """One volume's row of a Bernoulli/RA-CUSUM table."""

    volume: int
    arl0: float
    h: float
    arl1: float

    @property
    def arl1_days(self) -> float:
        """Return ARL1 in days at the row's volume."""
        return self.arl1 / self.volume * 365.25


def bernoulli_rows(profile: Profile, metric_id: str, direction: str, level: str
                   ) -> list[BernoulliRow]:
    """Return the rows of one CUSUM chart for :data:`VOLUMES` (average case mix)."""
    metric = profile.metric(metric_id)
    assert metric.detect is not None
    odds_ratio = metric.detect.odds_ratio if direction == "up" else 1 / metric.detect.odds_ratio
    edge = metric.reference(direction)
    p_site = budget.significant(edge, 2)
    spent = profile.design.budget
    p_true = None
    if spent is not None and spent.spent_at == "baseline" and direction == "up":
        p_true = budget.significant(_shift(p_site, edge, float(metric.baseline.rate)), 3)
    rate = budget.chart_rate(profile, metric, direction, level)
    rows = []
    for volume in VOLUMES:
        arl0 = budget.significant(budget.arl0_for(volume, rate), 2)
        h = budget.bernoulli_threshold(p_site, odds_ratio, arl0, direction, p_true)
        arl1 = arl_markov(_odds_shift(p_site, odds_ratio), p_site, odds_ratio, h, direction)
        rows.append(BernoulliRow(volume, arl0, h, arl1))
    return rows


@dataclass(frozen=True)
class TimeToEventRow:
    """One volume's row of the time-to-event table."""

    volume: int
    mu: float
    h: float
    arl1_days: float


def time_to_event_rows(profile: Profile, metric_id: str, level: str) -> list[TimeToEventRow]:
    """Return the time-to-event chart's rows for :data:`VOLUMES` (every patient at risk)."""
    metric = profile.metric(metric_id)
    assert metric.detect is not None
    edge = metric.reference("up")
    theta = survival.hazard_ratio_for(edge, metric.detect.odds_ratio)
    rate = budget.chart_rate(profile, metric, "up", level)
    arl0_days = budget.significant(365.25 / rate, 2)
    ratio = 1.0
    spent = profile.design.budget
    if spent is not None and spent.spent_at == "baseline":
        ratio = budget.significant(math.log1p(-float(metric.baseline.rate)) / math.log1p(-edge), 3)
    rows = []
    for volume in VOLUMES:
        mu = budget.significant(volume / PROCEDURES_PER_PATIENT * edge / 365.0, 2)
        h = budget.poisson_threshold(mu, theta, arl0_days, ratio)
        rows.append(TimeToEventRow(volume, mu, h,
                                   budget.poisson_cusum_arl(mu, theta, h, mu * theta)))
    return rows


def markdown(profile: Profile) -> str:
    """Return both tables as the Markdown docs/statistics.md carries."""
    up = bernoulli_rows(profile, "cement_leak", "up", "alarm")
    watch = bernoulli_rows(profile, "cement_leak", "up", "watch")
    down = bernoulli_rows(profile, "cement_leak", "down", "alarm")
    lines = []
    for a, w, d in zip(up, watch, down, strict=True):
        lines.append(
            f"| {a.volume} | {a.arl0:,.0f} -> {a.h:.3f} | {a.arl1:.0f} ({a.arl1_days:,.0f} d) "
            f"| {w.arl0:,.0f} -> {w.h:.3f} | {w.arl1:.0f} ({w.arl1_days:,.0f} d) "
            f"| {d.arl0:,.0f} -> {d.h:.3f} | {d.arl1:.0f} ({d.arl1_days:,.0f} d) |")
    lines.append("")
    alarm = time_to_event_rows(profile, "new_fracture", "alarm")
    tte_watch = time_to_event_rows(profile, "new_fracture", "watch")
    for a, w in zip(alarm, tte_watch, strict=True):
        lines.append(f"| {a.volume} | {a.mu:g} | {a.h:.3f} | {a.arl1_days:,.0f} d "
                     f"| {w.h:.3f} | {w.arl1_days:,.0f} d |")
    return "\n".join(lines)


if __name__ == "__main__":
    from pipelines.settings import Settings

    print(markdown(load_profile(Settings().profile_path)))
