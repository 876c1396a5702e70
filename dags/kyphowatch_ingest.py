"""Load extract files from the landing directory into the warehouse.

Runs when the landing watcher sees settled files (within seconds of a drop) and, as a
safety net, every night at 02:00 UTC. Each run picks up the complete files, loads them with
``pipelines.ingest``, archives loaded/duplicate files under ``archive/<date>/`` and moves
rejected ones to ``rejected/`` with a ``.reason.txt``. The warehouse Assets are updated --
and so ``kyphowatch_monitor`` starts -- only when a file actually loaded.

Safe to rerun: ingest is idempotent and already-archived files are just removed from landing.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from kyphowatch_assets import COMPLICATIONS, LANDING, PROCEDURES

default_args = {"owner": "kyphowatch", "retries": 2, "retry_delay": timedelta(minutes=1)}


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
        """Archive loaded files, move rejected ones aside; return the kinds that loaded."""
        from kyphowatch_config import landing_dirs

        from pipelines.landing import file_away as move
        from pipelines.landing import loaded_kinds

        dirs = landing_dirs()
        move(report["files"], dirs.archive, dirs.rejected)
        return loaded_kinds(report["files"])

    @task(outlets=[PROCEDURES])
    def announce_procedures(kinds: list[str]) -> None:
        """Mark the procedures Asset updated when procedures loaded, else skip."""
        from airflow.sdk.exceptions import AirflowSkipException

        if "procedures" not in kinds:
            raise AirflowSkipException("no procedure file changed the warehouse")

    @task(outlets=[COMPLICATIONS])
    def announce_complications(kinds: list[str]) -> None:
        """Mark the complications Asset updated when complications loaded, else skip."""
        from airflow.sdk.exceptions import AirflowSkipException

        if "complications" not in kinds:
            raise AirflowSkipException("no complication file changed the warehouse")

    kinds = file_away(ingest_landing())
    announce_procedures(kinds)
    announce_complications(kinds)


kyphowatch_ingest()
