"""Through a real mitmdump with addons/coze.py, against the strict local Coze stand-in."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import pytest
import requests

from tests.clients import session, tagged
from tests.conftest import write_config

PAGE = "https://chat.example.org"
ALICE = "alice-0001"
BOB = "bob-000002"


def secrets_of(standin, rsa_key) -> list[str]:
    """Every secret that must never show up in output: issued tokens and the private key's body."""
    key_body = "".join(rsa_key["private_pem"].splitlines()[1:-1])
    return [e["access_token"] for e in standin.exchanges] + [key_body[:64], key_body[-64:]]


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text


@pytest.fixture
def proxy(mitmdump, config_file):
    return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "flow_detail=3")


def test_cozepy_two_users_isolated_with_one_exchange_each(proxy, standin, rsa_key):
    cozepy = pytest.importorskip("cozepy")

    def client(user_id):
        http_client = cozepy.SyncHTTPClient(proxy=proxy.url, trust_env=False)
        return cozepy.Coze(auth=cozepy.TokenAuth(f"user:{user_id}"), base_url=standin.base_url, http_client=http_client)

    alice, bob = client(ALICE), client(BOB)
    alice_conv = alice.conversations.create()
    replies = []
    for _ in range(3):
        for event in alice.chat.stream(bot_id="7000", user_id=ALICE, conversation_id=alice_conv.id,
                                       additional_messages=[cozepy.Message.build_user_question_text("hello there")]):
            if event.event == cozepy.ChatEventType.CONVERSATION_MESSAGE_DELTA:
                replies.append(event.message.content)
    assert "".join(replies).count("hello") == 3
    bob.conversations.create()

    # Bob cannot read Alice's conversation: Coze sees two different session_names.
    with pytest.raises(cozepy.CozeAPIError) as refused:
        bob.conversations.messages.list(conversation_id=alice_conv.id)
    assert refused.value.code == 4101
    assert len(alice.conversations.messages.list(conversation_id=alice_conv.id).items) >= 2

    assert standin.exchange_count(ALICE) == 1
    assert standin.exchange_count(BOB) == 1
    assert standin.placeholder_seen == 0
    assert_no_secret(proxy.output, secrets_of(standin, rsa_key))


def test_thirty_users_at_once_one_exchange_each(proxy, standin):
    standin.token_delay = 0.5
    users = [f"user-{i:04d}-xyz" for i in range(30)]
    barrier = threading.Barrier(len(users))

    def first_request(user_id):
        s = session(proxy)
        barrier.wait()
        t0 = time.monotonic()
        r = s.post(f"{standin.base_url}/v1/conversation/create", headers=tagged(user_id), json={})
        return r.status_code, r.json()["code"], time.monotonic() - t0

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
        results = list(pool.map(first_request, users))
    wall = time.monotonic() - t0
    assert [(status, code) for status, code, _ in results] == [(200, 0)] * 30
    assert len(standin.exchanges) == 30
    assert {e["session_name"] for e in standin.exchanges} == set(users)
    print(f"\n30 users, token endpoint 0.5 s: all served in {wall:.2f} s (slowest request {max(r[2] for r in results):.2f} s)")
    # Serial exchanges would take 15 s; parallel ones ~0.5 s. A loose bound keeps the test stable on a busy machine.
    assert wall < 5


def test_one_user_fifty_concurrent_first_requests_one_exchange(proxy, standin):
    standin.token_delay = 0.3
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(
            lambda _: session(proxy).get(f"{standin.base_url}/v1/bots/7000", headers=tagged(ALICE)).status_code,
            range(50),
        ))
    assert statuses == [200] * 50
    assert standin.exchange_count(ALICE) == 1


def test_streamed_chat_arrives_delta_by_delta(proxy, standin):
    standin.delta_gap = 0.15
    s = session(proxy)
    body = {"bot_id": "7000", "user_id": ALICE, "stream": True,
            "additional_messages": [{"role": "user", "content": "one two three four five", "content_type": "text"}]}
    r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(ALICE), json=body, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["access-control-allow-origin"] == PAGE
    arrivals = []
    for line in r.iter_lines():
        if line.startswith(b"event:conversation.message.delta"):
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    # Buffered, every delta would arrive in the same instant at the end.
    spread = arrivals[-1] - arrivals[0]
    assert spread > 0.6 * 0.15 * (len(arrivals) - 1)


def test_preflight_answered_locally_never_reaches_coze(proxy, standin):
    r = session(proxy).options(f"{standin.base_url}/v3/chat", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-coze-client-user-agent",
    })
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == PAGE
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "x-coze-client-user-agent" in r.headers["access-control-allow-headers"]
    assert [x for x in standin.requests_seen if x["method"] == "OPTIONS"] == []


