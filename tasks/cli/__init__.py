"""The ``embedq`` command line: the app, its global options, and ``main``, which ends every run.

Commands live in one module per group (``jobs``, ``backfills``, ``collections``, ``catalog``
for ``models``, ``ops``, ``serve``) and are registered here, so this file lists the whole
surface. They import
what loads onnxruntime, numpy, alembic or the Celery app inside their bodies, so ``embedq
--help`` and a usage error load none of them.

Every failure ends with one line on stderr, ``error: ...``, and an exit code a script can act
on (``main`` maps what escapes a command; ``--verbose`` adds the traceback). Secrets never
appear: URLs are shown with the password hidden, and passwords are scrubbed from driver text
(``tasks.cli.failures``).

    0   done
    1   the job (or backfill) ended with failed items; ``health`` found a problem
    2   bad input or usage: a file, a line, an option, a model name, a setting, a command
        that needs the worker extra on a client install (``pip install embedq``)
    3   a GPU cannot run the default model (``worker``)
    4   the job store, the broker or a model source cannot be reached, or refuses us: try later
    5   ``embed --timeout`` passed: the job goes on (see ``embedq job ID``)
    70  an unexpected error (a bug): its type and first line; ``--verbose`` for the traceback
    130 interrupted
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import typer

from tasks.cli import backfills, catalog, collections, jobs, ops, serve
from tasks.cli.failures import Code, command_path, ending, one_line
from worker.logs import use_json

# Locals are never shown: they hold URLs with passwords.
app = typer.Typer(
    help="Text embeddings as background jobs.",
    epilog="Exit codes: 0 done, 1 the job ended with failures, 2 bad input or usage,"
    " 4 the job store, broker or a model source cannot be reached, 5 --timeout passed (the job"
    " goes on), 70 an unexpected error (--verbose shows its traceback), 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(catalog.app, name="models")
app.add_typer(ops.db_app, name="db")
app.command("embed")(jobs.embed)
app.command("jobs")(jobs.list_jobs)
app.command("job")(jobs.job)
app.command("worker")(serve.worker)
app.command("backfill")(backfills.backfill)
app.command("collection")(collections.collection)
app.command("search")(collections.search)
app.command("export")(jobs.export)
app.command("stats")(ops.stats)
app.command("health")(ops.health)
app.command("flower")(serve.flower)
app.command("serve")(serve.serve)
app.command("encode")(jobs.encode)

_verbose = False


@app.callback()
def setup(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="debug logs, and the traceback of a failure"),
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # migrations in local mode are chatter around a command's own lines
        logging.getLogger("alembic").setLevel(logging.WARNING)
    use_json()


def main() -> None:
    """The ``embedq`` program: run the command line, and end every failure with one line on
    stderr and an exit code (see the module's table), never a traceback unless ``--verbose``."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage: an unknown command or option, a bad value
        code = exc.exit_code
        if type(exc).__name__ != "NoArgsIsHelpError":  # whose help is already printed
            ctx: typer.Context | None = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {one_line(exc.format_message())}{where}", err=True)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = Code.INTERRUPTED
    except Exception as exc:
        if _verbose:
            traceback.print_exception(exc)
        groups = [info.name for info in app.registered_groups if isinstance(info.name, str)]
        line, code = ending(exc, command_path(sys.argv[1:], groups))
        typer.echo(f"error: {line}", err=True)
    sys.exit(code if isinstance(code, int) else Code.OK)
