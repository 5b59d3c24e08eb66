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


def _tiny_model(path: Path) -> None:
    """A real two-layer ONNX model, y = (x @ W1) @ W2 with W1 2x4 (widening) and W2 4x2 (the
    first "down-projection", which int8 leaves in fp32)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name=name)
        for name, shape in (("W1", (2, 4)), ("W2", (4, 2)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
            helper.make_node("MatMul", ["h", "W2"], ["y"], name="down"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        weights,
    )
    onnx.save_model(helper.make_model(graph), str(path))


def test_a_write_that_fails_half_way_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the fp16 file and its weights file are being written: both partial
    files are removed and the error names the step and the cause."""
    import onnx

    src, dst = tmp_path / "model.onnx", tmp_path / "out" / "model.onnx"
    _tiny_model(src)

    def full_disk(model: object, path: str, **kwargs: object) -> None:
        Path(path).write_bytes(b"\x08\x07partial")
        Path(path).with_name(Path(path).name + ".data").write_bytes(b"partial weights")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(
        ExportError, match=r"fp16 conversion of .* failed: OSError: .*No space left"
    ):
        quantize.convert_fp16(src, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == []


def test_int8_quantises_the_matmuls_but_the_first_down_projection(tmp_path: Path) -> None:
    src, dst = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    _tiny_model(src)
    quantize.quantize_int8(src, dst)
    import onnx

    nodes = onnx.load(str(dst)).graph.node
    assert [n.name for n in nodes if n.op_type == "MatMul"] == ["down"]
    assert "MatMulInteger" in {n.op_type for n in nodes}
