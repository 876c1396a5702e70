"""Which warehouse facts raise an alert, and the life cycle of an alert once raised.

Conditions
----------
Every sync recomputes the set of *active conditions* from the warehouse:

* a site and metric at level ``alarm`` in the newest monitor run of the configured profile
  (``chart_status``; :mod:`pipelines.surveillance.levels`) goes to the safety recipients,
  one at ``under_reporting`` to the data-quality recipients. ``watch`` is never e-mailed
  one by one: the sites at watch make one weekly digest (one per ISO week of ``as_of``);
* a sentinel event (``signal`` of method ``sentinel``) of the last ``backfill_max_age_days``
  is one alert per event (its e-mail names the event type and date, never a patient or
  complication reference), and a process failure (method ``process``) one per site and
  metric, as before;
* a rejected extract (``file_ledger.status = 'rejected'``);
* a loaded extract whose quarantined share of rows is above ``quarantine_share``;
* a site that used to send procedures but has sent none for ``silent_days`` before
  ``as_of`` (default: today by the wall clock, so a whole feed that stops is noticed too;
  a past ``as_of`` replays the rule for that date).

The watchdog (:mod:`pipelines.alerts.watchdog`: no extracts at all, a delivery channel
down) and the failure notifier (:mod:`pipelines.alerts.failures`) raise and clear their
own alerts (keys ``watchdog:...`` and ``failure:...``); sync leaves those alone.

First run and backfill: alarm and under-reporting *episodes that already ended*
(``level_episode.end_date`` set) and sentinel events older than the profile's
``backfill_max_age_days`` before ``as_of`` are not e-mailed one by one: every sync gathers
those not yet covered by an alert or an earlier digest into one digest. A sentinel event
holds its site at alarm for ``hold_days`` (365), longer than it is e-mailed on its own
(90): a site at alarm only because of older events (and without an open sentinel alert)
gets one alert per site and metric, ``level:<profile>:<site>:<metric>:up``, naming the
events and the day the alarm ends; it closes by itself when the site leaves alarm, and its
events are not in the digest. So a site at alarm always has an open alert that says so,
and a first sync of a 4-year registry sends the alarms that are current (one per site and
metric, however many old events) plus at most one digest of what has ended. When that sync
would also send the week's watch digest, the watch list goes in the same summary e-mail
(``payload.watch``), and that week's watch digest is not raised again.

An alert raised while no channel could deliver it (no recipient for its kind or site, or
no SMTP/webhook) has no outbox row; every sync reports it (``SyncResult.no_recipient``,
on stderr from the CLI) and queues it once a channel is configured (``queued_late``).

Each condition has a stable ``dedupe_key``: ``level:<profile>:<site>:<metric>:<direction>``,
``sentinel:<profile>:<signal_key>``, ``signal:<profile>:<site>:<metric>:<direction>``
(process), ``rejected:<checksum>``, ``quarantine:<checksum>``, ``silent:<site_id>``,
``digest:watch:<profile>:<ISO week>``, ``digest:history:<profile>:<as_of>`` (operator and
device keys: :mod:`pipelines.alerts.beyond`). ``<profile>`` is the profile's name, not its
version: a version bump that still finds a condition continues its episode (no second
message; the payload and the audit trail record the new version). Process, operator and
device alerts stored before their key named the profile are read under the old key
(``Condition.legacy_key``), so an upgrade re-sends nothing.

Profile switch: once the monitor has run under the configured profile's name and version,
an open alert of another profile (or, after a version bump, one whose finding the new
version dropped) is closed by ``kyphowatch`` with the reason
``profile htg108 1.2.0 replaced by 1.3.0`` (the engine retired its signals).

A level or silent-site condition that is no longer true *closes its alert automatically*:
the alert becomes ``resolved`` with an audit row by ``kyphowatch`` ("condition cleared").
A level alarm of a metric whose alarm chart the newest run did not chart (a time-to-event
chart "not charted yet") was not judged, not cleared: its alert stays as it is.

Episodes
--------
There is one alert per ``(dedupe_key, episode)``; the alert id is the SHA-256 of both, so a
rerun (or two syncs racing each other) can never create a second copy. A condition that
persists raises nothing new, even after a human resolved its alert. A new episode of the
same key is raised once the alert is resolved and the condition breaches again: it was
seen *cleared* after the alert was raised and is active again, or (for signals) a signal
episode appears that the resolved alert did not cover. Sync records the clear / return it observes
as audit rows by ``kyphowatch`` whose state does not change; those rows are the memory
that tells a re-breach from a persisting breach.

Life cycle
----------
``open -> acknowledged -> resolved`` (``open -> resolved`` is allowed too). Every change,
and the creation itself, is a row in ``alert_audit`` with who, when and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipelines.db import open_warehouse
from pipelines.errors import InputRejected
from pipelines.schema import (
    alert,
    alert_audit,
    alert_outbox,
    chart_status,
    file_ledger,
    level_episode,
    monitor_run,
    procedure,
    signal,
)
from pipelines.settings import Settings

log = logging.getLogger(__name__)

_migrated: set[str] = set()
_migrate_lock = threading.Lock()


def warehouse(settings: Settings) -> sa.Engine:
    """Return an engine for the warehouse, migrating its schema once per process.

    Alert syncs and deliveries run often (every few minutes) and sometimes side by side;
    re-creating the analyst views on every call would be wasted work and, on SQLite, two
    processes re-creating the same view can trip over each other.
    """
    with _migrate_lock:
        first = settings.db_url not in _migrated
        engine = open_warehouse(settings.db_url, migrate=first)
        _migrated.add(settings.db_url)
    return engine

SAFETY = "safety"
DATA_QUALITY = "data_quality"
# Issue 12: an operator's learning curve, confidential to the site's clinical lead; a device,
# product or cement lot (pipelines.alerts.beyond).
TRAINING_REVIEW = "training_review"
DEVICE = "device"
KINDS = (SAFETY, DATA_QUALITY, TRAINING_REVIEW, DEVICE)

OPEN = "open"
ACKNOWLEDGED = "acknowledged"
RESOLVED = "resolved"
STATES = (OPEN, ACKNOWLEDGED, RESOLVED)
TRANSITIONS = {OPEN: {ACKNOWLEDGED, RESOLVED}, ACKNOWLEDGED: {RESOLVED}, RESOLVED: set()}

SYSTEM_ACTOR = "kyphowatch"
CONDITION_CLEARED = "condition cleared"
CONDITION_RETURNED = "condition active again"
# Audit reason of an alert closed because the monitor now runs another profile (or another
# version of it): "profile htg108 1.1.0 replaced by 1.2.0" (profile_replaced_reason).
PROFILE_REPLACED_PATTERN = "profile % replaced by %"

# Signal category -> alert kind. Process signals (e.g. no MDT discussion) are a matter of
# clinical governance, so they go to the safety recipients.
CATEGORY_KIND = {"safety": SAFETY, "process": SAFETY, "under_reporting": DATA_QUALITY}

# A site "used to send" when it had at least this many procedures in the year before the
# silent window; a site that never sent much is not reported as having stopped.
MIN_PRIOR_PROCEDURES = 3
PRIOR_WINDOW_DAYS = 365


@dataclass(frozen=True)
class Condition:
    """One fact that deserves an alert while it is true."""

    kind: str
    dedupe_key: str
    title: str
    payload: dict[str, Any]
    signal_key: str | None = None
    site_id: str | None = None
    metric: str | None = None
    # The key this condition had before the profile became part of it (process alerts):
    # an alert still stored under it is read as this condition's alert, so an upgrade
    # re-sends nothing.
    legacy_key: str | None = None


@dataclass
class SyncResult:
    """What one :func:`sync_alerts` call did."""

    created: list[str] = field(default_factory=list)
    persisting: int = 0
    cleared: int = 0
    returned: int = 0
    absorbed: int = 0  # open alerts that learned of further episodes of their breach
    closed: int = 0  # alerts resolved by the system because their condition cleared
    retired: int = 0  # of those, alerts closed because their profile was replaced
    active_conditions: int = 0
    # open or acknowledged alerts that no channel can deliver (no recipient or no SMTP/webhook
    # configured for their kind and site): (alert_id, kind, site_id, what to set)
    no_recipient: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    # alerts raised earlier without any delivery that a recipient configured since now gets
    queued_late: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly summary."""
        return {
            "no_recipient": [list(item) for item in self.no_recipient],
            "queued_late": list(self.queued_late),
            "created": list(self.created),
            "persisting": self.persisting,
            "cleared": self.cleared,
            "returned": self.returned,
            "absorbed": self.absorbed,
            "closed": self.closed,
            "retired": self.retired,
            "active_conditions": self.active_conditions,
        }


