"""The HTTP API in process (FastAPI's TestClient): keys, rate limits, OpenAI's shapes and error
bodies, request caps, and jobs. Jobs go through the real producer into a SQLite store; only
the broker is replaced, by a publisher handed to the app that embeds each batch at once with
the worker's own code and the fake engine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from storage import jobs, model_catalog
from storage.models import FailureKind, ModelState
from storage.session import dispose_all, scope, sessions_for
from tasks.api.app import create_app
from tasks.api.auth import RateLimiter, key_id
from tasks.batches import fail_batch
from tasks.message import BatchMessage
from tests.fakes import FakeEngine, InlinePublisher, RecordingPublisher
from worker.settings import Settings

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["the first text", "a second, longer text than the first", "third"]


class FailingPublisher:
    """A worker that fails every batch it is given with ``reason`` of ``kind``."""

    def __init__(self, settings: Settings, reason: str, kind: FailureKind) -> None:
        self.sessions = sessions_for(settings.database_url)
        self.reason, self.kind = reason, kind

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        with scope(self.sessions) as session:
            for message in messages:
                fail_batch(session, message, self.reason, self.kind)


@dataclass
class Store:
    """A SQLite store where host-a has the fake model (dimension 8) ready, and the settings of
    a keyed API on it; ``app`` builds the API with a publisher that embeds every batch as it is
    sent, with the fake engine."""

    url: str

    def settings(self, **given: Any) -> Settings:
        values = {"database_url": self.url, "api_keys": [KEY, "sk-other"], **given}
        return Settings(**values)

    def app(self, publisher: Any = None, require_auth: bool = True, **given: Any) -> FastAPI:
        settings = self.settings(**given)
        publisher = publisher or InlinePublisher(settings)
        return create_app(settings, require_auth=require_auth, publisher=publisher)


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    with scope(sessions_for(sqlite_url)) as session:
        model_catalog.set_prepared(session, "fake", "host-a", ModelState.READY, dim=8)
        model_catalog.register_source(session, "later", "hf://org/later", {})
    yield Store(sqlite_url)
    dispose_all()


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    with TestClient(store.app(), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: object) -> dict[str, object]:
    """OpenAI's error body, checked to have exactly its four fields."""
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


# --- keys and rate limits ----------------------------------------------------------------------


def test_a_request_without_a_key_or_with_a_wrong_one_is_answered_401(client: TestClient) -> None:
    missing = client.get("/v1/models")
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-nope"})
    basic = client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert [missing.status_code, wrong.status_code, basic.status_code] == [401, 401, 401]
    assert error_of(missing)["type"] == "authentication_error"
    assert error_of(missing)["code"] == "missing_api_key"
    assert error_of(wrong)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 200


