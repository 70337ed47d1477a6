"""End to end in headless Chromium, through a real mitmdump with the addons, against the Coze stand-in.

The real userscript (as http://coze.mitm/coze-chat.user.js serves it) runs on http://page.test in two
browser profiles; it loads a stand-in Chat SDK (tests/fixtures/fake_coze_sdk.js, served for
coze_sdk_url) that talks to the local Coze stand-in the way the real SDK talks to Coze. See
tests/browser.py for how hosts, the userscript manager and GM_xmlhttpRequest are emulated.
"""

from __future__ import annotations

import json
import re

import pytest

from coze_mitm.core.identity import short_id
from tests.browser import (
    BOT_ID, CDN, HTTPS_PAGE, NONCE_CSP, OTHER, PAGE, SDK_URL, STRICT_CSP, BrowserWorld, gm_xhr_binding,
    playwright_for_module, png_colour_stats, png_size, userscript_init_script,
)
from tests.clients import session

playwright_for_module()

pytestmark = pytest.mark.process  # every test here drives Chromium (run_tests.py --fast leaves them out)

TITLE = "Browser test chat"
DELTA_GAP = 0.08
USER_ID_RE = re.compile(r"\d{13}-[A-Za-z0-9_-]{22,}")


class Env(BrowserWorld):
    """One stand-in, one page server, one mitmdump and one browser for the whole module."""

    def __init__(self, tmp_path_factory, rsa_key):
        super().__init__(tmp_path_factory, rsa_key, f"coze_title={TITLE}", delta_gap=DELTA_GAP)
        self.rsa_key = rsa_key
        self.session = session(self.proxy)
        served = self.session.get("http://coze.mitm/coze-chat.user.js", timeout=10)
        served.raise_for_status()
        self.userscript = served.text
        self.userscript_content_type = served.headers["content-type"]
        self.contexts = []

    def profile(self, ignore_https_errors: bool = True):
        """A fresh browser profile with the userscript 'installed'."""
        context = self.browser.new_context(ignore_https_errors=ignore_https_errors, viewport={"width": 1100, "height": 900})
        context.set_default_timeout(15_000)
        context.expose_binding("cozeGmXhr", gm_xhr_binding(self.proxy.proxies))
        context.add_init_script(userscript_init_script(self.userscript))
        self.contexts.append(context)
        return context

    def secrets(self) -> list[str]:
        key_body = "".join(self.rsa_key["private_pem"].splitlines()[1:-1])
        return [e["access_token"] for e in self.standin.exchanges] + [key_body[:64], key_body[-64:]]

    def close(self):
        for context in self.contexts:
            context.close()
        super().close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, rsa_key):
    e = Env(tmp_path_factory, rsa_key)
    yield e
    e.close()


def open_chat(context, path="/", responses=None, base=PAGE):
    """Open a page, wait for the userscript to load the SDK and the SDK to be ready; returns (page, user id)."""
    page = context.new_page()
    if responses is not None:
        page.on("response", lambda r: responses.append(r))
    main = page.goto(base + path)
    page.wait_for_function("() => window.__fakeCozeClient || document.getElementById('coze-mitm-notice')")
    notice = page.evaluate("() => document.getElementById('coze-mitm-notice')?.innerText")
    assert not notice, f"the userscript showed a notice instead of the chat: {notice}"
    page.evaluate("() => window.__fakeCozeClient.ready")
    assert page.inner_text(".coze-fake-status") == "ready"
    user_id = page.evaluate("() => window.__cozeMitmClient.options.userInfo.id")
    return page, user_id, main


def send(page, text):
    return page.evaluate("(text) => window.__fakeCozeClient.send(text)", text)


def watch_reply(page):
    """Record (time, length) of the reply's text each time the DOM changes while it streams."""
    page.evaluate("""() => {
        window.__replyChanges = [];
        const box = document.querySelector('.coze-fake-messages');
        new MutationObserver(() => {
            const last = box.lastElementChild;
            if (last && last.dataset.role === 'assistant') window.__replyChanges.push([performance.now(), last.textContent.length]);
        }).observe(box, {childList: true, subtree: true, characterData: true});
    }""")


def page_visible_text(page) -> str:
    """Everything the page's own scripts could read: DOM, storage, the SDK's answers (bodies and headers)."""
    return page.evaluate("""() => JSON.stringify({
        html: document.documentElement.outerHTML,
        storage: Object.assign({}, localStorage),
        answers: window.__fakeCozeClient ? window.__fakeCozeClient.responses : [],
        resources: performance.getEntries().map((e) => e.name),
    })""")


