"""The HTTP API with real parts: ``embedq serve`` processes on free ports, a real Celery worker,
Redis, SQLite or PostgreSQL and the exported model, called with OpenAI's own client."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from storage import embeddings
from storage.session import scope, sessions_for
from tasks.api.auth import key_id
from tests.acceptance.conftest import KEY, Brokers, Fleet, Server
from tests.conftest import cosines
from tests.waiting import wait_until
from worker.engine import Engine

TEXTS = [
    "A quick check of the embeddings endpoint.",
    "Vectors come back in the order the texts were given.",
    "word " * 600,  # over the model's 256 tokens: truncated, and counted as truncated
]


@pytest.mark.parametrize("fleet", ["sqlite", "postgresql"], indirect=True)
def test_openai_s_client_gets_the_engine_s_vectors_and_the_stored_token_counts(
    fleet: Fleet, serve: Callable[..., Server], engine: Engine
) -> None:
    server = serve()
    client = server.client()
    reference = engine.encode(TEXTS)

    raw = client.embeddings.with_raw_response.create(
        input=TEXTS, model="minilm", encoding_format="float"
    )
    floats = raw.parse()
    job_id = raw.headers["x-embedq-job"]
    got = np.array([item.embedding for item in floats.data], dtype=np.float32)
    assert got.shape == (3, 384)
    assert float(np.min(cosines(got, reference.vectors))) >= 0.9999
    assert [item.index for item in floats.data] == [0, 1, 2]
    with scope(sessions_for(fleet.database_url)) as session:
        stored = sum(row.token_count for row in embeddings.vectors_with_tokens(session, job_id))
    assert stored == sum(reference.token_counts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == stored
    assert reference.token_counts[2] == 256  # the long text was cut at the model's length

    asked = client.embeddings.create(input=TEXTS, model="minilm", encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(str(d.embedding)), "<f4") for d in asked.data]
    )
    assert float(np.min(cosines(decoded, reference.vectors))) >= 0.9999
    default = client.embeddings.create(input=TEXTS[0], model="minilm")  # base64, decoded by it
    assert float(cosines([default.data[0].embedding], reference.vectors[:1])[0]) >= 0.9999
    assert default.usage.prompt_tokens == reference.token_counts[0]

    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(input=TEXTS[0], model="minilm", dimensions=128)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(input=TEXTS[0], model="no-such-model")
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-wrong").models.list()
    no_key = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "model": "minilm"})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.UnprocessableEntityError) as malformed:
        client.embeddings.create(input=TEXTS[0], model="minilm", encoding_format="hex")  # type: ignore[arg-type]
    assert malformed.value.body["param"] == "encoding_format"  # type: ignore[index]


@pytest.mark.parametrize(
    "unread",
    ["\u200b\u200b\u200b", "\x01\x02\x03", "\ue000\ue001"],
    ids=["zero-width", "control", "private-use"],
)
def test_a_text_the_model_reads_nothing_in_is_a_400_from_a_real_worker(
    fleet: Fleet, serve: Callable[..., Server], engine: Engine, unread: str
) -> None:
    """The producer accepts a text of zero-width spaces, control or private-use characters (it
    is not whitespace); the worker's engine finds nothing in it to read and refuses it, rather
    than embedding [CLS][SEP]. The failure is stored as input, so OpenAI's client gets a 400
    naming the input, while the good text of the request is stored with the engine's
    vector."""
    client = serve().client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.with_raw_response.create(
            input=["a perfectly good text", unread], model="minilm"
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_input",
        "input",
    )
    assert "partially_failed: 1 of 2 texts failed" in error["message"]
    assert "the model reads nothing in this text" in error["message"]
    job_id = refused.value.response.headers["x-embedq-job"]
    with scope(sessions_for(fleet.database_url)) as session:
        stored = embeddings.vectors_with_tokens(session, job_id)
    assert [row.item_id for row in stored] == ["0"]
    vector = np.frombuffer(stored[0].vector, "<f4")
    reference = engine.encode(["a perfectly good text"]).vectors
    assert float(cosines([vector], reference)[0]) >= 0.9999


def test_a_text_with_a_nul_is_refused_as_a_batch_line_refuses_it(
    serve: Callable[..., Server],
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        serve().client().embeddings.create(input=["fine", "a\x00b"], model="minilm")
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_input"
    assert "texts at index 1 hold a NUL character" in error["message"]


def test_a_body_over_the_cap_is_a_413_in_openai_s_shape(serve: Callable[..., Server]) -> None:
    client = serve(EMBEDQ_API_MAX_REQUEST_BYTES="4096").client()
    assert client.embeddings.create(input="small enough", model="minilm").data
    with pytest.raises(openai.APIStatusError) as too_big:
        client.embeddings.create(input=["many words " * 100] * 8, model="minilm")
    assert too_big.value.status_code == 413
    assert too_big.value.body["code"] == "request_too_large"  # type: ignore[index]


def test_jobs_models_and_health_answer_from_the_store(
    serve: Callable[..., Server], engine: Engine
) -> None:
    server = serve()
    auth = {"Authorization": f"Bearer {KEY}"}
    submitted = httpx.post(
        server.url + "/v1/jobs",
        headers=auth,
        json={"input": TEXTS, "ids": ["a", "b", "c"], "queue": "interactive"},
        timeout=30,
    )
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert (job["model"], job["tag"], job["total"]) == ("minilm", f"api:{key_id(KEY)}", 3)

    def ended() -> dict[str, Any] | None:
        found: dict[str, Any] = server.get(f"/v1/jobs/{job['id']}").json()
        return found if found["state"] in ("succeeded", "failed", "partially_failed") else None

    job = wait_until(ended, 120, f"job {job['id']} to end", every=0.2)
    assert (job["state"], job["done"], job["failed"]) == ("succeeded", 3, 0)
    reference = engine.encode(TEXTS).vectors

    npy = server.get(f"/v1/jobs/{job['id']}/embeddings")
    assert npy.headers["x-embedq-count"] == "3"
    matrix = np.load(io.BytesIO(npy.content))
    assert matrix.dtype == np.float32 and matrix.shape == (3, 384)
    assert float(np.min(cosines(matrix, reference))) >= 0.9999
    jsonl = server.get(f"/v1/jobs/{job['id']}/embeddings", params={"format": "jsonl"})
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], "f4"), matrix)

    models = server.client().models.list()
    (minilm,) = [model for model in models.data if model.id == "minilm"]
    assert minilm.owned_by == "embedq"
    assert minilm.model_extra is not None and minilm.model_extra["dim"] == 384
    assert minilm.model_extra["ready_on"]  # the worker's host reported it at start
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.json() == {"status": "ok", "store": "ok", "broker": "ok"}


def test_a_job_no_worker_takes_is_a_504_naming_it_and_goes_on(
    serve: Callable[..., Server], brokers: Brokers
) -> None:
    from tasks import producer

    producer.register_model("hf://org/unserved", "unserved")  # known, but no worker runs
    nobody = brokers.database("nobody")  # a broker no worker consumes
    server = serve(EMBEDQ_API_WAIT_TIMEOUT="1.5", EMBEDQ_BROKER_URL=nobody)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as timed_out:
        server.client().embeddings.create(input="nobody takes this", model="unserved")
    waited = time.monotonic() - started
    assert timed_out.value.status_code == 504
    job_id = timed_out.value.response.headers["x-embedq-job"]
    error = timed_out.value.body
    assert isinstance(error, dict) and error["code"] == "job_pending"
    assert f"job {job_id} did not finish within 1.5s" in error["message"]
    assert 1.5 <= waited < 15
    job = server.get(f"/v1/jobs/{job_id}").json()
    assert (job["state"], job["queue"], job["model"]) == ("queued", "interactive", "unserved")
    client = redis.Redis.from_url(nobody)
    assert client.llen("interactive") == 1  # the job's one batch, waiting for a worker
    client.close()
