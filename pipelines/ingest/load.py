"""Idempotent, order-independent loading of validated extracts into the warehouse.

One file is one transaction. Inside it, valid rows go to a temporary staging table
(PostgreSQL ``COPY``; SQLite batched inserts), bad rows to ``quarantine``; the file
is then checked as a whole (duplicate ids within the file, complications that
contradict their procedure, share of bad rows) and merged with set-based SQL:

* every delivered row is kept in ``*_version`` (the correction history);
* the current table keeps, per business key, the version from the newest delivery,
  ordered by ``(extract_ts, source_checksum)``; a file whose changes that order cannot
  decide on its stamp alone (no stamp, or the current version's stamp) is held as "needs a
  stamp" instead of letting the checksum decide (``_hold_unordered_corrections``). Because that order is a property of
  the deliveries, not of the load order, loading files again, in any order, or after
  a crash (the transaction rolls back), ends in the same state as one clean load;
* a complication whose procedure is unknown waits in ``pending_complication`` and is
  promoted when its procedure arrives;
* the ``file_ledger`` row is written in the same transaction, so a file is either
  fully loaded and recorded, or not at all. A file whose checksum is already loaded
  is a no-op.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipelines import schema
from pipelines.contract import (
    COLUMNS,
    COMPLICATIONS,
    FALSE_WORDS,
    ID_PATTERN,
    KEY_COLUMN,
    LEVEL_PATTERN,
    PROCEDURES,
    SITE_PATTERN,
    TRUE_WORDS,
    extract_stamp,
    kind_of,
)
from pipelines.ingest import gxaudit
from pipelines.ingest.fastcheck import Audit
from pipelines.ingest.pseudonymise import pseudonymise_column
from pipelines.ingest.reader import (
    ExtractFile,
    FileRejected,
    ReadLimits,
    check_time,
    display_name,
    iter_chunks,
    open_checked,
    open_extract,
    paused_gc,
    unread_checksum,
)
from pipelines.ingest.validate import validate_chunk

log = logging.getLogger(__name__)

PROCEDURE_VALUE_COLUMNS = [
    c.name for c in schema.procedure.columns if c.name not in ("source_checksum", "extract_ts")
]
COMPLICATION_VALUE_COLUMNS = [
    c.name for c in schema.complication.columns if c.name not in ("source_checksum", "extract_ts")
]
SITE_RE = re.compile(SITE_PATTERN)
ID_RE = re.compile(ID_PATTERN)
UNSTAMPED = "00000000T000000"


@dataclass
class FileResult:
    """What happened to one file."""

    path: str
    kind: str | None
    status: str  # loaded | duplicate | rejected
    reason: str | None = None
    checksum: str | None = None
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0  # older than the version already current; kept in history only
    ambiguous: int = 0  # changed rows the stamps cannot order (the file is then held)
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    promoted: int = 0  # pending complications that found their procedure in this file
    dropped_columns: list[str] = field(default_factory=list)
    # The file name as stored and reported (reader.display_name): the sender's name, or a
    # keyed hash of it when it holds unexpected parts (an identifier typed into it).
    shown_name: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-ready dict; ``path`` carries the shown name, never a raw one."""
        values = asdict(self)
        if self.shown_name:
            values["path"] = str(Path(self.path).with_name(self.shown_name))
        return values


@dataclass
class IngestReport:
    """Results for every file of one ingest call."""

    files: list[FileResult]
    # Sites with procedures now that had none before this call: a first extract from a
    # site, or a mistyped site id that would otherwise become a phantom site unnoticed.
    new_sites: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every file was processed, 2 when any file was rejected."""
        return 2 if any(f.status == "rejected" for f in self.files) else 0

    @property
    def loaded_kinds(self) -> set[str]:
        """Extract kinds for which at least one file changed the warehouse."""
        return {f.kind for f in self.files if f.status == "loaded" and f.kind}

    def to_dict(self) -> dict:
        """Return a JSON-ready dict with per-file results and totals."""
        totals = Counter()
        for result in self.files:
            totals[result.status] += 1
            for name in ("rows_read", "inserted", "updated", "unchanged", "stale",
                         "quarantined", "pending", "promoted"):
                totals[name] += getattr(result, name)
        return {
            "files": [f.to_dict() for f in self.files],
            "totals": dict(totals),
            "new_sites": list(self.new_sites),
            "exit_code": self.exit_code,
        }


# --- staging -------------------------------------------------------------------------


# Rows inserted by one file above which the target tables are analysed at once.
LARGE_LOAD_ROWS = 50_000
TARGETS = {
    PROCEDURES: (schema.procedure, schema.procedure_version),
    COMPLICATIONS: (schema.complication, schema.complication_version,
                    schema.pending_complication),
}


# The history tables are read by the loader only, and only by key (``_none_present``'s
# probes, ``ON CONFLICT`` on the primary key, a direct load's repeated keys): after a large
# load their planner statistics are taken on the primary key's columns alone. The other
# columns' statistics were most of ANALYZE's cost there (1M procedure versions: 0.63-0.77 s
# for every column, 0.24-0.29 s for the key; issue 10), and no statement filters on them.
KEY_ONLY_STATISTICS = (schema.procedure_version, schema.complication_version)


# The stage's columns its statements join or filter on (the record number, the keys, and the
# complications' match with their procedures on site and date); the stage is this file's
# temporary table, so its statistics plan this file's statements only. Its other columns'
# statistics were half of its ANALYZE (295k complications, issue 10).
STAGE_STATISTICS = (
    "record_number",
    "procedure_id",
    "complication_id",
    "site_id",
    "procedure_date",
    "event_date",
)


def _analyze(conn: sa.Connection, table: sa.Table) -> None:
    """Give PostgreSQL's planner statistics for ``table`` (no-op on SQLite).

    Autovacuum never analyses temporary tables, and may not yet have analysed a freshly
    loaded one; without statistics the planner can turn the stage-to-warehouse probes into
    nested loops over the whole warehouse (235 s for a 1,000-row nightly file into a
    1M-procedure warehouse, issue 10). The identifier is a schema table name, quoted. A
    table of :data:`KEY_ONLY_STATISTICS` is analysed on its primary key's columns (the row
    count and page count are set either way); a stage (``kw_stage_...``) on the columns of
    :data:`STAGE_STATISTICS` it has.
    """
    if conn.dialect.name != "postgresql":
        return
    quote = conn.dialect.identifier_preparer.quote
    statement = "ANALYZE " + quote(table.name)
    columns: list[str] = []
    keyed = {history.name: history for history in KEY_ONLY_STATISTICS}
    if table.name in keyed:
        columns = [column.name for column in keyed[table.name].primary_key.columns]
    elif table.name.startswith("kw_stage_") and table.name != _PROCEDURE_MATCH.name:
        columns = [name for name in STAGE_STATISTICS if name in table.c]
    if columns:  # names from this module's tables, quoted
        statement += " (" + ", ".join(quote(name) for name in columns) + ")"
    conn.exec_driver_sql(statement)


def _stage_table(kind: str) -> sa.Table:
    columns = PROCEDURE_VALUE_COLUMNS if kind == PROCEDURES else COMPLICATION_VALUE_COLUMNS
    source = schema.procedure if kind == PROCEDURES else schema.complication
    stage_meta = sa.MetaData()
    return sa.Table(
        f"kw_stage_{kind}",
        stage_meta,
        *[sa.Column(name, source.c[name].type) for name in columns],
        sa.Column("record_number", sa.Integer, nullable=False),
        prefixes=["TEMPORARY"],
    )


@dataclass(frozen=True)
class _CopyPayload:
    """The rows of one COPY, rendered in ``format`` (``binary`` or ``csv``), in parts."""

    format: str
    parts: tuple[bytes | memoryview, ...]


def _copy_into(conn: sa.Connection, tables: list[sa.Table], names: list[str],
               payload: _CopyPayload) -> None:
    """PostgreSQL ``COPY`` of one rendered payload into each of ``tables``."""
    from psycopg import sql

    # The format is one of two fixed keywords chosen by _copy_payload, never input.
    options = sql.SQL("FORMAT binary" if payload.format == "binary" else "FORMAT csv")
    cursor = conn.connection.driver_connection.cursor()
    for table in tables:
        statement = sql.SQL("COPY {} ({}) FROM STDIN WITH ({})").format(
            sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, names)), options
        )
        with cursor.copy(statement) as copy:
            for part in payload.parts:
                copy.write(part)


def _write_stage(conn: sa.Connection, stage: sa.Table, frame: pd.DataFrame) -> None:
    """Append rows to the staging table (COPY on PostgreSQL, executemany elsewhere)."""
    if frame.empty:
        return
    names = [c.name for c in stage.columns]
    frame = frame[names]
    if conn.dialect.name == "postgresql":
        _copy_into(conn, [stage], names, _copy_payload(frame, [stage]))
        return
    # Raw tuples through the DB-API cursor: SQLAlchemy's executemany would build and
    # process one dict per row (several times the cost of the insert itself).
    with paused_gc():  # one tuple per row; no cycles among them
        columns = [_python_values(frame[name], stage.c[name].type) for name in names]
        rows = list(zip(*columns, strict=True))
    compiled = stage.insert().compile(dialect=conn.dialect, column_keys=names)
    if list(compiled.positiontup or ()) != names:  # binds not positional in column order
        conn.execute(stage.insert(), [dict(zip(names, row, strict=True)) for row in rows])
        return
    conn.connection.driver_connection.executemany(str(compiled), rows)


def _copy_payload(frame: pd.DataFrame, tables: list[sa.Table]) -> _CopyPayload:
    """Render rows for COPY into ``tables``: binary when every column allows it, else csv.

    Binary COPY stores the same values (tested against csv) and costs the server about a
    fifth less per row (no text parsing of dates, integers and booleans; 2.28 -> 1.7 s of
    backend CPU for 250,000 procedure versions, measured); the server's share is the
    largest part of a bulk load (issue 10). A frame the binary encoder does not cover (an
    unexpected column type, an integer outside its column's range) goes as csv, so the
    server judges it exactly as before.
    """
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    parts = _binary_copy_rows(table, tables)
    if parts is None:
        return _CopyPayload("csv", (_csv_rows(table),))
    return _CopyPayload("binary", parts)


def _csv_rows(table) -> memoryview:
    """Render an Arrow table as COPY csv: nulls unquoted-empty (NULL), booleans true/false, ISO dates.

    Arrow's C++ writer is several times faster than ``DataFrame.to_csv``. Text values are
    never empty strings here (validation turned empty text into nulls), so quoting every
    text value changes nothing PostgreSQL stores.
    """
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False))
    return memoryview(sink.getvalue())


# PostgreSQL's binary COPY format (docs: COPY, "Binary Format"): a signature, flags and
# header-extension length, then per row a 16-bit field count and per field a 32-bit
# big-endian length (-1 for NULL) and the value in the type's binary send format.
_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_BINARY_TRAILER = b"\xff\xff"
_NULL_FIELD = b"\xff\xff\xff\xff"
_PG_EPOCH_DAYS = 10_957  # 2000-01-01 (PostgreSQL's date zero) in days since 1970-01-01
# Column types with a binary encoding here, and the encoding. Exact classes only (a
# subclass such as Enum may have another server type).
_BINARY_TYPES = {sa.String: "text", sa.Date: "date", sa.SmallInteger: "int2",
                 sa.Integer: "int4", sa.Boolean: "bool"}
# The send format's big-endian layout of each fixed-width encoding.
_BINARY_DTYPES = {"date": ">i4", "int2": ">i2", "int4": ">i4", "bool": "|u1"}
# Rows rendered at a time: a slice's intermediate arrays (each column's fields, then their
# join) live only while it is rendered, so only the finished bytes add up and a large
# KYPHOWATCH_CHUNK_ROWS (up to 10M) costs what the csv payload did. Measured on 1M rows
# of six procedure columns: Arrow's peak 367 MB in one piece, 222 MB in slices, csv 230 MB.
_BINARY_SLICE_ROWS = 131_072


def _binary_copy_rows(table, tables: list[sa.Table]) -> tuple[bytes | memoryview, ...] | None:
    """The binary COPY rendering of an Arrow table's rows (header, rows, trailer), or None.

    None when the encoder does not cover the table: every target table must give each
    column the same covered type; dates must be Arrow
    dates, integers must fit their column (else the server's own range error must come
    from the csv route), booleans Arrow booleans, text Arrow strings; an all-null column
    (Arrow ``null``) is NULL in every row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds = []
    for name in table.column_names:
        found = {_BINARY_TYPES.get(type(target.c[name].type)) for target in tables}
        if len(found) != 1 or None in found:
            return None
        kinds.append(found.pop())
    parts: list[bytes | memoryview] = [_BINARY_HEADER]
    for start in range(0, table.num_rows, _BINARY_SLICE_ROWS):
        body = _binary_body(table.slice(start, _BINARY_SLICE_ROWS), kinds, pa, pc)
        if body is None:
            return None
        parts.append(body)
    parts.append(_BINARY_TRAILER)
    return tuple(parts)


def _binary_body(table, kinds: list[str], pa, pc) -> memoryview | None:
    """The binary COPY rows of a (non-empty) Arrow table, or None where not covered.

    A row is fixed-width runs (the field count, text lengths, dates, integers, booleans)
    between the text values. Each run is packed for every row at once in one numpy record
    array, and the rows are one join of the runs and the text columns (a column with a
    null date, integer or boolean is its own argument, its NULL marker shorter than a
    value). One join instead of a join per text column and a copy per fixed-width column:
    the same bytes (tested against the column-by-column rendering) for about 40 % less of
    the loading process's CPU (58-60 -> 34 ms per 100,000 procedure versions, measured).
    """
    rows = table.num_rows
    arguments: list = []  # the join's arguments, in row order
    run: list[tuple[np.dtype, object]] = [(np.dtype(">i2"), len(kinds))]  # fixed-width, pending

    def close_run() -> None:
        if run:
            record = np.empty(rows, dtype=[(f"f{i}", dtype) for i, (dtype, _) in enumerate(run)])
            for i, (_, value) in enumerate(run):
                record[f"f{i}"] = value
            arguments.append(_fixed_width(record, record.dtype.itemsize, rows, pa))
            run.clear()

    for column, kind in zip(table.columns, kinds, strict=True):
        values = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        if kind == "text" and (pa.types.is_string(values.type)
                               or pa.types.is_large_string(values.type)):
            data = values.cast(pa.large_binary())
            # A NULL is the length -1 and no bytes.
            run.append((np.dtype(">i4"), pc.fill_null(pc.binary_length(data), -1)
                        .to_numpy(zero_copy_only=False)))
            close_run()
            arguments.append(pc.fill_null(data, b"") if data.null_count else data)
            continue
        if kind != "text" and not pa.types.is_null(values.type) and not values.null_count:
            numbers = _fixed_numbers(values, kind, pa, pc)
            if numbers is None:
                return None
            dtype = np.dtype(_BINARY_DTYPES[kind])
            run.extend([(np.dtype(">i4"), dtype.itemsize), (dtype, numbers)])
            continue
        field = _binary_field(values, kind, rows, pa, pc)  # nulls, or not covered (None)
        if field is None:
            return None
        close_run()
        arguments.append(field)
    close_run()
    joined = pc.binary_join_element_wise(*arguments, pa.scalar(b"", pa.large_binary()))
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64, count=rows + 1,
                            offset=joined.offset * 8)
    return memoryview(joined.buffers()[2])[offsets[0]:offsets[-1]]


