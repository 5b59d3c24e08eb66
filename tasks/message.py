"""The batch message: the one JSON shape a producer, a backfill and the reconciler send and the
``embed`` task reads (README, "Message format").

Light on purpose: a producer imports it without onnxruntime or tokenizers. Everything the
schema constrains is checked here, at the edge, so a bad id or text fails its job with a reason
naming the item instead of an error from the database driver in the worker. What the store
holds is checked here too, once its claim has read it (``BatchMessage.misfit``): a message that
does not fit its job or its batch's record in the ledger is never run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.ledger import Claim, NewBatch
from storage.models import ID_LENGTH, JOB_ID_LENGTH
from tasks import names
from worker.errors import InputError
from worker.validation import is_unicode

MAX_INTEGER = 2**31 - 1
"""The largest value the schema's integer columns hold (PostgreSQL's ``integer``): a batch's
index in the ledger, an item's position. A message past it is malformed on either store (one
was left queued for good: its claim could not be asked)."""


class Misfit(StrEnum):
    """How a well-formed message does not fit what its claim read from the store."""

    ENDED = "ended"
    """Its job had ended: nothing of it may be stored (a batch that ended, delivered again with
    the same items, is a redelivery and fits)."""
    ITEMS = "items"
    """The ledger recorded its batch with other items."""
    MODEL = "model"
    """It names another model than its job."""
    POSITIONS = "positions"
    """Its positions lie outside its job."""


def task_id(job_id: str, batch_index: int) -> str:
    """The Celery task id of a batch: the same for every send, so the broker can be asked
    whether a batch's message is still there, and Flower shows one task per batch."""
    return f"{job_id}.{batch_index}"


def shown(body: Mapping[str, Any]) -> str:
    """What Flower and the logs show of a batch message (parsed or not): ids and sizes, never
    whole texts."""
    words = f"job={body.get('job_id')} batch={body.get('batch_index')} model={body.get('model')}"
    texts = body.get("texts")
    if isinstance(texts, list) and texts and isinstance(texts[0], str):
        first = texts[0][:40] + ("..." if len(texts[0]) > 40 else "")
        words += f" texts={len(texts)} first={first!r}"
    return words


def check_name(value: str, what: str, limit: int = ID_LENGTH) -> str:
    """``value`` if the schema can hold it as ``what`` (an id, a model name, a tag)."""
    if not value:
        raise InputError(f"{what} is empty")
    if len(value) > limit:
        raise InputError(f"{what} {value[:40]!r}... is {len(value)} characters, over {limit}")
    if "\x00" in value:
        raise InputError(f"{what} {value[:40]!r} holds a NUL character")
    if not is_unicode(value):
        raise InputError(f"{what} {value[:40]!r} holds a lone surrogate (not valid Unicode text)")
    return value


