"""Coze's WebSocket APIs through a real mitmdump: the tag in the handshake's `authorization` query
parameter (browsers cannot set headers on a WebSocket) becomes that user's real token, on Coze's ws
hosts only. The ws host here is `ws://localhost:<port>` (a Coze host only because coze_api_hosts says so;
the API base is http://127.0.0.1:<port>), served by the same strict stand-in, which verifies the token."""

from __future__ import annotations

import json
import socket
import urllib.parse

import pytest

from tests.browser import find_chromium, launch_chromium
from tests.clients import WsClient, placeholder_query, ws_reply
from tests.conftest import write_config

PAGE = "https://chat.example.org"
ALICE, BOB = "alice-ws-00001", "bob-ws-000002"


@pytest.fixture
def ws_port(standin):
    return urllib.parse.urlsplit(standin.base_url).port


@pytest.fixture
def ws_proxy(mitmdump, config_file, ws_port, tmp_path):
    flows = tmp_path / "flows.mitm"
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts=ws://localhost:{ws_port}",
                     extra_args=["-w", str(flows)])
    proxy.flows_file = flows
    return proxy


@pytest.mark.parametrize("tunnel", [True, False], ids=["connect-tunnel", "absolute-url"])
def test_chat_over_the_socket_with_the_users_token(ws_proxy, standin, ws_port, tunnel):
    client = WsClient(ws_proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(ALICE)}",
                      headers=[("Origin", PAGE)], tunnel=tunnel)
    try:
        assert client.status == 101, client.body
        seen = standin.ws_seen[-1]
        assert seen["path"] == "/v1/chat" and seen["session"] == ALICE and seen["status"] == 101
        assert seen["query_authorization"].startswith("Bearer czs_")  # percent-decoded by the stand-in
        assert seen["header_authorization"] is None  # a browser sends none; none is invented
        text = ws_reply(client.chat("over the socket"))
        assert text == "Sandbox reply to: over the socket"
    finally:
        client.close()
    assert standin.exchange_count(ALICE) == 1 and standin.placeholder_seen == 0


def test_header_and_query_both_swapped_for_node_clients(ws_proxy, standin, ws_port):
    # @coze/api in Node sends the token in the URL and in the Authorization header; no Origin.
    client = WsClient(ws_proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(BOB)}",
                      headers=[("Authorization", f"Bearer user:{BOB}")])
    client.close()
    assert client.status == 101, client.body
    seen = standin.ws_seen[-1]
    assert seen["query_authorization"] == seen["header_authorization"] and seen["session"] == BOB


def test_refusals_come_before_any_upgrade(ws_proxy, standin, ws_port):
    cases = [
        ([("Origin", "https://evil.example")], placeholder_query(ALICE), 403),
        ([("Origin", "null")], placeholder_query(ALICE), 403),
        ([("Origin", PAGE)], "bot_id=7000&authorization=Bearer%20user:bad.id", 400),
        ([("Origin", PAGE)], placeholder_query(ALICE) + "&authorization=Bearer%20czs_x", 400),
    ]
    for headers, query, status in cases:
        client = WsClient(ws_proxy.port, "localhost", ws_port, f"/v1/chat?{query}", headers=headers)
        client.close()
        assert client.status == status, (headers, query, client.body)
        assert set(json.loads(client.body)) == {"code", "msg"}
    assert standin.ws_seen == [] and standin.exchanges == []


