"""The proxy login (mitmproxy's `proxyauth` option) as a Coze identity.

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

Identity rule: a login becomes the Coze `session_name` `login:<name>`, the name unchanged (LDAP: case-folded,
as the directory matches names; see session_name). Tag ids match
`[A-Za-z0-9_-]{8,128}` and never contain a colon, so no tag can ever name a login's history, and the
token cache can keep using the session_name as its key. A name that cannot be carried unchanged and
safely (empty, over 128 characters, control characters, U+FFFD from undecodable bytes) is refused.

The password stays in `flow.metadata["proxyauth"]`, which `-w` files save and mitmweb shows:
`strip_password` replaces it (the username is kept, the tuple shape too).
"""

from __future__ import annotations

import re

from mitmproxy import http

from identity import LOGIN_PREFIX as PREFIX

MAX_LOGIN = 128  # characters; as long as the longest tag id
REDACTED = "(password removed by coze-mitm)"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd\u2028\u2029]")
_LDAP_META = re.compile(r"[()*\\\x00]")

MODES = {
    "none": "no proxy login: identities come from the userscript's tags (self-asserted)",
    "single": "proxy login (one user:password)",
    "htpasswd": "proxy logins (htpasswd file)",
    "ldap": "proxy logins (LDAP)",
    "any": "proxy logins with any name and password accepted: names are self-asserted, like tags",
}


def auth_mode(spec: str | None) -> str:
    """Which form of mitmproxy's `proxyauth` option is set, in the order its addon tests them."""
    if not spec:
        return "none"
    if spec == "any":
        return "any"
    if spec.startswith("@"):
        return "htpasswd"
    if spec.startswith("ldap"):
        return "ldap"
    if ":" in spec:
        return "single"
    return "none"  # mitmproxy itself refuses this spec at start-up


def proxy_login(flow: http.HTTPFlow) -> str | None:
    """The name the client logged in to the proxy with, or None (no proxyauth, or not authenticated)."""
    value = flow.metadata.get("proxyauth")
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], str) and value[0]:
        return value[0]
    return None


def strip_password(flow: http.HTTPFlow) -> None:
    """Keep the username in `flow.metadata["proxyauth"]`, drop the password (for `http_connect` and
    `requestheaders`: this addon's hooks run after proxyauth's). A request proxyauth refused (407) loses
    its rejected `Proxy-Authorization` header too: it is never sent anywhere, but `-w` would save it."""
    value = flow.metadata.get("proxyauth")
    if isinstance(value, (tuple, list)) and len(value) >= 2 and value[1] != REDACTED:
        flow.metadata["proxyauth"] = (value[0], REDACTED)
    if flow.response is not None and flow.response.status_code == 407:
        flow.request.headers.pop("Proxy-Authorization", None)


def login_problem(name: str, mode: str = "") -> str | None:
    """Why a login cannot be an identity unchanged, or None when it can."""
    if mode == "ldap" and _LDAP_META.search(name):
        # mitmproxy 11.0.2 puts the name into the LDAP search filter unescaped (fixed in 12.2.2): `a*` would
        # log in as some other entry yet be a new identity here, with a budget of its own
        return "the proxy login contains LDAP filter characters ( ) * \\"
    if not name:
        return "the proxy login is empty"
    if len(name) > MAX_LOGIN:
        return f"the proxy login is longer than {MAX_LOGIN} characters"
    if _UNSAFE.search(name):
        return "the proxy login contains control characters or bytes that are not UTF-8"
    return None


def session_name(name: str, mode: str = "") -> str:
    """The Coze session_name (and token-cache key) of a login; call login_problem first.

    LDAP compares names without regard to case (`Alice` and `alice` are one directory entry), so in ldap
    mode the name is case-folded: one account, one history and one budget, however it is typed."""
    return PREFIX + (name.casefold() if mode == "ldap" else name)


def is_login_key(key: str) -> bool:
    return key.startswith(PREFIX)
