"""Pages the browser tests open: one static page server, and the official Coze SDKs bundled for a page.

* `StaticServer` serves a fixed set of files on 127.0.0.1 (a free port) and records the paths asked for; the
  proxy's map_remote (or the page's own localhost origin) sends the browser there. Optionally it takes POSTs.
* `build_chat_bundle` / `build_api_bundle`: esbuild bundles of @coze/chat-sdk (with React) and of @coze/api,
  from tests/js/node_modules (`npm ci` in tests/js; run_tests.py does it). `chat_sdk_missing()` /
  `api_sdk_missing()` say what is missing, for a skip reason.
* The chat component's page (`chat_page_files`) and the helpers that drive it and check what reached Coze.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from tests.browser import ICON_PNG, STRICT_CSP
from tests.conftest import REPO

JS = REPO / "tests" / "js"
ESBUILD = JS / "node_modules" / ".bin" / "esbuild"
CHAT_SDK = JS / "node_modules" / "@coze" / "chat-sdk"
HTML = "text/html; charset=utf-8"
SCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a browser that is being closed resets its connections: not the test's business


class StaticServer:
    """files: path -> (content type, body, extra headers). `fallback(path)` may answer a path not in files
    (None: 404). `on_post(path, body)` takes POSTs (answered 204). Query strings are ignored."""

    def __init__(self, files: dict[str, tuple[str, bytes, dict]], *,
                 fallback: Callable[[str], tuple[str, bytes, dict] | None] | None = None,
                 on_post: Callable[[str, bytes], None] | None = None):
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, ctype: str, body: bytes, extra: dict) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for name, value in extra.items():
                    for v in value if isinstance(value, list) else [value]:
                        self.send_header(name, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                found = server.files.get(path) or (fallback(path) if fallback else None)
                if found is None:
                    return self._send(404, "text/plain", b"not found", {})
                self._send(200, *found)

            def do_POST(self):
                if on_post is None:
                    return self._send(405, "text/plain", b"no POST here", {})
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                on_post(self.path.split("?", 1)[0], self.rfile.read(length))
                self._send(204, "text/plain", b"", {})

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.origin = f"http://localhost:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


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

    return StaticServer(files, fallback=cdn_image)


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
