"""Budgets decided on what Coze's Go server will read (issue 24, item 4), through a real mitmdump against the
stand-in, which reads requests the way a Go server does (sandbox/go_json.py: case-insensitive keys, the last
one winning; invalid UTF-8 read as U+FFFD; nesting to 10,000 levels; data after the object ignored;
percent-decoded, cleaned paths). What the real Coze does is not checkable here: each case first shows that the
stand-in does spend on it (a proxy without a budget lets it through and Coze's chat runs), then that a budgeted
user gets it refused (or counted), never let through uncounted.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

from sandbox import go_json
from tests.clients import WsClient, session
from tests.clients import placeholder_query
from tests.fronts import WorkflowFront

PAGE = "https://chat.example.org"
USER = "1732000000001-goReadUser0001"
TEXT = "count these words please"  # the stand-in charges 2 * 4 + 3 = 11 tokens for it
DATA = {"role": "user", "content_type": "text", "content": "over the socket"}
START = "conversation.message.create"


def event(*pairs: tuple[str, object]) -> str:
    """A client event with its keys spelled (and repeated) exactly as given."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


DEEP = '{"id":"1","event_type":"%s","data":{"role":"user","content_type":"text","content":"over the socket","x":%s}}' % (
    START, "[" * 2000 + "]" * 2000)
# Each of these starts a chat on a server that reads like Go; Python's json reads each differently (or not at all).
VARIANTS = {
    "Event_Type": event(("id", "1"), ("Event_Type", START), ("data", DATA)),
    "chat.update, then Event_Type": event(("id", "1"), ("event_type", "chat.update"), ("Event_Type", START), ("data", DATA)),
    "decoy lowercase key plus EVENT_TYPE": event(("id", "1"), ("event_type", "conversation.clear"), ("data", DATA),
                                                 ("EVENT_TYPE", START)),
    "trailing data": event(("id", "1"), ("event_type", START), ("data", DATA)) + ' {"event_type":"chat.update"}',
    "nested 2,000 deep": DEEP,
    "invalid UTF-8 (binary message)": event(("id", "1"), ("event_type", START), ("data", DATA)).encode().replace(
        b"over the socket", b"over \xff the socket"),
}


@pytest.fixture
def ws_port(standin):
    return urllib.parse.urlsplit(standin.base_url).port


@pytest.fixture
def proxy_with(mitmdump, config_file, ws_port):
    def start(*more: str, hosts: str = ""):
        api_hosts = f"ws://localhost:{ws_port}" + (f",{hosts}" if hosts else "")
        return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={api_hosts}",
                        "coze_usage_file=memory", *more)
    return start


def ws_client(proxy, ws_port) -> WsClient:
    client = WsClient(proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(USER)}", headers=[("Origin", PAGE)])
    assert client.status == 101, client.body
    return client


