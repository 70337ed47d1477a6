"""http://coze.mitm/: the status page, status.json and the filled userscript; nothing secret, nothing injectable."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time

import pytest
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.parts import status as status_mod
from coze_mitm.core.identity import short_id
from coze_mitm.core.csp_policy import CN_SDK_URL
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.pages import status_page
from coze_mitm.pages.status_page import PAGE_CSP
from coze_mitm.pages.userscript_fill import NO_ORIGIN_MATCH, base_version, fill_userscript, set_version, version_stamp
from coze_mitm.parts.status import StatusPages

PAT = "pat_" + "S3cr3tPat" * 4
PAGE = "https://chat.example.org"
HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>\u2028'
TEMPLATE = status_mod.USERSCRIPT_PATH.read_text(encoding="utf-8")
FULL_ID = "1732000000001-AbCdEfGhIjKlMnOpQrStUv"


class FakeBroker:
    """Stands in for the token broker: a mode, counters and some cached users."""

    mode = "jwt"
    exchanges = 3
    failures = 1

    def __init__(self, users):
        self._users = users

    def users(self):
        return self._users

    def close(self):
        pass


@pytest.fixture
def tctx(tmp_path):
    settings = CozeSettings()
    pages = StatusPages(settings)
    with taddons.context(settings, pages) as ctx:
        ctx.configure(settings, confdir=str(tmp_path), coze_pat=PAT, coze_api_base="https://api.coze.cn",
                      coze_origins=f"{PAGE},http://localhost:3000", coze_bot_id="7350000000000000001",
                      coze_title="Help desk")
        ctx.pages, ctx.settings = pages, settings
        yield ctx


def get(pages, path="/", method="GET", host="coze.mitm", scheme="http"):
    port = 443 if scheme == "https" else 80
    f = tflow.tflow(req=tutils.treq(method=method.encode(), host=host, port=port, scheme=scheme.encode(),
                                    path=path.encode(), headers=tutils.treq().headers.__class__([])))
    pages.request(f)
    return f


def body_of(f) -> str:
    return f.response.get_text()


def meta(script: str, key: str) -> list[str]:
    return re.findall(rf"^// @{key}\s+(.*?)\s*$", script, re.M)


def config_value(script: str, key: str):
    m = re.search(rf"^  {key}: (.*), // @coze-mitm {key}\b", script, re.M)
    return json.loads(m[1])


class TestFillUserscript:
    def test_one_match_per_origin_and_values_filled(self):
        text = fill_userscript(TEMPLATE, ["https://b.example", "http://localhost:3000"],
                               {"botId": "7350000000000000001", "title": "Help", "sdkUrl": "https://cdn.example/sdk.js"})
        assert meta(text, "match") == ["http://localhost:3000/*", "https://b.example/*"]
        assert config_value(text, "botId") == "7350000000000000001"
        assert config_value(text, "title") == "Help"
        assert config_value(text, "sdkUrl") == "https://cdn.example/sdk.js"
        assert config_value(text, "statusUrl") == "http://coze.mitm/status.json"  # untouched
        assert text.startswith("// ==UserScript==\n")
        assert len(text.splitlines()) == len(TEMPLATE.splitlines()) + 1

    def test_every_placeholder_match_replaced_in_place(self):
        several = TEMPLATE.replace("// @match ", "// @match        https://x.example/*\n// @match ", 1)
        assert len(meta(several, "match")) == 2
        text = fill_userscript(several, [PAGE], {})
        assert meta(text, "match") == [f"{PAGE}/*"]
        assert text.index("@match") < text.index("@grant")
        bare = re.sub(r"^// @match.*\n", "", TEMPLATE, flags=re.M)
        text = fill_userscript(bare, [PAGE], {})
        assert meta(text, "match") == [f"{PAGE}/*"]
        assert text.index("@match") < text.index("// ==/UserScript==")

    def test_no_origin_matches_nothing_rather_than_everything(self):
        text = fill_userscript(TEMPLATE, [], {})
        assert meta(text, "match") == [NO_ORIGIN_MATCH]
        assert not meta(text, "include")

    def test_the_proxy_own_pages_never_matched(self):
        text = fill_userscript(TEMPLATE, ["http://coze.mitm", PAGE], {})
        assert meta(text, "match") == [f"{PAGE}/*"]
        assert meta(fill_userscript(TEMPLATE, ["http://coze.mitm"], {}), "match") == [NO_ORIGIN_MATCH]

    def test_hostile_values_stay_one_string_on_one_line(self):
        text = fill_userscript(TEMPLATE, [PAGE], {"botId": HOSTILE + "\n// @match https://evil/*", "title": HOSTILE})
        assert meta(text, "match") == [f"{PAGE}/*"]
        assert config_value(text, "botId") == HOSTILE + "\n// @match https://evil/*"
        assert config_value(text, "title") == HOSTILE
        assert "\u2028" not in text  # a raw U+2028 would end the line in older JS engines

    @pytest.mark.process
    @pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
    def test_filled_script_still_parses(self, tmp_path):
        text = fill_userscript(TEMPLATE, [PAGE], {"botId": HOSTILE, "title": HOSTILE, "sdkUrl": CN_SDK_URL})
        path = tmp_path / "filled.user.js"
        path.write_text(set_version(text, "0.1.0.123"))
        assert subprocess.run(["node", "--check", str(path)], capture_output=True).returncode == 0

    def test_version_helpers(self):
        assert base_version(TEMPLATE) == meta(TEMPLATE, "version")[0]
        assert meta(set_version(TEMPLATE, "9.9.9.42"), "version") == ["9.9.9.42"]


class TestVersionStamp:
    def test_stable_while_nothing_changes_rising_when_something_does(self, tmp_path):
        state = tmp_path / "v.json"
        first, kept = version_stamp("a", state, now=1000)
        assert (first, kept) == (1000, True)
        assert version_stamp("a", state, now=5000) == (1000, True)  # a restart, same settings
        second, _ = version_stamp("b", state, now=2000)
        assert second == 2000
        third, _ = version_stamp("a", state, now=1500)  # clock went backwards: still rises
        assert third == 2001
        assert version_stamp("a", state, now=9999) == (2001, True)

    def test_broken_or_unwritable_state(self, tmp_path):
        state = tmp_path / "v.json"
        state.write_text("{not json")
        assert version_stamp("a", state, now=10)[0] == 10
        missing_dir = tmp_path / "nope" / "v.json"
        assert version_stamp("a", missing_dir, now=20) == (20, False)
        assert version_stamp("a", None, now=30) == (30, False)


class TestPages:
    def test_status_json(self, tctx):
        f = get(tctx.pages, "/status.json")
        assert f.response.status_code == 200
        assert f.response.headers["content-type"].startswith("application/json")
        data = json.loads(body_of(f))
        assert data["service"] == "coze-mitm"
        assert data["mode"] == "pat"
        assert data["api"] == ["https://api.coze.cn"]
        assert data["origins"] == ["http://localhost:3000", PAGE]
        assert data["bot_id"] == "7350000000000000001"
        assert data["userscript"]["url"] == "http://coze.mitm/coze-chat.user.js"
        assert data["ca"] == {"fetched_over_https": False, "probably_trusted": None, "install_from": "http://mitm.it"}
        assert "access-control-allow-origin" not in f.response.headers

    def test_bot_id_absent_when_not_configured(self, tctx):
        tctx.configure(tctx.pages, coze_bot_id="")
        assert "bot_id" not in json.loads(body_of(get(tctx.pages, "/status.json")))

    def test_html_page(self, tctx):
        f = get(tctx.pages, "/")
        h = f.response.headers
        assert h["content-type"] == "text/html; charset=utf-8"
        assert h["content-security-policy"] == PAGE_CSP
        assert h["x-frame-options"] == "DENY"
        assert not any(k.lower().startswith("access-control-") for k in h)
        text = body_of(f)
        for needle in ("PAT mode", "https://api.coze.cn", PAGE, "http://localhost:3000", "7350000000000000001",
                       'href="/coze-chat.user.js"', "Install userscript", "http://mitm.it", 'id="ca-state"',
                       "Help desk", "every user shares one Coze identity"):
            assert needle in text, needle

    def test_inline_style_and_script_match_the_csp_hashes(self, tctx):
        text = body_of(get(tctx.pages, "/"))
        assert f"<style>{status_page.STYLE}</style>" in text
        assert f"<script>{status_page.PROBE_SCRIPT}</script>" in text
        markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
        assert not re.search(r"<[^>]*\s(style|on\w+)\s*=", markup, re.I)  # the CSP would block them

    def test_over_https_the_page_says_the_ca_is_probably_trusted(self, tctx):
        f = get(tctx.pages, "/", scheme="https")
        text = body_of(f)
        assert "came over HTTPS" in text and 'id="ca-state"' not in text
        data = json.loads(body_of(get(tctx.pages, "/status.json", scheme="https")))
        assert data["ca"]["fetched_over_https"] is True and data["ca"]["probably_trusted"] is True

    def test_probe_image(self, tctx):
        f = get(tctx.pages, "/ca-probe.png", scheme="https")
        assert f.response.headers["content-type"] == "image/png"
        assert f.response.raw_content.startswith(b"\x89PNG")
        assert "cross-origin-resource-policy" not in f.response.headers  # loaded from http://coze.mitm

    def test_userscript_served_filled(self, tctx):
        f = get(tctx.pages, "/coze-chat.user.js")
        assert f.response.headers["content-type"] == "text/javascript; charset=utf-8"
        script = body_of(f)
        assert meta(script, "match") == ["http://localhost:3000/*", f"{PAGE}/*"]
        assert config_value(script, "botId") == "7350000000000000001"
        assert config_value(script, "title") == "Help desk"
        assert config_value(script, "sdkUrl") == CN_SDK_URL
        version = meta(script, "version")[0]
        assert version == json.loads(body_of(get(tctx.pages, "/status.json")))["userscript"]["version"]
        assert re.fullmatch(rf"{re.escape(base_version(TEMPLATE))}\.\d+", version)

    def test_userscript_read_once(self, tctx, monkeypatch):
        def boom(*a, **kw):
            raise AssertionError("read per request")
        monkeypatch.setattr(type(status_mod.USERSCRIPT_PATH), "read_text", boom)
        for _ in range(3):
            assert get(tctx.pages, "/coze-chat.user.js").response.status_code == 200

    def test_version_rises_with_settings_and_survives_a_restart(self, tctx, tmp_path):
        def version():
            return meta(body_of(get(tctx.pages, "/coze-chat.user.js")), "version")[0]

        def as_tuple(v):
            return tuple(int(x) for x in v.split("."))

        v1 = version()
        tctx.configure(tctx.pages, coze_title="Help desk")  # same value: same version
        assert version() == v1
        tctx.configure(tctx.pages, coze_bot_id="7350000000000000002")
        v2 = version()
        assert as_tuple(v2) > as_tuple(v1)
        tctx.configure(tctx.pages, coze_origins=f"{PAGE},https://other.example")
        v3 = version()
        assert as_tuple(v3) > as_tuple(v2)
        # A new process with the same settings and confdir serves the same version.
        settings = CozeSettings()
        again = StatusPages(settings)
        with taddons.context(settings, again) as ctx2:
            ctx2.configure(settings, confdir=str(tmp_path), coze_pat=PAT, coze_api_base="https://api.coze.cn",
                           coze_origins=f"{PAGE},https://other.example", coze_bot_id="7350000000000000002",
                           coze_title="Help desk")
            assert meta(body_of(get(again, "/coze-chat.user.js")), "version")[0] == v3

    def test_hostile_settings_are_escaped_everywhere(self, tctx):
        tctx.configure(tctx.pages, coze_bot_id=HOSTILE, coze_title=HOSTILE)
        text = body_of(get(tctx.pages, "/"))
        assert "<img src=x" not in text and "<script>alert" not in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in text
        assert json.loads(body_of(get(tctx.pages, "/status.json")))["bot_id"] == HOSTILE.strip()
        script = body_of(get(tctx.pages, "/coze-chat.user.js"))
        assert config_value(script, "title") == HOSTILE

    def test_users_counters_refusals_and_errors(self, tctx):
        now = time.time()
        tctx.settings.broker = FakeBroker([(FULL_ID, now + 600), ("short-id-1", now + 30)])
        stats = tctx.pages.stats
        stats.requests, stats.injected, stats.preflights = 12, 9, 4
        stats.refused("origin-not-allowed")
        stats.refused("origin-not-allowed")
        stats.refused("malformed-tag")
        stats.error("exchange-refused:invalid_client", "Coze refused <b>it</b>: czs_leakedtoken123 (logid 20261127ABC)",
                    "20261127ABC")
        text = body_of(get(tctx.pages, "/"))
        assert short_id(FULL_ID) in text
        assert FULL_ID not in text
        assert "short-id-1" in text
        assert "origin-not-allowed</code></td><td>2" in text
        assert "malformed-tag</code></td><td>1" in text
        assert "20261127ABC" in text and "&lt;b&gt;it&lt;/b&gt;" in text
        assert "czs_leakedtoken123" not in text
        data = json.loads(body_of(get(tctx.pages, "/status.json")))
        assert [u["user"] for u in data["users"]] == ["short-id-1", short_id(FULL_ID)]  # most recent first
        assert 590 <= data["users"][1]["expires_in_seconds"] <= 600
        assert data["counters"]["refusals"] == {"malformed-tag": 1, "origin-not-allowed": 2}
        assert data["last_errors"][0]["logid"] == "20261127ABC"
        assert "czs_leakedtoken123" not in json.dumps(data)

    def test_a_new_counter_is_one_field_and_one_line(self, tctx, monkeypatch):
        """docs/architecture.md's traced change (c): a counter added to core/stats.py (its field and its SHOWN line)
        and counted by a part shows in status.json, as a row of the page and in /metrics, with no other edit."""
        from coze_mitm.core import stats as stats_module

        monkeypatch.setattr(stats_module, "SHOWN", stats_module.SHOWN + (
            ("websocket_chats", "WebSocket chats relayed", "WebSocket chats relayed to Coze."),))
        tctx.pages.stats.websocket_chats = 7  # what the counting part does (the field: a dataclass field)
        assert json.loads(body_of(get(tctx.pages, "/status.json")))["counters"]["websocket_chats"] == 7
        assert "WebSocket chats relayed</td><td>7" in body_of(get(tctx.pages, "/"))
        text = body_of(get(tctx.pages, "/metrics"))
        assert "# TYPE coze_mitm_websocket_chats_total counter" in text
        assert "\ncoze_mitm_websocket_chats_total 7\n" in text

    def test_no_secret_on_any_page(self, tctx):
        for path in ("/", "/status.json", "/coze-chat.user.js", "/nope"):
            for scheme in ("http", "https"):
                f = get(tctx.pages, path, scheme=scheme)
                assert PAT not in f.response.get_text()
                assert PAT not in str(f.response.headers)

    def test_read_only(self, tctx):
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            f = get(tctx.pages, "/status.json", method=method)
            assert f.response.status_code == 405
            assert "access-control-allow-origin" not in f.response.headers

    def test_unknown_path_and_other_hosts(self, tctx):
        assert get(tctx.pages, "/secret").response.status_code == 404
        for host in ("example.org", "coze.mitm.evil.example", "api.coze.cn"):
            assert get(tctx.pages, "/status.json", host=host).response is None

    def test_https_connect_accepted_without_an_upstream(self, tctx):
        f = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="coze.mitm", port=443, scheme=b"", path=b"",
                                        authority=b"coze.mitm:443"))
        tctx.pages.http_connect(f)
        assert f.response.status_code == 200
        other = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="example.org", port=443, scheme=b"", path=b"",
                                            authority=b"example.org:443"))
        tctx.pages.http_connect(other)
        assert other.response is None

    def test_bad_sdk_url_is_one_clear_error(self, tctx, caplog):
        with caplog.at_level(logging.ERROR):
            tctx.configure(tctx.pages, coze_sdk_url="javascript:alert(1)")
        assert "coze_sdk_url" in caplog.text
        script = body_of(get(tctx.pages, "/coze-chat.user.js"))
        assert config_value(script, "sdkUrl") == CN_SDK_URL
        assert "coze_sdk_url" in json.loads(body_of(get(tctx.pages, "/status.json")))["problems"][0]

    def test_sdk_url_follows_the_api_site(self, tctx):
        tctx.configure(tctx.pages, coze_api_base="https://api.coze.com")
        script = body_of(get(tctx.pages, "/coze-chat.user.js"))
        assert "sf-cdn.coze.com" in config_value(script, "sdkUrl")


@pytest.mark.parametrize("option, fix", [
    ("coze_sdk_url=javascript:alert(1)", "coze_sdk_url"),
    ("coze_csp_extra=frame-ancestors *", "not a fetch directive"),
])
@pytest.mark.process
def test_bad_option_stops_a_real_mitmdump_with_one_line(tmp_path, option, fix):
    from tests.harness import Mitmdump
    proc = Mitmdump(tmp_path, [f"coze_pat={PAT}", "coze_origins=https://chat.example.org", option])
    assert proc.run_to_exit() == 1
    errors = [line for line in proc.lines if "coze-mitm:" in line and "PAT mode" not in line]
    assert len(errors) == 1 and fix in errors[0], proc.output
    assert "listening at" not in proc.output and "Error logged during startup" not in proc.output  # a quiet failing start
    assert "Traceback" not in proc.output and PAT not in proc.output


@pytest.mark.process
def test_served_userscript_names_the_port_the_proxy_really_listens_on(tmp_path):
    """--listen-port 0: the port is only known once the server is up; @description and the notice name it.

    Also https://coze.mitm with the default connection_strategy (eager): answered without a warning."""
    from tests.clients import session
    from tests.harness import Mitmdump
    proc = Mitmdump(tmp_path, [f"coze_pat={PAT}", f"coze_origins={PAGE}"]).start()
    try:
        script = session(proc).get("http://coze.mitm/coze-chat.user.js", timeout=10).text
        status = session(proc).get("http://coze.mitm/status.json", timeout=10).json()
        https_status = session(proc).get("https://coze.mitm/status.json", timeout=10,
                                         verify=str(tmp_path / "mitmproxy-ca-cert.pem")).json()
    finally:
        proc.stop()
    address = f"127.0.0.1:{proc.port}"
    assert https_status["service"] == "coze-mitm" and https_status["ca"]["fetched_over_https"] is True
    assert "Unable to establish TLS" not in proc.output  # no attempt to reach a server called coze.mitm
    assert f"coze-mitm proxy ({address})" in meta(script, "description")[0]
    assert config_value(script, "proxy") == address
    assert status["proxy"] == address
    assert status["api_base"] == f"http://{address}"  # the bound port, as a client with no proxy setting names it
    assert "127.0.0.1:8080" not in meta(script, "description")[0]


