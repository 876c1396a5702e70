"""The report web app (``pipelines.report.app``) with FastAPI's TestClient, no Airflow.

A hand-made report directory of the published shape: two dated report directories, a
``latest`` symlink to the newer one, and some things that must never be served (a file
outside the directory, a symlink escaping it, a hidden temporary link, a Python file).
"""

from __future__ import annotations

import json

import pytest
from fastapi import Depends, HTTPException, Request
from fastapi.testclient import TestClient

from pipelines.report.app import CONTENT_SECURITY_POLICY, create_report_app

PAGE = "<!doctype html><title>{title}</title><svg width='40' height='20'><rect/></svg>"


@pytest.fixture
def report_dir(tmp_path):
    root = tmp_path / "reports"
    for day in ("2024-05-31", "2024-06-30"):
        (root / day / "sites").mkdir(parents=True)
        (root / day / "index.html").write_text(PAGE.format(title=day))
        (root / day / "sites" / "S004.html").write_text(PAGE.format(title=f"S004 {day}"))
        (root / day / "report.json").write_text(json.dumps({"as_of": day}))
        (root / day / "chart.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
        (root / day / "chart.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (root / day / "signals.csv").write_text("site,metric\nS004,cement_leak\n")
        (root / day / "notes.py").write_text("print('never served')")
    (root / "latest").symlink_to("2024-06-30")
    (root / ".latest.tmp").symlink_to("2024-05-31")
    (tmp_path / "secret.html").write_text("outside the report directory")
    (root / "2024-06-30" / "escape.html").symlink_to(tmp_path / "secret.html")
    (root / "outside").symlink_to(tmp_path)
    return root


@pytest.fixture
def client(report_dir):
    return TestClient(create_report_app(report_dir), follow_redirects=False)


def test_root_redirects_to_the_latest_index(client):
    response = client.get("/")
    assert response.status_code == 307
    assert response.headers["location"] == "latest/index.html"
    followed = client.get("/", follow_redirects=True)
    assert followed.status_code == 200
    assert "<title>2024-06-30</title>" in followed.text


def test_latest_symlink_and_dated_directories_are_served(client):
    assert "2024-06-30" in client.get("/latest/sites/S004.html").text
    assert "2024-05-31" in client.get("/2024-05-31/index.html").text


def test_a_directory_redirects_to_its_index(client):
    assert client.get("/latest/").headers["location"] == "index.html"
    assert client.get("/latest").headers["location"] == "latest/index.html"
    assert client.get("/2024-05-31/sites").headers["location"] == "sites/index.html"


@pytest.mark.parametrize(("path", "content_type"), [
    ("latest/index.html", "text/html; charset=utf-8"),
    ("latest/report.json", "application/json"),
    ("latest/chart.svg", "image/svg+xml"),
    ("latest/chart.png", "image/png"),
    ("latest/signals.csv", "text/csv; charset=utf-8"),
])  # fmt: skip
def test_allowed_types_have_their_content_type_and_security_headers(client, path, content_type):
    response = client.get("/" + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_policy_forbids_scripts_and_outside_resources():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert "script-src" not in directives  # falls back to default-src 'none'
    assert directives["img-src"] == "data: 'self'"
    assert directives["style-src"] == "'unsafe-inline'"


@pytest.mark.parametrize("path", [
    "/latest/notes.py",                 # type not allowed
    "/latest/missing.html",             # does not exist
    "/latest/escape.html",              # symlink to a file outside the directory
    "/outside/secret.html",             # symlink to a directory outside
    "/.latest.tmp/index.html",          # hidden component (a half-made link)
    "/../secret.html",
    "/latest/../../secret.html",
    "/..%2fsecret.html",
    "/latest/..%2f..%2fsecret.html",
    "/%2e%2e/secret.html",
    "//etc/passwd",
    "/%2fetc/passwd",
    "/..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
    "/latest/index.html%00.png",
    "/latest\\..\\..\\secret.html",
    "/docs",                            # no interactive API docs (they load scripts)
    "/openapi.json",
])  # fmt: skip
def test_anything_else_is_404_with_the_same_headers(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.text
    assert "outside the report directory" not in response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_missing_report_directory_is_404_not_an_error(tmp_path):
    client = TestClient(create_report_app(tmp_path / "not-yet"), follow_redirects=False)
    assert client.get("/latest/index.html").status_code == 404
    assert client.get("/").status_code == 307


def test_head_and_only_safe_methods(client):
    assert client.head("/latest/index.html").status_code == 200
    assert client.post("/latest/index.html").status_code == 405


def test_dependencies_guard_every_route(report_dir):
    def require_token(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer ok":
            raise HTTPException(status_code=401)

    client = TestClient(create_report_app(report_dir, dependencies=[Depends(require_token)]),
                        follow_redirects=False)  # fmt: skip
    for path in ("/", "/latest/index.html", "/nothing-here.html"):
        assert client.get(path).status_code == 401
    assert client.get("/latest/index.html", headers={"authorization": "Bearer ok"}).status_code == 200
