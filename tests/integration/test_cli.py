"""The ``embedq`` command, run as a user runs it (a subprocess of the installed entry point)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worker.engine import Engine

pytestmark = pytest.mark.model


def embedq(*args: str, store: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    # The entry point installed beside this interpreter (the venv need not be on PATH).
    executable = shutil.which("embedq", path=str(Path(sys.executable).parent))
    assert executable, "the embedq entry point is not installed (pip install -e .)"
    env = {
        **{k: v for k, v in os.environ.items() if k != "EMBEDQ_BROKER_URL"},
        "EMBEDQ_MODEL_DIR": str(store),
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
        **extra,
    }
    return subprocess.run([executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_models_list_and_show(minilm: Path, store_root: Path) -> None:
    listed = embedq("models", "list", store=store_root)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\t")[:3] == ["minilm", "384", "fp32"]

    shown = embedq("models", "show", "minilm", store=store_root)
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout.split("\nruns here on:")[0])
    assert manifest["dim"] == 384 and manifest["behaviour"]["max_seq_length"] == 256
    assert "runs here on: onnxruntime, fp32\n" in shown.stdout
    assert "CPUExecutionProvider" in shown.stdout.split("providers available here:")[1]


def test_show_of_an_unknown_model_says_how_to_pull_it(store_root: Path) -> None:
    shown = embedq("models", "show", "nope", store=store_root)
    assert shown.returncode == 2
    assert "model 'nope' is not prepared" in shown.stderr and "embedq models pull" in shown.stderr


def test_encode_writes_one_row_per_line_in_order(
    minilm: Path, store_root: Path, engine: Engine, tmp_path: Path
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
    result = embedq(
        "encode", "--model", "minilm", "-f", str(source), "--out", str(out), store=store_root
    )
    assert result.returncode == 0, result.stderr
    assert "3 texts" in result.stderr
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, engine.encode(texts).vectors, atol=1e-5)


def test_encode_reports_a_bad_line_clearly(minilm: Path, store_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('"fine"\n{"txt": "wrong field"}\n')
    result = embedq("encode", "--model", "minilm", "-f", str(source), store=store_root)
    assert result.returncode == 2
    assert "bad.jsonl:2 is neither a JSON string nor" in result.stderr


def test_pull_refuses_a_wrong_checksum(store_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"corrupt")
    result = embedq(
        "models", "pull", model.as_uri(), "--name", "bad", "--sha256", "0" * 64, store=store_root
    )
    assert result.returncode == 2
    assert "refusing to install" in result.stderr
    assert not (store_root / "bad").exists()


def test_embed_in_local_mode_then_jobs_and_job(
    minilm: Path, store_root: Path, engine: Engine, tmp_path: Path
) -> None:
    env = {
        "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'embedq.db'}",
        "EMBEDQ_DEFAULT_MODEL": "minilm",
    }
    out = tmp_path / "vectors.npy"
    result = embedq(
        "embed", "first text", "second text", "--out", str(out), store=store_root, **env
    )
    assert result.returncode == 0, result.stderr
    assert "succeeded: 2 done, 0 failed" in result.stderr
    np.testing.assert_allclose(
        np.load(out), engine.encode(["first text", "second text"]).vectors, atol=1e-5
    )

    listed = embedq("jobs", store=store_root, **env)
    assert listed.returncode == 0, listed.stderr
    job_id, state, counts = listed.stdout.split("\t")[:3]
    assert (state, counts) == ("succeeded", "2/2")

    shown = embedq("job", job_id, store=store_root, **env)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout and "batches 1, texts 2" in shown.stdout


def test_embed_reports_a_failed_job_and_exits_non_zero(
    minilm: Path, store_root: Path, tmp_path: Path
) -> None:
    env = {"EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'embedq.db'}"}
    result = embedq("embed", "text", "--model", "missing", store=store_root, **env)
    assert result.returncode == 1
    ending = result.stderr.splitlines()[-1]
    assert ending.startswith("error: job ") and "failed: 0 done, 1 failed" in ending
    assert "model missing" in ending
