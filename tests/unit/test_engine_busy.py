"""The engine busy ratio: the share of wall time a worker process's engine ran, from the batches
it stored (one definition, shown by /metrics, ``embedq health`` and ``embedq stats``)."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from storage import batch_stats
from storage.models import BatchStat, Job
from storage.session import dispose_all, scope, sessions_for
from tasks.cli import stats

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def test_busy_time_counts_overlaps_once_and_stays_inside_the_span() -> None:
    spans = [(0.0, 10.0), (5.0, 15.0), (20.0, 30.0), (-5.0, 2.0), (55.0, 70.0)]
    assert batch_stats.busy_seconds(spans, 0.0, 60.0) == pytest.approx(15 + 10 + 5)
    assert batch_stats.busy_seconds([], 0.0, 60.0) == 0.0
    assert batch_stats.busy_seconds([(61.0, 62.0)], 0.0, 60.0) == 0.0


def _batch(session: object, index: int, pid: int, ended_s_ago: float, engine_s: float) -> None:
    row = {
        "job_id": "a",
        "batch_index": index,
        "host": "gpu-host",
        "pid": pid,
        "provider": "CUDAExecutionProvider",
        "precision": "fp16",
        "texts": 128,
        "tokens": 2000,
        "padded_tokens": 2400,
        "queue_wait_ms": 1.0,
        "tokenize_ms": 0.0,
        "inference_ms": engine_s * 1000,
        "pool_ms": 0.0,
        "write_ms": 0.0,
        "total_ms": engine_s * 1000,
    }
    batch_stats.upsert_batch_stat(session, row)  # type: ignore[arg-type]
    session.execute(  # type: ignore[attr-defined]
        update(BatchStat)
        .where(BatchStat.job_id == "a", BatchStat.batch_index == index)
        .values(created_at=NOW - timedelta(seconds=ended_s_ago))
    )


def test_each_process_shows_the_share_of_the_last_minute_its_engine_ran(sqlite_url: str) -> None:
    with scope(sessions_for(sqlite_url)) as session:
        session.add(Job(id="a", model_name="minilm", queue="bulk", total_items=0, meta={}))
        session.flush()
        for index, ended in enumerate((50, 30, 10)):  # pid 1: 10 s of every 20 s
            _batch(session, index, 1, ended, 10)
        _batch(session, 3, 2, 5, 20)  # pid 2: two batches on threads, overlapping
        _batch(session, 4, 2, 10, 20)
        _batch(session, 5, 3, 200, 10)  # pid 3: ran long ago, idle since
        session.flush()
        busy = batch_stats.engine_busy(session, NOW, host="gpu-host")
        other = batch_stats.engine_busy(session, NOW, host="cpu-host")
    dispose_all()
    assert [(b.pid, b.batches) for b in busy] == [(1, 3), (2, 2)]
    assert [b.ratio for b in busy] == [pytest.approx(0.5), pytest.approx(25 / 60)]
    assert other == []
    rows = stats.report(sqlite_url, since=timedelta(days=3650), model="minilm")
    dispose_all()
    ratios = {row["pid"]: row["engine_busy_ratio"] for row in rows}
    # Over each process's own active span: pid 1 from its first engine start (60 s ago) to
    # its last batch's end (10 s ago); pid 3's one batch was all engine.
    assert ratios == {1: 0.6, 2: 1.0, 3: 1.0}
    assert "engine busy 60%" in stats.render(rows)
