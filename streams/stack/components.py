"""The stack's components: how each is prepared, started, checked and bootstrapped.

Each component is a small class over `ProcessSpec`; `streams.stack.manager` decides
order and waiting. Every method is idempotent, so `accord stack up` can run any time.
"""

from __future__ import annotations

import base64
import functools
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from streams.dbtls import connector_env
from streams.errors import StackError
from streams.settings import AccordSettings
from streams.stack.process import PRIVATE_UMASK, ProcessSpec, open_private, write_private

# How long Connect waits for a worker that left its group before handing its tasks on.
CONNECT_REBALANCE_DELAY_MS = 10_000


@dataclass(frozen=True)
class StackPaths:
    """Where each part of the stack's state lives, all under one git-ignored folder."""

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def home(self, component: str) -> Path:
        return self.root / component

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def kafka_libs(self) -> Path:
        return self.root / "kafka" / "libs"

    @property
    def connect_plugins(self) -> Path:
        return self.root / "connect-plugins"

    @property
    def registry_app(self) -> Path:
        return self.root / "registry"


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


class Component:
    """One process of the stack. Subclasses fill in the specifics."""

    name: str = ""
    debian_packages: tuple[str, ...] = ()
    maven_profile: str | None = None
    java_major: int = 0  # 0: not a JVM component
    depends_on: tuple[str, ...] = ()

    def __init__(self, settings: AccordSettings, paths: StackPaths) -> None:
        self.settings = settings
        self.stack = settings.stack
        self.paths = paths

    @classmethod
    def instances(cls, settings: AccordSettings, paths: StackPaths) -> list[Component]:
        """The processes of this kind the stack runs (one, but for Kafka's brokers)."""
        return [cls(settings, paths)]

    @property
    def peers(self) -> tuple[str, ...]:
        """Components started and awaited together with this one (a cluster's other nodes)."""
        return ()

    def preflight(self) -> None:
        """Refuse, before anything is started or stopped, what `up` cannot do."""

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def log(self) -> Path:
        return self.paths.log(self.name)

    @property
    def home(self) -> Path:
        return self.paths.home(self.name)

    @property
    def listens(self) -> dict[str, int]:
        """Every port the process takes, by the stack setting that chooses it."""
        return {f"{self.name}_port": self.port}

    def prepare(self) -> None:
        """One-time initialisation of data directories and config files."""

    def secure(self) -> None:
        """Make what the component keeps its owner's only (folders 0700, files 0600).

        Runs on every `up`, so state made by an older Accord is brought to the same rules.
        """
        secure_tree(self.home)

    def config_text(self) -> str:
        """The generated configuration a running process was started with, if any."""
        return ""

    def process(self) -> ProcessSpec:
        raise NotImplementedError

    def health(self) -> Health:
        raise NotImplementedError

    def bootstrap(self) -> None:
        """Create what the stack needs inside a healthy component (users, databases)."""

    def version(self) -> str:
        return "unknown"

    def _spec(self, argv: list[str], **kwargs: object) -> ProcessSpec:
        return ProcessSpec(
            name=self.name,
            argv=argv,
            log=self.log,
            pid_file=self.paths.run / f"{self.name}.pid",
            **kwargs,  # type: ignore[arg-type]
        )


