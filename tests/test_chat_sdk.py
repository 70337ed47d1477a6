"""Coze's official React chat component, @coze/chat-sdk (its Web build, @coze/chat-sdk/webJs + webCss), as a
real client: bundled with React by esbuild (entry tests/js/chat-sdk/entry.mjs), mounted in a page of an
allowed origin in headless Chromium, through a real mitmdump with addons/coze.py, against the strict stand-in.

The page hands the component the placeholder token `user:<id>` (and an onRefreshToken that hands it the
same placeholder again); everything the component does (XHR through axios for ordinary calls, window.fetch
for the streams, multipart upload) crosses origins to the stand-in, so the preflights, CORS and the token
swap are the real ones. The page has no inline script, so it also runs under `default-src 'self'`.

Bot mode is ChatFramework with chat.type = ChatType.Bot; app mode is ChatFlowFramework with project
{type: 'app', mode: 'websdk'} and a workflow id. What the component calls and loads: docs/chat-sdk-notes.md.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest

from tests.browser import ICON_PNG, chromium_args, find_chromium
from tests.conftest import REPO

JS = REPO / "tests" / "js"
ESBUILD = JS / "node_modules" / ".bin" / "esbuild"
CHAT_SDK = JS / "node_modules" / "@coze" / "chat-sdk"
PAGE = "http://page.test"
BOT = "7480000000000000001"
APP = "7480000000000000002"
WORKFLOW = "7480000000000000003"
ALICE = "alice-chat-0001"
BOB = "bob-chat-0002"
REPLY = "Sandbox reply to: "
TIMEOUT = 20_000

CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (/usr/bin/chromium or `chromium` on PATH): browser tests skipped",
                allow_module_level=True)
if not ESBUILD.exists() or not CHAT_SDK.is_dir() or not (JS / "node_modules" / "react-dom").is_dir():
    pytest.skip("@coze/chat-sdk, react-dom or esbuild is not installed: run `npm ci` in tests/js (run_tests.sh does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

STRICT_CSP = "default-src 'self'"


def page_html(title: str) -> bytes:
    # No inline script or style: the page itself is fine under default-src 'self'.
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/chat-sdk.css"><link rel="stylesheet" href="/page.css">
<script src="/chat-sdk.js" defer></script></head>
<body><div id="chat"></div></body></html>""".encode()


PAGE_CSS = b"html, body { margin: 0; height: 100%; } #chat { height: 100vh; width: 100vw; }"


def build_bundle(out_dir) -> dict[str, bytes]:
    """esbuild: the page's script (React + the component) and its stylesheet (the component's webCss)."""
    out = out_dir / "chat-sdk.js"
    subprocess.run([str(ESBUILD), "chat-sdk/entry.mjs", "--bundle", "--format=iife", "--platform=browser",
                    "--define:process.env.NODE_ENV=\"production\"", "--minify", f"--outfile={out}", "--log-level=error"],
                   cwd=str(JS), check=True, timeout=120, capture_output=True)
    return {"js": out.read_bytes(), "css": (out_dir / "chat-sdk.css").read_bytes()}


