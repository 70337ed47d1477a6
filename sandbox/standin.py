"""``CozeStandIn``: the sandbox's state, knobs and observations; one server on one port (HTTP and WebSocket)."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .common import ANY, CHAT_MODES, PLACEHOLDER_COOKIE, REVOKE_STYLES, TOKEN_MODES, is_placeholder
from .server import Handler, Server


class CozeStandIn:
    """A local SANDBOX standing in for the Coze API (not Coze). See :mod:`sandbox.coze_standin`.

    The socket is bound in ``__init__`` so :attr:`base_url` (with the real port) is known before
    :meth:`start`. Knobs are plain attributes and may be changed at any time, also while serving.
    """

    def __init__(
        self,
        public_key_pem: str | bytes,
        kid: str,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 0,
        token_delay: float = 0.0,
        delta_gap: float = 0.05,
    ):
        if isinstance(public_key_pem, str):
            public_key_pem = public_key_pem.encode()
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the sandbox verifies RS256 JWTs: public_key_pem must be an RSA public key")
        self._public_key = key
        self.kid = kid
        self.client_id = client_id
        self.token_delay = float(token_delay)
        self.delta_gap = float(delta_gap)
        self._token_mode = "ok"
        self._chat_mode = "ok"

        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

        # observation
        self.exchanges: list[dict] = []
        self.requests_seen: list[dict] = []
        self.placeholder_seen = 0
        # WebSocket handshakes: {path, query_authorization, header_authorization, session (None: refused),
        # status (101 or the refusal's), time}
        self.ws_seen: list[dict] = []

        # state
        self._used_jti: dict[str, float] = {}  # jti -> its exp (pruned once expired)
        self._tokens: dict[str, dict] = {}  # access token -> {session, session_name, expires_at, revoked}
        self._conversations: dict[str, dict] = {}  # conversation id -> conversation (has "session")
        self._chats: dict[str, dict] = {}  # chat id -> chat (has "session")
        self._files: dict[str, dict] = {}  # file id -> uploaded file (has "session")
        self._ids = itertools.count(7_400_000_000_000_000_000 + secrets.randbelow(10**15) * 1000)
        self._logids = itertools.count(1)
        self._logid_salt = secrets.token_hex(3).upper()

        self._server = Server((host, port), Handler, self)
        self.port = int(self._server.server_address[1])
        # listening on all interfaces: clients (and the JWT aud) use the loopback address
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.audience = f"{self.host}:{self.port}"
        self.base_url = f"http://{self.audience}"
        self.ws_url = f"ws://{self.audience}"  # the WebSocket APIs (/v1/chat, ...) on the same port

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "CozeStandIn":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"coze-sandbox:{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        self._server.drop_connections()

    def __enter__(self) -> "CozeStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CozeStandIn SANDBOX (not Coze) at {self.base_url}>"

    # ----------------------------------------------------------------- knobs
    @property
    def token_mode(self) -> str:
        return self._token_mode

    @token_mode.setter
    def token_mode(self, value: str) -> None:
        if value not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {value!r}")
        self._token_mode = value

    @property
    def chat_mode(self) -> str:
        return self._chat_mode

    @chat_mode.setter
    def chat_mode(self, value: str) -> None:
        if value not in CHAT_MODES:
            raise ValueError(f"chat_mode must be one of {CHAT_MODES}, got {value!r}")
        self._chat_mode = value

    # ----------------------------------------------------------------- observation
    def exchange_count(self, session_name: Any = ANY) -> int:
        """Successful token exchanges; only those whose JWT had this session_name if given
        (``None`` counts exchanges whose JWT had no session_name)."""
        with self._lock:
            if session_name is ANY:
                return len(self.exchanges)
            return sum(1 for e in self.exchanges if e["session_name"] == session_name)

    def reset_observations(self) -> None:
        with self._lock:
            self.exchanges.clear()
            self.requests_seen.clear()
            self.ws_seen.clear()
            self.placeholder_seen = 0

    def revoke(self, session_name: str | None = None, token: str | None = None, style: str = "401") -> int:
        """Revoke one token, or every token of a session (``""`` = the shared no-session_name session),
        or every token when both are None. Later calls with a revoked token answer HTTP 401 code 4100
        (style "401") or HTTP 200 code 700012006 (style "200"). Returns how many tokens this revoked."""
        if style not in REVOKE_STYLES:
            raise ValueError(f"style must be one of {REVOKE_STYLES}, got {style!r}")
        n = 0
        with self._lock:
            for tok, rec in self._tokens.items():
                if token is not None:
                    hit = tok == token
                elif session_name is not None:
                    hit = rec["session"] == session_name
                else:
                    hit = True
                if hit and rec["revoked"] is None:
                    rec["revoked"] = style
                    n += 1
        return n

    def tokens_of(self, session_name: str) -> list[str]:
        """Access tokens minted for a session ("" = no session_name), oldest first."""
        with self._lock:
            return [t for t, r in self._tokens.items() if r["session"] == session_name]

    def chats_of(self, session_name: Any = ANY) -> list[dict]:
        """Copies of the chats (HTTP, workflow and WebSocket) of a session, oldest first: id,
        conversation_id, status, usage (what conversation.chat.completed reported), ..."""
        with self._lock:
            return [dict(c, usage=dict(c["usage"])) for c in self._chats.values()
                    if session_name is ANY or c["session"] == session_name]

    def usage_of(self, session_name: Any = ANY) -> dict:
        """The usage of the completed chats of a session summed up: what Coze would charge for it."""
        total = {"token_count": 0, "output_count": 0, "input_count": 0}
        for c in self.chats_of(session_name):
            if c["status"] == "completed":
                for k in total:
                    total[k] += c["usage"][k]
        return total

    def files_of(self, session_name: Any = ANY) -> list[dict]:
        """Copies of the files uploaded by a session: id, file_name, content_type, bytes, sha256, ..."""
        with self._lock:
            return [dict(f) for f in self._files.values() if session_name is ANY or f["session"] == session_name]

    def feedback_of(self, message_id: str) -> dict | None:
        """The feedback given on a message ({feedback_type, comment, reason_types}), None if none."""
        with self._lock:
            for conv in self._conversations.values():
                for m in conv["messages"]:
                    if m["id"] == message_id:
                        return dict(m["feedback"]) if "feedback" in m else None
        return None

    # ----------------------------------------------------------------- internals
    def _new_id(self) -> str:
        return str(next(self._ids))

    def _new_logid(self) -> str:
        return f"{time.strftime('%Y%m%d%H%M%S')}{self._logid_salt}{next(self._logids):010d}SANDBOX"

    def _record_request(self, handler: Handler) -> None:
        headers: dict[str, str] = {}
        placeholder = False
        for name, value in handler.headers.items():
            lname = name.lower()
            if lname in headers:
                headers[lname] += ("; " if lname == "cookie" else ", ") + value
            else:
                headers[lname] = value
            if lname == "authorization" and is_placeholder(value):
                placeholder = True
            elif lname == "cookie" and PLACEHOLDER_COOKIE.search(value):
                placeholder = True
        split = urlsplit(handler.path)
        # browsers cannot set headers on a WebSocket: the token (or a placeholder) rides in the query
        if any(is_placeholder(v) for v in parse_qs(split.query).get("authorization", [])):
            placeholder = True
        with self._lock:
            self.requests_seen.append({
                "method": handler.command,
                "path": split.path,
                "query": split.query,
                "target": handler.path,
                "headers": headers,
                "time": time.time(),
                "logid": handler.logid,
            })
            if placeholder:
                self.placeholder_seen += 1
