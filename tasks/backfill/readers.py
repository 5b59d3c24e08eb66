"""Backfill sources, read as a stream of rows: JSON Lines, CSV, a SQL query, Parquet.

Nothing here holds a whole source in memory: files are read line by line, SQL with a
server-side cursor (``stream_results`` + ``yield_per``), Parquet by record batch. A row that
cannot be used (no id, no text, not JSON) is still yielded, with the problem, so the backfill
records it as a failed item with its reason instead of stopping or skipping it silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from storage import session, sql_source
from tasks.message import check_name
from worker.errors import InputError
from worker.validation import is_unicode

SQL_FETCH = 1000


@dataclass(frozen=True)
class Row:
    """One source row: its position in the source, its id, its text, or what is wrong with it."""

    position: int
    item_id: str
    text: str
    problem: str | None = None


class Reader(Protocol):
    @property
    def description(self) -> str: ...

    def count(self) -> int | None: ...

    def rows(self) -> Iterator[Row]: ...


def _row(position: int, record: Mapping[str, object], id_field: str, text_field: str) -> Row:
    raw_id = record.get(id_field)
    text = record.get(text_field)
    if raw_id is None:
        return Row(position, f"#{position}", "", f"row {position} has no {id_field!r}")
    try:  # an id the store cannot hold is recorded under the row's position instead
        item_id = check_name(str(raw_id), f"row {position}: id")
    except InputError as exc:
        return Row(position, f"#{position}", "", str(exc))
    if not isinstance(text, str):
        what = "no" if text is None else f"a non-text ({type(text).__name__})"
        return Row(position, item_id, "", f"row {position} has {what} {text_field!r}")
    if not is_unicode(text):
        return Row(
            position,
            item_id,
            "",
            f"row {position} has text that is not valid Unicode (bytes that are not UTF-8, or"
            " a lone surrogate)",
        )
    return Row(position, item_id, text)


@dataclass
class JsonLines:
    """Objects with an id and a text field; a line that is a bare JSON string gets its line
    number as its id."""

    path: Path
    id_field: str = "id"
    text_field: str = "text"

    @property
    def description(self) -> str:
        return f"{self.path} (JSON Lines)"

    def count(self) -> int | None:
        with self.path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())

    def rows(self) -> Iterator[Row]:
        # Bytes that are not UTF-8 become lone surrogates, which _row fails for that row alone.
        with self.path.open(encoding="utf-8", errors="surrogateescape") as handle:
            position = 0
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    yield Row(position, f"#{position}", "", f"row {position} is not JSON: {exc}")
                else:
                    if isinstance(record, str):
                        yield _row(position, {"id": position, "text": record}, "id", "text")
                    elif isinstance(record, dict):
                        yield _row(position, record, self.id_field, self.text_field)
                    else:
                        yield Row(position, f"#{position}", "", f"row {position} is not an object")
                position += 1


@dataclass
class Csv:
    path: Path
    id_field: str = "id"
    text_field: str = "text"

    @property
    def description(self) -> str:
        return f"{self.path} (CSV)"

    def _reader(self, handle: IO[str]) -> csv.DictReader[str]:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (self.id_field, self.text_field) if c not in columns]
        if missing:
            raise InputError(f"{self.path} has no column {missing}; its columns: {columns}")
        return reader

    def count(self) -> int | None:
        with self.path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
            return sum(1 for _ in self._reader(handle))

    def rows(self) -> Iterator[Row]:
        with self.path.open(encoding="utf-8", errors="surrogateescape", newline="") as handle:
            for position, record in enumerate(self._reader(handle)):
                yield _row(position, record, self.id_field, self.text_field)


@dataclass
class Sql:
    """A query against any SQLAlchemy URL; the id and text are the named columns, or the first
    and second."""

    url: str
    query: str
    id_field: str | None = None
    text_field: str | None = None

    @property
    def description(self) -> str:
        return f"{session.redacted(self.url)}: {self.query}"

    def count(self) -> int | None:
        return sql_source.count_rows(self.url, self.query)

    def rows(self) -> Iterator[Row]:
        with sql_source.stream_rows(self.url, self.query, SQL_FETCH) as result:
            columns = result.columns
            id_field = self.id_field or columns[0]
            text_field = self.text_field or columns[min(1, len(columns) - 1)]
            for field in (id_field, text_field):
                if field not in columns:
                    raise InputError(f"the query returns no column {field!r}: {columns}")
            for position, record in enumerate(result.records):
                yield _row(position, record, id_field, text_field)


@dataclass
class Parquet:
    path: Path
    id_field: str = "id"
    text_field: str = "text"

    @property
    def description(self) -> str:
        return f"{self.path} (Parquet)"

    def _file(self) -> Any:  # a pyarrow.parquet.ParquetFile (pyarrow has no type hints)
        try:  # pyarrow is an optional extra, imported when a Parquet source is read
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise InputError(
                "reading Parquet needs pyarrow: pip install 'embedq[parquet]'"
            ) from exc
        return pq.ParquetFile(self.path)

    def count(self) -> int | None:
        return int(self._file().metadata.num_rows)

    def rows(self) -> Iterator[Row]:
        position = 0
        columns = [self.id_field, self.text_field]
        for batch in self._file().iter_batches(batch_size=SQL_FETCH, columns=columns):
            for record in batch.to_pylist():
                yield _row(position, record, self.id_field, self.text_field)
                position += 1


def open_source(
    source: str,
    *,
    id_field: str | None = None,
    text_field: str | None = None,
    sql: str | None = None,
) -> Reader:
    """The reader for ``source``: a SQLAlchemy URL when ``sql`` is given, else a file whose
    suffix says its format (.jsonl/.ndjson/.json, .csv, .parquet)."""
    if sql is not None:
        return Sql(source, sql, id_field, text_field)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"backfill source {source!r} is not a file (for SQL, pass --sql)")
    fields = {"id_field": id_field or "id", "text_field": text_field or "text"}
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return JsonLines(path, **fields)
    if suffix == ".csv":
        return Csv(path, **fields)
    if suffix == ".parquet":
        return Parquet(path, **fields)
    raise InputError(f"cannot tell the format of {source!r}: use .jsonl, .csv or .parquet")
