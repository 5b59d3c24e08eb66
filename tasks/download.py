"""Models on worker hosts: the ``download`` task, and what an ``embed`` batch does when its host
lacks the model it names.

The fleet's catalog (``model_sources``, written by ``embedq models register``) says where each
model comes from; the ``models`` table says what each host has prepared. A batch whose model is
missing on its host asks for it (``request``): it records the host as preparing, sends one
``download`` to that host's queue (``download.<host>``, which every worker there consumes) and
is re-enqueued with a countdown, so no worker slot waits for the download. The download goes
through the model store, whose file lock keeps two workers on a host from preparing a model at
once; it records the host ready, or failed with the reason, and a batch that finds its host
failed fails its items with that reason.

``worker.model_store`` is imported where it is used: it loads onnxruntime, and the producer
imports this module for ``check_options``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage import repository
from storage.models import ModelState, as_utc
from storage.session import dispose_all, scope
from tasks import names
from worker import lifecycle
from worker.app import app
from worker.errors import (
    EmbedqError,
    InputError,
    ModelError,
    ModelNotFoundError,
    TransientError,
)
from worker.manifest import Manifest, Pooling, Precision
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from worker.model_store import PullOptions

logger = logging.getLogger(__name__)


class ModelPendingError(TransientError):
    """The batch's model is being prepared on this host; try the batch again later."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(f"model {name!r} is being prepared on {host}")
        self.name = name


# Errors a later try may not meet: a source or the store that could not be reached. Not
# tasks.retry.is_transient: a download past its soft time limit is final (the model is too
# big or slow for the limit), and that predicate follows causes into the ModelError that
# prepare_here raises for it.
TRANSIENT = (TransientError, OperationalError, InterfaceError, ConnectionError, TimeoutError)

_OPTIONS = ("precision", "sha256", "max_seq_length", "pooling", "normalize")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Catalog options, checked: the names and values ``embedq models pull`` accepts."""
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise InputError(f"unknown model options {sorted(unknown)}; known: {list(_OPTIONS)}")
    try:
        if options.get("precision") is not None:
            Precision(options["precision"])
        if options.get("pooling") is not None:
            Pooling(options["pooling"])
    except ValueError as exc:
        raise InputError(f"bad model option: {exc}") from exc
    return {key: value for key, value in options.items() if value is not None}


def pull_options(options: dict[str, Any]) -> PullOptions:
    """Catalog options as the model store's ``PullOptions``."""
    from worker.model_store import PullOptions  # onnxruntime: not for a producer (see top)

    values = check_options(options)
    if "precision" in values:
        values["precision"] = Precision(values["precision"])
    if "pooling" in values:
        values["pooling"] = Pooling(values["pooling"])
    return PullOptions(**values)


def record_ready(session: Session, manifest: Manifest, host: str) -> None:
    repository.set_prepared(
        session,
        manifest.name,
        host,
        ModelState.READY,
        source=manifest.source,
        onnx_sha256=manifest.onnx_sha256,
        dim=manifest.dim,
        precision=str(manifest.precision),
        manifest=manifest.model_dump(mode="json"),
    )


def _unregistered(name: str, host: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} is not prepared on {host} and no source is registered for it: run"
        f" `embedq models register SOURCE --name {name}` to have workers prepare it, or"
        f" `embedq models pull SOURCE --name {name}` on each worker host"
    )


