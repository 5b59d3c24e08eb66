"""Backfills in local mode (the worker's task code in-process) on SQLite and PostgreSQL: bad
rows become failed items with reasons, a second run recomputes nothing, the content cache
reuses vectors, --retry-failed retries only the failed items, and exports stream the vectors
back in source order. The queue, worker kills and backpressure are in tests/acceptance."""

import csv
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from storage.models import BatchStat
from storage.session import dispose_all, scope, sessions_for
from tasks import backfill
from tasks.backfill import estimate, readers
from tasks.fleet.reconciler import Reconciler
from tasks.local import LocalPublisher
from tasks.publishing import Publisher
from tasks.vector_files import export
from tests.conftest import cosines
from tests.fakes import RecordingPublisher
from worker.engine import Engine
from worker.errors import InputError
from worker.manifest import Manifest
from worker.settings import Settings

pytestmark = pytest.mark.model


def local_settings(cpu_settings: Settings, url: str, **more: object) -> Settings:
    """Local mode (no broker: batches run in this process) on the store at ``url``, with the
    session's model store, where minilm is prepared."""
    values = {"database_url": url, "broker_url": None, "default_model": "minilm"}
    return cpu_settings.model_copy(update={**values, "job_batch_size": 32, **more})


@pytest.fixture
def local(database_url: str, minilm: Path, cpu_settings: Settings) -> Iterator[Settings]:
    """Local-mode settings on a store of each dialect."""
    yield local_settings(cpu_settings, database_url)
    dispose_all()


@pytest.fixture
def local_sqlite(sqlite_url: str, minilm: Path, cpu_settings: Settings) -> Iterator[Settings]:
    """Local-mode settings on a SQLite store, for what does not depend on the dialect."""
    yield local_settings(cpu_settings, sqlite_url)
    dispose_all()


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


def run(
    settings: Settings,
    path: Path,
    name: str,
    *,
    publisher: Publisher | None = None,
    **options: object,
) -> backfill.BackfillProgress:
    """One run of backfill ``name`` over the JSON Lines at ``path``; its batches go to
    ``publisher`` (default: the settings', which runs them here in local mode)."""
    values: dict[str, object] = {"batch_size": 32, **options}
    opts = backfill.Options(name=name, model="minilm", **values)  # type: ignore[arg-type]
    reader = readers.open_source(str(path))
    return backfill.BackfillRun(reader, opts, settings, publisher=publisher).run()


def embedded_texts(settings: Settings) -> int:
    with scope(sessions_for(settings.database_url)) as session:
        return int(session.scalar(select(func.coalesce(func.sum(BatchStat.texts), 0))) or 0)


def test_a_backfill_resumes_reuses_and_retries_only_what_failed(
    local: Settings, short_texts: list[str], engine: Engine, minilm: Path, tmp_path: Path
) -> None:
    url = local.database_url
    texts = short_texts[2000:2100]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)

    first = run(local, source, "docs")
    outcome = backfill.summary(url, "docs")
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

    again = run(local, source, "docs")  # resumed: everything is stored or failed already
    assert (again.sent, again.skipped, embedded_texts(local)) == (0, 100, 98)

    other = run(local, source, "docs-again")  # the same texts again: the cache serves them
    assert (other.sent, other.reused) == (0, 98)
    assert backfill.summary(url, "docs-again").reused == 98
    assert embedded_texts(local) == 98

    write_jsonl(source, texts, bad=False)  # the source is fixed; only the failed two go again
    retried = run(local, source, "docs", retry_failed=True)
    assert (retried.sent, embedded_texts(local)) == (2, 100)
    final = backfill.summary(url, "docs")
    assert (final.state, final.items, final.done, final.failed) == (
        "succeeded",
        100,
        100,
        0,
    )

    out = tmp_path / "docs.npy"
    assert export(url, "docs", "npy", out) == 100
    vectors = np.load(out)
    ids = (tmp_path / "docs.npy.ids.txt").read_text().split()
    assert ids == [f"doc-{i}" for i in range(100)]  # source order
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999
    lines = tmp_path / "docs.jsonl.out"
    assert export(url, "docs", "jsonl", lines) == 100
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [row["id"] for row in rows] == ids and set(rows[0]) == {"id", "embedding"}
    np.testing.assert_array_equal(np.array([row["embedding"] for row in rows], np.float32), vectors)