def service_user(name: str) -> str | None:
    """The system account to run a database as when we are root (they refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise StackError(name, f"system user {name!r} is missing; reinstall its package") from exc
    return name


def check_reachable(component: str, path: Path, user: str | None) -> None:
    """A database run as its system user must be able to walk down to its data folder."""
    if user is None:
        return
    uid = pwd.getpwnam(user).pw_uid
    for parent in reversed(path.resolve().parents):
        info = parent.stat()
        if info.st_uid != uid and not info.st_mode & 0o001:
            raise StackError(
                component,
                f"the state folder {path} is not reachable by system user {user!r}: "
                f"{parent} is private (mode {oct(info.st_mode & 0o777)}); choose a "
                "state_dir below world-traversable folders (ACCORD_STACK__STATE_DIR)",
            )


def chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    shutil.chown(path, user, user)
    for item in path.rglob("*"):
        shutil.chown(item, user, user)


def secure_tree(top: Path) -> None:
    """Take every group and other permission off `top` and everything below it.

    Owner bits stay (folders end up 0700, files 0600, executables 0700). Symbolic links
    are neither changed nor followed: a shared install linked into a state folder keeps
    its modes. Files that vanish meanwhile (a broker deleting a segment) are skipped.
    """
    if top.is_symlink() or not top.exists():
        return
    _make_private(str(top))
    for folder, folders, files in os.walk(top):
        for name in (*folders, *files):
            _make_private(os.path.join(folder, name))


def _make_private(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            os.chmod(path, stat.S_IMODE(mode) & 0o700)
    except FileNotFoundError:
        pass


def run_checked(component: str, argv: list[str], log: Path, **kwargs: object) -> None:
    """Run a setup command, appending its output to the component's log.

    What it creates is private (umask 077), as for the stack's processes.
    """
    with open(open_private(log), "ab") as out:
        result = subprocess.run(  # type: ignore[call-overload]
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            umask=PRIVATE_UMASK,
            **kwargs,
        )
    if result.returncode != 0:
        raise StackError(component, f"`{' '.join(argv[:2])}` failed ({result.returncode})", log)


def stack_ca(paths: StackPaths, component: str, log: Path) -> Path:
    """The folder of the stack's one CA (`ca.pem`, `ca.key`, under Kafka's `tls`), made
    by whichever component needs it first. It signs the broker's and PostgreSQL's server
    certificates; clients trust `ca.pem`."""
    tls = paths.home("kafka") / "tls"
    if (tls / "ca.pem").exists() and (tls / "ca.key").exists():
        return tls
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_checked(
        component,
        [_openssl(component), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-subj", "/CN=Accord local stack CA", "-keyout", "ca.key", "-out", "ca.pem"],
        log,
        cwd=tls,
    )  # fmt: skip
    return tls


def sign_certificate(
    ca: Path, folder: Path, name: str, host: str, component: str, log: Path
) -> tuple[Path, Path]:
    """`<name>.key` and `<name>.crt` in `folder`: a server certificate for `host`,
    localhost and 127.0.0.1, signed by the CA in `ca`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    if host not in ("localhost", "127.0.0.1"):
        names += f",DNS:{host}"
    (folder / f"{name}.ext").write_text(names + "\n")
    openssl = _openssl(component)
    for argv in (
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
         "-keyout", f"{name}.key", "-out", f"{name}.csr"],
        ["x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca.pem"),
         "-CAkey", str(ca / "ca.key"), "-CAcreateserial", "-days", "3650",
         "-extfile", f"{name}.ext", "-out", f"{name}.crt"],
    ):  # fmt: skip
        run_checked(component, [openssl, *argv], log, cwd=folder)
    return folder / f"{name}.key", folder / f"{name}.crt"


def _openssl(component: str) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError(component, "openssl not found (package openssl)")
    return openssl


# --------------------------------------------------------------------------- PostgreSQL


