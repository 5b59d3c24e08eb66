"""Properties of the batch message: whatever is well formed survives the wire unchanged, whatever
breaks one constraint is refused by pydantic with an error that names the field, and the one
constructor (``BatchMessage.of``) builds from a recorded batch what validation would."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from storage.ledger import Claim, JobFacts, NewBatch
from storage.models import ID_LENGTH, JOB_ID_LENGTH, BatchState
from tasks.message import MAX_INTEGER, BatchMessage, Misfit, task_id

Raw = dict[str, Any]

# Valid Unicode (no lone surrogates); texts may hold NUL, names may not.
TEXT_CHARS = st.characters(codec="utf-8")
NAME_CHARS = st.characters(codec="utf-8", exclude_characters="\x00")
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def names(limit: int) -> st.SearchStrategy[str]:
    return st.text(NAME_CHARS, min_size=1, max_size=limit)


@st.composite
def well_formed(draw: st.DrawFn) -> Raw:
    """A message as a producer sends it: aligned lists, unique ids, distinct positions."""
    count = draw(st.integers(1, 8))
    return {
        "job_id": draw(names(JOB_ID_LENGTH)),
        "batch_index": draw(st.integers(0, MAX_INTEGER)),
        "model": draw(names(ID_LENGTH)),
        "texts": draw(st.lists(st.text(TEXT_CHARS, max_size=30), min_size=count, max_size=count)),
        "item_ids": draw(st.lists(names(ID_LENGTH), min_size=count, max_size=count, unique=True)),
        "positions": draw(
            st.lists(st.integers(0, 10**9), min_size=count, max_size=count, unique=True)
        ),
        "enqueued_at": draw(FLOATS),
        "model_wait_since": draw(st.none() | FLOATS),
        "tries": draw(st.integers(0, 100)),
        "priority": draw(st.integers(0, 9)),
    }


def through_the_wire(message: BatchMessage) -> BatchMessage:
    wire = json.dumps(message.model_dump(mode="json"))
    return BatchMessage.model_validate(json.loads(wire))


AT_THE_LIMITS: Raw = {
    "job_id": "j" * JOB_ID_LENGTH,
    "batch_index": 0,
    "model": "m" * ID_LENGTH,
    "texts": ["nul \x00 inside", "\x00", "", "emoji \U0001f600 and \u00e9"],
    "item_ids": ["i" * ID_LENGTH, "\U0001f600", "\u00e9", " "],
    "positions": [0, 10**9, 7, 3],
    "enqueued_at": 0.0,
    "model_wait_since": None,
    "tries": 0,
    "priority": 0,
}


@settings(max_examples=150, deadline=None)
@given(well_formed())
@example(AT_THE_LIMITS)
def test_a_well_formed_message_validates_and_round_trips_unchanged(raw: Raw) -> None:
    message = BatchMessage.model_validate(raw)
    assert message.model_dump() == raw
    again = through_the_wire(message)
    assert again == message
    assert again.model_dump() == raw


# --- one constraint broken at a time ----------------------------------------------------------
# Each breaker takes a well-formed message and an index into its items, and breaks exactly one
# rule; the expected words name the field (and, where there is one, the problem).


def _add_item(raw: Raw, item_id: str, position: int) -> None:
    raw["texts"].append("another text")
    raw["item_ids"].append(item_id)
    raw["positions"].append(position)


def _fresh_id(raw: Raw) -> str:
    n = 0
    while f"extra-{n}" in raw["item_ids"]:
        n += 1
    return f"extra-{n}"


def lengths_differ(raw: Raw, i: int) -> None:
    if len(raw["texts"]) > 1:
        raw["texts"].pop(i % len(raw["texts"]))
    else:
        raw["texts"].append("one text too many")


def duplicate_id(raw: Raw, i: int) -> None:
    _add_item(raw, raw["item_ids"][i], max(raw["positions"]) + 1)


def overlong_id(raw: Raw, i: int) -> None:
    raw["item_ids"][i] = "x" * (ID_LENGTH + 1)


def nul_in_id(raw: Raw, i: int) -> None:
    raw["item_ids"][i] = raw["item_ids"][i][: ID_LENGTH - 1] + "\x00"


def surrogate_in_text(raw: Raw, i: int) -> None:
    raw["texts"][i] = raw["texts"][i] + "\ud800"


def surrogate_in_id(raw: Raw, i: int) -> None:
    raw["item_ids"][i] = raw["item_ids"][i][: ID_LENGTH - 1] + "\udc00"


def negative_position(raw: Raw, i: int) -> None:
    raw["positions"][i] = -1 - i


def repeated_position(raw: Raw, i: int) -> None:
    count = len(raw["positions"])
    if count > 1:
        raw["positions"][(i + 1) % count] = raw["positions"][i]
    else:
        _add_item(raw, _fresh_id(raw), raw["positions"][i])


def empty_texts(raw: Raw, i: int) -> None:
    raw["texts"], raw["item_ids"], raw["positions"] = [], [], []


def overlong_job_id(raw: Raw, i: int) -> None:
    raw["job_id"] = (raw["job_id"] * (JOB_ID_LENGTH + 1))[: JOB_ID_LENGTH + 1 + i]


def overlong_model(raw: Raw, i: int) -> None:
    raw["model"] = "m" * (ID_LENGTH + 1)


def negative_batch_index(raw: Raw, i: int) -> None:
    raw["batch_index"] = -1 - i


def batch_index_past_the_column(raw: Raw, i: int) -> None:
    raw["batch_index"] = MAX_INTEGER + 1 + i


def position_past_the_column(raw: Raw, i: int) -> None:
    raw["positions"][i] = MAX_INTEGER + 1 + i


Breaker = Callable[[Raw, int], None]
BROKEN: list[tuple[str, Breaker, tuple[str, ...]]] = [
    ("lengths-differ", lengths_differ, ("texts, item_ids and positions differ in length",)),
    ("duplicate-id", duplicate_id, ("item_ids", "repeat")),
    ("id-201-chars", overlong_id, ("item_ids", "201 characters, over 200")),
    ("id-with-nul", nul_in_id, ("item_ids", "NUL")),
    ("text-lone-surrogate", surrogate_in_text, ("texts", "lone surrogate")),
    ("id-lone-surrogate", surrogate_in_id, ("item_ids", "lone surrogate")),
    ("negative-position", negative_position, ("positions", "not negative")),
    ("repeated-position", repeated_position, ("positions", "distinct")),
    ("empty-texts", empty_texts, ("texts", "at least 1 item")),
    ("job-id-over-36", overlong_job_id, ("job_id", "at most 36 characters")),
    ("model-201-chars", overlong_model, ("model", "201 characters, over 200")),
    ("negative-batch-index", negative_batch_index, ("batch_index", "greater than or equal to 0")),
    (
        "batch-index-past-the-column",
        batch_index_past_the_column,
        ("batch_index", "less than or equal to 2147483647"),
    ),
    ("position-past-the-column", position_past_the_column, ("positions", "at most 2147483647")),
]


@pytest.mark.parametrize(("breaker", "words"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
@settings(max_examples=25, deadline=None)
@given(raw=well_formed(), pick=st.integers(0, 7))
def test_a_message_that_breaks_one_rule_is_refused_naming_the_field(
    breaker: Breaker, words: tuple[str, ...], raw: Raw, pick: int
) -> None:
    breaker(raw, pick % len(raw["texts"]))
    with pytest.raises(ValidationError) as refused:
        BatchMessage.model_validate(raw)
    shown = str(refused.value)
    for word in words:
        assert word in shown


# --- the one constructor and the wire -----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(well_formed())
def test_of_builds_what_validation_would_from_a_recorded_batch(raw: Raw) -> None:
    """Producers, backfills and the reconciler build a message with ``of`` from a batch already
    checked and recorded: it is the message a worker validates from the same fields."""
    batch = NewBatch(raw["batch_index"], raw["item_ids"], raw["texts"], raw["positions"])
    built = BatchMessage.of(raw["job_id"], raw["model"], batch, raw["enqueued_at"], raw["priority"])
    expected = {**raw, "model_wait_since": None, "tries": 0}
    assert built.model_dump() == expected
    assert BatchMessage.model_validate(json.loads(json.dumps(built.body()))) == built


def test_the_body_is_the_json_the_embed_task_reads_and_the_task_id_names_the_batch() -> None:
    batch = NewBatch(7, ["a", "b"], ["first text", "second"], [3, 0])
    message = BatchMessage.of("job-1", "minilm", batch, 1_700_000_000.5)
    body = message.body()
    assert body == {
        "job_id": "job-1",
        "batch_index": 7,
        "model": "minilm",
        "texts": ["first text", "second"],
        "item_ids": ["a", "b"],
        "positions": [3, 0],
        "enqueued_at": 1_700_000_000.5,
        "model_wait_since": None,
        "tries": 0,
        "priority": 0,
    }
    assert json.loads(json.dumps(body)) == body  # plain JSON values
    assert message.task_id == task_id("job-1", 7) == "job-1.7"
    body["texts"].append("changed")  # the body is the message's copy to send, not its state
    assert message.texts == ["first text", "second"]


def test_the_largest_index_and_position_the_columns_hold_are_well_formed() -> None:
    raw = {**AT_THE_LIMITS, "batch_index": MAX_INTEGER, "positions": [0, 1, 2, MAX_INTEGER]}
    assert BatchMessage.model_validate(raw).batch_index == MAX_INTEGER


# --- a message against what its claim read from the store --------------------------------------
MESSAGE = BatchMessage.of("j", "minilm", NewBatch(3, ["a", "b"], ["one", "two"], [0, 1]), 0.0)
RUNNING = JobFacts(total=4, model="minilm", finished=False)
ENDED_JOB = JobFacts(total=4, model="minilm", finished=True)
PENDING = BatchState.SENT
DONE = BatchState.DONE


def claimed(recorded: list[str] | None, job: JobFacts = RUNNING) -> Claim:
    """This delivery's claim of a pending batch (or one it adopted, recorded as it carries)."""
    return Claim(PENDING, True, recorded, job)


