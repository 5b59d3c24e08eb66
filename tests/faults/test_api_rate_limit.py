"""The API's per-key rate limit over a real Redis: counted there, so two ``serve`` instances
share one count; while that Redis is down each instance counts on its own, so reads that need
no broker go on (they were answered 503) and the limit still holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from storage.session import dispose_all
from tasks.api.app import create_app
from tests.processes import PrivateRedis
from worker.settings import Settings

KEY = "sk-limit-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def instances(broker: PrivateRedis, sqlite_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps, as two ``serve`` processes behind a load balancer: one store, one broker."""
    settings = Settings(
        database_url=sqlite_url, broker_url=broker.url, api_keys=[KEY], api_rate_limit=3
    )
    with (
        TestClient(create_app(settings)) as first,
        TestClient(create_app(settings)) as second,
    ):
        yield first, second
    dispose_all()


def test_two_instances_share_the_count_and_count_alone_while_redis_is_down(
    instances: tuple[TestClient, TestClient], broker: PrivateRedis
) -> None:
    first, second = instances
    codes = [client.get("/v1/models", headers=AUTH).status_code for client in (first, second)]
    codes += [second.get("/v1/models", headers=AUTH).status_code]
    over = first.get("/v1/models", headers=AUTH)
    assert [*codes, over.status_code] == [200, 200, 200, 429]
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    (name,) = broker.client().keys("embedq:api:rate:*")
    assert int(broker.client().get(name) or 0) == 4  # counted in Redis, by both instances
    assert 60 < broker.client().ttl(name) <= 120  # and gone once its minute is past

    broker.kill()
    # The store answers without the broker: reads go on, counted in this instance.
    down = [second.get("/v1/models", headers=AUTH), second.get("/v1/jobs/nope", headers=AUTH)]
    assert [answer.status_code for answer in down] == [200, 404]
    assert second.get("/health").status_code == 503  # and the instance says what is away
    assert second.get("/v1/models", headers=AUTH).status_code == 200
    assert second.get("/v1/models", headers=AUTH).status_code == 429  # 4 in this process

    broker.start()  # back, empty (no persistence): the count starts again, nothing is stuck
    assert first.get("/v1/models", headers=AUTH).status_code == 200
