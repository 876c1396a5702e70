"""Rendering, writing and publishing a report directory; the ``report`` command."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

from pipelines.errors import ExternalSystemError
from pipelines.report.beyond import overview_section, read_beyond, render_devices
from pipelines.report.common import (
    SITE_RE,
    _page,
    output_directory,
    prepare_output_directory,
)
from pipelines.report.data import ReportData
from pipelines.report.funnels import build_funnel_templates, funnels_page
from pipelines.report.methods import methods_page
from pipelines.report.overview import index_page
from pipelines.report.site import series_files, site_batches, site_page, site_page_bytes
from pipelines.settings import Settings, load_settings

log = logging.getLogger(__name__)


EMPTY_PAGES = "The warehouse holds no procedures yet: nothing to report."
# Most sites a worker takes at a time: small enough to even out the workers, large enough
# that taking them costs nothing next to drawing them.
SITE_CHUNK = 8


def render_report(settings: Settings, as_of: date | None = None) -> dict[str, str]:
    """Return the report as ``{relative path: text}`` for ``as_of`` (default: newest data)."""
    data = ReportData(settings, as_of)
    if data.as_of is None:
        return _empty_pages()
    site_ids = _site_ids(data)
    build_funnel_templates(data)
    pages = _network_pages(settings, data)
    pages.update(_site_pages(data, site_ids))
    return pages


def _empty_pages() -> dict[str, str]:
    return {"index.html": _page("kyphowatch surveillance report", f"<p>{EMPTY_PAGES}</p>"),
            "report.json": json.dumps({"as_of": None, "sites": []})}


def _site_ids(data: ReportData) -> list[str]:
    """Return the sites to draw a page for, after checking each id's form.

    Site ids become file names and links; the contract guarantees their form, and a report
    must never write outside its folder if a warehouse was filled some other way.
    """
    for site in data.sites:
        if not SITE_RE.fullmatch(site["site_id"]):
            raise ExternalSystemError(f"warehouse holds a malformed site id "
                                      f"{site['site_id']!r}; not writing its page")
    return [site["site_id"] for site in data.sites]


def _network_pages(settings: Settings, data: ReportData, *, encoded: bool = False
                   ) -> dict[str, str | memoryview]:
    """Return the overview, funnels, methods and devices pages, ``report.json`` and the CSV
    files behind their charts (``encoded``: the long series files as bytes, as written)."""
    # Products and cement lots are network-wide evidence: in the report. Operator pages are
    # confidential to each site's lead and stay out (pipelines/report/beyond.py).
    stored = read_beyond(settings, data.profile.name, operators=False)
    rare = {m.id for m in data.profile.metrics if m.alarm is not None
            and m.alarm.method == "rare"}
    data.files = {}
    pages = {
        "funnels.html": funnels_page(data),
        "index.html": index_page(data, overview_section(
            stored["products"], stored["lots"], data.labels, data.as_of)),
        "methods.html": methods_page(data),
        "report.json": json.dumps({
            "as_of": data.as_of.isoformat(), "run_key": data.result.run_key,
            "profile": {"name": data.profile.name, "version": data.profile.version},
            "sites": data.sites,
        }, indent=2, sort_keys=True),
    }
    pages.update(render_devices(stored["products"], stored["lots"], data.labels, rare,
                                as_of=data.as_of))
    pages.update(data.files)  # the funnels' data, beside funnels.html
    data.files = {}
    # the funnels' curves and clouds that every site page shows (build_funnel_templates)
    pages.update(data.funnel_layers)
    # the CUSUM paths of every site, for the site pages
    pages.update(series_files(data, encoded=encoded))
    return pages


def _site_pages(data: ReportData, site_ids: list[str], *, encoded: bool = False
                ) -> Iterator[tuple[str, str | bytes]]:
    """Yield ``(relative path, text)`` of each site's page and the CSV files beside it
    (``encoded``: the pages as their UTF-8 bytes, as they are written)."""
    for site_id in site_ids:
        data.files = {}
        page = site_page_bytes(data, site_id) if encoded else site_page(data, site_id)
        yield f"sites/{site_id}.html", page
        yield from data.files.items()  # the data behind every chart, as CSV
    data.files = {}


class _Writer:
    """Writes pages into a staging directory, leaving out those ``current`` already holds
    with the same bytes (a rerun for the same data rewrites only what changed)."""

    def __init__(self, staging: Path, current: Path | None) -> None:
        self.staging, self.current = str(staging), str(current) if current else None
        self.names: list[str] = []  # every page of the report, written or not

    def write(self, relative: str, text: str | bytes | memoryview) -> None:
        self.names.append(relative)
        blob = text.encode("utf-8") if isinstance(text, str) else text
        if self.current is not None and _same_bytes(os.path.join(self.current, relative),
                                                    blob):
            return
        # os.open/os.write: a report writes thousands of small files, and a file object
        # for each costs more than the write
        fd = os.open(os.path.join(self.staging, relative),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def _same_bytes(path: str, blob: bytes | memoryview) -> bool:
    try:
        if os.stat(path).st_size != len(blob):
            return False
        with open(path, "rb") as handle:
            # a memoryview compares item by item; bytes compare with one memcmp
            return handle.read() == (bytes(blob) if isinstance(blob, memoryview) else blob)
    except OSError:
        return False


def default_workers() -> int:
    """Return how many processes draw site pages: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4)) if hasattr(os, "fork") else 1


