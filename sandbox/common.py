"""Constants and small helpers shared by the sandbox's modules (no state, no I/O)."""

from __future__ import annotations

import json
import re
from typing import Any

TOKEN_PATH = "/api/permission/oauth2/token"
JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SERVER_NAME = "coze-sandbox"
BOT_NAME = "Sandbox bot"
BOT_DESCRIPTION = "coze-mitm sandbox, not Coze"
REPLY_PREFIX = "Sandbox reply to: "
MAX_BODY = 16 * 1024 * 1024

TOKEN_MODES = ("ok", "http500", "garbage", "no_token", "expired", "duration", "hang")
CHAT_MODES = ("ok", "cut", "rate_limited", "no_permission", "not_published")
REVOKE_STYLES = ("401", "200")

# chat_mode -> the JSON error Coze answers (HTTP 200) instead of starting a chat
CHAT_MODE_ERRORS = {
    "rate_limited": (4013, "sandbox: request rate limit exceeded, retry later"),
    "no_permission": (4101, "sandbox: no permission to chat with this bot"),
    "not_published": (4015, "sandbox: the bot is not published to the API channel"),
}

ANY: Any = object()  # "any session" for the counting helpers
PLACEHOLDER_COOKIE = re.compile(r"(?:^|[;,])\s*coze_user\s*=")


class BadRequestBody(Exception):
    pass


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def compact_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def is_placeholder(authorization: str | None) -> bool:
    """``Bearer user:<id>``: the page's placeholder, which must never reach Coze."""
    scheme, _, cred = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and cred.strip().startswith("user:")


def user_text(messages: Any) -> str:
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


def reply_for(text: str) -> str:
    """The sandbox's canned answer to a user's text."""
    return REPLY_PREFIX + (text or "(nothing)")


def usage_for(text: str, reply: str) -> dict:
    """The usage a chat reports (deterministic, so tests can predict what is "charged"):
    one token per whitespace-separated word, input = the user's text, output = the reply."""
    input_count = len(text.split())
    output_count = len(reply.split())
    return {"token_count": input_count + output_count, "output_count": output_count, "input_count": input_count}
