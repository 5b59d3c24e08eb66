"""``embedq stats``: batch statistics grouped by worker, rates, waste and percentiles, read from
a SQLite store."""

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from storage import batch_stats
from storage.models import Job
from storage.session import dispose_all, scope, sessions_for
from tasks.cli import stats
from worker import lifecycle
from worker.errors import InputError
from worker.settings import Settings


def stat(job: str, index: int, pid: int, total: float) -> dict[str, object]:
    return {
        "job_id": job,
        "batch_index": index,
        "host": "h1",
        "pid": pid,
        "provider": "CPUExecutionProvider",
        "precision": "fp32",
        "texts": 10,
        "tokens": 75,
        "padded_tokens": 100,
        "queue_wait_ms": 5.0 * index,
        "tokenize_ms": 1.0,
        "inference_ms": total - 2,
        "pool_ms": 0.5,
        "write_ms": 0.5,
        "total_ms": total,
    }


def test_the_report_groups_by_worker_and_gives_rates_waste_and_percentiles(
    sqlite_url: str, tmp_path: Path
) -> None:
    url = sqlite_url
    with scope(sessions_for(url)) as session:
        for job, model in (("a", "minilm"), ("b", "other")):
            session.add(Job(id=job, model_name=model, queue="bulk", total_items=0, meta={}))
        session.flush()
        for index in range(100):
            batch_stats.upsert_batch_stat(session, stat("a", index, 1 + index % 2, 100.0 + index))
        batch_stats.upsert_batch_stat(session, stat("b", 0, 9, 50.0))
    rows = stats.report(url, since=timedelta(hours=1), model="minilm")
    dispose_all()
    assert [(r["model"], r["pid"], r["batches"]) for r in rows] == [
        ("minilm", 1, 50),
        ("minilm", 2, 50),
    ]
    first = rows[0]  # batches 0, 2, ..., 98: total 100, 102, ..., 198 ms
    assert first["texts"] == 500 and first["padding_waste_pct"] == 25.0
    assert first["texts_per_s"] == pytest.approx(
        500 / (sum(100 + i for i in range(0, 100, 2)) / 1000), abs=0.1
    )
    assert first["ms"]["total"]["p50"] == pytest.approx(149.0)
    assert first["ms"]["queue_wait"]["p99"] == pytest.approx(485.1)  # 0, 10, .., 490 ms
    assert "padding waste 25.0%" in stats.render(rows)

    png = tmp_path / "stats.png"
    assert stats.plot(url, png, model="minilm") == 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(InputError, match="nothing to plot"):
        stats.plot(url, png, model="no-such-model")
    dispose_all()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)]
)
def test_since_takes_a_number_and_a_unit(text: str, seconds: int) -> None:
    assert stats.parse_since(text).total_seconds() == seconds


def test_a_bad_since_is_refused() -> None:
    with pytest.raises(InputError, match="unit"):
        stats.parse_since("an hour")


def test_containers_sharing_a_host_name_and_pids_stay_apart(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the compose fleet check: three worker containers share EMBEDQ_HOST_NAME and,
    each numbering its processes from 1, the same pids. Their records carry the container's
    own name; a host's last provider is still found under the shared name."""
    settings = Settings(host_name="compose-host")
    monkeypatch.setattr(socket, "gethostname", lambda: "compose-host")  # the machine's name
    assert lifecycle.machine_host(settings) == "compose-host"
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9c")
    assert lifecycle.machine_host(settings) == "compose-host/3f2a9c"
    assert lifecycle.process_name(settings) == f"compose-host/3f2a9c:{os.getpid()}"

    url = sqlite_url
    with scope(sessions_for(url)) as session:
        session.add(Job(id="a", model_name="minilm", queue="bulk", total_items=0, meta={}))
        session.flush()
        for index, machine in enumerate(["compose-host/3f2a9c", "compose-host/77d1e0"]):
            row = stat("a", index, 8, 100.0) | {"host": machine}
            row["provider"] = f"provider-{index}"
            batch_stats.upsert_batch_stat(session, row)
        session.flush()
        assert batch_stats.last_provider(session, "compose-host") == "provider-1"
        assert batch_stats.last_provider(session, "compose") is None  # a prefix is not a host
    rows = stats.report(url, since=timedelta(hours=1), model="minilm")
    dispose_all()
    assert sorted((r["host"], r["pid"]) for r in rows) == [
        ("compose-host/3f2a9c", 8),
        ("compose-host/77d1e0", 8),
    ]
