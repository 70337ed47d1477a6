"""The budget's own work per chat start, in process (no proxy, no network): accounting's budget_refusal, request
and response hooks for a budgeted `POST /v3/chat` and `/v1/workflow/run`. Issue 24 added the poll slot, the
identity Accept-Encoding and (workflow runs) the body read for is_async; run this file from a checkout of the
code before and after to compare.

    python bench/budget_check_micro.py

Prints microseconds per chat start (best of 5 rounds). Compare with a proxied request's cost over bare mitmdump in
docs/benchmarks.md (the issue's bound: 0.05x of bare mitmdump's own latency).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from coze_mitm.flowmeta import COZE_USER  # noqa: E402
from coze_mitm.options import OptionsOnly  # noqa: E402
from coze_mitm.parts.accounting import Accounting  # noqa: E402

N = 20_000
USER = "1732000000001-benchUser0001"


def flow(path: str, body: dict):
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=path.encode(), content=json.dumps(body).encode(),
                                    headers=((b"content-type", b"application/json"),
                                             (b"accept-encoding", b"gzip, deflate, br, zstd"))))
    f.metadata[COZE_USER] = USER
    return f


def per_call(fn) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(N):
            fn()
        best = min(best, (time.perf_counter() - t) / N)
    return best * 1e6


def main() -> None:
    acc = Accounting()
    with taddons.context(OptionsOnly(), acc) as tctx:
        tctx.configure(acc, coze_usage_file="memory", coze_user_daily_tokens=1_000_000, coze_user_max_parallel_chats=0)
        chat = flow("/v3/chat", {"bot_id": "7000", "user_id": "u", "stream": True,
                                 "additional_messages": [{"role": "user", "content": "hello there", "content_type": "text"}]})
        run = flow("/v1/workflow/run", {"workflow_id": "7001", "parameters": {"input": "hello there"}})

        request = getattr(acc, "request", lambda f: None)  # the identity Accept-Encoding (issue 24; auth asks it since issue 27)

        def chat_start():
            acc.budget_refusal(chat, USER, "bench")
            request(chat)
            acc.response(chat)  # gives the slot and the in-flight place back, as the answer's end does

        def run_start():
            acc.budget_refusal(run, USER, "bench")
            request(run)
            acc.response(run)

        print(f"budgeted /v3/chat start (check, request, answer's end):         {per_call(chat_start):6.2f} us")
        print(f"budgeted /v1/workflow/run start (check, request, answer's end): {per_call(run_start):6.2f} us")
        acc.done()


if __name__ == "__main__":
    main()
