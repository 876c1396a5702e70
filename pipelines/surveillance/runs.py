"""The stored monitor run: the one hand-off from computing to reading.

The monitor computes a run once and stores it, in the same transaction as its signals
(:func:`store_run`). The report, ``kyphowatch sites`` / ``site`` and the alert renderer read
that stored run (:func:`load_run`) instead of evaluating the network again, so they show
the numbers of one computation, identified by its ``run_key``, and a drill-down costs one
read instead of a full monitor.

A run is stored in parts (``monitor_run_part``): ``core`` holds the signals, the per-site
figures and levels, the summary, the models and the small chart data (funnels, p-charts);
``facts`` holds per-site deliveries (newest extract, last procedure date) and case mix, and
the network's case mix, aggregated once in SQL as of the run's date (:func:`procedure_facts`);
``site:<id>`` holds that site's chart series (CUSUM and time-to-event statistics), thinned
to at most :data:`MAX_POINTS_PER_SITE` points per chart; ``metrics:<id>`` holds a copy of
that site's figures and signals as they are in ``core`` (:func:`load_site`), so that
``kyphowatch site S012`` reads two small parts (``metrics:S012`` and ``facts``) instead of
decoding every site's figures. ``sites`` reads the status rows stored with the run in
``chart_status`` and ``facts`` (``core`` and ``facts`` for a run whose rows ``chart_status``
no longer holds, :func:`load_status`), the report ``core``, ``facts`` and the ``site:``
parts. Parts are zlib-compressed JSON: portable across SQLite and PostgreSQL and readable
without kyphowatch.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pipelines.schema import monitor_run, monitor_run_part

# numpy is imported inside the functions that build arrays: ``kyphowatch sites`` and ``site``
# read a run without its chart arrays (``load_run(..., charts=False)``) and so without numpy,
# a tenth of a second of their start-up.
if TYPE_CHECKING:
    import numpy as np

CORE = "core"
FACTS = "facts"
# One site's figures and signals: part f"{SITE_METRICS}{site_id}" (runs stored before it
# was added have none; their readers decode ``core``).
SITE_METRICS = "metrics:"
# Points kept per site and chart: every crossing, the last point, and an even spread.
MAX_POINTS_PER_SITE = 600
_SERIES_KEYS = ("group", "day", "statistic", "signal")


@dataclass
class MonitorResult:
    """Everything one monitor run derived; ``to_dict()`` is the JSON form."""

    run_key: str
    as_of: date | None
    profile_name: str
    profile_version: str
    data_fingerprint: str
    signals: list[dict[str, Any]] = field(default_factory=list)
    new_signal_keys: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    site_metrics: list[dict[str, Any]] = field(default_factory=list)
    # Mature units, events and expected events per site, metric and index month (the
    # ``site_month_metric`` table; not part of to_dict()).
    site_months: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # Chart series for the report (arrays; not part of to_dict()).
    charts: dict[str, Any] = field(default_factory=dict, repr=False)
    # Every alarm / watch / under-reporting episode (levels.level_episodes).
    level_episodes: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # Per-site deliveries and case mix as of the run (procedure_facts; None in runs
    # stored before the facts part existed, whose readers aggregate them again).
    procedure_facts: dict[str, Any] | None = field(default=None, repr=False)
    persisted: bool = False
    seconds: float = 0.0
    # Threshold designs read from the warehouse and computed by this run (threshold_store).
    thresholds: dict[str, int] = field(default_factory=dict, repr=False)
    # Seconds per step: read, compute, and when stored, store and beyond_site.
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    # The compute step's seconds by "metric:step" (:class:`engine._Computation` timings).
    compute_timings: dict[str, float] = field(default_factory=dict, repr=False)
    # Read side only: the run's status rows as the monitor stored them (:func:`load_status`;
    # None: derive them from ``site_metrics``).
    status_rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def active_signals(self) -> list[dict[str, Any]]:
        """Return the signals present in this run (all of ``signals``)."""
        return [s for s in self.signals if s.get("active", True)]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (dates as ISO strings, detail decoded)."""

        def clean(row: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for key, value in row.items():
                if isinstance(value, date):
                    out[key] = value.isoformat()
                elif key == "detail" and isinstance(value, str):
                    out[key] = json.loads(value)
                else:
                    out[key] = value
            return out

        return {
            "run_key": self.run_key,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "profile": {"name": self.profile_name, "version": self.profile_version},
            "data_fingerprint": self.data_fingerprint,
            "persisted": self.persisted,
            "signals": [clean(s) for s in self.signals],
            "new_signal_keys": list(self.new_signal_keys),
            "summary": self.summary,
            "models": self.models,
            "site_metrics": [clean(m) for m in self.site_metrics],
        }


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _encode(data: Any) -> bytes:
    return json.dumps(data, default=_json_default, separators=(",", ":")).encode("utf-8")


def _pack(data: Any) -> bytes:
    return zlib.compress(_encode(data), 6)


# Parts compressed ahead of the one being encoded: bounds the JSON texts alive at once.
_PACK_AHEAD = 8


def _pack_all(parts: Iterable[Any]) -> list[bytes]:
    """Return :func:`_pack` of each part, in order: the same bytes, in less time.

    zlib releases the GIL while it compresses, so a worker thread compresses one part
    while this thread encodes the next as JSON (which holds it): the two halves of the
    store's packing (about 0.5 s each for the site parts of a 1M-procedure run) overlap
    on a second core.
    """
    packed: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack") as pool:
        for data in parts:
            packed.append(pool.submit(zlib.compress, _encode(data), 6))
            if len(packed) > _PACK_AHEAD:
                packed[-_PACK_AHEAD - 1].result()
        return [future.result() for future in packed]


def _unpack(blob: bytes) -> Any:
    return json.loads(zlib.decompress(bytes(blob)).decode("utf-8"))


def _thin(n: int, signal: np.ndarray) -> np.ndarray:
    """Return the indices to keep of a series of ``n`` points (crossings always kept)."""
    import numpy as np

    if n <= MAX_POINTS_PER_SITE:
        return np.arange(n)
    keep = np.unique(np.r_[np.linspace(0, n - 1, MAX_POINTS_PER_SITE).astype(np.int64),
                           np.flatnonzero(signal), n - 1])
    return keep


def _site_series(result) -> dict[str, dict[str, Any]]:
    """Return each site's thinned chart series: {site: {chart label: {...}}}."""
    import numpy as np

    per_site: dict[str, dict[str, Any]] = {}
    for label, chart in (result.charts.get("cusum") or {}).items():
        group = np.asarray(chart["group"])
        sites = chart["sites"]
        starts = np.searchsorted(group, np.arange(len(sites)), side="left")
        ends = np.searchsorted(group, np.arange(len(sites)), side="right")
        h_sites = np.asarray(chart.get("h_sites", np.full(len(sites), chart["h"] or np.nan)),
                             dtype=float)
        for code, site in enumerate(sites):
            a, b = int(starts[code]), int(ends[code])
            if a == b:
                continue
            signal = np.asarray(chart["signal"][a:b], dtype=bool)
            keep = _thin(b - a, signal)
            per_site.setdefault(site, {})[f"cusum|{label}"] = {
                "day": np.asarray(chart["day"][a:b])[keep],
                "statistic": np.round(np.asarray(chart["statistic"][a:b])[keep], 5),
                "signal": signal[keep].astype(np.int8),
                "h": float(h_sites[code]) if np.isfinite(h_sites[code]) else None,
            }
    for metric_id, chart in (result.charts.get("tte") or {}).items():
        statistic = np.asarray(chart["statistic"])
        for code, site in enumerate(chart["sites"]):
            row = statistic[code]
            keep = _thin(len(row), np.zeros(len(row), bool))
            h = float(chart["h_sites"][code])
            per_site.setdefault(site, {})[f"tte|{metric_id}"] = {
                "day": chart["first_day"] + keep, "statistic": np.round(row[keep], 5),
                "h": h if np.isfinite(h) else None,
            }
    return per_site


def _core(result) -> dict[str, Any]:
    import numpy as np

    data = result.to_dict()
    charts = result.charts or {}
    data["charts"] = {
        "funnel": charts.get("funnel") or {},
        "pchart": charts.get("pchart") or {},
        "cusum_meta": {label: {k: v for k, v in chart.items()
                               if k not in (*_SERIES_KEYS, "h_sites")}
                       | {"h_sites": np.asarray(chart.get("h_sites", []), dtype=float)}
                       for label, chart in (charts.get("cusum") or {}).items()},
        "tte_meta": {m: {"sites": c["sites"], "hazard": c["hazard"],
                         "h_sites": np.asarray(c["h_sites"], dtype=float)}
                     for m, c in (charts.get("tte") or {}).items()},
    }
    data["level_episodes"] = result.level_episodes
    data["seconds"] = result.seconds
    return data


def _casemix_columns(procedure: sa.Table) -> list[sa.ColumnElement]:
    def share(condition) -> sa.ColumnElement:
        return sa.func.avg(sa.case((condition, 1.0), else_=0.0))

    return [
        sa.func.count().label("procedures"),
        sa.func.avg(procedure.c.age_years * 1.0).label("mean_age"),
        share(procedure.c.age_years >= 80).label("share_age_80_plus"),
        share(procedure.c.sex == "F").label("share_female"),
        share(procedure.c.indication == "malignancy").label("share_malignancy"),
        share(procedure.c.steroid_use).label("share_steroid_use"),
        share(procedure.c.anaesthesia == "general").label("share_general_anaesthesia"),
        sa.func.avg(procedure.c.levels_treated * 1.0).label("mean_levels"),
        share(procedure.c.levels_treated >= 3).label("share_3plus_levels"),
    ]


CASEMIX_FIELDS = ("procedures", "mean_age", "share_age_80_plus", "share_female",
                  "share_malignancy", "share_steroid_use", "share_general_anaesthesia",
                  "mean_levels", "share_3plus_levels")


def _rounded(value: Any) -> Any:
    if value is None or isinstance(value, int):
        return value
    return round(float(value), 6)


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else (
        None if value is None else str(value))


def procedure_facts(conn: sa.Connection, as_of: date | None) -> dict[str, Any]:
    """Aggregate per-site deliveries and case mix, and the network case mix, up to ``as_of``.

    Two passes over the procedure table (no patient or operator reference is read). The
    monitor runs this once and stores it with the run (part ``facts``), so a drill-down
    does not scan the warehouse again.
    """
    from pipelines.schema import procedure

    in_range = procedure.c.procedure_date <= as_of if as_of else sa.true()
    columns = _casemix_columns(procedure)
    deliveries: dict[str, dict[str, Any]] = {}
    casemix: dict[str, dict[str, Any]] = {}
    for row in conn.execute(
        sa.select(procedure.c.site_id, sa.func.max(procedure.c.extract_ts).label("extract"),
                  sa.func.max(procedure.c.procedure_date).label("last"), *columns)
        .where(in_range).group_by(procedure.c.site_id)
    ).mappings():
        deliveries[row["site_id"]] = {"newest_extract": _iso(row["extract"]),
                                      "last_procedure_date": _iso(row["last"])}
        casemix[row["site_id"]] = {f: _rounded(row[f]) for f in CASEMIX_FIELDS}
    network = conn.execute(sa.select(*columns).where(in_range)).mappings().first()
    return {"deliveries": deliveries, "casemix": casemix,
            "network_casemix": {f: _rounded(network[f]) for f in CASEMIX_FIELDS}}


class FactsInBackground:
    """:func:`procedure_facts` aggregated on a connection of its own, in a thread.

    The aggregation is a scan of the procedure table in the PostgreSQL server (about 0.8 s
    for 1M procedures), which the monitor waited for, idle; started before the store, it
    runs while the store encodes and writes the run. It reads committed procedures, as
    the monitor's own read did (the store's transaction writes none of them).
    """

    def __init__(self, engine: sa.Engine, as_of: date | None) -> None:
        self._facts: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(engine, as_of),
                                        name="procedure-facts", daemon=True)
        self._thread.start()

    def _run(self, engine: sa.Engine, as_of: date | None) -> None:
        try:
            with engine.connect() as conn:
                self._facts = procedure_facts(conn, as_of)
        except BaseException as error:  # raised in the caller by result()
            self._error = error

    def wait(self) -> None:
        """Wait for the aggregation to end (its error, if any, is kept for result())."""
        self._thread.join()

    def result(self) -> dict[str, Any]:
        """Wait for the facts and return them (or raise what the aggregation raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._facts


class SeriesInBackground:
    """The run's ``site:<id>`` parts (:func:`_site_parts`), thinned and packed in a thread.

    They depend on the run's charts only, which storing the run does not change, and are
    most of the store's packing (about 0.5 s of JSON for a 1M-procedure run): started
    before the store's transaction, they are packed while it waits for the server (the
    signals' upsert, the current picture), not after. The same bytes as in line.
    """

    def __init__(self, result) -> None:
        self._parts: list[tuple[str, bytes]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(result,),
                                        name="site-series", daemon=True)
        self._thread.start()

    def _run(self, result) -> None:
        try:
            self._parts = _site_parts(result)
        except BaseException as error:  # raised in the caller by result()
            self._error = error

    def wait(self) -> None:
        """Wait for the packing to end (its error, if any, is kept for result())."""
        self._thread.join()

    def result(self) -> list[tuple[str, bytes]]:
        """Wait for the parts and return them (or raise what the packing raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._parts


class CoreInBackground(SeriesInBackground):
    """The run's ``core`` part (:func:`_core`, packed) and its ``metrics:<id>`` parts, in a thread.

    Both hold the signals as the store's transaction sets them (first and last run seen),
    so they can start only once they are set; they are then packed (about 0.4 s of JSON
    and zlib for the core of a 1M-procedure run, 0.2 s for the sites' copies) while the
    transaction waits for the server (the signals' upsert, the current picture), not
    after. The same bytes as in line.
    """

    def _run(self, result) -> None:
        try:
            self._parts = (_pack(_core(result)), _site_metric_parts(result))
        except BaseException as error:  # raised in the caller by result()
            self._error = error

    def core(self) -> bytes:
        """Wait for the packing; return the ``core`` part."""
        return self.result()[0]

    def site_metrics(self) -> list[tuple[str, bytes]]:
        """Wait for the packing; return the ``metrics:<id>`` parts."""
        return self.result()[1]


def _site_metric_parts(result) -> list[tuple[str, bytes]]:
    """Return each site's ``metrics:<id>`` part: its figures and signals as in ``core``.

    Taken from the same ``to_dict()`` as the core part and packed the same way, so
    :func:`load_site` decodes exactly the rows that :func:`load_run` finds in ``core``.
    """
    data = result.to_dict()
    per_site: dict[str, dict[str, list]] = {}
    for row in data["site_metrics"]:
        per_site.setdefault(row["site_id"], {"site_metrics": [], "signals": []})[
            "site_metrics"].append(row)
    for row in data["signals"]:
        if row["site_id"] in per_site:
            per_site[row["site_id"]]["signals"].append(row)
    sites = sorted(per_site)
    return [(f"{SITE_METRICS}{site}", payload) for site, payload in
            zip(sites, _pack_all([per_site[site] for site in sites]), strict=True)]


def _site_parts(result) -> list[tuple[str, bytes]]:
    """Return each site's part name and packed chart series, in site order."""
    sites = sorted(_site_series(result).items())
    payloads = _pack_all([series for _, series in sites])
    return [(f"site:{site}", payload)
            for (site, _), payload in zip(sites, payloads, strict=True)]


def store_run(conn: sa.Connection, result,
              facts: Callable[[], dict[str, Any]] | None = None,
              site_parts: Callable[[], list[tuple[str, bytes]]] | None = None,
              core: Callable[[], bytes] | None = None,
              site_metrics: Callable[[], list[tuple[str, bytes]]] | None = None) -> None:
    """Store ``result`` under its run key (replacing an earlier copy of the same run).

    The per-site procedure facts are aggregated here, in the monitor's transaction, when
    the result does not carry them yet: by ``facts()`` when given (e.g.
    :meth:`FactsInBackground.result`, asked for once every other part is packed), else on
    ``conn``. The sites' chart parts are ``site_parts()`` when given (e.g.
    :meth:`SeriesInBackground.result`), else packed here with the core part; the core
    part is ``core()`` when given (e.g. :meth:`CoreInBackground.core`, started once the
    signals' fields are final), else packed here; the sites' ``metrics:<id>`` parts
    likewise ``site_metrics()`` (:meth:`CoreInBackground.site_metrics`), else packed here.
    """
    conn.execute(monitor_run_part.delete().where(monitor_run_part.c.run_key == result.run_key))
    if result.procedure_facts is None and facts is None:
        result.procedure_facts = procedure_facts(conn, result.as_of)
    if site_parts is None:
        sites = sorted(_site_series(result).items())
        payloads = _pack_all([_core(result), *(series for _, series in sites)])
        core = payloads[0]
        parts = [(f"site:{site}", payload)
                 for (site, _), payload in zip(sites, payloads[1:], strict=True)]
    else:
        core = _pack(_core(result)) if core is None else core()
        parts = site_parts()
    if result.procedure_facts is None:
        result.procedure_facts = facts()
    rows = [{"run_key": result.run_key, "part": CORE, "payload": core},
            {"run_key": result.run_key, "part": FACTS,
             "payload": _pack(result.procedure_facts)}]
    rows += [{"run_key": result.run_key, "part": part, "payload": payload}
             for part, payload in [*parts, *(site_metrics() if site_metrics is not None
                                             else _site_metric_parts(result))]]
    conn.execute(monitor_run_part.insert(), rows)


def _nan_floats(values: list) -> np.ndarray:
    import numpy as np

    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def find_run(conn: sa.Connection, profile, as_of: date | None = None) -> sa.RowMapping | None:
    """Return the newest stored run of this profile version (for ``as_of`` when given)."""
    query = (sa.select(monitor_run)
             .join(monitor_run_part, sa.and_(monitor_run_part.c.run_key == monitor_run.c.run_key,
                                             monitor_run_part.c.part == CORE))
             .where(monitor_run.c.profile_name == profile.name,
                    monitor_run.c.profile_version == profile.version))
    if as_of is not None:
        query = query.where(monitor_run.c.as_of == as_of)
    query = query.order_by(monitor_run.c.as_of.desc(), monitor_run.c.computed_at.desc())
    return conn.execute(query.limit(1)).mappings().first()


def load_run(conn: sa.Connection, profile, as_of: date | None = None, *,
             sites: list[str] | None = None, charts: bool = True):
    """Return the stored :class:`MonitorResult` for ``as_of`` (newest when None), or None.

    ``sites`` limits the chart series read to those sites (``None``: every site; ``[]``:
    none, for commands that show no chart). ``charts=False`` leaves ``charts`` empty (no
    funnel or p-chart arrays either) for readers that show no chart at all.
    """
    row = find_run(conn, profile, as_of)
    if row is None:
        return None
    run_key = row["run_key"]
    blob = conn.execute(sa.select(monitor_run_part.c.payload).where(
        monitor_run_part.c.run_key == run_key, monitor_run_part.c.part == CORE)).scalar()
    if blob is None:  # pruned since find_run saw it (retention.py): not stored any more
        return None
    core = _unpack(blob)
    wanted = [FACTS] + [f"site:{s}" for s in sites or []]
    query = sa.select(monitor_run_part.c.part, monitor_run_part.c.payload).where(
        monitor_run_part.c.run_key == run_key, monitor_run_part.c.part != CORE,
        ~_is_site_metrics(monitor_run_part.c.part))  # copies of what core holds
    if sites is not None:
        query = query.where(monitor_run_part.c.part.in_(wanted))
    parts = {part: _unpack(blob) for part, blob in conn.execute(query)}
    facts = parts.pop(FACTS, None)
    series = {part[len("site:"):]: data for part, data in parts.items()}
    for s in core["signals"]:
        s["episode_start"] = date.fromisoformat(s["episode_start"])
        s["signal_date"] = date.fromisoformat(s["signal_date"])
        # detail stays a dict here (the engine's own result holds JSON text; readers go
        # through levels.detail_of, which takes either): re-encoding it only for every
        # reader to decode it again cost a drill-down a fifth of its time.
    charts = _rebuild_charts(core["charts"], series) if charts else {}
    return MonitorResult(
        run_key=run_key, as_of=date.fromisoformat(core["as_of"]),
        profile_name=core["profile"]["name"], profile_version=core["profile"]["version"],
        data_fingerprint=core["data_fingerprint"], signals=core["signals"],
        new_signal_keys=[], summary=core["summary"], models=core["models"],
        site_metrics=core["site_metrics"], charts=charts,
        level_episodes=core.get("level_episodes") or [], procedure_facts=facts,
        persisted=True,
        seconds=core.get("seconds") or 0.0,
    )


def _is_site_metrics(part: sa.ColumnElement) -> sa.ColumnElement:
    """Return whether a part name is a ``metrics:<id>`` part.

    A prefix match (LIKE), not a range of names: under a PostgreSQL collation such as
    en_US, punctuation does not order as in ASCII. Every query using it also names the
    run, so the primary key's index narrows it to that run's parts first.
    """
    return part.startswith(SITE_METRICS, autoescape=True)


def load_site(conn: sa.Connection, profile, as_of: date, site: str):
    """Return the stored run for ``as_of`` with only ``site``'s figures and signals.

    What ``kyphowatch site`` needs of a run: that site's ``metrics:<id>`` part, the
    ``facts`` part and the run's identity, not the ``core`` part with every site's
    figures (decoding it was a third of the command). ``summary``, ``models``, ``charts``
    and ``level_episodes`` are left empty. A site without figures in the run gets none
    (an unknown site). Returns None when no run is stored for ``as_of``, or when the run
    was stored before the per-site parts were (read it with :func:`load_run`).
    """
    row = find_run(conn, profile, as_of)
    if row is None:
        return None
    run_key = row["run_key"]
    wanted = (sa.select(monitor_run_part.c.part, monitor_run_part.c.payload)
              .where(monitor_run_part.c.run_key == run_key,
                     monitor_run_part.c.part.in_([FACTS, f"{SITE_METRICS}{site}"])))
    parts = {part: _unpack(blob) for part, blob in conn.execute(wanted)}
    own = parts.get(f"{SITE_METRICS}{site}")
    if own is None and conn.execute(
            sa.select(monitor_run_part.c.part)
            .where(monitor_run_part.c.run_key == run_key,
                   _is_site_metrics(monitor_run_part.c.part)).limit(1)).first() is None:
        return None  # stored before the per-site parts
    own = own or {"site_metrics": [], "signals": []}
    for s in own["signals"]:
        s["episode_start"] = date.fromisoformat(s["episode_start"])
        s["signal_date"] = date.fromisoformat(s["signal_date"])
    return MonitorResult(
        run_key=run_key, as_of=_as_date(row["as_of"]), profile_name=row["profile_name"],
        profile_version=row["profile_version"], data_fingerprint=row["data_fingerprint"],
        signals=own["signals"], site_metrics=own["site_metrics"],
        procedure_facts=parts.get(FACTS), persisted=True)


# The columns of ``chart_status`` that hold levels.status_rows(..., detail=False).
_STATUS_FIELDS = ("site_id", "metric", "status", "reason", "n", "events", "rate", "ci_low",
                  "ci_high", "expected", "baseline", "cusum_chart", "cusum_value",
                  "cusum_threshold", "funnel_position", "signals_recent", "signals_total",
                  "level_since")


def load_status(conn: sa.Connection, profile, as_of: date):
    """Return the stored run for ``as_of`` with its status rows and without its figures.

    What ``kyphowatch sites`` needs of a run: one status row per site and metric, which
    the monitor stored with the run in ``chart_status`` (``levels.status_rows``), the
    ``facts`` part and the run's identity; not the ``core`` part, whose decoding and the
    rows derived from it were half of the command. ``status_rows`` holds the rows (as
    ``status_rows(..., detail=False)`` returns them); ``site_metrics`` holds only each
    metric's id and kind, from the profile version the run was computed with (the kind
    of every figure comes from there); signals, summary, models and charts are empty.
    Returns None when no run is stored for ``as_of``, or when ``chart_status`` holds
    another run's rows (a later run, or none yet): read it with :func:`load_run`.
    """
    from pipelines.schema import chart_status

    row = find_run(conn, profile, as_of)
    if row is None:
        return None
    stored = conn.execute(
        sa.select(chart_status.c.run_key, chart_status.c.profile_version,
                  *(chart_status.c[f] for f in _STATUS_FIELDS))
        .where(chart_status.c.profile_name == profile.name)).all()
    if not stored or any(r.run_key != row["run_key"]
                         or r.profile_version != row["profile_version"] for r in stored):
        return None
    facts = conn.execute(sa.select(monitor_run_part.c.payload).where(
        monitor_run_part.c.run_key == row["run_key"],
        monitor_run_part.c.part == FACTS)).scalar()
    return MonitorResult(
        run_key=row["run_key"], as_of=_as_date(row["as_of"]),
        profile_name=row["profile_name"], profile_version=row["profile_version"],
        data_fingerprint=row["data_fingerprint"],
        site_metrics=[{"metric": m.id, "kind": m.kind} for m in profile.metrics],
        procedure_facts=_unpack(facts) if facts is not None else None, persisted=True,
        status_rows=[dict(zip(_STATUS_FIELDS, r[2:], strict=True)) for r in stored])


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


# In a run's summary (``summary.metrics.<metric>``): the day since when the metric's
# time-to-event chart is charted (:func:`tte_charted_since`; engine ``_tte``).
TTE_CHARTED_SINCE = "tte_charted_since"


def tte_charted_since(conn: sa.Connection, profile_name: str, as_of: date,
                      metrics: Iterable[str]) -> dict[str, date]:
    """Return, per metric, the as_of of the earliest stored run that charted its tte chart.

    The time-to-event chart starts once the network has followed enough patients through
    the window (``survival.shape_estimable``), and then stays charted: a later run whose
    data fall back below the rule (a correction removing rows) keeps it, or the next sync
    would close an open alarm as cleared and the chart's return send it again. The
    decision is the stored runs': every run of the profile (any version: the alerts are
    keyed by its name) that charted the chart says so in its summary
    (:data:`TTE_CHARTED_SINCE`), and ``monitor_run`` rows are never pruned (retention.py).
    Only runs as of ``as_of`` or before count, so a backfill for an earlier date follows
    the rule as before. A metric no stored run charted is absent.
    """
    wanted = set(metrics)
    found: dict[str, date] = {}
    if not wanted:
        return found
    query = (sa.select(monitor_run.c.as_of, monitor_run.c.summary)
             .where(monitor_run.c.profile_name == profile_name,
                    monitor_run.c.as_of <= as_of,
                    monitor_run.c.summary.contains(f'"{TTE_CHARTED_SINCE}"', autoescape=True))
             .order_by(monitor_run.c.as_of, monitor_run.c.run_key))
    # Oldest first: the first run that names a metric is its earliest (each run records
    # the earliest day it knew of, never a later one), so the scan stops once each is found.
    with conn.execute(query.execution_options(yield_per=16)) as rows:
        for run_as_of, summary in rows:
            for metric, entry in (json.loads(summary or "{}").get("metrics") or {}).items():
                if (metric in wanted and isinstance(entry, dict)
                        and entry.get(TTE_CHARTED_SINCE)):
                    since = min(_as_date(run_as_of), _as_date(entry[TTE_CHARTED_SINCE]))
                    found[metric] = min(found.get(metric, since), since)
            if wanted <= found.keys():
                break
    return found


def _rebuild_charts(stored: dict[str, Any], series: dict[str, dict[str, Any]]) -> dict:
    """Return charts shaped as the engine made them, from the thinned per-site series."""
    import numpy as np

    charts: dict[str, Any] = {"funnel": {}, "pchart": {}, "cusum": {}, "tte": {}}
    for key, chart in stored["funnel"].items():
        charts["funnel"][key] = dict(chart, n=np.asarray(chart["n"]),
                                     events=np.asarray(chart["events"]))
    for key, chart in stored["pchart"].items():
        rebuilt = dict(chart, events=np.asarray(chart["events"]), n=np.asarray(chart["n"]))
        if chart.get("limit") is not None:
            rebuilt["limit"] = _nan_floats_2d(chart["limit"])
        charts["pchart"][key] = rebuilt
    for label, meta in stored["cusum_meta"].items():
        sites = meta["sites"]
        parts = {k: [] for k in _SERIES_KEYS}
        for code, site in enumerate(sites):
            piece = series.get(site, {}).get(f"cusum|{label}")
            if piece is None:
                continue
            parts["group"].append(np.full(len(piece["day"]), code, dtype=np.int64))
            parts["day"].append(np.asarray(piece["day"], dtype=np.int64))
            parts["statistic"].append(np.asarray(piece["statistic"], dtype=float))
            parts["signal"].append(np.asarray(piece["signal"], dtype=bool))
        chart = dict(meta, h_sites=_nan_floats(meta.get("h_sites") or []))
        for k in _SERIES_KEYS:
            chart[k] = np.concatenate(parts[k]) if parts[k] else np.zeros(
                0, dtype=bool if k == "signal" else float if k == "statistic" else np.int64)
        charts["cusum"][label] = chart
    for metric_id, meta in stored.get("tte_meta", {}).items():
        charts["tte"][metric_id] = {
            "sites": meta["sites"], "hazard": meta["hazard"],
            "h_sites": _nan_floats(meta["h_sites"]),
            "series": {site: series[site][f"tte|{metric_id}"] for site in meta["sites"]
                       if f"tte|{metric_id}" in series.get(site, {})},
        }
    return charts


def _nan_floats_2d(values: list) -> np.ndarray:
    import numpy as np

    return np.asarray([[np.nan if v is None else v for v in row] for row in values],
                      dtype=float)


def loaded_after_run(conn: sa.Connection, run_key: str) -> tuple[datetime, datetime] | None:
    """Return ``(stored, loaded)`` when an extract changed the warehouse after the run was stored.

    ``stored`` is the run's ``computed_at``, ``loaded`` the newest file that inserted or
    updated rows (``file_ledger``). A reader of the stored run (``sites``, ``site``) says so:
    the run does not include those rows until the monitor runs again. None when nothing
    was loaded since (or the run is not stored).
    """
    from pipelines.schema import file_ledger

    stored = conn.execute(sa.select(monitor_run.c.computed_at)
                          .where(monitor_run.c.run_key == run_key)).scalar()
    loaded = conn.execute(
        sa.select(sa.func.max(file_ledger.c.processed_at))
        .where(file_ledger.c.status == "loaded",
               file_ledger.c.rows_inserted + file_ledger.c.rows_updated > 0)).scalar()
    if stored is None or loaded is None:
        return None
    # SQLite hands timestamps back without their zone; they are stored in UTC
    stored, loaded = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (stored, loaded))
    return (stored, loaded) if loaded > stored else None


