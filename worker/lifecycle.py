"""What each worker process builds once and keeps: engines per model and a database engine.

Nothing here runs in the Celery parent: ONNX Runtime sessions, CUDA contexts and pooled
connections do not survive ``fork()``. Getters build lazily in the process that calls them
(keyed by its pid, so a forked child never reuses its parent's), and ``worker_process_init``
warms the default model so the first job is not slow.

On a GPU worker (``EMBEDQ_GPU_DEVICES=0,1``) the pool has one child per device and each child
binds its sessions to the device at its pool index; a child that replaces a dead one inherits
the freed index, so the devices stay covered one process each.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.utils.log import current_process_index
from sqlalchemy.orm import Session, sessionmaker

from storage import session
from worker import metrics
from worker.settings import Settings, get_settings

if TYPE_CHECKING:  # onnxruntime loads with the engine, in pool processes, not at import
    from worker.engine import Engine

logger = logging.getLogger(__name__)

_pid = 0
_engines: dict[tuple[Path, str], Engine] = {}
_loading = threading.Lock()  # the threads pool: one load per model, not one per thread


def machine_host(settings: Settings | None = None) -> str:
    """This machine in the fleet's records (batch timings, claims, leases): ``EMBEDQ_HOST_NAME``,
    followed by the machine's own name when that differs. Containers that share a host name (and
    a models volume) also share process ids, since each numbers its own from 1; their own names
    (the container ids) keep their records apart."""
    host = (settings or get_settings()).host_name
    machine = socket.gethostname()
    return host if machine == host else f"{host}/{machine}"


def process_name(settings: Settings | None = None) -> str:
    """This process in the fleet's records: ``machine_host():pid``."""
    return f"{machine_host(settings)}:{os.getpid()}"


def _own_process() -> None:
    global _pid
    if _pid != os.getpid():
        _pid = os.getpid()
        _engines.clear()


def device_for(settings: Settings, index: int | None) -> int | None:
    """The GPU a pool child at ``index`` binds to: the worker's devices, one per child."""
    if not settings.gpu_devices:
        return None
    return settings.gpu_devices[(index or 0) % len(settings.gpu_devices)]


def this_device() -> int | None:
    """This process's GPU (``None`` on a CPU worker)."""
    return device_for(get_settings(), current_process_index(base=0))


def get_engine(model: str, settings: Settings | None = None) -> Engine:
    """This process's engine for ``model`` in the model store ``settings`` name (default:
    ``get_settings()``), loaded on first use and kept."""
    _own_process()
    settings = settings or get_settings()
    key = (settings.model_dir, model)
    if key in _engines:
        return _engines[key]
    with _loading:
        return _load(key, model, settings)


def _load(key: tuple[Path, str], model: str, settings: Settings) -> Engine:
    # onnxruntime and tokenizers: loaded in a worker's pool process, never by a producer
    from worker.engine import Engine
    from worker.model_store import ModelStore

    if key not in _engines:
        store = ModelStore(settings.model_dir)
        store.get(model)  # ModelNotFoundError, with how to pull it, before anything loads
        started = time.perf_counter()
        engine = Engine.load(store.path(model), settings, this_device())
        seconds = time.perf_counter() - started
        metrics.observe_load(model, engine.provider, this_device(), seconds, str(engine.precision))
        _engines[key] = engine
    return _engines[key]


def get_sessions() -> sessionmaker[Session]:
    """This process's session factory on ``EMBEDQ_DATABASE_URL``."""
    return session.sessions_for(get_settings().database_url)


def warm(**_: Any) -> None:
    """``worker_process_init``: niceness, the GPU binding, and the default model loaded."""
    settings = get_settings()
    if settings.worker_nice:
        os.nice(settings.worker_nice)
    device = this_device()
    if device is not None:
        logger.info("pool process %d bound to GPU %d", current_process_index(base=0) or 0, device)
    model = settings.default_model
    if model:
        try:
            get_engine(model)
        except Exception:  # a missing model must not kill the child; jobs will say why
            logger.exception("could not load the default model %s at start", model)


def close(**_: Any) -> None:
    """``worker_process_shutdown``: close this process's database connections."""
    session.dispose_all()
