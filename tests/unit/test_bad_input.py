"""A catalogue of bad input, one table per surface, on a SQLite store in local mode.

- ``producer.submit`` refuses bad input with an ``InputError`` that names the item, and stores
  nothing: no job, no batch.
- A backfill turns each bad row of its source into a failed item whose reason says what is
  wrong with it, embeds the rest and never crashes; a repeated id is counted as a duplicate.

Batches run as in local mode, through the product's own ``LocalPublisher``, on a runtime whose
engine is the deterministic fake (``tests.fakes.fake_runtime``): what is checked here is what
happens before and around the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from storage.models import Batch, Embedding, FailedItem, Job
from storage.session import dispose_all, scope, sessions_for
from tasks import backfill, producer
from tasks.backfill import readers
from tasks.local import LocalPublisher
from tests.fakes import fake_runtime
from worker.errors import InputError
from worker.settings import Settings

MODEL = "fake"


@dataclass(frozen=True)
class Store:
    """A migrated SQLite store in local mode (no broker), its default model the fake one."""

    url: str

    def settings(self, **given: Any) -> Settings:
        values = {"database_url": self.url, "broker_url": None, "default_model": MODEL, **given}
        return Settings(**values)

    def local(self, settings: Settings) -> LocalPublisher:
        """Local mode's publisher, running each batch here with the fake engine."""
        return LocalPublisher(settings, fake_runtime(settings))


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    yield Store(sqlite_url)
    dispose_all()


def count(url: str, table: Any) -> int:
    with scope(sessions_for(url)) as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


# --- producer.submit --------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """The arguments of one ``submit`` call and what its refusal must say."""

    says: str
    texts: object = ("one text", "another text")
    options: tuple[tuple[str, object], ...] = ()
    no_default_model: bool = False
    max_job_items: int | None = None


def case(
    kind: str, says: str, texts: object = ("one text", "another text"), **options: object
) -> Any:
    return pytest.param(Submit(says, texts, tuple(options.items())), id=kind)


TOO_LONG = "x" * 201
SUBMIT_CASES = [
    case("texts-not-a-list", r"texts must be a list of strings, got int", 42),
    case("texts-a-str", r"texts must be a list of strings, got str", "one text"),
    case("texts-empty", r"texts is empty", []),
    case("text-none", r"texts at index 1 are not strings \(NoneType\)", ["fine", None]),
    case("text-bytes", r"texts at index 1 are not strings \(bytes\)", ["fine", b"bytes"]),
    case("text-int", r"texts at index 0 are not strings \(int\)", [7, "fine"]),
    case("text-empty", r"texts at index 1 are empty or whitespace only", ["fine", ""]),
    case("text-whitespace", r"texts at index 2 are empty or whitespace only", ["a", "b", " \t\n"]),
    case("text-lone-surrogate", r"texts at index 0 hold lone surrogates", ["a\ud800b", "fine"]),
    case("text-with-nul", r"texts at index 1 hold a NUL character", ["fine", "a\x00b"]),
    pytest.param(
        Submit(r"4 texts is more than .* limit of 3", ("a", "b", "c", "d"), max_job_items=3),
        id="texts-over-the-job-limit",
    ),
    case("ids-fewer-than-texts", r"1 ids for 2 texts", ids=["a"]),
    case("ids-more-than-texts", r"3 ids for 2 texts", ids=["a", "b", "c"]),
    case("ids-a-str", r"ids must be a list of strings, got str", ids="ab"),
    case("ids-duplicate", r"'a' is given more than once", ids=["a", "a"]),
    case("id-with-nul", r"id at index 1 'b\\x00c' holds a NUL", ids=["a", "b\x00c"]),
    case(
        "id-201-chars",
        r"id at index 0 'x{40}'\.\.\. is 201 characters, over 200",
        ids=[TOO_LONG, "b"],
    ),
    case(
        "id-lone-surrogate",
        r"id at index 1 'b\\ud800' holds a lone surrogate",
        ids=["a", "b\ud800"],
    ),
    case("id-float", r"id at index 0 is a float", ids=[1.5, "b"]),
    case("id-none", r"id at index 1 is a NoneType", ids=["a", None]),
    case("id-bool", r"id at index 0 is a bool", ids=[True, "b"]),
    case("model-201-chars", r"model name 'x{40}'\.\.\. is 201 characters", model=TOO_LONG),
    case("model-with-nul", r"model name 'mini\\x00lm' holds a NUL", model="mini\x00lm"),
    case("model-lone-surrogate", r"model name 'm\\udc80' holds a lone surrogate", model="m\udc80"),
    pytest.param(
        Submit(r"no model given and EMBEDQ_DEFAULT_MODEL is not set", no_default_model=True),
        id="model-empty-no-default",
    ),
    case("tag-201-chars", r"tag 'x{40}'\.\.\. is 201 characters, over 200", tag=TOO_LONG),
    case("tag-with-nul", r"tag 'run\\x001' holds a NUL", tag="run\x001"),
    case("queue-unknown", r"unknown queue 'urgent'", queue="urgent"),
]


