"""OpenAI batches with real parts: ``embedq serve`` processes, a real Celery worker, Redis, the
store and the exported model, driven by OpenAI's own client: a batch completes with the
engine's vectors and the stored token counts, a cancelled one stops sending, and one whose
``serve`` process is killed is finished by another with nothing lost or sent twice. Against
hostile clients: a 200,000-line batch is polled from its row, a line nested 100,000 deep is an
error line, and an id that cannot name anything is a 404 with no traceback."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import Batch
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, leases, openai_batches
from storage.models import Backfill, Embedding, Job, OpenAIBatch, OpenAIFile
from storage.models import Batch as LedgerBatch
from storage.session import make_engine, scope, session_factory, sessions_for
from tests.acceptance.conftest import KEY, Fleet, Server
from tests.conftest import cosines
from tests.waiting import wait_until
from worker.engine import Engine

MODEL = "minilm"


@pytest.fixture
def start(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``embedq serve`` on the fleet: the session's, or, with extra settings, instances of the
    test's own sharing one files folder, stopped after the test."""
    started: list[Server] = []

    def server(**settings: str) -> Server:
        if not settings:
            return fleet.serve()
        env = {
            **fleet.env,
            "EMBEDQ_API_KEYS": KEY,
            "EMBEDQ_FILES_DIR": str(tmp_path / "files"),
            **settings,
        }
        started.append(Server(env))
        return started[-1]

    yield server
    for running in started:
        running.stop()


def request(custom_id: str, given: object, **body: object) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": given, **body},
        }
    )


def upload(client: openai.OpenAI, path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def create(client: openai.OpenAI, file_id: str) -> Batch:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
    )


def wait_for(
    client: openai.OpenAI, batch_id: str, done: Callable[[Batch], bool], timeout: float
) -> Batch:
    seen: list[Batch] = []

    def reached() -> Batch | None:
        seen.append(client.batches.retrieve(batch_id))
        return seen[-1] if done(seen[-1]) else None

    def last() -> str:
        return f"batch still {seen[-1].status}: {seen[-1].request_counts}" if seen else ""

    return wait_until(reached, timeout, f"batch {batch_id}", every=0.5, detail=last)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, object]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_file_comes_back_with_the_engine_s_vectors_and_stored_tokens(
    fleet: Fleet, start: Callable[..., Server], engine: Engine, tmp_path: Path
) -> None:
    client = start().client()
    inputs: dict[str, list[str]] = {}
    lines = []
    for i in range(28):
        texts = [f"Sentence number {i} about batches."]
        if i % 4 == 0:
            texts += [f"A second text of request {i}.", "word " * (5 + i)]
        inputs[f"req-{i}"] = texts
        lines.append(request(f"req-{i}", texts if len(texts) > 1 else texts[0]))
    lines.insert(5, '{"custom_id": "broken", "method": "POST", ')
    lines.append(request("has-empty", ["fine", ""]))
    file_id = upload(client, tmp_path / "in.jsonl", lines)
    created = create(client, file_id)
    batch = wait_for(client, created.id, lambda b: b.status == "completed", 180)
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (30, 28, 2)

    out = jsonl(client, batch.output_file_id)
    assert sorted(str(entry["custom_id"]) for entry in out) == sorted(inputs)
    with scope(sessions_for(fleet.database_url)) as session:
        job_id = backfills.job_of(session, batch.id)
        stored = dict(
            session.execute(
                select(Embedding.item_id, Embedding.token_count).where(Embedding.job_id == job_id)
            ).all()
        )
    by_line = {line: number for number, line in enumerate(lines, start=1)}
    for entry in out:
        custom_id = str(entry["custom_id"])
        response: dict[str, object] = entry["response"]  # type: ignore[assignment]
        body: dict[str, object] = response["body"]  # type: ignore[assignment]
        assert response["status_code"] == 200 and entry["error"] is None
        data: list[dict[str, object]] = body["data"]  # type: ignore[assignment]
        texts = inputs[custom_id]
        reference = engine.encode(texts)
        got = np.array([item["embedding"] for item in data], dtype=np.float32)
        assert np.asarray(cosines(got, reference.vectors)).min() >= 0.9999
        line = by_line[request(custom_id, texts if len(texts) > 1 else texts[0])]
        tokens = sum(stored[openai_batches.item_name(line, i)] for i in range(len(texts)))
        assert tokens == sum(reference.token_counts)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    errors = {str(entry["custom_id"]): entry for entry in jsonl(client, batch.error_file_id)}
    assert set(errors) == {"None", "has-empty"}
    assert errors["None"]["response"] is None
    assert errors["None"]["error"] == {
        "code": "invalid_json_line",
        "message": errors["None"]["error"]["message"],  # type: ignore[index]
    }
    empty: dict[str, object] = errors["has-empty"]["response"]  # type: ignore[assignment]
    assert empty["status_code"] == 400
    assert "'input'[1] is empty" in json.dumps(empty["body"])


