"""What one report renders, read once from the stored monitor run and the warehouse."""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Mapping
from datetime import date
from typing import Any

import sqlalchemy as sa

from pipelines import evidence
from pipelines.settings import Settings
from pipelines.surveillance import levels

log = logging.getLogger(__name__)

# -- data ------------------------------------------------------------------------------

def data_quality(settings: Settings, *, conn: sa.Connection | None = None) -> dict[str, Any]:
    """Return file-ledger counts by kind and status, and quarantined rows by reason
    (``conn``: an open warehouse connection to read on; default: a new one)."""
    from pipelines.schema import file_ledger, quarantine

    with evidence._connection(settings, conn) as conn:
        files = conn.execute(
            sa.select(file_ledger.c.kind, file_ledger.c.status, sa.func.count(),
                      sa.func.sum(file_ledger.c.rows_read),
                      sa.func.sum(file_ledger.c.rows_quarantined))
            .group_by(file_ledger.c.kind, file_ledger.c.status)
            .order_by(file_ledger.c.kind, file_ledger.c.status)
        ).all()
        reasons_rows = conn.execute(
            sa.select(quarantine.c.kind, quarantine.c.reasons, sa.func.count())
            .group_by(quarantine.c.kind, quarantine.c.reasons)
        ).all()
        rejected = conn.execute(
            sa.select(file_ledger.c.file_name, file_ledger.c.reason,
                      file_ledger.c.processed_at)
            .where(file_ledger.c.status == "rejected")
            .order_by(file_ledger.c.processed_at.desc()).limit(20)
        ).all()
    by_reason: dict[tuple[str, str], int] = {}
    for kind, reasons, count in reasons_rows:
        try:
            codes = json.loads(reasons) if reasons else []
        except ValueError:
            codes = [str(reasons)]
        for code in codes or ["unknown"]:
            by_reason[(kind, str(code))] = by_reason.get((kind, str(code)), 0) + int(count)
    return {
        "files": [{"kind": k or "-", "status": s, "files": int(c), "rows_read": int(r or 0),
                   "rows_quarantined": int(q or 0)} for k, s, c, r, q in files],
        "quarantine": [{"kind": k, "reason": r, "rows": c}
                       for (k, r), c in sorted(by_reason.items())],
        "rejected": [{"file": f, "reason": r, "at": evidence.iso(at)}
                     for f, r, at in rejected],
    }


def _newest_procedure_date(settings: Settings) -> date | None:
    """Return the newest procedure date (the date a report defaults to), or None."""
    from pipelines.db import reading
    from pipelines.schema import procedure

    with reading(settings.db_url) as conn:
        value = conn.execute(sa.select(sa.func.max(procedure.c.procedure_date))).scalar()
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _recent_complications(settings: Settings, as_of: date | None
                          ) -> tuple[date | None, dict[str, list[dict[str, Any]]]]:
    """Return the date read (``as_of``, else the newest procedure date) and each site's
    recent complications as of it."""
    day = as_of or _newest_procedure_date(settings)
    return day, evidence.recent_complications_by_site(settings, day)


def _side_reads(settings: Settings, profile, as_of: date | None) -> dict[str, Any]:
    """Return what a report reads beside the stored run, for the run it will read.

    The date is the one :func:`pipelines.surveillance.runs.read_or_compute` reads the run
    for (``as_of``, else the newest procedure date, found the same way) and the run key
    that of the run stored for it (None when none is: the report then computes one and
    reads these again). Runs in :class:`_ForkedReads`' process while the report's own
    process reads the run.
    """
    from pipelines.db import reading
    from pipelines.surveillance.runs import find_run, newest_procedure_date

    # One connection for every read: each new one was an engine, a schema check and a
    # server process (four of them, 15-40 ms each, in this process's critical path).
    with reading(settings.db_url) as conn:
        day = as_of or newest_procedure_date(conn)
        row = find_run(conn, profile, day) if day else None
        run_key = row["run_key"] if row is not None else None
        return {"day": day, "run_key": run_key,
                **_reads_for_run(settings, profile, day, run_key, conn=conn)}


