import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import producer
from worker.errors import InputError


def test_importing_the_producer_loads_no_inference_library(tmp_path: Path) -> None:
    code = (
        "import sys; from tasks import producer; "
        "producer.register_model('hf://org/m', 'm', {'precision': 'int8'}); "
        "print(sorted(m for m in ('onnxruntime', 'tokenizers', 'torch', 'transformers') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    env.pop("EMBEDQ_BROKER_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": []}, "texts is empty"),
        ({"texts": ["a", ""]}, "whitespace only"),
        ({"texts": ["a", "b"], "ids": ["x", "x"]}, "ids must be unique"),
        ({"texts": ["a"], "model": None}, "EMBEDQ_DEFAULT_MODEL"),
    ],
)
def test_bad_submissions_are_refused_before_anything_is_stored(
    kwargs: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBEDQ_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", "sqlite:////nonexistent/dir/never-created.db")
    kwargs.setdefault("model", "m")
    with pytest.raises(InputError, match=message):
        producer.submit(**kwargs)  # type: ignore[arg-type]


def test_a_job_is_split_into_batches_of_similar_length_that_carry_the_input_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sent: list[dict[str, object]] = []
    monkeypatch.setattr(
        producer, "publish", lambda messages, queue: sent.extend(m.model_dump() for m in messages)
    )
    monkeypatch.setenv("EMBEDQ_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached
    monkeypatch.setenv("EMBEDQ_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setenv("EMBEDQ_JOB_BATCH_SIZE", "2")
    from storage import schema

    schema.upgrade(f"sqlite:///{tmp_path / 'store.db'}")
    texts = ["a" * 50, "b", "c" * 30, "d" * 5, "e" * 40]
    producer.submit(texts, model="m", ids=["A", "B", "C", "D", "E"])
    producer.dispose()
    assert [p["texts"] for p in sent] == [["b", "d" * 5], ["c" * 30, "e" * 40], ["a" * 50]]
    assert [p["item_ids"] for p in sent] == [["B", "D"], ["C", "E"], ["A"]]
    assert [p["positions"] for p in sent] == [[1, 3], [2, 4], [0]]
    assert [p["batch_index"] for p in sent] == [0, 1, 2]
