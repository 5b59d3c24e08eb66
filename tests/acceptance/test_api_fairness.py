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
from sqlalchemy import text

from storage.session import make_engine
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
