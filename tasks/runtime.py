"""What running a batch needs from its process: the settings, the store, the engines and the
process's name in the fleet's records. ``Runtime.of(settings)`` is this process's (a worker's,
or local mode's); tests build one of their own with a fake engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from sqlalchemy.orm import Session, sessionmaker

from storage.session import sessions_for
from worker import lifecycle
from worker.engine import Embedder
from worker.settings import Settings


@dataclass(frozen=True)
class Runtime:
    """What running a batch needs from its process."""

    settings: Settings
    sessions: sessionmaker[Session]
    engines: Callable[[str], Embedder]
    """The engine for a model name; raises ``ModelNotFoundError`` when this host lacks it."""
    worker: str
    """This process in the fleet's records (``host:pid``)."""
    local: bool = False
    """Local mode: a missing model is prepared in this process, not by a download task."""

    @classmethod
    def of(cls, settings: Settings, *, local: bool = False) -> Runtime:
        """This process's runtime under ``settings``: its store and its engines, kept per
        process (``worker.lifecycle``)."""
        return cls(
            settings,
            sessions_for(settings.database_url),
            partial(lifecycle.get_engine, settings=settings),
            lifecycle.process_name(settings),
            local,
        )