class ChatPageServer:
    """The origin server behind http://page.test: the page (plain, and with a strict CSP header), the bundle,
    the lazily loaded webpack chunk of the component, and a stand-in for its cdnBaseUrlPath folder."""

    def __init__(self, bundle: dict[str, bytes]):
        chunk = (CHAT_SDK / "dist" / "lib-h5" / "chunk" / "316.js").read_bytes()
        self.files = {
            "/": ("text/html; charset=utf-8", page_html("@coze/chat-sdk on an allowed page"), {}),
            "/strict": ("text/html; charset=utf-8", page_html("@coze/chat-sdk on a strict CSP page"),
                        {"Content-Security-Policy": STRICT_CSP}),
            "/chat-sdk.js": ("text/javascript; charset=utf-8", bundle["js"], {}),
            "/chat-sdk.css": ("text/css; charset=utf-8", bundle["css"], {}),
            "/page.css": ("text/css; charset=utf-8", PAGE_CSS, {}),
            "/chunk/316.js": ("text/javascript; charset=utf-8", chunk, {}),
            "/avatar.png": ("image/png", ICON_PNG, {}),
        }
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                if path in server.files:
                    ctype, body, extra = server.files[path]
                    status = 200
                elif path.startswith("/cdn/") and path.endswith(".png"):  # cdnBaseUrlPath's images
                    status, ctype, body, extra = 200, "image/png", ICON_PNG, {}
                else:
                    status, ctype, body, extra = 404, "text/plain", b"not found", {}
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# Collected from the first script on: CSP violations (the event fires on the document) and console errors.
WATCH_JS = """(() => {
  window.cspViolations = [];
  document.addEventListener('securitypolicyviolation', (e) => {
    window.cspViolations.push({directive: e.effectiveDirective || e.violatedDirective, blocked: e.blockedURI,
                               sample: e.sample, source: e.sourceFile, line: e.lineNumber});
  });
})();"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("chat-sdk"))


@pytest.fixture
def chat_page(bundle, mitmdump, config_file, standin):
    """chat_page(**query) -> (page, proxy): the component's page in a fresh headless Chromium whose proxy is a
    mitmdump allowing http://page.test. Query: mode (bot|app), user, path (/ or /strict), and more (see
    tests/js/chat-sdk/entry.mjs). page.errors: uncaught errors; page.console_errors: console.error lines."""
    server = ChatPageServer(bundle)
    playwright = sync_api.sync_playwright().start()
    state = {}

    def open_(*, path: str = "/", user: str = ALICE, mode: str = "bot", origins: str = PAGE, **query):
        if "proxy" not in state:
            state["proxy"] = mitmdump(f"coze_config={config_file}", f"coze_origins={origins}",
                                      "connection_strategy=lazy",
                                      f"map_remote=|^http://page\\.test/|http://127.0.0.1:{server.port}/")
            state["browser"] = playwright.chromium.launch(executable_path=CHROMIUM,
                                                          args=chromium_args(state["proxy"].port), headless=True)
            state["context"] = state["browser"].new_context(viewport={"width": 1000, "height": 800})
            state["context"].add_init_script(WATCH_JS)
        page = state["context"].new_page()
        page.set_default_timeout(TIMEOUT)
        page.errors, page.console_errors = [], []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        params = {"mode": mode, "user": user, "api": standin.base_url, "bot": BOT, "app": APP,
                  "workflow": WORKFLOW, **query}
        page.url_query = urlencode(params)
        page.goto(f"{PAGE}{path}?{page.url_query}")
        return page, state["proxy"]

    open_.server = server
    yield open_
    if "browser" in state:
        state["browser"].close()
    playwright.stop()
    server.stop()


# ------------------------------------------------------------------------------------------ helpers

TOKEN_PATH = "/api/permission/oauth2/token"
FILE_INPUT = "input[type=file]"
CLEAR_CONTEXT = '[class*="command-container"] [class*="index-module__wrapper"]'  # left of the input
CLEAR_MESSAGES = '[class*="square-hover-btn"]'  # the header's right button (the broom)
HAS_TEXT = "(t) => document.body.innerText.includes(t)"


def api_calls(standin) -> list[dict]:
    return [r for r in standin.requests_seen if r["path"] != TOKEN_PATH]


def calls(standin) -> list[tuple[str, str]]:
    """The component's calls, sorted: it makes its start-up calls in parallel, so their order is the network's."""
    return sorted((r["method"], r["path"]) for r in api_calls(standin))


def assert_only_real_tokens(standin, page=None, origin: str = PAGE) -> None:
    """Every call the component made reached the stand-in from the page, with a real token, never the tag."""
    api = api_calls(standin)
    assert api, "the component called nothing"
    for seen in api:
        assert re.fullmatch(r"Bearer czs_\S+", seen["headers"].get("authorization", "")), (seen["path"], seen["headers"])
        assert seen["headers"].get("origin") == origin, seen
        assert "user:" not in seen["target"]
    assert standin.placeholder_seen == 0
    if page is not None:  # the proxy renews the token itself: the component never had to ask for one
        assert page.evaluate("() => window.cozeChatLog.refreshes") == []


def send(page, text: str) -> float:
    page.wait_for_selector("textarea")
    page.fill("textarea", text)
    t0 = time.monotonic()
    page.keyboard.press("Enter")
    return t0


def wait_text(page, text: str, timeout: float = TIMEOUT) -> None:
    page.wait_for_function(HAS_TEXT, arg=text, timeout=timeout)


def watch_reply(page, text: str, t0: float, timeout: float = 20) -> tuple[float, float]:
    """(seconds until the first piece of the answer was on screen, seconds until all of it was)."""
    first = None
    full_reply = REPLY + text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = page.inner_text("body")
        now = time.monotonic() - t0
        if first is None and body.count("Sandbox reply to") >= 1 and full_reply not in body:
            first = now
        if full_reply in body:
            return (first if first is not None else now), now
        time.sleep(0.03)
    raise AssertionError(f"the answer {full_reply!r} was not rendered within {timeout} s:\n{page.inner_text('body')}")


# ------------------------------------------------------------------------------------------ bot mode

def test_bot_mode_streams_the_answer_and_a_reload_shows_the_history(chat_page, standin):
    standin.delta_gap = 0.2
    page, proxy = chat_page(mode="bot")
    wait_text(page, "Sandbox bot")  # get_online_info answered: the bot's name and prologue
    text = "one two three four five six seven eight"
    t0 = send(page, text)
    first, full = watch_reply(page, text, t0)
    n = len((REPLY + text).split())
    print(f"\n@coze/chat-sdk bot mode: first piece on screen after {first:.2f} s, all after {full:.2f} s "
          f"({n} deltas, stand-in gap 0.2 s)")
    assert first < full - 0.4 * n * 0.2, "the answer appeared all at once: the stream was buffered"

    assert calls(standin) == sorted([
        ("GET", "/v1/bot/get_online_info"), ("GET", "/v1/conversations"), ("POST", "/v1/conversation/create"),
        ("POST", "/v1/conversation/message/list"), ("POST", "/v3/chat"),
    ])
    chat = standin.chats_of(ALICE)
    assert len(chat) == 1 and chat[0]["user_id"] == ALICE and chat[0]["bot_id"] == BOT
    assert_only_real_tokens(standin, page)

    # A reload finds the conversation again (GET /v1/conversations) and shows its messages.
    standin.reset_observations()
    page.reload()
    wait_text(page, REPLY + text)
    assert text in page.inner_text("body")
    assert calls(standin) == sorted([
        ("GET", "/v1/bot/get_online_info"), ("GET", "/v1/conversations"), ("POST", "/v1/conversation/message/list"),
    ])
    assert_only_real_tokens(standin, page)
    assert standin.exchange_count(ALICE) <= 1  # the proxy's cached token, not a new one per page load
    assert not page.errors
    for exchange in standin.exchanges:
        assert exchange["access_token"] not in proxy.output


def test_two_users_of_one_page_each_see_only_their_own_history(chat_page, standin):
    alice, _ = chat_page(user=ALICE)
    send(alice, "alice speaking here")
    wait_text(alice, REPLY + "alice speaking here")
    bob, _ = chat_page(user=BOB)
    wait_text(bob, "Sandbox bot")
    time.sleep(0.5)  # the history, if any, is in
    assert "alice speaking here" not in bob.inner_text("body")
    send(bob, "bob speaking here")
    wait_text(bob, REPLY + "bob speaking here")
    alice.reload()
    wait_text(alice, REPLY + "alice speaking here")
    assert "bob speaking" not in alice.inner_text("body")
    assert [c["user_id"] for c in standin.chats_of(ALICE)] == [ALICE]
    assert [c["user_id"] for c in standin.chats_of(BOB)] == [BOB]
    assert_only_real_tokens(standin)


def test_bot_mode_uploads_a_file_and_sends_it(chat_page, standin):
    page, _ = chat_page()
    wait_text(page, "Sandbox bot")
    page.wait_for_selector(FILE_INPUT, state="attached")
    page.set_input_files(FILE_INPUT, files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello file"}])
    wait_text(page, "notes.txt")
    wait_text(page, REPLY)  # the file message was answered
    files = standin.files_of(ALICE)
    assert [(f["file_name"], f["bytes"]) for f in files] == [("notes.txt", 10)]
    assert ("POST", "/v1/files/upload") in calls(standin)
    upload = next(r for r in api_calls(standin) if r["path"] == "/v1/files/upload")
    assert upload["headers"]["content-type"].startswith("multipart/form-data")
    assert_only_real_tokens(standin, page)
    assert not page.errors


def test_bot_mode_clear_context_and_clear_messages(chat_page, standin):
    page, _ = chat_page()
    send(page, "remember me please")
    wait_text(page, REPLY + "remember me please")
    conv = next(r for r in api_calls(standin) if r["path"] == "/v3/chat")["query"].split("=", 1)[1]

    page.click(CLEAR_CONTEXT)
    wait_text(page, "Context cleared")
    assert ("POST", f"/v1/conversations/{conv}/clear") in calls(standin)

    standin.reset_observations()
    page.click(CLEAR_MESSAGES)
    page.wait_for_function("(t) => !document.body.innerText.includes(t)", arg="remember me please")
    assert calls(standin) == sorted([("POST", "/v1/conversation/create")])

    # The new conversation is the one a reload finds: the old messages stay gone.
    page.reload()
    wait_text(page, "Sandbox bot")
    send(page, "a fresh start")
    wait_text(page, REPLY + "a fresh start")
    assert "remember me please" not in page.inner_text("body")
    assert_only_real_tokens(standin, page)
    assert not page.errors


# ------------------------------------------------------------------------------------------ app mode

def test_app_mode_streams_the_answer(chat_page, standin):
    standin.delta_gap = 0.2
    page, _ = chat_page(mode="app")
    text = "alpha beta gamma delta epsilon zeta"
    t0 = send(page, text)
    first, full = watch_reply(page, text, t0)
    n = len((REPLY + text).split())
    assert first < full - 0.4 * n * 0.2, "the answer appeared all at once: the stream was buffered"
    seen = calls(standin)
    assert ("GET", f"/v1/apps/{APP}") in seen
    assert ("GET", f"/v1/workflows/{WORKFLOW}") in seen
    assert ("POST", "/v1/conversation/create") in seen
    assert seen[-1] == ("POST", "/v1/workflows/chat")
    create = next(r for r in api_calls(standin) if r["path"] == "/v1/conversation/create")
    assert create["headers"]["content-type"].startswith("application/json")
    assert_only_real_tokens(standin, page)
    assert page.evaluate("() => window.cozeChatLog.initSuccess") >= 1
    assert not page.errors


def test_app_mode_reload_shows_the_history(chat_page, standin):
    page, _ = chat_page(mode="app")
    send(page, "app history please")
    wait_text(page, REPLY + "app history please")
    page.reload()
    wait_text(page, REPLY + "app history please", timeout=8000)


def test_app_mode_uploads_a_file_and_clears(chat_page, standin):
    page, _ = chat_page(mode="app")
    page.wait_for_function("() => window.cozeChatLog.initSuccess > 0")
    page.wait_for_selector(FILE_INPUT, state="attached")
    page.set_input_files(FILE_INPUT, files=[{"name": "table.csv", "mimeType": "text/csv", "buffer": b"a,b\n1,2\n"}])
    wait_text(page, "table.csv")
    wait_text(page, REPLY)
    assert [f["file_name"] for f in standin.files_of(ALICE)] == ["table.csv"]
    assert ("POST", "/v1/workflows/chat") in calls(standin)
    standin.reset_observations()
    page.click(CLEAR_MESSAGES)
    page.wait_for_function("(t) => !document.body.innerText.includes(t)", arg="table.csv")
    assert calls(standin) == sorted([("POST", "/v1/conversation/create")])
    assert_only_real_tokens(standin, page)
    assert not page.errors


# ------------------------------------------------------------------------------------------ user ids

def test_a_short_user_id_like_cozes_examples_works(chat_page, standin):
    page, _ = chat_page(user="UserId1")
    send(page, "short id")
    wait_text(page, REPLY + "short id", timeout=10_000)
    assert_only_real_tokens(standin, page)


def test_a_page_that_is_not_allowed_shows_an_error_and_reaches_nothing(chat_page, standin):
    page, _ = chat_page(origins="https://elsewhere.example")
    wait_text(page, "Start error")  # the init error screen: a CORS failure carries no status or code to show
    body = page.inner_text("body")
    print(f"\nwhat the user sees on a page not in coze_origins: {body!r}; refreshes: "
          f"{page.evaluate('() => window.cozeChatLog.refreshes')}")
    assert standin.exchanges == []
    assert [r for r in standin.requests_seen if r["method"] != "OPTIONS"] == []


def test_a_4013_answer_to_a_chat_is_shown_to_the_user_as_the_answer(chat_page, standin):
    """Coze's way (HTTP 200, JSON {code: 4013, msg}) reaches the user: the component reads the unparsed JSON body
    as a stream `error` event and shows msg as the bot's answer for 4013/4027/4028/4033 (async-send-message.ts
    errorCodeListToShowInMessage). What a budget refusal by the proxy should look like (docs/chat-sdk-notes.md)."""
    page, _ = chat_page()
    wait_text(page, "Sandbox bot")
    standin.chat_mode = "rate_limited"
    send(page, "one more please")
    wait_text(page, "sandbox: request rate limit exceeded, retry later")
    assert page.evaluate("() => window.cozeChatLog.refreshes") == []
    assert_only_real_tokens(standin, page)


# ------------------------------------------------------------------------------------------ strict CSP

def _strict_page_session(chat_page, standin, mode: str):
    page, _ = chat_page(path="/strict", mode=mode)
    send(page, "strict page hello")
    wait_text(page, REPLY + "strict page hello")
    page.set_input_files(FILE_INPUT, files=[{"name": "pic.png", "mimeType": "image/png",
                                             "buffer": chat_page.server.files["/avatar.png"][1]}])
    page.wait_for_function("() => document.body.innerText.split('Sandbox reply to').length > 2")
    page.click(CLEAR_CONTEXT)
    wait_text(page, "Context cleared")
    time.sleep(0.5)  # late loads (fonts, images) report their violations
    return page, page.evaluate("() => window.cspViolations")


@pytest.mark.parametrize("mode", ["bot", "app"])
def test_strict_csp_page_gets_what_the_component_needs(chat_page, standin, mode):
    """default-src 'self' on an allowed origin: the proxy widens the policy; the API calls, the component's
    <style> elements and its data:/blob: images are allowed (violations other than the icon font's)."""
    page, violations = _strict_page_session(chat_page, standin, mode)
    print(f"\nCSP violations on the strict page ({mode} mode): {violations}")
    assert [v for v in violations if v["directive"] != "font-src"] == []
    assert_only_real_tokens(standin, page)
    assert not page.errors


def test_strict_csp_page_has_no_violation_at_all(chat_page, standin):
    page, violations = _strict_page_session(chat_page, standin, "bot")
    assert violations == []
