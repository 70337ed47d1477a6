"""Budgets that hold (issue 19, item 3), through a real mitmdump against the strict stand-in.

* every request that spends Coze tokens is budgeted before it leaves: /v3/chat, submit_tool_outputs,
  /v1/workflows/chat, /v1/workflow/run, stream_run, stream_resume, and each chat-starting WebSocket event
  (over budget the event is dropped and the client gets Coze's `error` event, code 4013);
* the overshoot is bounded: at most coze_user_max_parallel_chats chats of one user in flight;
* a non-streamed chat answered `in_progress` is counted although the client never asks for its usage
  (the proxy polls /v3/chat/retrieve itself, with the user's token, on the origin the chat went to);
* refusals: code 4013 with Retry-After; HTTP 200 for a page (Coze's chat component shows the msg of a
  200 only), 429 for other clients.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import urllib.parse

import pytest

from tests import clients
from tests.clients import WsClient, placeholder_query, session, tagged, tokens_of, usage_today

PAGE = "https://chat.example.org"
USER = "1732000000001-budgetUser001"
TEXT = "count these words please"  # the stand-in charges 2 * 4 + 3 = 11 tokens for it
WS_TEXT = "over the socket"  # 9 tokens


def chat_body(text: str, stream: bool) -> dict:
    return clients.chat_body(USER, text, stream)


@pytest.fixture
def ws_port(standin):
    return urllib.parse.urlsplit(standin.base_url).port


@pytest.fixture
def budget_proxy(mitmdump, config_file, ws_port):
    def start(*more: str):
        return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}",
                        f"coze_api_hosts=ws://localhost:{ws_port}", "coze_usage_file=memory", *more)
    return start


# ------------------------------------------------------------------------------ parallel streamed chats

def test_twenty_parallel_streamed_chats_overshoot_at_most_the_parallel_cap(budget_proxy, standin):
    standin.delta_gap = 0.05  # each chat streams for ~0.4 s: all twenty start while the first ones run
    budget, cap, one_chat = 40, 4, tokens_of(TEXT)
    proxy = budget_proxy(f"coze_user_daily_tokens={budget}", f"coze_user_max_parallel_chats={cap}")
    outcomes: list[str] = []
    lock = threading.Lock()

    def person(_):
        s = session(proxy)
        for _attempt in range(200):
            r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None),
                       json=chat_body(TEXT, stream=True), stream=True, timeout=30)
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                for _ in r.iter_lines():
                    pass
                with lock:
                    outcomes.append("chat")
                continue  # keep chatting until the budget says no
            answer = r.json()
            assert r.status_code == 429 and answer["code"] == 4013 and int(r.headers["Retry-After"]) >= 1, (r.status_code, answer)
            if "in progress" in answer["msg"]:
                with lock:
                    outcomes.append("parallel")
                time.sleep(0.05)
                continue
            assert "daily budget is 40" in answer["msg"], answer
            with lock:
                outcomes.append("budget")
            return

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(person, range(20)))

    s = session(proxy)
    counted = usage_today(s)
    charged = standin.usage_of(USER)["token_count"]
    chats = outcomes.count("chat")
    print(f"\nFIGURE parallel: budget {budget}, cap {cap}, one chat {one_chat} tokens: {chats} chats ran, "
          f"{counted} tokens counted ({counted - budget:+d} over the budget), Coze charged {charged}; "
          f"{outcomes.count('parallel')} parallel refusals, {outcomes.count('budget')} budget refusals")
    assert counted == charged  # everything Coze charged was counted
    assert budget <= counted <= budget + cap * one_chat
    assert outcomes.count("budget") == 20  # every person ends refused by the budget
    # and from now on nothing more reaches Coze
    before = len(standin.chats_of(USER))
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, True), timeout=10)
    assert r.status_code == 429 and r.json()["code"] == 4013
    assert len(standin.chats_of(USER)) == before


def test_refused_with_200_for_a_page_and_429_for_other_clients(budget_proxy, standin):
    standin.delta_gap = 0
    proxy = budget_proxy("coze_user_daily_tokens=5")
    s = session(proxy)
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER), json=chat_body(TEXT, False), timeout=10)
    assert r.status_code == 200 and r.json()["code"] == 0  # 11 tokens: over the budget of 5 from now on
    page = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER), json=chat_body(TEXT, True), timeout=10)
    client = s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, True), timeout=10)
    # the page: HTTP 200, Coze's envelope, so @coze/chat-sdk shows the msg as the answer
    assert page.status_code == 200 and page.headers["content-type"].startswith("application/json")
    assert page.json()["code"] == 4013 and "daily budget is 5" in page.json()["msg"]
    assert int(page.headers["Retry-After"]) > 0
    assert page.headers.get("access-control-allow-origin") == PAGE  # the page can read it
    # any other client: 429 with Retry-After
    assert client.status_code == 429 and client.json()["code"] == 4013 and int(client.headers["Retry-After"]) > 0
    assert len(standin.chats_of(USER)) == 1


# ------------------------------------------------------------------------------ every spending endpoint

@pytest.mark.parametrize("path", ["/v1/workflow/run", "/v1/workflow/stream_run", "/v1/workflow/stream_resume"])
def test_workflows_and_tool_outputs_are_refused_over_budget(budget_proxy, standin, path):
    standin.delta_gap = 0
    proxy = budget_proxy("coze_user_daily_tokens=10")
    s = session(proxy)
    assert s.post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None),
                  json=chat_body(TEXT, False), timeout=10).json()["code"] == 0  # 11 of 10
    standin.reset_observations()
    r = s.post(f"{standin.base_url}{path}", headers=tagged(USER, origin=None),
               json={"workflow_id": "7001", "parameters": {"input": "x"}, "additional_messages": [{"role": "user", "content": "x"}]},
               timeout=10)
    assert r.status_code == 429 and r.json()["code"] == 4013 and "daily budget is 10" in r.json()["msg"], r.text
    assert standin.requests_seen == []  # nothing reached Coze, no token was minted or sent
    # reading stays allowed
    assert s.get(f"{standin.base_url}/v1/conversations?bot_id=7000", headers=tagged(USER, origin=None),
                 timeout=10).json()["code"] == 0


# ------------------------------------------------------------------------------ WebSocket chats

def ws_client(proxy, ws_port) -> WsClient:
    client = WsClient(proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(USER)}", headers=[("Origin", PAGE)])
    assert client.status == 101, client.body
    return client


def test_one_socket_cannot_chat_past_the_budget(budget_proxy, standin, ws_port):
    standin.delta_gap = 0
    proxy = budget_proxy("coze_user_daily_tokens=40")
    client = ws_client(proxy, ws_port)
    try:
        completed = 0
        for _ in range(12):
            client.send("conversation.message.create", {"role": "user", "content_type": "text", "content": WS_TEXT})
            last = client.until("conversation.chat.completed")[-1]
            if last["event_type"] == "error":
                break
            completed += 1
        assert completed == 5  # 5 x 9 = 45: the fifth crossed the budget of 40 and finished
        assert last["data"]["code"] == 4013 and "daily budget is 40" in last["data"]["msg"], last
        chats = len(standin.chats_of(USER))
        assert chats == 5  # the refused message never reached Coze
        # the socket stays open: events that spend nothing still pass
        client.send("chat.update", {"chat_config": {}})
        assert client.until("chat.updated")[-1]["event_type"] == "chat.updated"
        client.send("conversation.message.create", {"role": "user", "content_type": "text", "content": WS_TEXT})
        assert client.until("conversation.chat.completed")[-1]["data"]["code"] == 4013
        assert len(standin.chats_of(USER)) == chats
    finally:
        client.close()
    s = session(proxy)
    assert usage_today(s) == standin.usage_of(USER)["token_count"] == 45


def test_a_socket_may_not_start_more_chats_than_the_cap_at_once(budget_proxy, standin, ws_port):
    standin.delta_gap = 0.5  # the first reply takes ~3 s: all six events arrive while it runs, even on a busy machine
    proxy = budget_proxy("coze_user_daily_tokens=100000", "coze_user_max_parallel_chats=4")
    client = ws_client(proxy, ws_port)
    try:
        for i in range(6):
            client.send("conversation.message.create", {"role": "user", "content_type": "text", "content": f"{WS_TEXT} {i}"})
        errors, completed = client.chat_ends(6)
        assert len(errors) == 2 and all(e["code"] == 4013 and "at most 4" in e["msg"] for e in errors), errors
        assert len(standin.chats_of(USER)) == 4
        # once they ended, the socket chats again
        client.send("conversation.message.create", {"role": "user", "content_type": "text", "content": WS_TEXT})
        assert client.until("conversation.chat.completed")[-1]["event_type"] == "conversation.chat.completed"
    finally:
        client.close()


def test_a_chat_sent_with_the_upgrade_request_holds_its_place(budget_proxy, standin, ws_port):
    """A client may send its first message in the same write as the upgrade request. mitmproxy 12 then runs that
    message's hook before anything queued after the 101's `response` hook: the chat it starts holds its place in
    the cap all the same (the 101's end releases nothing of it), so a second socket is refused at the cap of 1."""
    standin.delta_gap = 0.5  # the first reply takes ~3 s: the second socket asks while it runs
    proxy = budget_proxy("coze_user_daily_tokens=100000", "coze_user_max_parallel_chats=1")
    message = {"role": "user", "content_type": "text", "content": WS_TEXT}
    first = WsClient(proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(USER)}", headers=[("Origin", PAGE)],
                     first=("conversation.message.create", message))
    second = ws_client(proxy, ws_port)
    try:
        assert first.status == 101, first.body
        first.until("conversation.chat.created")  # the first chat runs
        second.send("conversation.message.create", message)
        refused = second.until("conversation.chat.completed")[-1]
        assert refused["event_type"] == "error" and refused["data"]["code"] == 4013, refused
        assert "at most 1" in refused["data"]["msg"]
        assert first.until("conversation.chat.completed")[-1]["event_type"] == "conversation.chat.completed"
        assert len(standin.chats_of(USER)) == 1
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------------ non-streamed chats