def test_query_tag_to_another_host_is_refused(mitmdump, config_file, rsa_key):
    from sandbox.coze_standin import CozeStandIn

    other = CozeStandIn(rsa_key["public_pem"], kid="k", client_id="c").start()  # not a Coze host
    try:
        proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}")
        port = urllib.parse.urlsplit(other.base_url).port
        client = WsClient(proxy.port, "127.0.0.1", port, f"/v1/chat?{placeholder_query(ALICE)}", headers=[("Origin", PAGE)])
        client.close()
        assert client.status == 400 and "not a configured Coze API host" in json.loads(client.body)["msg"]
        # Not only WebSockets: a plain GET with the tag in its URL is refused the same way.
        client = WsClient(proxy.port, "127.0.0.1", port, "/", tunnel=False)
        client.close()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(f"GET http://127.0.0.1:{port}/v1/x?{placeholder_query(ALICE)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert other.ws_seen == [] and all("user:" not in json.dumps(r) for r in other.requests_seen)
    finally:
        other.stop()


def test_stored_flow_shows_the_placeholder(ws_proxy, standin, ws_port):
    from mitmproxy import io

    client = WsClient(ws_proxy.port, "localhost", ws_port, f"/v1/chat?{placeholder_query(ALICE)}", headers=[("Origin", PAGE)])
    assert client.status == 101
    client.close()
    ws_proxy.stop()
    with open(ws_proxy.flows_file, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    handshakes = [f for f in flows if f.request.path.startswith("/v1/chat")]
    assert handshakes, flows
    for flow in handshakes:
        assert f"authorization=Bearer%20user%3A{ALICE}" in flow.request.path or f"user:{ALICE}" in urllib.parse.unquote(flow.request.path)
        assert "czs_" not in flow.request.path and "czs_" not in str(flow.request.headers)
    assert "czs_" not in ws_proxy.output


# ---------------------------------------------------------------- a real browser

PAGE_HTML = """<!doctype html><meta charset="utf-8"><title>ws</title><script>
window.runSocket = (url) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  const got = [];
  ws.onopen = () => {
    ws.send(JSON.stringify({id: '1', event_type: 'chat.update', data: {chat_config: {}}}));
    ws.send(JSON.stringify({id: '2', event_type: 'conversation.message.create',
                            data: {role: 'user', content_type: 'text', content: 'from the page'}}));
  };
  ws.onmessage = (m) => {
    const e = JSON.parse(m.data); got.push(e.event_type);
    if (e.event_type === 'conversation.chat.completed') { ws.close(); resolve({opened: true, got}); }
  };
  ws.onerror = () => resolve({opened: false, got});
  setTimeout(() => resolve({opened: null, got}), 8000);
});
</script><p>ws page</p>"""


def browser_socket(proxy, page_origin: str, ws_url: str) -> dict:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p, proxy.port)
        try:
            page = browser.new_page()
            page.route(f"{page_origin}/", lambda route: route.fulfill(status=200, content_type="text/html", body=PAGE_HTML))
            page.goto(f"{page_origin}/")
            return page.evaluate("(url) => window.runSocket(url)", ws_url)
        finally:
            browser.close()


def test_browser_page_opens_the_socket_with_credentials(mitmdump, tmp_path, rsa_key, standin, ws_port):
    page_origin = "http://page.test"
    config = write_config(tmp_path, rsa_key, standin.base_url)
    proxy = mitmdump(f"coze_config={config}", f"coze_origins={page_origin}", f"coze_api_hosts=ws://localhost:{ws_port}")
    url = f"ws://localhost:{ws_port}/v1/chat?{placeholder_query(ALICE)}"
    result = browser_socket(proxy, page_origin, url)
    assert result["opened"] is True and "conversation.message.delta" in result["got"], result
    seen = standin.ws_seen[-1]
    assert seen["session"] == ALICE and seen["origin"] == page_origin and seen["query_authorization"].startswith("Bearer czs_")

    # A host that is not configured as Coze's: no tag arrives there (the handshake is refused locally).
    from sandbox.coze_standin import CozeStandIn

    other = CozeStandIn(rsa_key["public_pem"], kid="k", client_id="c").start()
    try:
        other_port = urllib.parse.urlsplit(other.base_url).port
        result = browser_socket(proxy, page_origin, f"ws://127.0.0.1:{other_port}/v1/chat?{placeholder_query(ALICE)}")
        assert result["opened"] is False
        assert other.ws_seen == []
    finally:
        other.stop()


def test_browser_page_of_a_disallowed_origin_is_refused(mitmdump, tmp_path, rsa_key, standin, ws_port):
    config = write_config(tmp_path, rsa_key, standin.base_url)
    proxy = mitmdump(f"coze_config={config}", "coze_origins=http://page.test", f"coze_api_hosts=ws://localhost:{ws_port}")
    result = browser_socket(proxy, "http://evil.test", f"ws://localhost:{ws_port}/v1/chat?{placeholder_query(ALICE)}")
    assert result["opened"] is False
    assert standin.ws_seen == [] and standin.exchanges == []
