"""``kyphowatch report``: the static HTML evidence report for analysts and safety teams.

Layout of a report directory::

    index.html           overview: status grid (sites x metrics), open alerts, data quality
    funnels.html         a funnel plot per metric, flagged sites labelled
    methods.html         baselines with their HTG108 sections, thresholds and their designed
                         false-alarm rates, risk models and their fit, profile and as-of date
    sites/<SITE>.html    per site: CUSUM and risk-adjusted CUSUM over time, quarterly
                         p-chart, observed versus expected, case mix against the network,
                         recent complications, signals, alerts and their history
    report.json          the overview as data (the same rows as ``kyphowatch sites --json``)

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
