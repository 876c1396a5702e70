"""Fault cases on the real Airflow stack (issue 13): nothing lost, nothing doubled, people told.

The same topology as ``tests/test_airflow_e2e.py`` (``pipelines/airflow_stack.py``:
scheduler, dag-processor, triggerer, api-server, PostgreSQL metadata and warehouse, the SMTP
sink, plus a webhook sink as the second channel), started once per executor; the faults follow each other on that one stack:

1. **Scheduler SIGKILLed mid-ingest** -- once the warehouse holds every dropped file and
   before the ingest run has announced anything, the scheduler's whole process tree is
   killed (LocalExecutor: the ingest task with it; Celery: the task runs on a worker and
   lives on) and the scheduler is started again. The monitor must still run and the drift
   alarm arrive as one e-mail.
2. **Killed mid-delivery** -- the sink hangs on that alarm e-mail while the alerts DAG's
   ``deliver_outbox`` sends it; the task process (Local) or the whole Celery worker is
   SIGKILLed there. Local hangs *before* the hand-over (at RCPT: the message must not be
   lost), Celery *after* it (the server stored the message but never answered: it must not
   be doubled). The outbox lease (10 min) is run out in simulated time -- ``claimed_at``
   moved back, as ``tests/test_self_healing.py`` moves ``created_at`` -- and the task's
   Airflow retry finishes the delivery. Each outbox message is in the sink exactly once.
3. **Triggerer restarted** -- stopped (SIGTERM), a rejected file dropped while it is down,
   started again: the file is picked up, and its data-quality e-mail leaves within a minute
   of the file being set aside (a person must fix the file).
4. **Warehouse unreachable, then fixed** (LocalExecutor only) -- the warehouse database stops
   accepting connections, new files land, ingest fails through its retries and one failure
   e-mail goes to the data-quality recipients; connections are allowed again and the files
   are loaded and monitored without anyone triggering anything.
5. **SMTP down for an hour, no extract for three days** (LocalExecutor only) -- the sink
   stops, a rejected file's alert reaches the webhook (the second channel) while its e-mail
   waits; simulated time moves that alert an hour back and every file 73 hours back; one
   alerts run (triggered by hand, standing in for the 15-minute tick) raises the channel
   outage on the webhook only and the heartbeat on both; once the sink is back, the
   ``deliver_outbox`` retry sends each waiting e-mail once.

The CeleryExecutor variant runs cases 1-3; cases 4 and 5 do not depend on the executor and
cost three and two minutes of Airflow retry delays. Deadlines, not sleeps: every wait polls its
condition until a generous deadline, so a slow shared machine only makes the test slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from datetime import date

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from pipelines.airflow_stack import (
    COMPONENTS,
    AirflowStack,
    airflow_env,
    create_database,
    drop_database,
    drop_files,
    wait_for_port,
)
from pipelines.mailsink import free_port
from pipelines.simulate import simulate
from tests.airflow_helpers import (
    StallingMailSink,
    WebhookSink,
    ancestors,
    redis_available,
    use_celery,
)

pytestmark = [pytest.mark.airflow_e2e, pytest.mark.timeout(1500)]

DRIFT_SITE = "S002"
SAFETY, DATA = "safety@example.org", "data@example.org"
LEASE_SECONDS = 600  # pipelines.alerts.outbox.DEFAULT_LEASE_SECONDS


def _wait(condition, seconds: float, stack: AirflowStack, what: str, interval: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stack.check_alive()
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def _scalar(engine: sa.Engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(query), params).scalar()


def _rows(engine: sa.Engine, query: str, **params) -> list:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(query), params))


def _loaded_files(wh: sa.Engine) -> set[str]:
    """File names the warehouse has loaded (empty before the first ingest created the table)."""
    try:
        return {r[0] for r in _rows(wh, "select file_name from file_ledger where status = 'loaded'")}
    except sa.exc.ProgrammingError:
        return set()


def _asset_events(meta: sa.Engine, asset: str) -> int:
    return _scalar(meta, "select count(*) from asset_event e join asset a on a.id = e.asset_id "
                         "where a.name = :name", name=asset)  # fmt: skip


def _tries(meta: sa.Engine, dag_id: str, task_id: str) -> list[tuple[str, int]]:
    return [tuple(r) for r in _rows(
        meta, "select state, try_number from task_instance where dag_id = :d and task_id = :t",
        d=dag_id, t=task_id)]  # fmt: skip


def _outbox(wh: sa.Engine) -> list:
    return _rows(wh, "select o.message_id, o.channel, o.status, o.attempts, o.last_error, "
                     "o.sent_at, a.dedupe_key from alert_outbox o "
                     "join alert a on a.alert_id = o.alert_id")  # fmt: skip


def _ids(sink: StallingMailSink) -> list[str]:
    return [m["Message-ID"] for m in sink.messages()]


def _subjects(sink: StallingMailSink, *words: str) -> list[str]:
    return [m["Subject"] for m in sink.messages()
            if all(w.lower() in m["Subject"].lower() for w in words)]  # fmt: skip


def _kill_delivery(stack: AirflowStack, meta: sa.Engine, executor: str) -> str:
    """SIGKILL what runs ``kyphowatch_alerts.deliver_outbox`` now; return what was killed."""
    row = _wait(lambda: _rows(meta, (
        "select pid from task_instance where dag_id = 'kyphowatch_alerts' "
        "and task_id = 'deliver_outbox' and state = 'running' and pid is not null")),
        20, stack, "the running deliver_outbox task", interval=0.1)  # fmt: skip
    pid = row[0][0]
    if executor == "CeleryExecutor":
        workers = {p.pid: n for n, p in stack.processes.items() if n.startswith("worker")}
        owner = next(workers[p] for p in ancestors(pid) if p in workers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        stack.kill_component(owner)
        stack.start_component(owner)  # its service manager starts it again
        return f"Celery {owner}"
    # LocalExecutor: the task process (a process group of its own) dies, the scheduler lives
    assert os.getpgid(pid) != stack.processes["scheduler"].pid
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    return f"task process {pid}"


def _set_connections(admin_url: str, database: str, allowed: bool) -> None:
    """Let the warehouse database accept connections, or refuse them and drop the open ones."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        quoted = conn.dialect.identifier_preparer.quote(database)
        # Identifiers cannot be bound parameters: quoted with the dialect's rules above.
        conn.exec_driver_sql(f"ALTER DATABASE {quoted} ALLOW_CONNECTIONS "
                             + ("true" if allowed else "false"))  # fmt: skip
        if not allowed:
            conn.execute(sa.text("select pg_terminate_backend(pid) from pg_stat_activity "
                                 "where datname = :name and pid <> pg_backend_pid()"),
                         {"name": database})  # fmt: skip
    admin.dispose()


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_faults_on_the_real_stack(pg_admin_url, tmp_path, capsys, executor):
    if executor == "CeleryExecutor" and not redis_available():
        pytest.skip("no Redis broker on 127.0.0.1:6379 for the CeleryExecutor variant")
    meta_name, meta_url = create_database(pg_admin_url, "kw_airflow")
    wh_name, wh_url = create_database(pg_admin_url, "kw_wh")
    meta_url = meta_url.replace("postgresql://", "postgresql+psycopg://", 1)
    extracts = tmp_path / "extracts"
    simulate(extracts, sites=3, start=date(2023, 1, 1), end=date(2023, 10, 31), seed=11,
             drifts=[f"{DRIFT_SITE}:cement_leak:4.0:2023-03-01"])  # fmt: skip
    first = sorted(p for p in extracts.glob("*.csv") if "202310" not in p.name)
    october = sorted(extracts.glob("*_202310*.csv"))
    root = tmp_path
    landing, logs, rejected = root / "landing", root / "logs", root / "rejected"
    landing.mkdir()
    logs.mkdir()
    api_port = free_port()
    stall_at = "rcpt" if executor == "LocalExecutor" else "data"
    sink = StallingMailSink(root / "mail", stall_at).start()
    hook = WebhookSink(root / "hook")
    env = airflow_env(root=root, meta_url=meta_url, warehouse_url=wh_url, landing=landing,
                      smtp_host=sink.host, smtp_port=sink.port, api_port=api_port,
                      executor=executor, overrides={
                          "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                          "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                          # a dead scheduler's or triggerer's work is taken over in seconds
                          "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "15",
                          "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                          "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                          "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                          "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
                          "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "2",
                          "KYPHOWATCH_LANDING_POLL_SECONDS": "1",
                          "KYPHOWATCH_LANDING_REANNOUNCE_SECONDS": "10",
                      })  # fmt: skip
    # a second channel, to carry the news that the first one is down
    env["AIRFLOW_CONN_KYPHOWATCH_WEBHOOK"] = json.dumps({"conn_type": "http",
                                                         "extra": {"url": hook.url}})
    components = dict(COMPONENTS)
    if executor == "CeleryExecutor":
        use_celery(env, components, meta_url)
    stack = AirflowStack(env, logs, components)
    meta = sa.create_engine(meta_url, poolclass=NullPool)
    wh = sa.create_engine(wh_url, poolclass=NullPool)
    failed = True
    report: list[str] = []
    try:
        stack.migrate()
        stack.start()
        assert wait_for_port(api_port, time.monotonic() + 120), "api-server did not listen"
        assert stack.wait_until_watching(meta, time.monotonic() + 180), "no landing watcher"

        # 1. the scheduler dies after ingest loaded every file, before anything was announced
        sink.arm(SAFETY)
        # Writes to the XCom table wait while this lock is held: ingest_landing loads every
        # file, then hangs handing back its report, so the kill lands inside the task after
        # the loading (the window is otherwise a few hundred milliseconds wide).
        hold = meta.connect()
        hold.begin()
        hold.execute(sa.text("lock table xcom in share mode"))
        drop_files(first, landing)
        names = {p.name for p in first}
        _wait(lambda: names <= _loaded_files(wh), 300, stack, "ingest to load every file",
              interval=0.2)  # fmt: skip
        stack.kill_component("scheduler")
        ingest_at_kill = _tries(meta, "kyphowatch_ingest", "ingest_landing")
        hold.close()  # rolls back: the lock goes
        assert ingest_at_kill == [("running", 1)], ingest_at_kill
        assert _asset_events(meta, "kyphowatch_procedures") == 0, "ingest announced already"
        report.append(f"scheduler SIGKILLed with {len(names)} files loaded by the running "
                      "ingest_landing, nothing announced")
        stack.start_component("scheduler")

        # 2. the monitor runs anyway; its alarm e-mail hangs mid-delivery and the sender dies
        _wait(sink.handler.stalled.is_set, 480, stack, "the alerts run to send the alarm",
              interval=0.1)  # fmt: skip
        killed = _kill_delivery(stack, meta, executor)
        sink.release()
        in_flight = [r for r in _outbox(wh) if r.status == "sending"]
        assert len(in_flight) == 1 and in_flight[0].channel == "email", in_flight
        assert (in_flight[0].sent_at is not None) == (stall_at == "data"), in_flight
        # simulated time: the killed run's 10-minute lease on that row runs out
        with wh.begin() as conn:
            conn.execute(sa.text("update alert_outbox set claimed_at = claimed_at - "
                                 "make_interval(secs => :s) where status = 'sending'"),
                         {"s": LEASE_SECONDS + 60})  # fmt: skip
        report.append(f"{killed} SIGKILLed during deliver_outbox (server hung at {stall_at})")

        def delivered() -> bool:
            rows = _outbox(wh)
            tries = _tries(meta, "kyphowatch_alerts", "deliver_outbox")
            return bool(rows) and all(r.status == "sent" for r in rows) and ("success", 2) in [
                (state, min(n, 2)) for state, n in tries]  # fmt: skip

        _wait(delivered, 300, stack, "the deliver_outbox retry to finish every e-mail")
        assert len(_subjects(sink, DRIFT_SITE, "cement leak")) == 1
        assert _asset_events(meta, "kyphowatch_procedures") >= 1
        assert _scalar(wh, "select count(*) from monitor_run") >= 1
        if executor == "LocalExecutor":  # the task died with the scheduler and was run again
            assert max(n for _, n in _tries(meta, "kyphowatch_ingest", "ingest_landing")) >= 2
        stuck = next(r for r in _outbox(wh) if r.message_id == in_flight[0].message_id)
        if stall_at == "data":  # the server had it: recorded as unconfirmed, never re-sent
            assert stuck.last_error.startswith("unconfirmed:"), stuck
        else:  # the server never had it: sent again, same Message-ID
            assert stuck.attempts == 2 and stuck.last_error is None, stuck
        ids = _ids(sink)
        assert len(ids) == len(set(ids)), "an e-mail arrived twice"
        assert sorted(r.message_id for r in _outbox(wh) if r.channel == "email") == sorted(ids)
        posted = [p["id"] for p in hook.posts()]
        assert sorted(r.message_id for r in _outbox(wh) if r.channel == "webhook") == sorted(posted)

        # 3. the triggerer restarts; a file dropped meanwhile is picked up when it is back
        stack.stop_component("triggerer")
        bad = root / "procedures_20231015T120000.csv"
        bad.write_text("not,an,extract\n", encoding="utf-8")
        drop_files([bad], landing)
        time.sleep(5)  # settle (2 s) and a few polls: nobody but the watcher picks files up
        assert (landing / bad.name).exists()
        stack.start_component("triggerer")
        reason = rejected / f"{bad.name}.reason.txt"
        _wait(lambda: reason.exists() and not any(landing.iterdir()), 180, stack,
              "the restarted triggerer's watcher to get the waiting file ingested")  # fmt: skip
        set_aside = reason.stat().st_mtime
        _wait(lambda: _subjects(sink, bad.name), 120, stack, "the rejected-file e-mail")
        mail = next(p for p in sorted((root / "mail").glob("*.eml"))
                    if bad.name in p.read_text(errors="replace"))  # fmt: skip
        latency = mail.stat().st_mtime - set_aside
        assert 0 <= latency < 60, latency
        assert len(_subjects(sink, bad.name)) == 1
        report.append(f"triggerer restarted; rejected file -> e-mail {latency:.1f} s")

        if executor == "LocalExecutor":
            # 4. the warehouse refuses connections while new files land, then recovers
            failure_subject = "kyphowatch_ingest.ingest_landing"
            _set_connections(pg_admin_url, wh_name, allowed=False)
            down_at = time.monotonic()
            drop_files(october, landing)
            # The alerts DAG runs inside the outage too (its 15-minute tick can land there
            # on any day; here it is set off at once, so the case does not depend on the
            # clock): every task that fails for good is told once.
            stack.cli("dags", "trigger", "kyphowatch_alerts")
            _wait(lambda: _subjects(sink, failure_subject), 420, stack,
                  "the failure e-mail of the ingest run")  # fmt: skip
            _wait(lambda: _subjects(sink, "Pipeline task failed", "kyphowatch_alerts."), 420,
                  stack, "the failure e-mail of the alerts run")  # fmt: skip
            noticed = time.monotonic() - down_at
            assert sorted(p.name for p in landing.iterdir()) == sorted(p.name for p in october)
            runs_before = _scalar(meta, "select count(*) from dag_run "
                                        "where dag_id = 'kyphowatch_monitor'")  # fmt: skip
            _set_connections(pg_admin_url, wh_name, allowed=True)
            fixed_at = time.monotonic()
            _wait(lambda: {p.name for p in october} <= _loaded_files(wh)
                  and not any(landing.iterdir()), 300, stack,
                  "the files to be ingested after the fix")  # fmt: skip
            loaded_after = time.monotonic() - fixed_at
            _wait(lambda: _scalar(meta, "select count(*) from dag_run where dag_id = "
                                        "'kyphowatch_monitor' and state = 'success'")
                  > runs_before, 300, stack, "the monitor to run on the new files")  # fmt: skip
            assert len(_subjects(sink, failure_subject)) == 1
            markers = root / "reports" / ".failure-notices"

            def open_episodes() -> list[str]:
                """Tasks whose failure episode is open (``dag.task``), from the markers."""
                return sorted(".".join(p.name.split("__")[1:]) for p in markers.iterdir()
                              ) if markers.exists() else []  # fmt: skip

            assert failure_subject not in open_episodes(), "ingest episode not closed"
            # Another task the schedule happened to run inside the outage (the alerts DAG's
            # 15-minute tick) failed too: it was told once, and its episode closes when that
            # task next succeeds, which the monitor run above sets off.
            for task in open_episodes():
                assert len(_subjects(sink, task)) == 1, (task, _subjects(sink, task))
            _wait(lambda: not open_episodes(), 300, stack,
                  "every failure episode of the outage to close")  # fmt: skip
            report.append(f"warehouse down: failure e-mail after {noticed:.0f} s; fixed: "
                          f"files loaded {loaded_after:.0f} s later, no manual trigger")

        if executor == "LocalExecutor":
            # 5. SMTP down for an hour and no extract for three days, in simulated time
            smtp_port = sink.port
            # What case 4 may have left (a deliver_outbox run failed inside the warehouse
            # outage): this case counts only its own failures and notices.
            failed_before = sum(t[0] == "failed"
                                for t in _tries(meta, "kyphowatch_alerts", "deliver_outbox"))
            notices_before = len(_subjects(sink, "kyphowatch_alerts.deliver_outbox"))
            other_before = [s for s in _subjects(sink, "kyphowatch_alerts.")
                            if "deliver_outbox" not in s]
            sink.stop()
            bad = root / "complications_20231020T120000.csv"
            # other bytes than case 3's file: the same bytes are the same (already rejected) file
            bad.write_text("still,not,an,extract\n", encoding="utf-8")
            drop_files([bad], landing)
            _wait(lambda: any(bad.name in json.dumps(p) for p in hook.posts()), 180, stack,
                  "the rejected-file alert on the webhook while SMTP is down")  # fmt: skip
            waiting = _wait(lambda: [r for r in _outbox(wh) if r.channel == "email"
                                     and r.status == "queued" and r.last_error], 60, stack,
                            "the e-mail to wait in the outbox")  # fmt: skip
            with wh.begin() as conn:
                # the waiting e-mail was raised an hour ago; the newest extract came 73 h ago
                conn.execute(sa.text(
                    "update alert set created_at = created_at - make_interval(mins => 61) "
                    "where alert_id in (select alert_id from alert_outbox "
                    "where channel = 'email' and status = 'queued')"))  # fmt: skip
                conn.execute(sa.text("update file_ledger set processed_at = "
                                     "processed_at - make_interval(hours => 73)"))  # fmt: skip
            stack.cli("dags", "trigger", "kyphowatch_alerts")  # stands in for the 15-min tick

            def posted(*words: str) -> list[dict]:
                return [p for p in hook.posts() if all(w in p["title"] for w in words)]

            _wait(lambda: posted("email has failed to deliver") and posted("No extracts"), 240,
                  stack, "the outage and heartbeat alerts on the webhook")  # fmt: skip
            outage = [r for r in _outbox(wh) if r.dedupe_key == "watchdog:channel:email"]
            assert [r.channel for r in outage] == ["webhook"], outage  # not on the broken channel
            sink = StallingMailSink(root / "mail", stall_at, port=smtp_port).start()
            _wait(lambda: all(r.status == "sent" for r in _outbox(wh)), 240, stack,
                  "the waiting e-mails to go out once SMTP is back")  # fmt: skip
            assert len(_subjects(sink, bad.name)) == 1
            assert len(_subjects(sink, "No extracts received")) == 1
            assert not _subjects(sink, "failed to deliver")
            # Usually an Airflow retry of deliver_outbox heals the outage and no one is told. On
            # a slow machine the sink can come back only after the task used up its retries:
            # then it failed for good, and that is one failure e-mail (once per episode).
            failed_for_good = sum(t[0] == "failed" for t in _tries(
                meta, "kyphowatch_alerts", "deliver_outbox")) - failed_before
            notices = len(_subjects(sink, "kyphowatch_alerts.deliver_outbox")) - notices_before
            assert bool(notices) == bool(failed_for_good), (failed_for_good, notices)
            assert notices <= failed_for_good, (failed_for_good, notices)
            assert [s for s in _subjects(sink, "kyphowatch_alerts.")
                    if "deliver_outbox" not in s] == other_before, "another alerts task failed"
            assert len(posted("email has failed to deliver")) == 1
            report.append(f"SMTP down 61 min (simulated), {len(waiting)} e-mail(s) waiting: "
                          "outage and 73 h heartbeat alerts on the webhook, e-mails sent once "
                          "after SMTP returned")

        time.sleep(5)  # a delivery still under way would show up as a duplicate
        posted_ids = [p["id"] for p in hook.posts()]
        assert len(posted_ids) == len(set(posted_ids)), "a webhook post arrived twice"
        ids = _ids(sink)
        assert len(ids) == len(set(ids)), "an e-mail arrived twice"
        assert len(_subjects(sink, DRIFT_SITE, "cement leak")) == 1
        with capsys.disabled():
            print(f"\nfault cases ({executor}):\n  " + "\n  ".join(report))
        failed = False
    finally:
        stack.stop()
        sink.release()
        sink.stop()
        hook.close()
        meta.dispose()
        wh.dispose()
        if failed:
            stack.print_logs()
        drop_database(pg_admin_url, meta_name)
        drop_database(pg_admin_url, wh_name)
