"""What the command line reads, with errors that name the file, the line or the source.

``read_texts`` reads the small JSON Lines files of ``embed -f`` and ``encode -f`` whole and
strictly: the first bad line stops the command, named by its line number (blank lines counted)
and, for bytes that are not UTF-8, their offset. It stays beside the backfill's reader
(``tasks.backfill.readers.JsonLines``) rather than on top of it because that reader streams
rows, keeps a bad row as a failed item instead of stopping, numbers rows without the blank
lines, needs an id per object, and does not strip a byte-order mark: the messages these
commands promise cannot be rebuilt from its rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy.exc

from storage.session import redacted
from tasks.backfill.readers import Reader, Row
from tasks.cli.failures import bad_byte, first_line, scrub
from worker.errors import InputError, UnavailableError


def read_texts(path: Path) -> list[str]:
    """Texts from JSON Lines in UTF-8: each line a JSON string or an object with a ``text``
    field. A bad line raises ``InputError`` naming the file and the line."""
    texts: list[str] = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is fine
            except UnicodeDecodeError as exc:
                where = bad_byte(exc, offset + len(raw) - len(exc.object) + exc.start)
                raise InputError(f"{path}:{number} is not UTF-8 text ({where})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{number} is not JSON: {exc}") from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise InputError(f'{path}:{number} is neither a JSON string nor {{"text": ...}}')
            texts.append(item)
    if not texts:
        raise InputError(f"{path} holds no texts")
    return texts


@dataclass(frozen=True)
class NamedSource:
    """A backfill source whose failures name it, not the job store: undecodable bytes, or a
    SQL source that cannot be reached or whose query fails."""

    reader: Reader
    source: str

    @property
    def description(self) -> str:
        return str(self.reader.description)

    def count(self) -> int | None:
        with self._named():
            return self.reader.count()

    def rows(self) -> Iterator[Row]:
        with self._named():
            yield from self.reader.rows()

    @contextmanager
    def _named(self) -> Iterator[None]:
        try:
            yield
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.source} is not UTF-8 text ({bad_byte(exc)})") from exc
        except sqlalchemy.exc.DBAPIError as exc:
            where = f"the source at {redacted(self.source)}"
            said = scrub(first_line(exc.orig) or first_line(exc))
            if exc.statement is None or exc.connection_invalidated:
                raise UnavailableError(f"{where} cannot be reached: {said}") from exc
            raise InputError(f"the query on {where} fails: {said}") from exc
