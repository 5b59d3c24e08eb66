"""Starting embedq's long-running processes: a Celery worker sized for this machine, after
checking that each of its GPUs really runs the default model, and Flower.

GPUs are probed in throwaway processes (``embedq models probe``): the worker's parent must
create no CUDA context before it forks its pool. Flower without a login is started as a program
of its own, because Flower reads ``FLOWER_UNAUTHENTICATED_API`` from its environment (at each
request, with no option for it): this process hands the variable to that program rather than
setting it in its own environment.
"""

from __future__ import annotations

import os
import subprocess
import sys

from worker import extra
from worker.settings import Settings, get_settings

PROBE = [sys.executable, "-m", "tasks.cli", "models", "probe"]
"""The command that loads a model on one device and embeds a text (exit 0: it runs there)."""


def sized(concurrency: int | None) -> tuple[Settings, int]:
    """The settings a worker with ``concurrency`` pool processes (default: one per GPU, else
    ``EMBEDQ_PROCESSES``) runs under, and that number of processes. Raises
    ``ModuleNotFoundError`` first on an install without the worker extra."""
    extra.require(*extra.RUNTIME)
    settings = get_settings()
    processes = concurrency or settings.worker_processes()
    if processes != settings.processes and not settings.gpu_devices:
        # Children size their ONNX thread pools from EMBEDQ_PROCESSES.
        os.environ["EMBEDQ_PROCESSES"] = str(processes)
        get_settings.cache_clear()
        settings = get_settings()
    return settings, processes


def unfit_gpu(settings: Settings) -> int | None:
    """The first of the worker's GPUs that cannot run the default model, or ``None`` when each
    can (or the worker has no GPU or no default model). Each probe prints its own result."""
    if not (settings.gpu_devices and settings.default_model):
        return None
    for device in settings.gpu_devices:
        done = subprocess.run([*PROBE, settings.default_model, "--device", str(device)])
        if done.returncode != 0:
            return device
    return None


def run_worker(processes: int, queues: str, name: str, loglevel: str) -> None:
    """Run a Celery worker until it is stopped: prefork with ``processes`` pool processes, or,
    when the settings hold several batches in flight (``EMBEDQ_IN_FLIGHT``), one process with
    that many threads feeding its engine (``tasks.feeder``)."""
    from worker.app import app  # the Celery app: loaded only to start a process on it

    in_flight = get_settings().batches_in_flight()
    pool = ["--pool=threads", f"--concurrency={in_flight}"] if in_flight > 1 else []
    app.worker_main(
        [
            "worker",
            *(pool or ["--pool=prefork", f"--concurrency={processes}"]),
            f"--queues={queues}",
            f"--hostname={name}",
            f"--loglevel={loglevel}",
        ]
    )


def run_flower(port: int, address: str, login: tuple[str, str] | None) -> None:
    """Run Flower on the app until it is stopped: behind basic authentication with ``login``
    (user, password), or, with ``None``, without any (this process becomes Flower).
    Raises ``ModuleNotFoundError`` on an install without the worker extra, which brings Flower."""
    extra.require("flower")
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if login is None:
        command = [sys.executable, "-m", "celery", "--app=worker.app:app", *argv]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"})
    from worker.app import app  # the Celery app: loaded only to start a process on it

    user, password = login
    app.start([*argv, f"--basic-auth={user}:{password}"])
