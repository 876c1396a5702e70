"""Load extract files from the landing directory into the warehouse.

Runs when the landing watcher sees settled files (within seconds of a drop) and, as a
safety net, every night at 02:00 UTC. Each run picks up the complete files, loads them with
``pipelines.ingest``, archives loaded/duplicate files under ``archive/<date>/`` and moves
rejected ones to ``rejected/`` with a ``.reason.txt``. The warehouse Assets are updated --
and so ``kyphowatch_monitor`` starts -- when the warehouse holds loaded rows that no monitor
run has seen yet (``pipelines.landing.unmonitored_kinds``), whichever try loaded them: a try
killed after loading is healed by its retry, which finds only duplicates but still announces.

Data-quality alerts (a rejected file, a high quarantine share) are raised and delivered by
the last task, ``data_quality_alerts``, seconds after the files were filed away, not at the
next 15-minute alerts run. A task that fails for good is reported once per failure episode
(``kyphowatch_notify``).

Safe to rerun: ingest is idempotent and already-archived files are just removed from landing.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from kyphowatch_assets import COMPLICATIONS, LANDING, PROCEDURES
from kyphowatch_notify import NOTIFY_ARGS

default_args = {"owner": "kyphowatch", "retries": 2, "retry_delay": timedelta(minutes=1),
                **NOTIFY_ARGS}


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"), assets=LANDING
    ),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["kyphowatch", "ingest"],
    doc_md=__doc__,
)
def kyphowatch_ingest():
    @task
    def ingest_landing() -> dict:
        """Load the settled landing files; return the ingest report."""
        from kyphowatch_config import build_settings, landing_dirs

        from pipelines.landing import ingest_landing as ingest

        dirs = landing_dirs()
        return ingest(build_settings(), dirs.landing, min_age_seconds=dirs.min_age_seconds).to_dict()

    @task
    def file_away(report: dict) -> list[str]:
        """Archive loaded files, move rejected ones aside; return the kinds to announce."""
        from kyphowatch_config import build_settings, landing_dirs

        from pipelines.landing import file_away as move
        from pipelines.landing import unmonitored_kinds

        dirs = landing_dirs()
        move(report["files"], dirs.archive, dirs.rejected)
        return unmonitored_kinds(build_settings())

    @task(outlets=[PROCEDURES])
    def announce_procedures(kinds: list[str]) -> None:
        """Mark the procedures Asset updated when procedures loaded, else skip."""
        from airflow.sdk.exceptions import AirflowSkipException

        if "procedures" not in kinds:
            raise AirflowSkipException("no procedure rows that the monitor has not seen")

    @task(outlets=[COMPLICATIONS])
    def announce_complications(kinds: list[str]) -> None:
        """Mark the complications Asset updated when complications loaded, else skip."""
        from airflow.sdk.exceptions import AirflowSkipException

        if "complications" not in kinds:
            raise AirflowSkipException("no complication rows that the monitor has not seen")

    @task
    def data_quality_alerts(report: dict) -> dict:
        """Raise alerts for this run's rejected or heavily quarantined files; deliver them now."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not any(f.get("status") in ("rejected", "loaded") for f in report["files"]):
            raise AirflowSkipException("no file was processed: nothing new to check")
        from kyphowatch_config import build_settings

        from pipelines.alerts import deliver_outbox, sync_alerts

        settings = build_settings()
        synced = sync_alerts(settings)
        # A channel that is down is not this DAG's failure: the alerts run retries the
        # outbox every 15 minutes, and the watchdog reports a long outage.
        delivered = deliver_outbox(settings)
        return {"sync": synced.to_dict(), "delivery": delivered.to_dict()}

    report = ingest_landing()
    kinds = file_away(report)
    announce_procedures(kinds)
    announce_complications(kinds)
    kinds >> data_quality_alerts(report)


kyphowatch_ingest()
