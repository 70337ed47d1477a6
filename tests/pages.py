"""Pages with the official Coze SDKs, for the browser tests (served by tests/browser.py's StaticServer).

* `build_chat_bundle` / `build_api_bundle`: esbuild bundles of @coze/chat-sdk (with React) and of @coze/api,
  from tests/js/node_modules (`npm ci` in tests/js; run_tests.py does it). `chat_sdk_missing()` /
  `api_sdk_missing()` say what is missing, for a skip reason.
* The chat component's page (`chat_page_files`) and the helpers that drive it and check what reached Coze.
"""

from __future__ import annotations

import re
import subprocess
import time

from tests.browser import CSS, HTML, ICON_PNG, SCRIPT, STRICT_CSP, StaticServer
from tests.conftest import REPO

JS = REPO / "tests" / "js"
ESBUILD = JS / "node_modules" / ".bin" / "esbuild"
CHAT_SDK = JS / "node_modules" / "@coze" / "chat-sdk"


# ------------------------------------------------------------------------------------------ @coze/api

def api_sdk_missing() -> str | None:
    if not ESBUILD.exists() or not (JS / "node_modules" / "@coze" / "api").is_dir():
        return "@coze/api or esbuild is not installed: run `npm ci` in tests/js (run_tests.py does)"
    return None


def build_api_bundle(out_dir) -> bytes:
    out = out_dir / "coze-api.js"
    subprocess.run([str(ESBUILD), "sdk/browser_entry.mjs", "--bundle", "--format=iife", "--global-name=CozeSDK",
                    "--platform=browser", f"--outfile={out}", "--log-level=error"],
                   cwd=str(JS), check=True, timeout=60, capture_output=True)
    return out.read_bytes()


# What a web app does with the SDK: a client with the placeholder token, one streamed chat.
STREAM_JS = """async ({baseURL, user, bot, text}) => {
    const coze = new CozeSDK.CozeAPI({token: 'user:' + user, baseURL});
    const t0 = performance.now();
    const events = [];
    let reply = '';
    const stream = await coze.chat.stream({
        bot_id: bot, user_id: user,
        additional_messages: [{role: CozeSDK.RoleType.User, content: text, content_type: 'text'}],
    });
    for await (const part of stream) {
        events.push({event: part.event, t: performance.now() - t0});
        if (part.event === CozeSDK.ChatEventType.CONVERSATION_MESSAGE_DELTA) reply += part.data.content;
    }
    const conv = await coze.conversations.create({bot_id: bot});
    return {reply, events, conversation: conv.id};
}"""


# ------------------------------------------------------------------------------------------ @coze/chat-sdk

CHAT_PAGE = "http://page.test"
CHAT_BOT = "7480000000000000001"
REPLY = "Sandbox reply to: "
TIMEOUT = 20_000
TOKEN_PATH = "/api/permission/oauth2/token"
HAS_TEXT = "(t) => document.body.innerText.includes(t)"
PAGE_CSS = b"html, body { margin: 0; height: 100%; } #chat { height: 100vh; width: 100vw; }"


def chat_sdk_missing() -> str | None:
    if not ESBUILD.exists() or not CHAT_SDK.is_dir() or not (JS / "node_modules" / "react-dom").is_dir():
        return "@coze/chat-sdk, react-dom or esbuild is not installed: run `npm ci` in tests/js (run_tests.py does)"
    return None


def build_chat_bundle(out_dir) -> dict[str, bytes]:
    """esbuild: the page's script (React + the component) and its stylesheet (the component's webCss)."""
    out = out_dir / "chat-sdk.js"
    subprocess.run([str(ESBUILD), "chat-sdk/entry.mjs", "--bundle", "--format=iife", "--platform=browser",
                    "--define:process.env.NODE_ENV=\"production\"", "--minify", f"--outfile={out}", "--log-level=error"],
                   cwd=str(JS), check=True, timeout=120, capture_output=True)
    return {"js": out.read_bytes(), "css": (out_dir / "chat-sdk.css").read_bytes()}


def chat_page_html(title: str) -> bytes:
    # No inline script or style: the page itself is fine under default-src 'self'.
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/chat-sdk.css"><link rel="stylesheet" href="/page.css">
<script src="/chat-sdk.js" defer></script></head>
<body><div id="chat"></div></body></html>""".encode()


def chat_page_server(bundle: dict[str, bytes]) -> StaticServer:
    """The component's page (plain, and with a strict CSP header at /strict), the bundle, the lazily loaded
    webpack chunk of the component, and a stand-in for its cdnBaseUrlPath folder (/cdn/*.png)."""
    chunk = (CHAT_SDK / "dist" / "lib-h5" / "chunk" / "316.js").read_bytes()
    files = {
        "/": (HTML, chat_page_html("@coze/chat-sdk on an allowed page"), {}),
        "/strict": (HTML, chat_page_html("@coze/chat-sdk on a strict CSP page"), {"Content-Security-Policy": STRICT_CSP}),
        "/chat-sdk.js": (SCRIPT, bundle["js"], {}),
        "/chat-sdk.css": (CSS, bundle["css"], {}),
        "/page.css": (CSS, PAGE_CSS, {}),
        "/chunk/316.js": (SCRIPT, chunk, {}),
        "/avatar.png": ("image/png", ICON_PNG, {}),
    }

    def cdn_image(path: str):
        return ("image/png", ICON_PNG, {}) if path.startswith("/cdn/") and path.endswith(".png") else None

    return StaticServer(files, fallback=cdn_image).start()


def api_calls(standin) -> list[dict]:
    return [r for r in standin.requests_seen if r["path"] != TOKEN_PATH]


def assert_only_real_tokens(standin, page=None, origin: str = CHAT_PAGE) -> None:
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
