"""``GET /v1/models``: the models the fleet can run, in OpenAI's list shape, with embedq's
fields (dimension, hosts that have it ready, registered source).

A model is known when a worker host has it ready or is preparing it, or when it is registered
for hosts to prepare on demand (``embedq models register``); its dimension is known once a host
has prepared it. ``/v1/embeddings`` asks the same catalog to refuse unknown models (404) and a
``dimensions`` the model does not produce (400).

That question is on every request's path, so each app keeps a ``ModelCache``: a model found in
the store is answered from memory for ``FRESH_S`` seconds, and a name not in memory is always
looked up in the store, so a model registered a moment ago is never refused. What a stale
answer can do is accept a model removed within those seconds; its job then fails on the worker
with the reason recorded, as a job naming it through the producer would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from storage import model_catalog
from storage.models import ModelState, as_utc
from storage.session import scope, sessions_for
from tasks.api.auth import require_key
from tasks.api.errors import ApiError
from worker.settings import Settings

router = APIRouter()


@dataclass
class ModelInfo:
    """What the store says about one model name."""

    name: str
    created: datetime
    dim: int | None = None
    ready_on: list[str] = field(default_factory=list)
    preparing_on: list[str] = field(default_factory=list)
    source: str | None = None


class ModelOut(BaseModel):
    """One model in OpenAI's shape (``id``, ``object``, ``created``, ``owned_by``), plus
    embedq's fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedq"
    dim: int | None
    """The vector dimension; ``None`` until a host has prepared the model."""
    ready_on: list[str]
    """Worker hosts that have the model prepared."""
    preparing_on: list[str]
    registered_source: str | None
    """Where hosts prepare it from on demand, when registered."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


def known_models(settings: Settings) -> dict[str, ModelInfo]:
    """Every model a job may name, by name: ready or preparing on a host, or registered."""
    found: dict[str, ModelInfo] = {}
    with scope(sessions_for(settings.database_url)) as session:
        for source in model_catalog.list_sources(session):
            found[source.name] = ModelInfo(
                source.name, as_utc(source.registered_at), source=source.source
            )
        for row in model_catalog.list_prepared(session):
            if row.state == ModelState.FAILED:
                continue
            info = found.setdefault(row.name, ModelInfo(row.name, as_utc(row.updated_at)))
            info.created = min(info.created, as_utc(row.updated_at))
            if row.state == ModelState.READY:
                info.ready_on.append(row.host)
                info.dim = info.dim or row.dim
            else:
                info.preparing_on.append(row.host)
    return found


FRESH_S = 5.0
"""How long a model found in the store is answered from memory."""


class ModelCache:
    """``find_model`` with the store's answer kept for ``fresh_s`` seconds (one per app; the
    request threads share it)."""

    def __init__(self, settings: Settings, fresh_s: float = FRESH_S) -> None:
        self.settings = settings
        self.fresh_s = fresh_s
        self._models: dict[str, ModelInfo] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def find(self, name: str) -> ModelInfo:
        """The model ``name``; raises ``ApiError`` 404 when the store does not know it."""
        with self._lock:
            models, read_at = self._models, self._read_at
        if name not in models or time.monotonic() - read_at > self.fresh_s:
            read_at = time.monotonic()
            models = known_models(self.settings)
            with self._lock:
                if read_at > self._read_at:
                    self._models, self._read_at = models, read_at
        return _found(models, name)


def find_model(settings: Settings, name: str) -> ModelInfo:
    """The model ``name`` as the store says now; raises ``ApiError`` 404 when no host has it
    and none may prepare it."""
    return _found(known_models(settings), name)


def _found(models: dict[str, ModelInfo], name: str) -> ModelInfo:
    info = models.get(name)
    if info is None:
        raise ApiError(
            404,
            f"the model {name!r} does not exist: no worker host has it and it is not registered"
            " (see GET /v1/models)",
            code="model_not_found",
            param="model",
        )
    return info


def _out(info: ModelInfo) -> ModelOut:
    return ModelOut(
        id=info.name,
        created=int(info.created.timestamp()),
        dim=info.dim,
        ready_on=sorted(info.ready_on),
        preparing_on=sorted(info.preparing_on),
        registered_source=info.source,
    )


@router.get("/v1/models", response_model=ModelList, tags=["models"])
def list_models(request: Request, _key: str = Depends(require_key)) -> ModelList:
    """The models workers have prepared or may prepare on demand."""
    models = known_models(request.app.state.settings)
    return ModelList(data=[_out(models[name]) for name in sorted(models)])


@router.get("/v1/models/{model}", response_model=ModelOut, tags=["models"])
def get_model(model: str, request: Request, _key: str = Depends(require_key)) -> ModelOut:
    """One model, or 404."""
    return _out(find_model(request.app.state.settings, model))
