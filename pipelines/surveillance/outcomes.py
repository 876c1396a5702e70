"""Derive one outcome flag per monitored unit (procedure or patient) from the warehouse.

Why recompute everything on each run: corrections and late-arriving complications restate
history. Reading the *current* ``procedure`` and ``complication`` tables and deriving every
flag again makes each result a pure function of (tables, as_of, profile), so reruns are
deterministic and a correction simply changes the next run.

Maturity rule (the one that keeps the charts unbiased)
------------------------------------------------------
A unit counts for the CUSUM, funnel, p-chart and rare-event tests only once its outcome
window has closed: ``index_date + window_days <= as_of``. Before that, a unit without an
event is not yet a non-event, and counting only the early events of immature units would
make every recent period look worse than it is. So immature units are left out entirely,
*including* those with an event already observed. Sentinel events are the exception: any
one is a signal on its own, so they count on their event date. Process failures (no MDT
discussion) are known at the procedure and need no window either.

* per-procedure metrics: the unit is the procedure, index date the procedure date;
* per-patient metrics: the unit is the patient *within a site* (``site_id``,
  ``patient_hash``); the index procedure is their first procedure at that site, and events
  on any of their procedures at that site within the window count. The returned
  ``unit_id`` is the index ``procedure_id``, never the patient digest.

An event counts when ``index_date <= event_date <= index_date + window_days``; events dated
before the index procedure cannot be outcomes of it and are ignored (the contract checks
flag such rows). Only rows with ``procedure_date <= as_of`` and ``event_date <= as_of``
are read, so a run "as of" a past date sees the past (with today's corrections applied).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipelines.schema import complication, procedure
from pipelines.surveillance.profile import Metric, Profile

EPOCH = date(1970, 1, 1)
COVARIATES = (
    "age_years",
    "sex",
    "steroid_use",
    "levels_treated",
    "indication",
    "anaesthesia",
    "balloons",
)
OUTCOME_COLUMNS = (
    "site_id",
    "site_code",
    "unit_id",
    "index_date",
    "index_day",
    "y",
    "event_day",
    *COVARIATES,
)


def day_number(value: date) -> int:
    """Return days since 1970-01-01 (the integer time axis used by the engine)."""
    return (value - EPOCH).days


def day_to_date(day: int) -> date:
    """Return the calendar date of an engine day number."""
    return date.fromordinal(EPOCH.toordinal() + int(day))


def _days(text_values: pd.Series) -> np.ndarray:
    """Turn ISO date strings into int64 day numbers (vectorised, no per-row date objects).

    Day numbers already (the streamed read computes them in SQL) are returned as they are.
    """
    if np.asarray(text_values).dtype.kind in "iu":
        return np.asarray(text_values, dtype=np.int64)
    parsed = pd.to_datetime(text_values, format="%Y-%m-%d")
    return parsed.to_numpy().astype("datetime64[D]").astype(np.int64)


@dataclass
class Snapshot:
    """The current warehouse rows up to ``as_of``, reduced to what the metrics need."""

    as_of: date
    procedures: pd.DataFrame
    complications: pd.DataFrame
    fingerprint: str
    # Extra procedure columns read in the same pass for the operator and device charts
    # (categoricals, aligned with ``procedures``' rows); None when not read. Left out of
    # the fingerprint: the run key stays that of the columns the site charts read.
    extras: pd.DataFrame | None = None
    # Case-mix training digests already computed from this snapshot, by (metric, training
    # rule): the operator/device charts and the site charts fit on the same training units
    # (risk_model.fitted_risk_model), and each digest is a pass over a million of them.
    training_digests: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def as_of_day(self) -> int:
        return day_number(self.as_of)


def latest_procedure_date(conn: sa.Connection) -> date | None:
    """Return the newest procedure date in the warehouse (the default as_of), or None.

    On PostgreSQL the newest date of each site, walked site by site on the (site_id,
    procedure_date) index: ``max(procedure_date)`` alone scans every procedure (about
    0.1 s for a million), which this version 15 cannot skip through the index.
    """
    if conn.dialect.name == "postgresql":
        # Identifiers are the schema's own; no value is in the text.
        value = conn.execute(sa.text(
            "WITH RECURSIVE s(site) AS ("
            " SELECT min(site_id) FROM procedure"
            " UNION ALL SELECT (SELECT min(site_id) FROM procedure WHERE site_id > s.site)"
            " FROM s WHERE s.site IS NOT NULL)"
            " SELECT max((SELECT max(procedure_date) FROM procedure p"
            " WHERE p.site_id = s.site)) FROM s")).scalar()
    else:
        value = conn.execute(sa.select(sa.func.max(procedure.c.procedure_date))).scalar()
    if value is None:
        return None
    if isinstance(value, str):  # defensive: some drivers hand back text for aggregates
        return date.fromisoformat(value[:10])
    return value


def _as_text(column: sa.ColumnElement) -> sa.ColumnElement:
    # ISO text on both SQLite and PostgreSQL; parsed in one vectorised call below.
    return sa.cast(column, sa.String(10))


def _fetch(conn: sa.Connection, statement: sa.Select) -> list[tuple]:
    """Return all rows as the driver's plain tuples.

    Reading a million rows through SQLAlchemy Row objects takes about twice as long as the
    driver's own tuples. Every column read here is text, an integer or a boolean (0/1 on
    SQLite), which the callers convert in bulk, so the driver's values suffice.
    """
    result = conn.execute(statement)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


# Text parsed per batch when streaming rows from PostgreSQL: bounds the transient memory
# (two batches at a time: one parsed while the next is received).
READ_BATCH_BYTES = 8 << 20


def streams_copy(conn: sa.Connection) -> bool:
    """Return True when rows can be streamed with ``COPY ... TO STDOUT`` (PostgreSQL, psycopg)."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