def prepare_here(name: str, sessions: sessionmaker[Session], settings: Settings) -> Manifest:
    """Prepare ``name`` on this host from its catalog entry and record the outcome.

    A model already prepared (by another worker that held the lock first) is kept. A permanent
    failure is recorded as the host's state with its reason and raised as a ``ModelError``
    (an unexpected exception, such as an ``OSError`` from a damaged file, is one too); a
    transient one (``SourceUnavailableError``) is raised for the caller to retry.
    """
    from worker.model_store import ModelStore  # onnxruntime: not for a producer (see top)

    host = settings.host_name
    with scope(sessions) as session:
        entry = repository.get_source(session, name)
        if entry is None:
            raise _unregistered(name, host)
        source, options = entry.source, dict(entry.options)
        repository.set_prepared(session, name, host, ModelState.PREPARING, source=source)
    started = time.perf_counter()
    try:
        manifest = ModelStore(settings.model_dir).pull(
            source, name, pull_options(options), settings, replace=False
        )
    except TRANSIENT:
        raise
    except Exception as exc:  # every other way out is a recorded failure, expected or not
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"not prepared within download_time_limit ({settings.download_time_limit}s)"
        elif isinstance(exc, EmbedqError):
            reason = str(exc)
        else:
            reason = f"preparing it failed unexpectedly: {type(exc).__name__}: {exc}"
        logger.warning(
            "model %s failed on %s: %s", name, host, reason, extra={"model": name, "host": host}
        )
        with scope(sessions) as session:
            repository.set_prepared(
                session, name, host, ModelState.FAILED, source=source, error=reason
            )
        if isinstance(exc, ModelError):
            raise
        raise ModelError(reason) from exc
    with scope(sessions) as session:
        record_ready(session, manifest, host)
    logger.info(
        "model %s ready on %s in %.1fs",
        name,
        host,
        time.perf_counter() - started,
        extra={"model": name, "host": host},
    )
    return manifest


def record_failed(name: str, reason: str) -> None:
    settings = get_settings()
    with scope(_sessions()) as session:
        repository.set_prepared(session, name, settings.host_name, ModelState.FAILED, error=reason)


def request(name: str, sessions: sessionmaker[Session], settings: Settings) -> None:
    """Called by a batch whose model this host lacks: make sure a download is on its way and
    raise ``ModelPendingError``; or raise a ``ModelError`` that says why it never will be."""
    host = settings.host_name
    with scope(sessions) as session:
        row = repository.get_prepared(session, name, host)
        if row is not None and row.state == ModelState.FAILED:
            raise ModelError(f"model {name!r} could not be prepared on {host}: {row.error}")
        if repository.get_source(session, name) is None:
            raise _unregistered(name, host)
        in_progress = (
            row is not None
            and row.state == ModelState.PREPARING
            and (datetime.now(UTC) - as_utc(row.updated_at)).total_seconds()
            < settings.download_time_limit + 60
        )
        if not in_progress:  # never asked, lost (its worker died), or deleted since
            repository.set_prepared(session, name, host, ModelState.PREPARING)
    if not in_progress:
        app.send_task(names.DOWNLOAD, args=[name], queue=settings.download_queue())
        logger.info("model %s missing on %s: download requested", name, host)
    raise ModelPendingError(name, host)


def _sessions() -> sessionmaker[Session]:
    return lifecycle.get_sessions()


class DownloadTask(Task):  # type: ignore[misc]
    """The task class: its time limits come from the settings when the worker builds its
    request type at start, not when this module is imported (a producer imports it too)."""

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
    host = settings.host_name
    try:
        manifest = prepare_here(name, _sessions(), settings)
    except TRANSIENT as exc:
        if self.request.retries < self.max_retries:
            raise self.retry(exc=exc, countdown=10 * 2**self.request.retries) from exc
        reason = f"gave up after {self.max_retries + 1} tries: {exc}"
        try:
            record_failed(name, reason)
        except TRANSIENT:  # the store is still down: the row stays preparing until it expires
            logger.exception("could not record model %s as failed on %s", name, host)
        return {"model": name, "host": host, "failed": reason}
    except EmbedqError as exc:  # recorded by prepare_here; the worker goes on
        return {"model": name, "host": host, "failed": str(exc)}
    except Exception as exc:  # raised around the pull, where prepare_here records nothing
        logger.exception("download of model %s failed on %s", name, host)
        reason = f"preparing it failed unexpectedly: {type(exc).__name__}: {exc}"
        record_failed(name, reason)
        return {"model": name, "host": host, "failed": reason}
    return {"model": name, "host": host, "dim": manifest.dim}


def report_models() -> None:
    """Record this host's prepared models when a worker starts, so the ``models`` table shows
    what each host can serve without waiting for a batch (``tasks.fleet``)."""
    from worker.model_store import ModelStore  # onnxruntime: not for a producer (see top)

    settings = get_settings()
    try:
        manifests = ModelStore(settings.model_dir).list()
        with scope(_sessions()) as session:
            for manifest in manifests:
                record_ready(session, manifest, settings.host_name)
    except Exception:  # the store may be down at start; batches will say why later
        logger.exception("could not record this host's models in the store")
    finally:
        dispose_all()  # the parent keeps no connections for its children to inherit
