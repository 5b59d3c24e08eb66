"""The ``download`` task: prepare a model on this host from the fleet's catalog. A thin shell
over ``tasks.preparation``, which also holds what a batch does when its host lacks its model."""

from __future__ import annotations

import logging

from celery import Task

from tasks import failures, names, preparation
from worker import lifecycle
from worker.app import app
from worker.errors import EmbedqError
from worker.settings import get_settings

logger = logging.getLogger(__name__)


class DownloadTask(Task):  # type: ignore[misc]
    """The task class: its time limits come from the settings when the worker builds its
    request type at start, not when this module is imported."""

    _limits: tuple[float | None, float | None] | None = None  # set by a `time_limit` command

    @property
    def time_limit(self) -> float | None:
        return self._limits[0] if self._limits else get_settings().download_time_limit

    @time_limit.setter
    def time_limit(self, value: float | None) -> None:
        self._limits = (value, self._limits[1] if self._limits else self.soft_time_limit)

    @property
    def soft_time_limit(self) -> float | None:
        if self._limits:
            return self._limits[1]
        return max(1, get_settings().download_time_limit - 30)

    @soft_time_limit.setter
    def soft_time_limit(self, value: float | None) -> None:
        self._limits = (self._limits[0] if self._limits else self.time_limit, value)


@app.task(name=names.DOWNLOAD, base=DownloadTask, bind=True, ignore_result=True, max_retries=3)  # type: ignore[untyped-decorator]
def download(self: DownloadTask, name: str) -> dict[str, str | int]:
    """Prepare model ``name`` on this host from the catalog. Every way out records the host's
    state: ready; failed at once with the reason (a permanent error, or an unexpected one);
    or, for a transient error, retried with backoff and then recorded failed."""
    settings = get_settings()
    host, sessions = settings.host_name, lifecycle.get_sessions()
    try:
        manifest = preparation.prepare_here(name, sessions, settings)
    except Exception as exc:
        if failures.is_transient(exc):
            if self.request.retries < self.max_retries:
                raise self.retry(exc=exc, countdown=10 * 2**self.request.retries) from exc
            reason = f"gave up after {self.max_retries + 1} tries: {exc}"
            try:
                preparation.record_failed(name, reason, sessions, settings)
            except Exception as record_exc:
                if not failures.is_transient(record_exc):
                    raise
                # The store is still down: the row stays preparing until it expires.
                logger.exception("could not record model %s as failed on %s", name, host)
            return {"model": name, "host": host, "failed": reason}
        if isinstance(exc, EmbedqError):  # recorded by prepare_here; the worker goes on
            return {"model": name, "host": host, "failed": str(exc)}
        # Raised around the pull, where prepare_here records nothing.
        logger.exception("download of model %s failed on %s", name, host)
        reason = f"preparing it failed unexpectedly: {type(exc).__name__}: {exc}"
        preparation.record_failed(name, reason, sessions, settings)
        return {"model": name, "host": host, "failed": reason}
    return {"model": name, "host": host, "dim": manifest.dim}
