"""Match key names without personal data: keyed hashes of the values identity matches by.

Identity indexes each match value (an email, a tax id, ...) under a Redis key that names
it. The name used to be the value itself (`<prefix>match:{field}:{value}`), so a key
listing, `MONITOR`, the slow log or a copy of the keyspace showed customer emails and tax
ids. The name is now a keyed hash of the value:

    <prefix>hmatch:{field}:{digest}    digest = base64url(HMAC-SHA256(secret, field NUL value))

`value` is the text identity compares (`streams.identity.match_text` of the value mapping
already normalized: emails lower-cased, phones in E.164), so equal values still meet and a
guess cannot be checked without the secret. The secret is `identity.key_secret` (or its
`_file`); a Redis on loopback may do without one: a secret is then generated once and kept
in `<state_dir>/identity-key-secret` (mode 0600), so restarts keep the same keys. A worker
whose Redis is anywhere else refuses to start without it.

Changing the secret changes every key name: the old keys no longer match anything. So a
check value, `<prefix>match-key-check` (a hash of the secret, not the secret), records which
secret made the keys, and a resolver refuses to index under another one
(`MatchKeySecretChanged`). Re-keying is `accord identity rebuild --rekey`.

Keys of the old clear-text layout (`<prefix>match:...`: a distinct name, so a scan finds
exactly them) are renamed to their hashed names by `migrate_legacy_keys`, one atomic
script per key; a resolver does it by itself before its first batch when it finds any,
and `accord identity migrate-keys` does it on demand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis

from streams.dedupe import redis_errors
from streams.errors import AccordError, ConfigError
from streams.settings_safety import is_loopback

__all__ = [
    "CHECK_KEY",
    "GENERATED_SECRET_FILE",
    "LEGACY_NAMESPACE",
    "MIN_SECRET_CHARS",
    "NAMESPACE",
    "MatchKeySecretChanged",
    "MatchKeys",
    "MigrationReport",
    "check_secret",
    "drop_match_keys",
    "generated_secret",
    "glob_escape",
    "is_loopback_redis",
    "key_secret",
    "match_digest",
    "migrate_legacy_keys",
]

log = logging.getLogger(__name__)

NAMESPACE = "hmatch:"  # hashed match keys, under the prefix
LEGACY_NAMESPACE = "match:"  # clear-text match keys of earlier versions
CHECK_KEY = "match-key-check"
GENERATED_SECRET_FILE = "identity-key-secret"
MIN_SECRET_CHARS = 16
MIGRATE_SCAN_COUNT = 1000
_CHECK_MESSAGE = b"accord match key check v1"

# KEYS[1]: a clear-text match key; KEYS[2]: its hashed name. Moves the one to the other in
# one step. The hashed key, when it exists already, was indexed by a worker of this version
# after the clear one; it is what resolution reads, so it stays (first writer wins from
# then on) and the clear one goes; a different golden id is reported as a conflict.
# Returns {outcome, clear key's golden id, hashed key's golden id}.
MIGRATE_SCRIPT = """
local old = redis.call('GET', KEYS[1])
if not old then
  return {'gone', false, false}
end
local new = redis.call('GET', KEYS[2])
if not new then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return {'moved', old, false}
end
redis.call('DEL', KEYS[1])
if new == old then
  return {'same', old, new}