@pytest.mark.parametrize("host, port, shown", [
    ("", None, "127.0.0.1:8080"), ("", 9000, "127.0.0.1:9000"), ("0.0.0.0", 8081, "127.0.0.1:8081"),
    ("::", 8082, "127.0.0.1:8082"), ("192.168.1.5", 8080, "192.168.1.5:8080"), ("::1", 8083, "[::1]:8083"),
    ("proxy.lan", 3128, "proxy.lan:3128"),
])
def test_proxy_address_as_a_browser_names_it(host, port, shown):
    assert status_mod.proxy_address(host, port) == shown


def test_filled_proxy_address_and_hostile_one_refused():
    text = fill_userscript(TEMPLATE, [PAGE], {}, proxy="127.0.0.1:9999")
    assert "(127.0.0.1:9999)" in meta(text, "description")[0]
    assert config_value(text, "proxy") == "127.0.0.1:9999"
    with pytest.raises(ValueError):
        fill_userscript(TEMPLATE, [PAGE], {}, proxy="x) @match https://evil/*")


@pytest.mark.parametrize("host, port, api_base", [
    ("", 8080, "http://127.0.0.1:8080"), ("0.0.0.0", 9001, "http://127.0.0.1:9001"), ("127.0.0.1", 9002,
    "http://127.0.0.1:9002"), ("::1", 9003, "http://[::1]:9003"), ("localhost", 9004, "http://127.0.0.1:9004"),
    ("192.168.1.5", 9005, None), ("proxy.lan", 9006, None),  # not on loopback: its own address is no API base
])
def test_api_base_on_the_status_page_and_in_json(tctx, host, port, api_base):
    tctx.configure(tctx.pages, listen_host=host, listen_port=port)
    assert json.loads(body_of(get(tctx.pages, "/status.json")))["api_base"] == api_base
    html = body_of(get(tctx.pages, "/"))
    lines = [line for line in html.splitlines() if "API base for your own page" in line]
    if api_base is None:
        assert lines == [] and f":{port}</code>" in html  # the proxy's address is still shown, as a proxy
    else:
        assert len(lines) == 1 and f"<code>{api_base}</code>" in lines[0]


