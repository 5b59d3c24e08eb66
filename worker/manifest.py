"""The manifest: what a prepared model is and how it must be run.

It is written last, after a model folder has been verified, so a folder without one is never
loaded. The engine trusts it alone: pooling, normalisation and length were settled when the
model was prepared, from the model's own files or from explicit choices; and it checks the ONNX
file against the manifest's sha256 each time it loads one (``verify_onnx``), since a file
damaged on disk or edited in place would otherwise load and return wrong vectors; the same for
every other file in the folder (``files``: the tokenizer and the configs), checked by
``verify``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from worker.errors import ModelCorruptError, ModelError
from worker.sources import sha256_of

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


class Pooling(StrEnum):
    """How token embeddings become one vector, as sentence-transformers' Pooling module names it."""

    CLS = "cls"
    MEAN = "mean"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len"
    LAST_TOKEN = "lasttoken"
    NONE = "none"  # the graph already outputs one vector per text


class Precision(StrEnum):
    """The arithmetic a model runs in. ``bf16`` keeps the fp32 file and asks OpenVINO to compute
    in bfloat16 on CPUs that have it (AVX512-BF16 or AMX)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    BF16 = "bf16"


class Behaviour(BaseModel):
    """How the model turns texts into vectors: truncation length, pooling, normalisation."""

    model_config = ConfigDict(frozen=True)

    max_seq_length: int = Field(ge=1)
    pooling: Pooling
    normalize: bool


class Manifest(BaseModel):
    """Everything known about one prepared model; stored as ``manifest.json`` beside it."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    revision: str | None = None
    onnx_sha256: str
    dim: int = Field(ge=1)
    behaviour: Behaviour
    precision: Precision = Precision.FP32
    inputs: tuple[str, ...]
    output: str
    created_at: datetime
    created_by: str
    """How the ONNX file was obtained: ``downloaded``, ``copied`` or ``exported``."""
    steps: tuple[str, ...] = ()
    """Post-processing applied in order, e.g. ``optimized:bert``, ``quantized:int8``."""
    validation: dict[str, float] = Field(default_factory=dict)
    """Export checks against the checkpoint (max_abs_diff, min_cosine, ...), when exported."""
    embedq_version: str = ""
    files: dict[str, str] = Field(default_factory=dict)
    """sha256 of every other file in the folder (the tokenizer, the sentence-transformers
    configs that decide pooling, normalisation and truncation, external ONNX data), by path
    relative to it; empty in a manifest written before they were recorded (``rehash``)."""

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"{folder} holds no {MANIFEST_FILE}: not a prepared model") from exc
        except ValueError as exc:
            raise ModelError(f"{path} is not a valid manifest: {exc}") from exc


def verify_onnx(folder: Path, manifest: Manifest) -> None:
    """Raise ``ModelCorruptError`` unless ``folder``'s ONNX file has the manifest's sha256.

    The whole file is hashed on every call, with no cache: on the reference model (90 MB) that
    costs about 65 ms next to 150-250 ms for the rest of ``Engine.load`` (2-core AMD EPYC), once
    per process; and a cache keyed on size, mtime and inode would miss damage that keeps all
    three, such as a bit flipped on disk, which onnxruntime loads without a word.
    """
    _check(folder / ONNX_FILE, manifest.onnx_sha256, manifest)


def verify(folder: Path, manifest: Manifest) -> None:
    """``verify_onnx``, and every other file the manifest records (``files``): a tokenizer
    whose vocabulary was shuffled loads and embeds without a word, and gave vectors with
    cosines near 0 to the right ones. Hashed on every call like the ONNX file: on the reference
    model its tokenizer and six configs (470 kB) add about 1 ms. A manifest from before the
    files were recorded is checked for its ONNX file only, with one warning naming
    ``embedq models rehash``."""
    verify_onnx(folder, manifest)
    if not manifest.files:
        logger.warning(
            "model %s: its manifest records no hash of its tokenizer and configs, so they are"
            " not checked: run `embedq models rehash %s` to record them",
            manifest.name,
            manifest.name,
            extra={"model": manifest.name, "action": "unverified_files"},
        )
    for relative, expected in manifest.files.items():
        _check(folder / relative, expected, manifest)


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of each file under ``folder`` but the manifest and the ONNX file (which has its
    own field), by relative path: the tokenizer, the configs, external ONNX data."""
    return {
        path.relative_to(folder).as_posix(): sha256_of(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST_FILE, ONNX_FILE)
    }


def rehash(folder: Path) -> Manifest:
    """Record the hashes of ``folder``'s files in a manifest written before they were recorded,
    after checking its ONNX file against it; the other files are trusted as they are now (a
    prepared model keeps no reference vectors to check them against). A manifest that already
    records them is only verified, and left as it is: a file changed since is refused, never
    recorded anew. Returns the manifest as it now stands."""
    manifest = Manifest.read(folder)
    if manifest.files:
        verify(folder, manifest)
        return manifest
    verify_onnx(folder, manifest)
    updated = manifest.model_copy(update={"files": hash_files(folder)})
    updated.write(folder)
    return updated


def _check(path: Path, expected: str, manifest: Manifest) -> None:
    again = f"pull the model again: embedq models pull {manifest.source} --name {manifest.name}"
    try:
        actual = sha256_of(path)
    except FileNotFoundError as exc:
        raise ModelCorruptError(
            f"{path} is missing: its manifest records its sha256 ({expected[:12]}...); {again}"
        ) from exc
    except OSError as exc:
        raise ModelCorruptError(f"cannot read {path} to check it: {exc}; {again}") from exc
    if actual != expected:
        raise ModelCorruptError(
            f"{path} does not match its manifest: its sha256 is {actual[:12]}..., the manifest"
            f" says {expected[:12]}...; it was damaged or changed after the model was"
            f" prepared: {again}"
        )


def dump(manifest: Manifest) -> str:
    """The manifest as indented JSON, for ``embedq models show``."""
    return json.dumps(json.loads(manifest.model_dump_json()), indent=2)
