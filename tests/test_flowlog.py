"""flowlog: one INFO line per flow coze-mitm acted on, made from what cors/auth left on the flow; and
coze_quiet, which hides mitmproxy's per-connection lines. (Through a real launcher: test_run_mitm.py.)"""

from __future__ import annotations

import logging
import re

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from coze_mitm.flowmeta import REFUSED, TOKEN_RETRY
from coze_mitm.parts.auth import Auth
from coze_mitm.parts.cors import Cors
from coze_mitm.parts.flowlog import CONNECTION_LOGGER, FlowLog
from coze_mitm.parts.settings import CozeSettings

PAGE = "https://chat.example.org"
PAT = "pat_" + "S" * 40
USER = "1732000000000-AAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
def hooks(pat_mode):
    tctx = pat_mode(Cors, Auth, FlowLog(), pat=PAT, coze_origins=PAGE)
    cors, auth, flowlog = tctx.parts
    tctx.configure(flowlog, coze_quiet=True)  # the per-flow log, as run_mitm.py runs it
    yield tctx, cors, auth, flowlog
    flowlog.done()  # its filter on mitmproxy's connection logger must not outlive the test


def make_flow(method="POST", path=f"/v3/chat?conversation_id=123&authorization=Bearer%20user:{USER}", headers=()):
    req = tutils.treq(method=method.encode(), host="api.coze.cn", port=443, scheme=b"https", path=path.encode(),
                      headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]))
    return tflow.tflow(req=req, resp=False)


def tagged(origin=PAGE):
    return make_flow(headers=[("Origin", origin), ("Authorization", f"Bearer user:{USER}"),
                              ("Sec-Fetch-Site", "cross-site")])


def run_request(hooks, flow):
    _, cors, auth, _ = hooks
    cors.request(flow)
    auth.request(flow)


def finish(hooks, flow, status=200):
    _, cors, auth, flowlog = hooks
    if flow.response is None:
        flow.response = tutils.tresp(status_code=status)
    for addon in (cors, auth, flowlog):
        addon.response(flow)


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "coze.flowlog"]


def test_injected_request_is_one_line_without_query_or_token(hooks, caplog):
    caplog.set_level(logging.INFO)
    f = tagged()
    run_request(hooks, f)
    assert f.request.headers["authorization"] == f"Bearer {PAT}"  # auth injected
    finish(hooks, f)
    assert lines(caplog) == ["coze-mitm: injected POST api.coze.cn/v3/chat for user 1732…AAAA -> 200"]
    assert PAT not in caplog.text and USER not in caplog.text and "conversation_id" not in caplog.text


def test_retry_outcome_is_on_the_same_line(hooks, caplog):
    caplog.set_level(logging.INFO)
    f = tagged()
    run_request(hooks, f)
    f.metadata[TOKEN_RETRY] = "retried once with a fresh token: HTTP 200"  # what auth records after its retry
    finish(hooks, f)
    assert lines(caplog) == ["coze-mitm: injected POST api.coze.cn/v3/chat for user 1732…AAAA -> 200; "
                             "token retry: retried once with a fresh token: HTTP 200"]


def test_preflight_answered_by_cors(hooks, caplog):
    caplog.set_level(logging.INFO)
    f = make_flow("OPTIONS", "/v3/chat", [("Origin", PAGE), ("Access-Control-Request-Method", "POST")])
    run_request(hooks, f)
    assert f.response.status_code == 204
    finish(hooks, f)
    assert lines(caplog) == [f"coze-mitm: preflight OPTIONS api.coze.cn/v3/chat from {PAGE} -> 204"]


def test_refusal_recorded_in_metadata_is_logged_with_the_answer(hooks, caplog):
    caplog.set_level(logging.INFO)
    f = tagged("https://evil.example")
    run_request(hooks, f)
    assert f.response.status_code == 403
    f.metadata[REFUSED] = "origin-not-allowed"  # the contract: the refusing addon records its reason here
    finish(hooks, f)
    (line,) = lines(caplog)
    assert line.startswith("coze-mitm: refused POST api.coze.cn/v3/chat (origin-not-allowed) -> 403: page origin "
                           "'https://evil.example' may not use")


def test_a_refusal_is_one_line_in_all(hooks, caplog):
    """Auth records its reason on the flow and says nothing itself at INFO: flowlog's line is the only one."""
    caplog.set_level(logging.INFO)
    f = tagged("https://evil.example")
    run_request(hooks, f)
    finish(hooks, f)
    assert f.metadata[REFUSED] == "origin-not-allowed"
    infos = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("coze")]
    assert len(infos) == 1 and infos[0].startswith("coze-mitm: refused POST api.coze.cn/v3/chat (origin-not-allowed) -> 403")