def _reads_for_run(settings: Settings, profile, day: date | None,
                   run_key: str | None, *, conn: sa.Connection | None = None
                   ) -> dict[str, Any]:
    """Return the recent complications, data quality and monthly figures of one run.

    One definition for both ways of reading them: in :class:`_ForkedReads`' process, and
    here again when that process failed or read for another run. ``conn``: an open
    warehouse connection to read on (default: a new one for each read).
    """
    return {
        "complications": evidence.recent_complications_by_site(settings, day, conn=conn),
        "quality": data_quality(settings, conn=conn),
        "months": (evidence.monthly_figures(settings, run_key, profile.name, conn=conn)
                   if day and run_key else None),
    }


def _may_fork() -> bool:
    """True when a child forked now may open database connections of its own.

    Only with no other thread running: a child inherits every lock as it was at the fork,
    and one held by another thread (in the driver, DNS resolution, SSL) would never be
    released there, so the child, and the report waiting for it, would hang. Inside a task
    runner that keeps threads of its own, the report reads in threads instead.
    """
    import threading

    return hasattr(os, "fork") and threading.active_count() == 1


COMPLICATION_FIELDS = ("event_date", "event_type", "severity", "symptomatic",
                       "vertebral_level")


class _ColumnRuns(Mapping):
    """A read-only ``{key: value}`` whose values are runs of rows kept as columns, each
    value built when it is looked up (:func:`_for_the_pipe`).

    The forked reads hand over about 160,000 monthly rows and 20,000 complications of a
    thousand-site report: as columns they unpickle in a tenth of the time of 5,000 month
    series and 20,000 dicts, and that time was spent in the report's own process before
    any page could be drawn. A value is built only when a page asks for it (once per site
    and metric), which happens in the drawing processes, in parallel.
    """

    def __init__(self, packed: tuple[list, list[int], list[tuple]], build) -> None:
        self._keys, self._bounds, self._columns = packed
        self._index = {key: i for i, key in enumerate(self._keys)}
        self._build = build

    def __getitem__(self, key):
        i = self._index[key]
        a, b = self._bounds[i], self._bounds[i + 1]
        return self._build([column[a:b] for column in self._columns])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _pack(runs: dict[Any, Any], columns_of) -> tuple[list, list[int], list[tuple]]:
    """Return ``runs`` as (keys, bounds, columns): value ``i`` is rows ``bounds[i]`` to
    ``bounds[i + 1]`` of every column. Equal texts become one object, which pickle then
    writes once (months and complication types repeat thousands of times)."""
    keys, bounds, columns, same = list(runs), [0], None, {}
    for value in runs.values():
        value_columns = columns_of(value)
        if columns is None:
            columns = [[] for _ in value_columns]
        for column, cells in zip(columns, value_columns, strict=True):
            column.extend(same.setdefault(c, c) if type(c) is str else c for c in cells)
        bounds.append(len(columns[0]) if columns else 0)
    return keys, bounds, [tuple(column) for column in columns or []]


def _months_columns(months: evidence.MonthSeries) -> tuple:
    return (months.month, months.units, months.events, months.expected,
            months.months_before_as_of)


def _months_of(columns: list[tuple]) -> evidence.MonthSeries:
    return evidence.MonthSeries(*columns)


def _complication_columns(rows: list[dict[str, Any]]) -> list[tuple]:
    return [tuple(row[name] for row in rows) for name in COMPLICATION_FIELDS]


def _complications_of(columns: list[tuple]) -> list[dict[str, Any]]:
    return [dict(zip(COMPLICATION_FIELDS, row, strict=True))
            for row in zip(*columns, strict=True)]