def test_non_streamed_chats_read_via_message_list_are_counted(mitmdump, config_file, standin, front):
    standin.delta_gap = 0.05
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={front.base_url}",
                     "coze_usage_file=memory")
    s = session(proxy)
    chats = []
    for i in range(10):
        r = s.post(f"{front.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(f"{TEXT} {i}", False),
                   timeout=10)
        data = r.json()["data"]
        assert data["status"] == "in_progress" and "usage" not in data
        chats.append(data)
    # the client reads the replies with message/list only; it never calls retrieve
    time.sleep(1.0)
    for c in chats:
        answer = s.get(f"{front.base_url}/v3/chat/message/list?conversation_id={c['conversation_id']}&chat_id={c['id']}",
                       headers=tagged(USER, origin=None), timeout=10).json()
        assert answer["code"] == 0 and answer["data"][0]["content"].startswith("Sandbox reply to:")
    charged = standin.usage_of(USER)["token_count"]
    assert charged == sum(tokens_of(f"{TEXT} {i}") for i in range(10))
    deadline = time.time() + 20
    while usage_today(s) < charged and time.time() < deadline:
        time.sleep(0.2)
    assert usage_today(s) == charged
    # the proxy asked, with the user's real token, on the origin the chats went to; each chat counted once
    assert front.retrieves and all(r["authorization"].startswith("Bearer czs_") for r in front.retrieves)
    assert {r["chat_id"] for r in front.retrieves if r["status"] == "completed"} == {c["id"] for c in chats}
    assert standin.placeholder_seen == 0
    delays = sorted(max(r["time"] for r in front.retrieves if r["chat_id"] == cid and r["status"] == "completed")
                    - front.answered[cid] for cid in front.answered)
    polls = len(front.retrieves)
    print(f"\nFIGURE poll: 10 in_progress chats counted {charged} tokens; {polls} retrieve requests "
          f"({polls / 10:.1f} per chat); answer -> usage counted: median {delays[5]:.2f} s, max {delays[-1]:.2f} s")
    time.sleep(1.5)
    assert len(front.retrieves) == polls  # polling stopped once each was counted
    assert usage_today(s) == charged


