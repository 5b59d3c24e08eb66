"""Post-processing of an fp32 ONNX export of a BERT-style encoder: fusion, int8, fp16.

Settings were chosen by measuring all-MiniLM-L6-v2 (torch opset-17 export) under ORT 1.31 CPU,
intra_op_num_threads=2, on a Xeon with AVX-512 VNNI/AMX: accuracy on 2,000 pydocs texts
(mean-pooled, L2-normalised cosine against the fp32 model), speed on 1,000 length-sorted texts
in batches of 32 (median of 5, ratio to fp32 in the same process), in a one-off study;
``bench/engine.py`` measures the chosen int8 variant again against fp32 and sentence-transformers.

* optimize_transformer: the Python fusions (Attention, SkipLayerNorm, EmbedLayerNorm, BiasGelu) do
  NOT speed up CPU (0.97x fp32; ORT_ENABLE_ALL itself only fuses BiasGelu/FusedMatMul, also ~1.0x)
  and int8 on the fused graph is slower than on the unfused one (1.6-2.0x vs 2.2-2.4x): GPU only.
* quantize_int8: default quantize_dynamic gives cosine mean 0.955 (per-tensor weight scales are too
  coarse).  Per-channel weights fix that: MatMul-only, per-channel, QInt8 gives mean 0.9933 / min
  0.974 / p1 0.987 at 2.2-2.4x.  Layer 0's FFN down-projection is by far the most sensitive node;
  leaving only it in fp32 gives mean 0.9947 / min 0.982 / p1 0.989 at 2.0-2.1x (chosen).  Rejected:
  reduce_range (0.9919), QUInt8 weights (same accuracy, 1.0x: slow u8u8 kernel), all FFN
  down-projections in fp32 (0.9965 but 1.55x), quant_pre_process (no gain), Gather/embeddings
  (smaller file, same speed, slightly worse).  The minimum depends on the texts (0.974 on lines
  1-2000 of the corpus) and on batching: activations are quantised per tensor per run, so padding
  and neighbours in a micro-batch shift a text's vector slightly (min cosine 0.973 between one
  text alone and the same text batched). Where vectors must be reproducible, use fp32.
* convert_fp16: keep_io_types=True so callers still feed int64 and read float32.  ORT CPU loads it
  (it inserts casts around fp16 nodes it lacks kernels for), cosine vs fp32 > 0.99999; real fp16
  arithmetic only happens on GPU and was not measured here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.errors import ExportError

# Protobuf cannot hold more than 2 GiB; stay below it when deciding to write a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _check_src(src: Path) -> Any:
    """Return the graph with weights left unloaded, or raise ExportError."""
    import onnx

    if not src.is_file():
        raise ExportError(f"ONNX model {src} does not exist")
    try:
        return onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{src} is not a readable ONNX model: {exc}") from exc


def _needs_external_data(model: Any, src: Path) -> bool:
    """True when the source keeps weights in a side file or is too big for one protobuf."""
    import onnx

    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return external or src.stat().st_size > _EXTERNAL_DATA_THRESHOLD


def _cleanup(dst: Path) -> None:
    for path in (dst, dst.with_name(dst.name + ".data")):
        path.unlink(missing_ok=True)


@contextmanager
def _step(what: str, src: Path, dst: Path) -> Iterator[None]:
    """Turn any failure of the onnx tools (they raise many unrelated types) into an
    ``ExportError`` naming the step, and leave no half-written ``dst`` behind."""
    try:
        yield
    except Exception as exc:
        _cleanup(dst)
        raise ExportError(f"{what} of {src} failed: {type(exc).__name__}: {exc}") from exc


def _first_ffn_down_projection(model: Any) -> list[str]:
    """Name of the first MatMul whose constant weight maps a wider dim to a narrower one ([4h, h]).

    Found by shape, not by name, so it works for any exporter's naming; ONNX keeps nodes in
    topological order, so the first such node is layer 0's FFN output dense.
    """
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name and len(node.input) == 2:
            dims = shapes.get(node.input[1])
            if dims is not None and len(dims) == 2 and dims[0] > dims[1]:
                return [node.name]
    return []


def optimize_transformer(
    src: Path, dst: Path, *, num_heads: int, hidden_size: int, for_gpu: bool = False
) -> None:
    """Fuse attention, layer norm and gelu with onnxruntime's BERT optimizer (worth it on GPU)."""
    model = _check_src(src)
    with _step("transformer optimisation", src, dst):
        from onnxruntime.transformers.optimizer import optimize_model

        # opt_level=0: only the Python fusions, so the file stays portable between providers;
        # ORT applies its own graph optimisations again when the session is created.
        fused = optimize_model(
            str(src),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,
            use_gpu=for_gpu,
        )
        if not fused.get_nodes_by_op_type("Attention") and not fused.get_nodes_by_op_type(
            "MultiHeadAttention"
        ):
            raise ValueError("no attention subgraph was recognised (check num_heads/hidden_size)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        fused.save_model_to_file(
            str(dst), use_external_data_format=_needs_external_data(model, src)
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 for CPU: per-channel int8 MatMul weights, activations quantised per call."""
    model = _check_src(src)
    with _step("int8 quantisation", src, dst):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],  # not Gather (embeddings) nor fused Attention
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_first_ffn_down_projection(model),
            use_external_data_format=_needs_external_data(model, src),
            # ConstBOnly: never quantise activation x activation products (QK^T, attn x V).
            # DefaultTensorType: lets a graph with contrib ops (a fused model) be quantised too.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": 1},  # 1 = FLOAT
        )


def convert_fp16(src: Path, dst: Path) -> None:
    """Convert weights and compute to float16 for GPU, keeping the declared input/output types."""
    header = _check_src(src)
    with _step("fp16 conversion", src, dst):
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        external = _needs_external_data(header, src)
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
        )