# Rewritten on every `up`: a state folder made with the socket on `trust` loses it.
PG_HBA = """\
# accord local stack: rewritten by `accord stack up`. Every connection gives a password,
# over the socket too (the socket folder is the postgres user's only).
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""
PG_INCLUDE = "include 'accord.conf'"


class Postgres(Component):
    name = "postgres"
    debian_packages = ("postgresql",)

    @property
    def port(self) -> int:
        return self.stack.postgres_port

    @property
    def bin_dir(self) -> Path:
        candidates = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        )
        if not candidates:
            raise StackError(self.name, "PostgreSQL server binaries not found (package postgresql)")
        return Path(candidates[-1])

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    def version(self) -> str:
        return self.bin_dir.parent.name

    @property
    def tls(self) -> Path:
        """The server's certificate (`server.crt`) and key, signed by the stack's CA."""
        return self.home / "tls"

    def server_config(self) -> str:
        """`accord.conf`, included last by postgresql.conf: the settings the stack relies on."""
        return (
            "# accord local stack: rewritten by `accord stack up`\n"
            f"listen_addresses = '{self.stack.host}'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "unix_socket_permissions = 0700\n"
            "wal_level = logical\n"
            "max_replication_slots = 16\n"
            "max_wal_senders = 16\n"
            "max_connections = 200\n"
            "shared_buffers = 128MB\n"
            "fsync = on\n"
        )

    def config_text(self) -> str:
        return self.server_config() + PG_HBA

    def prepare(self) -> None:
        user = service_user("postgres")
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_reachable(self.name, self.home, user)
        if not (self.data / "PG_VERSION").exists():
            self._initdb(user)
        write_private(self.data / "pg_hba.conf", PG_HBA)
        write_private(self.data / "accord.conf", self.server_config())
        conf = self.data / "postgresql.conf"
        if PG_INCLUDE not in conf.read_text().splitlines():
            with open(conf, "a") as out:  # after any older settings of ours, so it wins
                out.write(f"\n{PG_INCLUDE}\n")
        chown_tree(self.home, user)
        self._make_certificate(user)

    def _initdb(self, user: str | None) -> None:
        pwfile = self.home / ".pw"
        write_private(pwfile, self.stack.postgres_superuser_password.get_secret_value())
        chown_tree(self.home, user)
        try:
            run_checked(
                self.name,
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                self.log,
                user=user,
                group=user,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _make_certificate(self, user: str | None) -> None:
        """The server certificate, made once and again when it no longer verifies against
        the stack's CA (a CA made anew). PostgreSQL refuses a key that is not its own
        user's or that others can read."""
        ca = stack_ca(self.paths, self.name, self.log)
        certificate, key = self.tls / "server.crt", self.tls / "server.key"
        verify = [_openssl(self.name), "verify", "-CAfile", str(ca / "ca.pem"), str(certificate)]
        if not (
            key.exists()
            and certificate.exists()
            and subprocess.run(verify, capture_output=True, check=False).returncode == 0
        ):
            sign_certificate(ca, self.tls, "server", self.stack.host, self.name, self.log)
        self.tls.chmod(0o700)
        key.chmod(0o600)
        chown_tree(self.tls, user)

    def process(self) -> ProcessSpec:
        return self._spec(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data),
                # TLS on every start, so a data folder made before it serves TLS too.
                "-c",
                "ssl=on",
                "-c",
                f"ssl_cert_file={self.tls / 'server.crt'}",
                "-c",
                f"ssl_key_file={self.tls / 'server.key'}",
            ],
            user=service_user("postgres"),
            stop_signal=signal.SIGINT,  # "fast" shutdown
        )

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host=self.stack.host,
            port=self.port,
            user="postgres",
            password=self.stack.postgres_superuser_password.get_secret_value(),
            dbname=dbname,
            autocommit=True,
            connect_timeout=3,
        )

    def health(self) -> Health:
        try:
            with self.connect() as conn:
                level = conn.execute("SHOW wal_level").fetchone()[0]
        except Exception as exc:
            return Health(False, _short(exc))
        if level != "logical":
            return Health(False, f"wal_level is {level}, not logical")
        return Health(True, f"accepting connections on {self.stack.host}:{self.port}")

    def bootstrap(self) -> None:
        from psycopg import sql

        with self.connect() as conn:
            for system in ("crm", "support"):
                source = self.settings.source(system)
                for role, password, extra in (
                    (source.app_user, source.app_password, sql.SQL("")),
                    (source.cdc_user, source.cdc_password, sql.SQL(" REPLICATION")),
                ):
                    exists = conn.execute(
                        "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                    ).fetchone()
                    verb = sql.SQL("ALTER") if exists else sql.SQL("CREATE")
                    conn.execute(
                        sql.SQL("{} ROLE {} LOGIN{} PASSWORD {}").format(
                            verb,
                            sql.Identifier(role),
                            extra,
                            sql.Literal(password.get_secret_value()),
                        )
                    )
            # The registry keeps its schemas in PostgreSQL too, owned by the CRM app user.
            databases = {
                self.settings.crm.database: self.settings.crm.app_user,
                self.settings.support.database: self.settings.support.app_user,
                "registry": self.settings.crm.app_user,
            }
            for dbname, owner in databases.items():
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
                if not exists.fetchone():
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(dbname), sql.Identifier(owner)
                        )
                    )
        for system in ("crm", "support"):
            self._create_sample_schema(system)

    def _create_sample_schema(self, system: str) -> None:
        from psycopg import sql

        source = self.settings.source(system)
        ddl = (self.settings.connectors_dir / system / "schema.sql").read_text()
        with self.connect(source.database) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(source.app_user)))
            conn.execute(ddl)
            conn.execute("RESET ROLE")
            conn.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
                    sql.Identifier(source.cdc_user)
                )
            )
            # Debezium's heartbeat.action.query keeps the slot moving on an idle source.
            conn.execute(
                sql.SQL("GRANT INSERT, UPDATE ON public.accord_heartbeat TO {}").format(
                    sql.Identifier(source.cdc_user)
                )
            )


# --------------------------------------------------------------------------- MariaDB


# mariadbd sets its own umask from these (by default files 0660): owner only.
MARIADB_UMASK_ENV = {"UMASK": "0600", "UMASK_DIR": "0700"}


