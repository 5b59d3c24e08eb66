"""OpenAI batches without a broker or a server: input lines read as requests, and whole batches
run by ``OpenAIBatchRunner`` on a SQLite store, with a publisher handed in that embeds each
message at once with the fake engine; the output and error files are read back from the store."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, leases, ledger, model_catalog, openai_batches, openai_files
from storage.models import Embedding, ModelState, OpenAIBatch, OpenAIFile
from storage.session import dispose_all, make_engine, scope, session_factory, sessions_for
from tasks import names
from tasks.api.app import create_app
from tasks.batches import embed_batch
from tasks.message import BatchMessage
from tasks.openai_batch import output, runner, uploads
from tasks.openai_batch.requests import Rejected, Request, check_dimensions, parse_line
from tasks.openai_batch.runner import OpenAIBatchRunner
from tests.fakes import FakeEngine, InlinePublisher
from tests.waiting import wait_until
from worker.settings import Settings

MODEL = "fake"


def line(custom_id: object, body: object, **extra: object) -> bytes:
    record = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}
    return json.dumps({**record, **extra}).encode()


# --- lines -----------------------------------------------------------------------------------
def test_a_line_with_a_text_or_a_list_of_texts_is_a_request() -> None:
    one = parse_line(1, line("a", {"model": MODEL, "input": "hello"}))
    many = parse_line(
        2, line("b", {"model": MODEL, "input": ["x", "y"], "encoding_format": "base64"})
    )
    assert one == Request(1, "a", MODEL, ["hello"])
    assert many == Request(2, "b", MODEL, ["x", "y"], base64=True)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (b"[1, 2]", "invalid_request"),
        (b'\xff{"custom_id": "a"}', "invalid_json_line"),
        (
            json.dumps({"method": "POST", "url": "/v1/embeddings", "body": {}}).encode(),
            "missing_custom_id",
        ),
        (line("", {"model": MODEL, "input": "x"}), "missing_custom_id"),
        (line("a", {"model": MODEL, "input": "x"}, method="GET"), "invalid_method"),
        (line("a", {"model": MODEL, "input": "x"}, url="/v1/chat/completions"), "invalid_url"),
        (line("a", "text"), "invalid_body"),
        (line("a", {"input": "x"}), "missing_model"),
        (line("a", {"model": "other", "input": "x"}), "model_mismatch"),
        (line("a", {"model": MODEL, "input": ""}), "invalid_input"),
        (line("a", {"model": MODEL, "input": ["fine", "  "]}), "invalid_input"),
        (line("a", {"model": MODEL, "input": []}), "invalid_input"),
        (line("a", {"model": MODEL, "input": [[1, 2, 3]]}), "invalid_input"),
        (line("a", {"model": MODEL, "input": ["x"] * 2049}), "invalid_input"),
        (
            line("a", {"model": MODEL, "input": "x", "encoding_format": "int8"}),
            "invalid_encoding_format",
        ),
        (line("a", {"model": MODEL, "input": "x", "dimensions": 0}), "invalid_dimensions"),
        (b"[" * 100_000, "invalid_json_line"),  # raised RecursionError, killing the runner
    ],
)
def test_a_line_that_cannot_run_is_rejected_with_its_code(raw: bytes, code: str) -> None:
    parsed = parse_line(7, raw, MODEL)
    assert isinstance(parsed, Rejected)
    assert (parsed.line, parsed.code) == (7, code)
    assert parsed.message


def test_a_dimension_other_than_the_models_is_rejected_once_the_model_is_known() -> None:
    asked = Request(3, "a", MODEL, ["x"], dimensions=8)
    assert check_dimensions(asked, None) is asked
    assert check_dimensions(asked, 8) is asked
    rejected = check_dimensions(asked, 384)
    assert isinstance(rejected, Rejected) and rejected.code == "invalid_dimensions"


def test_an_upload_over_the_cap_leaves_nothing(tmp_path: Path) -> None:
    assert uploads.save(io.BytesIO(b"x" * 10), tmp_path, "file-a", cap=10) == 10
    with pytest.raises(uploads.TooLarge):
        uploads.save(io.BytesIO(b"x" * 11), tmp_path, "file-b", cap=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file-a"]


# --- whole batches ---------------------------------------------------------------------------
@dataclass
class Fleet:
    """The store, the settings, and a publisher that embeds each message at once with the fake
    engine; ``on_send`` lets a test act when the n-th message goes out."""

    sessions: sessionmaker[Session]
    settings: Settings
    sent: list[BatchMessage] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    on_send: Any = None

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        for message in messages:
            self.sent.append(message)
            self.queues.append(str(queue))
            if self.on_send is not None:
                self.on_send(len(self.sent))
            with scope(self.sessions) as session:
                embed_batch(session, FakeEngine(), message, provider=FakeEngine.provider)

    def runner(self, batch_id: str, holder: str = "here") -> OpenAIBatchRunner:
        run = OpenAIBatchRunner(
            batch_id,
            self.settings,
            sessions=self.sessions,
            catalog=lambda: {MODEL: 8},
            holder=holder,
            publisher=self,
        )
        run.poll_s = 0.0
        return run

    def batch(self, batch_id: str) -> OpenAIBatch:
        with scope(self.sessions) as session:
            found = openai_batches.get_batch(session, batch_id)
        assert found is not None
        return found

    def file(self, batch_id: str, errors: bool) -> list[dict[str, Any]]:
        lines = output.file_lines(self.sessions, self.batch(batch_id), errors)
        return [json.loads(raw) for raw in lines]


@pytest.fixture
def fleet(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    # Look at the batch between every two chunks (a module constant: no setting holds it).
    monkeypatch.setattr(runner, "RENEW_S", 0.0)
    engine = make_engine(sqlite_url)
    settings = Settings(
        database_url=sqlite_url,
        job_batch_size=4,
        backfill_max_in_flight=2,
        stuck_after=5,
        files_dir=tmp_path / "files",
    )
    yield Fleet(session_factory(engine), settings)
    engine.dispose()
    dispose_all()


def submit(fleet: Fleet, lines: list[bytes], batch_id: str = "batch_1") -> str:
    size = uploads.save(
        io.BytesIO(b"\n".join(lines) + b"\n"), fleet.settings.files_dir, "file-1", 10**6
    )
    now = datetime.now(UTC)
    with scope(fleet.sessions) as session:
        openai_files.add_file(
            session,
            OpenAIFile(id="file-1", owner="k", filename="in.jsonl", purpose="batch", bytes=size),
        )
        session.flush()
        openai_batches.add_batch(
            session,
            OpenAIBatch(
                id=batch_id,
                owner="k",
                input_file_id="file-1",
                endpoint="/v1/embeddings",
                completion_window="24h",
                status="validating",
                total=0,
                completed=0,
                failed=0,
                expires_at=now + timedelta(hours=24),
            ),
        )
    return batch_id


def requests(count: int, start: int = 0) -> list[bytes]:
    return [
        line(
            f"r{i}",
            {"model": MODEL, "input": [f"text {i}", f"more words {i}"] if i % 3 else f"text {i}"},
        )
        for i in range(start, start + count)
    ]


def counts(fleet: Fleet, batch_id: str) -> tuple[int, int, int]:
    batch = fleet.batch(batch_id)
    return batch.total, batch.completed, batch.failed


def test_a_batch_completes_with_one_output_line_per_good_request_and_the_rest_in_errors(
    fleet: Fleet,
) -> None:
    good = requests(10)
    bad = [
        b"{broken",
        line("empty", {"model": MODEL, "input": ["ok", ""]}),
        line("r3", {"model": MODEL, "input": "a repeated custom id"}),
        line("b64", {"model": MODEL, "input": "as base64", "encoding_format": "base64"}),
    ]
    batch_id = submit(fleet, good + bad)
    assert fleet.runner(batch_id).run() == "completed"
    batch = fleet.batch(batch_id)
    assert counts(fleet, batch_id) == (14, 11, 3)
    assert batch.output_file_id == f"file-batchout-{batch_id}"
    assert batch.error_file_id == f"file-batcherr-{batch_id}"

    assert set(fleet.queues) == {names.Queue.BULK}  # a batch's requests go on the bulk queue
    out = fleet.file(batch_id, errors=False)
    assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(10)] + ["b64"]
    engine = FakeEngine()
    with scope(fleet.sessions) as session:
        tokens = dict(session.execute(select(Embedding.item_id, Embedding.token_count)).all())
    for index, entry in enumerate(out[:10]):
        body = entry["response"]["body"]
        texts = [f"text {index}", f"more words {index}"] if index % 3 else [f"text {index}"]
        assert entry["response"]["status_code"] == 200 and entry["error"] is None
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(vectors, engine.encode(texts).vectors, atol=1e-6)
        stored = sum(tokens[openai_batches.item_name(index + 1, i)] for i in range(len(texts)))
        assert body["usage"] == {"prompt_tokens": stored, "total_tokens": stored}
        assert body["model"] == MODEL
    as_base64 = out[10]["response"]["body"]["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(as_base64), dtype="<f4")
    np.testing.assert_allclose(decoded, engine.encode(["as base64"]).vectors[0], atol=1e-6)

    errors = {e["custom_id"]: e for e in fleet.file(batch_id, errors=True)}
    assert set(errors) == {None, "empty", "r3"}
    assert errors[None]["response"] is None
    assert errors[None]["error"]["code"] == "invalid_json_line"
    assert errors["empty"]["response"]["status_code"] == 400
    assert errors["empty"]["response"]["body"]["error"]["param"] == "input"
    assert errors["r3"]["error"]["code"] == "duplicate_custom_id"
    # The same store gives the same bytes: a broken download can start again.
    assert fleet.file(batch_id, errors=True) == list(errors.values())


def test_a_batch_naming_an_unknown_model_fails_whole(fleet: Fleet) -> None:
    batch_id = submit(fleet, [line("a", {"model": "nobody", "input": "x"})])
    assert fleet.runner(batch_id).run() == "failed"
    batch = fleet.batch(batch_id)
    assert batch.errors is not None and batch.errors[0]["code"] == "model_not_found"
    assert batch.failed_at is not None


def test_a_cancelled_batch_sends_nothing_more_and_lists_what_it_did_not_run(fleet: Fleet) -> None:
    batch_id = submit(fleet, requests(40))

    def cancel_on_second(sent: int) -> None:
        if sent == 2:
            with scope(fleet.sessions) as session:
                openai_batches.move_batch(
                    session,
                    batch_id,
                    "cancelling",
                    only_from=["in_progress"],
                    cancelling_at=datetime.now(UTC),
                )

    fleet.on_send = cancel_on_second
    assert fleet.runner(batch_id).run() == "cancelled"
    total, completed, failed = counts(fleet, batch_id)
    assert len(fleet.sent) <= 3  # the one after the cancel at most (checked between chunks)
    assert total == 40 and failed == 0 and 0 < completed < 40
    out = fleet.file(batch_id, errors=False)
    errors = fleet.file(batch_id, errors=True)
    assert len(out) == completed and len(errors) == 40 - completed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}


def test_a_batch_whose_runner_died_is_resumed_with_nothing_lost_or_sent_twice(
    fleet: Fleet,
) -> None:
    batch_id = submit(fleet, requests(30))

    def die_on_third(sent: int) -> None:
        if sent == 3:
            raise SystemExit("the serve process is killed")

    fleet.on_send = die_on_third
    with pytest.raises(SystemExit):
        fleet.runner(batch_id, holder="first").run()
    assert fleet.batch(batch_id).status == "in_progress"
    fleet.on_send = None
    with scope(fleet.sessions) as session:  # the first holder's lease has run out
        leases.release_lease(session, runner.lease_name(batch_id), "first")
        job_id = backfills.job_of(session, batch_id)
        assert job_id is not None
        lost = ledger.pending_batches(session, job_id)
    for batch in lost:  # what the workers' reconciler does with a batch whose message was lost
        again = ledger.kept(batch)
        assert again is not None
        fleet.publish([BatchMessage.of(job_id, MODEL, again, 0.0)], names.Queue.BULK)
    assert fleet.runner(batch_id, holder="second").run() == "completed"
    assert counts(fleet, batch_id) == (30, 30, 0)
    sent = [item for message in fleet.sent for item in message.item_ids]
    texts = sum(2 if i % 3 else 1 for i in range(30))
    assert len(sent) - len(fleet.sent[2].item_ids) == texts  # only the lost batch's again
    with scope(fleet.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Embedding)) == texts
    assert len(fleet.file(batch_id, errors=False)) == 30


def test_a_runner_stops_when_another_process_holds_the_lease(fleet: Fleet) -> None:
    batch_id = submit(fleet, requests(5))
    with scope(fleet.sessions) as session:
        assert leases.take_lease(session, runner.lease_name(batch_id), "other", 60)
    assert fleet.runner(batch_id).run() == "validating"
    assert fleet.sent == []


# --- the routes, with OpenAI's own client ----------------------------------------------------
@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[OpenAI]:
    """The app in process on a SQLite store where a host has the fake model; batches are
    embedded as soon as their runner sends them, by the publisher handed to the app."""
    settings = Settings(
        database_url=sqlite_url,
        broker_url=None,
        default_model=None,
        api_keys=[],
        files_dir=tmp_path / "files",
        api_max_file_bytes=100000,
    )
    with scope(sessions_for(sqlite_url)) as session:
        model_catalog.set_prepared(session, MODEL, "host-a", ModelState.READY, dim=8)
    app = create_app(settings, require_auth=False, publisher=InlinePublisher(settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    dispose_all()


def test_openai_s_client_uploads_runs_and_downloads_a_batch(api: OpenAI) -> None:
    body = b"\n".join([*requests(6), b"not json"]) + b"\n"
    uploaded = api.files.create(file=("in.jsonl", body), purpose="batch")
    assert (uploaded.bytes, uploaded.purpose, uploaded.filename) == (len(body), "batch", "in.jsonl")
    assert api.files.content(uploaded.id).content == body
    created = api.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"run": "test"},
    )
    assert created.status == "validating" and created.metadata == {"run": "test"}

    def completed() -> openai.types.Batch | None:
        found = api.batches.retrieve(created.id)
        return found if found.status == "completed" else None

    batch = wait_until(
        completed,
        30,
        "the batch to complete",
        every=0.1,
        detail=lambda: f"still {api.batches.retrieve(created.id).status}",
    )
    assert batch is not None and batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (7, 6)
    assert batch.request_counts.failed == 1
    assert batch.output_file_id and batch.error_file_id
    out = [json.loads(raw) for raw in api.files.content(batch.output_file_id).text.splitlines()]
    assert [entry["custom_id"] for entry in out] == [f"r{i}" for i in range(6)]
    errors = api.files.content(batch.error_file_id).text.splitlines()
    assert json.loads(errors[0])["error"]["code"] == "invalid_json_line"
    described = api.files.retrieve(batch.output_file_id)
    assert described.bytes == len(api.files.content(batch.output_file_id).content)
    with pytest.raises(openai.ConflictError):
        api.batches.cancel(batch.id)
    assert batch.id in [b.id for b in api.batches.list()]


def test_bad_uploads_and_batches_are_refused_in_openai_s_error_body(api: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as too_large:
        api.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
    assert too_large.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        api.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
    uploaded = api.files.create(file=("in.jsonl", b"\n".join(requests(2))), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        api.batches.create(
            input_file_id="file-nothing", endpoint="/v1/embeddings", completion_window="24h"
        )
    for metadata in ({f"k{n}": "v" for n in range(17)}, {"k": "v" * 513}, {"k" * 65: "v"}):
        with pytest.raises(openai.BadRequestError) as unbounded:
            api.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
                metadata=metadata,
            )
        assert unbounded.value.body["param"] == "metadata"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nothing")
    with pytest.raises(openai.NotFoundError):  # an output file of no ended batch
        api.files.content("file-batchout-batch_nothing")
