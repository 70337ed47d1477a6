"""Small HTTP(S) servers that tests run in a thread of their own: the server and handler every such server
builds on (fake Coze hosts, fronts, page hosts), the HTTPS page that names its host, and a certificate chain
file for a server."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization


class Server(ThreadingHTTPServer):
    """`handler` on a free port of `address`, served from a daemon thread once started."""

    daemon_threads = True
    request_queue_size = 128  # many clients at once (test_budgets_billed.py): no connection left unaccepted
    quiet = False  # True: a client that goes away mid-answer is expected (no traceback on stderr)

    def __init__(self, handler: type[BaseHTTPRequestHandler], address: str = "127.0.0.1"):
        super().__init__((address, 0), handler)
        self.port = self.server_address[1]
        self.base_url = f"http://{address}:{self.port}"

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        if not self.quiet:
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive, as Coze and browsers speak it), no log lines, one call to answer."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HostPage(Handler):
    """A page titled with the Host it was asked for, `<p id=ok>served</p>` in it (a browser test reads #ok)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.send(200, f"<!doctype html><title>{self.headers['Host']}</title><p id=ok>served</p>".encode(),
                  "text/html")


def https(server: Server, context: ssl.SSLContext) -> Server:
    """`server` speaking TLS with `context`; a refused or broken handshake is the client's business."""
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.quiet = True
    return server


def write_chain(path: Path, key, *certs) -> Path:
    """A PEM file with `key` (unencrypted PKCS8) and then `certs`, as ssl's load_cert_chain and the stand-in read it."""
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def server_context(chain: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return context
