"""Hostile input (issue 5): property tests over the pure gate (`identity.admit`) and over the Cors +
Auth addons with the real settings, plus a few checks on the wire through a real mitmdump.

Properties, for any mix of duplicated / re-cased / long / non-ASCII Authorization, Origin and Cookie
headers, look-alike origins and tags sent to any host:
* nothing raises, and no hook ends in the "internal error" answer;
* the decision is the same whatever the order and the casing of the headers;
* no request leaves `request` with a placeholder Authorization or a coze_user cookie, to any host;
* credentials go to the Coze API origin only, and only for an allowed origin (or a non-browser client);
* no secret (PAT, access token, key) is in anything the client gets back, or in the stored flow.
"""

from __future__ import annotations

import asyncio
from http.client import HTTPConnection
import inspect
import json
import logging
import re

import pytest
import requests
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.core import identity
from coze_mitm.parts.auth import Auth
from coze_mitm.parts.cors import Cors
from coze_mitm.core.identity import admit
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.parts.streaming import Streaming

PAGE = "https://chat.example.org"
LOCAL_PAGE = "http://localhost:3000"
ALLOWED = frozenset({PAGE, LOCAL_PAGE})
PAT = "pat_" + "Zq9" * 14
PROPS = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLACEHOLDER_SENT = re.compile(r"\s*bearer\s+user:", re.IGNORECASE | re.DOTALL)

# ---------------------------------------------------------------- strategies

VALID_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), max_size=40)
IDS = st.one_of(
    VALID_IDS,
    st.sampled_from(["alice-0001", "bob-000002"]),  # the same ids often, so duplicates and conflicts happen
    st.text(st.characters(min_codepoint=0x80, max_codepoint=0x2FFF, blacklist_categories=("Cs",)), min_size=8, max_size=20),
    st.builds(lambda n: "x" * n, st.integers(129, 5000)),  # very long
    st.sampled_from(["short", "has space in it", "", "ümlaut-user", "a/b/c/d/e/f", "tab\tinside-x"]),
    SAFE_TEXT,
)
ORIGINS = st.one_of(
    st.sampled_from([
        PAGE, LOCAL_PAGE, "null", "", " ", f"{PAGE}.evil.test", "https://www.coze.cn.evil.test", "http://chat.example.org",
        "https://chat.example.org:8443", "https://CHAT.EXAMPLE.ORG", f"{PAGE}/", "http://localhost:3001",
        "https://localhost:3000", "https://evil.example", f"{PAGE}, {PAGE}", "https://chat.example.org\t",
    ]),
    SAFE_TEXT,
)


def recase(name: str):
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(name, flips)))


AUTH_VALUES = st.one_of(
    st.builds(lambda scheme, sp, user, i: f"{scheme}{sp}{user}{i}",
              st.sampled_from(["Bearer", "bearer", "BEARER", " Bearer"]), st.sampled_from([" ", "  ", "\t", " \xa0"]),
              st.sampled_from(["user:", "USER:", "User:"]), IDS),
    st.sampled_from(["Bearer czs_clientsOwnToken123", "Bearer pat_clientsOwn", "Basic dXNlcjpwYXNz", "Bearer user :x",
                     "Bearer", "", "user:alice-0001", "Bearer user:alice-0001, Bearer user:bob-000002"]),
    SAFE_TEXT,
)
COOKIE_VALUES = st.one_of(
    st.builds(lambda pre, i, post: f"{pre}coze_user={i}{post}",
              st.sampled_from(["", "a=1; ", "a=1, ", "theme=dark;", " "]), IDS,
              st.sampled_from(["", "; b=2", ", b=2", ";", " "])),
    st.builds(lambda i: f'coze_user="{i}"', IDS),
    st.builds(lambda i: f" coze_user = {i} ", IDS),
    st.sampled_from(["COZE_USER=alice-0001", "coze_users=alice-0001", "a=1", "", "coze_user"]),
    SAFE_TEXT,
)
HEADER = st.one_of(
    st.tuples(recase("Authorization"), AUTH_VALUES),
    st.tuples(recase("Origin"), ORIGINS),
    st.tuples(recase("Cookie"), COOKIE_VALUES),
    st.tuples(st.sampled_from(["Sec-Fetch-Mode", "sec-fetch-site", "SEC-FETCH-DEST"]), st.sampled_from(["cors", "same-origin"])),
    st.tuples(st.sampled_from(["Content-Type", "X-Coze-Client-User-Agent", "Accept"]), SAFE_TEXT),
)
HEADER_LISTS = st.lists(HEADER, max_size=7)
ENCODINGS = st.sampled_from(["utf-8", "latin-1"])


