"""What each worker process builds once and keeps: engines per model and a database engine.

Nothing here runs in the Celery parent: ONNX Runtime sessions and pooled connections do not
survive ``fork()``. Getters build lazily in the process that calls them (keyed by its pid, so a
forked child never reuses its parent's), and ``worker_process_init`` warms the default model so
the first job is not slow.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.orm import Session, sessionmaker

from storage import session
from worker.engine import Engine
from worker.model_store import ModelStore
from worker.settings import get_settings

logger = logging.getLogger(__name__)

_pid = 0
_engines: dict[str, Engine] = {}


def _own_process() -> None:
    global _pid
    if _pid != os.getpid():
        _pid = os.getpid()
        _engines.clear()


def get_engine(model: str) -> Engine:
    """This process's engine for ``model``, loaded on first use and kept."""
    _own_process()
    if model not in _engines:
        settings = get_settings()
        store = ModelStore(settings.model_dir)
        store.get(model)  # ModelNotFoundError, with how to pull it, before anything loads
        _engines[model] = Engine.load(store.path(model), settings)
    return _engines[model]


def get_sessions() -> sessionmaker[Session]:
    """This process's session factory on ``EMBEDQ_DATABASE_URL``."""
    return session.sessions_for(get_settings().database_url)


def _warm(**_: Any) -> None:
    model = get_settings().default_model
    if model:
        try:
            get_engine(model)
        except Exception:  # a missing model must not kill the child; jobs will say why
            logger.exception("could not load the default model %s at start", model)


def _close(**_: Any) -> None:
    session.dispose_all()


worker_process_init.connect(_warm, weak=False)
worker_process_shutdown.connect(_close, weak=False)
