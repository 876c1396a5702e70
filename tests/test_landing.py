"""Landing directory: complete files are loaded and filed away; reruns are harmless."""

from __future__ import annotations

import os
import shutil
import time
from datetime import date

import pytest
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.landing import (
    is_complete_name,
    process_landing,
    seconds_until_settled,
    stable_files,
)
from pipelines.schema import file_ledger, procedure
from pipelines.simulate import simulate

TODAY = date(2024, 7, 1)


@pytest.fixture(scope="module")
def extracts(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(out, sites=3, start=date(2023, 1, 1), end=date(2023, 4, 30), seed=7)
    return sorted(out.glob("*.csv"))


def _dirs(tmp_path):
    return tmp_path / "landing", tmp_path / "archive", tmp_path / "rejected"


def _drop(files, landing):
    landing.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, landing / path.name)


def _count(db_url, table):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        count = conn.scalar(sa.select(sa.func.count()).select_from(table))
    engine.dispose()
    return count


def test_partial_and_hidden_names_are_ignored(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    for name in ("procedures_20240101.csv", "procedures_20240102.csv.part", ".hidden.csv",
                 "complications_20240101.csv.tmp", "notes.txt~"):
        (landing / name).write_text("x")
    assert [p.name for p in stable_files(landing, 0)] == ["procedures_20240101.csv"]
    assert not is_complete_name("x.CSV.PART")


def test_recently_modified_files_wait_until_they_settle(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    path = landing / "procedures_20240101.csv"
    path.write_text("x")
    now = time.time()
    os.utime(path, (now, now))
    assert stable_files(landing, 30, now=now + 5) == []
    assert stable_files(landing, 30, now=now + 31) == [path]


def test_the_watcher_knows_when_the_next_file_settles(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    assert seconds_until_settled(landing, 30) is None  # nothing waiting
    older, newer = landing / "procedures_20240101.csv", landing / "complications_20240101.csv"
    older.write_text("x")
    newer.write_text("x")
    (landing / "procedures_20240102.csv.part").write_text("x")  # not a complete name: ignored
    now = time.time()
    os.utime(older, (now - 25, now - 25))
    os.utime(newer, (now - 10, now - 10))
    assert seconds_until_settled(landing, 30, now=now) == pytest.approx(5)
    assert seconds_until_settled(landing, 30, now=now + 6) == pytest.approx(14)
    assert seconds_until_settled(landing, 30, now=now + 21) is None  # both settled


def test_loaded_files_are_archived_and_rejected_ones_explained(sqlite_url, settings_for, tmp_path,
                                                              extracts):
    landing, archive, rejected = _dirs(tmp_path)
    _drop(extracts, landing)
    (landing / "procedures_20230515.csv").write_text("this,is,not\nthe,contract,header\n")
    (landing / "procedures_20230601.csv.part").write_text("still uploading")

    report = process_landing(settings_for(sqlite_url), landing, archive, rejected, today=TODAY)

    statuses = {os.path.basename(f.path): f.status for f in report.files}
    assert statuses.pop("procedures_20230515.csv") == "rejected"
    assert set(statuses.values()) == {"loaded"}
    assert sorted(p.name for p in landing.iterdir()) == ["procedures_20230601.csv.part"]
    assert sorted(p.name for p in (archive / "2024-07-01").iterdir()) == [p.name for p in extracts]
    reason = (rejected / "procedures_20230515.csv.reason.txt").read_text()
    assert reason.strip() and "\n" not in reason.strip()
    assert (rejected / "procedures_20230515.csv").exists()
    assert _count(sqlite_url, procedure) > 0


def test_rerun_with_the_same_files_changes_nothing_and_cleans_landing(sqlite_url, settings_for,
                                                                     tmp_path, extracts):
    settings = settings_for(sqlite_url)
    landing, archive, rejected = _dirs(tmp_path)
    _drop(extracts, landing)
    process_landing(settings, landing, archive, rejected, today=TODAY)
    procedures, ledger = _count(sqlite_url, procedure), _count(sqlite_url, file_ledger)

    _drop(extracts, landing)  # the same files delivered again
    report = process_landing(settings, landing, archive, rejected, today=TODAY)
    assert {f.status for f in report.files} == {"duplicate"}
    assert list(landing.iterdir()) == []
    assert len(list((archive / "2024-07-01").iterdir())) == len(extracts)
    assert (_count(sqlite_url, procedure), _count(sqlite_url, file_ledger)) == (procedures, ledger)


def test_interrupted_move_is_repaired_on_rerun(sqlite_url, settings_for, tmp_path, extracts):
    settings = settings_for(sqlite_url)
    landing, archive, rejected = _dirs(tmp_path)
    _drop(extracts[:1], landing)
    process_landing(settings, landing, archive, rejected, today=TODAY)
    # simulate a crash after the copy into the archive but before removal from landing
    _drop(extracts[:1], landing)
    report = process_landing(settings, landing, archive, rejected, today=TODAY)
    assert [f.status for f in report.files] == ["duplicate"]
    assert list(landing.iterdir()) == []
    assert [p.name for p in (archive / "2024-07-01").iterdir()] == [extracts[0].name]


def test_empty_landing_is_a_no_op(sqlite_url, settings_for, tmp_path):
    landing, archive, rejected = _dirs(tmp_path)
    report = process_landing(settings_for(sqlite_url), landing, archive, rejected)
    assert report.files == [] and report.exit_code == 0
