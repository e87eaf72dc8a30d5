#!/bin/sh
# Writes the .env that docker-compose.yml reads its secrets from: one random value per
# variable (.env.example lists them), mode 0600. On an existing .env it adds only the
# variables missing from it and never changes one that is set: the databases keep the
# passwords they were first started with, and the match key secret names Redis's keys.
#
#   docker/make-env.sh            # writes .env beside docker-compose.yml
#   docker/make-env.sh PATH       # writes PATH instead
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-$root/.env}
# 24 random bytes as 48 hex digits: safe in URLs, SQL and shell words alike.
secret() {
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}
umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if [ -e "$target" ]; then
  cp -p "$target" "$tmp"
else
  echo "# Written by docker/make-env.sh: the secrets of docker-compose.yml. Keep it secret." >"$tmp"
fi
added=0
for name in POSTGRES_PASSWORD MARIADB_ROOT_PASSWORD ACCORD_DB_PASSWORD \
  DEBEZIUM_DB_PASSWORD REDIS_PASSWORD REDIS_WORKER_PASSWORD GRAFANA_ADMIN_PASSWORD \
  ACCORD_IDENTITY_KEY_SECRET ACCORD_WEB_TOKEN; do
  if grep -q "^$name=." "$tmp"; then
    continue
  fi
  if grep -q "^$name=" "$tmp"; then
    echo "$target sets $name empty; fill it in or remove the line" >&2
    exit 1
  fi
  echo "$name=$(secret)" >>"$tmp"
  added=$((added + 1))
done
chmod 600 "$tmp"
mv "$tmp" "$target"
trap - EXIT
echo "$target: $added added, every other variable kept"