def recent_oe_of(months: Mapping[tuple[str, str], evidence.MonthSeries] | None,
                 profile=None, day: date | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Return the recent observed/expected figures of every site and metric: the index
    months of :func:`levels.recent_months_before` (for new fractures the latest 12 months
    of mature units, not the empty last 12), the months the level's ``recent`` sums."""
    if not months:
        return {}
    if day is None or profile is None:
        return evidence.recent_observed_expected(months)
    firsts = {m.id: levels.recent_months_before(m.window_days, day)[0]
              for m in profile.metrics}
    moved = {}
    for key, series in months.items():
        first = firsts.get(key[1], 0)
        if first:  # count the recent months from the newest one; newer ones fall outside
            series = evidence.MonthSeries(
                series.month, series.units, series.events, series.expected,
                tuple(b - first if b >= first else 1_000_000
                      for b in series.months_before_as_of))
        moved[key] = series
    return evidence.recent_observed_expected(moved, levels.RECENT_MONTHS)


def _for_the_pipe(reads: dict[str, Any], profile=None) -> dict[str, Any]:
    """Return :func:`_side_reads`' answer as the forked process sends it: the monthly
    figures and complications as columns (:class:`_ColumnRuns`), and the recent
    observed/expected figures computed there from the months (their exact intervals are
    the reading process's work, not the report's)."""
    months = reads["months"]
    out = {**reads, "recent_oe": recent_oe_of(months, profile, reads.get("day")),
           "complications": _pack(reads["complications"], _complication_columns)}
    out["months"] = None if months is None else _pack(months, _months_columns)
    return out


def _from_the_pipe(reads: dict[str, Any]) -> dict[str, Any]:
    """Return the reads :func:`_for_the_pipe` packed, as mappings like the ones read here."""
    months = reads["months"]
    return {**reads,
            "complications": _ColumnRuns(reads["complications"], _complications_of),
            "months": None if months is None else _ColumnRuns(months, _months_of)}


class _ForkedReads:
    """:func:`_side_reads` in a forked process, overlapping the stored run's read here.

    Reading the run is mostly decoding it, which holds this process's GIL, while the other
    reads (the monthly figures above all: 200,000 rows for 1,000 sites) are a second
    core's work; their result comes back pickled through a pipe (a tenth of the time of
    reading them). The child opens its own connections (every read opens a new engine)
    and leaves through ``os._exit``; it is forked before this process starts any thread.
    Any failure there is only logged: the caller then reads everything itself, so errors
    surface as they always did.
    """

    def __init__(self, settings: Settings, profile, as_of: date | None) -> None:
        """Fork the reading process; raise OSError (nothing left open) if it cannot be."""
        import pickle

        read_end, write_end = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if self.pid == 0:  # the child
            os.close(read_end)
            code = 0
            try:
                answer: tuple[str, Any] = ("ok", _for_the_pipe(
                    _side_reads(settings, profile, as_of), profile))
            except BaseException:  # noqa: BLE001 - the parent reads again and raises
                answer, code = ("error", traceback.format_exc(limit=5)), 1
            try:
                with os.fdopen(write_end, "wb") as pipe:
                    pickle.dump(answer, pipe, protocol=pickle.HIGHEST_PROTOCOL)
            finally:
                os._exit(code)
        os.close(write_end)
        self.read_end = read_end

    def result(self) -> dict[str, Any] | None:
        """Return the child's reads (None if it failed) and reap it; call exactly once."""
        import pickle

        try:
            with os.fdopen(self.read_end, "rb") as pipe:
                status, payload = pickle.load(pipe)
        except (EOFError, OSError, pickle.UnpicklingError):
            status, payload = "error", "the reading process died without an answer"
        finally:
            os.waitpid(self.pid, 0)
        if status != "ok":
            log.warning("report: reading beside the run failed, reading again: %s", payload)
            return None
        return _from_the_pipe(payload)


class ReportData:
    """Everything one report renders, gathered once."""

    def __init__(self, settings: Settings, as_of: date | None, *,
                 parallel_reads: bool = False) -> None:
        """Read the stored run and everything else a report shows.

        ``parallel_reads``: read all but the run in a forked process while this one reads
        the run (:class:`_ForkedReads`; for callers that may fork, as
        :func:`pipelines.report.publish.write_report` does). The data are the same.
        """
        from pipelines.surveillance.profile import load_profile

        self.profile = load_profile(settings.profile_path)
        # the recent observed/expected figures: from the forked reads when those are used
        self.recent_oe: dict[tuple[str, str], dict[str, Any]] | None = None
        if parallel_reads and _may_fork():
            self._read_overlapped(settings, as_of)
        else:
            self._read(settings, as_of)
        self.labels = {m.id: m.label for m in self.profile.metrics}
        self.metric_ids = [m.id for m in self.profile.metrics]
        self.metrics = {m.id: m for m in self.profile.metrics}
        self.rows = {(m["site_id"], m["metric"]): m for m in self.result.site_metrics}
        self.levels = {key: row.get("level") or {} for key, row in self.rows.items()}
        self.signals_by_key = {s["signal_key"]: s for s in self.result.signals}
        self.funnel_class = self._funnel_classes()
        self.evidence = evidence.Evidence(self.result, self.profile, self.facts,
                                          self._complications)
        self.sites = self.evidence.sites
        if self.recent_oe is None:
            self.recent_oe = recent_oe_of(self.months, self.profile, self.as_of)
        # CSV files written beside the pages: {relative path: text}
        self.files: dict[str, str] = {}
        # the funnels site pages draw, and their shared curves and clouds as files
        # ({name: SVG}): funnels.build_funnel_templates, before the site pages
        self.funnel_templates: dict[tuple[str, str], Any] = {}
        self.funnel_layers: dict[str, str] = {}
        self._cusum_series: dict[Any, Any] = {}  # by CUSUM key, ("tte", metric)
        self._batches: dict[Any, Any] = {}  # chart_batch

    def _read(self, settings: Settings, as_of: date | None) -> None:
        """Read the run here and the rest in threads (``result``, ``as_of``, ``quality``,
        ``months``, ``facts`` and the recent complications)."""
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.surveillance.runs import read_or_compute

        # Recent complications (a window query over each site's newest ones) are read in a
        # thread while this thread decodes the stored run, and the site facts (the run's
        # stored deliveries and case mix, plus alerts and counts) while it reads the monthly
        # figures: their time is the database's, which runs with the GIL released (SQLite
        # and psycopg), and they return few rows. The monthly figures return many rows, and
        # fetching those in a thread would hand the GIL back and forth per row (slower than
        # reading them here). Complications start at once for the date the run will have
        # (as_of, else the newest procedure, found in that thread too: read_or_compute
        # finds it again, but the main thread need not wait twice) and are read again in
        # the rare case the run's date differs (an empty warehouse).
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="report-read") as pool:
            complications = pool.submit(_recent_complications, settings, as_of)
            self.result = read_or_compute(settings, self.profile, as_of)
            self.as_of = self.result.as_of
            facts = pool.submit(evidence.read_site_facts, settings, self.as_of,
                                stored=self.result.procedure_facts)
            self.quality = data_quality(settings)
            # Monthly figures the monitor stored with this run: sparklines, VLAD, recent O/E.
            self.months = (evidence.monthly_figures(settings, self.result.run_key,
                                                    self.profile.name) if self.as_of else {})
            if complications.result()[0] != self.as_of:
                complications = pool.submit(_recent_complications, settings, self.as_of)
            self.facts = facts.result()
            self._complications = complications.result()[1]

    def _read_overlapped(self, settings: Settings, as_of: date | None) -> None:
        """:meth:`_read`, with everything but the run read in a forked process meanwhile.

        The other process's reads are used only if they were made for this very run (its
        key and date); otherwise (no run was stored, so one was computed; a run stored in
        between; a failure) they are read again here, as :meth:`_read` does.
        """
        # The report needs scipy.special here anyway (the funnels, before the drawing
        # processes fork); imported before the fork, the reading process has it too, for
        # the recent observed/expected intervals, instead of importing it a second time.
        import scipy.special  # noqa: F401

        from pipelines.db import load_driver
        from pipelines.surveillance.runs import read_or_compute

        # Likewise the warehouse driver, which both processes need at once.
        load_driver(settings.db_url)

        try:
            side = _ForkedReads(settings, self.profile, as_of)
        except OSError as exc:  # no process to spare (a limit on processes, memory)
            log.warning("report: reading in one process (%s)", exc)
            self._read(settings, as_of)
            return
        try:
            self.result = read_or_compute(settings, self.profile, as_of)
        finally:
            reads = side.result()
        self.as_of = self.result.as_of
        if (reads is None or reads["run_key"] != self.result.run_key
                or reads["day"] != self.as_of):
            reads = _reads_for_run(settings, self.profile, self.as_of, self.result.run_key)
        else:
            self.recent_oe = reads["recent_oe"]
        self.quality, self.months = reads["quality"], reads["months"] or {}
        self._complications = reads["complications"]
        self.facts = evidence.read_site_facts(settings, self.as_of,
                                              stored=self.result.procedure_facts)

    def _funnel_classes(self) -> dict[tuple[str, str, str], str]:
        """Return each site's class on each funnel plot: ``significant`` (outside the
        decision limits and significant after the Benjamini-Hochberg correction, i.e. the
        funnel method signals now), ``outside`` (outside but not significant), ``within``
        or ``no data``; keyed by ``(metric, window, site)``."""
        from pipelines.surveillance.levels import detail_of

        method_of = {"cumulative": "funnel_cumulative", "rolling": "funnel_12m"}
        ongoing = {(s["site_id"], s["metric"], s["method"]) for s in self.result.signals
                   if s["method"] in method_of.values() and detail_of(s).get("ongoing")}
        out = {}
        for (site, metric), row in self.rows.items():
            for window, entry in (row.get("funnel") or {}).items():
                position = (entry or {}).get("position", "no data")
                if position in ("above", "below"):
                    significant = (site, metric, method_of.get(window)) in ongoing
                    out[(metric, window, site)] = "significant" if significant else "outside"
                else:
                    out[(metric, window, site)] = position
        return out

    def site(self, site_id: str) -> dict[str, Any]:
        return self.evidence.site_payload(site_id)

    def cusum_series(self, key: str):
        """Return the run's CUSUM chart ``key`` indexed by site (once per report)."""
        from pipelines.report.charts import CusumSeries

        series = self._cusum_series.get(key)
        if series is None:
            series = self._cusum_series[key] = CusumSeries(self.result.charts["cusum"][key])
        return series

    def tte_series(self, metric: str):
        """Return the run's time-to-event CUSUM of ``metric`` for every site (once per
        report)."""
        from pipelines.report.charts import TteSeries

        series = self._cusum_series.get(("tte", metric))
        if series is None:
            series = self._cusum_series[("tte", metric)] = TteSeries(
                self.result.charts["tte"][metric])
        return series


    def chart_batch(self, key: Any, make):
        """Return the charts of one kind made for every site at once (``make()``, once per
        process: the site pages' workers fork before their first chart)."""
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = make()
        return batch

    # -- read-side views shared by the overview and the site pages ---------------------

    def recent_label(self, metric: str, short: bool = False) -> str:
        """Return the span of a metric's recent figure in words: ``last 12 months``, or
        for a follow-up window ``procedures of 2022-12 to 2023-11, each followed for a
        year`` (``2022-12 to 2023-11`` when ``short``), as the e-mail words it."""
        m = self.metrics.get(metric)
        span = levels.recent_span(m.window_days if m else 0, self.as_of)
        if not span.get("index_from"):
            return f"last {span['months']} months"
        if short:
            return f"{span['index_from']} to {span['index_to']}"
        return levels.recent_words(span)

    def rate_view(self, site: str, metric: str) -> dict[str, Any] | None:
        """Return the rate a reader should see first: the recent months when the monitor
        stored them (a recent change shows there; :meth:`recent_label`), else all mature
        units."""
        recent = self.recent_oe.get((site, metric))
        if recent:
            return {"rate": recent["rate"], "n": recent["n"], "events": recent["observed"],
                    "ci_low": recent["rate_ci_low"], "ci_high": recent["rate_ci_high"],
                    "span": self.recent_label(metric)}
        row = self.rows.get((site, metric)) or {}
        if not row.get("n"):
            return None
        return {"rate": row.get("rate"), "n": row["n"], "events": row.get("events"),
                "ci_low": row.get("ci_low"), "ci_high": row.get("ci_high"),
                "span": "all mature units"}

    def marks(self, site: str, metric: str) -> list[tuple[str, str]]:
        """Return Making Data Count-style marks ``(letter, meaning)`` for one cell.

        Variation (from the graded level): ``H`` special cause, higher than expected
        (alarm or watch); ``L`` special cause, lower (under-reporting suspected); ``~``
        common cause only. Assurance against the top of the guidance range, from the exact
        95% CI of the rate shown: ``P`` the whole interval is at or below it (the site
        consistently meets the guidance), ``F`` the whole interval is above it
        (consistently fails), ``?`` the interval straddles it (hit and miss).
        """
        status = self.evidence.status.get((site, metric), {}).get("status")
        out = []
        if status in (evidence.STATUS_ALARM, evidence.STATUS_WATCH):
            out.append(("H", "special-cause variation: higher than expected"))
        elif status == evidence.STATUS_UNDER_REPORTING:
            out.append(("L", "special-cause variation: lower than the guidance range"))
        elif status == evidence.STATUS_IN_CONTROL:
            out.append(("~", "common-cause variation only"))
        high = self.metrics[metric].baseline.high
        view = self.rate_view(site, metric)
        if high is not None and view and view.get("ci_low") is not None:
            if view["ci_high"] <= high:
                out.append(("P", "consistently within the guidance range (assured)"))
            elif view["ci_low"] > high:
                out.append(("F", "consistently above the guidance range"))
            else:
                out.append(("?", "hit and miss against the guidance range"))
        return out