def headers_of(pairs, encoding: str = "utf-8") -> http.Headers:
    return http.Headers([(k.encode("ascii"), v.encode(encoding, "replace")) for k, v in pairs])


def permuted(pairs, data):
    return data.draw(st.permutations(pairs)) if pairs else pairs


# ---------------------------------------------------------------- the pure gate


@PROPS
@given(pairs=HEADER_LISTS, encoding=ENCODINGS, data=st.data())
def test_admit_total_and_independent_of_order_and_casing(pairs, encoding, data):
    decision = admit(headers_of(pairs, encoding), ALLOWED)
    assert decision.action in ("pass", "inject", "refuse")
    again = admit(headers_of(permuted(pairs, data), encoding), ALLOWED)
    assert again == decision
    swapped = [(k.swapcase(), v) for k, v in pairs]
    assert admit(headers_of(swapped, encoding), ALLOWED) == decision


@PROPS
@given(pairs=HEADER_LISTS, encoding=ENCODINGS)
def test_admit_decisions_are_sound(pairs, encoding):
    headers = headers_of(pairs, encoding)
    decision = admit(headers, ALLOWED)
    origins = headers.get_all("origin")
    tagged = identity.has_tag(headers)
    if decision.action == "pass":
        assert not tagged  # a tag is never left for the proxy to forward
    elif decision.action == "inject":
        assert tagged
        assert identity.USER_ID_RE.fullmatch(decision.user_id)
        assert len(headers.get_all("authorization")) <= 1 or not any(
            identity.is_placeholder(a) for a in headers.get_all("authorization"))
        assert len(origins) <= 1
        if origins:
            assert origins[0].strip() in ALLOWED
    else:
        assert 400 <= decision.status < 500 and decision.code in (4000, 4101)
        assert decision.msg and len(decision.msg) < 600  # long tags and origins are cut in messages
    if any(o.strip() not in ALLOWED for o in origins):
        assert decision.action != "inject"


@pytest.mark.parametrize("origin", [
    "null", f"{PAGE}.evil.test", "https://www.coze.cn.evil.test", "http://chat.example.org",
    "https://chat.example.org:443", "https://chat.example.org:8443", f"{PAGE}/", "https://CHAT.example.org",
])
def test_lookalike_origins_refused(origin):
    d = admit(headers_of([("Authorization", "Bearer user:alice-0001"), ("Origin", origin)]), ALLOWED)
    assert (d.action, d.status, d.code) == ("refuse", 403, 4101)


def test_duplicated_headers_refused_or_ignored():
    tag = ("Authorization", "Bearer user:alice-0001")
    assert admit(headers_of([tag, ("authorization", "Bearer czs_x")]), ALLOWED).reason == "malformed-tag"
    assert admit(headers_of([tag, ("Origin", PAGE), ("ORIGIN", PAGE)]), ALLOWED).reason == "duplicate-origin"
    two = admit(headers_of([("Cookie", "coze_user=alice-0001"), ("cookie", "coze_user=bob-000002")]), ALLOWED)
    assert "two different users" in two.msg
    same = admit(headers_of([("Cookie", "coze_user=alice-0001"), ("cookie", "a=1, coze_user=alice-0001"), ("Origin", PAGE)]), ALLOWED)
    assert (same.action, same.user_id) == ("inject", "alice-0001")


# ---------------------------------------------------------------- the addons, real settings


HOSTS = st.sampled_from([
    ("https", "api.coze.cn", 443),  # the configured Coze API
    ("http", "api.coze.cn", 80),  # other scheme: another origin
    ("https", "api.coze.cn", 8443),  # other port
    ("https", "api.coze.cn.evil.test", 443),
    ("https", "www.coze.cn", 443),
    ("https", "chat.example.org", 443),  # the page's own host
])
METHODS = st.sampled_from(["GET", "POST", "OPTIONS"])
UPSTREAM = st.sampled_from([
    (200, b'{"code":0,"msg":"","data":{}}', "application/json"),
    (401, b'{"code":4100,"msg":"authentication is invalid"}', "application/json"),
    (200, b'{"code":700012006,"msg":"access token invalid"}', "application/json"),
    (200, b'{"code":4101,"msg":"no permission"}', "application/json"),
    (200, b"event:done\ndata:\"[DONE]\"\n\n", "text/event-stream"),
    (502, b"<html>bad gateway</html>", "text/html"),
])


class ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def make_flow(scheme, host, port, method, pairs, encoding="utf-8", body=b""):
    req = tutils.treq(method=method.encode(), scheme=scheme.encode(), host=host, port=port, path=b"/v1/bots/7000",
                      headers=headers_of(pairs, encoding), content=body)
    if method == "OPTIONS" and not any(k.lower() == "access-control-request-method" for k, _ in pairs):
        req.headers["Access-Control-Request-Method"] = "POST"
    return tflow.tflow(req=req)


async def run_hooks(addons, name, f):
    for addon in addons:
        hook = getattr(addon, name, None)
        if hook is None or (name == "request" and f.response):
            continue
        result = hook(f)
        if inspect.isawaitable(result):
            await result


def leaves_with(f) -> tuple | None:
    """What the request carries as it leaves `request` (None: answered locally, never forwarded)."""
    if f.response is not None:
        return None
    cookies = sorted(value for header in f.request.headers.get_all("cookie") for value in re.split(r"[;,]\s*", header))
    return (tuple(sorted(f.request.headers.get_all("authorization"))), tuple(cookies))


def outcome(f) -> tuple:
    if f.response is None:
        return ("forwarded", leaves_with(f))
    return ("answered", f.response.status_code, f.response.content)


def check_flow(addons, secrets, pairs, scheme, host, port, method, encoding, upstream):
    """Run one hostile request through the bundle's hooks and check every property on it."""
    settings_addon = addons[0]
    f = make_flow(scheme, host, port, method, pairs, encoding, body=b'{"stream":false}')
    asyncio.run(run_hooks(addons, "request", f))
    is_api = settings_addon.is_coze_api(f.request)

    # Never the placeholder, never the tag cookie, to any host.
    if f.response is None:
        for value in f.request.headers.get_all("authorization"):
            assert not PLACEHOLDER_SENT.match(value), (host, value)
        assert identity.cookie_values(f.request.headers) == []
        carried = " ".join(f"{k}: {v}" for k, v in f.request.headers.items(multi=True))
        if not is_api:  # credentials only ever go to the Coze API origin
            assert not any(s in carried for s in secrets())
    else:
        body = f.response.content or b""
        assert f.response.status_code != 502 or b"coze-mitm failed" not in body  # no internal error
        if f.response.status_code != 204:
            assert set(json.loads(body)) == {"code", "msg"}
    before = outcome(f)

    # Coze answers; then everything the client and mitmweb see is checked for secrets.
    if f.response is None:
        status, content, ctype = upstream
        f.response = tutils.tresp(status_code=status, content=content,
                                  headers=http.Headers([(b"Content-Type", ctype.encode())]))
        asyncio.run(run_hooks(addons, "responseheaders", f))
        asyncio.run(run_hooks(addons, "response", f))
    seen_by_client = json.dumps([f.response.status_code, f.response.headers.fields, f.response.content], default=repr)
    stored = json.dumps(f.get_state(), default=repr)
    for s in secrets():
        assert s not in seen_by_client and s not in stored
    return before


@pytest.fixture
def error_log():
    handler = ErrorLog()
    logging.getLogger("coze").addHandler(handler)
    yield handler
    logging.getLogger("coze").removeHandler(handler)


def pat_bundle():
    s = CozeSettings()
    return [s, Cors(s), Auth(s), Streaming()]


def test_bundle_properties_pat_mode(error_log, tmp_path):
    addons = pat_bundle()
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], coze_pat=PAT, coze_origins=f"{PAGE},{LOCAL_PAGE}",
                       coze_config=str(tmp_path / "absent.json"))
        assert addons[0].broker is not None and addons[0].broker.mode == "pat"

        @PROPS
        @given(pairs=HEADER_LISTS, dest=HOSTS, method=METHODS, encoding=ENCODINGS, upstream=UPSTREAM, data=st.data())
        def prop(pairs, dest, method, encoding, upstream, data):
            scheme, host, port = dest
            first = check_flow(addons, lambda: [PAT], pairs, scheme, host, port, method, encoding, upstream)
            # The same request with its headers in another order and casing: the same outcome.
            shuffled = [(k.swapcase() if data.draw(st.booleans()) else k, v) for k, v in permuted(pairs, data)]
            again = check_flow(addons, lambda: [PAT], shuffled, scheme, host, port, method, encoding, upstream)
            assert again == first

        prop()
    assert error_log.records == []


