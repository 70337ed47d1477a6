"""The demo: addons/demo.py on its own, and `python run_mitm.py --demo` in headless Chromium.

The browser test types a message on http://coze.mitm/demo and watches the streamed reply appear,
through the real path: CORS preflight, placeholder tag, per-user token exchange, SSE.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow, tutils

import json
import os
import socket

from coze_mitm.parts.csp import Csp
from coze_mitm.parts.demo import DEFAULT_BOT_ID, SANDBOX_API, SANDBOX_HOST, Demo
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.pages.userscript_fill import VERSION_STATE_FILE
from coze_mitm.parts.status import StatusPages
from tests.clients import session
from tests.conftest import TEST_HOME, write_config
from tests.browser import RECORD_REPLY, launch_chromium, playwright_or_skip
from tests.harness import Launcher



# --------------------------------------------------------------------------- the addon

@pytest.fixture
def addons(tmp_path, rsa_key):
    def make(api_base: str = "http://127.0.0.1:8790", demo_on: bool = True):
        config = write_config(tmp_path, rsa_key, api_base)
        settings = CozeSettings()
        demo, status = Demo(settings), StatusPages(settings)
        ctx = taddons.context(settings, demo, status, Csp(settings))
        tctx = ctx.__enter__()
        tctx.configure(settings, confdir=str(tmp_path), coze_config=str(config), coze_origins="http://coze.mitm")
        tctx.configure(demo, coze_demo=demo_on)
        made.append(ctx)
        return demo, status, tctx

    made = []
    yield make
    for ctx in made:
        ctx.__exit__(None, None, None)


def request(host: str, path: str = "/", method: str = "GET", port: int = 80):
    return tflow.tflow(req=tutils.treq(method=method.encode(), scheme=b"http", host=host, port=port,
                                       authority=b"", path=path.encode()))


def test_page_only_with_coze_demo(addons):
    demo, status, _ = addons(demo_on=False)
    f = request("coze.mitm", "/demo")
    demo.request(f)
    assert f.response is None
    status.request(f)
    assert f.response.status_code == 404  # the status pages know no /demo
    g = request(SANDBOX_HOST, "/v3/chat", "POST")
    demo.request(g)
    assert g.response is None and g.request.host == SANDBOX_HOST  # not mapped anywhere


def test_sandbox_name_mapped_to_the_local_api(addons):
    demo, _, _ = addons()
    f = request(SANDBOX_HOST, "/v3/chat?conversation_id=1", "POST")
    demo.request(f)
    assert f.response is None
    assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", 8790)
    assert f.request.path == "/v3/chat?conversation_id=1"
    assert "SANDBOX" in f.comment


def test_page_served_with_nonce_csp(addons):
    demo, _, _ = addons()
    f = request("coze.mitm", "/demo")
    demo.request(f)
    assert f.response.status_code == 200
    csp = f.response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    body = f.response.get_text()
    assert body.count(f'nonce="{nonce}"') == 2  # the style and the script, nothing else runs
    assert "__NONCE__" not in body and "__CONFIG_JSON__" not in body
    assert '"ready": true' in body


def test_never_mapped_to_a_real_coze(addons, caplog):
    """coze_demo with a config for api.coze.cn: the demo stays off rather than send a page's chat to Coze."""
    demo, _, _ = addons(api_base="https://api.coze.cn")
    f = request(SANDBOX_HOST, "/v3/chat", "POST")
    demo.request(f)
    assert f.response.status_code == 503
    assert "python3 run_mitm.py --demo" in f.response.get_text()
    assert f.request.host == SANDBOX_HOST
    page = request("coze.mitm", "/demo")
    demo.request(page)
    assert '"ready": false' in page.response.get_text()
    assert "is not a local sandbox: the demo page stays off" in caplog.text


def served_script(status) -> str:
    f = request("coze.mitm", "/coze-chat.user.js")
    status.request(f)
    return f.response.get_text()


def status_json(status) -> dict:
    f = request("coze.mitm", "/status.json")
    status.request(f)
    return json.loads(f.response.get_text())


def test_demo_serves_the_sandbox_bot_unless_coze_bot_id_says_otherwise(addons):
    _, status, tctx = addons()
    assert f'  botId: "{DEFAULT_BOT_ID}", // @coze-mitm botId' in served_script(status)
    assert status_json(status)["bot_id"] == DEFAULT_BOT_ID
    tctx.options.coze_bot_id = "7350000000000000009"
    assert '  botId: "7350000000000000009", // @coze-mitm botId' in served_script(status)
    assert status_json(status)["bot_id"] == "7350000000000000009"


