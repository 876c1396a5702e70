"""Static pages for products, cement lots and (per site, confidential) operators.

Kept apart from the evidence report (:mod:`pipelines.report`): the operator pages are for a
site's clinical lead, not the network, so they are written to their own directory by
``kyphowatch beyond-report --out DIR``. They read the newest monitor run's tables
(``device_product_chart``, ``device_lot_test``, ``operator_chart``); operators appear only by
pseudonym.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipelines import schema
from pipelines.settings import Settings, load_settings

_STYLE = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}"
          "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
          "text-align:left}td.n{text-align:right}.flag{background:#fde2e1}")


def _cell(value: Any) -> str:
    if value is None:
        return "<td>-</td>"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.2f}"
        return f"<td class='n'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='n'>{value}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: list[str], rows: list[list[Any]], flagged: list[bool]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=flag' if flag else ''}>{''.join(_cell(v) for v in row)}</tr>"
        for row, flag in zip(rows, flagged, strict=True))
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style><h1>{html.escape(title)}</h1>{body}</html>\n")


def _rows(conn: sa.Connection, table: sa.Table, *order) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.select(table).order_by(*order)).mappings()]


def devices_page(products: list[dict], lots: list[dict]) -> str:
    """Return the network page: each product against the others, then the cement lots."""
    product_rows = [[p["product"], p["kind"], p["metric"], p["procedures"], p["events"],
                     p["expected"], p["observed_expected"], p["statistic"], p["threshold"],
                     str(p["signal_date"] or ""), p["device_failures"]] for p in products]
    tested = sorted(lots, key=lambda r: r["p_value"])
    lot_rows = [[r["product"], r["lot"], r["metric"], r["procedures"], r["sites"], r["events"],
                 r["expected"], r["p_value"], r["alpha"], str(r["signal_date"] or "")]
                for r in tested[:50]]
    as_of = str(products[0]["as_of"]) if products else (str(lots[0]["as_of"]) if lots else "-")
    return _page(f"Devices and cement lots, as of {as_of}", (
        "<p>Each product against the other products of its kind (expected risks recalibrated "
        "to them per quarter; the statistic is the CUSUM or, for rare events, the p-value; "
        "docs/statistics.md section 9). Highlighted rows signalled.</p>"
        + _table(["product", "kind", "metric", "procedures", "events", "expected", "O/E",
                  "statistic", "threshold", "signal date", "device failures"],
                 product_rows, [bool(p["signal_date"]) for p in products])
        + f"<h2>Cement lots (the {len(lot_rows)} lowest p-values of {len(lots)} tested)</h2>"
        + _table(["cement", "lot", "metric", "procedures", "sites", "events", "expected",
                  "p-value", "alpha", "signal date"], lot_rows,
                 [bool(r["signal_date"]) for r in tested[:50]])))


def operators_page(site_id: str, operators: list[dict]) -> str:
    """Return one site's confidential operator page (pseudonyms only)."""
    rows = [[o["operator"], o["metric"], o["method"], o["procedures"], o["events"],
             o["expected"], o["statistic"], o["threshold"], str(o["signal_date"] or ""),
             o["signal_procedure"], str(o["first_procedure_date"])] for o in operators]
    return _page(f"Operators at {site_id} (confidential: the site's clinical lead)", (
        "<p>Learning curves per operator pseudonym (OP- and ten hex digits of the keyed "
        "digest; map them with the site's own key material). Highlighted rows signalled: "
        "review the operator's cases and training (HTG108 1.2).</p>"
        + _table(["operator", "metric", "method", "procedures", "events", "expected",
                  "statistic", "threshold", "signal date", "at procedure", "first procedure"],
                 rows, [bool(o["signal_date"]) for o in operators])))


def write_beyond_pages(settings: Settings, out_dir: Path) -> dict[str, Any]:
    """Write ``devices.html`` and ``operators/<SITE>.html``; return what was written."""
    from pipelines.db import reading, require_warehouse

    require_warehouse(settings.db_url)
    with reading(settings.db_url) as conn:
        products = _rows(conn, schema.device_product_chart, schema.device_product_chart.c.kind,
                         schema.device_product_chart.c.product,
                         schema.device_product_chart.c.metric)
        lots = _rows(conn, schema.device_lot_test, schema.device_lot_test.c.product,
                     schema.device_lot_test.c.lot)
        operators = _rows(conn, schema.operator_chart, schema.operator_chart.c.site_id,
                          schema.operator_chart.c.operator, schema.operator_chart.c.metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "devices.html").write_text(devices_page(products, lots), encoding="utf-8")
    by_site: dict[str, list[dict]] = {}
    for row in operators:
        by_site.setdefault(row["site_id"], []).append(row)
    (out_dir / "operators").mkdir(exist_ok=True)
    for site_id, rows in by_site.items():
        (out_dir / "operators" / f"{site_id}.html").write_text(
            operators_page(site_id, rows), encoding="utf-8")
    return {"devices": str(out_dir / "devices.html"), "operator_pages": len(by_site),
            "products": len(products), "lots": len(lots)}


def _handle(args: argparse.Namespace) -> int:
    result = write_beyond_pages(load_settings(db_url=args.db), Path(args.out))
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``beyond-report`` to the ``kyphowatch`` parser."""
    parser = subparsers.add_parser(
        "beyond-report", help="pages for products, cement lots and (confidential) operators")
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", default="var/beyond", help="output directory")
    parser.set_defaults(handler=_handle)
