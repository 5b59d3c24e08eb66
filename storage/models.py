"""The SQL schema: jobs, their embeddings, per-batch timing statistics, the fleet's model catalog
and what each host has prepared.

One declarative base with a naming convention, so constraint names are the same on SQLite and
PostgreSQL and migrations can refer to them. Vectors are stored as raw float32 bytes with their
dimension beside them: portable across both databases and read back with ``numpy.frombuffer``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import true

ID_LENGTH = 200
"""Longest item id, model name or tag the schema holds."""
JOB_ID_LENGTH = 36

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL wants BIGINT for large tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored time, timezone-aware: SQLite hands ``DateTime(timezone=True)`` back naive (UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


def _state_column(states: type[StrEnum], name: str) -> Enum:
    """A state enum stored as its values in a VARCHAR (no native enum type to migrate)."""
    return Enum(
        states,
        name=name,
        values_callable=lambda e: [m.value for m in e],
        native_enum=False,
        length=20,
    )


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARTIALLY_FAILED = "partially_failed"

    @property
    def finished(self) -> bool:
        """True once every item of the job is done or failed: its state no longer changes."""
        return self in _FINISHED_JOB_STATES


_FINISHED_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.PARTIALLY_FAILED})


class BatchState(StrEnum):
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"


class OpenAIBatchStatus(StrEnum):
    """The phases of an OpenAI batch, as OpenAI names them (``OpenAIBatch.status``)."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True once the batch has ended: nothing moves it on any more."""
        return self in _FINAL_BATCH_STATUSES


_FINAL_BATCH_STATUSES = frozenset(
    {
        OpenAIBatchStatus.COMPLETED,
        OpenAIBatchStatus.FAILED,
        OpenAIBatchStatus.EXPIRED,
        OpenAIBatchStatus.CANCELLED,
    }
)


class FailureKind(StrEnum):
    """Why items failed, stored with each failed item and with a job's first error, so every
    reader (the API's status code, the CLI's exit code, metrics) tells failures apart the same
    way (``tasks.failures.classify`` decides it, once)."""

    INPUT = "input"
    """The texts or the message cannot be embedded as sent: the sender's to fix."""
    MODEL = "model"
    """The model is unknown here, cannot be prepared, or cannot run on this host."""
    WORKER = "worker"
    """The worker process died on the batch, or it ran past its time limit."""
    UNAVAILABLE = "unavailable"
    """The store, the broker or a model source stayed out of reach through every retry."""
    LOST = "lost"
    """Its message was lost more often than the retries allow."""
    INTERNAL = "internal"
    """Anything else: a bug."""


class ModelState(StrEnum):
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