def test_disallowed_origin_never_gets_credentials(proxy, standin):
    s = session(proxy)
    for origin in ("https://evil.example", "null", PAGE + ".evil.test", "http://chat.example.org"):
        r = s.post(f"{standin.base_url}/v3/chat", headers=tagged(ALICE, origin=origin), json={})
        assert r.status_code == 403
        assert r.json()["code"] == 4101
        assert "access-control-allow-origin" not in r.headers
    pre = s.options(f"{standin.base_url}/v3/chat", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    assert standin.exchanges == []
    assert [x for x in standin.requests_seen if x["method"] == "POST"] == []


def test_untagged_request_passes_untouched(proxy, standin):
    r = session(proxy).get(f"{standin.base_url}/v1/bots/7000", headers={"Authorization": "Bearer czs_not_ours"})
    assert r.status_code == 401  # the stand-in judged the client's own token, unchanged
    assert standin.requests_seen[-1]["headers"]["authorization"] == "Bearer czs_not_ours"
    assert standin.exchanges == []


def test_tag_never_reaches_coze(proxy, standin):
    s = session(proxy)
    r = s.get(f"{standin.base_url}/v1/bots/7000",
              headers={"Cookie": f"theme=dark; coze_user={BOB}", "Content-Type": "application/json", "Origin": PAGE})
    assert r.status_code == 200, r.text
    seen = standin.requests_seen[-1]["headers"]
    assert seen["authorization"].startswith("Bearer czs_")
    assert seen["cookie"] == "theme=dark"
    assert standin.placeholder_seen == 0
    assert standin.exchange_count(BOB) == 1
    # Without an allowed Origin the cookie is no tag (a browser sends it by itself on top-level GETs).
    r = s.get(f"{standin.base_url}/v1/bots/7000", headers={"Cookie": f"coze_user={BOB}"})
    assert (r.status_code, r.json()["code"]) == (403, 4101)
    assert [r["path"] for r in standin.requests_seen].count("/v1/bots/7000") == 1


@pytest.mark.parametrize("style", ["401", "200"])
def test_revoked_token_is_dropped_and_replaced(proxy, standin, style):
    s = session(proxy)
    url = f"{standin.base_url}/v1/bots/7000"
    assert s.get(url, headers=tagged(ALICE)).json()["code"] == 0
    standin.revoke(session_name=ALICE, style=style)
    # The proxy drops the rejected token and re-sends the request once with a fresh one (issue 5).
    again = s.get(url, headers=tagged(ALICE))
    assert again.status_code == 200 and again.json()["code"] == 0
    assert again.headers["access-control-allow-origin"] == PAGE
    assert proxy.wait_for_output("rejected the token")
    assert standin.exchange_count(ALICE) == 2


def test_malformed_tag_is_refused_locally(proxy, standin):
    s = session(proxy)
    for bad in ("has space in it", "dot.in.it", "x" * 129, "ünïcode-user"):
        r = s.get(f"{standin.base_url}/v1/bots/7000",
                  headers={"Authorization": f"Bearer user:{bad}".encode().decode("latin-1")})
        assert r.status_code == 400
        assert r.json()["code"] == 4000
        assert "user tag" in r.json()["msg"]
    assert standin.requests_seen == []


def test_exchange_failure_explained(mitmdump, standin, rsa_key, tmp_path):
    wrong = write_config(tmp_path, rsa_key, standin.base_url, public_key_id="not-the-kid")
    proxy = mitmdump(f"coze_config={wrong}", f"coze_origins={PAGE}")
    r = session(proxy).get(f"{standin.base_url}/v1/bots/7000", headers=tagged(ALICE))
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == 4100
    assert "api.coze.cn" in body["msg"] and "api.coze.com" in body["msg"]
    assert "logid" in body["msg"]
    assert r.headers["access-control-allow-origin"] == PAGE


def test_token_endpoint_timeout_is_504(mitmdump, config_file, standin):
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "coze_exchange_timeout=1")
    standin.token_delay = 3
    t0 = time.monotonic()
    r = session(proxy).get(f"{standin.base_url}/v1/bots/7000", headers=tagged(ALICE))
    assert r.status_code == 504
    assert "did not answer within 1 s" in r.json()["msg"]
    assert time.monotonic() - t0 < 2.9


def test_pat_mode_injects_pat_without_exchange(mitmdump, standin, tmp_path):
    pat = "pat_" + "Q" * 40
    proxy = mitmdump(f"coze_pat={pat}", f"coze_api_base={standin.base_url}", f"coze_origins={PAGE}",
                     f"coze_config={tmp_path / 'absent.json'}", "flow_detail=3")
    session(proxy).get(f"{standin.base_url}/v1/bots/7000", headers=tagged(ALICE))
    assert standin.requests_seen[-1]["headers"]["authorization"] == f"Bearer {pat}"
    assert standin.exchanges == []
    assert "no isolation" in proxy.output
    assert pat not in proxy.output


def test_status_page_served_locally(proxy, standin):
    r = session(proxy).get("http://coze.mitm/status.json")
    data = r.json()
    assert data["service"] == "coze-mitm"
    assert data["origins"] == [PAGE]
    assert data["api"] == [standin.base_url]
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("content, fix", [
    (None, "download its config JSON"),
    ("{not json", "line 1"),
    (json.dumps({"client_type": "pkce", "client_id": "1"}), "JWT (service)"),
    ("client_id-missing", "'client_id' is missing"),
    ("bad-key", "does not parse as a PEM private key"),
    ("bad-base", "not an http(s) URL"),
])
def test_bad_config_stops_startup_with_one_line(mitmdump, tmp_path, rsa_key, content, fix):
    from tests.harness import Mitmdump
    path = tmp_path / "coze_oauth_config.json"
    if content == "client_id-missing":
        write_config(tmp_path, rsa_key, "https://api.coze.cn", client_id=None)
    elif content == "bad-key":
        write_config(tmp_path, rsa_key, "https://api.coze.cn", private_key="-----BEGIN " + "PRIVATE KEY-----\nAAAA\n-----END " + "PRIVATE KEY-----")
    elif content == "bad-base":
        write_config(tmp_path, rsa_key, "ftp://api.coze.cn")
    elif content is not None:
        path.write_text(content)
    proc = Mitmdump(tmp_path, [f"coze_config={path}"])
    assert proc.run_to_exit() == 1
    errors = [line for line in proc.lines if "coze-mitm:" in line]
    assert len(errors) == 1 and fix in errors[0], proc.output
    assert "listening at" not in proc.output and "Error logged during startup" not in proc.output  # a quiet failing start
    assert "Traceback" not in proc.output

