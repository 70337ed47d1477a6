"""An LDAP proxyauth spec (`ldap[s]:host[:port]:bind-dn:password:subtree[?search_filter_key=KEY]`), read by
mitmproxy's own parser, as coze-mitm's directory lookups and password checks use it (core/directory.py); and its
bind checked.

Asked by parts/login.py, and by the launcher: run_mitm.py checks the bind before it starts mitmdump, because
mitmproxy's own proxyauth binds in its `configure` and, refused, stops with a traceback before coze-mitm is even
loaded. It reads mitmproxy's parser, so it is not core/; it has no hook, so it is not a part either, and the
launcher (which depends on core/ and the package's top level only) can import it.
"""

from __future__ import annotations

from coze_mitm.core.directory import Directory, DirectoryError, LdapSettings, Passwords


def settings_of(spec: str) -> LdapSettings:
    """Raises mitmproxy's OptionsError for a spec it cannot read (the message is mitmproxy's)."""
    from mitmproxy.addons.proxyauth import Ldap

    return LdapSettings.from_parsed(Ldap.parse_spec(spec))


def directory(spec: str, identity: str = "dn") -> Directory:
    """The lookup of a login's entry: the search mitmproxy's check makes, with its server, bind DN and subtree."""
    return Directory(settings_of(spec), identity)


def passwords(spec: str) -> Passwords:
    """The LDAP password check of mitmproxy's proxyauth, on connections of coze-mitm's own."""
    return Passwords(settings_of(spec))


def bind_problem(spec: str) -> DirectoryError | None:
    """None when the directory accepts the spec's bind, else what went wrong, its `msg` one line saying it:
    BindRefused (a wrong bind DN or password in the spec), or a DirectoryError (no answer). Blocking (a connect
    and a bind, each bounded by directory.TIMEOUT); a spec mitmproxy cannot read is left to mitmproxy, which
    refuses it in one line of its own."""
    from mitmproxy import exceptions

    try:
        found = Directory(settings_of(spec))
    except exceptions.OptionsError:
        return None
    try:
        found.check()
    except DirectoryError as e:
        return e
    finally:
        found.close()
    return None
