"""Models on worker hosts: what an ``embed`` batch does when its host lacks the model it names,
and preparing a model on this host from the fleet's catalog (the ``download`` task's work).

The fleet's catalog (``model_sources``, written by ``embedq models register``) says where each
model comes from; the ``models`` table says what each host has prepared. A batch whose model is
missing on its host asks for it (``request``): it records the host as preparing, sends one
``download`` to that host's queue (``download.<host>``, which every worker there consumes) and
is re-enqueued with a countdown, so no worker slot waits for the download. The download goes
through the model store, whose file lock keeps two workers on a host from preparing a model at
once; it records the host ready, or failed with the reason, and a batch that finds its host
failed fails its items with that reason.

``worker.model_store`` is imported where it is used: it loads onnxruntime.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from storage import leases, model_catalog
from storage.models import ModelState
from storage.session import dispose_all, scope, sessions_for
from tasks import failures, model_options, names
from worker.app import app
from worker.errors import EmbedqError, ModelError, ModelNotFoundError, TransientError
from worker.manifest import Manifest
from worker.settings import Settings

logger = logging.getLogger(__name__)
PREPARING = "preparing:"
"""Prefix of the leases that say a model is being prepared on a host (``preparing``)."""


class ModelPendingError(TransientError):
    """The batch's model is being prepared on this host; try the batch again later."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(f"model {name!r} is being prepared on {host}")
        self.name = name


def preparing(name: str, host: str) -> str:
    """The lease that says model ``name`` is being prepared on ``host``: taken when a batch
    asks for the download, renewed by the worker that runs it, left to expire when that
    worker dies, after which the next batch that needs the model asks again."""
    return PREPARING + hashlib.sha256(f"{host}:{name}".encode()).hexdigest()[:40]  # 50 chars


@contextmanager
def _renewing(
    lease: str, holder: str, sessions: sessionmaker[Session], ttl_s: float
) -> Iterator[None]:
    """Renew ``lease`` every third of ``ttl_s`` while the block runs (in a thread: the block
    is a download or an export that holds this one), and give it up at the end."""
    stop = threading.Event()

    def renew() -> None:
        while True:
            try:
                with scope(sessions) as session:
                    leases.take_lease(session, lease, holder, ttl_s)
            except Exception:  # the store away: the download goes on, the lease may lapse
                logger.warning("could not renew lease %s", lease, exc_info=True)
            if stop.wait(ttl_s / 3):
                return

    renewer = threading.Thread(target=renew, name=f"renew {lease}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            with scope(sessions) as session:
                leases.release_lease(session, lease, holder)
        except Exception:  # it expires on its own
            logger.warning("could not release lease %s", lease, exc_info=True)


def record_ready(session: Session, manifest: Manifest, host: str) -> None:
    model_catalog.set_prepared(
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
    from worker.model_store import ModelStore  # loads onnxruntime

    host = settings.host_name
    with scope(sessions) as session:
        entry = model_catalog.get_source(session, name)
        if entry is None:
            raise _unregistered(name, host)
        source, options = entry.source, dict(entry.options)
        model_catalog.set_prepared(session, name, host, ModelState.PREPARING, source=source)
    started = time.perf_counter()
    try:
        with _renewing(preparing(name, host), host, sessions, settings.download_lease):
            manifest = ModelStore(settings.model_dir).pull(
                source, name, model_options.pull_options(options), settings, replace=False
            )
    except Exception as exc:  # every way out but a transient one is a recorded failure
        if failures.is_transient(exc) and not isinstance(exc, SoftTimeLimitExceeded):
            raise  # a source or the store out of reach: the download task tries again
        if isinstance(exc, SoftTimeLimitExceeded):  # final for a download: too big or slow
            reason = f"not prepared within download_time_limit ({settings.download_time_limit}s)"
        elif isinstance(exc, EmbedqError):
            reason = str(exc)
        else:
            reason = f"preparing it failed unexpectedly: {type(exc).__name__}: {exc}"
        logger.warning(
            "model %s failed on %s: %s", name, host, reason, extra={"model": name, "host": host}
        )
        with scope(sessions) as session:
            model_catalog.set_prepared(
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


def record_failed(
    name: str, reason: str, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """Record that this host cannot prepare model ``name``, and why."""
    with scope(sessions) as session:
        model_catalog.set_prepared(
            session, name, settings.host_name, ModelState.FAILED, error=reason
        )


def request(name: str, sessions: sessionmaker[Session], settings: Settings) -> None:
    """Called by a batch whose model this host lacks: make sure a download is on its way and
    raise ``ModelPendingError``; or raise a ``ModelError`` that says why it never will be."""
    host = settings.host_name
    with scope(sessions) as session:
        row = model_catalog.get_prepared(session, name, host)
        if row is not None and row.state == ModelState.FAILED:
            raise ModelError(f"model {name!r} could not be prepared on {host}: {row.error}")
        if model_catalog.get_source(session, name) is None:
            raise _unregistered(name, host)
        lease = preparing(name, host)
        in_progress = (
            row is not None and row.state == ModelState.PREPARING and leases.held(session, lease)
        )
        if not in_progress:  # never asked, lost (its worker died), or deleted since
            model_catalog.set_prepared(session, name, host, ModelState.PREPARING)
            # Held for a lease's time by the request; the download renews it while it runs.
            leases.take_lease(session, lease, host, settings.download_lease)
    if not in_progress:
        with app.connection_for_write(settings.celery_broker()) as connection:
            app.send_task(
                names.DOWNLOAD, args=[name], queue=settings.download_queue(), connection=connection
            )
        logger.info("model %s missing on %s: download requested", name, host)
    raise ModelPendingError(name, host)


def report_models(settings: Settings) -> None:
    """Record this host's prepared models when a worker starts, so the ``models`` table shows
    what each host can serve without waiting for a batch (``tasks.fleet.step``)."""
    from worker.model_store import ModelStore  # loads onnxruntime

    try:
        manifests = ModelStore(settings.model_dir).list()
        with scope(sessions_for(settings.database_url)) as session:
            for manifest in manifests:
                record_ready(session, manifest, settings.host_name)
    except Exception:  # the store may be down at start; batches will say why later
        logger.exception("could not record this host's models in the store")
    finally:
        dispose_all()  # the parent keeps no connections for its children to inherit
