"""The ``embedq`` command on the real model and a real store, run in this process
(``tests.cli``); the installed entry point itself is run in tests/acceptance."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli import Cli
from worker.engine import Engine

pytestmark = pytest.mark.model


def settings(store: Path, **extra: str) -> dict[str, str]:
    return {"EMBEDQ_MODEL_DIR": str(store), "EMBEDQ_PROVIDERS": "CPUExecutionProvider", **extra}


def test_models_list_and_show(cli: Cli, minilm: Path, store_root: Path) -> None:
    listed = cli("models", "list", env=settings(store_root))
    assert listed.code == 0, listed.shown()
    assert listed.stdout.split("\t")[:3] == ["minilm", "384", "fp32"]

    shown = cli("models", "show", "minilm", env=settings(store_root))
    assert shown.code == 0, shown.shown()
    manifest = json.loads(shown.stdout.split("\nruns here on:")[0])
    assert manifest["dim"] == 384 and manifest["behaviour"]["max_seq_length"] == 256
    assert "runs here on: onnxruntime, fp32\n" in shown.stdout
    assert "CPUExecutionProvider" in shown.stdout.split("providers available here:")[1]


def test_show_of_an_unknown_model_says_how_to_pull_it(cli: Cli, store_root: Path) -> None:
    code, _, stderr = cli("models", "show", "nope", env=settings(store_root))
    assert code == 2
    assert "model 'nope' is not prepared" in stderr and "embedq models pull" in stderr


def test_encode_writes_one_row_per_line_in_order(
    cli: Cli, minilm: Path, store_root: Path, engine: Engine, tmp_path: Path
) -> None:
    texts = ["first line", "a much longer second line " * 20, "third"]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(
            [json.dumps(texts[0]), json.dumps({"text": texts[1], "id": 7}), json.dumps(texts[2])]
        )
        + "\n"
    )
    out = tmp_path / "out.npy"
    args = ("encode", "--model", "minilm", "-f", str(source), "--out", str(out))
    result = cli(*args, env=settings(store_root))
    assert result.code == 0, result.shown()
    assert "3 texts" in result.stderr
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, engine.encode(texts).vectors, atol=1e-5)


def test_encode_reports_a_bad_line_clearly(
    cli: Cli, minilm: Path, store_root: Path, tmp_path: Path
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('"fine"\n{"txt": "wrong field"}\n')
    code, _, stderr = cli(
        "encode", "--model", "minilm", "-f", str(source), env=settings(store_root)
    )
    assert code == 2
    assert "bad.jsonl:2 is neither a JSON string nor" in stderr


def test_pull_refuses_a_wrong_checksum(cli: Cli, store_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"corrupt")
    args = ("models", "pull", model.as_uri(), "--name", "bad", "--sha256", "0" * 64)
    code, _, stderr = cli(*args, env=settings(store_root))
    assert code == 2
    assert "refusing to install" in stderr
    assert not (store_root / "bad").exists()


def test_embed_in_local_mode_then_jobs_and_job(
    cli: Cli, minilm: Path, store_root: Path, engine: Engine, tmp_path: Path
) -> None:
    env = settings(
        store_root,
        EMBEDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'data' / 'embedq.db'}",  # not there yet
        EMBEDQ_DEFAULT_MODEL="minilm",
    )
    out = tmp_path / "vectors.npy"
    result = cli("embed", "first text", "second text", "--out", str(out), env=env)
    assert result.code == 0, result.shown()
    assert "succeeded: 2 done, 0 failed" in result.stderr
    np.testing.assert_allclose(
        np.load(out), engine.encode(["first text", "second text"]).vectors, atol=1e-5
    )

    listed = cli("jobs", env=env)
    assert listed.code == 0, listed.shown()
    job_id, state, counts = listed.stdout.split("\t")[:3]
    assert (state, counts) == ("succeeded", "2/2")

    shown = cli("job", job_id, env=env)
    assert shown.code == 0, shown.shown()
    assert "succeeded" in shown.stdout and "batches 1, texts 2" in shown.stdout


def test_embed_reports_a_failed_job_and_exits_non_zero(
    cli: Cli, minilm: Path, store_root: Path, sqlite_url: str
) -> None:
    env = settings(store_root, EMBEDQ_DATABASE_URL=sqlite_url)
    code, _, stderr = cli("embed", "text", "--model", "missing", env=env)
    assert code == 1
    ending = stderr.splitlines()[-1]
    assert ending.startswith("error: job ") and "failed: 0 done, 1 failed" in ending
    assert "model missing" in ending
