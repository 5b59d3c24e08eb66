"""A worker killed while it downloads a model: another worker on the same host prepares it
within the download lease (``EMBEDQ_DOWNLOAD_LEASE``), not after the broker's visibility
timeout (31 minutes, while a live worker on the host sat idle), and the job loses nothing."""

from __future__ import annotations

import os
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.faults.outcomes import Outcome, job_texts, tail, wait_terminal
from tests.processes import Worker
from tests.waiting import wait_until


class StallingArchive:
    """Serves one archive over loopback HTTP: the first request gets half of it and then
    nothing more (a download in progress, for a test to kill); later requests get it whole."""

    def __init__(self, archive: Path) -> None:
        self.data = archive.read_bytes()
        self.requests = 0
        self.stalled = threading.Event()
        self.release = threading.Event()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                served.requests += 1
                first = served.requests == 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(served.data)))
                self.end_headers()
                if not first:
                    self.wfile.write(served.data)
                    return
                self.wfile.write(served.data[: len(served.data) // 2])
                self.wfile.flush()
                served.stalled.set()
                served.release.wait(120)  # its client is killed meanwhile

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/{archive.name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StallingArchive:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling(minilm: Path, tmp_path: Path) -> Iterator[StallingArchive]:
    archive = tmp_path / "minilm.tar.gz"
    with tarfile.open(archive, "w:gz") as tarred:
        tarred.add(minilm, arcname="minilm")
    with StallingArchive(archive) as served:
        yield served


def downloading(workers: list[Worker]) -> Worker | None:
    """The worker whose log shows it took the download task."""
    return next((w for w in workers if w.logged("Task embedq.download[")), None)


@pytest.mark.model
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_worker_killed_mid_download_is_replaced_by_another_on_its_host_within_the_lease(
    start_worker: Callable[..., Worker],
    stalling: StallingArchive,
    short_texts: list[str],
    report: Callable[..., Outcome],
) -> None:
    from tasks import producer

    lease = "5"
    workers = [start_worker(f"download-{n}", EMBEDQ_DOWNLOAD_LEASE=lease) for n in (1, 2)]
    name = f"minilm-url-{uuid.uuid4().hex[:8]}"  # new in every run: it must be downloaded
    producer.register_model(stalling.url, name)
    texts = job_texts(short_texts, 13)[:200]
    started = time.monotonic()
    job = producer.submit(texts, model=name)

    assert stalling.stalled.wait(120), tail(*workers)
    victim = wait_until(lambda: downloading(workers), 30, "a worker to take the download")
    os.killpg(victim.process.pid, signal.SIGKILL)  # mid-download: no cleanup, nothing acked
    killed_at = time.monotonic()

    status = wait_terminal(job, 180)
    recovered_s = time.monotonic() - killed_at
    outcome = report(
        job.id, len(texts), time.monotonic() - started, note=f"done {recovered_s:.1f}s after"
    )
    (survivor,) = [w for w in workers if w is not victim]
    assert outcome.verdict == ("succeeded", len(texts), 0, 0), (status, tail(survivor))
    assert stalling.requests >= 2  # the survivor downloaded it again, whole
    assert survivor.alive()
    # Bounded by the lease and a download, not the 31-minute visibility timeout.
    assert recovered_s < 120, f"prepared {recovered_s:.0f}s after the kill"
