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

Which logins can be a Coze identity, and as what: core/logins.py. With LDAP the identity is the directory
entry, not the typed name: `LoginNames` looks the entry up (core/directory.py) in worker threads, cached per
typed name, the first time a typed name asks for credentials.

Also here: the warning that Basic proxy logins cross the network in clear when the proxy listens beyond
loopback. Which lines of an `@htpasswd` file the running mitmproxy cannot verify: htpasswd_check.py (the
launcher asks it too).

The password stays in `flow.metadata["proxyauth"]`, which `-w` files save and mitmweb shows:
`strip_password` replaces it (the username is kept, the tuple shape too).

`Proxy-Authorization` is for this proxy only, yet proxyauth removes it only where it checks it (absolute-form
requests): one sent inside an authenticated CONNECT tunnel (a client that repeats it on every request, as
some do) would reach the server (Coze) and the `-w` file. `requestheaders` removes it from every request,
with or without proxyauth, except the one mitmproxy itself puts there for an upstream proxy (`upstream_auth`
in `--mode upstream:`, plain http requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path

from mitmproxy.proxy import mode_specs

from mitmproxy import ctx, exceptions, http

from coze_mitm import ldap_spec, options
from coze_mitm.core import fields, logins
from coze_mitm.core.identity import is_loopback
from coze_mitm.core.refusal import NO_CREDENTIALS, Refusal, Refused
from coze_mitm.htpasswd_check import htpasswd_problems
from coze_mitm.flowmeta import PROXYAUTH

log = logging.getLogger("coze.login")

REDACTED = "(password removed by coze-mitm)"
LOOKUP_THREADS = 2  # directory lookups at once; the others wait their turn (cached answers need none)
SAY_MISCONFIGURED_EVERY = 60.0  # seconds between two log lines saying the directory refused the proxy's own bind


class LoginRefused(Refused):
    """A login that passed mitmproxy's check but cannot be a Coze identity: answered locally."""

    def __init__(self, status: int, code: int, reason: str, msg: str):
        super().__init__(Refusal(status, code, reason, msg))


class LoginNames:
    """Proxy login -> Coze session_name. htpasswd, `user:pass` and `any`: the name as typed (mitmproxy
    compares those exactly). LDAP: the directory's identity of the entry, looked up off the event loop,
    one lookup per typed name at a time, answers cached (bounded, with a TTL)."""

    def __init__(self, mode: str = "none", directory=None):
        from coze_mitm.core.directory import Cache

        self.mode = mode
        self.directory = directory  # core.directory.Directory in ldap mode, else None
        self.cache = Cache()
        self._pending: dict[str, asyncio.Future] = {}
        self._said_misconfigured = -SAY_MISCONFIGURED_EVERY  # when the refused bind was last said in the log
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.lookups = 0  # directory lookups made (status/metrics material; tests read it)
        self.last_lookup_ms = 0.0

    @property
    def looks_up(self) -> bool:
        return self.directory is not None

    def cached(self, name: str) -> str | None:
        """The session_name of a login without waiting, or None when the directory must be asked first."""
        if self.directory is None:
            return logins.session_name(name)
        identity = self.cache.get(name)
        return None if identity is None else logins.session_name(identity)

    async def resolve(self, name: str) -> str:
        """The session_name of an LDAP login, asking the directory (in a worker thread) when not cached.
        Raises LoginRefused."""
        hit = self.cached(name)
        if hit is not None:
            return hit
        pending = self._pending.get(name)
        if pending is None:
            pending = self._pending[name] = asyncio.ensure_future(self._lookup(name))
            pending.add_done_callback(lambda _f: self._pending.pop(name, None))
        return logins.session_name(await asyncio.shield(pending))

    async def _lookup(self, name: str) -> str:
        from coze_mitm.core.directory import BindRefused, DirectoryError

        directory = self.directory
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="coze-ldap")
        started = time.perf_counter()
        try:
            identity = await asyncio.get_running_loop().run_in_executor(self._pool, directory.lookup, name)
        except DirectoryError as e:
            if e.misconfigured:
                now = time.monotonic()
                if now - self._said_misconfigured >= SAY_MISCONFIGURED_EVERY:  # any client can ask: not a line each
                    self._said_misconfigured = now
                    log.warning(f"coze-mitm: {e.msg}")  # the operator's line names the directory and the DN
                raise LoginRefused(502, 5000, "login-directory", BindRefused.PUBLIC) from None
            if e.unreachable:
                raise LoginRefused(502, 5000, "login-directory",
                                   f"{e.msg}: coze-mitm names LDAP users by their directory entry; try again "
                                   "shortly, or tell the proxy's operator") from None
            raise LoginRefused(403, NO_CREDENTIALS, "login-unusable",
                               f"{e.msg}: coze-mitm names LDAP users by their directory entry") from None
        finally:
            self.lookups += 1
            self.last_lookup_ms = (time.perf_counter() - started) * 1000
            log.debug(f"coze-mitm: LDAP lookup of a login took {self.last_lookup_ms:.1f} ms")
        attribute = "DN" if directory.identity == "dn" else directory.identity
        problem = logins.identity_problem(identity, attribute)
        if problem:
            raise LoginRefused(403, NO_CREDENTIALS, "login-unusable", f"{problem}: coze-mitm cannot name this Coze user")
        if directory is self.directory:  # not reconfigured meanwhile
            self.cache.put(name, identity)
        return identity

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Login:
    """Runs after mitmproxy's proxyauth (a built-in addon, before every script): the password leaves the
    flow as soon as proxyauth has checked it. `names` (LoginNames, rebuilt when proxyauth changes) maps a login
    to its Coze session_name; auth asks it."""

    def __init__(self, lifecycle=None):
        self.lifecycle = lifecycle  # parts/lifecycle.py: started, so a bad value is rolled back (none in a test)
        self.names = LoginNames()
        self.front = None  # login_check.FrontCheck in mitmproxy's chain, with proxyauth=@htpasswd

    def configure(self, updated):
        if not updated & {"proxyauth", "coze_ldap_identity"}:
            return
        spec = getattr(ctx.options, "proxyauth", None)
        mode = logins.auth_mode(spec)
        started = bool(getattr(self.lifecycle, "started", False))
        identity = getattr(ctx.options, "coze_ldap_identity", "dn") or "dn"
        problem = logins.ldap_identity_problem(identity)
        if problem:
            options.refuse(f"coze-mitm: {problem}", started=started)
            return
        directory = None
        if mode == "ldap":
            try:
                directory = ldap_spec.directory(spec, identity)
            except exceptions.OptionsError as e:  # mitmproxy's own proxyauth says the same, and stops
                options.refuse(f"coze-mitm: {e}", started=started)
                return
        elif mode == "htpasswd" and "proxyauth" in updated and not started:
            # At start-up only: it verifies every line (bcrypt, by design slow), which must not hold up traffic
            # once the proxy runs; run_mitm.py (start-up, --check) refuses the same lines. A line mitmproxy 11
            # takes for a plain-text password ({SSHA}, argon2) lets its hash string log in: never start so.
            problems = htpasswd_problems(Path(spec[1:]).expanduser())
            if problems:
                options.refuse("coze-mitm: " + "; ".join(problems), started=started)
                return
        old, self.names = self.names, LoginNames(mode, directory)
        old.close()
        if "proxyauth" in updated:
            self._password_checks(mode)

    def _password_checks(self, mode: str) -> None:
        """htpasswd and LDAP: passwords checked off the event loop, before mitmproxy's proxyauth
        (parts/login_check.py)."""
        from coze_mitm.core.password_checks import PasswordChecks
        from coze_mitm.parts import login_check

        login_check.uninstall(self.front)
        self.front = None
        if mode not in ("htpasswd", "ldap"):
            return
        auth = ctx.master.addons.get("proxyauth") if getattr(ctx, "master", None) else None
        validator = getattr(auth, "validator", None)
        if validator is None:
            return
        # LDAP: mitmproxy's validator shares one ldap3 connection (not thread-safe): connections of our own
        verify = ldap_spec.passwords(ctx.options.proxyauth) if mode == "ldap" else validator
        checks = PasswordChecks(verify)
        self.front = login_check.install(checks)
        if self.front is None:
            checks.close()
        if self.front is None and ctx.master.addons.get(login_check.NAME) is None:
            log.warning("coze-mitm: this mitmproxy's proxyauth is not as expected: proxy passwords are checked by "
                        "mitmproxy alone, on its event loop")

    def running(self):
        warning = clear_text_warning(getattr(ctx.options, "proxyauth", None),
                                     getattr(ctx.options, "listen_host", "127.0.0.1"))
        if warning:
            log.warning(f"coze-mitm: {warning}")

    def done(self):
        self.names.close()
        if self.front is not None:
            from coze_mitm.parts import login_check

            login_check.uninstall(self.front)
            self.front = None

    def http_connect(self, flow: http.HTTPFlow) -> None:
        strip_password(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if PROXYAUTH in flow.metadata or flow.response is not None:
            strip_password(flow)
        # asked of every request: one pass over the raw fields (fields.py), not mitmproxy's Headers lookup
        if any(key.lower() == b"proxy-authorization" for key, _ in flow.request.headers.fields) \
                and not _for_upstream_proxy(flow):
            fields.replace(flow.request.headers, b"proxy-authorization", [])


def clear_text_warning(spec: str | None, listen_host: str | None) -> str | None:
    """One line when proxy logins (Basic: base64, not encrypted) would cross the network."""
    if logins.auth_mode(spec) == "none" or is_loopback(listen_host or ""):
        return None
    return ("proxy logins are Basic authentication, sent in clear text with every request; with the proxy "
            f"listening on {listen_host or 'every interface'}, anyone on the network path can read them: "
            "reach it through an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST) or a TLS front such as stunnel")


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
