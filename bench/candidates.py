"""The OpenVINO int8 candidates of the engine benchmark, built from the fp32 model with NNCF.

``ov-int8`` is NNCF's post-training quantisation (int8 activations and weights, calibrated on
the engine's own micro-batches of corpus texts that the benchmark does not time); ``ov-int8w``
compresses the weights only, to int8, and computes in the compile precision. Each is built once
(about 20 s on 2 cores) and saved as OpenVINO IR under the benchmark's model folder, keyed by the
fp32 model's sha256 (and, for ``ov-int8``, the calibration lines and NNCF's version), so reruns
load it. The engine runs them like any model: ``OpenVinoSession`` wraps the compiled model, and
the engine's tokenisation, length sorting, micro-batching and pooling are reused unchanged.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import openvino as ov

from worker import batching, hardware, openvino_runtime
from worker.engine import CHARS_PER_TOKEN, Engine, Feeds, load_tokenizer, pad
from worker.manifest import ONNX_FILE, TOKENIZER_FILE, Manifest, Precision, verify_onnx
from worker.settings import Settings

KINDS = ("ov-int8", "ov-int8w")


def calibration_feeds(
    folder: Path, manifest: Manifest, texts: list[str], settings: Settings
) -> list[Feeds]:
    """The micro-batches the engine would run for ``texts``, as session feeds."""
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE, manifest.behaviour.max_seq_length)
    limit = manifest.behaviour.max_seq_length * CHARS_PER_TOKEN
    encodings = tokenizer.encode_batch([t[:limit] for t in texts])
    lengths = [len(e.ids) for e in encodings]
    groups = batching.plan(
        lengths, max_items=settings.micro_batch_size, max_tokens=settings.micro_batch_tokens
    )
    return [pad([encodings[i] for i in group], manifest.inputs)[0] for group in groups]


def build(kind: str, onnx: Path, feeds: list[Feeds]) -> ov.Model:
    """The fp32 model in ``onnx`` quantised by NNCF as ``kind`` asks."""
    import nncf  # imported here: it takes seconds and only a first run needs it

    model = ov.Core().read_model(str(onnx))
    if kind == "ov-int8w":
        return nncf.compress_weights(model)  # INT8_ASYM, per output channel
    return nncf.quantize(
        model,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
    )


def ir_path(kind: str, manifest: Manifest, cache: Path, calibration: str) -> Path:
    """Where ``kind`` of the fp32 model ``manifest`` describes is kept."""
    key = f"{kind}-{manifest.onnx_sha256[:16]}-nncf{metadata.version('nncf')}"
    lines = calibration.replace("lines ", "cal")
    return cache / (f"{key}-{lines}.xml" if kind == "ov-int8" else f"{key}.xml")


def load(
    kind: str, folder: Path, settings: Settings, texts: list[str], calibration: str, cache: Path
) -> tuple[Engine, Precision]:
    """An engine running ``kind`` of the fp32 model in ``folder``, calibrated (``ov-int8``) on
    ``texts`` (the corpus lines ``calibration`` names), and the precision the parts left
    unquantised run in: bf16 where the CPU has it, else fp32."""
    manifest = Manifest.read(folder)
    verify_onnx(folder, manifest)
    ir = ir_path(kind, manifest, cache, calibration)
    if not ir.is_file():
        feeds = calibration_feeds(folder, manifest, texts, settings) if kind == "ov-int8" else []
        model = build(kind, folder / ONNX_FILE, feeds)
        cache.mkdir(parents=True, exist_ok=True)
        staging = ir.with_name(f"{ir.stem}.partial.xml")
        ov.save_model(model, str(staging), compress_to_fp16=False)  # keep fp32 weights fp32
        staging.with_suffix(".bin").replace(ir.with_suffix(".bin"))
        staging.replace(ir)  # the .xml last: a folder with it is complete
    rest = Precision.BF16 if hardware.bf16_missing() is None else Precision.FP32
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(ir)), "CPU", openvino_runtime.compile_config(rest, settings)
    )
    session = openvino_runtime.OpenVinoSession(compiled, manifest.output, Precision.INT8)
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE, manifest.behaviour.max_seq_length)
    return Engine(manifest, session, tokenizer, settings), openvino_runtime.really_runs(compiled)
