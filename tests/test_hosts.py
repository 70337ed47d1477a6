"""The host names coze-mitm handles (core/hosts.py), and the three lists read off them agreeing.

If the PAC sends a host to the proxy that the launcher does not intercept, or the launcher intercepts a host the
scoped CA cannot vouch for, browsers see broken pages: these tests build the same settings through the launcher's
plan, the running PAC part and the status page, and check each list covers the others.
"""

from __future__ import annotations

import re

import pytest
from mitmproxy.addons.onboarding import Onboarding
from mitmproxy.test import taddons

from coze_mitm.core import hosts
from coze_mitm.core.config import ConfigError
from coze_mitm.core.hosts import Handled
from coze_mitm.parts.pac import Pac
from coze_mitm.parts.settings import CozeSettings
from launcher.args import check_args, make_parser
from launcher.ca import needed_hosts
from launcher.plan import Plan, allow_hosts

PAT = "pat_" + "H0stsT3st" * 4
API_HOSTS = "https://api.example.net,wss://ws.example.net:8443,http://127.0.0.1:8790"
ORIGINS = "https://chat.example.org,http://localhost:3000,https://10.0.0.5:8443,https://[::1]:9443"


def matched(patterns: list[str], host: str, port: int) -> bool:
    return any(re.search(p, f"{host}:{port}", re.IGNORECASE) for p in patterns)


class TestHandled:
    def test_api_base_brings_its_websocket_host_and_api_hosts_are_sorted_by_scheme(self):
        api, ws = hosts.coze_origins("https://api.coze.cn", API_HOSTS)
        assert sorted(map(str, api)) == ["http://127.0.0.1:8790", "https://api.coze.cn", "https://api.example.net"]
        assert sorted(map(str, ws)) == ["wss://ws.coze.cn", "wss://ws.example.net:8443"]

    def test_a_bad_entry_is_named(self):
        with pytest.raises(ConfigError, match="coze_api_hosts 'ftp://x'"):
            hosts.coze_origins("https://api.coze.cn", "ftp://x")

    def test_named_hosts_follow_the_demo_and_the_onboarding_host(self):
        plain = Handled.from_settings("https://api.coze.cn")
        assert plain.named_hosts() == ["coze.mitm", "mitm.it"]
        demo = Handled.from_settings("http://127.0.0.1:8790", demo=True, onboarding_host="CA.Example")
        assert demo.named_hosts()[:3] == ["coze.mitm", "ca.example", "sandbox.coze.mitm"]
        assert {"api.coze.cn", "ws.coze.com"} <= set(demo.named_hosts()) and "mitm.it" not in demo.named_hosts()

    def test_allow_hosts_are_exact_and_ports_matter(self):
        patterns = Handled.from_settings("https://api.coze.cn", API_HOSTS, ORIGINS.split(",")).allow_hosts()
        for host, port in [("api.coze.cn", 443), ("ws.coze.cn", 443), ("ws.example.net", 8443), ("127.0.0.1", 8790),
                           ("chat.example.org", 443), ("localhost", 3000), ("10.0.0.5", 8443), ("::1", 9443),
                           ("coze.mitm", 80), ("coze.mitm", 443), ("mitm.it", 443)]:
            assert matched(patterns, host, port), (host, port)
        for host, port in [("api.coze.cn.evil.example", 443), ("xapi.coze.cn", 443), ("ws.example.net", 443),
                           ("localhost", 3001), ("api.coze.com", 443), ("sandbox.coze.mitm", 80)]:
            assert not matched(patterns, host, port), (host, port)

    def test_ca_hosts_are_the_tls_hosts_and_the_named_ones(self):
        h = Handled.from_settings("https://api.coze.cn", API_HOSTS, ORIGINS.split(","))
        assert h.ca_hosts() == sorted(["api.coze.cn", "ws.coze.cn", "api.example.net", "ws.example.net",
                                       "chat.example.org", "10.0.0.5", "::1", "coze.mitm", "mitm.it"])


@pytest.mark.parametrize("demo", [False, True])
def test_launcher_pac_and_ca_agree(tmp_path, demo):
    """One set of settings, three readers: what the PAC routes to the proxy is intercepted by the launcher, and
    every intercepted TLS host is one the CA is made for (and nothing else)."""
    argv = ["--origins", ORIGINS, "--set", "onboarding_host=ca.example.org"] + (["--demo"] if demo else [])
    args = make_parser().parse_args(argv)
    check_args(args)
    pl = Plan(args, api_bases=["https://api.coze.cn", *API_HOSTS.split(",")], page_origins=frozenset(ORIGINS.split(",")))
    patterns = allow_hosts(pl)

    settings = CozeSettings()
    pac = Pac(settings)
    with taddons.context(settings, pac, Onboarding()) as tctx:
        tctx.configure(settings, confdir=str(tmp_path), onboarding_host="ca.example.org", coze_pat=PAT, coze_api_base="https://api.coze.cn",
                       coze_api_hosts=API_HOSTS, coze_origins=ORIGINS, coze_demo=demo)
        named, origins = pac.hosts, pac.origins

    assert "ca.example.org" in named and "mitm.it" not in named  # mitmproxy's onboarding_host, not a fixed name
    assert ("sandbox.coze.mitm" in named) == demo
    for name in named:
        assert matched(patterns, name, 443) and matched(patterns, name, 80), name
    for origin in origins:
        o = hosts.parse_api_origin(origin, websocket=True)
        assert matched(patterns, o.host, o.port), origin
    ca = needed_hosts(pl)
    tls = {hosts.normal_host(hosts.parse_api_origin(o, websocket=True).host)
           for o in origins if o.startswith(("https:", "wss:"))}
    assert set(ca) == tls | {hosts.normal_host(n) for n in named}
