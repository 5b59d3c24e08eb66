"""OpenAI batches and files against hostile clients, without a broker or a server: a poll reads
the counts the runner keeps on the batch's row, an output file's metadata the sizes recorded
when its batch ended, a runner that meets an unexpected error ends its batch ``failed`` with the
reason, and an id that cannot name anything is the 404 of an unknown object."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import openai
import pytest
from openai import OpenAI
from sqlalchemy.exc import OperationalError

from storage import backfills, jobs, leases, ledger, openai_batches
from storage.models import OpenAIBatch
from storage.session import scope, sessions_for
from tasks.api import ids
from tasks.api.auth import ANONYMOUS
from tasks.openai_batch import background, output, runner
from tests.unit import test_openai_batch as batches
from tests.unit.test_openai_batch import Fleet, counts, requests, submit
from tests.waiting import wait_until

api, fleet = batches.api, batches.fleet  # the fixtures of the batches' own tests


# --- counts: kept on the row by the runner, read from it by a poll ------------------------------
def test_a_running_batch_s_counts_are_kept_on_its_row_as_its_requests_end(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted at every keep, however long a count takes (module constants: no setting holds them).
    monkeypatch.setattr(runner, "COUNT_EVERY_S", 0.0)
    monkeypatch.setattr(runner, "COUNT_SHARE", float("inf"))
    batch_id = submit(fleet, [*requests(40), b"{broken"])
    seen: list[tuple[int, int, int]] = []
    fleet.on_send = lambda sent: seen.append(counts(fleet, batch_id))
    assert fleet.runner(batch_id).run() == "completed"
    assert seen[0] == (41, 0, 1)  # validated: the broken line failed, nothing stored yet
    completed = [done for _, done, _ in seen]
    assert completed == sorted(completed) and 0 < completed[-1] < 40  # counted as they end
    assert counts(fleet, batch_id) == (41, 40, 1)


def test_a_poll_answers_the_counts_on_the_row_without_counting(
    api: OpenAI, sqlite_url: str
) -> None:
    uploaded = api.files.create(file=("in.jsonl", b"\n".join(requests(3))), purpose="batch")
    batch_id = "batch_run_elsewhere"
    with scope(sessions_for(sqlite_url)) as session:  # run by another instance, which counted
        openai_batches.add_batch(
            session,
            OpenAIBatch(
                id=batch_id,
                owner=ANONYMOUS,
                input_file_id=uploaded.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
                status="in_progress",
                total=200_000,
                completed=123_456,
                failed=789,
                expires_at=datetime.now(UTC) + timedelta(hours=24),
            ),
        )
        assert leases.take_lease(session, runner.lease_name(batch_id), "elsewhere", 3600)
    polled = api.batches.retrieve(batch_id)  # a count of its (absent) lines would be zeros
    assert polled.status == "in_progress" and polled.request_counts is not None
    assert polled.request_counts.model_dump() == {
        "total": 200_000,
        "completed": 123_456,
        "failed": 789,
    }
    assert [b.request_counts for b in api.batches.list()] == [polled.request_counts]


def test_an_output_file_s_metadata_is_its_recorded_size(api: OpenAI, sqlite_url: str) -> None:
    uploaded = api.files.create(file=("in.jsonl", b"\n".join(requests(4))), purpose="batch")
    created = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = wait_until(
        lambda: (found := api.batches.retrieve(created.id)).status == "completed" and found,
        30,
        "the batch to complete",
        every=0.1,
    )
    assert batch and batch.output_file_id
    content = api.files.content(batch.output_file_id).content
    assert api.files.retrieve(batch.output_file_id).bytes == len(content)
    with scope(sessions_for(sqlite_url)) as session:  # what a batch ended before sizes had
        openai_batches.set_file_sizes(session, batch.id, None, None)
    assert api.files.retrieve(batch.output_file_id).bytes == len(content)  # measured once...
    with scope(sessions_for(sqlite_url)) as session:
        found = openai_batches.get_batch(session, batch.id)
        assert found is not None and found.output_bytes == len(content)  # ...and kept


def test_an_output_file_s_size_is_recorded_when_its_batch_ends(fleet: Fleet) -> None:
    batch_id = submit(fleet, [*requests(7), b"{broken"])
    assert fleet.runner(batch_id).run() == "completed"
    batch = fleet.batch(batch_id)
    written = [
        b"".join(output.file_lines(fleet.sessions, batch, errors)) for errors in (False, True)
    ]
    assert (batch.output_bytes, batch.error_bytes) == (len(written[0]), len(written[1]))
    assert len(written[0]) > 0 and len(written[1]) > 0


def test_an_expired_batch_s_error_file_size_counts_what_it_did_not_run(fleet: Fleet) -> None:
    batch_id = submit(fleet, requests(40))
    past = datetime.now(UTC) - timedelta(seconds=1)
    with scope(fleet.sessions) as session:
        openai_batches.move_batch(
            session, batch_id, "validating", only_from=["validating"], expires_at=past
        )
    assert fleet.runner(batch_id).run() == "expired"
    batch = fleet.batch(batch_id)
    errors = b"".join(output.file_lines(fleet.sessions, batch, True))
    assert errors.count(b"batch_expired") == 40 and batch.error_bytes == len(errors)
    assert batch.output_bytes == 0


# --- a runner's unexpected error ----------------------------------------------------------------
def _run_in_background(fleet: Fleet, batch_id: str, error: Exception | None) -> bool:
    """Run the batch in a background runner whose catalog raises ``error`` (none: it works)."""

    def catalog() -> dict[str, int | None]:
        if error is None:
            return {batches.MODEL: 8}
        raise error

    started = background.ensure_running(
        batch_id, fleet.settings, sessions=fleet.sessions, catalog=catalog, publisher=fleet
    )
    background.wait(batch_id, 30)
    return started


def test_a_runner_s_unexpected_error_ends_its_batch_failed_with_the_reason(fleet: Fleet) -> None:
    batch_id = submit(fleet, requests(3), batch_id="batch_unexpected")
    assert _run_in_background(fleet, batch_id, RuntimeError("the catalog broke"))
    batch = fleet.batch(batch_id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors == [
        {
            "code": "internal_error",
            "message": "the batch stopped on an unexpected error: RuntimeError: the catalog broke",
            "param": None,
            "line": None,
        }
    ]
    again = background.ensure_running(  # a poll starts nothing: the batch has ended
        batch_id, fleet.settings, sessions=fleet.sessions, catalog=dict, publisher=fleet
    )
    assert again is False


def test_a_runner_that_loses_the_store_leaves_its_batch_to_the_next_request(
    fleet: Fleet,
) -> None:
    batch_id = submit(fleet, requests(3), batch_id="batch_store_lost")
    lost = OperationalError("SELECT 1", {}, ConnectionError("connection refused"))
    assert _run_in_background(fleet, batch_id, lost)
    assert fleet.batch(batch_id).status == "validating"  # transient: tried again when asked
    with scope(fleet.sessions) as session:  # and the lease was given back for that
        assert leases.take_lease(session, runner.lease_name(batch_id), "next", 60)


# --- ids in paths ------------------------------------------------------------------------------
def test_an_id_is_plausible_when_short_and_printable() -> None:
    assert ids.plausible("file-" + "a" * 59)
    assert not ids.plausible("file-" + "a" * 60)
    assert not any(ids.plausible(value) for value in ("", "a\x00b", "a\x01", "a\nb"))


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/v1/files/a%1Fb", "file_not_found"),
        ("GET", "/v1/files/a%01b/content", "file_not_found"),
        ("DELETE", "/v1/files/" + "f" * 65, "file_not_found"),
        ("GET", "/v1/batches/batch_%0A", "batch_not_found"),
        ("POST", "/v1/batches/" + "b" * 10_000 + "/cancel", "batch_not_found"),
        ("GET", "/v1/batches?after=a%00", "batch_not_found"),
        ("GET", "/v1/jobs/job%07", "job_not_found"),
        ("GET", "/v1/jobs/" + "j" * 65 + "/embeddings", "job_not_found"),
    ],
)
def test_an_id_that_cannot_name_anything_is_the_404_of_an_unknown_object(
    api: OpenAI, method: str, path: str, code: str
) -> None:
    response = api._client.request(method, "http://testserver" + path)  # type: ignore[attr-defined]
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert len(response.content) < 300  # an over-long id is not echoed back


def test_a_batch_over_an_input_file_id_holding_a_nul_is_the_404_of_an_unknown_file(
    api: OpenAI,
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        api.batches.create(
            input_file_id="file-\x00", endpoint="/v1/embeddings", completion_window="24h"
        )
    assert missing.value.body["code"] == "file_not_found"  # type: ignore[index]


def test_metadata_up_to_openai_s_bounds_is_kept_and_past_them_is_a_400(api: OpenAI) -> None:
    uploaded = api.files.create(file=("in.jsonl", b"\n".join(requests(1))), purpose="batch")

    def create(metadata: dict[str, str]) -> openai.types.Batch:
        return api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/embeddings",
            completion_window="24h",
            metadata=metadata,
        )

    at_bounds = {f"k{n}": "v" * 512 for n in range(15)} | {"k" * 64: "v"}
    assert create(at_bounds).metadata == at_bounds
    for over in ({f"k{n}": "v" for n in range(17)}, {"k": "v" * 513}, {"k" * 65: "v"}):
        with pytest.raises(openai.BadRequestError) as unbounded:
            create(over)
        error: dict[str, str] = unbounded.value.body  # type: ignore[assignment]
        assert (error["type"], error["param"]) == ("invalid_request_error", "metadata")
        assert "metadata" in error["message"]


def test_a_runner_s_unexpected_error_mid_run_ends_its_job_too(fleet: Fleet) -> None:
    """The batch's job ends with it: left running, it would wait for ever for the requests the
    run never sent (and the reconciler would keep re-sending the pending ones)."""

    def broken_broker(sent: int) -> None:
        if sent == 2:
            raise RuntimeError("the broker answered nonsense")

    # Several messages, so the run stops part way.
    fleet.settings = fleet.settings.model_copy(update={"bulk_batch_size": 4})
    fleet.on_send = broken_broker
    batch_id = submit(fleet, requests(30), batch_id="batch_mid_run")
    assert _run_in_background(fleet, batch_id, None)
    batch = fleet.batch(batch_id)
    assert batch.status == "failed"
    assert "the broker answered nonsense" in batch.errors[0]["message"]
    with scope(fleet.sessions) as session:
        job_id = backfills.job_of(session, batch_id)
        assert job_id is not None
        job = jobs.get_job(session, job_id)
        assert job is not None and job.state in ("failed", "partially_failed"), job.state
        assert job.done_items + job.failed_items == job.total_items
        assert "the broker answered nonsense" in (job.error or "")
        assert ledger.pending_batches(session, job_id) == []
