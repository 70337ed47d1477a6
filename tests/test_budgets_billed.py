"""Budgets count what Coze bills, or refuse what they cannot count (issue 24, item 3), through a real mitmdump
against the stand-in shaped like the real service (sandbox/: chats run on after their stream ends early,
workflow usage in `Message` events, async workflow runs, answers compressed when the client offers it).

"billed" is the stand-in's own count (`usage_of`), "counted" the proxy's (status.json). What the stand-in does
is not evidence of what Coze does: see docs/decisions.md.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import socket
import time
import urllib.parse

import brotli
import pytest
import zstandard

from tests import clients
from tests.clients import PAGE, session, tagged, tokens_of, usage_today

USER = "1732000000001-budgetUser001"
TEXT = "count these words please"  # 11 tokens a chat (stand-in: 2 * words + 3)


def chat_body(text: str, stream: bool) -> dict:
    return clients.chat_body(USER, text, stream)


@pytest.fixture
def proxy_for(mitmdump, config_file, standin):
    def start(*more: str):
        return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "coze_usage_file=memory", *more)
    return start


def settle(s, standin, user: str = USER, timeout: float = 30.0) -> tuple[int, int]:
    """(billed, counted) once the stand-in's runs have ended and the proxy's count stopped moving."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        billed = standin.usage_of(user)["token_count"]
        running = [c for c in standin.chats_of(user) if c["status"] in ("created", "in_progress")]
        runs = [r for r in standin.state.workflow_runs.values() if r["session"] == user and r["status"] == "Running"]
        if not running and not runs and usage_today(s) >= billed:
            break
        time.sleep(0.1)
    return standin.usage_of(user)["token_count"], usage_today(s)


