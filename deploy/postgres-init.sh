#!/bin/bash
# First-start initialisation of the production PostgreSQL (docker-compose.yml): one
# database for Airflow's metadata, one for the kyphowatch warehouse. The password comes
# from the container environment, never from this file.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres -v pw="$POSTGRES_PASSWORD" <<'EOSQL'
CREATE USER airflow PASSWORD :'pw';
CREATE DATABASE airflow OWNER airflow;
CREATE USER kyphowatch PASSWORD :'pw';
CREATE DATABASE kyphowatch OWNER kyphowatch;
EOSQL
