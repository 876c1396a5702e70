"""``python -m pipelines.demo``: the whole event-driven pipeline on a laptop, in about a minute.

1. simulates a small registry (one site with a drifting cement-leak rate) and drops the
   extracts into ``var/demo/landing``;
2. starts the local SMTP sink (``var/demo/mail``);
3. runs the three Airflow DAGs -- ingest, monitor, alerts -- with ``dag.test()`` against the
   SQLite warehouse ``var/kyphowatch.db`` (demo mode; Airflow metadata in ``var/airflow``);
4. prints the subject of every e-mail that arrived, one message in full, and a summary.

The DAGs run in a child process (``dags/kyphowatch_testrun.py``) because ``pipelines`` never
imports Airflow. Everything is synthetic; by default the demo starts from a clean slate
(``--keep`` keeps the previous warehouse and directories).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import sqlalchemy as sa

from pipelines.db import open_warehouse
from pipelines.mailsink import MailSink
from pipelines.schema import alert, alert_outbox, file_ledger, signal
from pipelines.settings import REPO_DIR
from pipelines.simulate import simulate

VAR = REPO_DIR / "var"
DEMO_DIR = VAR / "demo"
DEMO_DB = VAR / "kyphowatch.db"
AIRFLOW_HOME = VAR / "airflow"
DRIFT = "S003:cement_leak:3.0:2023-05-01"
DAG_IDS = ("kyphowatch_ingest", "kyphowatch_monitor", "kyphowatch_alerts")


def _child_env(sink: MailSink) -> dict[str, str]:
    # The DAGs read their configuration from the environment of the child process.
    env = dict(os.environ)  # PATH and friends pass through; kyphowatch settings are set here
    env.update({
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_DIR / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_DIR / "plugins"),
        "PYTHONPATH": os.pathsep.join([str(REPO_DIR), str(REPO_DIR / "dags")]),
        "KYPHOWATCH_DEMO": "1",
        "KYPHOWATCH_DB_URL": f"sqlite:///{DEMO_DB}",
        "KYPHOWATCH_LANDING_DIR": str(DEMO_DIR / "landing"),
        "KYPHOWATCH_ARCHIVE_DIR": str(DEMO_DIR / "archive"),
        "KYPHOWATCH_REJECTED_DIR": str(DEMO_DIR / "rejected"),
        "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "0",
        "KYPHOWATCH_REPORT_DIR": str(VAR / "reports"),
        "KYPHOWATCH_SMTP_URL": sink.url,
        "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety-lead@demo.invalid",
        "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "registry-data@demo.invalid",
    })  # fmt: skip
    for name in ("KYPHOWATCH_PSEUDONYM_KEY", "KYPHOWATCH_WEBHOOK_URL"):
        env.pop(name, None)
    return env


def _run(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=REPO_DIR, capture_output=True, text=True)
    log_path.write_text(proc.stdout + "\n" + proc.stderr, encoding="utf-8")
    return proc


def _summary(db_url: str) -> dict[str, object]:
    engine = open_warehouse(db_url)
    try:
        with engine.connect() as conn:
            def count(table, *where):
                return conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where))

            return {
                "files_loaded": count(file_ledger, file_ledger.c.status == "loaded"),
                "files_rejected": count(file_ledger, file_ledger.c.status == "rejected"),
                "active_signals": count(signal, signal.c.active.is_(True)),
                "alerts": count(alert),
                "deliveries_sent": count(alert_outbox, alert_outbox.c.status == "sent"),
            }
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when every DAG run succeeded and mail arrived."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the previous demo state")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    if not args.keep:
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{DEMO_DB}{suffix}").unlink(missing_ok=True)
    landing = DEMO_DIR / "landing"
    landing.mkdir(parents=True, exist_ok=True)

    print(f"1/4 simulating {args.sites} sites for 2023, drift {DRIFT}")
    simulate(DEMO_DIR / "extracts", sites=args.sites, start=date(2023, 1, 1),
             end=date(2023, 12, 31), seed=args.seed, drifts=[DRIFT])  # fmt: skip
    for path in sorted((DEMO_DIR / "extracts").glob("*.csv")):
        shutil.copy2(path, landing / path.name)
    print(f"    {len(list(landing.iterdir()))} extract files dropped into {landing}")

    with MailSink(DEMO_DIR / "mail") as sink:
        print(f"2/4 mail sink listening on {sink.url}, storing in {sink.directory}")
        env = _child_env(sink)
        print(f"3/4 running {', '.join(DAG_IDS)} with dag.test() (Airflow home {AIRFLOW_HOME})")
        migrate = _run([sys.executable, "-m", "airflow", "db", "migrate"], env,
                       DEMO_DIR / "airflow-migrate.log")  # fmt: skip
        if migrate.returncode != 0:
            print(f"airflow db migrate failed; see {DEMO_DIR / 'airflow-migrate.log'}")
            return 1
        proc = _run([sys.executable, str(REPO_DIR / "dags" / "kyphowatch_testrun.py"), *DAG_IDS],
                    env, DEMO_DIR / "airflow-run.log")  # fmt: skip
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                run = json.loads(line)
                if "evaluations" in run:
                    print(f"    network evaluations in this cycle: {run['evaluations']}")
                    continue
                tasks = ", ".join(f"{k}={v}" for k, v in run.get("tasks", {}).items())
                print(f"    {run.get('dag_id')}: {run.get('state')} ({tasks})")
        messages = sink.messages()

    print(f"4/4 {len(messages)} e-mail(s) arrived in {DEMO_DIR / 'mail'}:")
    for message in messages:
        print(f"    To: {message['To']:<28} Subject: {message['Subject']}")
    safety = [m for m in messages if "safety" in m["Subject"]] or messages
    if safety:
        print("\n----- first safety e-mail, in full (text part) -----")
        print(safety[0].get_body(("plain",)).get_content())
    summary = _summary(f"sqlite:///{DEMO_DB}")
    print("summary:", json.dumps(summary))
    report = Path(env["KYPHOWATCH_REPORT_DIR"]) / "latest" / "index.html"
    print(f"evidence report: {report if report.exists() else 'NOT WRITTEN'}")
    print(f"Airflow log: {DEMO_DIR / 'airflow-run.log'}; "
          f"try: kyphowatch sites --flagged --db sqlite:///{DEMO_DB}")  # fmt: skip
    return 0 if proc.returncode == 0 and messages and report.exists() else 1


if __name__ == "__main__":
    raise SystemExit(main())
