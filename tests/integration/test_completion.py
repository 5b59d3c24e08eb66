"""Completion signals over real Redis: a waiter wakes when the job's signal arrives, and a
signal sent before the waiter blocks is not missed."""

import threading
import time

import redis

from tasks import completion


def test_a_waiter_wakes_when_the_job_is_signalled(redis_url: str) -> None:
    timer = threading.Timer(0.2, completion.signal, args=(redis_url, "job-1"))
    started = time.monotonic()
    timer.start()
    assert completion.block(redis_url, "job-1", 10) is True
    waited = time.monotonic() - started
    timer.join()
    assert 0.15 < waited < 5  # woken by the signal, not by the 10 s timeout


def test_a_signal_sent_before_the_wait_is_kept_briefly(
    redis_url: str, redis_client: redis.Redis
) -> None:
    completion.signal(redis_url, "job-2")
    ttl = redis_client.ttl(completion.KEY.format("job-2"))
    assert 0 < ttl <= completion.TTL_S
    started = time.monotonic()
    assert completion.block(redis_url, "job-2", 10) is True
    assert time.monotonic() - started < 5
    assert redis_client.exists(completion.KEY.format("job-2")) == 0  # taken by the waiter


def test_without_a_signal_the_wait_times_out_and_without_redis_it_says_to_poll(
    redis_url: str,
) -> None:
    started = time.monotonic()
    assert completion.block(redis_url, "job-3", 0.3) is True
    assert time.monotonic() - started >= 0.25
    assert completion.block(None, "job-3", 0.3) is False
    assert completion.block("amqp://guest@127.0.0.1//", "job-3", 0.3) is False
