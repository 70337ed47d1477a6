"""coze_inject: the userscript's loader added by the proxy to allowed pages, so no userscript manager is needed.

Three levels: the pure rules (core/inject.py: where the hash goes in a policy, where the tag goes in a page), the part
on its own (mitmproxy's taddons: which responses it touches and which it leaves byte for byte), and headless Chromium
through a real mitmdump with NO extension and no init script: the chat appears and streams on allowed pages, pages
with a strict or nonce CSP included; a page where the userscript runs gets no second loader; a page outside
coze_origins gets nothing.
"""

from __future__ import annotations

import gzip
import re

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.core import inject
from coze_mitm.parts import inject as inject_part
from coze_mitm.parts.csp import Csp
from coze_mitm.parts.inject import Inject
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.parts.status import USERSCRIPT_PATH, StatusPages
from tests.browser import CDN, BrowserWorld
from tests.conftest import write_config

HASH = "'sha256-AAAA'"


# --------------------------------------------------------------------------- the rules

@pytest.mark.parametrize("policy, expected", [
    ("default-src 'self'", f"default-src 'self'; script-src 'self' {HASH}"),  # the fallback copied, plus ours
    ("script-src 'self'; img-src *", f"script-src 'self' {HASH}; img-src *"),
    ("script-src 'none'", f"script-src {HASH}"),
    ("script-src 'nonce-abc' 'strict-dynamic'", f"script-src 'nonce-abc' 'strict-dynamic' {HASH}"),
    ("script-src-elem https://cdn; script-src 'self'", f"script-src-elem https://cdn {HASH}; script-src 'self'"),
    # inline scripts allowed already: a hash would make browsers ignore 'unsafe-inline' for the page's own
    ("script-src 'self' 'unsafe-inline'", "script-src 'self' 'unsafe-inline'"),
    ("img-src 'self'; frame-ancestors 'none'", "img-src 'self'; frame-ancestors 'none'"),  # scripts unrestricted
    # 'unsafe-inline' beside 'strict-dynamic' or a nonce is ignored by browsers: the hash is needed there
    ("script-src 'unsafe-inline' 'strict-dynamic'", f"script-src 'unsafe-inline' 'strict-dynamic' {HASH}"),
])
def test_hash_added_only_where_the_script_policy_would_block_the_loader(policy, expected):
    new, changed = inject.allow_loader(policy, HASH)
    assert new == expected
    assert bool(changed) == (new != policy)


def test_each_policy_of_a_header_value_on_its_own():
    new, changed = inject.allow_loader("script-src 'self', default-src 'none'; script-src 'unsafe-inline'", HASH)
    assert new == f"script-src 'self' {HASH}, default-src 'none'; script-src 'unsafe-inline'"
    assert changed == ["script-src"]


def test_meta_policy_gets_the_hash_too():
    page = '<html><head><meta http-equiv="Content-Security-Policy" content="default-src \'self\'"></head><body>'
    new, changed = inject.allow_loader_in_meta(page, HASH)
    assert changed == ["script-src"] and "script-src &#x27;self&#x27; &#x27;sha256-AAAA&#x27;" in new


@pytest.mark.parametrize("page, expected", [
    ("<!doctype html><html><head><meta charset=utf-8><title>t</title></head><body>x",
     "<!doctype html><html><head><meta charset=utf-8><title>t</title>TAG</head><body>x"),
    ("<!DOCTYPE html><html><body class=a>x", "<!DOCTYPE html><html>TAG<body class=a>x"),
    ("<!doctype html><html lang=en><p>x", "<!doctype html><html lang=en>TAG<p>x"),
    ("<!doctype html>\n<p>x", "<!doctype html>TAG\n<p>x"),  # after the doctype, or the page falls into quirks mode
    ("<p>x", "TAG<p>x"),
])
def test_where_the_loader_goes(page, expected):
    tag = '<script data-coze-mitm="loader">S</script>'
    assert inject.insert_loader(page, "S") == expected.replace("TAG", tag)


def test_loader_text_cannot_end_its_script_element_and_hash_matches_it():
    template = USERSCRIPT_PATH.read_text(encoding="utf-8")
    hostile = template.replace('title: "Coze", // @coze-mitm title', 'title: "</script><!--<script>", // @coze-mitm title')
    script = inject.loader_script(hostile)
    assert "</script" not in script.lower() and "<!--" not in script and "<script" not in script.lower()
    assert '"<\\/script><\\!--<\\script>"' in script  # the same string once JavaScript reads it
    assert re.fullmatch(r"'sha256-[A-Za-z0-9+/]{43}='", inject.script_hash(script))