def test_csv_and_sql_sources_are_read_by_the_named_fields(
    local_sqlite: Settings, tmp_path: Path, short_texts: list[str]
) -> None:
    path = tmp_path / "docs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "body", "other"])
        for i, text in enumerate(short_texts[:20]):
            writer.writerow([f"k{i}", text, "x"])
    reader = readers.open_source(str(path), id_field="key", text_field="body")
    rows = list(reader.rows())
    assert reader.count() == 20 and [r.item_id for r in rows[:2]] == ["k0", "k1"]
    assert rows[5].text == short_texts[5] and all(r.problem is None for r in rows)
    no_column = r"docs\.csv has no column \['id', 'missing'\]; its columns: \['key', 'body', 'o"
    with pytest.raises(InputError, match=no_column):
        list(readers.open_source(str(path), text_field="missing").rows())

    docs = tmp_path / "docs.sqlite"
    with sqlite3.connect(docs) as connection:
        connection.execute("create table docs (id integer primary key, body text)")
        connection.executemany(
            "insert into docs values (?, ?)", [(i, text) for i, text in enumerate(short_texts[:12])]
        )
    query = readers.open_source(f"sqlite:///{docs}", sql="select id, body from docs order by id")
    assert query.count() == 12
    assert [(r.item_id, r.text) for r in query.rows()][:2] == [
        ("0", short_texts[0]),
        ("1", short_texts[1]),
    ]
    opts = backfill.Options(name="from-sql", model="minilm", batch_size=5)
    progress = backfill.BackfillRun(query, opts, local_sqlite).run()
    summary = backfill.summary(local_sqlite.database_url, "from-sql")
    assert (progress.sent, progress.batches, summary.state) == (12, 3, "succeeded")


