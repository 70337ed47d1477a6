"""The settings part: checks the coze_* options it builds from (options.declare_settings, SETTINGS_OPTIONS) and
builds what they describe: the token broker, the Coze API/WebSocket and page origins, and how coze-mitm's own
requests leave (mitmproxy's connection options). A bad value is refused with one line naming the cause and the
fix. The other parts ask it about a request (is_coze_api, page_origin_of) and read their own options in their
own `configure`. What it does not hold, each handed by coze.py to the parts that use it: whether the proxy runs
yet (parts/lifecycle.py), the page origins refused lately (parts/refused_origins.py), the counters the status
page shows (core/stats.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs

from coze_mitm.core import config
from coze_mitm import options
from coze_mitm.core import logins, own_address
from coze_mitm.core.config import WS_SCHEME_OF_HTTP, ConfigError, Origin
from coze_mitm.core.hosts import DEFAULT_ONBOARDING_HOST, STATUS_HOST, Handled, coze_origins
from coze_mitm.core.identity import is_loopback
from coze_mitm.core.exchange import CozeTokenExchange
from coze_mitm.core.outbound import DIRECT, Outbound, OutboundError
from coze_mitm.parts.lifecycle import Lifecycle
from coze_mitm.core.tokens import PatBroker, TokenBroker

log = logging.getLogger("coze.settings")

# mitmproxy's own options that say how a connection leaves this machine: coze-mitm's own requests follow them
CONNECTION_OPTIONS = frozenset({
    "mode", "upstream_auth", "ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir",
})


class CozeSettings:
    """Checks the coze_* options it builds from and builds what they describe: origins, the token broker, the way
    coze-mitm's own requests leave."""

    def __init__(self, lifecycle: Lifecycle | None = None):
        # started: a bad value is then refused with OptionsError (rolled back); coze.py hands the bundle's own
        self.lifecycle = lifecycle or Lifecycle()
        self.app: config.OAuthApp | None = None
        self.broker: TokenBroker | PatBroker | None = None
        self.api_origins: frozenset[Origin] = frozenset()
        self.ws_origins: frozenset[Origin] = frozenset()  # ws:// and wss:// Coze hosts (WebSocket APIs)
        # coze_api_base's origin and its WebSocket host (the one it implies, else the first ws(s):// entry of
        # coze_api_hosts): where a request sent straight to the proxy's own address goes (direct_api.py)
        self.api_base: Origin | None = None
        self.ws_base: Origin | None = None
        # The same as plain (scheme, host, port) tuples: asked of every request, a tuple hashes and
        # compares several times faster than a frozen dataclass.
        self._api_keys: frozenset[tuple] = frozenset()
        self._api_data_keys: frozenset[tuple] = frozenset()
        self._ws_keys: frozenset[tuple] = frozenset()
        self._page_keys: dict[tuple, str] = {}  # (scheme, host, port) -> its coze_origins entry
        # (scheme as bytes, host, port) of the Coze API and its WebSocket hosts (as http/https: a handshake is an
        # HTTP request) that are nothing else coze-mitm serves: no page origin, not coze.mitm (is_coze_api_only)
        self._coze_api_only_keys: frozenset[tuple] = frozenset()
        self.allow_remote = False
        self.login_mode = "none"  # which form of mitmproxy's proxyauth names the users (logins.MODES)
        self.page_origins: frozenset[str] = frozenset()
        self.problem = "not configured yet"  # why tagged requests cannot be served, while broker is None
        # The new-users-per-minute window of a store several proxies share (accounting sets it for Redis).
        self._shared_admission = None
        # How coze-mitm's own requests (token exchange, usage polls, retries) leave: built from mitmproxy's
        # connection options here only; every client asks `outbound()` on each request.
        self._outbound: Outbound = DIRECT


    @property
    def shared_admission(self):
        return self._shared_admission

    @shared_admission.setter
    def shared_admission(self, admit) -> None:
        self._shared_admission = admit
        if isinstance(self.broker, TokenBroker):
            self.broker.admission = admit

    def load(self, loader):
        options.declare(loader)

    def configure(self, updated):
        if "proxyauth" in updated:
            # With mitmproxy's proxy login on, a user is who logged in; the tag only asks for credentials.
            self.login_mode = logins.auth_mode(getattr(ctx.options, "proxyauth", None))
        if updated & CONNECTION_OPTIONS:
            self._configure_outbound()
        if not updated & options.SETTINGS_OPTIONS and self.broker is not None:
            return
        try:
            self._rebuild()
        except ConfigError as e:
            if self.lifecycle.started:
                options.refuse(f"coze-mitm: {e}", started=True)  # rolled back: the last good settings stay
            self.problem = str(e)
            options.refuse(f"coze-mitm: {e}", started=False)
        else:
            self.problem = ""

    def outbound(self) -> Outbound:
        """How coze-mitm's own requests leave this machine now (mitmproxy's connection options)."""
        return self._outbound

    def _configure_outbound(self) -> None:
        opts = ctx.options
        upstreams = []
        for spec in opts.mode:  # a sequence on mitmproxy 11 and 12; each entry is one listener
            try:
                mode = mode_specs.ProxyMode.parse(spec)
            except ValueError:
                continue  # mitmproxy refuses it itself, naming it
            if isinstance(mode, mode_specs.UpstreamMode):
                upstreams.append((mode.scheme, mode.address[0], mode.address[1]))
        try:
            outbound = Outbound.from_options(
                # upstream_auth is declared by mitmproxy's upstream_auth addon (absent in a bare test context)
                upstreams, getattr(opts, "upstream_auth", None), opts.ssl_insecure,
                opts.ssl_verify_upstream_trusted_ca, opts.ssl_verify_upstream_trusted_confdir,
            )
        except OutboundError as e:
            if not self.lifecycle.started:
                # Not running: mitmdump's start-up ends on the line below; a script reload (this object is new)
                # or a test's context goes on, with no good options before. coze-mitm's own requests are then
                # refused, each with this message, never sent directly past the upstream proxy configured.
                self._outbound = Outbound.refusing(str(e))
            options.refuse(f"coze-mitm: {e}", started=self.lifecycle.started)  # running: rolled back
            log.warning(self._outbound.refused)  # (reached on a reload only)
            return
        if len(set(upstreams)) > 1:
            log.warning(f"coze-mitm: several upstream proxies in mode; coze-mitm's own requests (token exchange, "
                        f"usage polls, retries) use the first, {outbound.proxy}")
        if outbound != self._outbound:
            self._outbound = outbound
            log.info(f"coze-mitm: its own requests (token exchange, usage polls, retries) go {outbound.describe()}")

    def _rebuild(self) -> None:
        opts = ctx.options
        if not 60 <= opts.coze_token_ttl <= 86399:
            raise ConfigError(f"coze_token_ttl={opts.coze_token_ttl} is out of range: Coze accepts 60 to 86399 seconds")
        if not 1 <= opts.coze_exchange_timeout <= 120:
            raise ConfigError(f"coze_exchange_timeout={opts.coze_exchange_timeout} must be 1 to 120 seconds")
        if opts.coze_max_users < 1:
            raise ConfigError(f"coze_max_users={opts.coze_max_users} must be at least 1")
        if opts.coze_new_users_per_minute < 0:
            raise ConfigError("coze_new_users_per_minute must be 0 (no limit) or more")
        page_origins = config.parse_page_origins(opts.coze_origins)

        # COZE_PAT from the environment keeps the PAT out of `ps` and shell history (run_mitm.py passes it so).
        pat = (opts.coze_pat or os.environ.get("COZE_PAT") or "").strip()
        if pat:
            app = None
            if any(c.isspace() for c in pat) or pat.startswith("user:"):
                raise ConfigError("coze_pat does not look like a personal access token (pat_...); paste it without spaces")
            api_base = opts.coze_api_base or config.DEFAULT_API_BASE
            broker = PatBroker(pat)
        else:
            app = config.load_oauth_config(opts.coze_config)
            if opts.coze_api_base:
                config.parse_api_origin(opts.coze_api_base)
                app = dataclasses.replace(app, api_base=opts.coze_api_base.rstrip("/"))
            api_base = app.api_base
            exchange = CozeTokenExchange(
                app, duration_seconds=opts.coze_token_ttl, timeout=opts.coze_exchange_timeout,
                outbound=self.outbound,
            )
            broker = TokenBroker(
                exchange, max_users=opts.coze_max_users, new_users_per_minute=opts.coze_new_users_per_minute,
            )
            broker.admission = self._shared_admission
        api_origins, ws_origins = coze_origins(api_base, opts.coze_api_hosts)
        api_base_origin, ws_base_origin = own_address.targets(api_base, opts.coze_api_hosts)

        if self.broker is not None:
            self.broker.close()
        self.app, self.broker = app, broker
        self.api_origins, self.ws_origins, self.page_origins = api_origins, ws_origins, page_origins
        self.api_base, self.ws_base = api_base_origin, ws_base_origin
        self._api_keys = frozenset((o.scheme, o.host, o.port) for o in api_origins)
        # as mitmproxy's request data holds them (scheme in bytes): asked of every request, without its properties
        self._api_data_keys = frozenset((scheme.encode(), host, port) for scheme, host, port in self._api_keys)
        self._ws_keys = frozenset((o.scheme, o.host, o.port) for o in ws_origins)
        self._page_keys = {config.origin_key(o): o for o in page_origins}
        http_of_ws = {ws: http_scheme for http_scheme, ws in WS_SCHEME_OF_HTTP.items()}
        own_hosts = {STATUS_HOST, DEFAULT_ONBOARDING_HOST, getattr(opts, "onboarding_host", "") or DEFAULT_ONBOARDING_HOST}
        self._coze_api_only_keys = frozenset(
            (http_of_ws.get(scheme, scheme).encode(), host, port)
            for scheme, host, port in self._api_keys | self._ws_keys
            if (http_of_ws.get(scheme, scheme), host, port) not in self._page_keys and host not in own_hosts
        )
        self.allow_remote = opts.coze_allow_remote
        self._announce(pat)

    def _announce(self, pat: str) -> None:
        apis = ", ".join(sorted(map(str, self.api_origins)))
        if pat:
            log.warning(
                "coze-mitm: PAT mode: every user shares one Coze identity and one chat history (no isolation); "
                "use a JWT app config for per-user sessions"
            )
        else:
            warning = config.permissions_warning(self.app.path)
            if warning:
                log.warning(f"coze-mitm: {warning}")
        for origin in sorted(self.api_origins | self.ws_origins, key=str):
            if origin.scheme in ("http", "ws") and not is_loopback(origin.host):
                log.warning(f"coze-mitm: {origin} is plain {origin.scheme}:// on another machine: the access tokens "
                            "coze-mitm adds would cross the network in clear text; use https:// (wss://)")
        if not self.page_origins:
            log.warning("coze-mitm: coze_origins is empty: no web page may use the credentials (set --set coze_origins=...)")
        log.info(f"coze-mitm: {self.broker.mode.upper()} mode for {apis}; page origins: {', '.join(sorted(self.page_origins)) or 'none'}")

    def running(self):
        self._warn_if_reachable()

    def _warn_if_reachable(self) -> None:
        """mitmdump listens on every interface unless told otherwise: say who can reach the credentials."""
        host = getattr(ctx.options, "listen_host", "127.0.0.1")
        if is_loopback(host):
            return
        where = f"address {host}" if host else "every interface (mitmdump's default)"
        if self.allow_remote:
            who = "and coze_allow_remote is on: anyone who reaches it gets Coze credentials as any user they name"
        else:
            who = ("but coze_allow_remote is off: tagged requests from other machines are refused; "
                   "add --listen-host 127.0.0.1 to listen on this machine only")
        log.warning(f"coze-mitm: the proxy listens on {where}, {who}")

    def done(self):
        if self.broker is not None:
            self.broker.close()

    def handled(self) -> Handled:
        """The hosts coze-mitm handles now (PAC, CA names): from these settings, the demo and mitmproxy's
        onboarding host."""
        return Handled(self.api_origins, self.ws_origins, self.page_origins,
                       demo=bool(getattr(ctx.options, "coze_demo", False)),
                       onboarding_host=getattr(ctx.options, "onboarding_host", "") or DEFAULT_ONBOARDING_HOST)

    # -- questions the other addons ask about a request --

    def is_coze_api(self, request: http.Request) -> bool:
        """Is this request addressed (by its real destination, not its Host header) to a Coze API origin?"""
        data = request.data
        return (data.scheme.lower(), data.host.lower(), data.port) in self._api_data_keys

    def is_coze_api_only(self, request: http.Request) -> bool:
        """Is this request addressed to a Coze API (or WebSocket) origin that is none of the user's pages nor
        coze.mitm? The bundle then skips the parts that never act on the Coze API (asked at every flow hook)."""
        data = request.data
        return (data.scheme.lower(), data.host.lower(), data.port) in self._coze_api_only_keys

    def is_coze_ws(self, request: http.Request) -> bool:
        """Is this a WebSocket handshake to a Coze WebSocket host (ws.coze.cn, or one in coze_api_hosts)?"""
        scheme = WS_SCHEME_OF_HTTP.get(request.scheme.lower())
        if scheme is None or (scheme, request.host.lower(), request.port) not in self._ws_keys:
            return False  # asked of every request auth sees: the header, a scan of them all, comes last
        return request.headers.get("upgrade", "").lower() == "websocket"

    def page_origin_of(self, request: http.Request) -> str | None:
        """The coze_origins entry this request is addressed to (one of the user's pages), or None."""
        return self._page_keys.get((request.scheme.lower(), request.host.lower(), request.port))

    def is_status_host(self, request: http.Request) -> bool:
        return request.host.lower() == STATUS_HOST
