"""Coze's WebSocket APIs on the sandbox's port: the handshake (token from the ``authorization`` query
parameter and/or the header, as @coze/api sends it), framing (wsproto, which mitmproxy brings) and the JSON event envelope
``{id, event_type, data, detail: {logid}}``. The endpoints, and what each says, are in ws_events.py.

Every handshake is recorded in ``state.ws_seen`` (the path, both authorizations exactly as they
arrived, the session they resolved to, the status answered), so proxy tests can tell that the real
token arrived and no placeholder did.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, generate_accept_token

from . import go_json, tokens
from .common import compact_json

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

MAX_MESSAGE = 1024 * 1024  # a client event bigger than this closes the socket (1009)


class WsSession:
    """One accepted WebSocket: ``send(event_type, data)`` from any thread, ``events()`` in the handler's."""

    def __init__(self, st: "State", req: "Handler"):
        self.req = req
        self.state = st
        self.session: str = req.session
        self.conn = Connection(ConnectionType.SERVER)
        self._send_lock = threading.Lock()
        self.closed = False

    def _write(self, event: Any) -> None:
        with self._send_lock:
            if self.closed:
                return
            try:
                data = self.conn.send(event)
            except LocalProtocolError:  # the connection closed meanwhile (the other thread saw it first)
                self.closed = True
                return
            self.req.wfile.write(data)
            self.req.wfile.flush()

    def send(self, event_type: str, data: Any = None, event_id: str | None = None) -> None:
        obj: dict[str, Any] = {"id": event_id or self.state.new_id(), "event_type": event_type}
        if data is not None:
            obj["data"] = data
        obj["detail"] = {"logid": self.req.logid}
        self._write(TextMessage(data=compact_json(obj)))

    def error(self, code: int, msg: str) -> None:
        self.send("error", {"code": code, "msg": msg})

    def events(self) -> Iterator[dict]:
        """The client's events (JSON objects) until it closes; answers pings and the closing handshake.
        Text that is not a JSON object gets an ``error`` event and is skipped."""
        text: list[str] = []
        size = 0
        while not self.closed:
            try:
                chunk = self.req.rfile.read1(65536)
            except (OSError, ValueError):
                chunk = b""
            self.conn.receive_data(chunk or None)
            for ev in self.conn.events():
                if isinstance(ev, Ping):
                    self._write(ev.response())
                elif isinstance(ev, CloseConnection):
                    if self.conn.state is ConnectionState.REMOTE_CLOSING:  # not after a dropped connection
                        self._write(ev.response())
                    self.closed = True
                elif isinstance(ev, (TextMessage, BytesMessage)):
                    size += len(ev.data)
                    if size > MAX_MESSAGE:
                        self.close(1009, "message too big")
                        return
                    # Binary messages are read as events too (a Go server reading every message with
                    # encoding/json does), their bytes as Go reads them (invalid UTF-8 as U+FFFD).
                    text.append(ev.data if isinstance(ev, TextMessage) else ev.data.decode("utf-8", "replace"))
                    if ev.message_finished:
                        raw, text, size = "".join(text), [], 0
                        try:
                            obj = go_json.decode(raw, rest_ignored=True)  # Go-style (go_json.py), trailing data ignored
                        except go_json.GoSyntaxError:
                            obj = None
                        if isinstance(obj, dict) and isinstance(obj.get("event_type"), str):
                            yield obj
                        else:
                            self.error(4000, "an event must be a JSON object with an event_type")
            if not chunk:
                self.closed = True

    def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            self._write(CloseConnection(code=code, reason=reason))
        except OSError:
            pass
        self.closed = True


def _refuse(req: "Handler", seen: dict, status: int, code: int, msg: str) -> None:
    seen["status"] = status
    req.error(code, msg, status)


def accept(st: "State", req: "Handler") -> WsSession | None:
    """Check the handshake and the token(s); answer 101 and return the session, or answer the refusal
    (JSON, before any upgrade) and return None."""
    query_auth = req.query.get("authorization")
    header_auth = req.headers.get("Authorization")
    seen = {"path": req.path.split("?", 1)[0], "query_authorization": query_auth, "header_authorization": header_auth,
            "origin": req.headers.get("Origin"), "session": None, "status": None, "time": time.time()}
    with st.lock:
        st.ws_seen.append(seen)
    key = req.headers.get("Sec-WebSocket-Key")
    if not key or req.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        _refuse(req, seen, 400, 4000, "a WebSocket handshake needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13")
        return None
    credentials = [c for c in (query_auth, header_auth) if c]
    if not credentials:
        _refuse(req, seen, 401, 4100, "authentication is invalid: no token in the authorization query parameter "
                                      "or the Authorization header")
        return None
    sessions = set()
    for credential in credentials:
        rec, problem, message = tokens.check_access(st, credential)
        if problem:
            _refuse(req, seen, 401, 4100, f"authentication is invalid: {message}")
            return None
        sessions.add(rec["session"])
    if len(sessions) > 1:
        _refuse(req, seen, 401, 4100, "authentication is invalid: the query's and the header's tokens disagree")
        return None
    req.session = sessions.pop()
    seen["session"] = req.session
    seen["status"] = 101
    req.close_connection = True  # after the WebSocket, no more HTTP on this connection
    req.send_response(101)
    req.send_header("Upgrade", "websocket")
    req.send_header("Connection", "Upgrade")
    req.send_header("Sec-WebSocket-Accept", generate_accept_token(key.strip().encode()).decode())
    req.send_header("X-Tt-Logid", req.logid)
    req.end_headers()
    req.wfile.flush()
    return WsSession(st, req)
