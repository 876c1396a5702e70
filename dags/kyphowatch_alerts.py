"""Raise alerts for new signals and data-quality facts, then deliver them.

Runs when the monitor updates the signals Asset and every 15 minutes, so deliveries that
failed (mail server or webhook down) are retried without waiting for new data. Alerts are
de-duplicated by key and episode and delivered through a transactional outbox: each alert
reaches each channel once, with a stable Message-ID / Idempotency-Key (docs/operations.md).
The ``as_of`` param (YYYY-MM-DD) fixes the date for the "site stopped sending" rule
(default: today by the wall clock).

Order: sync, then the watchdog (no extracts for ``KYPHOWATCH_HEARTBEAT_HOURS``, a delivery
channel down for ``KYPHOWATCH_CHANNEL_OUTAGE_MINUTES``: ``pipelines.alerts.watchdog``), then
-- when the sync raised alerts or attached new episodes to open ones -- the evidence report is
published again, and only then is the outbox delivered. An e-mail therefore never links to a
page that does not exist yet, and the page it links to lists the alert.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from kyphowatch_assets import SIGNALS
from kyphowatch_notify import NOTIFY_ARGS

default_args = {"owner": "kyphowatch", "retries": 2, "retry_delay": timedelta(minutes=1),
                **NOTIFY_ARGS}


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/15 * * * *", timezone="UTC"), assets=SIGNALS
    ),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params={"as_of": Param("", type="string", description="YYYY-MM-DD; empty = newest data")},
    tags=["kyphowatch", "alerts"],
    doc_md=__doc__,
)
def kyphowatch_alerts():
    @task
    def sync_alerts(params: dict | None = None) -> dict:
        """Create alerts (and their outbox rows) for conditions not alerted yet."""
        from datetime import date

        from kyphowatch_config import build_settings

        from pipelines.alerts import sync_alerts as sync

        as_of = date.fromisoformat(params["as_of"]) if params and params.get("as_of") else None
        return sync(build_settings(), as_of).to_dict()

    @task
    def watchdog() -> dict:
        """Raise or clear the heartbeat and channel-outage alerts (by the wall clock)."""
        from kyphowatch_config import build_settings

        from pipelines.alerts.watchdog import run_watchdog

        return run_watchdog(build_settings()).to_dict()

    @task(trigger_rule="none_failed")
    def deliver_outbox() -> dict:
        """Send queued alert messages; fail (and retry) if some could not be sent."""
        from kyphowatch_config import build_settings

        from pipelines.alerts import deliver_outbox as deliver

        result = deliver(build_settings())
        result.raise_if_retrying()
        return result.to_dict()

    @task
    def refresh_report(summary: dict) -> str:
        """Republish the newest report when this sync raised or extended alerts."""
        if not (summary.get("created") or summary.get("absorbed")):
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("no new alerts: the published report is current")
        from kyphowatch_config import build_settings

        from pipelines.report import publish_report

        return str(publish_report(build_settings()))

    synced = sync_alerts()
    refreshed = refresh_report(synced)
    synced >> watchdog() >> refreshed >> deliver_outbox()


kyphowatch_alerts()
