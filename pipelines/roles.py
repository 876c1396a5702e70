"""Least-privilege PostgreSQL roles: owner/migrator, loader, analyst (``sql/roles.sql``).

``deploy/postgres-init.sh`` runs ``sql/roles.sql`` with psql; :func:`apply_roles` runs the same
file from Python (tests, an existing server) by substituting its psql variables -- ``:"name"``
as a quoted identifier, ``:'name'`` as a quoted literal -- and executing psql's ``\\gexec``.

Which role runs what:

* owner (``kyphowatch_owner``): owns the database and schema; runs migrations
  (``kyphowatch roles migrate --db OWNER_URL`` at each deploy, before the loader starts: the
  loader cannot create or alter tables, so a loader meeting an old schema fails with exit 4).
* loader (``kyphowatch_loader``): every pipeline writer -- ingest, landing, monitor (its run,
  signals and analyst tables are rows, not DDL), alerts, keys rotate. DML only.
* analyst (``kyphowatch_analyst``): SELECT on the ``v_*`` views, nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from pipelines.errors import ConfigError

DEFAULT_ROLES = {"owner_role": "kyphowatch_owner", "loader_role": "kyphowatch_loader",
                 "analyst_role": "kyphowatch_analyst"}
PASSWORD_ENV = {"owner_password": "KYPHOWATCH_OWNER_PASSWORD",
                "loader_password": "KYPHOWATCH_LOADER_PASSWORD",
                "analyst_password": "KYPHOWATCH_ANALYST_PASSWORD"}
_VARIABLE = re.compile(r""":(["'])(\w+)\1""")


@dataclass(frozen=True)
class RoleSet:
    """Role names and their (separate) passwords."""

    owner_role: str
    loader_role: str
    analyst_role: str
    owner_password: str
    loader_password: str
    analyst_password: str

    def __repr__(self) -> str:  # never show a password in a log or traceback
        return (f"RoleSet(owner_role={self.owner_role!r}, loader_role={self.loader_role!r}, "
                f"analyst_role={self.analyst_role!r})")


def roles_from_env(env: dict[str, str] | None = None) -> RoleSet:
    """Read the three passwords from the environment; refuse missing or shared secrets."""
    env = dict(os.environ if env is None else env)
    missing = [name for name in PASSWORD_ENV.values() if not env.get(name)]
    if missing:
        raise ConfigError(f"set {', '.join(missing)} (one secret per role)")
    passwords = {field: env[name] for field, name in PASSWORD_ENV.items()}
    if len(set(passwords.values())) < len(passwords):
        raise ConfigError("the owner, loader and analyst passwords must all be different")
    return RoleSet(**DEFAULT_ROLES, **passwords)


def _statements(text: str) -> list[tuple[str, bool]]:
    """Split a psql script into (statement, run-its-result-with-gexec) pairs."""
    out: list[tuple[str, bool]] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        if stripped == "\\gexec":
            out.append(("\n".join(current), True))
            current = []
            continue
        current.append(line)
        if stripped.endswith(";"):
            out.append(("\n".join(current).rstrip().rstrip(";"), False))
            current = []
    if current:
        raise ConfigError("roles.sql ends without ';' or \\gexec")
    return out


def _render(statement: str, values: dict[str, str], conn: sa.Connection) -> str:
    """Substitute psql variables: ``:"x"`` as an identifier, ``:'x'`` as a literal."""
    from psycopg import sql

    raw = conn.connection.driver_connection

    def one(match: re.Match) -> str:
        quote, name = match.groups()
        if name not in values:
            raise ConfigError(f"roles.sql uses an unknown variable {name}")
        if quote == '"':
            return conn.dialect.identifier_preparer.quote_identifier(values[name])
        return sql.Literal(values[name]).as_string(raw)

    return _VARIABLE.sub(one, statement)


def apply_roles(admin_url: str, database: str, roles: RoleSet,
                roles_sql: Path | None = None) -> None:
    """Create the three roles and their grants on ``database``, in one transaction.

    ``admin_url`` is a superuser URL; it is pointed at ``database`` (which must exist).
    """
    from pipelines.settings import bundled_path

    text = (roles_sql or bundled_path("sql/roles.sql")).read_text(encoding="utf-8")
    values = {"database": database, **{k: getattr(roles, k) for k in (
        "owner_role", "loader_role", "analyst_role",
        "owner_password", "loader_password", "analyst_password")}}
    url = sa.make_url(admin_url).set(database=database)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            # The driver connection directly: no parameters, so a literal '%' in the SQL (as
            # in format('%I')) is not taken for a placeholder. Same transaction as ``conn``.
            raw = conn.connection.driver_connection
            for statement, gexec in _statements(text):
                result = raw.execute(_render(statement, values, conn))
                if gexec:
                    for generated in [cell for row in result.fetchall() for cell in row]:
                        raw.execute(generated)
    finally:
        engine.dispose()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kyphowatch roles apply`` and ``kyphowatch roles migrate`` (admin commands)."""
    parser = subparsers.add_parser(
        "roles", help="PostgreSQL roles (owner, loader, analyst) and migration as the owner",
        description="apply: run sql/roles.sql on an existing warehouse database as a superuser "
                    "(passwords from KYPHOWATCH_OWNER_PASSWORD, KYPHOWATCH_LOADER_PASSWORD, "
                    "KYPHOWATCH_ANALYST_PASSWORD). migrate: bring the schema up to date; run "
                    "it as the owner.",
    )
    actions = parser.add_subparsers(dest="roles_action", metavar="ACTION", required=True)
    apply = actions.add_parser("apply", help="create the three roles and their grants")
    apply.add_argument("--admin-url", required=True,
                       help="superuser URL of the PostgreSQL server")
    apply.add_argument("--database", default="kyphowatch", help="warehouse database name")
    apply.set_defaults(handler=_run)
    migrate = actions.add_parser("migrate", help="migrate the warehouse schema (as the owner)")
    migrate.add_argument("--db", help="owner's warehouse URL (default: KYPHOWATCH_DB_URL)")
    migrate.set_defaults(handler=_run_migrate)


def _run_migrate(args: argparse.Namespace) -> int:
    from pipelines import schema
    from pipelines.db import open_warehouse, redact_url
    from pipelines.settings import load_settings

    settings = load_settings(db_url=args.db)
    open_warehouse(settings.db_url).dispose()
    print(f"{redact_url(settings.db_url)} is at schema version {schema.SCHEMA_VERSION}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.db import redact_url
    from pipelines.errors import ExternalSystemError

    roles = roles_from_env()
    try:
        apply_roles(args.admin_url, args.database, roles)
    except sa.exc.DBAPIError as exc:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise ExternalSystemError(
            f"could not apply roles on {redact_url(args.admin_url)}: {first}") from exc
    print(f"roles {roles.owner_role}, {roles.loader_role}, {roles.analyst_role} "
          f"applied to database {args.database}")
    return 0