def alert_id_for(dedupe_key: str, episode: int) -> str:
    """Return the deterministic id of episode ``episode`` of ``dedupe_key``."""
    return hashlib.sha256(f"{dedupe_key}\x1f{episode}".encode()).hexdigest()


def _iso(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, datetime):
        return value.date()
    return date.fromisoformat(str(value)[:10])


def where_to_look(settings: Settings, site_id: str | None, page: str | None = None) -> str:
    """Return where a reader finds the report page behind an alert about ``site_id``.

    ``report_base_url`` is where the report directory is served (the Airflow plugin serves
    it at ``<airflow>/kyphowatch/report``); ``latest`` always points at the newest report.
    ``page`` names a network page of the report instead (``devices.html``).
    """
    if page is None:
        page = f"sites/{site_id}.html" if site_id else "index.html"
    page = f"latest/{page}"
    if settings.report_base_url:
        return f"{settings.report_base_url.rstrip('/')}/{page}"
    command = f"kyphowatch site {site_id}" if site_id else "kyphowatch report"
    return f"{Path(settings.report_dir) / page} (or run: {command})"


def where_to_look_confidential(site_id: str) -> str:
    """Return where a site's clinical lead finds its confidential operator page.

    Operator pages are never published with the shared report (docs/report.md), so the
    alert names the command that writes them, not a link everyone could follow.
    """
    return (f"operators/{site_id}.html written by: kyphowatch beyond-report --out DIR "
            "(confidential to the site's clinical lead; not in the shared report)")


_SIGNAL_FIELDS = (
    "signal_key", "site_id", "metric", "method", "direction", "category", "episode_start",
    "signal_date", "observed", "expected", "n", "ci_low", "ci_high", "statistic", "threshold",
    "p_value", "baseline", "citation", "profile_name", "profile_version",
)  # fmt: skip


def _signal_summary(row: sa.RowMapping) -> dict[str, Any]:
    return {name: _iso(row[name]) for name in _SIGNAL_FIELDS}


def _event_types(row: sa.RowMapping) -> dict[str, int]:
    """Return a sentinel signal's event types and counts (``{"death": 1}``): the types only,
    never a complication or patient reference."""
    try:
        detail = json.loads(row["detail"] or "{}")
    except ValueError:
        return {}
    types = detail.get("event_types") if isinstance(detail, dict) else None
    if not isinstance(types, dict):
        return {}
    return {str(k): int(v) for k, v in sorted(types.items()) if isinstance(v, int | float)}


def _signal_conditions(conn: sa.Connection, settings: Settings,
                       profile_name: str) -> list[Condition]:
    """Return the rule-based conditions: one per sentinel event, one per process breach.

    Outcome metrics raise alerts through their level (:func:`_level_conditions`), which
    already combines every method's signals.
    """
    rows = conn.execute(
        sa.select(signal)
        .where(signal.c.active.is_(True), signal.c.profile_name == profile_name,
               signal.c.method.in_(("sentinel", "process")))
        .order_by(signal.c.site_id, signal.c.metric, signal.c.direction,
                  signal.c.episode_start, signal.c.method, signal.c.signal_key)  # fmt: skip
    ).mappings()
    groups: dict[tuple[str, str, str], list[sa.RowMapping]] = {}
    for row in rows:
        if row["method"] == "sentinel":
            # every sentinel event is its own alert: a second death is a second message
            groups[(row["site_id"], row["metric"], row["signal_key"])] = [row]
        else:
            groups.setdefault((row["site_id"], row["metric"], row["direction"]), []).append(row)
    conditions = []
    for (site_id, metric, group_key), members in groups.items():
        direction = members[0]["direction"]
        # The headline describes the most recent evidence (a re-breach must not be reported
        # with the numbers of an episode that was already resolved); the rest are listed.
        primary = max(members, key=lambda m: (m["signal_date"], m["episode_start"],
                                              m["signal_key"]))
        kind = CATEGORY_KIND.get(primary["category"], SAFETY)
        methods = sorted({m["method"] for m in members})
        if any(m["method"] == "sentinel" for m in members):
            what = " and ".join(t.replace("_", " ") for t in _event_types(primary)) or metric
            title = f"Sentinel event at {site_id}: {what} on {_iso(primary['signal_date'])}"
        else:
            label = {"safety": "Safety", "process": "Process"}.get(primary["category"], "Data")
            side = "above" if direction == "up" else "below"
            title = f"{label} signal at {site_id}: {metric} {side} expected ({', '.join(methods)})"
        payload = {
            "type": "signal",
            **_signal_summary(primary),
            "methods": methods,
            "signal_keys": sorted(m["signal_key"] for m in members),
            "signals": [_signal_summary(m) for m in members],
            "where": where_to_look(settings, site_id),
            "episode_key": _episode_key(site_id, metric, direction, "alarm",
                                        primary["episode_start"]),
        }
        sentinel = primary["method"] == "sentinel"
        if sentinel:
            payload["event_types"] = _event_types(primary)
        conditions.append(
            Condition(
                kind=kind,
                dedupe_key=(f"sentinel:{profile_name}:{group_key}" if sentinel
                            else f"signal:{profile_name}:{site_id}:{metric}:{direction}"),
                title=title,
                payload=payload,
                signal_key=primary["signal_key"],
                site_id=site_id,
                metric=metric,
                legacy_key=None if sentinel else f"signal:{site_id}:{metric}:{direction}",
            )
        )
    return conditions


LEVEL_KIND = {"alarm": SAFETY, "under_reporting": DATA_QUALITY}
# Conditions whose alert closes itself once the condition is no longer true (a digest once
# its week or run has passed).
AUTO_CLOSE_PREFIXES = ("level:", "silent:", "digest:")
# Alerts raised and cleared outside sync (watchdog, task failures): not sync's conditions.
EXTERNAL_PREFIXES = ("watchdog:", "failure:")


def _current_profile(settings: Settings):
    from pipelines.surveillance.profile import load_profile

    return load_profile(settings.profile_path)


def _newest_status(conn: sa.Connection, profile_name: str) -> list[sa.RowMapping]:
    """Return the newest monitor run's status rows of ``profile_name`` (empty before a run)."""
    return list(conn.execute(
        sa.select(chart_status).where(chart_status.c.profile_name == profile_name)
        .order_by(chart_status.c.site_id, chart_status.c.metric)
    ).mappings())


def _page(settings: Settings, site_id: str | None) -> str:
    """Return the report page's URL, or its path when no base URL is set (the e-mail adds
    how to get a link, and the command that shows the same)."""
    if settings.report_base_url:
        return where_to_look(settings, site_id)
    page = f"latest/sites/{site_id}.html" if site_id else "latest/index.html"
    return str(Path(settings.report_dir) / page)


