"""Every way the ``embedq`` command fails ends with one line on stderr, ``error: ...``, and an exit
code (2 bad input, 4 store or broker out of reach, 5 timed out, 1 a job that failed), never a
traceback and never a password. Each case runs the command in this process (``tests.cli``)
against real files, a real refused port, and a private Redis that wants a password; the
entry point and ``python -m tasks.cli`` themselves are run in tests/acceptance."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage import ledger, stalled
from storage.session import scope, sessions_for
from tests.cli import Cli, Result
from tests.cli import assert_ends_with_one_error as ends_with_one_error
from tests.conftest import require
from tests.databases import Databases
from tests.processes import PrivateRedis, free_port
from tests.waiting import wait_until

PASSWORD = "s3cr3t-pw"  # the private Redis's
WRONG = "wr0ng-pw-42"
PG_PASSWORD = "hunter2-pg"
SECRETS = (PASSWORD, WRONG, PG_PASSWORD)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Redis of this module's own on a free port, with ``--requirepass``; stopped after."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"), password=PASSWORD)
    server.start()
    yield server.port
    server.kill()


def assert_ends_with_one_error(
    result: Result, code: int, says: str, before: str | None = None
) -> str:
    """``tests.cli.assert_ends_with_one_error``, with this module's passwords as the secrets."""
    return ends_with_one_error(result, code, says, before, SECRETS)


@dataclass(frozen=True)
class Case:
    """One bad input: the command, the exit code, a fragment of the error line, extra settings,
    and the notices allowed before that line. Filled in: ``{tmp}`` (the test's folder),
    ``{free}`` (a port nothing listens on), ``{redis}`` (the private Redis's port) and
    ``{source}`` (a PostgreSQL URL with a password on the free port)."""

    args: tuple[str, ...]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    before: str | None = None
    schema: bool = False  # create the store's schema first (with a broker, submit does not)


NO_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
SUBMITTED = r"job \S+ submitted: \d+ texts$"
BROKER_UP = {"EMBEDQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{{redis}}/9"}

