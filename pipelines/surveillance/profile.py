"""Guidance profiles: which metrics are monitored, against which baselines, by which methods.

A profile is a versioned YAML file (``profiles/htg108.yaml`` is the bundled one). Keeping
baselines, outcome windows, detection targets and method choices in data means a second
procedure, or local baselines agreed by a site, is a new file rather than a code change.
Every mistake is reported as a :class:`ProfileError` naming the file and the key path
(``metrics[2].baseline.range``), because a profile is configuration an analyst edits by hand.
The schema is documented in ``docs/profile.md``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.contract import EVENT_TYPES, SEVERITIES
from pipelines.errors import ConfigError

KINDS = ("outcome", "sentinel", "process")
CATEGORIES = ("safety", "under_reporting", "process")
DENOMINATORS = ("procedure", "patient")
DIRECTIONS = ("up", "down")
METHODS_BY_KIND = {
    "outcome": ("bernoulli_cusum", "ra_cusum", "tte_cusum", "funnel", "pchart", "rare"),
    "sentinel": ("sentinel",),
    "process": ("process",),
}
PROCESS_FIELDS = ("mdt_discussed", "steroid_use")
# Methods that can carry a metric's alarm: sequential charts whose threshold is derived per
# site from the false-alarm budget, or the rolling exact test whose alpha is.
ALARM_METHODS = ("bernoulli_cusum", "ra_cusum", "tte_cusum", "rare")
# Category of a downward signal: fewer events than the baseline most often means missing reports.
DOWN_CATEGORY = "under_reporting"
_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ProfileError(ConfigError):
    """The guidance profile is missing or invalid; the message names the key path."""


@dataclass(frozen=True)
class Numerator:
    """Which complication rows count as an event: type, severity and symptomatic filters."""

    event_types: tuple[str, ...]
    severities: tuple[str, ...] = SEVERITIES
    symptomatic: bool | None = None


@dataclass(frozen=True)
class Baseline:
    """The in-control rate from the guidance, its plausible range and where it comes from."""

    rate: float
    section: str
    low: float | None = None
    high: float | None = None
    events: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class Detect:
    """What to detect: the odds-ratio shift, the directions charted and the in-control ARL."""

    odds_ratio: float
    directions: tuple[str, ...]
    arl0: float


@dataclass(frozen=True)
class Alarm:
    """Which chart decides a metric's alarm level, and its share of the safety budget."""

    method: str
    share: float


BUDGET_SPENT_AT = ("baseline", "range_edge")


@dataclass(frozen=True)
class Budget:
    """The false alarms the safety team accepts, for a site performing within the guidance.

    ``safety_per_100_site_years`` is the network target for false *alarm* e-mails; each
    metric's alarm chart receives ``alarm.share`` of it. ``under_reporting_per_100_site_years``
    is split equally over the downward charts, ``watch_per_site_year`` is per alarm chart.

    ``spent_at`` says for which in-control site an upward chart's false alarms are counted:
    ``baseline`` (a site at the guidance's pooled rate, the profile's ``baseline``; the
    network the guidance describes) or ``range_edge`` (a site at the top of the range: the
    worst in-control case, which leaves part of the budget unspent for a network at the
    pooled rate). Upward charts test against the range edge either way; downward charts
    are always counted at the bottom edge, so a site inside the range is not flagged for
    under-reporting.
    """

    safety_per_100_site_years: float
    under_reporting_per_100_site_years: float
    watch_per_site_year: float
    spent_at: str = "range_edge"


@dataclass(frozen=True)
class Metric:
    """One monitored metric of a profile."""

    id: str
    label: str
    kind: str
    category: str
    denominator: str
    baseline: Baseline
    methods: tuple[str, ...]
    citation: str
    numerator: Numerator | None = None
    window_days: int | None = None
    detect: Detect | None = None
    process_field: str | None = None
    process_failure_value: bool = False
    alarm: Alarm | None = None

    def reference(self, direction: str) -> float:
        """Return the rate a chart in ``direction`` tests against (the guidance range's edge).

        Where the guidance gives a range, it is an indifference zone: upward charts test
        against its top, under-reporting charts against its bottom; a point baseline is used
        as it is.
        """
        if direction == "up" and self.baseline.high is not None:
            return self.baseline.high
        if direction == "down" and self.baseline.low is not None:
            return self.baseline.low
        return self.baseline.rate

    def category_for(self, direction: str) -> str:
        """Return the signal category for a chart direction (down means under-reporting)."""
        return DOWN_CATEGORY if direction == "down" and self.kind == "outcome" else self.category