def copy_columns(conn: sa.Connection, statement: sa.Select,
                 kinds: dict[str, str]) -> dict[str, np.ndarray | pd.Categorical]:
    """Return the statement's columns as compact arrays, streamed with COPY in batches.

    No row ever becomes a Python tuple: PostgreSQL sends CSV, which Arrow's reader turns
    into one typed array per column, batch by batch (:data:`READ_BATCH_BYTES` of text).
    ``kinds`` gives each selected column's kind, in the statement's order: ``int``,
    ``bool`` (``t``/``f``), ``category`` (a few distinct strings: dictionary-encoded by
    Arrow, so no Python string per row is ever made), ``string`` (one string per row, e.g.
    ids, kept in Arrow's buffers: a pandas ``str`` array) or ``object`` (the same as Python
    strings). An unquoted empty field (SQL NULL) is missing. The statement is compiled by
    SQLAlchemy and its values are bound by the driver; ``COPY`` only wraps it.
    """
    import pyarrow as pa

    names = list(kinds)
    table = copy_table(conn, statement, kinds)
    columns: dict[str, np.ndarray | pd.Categorical] = {}
    for name in names:
        column = table.column(name)
        if kinds[name] == "category":
            columns[name] = column.to_pandas().array
        elif kinds[name] == "string":
            columns[name] = _arrow_strings(column.combine_chunks())
        elif kinds[name] == "object":
            columns[name] = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
        else:
            columns[name] = column.to_numpy()
        table = table.drop_columns([name])
    del table
    # Arrow's allocator keeps freed batches for its own reuse; the monitor has none.
    pa.default_memory_pool().release_unused()
    return columns


def copy_table(conn: sa.Connection, statement: sa.Select, kinds: dict[str, str]):
    """Return the statement's rows as one Arrow table, streamed with COPY in batches.

    What :func:`copy_columns` converts, for callers that keep Arrow tables (the snapshot
    cache): one chunk per column; the kinds as there (``object`` read as ``string``).
    """
    return copy_table_hashed(conn, statement, kinds, None)[0]


def copy_table_hashed(conn: sa.Connection, statement: sa.Select, kinds: dict[str, str],
                      hash_column: str | None):
    """Return :func:`copy_table`'s table and :func:`_id_hashes` of its ``hash_column``.

    The hashes (None without a ``hash_column``) are taken batch by batch in the parsing
    thread, while the server sends the next rows, not after the read (a string per id and
    its hash: about a fifth of a second for a million ids); each id's hash depends on that
    id alone, so they equal hashing the whole column after the read.
    """
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    compiled = statement.compile(dialect=conn.dialect,
                                 compile_kwargs={"render_postcompile": True})
    names = list(kinds)
    types = {"int": pa.int64(), "bool": pa.bool_(),
             "category": pa.dictionary(pa.int32(), pa.string()), "object": pa.string(),
             "string": pa.string()}
    read_options = pa_csv.ReadOptions(column_names=names, use_threads=False)
    convert_options = pa_csv.ConvertOptions(
        column_types={name: types[kind] for name, kind in kinds.items()},
        true_values=["t"], false_values=["f"], null_values=[""],
        strings_can_be_null=True, quoted_strings_can_be_null=False)

    def parse(batch: bytearray):
        table = pa_csv.read_csv(pa.py_buffer(batch), read_options=read_options,
                                convert_options=convert_options)
        if hash_column is None:
            return table, None
        ids = table.column(hash_column)
        return table, _id_hashes(_arrow_strings(ids.combine_chunks() if ids.num_chunks
                                                else pa.array([], type=pa.string())))

    tables, hashes = [], []
    driver = conn.connection.driver_connection
    # Arrow parses a batch without the GIL, in a thread, while the next one is received:
    # the server goes on sending instead of waiting for the parse. One batch is parsed
    # while one is received, never more (a queue of unparsed batches would grow memory).
    # (Receiving in the thread instead cost more than it saved on the loaded 2-core
    # machine: psycopg's per-row reads then fought the parse for the GIL.)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-parse") as parser, \
            driver.cursor() as cursor, cursor.copy(
            "COPY (" + str(compiled) + ") TO STDOUT (FORMAT csv)", compiled.params) as stream:
        pending = None
        for batch in _copy_batches(stream, READ_BATCH_BYTES):
            if pending is not None:
                parsed, hashed = pending.result()
                tables.append(parsed)
                hashes.append(hashed)
            pending = parser.submit(parse, batch)
            del batch
        if pending is not None:
            parsed, hashed = pending.result()
            tables.append(parsed)
            hashes.append(hashed)
        del pending
    schema = pa.schema([(name, types[kind]) for name, kind in kinds.items()])
    id_hashes = None
    if hash_column is not None:
        id_hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    del hashes
    if not tables:
        return schema.empty_table(), id_hashes
    table = pa.concat_tables(tables).unify_dictionaries()
    del tables
    return single_chunk_columns(table, kinds, schema), id_hashes