def test_no_sandbox_bot_outside_the_demo(addons):
    _, status, _ = addons(demo_on=False)
    assert '  botId: "", // @coze-mitm botId' in served_script(status)
    assert "bot_id" not in status_json(status) and "demo" not in status_json(status)
    _, status, _ = addons(api_base="https://api.coze.cn")  # coze_demo, but no local sandbox: not the demo
    assert "bot_id" not in status_json(status)


def test_allowed_page_csp_names_the_sandbox_as_pages_call_it(addons):
    _, _, tctx = addons()
    tctx.options.coze_origins = "http://coze.mitm,http://page.test"
    csp = tctx.master.addons.get("csp")
    f = tflow.tflow(req=tutils.treq(method=b"GET", scheme=b"http", host="page.test", port=80, path=b"/"),
                    resp=tutils.tresp(headers=tutils.tresp().headers.__class__([
                        (b"content-type", b"text/html"), (b"content-security-policy", b"default-src 'self'")])))
    response, f.response = f.response, None
    csp.request(f)
    f.response = response
    csp.responseheaders(f)
    policy = f.response.headers["content-security-policy"]
    connect = next(d.split()[1:] for d in policy.split(";") if d.split()[0] == "connect-src")
    assert connect == ["'self'", SANDBOX_API]  # not http://127.0.0.1:8790, which the page never calls


def test_connect_to_the_sandbox_name_is_answered_here(addons):
    demo, _, tctx = addons()
    for port in (80, 443):
        f = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=SANDBOX_HOST, port=port, scheme=b"", path=b"",
                                        authority=f"{SANDBOX_HOST}:{port}".encode()))
        demo.http_connect(f)
        assert f.response.status_code == 200
    other = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="example.org", port=443, scheme=b"", path=b"",
                                        authority=b"example.org:443"))
    demo.http_connect(other)
    assert other.response is None
    # Inside the https tunnel: the same mapping as for plain http.
    g = tflow.tflow(req=tutils.treq(method=b"POST", scheme=b"https", host=SANDBOX_HOST, port=443, path=b"/v3/chat"))
    demo.request(g)
    assert (g.request.scheme, g.request.host, g.request.port) == ("http", "127.0.0.1", 8790)
    tctx.options.coze_demo = False
    off = tflow.tflow(req=tutils.treq(method=b"CONNECT", host=SANDBOX_HOST, port=443, scheme=b"", path=b"",
                                      authority=f"{SANDBOX_HOST}:443".encode()))
    demo.http_connect(off)
    assert off.response is None  # not the demo: the name is not ours


def status_page(status, scheme="http") -> str:
    f = request("coze.mitm", "/")
    f.request.scheme = scheme
    status.request(f)
    return f.response.get_text()


def test_status_page_in_the_demo_says_what_is_true_there(addons):
    _, status, tctx = addons()
    data = status_json(status)
    assert data["https_needed"] is False and data["demo"]["ready"] is True
    page = status_page(status)
    # Plain http pages, plain http API: the CA check is not an error here.
    assert 'data-needed="false"' in page and "Not needed here" in page
    # Only the demo page is allowed: the userscript would match nothing, so it is not offered.
    assert "Install userscript" not in page and 'href="/coze-chat.user.js"' not in page
    assert "would run on no page yet" in page and "--set coze_origins=https://your.page" in page
    assert DEFAULT_BOT_ID in page and "the sandbox's bot" in page
    tctx.options.coze_launcher = "run_mitm.py"
    page = status_page(status)
    assert "python3 run_mitm.py --demo --origins https://your.page" in page and "--bot-id &lt;bot id&gt;" in page
    tctx.options.coze_origins = "http://coze.mitm,http://127.0.0.1:38090"
    page = status_page(status)
    assert "Install userscript" in page and 'data-needed="false"' in page
    tctx.options.coze_origins = "http://coze.mitm,https://chat.example.org"
    assert status_json(status)["https_needed"] is True
    assert 'data-needed="true"' in status_page(status)


def test_status_page_bot_id_hint_names_the_launcher_flag(addons):
    _, status, tctx = addons(demo_on=False)
    assert "--set coze_bot_id=&lt;bot id&gt;" in status_page(status)
    tctx.options.coze_launcher = "run_mitm.py"
    page = status_page(status)
    assert "--bot-id &lt;bot id&gt;" in page and "coze_bot_id" not in page


