"""THE list of every endpoint the sandbox answers: method, path pattern, handler.

``{name}`` in a pattern matches one path segment and is passed to the handler (URL-decoded).
Method ``WS`` is a WebSocket upgrade (``GET`` with ``Upgrade: websocket``) on the same port.
Every endpoint but the token exchange and the WebSockets (which read the token from the query
string as well, see websocket.py) first checks ``Authorization: Bearer <access token>`` against the
tokens this sandbox minted. A path that matches no pattern answers 404, a method that is not listed
for it 405, both in Coze's envelope (code 4000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

from . import bots, chat, conversations, files, messages, tokens, websocket
from .common import TOKEN_PATH


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
    # files
    Route("POST", "/v1/files/upload", files.upload),
    Route("GET", "/v1/files/retrieve", files.retrieve),
    # WebSockets (ws://<sandbox>/...; Coze: wss://ws.coze.cn/...)
    Route("WS", "/v1/chat", websocket.chat, auth=False),
    Route("WS", "/v1/audio/speech", websocket.speech, auth=False),
    Route("WS", "/v1/audio/transcriptions", websocket.transcriptions, auth=False),
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
