"""The official Coze JS SDK (@coze/api 1.3.x) in Node, through a real mitmdump with addons/coze.py, against
the strict stand-in. Node runs tests/js/sdk/node_client.mjs (the README's set-up: the SDK's default transport,
`axiosOptions.proxy` for axios and an undici `ProxyAgent` as fetch's dispatcher for streams) and prints one
JSON line; the proxy and the stand-in are the same fixtures the cozepy tests use.

The npm packages come from tests/js/package-lock.json (`npm ci` in tests/js; run_tests.sh does it)."""

from __future__ import annotations

import pytest

from tests.node import JS, NODE, run_sdk
PAGE = "https://chat.example.org"
BOT = "7000"
ALICE = "alice-0001"
BOB = "bob-000002"
GAP = 0.15  # the stand-in's pause between two deltas

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: the official JS SDK cannot run"),
    pytest.mark.skipif(not (JS / "node_modules" / "@coze" / "api").is_dir(),
                       reason="@coze/api is not installed: run `npm ci` in tests/js (run_tests.sh does)"),
]


@pytest.fixture
def proxy(mitmdump, config_file):
    return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "flow_detail=3")


@pytest.fixture
def sdk(proxy, standin):
    """Run a scenario of node_client.mjs for one user, through `proxy`, against `standin`."""
    def run(scenario: str, user: str, **params) -> dict:
        return run_sdk(scenario, proxy=proxy.url, baseURL=standin.base_url, botId=BOT, user=user, **params)
    return run


def assert_clean(proxy, standin) -> None:
    """Coze saw only real tokens; no token in the proxy's output (flow_detail=3 prints whole flows)."""
    assert standin.placeholder_seen == 0
    for exchange in standin.exchanges:
        assert exchange["access_token"] not in proxy.output
    for seen in standin.requests_seen:
        if seen["path"] != "/api/permission/oauth2/token":
            assert seen["headers"]["authorization"].startswith("Bearer czs_"), seen["path"]


def test_stream_with_default_transport_arrives_delta_by_delta(sdk, proxy, standin):
    standin.delta_gap = GAP
    out = sdk("stream", ALICE, text="one two three four five")
    assert out["reply"] == "Sandbox reply to: one two three four five"
    events = [e["event"] for e in out["events"]]
    assert events[0] == "conversation.chat.created"
    assert events[-2:] == ["conversation.chat.completed", "done"]
    arrivals = [e["t"] / 1000 for e in out["events"] if e["event"] == "conversation.message.delta"]
    assert len(arrivals) >= 8
    spread = arrivals[-1] - arrivals[0]
    print(f"\n@coze/api chat.stream in Node: {len(arrivals)} deltas over {spread:.2f} s "
          f"(stand-in gap {GAP} s, {GAP * (len(arrivals) - 1):.2f} s if live)")
    # Buffered anywhere on the way, every delta would arrive in the same instant at the end.
    assert spread > 0.6 * GAP * (len(arrivals) - 1)
    # The stream really went through undici (Node's fetch) and the proxy: Sec-Fetch-Mode alone, no Origin.
    chat = [r for r in standin.requests_seen if r["path"] == "/v3/chat"]
    assert len(chat) == 1
    assert chat[0]["headers"].get("sec-fetch-mode") == "cors"
    assert "origin" not in chat[0]["headers"]
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)


def test_calls_create_poll_list_upload(sdk, proxy, standin):
    out = sdk("calls", ALICE, text="hello there", fileName="notes.txt", fileText="sandbox upload\n")
    conv = out["conversation"]["id"]
    assert out["created"]["conversation_id"] == conv
    assert out["polled"]["status"] == "completed"
    assert out["polled"]["messages"] == ["Sandbox reply to: hello there again"]
    contents = [m["content"] for m in out["listed"]]
    assert "Sandbox reply to: hello there again" in contents and "hello there" in contents
    assert out["file"]["id"] and out["file"]["file_name"] == "notes.txt"
    assert out["file"]["bytes"] == len("sandbox upload\n")
    # The upload went out as multipart through axios' http adapter, with the user's real token.
    upload = [r for r in standin.requests_seen if r["path"] == "/v1/files/upload"]
    assert len(upload) == 1
    assert upload[0]["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)


def test_two_users_isolated_one_exchange_each(sdk, proxy, standin):
    alice = sdk("calls", ALICE, text="alice's secret", fileName="a.txt", fileText="a")
    conv = alice["conversation"]["id"]
    refused = sdk("list", BOB, conversationId=conv)
    assert refused["ok"] is False
    assert refused["error"]["code"] == 4101  # the stand-in: Bob's token has another session_name
    mine = sdk("list", ALICE, conversationId=conv)
    assert mine["ok"] is True and "alice's secret" in mine["messages"]
    bob = sdk("stream", BOB, text="bob here")
    assert bob["reply"] == "Sandbox reply to: bob here"
    assert standin.exchange_count(ALICE) == 1
    assert standin.exchange_count(BOB) == 1
    assert {e["session_name"] for e in standin.exchanges} == {ALICE, BOB}
    assert_clean(proxy, standin)


def test_websocket_chat_through_the_sdk(mitmdump, config_file, standin):
    """client.websockets.chat.create() in Node: ws://<host>/v1/chat?bot_id=..&authorization=Bearer%20user:<id>,
    the placeholder also in the Authorization header; the proxy puts the user's token in both. The ws host
    (localhost) is another origin than the API base (127.0.0.1): a Coze host only through coze_api_hosts."""
    ws_base = f"ws://localhost:{standin.port}"
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={ws_base}",
                     "flow_detail=3")
    out = run_sdk("ws", proxy=proxy.url, baseURL=standin.base_url, baseWsURL=ws_base, botId=BOT, user=ALICE,
                  text="over the socket", timeoutMs=10000)
    assert out["outcome"] == "completed", out
    assert out["reply"] == "Sandbox reply to: over the socket"
    seen = standin.ws_seen
    assert len(seen) == 1
    assert seen[0]["path"] == "/v1/chat" and seen[0]["session"] == ALICE and seen[0]["status"] == 101
    token = seen[0]["query_authorization"]
    assert token.startswith("Bearer czs_")
    assert seen[0]["header_authorization"] == token
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)
