"""The pseudonyms of a bulk procedures file, computed by a helper process one chunk behind.

``load._stage_chunks`` sends each chunk's distinct references to ``hmacworker.DigestWorker``
and finishes the chunk after the next one was read; the warehouse must end in the very same
rows (quarantine included, and in the same write order) as with the hashing in the loading
process, and a helper that fails must only cost time (the chunk is hashed locally).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines.ingest import hmacworker, ingest_paths, load
from pipelines.ingest.pseudonymise import (
    KeyedDigest,
    distinct_pairs,
    gather_digests,
    pseudonymise_column,
)
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, snapshot, write

KEY = b"kyphowatch-test-key-0123456789abcdef"


def test_the_helper_gives_the_digests_of_this_process():
    worker = hmacworker.DigestWorker(KEY)
    assert worker.usable
    local = KeyedDigest(KEY)
    try:
        for request in ([["S001\x1fPT-1", "S002\x1fPT-1", "S9\x1fé ü 漢字"], []],
                        [[f"S{n % 7}\x1fPT-{n}" for n in range(5_000)]]):
            assert worker.send(request)
            assert not worker.send(request), "one request at a time"
            assert worker.receive() == [local.hexdigests(messages) for messages in request]
    finally:
        worker.close()
    assert not worker.usable and worker.receive() is None


def test_a_message_the_helper_cannot_encode_leaves_it_to_this_process():
    worker = hmacworker.DigestWorker(KEY)
    try:
        assert worker.send([["S001\x1fPT-\ud800"]])  # a lone surrogate has no UTF-8 form
        assert worker.receive() is None
        assert not worker.usable and not worker.send([["S001\x1fPT-1"]])
    finally:
        worker.close()


def test_the_two_halves_make_the_column():
    sites = pd.Series(["S001", "S001", "S002", "S001", "S003", "S003"], index=[4, 5, 6, 7, 8, 9])
    refs = pd.Series(["PT-1", "PT-1", "PT-1", None, "", "PT-9"], index=sites.index, dtype=object)
    pairs = distinct_pairs(sites, refs)
    assert pairs[2] == ["S001\x1fPT-1", "S002\x1fPT-1", "S003\x1fPT-9"]
    halves = gather_digests(pairs, KeyedDigest(KEY).hexdigests(pairs[2]))
    pd.testing.assert_series_equal(halves, pseudonymise_column(KEY, sites, refs))


def _procedure_rows() -> list[dict]:
    """Shared patients (one digest, many rows), bad rows, repeated keys, a misshapen line."""
    rows = [proc_row(f"P{n}", patient=f"PT-{n % 9}", operator_ref=f"OP-{n % 4}",
                     date=f"2024-01-{1 + n % 20:02d}") for n in range(1, 41)]
    rows[4] = proc_row("P2", patient="PT-x", date="2024-01-09")  # P2 again, same chunk
    rows[17] = proc_row("P7", patient="PT-y")  # P7 again, a later chunk
    rows[19] = proc_row("P20", age_years="7")  # quarantined by validation
    rows[30] = proc_row("P31", procedure_date="2024-13-40")  # not a date
    return rows


def _file(tmp_path: Path) -> Path:
    text = csv_text(PROC_HEADER, _procedure_rows())
    lines = text.splitlines(keepends=True)
    lines.insert(23, "P99,too,few\n")  # a misshapen line: quarantined between chunks' rows
    return write(tmp_path / "in" / "procedures_20240131.csv", "".join(lines))


@contextlib.contextmanager
def _another_database(db_url: str, tmp_path: Path, request):
    """A second empty warehouse of the same backend (dropped after)."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second.db'}"
        return
    admin = sa.create_engine(request.getfixturevalue("pg_admin_url"),
                             isolation_level="AUTOCOMMIT")
    name = sa.make_url(db_url).database + "_second"
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    try:
        yield sa.make_url(db_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
        admin.dispose()


def _load(settings, path: Path) -> dict:
    report = ingest_paths(settings, [path]).to_dict()
    return {k: v for k, v in report["files"][0].items() if k != "path"}


@pytest.mark.parametrize("helper_fails", [False, True])
def test_a_load_with_the_helper_ends_in_the_rows_of_one_without(
        db_url, tmp_path, settings_for, monkeypatch, request, helper_fails):
    path = _file(tmp_path)
    env = {"KYPHOWATCH_CHUNK_ROWS": "7"}
    written: list[str] = []  # the order of the quarantine writes
    real_add = load._Quarantine.add

    def add(self, rows):
        written.extend(str(number) for number, _, _ in rows)
        real_add(self, rows)

    monkeypatch.setattr(load._Quarantine, "add", add)
    monkeypatch.setattr(load, "DIGEST_WORKER_BYTES", sys.maxsize)  # no helper
    expected = _load(settings_for(db_url, env), path)
    expected_state, expected_order = snapshot(db_url), list(written)

    sent: list[int] = []
    real_send = hmacworker.DigestWorker.send

    def send(self, request):
        ok = real_send(self, request)
        sent.append(ok)
        if helper_fails and len(sent) == 2:
            self._process.kill()  # dies with a request in hand: its answer never comes
        return ok

    monkeypatch.setattr(hmacworker.DigestWorker, "send", send)
    monkeypatch.setattr(load, "DIGEST_WORKER_BYTES", 0)  # every procedures file: the helper
    written.clear()
    with _another_database(db_url, tmp_path, request) as second:
        got = _load(settings_for(second, env), path)
        got_state = snapshot(second)
    assert sent[:2] == [True, True], "the chunks' references went to the helper"
    if helper_fails:
        assert sent[2:] and not any(sent[2:]), "after its failure this process hashed them"
    else:
        assert all(sent) and len(sent) == 6  # 41 records in chunks of 7
    assert got == expected
    assert got_state == expected_state
    assert written == expected_order
    assert expected["quarantine_reasons"]["procedure_id:duplicate_in_file"] == 4
    assert expected["quarantine_reasons"]["row:wrong_field_count"] == 1
