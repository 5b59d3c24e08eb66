"""A live ``embedq serve`` against clients that send too much, too slowly or nothing at all
(``tasks.api.protocol``), over raw sockets: each is answered or closed in bounded time and
memory, and other clients are served meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.acceptance.conftest import KEY, Server
from tests.sockets import read_all, send_until_refused
from tests.waiting import wait_until

MB = 1024**2


def rss_mb(pid: int) -> float:
    """The process's resident memory, in MiB, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the one answer on ``sock``, read until the server closes."""
    head, _, content = read_all(sock).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (a read returns nothing, or a reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_100_mb_header_is_refused_as_it_comes_and_health_is_served_meanwhile(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    pid = server.process.pid
    before = rss_mb(pid)
    health: list[int] = []
    sending = threading.Event()
    sending.set()

    def poll_health() -> None:
        while sending.is_set():
            health.append(httpx.get(server.url + "/health", timeout=30).status_code)

    poller = threading.Thread(target=poll_health)
    poller.start()
    sock = connect(server)
    try:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: embedq\r\nAuthorization: Bearer ")
        sent = send_until_refused(sock, b"k" * MB, 100 * MB)
    finally:
        sending.clear()
        poller.join()
        sock.close()
    grown = rss_mb(pid) - before
    # The server closed after its limit: what was sent beyond it sat in the sockets' buffers.
    assert sent < 16 * MB, f"the server read {sent / MB:.0f} MiB of one header"
    assert grown < 20, f"serve grew by {grown:.1f} MiB"
    assert health and set(health) == {200}
    assert server.alive()


def test_a_header_over_the_limit_is_a_431_in_openai_s_shape(
    serve: Callable[..., Server],
) -> None:
    server = serve(EMBEDQ_API_MAX_HEADER_BYTES="4096")
    with connect(server) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: embedq\r\nX-Big: " + b"b" * 8192)
        status, body = answer(sock)
    assert status == 431
    assert body["error"] == {
        "message": "the request head is over 4096 bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    # A head under the limit is served as before.
    auth = {"Authorization": f"Bearer {KEY}", "X-Small": "s" * 2048}
    assert httpx.get(server.url + "/v1/models", headers=auth, timeout=30).status_code == 200


def test_idle_and_half_sent_connections_are_closed_after_the_client_timeout(
    serve: Callable[..., Server],
) -> None:
    server = serve(EMBEDQ_API_CLIENT_TIMEOUT="1")
    idle = [connect(server) for _ in range(20)]
    half_head = [connect(server) for _ in range(20)]
    half_body = [connect(server) for _ in range(20)]
    for sock in half_head:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: embedq\r\n")
    for sock in half_body:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: embedq\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            + b'{"input": "'
        )
    # A slow sender that keeps a head trickling in is closed too: the head has a deadline, not
    # an idle timeout.
    trickle = connect(server)
    try:
        trickle.sendall(b"GET /v1/models HTTP/1.1\r\n")
        for _ in range(3):
            time.sleep(0.4)  # the trickle itself: a byte every 0.4 s, under the 1 s timeout
            try:
                trickle.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
        every = [*idle, *half_head, *half_body, trickle]
        wait_until(
            lambda: all(closed_by_server(sock) for sock in every),
            20,
            "the server to close idle and half-sent connections",
        )
        assert server.alive()
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200
    finally:
        for sock in [*idle, *half_head, *half_body, trickle]:
            sock.close()


def test_a_half_sent_head_is_told_408(serve: Callable[..., Server]) -> None:
    server = serve(EMBEDQ_API_CLIENT_TIMEOUT="1")
    with connect(server) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: embedq\r\n")
        status, body = answer(sock)
    assert status == 408
    assert "did not arrive within 1s" in str(body["error"])


def test_a_chunked_body_over_the_cap_gets_its_413_and_the_rest_is_not_read(
    serve: Callable[..., Server],
) -> None:
    server = serve(EMBEDQ_API_MAX_REQUEST_BYTES=str(MB))
    sock = connect(server)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: embedq\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    sent = send_until_refused(sock, chunk, 1000 * MB)
    got = read_all(sock)
    sock.close()
    assert sent < 32 * MB, f"the server read {sent / MB:.0f} MiB after its 1 MiB cap"
    if got:  # a reset can take the answer with it; when it arrived, it is OpenAI's 413
        head, _, content = got.partition(b"\r\n\r\n")
        assert head.split()[1] == b"413"
        assert json.loads(content)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("announced", [True, False])
def test_a_413_carries_its_code_whether_the_size_was_announced_or_counted(
    serve: Callable[..., Server], announced: bool
) -> None:
    server = serve(EMBEDQ_API_MAX_REQUEST_BYTES="4096")
    content = json.dumps({"input": "x" * 8192, "model": "minilm"}).encode()

    def parts() -> object:
        yield content

    answered = httpx.post(
        server.url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        content=content if announced else parts(),  # a generator is sent chunked
        timeout=30,
    )
    assert answered.status_code == 413
    assert answered.json()["error"]["code"] == "request_too_large"
