"""THE list of every endpoint the sandbox answers: method, path pattern, handler; and ``dispatch``,
which the server calls for each request (standin.py hands it the state).

A handler is called as ``handler(state, req, *path_args)``.

``{name}`` in a pattern matches one path segment and is passed to the handler (URL-decoded).
Method ``WS`` is a WebSocket upgrade (``GET`` with ``Upgrade: websocket``) on the same port; the
same path may answer plain HTTP methods too (``/v1/audio/speech``: POST is HTTP, an upgrade is the
WebSocket; a GET without upgrade answers 426).
Every endpoint but the token exchange and the WebSockets (which read the token from the query
string as well, see websocket.py) first checks ``Authorization: Bearer <access token>`` against the
tokens this sandbox minted. A path that matches no pattern answers 404, a method that is not listed
for it 405, both in Coze's envelope (code 4000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable
from urllib.parse import unquote

from . import audio, bots, chat, conversations, files, messages, tokens, workflows, ws_events
from .common import TOKEN_PATH

if TYPE_CHECKING:
    from .server import Handler
    from .state import State


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Callable
    auth: bool = True  # the handler runs only for a valid access token (req.session is its session)
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        regex = "^" + re.sub(r"\\\{[a-z_]+\\\}", "([^/]+)", re.escape(self.pattern)) + "$"
        object.__setattr__(self, "regex", re.compile(regex))


ROUTES: tuple[Route, ...] = (
    # token exchange (OAuth JWT flow)
    Route("POST", TOKEN_PATH, tokens.token, auth=False),
    # bots, apps, workflows
    Route("GET", "/v1/bots/{bot_id}", bots.bot),
    Route("GET", "/v1/bot/get_online_info", bots.bot_online_info),
    Route("GET", "/v1/apps/{app_id}", bots.app),
    Route("GET", "/v1/workflows/{workflow_id}", bots.workflow),
    # conversations
    Route("POST", "/v1/conversation/create", conversations.create),
    Route("POST", "/v1/workflow/conversation/create", conversations.workflow_create),
    Route("GET", "/v1/conversations", conversations.list_),
    Route("GET", "/v1/conversation/retrieve", conversations.retrieve),
    Route("POST", "/v1/conversation/retrieve", conversations.retrieve),
    Route("PUT", "/v1/conversations/{conversation_id}", conversations.update),
    Route("DELETE", "/v1/conversations/{conversation_id}", conversations.delete),
    Route("POST", "/v1/conversations/{conversation_id}/clear", conversations.clear),
    # messages
    Route("POST", "/v1/conversation/message/list", messages.list_),
    Route("POST", "/v1/conversation/message/delete", messages.delete),
    Route("POST", "/v1/conversations/{conversation_id}/messages/{message_id}/feedback", messages.feedback),
    Route("DELETE", "/v1/conversations/{conversation_id}/messages/{message_id}/feedback", messages.feedback_delete),
    # chat (JSON or SSE) and app-mode chat (SSE)
    Route("POST", "/v3/chat", chat.chat),
    Route("POST", "/v3/chat/cancel", chat.cancel),
    Route("GET", "/v3/chat/retrieve", chat.retrieve),
    Route("POST", "/v3/chat/retrieve", chat.retrieve),
    Route("GET", "/v3/chat/message/list", chat.message_list),
    Route("POST", "/v3/chat/message/list", chat.message_list),
    Route("POST", "/v1/workflows/chat", chat.workflow_chat),
    # workflows: run (sync or is_async), streamed run and resume, an async run's outcome
    Route("POST", "/v1/workflow/run", workflows.run),
    Route("POST", "/v1/workflow/stream_run", workflows.stream_run),
    Route("POST", "/v1/workflow/stream_resume", workflows.stream_resume),
    Route("GET", "/v1/workflows/{workflow_id}/run_histories/{execute_id}", workflows.run_history),
    # files
    Route("POST", "/v1/files/upload", files.upload),
    Route("GET", "/v1/files/retrieve", files.retrieve),
    # audio over HTTP (the chat component with audio on, cozepy, @coze/api)
    Route("POST", "/v1/audio/speech", audio.speech),
    Route("POST", "/v1/audio/transcriptions", audio.transcriptions),
    # WebSockets (ws://<sandbox>/...; Coze: wss://ws.coze.cn/...); a path may also have HTTP methods above
    Route("WS", "/v1/chat", ws_events.chat, auth=False),
    Route("WS", "/v1/audio/speech", ws_events.speech, auth=False),
    Route("WS", "/v1/audio/transcriptions", ws_events.transcriptions, auth=False),
)


def match(method: str, path: str) -> tuple[Route | None, tuple[str, ...], list[str]]:
    """-> (route, its path arguments, []) or (None, (), the methods the path allows)."""
    allowed: list[str] = []
    for route in ROUTES:
        m = route.regex.match(path)
        if m is None:
            continue
        if route.method == method:
            return route, tuple(unquote(g) for g in m.groups()), []
        allowed.append(route.method)
    return None, (), allowed


def dispatch(st: "State", req: "Handler") -> None:
    """Answer one request: record it, find its route, check the access token, call the handler."""
    req.logid = st.new_logid()
    st.record_request(req.command, req.path, req.headers.items(), req.logid)
    if req.body_error is not None:
        return req.error(4000, req.body_error, 400)
    if req.command == "OPTIONS":
        # deliberately no CORS headers: the proxy must answer preflights itself
        return req.send_bytes(200, b"", "text/plain; charset=utf-8")
    method, path = req.command, req.route_path
    upgrade = req.is_upgrade
    route, args, allowed = match("WS" if upgrade else method, path)
    if route is None and upgrade:  # not a WebSocket endpoint: answer the plain GET
        route, args, allowed = match(method, path)
    if route is None:
        if "WS" in allowed and (method == "GET" or allowed == ["WS"]):
            return req.error(4000, f"{path} is a WebSocket endpoint: send Upgrade: websocket", 426)
        if allowed:
            return req.error(4000, f"method {method} not allowed on {path}", 405)
        return req.error(4000, f"no such endpoint in the coze-mitm sandbox: {method} {path}", 404)
    if not route.auth:  # the token endpoint, and WebSockets (they read the token from the query too)
        return route.handler(st, req, *args)
    rec, problem, message = tokens.check_access(st, req.headers.get("Authorization"))
    if problem == "200":
        return req.error(700012006, message)
    if problem:
        return req.error(4100, f"authentication is invalid: {message}", 401)
    req.session = rec["session"]
    route.handler(st, req, *args)
