"""Raw sockets for tests that speak HTTP by hand: read one answer's head (or head and body), pipe one direction
of a relay. Only the standard library: a script run inside a network namespace imports it too
(tests/test_remote.py)."""

from __future__ import annotations

import socket
import time


def read_head(sock: socket.socket) -> bytes:
    """What `sock` sends up to the end of an HTTP head (`\\r\\n\\r\\n`), and whatever came with it in the same
    read; what it sent before closing if it closed earlier."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer from `sock`: its head and a body of its Content-Length (none: no body); what it sent
    before closing if it closed earlier."""
    data = read_head(sock)
    if b"\r\n\r\n" not in data:
        return data
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def pipe(src: socket.socket, dst: socket.socket, hold: float = 0.0) -> None:
    """Copy what `src` sends to `dst` until `src` ends or either fails (each chunk `hold` seconds late, for a
    peer further away); then shut both down, so the other direction ends too."""
    try:
        while data := src.recv(65536):
            if hold:
                time.sleep(hold)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