def many(count: int, corpus: list[str]) -> list[str]:
    return [request(f"c{i}", corpus[i]) for i in range(count)]


def test_a_cancelled_batch_stops_sending_and_lists_what_it_did_not_run(
    start: Callable[..., Server], short_texts: list[str], tmp_path: Path
) -> None:
    client = start(EMBEDQ_JOB_BATCH_SIZE="8", EMBEDQ_BACKFILL_MAX_IN_FLIGHT="1").client()
    file_id = upload(client, tmp_path / "in.jsonl", many(2000, short_texts))
    created = create(client, file_id)
    wait_for(
        client, created.id, lambda b: bool(b.request_counts and b.request_counts.completed), 120
    )
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for(client, created.id, lambda b: b.status == "cancelled", 120)
    assert batch.request_counts is not None
    completed = batch.request_counts.completed
    assert 0 < completed < 2000 and batch.request_counts.failed == 0
    assert len(jsonl(client, batch.output_file_id)) == completed
    errors = jsonl(client, batch.error_file_id)
    assert len(errors) == 2000 - completed
    assert {entry["error"]["code"] for entry in errors} == {"batch_cancelled"}  # type: ignore[index]


def test_a_batch_whose_serve_is_killed_is_finished_by_another_with_nothing_lost_or_resent(
    fleet: Fleet, start: Callable[..., Server], short_texts: list[str], tmp_path: Path
) -> None:
    settings = {"EMBEDQ_JOB_BATCH_SIZE": "16", "EMBEDQ_BACKFILL_MAX_IN_FLIGHT": "2"}
    settings["EMBEDQ_API_BATCH_LEASE"] = "4"  # the dead runner's lease lapses in seconds
    first = start(**settings)
    client = first.client()
    total = 1500
    file_id = upload(client, tmp_path / "in.jsonl", many(total, short_texts))
    created = create(client, file_id)
    half = wait_for(
        client, created.id, lambda b: bool(b.request_counts and b.request_counts.completed), 120
    )
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    assert half.request_counts is not None and half.request_counts.completed < total

    second = start(**settings).client()
    batch = wait_for(second, created.id, lambda b: b.status == "completed", 300)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (total, 0)
    assert len(jsonl(second, batch.output_file_id)) == total
    with scope(sessions_for(fleet.database_url)) as session:
        job_id = backfills.job_of(session, batch.id)
        stored = session.scalar(select(func.count()).where(Embedding.job_id == job_id))
        sent = session.scalar(
            select(func.sum(LedgerBatch.item_count)).where(LedgerBatch.job_id == job_id)
        )
        job = session.get(Job, job_id)
        assert job is not None
        reused = job.reused_items  # texts repeated in the corpus are copied, not sent
    assert stored == total  # nothing lost
    assert (sent or 0) + reused == total  # no text sent in two batches


