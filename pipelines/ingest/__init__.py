"""Validated, idempotent ingest of hospital extracts (see docs/contract.md).

:func:`ingest_paths` is the entry point used by the CLI, the Airflow DAGs and the
tests: files (or directories of files) in, one :class:`FileResult` per file out.
"""

from __future__ import annotations

import gc
import logging
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from pipelines.contract import PROCEDURES, extract_stamp, kind_of
from pipelines.db import open_warehouse, redact_url
from pipelines.errors import ExternalSystemError
from pipelines.settings import Settings

if TYPE_CHECKING:
    from pipelines.ingest.load import FileResult, IngestReport

__all__ = ["FileResult", "IngestReport", "ingest_paths", "expand_paths"]


def __getattr__(name: str):
    """Import the loader (pandas, Great Expectations) only when it is used.

    ``kyphowatch site`` and the other read commands import this package to register the
    ``ingest`` sub-command; they should not pay for the loader's imports.
    """
    if name in ("FileResult", "IngestReport", "load_file"):
        from pipelines.ingest import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger(__name__)


def expand_paths(paths: list[Path]) -> list[Path]:
    """Expand directories to their extract files and order the load.

    Procedure files load before complication files (so complications find their
    procedures); within a kind, files load in extract-timestamp order. Files in a
    directory that are not extracts (a manifest, a README) are skipped; a file named
    explicitly is always attempted, so a wrongly named file is reported, not ignored.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and not child.name.startswith(".") and kind_of(child.name):
                    found.append(child)
        else:
            found.append(path)
    unique = list(dict.fromkeys(found))

    def order(path: Path) -> tuple[int, str, str]:
        kind = kind_of(path.name)
        rank = 0 if kind == PROCEDURES else 1 if kind else 2
        return (rank, extract_stamp(path.name), path.name)

    return sorted(unique, key=order)


def ingest_paths(settings: Settings, paths: list[Path]) -> IngestReport:
    """Validate and load every extract under ``paths`` into the configured warehouse."""
    from pipelines.ingest import gxaudit

    files = expand_paths(paths)
    kinds = list(dict.fromkeys(kind for kind in map(kind_of, (p.name for p in files)) if kind))
    # The audit's GX import (the longest fixed cost of a small file) runs in a helper on
    # another core while this process loads. A new interpreter starts first thing; a forked
    # helper right after the loader's imports, which it inherits (pandas: GX needs it too),
    # so that it has only GX left to import. Forking first thing instead was measured (10
    # interleaved pairs, 1,000-row files, 2 shared cores at load 3-4): the helper then
    # imports pandas and pyarrow itself (+0.2 s CPU) and the files took longer (medians
    # 2.49 -> 2.59 s and 2.14 -> 2.50 s). On a busy machine the CPU spent is what counts.
    forked = gxaudit.forks()
    if kinds and not forked:
        gxaudit.prestart(str(settings.expectations_dir), *kinds)

    # Imports make module state, not garbage: the collector's passes over them are wasted
    # (10-15 % of an import measured on this machine), and a forked helper waits for these.
    collecting = gc.isenabled()
    gc.disable()
    try:
        from pipelines.ingest.keys import check_key_strength
        from pipelines.ingest.load import IngestReport
        from pipelines.ingest.reader import display_name
    finally:
        if collecting:
            gc.enable()

    if kinds and forked:
        gxaudit.prestart(str(settings.expectations_dir), *kinds)

    key = check_key_strength(settings.require_pseudonym_key())
    engine = open_warehouse(settings.db_url)  # ExternalSystemError (exit 4) when unreachable
    processing_day = datetime.now(UTC).date()
    results: list[FileResult] = []
    key_held = ExitStack()
    try:
        _hold_key(key_held, engine, key, settings)
        sites_before = _sites_with_procedures(engine)
        try:
            for path in files:
                result = _load_or_explain(engine, path, settings, key, processing_day, results)
                results.append(result)
                log.info(
                    "%s: %s read=%d inserted=%d updated=%d quarantined=%d pending=%d%s",
                    result.shown_name or display_name(path.name, key), result.status,
                    result.rows_read, result.inserted, result.updated, result.quarantined,
                    result.pending,
                    f" reason={result.reason}" if result.reason else "",
                )
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: anywhere in the loop
            _say_interrupted(results, files, key)
            raise
        # Into an empty warehouse every site is new: nothing worth a warning.
        new_sites = sorted(_sites_with_procedures(engine) - sites_before) \
            if sites_before and any(r.status == "loaded" for r in results) else []
        if new_sites:
            log.warning("first procedures from %d site(s) new to the warehouse: %s; check each "
                        "site id is right (a mistyped one becomes a site of its own)",
                        len(new_sites), ", ".join(new_sites))
    finally:
        key_held.close()
        engine.dispose()
    return IngestReport(results, new_sites)


def _say_interrupted(results: list[FileResult], files: list[Path], key: bytes) -> None:
    """Log, on an interrupt, what is in the warehouse and what a rerun will load.

    Each file is its own transaction: those before are committed, the one interrupted is
    rolled back, and a rerun skips the committed ones by checksum (user audit: the
    interrupt said only "interrupted"). ``results`` holds the finished files, in order.
    """
    from pipelines.ingest.reader import display_name

    done = [r.shown_name or display_name(Path(r.path).name, key) for r in results]
    finished = (": " + ", ".join(done)) if done else ""
    if len(results) >= len(files):  # after the last file: nothing was rolled back
        log.warning("interrupted after loading every file; %d file(s) were finished%s.",
                    len(done), finished)
        return
    log.warning(
        "interrupted while loading %s: that file was rolled back. %d file(s) were finished "
        "before it%s; %d not started. Rerun the same ingest: finished files are recognised and skipped.",
        display_name(files[len(results)].name, key), len(done), finished,
        len(files) - len(results) - 1)


def _sites_with_procedures(engine) -> set[str]:
    """Return the site ids with at least one procedure, one index probe per site."""
    from pipelines.schema import procedure

    sites = sa.select(sa.func.min(procedure.c.site_id).label("site_id")).cte(
        "sites", recursive=True)
    following = (sa.select(sa.func.min(procedure.c.site_id))
                 .where(procedure.c.site_id > sites.c.site_id).scalar_subquery())
    sites = sites.union_all(sa.select(following).where(sites.c.site_id.isnot(None)))
    with engine.connect() as conn:
        return {site for site in conn.scalars(sa.select(sites.c.site_id)) if site is not None}


def _hold_key(stack: ExitStack, engine, key: bytes, settings: Settings) -> None:
    """Before any file: refuse a key other than the warehouse's, and hold it for the batch.

    Another key would give a patient two digests; the hold keeps a key rotation from running
    while this batch writes digests (pipelines.ingest.keys.key_in_use).
    """
    from pipelines.ingest.keys import key_in_use

    try:
        stack.enter_context(key_in_use(engine, key))
    except sa.exc.DBAPIError as exc:
        raise ExternalSystemError(
            f"warehouse {redact_url(settings.db_url)} failed while checking the pseudonym "
            f"key fingerprint ({type(getattr(exc, 'orig', exc)).__name__}); nothing loaded"
        ) from exc


def _warehouse_errors() -> tuple[type[BaseException], ...]:
    """Return the failures of the warehouse itself: SQLAlchemy's, and the driver's own.

    The bulk load writes by COPY through the psycopg connection under SQLAlchemy's, so a
    server error there (a full disk, a trigger, a lost connection) arrives as psycopg's
    exception, which SQLAlchemy never wrapped: without it here that was an "internal error".
    """
    import psycopg

    return (sa.exc.DBAPIError, psycopg.Error)


def _load_or_explain(engine, path: Path, settings: Settings, key: bytes, processing_day,
                     done: list[FileResult]) -> FileResult:
    """Load one file; turn a warehouse failure into a clear error naming what did load.

    The file's own transaction has rolled back, so rerunning the same command is safe.
    """
    from pipelines.ingest.load import load_file
    from pipelines.ingest.reader import ReadLimits

    try:
        return load_file(
            engine, path, key=key, chunk_rows=settings.chunk_rows,
            max_bad_share=settings.max_bad_row_share,
            expectations_dir=settings.expectations_dir, processing_day=processing_day,
            limits=ReadLimits.from_settings(settings),
            preview_fields=settings.quarantine_preview_fields,
        )
    except _warehouse_errors() as exc:
        loaded = sum(1 for r in done if r.status == "loaded")
        first_line = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise ExternalSystemError(
            f"warehouse {redact_url(settings.db_url)} failed while loading {path.name} "
            f"({type(getattr(exc, 'orig', exc)).__name__}: {first_line}); that file was rolled "
            f"back, {loaded} earlier file(s) stay loaded; rerun the same command"
        ) from exc