def keeps_every_source(original: str, received: str) -> bool:
    """Every directive of the original policy is still there, with its sources first and in order."""
    got = {d.split()[0]: d.split()[1:] for d in received.split(";") if d.strip()}
    for d in original.split(";"):
        name, *sources = d.split()
        if got.get(name, [])[:len(sources)] != sources:
            return False
    return True


def test_served_userscript_is_filled_for_this_proxy(env):
    script = env.userscript
    assert env.userscript_content_type.startswith("text/javascript")
    assert re.findall(r"^// @match\s+(\S+)$", script, re.M) == [f"{PAGE}/*", f"{HTTPS_PAGE}/*"]
    assert f'  botId: "{BOT_ID}", // @coze-mitm botId' in script
    assert f'  title: "{TITLE}", // @coze-mitm title' in script
    assert f'  sdkUrl: "{SDK_URL}", // @coze-mitm sdkUrl' in script
    assert re.search(r"^// @version\s+\d+\.\d+\.\d+\.\d+$", script, re.M)
    assert "czs_" not in script and "pat_" not in script and "PRIVATE" not in script


def test_two_profiles_private_histories_streamed_no_secret(env):
    standin = env.standin
    responses_a, responses_b = [], []
    page_a, id_a, _ = open_chat(env.profile(), responses=responses_a)
    page_b, id_b, _ = open_chat(env.profile(), responses=responses_b)
    assert USER_ID_RE.fullmatch(id_a) and USER_ID_RE.fullmatch(id_b) and id_a != id_b

    watch_reply(page_a)
    question_a = "alpha one two three four five six"
    reply_a = send(page_a, question_a)
    assert reply_a == f"Sandbox reply to: {question_a}"
    assert send(page_b, "bravo question") == "Sandbox reply to: bravo question"

    # The reply was rendered delta by delta, as the stream arrived, not in one go at the end.
    changes = page_a.evaluate("() => window.__replyChanges")
    lengths = [n for _, n in changes]
    assert lengths == sorted(lengths) and lengths[-1] == len(reply_a)
    growth = [(t, n) for i, (t, n) in enumerate(changes) if n and (i == 0 or n != changes[i - 1][1])]
    assert len(growth) >= 6, changes
    spread_ms = growth[-1][0] - growth[0][0]
    assert spread_ms > 0.5 * DELTA_GAP * 1000 * (len(growth) - 1), changes

    # One token exchange per profile, each for its own session_name.
    assert standin.exchange_count(id_a) == 1
    assert standin.exchange_count(id_b) == 1
    assert standin.placeholder_seen == 0

    # B sees only its own history, and cannot read A's conversation.
    conv_a = page_a.evaluate("() => window.__fakeCozeClient.conversationId")
    hist_b = page_b.evaluate("() => window.__fakeCozeClient.history(window.__fakeCozeClient.conversationId)")
    assert [m["content"] for m in hist_b["data"]] == ["bravo question", "Sandbox reply to: bravo question"]
    refused = page_b.evaluate("(id) => window.__fakeCozeClient.history(id)", conv_a)
    assert refused["code"] == 4101
    assert question_a not in page_b.inner_text("body")

    # A's history comes back after a reload, with no new token exchange (cached per user).
    page_a.reload()
    page_a.wait_for_function("() => window.__fakeCozeClient")
    page_a.evaluate("() => window.__fakeCozeClient.ready")
    shown = page_a.locator(".coze-fake-msg").all_inner_texts()
    assert shown == [question_a, reply_a]
    assert page_a.evaluate("() => window.__cozeMitmClient.options.userInfo.id") == id_a
    assert standin.exchange_count(id_a) == 1

    # No secret anywhere the pages' scripts could see.
    secrets = env.secrets()
    assert len(secrets) >= 4
    for page, responses in ((page_a, responses_a), (page_b, responses_b)):
        seen = [page_visible_text(page)]
        for r in responses:
            seen.append(r.url + json.dumps(r.headers))
            if "event-stream" not in r.headers.get("content-type", ""):
                try:
                    seen.append(r.text())
                except Exception:  # redirects and aborted loads have no body
                    pass
        blob = "\n".join(seen)
        assert "czs_" not in blob
        for secret in secrets:
            assert secret not in blob
    # All the page ever holds is the placeholder naming its profile.
    assert page_a.evaluate("() => window.__cozeMitmClient.options.auth.token") == f"user:{id_a}"
    assert page_b.evaluate("() => window.__cozeMitmClient.options.auth.token") == f"user:{id_b}"


