"""The sandbox's HTTP plumbing: a threading server that can cut its connections, and the request
handler every endpoint receives (body, JSON envelope, Server-Sent Events). It knows no endpoint: each
request goes to the ``dispatch`` callable the server was made with (routes.dispatch, see standin.py)."""

from __future__ import annotations

import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from . import go_json
from .common import MAX_BODY, SERVER_NAME, BadRequestBody, compact_json


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, addr, handler, dispatch: Callable[["Handler"], None]):
        self.dispatch = dispatch
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut every open (keep-alive, streaming or WebSocket) connection, so nothing is served after stop()."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # a client that went away is normal; anything else is a sandbox bug worth a traceback
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """One connection. For each request it reads the body (``body``; ``body_error`` says why it could
    not), the query (``query``, the last value of each parameter) and the path without trailing slash
    (``route_path``, decoded and cleaned as a Go router reads it), then calls the server's ``dispatch(req)``, which sets ``logid`` and ``session``
    (the caller's session_name, "" without one). Endpoints answer with ``ok()``, ``error()``,
    ``send_json()``, ``send_bytes()`` and the SSE helpers; ``json_body()`` reads a JSON object."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    timeout = 300  # idle keep-alive connections give their thread back eventually
    server: Server

    # --- plumbing
    def version_string(self) -> str:
        return SERVER_NAME

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise BadRequestBody("bad chunked encoding") from None
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise BadRequestBody("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        try:
            n = int(cl)
        except ValueError:
            raise BadRequestBody("bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise BadRequestBody("bad Content-Length")
        return self.rfile.read(n) if n else b""

    def send_bytes(self, status: int, data: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Tt-Logid", self.logid)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, compact_json(obj).encode("utf-8"), "application/json; charset=utf-8")

    def error(self, code: int, msg: str, status: int = 200) -> None:
        """Coze's error envelope (most errors come with HTTP 200)."""
        self.send_json(status, {"code": code, "msg": msg, "detail": {"logid": self.logid}})

    def ok(self, data: Any, **extra: Any) -> None:
        body = {"code": 0, "msg": "", "data": data}
        body.update(extra)
        body["detail"] = {"logid": self.logid}
        self.send_json(200, body)

    def json_body(self) -> dict | None:
        """The body as a JSON object ({} when empty), None when it is not one. Read as a Go server reads it
        (go_json.py): keys case-insensitively, the last one winning, invalid UTF-8 as U+FFFD, nesting to
        10,000 levels, and what follows the object ignored (gin's ShouldBindJSON reads with a json.Decoder)."""
        if not self.body:
            return {}
        try:
            data = go_json.decode(self.body, rest_ignored=True)
        except go_json.GoSyntaxError:
            return None
        return data if isinstance(data, dict) else None

    # --- Server-Sent Events (text/event-stream, frames event:<name>\ndata:<json>\n\n like Coze's)
    def start_stream(self) -> None:
        # HTTP/1.1: chunked, the connection stays open; an HTTP/1.0 client gets the body up to close
        self._chunked = self.request_version != "HTTP/1.0"
        if not self._chunked:
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Tt-Logid", self.logid)
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)
        self.wfile.flush()

    def emit(self, event: str, data: Any) -> None:
        self.write_chunk(f"event:{event}\ndata:{compact_json(data)}\n\n".encode("utf-8"))

    def end_stream(self) -> None:
        self.write_chunk(b"")  # end of the chunked body; the connection stays open (keep-alive)

    def cut(self) -> None:
        """Close the connection mid-answer: no terminating chunk."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- one request
    def do_GET(self) -> None:
        self.logid = ""
        self.session = ""
        self.body_error: str | None = None
        try:
            self.body = self._read_body()
        except BadRequestBody as e:
            self.close_connection = True
            self.body, self.body_error = b"", str(e)
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.route_path = go_json.route(self.path)  # as a Go router serves it: /v3/%63hat is /v3/chat
        self._responded = False
        try:
            self.server.dispatch(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:  # a sandbox bug: say so (code 5000) rather than hang up silently
            self.close_connection = True
            traceback.print_exc()
            if not self._responded:
                self.error(5000, "internal error in the coze-mitm sandbox", 500)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    @property
    def is_upgrade(self) -> bool:
        """A WebSocket handshake: GET with ``Upgrade: websocket``."""
        return self.command == "GET" and self.headers.get("Upgrade", "").strip().lower() == "websocket"
