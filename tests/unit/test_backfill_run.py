"""Backfill runs without a broker: a migrated SQLite store of the test's own, and a publisher
handed to the run that holds each batch's message as a queue would and runs it with the fake
engine (``tests.fakes``) only when the backfill waits for room, as slow workers would."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from sqlalchemy.orm import Session, sessionmaker

from storage import backfills, collections, embeddings, ledger, model_catalog
from storage.models import FailedItem, FailureKind, ModelState
from storage.session import dispose_all, make_engine, scope, session_factory
from tasks import backfill, names
from tasks.backfill import estimate
from tasks.backfill.chunks import chunks
from tasks.backfill.readers import Row
from tasks.batches import embed_batch
from tasks.message import BatchMessage
from tests.fakes import FakeEngine
from worker.settings import Settings

MODEL = "fake"
FILE_A, FILE_B = "a" * 64, "b" * 64


@dataclass
class Store:
    url: str
    sessions: sessionmaker[Session]


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    engine = make_engine(sqlite_url)
    yield Store(sqlite_url, session_factory(engine))
    engine.dispose()
    dispose_all()  # summary's engine on the same file


class Workers:
    """The publisher and the workers behind it. A message waits in ``held`` until the
    backfill reports its progress twice without sending in between (it is waiting for room or
    for the end); then the oldest one runs."""

    def __init__(self, sessions: sessionmaker[Session], model_file: str = FILE_A) -> None:
        self.sessions = sessions
        self.model_file = model_file
        self.held: deque[BatchMessage] = deque()
        self.sent: list[BatchMessage] = []
        self.queues: list[str] = []
        self.pending_at_send: list[int] = []
        """The job's unfinished batches in the ledger when each message was sent (its own
        included)."""
        self._sent_since_report = False

    def publish(self, messages: Sequence[BatchMessage], queue: str) -> None:
        for message in messages:
            with scope(self.sessions) as session:
                self.pending_at_send.append(ledger.count_pending(session, message.job_id))
            self.sent.append(message)
            self.queues.append(str(queue))
            self.held.append(message)
        self._sent_since_report = True

    def report(self, _progress: backfill.BackfillProgress) -> None:
        if not self._sent_since_report and self.held:
            message = self.held.popleft()
            with scope(self.sessions) as session:
                embed_batch(
                    session,
                    FakeEngine(),
                    message,
                    provider=FakeEngine.provider,
                    model_sha256=self.model_file,
                )
        self._sent_since_report = False


@dataclass
class Source:
    """A backfill source held in a list."""

    items: list[Row]
    description: str = "a list"

    def count(self) -> int | None:
        return len(self.items)

    def rows(self) -> Iterator[Row]:
        return iter(self.items)


def source(pairs: list[tuple[str, str]]) -> Source:
    return Source([Row(position, item, text) for position, (item, text) in enumerate(pairs)])


def texts(count: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"doc-{i}", "word " * (1 + i % 7) + str(i)) for i in range(start, start + count)]


SETTINGS = Settings(job_batch_size=4, backfill_max_in_flight=2, stuck_after=5)


def run(
    store: Store,
    rows: Source,
    name: str = "docs",
    workers: Workers | None = None,
    **options: object,
) -> tuple[backfill.BackfillProgress, Workers]:
    workers = workers or Workers(store.sessions)
    opts = backfill.Options(**{"name": name, "model": MODEL, **options})  # type: ignore[arg-type]
    job = backfill.BackfillRun(rows, opts, SETTINGS, sessions=store.sessions, publisher=workers)
    job.poll_s = 0.0
    return job.run(workers.report), workers


def counts(store: Store, name: str = "docs") -> tuple[str, int | None, int, int]:
    """A backfill's state, items, done and failed, from its summary."""
    outcome = backfill.summary(store.url, name)
    return outcome.state, outcome.items, outcome.done, outcome.failed


def sent_ids(workers: Workers) -> list[str]:
    return sorted(i for m in workers.sent for i in m.item_ids)


def test_limits_not_given_are_the_settings() -> None:
    settings = Settings(job_batch_size=4, backfill_max_in_flight=2, stuck_after=5)
    given = backfill.Options(name="n", model=MODEL, max_in_flight=3, batch_chars=100)
    assert backfill.Limits.of(given, settings) == backfill.Limits(
        batch_size=4, batch_chars=100, max_in_flight=3, stuck_after=5.0, sweep_interval=30.0
    )


