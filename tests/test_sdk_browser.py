"""The official Coze JS SDK (@coze/api 1.3.x) bundled for the browser, in headless Chromium, through a real
mitmdump with addons/coze.py, against the strict stand-in.

The bundle is built at test time with esbuild from tests/js/node_modules (as a web app's bundler would build
it; entry tests/js/sdk/browser_entry.mjs) and served, with a page, for http://page.test (an allowed origin;
mitmproxy's map_remote sends it to a local server). The page gives the SDK the placeholder token
`user:<id>`; the SDK's own calls (XHR for ordinary calls, window.fetch for streams) cross origins to the
stand-in, so the preflight, CORS and the token swap are the real ones."""

from __future__ import annotations

import re

import pytest

from tests.browser import HTML, SCRIPT, StaticServer, launch_chromium, playwright_for_module
from tests.pages import STREAM_JS, api_sdk_missing, build_api_bundle

PAGE = "http://page.test"
BOT = "7000"
ALICE = "alice-0001"
GAP = 0.1

sync_api = playwright_for_module()
if api_sdk_missing():
    pytest.skip(api_sdk_missing(), allow_module_level=True)

PAGE_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>@coze/api in a page</title>
<script src="/coze-api.js"></script></head>
<body><h1>An ordinary page on an allowed origin, with the official Coze JS SDK</h1></body></html>"""


@pytest.fixture
def open_page(tmp_path, mitmdump, config_file, standin):
    """open_page(origins) -> (page, proxy): http://page.test/ in a fresh headless Chromium whose proxy is a
    mitmdump allowing `origins`; the page's JS errors are collected in page.errors."""
    pages = StaticServer({"/": (HTML, PAGE_HTML, {}), "/coze-api.js": (SCRIPT, build_api_bundle(tmp_path), {})}).start()
    playwright = sync_api.sync_playwright().start()
    browsers = []

    def open_(origins: str):
        proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={origins}", "connection_strategy=lazy",
                         f"map_remote=|^http://page\\.test/|http://127.0.0.1:{pages.port}/", "flow_detail=3")
        browser = launch_chromium(playwright, proxy.port)
        browsers.append(browser)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(PAGE + "/")
        assert page.evaluate("() => typeof CozeSDK.CozeAPI") == "function", page.errors
        return page, proxy

    yield open_
    for browser in browsers:
        browser.close()
    playwright.stop()
    pages.stop()


def test_official_sdk_streams_in_chromium_with_the_users_token(open_page, standin):
    standin.delta_gap = GAP
    page, proxy = open_page(PAGE)
    out = page.evaluate(STREAM_JS, {"baseURL": standin.base_url, "user": ALICE, "bot": BOT,
                                    "text": "one two three four five"})
    assert out["reply"] == "Sandbox reply to: one two three four five"
    assert out["conversation"]
    deltas = [e["t"] / 1000 for e in out["events"] if e["event"] == "conversation.message.delta"]
    assert len(deltas) >= 8
    spread = deltas[-1] - deltas[0]
    print(f"\n@coze/api chat.stream in Chromium: {len(deltas)} deltas over {spread:.2f} s (stand-in gap {GAP} s)")
    assert spread > 0.6 * GAP * (len(deltas) - 1)

    # The stand-in saw the browser's own requests (Origin, Sec-Fetch-*, the SDK's browser user agent header)
    # with this user's real token; the preflights never reached it.
    api = [r for r in standin.requests_seen if r["path"] != "/api/permission/oauth2/token"]
    assert [r["path"] for r in api] == ["/v3/chat", "/v1/conversation/create"]
    for seen in api:
        assert seen["headers"]["origin"] == PAGE
        assert seen["headers"]["sec-fetch-mode"] == "cors"
        assert "x-coze-client-user-agent" in seen["headers"]
        assert re.fullmatch(r"Bearer czs_\S+", seen["headers"]["authorization"])
    assert standin.placeholder_seen == 0
    assert standin.exchange_count(ALICE) == 1
    for exchange in standin.exchanges:
        assert exchange["access_token"] not in proxy.output
    assert not page.errors


def test_official_sdk_on_a_page_that_is_not_allowed_gets_no_token(open_page, standin):
    page, _ = open_page("https://elsewhere.example")
    out = page.evaluate("""async ({baseURL, user}) => {
        const coze = new CozeSDK.CozeAPI({token: 'user:' + user, baseURL});
        try { await coze.conversations.create({}); return {ok: true}; }
        catch (e) { return {ok: false, name: e.constructor.name, message: String(e.message)}; }
    }""", {"baseURL": standin.base_url, "user": ALICE})
    assert out["ok"] is False, out
    assert standin.exchanges == []
    assert [r for r in standin.requests_seen if r["method"] != "OPTIONS"] == []
