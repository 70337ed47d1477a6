"""Helpers for the headless-Chromium tests: the browser, a page server, the userscript's GM_* shim.

* Chromium is Debian's package driven by Playwright (`playwright install` cannot download browsers
  here); every request, loopback ones included, goes through the mitmdump under test.
* `PageServer` serves the test pages and the stand-in SDK. The browser asks for made-up hosts
  (http(s)://page.test, https://cdn.test, http://other.test); the proxy's map_remote sends them here,
  after coze-mitm has decided (from the host the browser asked for) that page.test is an allowed page.
* `userscript_init_script` wraps the REAL userscript, as coze-mitm serves it, the way a userscript
  manager runs it: only on its @match pages, not in frames, after DOMContentLoaded, with
  GM_getValue/GM_setValue kept per browser profile (the context's localStorage) and
  GM_xmlhttpRequest done outside the page (like Tampermonkey's, it is not subject to the page's
  CORS or CSP): here by Python, through the same proxy.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import struct
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

import requests

from tests.servers import Server

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HTML = "text/html; charset=utf-8"
SCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium",)
# The names PageServer serves behind the proxy's map_remote, and the stand-in SDK's bot.
PAGE = "http://page.test"
HTTPS_PAGE = "https://page.test"  # the same page over HTTPS, certificate made by the proxy
CDN = "https://cdn.test"  # https, so that https pages may load it too
OTHER = "http://other.test"
SDK_URL = f"{CDN}/sdk/index.js"
BOT_ID = "7350000000000000001"


def make_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A plain one-colour RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


ICON_PNG = make_png(24, 24, (77, 83, 232))
PAGE_NONCE = "t3stN0nce"


def find_chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):  # a file that is there but cannot run is no Chromium
            return path
    return shutil.which("chromium")


def playwright_for_module():
    """For a module whose every test drives Chromium: playwright.sync_api, or the whole module skips saying what
    is missing (Chromium, or the playwright package)."""
    import pytest
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium or `chromium` on PATH): browser tests skipped",
                    allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def playwright_or_skip():
    """Playwright's sync_playwright, or the test skips saying what is missing (the package, or Chromium)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        import pytest
        pytest.skip("playwright (python) is not installed: pip install -r requirements-dev.txt")
    if find_chromium() is None:
        import pytest
        pytest.skip("Chromium is not installed (/usr/bin/chromium or `chromium` on PATH): apt-get install chromium")
    return sync_playwright


# The demo page's bot bubbles as they grow: window.__replies holds each text the last bubble showed.
RECORD_REPLY = """() => {
  window.__replies = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.msg.bot');
    const last = bubbles[bubbles.length - 1];
    if (last && last.textContent && window.__replies[window.__replies.length - 1] !== last.textContent) {
      window.__replies.push(last.textContent);
    }
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


# Chromium makes no call of its own (mitmproxy-notes.md): only the test's requests reach the proxy.
CHROMIUM_FLAGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)


def chromium_args(proxy_port: int | None = None, *more: str, bypass: str | None = "<-loopback>") -> list[str]:
    """CHROMIUM_FLAGS, then the proxy (none when proxy_port is None) and its bypass list, then more. The default
    bypass list sends loopback (the Coze stand-in) through the proxy too; None keeps Chromium's own default."""
    args = list(CHROMIUM_FLAGS)
    if proxy_port is not None:
        args.append(f"--proxy-server=http://127.0.0.1:{proxy_port}")
        if bypass is not None:
            args.append(f"--proxy-bypass-list={bypass}")
    return args + list(more)


def launch_chromium(playwright, proxy_port: int | None = None, *more: str, bypass: str | None = "<-loopback>", **kw):
    """Debian's Chromium, headless, through Playwright (`playwright install` cannot download browsers here),
    with chromium_args(proxy_port, *more, bypass=bypass); kw goes to Playwright's launch (env, ...)."""
    return playwright.chromium.launch(executable_path=find_chromium(), headless=True,
                                      args=chromium_args(proxy_port, *more, bypass=bypass), **kw)


# ------------------------------------------------------------------------------------------ pages

