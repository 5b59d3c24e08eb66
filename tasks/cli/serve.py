"""The commands that start a long-running process: ``worker``, ``flower`` and ``serve``. The
processes themselves are started by ``tasks.cli.supervisor`` (the API by uvicorn); these commands
read the options and say what is about to run."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from storage.session import redacted
from tasks.cli import present, supervisor
from tasks.cli.failures import Code, fail
from worker.errors import EmbedqError
from worker.settings import get_settings


def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated")] = (
        "interactive,bulk"
    ),
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", "-c", help="default: one per GPU, else EMBEDQ_PROCESSES"),
    ] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Celery node name")] = "embedq@%h",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Start a Celery worker with embedq's defaults, printed first: prefork, one process per
    GPU (each bound to its device) or EMBEDQ_PROCESSES x intra-op threads fitted to the cores;
    with one GPU (or EMBEDQ_IN_FLIGHT > 1), one process whose threads feed its engine. A GPU
    worker first checks that each device really runs the default model on the GPU."""
    settings, processes = supervisor.sized(concurrency)
    present.table(
        {
            "broker": redacted(settings.celery_broker()),
            "database": redacted(settings.database_url),
            "queues": f"{queues} + {settings.download_queue()}",
            "pool": (
                f"threads x {settings.batches_in_flight()} feeding one engine (EMBEDQ_IN_FLIGHT)"
                if settings.batches_in_flight() > 1
                else f"prefork x {processes}"
            ),
            "gpu devices": ",".join(map(str, settings.gpu_devices)) or "none (CPU worker)",
            "providers": ",".join(settings.providers) or "auto (CUDA when listed, else CPU)",
            "provider fallback": settings.fallback_policy(),
            "intra-op threads": f"{settings.threads()} per process (cores: {os.cpu_count()})",
            "default model": settings.default_model or "none",
            "model dir": str(settings.model_dir),
            "time limits": f"batch {settings.task_time_limit}s, download"
            f" {settings.download_time_limit}s, visibility {settings.visibility()}s",
        }
    )
    device = supervisor.unfit_gpu(settings)
    if device is not None:
        typer.echo(f"error: GPU {device} cannot run {settings.default_model}", err=True)
        raise typer.Exit(code=Code.GPU)
    supervisor.run_worker(processes, queues, name, loglevel)


def flower(
    port: Annotated[int, typer.Option(help="HTTP port")] = 5555,
    address: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="no login, for local use only")
    ] = False,
) -> None:
    """Start Flower on this app with basic authentication (EMBEDQ_FLOWER_USER and
    EMBEDQ_FLOWER_PASSWORD), bound to loopback by default: Flower serves /metrics and
    /healthcheck without authentication."""
    settings = get_settings()
    login = None
    if settings.flower_user and settings.flower_password:
        login = (settings.flower_user, settings.flower_password)
    elif insecure_no_auth:
        typer.echo("warning: Flower runs without authentication", err=True)
    else:
        raise fail(
            EmbedqError(
                "set EMBEDQ_FLOWER_USER and EMBEDQ_FLOWER_PASSWORD (or pass --insecure-no-auth"
                " for local use)"
            )
        )
    typer.echo(
        f"Flower on http://{address}:{port} for {redacted(settings.celery_broker())}", err=True
    )
    supervisor.run_flower(port, address, login)


def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="no API keys, for local use only")
    ] = False,
    access_log: Annotated[
        bool,
        typer.Option(
            help="a log line per request (off behind a load balancer that logs them:"
            " about 0.3 ms less per request)"
        ),
    ] = True,
) -> None:
    """Serve the HTTP API (OpenAI's /v1/embeddings, embedq's /v1/jobs, /v1/models, /health;
    docs at /docs). It writes jobs for the workers and reads the store, never running a model,
    so several instances can sit behind a load balancer. Keys come from EMBEDQ_API_KEYS."""
    settings = get_settings()
    if settings.local_mode:
        raise fail(
            EmbedqError(
                "embedq serve sends jobs to workers and runs no model itself: set"
                " EMBEDQ_BROKER_URL (and start `embedq worker`)"
            )
        )
    if not settings.api_keys and not insecure_no_auth:
        raise fail(
            EmbedqError(
                "set EMBEDQ_API_KEYS (comma-separated) or pass --insecure-no-auth for local use"
            )
        )
    # FastAPI and uvicorn load here, not for every embedq command.
    import uvicorn

    from tasks.api.app import create_app
    from tasks.api.auth import key_id
    from tasks.api.protocol import guarded

    if insecure_no_auth:
        typer.echo("warning: the API runs without authentication or rate limit", err=True)
    keys = [key_id(key.get_secret_value()) for key in settings.api_keys]  # ids, never values
    present.table(
        {
            "broker": redacted(settings.celery_broker()),
            "database": redacted(settings.database_url),
            "keys": "none (--insecure-no-auth)"
            if insecure_no_auth
            else f"{len(keys)} (ids {', '.join(keys)})",
            "rate limit": f"{settings.api_rate_limit} requests per minute per key"
            if settings.api_rate_limit
            else "none",
            "request cap": f"body {settings.api_max_request_bytes} bytes,"
            f" head {settings.api_max_header_bytes} bytes",
            "client timeout": f"{settings.api_client_timeout:g}s (a head, a pause in a body)",
            "wait timeout": f"{settings.api_wait_timeout:g}s",
            "docs": f"http://{host}:{port}/docs",
        }
    )
    app = create_app(settings, require_auth=not insecure_no_auth)
    # log_config=None: uvicorn's records go through the logging embedq set up (JSON or text).
    protocol = guarded(settings.api_max_header_bytes, settings.api_client_timeout)
    uvicorn.run(app, host=host, port=port, http=protocol, log_config=None, access_log=access_log)
