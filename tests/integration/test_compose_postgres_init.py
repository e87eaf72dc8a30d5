"""docker/postgres-init.sh, the compose postgres's first start, run for real against a
throwaway PostgreSQL (the local stack's server binaries, its own socket and port, not the
shared stack's): the roles get the passwords from the environment, quotes and all, and
log in with them over TCP (scram-sha-256), and the CDC role can replicate.

The image mounts the connector schemas under /accord; this copy of the script reads them
from the test's own folder instead, the only change to it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from streams.stack.process import wait_until
from tests.support import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "postgres-init.sh"
# Quotes, a backslash, a semicolon and a psql variable sigil: whatever an operator picks.
PASSWORDS = {
    "ACCORD_DB_PASSWORD": "it's; DROP ROLE x; -- \\ :'v'",
    "DEBEZIUM_DB_PASSWORD": 'cdc "quoted" $HOME `x`',
}


@dataclass
class Postgres:
    home: Path
    port: int

    def run_init(self, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        script = self.home / "init.sh"
        text = SCRIPT.read_text().replace("/accord/", f"{self.home}/accord/")
        script.write_text(text)
        socket_env = {"PGHOST": str(self.home / "run"), "PGPORT": str(self.port)}
        return subprocess.run(
            ["bash", str(script)],
            env=os.environ | socket_env | env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def connect(self, user: str, password: str, dbname: str) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            dbname=dbname,
            connect_timeout=3,
        )


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not found:
        pytest.skip("PostgreSQL server binaries not installed")
    return Path(found[-1])


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    bin_dir = _bin_dir()
    home = Path(tempfile.mkdtemp(prefix="accord-pg-init-"))
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        entry = pwd.getpwnam("postgres")
        os.chown(home, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid}
    for system in ("crm", "support"):
        (home / "accord" / system).mkdir(parents=True)
        shutil.copy(ROOT / "connectors" / system / "schema.sql", home / "accord" / system)
    (home / "run").mkdir()
    if as_user:
        for path in [home / "run", *home.rglob("*")]:
            os.chown(path, as_user["user"], as_user["group"])  # type: ignore[arg-type]
    port = free_port()
    data = home / "data"
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
         "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"],
        check=True, capture_output=True, **as_user,
    )  # fmt: skip
    log = (home / "postgres.log").open("w")
    server = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(home / "run"),
         "-c", "listen_addresses=127.0.0.1", "-c", "wal_level=logical", "-c", "fsync=off"],
        stdout=log, stderr=subprocess.STDOUT, **as_user,
    )  # fmt: skip
    ready = [str(bin_dir / "pg_isready"), "-h", str(home / "run"), "-p", str(port)]
    try:
        assert wait_until(lambda: subprocess.run(ready, capture_output=True).returncode == 0, 30)
        yield Postgres(home, port)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def test_the_roles_get_their_passwords_from_the_environment(postgres: Postgres) -> None:
    result = postgres.run_init(PASSWORDS)
    assert result.returncode == 0, result.stderr
    accord = PASSWORDS["ACCORD_DB_PASSWORD"]
    for db in ("crm", "support", "registry"):
        with postgres.connect("accord", accord, db) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("accord",)
    with postgres.connect("accord", accord, "crm") as conn:
        conn.execute("SELECT count(*) FROM customers").fetchone()
    with postgres.connect("debezium", PASSWORDS["DEBEZIUM_DB_PASSWORD"], "crm") as conn:
        replication = conn.execute("SELECT rolreplication FROM pg_roles WHERE rolname = 'debezium'")
        assert replication.fetchone() == (True,)
        conn.execute("SELECT count(*) FROM customers").fetchone()  # granted SELECT
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        postgres.connect("accord", "accord", "crm").close()  # the old literal is gone


def test_without_a_password_the_script_stops_before_creating_anything(
    postgres: Postgres,
) -> None:
    result = postgres.run_init({"DEBEZIUM_DB_PASSWORD": "x"} | {"ACCORD_DB_PASSWORD": ""})
    assert result.returncode != 0
    assert "ACCORD_DB_PASSWORD" in result.stderr
    assert "make-env.sh" in result.stderr
    superuser = [
        "psql", "-h", str(postgres.home / "run"), "-p", str(postgres.port), "-U", "postgres",
        "-Atc", "SELECT count(*) FROM pg_roles WHERE rolname IN ('accord', 'debezium')",
    ]  # fmt: skip
    assert subprocess.run(superuser, capture_output=True, text=True).stdout.strip() == "0"
