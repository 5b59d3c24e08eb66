"""How a command ends when something fails: one line for stderr and an exit code.

The line names what failed and what to do (a file, a setting, a job store or broker that cannot
be reached, with its URL), and never shows a secret: URLs are shown with the password hidden and
every password the settings hold is scrubbed from what a driver said.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import IntEnum
from pathlib import Path

import kombu.exceptions
import pydantic
import redis.exceptions
import sqlalchemy.exc
import typer
from sqlalchemy.engine import make_url

from storage.models import FailureKind
from storage.session import redacted
from tasks import failures
from worker import extra
from worker.errors import EmbedqError
from worker.settings import get_settings


class Code(IntEnum):
    """Exit codes (the table in ``tasks.cli``'s docstring)."""

    OK = 0
    FAILED = 1
    INPUT = 2
    GPU = 3
    UNREACHABLE = 4
    TIMEOUT = 5
    BUG = 70
    INTERRUPTED = 130


def fail(exc: EmbedqError) -> typer.Exit:
    """Print ``exc``'s line and return the exit to raise: ``raise fail(exc) from exc``."""
    line, code = ending(exc)
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code=code)


def ending(exc: BaseException, command: str = "this command") -> tuple[str, int]:
    """The line (after ``error:``) and the exit code that end ``command`` (``embedq models
    pull``, for the line) failing with ``exc``."""
    if isinstance(exc, ModuleNotFoundError) and (absent := missing_extra(exc)) is not None:
        return f"{command} needs the worker extra ({absent}): {extra.INSTALL}", Code.INPUT
    if isinstance(exc, EmbedqError):  # raised on purpose: its kind says which code
        if failures.classify(exc) == FailureKind.UNAVAILABLE:  # the store, the broker, a source
            refused = _password_problem(exc)
            return refused or scrub(one_line(str(exc))), Code.UNREACHABLE
        return scrub(one_line(str(exc))), Code.INPUT
    if isinstance(exc, UnicodeDecodeError):
        return f"the input is not UTF-8 text ({bad_byte(exc)})", Code.INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return _file_problem(exc), Code.INPUT
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and _is_store_failure(exc):
        return _store_problem(exc), Code.UNREACHABLE
    broker = _broker_problem(exc)
    if broker is not None:
        return broker, Code.UNREACHABLE
    if isinstance(exc, pydantic.ValidationError) and exc.title == "Settings":
        first = exc.errors()[0]
        name = "EMBEDQ_" + "_".join(map(str, first["loc"])).upper()
        return scrub(f"setting {name} is invalid: {first['msg']}"), Code.INPUT
    return (
        f"unexpected {type(exc).__name__}: {scrub(one_line(str(exc)))}"
        " (run `embedq --verbose ...` for the traceback)",
        Code.BUG,
    )


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What is missing (``onnxruntime is not installed``) when ``exc`` is the import of a
    package of the worker extra on an install without it; ``None`` for any other module."""
    top = (exc.name or "").partition(".")[0]
    return f"{top} is not installed" if top in extra.EXTRA else None


def command_path(argv: Sequence[str], groups: Collection[str]) -> str:
    """The command that ``argv`` (without the program) runs, as typed: ``embedq worker``,
    ``embedq models pull`` (a word after one of ``groups``). Only ``-v`` comes before it."""
    words = [word for word in argv if not word.startswith("-")]
    path = words[:2] if words and words[0] in groups else words[:1]
    return " ".join(["embedq", *path])


def one_line(message: str) -> str:
    """``message``'s non-blank lines joined with ``; ``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(lines) if lines else "(no message)"


def first_line(message: object) -> str:
    """The first non-blank line of ``message``, or ``""``."""
    return next((line.strip() for line in str(message).splitlines() if line.strip()), "")


def scrub(line: str) -> str:
    """``line`` with every password the settings hold replaced by ``***``."""
    for secret in _secrets():
        line = line.replace(secret, "***")
    return line


def bad_byte(exc: UnicodeDecodeError, offset: int | None = None) -> str:
    """The byte that is not UTF-8, and where it is when ``offset`` is given."""
    byte = f"byte 0x{exc.object[exc.start]:02x}"
    return byte if offset is None else f"{byte} at offset {offset}"


def _secrets() -> list[str]:
    """Passwords the settings hold (in URLs or as secrets), longest first."""
    try:
        settings = get_settings()
    except Exception:  # invalid settings: nothing was read, so nothing to hide
        return []
    found: list[str] = []
    for value in dict(settings).values():
        if isinstance(value, pydantic.SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, str) and "://" in value and (password := _password(value)):
            found.append(password)
    return sorted({s for s in found if s}, key=len, reverse=True)


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except Exception:  # not a URL SQLAlchemy parses
        return None


def _file_problem(exc: OSError) -> str:
    path = exc.filename
    if isinstance(exc, FileNotFoundError):
        return f"{path} does not exist"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder, not a file"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of the path is not a folder"
    if isinstance(exc, PermissionError):
        return f"{path} cannot be read or written: permission denied"
    return scrub(f"{path}: {exc.strerror or first_line(exc)}")


def _is_store_failure(exc: sqlalchemy.exc.DBAPIError) -> bool:
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return True
    return type(exc.orig).__name__ == "UndefinedTable"  # PostgreSQL without the schema


def _store_problem(exc: sqlalchemy.exc.DBAPIError) -> str:
    """What an unusable job store says, with its URL (password hidden)."""
    try:
        url = get_settings().database_url
    except Exception:  # invalid settings: name no URL
        url = None
    where = "the job store" + (f" at {redacted(url)}" if url else "")
    said = scrub(first_line(exc.orig) or first_line(exc))
    if "no such table" in said or type(exc.orig).__name__ == "UndefinedTable":
        return f"{where} has no embedq schema (run `embedq db upgrade`): {said}"
    if exc.statement is not None and not exc.connection_invalidated:
        return f"{where} failed: {said}"
    if url and url.startswith("sqlite:///") and "unable to open" in said:
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            said += f" (the folder {folder} does not exist)"
    return f"{where} cannot be reached: {said}"


def _broker_problem(exc: BaseException) -> str | None:
    """What an unusable broker says, with its URL (password hidden); ``None``: not the broker."""
    if not isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.AuthenticationError
        | kombu.exceptions.OperationalError,
    ):
        return None
    try:
        where = f"the broker at {redacted(get_settings().celery_broker())}"
    except Exception:  # invalid settings: name no URL
        where = "the broker"
    said = scrub(first_line(exc)) or type(exc).__name__
    return _password_problem(exc) or f"{where} cannot be reached: {said}"


def _password_problem(exc: BaseException) -> str | None:
    """The line for a broker that refused our password (or asked for one), if it did."""
    seen: BaseException | None = exc
    for _ in range(10):  # the driver's error, wrapped by kombu and by the producer
        if seen is None or isinstance(seen, redis.exceptions.AuthenticationError):
            break
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    try:
        url = get_settings().celery_broker()
        where, password = f"the broker at {redacted(url)}", _password(url)
    except Exception:  # invalid settings: name no URL
        where, password = "the broker", None
    said = scrub(first_line(seen)) or type(seen).__name__
    return f"{where} {'refuses the password' if password else 'asks for a password'}: {said}"
