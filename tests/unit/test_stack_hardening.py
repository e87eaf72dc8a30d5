"""The stack's file modes, its loopback rule and PostgreSQL's generated access rules."""

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from streams.errors import StackError
from streams.settings import AccordSettings, StackSettings
from streams.stack.components import PG_HBA, Postgres, StackPaths, secure_tree
from streams.stack.manager import _fingerprint, require_loopback
from streams.stack.process import ProcessSpec, spawn, wait_until, write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_secure_tree_keeps_owner_bits_and_leaves_linked_installs_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "lib.jar").write_text("jar")
    (shared / "lib.jar").chmod(0o644)
    top = tmp_path / "state"
    (top / "data").mkdir(parents=True)
    top.chmod(0o755)
    (top / "data").chmod(0o775)
    (top / "data" / "segment").write_text("customer@example.com")
    (top / "data" / "segment").chmod(0o664)
    (top / "run.sh").write_text("#!/bin/sh\n")
    (top / "run.sh").chmod(0o755)
    (top / "libs").symlink_to(shared)

    secure_tree(top)

    assert _mode(top) == 0o700
    assert _mode(top / "data") == 0o700
    assert _mode(top / "data" / "segment") == 0o600
    assert _mode(top / "run.sh") == 0o700
    assert _mode(shared) == 0o755 and _mode(shared / "lib.jar") == 0o644


def test_secure_tree_of_a_missing_folder_does_nothing(tmp_path: Path) -> None:
    secure_tree(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_private_files_are_never_readable_by_others(tmp_path: Path) -> None:
    secret = tmp_path / "new" / "broker.pem"
    write_private(secret, "key")
    assert _mode(secret) == 0o600 and _mode(secret.parent) == 0o700
    secret.chmod(0o644)
    write_private(secret, "key again")  # an existing file made by an older Accord
    assert _mode(secret) == 0o600 and secret.read_text() == "key again"


def test_spawned_processes_create_private_files_and_logs(tmp_path: Path) -> None:
    made = tmp_path / "made"
    spec = ProcessSpec(
        name="probe",
        argv=["sh", "-c", f"umask; mkdir {made}; echo x > {made}/file"],
        log=tmp_path / "logs" / "probe.log",
        pid_file=tmp_path / "run" / "probe.pid",
    )
    spawn(spec)
    assert wait_until(lambda: (made / "file").exists(), 10)
    assert _mode(made) == 0o700 and _mode(made / "file") == 0o600
    assert _mode(spec.log) == 0o600 and _mode(spec.pid_file) == 0o600
    assert _mode(spec.log.parent) == 0o700 and _mode(spec.pid_file.parent) == 0o700
    assert wait_until(lambda: "0077" in spec.log.read_text(), 10)


def test_a_process_started_with_another_umask_is_restarted(tmp_path: Path) -> None:
    spec = ProcessSpec("probe", ["sleep", "1"], tmp_path / "log", tmp_path / "pid")
    assert _fingerprint(spec, "") != _fingerprint(replace(spec, umask=0o022), "")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_stack_hosts_are_accepted(host: str) -> None:
    require_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_a_stack_host_off_loopback_is_refused(host: str) -> None:
    with pytest.raises(StackError, match=r"loopback only.*ACCORD_STACK__HOST=127\.0\.0\.1"):
        require_loopback(host)


def test_postgres_asks_for_a_password_on_its_private_socket(tmp_path: Path) -> None:
    settings = AccordSettings(stack=StackSettings(state_dir=tmp_path, install_missing=False))
    postgres = Postgres(settings, StackPaths(tmp_path))
    rules = [line.split() for line in PG_HBA.splitlines() if line and not line.startswith("#")]
    assert rules and {rule[-1] for rule in rules} == {"scram-sha-256"}
    assert {rule[0] for rule in rules} == {"local", "host"}
    assert {rule[3] for rule in rules if rule[0] == "host"} == {"127.0.0.1/32", "::1/128"}
    config = dict(
        line.split(" = ", 1) for line in postgres.server_config().splitlines() if " = " in line
    )
    assert config["unix_socket_permissions"] == "0700"
    assert config["listen_addresses"] == "'127.0.0.1'"
    assert config["unix_socket_directories"] == f"'{tmp_path / 'postgres' / 'run'}'"
    # Both files are part of what postgres was started with: a change restarts it.
    assert PG_HBA in postgres.config_text()


def test_stack_up_refuses_a_host_off_loopback_before_touching_anything(tmp_path: Path) -> None:
    from streams.stack.manager import Stack

    # Settings already refuse the code's passwords off loopback; the stack refuses the
    # host itself, whatever passwords it is given (model_copy skips the settings' check).
    off_loopback = StackSettings(
        state_dir=tmp_path / "state", host="0.0.0.0", install_missing=False
    )
    settings = AccordSettings().model_copy(update={"stack": off_loopback})
    with pytest.raises(StackError, match="not a loopback address"):
        Stack(settings).up(["redis"])
    assert not (tmp_path / "state").exists()
    assert os.listdir(tmp_path) == []


def test_up_closes_the_state_folder_but_leaves_a_stack_inside_it_to_itself(
    tmp_path: Path,
) -> None:
    from streams.stack.manager import Stack

    stack = Stack(AccordSettings(stack=StackSettings(state_dir=tmp_path, install_missing=False)))
    (tmp_path / "worker" / "accord-1").mkdir(parents=True, mode=0o755)
    (tmp_path / "logs").mkdir(mode=0o755)
    (tmp_path / "logs" / "worker-accord-1.log").write_text("ada@example.com")
    (tmp_path / "logs" / "worker-accord-1.log").chmod(0o644)
    nested = tmp_path / "chaos-3brokers"
    for folder in ("logs", "run"):
        (nested / folder).mkdir(parents=True)
    nested.chmod(0o711)
    (nested / "logs").chmod(0o755)
    tmp_path.chmod(0o755)

    stack._secure([])

    assert _mode(tmp_path) == (0o711 if os.geteuid() == 0 else 0o700)
    assert _mode(tmp_path / "worker") == 0o700
    assert _mode(tmp_path / "logs") == 0o700
    assert _mode(tmp_path / "logs" / "worker-accord-1.log") == 0o600
    assert _mode(nested) == 0o711 and _mode(nested / "logs") == 0o755
