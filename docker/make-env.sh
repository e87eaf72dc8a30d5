#!/bin/sh
# Writes the .env that docker-compose.yml reads its passwords from: one random password
# per variable (.env.example lists them), mode 0600. Refuses to replace an existing file,
# since the databases keep the passwords they were first started with.
#
#   docker/make-env.sh            # writes .env beside docker-compose.yml
#   docker/make-env.sh PATH       # writes PATH instead
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$root/.env}
if [ -e "$target" ]; then
  echo "$target exists; not replacing it (the databases keep their first passwords)" >&2
  exit 1
fi
# 24 random bytes as 48 hex digits: safe in URLs, SQL and shell words alike.
password() {
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}
umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
  echo "# Written by docker/make-env.sh: the passwords of docker-compose.yml. Keep it secret."
  for name in POSTGRES_PASSWORD MARIADB_ROOT_PASSWORD ACCORD_DB_PASSWORD \
    DEBEZIUM_DB_PASSWORD REDIS_PASSWORD REDIS_WORKER_PASSWORD GRAFANA_ADMIN_PASSWORD; do
    echo "$name=$(password)"
  done
} >"$tmp"
mv "$tmp" "$target"
trap - EXIT
echo "wrote $target"
