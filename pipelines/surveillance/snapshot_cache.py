"""The monitor's snapshot read, kept in the warehouse and brought up to date by a delta read.

Why: a nightly monitor re-read about a million procedures (4 s at full scale) to find the
few hundred rows one new day wrote. This module keeps, in ``snapshot_cache`` (one row per
set of read columns), the columns :func:`outcomes.load_snapshot` reads for **every** row in
``procedure`` and (of the counted event types) ``complication`` -- not only those up to an
``as_of``: rows dated after a past as_of were loaded earlier and would never come back in a
delta -- with a watermark of what they contain. The next run reads only the rows written
since, merges them (a changed id replaces its cached row, a new id is added), keeps the
rows up to ``as_of`` in memory and hands them to :func:`outcomes.snapshot_from_rows`, so
the snapshot is built by the same code from the same rows as a full read. Part 0 of the
cache holds every row; each later night stores only its own changes as the next part (a
night's write is then its delta, not a million rows), and a run that finds too many parts
writes all rows as part 0 again.

Exact by construction: every write of the loader leaves the writing file's
``source_checksum`` on the row (``pipelines.ingest.load``: inserts and newer-wins upserts),
and every file leaves one ``file_ledger`` row whose ``processed_at`` is stamped before its
transaction commits. The rows written since the watermark are therefore

* the procedures and complications whose ``source_checksum`` is a file recorded since;
* the complications of those procedures: a pending complication is promoted, under the
  checksum of the (older) file that sent it, in the transaction that loads its procedure;
* removed: complications moved back to ``pending_complication`` by a newer version with an
  unknown procedure (their pending row carries the new file's checksum).

Everything else falls back to the full read, which rebuilds the cache, and the log says
why: no cache (or other columns: another profile's needs, extras), a migration since, a key
rotation (it rewrites digests in place), a ledger row at or before the watermark that was
not there when it was taken (a transaction that committed late, or a rewritten ledger row),
parts that do not follow one another (a concurrent run stored between them), a delta
larger than :data:`MAX_DELTA_SHARE` of the cache, or row counts that do not match
after the merge (rows deleted, or written without the loader). All reads of one run happen
in one REPEATABLE READ transaction, so the watermark, the rows and the counts agree.

PostgreSQL only: the cache holds what the streamed read (``COPY``) produces -- day numbers,
PostgreSQL's ``hashtextextended`` of the patient digest -- and SQLite warehouses are the
small demo ones, which read in well under a second anyway.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import sqlalchemy as sa

from pipelines.contract import COMPLICATIONS
from pipelines.schema import (
    complication,
    file_ledger,
    pending_complication,
    procedure,
    pseudonym_key,
    quarantine,
    schema_version,
    snapshot_cache,
)
from pipelines.surveillance.outcomes import (
    COMPLICATION_KINDS,
    PROCEDURE_KINDS,
    Snapshot,
    copy_table,
    copy_table_hashed,
    day_number,
    load_snapshot,
    release_memory,
    single_chunk_columns,
    snapshot_from_rows,
    snapshot_needs,
    streamed_complication_columns,
    streamed_procedure_columns,
    streams_copy,
)
from pipelines.surveillance.profile import Profile

log = logging.getLogger(__name__)

# Bumped whenever what the blobs hold changes: an old cache is then simply not found.
CACHE_FORMAT = 2
# A delta of more rows than this share of the cache (or MIN_FULL_ROWS) is read in full:
# past it, replacing rows by id costs about as much as the plain read.
MAX_DELTA_SHARE = 0.2
MIN_FULL_ROWS = 50_000
# Arrow IPC body compression: lz4 decodes ~1 GB/s, which is what a nightly run waits for.
COMPRESSION = "lz4"
# A night's changes are stored as a part of their own (writing all rows again took longer
# than the read it saves); past this many parts, or this share of the rows in them, the
# next run writes all rows as a new part 0 instead.
MAX_DELTA_PARTS = 30
MAX_DELTA_PARTS_SHARE = 0.1
# A part 0 goes to the server in pieces of this size (binary COPY): libpq copies whatever
# it is handed into its output buffer, which a whole blob would grow to the blob's size.
COPY_CHUNK_BYTES = 1 << 20
# A full read takes the procedures as this many ranges of pages, each on a connection of
# its own (with the complications on one more): the server's side of the read runs on as
# many backends. Tables under MIN_STREAM_PAGES a range are read whole.
PROCEDURE_STREAMS = 2
MIN_STREAM_PAGES = 1000

# Threads storing the cache inside store_cache_aside() (None outside: stored in line).
_ASIDE: contextvars.ContextVar[list[threading.Thread] | None] = contextvars.ContextVar(
    "snapshot_cache_aside", default=None)

# Column kinds of the cached reads (those of the plain streamed read, and the complication's
# own id): ids are keys for the merge.
_PROCEDURE_KINDS = PROCEDURE_KINDS
_COMPLICATION_KINDS = {"complication_id": "string", **COMPLICATION_KINDS}


@dataclass
class _Read:
    """The cache's content after a run's read: all rows, and the watermark that covers them."""

    procedures: object  # pyarrow.Table
    complications: object  # pyarrow.Table
    watermark: dict
    path: str  # "full" | "delta" | "unchanged"
    reason: str
    changed: tuple[int, int] = (0, 0)  # procedure, complication rows read by the delta
    delta: _Delta | None = None  # this run's changes (stored as a part of their own)
    parts: int = 0  # delta parts held before this run
    part_rows: int = 0  # rows in them
    chain_from: list | None = None  # the ledger watermark of the last part held
    # outcomes._id_hashes of the procedures' and the complications' procedure_id, in row
    # order, when the read took them (a full read, during its COPY); else None
    id_hashes: tuple | None = None


@dataclass
class _Delta:
    """The rows written since a watermark: applied in order, they bring a cache up to date."""

    procedures: object  # pyarrow.Table: every written procedure row (replaces by id)
    complications: object  # pyarrow.Table: written rows of every type (replaces by id)
    moved: list[str]  # complication ids moved back to pending (removed)

    @property
    def rows(self) -> int:
        return self.procedures.num_rows + self.complications.num_rows + len(self.moved)


def cache_key(needs_patient: bool, event_types: list[str], extras: tuple[str, ...]) -> str:
    """Return the cache row's key: the format and the columns and event types read."""
    spec = {"format": CACHE_FORMAT, "patient": needs_patient, "event_types": event_types,
            "extras": list(extras)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def load_cached_snapshot(conn: sa.Connection, profile: Profile, as_of: date, *,
                         extras: tuple[str, ...] = ()) -> Snapshot:
    """Return the same snapshot as :func:`outcomes.load_snapshot`, reading only what changed.

    ``conn`` only names the warehouse: the cache reads in a REPEATABLE READ transaction of
    its own and stores the updated cache in another. Not PostgreSQL: the plain read.
    """
    if not streams_copy(conn):
        log.info("snapshot cache: not used (%s; the cache is PostgreSQL-only)",
                 conn.dialect.name)
        return load_snapshot(conn, profile, as_of, extras=extras)
    started = time.perf_counter()
    needs_patient, event_types = snapshot_needs(profile)
    key = cache_key(needs_patient, event_types, extras)
    engine = conn.engine
    try:
        with _own_connection(engine) as snap:
            snap = snap.execution_options(isolation_level="REPEATABLE READ")
            read = _read(snap, key, needs_patient, event_types, extras)
            snap.rollback()
    except Exception as exc:  # noqa: BLE001 - a cache must never stop the monitor
        # The warehouse tables are the truth: whatever broke in the cache, read them.
        log.warning("snapshot cache: failed (%s); plain read", _why(exc))
        return load_snapshot(conn, profile, as_of, extras=extras)
    read_done = time.perf_counter()
    aside = _ASIDE.get()
    if read.path != "unchanged":
        if aside is None:
            # Serialised here, in line: the tables are handed to the snapshot below, and
            # only the (compressed) blobs may outlive this call.
            _store_logged(engine, key, dataclasses.replace(read))
        else:
            # Serialised and written by a thread: Arrow compresses without the GIL, so
            # the blobs (0.2-0.4 s of lz4 for a million rows) are made beside the
            # snapshot's build, and the server's write (about 1.5 s) overlaps it and what
            # follows; store_cache_aside() joins it. The thread holds the tables until
            # their blobs are made (the snapshot's build frees its copies meanwhile).
            writer = threading.Thread(
                target=_store_logged, args=(engine, key, dataclasses.replace(read)),
                name="snapshot-cache-store")
            writer.start()
            aside.append(writer)
    stored = time.perf_counter()
    held = (read.procedures.num_rows, read.complications.num_rows)
    # Handed over, not shared: each cached table is freed once its columns are taken.
    tables = [read.procedures, read.complications]
    id_hashes = read.id_hashes
    read.procedures = read.complications = read.delta = read.id_hashes = None
    snapshot = _snapshot(tables, as_of, needs_patient, extras, id_hashes)
    del id_hashes
    log.info("snapshot cache: %s read (%s); %d procedures and %d complications held, "
             "%d and %d read as changed; read %.2fs, cache write %.2fs%s, snapshot %.2fs",
             read.path, read.reason, *held, *read.changed, read_done - started,
             stored - read_done, " (serialised; written aside)" if aside else "",
             time.perf_counter() - stored)
    del read
    release_memory()
    return snapshot


@contextmanager
def store_cache_aside() -> Iterator[None]:
    """Within this block, :func:`load_cached_snapshot` stores the cache in a thread.

    The cache's write is the server's work (a full read's part 0: about 1.5 s for a million
    rows), so it can overlap the snapshot's build and the caller's next step instead of
    delaying them. Leaving the block waits for the write: its blobs must be gone before
    the caller reaches its memory peak. A failed write is logged, never raised (the next
    run reads all rows again), as in line.
    """
    writers: list[threading.Thread] = []
    token = _ASIDE.set(writers)
    try:
        yield
    finally:
        _ASIDE.reset(token)
        for writer in writers:
            writer.join()
        if writers:
            release_memory()  # the blobs' pages, freed by the writer


# --- reading -------------------------------------------------------------------------------


def _procedure_select(needs_patient: bool, extras: tuple[str, ...]) -> tuple[list, dict]:
    """Return the plain streamed read's procedure columns and kinds (the same 64-bit hash
    of the patient digest, the same day numbers), with no ``as_of`` filter."""
    return streamed_procedure_columns(needs_patient, extras)


def _complication_select() -> list:
    return [complication.c.complication_id, *streamed_complication_columns()]


def _warehouse_state(conn: sa.Connection) -> dict:
    """Return the watermark of the warehouse as this transaction sees it."""
    count, last = conn.execute(
        sa.select(sa.func.count(), sa.func.max(file_ledger.c.processed_at))).one()
    keys = conn.execute(sa.select(pseudonym_key.c.fingerprint, pseudonym_key.c.retired_at)
                        .order_by(pseudonym_key.c.fingerprint)).all()
    return {
        "format": CACHE_FORMAT,
        "schema_version": conn.execute(sa.select(sa.func.max(schema_version.c.version))
                                       ).scalar(),
        "ledger_rows": int(count),
        "ledger_last": last.isoformat() if last is not None else None,
        # Which files, stamped when: a count alone misses a late-committing file offset by
        # a rejected file's ledger row re-stamped after the watermark.
        "ledger_digest": _ledger_digest(conn, last),
        # Complications waiting for their procedure: one promoted later keeps its old file's
        # checksum (a file that loaded alongside its procedure), so the delta reads them by id.
        "pending": sorted(conn.scalars(sa.select(pending_complication.c.complication_id))
                          .all()),
        # a rotation rewrites digests without a new ledger row: any change reads all again
        "pseudonym_keys": hashlib.sha256(
            json.dumps([[f, str(r)] for f, r in keys]).encode()).hexdigest(),
    }


@contextmanager
def _own_connection(engine: sa.Engine) -> Iterator[sa.Connection]:
    """Yield a connection that is closed afterwards, not returned to the pool.

    libpq keeps its input and output buffers at the largest message they have held until
    the connection closes: a pooled connection that fetched or sent the cache's blobs
    (tens of MB) kept that memory for the rest of the run, on top of the monitor's peak.
    """
    with engine.connect() as conn:
        try:
            yield conn
        finally:
            conn.invalidate()


def _ledger_digest(conn: sa.Connection, up_to: datetime | None) -> str:
    """Return a digest of the ledger rows stamped at or before ``up_to`` (file and time)."""
    rows = conn.execute(
        sa.select(file_ledger.c.source_checksum, file_ledger.c.processed_at)
        .where(file_ledger.c.processed_at <= up_to if up_to is not None else sa.false())
        .order_by(file_ledger.c.source_checksum)).all()
    text = "\n".join(f"{checksum} {stamp.isoformat()}" for checksum, stamp in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(conn: sa.Connection, key: str, needs_patient: bool, event_types: list[str],
          extras: tuple[str, ...]) -> _Read:
    """Return every row's read columns: the cache plus the delta, or a full read and why."""
    state = _warehouse_state(conn)

    def full(reason: str) -> _Read:
        return _full(conn, state, needs_patient, event_types, extras, reason)

    parts = _fetch_parts(conn, key)
    if not parts or parts[0][0] != 0:
        return full("no cache for these columns")
    mark = json.loads(parts[0][1])
    if mark.get("schema_version") != state["schema_version"]:
        return full("schema changed")
    if mark.get("pseudonym_keys") != state["pseudonym_keys"]:
        return full("pseudonym key changed")
    procs, comps = _from_ipc(parts[0][2]), _from_ipc(parts[0][3])
    part_rows = 0
    for number, watermark, proc_blob, comp_blob in parts[1:]:
        delta_mark = json.loads(watermark)
        if number != mark["part"] + 1 or delta_mark["from"] != _ledger_mark(mark):
            return full("the stored parts do not follow one another")
        delta = _Delta(_from_ipc(proc_blob), _from_ipc(comp_blob), delta_mark["moved"])
        procs, comps = _apply(procs, comps, delta, event_types)
        part_rows += delta.rows
        mark = delta_mark
    del parts
    last = datetime.fromisoformat(mark["ledger_last"]) if mark["ledger_last"] else None
    ledger = file_ledger.c
    if last is not None:
        before = conn.execute(sa.select(sa.func.count()).where(ledger.processed_at <= last)
                              ).scalar_one()
        if (before != mark["ledger_rows"]
                or _ledger_digest(conn, last) != mark.get("ledger_digest")):
            return full("the ledger changed at or before the watermark")
    elif mark["ledger_rows"]:
        return full("watermark mismatch")
    since = sa.select(ledger.source_checksum, ledger.rows_read)
    if last is not None:
        since = since.where(ledger.processed_at > last)
    files = conn.execute(since).all()
    if sum(rows for _, rows in files) > max(MIN_FULL_ROWS, MAX_DELTA_SHARE * procs.num_rows):
        return full(f"delta of {len(files)} files too large")
    delta = None
    # Pending at the watermark and no longer: promoted (under their old file) or quarantined.
    left_pending = sorted(set(mark.get("pending", ())) - set(state["pending"]))
    if files or left_pending:
        delta = _read_delta(conn, [c for c, _ in files], needs_patient, extras, left_pending)
        procs, comps = _apply(procs, comps, delta, event_types)
    # Anything written or deleted outside what the delta sees shows in the counts.
    if _row_counts(conn, event_types) != (procs.num_rows, comps.num_rows):
        return full("row counts differ after the merge (rows removed or written outside "
                    "the loader)")
    state.update(procedures=procs.num_rows, complications=comps.num_rows, part=mark["part"])
    if delta is None:
        return _Read(procs, comps, state, "unchanged", "no file since the watermark")
    return _Read(procs, comps, state, "delta", f"{len(files)} files since the watermark",
                 (delta.procedures.num_rows, delta.complications.num_rows), delta,
                 mark["part"], part_rows, _ledger_mark(mark))


def _ledger_mark(watermark: dict) -> list:
    return [watermark["ledger_rows"], watermark["ledger_last"]]


def _fetch_parts(conn: sa.Connection, key: str) -> list[tuple]:
    """Return the cache's parts in order, their blobs fetched in binary (no hex decoding)."""
    statement = sa.select(snapshot_cache.c.part, snapshot_cache.c.watermark,
                          snapshot_cache.c.procedures, snapshot_cache.c.complications
                          ).where(snapshot_cache.c.cache_key == key
                                  ).order_by(snapshot_cache.c.part)
    compiled = statement.compile(dialect=conn.dialect)
    with conn.connection.driver_connection.cursor(binary=True) as cursor:
        cursor.execute(str(compiled), compiled.params)
        return cursor.fetchall()


def _row_counts(conn: sa.Connection, event_types: list[str]) -> tuple[int, int]:
    procedures = conn.execute(sa.select(sa.func.count()).select_from(procedure)).scalar_one()
    complications = 0
    if event_types:
        complications = conn.execute(sa.select(sa.func.count()).select_from(complication)
                                     .where(complication.c.event_type.in_(event_types))
                                     ).scalar_one()
    return int(procedures), int(complications)


def _full(conn: sa.Connection, state: dict, needs_patient: bool, event_types: list[str],
          extras: tuple[str, ...], reason: str) -> _Read:
    """Read every row's columns (no as_of: the cache must hold rows of any date).

    The procedures are read as :data:`PROCEDURE_STREAMS` ranges of the table's pages and
    the complications beside them, each range on a connection of its own in this
    transaction's snapshot (:func:`_in_parallel`): the server's formatting of a million
    rows (about 1.3 s of one backend) was the read's bottleneck, the client waiting on it.
    The ranges are joined in page order, which is the order of a scan of the whole table.
    """
    columns, kinds = _procedure_select(needs_patient, extras)
    # The ids' hashes (the snapshot's tie order and complication match) are taken while
    # the server sends the rows (copy_table_hashed), not after the read.
    ranges = _page_ranges(conn, PROCEDURE_STREAMS)
    reads = [functools.partial(copy_table_hashed, statement=sa.select(*columns).where(where),
                               kinds=kinds, hash_column="procedure_id")
             for where in ranges]
    if event_types:
        reads.append(functools.partial(
            copy_table_hashed, statement=sa.select(*_complication_select())
            .where(complication.c.event_type.in_(event_types)),
            kinds=_COMPLICATION_KINDS, hash_column="procedure_id"))
    results = _in_parallel(conn, reads)
    procs, proc_hashes = _joined(results[:len(ranges)], kinds)
    if event_types:
        comps, comp_hashes = results[-1]
    else:
        comps, comp_hashes = _empty(_COMPLICATION_KINDS), np.empty(0, dtype=np.uint64)
    del results
    state.update(procedures=procs.num_rows, complications=comps.num_rows, part=0)
    return _Read(procs, comps, state, "full", reason, id_hashes=(proc_hashes, comp_hashes))


class _Tid(sa.types.UserDefinedType):
    """PostgreSQL's ``tid`` (a row's page and slot), for the page ranges' bound limits."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "tid"


def _page_ranges(conn: sa.Connection, streams: int) -> list[sa.ColumnElement]:
    """Return conditions that split ``procedure`` into ``streams`` ranges of its pages.

    Each is a TID range scan; together they hold every row exactly once: the last range is
    open, so pages added since the size was taken (rows this snapshot does not see anyway)
    still fall in one. A table of a few pages is one range, and so is every table before
    PostgreSQL 14 (no TID range scan: each range would scan the whole table).
    """
    from sqlalchemy.dialects.postgresql import REGCLASS

    if streams < 2 or (conn.dialect.server_version_info or (0,)) < (14,):
        return [sa.true()]
    ctid = sa.literal_column("ctid")  # the system column (one table in the statement)
    pages = conn.execute(sa.select(
        sa.func.pg_relation_size(sa.cast(sa.literal(procedure.name), REGCLASS))
        / sa.func.current_setting(sa.literal("block_size")).cast(sa.BigInteger))).scalar_one()
    pages = int(pages or 0)
    if pages < streams * MIN_STREAM_PAGES:
        return [sa.true()]
    limits = [sa.cast(sa.bindparam(f"page_{i}", f"({pages * i // streams},0)"), _Tid())
              for i in range(1, streams)]
    ranges = [ctid < limits[0]]
    ranges += [sa.and_(ctid >= low, ctid < high) for low, high in itertools.pairwise(limits)]
    ranges.append(ctid >= limits[-1])
    return ranges


def _in_parallel(conn: sa.Connection, reads: list) -> list:
    """Return ``[read(connection) for read in reads]``, the reads run at the same time.

    The first runs here on ``conn``; each other one in a thread on a connection of its own
    whose transaction imports ``conn``'s snapshot (``pg_export_snapshot``: the same rows,
    as if read in ``conn``'s REPEATABLE READ transaction). A read whose connection fails
    (it could not get its table's lock within :data:`HELPER_LOCK_TIMEOUT_MS`, could not
    connect, ...) runs again here on ``conn`` once the others have ended: the same rows,
    only later. A failure on ``conn`` itself is raised once every read has ended.
    """
    if len(reads) == 1:
        return [reads[0](conn)]
    snapshot_id = conn.execute(sa.select(sa.func.pg_export_snapshot())).scalar_one()
    with ThreadPoolExecutor(max_workers=len(reads) - 1,
                            thread_name_prefix="snapshot-read") as pool:
        others = [pool.submit(_in_snapshot, conn.engine, snapshot_id, read)
                  for read in reads[1:]]
        try:
            first = reads[0](conn)
        finally:
            wait(others)
    results = [first]
    for read, future in zip(reads[1:], others, strict=True):
        error = future.exception()
        if error is None:
            results.append(future.result())
        else:
            log.warning("snapshot cache: a parallel read failed (%s); read on the main "
                        "connection instead", _why(error))
            results.append(read(conn))
    return results


# How long a helper connection of the parallel read waits for its table's lock. ACCESS
# SHARE waits only behind an ACCESS EXCLUSIVE request (a migration's ALTER TABLE, VACUUM
# FULL, TRUNCATE, a bulk first load's index rebuild). Such a request queued after the main
# connection took its lock waits for the main connection, which waits (in this process,
# where PostgreSQL's deadlock detector cannot see it) for the helper: without a timeout
# the monitor and every later reader of the table would wait forever. After it the
# helper gives up and the main connection, which holds or can take the lock, reads its
# rows itself (pg_dump's parallel workers take their locks NOWAIT for the same reason).
HELPER_LOCK_TIMEOUT_MS = 1000


def _in_snapshot(engine: sa.Engine, snapshot_id: str, read):
    """Return ``read(connection)`` on a new connection in the exported snapshot."""
    from psycopg import sql

    with _own_connection(engine) as other:
        other = other.execution_options(isolation_level="REPEATABLE READ")
        driver = other.connection.driver_connection
        # SET takes no bound parameter: the values are quoted as literals by psycopg. The
        # transaction (BEGIN ... REPEATABLE READ) starts with the snapshot, as it must.
        driver.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
        driver.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{HELPER_LOCK_TIMEOUT_MS}ms")))
        try:
            return read(other)
        finally:
            driver.rollback()


def _joined(parts: list[tuple], kinds: dict[str, str]):
    """Return the ranges' tables as one, in order, one chunk per column; and their hashes.

    As :func:`outcomes.copy_table_hashed` leaves a table (its int columns in numpy's
    memory), a column at a time so that the copies never hold more than one column twice.
    """
    import pyarrow as pa

    if len(parts) == 1:
        return parts[0]
    hashes = np.concatenate([h for _, h in parts])
    table = pa.concat_tables([t for t, _ in parts]).unify_dictionaries()
    parts.clear()
    return single_chunk_columns(table, kinds), hashes


def _read_delta(conn: sa.Connection, checksums: list[str], needs_patient: bool,
                extras: tuple[str, ...], left_pending: list[str] = ()) -> _Delta:
    """Read the rows written by ``checksums``' files, and the complications they moved.

    Also the complications in ``left_pending`` (pending at the watermark, not now: those
    promoted are in the table under an older file's checksum), and, as removed, the
    complications those files sent to quarantine that are no longer in the table (moved
    back to pending and then quarantined within the window leave no pending row).
    Removing an id the table does not hold can never make the cache wrong.
    """
    from sqlalchemy.dialects.postgresql import ARRAY

    columns, kinds = _procedure_select(needs_patient, extras)
    written = procedure.c.source_checksum.in_(checksums)
    procs = copy_table(conn, sa.select(*columns).where(written), kinds)
    # Complications of every type: one re-typed out of the counted ones must leave the cache.
    # Those of the written procedures by their ids, bound as one array (one scan of the
    # procedures is enough).
    ids = sa.bindparam("delta_ids", procs["procedure_id"].to_pylist(), type_=ARRAY(sa.String))
    left = sa.bindparam("left_pending", list(left_pending), type_=ARRAY(sa.String))
    comps = copy_table(
        conn, sa.select(*_complication_select()).where(sa.or_(
            complication.c.source_checksum.in_(checksums),
            complication.c.procedure_id == sa.func.any(ids),
            complication.c.complication_id == sa.func.any(left))), _COMPLICATION_KINDS)
    moved = conn.scalars(sa.select(pending_complication.c.complication_id).where(
        pending_complication.c.source_checksum.in_(checksums))).all()
    quarantined = conn.scalars(sa.select(quarantine.c.record_id).where(
        quarantine.c.source_checksum.in_(checksums), quarantine.c.kind == COMPLICATIONS,
        quarantine.c.record_id.is_not(None),
        ~sa.exists().where(complication.c.complication_id == quarantine.c.record_id),
    ).distinct()).all()
    return _Delta(procs, comps, sorted({*moved, *quarantined}))


def _apply(procs, comps, delta: _Delta, event_types: list[str]):
    """Replace and add the delta's rows by id; drop complications moved or re-typed away."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if delta.procedures.num_rows:
        keep = pc.invert(pc.is_in(procs["procedure_id"],
                                  value_set=delta.procedures["procedure_id"]))
        procs = pa.concat_tables([procs.filter(keep), delta.procedures])
    replaced = pa.concat_arrays([delta.complications["complication_id"].combine_chunks(),
                                 pa.array(delta.moved, type=pa.string())])
    if len(replaced):
        keep = pc.invert(pc.is_in(comps["complication_id"], value_set=replaced))
        counted = pc.is_in(delta.complications["event_type"].cast(pa.string()),
                           value_set=pa.array(event_types, type=pa.string()))
        comps = pa.concat_tables([comps.filter(keep), delta.complications.filter(counted)])
    return procs, comps


# --- Arrow tables and their storage ----------------------------------------------------------


def _arrow_type(kind: str):
    import pyarrow as pa

    return {"int": pa.int64(), "bool": pa.bool_(), "string": pa.string(),
            "category": pa.dictionary(pa.int32(), pa.string())}[kind]


def _empty(kinds: dict[str, str]):
    import pyarrow as pa

    return pa.schema([(name, _arrow_type(kind)) for name, kind in kinds.items()]).empty_table()


def _to_ipc(table):
    """Return the table as a compressed Arrow IPC file (an Arrow buffer: no copy of it)."""
    import pyarrow as pa

    # one dictionary per column: IPC files cannot replace dictionaries between batches
    table = table.unify_dictionaries().combine_chunks()
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(blob: bytes):
    import pyarrow as pa

    return pa.ipc.open_file(pa.py_buffer(blob)).read_all()


def _cache_row(key: str, read: _Read) -> dict:
    """Return the row this run stores: its changes as the next part, or every row as part 0.

    The blobs are Arrow buffers, serialised here (they no longer need the tables).
    """
    now = datetime.now(UTC)
    delta = read.delta
    if (delta is not None and read.parts < MAX_DELTA_PARTS
            and read.part_rows + delta.rows <= MAX_DELTA_PARTS_SHARE * read.procedures.num_rows):
        # "from": the watermark of the part it follows, checked when the parts are read
        watermark = dict(read.watermark, part=read.parts + 1, moved=delta.moved,
                         **{"from": read.chain_from})
        return {"cache_key": key, "part": read.parts + 1,
                "watermark": json.dumps(watermark, sort_keys=True),
                "procedures": _to_ipc(delta.procedures),
                "complications": _to_ipc(delta.complications), "built_at": now}
    return {"cache_key": key, "part": 0,
            "watermark": json.dumps(dict(read.watermark, part=0), sort_keys=True),
            "procedures": _to_ipc(read.procedures),
            "complications": _to_ipc(read.complications), "built_at": now}


def _why(exc: BaseException) -> str:
    """Return an exception's type and the first line of its message, at most 200 characters.

    Enough to tell a systematic failure (every night falling back to a full read) from a
    passing one; the first line only, since a database error's later lines carry the
    statement and its parameters.
    """
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _store_logged(engine: sa.Engine, key: str, read: _Read) -> None:
    """Serialise the run's part (:func:`_cache_row`) and :func:`_write_logged` it.

    ``read`` is this call's own: its tables are let go as soon as the blobs are made. A
    failure is logged, never raised (e.g. memory: the next run reads all rows).
    """
    try:
        row = _cache_row(key, read)
    except Exception as exc:  # noqa: BLE001 - a cache must never stop the monitor
        log.warning("snapshot cache: not stored (%s)", _why(exc))
        return
    finally:
        read.procedures = read.complications = read.delta = read.id_hashes = None
    _write_logged(engine, row)


def _write_logged(engine: sa.Engine, row: dict) -> None:
    """:func:`_write` the row; a failure is logged, never raised: a cache must never stop
    the monitor (the next run reads all rows)."""
    started = time.perf_counter()
    try:
        _write(engine, row)
    except Exception as exc:  # noqa: BLE001 - e.g. a role that may not write it, or memory: the next run reads all
        log.warning("snapshot cache: not stored (%s)", _why(exc))
        return
    finally:
        row.clear()  # the blobs: freed as soon as they are sent, whoever holds the dict
    log.debug("cache write: part stored in %.2fs", time.perf_counter() - started)


def _write(engine: sa.Engine, row: dict) -> None:
    """Store a part; a part 0 replaces every part of its key.

    A concurrent run may store first: an appended part then conflicts and is left out
    (the stored chain stays valid), and a part that no longer follows the one before it
    sends the next run to the full read. A concurrent part 0 is as valid as this one's:
    this one's write then fails on the key and is logged by the caller.
    """
    from sqlalchemy.dialects.postgresql import insert

    if row["part"]:
        # A night's changes: small. Bound as parameters, never as the statement's values:
        # SQLAlchemy's statement cache keeps the first compiled statement's values.
        values = dict(row, procedures=row["procedures"].to_pybytes(),
                      complications=row["complications"].to_pybytes())
        with _own_connection(engine) as conn, conn.begin():
            _toast_with_lz4(conn)
            conn.execute(insert(snapshot_cache).on_conflict_do_nothing(), values)
        return
    with _own_connection(engine) as conn, conn.begin():
        _toast_with_lz4(conn)
        conn.execute(snapshot_cache.delete().where(snapshot_cache.c.cache_key == row["cache_key"]))
        _copy_part(conn, row)


def _toast_with_lz4(conn: sa.Connection) -> None:
    """Have the server try lz4, not pglz, on this transaction's blobs, where it can.

    The blobs are lz4-compressed already, so the server's attempt to compress them again
    fails; pglz only gives up after compressing three quarters of a blob (about 1 s of
    the server's time for the 30 MB of a million procedures), lz4 at once (about 0.4 s
    for the whole write instead of 1-1.4 s). The bytes stored, and read back, are the
    same. ``SET LOCAL``: for this transaction only; a server without lz4 (before
    PostgreSQL 14, or built without it) keeps its default.
    """
    if conn.execute(sa.text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                            "WHERE name = 'default_toast_compression'")).scalar():
        conn.execute(sa.text("SET LOCAL default_toast_compression = 'lz4'"))


# PostgreSQL's binary COPY framing (see the COPY documentation, "Binary Format").
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _copy_part(conn: sa.Connection, row: dict) -> None:
    """Insert one cache row with a binary ``COPY``, its blobs sent in chunks.

    A bound parameter is copied whole into libpq's output buffer (tens of MB beside the
    blob for as long as it is sent); COPY data goes in pieces of :data:`COPY_CHUNK_BYTES`.
    Each blob is taken out of ``row`` and freed once sent: the server stores the row (most
    of the write's time) after it has received it all. The fields are encoded as
    PostgreSQL's binary format has them: text as UTF-8, the integer as int4, the timestamp
    as microseconds since 2000-01-01 UTC.
    """
    import pyarrow as pa

    micros = (row["built_at"] - _PG_EPOCH) // timedelta(microseconds=1)
    encoded = {"cache_key": lambda: row["cache_key"].encode(),
               "part": lambda: struct.pack(">i", row["part"]),
               "watermark": lambda: row["watermark"].encode(),
               "procedures": lambda: memoryview(row.pop("procedures")),
               "complications": lambda: memoryview(row.pop("complications")),
               "built_at": lambda: struct.pack(">q", micros)}
    preparer = conn.dialect.identifier_preparer
    # Identifiers are the schema's own table and column names; no value is in the text.
    statement = (f"COPY {preparer.format_table(snapshot_cache)} "
                 f"({', '.join(preparer.quote(c) for c in encoded)}) FROM STDIN (FORMAT binary)")
    driver = conn.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(statement) as stream:
        stream.write(_COPY_SIGNATURE + struct.pack(">h", len(encoded)))
        for encode in encoded.values():
            field = encode()
            stream.write(struct.pack(">i", len(field)))
            for start in range(0, len(field), COPY_CHUNK_BYTES):
                stream.write(field[start:start + COPY_CHUNK_BYTES])
            del field
        stream.write(_COPY_TRAILER)
        # Sent: the blobs are freed; their pages go back while the server stores the row.
        pa.default_memory_pool().release_unused()


# --- the snapshot --------------------------------------------------------------------------


def _snapshot(tables: list, as_of: date, needs_patient: bool,
              extras: tuple[str, ...], id_hashes: tuple | None = None) -> Snapshot:
    """Keep the rows up to ``as_of`` and build the snapshot as the plain read does.

    ``tables`` (procedures, complications) is emptied: the tables die with this frame.
    ``id_hashes``: the two tables' ``procedure_id`` hashes in row order (:class:`_Read`),
    or None to hash them here (snapshot_from_rows).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    procs, comps = tables
    tables.clear()
    proc_hashes, comp_hashes = id_hashes or (None, None)
    day = day_number(as_of)
    if procs.num_rows and pc.max(procs["procedure_date"]).as_py() > day:
        keep = pc.less_equal(procs["procedure_date"], day)
        procs = procs.filter(keep)
        if proc_hashes is not None:
            proc_hashes = proc_hashes[keep.to_numpy()]
        del keep
    if comps.num_rows and pc.max(comps["event_date"]).as_py() > day:
        keep = pc.less_equal(comps["event_date"], day)
        comps = comps.filter(keep)
        if comp_hashes is not None:
            comp_hashes = comp_hashes[keep.to_numpy()]
        del keep
    proc_names = list(_PROCEDURE_KINDS) + (["patient_hash"] if needs_patient else [])
    proc_rows = {name: _pandas(procs[name]) for name in proc_names}
    extra_rows = {name: _pandas(procs[name]) for name in extras}
    comp_rows = {name: _pandas(comps[name]) for name in _COMPLICATION_KINDS
                 if name != "complication_id"}
    del procs, comps
    # The dictionaries' indices died with the tables (the categoricals hold copies): their
    # pages go back before the snapshot's ordered copies are made, not after.
    pa.default_memory_pool().release_unused()
    return snapshot_from_rows(proc_rows, comp_rows, as_of, needs_patient,
                              extra_rows=extra_rows, id_hashes=proc_hashes,
                              comp_id_hashes=comp_hashes)


def _pandas(column):
    """Return one Arrow column as the plain read hands it to snapshot_from_rows."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        # Only the values present, as a read of these rows alone would have them: an
        # unused category (a site with only later procedures) would be charted as empty.
        values = column.to_pandas().array
        codes = values.codes
        used = np.bincount(codes[codes >= 0], minlength=len(values.categories))
        return values.remove_unused_categories() if (used == 0).any() else values
    if pa.types.is_string(column.type):
        return column.to_pandas().array  # Arrow-backed strings, no Python string per row
    return column.to_numpy()

