"""Build hook: ship ``expectations/``, ``profiles/``, ``reference/`` and ``sql/`` inside the wheel.

They stay at the repository root (where the design keeps and reviews them); a wheel copies
them to ``pipelines/_bundled/`` so an installed package finds them through
``importlib.resources`` (``pipelines.settings.bundled_path``). Editable installs read the
repository root directly, so nothing is copied (and nothing can go stale) there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_DIRS = ("expectations", "profiles", "reference", "sql")
DATA_SUFFIXES = (".json", ".yaml", ".yml", ".sql")


class BuildPyWithData(build_py):
    """``build_py`` that also copies the data directories into ``pipelines/_bundled``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "pipelines" / "_bundled"
        for name in DATA_DIRS:
            for source in sorted((ROOT / name).rglob("*")):
                if source.is_file() and source.suffix in DATA_SUFFIXES:
                    destination = target / source.relative_to(ROOT)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, destination)  # real copies: no symlinks in a wheel
        (target / "__init__.py").write_text('"""Data files shipped with kyphowatch."""\n')


setup(cmdclass={"build_py": BuildPyWithData})
