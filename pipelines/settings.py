"""One place where kyphowatch reads its configuration.

Every other module receives a :class:`Settings` object (or a value taken from
one); nothing else reads ``os.environ``. Precedence for each value: an explicit
argument (for example the CLI ``--db`` flag), then the environment variable,
then the documented default.

Environment variables
---------------------
KYPHOWATCH_DB_URL
    SQLAlchemy URL of the warehouse. Default ``sqlite:///var/kyphowatch.db``.
KYPHOWATCH_PSEUDONYM_KEY
    Secret key for the HMAC that pseudonymises patient and operator references.
    Required, except in demo mode where a fixed, clearly-labelled demo key is used.
KYPHOWATCH_DEMO
    ``1`` to allow the demo key. Set only by ``make demo`` and the tests.
KYPHOWATCH_MAX_BAD_ROW_SHARE
    Share of bad rows (0-1) above which a whole file is rejected. Default 0.5.
KYPHOWATCH_CHUNK_ROWS
    Rows read per chunk when parsing an extract. Default 100000.
KYPHOWATCH_PROFILE
    Path of the guidance profile YAML. Default: the bundled HTG108 profile.
KYPHOWATCH_REPORT_DIR
    Where reports and charts are written. Default ``var/reports``.
KYPHOWATCH_REPORT_KEEP
    How many dated reports (one per as-of date) are kept; older ones are deleted when a
    report is published, never the one ``latest`` points to. Default 90.
KYPHOWATCH_ALERT_RECIPIENTS_SAFETY / KYPHOWATCH_ALERT_RECIPIENTS_DATA
    Comma-separated e-mail recipients for safety and data-quality alerts.
KYPHOWATCH_CLINICAL_LEADS
    Who receives a site's confidential training-review alerts (operator learning curves):
    ``SITE=address`` pairs separated by commas, a site repeated for several addresses, e.g.
    ``S001=lead@a.example,S002=lead@b.example``. A site without a lead gets no e-mail (the
    alert stays in ``alerts list``); training reviews never go to the webhook.
KYPHOWATCH_ALERT_RECIPIENTS_DEVICE
    Comma-separated recipients of device and cement-lot alerts. Default: the safety list.
KYPHOWATCH_SMTP_URL
    ``smtp://host:port`` (optionally ``smtp://user:pass@host:port``) for e-mail alerts.
KYPHOWATCH_WEBHOOK_URL
    URL that receives JSON alert posts.
KYPHOWATCH_REPORT_BASE_URL
    Base URL where the report directory is served, quoted in alerts as "where to look"
    (``<base>/latest/sites/<SITE>.html``); with the Airflow plugin that is
    ``http://<airflow-host>:8080/kyphowatch/report``.
KYPHOWATCH_LANDING_DIR / KYPHOWATCH_ARCHIVE_DIR / KYPHOWATCH_REJECTED_DIR
    Where extracts land, where loaded ones are archived, where rejected ones go.
    Defaults ``var/landing``, ``var/archive``, ``var/rejected``.
KYPHOWATCH_LANDING_MIN_AGE_SECONDS / KYPHOWATCH_LANDING_POLL_SECONDS
    How long a landed file must stay unchanged before pick-up (default 30) and how often
    the landing watcher looks (default 10).
KYPHOWATCH_LANDING_REANNOUNCE_SECONDS
    A file still in landing this long after it was announced (its ingest failed) is
    announced again, so it is picked up once the cause is fixed. Default 120.
KYPHOWATCH_HEARTBEAT_HOURS
    No extract received from any site for this many hours raises a data-quality alert
    (the watchdog). Default 72: a long weekend without files is not an alarm.
KYPHOWATCH_CHANNEL_OUTAGE_MINUTES
    An alert channel (SMTP or webhook) that has failed to deliver for this long raises an
    alert on the other channel. Default 30.
KYPHOWATCH_MAIL_FROM
    Sender of alert e-mails. Default ``kyphowatch <kyphowatch@localhost>``.
KYPHOWATCH_ALERT_QUARANTINE_SHARE
    A loaded file whose quarantined share of rows is above this raises a data-quality
    alert. Default 0.10.
KYPHOWATCH_SILENT_SITE_DAYS
    A site that used to send procedures and sent none for this many days raises a
    data-quality alert. Default 60.
KYPHOWATCH_INGEST_MAX_FILE_BYTES / KYPHOWATCH_INGEST_MAX_DECOMPRESSED_BYTES
    Largest extract file on disk (default 2 GiB) and largest decompressed content of a
    ``.gz`` extract (default 4 GiB); a larger file is rejected.
KYPHOWATCH_INGEST_MAX_COMPRESSION_RATIO
    A ``.gz`` extract whose decompressed bytes exceed this multiple of the compressed bytes
    read so far is rejected as a decompression bomb. Default 100.
KYPHOWATCH_INGEST_MAX_LINE_CHARS
    Longest line, and longest record spanning lines, in characters; checked while reading,
    before the line is held whole. Default 1048576.
KYPHOWATCH_INGEST_MAX_FIELDS
    A row with more fields than this rejects the file. Default 1000.
KYPHOWATCH_INGEST_MAX_ROWS
    Records (blank lines included) per file above which the file is rejected. Default
    20000000.
KYPHOWATCH_INGEST_MAX_SECONDS
    Wall-time budget for reading and validating one file. Default 1800.
KYPHOWATCH_QUARANTINE_PREVIEW_FIELDS
    A misshapen row is kept in quarantine as the keyed hashes of at most this many of its
    first fields. Default 16.
KYPHOWATCH_ALLOWED_OWNER_UIDS
    Comma-separated user ids whose files ingest accepts. Default: the process's own uid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.errors import ConfigError

DEFAULT_DB_URL = "sqlite:///var/kyphowatch.db"
# Used only when demo mode is on; printed as a warning whenever it is used.
DEMO_PSEUDONYM_KEY = "kyphowatch-demo-key-not-for-real-data"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


class ConfigurationError(ConfigError):
    """A required setting is missing or invalid; the message says which and how to fix it."""


BUNDLED_PACKAGE = "pipelines._bundled"


def bundled_path(relative: str) -> Path:
    """Return a data file shipped with kyphowatch (``expectations/``, ``profiles/``, ``sql/``).

    An installed wheel carries them as package data in ``pipelines/_bundled/`` (copied there
    by the build, ``setup.py``), found through :mod:`importlib.resources`; a source checkout
    or an editable install reads them from the repository root, where they are maintained.
    """
    from importlib import resources

    try:
        shipped = resources.files(BUNDLED_PACKAGE).joinpath(relative)
        if shipped.is_file() or shipped.is_dir():
            return Path(str(shipped))
    except ModuleNotFoundError:  # source tree: no _bundled copy
        pass
    return REPO_DIR / relative


_bundled = bundled_path


@dataclass(frozen=True)
class Settings:
    """Resolved configuration for one kyphowatch process."""

    db_url: str = DEFAULT_DB_URL
    pseudonym_key: str | None = None
    demo: bool = False
    max_bad_row_share: float = 0.5
    chunk_rows: int = 100_000
    profile_path: Path = field(default_factory=lambda: _bundled("profiles/htg108.yaml"))
    expectations_dir: Path = field(default_factory=lambda: _bundled("expectations"))
    sql_dir: Path = field(default_factory=lambda: _bundled("sql"))
    report_dir: Path = Path("var/reports")
    report_keep: int = 90
    run_keep_days: int = 90
    recipients_safety: tuple[str, ...] = ()
    recipients_data: tuple[str, ...] = ()
    recipients_device: tuple[str, ...] = ()
    clinical_leads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    smtp_url: str | None = None
    webhook_url: str | None = None
    report_base_url: str | None = None
    mail_from: str = "kyphowatch <kyphowatch@localhost>"
    landing_dir: Path = Path("var/landing")
    archive_dir: Path = Path("var/archive")
    rejected_dir: Path = Path("var/rejected")
    landing_min_age_seconds: float = 30.0
    landing_poll_seconds: float = 10.0
    landing_reannounce_seconds: float = 120.0
    heartbeat_hours: float = 72.0
    channel_outage_minutes: float = 30.0
    alert_quarantine_share: float = 0.10
    silent_site_days: int = 60
    # Hostile-input limits (issue 14); see docs/operations.md "Input limits".
    ingest_max_file_bytes: int = 2 * 1024**3
    ingest_max_decompressed_bytes: int = 4 * 1024**3
    ingest_max_compression_ratio: float = 100.0
    ingest_max_line_chars: int = 1 << 20
    ingest_max_fields: int = 1000
    ingest_max_rows: int = 20_000_000
    ingest_max_seconds: float = 1800.0
    quarantine_preview_fields: int = 16
    allowed_owner_uids: tuple[int, ...] = field(default_factory=lambda: (os.getuid(),))

    def with_db(self, db_url: str | None) -> Settings:
        """Return a copy with ``db_url`` replaced when one is given (CLI ``--db``)."""
        return replace(self, db_url=db_url) if db_url else self

    def require_pseudonym_key(self) -> bytes:
        """Return the HMAC key, or raise a clear error when none is configured."""
        if self.pseudonym_key:
            return self.pseudonym_key.encode("utf-8")
        if self.demo:
            logging.getLogger("kyphowatch.settings").warning(
                "demo mode: pseudonymising with the public demo key; synthetic data only "
                "(set KYPHOWATCH_PSEUDONYM_KEY and unset KYPHOWATCH_DEMO for real extracts)"
            )
            return DEMO_PSEUDONYM_KEY.encode("utf-8")
        raise ConfigurationError(
            "no pseudonymisation key: set KYPHOWATCH_PSEUDONYM_KEY (or the Airflow "
            "variable kyphowatch_pseudonym_key) before loading real extracts; "
            "set KYPHOWATCH_DEMO=1 only for synthetic demo data"
        )


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _clinical_leads(value: str | None) -> dict[str, tuple[str, ...]]:
    leads: dict[str, tuple[str, ...]] = {}
    for pair in _split(value):
        site, _, address = pair.partition("=")
        if not site.strip() or "@" not in address:
            raise ConfigurationError(
                f"KYPHOWATCH_CLINICAL_LEADS: {pair!r} is not SITE=address (e.g. S001=lead@a.example)"
            )
        leads[site.strip()] = (*leads.get(site.strip(), ()), address.strip())
    return leads


def _float(env: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from exc
    if not low <= value <= high:
        raise ConfigurationError(f"{name}={raw!r} must be between {low} and {high}")
    return value


def _uids(env: dict[str, str]) -> tuple[int, ...]:
    raw = env.get("KYPHOWATCH_ALLOWED_OWNER_UIDS")
    if not raw:
        return (os.getuid(),)
    try:
        return tuple(int(part) for part in _split(raw))
    except ValueError as exc:
        raise ConfigurationError(
            f"KYPHOWATCH_ALLOWED_OWNER_UIDS={raw!r} must be comma-separated numeric user ids"
        ) from exc


def _limits(env: dict[str, str]) -> dict[str, object]:
    """The hostile-input limits (issue 14), each overridable from the environment.

    The defaults are the :class:`Settings` field defaults (one place); the bounds are what
    an override may set.
    """
    gib = 1024**3
    d = Settings  # dataclass field defaults, read from the class
    return {
        "ingest_max_file_bytes": int(
            _float(env, "KYPHOWATCH_INGEST_MAX_FILE_BYTES", d.ingest_max_file_bytes, 1, 1024 * gib)),
        "ingest_max_decompressed_bytes": int(_float(
            env, "KYPHOWATCH_INGEST_MAX_DECOMPRESSED_BYTES", d.ingest_max_decompressed_bytes, 1,
            1024 * gib)),
        "ingest_max_compression_ratio": _float(
            env, "KYPHOWATCH_INGEST_MAX_COMPRESSION_RATIO", d.ingest_max_compression_ratio, 2.0,
            100_000.0),
        "ingest_max_line_chars": int(_float(
            env, "KYPHOWATCH_INGEST_MAX_LINE_CHARS", d.ingest_max_line_chars, 1024, 1 << 30)),
        "ingest_max_fields": int(
            _float(env, "KYPHOWATCH_INGEST_MAX_FIELDS", d.ingest_max_fields, 20, 1_000_000)),
        "ingest_max_rows": int(
            _float(env, "KYPHOWATCH_INGEST_MAX_ROWS", d.ingest_max_rows, 1, 1e10)),
        "ingest_max_seconds": _float(
            env, "KYPHOWATCH_INGEST_MAX_SECONDS", d.ingest_max_seconds, 0.1, 86_400.0),
        "quarantine_preview_fields": int(_float(
            env, "KYPHOWATCH_QUARANTINE_PREVIEW_FIELDS", d.quarantine_preview_fields, 0, 1000)),
        "allowed_owner_uids": _uids(env),
    }


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build :class:`Settings` from the environment, then apply explicit overrides.

    ``overrides`` whose value is ``None`` are ignored so that callers can pass
    optional CLI flags straight through.
    """
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {
        "db_url": env.get("KYPHOWATCH_DB_URL") or DEFAULT_DB_URL,
        "pseudonym_key": env.get("KYPHOWATCH_PSEUDONYM_KEY") or None,
        "demo": env.get("KYPHOWATCH_DEMO", "") in {"1", "true", "yes"},
        "max_bad_row_share": _float(env, "KYPHOWATCH_MAX_BAD_ROW_SHARE", 0.5, 0.0, 1.0),
        "chunk_rows": int(_float(env, "KYPHOWATCH_CHUNK_ROWS", 100_000, 1, 10_000_000)),
        "report_dir": Path(env.get("KYPHOWATCH_REPORT_DIR") or "var/reports"),
        "report_keep": int(_float(env, "KYPHOWATCH_REPORT_KEEP", 90, 1, 100_000)),
        "run_keep_days": int(_float(env, "KYPHOWATCH_RUN_KEEP_DAYS", 90, 0, 100_000)),
        "recipients_safety": _split(env.get("KYPHOWATCH_ALERT_RECIPIENTS_SAFETY")),
        "recipients_data": _split(env.get("KYPHOWATCH_ALERT_RECIPIENTS_DATA")),
        "recipients_device": _split(env.get("KYPHOWATCH_ALERT_RECIPIENTS_DEVICE")),
        "clinical_leads": _clinical_leads(env.get("KYPHOWATCH_CLINICAL_LEADS")),
        "smtp_url": env.get("KYPHOWATCH_SMTP_URL") or None,
        "webhook_url": env.get("KYPHOWATCH_WEBHOOK_URL") or None,
        "report_base_url": env.get("KYPHOWATCH_REPORT_BASE_URL") or None,
        "alert_quarantine_share": _float(env, "KYPHOWATCH_ALERT_QUARANTINE_SHARE", 0.10, 0.0, 1.0),
        "silent_site_days": int(_float(env, "KYPHOWATCH_SILENT_SITE_DAYS", 60, 1, 3650)),
        "heartbeat_hours": _float(env, "KYPHOWATCH_HEARTBEAT_HOURS", 72.0, 0.01, 24 * 365),
        "channel_outage_minutes": _float(env, "KYPHOWATCH_CHANNEL_OUTAGE_MINUTES", 30.0,
                                         0.0, 7 * 24 * 60),
    }
    for name in ("landing_dir", "archive_dir", "rejected_dir"):
        if env.get(f"KYPHOWATCH_{name.upper()}"):
            values[name] = Path(env[f"KYPHOWATCH_{name.upper()}"])
    values["landing_min_age_seconds"] = _float(
        env, "KYPHOWATCH_LANDING_MIN_AGE_SECONDS", 30.0, 0.0, 86_400.0
    )
    values["landing_poll_seconds"] = _float(env, "KYPHOWATCH_LANDING_POLL_SECONDS", 10.0, 0.1, 3600.0)
    values["landing_reannounce_seconds"] = _float(
        env, "KYPHOWATCH_LANDING_REANNOUNCE_SECONDS", 120.0, 1.0, 86_400.0
    )
    if env.get("KYPHOWATCH_MAIL_FROM"):
        values["mail_from"] = env["KYPHOWATCH_MAIL_FROM"]
    if env.get("KYPHOWATCH_PROFILE"):
        values["profile_path"] = Path(env["KYPHOWATCH_PROFILE"])
    values.update(_limits(env))
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values)  # type: ignore[arg-type]
