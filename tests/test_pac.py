"""The PAC file: only what coze-mitm must see goes through the proxy, everything else DIRECT.

The text is evaluated as a browser would (node, with FindProxyForURL called for URLs and hosts); the part
answers `GET /proxy.pac` sent straight to the proxy (origin-form) and http://coze.mitm/proxy.pac, naming
the proxy address the browser reached, and follows the running settings.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.pages import pac
from coze_mitm.parts.pac import Pac
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.parts.status import StatusPages

PAT = "pat_" + "S3cr3tPat" * 4

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def find_proxy(text: str, cases: list[tuple[str, str]]) -> list[str]:
    """FindProxyForURL(url, host) for each case, evaluated by node as plain JavaScript (no PAC helpers:
    the file uses none, so a browser without them gives the same answers)."""
    program = text + "\nprocess.stdout.write(JSON.stringify(" + json.dumps(cases) + \
        ".map(function (c) { return FindProxyForURL(c[0], c[1]); })));\n"
    out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- the text


class TestRender:
    TEXT = pac.render(
        "127.0.0.1:8080", ["coze.mitm", "mitm.it", "sandbox.coze.mitm"],
        ["https://api.coze.cn", "wss://ws.coze.cn", "https://chat.example.org", "http://localhost:3000",
         "http://[::1]:8790"],
    )

    @pytest.mark.process
    @needs_node
    def test_only_coze_hosts_through_the_proxy(self):
        proxy = "PROXY 127.0.0.1:8080"
        cases = {
            ("https://api.coze.cn/", "api.coze.cn"): proxy,
            ("https://API.Coze.CN./v3/chat", "API.Coze.CN."): proxy,  # case and a trailing dot
            ("wss://ws.coze.cn/v1/chat", "ws.coze.cn"): proxy,
            ("https://ws.coze.cn/", "ws.coze.cn"): proxy,  # Chromium asks for ws(s) as http(s)
            ("https://chat.example.org/", "chat.example.org"): proxy,
            ("http://localhost:3000/x", "localhost"): proxy,
            ("http://[::1]:8790/v3/chat", "[::1]"): proxy,
            ("http://coze.mitm/", "coze.mitm"): proxy,
            ("https://coze.mitm/ca-probe.png", "coze.mitm"): proxy,
            ("http://mitm.it/", "mitm.it"): proxy,
            ("http://sandbox.coze.mitm/v3/chat", "sandbox.coze.mitm"): proxy,
            # everything else, including other ports and schemes of the listed origins, goes direct
            ("http://api.coze.cn/", "api.coze.cn"): "DIRECT",
            ("https://chat.example.org:8443/", "chat.example.org"): "DIRECT",
            ("http://localhost:3001/", "localhost"): "DIRECT",
            ("https://www.coze.cn/", "www.coze.cn"): "DIRECT",
            ("https://example.org/", "example.org"): "DIRECT",
            ("https://api.coze.cn.evil.example/", "api.coze.cn.evil.example"): "DIRECT",
            ("https://xcoze.mitm/", "xcoze.mitm"): "DIRECT",
            ("http://outside.test:8000/", "outside.test"): "DIRECT",
        }
        got = find_proxy(self.TEXT, list(cases))
        assert dict(zip(cases, got)) == cases

    def test_no_direct_fallback_and_ascii(self):
        assert '"PROXY 127.0.0.1:8080"' in self.TEXT
        assert "; DIRECT" not in self.TEXT.replace("no \"; DIRECT\"", "")
        self.TEXT.encode("ascii")

    @pytest.mark.process
    @needs_node
    def test_the_file_without_a_login_names_no_origin_and_routes_the_same(self):
        """Issue 25: served despite proxyauth, the file listed the team's (intranet) origins to anyone. Salted,
        it names none of them and gives the browser the same answers."""
        origins = ["https://api.coze.cn", "wss://ws.coze.cn", "https://chat.example.org", "http://localhost:3000",
                   "http://[::1]:8790", "https://wiki.intranet.corp.example:8443"]
        hosts = ["coze.mitm", "mitm.it", "sandbox.coze.mitm"]
        plain = pac.render("127.0.0.1:8080", hosts, origins)
        private = pac.render("127.0.0.1:8080", hosts, origins, salt="0123456789abcdef")
        for name in ("api.coze.cn", "ws.coze.cn", "chat.example.org", "localhost", "::1", "8790", "intranet", "corp"):
            assert name not in private, name
        cases = [("https://api.coze.cn/", "api.coze.cn"), ("https://API.Coze.CN./v3/chat", "API.Coze.CN."),
                 ("wss://ws.coze.cn/v1/chat", "ws.coze.cn"), ("https://chat.example.org/", "chat.example.org"),
                 ("http://localhost:3000/x", "localhost"), ("http://[::1]:8790/v3/chat", "[::1]"),
                 ("https://wiki.intranet.corp.example:8443/a", "wiki.intranet.corp.example"),
                 ("https://wiki.intranet.corp.example/", "wiki.intranet.corp.example"),
                 ("http://coze.mitm/", "coze.mitm"), ("http://api.coze.cn/", "api.coze.cn"),
                 ("https://example.org/", "example.org"), ("http://localhost:3001/", "localhost"),
                 ("https://chat.example.org:8443/", "chat.example.org")]
        assert find_proxy(private, cases) == find_proxy(plain, cases)
        assert find_proxy(private, cases).count("DIRECT") == 5
        # the digest the JavaScript computes is SHA-256 (checked against hashlib, a non-ASCII and a 2-block text too)
        texts = ["", "abc", "a" * 100, "b\u00fccher.example 443"]
        program = private + "\nprocess.stdout.write(JSON.stringify(" + json.dumps(texts) + ".map(cozeDigest)));\n"
        out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30)
        import hashlib
        assert json.loads(out.stdout) == [hashlib.sha256(t.encode()).hexdigest() for t in texts]

    @pytest.mark.parametrize("proxy", ["", "127.0.0.1", "a b:8080", 'x";alert(1);":80', "host:80\n", "[::1]:8080x"])
    def test_odd_proxy_addresses_refused(self, proxy):
        with pytest.raises(ValueError):
            pac.render(proxy, [], [])

    @pytest.mark.process
    @needs_node
    def test_ipv6_proxy(self):
        assert find_proxy(pac.render("[::1]:8080", ["coze.mitm"], []), [["http://coze.mitm/", "coze.mitm"]]) == \
            ["PROXY [::1]:8080"]


# --------------------------------------------------------------------------- the part


@pytest.fixture
def tctx(tmp_path, pat_mode):
    ctx = pat_mode(Pac, StatusPages, pat=PAT, confdir=str(tmp_path), coze_origins="https://chat.example.org",
                   listen_host="127.0.0.1", listen_port=8080)
    ctx.part, ctx.status = ctx.parts
    return ctx


def pac_request(host: str, port: int = 80, path: str = "/proxy.pac", method: str = "GET", host_header: str | None = None,
                sockname=("127.0.0.1", 8080)):
    headers = tutils.treq().headers.__class__([(b"Host", (host_header or f"{host}:{port}").encode())])
    f = tflow.tflow(req=tutils.treq(method=method.encode(), scheme=b"http", host=host, port=port, authority=b"",
                                    path=path.encode(), headers=headers))
    f.client_conn.sockname = sockname
    return f


def answered(part: Pac, f) -> str | None:
    part.request(f)
    if f.response is None:
        return None
    assert f.response.status_code == 200
    assert f.response.headers["Content-Type"] == "application/x-ns-proxy-autoconfig"
    return f.response.get_text()


class TestPart:
    def test_origin_form_to_the_proxy_names_the_host_the_browser_reached(self, tctx):
        text = answered(tctx.part, pac_request("127.0.0.1", 8080))
        assert '"PROXY 127.0.0.1:8080"' in text
        text = answered(tctx.part, pac_request("localhost", 8080))
        assert '"PROXY localhost:8080"' in text

    def test_status_host_names_the_listen_address(self, tctx):
        text = answered(tctx.part, pac_request("coze.mitm", 80, sockname=("127.0.0.1", 8080)))
        assert '"PROXY 127.0.0.1:8080"' in text

    def test_bound_port_when_listen_port_is_0(self, tmp_path):
        settings = CozeSettings()
        part = Pac(settings)
        with taddons.context(settings, part) as ctx:
            ctx.configure(settings, confdir=str(tmp_path), coze_pat=PAT, listen_host="", listen_port=0)
            part._bound_port = 43210  # what running() reads from the proxyserver
            part.configure(set())
            assert '"PROXY 127.0.0.1:43210"' in answered(part, pac_request("coze.mitm", 80))
            assert '"PROXY 127.0.0.1:43210"' in answered(part, pac_request("127.0.0.1", 43210,
                                                                             sockname=("127.0.0.1", 43210)))

    def test_other_hosts_and_paths_are_not_answered(self, tctx):
        assert answered(tctx.part, pac_request("example.org", 80)) is None  # someone else's proxy.pac
        assert answered(tctx.part, pac_request("127.0.0.1", 9999)) is None  # another local port
        assert answered(tctx.part, pac_request("127.0.0.1", 8080, path="/other")) is None

    @pytest.mark.process
    def test_lists_the_running_settings(self, tctx):
        cases = [["https://api.coze.cn/", "api.coze.cn"], ["wss://ws.coze.cn/", "ws.coze.cn"],
                 ["https://chat.example.org/", "chat.example.org"], ["https://b.example/", "b.example"],
                 ["https://api.example.net/", "api.example.net"], ["http://sandbox.coze.mitm/", "sandbox.coze.mitm"],
                 ["http://mitm.it/", "mitm.it"], ["https://example.com/", "example.com"]]
        before = tctx.part.text()
        tctx.configure(tctx.part, coze_origins="https://b.example", coze_api_hosts="https://api.example.net",
                       coze_demo=True)
        after = tctx.part.text()
        if shutil.which("node"):
            p = "PROXY 127.0.0.1:8080"
            assert find_proxy(before, cases) == [p, p, p, "DIRECT", "DIRECT", "DIRECT", p, "DIRECT"]
            assert find_proxy(after, cases) == [p, p, "DIRECT", p, p, p, p, "DIRECT"]
        assert '"chat.example.org 443"' in before and '"chat.example.org 443"' not in after

    def test_post_refused_and_hostile_host_header_not_echoed(self, tctx):
        f = pac_request("127.0.0.1", 8080, method="POST")
        tctx.part.request(f)
        assert f.response.status_code == 405
        text = answered(tctx.part, pac_request("127.0.0.1", 8080, host_header='127.0.0.1:8080";alert(1)//'))
        assert "alert" not in text and '"PROXY 127.0.0.1:8080"' in text

    def test_status_json_names_the_pac_url(self, tctx):
        data = tctx.status.status()
        assert data["pac_url"] == "http://127.0.0.1:8080/proxy.pac"
        assert 'href="/proxy.pac"' in tctx.status.render_html()
        assert "http://127.0.0.1:8080/proxy.pac" in tctx.status.render_html()


# --------------------------------------------------------------------------- a real browser


class OutsideSite:
    """A site not on the PAC's list: outside.test, which Chromium resolves to 127.0.0.1 (--host-resolver-rules)
    and the proxy cannot resolve at all, so a request sent through the proxy could not load it."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        seen = self.hosts = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                seen.append(self.headers.get("Host", ""))
                body = b"<!doctype html><title>outside</title><p id=o>outside page</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://outside.test:{self._server.server_address[1]}/"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.process