def _level_payload(row: sa.RowMapping, profile, settings: Settings) -> dict[str, Any]:
    detail = json.loads(row["level_detail"] or "{}")
    metric = next((m for m in profile.metrics if m.id == row["metric"]), None)
    where = _page(settings, row["site_id"])
    return {
        "type": "level",
        "site_id": row["site_id"],
        "metric": row["metric"],
        "metric_label": metric.label if metric else row["metric"],
        "direction": detail.get("direction") or "up",
        "level": row["status"],
        "since": detail.get("since"),
        "as_of": _iso(_as_date(row["as_of"])),
        "recent": detail.get("recent"),
        "guidance": detail.get("guidance"),
        "agree": detail.get("agree"),
        "methods_total": detail.get("methods_total"),
        "strongest": detail.get("strongest"),
        "evidence": detail.get("evidence") or [],
        "case_mix": detail.get("case_mix"),
        "next_step": detail.get("next_step"),
        "where": where,
        "where_is_url": bool(settings.report_base_url),
        "profile_name": row["profile_name"],
        "profile_version": row["profile_version"],
        "signal_keys": detail.get("signal_keys") or [],
        "episode_key": _episode_key(row["site_id"], row["metric"],
                                    detail.get("direction") or "up", row["status"],
                                    detail.get("since")),
    }


def _episode_key(site: str, metric: str, direction: str, level: str, start: Any) -> str:
    return f"{site}:{metric}:{direction}:{level}:{_iso(start)}"


def _level_conditions(status: list[sa.RowMapping], profile, settings: Settings
                      ) -> list[Condition]:
    """Return one condition per site and metric at alarm or under-reporting."""
    conditions = []
    for row in status:
        kind = LEVEL_KIND.get(row["status"])
        metric = next((m for m in profile.metrics if m.id == row["metric"]), None)
        if kind is None or metric is None or metric.kind != "outcome":
            continue  # sentinel events and process failures have conditions of their own
        payload = _level_payload(row, profile, settings)
        word = "Alarm" if row["status"] == "alarm" else "Under-reporting suspected"
        conditions.append(Condition(
            kind=kind,
            dedupe_key=f"level:{profile.name}:{row['site_id']}:{row['metric']}:"
                       f"{payload['direction']}",
            title=f"{word} at {row['site_id']}: {payload['metric_label']}",
            payload=payload,
            site_id=row["site_id"],
            metric=row["metric"],
        ))
    return conditions


def _watch_digest(status: list[sa.RowMapping], profile, settings: Settings
                  ) -> list[Condition]:
    """Return the weekly digest of sites at watch (one per ISO week of as_of), if any."""
    watch = [r for r in status if r["status"] == "watch"]
    if not watch:
        return []
    as_of = _as_date(watch[0]["as_of"])
    year, week, _ = as_of.isocalendar()
    period = f"{year}-W{week:02d}"
    items = []
    for row in watch:
        detail = json.loads(row["level_detail"] or "{}")
        metric = next((m for m in profile.metrics if m.id == row["metric"]), None)
        items.append({
            "site_id": row["site_id"], "metric": row["metric"],
            "metric_label": metric.label if metric else row["metric"], "level": "watch",
            "since": detail.get("since"), "until": None,
            "rate": (detail.get("recent") or {}).get("rate"), "recent": detail.get("recent"),
            "guidance": detail.get("guidance"), "agree": detail.get("agree"),
            "reason": "by " + ", ".join(e["method_label"] for e in detail.get("evidence") or [])
            if detail.get("evidence") else None,
        })
    return [Condition(
        kind=SAFETY,
        dedupe_key=f"digest:watch:{profile.name}:{period}",
        title=f"Weekly watch list {period}: {len(items)} site-metric(s)",
        payload={"type": "digest", "digest": "watch", "as_of": as_of.isoformat(),
                 "period": period, "items": items, "profile_name": profile.name,
                 "profile_version": profile.version,
                 "where": _page(settings, None),
                 "where_is_url": bool(settings.report_base_url)},
    )]


def _backfill_cutoff(status: list[sa.RowMapping], profile) -> date | None:
    """Return the day before which a sentinel event goes to the history digest."""
    days = [_as_date(r["as_of"]) for r in status if r["as_of"] is not None]
    if not days:
        return None
    return max(days) - timedelta(days=profile.design.backfill_max_age_days)


def _sentinel_guidance(profile, sentinel_metric) -> dict[str, Any]:
    """Return the guidance a sentinel e-mail cites: the major complication rate of the
    profile's outcome metric that counts the same event types (HTG108 2.4.4: about 33 in
    40,000-60,000 procedures), else the sentinel metric's own citation."""
    wanted = set(getattr(sentinel_metric.numerator, "event_types", ()) or ())
    for metric in profile.metrics:
        base = metric.baseline
        types = set(getattr(metric.numerator, "event_types", ()) or ())
        if (metric.kind == "outcome" and wanted and wanted <= types and base.events
                and base.low and base.high):
            low_n = round(base.events / base.high, -3)
            high_n = round(base.events / base.low, -3)
            return {"citation": metric.citation,
                    "text": (f"about {base.events} major complications per "
                             f"{low_n:,.0f}-{high_n:,.0f} procedures"),
                    "metric_label": metric.label}
    return {"citation": sentinel_metric.citation, "text": None, "metric_label": None}


SENTINEL_NEXT_STEP = (
    "Review the case(s) with the clinical team within days: confirm the event and its "
    "coding in the extract, then run a local morbidity and mortality review (technique, "
    "imaging, cement, patient selection) and report device-related events to the MHRA "
    "(Yellow Card)."
)


def sentinel_payload(profile, settings: Settings, site_id: str, metric_id: str,
                     members: list[Condition], as_of: date | None) -> dict[str, Any]:
    """Return what a sentinel e-mail needs: the events (type and date only), the guidance,
    how long the site stays at alarm, a next step. Never a patient or complication reference."""
    metric = next((m for m in profile.metrics if m.id == metric_id), None)
    events = []
    for member in sorted(members, key=lambda c: str(c.payload.get("signal_date"))):
        events.append({"date": member.payload.get("signal_date"),
                       "event_types": dict(member.payload.get("event_types") or {})})
    last = max((_as_date(e["date"]) for e in events if e["date"]), default=None)
    hold = profile.design.hold_days
    guidance = (_sentinel_guidance(profile, metric) if metric is not None
                else {"citation": None, "text": None, "metric_label": None})
    return {
        "type": "sentinel",
        "site_id": site_id,
        "metric": metric_id,
        "metric_label": metric.label if metric else metric_id,
        "events": events,
        "alarm_until": _iso(last + timedelta(days=hold)) if last else None,
        "hold_days": hold,
        "as_of": _iso(as_of),
        "guidance": guidance,
        "next_step": SENTINEL_NEXT_STEP,
        "where": _page(settings, site_id),
        "where_is_url": bool(settings.report_base_url),
        "profile_name": profile.name,
        "profile_version": profile.version,
    }


