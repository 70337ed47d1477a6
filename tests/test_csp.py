"""CSP of allowed pages: exactly the Chat SDK's sources added, nothing else weakened.

The first half tests the pure rewriting (csp_policy.py), including a property test against a small
model of how a browser picks the directive that governs a load; the second half the addon (csp.py)
with mitmproxy's test helpers.
"""

from __future__ import annotations

import gzip
import logging

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from mitmproxy.test import tflow, tutils

from coze_mitm.core import csp_policy
from coze_mitm.flowmeta import CSP_PAGE
from coze_mitm.parts.csp import Csp
from coze_mitm.core.csp_meta import patch_meta_tags
from coze_mitm.core.csp_policy import (
    CHAINS, CN_SDK_URL, OVERSEA_SDK_URL, parse_extra, patch_header_value, patch_policy, resolve_sdk_url, sdk_needs,
)

CDN = "https://lf-cdn.coze.cn"
API = "https://api.coze.cn"
NEEDS = sdk_needs(CN_SDK_URL, [API])


def directives(policy: str) -> dict[str, list[str]]:
    """name -> sources, first occurrence only (as browsers read it)."""
    out: dict[str, list[str]] = {}
    for part in policy.split(";"):
        tokens = part.split()
        if tokens and tokens[0].lower() not in out:
            out[tokens[0].lower()] = tokens[1:]
    return out


def effective(policy: str, kind: str) -> list[str] | None:
    """The sources governing a `kind` load, None when nothing restricts it."""
    d = directives(policy)
    for name in CHAINS[kind]:
        if name in d:
            return d[name]
    return None


class TestNeeds:
    def test_sdk_needs_are_the_cdn_the_api_and_what_the_sdk_inlines(self):
        assert NEEDS == {
            "script-src": (CDN,), "style-src": (CDN, "'unsafe-inline'"), "img-src": (CDN, "data:", "blob:"),
            "font-src": (CDN, "data:"), "media-src": (CDN,), "frame-src": (CDN,), "connect-src": (API,),
        }
        # <style> elements, data:/blob: images and a data: icon font (@coze/chat-sdk's) only: no inline script, no
        # eval, no wildcard.
        inlined = {("style-src", "'unsafe-inline'"), ("img-src", "data:"), ("img-src", "blob:"), ("font-src", "data:")}
        for directive, sources in NEEDS.items():
            for s in sources:
                if (directive, s) not in inlined:
                    assert not (s.startswith("'") or s.endswith(":") or "*" in s), (directive, s)

    def test_several_api_origins_and_extras(self):
        needs = sdk_needs("http://cdn.test:8000/sdk/index.js", ["http://127.0.0.1:9000", API],
                          parse_extra("img-src https://img.example data:; font-src https://fonts.example"))
        assert needs["script-src"] == ("http://cdn.test:8000",)
        assert needs["connect-src"] == ("http://127.0.0.1:9000", API)
        assert needs["img-src"] == ("http://cdn.test:8000", "data:", "blob:", "https://img.example")
        assert needs["font-src"] == ("http://cdn.test:8000", "data:", "https://fonts.example")

    def test_no_sdk_url_still_lets_the_api_in(self):
        assert sdk_needs(None, [API]) == {"connect-src": (API,)}

    def test_resolve_sdk_url(self):
        assert resolve_sdk_url("", [API]) == CN_SDK_URL
        assert resolve_sdk_url("", ["https://api.coze.com"]) == OVERSEA_SDK_URL
        assert resolve_sdk_url("", ["http://127.0.0.1:8790"]) == CN_SDK_URL
        assert resolve_sdk_url(" https://x.example/sdk.js ", [API]) == "https://x.example/sdk.js"
        for bad in ("ftp://x.example/a.js", "javascript:alert(1)", "https://", "https://x.example/a b.js",
                    'https://x.example/"a.js'):
            with pytest.raises(ValueError, match="coze_sdk_url"):
                resolve_sdk_url(bad, [API])

    @pytest.mark.parametrize("spec, fix", [
        ("frame-ancestors *", "not a fetch directive"),
        ("sandbox allow-scripts", "not a fetch directive"),
        ("img-src", "lists no source"),
        ("script-src 'nonce-abc'", "not a source"),
        ("script-src 'strict-dynamic'", "not a source"),
        ("img-src 'none'", "not a source"),
        ("img-src *", "not a source"),
        ("img-src https://a.example\"", "not a source"),
        ("img-src <b>", "not a source"),
    ])
    def test_extra_refuses_what_is_not_a_plain_source(self, spec, fix):
        with pytest.raises(ValueError, match=fix):
            parse_extra(spec)

    def test_extra_accepts_plain_sources(self):
        assert parse_extra(" ; style-src 'unsafe-inline' https://*.example.com:443/css/ ;") == {
            "style-src": ("'unsafe-inline'", "https://*.example.com:443/css/"),
        }


