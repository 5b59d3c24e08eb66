"""A backfill source that is a query against any SQLAlchemy URL: counted, then streamed.

Rows come through a server-side cursor (``stream_results`` + ``yield_per``), so a source of any
size costs the memory of one fetch. The engine is made for the one read and disposed after it:
a source database is not the job store and shares none of its pooled connections.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

from sqlalchemy import text

from storage.session import make_engine


def count_rows(url: str, query: str) -> int:
    """How many rows ``query`` returns."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            total = connection.execute(text(f"select count(*) from ({query}) as q"))
            return int(total.scalar_one())
    finally:
        engine.dispose()


@dataclass(frozen=True)
class QueryRows:
    """A running query: its column names, and its rows as mappings, read as they are consumed."""

    columns: list[str]
    records: Iterator[Mapping[str, object]]


@contextmanager
def stream_rows(url: str, query: str, fetch: int) -> Iterator[QueryRows]:
    """Run ``query`` and hand out its rows ``fetch`` at a time from a server-side cursor, until
    the block ends."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True, yield_per=fetch).execute(
                text(query)
            )
            # A text query's row mappings are keyed by its column names.
            records = cast("Iterator[Mapping[str, object]]", iter(result.mappings()))
            yield QueryRows(list(result.keys()), records)
    finally:
        engine.dispose()