def _binary_field(values, kind: str, rows: int, pa, pc):
    """One column's fields (length + value, or the NULL marker) as a large_binary array."""
    null_field = pa.scalar(_NULL_FIELD, pa.large_binary())
    if pa.types.is_null(values.type):
        return pa.array([_NULL_FIELD] * rows, type=pa.large_binary())
    if kind == "text":
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            return None
        data = values.cast(pa.large_binary())
        lengths = pc.fill_null(pc.binary_length(data), 0).to_numpy(zero_copy_only=False)
        prefix = _fixed_width(lengths.astype(">i4"), 4, rows, pa)
        field = pc.binary_join_element_wise(prefix, data, pa.scalar(b"", pa.large_binary()))
        return pc.fill_null(field, null_field) if data.null_count else field
    numbers = _fixed_numbers(values, kind, pa, pc)
    if numbers is None:
        return None
    dtype = np.dtype(_BINARY_DTYPES[kind])
    width = dtype.itemsize
    record = np.empty(rows, dtype=[("length", ">i4"), ("value", dtype)])
    record["length"] = width
    record["value"] = numbers
    field = _fixed_width(record, 4 + width, rows, pa)
    return pc.if_else(pc.is_null(values), null_field, field) if values.null_count else field


def _fixed_numbers(values, kind: str, pa, pc) -> np.ndarray | None:
    """A date, integer or boolean column's values as numbers (nulls as 0), or None if not covered."""
    if kind == "bool":
        if not pa.types.is_boolean(values.type):
            return None
        return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype("|u1")
    if kind == "date":
        if values.type != pa.date32():
            return None
        return (pc.fill_null(values.cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
                .astype(np.int64) - _PG_EPOCH_DAYS)
    if not pa.types.is_integer(values.type):  # int2, int4
        return None
    numbers = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
    info = np.iinfo(np.dtype(_BINARY_DTYPES[kind]))
    if len(numbers) and (numbers.min() < info.min or numbers.max() > info.max):
        return None
    return numbers


def _fixed_width(array: np.ndarray, width: int, rows: int, pa):
    """Packed fixed-width records (a contiguous numpy array) as a large_binary array."""
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), rows, [None, pa.py_buffer(np.ascontiguousarray(array))]
    )
    return fixed.cast(pa.large_binary())


def _python_values(column: pd.Series, kind: sa.types.TypeEngine | None = None) -> list:
    """Return a column as DB-API values (None for missing; dates as ISO text on SQLite).

    The raw cursor does not run SQLAlchemy's type processors, so dates are rendered here
    the way SQLAlchemy's SQLite ``Date`` type stores them (``YYYY-MM-DD``).
    """
    values = column.astype(object)
    out = values.where(column.notna(), None).tolist()
    if isinstance(kind, sa.Date):
        out = [None if value is None else value.isoformat() for value in out]
    return out


# --- quarantine ----------------------------------------------------------------------


# A quarantined value is stored as text only when it has its column's shape; anything
# else (a patient reference typed into ``indication``, a shifted row) is stored as its
# keyed hash under ``<column>_hmac``. References are always hashed (``*_hash``).
_SHAPES = {
    "id": re.compile(ID_PATTERN),
    "site": re.compile(SITE_PATTERN),
    "level": re.compile(LEVEL_PATTERN),
    "date": re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
    "int": re.compile(r"^[+-]?[0-9]{1,9}$"),
}
_SPECS = {kind: {spec.name: spec for spec in specs} for kind, specs in COLUMNS.items()}
# Columns that reach quarantine already pseudonymised (rows taken back from staging).
_HASH_COLUMNS = {"patient_hash", "operator_hash"}