def single_chunk_columns(table, kinds: dict[str, str], schema=None):
    """Return ``table`` (columns ``kinds``, in that order) with one chunk per column, as
    ``schema`` (default: the arrays' own types).

    A column at a time, each batch's column freed once copied, so the copies never hold
    more than one column twice: the table's readers (copy_columns, the cache's blob, the
    snapshot's numpy views) then take the arrays as they are, where chunks would be copied
    whole by each. Whole numbers go to numpy's memory (wrapped, not copied, by Arrow): the
    snapshot takes them as numpy views and frees each once ordered, and the C allocator
    hands a freed array's pages back at once, where Arrow's pool would keep them to the
    end of the read.
    """
    import pyarrow as pa

    arrays = []
    for name in kinds:
        column = table.column(name)
        arrays.append(pa.array(column.to_numpy())
                      if kinds[name] == "int" and not column.null_count
                      else column.combine_chunks())
        del column
        table = table.drop_columns([name])
        # Arrow's allocator keeps freed chunks for its own reuse; the monitor has none.
        pa.default_memory_pool().release_unused()
    del table
    if schema is None:
        return pa.Table.from_arrays(arrays, names=list(kinds))
    return pa.Table.from_arrays(arrays, schema=schema)


def _copy_batches(stream, batch_bytes: int) -> Iterator[bytearray]:
    """Yield a ``COPY ... TO STDOUT``'s data in batches of at least ``batch_bytes`` (the last
    one smaller), each ending at a row's end.

    PostgreSQL sends one message per row, and psycopg's ``Copy.read`` returns one message
    per call through a generator and a wait: about 0.3 s of CPU for a million rows. The
    rows already received are taken here straight from libpq (``get_copy_data`` without
    blocking); only when none is buffered does ``Copy.read`` wait for the socket. The end
    of the data (-1) is followed by the statement's results, all of them read here (as
    psycopg does) before the first error among them is raised, so the connection can roll
    back and the caller sees the server's error (a statement timeout, a failed cast).
    """
    from psycopg import errors, pq

    pgconn = stream.connection.pgconn
    get = pgconn.get_copy_data
    batch = bytearray()
    while True:
        # Every row libpq holds buffered (about a network read's worth) is taken in this
        # inner loop: per row one call, one append and one size test, nothing else.
        size, data = get(1)  # 1: never block; 0 = nothing buffered yet
        while size > 0:
            batch += data
            if len(batch) >= batch_bytes:
                yield batch
                batch = bytearray()
            size, data = get(1)
        if size < 0:
            # Every result is read before an error is raised: until the last one libpq is
            # busy, and psycopg could neither close the COPY nor roll back (the caller would
            # see "another command is already in progress", not the server's error).
            error = None
            while (result := pgconn.get_result()) is not None:
                if error is None and result.status != pq.ExecStatus.COMMAND_OK:
                    error = result
            if error is not None:
                raise errors.error_from_result(error, encoding=stream.connection.info.encoding)
            break
        data = stream.read()  # waits for the socket; b"" once psycopg saw the end
        if not data:
            break
        batch += data
        if len(batch) >= batch_bytes:
            yield batch
            batch = bytearray()
    if batch:
        yield batch


def _id_strings(values) -> pd.arrays.ArrowStringArray:
    """Return ids (an Arrow-backed array, or any array of strings) as an Arrow string array."""
    import pyarrow as pa

    if isinstance(values, pd.arrays.ArrowStringArray):
        return values
    return _arrow_strings(pa.array(np.asarray(values, dtype=object), type=pa.string()))


def release_memory() -> None:
    """Hand memory freed by the process back to the operating system (glibc only).

    Arrays of a few MB freed here and there stay in the C allocator's heap (its threshold
    for giving blocks their own mapping rises to 32 MB after the first large free), so the
    process keeps the peak of every phase. ``malloc_trim`` returns the free pages at once:
    the next phase starts from what is alive, not from the last phase's high-water mark.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """Return glibc's ``malloc_trim``, or None where the C library has none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _arrow_strings(values) -> pd.arrays.ArrowStringArray:
    """Wrap an Arrow string array, without copying, as pandas' default ``str`` array."""
    import pyarrow as pa

    return pa.chunked_array([values], type=pa.string()).to_pandas().array