def post(proxy, base: str, target: str, body: dict) -> tuple[int, dict, dict]:
    """POST through the proxy with the target exactly as written (requests would undo the percent-encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        conn.request("POST", base + target, body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer user:{USER}", "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), dict(r.getheaders())
    finally:
        conn.close()


def usage_today(proxy) -> int:
    return session(proxy).get("http://coze.mitm/status.json", timeout=10).json()["usage_totals"]["tokens_today"]


def chat_body(stream: bool = False) -> dict:
    return {"bot_id": "7000", "user_id": USER, "stream": stream,
            "additional_messages": [{"role": "user", "content": TEXT, "content_type": "text"}]}


# ------------------------------------------------------------------------------ WebSocket events

def test_variants_that_start_a_chat_in_go_are_refused_over_budget(proxy_with, standin, ws_port):
    standin.delta_gap = 0
    # Without a budget each variant goes through, and the Go-reading stand-in runs a chat for it.
    free = proxy_with()
    client = ws_client(free, ws_port)
    try:
        for name, raw in VARIANTS.items():
            before = len(standin.chats_of(USER))
            client.send_raw(raw)
            last = client.until("conversation.chat.completed")[-1]
            assert last["event_type"] == "conversation.chat.completed", (name, last)
            assert len(standin.chats_of(USER)) == before + 1, name
    finally:
        client.close()
    free.stop()

    # A user over the budget: every variant is refused, none reaches Coze.
    budgeted = proxy_with("coze_user_daily_tokens=5")
    client = ws_client(budgeted, ws_port)  # opened within the budget (an over-budget handshake is refused)
    try:
        status, answer, _ = post(budgeted, standin.base_url, "/v3/chat", chat_body())
        assert status == 200 and answer["code"] == 0  # 11 tokens: over the budget of 5 from now on
        chats = len(standin.chats_of(USER))
        for name, raw in VARIANTS.items():
            client.send_raw(raw)
            last = client.until("conversation.chat.completed")[-1]
            assert last["event_type"] == "error" and last["data"]["code"] in (4000, 4013), (name, last)
            assert "coze-mitm" in last["data"]["msg"], (name, last)
        assert len(standin.chats_of(USER)) == chats
        # what spends nothing still passes, in any spelling
        client.send_raw(event(("id", "2"), ("Event_Type", "chat.update"), ("data", {"chat_config": {}})))
        assert client.until("chat.updated")[-1]["event_type"] == "chat.updated"
    finally:
        client.close()


def test_unreadable_events_are_refused_with_the_reason_even_within_the_budget(proxy_with, standin, ws_port):
    standin.delta_gap = 0
    proxy = proxy_with("coze_user_daily_tokens=100000")
    client = ws_client(proxy, ws_port)
    reasons = {"trailing data": "data after the JSON value", "nested 2,000 deep": "deeper than 128 levels",
               "invalid UTF-8 (binary message)": "not valid UTF-8",
               "decoy lowercase key plus EVENT_TYPE": "names its event_type more than once"}
    try:
        for name, why in reasons.items():
            client.send_raw(VARIANTS[name])
            last = client.until("conversation.chat.completed")[-1]
            assert last["event_type"] == "error" and last["data"]["code"] == 4000 and why in last["data"]["msg"], (name, last)
        assert standin.chats_of(USER) == []
        # a chat start in another case is read as Go reads it: it runs, and is counted
        client.send_raw(VARIANTS["Event_Type"])
        assert client.until("conversation.chat.completed")[-1]["event_type"] == "conversation.chat.completed"
    finally:
        client.close()
    assert usage_today(proxy) == standin.usage_of(USER)["token_count"] > 0


def test_eight_simultaneous_event_type_chat_starts_stay_within_a_cap_of_four(proxy_with, standin, ws_port):
    standin.delta_gap = 0.3  # the first reply takes ~2 s: all eight arrive while it runs
    proxy = proxy_with("coze_user_daily_tokens=100000", "coze_user_max_parallel_chats=4")
    client = ws_client(proxy, ws_port)
    try:
        for i in range(8):
            client.send_raw(event(("id", str(i)), ("Event_Type", START), ("data", dict(DATA, content=f"over the socket {i}"))))
        errors, completed = client.chat_ends(8)
        assert len(errors) == 4 and all(e["code"] == 4013 and "at most 4" in e["msg"] for e in errors), errors
        assert completed == 4 and len(standin.chats_of(USER)) == 4
    finally:
        client.close()


def test_a_socket_opened_under_an_encoded_path_is_budgeted(proxy_with, standin, ws_port):
    standin.delta_gap = 0
    proxy = proxy_with("coze_user_daily_tokens=5")
    client = WsClient(proxy.port, "localhost", ws_port, f"/v1/%63hat?{placeholder_query(USER)}", headers=[("Origin", PAGE)])
    assert client.status == 101, client.body  # the Go-routing stand-in serves it as /v1/chat
    try:
        client.send_raw(event(("id", "1"), ("event_type", START), ("data", DATA)))
        assert client.until("conversation.chat.completed")[-1]["event_type"] == "conversation.chat.completed"
        assert usage_today(proxy) == standin.usage_of(USER)["token_count"] == 9  # counted: over the budget of 5
        client.send_raw(event(("id", "2"), ("event_type", START), ("data", DATA)))
        last = client.until("conversation.chat.completed")[-1]
        assert last["event_type"] == "error" and last["data"]["code"] == 4013, last
        assert len(standin.chats_of(USER)) == 1
    finally:
        client.close()
    again = WsClient(proxy.port, "localhost", ws_port, f"/v1/%63hat?{placeholder_query(USER)}", headers=[("Origin", PAGE)])
    again.close()
    assert again.status == 429 and json.loads(again.body)["code"] == 4013  # over budget: no new socket either


# ------------------------------------------------------------------------------ HTTP paths

@pytest.mark.parametrize("target", ["/v3/%63hat", "//v3/./%63hat/", "/x/%2e%2e/v3/chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_chat_under_an_encoded_path_is_counted_then_refused(proxy_with, standin, target, stream):
    standin.delta_gap = 0
    proxy = proxy_with("coze_user_daily_tokens=5")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    conn.request("POST", standin.base_url + target, body=json.dumps(chat_body(stream)).encode(),
                 headers={"Authorization": f"Bearer user:{USER}", "Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 200 and (b"conversation.chat.completed" in body if stream else json.loads(body)["code"] == 0)
    seen = standin.requests_seen[-1]["target"]  # (Python's http.server folds a leading "//" before anyone sees it)
    assert seen != "/v3/chat" and go_json.route(seen) == "/v3/chat"  # Coze got the path unclean, and ran the chat
    charged = standin.usage_of(USER)["token_count"]
    assert charged == 11 and usage_today(proxy) == charged  # counted
    status, answer, headers = post(proxy, standin.base_url, target, chat_body(stream))
    assert status == 429 and answer["code"] == 4013 and "daily budget is 5" in answer["msg"] and int(headers["Retry-After"]) > 0
    assert standin.usage_of(USER)["token_count"] == charged  # nothing more reached Coze


@pytest.fixture
def workflow_front():
    front = WorkflowFront()
    yield front
    front.stop()


def test_a_workflow_run_under_an_encoded_path_is_counted_then_refused(proxy_with, workflow_front):
    proxy = proxy_with("coze_user_daily_tokens=15", hosts=workflow_front.base_url)
    run = {"workflow_id": "7001", "parameters": {"input": "x"}}
    status, answer, _ = post(proxy, workflow_front.base_url, "/v1/workflow/%72un", run)
    assert status == 200 and answer["code"] == 0 and workflow_front.targets == ["/v1/workflow/%72un"]
    assert usage_today(proxy) == workflow_front.billed == WorkflowFront.TOKENS  # counted
    status, answer, headers = post(proxy, workflow_front.base_url, "/v1/workflow/%72un", run)
    assert status == 429 and answer["code"] == 4013 and "daily budget is 15" in answer["msg"]
    assert workflow_front.targets == ["/v1/workflow/%72un"]  # the refused run never reached Coze
