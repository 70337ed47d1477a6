"""Answers the proxy makes itself, in Coze's envelope: {"code": <int>, "msg": "<what happened and what to do>"}."""

from __future__ import annotations

import json

from mitmproxy import http

LOCAL_ANSWER = "coze_local_answer"  # flow.metadata marker: this response never came from upstream


def answer_json(flow: http.HTTPFlow, status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"code": code, "msg": msg}, ensure_ascii=False)
    flow.response = http.Response.make(
        status,
        body.encode(),
        {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", **(headers or {})},
    )
    flow.metadata[LOCAL_ANSWER] = True
