"""The compose fleet, built and run for real: ``deploy/check.sh`` runs this module.

It builds the project's images from the ``Dockerfile`` and starts ``docker-compose.yml`` as an
operator would: Redis, PostgreSQL, the migration, one CPU worker, the API and Flower; the GPU
worker is left out on a machine without a GPU, so the CPU workers take interactive jobs too.
From the host it then registers a model (an archive served over HTTP, prepared by the workers
into the shared ``models`` volume), calls the API with OpenAI's client, submits 2,000-text jobs
with the producer on the fleet's own Redis and PostgreSQL, and checks what came back: with one
worker, with three, with one killed mid-job (with the default timeouts: the reconciler, not
Redis's 31-minute visibility timeout, brings its batches back), and with one stopped mid-batch.
Flower must refuse a request without its login and list the workers with it. Each test
appends what it saw to ``artifacts/fleet/report.txt``.

The tests run in file order and share the fleet (a module fixture); each leaves it running.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from storage.session import dispose_all, scope, sessions_for
from tasks import producer
from tests.conftest import REPO, cosines
from worker.engine import Engine
from worker.settings import get_settings

PROJECT = os.environ.get("EMBEDQ_FLEET_PROJECT", "embedqcheck")
FILES = ["-f", str(REPO / "docker-compose.yml")]
SERVICES = ["redis", "postgres", "migrate", "worker-cpu", "api", "flower"]
IMAGES = ["embedq:cpu", "python:3.11-slim", "redis:7", "pgvector/pgvector:pg16"]
ARTIFACTS = REPO / "artifacts" / "fleet"
REPORT = ARTIFACTS / "report.txt"
TEXTS = 2000
FLOWER = "http://127.0.0.1:5555"
API = "http://127.0.0.1:8000/v1"
MODEL = "minilm"
STATE = "{{.State.Status}} {{.State.Health.Status}}"


def report(line: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
    print(line)


def run(*command: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    done = subprocess.run(
        command,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        words = " ".join(command)
        raise AssertionError(f"{words} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def docker(*args: str) -> str:
    return run("docker", *args).strip()


def inspect(container: str, template: str) -> str:
    return docker("inspect", "-f", template, container)


@dataclass
class Fleet:
    env: dict[str, str]
    """The secrets compose interpolates (passwords), generated for this run."""
    broker_url: str = ""
    database_url: str = ""
    gateway: str = ""

    def compose(self, *args: str, timeout: float = 900) -> str:
        return run("docker-compose", "-p", PROJECT, *FILES, *args, env=self.env, timeout=timeout)

    def containers(self, service: str) -> list[str]:
        """The service's containers, running or not, by name."""
        listed = self.compose("ps", "-q", service).split()
        return sorted(inspect(c, "{{.Name}}").lstrip("/") for c in listed)

    def running(self, service: str) -> list[str]:
        return [c for c in self.containers(service) if inspect(c, "{{.State.Running}}") == "true"]

    def wait_healthy(self, containers: list[str], timeout: float = 240) -> float:
        """Seconds until every container reports healthy; fails on one that exits or turns
        unhealthy, with its log."""
        started = time.monotonic()
        while True:
            states = {c: inspect(c, STATE) for c in containers}
            if all(state == "running healthy" for state in states.values()):
                return time.monotonic() - started
            for container, state in states.items():
                if state.startswith(("exited", "dead")) or state.endswith("unhealthy"):
                    raise AssertionError(f"{container} is {state}:\n{logs(container)[-3000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not healthy after {timeout:.0f}s: {states}")
            time.sleep(2)

    def sql(self, query: str, **params: Any) -> list[Any]:
        with scope(sessions_for(self.database_url)) as session:  # dispose_all() at the end
            return list(session.execute(text(query), params))


