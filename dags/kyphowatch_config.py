"""Build kyphowatch ``Settings`` inside an Airflow task from connections, variables and env.

This is the only module that touches Airflow connections and variables. Every lookup
happens when a task runs (never at DAG parse time), and anything not defined in Airflow
falls back to the ``KYPHOWATCH_*`` environment that :func:`pipelines.settings.load_settings`
reads, so the same DAGs run in production (connections in a secrets backend) and in the
demo/tests (plain environment).

Connections (all optional; an ``extra`` field ``{"url": ...}`` always wins)
* ``kyphowatch_warehouse`` -- the warehouse; ``postgres`` type, or ``extra.url`` with any
  SQLAlchemy URL (e.g. ``sqlite:////data/kyphowatch.db``).
* ``kyphowatch_smtp`` -- ``smtp`` type: host, port, login, password.
* ``kyphowatch_webhook`` -- ``http`` type: host holding the full URL, or ``extra.url``.

Variables (optional): ``kyphowatch_pseudonym_key``, ``kyphowatch_archive_dir``,
``kyphowatch_rejected_dir``, ``kyphowatch_recipients_safety``, ``kyphowatch_recipients_data``.

The landing directory comes from ``KYPHOWATCH_LANDING_DIR`` only (through
``pipelines.settings``, a light import): the landing watcher is built when the DAG file is
parsed, and a Variable lookup there would hit the metadata database on every parse (and
could disagree with the task side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pipelines.settings import load_settings


@dataclass(frozen=True)
class LandingDirs:
    """Where extracts arrive, where they are archived, where rejected ones go."""

    landing: Path
    archive: Path
    rejected: Path
    min_age_seconds: float


def landing_dir() -> Path:
    """Return the landing directory (environment only; safe at parse time)."""
    return load_settings().landing_dir


def landing_min_age_seconds() -> float:
    """Return how long a file must be unchanged before pick-up."""
    return load_settings().landing_min_age_seconds


def landing_poll_seconds() -> float:
    """Return the landing watcher's polling interval."""
    return load_settings().landing_poll_seconds


def landing_reannounce_seconds() -> float:
    """Return after how long a file still waiting in landing is announced again."""
    return load_settings().landing_reannounce_seconds


def _variable(key: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return str(value) if value not in (None, "") else None


def _connection(conn_id: str):
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _userinfo(conn) -> str:
    if not conn.login:
        return ""
    password = f":{quote(conn.password, safe='')}" if conn.password else ""
    return f"{quote(conn.login, safe='')}{password}@"


def warehouse_url(conn) -> str:
    """Return the SQLAlchemy URL described by a ``kyphowatch_warehouse`` connection."""
    if conn.extra_dejson.get("url"):
        return conn.extra_dejson["url"]
    if conn.conn_type in {"postgres", "postgresql"}:
        port = f":{conn.port}" if conn.port else ""
        return f"postgresql+psycopg://{_userinfo(conn)}{conn.host}{port}/{conn.schema or ''}"
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    raise ValueError(f"kyphowatch_warehouse: unsupported conn_type {conn.conn_type!r}; "
                     "set extra {\"url\": \"<SQLAlchemy URL>\"}")


def smtp_url(conn) -> str:
    """Return the ``smtp://`` URL described by a ``kyphowatch_smtp`` connection."""
    if conn.extra_dejson.get("url"):
        return conn.extra_dejson["url"]
    scheme = "smtps" if conn.extra_dejson.get("ssl") else "smtp"
    return f"{scheme}://{_userinfo(conn)}{conn.host}:{conn.port or 25}"


def webhook_url(conn) -> str:
    """Return the URL described by a ``kyphowatch_webhook`` connection."""
    if conn.extra_dejson.get("url"):
        return conn.extra_dejson["url"]
    if conn.host and conn.host.startswith(("http://", "https://")):
        return conn.host
    port = f":{conn.port}" if conn.port else ""
    return f"{conn.schema or 'https'}://{conn.host}{port}"


def build_settings():
    """Return ``Settings`` from Airflow connections/variables, falling back to the environment."""
    overrides: dict[str, object] = {}
    for conn_id, field, to_url in (
        ("kyphowatch_warehouse", "db_url", warehouse_url),
        ("kyphowatch_smtp", "smtp_url", smtp_url),
        ("kyphowatch_webhook", "webhook_url", webhook_url),
    ):
        conn = _connection(conn_id)
        if conn is not None:
            overrides[field] = to_url(conn)
    key = _variable("kyphowatch_pseudonym_key")
    if key:
        overrides["pseudonym_key"] = key
    for name in ("recipients_safety", "recipients_data"):
        value = _variable(f"kyphowatch_{name}")
        if value:
            overrides[name] = tuple(part.strip() for part in value.split(",") if part.strip())
    return load_settings(**overrides)


def landing_dirs() -> LandingDirs:
    """Return the landing, archive and rejected directories for this deployment."""
    settings = load_settings()
    archive = _variable("kyphowatch_archive_dir")
    rejected = _variable("kyphowatch_rejected_dir")
    return LandingDirs(
        landing=settings.landing_dir,
        archive=Path(archive) if archive else settings.archive_dir,
        rejected=Path(rejected) if rejected else settings.rejected_dir,
        min_age_seconds=settings.landing_min_age_seconds,
    )
