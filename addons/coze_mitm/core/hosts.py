"""The host names coze-mitm handles, worked out in one place.

Four lists must agree or users see odd failures: what the launcher intercepts (mitmproxy's allow_hosts), what
the PAC file sends to the proxy, what the scoped CA must vouch for, and the names the proxy answers itself. If
the PAC sends a host the proxy does not intercept, its pages break; if the CA lacks a name the proxy intercepts,
browsers refuse it. So all four are read off one `Handled` value, built from the settings in force:

    Handled.from_settings(api_base, api_hosts, page_origins, demo=..., onboarding_host=...)
      .origins()        the Coze API and WebSocket origins and the page origins (PAC: on their own ports)
      .named_hosts()    the names handled on every port: coze.mitm, the onboarding host (mitm.it), demo names
      .allow_hosts()    mitmproxy allow_hosts regexes for all of the above
      .ca_hosts()       the hosts a certificate is ever made for (https/wss origins and the named hosts)

No mitmproxy import: the launcher asks it before mitmproxy runs, the parts after each configure.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from coze_mitm.core.config import WS_SCHEME_OF_HTTP, Origin, default_ws_origin, parse_api_origin

STATUS_HOST = "coze.mitm"  # answered by the proxy itself: status page, userscript, PAC, metrics
DEFAULT_ONBOARDING_HOST = "mitm.it"  # mitmproxy's CA page (its `onboarding_host` option)
DEMO_API_HOST = "sandbox.coze.mitm"  # the demo page's name for the local sandbox (parts/demo.py answers it)
DEMO_ORIGIN = f"http://{STATUS_HOST}"  # the demo page's origin (run_mitm.py --demo adds it to coze_origins)
# Coze's own hosts: in the demo they are answered locally with a note (never the internet), so the demo's PAC
# and CA name them too.
REAL_COZE_HOSTS = frozenset({"api.coze.cn", "api.coze.com", "ws.coze.cn", "ws.coze.com"})
TLS_SCHEMES = ("https", "wss")  # an http:// or ws:// origin never needs a certificate


def coze_origins(api_base: str | None, api_hosts: str = "") -> tuple[frozenset[Origin], frozenset[Origin]]:
    """(API origins, WebSocket origins): the API base, its WebSocket host (api.coze.cn -> wss://ws.coze.cn), and
    every entry of coze_api_hosts sorted by scheme (only the base gets a WebSocket host of its own: others are
    named in coze_api_hosts). Raises config.ConfigError naming a bad entry."""
    api = {parse_api_origin(api_base)} if api_base else set()
    ws = {o for o in map(default_ws_origin, api) if o is not None}
    for url in filter(None, map(str.strip, api_hosts.split(","))):
        origin = parse_api_origin(url, "coze_api_hosts", websocket=True)
        (api if origin.scheme in WS_SCHEME_OF_HTTP else ws).add(origin)
    return frozenset(api), frozenset(ws)


def normal_host(host: str) -> str:
    """A host as certificates and constraints hold it: an IP as ipaddress writes it, a name in lower-case IDNA
    (A-labels) without a trailing dot."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def host_pattern(host: str, port: int | None = None) -> str:
    """An allow_hosts regex: mitmproxy matches them against "host:port" of the connection's destination."""
    return f"^{re.escape(host.lower())}:" + (str(port) if port else r"\d+") + "$"


def ca_hosts_for(origins: Iterable[str], named: Iterable[str] = ()) -> list[str]:
    """The hosts a CA must vouch for: every named host and the host of every https:// or wss:// origin. Sorted,
    no duplicates, normalised (normal_host)."""
    hosts = {normal_host(h) for h in named}
    for origin in origins:
        parts = urlsplit(str(origin).strip())
        if parts.scheme in TLS_SCHEMES and parts.hostname:
            hosts.add(normal_host(parts.hostname))
    return sorted(hosts)


@dataclass(frozen=True)
class Handled:
    """Everything coze-mitm intercepts and answers, for one set of settings."""

    api_origins: frozenset[Origin]
    ws_origins: frozenset[Origin]
    page_origins: frozenset[str]
    demo: bool = False
    onboarding_host: str = DEFAULT_ONBOARDING_HOST

    @classmethod
    def from_settings(cls, api_base: str | None, api_hosts: str = "", page_origins: Iterable[str] = (), *,
                      demo: bool = False, onboarding_host: str | None = None) -> "Handled":
        api, ws = coze_origins(api_base, api_hosts)
        return cls(api, ws, frozenset(page_origins), demo, onboarding_host or DEFAULT_ONBOARDING_HOST)

    def named_hosts(self) -> list[str]:
        """Names handled on every port: the proxy's own pages, mitmproxy's CA page, and in the demo the
        sandbox's name and Coze's own hosts."""
        names = [STATUS_HOST, self.onboarding_host.lower()]
        if self.demo:
            names += [DEMO_API_HOST, *sorted(REAL_COZE_HOSTS)]
        return list(dict.fromkeys(names))

    def origins(self) -> list[str]:
        """The Coze API and WebSocket origins and the page origins, each on its own port."""
        return sorted({str(o) for o in self.api_origins | self.ws_origins} | set(self.page_origins))

    def allow_hosts(self) -> list[str]:
        patterns = [host_pattern(h) for h in self.named_hosts()]
        for origin in sorted(self.api_origins | self.ws_origins, key=str):
            patterns.append(host_pattern(origin.host, origin.port))
        for page in sorted(self.page_origins):
            origin = parse_api_origin(page, "coze_origins")
            patterns.append(host_pattern(origin.host, origin.port))
        return list(dict.fromkeys(patterns))

    def ca_hosts(self) -> list[str]:
        return ca_hosts_for(self.origins(), self.named_hosts())
