"""Which Redis errors are transient and which need an operator (streams.dedupe)."""

from __future__ import annotations

import pytest
import redis
from redis._parsers.base import BaseParser
from redis.client import Pipeline

from streams.dedupe import RedisUnavailable, classify_redis_error, redis_errors


def reply(text: str) -> redis.RedisError:
    """The exception redis-py raises for the server's error reply `text`."""
    return BaseParser.parse_error(text)


@pytest.mark.parametrize(
    "error, code",
    [
        (reply("READONLY You can't write against a read only replica."), "READONLY"),
        (reply("OOM command not allowed when used memory > 'maxmemory'."), "OOM"),
        (reply("TRYAGAIN Multiple keys request during rehashing of slot"), "TRYAGAIN"),
        (reply("LOADING Redis is loading the dataset in memory"), "LOADING"),
        (reply("BUSY Redis is busy running a script."), "BUSY"),
        (redis.ConnectionError("Error 111 connecting to 127.0.0.1:16379."), "ConnectionError"),
        (redis.TimeoutError("Timeout reading from socket"), "TimeoutError"),
    ],
)
def test_transient_errors(error: redis.RedisError, code: str) -> None:
    failure = classify_redis_error(error)
    assert (failure.code, failure.transient) == (code, True)


@pytest.mark.parametrize(
    "error, code",
    [
        (reply("NOPERM User u has no permissions to run the 'set' command"), "NOPERM"),
        (reply("WRONGTYPE Operation against a key holding the wrong kind of value"), "WRONGTYPE"),
        (reply("NOAUTH Authentication required."), "NOAUTH"),
        (reply("WRONGPASS invalid username-password pair or user is disabled."), "WRONGPASS"),
        (reply("ERR unknown command 'FOO', with args beginning with: "), "ERR"),
        (reply("ERR syntax error"), "ERR"),
        (redis.DataError("Invalid input of type: 'dict'"), "DataError"),
    ],
)
def test_errors_that_need_an_operator(error: redis.RedisError, code: str) -> None:
    failure = classify_redis_error(error)
    assert (failure.code, failure.transient) == (code, False)


def test_parser_gives_the_expected_classes() -> None:
    """The classification leans on redis-py's classes: guard the ones that matter."""
    assert isinstance(reply("NOPERM x"), redis.exceptions.NoPermissionError)
    assert isinstance(reply("OOM x"), redis.exceptions.OutOfMemoryError)
    assert isinstance(reply("READONLY x"), redis.exceptions.ReadOnlyError)
    assert isinstance(reply("LOADING x"), redis.exceptions.BusyLoadingError)
    assert isinstance(reply("NOAUTH x"), redis.AuthenticationError)  # a ConnectionError


def test_a_pipeline_error_is_classified_by_the_server_reply_not_the_command() -> None:
    error = reply("WRONGTYPE Operation against a key holding the wrong kind of value")
    Pipeline.annotate_exception(None, error, 1, ("SET", "accord:email:ada@example.com", "x"))
    assert "ada@example.com" in str(error)
    failure = classify_redis_error(error)
    assert failure.code == "WRONGTYPE" and not failure.transient
    assert failure.detail == "Operation against a key holding the wrong kind of value"


def test_redis_errors_carries_the_classification_and_a_reason_fit_for_health() -> None:
    error = reply("NOPERM User ada@example.com has no permissions to run the 'set' command")
    with pytest.raises(RedisUnavailable) as refused, redis_errors("checking 3 change ids"):
        raise error
    assert not refused.value.transient
    assert refused.value.reason == (
        "redis NOPERM: User <email> has no permissions to run the 'set' command"
    )
    assert str(refused.value).startswith("Redis refused while checking 3 change ids")

    with (
        pytest.raises(
            RedisUnavailable, match=r"Redis unavailable while x.*ConnectionError"
        ) as down,
        redis_errors("x"),
    ):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:16379.")
    assert down.value.transient
