"""CORS for the Coze API origin(s), for the page origins in coze_origins and no others.

* A preflight from an allowed origin is answered here (204) and never reaches Coze.
* Every response to an allowed origin, streamed or not, upstream or local, gets origin-specific
  CORS headers that replace whatever upstream sent, so the page can read the answer (and errors):
  once per response, in one pass over its headers (in `responseheaders` for an upstream answer,
  whose headers may leave right after it; in `response` for an answer made locally).
* Any other origin gets nothing loosened: its requests pass as they are.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import http

from coze_mitm.core import fields
from coze_mitm.core.stats import Stats
from coze_mitm.parts.refused_origins import RefusedOriginsLog
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.flowmeta import CORS_ORIGIN, CORS_SET

log = logging.getLogger("coze.cors")

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS = "Authorization, Content-Type, Accept-Language, X-Coze-Client-User-Agent"
EXPOSE_HEADERS = "X-Tt-Logid, Content-Type, Content-Length, Retry-After"
# The headers set on every response to an allowed origin (one value each, whatever upstream sent), spelled
# as they are added when upstream sent none; Vary is merged rather than replaced.
_REPLACED = {b"access-control-allow-origin": b"Access-Control-Allow-Origin",
             b"access-control-allow-credentials": b"Access-Control-Allow-Credentials",
             b"access-control-expose-headers": b"Access-Control-Expose-Headers"}
MAX_AGE = "600"
# A field-name list as the Fetch spec allows it; anything else is not echoed back.
HEADER_LIST_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
METHOD_RE = re.compile(r"[A-Za-z]{1,16}")


def _merge_vary(existing: str, *names: str) -> str:
    values = [v.strip() for v in existing.split(",") if v.strip()]
    present = {v.lower() for v in values}
    values += [name for name in names if name.lower() not in present]
    return ", ".join(values)


class Cors:
    def __init__(self, settings: CozeSettings, refused: RefusedOriginsLog | None = None, stats: Stats | None = None):
        self.settings = settings
        self.refused = refused or RefusedOriginsLog()  # pages outside coze_origins: the status page shows them
        self.stats = stats or Stats()  # the counters the status page shows

    def allowed_origin(self, request: http.Request) -> str | None:
        """The request's Origin if it is exactly one allowed origin, else None."""
        origins = fields.every(request.headers, b"origin")
        if len(origins) != 1 or origins[0] not in self.settings.page_origins:
            return None
        return origins[0]

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        if not self.settings.is_coze_api(flow.request):
            return
        origin = self.allowed_origin(flow.request)
        if origin is None:
            self._note_refused_preflight(flow.request)
            return
        # Decided now, before map_remote or another addon could rewrite the destination.
        flow.metadata[CORS_ORIGIN] = origin
        flow.metadata.pop(CORS_SET, None)  # a replayed flow passes here again: its new answer needs them
        if flow.request.method == "OPTIONS" and "access-control-request-method" in flow.request.headers:
            self._answer_preflight(flow, origin)

    def _note_refused_preflight(self, request: http.Request) -> None:
        # Forwarded untouched (the page may use Coze with its own token), but the user should learn why their page
        # gets no loosened CORS: the browser only says "CORS error".
        if request.method != "OPTIONS" or "access-control-request-method" not in request.headers:
            return
        origins = fields.every(request.headers, b"origin")
        if len(origins) == 1 and origins[0] != "null":
            self.refused.note(origins[0], "a CORS preflight to the Coze API")

    def _answer_preflight(self, flow: http.HTTPFlow, origin: str) -> None:
        asked = flow.request.headers
        method = asked.get("access-control-request-method", "").strip()
        allow_methods = ALLOW_METHODS
        if METHOD_RE.fullmatch(method) and method.upper() not in ALLOW_METHODS:
            allow_methods = f"{ALLOW_METHODS}, {method.upper()}"
        requested_headers = asked.get("access-control-request-headers", "").strip()
        allow_headers = requested_headers if HEADER_LIST_RE.fullmatch(requested_headers) else DEFAULT_ALLOW_HEADERS
        headers = {
            "Access-Control-Allow-Methods": allow_methods,
            "Access-Control-Allow-Headers": allow_headers,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        # Chrome asks before a public page may talk to a loopback/private API (a local Coze Studio).
        if asked.get("access-control-request-private-network", "").lower() == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        flow.response = http.Response.make(204, b"", headers)
        flow.comment = f"coze-mitm: CORS preflight from {origin} answered locally"
        self.stats.preflights += 1

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Headers of a streamed response leave now; this is the last chance to set them.
        if self._set_cors_headers(flow):
            flow.metadata[CORS_SET] = True

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers made locally in `request` never pass responseheaders: theirs are set here.
        if not flow.metadata.get(CORS_SET):
            self._set_cors_headers(flow)

    def _set_cors_headers(self, flow: http.HTTPFlow) -> bool:
        origin = flow.metadata.get(CORS_ORIGIN)
        if not origin or not flow.response:
            return False
        set_cors_headers(flow.response.headers, origin)
        return True


def set_cors_headers(headers: http.Headers, origin: str) -> None:
    """Access-Control-Allow-Origin (one origin, never "*" beside credentials), -Allow-Credentials and
    -Expose-Headers replace every copy upstream sent; Origin is added to Vary. One pass over the
    fields, with what `headers[name] = value` would do: a replaced header keeps the place and spelling
    of its first copy, a new one goes at the end."""
    pending = {b"access-control-allow-origin": origin.encode("utf-8", "surrogateescape"),
               b"access-control-allow-credentials": b"true",
               b"access-control-expose-headers": EXPOSE_HEADERS.encode()}
    out: list = []
    vary_values: list[bytes] = []
    vary_at, vary_name = -1, b""
    for field in headers.fields:
        key = field[0].lower()
        if key in _REPLACED:
            value = pending.pop(key, None)
            if value is not None:  # later copies are dropped
                out.append((field[0], value))
        elif key == b"vary":
            if vary_at < 0:
                vary_at, vary_name = len(out), field[0]
                out.append(field)
            vary_values.append(field[1])
        else:
            out.append(field)
    out.extend((_REPLACED[key], value) for key, value in pending.items())
    if vary_at < 0:
        out.append((b"Vary", b"Origin"))
    else:
        existing = b", ".join(vary_values).decode("utf-8", "surrogateescape")
        out[vary_at] = (vary_name, _merge_vary(existing, "Origin").encode("utf-8", "surrogateescape"))
    headers.fields = tuple(out)
