"""The model store: prepared models under ``EMBEDQ_MODEL_DIR``, one folder per name.

Preparing is fetch -> (export) -> (optimise / quantise) -> describe -> verify -> rename. All of
it happens in a hidden staging folder beside the store; the model appears under its name only by
an atomic rename after its manifest is written and a real engine has embedded a text with it,
so a crash at any point leaves either the old model or none, never a half-written one. A file
lock per name keeps two processes on one host from preparing the same model at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
from filelock import FileLock

from worker import export, hardware, model_config, parity, quantize, sources
from worker.engine import Engine, load_tokenizer
from worker.errors import ModelError, ModelNotFoundError
from worker.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    Behaviour,
    Manifest,
    Pooling,
    Precision,
    hash_files,
)
from worker.parity import Parity, Reference
from worker.settings import Settings

logger = logging.getLogger(__name__)

_STAGING_PREFIX = ".staging-"
# Least cosine to the fp32 model, per probe text, below which a reduced-precision file is refused.
_MIN_COSINE = {Precision.INT8: 0.97, Precision.FP16: 0.999, Precision.BF16: 0.9999}


@dataclass(frozen=True)
class PullOptions:
    """How to prepare a model; ``None`` behaviour fields come from the model's own files."""

    precision: Precision = Precision.FP32
    sha256: str | None = None
    max_seq_length: int | None = None
    pooling: Pooling | None = None
    normalize: bool | None = None


class ModelStore:
    """Prepared models in one folder; ``get`` and ``list`` never see unfinished ones."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ModelError(f"{name!r} is not a usable model name")
        return self.root / name

    def get(self, name: str) -> Manifest:
        """The manifest of prepared model ``name``; ``ModelNotFoundError`` when absent."""
        folder = self.path(name)
        if not (folder / MANIFEST_FILE).is_file():
            raise ModelNotFoundError(
                f"model {name!r} is not prepared in {self.root}: run `embedq models pull SOURCE"
                f" --name {name}`"
            )
        return Manifest.read(folder)

    def list(self) -> list[Manifest]:
        if not self.root.is_dir():
            return []
        return [
            Manifest.read(folder)
            for folder in sorted(self.root.iterdir())
            if not folder.name.startswith(".") and (folder / MANIFEST_FILE).is_file()
        ]

    def pull(
        self,
        source: str,
        name: str,
        options: PullOptions,
        settings: Settings,
        *,
        replace: bool = True,
    ) -> Manifest:
        """Prepare ``source`` under ``name`` and return its manifest. ``replace=False`` keeps a
        model already prepared under that name, including one another process finished while
        this one waited for the lock."""
        target = self.path(name)
        if options.precision is Precision.BF16:
            check_bf16_here()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        with FileLock(str(self.root / ".locks" / f"{name}.lock")):
            if not replace and (target / MANIFEST_FILE).is_file():
                return Manifest.read(target)
            self._clear_leftovers(name)
            staging = self.root / f"{_STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            try:
                manifest = _prepare(source, name, options, staging, settings)
                _swap_in(staging / "model", target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        logger.info(
            "model prepared: name=%s source=%s",
            name,
            source,
            extra={"model": name, "source": source},
        )
        return manifest

    def _clear_leftovers(self, name: str) -> None:
        """Remove what a process killed while it prepared ``name`` left (its staging folder,
        a partial download): called under the name's lock, which no one else holds then."""
        pattern = re.compile(rf"{re.escape(_STAGING_PREFIX + name)}-[0-9a-f]{{8}}")
        for leftover in self.root.iterdir():
            if leftover.is_dir() and pattern.fullmatch(leftover.name):
                logger.warning("removing %s, left by a preparation that did not end", leftover)
                shutil.rmtree(leftover, ignore_errors=True)


def check_bf16_here() -> None:
    """Raise ``ModelError`` unless this machine can run bf16: a CPU with bf16 arithmetic, and
    OpenVINO installed. Called before anything is fetched, so a pull fails at once."""
    missing = hardware.bf16_missing()
    if missing is not None:
        raise ModelError(
            f"cannot prepare a bf16 model here: {missing}. Pull it in fp32 (no --bf16) or int8"
            " (--quantize int8) for this machine, or prepare it on a CPU with bf16"
        )
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"bf16 models run on OpenVINO, which is not installed here ({exc}):"
            " pip install 'embedq[openvino]'"
        ) from exc


