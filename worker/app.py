"""The Celery app. ``celery -A worker worker`` finds it; task modules are listed by name so the
app never imports them (and so never imports onnxruntime in a producer).

Reliability settings, each for a reason (see ../shared/notes/celery-fleet.md):
- JSON only: pickle from a broker is code execution.
- Late acks with prefetch 1: a batch is acknowledged after it is stored, and a worker holds no
  more than the one it runs, so a crash loses nothing and a slow worker hoards nothing. A
  worker that holds several batches at once (``EMBEDQ_IN_FLIGHT``, the default with one GPU)
  runs the threads pool with that many threads, one message each, feeding one engine
  (``tasks.feeder``); each message is still acknowledged only after its batch is stored.
- The Redis visibility timeout is above the hard time limit, or a long batch would be delivered
  to a second worker while the first still runs it.
- ``queue_order_strategy=priority``: a worker consuming ``interactive,bulk`` drains interactive
  first, so application requests are served ahead of backfills.
- Results are ignored: vectors and progress go to the SQL store, never the result backend.
- Every worker also consumes its host's download queue (``download.<EMBEDQ_HOST_NAME>``), added
  when it starts whatever ``-Q`` says, so a batch can ask its own host to prepare a model.

Wiring: ``connect_signals`` connects every worker-side signal handler in one place, when a
worker starts (``celeryd_init``), never in a producer that imports this app to send by name;
the fleet's own duties (the reconciler, recording batches a pool process died on, reporting
this host's models) run as a worker bootstep named here like the task modules, by name.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from celery.worker.control import inspect_command
from kombu.entity import Exchange, Queue

from worker import lifecycle, logs, metrics
from worker.settings import Settings, get_settings


def config(settings: Settings) -> dict[str, Any]:
    """The app's configuration from the settings; Celery reads it when it first needs its
    configuration (a send, a worker start), not when this module is imported."""
    in_flight = settings.batches_in_flight()
    pool = dict(worker_pool="threads", worker_concurrency=in_flight) if in_flight > 1 else {}
    return dict(
        **pool,
        broker_url=settings.celery_broker(),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(1, int(settings.task_time_limit * 0.9)),
        # A batch whose child process died (OOM, segfault, kill -9) is re-sent like a retry, so
        # max_retries bounds it: a batch that keeps killing its worker ends failed, not in a loop.
        # Reject-on-lost is only the fallback when sending that retry fails.
        task_retry_on_worker_lost=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility(),
            "unacked_restore_interval": settings.unacked_restore_interval,
            "unacked_restore_throttle": 1,  # sweep on every interval, not every 10th
            "socket_timeout": 30,
            "socket_keepalive": True,
            "health_check_interval": 25,
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        # Redis answering an error instead of closing (OutOfMemoryError at maxmemory, a READONLY
        # replica) is a "channel error": without this the worker exited ("Unrecoverable
        # error") and stayed down; with it, it reconnects with backoff like after a lost
        # connection, and the batch Redis could not keep is re-sent from the ledger.
        broker_channel_error_retry=True,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
            for name in ("interactive", "bulk")
        ],
        task_default_queue="interactive",
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        # Loading a model (and a CUDA context) in each child takes longer than the 4 s default.
        worker_proc_alive_timeout=120,
    )


app = Celery("embedq", include=["tasks.embed", "tasks.download"])
app.add_defaults(lambda: config(get_settings()))


def _consume_host_download_queue(sender: str, instance: Any, **_: Any) -> None:
    instance.app.amqp.queues.select_add(get_settings().download_queue())


def connect_signals(**_: Any) -> None:
    """Connect the worker's signal handlers: warm engines in each pool process and close them
    at exit, JSON logs, Prometheus metrics, and this host's download queue."""
    after_setup_logger.connect(logs.on_setup, weak=False)
    after_setup_task_logger.connect(logs.on_setup, weak=False)
    celeryd_after_setup.connect(_consume_host_download_queue, weak=False)
    worker_init.connect(
        partial(metrics.serve, depths=partial(queue_depths, app), host=lifecycle.machine_host),
        weak=False,
    )
    if get_settings().batches_in_flight() > 1:  # threads: the worker's own process runs tasks
        worker_init.connect(lifecycle.warm, weak=False)
        worker_shutdown.connect(lifecycle.close, weak=False)
    else:
        worker_process_init.connect(lifecycle.warm, weak=False)
        worker_process_shutdown.connect(lifecycle.close, weak=False)
        worker_process_shutdown.connect(metrics.process_gone, weak=False)


celeryd_init.connect(connect_signals, weak=False)
app.steps["worker"].add("tasks.fleet.step:FleetStep")


def embedq_config(state: Any, **_: Any) -> dict[str, Any]:
    """Remote control (``inspect``): the settings ``embedq health`` compares with what ran."""
    current = get_settings()
    return {
        "host_name": current.host_name,
        "gpu_devices": current.gpu_devices,
        "providers": current.providers,
        "default_model": current.default_model,
    }


inspect_command()(embedq_config)


def queue_depths(app: Celery, queues: list[str], url: str | None = None) -> dict[str, int]:
    """Ready messages per queue on the broker at ``url`` (default: the app's), by kombu's
    passive declare, which counts Redis priority sub-lists too."""
    depths: dict[str, int] = {}
    with app.connection_for_read(url) as connection:
        channel: Any = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue, passive=True).message_count)
            except Exception:  # a queue no one declared yet holds nothing
                depths[queue] = 0
    return depths