def test_a_2000_line_batch_with_bad_lines_completes_the_rest_with_the_engine_s_vectors(
    start: Callable[..., Server], engine: Engine, short_texts: list[str], tmp_path: Path
) -> None:
    """The issue's round trip: 2,000 lines through files.create, batches.create, polling and
    files.content, some of them bad; the bad ones are in the error file, the rest completed."""
    client = start().client()
    texts = {f"r{i}": short_texts[i] for i in range(2000)}
    lines = [request(custom_id, text) for custom_id, text in texts.items()]
    bad = {
        7: ("r7", '{"custom_id": "r7", "method": "POST"'),  # cut short: not JSON
        70: ("r70", request("r70", "")),  # an empty text
        700: ("r700", request("r700", ["fine", 5])),  # not a string
        1234: ("r1234", json.dumps({"custom_id": "r1234", "method": "GET", "url": "/v1/x"})),
        1999: ("r5", request("r5", "a custom_id used before")),  # repeated
    }
    for index, (_, line) in bad.items():
        lines[index] = line
    file_id = upload(client, tmp_path / "in.jsonl", lines)
    created = create(client, file_id)
    batch = wait_for(client, created.id, lambda b: b.status == "completed", 600)
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (2000, 1995, 5)

    good = {cid: text for i, (cid, text) in enumerate(texts.items()) if i not in bad}
    out = jsonl(client, batch.output_file_id)
    assert sorted(str(entry["custom_id"]) for entry in out) == sorted(good)
    got = np.stack(
        [
            np.asarray(entry["response"]["body"]["data"][0]["embedding"], "f4")  # type: ignore[index]
            for entry in out
        ]
    )
    order = [good[str(entry["custom_id"])] for entry in out]
    reference = np.concatenate(
        [engine.encode(order[i : i + 512]).vectors for i in range(0, len(order), 512)]
    )
    assert float(np.min(cosines(got, reference))) >= 0.9999
    errors = jsonl(client, batch.error_file_id)
    assert len(errors) == 5
    assert sorted(str(entry["custom_id"]) for entry in errors) == sorted(
        ["None", "r70", "r700", "r1234", "r5"]
    )


# --- hostile clients ----------------------------------------------------------------------------
BIG = 200_000
"""Lines of the batch polled below: the size whose poll took over 10 minutes."""


def expected_counts(lines: int) -> tuple[int, int, int]:
    """(total, completed, failed) of the batch ``fill_batch`` writes, counted line by line."""
    completed = failed = 0
    for n in range(1, lines + 1):
        if n % 1000 == 0 or (n <= 150_000 and n % 997 == 0):  # rejected, or a text failed
            failed += 1
            continue
        inputs = 2 if n % 10 == 1 else 1
        stored = (n <= 150_000) + (inputs == 2 and n <= 100_000)
        completed += stored == inputs
    return lines, completed, failed


def fill_batch(sessions: sessionmaker[Session], batch_id: str, file_id: str, lines: int) -> str:
    """A running batch of ``lines`` lines written straight into the store (generate_series):
    every 1000th line rejected, every 10th of two texts; up to line 150,000 the first text of
    each line stored (or failed, every 997th), up to 100,000 the second too; its job's id."""
    job_id = f"job-{batch_id}"
    now = datetime.now(UTC)
    with scope(sessions) as session:
        upload = session.get(OpenAIFile, file_id)
        assert upload is not None
        session.add(
            OpenAIBatch(
                id=batch_id,
                owner=upload.owner,
                input_file_id=file_id,
                endpoint="/v1/embeddings",
                completion_window="24h",
                status="in_progress",
                model=MODEL,
                expires_at=now + timedelta(hours=24),
            )
        )
        session.add(Job(id=job_id, model_name=MODEL, queue="bulk", sealed=False, meta={}))
        session.flush()
        session.add(Backfill(name=batch_id, job_id=job_id, model_name=MODEL, source="test"))
        values = {"b": batch_id, "j": job_id, "lines": lines, "v": bytes(16), "now": now}
        session.execute(
            text(
                "INSERT INTO api_batch_requests (batch_id, line, custom_id, inputs, base64,"
                " error_code, error) SELECT :b, n, 'r' || n,"
                " CASE WHEN n % 1000 = 0 THEN 0 WHEN n % 10 = 1 THEN 2 ELSE 1 END, false,"
                " CASE WHEN n % 1000 = 0 THEN 'invalid_json_line' END,"
                " CASE WHEN n % 1000 = 0 THEN 'not JSON' END"
                " FROM generate_series(1, :lines) AS n"
            ),
            values,
        )
        good = "n % 1000 <> 0 AND"
        session.execute(
            text(
                "INSERT INTO embeddings (job_id, item_id, position, text_sha256, dim, vector,"
                " token_count, truncated)"
                " SELECT :j, lpad(n::text, 8, '0') || '.' || i, 2 * n + i, md5(n::text), 4, :v,"
                " 3, false FROM generate_series(1, :lines) AS n, generate_series(0, 1) AS i"
                f" WHERE {good} ((i = 0 AND n <= 150000 AND n % 997 <> 0)"
                " OR (i = 1 AND n % 10 = 1 AND n <= 100000))"
            ),
            values,
        )
        session.execute(
            text(
                "INSERT INTO failed_items (job_id, item_id, reason, kind, created_at)"
                " SELECT :j, lpad(n::text, 8, '0') || '.0', 'too long', 'input', :now"
                f" FROM generate_series(1, :lines) AS n WHERE {good} n <= 150000"
                " AND n % 997 = 0"
            ),
            values,
        )
        # Run by another serve instance: polls here start no runner.
        assert leases.take_lease(session, f"openai:{batch_id}", "another-instance", 3600)
    return job_id


