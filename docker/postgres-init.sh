#!/bin/bash
# First start of the compose postgres: the same roles, databases and tables that
# `accord stack up` bootstraps locally (streams/stack/components.py, Postgres.bootstrap).
# The roles' passwords come from the container's environment (docker-compose.yml, from
# .env); psql quotes them (:'name'), so any character is safe.
set -euo pipefail
: "${ACCORD_DB_PASSWORD:?is not set (docker/make-env.sh writes .env)}"
: "${DEBEZIUM_DB_PASSWORD:?is not set (docker/make-env.sh writes .env)}"
psql -v ON_ERROR_STOP=1 --username postgres \
  --set=accord_password="$ACCORD_DB_PASSWORD" \
  --set=debezium_password="$DEBEZIUM_DB_PASSWORD" <<'SQL'
CREATE ROLE accord LOGIN PASSWORD :'accord_password';
CREATE ROLE debezium LOGIN REPLICATION PASSWORD :'debezium_password';
CREATE DATABASE crm OWNER accord;
CREATE DATABASE support OWNER accord;
CREATE DATABASE registry OWNER accord;
SQL
for db in crm support; do
  psql -v ON_ERROR_STOP=1 --username postgres --dbname "$db" <<SQL
SET ROLE accord;
\i /accord/$db/schema.sql
RESET ROLE;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO debezium;
GRANT INSERT, UPDATE ON public.accord_heartbeat TO debezium;
SQL
done
