"""Event trigger that announces finished extract files in the landing directory.

Airflow's ``AssetWatcher`` only accepts subclasses of ``BaseEventTrigger``. The standard
provider's ``FileTrigger`` is a plain ``BaseTrigger`` (and fires once, then ends), and
``FileDeleteTrigger`` deletes the file it finds -- we need the file for ingest -- so neither
fits. :class:`LandingFilesTrigger` polls the directory for as long as the triggerer runs and
fires one event whenever files appear (or change) that have settled: complete names,
unchanged for ``min_age_seconds`` (:func:`pipelines.landing.stable_files`).

It remembers what it announced (name, size, mtime) only in memory: after a triggerer
restart the files still in landing are announced once more, which at worst starts an
ingest run that finds them already loaded (ingest is idempotent).

The triggerer imports this module by its class path ``kyphowatch_triggers.LandingFilesTrigger``,
so the DAGs folder and the repository root must be on the triggerer's ``PYTHONPATH``
(docs/operations.md). Nothing heavy is imported until the trigger runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent


def _settled(directory: str, min_age_seconds: float) -> dict[str, tuple[int, int]]:
    from pathlib import Path

    from pipelines.landing import stable_files

    found = {}
    for path in stable_files(Path(directory), min_age_seconds):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[path.name] = (stat.st_size, stat.st_mtime_ns)
    return found


class LandingFilesTrigger(BaseEventTrigger):
    """Fire an event each time settled extract files show up in ``directory``."""

    def __init__(self, directory: str, min_age_seconds: float = 30.0,
                 poke_interval: float = 10.0, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.directory = str(directory)
        self.min_age_seconds = float(min_age_seconds)
        self.poke_interval = float(poke_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the arguments that rebuild this trigger."""
        return (
            "kyphowatch_triggers.LandingFilesTrigger",
            {
                "directory": self.directory,
                "min_age_seconds": self.min_age_seconds,
                "poke_interval": self.poke_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll forever; yield an event listing the newly settled files."""
        announced: dict[str, tuple[int, int]] = {}
        while True:
            settled = await asyncio.to_thread(_settled, self.directory, self.min_age_seconds)
            new = sorted(name for name, sig in settled.items() if announced.get(name) != sig)
            # forget files that left landing, so the same name dropped again fires again
            announced = {name: sig for name, sig in announced.items() if name in settled}
            if new:
                announced.update({name: settled[name] for name in new})
                self.log.info("landing %s: %d new file(s): %s", self.directory, len(new), new)
                yield TriggerEvent({"directory": self.directory, "files": new})
            await asyncio.sleep(self.poke_interval)