def logs(container: str) -> str:
    command = ["docker", "logs", container]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def address(container: str) -> str:
    return inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[int]:
    """An HTTP server for ``folder`` on every interface (the fleet reaches the host through
    its network's gateway); yields its port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    passwords = {
        "REDIS_PASSWORD": secrets.token_hex(12),
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "EMBEDQ_FLOWER_PASSWORD": secrets.token_hex(12),
        "EMBEDQ_API_KEYS": f"sk-{secrets.token_hex(12)}",
        # No GPU worker here: the CPU workers take interactive jobs too (the API's embeddings).
        "CPU_WORKER_QUEUES": "interactive,bulk",
    }
    fleet = Fleet(env=passwords)
    saved = {key: os.environ.get(key) for key in ("EMBEDQ_BROKER_URL", "EMBEDQ_DATABASE_URL")}
    REPORT.unlink(missing_ok=True)
    fleet.compose("down", "-v", "--remove-orphans")  # whatever an earlier run left
    try:
        started = time.monotonic()
        fleet.compose("build", "migrate")  # the cpu image, which worker-cpu and flower use too
        report(f"build: embedq:cpu from the Dockerfile in {time.monotonic() - started:.0f}s")
        started = time.monotonic()
        fleet.compose("up", "-d", *SERVICES)
        fleet.wait_healthy([*fleet.containers("redis"), *fleet.containers("postgres")])
        fleet.wait_healthy(
            [c for name in ("worker-cpu", "api", "flower") for c in fleet.containers(name)]
        )
        report(f"up: every service healthy {time.monotonic() - started:.0f}s after `up -d`")
        redis_at, postgres_at = (
            address(fleet.containers("redis")[0]),
            address(fleet.containers("postgres")[0]),
        )
        fleet.broker_url = f"redis://:{passwords['REDIS_PASSWORD']}@{redis_at}:6379/0"
        fleet.database_url = f"postgresql+psycopg://embedq:{passwords['POSTGRES_PASSWORD']}@{postgres_at}:5432/embedq"
        fleet.gateway = docker(
            "network", "inspect", f"{PROJECT}_default", "-f", "{{(index .IPAM.Config 0).Gateway}}"
        )
        os.environ["EMBEDQ_BROKER_URL"] = fleet.broker_url
        os.environ["EMBEDQ_DATABASE_URL"] = fleet.database_url
        get_settings.cache_clear()
        yield fleet
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            for container in fleet.containers(service):
                (ARTIFACTS / f"{container}.log").write_text(logs(container), encoding="utf-8")
        producer.dispose()
        dispose_all()
        fleet.compose("down", "-v", "--remove-orphans")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def texts(corpus: list[str]) -> list[str]:
    return corpus[:TEXTS]


@pytest.fixture(scope="module")
def expected(engine: Engine, texts: list[str]) -> np.ndarray:
    """What the engine on this host makes of the texts, from the same exported model."""
    return np.concatenate([engine.encode(texts[i : i + 500]).vectors for i in range(0, TEXTS, 500)])


def submit(texts: list[str]) -> producer.JobHandle:
    """A job from the host, as an application would send it: the bulk queue (the only one
    CPU workers consume; interactive is the GPU workers')."""
    return producer.submit(texts, model=MODEL, queue="bulk")


def outcome(fleet: Fleet, job_id: str) -> dict[str, Any]:
    """What the store holds for the job: items stored, duplicated and lost, and where and how
    often its batches ran."""
    ((total,),) = fleet.sql("SELECT total_items FROM jobs WHERE id = :j", j=job_id)
    ((rows, distinct),) = fleet.sql(
        "SELECT count(*), count(DISTINCT item_id) FROM embeddings WHERE job_id = :j", j=job_id
    )
    ((batches, attempts, sends),) = fleet.sql(
        "SELECT count(*), sum(attempts), sum(sends) FROM batches WHERE job_id = :j", j=job_id
    )
    machines = dict(
        fleet.sql(
            "SELECT host, count(*) FROM batch_stats WHERE job_id = :j GROUP BY host", j=job_id
        )
    )
    return {
        "stored": distinct,
        "duplicated": rows - distinct,
        "lost": total - distinct,
        "batches": batches,
        "attempts": int(attempts),
        "sends": int(sends),
        "machines": machines,
    }


def finish(
    fleet: Fleet, handle: producer.JobHandle, expected: np.ndarray, words: str, timeout: float
) -> dict[str, Any]:
    """Wait for the job, check its vectors against the engine's and its counts, report."""
    started = time.monotonic()
    status = handle.wait(timeout=timeout)
    waited = time.monotonic() - started
    assert status["state"] == "succeeded", status
    ids, vectors = handle.embeddings()
    assert ids == [str(i) for i in range(len(expected))]
    similarity = np.asarray(cosines(vectors, expected))
    assert float(similarity.min()) >= 0.9999
    seen = outcome(fleet, handle.id)
    assert (seen["stored"], seen["duplicated"], seen["lost"]) == (len(expected), 0, 0), seen
    machines = sorted(seen["machines"].items())
    spread = ", ".join(f"{host.split('/')[-1]}: {n}" for host, n in machines)
    report(
        f"{words}: {seen['stored']} stored, {seen['duplicated']} duplicated, {seen['lost']} lost;"
        f" {seen['batches']} batches, {seen['attempts']} claims, {seen['sends']} sends;"
        f" min cosine to the engine {similarity.min():.6f}; batches per container: {spread};"
        f" finished {waited:.0f}s after the wait began"
    )
    return seen


def test_images_are_built_and_the_base_images_say_what_they_are(fleet: Fleet) -> None:
    for image in IMAGES:
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image)) / 1e6
        standin = docker(
            "image", "inspect", "-f", '{{index .Config.Labels "embedq.standin"}}', image
        )
        based = standin not in ("", "<no value>")
        if image.startswith("embedq:"):  # a label is inherited: this one says what it is built on
            what = "built here from the Dockerfile" + (" on the stand-in base" if based else "")
        else:
            what = f"stand-in ({standin})" if based else "as found (no stand-in label: pulled)"
        report(f"image {image}: {size:.0f} MB, {what}")
    versions = docker(
        "run", "--rm", "embedq:cpu", "python", "-c",
        "import onnxruntime, sys; print(sys.version.split()[0], onnxruntime.__version__)",
    )  # fmt: skip
    report(f"embedq:cpu runs Python and onnxruntime {versions}")