def _sentinel_alarm_conditions(conn: sa.Connection, status: list[sa.RowMapping], profile,
                               settings: Settings, sentinels: list[Condition]
                               ) -> tuple[list[Condition], frozenset[str]]:
    """Return one alarm per site whose sentinel alarm no current alert tells of, and the
    dedupe keys of the old sentinel events those alarms cover.

    A sentinel event holds its site at alarm for ``hold_days`` (365), but only events of the
    last ``backfill_max_age_days`` (90) are e-mailed one by one. A site at alarm only
    because of older events (a first sync over history; an event whose own alert a human
    resolved) gets one alert per site and metric, keyed like a level alarm, so it closes by
    itself when the site leaves alarm. No such alert while a recent event of the site has
    its own condition or an open or acknowledged sentinel alert of the site and metric.
    """
    cutoff = _backfill_cutoff(status, profile)
    if cutoff is None:
        return [], frozenset()
    kinds = {m.id: m.kind for m in profile.metrics}
    open_sentinel = set(conn.execute(
        sa.select(alert.c.signal_key).where(
            alert.c.dedupe_key.startswith(f"sentinel:{profile.name}:"),
            alert.c.state != RESOLVED)).scalars())
    conditions, covered = [], set()
    for row in status:
        site, metric = row["site_id"], row["metric"]
        if row["status"] != "alarm" or kinds.get(metric) != "sentinel":
            continue
        mine = [c for c in sentinels if (c.site_id, c.metric) == (site, metric)]
        recent = [c for c in mine if (_as_date(c.payload.get("signal_date")) or cutoff) >= cutoff]
        # the events that hold the alarm now (within hold_days); earlier ones ended theirs
        # and stay in the history digest
        held = _as_date(row["as_of"]) - timedelta(days=profile.design.hold_days)
        old = [c for c in mine if c not in recent
               and (_as_date(c.payload.get("signal_date")) or held) >= held]
        if recent or any(c.signal_key in open_sentinel for c in old):
            continue  # an alert that names an event holding the alarm is open already
        payload = sentinel_payload(profile, settings, site, metric, old, _as_date(row["as_of"]))
        payload.update(
            level="alarm",
            signal_keys=sorted(c.signal_key for c in old if c.signal_key),
            # covered from now on: no later history digest lists these events again
            item_keys=sorted({c.payload["episode_key"] for c in old}),
            episode_key=_episode_key(site, metric, "up", "alarm", row["level_since"]),
        )
        what = "; ".join(
            f"{' and '.join(t.replace('_', ' ') for t in e['event_types']) or 'sentinel event'}"
            f" on {e['date']}" for e in payload["events"]) or "sentinel event"
        conditions.append(Condition(
            kind=SAFETY,
            dedupe_key=f"level:{profile.name}:{site}:{metric}:up",
            title=(f"Alarm at {site}: {what}; at alarm until "
                   f"{payload['alarm_until'] or 'the level clears'}"),
            payload=payload, site_id=site, metric=metric,
        ))
        covered.update(c.dedupe_key for c in old)
    return conditions, frozenset(covered)


def _covered_episodes(conn: sa.Connection) -> set[str]:
    """Return the episode keys already e-mailed as an alert or listed in a digest."""
    covered: set[str] = set()
    for (payload,) in conn.execute(
        sa.select(alert.c.payload).where(
            sa.or_(alert.c.dedupe_key.startswith("level:"),
                   alert.c.dedupe_key.startswith("sentinel:"),
                   alert.c.dedupe_key.startswith("digest:history:")))
    ):
        data = json.loads(payload or "{}")
        if data.get("episode_key"):
            covered.add(data["episode_key"])
        covered.update(data.get("item_keys") or ())
    return covered


def _history_digest(conn: sa.Connection, profile, settings: Settings,
                    sentinel: list[Condition], current: frozenset[str] = frozenset()
                    ) -> tuple[list[Condition], set[str]]:
    """Return (the digest of past episodes not yet covered, keys of sentinel events in it).

    Past episodes: alarm and under-reporting episodes that ended, and sentinel events older
    than ``backfill_max_age_days`` before as_of. They are summarised, never e-mailed one by
    one (a first sync of years of history would otherwise flood the inbox). Old sentinel
    events in ``current`` (dedupe keys) keep their site at alarm: the site's sentinel alarm
    alert (:func:`_sentinel_alarm_conditions`) says so, and the digest does not list them.
    """
    rows = list(conn.execute(
        sa.select(level_episode).where(
            level_episode.c.profile_name == profile.name,
            level_episode.c.end_date.isnot(None),
            level_episode.c.level.in_(tuple(LEVEL_KIND)),
        ).order_by(level_episode.c.start_date, level_episode.c.site_id)
    ).mappings())
    as_of = _as_date(conn.scalar(sa.select(sa.func.max(chart_status.c.as_of)).where(
        chart_status.c.profile_name == profile.name)))
    if as_of is None:
        return [], set()
    covered = _covered_episodes(conn)
    labels = {m.id: m.label for m in profile.metrics}
    items, keys, old_sentinels = [], [], set()
    # Each ended upward episode's span and its digest item (None once covered): a sentinel
    # event is an alarm by rule, so its episode is one of these, and is listed once.
    spans: list[tuple[str, str, date, date, dict | None]] = []
    for row in rows:
        key = _episode_key(row["site_id"], row["metric"], row["direction"], row["level"],
                           row["start_date"])
        item = None
        if key not in covered:
            keys.append(key)
            item = {
                "site_id": row["site_id"], "metric": row["metric"],
                "metric_label": labels.get(row["metric"], row["metric"]),
                "level": row["level"], "since": _iso(_as_date(row["start_date"])),
                "until": _iso(_as_date(row["end_date"])), "rate": None, "guidance": None,
                "agree": None, "reason": f"{row['signals']} signal(s); ended",
            }
            items.append(item)
        if row["direction"] == "up":
            spans.append((row["site_id"], row["metric"], _as_date(row["start_date"]),
                          _as_date(row["end_date"]), item))
    cutoff = as_of - timedelta(days=profile.design.backfill_max_age_days)
    for condition in sentinel:
        day = _as_date(condition.payload.get("signal_date"))
        key = condition.payload["episode_key"]
        if day is None or day >= cutoff:
            continue
        old_sentinels.add(condition.dedupe_key)
        if key in covered or condition.dedupe_key in current:
            continue
        if key not in keys:  # the same key as its level episode's when both start that day
            keys.append(key)
        span = next((s for s in spans if s[:2] == (condition.site_id, condition.metric)
                     and s[2] <= day <= s[3]), None)
        if span is not None:  # its episode is listed (or was, in an earlier summary)
            if span[4] is not None:
                span[4]["reason"] += f"; sentinel event {_iso(day)} (reviewed locally?)"
            continue
        items.append({
            "site_id": condition.site_id, "metric": condition.metric,
            "metric_label": labels.get(condition.metric, condition.metric),
            # the alarm a sentinel event makes lasts hold_days; the site is not at alarm
            # now (else it is in ``current``), so the level ended by as_of at the latest
            "level": "alarm", "since": _iso(day),
            "until": _iso(min(day + timedelta(days=profile.design.hold_days), as_of)),
            "rate": None,
            "guidance": None, "agree": None, "reason": "sentinel event (reviewed locally?)",
        })
    if not items:
        return [], old_sentinels
    digest = Condition(
        kind=SAFETY,
        dedupe_key=f"digest:history:{profile.name}:{as_of.isoformat()}",
        title=f"History summary: {len(items)} past episode(s), not e-mailed one by one",
        payload={"type": "digest", "digest": "backfill", "as_of": as_of.isoformat(),
                 "period": None, "items": items, "item_keys": keys,
                 "profile_name": profile.name, "profile_version": profile.version,
                 "where": _page(settings, None),
                 "where_is_url": bool(settings.report_base_url)},
    )
    return [digest], old_sentinels


def _watch_periods_sent_in_history(conn: sa.Connection, profile) -> set[str]:
    """Return the ISO weeks whose watch list went out inside a history summary."""
    periods: set[str] = set()
    for (payload,) in conn.execute(
        sa.select(alert.c.payload).where(
            alert.c.dedupe_key.startswith(f"digest:history:{profile.name}:", autoescape=True))
    ):
        watch = json.loads(payload or "{}").get("watch") or {}
        if watch.get("period"):
            periods.add(watch["period"])
    return periods