FITS: list[tuple[str, Claim]] = [
    ("pending-batch-of-its-items", claimed(["a", "b"])),
    ("pending-batch-of-its-items-in-another-order", claimed(["b", "a"])),
    ("ended-batch-delivered-again", Claim(DONE, False, ["a", "b"], RUNNING)),
    ("ended-batch-of-an-ended-job-delivered-again", Claim(DONE, False, ["a", "b"], ENDED_JOB)),
    (
        "ended-batch-delivered-again-naming-another-model",
        Claim(DONE, False, ["a", "b"], JobFacts(4, "bge-small", finished=False)),
    ),
    ("unsealed-job", claimed(["a", "b"], JobFacts(None, "minilm", finished=False))),
]


@pytest.mark.parametrize("claim", [c for _, c in FITS], ids=[name for name, _ in FITS])
def test_a_message_that_fits_its_claim_has_no_misfit(claim: Claim) -> None:
    assert MESSAGE.misfit(claim) is None


MISFITS: list[tuple[str, Claim, Misfit, str]] = [
    (
        "batch-unknown-to-the-ledger-of-an-ended-job",
        Claim(None, False, None, ENDED_JOB),
        Misfit.ENDED,
        "batch 3 of job j came after its job had ended: nothing of it is stored",
    ),
    (
        "pending-batch-of-an-ended-job",
        claimed(["a", "b"], ENDED_JOB),
        Misfit.ENDED,
        "came after its job had ended",
    ),
    (
        "ended-batch-of-an-ended-job-with-other-items",
        Claim(DONE, False, ["a", "c"], ENDED_JOB),
        Misfit.ENDED,
        "came after its job had ended",
    ),
    (
        "ended-batch-with-other-items",
        Claim(DONE, False, ["c", "d"], RUNNING),
        Misfit.ITEMS,
        "malformed batch: batch 3 of job j was already sent with other items",
    ),
    (
        "pending-batch-with-fewer-items",
        claimed(["a", "b", "c"]),
        Misfit.ITEMS,
        "already sent with other items",
    ),
    (
        "another-model-than-its-job",
        claimed(["a", "b"], JobFacts(4, "bge-small", finished=False)),
        Misfit.MODEL,
        "malformed batch: it names model 'minilm', its job 'bge-small'",
    ),
    (
        "positions-outside-the-job",
        claimed(["a", "b"], JobFacts(1, "minilm", finished=False)),
        Misfit.POSITIONS,
        "malformed batch: positions up to 1 in a job of 1 items",
    ),
]


@pytest.mark.parametrize(
    ("claim", "misfit", "says"),
    [case[1:] for case in MISFITS],
    ids=[case[0] for case in MISFITS],
)
def test_a_message_that_does_not_fit_its_claim_is_named_with_a_reason(
    claim: Claim, misfit: Misfit, says: str
) -> None:
    found = MESSAGE.misfit(claim)
    assert found is not None
    assert found[0] is misfit
    assert says in found[1]
