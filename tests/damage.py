"""Damage done to a copy of a prepared model, as a bad disk, an interrupted copy or a bad merge
of files would: the integrity tests and the fault tests show that each is refused at load."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path


def overwrite_middle(path: Path, size: int = 4096) -> None:
    """Replace ``size`` bytes in the middle of ``path`` with other bytes; length and header stay."""
    with path.open("r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        original = handle.read(size)
        handle.seek(-size, os.SEEK_CUR)
        handle.write(bytes(b ^ 0x5A for b in original))


def shuffle_vocabulary(tokenizer: Path) -> None:
    """Give each word piece of ``tokenizer`` (a ``tokenizer.json``) another's id: the file
    still loads, and the model reads other words."""
    data = json.loads(tokenizer.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    ids = list(vocab.values())
    random.Random(7).shuffle(ids)
    data["model"]["vocab"] = dict(zip(vocab, ids, strict=True))
    tokenizer.write_text(json.dumps(data), encoding="utf-8")