def newest_procedure_date(conn: sa.Connection) -> date | None:
    """Return the newest procedure date (the default as_of) without importing the engine.

    Read as the newest of each site's newest date, each found through the ``(site_id,
    procedure_date)`` index, the sites walked one index probe at a time (a recursive query:
    neither SQLite nor PostgreSQL skips through an index on its own). A plain ``max()``
    read every row of a 520k-procedure warehouse, 0.07-0.1 s of each drill-down; this is
    two probes per site.
    """
    from pipelines.schema import procedure

    sites = sa.select(sa.func.min(procedure.c.site_id).label("site_id")).cte(
        "sites", recursive=True)
    following = (sa.select(sa.func.min(procedure.c.site_id))
                 .where(procedure.c.site_id > sites.c.site_id).scalar_subquery())
    sites = sites.union_all(sa.select(following).where(sites.c.site_id.isnot(None)))
    site_newest = (sa.select(procedure.c.procedure_date)
                   .where(procedure.c.site_id == sites.c.site_id)
                   .order_by(procedure.c.procedure_date.desc()).limit(1).scalar_subquery())
    value = conn.execute(sa.select(sa.func.max(site_newest)).select_from(sites)).scalar()
    if value is None:
        return None
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def look_ahead_grace(profile) -> int:
    """Return the days after the newest procedure within which a run is still *current*.

    The shortest outcome window (30 days, cement leak, in ``htg108``; at most
    :data:`LOOK_AHEAD_MAX_GRACE`): a run dated a few days
    after the newest procedure (the day the extract was run, say) shows the data as they
    stand. A run dated later is a look-ahead, to let longer windows close: it is stored and
    readable, but it is not the current picture, does not move the report's ``latest`` and
    does not set the retention window, since on it holds run out with no new data.
    """
    shortest = min((m.window_days for m in profile.metrics if m.window_days), default=0)
    return min(shortest, LOOK_AHEAD_MAX_GRACE)


