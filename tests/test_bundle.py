"""addons/bundle.py: the one addon object mitmproxy sees, handing each hook to the parts that implement it.

What mitmproxy did per registered addon must still hold per part: order, every part seeing the event
even after an earlier one answered, awaitables awaited in turn, one failing part not skipping the
others. And the whole bundle, registered as one object, must treat flows exactly as the same parts
registered one by one did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import requests
from mitmproxy import addonmanager, ctx, exceptions, http, options
from mitmproxy.addons import script
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.bundle import Bundle
from tests.conftest import REPO
from tests.clients import session
from tests.harness import Mitmdump, copied_addons

PAGE = "https://chat.example.org"
DEMO_PAGE = "http://coze.mitm"
COZE_PY = REPO / "addons" / "coze.py"


class Part:
    """A part that records which of its hooks ran, and in what order relative to the other parts."""

    def __init__(self, name: str, record: list, **behaviour):
        self.name, self.record, self.behaviour = name, record, behaviour

    def request(self, flow):
        self.record.append((self.name, "request", flow.response is not None))
        action = self.behaviour.get("request")
        return action(flow) if action else None


class Responder(Part):
    def response(self, flow):
        self.record.append((self.name, "response", flow.response is not None))


class Quiet:
    """A part with no flow hook at all."""


def flow():
    return tflow.tflow(req=tutils.treq(), resp=False)


def run(coro):
    return asyncio.run(coro) if coro is not None else None


class TestDispatch:
    def test_each_hook_goes_to_the_parts_that_have_it_in_order(self):
        record: list = []
        bundle = Bundle(Responder("a", record), Quiet(), Part("b", record), Responder("c", record))
        f = tflow.tflow(resp=True)
        with taddons.context(bundle) as tctx:
            asyncio.run(tctx.cycle(bundle, f))
        assert [(name, hook) for name, hook, _ in record] == [
            ("a", "request"), ("b", "request"), ("c", "request"), ("a", "response"), ("c", "response")]

    def test_no_attribute_for_a_hook_no_part_has_and_no_nested_addons(self):
        bundle = Bundle(Part("a", []), Quiet())
        assert hasattr(bundle, "request")
        for absent in ("requestheaders", "responseheaders", "response", "error", "websocket_message"):
            assert not hasattr(bundle, absent)
        # load and done are always there: the bundle names its parts to mitmproxy (addons.get) and takes them back
        # mitmproxy would register every part again, and walk them for every event.
        assert not hasattr(bundle, "addons")
        assert list(addonmanager.traverse([bundle])) == [bundle]

    def test_later_parts_run_after_an_earlier_one_answered(self):
        # mitmproxy calls every addon's hook even once flow.response is set; the parts' own guards decide.
        record: list = []

        def answer(f):
            f.response = http.Response.make(204)

        bundle = Bundle(Part("a", record, request=answer), Part("b", record))
        assert bundle.request(flow()) is None
        assert record == [("a", "request", False), ("b", "request", True)]

    def test_the_common_path_stays_synchronous(self):
        bundle = Bundle(Part("a", []), Part("b", []))
        assert bundle.request(flow()) is None  # no coroutine made when no part needs one

    def test_an_awaitable_is_awaited_before_the_next_part(self):
        record: list = []

        async def slow(f):
            await asyncio.sleep(0.01)
            record.append(("a", "minted", None))

        bundle = Bundle(Part("a", record, request=lambda f: slow(f)), Part("b", record),
                        Part("c", record, request=lambda f: slow(f)), Part("d", record))
        pending = bundle.request(flow())
        assert record == [("a", "request", False)]  # nothing after `a` ran yet
        run(pending)
        assert [(name, what) for name, what, _ in record] == [
            ("a", "request"), ("a", "minted"), ("b", "request"), ("c", "request"), ("a", "minted"), ("d", "request")]

    def test_a_failing_part_is_logged_and_the_others_still_run(self, caplog):
        record: list = []

        def boom(f):
            raise ValueError("part a broke")

        bundle = Bundle(Part("a", record, request=boom), Part("b", record))
        with caplog.at_level(logging.ERROR):
            assert bundle.request(flow()) is None
        assert [name for name, _, _ in record] == ["a", "b"]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "Addon error" in errors[0].getMessage() and "Part.request" in errors[0].getMessage()
        assert errors[0].exc_info[0] is ValueError

    def test_failures_after_an_awaitable_are_logged_too(self, caplog):
        record: list = []

        async def fails_later(f):
            await asyncio.sleep(0)
            raise RuntimeError("exchange broke")

        def boom(f):
            raise ValueError("part c broke")

        bundle = Bundle(Part("a", record, request=fails_later), Part("b", record), Part("c", record, request=boom),
                        Part("d", record))
        with caplog.at_level(logging.ERROR):
            run(bundle.request(flow()))
        assert [name for name, _, _ in record] == ["a", "b", "c", "d"]
        assert [r.exc_info[0] for r in caplog.records if r.levelno == logging.ERROR] == [RuntimeError, ValueError]

    def test_addon_halt_stops_the_event_as_in_mitmproxy(self):
        record: list = []

        def halt(f):
            raise exceptions.AddonHalt()

        bundle = Bundle(Part("a", record, request=halt), Part("b", record))
        with pytest.raises(exceptions.AddonHalt):
            bundle.request(flow())
        assert [name for name, _, _ in record] == ["a"]

    def test_lifecycle_hooks_reach_every_part(self):
        seen = []

        class Options:
            def __init__(self, name):
                self.name = name

            def load(self, loader):
                loader.add_option(f"coze_test_{self.name}", int, 1, "a test option")

            def configure(self, updated):
                if f"coze_test_{self.name}" in updated:
                    if getattr(ctx.options, f"coze_test_{self.name}") < 0:
                        raise exceptions.OptionsError(f"coze_test_{self.name} must not be negative")
                    seen.append(self.name)

        bundle = Bundle(Options("a"), Quiet(), Options("b"))
        with taddons.context(bundle) as taddons_ctx:
            assert "coze_test_a" in taddons_ctx.options and "coze_test_b" in taddons_ctx.options
            taddons_ctx.configure(bundle, coze_test_a=2, coze_test_b=3)
            assert seen == ["a", "b"]
            with pytest.raises(exceptions.OptionsError, match="coze_test_b must not be negative"):
                taddons_ctx.configure(bundle, coze_test_b=-1)


    def test_async_running_and_done_are_awaited_in_order(self):
        """mitmproxy awaits an async running/done; behind the bundle the next part runs only after it."""
        seen = []

        class Sync:
            def running(self):
                seen.append("sync running")

            def done(self):
                seen.append("sync done")

        class Async:
            async def running(self):
                await asyncio.sleep(0)
                seen.append("async running")

            async def done(self):
                await asyncio.sleep(0)
                seen.append("async done")

        bundle = Bundle(Async(), Sync(), Async())
        run(bundle.running())
        run(bundle.done())
        assert seen == ["async running", "sync running", "async running", "async done", "sync done", "async done"]
        # all synchronous: nothing to await, as before
        assert Bundle(Sync()).running() is None


# --------------------------------------------------------------------------- the real bundle

def load_coze(tmp_path):
    """addons/coze.py loaded as mitmproxy loads a script, in a fresh test context; its module and addon tree."""
    tctx = taddons.context()
    tctx.options.update(confdir=str(tmp_path))
    ns = script.load_script(str(COZE_PY))
    tctx.master.addons.register(ns)
    return tctx, ns


def test_coze_py_is_one_addon_object_with_the_parts_in_order(tmp_path):
    tctx, ns = load_coze(tmp_path)
    bundle = ns.bundle
    # Registered as mitmproxy documents: the module's `addons` holds the one Bundle object. The module has no
    # hook names of its own, and the bundle only those some part has: mitmproxy warns "The add_log event has
    # been deprecated" for any addon that merely has that name.
    assert ns.addons == [bundle]
    assert list(addonmanager.traverse([ns])) == [ns, bundle]
    assert not any(hasattr(ns, name) for name in addonmanager.hooks.all_hooks)
    assert not hasattr(bundle, "add_log") and not hasattr(bundle, "update")
    assert bundle.hooks() and bundle.request is bundle.hooks()["request"]
    assert [type(p).__name__ for p in bundle.parts] == [
        "MitmwebGuard", "CozeSettings", "RefusedOriginsLog", "LeafNames", "ProcessTuning", "Login", "LocalGate",
        "Demo", "Pac", "StatusPages", "DirectApi", "Cors", "Auth", "Csp", "Inject", "Streaming", "Accounting",
        "FlowLog", "QuietExit", "Lifecycle"]
    # Every part's options are registered, as when each part was an addon of its own.
    for name in ("coze_config", "coze_origins", "coze_demo", "coze_launcher", "coze_user_daily_tokens",
                 "coze_usage_file", "coze_quiet", "coze_tune_process", "coze_inject"):
        assert name in tctx.options
    # Every hook a part implements is one the bundle has.
    for part in bundle.parts:
        for hook in ("requestheaders", "request", "responseheaders", "response", "error", "http_connect",
                     "tls_clienthello", "tls_start_client", "websocket_start", "websocket_message", "websocket_end"):
            if hasattr(part, hook):
                assert hasattr(bundle, hook), (type(part).__name__, hook)
    tctx.master.addons.invoke_addon_sync(bundle, addonmanager.hooks.DoneHook())


async def drive(manager, f: http.HTTPFlow, upstream: http.Response | None) -> None:
    """The events of one HTTP flow as mitmproxy's proxy server sends them (each followed by `update`)."""
    await manager.handle_lifecycle(http_layer.HttpRequestHeadersHook(f))
    await manager.handle_lifecycle(http_layer.HttpRequestHook(f))
    if f.response is None:
        f.response = upstream
        await manager.handle_lifecycle(http_layer.HttpResponseHeadersHook(f))
    await manager.handle_lifecycle(http_layer.HttpResponseHook(f))


