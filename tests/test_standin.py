"""Tests for the local Coze SANDBOX (sandbox/coze_standin.py), over real HTTP.

The key pair is generated at test time; nothing here holds a PEM private key.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also when run as plain `pytest` rather than `python -m pytest`
    sys.path.insert(0, str(REPO))

from sandbox.coze_standin import JWT_GRANT_TYPE, TOKEN_PATH, CozeStandIn, make_sandbox_app  # noqa: E402
from tests.harness import wait_for  # noqa: E402
KID = "kid_sandbox_test"
CLIENT_ID = "1127900000001"
GAP = 0.03


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(k) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def st(key):
    s = CozeStandIn(_public_pem(key), KID, CLIENT_ID, delta_gap=GAP)
    s.start()
    yield s
    s.stop()


def make_jwt(st, key, *, headers=None, drop=(), **claims):
    now = int(time.time())
    payload = {"iss": CLIENT_ID, "aud": st.audience, "iat": now, "exp": now + 3600, "jti": uuid.uuid4().hex}
    payload.update(claims)
    for name in drop:
        payload.pop(name, None)
    h = {"kid": KID, "typ": "JWT"}
    h.update(headers or {})
    return jwt.encode(payload, key, algorithm="RS256", headers=h)


def exchange(st, token_jwt, body=None, content_type="application/json", timeout=10):
    if body is None:
        body = {"grant_type": JWT_GRANT_TYPE, "duration_seconds": 900}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": content_type}
    if token_jwt is not None:
        headers["Authorization"] = f"Bearer {token_jwt}"
    return requests.post(st.base_url + TOKEN_PATH, data=data, headers=headers, timeout=timeout)


def access_token(st, key, session_name=None, duration=900):
    claims = {"session_name": session_name} if session_name is not None else {}
    r = exchange(st, make_jwt(st, key, **claims), {"grant_type": JWT_GRANT_TYPE, "duration_seconds": duration})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def api(st, method, path, token, **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, st.base_url + path, headers=headers, timeout=10, **kw)


def chat_once(st, token, text, conversation_id=None):
    params = {"conversation_id": conversation_id} if conversation_id else None
    body = {"bot_id": "bot1", "user_id": "u1", "stream": False,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}
    r = api(st, "POST", "/v3/chat", token, params=params, json=body)
    assert r.status_code == 200
    return r.json()


# ---------------------------------------------------------------- token exchange
def test_valid_exchange_returns_absolute_expires_in(st, key):
    r = exchange(st, make_jwt(st, key, session_name="alice_0001"),
                 {"grant_type": JWT_GRANT_TYPE, "duration_seconds": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["access_token"].startswith("czs_")
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int)
    assert abs(body["expires_in"] - (time.time() + 1234)) < 5  # absolute unix time, not a duration
    assert r.headers["X-Tt-Logid"]
    assert r.headers["Server"] == "coze-sandbox"
    assert st.exchange_count() == 1 and st.exchange_count("alice_0001") == 1 and st.exchange_count("bob") == 0
    ex = st.exchanges[0]
    assert ex["session_name"] == "alice_0001" and ex["duration_seconds"] == 1234
    assert ex["access_token"] == body["access_token"] and ex["jti"]


def test_default_duration_and_bounds_accepted(st, key):
    r = exchange(st, make_jwt(st, key), {"grant_type": JWT_GRANT_TYPE})
    assert r.status_code == 200
    assert abs(r.json()["expires_in"] - (time.time() + 900)) < 5
    for d in (1, 86399):
        r = exchange(st, make_jwt(st, key), {"grant_type": JWT_GRANT_TYPE, "duration_seconds": d})
        assert r.status_code == 200, r.text
    assert st.exchange_count(None) == 3


@pytest.mark.parametrize(
    "case, expect",
    [
        ("wrong_key", "signature"),
        ("wrong_kid", "kid"),
        ("wrong_iss", "iss"),
        ("wrong_aud", "aud"),
        ("expired_exp", "expired"),
        ("iat_future", "iat"),
        ("no_jti", "jti"),
        ("no_exp", "exp"),
        ("hs256", "RS256"),
        ("typ", "typ"),
        ("no_auth", "Authorization"),
        ("not_a_jwt", "JWT"),
    ],
)
def test_token_strictness_401(st, key, other_key, case, expect):
    now = int(time.time())
    jwts = {
        "wrong_key": lambda: make_jwt(st, other_key),
        "wrong_kid": lambda: make_jwt(st, key, headers={"kid": "someone_else"}),
        "wrong_iss": lambda: make_jwt(st, key, iss="999"),
        "wrong_aud": lambda: make_jwt(st, key, aud="api.coze.cn"),
        "expired_exp": lambda: make_jwt(st, key, iat=now - 7200, exp=now - 10),
        "iat_future": lambda: make_jwt(st, key, iat=now + 600, exp=now + 3600),
        "no_jti": lambda: make_jwt(st, key, drop=("jti",)),
        "no_exp": lambda: make_jwt(st, key, drop=("exp",)),
        "hs256": lambda: jwt.encode({"iss": CLIENT_ID, "aud": st.audience, "iat": now, "exp": now + 60,
                                     "jti": "x"}, "s" * 32, algorithm="HS256", headers={"kid": KID}),
        "typ": lambda: make_jwt(st, key, headers={"typ": "JWS"}),
        "no_auth": lambda: None,
        "not_a_jwt": lambda: "pat_abcdef",
    }
    r = exchange(st, jwts[case]())
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["error_code"] in ("invalid_client", "invalid_request")
    assert body["error"] == body["error_code"]
    assert expect.lower() in body["error_message"].lower()
    assert r.headers["X-Tt-Logid"]
    assert st.exchange_count() == 0


def test_jti_is_single_use(st, key):
    t = make_jwt(st, key)
    assert exchange(st, t).status_code == 200
    r = exchange(st, t)
    assert r.status_code == 401
    assert r.json()["error_message"].startswith("jti already used")
    assert st.exchange_count() == 1


@pytest.mark.parametrize(
    "body, ctype, code",
    [
        ({"grant_type": "client_credentials"}, "application/json", "unsupported_grant_type"),
        ({"grant_type": "refresh_token", "duration_seconds": 900}, "application/json", "unsupported_grant_type"),
        ({"duration_seconds": 900}, "application/json", "invalid_request"),
        ({"grant_type": JWT_GRANT_TYPE, "duration_seconds": 0}, "application/json", "invalid_request"),
        ({"grant_type": JWT_GRANT_TYPE, "duration_seconds": 86400}, "application/json", "invalid_request"),
        ({"grant_type": JWT_GRANT_TYPE, "duration_seconds": "900"}, "application/json", "invalid_request"),
        ({"grant_type": JWT_GRANT_TYPE, "duration_seconds": True}, "application/json", "invalid_request"),
        ({"grant_type": JWT_GRANT_TYPE}, "text/plain", "invalid_request"),
        ("{not json", "application/json", "invalid_request"),
        ("[1, 2]", "application/json", "invalid_request"),
    ],
)
def test_token_body_strictness_400(st, key, body, ctype, code):
    t = make_jwt(st, key)
    r = exchange(st, t, body, content_type=ctype)
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] == code
    assert r.json()["error_message"]
    assert st.exchange_count() == 0
    # a refused body does not burn the JWT's jti
    assert exchange(st, t).status_code == 200


# ---------------------------------------------------------------- API auth, sessions, revocation
def test_api_requires_a_token_minted_here(st, key):
    for auth in (None, "czs_not_minted_here"):
        r = api(st, "POST", "/v1/conversation/create", auth, json={})
        assert r.status_code == 401
        assert r.json()["code"] == 4100 and r.json()["detail"]["logid"] == r.headers["X-Tt-Logid"]
    tok = access_token(st, key)
    assert api(st, "POST", "/v1/conversation/create", tok, json={}).json()["code"] == 0


def test_sessions_are_isolated(st, key):
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    shared = access_token(st, key)  # no session_name: the shared "" session

    conv = api(st, "POST", "/v1/conversation/create", alice, json={"bot_id": "bot1"}).json()
    assert conv["code"] == 0 and conv["msg"] == ""
    conv_id = conv["data"]["id"]
    assert chat_once(st, alice, "secret of alice", conv_id)["data"]["status"] == "completed"

    listed = api(st, "GET", "/v1/conversations", alice, params={"bot_id": "bot1"}).json()
    assert [c["id"] for c in listed["data"]["conversations"]] == [conv_id]
    assert listed["data"]["has_more"] is False
    for other in (bob, shared):
        assert api(st, "GET", "/v1/conversations", other, params={"bot_id": "bot1"}).json()["data"] == {
            "conversations": [], "has_more": False}

    msgs = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv_id},
               json={}).json()
    assert msgs["code"] == 0 and msgs["has_more"] is False
    assert [m["content"] for m in msgs["data"]] == ["Sandbox reply to: secret of alice", "secret of alice"]
    assert msgs["first_id"] == msgs["data"][0]["id"] and msgs["last_id"] == msgs["data"][-1]["id"]

    r = api(st, "POST", "/v1/conversation/message/list", bob, params={"conversation_id": conv_id}, json={})
    assert r.status_code == 200 and r.json()["code"] == 4101
    assert chat_once(st, bob, "let me in", conv_id)["code"] == 4101
    r = api(st, "POST", f"/v1/conversations/{conv_id}/clear", bob)
    assert r.json()["code"] == 4101

    # a chat without conversation_id creates one in the caller's session
    c = chat_once(st, bob, "hello")
    assert c["code"] == 0 and c["data"]["conversation_id"] != conv_id
    ids = [x["id"] for x in api(st, "GET", "/v1/conversations", bob, params={"bot_id": "bot1"}).json()["data"][
        "conversations"]]
    assert ids == [c["data"]["conversation_id"]]


@pytest.mark.parametrize("style, status, code", [("401", 401, 4100), ("200", 200, 700012006)])
def test_revoke(st, key, style, status, code):
    a1 = access_token(st, key, "alice_0001")
    a2 = access_token(st, key, "alice_0001")
    b = access_token(st, key, "bob_000001")
    assert st.revoke(token=a1, style=style) == 1
    r = api(st, "POST", "/v1/conversation/create", a1, json={})
    assert (r.status_code, r.json()["code"]) == (status, code)
    if style == "200":
        assert r.json()["msg"] == "access token invalid"
    assert api(st, "POST", "/v1/conversation/create", a2, json={}).json()["code"] == 0
    assert st.revoke(session_name="alice_0001", style=style) == 1  # a1 was already revoked
    assert api(st, "POST", "/v1/conversation/create", a2, json={}).status_code == status
    assert api(st, "POST", "/v1/conversation/create", b, json={}).json()["code"] == 0
    assert st.revoke(style=style) == 1
    assert api(st, "POST", "/v1/conversation/create", b, json={}).status_code == status
    with pytest.raises(ValueError):
        st.revoke(style="500")


# ---------------------------------------------------------------- SSE
def _stream_lines(st, token, text, params=None):
    body = {"bot_id": "bot1", "user_id": "u1", "stream": True,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}
    r = api(st, "POST", "/v3/chat", token, params=params, json=body, stream=True)
    return r


def test_sse_events_arrive_one_by_one(st, key):
    st.delta_gap = 0.06
    tok = access_token(st, key, "alice_0001")
    text = "one two three four five"
    r = _stream_lines(st, tok, text)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.headers
    assert r.headers["X-Tt-Logid"]
    lines, stamps = [], []
    for line in r.iter_lines(chunk_size=64, decode_unicode=True):
        lines.append(line)
        stamps.append(time.monotonic())
    # frames are exactly event:<name>\ndata:<json>\n\n
    assert len(lines) % 3 == 0
    events = []
    for i in range(0, len(lines), 3):
        ev, data, blank = lines[i:i + 3]
        assert ev.startswith("event:") and not ev.startswith("event: ")
        assert data.startswith("data:") and not data.startswith("data: ")
        assert blank == ""
        events.append((ev[6:], json.loads(data[5:]), stamps[i + 1]))
    names = [e[0] for e in events]
    deltas = [e for e in events if e[0] == "conversation.message.delta"]
    n = len(deltas)
    assert names == (["conversation.chat.created", "conversation.chat.in_progress"]
                     + ["conversation.message.delta"] * n
                     + ["conversation.message.completed", "conversation.chat.completed", "done"])
    reply = "Sandbox reply to: " + text
    assert n == len(reply.split())
    assert "".join(d[1]["content"] for d in deltas) == reply
    assert events[-1][1] == "[DONE]"
    completed = events[-3][1]
    assert completed["content"] == reply and completed["type"] == "answer" and completed["role"] == "assistant"
    chat = events[0][1]
    assert chat["status"] == "created" and chat["conversation_id"] and chat["id"]
    assert events[-2][1]["status"] == "completed"
    for d in deltas:
        assert d[1]["chat_id"] == chat["id"] and d[1]["conversation_id"] == chat["conversation_id"]
        assert d[1]["content_type"] == "text" and d[1]["type"] == "answer"
    span = deltas[-1][2] - deltas[0][2]
    expected = (n - 1) * st.delta_gap
    assert expected * 0.7 <= span <= expected + 1.0, (span, expected)
    gaps = [b[2] - a[2] for a, b in zip(deltas, deltas[1:])]
    assert min(gaps) > st.delta_gap * 0.4, gaps  # not all at once
    # the conversation stored both messages
    msgs = api(st, "POST", "/v1/conversation/message/list", tok,
               params={"conversation_id": chat["conversation_id"]}, json={"order": "asc"}).json()["data"]
    assert [(m["role"], m["content"]) for m in msgs] == [("user", text), ("assistant", reply)]
    assert msgs[1]["id"] == deltas[0][1]["id"]


def test_keep_alive_and_stream_then_reuse_connection(st, key):
    tok = access_token(st, key)
    conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=10)
    try:
        conn.request("GET", "/v1/bots/b42", headers={"Authorization": f"Bearer {tok}"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 200 and r.getheader("Content-Length") and r.getheader("Connection") != "close"
        assert body["data"]["name"] == "Sandbox bot" and body["data"]["bot_id"] == "b42"
        assert "not Coze" in body["data"]["description"]
        sock = conn.sock
        payload = json.dumps({"bot_id": "b42", "user_id": "u", "stream": True,
                              "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]})
        conn.request("POST", "/v3/chat", body=payload,
                     headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        assert text.endswith('event:done\ndata:"[DONE]"\n\n')
        conn.request("GET", "/nope")
        r = conn.getresponse()
        r.read()
        assert r.status == 404
        assert conn.sock is sock  # all three on one connection
    finally:
        conn.close()


def test_chat_modes(st, key):
    tok = access_token(st, key)
    for mode, code in (("rate_limited", 4013), ("no_permission", 4101), ("not_published", 4015)):
        st.chat_mode = mode
        for stream in (False, True):
            r = api(st, "POST", "/v3/chat", tok, json={"bot_id": "b", "user_id": "u", "stream": stream,
                                                        "additional_messages": []})
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
            assert r.json()["code"] == code and r.json()["msg"]
    st.chat_mode = "cut"
    r = _stream_lines(st, tok, "a b c d e f")
    lines = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in r.iter_lines(decode_unicode=True):
            lines.append(line)
    assert "event:done" not in lines and "event:conversation.chat.completed" not in lines
    assert 1 <= lines.count("event:conversation.message.delta") < len("Sandbox reply to: a b c d e f".split())
    st.chat_mode = "ok"
    with pytest.raises(ValueError):
        st.chat_mode = "nonsense"


def test_cancel_clear_and_retrieve(st, key):
    tok = access_token(st, key)
    c = chat_once(st, tok, "hello")["data"]
    r = api(st, "POST", "/v3/chat/cancel", tok, json={"conversation_id": c["conversation_id"], "chat_id": c["id"]})
    assert r.json()["code"] == 4104  # already completed
    r = api(st, "GET", "/v3/chat/retrieve", tok, params={"conversation_id": c["conversation_id"], "chat_id": c["id"]})
    assert r.json()["data"]["status"] == "completed"
    r = api(st, "POST", f"/v1/conversations/{c['conversation_id']}/clear", tok)
    assert r.json()["code"] == 0 and r.json()["data"]["conversation_id"] == c["conversation_id"]
    msgs = api(st, "POST", "/v1/conversation/message/list", tok, params={"conversation_id": c["conversation_id"]},
               json={}).json()
    assert msgs["data"] == [] and msgs["first_id"] == "" and msgs["has_more"] is False


# ---------------------------------------------------------------- misc protocol details
def test_logid_on_every_answer_and_unknown_paths(st, key):
    tok = access_token(st, key)
    answers = [
        requests.get(st.base_url + "/nope", timeout=5),
        requests.get(st.base_url + TOKEN_PATH, timeout=5),
        requests.options(st.base_url + "/v3/chat", timeout=5),
        exchange(st, "garbage.jwt.value"),
        exchange(st, make_jwt(st, key), {"grant_type": "x"}),
        api(st, "POST", "/v1/conversation/create", "czs_bad", json={}),
        api(st, "GET", "/v1/bots/b1", tok),
        api(st, "POST", "/v3/chat", tok, json={"bot_id": "b", "user_id": "u", "stream": True,
                                                "additional_messages": []}),
    ]
    st.token_mode = "http500"
    answers.append(exchange(st, make_jwt(st, key)))
    st.token_mode = "garbage"
    answers.append(exchange(st, make_jwt(st, key)))
    logids = [a.headers.get("X-Tt-Logid") for a in answers]
    assert all(logids) and len(set(logids)) == len(logids)
    assert all(a.headers["Server"] == "coze-sandbox" for a in answers)
    assert answers[0].status_code == 404 and answers[0].json()["code"] == 4000
    assert answers[1].status_code == 405


def test_options_has_no_cors_and_is_recorded(st):
    r = requests.options(st.base_url + "/v3/chat", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST"}, timeout=5)
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    seen = st.requests_seen[-1]
    assert seen["method"] == "OPTIONS" and seen["path"] == "/v3/chat"
    assert seen["headers"]["origin"] == "https://example.com"


def test_requests_seen_and_placeholders(st, key):
    api(st, "GET", "/v1/conversations?bot_id=x", "user:abc123")
    requests.get(st.base_url + "/v1/bots/x", headers={"Cookie": "a=1; coze_user=abc"}, timeout=5)
    requests.get(st.base_url + "/v1/bots/x", headers={"Cookie": "not_coze_user=abc"}, timeout=5)
    assert st.placeholder_seen == 2
    assert [s["path"] for s in st.requests_seen] == ["/v1/conversations", "/v1/bots/x", "/v1/bots/x"]
    assert st.requests_seen[0]["query"] == "bot_id=x"
    assert st.requests_seen[0]["headers"]["authorization"] == "Bearer user:abc123"
    st.reset_observations()
    assert st.placeholder_seen == 0 and st.requests_seen == [] and st.exchanges == []


# ---------------------------------------------------------------- knobs
def test_token_modes(st, key):
    with pytest.raises(ValueError):
        st.token_mode = "nonsense"

    st.token_mode = "http500"
    r = exchange(st, make_jwt(st, key))
    assert r.status_code == 500 and r.text == "upstream exploded"

    st.token_mode = "garbage"
    r = exchange(st, make_jwt(st, key))
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.text == "<html>nope</html>"

    st.token_mode = "no_token"
    r = exchange(st, make_jwt(st, key))
    assert r.status_code == 200 and "access_token" not in r.json()
    assert st.exchange_count() == 0

    st.token_mode = "expired"
    r = exchange(st, make_jwt(st, key))
    assert r.status_code == 200
    assert r.json()["expires_in"] <= time.time() - 590
    dead = r.json()["access_token"]
    r = api(st, "POST", "/v1/conversation/create", dead, json={})
    assert r.status_code == 401 and r.json()["code"] == 4100

    st.token_mode = "duration"
    r = exchange(st, make_jwt(st, key), {"grant_type": JWT_GRANT_TYPE, "duration_seconds": 1234})
    assert r.status_code == 200 and r.json()["expires_in"] == 1234
    assert api(st, "POST", "/v1/conversation/create", r.json()["access_token"], json={}).json()["code"] == 0
    assert st.exchange_count() == 2

    st.token_mode = "hang"
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        exchange(st, make_jwt(st, key), timeout=0.4)
    assert time.monotonic() - t0 < 3


def test_token_delay_overlaps_concurrent_exchanges(st, key):
    st.token_delay = 0.4
    jwts = [make_jwt(st, key, session_name=f"user_{i:04d}") for i in range(6)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda j: exchange(st, j).status_code, jwts))
    took = time.monotonic() - t0
    assert codes == [200] * 6
    assert 0.4 <= took < 1.5, took  # 6 x 0.4 s in sequence would take 2.4 s
    assert st.exchange_count() == 6 and st.exchange_count("user_0003") == 1


def test_many_concurrent_connections(st, key):
    tok = access_token(st, key)

    def one(i):
        return api(st, "GET", f"/v1/bots/b{i}", tok).json()["data"]["bot_id"]

    with ThreadPoolExecutor(64) as pool:
        assert list(pool.map(one, range(200))) == [f"b{i}" for i in range(200)]


def test_stop_closes_everything(key):
    s = CozeStandIn(_public_pem(key), KID, CLIENT_ID).start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("GET", "/nope")
    conn.getresponse().read()
    s.stop()
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/nope")
        conn.getresponse().read()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(s.base_url + "/nope", timeout=2)
    s.stop()  # idempotent


# ---------------------------------------------------------------- make_sandbox_app, CLI, cozepy
def test_make_sandbox_app_config():
    s, cfg = make_sandbox_app()
    with s:
        assert set(cfg) == {"client_type", "client_id", "coze_www_base", "coze_api_base", "private_key",
                            "public_key_id"}
        assert cfg["client_type"] == "jwt"
        assert cfg["coze_api_base"] == s.base_url and not s.base_url.endswith(":0")
        assert s.audience == s.base_url.split("://", 1)[1] == f"127.0.0.1:{s.port}"
        pkcs8_marker = "-----BEGIN " + "PRIVATE KEY-----"  # split: no PEM marker in the repository
        assert cfg["private_key"].startswith(pkcs8_marker)
        k = serialization.load_pem_private_key(cfg["private_key"].encode(), None)
        assert k.key_size == 2048
        assert cfg["public_key_id"] == s.kid and cfg["client_id"] == s.client_id
        now = int(time.time())
        j = jwt.encode({"iss": cfg["client_id"], "aud": s.audience, "iat": now, "exp": now + 60,
                        "jti": secrets.token_hex(8)}, k, algorithm="RS256",
                       headers={"kid": cfg["public_key_id"], "typ": "JWT"})
        assert exchange(s, j).status_code == 200
        assert "SANDBOX" in repr(s)


@pytest.mark.process
def test_cli_writes_config_and_serves(tmp_path):
    path = tmp_path / "sandbox_oauth.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.coze_standin", "--port", "0", "--write-config", str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        cfg = json.loads(path.read_text())
        assert cfg["coze_api_base"] == url
        r = requests.get(url + "/v1/bots/x", timeout=5)
        assert r.status_code == 401 and r.headers["Server"] == "coze-sandbox"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.process
def test_cozepy_client_against_the_sandbox():
    pytest.importorskip("cozepy")
    from cozepy import Coze, CozeAPIError, JWTOAuthApp, Message, TokenAuth
    from cozepy.chat import ChatEventType

    s, cfg = make_sandbox_app(delta_gap=0.01)
    with s:
        app = JWTOAuthApp(cfg["client_id"], cfg["private_key"], cfg["public_key_id"], base_url=s.base_url)
        tok = app.get_access_token(ttl=900, session_name="cozepy_user_1")
        assert tok.access_token.startswith("czs_")
        assert abs(tok.expires_in - (time.time() + 900)) < 5
        assert s.exchange_count("cozepy_user_1") == 1

        coze = Coze(auth=TokenAuth(tok.access_token), base_url=s.base_url)
        conv = coze.conversations.create(bot_id="bot_cozepy")
        deltas, kinds = [], []
        for ev in coze.chat.stream(bot_id="bot_cozepy", user_id="u1", conversation_id=conv.id,
                                   additional_messages=[Message.build_user_question_text("ping pong")]):
            kinds.append(ev.event)
            if ev.event == ChatEventType.CONVERSATION_MESSAGE_DELTA:
                deltas.append(ev.message.content)
        assert "".join(deltas) == "Sandbox reply to: ping pong"
        assert kinds[0] == ChatEventType.CONVERSATION_CHAT_CREATED
        assert kinds[-1] == ChatEventType.CONVERSATION_CHAT_COMPLETED
        msgs = list(coze.conversations.messages.list(conversation_id=conv.id))
        assert [m.content for m in msgs] == ["Sandbox reply to: ping pong", "ping pong"]
        assert [c.id for c in coze.conversations.list(bot_id="bot_cozepy")] == [conv.id]
        assert coze.bots.retrieve(bot_id="bot_cozepy").name == "Sandbox bot"

        other = app.get_access_token(ttl=900, session_name="cozepy_user_2")
        coze2 = Coze(auth=TokenAuth(other.access_token), base_url=s.base_url)
        with pytest.raises(CozeAPIError) as ei:
            list(coze2.conversations.messages.list(conversation_id=conv.id))
        assert ei.value.code == 4101
        assert ei.value.logid


# ---------------------------------------------------------------- the Web Chat SDK's calls (bot mode)
SDK_HEADERS = {"X-Coze-Client-User-Agent": json.dumps({"version": "1.2.0-beta.17", "lang": "js"}),
               "Accept-Language": "en"}


def sse_events(r):
    """[(event, data)] of a text/event-stream answer."""
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"), r.text
    events = []
    for frame in r.text.split("\n\n"):
        if frame:
            ev, data = frame.split("\n")
            events.append((ev[len("event:"):], json.loads(data[len("data:"):])))
    return events


def stream_chat(st, token, text, conv_param, path="/v3/chat", **body):
    payload = {"bot_id": "bot1", "user_id": "u1", "stream": True,
               "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}
    payload.update(body)
    params = {"conversation_id": conv_param} if conv_param else None
    return sse_events(api(st, "POST", path, token, params=params, json=payload,
                          headers=dict(SDK_HEADERS)))


def test_web_chat_sdk_bot_mode_calls_in_order(st, key):
    from sandbox.coze_standin import usage_for
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    bot = api(st, "GET", "/v1/bots/7350", alice, headers=dict(SDK_HEADERS)).json()
    assert bot["code"] == 0 and bot["data"]["bot_id"] == "7350" and bot["data"]["name"] == "Sandbox bot"
    assert bot["data"]["onboarding_info"]["prologue"] and bot["data"]["version"]
    params = {"bot_id": "7350", "connector_id": "999", "page_num": 1, "page_size": 1}
    assert api(st, "GET", "/v1/conversations", alice, params=params).json()["data"] == {
        "conversations": [], "has_more": False}
    created = api(st, "POST", "/v1/conversation/create", alice,
                  json={"bot_id": "7350", "messages": [], "connector_id": "999"}).json()
    assert created["code"] == 0 and created["data"]["connector_id"] == "999" and created["data"]["last_section_id"]
    conv = created["data"]["id"]
    listed = api(st, "GET", "/v1/conversations", alice, params=params).json()["data"]["conversations"]
    assert [c["id"] for c in listed] == [conv]
    history = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
                  json={"limit": 10}).json()
    assert history["code"] == 0 and history["data"] == [] and history["has_more"] is False

    question = "what does the sandbox say"
    events = stream_chat(st, alice, question, conv)
    reply = "Sandbox reply to: " + question
    completed = dict(events)["conversation.chat.completed"]
    assert completed["usage"] == usage_for(question, reply) == {
        "token_count": 5 + 8, "output_count": 8, "input_count": 5}
    assert st.chats_of("alice_0001")[0]["usage"] == completed["usage"]
    assert st.usage_of("alice_0001") == completed["usage"] and st.usage_of("bob_000001")["token_count"] == 0

    history = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
                  json={"limit": 1}).json()
    assert [m["content"] for m in history["data"]] == [reply] and history["has_more"] is True
    more = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
               json={"after_id": history["last_id"], "limit": 10}).json()
    assert [m["content"] for m in more["data"]] == [question] and more["has_more"] is False
    answer_id, question_id = history["data"][0]["id"], more["data"][0]["id"]

    # feedback on the answer: like, then taken back; not on someone else's
    fb = f"/v1/conversations/{conv}/messages/{answer_id}/feedback"
    r = api(st, "POST", fb, alice, json={"feedback_type": "like", "comment": "nice", "reason_types": ["fast"]})
    assert r.json()["code"] == 0
    assert st.feedback_of(answer_id) == {"feedback_type": "like", "comment": "nice", "reason_types": ["fast"]}
    assert api(st, "POST", fb, alice, json={"feedback_type": "meh"}).json()["code"] == 4000
    assert api(st, "POST", fb, bob, json={"feedback_type": "unlike"}).json()["code"] == 4101
    assert api(st, "DELETE", fb, bob).json()["code"] == 4101
    assert st.feedback_of(answer_id)["feedback_type"] == "like"
    assert api(st, "DELETE", fb, alice).json()["code"] == 0 and st.feedback_of(answer_id) is None

    # delete one message
    target = {"conversation_id": conv, "message_id": question_id}
    assert api(st, "POST", "/v1/conversation/message/delete", bob, params=target).json()["code"] == 4101
    deleted = api(st, "POST", "/v1/conversation/message/delete", alice, params=target).json()
    assert deleted["code"] == 0 and deleted["data"]["id"] == question_id
    left = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv}, json={}).json()
    assert [m["id"] for m in left["data"]] == [answer_id]
    again = api(st, "POST", "/v1/conversation/message/delete", alice, params=target).json()
    assert again["code"] == 4000

    # the conversation list UI: rename, delete
    assert api(st, "PUT", f"/v1/conversations/{conv}", bob, json={"name": "mine now"}).json()["code"] == 4101
    renamed = api(st, "PUT", f"/v1/conversations/{conv}", alice, json={"name": "Trip plans"}).json()
    assert renamed["code"] == 0 and renamed["data"]["name"] == "Trip plans" and renamed["data"]["id"] == conv
    listed = api(st, "GET", "/v1/conversations", alice, params=params).json()["data"]["conversations"]
    assert listed[0]["name"] == "Trip plans"
    assert api(st, "DELETE", f"/v1/conversations/{conv}", bob).json()["code"] == 4101
    assert api(st, "DELETE", f"/v1/conversations/{conv}", alice).json()["code"] == 0
    assert api(st, "GET", "/v1/conversations", alice, params=params).json()["data"]["conversations"] == []
    gone = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv}, json={})
    assert gone.json()["code"] == 4000
    # the SDK's headers arrived as sent
    seen = [s for s in st.requests_seen if s["path"] == "/v3/chat"][-1]["headers"]
    assert json.loads(seen["x-coze-client-user-agent"])["lang"] == "js" and seen["accept-language"] == "en"


def test_conversation_list_is_paged(st, key):
    tok = access_token(st, key, "pager_0001")
    ids = [api(st, "POST", "/v1/conversation/create", tok, json={"bot_id": "b"}).json()["data"]["id"]
           for _ in range(3)]
    first = api(st, "GET", "/v1/conversations", tok, params={"bot_id": "b", "page_num": 1, "page_size": 2}).json()
    second = api(st, "GET", "/v1/conversations", tok, params={"bot_id": "b", "page_num": 2, "page_size": 2}).json()
    assert first["data"]["has_more"] is True and second["data"]["has_more"] is False
    assert [c["id"] for c in first["data"]["conversations"] + second["data"]["conversations"]] == ids[::-1]
    assert api(st, "GET", "/v1/conversations", tok, params={"bot_id": "b", "page_size": "x"}).json()["code"] == 4000


def test_cancel_stops_a_stream(st, key):
    st.delta_gap = 0.5  # the cancel arrives long before the reply could be over
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    conv = api(st, "POST", "/v1/conversation/create", alice, json={"bot_id": "b"}).json()["data"]["id"]
    body = {"bot_id": "b", "user_id": "u", "stream": True,
            "additional_messages": [{"role": "user", "content": "a b c d e f g h", "content_type": "text"}]}
    r = api(st, "POST", "/v3/chat", alice, params={"conversation_id": conv}, json=body, stream=True)
    lines = r.iter_lines(decode_unicode=True)
    chat = None
    for line in lines:
        if line.startswith("data:") and chat is None:
            chat = json.loads(line[5:])
        if line == "event:conversation.message.delta":
            break
    ids = {"conversation_id": conv, "chat_id": chat["id"]}
    assert api(st, "POST", "/v3/chat/cancel", bob, json=ids).json()["code"] == 4101
    canceled = api(st, "POST", "/v3/chat/cancel", alice, json=ids).json()
    assert canceled["code"] == 0 and canceled["data"]["status"] == "canceled"
    rest = list(lines)
    assert rest[-3:] == ["event:done", 'data:"[DONE]"', ""]
    assert "event:conversation.chat.completed" not in rest
    assert rest.count("event:conversation.message.delta") < 9
    assert st.chats_of("alice_0001")[0]["status"] == "canceled" and st.usage_of("alice_0001")["token_count"] == 0


def test_files_upload_multipart(st, key):
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    content = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10
    r = api(st, "POST", "/v1/files/upload", alice, files={"file": ("photo.png", content, "image/png")},
            headers=dict(SDK_HEADERS))
    body = r.json()
    assert body["code"] == 0, body
    f = body["data"]
    assert f["id"] and f["bytes"] == len(content) and f["file_name"] == "photo.png" and abs(f["created_at"] - time.time()) < 5
    [stored] = st.files_of("alice_0001")
    assert stored["content_type"] == "image/png" and stored["bytes"] == len(content)
    import hashlib
    assert stored["sha256"] == hashlib.sha256(content).hexdigest()
    assert st.files_of("bob_000001") == []
    got = api(st, "GET", "/v1/files/retrieve", alice, params={"file_id": f["id"]}).json()
    assert got["code"] == 0 and got["data"] == f
    assert api(st, "GET", "/v1/files/retrieve", bob, params={"file_id": f["id"]}).json()["code"] == 4101
    assert api(st, "POST", "/v1/files/upload", alice, json={"file": "x"}).json()["code"] == 4000
    assert api(st, "POST", "/v1/files/upload", None, files={"file": ("a.txt", b"a")}).status_code == 401


# ---------------------------------------------------------------- the Web Chat SDK's calls (app mode)
def test_web_chat_sdk_app_mode_calls(st, key):
    from sandbox.coze_standin import usage_for
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    app = api(st, "GET", "/v1/apps/app42", alice, params={"version": "", "connector_id": "999"}).json()
    assert app["code"] == 0 and app["data"]["name"] and "icon_url" in app["data"]
    wf = api(st, "GET", "/v1/workflows/wf7", alice, params={"connector_id": "999", "is_debug": "", "caller": ""}).json()
    assert wf["code"] == 0 and wf["data"]["role"]["workflow_id"] == "wf7"
    assert wf["data"]["role"]["onboarding_info"]["prologue"] and wf["data"]["role"]["connector_id"] == "999"
    create = {"app_id": "app42", "conversation_name": "Default", "get_or_create": True, "draft_mode": False,
              "workflow_id": "wf7", "connector_id": "999"}
    first = api(st, "POST", "/v1/workflow/conversation/create", alice, json=create).json()
    assert first["code"] == 0 and first["data"]["id"] and first["data"]["last_section_id"]
    conv = first["data"]["id"]
    assert api(st, "POST", "/v1/workflow/conversation/create", alice, json=create).json()["data"]["id"] == conv
    assert api(st, "POST", "/v1/workflow/conversation/create", bob, json=create).json()["data"]["id"] != conv
    fresh = api(st, "POST", "/v1/workflow/conversation/create", alice, json=dict(create, get_or_create=False)).json()
    assert fresh["data"]["id"] != conv
    assert api(st, "POST", "/v1/workflow/conversation/create", alice, json={}).json()["code"] == 4000

    question = "plan my day"
    chat_body = {"workflow_id": "wf7", "app_id": "app42", "conversation_id": conv, "connector_id": "999",
                 "ext": {"user_id": "u-alice"}, "parameters": {}}
    events = stream_chat(st, alice, question, None, path="/v1/workflows/chat", **chat_body)
    names = [e for e, _ in events]
    assert names[:2] == ["conversation.chat.created", "conversation.chat.in_progress"]
    assert names[-3:] == ["conversation.message.completed", "conversation.chat.completed", "done"]
    reply = "".join(d["content"] for e, d in events if e == "conversation.message.delta")
    assert reply == "Sandbox reply to: " + question
    completed = dict(events)["conversation.chat.completed"]
    assert completed["conversation_id"] == conv and completed["usage"] == usage_for(question, reply)
    msgs = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
               json={"order": "asc"}).json()["data"]
    assert [m["content"] for m in msgs] == [question, reply]
    # another user cannot chat in alice's conversation; a workflow chat needs its workflow
    refused = api(st, "POST", "/v1/workflows/chat", bob, json=dict(chat_body, stream=True, additional_messages=[
        {"role": "user", "content": "hi", "content_type": "text"}])).json()
    assert refused["code"] == 4101
    assert api(st, "POST", "/v1/workflows/chat", alice, json={"additional_messages": [
        {"role": "user", "content": "x"}]}).json()["code"] == 4000
    # app conversations are not in the bot's conversation list
    assert api(st, "GET", "/v1/conversations", alice, params={"bot_id": "app42"}).json()["data"]["conversations"] == []


# ---------------------------------------------------------------- the chat component (@coze/chat-sdk)
def cozepy_client(st, key, session_name):
    pytest.importorskip("cozepy")
    from cozepy import Coze, TokenAuth
    return Coze(auth=TokenAuth(access_token(st, key, session_name)), base_url=st.base_url)


def test_chat_component_app_mode_gets_the_same_conversation_on_every_load(st, key):
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    # what ChatFlowFramework sends on load (getOrCreateConversationId)
    load = {"app_id": "app42", "conversation_name": "Default", "get_or_create": True, "workflow_id": "wf7",
            "draft_mode": False, "connector_id": "999"}

    def create(token, **change):
        r = api(st, "POST", "/v1/conversation/create", token, json=dict(load, **change))
        assert r.status_code == 200
        return r.json()

    first = create(alice)
    assert first["code"] == 0 and first["data"]["id"] and first["data"]["last_section_id"]
    conv = first["data"]["id"]
    assert first["data"]["connector_id"] == "999" and first["data"]["name"] == "Default"
    chat = stream_chat(st, alice, "remember me", None, path="/v1/workflows/chat", workflow_id="wf7",
                       app_id="app42", conversation_id=conv, connector_id="999")
    assert chat[-1][0] == "done"
    # a reload: the same conversation, with its messages
    again = create(alice)["data"]
    assert again["id"] == conv and again["last_section_id"] == first["data"]["last_section_id"]
    msgs = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
               json={"limit": 20}).json()["data"]
    assert [m["content"] for m in msgs] == ["Sandbox reply to: remember me", "remember me"]
    assert create(alice, conversation_name=None)["data"]["id"] == conv  # an app's conversation is "Default"
    # scoped by user, app, connector and name
    assert create(bob)["data"]["id"] != conv
    assert create(bob)["data"]["id"] == create(bob)["data"]["id"]
    others = {create(alice, app_id="app43")["data"]["id"], create(alice, connector_id="1024")["data"]["id"],
              create(alice, conversation_name="Trip")["data"]["id"]}
    assert conv not in others and len(others) == 3
    # the component's "new conversation": get_or_create false makes one; the next load answers that one
    fresh = create(alice, get_or_create=False)["data"]["id"]
    assert fresh != conv
    assert create(alice)["data"]["id"] == fresh
    # the same through the Web Chat SDK's endpoint
    assert api(st, "POST", "/v1/workflow/conversation/create", alice, json=load).json()["data"]["id"] == fresh
    # strict: types checked, a token needed, another user's conversation refused
    for bad in ({"get_or_create": "yes"}, {"conversation_name": 7}, {"app_id": 42}, {"conversation_name": "x" * 101}):
        assert create(alice, **bad)["code"] == 4000, bad
    r = api(st, "POST", "/v1/conversation/create", None, json=load)
    assert r.status_code == 401 and r.json()["code"] == 4100
    r = api(st, "POST", "/v1/conversation/message/list", bob, params={"conversation_id": conv}, json={})
    assert r.json()["code"] == 4101


@pytest.mark.process
def test_chat_component_bot_mode_get_or_create_and_cozepy_names(st, key):
    alice = access_token(st, key, "alice_0001")
    body = {"bot_id": "bot9", "conversation_name": "support", "get_or_create": True, "connector_id": "999"}
    one = api(st, "POST", "/v1/conversation/create", alice, json=body).json()["data"]["id"]
    assert api(st, "POST", "/v1/conversation/create", alice, json=body).json()["data"]["id"] == one
    assert api(st, "POST", "/v1/conversation/create", alice, json=dict(body, bot_id="bot8")).json()["data"]["id"] != one
    # without get_or_create (the bot-mode component, cozepy): a new one each time
    plain = {"bot_id": "bot9", "connector_id": "999"}
    assert len({api(st, "POST", "/v1/conversation/create", alice, json=plain).json()["data"]["id"]
                for _ in range(2)}) == 2

    coze = cozepy_client(st, key, "carol_0001")
    conv = coze.conversations.create(bot_id="bot9", name="My trip", connector_id="999")
    assert conv.name == "My trip" and conv.connector_id == "999" and conv.last_section_id
    assert coze.conversations.create(bot_id="bot9").name == ""
    assert [c.name for c in coze.conversations.list(bot_id="bot9")] == ["", "My trip"]


@pytest.mark.process
def test_audio_speech_over_http(st, key, tmp_path):
    import wave
    from cozepy import CozeAPIError
    from cozepy.audio.speech import AudioFormat

    coze = cozepy_client(st, key, "alice_0001")
    # cozepy's default: mp3 at 24 kHz (MPEG-2 layer III frames)
    mp3 = coze.audio.speech.create(input="hello there", voice_id="v1")
    assert mp3.response.logid
    mp3.write_to_file(str(tmp_path / "a.mp3"))
    data = (tmp_path / "a.mp3").read_bytes()
    assert data[:2] == b"\xff\xf3" and len(data) > 100  # frame sync, MPEG-2, layer III, no CRC

    coze.audio.speech.create(input="hello", voice_id="v1", response_format=AudioFormat.WAV, sample_rate=16000,
                             speed=2).write_to_file(str(tmp_path / "a.wav"))
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == 16000 * 125 // 1000  # 5 characters, 50 ms each, at twice the speed

    r = api(st, "POST", "/v1/audio/speech", access_token(st, key, "alice_0001"),
            json={"input": "hi", "voice_id": "v1", "response_format": "pcm", "sample_rate": 24000})
    assert r.status_code == 200 and r.headers["Content-Type"] == "audio/pcm"
    assert r.content == bytes(2 * 24000 * 100 // 1000)  # at least 100 ms of 16-bit silence

    coze.audio.speech.create(input="hi", voice_id="v1",
                             response_format=AudioFormat.OGG_OPUS).write_to_file(str(tmp_path / "a.ogg"))
    ogg = (tmp_path / "a.ogg").read_bytes()
    assert ogg[:4] == b"OggS" and ogg[5] == 0x02 and ogg[28:36] == b"OpusHead" and b"OpusTags" in ogg
    assert ogg.count(b"OggS") == 3

    for bad in ({"voice_id": ""}, {"input": ""}, {"input": "x" * 1025}, {"response_format": "flac"},
                {"speed": 5}, {"sample_rate": 12345}):
        with pytest.raises(CozeAPIError) as ei:
            coze.audio.speech.create(**dict({"input": "hi", "voice_id": "v1"}, **bad))
        assert ei.value.code == 4000, bad
    r = api(st, "POST", "/v1/audio/speech", None, json={"input": "hi", "voice_id": "v1"})
    assert r.status_code == 401 and r.json()["code"] == 4100
    r = api(st, "GET", "/v1/audio/speech", access_token(st, key, "alice_0001"))
    assert r.status_code == 426 and r.json()["code"] == 4000  # the WebSocket, without its upgrade
    r = api(st, "PUT", "/v1/audio/speech", access_token(st, key, "alice_0001"))
    assert r.status_code == 405


@pytest.mark.process
def test_audio_transcriptions_over_http(st, key, tmp_path):
    from cozepy import CozeAPIError

    coze = cozepy_client(st, key, "alice_0001")
    audio = tmp_path / "q.wav"
    audio.write_bytes(b"RIFF" + bytes(996))
    assert coze.audio.transcriptions.create(file=audio).text == "Sandbox transcript of 1000 bytes of audio"
    assert coze.audio.transcriptions.create(file=("q.mp3", b"\xff\xf3" + bytes(98))).text.endswith(" 100 bytes of audio")
    # what the component's upload sends: multipart, field "file"; the answer in Coze's envelope
    tok = access_token(st, key, "bob_000001")
    r = api(st, "POST", "/v1/audio/transcriptions", tok, files={"file": ("voice.wav", bytes(64), "audio/wav")})
    assert r.status_code == 200 and r.json()["code"] == 0 and r.json()["msg"] == ""
    assert r.json()["data"] == {"text": "Sandbox transcript of 64 bytes of audio"}
    with pytest.raises(CozeAPIError) as ei:
        coze.audio.transcriptions.create(file=("empty.wav", b""))
    assert ei.value.code == 4000
    assert api(st, "POST", "/v1/audio/transcriptions", tok, json={"file": "x"}).json()["code"] == 4000
    r = api(st, "POST", "/v1/audio/transcriptions", None, files={"file": ("voice.wav", bytes(64), "audio/wav")})
    assert r.status_code == 401 and r.json()["code"] == 4100


def test_routing_table_lists_every_endpoint():
    from sandbox import routes
    table = {(r.method, r.pattern) for r in routes.ROUTES}
    web_chat_sdk = {
        ("GET", "/v1/bots/{bot_id}"), ("GET", "/v1/conversations"), ("PUT", "/v1/conversations/{conversation_id}"),
        ("DELETE", "/v1/conversations/{conversation_id}"), ("POST", "/v1/conversation/create"),
        ("POST", "/v1/conversation/message/list"), ("POST", "/v3/chat"), ("POST", "/v3/chat/cancel"),
        ("POST", "/v1/conversations/{conversation_id}/clear"), ("POST", "/v1/files/upload"),
        ("POST", "/v1/conversation/message/delete"),
        ("POST", "/v1/conversations/{conversation_id}/messages/{message_id}/feedback"),
        ("DELETE", "/v1/conversations/{conversation_id}/messages/{message_id}/feedback"),
        ("GET", "/v1/apps/{app_id}"), ("GET", "/v1/workflows/{workflow_id}"),
        ("POST", "/v1/workflow/conversation/create"), ("POST", "/v1/workflows/chat"),
        ("WS", "/v1/chat"), ("WS", "/v1/audio/speech"), ("WS", "/v1/audio/transcriptions"),
    }
    assert web_chat_sdk <= table
    chat_component = {  # @coze/chat-sdk
        ("GET", "/v1/bot/get_online_info"), ("GET", "/v1/conversations"), ("POST", "/v1/conversation/create"),
        ("POST", "/v1/conversation/message/list"), ("POST", "/v3/chat"), ("POST", "/v1/conversations/{conversation_id}/clear"),
        ("POST", "/v1/files/upload"), ("GET", "/v1/apps/{app_id}"), ("GET", "/v1/workflows/{workflow_id}"),
        ("POST", "/v1/workflows/chat"), ("POST", "/v1/audio/speech"), ("POST", "/v1/audio/transcriptions"),
    }
    assert chat_component <= table
    assert len(table) == len(routes.ROUTES)  # no endpoint listed twice
    assert routes.match("GET", "/v1/conversations/123/clear")[2] == ["POST"]
    route, args, _ = routes.match("POST", "/v1/conversations/c%2F1/messages/m2/feedback")
    assert route.handler.__name__ == "feedback" and args == ("c/1", "m2")


# ---------------------------------------------------------------- WebSockets (a wsproto client over a plain socket)
class WsClient:
    """A minimal WebSocket client: the handshake and JSON events, on a plain socket with wsproto."""

    def __init__(self, st, target, headers=()):
        from wsproto import WSConnection
        from wsproto.connection import ConnectionType
        from wsproto.events import Request

        self.sock = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=st.audience, target=target, extra_headers=list(headers))))
        self.accepted = None  # True, or the refusal: (status, body)
        self._events: list = []
        self.closed = False
        reject_body = b""
        while self.accepted is None:
            for ev in self._pump():
                kind = type(ev).__name__
                if kind == "AcceptConnection":
                    self.accepted = True
                elif kind == "RejectConnection":
                    self.status = ev.status_code
                    if not ev.has_body:
                        self.accepted = (ev.status_code, b"")
                elif kind == "RejectData":
                    reject_body += ev.data
                    if ev.body_finished:
                        self.accepted = (self.status, reject_body)
                else:  # events that came in the same read as the handshake's answer
                    self._take(ev)

    def _pump(self):
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        if not data:
            self.closed = True
        return list(self.ws.events())

    def send(self, event_type, data=None):
        from wsproto.events import Message
        obj = {"id": uuid.uuid4().hex, "event_type": event_type}
        if data is not None:
            obj["data"] = data
        self.sock.sendall(self.ws.send(Message(data=json.dumps(obj))))

    def recv(self):
        """The next server event (a dict), or None once the server closed."""
        while not self._events:
            if self.closed:
                return None
            for ev in self._pump():
                self._take(ev)
        return self._events.pop(0)

    def _take(self, ev):
        from wsproto.events import CloseConnection, TextMessage
        if isinstance(ev, TextMessage):
            self._events.append(json.loads(ev.data))
        elif isinstance(ev, CloseConnection):
            self.closed = True

    def until(self, event_type):
        """Server events up to and including the first of that type."""
        got = []
        while True:
            ev = self.recv()
            assert ev is not None, f"closed before {event_type}: {got}"
            got.append(ev)
            if ev["event_type"] == event_type:
                return got

    def close(self):
        self.sock.close()


def ws_auth(token):
    return "Bearer%20" + token  # as @coze/api builds the URL: authorization=Bearer <token>, URL-encoded


def test_ws_chat_speaks_coze_events_with_the_token_in_the_query(st, key):
    from sandbox.coze_standin import usage_for
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    c = WsClient(st, f"/v1/chat?bot_id=7350&authorization={ws_auth(alice)}")
    try:
        assert c.accepted is True
        created = c.recv()
        assert created["event_type"] == "chat.created" and created["id"] and created["detail"]["logid"]
        c.send("chat.update", {"chat_config": {"user_id": "u-alice", "auto_save_history": True},
                               "input_audio": {"format": "pcm"}})
        updated = c.recv()
        assert updated["event_type"] == "chat.updated"
        assert updated["data"]["chat_config"]["user_id"] == "u-alice" and updated["data"]["output_audio"]["codec"]
        question = "hello over a websocket"
        c.send("conversation.message.create", {"role": "user", "content_type": "text", "content": question})
        events = c.until("conversation.chat.completed")
    finally:
        c.close()
    names = [e["event_type"] for e in events]
    deltas = [e["data"] for e in events if e["event_type"] == "conversation.message.delta"]
    assert names == (["conversation.chat.created", "conversation.chat.in_progress"]
                     + ["conversation.message.delta"] * len(deltas)
                     + ["conversation.message.completed", "conversation.chat.completed"])
    reply = "Sandbox reply to: " + question
    assert len(deltas) == len(reply.split()) and "".join(d["content"] for d in deltas) == reply
    assert all(e["detail"]["logid"] and e["id"] for e in events)
    chat = events[-1]["data"]
    assert chat["status"] == "completed" and chat["bot_id"] == "7350"
    assert chat["usage"] == usage_for(question, reply) == st.usage_of("alice_0001")
    assert events[-2]["data"]["content"] == reply and events[-2]["data"]["chat_id"] == chat["id"]
    # what the sandbox saw: the real token in the query, no header, alice's session
    [seen] = st.ws_seen
    assert seen == dict(seen, path="/v1/chat", query_authorization=f"Bearer {alice}", header_authorization=None,
                        session="alice_0001", status=101)
    assert st.placeholder_seen == 0
    # the conversation is alice's, over HTTP too
    conv = chat["conversation_id"]
    msgs = api(st, "POST", "/v1/conversation/message/list", alice, params={"conversation_id": conv},
               json={"order": "asc"}).json()["data"]
    assert [m["content"] for m in msgs] == [question, reply]
    r = api(st, "POST", "/v1/conversation/message/list", bob, params={"conversation_id": conv}, json={})
    assert r.json()["code"] == 4101
    # bob cannot join it over a WebSocket either
    c = WsClient(st, "/v1/chat?bot_id=7350", headers=[("Authorization", f"Bearer {bob}")])
    try:
        assert c.recv()["event_type"] == "chat.created"
        c.send("chat.update", {"chat_config": {"conversation_id": conv}})
        err = c.recv()
        assert err["event_type"] == "error" and err["data"]["code"] == 4101
    finally:
        c.close()
    assert st.ws_seen[-1]["header_authorization"] == f"Bearer {bob}" and st.ws_seen[-1]["query_authorization"] is None


@pytest.mark.parametrize("case", ["none", "unknown", "placeholder", "disagree", "revoked"])
def test_ws_refusals_are_json_before_any_upgrade(st, key, case):
    alice = access_token(st, key, "alice_0001")
    bob = access_token(st, key, "bob_000001")
    query, headers = {
        "none": ("", []),
        "unknown": (f"&authorization={ws_auth('czs_not_minted_here')}", []),
        "placeholder": (f"&authorization={ws_auth('user:alice-0001')}", []),
        "disagree": (f"&authorization={ws_auth(alice)}", [("Authorization", f"Bearer {bob}")]),
        "revoked": (f"&authorization={ws_auth(alice)}", [("Authorization", f"Bearer {alice}")]),
    }[case]
    if case == "revoked":
        st.revoke(token=alice)
    c = WsClient(st, f"/v1/chat?bot_id=1{query}", headers=headers)
    c.close()
    status, body = c.accepted
    assert status == 401 and json.loads(body)["code"] == 4100
    assert st.ws_seen[-1]["session"] is None and st.ws_seen[-1]["status"] == 401
    assert st.placeholder_seen == (1 if case == "placeholder" else 0)


def test_ws_header_and_query_together_and_plain_get(st, key):
    alice = access_token(st, key, "alice_0001")
    c = WsClient(st, f"/v1/chat?bot_id=1&authorization={ws_auth(alice)}", headers=[("Authorization", f"Bearer {alice}")])
    try:
        assert c.accepted is True and c.recv()["event_type"] == "chat.created"
        c.send("no.such.event")
        assert c.recv()["data"]["code"] == 4000
        c.send("conversation.clear")
        assert c.recv()["event_type"] == "conversation.cleared"
    finally:
        c.close()
    assert st.ws_seen[-1]["session"] == "alice_0001"
    r = api(st, "GET", "/v1/chat", alice, params={"bot_id": "1"})
    assert r.status_code == 426 and r.json()["code"] == 4000


def _ws_chat_to_its_end(st, key, cancel: bool) -> list:
    """alice's chat on /v1/chat, canceled after its first delta or left to complete: its events up to the last."""
    if cancel:
        st.delta_gap = 0.5  # the cancel arrives long before the reply could be over
    alice = access_token(st, key, "alice_0001")
    c = WsClient(st, f"/v1/chat?bot_id=1&authorization={ws_auth(alice)}")
    try:
        c.recv()
        c.send("conversation.message.create", {"role": "user", "content_type": "text", "content": "a b c d e f g"})
        if not cancel:
            return c.until("conversation.chat.completed")
        c.until("conversation.message.delta")
        c.send("conversation.chat.cancel")
        return c.until("conversation.chat.canceled")
    finally:
        c.close()


