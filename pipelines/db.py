"""Warehouse connection: the one way every stage opens the warehouse.

:func:`open_warehouse` is the entry point (engine, schema migration, a first round trip, and
one :class:`ExternalSystemError` line naming the redacted URL when it fails); :func:`reading`
wraps it for read-only commands, which never create a warehouse: a database without the
kyphowatch schema is refused (exit 3), an older kyphowatch schema is brought up to date as
the writers do. Callers hand the engine or connection down rather than opening their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import ExternalSystemError

_URL_FORMS = ("sqlite:///relative/path.db, sqlite:////absolute/path.db or "
              "postgresql://user@host:5432/database")


def warehouse_url(db_url: str) -> sa.URL:
    """Return ``db_url`` parsed, or raise ConfigError (exit 3) saying what a URL looks like.

    A bare path (``--db w.db``), an unknown scheme (``sqlit://``), SQLite with a host
    (``sqlite://w.db``, two slashes) and an in-memory SQLite database (``sqlite://``,
    ``sqlite:///``, ``:memory:``) are mistakes, not warehouses: the last would load a file,
    report success and lose everything when the process exits.
    """
    from pipelines.errors import ConfigError

    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError:
        raise ConfigError(f"--db / KYPHOWATCH_DB_URL {redact_url(db_url)!r} is not a database URL; "
                          f"write {_URL_FORMS}") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"--db / KYPHOWATCH_DB_URL: unknown database {backend!r} in "
                          f"{redact_url(db_url)}; write {_URL_FORMS}")
    if backend == "sqlite":
        if url.host:
            raise ConfigError(f"--db / KYPHOWATCH_DB_URL {db_url!r}: a SQLite URL has no host; "
                              f"did you mean sqlite:///{url.host}{'/' + url.database if url.database else ''}?")
        if not url.database or url.database == ":memory:" or url.database.startswith("file::memory:"):
            raise ConfigError(f"--db / KYPHOWATCH_DB_URL {db_url!r} is an in-memory SQLite "
                              "database, which is lost when the command exits; name a file: "
                              "sqlite:///path/to/warehouse.db")
    return url


def require_warehouse(db_url: str) -> None:
    """Raise ConfigError (exit 3) when ``db_url`` names a SQLite file that does not exist.

    Every command but ``ingest`` calls this first (``sites``, ``site``, ``report``,
    ``monitor``, every ``alerts`` action, ``regulator``, ``runs``, ``beyond-report``): a
    typo in ``--db`` must be an error naming the path, never a new, empty warehouse.
    """
    from pipelines.errors import ConfigError

    url = warehouse_url(db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
        raise ConfigError(f"no warehouse at {url.database} (a read command never creates "
                          "one: check --db or KYPHOWATCH_DB_URL, or load data with "
                          "kyphowatch ingest first)")


# Tables every kyphowatch warehouse has held since its first migration. A database without
# them (an empty one, another application's) is not a warehouse: a read command must
# neither create the schema in it nor change it in any way (user audit, 2026-12-07).
_WAREHOUSE_TABLES = frozenset({"schema_version", "procedure", "file_ledger"})


def _not_a_warehouse(db_url: str):
    """Return the ConfigError (exit 3) for a database without the kyphowatch schema."""
    from pipelines.errors import ConfigError

    return ConfigError(
        f"{redact_url(db_url)} holds no kyphowatch warehouse (a read command never "
        "creates one: check --db or KYPHOWATCH_DB_URL, or load data with kyphowatch "
        "ingest first; with PostgreSQL roles, kyphowatch roles migrate as the owner)")


def _sqlite_holds_warehouse(dbapi_conn) -> bool:  # noqa: ANN001 - DBAPI connection
    """Whether a SQLite connection's database has the kyphowatch tables (one read)."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                       "(?, ?, ?)", sorted(_WAREHOUSE_TABLES))
        return cursor.fetchone()[0] == len(_WAREHOUSE_TABLES)
    finally:
        cursor.close()


def _require_postgres_schema(engine: sa.Engine, db_url: str) -> None:
    """Raise ConfigError (exit 3) unless the PostgreSQL database has the kyphowatch tables.

    One catalogue lookup on the connection the migration check then reuses; nothing written.
    """
    names = sa.text("SELECT count(to_regclass(name)) FROM unnest(CAST(:names AS text[])) "
                    "AS name")
    with engine.connect() as conn:
        found = conn.execute(names, {"names": sorted(_WAREHOUSE_TABLES)}).scalar_one()
    if found != len(_WAREHOUSE_TABLES):
        raise _not_a_warehouse(db_url)


def make_engine(db_url: str, *, migrate: bool = True, create: bool = True) -> sa.Engine:
    """Create an engine for ``db_url`` and bring its schema up to date.

    For SQLite the parent directory is created and the journal is WAL, so a reader (the
    CLI, a report) never blocks a loader.

    ``create=False`` (the read commands, :func:`reading`): the database must already be a
    kyphowatch warehouse, else ConfigError (exit 3) before anything is written to it (no
    folder, no file, no tables, no journal mode); one whose schema is older than the code
    is migrated as ``migrate`` says, like the writers' (its data are kyphowatch's, and
    the read's queries need the current columns).
    """
    url = warehouse_url(db_url)
    if url.get_backend_name() == "sqlite":
        if not create:
            require_warehouse(db_url)  # the file exists: connecting creates none
        folder = Path(url.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from pipelines.errors import ConfigError

            raise ConfigError(f"cannot create the warehouse's folder {folder}: "
                              f"{exc.strerror or exc}") from None
        engine = sa.create_engine(url, connect_args={"timeout": 60})
        unchecked = not create

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001 - DBAPI hook
            nonlocal unchecked
            if unchecked:
                # before the journal pragma, which would rewrite another application's file
                if not _sqlite_holds_warehouse(dbapi_conn):
                    dbapi_conn.close()
                    raise _not_a_warehouse(db_url)
                unchecked = False
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    else:
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(url, pool_pre_ping=True)
    if not create:
        try:
            if url.get_backend_name() == "sqlite":
                engine.connect().close()  # the connect hook checks, into the pool
            else:
                _require_postgres_schema(engine, db_url)
        except BaseException:
            engine.dispose()
            raise
    if migrate:
        try:
            schema.migrate(engine)
        except OSError as exc:  # SQLite: the lock file beside the warehouse (a read-only place)
            from pipelines.errors import ConfigError

            engine.dispose()
            raise ConfigError(f"cannot write the warehouse {url.database}: "
                              f"{exc.strerror or exc}") from None
    return engine


def load_driver(db_url: str) -> None:
    """Import the driver and SQLAlchemy dialect of ``db_url`` without connecting.

    For a process about to fork readers (the report): imported once before the fork,
    each child has them instead of importing them again (psycopg and the PostgreSQL
    dialect: 0.1-0.15 s of CPU in each process that opens the warehouse).
    """
    url = warehouse_url(db_url)
    if url.drivername == "postgresql":  # as make_engine opens it
        url = url.set(drivername="postgresql+psycopg")
    sa.create_engine(url).dispose()  # an engine connects only when first used


def open_warehouse(db_url: str, *, migrate: bool = True, create: bool = True) -> sa.Engine:
    """Return a migrated engine whose connection has answered one query.

    ``create=False``: refuse a database without the kyphowatch schema (:func:`make_engine`).

    Any database failure (unreachable server, bad credentials, a locked or corrupt SQLite
    file) becomes one :class:`ExternalSystemError` naming the redacted URL: exit code 4 on
    the command line, a clear task failure in Airflow, never a traceback.
    """
    engine = None
    try:
        engine = make_engine(db_url, migrate=migrate, create=create)
        with engine.connect() as conn:
            conn.execute(sa.select(1))
        return engine
    except sa.exc.SQLAlchemyError as exc:
        if engine is not None:
            engine.dispose()
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExternalSystemError(
            f"cannot open warehouse {redact_url(db_url)}: {first_line}"
        ) from exc


def redact_url(db_url: str) -> str:
    """Return the URL with any password hidden, for logs and messages.

    Text that does not parse as a URL is returned with anything between ``:`` and ``@``
    hidden, so an error about a malformed URL never prints its password either.
    """
    try:
        return sa.make_url(db_url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r":[^:@/]*@", ":***@", db_url)


@contextmanager
def reading(db_url: str) -> Iterator[sa.Connection]:
    """Yield a connection for read-only queries; dispose of the engine afterwards.

    A database without the kyphowatch schema (empty, or another application's) is
    ConfigError (exit 3) naming the redacted URL, and is left untouched: a read never
    creates a warehouse. An older kyphowatch schema is migrated first, as by the writers.
    A database failure becomes one :class:`ExternalSystemError` line naming the (redacted)
    warehouse -- exit code 4 on the command line, no traceback.
    """
    engine = open_warehouse(db_url, create=False)
    try:
        with engine.connect() as conn:
            yield conn
    except sa.exc.SQLAlchemyError as exc:
        raise ExternalSystemError(
            f"cannot read warehouse {redact_url(db_url)}: {type(exc).__name__}"
        ) from exc
    finally:
        engine.dispose()
