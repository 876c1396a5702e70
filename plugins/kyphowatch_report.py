"""Airflow plugin: the published kyphowatch report, served by the Airflow API server.

Registers :func:`pipelines.report.app.create_report_app` under ``/kyphowatch/report`` (``/``
redirects to ``latest/index.html``) and a "Safety report" entry in the Airflow UI's
navigation, which shows the report inside the UI.

Authentication: Airflow mounts plugin FastAPI apps with ``app.mount()``, so they inherit
none of the core API's auth dependencies. This plugin therefore adds Airflow's own
``requires_access_view(AccessView.WEBSITE)`` dependency to every route: the caller needs
the JWT that the Airflow UI login sets (the ``_token`` cookie, or an
``Authorization: Bearer`` header) and permission to use the UI, otherwise 401/403.

The report directory is ``KYPHOWATCH_REPORT_DIR`` (see ``pipelines/settings.py``), read
when the API server loads the plugin; files are looked up on every request, so reports
published later (and the moving ``latest`` link) are served without a restart.
Enable the plugin with ``AIRFLOW__CORE__PLUGINS_FOLDER`` pointing to this folder.
"""

from __future__ import annotations

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import requires_access_view
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends

from pipelines.report.app import create_report_app
from pipelines.settings import load_settings

URL_PREFIX = "/kyphowatch/report"

report_app = create_report_app(
    load_settings().report_dir,
    dependencies=[Depends(requires_access_view(AccessView.WEBSITE))],
)


class KyphowatchReportPlugin(AirflowPlugin):
    """Serve the HTML report and link to it from the Airflow UI navigation."""

    name = "kyphowatch_report"
    fastapi_apps = [{"app": report_app, "url_prefix": URL_PREFIX, "name": "kyphowatch report"}]
    external_views = [
        {
            "name": "Safety report",
            # relative to the UI's base URL, so it works behind a path prefix
            "href": URL_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "url_route": "kyphowatch-report",
        }
    ]
