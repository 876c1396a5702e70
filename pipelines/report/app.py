"""A small, read-only web app that serves the published HTML report.

``create_report_app(report_dir)`` returns a FastAPI application that serves the static
report directory written by :func:`pipelines.report.publish_report`::

    report_dir/
        2024-06-30/index.html, funnels.html, methods.html, sites/S004.html, report.json
        latest -> 2024-06-30          (symlink, repointed atomically on each publish)

``GET /`` redirects to ``latest/index.html``; ``GET /{path}`` serves a file under
``report_dir`` and nothing else:

* the path is resolved (symlinks included) and refused with 404 unless it stays inside
  ``report_dir`` -- ``latest`` is served because it points to a sibling directory;
* hidden path components (``.something``, such as a half-written temporary symlink) are
  refused;
* only ``.html``, ``.json``, ``.svg``, ``.png`` and ``.csv`` are served, each with its own
  content type; everything else is 404;
* every response carries ``Cache-Control: no-store`` (``latest`` moves) and a strict
  ``Content-Security-Policy``: reports contain no scripts and load nothing from outside, so
  the browser is told to run no script and fetch nothing but same-origin images.

The app knows nothing about Airflow (``pipelines`` never imports it): authentication is
passed in as FastAPI ``dependencies`` by the Airflow plugin (``plugins/kyphowatch_report.py``),
which applies them to every route.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from fastapi import FastAPI, HTTPException, Request
from fastapi.params import Depends
from fastapi.responses import FileResponse, RedirectResponse

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".csv": "text/csv; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LATEST_INDEX = "latest/index.html"


def resolve_report_path(report_dir: Path, path: str) -> Path | None:
    """Return the file or directory that ``path`` names inside ``report_dir``, else None.

    None means "not found" to the caller: a path that escapes ``report_dir`` (``..``, an
    absolute path, a symlink pointing outside), contains a hidden component or a NUL byte,
    or does not exist.
    """
    if "\x00" in path or "\\" in path:
        return None
    parts = [part for part in PurePosixPath(path).parts if part != "/"]
    if path.startswith("/") or any(part.startswith(".") for part in parts):
        return None
    root = report_dir.resolve()
    try:
        candidate = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing file, symlink loop
        return None
    if candidate != root and not candidate.is_relative_to(root):
        return None
    return candidate


def create_report_app(report_dir: Path, dependencies: Sequence[Depends] | None = None) -> FastAPI:
    """Build the app serving ``report_dir``; ``dependencies`` guard every route (auth)."""
    report_dir = Path(report_dir)
    app = FastAPI(
        title="kyphowatch report",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=list(dependencies or []),
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> RedirectResponse:
        # Relative, so it works under any mount prefix and behind a path-rewriting proxy.
        return RedirectResponse(LATEST_INDEX, status_code=307)

    @app.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def serve(path: str):
        target = resolve_report_path(report_dir, path)
        if target is None:
            raise HTTPException(status_code=404)
        if target.is_dir():
            # a directory (``latest/``): its index page, relative to the requested URL
            name = path.rstrip("/").rsplit("/", 1)[-1]
            location = "index.html" if path.endswith("/") else f"{name}/index.html"
            return RedirectResponse(location, status_code=307)
        content_type = CONTENT_TYPES.get(target.suffix.lower())
        if content_type is None or not target.is_file():
            raise HTTPException(status_code=404)
        return FileResponse(target, media_type=content_type)

    return app
