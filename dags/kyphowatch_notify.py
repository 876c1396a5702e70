"""Airflow notifiers that tell people when a kyphowatch task fails, and when it recovers.

Every DAG sets them through ``default_args`` (:data:`NOTIFY_ARGS`), so each task carries
``on_failure_callback=KyphowatchFailureNotifier()`` and
``on_success_callback=KyphowatchRecoveryNotifier()``. Task callbacks run where the task ran
(the worker), with the same connections and environment as the task. The logic -- one alert
per failure episode through the alerts outbox to the data-quality recipients, resolved by the
task's next success -- lives in :mod:`pipelines.alerts.failures`; these classes only read the
Airflow context. Nothing heavy is imported at parse time.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseNotifier


class KyphowatchFailureNotifier(BaseNotifier):
    """Report a task that failed for good (after its retries) to the data-quality recipients."""

    def notify(self, context: Any) -> None:
        """Raise the failure alert (once per episode) and deliver it."""
        from kyphowatch_config import build_settings

        from pipelines.alerts.failures import TaskFailure, report_failure

        ti = context["ti"]
        failure = TaskFailure(
            dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
            try_number=int(getattr(ti, "try_number", 0) or 0),
            error=_error_text(context.get("exception")),
            log_url=getattr(ti, "log_url", None),
        )  # fmt: skip
        outcome = report_failure(build_settings(), failure)
        self.log.info("failure notice for %s.%s: %s", ti.dag_id, ti.task_id, outcome)


class KyphowatchRecoveryNotifier(BaseNotifier):
    """Close the open failure alert of a task that has just succeeded."""

    def notify(self, context: Any) -> None:
        """Resolve the task's failure episode, if one is open."""
        from kyphowatch_config import build_settings

        from pipelines.alerts.failures import report_recovery

        ti = context["ti"]
        if report_recovery(build_settings(), ti.dag_id, ti.task_id):
            self.log.info("%s.%s recovered: failure alert resolved", ti.dag_id, ti.task_id)


def _error_text(exception: Any) -> str | None:
    if exception is None:
        return None
    from pipelines.alerts.failures import summarise_error

    return summarise_error(exception)


# Merged into each DAG's default_args.
NOTIFY_ARGS = {
    "on_failure_callback": KyphowatchFailureNotifier(),
    "on_success_callback": KyphowatchRecoveryNotifier(),
}
