"""Pages for products, cement lots and (per site, confidential) operators.

Two audiences, two places:

* ``devices.html`` (each product against the other products of its kind, then the cement
  lots) is network-wide safety evidence: :func:`pipelines.report.render_report` writes it
  into the evidence report, linked from the overview and the navigation, with the data
  behind its charts as ``devices-<metric>.csv``.
* ``operators/<SITE>.html`` are confidential: learning curves are for the site's clinical
  lead, not for everyone who can open the network report (every Airflow viewer, through
  the plugin). They are never written into the evidence report; ``kyphowatch beyond-report
  --out DIR`` writes them (with a copy of the devices page) into a directory of their own,
  one file per site, so a site's page can be handed to that site's lead alone.

Every page reads the newest monitor run's tables (``device_product_chart``,
``device_lot_test``, ``operator_chart``) for the profile in use; operators appear only by
pseudonym. Pages follow the evidence report's rules: static HTML, no script, nothing fetched,
tables scroll inside their own box on a 400 px phone, rates in %, methods by name.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipelines import schema
from pipelines.report.common import (
    CSS,
    SITE_RE,
    _esc,
    _num,
    _page,
    _pct,
    csv_text,
    figure,
    output_directory,
    prepare_output_directory,
)
from pipelines.report.svgplot import forest
from pipelines.settings import Settings, load_settings

OPERATOR_METHODS = {
    "fir_cusum": "risk-adjusted CUSUM with head start (FIR)",
    "rare": "exact rare-event test",
}
SIGNAL_MARK = "\u25b2 signal"
QUIET_MARK = "\u2713 no signal"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


# -- reading --------------------------------------------------------------------------------

def _rows(conn: sa.Connection, table: sa.Table, profile_name: str,
          *order) -> list[dict[str, Any]]:
    query = sa.select(table).where(table.c.profile_name == profile_name).order_by(*order)
    return [dict(r) for r in conn.execute(query).mappings()]


def read_beyond(settings: Settings, profile_name: str,
                operators: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Return the stored ``products``, ``lots`` and (unless ``operators`` is false: the
    network report never reads them) ``operators`` rows of a profile."""
    from pipelines.db import reading

    products_t, lots_t = schema.device_product_chart, schema.device_lot_test
    operators_t = schema.operator_chart
    with reading(settings.db_url) as conn:
        return {
            "products": _rows(conn, products_t, profile_name, products_t.c.kind,
                              products_t.c.product, products_t.c.metric),
            "lots": _rows(conn, lots_t, profile_name, lots_t.c.product, lots_t.c.lot,
                          lots_t.c.metric),
            "operators": _rows(conn, operators_t, profile_name, operators_t.c.site_id,
                               operators_t.c.operator, operators_t.c.metric)
            if operators else [],
        }


# -- small pieces ---------------------------------------------------------------------------

def _standalone_page(title: str, body: str) -> str:
    """Return a page of the beyond-report directory: the report's style, no navigation
    (that directory holds no overview to go back to)."""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<link rel='icon' href='data:,'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1>{body}</body></html>\n")


def _rate(events: int, procedures: int) -> str:
    return _pct(events / procedures) if procedures else "-"


def chi2_ppf(q: float, df: float) -> float:
    """Return the chi-squared quantile, ``scipy.stats.chi2.ppf(q, df)`` bit for bit (its own
    kernel, tests/test_report.py) without importing scipy.stats: 1.3 s of a report."""
    from scipy.special import gammaincinv

    return 2 * gammaincinv(df / 2, q)


def _poisson_ci(events: int, expected: float) -> tuple[float | None, float | None]:
    """Return the exact 95% interval of an observed/expected ratio (Poisson, Garwood)."""
    if not expected or expected <= 0:
        return None, None
    low = 0.0 if events == 0 else chi2_ppf(0.025, 2 * events) / 2
    high = chi2_ppf(0.975, 2 * events + 2) / 2
    return float(low) / expected, float(high) / expected


def _strength(statistic: float | None, threshold: float | None, rare: bool) -> str:
    """Return the test's figure against its threshold as text."""
    if statistic is None or threshold is None:
        return ""
    if rare:
        return f"p = {statistic:.1g} (alpha {threshold:.1g}, last 365 days)"
    return f"CUSUM now {statistic:.2f}, threshold {threshold:.2f}"


def _status(row: dict[str, Any], what: str, strength: str) -> str:
    """Return the status cell: the mark, the signal date and the strength, all as text."""
    if row.get("signal_date"):
        lines = [f"{what} {row['signal_date']}", strength]
        return ("<td class='st-alarm'><span class='cell-level'>" + _esc(SIGNAL_MARK)
                + "</span>" + "".join(f"<span class='cell-line'>{_esc(t)}</span>"
                                      for t in lines if t) + "</td>")
    return (f"<td><span class='cell-level'>{_esc(QUIET_MARK)}</span>"
            f"<span class='cell-line'>{_esc(strength)}</span></td>")


