"""A backfill run again is a sync, through the real CLI, a real worker and PostgreSQL: a
5,000-row corpus embedded, then 10% of its texts edited, 5% removed and 5% added; the second run
embeds only the edited and added rows (counted from ``batch_stats``), ``--prune`` removes the
removed ones, and every id's vector is the engine's for its current text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from storage import backfills, embeddings
from storage.models import BatchStat
from storage.session import scope, sessions_for
from tests.acceptance.conftest import Fleet
from tests.commands import embedq_json, write_jsonl
from tests.conftest import cosines

ROWS = 5000


def sync(fleet: Fleet, source: Path, *flags: str) -> dict[str, Any]:
    """``embedq backfill docs --source SOURCE`` as a user runs it; its JSON summary."""
    summary: dict[str, Any] = embedq_json(
        fleet.env, "backfill", "docs", "--source", str(source), *flags
    )
    return summary


def embedded_texts(fleet: Fleet, job_id: str) -> int:
    """Texts the workers ran through the model for ``job_id``, from its batch statistics."""
    with scope(sessions_for(fleet.database_url)) as session:
        return int(
            session.scalar(
                select(func.coalesce(func.sum(BatchStat.texts), 0)).where(
                    BatchStat.job_id == job_id
                )
            )
            or 0
        )


def test_a_sync_embeds_only_edited_and_added_rows_and_prune_removes_the_rest(
    fleet: Fleet, short_texts: list[str], engine: Any, tmp_path: Path
) -> None:
    first = {f"d{i}": text for i, text in enumerate(dict.fromkeys(short_texts[: ROWS * 2]))}
    first = dict(list(first.items())[:ROWS])
    assert len(first) == ROWS
    summary = sync(fleet, write_jsonl(tmp_path / "v1.jsonl", first))
    job_id = summary["job_id"]
    assert (summary["state"], summary["done"]) == ("succeeded", ROWS)
    assert embedded_texts(fleet, job_id) == ROWS

    ids = list(first)
    edited, removed = ids[: ROWS // 10], ids[ROWS // 10 : ROWS // 10 + ROWS // 20]
    current = {item: text for item, text in first.items() if item not in set(removed)}
    for item in edited:
        current[item] = f"{first[item]} (edited)"
    added = {f"new{i}": f"{text} (new)" for i, text in enumerate(short_texts[-ROWS // 20 :])}
    current.update(added)
    second = write_jsonl(tmp_path / "v2.jsonl", current)

    summary = sync(fleet, second)
    last = summary["last_sync"]
    assert (last["unchanged"], last["new"], last["changed"]) == (
        ROWS - len(edited) - len(removed),
        len(added),
        len(edited),
    )
    assert (last["removed"], last["pruned"]) == (len(removed), False)
    assert embedded_texts(fleet, job_id) == ROWS + len(edited) + len(added)

    summary = sync(fleet, second, "--prune")
    assert (summary["last_sync"]["removed"], summary["last_sync"]["pruned"]) == (len(removed), True)
    assert (summary["state"], summary["items"], summary["done"]) == (
        "succeeded",
        len(current),
        len(current),
    )
    assert embedded_texts(fleet, job_id) == ROWS + len(edited) + len(added)  # nothing again

    with scope(sessions_for(fleet.database_url)) as session:
        assert backfills.job_of(session, "docs") == job_id
        stored = {
            e.item_id: np.frombuffer(e.vector, dtype=np.float32)
            for e in embeddings.list_embeddings(session, job_id)
        }
    assert sorted(stored) == sorted(current)
    order = sorted(current)
    wanted = [current[item] for item in order]
    expected = np.concatenate(
        [
            engine.encode(wanted[start : start + 1000]).vectors
            for start in range(0, len(wanted), 1000)
        ]
    )
    worst = float(np.min(cosines(np.stack([stored[item] for item in order]), expected)))
    print(f"sync of {ROWS} rows: min cosine to the engine's vectors of the current texts {worst}")
    assert worst >= 0.9999