def test_flows_not_acted_on_are_not_logged(hooks, caplog):
    caplog.set_level(logging.INFO)
    for f in (make_flow(path="/v3/chat", headers=[("Origin", PAGE)]), make_flow("GET", "/", [("Origin", "https://evil.example")])):
        run_request(hooks, f)
        finish(hooks, f)
    assert lines(caplog) == []


def test_broken_stream_logs_the_error_once(hooks, caplog):
    caplog.set_level(logging.INFO)
    _, _, auth, flowlog = hooks
    f = tagged()
    run_request(hooks, f)
    f.error = mflow.Error("peer closed connection")
    auth.error(f)
    flowlog.error(f)
    flowlog.error(f)
    assert lines(caplog) == ["coze-mitm: injected POST api.coze.cn/v3/chat for user 1732…AAAA -> error (api.coze.cn:443): "
                             "peer closed connection"]


def test_connection_error_names_the_host_it_was_for(hooks, caplog):
    caplog.set_level(logging.INFO)
    _, _, auth, flowlog = hooks
    f = tagged()
    run_request(hooks, f)
    f.request.host, f.request.port = "127.0.0.1", 9
    f.error = mflow.Error("Connection refused")
    flowlog.error(f)
    assert lines(caplog)[-1].endswith("-> error (127.0.0.1:9): Connection refused")


@pytest.mark.parametrize("message, lowered", [
    ("Client TLS handshake failed. The client does not trust the proxy's certificate for coze.mitm "
     "(OpenSSL Error([('SSL routines', '', 'ssl/tls alert certificate unknown')]))", True),
    ("Client TLS handshake failed. The client disconnected during the handshake. If this happens consistently "
     "for coze.mitm, this may indicate that the client does not trust the proxy's certificate.", True),
    ("Client TLS handshake failed. The client does not trust the proxy's certificate for api.coze.cn "
     "(tlsv1 alert unknown ca)", False),
    ("Client TLS handshake failed. The client does not trust the proxy's certificate for coze.mitm.evil.example "
     "(tlsv1 alert unknown ca)", False),
])
def test_the_status_pages_ca_probe_handshake_is_not_a_warning(hooks, message, lowered):
    """The status page's https probe fails by design until the CA is trusted: no warning for coze.mitm only."""
    from coze_mitm.parts.flowlog import CONNECTION_LOGGER

    logger = logging.getLogger(CONNECTION_LOGGER)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    assert (seen == []) is lowered


def test_websocket_is_logged_when_it_ends(hooks, caplog):
    caplog.set_level(logging.INFO)
    _, _, _, flowlog = hooks
    f = tflow.twebsocketflow()
    f.metadata["coze_user"] = USER
    flowlog.response(f)
    assert lines(caplog) == []
    flowlog.websocket_end(f)
    (line,) = lines(caplog)
    assert line.endswith("for user 1732…AAAA -> 101 WebSocket, closed")


def test_coze_quiet_hides_connection_chatter_only(hooks, caplog):
    caplog.set_level(logging.DEBUG)
    tctx, _, _, flowlog = hooks
    server_log = logging.getLogger(CONNECTION_LOGGER)

    def shown():
        caplog.clear()
        for msg in ("client connect", "server connect api.coze.cn:443", "Streaming response from api.coze.cn.",
                    "server disconnect api.coze.cn:443", "client disconnect"):
            server_log.info(msg)
        server_log.info("Client TLS handshake failed. The client disconnected during the handshake.")
        server_log.warning("client connect")  # only INFO chatter is hidden
        return [r.getMessage() for r in caplog.records if r.name == CONNECTION_LOGGER]

    tctx.configure(flowlog, coze_quiet=False)
    assert len(shown()) == 7  # mitmproxy's default
    tctx.configure(flowlog, coze_quiet=True)
    assert shown() == ["Client TLS handshake failed. The client disconnected during the handshake.", "client connect"]
    tctx.configure(flowlog, coze_quiet=False)
    assert len(shown()) == 7
    tctx.configure(flowlog, coze_quiet=True)
    flowlog.done()
    assert len(shown()) == 7  # the filter does not outlive the addon


