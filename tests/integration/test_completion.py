"""Completion signals over real Redis: a waiter wakes when the job's signal arrives, and a
signal sent before the waiter blocks is not missed."""

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tasks import completion
from tests.conftest import require

URL = "redis://127.0.0.1:6379/11"


@pytest.fixture
def broker() -> Iterator[str]:
    try:
        client = redis.Redis.from_url(URL, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        require(False, f"Redis is not reachable at {URL}: {exc}")
    yield URL
    completion.close()


def test_a_waiter_wakes_when_the_job_is_signalled(broker: str) -> None:
    timer = threading.Timer(0.2, completion.signal, args=(broker, "job-1"))
    started = time.monotonic()
    timer.start()
    assert completion.block(broker, "job-1", 10) is True
    waited = time.monotonic() - started
    timer.join()
    assert 0.15 < waited < 5  # woken by the signal, not by the 10 s timeout


def test_a_signal_sent_before_the_wait_is_kept_briefly(broker: str) -> None:
    completion.signal(broker, "job-2")
    ttl = redis.Redis.from_url(broker).ttl(completion.KEY.format("job-2"))
    assert 0 < ttl <= completion.TTL_S
    started = time.monotonic()
    completion.block(broker, "job-2", 10)
    assert time.monotonic() - started < 5


def test_without_a_signal_the_wait_times_out_and_without_redis_it_says_to_poll(
    broker: str,
) -> None:
    started = time.monotonic()
    assert completion.block(broker, "job-3", 0.3) is True
    assert time.monotonic() - started >= 0.25
    assert completion.block(None, "job-3", 0.3) is False
    assert completion.block("amqp://guest@127.0.0.1//", "job-3", 0.3) is False
