"""A small synthetic registry with operators, products and cement lots, written as extracts."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np

from tests.ingest_helpers import COMP_HEADER, PROC_HEADER, comp_row, csv_text, proc_row, write

NEW_OPERATOR = "DR-NEW-LEARNER"  # a raw reference that must never leave the warehouse
BAD_LOT = "LOT-BAD-01"
START = date(2023, 1, 2)


def write_registry(folder: Path, *, seed: int = 7, days: int = 540, bad_operator_odds: float = 6.0,
                   bad_lot_odds: float = 8.0) -> dict:
    """Write procedures and complications extracts; return what was planted.

    Four sites, three established operators each; at S001 a new operator starts on day 200
    with leak odds ``bad_operator_odds`` times the others'. Cement lot ``BAD_LOT`` (used at
    every site from day 300) has leak odds ``bad_lot_odds`` times the others'. A few balloon
    ruptures and one major cement leak are device-related events.
    """
    rng = np.random.default_rng(seed)
    procs, comps = [], []
    base_odds = 0.09 / 0.91
    planted = {"device_related": []}
    number = 0
    for site in ("S001", "S002", "S003", "S004"):
        for day in range(days):
            for _ in range(rng.poisson(1.0)):
                number += 1
                pid = f"P{number:05d}"
                operator = f"OP-{site}-{rng.integers(3)}"
                odds = base_odds
                if site == "S001" and day >= 200 and rng.random() < 0.5:
                    operator, odds = NEW_OPERATOR, base_odds * bad_operator_odds
                lot = f"LOT-{rng.integers(1, 6):02d}"
                if day >= 300 and rng.random() < 0.25:
                    lot, odds = BAD_LOT, odds * bad_lot_odds
                when = START + timedelta(days=day)
                procs.append(proc_row(
                    pid, site=site, patient=f"PT-{number}", date=when.isoformat(),
                    operator_ref=operator,
                    balloon_product=["KYPHON-XPANDER-II", "express ii"][number % 2],
                    cement_product="KYPHON-HV-R", cement_lot=lot, udi_di="00643169007222",
                ))
                if rng.random() < odds / (1 + odds):
                    comps.append(comp_row(f"C{number:05d}", pid, site=site,
                                          date=(when + timedelta(days=1)).isoformat()))
                if rng.random() < 0.01:
                    comps.append(comp_row(f"R{number:05d}", pid, site=site, date=when.isoformat(),
                                          event_type="balloon_rupture", symptomatic="false"))
                    planted["device_related"].append(f"R{number:05d}")
    # one major cement leak (device-related) and one major leak without device columns
    last = procs[-1]
    comps.append(comp_row("CMAJOR", last["procedure_id"], site=last["site_id"],
                          date=last["procedure_date"], severity="major", symptomatic="true"))
    planted["device_related"].append("CMAJOR")
    end = START + timedelta(days=days)
    stamp = end.strftime("%Y%m%d")
    paths = [write(folder / f"procedures_{stamp}.csv", csv_text(PROC_HEADER, procs)),
             write(folder / f"complications_{stamp}.csv", csv_text(COMP_HEADER, comps))]
    planted.update(paths=paths, procedures=len(procs), end=end)
    return planted
