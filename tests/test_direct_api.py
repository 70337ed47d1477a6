"""The proxy's own address as a Coze API base ("direct" use, parts/direct_api.py): clients that set no proxy name
http://127.0.0.1:<port> as their Coze API base.

* which Host spellings are the proxy's own (core/own_address.py) and what the part does with each request, in-process;
* a real mitmdump with addons/coze.py against the strict stand-in: raw HTTP (preflights, CORS, the page at /, 404s,
  the PAC file, a rebinding Host), cozepy with only `base_url`, Node's @coze/api with only `baseURL`, and its
  WebSocket chat with `baseWsURL` (Origin checked by the proxy).
Browsers (Chromium, Firefox) with no proxy setting: tests/test_direct_browser.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse

import pytest
import requests
from mitmproxy.test import tflow, tutils

from coze_mitm.core import own_address
from coze_mitm.flowmeta import DIRECT, REFUSED
from coze_mitm.parts.direct_api import DirectApi
from tests.clients import WsClient, ws_reply
from tests.sockets import read_head

PAT = "pat_" + "S3cr3tPat" * 4
PAGE = "http://localhost:3000"
BOT = "7000"
ALICE = "alice-direct-01"
TOKEN_PATH = "/api/permission/oauth2/token"


# --------------------------------------------------------------------------- which Host is the proxy's own


@pytest.mark.parametrize("host, port, sock, own", [
    ("127.0.0.1", 8080, ("127.0.0.1", 8080), True),
    ("localhost", 8080, ("127.0.0.1", 8080), True),
    ("LOCALHOST", 8080, ("127.0.0.1", 8080), True),
    ("::1", 8080, ("::1", 8080), True),
    ("localhost", 8080, ("::1", 8080), True),
    ("127.0.0.5", 8080, ("127.0.0.5", 8080), True),  # a loopback address the proxy listens on, named exactly
    ("localhost", 8080, ("127.0.0.5", 8080), False),  # localhost is 127.0.0.1 / ::1, not every loopback address
    ("127.0.0.1", 8081, ("127.0.0.1", 8080), False),
    ("127.0.0.2", 8080, ("127.0.0.1", 8080), False),
    ("::1", 8080, ("127.0.0.1", 8080), False),
    ("evil.example", 8080, ("127.0.0.1", 8080), False),  # a name that resolves here: DNS rebinding
    ("x.localhost", 8080, ("127.0.0.1", 8080), False),
    ("localhost.", 8080, ("127.0.0.1", 8080), False),
    ("127.1", 8080, ("127.0.0.1", 8080), False),
    ("0x7f.1", 8080, ("127.0.0.1", 8080), False),
    ("2130706433", 8080, ("127.0.0.1", 8080), False),
])
def test_own_spellings(host, port, sock, own):
    assert own_address.names_socket(host, port, sock) is own


@pytest.mark.parametrize("sockname, expected", [
    (("127.0.0.1", 8080), ("127.0.0.1", 8080)),
    (("::ffff:127.0.0.1", 8080, 0, 0), ("127.0.0.1", 8080)),  # IPv4 client on a dual-stack socket
    (("::1", 8080, 0, 0), ("::1", 8080)),
    (("192.168.1.5", 8080), None),  # a LAN address is no API base
    (("0.0.0.0", 8080), None),
    (None, None),
])
def test_socket_address(sockname, expected):
    assert own_address.socket_address(sockname) == expected


@pytest.mark.parametrize("path, api", [
    ("/v3/chat", True), ("/v1/conversation/create?x=1", True), ("/api/permission/oauth2/token", True),
    ("/open_api/knowledge/document/create", True), ("/", False), ("/favicon.ico", False), ("/proxy.pac", False),
    ("/v3", False), ("/vx/chat", False), ("//v3/chat", False),
])
def test_api_paths(path, api):
    assert own_address.is_api_path(path) is api


# --------------------------------------------------------------------------- the part, in-process


@pytest.fixture
def tctx(tmp_path, pat_mode):
    ctx = pat_mode(DirectApi, pat=PAT, confdir=str(tmp_path), coze_origins=PAGE)
    ctx.part = ctx.parts[0]
    return ctx


def to_proxy(path: str, method: str = "GET", host: str = "127.0.0.1", port: int = 8080, headers=(),
             sockname=("127.0.0.1", 8080), peername=("127.0.0.1", 50000)):
    """A request as a client that set no proxy sends it to the proxy's socket `sockname`."""
    fields = [(b"Host", f"{host}:{port}".encode()), *((k.encode(), v.encode()) for k, v in headers)]
    f = tflow.tflow(req=tutils.treq(method=method.encode(), scheme=b"http", host=host, port=port, authority=b"",
                                    path=path.encode(), headers=tutils.treq().headers.__class__(fields)))
    f.client_conn.sockname = sockname
    f.client_conn.peername = peername
    return f


