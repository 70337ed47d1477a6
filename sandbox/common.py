"""Constants and small helpers shared by the sandbox's modules (no state, no I/O)."""

from __future__ import annotations

import gzip
import json
import re
import zlib
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


# ------------------------------------------------------------------ compression of answers
# Compression of answers, as a public API server does it: when the client offers ``br``, ``zstd`` or ``gzip``
# (``Accept-Encoding``), answers come compressed, streams included (each event flushed, so a stream stays a
# stream). The server's preference is br, then zstd, then gzip, whatever order the client lists them in. What
# Coze itself compresses, and when, is not checkable here: this is the strict reading (everything, when asked).
# brotli and zstandard come with mitmproxy; without them only gzip is offered.
try:
    import brotli
except ImportError:  # pragma: no cover - mitmproxy depends on it
    brotli = None
try:
    import zstandard
except ImportError:  # pragma: no cover - mitmproxy depends on it
    zstandard = None

PREFERENCE = tuple(e for e, ok in (("br", brotli is not None), ("zstd", zstandard is not None), ("gzip", True)) if ok)


def content_coding(accept_encoding: str | None) -> str:
    """The encoding to answer with ("" = identity) for an ``Accept-Encoding`` header."""
    offered = set()
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            offered.add(name.strip().lower())
    return next((e for e in PREFERENCE if e in offered), "")


def compress(data: bytes, encoding: str) -> bytes:
    if encoding == "br":
        return brotli.compress(data)
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if encoding == "gzip":
        return gzip.compress(data)
    return data


class StreamEncoder:
    """Compresses a stream piece by piece; every piece is flushed, so each event reaches the client at once."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        if encoding == "br":
            self._c = brotli.Compressor()
        elif encoding == "zstd":
            self._c = zstandard.ZstdCompressor().compressobj()
        elif encoding == "gzip":
            self._c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        else:
            self._c = None

    def piece(self, data: bytes) -> bytes:
        c = self._c
        if c is None:
            return data
        if self.encoding == "br":
            return c.process(data) + c.flush()
        if self.encoding == "zstd":
            return c.compress(data) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        c, self._c = self._c, None
        if c is None:
            return b""
        if self.encoding == "br":
            return c.finish()
        return c.flush()