def test_rows_are_sorted_by_length_within_a_window_and_cut_by_count_and_characters() -> None:
    lengths = [5, 1, 4, 2, 9, 3, 8, 7, 6]
    rows = [Row(i, f"r{i}", "x" * n) for i, n in enumerate(lengths)]
    cut = [[len(r.text) for r in chunk] for chunk in chunks(iter(rows), 2, 100, window=2)]
    # Windows of 4 rows (2 batches of 2), each sorted; the last window holds what is left.
    assert cut == [[1, 2], [4, 5], [3, 7], [8, 9], [6]]
    by_chars = [[len(r.text) for r in chunk] for chunk in chunks(iter(rows), 9, 10)]
    assert by_chars == [[1, 2, 3, 4], [5, 6], [7, 8], [9]]


def test_a_run_sends_every_row_once_in_batches_and_settles_the_job(store: Store) -> None:
    progress, workers = run(store, source(texts(18)))
    assert (progress.sent, progress.batches, progress.finished) == (18, 5, True)
    assert [len(m.texts) for m in workers.sent] == [4, 4, 4, 4, 2]
    assert sent_ids(workers) == sorted(f"doc-{i}" for i in range(18))
    assert [m.batch_index for m in workers.sent] == [0, 1, 2, 3, 4]
    assert workers.queues == [names.Queue.BULK] * 5
    outcome = backfill.summary(store.url, "docs")
    assert counts(store) == ("succeeded", 18, 18, 0)
    assert outcome.options == {
        "batch_size": 4,
        "batch_chars": backfill.options.BATCH_CHARS,
        "max_in_flight": 2,
        "stuck_after": 5.0,
        "sweep_interval": 30.0,
        "retry_failed": False,
    }
    assert outcome.model_files == [FILE_A]
    assert (outcome.runs, outcome.in_flight_batches) == (1, 0)


def test_never_more_than_max_in_flight_batches_are_unfinished(store: Store) -> None:
    _, workers = run(store, source(texts(40)), max_in_flight=3)
    assert len(workers.sent) == 10
    assert max(workers.pending_at_send) == 3  # reached, never passed
    assert workers.pending_at_send[:3] == [1, 2, 3]


def test_a_second_run_sends_only_what_the_store_does_not_hold(store: Store) -> None:
    run(store, source(texts(10)))
    again, workers = run(store, source(texts(10) + texts(3, start=10)))
    assert (again.sent, again.skipped, again.duplicates) == (3, 10, 0)
    assert sent_ids(workers) == ["doc-10", "doc-11", "doc-12"]
    assert counts(store) == ("succeeded", 13, 13, 0)
    assert backfill.summary(store.url, "docs").runs == 2


def test_an_id_met_again_in_the_source_is_a_duplicate_and_sent_once(store: Store) -> None:
    pairs = texts(16)
    pairs[10] = ("doc-0", "another text under a known id")  # a later window
    pairs[12] = ("doc-1", "and another")
    pairs[3] = ("doc-2", "a repeat in the same window")
    progress, workers = run(store, source(pairs), batch_size=1)
    assert (progress.duplicates, progress.sent, progress.skipped) == (3, 13, 0)
    ids = [i for m in workers.sent for i in m.item_ids]
    assert len(ids) == len(set(ids)) == 13
    outcome = backfill.summary(store.url, "docs")
    assert (outcome.duplicates, outcome.items, outcome.state) == (3, 13, "succeeded")


def ready(store: Store, model_file: str, host: str = "host-1") -> None:
    """Record that ``host`` runs the model as ``model_file``, as a worker reports it."""
    with scope(store.sessions) as session:
        model_catalog.set_prepared(session, MODEL, host, ModelState.READY, onnx_sha256=model_file)


def test_texts_the_content_cache_holds_for_the_model_file_are_copied_not_sent(
    store: Store,
) -> None:
    ready(store, FILE_A)
    run(store, source(texts(8)))
    renamed = [(f"copy-{i}", text) for i, (_, text) in enumerate(texts(8))]
    progress, workers = run(store, source([*renamed, *texts(2, start=50)]), "again")
    assert (progress.reused, progress.sent) == (8, 2)
    assert sent_ids(workers) == ["doc-50", "doc-51"]
    outcome = backfill.summary(store.url, "again")
    assert (outcome.reused, outcome.done, outcome.state) == (8, 10, "succeeded")
    assert outcome.model_files == [FILE_A]


