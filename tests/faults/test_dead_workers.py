"""A worker killed outright: its claimed batches go to another worker within minutes, not after
Redis's visibility timeout. Real Redis (a private one), a real SQLite store, kombu's own
structures for unacknowledged messages; the worker's death is its alive lease lapsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from storage import leases, ledger
from storage.models import Batch, Job
from storage.session import dispose_all, scope, sessions_for
from tasks.fleet.broker import redis_presence, redis_release
from tasks.fleet.reconciler import Reconciler, alive_ttl
from tasks.message import task_id
from tests.fakes import RecordingPublisher
from tests.processes import PrivateRedis
from worker.settings import Settings

DEAD = "compose-host/deadbeef0001"
LIVE = "compose-host/a11ve0000002"
NEVER_SEEN = "old-host"


def unacked(broker: PrivateRedis, job: str, index: int, tag: str) -> None:
    """A message as kombu keeps one a worker took and has not acknowledged."""
    message = {"headers": {"id": task_id(job, index)}, "body": "", "properties": {}}
    client = broker.client()
    client.hset("unacked", tag, json.dumps([message, "", "bulk"]))
    client.zadd("unacked_index", {tag: 1.0})


def test_the_batches_a_dead_worker_claimed_are_published_again_and_taken_from_redis(
    broker: PrivateRedis, sqlite_url: str
) -> None:
    url = sqlite_url
    sessions = sessions_for(url)
    settings = Settings(database_url=url, broker_url=broker.url, sweep_interval=30)
    with scope(sessions) as session:
        session.add(Job(id="j", model_name="m", queue="bulk", total_items=3, meta={}))
        session.flush()
        texts = [ledger.NewBatch(i, [str(i)], [f"text {i}"], [i]) for i in range(3)]
        ledger.add_batches(session, "j", texts)
        for index, machine in enumerate([DEAD, LIVE, NEVER_SEEN]):
            assert ledger.claim(session, "j", index, f"{machine}:8").claimed
        leases.keep_alive(session, f"{DEAD}:1", ttl_s=-1)  # said so once; lapsed since
        leases.keep_alive(session, f"{LIVE}:1", ttl_s=300)
        # The claims are older than an alive lease lasts (their machine had time to renew).
        before = datetime.now(UTC) - timedelta(seconds=alive_ttl(settings) + 5)
        session.execute(update(Batch).values(updated_at=before))
    for index in range(3):
        unacked(broker, "j", index, tag=f"tag-{index}")
    publisher = RecordingPublisher()
    reconciler = Reconciler(
        settings,
        sessions,
        publisher,
        redis_presence(broker.url),
        holder="test",
        release=redis_release(broker.url),
    )

    report = reconciler.sweep()

    assert (report.orphaned, report.republished, report.failed) == (1, 1, 0)
    published = zip(publisher.sent, publisher.queues, strict=True)
    assert [(m.batch_index, m.texts, q) for m, q in published] == [(0, ["text 0"], "bulk")]
    client = broker.client()
    assert sorted(client.hkeys("unacked")) == [b"tag-1", b"tag-2"]  # Redis will not resend it
    assert client.zscore("unacked_index", "tag-0") is None
    with scope(sessions) as session:
        rows = {b.batch_index: b for b in ledger.pending_batches(session, "j")}
        assert (rows[0].sends, rows[1].sends, rows[2].sends) == (2, 1, 1)
        assert "its worker died" in (rows[0].last_error or "")
    assert reconciler.sweep().orphaned == 0  # re-published just now: not judged again
    dispose_all()


@pytest.mark.parametrize("alive", [True, False])
def test_a_machine_is_dead_only_when_no_worker_process_on_it_renews_its_lease(
    sqlite_url: str, alive: bool
) -> None:
    with scope(sessions_for(sqlite_url)) as session:
        leases.keep_alive(session, f"{DEAD}:1", ttl_s=-1)
        leases.keep_alive(session, f"{DEAD}:2", ttl_s=300 if alive else -1)
        leases.keep_alive(session, f"{LIVE}:1", ttl_s=-3600)  # long gone: forgotten
        assert leases.machines(session, forget_after_s=600) == {DEAD: alive}
    dispose_all()