def test_parquet_in_and_out(
    local_sqlite: Settings, tmp_path: Path, short_texts: list[str], engine: Engine
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "docs.parquet"
    texts = short_texts[300:340]
    table = pa.table({"doc": [f"p{i}" for i in range(40)], "body": texts})
    pq.write_table(table, source, row_group_size=16)
    reader = readers.open_source(str(source), id_field="doc", text_field="body")
    assert reader.count() == 40
    opts = backfill.Options(name="pq", model="minilm", batch_size=16)
    assert backfill.BackfillRun(reader, opts, local_sqlite).run().sent == 40

    out = tmp_path / "out.parquet"
    assert export(local_sqlite.database_url, "pq", "parquet", out) == 40
    written = pq.read_table(out)
    assert written.column_names == ["id", "embedding"]
    assert written.column("id").to_pylist() == [f"p{i}" for i in range(40)]
    vectors = np.array(written.column("embedding").to_pylist(), dtype=np.float32)
    assert float(np.min(cosines(vectors, engine.encode(texts).vectors))) >= 0.9999


def test_lost_batches_are_sent_again_by_the_reconciler_then_failed_after_too_many_losses(
    sqlite_url: str, minilm: Path, cpu_settings: Settings, short_texts: list[str], tmp_path: Path
) -> None:
    settings = local_settings(
        cpu_settings, sqlite_url, sweep_interval=0.1, stuck_after=0.5, max_retries=1
    )
    # A run gives up after 2 x its stuck_after + a sweep with nothing finished: 0.6 s here.
    patient = 0.25

    def later() -> datetime:  # the reconciler's present: a second on, stuck_after has passed
        return datetime.now(UTC) + timedelta(seconds=1)

    source = write_jsonl(tmp_path / "lost.jsonl", short_texts[500:520], bad=False)
    lost = RecordingPublisher()  # a broker that loses every message
    with pytest.raises(backfill.BackfillError, match="none finished for 1s"):
        run(
            settings,
            source,
            "lost",
            publisher=lost,
            max_in_flight=2,
            batch_size=8,
            stuck_after=patient,
        )
    assert [len(m.item_ids) for m in lost.sent] == [8, 8]
    summary = backfill.summary(sqlite_url, "lost")
    assert summary.state == "queued" and summary.in_flight_batches == 2

    # A worker's reconciler finds both overdue and publishes them again (here: into this
    # process, as local mode runs batches); nobody re-runs the backfill for them.
    sessions = sessions_for(sqlite_url)
    reconciler = Reconciler(
        settings, sessions, LocalPublisher(settings), None, holder="test", clock=later
    )
    report = reconciler.sweep()
    assert (report.overdue, report.republished, report.failed) == (2, 2, 0)
    assert backfill.summary(sqlite_url, "lost").done == 16
    again = run(settings, source, "lost", batch_size=8, stuck_after=patient)  # 4 never sent
    assert again.sent == 4 and again.skipped == 16
    assert backfill.summary(sqlite_url, "lost").state == "succeeded"

    # Lost on every send: after EMBEDQ_MAX_RETRIES re-publishes the batch fails with the reason.
    write_jsonl(tmp_path / "lost2.jsonl", short_texts[600:610], bad=False)
    with pytest.raises(backfill.BackfillError):
        run(
            settings,
            tmp_path / "lost2.jsonl",
            "lost2",
            publisher=lost,
            max_in_flight=1,
            stuck_after=patient,
        )
    dropping = Reconciler(settings, sessions, lost, None, holder="test", clock=later)
    outcomes = []
    for _ in range(2):
        report = dropping.sweep()
        outcomes.append((report.republished, report.failed))
    assert outcomes == [(1, 0), (0, 1)]
    resent, first_send = lost.sent[-1], lost.sent[-2]  # re-published once, as it was first
    assert (resent.job_id, resent.batch_index, resent.texts) == (
        first_send.job_id,
        first_send.batch_index,
        first_send.texts,
    )
    final = run(settings, tmp_path / "lost2.jsonl", "lost2", stuck_after=patient)
    assert final.sent == 0
    outcome = backfill.summary(sqlite_url, "lost2")
    assert (outcome.state, outcome.failed) == ("failed", 10)
    (reason,) = outcome.failure_reasons
    assert reason.startswith("its message was lost 2 times")


def test_a_dry_run_counts_tokens_with_the_model_s_tokenizer_as_the_engine_runs_them(
    local_sqlite: Settings, corpus: list[str], engine: Engine, tmp_path: Path
) -> None:
    texts = [*corpus[:40], "word " * 600]  # one past the model's length: counted truncated
    path = write_jsonl(tmp_path / "docs.jsonl", texts, bad=False)
    options = backfill.Options(name="docs", model="minilm")
    planned = estimate.dry_run(readers.open_source(str(path)), options, local_sqlite)
    assert planned.tokens_by == "the tokenizer of minilm"
    assert (planned.new, planned.texts) == (len(texts), len(texts))
    assert planned.tokens == sum(engine.encode(texts).token_counts)
    # No job of the model has run: a probe on this machine gives the rate, and says so.
    assert planned.assumption.startswith(f"a probe on this machine: {len(texts)} of the texts")
    assert planned.tokens_per_s and planned.seconds == round(
        planned.tokens / planned.tokens_per_s, 1
    )
    assert (planned.model, planned.version, planned.current) == ("minilm", None, None)
    with scope(sessions_for(local_sqlite.database_url)) as session:  # nothing was written
        assert session.scalar(select(func.count()).select_from(BatchStat)) == 0