def _has_shape(kind: str, name: str, value: str) -> bool:
    """Whether ``value`` looks like a value of column ``name`` (safe to store as text)."""
    spec = _SPECS[kind].get(name)
    if spec is None:
        return False
    if spec.dtype in _SHAPES:
        return bool(_SHAPES[spec.dtype].match(value))
    if spec.dtype == "enum":
        return value in spec.allowed
    if spec.dtype == "bool":
        return value.lower() in TRUE_WORDS | FALSE_WORDS
    return False  # free text and any type without a shape rule: never stored raw


def _keyed(key: bytes, value: str) -> str:
    from pipelines.ingest.pseudonymise import pseudonymise

    return pseudonymise(key, "", value)


def _raw_for_quarantine(values: dict, key: bytes, kind: str = PROCEDURES) -> str:
    """Serialise a row's values for quarantine: well-shaped values as text, others hashed.

    Patient and operator references become their pseudonym (``*_hash``, the same digest the
    warehouse uses); a value failing its column's shape check becomes ``<column>_hmac``.
    """
    from pipelines.ingest.pseudonymise import pseudonymise

    clean: dict[str, object] = {}
    raw_site = str(values.get("site_id") or "")
    for name, value in values.items():
        if name in ("patient_ref", "operator_ref"):
            clean[name.replace("_ref", "_hash")] = (
                pseudonymise(key, raw_site, str(value)) if value not in (None, "") else None
            )
            continue
        if value is None or value == "" or name in _HASH_COLUMNS:
            clean[name] = value
            continue
        if isinstance(value, date):
            clean[name] = value.isoformat()
            continue
        if isinstance(value, (bool, int)):
            clean[name] = value
            continue
        text = str(value)
        if _has_shape(kind, name, text.strip()):
            clean[name] = text
        else:
            clean[f"{name}_hmac"] = _keyed(key, text)
    return json.dumps(clean, sort_keys=True, default=str)


class _Quarantine:
    """Collects quarantined rows for one file and writes them in batches."""

    def __init__(self, conn: sa.Connection, extract: ExtractFile, key: bytes,
                 file_name: str | None = None):
        self.conn, self.extract, self.key = conn, extract, key
        self.file_name = file_name or extract.path.name
        self.reasons: Counter[str] = Counter()
        self.count = 0

    def add(self, rows: list[tuple[int, dict, list[str]]]) -> None:
        """Quarantine ``(record_number, raw values, reasons)`` rows."""
        if not rows:
            return
        now = datetime.now(UTC)
        key_column = KEY_COLUMN[self.extract.kind]
        payload = []
        for record_number, values, reasons in rows:
            self.reasons.update(reasons)
            record_id = values.get(key_column)
            site = values.get("site_id")
            payload.append(
                {
                    "source_checksum": self.extract.checksum,
                    "record_number": record_number,
                    "file_name": self.file_name,
                    "kind": self.extract.kind,
                    # Only a well-formed site id is kept as a column (views and the report
                    # group by it); in a shifted row this field can hold anything, even a
                    # patient reference, which stays only inside raw_values (pseudonymised).
                    "site_id": str(site) if site and SITE_RE.fullmatch(str(site)) else None,
                    "record_id": (str(record_id) if record_id and ID_RE.fullmatch(str(record_id))
                                  else None),
                    "raw_values": (values["preview"] if "preview" in values
                                   else _raw_for_quarantine(values, self.key, self.extract.kind)),
                    "reasons": json.dumps(sorted(set(reasons))),
                    "quarantined_at": now,
                }
            )
        self.count += len(payload)
        self.conn.execute(schema.quarantine.insert(), payload)


# --- the load ------------------------------------------------------------------------


def _misshapen(row: list[str], extract: ExtractFile, key: bytes, preview_fields: int) -> dict:
    """Describe a row with the wrong number of fields as a bounded, keyed-hash preview.

    Fields cannot be matched to columns reliably when the count is wrong, so no value is
    stored as text: only the keyed hashes of the first ``preview_fields`` fields (the record
    number locates the row in the sender's file), never one entry per field of a row that
    may have a thousand.
    """
    site_index = extract.header.index("site_id")
    site = row[site_index].strip() if len(row) > site_index else ""
    preview = {
        "field_count": len(row),
        "expected_field_count": len(extract.header),
        "preview_fields": min(len(row), preview_fields),
        "fields_hmac": [_keyed(key, value) for value in row[:preview_fields]],
    }
    return {
        "site_id": site if SITE_RE.fullmatch(site) else None,
        "preview": json.dumps(preview, sort_keys=True),
    }


def _prepare_valid(frame: pd.DataFrame, kind: str, key: bytes) -> pd.DataFrame:
    out = frame.copy()
    if kind == PROCEDURES:
        out["patient_hash"] = pseudonymise_column(key, out["site_id"], out["patient_ref"])
        out["operator_hash"] = pseudonymise_column(key, out["site_id"], out["operator_ref"])
        out = out.drop(columns=["patient_ref", "operator_ref"])
    else:
        out["vertebral_level"] = out["vertebral_level"].where(out["vertebral_level"].notna(), None)
    out["record_number"] = out.index.astype("int64")
    return out


# A first procedures file of at least this many bytes (about 50,000 rows; the file on disk, so
# a compressed one must hold several times more) is a bulk load: its target tables' indexes
# are set aside during the COPY and rebuilt after it (see _SetAsideIndex).
BULK_LOAD_BYTES = 8_000_000


@dataclass(frozen=True)
class _SetAsideIndex:
    """An index of a direct load's target table, dropped before the COPY and rebuilt after.

    Maintaining ``procedure``'s and ``procedure_version``'s indexes row by row was about
    half of the server's work in a 1M-row first load (COPY into the bare tables 5.7-7.9 s,
    with their indexes 12.9 s; issue 10); one sorted build of each afterwards costs a
    fraction of that. ``definition`` is the catalog's own ``CREATE INDEX`` statement
    (``pg_get_indexdef``), so the index comes back exactly as it was, whoever created it;
    ``constraint`` is the name of the primary key it backs, re-attached to the rebuilt
    index (which checks the keys are unique again). All of it happens inside the file's
    transaction: a load that fails leaves the indexes as they were.
    """

    table: str
    name: str
    definition: str
    constraint: str | None


# The indexes of a table a bulk load may set aside: plain indexes and a primary key, valid
# and in the default tablespace (pg_get_indexdef does not name a tablespace). Left in place:
# unique and exclusion constraints, a key a foreign key refers to, a clustered or replica-
# identity index -- what a drop and rebuild could not restore exactly.
_SET_ASIDE_INDEXES = sa.text("""
    SELECT index_class.relname AS name,
           pg_get_indexdef(ix.indexrelid) AS definition,
           con.conname AS constraint_name
    FROM pg_index AS ix
    JOIN pg_class AS index_class ON index_class.oid = ix.indexrelid
    LEFT JOIN pg_constraint AS con ON con.conindid = ix.indexrelid AND con.conrelid = ix.indrelid
    WHERE ix.indrelid = CAST(:table AS regclass)
      AND ix.indisvalid AND ix.indisready AND NOT ix.indisclustered AND NOT ix.indisreplident
      AND index_class.reltablespace = 0
      AND (con.oid IS NULL OR con.contype = 'p')
      AND NOT EXISTS (SELECT 1 FROM pg_constraint AS ref
                      WHERE ref.contype = 'f' AND ref.conindid = ix.indexrelid)
    ORDER BY index_class.relname
""")
# Whether this session may drop and create the table's indexes (owner, or a member of the
# owner role): the least-privilege loader role may not, and then keeps them.
_OWNS_TABLE = sa.text(
    "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = CAST(:table AS regclass)"
)


def _owns(conn: sa.Connection, table: sa.Table) -> bool:
    quoted = conn.dialect.identifier_preparer.quote(table.name)
    return bool(conn.execute(_OWNS_TABLE, {"table": quoted}).scalar())


def _set_aside_indexes(conn: sa.Connection,
                       tables: tuple[sa.Table, ...]) -> tuple[_SetAsideIndex, ...]:
    """Drop the indexes of ``tables`` a bulk load may rebuild; return how to rebuild them.

    The caller holds ``ACCESS EXCLUSIVE`` locks on the tables (a drop takes it anyway), so
    no other session sees them without their indexes. Identifiers come from the catalog
    and are quoted with the dialect's rules; DDL takes no bound parameters.
    """
    quote = conn.dialect.identifier_preparer.quote
    set_aside = []
    for table in tables:
        rows = conn.execute(_SET_ASIDE_INDEXES, {"table": quote(table.name)}).all()
        for name, definition, constraint in rows:
            set_aside.append(_SetAsideIndex(table.name, name, definition, constraint))
            if constraint is None:
                conn.exec_driver_sql("DROP INDEX " + quote(name))
            else:
                conn.exec_driver_sql("ALTER TABLE " + quote(table.name)
                                     + " DROP CONSTRAINT " + quote(constraint))
    return tuple(set_aside)