def _table(headers: list[str], rows: list[str], caption: str) -> str:
    """Return a table in a box that scrolls sideways on a phone; ``rows`` are ``<tr>``."""
    head = "".join(f"<th scope='col'>{_esc(h)}</th>" for h in headers)
    return (f"<div class='scroll'><table><caption class='sr'>{_esc(caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _num_td(value: Any, digits: int = 3) -> str:
    return f"<td class='num'>{_esc(_num(value, digits))}</td>"


# -- the devices page -----------------------------------------------------------------------

def _product_rows(products: list[dict], labels: dict[str, str], rare: set[str]) -> list[str]:
    rows = []
    for p in products:
        label = labels.get(p["metric"], p["metric"])
        flag = " class='flag'" if p["signal_date"] else ""
        rows.append(
            f"<tr{flag} id='product-{_esc(p['product'])}-{_esc(p['metric'])}'>"
            f"<th scope='row'>{_esc(p['product'])}</th><td>{_esc(p['kind'])}</td>"
            f"<td>{_esc(label)}</td>"
            + _status(p, "last signal", _strength(p["statistic"], p["threshold"],
                                                  p["metric"] in rare))
            + f"<td class='num'>{p['procedures']}</td><td class='num'>{p['events']}</td>"
            f"<td class='num'>{_rate(p['events'], p['procedures'])}</td>"
            f"<td class='num'>{_rate(p['expected'], p['procedures'])}</td>"
            + _num_td(p["observed_expected"]) + f"<td class='num'>{p['device_failures']}</td>"
            "</tr>")
    return rows


def _lot_rows(lots: list[dict], labels: dict[str, str]) -> list[str]:
    rows = []
    for r in lots:
        flag = " class='flag'" if r["signal_date"] else ""
        rows.append(
            f"<tr{flag} id='lot-{_esc(r['lot'])}-{_esc(r['metric'])}'>"
            f"<th scope='row'>{_esc(r['lot'])}</th><td>{_esc(r['product'])}</td>"
            f"<td>{_esc(labels.get(r['metric'], r['metric']))}</td>"
            + _status(r, "signal as of", f"exact test p = {r['p_value']:.1g} "
                                         f"(alpha {r['alpha']:.1g})")
            + f"<td class='num'>{r['procedures']}</td><td class='num'>{r['sites']}</td>"
            f"<td class='num'>{r['events']}</td>"
            f"<td class='num'>{_rate(r['events'], r['procedures'])}</td>"
            + _num_td(r["expected"]) + "</tr>")
    return rows


def _forests(products: list[dict], labels: dict[str, str],
             files: dict[str, str]) -> list[str]:
    """Return one observed/expected forest plot per metric; put its data into ``files``."""
    out = []
    for metric in dict.fromkeys(p["metric"] for p in products):
        label = labels.get(metric, metric)
        chosen = [p for p in products if p["metric"] == metric]
        data, plotted = [], []
        for p in chosen:
            low, high = _poisson_ci(p["events"], p["expected"])
            oe = p["observed_expected"]
            data.append([p["product"], p["kind"], p["procedures"], p["events"], p["expected"],
                         oe, low, high, str(p["signal_date"] or "")])
            plotted.append((f"{p['product']} ({p['kind']})", oe, low, high))
        flagged = [p["product"] for p in chosen if p["signal_date"]]
        description = (f"Observed/expected ratio of {label.lower()} per product with its "
                       "exact 95% interval; 1 means as expected from the other products of "
                       "its kind. " + (f"Signalled: {', '.join(flagged)}." if flagged
                                       else "No product signalled."))
        svg = forest(plotted, title=f"{label}: observed/expected per product",
                     x_label="observed/expected (1 = as the other products)",
                     description=description)
        name = f"devices-{_SAFE_NAME.sub('_', metric)}.csv"
        files[name] = csv_text(["product", "kind", "procedures", "events", "expected",
                                "observed_expected", "ci95_low", "ci95_high", "signal_date"],
                               data)
        out.append(f"<h3 id='oe-{_esc(metric)}'>{_esc(label)}</h3>"
                   + figure(svg, name, f"observed/expected per product, {label.lower()}"))
    return out


def render_devices(products: list[dict], lots: list[dict], labels: dict[str, str],
                   rare: set[str], *, as_of: date | None = None,
                   page: Callable[[str, str], str] = _page,
                   lot_rows: int = 50) -> dict[str, str]:
    """Return ``devices.html`` and the CSV files behind its charts, ``{name: text}``.

    ``labels`` names the metrics, ``rare`` holds the metrics tested by the exact rare-event
    test rather than a CUSUM. ``as_of`` is the report's date: rows stored for another date
    (the tables hold the newest run only, so a backfilled report is older) are not shown.
    """
    stored = {str(r["as_of"]) for r in (*products, *lots)}
    if as_of is not None and stored and stored != {as_of.isoformat()}:
        body = (f"<p>The device tables hold the newest monitor run only (as of "
                f"{_esc(', '.join(sorted(stored)))}), not this report's date "
                f"({as_of.isoformat()}); see the newest report.</p>")
        return {"devices.html": page("Devices and cement lots", body)}
    day = ", ".join(sorted(stored)) or "-"
    if not products and not lots:
        return {"devices.html": page("Devices and cement lots", (
            "<p>No product or cement lot has been charted: the extracts carry no device "
            "columns yet (docs/contract.md), or the monitor has not run since they did.</p>"))}
    files: dict[str, str] = {}
    signalled = [p for p in products if p["signal_date"]]
    tested = sorted(lots, key=lambda r: (r["signal_date"] is None, r["p_value"]))
    lots_signalled = [r for r in lots if r["signal_date"]]
    shown = tested[:max(lot_rows, len(lots_signalled))]
    summary = (f"<p class='lead'>As of {_esc(day)}: {len(signalled)} of {len(products)} "
               f"product charts and {len(lots_signalled)} of {len(lots)} cement lots "
               "signalled.</p>")
    body = [
        summary,
        "<p>Each product is compared with the other products of its kind (balloon or "
        "cement) used at the same site in the same quarter: of a site-quarter's events, the "
        "share expected to be the product's follows from the network's case-mix model, so a "
        "site's own level or drift cancels and <i>observed/expected</i> above 1 means more "
        "events than the same patients would have had with the alternatives at their site. "
        "Procedures, events and expected count only site-quarters where another product was "
        "used too. The sequential test is a risk-adjusted CUSUM whose threshold comes from "
        "the network false-alarm budget; rare events (major events) use an exact test, "
        "stratified by site, over the last 365 days. "
        "Cement lots get an exact test for an excess within the lot, across sites. Methods: "
        "docs/statistics.md section 9.</p>",
        "<h2 id='products'>Products</h2>",
        _table(["product", "kind", "metric", "status", "procedures", "events", "rate",
                "expected rate", "observed/expected", "device failures"],
               _product_rows(products, labels, rare), "Products against the others of their "
               "kind, signalled rows marked"),
        "<p class='note'>Device failures: balloon ruptures and other device failures "
        "recorded with the product, all dates.</p>",
        "<h2 id='oe'>Observed/expected per product</h2>",
        *_forests(products, labels, files),
        f"<h2 id='lots'>Cement lots ({len(shown)} shown of {len(lots)} tested: signalled "
        "first, then by p-value)</h2>",
        _table(["lot", "cement", "metric", "status", "procedures", "sites", "events", "rate",
                "expected events"], _lot_rows(shown, labels),
               "Cement lots, signalled first"),
    ]
    return {"devices.html": page(f"Devices and cement lots, as of {day}", "\n".join(body)),
            **files}


def overview_section(products: list[dict], lots: list[dict], labels: dict[str, str],
                     as_of: date | None) -> str:
    """Return the overview's short section that names signalled products and lots and
    links the devices page."""
    current = [r for r in (*products, *lots) if as_of is None or str(r["as_of"]) == str(as_of)]
    out = ["<h2 id='devices'>Devices and cement lots</h2>"]
    if not current:
        out.append("<p>No device charts for this date. <a href='devices.html'>Devices and "
                   "cement lots page</a>.</p>")
        return "".join(out)
    flagged_products = [r for r in current if "lot" not in r and r["signal_date"]]
    flagged_lots = [r for r in current if "lot" in r and r["signal_date"]]
    items = [f"<li>{_esc(SIGNAL_MARK)}: product {_esc(r['product'])}, "
             f"{_esc(labels.get(r['metric'], r['metric']))} (last signal {r['signal_date']})"
             "</li>" for r in flagged_products]
    items += [f"<li>{_esc(SIGNAL_MARK)}: cement lot {_esc(r['lot'])} ({_esc(r['product'])}), "
              f"{_esc(labels.get(r['metric'], r['metric']))}, p = {r['p_value']:.1g}</li>"
              for r in flagged_lots]
    out.append(f"<ul>{''.join(items)}</ul>" if items else
               "<p>No product or cement lot signalled.</p>")
    out.append("<p><a href='devices.html'>Devices and cement lots: every product against the "
               "others, and the cement lots</a>. Operator learning curves are confidential to "
               "each site's clinical lead and are not part of this report "
               "(<code>kyphowatch beyond-report</code>).</p>")
    return "".join(out)


# -- the confidential operator pages -------------------------------------------------------

def operators_page(site_id: str, operators: list[dict], labels: dict[str, str]) -> str:
    """Return one site's confidential operator page (pseudonyms only)."""
    rows = []
    for o in operators:
        rare = o["method"] == "rare"
        flag = " class='flag'" if o["signal_date"] else ""
        strength = _strength(o["statistic"], o["threshold"], rare)
        if o["signal_date"] and o["signal_procedure"]:
            strength = f"at the operator's procedure {o['signal_procedure']}; {strength}"
        rows.append(
            f"<tr{flag} id='op-{_esc(o['operator'])}-{_esc(o['metric'])}'>"
            f"<th scope='row'>{_esc(o['operator'])}</th>"
            f"<td>{_esc(labels.get(o['metric'], o['metric']))}</td>"
            f"<td>{_esc(OPERATOR_METHODS.get(o['method'], o['method']))}</td>"
            + _status(o, "last signal", strength)
            + f"<td class='num'>{o['procedures']}</td><td class='num'>{o['events']}</td>"
            f"<td class='num'>{_rate(o['events'], o['procedures'])}</td>"
            + _num_td(o["expected"]) + f"<td>{_esc(o['first_procedure_date'])}</td></tr>")
    flagged = sorted({o["operator"] for o in operators if o["signal_date"]})
    lead = (f"<p class='lead'>{len(flagged)} of {len({o['operator'] for o in operators})} "
            f"operators at {_esc(site_id)} signalled"
            + (f": {_esc(', '.join(flagged))}" if flagged else "") + ".</p>")
    return _standalone_page(f"Operators at {site_id} (confidential: the site's clinical lead)", (
        lead + "<p>Learning curves per operator pseudonym (OP- and ten hex digits of the "
        "keyed digest; map them back with the site's own key material, docs/keys.md). A "
        "signalled row asks for a review of the operator's cases and training (HTG108 "
        "recommendation 1.2); it is not a finding. Each curve starts at the operator's first "
        "procedure in the warehouse, with a head start so early problems show quickly. "
        "Each operator is compared with their colleagues at this site in the same quarter, so "
        "a problem the whole site shares is not put on one operator; an operator with no "
        "colleague here has no comparison (the site's own charts cover them). Thresholds "
        "come from the network false-alarm budget (docs/statistics.md section 9).</p>"
        + _table(["operator", "metric", "method", "status", "procedures", "events", "rate",
                  "expected events", "first procedure"], rows,
                 f"Operators at {site_id}, signalled rows marked")))


def _labels_and_rare(settings: Settings) -> tuple[str, dict[str, str], set[str]]:
    from pipelines.surveillance.profile import load_profile

    profile = load_profile(settings.profile_path)
    return (profile.name, {m.id: m.label for m in profile.metrics},
            {m.id for m in profile.metrics if m.alarm is not None and m.alarm.method == "rare"})


def write_beyond_pages(settings: Settings, out_dir: Path) -> dict[str, Any]:
    """Write ``devices.html`` (and its CSVs) and ``operators/<SITE>.html``; return what was
    written."""
    from pipelines.db import require_warehouse

    require_warehouse(settings.db_url)
    profile_name, labels, rare = _labels_and_rare(settings)
    stored = read_beyond(settings, profile_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_devices(stored["products"], stored["lots"], labels, rare,
                                     page=_standalone_page).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    by_site: dict[str, list[dict]] = {}
    for row in stored["operators"]:
        by_site.setdefault(row["site_id"], []).append(row)
    (out_dir / "operators").mkdir(exist_ok=True)
    for site_id, rows in by_site.items():
        if not SITE_RE.fullmatch(site_id):
            continue  # it becomes a file name: never write outside the folder
        (out_dir / "operators" / f"{site_id}.html").write_text(
            operators_page(site_id, rows, labels), encoding="utf-8")
    return {"devices": str(out_dir / "devices.html"), "operator_pages": len(by_site),
            "products": len(stored["products"]), "lots": len(stored["lots"])}


def _handle(args: argparse.Namespace) -> int:
    from pipelines.db import require_warehouse

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    prepare_output_directory(args.out)
    result = write_beyond_pages(settings, args.out)
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``beyond-report`` to the ``kyphowatch`` parser."""
    parser = subparsers.add_parser(
        "beyond-report", help="pages for products, cement lots and (confidential) operators")
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", type=output_directory, default="var/beyond",
                        help="output directory")
    parser.set_defaults(handler=_handle)

