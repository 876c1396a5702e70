"""A report stopped while its workers draw (Ctrl-C, SIGTERM) ends after their current chunk
of site pages instead of waiting for them to draw the rest (review, 2026-12-07)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.report import publish


class _Writer:
    def __init__(self) -> None:
        self.names: list[str] = []

    def write(self, relative: str, text: bytes) -> None:
        self.names.append(relative)


def test_workers_take_no_further_chunk_once_the_report_is_interrupted(tmp_path, monkeypatch):
    drawn = tmp_path / "drawn"
    drawn.mkdir()

    def slow_pages(data, site_ids, *, encoded=False):
        for site in site_ids:
            time.sleep(0.005)
            (drawn / site).touch()  # the worker is another process: count on disk
            yield f"sites/{site}.html", b""

    monkeypatch.setattr(publish, "_site_pages", slow_pages)
    monkeypatch.setattr(publish, "site_batches", lambda data: None)
    sites = [f"S{i:04d}" for i in range(400)]

    def network_pages_interrupted():
        deadline = time.monotonic() + 60
        while not any(drawn.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.005)  # until the worker has started drawing
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish._draw_sites_collector_off(object(), sites, _Writer(), 2,
                                          network_pages_interrupted)
    pages = len(list(Path(drawn).iterdir()))
    # the chunk it was drawing, perhaps a few more on a loaded machine; never the rest
    # (before the fix: all 400, the interrupted command waiting for them)
    assert 0 < pages < len(sites) // 2, pages