# Sort memory for the rebuild, for this transaction only, unless the server allows more: the
# default 64 MB spills a 1M-row key's sort to disk (measured: 1.8-2.2 s of backend CPU for
# the three indexes at 64 MB, 1.5-1.8 s at 256 MB). One index is built at a time.
_REBUILD_SORT_MEMORY = sa.text(
    "SELECT set_config('maintenance_work_mem', :memory, true) "
    "WHERE pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes(:memory)"
)


def _rebuild_indexes(conn: sa.Connection, indexes: tuple[_SetAsideIndex, ...]) -> None:
    """Create the set-aside indexes again from their definitions; re-attach primary keys."""
    if not indexes:
        return
    quote = conn.dialect.identifier_preparer.quote
    conn.execute(_REBUILD_SORT_MEMORY, {"memory": "256MB"})
    for index in indexes:
        conn.exec_driver_sql(index.definition)  # the catalog's own CREATE INDEX statement
        if index.constraint is not None:
            # USING INDEX keeps the rebuilt index (and its name) as the key's own index.
            conn.exec_driver_sql(
                "ALTER TABLE " + quote(index.table) + " ADD CONSTRAINT "
                + quote(index.constraint) + " PRIMARY KEY USING INDEX " + quote(index.name)
            )


@dataclass(frozen=True)
class _DirectLoad:
    """A first delivery into empty procedure tables, copied straight into them.

    When ``procedure`` and ``procedure_version`` hold nothing, no staged key can meet a
    stored one: every row of the file is an insert, and the stage -> version -> current
    round trip (two INSERT ... SELECTs into indexed tables after the whole file was staged,
    the largest server cost of a bulk load, issue 10) only copies rows. The file's rows are
    then COPYed into both tables chunk by chunk, while the next chunk is validated. The one
    file-level rule that could still remove such a row, a key repeated within the file, is
    kept: a key's first occurrence goes to the tables, any later one to the stage, and
    :func:`_take_direct_duplicates` moves the first occurrences to quarantine with the rest.
    A bulk load's tables are COPYed without their indexes (``set_aside``), rebuilt by
    :meth:`rebuild_indexes` before anything reads the tables by key.
    """

    checksum: str
    extract_ts: str
    tables: tuple[sa.Table, ...] = (schema.procedure_version, schema.procedure)
    set_aside: tuple[_SetAsideIndex, ...] = ()

    @property
    def names(self) -> list[str]:
        return PROCEDURE_VALUE_COLUMNS + ["source_checksum", "extract_ts"]

    def write(self, conn: sa.Connection, frame: pd.DataFrame) -> None:
        """COPY valid, first-occurrence rows (their stage columns) into both tables."""
        self.copy(conn, self.payload(frame))

    def payload(self, frame: pd.DataFrame) -> _CopyPayload | None:
        """The rows' COPY rendering for :meth:`copy` (None for no rows); no database work."""
        if frame.empty:
            return None
        rows = frame[PROCEDURE_VALUE_COLUMNS].assign(
            source_checksum=self.checksum, extract_ts=self.extract_ts
        )
        return _copy_payload(rows, list(self.tables))

    def copy(self, conn: sa.Connection, payload: _CopyPayload | None) -> None:
        """COPY a rendered :meth:`payload` into both tables."""
        if payload is not None:
            _copy_into(conn, list(self.tables), self.names, payload)

    def rebuild_indexes(self, conn: sa.Connection) -> None:
        """Rebuild the indexes set aside for the COPY (nothing when none were)."""
        _rebuild_indexes(conn, self.set_aside)


def _is_empty(conn: sa.Connection, table: sa.Table) -> bool:
    """One row's probe: the cost does not grow with the table."""
    return conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() is None


def _direct_load(conn: sa.Connection, kind: str, checksum: str,
                 extract_ts: str, bulk: bool = False) -> _DirectLoad | None:
    """Return a :class:`_DirectLoad` when this procedures file may skip the stage.

    PostgreSQL only (COPY), procedures only (complications are split between current and
    pending by a join with the procedures, and checked against them, after staging). Both
    tables must be empty; they are then locked against other writers (``SHARE ROW
    EXCLUSIVE``: readers go on, a concurrent load waits for this commit) and checked again,
    so no other file's rows can arrive before this one's. A non-empty table is detected
    before the lock is taken, so a normal load never takes it.

    A ``bulk`` file (:data:`BULK_LOAD_BYTES`) loaded by the tables' owner sets their
    indexes aside for the COPY (:class:`_SetAsideIndex`). That lock is ``ACCESS
    EXCLUSIVE`` until the file commits: readers of the two (empty) tables wait too, which
    only a first load into an empty warehouse may impose. Its first emptiness check runs
    on a connection of its own: a read in this transaction would keep a read lock on the
    tables, and two bulk first loads each holding one would deadlock asking for the
    exclusive lock. So a concurrent load waits here too; if it finds the tables filled
    once it has the lock, it loads through the stage and keeps that lock to its commit
    (readers wait for that one load).
    """
    if conn.dialect.name != "postgresql" or kind != PROCEDURES:
        return None
    tables = (schema.procedure_version, schema.procedure)
    set_aside = _lock_if_empty(conn, tables, bulk=bulk)
    if set_aside is None:
        return None
    return _DirectLoad(checksum, extract_ts, tables, set_aside)


def _lock_if_empty(conn: sa.Connection, tables: tuple[sa.Table, ...], *, bulk: bool,
                   only_to_rebuild: bool = False) -> tuple[_SetAsideIndex, ...] | None:
    """Lock empty ``tables`` against other writers; for a ``bulk`` load, set their indexes aside.

    Returns None when a table holds rows (seen before or after the lock), else the indexes
    set aside (none when the load keeps them: not ``bulk``, or not the tables' owner). With
    ``only_to_rebuild`` nothing is locked unless the indexes can be set aside (a caller whose
    only gain is the rebuild). The locking protocol is :func:`_direct_load`'s.
    """
    if bulk:
        with conn.engine.connect() as probe:  # no lock kept in this transaction: see above
            if not all(_is_empty(probe, table) for table in tables):
                return None
            rebuild = all(_owns(probe, table) for table in tables)
    else:
        if not all(_is_empty(conn, table) for table in tables):
            return None
        rebuild = False
    if only_to_rebuild and not rebuild:
        return None
    quote = conn.dialect.identifier_preparer.quote
    conn.exec_driver_sql(  # schema table names, quoted; a fixed lock mode; no values
        "LOCK TABLE " + ", ".join(quote(table.name) for table in tables)
        + (" IN ACCESS EXCLUSIVE MODE" if rebuild else " IN SHARE ROW EXCLUSIVE MODE")
    )
    if not all(_is_empty(conn, table) for table in tables):
        return None
    return _set_aside_indexes(conn, tables) if rebuild else ()


def _file_bytes(extract: ExtractFile) -> int:
    """The extract's size on disk (0 when it has no open handle)."""
    if extract.handle is None:
        return 0
    return os.fstat(extract.handle.fileno()).st_size


