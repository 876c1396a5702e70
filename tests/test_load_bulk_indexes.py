"""A bulk first load sets the procedure tables' indexes aside and rebuilds them (issue 10).

A first procedures file into empty tables is COPYed without ``procedure``'s and
``procedure_version``'s indexes (primary keys included) and the indexes are rebuilt from
the catalog's own definitions in the same transaction (load._SetAsideIndex). The schema
afterwards must be the schema before, to the byte; a load that fails must leave the
indexes in place; and the rows must be those of the load that kept its indexes.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import ExternalSystemError
from pipelines.ingest import ingest_paths, load
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, snapshot, write

# Every index and constraint of the warehouse's tables, and the columns' NOT NULL marks: what
# a drop and rebuild could change. Names and definitions as the catalog prints them.
_CATALOG = sa.text("""
    SELECT 'index', tablename || '.' || indexname, indexdef || ' ' || coalesce(tablespace, '-')
    FROM pg_indexes WHERE schemaname = current_schema()
    UNION ALL
    SELECT 'constraint', conrelid::regclass::text || '.' || conname,
           contype::text || ' ' || pg_get_constraintdef(oid) || ' ' || conindid::regclass::text
    FROM pg_constraint WHERE connamespace = CAST(current_schema() AS regnamespace)
    UNION ALL
    SELECT 'not null', attrelid::regclass::text || '.' || attname, attnotnull::text
    FROM pg_attribute
    WHERE attrelid IN (CAST('procedure' AS regclass), CAST('procedure_version' AS regclass))
      AND attnum > 0 AND NOT attisdropped
    ORDER BY 1, 2
""")
_SET_ASIDE = {"ix_procedure_site_date", "procedure_pkey", "pk_procedure_version"}


def _catalog(db_url: str) -> list[tuple]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(_CATALOG)]
    engine.dispose()
    return rows


def _procedures(tmp_path, rows: int = 40):
    records = [proc_row(f"P{n}", patient=f"PT-{n}", date=f"2024-01-{1 + n % 28:02d}")
               for n in range(1, rows + 1)]
    records[5] = proc_row("P3", patient="PT-again")  # a key repeated in the file
    records[9] = proc_row("P10", age_years="7")  # invalid: quarantined
    return write(tmp_path / "in" / "procedures_20240131.csv", csv_text(PROC_HEADER, records))


@pytest.mark.postgres
def test_a_bulk_first_load_leaves_the_schema_as_it_was(pg_url, tmp_path, settings_for,
                                                       rebuilt):
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    schema.migrate(sa.create_engine(pg_url))
    before = _catalog(pg_url)
    assert {name.split(".")[1] for kind, name, _ in before if kind == "index"} >= _SET_ASIDE
    report = ingest_paths(settings, [_procedures(tmp_path)]).to_dict()
    assert report["files"][0]["status"] == "loaded"
    assert [{index.name for index in call} for call in rebuilt] == [_SET_ASIDE]
    assert _catalog(pg_url) == before
    # The primary keys hold again: a duplicate key is refused by the rebuilt index.
    engine = sa.create_engine(pg_url)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO procedure SELECT * FROM procedure LIMIT 1"))
    engine.dispose()


@pytest.mark.postgres
def test_the_rows_are_those_of_a_load_that_kept_its_indexes(pg_url, pg_admin_url, tmp_path,
                                                           settings_for, monkeypatch):
    procedures = _procedures(tmp_path)
    kept = ingest_paths(settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"}),
                        [procedures]).to_dict()
    kept_state = snapshot(pg_url)

    monkeypatch.setattr(load, "BULK_LOAD_BYTES", 0)
    bulk_url = pg_url + "_bulk"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    name = sa.make_url(bulk_url).database
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    try:
        bulk = ingest_paths(settings_for(bulk_url, {"KYPHOWATCH_CHUNK_ROWS": "7"}),
                            [procedures]).to_dict()
        bulk_state = snapshot(bulk_url)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
        admin.dispose()
    without_paths = [{k: v for k, v in r["files"][0].items() if k != "path"} for r in (kept, bulk)]
    assert without_paths[0] == without_paths[1]
    assert kept_state == bulk_state
    assert without_paths[1]["quarantine_reasons"] == {"age_years:out_of_range": 1,
                                                      "procedure_id:duplicate_in_file": 2}


@pytest.mark.postgres
def test_a_load_failing_in_its_copy_leaves_the_indexes_in_place(pg_url, tmp_path, settings_for,
                                                                rebuilt):
    """A row the server refuses in a later chunk's COPY (the indexes are gone by then)."""
    engine = sa.create_engine(pg_url)
    schema.migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_p30() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.procedure_id = 'P30' THEN RAISE EXCEPTION 'refused by the test trigger'; "
            "END IF; RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER refuse_p30 BEFORE INSERT ON procedure "
                             "FOR EACH ROW EXECUTE FUNCTION refuse_p30()")
    before = _catalog(pg_url)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    with pytest.raises(ExternalSystemError, match="refused by the test trigger"):
        ingest_paths(settings, [_procedures(tmp_path)])
    assert rebuilt == []  # it failed between the drop and the rebuild
    assert _catalog(pg_url) == before
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.procedure)).scalar() == 0
    engine.dispose()