def post_raw(proxy, url: str, headers: dict, body: dict) -> socket.socket:
    """A POST through the proxy on a socket of our own, so the test decides exactly when the client leaves."""
    data = json.dumps(body).encode()
    lines = [f"POST {url} HTTP/1.1", f"Host: {urllib.parse.urlsplit(url).netloc}", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What arrived up to `marker`, or the whole answer when the proxy answered itself (a refusal)."""
    seen = b""
    while marker not in seen:
        head, sep, body = seen.partition(b"\r\n\r\n")
        if sep and b"application/json" in head.lower() and body.rstrip().endswith(b"}"):
            return seen
        piece = sock.recv(65536)
        assert piece, f"the stream ended before {marker!r}: {seen[-300:]!r}"
        seen += piece
    return seen


def leave_after(proxy, standin, event: str, text: str = TEXT, user: str = USER) -> bytes:
    """A streamed chat whose client closes its connection as soon as `event` has arrived."""
    sock = post_raw(proxy, f"{standin.base_url}/v3/chat", tagged(user, origin=None), chat_body(text, True) | {"user_id": user})
    try:
        return read_until(sock, f"event:{event}".encode())
    finally:
        sock.close()


# ------------------------------------------------------------------------------ streams that end early

@pytest.mark.parametrize("event", ["conversation.message.completed", "conversation.chat.created"])
def test_a_chat_whose_client_left_early_is_counted_when_it_completes(proxy_for, standin, event):
    standin.delta_gap = 0.3  # the chat runs on for seconds after the client left
    proxy = proxy_for("coze_user_daily_tokens=100000", "coze_user_max_parallel_chats=1")
    head = leave_after(proxy, standin, event)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head[:300]
    s = session(proxy)
    billed, counted = settle(s, standin)
    assert [c["status"] for c in standin.chats_of(USER)] == ["completed"]  # it ran on and was billed
    assert billed == tokens_of(TEXT) and counted == billed
    # the proxy asked Coze itself, with the ids the stream named, and the chat held its in-flight slot until then
    retrieves = [r for r in standin.requests_seen if r["path"] == "/v3/chat/retrieve"]
    assert retrieves and all(r["headers"]["authorization"].startswith("Bearer czs_") for r in retrieves)
    assert standin.placeholder_seen == 0
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, False), timeout=10)
    assert r.json()["code"] == 0  # the slot is free again once counted


def test_a_stream_cut_upstream_is_counted_when_the_chat_completes(proxy_for, standin):
    import requests

    standin.delta_gap = 0.1
    standin.chat_mode = "cut"  # the connection to Coze breaks mid-answer; the chat runs on
    proxy = proxy_for()
    s = session(proxy)
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, True),
               stream=True, timeout=10)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in r.iter_lines():
            pass
    billed, counted = settle(s, standin)
    assert billed == tokens_of(TEXT) and counted == billed


# ------------------------------------------------------------------------------ workflows

def workflow_body(text: str, **extra) -> dict:
    return {"workflow_id": "7001", "parameters": {"input": text, **extra}}


def workflow_tokens(text: str) -> int:
    return 2 * len(text.split()) + 4  # the stand-in: input words + "Sandbox workflow reply to: " + input words


def test_workflow_stream_run_and_resume_usage_is_counted(proxy_for, standin):
    standin.delta_gap = 0.01
    proxy = proxy_for("coze_user_daily_tokens=100000")
    s = session(proxy)
    r = s.post(f"{standin.base_url}/v1/workflow/stream_run", headers=tagged(USER, origin=None),
               json=workflow_body(TEXT), timeout=10)
    assert r.status_code == 200 and b"event: Done" in r.content
    assert usage_today(s) == standin.usage_of(USER)["token_count"] == workflow_tokens(TEXT)
    # a run that stops at a question (Interrupt) and is resumed: each call is billed its part
    r = s.post(f"{standin.base_url}/v1/workflow/stream_run", headers=tagged(USER, origin=None),
               json=workflow_body(TEXT, interrupt=True), timeout=10)
    frames = [f for f in r.text.split("\n\n") if "event: Interrupt" in f]
    event_id = json.loads(frames[0].split("data: ", 1)[1])["interrupt_data"]["event_id"]
    r = s.post(f"{standin.base_url}/v1/workflow/stream_resume", headers=tagged(USER, origin=None),
               json={"workflow_id": "7001", "event_id": event_id, "resume_data": "yes", "interrupt_type": 2}, timeout=10)
    assert b"event: Done" in r.content
    billed = standin.usage_of(USER)["token_count"]
    assert billed == 2 * workflow_tokens(TEXT) and usage_today(s) == billed


@pytest.mark.parametrize("body", [
    {"is_async": True},
    {"IS_ASYNC": True},  # Go's encoding/json matches keys case-insensitively
    {"is_async": False, "Is_Async": True},  # a decoy first, the copy Go keeps last
    {"i\u017f_async": True},  # LONG S folds to s in Go's matching
    {"is_async": "true"},
])
def test_async_workflow_runs_are_refused_while_a_budget_is_set(proxy_for, standin, body):
    proxy = proxy_for("coze_user_daily_tokens=100000")
    s = session(proxy)
    standin.reset_observations()
    r = s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER, origin=None),
               json=workflow_body(TEXT) | body, timeout=10)
    answer = r.json()
    assert r.status_code == 400 and answer["code"] == 4000 and "is_async" in answer["msg"], answer
    assert "stream_run" in answer["msg"]  # the way out
    assert standin.requests_seen == [] and standin.usage_of(USER)["token_count"] == 0
    # from a page: HTTP 200, so Coze's chat component shows the msg
    page = s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER), json=workflow_body(TEXT) | body,
                  timeout=10)
    assert page.status_code == 200 and page.json()["code"] == 4000


def test_a_workflow_run_body_that_cannot_be_read_is_refused_and_a_synchronous_run_is_counted(proxy_for, standin):
    proxy = proxy_for("coze_user_daily_tokens=100000")
    s = session(proxy)
    r = s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER, origin=None),
               data=b'{"workflow_id": "7001", "is_async": true', timeout=10)
    assert r.status_code == 400 and r.json()["code"] == 4000 and "cannot be read" in r.json()["msg"]
    r = s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER, origin=None),
               json=workflow_body(TEXT) | {"is_async": False}, timeout=10)
    assert r.json()["code"] == 0 and "execute_id" in r.json()
    assert usage_today(s) == standin.usage_of(USER)["token_count"] == workflow_tokens(TEXT)


def test_without_a_budget_async_runs_pass_and_report_their_outcome_in_the_run_history(proxy_for, standin):
    standin.delta_gap = 0.01
    proxy = proxy_for()
    s = session(proxy)
    r = s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER, origin=None),
               json=workflow_body(TEXT) | {"is_async": True}, timeout=10)
    execute_id = r.json()["execute_id"]
    deadline = time.time() + 20
    while True:
        h = s.get(f"{standin.base_url}/v1/workflows/7001/run_histories/{execute_id}", headers=tagged(USER, origin=None),
                  timeout=10).json()
        if h["data"][0]["execute_status"] != "Running" or time.time() > deadline:
            break
        time.sleep(0.05)
    assert h["data"][0]["execute_status"] == "Success" and h["data"][0]["usage"]["token_count"] == workflow_tokens(TEXT)


# ------------------------------------------------------------------------------ compression

def test_a_client_offering_br_gets_a_readable_stream_and_its_usage_is_counted(proxy_for, standin):
    import requests

    standin.delta_gap = 0.01
    # the stand-in compresses when asked (as public API servers do), streams included
    direct = requests.post(f"{standin.base_url}/v1/workflow/stream_run", json=workflow_body(TEXT),
                           headers={"Accept-Encoding": "br"}, timeout=10)
    assert direct.headers.get("content-encoding") == "br"  # refused (no token) but compressed all the same
    proxy = proxy_for("coze_user_daily_tokens=100000")
    s = session(proxy)
    standin.reset_observations()
    for path, body in (("/v3/chat", chat_body(TEXT, True)), ("/v1/workflow/stream_run", workflow_body(TEXT))):
        r = s.post(f"{standin.base_url}{path}", headers=tagged(USER, origin=None, **{"Accept-Encoding": "br"}),
                   json=body, stream=True, timeout=10)
        events = [line for line in r.iter_lines() if line.startswith(b"event")]
        assert events and events[-1].replace(b" ", b"") in (b"event:done", b"event:Done"), events
    billed = standin.usage_of(USER)["token_count"]
    assert billed == tokens_of(TEXT) + workflow_tokens(TEXT) and usage_today(s) == billed
    # the proxy asked Coze for answers it can read
    sent = [r["headers"].get("accept-encoding") for r in standin.requests_seen
            if r["path"] in ("/v3/chat", "/v1/workflow/stream_run")]
    assert sent == ["identity", "identity"]


DECODE = {"br": brotli.decompress, "gzip": gzip.decompress,
          "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip"])
def test_a_stream_compressed_although_identity_was_asked_is_still_counted(proxy_for, standin, encoding):
    standin.delta_gap = 0.01
    standin.server.force_encoding = encoding  # a server that ignores Accept-Encoding: identity
    proxy = proxy_for("coze_user_daily_tokens=100000")
    s = session(proxy)
    for path, body in (("/v3/chat", chat_body(TEXT, True)), ("/v1/workflow/stream_run", workflow_body(TEXT))):
        r = s.post(f"{standin.base_url}{path}", headers=tagged(USER, origin=None), json=body, stream=True, timeout=10)
        assert r.headers["content-encoding"] == encoding
        text = DECODE[encoding](r.raw.read(decode_content=False))  # (this urllib3 decodes no zstd itself)
        events = [line.replace(b" ", b"") for line in text.splitlines() if line.startswith(b"event")]
        assert events[-1] in (b"event:done", b"event:Done"), events  # what passed decodes, to its end
    billed = standin.usage_of(USER)["token_count"]
    assert billed == tokens_of(TEXT) + workflow_tokens(TEXT) and usage_today(s) == billed


# ------------------------------------------------------------------------------ the poller full

def test_when_the_usage_poller_is_full_new_chats_of_budgeted_users_are_refused(mitmdump, config_file, standin, front):
    from coze_mitm.core.usage_poll import MAX_POLLERS

    standin.delta_gap = 1.0  # each chat runs ~10 s at Coze after its in_progress answer
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={front.base_url}",
                     "coze_usage_file=memory", "coze_user_daily_tokens=1000000", "coze_user_max_parallel_chats=0")
    s = session(proxy)
    answers = []
    for i in range(MAX_POLLERS + 6):
        r = s.post(f"{front.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, False), timeout=10)
        answers.append((r.status_code, r.json()))
    accepted = [a for a in answers if a[1]["code"] == 0]
    refused = [a for a in answers if a[1]["code"] != 0]
    assert len(accepted) == MAX_POLLERS, [a[1].get("msg") for a in refused][:2]
    assert all(st == 429 and a["code"] == 4013 and "waiting for their usage" in a["msg"] for st, a in refused), refused[:2]
    billed, counted = settle(s, standin, timeout=60)
    assert billed == MAX_POLLERS * tokens_of(TEXT) and counted == billed  # nothing went uncounted
    r = s.post(f"{front.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, False), timeout=10)
    assert r.json()["code"] == 0  # the polls ended: chats go again


# ------------------------------------------------------------------------------ the table, measured

BUDGET, CAP, REQUESTS = 250, 4, 8
CHAT_TEXT = " ".join(f"w{i}" for i in range(49))  # 2 * 49 + 3 = 101 tokens a chat
FLOW_TEXT = " ".join(f"w{i}" for i in range(48))  # 2 * 48 + 4 = 100 tokens a workflow run


def _case_leave(event):
    def run(proxy, standin, s, i):
        leave_after(proxy, standin, event, CHAT_TEXT)
    return run


def _case_async(proxy, standin, s, i):
    return s.post(f"{standin.base_url}/v1/workflow/run", headers=tagged(USER, origin=None),
                  json=workflow_body(FLOW_TEXT) | {"is_async": True}, timeout=10)


def _case_stream_run_resume(proxy, standin, s, i):
    if i % 2 == 0:
        return s.post(f"{standin.base_url}/v1/workflow/stream_run", headers=tagged(USER, origin=None),
                      json=workflow_body(FLOW_TEXT, interrupt=True), timeout=10)
    with standin.state.lock:
        waiting = [r["event_id"] for r in standin.state.workflow_runs.values() if r["status"] == "Interrupted"]
    return s.post(f"{standin.base_url}/v1/workflow/stream_resume", headers=tagged(USER, origin=None),
                  json={"workflow_id": "7001", "event_id": waiting[-1] if waiting else "none", "resume_data": "ok",
                        "interrupt_type": 2}, timeout=10)


def _case_br(proxy, standin, s, i):
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None, **{"Accept-Encoding": "br"}),
               json=chat_body(CHAT_TEXT, True), timeout=10)
    return r


def _case_cut(proxy, standin, s, i):
    import requests

    standin.chat_mode = "cut"
    try:
        r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(CHAT_TEXT, True),
                   stream=True, timeout=10)
        for _ in r.iter_lines():
            pass
    except requests.exceptions.ChunkedEncodingError:
        pass


CASES = {
    "streamed /v3/chat, client closes right after conversation.message.completed": _case_leave("conversation.message.completed"),
    "streamed /v3/chat, client closes after conversation.chat.created": _case_leave("conversation.chat.created"),
    "streamed /v3/chat, the connection to Coze cut mid-answer": _case_cut,
    "/v1/workflow/run with is_async: true": _case_async,
    "/v1/workflow/stream_run + stream_resume (usage in Message events)": _case_stream_run_resume,
    "streamed /v3/chat with Accept-Encoding: br": _case_br,
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_way_of_spending_stays_within_the_budget_plus_the_parallel_cap(proxy_for, standin, case):
    standin.delta_gap = 0.02
    proxy = proxy_for(f"coze_user_daily_tokens={BUDGET}", f"coze_user_max_parallel_chats={CAP}")
    s = session(proxy)
    for i in range(REQUESTS):
        CASES[case](proxy, standin, s, i)
    billed, counted = settle(s, standin)
    most = 101  # the dearest request of any case
    print(f"\nFIGURE table | {case} | billed {billed} | counted {counted} | bound {BUDGET + CAP * most}")
    assert counted == billed
    assert billed <= BUDGET + CAP * most


def test_more_non_streamed_chats_than_the_poller_follows_stay_within_each_budget(mitmdump, config_file, standin, front):
    from coze_mitm.core.usage_poll import MAX_POLLERS

    standin.delta_gap = 0.3  # ~15 s a chat at Coze after its in_progress answer
    users = [f"1732000000001-pollUser{i:03d}" for i in range(20)]  # 20 users x 4 chats: 80 at once
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={front.base_url}",
                     "coze_usage_file=memory", f"coze_user_daily_tokens={BUDGET}", f"coze_user_max_parallel_chats={CAP}")

    def chat(user):
        s = session(proxy)
        return s.post(f"{front.base_url}/v3/chat", headers=tagged(user, origin=None),
                      json=chat_body(CHAT_TEXT, False) | {"user_id": user}, timeout=30).json()["code"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(chat, [u for u in users for _ in range(CAP)]))
    s = session(proxy)
    deadline = time.time() + 90
    while time.time() < deadline:
        billed = sum(standin.usage_of(u)["token_count"] for u in users)
        if sum(1 for u in users for c in standin.chats_of(u) if c["status"] != "completed") == 0 and usage_today(s) >= billed:
            break
        time.sleep(0.2)
    billed = sum(standin.usage_of(u)["token_count"] for u in users)
    counted = usage_today(s)
    print(f"\nFIGURE table | more than {MAX_POLLERS} non-streamed chats at once ({len(codes)} from {len(users)} users) "
          f"| billed {billed} | counted {counted} | refused {codes.count(4013)}")
    assert codes.count(0) == MAX_POLLERS and codes.count(4013) == len(codes) - MAX_POLLERS
    assert counted == billed == MAX_POLLERS * 101
    assert all(standin.usage_of(u)["token_count"] <= BUDGET + CAP * 101 for u in users)