# The longest grace of any profile (a month), so that retention, which serves every
# profile, can measure its window without one.
LOOK_AHEAD_MAX_GRACE = 31


def is_look_ahead(profile, as_of: date, newest: date | None) -> bool:
    """Return whether a run as of ``as_of`` is a look-ahead (:func:`look_ahead_grace`)."""
    return newest is not None and as_of > newest + timedelta(days=look_ahead_grace(profile))


def check_as_of(profile, as_of: date | None, newest: date | None,
                conn: sa.Connection | None = None) -> None:
    """Raise InputRejected for an ``as_of`` the warehouse's data cannot answer.

    A date after the newest procedure lets outcome windows close (up to the longest one);
    beyond that no figure can change, so the date is a mistake (2030 for 2023, say). The
    monitor checks it too: charting years of empty days only to run out of memory. With
    ``conn``, a date before the first procedure is refused too: it stored an empty run and
    published an empty report (user audit, 2026-12-07).
    """
    from pipelines.errors import InputRejected

    horizon = max((m.window_days or 0 for m in profile.metrics), default=0)
    if as_of is None or newest is None:
        return
    if as_of > newest + timedelta(days=horizon):
        raise InputRejected(
            f"--as-of {as_of.isoformat()} is after the newest procedure in the warehouse "
            f"({newest.isoformat()}) plus the longest outcome window ({horizon} days); "
            "choose an earlier date")
    if conn is not None and as_of < newest:
        from pipelines.schema import procedure

        # EXISTS stops at the first procedure on or before the date; the earliest date is
        # looked up only to say it.
        if conn.execute(sa.select(sa.literal(1)).where(procedure.c.procedure_date <= as_of)
                        .limit(1)).first() is None:
            earliest = conn.execute(sa.select(sa.func.min(procedure.c.procedure_date))).scalar()
            raise InputRejected(
                f"--as-of {as_of.isoformat()} is before the first procedure in the warehouse "
                f"({str(earliest)[:10]}): there is nothing to show; choose a later date")