def test_every_service_reports_healthy_and_the_migration_ran(fleet: Fleet) -> None:
    for service in ("redis", "postgres", "worker-cpu", "api", "flower"):
        (container,) = fleet.containers(service)
        assert inspect(container, "{{.State.Health.Status}}") == "healthy"
    (migrate,) = fleet.containers("migrate")
    assert inspect(migrate, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    ((revision,),) = fleet.sql("SELECT version_num FROM alembic_version")
    server = fleet.sql("SHOW server_version")[0][0]
    services = f"redis, postgres {server}, worker-cpu, api, flower"
    report(f"healthy: {services}; migrate exited 0 at {revision}")


def flower_workers(fleet: Fleet) -> list[str]:
    login = ("ops", fleet.env["EMBEDQ_FLOWER_PASSWORD"])
    answer = httpx.get(f"{FLOWER}/api/workers", params={"refresh": "1"}, auth=login, timeout=60)
    assert answer.status_code == 200, answer.text
    return sorted(answer.json())


def test_flower_refuses_without_its_login_and_lists_the_worker_with_it(fleet: Fleet) -> None:
    refused = httpx.get(f"{FLOWER}/api/workers", timeout=30)
    wrong = httpx.get(f"{FLOWER}/api/workers", auth=("ops", "not-the-password"), timeout=30)
    assert (refused.status_code, wrong.status_code) == (401, 401)
    (container,) = fleet.containers("worker-cpu")
    assert flower_workers(fleet) == [f"embedq@{inspect(container, '{{.Config.Hostname}}')}"]
    report("flower: 401 without the login and with a wrong one; with it, lists the one worker")


def test_a_model_registered_once_is_prepared_by_the_fleet_and_a_job_comes_back_whole(
    fleet: Fleet, minilm: Path, texts: list[str], expected: np.ndarray, tmp_path_factory: Any
) -> None:
    """README "Run the fleet": an ONNX model exported elsewhere, published as an archive,
    registered once; workers prepare it into the models volume when a job names it."""
    published = tmp_path_factory.mktemp("published")
    archive = published / "minilm.tar.gz"
    with tarfile.open(archive, "w:gz") as tarred:
        for path in sorted(minilm.iterdir()):
            if path.name != "manifest.json":  # the host's own record, not the model's
                tarred.add(path, arcname=path.name)
    digest = run("sha256sum", str(archive)).split()[0]
    with serving(published) as port:
        url = f"http://{fleet.gateway}:{port}/minilm.tar.gz"
        register = ["models", "register", url, "--name", MODEL, "--sha256", digest]
        run(sys.executable, "-m", "tasks.cli", *register)
        handle = submit(texts)
        finish(fleet, handle, expected, "1 worker, 2,000 texts", timeout=600)
    (container,) = fleet.containers("worker-cpu")
    owner = docker("exec", container, "stat", "-c", "%u %n", f"/models/{MODEL}/model.onnx")
    assert owner.startswith("10001 ")
    ready = fleet.sql("SELECT host, state, dim FROM models WHERE name = :n", n=MODEL)
    assert [(state, dim) for _, state, dim in ready] == [("ready", 384)]
    report(f"model: prepared on demand into the models volume ({owner}), recorded {ready[0]}")


def test_the_api_answers_openai_s_client_from_the_host(
    fleet: Fleet, engine: Engine, texts: list[str]
) -> None:
    from openai import APIStatusError, OpenAI

    given = texts[:3]
    refused = httpx.get(f"{API}/models", timeout=30)
    assert refused.status_code == 401
    client = OpenAI(base_url=API, api_key=fleet.env["EMBEDQ_API_KEYS"], max_retries=0)
    models = {model.id: model for model in client.models.list()}
    assert MODEL in models
    result = client.embeddings.create(input=given, model=MODEL)
    got = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert float(np.asarray(cosines(got, engine.encode(given).vectors)).min()) >= 0.9999
    with pytest.raises(APIStatusError) as unknown:
        client.embeddings.create(input="x", model="no-such-model")
    assert unknown.value.status_code == 404
    report(
        f"api: 401 without a key; embeddings.create (openai client) = the engine's vectors,"
        f" {result.usage.total_tokens} tokens; an unknown model 404"
    )


def test_a_collection_is_indexed_by_pgvector_and_searched_through_the_api(
    fleet: Fleet, texts: list[str], tmp_path_factory: Any
) -> None:
    """The fleet's PostgreSQL has pgvector: a backfill's collection keeps an HNSW index, and
    the API's search (the query embedded by the fleet's worker) finds a text of it first."""
    folder = tmp_path_factory.mktemp("collection")
    source = folder / "docs.jsonl"
    rows = texts[:300]
    source.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(rows)),
        encoding="utf-8",
    )
    summary = json.loads(
        run(
            sys.executable,
            "-m",
            "tasks.cli",
            "backfill",
            "docs",
            "--source",
            str(source),
            "--model",
            MODEL,
            "--json",
        )
    )
    assert (summary["state"], summary["done"]) == ("succeeded", len(rows))
    ((version,),) = fleet.sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    indexes = fleet.sql("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'vectors_%hnsw'")
    assert len(indexes) == 1
    key = fleet.env["EMBEDQ_API_KEYS"]
    answer = httpx.post(
        f"{API}/collections/docs/search",
        json={"query": rows[7], "k": 5},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["indexed"] and found["data"][0]["id"] == "d7", found
    assert found["data"][0]["score"] > 0.999
    report(
        f"collection: pgvector {version}, HNSW index {indexes[0][0]}; API search finds the"
        f" queried text first (score {found['data'][0]['score']:.4f})"
    )


def test_three_workers_share_a_job(fleet: Fleet, texts: list[str], expected: np.ndarray) -> None:
    fleet.compose("up", "-d", "--scale", "worker-cpu=3", "--no-recreate", "worker-cpu")
    workers = fleet.containers("worker-cpu")
    assert len(workers) == 3
    waited = fleet.wait_healthy(workers)
    names = [f"embedq@{inspect(c, '{{.Config.Hostname}}')}" for c in workers]
    assert flower_workers(fleet) == sorted(names)
    report(f"scale: 3 worker-cpu containers healthy in {waited:.0f}s; Flower lists all three")
    seen = finish(fleet, submit(texts), expected, "3 workers, 2,000 texts", timeout=600)
    assert len(seen["machines"]) == 3, seen["machines"]


def running_batch(fleet: Fleet, job_id: str, timeout: float = 120) -> tuple[int, str]:
    """A batch of the job a worker has claimed and not finished, once some batches are done:
    its index and the container (its host name) running it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = fleet.sql(
            "SELECT count(*) FROM batches WHERE job_id = :j AND state = 'done'", j=job_id
        )[0][0]
        claimed = fleet.sql(
            "SELECT batch_index, worker FROM batches WHERE job_id = :j AND state = 'sent'"
            " AND worker IS NOT NULL ORDER BY updated_at DESC",
            j=job_id,
        )
        if done >= 2 and claimed:
            index, worker = claimed[0]
            return index, worker.rsplit(":", 1)[0].split("/")[-1]
        time.sleep(0.2)
    raise AssertionError(f"no batch of job {job_id} was running within {timeout:.0f}s")


def container_of(fleet: Fleet, hostname: str) -> str:
    (container,) = [
        c for c in fleet.running("worker-cpu") if inspect(c, "{{.Config.Hostname}}") == hostname
    ]
    return container


def test_a_worker_killed_mid_job_loses_nothing(
    fleet: Fleet, texts: list[str], expected: np.ndarray
) -> None:
    handle = submit(texts)
    index, hostname = running_batch(fleet, handle.id)
    victim = container_of(fleet, hostname)
    docker("kill", victim)  # SIGKILL to the whole container: no warm shutdown, nothing acked
    assert inspect(victim, "{{.State.Running}}") == "false"
    report(f"kill: `docker kill {victim}` while it ran batch {index}")
    seen = finish(fleet, handle, expected, "2,000 texts, 1 of 3 workers killed", timeout=900)
    assert seen["sends"] >= seen["batches"]
    ((state, claims),) = fleet.sql(
        "SELECT state, attempts FROM batches WHERE job_id = :j AND batch_index = :i",
        j=handle.id,
        i=index,
    )
    assert (state, claims >= 2) == ("done", True)  # run again elsewhere, stored once


def test_a_worker_stopped_mid_batch_finishes_it_first(
    fleet: Fleet, texts: list[str], expected: np.ndarray
) -> None:
    handle = submit(texts)
    index, hostname = running_batch(fleet, handle.id)
    container = container_of(fleet, hostname)
    started = time.monotonic()
    docker("stop", "-t", "600", container)  # compose's stop: SIGTERM, stop_grace_period 10m
    stopped = time.monotonic() - started
    assert inspect(container, "{{.State.ExitCode}}") == "0"
    assert "Warm shutdown" in logs(container)
    ((state, worker, claims),) = fleet.sql(
        "SELECT state, worker, attempts FROM batches WHERE job_id = :j AND batch_index = :i",
        j=handle.id,
        i=index,
    )
    assert (state, claims) == ("done", 1) and f"/{hostname}:" in worker
    report(
        f"stop: `docker stop` (SIGTERM) took {stopped:.1f}s; the container exited 0 after a"
        f" warm shutdown and batch {index} was finished by it, claimed once"
    )
    finish(fleet, handle, expected, "2,000 texts, 1 worker stopped mid-batch", timeout=600)
    left = fleet.running("worker-cpu")
    fleet.wait_healthy(left, timeout=120)
    report(f"after: {len(left)} worker-cpu container(s) left running, healthy")