# Ids turned into Python strings at a time when hashing: bounds the transient memory.
_HASH_CHUNK = 1 << 16


def _id_hashes(ids: pd.arrays.ArrowStringArray) -> np.ndarray:
    """Return ``pd.util.hash_array`` of each id as a Python string, a chunk at a time.

    The same values as hashing the whole object array at once (each string's hash depends
    on that string only), without a Python string per row alive at the same time.
    """
    hashes = np.empty(len(ids), dtype=np.uint64)
    for start in range(0, len(ids), _HASH_CHUNK):
        chunk = ids[start:start + _HASH_CHUNK].to_numpy(dtype=object)
        # categorize only saves work on repeated values; ids are unique, the hashes equal
        hashes[start:start + len(chunk)] = pd.util.hash_array(chunk, categorize=False)
    return hashes


def _positions(ids: pd.arrays.ArrowStringArray,
               wanted: pd.arrays.ArrowStringArray) -> np.ndarray:
    """Return the position of each ``wanted`` id in the unique ``ids`` (-1: not there)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(wanted):
        return np.zeros(0, dtype=np.int64)
    found = pc.index_in(pa.chunked_array(pa.array(wanted)),
                        value_set=pa.chunked_array(pa.array(ids)).combine_chunks())
    return found.fill_null(-1).to_numpy().astype(np.int64)


def _hashed_positions(ids: pd.arrays.ArrowStringArray, id_hashes: np.ndarray,
                      wanted: pd.arrays.ArrowStringArray,
                      wanted_hashes: np.ndarray | None = None) -> np.ndarray:
    """Return :func:`_positions` (-1: not there), matching the ids' hashes, then checking.

    The procedures' ids are hashed for the chart order anyway (``id_hashes``, from
    :func:`_id_hashes`); hashing the wanted ids the same way and looking the hashes up in
    an integer table is a third of a string hash table of 1M ids. Every match is then
    compared as strings; a hash shared by two procedure ids, or matched by a different
    id, falls back to the string match, so the result is always :func:`_positions`'.
    ``wanted_hashes``: :func:`_id_hashes` of ``wanted`` when already taken.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(wanted) or not len(ids):
        return _positions(ids, wanted)
    table = pd.Index(id_hashes)
    if not table.is_unique:
        return _positions(ids, wanted)
    found = table.get_indexer(_id_hashes(wanted) if wanted_hashes is None
                              else wanted_hashes).astype(np.int64)
    matched = np.flatnonzero(found >= 0)
    same = pc.equal(pa.array(ids.take(found[matched])), pa.array(wanted.take(matched)))
    if not pc.all(same).as_py():
        return _positions(ids, wanted)
    return found


def _fingerprint(procedures: pd.DataFrame, complications: pd.DataFrame) -> str:
    """Return an order-independent content hash of every value the metrics read."""
    digest = hashlib.sha256()
    for name, frame in (("procedure", procedures), ("complication", complications)):
        hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)
        mixed = hashes * np.uint64(0x9E3779B97F4A7C15)
        digest.update(
            f"{name}:{len(frame)}:{int(hashes.sum(dtype=np.uint64))}:"
            f"{int(np.bitwise_xor.reduce(mixed)) if len(mixed) else 0}:"
            f"{','.join(frame.columns)}".encode()
        )
    return digest.hexdigest()


def _column(matrix: np.ndarray, index: int) -> np.ndarray:
    return matrix[:, index] if matrix.size else np.empty(0, dtype=object)


def _sorted_codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Return integer codes whose order follows the sorted distinct values, and the values."""
    if isinstance(values, pd.Categorical):  # streamed: the strings are coded already
        categories = [str(c) for c in values.categories]
        order = np.argsort(np.asarray(categories, dtype=object), kind="mergesort")
        remap = np.empty(len(categories), dtype=np.int64)
        remap[order] = np.arange(len(categories))
        return remap[values.codes.astype(np.int64)], [categories[i] for i in order]
    codes, uniques = pd.factorize(values)
    uniques = [str(u) for u in uniques]
    order = np.argsort(np.asarray(uniques, dtype=object), kind="mergesort")
    remap = np.empty(len(uniques), dtype=np.int64)
    remap[order] = np.arange(len(uniques))
    return remap[codes] if len(codes) else codes.astype(np.int64), [uniques[i] for i in order]


def _chart_order(site_code: np.ndarray, day: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Return ``np.lexsort((tie, day, site_code))``: rows by site, day, then tie hash.

    Site and day are one key (site x the days' span + day): a lexsort of two keys instead
    of three, the same permutation (both stable), in about half the time for 1M rows.
    A key below 2**32 (200 sites of 2 years: 146,000) is then sorted as two 16-bit digits,
    low then high: numpy sorts 16-bit integers stably by radix, in linear time, where a
    stable sort of 64-bit keys is a merge sort (together about 0.15 s less for 1M rows).
    """
    if not len(day):
        return np.lexsort((tie, day, site_code))
    low, high = int(day.min()), int(day.max())
    span = high - low + 1
    if int(site_code.max()) >= (2**62) // span:  # cannot happen for real dates
        return np.lexsort((tie, day, site_code))
    key = site_code * span + (day - low)
    if int(key.max()) >= 2**32:
        return np.lexsort((tie, key))
    # Least significant first, every pass stable: the same permutation as the lexsort.
    order = np.argsort(tie, kind="stable")
    key = key[order]
    for shift in (0, 16):
        step = np.argsort(((key >> shift) & 0xFFFF).astype(np.uint16), kind="stable")
        order = order[step]
        key = key[step]
    return order


