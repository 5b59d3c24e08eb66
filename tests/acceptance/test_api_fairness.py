"""One key cannot hold ``/v1/embeddings`` for the others on a live ``embedq serve`` with a real
worker (``tasks.api.admission``): a request over the input cap is refused at once, a key past
its waiting texts gets a 429, and another key's one-text request is served meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
import redis
from sqlalchemy import text

from storage.session import make_engine
from tasks import names
from tests.acceptance.conftest import KEY, Fleet, Server
from tests.waiting import wait_until

OTHER = "sk-fairness-other"


def post(server: Server, key: str, texts: list[str], model: str = "minilm") -> httpx.Response:
    return httpx.post(
        server.url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {key}"},
        json={"input": texts, "model": model},
        timeout=120,
    )


def test_100000_inputs_are_refused_at_once_and_another_key_is_served_meanwhile(
    serve: Callable[..., Server],
) -> None:
    server = serve(EMBEDQ_API_KEYS=f"{KEY},{OTHER}")
    answers: dict[str, httpx.Response] = {}
    heavy = threading.Thread(
        target=lambda: answers.update(a=post(server, KEY, [f"text {n}" for n in range(100_000)]))
    )
    heavy.start()
    started = time.monotonic()
    served = server.client(OTHER).embeddings.create(input="one short text", model="minilm")
    light_s = time.monotonic() - started
    heavy.join()
    assert len(served.data) == 1 and len(served.data[0].embedding) == 384
    refused = answers["a"]
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "too_many_inputs"
    assert refused.json()["error"]["param"] == "input"
    print(f"key B's one text served in {light_s * 1000:.0f} ms beside key A's 100,000")


def test_a_key_past_its_waiting_texts_gets_a_429_and_another_key_goes_on(
    serve: Callable[..., Server], fleet: Fleet
) -> None:
    from tasks import producer

    producer.register_model("hf://org/unserved", "unserved")  # known, but no worker runs it
    server = serve(
        EMBEDQ_API_KEYS=f"{KEY},{OTHER}",
        EMBEDQ_API_MAX_WAITING_TEXTS="3000",
        EMBEDQ_API_WAIT_TIMEOUT="20",
    )
    waiting = threading.Thread(target=post, args=(server, KEY, ["waits"] * 2048, "unserved"))
    waiting.start()
    try:
        # Its job in the store: the request is past admission and waits for a worker.
        engine = make_engine(fleet.database_url)
        query = text("SELECT count(*) FROM jobs WHERE model_name = 'unserved'")
        with engine.connect() as connection:
            wait_until(lambda: connection.execute(query).scalar() == 1, 30, "the waiting job")
        engine.dispose()
        with pytest.raises(openai.APIStatusError) as held:
            server.client(KEY).embeddings.create(input=["more"] * 2048, model="minilm")
        assert held.value.status_code == 429
        assert held.value.body["code"] == "too_many_waiting"  # type: ignore[index]
        assert held.value.response.headers["retry-after"] == "1"
        served = server.client(OTHER).embeddings.create(input="another key", model="minilm")
        assert len(served.data) == 1
    finally:
        waiting.join()


def test_another_key_s_one_text_goes_ahead_of_a_key_s_8192_admitted_texts(
    serve: Callable[..., Server], fleet: Fleet, corpus: list[str]
) -> None:
    """Within its limits (4 requests of 2,048, its whole waiting share), key A fills the queue
    with 64 messages of real texts; key B's one text, sent after all of them, goes ahead of
    them (``tasks.api.admission.priority_for``) instead of waiting its turn behind them."""
    server = serve(EMBEDQ_API_KEYS=f"{KEY},{OTHER}", EMBEDQ_API_WAIT_TIMEOUT="5")
    texts = [text for text in corpus if 200 <= len(text) <= 600][: 4 * 2048]
    assert len(texts) == 4 * 2048, "the corpus is too small for this test"
    heavy = [
        threading.Thread(target=post, args=(server, KEY, texts[n * 2048 : (n + 1) * 2048]))
        for n in range(4)
    ]
    for thread in heavy:
        thread.start()
    engine = make_engine(fleet.database_url)
    broker = redis.Redis.from_url(fleet.broker_url)
    lists = names.queue_lists(names.Queue.INTERACTIVE)
    try:
        wait_until(  # key A's 64 messages on the queue, but the few the worker took
            lambda: sum(broker.llen(name) for name in lists) >= 60, 60, "key A's messages"
        )
        started = time.monotonic()
        served = server.client(OTHER).embeddings.create(input="one short text", model="minilm")
        light_s = time.monotonic() - started
        with engine.connect() as connection:
            done = connection.execute(
                text("SELECT sum(done_items) FROM jobs WHERE total_items = 2048")
            ).scalar()
    finally:
        engine.dispose()
        broker.close()
        for thread in heavy:
            thread.join()
    assert len(served.data) == 1
    print(f"key B's one text served in {light_s * 1000:.0f} ms; key A's texts done by then: {done}")
    assert done is not None and done < len(texts) / 2, "key A's work was nearly done: no test"
    assert light_s < 5, f"key B waited {light_s:.1f} s behind key A's texts"
