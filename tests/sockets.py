"""Raw HTTP/1.1 over sockets, for tests of what a server does with clients that no HTTP
library would let a test be: too big, too slow, or gone mid-request."""

from __future__ import annotations

import socket


def send_until_refused(sock: socket.socket, chunk: bytes, total: int) -> int:
    """Send ``chunk`` until ``total`` bytes went or the server closed the connection; the
    bytes sent (what went beyond the server's reading sat in the two sockets' buffers)."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def read_all(sock: socket.socket) -> bytes:
    """What the server sent until it closed (a reset can take unread bytes with it)."""
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return got
