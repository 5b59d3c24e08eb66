"""Fleet health: which workers answer, what they consume and serve, and whether work is piling
up where nobody listens.

Workers are asked over the broker (Celery's remote control: ``ping``, ``active_queues`` and
embedq's own ``embedq_config``); queue depths are read from the broker; models and the provider
each host last ran on come from the store. ``unserved`` lists queues that hold messages while no
answering worker consumes them, and ``overdue`` counts batches in the ledger with no progress for
``EMBEDQ_STUCK_AFTER`` seconds: ``embedq health`` exits non-zero while either is not empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from storage import batch_stats, model_catalog, stalled
from storage.session import scope, sessions_for
from tasks import names
from worker.app import queue_depths
from worker.settings import Settings

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class WorkerHealth:
    """One worker that answered: what it consumes, serves and last ran on."""

    name: str
    queues: list[str]
    models: list[str]
    default_model: str | None
    gpu_devices: list[int]
    last_provider: str | None
    fell_back_from_gpu: bool
    engine_busy_ratio: float | None = None
    """The share of the last minute its pool processes' engines were busy
    (``storage.batch_stats.engine_busy``), over the processes that ran a batch in it; ``None``
    when none did."""


@dataclass(frozen=True)
class FleetHealth:
    """What ``embedq health`` reports; ``ok`` is false while work piles up unserved or late."""

    workers: list[WorkerHealth]
    queues: dict[str, int]
    """Messages waiting per queue."""
    unserved: list[str]
    """Queues holding messages that no answering worker consumes."""
    overdue_batches: int
    stuck_after_s: float

    @property
    def ok(self) -> bool:
        return not self.unserved and not self.overdue_batches

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def check(app: Celery, settings: Settings, timeout: float) -> FleetHealth:
    """Ask the workers that answer within ``timeout`` seconds on the broker ``settings`` name,
    that broker and the store; batches with no progress for ``EMBEDQ_STUCK_AFTER`` seconds are
    overdue."""
    broker, stuck_after = settings.celery_broker(), settings.stuck_after
    active: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    with app.connection_for_read(broker) as connection:
        # A broker that refuses us (down, a wrong password) is said at once: kombu would retry
        # each broadcast's connection for seconds, and no retry mends a wrong password.
        connection.ensure_connection(max_retries=1, interval_start=0.2)
        # The ping waits the whole timeout (who will answer is unknown); the two questions after
        # it end as soon as every worker that answered it has answered them.
        answered = app.control.inspect(timeout=timeout, connection=connection).ping() or {}
        if answered:
            ask = app.control.inspect(timeout=timeout, connection=connection, limit=len(answered))
            active = ask.active_queues() or {}
            configs = ask._request("embedq_config") or {}
    consumed = {queue["name"] for queues in active.values() for queue in queues}
    queues = [str(q) for q in names.Queue] + sorted(
        q for q in consumed if q.startswith("download.")
    )
    depths = queue_depths(app, queues, broker)
    workers = []
    with scope(sessions_for(settings.database_url)) as session:
        overdue = stalled.count_overdue(session, stuck_after)
        for node in sorted(answered):
            config = configs.get(node, {})
            host = config.get("host_name") or node.split("@", 1)[-1]
            models = model_catalog.list_ready_models(session, host)
            provider = batch_stats.last_provider(session, host)
            busy = batch_stats.engine_busy(session, datetime.now(UTC), host=host)
            span = sum(process.span_s for process in busy)
            gpu = bool(config.get("gpu_devices"))
            workers.append(
                WorkerHealth(
                    name=node,
                    queues=sorted(q["name"] for q in active.get(node, [])),
                    models=sorted(models),
                    default_model=config.get("default_model"),
                    gpu_devices=config.get("gpu_devices", []),
                    last_provider=provider,
                    fell_back_from_gpu=bool(gpu and provider and provider not in GPU_PROVIDERS),
                    engine_busy_ratio=(sum(p.busy_s for p in busy) / span if span else None),
                )
            )
    unserved = [queue for queue, depth in depths.items() if depth and queue not in consumed]
    return FleetHealth(workers, depths, unserved, overdue, stuck_after)


def render(result: FleetHealth) -> str:
    lines = []
    for worker in result.workers:
        fallback = "  FELL BACK FROM GPU" if worker.fell_back_from_gpu else ""
        lines.append(
            f"worker {worker.name}: queues {','.join(worker.queues)}; models"
            f" {','.join(worker.models) or '-'}; last provider"
            f" {worker.last_provider or '-'}{fallback}; engine busy"
            f" {_share(worker.engine_busy_ratio)} of the last {batch_stats.BUSY_WINDOW_S:g}s"
        )
    if not result.workers:
        lines.append("no worker answered")
    for queue, depth in result.queues.items():
        flag = "  NO WORKER CONSUMES IT" if queue in result.unserved else ""
        lines.append(f"queue {queue}: {depth} messages{flag}")
    if result.overdue_batches:
        lines.append(
            f"OVERDUE: {result.overdue_batches} batches with no progress for over"
            f" {result.stuck_after_s:g}s (see `embedq job ID`; workers re-send lost ones)"
        )
    return "\n".join(lines)


def _share(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"