@pytest.mark.parametrize("bad", SUBMIT_CASES)
def test_submit_refuses_bad_input_naming_the_item_and_stores_nothing(
    store: Store, bad: Submit
) -> None:
    settings = store.settings(default_model=None) if bad.no_default_model else store.settings()
    options: dict[str, Any] = dict(bad.options)
    if bad.no_default_model:
        options["model"] = ""
    if bad.max_job_items is not None:
        options["max_items"] = bad.max_job_items
    local = store.local(settings)
    with pytest.raises(InputError) as refused:
        producer.submit(bad.texts, settings=settings, publisher=local, **options)  # type: ignore[arg-type]
    assert re.search(bad.says, str(refused.value)), str(refused.value)
    assert (count(store.url, Job), count(store.url, Batch)) == (0, 0)


def test_a_job_over_the_limit_is_told_the_job_limit_not_a_setting_that_cannot_raise_it(
    store: Store,
) -> None:
    settings = store.settings()
    with pytest.raises(InputError) as refused:
        producer.submit(
            ["a", "b", "c", "d"], settings=settings, publisher=store.local(settings), max_items=3
        )
    assert "EMBEDQ_MAX_BATCH_ITEMS" not in str(refused.value)
    assert "job" in str(refused.value)


def test_the_same_setup_stores_a_well_formed_submit(store: Store) -> None:
    """The control: the refusals above are the input's doing, not the setup's."""
    settings = store.settings()
    local = store.local(settings)
    job = producer.submit(
        ["one text", "another text"], ids=["a", "b"], tag="ok", settings=settings, publisher=local
    )
    assert job.wait(timeout=5)["state"] == "succeeded"
    assert (count(store.url, Job), count(store.url, Embedding)) == (1, 2)


# --- backfill rows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    """A source line put at row 2 among good rows, and how the backfill must record it."""

    line: bytes
    says: str
    """A pattern the failed item's reason must match."""
    item_id: str
    """The failed item's id: the row's own, or ``#<row>`` when it has no usable one."""


def row(kind: str, line: str | bytes, says: str, item_id: str) -> Any:
    raw = line if isinstance(line, bytes) else line.encode("utf-8")
    return pytest.param(BadRow(raw, says, item_id), id=kind)