def test_no_api_base_in_reverse_or_socks_mode(tctx):
    for mode in (["reverse:http://127.0.0.1:9000"], ["socks5"], ["transparent"]):
        tctx.configure(tctx.pages, mode=mode)
        assert json.loads(body_of(get(tctx.pages, "/status.json")))["api_base"] is None, mode
    for mode in (["upstream:http://127.0.0.1:3128"], ["regular", "socks5@1080"]):
        tctx.configure(tctx.pages, mode=mode)
        assert json.loads(body_of(get(tctx.pages, "/status.json")))["api_base"] == "http://127.0.0.1:8080", mode


def test_bound_port_kept_across_other_option_changes(tctx):
    """After `running` learnt the bound port (listen_port 0), editing another option keeps naming it."""
    tctx.pages._bound_port = 41943  # what running() reads from the proxy server
    tctx.configure(tctx.pages, coze_title="Other title")
    assert config_value(body_of(get(tctx.pages, "/coze-chat.user.js")), "proxy") == "127.0.0.1:41943"
    tctx.configure(tctx.pages, listen_port=9000)  # servers restarted on the new port
    assert config_value(body_of(get(tctx.pages, "/coze-chat.user.js")), "proxy") == "127.0.0.1:9000"
    assert json.loads(body_of(get(tctx.pages, "/status.json")))["api_base"] == "http://127.0.0.1:9000"


