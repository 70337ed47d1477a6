"""Reading Coze's answers (and the one thing Auth asks of a request body), cheaply and with bounds;
the hints for Coze's own refusals; tokens that an answer reflects cut out of its headers.

`watched_code` finds the `code` of Coze's JSON envelope when it is one coze-mitm acts on: an invalid
token (the transparent retry) or an error worth a hint. It looks at the first MAX_ENVELOPE bytes of
the decoded body at most: Coze's error envelopes are small, and a compressed body is never decoded
further than that (bounded.py). Request bodies are never decoded (`asks_for_stream`).
"""

from __future__ import annotations

import json
import logging
import re
import time

from mitmproxy import http

from coze_mitm.core import fields
from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.identity import short_id
from coze_mitm.core.exchange import scrub

log = logging.getLogger("coze.auth")

INVALID_TOKEN_CODES = (4100, 700012006)
# Coze's own refusals: passed through untouched (the page reads them), explained in the log.
COZE_HINTS = {
    4013: "Coze rate-limited this request (4013): too many requests for this bot or account; wait and retry, "
          "or raise the limits of the Coze plan (this is Coze's limit, not coze-mitm's)",
    4101: "Coze says this token has no permission here (4101): give the JWT app the permission this endpoint "
          "needs (Coze console > OAuth app > permissions) and check the bot or conversation belongs to a "
          "workspace the app may use; the token is kept",
    4015: "Coze says the bot is not published to the API (4015): publish it in the Coze console with the "
          "API / Chat SDK channel selected",
}
HINT_INTERVAL = 60.0  # at most one log line per Coze error code per minute
WATCHED_CODES = frozenset(INVALID_TOKEN_CODES) | frozenset(COZE_HINTS)
MAX_ENVELOPE = 64 * 1024  # raw and decoded: bigger answers are not parsed for a code

_CODE_RE = re.compile(rb'"code"\s*:\s*(\d{4,9})\b')


def watched_code(response: http.Response) -> int | None:
    """The `code` of a non-streamed JSON answer in Coze's envelope, if it is one coze-mitm acts on;
    None for everything else, cheaply: most answers are successes, recognised by a regex without
    parsing the JSON."""
    if response.stream:
        return None
    raw = response.raw_content
    if not raw or len(raw) > MAX_ENVELOPE:
        return None
    encoding = fields.get(response.headers, b"content-encoding")
    if encoding:
        raw = decoded_prefix(raw, encoding, MAX_ENVELOPE + 1)
        if not raw or len(raw) > MAX_ENVELOPE:
            return None  # not decodable, or not a small envelope: nothing to act on
    if not any(int(c) in WATCHED_CODES for c in _CODE_RE.findall(raw)):
        return None
    if "json" not in fields.get(response.headers, b"content-type").lower():
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    code = data.get("code") if isinstance(data, dict) else None  # the envelope's, not a nested one
    return code if code in WATCHED_CODES and not isinstance(code, bool) else None


def logid_of(response: http.Response) -> str:
    return scrub(response.headers.get("x-tt-logid", ""), 80)


def unreflect(response: http.Response, token: str) -> None:
    """An upstream that echoes the injected token in a header (a debug header, an error detail) must
    not hand it to the page: the token is replaced wherever it appears in a response header."""
    secret = token.encode("utf-8", "surrogateescape")
    pairs = response.headers.fields
    # One search over the values joined (asked of every injected answer); a match across two values
    # would only send it to the replacement below, which works value by value.
    if secret in b"\n".join([value for _, value in pairs]):
        response.headers.fields = tuple((name, value.replace(secret, b"[redacted]")) for name, value in pairs)


class Hints:
    """Coze's own refusals (COZE_HINTS), explained: every one in the status page's last errors, in the log
    at most once a minute per code."""

    def __init__(self, stats):
        self.stats = stats
        self._hinted: dict[int, float] = {}

    def note(self, flow: http.HTTPFlow, code: int, user_id: str) -> None:
        logid = logid_of(flow.response)
        self.stats.error(f"coze-{code}", COZE_HINTS[code], logid)
        flow.comment += f"; Coze answered code {code}"
        now = time.monotonic()
        if now - self._hinted.get(code, -HINT_INTERVAL) >= HINT_INTERVAL:
            self._hinted[code] = now
            log.warning(f"coze-mitm: {flow.request.method} {flow.request.path.split('?')[0]} for user "
                        f"{short_id(user_id)}: {COZE_HINTS[code]}" + (f" (logid {logid})" if logid else ""))


def asks_for_stream(request: http.Request) -> bool:
    """Does the request ask for a live event stream? From its Accept header or its plain JSON body's
    `"stream": true`. A body that is content-encoded or too big to be a chat request is not decoded
    or parsed: it counts as asking for a stream (the safe answer: such a request is not re-sent)."""
    if "text/event-stream" in request.headers.get("accept", "").lower():
        return True
    if "json" not in request.headers.get("content-type", "").lower():
        return False
    raw = request.raw_content
    if not raw:
        return False
    if "content-encoding" in request.headers:
        return True
    if b"stream" not in raw:
        return False
    if len(raw) > MAX_ENVELOPE:
        return True
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("stream") is True