def check_ids(ids: Sequence[object], count: int) -> list[str]:
    """Item ids as strings, one per text, unique, each one the schema can hold."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"ids must be a list of strings, got {type(ids).__name__}")
    if len(ids) != count:
        raise InputError(f"{len(ids)} ids for {count} texts: give one id per text")
    clean = []
    for index, raw in enumerate(ids):
        if not isinstance(raw, (str, int)) or isinstance(raw, bool):
            raise InputError(f"id at index {index} is a {type(raw).__name__}, not a string")
        clean.append(check_name(str(raw), f"id at index {index}"))
    seen: set[str] = set()
    for item in clean:
        if item in seen:
            raise InputError(f"ids must be unique: {item!r} is given more than once")
        seen.add(item)
    return clean


class BatchMessage(BaseModel):
    """One batch of one job: the ``embed`` task's only argument, as JSON."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(min_length=1, max_length=JOB_ID_LENGTH)
    batch_index: int = Field(ge=0, le=MAX_INTEGER)
    model: str
    texts: list[str] = Field(min_length=1)
    item_ids: list[str]
    positions: list[int]
    enqueued_at: float
    model_wait_since: float | None = None
    """Set by the worker when it sends a batch again because its host is preparing the model."""
    tries: int = Field(default=0, ge=0)
    """Tries that ended in a transient error (set by the worker when it sends the batch again)."""
    priority: int = Field(default=names.FIRST, ge=names.FIRST, le=names.LAST)
    """The broker priority it is sent with on the interactive queue (``names.FIRST`` first)."""

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str) -> str:
        return _checked(value, "job id", JOB_ID_LENGTH)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _checked(value, "model name", ID_LENGTH)

    @field_validator("item_ids")
    @classmethod
    def _item_ids(cls, value: list[str]) -> list[str]:
        for index, item in enumerate(value):
            _checked(item, f"id at index {index}", ID_LENGTH)
        if len(set(value)) != len(value):
            raise ValueError("item ids repeat within the batch")
        return value

    @field_validator("texts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        bad = [i for i, text in enumerate(value) if not is_unicode(text)]
        if bad:
            raise ValueError(f"texts at index {bad[:5]} hold lone surrogates (not valid Unicode)")
        return value

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        counts = {len(self.texts), len(self.item_ids), len(self.positions)}
        if len(counts) != 1:
            raise ValueError(
                f"texts, item_ids and positions differ in length ({len(self.texts)},"
                f" {len(self.item_ids)}, {len(self.positions)})"
            )
        if min(self.positions) < 0 or len(set(self.positions)) != len(self.positions):
            raise ValueError("positions must be distinct and not negative")
        if max(self.positions) > MAX_INTEGER:
            raise ValueError(f"positions must be at most {MAX_INTEGER}")
        return self

    def misfit(self, claim: Claim) -> tuple[Misfit, str] | None:
        """How this message does not fit what its claim read (its job, the items the ledger
        recorded for its batch), with the reason to record; ``None`` when it fits. The one
        check, for a batch run alone and for the feeder's claim of many."""
        job, recorded = claim.job, claim.recorded
        same = recorded is not None and set(recorded) == set(self.item_ids)
        where = f"batch {self.batch_index} of job {self.job_id}"
        if job is not None and job.finished and not (same and not claim.claimed):
            return Misfit.ENDED, f"{where} came after its job had ended: nothing of it is stored"
        if recorded is not None and not same:
            return Misfit.ITEMS, f"malformed batch: {where} was already sent with other items"
        if job is None or (claim.state is not None and not claim.claimed):
            return None  # no job to fit; or a batch that ended, delivered again: skipped
        if self.model != job.model:
            return Misfit.MODEL, (
                f"malformed batch: it names model {self.model!r}, its job {job.model!r}"
            )
        if job.total is not None and max(self.positions) >= job.total:
            return Misfit.POSITIONS, (
                f"malformed batch: positions up to {max(self.positions)} in a job of"
                f" {job.total} items"
            )
        return None

    @classmethod
    def of(
        cls, job_id: str, model: str, batch: NewBatch, now: float, priority: int = names.FIRST
    ) -> BatchMessage:
        """The message of a batch already checked and recorded in the ledger, as a producer, a
        backfill and the reconciler send it (built without validating again)."""
        return cls.model_construct(
            job_id=job_id,
            batch_index=batch.index,
            model=model,
            texts=batch.texts,
            item_ids=batch.item_ids,
            positions=batch.positions,
            enqueued_at=now,
            model_wait_since=None,
            tries=0,
            priority=priority,
        )

    def body(self) -> dict[str, Any]:
        """The message as it travels: the ``embed`` task's argument, JSON."""
        return self.model_dump(mode="json")

    @property
    def task_id(self) -> str:
        return task_id(self.job_id, self.batch_index)


def _checked(value: str, what: str, limit: int) -> str:
    try:
        return check_name(value, what, limit)
    except InputError as exc:  # pydantic wants ValueError from a validator
        raise ValueError(str(exc)) from None
