"""A proxy a team shares (issue 10), end to end through a real mitmdump running the bundle with
mitmproxy's `proxyauth` set to an htpasswd file, against the strict Coze stand-in.

* identities come from the proxy login: `login:<name>` reaches Coze's JWT as session_name, whatever tag
  asked; a wrong password is mitmproxy's 407 and nothing reaches Coze;
* usage per user is counted from what Coze reports (the stand-in's usage is deterministic, usage_of()
  says what it charged), for streamed chats (still streamed) and WebSocket chats;
* a daily budget lets the chat that crosses it finish, then answers code 4013 (HTTP 200 to a page, 429 to
  other clients) while history stays readable, and survives a restart;
* /metrics parses with prometheus_client's parser; the password is in no saved flow and no output.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest
import requests

from tests.clients import WsClient, chat_body as body, placeholder_query, tagged, tokens_of
from tests.harness import Mitmdump
from tests.team import PASSWORDS, TAG_A, TAG_B, Client, basic, sha_line

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

PAGE = "https://chat.example.org"


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "team.htpasswd"
    path.write_text("".join(sha_line(u, p) for u, p in PASSWORDS.items()))
    return path


@pytest.fixture
def team(tmp_path, htpasswd, config_file, standin):
    """start(*more_sets) -> a mitmdump with proxy logins; the same confdir (so the same usage file) each time."""
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    ws_port = urllib.parse.urlsplit(standin.base_url).port
    started = []

    def start(*more: str, flows: str = "flows.mitm") -> Mitmdump:
        sets = [f"proxyauth=@{htpasswd}", f"coze_config={config_file}", f"coze_origins={PAGE}",
                f"coze_api_hosts=ws://localhost:{ws_port}", "connection_strategy=lazy", *more]
        proxy = Mitmdump(confdir, sets, extra_args=["-w", str(tmp_path / flows)])
        started.append(proxy)
        proxy.flows_file = tmp_path / flows
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


# ------------------------------------------------------------------------------------------ identities

def test_two_logins_are_two_identities_with_isolated_histories(team, standin):
    proxy = team()
    alice, bob = Client(proxy, standin, "alice", TAG_A), Client(proxy, standin, "bob", TAG_B)
    chat = alice.chat("hello from alice")
    bob.chat("hello from bob")
    # the login, unchanged, is the session_name of the JWT the stand-in verified; no tag reached it
    assert sorted(e["session_name"] for e in standin.exchanges) == ["login:alice", "login:bob"]
    assert alice.history(chat["conversation_id"])["code"] == 0
    assert bob.history(chat["conversation_id"])["code"] == 4101  # bob cannot read alice's conversation
    assert standin.placeholder_seen == 0


def test_one_login_with_two_tags_is_one_identity(team, standin):
    proxy = team()
    browser_a, browser_b = Client(proxy, standin, "alice", TAG_A), Client(proxy, standin, "alice", TAG_B)
    chat = browser_a.chat("from the laptop", origin=PAGE)
    answer = browser_b.history(chat["conversation_id"])  # the other browser, another tag: the same history
    assert answer["code"] == 0 and any(m["content"] == "from the laptop" for m in answer["data"])
    browser_b.chat("from the phone", conversation_id=chat["conversation_id"])
    assert standin.exchange_count() == 1 and standin.exchange_count("login:alice") == 1
    assert [u["user"] for u in browser_b.status()["usage"]] == ["alice"]


@pytest.mark.parametrize("auth", [basic("alice", "wrong-password-1"), basic("mallory", "whatever"), None],
                         ids=["wrong-password", "unknown-user", "no-login"])
def test_wrong_login_is_407_and_nothing_reaches_coze(team, standin, auth):
    proxy = team()
    s = requests.Session()
    s.trust_env = False
    headers = tagged(TAG_A, origin=None)
    if auth:
        headers["Proxy-Authorization"] = auth
    r = s.post(f"{standin.base_url}/v3/chat", headers=headers, json=body(TAG_A, "sneaky", stream=False),
               proxies={"http": proxy.url}, timeout=10)
    assert r.status_code == 407
    assert "proxy-authenticate" in r.headers
    assert standin.requests_seen == [] and standin.exchanges == []


# ------------------------------------------------------------------------------------------ usage

def test_streamed_chat_counted_exactly_and_still_streamed(team, standin):
    standin.delta_gap = 0.25  # the reply's words leave the stand-in a quarter second apart
    proxy = team()
    alice = Client(proxy, standin, "alice", TAG_A)
    text = "please count every one of these words"
    seen_tokens, statuses, _ = alice.stream(text)
    # the deltas reached the client while the stand-in was still producing the reply: nothing buffered (the
    # last one may find the chat completed: the stand-in completes it right after sending it)
    assert len(statuses) == len(f"Sandbox reply to: {text}".split())
    assert set(statuses[:-2]) == {"in_progress"}, statuses
    charged = standin.usage_of("login:alice")["token_count"]
    assert seen_tokens == charged == tokens_of(text)
    assert alice.usage()["alice"] == {"user": "alice", "chats": 1, "tokens": charged, "tokens_today": charged}


def test_websocket_chat_counts_one_chat_and_its_tokens(team, standin):
    proxy = team()
    ws_port = urllib.parse.urlsplit(standin.base_url).port
    alice = Client(proxy, standin, "alice", TAG_A)
    for tunnel in (True, False):
        client = WsClient(proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(TAG_A)}", headers=[("Origin", PAGE)],
                          tunnel=tunnel, proxy_auth=alice.auth)
        try:
            assert client.status == 101, client.body
            events = client.chat("over the socket")
        finally:
            client.close()
        assert events[-1]["event_type"] == "conversation.chat.completed", events[-1]
    assert [w["session"] for w in standin.ws_seen] == ["login:alice", "login:alice"]
    charged = standin.usage_of("login:alice")["token_count"]
    assert charged == 2 * tokens_of("over the socket")
    usage = alice.usage()["alice"]
    assert (usage["chats"], usage["tokens"]) == (2, charged)


# ------------------------------------------------------------------------------------------ budgets

BUDGET = 20
FIVE = "one two three four five"  # 13 tokens


def test_budget_lets_the_crossing_chat_finish_then_429_history_readable_and_kept_over_a_restart(team, standin):
    standin.delta_gap = 0
    proxy = team(f"coze_user_daily_tokens={BUDGET}")
    alice, bob = Client(proxy, standin, "alice", TAG_A), Client(proxy, standin, "bob", TAG_B)
    first = alice.chat(FIVE)  # 13 of 20
    tokens, _, _ = alice.stream(FIVE)  # 26: this one crosses the budget, and finishes
    assert tokens == tokens_of(FIVE)
    assert standin.usage_of("login:alice")["token_count"] == 26 and len(standin.chats_of("login:alice")) == 2
    chats_before = len(standin.requests_seen)

    refused = alice.call("POST", "/v3/chat", origin=PAGE, json=body(TAG_A, "one more", stream=True))
    assert refused.status_code == 200  # a page: Coze's chat component shows the msg of a 4013 only with a 200
    answer = refused.json()
    assert answer["code"] == 4013
    assert "alice has used 26 Coze tokens today" in answer["msg"] and "daily budget is 20" in answer["msg"]
    assert "resume at" in answer["msg"] and "UTC" in answer["msg"] and "Reading history still works" in answer["msg"]
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["access-control-allow-origin"] == PAGE  # the page can read why
    assert "Retry-After" in refused.headers["access-control-expose-headers"]
    assert len(standin.requests_seen) == chats_before  # the refused chat never reached Coze
    # reading history still works; other users have their own budget
    assert alice.history(first["conversation_id"])["code"] == 0
    bob.chat(FIVE)
    assert alice.usage()["alice"]["tokens_today"] == 26
    assert alice.status()["daily_token_budget"] == BUDGET
    proxy.stop()

    again = team(f"coze_user_daily_tokens={BUDGET}", flows="flows2.mitm")  # same confdir: same usage file
    alice = Client(again, standin, "alice", TAG_A)
    assert alice.call("POST", "/v3/chat", json=body(TAG_A, "after the restart", stream=False)).status_code == 429
    assert alice.history(first["conversation_id"])["code"] == 0
    assert alice.usage() == {
        "alice": {"user": "alice", "chats": 2, "tokens": 26, "tokens_today": 26},
        "bob": {"user": "bob", "chats": 1, "tokens": 13, "tokens_today": 13},
    }
    assert standin.exchange_count("login:alice") == 2  # one per proxy process: tokens are not kept on disk


def test_websocket_chat_over_budget_is_refused_before_the_upgrade(team, standin):
    standin.delta_gap = 0
    proxy = team("coze_user_daily_tokens=10")
    ws_port = urllib.parse.urlsplit(standin.base_url).port
    alice = Client(proxy, standin, "alice", TAG_A)
    alice.chat(FIVE)  # 13 >= 10
    client = WsClient(proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(TAG_A)}", headers=[("Origin", PAGE)],
                      proxy_auth=alice.auth)
    client.close()
    assert client.status == 429 and json.loads(client.body)["code"] == 4013
    assert standin.ws_seen == []


# ------------------------------------------------------------------------------------------ metrics, secrets

def test_metrics_parse_and_the_password_is_nowhere(team, standin):
    standin.delta_gap = 0
    proxy = team("coze_user_daily_tokens=15")
    alice, bob = Client(proxy, standin, "alice", TAG_A), Client(proxy, standin, "bob", TAG_B)
    alice.stream(FIVE)
    alice.chat("two words")
    assert alice.call("POST", "/v3/chat", json=body(TAG_A, "over", stream=False)).status_code == 429
    bob.chat("hi")
    preflight = alice.call("OPTIONS", "/v3/chat", origin=PAGE, headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204
    wrong = Client(proxy, standin, "bob", TAG_B, password="not-" + PASSWORDS["bob"])
    assert wrong.call("POST", "/v3/chat", json=body(TAG_B, "x", stream=False)).status_code == 407

    m = alice.metrics()
    assert m[("coze_mitm_tokens_total", (("user", "alice"),))] == tokens_of(FIVE) + tokens_of("two words")
    assert m[("coze_mitm_tokens_total", (("user", "bob"),))] == tokens_of("hi")
    assert m[("coze_mitm_chats_total", (("user", "alice"),))] == 2
    assert m[("coze_mitm_chats_total", (("user", "bob"),))] == 1
    assert m[("coze_mitm_requests_total", (("outcome", "injected"),))] == 3
    assert m[("coze_mitm_requests_total", (("outcome", "preflight"),))] == 1
    assert m[("coze_mitm_requests_total", (("outcome", "refused"), ("reason", "budget")))] == 1
    assert m[("coze_mitm_token_exchanges_total", (("result", "ok"),))] == 2
    assert m[("coze_mitm_usage_store_ok", ())] == 1
    status = alice.status()
    assert status["identities"]["mode"] == "htpasswd"
    assert [u["user"] for u in status["usage"]] == ["alice", "bob"]  # biggest spenders first
    page = alice.get("http://coze.mitm/").text
    assert "<th>login</th>" in page and "<code>alice</code>" in page and TAG_A not in page
    assert "history follows the login in every browser" in page
    # the served userscript knows the mode: its "fresh identity" dialog says the history follows the login
    assert '  loginMode: "htpasswd", // @coze-mitm loginMode' in alice.get("http://coze.mitm/coze-chat.user.js").text

    proxy.stop()  # -w has written every flow
    saved = proxy.flows_file.read_bytes()
    assert b"/v3/chat" in saved and b"(password removed by coze-mitm)" in saved  # the login stays, not its password
    for password in (*PASSWORDS.values(), "not-" + PASSWORDS["bob"]):
        for form in (password, basic("alice", password)[6:], basic("bob", password)[6:]):
            assert form.encode() not in saved, form
            assert form not in proxy.output, form
