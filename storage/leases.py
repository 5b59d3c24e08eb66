"""Named leases, each held by one process at a time until it expires: the reconciler's (one
sweep at a time across the fleet), an OpenAI batch's runner, each worker process's word that
it is alive (which tells the reconciler whose batches belong to a dead worker), and a model's
preparation on a host (renewed while a worker prepares it).

Functions take the session first and never commit.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from storage.models import Lease, as_utc


def take_lease(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Hold lease ``name`` for ``ttl_s`` seconds unless another holder's has not expired."""
    now = datetime.now(UTC)
    until = now + timedelta(seconds=ttl_s)
    taken = session.execute(
        update(Lease)
        .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at < now))
        .values(holder=holder, expires_at=until)
    )
    if getattr(taken, "rowcount", 0) == 1:
        return True
    if session.get(Lease, name) is not None:
        return False
    session.add(Lease(name=name, holder=holder, expires_at=until))
    session.flush()
    return True


def held(session: Session, name: str) -> bool:
    """Whether lease ``name`` is held by anyone and has not expired."""
    expires_at = session.scalar(select(Lease.expires_at).where(Lease.name == name))
    return expires_at is not None and as_utc(expires_at) >= datetime.now(UTC)


def release_lease(session: Session, name: str, holder: str) -> None:
    """Give lease ``name`` up, if ``holder`` holds it, so another process may take it now."""
    session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))


ALIVE = "alive:"
"""Prefix of the leases that say a worker process is alive (``tasks.fleet.step`` renews them)."""


def keep_alive(session: Session, process: str, ttl_s: float) -> None:
    """Say that worker process ``process`` (``host[/machine]:pid``) is alive for ``ttl_s``
    seconds. The lease's name is a digest (names are short); its holder is the process."""
    name = ALIVE + hashlib.sha256(process.encode()).hexdigest()[:40]
    take_lease(session, name, process, ttl_s)


def machines(
    session: Session, forget_after_s: float, now: datetime | None = None
) -> dict[str, bool]:
    """Every machine (``host[/machine]``) a worker process has said it lives on, and whether
    one still does at ``now`` (default: the present). Leases expired more than
    ``forget_after_s`` ago are deleted first."""
    now = now or datetime.now(UTC)
    session.execute(
        delete(Lease).where(
            Lease.name.startswith(ALIVE),
            Lease.expires_at < now - timedelta(seconds=forget_after_s),
        )
    )
    alive: dict[str, bool] = {}
    for holder, expires_at in session.execute(
        select(Lease.holder, Lease.expires_at).where(Lease.name.startswith(ALIVE))
    ):
        machine = holder.rsplit(":", 1)[0]
        alive[machine] = alive.get(machine, False) or as_utc(expires_at) >= now
    return alive