class Job(Base):
    """One request to embed a list of texts, split into batches on the queue."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    # Server defaults as well as Python ones, so an application without embedq can insert a job
    # with only id, model_name, queue and total_items (README, "Message format").
    state: Mapped[JobState] = mapped_column(
        _state_column(JobState, "job_state"),
        default=JobState.QUEUED,
        server_default=JobState.QUEUED.value,
        index=True,
    )
    total_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    done_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reused_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Items whose vector was copied from the content cache instead of computed."""
    sealed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    """False while a backfill is still adding items: workers never settle an unsealed job."""
    queue: Mapped[str] = mapped_column(String(50))
    tag: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    error: Mapped[str | None] = mapped_column(Text)
    """The first reason an item failed."""
    error_kind: Mapped[FailureKind | None] = mapped_column(
        _state_column(FailureKind, "failure_kind")
    )
    """What kind of failure ``error`` is."""
    created_at: Mapped[datetime] = mapped_column(default=_now, server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Embedding(Base):
    """One item's vector; unique per (job, item) so a redelivered batch never duplicates it."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("job_id", "item_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    position: Mapped[int] = mapped_column(Integer)
    text_sha256: Mapped[str] = mapped_column(String(64), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    token_count: Mapped[int] = mapped_column(Integer)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)


class BatchStat(Base):
    """Timing of one executed batch: where it ran, what it cost, how long it waited."""

    __tablename__ = "batch_stats"
    __table_args__ = (UniqueConstraint("job_id", "batch_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_index: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(100))
    precision: Mapped[str] = mapped_column(String(16), default="fp32", server_default="fp32")
    """The arithmetic that really ran: a bf16 model on a CPU without bf16 runs ``fp32``."""
    texts: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    padded_tokens: Mapped[int] = mapped_column(Integer)
    queue_wait_ms: Mapped[float] = mapped_column(Float)
    tokenize_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    pool_ms: Mapped[float] = mapped_column(Float)
    write_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=_now, index=True)


class PreparedModel(Base):
    """What a worker host has prepared in its model store, or why it could not."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "host"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(255))
    state: Mapped[ModelState] = mapped_column(_state_column(ModelState, "model_state"))

    source: Mapped[str | None] = mapped_column(Text)
    onnx_sha256: Mapped[str | None] = mapped_column(String(64))
    dim: Mapped[int | None] = mapped_column(Integer)
    precision: Mapped[str | None] = mapped_column(String(10))
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class ModelSource(Base):
    """Where the fleet gets a model: a worker host that lacks ``name`` prepares it from here.

    One row per name, written by ``embedq models register``; the options are the ones
    ``embedq models pull`` takes (precision, sha256, max_seq_length, pooling, normalize).
    """

    __tablename__ = "model_sources"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    registered_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class Batch(Base):
    """The ledger of a job's batches: what each carries, whether it ended, how often it was tried.

    Written with the job, before any message is published, so the store (not the broker) is the
    record of pending work. ``payload`` holds the texts and positions while the batch is pending,
    so a batch whose message was lost can be published again, and is cleared when it ends.
    """

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("job_id", "batch_index"),
        Index("ix_batches_state_updated_at", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_index: Mapped[int] = mapped_column(Integer)
    state: Mapped[BatchState] = mapped_column(
        _state_column(BatchState, "batch_state"), default=BatchState.SENT
    )
    item_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    item_ids: Mapped[list[str]] = mapped_column(JSON)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """``{"texts": [...], "positions": [...]}`` until the batch ends."""
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Times a worker process started the batch (claimed it in this ledger)."""
    sends: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Times the batch was published: once by its producer, then once per re-publish."""
    last_error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    """``host:pid`` of the process that last started the batch."""
    sent_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    """Last progress: sent, started, retried, re-published or ended."""
    finished_at: Mapped[datetime | None]


class Lease(Base):
    """A named lease, held by one process at a time until it expires (the reconciler's)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime]


class FailedItem(Base):
    """An item that could not be embedded, with the reason; ``--retry-failed`` retries these."""

    __tablename__ = "failed_items"
    __table_args__ = (UniqueConstraint("job_id", "item_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    reason: Mapped[str] = mapped_column(Text)
    kind: Mapped[FailureKind | None] = mapped_column(_state_column(FailureKind, "failure_kind"))
    """``None`` for items recorded before failures had kinds."""
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Backfill(Base):
    """A named backfill, the collection it maintains: ``job_id`` holds the items of its current
    version (``CollectionVersion``); running it again syncs it."""

    __tablename__ = "backfills"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Rows the last run skipped because their id was met before in the source."""
    last_sync: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    """What the last whole run found against the store: unchanged, new, changed, removed ids
    (and whether they were pruned), ``tasks.backfill.Sync``."""
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class CollectionVersion(Base):
    """One version of a collection (a backfill): the corpus under one model file, held by a job
    of its own. The backfill's ``job_id`` names the current version, the one readers get; a
    migration builds another version beside it until ``embedq collection NAME use VERSION``."""

    __tablename__ = "collection_versions"

    name: Mapped[str] = mapped_column(
        ForeignKey("backfills.name", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    model_name: Mapped[str] = mapped_column(String(ID_LENGTH))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    """The model file the version was built with (``None``: not known when it was made)."""
    index_table: Mapped[str | None] = mapped_column(String(63))
    """The table of its vector index (``storage.vector_index``), made at its first write where
    the store has a vector extension."""
    dim: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class OpenAIFile(Base):
    """A file uploaded through the API (``POST /v1/files``): its bytes live in the files folder
    (``EMBEDQ_FILES_DIR``) under its id, never in the database or in memory."""

    __tablename__ = "api_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    """The id of the API key that uploaded it (``anonymous`` without auth): only it sees it."""
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class OpenAIBatch(Base):
    """An OpenAI batch (``POST /v1/batches``): its input file, run as the backfill of the same
    name. ``status`` is the last phase reached; the request counts are read from the job until
    the batch ends, then kept here."""

    __tablename__ = "api_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    input_file_id: Mapped[str] = mapped_column(ForeignKey("api_files.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), index=True)
    """An ``OpenAIBatchStatus`` value."""
    model: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    """The model every request of the file names, known once the file is validated."""
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    """Why the whole batch failed (OpenAI's ``errors.data``), or ``None``."""
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """The sizes of the output and error files, recorded when the batch ended (their bytes are
    written from the store on download; counting them then read a 1.67 GB file through)."""
    created_at: Mapped[datetime] = mapped_column(default=_now)
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]


class OpenAIBatchRequest(Base):
    """One line of a batch's input file, as its validation found it: the request's custom id and
    how many texts it embeds, or why it is not a request the batch can run. Its texts are items
    of the batch's job named ``LLLLLLLL.I`` (line, index in ``input``), so the store can tell
    when every text of a request is stored."""

    __tablename__ = "api_batch_requests"
    __table_args__ = (Index("ix_api_batch_requests_custom_id", "batch_id", "custom_id"),)

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("api_batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    custom_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    inputs: Mapped[int] = mapped_column(Integer, default=0)
    base64: Mapped[bool] = mapped_column(Boolean, default=False)
    """The request asked for ``encoding_format: base64``."""
    error_code: Mapped[str | None] = mapped_column(String(50))
    error: Mapped[str | None] = mapped_column(Text)
