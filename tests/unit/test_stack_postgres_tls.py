"""The local stack's PostgreSQL serves TLS with a certificate signed by the stack's one CA,
the CA the Kafka broker's certificate is signed by too."""

from __future__ import annotations

import subprocess
from pathlib import Path

from streams.settings import AccordSettings, StackSettings
from streams.stack.components import Kafka, Postgres, StackPaths, stack_ca


def _stack(tmp_path: Path) -> tuple[AccordSettings, StackPaths]:
    settings = AccordSettings(stack=StackSettings(state_dir=tmp_path, install_missing=False))
    return settings, StackPaths(tmp_path)


def _verifies(ca: Path, certificate: Path) -> bool:
    argv = ["openssl", "verify", "-CAfile", str(ca), str(certificate)]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _names(certificate: Path) -> str:
    argv = ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(certificate)]
    return subprocess.run(argv, capture_output=True, check=True, text=True).stdout


def test_postgres_starts_with_tls_on_and_its_certificate(tmp_path: Path) -> None:
    settings, paths = _stack(tmp_path)
    argv = Postgres(settings, paths).process().argv
    tls = tmp_path / "postgres" / "tls"
    settings_given = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-c"]
    assert settings_given == [
        "ssl=on",
        f"ssl_cert_file={tls / 'server.crt'}",
        f"ssl_key_file={tls / 'server.key'}",
    ]


def test_the_certificate_is_signed_by_the_stack_s_ca_for_loopback(tmp_path: Path) -> None:
    settings, paths = _stack(tmp_path)
    postgres = Postgres(settings, paths)
    postgres._make_certificate(None)
    ca = tmp_path / "kafka" / "tls" / "ca.pem"
    assert _verifies(ca, postgres.tls / "server.crt")
    assert "DNS:localhost, IP Address:127.0.0.1" in _names(postgres.tls / "server.crt")
    assert (postgres.tls / "server.key").stat().st_mode & 0o777 == 0o600
    assert postgres.tls.stat().st_mode & 0o777 == 0o700


def test_kafka_and_postgres_share_one_ca_whichever_makes_it(tmp_path: Path) -> None:
    settings, paths = _stack(tmp_path)
    Postgres(settings, paths)._make_certificate(None)
    ca = tmp_path / "kafka" / "tls" / "ca.pem"
    before = ca.read_bytes()
    kafka = Kafka(settings, paths)
    kafka._make_certificates()
    assert ca.read_bytes() == before
    assert _verifies(ca, kafka.tls / "broker.crt")
    assert (kafka.tls / "broker.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_a_certificate_of_another_ca_is_made_again(tmp_path: Path) -> None:
    settings, paths = _stack(tmp_path)
    postgres = Postgres(settings, paths)
    postgres._make_certificate(None)
    first = (postgres.tls / "server.crt").read_bytes()
    postgres._make_certificate(None)  # still valid: kept
    assert (postgres.tls / "server.crt").read_bytes() == first
    for name in ("ca.pem", "ca.key"):
        (tmp_path / "kafka" / "tls" / name).unlink()
    ca = stack_ca(paths, "test", tmp_path / "test.log") / "ca.pem"
    assert not _verifies(ca, postgres.tls / "server.crt")
    postgres._make_certificate(None)
    assert _verifies(ca, postgres.tls / "server.crt")
