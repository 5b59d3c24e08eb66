"""Real worker processes for the acceptance tests, over real Redis (database 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from storage import schema
from tests.conftest import require
from worker.settings import get_settings

REDIS = os.environ.get("EMBEDQ_TEST_REDIS", "redis://127.0.0.1:6379/11")


@pytest.fixture
def pipeline_env(
    database_url: str, minilm: Path, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Settings shared by this test's producer and worker, on an empty Redis database."""
    try:
        client = redis.Redis.from_url(REDIS, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        require(False, f"Redis is not reachable at {REDIS}: {exc}")
    schema.upgrade(database_url)
    env = {
        "EMBEDQ_BROKER_URL": REDIS,
        "EMBEDQ_DATABASE_URL": database_url,
        "EMBEDQ_MODEL_DIR": str(store_root),
        "EMBEDQ_DEFAULT_MODEL": "minilm",
        "EMBEDQ_PROVIDERS": "CPUExecutionProvider",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    from tasks import producer

    producer.dispose()


class Worker:
    """A real ``celery -A worker worker`` process, its log collected for assertions."""

    def __init__(self, env: dict[str, str], name: str, command: list[str] | None = None) -> None:
        command = command or [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-Q",
            "interactive,bulk",
            "-c",
            "1",
            "--pool",
            "prefork",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ]
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the pool too
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(90):
            self.stop()
            pytest.fail("the worker did not become ready:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if " ready." in line:
                self.ready.set()

    def stop(self) -> None:
        """Warm shutdown of the whole process group; SIGKILL for whatever is left after 30 s."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                os.killpg(self.process.pid, 0)  # anything left in the group (a pool child)?
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def worker(pipeline_env: dict[str, str]) -> Iterator[Worker]:
    running = Worker(pipeline_env, "embedq-test")
    yield running
    running.stop()