ROW_CASES = [
    row("line-not-json", "{broken json", r"^row 2 is not JSON: ", "#2"),
    row("line-a-json-array", '["g9", "a text"]', r"^row 2 is not an object$", "#2"),
    row("line-a-json-number", "42", r"^row 2 is not an object$", "#2"),
    row("row-without-id", '{"text": "no id here"}', r"^row 2 has no 'id'$", "#2"),
    row("row-with-null-id", '{"id": null, "text": "a text"}', r"^row 2 has no 'id'$", "#2"),
    row("row-without-text", '{"id": "bad"}', r"^row 2 has no 'text'$", "bad"),
    row(
        "text-a-number", '{"id": "bad", "text": 5}', r"^row 2 has a non-text \(int\) 'text'$", "bad"
    ),
    row("text-a-list", '{"id": "bad", "text": ["a"]}', r"^row 2 has a non-text \(list\)", "bad"),
    row("text-empty", '{"id": "bad", "text": ""}', r"^empty or whitespace-only text$", "bad"),
    row("text-whitespace", '{"id": "bad", "text": " \\t "}', r"^empty or whitespace-only", "bad"),
    row(
        "id-201-chars",
        json.dumps({"id": "x" * 201, "text": "a fine text"}),
        r"^row 2: id 'x{40}'\.\.\. is 201 characters, over 200$",
        "#2",
    ),
    row(
        "id-with-nul",
        '{"id": "b\\u0000d", "text": "a fine text"}',
        r"^row 2: id 'b\\x00d' holds a NUL character$",
        "#2",
    ),
    row(
        "id-lone-surrogate",
        '{"id": "b\\udc80d", "text": "a fine text"}',
        r"^row 2: id 'b\\udc80d' holds a lone surrogate",
        "#2",
    ),
    row(
        "id-not-utf8",
        b'{"id": "b\xe9d", "text": "a fine text"}',
        r"^row 2: id .* holds a lone surrogate",
        "#2",
    ),
    row(
        "text-lone-surrogate",
        '{"id": "bad", "text": "a \\ud800 b"}',
        r"^row 2 has text that is not valid Unicode",
        "bad",
    ),
    row(
        "text-not-utf8",
        b'{"id": "bad", "text": "caf\xe9"}',
        r"^row 2 has text that is not valid Unicode \(bytes that are not UTF-8",
        "bad",
    ),
]

GOOD = [(f"g{i}", f"good text number {i}") for i in (0, 1, 3, 4)]


def write_source(path: Path, bad: bytes) -> Path:
    lines = [json.dumps({"id": i, "text": t}).encode("utf-8") for i, t in GOOD]
    lines.insert(2, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run_backfill(store: Store, path: Path, name: str) -> backfill.BackfillProgress:
    settings = store.settings()
    options = backfill.Options(name=name, model=MODEL, batch_size=32)
    reader = readers.open_source(str(path))
    return backfill.BackfillRun(reader, options, settings, publisher=store.local(settings)).run()


def outcome(
    url: str, name: str
) -> tuple[backfill.BackfillSummary, list[tuple[str, str]], list[str]]:
    summary = backfill.summary(url, name)
    with scope(sessions_for(url)) as session:
        failed = session.execute(
            select(FailedItem.item_id, FailedItem.reason).where(FailedItem.job_id == summary.job_id)
        ).all()
        stored = session.scalars(
            select(Embedding.item_id).where(Embedding.job_id == summary.job_id)
        ).all()
    return summary, [(i, r) for i, r in failed], sorted(stored)


@pytest.mark.parametrize("bad", ROW_CASES)
def test_a_bad_row_becomes_one_failed_item_with_its_reason_and_the_rest_is_embedded(
    store: Store, bad: BadRow, tmp_path: Path
) -> None:
    progress = run_backfill(store, write_source(tmp_path / "rows.jsonl", bad.line), "rows")
    summary, failed, stored = outcome(store.url, "rows")
    assert stored == [i for i, _ in GOOD]
    assert len(failed) == 1, failed
    item_id, reason = failed[0]
    assert item_id == bad.item_id
    assert re.search(bad.says, reason), reason
    assert progress.failed_here == 1
    assert (summary.state, summary.items, summary.done, summary.failed) == (
        "partially_failed",
        5,
        4,
        1,
    )
    assert summary.in_flight_batches == 0


def test_a_repeated_id_is_counted_as_a_duplicate_not_failed(store: Store, tmp_path: Path) -> None:
    again = json.dumps({"id": "g0", "text": "the same id again"}).encode("utf-8")
    progress = run_backfill(store, write_source(tmp_path / "rows.jsonl", again), "rows")
    summary, failed, stored = outcome(store.url, "rows")
    assert (stored, failed) == ([i for i, _ in GOOD], [])
    assert progress.duplicates == 1
    assert (summary.state, summary.items, summary.failed, summary.duplicates) == (
        "succeeded",
        4,
        0,
        1,
    )