class TestPatchPolicy:
    def test_default_src_only_gets_a_copy_per_kind(self):
        new, changed = patch_policy("default-src 'self'", NEEDS)
        d = directives(new)
        assert d["default-src"] == ["'self'"]  # the fallback itself is never widened
        assert d["script-src"] == ["'self'", CDN]
        assert d["connect-src"] == ["'self'", API]
        assert set(changed) == set(NEEDS)

    def test_own_directive_widened_in_place(self):
        new, changed = patch_policy("script-src 'self' https://cdn.example; img-src 'self'", NEEDS)
        assert new == f"script-src 'self' https://cdn.example {CDN}; img-src 'self' {CDN} data: blob:"
        assert changed == ["script-src", "img-src"]

    def test_none_is_replaced_by_the_sources(self):
        new, _ = patch_policy("default-src 'none'; script-src 'none'", NEEDS)
        d = directives(new)
        assert d["default-src"] == ["'none'"]
        assert d["script-src"] == [CDN]
        assert d["style-src"] == [CDN, "'unsafe-inline'"] and d["connect-src"] == [API]

    def test_nonces_hashes_and_strict_dynamic_kept(self):
        policy = "script-src 'nonce-r4nd0m' 'sha256-abc=' 'strict-dynamic' https: 'unsafe-inline'; object-src 'none'"
        new, changed = patch_policy(policy, NEEDS)
        assert new is policy and changed == []  # https: already allows the CDN: nothing to do
        policy = "script-src 'nonce-r4nd0m' 'strict-dynamic'"
        new, _ = patch_policy(policy, NEEDS)
        assert new == f"script-src 'nonce-r4nd0m' 'strict-dynamic' {CDN}"

    def test_policy_without_restrictions_is_returned_unchanged(self):
        for policy in ("", "frame-ancestors 'none'", "upgrade-insecure-requests", "report-uri /r; sandbox",
                       "  frame-ancestors 'self' ;  "):
            new, changed = patch_policy(policy, NEEDS)
            assert new is policy and changed == []

    def test_already_allowed_sources_not_repeated(self):
        policy = f"script-src *; style-src https: 'unsafe-inline'; img-src {CDN}/ blob: DATA:; font-src http: data:; " \
                 f"media-src {CDN.upper()}; frame-src *; connect-src {API}"
        assert patch_policy(policy, NEEDS) == (policy, [])

    def test_star_does_not_cover_a_scheme_or_keyword(self):
        needs = {"img-src": ("data:",), "style-src": ("'unsafe-inline'",)}
        new, _ = patch_policy("img-src *; style-src *", needs)
        assert new == "img-src * data:; style-src * 'unsafe-inline'"

    def test_frame_src_falls_back_to_child_src_which_stays_as_it_was(self):
        new, _ = patch_policy("child-src 'self'", {"frame-src": (CDN,)})
        assert new == f"child-src 'self'; frame-src 'self' {CDN}"

    def test_elem_directive_governs_script_elements(self):
        policy = "script-src 'self'; script-src-elem 'self' 'nonce-a'"
        new, changed = patch_policy(policy, {"script-src": (CDN,)})
        assert new == f"script-src 'self'; script-src-elem 'self' 'nonce-a' {CDN}"
        assert changed == ["script-src-elem"]

    def test_repeated_directive_only_first_counts(self):
        new, _ = patch_policy("script-src 'self'; script-src https://evil.example", {"script-src": (CDN,)})
        assert new == f"script-src 'self' {CDN}; script-src https://evil.example"

    def test_directive_names_are_case_insensitive_and_spacing_tolerated(self):
        new, _ = patch_policy("  Script-Src\t'self'  ;;IMG-SRC 'self'", {"script-src": (CDN,), "img-src": (CDN,)})
        assert new == f"script-src 'self' {CDN}; img-src 'self' {CDN}"

    def test_several_policies_in_one_header_each_patched(self):
        value = "default-src 'self', script-src 'none'; frame-ancestors 'none'"
        new, changed = patch_header_value(value, {"script-src": (CDN,)})
        first, second = new.split(",")
        assert directives(first)["script-src"] == ["'self'", CDN]
        assert directives(second)["script-src"] == [CDN]
        assert directives(second)["frame-ancestors"] == ["'none'"]
        assert changed == ["script-src"]
        assert patch_header_value("frame-ancestors 'none', sandbox", NEEDS) == ("frame-ancestors 'none', sandbox", [])

    def test_sdk_styles_and_images_follow_the_fallback_rules(self):
        new, _ = patch_policy("default-src 'self'", NEEDS)
        d = directives(new)
        assert d["default-src"] == ["'self'"]
        assert d["style-src"] == ["'self'", CDN, "'unsafe-inline'"]
        assert d["img-src"] == ["'self'", CDN, "data:", "blob:"]
        assert "'unsafe-inline'" not in d["script-src"] and "data:" not in d["script-src"]
        # The element directive governs <style> elements: it gets 'unsafe-inline', style-src stays.
        new, changed = patch_policy("style-src 'nonce-a'; style-src-elem 'self'", NEEDS)
        assert directives(new)["style-src-elem"] == ["'self'", CDN, "'unsafe-inline'"]
        assert directives(new)["style-src"] == ["'nonce-a'"]
        assert not csp_policy.inline_styles_blocked(new)

    @pytest.mark.parametrize("policy", [
        "default-src 'self'; style-src 'self' 'nonce-r4nd0m'",
        "style-src 'sha256-AbC=' 'unsafe-inline'",
        "default-src 'self' 'NONCE-x'",  # the fallback's nonce is copied into the new style-src
        "script-src 'self', style-src-elem 'sha384-x'",  # the second policy of a header value
    ])
    def test_no_unsafe_inline_next_to_a_nonce_or_hash(self, policy):
        new, _ = patch_header_value(policy, NEEDS)
        for one in new.split(","):
            style = effective(one, "style-src")
            if style is not None and csp_policy.has_nonce_or_hash(style):
                assert "'unsafe-inline'" not in style or "'unsafe-inline'" in policy
                assert CDN in style  # the stylesheet from the CDN still gets in
        assert csp_policy.inline_styles_blocked(new) and csp_policy.inline_styles_blocked(policy)

    def test_inline_styles_not_blocked_without_nonce_or_hash(self):
        for policy in ("default-src 'self'", "script-src 'nonce-a'", "style-src 'self'", "", "img-src 'sha256-x'"):
            assert not csp_policy.inline_styles_blocked(patch_header_value(policy, NEEDS)[0])

    def test_idempotent(self):
        for policy in ("default-src 'self'", "default-src 'none'; script-src 'nonce-x' 'strict-dynamic'",
                       "child-src 'self'; img-src 'none'"):
            once, _ = patch_header_value(policy, NEEDS)
            assert patch_header_value(once, NEEDS) == (once, [])