def _fold_watch_into_history(conn: sa.Connection, profile, watch: list[Condition],
                             history: list[Condition]
                             ) -> tuple[list[Condition], list[Condition]]:
    """Return (watch digest, history digest) with this week's watch list folded into a new
    history summary when a sync would otherwise send both.

    A first sync of years of data finds past episodes and sites at watch at once: one
    summary e-mail says both (the backfill target is one e-mail beyond the current alarms).
    The folded week's watch digest is not raised later that week: the history alert's
    payload (``watch.period``) records that its list went out.
    """
    if not watch:
        return watch, history
    (digest,) = watch
    period = digest.payload["period"]
    if period in _watch_periods_sent_in_history(conn, profile):
        return [], history
    if not history or conn.scalar(sa.select(sa.func.count()).select_from(alert).where(
            alert.c.dedupe_key.in_((digest.dedupe_key, history[0].dedupe_key)))):
        # Nothing to fold into, this week's list already went out, or the summary is not
        # new (a rerun at the same as_of): it would not be sent again, nor the list in it.
        return watch, history
    (summary,) = history
    count = len(digest.payload["items"])
    folded = replace(
        summary,
        title=(f"{summary.title}; watch list {period}: {count} site-metric(s)")[:255],
        payload={**summary.payload,
                 "watch": {"period": period, "as_of": digest.payload["as_of"],
                           "items": digest.payload["items"]}},
    )
    return [], [folded]


def _ledger_conditions(
    conn: sa.Connection, settings: Settings, quarantine_share: float
) -> list[Condition]:
    conditions = []
    rows = conn.execute(sa.select(file_ledger).order_by(file_ledger.c.source_checksum))
    for row in rows.mappings():
        checksum = row["source_checksum"]
        common = {
            "file_name": row["file_name"],
            "checksum": checksum,
            "file_kind": row["kind"],
            "extract_ts": row["extract_ts"],
            "processed_at": _iso(row["processed_at"]),
            "where": where_to_look(settings, None),
        }
        if row["status"] == "rejected":
            conditions.append(
                Condition(
                    kind=DATA_QUALITY,
                    dedupe_key=f"rejected:{checksum}",
                    title=f"Extract rejected: {row['file_name']}",
                    payload={"type": "rejected_file", "reason": row["reason"], **common},
                )
            )
            continue
        rows_read = row["rows_read"] or 0
        quarantined = row["rows_quarantined"] or 0
        if rows_read and quarantined / rows_read > quarantine_share:
            try:
                reasons = json.loads(row["quarantine_reasons"] or "{}")
            except ValueError:
                reasons = {}
            share = quarantined / rows_read
            conditions.append(
                Condition(
                    kind=DATA_QUALITY,
                    dedupe_key=f"quarantine:{checksum}",
                    title=f"{share:.0%} of rows quarantined in {row['file_name']}",
                    payload={
                        "type": "quarantine_share",
                        "rows_read": rows_read,
                        "rows_quarantined": quarantined,
                        "share": round(share, 4),
                        "threshold": quarantine_share,
                        "quarantine_reasons": reasons,
                        **common,
                    },
                )
            )
    return conditions


def _silent_site_conditions(
    conn: sa.Connection, settings: Settings, as_of: date | None, silent_days: int
) -> list[Condition]:
    if as_of is None:
        # The wall clock, not the newest procedure date: measured against the newest data,
        # a registry whose every feed stopped would never look silent.
        as_of = datetime.now(UTC).date()
    window_start = as_of - timedelta(days=silent_days)
    prior_start = window_start - timedelta(days=PRIOR_WINDOW_DAYS)
    last_date = sa.func.max(procedure.c.procedure_date)
    prior_count = sa.func.sum(
        sa.case((procedure.c.procedure_date > prior_start, 1), else_=0)
    )
    query = (
        sa.select(procedure.c.site_id, last_date.label("last_date"), prior_count.label("prior"))
        .where(procedure.c.procedure_date <= as_of)
        .group_by(procedure.c.site_id)
        .order_by(procedure.c.site_id)
    )
    conditions = []
    for site_id, last, prior in conn.execute(query):
        last = _as_date(last)
        if last > window_start or (prior or 0) < MIN_PRIOR_PROCEDURES:
            continue
        days = (as_of - last).days
        conditions.append(
            Condition(
                kind=DATA_QUALITY,
                dedupe_key=f"silent:{site_id}",
                title=f"Site {site_id} has sent no procedures for {days} days",
                payload={
                    "type": "silent_site",
                    "site_id": site_id,
                    "last_procedure_date": last.isoformat(),
                    "days_silent": days,
                    "silent_days_threshold": silent_days,
                    "as_of": as_of.isoformat(),
                    "where": where_to_look(settings, site_id),
                },
                site_id=site_id,
            )
        )
    return conditions


def collect_conditions(
    conn: sa.Connection,
    settings: Settings,
    as_of: date | None = None,
    *,
    quarantine_share: float | None = None,
    silent_days: int | None = None,
    profile=None,
) -> list[Condition]:
    """Return every alert-worthy condition that is true in the warehouse now.

    Thresholds default to the settings (``alert_quarantine_share``, ``silent_site_days``);
    ``profile`` to the configured one (a caller that holds the parsed profile passes it).
    """
    from pipelines.alerts.beyond import beyond_site_conditions

    if quarantine_share is None:
        quarantine_share = settings.alert_quarantine_share
    if silent_days is None:
        silent_days = settings.silent_site_days
    profile = profile or _current_profile(settings)
    status = _newest_status(conn, profile.name)
    rules = _signal_conditions(conn, settings, profile.name)
    sentinels = [c for c in rules if c.dedupe_key.startswith("sentinel:")]
    sentinel_alarms, current = _sentinel_alarm_conditions(conn, status, profile, settings,
                                                          sentinels)
    history, old_sentinels = _history_digest(conn, profile, settings, sentinels, current)
    as_of_run = max((_as_date(r["as_of"]) for r in status if r["as_of"] is not None),
                    default=None)
    watch, history = _fold_watch_into_history(conn, profile,
                                              _watch_digest(status, profile, settings), history)
    conditions = [
        *_level_conditions(status, profile, settings),
        *sentinel_alarms,
        *[_with_sentinel_words(c, profile, settings, as_of_run) for c in rules
          if c.dedupe_key not in old_sentinels],
        *watch,
        *history,
        *_ledger_conditions(conn, settings, quarantine_share),
        *_silent_site_conditions(conn, settings, as_of, silent_days),
        *beyond_site_conditions(conn, settings, profile, as_of),
    ]
    return sorted(conditions, key=lambda c: c.dedupe_key)


def _with_sentinel_words(condition: Condition, profile, settings: Settings,
                         as_of: date | None) -> Condition:
    """Return a sentinel event's condition with what its e-mail says (event, date, guidance,
    how long the site stays at alarm, next step); other conditions unchanged."""
    if not condition.dedupe_key.startswith("sentinel:"):
        return condition
    words = sentinel_payload(profile, settings, condition.site_id or "",
                             condition.metric or "", [condition], as_of)
    return replace(condition, payload={**condition.payload, **words})