# --------------------------------------------------------------------------- the part

PAGE = "http://page.test"


@pytest.fixture
def part(tmp_path, rsa_key):
    config = write_config(tmp_path, rsa_key, "http://127.0.0.1:8790")
    settings = CozeSettings()
    status = StatusPages(settings)
    csp = Csp(settings)
    part = Inject(settings, status)
    with taddons.context(settings, status, csp, part) as tctx:
        tctx.configure(settings, confdir=str(tmp_path), coze_config=str(config),
                       coze_origins=f"{PAGE},http://coze.mitm", coze_inject=True, coze_bot_id="7350000000000000001")
        yield part, csp, tctx


def document(host="page.test", path="/", body=b"<!doctype html><html><head></head><body>hi</body></html>",
             headers=(), dest="document", status=200, method=b"GET"):
    req_headers = [(b"sec-fetch-dest", dest.encode())] if dest else []
    f = tflow.tflow(req=tutils.treq(method=method, scheme=b"http", host=host, port=80, authority=b"", path=path.encode(),
                                    headers=http.Headers(req_headers)))
    f.response = None
    return f, http.Response.make(status, body, [(b"content-type", b"text/html; charset=utf-8"), *headers])


def through(part, csp, flow, response):
    """What the proxy does with a document: the request hooks, then the response hooks (csp before inject)."""
    csp.request(flow)
    part.request(flow)
    flow.response = response
    csp.responseheaders(flow)
    csp.response(flow)
    part.response(flow)
    return flow.response


def test_allowed_page_gets_the_loader_once_and_its_hash_in_the_csp(part):
    part, csp, _ = part
    f, response = document(headers=[(b"content-security-policy", b"default-src 'self'")])
    out = through(part, csp, f, response)
    text = out.get_text()
    assert text.count('<script data-coze-mitm="loader">') == 1
    script = re.search(r'<script data-coze-mitm="loader">(.*)</script></head>', text, re.S).group(1)
    assert inject.script_hash(script) in out.headers["content-security-policy"]
    assert '7350000000000000001' in script  # the served userscript's filled config
    assert "chat loader added" in f.comment


def test_compressed_page_is_injected_and_stays_compressed(part):
    part, csp, _ = part
    body = b"<!doctype html><html><head><title>z</title></head><body>zipped</body></html>"
    f, response = document(body=gzip.compress(body), headers=[(b"content-encoding", b"gzip")])
    out = through(part, csp, f, response)
    assert out.headers["content-encoding"] == "gzip"
    assert gzip.decompress(out.raw_content).count(b'data-coze-mitm="loader"') == 1


@pytest.mark.parametrize("case", ["other origin", "status host", "frame", "fetch", "not html", "error status",
                                  "streamed", "too big", "undecodable", "head", "option off"])
def test_left_exactly_as_it_came(part, case, monkeypatch):
    part, csp, tctx = part
    kwargs = {"other origin": dict(host="other.test"), "status host": dict(host="coze.mitm", path="/demo"),
              "frame": dict(dest="iframe"), "fetch": dict(dest="empty"), "error status": dict(status=404),
              "head": dict(method=b"HEAD")}.get(case, {})
    f, response = document(**kwargs)
    if case == "not html":
        response.headers["content-type"] = "application/json"
    if case == "streamed":
        response.stream = True
    if case == "too big":
        monkeypatch.setattr(inject_part, "MAX_PAGE", 20)
    if case == "undecodable":
        response.headers["content-encoding"] = "gzip"  # but the body is not gzip
    if case == "option off":
        tctx.options.coze_inject = False
    before = (response.raw_content, list(response.headers.fields))
    out = through(part, csp, f, response)
    assert (out.raw_content, list(out.headers.fields)) == before
    assert b"data-coze-mitm" not in (out.raw_content or b"")


def test_a_304_gets_the_hash_its_cached_page_needs(part):
    part, csp, _ = part
    first, response = document(headers=[(b"content-security-policy", b"script-src 'self'")])
    script = re.search(r'<script data-coze-mitm="loader">(.*)</script>', through(part, csp, first, response).get_text(),
                       re.S).group(1)
    again, not_modified = document(status=304, body=b"", headers=[(b"content-security-policy", b"script-src 'self'")])
    out = through(part, csp, again, not_modified)
    policy = out.headers["content-security-policy"]
    assert policy.startswith("script-src 'self' ") and policy.endswith(f" {inject.script_hash(script)}")


# --------------------------------------------------------------------------- in a browser with no extension

class InjectEnv(BrowserWorld):
    def __init__(self, tmp_path_factory, rsa_key):
        super().__init__(tmp_path_factory, rsa_key, "coze_inject=true", delta_gap=0.05)
        self.cdn = CDN


