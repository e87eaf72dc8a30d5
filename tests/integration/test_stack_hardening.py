"""The local stack keeps to itself: private files, a password on the socket, loopback only.

The running stack is checked read-only (as the `stack` fixture's `up` leaves it). One
PostgreSQL of this test's own, in its own state folder on a port of its own, is made with
the rules of an older Accord (socket on `trust`, open modes) and brought up to the new
ones by the next `up`.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from streams.settings import AccordSettings
from streams.stack.components import Kafka, MariaDB, Postgres
from streams.stack.manager import Stack
from streams.stack.process import read_pid
from tests.support import free_port

pytestmark = pytest.mark.integration

AS_ROOT = os.geteuid() == 0
OTHER_USER = "nobody"


def _loose(top: Path) -> list[str]:
    """`top` and everything below it (symbolic links aside) that group or others may use."""
    if top.is_symlink():  # an install shared with another state folder
        return []
    found = []
    for folder, folders, files in os.walk(top):
        for path in (folder, *(os.path.join(folder, name) for name in (*folders, *files))):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # a segment deleted meanwhile
                continue
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{path} {oct(stat.S_IMODE(mode))}")
    return sorted(set(found))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _trust_lines(hba: Path) -> list[str]:
    lines = [line.split("#", 1)[0].split() for line in hba.read_text().splitlines()]
    return [" ".join(fields) for fields in lines if fields and fields[-1] == "trust"]


def _psql_as(user: str, postgres: Postgres) -> subprocess.CompletedProcess[str]:
    """`psql` as OS user `user` through the socket, as the superuser, with no password."""
    psql = shutil.which("psql") or str(postgres.bin_dir / "psql")
    where = ["-h", str(postgres.socket_dir), "-p", str(postgres.port)]
    return subprocess.run(
        [psql, "-w", *where, "-U", "postgres", "-d", "postgres", "-Atc", "SELECT current_user"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "5"},
        user=user,
    )


def assert_postgres_socket_is_closed(settings: AccordSettings) -> None:
    postgres = Stack(settings).components["postgres"]
    assert isinstance(postgres, Postgres)
    assert _trust_lines(postgres.data / "pg_hba.conf") == []
    sockets = list(postgres.socket_dir.glob(".s.PGSQL.*[0-9]"))
    assert sockets, f"no socket in {postgres.socket_dir}"
    assert _mode(postgres.socket_dir) & 0o077 == 0, oct(_mode(postgres.socket_dir))
    assert all(_mode(s) & 0o077 == 0 for s in sockets), [oct(_mode(s)) for s in sockets]
    # Whoever reaches the socket (root does) still has to give the password.
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(
            host=str(postgres.socket_dir), port=postgres.port, user="postgres", dbname="postgres"
        ).close()
    with psycopg.connect(
        host=str(postgres.socket_dir),
        port=postgres.port,
        user="postgres",
        password=settings.stack.postgres_superuser_password.get_secret_value(),
        dbname="postgres",
    ) as conn:
        assert conn.execute("SHOW unix_socket_permissions").fetchone() == ("0700",)
    if AS_ROOT:  # another local user gets nowhere, let alone in as superuser
        result = _psql_as(OTHER_USER, postgres)
        assert result.returncode != 0 and "postgres" not in result.stdout, result


def assert_state_is_private(settings: AccordSettings, components: list[str]) -> None:
    """The stack's folders, each component's folder whole, its log and pid files.

    (Others' files in logs/ and run/, a test worker's, are theirs to answer for.)
    """
    stack = Stack(settings)
    root = stack.paths.root
    assert _mode(root) & 0o066 == 0, oct(_mode(root))  # at most traversable (0711)
    assert _mode(stack.paths.logs) == 0o700 and _mode(stack.paths.run) == 0o700
    loose = []
    for name in components:
        component = stack.components[name]
        loose += _loose(component.home)
        pid_file = component.process().pid_file
        for path in (component.log, pid_file, pid_file.with_suffix(".cmdline")):
            if _mode(path) & 0o077:
                loose.append(f"{path} {oct(_mode(path))}")
    assert loose == []


@pytest.mark.skipif(not AS_ROOT, reason="reads the databases' folders, owned by their users")
def test_key_material_data_and_logs_are_the_owners_only(stack: AccordSettings) -> None:
    names = list(Stack(stack).components)
    assert_state_is_private(stack, names)
    components = Stack(stack).components
    kafka = components["kafka"]
    assert isinstance(kafka, Kafka)
    for key in ("ca.key", "broker.key", "broker.pem"):
        assert _mode(kafka.tls / key) == 0o600, key
    for folder in (
        kafka.tls,
        kafka.home / "data",
        components["postgres"].home / "data",
        components["mariadb"].home / "data",
        components["redis"].home / "appendonlydir",
    ):
        assert _mode(folder) == 0o700, folder
    for name in names:
        assert _mode(components[name].log) == 0o600, name


def test_postgres_socket_asks_every_local_user_for_the_password(stack: AccordSettings) -> None:
    assert_postgres_socket_is_closed(stack)


def test_mariadb_root_logs_in_over_its_private_socket_only(stack: AccordSettings) -> None:
    import pymysql

    mariadb = Stack(stack).components["mariadb"]
    assert isinstance(mariadb, MariaDB)
    root_password = stack.stack.mariadb_root_password.get_secret_value()
    for password in ("", root_password):  # made without one; nor with it: no root on TCP
        with pytest.raises(pymysql.err.OperationalError) as refused:
            pymysql.connect(
                host=stack.stack.host, port=mariadb.port, user="root", password=password
            ).close()
        assert refused.value.args[0] in (1045, 1130), refused.value  # denied, host not allowed
    assert _mode(mariadb.socket.parent) & 0o077 == 0
    assert _mode(mariadb.socket) & 0o077 == 0
    pymysql.connect(unix_socket=str(mariadb.socket), user="root", password=root_password).close()


def _listening(kind: str) -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Listening (TCP) or bound (UDP) sockets from /proc/net/<kind>: inode -> (address, port)."""
    sockets = {}
    for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
        fields = line.split()
        address, port = fields[1].split(":")
        if kind.startswith("tcp") and fields[3] != "0A":  # TCP: LISTEN only
            continue
        raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        sockets[int(fields[9])] = (ipaddress.ip_address(raw), int(port, 16))
    return sockets


