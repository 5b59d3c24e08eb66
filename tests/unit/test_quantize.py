from pathlib import Path

import pytest

from worker import quantize
from worker.errors import ExportError


@pytest.mark.parametrize("step", [quantize.quantize_int8, quantize.convert_fp16])
def test_a_file_that_is_not_onnx_is_refused_and_nothing_is_written(
    tmp_path: Path, step: object
) -> None:
    src, dst = tmp_path / "model.onnx", tmp_path / "out.onnx"
    src.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="is not a readable ONNX model"):
        step(src, dst)  # type: ignore[operator]
    assert not dst.exists()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        quantize.quantize_int8(tmp_path / "gone.onnx", tmp_path / "out.onnx")
