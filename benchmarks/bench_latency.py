"""Latency benchmark: landing to alert e-mail on a real Airflow stack, at the default settings.

Why: issue 13 asks that a dropped extract becomes a safety e-mail within 60 s with the
documented default settings (settle 30 s, poll 10 s, re-announce 120 s; Airflow's own
scheduler and triggerer settings as the deployment leaves them). The end-to-end test runs
the same stack with 2 s / 1 s settle/poll to stay short, so it does not answer that.

What runs: :mod:`pipelines.airflow_stack` -- ``scheduler`` (LocalExecutor),
``dag-processor``, ``triggerer`` and ``api-server`` on a fresh PostgreSQL metadata database,
a fresh PostgreSQL warehouse and the SMTP sink, exactly as ``tests/test_airflow_e2e.py``
starts them. Simulated extracts (3 sites, 2023-01..09, one site with a cement-leak drift)
are dropped into landing (copy, then rename); the clock stops when the drifting site's
safety e-mail is in the sink. The breakdown comes from the metadata database: the landing
Asset event (the watcher fired), each DAG run's queue/start/end and each task's start/end,
as offsets from the moment the files landed.

Run: ``.venv/bin/python benchmarks/bench_latency.py`` (about 3 minutes, most of it start-up).
``--set NAME=VALUE`` overrides one setting (repeatable) to measure a variant. Needs the
local PostgreSQL (``KYPHOWATCH_TEST_PG_URL``); without it prints SKIP and exits 0. Exits 1
when the stack fails or no e-mail arrives within the deadline; a missed target is MISS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.airflow_stack import (  # noqa: E402
    AirflowStack,
    airflow_env,
    create_database,
    drop_database,
    drop_files,
    wait_for_port,
)
from pipelines.mailsink import MailSink, free_port  # noqa: E402
from pipelines.settings import Settings  # noqa: E402
from pipelines.simulate import simulate  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "KYPHOWATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TARGET_SECONDS = 60.0
EMAIL_DEADLINE_SECONDS = 420
DRIFT_SITE = "S002"

# every Asset event, DAG run and task instance of the chain, as epoch seconds
ASSET_EVENTS = sa.text(
    "select a.name, extract(epoch from e.timestamp) from asset_event e "
    "join asset a on a.id = e.asset_id order by e.timestamp"
)
DAG_RUNS = sa.text(
    "select dag_id, run_type, extract(epoch from queued_at), extract(epoch from start_date), "
    "extract(epoch from end_date), state from dag_run order by queued_at"
)
TASKS = sa.text(
    "select ti.dag_id, ti.task_id, extract(epoch from ti.queued_dttm), "
    "extract(epoch from ti.start_date), extract(epoch from ti.end_date), ti.state "
    "from task_instance ti join dag_run r on r.dag_id = ti.dag_id and r.run_id = ti.run_id "
    "order by ti.start_date nulls last"
)


def _drift_email_seen(sink: MailSink) -> bool:
    return any(DRIFT_SITE in m["Subject"] and "cement leak" in m["Subject"].lower()
               for m in sink.messages())  # fmt: skip


def _offset(value, landed: float) -> str:
    return "-" if value is None else f"{float(value) - landed:+7.1f}"


def _print_breakdown(meta: sa.Engine, landed: float) -> None:
    """Print the chain's Asset events, DAG runs and tasks as offsets from landing."""
    with meta.connect() as conn:
        events = conn.execute(ASSET_EVENTS).all()
        runs = conn.execute(DAG_RUNS).all()
        tasks = conn.execute(TASKS).all()
    print("\nbreakdown (seconds after the files landed):")
    for name, stamp in events:
        if float(stamp) >= landed - 1:
            print(f"  {_offset(stamp, landed)}  asset event   {name}")
    for dag_id, run_type, queued, started, ended, state in runs:
        if queued is not None and float(queued) >= landed - 1:
            print(f"  {_offset(queued, landed)}  run queued    {dag_id} ({run_type}); "
                  f"started {_offset(started, landed).strip()}, "
                  f"ended {_offset(ended, landed).strip()} ({state})")  # fmt: skip
    busy = 0.0
    for dag_id, task_id, queued, started, ended, state in tasks:
        if started is None or float(started) < landed - 1:
            continue
        took = float(ended) - float(started) if ended is not None else None
        busy += took or 0.0
        wait = float(started) - float(queued) if queued is not None else None
        print(f"  {_offset(started, landed)}  task          {dag_id}.{task_id}: "
              f"queued->start {wait if wait is None else round(wait, 1)} s, "
              f"ran {took if took is None else round(took, 1)} s ({state})")  # fmt: skip
    print(f"  task run time in total: {busy:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Run the stack, drop the extracts, time the e-mail; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one environment setting (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        admin = sa.create_engine(PG_ADMIN_URL)
        with admin.connect():
            pass
        admin.dispose()
    except sa.exc.OperationalError as exc:
        print(f"SKIP: no PostgreSQL at {PG_ADMIN_URL} for the Airflow metadata: {exc.orig}")
        return 0

    defaults = Settings()
    with tempfile.TemporaryDirectory(prefix="kw_latency_") as tmp_name:
        root = Path(tmp_name)
        extracts, landing, logs = root / "extracts", root / "landing", root / "logs"
        landing.mkdir()
        logs.mkdir()
        simulate(extracts, sites=3, start=date(2023, 1, 1), end=date(2023, 9, 30), seed=11,
                 drifts=[f"{DRIFT_SITE}:cement_leak:4.0:2023-03-01"])  # fmt: skip
        files = sorted(extracts.glob("*.csv"))
        meta_name, meta_url = create_database(PG_ADMIN_URL, "kw_bench_airflow")
        wh_name, wh_url = create_database(PG_ADMIN_URL, "kw_bench_wh")
        meta_url = meta_url.replace("postgresql://", "postgresql+psycopg://", 1)
        api_port = free_port()
        sink = MailSink(root / "mail").start()
        env = airflow_env(root=root, meta_url=meta_url, warehouse_url=wh_url, landing=landing,
                          smtp_host=sink.host, smtp_port=sink.port, api_port=api_port,
                          overrides=overrides)  # fmt: skip
        stack = AirflowStack(env, logs)
        meta = sa.create_engine(meta_url)
        load = os.getloadavg()
        print(f"settings: settle {env.get('KYPHOWATCH_LANDING_MIN_AGE_SECONDS', defaults.landing_min_age_seconds)} s, "
              f"poll {env.get('KYPHOWATCH_LANDING_POLL_SECONDS', defaults.landing_poll_seconds)} s, "
              f"overrides {overrides or 'none'}; {os.cpu_count()} CPUs, "
              f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)", flush=True)  # fmt: skip
        code = 1
        try:
            started = time.monotonic()
            stack.migrate()
            stack.start()
            if not wait_for_port(api_port, time.monotonic() + 120):
                raise RuntimeError("api-server did not listen within 120 s")
            if not stack.wait_until_watching(meta, time.monotonic() + 240):
                raise RuntimeError("the landing watcher never started in the triggerer")
            print(f"stack up and watching after {time.monotonic() - started:.0f} s", flush=True)
            time.sleep(2)
            landed = drop_files(files, landing)
            arrived = None
            deadline = time.monotonic() + EMAIL_DEADLINE_SECONDS
            while time.monotonic() < deadline:
                stack.check_alive()
                if _drift_email_seen(sink):
                    arrived = time.time()
                    break
                time.sleep(0.25)
            if arrived is None:
                print(f"FAILED: no alert e-mail within {EMAIL_DEADLINE_SECONDS} s")
                stack.print_logs(4000)
            else:
                latency = arrived - landed
                verdict = "PASS" if latency <= TARGET_SECONDS else "MISS"
                print(f"\nlanding -> alert e-mail: {latency:.1f} s "
                      f"(target <= {TARGET_SECONDS:.0f} s): {verdict}")  # fmt: skip
                time.sleep(3)  # let the delivering run record its end
                _print_breakdown(meta, landed)
                load = os.getloadavg()
                print(f"load after: {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
                code = 0
        except (RuntimeError, AssertionError) as exc:
            print(f"FAILED: {exc}")
            stack.print_logs(4000)
        finally:
            stack.stop()
            sink.stop()
            meta.dispose()
            drop_database(PG_ADMIN_URL, meta_name)
            drop_database(PG_ADMIN_URL, wh_name)
    return code


if __name__ == "__main__":
    sys.exit(main())