def test_ws_chat_cancel(st, key):
    events = _ws_chat_to_its_end(st, key, cancel=True)
    assert "conversation.chat.completed" not in [e["event_type"] for e in events]
    assert st.chats_of("alice_0001")[0]["status"] == "canceled"


@pytest.mark.parametrize("end", ["canceled", "completed"])
def test_ws_chat_keeps_its_end_when_the_client_leaves_as_the_last_event_arrives(st, key, monkeypatch, end):
    """The client has the chat's last event and closes while the sandbox's thread is still in the send that
    delivered it (its flush then meets a closed file): the chat stays canceled or completed, not failed."""
    from sandbox import websocket

    write = websocket.WsSession._write

    def write_then_find_the_file_closed(self, event):
        write(self, event)
        if f"conversation.chat.{end}" in getattr(event, "data", ""):
            raise ValueError("I/O operation on closed file.")

    monkeypatch.setattr(websocket.WsSession, "_write", write_then_find_the_file_closed)
    _ws_chat_to_its_end(st, key, cancel=end == "canceled")
    # the sandbox's chat thread is past its send (and whatever it does when the send fails)
    wait_for(lambda: not any(t.name == "coze-sandbox-ws-chat" for t in threading.enumerate()),
             what="the sandbox's chat thread ending")
    assert st.chats_of("alice_0001")[0]["status"] == end


