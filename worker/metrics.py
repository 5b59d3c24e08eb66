"""Prometheus metrics for workers, correct under the prefork pool.

With ``EMBEDQ_METRICS_PORT`` set, the worker's parent (Celery's ``worker_init``) points
prometheus_client's multiprocess mode at a fresh folder (``PROMETHEUS_MULTIPROC_DIR``) before the
pool forks, and serves ``/metrics`` on that port from a registry that sums what every pool process
wrote there, plus two figures read at scrape time: the broker's queue depths (Flower has no
queue-length metric) and each pool process's engine busy ratio over the last minute, from the
store. Pool processes create their metrics lazily, after the fork; a process that exits is
marked dead so its live gauges disappear. Without the setting every call here does nothing.

Scrape target: ``http://<worker host>:<EMBEDQ_METRICS_PORT>/metrics``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from storage import session
from worker.settings import get_settings

logger = logging.getLogger(__name__)

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def enabled() -> bool:
    return bool(get_settings().metrics_port and os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@lru_cache(maxsize=1)
def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    labels = ("model", "provider", "precision")
    return {
        "texts": Counter("embedq_texts", "Texts embedded", labels),
        "tokens": Counter("embedq_tokens", "Real tokens embedded", labels),
        "padded": Counter("embedq_padded_tokens", "Tokens run, padding included", labels),
        "batches": Counter("embedq_batches", "Batches embedded", labels),
        "encoded": Counter(
            "embedq_encoded_texts",
            "Texts the model ran on, stored or not: above embedq_texts when work was done again",
            ("model",),
        ),
        "errors": Counter("embedq_errors", "Items failed, by kind", ("model", "kind")),
        "stage": Histogram(
            "embedq_batch_seconds", "Batch time by stage", ("model", "stage"), buckets=_BUCKETS
        ),
        "queue_wait": Histogram(
            "embedq_queue_wait_seconds", "From enqueue to start", ("model",), buckets=_BUCKETS
        ),
        "load": Gauge(
            "embedq_model_load_seconds",
            "Time to load a model into a pool process",
            ("model", "provider"),
            multiprocess_mode="liveall",
        ),
        "write_retries": Counter(
            "embedq_write_retries",
            "Batches whose write the store refused for a reason that may pass (a full disk, a"
            " lock, a dropped connection), written again in place with their vectors kept",
        ),
        "reconciled": Counter(
            "embedq_reconciled_batches",
            "Batches the fleet ended or re-sent for a worker: re-published after their message"
            " was lost, failed after too many losses, or failed after their process died",
            ("action",),
        ),
        "engine": Gauge(
            "embedq_engine_info",
            "1 per pool process and loaded model, labelled with the active provider and the"
            " precision that really runs",
            ("model", "provider", "precision", "device"),
            multiprocess_mode="liveall",
        ),
    }


def observe_batch(model: str, provider: str, stats: Any, write_ms: float, wait_ms: float) -> None:
    """Record one embedded batch (``stats`` is the engine's ``EncodeStats``)."""
    if not enabled():
        return
    m = _metrics()
    labels = (model, provider, stats.precision)
    m["texts"].labels(*labels).inc(stats.texts)
    m["tokens"].labels(*labels).inc(stats.tokens)
    m["padded"].labels(*labels).inc(stats.padded_tokens)
    m["batches"].labels(*labels).inc()
    seconds = {
        "tokenize": stats.tokenize_ms,
        "inference": stats.inference_ms,
        "pool": stats.pool_ms,
        "write": write_ms,
        "total": stats.total_ms + write_ms,
    }
    for stage, ms in seconds.items():
        m["stage"].labels(model, stage).observe(ms / 1000)
    m["queue_wait"].labels(model).observe(wait_ms / 1000)


def observe_failure(model: str, kind: str, items: int) -> None:
    if enabled() and items:
        _metrics()["errors"].labels(model, kind).inc(items)


def observe_encoded(model: str, texts: int) -> None:
    if enabled() and texts:
        _metrics()["encoded"].labels(model).inc(texts)


def observe_write_retry(batches: int) -> None:
    if enabled() and batches:
        _metrics()["write_retries"].inc(batches)


def observe_reconciled(action: str, batches: int) -> None:
    """Count batches the reconciler re-published or failed, or lost with their process."""
    if enabled() and batches:
        _metrics()["reconciled"].labels(action).inc(batches)


def observe_load(
    model: str, provider: str, device: int | None, seconds: float, precision: str = "fp32"
) -> None:
    if enabled():
        m = _metrics()
        m["load"].labels(model, provider).set(seconds)
        device_label = "-" if device is None else str(device)
        m["engine"].labels(model, provider, precision, device_label).set(1)


Depths = Callable[[list[str]], dict[str, int]]
"""Ready messages per queue name, read from the broker (``worker.app.queue_depths``)."""


class QueueDepths:
    """A collector: messages waiting in each embedq queue, read from the broker per scrape."""

    def __init__(self, depths: Depths) -> None:
        self.depths = depths

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "embedq_queue_messages", "Messages waiting in the queue", labels=["queue"]
        )
        queues = ["interactive", "bulk", get_settings().download_queue()]
        try:
            for queue, depth in self.depths(queues).items():
                family.add_metric([queue], depth)
        except Exception:  # the broker is down: the scrape still answers
            logger.warning("could not read queue depths for /metrics", exc_info=True)
        yield family


class EngineBusyRatio:
    """A collector: ``embedq_engine_busy_ratio`` of each pool process of this machine, the share
    of the last minute its engine was busy (``storage.batch_stats.engine_busy``: the same
    figure ``embedq health`` and ``embedq stats`` show), read from the store per scrape. A
    process that ran no batch in the minute is not listed; an idle worker shows no series."""

    def __init__(self, host: str) -> None:
        self.host = host
        """This machine in the fleet's records (``worker.lifecycle.machine_host``)."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from storage import batch_stats

        family = GaugeMetricFamily(
            "embedq_engine_busy_ratio",
            "Share of the last minute the pool process's engine was busy (encode), not waiting"
            " on SQL, the broker or Celery",
            labels=["pid"],
        )
        settings = get_settings()
        try:
            with session.scope(session.sessions_for(settings.database_url)) as store:
                busy = batch_stats.engine_busy(store, datetime.now(UTC), host=self.host)
            for process in busy:
                family.add_metric([str(process.pid)], process.ratio)
        except Exception:  # the store is down: the scrape still answers
            logger.warning("could not read the engine busy ratio for /metrics", exc_info=True)
        yield family


def serve(depths: Depths, host: Callable[[], str], **_: Any) -> None:
    """``worker_init``: serve ``/metrics`` from the worker's parent when configured; ``depths``
    reads the queues' lengths for each scrape, ``host`` names this machine in the store."""
    settings = get_settings()
    if not settings.metrics_port:
        return
    folder = tempfile.mkdtemp(prefix="embedq-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    # prometheus_client picks its value storage when first imported, which in a Celery worker
    # happens before this signal: pick again now that the folder is set, before the pool forks.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(QueueDepths(depths))
    registry.register(EngineBusyRatio(host()))
    start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    logger.info(
        "metrics on http://%s:%d/metrics (multiprocess files in %s)",
        settings.metrics_address,
        settings.metrics_port,
        folder,
    )
    import atexit

    atexit.register(shutil.rmtree, folder, True)


def process_gone(**_: Any) -> None:
    """``worker_process_shutdown``: drop an exiting pool process's live gauges."""
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
