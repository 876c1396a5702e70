"""Run kyphowatch DAGs in-process with ``dag.test()`` -- for the demo and the DAG tests.

Not a DAG (listed in ``.airflowignore``). Usage, with ``AIRFLOW_HOME`` pointing at a migrated
metadata database and the ``KYPHOWATCH_*`` environment set::

    python dags/kyphowatch_testrun.py kyphowatch_ingest kyphowatch_monitor kyphowatch_alerts

Prints one JSON line per DAG run (state and task states), then one with the number of
network evaluations the runs performed, and exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DAGS_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    """Run each named DAG once, in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dag_ids", nargs="+")
    parser.add_argument("--conf", default="{}", help="JSON params for every run")
    parser.add_argument("--no-retries", action="store_true",
                        help="fail on the first error (dag.test() would wait out retry_delay)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(DAGS_DIR), str(DAGS_DIR.parent)]

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    if bag.import_errors:
        print(json.dumps({"import_errors": bag.import_errors}), flush=True)
        return 1
    ok = True
    for dag_id in args.dag_ids:
        dag = bag.get_dag(dag_id)
        if args.no_retries:
            for task in dag.tasks:
                task.retries = 0
        run = dag.test(run_conf=json.loads(args.conf))
        tasks = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        state = str(run.state)
        ok = ok and state == "success"
        print(json.dumps({"dag_id": dag_id, "state": state, "tasks": tasks}), flush=True)
    # How many network evaluations these runs performed (the stored run is read, not redone).
    engine = sys.modules.get("pipelines.surveillance.engine")
    evaluations = engine.evaluations_in_this_process() if engine else 0
    print(json.dumps({"evaluations": evaluations}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
