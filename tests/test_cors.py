"""CORS for the Coze API origin(s): preflights answered locally, headers replaced, only for allowed origins."""

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.parts.cors import Cors
from coze_mitm.parts.settings import CozeSettings

PAGE = "https://chat.example.org"


@pytest.fixture
def addon(pat_mode):
    return pat_mode(Cors, coze_origins=f"{PAGE},http://localhost:3000", coze_api_hosts="http://127.0.0.1:8790").parts[0]


def flow(method="POST", host="api.coze.cn", port=443, scheme="https", headers=(), resp=False):
    req = tutils.treq(method=method.encode(), host=host, port=port, scheme=scheme.encode(), path=b"/v3/chat",
                      headers=tutils.treq().headers.__class__([(k.encode(), v.encode()) for k, v in headers]))
    return tflow.tflow(req=req, resp=resp)


def preflight(origin=PAGE, **kw):
    return flow("OPTIONS", headers=[("Origin", origin), ("Access-Control-Request-Method", "POST"),
                                    ("Access-Control-Request-Headers", "authorization,content-type,x-coze-client-user-agent")], **kw)


class TestCors:
    def test_preflight_from_allowed_origin_answered_locally(self, addon):
        f = preflight()
        addon.request(f)
        addon.response(f)
        h = f.response.headers
        assert f.response.status_code == 204
        assert h["Access-Control-Allow-Origin"] == PAGE
        assert h["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in h["Access-Control-Allow-Methods"]
        assert h["Access-Control-Allow-Headers"] == "authorization,content-type,x-coze-client-user-agent"
        assert int(h["Access-Control-Max-Age"]) > 0
        assert "Origin" in h["Vary"]

    def test_hostile_request_headers_not_echoed(self, addon):
        f = flow("OPTIONS", headers=[("Origin", PAGE), ("Access-Control-Request-Method", "POST"),
                                     ("Access-Control-Request-Headers", "x\r\nSet-Cookie: a=b")])
        addon.request(f)
        assert "Set-Cookie" not in f.response.headers["Access-Control-Allow-Headers"]

    @pytest.mark.parametrize("origin", ["https://evil.example", "null", PAGE + ".evil.test", "http://chat.example.org"])
    def test_preflight_from_other_origin_not_loosened(self, addon, origin):
        f = preflight(origin)
        addon.request(f)
        assert f.response is None  # passes to Coze as it is

    def test_ipv6_page_origin_as_the_browser_writes_it(self):
        """A page on http://[::1]:3000 sends exactly that Origin; configured so, it is allowed (it used to
        be stored as http://::1:3000, which no browser sends)."""
        settings = CozeSettings()
        cors = Cors(settings)
        with taddons.context(settings, cors) as tctx:
            tctx.configure(settings, coze_pat="pat_" + "x" * 30, coze_api_base="https://api.coze.cn",
                           coze_origins="http://[::1]:3000")
            f = preflight("http://[::1]:3000")
            cors.request(f)
            cors.response(f)
            assert f.response.status_code == 204
            assert f.response.headers["Access-Control-Allow-Origin"] == "http://[::1]:3000"

    def test_other_port_is_another_origin(self, addon):
        f = preflight(port=8443)
        addon.request(f)
        assert f.response is None
        f = preflight(host="127.0.0.1", port=8790, scheme="http")
        addon.request(f)
        assert f.response.status_code == 204

    def test_non_coze_host_untouched(self, addon):
        f = preflight(host="example.org")
        addon.request(f)
        assert f.response is None

    def test_upstream_cors_headers_replaced_not_duplicated(self, addon):
        resp = tutils.tresp(headers=tutils.tresp().headers.__class__([
            (b"Access-Control-Allow-Origin", b"*"), (b"access-control-allow-origin", b"https://coze.cn"),
            (b"Access-Control-Allow-Credentials", b"false"), (b"Vary", b"Accept-Encoding"),
            (b"Content-Type", b"text/event-stream")]))
        f = flow(headers=[("Origin", PAGE)])
        addon.request(f)
        f.response = resp
        addon.responseheaders(f)
        h = f.response.headers
        assert h.get_all("Access-Control-Allow-Origin") == [PAGE]
        assert h.get_all("Access-Control-Allow-Credentials") == ["true"]
        assert "X-Tt-Logid" in h["Access-Control-Expose-Headers"]
        assert h["Vary"] == "Accept-Encoding, Origin"

    def test_disallowed_origin_response_left_as_is(self, addon):
        f = flow(headers=[("Origin", "https://evil.example")])
        addon.request(f)
        f.response = tutils.tresp()
        addon.responseheaders(f)
        addon.response(f)
        assert "Access-Control-Allow-Origin" not in f.response.headers

    def test_duplicated_origin_header_not_loosened(self, addon):
        f = preflight()
        f.request.headers.add("Origin", "https://evil.example")
        addon.request(f)
        assert f.response is None


def assigned(headers, origin):
    """What cors.py did before the one-pass rewrite: four assignments (mitmproxy's set_all semantics)."""
    from coze_mitm.parts.cors import EXPOSE_HEADERS, _merge_vary
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Allow-Credentials"] = "true"
    headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    headers["Vary"] = _merge_vary(headers.get("vary", ""), "Origin")


@pytest.mark.parametrize("fields", [
    [],
    [(b"Content-Type", b"application/json")],
    [(b"Access-Control-Allow-Origin", b"*"), (b"Content-Type", b"text/event-stream"),
     (b"access-control-allow-origin", b"https://coze.cn"), (b"Access-Control-Allow-Credentials", b"false")],
    [(b"vary", b"Accept-Encoding"), (b"X-Tt-Logid", b"1"), (b"Vary", b"origin, Cookie"), (b"VARY", b"")],
    [(b"Access-Control-Expose-Headers", b"X-A"), (b"Vary", b"Origin"), (b"access-control-expose-headers", b"X-B"),
     (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
    [(b"Vary", b"\xff-not-utf8"), (b"Access-Control-Allow-Credentials", b"true")],
])
def test_one_pass_sets_what_the_four_assignments_set(fields):
    from coze_mitm.parts.cors import set_cors_headers
    expected = http.Headers(list(fields))
    assigned(expected, PAGE)
    got = http.Headers(list(fields))
    set_cors_headers(got, PAGE)
    assert got.fields == expected.fields


class TestOncePerResponse:
    def test_an_upstream_answer_gets_them_in_responseheaders_only(self, addon):
        f = flow(headers=[("Origin", PAGE)])
        addon.request(f)
        f.response = tutils.tresp()
        addon.responseheaders(f)
        assert f.response.headers["Access-Control-Allow-Origin"] == PAGE
        fields = f.response.headers.fields
        addon.response(f)
        assert f.response.headers.fields is fields  # not rewritten a second time

    def test_a_local_answer_gets_them_in_response(self, addon):
        f = flow(headers=[("Origin", PAGE)])
        addon.request(f)
        f.response = http.Response.make(403, b'{"code":4101,"msg":"no"}')  # e.g. auth's refusal, set in request
        addon.response(f)
        assert f.response.headers["Access-Control-Allow-Origin"] == PAGE
        assert f.response.headers["Vary"] == "Origin"

    def test_a_replayed_flow_gets_them_again(self, addon):
        f = flow(headers=[("Origin", PAGE)])
        addon.request(f)
        f.response = tutils.tresp()
        addon.responseheaders(f)
        addon.response(f)
        # mitmproxy's client replay sends the same flow object through the hooks again.
        f.response = None
        addon.request(f)
        f.response = http.Response.make(502, b"")
        addon.response(f)
        assert f.response.headers["Access-Control-Allow-Origin"] == PAGE