def _prepare(
    source: str, name: str, options: PullOptions, staging: Path, settings: Settings
) -> Manifest:
    fetched = sources.fetch(
        source,
        staging / "source",
        sha256=options.sha256,
        max_bytes=settings.archive_max_bytes,
        max_members=settings.archive_max_members,
    )
    behaviour = model_config.resolve_behaviour(
        fetched.folder,
        max_seq_length=options.max_seq_length,
        pooling=options.pooling,
        normalize=options.normalize,
    )
    out = staging / "model"
    out.mkdir()
    _copy_configs(fetched.folder, out)
    validation: dict[str, float] = {}
    if fetched.onnx is None:
        if not (out / TOKENIZER_FILE).is_file():
            export.save_fast_tokenizer(fetched.folder, out / TOKENIZER_FILE)
        validation = export.export_checkpoint(
            fetched.folder, out / ONNX_FILE, out / TOKENIZER_FILE, behaviour
        )
        created_by = "exported"
    else:
        if not (out / TOKENIZER_FILE).is_file():
            raise ModelError(
                f"{source} has no {TOKENIZER_FILE}: pull a folder or archive that holds the ONNX"
                f" file with {TOKENIZER_FILE} and the sentence-transformers configs beside it"
            )
        _copy_onnx(fetched.onnx, out)
        created_by = "downloaded" if "://" in source else "copied"
    validation |= _post_process(out, options.precision, behaviour, settings)
    inputs, output, dim = describe(out / ONNX_FILE, behaviour.pooling)
    manifest = Manifest(
        name=name,
        source=source,
        revision=fetched.revision,
        onnx_sha256=sources.sha256_of(out / ONNX_FILE),
        dim=dim,
        behaviour=behaviour,
        precision=options.precision,
        inputs=inputs,
        output=output,
        created_at=datetime.now(UTC),
        created_by=created_by,
        steps=_steps(options.precision),
        validation=validation,
        embedq_version=_version(),
        files=hash_files(out),
    )
    manifest.write(out)
    _verify(out, manifest, settings)
    return manifest


def _steps(precision: Precision) -> tuple[str, ...]:
    if precision is Precision.FP32:
        return ()
    if precision is Precision.BF16:
        return ("openvino:bf16",)  # the fp32 file, computed in bf16 by OpenVINO
    return (f"quantized:{precision}",)


def _copy_configs(source: Path, out: Path) -> None:
    for relative in sources.CONFIG_FILES:
        if (source / relative).is_file():
            shutil.copy2(source / relative, out / relative)
    for pooling_config in source.glob(sources.POOLING_CONFIG):
        (out / pooling_config.parent.name).mkdir(exist_ok=True)
        shutil.copy2(pooling_config, out / pooling_config.parent.name / "config.json")


def _copy_onnx(onnx: Path, out: Path) -> None:
    shutil.copy2(onnx, out / ONNX_FILE)
    for data in onnx.parent.glob(onnx.name + "_data"):
        shutil.copy2(data, out / data.name)


def _post_process(
    out: Path, precision: Precision, behaviour: Behaviour, settings: Settings
) -> dict[str, float]:
    """Quantise or halve the fp32 file in place (bf16 keeps it: OpenVINO computes in bf16),
    refusing a result whose vectors drift from the fp32 model's."""
    if precision is Precision.FP32:
        return {}
    if precision is Precision.BF16:
        return _check_bf16(out, behaviour, settings)
    fp32 = out / "model.fp32.onnx"
    (out / ONNX_FILE).rename(fp32)
    try:
        if precision is Precision.INT8:
            quantize.quantize_int8(fp32, out / ONNX_FILE)
        else:
            quantize.convert_fp16(_fused_for_gpu(fp32, out), out / ONNX_FILE)
        result = _parity(out, out / ONNX_FILE, fp32, precision, behaviour)
    finally:
        for scratch in [*out.glob("model.fp32.onnx*"), *out.glob("model.fused.onnx*")]:
            scratch.unlink()
    return {f"{precision}_vs_fp32_{key}": value for key, value in result.as_dict().items()}