def snapshot_needs(profile: Profile) -> tuple[bool, list[str]]:
    """Return (whether a patient key is needed, the event types any numerator counts)."""
    needs_patient = any(m.denominator == "patient" for m in profile.metrics if m.kind == "outcome")
    event_types = sorted(
        {t for m in profile.metrics if m.numerator is not None for t in m.numerator.event_types}
    )
    return needs_patient, event_types


PROCEDURE_ROW_COLUMNS = (
    "procedure_id", "site_id", "procedure_date", *COVARIATES, "mdt_discussed",
)
COMPLICATION_ROW_COLUMNS = ("procedure_id", "event_date", "event_type", "symptomatic", "severity")


def load_snapshot(conn: sa.Connection, profile: Profile, as_of: date, *,
                  extras: tuple[str, ...] = ()) -> Snapshot:
    """Read the procedure and complication columns the profile needs, up to ``as_of``.

    The rows are then coded and ordered by :func:`snapshot_from_rows`. On PostgreSQL they
    are streamed (:func:`_load_streamed`), with the ``extras`` procedure columns (strings
    with few values) in the same pass as ``Snapshot.extras``; elsewhere fetched as the
    driver's tuples, without extras (their reader fetches them itself).
    """
    needs_patient, event_types = snapshot_needs(profile)
    if streams_copy(conn):
        return _load_streamed(conn, as_of, needs_patient, event_types, extras)
    proc_columns = [
        procedure.c.procedure_id,
        procedure.c.site_id,
        _as_text(procedure.c.procedure_date).label("procedure_date"),
        *(procedure.c[name] for name in COVARIATES),
        procedure.c.mdt_discussed,
    ]
    if needs_patient:
        proc_columns.append(procedure.c.patient_hash)
    names = [c.name for c in proc_columns]
    matrix = np.array(
        _fetch(conn, sa.select(*proc_columns).where(procedure.c.procedure_date <= as_of)),
        dtype=object,
    ).reshape(-1, len(names))
    proc_rows = {name: _column(matrix, i) for i, name in enumerate(names)}
    del matrix
    comp_columns = [
        complication.c.procedure_id,
        _as_text(complication.c.event_date).label("event_date"),
        complication.c.event_type,
        complication.c.symptomatic,
        complication.c.severity,
    ]
    comp_matrix = np.array(
        _fetch(
            conn,
            sa.select(*comp_columns).where(
                complication.c.event_date <= as_of,
                complication.c.event_type.in_(event_types),
            ),
        )
        if event_types
        else [],
        dtype=object,
    ).reshape(-1, len(comp_columns))
    comp_rows = {c.name: _column(comp_matrix, i) for i, c in enumerate(comp_columns)}
    del comp_matrix
    return snapshot_from_rows(proc_rows, comp_rows, as_of, needs_patient)


def day_of(column: sa.ColumnElement) -> sa.ColumnElement:
    """Return the days since 1970-01-01 of a date column, computed by PostgreSQL."""
    return column - sa.cast(sa.literal(EPOCH.isoformat()), sa.Date)


# Kinds of the streamed procedure and complication columns (see copy_columns).
PROCEDURE_KINDS = {
    "procedure_id": "string", "site_id": "category", "procedure_date": "int",
    "age_years": "int", "sex": "category", "steroid_use": "bool", "levels_treated": "int",
    "indication": "category", "anaesthesia": "category", "balloons": "int",
    "mdt_discussed": "bool",
}
COMPLICATION_KINDS = {"procedure_id": "string", "event_date": "int", "event_type": "category",
                      "symptomatic": "bool", "severity": "category"}


def streamed_procedure_columns(needs_patient: bool, extras: tuple[str, ...] = ()
                               ) -> tuple[list[sa.ColumnElement], dict[str, str]]:
    """Return the procedure columns the streamed read selects, and their kinds.

    One definition for the plain read and the snapshot cache (snapshot_cache.py), whose
    snapshot is exact only while both read the very same columns the same way.
    """
    columns = [
        procedure.c.procedure_id, procedure.c.site_id,
        day_of(procedure.c.procedure_date).label("procedure_date"),
        *(procedure.c[name] for name in COVARIATES), procedure.c.mdt_discussed,
    ]
    kinds = dict(PROCEDURE_KINDS)
    if needs_patient:
        columns.append(
            sa.func.hashtextextended(procedure.c.patient_hash, 0).label("patient_hash"))
        kinds["patient_hash"] = "int"
    for name in extras:
        columns.append(procedure.c[name])
        kinds[name] = "category"
    return columns, kinds