@pytest.fixture(scope="module")
def env(tmp_path_factory, rsa_key):
    from tests.browser import find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium): browser tests skipped")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    e = InjectEnv(tmp_path_factory, rsa_key)
    yield e
    e.close()


USER_ID_RE = re.compile(r"\d{13}-[A-Za-z0-9_-]{22}")


@pytest.mark.process  # mitmdump and Chromium (the env fixture)
@pytest.mark.parametrize("path", ["/", "/strict", "/meta", "/nonce", "/gzip"])
def test_allowed_page_shows_a_working_chat_without_any_extension(env, path):
    context = env.browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        problems = []
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(PAGE + path)
        page.wait_for_function("() => window.__fakeCozeClient || document.getElementById('coze-mitm-notice')")
        assert page.evaluate("() => document.getElementById('coze-mitm-notice')") is None
        page.evaluate("() => window.__fakeCozeClient.ready")
        assert page.evaluate("() => window.__cozeMitmInjected") == "running"
        user_id = page.evaluate("() => localStorage.getItem('coze-mitm:coze_user_id')")
        assert USER_ID_RE.fullmatch(user_id)  # the userscript's format, kept in this origin's storage
        assert page.evaluate("() => window.__cozeMitmClient.options.auth.token") == f"user:{user_id}"
        reply = page.evaluate("(t) => window.__fakeCozeClient.send(t)", f"injected {path}")
        assert reply == f"Sandbox reply to: injected {path}"
        assert env.standin.exchange_count(user_id) == 1 and env.standin.placeholder_seen == 0
        if path == "/nonce":
            assert page.evaluate("() => window.pageOwnScript") == 1  # the page's own nonce script still runs
        assert not [p for p in problems if "script-src" in p], problems
        # The same id after a reload: the chat history stays this user's.
        page.reload()
        page.wait_for_function("() => window.__fakeCozeClient")
        page.evaluate("() => window.__fakeCozeClient.ready")
        assert page.evaluate("() => window.__cozeMitmClient.options.userInfo.id") == user_id
    finally:
        context.close()


@pytest.mark.process  # mitmdump and Chromium (the env fixture)
def test_page_with_the_userscript_gets_no_second_loader(env):
    from tests.browser import gm_xhr_binding, userscript_init_script

    served = requests.get("http://coze.mitm/coze-chat.user.js", proxies=env.proxy.proxies, timeout=10).text
    context = env.browser.new_context(ignore_https_errors=True)  # the SDK's stand-in CDN is https
    try:
        context.expose_binding("cozeGmXhr", gm_xhr_binding(env.proxy.proxies))
        context.add_init_script(userscript_init_script(served))
        context.add_init_script("""(() => {
            window.__clients = 0;
            Object.defineProperty(window, 'CozeWebSDK', {configurable: true, set(sdk) {
                const Real = sdk.WebChatClient;
                sdk.WebChatClient = function (options) { window.__clients += 1; return new Real(options); };
                Object.defineProperty(window, 'CozeWebSDK', {value: sdk, writable: true, configurable: true});
            }});
        })();""")
        page = context.new_page()
        page.goto(PAGE + "/")
        page.wait_for_function("() => window.__cozeMitmInjected")  # the injected loader had its turn
        assert page.evaluate("() => window.__cozeMitmInjected") == "stood down"
        page.wait_for_function("() => window.__fakeCozeClient")
        page.evaluate("() => window.__fakeCozeClient.ready")
        assert page.evaluate("() => window.__clients") == 1
        assert page.evaluate("() => document.querySelectorAll('#coze-mitm-sdk').length") == 1
        gm_id = page.evaluate("() => JSON.parse(localStorage.getItem('coze-gm-shim:coze_user_id'))")
        assert page.evaluate("() => window.__cozeMitmClient.options.userInfo.id") == gm_id  # the userscript's user
        assert page.evaluate("() => localStorage.getItem('coze-mitm:coze_user_id')") is None
    finally:
        context.close()


@pytest.mark.process  # mitmdump and Chromium (the env fixture)
def test_page_outside_coze_origins_gets_nothing(env):
    context = env.browser.new_context()
    try:
        page = context.new_page()
        main = page.goto("http://other.test/")
        body = main.body()
        from tests.browser import PAGES

        assert body == PAGES["/"][1]  # byte for byte what the site sent
        assert page.evaluate("() => document.querySelector('script[data-coze-mitm]')") is None
        assert page.evaluate("() => window.__cozeMitmInjected === undefined && !window.CozeWebSDK")
    finally:
        context.close()