def test_ws_speech_and_transcriptions_minimal(st, key):
    alice = access_token(st, key, "alice_0001")
    c = WsClient(st, f"/v1/audio/speech?authorization={ws_auth(alice)}")
    try:
        assert c.recv()["event_type"] == "speech.created"
        c.send("speech.update", {"output_audio": {"codec": "pcm", "voice_id": "v1"}})
        assert c.recv()["data"]["output_audio"]["voice_id"] == "v1"
        c.send("input_text_buffer.append", {"delta": "hello"})
        c.send("input_text_buffer.complete")
        events = c.until("speech.audio.completed")
    finally:
        c.close()
    assert [e["event_type"] for e in events] == ["input_text_buffer.completed", "speech.audio.update",
                                                 "speech.audio.completed"]
    import base64
    assert len(base64.b64decode(events[1]["data"]["delta"])) == 480 * len("hello")

    c = WsClient(st, f"/v1/audio/transcriptions?authorization={ws_auth(alice)}")
    try:
        assert c.recv()["event_type"] == "transcriptions.created"
        c.send("input_audio_buffer.append", {"delta": base64.b64encode(bytes(300)).decode()})
        c.send("input_audio_buffer.complete")
        events = c.until("transcriptions.message.completed")
    finally:
        c.close()
    assert [e["event_type"] for e in events] == ["input_audio_buffer.completed", "transcriptions.message.update",
                                                 "transcriptions.message.completed"]
    assert "300 bytes" in events[-1]["data"]["content"]
    assert [s["path"] for s in st.ws_seen] == ["/v1/audio/speech", "/v1/audio/transcriptions"]


def test_stop_closes_websockets(key):
    s = CozeStandIn(_public_pem(key), KID, CLIENT_ID).start()
    tok = access_token(s, key, "alice_0001")
    c = WsClient(s, f"/v1/chat?bot_id=1&authorization={ws_auth(tok)}")
    assert c.recv()["event_type"] == "chat.created"
    s.stop()
    assert c.recv() is None  # the server went away: the socket is closed, not left hanging
    c.close()
