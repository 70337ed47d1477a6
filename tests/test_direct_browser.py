"""Browsers with NO proxy setting and no CA: a page of the developer's own on http://localhost:<port> names the proxy's
address (http://127.0.0.1:<proxy port>) as its Coze API base and chats, through a real mitmdump with addons/coze.py,
against the strict stand-in.

* Chromium (Debian's, driven by Playwright, launched without any proxy flag): the official @coze/api bundled for
  the browser (`baseURL`, tests/js/sdk/browser_entry.mjs) streams; Coze's chat component @coze/chat-sdk
  (`setting.apiBaseUrl`, tests/js/chat-sdk/entry.mjs) streams its answer on screen; a page outside coze_origins reads
  the proxy's refusal (403, code 4101, the msg naming --origins: plain fetch and @coze/api's error) and Coze sees
  nothing; a page whose name points at 127.0.0.1 (DNS rebinding, simulated
  with Chromium's host resolver rules) gets neither the proxy's page nor an API answer.
* Firefox ESR (Debian's `firefox-esr`, headless, a throwaway profile with no proxy; skipped where it is absent): the
  same @coze/api page streams; the page posts its result back to the page server (no driver needed).
Every request of the page is cross-origin (localhost:<page port> -> 127.0.0.1:<proxy port>): the preflights come to
the proxy's own address and are answered there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading

import pytest
import requests

from tests.browser import HTML, SCRIPT, StaticServer, find_chromium, launch_chromium
from tests.pages import (
    CHAT_BOT, REPLY, STREAM_JS, api_calls, api_sdk_missing, assert_only_real_tokens,
    build_api_bundle, build_chat_bundle, chat_page_server, chat_sdk_missing, send, wait_text, watch_reply,
)

if api_sdk_missing():
    pytest.skip(api_sdk_missing(), allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

CHROMIUM = find_chromium()
FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
BOT = "7000"
ALICE = "alice-direct-page1"
GAP = 0.1

PAGE_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>My own page with @coze/api</title>
<script src="/coze-api.js"></script></head>
<body><h1>A developer's own page on localhost</h1></body></html>"""

# Firefox: the page runs the chat itself and posts what happened to /result.
FIREFOX_HTML = ("""<!doctype html>
<html><head><meta charset="utf-8"><title>@coze/api in Firefox</title>
<script src="/coze-api.js"></script></head>
<body><script>
(async () => {
  const run = %s;
  const q = new URLSearchParams(location.search);
  let result;
  try {
    result = await run({baseURL: q.get('base'), user: q.get('user'), bot: q.get('bot'), text: q.get('text')});
  } catch (e) {
    result = {error: String(e), name: e && e.constructor && e.constructor.name};
  }
  await fetch('/result', {method: 'POST', body: JSON.stringify(result)});
})();
</script></body></html>""" % STREAM_JS).encode()


def own_page_server(bundle: bytes) -> StaticServer:
    """The developer's own page server (http://localhost:<port>): the page, the @coze/api bundle, and POST /result
    (server.results, server.got_result)."""
    results: list[dict] = []
    got_result = threading.Event()

    def take_result(path: str, body: bytes) -> None:
        results.append(json.loads(body or b"{}"))
        got_result.set()

    server = StaticServer({"/": (HTML, PAGE_HTML, {}), "/firefox": (HTML, FIREFOX_HTML, {}),
                           "/coze-api.js": (SCRIPT, bundle, {})}, on_post=take_result).start()
    server.results, server.got_result = results, got_result
    return server


@pytest.fixture(scope="module")
def api_bundle(tmp_path_factory):
    return build_api_bundle(tmp_path_factory.mktemp("coze-api"))


@pytest.fixture
def own_page(api_bundle):
    server = own_page_server(api_bundle)
    yield server
    server.stop()


@pytest.fixture
def chromium():
    """launch(*more_args) -> a headless Chromium with nothing set: no proxy at all (--no-proxy-server, so no
    bypass list to think about), no CA."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium or `chromium` on PATH)")
    playwright = sync_api.sync_playwright().start()
    browsers = []

    def launch(*more):
        browser = launch_chromium(playwright, None, "--no-proxy-server", *more)
        browsers.append(browser)
        return browser

    yield launch
    for browser in browsers:
        browser.close()
    playwright.stop()


def new_page(browser):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.seen = []  # every response the page received from the proxy: (url, headers)
    page.on("response", lambda r: page.seen.append((r.url, r.all_headers())))
    return page


def assert_token_never_reached_the_page(page, standin, *texts) -> None:
    tokens = [e["access_token"] for e in standin.exchanges]
    assert tokens
    for token in tokens:
        for url, headers in page.seen:
            assert token not in url and token not in json.dumps(headers), url
        for text in texts:
            assert token not in text


def status(proxy) -> dict:
    """The proxy's status.json (http://coze.mitm/, through the proxy)."""
    s = requests.Session()
    s.trust_env = False
    return s.get("http://coze.mitm/status.json", proxies=proxy.proxies, timeout=10).json()