end
return {'conflict', old, new}
"""


def match_digest(secret: bytes, field: str, value: str) -> str:
    """The keyed hash a match value is indexed by: base64url (no padding) of
    HMAC-SHA256(secret, field NUL value), 43 characters.

    Pure and stable: the same secret, field and value give the same digest in every
    process and release (key names depend on it). The field is part of the message, so
    the same text in two fields gives two unrelated digests. `value` is compared as given:
    normalizing is mapping's job (`streams.mapping`) and `match_text`'s, before this.
    """
    if not secret:
        raise ConfigError("identity.key_secret is empty")
    mac = hmac.new(secret, f"{field}\0{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class MatchKeys:
    """The match key names of one prefix under one secret."""

    prefix: str
    secret: bytes = field(repr=False)

    def key(self, field_name: str, value: str) -> str:
        """`<prefix>hmatch:{field}:{digest}`: no personal data in the name."""
        digest = match_digest(self.secret, field_name, value)
        return f"{self.prefix}{NAMESPACE}{field_name}:{digest}"

    def legacy_key(self, field_name: str, value: str) -> str:
        """The clear-text name earlier versions gave the same value (for migration)."""
        return f"{self.prefix}{LEGACY_NAMESPACE}{field_name}:{value}"

    def parse_legacy(self, key: str) -> tuple[str, str] | None:
        """`(field, value)` of a clear-text match key of this prefix, else None."""
        head = self.prefix + LEGACY_NAMESPACE
        if not key.startswith(head):
            return None
        name, sep, value = key[len(head) :].partition(":")
        return (name, value) if sep and name and value else None

    @property
    def legacy_pattern(self) -> str:
        """A SCAN pattern that finds exactly the clear-text match keys of this prefix."""
        return f"{glob_escape(self.prefix)}{LEGACY_NAMESPACE}*"

    @property
    def pattern(self) -> str:
        """A SCAN pattern that finds exactly the hashed match keys of this prefix."""
        return f"{glob_escape(self.prefix)}{NAMESPACE}*"

    @property
    def check_key(self) -> str:
        return f"{self.prefix}{CHECK_KEY}"

    @property
    def check_value(self) -> str:
        """Which secret made the keys, without revealing it (a keyed hash of a constant)."""
        return hmac.new(self.secret, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]


class MatchKeySecretChanged(AccordError):
    """The match keys under a prefix were made with another secret than the configured one."""

    def __init__(self, prefix: str, check_key: str) -> None:
        self.prefix = prefix
        super().__init__(
            f"the identity match keys under {prefix!r} were made with another "
            f"identity.key_secret ({check_key} does not fit the configured one): every "
            "lookup would miss and found duplicate golden records. Configure the secret "
            "they were made with, or re-key them: stop the workers and run "
            "`accord identity rebuild --rekey`"
        )


def glob_escape(text: str) -> str:
    """`text` as a literal inside a Redis SCAN/KEYS glob pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def check_secret(client: redis.Redis, keys: MatchKeys) -> None:
    """Record which secret makes the keys, or raise `MatchKeySecretChanged` when the keys
    already recorded another one."""
    with redis_errors("checking the identity key secret"):
        client.set(keys.check_key, keys.check_value, nx=True)
        stored = client.get(keys.check_key)
    text = stored.decode() if isinstance(stored, bytes) else stored
    if text is not None and text != keys.check_value:
        raise MatchKeySecretChanged(keys.prefix, keys.check_key)


@dataclass
class MigrationReport:
    """What `migrate_legacy_keys` did: keys moved, already there (same golden id), gone
    meanwhile, and conflicts (`(hashed key, kept golden id, dropped golden id)`)."""

    scanned: int = 0
    moved: int = 0
    same: int = 0
    gone: int = 0
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.moved + self.same + len(self.conflicts)

    def describe(self) -> str:
        text = (
            f"{self.scanned} clear-text match keys found: {self.moved} renamed to hashed "
            f"names, {self.same} already there, {self.gone} gone meanwhile, "
            f"{len(self.conflicts)} conflicts"
        )
        for key, kept, dropped in self.conflicts[:20]:
            text += f"\n  {key}: kept golden {kept}, dropped {dropped} (review both records)"
        if len(self.conflicts) > 20:
            text += f"\n  ... and {len(self.conflicts) - 20} more"
        return text