SOURCES = ["'self'", "'none'", "'unsafe-inline'", "'unsafe-eval'", "'strict-dynamic'", "'nonce-abc'",
           "'sha256-AAAA'", "https:", "http:", "data:", "*", "https://a.example", CDN, API, "*.coze.cn"]
NAMES = list({name for chain in CHAINS.values() for name in chain}) + [
    "frame-ancestors", "report-uri", "sandbox", "upgrade-insecure-requests", "base-uri", "form-action"]
directive_st = st.tuples(st.sampled_from(NAMES), st.lists(st.sampled_from(SOURCES), max_size=4))
policy_st = st.lists(directive_st, max_size=7).map(
    lambda ds: "; ".join(" ".join([n, *s]) for n, s in ds))


@hsettings(max_examples=400, deadline=None)
@given(policy_st)
def test_property_nothing_weakened_beyond_the_needed_sources(policy):
    """For every kind of load: the governing sources only gain needed sources; 'none' is the only loss."""
    new, changed = patch_policy(policy, NEEDS)
    needed = {s for sources in NEEDS.values() for s in sources}
    # Directives coze-mitm never changes keep their exact sources.
    before, after = directives(policy), directives(new)
    for name in ("default-src", "child-src", "frame-ancestors", "sandbox", "report-uri", "base-uri", "form-action"):
        assert after.get(name) == before.get(name)
    for kind in CHAINS:
        old, now = effective(policy, kind), effective(new, kind)
        if old is None:
            assert now is None  # never restricts what was unrestricted
            continue
        assert set(old) - {"'none'"} <= set(now)
        assert set(now) - set(old) <= needed
        if now != old:  # a changed list never keeps a 'none' (that would still block, or mean nothing)
            assert "'none'" not in now
        nonce_or_hash = csp_policy.has_nonce_or_hash(now)
        if nonce_or_hash and "'unsafe-inline'" not in old:  # browsers would ignore it there: never added
            assert "'unsafe-inline'" not in now
        if kind in NEEDS:  # and what the SDK needs is allowed afterwards
            for source in NEEDS[kind]:
                if source == "'unsafe-inline'" and nonce_or_hash:
                    continue
                assert csp_policy._allows(now, source)
    assert patch_policy(new, NEEDS) == (new, [])  # idempotent