RISK_REFIT_SCHEDULES = ("every_run", "quarterly")


@dataclass(frozen=True)
class Design:
    """Profile-wide design choices shared by all metrics."""

    arl0: float
    typical_annual_volume: int
    annual_false_alarm_probability: float
    funnel_limit: float = 0.998
    funnel_fdr_q: float = 0.05
    funnel_rolling_days: int = 365
    pchart_limit: float = 0.998
    rare_alpha: float = 0.001
    rare_rolling_days: int = 365
    risk_min_events: int = 50
    # "every_run": the case-mix model is fitted on every mature unit up to as_of (profiles
    # before htg108 1.4.0); "quarterly": on the units known before as_of's calendar quarter
    # began, so every run of a quarter uses one model and one RA-CUSUM case mix (stored).
    risk_refit: str = "every_run"
    budget: Budget | None = None
    hold_days: int = 365
    watch_hold_days: int = 90
    backfill_max_age_days: int = 90
    watch_min_methods: int = 2


@dataclass(frozen=True)
class Profile:
    """A validated guidance profile."""

    name: str
    version: str
    title: str
    citation: str
    source_title: str
    source_url: str
    design: Design
    metrics: tuple[Metric, ...]
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def metric(self, metric_id: str) -> Metric:
        """Return the metric called ``metric_id`` or raise a ProfileError listing the known ones."""
        for metric in self.metrics:
            if metric.id == metric_id:
                return metric
        known = ", ".join(m.id for m in self.metrics)
        raise ProfileError(f"profile {self.name}: unknown metric {metric_id!r} (known: {known})")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (name, version, source and metric ids)."""
        return {
            "name": self.name,
            "version": self.version,
            "source": {"citation": self.citation, "url": self.source_url},
            "metrics": [m.id for m in self.metrics],
        }


class _Reader:
    """Walk a parsed YAML document and raise errors that carry the file and key path."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, path: str, message: str) -> ProfileError:
        return ProfileError(f"profile {self.origin}: {path}: {message}")

    def mapping(self, value: Any, path: str, *, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise self.fail(
                path, f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
            )
        return value

    def required(self, data: dict[str, Any], key: str, path: str) -> Any:
        if key not in data or data[key] is None:
            raise self.fail(f"{path}.{key}" if path else key, "is required")
        return data[key]

    def text(self, value: Any, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(path, "must be a string")
        text = str(value).strip()
        if not text:
            raise self.fail(path, "must not be empty")
        if pattern is not None and not pattern.match(text):
            raise self.fail(path, f"{text!r} does not match {pattern.pattern}")
        return text

    def number(
        self, value: Any, path: str, *, low: float, high: float, low_open: bool = False
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(path, f"must be a number, got {value!r}")
        number = float(value)
        if number < low or number > high or (low_open and number == low):
            bracket = "(" if low_open else "["
            raise self.fail(path, f"{number:g} is outside {bracket}{low:g}, {high:g}]")
        return number

    def integer(self, value: Any, path: str, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise self.fail(path, f"{value} is outside [{low}, {high}]")
        return value

    def choices(self, value: Any, path: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(path, "must be a non-empty list")
        out: list[str] = []
        for index, item in enumerate(value):
            if item not in allowed:
                raise self.fail(f"{path}[{index}]", f"{item!r} is not one of {', '.join(allowed)}")
            if item not in out:
                out.append(item)
        return tuple(out)

    def choice(self, value: Any, path: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(path, f"{value!r} is not one of {', '.join(allowed)}")
        return value


# beyond_site (operators, devices, the regulator) is read by pipelines.surveillance.beyond.
_TOP_KEYS = {"name", "version", "title", "source", "design", "metrics", "beyond_site"}
_METRIC_KEYS = {
    "id",
    "label",
    "kind",
    "category",
    "numerator",
    "denominator",
    "window_days",
    "baseline",
    "detect",
    "methods",
    "process",
    "alarm",
}


def _design(reader: _Reader, data: Any) -> Design:
    data = reader.mapping(
        data or {},
        "design",
        allowed={
            "arl0",
            "typical_annual_volume",
            "annual_false_alarm_probability",
            "funnel",
            "pchart",
            "rare",
            "risk_model",
            "false_alarm_budget",
            "levels",
        },
    )
    volume = reader.integer(
        data.get("typical_annual_volume", 100), "design.typical_annual_volume", low=1, high=10**6
    )
    probability = reader.number(
        data.get("annual_false_alarm_probability", 0.05),
        "design.annual_false_alarm_probability",
        low=0.0,
        high=0.5,
        low_open=True,
    )
    if "arl0" in data:
        arl0 = reader.number(data["arl0"], "design.arl0", low=10, high=10**7)
    else:
        # ARL0 for a geometric run length with P(alarm within one year) = probability.
        arl0 = round(volume / -math.log1p(-probability))
    funnel = reader.mapping(
        data.get("funnel") or {}, "design.funnel", allowed={"limit", "fdr_q", "rolling_days"}
    )
    pchart = reader.mapping(data.get("pchart") or {}, "design.pchart", allowed={"limit"})
    rare = reader.mapping(data.get("rare") or {}, "design.rare", allowed={"alpha", "rolling_days"})
    risk = reader.mapping(data.get("risk_model") or {}, "design.risk_model", allowed={"min_events", "refit"})
    budget = None
    if data.get("false_alarm_budget") is not None:
        raw = reader.mapping(
            data["false_alarm_budget"], "design.false_alarm_budget",
            allowed={"safety_per_100_site_years", "under_reporting_per_100_site_years",
                     "watch_per_site_year", "spent_at"},
        )
        where = "design.false_alarm_budget"
        budget = Budget(
            safety_per_100_site_years=reader.number(
                reader.required(raw, "safety_per_100_site_years", where),
                f"{where}.safety_per_100_site_years", low=0.0, high=100.0, low_open=True),
            under_reporting_per_100_site_years=reader.number(
                raw.get("under_reporting_per_100_site_years", 2.0),
                f"{where}.under_reporting_per_100_site_years", low=0.0, high=100.0,
                low_open=True),
            watch_per_site_year=reader.number(
                raw.get("watch_per_site_year", 0.2), f"{where}.watch_per_site_year",
                low=0.0, high=10.0, low_open=True),
            spent_at=reader.choice(raw.get("spent_at", "range_edge"), f"{where}.spent_at",
                                   BUDGET_SPENT_AT),
        )
    levels = reader.mapping(
        data.get("levels") or {}, "design.levels",
        allowed={"hold_days", "watch_hold_days", "backfill_max_age_days",
                 "watch_min_methods"},
    )
    return Design(
        arl0=arl0,
        typical_annual_volume=volume,
        annual_false_alarm_probability=probability,
        funnel_limit=reader.number(
            funnel.get("limit", 0.998), "design.funnel.limit", low=0.5, high=0.999999
        ),
        funnel_fdr_q=reader.number(
            funnel.get("fdr_q", 0.05), "design.funnel.fdr_q", low=0.0, high=0.5, low_open=True
        ),
        funnel_rolling_days=reader.integer(
            funnel.get("rolling_days", 365), "design.funnel.rolling_days", low=28, high=3660
        ),
        pchart_limit=reader.number(
            pchart.get("limit", 0.998), "design.pchart.limit", low=0.5, high=0.999999
        ),
        rare_alpha=reader.number(
            rare.get("alpha", 0.001), "design.rare.alpha", low=0.0, high=0.5, low_open=True
        ),
        rare_rolling_days=reader.integer(
            rare.get("rolling_days", 365), "design.rare.rolling_days", low=28, high=3660
        ),
        risk_min_events=reader.integer(
            risk.get("min_events", 50), "design.risk_model.min_events", low=1, high=10**6
        ),
        risk_refit=reader.choice(
            risk.get("refit", "every_run"), "design.risk_model.refit", RISK_REFIT_SCHEDULES
        ),
        budget=budget,
        hold_days=reader.integer(
            levels.get("hold_days", 365), "design.levels.hold_days", low=1, high=3660
        ),
        watch_hold_days=reader.integer(
            levels.get("watch_hold_days", 90), "design.levels.watch_hold_days", low=1,
            high=3660,
        ),
        backfill_max_age_days=reader.integer(
            levels.get("backfill_max_age_days", 90), "design.levels.backfill_max_age_days",
            low=0, high=3660,
        ),
        watch_min_methods=reader.integer(
            levels.get("watch_min_methods", 2), "design.levels.watch_min_methods", low=1,
            high=10,
        ),
    )


def _baseline(reader: _Reader, data: Any, path: str) -> Baseline:
    data = reader.mapping(data, path, allowed={"rate", "events", "total", "range", "section"})
    section = reader.text(reader.required(data, "section", path), f"{path}.section")
    events = total = None
    if "events" in data or "total" in data:
        total = reader.integer(
            reader.required(data, "total", path), f"{path}.total", low=1, high=10**9
        )
        events = reader.integer(
            reader.required(data, "events", path), f"{path}.events", low=0, high=total
        )
    if "rate" in data:
        rate = reader.number(data["rate"], f"{path}.rate", low=0.0, high=1.0)
        if events is not None and abs(rate - events / total) > 5e-4:
            raise reader.fail(
                f"{path}.rate", f"{rate:g} disagrees with events/total = {events}/{total}"
            )
    elif events is not None:
        rate = events / total
    else:
        raise reader.fail(path, "needs either rate or events and total")
    low = high = None
    if "range" in data:
        bounds = data["range"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise reader.fail(f"{path}.range", "must be a list [low, high]")
        low = reader.number(bounds[0], f"{path}.range[0]", low=0.0, high=1.0)
        high = reader.number(bounds[1], f"{path}.range[1]", low=0.0, high=1.0)
        # Allow for the rounding of a published range such as 0.07-0.11 around 38/360.
        if not low <= high or not low - 5e-3 <= rate <= high + 5e-3:
            raise reader.fail(
                f"{path}.range",
                f"[{low:g}, {high:g}] must be ordered and contain the rate {rate:.4g}",
            )
    return Baseline(rate=rate, section=section, low=low, high=high, events=events, total=total)


def _numerator(reader: _Reader, data: Any, path: str) -> Numerator:
    data = reader.mapping(data, path, allowed={"event_types", "severities", "symptomatic"})
    event_types = reader.choices(
        reader.required(data, "event_types", path), f"{path}.event_types", EVENT_TYPES
    )
    severities = SEVERITIES
    if data.get("severities") is not None:
        severities = reader.choices(data["severities"], f"{path}.severities", SEVERITIES)
    symptomatic = data.get("symptomatic")
    if symptomatic is not None and not isinstance(symptomatic, bool):
        raise reader.fail(f"{path}.symptomatic", "must be true, false or null (any)")
    return Numerator(event_types=event_types, severities=severities, symptomatic=symptomatic)


def _metric(reader: _Reader, data: Any, path: str, design: Design, citation: str) -> Metric:
    data = reader.mapping(data, path, allowed=_METRIC_KEYS)
    metric_id = reader.text(reader.required(data, "id", path), f"{path}.id", _ID_RE)
    label = reader.text(data.get("label", metric_id), f"{path}.label")
    kind = reader.choice(reader.required(data, "kind", path), f"{path}.kind", KINDS)
    category = reader.choice(data.get("category", "safety"), f"{path}.category", CATEGORIES)
    denominator = reader.choice(
        data.get("denominator", "procedure"), f"{path}.denominator", DENOMINATORS
    )
    baseline = _baseline(reader, reader.required(data, "baseline", path), f"{path}.baseline")
    methods = reader.choices(
        reader.required(data, "methods", path), f"{path}.methods", METHODS_BY_KIND[kind]
    )
    numerator = window_days = detect = process_field = None
    failure_value = False
    if kind in ("outcome", "sentinel"):
        numerator = _numerator(
            reader, reader.required(data, "numerator", path), f"{path}.numerator"
        )
    if kind == "outcome":
        window_days = reader.integer(
            reader.required(data, "window_days", path), f"{path}.window_days", low=0, high=3660
        )
        if baseline.rate <= 0.0 or baseline.rate >= 1.0:
            raise reader.fail(f"{path}.baseline.rate", "an outcome baseline must be inside (0, 1)")
        detect_data = reader.mapping(
            data.get("detect") or {}, f"{path}.detect", allowed={"odds_ratio", "directions", "arl0"}
        )
        odds_ratio = reader.number(
            detect_data.get("odds_ratio", 2.0),
            f"{path}.detect.odds_ratio",
            low=1.0,
            high=100.0,
            low_open=True,
        )
        directions = reader.choices(
            detect_data.get("directions", ["up"]), f"{path}.detect.directions", DIRECTIONS
        )
        arl0 = design.arl0
        if "arl0" in detect_data:
            arl0 = reader.number(detect_data["arl0"], f"{path}.detect.arl0", low=10, high=10**7)
        detect = Detect(odds_ratio=odds_ratio, directions=directions, arl0=arl0)
        if "tte_cusum" in methods and not window_days:
            raise reader.fail(f"{path}.methods", "tte_cusum needs a follow-up window_days > 0")
    elif kind == "sentinel":
        if data.get("window_days") is not None:
            window_days = reader.integer(
                data["window_days"], f"{path}.window_days", low=0, high=3660
            )
    else:
        process = reader.mapping(
            reader.required(data, "process", path),
            f"{path}.process",
            allowed={"field", "failure_value"},
        )
        process_field = reader.choice(
            reader.required(process, "field", f"{path}.process"),
            f"{path}.process.field",
            PROCESS_FIELDS,
        )
        failure_value = process.get("failure_value", False)
        if not isinstance(failure_value, bool):
            raise reader.fail(f"{path}.process.failure_value", "must be true or false")
    for key in ("detect", "window_days") if kind == "process" else ():
        if data.get(key) is not None:
            raise reader.fail(f"{path}.{key}", f"is not used by a {kind} metric")
    alarm = None
    if data.get("alarm") is not None:
        if kind != "outcome":
            raise reader.fail(f"{path}.alarm", f"is not used by a {kind} metric (it alarms on "
                              "every event or failure)")
        raw = reader.mapping(data["alarm"], f"{path}.alarm", allowed={"method", "share"})
        method = reader.choice(reader.required(raw, "method", f"{path}.alarm"),
                               f"{path}.alarm.method", ALARM_METHODS)
        if method not in methods:
            raise reader.fail(f"{path}.alarm.method", f"{method!r} is not in the metric's methods")
        alarm = Alarm(method=method, share=reader.number(
            reader.required(raw, "share", f"{path}.alarm"), f"{path}.alarm.share", low=0.0,
            high=1.0, low_open=True))
    return Metric(
        id=metric_id,
        label=label,
        kind=kind,
        category=category,
        denominator=denominator,
        baseline=baseline,
        methods=methods,
        citation=f"{citation} section {baseline.section}",
        numerator=numerator,
        window_days=window_days,
        detect=detect,
        process_field=process_field,
        process_failure_value=failure_value,
        alarm=alarm,
    )


def parse_profile(data: Any, origin: str = "<profile>", path: Path | None = None) -> Profile:
    """Validate a parsed profile document and return the :class:`Profile`."""
    reader = _Reader(origin)
    data = reader.mapping(data, "(top level)", allowed=_TOP_KEYS)
    name = reader.text(reader.required(data, "name", ""), "name", _NAME_RE)
    version = reader.text(reader.required(data, "version", ""), "version", _NAME_RE)
    source = reader.mapping(
        reader.required(data, "source", ""), "source", allowed={"citation", "title", "url"}
    )
    citation = reader.text(reader.required(source, "citation", "source"), "source.citation")
    url = reader.text(reader.required(source, "url", "source"), "source.url")
    if not url.startswith(("https://", "http://")):
        raise reader.fail("source.url", f"{url!r} must be an http(s) URL")
    design = _design(reader, data.get("design"))
    raw_metrics = reader.required(data, "metrics", "")
    if not isinstance(raw_metrics, list) or not raw_metrics:
        raise reader.fail("metrics", "must be a non-empty list")
    metrics: list[Metric] = []
    for index, item in enumerate(raw_metrics):
        metric = _metric(reader, item, f"metrics[{index}]", design, citation)
        if any(existing.id == metric.id for existing in metrics):
            raise reader.fail(f"metrics[{index}].id", f"duplicate metric id {metric.id!r}")
        metrics.append(metric)
    shares = sum(m.alarm.share for m in metrics if m.alarm is not None)
    if design.budget is not None and shares > 1.0 + 1e-9:
        raise reader.fail("metrics", f"alarm shares add up to {shares:g}; they may not exceed 1 "
                          "(each is a share of design.false_alarm_budget)")
    if design.budget is not None and not any(m.alarm for m in metrics):
        raise reader.fail("design.false_alarm_budget", "no metric has an alarm chart to spend it")
    return Profile(
        name=name,
        version=version,
        title=reader.text(data.get("title", name), "title"),
        citation=citation,
        source_title=reader.text(source.get("title", citation), "source.title"),
        source_url=url,
        design=design,
        metrics=tuple(metrics),
        path=path,
        raw=data,
    )


# libyaml's safe loader when PyYAML was built with it: the same documents as SafeLoader
# (the constructors are shared; tests/test_drilldown.py compares both on every bundled
# profile), and it reads the bundled profile in 2 ms instead of 30, which every drill-down
# command pays.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_profile(path: Path | str) -> Profile:
    """Read and validate the profile YAML at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"profile {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"profile {path}: not valid YAML{where}") from exc
    return parse_profile(data, origin=path.name, path=path)