def test_with_mitmproxys_flow_lines_only_what_they_cannot_say(caplog):
    """mitmdump's own line per flow (flow_detail >= 1), or no per-flow log asked for (flow_detail=0 without
    coze_quiet, as in the benchmark's bare comparison): coze-mitm adds a line for refusals (retries, errors) only."""
    from mitmproxy.addons.dumper import Dumper

    settings = CozeSettings()
    cors, auth, flowlog = Cors(settings), Auth(settings), FlowLog()
    with taddons.context(settings, cors, auth, flowlog, Dumper()) as tctx:
        tctx.configure(settings, coze_pat=PAT, coze_api_base="https://api.coze.cn", coze_origins=PAGE)
        tctx.configure(flowlog, flow_detail=1)
        hooks = (tctx, cors, auth, flowlog)
        caplog.set_level(logging.INFO)
        ok = tagged()
        run_request(hooks, ok)
        finish(hooks, ok)
        refused = tagged("https://evil.example")
        run_request(hooks, refused)
        finish(hooks, refused)
        assert [line.split(" ->")[0] for line in lines(caplog)] == ["coze-mitm: refused POST api.coze.cn/v3/chat (origin-not-allowed)"]
        tctx.configure(flowlog, flow_detail=0)  # mitmdump's flow lines off, but no per-flow log asked for
        caplog.clear()
        quiet = tagged()
        run_request(hooks, quiet)
        finish(hooks, quiet)
        assert lines(caplog) == []
        tctx.configure(flowlog, coze_quiet=True)  # as run_mitm.py runs it: this line is the log
        again = tagged()
        run_request(hooks, again)
        finish(hooks, again)
        assert len(lines(caplog)) == 1 and lines(caplog)[0].startswith("coze-mitm: injected")


# --------------------------------------------------------------------------- in a real mitmdump, as run_mitm.py runs it

def test_mitmdump_prints_the_line_in_its_own_format(mitmdump, config_file, standin):
    """With coze_quiet and flow_detail=0 (run_mitm.py's settings) the line is printed by the part itself, in the
    format mitmproxy's terminal log uses ("[HH:MM:SS.mmm] coze-mitm: ..."), once per flow; refusals still go
    through the log."""
    import re
    import time

    from tests.clients import session, tagged

    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "coze_quiet=true", "flow_detail=0")
    s = session(proxy)
    api = standin.base_url
    assert s.get(f"{api}/v1/bots/7001", headers=tagged("1732000000000-AAAAAAAAAAAAAAAAAAAAAA"), timeout=30).ok
    refused = s.get(f"{api}/v1/bots/7001", headers=tagged("1732000000000-AAAAAAAAAAAAAAAAAAAAAA",
                                                            origin="https://evil.example"), timeout=30)
    assert refused.status_code == 403
    injected = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\] coze-mitm: injected GET 127\.0\.0\.1/v1/bots/7001 for user "
                          r"1732…AAAA -> 200$", re.M)
    deadline = time.monotonic() + 30
    while not (injected.search(proxy.output) and "coze-mitm: refused" in proxy.output) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(injected.findall(proxy.output)) == 1, proxy.output[-2000:]
    assert "coze-mitm: refused GET 127.0.0.1/v1/bots/7001 (origin-not-allowed) -> 403" in proxy.output


def test_the_printed_line_follows_mitmdumps_verbosity():
    from types import SimpleNamespace

    from coze_mitm.parts.flowlog import prints_info

    assert prints_info(SimpleNamespace(termlog_verbosity="info")) and prints_info(SimpleNamespace())
    assert not prints_info(SimpleNamespace(termlog_verbosity="error"))  # mitmdump -q
    assert not prints_info(SimpleNamespace(termlog_verbosity="warn"))


class _Terminal:
    """A stand-in for mitmdump's stdout that says whether it is a colour terminal."""

    def __init__(self, tty: bool):
        self.tty, self.written = tty, []

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        raise OSError("not a real terminal")

    def write(self, text: str) -> int:
        self.written.append(text)
        return len(text)


@pytest.mark.parametrize("tty", [False, True])
def test_the_printed_line_is_exactly_mitmproxys_own(tty, monkeypatch):
    """The line is built without the logging module, once a second for the clock: byte for byte what mitmproxy's
    formatter makes of the same INFO record, colours included, across second and millisecond edges."""
    import time

    from mitmproxy import log as mitmproxy_log
    from mitmproxy.utils import vt_codes

    from coze_mitm.parts.flowlog import TerminalLine

    out = _Terminal(tty)
    monkeypatch.setattr(vt_codes, "ensure_supported", lambda f: f.isatty())
    terminal = TerminalLine(out)
    reference = mitmproxy_log.MitmFormatter(tty)
    assert terminal._shape is not None  # the cheap path is the one tested
    message = "coze-mitm: injected GET api.coze.cn/v1/bots/7000 for user 1732…AAAA -> 200"
    start = int(time.time())
    for now in (start + 0.0, start + 0.0009, start + 0.5, start + 0.9999, start + 1.0, start + 1.001, start + 3661.25):
        record = logging.LogRecord("coze.flowlog", logging.INFO, __file__, 0, message, None, None)
        record.created, record.msecs = now, int((now - int(now)) * 1000) + 0.0
        assert terminal.line(message, now) == reference.format(record)
    terminal.write(message)  # one write per line, the clock read then
    clock = re.compile(r"\d\d:\d\d:\d\d\.\d{3}")
    assert [clock.sub("T", text) for text in out.written] == [clock.sub("T", terminal.line(message, start)) + "\n"]