class TestMeta:
    def test_meta_in_head_patched_and_escaped(self):
        doc = ("<!doctype html><html><head><meta charset=utf-8>"
               "<META HTTP-EQUIV='Content-Security-Policy' CONTENT=\"default-src &#39;self&#39;\">"
               "<title>x</title></head><body><p>hi</p></body></html>")
        new, changed = patch_meta_tags(doc, {"script-src": (CDN,)})
        assert changed == ["script-src"]
        assert f"CONTENT=\"default-src &#x27;self&#x27;; script-src &#x27;self&#x27; {CDN}\"" in new
        assert new.replace(new[new.index("CONTENT="):new.index("<title>") - 1], "") == \
            doc.replace(doc[doc.index("CONTENT="):doc.index("<title>") - 1], "")

    def test_unquoted_attribute_and_self_closing(self):
        doc = '<head><meta http-equiv=content-security-policy content="script-src \'self\'"/></head>'
        new, _ = patch_meta_tags(doc, {"script-src": (CDN,)})
        assert new == f'<head><meta http-equiv=content-security-policy content="script-src &#x27;self&#x27; {CDN}"/></head>'

    def test_only_the_head_is_touched(self):
        tag = '<meta http-equiv="Content-Security-Policy" content="script-src \'self\'">'
        doc = f"<html><head><title>t</title></head><body>{tag}<script>var s = '{tag}';</script></body></html>"
        assert patch_meta_tags(doc, NEEDS) == (doc, [])
        doc = f"<html><body>{tag}</body>"
        assert patch_meta_tags(doc, NEEDS) == (doc, [])

    def test_other_meta_tags_and_report_only_left_alone(self):
        doc = ('<head><meta name="Content-Security-Policy" content="script-src \'self\'">'
               '<meta http-equiv="Content-Security-Policy-Report-Only" content="script-src \'self\'">'
               '<meta http-equiv="refresh" content="5"></head>')
        assert patch_meta_tags(doc, NEEDS) == (doc, [])

    def test_hostile_extra_cannot_break_out_of_the_attribute(self):
        # parse_extra refuses quotes; even a source with & and < is escaped in the attribute.
        doc = '<head><meta http-equiv="Content-Security-Policy" content="img-src \'self\'"></head>'
        new, _ = patch_meta_tags(doc, {"img-src": ("https://a.example/x&y<z",)})
        assert 'content="img-src &#x27;self&#x27; https://a.example/x&amp;y&lt;z"></head>' in new