def streamed_complication_columns() -> list[sa.ColumnElement]:
    """Return the complication columns the streamed read selects (kinds: COMPLICATION_KINDS)."""
    return [complication.c.procedure_id,
            day_of(complication.c.event_date).label("event_date"),
            complication.c.event_type, complication.c.symptomatic, complication.c.severity]


def _load_streamed(conn: sa.Connection, as_of: date, needs_patient: bool,
                   event_types: list[str], extras: tuple[str, ...] = ()) -> Snapshot:
    """Read the snapshot's columns from PostgreSQL as compact arrays (:func:`copy_columns`).

    Dates arrive as day numbers and strings with few values as categoricals, so nothing is
    parsed or coded per row in Python. The patient digest arrives as PostgreSQL's 64-bit
    ``hashtextextended`` of it: it is only grouped on, and a million patients share a value
    with probability about 3e-8, against 64 characters a row for the digest itself.
    ``extras`` come as categoricals in the same ``COPY``: a second read of the procedures
    cost as much as the first, and matching its ids to the snapshot's rows more again.
    """
    proc_columns, kinds = streamed_procedure_columns(needs_patient, extras)
    proc_rows = copy_columns(
        conn, sa.select(*proc_columns).where(procedure.c.procedure_date <= as_of), kinds)
    extra_rows = {name: proc_rows.pop(name) for name in extras}
    comp_rows = {name: np.empty(0, dtype=object) for name in COMPLICATION_KINDS}
    release_memory()
    if event_types:
        comp_rows = copy_columns(conn, sa.select(*streamed_complication_columns()).where(
            complication.c.event_date <= as_of, complication.c.event_type.in_(event_types)),
            COMPLICATION_KINDS)
    snapshot = snapshot_from_rows(proc_rows, comp_rows, as_of, needs_patient,
                                  extra_rows=extra_rows)
    del proc_rows, comp_rows, extra_rows
    release_memory()
    return snapshot