CASES = {
    # input files
    "bad utf-8": Case(
        ("embed", "-f", "{tmp}/latin1.jsonl", "--model", "m"),
        2,
        "latin1.jsonl:2 is not UTF-8 text (byte 0xe9 at offset 11)",
    ),
    "bad utf-8 after a BOM": Case(
        ("encode", "--model", "m", "-f", "{tmp}/bom.jsonl"),
        2,
        "bom.jsonl:2 is not UTF-8 text (byte 0xff at offset 10)",
    ),
    "missing file": Case(
        ("embed", "-f", "{tmp}/nowhere.jsonl", "--model", "m"), 2, "nowhere.jsonl does not exist"
    ),
    "folder as file": Case(
        ("encode", "--model", "m", "-f", "{tmp}/folder"), 2, "folder is a folder, not a file"
    ),
    "unreadable file": pytest.param(
        Case(("embed", "-f", "{tmp}/locked.jsonl", "--model", "m"), 2, "permission denied"),
        marks=NO_ROOT,
    ),
    "empty file": Case(
        ("embed", "-f", "{tmp}/empty.jsonl", "--model", "m"), 2, "empty.jsonl holds no texts"
    ),
    "blank lines only": Case(
        ("embed", "-f", "{tmp}/blank.jsonl", "--model", "m"), 2, "blank.jsonl holds no texts"
    ),
    "a line that is not JSON": Case(
        ("embed", "-f", "{tmp}/notjson.jsonl", "--model", "m"), 2, "notjson.jsonl:2 is not JSON"
    ),
    "a line neither string nor {text}": Case(
        ("embed", "-f", "{tmp}/list.jsonl", "--model", "m"),
        2,
        'list.jsonl:3 is neither a JSON string nor {{"text": ...}}',
    ),
    "backfill source that is not a file": Case(
        ("backfill", "b1", "--source", "{tmp}/nowhere.csv", "--model", "m"), 2, "is not a file"
    ),
    "backfill query that fails": Case(
        ("backfill", "b2", "--source", "sqlite:///{tmp}/source.db", "--sql", "select * from t"),
        2,
        "the query on the source at sqlite:///{tmp}/source.db fails: no such table: t",
        {"EMBEDQ_DEFAULT_MODEL": "m"},
    ),
    "backfill from an unreachable database": Case(
        ("backfill", "b3", "--sql", "select 1, 'a'", "--model", "m", "--source", "{source}"),
        4,
        "the source at postgresql+psycopg://reader:***@127.0.0.1:{free}/x cannot be reached",
    ),
    # arguments and settings
    "blank text argument": Case(("embed", "   ", "--model", "m"), 2, "empty or whitespace"),
    "unknown --queue": Case(
        ("embed", "text", "--queue", "urgent"), 2, "Invalid value for '--queue'"
    ),
    "negative --timeout": Case(
        ("embed", "text", "--timeout", "-1"), 2, "Invalid value for '--timeout'"
    ),
    "unknown command": Case(("embedd", "text"), 2, "No such command 'embedd'"),
    "missing argument": Case(("models", "pull"), 2, "Missing argument"),
    "invalid setting": Case(
        ("jobs",), 2, "setting EMBEDQ_STUCK_AFTER is invalid", {"EMBEDQ_STUCK_AFTER": "soon"}
    ),
    "unknown job id": Case(
        ("job", "no-such-job"), 2, "job no-such-job is not in the store", schema=True
    ),
    "unprepared model shown": Case(("models", "show", "nope"), 2, "model 'nope' is not prepared"),
    "flower without credentials": Case(("flower",), 2, "set EMBEDQ_FLOWER_USER"),
    # the job store
    "unreachable PostgreSQL": Case(
        ("jobs",),
        4,
        "the job store at postgresql+psycopg://postgres:***@127.0.0.1:{free}/x cannot be reached:",
        {
            "EMBEDQ_DATABASE_URL": f"postgresql+psycopg://postgres:{PG_PASSWORD}@127.0.0.1:{{free}}/x"
        },
    ),
    "unreachable PostgreSQL in local mode": Case(
        ("embed", "text", "--model", "m"),
        4,
        "Connection refused",
        {
            "EMBEDQ_DATABASE_URL": f"postgresql+psycopg://postgres:{PG_PASSWORD}@127.0.0.1:{{free}}/x"
        },
    ),
    "missing SQLite folder": Case(
        ("jobs",),
        4,
        "cannot be reached: unable to open database file (the folder {tmp}/gone does not exist)",
        {"EMBEDQ_DATABASE_URL": "sqlite:///{tmp}/gone/embedq.db"},
    ),
    "SQLite store without the schema": Case(
        ("jobs",), 4, "has no embedq schema (run `embedq db upgrade`)"
    ),
    # the broker
    "wrong Redis password at submit": Case(
        ("embed", "text", "--model", "m"),
        4,
        "the broker at redis://:***@127.0.0.1:{redis}/9 refuses the password",
        {"EMBEDQ_BROKER_URL": f"redis://:{WRONG}@127.0.0.1:{{redis}}/9"},
        schema=True,
    ),
    "no Redis password at submit": Case(
        ("embed", "text", "--model", "m"),
        4,
        "the broker at redis://127.0.0.1:{redis}/9 asks for a password",
        {"EMBEDQ_BROKER_URL": "redis://127.0.0.1:{redis}/9"},
        schema=True,
    ),
    "unreachable Redis at submit": Case(
        ("embed", "text", "--model", "m"),
        4,
        "the broker at redis://:***@127.0.0.1:{free}/9 cannot be reached",
        {"EMBEDQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{{free}}/9"},
        schema=True,
    ),
    "wrong Redis password at health": Case(
        ("health", "--timeout", "0.3"),
        4,
        "refuses the password",
        {"EMBEDQ_BROKER_URL": f"redis://:{WRONG}@127.0.0.1:{{redis}}/9"},
        schema=True,
    ),
    # endings of a job
    "--timeout reached": Case(
        ("embed", "text", "--model", "m", "--timeout", "0.5"),
        5,
        "not finished after 0.5s",
        BROKER_UP,
        before=SUBMITTED,
        schema=True,
    ),
    "unknown model in local mode": Case(
        ("embed", "text", "--model", "no-such-model"),
        1,
        "failed: 0 done, 1 failed (model no-such-model:",
        before=r"(WARNING|INFO) ",  # the in-process worker's log of the failed batch
    ),
}


def write_inputs(tmp: Path) -> None:
    (tmp / "latin1.jsonl").write_bytes(b'"fine"\n"caf\xe9"\n')
    (tmp / "bom.jsonl").write_bytes(b'\xef\xbb\xbf"ok"\n"a\xff"\n')
    (tmp / "folder").mkdir()
    (tmp / "locked.jsonl").write_text('"text"\n')
    (tmp / "locked.jsonl").chmod(0)
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n\n")
    (tmp / "notjson.jsonl").write_text('"fine"\n{"text": oops}\n')
    (tmp / "list.jsonl").write_text('"fine"\n{"text": "also fine"}\n["a", "list"]\n')
    (tmp / "store").mkdir()


def settings_for(tmp: Path) -> dict[str, str]:
    return {
        "EMBEDQ_MODEL_DIR": str(tmp / "models"),
        "EMBEDQ_DATABASE_URL": f"sqlite:///{tmp / 'store' / 'embedq.db'}",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }


def migrated_store(databases: Databases, tmp: Path) -> str:
    """The store ``settings_for(tmp)`` names, with the schema (as `embedq db upgrade` makes)."""
    url = databases.sqlite(tmp / "store", "embedq.db")
    assert url == settings_for(tmp)["EMBEDQ_DATABASE_URL"]
    return url


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_failure_ends_with_one_error_line_and_its_exit_code(
    case: Case, cli: Cli, databases: Databases, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    write_inputs(tmp_path)
    needs_redis = any("{redis}" in v for v in case.env.values())
    free = free_port()
    fill = {
        "tmp": str(tmp_path),
        "free": str(free),
        "redis": str(request.getfixturevalue("private_redis")) if needs_redis else "",
        "source": f"postgresql+psycopg://reader:{PG_PASSWORD}@127.0.0.1:{free}/x",
    }
    env = settings_for(tmp_path) | {k: v.format(**fill) for k, v in case.env.items()}
    if case.schema:
        migrated_store(databases, tmp_path)
    result = cli(*(arg.format(**fill) for arg in case.args), env=env)
    assert_ends_with_one_error(result, case.code, case.says.format(**fill), case.before)


def test_verbose_adds_the_traceback_before_the_same_line(cli: Cli, tmp_path: Path) -> None:
    env = settings_for(tmp_path) | {"EMBEDQ_DATABASE_URL": f"sqlite:///{tmp_path}/gone/x.db"}
    result = cli("--verbose", "jobs", env=env)
    assert result.code == 4, result.shown()
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: the job store at sqlite:///")
    plain = cli("jobs", env=env)  # the same failure without --verbose: the line alone
    assert plain.code == 4 and "Traceback" not in plain.stderr, plain.shown()
    assert plain.stderr.splitlines() == result.stderr.splitlines()[-1:]


def test_after_a_timeout_job_and_health_say_what_is_pending(
    cli: Cli, databases: Databases, private_redis: int, tmp_path: Path
) -> None:
    url = migrated_store(databases, tmp_path)
    env = settings_for(tmp_path) | {
        "EMBEDQ_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{private_redis}/9",
        "EMBEDQ_JOB_BATCH_SIZE": "1",
    }
    texts = [f"text {i:02}" for i in range(12)]
    waited = cli("embed", *texts, "--model", "m", "--timeout", "0.5", env=env)
    line = assert_ends_with_one_error(waited, 5, "(the job goes on; see `embedq job ", SUBMITTED)
    found = re.search(r"see `embedq job (\S+)`", line)
    assert found is not None, line
    job_id = found[1]
    with scope(sessions_for(url)) as session:
        for index in range(12):  # in order: batch 0 is left the oldest
            ledger.note_error(session, job_id, index, f"try {index} failed\nsecond line")

    def all_overdue() -> bool:  # 10 ms with no progress, as the store's own clock sees it
        with scope(sessions_for(url)) as session:
            return stalled.count_overdue(session, 0.01, job_id=job_id) == 12

    wait_until(all_overdue, 5, "the 12 batches to be overdue")
    overdue_now = env | {"EMBEDQ_STUCK_AFTER": "0.01"}
    shown = cli("job", job_id, env=overdue_now)
    assert shown.code == 0, shown.shown()
    assert "batches: 12 sent" in shown.stdout, shown.stdout
    overdue = re.findall(
        r"^overdue: batch (\d+) \(1 items, no progress for \d+s, attempts 0, sends 1,"
        r" last error: try (\d+) failed; second line\)$",
        shown.stdout,
        re.MULTILINE,
    )
    assert overdue == [(str(i), str(i)) for i in range(10)], shown.stdout
    assert "\nand 2 more\n" in shown.stdout, shown.stdout
    assert "EMBEDQ_SWEEP_INTERVAL" in shown.stdout and "`embedq health` fails" in shown.stdout

    health = cli("health", "--timeout", "0.3", env=overdue_now)  # no worker: none answers
    assert_ends_with_one_error(
        health, 1, "the fleet is not healthy: no worker consumes interactive; 12 batches overdue"
    )


def test_a_failed_backfill_ends_with_an_error_line_and_counts_duplicate_ids(
    cli: Cli, tmp_path: Path
) -> None:
    source = tmp_path / "rows.jsonl"
    rows = [("a", "one"), ("b", "two"), ("a", "again"), ("b", "again")]
    source.write_text("".join(f'{{"id": "{i}", "text": "{t}"}}\n' for i, t in rows))
    (tmp_path / "store").mkdir()
    args = ("backfill", "dups", "--source", str(source), "--model", "missing")
    result = cli(*args, env=settings_for(tmp_path))
    assert "skipped 2 duplicate ids" in result.stdout, result.stdout
    assert_ends_with_one_error(
        result, 1, "backfill dups ended failed: 0 done, 2 failed of 2 items", r"(WARNING|INFO) "
    )