def sample_flows(api_host: str, api_port: int):
    """(flow, upstream answer) pairs covering what the parts do: a fresh one each call."""

    def req(method, host, port, path="/", scheme="http", headers=()):
        return tutils.treq(method=method.encode(), scheme=scheme.encode(), host=host, port=port, authority=b"",
                           path=path.encode(), headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]))

    def answer(content_type=b"application/json", body=b'{"code":0,"msg":""}', extra=()):
        return http.Response.make(200, body, [(b"Content-Type", content_type), (b"Server", b"coze-sandbox"), *extra])

    tag = [("Authorization", "Bearer user:bundle-user-0001"), ("Origin", PAGE), ("Sec-Fetch-Site", "cross-site")]
    cases = [
        ("preflight", req("OPTIONS", api_host, api_port, "/v3/chat", headers=[
            ("Origin", PAGE), ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization,content-type")]), answer()),
        ("tagged, token minted", req("GET", api_host, api_port, "/v1/bots/7000", headers=tag),
         answer(extra=[(b"Access-Control-Allow-Origin", b"*"), (b"Vary", b"Accept-Encoding")])),
        ("tagged, token cached", req("GET", api_host, api_port, "/v1/bots/7000", headers=tag), answer()),
        ("tagged chat, streamed", req("POST", api_host, api_port, "/v3/chat", headers=tag),
         answer(b"text/event-stream", b"")),
        ("other origin", req("GET", api_host, api_port, "/v1/bots/7000", headers=[
            ("Authorization", "Bearer user:bundle-user-0001"), ("Origin", "https://evil.example")]), answer()),
        ("tag to another host", req("GET", "example.org", 80, headers=tag), answer()),
        ("cookie to another host", req("GET", "example.org", 80, headers=[
            ("Cookie", "a=1; coze_user=bundle-user-0001")]), answer(b"text/html", b"<p>hi</p>")),
        ("allowed page", req("GET", "chat.example.org", 443, scheme="https", headers=[("Sec-Fetch-Dest", "document")]),
         answer(b"text/html", b"<p>page</p>", [(b"Content-Security-Policy", b"default-src 'self'")])),
        ("other page, SSE", req("GET", "example.org", 80, "/events"), answer(b"text/event-stream", b"")),
        ("status page", req("GET", "coze.mitm", 80, "/ca-probe.png"), None),
        ("demo: the sandbox by its name", req("POST", "sandbox.coze.mitm", 80, "/v3/chat", headers=[
            ("Authorization", "Bearer user:bundle-user-0001"), ("Origin", DEMO_PAGE), ("Sec-Fetch-Site", "cross-site")]),
         answer(b"text/event-stream", b"")),
    ]
    for name, request, upstream in cases:
        f = tflow.tflow(req=request, resp=False)
        f.client_conn.peername = ("127.0.0.1", 50000)
        yield name, f, upstream


def outcome(f: http.HTTPFlow) -> dict:
    response = f.response
    return {
        "status": response.status_code if response else None,
        "response headers": [(k.lower(), v) for k, v in response.headers.fields if k.lower() != b"date"] if response else None,
        "streamed": type(response.stream).__name__ if response else None,  # True, or accounting's reader
        "body": response.content if response and not response.stream else None,
        "request": (f.request.scheme, f.request.host, f.request.port, f.request.path, f.request.headers.fields),
        "metadata": dict(f.metadata),
        "comment": f.comment,
        "marked": f.marked,
    }


def test_the_bundle_treats_flows_as_the_parts_registered_one_by_one(tmp_path, config_file, standin):
    """The same parts (addons/coze.py's list), once registered with mitmproxy one by one as before and
    once behind the Bundle: every sample flow ends the same way."""
    results = {}
    for shape in ("one by one", "bundle"):
        confdir = tmp_path / shape.replace(" ", "-")
        confdir.mkdir()
        ns = script.load_script(str(COZE_PY))
        addons = ns.bundle.parts if shape == "one by one" else [ns.bundle]
        # confdir first: registered one by one, earlier parts are configured as later ones add options.
        tctx = taddons.context(*addons, options=options.Options(confdir=str(confdir)))
        tctx.options.update(coze_config=str(config_file), coze_origins=f"{PAGE},{DEMO_PAGE}", coze_usage_file="memory",
                            coze_demo=True)
        host, port = standin.audience.split(":")

        async def all_flows():
            ends = {}
            for name, f, upstream in sample_flows(host, int(port)):
                await drive(tctx.master.addons, f, upstream)
                ends[name] = outcome(f)
            return ends

        results[shape] = asyncio.run(all_flows())
        for addon in addons:
            tctx.master.addons.invoke_addon_sync(addon, addonmanager.hooks.DoneHook())
    before, after = results["one by one"], results["bundle"]
    assert before.keys() == after.keys()
    for name in before:
        assert after[name] == before[name], name
    # The samples did reach the parts: what each of them does is visible.
    assert after["preflight"]["status"] == 204
    assert after["tagged, token cached"]["metadata"].get("coze_user") == "bundle-user-0001"
    assert (b"access-control-allow-origin", PAGE.encode()) in after["tagged, token minted"]["response headers"]
    assert after["tagged chat, streamed"]["streamed"] == "SSEUsageReader" and after["other page, SSE"]["streamed"] == "bool"
    assert after["demo: the sandbox by its name"]["metadata"].get("coze_user") == "bundle-user-0001"
    assert after["other origin"]["status"] == 403 and after["tag to another host"]["status"] == 400
    assert (b"Cookie", b"a=1") in after["cookie to another host"]["request"][4]
    assert after["status page"]["status"] == 200


class Skippable(Part):
    """A part the bundle may leave out: switched off (`in_use`), or never acting on a Coze API request."""

    def __init__(self, name, record, acts_on_coze_api=True):
        super().__init__(name, record)
        self.acts_on_coze_api, self.in_use = acts_on_coze_api, True

    def configure(self, updated):
        if "switch" in updated:
            self.in_use = updated["switch"]


def test_parts_that_never_act_on_the_coze_api_do_not_see_its_requests():
    record: list = []
    bundle = Bundle(Skippable("pages", record, acts_on_coze_api=False), Part("auth", record),
                    coze_api_only=lambda request: request.host == "api.coze.cn")
    for host in ("api.coze.cn", "chat.example.org", "coze.mitm"):
        f = tflow.tflow(req=tutils.treq(host=host), resp=False)
        assert bundle.request(f) is None
    assert [(name, f_) for name, _, f_ in record] == [
        ("auth", False), ("pages", False), ("auth", False), ("pages", False), ("auth", False)]


def test_a_switched_off_part_gets_no_event_until_it_is_switched_on_again():
    record: list = []
    switchable = Skippable("demo", record)
    bundle = Bundle(switchable, Part("auth", record))
    bundle.configure({"switch": False})  # the bundle reads every part's `in_use` again after configure
    bundle.request(flow())
    bundle.configure({"switch": True})
    bundle.request(flow())
    assert [name for name, _, _ in record] == ["auth", "demo", "auth"]


def test_a_page_the_api_origin_serves_itself_keeps_its_page_parts(tmp_path, config_file, standin):
    """A page origin that is also the API origin (a local Coze Studio serves its pages and its API on one origin) is
    not a Coze-API-only request: its documents still get their CSP widened through the bundle."""
    host, port = standin.audience.split(":")
    api_origin = f"http://{host}:{port}"
    ns = script.load_script(str(COZE_PY))
    tctx = taddons.context(ns.bundle, options=options.Options(confdir=str(tmp_path)))
    tctx.options.update(coze_config=str(config_file), coze_origins=f"{PAGE},{api_origin}", coze_usage_file="memory")

    def document(to_host: str, to_port: int, scheme: str = "http") -> http.HTTPFlow:
        request = tutils.treq(method=b"GET", scheme=scheme.encode(), host=to_host, port=to_port, path=b"/",
                              authority=b"", headers=http.Headers([(b"Sec-Fetch-Dest", b"document")]))
        f = tflow.tflow(req=request, resp=False)
        f.client_conn.peername = ("127.0.0.1", 50000)
        asyncio.run(drive(tctx.master.addons, f, http.Response.make(
            200, b"<p>page</p>", [(b"Content-Type", b"text/html"), (b"Content-Security-Policy", b"default-src 'self'")])))
        return f

    assert not ns.settings.is_coze_api_only(document(host, int(port)).request)
    assert api_origin in document(host, int(port)).response.headers["Content-Security-Policy"]
    assert api_origin in document("chat.example.org", 443, "https").response.headers["Content-Security-Policy"]
    tctx.options.update(coze_origins=PAGE)  # now the API origin is the API's alone: the page parts leave it be
    f = document(host, int(port))
    assert ns.settings.is_coze_api_only(f.request)
    assert f.response.headers["Content-Security-Policy"] == "default-src 'self'"
    tctx.master.addons.invoke_addon_sync(ns.bundle, addonmanager.hooks.DoneHook())


def test_the_demo_switched_on_while_running_serves_its_page(tmp_path, config_file, standin):
    ns = script.load_script(str(COZE_PY))
    tctx = taddons.context(ns.bundle, options=options.Options(confdir=str(tmp_path)))
    tctx.options.update(coze_config=str(config_file), coze_origins=DEMO_PAGE, coze_usage_file="memory")

    def demo_page() -> http.Response:
        f = tflow.tflow(req=tutils.treq(method=b"GET", scheme=b"http", host="coze.mitm", port=80, path=b"/demo",
                                        authority=b""), resp=False)
        f.client_conn.peername = ("127.0.0.1", 50000)
        asyncio.run(drive(tctx.master.addons, f, None))
        return f.response

    assert b"coze-mitm demo" not in (demo_page().content or b"")
    tctx.options.update(coze_demo=True)
    page = demo_page()
    assert page.status_code == 200 and b"<html" in page.content.lower()
    tctx.master.addons.invoke_addon_sync(ns.bundle, addonmanager.hooks.DoneHook())


# --------------------------------------------------------------------------- in a real mitmdump


@pytest.mark.process
def test_script_reload_keeps_the_bundle_working(tmp_path, standin, config_file):
    """mitmproxy reloads a script whose file changed: the old bundle is removed, the new one registered."""
    copy = tmp_path / "repo"
    coze_py = copied_addons(copy)
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    proxy = Mitmdump(confdir, [f"coze_config={config_file}", f"coze_origins={PAGE}"], script=False,
                     extra_args=["-s", str(coze_py)]).start()
    try:
        s = session(proxy)

        def preflight() -> requests.Response:
            return s.options(standin.base_url + "/v3/chat", headers={
                "Origin": PAGE, "Access-Control-Request-Method": "POST"}, timeout=10)

        assert preflight().status_code == 204
        assert proxy.output.count("Loading script") == 1
        later = time.time() + 5
        os.utime(coze_py, (later, later))
        # Reloaded and configured again: settings says its mode once per configure.
        assert proxy.wait_for_output(r"Loading script[\s\S]*JWT mode[\s\S]*Loading script[\s\S]*JWT mode",
                                     timeout=10), proxy.output
        answer = preflight()
        assert answer.status_code == 204 and answer.headers["Access-Control-Allow-Origin"] == PAGE
        status = s.get("http://coze.mitm/status.json", timeout=10)
        assert status.status_code == 200
        assert "Addon error" not in proxy.output and "already exists" not in proxy.output, proxy.output
    finally:
        proxy.stop()


def test_a_bad_value_once_running_is_refused_and_rolled_back(tmp_path, config_file):
    """At start-up a bad coze_* value is one ERROR line (mitmdump exits); once running it is an OptionsError,
    so mitmproxy keeps the value in force and mitmweb shows why (tests/test_config.py covers start-up)."""
    ns = script.load_script(str(COZE_PY))
    tctx = taddons.context(ns, options=options.Options(confdir=str(tmp_path)))  # in the chain: told of changes
    tctx.options.update(coze_config=str(config_file), coze_origins=PAGE, coze_usage_file="memory")
    tctx.master.addons.invoke_addon_sync(ns.bundle, addonmanager.hooks.RunningHook())
    for bad in ({"coze_token_ttl": 5}, {"coze_origins": "not an origin"}, {"coze_user_daily_tokens": -1},
                {"coze_sdk_url": "javascript:alert(1)"}, {"coze_csp_extra": "script-src 'nonce-abc'"},
                {"coze_config": str(tmp_path / "missing.json")}):
        with pytest.raises(exceptions.OptionsError, match="coze-mitm: "):
            tctx.options.update(**bad)
        name = next(iter(bad))
        assert getattr(tctx.options, name) != bad[name], name  # rolled back by mitmproxy
    assert ns.settings.broker is not None and ns.settings.problem == ""  # the settings in force still serve
    assert tctx.options.coze_token_ttl == 900 and tctx.options.coze_origins == PAGE
    tctx.master.addons.invoke_addon_sync(ns.bundle, addonmanager.hooks.DoneHook())


def test_a_second_bundle_with_its_own_name_registers_beside_coze_mitm():
    """mitmproxy refuses two addons of one name ("An addon called 'coze-mitm' already exists"): a bundle another
    script makes (the bench's probes and references) names itself."""
    with taddons.context(Bundle(Quiet()), Bundle(Quiet(), name="coze-mitm-probe")) as tctx:
        assert tctx.master.addons.get("coze-mitm") and tctx.master.addons.get("coze-mitm-probe")
    with pytest.raises(Exception, match="already exists"):
        taddons.context(Bundle(Quiet()), Bundle(Quiet()))


def test_mitmproxy_finds_each_part_by_name_and_forgets_them_with_the_bundle():
    """ctx.master.addons.get("coze-mitm.cors") finds coze.py's Cors part; the names are the bundle's own, so another
    script's addon called "cors" loads beside it; removing the bundle (a script reload) takes the names back."""
    class Cors:
        pass

    cors, theirs = Cors(), Cors()
    with taddons.context(theirs) as tctx:  # another script's addon named "cors"
        bundle = Bundle(Quiet(), cors)
        tctx.master.addons.add(bundle)
        assert tctx.master.addons.get("coze-mitm.cors") is cors
        assert tctx.master.addons.get("coze-mitm.quiet") is bundle.parts[0]
        assert tctx.master.addons.get("cors") is theirs
        tctx.master.addons.remove(bundle)
        assert tctx.master.addons.get("coze-mitm.cors") is None and tctx.master.addons.get("cors") is theirs
        tctx.master.addons.add(Bundle(Cors(), name="coze-mitm"))  # the reloaded script's bundle names its own
        found = tctx.master.addons.get("coze-mitm.cors")
        assert isinstance(found, Cors) and found is not cors


@pytest.mark.process
def test_a_neighbour_addon_with_a_parts_class_name_loads_beside_coze_mitm(tmp_path):
    """A second script whose addon is called like one of coze-mitm's parts (Cors) starts beside coze.py (mitmproxy
    refuses two addons of one name: the parts' names are the bundle's)."""
    neighbour = tmp_path / "neighbour.py"
    neighbour.write_text("class Cors:\n    pass\n\naddons = [Cors()]\n")
    (tmp_path / "conf").mkdir()
    proxy = Mitmdump(tmp_path / "conf", ["coze_pat=pat_" + "N" * 40], extra_args=["-s", str(neighbour)])
    try:
        proxy.start()
        assert "already exists" not in proxy.output and "Addon error" not in proxy.output, proxy.output
    finally:
        proxy.stop()