def snapshot_from_rows(proc_rows: dict[str, np.ndarray], comp_rows: dict[str, np.ndarray],
                       as_of: date, needs_patient: bool, *,
                       extra_rows: dict[str, pd.Categorical] | None = None,
                       id_hashes: np.ndarray | None = None,
                       comp_id_hashes: np.ndarray | None = None) -> Snapshot:
    """Code, order and fingerprint warehouse-shaped rows: the pure half of load_snapshot.

    ``proc_rows`` maps each name of ``PROCEDURE_ROW_COLUMNS`` (plus ``patient_hash`` when
    ``needs_patient``) to one array of values as the database driver hands them: dates as
    ISO text ``YYYY-MM-DD``, booleans as bool or 0/1, whole numbers, strings; any value that
    identifies a patient will do as ``patient_hash``, it is only used for grouping.
    ``comp_rows`` maps each name of ``COMPLICATION_ROW_COLUMNS`` likewise. The caller has
    already kept only rows dated on or before ``as_of`` (and only the event types the
    profile counts); complications of unknown procedures are dropped here.

    Procedures come back ordered by (site, procedure date, a hash of procedure_id): the
    order the sequential charts consume. The hash only breaks ties between procedures on
    the same day, identically on every database (a collation-dependent ORDER BY would not).
    Strings are turned into integer codes at once; that is what makes a million rows cheap.
    Each array is taken out of ``proc_rows`` and ``comp_rows`` when used (both dicts are
    left empty), so that it is freed as soon as its ordered copy exists. ``extra_rows``
    (categoricals, one value per row of ``proc_rows``) are put in the same order as
    ``Snapshot.extras``. ``id_hashes`` and ``comp_id_hashes``: :func:`_id_hashes` of
    the procedures' and the complications' ``procedure_id`` rows when already taken (the
    snapshot cache's read hashes them while the server sends rows).
    """
    col = proc_rows
    site_code, sites = _sorted_codes(col.pop("site_id"))
    day = _days(col.pop("procedure_date")) if len(site_code) else np.zeros(0, np.int64)
    procedure_id = _id_strings(col.pop("procedure_id"))
    tie = _id_hashes(procedure_id) if id_hashes is None else id_hashes
    del id_hashes
    order = _chart_order(site_code, day, tie)
    sorted_ids = procedure_id.take(order)
    del procedure_id
    site_code = site_code[order]
    frame = {
        # Arrow-backed strings: a million ids as Python strings would take ~70 MB more.
        "procedure_id": sorted_ids,
        "tie_hash": tie[order],
        "site_code": site_code,
        "site_id": pd.Categorical.from_codes(site_code, categories=sites)
        if sites
        else pd.Categorical([]),
        "procedure_day": day[order],
    }
    del tie, day
    extras = None
    if extra_rows:  # none asked for: Snapshot.extras stays None (their reader reads them)
        extras = pd.DataFrame({name: pd.Categorical.from_codes(values.codes[order],
                                                               dtype=values.dtype)
                               for name, values in extra_rows.items()}, copy=False)
        extra_rows.clear()
    for name in ("age_years", "levels_treated", "balloons"):
        frame[name] = col.pop(name)[order].astype(np.int64, copy=False)
    for name in ("steroid_use", "mdt_discussed"):
        frame[name] = col.pop(name)[order].astype(bool, copy=False)
    for name in ("sex", "indication", "anaesthesia"):
        codes, categories = _sorted_codes(col.pop(name)[order])
        frame[name] = pd.Categorical.from_codes(codes, categories=categories)
    if needs_patient:
        # Replace the digest by an integer code at once: it is needed only for grouping
        # and must never leave this module.
        frame["patient_code"] = pd.factorize(col.pop("patient_hash")[order])[0]
    col.clear()
    # copy=False: the columns are new arrays already (a dict is otherwise copied, whole)
    procedures = pd.DataFrame(frame, copy=False)
    del frame
    comp_col = comp_rows
    position = _hashed_positions(sorted_ids, procedures["tie_hash"].to_numpy(),
                                 _id_strings(comp_col["procedure_id"]), comp_id_hashes)
    del comp_id_hashes
    complications = pd.DataFrame(
        {
            "procedure_row": position.astype(np.int64),  # -1: procedure not (yet) known
            "event_day": _days(comp_col["event_date"])
            if len(position)
            else np.zeros(0, np.int64),
            "event_type": pd.Categorical(comp_col["event_type"]),
            "symptomatic": comp_col["symptomatic"].astype(bool),
            "severity": pd.Categorical(comp_col["severity"]),
        },
        copy=False,
    )
    complications = complications.loc[complications["procedure_row"] >= 0].reset_index(drop=True)
    # The id's hash stands in for the id itself (hashing a million strings twice is slow).
    tie_hash = procedures["tie_hash"].to_numpy()
    fingerprint = _fingerprint(
        procedures.drop(columns=["site_code", "procedure_id"]).assign(
            site_id=procedures["site_code"], sex=procedures["sex"].cat.codes,
            indication=procedures["indication"].cat.codes,
            anaesthesia=procedures["anaesthesia"].cat.codes,
        ),
        complications.assign(
            procedure_row=tie_hash[complications["procedure_row"].to_numpy()],
            event_type=complications["event_type"].astype(object),
            severity=complications["severity"].astype(object),
        ),
    )
    return Snapshot(
        as_of=as_of, procedures=procedures, complications=complications, fingerprint=fingerprint,
        extras=extras,
    )


def _matching_events(snapshot: Snapshot, metric: Metric) -> pd.DataFrame:
    """Return the complication rows that satisfy the metric's numerator filters."""
    numerator = metric.numerator
    comps = snapshot.complications
    if numerator is None or comps.empty:
        return comps.iloc[0:0]
    mask = comps["event_type"].isin(numerator.event_types) & comps["severity"].isin(
        numerator.severities
    )
    if numerator.symptomatic is not None:
        mask &= comps["symptomatic"] == numerator.symptomatic
    return comps.loc[mask]


