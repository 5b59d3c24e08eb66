"""Timing reports from ``batch_stats``: per model, worker and provider, the throughput, padding
waste and latency percentiles of each stage, and how long batches waited in the queue."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from storage import batch_stats
from storage.session import scope, sessions_for
from worker.errors import InputError

STAGES = ("queue_wait_ms", "tokenize_ms", "inference_ms", "pool_ms", "write_ms", "total_ms")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``7d`` as a duration."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise InputError(f"--since wants a number and a unit (s, m, h, d), not {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Group:
    model: str
    host: str
    pid: int
    provider: str
    precision: str


def report(
    database_url: str,
    since: timedelta | None = None,
    model: str | None = None,
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, worker host and pid, provider, precision) over the matching
    batches."""
    # host, pid, provider, precision, texts, tokens, padded_tokens; the stages; when stored
    fields = (*batch_stats.FIELDS[:7], *STAGES, "created_at")
    after = None if since is None else datetime.now(UTC) - since
    groups: dict[Group, list[tuple[float, ...]]] = defaultdict(list)
    ends: dict[Group, list[datetime]] = defaultdict(list)
    with scope(sessions_for(database_url)) as session:
        for row in batch_stats.list_batch_stats(
            session, fields, after=after, model=model, job_id=job_id
        ):
            groups[Group(row[0], row[1], row[2], row[3], row[4])].append(tuple(row[5:-1]))
            ends[Group(row[0], row[1], row[2], row[3], row[4])].append(row[-1])
    return [
        {**_summarise(group, rows), "engine_busy_ratio": round(_busy(rows, ends[group]), 3)}
        for group, rows in sorted(groups.items(), key=_order)
    ]


def _busy(rows: list[tuple[float, ...]], stamped: list[datetime]) -> float:
    """The share of the worker's active span in the report (from its first batch's engine start
    to its last batch's end) that its engine was busy: ``storage.batch_stats.EngineBusy``."""
    at = {stage: 3 + i for i, stage in enumerate(STAGES)}
    intervals = [
        batch_stats.engine_interval(
            when,
            row[at["tokenize_ms"]] + row[at["inference_ms"]] + row[at["pool_ms"]],
            row[at["write_ms"]],
        )
        for row, when in zip(rows, stamped, strict=True)
    ]
    start = min(low for low, _ in intervals)
    end = max(
        high + row[at["write_ms"]] / 1000 for (_, high), row in zip(intervals, rows, strict=True)
    )
    return batch_stats.EngineBusy(
        "", 0, len(rows), batch_stats.busy_seconds(intervals, start, end), end - start
    ).ratio


def _order(item: tuple[Group, list[tuple[float, ...]]]) -> tuple[str, str, int]:
    group = item[0]
    return (group.model, group.host, group.pid)


def _summarise(group: Group, rows: list[tuple[float, ...]]) -> dict[str, Any]:
    values = np.array(rows, dtype=np.float64)
    texts, tokens, padded = values[:, 0].sum(), values[:, 1].sum(), values[:, 2].sum()
    busy_s = values[:, 3 + STAGES.index("total_ms")].sum() / 1000
    stages = {
        stage.removesuffix("_ms"): {
            f"p{q}": round(float(np.percentile(values[:, 3 + i], q)), 2) for q in (50, 95, 99)
        }
        for i, stage in enumerate(STAGES)
    }
    return {
        "model": group.model,
        "host": group.host,
        "pid": group.pid,
        "provider": group.provider,
        "precision": group.precision,
        "batches": len(rows),
        "texts": int(texts),
        "tokens": int(tokens),
        "texts_per_s": round(texts / busy_s, 1) if busy_s else None,
        "tokens_per_s": round(tokens / busy_s, 1) if busy_s else None,
        "padding_waste_pct": round(100 * (1 - tokens / padded), 1) if padded else 0.0,
        "ms": stages,
    }


def render(rows: list[dict[str, Any]]) -> str:
    """The report as a plain-text table (rates are per second of batch time)."""
    if not rows:
        return "no batches match"
    lines = []
    for row in rows:
        lines.append(
            f"{row['model']}  {row['host']}:{row['pid']}  {row['provider']} {row['precision']}"
            f"  {row['batches']}"
            f" batches, {row['texts']} texts, {row['texts_per_s']} texts/s,"
            f" {row['tokens_per_s']} tokens/s, padding waste {row['padding_waste_pct']}%,"
            f" engine busy {row['engine_busy_ratio']:.0%}"
        )
        lines.append(f"  {'ms':<12}{'p50':>10}{'p95':>10}{'p99':>10}")
        for stage, cut in row["ms"].items():
            lines.append(f"  {stage:<12}{cut['p50']:>10}{cut['p95']:>10}{cut['p99']:>10}")
    return "\n".join(lines)


def plot(
    database_url: str,
    out: Path,
    since: timedelta | None = None,
    model: str | None = None,
    job_id: str | None = None,
    buckets: int = 40,
) -> int:
    """Draw texts/s and batch latency (p50, p95) over time into ``out`` (a PNG); returns the
    number of batches drawn. Needs matplotlib (``pip install 'embedq[plot]'``)."""
    try:  # matplotlib is an optional extra, and slow to import: only when a plot is asked for
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("plotting needs matplotlib: pip install 'embedq[plot]'") from exc
    fields = ("created_at", "texts", "total_ms")
    after = None if since is None else datetime.now(UTC) - since
    with scope(sessions_for(database_url)) as session:
        rows: list[tuple[datetime, int, float]] = [
            (row[1], row[2], row[3])
            for row in batch_stats.list_batch_stats(
                session, fields, after=after, model=model, job_id=job_id
            )
        ]
    if not rows:
        raise InputError("no batches match: nothing to plot")
    start = rows[0][0]
    seconds = np.array([(r[0] - start).total_seconds() for r in rows])
    texts = np.array([r[1] for r in rows], dtype=np.float64)
    latency = np.array([r[2] for r in rows], dtype=np.float64)
    buckets = max(1, min(buckets, len(rows) // 5))  # about 5 batches per point at least
    edges = np.linspace(0, max(seconds.max(), 1e-3), buckets + 1)
    width = edges[1] - edges[0]
    which = np.clip(np.digitize(seconds, edges) - 1, 0, buckets - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    rate = np.array([texts[which == b].sum() / width for b in range(buckets)])
    p50 = np.array(
        [
            np.percentile(latency[which == b], 50) if (which == b).any() else np.nan
            for b in range(buckets)
        ]
    )
    p95 = np.array(
        [
            np.percentile(latency[which == b], 95) if (which == b).any() else np.nan
            for b in range(buckets)
        ]
    )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(centres, rate, color="tab:blue")
    top.set_ylabel("texts/s")
    top.set_title(f"embedq: {len(rows)} batches from {start:%Y-%m-%d %H:%M:%S}")
    seen = ~np.isnan(p50)
    bottom.plot(centres[seen], p50[seen], "o-", label="p50", color="tab:green")
    bottom.plot(centres[seen], p95[seen], "o-", label="p95", color="tab:red")
    bottom.set_ylabel("batch ms")
    bottom.set_xlabel("seconds since the first batch")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return len(rows)
