"""Pseudonym key hygiene: a strength screen, a stored fingerprint, and rotation.

* :func:`check_key_strength` refuses a key shorter than :data:`MIN_KEY_BYTES` or one with
  too little variety (one repeated character, a repeated short pattern). It is a screen
  against placeholders and typing mistakes, not a proof of strength: generate keys with
  ``openssl rand -hex 32`` or ``python -c "import secrets; print(secrets.token_hex(32))"``.
* :func:`key_fingerprint` is the HMAC of a fixed label under the key. It identifies the key
  without revealing it; the warehouse stores it (table ``pseudonym_key``) on first use and
  :func:`ensure_key` refuses any load under a different key, so one patient never gets two
  digests.
* :func:`rotate` re-keys every stored digest in one transaction. HMAC is one-way, so the
  new digests are computed from the raw references in the source extracts (the archive),
  which the operator re-supplies; see docs/keys.md for why this design was chosen. The
  operator pseudonyms derived from the digests (``operator_chart``, training-review alerts)
  are renamed old -> new in the same transaction.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import hmac
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import ConfigError, InputRejected

# 32 bytes = 256 bits of key material when the key is random bytes; a 64-character hex key
# (openssl rand -hex 32) is 64 bytes here, and the shortest key accepted (32 characters of
# hex) still carries 128 bits.
MIN_KEY_BYTES = 32
# Shannon entropy of the key's byte distribution. Random hex scores about 3.8 bits per byte
# (16 symbols), random base64 about 4.9; a word repeated or "aaaa..." scores far below 3.
# The two floors are set so that a random key of the shortest accepted form (32 hex
# characters) is practically never refused: it uses 6 or fewer distinct characters with
# probability 1.8e-10 (exact, 16 symbols, 32 draws), and none of 200,000 such keys scored
# below 2.5 bits per character (the lowest 2.79); 3.0 and 10 refused about 1 in 10,000.
MIN_BITS_PER_BYTE = 2.5
MIN_DISTINCT_BYTES = 7
# The fingerprint label is fixed forever: changing it would orphan every stored fingerprint.
FINGERPRINT_LABEL = b"kyphowatch pseudonym key fingerprint v1"
_SEPARATOR = "\x1f"  # as in pipelines.ingest.pseudonymise
_HEX_DIGEST = re.compile(r"\b[0-9a-f]{64}\b")


class WeakKeyError(ConfigError):
    """The configured pseudonym key is too short or too uniform (exit 3)."""


class KeyMismatchError(ConfigError):
    """The warehouse was loaded under another key (exit 3); nothing was loaded."""


def _smallest_period(data: bytes) -> int:
    """Return the length of the shortest unit whose repetition makes up ``data``."""
    n = len(data)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and data[:period] * (n // period) == data:
            return period
    return n


def key_problems(key: bytes) -> list[str]:
    """Return why ``key`` is unacceptable, or an empty list when it passes the screen."""
    problems = []
    if len(key) < MIN_KEY_BYTES:
        problems.append(f"it is {len(key)} bytes long; at least {MIN_KEY_BYTES} are required")
    counts = Counter(key)
    bits = -sum(c / len(key) * math.log2(c / len(key)) for c in counts.values()) if key else 0.0
    if len(counts) < MIN_DISTINCT_BYTES:
        problems.append(f"it uses only {len(counts)} distinct characters "
                        f"(at least {MIN_DISTINCT_BYTES} required)")
    elif bits < MIN_BITS_PER_BYTE:
        problems.append(f"its characters are too uniform ({bits:.1f} bits per character, at "
                        f"least {MIN_BITS_PER_BYTE:.1f} required)")
    period = _smallest_period(key)
    if key and period < len(key):
        problems.append(f"it is one {period}-character pattern repeated")
    return problems


def check_key_strength(key: bytes, source: str = "KYPHOWATCH_PSEUDONYM_KEY (or the Airflow "
                                                  "variable kyphowatch_pseudonym_key)") -> bytes:
    """Return ``key`` unchanged, or raise :class:`WeakKeyError` naming the problem (never the key)."""
    problems = key_problems(key)
    if problems:
        raise WeakKeyError(
            f"the pseudonym key in {source} is not acceptable: {'; '.join(problems)}. "
            "Generate one with: openssl rand -hex 32"
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """Return the hex HMAC-SHA256 of a fixed label under ``key`` (identifies, never reveals)."""
    return hmac.new(key, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()


def _lock(conn: sa.Connection) -> None:
    """Serialise fingerprint changes across processes on PostgreSQL (SQLite has one writer)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_KEY_LOCK)))