class _StageWriter:
    """Runs a file's staging writes (stage COPY, quarantine inserts) on a second thread.

    Reading, validating and pseudonymising chunk N+1 is CPU in this process; the COPY of
    chunk N is mostly the server's work, during which psycopg releases the GIL. On two cores
    the two then overlap instead of taking turns (issue 10). The writes keep their order and
    stay on the file's one connection, inside its one transaction: only the writer thread
    uses the connection until :meth:`close` returns. At most ``depth`` writes are unfinished
    at a time (:meth:`submit` waits for a free slot): with one, the writer holds chunk N while
    the main thread builds N+1, and memory stays at two chunks whatever the file's size (one
    more than without the overlap: about 150 MB at 100,000-row chunks of procedures).

    A write that fails is re-raised by the next :meth:`submit` or by :meth:`close`, with its
    own type (a DBAPIError stays one); later writes are skipped, and the file's transaction
    rolls back as before.
    """

    def __init__(self, depth: int = 1):
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._slots = threading.Semaphore(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kyphowatch-stage-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            if self._error is None:
                try:
                    task()
                except BaseException as exc:  # handed to the main thread, which raises it
                    self._error = exc
            self._slots.release()

    def submit(self, task: Callable[[], None]) -> None:
        """Queue ``task`` once a slot is free; raise an earlier write's failure instead."""
        self._slots.acquire()
        self._raise_failure()
        self._tasks.put(task)

    def submit_if_idle(self, task: Callable[[], None]) -> bool:
        """Queue ``task`` only if a slot is free now (the writer is idle); say whether it was.

        An earlier write's failure is raised as by :meth:`submit`.
        """
        if not self._slots.acquire(blocking=False):
            return False
        self._raise_failure()
        self._tasks.put(task)
        return True

    def close(self) -> None:
        """Wait for every queued write; raise the first failure. Always stops the thread."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _InlineWriter:
    """The same interface run in the calling thread (SQLite: its writes hold the GIL)."""

    @staticmethod
    def submit(task: Callable[[], None]) -> None:
        task()

    @staticmethod
    def submit_if_idle(task: Callable[[], None]) -> bool:
        task()
        return True

    @staticmethod
    def close() -> None:
        return None


def _stage_file(
    conn: sa.Connection,
    extract: ExtractFile,
    stage: sa.Table,
    quarantine: _Quarantine,
    key: bytes,
    chunk_rows: int,
    expectations_dir: Path,
    max_date: date,
    preview_fields: int = 16,
    direct: _DirectLoad | None = None,
) -> tuple[int, pd.Series, set[str], Audit]:
    """Validate the file chunk by chunk into staging and quarantine.

    Returns the rows read, the business keys of the valid rows (in staging order, indexed
    by record number), which the whole-file checks and the merge use instead of queries
    over the stage, the keys among them met more than once (found while staging, so the
    whole-file check need not look for repeats in all of them again), and the
    file's GX audit (its flagged rows and a sample of its passed rows), which the caller
    verifies before the file's transaction commits (a disagreement raises, and the
    transaction rolls back). On PostgreSQL a chunk's writes run on a writer thread while
    the next chunk is read and validated (:class:`_StageWriter`). With ``direct``, rows go
    straight to the procedure tables, only repeated keys to the stage (:class:`_DirectLoad`).
    """
    writer = _StageWriter() if conn.dialect.name == "postgresql" else _InlineWriter()
    try:
        result = _stage_chunks(conn, extract, stage, quarantine, key, chunk_rows,
                               expectations_dir, max_date, preview_fields, writer, direct)
    except BaseException:
        # The writer must be off the connection before the transaction rolls back; its own
        # failure, if any, is secondary to the one being raised here.
        try:
            writer.close()
        except Exception:  # noqa: BLE001 -- the first error is the one reported
            log.debug("stage writer failed while the load was already failing", exc_info=True)
        raise
    writer.close()
    return result


def _stage_chunks(
    conn: sa.Connection, extract: ExtractFile, stage: sa.Table, quarantine: _Quarantine,
    key: bytes, chunk_rows: int, expectations_dir: Path, max_date: date,
    preview_fields: int, writer: _StageWriter | _InlineWriter, direct: _DirectLoad | None,
) -> tuple[int, pd.Series, set[str], Audit]:
    """The body of :func:`_stage_file`: every database write goes through ``writer``."""
    rows_read = 0
    audit = Audit(str(expectations_dir), extract.kind)
    staged_keys: list[pd.Series] = []
    key_column = KEY_COLUMN[extract.kind]
    seen: set[str] = set()  # the valid rows' keys so far (direct load: sent to the tables)
    repeated: set[str] = set()  # keys met again after their first valid row
    for chunk in iter_chunks(extract, chunk_rows):
        check_time(extract)
        rows_read += len(chunk.record_numbers) + len(chunk.bad_shape)
        # The chunk's writes, in order, go to the writer as one task: with one write
        # unfinished at a time, a second submit for the same chunk would wait for the
        # first (the chunk's COPY) to finish before this thread could read the next chunk,
        # and the two threads would take turns instead of overlapping (issue 10: the 1M
        # file has a repeated key in every chunk, so every chunk made two submits after
        # its quarantine rows; the main thread waited 9.3 s of a 19 s staging).
        writes: list[Callable[[], None]] = []
        misshapen = [
            (number, _misshapen(row, extract, key, preview_fields), ["row:wrong_field_count"])
            for number, row in chunk.bad_shape
        ]
        if misshapen:
            writes.append(lambda rows=misshapen: quarantine.add(rows))
        if not chunk.record_numbers:
            _submit_all(writer, writes)
            continue
        checked = validate_chunk(  # Arrow-split chunks hand over ``flat``, never the rows
            None if chunk.flat is not None else chunk.records, chunk.record_numbers,
            extract.columns, extract.kind, expectations_dir, max_date, audit=audit,
            flat=chunk.flat,
        )
        if checked.invalid:
            raw = checked.raw.loc[list(checked.invalid)]
            invalid = [
                (int(number), values, checked.invalid[int(number)])
                for number, values in zip(raw.index, raw.to_dict("records"), strict=True)
            ]
            writes.append(lambda rows=invalid: quarantine.add(rows))
        valid = _prepare_valid(checked.valid, extract.kind, key)
        keys = checked.valid[key_column]
        # tolist() first: iterating an Arrow-backed Series element by element costs about
        # 4 us a key (more than the set look-up; 0.4 s per 100,000 rows measured). One pass
        # over the keys answers "repeated in this chunk or met before" (the Arrow-backed
        # Series.duplicated() it replaces cost 0.5-0.9 s per 1M keys), for the direct load's
        # split and for the whole-file duplicate check (which no longer looks for repeats
        # among all the file's keys after staging, a serial step while the server waits).
        listed = keys.tolist()
        first = np.fromiter(_first_sightings(listed, seen), dtype=bool, count=len(listed))
        if not first.all():
            repeated.update(itertools.compress(listed, ~first))
        if direct is None:
            writes.append(lambda frame=valid: _write_stage(conn, stage, frame))
            _submit_all(writer, writes)
        else:
            # The first occurrences are COPYed into the tables, the repeats staged. The
            # COPY payload (about 1 s of CPU per 1M rows, much of it in Arrow kernels, which
            # release the GIL) is rendered by whichever thread is free: by the writer when it has
            # finished the previous chunk (this thread is then the slower side), else here
            # while the writer is still busy (the server's COPY the slower side; issue 10).
            sent = valid if first.all() else valid[first]
            repeats = [] if first.all() else [
                lambda frame=valid[~first]: _write_stage(conn, stage, frame)]
            if not _submit_all(writer, [*writes, lambda frame=sent: direct.write(conn, frame),
                                        *repeats], only_if_idle=True):
                payload = direct.payload(sent)
                _submit_all(writer, [*writes, lambda payload=payload: direct.copy(conn, payload),
                                     *repeats])
        staged_keys.append(keys)
    keys = pd.concat(staged_keys) if staged_keys else pd.Series([], dtype="str")
    return rows_read, keys, repeated, audit


def _submit_all(writer: _StageWriter | _InlineWriter, writes: list[Callable[[], None]],
                *, only_if_idle: bool = False) -> bool:
    """Hand one chunk's ``writes`` to ``writer`` as one task that runs them in order.

    With ``only_if_idle`` the task is handed over only if the writer can take it at once;
    returns whether it was (always true without ``only_if_idle``).
    """
    if not writes:
        return True
    if len(writes) == 1:
        task = writes[0]
    else:
        def task() -> None:
            for write in writes:
                write()

    if only_if_idle:
        return writer.submit_if_idle(task)
    writer.submit(task)
    return True


def _first_sightings(keys: list[str], seen: set[str]) -> Iterator[bool]:
    """Yield, per key, whether it is new to ``seen``; add every key to ``seen`` on the way."""
    add = seen.add
    for key in keys:
        if key in seen:
            yield False
        else:
            add(key)
            yield True


def _verify_audit(audit: Audit) -> None:
    """Have GX check the file's audit rows; raise :class:`AuditMismatch` on any difference.

    Called last inside the file's transaction: the merge, which does not depend on the
    audit's verdict, runs while the helper imports GX or checks the rows (Audit.start), and
    a disagreement still rolls everything of the file back.
    """
    summary = audit.verify()
    log.info("GX audit agreed on %d flagged and %d sampled rows of %d (%.2f s)",
             summary["flagged"], summary["sampled"], summary["rows_seen"], summary["seconds"])


def _take_from_stage(
    conn: sa.Connection, stage: sa.Table, condition: sa.ColumnElement,
    reason: str | sa.ColumnElement, quarantine: _Quarantine, join: sa.FromClause | None = None,
) -> None:
    """Move staged rows matching ``condition`` to quarantine with ``reason``.

    ``reason`` is a text, or an SQL expression giving each row's reason (one pass over a
    join that several rules share).
    """
    source = join if join is not None else stage
    reason_column = (sa.literal(reason, sa.String) if isinstance(reason, str)
                     else reason).label("kyphowatch_reason")
    rows = conn.execute(
        sa.select(*stage.columns, reason_column).select_from(source).where(condition)
    ).mappings()
    moved = [(row["record_number"], dict(row), [row["kyphowatch_reason"]]) for row in rows]
    if not moved:
        return
    for _, values, _ in moved:
        values.pop("record_number", None)
        values.pop("kyphowatch_reason", None)
    quarantine.add(moved)
    numbers = [number for number, _, _ in moved]
    # Stage rows moved here are no longer candidates for the merge (the caller's key list
    # may still hold them; _any_present only ever errs towards the conflict-handling path).
    for start in range(0, len(numbers), 10_000):
        conn.execute(stage.delete().where(stage.c.record_number.in_(numbers[start:start + 10_000])))


# Keys per bound IN list: within SQLite's 32,766 variables, and short enough that
# PostgreSQL probes the unique index for each list instead of scanning the table.
KEY_BATCH = 5_000


def _check_whole_file(
    conn: sa.Connection, extract: ExtractFile, stage: sa.Table, quarantine: _Quarantine,
    staged_keys: pd.Series, repeated_keys: set[str], direct: _DirectLoad | None = None,
) -> pd.Series:
    """Apply the rules that need the whole file or the warehouse; return the staged keys left.

    Duplicate ids are found client-side while staging (``repeated_keys``: the keys met more
    than once among ``staged_keys``; no GROUP BY over the stage, no second search of all the
    keys); only when there are some are those rows taken back from the stage (and, in a
    direct load, their first occurrences from the procedure tables).
    """
    key = stage.c[KEY_COLUMN[extract.kind]]
    if repeated_keys:
        repeated = staged_keys.isin(repeated_keys)  # every occurrence of a repeated key
        duplicated = sorted(repeated_keys)
        if direct is not None:
            occurrences = staged_keys[repeated]  # few rows, in staging order
            firsts = occurrences[~occurrences.duplicated(keep="first")]
            _take_direct_duplicates(conn, direct, firsts, f"{key.name}:duplicate_in_file",
                                    quarantine)
        for start in range(0, len(duplicated), KEY_BATCH):
            _take_from_stage(
                conn, stage, key.in_(duplicated[start:start + KEY_BATCH]),
                f"{key.name}:duplicate_in_file", quarantine,
            )
        staged_keys = staged_keys[~repeated].reset_index(drop=True)
    if extract.kind == COMPLICATIONS:
        matched = _match_procedures(conn, stage)
        joined = stage.join(matched, matched.c.record_number == stage.c.record_number)
        broken = matched.c.verdict > _UNKNOWN_PROCEDURE
        _take_from_stage(
            conn, stage, broken,
            sa.case((matched.c.verdict == _BEFORE_PROCEDURE, "event_date:before_procedure"),
                    else_="site_id:differs_from_procedure"),
            quarantine, joined,
        )
        # What is left are the rows without a procedure, which the merge sends to pending.
        conn.execute(matched.delete().where(broken))
        _analyze(conn, matched)
    return staged_keys


def _take_direct_duplicates(
    conn: sa.Connection, direct: _DirectLoad, firsts: pd.Series, reason: str,
    quarantine: _Quarantine,
) -> None:
    """Move the first occurrences of repeated keys from the procedure tables to quarantine.

    ``firsts`` holds those keys indexed by record number. The tables were empty before this
    file, so every row with such a key is that first occurrence; it is quarantined with the
    values the stage would have held (the same columns and types).
    """
    numbers = dict(zip(firsts.tolist(), firsts.index.tolist(), strict=True))
    history = direct.tables[0]
    key_name = KEY_COLUMN[PROCEDURES]
    keys = sorted(numbers)
    for start in range(0, len(keys), KEY_BATCH):
        batch = keys[start:start + KEY_BATCH]
        rows = conn.execute(
            sa.select(*[history.c[name] for name in PROCEDURE_VALUE_COLUMNS])
            .where(history.c[key_name].in_(batch))
        ).mappings().all()
        quarantine.add([(numbers[row[key_name]], dict(row), [reason]) for row in rows])
        for table in direct.tables:
            conn.execute(table.delete().where(table.c[key_name].in_(batch)))


def _insert_for(conn: sa.Connection, table: sa.Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def _newer(left, right: sa.Table) -> sa.ColumnElement:
    """True where ``left``'s delivery is newer than ``right``'s (table or EXCLUDED columns)."""
    columns = getattr(left, "c", left)
    return sa.tuple_(columns.extract_ts, columns.source_checksum) > sa.tuple_(
        right.c.extract_ts, right.c.source_checksum
    )


def _classify(
    conn: sa.Connection, stage: sa.Table, current: sa.Table, key: str, values: list[str],
    checksum: str, extract_ts: str, only: sa.ColumnElement | None = None,
) -> dict[str, int]:
    """Count staged rows that are new, updates, unchanged or stale against ``current``."""
    incoming = sa.tuple_(sa.literal(extract_ts), sa.literal(checksum))
    existing = sa.tuple_(current.c.extract_ts, current.c.source_checksum)
    same = sa.and_(*[stage.c[v].is_not_distinct_from(current.c[v]) for v in values if v != key])
    matched = current.c[key].is_not(None)
    # A change the stamps cannot order (see _hold_unordered_corrections): the file has no
    # stamp, or the same stamp as the current version.
    unordered = matched & ~same
    if extract_ts != UNSTAMPED:
        unordered = unordered & (current.c.extract_ts == extract_ts)
    query = sa.select(
        sa.func.count().label("total"),
        sa.func.coalesce(sa.func.sum(sa.case((~matched, 1), else_=0)), 0).label("inserted"),
        sa.func.coalesce(sa.func.sum(sa.case((matched & same, 1), else_=0)), 0).label("unchanged"),
        sa.func.coalesce(
            sa.func.sum(sa.case((matched & ~same & (incoming > existing), 1), else_=0)), 0
        ).label("updated"),
        sa.func.coalesce(
            sa.func.sum(sa.case((matched & ~same & (incoming <= existing), 1), else_=0)), 0
        ).label("stale"),
        sa.func.coalesce(sa.func.sum(sa.case((unordered, 1), else_=0)), 0).label("ambiguous"),
    ).select_from(stage.outerjoin(current, current.c[key] == stage.c[key]))
    if only is not None:
        query = query.where(only)
    row = conn.execute(query).mappings().one()
    return {name: int(row[name])
            for name in ("inserted", "unchanged", "updated", "stale", "ambiguous")}


def _none_present(conn: sa.Connection, keys: pd.Series, target: sa.Table, key: str) -> bool:
    """True when none of ``keys`` exists in ``target`` (a first delivery of every row).

    The staged keys are probed in bound batches against ``target``'s unique index, so the
    cost grows with the file, never with the warehouse, whatever statistics the planner
    has (a join of the stage with a never-analysed 1M-row target once ran as a nested loop
    over the whole warehouse, issue 10). It stops at the first batch with a match; a
    first load then skips the classification join and the conflict handling, whose result
    is known: every row is new.
    """
    column = target.c[key]
    if conn.execute(sa.select(column).limit(1)).first() is None:
        return True  # an empty target (a first load): no key lists to send
    values = keys.tolist()
    for start in range(0, len(values), KEY_BATCH):
        probe = sa.select(column).where(column.in_(values[start:start + KEY_BATCH])).limit(1)
        if conn.execute(probe).first() is not None:
            return False
    return True


def _staged_count(conn: sa.Connection, stage: sa.Table, only: sa.ColumnElement | None) -> int:
    query = sa.select(sa.func.count()).select_from(stage)
    if only is not None:
        query = query.where(only)
    return int(conn.execute(query).scalar_one())


def _insert_from(
    conn: sa.Connection, target: sa.Table, select: sa.Select, columns: list[str]
) -> None:
    """Plain INSERT ... SELECT, for rows known not to conflict."""
    conn.execute(target.insert().from_select(columns, select))


def _upsert_from(
    conn: sa.Connection, target: sa.Table, key: str, select: sa.Select, columns: list[str]
) -> None:
    """INSERT ... SELECT with newer-delivery-wins conflict handling."""
    statement = _insert_for(conn, target).from_select(columns, select)
    statement = statement.on_conflict_do_update(
        index_elements=[key],
        set_={name: statement.excluded[name] for name in columns if name != key},
        where=_newer(statement.excluded, target),
    )
    conn.execute(statement)


def _stage_select(stage: sa.Table, names: list[str], checksum: str, extract_ts: str) -> sa.Select:
    return sa.select(
        *[stage.c[n] for n in names],
        sa.literal(checksum, sa.String).label("source_checksum"),
        sa.literal(extract_ts, sa.String).label("extract_ts"),
    ).where(sa.true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT


def promote_pending(conn: sa.Connection, key: bytes | None = None) -> int:
    """Move pending complications whose procedure is now known; return how many moved.

    A pending complication that contradicts its procedure (event before the
    procedure, another site) goes to quarantine instead, under its original file.
    """
    pend, proc = schema.pending_complication, schema.procedure
    # Usually nothing is pending; then no join with the (possibly never analysed)
    # procedure table is planned at all.
    if conn.execute(sa.select(pend.c.complication_id).limit(1)).first() is None:
        return 0
    joined = pend.join(proc, proc.c.procedure_id == pend.c.procedure_id)
    conflict = sa.or_(pend.c.event_date < proc.c.procedure_date, pend.c.site_id != proc.c.site_id)
    bad = conn.execute(
        sa.select(pend, proc.c.procedure_date.label("proc_date"), proc.c.site_id.label("proc_site"))
        .select_from(joined).where(conflict)
    ).mappings().all()
    if bad:
        ledger = dict(conn.execute(
            sa.select(schema.file_ledger.c.source_checksum, schema.file_ledger.c.file_name)
        ).all())
        now = datetime.now(UTC)
        payload = []
        for row in bad:
            reasons = []
            if row["event_date"] < row["proc_date"]:
                reasons.append("event_date:before_procedure")
            if row["site_id"] != row["proc_site"]:
                reasons.append("site_id:differs_from_procedure")
            values = {k: row[k] for k in COMPLICATION_VALUE_COLUMNS}
            payload.append({
                "source_checksum": row["source_checksum"],
                "record_number": row["source_record"],
                "file_name": ledger.get(row["source_checksum"], "unknown"),
                "kind": COMPLICATIONS,
                "site_id": row["site_id"],
                "record_id": row["complication_id"],
                "raw_values": json.dumps(values, default=str, sort_keys=True),
                "reasons": json.dumps(reasons),
                "quarantined_at": now,
            })
        conn.execute(
            _insert_for(conn, schema.quarantine).values(payload).on_conflict_do_nothing()
        )
        # The quarantine-share alert reads the ledger: count these rows against the file
        # that sent them (rows_pending stays "pending when loaded").
        per_file = Counter(row["source_checksum"] for row in payload)
        for source, count in per_file.items():
            conn.execute(
                schema.file_ledger.update()
                .where(schema.file_ledger.c.source_checksum == source)
                .values(rows_quarantined=schema.file_ledger.c.rows_quarantined + count)
            )
        ids = [row["complication_id"] for row in bad]
        conn.execute(pend.delete().where(pend.c.complication_id.in_(ids)))
    columns = COMPLICATION_VALUE_COLUMNS + ["source_checksum", "extract_ts"]
    ready = sa.select(*[pend.c[c] for c in columns]).select_from(joined).where(sa.true())
    count = conn.execute(sa.select(sa.func.count()).select_from(ready.subquery())).scalar_one()
    if count:
        _upsert_from(conn, schema.complication, "complication_id", ready, columns)
        conn.execute(pend.delete().where(
            pend.c.procedure_id.in_(sa.select(proc.c.procedure_id))
        ))
        _settle_complications(conn)
    return int(count)


def _settle_complications(conn: sa.Connection, ids: sa.Select | None = None) -> None:
    """Keep each complication's newest version in exactly one of current/pending."""
    comp, pend = schema.complication, schema.pending_complication
    newer_pending = sa.exists().where(
        pend.c.complication_id == comp.c.complication_id, _newer(pend, comp)
    )
    newer_or_same_current = sa.exists().where(
        comp.c.complication_id == pend.c.complication_id, ~_newer(pend, comp)
    )
    delete_current = comp.delete().where(newer_pending)
    delete_pending = pend.delete().where(newer_or_same_current)
    if ids is not None:
        delete_current = delete_current.where(comp.c.complication_id.in_(ids))
        delete_pending = delete_pending.where(pend.c.complication_id.in_(ids))
    conn.execute(delete_current)
    conn.execute(delete_pending)


