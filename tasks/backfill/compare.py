"""A chunk of source rows compared with what the store holds of their ids: the one decision a
run (``tasks.backfill.run``) acts on and a dry run (``tasks.backfill.estimate``) counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.backfill.chunks import text_sha
from tasks.backfill.readers import Row


@dataclass
class Compared:
    """What each row of a chunk is."""

    duplicates: int = 0
    """Rows whose id was met before (earlier in the source): skipped."""
    unchanged: int = 0
    """Ids stored with the same text, failed before, or in a batch still in flight."""
    changed: list[str] = field(default_factory=list)
    """Ids stored with another text: their vectors are dropped and made again."""
    fresh: list[Row] = field(default_factory=list)
    """Rows to embed (or copy from the content cache): new and changed ids."""
    failures: dict[str, list[str]] = field(default_factory=dict)
    """Ids of rows that cannot be embedded, by reason."""

    @property
    def new(self) -> int:
        """Ids the store held nothing of (to embed, or failed as unusable)."""
        return len(self.fresh) + sum(map(len, self.failures.values())) - len(self.changed)


def compare(
    chunk: list[Row], stored: Mapping[str, str | None], known: set[str], seen: set[str]
) -> Compared:
    """Compare ``chunk`` with ``stored`` (the text sha256 of each id whose vector the store holds;
    ``None``: not recorded, taken as unchanged) and ``known`` (ids failed before or in flight).
    ``seen`` holds the ids met before whose rows were sent or failed; each such row's id is
    added to it (an unchanged id met again is unchanged again)."""
    out = Compared()
    for row in chunk:
        item = row.item_id
        if item in seen:
            out.duplicates += 1
            continue
        if item in known or (item in stored and stored[item] in (None, text_sha(row.text))):
            out.unchanged += 1
            continue
        seen.add(item)  # a repeated id later in the source is a duplicate
        if item in stored:
            out.changed.append(item)
        problem = row.problem or ("empty or whitespace-only text" if not row.text.strip() else None)
        if problem:
            out.failures.setdefault(problem, []).append(item)
        else:
            out.fresh.append(row)
    return out
