"""Guidance profile loading and validation: clear messages with the key path."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from pipelines.errors import ConfigError
from pipelines.settings import REPO_DIR
from pipelines.surveillance.profile import ProfileError, load_profile, parse_profile

BUNDLED = REPO_DIR / "profiles" / "htg108.yaml"


def _bundled_data() -> dict:
    return yaml.safe_load(BUNDLED.read_text(encoding="utf-8"))


def test_bundled_profile_carries_the_htg108_baselines():
    profile = load_profile(BUNDLED)
    assert profile.name == "htg108"
    assert profile.source_url.startswith("https://")
    leak = profile.metric("cement_leak")
    assert leak.baseline.rate == pytest.approx(38 / 360)
    assert (leak.baseline.low, leak.baseline.high) == (0.07, 0.11)
    assert leak.citation == "NICE HTG108 section 2.4.1"
    assert leak.window_days == 30 and leak.denominator == "procedure"
    assert leak.detect.directions == ("up", "down")
    assert leak.category_for("down") == "under_reporting"
    assert profile.metric("symptomatic_cement_leak").baseline.rate == pytest.approx(1 / 360)
    fracture = profile.metric("new_fracture")
    assert fracture.baseline.rate == pytest.approx(26 / 115)
    assert fracture.denominator == "patient" and fracture.window_days == 365
    assert set(fracture.numerator.event_types) == {"new_fracture", "adjacent_fracture"}
    major = profile.metric("major_event")
    assert major.baseline.rate == pytest.approx(33 / 50_000)
    assert set(major.numerator.severities) == {"major", "fatal"}
    assert set(profile.metric("sentinel_event").numerator.event_types) == {
        "death", "paralysis", "cord_compression"}
    assert profile.metric("mdt_discussion").kind == "process"
    assert profile.metric("mdt_discussion").citation.endswith("section 1.2")


def test_arl0_matches_the_stated_false_alarm_design():
    profile = load_profile(BUNDLED)
    design = profile.design
    derived = design.typical_annual_volume / -math.log1p(-design.annual_false_alarm_probability)
    # The profile rounds the derived value; stay within 5 % of it.
    assert abs(design.arl0 - derived) / derived < 0.05


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["metrics"][0]["baseline"].pop("section"), "metrics[0].baseline.section: is required"),
        (lambda d: d["metrics"][0]["numerator"].update(event_types=["cement_leek"]),
         "metrics[0].numerator.event_types[0]: 'cement_leek' is not one of"),
        (lambda d: d["metrics"][2]["baseline"].update(range=[0.3, 0.4]),
         "metrics[2].baseline.range"),
        (lambda d: d["metrics"][0].update(colour="red"), "metrics[0]: unknown key(s) colour"),
        (lambda d: d["metrics"][1].update(methods=["bernoulli_cusum", "sentinel"]),
         "metrics[1].methods[1]: 'sentinel' is not one of"),
        (lambda d: d["metrics"][0]["detect"].update(odds_ratio=0.5), "metrics[0].detect.odds_ratio"),
        (lambda d: d["metrics"][0]["baseline"].update(rate=0.2),
         "metrics[0].baseline.rate: 0.2 disagrees with events/total = 38/360"),
        (lambda d: d["source"].update(url="www.nice.org.uk"), "source.url"),
        (lambda d: d["metrics"].append(copy.deepcopy(d["metrics"][0])), "duplicate metric id"),
        (lambda d: d.pop("version"), "version: is required"),
        (lambda d: d["design"]["risk_model"].update(refit="nightly"),
         "design.risk_model.refit: 'nightly' is not one of every_run, quarterly"),
    ],
)
def test_mistakes_are_reported_with_their_key_path(mutate, expected):
    data = _bundled_data()
    mutate(data)
    with pytest.raises(ProfileError) as caught:
        parse_profile(data, origin="htg108.yaml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith("profile htg108.yaml: ")
    assert isinstance(caught.value, ConfigError)


def test_unreadable_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmetrics: [\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(broken)


SECOND_PROFILE = """
name: local_vertebroplasty
version: "0.1"
source:
  citation: Local audit 2024
  url: https://example.org/audit
design:
  typical_annual_volume: 50
  annual_false_alarm_probability: 0.1
metrics:
  - id: leak
    label: Leak (local baseline)
    kind: outcome
    numerator: {event_types: [cement_leak]}
    denominator: procedure
    window_days: 14
    baseline: {rate: 0.2, section: "3.1"}
    detect: {odds_ratio: 3, directions: [up]}
    methods: [bernoulli_cusum, funnel]
"""


def test_a_second_profile_needs_no_code(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text(SECOND_PROFILE, encoding="utf-8")
    profile = load_profile(path)
    assert profile.name == "local_vertebroplasty"
    leak = profile.metric("leak")
    assert leak.citation == "Local audit 2024 section 3.1"
    assert leak.window_days == 14 and leak.detect.odds_ratio == 3
    # ARL0 derived from the design when not stated: 50 / -ln(0.9)
    assert profile.design.arl0 == round(50 / -math.log(0.9))
    with pytest.raises(ProfileError, match="unknown metric 'cement_leak'"):
        profile.metric("cement_leak")


def test_the_bundled_profile_refits_the_case_mix_model_quarterly_and_older_ones_every_run():
    data = _bundled_data()
    assert parse_profile(data, origin="htg108.yaml").design.risk_refit == "quarterly"
    data["design"]["risk_model"].pop("refit")
    assert parse_profile(data, origin="htg108.yaml").design.risk_refit == "every_run"
