"""Installs what the stack runs on: Debian packages and Maven-resolved JVM artifacts.

Maven's local repository caches every download; a stamp per profile records which
pom produced the unpacked copy under the state folder, so a version bump re-resolves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from streams.errors import StackError
from streams.stack.components import Component, StackPaths

POM = Path(__file__).with_name("pom.xml")

# Which Maven profiles fill which folder under the state directory.
MAVEN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "kafka": ("kafka/libs",),
    "registry": ("registry",),
    "plugins": (
        "connect-plugins/debezium-connector-postgres",
        "connect-plugins/debezium-connector-mariadb",
    ),
    "converter": ("connect-plugins/apicurio-converter",),
}
PROFILES_FOR: dict[str, tuple[str, ...]] = {
    "kafka": ("kafka",),
    "registry": ("registry",),
    "connect": ("kafka", "plugins", "converter"),
}

Progress = Callable[[str], None]


def missing_debian_packages(components: Iterable[Component]) -> list[str]:
    """Packages whose server binary is absent, judged by the component's own lookup."""
    missing: list[str] = []
    for component in components:
        if not component.debian_packages:
            continue
        try:
            component.version()
        except StackError:
            missing.extend(component.debian_packages)
    return missing


def install_debian_packages(packages: list[str], log: Path, progress: Progress) -> None:
    if not packages:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(
            "install",
            f"missing Debian packages {', '.join(packages)}; install them with "
            f"`sudo apt-get install -y {' '.join(packages)}` and run `accord stack up` again",
        )
    progress(f"installing Debian packages: {', '.join(packages)} (one time)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        for argv in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        ):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env).returncode:
                raise StackError("install", f"`{' '.join(argv[:2])}` failed", log)


def _stamp(paths: StackPaths, profile: str) -> Path:
    return paths.root / "downloads" / f"{profile}.stamp"


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def maven_profile_ready(paths: StackPaths, profile: str) -> bool:
    """Resolved for this pom, and its unpacked folders are still there (a component's
    state folder may have been deleted by hand)."""
    stamp = _stamp(paths, profile)
    return (
        stamp.is_file()
        and stamp.read_text() == _pom_digest()
        and all(any((paths.root / output).glob("*")) for output in MAVEN_OUTPUTS[profile])
    )


def resolve_maven_profiles(
    paths: StackPaths, profiles: Iterable[str], log: Path, progress: Progress
) -> None:
    """Resolve and unpack each profile's artifacts unless already done for this pom."""
    for profile in profiles:
        if maven_profile_ready(paths, profile):
            continue
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError(
                "install",
                "Maven (`mvn`) is required to fetch Kafka, Debezium and Apicurio "
                "(install it, e.g. `apt-get install maven`)",
            )
        for output in MAVEN_OUTPUTS[profile]:
            shutil.rmtree(paths.root / output, ignore_errors=True)
        progress(f"resolving Maven profile '{profile}' (cached in ~/.m2 after the first time)")
        argv = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(POM),
            f"-P{profile}",
            f"-Dstack.dir={paths.root.resolve()}",
            "generate-resources",
        ]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"\n=== mvn profile {profile}\n".encode())
            out.flush()
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise StackError("install", f"Maven could not resolve profile '{profile}'", log)
        stamp = _stamp(paths, profile)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(_pom_digest())


def ensure_installed(components: list[Component], paths: StackPaths, progress: Progress) -> None:
    log = paths.log("install")
    install_debian_packages(missing_debian_packages(components), log, progress)
    profiles: list[str] = []
    for component in components:
        for profile in PROFILES_FOR.get(component.name, ()):
            if profile not in profiles:
                profiles.append(profile)
    resolve_maven_profiles(paths, profiles, log, progress)