@pytest.mark.postgres
def test_a_rejected_bulk_load_leaves_the_indexes_in_place(pg_url, tmp_path, settings_for,
                                                          rebuilt):
    """Rejected after the rebuild (too many bad rows): the rollback still restores all."""
    schema.migrate(sa.create_engine(pg_url))
    before = _catalog(pg_url)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7",
                                     "KYPHOWATCH_MAX_BAD_ROW_SHARE": "0.01"})
    report = ingest_paths(settings, [_procedures(tmp_path)]).to_dict()
    assert report["files"][0]["status"] == "rejected"
    assert len(rebuilt) == 1
    assert _catalog(pg_url) == before


@pytest.mark.postgres
def test_a_small_or_later_file_keeps_the_indexes(pg_url, tmp_path, settings_for, monkeypatch):
    dropped = []
    monkeypatch.setattr(load, "_set_aside_indexes",
                        lambda conn, tables: dropped.append(tables) or ())
    settings = settings_for(pg_url)
    assert ingest_paths(settings, [_procedures(tmp_path)]).exit_code == 0  # below the size
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:  # not empty any more: no direct load, nothing set aside
        assert load._direct_load(conn, "procedures", "c" * 64, "20240201T000000",
                                 bulk=True) is None
    engine.dispose()
    assert dropped == []


@pytest.mark.postgres
def test_the_least_privilege_loader_keeps_the_indexes(pg_admin_url, tmp_path, settings_for,
                                                      rebuilt):
    """The loader role may not drop the owner's indexes: it loads the same file with them."""
    import uuid

    from pipelines.roles import apply_roles
    from tests.test_roles import _role_set

    roles = _role_set()
    database = f"kw_load8x_roles_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(database))
    try:
        apply_roles(pg_admin_url, database, roles)

        def url(role: str) -> str:
            return sa.make_url(pg_admin_url).set(
                database=database, username=getattr(roles, role + "_role"),
                password=getattr(roles, role + "_password"),
            ).render_as_string(hide_password=False)

        owner = sa.create_engine(url("owner"))
        schema.migrate(owner)
        owner.dispose()
        before = _catalog(url("owner"))
        report = ingest_paths(settings_for(url("loader")), [_procedures(tmp_path)]).to_dict()
        assert report["files"][0]["status"] == "loaded"
        assert rebuilt == [()]  # a direct load, nothing set aside
        assert _catalog(url("owner")) == before
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(database) + " WITH (FORCE)")
            for role in (roles.analyst_role, roles.loader_role, roles.owner_role):
                conn.exec_driver_sql("DROP ROLE IF EXISTS " + quote(role))
        admin.dispose()


@pytest.mark.postgres
def test_two_bulk_first_loads_at_once_both_load(pg_url, tmp_path, settings_for, rebuilt,
                                                monkeypatch):
    """Two first loads racing for the empty tables: one loads directly, the other waits.

    Both pass the emptiness check before either locks (the barrier). A check that kept a
    read lock in the file's transaction made them deadlock asking for the exclusive lock,
    and one file failed (exit 4).
    """
    import threading

    schema.migrate(sa.create_engine(pg_url))
    settings = settings_for(pg_url)
    barrier = threading.Barrier(2, timeout=60)
    real_owns = load._owns

    def owns_after_both_checked(conn, table):
        if table.name == "procedure":  # the second of the two tables asked about
            barrier.wait()
        return real_owns(conn, table)

    monkeypatch.setattr(load, "_owns", owns_after_both_checked)
    files = []
    for batch in ("a", "b"):
        records = [proc_row(f"{batch.upper()}{n}", patient=f"PT-{batch}{n}") for n in range(30)]
        files.append(write(tmp_path / batch / f"procedures_2024013{len(files)}.csv",
                           csv_text(PROC_HEADER, records)))
    codes: dict[str, int] = {}

    def run(path):
        codes[path.parent.name] = ingest_paths(settings, [path]).exit_code

    threads = [threading.Thread(target=run, args=(path,)) for path in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert codes == {"a": 0, "b": 0}
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.procedure)) == 60
    engine.dispose()
    assert len([call for call in rebuilt if call]) == 1  # only the first set its indexes aside