def test_every_web_chat_sdk_call_through_the_proxy(env):
    """The fake SDK's whole surface (the real SDK's calls, in its order) through the proxy, as one user."""
    standin = env.standin
    page, user_id, _ = open_chat(env.profile())
    client = "window.__fakeCozeClient"
    calls = page.evaluate(f"() => {client}.calls")
    assert sorted(calls[:2]) == sorted([f"GET /v1/bots/{BOT_ID}", "GET /v1/conversations"])  # together
    assert calls[2:] == ["POST /v1/conversation/create", "POST /v1/conversation/message/list"]

    uploaded = page.evaluate(f"() => {client}.upload('notes.txt', 'text/plain', 'hello file')")
    assert uploaded["bytes"] == len("hello file") and uploaded["file_name"] == "notes.txt"
    [stored] = standin.files_of(user_id)
    assert stored["id"] == uploaded["id"] and stored["content_type"] == "text/plain"
    assert page.evaluate(f"(id) => {client}.send('with a file', [id])", uploaded["id"]) == "Sandbox reply to: with a file"
    chat = page.evaluate(f"() => {client}.chat")
    assert chat["usage"] == standin.usage_of(user_id) and chat["usage"]["token_count"] == 3 + 6

    assert page.evaluate(f"(id) => {client}.feedback(id, 'thumbUp', 'good')", chat["answerId"])["code"] == 0
    assert standin.feedback_of(chat["answerId"])["feedback_type"] == "like"
    assert page.evaluate(f"(id) => {client}.feedback(id, 'default')", chat["answerId"])["code"] == 0
    assert standin.feedback_of(chat["answerId"]) is None
    assert page.evaluate(f"(id) => {client}.deleteMessage(id)", chat["answerId"])["data"]["id"] == chat["answerId"]
    assert page.evaluate(f"() => {client}.clearContext()")["code"] == 0

    # stop a reply while it streams (slowly: the cancel arrives long before the reply could be over)
    standin.delta_gap = 0.4
    try:
        page.evaluate(f"() => {{ window.__long = {client}.send('one two three four five six seven eight nine ten'); }}")
        page.wait_for_function(f"(old) => {client}.chat.id !== old && {client}.chat.answerId", arg=chat["id"])
        assert page.evaluate(f"() => {client}.cancel()")["data"]["status"] == "canceled"
        assert len(page.evaluate("() => window.__long")) < len("Sandbox reply to: one two three four five six seven eight nine ten")
    finally:
        standin.delta_gap = DELTA_GAP

    # the conversation list: rename, a new conversation, delete the old one
    first = page.evaluate(f"() => {client}.conversationId")
    renamed = page.evaluate(f"(id) => {client}.renameConversation(id, 'Renamed')", first)
    assert renamed["data"]["name"] == "Renamed"
    second = page.evaluate(f"() => {client}.clearHistory()")["data"]["id"]
    listed = page.evaluate(f"() => {client}.listConversations(1, 20)")["data"]["conversations"]
    assert [c["id"] for c in listed] == [second, first]
    assert page.evaluate(f"(id) => {client}.deleteConversation(id)", first)["code"] == 0
    assert [c["id"] for c in page.evaluate(f"() => {client}.listConversations()")["data"]["conversations"]] == [second]

    # what reached the sandbox: a real token (never the placeholder) and the SDK's headers
    assert standin.placeholder_seen == 0
    seen = [s for s in standin.requests_seen if s["method"] != "OPTIONS" and s["path"] != "/api/permission/oauth2/token"]
    ours = [s for s in seen if s["headers"].get("authorization") in {f"Bearer {t}" for t in standin.tokens_of(user_id)}]
    assert len(ours) == len(page.evaluate(f"() => {client}.calls"))
    assert all(json.loads(s["headers"]["x-coze-client-user-agent"])["browser"] == "chrome" for s in ours)
    assert all(s["headers"]["accept-language"] in ("en", "zh") for s in ours if s["path"] in ("/v3/chat", f"/v1/bots/{BOT_ID}"))
    [upload] = [s for s in ours if s["path"] == "/v1/files/upload"]
    assert upload["headers"]["content-type"].startswith("multipart/form-data; boundary=")


