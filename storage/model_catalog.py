"""The fleet's model catalog (where each model comes from) and what each worker host has
prepared (ready, preparing, or failed with the reason).

Functions take the session first and never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage import dialect
from storage.models import ModelSource, ModelState, PreparedModel


def register_source(session: Session, name: str, source: str, options: dict[str, Any]) -> None:
    """Record where the fleet gets model ``name``, and forget earlier failures to prepare it so
    hosts try again with the new source."""
    insert: Any = dialect.upsert(session, ModelSource).values(
        name=name, source=source, options=options
    )
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"source": source, "options": options, "registered_at": datetime.now(UTC)},
        )
    )
    session.execute(
        delete(PreparedModel).where(
            PreparedModel.name == name, PreparedModel.state == ModelState.FAILED
        )
    )


def get_source(session: Session, name: str) -> ModelSource | None:
    return session.get(ModelSource, name)


def list_sources(session: Session) -> Sequence[ModelSource]:
    """The models registered for the fleet to prepare on demand, by name."""
    return session.scalars(select(ModelSource).order_by(ModelSource.name)).all()


def get_prepared(session: Session, name: str, host: str) -> PreparedModel | None:
    """What ``host`` has recorded about model ``name``: preparing, ready or failed."""
    return session.scalars(
        select(PreparedModel).where(PreparedModel.name == name, PreparedModel.host == host)
    ).first()


def set_prepared(session: Session, name: str, host: str, state: ModelState, **fields: Any) -> None:
    """Record ``host``'s state for model ``name`` (one row per pair, replaced each time)."""
    values = {"name": name, "host": host, "state": state, **fields}
    values.setdefault("error", None)
    insert: Any = dialect.upsert(session, PreparedModel).values(**values)
    update_ = {k: insert.excluded[k] for k in values if k not in ("name", "host")}
    update_["updated_at"] = datetime.now(UTC)
    session.execute(insert.on_conflict_do_update(index_elements=["name", "host"], set_=update_))


def list_prepared(session: Session) -> Sequence[PreparedModel]:
    return session.scalars(
        select(PreparedModel).order_by(PreparedModel.name, PreparedModel.host)
    ).all()


def list_ready_models(session: Session, host: str) -> list[str]:
    """The models ``host`` has prepared and can run, by name."""
    return list(
        session.scalars(
            select(PreparedModel.name).where(
                PreparedModel.host == host, PreparedModel.state == ModelState.READY
            )
        )
    )


def ready_files(session: Session, name: str) -> set[str]:
    """The sha256 of each ONNX file the hosts that have model ``name`` ready run (one when the
    fleet agrees)."""
    return {
        str(sha)
        for sha in session.scalars(
            select(PreparedModel.onnx_sha256).where(
                PreparedModel.name == name,
                PreparedModel.state == ModelState.READY,
                PreparedModel.onnx_sha256.is_not(None),
            )
        )
    }