def _page(title: str, head: str = "") -> bytes:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>{head}</head>
<body><h1>{title}</h1><p>An ordinary page on an allowed origin.</p></body></html>""".encode()


STRICT_CSP = "default-src 'self'"
NONCE_CSP = f"default-src 'self'; script-src 'nonce-{PAGE_NONCE}' 'strict-dynamic'; object-src 'none'; base-uri 'none'"
PAGES = {
    # path: (headers, body)
    "/": ({}, _page("Plain page")),
    "/strict": ({"Content-Security-Policy": STRICT_CSP}, _page("Strict CSP page")),
    "/meta": ({}, _page("Meta CSP page", f'<meta http-equiv="Content-Security-Policy" content="{STRICT_CSP}">')),
    "/nonce": ({"Content-Security-Policy": NONCE_CSP},
               _page("Nonce and strict-dynamic page", f'<script nonce="{PAGE_NONCE}">window.pageOwnScript = 1;</script>')),
    "/two-policies": ({"Content-Security-Policy": [STRICT_CSP, "frame-ancestors 'none'"]}, _page("Two policies")),
    "/gzip": ({"Content-Encoding": "gzip", "Content-Security-Policy": STRICT_CSP}, gzip.compress(_page("Compressed page"))),
}


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

        self._server = Server(Handler)
        self._server.quiet = True  # a browser that is being closed resets its connections: not the test's business
        self.port = self._server.port
        self.origin = f"http://localhost:{self.port}"

    def start(self):
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def map_remote(self, *hosts: str) -> list[str]:
        """mitmproxy map_remote specs sending http(s)://<host>/ to this server (plain http).

        For https the proxy must not try to reach the made-up host first: connection_strategy=lazy.
        """
        return [f"map_remote=|^https?://{re.escape(h)}/|http://127.0.0.1:{self.port}/" for h in hosts]


class PageServer(StaticServer):
    """The origin server behind page.test / cdn.test / other.test (they differ only in the URL the browser used):
    PAGES and the stand-in SDK."""

    def __init__(self, api_base: str):
        sdk = (FIXTURES / "fake_coze_sdk.js").read_text().replace("__COZE_API_BASE__", api_base)
        super().__init__({
            "/sdk/index.js": (SCRIPT, sdk.encode(), {}),
            "/sdk/sdk.css": (CSS, (FIXTURES / "fake_coze_sdk.css").read_bytes(), {}),
            "/sdk/icon.png": ("image/png", ICON_PNG, {}),
            **{path: (HTML, body, headers) for path, (headers, body) in PAGES.items()},
        })


class BrowserWorld:
    """What the page tests run in: the stand-in, PageServer behind page.test / cdn.test / other.test, a real
    mitmdump allowing PAGE and HTTPS_PAGE with the stand-in SDK as coze_sdk_url (and `sets`), and headless
    Chromium through it."""

    def __init__(self, tmp_path_factory, rsa_key, *sets: str, delta_gap: float):
        from playwright.sync_api import sync_playwright

        from sandbox.coze_standin import CozeStandIn
        from tests.conftest import CLIENT_ID, KID, write_config
        from tests.harness import Mitmdump

        self.standin = CozeStandIn(rsa_key["public_pem"], kid=KID, client_id=CLIENT_ID, delta_gap=delta_gap).start()
        self.pages = PageServer(self.standin.base_url).start()
        config = write_config(tmp_path_factory.mktemp("config"), rsa_key, self.standin.base_url)
        self.proxy = Mitmdump(tmp_path_factory.mktemp("mitm"), [
            f"coze_config={config}", f"coze_origins={PAGE},{HTTPS_PAGE}", f"coze_bot_id={BOT_ID}",
            f"coze_sdk_url={SDK_URL}", *sets, "connection_strategy=lazy",
            *self.pages.map_remote("page.test", "cdn.test", "other.test"),
        ]).start()
        self.playwright = sync_playwright().start()
        self.browser = launch_chromium(self.playwright, self.proxy.port)

    def close(self):
        self.browser.close()
        self.playwright.stop()
        self.proxy.stop()
        self.pages.stop()
        self.standin.stop()


# ------------------------------------------------------------------------------------------ the userscript

def _match_regex(pattern: str) -> str:
    """A userscript @match pattern (scheme://host/path with *) as a JS regex source."""
    return "^" + re.escape(pattern).replace(r"\*", ".*") + "$"


def userscript_init_script(script: str) -> str:
    """The served userscript wrapped like a userscript manager runs it (see the module docstring)."""
    matches = re.findall(r"^// @match\s+(\S+)\s*$", script, re.M)
    return f"""(() => {{
  if (window.top !== window) return;  // @noframes
  const MATCHES = {json.dumps([_match_regex(m) for m in matches])}.map((s) => new RegExp(s));
  if (!MATCHES.some((re) => re.test(location.href))) return;
  const STORE = 'coze-gm-shim:';
  function GM_getValue(key, fallback) {{
    const v = localStorage.getItem(STORE + key);
    return v === null ? fallback : JSON.parse(v);
  }}
  function GM_setValue(key, value) {{ localStorage.setItem(STORE + key, JSON.stringify(value)); }}
  function GM_registerMenuCommand() {{}}
  function GM_setClipboard() {{}}
  function GM_xmlhttpRequest(details) {{
    window.cozeGmXhr({{ method: details.method || 'GET', url: details.url, headers: details.headers || {{}} }})
      .then((res) => details.onload && details.onload(res),
            (err) => details.onerror && details.onerror({{ error: String(err) }}));
  }}
  const unsafeWindow = window;
  const run = () => {{
{script}
  }};
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', run, {{ once: true }});
  else run();
}})();
"""


def gm_xhr_binding(proxies: dict):
    """The Python side of GM_xmlhttpRequest: a request through the proxy, outside the page."""
    def handler(source, details):
        session = requests.Session()
        session.trust_env = False
        try:
            r = session.request(details.get("method", "GET"), details["url"], headers=details.get("headers") or {},
                                proxies=proxies, timeout=5)
        except requests.RequestException as e:
            raise RuntimeError(f"GM_xmlhttpRequest failed: {type(e).__name__}") from None
        return {"status": r.status_code, "statusText": r.reason, "responseText": r.text, "finalUrl": r.url}
    return handler


# ------------------------------------------------------------------------------------------ screenshots

def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header (and proof that it is one)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


# Decoding a screenshot in pure Python takes seconds; the browser's own decoder takes milliseconds.
PNG_STATS_JS = """async (b64) => {
    const img = new Image();
    img.src = 'data:image/png;base64,' + b64;
    await img.decode();
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const g = canvas.getContext('2d');
    g.drawImage(img, 0, 0);
    const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
    const counts = new Map();
    for (let i = 0; i < px.length; i += 4) {
        const key = (px[i] << 16) | (px[i + 1] << 8) | px[i + 2];
        counts.set(key, (counts.get(key) || 0) + 1);
    }
    const total = px.length / 4;
    return [counts.size, 1 - Math.max(...counts.values()) / total];
}"""


def png_colour_stats(page, data: bytes) -> tuple[int, float]:
    """(distinct colours, share of pixels unlike the most common colour) of a PNG, decoded by `page`'s browser."""
    png_size(data)
    return tuple(page.evaluate(PNG_STATS_JS, base64.b64encode(data).decode()))
