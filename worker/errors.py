"""Errors raised by the inference core, classed by what the caller should do.

Permanent errors (bad input, unknown or broken model, a provider that was required but is
missing) fail the job now with a readable reason. Transient errors (a source that could not be
reached) are worth retrying with backoff.
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base class of every error embedq raises on purpose."""


class TransientError(EmbedqError):
    """Raised when an operation failed for a reason that may go away: retry it later."""


class InputError(EmbedqError):
    """Raised when the texts handed to the engine cannot be embedded (empty, not text, too many)."""


class TextsRefusedError(InputError):
    """Raised when the model reads nothing in some of the texts: its tokenizer leaves none of
    their own tokens (only characters it removes, such as zero-width or control characters, or
    accents an uncased model strips). ``indices`` names those texts, so a caller can still
    embed the others; ``reason`` says why, for each of them."""

    def __init__(self, indices: tuple[int, ...], reason: str) -> None:
        shown = ", ".join(map(str, indices[:5])) + (
            f" and {len(indices) - 5} more" if len(indices) > 5 else ""
        )
        super().__init__(f"texts at index {shown}: {reason}")
        self.indices = indices
        self.reason = reason


class ModelError(EmbedqError):
    """Raised when a model cannot be prepared or loaded; retrying the same request will not help."""


class ModelNotFoundError(ModelError):
    """Raised when a model name is not in the model store."""


class ModelConfigError(ModelError):
    """Raised when a model's pooling, normalisation or length cannot be derived from its files."""


class ChecksumMismatchError(ModelError):
    """Raised when a downloaded file does not have the sha256 the caller asked for."""


class ExportError(ModelError):
    """Raised when a checkpoint cannot be exported to ONNX, or the export does not match it."""


class ModelCorruptError(ModelError):
    """Raised when a prepared model's file no longer matches the sha256 its manifest records:
    it was damaged or changed after it was prepared, and must be pulled again."""


class UnavailableError(TransientError):
    """Raised when the broker or the job store cannot be reached; the same call may work later."""


class SourceUnavailableError(TransientError):
    """Raised when a model source (hub, URL) could not be reached or failed on its side."""


class ProviderError(EmbedqError):
    """Raised when a requested execution provider is not usable and falling back is not allowed."""