def derive_outcomes(snapshot: Snapshot, metric: Metric, *,
                    include_immature: bool = False,
                    columns: tuple[str, ...] = OUTCOME_COLUMNS) -> pd.DataFrame:
    """Return one row per *mature* unit of ``metric`` with its outcome flag and covariates.

    Columns: site_id (categorical), site_code, unit_id, index_date, index_day, y (0/1),
    event_day (first counted event, -1 when none) and the case-mix covariates; ``columns``
    picks some of them (in that order), which saves making the others, or adds
    ``procedure_row`` (the index procedure's row in ``snapshot.procedures``). Rows are in chart
    order: site, index date, then a fixed hash of the unit id (see load_snapshot).
    ``include_immature`` keeps units still in follow-up too (the time-to-event chart counts
    their events as they happen); their ``y`` is 1 only if the event has already occurred.
    """
    if metric.kind != "outcome" or metric.window_days is None:
        raise ValueError(f"metric {metric.id} is not an outcome metric")
    procs = snapshot.procedures
    window = metric.window_days
    n_procs = len(procs)
    if metric.denominator == "patient" and n_procs:
        # First procedure per patient within the site. Rows are already in (site, date,
        # tie-hash) order, so the first row of each (site, patient) pair is the index one.
        pair = procs["site_code"].to_numpy(np.int64) * (
            int(procs["patient_code"].max()) + 1
        ) + procs["patient_code"].to_numpy(np.int64)
        # Rows grouped by pair with a stable sort (a pair's rows keep their order), so
        # each group's first row is the pair's first row; no hash table of pairs needed.
        by_pair = np.argsort(pair, kind="stable")
        sorted_pair = pair[by_pair]
        del pair
        starts_group = np.r_[True, sorted_pair[1:] != sorted_pair[:-1]]
        del sorted_pair
        first_rows = by_pair[starts_group]
        index_rows = np.sort(first_rows)
        # A unit is numbered by its index row's place in row order.
        unit_of_group = np.empty(len(first_rows), dtype=np.int64)
        unit_of_group[np.argsort(first_rows, kind="stable")] = np.arange(len(first_rows))
        unit_of_row = np.empty(n_procs, dtype=np.int64)
        unit_of_row[by_pair] = unit_of_group[np.cumsum(starts_group) - 1]
        del by_pair, starts_group, first_rows, unit_of_group
    else:
        index_rows = np.arange(n_procs)
        unit_of_row = np.arange(n_procs)
    index_day = procs["procedure_day"].to_numpy(np.int64)[index_rows]
    mature = index_day + window <= snapshot.as_of_day
    first_event = np.full(len(index_rows), -1, dtype=np.int64)
    events = _matching_events(snapshot, metric)
    if len(events) and len(index_rows):
        unit = unit_of_row[events["procedure_row"].to_numpy(np.int64)]
        event_day = events["event_day"].to_numpy(np.int64)
        start = index_day[unit]
        in_window = (event_day >= start) & (event_day <= start + window)
        unit, event_day = unit[in_window], event_day[in_window]
        if len(unit):
            # Earliest counted event per unit.
            order = np.lexsort((event_day, unit))
            unit, event_day = unit[order], event_day[order]
            first = np.r_[True, unit[1:] != unit[:-1]]
            first_event[unit[first]] = event_day[first]
    if include_immature:
        mature = np.ones(len(index_rows), dtype=bool)
    rows = index_rows[mature]
    makers = {
        # the unit's index procedure's row in snapshot.procedures (and snapshot.extras)
        "procedure_row": lambda: rows,
        "site_id": lambda: _take(procs["site_id"], rows),
        "site_code": lambda: procs["site_code"].to_numpy(np.int64)[rows],
        "unit_id": lambda: procs["procedure_id"].array.take(rows),
        "index_date": lambda: index_day[mature].astype("datetime64[D]"),
        "index_day": lambda: index_day[mature],
        "y": lambda: (first_event[mature] >= 0).astype(np.int8),
        "event_day": lambda: first_event[mature],
        **{name: functools.partial(_take, procs[name], rows) for name in COVARIATES},
    }
    unknown = set(columns) - set(makers)
    if unknown:
        raise ValueError(f"unknown outcome columns: {sorted(unknown)}")
    # copy=False: the arrays are new already; no consolidated copy of them
    return pd.DataFrame({name: makers[name]() for name in columns}, index=pd.RangeIndex(len(rows)),
                        copy=False)


def _take(column: pd.Series, rows: np.ndarray):
    """Return ``column[rows]`` as an array, keeping categoricals categorical (no string copies)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return pd.Categorical.from_codes(
            column.cat.codes.to_numpy()[rows], dtype=column.dtype
        )
    return column.to_numpy()[rows]


def sentinel_events(snapshot: Snapshot, metric: Metric) -> pd.DataFrame:
    """Return sentinel events (counted at once, no maturity): site_id, event_day, event_type.

    When the metric has a window, only events within it of their procedure count.
    """
    events = _matching_events(snapshot, metric)
    procs = snapshot.procedures
    position = events["procedure_row"].to_numpy(np.int64)
    frame = pd.DataFrame(
        {
            "site_id": _take(procs["site_id"], position),
            "event_day": events["event_day"].to_numpy(np.int64),
            "event_type": events["event_type"].astype(object).to_numpy(),
            "procedure_day": procs["procedure_day"].to_numpy(np.int64)[position],
        }
    )
    if metric.window_days is not None:
        frame = frame.loc[
            (frame["event_day"] >= frame["procedure_day"])
            & (frame["event_day"] <= frame["procedure_day"] + metric.window_days)
        ]
    return frame.sort_values(["site_id", "event_day", "event_type"], kind="mergesort").reset_index(
        drop=True
    )


def process_outcomes(snapshot: Snapshot, metric: Metric) -> pd.DataFrame:
    """Return one row per procedure with ``failed`` = the process requirement was not met.

    ``site_id`` is the snapshot's categorical (its categories sorted): grouped on its codes,
    without a Python string per procedure (1M of them took a third of the process metric).
    """
    procs = snapshot.procedures
    if metric.process_field is None:
        raise ValueError(f"metric {metric.id} is not a process metric")
    failed = procs[metric.process_field].to_numpy(bool) == metric.process_failure_value
    return pd.DataFrame(
        {
            "site_id": _take(procs["site_id"], slice(None)),
            "index_day": procs["procedure_day"].to_numpy(np.int64),
            "failed": failed.astype(np.int8),
        }
    )
