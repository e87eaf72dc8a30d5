#!/bin/bash
# First start of the compose postgres: the same roles, databases and tables that
# `accord stack up` bootstraps locally (streams/stack/components.py, Postgres.bootstrap).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres <<'SQL'
CREATE ROLE accord LOGIN PASSWORD 'accord';
CREATE ROLE debezium LOGIN REPLICATION PASSWORD 'debezium';
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
