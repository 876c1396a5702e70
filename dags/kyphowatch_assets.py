"""The Assets that connect the kyphowatch DAGs, declared once.

* ``LANDING`` -- extract files in the landing directory; watched by
  :class:`kyphowatch_triggers.LandingFilesTrigger`, so a dropped file starts
  ``kyphowatch_ingest`` within seconds (no polling DAG runs).
* ``PROCEDURES`` / ``COMPLICATIONS`` -- warehouse tables; updated by ``kyphowatch_ingest``
  only when a file actually changed them; they schedule ``kyphowatch_monitor``.
* ``SIGNALS`` -- the signal table; updated by ``kyphowatch_monitor``; schedules
  ``kyphowatch_alerts``.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher
from kyphowatch_config import (
    landing_dir,
    landing_min_age_seconds,
    landing_poll_seconds,
    landing_reannounce_seconds,
)
from kyphowatch_triggers import LandingFilesTrigger

LANDING = Asset(
    name="kyphowatch_landing",
    uri="file://" + str(landing_dir().resolve()),
    watchers=[
        AssetWatcher(
            name="kyphowatch_landing_watcher",
            trigger=LandingFilesTrigger(
                directory=str(landing_dir().resolve()),
                min_age_seconds=landing_min_age_seconds(),
                poke_interval=landing_poll_seconds(),
                reannounce_seconds=landing_reannounce_seconds(),
            ),
        )
    ],
)
PROCEDURES = Asset(name="kyphowatch_procedures", uri="kyphowatch://warehouse/procedures")
COMPLICATIONS = Asset(name="kyphowatch_complications", uri="kyphowatch://warehouse/complications")
SIGNALS = Asset(name="kyphowatch_signals", uri="kyphowatch://warehouse/signals")