def first_sync_plan(settings: Settings, as_of: date | None = None, *, profile=None
                    ) -> dict[str, Any]:
    """Return what :func:`sync_alerts` would raise now, without writing anything.

    ``alerts``: one entry (dedupe key, kind, title, channels) per condition that has no
    alert yet; on a warehouse whose monitor has run but whose alerts were never synced
    (a first sync, a backfill) that is every condition. ``emails``: the dedupe keys of
    those an e-mail goes out for (a recipient and SMTP configured). Used by
    ``benchmarks/bench_alert_precision.py`` to count the first sync's e-mails.
    """
    engine = warehouse(settings)
    try:
        with engine.connect() as conn:
            conditions = collect_conditions(conn, settings, as_of, profile=profile)
            stored = set(conn.execute(sa.select(alert.c.dedupe_key).distinct()).scalars())
    finally:
        engine.dispose()
    conditions = sorted(conditions, key=lambda c: (_priority(c), c.dedupe_key))
    alerts = [{"dedupe_key": c.dedupe_key, "kind": c.kind, "title": c.title,
               "channels": channels_for(settings, c.kind, c.site_id)}
              for c in conditions if c.dedupe_key not in stored
              and (c.legacy_key is None or c.legacy_key not in stored)]  # fmt: skip
    return {"alerts": alerts,
            "emails": [a["dedupe_key"] for a in alerts if "email" in a["channels"]]}


def recipients_for(settings: Settings, kind: str, site_id: str | None = None) -> tuple[str, ...]:
    """Return the e-mail recipients of an alert of ``kind`` (training reviews: the site's lead)."""
    if kind == TRAINING_REVIEW:
        return settings.clinical_leads.get(site_id or "", ())
    if kind == DEVICE:
        return settings.recipients_device or settings.recipients_safety
    return settings.recipients_safety if kind == SAFETY else settings.recipients_data


def channels_for(settings: Settings, kind: str, site_id: str | None = None) -> list[str]:
    """Return the delivery channels configured for alerts of ``kind``."""
    channels = []
    if settings.smtp_url and recipients_for(settings, kind, site_id):
        channels.append("email")
    # A training review is confidential to the site's lead: never posted to a shared channel.
    if settings.webhook_url and kind != TRAINING_REVIEW:
        channels.append("webhook")
    return channels


def message_id_for(alert_id: str, channel: str) -> str:
    """Return the idempotency key of one alert on one channel (stable across retries)."""
    return f"<{alert_id}.{channel}@kyphowatch>"


def _latest_alerts(conn: sa.Connection) -> dict[str, sa.RowMapping]:
    latest: dict[str, sa.RowMapping] = {}
    for row in conn.execute(sa.select(alert).order_by(alert.c.episode)).mappings():
        latest[row["dedupe_key"]] = row
    return latest


def _condition_markers(conn: sa.Connection) -> dict[str, str]:
    """Return, per alert, the last clear / return observation recorded by sync.

    An alert closed because its profile was replaced counts as cleared: should the old
    profile come back and find the condition again, that is a new episode.
    """
    query = (
        sa.select(alert_audit.c.alert_id, alert_audit.c.reason)
        .where(
            alert_audit.c.actor == SYSTEM_ACTOR,
            sa.or_(alert_audit.c.reason.in_([CONDITION_CLEARED, CONDITION_RETURNED]),
                   alert_audit.c.reason.like(PROFILE_REPLACED_PATTERN)),
        )
        .order_by(alert_audit.c.audit_id)
    )
    return {alert_id: CONDITION_CLEARED if reason.startswith("profile ") else reason
            for alert_id, reason in conn.execute(query)}


def _alert_profile(row: sa.RowMapping) -> tuple[str, str] | None:
    """Return the (name, version) of the profile an alert was last confirmed under, if any.

    Ledger, silent-site, watchdog and failure alerts belong to no profile (None).
    """
    payload = json.loads(row["payload"] or "{}")
    name, version = payload.get("profile_name"), payload.get("profile_version")
    return (str(name), str(version)) if name and version else None


def profile_replaced_reason(old: tuple[str, str], new_name: str, new_version: str) -> str:
    """Return the audit reason of an alert closed because its profile was replaced."""
    successor = new_version if old[0] == new_name else f"{new_name} {new_version}"
    return f"profile {old[0]} {old[1]} replaced by {successor}"


def _alarm_charts_not_charted(conn: sa.Connection, profile) -> set[str]:
    """Return the metrics whose alarm chart the newest monitor run did not chart.

    A time-to-event chart is not charted until the network has followed enough patients
    through the window (the run's summary says why: ``metrics.<id>.tte``; engine ``_tte``).
    The run graded those metrics' sites without their alarm chart, so an alarm it does not
    confirm has not cleared, it was not judged: its alert stays as it is (not closed, no
    "condition cleared" recorded), and the chart's return with the same alarm is the same
    episode, not a second e-mail.
    """
    run_key = conn.execute(sa.select(chart_status.c.run_key)
                           .where(chart_status.c.profile_name == profile.name).limit(1)).scalar()
    summary = conn.execute(sa.select(monitor_run.c.summary)
                           .where(monitor_run.c.run_key == run_key)).scalar()
    metrics = json.loads(summary or "{}").get("metrics") or {}
    return {m.id for m in profile.metrics
            if m.alarm is not None and m.alarm.method == "tte_cusum"
            and isinstance(metrics.get(m.id), dict) and metrics[m.id].get("tte")}


def _monitored_under(conn: sa.Connection, profile) -> bool:
    """Return whether the monitor has run under exactly this profile name and version.

    Until it has, the stored signals and levels are still the old profile's picture, so an
    edited profile file alone retires nothing.
    """
    return conn.execute(
        sa.select(monitor_run.c.run_key).where(
            monitor_run.c.profile_name == profile.name,
            monitor_run.c.profile_version == profile.version).limit(1)
    ).first() is not None


def _note_profile_version(engine: sa.Engine, previous: sa.RowMapping, condition: Condition,
                          now: datetime) -> bool:
    """Record that a persisting alert is now confirmed under a new version of its profile.

    The episode is the same (the key carries the profile's name, not its version), so
    nothing is sent again; the alert's payload and audit trail say which version holds it.
    """
    new_name = condition.payload.get("profile_name")
    new_version = condition.payload.get("profile_version")
    if not new_name or not new_version or (
            json.loads(previous["payload"] or "{}").get("profile_version") == new_version):
        return False  # the usual case: no transaction for it
    with engine.begin() as conn:
        stored = conn.execute(sa.select(alert.c.payload).where(
            alert.c.alert_id == previous["alert_id"])).scalar_one()
        payload = json.loads(stored or "{}")
        old_version = payload.get("profile_version")
        if old_version == new_version:
            return False
        # An operator or device alert from before payloads named the profile gets it now.
        payload.update(profile_name=new_name, profile_version=new_version)
        conn.execute(
            alert.update()
            .where(alert.c.alert_id == previous["alert_id"])
            .values(payload=json.dumps(payload, sort_keys=True, default=str), updated_at=now)
        )
        was = f"(was {old_version})" if old_version else "(recorded from now on)"
        _audit(conn, previous["alert_id"], previous["state"], previous["state"], SYSTEM_ACTOR,
               f"now confirmed under profile {new_name} {new_version} {was}: the same episode",
               now)  # fmt: skip
    return True


def _audit(
    conn: sa.Connection, alert_id: str, from_state: str | None, to_state: str, actor: str,
    reason: str, now: datetime,
) -> None:  # fmt: skip
    conn.execute(
        alert_audit.insert().values(
            alert_id=alert_id, from_state=from_state, to_state=to_state, actor=actor,
            reason=reason, at=now,
        )  # fmt: skip
    )


