"""The Authorization addon with mitmproxy's test context, the real settings and the Coze stand-in."""

import asyncio
import inspect
import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.parts.auth import Auth
from coze_mitm.parts.cors import Cors
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.parts.streaming import Streaming

PAGE = "https://chat.example.org"
ALICE = "alice-0001"


@pytest.fixture
def bundle(config_file, standin):
    settings = CozeSettings()
    addons = [settings, Cors(settings), Auth(settings), Streaming()]
    with taddons.context(*addons) as tctx:
        tctx.configure(settings, coze_config=str(config_file), coze_origins=PAGE)
        yield tctx, addons, standin


def api_flow(standin, headers, path="/v1/bots/7000", method="GET"):
    host, port = standin.audience.split(":")
    req = tutils.treq(method=method.encode(), scheme=b"http", host=host, port=int(port), path=path.encode(),
                      headers=tutils.treq().headers.__class__([(k.encode(), v.encode()) for k, v in headers]))
    return tflow.tflow(req=req)


def through_request(tctx, addons, f):
    """Run the request hooks in bundle order, as mitmproxy would (async ones awaited)."""
    async def run():
        for addon in addons:
            hook = getattr(addon, "request", None)
            if hook is None or f.response:
                continue
            result = hook(f)
            if inspect.isawaitable(result):
                await result
    asyncio.run(run())


class TestAuth:
    def test_placeholder_swapped_cookie_stripped_then_restored(self, bundle):
        tctx, addons, standin = bundle
        f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}"), ("Cookie", f"a=1; coze_user={ALICE}")])
        through_request(tctx, addons, f)
        assert f.request.headers["Authorization"].startswith("Bearer czs_")
        assert f.request.headers["Cookie"] == "a=1"
        assert standin.exchange_count(ALICE) == 1
        assert "coze-mitm" in f.comment and f.marked
        token = f.request.headers["Authorization"]

        f.response = tutils.tresp()
        addons[2].responseheaders(f)
        # What mitmweb and -w files keep is what the page sent, not the token.
        assert f.request.headers["Authorization"] == f"Bearer user:{ALICE}"
        assert token not in json.dumps(f.get_state(), default=repr)

    def test_a_header_another_addon_set_after_the_swap_is_kept_beside_the_placeholder(self, bundle):
        tctx, addons, standin = bundle
        f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}"), ("Cookie", f"a=1; coze_user={ALICE}"),
                               ("Accept", "application/json")])
        through_request(tctx, addons, f)
        f.request.headers["X-Later-Addon"] = "1"  # e.g. modify_headers, or a user's addon after coze-mitm
        f.request.headers["Accept"] = "text/plain"
        f.response = tutils.tresp()
        addons[2].responseheaders(f)
        assert f.request.headers["Authorization"] == f"Bearer user:{ALICE}"
        assert f.request.headers["Cookie"] == f"a=1; coze_user={ALICE}"
        assert f.request.headers["X-Later-Addon"] == "1" and f.request.headers["Accept"] == "text/plain"

    def test_untouched_headers_come_back_exactly_as_the_page_sent_them(self, bundle):
        tctx, addons, standin = bundle
        sent = [("accept", "*/*"), ("authorization", f"Bearer user:{ALICE}"), ("cookie", f"coze_user={ALICE}; a=1"),
                ("origin", PAGE)]
        f = api_flow(standin, sent)
        page_fields = f.request.headers.fields
        through_request(tctx, addons, f)
        assert f.request.headers.fields != page_fields
        f.response = tutils.tresp()
        addons[2].responseheaders(f)
        assert f.request.headers.fields == page_fields  # order, spelling and every value

    def test_coze_is_asked_for_uncompressed_answers_and_the_view_keeps_what_the_page_offered(self, bundle):
        # auth reads the code of every non-streamed answer (a revoked token can come as HTTP 200 + 700012006):
        # a compressed one would cost a decoder per answer
        tctx, addons, standin = bundle
        for offered in ("gzip, deflate, br, zstd", None):
            sent = [("Authorization", f"Bearer user:{ALICE}"), ("Origin", PAGE)]
            if offered:
                sent.append(("Accept-Encoding", offered))
            f = api_flow(standin, sent)
            through_request(tctx, addons, f)
            assert f.request.headers.get_all("accept-encoding") == ["identity"]
            f.response = tutils.tresp()
            addons[2].responseheaders(f)
            assert f.request.headers.get_all("accept-encoding") == ([offered] if offered else [])

    def test_flows_in_flight_at_shutdown_hold_the_placeholder(self, bundle):
        # `-w` writes unfinished flows in Save.done, which runs after the script's done.
        tctx, addons, standin = bundle
        f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}")])
        through_request(tctx, addons, f)
        assert f.request.headers["Authorization"].startswith("Bearer czs_")
        addons[2].done()
        assert f.request.headers["Authorization"] == f"Bearer user:{ALICE}"

    def test_refusals_are_local_json(self, bundle):
        tctx, addons, standin = bundle
        f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}"), ("Origin", "https://evil.example")])
        through_request(tctx, addons, f)
        assert f.response.status_code == 403
        assert set(json.loads(f.response.content)) == {"code", "msg"}
        assert standin.exchanges == []

    def test_tag_to_non_coze_host_refused(self, bundle):
        tctx, addons, _ = bundle
        f = tflow.tflow()
        f.request.headers["Authorization"] = f"Bearer user:{ALICE}"
        through_request(tctx, addons, f)
        assert f.response.status_code == 400
        assert "not a configured Coze API host" in json.loads(f.response.content)["msg"]

    def test_invalid_token_code_drops_cache(self, bundle):
        tctx, addons, standin = bundle
        f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}")])
        through_request(tctx, addons, f)
        f.response = tutils.tresp(content=b'{"code":700012006,"msg":"access token invalid"}',
                                  headers=tutils.tresp().headers.__class__([(b"Content-Type", b"application/json")]))
        addons[2].responseheaders(f)
        addons[2].response(f)
        assert addons[0].broker.users() == []

    def test_unconfigured_bundle_refuses_instead_of_forwarding(self, tmp_path, standin):
        settings = CozeSettings()
        addons = [settings, Cors(settings), Auth(settings)]
        with taddons.context(*addons) as tctx:
            tctx.configure(settings, coze_config=str(tmp_path / "missing.json"), coze_origins=PAGE)
            f = api_flow(standin, [("Authorization", f"Bearer user:{ALICE}")])
            f.request.host = "api.coze.cn"
            f.request.port, f.request.scheme = 443, "https"
            through_request(tctx, addons, f)
            assert f.response.status_code == 503
            assert "OAuth config not found" in json.loads(f.response.content)["msg"]


