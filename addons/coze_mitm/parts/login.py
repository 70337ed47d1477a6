"""The proxy login (mitmproxy's `proxyauth` option): who logged in, and the password kept out of the flow.

Where mitmproxy records who logged in (read from mitmproxy/addons/proxyauth.py, 11.0.2 and 12.x alike):

* plain HTTP through the proxy (absolute-form requests, WebSocket upgrades to ws:// included): its
  `requestheaders` hook checks `Proxy-Authorization` on every request, and on success sets
  `flow.metadata["proxyauth"] = (username, password)` and deletes the header; on failure it sets
  `flow.response` to a 407 (nothing goes upstream).
* CONNECT tunnels (https://, wss://, and ws:// through a tunnel): its `http_connect` hook does the same on the
  CONNECT flow, and remembers `(username, password)` for the client connection in its own memory
  (`ProxyAuth.authenticated`, a WeakKeyDictionary). Every request inside the tunnel (an HTTP/2 stream
  too) gets `flow.metadata["proxyauth"]` copied from there in `requestheaders`: no header is sent again.
* WebSocket: the upgrade is an ordinary request (one of the two above), and after the 101 the WebSocket
  hooks get the same flow, so `flow.metadata["proxyauth"]` is there for every message.
* SOCKS5 mode: `socks5_auth` remembers the login per connection; requests get the metadata as in a tunnel.
* The same holds for every form of the option: `user:pass`, `@htpasswd-file`, `ldap[s]:…` and `any`
  (which accepts any name and password: the name is then self-asserted, like a tag). Replayed flows are
  not authenticated again: they keep the metadata of the flow they copy.

proxyauth runs before every `-s` script (it is one of mitmproxy's built-in addons, loaded before the
script loader), so a script's `http_connect`/`requestheaders` already see the metadata.

Which logins can be a Coze identity, and as what: core/logins.py.

The password stays in `flow.metadata["proxyauth"]`, which `-w` files save and mitmweb shows:
`strip_password` replaces it (the username is kept, the tuple shape too).

`Proxy-Authorization` is for this proxy only, yet proxyauth removes it only where it checks it (absolute-form
requests): one sent inside an authenticated CONNECT tunnel (a client that repeats it on every request, as
some do) would reach the server (Coze) and the `-w` file. `requestheaders` removes it from every request,
with or without proxyauth, except the one mitmproxy itself puts there for an upstream proxy (`upstream_auth`
in `--mode upstream:`, plain http requests).
"""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs

from coze_mitm.flowmeta import PROXYAUTH

REDACTED = "(password removed by coze-mitm)"


class Login:
    """Runs after mitmproxy's proxyauth (a built-in addon, before every script): the password leaves the
    flow as soon as proxyauth has checked it."""

    def http_connect(self, flow: http.HTTPFlow) -> None:
        strip_password(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        strip_password(flow)
        if "Proxy-Authorization" in flow.request.headers and not _for_upstream_proxy(flow):
            del flow.request.headers["Proxy-Authorization"]


def proxy_login(flow: http.HTTPFlow) -> str | None:
    """The name the client logged in to the proxy with, or None (no proxyauth, or not authenticated)."""
    value = flow.metadata.get(PROXYAUTH)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], str) and value[0]:
        return value[0]
    return None


def _for_upstream_proxy(flow: http.HTTPFlow) -> bool:
    """The header mitmproxy's upstream_auth set for the upstream proxy (upstream mode, plain http)."""
    return (isinstance(flow.client_conn.proxy_mode, mode_specs.UpstreamMode) and flow.request.scheme == "http"
            and bool(getattr(ctx.options, "upstream_auth", None)))


def strip_password(flow: http.HTTPFlow) -> None:
    """Keep the username in `flow.metadata["proxyauth"]`, drop the password (for `http_connect` and
    `requestheaders`: this addon's hooks run after proxyauth's). A request proxyauth refused (407) loses
    its rejected `Proxy-Authorization` header too: it is never sent anywhere, but `-w` would save it."""
    value = flow.metadata.get(PROXYAUTH)
    if isinstance(value, (tuple, list)) and len(value) >= 2 and value[1] != REDACTED:
        flow.metadata[PROXYAUTH] = (value[0], REDACTED)
    if flow.response is not None and flow.response.status_code == 407:
        flow.request.headers.pop("Proxy-Authorization", None)
