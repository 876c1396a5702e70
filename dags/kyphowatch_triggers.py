"""Event trigger that announces finished extract files in the landing directory.

Airflow's ``AssetWatcher`` only accepts subclasses of ``BaseEventTrigger``. The standard
provider's ``FileTrigger`` is a plain ``BaseTrigger`` (and fires once, then ends), and
``FileDeleteTrigger`` deletes the file it finds -- we need the file for ingest -- so neither
fits. :class:`LandingFilesTrigger` polls the directory for as long as the triggerer runs and
fires one event whenever files appear (or change) that have settled: complete names,
unchanged for ``min_age_seconds`` (:func:`pipelines.landing.stable_files`). Between polls it
sleeps ``poke_interval`` or until the next waiting file settles, whichever is sooner, so a
file is announced about ``min_age_seconds`` after its last write, not up to a poll later.

Nothing is stranded. Every run of ``kyphowatch_ingest`` moves each file it processed out of
landing (archive or rejected), so a file that is *still* in landing has not been dealt with
-- typically because ingest failed (warehouse unreachable) and exhausted its retries. The
trigger therefore announces a file again once it has sat in landing for
``reannounce_seconds`` since its last announcement (default 120 s,
``KYPHOWATCH_LANDING_REANNOUNCE_SECONDS``): when the cause is fixed, the files are picked up
within that time instead of waiting for the 02:00 safety-net run. The memory itself is the
landing directory (durable by construction); the in-memory map only holds when each file
was last announced, so a triggerer restart announces the files still waiting once more,
which at worst starts an ingest run that finds them already loaded (ingest is idempotent).

The triggerer imports this module by its class path ``kyphowatch_triggers.LandingFilesTrigger``,
so the DAGs folder and the repository root must be on the triggerer's ``PYTHONPATH``
(docs/operations.md). Nothing heavy is imported until the trigger runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

# woken this much after a file's computed settle time, so file-system timestamp rounding
# never makes it look a hair too young and cost a second sleep
SETTLE_MARGIN_SECONDS = 0.2


def _settled(directory: str, min_age_seconds: float
             ) -> tuple[dict[str, tuple[int, int]], float | None]:  # fmt: skip
    """Return the settled files (name -> size, mtime) and the seconds until the next settles."""
    from pathlib import Path

    from pipelines.landing import seconds_until_settled, stable_files

    found = {}
    for path in stable_files(Path(directory), min_age_seconds):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[path.name] = (stat.st_size, stat.st_mtime_ns)
    return found, seconds_until_settled(Path(directory), min_age_seconds)


class LandingFilesTrigger(BaseEventTrigger):
    """Fire an event each time settled extract files show up in ``directory``."""

    def __init__(self, directory: str, min_age_seconds: float = 30.0,
                 poke_interval: float = 10.0, reannounce_seconds: float = 120.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.directory = str(directory)
        self.min_age_seconds = float(min_age_seconds)
        self.poke_interval = float(poke_interval)
        self.reannounce_seconds = float(reannounce_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the arguments that rebuild this trigger."""
        return (
            "kyphowatch_triggers.LandingFilesTrigger",
            {
                "directory": self.directory,
                "min_age_seconds": self.min_age_seconds,
                "poke_interval": self.poke_interval,
                "reannounce_seconds": self.reannounce_seconds,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll forever; yield an event listing new files and files still waiting."""
        # name -> (size, mtime_ns, monotonic time of the last announcement)
        announced: dict[str, tuple[int, int, float]] = {}
        while True:
            settled, next_settles = await asyncio.to_thread(
                _settled, self.directory, self.min_age_seconds)  # fmt: skip
            now = time.monotonic()
            # forget files that left landing, so the same name dropped again fires again
            announced = {name: seen for name, seen in announced.items() if name in settled}
            new = sorted(name for name, sig in settled.items()
                         if announced.get(name, (None, None, 0.0))[:2] != sig)  # fmt: skip
            waiting = sorted(
                name for name in settled
                if name not in new and now - announced[name][2] >= self.reannounce_seconds
            )
            if new or waiting:
                for name in (*new, *waiting):
                    announced[name] = (*settled[name], now)
                self.log.info("landing %s: %d new file(s) %s, %d still waiting %s",
                              self.directory, len(new), new, len(waiting), waiting)  # fmt: skip
                yield TriggerEvent({"directory": self.directory, "files": new,
                                    "waiting": waiting})  # fmt: skip
            # wake when the next waiting file settles, not at the next poll: up to a poll
            # interval less latency, same settle rule (a file still written is not settled)
            pause = self.poke_interval
            if next_settles is not None:
                pause = min(pause, next_settles + SETTLE_MARGIN_SECONDS)
            await asyncio.sleep(pause)
