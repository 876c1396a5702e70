"""Rendering, writing and publishing a report directory; the ``report`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

from pipelines.errors import ExternalSystemError
from pipelines.report.beyond import overview_section, read_beyond, render_devices
from pipelines.report.common import (
    SITE_RE,
    _page,
)
from pipelines.report.data import ReportData
from pipelines.report.funnels import build_funnel_templates, funnels_page
from pipelines.report.methods import methods_page
from pipelines.report.overview import index_page
from pipelines.report.site import site_page
from pipelines.settings import Settings, load_settings

log = logging.getLogger(__name__)


def render_report(settings: Settings, as_of: date | None = None) -> dict[str, str]:
    """Return the report as ``{relative path: text}`` for ``as_of`` (default: newest data)."""
    data = ReportData(settings, as_of)
    if data.as_of is None:
        empty = _page("kyphowatch surveillance report",
                      "<p>The warehouse holds no procedures yet: nothing to report.</p>")
        return {"index.html": empty, "report.json": json.dumps({"as_of": None, "sites": []})}
    # Products and cement lots are network-wide evidence: in the report. Operator pages are
    # confidential to each site's lead and stay out (pipelines/report/beyond.py).
    stored = read_beyond(settings, data.profile.name, operators=False)
    rare = {m.id for m in data.profile.metrics if m.alarm is not None
            and m.alarm.method == "rare"}
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
    for site in data.sites:
        # Site ids become file names and links; the contract guarantees their form, and a
        # report must never write outside its folder if a warehouse was filled some other way.
        if not SITE_RE.match(site["site_id"]):
            raise ExternalSystemError(f"warehouse holds a malformed site id "
                                      f"{site['site_id']!r}; not writing its page")
    build_funnel_templates(data)
    for site in data.sites:
        pages[f"sites/{site['site_id']}.html"] = site_page(data, site["site_id"])
    pages.update(data.files)  # the data behind every chart, as CSV beside its page
    return pages


def write_report(settings: Settings, out_dir: Path | None = None,
                 as_of: date | None = None) -> Path:
    """Write the report into ``out_dir`` (default: the report dir) and return its index.

    Pages are written to a temporary directory beside ``out_dir`` and moved in one by one
    with atomic renames. When ``out_dir`` already held a kyphowatch report (its
    ``report.json``), site pages of sites no longer in the data are removed; other files
    are never touched.
    """
    out_dir = Path(out_dir or settings.report_dir)
    pages = render_report(settings, as_of)
    ours = (out_dir / "report.json").exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sites").mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        for relative, text in pages.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        for relative in pages:
            os.replace(staging / relative, out_dir / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if ours:
        for stale in [*(out_dir / "sites").glob("*.html"), *(out_dir / "sites").glob("*.csv"),
                      *out_dir.glob("funnel-*.csv"), *out_dir.glob("devices-*.csv")]:
            if stale.relative_to(out_dir).as_posix() not in pages:
                stale.unlink()
    log.info("report: %d pages written to %s", len(pages), out_dir)
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
    from pipelines.surveillance.outcomes import latest_procedure_date

    if as_of is None:
        with reading(settings.db_url) as conn:
            as_of = latest_procedure_date(conn)
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
    if as_of is not None and (current is None or as_of >= current):
        _point(latest, folder)
    elif as_of is None and not latest.is_symlink():
        _point(latest, folder)
    _prune(root, settings.report_keep)
    return root / folder / "index.html"


def _prune(root: Path, keep: int) -> None:
    """Delete dated reports beyond the newest ``keep`` and builds no link points to.

    Builds that lost their link less than ten minutes ago are kept for readers still
    paging through them.
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
        if build.name not in linked and build.stat().st_mtime < cutoff:
            shutil.rmtree(build, ignore_errors=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write the HTML evidence report",
        description="Write the static HTML report (overview, funnel plots, a page per site, "
        "methods) into a directory; it works offline and opens from disk.",
    )
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", type=Path,
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
        path = write_report(settings, args.out, as_of)
    else:
        path = publish_report(settings, as_of)
    print(path)
    return 0
