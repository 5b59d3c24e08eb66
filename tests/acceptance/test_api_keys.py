"""Keys are checked before bodies on a live ``embedq serve`` (``tasks.api.auth.KeyGate``): a
request without a valid key is refused from its headers, its body neither read nor parsed, and
a client trying wrong keys is slowed to 429 while valid keys go on."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx

from tests.acceptance.conftest import KEY, Server
from tests.sockets import read_all, send_until_refused

MB = 1024**2


def test_a_body_without_a_key_is_refused_401_before_it_is_parsed(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    for auth in ({}, {"Authorization": "Bearer sk-wrong"}):
        refused = httpx.post(
            server.url + "/v1/embeddings",
            headers={**auth, "Content-Type": "application/json"},
            content=b'{"input": [not json',
            timeout=30,
        )
        assert refused.status_code == 401, refused.text  # not 400 for the JSON
        assert refused.json()["error"]["type"] == "authentication_error"


def test_a_190_mb_upload_without_a_key_is_refused_before_its_body_is_read(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: embedq\r\n"
        b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Content-Length: %d\r\n\r\n" % (190 * MB)
    )
    sent = send_until_refused(sock, b"z" * MB, 190 * MB)
    got = read_all(sock)
    sock.close()
    assert sent < 32 * MB, f"the server read {sent // MB} MiB of a body it refused"
    if got:  # a reset can take the answer with it
        assert got.split()[1] == b"401"


def test_wrong_keys_are_slowed_to_429_and_a_valid_key_goes_on(
    serve: Callable[..., Server],
) -> None:
    server = serve(EMBEDQ_API_AUTH_FAILURE_LIMIT="20")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        codes = [
            client.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{n}"}).status_code
            for n in range(40)
        ]
        assert codes == [401] * 20 + [429] * 20
        over = client.get("/v1/models", headers={"Authorization": "Bearer sk-guess-again"})
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert "wrong API key" in over.json()["error"]["message"]
        assert over.headers["retry-after"] == "60"
        valid = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert valid.status_code == 200
        assert client.get("/health").status_code == 200  # no key needed, none counted


def test_a_key_reads_its_own_jobs_only(serve: Callable[..., Server]) -> None:
    other = "sk-keys-other"
    server = serve(EMBEDQ_API_KEYS=f"{KEY},{other}")
    mine, theirs = ({"Authorization": f"Bearer {key}"} for key in (KEY, other))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        created = client.post("/v1/jobs", headers=mine, json={"input": ["a text of mine"]})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=mine).status_code == 200
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/embeddings"):
            hidden = client.get(path, headers=theirs)
            assert hidden.status_code == 404, hidden.text  # as if it did not exist
            assert hidden.json()["error"]["message"] == f"no job {job_id!r}"
        # The 504 path's job id, from /v1/embeddings, is its key's too.
        answered = client.post(
            "/v1/embeddings", headers=mine, json={"input": "mine", "model": "minilm"}
        )
        job_of_request = answered.headers["x-embedq-job"]
        assert client.get(f"/v1/jobs/{job_of_request}", headers=mine).status_code == 200
        assert client.get(f"/v1/jobs/{job_of_request}", headers=theirs).status_code == 404