def test_a_polled_chat_stays_in_flight_until_counted(mitmdump, config_file, standin, front):
    standin.delta_gap = 0.3  # each chat runs ~2 s on Coze's side after its in_progress answer
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={front.base_url}",
                     "coze_usage_file=memory", "coze_user_daily_tokens=1000", "coze_user_max_parallel_chats=2")
    s = session(proxy)
    answers = [s.post(f"{front.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, False),
                      timeout=10) for _ in range(3)]
    assert [a.json()["code"] for a in answers] == [0, 0, 4013]
    assert answers[2].status_code == 429 and "at most 2" in answers[2].json()["msg"]
    deadline = time.time() + 20
    while usage_today(s) < 2 * tokens_of(TEXT) and time.time() < deadline:
        time.sleep(0.2)
    assert usage_today(s) == 2 * tokens_of(TEXT)
    again = s.post(f"{front.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(TEXT, False), timeout=10)
    assert again.json()["code"] == 0  # counted: no longer in flight


# ------------------------------------------------------------------------------ the in-flight count (pure)

def test_in_flight_counts_per_user_rekeys_and_forgets_lost_releases():
    from coze_mitm.core.usage_flight import InFlight

    now = [1000.0]
    flight = InFlight(clock=lambda: now[0], max_age=60)
    flight.add("f1", "alice")
    flight.add("ws", "alice")
    flight.add("ws", "alice")
    flight.add("f2", "bob")
    assert (flight.count("alice"), flight.count("bob"), flight.total()) == (3, 1, 4)
    assert flight.release("ws") == 1 and flight.count("alice") == 2
    assert flight.rekey("f1", "poll:f1") and not flight.holds("f1") and flight.count("alice") == 2
    assert flight.release_all("f1") == 0 and flight.release_all("poll:f1") == 1
    now[0] += 61  # the socket's end was never seen: forgotten, not a lock-out
    assert flight.count("alice") == 0 and flight.expired == 1
    assert flight.release_all("ws") == 0