# ---------------------------------------------------------------------------------------------- the addon

PAGE = "https://chat.example.org"


@pytest.fixture
def tctx(pat_mode):
    ctx = pat_mode(Csp, coze_api_base=API, coze_origins=f"{PAGE},http://localhost:3000,http://coze.mitm")
    ctx.addon = ctx.parts[0]
    return ctx


def page_flow(url=PAGE + "/", csp=("default-src 'self'",), content_type="text/html; charset=utf-8",
              body=b"<html><head></head><body>hi</body></html>", report_only=(), status=200, req_headers=()):
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    port = int(port) if port else (443 if scheme == "https" else 80)
    req = tutils.treq(method=b"GET", scheme=scheme.encode(), host=host, port=port, path=("/" + path).encode(),
                      headers=tutils.treq().headers.__class__([(k.encode(), v.encode()) for k, v in req_headers]))
    headers = [(b"content-type", content_type.encode())] if content_type else []
    headers += [(b"content-security-policy", v.encode()) for v in csp]
    headers += [(b"content-security-policy-report-only", v.encode()) for v in report_only]
    resp = tutils.tresp(status_code=status, headers=tutils.tresp().headers.__class__(headers), content=body)
    return tflow.tflow(req=req, resp=resp)


def run(addon, f, stream=False):
    """request -> (destination may be rewritten here, as map_remote does) -> responseheaders -> response."""
    response, f.response = f.response, None
    addon.request(f)
    f.response = response
    f.response.stream = stream
    addon.responseheaders(f)
    addon.response(f)
    return f