def _absorb_new_signals(
    engine: sa.Engine, previous: sa.RowMapping, condition: Condition, now: datetime
) -> bool:
    """Record signal episodes that appeared while an alert is open or acknowledged.

    They belong to the same breach, so no new message is sent, but the alert must know
    them: otherwise, once resolved, the next sync would mistake them for a new breach.
    """
    if previous["state"] == RESOLVED:
        return False
    payload = json.loads(previous["payload"])
    covered = set(payload.get("signal_keys") or ())
    added = set(condition.payload.get("signal_keys") or ()) - covered
    if not added:
        return False
    payload["signal_keys"] = sorted(covered | added)
    with engine.begin() as conn:
        conn.execute(
            alert.update()
            .where(alert.c.alert_id == previous["alert_id"])
            .values(payload=json.dumps(payload, sort_keys=True), updated_at=now)
        )
        _audit(conn, previous["alert_id"], previous["state"], previous["state"], SYSTEM_ACTOR,
               f"{len(added)} further signal episode(s) of the same breach", now)  # fmt: skip
    return True


def _create(engine: sa.Engine, settings: Settings, condition: Condition, episode: int,
            now: datetime) -> str | None:  # fmt: skip
    """Insert the alert, its audit row and its outbox rows in one transaction."""
    alert_id = alert_id_for(condition.dedupe_key, episode)
    payload = {"kind": condition.kind, "episode": episode, **condition.payload}
    try:
        with engine.begin() as conn:
            conn.execute(
                alert.insert().values(
                    alert_id=alert_id,
                    kind=condition.kind,
                    dedupe_key=condition.dedupe_key,
                    episode=episode,
                    signal_key=condition.signal_key,
                    site_id=condition.site_id,
                    metric=condition.metric,
                    title=condition.title[:255],
                    payload=json.dumps(payload, sort_keys=True, default=str),
                    state=OPEN,
                    created_at=now,
                    updated_at=now,
                )
            )
            _audit(conn, alert_id, None, OPEN, SYSTEM_ACTOR, f"raised: {condition.title}", now)
            for channel in channels_for(settings, condition.kind, condition.site_id):
                conn.execute(
                    alert_outbox.insert().values(
                        alert_id=alert_id,
                        channel=channel,
                        status="queued",
                        attempts=0,
                        message_id=message_id_for(alert_id, channel),
                    )
                )
    except sa.exc.IntegrityError:
        # Another sync created the same (dedupe_key, episode) first: nothing to do.
        log.info("alert %s already exists", alert_id[:12])
        return None
    return alert_id


def _new_signal_episode(condition: Condition, previous: sa.RowMapping) -> bool:
    """Return whether ``condition`` holds a signal episode the previous alert did not cover."""
    keys = set(condition.payload.get("signal_keys") or ())
    covered = set(json.loads(previous["payload"]).get("signal_keys") or ())
    return bool(keys - covered)


def _priority(condition: Condition) -> int:
    """Return the sending order of a condition's alert: 0 safety, 1 data quality, 2 digest."""
    if condition.dedupe_key.startswith("digest:"):
        return 2
    return 0 if condition.kind == SAFETY else 1


def sync_alerts(
    settings: Settings,
    as_of: date | None = None,
    *,
    quarantine_share: float | None = None,
    silent_days: int | None = None,
) -> SyncResult:
    """Raise alerts for new conditions and record conditions that cleared or came back."""
    engine = warehouse(settings)
    now = datetime.now(UTC)
    result = SyncResult()
    profile = _current_profile(settings)
    try:
        with engine.connect() as conn:
            conditions = collect_conditions(
                conn, settings, as_of, quarantine_share=quarantine_share, silent_days=silent_days
            )
            latest = _latest_alerts(conn)
            markers = _condition_markers(conn)
            monitored = _monitored_under(conn, profile)
            not_charted = _alarm_charts_not_charted(conn, profile)
            active_signals = set(conn.execute(
                sa.select(signal.c.signal_key).where(signal.c.active)).scalars())
        result.active_conditions = len(conditions)
        for kind in KINDS:
            mine = [c for c in conditions if c.kind == kind]
            if mine and not any(channels_for(settings, kind, c.site_id) for c in mine):
                log.warning("no delivery channel configured for %s alerts", kind)
        active_keys = set()
        adopted = set()  # legacy keys read as the alert of a condition's current key
        # Alarms first, then data quality, then digests: the outbox sends in creation order,
        # so the e-mail a safety lead must read arrives before the summaries.
        conditions = sorted(conditions, key=lambda c: (_priority(c), c.dedupe_key))
        for position, condition in enumerate(conditions):
            active_keys.add(condition.dedupe_key)
            previous = latest.get(condition.dedupe_key)
            legacy = latest.get(condition.legacy_key) if condition.legacy_key else None
            if previous is None and legacy is not None and (
                    (_alert_profile(legacy) or (condition.payload.get("profile_name"),))[0]
                    == condition.payload.get("profile_name")):
                # stored before the key carried the profile (and, for operator and device
                # alerts, before the payload named one): the same condition's alert
                previous = legacy
                adopted.add(condition.legacy_key)
            cleared = previous is not None and markers.get(previous["alert_id"]) == CONDITION_CLEARED
            rebreach = previous is not None and previous["state"] == RESOLVED and (
                cleared or _new_signal_episode(condition, previous)
            )
            if previous is None or rebreach:
                episode = 1 if previous is None else previous["episode"] + 1
                created = _create(engine, settings, condition, episode,
                                  now + timedelta(microseconds=position))
                if created:
                    result.created.append(created)
                    log.info("raised %s alert %s: %s", condition.kind, created[:12], condition.title)
            elif cleared:
                with engine.begin() as conn:
                    _audit(conn, previous["alert_id"], previous["state"], previous["state"],
                           SYSTEM_ACTOR, CONDITION_RETURNED, now)  # fmt: skip
                result.returned += 1
            else:
                if _absorb_new_signals(engine, previous, condition, now):
                    result.absorbed += 1
                _note_profile_version(engine, previous, condition, now)
                result.persisting += 1
        for key, previous in latest.items():
            if (key in active_keys or key in adopted or key.startswith(EXTERNAL_PREFIXES)
                    or markers.get(previous["alert_id"]) == CONDITION_CLEARED):
                continue
            owner = _alert_profile(previous)
            if (key.startswith(f"level:{profile.name}:") and key.endswith(":up")
                    and previous["metric"] in not_charted
                    and owner in (None, (profile.name, profile.version))):
                continue  # the newest run did not chart its alarm chart: not judged
            # The monitor now runs another profile and no longer confirms this alert's
            # condition: it was the old profile's, so it closes whatever its kind. After a
            # version bump of the same profile, only where the new version dropped the
            # finding (its signal retired, or a level or digest that cleared): a sentinel
            # event that merely aged into the history digest stays with its reader.
            replaced = (monitored and owner is not None
                        and owner != (profile.name, profile.version)
                        and (owner[0] != profile.name or key.startswith(AUTO_CLOSE_PREFIXES)
                             or (previous["signal_key"] is not None
                                 and previous["signal_key"] not in active_signals)))
            closes = ((key.startswith(AUTO_CLOSE_PREFIXES) or replaced)
                      and previous["state"] != RESOLVED)
            reason = (profile_replaced_reason(owner, profile.name, profile.version)
                      if replaced and owner is not None else CONDITION_CLEARED)
            with engine.begin() as conn:
                if closes:
                    # resolved by the system: the condition is no longer true
                    changed = conn.execute(
                        alert.update()
                        .where(alert.c.alert_id == previous["alert_id"],
                               alert.c.state == previous["state"])
                        .values(state=RESOLVED, updated_at=now)
                    ).rowcount
                    closes = changed == 1
                _audit(conn, previous["alert_id"], previous["state"],
                       RESOLVED if closes else previous["state"], SYSTEM_ACTOR,
                       reason, now)  # fmt: skip
            result.cleared += 1
            result.closed += int(closes)
            result.retired += int(closes and replaced)
        _route_undelivered(engine, settings, now, result)
    finally:
        engine.dispose()
    for alert_id, kind, site_id, hint in result.no_recipient:
        log.warning("alert %s (%s%s) has no recipient: %s", alert_id[:12], kind,
                    f", {site_id}" if site_id else "", hint)  # fmt: skip
    return result