def _check_bf16(out: Path, behaviour: Behaviour, settings: Settings) -> dict[str, float]:
    """Run the file in bf16 on OpenVINO against fp32 on ONNX Runtime; refuse it unless OpenVINO
    really computed in bf16 and every probe text keeps cosine >= 0.9999."""
    from worker.openvino_runtime import OpenVinoSession

    _, output, _ = describe(out / ONNX_FILE, behaviour.pooling)
    session = OpenVinoSession.open(out / ONNX_FILE, output, Precision.BF16, settings)
    if session.precision is not Precision.BF16:
        raise ModelError(f"cannot prepare a bf16 model here: {session.why_not_bf16()}")
    result = _parity(out, session.run, out / ONNX_FILE, Precision.BF16, behaviour)
    return {f"bf16_vs_fp32_{key}": value for key, value in result.as_dict().items()}


def _parity(
    out: Path,
    candidate: Path | Reference,
    fp32: Path,
    precision: Precision,
    behaviour: Behaviour,
) -> Parity:
    """``candidate`` against ``fp32`` run by ONNX Runtime on the probe texts, gated."""
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in reference.get_inputs()]
    tokenizer = load_tokenizer(out / TOKENIZER_FILE, behaviour.max_seq_length)
    result = parity.measure(
        candidate,
        lambda feeds: np.asarray(reference.run(None, feeds)[0]),
        tokenizer,
        inputs,
        behaviour,
        label=f"{precision} model",
    )
    parity.require(result, f"the {precision} model", min_cosine=_MIN_COSINE[precision])
    return result


def _fused_for_gpu(fp32: Path, out: Path) -> Path:
    """The fp32 graph with attention and layer norms fused for GPU kernels, when the model's
    config.json gives the head count; else the graph as it is. (On CPU the fusion gained nothing:
    see worker/quantize.py.)"""
    config = model_config.read_json(out / "config.json")
    heads = config.get("num_attention_heads") if isinstance(config, dict) else None
    hidden = config.get("hidden_size") if isinstance(config, dict) else None
    if not (isinstance(heads, int) and isinstance(hidden, int)):
        return fp32
    fused = out / "model.fused.onnx"
    quantize.optimize_transformer(fp32, fused, num_heads=heads, hidden_size=hidden, for_gpu=True)
    return fused


def describe(path: Path, pooling: Pooling) -> tuple[tuple[str, ...], str, int]:
    """The graph's inputs, the output to read and the vector dimension, from the ONNX file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = tuple(i.name for i in session.get_inputs())
    rank = 2 if pooling is Pooling.NONE else 3
    outputs = [o for o in session.get_outputs() if len(o.shape) == rank]
    if not outputs:
        raise ModelError(
            f"{path.name} has no rank-{rank} output for pooling {pooling}; outputs:"
            f" {[(o.name, o.shape) for o in session.get_outputs()]}"
        )
    preferred = ("sentence_embedding",) if rank == 2 else ("last_hidden_state", "token_embeddings")
    output = next((o for o in outputs if o.name in preferred), outputs[0])
    dim = output.shape[-1]
    if not isinstance(dim, int):
        raise ModelError(f"{path.name} output {output.name} has a symbolic last dimension {dim!r}")
    return inputs, output.name, dim


def _verify(folder: Path, manifest: Manifest, settings: Settings) -> None:
    """Load the prepared folder as a worker would (on the CPU) and embed one text."""
    cpu = settings.model_copy(update={"providers": ["CPUExecutionProvider"]})
    vectors = Engine.load(folder, cpu).encode(["embedq verifies this model"]).vectors
    if vectors.shape != (1, manifest.dim) or not np.isfinite(vectors).all():
        raise ModelError(f"model {manifest.name} gave unusable output {vectors.shape} on a probe")


def _swap_in(ready: Path, target: Path) -> None:
    """Put ``ready`` at ``target`` with renames only; a replaced model is removed afterwards."""
    old = target.with_name(f"{_STAGING_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(ready, target)
    shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    try:
        return metadata.version("embedq")
    except metadata.PackageNotFoundError:
        return "0+unknown"
