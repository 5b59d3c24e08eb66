"""``embedq collection`` and ``embedq search``: a backfill's collection, its versions, which one
readers get, and its nearest ids to a query."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer

from storage import collections
from storage.session import scope, sessions_for
from tasks.cli import present
from tasks.cli.failures import fail
from worker.errors import EmbedqError, InputError
from worker.settings import get_settings


class Action(StrEnum):
    use = "use"
    drop = "drop"


def collection(
    name: Annotated[str, typer.Argument(help="the collection (the backfill's name)")],
    action: Annotated[
        Action | None,
        typer.Argument(help="use: readers get VERSION from now on; drop: delete VERSION"),
    ] = None,
    version: Annotated[int | None, typer.Argument(min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the versions as JSON")] = False,
) -> None:
    """List a collection's versions (* marks the one readers get), switch readers to another
    version at once (use), or delete one that readers no longer get (drop)."""
    from tasks import backfill

    settings = get_settings()
    try:
        if action is not None:
            if version is None:
                raise InputError(f"`{action}` needs a VERSION: embedq collection {name} {action} N")
            with scope(sessions_for(settings.database_url)) as session:
                try:
                    if action is Action.use:
                        collections.use_version(session, name, version)
                    else:
                        collections.drop_version(session, name, version)
                except collections.CollectionError as exc:
                    raise InputError(str(exc)) from exc
            done = "readers now get" if action is Action.use else "dropped"
            typer.echo(f"collection {name}: {done} version {version}", err=True)
        outcome = backfill.summary(settings.database_url, name)
    except EmbedqError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps([v.__dict__ for v in outcome.versions], indent=2))
    else:
        present.versions(outcome)


def search(
    name: Annotated[str, typer.Argument(help="the collection (the backfill's name)")],
    query: Annotated[str, typer.Argument(help="the text to search for")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="how many ids")] = 10,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the query's vector")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
) -> None:
    """The ids of a collection's current version nearest a query (cosine), best first: the query
    is embedded by the workers with the collection's model, like any one-text job."""
    from tasks import search as searching  # loads numpy (through the producer)

    settings = get_settings()
    try:
        found = searching.search(name, query, k, settings, timeout=timeout)
    except EmbedqError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(found.as_json(), indent=2))
        return
    how = "vector index" if found.indexed else "exact scan"
    typer.echo(
        f"collection {found.collection} version {found.version} ({found.model}): {how},"
        f" query embedded in {found.embed_ms:.0f} ms, searched in {found.search_ms:.0f} ms",
        err=True,
    )
    for hit in found.hits:
        typer.echo(f"{hit.score:.4f}\t{hit.item_id}")