# ------------------------------------------------------------------------------------------ Chromium


def test_coze_api_streams_in_chromium_with_no_proxy_setting(chromium, own_page, mitmdump, config_file, standin):
    standin.delta_gap = GAP
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={own_page.origin}")
    page = new_page(chromium())
    page.goto(own_page.origin + "/")
    out = page.evaluate(STREAM_JS, {"baseURL": proxy.url, "user": ALICE, "bot": BOT, "text": "one two three four five"})
    assert out["reply"] == "Sandbox reply to: one two three four five"
    assert out["conversation"]
    deltas = [e["t"] / 1000 for e in out["events"] if e["event"] == "conversation.message.delta"]
    assert len(deltas) >= 8
    spread = deltas[-1] - deltas[0]
    print(f"\n@coze/api in Chromium, no proxy setting: {len(deltas)} deltas over {spread:.2f} s (stand-in gap {GAP} s)")
    assert spread > 0.6 * GAP * (len(deltas) - 1), "the stream was buffered"

    # Cross-origin to the proxy's address: the preflights were answered there, never sent to Coze; Coze got the
    # page's own requests (its Origin) with this user's real token.
    assert [r["path"] for r in api_calls(standin)] == ["/v3/chat", "/v1/conversation/create"]
    for seen in api_calls(standin):
        assert seen["method"] != "OPTIONS"
        assert seen["headers"]["origin"] == own_page.origin
        assert re.fullmatch(r"Bearer czs_\S+", seen["headers"]["authorization"])
    assert status(proxy)["counters"]["preflights"] >= 2  # one per call (Authorization is no simple header)
    assert standin.placeholder_seen == 0 and standin.exchange_count(ALICE) == 1
    assert_token_never_reached_the_page(page, standin, json.dumps(out), proxy.output)
    assert not page.errors


def test_chat_sdk_streams_in_chromium_with_no_proxy_setting(chromium, mitmdump, config_file, standin, tmp_path):
    if chat_sdk_missing():
        pytest.skip(chat_sdk_missing())
    standin.delta_gap = 0.2
    server = chat_page_server(build_chat_bundle(tmp_path))
    try:
        origin = f"http://localhost:{server.port}"
        proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={origin}")
        page = new_page(chromium())
        page.goto(f"{origin}/?mode=bot&user={ALICE}&api={proxy.url}&bot={CHAT_BOT}")
        wait_text(page, "Sandbox bot")
        text = "one two three four five six seven eight"
        t0 = send(page, text)
        first, full = watch_reply(page, text, t0)
        n = len((REPLY + text).split())
        print(f"\n@coze/chat-sdk in Chromium, no proxy setting: first piece after {first:.2f} s, all after {full:.2f} s")
        assert first < full - 0.4 * n * 0.2, "the answer appeared all at once: the stream was buffered"
        assert ("POST", "/v3/chat") in [(r["method"], r["path"]) for r in api_calls(standin)]
        assert_only_real_tokens(standin, page, origin=origin)
        assert_token_never_reached_the_page(page, standin, page.inner_text("body"), proxy.output)
        assert not page.errors
    finally:
        server.stop()


FETCH_JS = """async ({url, user}) => {
    try {
        const r = await fetch(url, {method: 'POST', body: '{}',
                                    headers: {'Authorization': 'Bearer user:' + user, 'Content-Type': 'application/json'}});
        return {ok: true, status: r.status, text: await r.text()};
    } catch (e) {
        return {ok: false, name: e.constructor.name, message: String(e.message)};
    }
}"""


