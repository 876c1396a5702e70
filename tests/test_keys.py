"""Pseudonym key hygiene: strength screen, stored fingerprint, refusal of another key, rotation.

Runs on SQLite and the real PostgreSQL (``db_url`` fixture); real files, real warehouse.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.cli import build_parser, main
from pipelines.db import make_engine
from pipelines.errors import InputRejected
from pipelines.ingest import ingest_paths
from pipelines.ingest.keys import (
    KeyMismatchError,
    WeakKeyError,
    check_key_strength,
    key_fingerprint,
    key_in_use,
    key_problems,
    rotate,
)
from tests.ingest_helpers import (
    COMP_HEADER,
    PROC_HEADER,
    comp_row,
    csv_text,
    proc_row,
    snapshot,
    write,
)

KEY_1 = secrets.token_hex(32)
KEY_2 = secrets.token_urlsafe(32)


def _extracts(directory):
    """Two procedure deliveries (one a correction), complications, and quarantined rows.

    The quarantined rows hold a reference in a bad row and a row with the wrong field count,
    so rotation must re-key digests inside quarantine.raw_values too.
    """
    write(directory / "procedures_20240201.csv", csv_text(PROC_HEADER, [
        proc_row("P1", patient="PT-1"), proc_row("P2", patient="PT-2"),
        proc_row("P3", site="S002", patient="PT-1", operator_ref="OP-9"),
        proc_row("P4", patient="PT-4", age_years="old"),  # quarantined: bad age
        proc_row("P8", site=" S003 ", patient="  PT-8 ", operator_ref=" OP-8"),  # padded
    ]))
    write(directory / "procedures_20240301.csv",
          csv_text(PROC_HEADER, [proc_row("P2", patient="PT-2b"), proc_row("P5", patient="PT-5")])
          + "P6,S001,PT-6,extra\n")  # wrong field count: quarantined as field digests
    write(directory / "complications_20240301.csv",
          csv_text(COMP_HEADER, [comp_row("C1", "P1"), comp_row("C2", "P9")]), gz=True)
    return directory


def _load(settings_for, db_url, paths, key):
    return ingest_paths(settings_for(db_url, pseudonym_key=key, max_bad_row_share=1.0), paths)


def _fingerprints(db_url):
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.pseudonym_key)).mappings().all()
    engine.dispose()
    return {r["fingerprint"]: r["retired_at"] for r in rows}


# --- strength screen -----------------------------------------------------------------


@pytest.mark.parametrize("weak", [
    "Q",  # one character, as the issue found accepted
    "short-but-varied-key-123",  # 24 bytes
])
def test_short_key_is_refused(weak):
    assert any("bytes long" in p for p in key_problems(weak.encode()))
    with pytest.raises(WeakKeyError) as caught:
        check_key_strength(weak.encode())
    assert caught.value.exit_code == 3 and weak not in str(caught.value)


@pytest.mark.parametrize("weak", [
    "a" * 64,
    "ab" * 32,
    "0123456789abcdef" * 4,  # varied characters, but one pattern repeated
    "password1234567890password1234567890",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaabcdefghijklmnop",  # too uniform
])
def test_low_entropy_key_is_refused(weak):
    with pytest.raises(WeakKeyError) as caught:
        check_key_strength(weak.encode())
    assert weak not in str(caught.value) and "openssl rand" in str(caught.value)


def test_random_keys_pass_the_screen():
    """False-refusal check: 3000 keys as the docs tell operators to generate them."""
    makers = (lambda: secrets.token_hex(16), lambda: secrets.token_hex(32),
              lambda: secrets.token_urlsafe(32))
    refused = [k for make in makers for k in (make() for _ in range(1000))
               if key_problems(k.encode())]
    assert refused == []


def test_cli_refuses_weak_key_before_touching_the_warehouse(tmp_path, monkeypatch, capsys):
    extract = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    monkeypatch.setenv("KYPHOWATCH_PSEUDONYM_KEY", "k")
    monkeypatch.delenv("KYPHOWATCH_DEMO", raising=False)
    db = tmp_path / "w.db"
    assert main(["ingest", "--db", f"sqlite:///{db}", str(extract)]) == 3
    err = capsys.readouterr().err
    assert "1 bytes long" in err and "Traceback" not in err
    assert not db.exists()


# --- fingerprint ---------------------------------------------------------------------


def test_fingerprint_stored_on_first_load_and_other_key_refused(db_url, settings_for, tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files / "procedures_20240201.csv"], KEY_1)
    stored = _fingerprints(db_url)
    assert stored == {key_fingerprint(KEY_1.encode()): None}
    assert KEY_1 not in json.dumps(list(stored))
    before = snapshot(db_url)
    with pytest.raises(KeyMismatchError) as caught:
        _load(settings_for, db_url, [files / "procedures_20240301.csv"], KEY_2)
    assert caught.value.exit_code == 3 and KEY_2 not in str(caught.value)
    assert snapshot(db_url) == before  # nothing from the refused call was stored
    _load(settings_for, db_url, [files / "procedures_20240301.csv"], KEY_1)  # same key: fine
    assert _fingerprints(db_url) == stored


def test_cli_other_key_exit_code_and_check_never_prints_the_key(tmp_path, monkeypatch, capsys):
    files = _extracts(tmp_path / "in")
    db = f"sqlite:///{tmp_path / 'w.db'}"
    monkeypatch.delenv("KYPHOWATCH_DEMO", raising=False)
    monkeypatch.setenv("KYPHOWATCH_PSEUDONYM_KEY", KEY_1)
    assert main(["keys", "--db", db, "check"]) == 3  # read commands never create a warehouse
    assert main(["ingest", "--db", db, str(files / "procedures_20240201.csv")]) == 0
    assert main(["keys", "--db", db, "check"]) == 0
    out = capsys.readouterr()
    assert "match" in out.out and key_fingerprint(KEY_1.encode()) in out.out
    monkeypatch.setenv("KYPHOWATCH_PSEUDONYM_KEY", KEY_2)
    assert main(["ingest", "--db", db, str(files / "procedures_20240301.csv")]) == 3
    assert main(["keys", "--db", db, "check", "--json"]) == 3
    out = capsys.readouterr()
    assert "fingerprint" in out.err and json.loads(out.out)["state"] == "mismatch"
    for text in (out.out, out.err):
        assert KEY_1 not in text and KEY_2 not in text
    assert "keys" in build_parser()._subparsers._group_actions[0].choices


# --- rotation ------------------------------------------------------------------------


def _key_state(db_url):
    return snapshot(db_url), _fingerprints(db_url)


def test_rotation_equals_a_fresh_load_under_the_new_key(db_url, settings_for, tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files], KEY_1)
    old = snapshot(db_url)
    result = rotate(sa.create_engine(db_url), KEY_1.encode(), KEY_2.encode(), [files])
    assert result["rows_changed"]["procedure"] == 5 and result["rows_changed"]["quarantine"] == 2
    rotated = snapshot(db_url)
    assert rotated != old
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    _load(settings_for, fresh_url, [files], KEY_2)
    assert rotated == snapshot(fresh_url)  # every digest as if loaded under the new key
    assert _fingerprints(db_url)[key_fingerprint(KEY_1.encode())] is not None  # retired
    assert _fingerprints(db_url)[key_fingerprint(KEY_2.encode())] is None  # active
    with pytest.raises(KeyMismatchError):
        _load(settings_for, db_url, [files], KEY_1)
    later = write(tmp_path / "later" / "procedures_20240401.csv",
                  csv_text(PROC_HEADER, [proc_row("P7", patient="PT-1")]))
    _load(settings_for, db_url, [later], KEY_2)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        hashes = dict(conn.execute(sa.select(schema.procedure.c.procedure_id,
                                             schema.procedure.c.patient_hash)).all())
    engine.dispose()
    assert hashes["P7"] == hashes["P1"]  # the same patient keeps one digest across rotation


def test_rotation_failing_midway_leaves_the_old_state(db_url, settings_for, tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files], KEY_1)
    before = _key_state(db_url)

    def fail_after(table):
        if table == "quarantine":  # procedure tables already rewritten in the transaction
            raise RuntimeError("simulated crash midway through rotation")

    with pytest.raises(RuntimeError):
        rotate(sa.create_engine(db_url), KEY_1.encode(), KEY_2.encode(), [files],
               step=fail_after)
    assert _key_state(db_url) == before
    _load(settings_for, db_url, [files], KEY_1)  # the old key still works


def test_rotation_refused_without_every_extract_or_with_wrong_keys(db_url, settings_for,
                                                                     tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files], KEY_1)
    before = _key_state(db_url)
    engine = sa.create_engine(db_url)
    with pytest.raises(InputRejected) as caught:
        rotate(engine, KEY_1.encode(), KEY_2.encode(), [files / "procedures_20240201.csv"])
    assert "procedures_20240301.csv" in str(caught.value) and caught.value.exit_code == 2
    with pytest.raises(KeyMismatchError):
        rotate(engine, secrets.token_hex(32).encode(), KEY_2.encode(), [files])
    with pytest.raises(WeakKeyError):
        rotate(engine, KEY_1.encode(), b"new", [files])
    with pytest.raises(InputRejected):
        rotate(engine, KEY_1.encode(), KEY_1.encode(), [files])
    engine.dispose()
    assert _key_state(db_url) == before


def test_cli_rotate_reads_the_new_key_from_the_environment(tmp_path, monkeypatch, capsys):
    files = _extracts(tmp_path / "in")
    db = f"sqlite:///{tmp_path / 'w.db'}"
    monkeypatch.delenv("KYPHOWATCH_DEMO", raising=False)
    monkeypatch.setenv("KYPHOWATCH_PSEUDONYM_KEY", KEY_1)
    monkeypatch.setenv("KYPHOWATCH_ARCHIVE_DIR", str(files))
    assert main(["ingest", "--db", db, str(files)]) == 0
    assert main(["keys", "--db", db, "rotate", "--new-key-env", "UNSET_VAR_FOR_TEST"]) == 3
    monkeypatch.setenv("NEW_KYPHOWATCH_KEY", KEY_2)
    assert main(["keys", "--db", db, "rotate", "--new-key-env", "NEW_KYPHOWATCH_KEY"]) == 0
    monkeypatch.setenv("KYPHOWATCH_PSEUDONYM_KEY", KEY_2)
    assert main(["keys", "--db", db, "check"]) == 0
    out = capsys.readouterr()
    assert "re-keyed" in out.out
    for text in (out.out, out.err):
        assert KEY_1 not in text and KEY_2 not in text


_KILL_MIDWAY = """
import os, signal, sys
from pathlib import Path
import sqlalchemy as sa
from pipelines.ingest.keys import rotate