class TestCspAddon:
    def test_allowed_page_gets_sources_added(self, tctx):
        f = run(tctx.addon, page_flow())
        value = f.response.headers["content-security-policy"]
        assert directives(value)["script-src"] == ["'self'", CDN]
        assert directives(value)["connect-src"] == ["'self'", API, "wss://ws.coze.cn"]  # the API's ws host too
        assert directives(value)["default-src"] == ["'self'"]
        assert "CSP header extended" in f.comment

    def test_other_origins_untouched(self, tctx):
        for url in ("https://evil.example/", "http://chat.example.org/", "https://chat.example.org:8443/",
                    "https://sub.chat.example.org/"):
            f = run(tctx.addon, page_flow(url))
            assert f.response.headers.get_all("content-security-policy") == ["default-src 'self'"]

    def test_decision_made_before_the_destination_is_rewritten(self, tctx):
        f = page_flow()
        response, f.response = f.response, None
        tctx.addon.request(f)
        f.request.host, f.request.port, f.request.scheme = "127.0.0.1", 8000, "http"  # map_remote
        f.response = response
        tctx.addon.responseheaders(f)
        tctx.addon.response(f)
        assert CDN in f.response.headers["content-security-policy"]
        assert f.metadata[CSP_PAGE] == PAGE

    def test_every_header_patched_report_only_left_alone(self, tctx):
        f = run(tctx.addon, page_flow(csp=("default-src 'self'", "script-src 'nonce-a' 'strict-dynamic'",
                                           "frame-ancestors 'none'"),
                                      report_only=("default-src 'none'",)))
        values = f.response.headers.get_all("content-security-policy")
        assert len(values) == 3
        assert CDN in directives(values[0])["script-src"]
        assert directives(values[1])["script-src"] == ["'nonce-a'", "'strict-dynamic'", CDN]
        assert values[2] == "frame-ancestors 'none'"
        assert f.response.headers.get_all("content-security-policy-report-only") == ["default-src 'none'"]

    def test_page_without_csp_untouched(self, tctx):
        f = page_flow(csp=())
        before = (f.response.headers.fields, f.response.raw_content)
        run(tctx.addon, f)
        assert (f.response.headers.fields, f.response.raw_content) == before
        assert not f.comment

    def test_non_documents_untouched(self, tctx):
        for ctype in ("application/json", "text/javascript", ""):
            f = run(tctx.addon, page_flow(content_type=ctype))
            assert f.response.headers.get_all("content-security-policy") == ["default-src 'self'"]

    def test_304_for_a_document_patched(self, tctx):
        f = run(tctx.addon, page_flow(content_type="", status=304, body=b"", req_headers=[("Sec-Fetch-Dest", "document")]))
        assert CDN in f.response.headers["content-security-policy"]

    def test_meta_tag_patched_in_a_compressed_body(self, tctx):
        doc = b"<html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'\"></head><body>x</body>"
        f = page_flow(csp=(), body=doc)
        f.response.headers["content-encoding"] = "gzip"
        f.response.raw_content = gzip.compress(doc)
        run(tctx.addon, f)
        assert f.response.headers["content-encoding"] == "gzip"
        text = gzip.decompress(f.response.raw_content).decode()
        assert f"script-src &#x27;self&#x27; {CDN}" in text
        assert "CSP meta tag extended" in f.comment

    def test_body_without_meta_csp_left_byte_for_byte(self, tctx):
        f = page_flow(body="<html><head><title>Zoë</title></head>".encode("latin-1"),
                      content_type="text/html; charset=latin-1")
        raw = f.response.raw_content
        run(tctx.addon, f)
        assert f.response.raw_content is raw or f.response.raw_content == raw

    def test_streamed_page_headers_patched_body_left(self, tctx):
        doc = b"<head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'self'\"></head>"
        f = run(tctx.addon, page_flow(body=doc), stream=True)
        assert CDN in f.response.headers["content-security-policy"]
        assert f.response.raw_content == doc

    def test_local_answer_by_a_later_addon_patched_in_response(self, tctx):
        f = page_flow()
        response, f.response = f.response, None
        tctx.addon.request(f)
        f.response = response  # a later addon answered in `request`: no responseheaders hook follows
        tctx.addon.response(f)
        assert CDN in f.response.headers["content-security-policy"]

    def test_proxy_own_pages_keep_their_policy(self, tctx):
        f = run(tctx.addon, page_flow("http://coze.mitm/"))
        assert f.response.headers.get_all("content-security-policy") == ["default-src 'self'"]

    def test_flow_answered_before_this_addon_not_marked(self, tctx):
        f = page_flow()
        tctx.addon.request(f)  # flow.response already set (e.g. by the demo addon): not a page load
        assert CSP_PAGE not in f.metadata

    def test_switched_off(self, tctx):
        tctx.configure(tctx.addon, coze_csp=False)
        f = run(tctx.addon, page_flow())
        assert f.response.headers.get_all("content-security-policy") == ["default-src 'self'"]

    def test_extra_sources(self, tctx):
        tctx.configure(tctx.addon, coze_csp_extra="img-src https://img.example; font-src data:")
        f = run(tctx.addon, page_flow(csp=("img-src 'self'; font-src 'none'",)))
        d = directives(f.response.headers["content-security-policy"])
        assert d["img-src"] == ["'self'", CDN, "data:", "blob:", "https://img.example"]
        assert d["font-src"] == [CDN, "data:"]

    def test_bad_extra_is_one_clear_error(self, tctx, caplog):
        with caplog.at_level(logging.ERROR):
            tctx.configure(tctx.addon, coze_csp_extra="script-src 'nonce-x'")
        assert "coze_csp_extra" in caplog.text and "not a source" in caplog.text
        f = run(tctx.addon, page_flow())
        assert CDN in f.response.headers["content-security-policy"]  # the SDK's own needs still apply

    def test_sdk_url_option_decides_the_cdn(self, tctx):
        tctx.configure(tctx.addon, coze_sdk_url="http://cdn.test:8000/sdk/index.js")
        f = run(tctx.addon, page_flow())
        d = directives(f.response.headers["content-security-policy"])
        assert d["script-src"] == ["'self'", "http://cdn.test:8000"]
        assert CDN not in f.response.headers["content-security-policy"]

    def test_nonce_styled_page_said_once_in_the_log_and_on_the_status_page(self, tctx, caplog, tmp_path):
        from coze_mitm.parts.status import StatusPages
        pages = StatusPages(tctx.addon.settings, stats=tctx.addon.stats)  # csp notes into the stats the page shows
        tctx.master.addons.add(pages)
        tctx.configure(pages, confdir=str(tmp_path))
        nonce = "default-src 'self'; style-src 'self' 'nonce-abc'"
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                f = run(tctx.addon, page_flow(csp=(nonce,)))
        value = f.response.headers["content-security-policy"]
        assert directives(value)["style-src"] == ["'self'", "'nonce-abc'", CDN]
        warnings = [r.getMessage() for r in caplog.records if "unstyled" in r.getMessage()]
        assert len(warnings) == 1 and PAGE in warnings[0]
        assert "coze_csp_extra cannot fix it" in warnings[0] and "must allow inline styles" in warnings[0]
        run(tctx.addon, page_flow("http://localhost:3000/", csp=("default-src 'self'",)))  # a page without nonce
        data = pages.status()
        assert list(data["csp"]["inline_styles_blocked"]) == [PAGE]
        html = pages.render_html()
        assert "The chat is unstyled here" in html and "must allow inline styles" in html
        # A meta tag with a hash counts too.
        doc = b"<head><meta http-equiv=\"Content-Security-Policy\" content=\"style-src 'sha256-x'\"></head>"
        run(tctx.addon, page_flow("http://localhost:3000/", csp=(), body=doc))
        assert set(pages.status()["csp"]["inline_styles_blocked"]) == {PAGE, "http://localhost:3000"}

    def test_meta_tag_of_a_huge_page_left_alone(self, tctx):
        """A small gzip body that decodes to more than MAX_PAGE is not decoded whole to rewrite its meta tag."""
        import gzip

        from coze_mitm.parts import csp

        head = b'<html><head><meta http-equiv="Content-Security-Policy" content="default-src \'self\'"></head><body>'
        raw = gzip.compress(head + b" " * (csp.MAX_PAGE + 1) + b"</body></html>")
        f = page_flow(csp=(), body=b"")
        f.response.headers["content-encoding"] = "gzip"
        f.response.raw_content = raw
        run(tctx.addon, f)
        assert f.response.raw_content == raw  # untouched, still compressed
        small = page_flow(csp=(), body=head + b"</body></html>")
        run(tctx.addon, small)
        assert CDN in small.response.text  # a normal page's meta tag is still extended

    def test_api_hosts_all_in_connect_src(self, tctx):
        tctx.configure(tctx.addon, coze_api_hosts="http://127.0.0.1:8790,ws://127.0.0.1:9000")
        f = run(tctx.addon, page_flow())
        assert directives(f.response.headers["content-security-policy"])["connect-src"] == \
            ["'self'", "http://127.0.0.1:8790", API, "ws://127.0.0.1:9000", "wss://ws.coze.cn"]


