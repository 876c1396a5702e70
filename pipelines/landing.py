"""The landing directory: pick up finished extract files, load them, file them away.

Hospitals (or an SFTP job) drop extracts into a landing directory. A file is picked up
only when it looks complete: temporary names (``*.part``, ``*.tmp``, ...) and dotfiles are
ignored, and a file must not have been modified for ``min_age_seconds`` (writers that
upload under the final name are still writing until the size and modification time
settle). After :func:`pipelines.ingest.ingest_paths` has processed the files, loaded and
duplicate files move to ``archive/<YYYY-MM-DD>/`` and rejected files to ``rejected/`` with a
one-line ``<name>.reason.txt`` beside them.

Landing is a trust boundary (issue 14): every entry with a complete name is offered to
ingest, which refuses symlinks, FIFOs, devices and files owned by users outside
``KYPHOWATCH_ALLOWED_OWNER_UIDS`` with a clear reason; such an entry is then removed from
landing (never followed, moved or archived as a link) and its reason written to
``rejected/``. Archived files are regular files: the bytes, not a link to them.

Everything is safe to rerun: ingest is idempotent (a file already loaded is reported as a
duplicate), and a file whose twin with the same checksum is already in the archive (e.g.
the move was interrupted after the copy) is simply removed from landing. This module does
not import Airflow; the DAGs and the landing trigger call into it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.settings import Settings

if TYPE_CHECKING:  # the landing trigger imports this module: keep pandas & co. out of it
    from pipelines.ingest import IngestReport

log = logging.getLogger(__name__)

# Names that uploaders and editors use while a file is still being written.
PARTIAL_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".crdownload", ".swp", ".lock")


def is_complete_name(name: str) -> bool:
    """Return whether ``name`` looks like a finished file rather than one being written."""
    lowered = name.lower()
    return not (
        name.startswith(".") or name.endswith("~") or lowered.endswith(PARTIAL_SUFFIXES)
    )


def landing_files(landing_dir: Path) -> list[Path]:
    """Return the entries of ``landing_dir`` with complete-looking names, by name.

    Every entry but a directory is returned, symlinks, FIFOs and devices included, so that
    ingest refuses them with a reason instead of their being ignored forever (or followed).
    """
    landing_dir = Path(landing_dir)
    if not landing_dir.is_dir():
        return []
    found = []
    for path in landing_dir.iterdir():
        if not is_complete_name(path.name):
            continue
        try:
            if stat.S_ISDIR(path.lstat().st_mode):
                continue
        except FileNotFoundError:  # picked up by someone else meanwhile
            continue
        found.append(path)
    return sorted(found)


def stable_files(landing_dir: Path, min_age_seconds: float, *, now: float | None = None) -> list[Path]:
    """Return landing files whose size and modification time have not changed for a while.

    A file's modification time moves with every write, so "not modified for
    ``min_age_seconds``" is the same as "size and mtime unchanged for that long" without
    having to remember earlier observations (the trigger and a cron run agree).
    """
    now = time.time() if now is None else now
    stable = []
    for path in landing_files(landing_dir):
        try:
            modified = path.lstat().st_mtime  # never follow a link out of landing
        except FileNotFoundError:  # picked up by someone else meanwhile
            continue
        if now - modified >= min_age_seconds:
            stable.append(path)
    return stable


def seconds_until_settled(landing_dir: Path, min_age_seconds: float, *,
                          now: float | None = None) -> float | None:  # fmt: skip
    """Return how long until the next landing file not yet settled becomes settled.

    ``None`` when every file has settled already (or there are none). The landing watcher
    sleeps this long instead of a whole poll interval, so a file is announced when it has
    been unchanged for ``min_age_seconds`` -- not up to a poll interval later. A file still
    being written moves its modification time, so waking early never announces it early:
    :func:`stable_files` decides, with the same rule as before.
    """
    now = time.time() if now is None else now
    waits = []
    for path in landing_files(landing_dir):
        try:
            modified = path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if now - modified < min_age_seconds:
            waits.append(modified + min_age_seconds - now)
    return min(waits) if waits else None


def file_checksum(path: Path) -> str:
    """Return the checksum ingest uses for ``path`` (SHA-256 of the bytes)."""
    from pipelines.ingest.reader import file_checksum as checksum

    return checksum(path)


def _same_content(left: Path, right: Path) -> bool:
    try:
        return left.stat().st_size == right.stat().st_size and file_checksum(
            left) == file_checksum(right)
    except OSError:  # an unreadable file cannot be shown to be a twin: keep both
        return False


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _move(source: Path, target_dir: Path) -> Path | None:
    """Move ``source`` into ``target_dir``; return the new path (None if a twin was there).

    Only a regular file is moved; anything else (a symlink, FIFO, device) is removed from
    landing and nothing is filed: archiving a link would keep a pointer, not the data.
    """
    if not _is_regular(source):
        source.unlink()
        log.warning("%s is not a regular file; removed from landing, nothing archived",
                    source.name)
        return None
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.name
    if target.exists():
        if _same_content(source, target):
            source.unlink()
            log.info("%s already filed as %s; removed from landing", source.name, target)
            return None
        # same name, different content: keep both, the newcomer carries its checksum
        try:
            checksum = file_checksum(source)[:12]
        except OSError:  # unreadable (why it was rejected): name it by time instead
            checksum = f"unread{time.time_ns()}"
        target = target_dir / f"{source.stem}.{checksum}{source.suffix}"
        if target.exists():
            source.unlink()
            return None
    # os.replace is atomic on one filesystem; shutil.move copies then deletes across
    # filesystems, and a crash in between is repaired by the twin check above on rerun.
    try:
        os.replace(source, target)
    except OSError:
        shutil.move(str(source), str(target))
    return target


def _field(result: Any, name: str) -> Any:
    return result[name] if isinstance(result, dict) else getattr(result, name)


def ingest_landing(settings: Settings, landing_dir: Path, *, min_age_seconds: float = 0.0
                   ) -> IngestReport:  # fmt: skip
    """Load the settled files in ``landing_dir``; leave them where they are.

    Refused here, before ingest: a symlink to a directory (ingest would expand it and read
    the files behind it) and a regular file with more than one hard link (the name in
    landing shares its bytes with a name elsewhere, which could change the archived copy).
    Ingest refuses every other non-regular entry itself.
    """
    from pipelines.ingest import FileResult, IngestReport, ingest_paths

    files = stable_files(Path(landing_dir), min_age_seconds)
    if not files:
        log.info("landing %s: nothing to pick up", landing_dir)
        return IngestReport([])
    key = settings.require_pseudonym_key()
    files = [_with_shown_name(path, key) for path in files]
    refused = []
    for path in files:
        reason = _landing_problem(path)
        if reason:
            refused.append(FileResult(path=str(path), kind=None, status="rejected", reason=reason))
    refused_paths = {result.path for result in refused}
    loadable = [path for path in files if str(path) not in refused_paths]
    report = ingest_paths(settings, loadable) if loadable else IngestReport([])
    return IngestReport(refused + report.files)


def _with_shown_name(path: Path, key: bytes) -> Path:
    """Rename a landed file whose name has unexpected parts to the name ingest shows.

    A name with an identifier typed into it would otherwise travel on in the ingest
    report, the Airflow task's logged return value and the archive. The shown name
    (``reader.display_name``) keeps kind and stamp and a keyed hash of the rest, so whoever
    holds the key can still match it to the sender's file. Renaming in the same directory
    is atomic; when the target exists or the rename fails the file keeps its name (ingest
    still stores and reports only the shown name).
    """
    from pipelines.ingest.reader import display_name

    shown = display_name(path.name, key)
    target = path.with_name(shown)
    if shown == path.name or os.path.lexists(target):
        return path
    try:
        os.rename(path, target)
    except OSError:
        return path
    log.info("landing: a file name with unexpected parts was renamed to %s", shown)
    return target


def _landing_problem(path: Path) -> str | None:
    """Why landing refuses ``path`` before ingest sees it, or None."""
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) and path.is_dir():
            return "a symbolic link to a directory; only regular files are read"
    except OSError:
        return None  # vanished or unreadable: ingest reports it
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        return (f"{path.name}: has {info.st_nlink} hard links; landing accepts files with one "
                "link only (copy the file in)")
    return None


def file_away(results: list[Any], archive_dir: Path, rejected_dir: Path, *,
              today: date | None = None) -> None:  # fmt: skip
    """Move each processed file to ``archive/<date>/`` or ``rejected/`` (with its reason).

    ``results`` are ``FileResult`` objects or their ``to_dict()`` form (as passed between
    Airflow tasks). Files no longer in landing (moved by an earlier attempt) are skipped.
    """
    archive_dir, rejected_dir = Path(archive_dir), Path(rejected_dir)
    day = (today or datetime.now(UTC).date()).isoformat()
    for result in results:
        source = Path(_field(result, "path"))
        if not os.path.lexists(source):
            continue
        if _field(result, "status") == "rejected":
            rejected_dir.mkdir(parents=True, exist_ok=True)
            moved = _move(source, rejected_dir)
            reason_path = rejected_dir / f"{(moved or rejected_dir / source.name).name}.reason.txt"
            reason = " ".join((_field(result, "reason") or "rejected").split())
            reason_path.write_text(reason + "\n", encoding="utf-8")
            log.warning("rejected: %s", reason)  # the reason names the file (as stored)
        else:
            _move(source, archive_dir / day)


def loaded_kinds(results: list[Any]) -> list[str]:
    """Return the extract kinds (sorted) for which some file of *this* try changed the warehouse.

    Not what the ingest DAG announces from: see :func:`unmonitored_kinds`.
    """
    return sorted(
        {_field(r, "kind") for r in results if _field(r, "status") == "loaded" and _field(r, "kind")}
    )


def unmonitored_kinds(settings: Settings) -> list[str]:
    """Return the extract kinds (sorted) the warehouse holds news of that no monitor run saw.

    A kind is news when a file of that kind changed rows (``file_ledger``: loaded, rows
    inserted or updated) after the newest stored monitor run was computed, or when no monitor
    run exists yet. This follows the warehouse, not the current try: a file that loaded in
    an earlier try that was killed before announcing is reported by the retry (which sees
    only duplicates), so the monitor still runs. A monitor rerun for a past ``as_of`` also
    counts as "seen"; that only matters if someone backfills between a load and its
    announce, and the nightly ingest run then does not re-announce -- trigger the monitor.
    """
    import sqlalchemy as sa

    from pipelines.db import make_engine
    from pipelines.schema import file_ledger, monitor_run

    newest_run = sa.select(sa.func.max(monitor_run.c.computed_at)).scalar_subquery()
    query = (
        sa.select(file_ledger.c.kind)
        .where(
            file_ledger.c.status == "loaded",
            file_ledger.c.kind.isnot(None),
            file_ledger.c.rows_inserted + file_ledger.c.rows_updated > 0,
            sa.or_(newest_run.is_(None), file_ledger.c.processed_at > newest_run),
        )
        .distinct()
    )
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(query).scalars())
    finally:
        engine.dispose()


def process_landing(
    settings: Settings,
    landing_dir: Path,
    archive_dir: Path,
    rejected_dir: Path,
    *,
    min_age_seconds: float = 0.0,
    today: date | None = None,
) -> IngestReport:
    """Ingest the complete files in ``landing_dir`` and move each to archive or rejected."""
    report = ingest_landing(settings, landing_dir, min_age_seconds=min_age_seconds)
    file_away(report.files, archive_dir, rejected_dir, today=today)
    return report
