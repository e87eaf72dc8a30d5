"""Which settings are unsafe once an endpoint is not on this machine.

The local stack runs on loopback with passwords that are defaults in the code: harmless on
127.0.0.1, an open door anywhere else. `unsafe_settings` lists what Accord refuses to load
with: a default or empty password for a non-loopback host, SASL PLAIN or HTTP basic auth
sent in clear to one, a secret given twice (inline and as `_file`), a password inside a
printed URL. `weak_settings` lists what it loads with a warning: SCRAM, or a Redis password,
without TLS to a non-loopback host. Each entry names the setting and the fix, never a secret.

Loopback is 127.0.0.0/8, ::1 and `localhost`; any other name counts as remote, since a
name can resolve anywhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

from streams.errors import ConfigError

if TYPE_CHECKING:
    from streams.settings import AccordSettings

__all__ = [
    "Credential",
    "UnsafeSettings",
    "bootstrap_hosts",
    "credential_problems",
    "default_secrets",
    "env_name",
    "is_loopback",
    "secrets_given_twice",
    "unsafe_settings",
    "url_host",
    "weak_settings",
]


class UnsafeSettings(ConfigError):
    """Settings Accord refuses to load; `problems` holds one line per refused setting."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("unsafe configuration:\n  " + "\n  ".join(problems))


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: 127.0.0.0/8, ::1 (also as [::1] or an
    IPv4-mapped loopback) or `localhost`. Any other name is remote: it may resolve anywhere."""
    name = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bootstrap_hosts(bootstrap: str) -> list[str]:
    """The hosts of a Kafka bootstrap list: `host:port`, `[v6]:port`, `SCHEME://host:port`."""
    hosts = []
    for server in bootstrap.split(","):
        server = server.strip().rpartition("://")[2]
        if not server:
            continue
        if server.startswith("["):
            hosts.append(server[1:].partition("]")[0])
        elif server.count(":") == 1:
            hosts.append(server.partition(":")[0])
        else:  # no port, or a bare IPv6 address
            hosts.append(server)
    return hosts


def url_host(url: str) -> str:
    """The host a URL reaches; `localhost` for a unix socket or no host (clients default
    to it); "" for a URL that does not parse, which is then treated as remote."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return "localhost"
        return parts.hostname or "localhost"
    except ValueError:
        return ""


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def env_name(setting: str) -> str:
    """A dotted setting's variable: crm.app_password -> ACCORD_CRM__APP_PASSWORD."""
    return "ACCORD_" + setting.upper().replace(".", "__")


def _how_to_set(setting: str, has_file: bool) -> str:
    if has_file:
        return f"put it in a file named by {env_name(setting)}_FILE (or set {env_name(setting)})"
    return f"set {env_name(setting)} (or {setting} in the config file)"


def default_secrets(model: type[BaseModel]) -> frozenset[str]:
    """Every secret that is a default in the code (e.g. the local stack's passwords), found
    by walking the settings models, so a default added later is refused too."""
    found: set[str] = set()
    for field in model.model_fields.values():
        default = field.default
        if isinstance(default, SecretStr):
            found.add(default.get_secret_value())
        elif isinstance(default, BaseModel):
            found |= default_secrets(type(default))
    return frozenset(found)


def secrets_given_twice(model: BaseModel, path: str = "") -> list[str]:
    """Every `X` set together with its `X_file`, in `model` and the models inside it.

    Found by name, so a pair added to any section later is refused the same way; which of
    the two should win is not ours to guess.
    """
    problems = []
    fields = type(model).model_fields
    for name in fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            problems += secrets_given_twice(value, f"{path}{name}.")
        elif (
            f"{name}_file" in fields
            and value is not None
            and getattr(model, f"{name}_file") is not None
        ):
            section = path.removesuffix(".")
            env = env_name(path + name)
            problems.append(
                f"{section + ': ' if section else ''}set {name} or {name}_file, not both "
                f"({env} or {env}_FILE)"
            )
    return problems


@dataclass(frozen=True)
class Credential:
    """A secret setting and the hosts that receive it (or listen with it).

    `value` is read only when a host is remote (it may read a `_file`); None is "not
    given". `required`: whether not giving it is unsafe there (else it means no auth).
    """

    setting: str
    hosts: tuple[str, ...]
    value: Callable[[], str | None]
    required: bool = True
    has_file: bool = False


def credential_problems(credential: Credential, defaults: frozenset[str]) -> list[str]:
    """Why `credential` is refused, if it is: for a non-loopback host, empty (or missing
    where required) or one of the code's default secrets `defaults`."""
    remote = [host for host in credential.hosts if not is_loopback(host)]
    if not remote:
        return []
    value = credential.value()
    if value is None and not credential.required:
        return []
    if value is None:
        problem = "is not set"
    elif not value:
        problem = "is empty"
    elif value in defaults:
        problem = "is a default in the code (the local stack's password)"
    else:
        return []
    return [
        f"{credential.setting} {problem}, for non-loopback {_hosts(remote)}: "
        f"{_how_to_set(credential.setting, credential.has_file)}"
    ]


def _hosts(hosts: list[str]) -> str:
    names = sorted(set(hosts))
    return f"host{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _basic_auth_password(user_info: str | None) -> str | None:
    return None if user_info is None else user_info.partition(":")[2]