def migrate_legacy_keys(
    client: redis.Redis,
    keys: MatchKeys,
    progress: Callable[[str], None] = lambda _message: None,
    progress_every: int = 10_000,
) -> MigrationReport:
    """Rename every clear-text match key of `keys.prefix` to its hashed name.

    SCAN (never KEYS) with a pattern only clear-text keys match; each key moves in one
    atomic script (`MIGRATE_SCRIPT`), so a worker resolving meanwhile sees the value under
    one name or the other, and a run that dies half-way leaves nothing half-done. Rerunning
    is safe: a finished run leaves no clear-text key, and the next finds none. A hashed key
    that exists already keeps its golden id; a different one in the clear key is a
    conflict, reported (the two golden records share the value, as after a rebuild).
    """
    report = MigrationReport()
    script = client.register_script(MIGRATE_SCRIPT)
    with redis_errors("migrating clear-text match keys"):
        for raw in client.scan_iter(match=keys.legacy_pattern, count=MIGRATE_SCAN_COUNT):
            name = raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else raw
            parsed = keys.parse_legacy(name)
            if parsed is None:
                continue
            report.scanned += 1
            new = keys.key(*parsed)
            outcome, old_id, new_id = script(keys=[raw, new])
            outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
            if outcome == "moved":
                report.moved += 1
            elif outcome == "same":
                report.same += 1
            elif outcome == "gone":
                report.gone += 1
            else:
                report.conflicts.append((new, _text(new_id), _text(old_id)))
            if report.scanned % progress_every == 0:
                progress(f"{report.scanned} clear-text match keys migrated so far")
    return report


def drop_match_keys(client: redis.Redis, keys: MatchKeys) -> int:
    """Delete every match key of `keys.prefix`, hashed or clear-text, and the secret's
    check value: the first step of re-keying, which a rebuild from the golden records
    completes. Returns how many keys were deleted."""
    deleted = 0
    with redis_errors("deleting match keys"):
        for pattern in (keys.pattern, keys.legacy_pattern):
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=MIGRATE_SCAN_COUNT):
                batch.append(key)
                if len(batch) == MIGRATE_SCAN_COUNT:
                    deleted += client.unlink(*batch)
                    batch = []
            if batch:
                deleted += client.unlink(*batch)
        client.delete(keys.check_key)
    return deleted


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_loopback_redis(url: str) -> bool:
    """Whether a Redis URL points at this machine: a loopback address, `localhost`, or a
    unix socket."""
    parts = urlsplit(url)
    if parts.scheme in ("unix", "redis+unix"):
        return True
    host = (parts.hostname or "").lower()
    return host.endswith(".localhost") or is_loopback(host)


def key_secret(configured: str | None, redis_url: str, state_dir: Path) -> bytes:
    """The secret match keys are made with.

    The configured one (`identity.key_secret` or its file) when set, at least
    `MIN_SECRET_CHARS` characters; else, for a Redis on loopback (the local stack,
    development), the one generated in `state_dir` (`generated_secret`); else a
    `ConfigError` saying how to set one.
    """
    if configured is not None:
        if len(configured) < MIN_SECRET_CHARS:
            raise ConfigError(f"identity.key_secret must be at least {MIN_SECRET_CHARS} characters")
        return configured.encode()
    if is_loopback_redis(redis_url):
        return generated_secret(state_dir)
    raise ConfigError(
        "identity.key_secret is not set and Redis is not on loopback: match keys (hashes "
        "of customer emails and tax ids) need a secret shared by every worker of the app. "
        "Make one (`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) and set "
        "ACCORD_IDENTITY__KEY_SECRET_FILE to a file holding it (or "
        "ACCORD_IDENTITY__KEY_SECRET); keep it: changing it means re-keying "
        "(`accord identity rebuild --rekey`)"
    )


def generated_secret(state_dir: Path) -> bytes:
    """The secret generated for a loopback Redis, made once in
    `<state_dir>/identity-key-secret` (mode 0600) and read back afterwards. Two processes
    making it at once agree: the file appears whole (a hard link of a finished one) and
    only the first link wins."""
    path = state_dir / GENERATED_SECRET_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        temp = state_dir / f".{GENERATED_SECRET_FILE}.{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temp, path)
            log.info("generated the identity key secret in %s (loopback Redis)", path)
        except FileExistsError:
            pass
        finally:
            temp.unlink()
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the identity key secret: {exc.strerror}") from exc
    if len(text) < MIN_SECRET_CHARS:
        raise ConfigError(f"{path}: the identity key secret is shorter than {MIN_SECRET_CHARS}")
    return text.encode()
