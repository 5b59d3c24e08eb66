"""Exporting a Hugging Face checkpoint to ONNX, and proving the export matches it.

Needs the optional ``export`` extra (torch, transformers, onnx); a worker that only runs ONNX
never imports this module's dependencies. The export uses the TorchScript exporter
(``dynamo=False``) with eager attention: it gives a plain graph whose attention and layer-norm
patterns onnxruntime's transformer optimizer recognises, with dynamic batch and sequence axes.
The dummy input carries padding so no "mask is all ones" shortcut is traced into the graph.

After export the graph is checked with ``onnx.checker`` and run in onnxruntime against the
checkpoint in torch on the probe texts (long ones included); above the tolerance nothing is
installed.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from worker import parity
from worker.engine import load_tokenizer
from worker.errors import ExportError
from worker.manifest import Behaviour

logger = logging.getLogger(__name__)

OPSET = 17
MAX_ABS_DIFF = 1e-3
MIN_COSINE = 0.9999


def save_fast_tokenizer(checkpoint: Path, target: Path) -> None:
    """Write ``tokenizer.json`` for a checkpoint that ships only slow-tokenizer files (vocab.txt,
    sentencepiece): transformers converts them, as it does when it loads such a checkpoint."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ExportError(
            f"{checkpoint} has no tokenizer.json; converting its tokenizer needs transformers:"
            " pip install 'embedq[export]'"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=True)
        tokenizer.backend_tokenizer.save(str(target))
    except (OSError, ValueError, AttributeError) as exc:
        raise ExportError(f"cannot build a fast tokenizer for {checkpoint}: {exc}") from exc


def export_checkpoint(
    checkpoint: Path, target: Path, tokenizer_file: Path, behaviour: Behaviour
) -> dict[str, float]:
    """Export ``checkpoint`` to ``target`` and return how closely it matches torch, comparing
    on texts tokenised with ``tokenizer_file``."""
    try:
        import onnx
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise ExportError(
            f"exporting a checkpoint needs torch, transformers and onnx ({exc.name} is missing):"
            " pip install 'embedq[export]'"
        ) from exc
    try:
        model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    except (OSError, ValueError) as exc:
        raise ExportError(f"{checkpoint} is not a loadable transformers checkpoint: {exc}") from exc
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> Any:
            return self.inner(**dict(zip(names, args, strict=True))).last_hidden_state

    wrapper = Wrapper(model).eval()  # eval() again: export restores the wrapper's mode
    dummy = torch.full((2, 8), 1000, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    by_name = {
        "input_ids": dummy,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(dummy),
    }
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every data-dependent branch it freezes; the padded dummy input
            # and the comparison below are what guard against that, not the warnings.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                tuple(by_name[n] for n in names),
                str(target),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        onnx.checker.check_model(str(target))
    except Exception as exc:  # the exporter and checker raise many unrelated types
        raise ExportError(f"exporting {checkpoint} to ONNX failed: {exc}") from exc

    tokenizer = load_tokenizer(tokenizer_file, behaviour.max_seq_length)

    def reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            args = tuple(torch.from_numpy(feeds[n]) for n in names)
            return np.asarray(wrapper(*args).numpy())

    result = parity.measure(target, reference, tokenizer, names, behaviour)
    parity.require(
        result, f"the ONNX export of {checkpoint}", min_cosine=MIN_COSINE, max_abs=MAX_ABS_DIFF
    )
    return result.as_dict()
