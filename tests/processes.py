"""Real processes for the acceptance and fault tests: a Celery worker and an ``embedq serve``,
each with its log collected for assertions, started and stopped as a supervisor would (their
own process group, SIGTERM then SIGKILL), and a ``redis-server`` of a test's (or a session's)
own on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.waiting import wait_until

KEY = "sk-acceptance-7f3a91"
"""The API key the tests' `embedq serve` processes accept."""
READY_S = 90.0


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, and closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def celery_worker(
    name: str, *, queues: str = "interactive,bulk", processes: int = 1, pool: str = "prefork"
) -> list[str]:
    """The command of a worker as the tests start it: prefork with ``processes`` pool processes,
    or ``pool="threads"`` with that many threads."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        "-Q",
        queues,
        "-c",
        str(processes),
        "--pool",
        pool,
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "INFO",
    ]


class Process:
    """A child process in a process group of its own, its output collected line by line."""

    def __init__(self, command: Sequence[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            list(command),
            env={**os.environ, **env},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the pool too
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def tail(self, lines: int = 40) -> str:
        return "".join(self.lines[-lines:])

    def logged(self, words: str, since: int = 0) -> str | None:
        """The first line from ``since`` on that holds ``words``."""
        return next((line for line in self.lines[since:] if words in line), None)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, term_s: float = 30) -> None:
        """Warm shutdown of the whole process group; SIGKILL for whatever is left after
        ``term_s`` seconds."""
        for sig, wait in ((signal.SIGTERM, term_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                os.killpg(self.process.pid, 0)  # anything left in the group (a pool child)?
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Worker(Process):
    """A real ``celery -A worker worker`` process (or ``command``), ready when it returns."""

    def __init__(self, env: dict[str, str], name: str, command: list[str] | None = None) -> None:
        super().__init__(command or celery_worker(name), env)
        try:
            wait_until(
                lambda: self.logged(" ready.") or not self.alive(),
                READY_S,
                f"worker {name} to be ready",
                detail=self.tail,
            )
        except AssertionError:
            self.stop()
            raise
        if not self.alive():
            pytest.fail(f"the worker {name} exited at start:\n{self.tail()}")


class Server(Process):
    """A real ``embedq serve`` process on a free port, healthy when it returns."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "tasks.cli", "serve", "--port", str(self.port)], env
        )
        self.clients: list[openai.OpenAI] = []
        try:
            wait_until(
                lambda: self._healthy() or not self.alive(),
                60,
                "embedq serve to answer /health",
                every=0.2,
                detail=self.tail,
            )
        except AssertionError:
            self.stop()
            raise
        if not self.alive():
            pytest.fail(f"embedq serve exited at start:\n{self.tail()}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def client(self, key: str = KEY) -> openai.OpenAI:
        """OpenAI's client on this server (closed with it), without retries."""
        self.clients.append(openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0))
        return self.clients[-1]

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        auth = {"Authorization": f"Bearer {KEY}"}
        return httpx.get(self.url + path, headers=auth, timeout=60, **kwargs)  # type: ignore[arg-type]

    def stop(self, term_s: float = 15) -> None:
        for client in self.clients:
            client.close()
        super().stop(term_s)


class PrivateRedis:
    """A ``redis-server`` of this test's own on a free port, without persistence (and with a
    ``password`` when given): ``restart()`` kills it and starts it again on the same port,
    empty, as a host restart without AOF/RDB."""

    def __init__(
        self, directory: Path, port: int | None = None, password: str | None = None
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client that fails at once when the server is down (redis-py's default retries
        a refused connection for about 4 s)."""
        return redis.Redis(
            port=self.port,
            password=self.password,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self, timeout: float = 15) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        command += ["--dir", str(self.directory), "--logfile", str(self.log)]
        command += ["--requirepass", self.password] if self.password else []
        process = self.process = subprocess.Popen(command, start_new_session=True)
        client = self.client()

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, timeout, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: nothing is saved, every client connection drops."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()