# Arbitrary constants naming kyphowatch's key locks among PostgreSQL advisory locks: the
# registry (pseudonym_key writes) and the batch lock every ingest batch holds shared for its
# whole run, which a rotation takes exclusively -- so no load writes old-key digests while a
# rotation reads and rewrites them.
_KEY_LOCK = 7_406_109
_BATCH_LOCK = 7_406_110


@contextmanager
def key_in_use(engine: sa.Engine, key: bytes) -> Iterator[str]:
    """Check ``key`` against the warehouse (:func:`ensure_key`) and hold it for a load batch.

    On PostgreSQL a session-level shared advisory lock is held until the block ends, so a
    rotation waits for running batches and new batches wait for the rotation (then are
    refused: the key changed). SQLite has a single writer; a rotation whose snapshot a load
    changed fails on its first write and rolls back.
    """
    if engine.dialect.name != "postgresql":
        yield ensure_key(engine, key)
        return
    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock_shared(_BATCH_LOCK)))
        holder.commit()
        try:
            yield ensure_key(engine, key)
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock_shared(_BATCH_LOCK)))
            holder.commit()


def active_fingerprints(conn: sa.Connection) -> list[str]:
    """Return the fingerprints recorded and not retired (normally zero or one)."""
    table = schema.pseudonym_key
    return list(conn.scalars(
        sa.select(table.c.fingerprint).where(table.c.retired_at.is_(None))
        .order_by(table.c.first_used_at)
    ))


def ensure_key(engine: sa.Engine, key: bytes) -> str:
    """Record ``key``'s fingerprint on first use, or refuse a key other than the recorded one.

    Called before any file is loaded. Returns the fingerprint.
    """
    fingerprint = key_fingerprint(key)
    with engine.begin() as conn:
        _lock(conn)
        active = active_fingerprints(conn)
        if not active:
            conn.execute(schema.pseudonym_key.insert().values(
                fingerprint=fingerprint, first_used_at=datetime.now(UTC), retired_at=None))
            return fingerprint
    if fingerprint not in active:
        raise KeyMismatchError(
            f"the pseudonym key has fingerprint {fingerprint[:16]}..., but this warehouse was "
            f"loaded under {active[0][:16]}...; loading would give the same patient two "
            "digests, so nothing was loaded. Set KYPHOWATCH_PSEUDONYM_KEY to the warehouse's "
            "key, or re-key the warehouse with: kyphowatch keys rotate --new-key-env VAR "
            "(see docs/keys.md)"
        )
    return fingerprint


def key_status(conn: sa.Connection, key: bytes | None) -> dict:
    """Describe the recorded fingerprints and whether ``key`` matches (never the key itself)."""
    table = schema.pseudonym_key
    rows = conn.execute(sa.select(table).order_by(table.c.first_used_at)).mappings().all()
    active = [r["fingerprint"] for r in rows if r["retired_at"] is None]
    configured = key_fingerprint(key) if key else None
    if not active:
        state = "unrecorded"
    elif configured is None:
        state = "no-key"
    else:
        state = "match" if configured in active else "mismatch"
    return {
        "state": state,
        "configured_fingerprint": configured,
        "configured_key_problems": key_problems(key) if key else [],
        "keys": [
            {"fingerprint": r["fingerprint"],
             "first_used_at": r["first_used_at"].isoformat() if r["first_used_at"] else None,
             "retired_at": r["retired_at"].isoformat() if r["retired_at"] else None}
            for r in rows
        ],
    }


# --- rotation ------------------------------------------------------------------------


