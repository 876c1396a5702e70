"""Files that are not Python but still part of the product: compose topology, CI entry, README."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_has_the_production_topology_and_no_literal_secrets():
    # Docker cannot run on the development machines: this checks structure, not a start-up.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "airflow-init", "api-server", "scheduler", "dag-processor",
            "triggerer"} <= set(services)
    commands = {name: str(service.get("command", "")) for name, service in services.items()}
    for component in ("scheduler", "dag-processor", "triggerer", "api-server"):
        assert commands[component] == f"airflow {component}"
    env = compose["x-kyphowatch-env"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    for name, value in env.items():
        if any(word in name for word in ("PASSWORD", "KEY", "SECRET", "CONN")):
            assert "${" in str(value) or not re.search(r":[^@/]+@", str(value)), name
    assert "${KYPHOWATCH_PSEUDONYM_KEY}" in env["AIRFLOW_VAR_KYPHOWATCH_PSEUDONYM_KEY"]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