def _connect_password(settings: AccordSettings) -> str | None:
    auth = settings.connect_auth()
    return None if auth is None else auth[1]


def _credentials(settings: AccordSettings) -> list[Credential]:
    stack = settings.stack
    credentials = [
        Credential(f"stack.{name}", (stack.host,), getattr(stack, name).get_secret_value)
        for name in ("postgres_superuser_password", "mariadb_root_password", "kafka_scram_password")
    ]
    for system in ("crm", "billing", "support"):
        source = settings.source(system)
        host = source.host or stack.host
        credentials += [
            Credential(f"{system}.{name}", (host,), getattr(source, name).get_secret_value)
            for name in ("app_password", "cdc_password")
        ]
    if settings.kafka_security.uses_sasl:
        credentials.append(
            Credential(
                "kafka_security.sasl_password",
                tuple(bootstrap_hosts(settings.kafka)),
                settings.kafka_security.password,
                has_file=True,
            )
        )
    redis = settings.redis
    credentials += [
        Credential(
            "redis_password",
            (url_host(redis),),
            lambda: _url_password(redis) or settings.redis_credentials().get("password"),
            has_file=True,
        ),
        Credential(
            "registry_basic_auth",
            (url_host(settings.registry),),
            lambda: _basic_auth_password(settings.registry_auth()),
            required=False,
            has_file=True,
        ),
        Credential(
            "connect_basic_auth",
            (url_host(settings.connect),),
            lambda: _connect_password(settings),
            required=False,
            has_file=True,
        ),
    ]
    return credentials


def _clear_text_problems(settings: AccordSettings) -> list[str]:
    """Passwords that would cross the network readable, or sit in a URL settings print."""
    problems = []
    security = settings.kafka_security
    remote_brokers = [h for h in bootstrap_hosts(settings.kafka) if not is_loopback(h)]
    if (
        remote_brokers
        and security.protocol == "SASL_PLAINTEXT"
        and security.sasl_mechanism == "PLAIN"
    ):
        problems.append(
            "kafka_security: SASL PLAIN over SASL_PLAINTEXT sends the password in clear to "
            f"non-loopback {_hosts(remote_brokers)}: set protocol SASL_SSL "
            "(ACCORD_KAFKA_SECURITY__PROTOCOL) or a SCRAM sasl_mechanism"
        )
    if _url_password(settings.redis) is not None and (
        settings.redis_password is not None or settings.redis_password_file is not None
    ):
        problems.append(
            "redis_url holds a password and redis_password or redis_password_file is set "
            "too: give it once (ACCORD_REDIS_PASSWORD_FILE or ACCORD_REDIS_PASSWORD)"
        )
    for url_setting, url, auth in (
        ("schema_registry_url", settings.registry, "registry_basic_auth"),
        ("connect_url", settings.connect, "connect_basic_auth"),
    ):
        if _url_password(url) is not None:
            problems.append(
                f"{url_setting} holds a password, which would be printed: "
                f"give 'user:password' as {auth} ({env_name(auth)}_FILE or {env_name(auth)})"
            )
        given = getattr(settings, auth) is not None or getattr(settings, f"{auth}_file") is not None
        host = url_host(url)
        if given and not is_loopback(host) and not url.lower().startswith("https://"):
            problems.append(
                f"{auth} would be sent in clear to non-loopback {_hosts([host])}: "
                f"use an https {url_setting} ({env_name(url_setting)})"
            )
    return problems


def unsafe_settings(settings: AccordSettings) -> list[str]:
    """Everything Accord refuses to load with, one line each naming the setting and the
    fix; empty for the local stack's defaults on loopback."""
    twice = secrets_given_twice(settings)
    problems = twice + _clear_text_problems(settings)
    if twice:  # a secret given twice has no value to judge
        return problems
    defaults = default_secrets(type(settings))
    for credential in _credentials(settings):
        problems += credential_problems(credential, defaults)
    return problems


def weak_settings(settings: AccordSettings) -> list[str]:
    """What Accord loads with but warns about, for non-loopback hosts: SCRAM over
    SASL_PLAINTEXT (the password stays off the wire, the records do not), and a Redis
    password over redis:// rather than rediss:// (Redis without TLS on a private network,
    as in docker-compose, is common enough not to refuse)."""
    warnings = []
    security = settings.kafka_security
    remote = [h for h in bootstrap_hosts(settings.kafka) if not is_loopback(h)]
    if remote and security.protocol == "SASL_PLAINTEXT" and security.sasl_mechanism != "PLAIN":
        warnings.append(
            f"kafka_security: {security.sasl_mechanism} over SASL_PLAINTEXT to non-loopback "
            f"{_hosts(remote)}: the password is not sent, but every record crosses "
            "the network in clear; set protocol SASL_SSL (ACCORD_KAFKA_SECURITY__PROTOCOL)"
        )
    redis = settings.redis
    has_password = _url_password(redis) is not None or (
        settings.redis_password is not None or settings.redis_password_file is not None
    )
    host = url_host(redis)
    if has_password and not is_loopback(host) and redis.lower().startswith("redis://"):
        warnings.append(
            f"redis_url: the Redis password crosses the network in clear to non-loopback "
            f"{_hosts([host])}; use a rediss:// URL (ACCORD_REDIS_URL) off a private network"
        )
    return warnings
