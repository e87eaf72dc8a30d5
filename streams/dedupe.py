"""Drop replayed changes, keep redelivered messages: one Redis round trip per batch.

Every change has a stable identity (`Change.change_id`: topic, primary key and source
log position). Two things can bring the same change id back, and they need opposite
answers:

- a Debezium replay after a connector restart is a NEW Kafka message carrying an old
  change id: it is a duplicate and is dropped;
- a redelivery of the SAME Kafka message after a worker crash (offsets not committed)
  must be processed again, because the crashed attempt may never have produced its
  output. Dropping it would lose the change forever.

So the first message that carried a change id is remembered as its origin,
`"topic/partition/offset"`, and only a different origin counts as a duplicate.

Key layout, under the configured prefix (`WorkerSettings.redis_prefix`):

    dedupe:{change_id} -> origin of the first message that carried it (string, TTL)

`SET key origin NX GET EX ttl` (Redis >= 7.0) stores the origin if the id is new and
returns the previous one otherwise, in one command; a batch is one pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from prometheus_client import Counter

from streams.errors import AccordError
from streams.redact import redact

CHECKED = Counter("accord_dedupe_checked_total", "Change ids checked for duplicates")
HITS = Counter("accord_dedupe_hits_total", "Duplicate changes dropped (replays)")


# Server replies that waiting cures: a replica promoted, memory freed, a load or a script
# finished. Every other error reply (NOPERM, WRONGTYPE, an unknown command, ...) needs an
# operator; connection errors and timeouts are transient, a refused login is not.
TRANSIENT_CODES = frozenset(
    {"READONLY", "OOM", "TRYAGAIN", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN"}
)
PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.DOTALL)


@dataclass(frozen=True)
class RedisFailure:
    """What a redis-py error means for Accord: `code` is Redis's error code (NOPERM,
    WRONGTYPE, OOM, ...) or the exception's class for a client-side error; `detail` is the
    server's text without the command (which may hold customer data)."""

    code: str
    transient: bool
    detail: str


def classify_redis_error(exc: redis.RedisError) -> RedisFailure:
    """Transient (retry with backoff, all is well) or not (still retried, but `/health`
    is not ready with the reason): the one place that decides."""
    detail = PIPELINE_PREFIX.sub("", str(exc.args[0]) if exc.args else "")
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return RedisFailure(getattr(exc, "status_code", None) or "NOAUTH", False, detail)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # LOADING among them
        code = getattr(exc, "status_code", None) or type(exc).__name__
        return RedisFailure(code, True, detail)
    if isinstance(exc, redis.ResponseError):
        code = getattr(exc, "status_code", None)
        if not code:  # redis-py keeps codes it does not know at the head of the text
            head, _, rest = detail.partition(" ")
            code = head if head.isupper() and head.isalpha() else "ERR"
            detail = rest if code == head else detail
        return RedisFailure(code, code in TRANSIENT_CODES, detail)
    return RedisFailure(type(exc).__name__, False, detail)


class RedisUnavailable(AccordError):
    """Redis could not answer, or refused; the caller retries the whole batch (fail
    closed). `failure.transient` False means retrying alone will not cure it: the
    worker's `/health` names `reason`."""

    def __init__(self, message: str, failure: RedisFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure or RedisFailure("unknown", True, message)

    @property
    def transient(self) -> bool:
        return self.failure.transient

    @property
    def reason(self) -> str:
        """ "redis NOPERM: ...", personal data redacted: fit for `/health`."""
        return redact(f"redis {self.failure.code}: {self.failure.detail}")[:300]


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn any redis-py error into `RedisUnavailable` naming what was being done, with
    its classification (`classify_redis_error`).

    The message carries the error class and redis-py's text (host and port at most),
    never the connection URL, which may hold a password.
    """
    try:
        yield
    except redis.RedisError as exc:
        failure = classify_redis_error(exc)
        verb = "unavailable" if failure.transient else "refused"
        raise RedisUnavailable(
            f"Redis {verb} while {action}: {type(exc).__name__}: {exc}", failure
        ) from exc


def origin_of(topic: str, partition: int, offset: int) -> str:
    """The origin text of one Kafka message, as `Deduplicator` remembers it."""
    return f"{topic}/{partition}/{offset}"


class Deduplicator:
    """Remembers, per change id, the Kafka message that first carried it."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            raise ValueError(f"dedupe ttl must be positive, got {ttl_s}")
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s

    def key(self, change_id: str) -> str:
        return f"{self._prefix}dedupe:{change_id}"

    def duplicates(self, items: Sequence[tuple[str, str]]) -> list[bool]:
        """For each `(change_id, origin)`, True when it is a duplicate to drop.

        A duplicate is an id first seen with another origin; the same id with the same
        origin is a redelivery of that very message and is kept. Within one batch the
        commands run in order, so a later item with the same id and another origin is
        the duplicate. Raises `RedisUnavailable`; then nothing of the batch was judged.
        """
        if not items:
            return []
        pipe = self._client.pipeline(transaction=False)
        for change_id, origin in items:
            pipe.set(self.key(change_id), origin, nx=True, get=True, ex=self._ttl_s)
        with redis_errors(f"checking {len(items)} change ids for duplicates"):
            previous = pipe.execute()
        verdicts = [
            _decoded(first) not in (None, origin)
            for first, (_, origin) in zip(previous, items, strict=True)
        ]
        CHECKED.inc(len(items))
        HITS.inc(sum(verdicts))
        return verdicts


def _decoded(value: bytes | str | None) -> str | None:
    """Redis replies as bytes unless the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