def _merge_into(
    conn: sa.Connection, stage: sa.Table, *, current: sa.Table, history: sa.Table, key: str,
    names: list[str], checksum: str, extract_ts: str, keys: pd.Series,
    only: sa.ColumnElement | None = None,
) -> dict[str, int]:
    """Append staged rows to ``history``; merge those matching ``only`` into ``current``.

    Returns the inserted/updated/unchanged/stale counts. When none of the staged keys is
    present yet (a first delivery, the bulk case) plain INSERTs replace the conflict-
    handling ones and the counts need no join.
    """
    first_delivery = _none_present(conn, keys, current, key)
    if first_delivery:
        counts = {"inserted": _staged_count(conn, stage, only), "unchanged": 0, "updated": 0,
                  "stale": 0, "ambiguous": 0}
    else:
        counts = _classify(conn, stage, current, key, names, checksum, extract_ts, only)
    columns = names + ["source_checksum", "extract_ts"]
    select = _stage_select(stage, names, checksum, extract_ts)
    if _none_present(conn, keys, history, key):
        _insert_from(conn, history, select, columns)
    else:
        conn.execute(
            _insert_for(conn, history).from_select(columns, select).on_conflict_do_nothing()
        )
    to_current = select if only is None else select.where(only)
    if first_delivery:
        _insert_from(conn, current, to_current, columns)
    else:
        _upsert_from(conn, current, key, to_current, columns)
    return counts