def test_a_model_pulled_again_from_another_file_never_reuses_the_old_file_s_vectors(
    store: Store,
) -> None:
    ready(store, FILE_A)
    run(store, source(texts(8)))
    ready(store, FILE_B)  # the same name, pulled again from a changed file
    renamed = [(f"copy-{i}", text) for i, (_, text) in enumerate(texts(8))]
    progress, _ = run(store, source(renamed), "again", Workers(store.sessions, FILE_B))
    assert (progress.reused, progress.sent) == (0, 8)
    assert backfill.summary(store.url, "again").model_files == [FILE_B]
    ready(store, FILE_A, host="host-2")  # hosts that disagree: nothing is copied
    others = [(f"third-{i}", text) for i, (_, text) in enumerate(texts(8))]
    progress, _ = run(store, source(others), "third", Workers(store.sessions, FILE_B))
    assert (progress.reused, progress.sent) == (0, 8)


def test_unusable_rows_fail_with_their_reason_and_retry_failed_sends_only_them(
    store: Store,
) -> None:
    pairs = texts(10)
    broken = source(pairs)
    broken.items[3] = Row(3, "#3", "", "row 3 is not JSON")
    broken.items[6] = Row(6, "doc-6", "  \t ")
    progress, _ = run(store, broken)
    assert (progress.sent, progress.failed_here, progress.failed) == (8, 2, 2)
    outcome = backfill.summary(store.url, "docs")
    assert counts(store) == ("partially_failed", 10, 8, 2)
    assert outcome.failure_reasons == {
        "row 3 is not JSON": 1,
        "empty or whitespace-only text": 1,
    }
    assert sorted(outcome.failed_examples) == ["#3", "doc-6"]
    with scope(store.sessions) as session:  # the kind is stored with each failed item
        kinds = {item.item_id: item.kind for item in session.query(FailedItem).all()}
    assert kinds == {"#3": FailureKind.INPUT, "doc-6": FailureKind.INPUT}

    again, workers = run(store, broken)  # without --retry-failed, failures stay
    assert (again.sent, again.skipped, workers.sent) == (0, 10, [])

    fixed = source(pairs)
    fixed.items[3] = Row(3, "#3", "the row, readable now")
    retried, workers = run(store, fixed, retry_failed=True)
    assert (retried.sent, retried.skipped) == (2, 8)
    assert sent_ids(workers) == ["#3", "doc-6"]
    assert counts(store) == ("succeeded", 10, 10, 0)


def test_another_model_builds_a_new_version_that_readers_get_only_after_use(
    store: Store,
) -> None:
    first, _ = run(store, source(texts(6)))
    assert (first.version, first.current) == (1, True)
    moved, workers = run(store, source(texts(6)), model="another")
    assert (moved.version, moved.current, moved.job_id != first.job_id) == (2, False, True)
    assert {m.model for m in workers.sent} == {"another"} and len(sent_ids(workers)) == 6
    with scope(store.sessions) as session:
        assert backfills.job_of(session, "docs") == first.job_id  # readers keep version 1
    shown = backfill.summary(store.url, "docs", version=2)
    assert (shown.version, shown.model, shown.done) == (2, "another", 6)
    assert [(v.version, v.current) for v in shown.versions] == [(1, True), (2, False)]

    again, workers = run(store, source(texts(7)), model="another")  # syncs version 2 again
    assert (again.version, sent_ids(workers)) == (2, ["doc-6"])
    current, workers = run(store, source(texts(6)), model=None)  # the current model: version 1
    assert (current.version, current.sync.removed, workers.sent) == (1, 0, [])

    with scope(store.sessions) as session:
        collections.use_version(session, "docs", 2)
    with scope(store.sessions) as session:
        assert backfills.job_of(session, "docs") == moved.job_id
    after, _ = run(store, source(texts(7)), model=None)  # now the current model is "another"
    assert after.version == 2
    with scope(store.sessions) as session:
        collections.drop_version(session, "docs", 1)
    assert [v.version for v in backfill.summary(store.url, "docs").versions] == [2]