def test_a_200000_line_batch_is_counted_without_a_nested_loop_and_polled_from_its_row(
    fleet: Fleet, start: Callable[..., Server], tmp_path: Path
) -> None:
    server = start()
    client = server.client()
    file_id = upload(client, tmp_path / "in.jsonl", [request("r1", "a text")])
    engine = make_engine(fleet.database_url)
    sessions = session_factory(engine)
    batch_id = "batch_two_hundred_thousand"
    job_id = fill_batch(sessions, batch_id, file_id, BIG)
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    with scope(sessions) as session:  # what the batch's runner does every few seconds
        counts = openai_batches.keep_counts(session, batch_id, job_id)
    event.remove(engine, "before_cursor_execute", seen)
    assert counts == expected_counts(BIG)
    assert any("embeddings" in statement for statement, _ in statements)
    with engine.connect() as connection:  # statistics as a fresh batch has them: no ANALYZE
        for statement, parameters in statements:
            plan = connection.exec_driver_sql("EXPLAIN " + statement, parameters).scalars()
            assert "Nested Loop" not in "\n".join(plan), statement
    engine.dispose()

    total, completed, failed = expected_counts(BIG)
    for _ in range(100):  # each poll reads the batch's row, whatever the batch's size
        polled = client.batches.retrieve(batch_id)
        assert polled.status == "in_progress" and polled.request_counts is not None
        got = polled.request_counts
        assert (got.total, got.completed, got.failed) == (total, completed, failed)
    listed = client.batches.list().data
    assert [(b.id, b.request_counts) for b in listed] == [(batch_id, polled.request_counts)]


def test_a_line_nested_100000_deep_is_an_error_line_and_the_batch_completes(
    start: Callable[..., Server], tmp_path: Path
) -> None:
    server = start()
    since = len(server.lines)
    client = server.client()
    lines = [request("first", "A first text."), "[" * 100_000, request("last", "A last text.")]
    created = create(client, upload(client, tmp_path / "in.jsonl", lines))
    batch = wait_for(client, created.id, lambda b: b.status in ("completed", "failed"), 180)
    assert batch.status == "completed" and batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    [error] = jsonl(client, batch.error_file_id)
    assert error["custom_id"] is None and error["response"] is None
    assert error["error"] == {"code": "invalid_json_line", "message": "line 2 is nested too deeply"}
    assert server.logged("Traceback", since) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files/file-%00"),
        ("GET", "/v1/files/a%00b/content"),
        ("DELETE", "/v1/files/" + "f" * 65),
        ("GET", "/v1/batches/batch_%00"),
        ("POST", "/v1/batches/batch_%01/cancel"),
        ("GET", "/v1/batches?after=batch_%00"),
        ("GET", "/v1/jobs/%00"),
        ("GET", "/v1/jobs/" + "j" * 5000 + "/embeddings"),
    ],
)
def test_an_id_that_cannot_name_anything_is_a_clean_404(
    start: Callable[..., Server], method: str, path: str
) -> None:
    server = start()
    since = len(server.lines)
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.request(method, server.url + path, headers=auth, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "no such" in error["message"]
    assert server.logged("Traceback", since) is None and server.alive()
