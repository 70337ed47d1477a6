"""Two proxies, one Redis (issue 28), end to end: two real mitmdump processes with coze_usage_file pointing at one
real redis-server (append-only file, fsync always, a password), against the strict Coze stand-in.

* one user alternating between the proxies is refused once the budget they share is spent, and each proxy's
  status page and /metrics show what was spent through the other;
* a chat seen through both proxies (retrieved through each, or polled by one and retrieved through the other)
  counts its usage once;
* 20 parallel chats of one user split over both proxies never run more than one cap at once;
* kill -9 of a proxy mid-chat: its in-flight entries are freed within their lease, the other proxy serves again;
* Redis away: one line in each proxy's log, budgeted chats refused naming the store, unbudgeted traffic goes on
  and its usage is written when Redis is back; a restart of Redis (SIGKILL) keeps every acknowledged increment;
* the password reaches no output, status page or metrics.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import requests

from coze_mitm.core import usage_redis
from coze_mitm.core.usage_book import utc_day
from tests import redis_server
from tests.clients import session, tagged
from tests.harness import free_port, wait_for

pytestmark = [pytest.mark.process, pytest.mark.skipif(
    redis_server.binary() is None or usage_redis.redis_available() != "",
    reason="needs Debian's redis-server (run_tests.py installs it as root: apt-get install redis-server) and the "
           "Python package redis (requirements.txt)")]

PAGE = "https://chat.example.org"
USER = "1732000000001-sharedBudget01"
TEXT = "count these words please"  # the stand-in charges 2 * 4 + 3 = 11 tokens for it
ONE_CHAT = 11


def chat_body(stream: bool = True) -> dict:
    return {"bot_id": "7000", "user_id": USER, "stream": stream,
            "additional_messages": [{"role": "user", "content": TEXT, "content_type": "text"}]}


def status(proxy) -> dict:
    return session(proxy).get("http://coze.mitm/status.json", timeout=10).json()


def chat(proxy, standin, user: str = USER, origin=None) -> requests.Response:
    """One streamed chat, read to its end; the response (a refusal is JSON)."""
    r = session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(user, origin=origin), json=chat_body(),
                            stream=True, timeout=30)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for _ in r.iter_lines():
            pass
    return r


def streamed(r: requests.Response) -> bool:
    return r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream")


@pytest.fixture
def redis(tmp_path):
    server = redis_server.RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def two_proxies(mitmdump, config_file, redis, monkeypatch):
    """start(*sets) -> (A, B): A has the password in its URL, B from COZE_REDIS_PASSWORD."""
    def start(*sets: str, a_sets=(), b_sets=()):
        common = (f"coze_config={config_file}", f"coze_origins={PAGE}", *sets)
        a = mitmdump(*common, f"coze_usage_file={redis.url_with_password}", *a_sets)
        monkeypatch.setenv(usage_redis.PASSWORD_ENV, redis.password)
        b = mitmdump(*common, f"coze_usage_file={redis.url}", *b_sets)
        monkeypatch.delenv(usage_redis.PASSWORD_ENV)
        for proxy in (a, b):
            assert proxy.wait_for_output(r"shared through redis://127\.0\.0\.1:\d+/0", 20), proxy.output
        return a, b
    return start


def no_password_anywhere(redis, *proxies):
    for proxy in proxies:
        assert redis.password not in proxy.output
        s = session(proxy)
        assert redis.password not in s.get("http://coze.mitm/status.json", timeout=10).text
        assert redis.password not in s.get("http://coze.mitm/", timeout=10).text
        assert redis.password not in s.get("http://coze.mitm/metrics", timeout=10).text


def test_one_user_alternating_between_two_proxies_gets_one_budget(two_proxies, standin, redis):
    standin.delta_gap = 0
    budget = 30  # the third chat (33 tokens) crosses it
    a, b = two_proxies(f"coze_user_daily_tokens={budget}")
    spent = 0
    for proxy, other in [(a, b), (b, a), (a, b)]:
        r = chat(proxy, standin)
        assert streamed(r), r.text
        spent += ONE_CHAT
        # the other proxy's status page shows what was spent through this one
        wait_for(lambda: status(other)["usage_totals"]["tokens_today"] == spent, what=f"{spent} tokens on the other proxy")
    assert status(a)["usage_file"] == {"path": redis.url, "ok": True, "error": ""}
    # spent: refused by both, whichever the user tries (a program gets 429, a page 200; code 4013 either way)
    for proxy in (b, a):
        r = chat(proxy, standin)
        assert r.status_code == 429 and r.json()["code"] == 4013, r.text
        assert f"used {spent} Coze tokens today, and the daily budget is {budget}" in r.json()["msg"]
        page = chat(proxy, standin, origin=PAGE)
        assert page.status_code == 200 and page.json()["code"] == 4013
    assert len(standin.chats_of()) == 3 and standin.usage_of()["token_count"] == spent
    metrics = session(b).get("http://coze.mitm/metrics", timeout=10).text
    assert "coze_mitm_usage_store_ok 1" in metrics
    assert any(line.startswith("coze_mitm_tokens_today{") and line.endswith(f" {spent}") for line in metrics.splitlines())
    day = utc_day(time.time())
    assert redis.client().hget(f"coze-mitm:day:{day}:tokens", f"login:{USER}") is None  # keyed by the user id as is
    assert redis.client().hget(f"coze-mitm:day:{day}:tokens", USER) == str(spent)
    no_password_anywhere(redis, a, b)


def test_twenty_parallel_chats_over_two_proxies_stay_within_one_cap(two_proxies, standin):
    standin.delta_gap = 0.05  # each chat streams for ~0.4 s: the twenty overlap
    cap = 4
    a, b = two_proxies("coze_user_daily_tokens=1000000", f"coze_user_max_parallel_chats={cap}")
    peak, stop = [0], threading.Event()

    def watch():  # the stand-in's view: chats running at Coze at the same moment
        while not stop.is_set():
            running = sum(1 for c in standin.chats_of(USER) if c["status"] in ("created", "in_progress"))
            peak[0] = max(peak[0], running)
            time.sleep(0.002)

    def person(i):
        proxy = (a, b)[i % 2]
        refused = 0
        while True:
            r = chat(proxy, standin)
            if streamed(r):
                return refused
            assert r.status_code == 429 and r.json()["code"] == 4013 and "in progress" in r.json()["msg"], r.text
            refused += 1
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        refusals = list(pool.map(person, range(20)))
    stop.set()
    watcher.join()
    print(f"\nFIGURE two proxies, cap {cap}: 20 chats ran, at most {peak[0]} at once at Coze, "
          f"{sum(refusals)} parallel refusals")
    assert len(standin.chats_of(USER)) == 20
    assert 1 <= peak[0] <= cap  # one cap for both proxies (two private caps would allow 8)
    assert sum(refusals) > 0
    wait_for(lambda: status(a)["usage_totals"]["tokens_today"] == 20 * ONE_CHAT, what="all usage counted")


def test_a_killed_proxy_frees_its_chats_within_the_lease(two_proxies, standin, redis):
    standin.delta_gap = 0.5  # a chat streams for ~2 s: killed mid-stream
    lease = 3
    a, b = two_proxies("coze_user_daily_tokens=1000000", "coze_user_max_parallel_chats=2", f"coze_usage_lease={lease}")
    streams = []
    for _ in range(2):
        r = session(a).post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(),
                            stream=True, timeout=30)
        assert streamed(r)
        streams.append(r)
    r = chat(b, standin)  # both places are held through A
    assert r.status_code == 429 and "2 chats in progress" in r.json()["msg"]
    a.proc.kill()  # SIGKILL: no release, no goodbye
    a.proc.wait(10)
    killed = redis.client().time()
    killed_ms = killed[0] * 1000 + killed[1] // 1000
    deadlines = [score for _m, score in redis.client().zrange(f"coze-mitm:flight:{USER}", 0, -1, withscores=True)]
    assert len(deadlines) == 2 and all(d <= killed_ms + lease * 1000 for d in deadlines)
    standin.delta_gap = 0
    wait_for(lambda: streamed(chat(b, standin)), timeout=lease * 4, what="B serving the user again")
    # both of A's places are free (not one expired and one still held): B runs two chats at once
    standin.delta_gap = 0.5

    def two_at_once() -> bool:
        answers = [session(b).post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None),
                                   json=chat_body(), stream=True, timeout=30) for _ in range(2)]
        for r in answers:
            r.close()
        return all(streamed(r) for r in answers)
    wait_for(two_at_once, timeout=lease * 4, what="both places free")


def retrieved_tokens(proxy, standin, chat: dict) -> int:
    """A client asking Coze for a chat (GET /v3/chat/retrieve) through `proxy`: the usage Coze reports."""
    r = session(proxy).get(f"{standin.base_url}/v3/chat/retrieve", headers=tagged(USER, origin=None), timeout=30,
                           params={"conversation_id": chat["conversation_id"], "chat_id": chat["id"]})
    assert r.status_code == 200 and r.json()["code"] == 0, r.text
    return r.json()["data"]["usage"]["token_count"]


def usage_metrics(proxy) -> dict:
    """The per-user usage lines of /metrics (one user in the test): {metric name: value}."""
    text = session(proxy).get("http://coze.mitm/metrics", timeout=10).text
    names = ("coze_mitm_tokens_total{", "coze_mitm_tokens_today{", "coze_mitm_chats_total{")
    return {line.split("{")[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(names)}


def test_a_chat_seen_through_both_proxies_counts_once(two_proxies, standin, redis):
    """Usage is counted once per chat id for the whole team: a chat answered through A and retrieved through A
    and B, and a chat whose stream was cut (B polls its usage itself) retrieved through A, each count once."""
    import requests

    standin.delta_gap = 0
    a, b = two_proxies()
    tokens_key = f"coze-mitm:day:{utc_day(time.time())}:tokens"
    r = session(a).post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None),
                        json=chat_body(stream=False), timeout=30)
    first = r.json()["data"]
    assert first["status"] == "completed" and first["usage"]["token_count"] == ONE_CHAT  # counted by A
    assert retrieved_tokens(a, standin, first) == ONE_CHAT
    assert retrieved_tokens(b, standin, first) == ONE_CHAT  # B never saw this chat before
    # The second chat: streamed through B, the connection to Coze cut mid-answer; the chat runs on, B polls it.
    standin.delta_gap, standin.chat_mode = 0.1, "cut"
    r = session(b).post(f"{standin.base_url}/v3/chat", headers=tagged(USER, origin=None), json=chat_body(),
                        stream=True, timeout=30)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in r.iter_lines():
            pass
    standin.delta_gap, standin.chat_mode = 0, "ok"
    wait_for(lambda: redis.client().hget(tokens_key, USER) == str(2 * ONE_CHAT), what="B's poll counted")
    second = standin.chats_of(USER)[1]
    assert second["id"] != first["id"] and second["status"] == "completed"
    assert retrieved_tokens(a, standin, second) == ONE_CHAT
    assert retrieved_tokens(b, standin, second) == ONE_CHAT
    # A third chat through A, after the retrieves: once Redis has it, every earlier write has been answered.
    assert streamed(chat(a, standin))
    spent = standin.usage_of(USER)["token_count"]
    assert spent == 3 * ONE_CHAT
    wait_for(lambda: redis.client().hget(tokens_key, USER) == str(spent), what="the third chat written")
    for proxy in (a, b):
        wait_for(lambda: status(proxy)["usage_totals"]["tokens_today"] == spent, what="the page showing it")
    assert redis.client().hget(tokens_key, USER) == str(spent)
    assert redis.client().hget(f"coze-mitm:day:{utc_day(time.time())}:chats", USER) == "3"
    assert usage_metrics(a) == usage_metrics(b) == {"coze_mitm_tokens_total": str(spent), "coze_mitm_chats_total": "3",
                                                    "coze_mitm_tokens_today": str(spent)}


def test_redis_away_and_back(two_proxies, standin, redis):
    """A has a budget, B none. Redis killed (SIGKILL) and restarted from its append-only file."""
    standin.delta_gap = 0
    a, b = two_proxies(a_sets=["coze_user_daily_tokens=1000"])
    other = "1732000000002-unbudgetedUser"
    assert streamed(chat(a, standin))
    day = utc_day(time.time())
    tokens_key = f"coze-mitm:day:{day}:tokens"
    wait_for(lambda: redis.client().hget(tokens_key, USER) == str(ONE_CHAT), what="the usage acknowledged")

    redis.kill()
    # A finds out at its next budget decision, or its next round (each second) at the latest
    wait_for(lambda: not status(a)["usage_file"]["ok"], what="A noticing Redis is away")
    r = chat(a, standin)
    assert r.status_code == 503 and r.json()["code"] == 5000, r.text
    assert f"usage store it is checked against ({redis.url}) does not answer" in r.json()["msg"]
    page = chat(a, standin, origin=PAGE)
    assert page.status_code == 200 and page.json()["code"] == 4013 and redis.url in page.json()["msg"]
    history = session(a).get(f"{standin.base_url}/v1/conversations?bot_id=7000", headers=tagged(USER, origin=None), timeout=10)
    assert history.status_code == 200 and history.json()["code"] == 0  # spends nothing: not refused
    for _ in range(2):  # B has no budget: chats go on, their usage waits in B's queue
        assert streamed(chat(b, standin, user=other))
    assert "coze_mitm_usage_store_ok 0" in session(a).get("http://coze.mitm/metrics", timeout=10).text
    assert f"usage store {redis.url} unreachable" in session(a).get("http://coze.mitm/", timeout=10).text
    for proxy in (a, b):
        wait_for(lambda: proxy.output.count(f"usage store {redis.url} unreachable") == 1, what="one line in each log")

    redis.start()  # the same directory: what the append-only file holds
    assert redis.client().hget(tokens_key, USER) == str(ONE_CHAT)  # acknowledged before the kill: kept
    wait_for(lambda: redis.client().hget(tokens_key, other) == str(2 * ONE_CHAT), what="B's queued usage written")
    for proxy in (a, b):
        assert proxy.wait_for_output(f"usage store {redis.url} reachable again", 10)
        assert proxy.output.count(f"usage store {redis.url} unreachable") == 1
    wait_for(lambda: status(a)["usage_file"]["ok"], what="A back")
    assert streamed(chat(a, standin))
    wait_for(lambda: status(b)["usage_totals"]["tokens_today"] == 4 * ONE_CHAT, what="B's page showing everything")
    assert len(standin.chats_of()) == 4
    no_password_anywhere(redis, a, b)


def test_unreachable_at_start_up_is_one_line_and_the_proxy_runs(mitmdump, config_file, standin):
    port = free_port()
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}",
                     f"coze_usage_file=redis://:not-printed-pw@127.0.0.1:{port}/3", "coze_user_daily_tokens=100")
    assert proxy.wait_for_output(f"usage store redis://127.0.0.1:{port}/3 unreachable", 10)
    r = chat(proxy, standin)
    assert r.status_code == 503 and f"redis://127.0.0.1:{port}/3" in r.json()["msg"]
    assert proxy.output.count("unreachable") == 1 and "not-printed-pw" not in proxy.output


def test_a_bad_redis_url_stops_the_start_up_with_one_line(tmp_path, config_file):
    from tests.harness import Mitmdump
    proxy = Mitmdump(tmp_path, [f"coze_config={config_file}", "coze_usage_file=redis://:pw@host:notaport/0"])
    assert proxy.run_to_exit() == 1
    assert "coze_usage_file: the Redis URL's port is not a number" in proxy.output
    assert "Traceback" not in proxy.output and ":pw@" not in proxy.output


def terminal_events(client) -> list[dict]:
    """The chat ends and errors among the WebSocket events of one read."""
    import json

    from wsproto.events import TextMessage
    events = [json.loads(e.data) for e in client.next_events() if isinstance(e, TextMessage)]
    return [e for e in events if e["event_type"] in ("conversation.chat.completed", "error")]


def test_websocket_chats_on_two_proxies_share_the_cap_and_the_budget(two_proxies, standin):
    import urllib.parse

    from tests.clients import WsClient
    from tests.clients import placeholder_query

    ws_port = urllib.parse.urlsplit(standin.base_url).port
    standin.delta_gap = 0.5  # a reply takes ~2 s: every start below arrives while the first ones run
    a, b = two_proxies("coze_user_daily_tokens=20", "coze_user_max_parallel_chats=2",
                       f"coze_api_hosts=ws://localhost:{ws_port}")
    sockets = [WsClient(p.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(USER)}", headers=[("Origin", PAGE)])
               for p in (a, b)]
    try:
        assert [s.status for s in sockets] == [101, 101]
        for s in sockets:
            for i in range(2):
                s.send("conversation.message.create", {"role": "user", "content_type": "text", "content": f"w {i}"})
        errors, completed = [], 0
        for s in sockets:
            ends = 0
            while ends < 2:  # both of this socket's starts answered (an error may share a read with another)
                for event in terminal_events(s):
                    ends += 1
                    if event["event_type"] == "error":
                        errors.append(event["data"])
                    else:
                        completed += 1
        assert completed == 2 and len(errors) == 2, errors  # one cap of 2 for both proxies' sockets
        assert all(e["code"] == 4013 and "at most 2" in e["msg"] for e in errors), errors
        assert len(standin.chats_of(USER)) == 2
        standin.delta_gap = 0
        assert streamed(chat(a, standin))  # over HTTP through A: 2 x 7 + 11 crosses the budget of 20
        spent = standin.usage_of(USER)["token_count"]
        assert spent == 25
        wait_for(lambda: status(b)["usage_totals"]["tokens_today"] == spent, what="B seeing it")
        sockets[1].send("conversation.message.create", {"role": "user", "content_type": "text", "content": "more"})
        last = sockets[1].until("conversation.chat.completed")[-1]
        assert last["event_type"] == "error" and "daily budget is 20" in last["data"]["msg"], last
        assert len(standin.chats_of(USER)) == 3
    finally:
        for s in sockets:
            s.close()