def test_version_state_kept_in_the_test_confdir_not_in_home(addons, tmp_path):
    addons()
    assert (tmp_path / VERSION_STATE_FILE).exists()
    home = Path(os.path.expanduser("~"))
    assert home == TEST_HOME  # conftest: the user's real ~/.mitmproxy is out of reach of every test
    assert not (home / ".mitmproxy" / VERSION_STATE_FILE).exists()


def test_title_is_escaped(addons):
    demo, _, tctx = addons()
    tctx.options.coze_title = "<img src=x onerror=alert(1)>"
    f = request("coze.mitm", "/demo")
    demo.request(f)
    assert "<img src=x" not in f.response.get_text()
    assert "&lt;img src=x" in f.response.get_text()


# --------------------------------------------------------------------------- through a real mitmdump

def test_sandbox_name_absolute_and_inside_connect_tunnels(mitmdump, config_file, standin):
    """undici's ProxyAgent always tunnels, browsers tunnel ws://: CONNECT sandbox.coze.mitm must work too."""
    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=http://coze.mitm", "coze_demo=true")
    tagged = {"Authorization": "Bearer user:alice-0001"}
    s = session(proxy)
    # An absolute-URL request (what a browser sends for http:// through a proxy).
    r = s.get(f"{SANDBOX_API}/v1/bots/7000", headers=tagged, timeout=10)
    assert r.status_code == 200 and r.json()["data"]["bot_id"] == "7000"
    # https inside a CONNECT tunnel, with the certificate the proxy makes for the name.
    r = s.get(f"https://{SANDBOX_HOST}/v1/bots/7001", headers=tagged, timeout=10,
              verify=str(proxy.confdir / "mitmproxy-ca-cert.pem"))
    assert r.status_code == 200 and r.json()["data"]["bot_id"] == "7001"
    # Plain http inside a CONNECT tunnel (a raw socket, as a WebSocket client does it).
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(f"CONNECT {SANDBOX_HOST}:80 HTTP/1.1\r\nHost: {SANDBOX_HOST}:80\r\n\r\n".encode())
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        c.sendall(f"GET /v1/bots/7002 HTTP/1.1\r\nHost: {SANDBOX_HOST}\r\nAuthorization: Bearer user:alice-0001\r\n"
                  "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["data"]["bot_id"] == "7002"
    # Each time with this user's real token: one exchange, the placeholder never reached the sandbox.
    assert standin.exchange_count("alice-0001") == 1 and standin.placeholder_seen == 0
    assert "Name or service not known" not in proxy.output



def test_a_page_calling_the_real_coze_in_the_demo_gets_a_local_note(mitmdump, config_file, standin):
    """In the demo, https://api.coze.cn (and ws.coze.cn, coze.com) is answered by coze-mitm with a JSON note that
    names the sandbox: intercepted, never a tunnel to the internet (no "Name or service not known", no 502)."""
    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=http://coze.mitm", "coze_demo=true")
    s = session(proxy)
    ca = str(proxy.confdir / "mitmproxy-ca-cert.pem")
    page = {"Origin": "http://coze.mitm", "Sec-Fetch-Site": "cross-site"}
    pre = s.options("https://api.coze.cn/v3/chat", headers={**page, "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Headers": "authorization"},
                    verify=ca, timeout=10)
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "http://coze.mitm"
    r = s.post("https://api.coze.cn/v3/chat", headers={**page, "Authorization": "Bearer user:alice-0001"},
               json={"bot_id": "1"}, verify=ca, timeout=10)
    assert r.status_code == 503 and r.headers["Access-Control-Allow-Origin"] == "http://coze.mitm"
    body = r.json()
    assert set(body) == {"code", "msg"} and body["code"] == 5000
    assert SANDBOX_API in body["msg"] and "api.coze.cn" in body["msg"] and "--demo" in body["msg"]
    r = s.get("http://api.coze.com/v1/bots/1", timeout=10)
    assert r.status_code == 503 and SANDBOX_API in r.json()["msg"]
    assert standin.requests_seen == [] and standin.exchanges == []  # nothing went anywhere
    assert proxy.wait_for_output(r"demo: a page called api\.coze\.cn; the demo answers it locally", 5), proxy.output
    # no name lookup, no 502 (as a status: a random port number such as 45021 may hold the digits)
    assert "Name or service not known" not in proxy.output and not re.search(r"(?<![\d:.])502(?!\d)", proxy.output)


def test_a_page_outside_coze_origins_is_named_in_the_log_and_on_the_status_page(mitmdump, config_file, standin):
    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=https://mine.example")
    s = session(proxy)
    for _ in range(3):
        s.options(standin.base_url + "/v3/chat", headers={"Origin": "https://not-mine.example",
                                                          "Access-Control-Request-Method": "POST"}, timeout=10)
    r = s.get(standin.base_url + "/v1/bots/1", headers={"Origin": "https://other.example",
                                                        "Authorization": "Bearer user:alice-0001"}, timeout=10)
    assert r.status_code == 403
    assert proxy.wait_for_output(r"a CORS preflight to the Coze API from page origin https://not-mine\.example, "
                                 r"which is not in coze_origins; if it is your page, add it", 5), proxy.output
    # the tagged request's refusal line (flowlog) names the origin and the setting already: no second line
    assert proxy.wait_for_output(r"page origin 'https://other\.example' may not use coze-mitm's Coze credentials; if this is "
                                 r"your page, add its exact origin to coze_origins", 5), proxy.output
    assert "a tagged request from page origin" not in proxy.output
    assert proxy.output.count("https://not-mine.example, which is not in coze_origins") == 1  # rate-limited
    refused = s.get("http://coze.mitm/status.json", timeout=10).json()["refused_origins"]
    assert [(r["origin"], r["count"]) for r in refused] == [("https://other.example", 1), ("https://not-mine.example", 3)]
    page = s.get("http://coze.mitm/", timeout=10).text
    assert "Pages refused lately" in page and "https://not-mine.example" in page


# --------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def demo_proxy(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("demo-browser"), "--demo").start()
    yield launcher
    launcher.stop()


@pytest.fixture(scope="module")
def playwright():
    """One Playwright per module: its sync API cannot be started twice in one thread."""
    sync_playwright = playwright_or_skip()
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(demo_proxy, playwright):
    chromium = launch_chromium(
        # No --proxy-bypass-list=<-loopback>: the demo never asks the browser for a loopback address
        # (the sandbox is reached as http://sandbox.coze.mitm), so it works with a browser's defaults.
        playwright, demo_proxy.port, bypass=None)
    yield chromium
    chromium.close()


@pytest.mark.process
def test_demo_page_streams_a_reply_in_chromium(browser, demo_proxy, tmp_path):
    context = browser.new_context()
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto("http://coze.mitm/demo")
    assert "SANDBOX" in page.inner_text(".sandbox")
    user_id = page.evaluate("localStorage.getItem('coze-mitm-demo-user')")
    assert re.fullmatch(r"\d{13}-[A-Za-z0-9_-]{22}", user_id)  # the userscript's format: ms-time, 16 random bytes
    page.evaluate(RECORD_REPLY)

    page.fill("#message", "hello from chromium")
    page.click("#send")
    page.wait_for_selector('.msg.bot[data-done="true"]', timeout=15_000)
    reply = page.inner_text(".msg.bot")
    assert reply == "Sandbox reply to: hello from chromium"
    snapshots = page.evaluate("window.__replies")
    # Rendered delta by delta: the text grew in several steps, each a prefix of the final reply.
    assert len(snapshots) >= 4, snapshots
    assert all(reply.startswith(s) for s in snapshots)
    deltas = int(page.get_attribute(".msg.bot", "data-deltas"))
    assert deltas >= 4
    assert f"streamed {deltas} deltas" in page.inner_text("#trace")
    shot = tmp_path / "coze-mitm-demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000
    print(f"\nscreenshot: {shot}")

    # The browser asked first (a real CORS preflight), then sent the tagged POST.
    assert demo_proxy.wait_for_output(r"preflight OPTIONS 127\.0\.0\.1/v3/chat from http://coze\.mitm -> 204")
    short = f"{user_id[:4]}…{user_id[-4:]}"
    assert demo_proxy.wait_for_output(f"token for user {re.escape(short)} minted")

    # A reload finds the conversation again: the sandbox kept it for this user's session.
    page.reload()
    page.wait_for_selector(".msg.user")
    assert page.inner_text(".msg.user") == "hello from chromium"

    # A new identity is a new user: another token exchange, an empty history.
    page.click("#new-user")
    new_id = page.evaluate("localStorage.getItem('coze-mitm-demo-user')")
    assert new_id != user_id
    assert page.locator(".msg.user").count() == 0
    page.fill("#message", "second user")
    page.click("#send")
    page.wait_for_selector('.msg.bot[data-done="true"]', timeout=15_000)
    assert page.inner_text(".msg.bot") == "Sandbox reply to: second user"
    assert demo_proxy.wait_for_output(f"token for user {re.escape(new_id[:4])}…{re.escape(new_id[-4:])} minted")
    assert len(re.findall(f"token for user {re.escape(short)} minted", demo_proxy.output)) == 1

    assert problems == []
    context.close()


@pytest.mark.process
def test_demo_with_an_allowed_strict_csp_page_chats_with_the_real_userscript(tmp_path_factory, playwright):
    """run_mitm.py --demo --origins http://page.test: the served script names the sandbox bot, the page's
    `default-src 'self'` gets http://sandbox.coze.mitm (what the page calls) in connect-src, and it chats."""
    from tests.browser import PageServer, gm_xhr_binding, userscript_init_script
    from tests.clients import session as proxy_session

    pages = PageServer(SANDBOX_API).start()  # the SDK stand-in calls the API as pages in the demo do
    launcher = Launcher(tmp_path_factory.mktemp("demo-page"), "--demo", "--origins", "http://page.test",
                        "--set", "coze_sdk_url=http://cdn.test/sdk/index.js",
                        *[a for spec in pages.map_remote("page.test", "cdn.test") for a in ("--set", spec)])
    try:
        launcher.start()
        script = proxy_session(launcher).get("http://coze.mitm/coze-chat.user.js", timeout=10).text
        assert f'  botId: "{DEFAULT_BOT_ID}", // @coze-mitm botId' in script
        assert re.findall(r"^// @match\s+(\S+)$", script, re.M) == ["http://page.test/*"]
        assert f"coze-mitm proxy (127.0.0.1:{launcher.port})" in script
        browser = launch_chromium(playwright, launcher.port)
        context = browser.new_context()
        context.set_default_timeout(15_000)
        context.expose_binding("cozeGmXhr", gm_xhr_binding(launcher.proxies))
        context.add_init_script(userscript_init_script(script))
        page = context.new_page()
        problems = []
        page.on("console", lambda m: problems.append(f"{m.text} {m.location.get('url', '')}")
                if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico") else None)
        main = page.goto("http://page.test/strict")
        policy = main.headers["content-security-policy"]
        connect = next(d.split()[1:] for d in policy.split(";") if d.split()[0] == "connect-src")
        assert connect == ["'self'", SANDBOX_API], policy
        page.wait_for_function("() => window.__fakeCozeClient || document.getElementById('coze-mitm-notice')")
        assert page.evaluate("() => document.getElementById('coze-mitm-notice')") is None
        page.evaluate("() => window.__fakeCozeClient.ready")
        assert page.evaluate("() => window.__cozeMitmClient.options.config.bot_id") == DEFAULT_BOT_ID
        reply = page.evaluate("(t) => window.__fakeCozeClient.send(t)", "hello from a strict page")
        assert reply == "Sandbox reply to: hello from a strict page"
        assert problems == []  # no CSP violation, no failed request

        # The status page tells the demo's truth: no red CA error, plain http is enough here.
        status = context.new_page()
        status.goto("http://coze.mitm/")
        status.wait_for_function("() => !document.getElementById('ca-state').textContent.startsWith('Checking')")
        assert status.get_attribute("#ca-state", "class") != "bad"
        assert "Not needed here" in status.inner_text("body")
        assert status.get_attribute("a.button", "href") == "/coze-chat.user.js"
        browser.close()
    finally:
        launcher.stop()
        pages.stop()


def test_a_real_coze_ws_host_configured_beside_the_sandbox_is_not_answered_by_the_demo(addons):
    """The demo answers real Coze hosts itself only while no real Coze is configured: a real WebSocket host named in
    coze_api_hosts counts as configured, as a real API host does (the bundle sends such a host's requests to the
    parts that act on the Coze API only, and the demo is not one of them: both agree)."""
    demo, _, tctx = addons()
    f = request("ws.coze.cn", "/v1/chat", port=443)
    demo.request(f)
    assert f.response is not None and f.response.status_code == 503  # the sandbox only: answered locally
    tctx.configure(demo.settings, coze_api_hosts="wss://ws.coze.cn")
    f = request("ws.coze.cn", "/v1/chat", port=443)
    demo.request(f)
    assert f.response is None
