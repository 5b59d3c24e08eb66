"""Backfills in local mode (the worker's task code in-process) on SQLite and PostgreSQL: bad
rows become failed items with reasons, a second run recomputes nothing, the content cache
reuses vectors, --retry-failed retries only the failed items, and exports stream the vectors
back in source order. The queue, worker kills and backpressure are in tests/acceptance."""

import csv
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from storage import schema
from storage.models import BatchStat
from storage.session import scope, sessions_for
from tasks import backfill
from tasks.backfill import readers
from tasks.vector_files import export
from tests.conftest import cosines
from worker.engine import Engine
from worker.errors import InputError
from worker.manifest import Manifest
from worker.settings import get_settings

pytestmark = pytest.mark.model


@pytest.fixture
def local(
    database_url: str, minilm: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.delenv("EMBEDQ_BROKER_URL", raising=False)
    for key, value in {
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
        "EMBEDQ_JOB_BATCH_SIZE": "32",
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    schema.upgrade(database_url)
    yield database_url
    from tasks import producer

    producer.dispose()


def write_jsonl(path: Path, texts: list[str], bad: bool = True) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            if bad and i == 3:
                handle.write(json.dumps({"id": f"doc-{i}", "text": "  \t "}) + "\n")
            elif bad and i == 8:
                handle.write("{broken json\n")
            else:
                handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def run(path: Path, name: str, **options: object) -> backfill.BackfillProgress:
    settings = get_settings()
    values: dict[str, object] = {"batch_size": 32, **options}
    opts = backfill.Options(name=name, model="minilm", **values)  # type: ignore[arg-type]
    return backfill.BackfillRun(readers.open_source(str(path)), opts, settings).run()


def embedded_texts(url: str) -> int:
    with scope(sessions_for(url)) as session:
        return int(session.scalar(select(func.coalesce(func.sum(BatchStat.texts), 0))) or 0)


def test_a_backfill_resumes_reuses_and_retries_only_what_failed(
    local: str, corpus: list[str], engine: Engine, minilm: Path, tmp_path: Path
) -> None:
    texts = corpus[2000:2100]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)

    first = run(source, "docs")
    outcome = backfill.summary(local, "docs")
    assert (outcome.state, outcome.items, outcome.done, outcome.failed) == (
        "partially_failed",
        100,
        98,
        2,
    )
    assert set(outcome.failure_reasons) == {
        "empty or whitespace-only text",
        "row 8 is not JSON: Expecting property name enclosed in double quotes: line 1 column 2"
        " (char 1)",
    }
    assert sorted(outcome.failed_examples) == ["#8", "doc-3"]
    assert outcome.model_files == [Manifest.read(minilm).onnx_sha256]
    assert outcome.options == {
        "batch_size": 32,
        "batch_chars": 256000,
        "max_in_flight": 8,
        "stuck_after": 300.0,
        "sweep_interval": 30.0,
        "retry_failed": False,
    }
    assert first.sent == 98 and embedded_texts(local) == 98

    again = run(source, "docs")  # resumed: everything is stored or failed already
    assert (again.sent, again.skipped, embedded_texts(local)) == (0, 100, 98)

    other = run(source, "docs-again")  # another backfill of the same texts: the cache serves it
    assert (other.sent, other.reused) == (0, 98)
    assert backfill.summary(local, "docs-again").reused == 98
    assert embedded_texts(local) == 98

    write_jsonl(source, texts, bad=False)  # the source is fixed; only the failed two go again
    retried = run(source, "docs", retry_failed=True)
    assert (retried.sent, embedded_texts(local)) == (2, 100)
    final = backfill.summary(local, "docs")
    assert (final.state, final.items, final.done, final.failed) == (
        "succeeded",
        100,
        100,
        0,
    )

    out = tmp_path / "docs.npy"
    assert export(local, "docs", "npy", out) == 100
    vectors = np.load(out)
    ids = (tmp_path / "docs.npy.ids.txt").read_text().split()
    assert ids == [f"doc-{i}" for i in range(100)]  # source order
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999
    lines = tmp_path / "docs.jsonl.out"
    assert export(local, "docs", "jsonl", lines) == 100
    first_line = json.loads(lines.read_text().splitlines()[0])
    assert first_line["id"] == "doc-0" and len(first_line["vector"]) == 384


def test_another_model_under_the_same_name_is_refused(
    local: str, corpus: list[str], tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "few.jsonl", corpus[:5], bad=False)
    run(source, "few")
    opts = backfill.Options(name="few", model="another-model")
    with pytest.raises(backfill.BackfillError, match="embeds with 'minilm'"):
        backfill.BackfillRun(readers.open_source(str(source)), opts).run()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_csv_and_sql_sources_are_read_by_the_named_fields(
    local: str, tmp_path: Path, corpus: list[str]
) -> None:
    path = tmp_path / "docs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "body", "other"])
        for i, text in enumerate(corpus[:20]):
            writer.writerow([f"k{i}", text, "x"])
    reader = readers.open_source(str(path), id_field="key", text_field="body")
    rows = list(reader.rows())
    assert reader.count() == 20 and [r.item_id for r in rows[:2]] == ["k0", "k1"]
    assert rows[5].text == corpus[5] and all(r.problem is None for r in rows)
    no_column = r"docs\.csv has no column \['id', 'missing'\]; its columns: \['key', 'body', 'o"
    with pytest.raises(InputError, match=no_column):
        list(readers.open_source(str(path), text_field="missing").rows())

    docs = tmp_path / "docs.sqlite"
    with sqlite3.connect(docs) as connection:
        connection.execute("create table docs (id integer primary key, body text)")
        connection.executemany(
            "insert into docs values (?, ?)", [(i, text) for i, text in enumerate(corpus[:12])]
        )
    query = readers.open_source(f"sqlite:///{docs}", sql="select id, body from docs order by id")
    assert query.count() == 12
    assert [(r.item_id, r.text) for r in query.rows()][:2] == [("0", corpus[0]), ("1", corpus[1])]
    opts = backfill.Options(name="from-sql", model="minilm", batch_size=5)
    progress = backfill.BackfillRun(query, opts).run()
    assert (progress.sent, backfill.summary(local, "from-sql").state) == (12, "succeeded")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_parquet_in_and_out(local: str, tmp_path: Path, corpus: list[str], engine: Engine) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "docs.parquet"
    texts = corpus[300:340]
    table = pa.table({"doc": [f"p{i}" for i in range(40)], "body": texts})
    pq.write_table(table, source, row_group_size=16)
    reader = readers.open_source(str(source), id_field="doc", text_field="body")
    assert reader.count() == 40
    opts = backfill.Options(name="pq", model="minilm", batch_size=16)
    assert backfill.BackfillRun(reader, opts).run().sent == 40

    out = tmp_path / "out.parquet"
    assert export(local, "pq", "parquet", out) == 40
    written = pq.read_table(out)
    assert written.column("id").to_pylist() == [f"p{i}" for i in range(40)]
    vectors = np.array(written.column("vector").to_pylist(), dtype=np.float32)
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lost_batches_are_sent_again_by_the_reconciler_then_failed_after_too_many_losses(
    local: str, corpus: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import producer
    from tasks.batches import run_message
    from tasks.fleet.reconciler import Reconciler

    monkeypatch.setenv("EMBEDQ_SWEEP_INTERVAL", "0.1")
    monkeypatch.setenv("EMBEDQ_STUCK_AFTER", "0.5")
    monkeypatch.setenv("EMBEDQ_MAX_RETRIES", "1")
    get_settings.cache_clear()
    source = write_jsonl(tmp_path / "lost.jsonl", corpus[500:520], bad=False)
    with monkeypatch.context() as patch:
        patch.setattr(producer, "publish", lambda messages, queue: None)  # every message lost
        with pytest.raises(backfill.BackfillError, match="none finished for 1s"):
            run(source, "lost", stuck_after=0.5, max_in_flight=2, batch_size=8)
    summary = backfill.summary(local, "lost")
    assert summary.state == "queued" and summary.in_flight_batches == 2

    # A worker's reconciler finds both overdue and publishes them again (here: into this
    # process, as local mode runs batches); nobody re-runs the backfill for them.
    def deliver(message: object, queue: str) -> None:
        run_message(message.model_dump(mode="json"), local=True)  # type: ignore[attr-defined]

    reconciler = Reconciler(get_settings(), sessions_for(local), deliver, None, holder="test")
    time.sleep(0.6)
    report = reconciler.sweep()
    assert (report.overdue, report.republished, report.failed) == (2, 2, 0)
    assert backfill.summary(local, "lost").done == 16
    again = run(source, "lost", stuck_after=0.5, batch_size=8)  # the 4 items never sent
    assert again.sent == 4 and again.skipped == 16
    assert backfill.summary(local, "lost").state == "succeeded"

    # Lost on every send: after EMBEDQ_MAX_RETRIES re-publishes the batch fails with the reason.
    write_jsonl(tmp_path / "lost2.jsonl", corpus[600:610], bad=False)
    with monkeypatch.context() as patch:
        patch.setattr(producer, "publish", lambda messages, queue: None)
        with pytest.raises(backfill.BackfillError):
            run(tmp_path / "lost2.jsonl", "lost2", stuck_after=0.5, max_in_flight=1)
    dropping = Reconciler(
        get_settings(), sessions_for(local), lambda m, q: None, None, holder="test"
    )
    outcomes = []
    for _ in range(2):
        time.sleep(0.6)
        report = dropping.sweep()
        outcomes.append((report.republished, report.failed))
    assert outcomes == [(1, 0), (0, 1)]
    final = run(tmp_path / "lost2.jsonl", "lost2", stuck_after=0.5)
    assert final.sent == 0
    outcome = backfill.summary(local, "lost2")
    assert (outcome.state, outcome.failed) == ("failed", 10)
    (reason,) = outcome.failure_reasons
    assert reason.startswith("its message was lost 2 times")
