"""Run the operator and device charts for one monitor run and store them (schema version 8).

Called by :func:`pipelines.surveillance.engine.evaluate` on the same snapshot: computed right
after the read (:func:`prepare_beyond_site`), stored after the site charts are stored
(:func:`run_beyond_site`). The chart tables (``operator_chart``, ``device_product_chart``,
``device_lot_test``) hold the newest run per profile: a backfill for an earlier date leaves
them alone, like the site's current picture.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipelines import schema
from pipelines.reference import reference_for
from pipelines.surveillance import threshold_store
from pipelines.surveillance.beyond import BeyondSite, parse_beyond_site
from pipelines.surveillance.devices import (
    LOT_KEY_SEPARATOR,
    calibration_rate,
    lot_tests,
    product_charts,
)
from pipelines.surveillance.operators import operator_charts, operator_rare_tests
from pipelines.surveillance.outcomes import (
    COVARIATES,
    OUTCOME_COLUMNS,
    Snapshot,
    copy_columns,
    derive_outcomes,
    release_memory,
    streams_copy,
)
from pipelines.surveillance.profile import Profile
from pipelines.surveillance.risk_model import (
    design_day,
    fit_risk_model,
    fitted_risk_model,
    known_before_quarter,
    shared_training_digest,
)

log = logging.getLogger(__name__)

EXTRA_COLUMNS = ("operator_hash", "balloon_product", "cement_product", "cement_lot")


def snapshot_extras(profile: Profile) -> tuple[str, ...]:
    """Return the extra columns a monitor run should read with its snapshot (none if unused)."""
    design = parse_beyond_site(profile)
    return () if design.operators is None and design.devices is None else EXTRA_COLUMNS


def _named(values: pd.Categorical) -> pd.Categorical:
    """Return streamed categories without '' and sorted by name."""
    # CSV cannot tell NULL from '' apart; neither names an operator or a product.
    if "" in values.categories:
        values = values.remove_categories([""])
    # sorted, so that charts grouped by operator or product come in name order
    return values.reorder_categories(sorted(values.categories))


def _extras(conn: sa.Connection, as_of: date) -> pd.DataFrame:

    procedure = schema.procedure
    statement = (sa.select(procedure.c.procedure_id,
                           *(procedure.c[name] for name in EXTRA_COLUMNS))
                 .where(procedure.c.procedure_date <= as_of))
    if streams_copy(conn):
        # Streamed as categoricals: a few operators and products, not a string per row.
        # CSV cannot tell NULL from '' apart; neither names an operator or a product.
        # procedure_id stays in Arrow's buffers, not a Python string (some 60 bytes) per
        # procedure; _ExtraRows matches the ids in Arrow too.
        columns = copy_columns(conn, statement, {"procedure_id": "string",
                                                 **dict.fromkeys(EXTRA_COLUMNS, "category")})
        for name in EXTRA_COLUMNS:
            columns[name] = _named(columns[name])
        ids = pd.Index(columns.pop("procedure_id"), name="procedure_id")
        extras = pd.DataFrame(columns, index=ids)
        del columns, ids
        # The read's batches are freed: the units and risk models start from what is alive.
        release_memory()
        return extras
    rows = conn.execute(statement).all()
    frame = pd.DataFrame(rows, columns=["procedure_id", *EXTRA_COLUMNS], dtype=object)
    return frame.set_index("procedure_id")


def _failures(conn: sa.Connection, as_of: date, event_types: tuple[str, ...]) -> pd.DataFrame:
    complication, procedure = schema.complication, schema.procedure
    rows = conn.execute(
        sa.select(procedure.c.balloon_product, procedure.c.cement_product)
        .select_from(complication.join(
            procedure, procedure.c.procedure_id == complication.c.procedure_id))
        .where(complication.c.event_date <= as_of, complication.c.event_type.in_(event_types))
    ).all()
    return pd.DataFrame(rows, columns=["balloon_product", "cement_product"], dtype=object)


def _arrow_ids(values: Any) -> Any:
    """Return ids (pandas' Arrow ``str`` array, or any array of strings) as an Arrow array."""
    import pyarrow as pa

    if isinstance(values, pd.arrays.ArrowStringArray):
        # One type for both sides of the match; no copy when it is already theirs.
        return pa.array(values, type=pa.large_string())
    return pa.array(np.asarray(values, dtype=object), type=pa.large_string())


class _ExtraRows:
    """The row of ``extras`` of each unit, looked up once per distinct list of units.

    Matching a million procedure ids is a hash of a million strings; metrics with the same
    outcome window have the same mature units, so the second one reuses the first's rows.
    Both the ids and their hash table stay in Arrow (``index_in``): ``Index.get_indexer``
    on object ids needs a Python string per id on both sides, which raised the monitor's peak.
    """

    def __init__(self, extras: pd.DataFrame) -> None:
        self.extras = extras
        self.ids = _arrow_ids(extras.index.array)
        self.seen: list[tuple[Any, np.ndarray]] = []

    def __call__(self, unit_id: pd.Series) -> np.ndarray:
        import pyarrow.compute as pc

        ids = _arrow_ids(unit_id.array)
        for known, position in self.seen:
            if known.equals(ids):
                return position
        # -1 for an id not in extras, as get_indexer gives (procedure_id is unique there).
        found = pc.fill_null(pc.index_in(ids, value_set=self.ids), -1)
        position = found.to_numpy().astype(np.intp)
        del found
        # Arrow's pool keeps the hash table for reuse; the charts that follow need the pages.
        release_memory()
        self.seen.append((ids, position))
        return position


def _units(snapshot: Snapshot, profile: Profile, metric_id: str, extras: pd.DataFrame,
           rows_of: _ExtraRows | None = None) -> pd.DataFrame:
    """Mature units of a per-procedure metric, with the network risk and the extra columns.

    ``rows_of`` None: ``extras`` is aligned with the snapshot's procedures (read with them),
    so each unit's extras are those of its index procedure's row; no id is matched.
    """
    metric = profile.metric(metric_id)
    aligned = rows_of is None
    # Aligned: no unit ids (a string per unit) are made, only the row numbers.
    units = derive_outcomes(snapshot, metric, columns=(
        ("site_id", "index_day", "y", *COVARIATES, "procedure_row") if aligned
        else OUTCOME_COLUMNS))
    min_events = profile.design.risk_min_events
    if profile.design.risk_refit == "quarterly":
        # The site engine's schedule: fitted on the units known before the quarter began,
        # so every run of a quarter reads one stored fit (no statsmodels in a nightly run).
        # Calibrated over those training units, not all units: the rate is part of the
        # fit's key, and over all units it moves with every new day (a refit every night);
        # the quarter's cases are then judged against a reference they do not move (the
        # engine's Phase I / Phase II split), and product charts compare each product with
        # the others within the same site and quarter anyway (devices.py).
        # Only the columns the fit reads: the training rows are copied.
        training = known_before_quarter(units[["y", "index_day", *COVARIATES]],
                                        metric.window_days, snapshot.as_of_day)
        # Digested once per snapshot: the site charts fit on the same training units.
        digest = shared_training_digest(
            snapshot.training_digests,
            (metric.id, "known before", design_day(snapshot.as_of_day)), training)
        model = fitted_risk_model(metric.id, training.reset_index(drop=True),
                                  calibration_rate(metric, training), min_events=min_events,
                                  digest=digest)
        del training
    else:
        # every_run: fitted on, and calibrated to the observed rate of, every mature unit.
        model = fit_risk_model(metric.id, units, calibration_rate(metric, units),
                               min_events=min_events)
    # Only the columns the operator and device charts read: the charts copy their units
    # per product and operator, so every column left out is saved many times over.
    slim = pd.DataFrame({"site_id": units["site_id"].array,
                         "index_day": units["index_day"].to_numpy(np.int64),
                         "y": units["y"].to_numpy(np.int64), "risk": model.predict(units)})
    position = (units["procedure_row"].to_numpy() if aligned
                else rows_of(units["unit_id"]))
    del units
    for name in EXTRA_COLUMNS:
        values = extras[name].array
        slim[name] = (values.take(position, allow_fill=True)
                      if isinstance(values, pd.Categorical)
                      else pd.Series(values).reindex(position).to_numpy())
    del position
    # The units, the fit's patterns and their copies are freed; without handing their pages
    # back, each metric's units would raise the process's size by their own again.
    release_memory()
    return slim


def _plan(design: BeyondSite) -> list[str]:
    """Return the metrics whose units :func:`compute_beyond_site` reads, once per read."""
    plan = []
    if design.operators is not None:
        plan.append(design.operators.cusum_metric)
        if design.operators.rare_metric:
            plan.append(design.operators.rare_metric)
    if design.devices is not None:
        plan += [design.devices.lot_metric, *design.devices.metrics]
    return plan


class _Lazy(Mapping):
    """A metric's units made when the product charts ask for them (once per metric)."""

    def __init__(self, units: Callable[[str], pd.DataFrame]) -> None:
        self.units = units

    def __getitem__(self, metric_id: str) -> pd.DataFrame:
        return self.units(metric_id)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("made on demand: ask for a metric")

    def __len__(self) -> int:
        raise TypeError("made on demand: ask for a metric")


def compute_beyond_site(conn: sa.Connection, profile: Profile, snapshot: Snapshot,
                        design: BeyondSite | None = None) -> dict[str, list[dict[str, Any]]]:
    """Return the operator, product and lot rows for ``snapshot`` (no writes)."""
    design = design or parse_beyond_site(profile)
    out: dict[str, list[dict[str, Any]]] = {"operators": [], "products": [], "lots": []}
    if design.operators is None and design.devices is None:
        return out
    as_of_day = snapshot.as_of_day
    if snapshot.extras is not None:  # read with the snapshot (PostgreSQL)
        extras = pd.DataFrame({name: _named(snapshot.extras[name].array)
                               for name in EXTRA_COLUMNS}, copy=False)
        rows_of = None
    else:
        extras = _extras(conn, snapshot.as_of)
        rows_of = _ExtraRows(extras)
    cache: dict[str, pd.DataFrame] = {}
    # Each metric's units are kept only until their last use below: the charts' metrics
    # one after the other, not every metric's million units at once (the peak memory of
    # the monitor's beyond_charts step).
    uses = Counter(_plan(design))

    def units(metric_id: str) -> pd.DataFrame:
        if metric_id not in cache:
            cache[metric_id] = _units(snapshot, profile, metric_id, extras, rows_of)
        uses[metric_id] -= 1
        return cache.pop(metric_id) if uses[metric_id] <= 0 else cache[metric_id]

    if design.operators is not None:
        ops = design.operators
        out["operators"] = operator_charts(units(ops.cusum_metric), profile, ops, as_of_day)
        if ops.rare_metric:
            out["operators"] += operator_rare_tests(units(ops.rare_metric), profile, ops,
                                                    as_of_day)
    if design.devices is not None:
        dev = design.devices
        failures = _failures(conn, snapshot.as_of, dev.failure_event_types)
        lot_units = units(dev.lot_metric)
        lot_units = lot_units.loc[lot_units["cement_product"].notna()
                                  & lot_units["cement_lot"].notna()]
        out["lots"] = lot_tests(
            # The columns as read (categoricals on PostgreSQL, their categories sorted, so
            # lots come in name order): grouped and their sites counted on codes, with no
            # string made per case.
            pd.DataFrame({"product": lot_units["cement_product"].array,
                          "lot": lot_units["cement_lot"].array,
                          "site_id": lot_units["site_id"].array,
                          "index_day": lot_units["index_day"].to_numpy(),
                          "y": lot_units["y"].to_numpy(), "risk": lot_units["risk"].to_numpy()}),
            dev, as_of_day)
        flagged = frozenset(row["product"] + LOT_KEY_SEPARATOR + row["lot"]
                            for row in out["lots"] if row["signal_date"])
        out["products"] = product_charts(_Lazy(units), profile, dev, failures, as_of_day,
                                         flagged)
    return out


TABLES = {"operators": schema.operator_chart, "products": schema.device_product_chart,
          "lots": schema.device_lot_test}


def store_beyond_site(conn: sa.Connection, profile: Profile, as_of: date, run_key: str,
                      rows: dict[str, list[dict[str, Any]]]) -> bool:
    """Replace the profile's operator and device rows when this run is the newest; say if it was.

    Only the rows that differ from the stored ones are written
    (:func:`pipelines.surveillance.engine.replace_rows`), under the monitor's store lock.
    """
    # Imported here: the engine imports this module.
    from pipelines.surveillance.engine import lock_monitor_store, replace_rows
    from pipelines.surveillance.outcomes import latest_procedure_date
    from pipelines.surveillance.runs import is_look_ahead, look_ahead_grace

    lock_monitor_store(conn)  # first, before the stored rows are read
    # A look-ahead (a run dated past the newest procedure's shortest outcome window) is not
    # the current picture, as for the site charts (engine._persist_once): on it every hold
    # has run out, so stored as the newest it would clear open training reviews and
    # device alerts and outrank every nightly run until the data caught up (user audit,
    # 2026-12-07). Rows a look-ahead left before this rule give way to a run on the data.
    newest = latest_procedure_date(conn)
    if is_look_ahead(profile, as_of, newest):
        log.info("beyond_site: a run as of %s is more than %d days after the newest "
                 "procedure (%s); the stored operator and device rows left alone",
                 as_of, look_ahead_grace(profile), newest)
        return False
    for table in TABLES.values():
        mine = table.c.profile_name == profile.name
        stored = conn.execute(sa.select(sa.func.max(table.c.as_of)).where(mine)).scalar()
        if stored is None:
            continue
        stored_day = date.fromisoformat(str(stored)[:10])
        # Rows a look-ahead left count as of the newest procedure, as the site picture's
        # do (engine._persist_once): they give way to a run on the data, not to a backfill.
        current_day = (min(stored_day, newest) if is_look_ahead(profile, stored_day, newest)
                       else stored_day)
        if current_day > as_of:
            log.info("beyond_site: %s holds a newer run (%s); left alone", table.name, stored)
            return False
    # What is written goes in by the site run's bulk insert (COPY on PostgreSQL: some 2,500
    # operator rows took a tenth of a second as an INSERT executemany).
    constants = {"profile_name": profile.name, "run_key": run_key, "as_of": as_of}
    for name, table in TABLES.items():
        replace_rows(conn, table, rows[name], constants)
    return True


@dataclass
class PreparedRows:
    """The operator and device rows computed ahead of the site charts, or why they failed."""

    rows: dict[str, list[dict[str, Any]]] | None = None
    error: Exception | None = None
    seconds: float = 0.0


def prepare_beyond_site(engine: sa.Engine, profile: Profile,
                        snapshot: Snapshot) -> PreparedRows | None:
    """Compute the operator and device rows now, for :func:`run_beyond_site` to store later.

    The monitor calls this before the site charts, while only the snapshot is alive: the
    charts' units and risk models then never coexist with the site charts' arrays (the two
    together were the monitor's peak memory). An error is kept and raised by
    :func:`run_beyond_site`, after the site run is stored, as before. Designs go to their
    own threshold store, saved at once. None when the profile charts neither.
    """
    design = parse_beyond_site(profile)
    if design.operators is None and design.devices is None:
        return None
    started = time.perf_counter()
    prepared = PreparedRows()
    store = threshold_store.open_store(engine, profile.name, profile.version)
    try:
        with threshold_store.active(store), engine.connect() as conn:
            prepared.rows = compute_beyond_site(conn, profile, snapshot, design)
    except Exception as error:  # raised after the site run is stored (run_beyond_site)
        log.exception("beyond_site: the operator and device charts failed")
        prepared.error = error
    threshold_store.save_store(engine, store)
    # The units and charts are freed: the site charts start from the snapshot's size.
    release_memory()
    prepared.seconds = time.perf_counter() - started
    return prepared


def run_beyond_site(engine: sa.Engine, profile: Profile, snapshot: Snapshot, run_key: str,
                    expectations_dir: Path,
                    prepared: PreparedRows | None = None) -> dict[str, int]:
    """Draft new Yellow Cards; compute (unless ``prepared``) and store the operator and
    device charts; count them."""
    design = parse_beyond_site(profile)
    counts: dict[str, int] = {}
    if design.regulator is not None:
        from pipelines.alerts.regulator import draft_new

        with engine.begin() as conn:
            counts["yellow_card_drafts_new"] = draft_new(conn, design.regulator,
                                                         reference_for(expectations_dir))
    if design.operators is None and design.devices is None:
        return counts
    if prepared is not None and prepared.error is not None:
        raise prepared.error
    if prepared is not None and prepared.rows is not None:
        rows = prepared.rows
    else:
        with engine.connect() as conn:
            rows = compute_beyond_site(conn, profile, snapshot, design)
    with engine.begin() as conn:
        store_beyond_site(conn, profile, snapshot.as_of, run_key, rows)
    counts.update({name: len(found) for name, found in rows.items()})
    counts.update({f"{name}_signalled": sum(1 for r in found if r.get("signal_date"))
                   for name, found in rows.items()})
    log.info("beyond_site: %s", counts)
    return counts
