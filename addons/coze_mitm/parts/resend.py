"""The transparent retry's sender: one request sent again, with another token, outside mitmproxy.

`Resender.resend(request, token)` sends the request as the page sent it (its headers, tag swapped for
`token`, its raw body) to the same URL and returns the answer as a mitmproxy Response, body still
content-encoded, the way mitmproxy itself would have stored it. Auth decides whether to re-send;
this module only sends. Blocking I/O runs in its own small thread pool, never on the event loop.
"""

from __future__ import annotations

import time
from typing import Callable

import requests
import urllib3
from mitmproxy import ctx, http
from requests.structures import CaseInsensitiveDict

from coze_mitm.core import identity
from coze_mitm.core.off_loop import OffLoopHttp
from coze_mitm.core.outbound import DIRECT, Outbound

WORKERS = 8
MAX_BODY = 16 * 1024 * 1024  # a retried answer is buffered like any non-streamed one; never more than this
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})


class AnswerTooLarge(requests.RequestException):
    """The answer to the retry is bigger than MAX_BODY: not buffered, the first answer stands."""


class Resender:
    def __init__(self, outbound: Callable[[], Outbound] = lambda: DIRECT, workers: int = WORKERS):
        # the page's own headers are sent, not requests' defaults; the way out is mitmproxy's (core/outbound.py)
        self._http = OffLoopHttp(workers, "coze-retry", default_headers=False, outbound=outbound)

    async def resend(self, request: http.Request, token: str) -> http.Response:
        """The answer to `request` sent again with `token`; raises requests.RequestException on failure."""
        opts = ctx.options
        timeout = float(getattr(opts, "coze_exchange_timeout", 10))
        headers = _headers(request, token)
        started = time.time()
        answer = await self._http.run(
            self._send, request.method, request.url, headers, request.raw_content or None, timeout,
        )
        return _as_response(answer, request, started)

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, headers: dict, body: bytes | None, timeout: float):
        """Blocking (runs in the pool): one request, the body read raw (still content-encoded), bounded."""
        r = self._http.session().request(method, url, headers=headers, data=body, timeout=timeout,
                                         allow_redirects=False, stream=True)
        try:
            raw = r.raw.read(MAX_BODY + 1, decode_content=False)
        except urllib3.exceptions.TimeoutError as e:  # raw reads raise urllib3's errors, not requests'
            raise requests.ReadTimeout(str(e)) from None
        except urllib3.exceptions.HTTPError as e:
            raise requests.ConnectionError(str(e)) from None
        finally:
            r.close()
        if len(raw) > MAX_BODY:
            raise AnswerTooLarge(f"more than {MAX_BODY} bytes")
        return r.status_code, r.reason or "", list(r.raw.headers.items()), raw


def _headers(request: http.Request, token: str) -> CaseInsensitiveDict:
    """The headers the request left with the first time: the page's, tag swapped for the token, no compression asked."""
    headers = CaseInsensitiveDict()
    skip = HOP_BY_HOP | {"host", "content-length", "authorization", "cookie", "accept-encoding"}
    for name, value in request.headers.fields:
        key = name.decode("latin-1")
        if key.lower() in skip or key.lower().startswith("proxy-"):
            continue
        headers[key] = headers[key] + b", " + value if key in headers else value
    cookies = identity.strip_cookie(request.headers.get_all("cookie"))
    if cookies:
        headers["Cookie"] = "; ".join(cookies).encode("utf-8", "surrogateescape")
    headers["Authorization"] = f"Bearer {token}"
    headers["Accept-Encoding"] = "identity"  # as auth asked the first time (auth.IDENTITY)
    return headers


def _as_response(answer, request: http.Request, started: float) -> http.Response:
    status, reason, header_items, raw = answer
    fields = []
    for key, value in header_items:
        lower = key.lower()
        if lower in HOP_BY_HOP or (lower == "content-length" and request.method != "HEAD"):
            continue
        fields.append((key.encode("latin-1", "replace"), value.encode("latin-1", "replace")))
    if request.method != "HEAD" and status >= 200 and status not in (204, 304):
        fields.append((b"Content-Length", str(len(raw)).encode()))
    return http.Response(
        http_version=request.data.http_version,
        status_code=status,
        reason=reason.encode("latin-1", "replace"),
        headers=http.Headers(fields),
        content=raw,
        trailers=None,
        timestamp_start=started,
        timestamp_end=time.time(),
    )