def test_sse_responses_stream():
    f = tflow.tflow(resp=tutils.tresp(headers=tutils.tresp().headers.__class__([(b"Content-Type", b"text/event-stream; charset=utf-8")])))
    Streaming().responseheaders(f)
    assert f.response.stream is True
    g = tflow.tflow(resp=True)
    Streaming().responseheaders(g)
    assert not g.response.stream


def test_request_bodies_are_never_decoded_to_decide():
    # A content-encoded request body that decodes to 512 MiB and says "stream": it counts as asking for a
    # stream (so it is not re-sent), and deciding that costs no decoding at all.
    import resource

    import zstandard

    from coze_mitm.parts.coze_answers import asks_for_stream

    c = zstandard.ZstdCompressor(level=3).compressobj()  # built piece by piece: the test holds no 512 MiB
    raw = c.compress(b'{"stream":false,"bot_id":"7000","x":"')
    raw += b"".join(c.compress(b" " * (1 << 20)) for _ in range(512)) + c.compress(b'"}') + c.flush()
    assert b"stream" in raw and len(raw) < 4 * 1024 * 1024
    req = tutils.treq(method=b"POST", content=b"")
    req.headers["Content-Type"] = "application/json"
    req.headers["Content-Encoding"] = "zstd"
    req.raw_content = raw
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert asks_for_stream(req) is True
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 48
    plain = tutils.treq(method=b"POST", content=b'{"stream":true}')
    plain.headers["Content-Type"] = "application/json"
    assert asks_for_stream(plain) is True
    plain.content = b'{"stream":false}'
    assert asks_for_stream(plain) is False


def test_a_remote_clients_tag_is_refused_as_remote_whatever_its_destination(bundle):
    """local_gate pins a remote client's tunnel to an IP address (coze_allow_remote off), so its request's host is
    no Coze API name: the tag is still refused as from another machine (403/4101), not as a tag to another host."""
    tctx, addons, standin = bundle
    req = tutils.treq(method=b"GET", scheme=b"https", host="192.0.2.10", port=443, path=b"/v1/bots/7000",
                      headers=tutils.treq().headers.__class__([(b"Authorization", f"Bearer user:{ALICE}".encode())]))
    f = tflow.tflow(req=req)
    f.client_conn.peername = ("10.0.0.9", 50000)
    through_request(tctx, addons, f)
    body = json.loads(f.response.content)
    assert (f.response.status_code, body["code"]) == (403, 4101) and "coze_allow_remote" in body["msg"]
    assert standin.exchanges == []
    # an untagged request of a remote client is not coze-mitm's business
    g = tflow.tflow(req=tutils.treq(host="192.0.2.10", port=443))
    g.client_conn.peername = ("10.0.0.9", 50000)
    through_request(tctx, addons, g)
    assert g.response is None
