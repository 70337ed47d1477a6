"""coze-mitm's own requests (token exchange, usage polls, retries) leave the way mitmproxy's connection options say
(core/outbound.py, built in parts/settings.py).

* The options read: `mode` upstream entries, `upstream_auth` (the very header mitmproxy's own addon sends),
  `ssl_insecure`, `ssl_verify_upstream_trusted_ca` / `_confdir`; bad values refused with a line naming the fix.
* A change while running takes effect on the next request; the proxy password is in no repr, log line or URL.
* Real processes: tests/test_upstream_proxy.py (a stand-in reachable only through an upstream proxy).
"""

from __future__ import annotations

import logging
import socket

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import upstream_auth as mitm_upstream_auth
from mitmproxy.test import taddons

from coze_mitm.core.outbound import DIRECT, Outbound, OutboundError, OutboundRefused, SessionSource
from coze_mitm.parts.settings import CozeSettings

PAT = "pat_" + "Outb0undPat" * 4
PASSWORD = "s3cret-Proxy-Pw"


def test_direct_by_default():
    out = Outbound.from_options([], None, False, None, None)
    assert out == DIRECT and out.proxy is None and out.verify
    session = out.session()
    assert session.trust_env is False and session.proxies == {} and session.verify is True


def test_upstream_with_auth_sends_mitmproxys_own_header():
    out = Outbound.from_options([("http", "proxy.corp", 3128)], f"alice:{PASSWORD}", False, None, None)
    assert out.proxy == "http://proxy.corp:3128"
    # byte for byte what mitmproxy's upstream_auth addon puts on its own CONNECTs
    assert out.proxy_authorization.encode() == mitm_upstream_auth.parse_upstream_auth(f"alice:{PASSWORD}")
    session = out.session()
    assert session.proxies == {"http": "http://proxy.corp:3128", "https": "http://proxy.corp:3128"}
    adapter = session.get_adapter("https://api.coze.cn/")
    assert adapter.proxy_headers(out.proxy)["Proxy-Authorization"] == out.proxy_authorization
    for shown in (repr(out), out.describe(), str(session.proxies)):
        assert PASSWORD not in shown and "alice" not in shown
    assert "upstream_auth" in out.describe()


def test_ipv6_and_https_proxies():
    assert Outbound.from_options([("https", "::1", 8443)], None, False, None, None).proxy == "https://[::1]:8443"


def test_auth_without_a_proxy_is_not_sent():
    assert Outbound.from_options([], "u:p", False, None, None).proxy_authorization is None


@pytest.mark.parametrize("auth", ["nopassword", ":onlypassword"])
def test_bad_auth_refused(auth):
    with pytest.raises(OutboundError, match="user:password"):
        Outbound.from_options([("http", "p", 1)], auth, False, None, None)


def test_trust_options(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert Outbound.from_options([], None, False, str(ca), None).session().verify == str(ca)
    assert Outbound.from_options([], None, False, None, str(tmp_path)).session().verify == str(tmp_path)
    assert Outbound.from_options([], None, True, str(ca), None).session().verify is False
    with pytest.raises(OutboundError, match="ssl_verify_upstream_trusted_ca=.*no such file"):
        Outbound.from_options([], None, False, str(tmp_path / "missing.pem"), None)
    with pytest.raises(OutboundError, match="ssl_verify_upstream_trusted_confdir=.*no such directory"):
        Outbound.from_options([], None, False, None, str(ca))
    both = Outbound.from_options([], None, False, str(ca), str(tmp_path))
    assert str(ca) in both.describe() and str(tmp_path) in both.describe()


def test_session_source_follows_the_options():
    current = [DIRECT]
    source = SessionSource(lambda: current[0])
    first = source.get()
    assert source.get() is first  # unchanged options: the same session (its connections kept)
    current[0] = Outbound.from_options([("http", "proxy.corp", 3128)], None, False, None, None)
    second = source.get()
    assert second is not first and second.proxies["https"] == "http://proxy.corp:3128"
    source.close()


def _settings_context():
    settings = CozeSettings()
    return settings, taddons.context(settings, mitm_upstream_auth.UpstreamAuth())


def test_settings_build_it_from_mitmproxys_options(caplog):
    settings, context = _settings_context()
    with context as tctx, caplog.at_level(logging.INFO):
        tctx.configure(settings, coze_pat=PAT, coze_api_base="https://api.coze.cn",
                       mode=["regular@8081", "upstream:http://proxy.corp:3128@8082"],
                       upstream_auth=f"bob:{PASSWORD}")
        out = settings.outbound()
        assert out.proxy == "http://proxy.corp:3128" and out.proxy_authorization
        assert "through the upstream proxy http://proxy.corp:3128" in caplog.text
        # changed while running: the next request uses the new way out, the broker (its tokens) stays
        broker = settings.broker
        settings.lifecycle.started = True
        tctx.configure(settings, mode=["upstream:https://other.corp:8443"], ssl_insecure=True)
        out = settings.outbound()
        assert out.proxy == "https://other.corp:8443" and out.verify is False and settings.broker is broker
        with pytest.raises(exceptions.OptionsError, match="ssl_verify_upstream_trusted_ca=.*no such file"):
            tctx.configure(settings, ssl_insecure=False, ssl_verify_upstream_trusted_ca="/nonexistent/ca.pem")
        assert settings.outbound() is out  # refused: the last good one stays
    assert PASSWORD not in caplog.text


def test_settings_refuse_a_bad_value_at_start(caplog):
    settings, context = _settings_context()
    with context as tctx:
        tctx.configure(settings, coze_pat=PAT, coze_api_base="https://api.coze.cn")
        with caplog.at_level(logging.ERROR):
            tctx.configure(settings, ssl_verify_upstream_trusted_confdir="/nonexistent-dir")
        assert "coze-mitm: ssl_verify_upstream_trusted_confdir=/nonexistent-dir: no such directory" in caplog.text
        # Not running (mitmdump's start-up exits on that line; a script reload goes on): coze-mitm's own requests are
        # refused, naming the option, never sent DIRECT past the upstream proxy the options may name.
        out = settings.outbound()
        assert out != DIRECT and "ssl_verify_upstream_trusted_confdir=/nonexistent-dir" in out.refused


def test_a_refusing_outbound_sends_nothing(tmp_path):
    """Options that cannot be used and none good before: every request fails at once naming the option; none is
    sent, neither to the destination nor anywhere else."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/api/permission/oauth2/token"
        out = Outbound.refusing("ssl_verify_upstream_trusted_ca=/gone.pem: no such file")
        assert "nowhere" in out.describe() and "/gone.pem" in out.describe()
        source = SessionSource(lambda: out)
        for method in ("GET", "POST"):
            with pytest.raises(OutboundRefused, match="ssl_verify_upstream_trusted_ca=/gone.pem.*set the option again"):
                source.get().request(method, url, json={}, timeout=5)
        with pytest.raises(BlockingIOError):  # a connection made would be waiting here already (connect() returned)
            server.accept()
    source.close()
