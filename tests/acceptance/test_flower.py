"""Real Flower on loopback, with basic auth, watching a real worker: the embedq tasks appear in
its HTTP API with readable names, short argument summaries and their results."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import Fleet
from tests.conftest import require
from tests.processes import free_port
from tests.waiting import wait_until

PORT = free_port()
AUTH = {"EMBEDQ_FLOWER_USER": "ops", "EMBEDQ_FLOWER_PASSWORD": "s3cret-pass"}


def get(path: str, auth: bool = True) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}")
    if auth:
        token = base64.b64encode(b"ops:s3cret-pass").decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _answers() -> bool:
    try:
        return get("/healthcheck", auth=False)[0] == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def flower(fleet: Fleet) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "flower", "--port", str(PORT)],
        env={**os.environ, **fleet.env, **AUTH},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    wait_until(lambda: _answers() or process.poll() is not None, 60, "Flower to answer", every=0.3)
    assert process.poll() is None, "Flower exited at start"
    yield process
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def listening(producer: object) -> None:
    """Flower answers /healthcheck before its event receiver listens: wait until it has seen a
    task, or the events of the jobs a test sends may go before anyone hears them."""
    sent: list[str] = []

    def heard() -> bool:
        job = producer.submit(["Flower is listening"])  # type: ignore[attr-defined]
        assert job.wait(timeout=120)["state"] == "succeeded"
        sent.append(job.id)
        body = get("/api/tasks")[1]
        return any(job_id in body for job_id in sent)

    wait_until(heard, 60, "Flower to hear a task", every=0.5)


def test_flower_shows_the_embedq_tasks_behind_a_login(
    fleet: Fleet, flower: subprocess.Popen[str], corpus: list[str]
) -> None:
    from tasks import producer

    listening(producer)
    jobs = [producer.submit(corpus[i * 10 : i * 10 + 10]) for i in range(3)]
    assert all(job.wait(timeout=120)["state"] == "succeeded" for job in jobs)

    assert get("/api/tasks", auth=False)[0] == 401

    def succeeded() -> tuple[int, str] | None:
        status, body = get("/api/tasks?taskname=embedq.embed&state=SUCCESS")
        return (status, body) if status == 200 and all(job.id in body for job in jobs) else None

    status, body = wait_until(succeeded, 30, "Flower to list the three jobs' tasks", every=0.5)
    tasks = json.loads(body)
    assert len(tasks) >= 3, (status, body[:500])
    shown = " ".join(str(task.get("args")) for task in tasks.values())
    for job in jobs:
        assert f"job={job.id} batch=0 model=minilm texts=10" in shown
    assert all(len(str(task.get("args"))) < 300 for task in tasks.values())  # never whole texts
    one = next(iter(tasks.values()))
    assert one["name"] == "embedq.embed" and "'provider': 'CPUExecutionProvider'" in one["result"]

    status, body = get("/api/workers?refresh=1")
    assert status == 200 and any(name.startswith("embedq-test@") for name in json.loads(body))


def test_flower_refuses_to_start_without_credentials() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_FLOWER_")}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "flower"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "EMBEDQ_FLOWER_USER" in done.stderr


ARTIFACTS = Path(
    os.environ.get("EMBEDQ_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")
)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    require(browser is not None, "Debian's chromium is not installed (apt-get install chromium)")
    assert browser is not None
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += ["--window-size=1600,900", "--virtual-time-budget=8000"]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_the_flower_dashboard_shows_the_embedq_tasks_in_a_browser(
    fleet: Fleet, flower: subprocess.Popen[str], corpus: list[str]
) -> None:
    from tasks import producer

    listening(producer)
    jobs = [producer.submit(corpus[i * 5 : i * 5 + 5]) for i in range(4)]
    assert all(job.wait(timeout=120)["state"] == "succeeded" for job in jobs)
    wait_until(
        lambda: all(job.id in get("/api/tasks?state=SUCCESS")[1] for job in jobs),
        30,
        "Flower to have the four jobs' events",
        every=0.3,
    )
    page = f"http://ops:s3cret-pass@127.0.0.1:{PORT}/tasks"
    dom = chromium("--dump-dom", page).stdout
    assert dom.count("embedq.embed") >= 4 and "SUCCESS" in dom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    chromium(f"--screenshot={shot}", page)
    assert shot.stat().st_size > 20_000
