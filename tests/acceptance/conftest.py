"""Real worker and `embedq serve` processes for the acceptance tests, over real Redis (database
11)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from storage import schema
from tests.conftest import require
from worker.settings import get_settings

KEY = "sk-acceptance-7f3a91"
"""The API key the acceptance tests' `embedq serve` processes accept."""
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


class Server:
    """A real ``embedq serve`` process on a free port, its log kept for assertions."""

    def __init__(self, env: dict[str, str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "serve", "--port", str(self.port)],
            env={**os.environ, **env},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.clients: list[openai.OpenAI] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail("embedq serve did not become healthy:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def client(self, key: str = KEY) -> openai.OpenAI:
        """OpenAI's client on this server (closed with it), without retries."""
        self.clients.append(openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0))
        return self.clients[-1]

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        auth = {"Authorization": f"Bearer {KEY}"}
        return httpx.get(self.url + path, headers=auth, timeout=60, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        if self.process.stdout is not None:
            self.process.stdout.close()
