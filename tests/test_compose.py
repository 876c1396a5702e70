"""docker-compose.yml: structure checks, since Docker cannot run on the development machines.

What is checked: the topology of the official Airflow compose file (CeleryExecutor + Redis,
scheduler, dag-processor, triggerer, api-server, scalable workers, init job, logs volume),
a healthcheck on every long-running service, no ``dockerfile_inline`` (Debian's
docker-compose rejects it), no literal secrets, one secret per role, every ``${VAR}``
documented in ``.env.example``, every ``KYPHOWATCH_*`` variable one that kyphowatch reads,
and -- where a Compose v2 binary exists -- ``docker compose config`` accepts the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
AIRFLOW = ("api-server", "scheduler", "dag-processor", "triggerer", "airflow-worker")
ONE_SHOT = {"airflow-init"}
ROLE_SECRETS = ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "KYPHOWATCH_OWNER_PASSWORD",
                "KYPHOWATCH_LOADER_PASSWORD", "KYPHOWATCH_ANALYST_PASSWORD")  # fmt: skip


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    return {name: value for name, value in pairs}


def test_topology_follows_the_official_airflow_compose():
    assert {"postgres", "redis", "mailpit", "airflow-init", *AIRFLOW} <= set(SERVICES)
    for name in AIRFLOW:
        service = SERVICES[name]
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "redis://redis:6379" in service["environment"]["AIRFLOW__CELERY__BROKER_URL"]
        assert service["depends_on"]["airflow-init"]["condition"] == \
            "service_completed_successfully"
        mounts = [str(v) for v in service["volumes"]]
        assert any(v.endswith(":/opt/airflow/logs") for v in mounts), name
        assert any(v.endswith(":/data") for v in mounts), name  # one shared data volume
    assert SERVICES["airflow-worker"]["command"] == "airflow celery worker"
    # scalable with --scale: no fixed container name, no published host port
    assert "container_name" not in SERVICES["airflow-worker"]
    assert "ports" not in SERVICES["airflow-worker"]
    assert {"airflow-logs", "pgdata"} <= set(COMPOSE["volumes"])


def test_every_long_running_service_has_a_healthcheck():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name


def test_no_inline_dockerfile_and_the_build_files_exist():
    text = (REPO / "docker-compose.yml").read_text()
    assert "dockerfile_inline" not in text
    build = SERVICES["scheduler"]["build"]
    dockerfile = (REPO / build["context"] / build["dockerfile"]).read_text()
    assert "pip install -c constraints.txt ." in dockerfile  # the wheel carries the data files
    assert "PYTHONPATH=/opt/kyphowatch/dags" in dockerfile  # the triggerer finds the trigger
    assert (REPO / "deploy" / "postgres-init.sh").is_file()


def test_init_job_migrates_creates_the_admin_and_unpauses_the_dags():
    command = "\n".join(SERVICES["airflow-init"]["command"])
    assert "airflow db migrate" in command
    assert "AIRFLOW_ADMIN_PASSWORD" in command and "passwords.json" in command
    assert "kyphowatch_owner" in command and "migrate" in command
    for dag_id in ("kyphowatch_ingest", "kyphowatch_monitor", "kyphowatch_alerts"):
        assert dag_id in command
    assert "airflow dags unpause" in command


def test_separate_secrets_per_role_and_none_literal():
    postgres_env = SERVICES["postgres"]["environment"]
    for name in ROLE_SECRETS:
        assert postgres_env[name] == f"${{{name}}}", name
    env = SERVICES["scheduler"]["environment"]
    assert "kyphowatch_loader:${KYPHOWATCH_LOADER_PASSWORD}@" in \
        env["AIRFLOW_CONN_KYPHOWATCH_WAREHOUSE"]
    assert "airflow:${AIRFLOW_DB_PASSWORD}@" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    for service in SERVICES.values():
        for name, value in (service.get("environment") or {}).items():
            if any(word in name for word in ("PASSWORD", "KEY", "SECRET", "CONN")):
                assert "${" in str(value) or not re.search(r":[^@/]+@", str(value)), name
    assert "smtp://mailpit:1025" in env["AIRFLOW_CONN_KYPHOWATCH_SMTP"]


def test_every_variable_is_documented_and_read():
    text = (REPO / "docker-compose.yml").read_text()
    example = _env_example()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::-[^}]*)?\}", text))
    assert referenced <= set(example), referenced - set(example)
    for name in ROLE_SECRETS:
        assert example[name] == "", name  # no sample secret that could be kept by mistake
    readers = "".join(path.read_text() for path in (
        REPO / "pipelines" / "settings.py", REPO / "deploy" / "postgres-init.sh"))  # fmt: skip
    # the role secrets are checked above; deploy/postgres-init.sh reads them
    used = {name for service in SERVICES.values()
            for name in (service.get("environment") or {})
            if name.startswith("KYPHOWATCH_") and name not in ROLE_SECRETS}
    assert used, "no KYPHOWATCH_ variables found"
    assert {name for name in used if name not in readers} == set()


def test_docker_compose_config_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True) \
        if docker else None  # fmt: skip
    if version is None or version.returncode != 0:
        pytest.skip("no Compose v2 here (`docker compose` is not installed); "
                    "the structural checks above stand in for `docker compose config`")
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(f"{name}=x{index}" for index, name in
                                  enumerate(_env_example())) + "\n")  # fmt: skip
    proc = subprocess.run([docker, "compose", "--env-file", str(env_file), "-f",
                           str(REPO / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