def read_stored(conn: sa.Connection, profile, as_of: date | None = None, *,
                sites: list[str] | None = None, charts: bool = True,
                site: str | None = None, status: bool = False):
    """Return ``(wanted, run)``: the date asked for (default: the newest procedure date,
    None for an empty warehouse) and the run stored for it, or None when none is stored.

    Raises InputRejected for an ``as_of`` after every outcome window of the newest
    procedure has closed. ``sites`` and ``charts`` as in :func:`load_run`; ``site``: only
    that site's figures and signals are needed (:func:`load_site`, when the run has its
    per-site parts; else the whole run is read as :func:`load_run` reads it); ``status``:
    only the status rows are needed (:func:`load_status`, when ``chart_status`` holds
    this run's rows; else as :func:`load_run`).
    """
    newest = newest_procedure_date(conn)
    check_as_of(profile, as_of, newest, conn)
    wanted = as_of or newest
    if not wanted:
        return wanted, None
    result = (load_site(conn, profile, wanted, site) if site is not None
              else load_status(conn, profile, wanted) if status else None)
    if result is None:
        result = load_run(conn, profile, wanted, sites=sites, charts=charts)
    return wanted, result


def read_or_compute(settings, profile, as_of: date | None = None, *,
                    sites: list[str] | None = None, charts: bool = True):
    """Return the stored run for ``as_of`` (default: the newest procedure date).

    When no run is stored for that date and profile version (a past ``--as-of``, or data
    loaded but not yet monitored) the monitor computes and stores one first, so every
    reader after it reads the same run. ``sites`` and ``charts`` as in :func:`load_run`.
    A caller checks its own arguments before (an unknown site, a metric: the drill-downs'
    ``_evidence``), since a compute cannot be taken back; the ``--as-of`` is checked here,
    and a database without the kyphowatch schema is refused (exit 3) by ``reading``, both
    before anything is computed.
    """
    from pipelines.db import reading

    with reading(settings.db_url) as conn:
        wanted, result = read_stored(conn, profile, as_of, sites=sites, charts=charts)
    if result is not None:
        return result
    return compute_and_read(settings, profile, wanted, sites=sites, charts=charts)


def compute_and_read(settings, profile, wanted: date | None, *,
                     sites: list[str] | None = None, charts: bool = True):
    """Run and store the monitor for ``wanted``, then return the run as stored."""
    from pipelines.db import reading

    # The compute side, imported only when there is nothing stored to read.
    from pipelines.surveillance.engine import run_monitor

    computed = run_monitor(settings, wanted)
    if not computed.persisted:
        return computed  # an empty warehouse: nothing to store or read back
    # Read back what was stored, so every reader sees the same shapes and numbers.
    with reading(settings.db_url) as conn:
        return load_run(conn, profile, computed.as_of, sites=sites, charts=charts) or computed