def run(part: DirectApi, f):
    part.requestheaders(f)
    part.request(f)
    return f


def body(f) -> dict:
    return json.loads(f.response.content)


class TestPart:
    def test_api_call_readdressed_to_the_api(self, tctx):
        f = run(tctx.part, to_proxy("/v3/chat?conversation_id=1", "POST",
                                    headers=[("Origin", PAGE), ("Authorization", "Bearer user:alice")]))
        assert f.response is None
        assert f.request.url == "https://api.coze.cn/v3/chat?conversation_id=1"
        assert f.request.headers["Host"] == "api.coze.cn"
        assert f.request.headers["Authorization"] == "Bearer user:alice"  # auth.py's business, later
        assert f.metadata[DIRECT] == "127.0.0.1:8080"

    def test_localhost_and_ipv6(self, tctx):
        f = run(tctx.part, to_proxy("/v1/bots/1", host="localhost"))
        assert f.request.host == "api.coze.cn"
        f = run(tctx.part, to_proxy("/v1/bots/1", host="::1", sockname=("::1", 8080, 0, 0), peername=("::1", 5, 0, 0)))
        assert f.request.host == "api.coze.cn" and f.metadata[DIRECT] == "[::1]:8080"

    def test_websocket_upgrade_goes_to_the_ws_host(self, tctx):
        f = run(tctx.part, to_proxy("/v1/chat?bot_id=1", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]))
        assert f.request.url == "https://ws.coze.cn/v1/chat?bot_id=1"
        assert tctx.settings.is_coze_ws(f.request)

    def test_ws_host_from_coze_api_hosts(self, tctx):
        tctx.configure(tctx.settings, coze_api_base="http://127.0.0.1:9000",
                       coze_api_hosts="https://more.example,ws://localhost:9001")
        f = run(tctx.part, to_proxy("/v1/chat", headers=[("Upgrade", "websocket")]))
        assert (f.request.scheme, f.request.host, f.request.port) == ("http", "localhost", 9001)
        assert f.request.headers.get_all("Host") == ["localhost:9001"]
        f = run(tctx.part, to_proxy("/v3/chat", "POST"))
        assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", 9000)
        assert f.request.headers.get_all("Host") == ["127.0.0.1:9000"]
        tctx.configure(tctx.settings, coze_api_base="http://[::1]:9000", coze_api_hosts="")
        f = run(tctx.part, to_proxy("/v3/chat", "POST"))
        assert (f.request.host, f.request.port) == ("::1", 9000) and f.request.headers["Host"] == "[::1]:9000"

    def test_no_ws_host_known(self, tctx):
        tctx.configure(tctx.settings, coze_api_base="http://127.0.0.1:9000")
        f = run(tctx.part, to_proxy("/v1/chat", headers=[("Upgrade", "websocket")]))
        assert f.response.status_code == 503 and "coze_api_hosts=wss://" in body(f)["msg"]

    @pytest.mark.parametrize("headers", [
        [("Origin", "null")], [("Origin", PAGE), ("Origin", PAGE)], [("Origin", "https://a.example, https://b.example")],
        [("Origin", "chrome-extension://abcdef")], [("Origin", "HTTPS://Elsewhere.example")],
        [("Origin", "https://elsewhere.example/path")], [("Origin", "https://" + "a" * 300 + ".example")],
        [("Origin", "https://elsewhere.example"), ("Upgrade", "websocket")],  # WebSockets: no CORS, nothing readable
    ])
    def test_other_origins_refused_unreadably(self, tctx, headers):
        f = run(tctx.part, to_proxy("/v1/bots/1", headers=headers))
        assert f.response.status_code in (400, 403)
        assert set(body(f)) == {"code", "msg"}
        assert not [k for k in f.response.headers if k.lower().startswith("access-control-")]
        assert f.request.host == "127.0.0.1"  # not re-addressed: nothing goes to Coze

    @pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
    def test_a_page_outside_coze_origins_gets_a_refusal_it_can_read(self, tctx, method):
        other = "https://elsewhere.example"
        f = run(tctx.part, to_proxy("/v1/bots/1", method, headers=[("Origin", other),
                                                                  ("Authorization", "Bearer user:alice")]))
        assert f.response.status_code == 403
        assert body(f) == {"code": 4101, "msg": f"{other} is not in coze_origins: start with --origins {other} "
                                                "(or --set coze_origins=...)"}
        assert f.response.headers.get_all("Access-Control-Allow-Origin") == [other]
        assert "access-control-allow-credentials" not in f.response.headers
        assert "Origin" in f.response.headers["Vary"]
        assert f.request.host == "127.0.0.1" and DIRECT not in f.metadata  # not re-addressed: nothing goes to Coze
        assert f.metadata[REFUSED] == "origin-not-allowed"

    def test_its_preflight_is_answered_here_allowing_what_it_asked(self, tctx):
        other = "http://localhost:4000"
        f = run(tctx.part, to_proxy("/v3/chat", "OPTIONS", headers=[
            ("Origin", other), ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization,content-type,x-coze-client-user-agent")]))
        h = f.response.headers
        assert f.response.status_code == 204 and f.response.content == b""
        assert h["Access-Control-Allow-Origin"] == other
        assert h["Access-Control-Allow-Methods"] == "POST"
        assert h["Access-Control-Allow-Headers"] == "authorization,content-type,x-coze-client-user-agent"
        assert "access-control-allow-credentials" not in h
        assert f.request.host == "127.0.0.1" and f.metadata[REFUSED] == "origin-not-allowed"
        odd = run(tctx.part, to_proxy("/v3/chat", "OPTIONS", headers=[
            ("Origin", other), ("Access-Control-Request-Method", "PO ST"), ("Access-Control-Request-Headers", "a\x01b")]))
        assert odd.response.status_code == 204  # what is not a method or a header list is not echoed
        assert "access-control-allow-methods" not in odd.response.headers
        assert "access-control-allow-headers" not in odd.response.headers

    def test_refused_origin_is_noted_for_the_status_page(self, tctx):
        run(tctx.part, to_proxy("/v3/chat", "OPTIONS", headers=[("Origin", "https://elsewhere.example"),
                                                                ("Access-Control-Request-Method", "POST")]))
        assert "https://elsewhere.example" in json.dumps(tctx.part.refused.recent(), default=str)

    def test_rebinding_host_is_not_served(self, tctx):
        # A page at http://evil.example:8080 whose name resolves to 127.0.0.1 reaches this socket with its own Host:
        # not the proxy's address, so not an API base (the local gate refuses it as a loop to the proxy itself).
        f = run(tctx.part, to_proxy("/v3/chat", "POST", host="evil.example",
                                    headers=[("Authorization", "Bearer user:alice")]))
        assert f.response is None and f.request.host == "evil.example" and DIRECT not in f.metadata
        f = run(tctx.part, to_proxy("/", host="evil.example"))
        assert f.response is None

    def test_other_port_is_a_request_through_the_proxy(self, tctx):
        f = run(tctx.part, to_proxy("/v3/chat", host="127.0.0.1", port=9999))
        assert f.response is None and f.request.port == 9999

    def test_the_page_at_the_root(self, tctx):
        f = run(tctx.part, to_proxy("/", host="localhost"))
        assert f.response.status_code == 200
        assert f.response.headers["content-type"].startswith("text/html")
        text = f.response.text
        assert "http://localhost:8080" in text and "http://coze.mitm/" in text and PAGE in text
        assert "default-src 'none'" in f.response.headers["content-security-policy"]
        head = run(tctx.part, to_proxy("/", "HEAD"))
        assert head.response.status_code == 200 and head.response.content == b""

    def test_other_paths_404_json(self, tctx):
        for path, method in (("/favicon.ico", "GET"), ("/", "POST"), ("/index.html", "GET")):
            f = run(tctx.part, to_proxy(path, method))
            assert f.response.status_code == 404, path
            assert set(body(f)) == {"code", "msg"} and "Coze API base" in body(f)["msg"]

    def test_remote_peer_gets_nothing(self, tctx):
        for path in ("/v3/chat", "/"):
            f = run(tctx.part, to_proxy(path, peername=("192.168.1.9", 40000)))
            assert f.response.status_code == 403 and body(f)["code"] == 4101
            assert f.metadata[REFUSED] == "remote-client"

    def test_lan_socket_is_no_api_base(self, tctx):
        f = run(tctx.part, to_proxy("/v3/chat", host="192.168.1.5", sockname=("192.168.1.5", 8080)))
        assert f.response is None and f.request.host == "192.168.1.5"

    def test_proxy_login_required_is_said_in_json(self, tctx):
        f = to_proxy("/v3/chat", "POST")
        f.response = tutils.tresp(status_code=407)
        tctx.part.requestheaders(f)
        assert f.response.status_code == 403 and "proxy login" in body(f)["msg"]


# --------------------------------------------------------------------------- a real mitmdump


@pytest.fixture
def proxy(mitmdump, config_file, standin):
    ws_base = f"ws://localhost:{standin.port}"  # the stand-in's ws host: a Coze host through coze_api_hosts
    return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"coze_api_hosts={ws_base}", "flow_detail=3")


def plain() -> requests.Session:
    """No proxy: what a client that names its API base does."""
    s = requests.Session()
    s.trust_env = False
    return s


def browser_headers(origin: str = PAGE, **more) -> dict:
    return {"Origin": origin, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site", **more}


def assert_clean(proxy, standin) -> None:
    assert standin.placeholder_seen == 0
    for exchange in standin.exchanges:
        assert exchange["access_token"] not in proxy.output


def test_preflight_and_stream_from_an_allowed_page(proxy, standin):
    standin.delta_gap = 0.1
    s = plain()
    pre = s.options(proxy.url + "/v3/chat", headers=browser_headers(**{
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}))
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == PAGE
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert not [r for r in standin.requests_seen if r["method"] == "OPTIONS"]  # answered by the proxy

    t0 = time.monotonic()
    arrivals = []
    with s.post(proxy.url + f"/v3/chat?conversation_id=", stream=True, headers=browser_headers(
            Authorization=f"Bearer user:{ALICE}", **{"Content-Type": "application/json"}),
            json={"bot_id": BOT, "user_id": ALICE, "stream": True,
                  "additional_messages": [{"role": "user", "content": "one two three four five", "content_type": "text"}]}) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["Access-Control-Allow-Origin"] == PAGE
        for line in r.iter_lines():
            if line.startswith(b"event:conversation.message.delta"):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 8
    assert arrivals[-1] - arrivals[0] > 0.6 * 0.1 * (len(arrivals) - 1), "buffered: the deltas came at once"
    chat = [r for r in standin.requests_seen if r["path"] == "/v3/chat"]
    assert len(chat) == 1 and re.fullmatch(r"Bearer czs_\S+", chat[0]["headers"]["authorization"])
    assert chat[0]["headers"]["origin"] == PAGE
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)


def test_a_page_outside_coze_origins_reads_why_and_nothing_is_forwarded(proxy, standin):
    s = plain()
    other = "http://localhost:4000"
    msg = f"{other} is not in coze_origins: start with --origins {other} (or --set coze_origins=...)"
    pre = s.options(proxy.url + "/v3/chat", headers=browser_headers(other, **{
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}))
    assert pre.status_code == 204  # answered here, so the browser sends the real request and the page reads its answer
    assert pre.headers["Access-Control-Allow-Origin"] == other
    assert pre.headers["Access-Control-Allow-Methods"] == "POST"
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    post = s.post(proxy.url + "/v3/chat", headers=browser_headers(other, Authorization=f"Bearer user:{ALICE}"), json={})
    get = s.get(proxy.url + "/v1/bots/" + BOT, headers=browser_headers(other))  # untagged, with its own token or none
    for r in (post, get):
        assert r.status_code == 403 and r.json() == {"code": 4101, "msg": msg}
        assert r.headers["Access-Control-Allow-Origin"] == other
    for r in (pre, post, get):
        assert "Access-Control-Allow-Credentials" not in r.headers  # never credentials for a refused origin
    # `null` (a sandboxed frame, a file: page) and two Origins stay refusals nobody's page can read
    for headers in ({"Origin": "null"}, [("Origin", other), ("Origin", other)]):
        fields = headers.items() if isinstance(headers, dict) else headers
        status, head = raw_head(proxy.port, b"GET /v1/bots/%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (BOT.encode(), proxy.port)
                                + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in fields)
                                + b"Connection: close\r\n\r\n")
        assert status in (400, 403) and b"access-control-" not in head.lower()
    assert standin.requests_seen == [] and standin.exchanges == []  # nothing forwarded, no token minted
    assert_clean(proxy, standin)

    # The proxied path (the API by its own name, through the proxy) keeps CORS for coze_origins only: Coze's answer
    # to another page is passed as Coze sent it, loosened for no one.
    through = requests.Session()
    through.trust_env = False
    proxied_pre = through.options(standin.base_url + "/v3/chat", proxies=proxy.proxies, headers=browser_headers(
        other, **{"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}))
    proxied = through.get(standin.base_url + "/v1/bots/" + BOT, proxies=proxy.proxies, headers=browser_headers(other))
    for r in (proxied_pre, proxied):
        assert "Access-Control-Allow-Origin" not in r.headers, r.headers
        assert other not in r.text


def test_the_page_the_404_and_the_pac_on_the_proxys_address(proxy, standin):
    s = plain()
    port = proxy.port
    page = s.get(f"http://localhost:{port}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"http://localhost:{port}" in page.text and "http://coze.mitm/" in page.text
    assert "502" not in page.text
    missing = s.get(proxy.url + "/favicon.ico")
    assert missing.status_code == 404 and set(missing.json()) == {"code", "msg"}
    pac = s.get(proxy.url + "/proxy.pac")
    assert pac.status_code == 200 and "FindProxyForURL" in pac.text and f"127.0.0.1:{port}" in pac.text
    assert standin.requests_seen == []


def raw(port: int, request: bytes) -> tuple[int, bytes]:
    """One request sent as bytes to the proxy (no proxy protocol: what a browser sends a server); status, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            if m and len(rest) >= int(m.group(1)):
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def raw_head(port: int, request: bytes) -> tuple[int, bytes]:
    """Status and header block of the answer to one request sent as bytes (headers as sent, repeated ones too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = read_head(sock)
    head = data.partition(b"\r\n\r\n")[0]
    return int(head.split()[1]), head


def test_a_rebinding_host_is_not_the_api_base(proxy, standin):
    # What a page at http://evil.example:<port> sends once evil.example resolves to 127.0.0.1 (no proxy set): its own
    # name as Host. Not the proxy's address: never sent to Coze, never given credentials (this machine's resolver
    # knows no evil.example; a name that does resolve here to the proxy is the local gate's self-loop refusal).
    tag = f"Bearer user:{ALICE}".encode()
    payload = b'{"bot_id":"7000","user_id":"x","stream":true}'
    for host in (b"evil.example", b"x.localhost", b"127.0.0.1.nip.io"):
        status, _ = raw(proxy.port, b"POST /v3/chat HTTP/1.1\r\nHost: " + host + b":%d\r\nAuthorization: " % proxy.port
                        + tag + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                        % len(payload) + payload)
        assert status >= 400, host
    assert standin.requests_seen == [] and standin.exchanges == []


def test_cozepy_with_only_a_base_url(proxy, standin):
    cozepy = pytest.importorskip("cozepy")
    standin.delta_gap = 0.05
    # no proxy (trust_env=False: none from the environment either), only the base URL
    coze = cozepy.Coze(auth=cozepy.TokenAuth(f"user:{ALICE}"), base_url=proxy.url,
                       http_client=cozepy.SyncHTTPClient(trust_env=False))
    reply, events = "", []
    for event in coze.chat.stream(bot_id=BOT, user_id=ALICE,
                                  additional_messages=[cozepy.Message.build_user_question_text("hello direct")]):
        events.append(event.event)
        if event.event == cozepy.ChatEventType.CONVERSATION_MESSAGE_DELTA:
            reply += event.message.content
    assert reply == "Sandbox reply to: hello direct"
    assert events[-1] == cozepy.ChatEventType.CONVERSATION_CHAT_COMPLETED
    conversation = coze.conversations.create()
    assert conversation.id
    api = [r for r in standin.requests_seen if r["path"] != TOKEN_PATH]
    assert [r["path"] for r in api] == ["/v3/chat", "/v1/conversation/create"]
    assert all(r["headers"]["authorization"].startswith("Bearer czs_") for r in api)
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)


# --------------------------------------------------------------------------- WebSockets on the proxy's address


def test_websocket_chat_on_the_proxys_address_origin_checked(proxy, standin):
    query = urllib.parse.urlencode({"bot_id": BOT, "authorization": f"Bearer user:{ALICE}"}, quote_via=urllib.parse.quote)
    # a browser's upgrade: origin-form, Host the proxy, Origin the page's
    client = WsClient(proxy.port, "127.0.0.1", proxy.port, f"/v1/chat?{query}", headers=[("Origin", PAGE)],
                      origin_form=True)
    try:
        assert client.status == 101, client.body
        text = ws_reply(client.chat("over the socket"))
        assert text == "Sandbox reply to: over the socket"
    finally:
        client.close()
    seen = standin.ws_seen
    assert len(seen) == 1 and seen[0]["session"] == ALICE and seen[0]["query_authorization"].startswith("Bearer czs_")
    # WebSockets have no CORS: the proxy itself refuses other origins, before any upgrade
    for origin in ("http://localhost:4000", "null"):
        refused = WsClient(proxy.port, "localhost", proxy.port, f"/v1/chat?{query}", headers=[("Origin", origin)],
                           origin_form=True)
        refused.close()
        assert refused.status == 403 and json.loads(refused.body)["code"] == 4101
    assert len(standin.ws_seen) == 1
    assert_clean(proxy, standin)


# --------------------------------------------------------------------------- Node's @coze/api with only baseURL

from tests.node import JS, NODE, run_sdk  # noqa: E402

needs_node_sdk = pytest.mark.skipif(NODE is None or not (JS / "node_modules" / "@coze" / "api").is_dir(),
                                    reason="node or @coze/api is not installed: run `npm ci` in tests/js (run_tests.sh does)")


@needs_node_sdk
def test_node_sdk_with_only_base_url(proxy, standin):
    standin.delta_gap = 0.15
    out = run_sdk("stream", baseURL=proxy.url, botId=BOT, user=ALICE, text="one two three four five")
    assert out["reply"] == "Sandbox reply to: one two three four five"
    arrivals = [e["t"] / 1000 for e in out["events"] if e["event"] == "conversation.message.delta"]
    assert len(arrivals) >= 8 and arrivals[-1] - arrivals[0] > 0.6 * 0.15 * (len(arrivals) - 1)
    calls = run_sdk("calls", baseURL=proxy.url, botId=BOT, user=ALICE, text="hello there", fileName="n.txt",
                    fileText="direct upload\n")
    assert calls["polled"]["messages"] == ["Sandbox reply to: hello there again"]
    assert calls["file"]["bytes"] == len("direct upload\n")
    api = [r for r in standin.requests_seen if r["path"] != TOKEN_PATH]
    assert {r["path"] for r in api} >= {"/v3/chat", "/v1/conversation/create", "/v1/files/upload"}
    assert all(r["headers"]["authorization"].startswith("Bearer czs_") for r in api)
    assert standin.exchange_count(ALICE) == 1
    assert_clean(proxy, standin)


@needs_node_sdk
def test_node_sdk_websocket_chat_with_only_base_ws_url(proxy, standin):
    base = dict(baseURL=proxy.url, baseWsURL=f"ws://127.0.0.1:{proxy.port}", botId=BOT, user=ALICE, timeoutMs=10000)
    out = run_sdk("ws", text="over the socket", origin=PAGE, **base)
    assert out["outcome"] == "completed", out
    assert out["reply"] == "Sandbox reply to: over the socket"
    plain_node = run_sdk("ws", text="no origin at all", **base)  # Node sends no Origin: a non-browser client
    assert plain_node["outcome"] == "completed", plain_node
    seen = standin.ws_seen
    assert len(seen) == 2 and all(s["session"] == ALICE and s["status"] == 101 for s in seen)
    assert all(s["header_authorization"] == s["query_authorization"] and s["query_authorization"].startswith("Bearer czs_")
               for s in seen)
    refused = run_sdk("ws", text="from elsewhere", origin="https://elsewhere.example", **base)
    assert refused["outcome"] == "error", refused
    assert len(standin.ws_seen) == 2
    assert_clean(proxy, standin)


def test_with_proxyauth_the_address_says_why_it_serves_nothing(mitmdump, config_file, standin, tmp_path):
    # Users are their proxy login, which a client calling the address directly cannot send: a JSON 403 saying so
    # instead of mitmproxy's 407 (a browser with no proxy set never answers it); the PAC file is still served.
    htpasswd = tmp_path / "users.htpasswd"
    htpasswd.write_text("alice:{SHA}" + "ZjliNzA3ZDM0ZDhlM2JhNWRlZmNmZGY5ZDEwZGZiNmM4ZWZkZDJhNQ==\n")  # any: never matched
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", f"proxyauth=@{htpasswd}")
    r = plain().post(proxy.url + "/v3/chat", headers=browser_headers(Authorization=f"Bearer user:{ALICE}"), json={})
    assert r.status_code == 403 and r.json()["code"] == 4101 and "proxy login" in r.json()["msg"]
    assert plain().get(proxy.url + "/proxy.pac").status_code == 200
    assert standin.requests_seen == [] and standin.exchanges == []