def _socket_inodes(pid: int) -> set[int]:
    """Socket inodes held by the process group led by `pid` (a server and its children)."""
    inodes = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            pgrp = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if pgrp != pid:
                continue
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return inodes


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def assert_listens_on_loopback_only(settings: AccordSettings, components: list[str]) -> None:
    bound = {}
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        bound.update(_listening(kind))
    stack = Stack(settings)
    for name in components:
        component = stack.components[name]
        pid = read_pid(component.process())
        assert pid is not None, f"{name} is not running"
        mine = [bound[inode] for inode in _socket_inodes(pid) if inode in bound]
        assert set(component.listens.values()) <= {port for _, port in mine}, (name, mine)
        outside = [f"{address}:{port}" for address, port in mine if not _loopback(address)]
        assert outside == [], name


@pytest.mark.skipif(not AS_ROOT, reason="reads the sockets of processes of other users")
def test_every_service_listens_on_loopback_only(stack: AccordSettings) -> None:
    assert_listens_on_loopback_only(stack, list(Stack(stack).components))


# ------------------------------------------------------------ a state made before the rules

OLD_HBA = """\
local   all             all                                     trust
host    all             all             127.0.0.1/32            scram-sha-256
local   replication     all                                     trust
"""


@pytest.fixture
def own_postgres(settings: AccordSettings) -> Iterator[AccordSettings]:
    """A PostgreSQL of this test's own: a fresh state folder (in the temp folder, which its
    system user can reach) and a free port."""
    state = Path(tempfile.mkdtemp(prefix="accord-hardening-"))
    stack = settings.stack.model_copy(
        update={"state_dir": state, "postgres_port": free_port(), "install_missing": False}
    )
    own = settings.model_copy(update={"stack": stack})
    manager = Stack(own, progress=lambda m: print(f"[hardening stack] {m}"))
    try:
        yield own
    finally:
        manager.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.skipif(not AS_ROOT, reason="PostgreSQL runs as its system user only under root")
def test_a_state_made_by_an_older_accord_is_brought_to_the_rules(
    own_postgres: AccordSettings,
) -> None:
    manager = Stack(own_postgres)
    manager.up(["postgres"])
    manager.down()
    # What an older Accord left: the socket on trust, the socket folder and logs open.
    postgres = manager.components["postgres"]
    assert isinstance(postgres, Postgres)
    (postgres.data / "pg_hba.conf").write_text(OLD_HBA)
    (postgres.data / "accord.conf").unlink()
    conf = postgres.data / "postgresql.conf"
    conf.write_text(conf.read_text().replace("include 'accord.conf'", ""))
    for path, mode in (
        (manager.paths.root, 0o755),
        (manager.paths.logs, 0o755),
        (postgres.log, 0o644),
        (postgres.home, 0o755),
        (postgres.socket_dir, 0o777),
    ):
        path.chmod(mode)

    statuses = manager.up(["postgres"])

    assert [s.healthy for s in statuses] == [True]
    assert (postgres.data / "pg_hba.conf").stat().st_uid == pwd.getpwnam("postgres").pw_uid
    assert_postgres_socket_is_closed(own_postgres)
    assert_state_is_private(own_postgres, ["postgres"])
    assert_listens_on_loopback_only(own_postgres, ["postgres"])