def test_the_key_id_is_a_short_hash_that_never_shows_the_key() -> None:
    assert key_id(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert KEY not in key_id(KEY) and key_id(KEY) != key_id("sk-other")


def test_over_the_rate_limit_a_key_is_answered_429_until_the_next_minute(
    store: Store,
) -> None:
    with TestClient(store.app(api_rate_limit=3)) as client:
        codes = [client.get("/v1/models", headers=AUTH).status_code for _ in range(4)]
        other = client.get("/v1/models", headers={"Authorization": "Bearer sk-other"})
        limited = client.get("/v1/models", headers=AUTH)
    assert codes == [200, 200, 200, 429]
    assert other.status_code == 200  # counted per key
    assert error_of(limited)["type"] == "rate_limit_error"
    assert limited.headers["retry-after"] == "60"


def test_the_rate_limit_counts_per_key_in_one_minute_windows() -> None:
    """Counted in this process (local mode); over Redis: tests/faults/test_api_rate_limit.py."""
    limiter = RateLimiter(2)
    now = 1_000_020.0  # a minute's window starts here (1_000_020 % 60 == 0)

    async def hits() -> list[int]:
        return [
            await limiter.hit("k", now),
            await limiter.hit("other", now + 1),
            await limiter.hit("k", now + 2),
            await limiter.hit("k", now + 59.9),  # the same window
            await limiter.hit("k", now + 60),  # the next window starts again
        ]

    assert asyncio.run(hits()) == [1, 1, 2, 3, 1]


def test_without_auth_every_request_is_anonymous_and_unlimited(
    store: Store,
) -> None:
    with TestClient(store.app(require_auth=False, api_rate_limit=1)) as client:
        codes = [client.get("/v1/models").status_code for _ in range(3)]
        job = client.post("/v1/jobs", json={"input": "x", "model": "fake"}).json()
    assert codes == [200, 200, 200]
    assert job["tag"] == "api:anonymous"


# --- /v1/embeddings ------------------------------------------------------------------------


def test_embeddings_answer_openai_s_shape_with_the_vectors_and_tokens_stored(
    client: TestClient,
) -> None:
    response = client.post("/v1/embeddings", headers=AUTH, json={"input": TEXTS, "model": "fake"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert (body["object"], body["model"]) == ("list", "fake")
    assert [(d["object"], d["index"]) for d in body["data"]] == [
        ("embedding", 0),
        ("embedding", 1),
        ("embedding", 2),
    ]
    expected = FakeEngine().encode(TEXTS).vectors
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    tokens = sum(len(text.split()) + 2 for text in TEXTS)  # the fake's count: words + 2
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    phases = [part.strip().split(";dur=") for part in response.headers["server-timing"].split(",")]
    assert [name for name, _ in phases] == ["submit", "wait", "read", "encode"]
    assert all(float(ms) >= 0 for _, ms in phases)
    with scope(sessions_for(client.app.state.settings.database_url)) as session:  # type: ignore[attr-defined]
        (job,) = jobs.list_jobs(session)
    assert response.headers["x-embedq-job"] == job.id
    assert (job.queue, job.tag) == ("interactive", f"api:{key_id(KEY)}")


def test_base64_vectors_are_little_endian_float32_bytes(client: TestClient) -> None:
    body = client.post(
        "/v1/embeddings",
        headers=AUTH,
        json={"input": "one text", "model": "fake", "encoding_format": "base64", "user": "u1"},
    ).json()
    (item,) = body["data"]
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, FakeEngine().encode(["one text"]).vectors[0])
    assert body["usage"]["prompt_tokens"] == 4


def test_openai_s_own_client_reads_both_encodings(client: TestClient) -> None:
    openai = OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    expected = FakeEngine().encode(TEXTS).vectors
    tokens = sum(len(t.split()) + 2 for t in TEXTS)
    floats = openai.embeddings.create(input=TEXTS, model="fake", encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in floats.data], "f4"), expected)
    # Left out, the client asks for base64 itself and decodes it with numpy as float32.
    default = openai.embeddings.create(input=TEXTS, model="fake")
    np.testing.assert_array_equal(np.array([d.embedding for d in default.data], "f4"), expected)
    # Asked for, base64 is handed over as it came.
    raw = openai.embeddings.create(input=TEXTS, model="fake", encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(str(d.embedding)), "<f4") for d in raw.data]
    np.testing.assert_array_equal(np.stack(decoded), expected)
    assert [r.usage.prompt_tokens for r in (floats, default, raw)] == [tokens] * 3
    assert [r.usage.total_tokens for r in (floats, default, raw)] == [tokens] * 3


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"input": [], "model": "fake"}, 400, None, "texts is empty"),
        ({"input": ["a", "  "], "model": "fake"}, 400, None, "whitespace only"),
        ({"input": [1, 2], "model": "fake"}, 400, "input", "token arrays are not accepted"),
        (  # what LangChain's OpenAIEmbeddings sends by default
            {"input": [[101, 2023], [7592]], "model": "fake"},
            400,
            "input",
            "create it with check_embedding_ctx_length=False",
        ),
        ({"input": ["t"] * 2049, "model": "fake"}, 400, "input", "over the limit of 2048"),
        ({"input": 5, "model": "fake"}, 422, "input", "a string or a list of strings"),
        ({"model": "fake"}, 422, "input", "Field required"),
        ({"input": "a", "model": "fake", "dimensions": 4}, 400, "dimensions", "produces 8"),
        ({"input": "a", "model": "fake", "encoding_format": "hex"}, 422, "encoding_format", ""),
        ({"input": "a", "model": "nope"}, 404, "model", "does not exist"),
    ],
)
def test_bad_embedding_requests_are_refused_in_openai_s_error_body(
    client: TestClient, body: dict[str, object], status: int, param: str | None, words: str
) -> None:
    response = client.post("/v1/embeddings", headers=AUTH, json=body)
    assert response.status_code == status
    error = error_of(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert words in str(error["message"])
    with scope(sessions_for(client.app.state.settings.database_url)) as session:  # type: ignore[attr-defined]
        assert jobs.list_jobs(session) == []  # nothing was submitted


def test_the_model_s_own_dimension_is_accepted(client: TestClient) -> None:
    body = {"input": "a", "model": "fake", "dimensions": 8}
    response = client.post("/v1/embeddings", headers=AUTH, json=body)
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 8


def test_a_body_that_is_not_json_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/v1/embeddings", headers={**AUTH, "Content-Type": "application/json"}, content=b"{"
    )
    assert response.status_code == 400 and "not valid JSON" in str(error_of(response)["message"])


def test_a_job_that_does_not_finish_in_time_is_a_504_naming_the_job(
    store: Store,
) -> None:
    nobody = RecordingPublisher()  # no worker
    with TestClient(store.app(nobody, api_wait_timeout=0.2)) as client:
        response = client.post("/v1/embeddings", headers=AUTH, json={"input": "a", "model": "fake"})
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "job_pending"
    assert response.headers["x-should-retry"] == "false"  # OpenAI's client must not resubmit
    with scope(sessions_for(store.url)) as session:
        (job,) = jobs.list_jobs(session)
    assert f"job {job.id} did not finish within 0.2s" in str(error["message"])
    assert response.headers["x-embedq-job"] == job.id
    assert (job.queue, job.state) == ("interactive", "queued")


@pytest.mark.parametrize(
    ("failure", "reason", "status", "kind"),
    [
        (
            FailureKind.INPUT,
            "batch 0: texts at index 0: nothing to read",
            400,
            "invalid_request_error",
        ),
        (FailureKind.MODEL, "model fake: not prepared on host-a", 500, "server_error"),
        (FailureKind.WORKER, "worker process died 4 times on this batch", 500, "server_error"),
    ],
)
def test_a_failed_job_answers_its_reason_by_its_kind(
    store: Store, failure: FailureKind, reason: str, status: int, kind: str
) -> None:
    failing = FailingPublisher(store.settings(), reason, failure)
    with TestClient(store.app(failing)) as client:
        response = client.post("/v1/embeddings", headers=AUTH, json={"input": "a", "model": "fake"})
    assert response.status_code == status
    error = error_of(response)
    assert error["type"] == kind
    assert str(error["message"]).endswith(f"failed: 1 of 1 texts failed: {reason}")
    assert f"job {response.headers['x-embedq-job']} failed" in str(error["message"])


def test_a_text_the_model_reads_nothing_in_is_a_400_through_openai_s_client(
    client: TestClient,
) -> None:
    """The producer accepts a text of zero-width spaces (it is not whitespace); the worker's
    engine refuses it, and the job's failure, stored as input, is the client's 400."""
    openai = OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    with pytest.raises(BadRequestError) as refused:
        openai.embeddings.create(input=["fine", "\u200b\u200b"], model="fake")
    error = refused.value.body
    assert isinstance(error, dict) and (error["code"], error["param"]) == ("invalid_input", "input")
    assert "partially_failed: 1 of 2 texts failed" in error["message"]
    assert "reads nothing in this text" in error["message"]


# --- caps, unavailable services, documentation -------------------------------------------------


def test_a_body_over_the_cap_is_a_413_whether_announced_or_streamed(
    store: Store,
) -> None:
    big = json.dumps({"input": ["x" * 200, "y" * 200], "model": "fake"}).encode()
    with TestClient(store.app(api_max_request_bytes=300)) as client:
        announced = client.post("/v1/embeddings", headers=AUTH, content=big)
        streamed = client.post(
            "/v1/jobs",
            headers={**AUTH, "Content-Type": "application/json"},
            content=iter([big[:200], big[200:]]),  # chunked: no Content-Length
        )
        small = client.post("/v1/embeddings", headers=AUTH, json={"input": "x", "model": "fake"})
    assert [announced.status_code, streamed.status_code, small.status_code] == [413, 413, 200]
    assert error_of(announced)["type"] == "invalid_request_error"
    assert error_of(streamed)["type"] == "invalid_request_error"


def test_a_store_that_cannot_be_reached_is_a_503() -> None:
    settings = Settings(database_url="sqlite:////nonexistent/dir/store.db", api_keys=[KEY])
    with TestClient(create_app(settings, publisher=RecordingPublisher())) as client:
        models = client.get("/v1/models", headers=AUTH)
        health = client.get("/health")
    assert models.status_code == 503
    assert error_of(models) == {
        "message": "the job store cannot be reached; try again later",
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }
    assert health.status_code == 503
    assert health.json()["store"] == "unreachable (OperationalError)"


def test_health_needs_no_key_and_says_what_answers(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "store": "ok", "broker": "none (local mode)"}


@pytest.mark.parametrize(
    "path", ["/v1/jobs/a%00b", "/v1/jobs/a%00b/embeddings", "/v1/files/f%00", "/v1/batches/%00"]
)
def test_a_nul_in_an_id_is_the_404_of_an_unknown_object(client: TestClient, path: str) -> None:
    response = client.get(path, headers=AUTH)
    assert response.status_code == 404  # tasks.api.ids: no id holds one
    assert error_of(response)["type"] == "invalid_request_error"


def test_an_unknown_path_is_a_404_in_openai_s_body(client: TestClient) -> None:
    response = client.get("/v1/nothing", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["message"] == "no such endpoint: GET /v1/nothing"


def test_the_openapi_document_and_the_docs_are_served(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert {
        "/v1/embeddings",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/embeddings",
        "/v1/models",
        "/health",
    } <= set(document["paths"])
    request = document["components"]["schemas"]["EmbeddingRequest"]
    assert set(request["properties"]) == {"input", "model", "encoding_format", "dimensions", "user"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # Its script and style come from this server, not a CDN (none is reachable offline).
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert len(assets) == 2 and all(asset.startswith("/docs/assets/") for asset in assets)
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 10_000


# --- /v1/models and /v1/jobs -------------------------------------------------------------------


def test_models_are_listed_in_openai_s_shape_with_embedq_s_fields(client: TestClient) -> None:
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list"
    fake, later = body["data"]
    assert {k: fake[k] for k in ("id", "object", "owned_by", "dim", "ready_on")} == {
        "id": "fake",
        "object": "model",
        "owned_by": "embedq",
        "dim": 8,
        "ready_on": ["host-a"],
    }
    assert isinstance(fake["created"], int)
    assert (later["id"], later["dim"], later["registered_source"]) == (
        "later",
        None,
        "hf://org/later",
    )
    assert client.get("/v1/models/later", headers=AUTH).json()["id"] == "later"
    assert client.get("/v1/models/none", headers=AUTH).status_code == 404


def test_a_job_is_submitted_followed_and_its_vectors_streamed(client: TestClient) -> None:
    submitted = client.post(
        "/v1/jobs",
        headers=AUTH,
        json={"input": TEXTS, "model": "fake", "ids": ["a", "b", "c"], "tag": "nightly"},
    )
    assert submitted.status_code == 202
    job = submitted.json()
    assert (job["object"], job["queue"], job["tag"], job["total"]) == (
        "embedq.job",
        "bulk",
        "nightly",
        3,
    )
    status = client.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
    assert (status["state"], status["done"], status["failed"]) == ("succeeded", 3, 0)
    assert isinstance(status["finished_at"], int)
    expected = FakeEngine().encode(TEXTS).vectors

    npy = client.get(f"/v1/jobs/{job['id']}/embeddings", headers=AUTH)
    assert npy.headers["x-embedq-count"] == "3"
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content)), expected)

    jsonl = client.get(f"/v1/jobs/{job['id']}/embeddings?format=jsonl", headers=AUTH)
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], "f4"), expected)


def test_an_unfinished_job_s_vectors_are_a_409_and_an_unknown_job_a_404(
    store: Store,
) -> None:
    with TestClient(store.app(RecordingPublisher())) as client:
        job = client.post("/v1/jobs", headers=AUTH, json={"input": "a", "model": "fake"}).json()
        pending = client.get(f"/v1/jobs/{job['id']}/embeddings", headers=AUTH)
        unknown = client.get("/v1/jobs/no-such-job", headers=AUTH)
        bad_format = client.get(f"/v1/jobs/{job['id']}/embeddings?format=csv", headers=AUTH)
    assert job["tag"] == f"api:{key_id(KEY)}"
    assert pending.status_code == 409 and error_of(pending)["code"] == "job_not_finished"
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "job_not_found"
    assert bad_format.status_code == 422 and error_of(bad_format)["param"] == "query.format"
