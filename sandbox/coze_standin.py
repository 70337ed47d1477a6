"""coze-mitm SANDBOX: a strict local stand-in for the Coze API. THIS IS NOT COZE.

Nothing here talks to Coze. It is a small HTTP server (stdlib ``http.server`` + pyjwt +
cryptography, no mitmproxy) that behaves like the parts of the Coze API coze-mitm depends on, and is
as strict as Coze where that matters:

* ``POST /api/permission/oauth2/token`` checks the RS256 JWT like Coze does (alg, typ, kid,
  signature, iss, aud, iat, exp, single-use jti, optional session_name) and answers
  ``{"access_token": "czs_...", "expires_in": <absolute unix time>, "token_type": "Bearer"}``;
* the chat API (``/v3/chat`` streamed as SSE, conversations, messages, bot info) only accepts
  tokens it minted, and keeps every ``session_name`` in its own world, which is how the tests prove
  per-user isolation;
* knobs (``token_mode``, ``chat_mode``, ``token_delay``, ``delta_gap``, :meth:`CozeStandIn.revoke`)
  reproduce Coze's failure modes, and observation lists (``exchanges``, ``requests_seen``,
  ``placeholder_seen``) let tests see what reached "Coze".

It is labelled as a sandbox everywhere a person could see it: every answer carries
``Server: coze-sandbox``, the bot is called "Sandbox bot" and replies "Sandbox reply to: ...".

Used by the integration tests, by ``run_mitm.py --demo`` (a demo that needs no Coze account) and by
the benchmarks. Run it alone with::

    python -m sandbox.coze_standin --port 8790 --write-config /tmp/sandbox_oauth.json
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["CozeStandIn", "make_sandbox_app", "generate_key_pair", "TOKEN_PATH", "JWT_GRANT_TYPE", "SERVER_NAME", "BOT_NAME"]

TOKEN_PATH = "/api/permission/oauth2/token"
JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SERVER_NAME = "coze-sandbox"
BOT_NAME = "Sandbox bot"
BOT_DESCRIPTION = "coze-mitm sandbox, not Coze"
REPLY_PREFIX = "Sandbox reply to: "
DEFAULT_DURATION = 900
MAX_DURATION = 86399
IAT_FUTURE_LEEWAY = 60
MAX_BODY = 16 * 1024 * 1024
HANG_SECONDS = 30.0

TOKEN_MODES = ("ok", "http500", "garbage", "no_token", "expired", "duration", "hang")
CHAT_MODES = ("ok", "cut", "rate_limited", "no_permission", "not_published")
REVOKE_STYLES = ("401", "200")

# chat_mode -> the JSON error Coze answers (HTTP 200) instead of starting a chat
_CHAT_MODE_ERRORS = {
    "rate_limited": (4013, "sandbox: request rate limit exceeded, retry later"),
    "no_permission": (4101, "sandbox: no permission to chat with this bot"),
    "not_published": (4015, "sandbox: the bot is not published to the API channel"),
}

_ANY: Any = object()  # "any session" for exchange_count()
_PLACEHOLDER_COOKIE = re.compile(r"(?:^|[;,])\s*coze_user\s*=")


class _TokenError(Exception):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


class _BadRequestBody(Exception):
    pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, addr, handler, standin: "CozeStandIn"):
        self.standin = standin
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
        """Cut every open (keep-alive or streaming) connection, so nothing is served after stop()."""
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


class CozeStandIn:
    """A local SANDBOX standing in for the Coze API (not Coze). See the module docstring.

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

        # state
        self._used_jti: dict[str, float] = {}  # jti -> its exp (pruned once expired)
        self._tokens: dict[str, dict] = {}  # access token -> {session, session_name, expires_at, revoked}
        self._conversations: dict[str, dict] = {}  # conversation id -> conversation (has "session")
        self._chats: dict[str, dict] = {}  # chat id -> chat (has "session")
        self._ids = itertools.count(7_400_000_000_000_000_000 + secrets.randbelow(10**15) * 1000)
        self._logids = itertools.count(1)
        self._logid_salt = secrets.token_hex(3).upper()

        self._server = _Server((host, port), _Handler, self)
        self.port = int(self._server.server_address[1])
        # listening on all interfaces: clients (and the JWT aud) use the loopback address
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.audience = f"{self.host}:{self.port}"
        self.base_url = f"http://{self.audience}"

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
    def exchange_count(self, session_name: Any = _ANY) -> int:
        """Successful token exchanges; only those whose JWT had this session_name if given
        (``None`` counts exchanges whose JWT had no session_name)."""
        with self._lock:
            if session_name is _ANY:
                return len(self.exchanges)
            return sum(1 for e in self.exchanges if e["session_name"] == session_name)

    def reset_observations(self) -> None:
        with self._lock:
            self.exchanges.clear()
            self.requests_seen.clear()
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

    # ----------------------------------------------------------------- internals
    def _new_id(self) -> str:
        return str(next(self._ids))

    def _new_logid(self) -> str:
        return f"{time.strftime('%Y%m%d%H%M%S')}{self._logid_salt}{next(self._logids):010d}SANDBOX"

    def _record_request(self, handler: "_Handler") -> None:
        headers: dict[str, str] = {}
        placeholder = False
        for name, value in handler.headers.items():
            lname = name.lower()
            if lname in headers:
                headers[lname] += ("; " if lname == "cookie" else ", ") + value
            else:
                headers[lname] = value
            if lname == "authorization":
                scheme, _, cred = value.strip().partition(" ")
                if scheme.lower() == "bearer" and cred.strip().startswith("user:"):
                    placeholder = True
            elif lname == "cookie" and _PLACEHOLDER_COOKIE.search(value):
                placeholder = True
        split = urlsplit(handler.path)
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

    # --- token endpoint
    def _verify_jwt(self, authorization: str | None) -> dict:
        if not authorization:
            raise _TokenError(401, "invalid_request", "missing Authorization header: expected 'Bearer <JWT>'")
        scheme, _, tok = authorization.strip().partition(" ")
        tok = tok.strip()
        if scheme.lower() != "bearer" or not tok:
            raise _TokenError(401, "invalid_request", "Authorization must be 'Bearer <JWT>'")
        try:
            header = jwt.get_unverified_header(tok)
        except jwt.PyJWTError as e:
            raise _TokenError(401, "invalid_request", f"the bearer value is not a JWT ({e})") from None
        if header.get("alg") != "RS256":
            raise _TokenError(401, "invalid_client", f"JWT header alg must be RS256, got {header.get('alg')!r}")
        if header.get("typ") != "JWT":
            raise _TokenError(401, "invalid_request", f"JWT header typ must be 'JWT', got {header.get('typ')!r}")
        if header.get("kid") != self.kid:
            raise _TokenError(
                401, "invalid_client",
                f"unknown kid {header.get('kid')!r}: the JWT header kid must be the app's public_key_id",
            )
        try:
            decoded = jwt.PyJWS().decode_complete(tok, key=self._public_key, algorithms=["RS256"])
        except jwt.InvalidSignatureError:
            raise _TokenError(
                401, "invalid_client", "JWT signature does not verify with the public key registered for this kid"
            ) from None
        except jwt.PyJWTError as e:
            raise _TokenError(401, "invalid_request", f"JWT does not decode ({e})") from None
        try:
            claims = json.loads(decoded["payload"])
        except ValueError:
            claims = None
        if not isinstance(claims, dict):
            raise _TokenError(401, "invalid_request", "JWT payload is not a JSON object")

        now = time.time()
        if claims.get("iss") != self.client_id:
            raise _TokenError(401, "invalid_client", f"iss {claims.get('iss')!r} is not this app's client_id")
        if claims.get("aud") != self.audience:
            raise _TokenError(
                401, "invalid_request",
                f"aud {claims.get('aud')!r} must be the API host without scheme: {self.audience!r}",
            )
        for name in ("iat", "exp"):
            if not _is_number(claims.get(name)):
                raise _TokenError(401, "invalid_request", f"claim {name} is required (a unix time)")
        if claims["exp"] <= now:
            raise _TokenError(401, "invalid_request", "JWT expired: exp is in the past")
        if claims["iat"] > now + IAT_FUTURE_LEEWAY:
            raise _TokenError(401, "invalid_request", "JWT iat is in the future; check the clock")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > now + IAT_FUTURE_LEEWAY):
            raise _TokenError(401, "invalid_request", "JWT not valid yet (nbf)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _TokenError(401, "invalid_request", "claim jti is required (a fresh random string per JWT)")
        sn = claims.get("session_name")
        if sn is not None and not isinstance(sn, str):
            raise _TokenError(401, "invalid_request", "claim session_name must be a string")
        with self._lock:
            if jti in self._used_jti:
                raise _TokenError(401, "invalid_request", "jti already used: a JWT can be exchanged only once")
        return claims

    @staticmethod
    def _check_token_body(content_type: str | None, body: bytes) -> int:
        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _TokenError(400, "invalid_request", f"Content-Type must be application/json, got {content_type!r}")
        try:
            data = json.loads(body.decode("utf-8")) if body else None
        except (ValueError, UnicodeDecodeError):
            raise _TokenError(400, "invalid_request", "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _TokenError(400, "invalid_request", "request body must be a JSON object")
        gt = data.get("grant_type")
        if gt is None:
            raise _TokenError(400, "invalid_request", f"grant_type is required: {JWT_GRANT_TYPE!r}")
        if gt != JWT_GRANT_TYPE:
            raise _TokenError(
                400, "unsupported_grant_type", f"grant_type {gt!r} is not supported; use {JWT_GRANT_TYPE!r}"
            )
        d = data.get("duration_seconds")
        if d is None:
            return DEFAULT_DURATION
        if not _is_int(d) or not 1 <= d <= MAX_DURATION:
            raise _TokenError(
                400, "invalid_request", f"duration_seconds must be an integer in 1..{MAX_DURATION}, got {d!r}"
            )
        return d

    def _consume_jti(self, jti: str, exp: float) -> None:
        now = time.time()
        with self._lock:
            if jti in self._used_jti:
                raise _TokenError(401, "invalid_request", "jti already used: a JWT can be exchanged only once")
            if len(self._used_jti) > 50_000:  # an expired JWT is refused anyway: forget its jti
                self._used_jti = {j: e for j, e in self._used_jti.items() if e > now}
            self._used_jti[jti] = float(exp)

    def _issue_token(self, claims: dict, duration: int, mode: str) -> dict:
        now = time.time()
        token = "czs_" + secrets.token_urlsafe(36)
        if mode == "expired":
            expires_at = int(now) - 600
            answer = expires_at
        elif mode == "duration":
            expires_at = int(now + duration)
            answer = duration  # the wrong reading: a duration instead of an absolute time
        else:
            expires_at = int(now + duration)
            answer = expires_at
        sn = claims.get("session_name")
        with self._lock:
            self._tokens[token] = {
                "session": sn if sn is not None else "",
                "session_name": sn,
                "expires_at": expires_at,
                "revoked": None,
            }
            self.exchanges.append({
                "session_name": sn,
                "jti": claims["jti"],
                "duration_seconds": duration,
                "time": now,
                "access_token": token,
                "expires_in": answer,
                "token_mode": mode,
            })
        return {"access_token": token, "expires_in": answer, "token_type": "Bearer"}

    # --- API auth
    def _check_access(self, authorization: str | None) -> tuple[dict | None, str, str]:
        """-> (token record, problem, message); problem is "" when the token is good."""
        if not authorization:
            return None, "401", "missing Authorization header: expected 'Bearer <access token>'"
        scheme, _, tok = authorization.strip().partition(" ")
        tok = tok.strip()
        if scheme.lower() != "bearer" or not tok:
            return None, "401", "Authorization must be 'Bearer <access token>'"
        with self._lock:
            rec = self._tokens.get(tok)
            if rec is None:
                return None, "401", "access token unknown to this sandbox (not minted here)"
            if rec["revoked"] == "200":
                return None, "200", "access token invalid"
            if rec["revoked"] == "401":
                return None, "401", "access token revoked"
            if rec["expires_at"] <= time.time():
                return None, "401", "access token expired"
            return rec, "", ""

    # --- conversations, messages, chats (caller holds no lock; these take it)
    def _conversation_obj(self, conv: dict) -> dict:
        return {
            "id": conv["id"],
            "created_at": conv["created_at"],
            "updated_at": conv["updated_at"],
            "meta_data": dict(conv["meta_data"]),
            "last_section_id": conv["section_id"],
            "connector_id": "1024",
        }

    def _create_conversation(self, session: str, bot_id: str | None, meta_data: Any = None) -> dict:
        now = int(time.time())
        conv = {
            "id": self._new_id(),
            "session": session,
            "bot_id": bot_id,
            "created_at": now,
            "updated_at": now,
            "meta_data": {str(k): str(v) for k, v in meta_data.items()} if isinstance(meta_data, dict) else {},
            "section_id": self._new_id(),
            "messages": [],
        }
        with self._lock:
            self._conversations[conv["id"]] = conv
        return conv

    def _find_conversation(self, session: str, conv_id: Any) -> tuple[dict | None, tuple[int, str] | None]:
        if not isinstance(conv_id, str) or not conv_id:
            return None, (4000, "conversation_id is required")
        with self._lock:
            conv = self._conversations.get(conv_id)
        if conv is None:
            return None, (4000, f"conversation {conv_id} does not exist")
        if conv["session"] != session:
            return None, (4101, "no permission")
        return conv, None

    def _add_message(self, conv: dict, role: str, content: str, content_type: str = "text",
                     chat_id: str | None = None, bot_id: str | None = None, msg_type: str | None = None) -> dict:
        now = int(time.time())
        msg = {
            "id": self._new_id(),
            "conversation_id": conv["id"],
            "section_id": conv["section_id"],
            "bot_id": bot_id or conv.get("bot_id") or "",
            "chat_id": chat_id or "",
            "role": role,
            "type": msg_type or ("answer" if role == "assistant" else "question"),
            "content": content,
            "content_type": content_type,
            "meta_data": {},
            "created_at": now,
            "updated_at": now,
        }
        with self._lock:
            conv["messages"].append(msg)
            conv["updated_at"] = now
        return msg

    @staticmethod
    def _chat_obj(chat: dict) -> dict:
        obj = {k: chat[k] for k in ("id", "conversation_id", "bot_id", "created_at", "status")}
        obj["last_error"] = {"code": 0, "msg": ""}
        if chat.get("completed_at"):
            obj["completed_at"] = chat["completed_at"]
        if chat.get("failed_at"):
            obj["failed_at"] = chat["failed_at"]
        if chat["status"] == "completed":
            obj["usage"] = dict(chat["usage"])
        return obj


def _user_text(messages: Any) -> str:
    """The text of the last user message in additional_messages."""
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if not isinstance(m, dict) or m.get("role", "user") != "user":
            continue
        content = m.get("content")
        if not isinstance(content, str):
            continue
        if m.get("content_type") == "object_string":
            try:
                parts = json.loads(content)
                return " ".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
            except (ValueError, AttributeError, TypeError):
                return content
        return content
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    timeout = 300  # idle keep-alive connections give their thread back eventually
    server: _Server

    # --- plumbing
    def version_string(self) -> str:
        return SERVER_NAME

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    @property
    def standin(self) -> CozeStandIn:
        return self.server.standin

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _BadRequestBody("bad chunked encoding") from None
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise _BadRequestBody("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
        cl = self.headers.get("Content-Length")
        if cl is None:
            return b""
        try:
            n = int(cl)
        except ValueError:
            raise _BadRequestBody("bad Content-Length") from None
        if n < 0 or n > MAX_BODY:
            raise _BadRequestBody("bad Content-Length")
        return self.rfile.read(n) if n else b""

    def _send_bytes(self, status: int, data: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Tt-Logid", self.logid)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_bytes(status, _compact_json(obj).encode("utf-8"), "application/json; charset=utf-8")

    def _api_error(self, code: int, msg: str, status: int = 200) -> None:
        self._send_json(status, {"code": code, "msg": msg, "detail": {"logid": self.logid}})

    def _ok(self, data: Any, **extra: Any) -> None:
        body = {"code": 0, "msg": "", "data": data}
        body.update(extra)
        body["detail"] = {"logid": self.logid}
        self._send_json(200, body)

    def _json_body(self) -> dict | None:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    # --- dispatch
    def do_GET(self) -> None:
        self.logid = self.standin._new_logid()
        try:
            self.body = self._read_body()
        except _BadRequestBody as e:
            self.close_connection = True
            self.standin._record_request(self)
            return self._api_error(4000, str(e), 400)
        self.standin._record_request(self)
        if self.command == "OPTIONS":
            # deliberately no CORS headers: the proxy must answer preflights itself
            return self._send_bytes(200, b"", "text/plain; charset=utf-8")
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        path = split.path.rstrip("/") or "/"
        self._responded = False
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:  # a sandbox bug: say so (code 5000) rather than hang up silently
            self.close_connection = True
            traceback.print_exc()
            if not self._responded:
                self._api_error(5000, "internal error in the coze-mitm sandbox", 500)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    _ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
        TOKEN_PATH: (("POST",), "_h_token"),
        "/v1/conversation/create": (("POST",), "_h_conversation_create"),
        "/v1/conversations": (("GET",), "_h_conversations"),
        "/v1/conversation/retrieve": (("GET", "POST"), "_h_conversation_retrieve"),
        "/v1/conversation/message/list": (("POST",), "_h_message_list"),
        "/v3/chat": (("POST",), "_h_chat"),
        "/v3/chat/cancel": (("POST",), "_h_chat_cancel"),
        "/v3/chat/retrieve": (("GET", "POST"), "_h_chat_retrieve"),
        "/v3/chat/message/list": (("GET", "POST"), "_h_chat_message_list"),
        "/v1/bot/get_online_info": (("GET",), "_h_bot_online_info"),
        "/v1/files/upload": (("POST",), "_h_file_upload"),
    }
    _CLEAR = re.compile(r"^/v1/conversations/([^/]+)/clear$")
    _BOT = re.compile(r"^/v1/bots/([^/]+)$")

    def _route(self, path: str) -> None:
        method = self.command
        target: tuple[tuple[str, ...], str, tuple] | None = None
        if path in self._ROUTES:
            methods, name = self._ROUTES[path]
            target = (methods, name, ())
        elif m := self._CLEAR.match(path):
            target = (("POST",), "_h_conversation_clear", (unquote(m.group(1)),))
        elif m := self._BOT.match(path):
            target = (("GET",), "_h_bot", (unquote(m.group(1)),))
        if target is None:
            return self._api_error(4000, f"no such endpoint in the coze-mitm sandbox: {method} {path}", 404)
        methods, name, args = target
        if method not in methods:
            return self._api_error(4000, f"method {method} not allowed on {path}", 405)
        if name == "_h_token":
            return self._h_token()
        rec, problem, message = self.standin._check_access(self.headers.get("Authorization"))
        if problem == "200":
            return self._api_error(700012006, message)
        if problem:
            return self._api_error(4100, f"authentication is invalid: {message}", 401)
        self.session: str = rec["session"]
        getattr(self, name)(*args)

    # --- token endpoint
    def _h_token(self) -> None:
        st = self.standin
        try:
            claims = st._verify_jwt(self.headers.get("Authorization"))
            duration = st._check_token_body(self.headers.get("Content-Type"), self.body)
            st._consume_jti(claims["jti"], claims["exp"])
        except _TokenError as e:
            return self._send_json(
                e.status, {"error_code": e.error_code, "error_message": e.message, "error": e.error_code}
            )
        delay = st.token_delay
        if delay > 0 and st._stopping.wait(delay):
            self.close_connection = True
            return
        mode = st.token_mode
        if mode == "hang":
            if st._stopping.wait(HANG_SECONDS):
                self.close_connection = True
                return
            mode = "ok"
        if mode == "http500":
            return self._send_bytes(500, b"upstream exploded", "text/plain; charset=utf-8")
        if mode == "garbage":
            return self._send_bytes(200, b"<html>nope</html>", "text/html; charset=utf-8")
        if mode == "no_token":
            return self._send_json(200, {"token_type": "Bearer", "expires_in": int(time.time() + duration)})
        self._send_json(200, st._issue_token(claims, duration, mode))

    # --- conversations
    def _h_conversation_create(self) -> None:
        data = self._json_body()
        if data is None:
            return self._api_error(4000, "request body must be a JSON object")
        bot_id = data.get("bot_id")
        st = self.standin
        conv = st._create_conversation(self.session, bot_id if isinstance(bot_id, str) and bot_id else None,
                                       data.get("meta_data"))
        for m in data.get("messages") or []:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                role = m.get("role") if m.get("role") in ("user", "assistant") else "user"
                st._add_message(conv, role, m["content"], m.get("content_type") or "text")
        self._ok(st._conversation_obj(conv))

    def _h_conversations(self) -> None:
        bot_id = self.query.get("bot_id")
        if not bot_id:
            return self._api_error(4000, "bot_id is required")
        try:
            page_num = max(1, int(self.query.get("page_num") or 1))
            page_size = min(50, max(1, int(self.query.get("page_size") or 50)))
        except ValueError:
            return self._api_error(4000, "page_num and page_size must be integers")
        st = self.standin
        with st._lock:
            convs = [c for c in st._conversations.values()
                     if c["session"] == self.session and c["bot_id"] in (None, bot_id)]
            convs.sort(key=lambda c: (c["created_at"], c["id"]), reverse=True)
            start = (page_num - 1) * page_size
            page = [st._conversation_obj(c) for c in convs[start:start + page_size]]
            has_more = len(convs) > start + page_size
        self._ok({"conversations": page, "has_more": has_more})

    def _h_conversation_retrieve(self) -> None:
        conv, err = self.standin._find_conversation(self.session, self.query.get("conversation_id"))
        if err:
            return self._api_error(*err)
        self._ok(self.standin._conversation_obj(conv))

    def _h_conversation_clear(self, conv_id: str) -> None:
        st = self.standin
        conv, err = st._find_conversation(self.session, conv_id)
        if err:
            return self._api_error(*err)
        with st._lock:
            conv["messages"] = []
            conv["section_id"] = st._new_id()
            conv["updated_at"] = int(time.time())
        self._ok({"id": conv["section_id"], "conversation_id": conv["id"]})

    def _h_message_list(self) -> None:
        st = self.standin
        conv, err = st._find_conversation(self.session, self.query.get("conversation_id"))
        if err:
            return self._api_error(*err)
        data = self._json_body()
        if data is None:
            return self._api_error(4000, "request body must be a JSON object")
        limit = data.get("limit")
        limit = min(50, max(1, limit)) if _is_int(limit) else 50
        with st._lock:
            msgs = list(conv["messages"])
        if data.get("chat_id"):
            msgs = [m for m in msgs if m["chat_id"] == data["chat_id"]]
        if data.get("order", "desc") != "asc":
            msgs.reverse()
        ids = [m["id"] for m in msgs]
        if data.get("after_id"):
            msgs = msgs[ids.index(data["after_id"]) + 1:] if data["after_id"] in ids else []
            page = msgs[:limit]
        elif data.get("before_id"):
            msgs = msgs[:ids.index(data["before_id"])] if data["before_id"] in ids else []
            page = msgs[-limit:]
        else:
            page = msgs[:limit]
        self._ok(
            [dict(m) for m in page],
            first_id=page[0]["id"] if page else "",
            last_id=page[-1]["id"] if page else "",
            has_more=len(msgs) > len(page),
        )

    # --- chat
    def _h_chat(self) -> None:
        st = self.standin
        data = self._json_body()
        if data is None:
            return self._api_error(4000, "request body must be a JSON object")
        bot_id = data.get("bot_id")
        if not isinstance(bot_id, str) or not bot_id:
            return self._api_error(4000, "bot_id is required")
        user_id = data.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            return self._api_error(4000, "user_id is required")
        extra = data.get("additional_messages") or []
        if not isinstance(extra, list):
            return self._api_error(4000, "additional_messages must be a list")
        mode = st.chat_mode
        if mode in _CHAT_MODE_ERRORS:
            return self._api_error(*_CHAT_MODE_ERRORS[mode])
        conv_id = self.query.get("conversation_id")
        if conv_id:
            conv, err = st._find_conversation(self.session, conv_id)
            if err:
                return self._api_error(*err)
        else:
            conv = st._create_conversation(self.session, bot_id)
        now = int(time.time())
        chat = {
            "id": st._new_id(), "conversation_id": conv["id"], "bot_id": bot_id, "session": self.session,
            "user_id": user_id, "created_at": now, "status": "created", "completed_at": None, "failed_at": None,
            "usage": {"token_count": 0, "output_count": 0, "input_count": 0},
        }
        with st._lock:
            st._chats[chat["id"]] = chat
        for m in extra:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                role = m.get("role") if m.get("role") in ("user", "assistant") else "user"
                st._add_message(conv, role, m["content"], m.get("content_type") or "text",
                                chat_id=chat["id"], bot_id=bot_id)
        reply = REPLY_PREFIX + (_user_text(extra) or "(nothing)")
        chat["usage"] = {"input_count": len(_user_text(extra).split()), "output_count": len(reply.split())}
        chat["usage"]["token_count"] = chat["usage"]["input_count"] + chat["usage"]["output_count"]
        if data.get("stream") is True:
            return self._stream_chat(conv, chat, reply, cut=(mode == "cut"))
        st._add_message(conv, "assistant", reply, chat_id=chat["id"], bot_id=bot_id)
        chat["status"] = "completed"
        chat["completed_at"] = int(time.time())
        self._ok(st._chat_obj(chat))

    def _write_chunk(self, data: bytes) -> None:
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)
        self.wfile.flush()

    def _emit(self, event: str, data: Any) -> None:
        payload = _compact_json(data)
        self._write_chunk(f"event:{event}\ndata:{payload}\n\n".encode("utf-8"))

    def _stream_chat(self, conv: dict, chat: dict, reply: str, cut: bool) -> None:
        st = self.standin
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
        msg_id = st._new_id()
        base = {"id": msg_id, "conversation_id": conv["id"], "section_id": conv["section_id"],
                "bot_id": chat["bot_id"], "chat_id": chat["id"], "role": "assistant", "type": "answer",
                "content_type": "text"}
        pieces = re.findall(r"\S+\s*", reply)
        cut_after = max(1, min(3, len(pieces) - 1)) if cut else None
        try:
            self._emit("conversation.chat.created", st._chat_obj(chat))
            chat["status"] = "in_progress"
            self._emit("conversation.chat.in_progress", st._chat_obj(chat))
            for i, piece in enumerate(pieces):
                if i:
                    gap = st.delta_gap
                    if gap > 0 and st._stopping.wait(gap):
                        return self._abort(chat)
                if chat["status"] == "canceled":
                    self._emit("done", "[DONE]")
                    self._write_chunk(b"")
                    return
                if cut_after is not None and i >= cut_after:
                    return self._abort(chat)
                self._emit("conversation.message.delta", dict(base, content=piece))
            msg = st._add_message(conv, "assistant", reply, chat_id=chat["id"], bot_id=chat["bot_id"])
            with st._lock:  # the stored message keeps the id the deltas announced
                msg["id"] = msg_id
            now = int(time.time())
            self._emit("conversation.message.completed",
                       dict(base, content=reply, created_at=now, updated_at=now, meta_data={}))
            chat["status"] = "completed"
            chat["completed_at"] = now
            self._emit("conversation.chat.completed", st._chat_obj(chat))
            self._emit("done", "[DONE]")
            self._write_chunk(b"")  # end of the chunked body; the connection stays open (keep-alive)
        except OSError:  # the client went away mid-stream
            chat["status"] = "failed"
            chat["failed_at"] = int(time.time())
            self.close_connection = True

    def _abort(self, chat: dict) -> None:
        """Close the connection mid-stream: no done event, no terminating chunk."""
        chat["status"] = "failed"
        chat["failed_at"] = int(time.time())
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _find_chat(self, conv_id: Any, chat_id: Any) -> tuple[dict | None, tuple[int, str] | None]:
        if not conv_id or not chat_id:
            return None, (4000, "conversation_id and chat_id are required")
        with self.standin._lock:
            chat = self.standin._chats.get(chat_id)
        if chat is None or chat["conversation_id"] != conv_id:
            return None, (4000, f"chat {chat_id} does not exist in conversation {conv_id}")
        if chat["session"] != self.session:
            return None, (4101, "no permission")
        return chat, None

    def _h_chat_cancel(self) -> None:
        data = self._json_body() or {}
        chat, err = self._find_chat(data.get("conversation_id"), data.get("chat_id"))
        if err:
            return self._api_error(*err)
        if chat["status"] not in ("created", "in_progress"):
            return self._api_error(4104, f"chat is {chat['status']} and can no longer be canceled")
        chat["status"] = "canceled"
        self._ok(self.standin._chat_obj(chat))

    def _h_chat_retrieve(self) -> None:
        chat, err = self._find_chat(self.query.get("conversation_id"), self.query.get("chat_id"))
        if err:
            return self._api_error(*err)
        self._ok(self.standin._chat_obj(chat))

    def _h_chat_message_list(self) -> None:
        chat, err = self._find_chat(self.query.get("conversation_id"), self.query.get("chat_id"))
        if err:
            return self._api_error(*err)
        st = self.standin
        with st._lock:
            conv = st._conversations[chat["conversation_id"]]
            msgs = [dict(m) for m in conv["messages"] if m["chat_id"] == chat["id"] and m["role"] == "assistant"]
        self._ok(msgs)

    # --- files
    def _h_file_upload(self) -> None:
        """multipart/form-data with a `file` part (what @coze/api's files.upload sends); Coze's answer."""
        ctype = self.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/form-data") or "boundary=" not in ctype:
            return self._api_error(4000, "files/upload takes multipart/form-data with a 'file' part")
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + self.body)
        for part in form.iter_parts():
            if part.get_param("name", header="content-disposition") == "file" and part.get_filename():
                data = part.get_payload(decode=True) or b""
                return self._ok({"id": self.standin._new_id(), "bytes": len(data), "file_name": part.get_filename(),
                                 "created_at": int(time.time())})
        self._api_error(4000, "the multipart body has no 'file' part with a filename")

    # --- bot
    def _bot_obj(self, bot_id: str) -> dict:
        return {
            "bot_id": bot_id,
            "name": BOT_NAME,
            "description": BOT_DESCRIPTION,
            "icon_url": "",
            "create_time": 1700000000,
            "update_time": 1700000000,
            "version": "sandbox",
            "bot_mode": 0,
            "onboarding_info": {
                "prologue": "This is the coze-mitm sandbox, not Coze: replies are canned.",
                "suggested_questions": [],
            },
        }

    def _h_bot(self, bot_id: str) -> None:
        self._ok(self._bot_obj(bot_id))

    def _h_bot_online_info(self) -> None:
        bot_id = self.query.get("bot_id")
        if not bot_id:
            return self._api_error(4000, "bot_id is required")
        self._ok(self._bot_obj(bot_id))


def generate_key_pair() -> tuple[str, str]:
    """A throwaway RSA-2048 key pair as PEM strings: (PKCS8 private key, SubjectPublicKeyInfo public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private_pem, public_pem


def make_sandbox_app(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[CozeStandIn, dict]:
    """Generate a throwaway RSA-2048 key; return (stand-in, oauth config dict exactly like the Coze
    console's file: client_type "jwt", client_id, coze_www_base, coze_api_base = the stand-in's
    base_url, private_key (PKCS8 PEM, str), public_key_id). The stand-in is bound but not started:
    call ``.start()`` (or use it as a context manager)."""
    private_pem, public_pem = generate_key_pair()
    kid = "sandbox_" + secrets.token_urlsafe(24)
    client_id = "11" + "".join(secrets.choice("0123456789") for _ in range(11))
    standin = CozeStandIn(public_pem, kid, client_id, host=host, port=port, **kw)
    config = {
        "client_type": "jwt",
        "client_id": client_id,
        "coze_www_base": standin.base_url,
        "coze_api_base": standin.base_url,
        "private_key": private_pem,
        "public_key_id": kid,
    }
    return standin, config


def write_config(path: str, config: dict) -> None:
    """Write the config JSON with mode 0600 (it holds a private key, even if a throwaway one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(config, indent=2) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sandbox.coze_standin",
        description="Run the coze-mitm SANDBOX (a local stand-in for the Coze API; it is NOT Coze) "
                    "with a throwaway key.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--write-config", metavar="PATH", help="write the OAuth app config JSON (mode 0600) here")
    p.add_argument("--delta-gap", type=float, default=0.05, help="seconds between SSE deltas")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds before answering a token request")
    args = p.parse_args(argv)
    standin, config = make_sandbox_app(args.host, args.port, delta_gap=args.delta_gap, token_delay=args.token_delay)
    if args.write_config:
        write_config(args.write_config, config)
    standin.start()
    print(standin.base_url, flush=True)
    print(f"coze-mitm SANDBOX (not Coze) serving at {standin.base_url}"
          + (f"; OAuth config written to {args.write_config}" if args.write_config else "")
          + "; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