def test_chromium_with_the_pac_chats_through_the_proxy_and_goes_direct_elsewhere(tmp_path_factory):
    """run_mitm.py --demo (a real mitmdump with the stand-in) and Chromium set up with --proxy-pac-url only:
    the demo page chats; outside.test loads directly and never reaches the proxy; with the proxy stopped,
    outside.test still loads and only the Coze (demo) page fails."""
    from tests.browser import RECORD_REPLY, launch_chromium, playwright_or_skip
    from tests.harness import Launcher

    sync_playwright = playwright_or_skip()
    outside = OutsideSite()
    proxy = Launcher(tmp_path_factory.mktemp("pac-browser"), "--demo", "-v").start()  # -v: every flow in the log
    pac_url = f"http://127.0.0.1:{proxy.port}/proxy.pac"
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p, None, f"--proxy-pac-url={pac_url}", "--host-resolver-rules=MAP outside.test 127.0.0.1")
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto("http://coze.mitm/demo")
                assert "SANDBOX" in page.inner_text(".sandbox")
                page.evaluate(RECORD_REPLY)
                page.fill("#message", "hello through the PAC")
                page.click("#send")
                page.wait_for_selector('.msg.bot[data-done="true"]', timeout=15_000)
                assert page.inner_text(".msg.bot") == "Sandbox reply to: hello through the PAC"
                assert proxy.wait_for_output(r"POST http://127\.0\.0\.1:\d+/v3/chat"), proxy.output  # via the proxy

                other = context.new_page()
                other.goto(outside.url)
                assert other.inner_text("#o") == "outside page"
                assert outside.hosts and all(h.startswith("outside.test:") for h in outside.hosts)
                time.sleep(0.5)
                assert "outside.test" not in proxy.output  # the proxy never saw it (-v logs every flow)
                assert re.search(r"GET http://127\.0\.0\.1:\d+/proxy\.pac", proxy.output), proxy.output  # asked of the proxy

                assert proxy.stop() == 0
                before = len(outside.hosts)
                fresh = browser.new_context().new_page()
                fresh.goto(outside.url)
                assert fresh.inner_text("#o") == "outside page" and len(outside.hosts) > before
                # The Coze (demo) page fails: through the stopped proxy (ERR_PROXY_CONNECTION_FAILED), or, once
                # Chromium could not fetch the PAC again and went direct, because only the proxy knows the name.
                with pytest.raises(Exception, match="ERR_PROXY_CONNECTION_FAILED|ERR_NAME_NOT_RESOLVED"):
                    fresh.goto("http://coze.mitm/demo", timeout=15_000)
            finally:
                browser.close()
    finally:
        proxy.stop()
        outside.stop()
    assert "coze-mitm: the proxy at" in proxy.output and "Traceback" not in proxy.output
