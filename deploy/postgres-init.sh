#!/bin/bash
# First-start initialisation of the production PostgreSQL (docker-compose.yml): a database for
# Airflow's metadata and the kyphowatch warehouse with three least-privilege roles
# (sql/roles.sql, docs/keys.md "Roles"):
#   kyphowatch_owner    owns the warehouse database and schema, runs migrations
#   kyphowatch_loader   DML on the warehouse tables, no DDL (ingest, monitor, alerts)
#   kyphowatch_analyst  SELECT on the analyst views only
# Every role has its own secret from the container environment, never from this file and
# never the superuser's: AIRFLOW_DB_PASSWORD, KYPHOWATCH_OWNER_PASSWORD,
# KYPHOWATCH_LOADER_PASSWORD, KYPHOWATCH_ANALYST_PASSWORD.
set -euo pipefail
for name in AIRFLOW_DB_PASSWORD KYPHOWATCH_OWNER_PASSWORD KYPHOWATCH_LOADER_PASSWORD \
            KYPHOWATCH_ANALYST_PASSWORD; do
    if [ -z "${!name:-}" ]; then
        echo "postgres-init: $name is not set (one secret per role)" >&2
        exit 3
    fi
done
secrets=("$AIRFLOW_DB_PASSWORD" "$KYPHOWATCH_OWNER_PASSWORD" "$KYPHOWATCH_LOADER_PASSWORD"
         "$KYPHOWATCH_ANALYST_PASSWORD" "${POSTGRES_PASSWORD:-}")
if [ "$(printf '%s\n' "${secrets[@]}" | sort -u | wc -l)" -ne "${#secrets[@]}" ]; then
    echo "postgres-init: the role passwords must differ from each other and from POSTGRES_PASSWORD" >&2
    exit 3
fi
# sql/roles.sql is shared with pipelines/roles.py. In the container mount it outside
# /docker-entrypoint-initdb.d (the entrypoint would run it without its variables), e.g.
# ./sql/roles.sql:/opt/kyphowatch/roles.sql:ro
ROLES_SQL="${KYPHOWATCH_ROLES_SQL:-$(dirname "$0")/../sql/roles.sql}"
[ -f "$ROLES_SQL" ] || ROLES_SQL=/opt/kyphowatch/roles.sql
# Names are fixed in production; the overrides let tests run this script on a shared server.
WAREHOUSE_DB="${KYPHOWATCH_DB_NAME:-kyphowatch}"
AIRFLOW_DB="${AIRFLOW_DB_NAME:-airflow}"
OWNER_ROLE="${KYPHOWATCH_OWNER_ROLE:-kyphowatch_owner}"
LOADER_ROLE="${KYPHOWATCH_LOADER_ROLE:-kyphowatch_loader}"
ANALYST_ROLE="${KYPHOWATCH_ANALYST_ROLE:-kyphowatch_analyst}"

psql -v ON_ERROR_STOP=1 --username postgres -v pw="$AIRFLOW_DB_PASSWORD" -v name="$AIRFLOW_DB" <<'EOSQL'
CREATE USER :"name" PASSWORD :'pw';
CREATE DATABASE :"name" OWNER :"name";
EOSQL
psql -v ON_ERROR_STOP=1 --username postgres -v db="$WAREHOUSE_DB" <<'EOSQL'
CREATE DATABASE :"db";
EOSQL
psql -v ON_ERROR_STOP=1 --username postgres --dbname "$WAREHOUSE_DB" \
    -v database="$WAREHOUSE_DB" \
    -v owner_role="$OWNER_ROLE" -v owner_password="$KYPHOWATCH_OWNER_PASSWORD" \
    -v loader_role="$LOADER_ROLE" -v loader_password="$KYPHOWATCH_LOADER_PASSWORD" \
    -v analyst_role="$ANALYST_ROLE" -v analyst_password="$KYPHOWATCH_ANALYST_PASSWORD" \
    --single-transaction -f "$ROLES_SQL"