def die(table):
    if table == "procedure_version":  # procedure already rewritten, transaction open
        os.kill(os.getpid(), signal.SIGKILL)

url, old, new, files = sys.argv[1:5]
rotate(sa.create_engine(url), old.encode(), new.encode(), [Path(files)], step=die)
"""


def test_rotation_killed_midway_leaves_the_old_state(db_url, settings_for, tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files], KEY_1)
    before = _key_state(db_url)
    killed = subprocess.run([sys.executable, "-c", _KILL_MIDWAY, db_url, KEY_1, KEY_2,
                             str(files)], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert _key_state(db_url) == before
    rotate(sa.create_engine(db_url), KEY_1.encode(), KEY_2.encode(), [files])  # then it works
    assert _key_state(db_url) != before


def test_unexplained_digest_in_quarantine_refuses_rotation_unless_redacted(
        db_url, settings_for, tmp_path):
    files = _extracts(tmp_path / "in")
    _load(settings_for, db_url, [files], KEY_1)
    stray = secrets.token_hex(32)  # a digest no field of the supplied extracts explains
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        record = conn.execute(sa.select(schema.quarantine).limit(1)).mappings().one()
        conn.execute(schema.quarantine.update().where(
            schema.quarantine.c.source_checksum == record["source_checksum"],
            schema.quarantine.c.record_number == record["record_number"],
        ).values(raw_values=json.dumps({**json.loads(record["raw_values"]), "note": stray})))
    before = _key_state(db_url)
    with pytest.raises(InputRejected, match="--redact-unexplained"):
        rotate(engine, KEY_1.encode(), KEY_2.encode(), [files])
    assert _key_state(db_url) == before
    result = rotate(engine, KEY_1.encode(), KEY_2.encode(), [files], redact_unexplained=True)
    assert result["digests_redacted"] == 1
    with engine.connect() as conn:
        texts = " ".join(conn.scalars(sa.select(schema.quarantine.c.raw_values)))
    engine.dispose()
    assert stray not in texts and "digest-redacted-at-key-rotation" in texts


def test_rotation_waits_for_a_running_load_batch_on_postgres(pg_url, settings_for, tmp_path):
    """A batch holds the key (shared lock); a rotation waits for it, then runs."""
    files = _extracts(tmp_path / "in")
    _load(settings_for, pg_url, [files], KEY_1)
    before = _key_state(pg_url)
    engine = make_engine(pg_url)
    outcome: dict = {}

    def rotate_in_background():
        try:
            outcome["result"] = rotate(engine, KEY_1.encode(), KEY_2.encode(), [files])
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    with key_in_use(engine, KEY_1.encode()):  # a load batch in progress
        worker = threading.Thread(target=rotate_in_background)
        worker.start()
        time.sleep(2.0)
        assert worker.is_alive() and _key_state(pg_url) == before  # waiting, nothing changed
    worker.join(timeout=120)
    assert "error" not in outcome and outcome["result"]["digests_rekeyed"] > 0
    with pytest.raises(KeyMismatchError):  # the next batch under the old key is refused
        with key_in_use(engine, KEY_1.encode()):
            pass
    engine.dispose()
