#!/bin/bash
# First start of the compose mariadb: the CDC user that `accord stack up` creates locally,
# with its password from the container's environment (docker-compose.yml, from .env).
# The image's entrypoint runs this file (or sources it, when not executable), so it sets
# no shell options and defines nothing it would leave behind.
: "${DEBEZIUM_DB_PASSWORD:?is not set (docker/make-env.sh writes .env)}"
# A MariaDB string literal: backslashes and quotes escaped.
escaped=${DEBEZIUM_DB_PASSWORD//\\/\\\\}
escaped=${escaped//\'/\\\'}
MYSQL_PWD="$MARIADB_ROOT_PASSWORD" mariadb --protocol=socket --user=root <<SQL || exit 1
CREATE USER IF NOT EXISTS 'debezium'@'%' IDENTIFIED BY '${escaped}';
GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT, LOCK TABLES ON *.* TO 'debezium'@'%';
FLUSH PRIVILEGES;
SQL
unset escaped