@pytest.mark.parametrize("base, path, policy", [
    (PAGE, "/strict", STRICT_CSP),
    (PAGE, "/meta", None),
    (PAGE, "/nonce", NONCE_CSP),
    (PAGE, "/two-policies", STRICT_CSP),
    (HTTPS_PAGE, "/strict", STRICT_CSP),
])
def test_page_with_strict_csp_still_loads_the_sdk(env, base, path, policy):
    context = env.profile()
    page, user_id, main = open_chat(context, path, base=base)
    assert main.url == base + path and main.status == 200
    if policy is not None:  # what the browser received: the page's policy, widened only by our sources
        received = main.headers_array()
        csp = [h["value"] for h in received if h["name"].lower() == "content-security-policy"]
        assert any(CDN in v for v in csp) and any(env.standin.base_url in v for v in csp), csp
        assert any(keeps_every_source(policy, v) for v in csp), csp
    assert send(page, f"csp {path}") == f"Sandbox reply to: csp {path}"
    # The SDK's stylesheet and image from its CDN were allowed too (style-src, img-src).
    assert page.evaluate("() => getComputedStyle(document.querySelector('.coze-fake-chat')).borderTopWidth") == "7px"
    assert page.evaluate("() => document.querySelector('.coze-fake-icon').naturalWidth") == 24
    if path == "/nonce":
        assert page.evaluate("() => window.pageOwnScript") == 1  # the page's own nonce script still runs


def test_without_the_proxy_change_the_csp_would_block_the_sdk(env):
    """Control: other.test is not in coze_origins, so its CSP stays as sent, and the SDK is refused there."""
    page = env.profile().new_page()
    violations = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{OTHER}/strict")
    result = page.evaluate("""(url) => new Promise((resolve) => {
        const s = document.createElement('script');
        s.src = url;
        s.onload = () => resolve('loaded');
        s.onerror = () => resolve('blocked');
        document.head.appendChild(s);
    })""", SDK_URL)
    assert result == "blocked"
    page.wait_for_timeout(100)  # console events arrive asynchronously
    assert any("script-src" in v or "default-src" in v for v in violations), violations
    assert page.evaluate("() => typeof window.CozeWebSDK") == "undefined"
    assert page.evaluate("() => document.getElementById('coze-mitm-notice')") is None  # @match: not run there


def test_status_page_renders_with_the_users(env, tmp_path):
    trusting = env.profile(ignore_https_errors=True)
    _, user_id, _ = open_chat(trusting)
    page = trusting.new_page()
    page.goto("http://coze.mitm/")
    page.wait_for_function("() => document.getElementById('ca-state').className !== 'muted'")
    assert page.get_attribute("#ca-state", "class") == "ok"  # the HTTPS probe loaded
    text = page.inner_text("body")
    assert short_id(user_id) in text and user_id not in text
    assert "JWT" in text and env.standin.base_url in text and PAGE in text and BOT_ID in text
    assert page.get_attribute("a.button", "href") == "/coze-chat.user.js"
    shot = tmp_path / "status.png"  # kept in pytest's tmp dir for a look after a failure
    page.screenshot(path=str(shot), full_page=True)
    png = shot.read_bytes()
    assert png_size(png)[0] == 1100 and len(png) > 20_000
    colours, non_background = png_colour_stats(trusting.new_page(), png)
    assert colours > 20 and non_background > 0.02, (colours, non_background)  # text, tables, colours: not blank
    content = page.content()
    for secret in env.secrets():
        assert secret not in content

    # The same page over https: the browser accepted the proxy's certificate.
    page.goto("https://coze.mitm/")
    assert "came over HTTPS" in page.inner_text("body")

    # A profile that does not accept the proxy's certificates is told so.
    sceptic = env.profile(ignore_https_errors=False).new_page()
    sceptic.goto("http://coze.mitm/")
    sceptic.wait_for_function("() => document.getElementById('ca-state').className !== 'muted'")
    assert sceptic.get_attribute("#ca-state", "class") == "bad"
    assert "does not trust the mitmproxy CA" in sceptic.inner_text("#ca-state")
    assert "http://mitm.it" in sceptic.inner_text("body")
