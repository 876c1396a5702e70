"""``kyphowatch report``: the static HTML evidence report for analysts and safety teams.

Layout of a report directory::

    index.html           overview: one row per site, most severe first; each flagged cell
                         states level, since, strength and rate against the guidance range
    funnels.html         funnel plots per metric: significant / outside / in control
    devices.html         products against the other products of their kind, cement lots
                         (operator pages are confidential: ``kyphowatch beyond-report``)
    methods.html         baselines with their HTG108 sections, thresholds and their designed
                         false-alarm rates, risk models and their fit, profile and as-of date
    sites/<SITE>.html    per site: a sentence per flagged metric, then VLAD, p-chart, CUSUMs
                         and a highlighted funnel per metric, recent and whole O/E, case mix,
                         recent complications, signals, alerts and their history
    *.csv                the data behind the network's charts, linked under them; the
                         CUSUM paths of every site (series-<chart>.csv), which the site
                         pages' charts link to; a site page's short tables are inside it
    report.json          the overview as data (the same rows as ``kyphowatch sites --json``)

One module per part: :mod:`.overview`, :mod:`.site`, :mod:`.funnels`, :mod:`.methods`
(pages), :mod:`.charts` and :mod:`.svgplot` (charts), :mod:`.data` (what a report reads),
:mod:`.beyond` (devices page, confidential operator pages), :mod:`.publish` (writing,
publishing, the ``report`` command), :mod:`.app` (the web app the Airflow plugin serves). This module re-exports what ``dags/``, the CLI and tests import.

Why it is built this way: the report is opened from disk, from an e-mail or through the
Airflow plugin, so every page is static HTML with inline SVG charts (see
:mod:`pipelines.report.svgplot`), no script and nothing fetched from the network. Every number on a
site page comes from :meth:`pipelines.evidence.Evidence.site_payload`, the same call behind
``kyphowatch site --json``; the per-site figures carry ``data-field`` attributes so that
agreement is tested. No patient or operator reference is ever read: the engine turns
patient digests into counters, case mix is aggregated in SQL, and the data-quality section
shows counts and reasons, never quarantined raw values.

:func:`publish_report` renders into ``<report_dir>/builds/<as_of>-<stamp>/`` and then swaps
two symlinks, ``<report_dir>/<as_of>`` and (when this is the newest date)
``<report_dir>/latest``, so a reader (or the Airflow plugin) never sees a half-written
report, a republished date replaces its pages all at once, and a backfill for an old date
never replaces a newer ``latest``. Old dated reports are pruned (``KYPHOWATCH_REPORT_KEEP``).
"""

from pipelines.report.charts import cusum_svg, funnel_svg, pchart_svg, tte_svg
from pipelines.report.common import METHOD_NAMES, STATUS_MARK
from pipelines.report.data import ReportData, data_quality
from pipelines.report.publish import (
    publish_report,
    register,
    render_report,
    write_report,
)

__all__ = [
    "METHOD_NAMES", "STATUS_MARK", "ReportData", "cusum_svg", "data_quality", "funnel_svg",
    "pchart_svg", "publish_report", "register", "render_report", "tte_svg", "write_report",
]