def _merge_procedures(conn, stage, checksum, extract_ts, result: FileResult,
                      keys: pd.Series) -> None:
    counts = _merge_into(
        conn, stage, current=schema.procedure, history=schema.procedure_version,
        key="procedure_id", names=PROCEDURE_VALUE_COLUMNS, checksum=checksum,
        extract_ts=extract_ts, keys=keys,
    )
    for name, value in counts.items():
        setattr(result, name, value)
    result.promoted = promote_pending(conn)


def _merge_complications(conn, stage, checksum, extract_ts, result: FileResult,
                         keys: pd.Series, bulk: bool = False) -> None:
    names = COMPLICATION_VALUE_COLUMNS
    comp, pend = schema.complication, schema.pending_complication
    unknown = _PROCEDURE_MATCH  # filled by _check_whole_file: the rows without a procedure
    known = ~sa.exists().where(unknown.c.record_number == stage.c.record_number)
    # A bulk first delivery into empty complication tables: their indexes are set aside for
    # the two INSERT ... SELECTs and rebuilt after them, as in the procedures' direct load
    # (maintaining complication's three indexes row by row was most of its 1.5-2.0 s insert
    # in the 1M load, issue 10). Taken here, not at the file's start: the exclusive lock is
    # held from the merge to the commit only, and this transaction has not read the tables.
    set_aside = ()
    if bulk and conn.dialect.name == "postgresql":
        set_aside = _lock_if_empty(conn, (schema.complication_version, comp), bulk=True,
                                   only_to_rebuild=True) or ()
    counts = _merge_into(
        conn, stage, current=comp, history=schema.complication_version, key="complication_id",
        names=names, checksum=checksum, extract_ts=extract_ts, keys=keys, only=known,
    )
    if set_aside:  # before anything reads the tables by key (the settling below)
        _rebuild_indexes(conn, set_aside)
    columns = names + ["source_checksum", "extract_ts"]
    pending_select = sa.select(
        *[stage.c[n] for n in names],
        sa.literal(checksum, sa.String).label("source_checksum"),
        sa.literal(extract_ts, sa.String).label("extract_ts"),
        stage.c.record_number.label("source_record"),
    ).select_from(
        # A join with the few unknown record numbers, not NOT (NOT EXISTS ...): the planner
        # estimated that double negation at half the stage, planned a hashed subplan over
        # every staged row and JIT-compiled it (0.17 s of the 0.23 s insert of 340 pending
        # rows in the 1M load, issue 10). record_number is the unknown table's key: each
        # staged row joins at most once, so the rows are the same.
        stage.join(unknown, unknown.c.record_number == stage.c.record_number)
    ).where(sa.true())  # SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT
    _upsert_from(conn, pend, "complication_id", pending_select, columns + ["source_record"])
    # Every staged row is either known (counted by the merge, whose four counts partition
    # the known rows) or pending: a count of the stage instead of another anti-join with
    # the procedures.
    known_rows = sum(counts[name] for name in ("inserted", "unchanged", "updated", "stale"))
    result.pending = _staged_count(conn, stage, None) - known_rows
    for name, value in counts.items():
        setattr(result, name, value)
    _settle_complications(conn, sa.select(stage.c.complication_id))
    unknown.drop(conn)


# The staged complications' one match with their procedures (_match_procedures): a row
# whose procedure is unknown, or that breaks a whole-file rule (the first one it breaks).
_UNKNOWN_PROCEDURE, _BEFORE_PROCEDURE, _OTHER_SITE = 0, 1, 2
_PROCEDURE_MATCH = sa.Table(
    "kw_stage_unknown_procedure", sa.MetaData(),
    sa.Column("record_number", sa.Integer, primary_key=True),
    sa.Column("verdict", sa.SmallInteger, nullable=False),
    prefixes=["TEMPORARY"],
)


def _match_procedures(conn: sa.Connection, stage: sa.Table) -> sa.Table:
    """Return a temporary table of the staged complications their procedures do not pass.

    One outer join of the stage with the procedures answers both questions the load asks
    of them: which rows break a whole-file rule (event before the procedure, another site;
    a row breaking both keeps the first reason) and which rows have no procedure yet. Each
    was a scan of the whole procedure table (1M procedures: 0.74 s and 0.52 s, issue 10).
    Only those few record numbers are kept, with their ``verdict``; the caller quarantines
    the rule breakers and leaves the unknown rows for the merge, which asks "is the
    procedure known?" several times (the count, the current and the pending inserts). Nothing
    locks out a procedures file loading at the same time, and that is why one answer is
    also the safer one: asked per statement, a procedure committed between the current and
    the pending insert would have left its complication in neither table; asked once, the
    row goes to exactly one of them (pending, if its procedure was not yet visible).
    """
    proc = schema.procedure
    matched = _PROCEDURE_MATCH
    matched.drop(conn, checkfirst=True)
    matched.create(conn)
    before = stage.c.event_date < proc.c.procedure_date
    unknown = proc.c.procedure_id.is_(None)
    verdict = sa.case((unknown, _UNKNOWN_PROCEDURE), (before, _BEFORE_PROCEDURE),
                      else_=_OTHER_SITE)
    # An outer join, not NOT IN or NOT EXISTS: the rows with and without a procedure in one
    # pass (staged procedure_id is never null, so a null procedure_id means no match).
    conn.execute(matched.insert().from_select(
        ["record_number", "verdict"],
        sa.select(stage.c.record_number, verdict)
        .select_from(stage.outerjoin(proc, proc.c.procedure_id == stage.c.procedure_id))
        .where(unknown | before | (stage.c.site_id != proc.c.site_id)),
    ))
    return matched


def _ledger_values(file_name: str, checksum: str | None, result: FileResult) -> dict:
    return {
        "source_checksum": checksum,
        "file_name": file_name,
        "kind": result.kind,
        "extract_ts": extract_stamp(file_name),
        "status": result.status,
        "reason": result.reason,
        "rows_read": result.rows_read,
        "rows_inserted": result.inserted,
        "rows_updated": result.updated,
        "rows_unchanged": result.unchanged + result.stale,
        "rows_quarantined": result.quarantined,
        "rows_pending": result.pending,
        "quarantine_reasons": json.dumps(result.quarantine_reasons, sort_keys=True),
        "dropped_columns": json.dumps(result.dropped_columns),
        "processed_at": datetime.now(UTC),
    }


def record_rejection(engine: sa.Engine, file_name: str, checksum: str | None,
                     result: FileResult) -> None:
    """Write (or refresh) the ledger row of a rejected file in its own transaction."""
    if checksum is None:
        return  # nothing readable to key the ledger on
    with engine.begin() as conn:
        _write_ledger(conn, _ledger_values(file_name, checksum, result))


class _LoadedMeanwhile(Exception):
    """Another load of the same bytes committed while this one ran: this one rolls back."""


