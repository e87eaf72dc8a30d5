"""docker/mariadb-init.sh, the compose mariadb's first start, run for real against a
throwaway MariaDB (the local stack's server binary, its own socket and port, not the
shared stack's): the CDC user gets its password from the environment, quotes and
backslashes included, and logs in with it over TCP with the grants Debezium needs; the
script works both ways the image's entrypoint runs it (executed, or sourced by a shell
with `set -eo pipefail` that must go on afterwards).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest

from streams.stack.process import wait_until
from tests.support import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "mariadb-init.sh"
ROOT_PASSWORD = "root-pw-for-this-test"
CDC_PASSWORD = 'it\'s \\ a "test"; DROP USER x; -- $HOME `y`'


@dataclass
class MariaDB:
    home: Path
    port: int

    @property
    def socket(self) -> Path:
        return self.home / "run" / "mariadb.sock"

    def run_init(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # The client's socket: in the image the default one; here, through ~/.my.cnf.
        client = self.home / "client"
        client.mkdir(exist_ok=True)
        (client / ".my.cnf").write_text(f"[client]\nsocket = {self.socket}\n")
        client_env = {"HOME": str(client), "MARIADB_ROOT_PASSWORD": ROOT_PASSWORD}
        return subprocess.run(
            argv, env=os.environ | client_env | env, capture_output=True, text=True, timeout=60
        )

    def connect(self, user: str, password: str) -> pymysql.Connection:
        return pymysql.connect(
            host="127.0.0.1", port=self.port, user=user, password=password, connect_timeout=3
        )


@pytest.fixture
def mariadb() -> Iterator[MariaDB]:
    server = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
    install = shutil.which("mariadb-install-db")
    if not server or not install:
        pytest.skip("MariaDB server not installed")
    home = Path(tempfile.mkdtemp(prefix="accord-mariadb-init-"))
    (home / "run").mkdir()
    port = free_port()
    config = home / "my.cnf"
    config.write_text(
        "[mariadbd]\n"
        f"datadir = {home / 'data'}\n"
        f"port = {port}\n"
        "bind-address = 127.0.0.1\n"
        f"socket = {home / 'run' / 'mariadb.sock'}\n"
        f"pid-file = {home / 'run' / 'mariadb.pid'}\n"
        "skip-name-resolve\n"
        "innodb-buffer-pool-size = 32M\n"
    )
    as_user: dict[str, object] = {}
    user_flag = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam("mysql")
        for path in (home, home / "run", config):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid}
        user_flag = ["--user=mysql"]
    subprocess.run(
        [install, f"--defaults-file={config}", "--auth-root-authentication-method=normal",
         "--skip-test-db", *user_flag],
        check=True, capture_output=True,
    )  # fmt: skip
    log = (home / "mariadb.log").open("w")
    process = subprocess.Popen(
        [server, f"--defaults-file={config}"], stdout=log, stderr=subprocess.STDOUT, **as_user
    )
    db = MariaDB(home, port)

    def root_connects() -> bool:
        try:
            pymysql.connect(unix_socket=str(db.socket), user="root", connect_timeout=2).close()
        except pymysql.err.OperationalError:
            return False
        return True

    try:
        assert wait_until(root_connects, 60), (home / "mariadb.log").read_text()
        with pymysql.connect(unix_socket=str(db.socket), user="root", autocommit=True) as conn:
            conn.cursor().execute(f"ALTER USER 'root'@'localhost' IDENTIFIED BY '{ROOT_PASSWORD}'")
        yield db
    finally:
        process.terminate()
        process.wait(60)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def _assert_cdc_user(db: MariaDB) -> None:
    with db.connect("debezium", CDC_PASSWORD) as conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS")
        grants = " ".join(row[0] for row in cur.fetchall())
    # REPLICATION CLIENT shows as BINLOG MONITOR since MariaDB 10.5.
    for grant in ("REPLICATION SLAVE", "BINLOG MONITOR", "SELECT", "RELOAD"):
        assert grant in grants
    with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
        db.connect("debezium", "debezium").close()  # the old literal is gone


def test_the_cdc_user_gets_its_password_from_the_environment(mariadb: MariaDB) -> None:
    result = mariadb.run_init([str(SCRIPT)], {"DEBEZIUM_DB_PASSWORD": CDC_PASSWORD})
    assert result.returncode == 0, result.stderr
    _assert_cdc_user(mariadb)


def test_sourced_by_the_entrypoint_it_leaves_the_shell_going(mariadb: MariaDB) -> None:
    entrypoint = 'set -eo pipefail; . "$0"; echo "entrypoint goes on"'
    result = mariadb.run_init(
        ["bash", "-c", entrypoint, str(SCRIPT)], {"DEBEZIUM_DB_PASSWORD": CDC_PASSWORD}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "entrypoint goes on"
    _assert_cdc_user(mariadb)


def test_without_a_password_the_script_stops_before_creating_anything(mariadb: MariaDB) -> None:
    result = mariadb.run_init([str(SCRIPT)], {"DEBEZIUM_DB_PASSWORD": ""})
    assert result.returncode != 0
    assert "DEBEZIUM_DB_PASSWORD" in result.stderr
    assert "make-env.sh" in result.stderr
    root = pymysql.connect(unix_socket=str(mariadb.socket), user="root", password=ROOT_PASSWORD)
    with root, root.cursor() as cur:
        cur.execute("SELECT count(*) FROM mysql.user WHERE user = 'debezium'")
        assert cur.fetchone() == (0,)