# ---------------------------------------------------------------------------------------------- in Chromium

# What the Web Chat SDK does to a page besides loading files: its CSS as <style> elements, data: icons,
# blob: upload previews. Run in the page (main world), so the page's CSP applies as it does to the SDK.
SDK_INLINE_JS = """async () => {
    const style = document.createElement('style');
    style.textContent = '.coze-inline-probe { color: rgb(1, 2, 3); }';
    document.head.appendChild(style);
    const probe = document.createElement('div');
    probe.className = 'coze-inline-probe';
    probe.textContent = 'probe';
    document.body.appendChild(probe);
    const png = Uint8Array.from(atob(PNG_B64), (c) => c.charCodeAt(0));
    const load = (src) => new Promise((resolve) => {
        const img = new Image();
        img.onload = () => resolve(img.naturalWidth);
        img.onerror = () => resolve(0);
        img.src = src;
        document.body.appendChild(img);
    });
    const data = await load('data:image/png;base64,' + PNG_B64);
    const blob = await load(URL.createObjectURL(new Blob([png], {type: 'image/png'})));
    await new Promise((r) => setTimeout(r, 50));  // securitypolicyviolation events are queued as tasks
    return {color: getComputedStyle(probe).color, data, blob, violations: window.__cspViolations};
}"""
RECORD_VIOLATIONS = """window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.__cspViolations.push(e.effectiveDirective + ' ' + e.blockedURI));"""


