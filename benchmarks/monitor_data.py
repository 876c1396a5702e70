"""A simulated PostgreSQL warehouse for the monitor benchmark (and its profiling).

The procedures and complications are :func:`pipelines.simulate.simulate_snapshot`'s draws
(the same cohort, outcomes and complications as ``simulate`` with the same arguments, every
event present), written straight into ``procedure`` / ``complication`` with ``COPY``: the
monitor reads the tables ingest fills, without paying the validated load. Patient and
operator references are SHA-256 digests of synthetic numbers (64 hex characters, like the
HMAC digests ingest stores); devices follow the simulator's products (a main balloon and
cement per site, a monthly cement lot).
"""

from __future__ import annotations

import hashlib
import io
import time
from datetime import date

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipelines.simulate import BALLOON_PRODUCTS, CEMENT_PRODUCTS, simulate_snapshot
from pipelines.surveillance.outcomes import day_to_date
from pipelines.surveillance.profile import Profile

# The ingest benchmark's registry (about 1.0M procedures: 200 sites, 2022-2023).
SIM = {"sites": 200, "start": "2022-01-01", "end": "2023-12-31", "seed": 20240601,
       "volume_scale": 16.1}


def _digests(numbers: np.ndarray, label: str) -> np.ndarray:
    """Return a 64-hex digest per number (computed once per distinct number)."""
    uniques, inverse = np.unique(numbers, return_inverse=True)
    hexes = np.asarray([hashlib.sha256(f"{label}:{n}".encode()).hexdigest()
                        for n in uniques.tolist()], dtype=object)
    return hexes[inverse]


def _iso(days: np.ndarray) -> np.ndarray:
    return np.asarray(days, dtype=np.int64).astype("datetime64[D]").astype(str)


def _copy(conn: sa.Connection, table: str, frame: pd.DataFrame) -> None:
    """COPY ``frame`` into ``table`` (CSV through psycopg; empty strings are NULL)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, header=False)
    driver = conn.connection.driver_connection
    columns = ", ".join(frame.columns)  # fixed names from this module
    with driver.cursor() as cursor, cursor.copy(
        f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)"
    ) as stream:
        stream.write(buffer.getvalue())


def build_warehouse(engine: sa.Engine, profile: Profile, *, volume_scale: float | None = None,
                    sites: int | None = None, start: str | None = None,
                    end: str | None = None) -> dict:
    """Fill an empty, migrated PostgreSQL warehouse; return counts and the seconds it took."""
    started = time.perf_counter()
    snapshot, info = simulate_snapshot(
        profile, sites=sites or SIM["sites"],
        start=date.fromisoformat(start or SIM["start"]),
        end=date.fromisoformat(end or SIM["end"]), seed=SIM["seed"],
        volume_scale=volume_scale or SIM["volume_scale"],
    )
    procs, comps = snapshot.procedures, snapshot.complications
    n = len(procs)
    site_code = procs["site_code"].to_numpy(np.int64)
    rng = np.random.default_rng(SIM["seed"])
    operator = site_code * 8 + rng.integers(0, 6, n)
    balloon = (site_code + (rng.random(n) < 0.2)) % len(BALLOON_PRODUCTS)
    cement = (site_code + (rng.random(n) < 0.2)) % len(CEMENT_PRODUCTS)
    month = procs["procedure_day"].to_numpy().astype("datetime64[D]").astype(
        "datetime64[M]").astype(str)
    lot = np.char.add(np.char.add(np.asarray(CEMENT_PRODUCTS)[cement], "-"),
                      np.char.replace(month, "-", ""))
    procedure = pd.DataFrame({
        "procedure_id": procs["procedure_id"].to_numpy(),
        "site_id": procs["site_id"].astype(str).to_numpy(),
        "patient_hash": _digests(procs["patient_code"].to_numpy(), "patient"),
        "operator_hash": _digests(operator, "operator"),
        "procedure_date": _iso(procs["procedure_day"].to_numpy()),
        "levels_treated": procs["levels_treated"].to_numpy(),
        "indication": procs["indication"].astype(str).to_numpy(),
        "anaesthesia": procs["anaesthesia"].astype(str).to_numpy(),
        "balloons": procs["balloons"].to_numpy(),
        "age_years": procs["age_years"].to_numpy(),
        "sex": procs["sex"].astype(str).to_numpy(),
        "steroid_use": procs["steroid_use"].to_numpy(),
        "mdt_discussed": procs["mdt_discussed"].to_numpy(),
        "source_checksum": "0" * 64,
        "extract_ts": f"{info['end'].isoformat()}T00:00:00Z",
        "balloon_product": np.asarray(BALLOON_PRODUCTS)[balloon],
        "cement_product": np.asarray(CEMENT_PRODUCTS)[cement],
        "cement_lot": lot,
    })
    rows = comps["procedure_row"].to_numpy(np.int64)
    complication = pd.DataFrame({
        "complication_id": [f"C{i:08d}" for i in range(len(comps))],
        "procedure_id": procedure["procedure_id"].to_numpy()[rows],
        "site_id": procedure["site_id"].to_numpy()[rows],
        "event_date": _iso(comps["event_day"].to_numpy()),
        "event_type": comps["event_type"].astype(str).to_numpy(),
        "symptomatic": comps["symptomatic"].to_numpy(),
        "severity": comps["severity"].astype(str).to_numpy(),
        "source_checksum": "0" * 64,
        "extract_ts": f"{info['end'].isoformat()}T00:00:00Z",
    })
    with engine.begin() as conn:
        _copy(conn, "procedure", procedure)
        _copy(conn, "complication", complication)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE procedure")
        conn.exec_driver_sql("ANALYZE complication")
    return {"procedures": n, "complications": len(complication),
            "as_of": day_to_date(int(procs["procedure_day"].max())),
            "seconds": time.perf_counter() - started}