def _write_ledger(conn: sa.Connection, values: dict) -> int:
    """Insert a file's ledger row, or replace the row of an earlier delivery of the same bytes
    that was not loaded (rejected: a re-sent file is examined again, docs/contract.md).

    Returns the rows written: 0 when the bytes are recorded as loaded already.
    """
    statement = _insert_for(conn, schema.file_ledger).values(values)
    # RETURNING, not rowcount: psycopg reports -1 for an upsert's rowcount.
    return len(conn.execute(statement.on_conflict_do_update(
        index_elements=["source_checksum"],
        set_={k: statement.excluded[k] for k in values if k != "source_checksum"},
        where=schema.file_ledger.c.status != "loaded",
    ).returning(schema.file_ledger.c.source_checksum)).all())


def max_plausible_date(file_name: str, processing_day: date) -> date:
    """Latest plausible event date for a file: its extract date, else the processing day."""
    stamp = extract_stamp(file_name)
    if stamp.startswith("00000000"):
        return processing_day
    try:
        return datetime.strptime(stamp[:8], "%Y%m%d").date()
    except ValueError:
        return processing_day


def _warn_on_stamp_clash(
    engine: sa.Engine, name: str, kind: str, extract_ts: str, checksum: str
) -> None:
    """Warn when another delivery of the same kind carries the same extract stamp.

    Their order (which version of a corrected row wins) then falls to the checksum:
    deterministic, but not what the sender meant. Senders should add the time (THHMMSS).
    """
    ledger = schema.file_ledger
    with engine.connect() as conn:
        other = conn.execute(
            sa.select(ledger.c.file_name).where(
                ledger.c.kind == kind, ledger.c.extract_ts == extract_ts,
                ledger.c.status == "loaded", ledger.c.source_checksum != checksum,
            ).limit(1)
        ).scalar_one_or_none()
    if other:
        log.warning(
            "%s has the same extract stamp (%s) as %s; corrections between them are ordered "
            "by checksum. Ask the sender to stamp files with the time (_YYYYMMDDTHHMMSS).",
            name, extract_ts, other,
        )


def load_file(
    engine: sa.Engine, path: Path, *, key: bytes, chunk_rows: int, max_bad_share: float,
    expectations_dir: Path, processing_day: date, limits: ReadLimits | None = None,
    preview_fields: int | None = None,
) -> FileResult:
    """Validate and load one extract file; never raises for a bad file (it is reported).

    Each file is judged alone: a file that vanished, cannot be read or may not be read
    (see :func:`pipelines.ingest.reader.open_checked`) is rejected with its reason and a
    ledger row, and the caller goes on with the next file. ``limits`` and
    ``preview_fields`` default to the configured settings.
    """
    if limits is None or preview_fields is None:
        from pipelines.settings import load_settings

        configured = load_settings()
        limits = limits or ReadLimits.from_settings(configured)
        preview_fields = (configured.quarantine_preview_fields if preview_fields is None
                          else preview_fields)
    result = FileResult(path=str(path), kind=kind_of(path.name), status="loaded")
    ledger = schema.file_ledger
    extract: ExtractFile | None = None
    # The name as stored and reported: a name with an unexpected part (an identifier typed
    # into it) is replaced by a keyed hash (see reader.display_name).
    shown = display_name(path.name, key)
    result.shown_name = shown
    try:
        handle, checksum = open_checked(path, limits)
        result.checksum = checksum
        try:
            with engine.connect() as conn:
                earlier = conn.execute(
                    sa.select(ledger.c.status, ledger.c.rows_quarantined)
                    .where(ledger.c.source_checksum == checksum)
                ).one_or_none()
        except BaseException:
            handle.close()
            raise
        if earlier is not None and earlier.status == "loaded":
            handle.close()
            result.status, result.reason = "duplicate", "already loaded (same checksum)"
            if earlier.rows_quarantined:
                # The same bytes give the same rows: what was quarantined then (an unknown
                # product whose alias was added since, say) comes back only in a new
                # extract (user audit: "send the file again" was read literally).
                result.reason += (f"; its {earlier.rows_quarantined} quarantined row(s) stay "
                                  "out: have them sent again in a new extract (a later stamp)")
            return result
        extract = open_extract(path, limits, key, handle=handle, checksum=checksum)
        # A readable extract will be audited: GX's import starts now, on another core.
        gxaudit.prestart(str(expectations_dir), extract.kind)
        result.kind, result.dropped_columns = extract.kind, extract.dropped_columns
        extract_ts = extract_stamp(path.name)
        _warn_on_stamp_clash(engine, shown, extract.kind, extract_ts, checksum)
        with engine.begin() as conn:
            stage = _stage_table(extract.kind)
            stage.drop(conn, checkfirst=True)
            stage.create(conn)
            quarantine = _Quarantine(conn, extract, key, shown)
            bulk = _file_bytes(extract) >= BULK_LOAD_BYTES
            # Positional: tests stand in for _direct_load with a lambda taking *args.
            direct = _direct_load(conn, extract.kind, checksum, extract_ts, bulk)
            result.rows_read, staged_keys, repeated_keys, audit = _stage_file(
                conn, extract, stage, quarantine, key, chunk_rows, expectations_dir,
                max_plausible_date(path.name, processing_day), preview_fields, direct,
            )
            audit.start()  # GX checks the audit rows while the merge runs
            try:
                if direct is not None:  # before anything reads the tables by key
                    direct.rebuild_indexes(conn)
                analysed_targets = False
                if direct is None:  # a direct load's stage holds repeated keys only
                    _analyze(conn, stage)
                elif len(staged_keys) >= LARGE_LOAD_ROWS:
                    # The targets' statistics now, not after the load: the whole-file check
                    # probes them by key (repeated keys), which the planner would otherwise
                    # answer with scans of the freshly filled tables.
                    for target in direct.tables:
                        _analyze(conn, target)
                    analysed_targets = True
                staged_keys = _check_whole_file(conn, extract, stage, quarantine, staged_keys,
                                                repeated_keys, direct)
                result.quarantined = quarantine.count
                result.quarantine_reasons = dict(sorted(quarantine.reasons.items()))
                if result.rows_read and quarantine.count / result.rows_read > max_bad_share:
                    raise FileRejected(
                        f"{path.name}: {quarantine.count} of {result.rows_read} rows invalid "
                        f"({quarantine.count / result.rows_read:.0%} > {max_bad_share:.0%} allowed); "
                        f"top reasons: {', '.join(r for r, _ in quarantine.reasons.most_common(3))}"
                    )
                if direct is not None:
                    # Every row left is in both tables already, each one new.
                    result.inserted = len(staged_keys)
                    result.promoted = promote_pending(conn)
                elif extract.kind == PROCEDURES:
                    _merge_procedures(conn, stage, checksum, extract_ts, result, staged_keys)
                else:
                    _merge_complications(conn, stage, checksum, extract_ts, result, staged_keys,
                                         bulk)
                _hold_unordered_corrections(shown, extract_ts, result)
                if result.inserted >= LARGE_LOAD_ROWS and not analysed_targets:
                    # a large load changes the targets' statistics; the next nightly file's
                    # joins are planned with them (autovacuum may not have run yet)
                    for target in TARGETS[extract.kind]:
                        _analyze(conn, target)
                stage.drop(conn)
                if not _write_ledger(conn, _ledger_values(shown, checksum, result)):
                    # a concurrent load of the same bytes committed first (ingest batches
                    # may overlap): this one is a duplicate, and rolls back
                    raise _LoadedMeanwhile
            except FileRejected:
                # A rejection's counts and reasons are the fast path's too: audited first.
                _verify_audit(audit)
                raise
            _verify_audit(audit)  # last: nothing of the file commits unless GX agrees
    except _LoadedMeanwhile:
        result.status, result.reason = "duplicate", "already loaded (same checksum)"
        for name in ("inserted", "updated", "unchanged", "stale", "pending", "promoted",
                     "ambiguous", "quarantined"):
            setattr(result, name, 0)
        result.quarantine_reasons = {}
    except FileRejected as exc:
        result.status, result.reason = "rejected", str(exc).replace(path.name, shown)
        for name in ("inserted", "updated", "unchanged", "stale", "pending", "promoted",
                     "ambiguous"):
            setattr(result, name, 0)
        record_rejection(engine, shown, result.checksum or unread_checksum(path), result)
    finally:
        if extract is not None:
            extract.close()
    return result


def _hold_unordered_corrections(name: str, extract_ts: str, result: FileResult) -> None:
    """Reject a file whose corrections cannot be ordered against the current version.

    A changed row is ordered by the extract stamps of the two deliveries. When the new file
    has no stamp, or the same stamp as the version it would replace, only the checksum
    could order them: the correction would be kept or dropped by chance (an unstamped
    correction always loses to a stamped delivery). Such a file is held, rejected with
    "needs a stamp" (a data-quality alert), and nothing from it is stored; re-sent with a
    later stamp (``_YYYYMMDDTHHMMSS``) it loads.
    """
    if not result.ambiguous:
        return
    why = ("has no extract stamp" if extract_ts == UNSTAMPED
           else f"has the same extract stamp ({extract_ts}) as the version it would replace")
    raise FileRejected(
        f"{name}: needs a stamp: it changes {result.ambiguous} existing row(s) but {why}, "
        "so which value is current cannot be decided; re-send it named with a later "
        "_YYYYMMDDTHHMMSS stamp"
    )
