"""Connections to the three sample source systems, and idempotent row writes into them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psycopg
import pymysql
from psycopg import sql

from streams.dbtls import psycopg_options, pymysql_options
from streams.settings import AccordSettings

TABLES = {"crm": "customers", "support": "users", "billing": "accounts"}
PRIMARY_KEYS = {"crm": "id", "support": "id", "billing": "account_no"}


def postgres(settings: AccordSettings, system: str) -> psycopg.Connection:
    """A connection to a PostgreSQL system as its app user, with its TLS settings."""
    source = settings.source(system)
    return psycopg.connect(
        host=source.host or settings.stack.host,
        port=source.port or settings.stack.postgres_port,
        user=source.app_user,
        password=source.app_password.get_secret_value(),
        dbname=source.database,
        autocommit=True,
        connect_timeout=5,
        **psycopg_options(source.tls),
    )


def mariadb(settings: AccordSettings) -> pymysql.connections.Connection:
    """A connection to billing's MariaDB as its app user, with its TLS settings."""
    source = settings.billing
    return pymysql.connect(
        host=source.host or settings.stack.host,
        port=source.port or settings.stack.mariadb_port,
        user=source.app_user,
        password=source.app_password.get_secret_value(),
        database=source.database,
        autocommit=True,
        connect_timeout=5,
        **pymysql_options(source.tls),
    )


def insert_rows(settings: AccordSettings, system: str, rows: Iterable[Mapping[str, object]]) -> int:
    """Insert rows, skipping keys that exist already, so seeding can run twice."""
    rows = list(rows)
    if not rows:
        return 0
    columns = list(rows[0])
    table, key = TABLES[system], PRIMARY_KEYS[system]
    if system == "billing":
        statement = (
            f"INSERT IGNORE INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})"
        )
        with mariadb(settings) as conn, conn.cursor() as cur:
            return cur.executemany(statement, [tuple(row[c] for c in columns) for row in rows])
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        sql.Identifier(key),
    )
    with postgres(settings, system) as conn, conn.cursor() as cur:
        cur.executemany(query, [tuple(row[c] for c in columns) for row in rows])
        inserted = cur.rowcount
        return inserted
