"""All of embedq's settings, in one pydantic-settings object.

Precedence (highest first): values passed to ``Settings(...)`` in code, ``EMBEDQ_*`` environment
variables, a ``.env`` file in the working directory, the defaults below. Modules ask
``get_settings()``; tests call ``get_settings.cache_clear()`` after changing the environment.

The names are flat (``EMBEDQ_MODEL_DIR``, ``EMBEDQ_PROVIDERS``) because operators type them into
compose files and systemd units, and the issues that specify them name them that way.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

FallbackPolicy = Literal["warn", "error"]
RuntimeChoice = Literal["auto", "onnxruntime", "openvino"]


def _default_model_dir() -> Path:
    return platformdirs.user_cache_path("embedq") / "models"


def _default_database_url() -> str:
    return f"sqlite:///{platformdirs.user_data_path('embedq') / 'embedq.db'}"


class Settings(BaseSettings):
    """embedq's configuration; every field is read from ``EMBEDQ_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="EMBEDQ_", env_file=".env", extra="ignore")

    # --- model store -------------------------------------------------------------------------
    model_dir: Path = Field(default_factory=_default_model_dir)
    """Where prepared models live, one folder per name."""

    # --- store ---------------------------------------------------------------------------------
    database_url: str = Field(default_factory=lambda: _default_database_url())
    """SQLAlchemy URL of the job store: SQLite by default, PostgreSQL in production
    (``postgresql+psycopg://user:pass@host/db``)."""

    # --- queue -------------------------------------------------------------------------------
    broker_url: str | None = None
    """Celery broker. Unset: producers run jobs in an in-process worker (local mode) and
    ``celery -A worker worker`` connects to Redis on localhost."""
    default_model: str | None = None
    """Model a job uses when it names none; workers load it at start."""
    job_batch_size: int = Field(default=128, ge=1)
    """Texts per queue message: the producer splits a job into batches of this size."""
    bulk_batch_size: int | None = Field(default=None, ge=1)
    """Texts per queue message of bulk work (jobs on the bulk queue, backfills). Default:
    ``job_batch_size``. On a GPU fleet make it large (1024): each message costs the broker,
    Celery, a claim and a transaction whatever it holds, and a GPU embeds a thousand short texts
    in milliseconds. Interactive messages keep ``job_batch_size``."""
    task_time_limit: int = Field(default=600, ge=1)
    """Hard limit in seconds for one batch; the Redis visibility timeout is set above it."""
    visibility_timeout: int | None = Field(default=None, ge=1)
    """Seconds before Redis hands an unacknowledged batch (its worker died) to another worker.
    Default: twice the hard time limit plus a minute, so a running batch is never handed out."""
    unacked_restore_interval: int = Field(default=10, ge=1)
    """How often a worker sweeps Redis for unacknowledged batches past the visibility timeout."""
    max_retries: int = Field(default=3, ge=0)
    """Times a batch whose worker process died is retried before its job records it failed."""

    backfill_max_in_flight: int = Field(default=8, ge=1)
    """Most unfinished batches one backfill keeps on the queue (its backpressure)."""
    stuck_after: float = Field(default=300, gt=0)
    """Seconds a batch may go without progress (sent, started, retried or finished) before it
    is overdue: ``embedq job`` names it, ``embedq health`` fails, and the reconciler checks
    whether its message is still on the broker and re-publishes it when it is not."""
    sweep_interval: float = Field(default=30, gt=0)
    """Seconds between the reconciler's sweeps of the batch ledger. Every worker runs the
    reconciler; a lease in the store lets one sweep at a time across the fleet."""
    transient_retries: int = Field(default=8, ge=0)
    """Times a batch is tried again after a transient error (database or broker unreachable,
    a lock timeout), with exponential backoff and jitter, before its items are failed."""
    retry_backoff_max: float = Field(default=60, gt=0)
    """Longest pause in seconds between two tries of a batch after transient errors (also
    kept under half the visibility timeout, so a waiting retry is never handed out twice)."""

    # --- model archives --------------------------------------------------------------------
    archive_max_bytes: int = Field(default=32 * 1024**3, ge=1)
    """Most bytes a model archive may unpack to (its members' sizes added up); a larger one
    is refused before anything is written."""
    archive_max_members: int = Field(default=10_000, ge=1)
    """Most files and folders a model archive may hold."""

    # --- operations ----------------------------------------------------------------------------
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the worker's Prometheus ``/metrics`` (served by the worker's parent, summing its
    pool processes). Unset: no metrics."""
    metrics_address: str = "127.0.0.1"
    """Interface ``/metrics`` binds to; ``0.0.0.0`` to let a Prometheus on another host scrape."""
    log_json: bool = False
    """Log one JSON object per line (fields: time, level, logger, message, and per batch: job,
    batch, texts, tokens, padded_tokens, ms, provider)."""
    flower_user: str | None = None
    """Flower's basic-auth user; ``embedq flower`` refuses to start without user and password
    unless told ``--insecure-no-auth``."""
    flower_password: str | None = None
    """Flower's basic-auth password."""

    # --- HTTP API (`embedq serve`) --------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Keys the API accepts as ``Authorization: Bearer KEY``, comma-separated; never logged.
    ``embedq serve`` refuses to start without one unless told ``--insecure-no-auth``."""
    api_rate_limit: int = Field(default=600, ge=0)
    """Requests per minute one API key may make (across every ``serve`` instance sharing the
    broker's Redis); 0: no limit. Over it: 429."""
    api_auth_failure_limit: int = Field(default=30, ge=0)
    """Requests with a wrong API key one client address may make per minute before it is
    answered 429 instead of 401; 0: no limit."""
    api_max_inputs: int = Field(default=2048, ge=1)
    """Most texts one ``/v1/embeddings`` request may hold (OpenAI's limit); over it: 400."""
    api_max_waiting_texts: int = Field(default=8192, ge=1)
    """Most texts one key may have waiting in ``/v1/embeddings`` requests on one instance;
    past it: 429 until some finish (a key with none waiting is always let in)."""
    api_max_request_bytes: int = Field(default=16 * 1024**2, ge=1)
    """Largest request body ``/v1/embeddings`` and ``/v1/jobs`` accept (413 above it)."""
    api_max_file_bytes: int = Field(default=200 * 1024**2, ge=1)
    """Largest file ``POST /v1/files`` accepts (OpenAI's Batch API takes up to 200 MB)."""
    api_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest request head (request line and headers) the API reads; over it: 431, closed."""
    api_client_timeout: float = Field(default=10, gt=0)
    """Seconds a client has to send a whole request head, and the longest pause within a
    body; past it the connection is closed (408 for a head begun and not finished)."""
    api_wait_timeout: float = Field(default=60, gt=0)
    """Seconds ``POST /v1/embeddings`` waits for its job before answering 504 with the job id."""
    api_batch_lease: float = Field(default=30, gt=0)
    """Seconds an OpenAI batch's runner holds its lease between renewals: when its ``serve``
    process dies, another instance takes the batch over after this long."""
    files_dir: Path = Field(default_factory=lambda: platformdirs.user_data_path("embedq") / "files")
    """Where the API keeps uploaded batch input files (their metadata is in the store); every
    ``serve`` instance of a fleet must see the same folder."""

    # --- models on worker hosts ----------------------------------------------------------------
    host_name: str = Field(default_factory=socket.gethostname)
    """This host's name in the ``models`` table and its download queue (``download.<name>``).
    Workers that share one model folder (containers on one host) should share it."""
    download_time_limit: int = Field(default=900, ge=1)
    """Hard limit in seconds for preparing one model (fetch, export, verify)."""
    model_wait_interval: float = Field(default=2.0, gt=0)
    """Seconds before a batch whose model is being prepared on its host is tried again."""
    download_lease: float = Field(default=30, gt=0)
    """Seconds a model's preparation on a host counts as under way without word from the
    worker preparing it (it renews the lease every third of that); past it, a batch waiting
    for the model asks for it again, so a worker killed mid-download delays its batches by
    about this long, not by the broker's visibility timeout."""

    # --- inference ---------------------------------------------------------------------------
    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """ONNX Runtime execution providers in order of preference, comma-separated. Empty: CUDA
    when onnxruntime lists it, else CoreML / DirectML where present, else CPU."""
    provider_fallback: FallbackPolicy | None = None
    """What to do when a requested GPU provider cannot be used, or a bf16 model lands on a CPU
    without bf16 arithmetic: log a warning and run on what was obtained (``warn``: the CPU, or
    fp32), or refuse to build the engine (``error``). Default: ``error`` on a GPU worker
    (``EMBEDQ_GPU_DEVICES`` set), ``warn`` elsewhere."""
    runtime: RuntimeChoice = "auto"
    """Which runtime runs a prepared model: ``auto`` runs bf16 models on OpenVINO (the CPU's
    bf16 units) and every other model on ONNX Runtime; ``onnxruntime`` runs every model on ONNX
    Runtime (a bf16 model's file in fp32); ``openvino`` runs every model on OpenVINO's CPU
    plugin (needs ``pip install 'embedq[openvino]'``; CPU workers only)."""
    worker_nice: int = Field(default=0, ge=0, le=19)
    """Niceness of each pool process. Give a bulk-only fleet sharing cores with an interactive
    one a high value (10-19) so the operating system runs interactive batches first."""
    gpu_devices: Annotated[list[int], NoDecode] = Field(default_factory=list)
    """CUDA device ids for this worker, comma-separated (``0,1``): one process per device,
    each child bound to its own. Empty: a CPU worker (or onnxruntime's device 0)."""
    processes: int = Field(default=1, ge=1)
    """Worker processes sharing this machine's cores; sizes the default thread count. A GPU
    worker runs one process per device instead."""
    intra_op_threads: int | None = Field(default=None, ge=1)
    """ONNX Runtime intra-op threads per process. Default: cores // processes (at least 1); on
    a GPU worker, 1."""
    max_batch_items: int = Field(default=1024, ge=1)
    """Most texts one ``encode`` call accepts; more is an input error, not a silent split."""
    # Small micro-batches win on CPU: on the 2-core development machine, 8-16 texts with a
    # 2048-4096 token budget ran all-MiniLM-L6-v2 about 1.35x faster than 64 / 16384 (less
    # padding, and activations that stay in cache). See bench/README.md. GPUs want larger ones.
    in_flight: int | None = Field(default=None, ge=1)
    """Batches one worker process holds at once. 1: Celery's prefork pool, one batch at a time
    per process (a CPU worker: the engine already uses every core). More: the threads pool with
    that many threads in one process, feeding one engine through overlapping stages
    (``tasks.feeder``: claim and run one group while the last one is written) and coalescing
    the batches waiting into one engine call. Default: 16 on a worker with one GPU
    (``EMBEDQ_GPU_DEVICES=0``), else 1 (a worker with several GPUs runs a process per device)."""
    coalesce_texts: int = Field(default=1024, ge=1)
    """Most texts the feeder puts in one engine call (with ``in_flight`` > 1)."""
    coalesce_wait_ms: float = Field(default=2.0, ge=0)
    """How long the feeder lets a lone batch wait for others to share its engine call."""
    micro_batch_size: int = Field(default=16, ge=1)
    """Most texts in one session run."""
    micro_batch_tokens: int = Field(default=4096, ge=1)
    """Most padded tokens (rows x longest row) in one session run."""

    @field_validator("providers", "gpu_devices", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def fallback_policy(self) -> FallbackPolicy:
        """``provider_fallback``, or its default: a GPU worker must not quietly run on the CPU."""
        if self.provider_fallback is not None:
            return self.provider_fallback
        return "error" if self.gpu_devices else "warn"

    def download_queue(self) -> str:
        """This host's queue of model downloads, consumed by every worker on the host."""
        return f"download.{self.host_name}"

    def batch_size_for(self, queue: str) -> int:
        """Texts per message on ``queue``: ``bulk_batch_size`` on the bulk queue (when set)."""
        if queue == "bulk" and self.bulk_batch_size is not None:
            return self.bulk_batch_size
        return self.job_batch_size

    def batches_in_flight(self) -> int:
        """``in_flight``, or its default: 16 on a worker with one GPU, else 1."""
        if self.in_flight is not None:
            return self.in_flight
        return 16 if len(self.gpu_devices) == 1 else 1

    def worker_processes(self) -> int:
        """Pool processes for a worker on this machine: one per GPU, else ``processes``."""
        return len(self.gpu_devices) or self.processes

    @property
    def local_mode(self) -> bool:
        """No broker configured: jobs run in the submitting process (the embedded default),
        not on a fleet of workers."""
        return self.broker_url is None

    def celery_broker(self) -> str:
        """The broker URL workers connect to: the setting, else Redis on localhost."""
        return self.broker_url or "redis://127.0.0.1:6379/0"

    def visibility(self) -> int:
        """Seconds Redis waits before redelivering an unacknowledged message: above the longest
        task's hard limit (embedding or model download), so a running task is never handed out
        twice."""
        longest = max(self.task_time_limit, self.download_time_limit)
        return self.visibility_timeout or longest * 2 + 60

    def threads(self) -> int:
        """The intra-op thread count to use: explicit, or this process's share of the cores."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        if self.gpu_devices:
            return 1  # the GPU does the work; a CPU thread feeds it
        return max(1, (os.cpu_count() or 1) // self.processes)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