@dataclass
class RotationPlan:
    """What a rotation would change, computed before anything is written."""

    files_used: list[str] = field(default_factory=list)
    files_missing: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)  # old digest -> new digest
    unmatched: int = 0  # stored reference digests no supplied extract explains
    unexplained_tokens: int = 0  # digest-shaped values in quarantine/ledger JSON, unexplained


def _digest(key: bytes, site: str, value: str) -> str:
    from pipelines.ingest.pseudonymise import pseudonymise  # the same digest as at ingest

    return pseudonymise(key, site, value)


def _extract_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file():
            yield path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(path: Path) -> Iterator[list[str]]:
    """Yield the header and records of an extract as lists of strings (gzip transparent)."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if gzipped else path.open("rb")
    with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as text:
        yield from csv.reader(text)


def _candidates(old_key: bytes, new_key: bytes, path: Path, every_field: bool,
                wanted: set[str], mapping: dict[str, str]) -> None:
    """Add to ``mapping`` every wanted old digest a field of ``path`` explains.

    Reference columns are hashed with their row's site, as the loader does. For a file with
    quarantined rows or ledger digests (``every_field``) every field and header cell is also
    tried with an empty site and with the row's site, which covers how quarantine and the
    ledger pseudonymise values they cannot trust.
    """
    rows = _rows(path)
    header = next(rows, [])
    position = {name.strip(): i for i, name in enumerate(header)}
    site_at = position.get("site_id")
    refs = [position[c] for c in ("patient_ref", "operator_ref") if c in position]

    def consider(site: str, value: str) -> None:
        old = _digest(old_key, site, value)
        if old in wanted and old not in mapping:
            mapping[old] = _digest(new_key, site, value)

    if every_field:
        for cell in header:
            consider("", cell)
            consider("", cell.strip().lower())  # header names as the reader normalises them
    for row in rows:
        site = row[site_at] if site_at is not None and site_at < len(row) else ""
        for i in refs:
            if i < len(row) and row[i].strip() != "":
                consider(site.strip(), row[i].strip())  # the validator strips every field
        if every_field:
            for cell in row:
                for variant in {cell, cell.strip()}:
                    for site_variant in {"", site, site.strip()}:
                        consider(site_variant, variant)


_REFERENCE_COLUMNS = (
    (schema.procedure, ("patient_hash", "operator_hash")),
    (schema.procedure_version, ("patient_hash", "operator_hash")),
)
# JSON text columns that may hold digests (quarantined values, dropped header cells).
_TEXT_COLUMNS = (
    (schema.quarantine, ("raw_values",)),
    (schema.file_ledger, ("dropped_columns", "reason")),
)


def _stored_digests(conn: sa.Connection) -> tuple[set[str], set[str]]:
    """Return (reference digests, digest-shaped tokens in JSON columns) held by the warehouse."""
    references: set[str] = set()
    for table, columns in _REFERENCE_COLUMNS:
        for column in columns:
            references.update(v for v in conn.scalars(sa.select(table.c[column]).distinct()) if v)
    tokens: set[str] = set()
    for table, columns in _TEXT_COLUMNS:
        for column in columns:
            for text in conn.scalars(sa.select(table.c[column]).where(table.c[column].is_not(None))):
                tokens.update(_HEX_DIGEST.findall(text))
    return references, tokens


def plan_rotation(conn: sa.Connection, old_key: bytes, new_key: bytes,
                  extract_paths: list[Path]) -> RotationPlan:
    """Work out the old-to-new digest mapping from the re-supplied source extracts."""
    references, tokens = _stored_digests(conn)
    ledger = dict(conn.execute(
        sa.select(schema.file_ledger.c.source_checksum, schema.file_ledger.c.file_name)
    ).all())
    # Files whose quarantine rows or ledger entry may hold digests of arbitrary fields.
    detail_files = set(conn.scalars(sa.select(schema.quarantine.c.source_checksum).distinct()))
    detail_files |= {c for c, text in conn.execute(sa.select(
        schema.file_ledger.c.source_checksum, schema.file_ledger.c.dropped_columns))
        if text and _HEX_DIGEST.search(text)}
    plan = RotationPlan()
    seen: set[str] = set()
    for path in _extract_files(extract_paths):
        checksum = _sha256(path)
        if checksum not in ledger or checksum in seen:
            continue
        seen.add(checksum)
        plan.files_used.append(path.name)
        _candidates(old_key, new_key, path, checksum in detail_files,
                    references | tokens, plan.mapping)
    plan.unmatched = len(references - plan.mapping.keys())
    plan.unexplained_tokens = len(tokens - plan.mapping.keys())
    loaded_files = set(conn.scalars(sa.select(schema.procedure_version.c.source_checksum)
                                    .distinct())) | detail_files
    plan.files_missing = sorted(ledger[c] for c in loaded_files - seen if c in ledger)
    return plan


# Replaces a digest-shaped value in quarantine or the ledger that no supplied field explains,
# when the operator chose --redact-unexplained: left as it was, it would stay an old-key digest.
UNEXPLAINED = "digest-redacted-at-key-rotation"


def _rewrite(conn: sa.Connection, table: sa.Table, columns, transform) -> int:
    """Apply ``transform`` to ``columns`` of every row of ``table``; return rows changed."""
    pk = [c.name for c in table.primary_key]
    updates = []
    for row in conn.execute(sa.select(*[table.c[n] for n in pk + list(columns)])).mappings():
        new = {c: transform(row[c]) for c in columns}
        if any(new[c] != row[c] for c in columns):
            updates.append({**{f"k_{n}": row[n] for n in pk}, **new})
    if updates:
        stmt = table.update().where(
            *[table.c[n] == sa.bindparam(f"k_{n}") for n in pk]
        ).values({c: sa.bindparam(c) for c in columns})
        conn.execute(stmt, updates)
    return len(updates)


def _apply(conn: sa.Connection, mapping: dict[str, str], *, redact: bool = False,
           step=None) -> dict[str, int]:
    """Rewrite every stored digest through ``mapping``; return rows changed per table."""

    def digest(value):  # a column that holds one digest
        return mapping.get(value, value)

    def swap(match: re.Match) -> str:
        old = match.group(0)
        return mapping.get(old, UNEXPLAINED if redact else old)

    def text(value):  # free text (quarantine values, ledger notes) with digests inside
        return _HEX_DIGEST.sub(swap, value) if value else value

    changed: dict[str, int] = {}
    for tables, transform in ((_REFERENCE_COLUMNS, digest), (_TEXT_COLUMNS, text)):
        for table, columns in tables:
            changed[table.name] = _rewrite(conn, table, columns, transform)
            if step:
                step(table.name)
    return changed


def _operator_renames(conn: sa.Connection, mapping: dict[str, str]) -> dict[str, str]:
    """Return old -> new display pseudonym of every stored operator digest (before re-keying)."""
    from pipelines.surveillance.operators import pseudonym_renames

    digests: set[str] = set()
    for table in (schema.procedure, schema.procedure_version):
        digests.update(conn.scalars(sa.select(table.c.operator_hash).distinct()
                                    .where(table.c.operator_hash.is_not(None))))
    return pseudonym_renames(mapping, digests)


def _rename_operators(conn: sa.Connection, renames: dict[str, str], now: datetime
                      ) -> dict[str, int]:
    """Rename the operator pseudonyms stored outside the procedure tables; rows per table.

    The pseudonym is ``OP-`` and ten hex digits of the operator's digest, so it changes with
    the key. The chart rows (``operator_chart``, the report's and beyond-report's source) and
    the training-review alerts (their dedupe key, title and payload) take the new one, so
    the next monitor and sync match them: one alert per finding, no second e-mail.
    """
    from pipelines.alerts.beyond import rename_operator_alerts

    chart = schema.operator_chart
    rows = [dict(r) for r in conn.execute(sa.select(chart)).mappings()
            if r["operator"] in renames]
    if rows:  # the pseudonym is in the primary key: replace the rows
        conn.execute(chart.delete().where(chart.c.operator.in_([r["operator"] for r in rows])))
        conn.execute(chart.insert(), [{**r, "operator": renames[r["operator"]]} for r in rows])
    return {chart.name: len(rows), schema.alert.name: rename_operator_alerts(conn, renames, now)}


def rotate(engine: sa.Engine, old_key: bytes, new_key: bytes, extract_paths: list[Path],
           *, redact_unexplained: bool = False, step=None) -> dict:
    """Re-key every stored digest from ``old_key`` to ``new_key`` in one transaction.

    Refused (nothing changes) when ``old_key`` is not the warehouse's recorded key, the new
    key fails the strength screen or equals the old one, or a loaded file is missing from
    ``extract_paths`` / a stored reference digest is explained by no supplied extract. A
    digest-shaped value in quarantine or the ledger that no field explains also refuses the
    rotation, unless ``redact_unexplained`` replaces it with :data:`UNEXPLAINED`.
    ``step`` is called after each table (tests use it to fail midway).
    """
    check_key_strength(new_key, "the new key")
    old_print, new_print = key_fingerprint(old_key), key_fingerprint(new_key)
    if old_print == new_print:
        raise InputRejected("the new key is the key already in use; nothing to rotate")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # wait for running load batches, block new ones
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_BATCH_LOCK)))
        _lock(conn)
        active = active_fingerprints(conn)
        if active and old_print not in active:
            raise KeyMismatchError(
                f"KYPHOWATCH_PSEUDONYM_KEY (fingerprint {old_print[:16]}...) is not this "
                f"warehouse's key ({active[0][:16]}...); rotation needs the current key")
        plan = plan_rotation(conn, old_key, new_key, extract_paths)
        if plan.files_missing or plan.unmatched:
            shown = ", ".join(plan.files_missing[:5]) + (" ..." if len(plan.files_missing) > 5
                                                         else "")
            raise InputRejected(
                f"cannot re-key: {len(plan.files_missing)} loaded file(s) not found among the "
                f"supplied extracts{(' (' + shown + ')') if shown else ''} and "
                f"{plan.unmatched} stored reference digest(s) unexplained; supply every "
                "loaded extract (the archive directory) with --extracts. Nothing was changed."
            )
        if plan.unexplained_tokens and not redact_unexplained:
            raise InputRejected(
                f"cannot re-key: {plan.unexplained_tokens} digest-shaped value(s) in quarantine "
                "or the file ledger are not explained by any field of the supplied extracts; "
                "supply the missing extracts, or rerun with --redact-unexplained to replace "
                f"them with {UNEXPLAINED!r}. Nothing was changed."
            )
        try:
            renames = _operator_renames(conn, plan.mapping)
        except ValueError as exc:
            raise InputRejected(f"cannot re-key: {exc}. Nothing was changed.") from None
        changed = _apply(conn, plan.mapping, redact=redact_unexplained, step=step)
        changed.update(_rename_operators(conn, renames, datetime.now(UTC)))
        if step:
            step("operator pseudonyms")
        # The monitor's snapshot cache holds operator and patient digests under the old key
        # (snapshot_cache.py): dropped with them; the next monitor run reads everything.
        conn.execute(schema.snapshot_cache.delete())
        now = datetime.now(UTC)
        table = schema.pseudonym_key
        conn.execute(table.update().where(table.c.retired_at.is_(None)).values(retired_at=now))
        conn.execute(table.insert().values(fingerprint=new_print, first_used_at=now,
                                           retired_at=None))
    return {"old_fingerprint": old_print, "new_fingerprint": new_print,
            "files_used": len(plan.files_used), "digests_rekeyed": len(plan.mapping),
            "digests_redacted": plan.unexplained_tokens if redact_unexplained else 0,
            "rows_changed": changed}


# --- command line --------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``keys`` sub-command (``check`` and ``rotate``)."""
    parser = subparsers.add_parser(
        "keys", help="pseudonym key fingerprint status and rotation",
        description="Show the warehouse's pseudonym key fingerprint, or re-key it (docs/keys.md).",
    )
    db_help = "warehouse URL (default: KYPHOWATCH_DB_URL or SQLite)"
    parser.add_argument("--db", help=db_help)
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    # --db after the action too, as every other command takes it (user audit: `keys check
    # --db URL` was refused). SUPPRESS keeps a --db given before the action.
    check = actions.add_parser("check", help="print the fingerprint status (never the key)")
    check.add_argument("--db", help=db_help, default=argparse.SUPPRESS)
    check.add_argument("--json", action="store_true", help="print the status as JSON")
    check.set_defaults(handler=_run_check)
    rot = actions.add_parser(
        "rotate", help="re-key every stored digest in one transaction",
        description="Re-key the warehouse from KYPHOWATCH_PSEUDONYM_KEY to the key in the "
                    "named environment variable, recomputing digests from the source extracts.",
    )
    rot.add_argument("--db", help=db_help, default=argparse.SUPPRESS)
    rot.add_argument("--new-key-env", required=True, metavar="VAR",
                     help="environment variable holding the new key (never pass it as an argument)")
    rot.add_argument("--extracts", nargs="+", type=Path, metavar="PATH",
                     help="the loaded extract files or directories (default: the archive and "
                          "rejected directories, KYPHOWATCH_ARCHIVE_DIR and _REJECTED_DIR)")
    rot.add_argument("--redact-unexplained", action="store_true",
                     help="replace digest-shaped quarantine/ledger values that no supplied "
                          "field explains (instead of refusing the rotation)")
    rot.set_defaults(handler=_run_rotate)


