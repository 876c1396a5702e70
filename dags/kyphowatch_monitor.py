"""Recompute the surveillance charts and tests and store the signals they raise.

Runs whenever the warehouse Assets change (``kyphowatch_ingest`` loaded something). The
monitor is deterministic for a given ``as_of`` and warehouse content, so a rerun gives the
same signals. ``as_of`` comes from the ``as_of`` param (YYYY-MM-DD, to rerun for a past
date); when empty the engine uses the newest procedure date in the warehouse. The run's
data interval is not used: for an asset-triggered run it is the time the event arrived,
not a date the data describes, and would make reruns depend on the wall clock.

After the signals are stored, the HTML evidence report for the same ``as_of`` is published
to ``<report dir>/<as_of>/`` and ``<report dir>/latest`` is repointed to it when it is the
newest; the ``kyphowatch_report`` plugin serves it in the Airflow UI, and alerts link to it.

Last, the stored parts of monitor runs dated more than ``KYPHOWATCH_RUN_KEEP_DAYS`` (default
90; 0 keeps everything) before the newest stored run are pruned (``kyphowatch runs prune``;
each run's record stays). A run for a past ``as_of`` (a backfill) prunes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task
from kyphowatch_assets import COMPLICATIONS, PROCEDURES, SIGNALS
from kyphowatch_notify import NOTIFY_ARGS

default_args = {"owner": "kyphowatch", "retries": 2, "retry_delay": timedelta(minutes=1),
                **NOTIFY_ARGS}


@dag(
    schedule=(PROCEDURES | COMPLICATIONS),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params={"as_of": Param("", type="string", description="YYYY-MM-DD; empty = newest data")},
    tags=["kyphowatch", "surveillance"],
    doc_md=__doc__,
)
def kyphowatch_monitor():
    @task(outlets=[SIGNALS])
    def run_monitor(params: dict | None = None) -> dict:
        """Run the monitor for ``as_of`` and store its signals; return the run summary."""
        from datetime import date

        from kyphowatch_config import build_settings

        from pipelines.surveillance.engine import run_monitor as monitor

        as_of = date.fromisoformat(params["as_of"]) if params and params.get("as_of") else None
        result = monitor(build_settings(), as_of)
        as_of_text = result.as_of.isoformat() if result.as_of else None
        return {"run_key": result.run_key, "as_of": as_of_text,
                "signals": len(result.signals), "new_signal_keys": result.new_signal_keys}

    @task
    def write_report(summary: dict) -> str:
        """Publish the HTML evidence report for the same ``as_of``; return its index path."""
        from datetime import date

        from kyphowatch_config import build_settings

        from pipelines.report import publish_report

        if summary["as_of"] in (None, "None"):  # no procedures yet (only complications landed)
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("no procedures in the warehouse yet: nothing to report")
        return str(publish_report(build_settings(), date.fromisoformat(summary["as_of"])))

    @task
    def prune_runs(summary: dict, params: dict | None = None) -> dict | None:
        """Delete the stored parts of runs older than the retention window; return the counts."""
        from dataclasses import asdict

        from kyphowatch_config import build_settings

        from pipelines.surveillance.retention import prune_by_settings

        if params and params.get("as_of"):  # the window is measured from the newest run
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("a run for a past as_of prunes nothing")
        counts = prune_by_settings(build_settings())
        return None if counts is None else {**asdict(counts), "cutoff": str(counts.cutoff),
                                            "oldest_kept": str(counts.oldest_kept)}

    summary = run_monitor()
    write_report(summary) >> prune_runs(summary)


kyphowatch_monitor()