def test_bundle_properties_jwt_mode_against_standin(error_log, config_file, standin, rsa_key):
    """The real token broker and exchange: minted tokens, the retry after a 401, never a leak."""
    addons = pat_bundle()
    key_body = "".join(rsa_key["private_pem"].splitlines()[1:-1])

    def secrets():
        return [e["access_token"] for e in standin.exchanges] + [key_body[:48], key_body[-48:]]

    host, port = standin.audience.split(":")
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[0], coze_config=str(config_file), coze_origins=f"{PAGE},{LOCAL_PAGE}")
        assert addons[0].broker.mode == "jwt"
        api = ("http", host, int(port))
        hosts = st.sampled_from([api, api, api, ("http", host, int(port) + 1), ("https", host, int(port)),
                                 ("https", "api.coze.cn", 443)])
        users = st.sampled_from(["alice-0001", "bob-000002", "carol-0003"])
        tagged = st.builds(lambda u, o, extra: [("Authorization", f"Bearer user:{u}"), ("Origin", o)] + extra,
                           users, st.sampled_from([PAGE, LOCAL_PAGE, "null", f"{PAGE}.evil.test"]),
                           st.lists(HEADER, max_size=2))
        pairs_st = st.one_of(HEADER_LISTS, tagged, tagged, tagged)

        @hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(pairs=pairs_st, dest=hosts, method=METHODS, upstream=UPSTREAM)
        def prop(pairs, dest, method, upstream):
            check_flow(addons, secrets, pairs, *dest, method, "utf-8", upstream)

        prop()
    assert standin.placeholder_seen == 0
    assert standin.exchanges, "no example reached the token exchange"
    print(f"\n{len(standin.exchanges)} exchanges, {len(standin.requests_seen)} requests reached the stand-in")
    assert error_log.records == []


# ---------------------------------------------------------------- on the wire, through a real mitmdump


def raw_request(proxy, url: str, headers: list[tuple[str, str]], method: str = "GET") -> tuple[int, dict, bytes]:
    """Send exactly these header lines (duplicates and casing kept) through the proxy."""
    conn = HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.putrequest(method, url, skip_host=False, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value.encode("utf-8"))
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    result = (r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    conn.close()
    return result


@pytest.fixture
def proxy(mitmdump, config_file):
    return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "flow_detail=3")


def test_duplicated_headers_on_the_wire(proxy, standin):
    url = f"{standin.base_url}/v1/bots/7000"
    tag = ("AUTHORIZATION", "Bearer user:alice-0001")
    cases = [
        [tag, ("authorization", "Bearer user:alice-0001")],
        [tag, ("Authorization", "Bearer czs_mine")],
        [tag, ("Origin", PAGE), ("origin", PAGE)],
        [("Cookie", "coze_user=alice-0001"), ("COOKIE", "coze_user=bob-000002")],
        [tag, ("Origin", "null")],
        [tag, ("Origin", "https://www.coze.cn.evil.test")],
        [("Authorization", "Bearer user:" + "x" * 4000)],
        [("Authorization", "Bearer user:ünïcode-user-1")],
    ]
    for headers in cases:
        status, got, body = raw_request(proxy, url, headers)
        assert status in (400, 403), (headers, status, body[:200])
        assert set(json.loads(body)) == {"code", "msg"}
        assert len(body) < 1000
    assert standin.requests_seen == [] and standin.exchanges == []


def test_tags_to_other_hosts_never_forwarded(proxy, standin, rsa_key):
    from sandbox.coze_standin import CozeStandIn

    other = CozeStandIn(rsa_key["public_pem"], kid="k", client_id="c").start()  # not a configured Coze API
    try:
        url = f"{other.base_url}/v1/bots/7000"
        status, _, body = raw_request(proxy, url, [("Authorization", "Bearer user:alice-0001"), ("Origin", PAGE)])
        assert status == 400 and "not a configured Coze API host" in json.loads(body)["msg"]
        assert other.requests_seen == []
        # A coze_user cookie is removed on its way to any other site; the request itself goes through.
        raw_request(proxy, url, [("Cookie", "a=1; coze_user=alice-0001; b=2"), ("Cookie", "c=3, coze_user=alice-0001")])
        assert len(other.requests_seen) == 1
        assert other.requests_seen[0]["headers"]["cookie"] == "a=1; b=2; c=3"
        assert other.placeholder_seen == 0
    finally:
        other.stop()
    assert standin.exchanges == []


def test_requests_with_own_token_untouched_by_any_casing(proxy, standin):
    s = requests.Session()
    s.trust_env = False
    s.proxies = proxy.proxies
    r = s.get(f"{standin.base_url}/v1/bots/7000", headers={"aUtHoRiZaTiOn": "Bearer czs_not_ours", "Origin": PAGE})
    assert r.status_code == 401
    assert standin.requests_seen[-1]["headers"]["authorization"] == "Bearer czs_not_ours"
