"""CORS for the Coze API origin(s), for the page origins in coze_origins and no others.

* A preflight from an allowed origin is answered here (204) and never reaches Coze.
* Every response to an allowed origin, streamed or not, upstream or local, gets origin-specific
  CORS headers that replace whatever upstream sent, so the page can read the answer (and errors).
* Any other origin gets nothing loosened: its requests pass as they are.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import http

from settings import CozeSettings

log = logging.getLogger("coze.cors")

CORS_ORIGIN = "coze_cors_origin"  # flow.metadata: the allowed origin this flow's response is for
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS = "Authorization, Content-Type, Accept-Language, X-Coze-Client-User-Agent"
EXPOSE_HEADERS = "X-Tt-Logid, Content-Type, Content-Length, Retry-After"
MAX_AGE = "600"
# A field-name list as the Fetch spec allows it; anything else is not echoed back.
HEADER_LIST_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
METHOD_RE = re.compile(r"[A-Za-z]{1,16}")


def _merge_vary(existing: str, *names: str) -> str:
    values = [v.strip() for v in existing.split(",") if v.strip()]
    for name in names:
        if name.lower() not in (v.lower() for v in values):
            values.append(name)
    return ", ".join(values)


class Cors:
    def __init__(self, settings: CozeSettings):
        self.settings = settings

    def allowed_origin(self, request: http.Request) -> str | None:
        """The request's Origin if it is exactly one allowed origin, else None."""
        origins = request.headers.get_all("origin")
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
            return
        # Decided now, before map_remote or another addon could rewrite the destination.
        flow.metadata[CORS_ORIGIN] = origin
        if flow.request.method == "OPTIONS" and "access-control-request-method" in flow.request.headers:
            self._answer_preflight(flow, origin)

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
        self.settings.stats.preflights += 1

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Headers of a streamed response leave now; this is the last chance to set them.
        self._set_cors_headers(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers made locally in `request` never pass responseheaders.
        self._set_cors_headers(flow)

    def _set_cors_headers(self, flow: http.HTTPFlow) -> None:
        origin = flow.metadata.get(CORS_ORIGIN)
        if not origin or not flow.response:
            return
        headers = flow.response.headers
        # Assignment replaces every copy upstream sent: one origin, never "*" beside credentials.
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        headers["Vary"] = _merge_vary(headers.get("vary", ""), "Origin")
