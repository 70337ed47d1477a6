"""Answers the proxy makes itself, in Coze's envelope: {"code": <int>, "msg": "<what happened and what to do>"}."""

from __future__ import annotations

import json
import time

from mitmproxy import http
from coze_mitm.flowmeta import LOCAL_ANSWER



def answer_json(flow: http.HTTPFlow, status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "msg": msg}, ensure_ascii=False)
    flow.response = http.Response.make(
        status,
        body.encode(),
        {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", **(headers or {})},
    )
    flow.metadata[LOCAL_ANSWER] = True


def accept_connect(flow: http.HTTPFlow) -> None:
    """Answer a CONNECT for a name only this proxy knows (coze.mitm, sandbox.coze.mitm) with 200.

    Set in `http_connect`, it keeps mitmproxy from connecting to that name first (it would fail: no
    such host); the requests inside the tunnel (TLS with the proxy's certificate, or plain http)
    then pass the `request` hooks like any other.
    """
    now = time.time()
    flow.response = http.Response(
        flow.request.data.http_version, 200, b"Connection established", http.Headers(), b"", None, now, now,
    )