def test_a_page_outside_coze_origins_reads_why(chromium, own_page, mitmdump, config_file, standin):
    # Not "TypeError: Failed to fetch" and a console line: the page reads the proxy's answer (403, code 4101, a msg
    # that names the fix), through plain fetch and through @coze/api's error object, and can show it.
    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=http://localhost:1")
    page = new_page(chromium())
    page.goto(own_page.origin + "/")
    msg = (f"{own_page.origin} is not in coze_origins: start with --origins {own_page.origin} "
           "(or --set coze_origins=...)")
    out = page.evaluate(FETCH_JS, {"url": proxy.url + "/v1/conversation/create", "user": ALICE})
    assert out["ok"] and out["status"] == 403, out
    assert json.loads(out["text"]) == {"code": 4101, "msg": msg}
    sdk = page.evaluate("""async ({baseURL, user, bot}) => {
        const coze = new CozeSDK.CozeAPI({token: 'user:' + user, baseURL});
        const seen = [];
        const show = (e) => {
            seen.push({name: e.constructor.name, status: e.status, code: e.code, msg: e.msg});
            const p = document.createElement('p');
            p.className = 'coze-error';
            p.textContent = e.msg || String(e);
            document.body.append(p);
        };
        try { await coze.conversations.create({}); seen.push({ok: true}); } catch (e) { show(e); }
        try {
            const stream = await coze.chat.stream({bot_id: bot, user_id: user, additional_messages: [
                {role: 'user', content: 'hello', content_type: 'text'}]});
            for await (const part of stream) { seen.push({event: part.event}); }
        } catch (e) { show(e); }
        return seen;
    }""", {"baseURL": proxy.url, "user": ALICE, "bot": BOT})
    assert sdk[0] == {"name": "PermissionDeniedError", "status": 403, "code": 4101, "msg": msg}, sdk
    # chat.stream: @coze/api reads no body of a non-2xx streamed answer, so it has the status, not the msg (its own
    # limit, docs/clients.md); still a PermissionDeniedError with status 403 where it was a network error
    assert len(sdk) == 2 and (sdk[1]["name"], sdk[1]["status"]) == ("PermissionDeniedError", 403), sdk
    assert page.locator("p.coze-error").first.inner_text() == msg  # the text reached the page, shown there
    for url, headers in page.seen:
        assert "access-control-allow-credentials" not in headers, url
    assert standin.requests_seen == [] and standin.exchanges == []  # nothing forwarded, no token minted
    assert proxy.wait_for_output(r"origin-not-allowed")  # the log says it too


def test_a_rebinding_name_gets_nothing(chromium, mitmdump, config_file, standin):
    # A public page at http://evil.example:<proxy port> whose name resolves to 127.0.0.1: same-origin with whatever
    # the proxy answers it. It must get neither the proxy's page nor an API answer.
    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=http://evil.example")
    page = new_page(chromium("--host-resolver-rules=MAP evil.example 127.0.0.1"))
    evil = f"http://evil.example:{proxy.port}"
    page.goto(evil + "/")
    assert "Coze API base" not in page.content()
    out = page.evaluate(FETCH_JS, {"url": evil + "/v3/chat", "user": ALICE})
    assert not (out["ok"] and out["status"] < 400), out
    assert standin.requests_seen == [] and standin.exchanges == []


# ------------------------------------------------------------------------------------------ Firefox


@pytest.mark.skipif(FIREFOX is None, reason="Firefox is not installed (Debian: apt-get install firefox-esr)")
def test_coze_api_streams_in_firefox_with_no_proxy_setting(own_page, mitmdump, config_file, standin, tmp_path):
    standin.delta_gap = GAP
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={own_page.origin}")
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    (profile / "user.js").write_text("\n".join([
        'user_pref("network.proxy.type", 0);',  # no proxy (not even the system's)
        'user_pref("browser.shell.checkDefaultBrowser", false);',
        'user_pref("datareporting.policy.dataSubmissionEnabled", false);',
        'user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);',
        'user_pref("app.update.disabledForTesting", true);',
    ]) + "\n")
    url = (f"{own_page.origin}/firefox?base={proxy.url}&user={ALICE}&bot={BOT}&text=one%20two%20three%20four%20five")
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    firefox = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile), url], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert own_page.got_result.wait(90), "Firefox posted no result"
    finally:
        os.killpg(firefox.pid, signal.SIGTERM)
        try:
            firefox.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(firefox.pid, signal.SIGKILL)
            firefox.wait()
    out = own_page.results[0]
    assert out.get("reply") == "Sandbox reply to: one two three four five", out
    deltas = [e["t"] / 1000 for e in out["events"] if e["event"] == "conversation.message.delta"]
    assert len(deltas) >= 8
    spread = deltas[-1] - deltas[0]
    print(f"\n@coze/api in Firefox, no proxy setting: {len(deltas)} deltas over {spread:.2f} s (stand-in gap {GAP} s)")
    assert spread > 0.6 * GAP * (len(deltas) - 1), "the stream was buffered"
    for seen in api_calls(standin):
        assert seen["headers"]["origin"] == own_page.origin
        assert re.fullmatch(r"Bearer czs_\S+", seen["headers"]["authorization"])
    assert standin.placeholder_seen == 0 and standin.exchange_count(ALICE) == 1
    assert all(e["access_token"] not in json.dumps(out) for e in standin.exchanges)