class TestTeam:
    """Identities, usage and budgets on the status pages (the accounting addon's book, in memory)."""

    @pytest.fixture
    def team(self, tctx):
        from coze_mitm.parts.accounting import Accounting

        acc = Accounting()
        acc.daily_tokens = 50
        tctx.pages.usage = acc.shown
        book = acc.book
        book.chat(FULL_ID)
        book.tokens(FULL_ID, 7)
        for _ in range(2):
            book.chat("login:alice")
        book.tokens("login:alice", 60)
        book.chat('login:<b>"zoë"</b>')  # proxyauth=any: names come from clients
        book.tokens('login:<b>"zoë"</b>', 3)
        return tctx

    def test_status_json_usage_biggest_spenders_first(self, team):
        data = json.loads(body_of(get(team.pages, "/status.json")))
        assert data["usage"] == [
            {"user": "alice", "chats": 2, "tokens": 60, "tokens_today": 60},
            {"user": short_id(FULL_ID), "chats": 1, "tokens": 7, "tokens_today": 7},
            {"user": '<b>"zoë"</b>', "chats": 1, "tokens": 3, "tokens_today": 3},
        ]
        assert FULL_ID not in json.dumps(data)  # a full tag id would let a reader act as that user
        assert data["daily_token_budget"] == 50
        assert data["usage_users"] == 3 and data["usage_totals"] == {"chats": 4, "tokens": 70, "tokens_today": 70}
        assert data["usage_file"] == {"path": None, "ok": True, "error": ""}  # memory only, by choice
        assert data["identities"]["mode"] == "none"
        assert "self-asserted" in data["identities"]["about"]

    def test_html_usage_table_escaped_and_budget_shown(self, team):
        text = body_of(get(team.pages, "/"))
        assert "<b>\"zoë\"" not in text and "&lt;b&gt;&#34;zoë&#34;&lt;/b&gt;" in text
        rows = re.findall(r"<tr><td><code>([^<]*)</code></td><td>(\d+)</td><td>(\d+)</td><td>(\d+)", text)
        assert [r[0] for r in rows] == ["alice", short_id(FULL_ID), "&lt;b&gt;&#34;zoë&#34;&lt;/b&gt;"]
        assert "(budget reached)" in text.split("alice", 1)[1].split("</tr>", 1)[0]  # 60 of 50 today
        assert "<b>50</b> Coze tokens per user and UTC day" in text
        assert "user (shortened id)" in text and "self-asserted" in text

    def test_login_mode_shown_and_served_to_the_userscript(self, team):
        assert config_value(body_of(get(team.pages, "/coze-chat.user.js")), "loginMode") == "none"
        team.settings.login_mode = "htpasswd"
        team.configure(team.pages, coze_title="Team desk")  # any option edit rebuilds the served script
        data = json.loads(body_of(get(team.pages, "/status.json")))
        assert data["identities"] == {"mode": "htpasswd", "about": "proxy logins (htpasswd file)"}
        text = body_of(get(team.pages, "/"))
        assert "<th>login</th>" in text and "user (shortened id)" not in text
        # (this context is in PAT mode: logins are counted apart but share one Coze history, and the page says so)
        assert "PAT mode gives every login the same Coze identity" in text and "history follows the login" not in text
        assert config_value(body_of(get(team.pages, "/coze-chat.user.js")), "loginMode") == "htpasswd"

    def test_metrics_parse(self, team):
        from prometheus_client.parser import text_string_to_metric_families

        team.pages.stats.injected, team.pages.stats.preflights = 5, 2
        team.pages.stats.refused("budget")
        f = get(team.pages, "/metrics")
        assert f.response.status_code == 200
        assert f.response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(body_of(f)) for s in fam.samples}
        assert samples[("coze_mitm_tokens_total", (("user", "alice"),))] == 60
        assert samples[("coze_mitm_chats_total", (("user", short_id(FULL_ID)),))] == 1
        assert samples[("coze_mitm_tokens_total", (("user", '<b>"zoë"</b>'),))] == 3
        assert samples[("coze_mitm_requests_total", (("outcome", "injected"),))] == 5
        assert samples[("coze_mitm_requests_total", (("outcome", "preflight"),))] == 2
        assert samples[("coze_mitm_requests_total", (("outcome", "refused"), ("reason", "budget")))] == 1
        assert FULL_ID not in body_of(f) and PAT not in body_of(f)
