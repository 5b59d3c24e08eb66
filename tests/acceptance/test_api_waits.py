"""Requests that wait for workers hold no thread of a live ``embedq serve``
(``tasks.job_wait``): with hundreds of them waiting on a worker that is not there, ``/health``
and the store-only routes answer at once, and every waiting request gets its 504 on time."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import httpx

from tests.acceptance.conftest import KEY, Brokers, Server

WAITING = 200
WAIT_S = 8.0


async def wait_and_probe(server: Server) -> tuple[list[tuple[int, str, float]], list[float]]:
    """``WAITING`` embeddings requests at once, and ``/health`` asked every 50 ms while they
    wait: each request's status, error code and seconds; each probe's seconds."""
    auth = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=WAITING + 10)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:

        async def embed(number: int) -> tuple[int, str, float]:
            started = time.monotonic()
            answer = await client.post(
                "/v1/embeddings",
                headers=auth,
                json={"input": f"waiting text {number}", "model": "unserved"},
            )
            code = answer.json()["error"]["code"] if answer.status_code >= 400 else ""
            return answer.status_code, code, time.monotonic() - started

        async def probe() -> list[float]:
            await asyncio.sleep(1)  # the requests are in, and waiting
            took = []
            while len(took) < 40:
                started = time.monotonic()
                answer = await client.get("/health")
                assert answer.status_code == 200, answer.text
                took.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            return took

        *answers, probes = await asyncio.gather(*(embed(n) for n in range(WAITING)), probe())
    return answers, probes


def test_health_answers_at_once_while_200_requests_wait_and_each_gets_its_504_on_time(
    serve: Callable[..., Server], brokers: Brokers
) -> None:
    from tasks import producer

    producer.register_model("hf://org/unserved", "unserved")  # known, but no worker runs
    server = serve(
        EMBEDQ_BROKER_URL=brokers.database("nobody"),
        EMBEDQ_API_WAIT_TIMEOUT=str(WAIT_S),
        EMBEDQ_API_RATE_LIMIT="0",
    )
    answers, probes = asyncio.run(wait_and_probe(server))
    assert {(status, code) for status, code, _ in answers} == {(504, "job_pending")}
    # Each request waits its own timeout from when it came, not from when a thread came free:
    # before, the 41st got its 60 s 504 after 117 s.
    slowest = max(took for _, _, took in answers)
    assert slowest < WAIT_S * 2, f"the slowest 504 came after {slowest:.1f}s"
    # Not a speed assertion: the probes are counted, and the median printed for the record.
    print(
        f"/health while {WAITING} wait: p50 {statistics.median(probes) * 1000:.1f} ms,"
        f" max {max(probes) * 1000:.1f} ms; slowest 504 after {slowest:.1f}s"
    )
    assert server.get("/v1/models").status_code == 200
