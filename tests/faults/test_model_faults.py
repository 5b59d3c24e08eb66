"""Broken models through the real pipeline: a ``model.onnx`` or a ``tokenizer.json`` damaged on
disk after it was prepared (a shuffled vocabulary loads, and its jobs succeeded with vectors near
orthogonal to the right ones), and a truncated archive registered as a model's source. Each
fails its job with the reason, once, and the worker goes on."""

from __future__ import annotations

import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import model_catalog
from storage.session import scope, sessions_for
from tests.damage import overwrite_middle, shuffle_vocabulary
from tests.faults.outcomes import Outcome, job_texts, tail, wait_terminal
from tests.processes import Worker


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("damaged", "damage"),
    [("model.onnx", overwrite_middle), ("tokenizer.json", shuffle_vocabulary)],
    ids=["onnx-weights-overwritten", "tokenizer-vocabulary-shuffled"],
)
def test_a_model_file_damaged_after_it_was_prepared_is_refused_and_its_job_fails(
    start_worker: Callable[..., Worker],
    minilm: Path,
    tmp_path: Path,
    short_texts: list[str],
    database_url: str,
    report: Callable[..., Outcome],
    damaged: str,
    damage: Callable[[Path], None],
) -> None:
    from tasks import producer

    store = tmp_path / "models"
    shutil.copytree(minilm, store / "minilm")
    damage(store / "minilm" / damaged)
    worker = start_worker("damaged", EMBEDQ_MODEL_DIR=str(store))
    texts = job_texts(short_texts, 9)[:300]
    started = time.monotonic()
    job = producer.submit(texts)
    status = wait_terminal(job, 120)
    outcome = report(job.id, len(texts), time.monotonic() - started, note=str(status["error"]))

    assert outcome.verdict == ("failed", 0, 0, 0), (status, tail(worker))
    assert f"{damaged} does not match its manifest" in str(status["error"])
    with scope(sessions_for(database_url)) as session:
        hosts = {(row.name, str(row.state)) for row in model_catalog.list_prepared(session)}
        errors = [row.error or "" for row in model_catalog.list_prepared(session)]
    assert ("minilm", "failed") in hosts
    assert any(f"{damaged} does not match its manifest" in error for error in errors)
    assert worker.process.poll() is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_truncated_archive_fails_its_download_once_with_the_reason(
    start_worker: Callable[..., Worker],
    minilm: Path,
    tmp_path: Path,
    short_texts: list[str],
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    archive = tmp_path / "minilm.tar.gz"
    with tarfile.open(archive, "w:gz") as tarred:
        tarred.add(minilm, arcname="minilm")
    with archive.open("r+b") as handle:  # cut short, as an interrupted upload leaves it
        handle.truncate(archive.stat().st_size // 2)
    worker = start_worker("truncated")
    producer.register_model(str(archive), "minilm-archive")
    texts = job_texts(short_texts, 9)[300:400]
    started = time.monotonic()
    job = producer.submit(texts, model="minilm-archive")
    status = wait_terminal(job, 180)
    outcome = report(job.id, len(texts), time.monotonic() - started, note=str(status["error"]))

    assert outcome.verdict == ("failed", 0, 0, 0), (status, tail(worker))
    assert "not a readable archive" in str(status["error"])
    log = "".join(worker.lines)
    assert log.count("Task embedq.download[") == 2, tail(worker)  # received, then succeeded
    assert log.count("waiting_for_model") <= 5  # no re-queue storm while it failed
    assert worker.process.poll() is None
