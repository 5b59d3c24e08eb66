"""A Celery worker's parent writes to the store from threads while its pool forks children. A
child forked in the middle of an SQLite transaction inherits SQLite's process-wide lock state
and then cannot write until its busy timeout runs out; ``storage.session`` makes a fork wait for
open transactions to end. Real fork, real SQLite file."""

from __future__ import annotations

import os
import threading
import time

from storage.models import Job
from storage.session import dispose_all, scope, sessions_for


def test_a_child_forked_while_a_thread_writes_can_write_at_once(sqlite_url: str) -> None:
    url = sqlite_url
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with scope(sessions_for(url)) as session:
            session.add(Job(id="parent", model_name="m", queue="interactive", total_items=1))
            session.flush()  # holds SQLite's write lock until the transaction ends
            writing.set()
            release.wait(5)

    thread = threading.Thread(target=writer)
    thread.start()
    assert writing.wait(5)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: one write, which must not wait for a lock nobody holds
        code = 1
        try:
            t0 = time.monotonic()
            with scope(sessions_for(url)) as session:
                session.add(Job(id="child", model_name="m", queue="interactive", total_items=1))
            code = 0 if time.monotonic() - t0 < 5 else 2
        finally:
            os._exit(code)
    forked_after = time.monotonic() - started
    thread.join()
    _, status = os.waitpid(pid, 0)
    dispose_all()
    assert forked_after >= 0.4  # the fork waited for the open transaction
    assert os.waitstatus_to_exitcode(status) == 0
    with scope(sessions_for(url)) as session:
        assert {job.id for job in session.query(Job)} == {"parent", "child"}
    dispose_all()