class MariaDB(Component):
    name = "mariadb"
    debian_packages = ("mariadb-server",)

    @property
    def port(self) -> int:
        return self.stack.mariadb_port

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def socket(self) -> Path:
        return self.home / "run" / "mariadb.sock"

    @property
    def config(self) -> Path:
        return self.home / "my.cnf"

    def version(self) -> str:
        out = subprocess.run(
            [self._binary(), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"Ver\s+(\S+)", out)
        return match.group(1) if match else "unknown"

    def _binary(self) -> str:
        found = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
        if not found:
            raise StackError(self.name, "mariadbd not found (package mariadb-server)")
        return found

    def prepare(self) -> None:
        user = service_user("mysql")
        (self.home / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        check_reachable(self.name, self.home, user)
        self.config.write_text(
            "[mariadbd]\n"
            f"datadir = {self.data}\n"
            f"port = {self.port}\n"
            f"bind-address = {self.stack.host}\n"
            f"socket = {self.socket}\n"
            f"pid-file = {self.home / 'run' / 'mariadb.pid'}\n"
            "skip-name-resolve\n"
            "server-id = 1\n"
            f"log-bin = {self.data / 'binlog'}\n"
            "log-basename = accord\n"
            "binlog-format = ROW\n"
            "binlog-row-image = FULL\n"
            "gtid-strict-mode = ON\n"
            "binlog-expire-logs-seconds = 259200\n"
            "character-set-server = utf8mb4\n"
            "collation-server = utf8mb4_unicode_ci\n"
            "innodb-buffer-pool-size = 128M\n"
            "max-connections = 200\n"
            "\n[client]\n"
            f"socket = {self.socket}\n"
        )
        chown_tree(self.home, user)
        if (self.data / "mysql").is_dir():
            return
        install = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
        argv = [
            install,
            f"--defaults-file={self.config}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        if user:
            argv.append(f"--user={user}")
        run_checked(self.name, argv, self.log, env={**os.environ, **MARIADB_UMASK_ENV})
        chown_tree(self.home, user)

    def process(self) -> ProcessSpec:
        return self._spec(
            [self._binary(), f"--defaults-file={self.config}"],
            user=service_user("mysql"),
            env=MARIADB_UMASK_ENV,
        )

    def _root(self):
        import pymysql

        root_password = self.stack.mariadb_root_password.get_secret_value()
        last: Exception | None = None
        for password in (root_password, ""):  # "" only before the first bootstrap
            try:
                return pymysql.connect(
                    unix_socket=str(self.socket),
                    user="root",
                    password=password,
                    connect_timeout=3,
                    autocommit=True,
                )
            except pymysql.err.OperationalError as exc:
                last = exc
        raise StackError(self.name, f"cannot log in as root: {_short(last)}", self.log)

    def health(self) -> Health:
        import pymysql

        source = self.settings.billing
        try:
            conn = pymysql.connect(
                unix_socket=str(self.socket),
                user="root",
                password=self.stack.mariadb_root_password.get_secret_value(),
                connect_timeout=3,
            )
        except pymysql.err.OperationalError as exc:
            if exc.args and exc.args[0] == 1045:  # access denied: up, not bootstrapped yet
                return Health(True, "accepting connections (not bootstrapped)")
            return Health(False, _short(exc))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT @@log_bin, @@binlog_format")
            log_bin, fmt = cur.fetchone()
        if not log_bin or fmt != "ROW":
            return Health(False, f"binlog not in ROW format (log_bin={log_bin}, format={fmt})")
        return Health(
            True,
            f"accepting connections on {self.stack.host}:{self.port} "
            f"(binlog ROW, database {source.database})",
        )

    def bootstrap(self) -> None:
        source = self.settings.billing
        root_pw = self.stack.mariadb_root_password.get_secret_value()
        app, cdc = f"'{source.app_user}'@'%%'", f"'{source.cdc_user}'@'%%'"
        statements = [
            f"CREATE DATABASE IF NOT EXISTS `{source.database}`",
            f"CREATE USER IF NOT EXISTS {app} IDENTIFIED BY %(app)s",
            f"ALTER USER {app} IDENTIFIED BY %(app)s",
            f"GRANT ALL PRIVILEGES ON `{source.database}`.* TO {app}",
            f"CREATE USER IF NOT EXISTS {cdc} IDENTIFIED BY %(cdc)s",
            f"ALTER USER {cdc} IDENTIFIED BY %(cdc)s",
            "GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT, "
            f"LOCK TABLES ON *.* TO {cdc}",
            "ALTER USER 'root'@'localhost' IDENTIFIED BY %(root)s",
            "FLUSH PRIVILEGES",
        ]
        params = {
            "app": source.app_password.get_secret_value(),
            "cdc": source.cdc_password.get_secret_value(),
            "root": root_pw,
        }
        conn = self._root()
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, params)
            # mariadb-install-db also makes root@127.0.0.1, @::1 and @<hostname> without a
            # password: any local user would be root over TCP. Root logs in over the
            # socket only, which is the mysql user's own.
            cur.execute("SELECT host FROM mysql.user WHERE user = 'root' AND host <> 'localhost'")
            for (host,) in cur.fetchall():
                cur.execute("DROP USER 'root'@%s", (host,))
            cur.execute(f"USE `{source.database}`")
            for statement in sql_statements(
                self.settings.connectors_dir / "billing" / "schema.sql"
            ):
                cur.execute(statement)


def sql_statements(path: Path) -> list[str]:
    """A plain SQL file's statements: `--` comment lines dropped, split on ';'."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


# --------------------------------------------------------------------------- Redis


class Redis(Component):
    name = "redis"
    debian_packages = ("redis-server",)

    @property
    def port(self) -> int:
        return self.stack.redis_port

    def version(self) -> str:
        out = subprocess.run(
            [self._binary(), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"v=(\S+)", out)
        return match.group(1) if match else "unknown"

    def _binary(self) -> str:
        found = shutil.which("redis-server")
        if not found:
            raise StackError(self.name, "redis-server not found (package redis-server)")
        return found

    def prepare(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)

    def process(self) -> ProcessSpec:
        return self._spec(
            [
                self._binary(),
                "--bind",
                self.stack.host,
                "--port",
                str(self.port),
                "--dir",
                str(self.home),
                "--appendonly",
                "yes",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--save",
                "",
            ],
        )

    def health(self) -> Health:
        import redis

        try:
            client = redis.Redis(host=self.stack.host, port=self.port, socket_timeout=2)
            client.ping()
        except redis.RedisError as exc:
            return Health(False, _short(exc))
        return Health(True, f"PONG on {self.stack.host}:{self.port}")


# --------------------------------------------------------------------------- Java components


def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else 0


@functools.cache
def find_java(component: str, min_major: int) -> str:
    """A java binary of at least `min_major`: PATH first, then JAVA_HOME, then /usr/lib/jvm.

    Components differ (Kafka runs on 17, Apicurio Registry 3.3 needs 21), and machines
    often carry several JDKs side by side.
    """
    candidates = [shutil.which("java")]
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates += sorted(glob.glob("/usr/lib/jvm/*/bin/java"))
    found: dict[str, int] = {}
    for java in filter(None, candidates):
        if java not in found and os.access(java, os.X_OK):
            found[java] = _java_major(java)
            if found[java] >= min_major:
                return java
    seen = ", ".join(f"{path} ({major})" for path, major in found.items()) or "none"
    raise StackError(
        component,
        f"needs Java {min_major} or newer; found: {seen}. Install a JDK {min_major}+ "
        "and put it on PATH or set JAVA_HOME",
    )


def _jar_version(directory: Path, prefix: str) -> str:
    for jar in sorted(directory.glob(f"{prefix}-*.jar")):
        match = re.match(rf"{re.escape(prefix)}-(\d[\w.]*)\.jar$", jar.name)
        if match:
            return match.group(1)
    return "unknown"


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication, min in-sync replicas) of a cluster of `brokers`: 3 and 2 from 3 up."""
    replication = min(3, brokers)
    return replication, 2 if replication >= 3 else 1


class Kafka(Component):
    """One broker of the local KRaft cluster; each of `stack.kafka_brokers` is also a controller.

    Broker 1 is named `kafka` and takes the configured ports; broker N (`kafka-N`) takes
    each of them + KAFKA_NODE_PORT_STEP * (N - 1) and keeps its log under `<state>/kafka-N`.
    The cluster's size is recorded when it is made (`cluster.properties`) and cannot change.
    """

    name = "kafka"
    maven_profile = "kafka"
    java_major = 17

    def __init__(self, settings: AccordSettings, paths: StackPaths, node: int = 1) -> None:
        super().__init__(settings, paths)
        self.node = node
        if node > 1:
            self.name = f"kafka-{node}"

    @classmethod
    def instances(cls, settings: AccordSettings, paths: StackPaths) -> list[Component]:
        # Every broker the state holds, so `status` and `down` see them whatever is set.
        count = max(settings.stack.kafka_brokers, recorded_brokers(paths) or 0)
        return [cls(settings, paths, node) for node in range(1, count + 1)]

    @property
    def brokers(self) -> int:
        return self.stack.kafka_brokers

    @property
    def peers(self) -> tuple[str, ...]:
        count = max(self.brokers, recorded_brokers(self.paths) or 0)
        names = ["kafka" if n == 1 else f"kafka-{n}" for n in range(1, count + 1)]
        return tuple(name for name in names if name != self.name)

    @property
    def port(self) -> int:
        return self.stack.kafka_node_ports(self.node)[0]

    @property
    def config(self) -> Path:
        return self.home / "server.properties"

    @property
    def cluster_file(self) -> Path:
        return self.paths.home("kafka") / "cluster.properties"

    def version(self) -> str:
        return _jar_version(self.paths.kafka_libs, "kafka-clients")

    @property
    def listens(self) -> dict[str, int]:
        plain, controller, secure = self.stack.kafka_node_ports(self.node)
        return {
            "kafka_port": plain,
            "kafka_controller_port": controller,
            "kafka_sasl_ssl_port": secure,
        }

    @property
    def tls(self) -> Path:
        """CA and broker certificate of the TLS listener, one for every broker; clients
        trust `ca.pem`."""
        return self.paths.home("kafka") / "tls"

    def preflight(self) -> None:
        recorded = recorded_brokers(self.paths)
        if recorded is not None and recorded != self.brokers:
            raise StackError(
                self.name,
                f"the Kafka cluster in {self.paths.root} was made with {recorded} broker(s), "
                f"not {self.brokers}; set ACCORD_STACK__KAFKA_BROKERS={recorded} (`accord "
                f"stack up --brokers {recorded}`), or choose another ACCORD_STACK__STATE_DIR "
                f"(or run `accord stack down` and delete {self.paths.root}/kafka* to make it "
                "afresh, losing its topics)",
            )

    def config_text(self) -> str:
        host = self.stack.host
        plain, controller, secure = self.stack.kafka_node_ports(self.node)
        replication, min_isr = replication_for(self.brokers)
        if self.brokers == 1:
            quorum = f"controller.quorum.bootstrap.servers={host}:{controller}\n"
        else:
            voters = ",".join(
                f"{n}@{host}:{self.stack.kafka_node_ports(n)[1]}"
                for n in range(1, self.brokers + 1)
            )
            quorum = f"controller.quorum.voters={voters}\n"
        return (
            "process.roles=broker,controller\n"
            f"node.id={self.node}\n"
            f"{quorum}"
            f"listeners=PLAINTEXT://{host}:{plain},CONTROLLER://{host}:{controller},"
            f"SASL_SSL://{host}:{secure}\n"
            f"advertised.listeners=PLAINTEXT://{host}:{plain},SASL_SSL://{host}:{secure}\n"
            "controller.listener.names=CONTROLLER\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map="
            "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL\n"
            # The TLS + SCRAM listener, for clients configured as a production one would be.
            "sasl.enabled.mechanisms=SCRAM-SHA-512\n"
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
            "ssl.keystore.type=PEM\n"
            f"ssl.keystore.location={self.tls / 'broker.pem'}\n"
            f"log.dirs={self.home / 'data'}\n"
            "num.partitions=3\n"
            # Every topic that matters gets a copy on each of up to 3 brokers: those made
            # with the broker's defaults (Debezium's, Connect's), offsets, transactions.
            f"default.replication.factor={replication}\n"
            + (f"min.insync.replicas={min_isr}\n" if replication >= 3 else "")
            + f"offsets.topic.replication.factor={replication}\n"
            f"transaction.state.log.replication.factor={replication}\n"
            f"transaction.state.log.min.isr={min_isr}\n"
            f"share.coordinator.state.topic.replication.factor={replication}\n"
            f"share.coordinator.state.topic.min.isr={min_isr}\n"
            "group.initial.rebalance.delay.ms=0\n"
            "auto.create.topics.enable=true\n"
            "log.retention.hours=168\n"
        )

    def _make_certificates(self) -> None:
        """A CA of the stack's own and a broker certificate for its host, made once."""
        if (self.tls / "broker.pem").exists():
            return
        ca = stack_ca(self.paths, self.name, self.log)  # PostgreSQL may have made it
        key, certificate = sign_certificate(
            ca, self.tls, "broker", self.stack.host, self.name, self.log
        )
        write_private(self.tls / "broker.pem", key.read_text() + certificate.read_text())

    def _cluster_id(self) -> str:
        """The id every broker of the cluster is formatted with, made by the first one."""
        if not self.cluster_file.exists():
            self.cluster_file.parent.mkdir(parents=True, exist_ok=True)
            self.cluster_file.write_text(f"cluster.id={new_cluster_id()}\nbrokers={self.brokers}\n")
        return _properties(self.cluster_file)["cluster.id"]

    def prepare(self) -> None:
        data = self.home / "data"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_log4j2(self.home / "log4j2.properties")
        self._make_certificates()
        self.config.write_text(self.config_text())
        if (data / "meta.properties").exists():
            return
        cluster_id = self._cluster_id()
        # One broker: a single-node dynamic quorum; more: the static voters of the config.
        quorum = ["--standalone"] if self.brokers == 1 else []
        run_checked(
            self.name,
            [
                find_java(self.name, self.java_major),
                "-cp",
                f"{self.paths.kafka_libs}/*",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                f"--config={self.config}",
                *quorum,
            ],
            self.log,
        )

    def process(self) -> ProcessSpec:
        return self._spec(
            [
                find_java(self.name, self.java_major),
                f"-Xms{self.stack.kafka_heap}",
                f"-Xmx{self.stack.kafka_heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.home / 'logs'}",
                "-cp",
                f"{self.paths.kafka_libs}/*",
                "kafka.Kafka",
                str(self.config),
            ],
        )

    def health(self) -> Health:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {  # the stack's own plaintext listener, whatever clients are configured for
                "bootstrap.servers": f"{self.stack.host}:{self.port}",
                "socket.timeout.ms": 2000,
                "logger": _SILENT,  # connection-refused noise while the broker starts
            }
        )
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception as exc:
            return Health(False, _short(exc))
        if self.node not in metadata.brokers:
            return Health(False, f"broker {self.node} not registered in the cluster yet")
        return Health(
            True,
            f"{len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s); "
            f"{PLAINTEXT_NOTE.format(host=self.stack.host, port=self.port)}",
        )

    def bootstrap(self) -> None:
        """The SCRAM user of the TLS + SASL listener (an upsert: safe on every `up`)."""
        if self.node != 1:
            return  # one user for the cluster, made through its first broker
        from confluent_kafka.admin import (
            AdminClient,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        admin = AdminClient({"bootstrap.servers": f"{self.stack.host}:{self.port}"})
        upsert = UserScramCredentialUpsertion(
            self.stack.kafka_scram_user,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
            self.stack.kafka_scram_password.get_secret_value().encode(),
        )
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(30)


# The local stack keeps a plaintext listener for development; it says so wherever it shows.
PLAINTEXT_NOTE = "plaintext {host}:{port} is for development only (no TLS, no login)"


def _properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def recorded_brokers(paths: StackPaths) -> int | None:
    """How many brokers the cluster in `paths` was made with; None before it is made.

    A cluster made before the count was recorded has one broker.
    """
    home = paths.home("kafka")
    if (home / "cluster.properties").exists():
        return int(_properties(home / "cluster.properties").get("brokers", 1))
    return 1 if (home / "data" / "meta.properties").exists() else None


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them: URL-safe base64 of a UUID, no leading '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def write_log4j2(path: Path) -> None:
    """Console logging at INFO; the process's stdout is already the component's log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "status = warn\n"
        "appender.console.type = Console\n"
        "appender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.stdout.ref = STDOUT\n"
        "logger.kafka.name = kafka\n"
        "logger.kafka.level = INFO\n"
        "logger.reflections.name = org.reflections\n"
        "logger.reflections.level = ERROR\n"
    )


class Registry(Component):
    """Apicurio Registry, whose ccompat API is what every Accord client talks to."""

    name = "registry"
    maven_profile = "registry"
    java_major = 21  # Apicurio Registry 3.3 is built for Java 21
    depends_on = ("postgres",)

    @property
    def port(self) -> int:
        return self.stack.registry_port

    @property
    def base_url(self) -> str:
        return f"http://{self.stack.host}:{self.port}"

    def version(self) -> str:
        try:
            with zipfile.ZipFile(self.paths.registry_app / "quarkus-run.jar") as jar:
                manifest = jar.read("META-INF/MANIFEST.MF").decode()
        except (FileNotFoundError, KeyError, zipfile.BadZipFile):
            return "not installed"
        match = re.search(r"Implementation-Version: (\S+)", manifest)
        return f"apicurio-registry {match.group(1)}" if match else "unknown"

    def prepare(self) -> None:
        if not (self.paths.registry_app / "quarkus-run.jar").is_file():
            raise StackError(self.name, f"{self.paths.registry_app}/quarkus-run.jar is missing")

    def process(self) -> ProcessSpec:
        pg = self.stack
        props = {
            "quarkus.http.host": pg.host,
            "quarkus.http.port": str(self.port),
            # The Avro converter's JDK HTTP client asks every new connection to upgrade
            # to HTTP/2 (h2c); an upgrade on a POST with a body hangs or fails the
            # request ("header parser received no bytes"), and with it a connector task.
            # Plain HTTP/1.1 has neither problem.
            "quarkus.http.http2": "false",
            "quarkus.management.host": pg.host,
            "quarkus.management.port": str(pg.registry_management_port),
            "quarkus.log.console.format": "%d{HH:mm:ss.SSS} %-5p [%c{2.}] %s%e%n",
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "postgresql",
            "apicurio.datasource.url": f"jdbc:postgresql://{pg.host}:{pg.postgres_port}/registry",
            "apicurio.datasource.username": self.settings.crm.app_user,
            "apicurio.rest.deletion.artifact.enabled": "true",
            "apicurio.rest.deletion.artifact-version.enabled": "true",
            "apicurio.rest.deletion.group.enabled": "true",
            # GET /subjects answers at most this many, silently (Apicurio's default is
            # 1,000): past it, subjects are missing from `accord schemas list`.
            "apicurio.ccompat.max-subjects": "100000",
        }
        return self._spec(
            [
                find_java(self.name, self.java_major),
                f"-Xmx{self.stack.registry_heap}",
                *[f"-D{key}={value}" for key, value in props.items()],
                "-jar",
                str(self.paths.registry_app / "quarkus-run.jar"),
            ],
            cwd=self.paths.registry_app,
            # The password goes through the environment, never the command line.
            env={"APICURIO_DATASOURCE_PASSWORD": self.settings.crm.app_password.get_secret_value()},
        )

    def health(self) -> Health:
        try:
            ready = httpx.get(
                f"http://{self.stack.host}:{self.stack.registry_management_port}/health/ready",
                timeout=3,
            )
            subjects = httpx.get(f"{self.base_url}/apis/ccompat/v7/subjects", timeout=3)
        except httpx.HTTPError as exc:
            return Health(False, _short(exc))
        if ready.status_code != 200:
            return Health(False, f"/health/ready answered {ready.status_code}")
        if subjects.status_code != 200:
            return Health(False, f"ccompat API answered {subjects.status_code}")
        return Health(True, f"ccompat API up, {len(subjects.json())} subject(s)")


# The variables of the Connect worker's environment that a connector may read through
# ${env:NAME}: those the connector files and the TLS settings reference, not the rest
# (anyone who reaches Connect's REST API can create a connector). docker-compose.yml
# sets the same pattern (tests/unit/test_compose.py).
CONNECT_ENV_ALLOWLIST = (
    "^(KAFKA_BOOTSTRAP_SERVERS|(CRM|SUPPORT|BILLING)_DB_"
    "(HOST|PORT|USER|PASSWORD|TRUSTSTORE_PASSWORD|KEYSTORE_PASSWORD))$"
)


class Connect(Component):
    """Kafka Connect in distributed mode, with Debezium and the Apicurio Avro converter."""

    name = "connect"
    maven_profile = "connect"  # resolved with profiles "plugins" and "converter"
    java_major = 17
    depends_on = ("kafka", "registry")
    required_plugins = (
        "io.debezium.connector.postgresql.PostgresConnector",
        "io.debezium.connector.mariadb.MariaDbConnector",
    )

    @property
    def port(self) -> int:
        return self.stack.connect_port

    @property
    def config(self) -> Path:
        return self.home / "connect-distributed.properties"

    def version(self) -> str:
        kafka = _jar_version(self.paths.kafka_libs, "connect-runtime")
        debezium = _jar_version(
            self.paths.connect_plugins / "debezium-connector-postgres", "debezium-api"
        )
        return f"connect {kafka}, debezium {debezium}"

    def prepare(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_log4j2(self.home / "log4j2.properties")
        self.config.write_text(self.config_text())

    def config_text(self) -> str:
        replication, _ = replication_for(self.stack.kafka_brokers)
        registry = f"http://{self.stack.host}:{self.stack.registry_port}/apis/registry/v2"
        converter = "\n".join(
            f"{side}.converter{suffix}"
            for side in ("key", "value")
            for suffix in (
                "=io.apicurio.registry.utils.converter.AvroConverter",
                f".apicurio.registry.url={registry}",
                ".apicurio.registry.auto-register=true",
                ".apicurio.registry.find-latest=true",
                # Confluent wire format: magic byte + 4-byte id, the id being the
                # contentId that the registry's ccompat API serves as the schema id.
                ".apicurio.registry.as-confluent=true",
                ".apicurio.registry.use-id=contentId",
                ".apicurio.registry.headers.enabled=false",
                # A registry hiccup must not kill a connector task: retry schema lookups.
                ".apicurio.registry.retry-count=10",
                ".apicurio.registry.retry-backoff-ms=500",
                # Keep resolved schemas a day instead of asking the registry again with
                # every heartbeat: fewer calls, fewer chances for one to hang the task.
                ".apicurio.registry.check-period-ms=86400000",
            )
        )
        return (
            f"bootstrap.servers={self.settings.kafka}\n"
            "group.id=accord-connect\n"
            "config.storage.topic=_accord-connect-configs\n"
            "offset.storage.topic=_accord-connect-offsets\n"
            "status.storage.topic=_accord-connect-status\n"
            f"config.storage.replication.factor={replication}\n"
            f"offset.storage.replication.factor={replication}\n"
            f"status.storage.replication.factor={replication}\n"
            f"offset.flush.interval.ms={self.stack.connect_offset_flush_interval_ms}\n"
            # A worker that dropped out of its group (a broker paused past the session
            # timeout) gets its tasks back after this, not Connect's default 5 minutes of
            # waiting for it to return (no capture meanwhile: make chaos, Kafka paused).
            f"scheduled.rebalance.max.delay.ms={CONNECT_REBALANCE_DELAY_MS}\n"
            f"listeners=http://{self.stack.host}:{self.port}\n"
            f"rest.advertised.host.name={self.stack.host}\n"
            f"rest.advertised.port={self.port}\n"
            f"plugin.path={self.paths.connect_plugins}\n"
            "topic.creation.enable=true\n"
            "config.providers=env\n"
            "config.providers.env.class="
            "org.apache.kafka.common.config.provider.EnvVarConfigProvider\n"
            f"config.providers.env.param.allowlist.pattern={CONNECT_ENV_ALLOWLIST}\n"
            f"{converter}\n"
        )

    def worker_env(self) -> dict[str, str]:
        """Values that connector files reference as ${env:NAME}; secrets stay out of REST."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.settings.kafka}
        ports = {
            "crm": self.stack.postgres_port,
            "support": self.stack.postgres_port,
            "billing": self.stack.mariadb_port,
        }
        for system, port in ports.items():
            source = self.settings.source(system)
            prefix = system.upper()
            env[f"{prefix}_DB_HOST"] = self.stack.host
            env[f"{prefix}_DB_PORT"] = str(port)
            env[f"{prefix}_DB_USER"] = source.cdc_user
            env[f"{prefix}_DB_PASSWORD"] = source.cdc_password.get_secret_value()
        return env | connector_env(self.settings)  # keystore passwords of TLS settings

    def process(self) -> ProcessSpec:
        return self._spec(
            [
                find_java(self.name, self.java_major),
                f"-Xms{self.stack.connect_heap}",
                f"-Xmx{self.stack.connect_heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp",
                f"{self.paths.kafka_libs}/*",
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(self.config),
            ],
            env=self.worker_env(),
        )

    def health(self) -> Health:
        try:
            response = httpx.get(f"{self.settings.connect}/connector-plugins", timeout=3)
        except httpx.HTTPError as exc:
            return Health(False, _short(exc))
        if response.status_code != 200:
            return Health(False, f"REST API answered {response.status_code}")
        classes = {plugin["class"] for plugin in response.json()}
        missing = [name for name in self.required_plugins if name not in classes]
        if missing:
            return Health(False, f"plugins missing: {', '.join(missing)}")
        return Health(True, f"REST API up, {len(classes)} plugins incl. Debezium")


_SILENT = logging.getLogger("accord.stack.librdkafka")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False


def _short(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


COMPONENT_TYPES: tuple[type[Component], ...] = (Postgres, MariaDB, Redis, Kafka, Registry, Connect)
