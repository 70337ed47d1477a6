"""Proxy logins as Coze identities: which form of mitmproxy's `proxyauth` is set, which names can be an
identity, and the session_name a login becomes. No mitmproxy import; parts/login.py reads the login off
the flow.

Identity rule: a login becomes the Coze `session_name` `login:<identity>`. Tag ids never contain a colon, so
no tag can ever name a login's history, and the token cache can keep using the session_name as its key.

* htpasswd, `user:pass`, `any`: the identity is the typed name, unchanged. mitmproxy compares these names
  byte for byte (a dict lookup, `==`), so `alice`, `Alice` and ` alice` are three accounts with three
  passwords: no aliasing, nothing to normalise.
* LDAP: the directory matches names its own way (case, spaces, Unicode width, any of several `cn` values:
  ` alice`, `ＡＬＩＣＥ` and `Alice Liddell` all log in as one entry), so the typed name is not an identity.
  The identity is the entry the directory found: its DN, or one attribute of it as the directory stores it
  (`coze_ldap_identity`), looked up after mitmproxy accepted the login (core/directory.py, parts/login.py).

A name that cannot be carried unchanged and safely (empty, over 128 characters, control characters, U+FFFD
from undecodable bytes) is refused, and so is a directory identity that cannot.
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
    "ldap": "proxy logins (LDAP): one user per directory entry, however the name is typed",
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


def session_name(identity: str) -> str:
    """The Coze session_name (and token-cache key) of a login's identity: the typed name (htpasswd, single,
    any) or the directory's identity of the entry (LDAP); call login_problem / identity_problem first."""
    return PREFIX + identity


IDENTITY_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}|[0-9]+(?:\.[0-9]+)+")


def ldap_identity_problem(value: str) -> str | None:
    """Why a `coze_ldap_identity` value is unusable: "dn", or one attribute name (or OID)."""
    if value.lower() == "dn" or IDENTITY_ATTRIBUTE.fullmatch(value):
        return None
    return (f"coze_ldap_identity={value!r} is not an LDAP attribute name: use dn (the entry's DN, the default) "
            "or one single-valued attribute such as uid")


def identity_problem(identity: str, attribute: str) -> str | None:
    """Why the identity the directory gave cannot be a Coze session_name unchanged, or None."""
    if not identity:
        return f"the directory entry has no {attribute}"
    if len(identity) > MAX_LOGIN:
        return (f"the directory's {attribute} of this login is longer than {MAX_LOGIN} characters; "
                "set coze_ldap_identity to a shorter single-valued attribute such as uid")
    if _UNSAFE.search(identity):
        return f"the directory's {attribute} of this login contains control characters"
    return None


def is_login_key(key: str) -> bool:
    return key.startswith(PREFIX)