def _run_check(args: argparse.Namespace) -> int:
    from pipelines.db import reading, require_warehouse
    from pipelines.settings import load_settings

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    key = settings.pseudonym_key.encode("utf-8") if settings.pseudonym_key else None
    with reading(settings.db_url) as conn:
        status = key_status(conn, key)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        messages = {
            "unrecorded": "no key recorded yet (the first load records its fingerprint)",
            "no-key": "KYPHOWATCH_PSEUDONYM_KEY is not set",
            "match": "KYPHOWATCH_PSEUDONYM_KEY matches the warehouse's key",
            "mismatch": "KYPHOWATCH_PSEUDONYM_KEY is NOT the warehouse's key: loads are refused",
        }
        print(f"status: {status['state']} - {messages[status['state']]}")
        if status["configured_fingerprint"]:
            print(f"configured key fingerprint: {status['configured_fingerprint']}")
        for problem in status["configured_key_problems"]:
            print(f"configured key too weak: {problem}")
        for row in status["keys"]:
            retired = f"retired {row['retired_at']}" if row["retired_at"] else "ACTIVE"
            print(f"  {row['fingerprint']}  first used {row['first_used_at']}  {retired}")
    return 0 if status["state"] in ("match", "unrecorded") else 3


def _run_rotate(args: argparse.Namespace) -> int:
    import os

    from pipelines.db import open_warehouse, require_warehouse
    from pipelines.settings import load_settings

    settings = load_settings(db_url=args.db)
    new_raw = os.environ.get(args.new_key_env)
    if not new_raw:
        raise ConfigError(f"environment variable {args.new_key_env} is not set or empty")
    if not settings.pseudonym_key:
        raise ConfigError("KYPHOWATCH_PSEUDONYM_KEY (the current key) must be set to rotate")
    require_warehouse(settings.db_url)
    engine = open_warehouse(settings.db_url)
    try:
        result = rotate(engine, settings.pseudonym_key.encode("utf-8"),
                        new_raw.encode("utf-8"),
                        args.extracts or [settings.archive_dir, settings.rejected_dir],
                        redact_unexplained=args.redact_unexplained)
    finally:
        engine.dispose()
    print(f"re-keyed {result['digests_rekeyed']} digest(s) from {result['files_used']} "
          f"extract(s): {result['old_fingerprint'][:16]}... retired, "
          f"{result['new_fingerprint'][:16]}... active")
    if result["digests_redacted"]:
        print(f"  {result['digests_redacted']} unexplained digest(s) redacted")
    for table, rows in result["rows_changed"].items():
        print(f"  {table:<20} {rows:>8} row(s) changed")
    print(f"now set KYPHOWATCH_PSEUDONYM_KEY to the value of {args.new_key_env}")
    return 0
