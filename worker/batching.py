"""Cutting a request into padded micro-batches.

Padding is wasted work: a batch of one 256-token text and 31 short ones costs as much as 32 long
ones. So texts are sorted by token length (longest first, as sentence-transformers does), and a
micro-batch closes when it reaches either a count or a padded-token budget (rows x longest row,
the cost a padded backend really pays, as TEI charges it). The caller restores input order.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan(lengths: Sequence[int], *, max_items: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches, longest texts first.

    Each group holds at most ``max_items`` indices, and ``len(group) * longest`` stays within
    ``max_tokens`` unless a single text alone exceeds it (it then runs by itself).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        width = max(longest, lengths[index])
        if current and (len(current) >= max_items or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current, width = [], lengths[index]
        current.append(index)
        longest = width
    if current:
        batches.append(current)
    return batches
