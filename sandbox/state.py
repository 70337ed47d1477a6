"""The stand-in's state, knobs and observations, in one object every endpoint is handed.

A leaf module: it imports nothing from the sandbox but :mod:`sandbox.common`. ``lock`` guards the
stores; ``stopping`` is set when the stand-in stops (waits in endpoints end early on it).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from .common import ANY, CHAT_MODES, PLACEHOLDER_COOKIE, REVOKE_STYLES, TOKEN_MODES, is_placeholder


class State:
    """What the sandbox knows: the app it verifies JWTs for (``public_key``, ``kid``, ``client_id``,
    ``audience``), its knobs (``token_mode``, ``chat_mode``, ``token_delay``, ``delta_gap``), its stores
    (``tokens``, ``used_jti``, ``conversations``, ``chats``, ``files``) and what tests observe
    (``exchanges``, ``requests_seen``, ``placeholder_seen``, ``ws_seen``)."""

    def __init__(self, public_key: Any, kid: str, client_id: str, token_delay: float = 0.0, delta_gap: float = 0.05):
        self.public_key = public_key  # an RSA public key object (cryptography)
        self.kid = kid
        self.client_id = client_id
        self.audience = ""  # the API host without scheme (host:port), set once the server is bound
        self.token_delay = float(token_delay)
        self.delta_gap = float(delta_gap)
        self._token_mode = "ok"
        self._chat_mode = "ok"

        self.lock = threading.RLock()
        self.stopping = threading.Event()

        # observation
        self.exchanges: list[dict] = []
        self.requests_seen: list[dict] = []
        self.placeholder_seen = 0
        # WebSocket handshakes: {path, query_authorization, header_authorization, session (None: refused),
        # status (101 or the refusal's), time}
        self.ws_seen: list[dict] = []

        # stores
        self.used_jti: dict[str, float] = {}  # jti -> its exp (pruned once expired)
        self.tokens: dict[str, dict] = {}  # access token -> {session, session_name, expires_at, revoked}
        self.conversations: dict[str, dict] = {}  # conversation id -> conversation (has "session")
        self.chats: dict[str, dict] = {}  # chat id -> chat (has "session")
        self.files: dict[str, dict] = {}  # file id -> uploaded file (has "session")
        self.workflow_runs: dict[str, dict] = {}  # execute id -> workflow run (has "session", "billed")
        self._ids = itertools.count(7_400_000_000_000_000_000 + secrets.randbelow(10**15) * 1000)
        self._logids = itertools.count(1)
        self._logid_salt = secrets.token_hex(3).upper()

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

    # ----------------------------------------------------------------- ids
    def new_id(self) -> str:
        return str(next(self._ids))

    def new_logid(self) -> str:
        return f"{time.strftime('%Y%m%d%H%M%S')}{self._logid_salt}{next(self._logids):010d}SANDBOX"

    # ----------------------------------------------------------------- observation
    def record_request(self, method: str, target: str, header_items: Iterable[tuple[str, str]], logid: str) -> None:
        """Note a request as it arrived (headers joined per name), and whether it carried a placeholder."""
        headers: dict[str, str] = {}
        placeholder = False
        for name, value in header_items:
            lname = name.lower()
            if lname in headers:
                headers[lname] += ("; " if lname == "cookie" else ", ") + value
            else:
                headers[lname] = value
            if lname == "authorization" and is_placeholder(value):
                placeholder = True
            elif lname == "cookie" and PLACEHOLDER_COOKIE.search(value):
                placeholder = True
        split = urlsplit(target)
        # browsers cannot set headers on a WebSocket: the token (or a placeholder) rides in the query
        if any(is_placeholder(v) for v in parse_qs(split.query).get("authorization", [])):
            placeholder = True
        with self.lock:
            self.requests_seen.append({
                "method": method,
                "path": split.path,
                "query": split.query,
                "target": target,
                "headers": headers,
                "time": time.time(),
                "logid": logid,
            })
            if placeholder:
                self.placeholder_seen += 1

    def exchange_count(self, session_name: Any = ANY) -> int:
        """Successful token exchanges; only those whose JWT had this session_name if given
        (``None`` counts exchanges whose JWT had no session_name)."""
        with self.lock:
            if session_name is ANY:
                return len(self.exchanges)
            return sum(1 for e in self.exchanges if e["session_name"] == session_name)

    def reset_observations(self) -> None:
        with self.lock:
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
        with self.lock:
            for tok, rec in self.tokens.items():
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
        with self.lock:
            return [t for t, r in self.tokens.items() if r["session"] == session_name]

    def chats_of(self, session_name: Any = ANY) -> list[dict]:
        """Copies of the chats (HTTP, workflow and WebSocket) of a session, oldest first: id,
        conversation_id, user_id, status, usage (what conversation.chat.completed reported), ..."""
        with self.lock:
            return [dict(c, usage=dict(c["usage"])) for c in self.chats.values()
                    if session_name is ANY or c["session"] == session_name]

    def usage_of(self, session_name: Any = ANY) -> dict:
        """What Coze would charge a session: the usage of its completed chats (also those that ran on after
        their client went away) and of its workflow runs (every call's, finished or not), summed up."""
        total = {"token_count": 0, "output_count": 0, "input_count": 0}
        for c in self.chats_of(session_name):
            if c["status"] == "completed":
                for k in total:
                    total[k] += c["usage"][k]
        with self.lock:
            for r in self.workflow_runs.values():
                if (session_name is ANY or r["session"] == session_name) and r["billed"]:
                    for k in total:
                        total[k] += r["billed"][k]
        return total

    def files_of(self, session_name: Any = ANY) -> list[dict]:
        """Copies of the files uploaded by a session: id, file_name, content_type, bytes, sha256, ..."""
        with self.lock:
            return [dict(f) for f in self.files.values() if session_name is ANY or f["session"] == session_name]

    def feedback_of(self, message_id: str) -> dict | None:
        """The feedback given on a message ({feedback_type, comment, reason_types}), None if none."""
        with self.lock:
            for conv in self.conversations.values():
                for m in conv["messages"]:
                    if m["id"] == message_id:
                        return dict(m["feedback"]) if "feedback" in m else None
        return None