def _draw_sites(data: ReportData, site_ids: list[str], writer: _Writer, workers: int,
                first: Callable[[], None]) -> None:
    """Call ``first`` (the network pages), then draw and write every site page, in
    ``workers`` processes (``first`` runs in this one while the others draw).

    Each page depends on the report's data alone, so the bytes do not depend on which
    process drew it. Workers are forked after everything is read (they share it, copy on
    write), take chunks of :data:`SITE_CHUNK` sites from a shared counter, write their
    pages straight into the staging directory and report the names back through a pipe.
    A worker never touches the database, logs or exits through Python's shutdown
    (``os._exit``), so forking is safe inside an Airflow task or a test.
    """
    # A site page leaves no reference cycles behind (its objects go with it), so the cyclic
    # collector would only walk young objects for nothing: off while drawing (3% of the
    # page time), in this process and the workers, and back on afterwards. The network
    # pages drawn meanwhile leave a few hundred cyclic objects, collected once it is back
    # on. It is process-wide: the report starts no other threads while drawing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _draw_sites_collector_off(data, site_ids, writer, workers, first)
    finally:
        if collecting:
            gc.enable()


def _draw_sites_collector_off(data: ReportData, site_ids: list[str], writer: _Writer,
                              workers: int, first: Callable[[], None]) -> None:
    if site_ids:
        # every site's VLAD and p-charts, made once here rather than in each process
        site_batches(data)
    size = max(1, min(SITE_CHUNK, -(-len(site_ids) // (4 * max(workers, 1)))))
    chunks = [site_ids[i:i + size] for i in range(0, len(site_ids), size)]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        first()
        for relative, text in _site_pages(data, site_ids, encoded=True):
            writer.write(relative, text)
        return
    import multiprocessing
    import pickle
    import traceback

    counter = multiprocessing.get_context("fork").Value("i", 0)

    def work() -> None:
        while True:
            with counter.get_lock():
                taken = counter.value
                counter.value += 1
            if taken >= len(chunks):
                return
            for relative, text in _site_pages(data, chunks[taken], encoded=True):
                writer.write(relative, text)

    children = []
    for _ in range(workers - 1):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            code = 0
            try:
                writer.names = []
                work()
                answer = ("ok", writer.names)
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises
                answer, code = ("error", traceback.format_exc(limit=5)), 1
            try:
                with os.fdopen(write_end, "wb") as pipe:
                    pickle.dump(answer, pipe)
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    failures = []
    try:
        first()
        work()
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or failed: the workers take no further chunk, so the
        # command ends after their current one instead of drawing the rest (review).
        with counter.get_lock():
            counter.value = len(chunks)
        raise
    finally:
        for pid, read_end in children:
            with os.fdopen(read_end, "rb") as pipe:
                try:
                    status, payload = pickle.load(pipe)
                except (EOFError, pickle.UnpicklingError):
                    status, payload = "error", "the worker died without an answer"
            _, exit_status = os.waitpid(pid, 0)
            if status == "ok" and exit_status == 0:
                writer.names.extend(payload)
            else:
                failures.append(str(payload))
    if failures:
        raise RuntimeError("a report worker failed:\n" + failures[0])


def write_report(settings: Settings, out_dir: Path | None = None,
                 as_of: date | None = None, *, workers: int | None = None) -> Path:
    """Write the report into ``out_dir`` (default: the report dir) and return its index.

    A new ``out_dir`` (every :func:`publish_report` build) is written as a staging
    directory beside it and renamed into place at once. Into an existing ``out_dir``
    pages are written to a staging directory inside it and moved in one by one with atomic
    renames; pages whose bytes did not change are left as they are. When ``out_dir``
    already held a kyphowatch report (its ``report.json``), site pages of sites no longer
    in the data are removed; other files are never touched. Site pages are drawn in
    ``workers`` processes (default :func:`default_workers`); the output is the same for
    any number.
    """
    out_dir = Path(out_dir or settings.report_dir)
    workers = default_workers() if workers is None else workers
    # with workers, forking is safe here: let a second process read beside the run
    data = ReportData(settings, as_of, parallel_reads=workers > 1)
    fresh = not out_dir.exists()
    ours = not fresh and (out_dir / "report.json").exists()
    if fresh:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    else:
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        (staging / "sites").mkdir()
        writer = _Writer(staging, None if fresh else out_dir)
        if data.as_of is None:
            for relative, text in _empty_pages().items():
                writer.write(relative, text)
        else:
            site_ids = _site_ids(data)
            build_funnel_templates(data)  # before the workers fork: every site page uses them

            def network_pages() -> None:
                for relative, text in _network_pages(settings, data, encoded=True).items():
                    writer.write(relative, text)

            _draw_sites(data, site_ids, writer, workers, network_pages)
        if fresh:
            os.rename(staging, out_dir)
        else:
            (out_dir / "sites").mkdir(exist_ok=True)
            for folder, _, names in os.walk(staging):
                target = out_dir / Path(folder).relative_to(staging)
                for name in names:
                    os.replace(os.path.join(folder, name), target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if ours:
        pages = set(writer.names)
        for stale in [*(out_dir / "sites").glob("*.html"), *(out_dir / "sites").glob("*.csv"),
                      *out_dir.glob("funnel-*.csv"), *out_dir.glob("funnel-*.svg"),
                      *out_dir.glob("devices-*.csv"),
                      *out_dir.glob("series-*.csv")]:
            if stale.relative_to(out_dir).as_posix() not in pages:
                stale.unlink()
    log.info("report: %d pages written to %s", len(writer.names), out_dir)
    return out_dir / "index.html"


BUILDS = "builds"
LATEST = "latest"
EMPTY = "empty"


def _point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` atomically (a new link renamed over the old)."""
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)  # a real directory left by an older kyphowatch
    temporary = link.with_name(f".{link.name}-{os.getpid()}")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target)
    os.replace(temporary, link)


def _dated(name: str) -> date | None:
    try:
        return date.fromisoformat(name)
    except ValueError:
        return None


def publish_report(settings: Settings, as_of: date | None = None) -> Path:
    """Publish the report for ``as_of`` and move ``latest`` to it if it is the newest.

    Layout under the report dir: ``builds/<as_of>-<stamp>/`` holds each complete render;
    ``<as_of>`` is a symlink to the newest build of that date and ``latest`` a symlink to
    the newest date. Every change is a symlink swap, so readers (and the Airflow plugin)
    see a whole old report or a whole new one, even when the same date is republished.
    ``latest`` only points at ``empty`` (the no-data page) until real data is published.
    Dated reports beyond ``settings.report_keep`` are deleted, oldest first.
    """
    from pipelines.db import reading

    # The drill-downs' lookup (the same date), not the monitor's: that module imports
    # pandas (0.2-0.3 s of a nightly report that otherwise never needs it).
    from pipelines.surveillance.profile import load_profile
    from pipelines.surveillance.runs import is_look_ahead, newest_procedure_date

    with reading(settings.db_url) as conn:
        newest = newest_procedure_date(conn)
    as_of = as_of or newest
    root = Path(settings.report_dir)
    folder = as_of.isoformat() if as_of else EMPTY
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    build = root / BUILDS / f"{folder}-{stamp}-{os.getpid()}"
    write_report(settings, build, as_of)
    previous = os.readlink(root / folder) if (root / folder).is_symlink() else None
    _point(root / folder, f"{BUILDS}/{build.name}")
    if previous and (root / previous).is_dir():
        os.utime(root / previous)  # unlinked now: _prune keeps it ten minutes for readers
    latest = root / LATEST
    current = _dated(os.readlink(latest)) if latest.is_symlink() else None
    # A look-ahead report (runs.look_ahead_grace) is published under its date
    # but never becomes ``latest``, and a ``latest`` left on one yields to the next report
    # on the data: the monitor keeps its current picture the same way (engine._persist).
    profile = load_profile(settings.profile_path)
    look_ahead = as_of is not None and is_look_ahead(profile, as_of, newest)
    current_day = (min(current, newest) if current is not None
                   and is_look_ahead(profile, current, newest) else current)
    if as_of is not None and not look_ahead and (current_day is None or as_of >= current_day):
        _point(latest, folder)
    elif as_of is None and not latest.is_symlink():
        _point(latest, folder)
    _prune(root, settings.report_keep)
    return root / folder / "index.html"


def _prune(root: Path, keep: int) -> None:
    """Delete dated reports beyond the newest ``keep`` and builds no link points to.

    Builds that lost their link less than ten minutes ago are kept for readers still
    paging through them, builds still being written (staging folders) for a day.
    """
    latest = root / LATEST
    protected = os.readlink(latest) if latest.is_symlink() else None
    dated = sorted((p for p in root.iterdir() if p.is_symlink() and _dated(p.name)),
                   key=lambda p: p.name, reverse=True)
    for link in dated[keep:]:
        if link.name != protected:
            link.unlink()
    linked = {Path(os.readlink(p)).name for p in root.iterdir() if p.is_symlink()}
    cutoff = time.time() - 600
    for build in (root / BUILDS).iterdir():
        # ".<build>-…" is a build still being written (write_report's staging folder): its
        # own mtime does not move while its pages go into sites/, so it gets a day
        if build.name not in linked and build.stat().st_mtime < (
                cutoff - 86_400 if build.name.startswith(".") else cutoff):
            shutil.rmtree(build, ignore_errors=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write the HTML evidence report",
        description="Write the static HTML report (overview, funnel plots, a page per site, "
        "methods) into a directory; it works offline and opens from disk.",
    )
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", type=output_directory,
                        help="write into this directory only (default: publish into the "
                        "report dir as <as-of>/ and move the latest link if newest)")
    parser.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from pipelines.cli import parse_as_of
    from pipelines.db import require_warehouse

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    as_of = parse_as_of(args.as_of)
    if args.out:
        prepare_output_directory(args.out)
        path = write_report(settings, args.out, as_of)
    else:
        path = publish_report(settings, as_of)
    print(path)
    return 0