def missing_recipient_hint(settings: Settings, kind: str, site_id: str | None) -> str:
    """Return what to configure so that an alert of ``kind`` about ``site_id`` is delivered."""
    wants = []
    if not recipients_for(settings, kind, site_id):
        wants.append({
            TRAINING_REVIEW: f"KYPHOWATCH_CLINICAL_LEADS={site_id or 'SITE'}=lead@example.org",
            DEVICE: "KYPHOWATCH_ALERT_RECIPIENTS_DEVICE (or _SAFETY)",
            SAFETY: "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY",
        }.get(kind, "KYPHOWATCH_ALERT_RECIPIENTS_DATA"))
    if not settings.smtp_url:
        wants.append("KYPHOWATCH_SMTP_URL")
    return (f"set {' and '.join(wants)}; the next alerts sync queues it "
            "(or: kyphowatch alerts requeue ID --channel email)")


def _route_undelivered(engine: sa.Engine, settings: Settings, now: datetime,
                       result: SyncResult) -> None:
    """Queue the alerts that were raised with no delivery at all, once a channel can take
    them; report those that still have none (``result.no_recipient``).

    An alert raised while its kind had no recipient (a training review before the site's
    clinical lead was configured) has no outbox row, so the delivery run never sees it.
    Watchdog and failure alerts pick their channels themselves and are left alone.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(alert.c.alert_id, alert.c.kind, alert.c.site_id, alert.c.state,
                      alert.c.dedupe_key)
            .where(alert.c.state != RESOLVED,
                   ~sa.exists().where(alert_outbox.c.alert_id == alert.c.alert_id))
            .order_by(alert.c.created_at, alert.c.alert_id)
        ).mappings().all()
    for row in rows:
        if row["dedupe_key"].startswith(EXTERNAL_PREFIXES):
            continue
        channels = channels_for(settings, row["kind"], row["site_id"])
        if not channels:
            result.no_recipient.append((row["alert_id"], row["kind"], row["site_id"],
                                        missing_recipient_hint(settings, row["kind"],
                                                               row["site_id"])))
            continue
        try:
            with engine.begin() as conn:
                for channel in channels:
                    conn.execute(alert_outbox.insert().values(
                        alert_id=row["alert_id"], channel=channel, status="queued",
                        attempts=0, message_id=message_id_for(row["alert_id"], channel)))
                _audit(conn, row["alert_id"], row["state"], row["state"], SYSTEM_ACTOR,
                       f"queued for delivery ({', '.join(channels)}): a recipient is "
                       "configured now", now)  # fmt: skip
        except sa.exc.IntegrityError:
            continue  # another sync or a requeue queued it first
        result.queued_late.append(row["alert_id"])


# --- reading and changing alerts ---------------------------------------------------


def find_alert(conn: sa.Connection, id_or_prefix: str) -> sa.RowMapping:
    """Return the alert whose id is ``id_or_prefix`` or starts with it (unique prefix)."""
    prefix = (id_or_prefix or "").strip().lower()
    if not prefix or any(ch not in "0123456789abcdef" for ch in prefix):
        raise InputRejected(f"not an alert id: {id_or_prefix!r} (expected hex digits)")
    rows = (
        conn.execute(sa.select(alert).where(alert.c.alert_id.startswith(prefix)).limit(2))
        .mappings()
        .all()
    )
    if not rows:
        raise InputRejected(f"no alert with id {id_or_prefix!r}")
    if len(rows) > 1:
        raise InputRejected(f"alert id prefix {id_or_prefix!r} is ambiguous; give more digits")
    return rows[0]


def list_alerts(
    settings: Settings, *, state: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Return alerts (newest first) with their delivery status per channel."""
    if state is not None and state not in STATES:
        raise InputRejected(f"unknown state {state!r}; choose from {', '.join(STATES)}")
    if kind is not None and kind not in KINDS:
        raise InputRejected(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    engine = warehouse(settings)
    try:
        with engine.connect() as conn:
            query = sa.select(alert).order_by(alert.c.created_at.desc(), alert.c.alert_id)
            if state:
                query = query.where(alert.c.state == state)
            if kind:
                query = query.where(alert.c.kind == kind)
            alerts = [dict(row) for row in conn.execute(query).mappings()]
            deliveries: dict[str, dict[str, str]] = {}
            for row in conn.execute(sa.select(alert_outbox)).mappings():
                deliveries.setdefault(row["alert_id"], {})[row["channel"]] = row["status"]
    finally:
        engine.dispose()
    for item in alerts:
        item["delivery"] = deliveries.get(item["alert_id"], {})
    return alerts


def alert_detail(settings: Settings, id_or_prefix: str) -> dict[str, Any]:
    """Return one alert with its payload, audit trail and outbox rows."""
    engine = warehouse(settings)
    try:
        with engine.connect() as conn:
            row = dict(find_alert(conn, id_or_prefix))
            alert_id = row["alert_id"]
            row["payload"] = json.loads(row["payload"])
            row["audit"] = [
                dict(r)
                for r in conn.execute(
                    sa.select(alert_audit)
                    .where(alert_audit.c.alert_id == alert_id)
                    .order_by(alert_audit.c.audit_id)
                ).mappings()
            ]
            row["outbox"] = [
                dict(r)
                for r in conn.execute(
                    sa.select(alert_outbox)
                    .where(alert_outbox.c.alert_id == alert_id)
                    .order_by(alert_outbox.c.channel)
                ).mappings()
            ]
    finally:
        engine.dispose()
    return row


def _transition(settings: Settings, id_or_prefix: str, to_state: str, actor: str,
                reason: str) -> dict[str, Any]:  # fmt: skip
    actor = (actor or "").strip()
    reason = (reason or "").strip()
    if not actor:
        raise InputRejected("say who you are (--by NAME)")
    if not reason:
        raise InputRejected("give a reason (--reason TEXT)")
    engine = warehouse(settings)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            row = find_alert(conn, id_or_prefix)
            from_state = row["state"]
            if to_state not in TRANSITIONS[from_state]:
                raise InputRejected(
                    f"alert {row['alert_id'][:12]} is {from_state}; it cannot become {to_state}"
                )
            changed = conn.execute(
                alert.update()
                .where(alert.c.alert_id == row["alert_id"], alert.c.state == from_state)
                .values(state=to_state, updated_at=now)
            ).rowcount
            if changed != 1:
                raise InputRejected(
                    f"alert {row['alert_id'][:12]} was changed by someone else; look again"
                )
            _audit(conn, row["alert_id"], from_state, to_state, actor, reason, now)
    finally:
        engine.dispose()
    log.info("alert %s: %s -> %s by %s", row["alert_id"][:12], from_state, to_state, actor)
    return {"alert_id": row["alert_id"], "from_state": from_state, "to_state": to_state}


def acknowledge(settings: Settings, id_or_prefix: str, *, by: str, reason: str) -> dict[str, Any]:
    """Mark an open alert as acknowledged by ``by`` for ``reason``."""
    return _transition(settings, id_or_prefix, ACKNOWLEDGED, by, reason)


def resolve(settings: Settings, id_or_prefix: str, *, by: str, reason: str) -> dict[str, Any]:
    """Mark an open or acknowledged alert as resolved by ``by`` for ``reason``."""
    return _transition(settings, id_or_prefix, RESOLVED, by, reason)