def test_the_model_s_file_changed_under_its_name_builds_a_new_version(store: Store) -> None:
    ready(store, FILE_A)
    run(store, source(texts(4)))
    ready(store, FILE_B)  # pulled again from a changed file: its vectors differ
    changed, workers = run(store, source(texts(4)), workers=Workers(store.sessions, FILE_B))
    assert (changed.version, changed.current, len(workers.sent)) == (2, False, 1)
    assert changed.reused == 0  # the old file's vectors are not copied either
    shown = backfill.summary(store.url, "docs", version=2)
    assert (shown.model_files, shown.done) == ([FILE_B], 4)


def test_a_sync_embeds_only_new_and_changed_texts_and_counts_or_prunes_removed_ids(
    store: Store,
) -> None:
    first = texts(20)
    run(store, source(first))
    edited = {"doc-3": "an edited text", "doc-11": "another edited text"}
    kept = [(i, edited.get(i, text)) for i, text in first if i not in ("doc-5", "doc-6", "doc-7")]
    current = [*kept, *texts(2, start=40)]
    progress, workers = run(store, source(current))
    assert sent_ids(workers) == ["doc-11", "doc-3", "doc-40", "doc-41"]
    sync = progress.sync
    assert (sync.unchanged, sync.new, sync.changed, sync.removed, sync.pruned) == (
        15,
        2,
        2,
        3,
        False,
    )
    assert sorted(sync.removed_examples) == ["doc-5", "doc-6", "doc-7"]
    assert counts(store) == ("succeeded", 22, 22, 0)  # the removed ids are still held
    outcome = backfill.summary(store.url, "docs")
    assert outcome.last_sync is not None and outcome.last_sync["changed"] == 2

    progress, workers = run(store, source(current), prune=True)
    assert workers.sent == [] and (progress.sync.removed, progress.sync.pruned) == (3, True)
    assert counts(store) == ("succeeded", 19, 19, 0)
    with scope(store.sessions) as session:  # every id's vector is its current text's
        job_id = backfills.job_of(session, "docs")
        assert job_id is not None
        stored = {e.item_id: e.vector for e in embeddings.list_embeddings(session, job_id)}
    expected = dict(current)
    assert sorted(stored) == sorted(expected)
    for item, vector in stored.items():
        assert vector == FakeEngine().encode([expected[item]]).vectors[0].tobytes(), item

    progress, workers = run(store, source(current))  # nothing changed: nothing sent
    assert workers.sent == [] and progress.sync.unchanged == 19


def test_a_dry_run_counts_what_the_sync_then_does_and_writes_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = texts(20)
    run(store, source(first))
    edited = [(i, "an edited text" if i == "doc-3" else text) for i, text in first[2:]]
    current = source([*edited, *texts(3, start=40)])
    before = counts(store)
    monkeypatch.setattr(estimate, "RATE_TEXTS", 10)  # the first run's 20 texts set the rate
    planned = estimate.dry_run(
        current, backfill.Options(name="docs", model=MODEL), SETTINGS, sessions=store.sessions
    )
    assert counts(store) == before  # nothing written
    assert (planned.rows, planned.unchanged, planned.new, planned.changed) == (21, 17, 3, 1)
    assert (planned.removed, planned.duplicates, planned.texts) == (2, 0, 4)
    assert planned.tokens_by.startswith("characters / 4")  # no model in this machine's store
    assert planned.tokens == sum(
        max(1, len(text) // 4)
        for i, text in [*edited, *texts(3, start=40)]
        if i in {"doc-3", "doc-40", "doc-41", "doc-42"}
    )
    assert planned.tokens_per_s is not None and planned.seconds is not None
    assert planned.seconds == round(planned.tokens / planned.tokens_per_s, 1)
    progress, workers = run(store, current)  # the run does what the dry run said
    sync = progress.sync
    assert (sync.unchanged, sync.new, sync.changed, sync.removed) == (17, 3, 1, 2)
    assert len(sent_ids(workers)) == planned.texts


def test_a_dry_run_with_no_job_of_the_model_behind_it_gives_no_time(store: Store) -> None:
    planned = estimate.dry_run(
        source(texts(5)),
        backfill.Options(name="new", model=MODEL),
        SETTINGS,
        sessions=store.sessions,
    )
    assert (planned.new, planned.texts, planned.batches, planned.seconds) == (5, 5, 2, None)
    assert "no job of model 'fake' has run 1,000 texts yet" in planned.assumption