@pytest.mark.process
def test_sdk_styles_and_images_allowed_on_a_strict_page_in_chromium(tmp_path_factory, rsa_key):
    import base64

    from tests.browser import ICON_PNG, PageServer, find_chromium, launch_chromium, gm_xhr_binding, userscript_init_script
    from tests.clients import session
    from tests.conftest import CLIENT_ID, KID, write_config
    from tests.harness import Mitmdump
    from sandbox.coze_standin import CozeStandIn

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    standin = CozeStandIn(rsa_key["public_pem"], kid=KID, client_id=CLIENT_ID).start()
    pages = PageServer(standin.base_url).start()
    config = write_config(tmp_path_factory.mktemp("config"), rsa_key, standin.base_url)
    proxy = Mitmdump(tmp_path_factory.mktemp("mitm"), [
        f"coze_config={config}", "coze_origins=http://page.test", "coze_bot_id=7350000000000000001",
        "coze_sdk_url=https://cdn.test/sdk/index.js", "connection_strategy=lazy",
        *pages.map_remote("page.test", "cdn.test", "other.test"),
    ])
    try:
        proxy.start()
        script = session(proxy).get("http://coze.mitm/coze-chat.user.js", timeout=10).text
        with sync_api.sync_playwright() as p:
            browser = launch_chromium(p, proxy.port)
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(15_000)
            context.expose_binding("cozeGmXhr", gm_xhr_binding(proxy.proxies))
            context.add_init_script(RECORD_VIOLATIONS)
            context.add_init_script(userscript_init_script(script))
            inline_js = SDK_INLINE_JS.replace("PNG_B64", repr(base64.b64encode(ICON_PNG).decode()))
            results = {}
            for url in ("http://page.test/strict", "http://page.test/meta", "http://other.test/strict"):
                page = context.new_page()
                page.goto(url)
                if "page.test" in url:  # the real userscript loaded the SDK stand-in: the chat is there
                    page.wait_for_function("() => window.__fakeCozeClient")
                    page.evaluate("() => window.__fakeCozeClient.ready")
                results[url] = page.evaluate(inline_js)
            browser.close()
    finally:
        proxy.stop()
        pages.stop()
        standin.stop()
    for url in ("http://page.test/strict", "http://page.test/meta"):
        assert results[url] == {"color": "rgb(1, 2, 3)", "data": 24, "blob": 24, "violations": []}, url
    # Control: a page not in coze_origins keeps its policy, which blocks all three.
    control = results["http://other.test/strict"]
    assert control["color"] != "rgb(1, 2, 3)" and control["data"] == 0 and control["blob"] == 0
    assert {v.split()[0] for v in control["violations"]} == {"style-src-elem", "img-src"}
