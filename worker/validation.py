"""Checking a batch of texts before any work is done; light enough for producers to import."""

from __future__ import annotations

from collections.abc import Sequence

from worker.errors import InputError


def validate(
    texts: Sequence[object],
    max_items: int,
    limit_name: str = "the batch limit of {} (EMBEDQ_MAX_BATCH_ITEMS)",
) -> list[str]:
    """The texts as a list of str, or an ``InputError`` that says what is wrong and where;
    ``limit_name`` says which limit ``max_items`` is, for the error."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts is empty: give at least one text")
    if len(texts) > max_items:
        raise InputError(
            f"{len(texts)} texts is more than {limit_name.format(max_items)}; split the request"
        )
    not_str = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if not_str:
        kinds = sorted({type(texts[i]).__name__ for i in not_str})
        raise InputError(f"texts at {_first(not_str)} are not strings ({', '.join(kinds)})")
    blank = [i for i, t in enumerate(texts) if not str(t).strip()]
    if blank:
        raise InputError(f"texts at {_first(blank)} are empty or whitespace only")
    broken = [i for i, t in enumerate(texts) if not is_unicode(str(t))]
    if broken:
        raise InputError(
            f"texts at {_first(broken)} hold lone surrogates (half of a UTF-16 pair), which are"
            " not Unicode text: decode the source with errors='replace' or fix it"
        )
    nul = [i for i, t in enumerate(texts) if "\x00" in str(t)]
    if nul:
        raise InputError(
            f"texts at {_first(nul)} hold a NUL character (\\x00), which is not text (a"
            " binary file or a C string's end read as text?) and which PostgreSQL cannot"
            " store: remove it"
        )
    return [str(t) for t in texts]


def is_unicode(text: str) -> bool:
    """False for a str holding lone surrogates, which no tokenizer or database accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first(indices: list[int], shown: int = 5) -> str:
    head = ", ".join(str(i) for i in indices[:shown])
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return f"index {head}{more}"
