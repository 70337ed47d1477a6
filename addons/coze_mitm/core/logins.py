"""Proxy logins as Coze identities: which form of mitmproxy's `proxyauth` is set, which names can be an
identity, and the session_name a login becomes. No mitmproxy import; parts/login.py reads the login off
the flow.

Identity rule: a login becomes the Coze `session_name` `login:<name>`, the name unchanged (LDAP: case-folded,
as the directory matches names; see session_name). Tag ids never contain a colon, so no tag can ever name
a login's history, and the token cache can keep using the session_name as its key. A name that cannot be
carried unchanged and safely (empty, over 128 characters, control characters, U+FFFD from undecodable
bytes) is refused.
"""

from __future__ import annotations

import re

from coze_mitm.core.identity import LOGIN_PREFIX as PREFIX

MAX_LOGIN = 128  # characters; as long as the longest tag id
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
