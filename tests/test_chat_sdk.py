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

import time
from urllib.parse import urlencode

import pytest

from tests.browser import launch_chromium, playwright_for_module
from tests.pages import (
    CHAT_BOT as BOT, CHAT_PAGE as PAGE, REPLY, TIMEOUT, api_calls, assert_only_real_tokens,
    build_chat_bundle, chat_page_server, chat_sdk_missing, send, wait_text, watch_reply,
)

APP = "7480000000000000002"
WORKFLOW = "7480000000000000003"
ALICE = "alice-chat-0001"
BOB = "bob-chat-0002"

sync_api = playwright_for_module()
if chat_sdk_missing():
    pytest.skip(chat_sdk_missing(), allow_module_level=True)


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
    return build_chat_bundle(tmp_path_factory.mktemp("chat-sdk"))


@pytest.fixture
def chat_page(bundle, mitmdump, config_file, standin):
    """chat_page(**query) -> (page, proxy): the component's page in a fresh headless Chromium whose proxy is a
    mitmdump allowing http://page.test. Query: mode (bot|app), user, path (/ or /strict), and more (see
    tests/js/chat-sdk/entry.mjs). page.errors: uncaught errors; page.console_errors: console.error lines."""
    server = chat_page_server(bundle)
    playwright = sync_api.sync_playwright().start()
    state = {}

    def open_(*, path: str = "/", user: str = ALICE, mode: str = "bot", origins: str = PAGE, **query):
        if "proxy" not in state:
            state["proxy"] = mitmdump(f"coze_config={config_file}", f"coze_origins={origins}",
                                      "connection_strategy=lazy",
                                      f"map_remote=|^http://page\\.test/|http://127.0.0.1:{server.port}/")
            state["browser"] = launch_chromium(playwright, state["proxy"].port)
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

FILE_INPUT = "input[type=file]"
CLEAR_CONTEXT = '[class*="command-container"] [class*="index-module__wrapper"]'  # left of the input
CLEAR_MESSAGES = '[class*="square-hover-btn"]'  # the header's right button (the broom)


def calls(standin) -> list[tuple[str, str]]:
    """The component's calls, sorted: it makes its start-up calls in parallel, so their order is the network's."""
    return sorted((r["method"], r["path"]) for r in api_calls(standin))


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
    # The answer's text is on screen a moment before its chat completes (the stand-in, like Coze, sends
    # conversation.chat.completed after the message): a file chosen while the component still streams is not
    # sent. So the upload waits for the chat to be completed.
    deadline = time.monotonic() + 20
    chats = standin.state.chats
    while time.monotonic() < deadline and not (chats and all(
            c["status"] not in ("created", "in_progress") for c in list(chats.values()))):
        time.sleep(0.05)
    picture = [{"name": "pic.png", "mimeType": "image/png", "buffer": chat_page.server.files["/avatar.png"][1]}]
    page.set_input_files(FILE_INPUT, files=picture)
    second_reply = "() => document.body.innerText.split('Sandbox reply to').length > 2"
    try:
        page.wait_for_function(second_reply, timeout=10_000)
    except Exception:  # the component had not taken the stream's end yet when the file was chosen: choose it again
        page.set_input_files(FILE_INPUT, files=picture)
        page.wait_for_function(second_reply)
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
