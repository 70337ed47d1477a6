"""Local means local, and the proxy never connects to itself.

Three holes this closes:
* Issue 19: mitmproxy's own loop guard refuses only localhost, 127.0.0.1, ::1 and the listen address. A
  client on the LAN could `CONNECT 127.0.0.2:<proxy port>` (or this host's LAN address), send a first
  packet without a space so that mitmproxy passes the tunnel through raw, and the proxy then received the
  inner request again from 127.0.0.1: a "local" client, given the owner's credentials. The same path relayed
  LAN clients to any service bound to this host's loopback.
* Issue 25: coze_allow_remote let logged-in clients on other machines reach this host's loopback services
  the same way, and every LAN client reached link-local addresses (a cloud's metadata service at
  169.254.169.254, `[fe80::<this host>%<iface>]` to every service listening on `::`).
* Issue 25: a request to any other spelling of the proxy's own address and port (`127.1:8080`, `0x7f.1`,
  `2130706433`, `[::ffff:127.0.0.1]`, `localhost.`, this host's LAN address, a name resolving to one of
  them) made the proxy connect to itself, again and again, until it ran out of file descriptors. Any local
  process could send it.

So:
* a client whose connection comes from another machine (`client.peername` not loopback), whatever its
  login and whether or not coze_allow_remote is on (it gives credentials, not this host), is relayed to no
  destination that is loopback (127.0.0.0/8, ::1, "localhost"), unspecified (0.0.0.0/8, ::), one of this
  host's own addresses (with or without an IPv6 zone) or link-local (169.254.0.0/16, fe80::/10), nor to a
  name that resolves to any of them (core/destinations.py); without coze_allow_remote it gets no coze.mitm
  page either;
* every client, this machine's included, is answered locally (HTTP 508) instead of being relayed to the
  proxy's own listen port at an address of this machine, in any spelling mitmproxy's loop guard does not
  know (the spellings it knows, localhost/127.0.0.1/::1/the listen address, are left to the `request`
  hooks: parts that serve the proxy's own address answer them there, else mitmproxy's guard refuses them).

Where: `server_connect` (every upstream connection mitmproxy opens, whatever the tunnelling: CONNECT, raw
pass-through, absolute URL, HTTP/2, WebSocket, UDP) refuses such a destination before the connection;
`http_connect` and `requestheaders` answer it with JSON first where there is a flow (403, code 4101, for
clients on other machines; 508 for a self-loop), and every request to coze.mitm from another machine
without coze_allow_remote (the status pages, /metrics, the demo and its sandbox.coze.mitm): this part runs
before the demo and status parts. Because the proxy can no longer reach itself, a connection that arrives
from loopback really is from this machine: the other parts' `peername` test holds.

Names are resolved here without blocking (`loop.getaddrinfo`, at most RESOLVE_TIMEOUT seconds; a name that
does not resolve is refused) and the connection is pinned to the first address checked, so a second lookup
by mitmproxy cannot answer differently (DNS rebinding). Pinning changes one visible thing: inside a CONNECT
tunnel to a name, mitmproxy takes the flows' host from the server address, so they show the IP (the Host
header and the TLS SNI, the name, are what the server sees; `tls_clienthello` keeps the SNI the name when
the client sends none). The names the operator configured (Coze API and WebSocket hosts, page origins) are
checked but not pinned: the other parts recognise those flows by their host name, and the operator chose
those names.

Allowed without a check: a destination the operator configured as where the proxy sends everything (the
address of `--mode reverse:` / `--mode upstream:`), and, for clients on other machines with
coze_allow_remote, the Coze API and WebSocket hosts the operator configured (a stand-in on this host's
loopback is what those clients are meant to reach). Local clients whose destination port is not one the
proxy listens on pass at once: one cached loopback test of the peer address and a set lookup.

This part's job is to refuse, so it fails closed: if one of its checks raises, the request (or the
connection) is refused, never let through unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
import weakref

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import server_hooks

from coze_mitm.core import destinations
from coze_mitm.core.hosts import STATUS_HOST
from coze_mitm.core.identity import is_loopback
from coze_mitm.core.refusal import NO_CREDENTIALS
from coze_mitm.flowmeta import REFUSED
from coze_mitm.pages.pac import PAC_PATH
from coze_mitm.parts.answers import answer_json

log = logging.getLogger("coze.local_gate")

LOOP_STATUS, LOOP_CODE = 508, 4000  # 508 Loop Detected: the request names the proxy itself
FAILED_STATUS, FAILED_CODE = 502, 5000  # auth's "internal-error" answer
SETTING = "coze_allow_remote"
DEFAULT_PORT = 8080  # mitmproxy's regular mode when listen_port is unset
MITMPROXY_SELF_NAMES = ("localhost", "127.0.0.1", "::1")  # what mitmproxy's own loop guard compares with
_RESOLVE_ERRORS = (OSError, asyncio.TimeoutError, UnicodeError, ValueError)  # x..y: the IDNA codec refuses


def _remote_fix(why: str, allow_remote: bool) -> str:
    if allow_remote:
        return (f"clients on other machines never reach {why} through this proxy: {SETTING} gives them Coze "
                "credentials, not this host or its link")
    return (f"clients on other machines may not reach {why} through this proxy; "
            f"its owner can allow them with --set {SETTING}=true")


def _loop_fix(what: str) -> str:
    return (f"{what} is this proxy itself: relaying the request there would make the proxy connect to itself "
            "in a loop; send it to its real destination through the proxy")


class LocalGate:
    def __init__(self, settings=None):
        self.settings = settings  # the Coze hosts and page origins the operator configured (None in unit tests)
        self.allow_remote = False
        self._pinned: weakref.WeakKeyDictionary[connection.Server, str] = weakref.WeakKeyDictionary()
        self._ports: frozenset[int] | None = None  # the ports the proxy listens on, once its servers are up
        self._listen_hosts: frozenset[str] = frozenset()
        self._api: frozenset[tuple[str, int]] = frozenset()  # Coze API and WebSocket hosts (host, port)
        self._configured: frozenset[tuple[str, int]] = frozenset()  # those and the page origins: never pinned

    def configure(self, updated):
        if SETTING in updated:
            self.allow_remote = bool(getattr(ctx.options, SETTING, False))
        if updated & {"listen_host", "listen_port", "mode"}:
            self._ports = None
        if self.settings is not None:
            s = self.settings
            self._api = frozenset((o.host.lower(), o.port) for o in (*s.api_origins, *s.ws_origins))
            self._configured = self._api | frozenset(filter(None, map(_origin_key, s.page_origins)))

    def running(self):
        self._ports = None  # the servers are up now: read the ports they really bound (listen_port=0)

    # ------------------------------------------------------------ who and where

    @staticmethod
    def elsewhere(client: connection.Client | None) -> bool:
        """Is this client on another machine? (No peer address counts as another machine.)"""
        peer = getattr(client, "peername", None)
        return not (peer and is_loopback(str(peer[0])))

    def remote(self, client: connection.Client | None) -> bool:
        """Is this client on another machine and coze_allow_remote off (no coze.mitm pages for it)?"""
        return not self.allow_remote and self.elsewhere(client)

    def listen_ports(self) -> frozenset[int]:
        ports = self._ports
        if ports is not None:
            return ports
        server = ctx.master.addons.get("proxyserver") if getattr(ctx, "master", None) else None
        addrs = server.listen_addrs() if server is not None else []
        found = {a[1] for a in addrs}
        found.add(getattr(ctx.options, "listen_port", None) or DEFAULT_PORT)
        found.discard(0)
        ports = frozenset(found)
        if addrs:  # kept once the servers are up (before that, the configured port is all there is)
            self._ports, self._listen_hosts = ports, frozenset(str(a[0]) for a in addrs)
        return ports

    def _known_to_mitmproxy(self, host: str) -> bool:
        """A spelling of the proxy's address that mitmproxy's own loop guard refuses (after the `request` hooks,
        which may serve it: the proxy's own address as an API base)."""
        listen = getattr(ctx.options, "listen_host", "") or ""  # compared as mitmproxy does: exactly
        return host in MITMPROXY_SELF_NAMES or host == listen or host in self._listen_hosts

    @staticmethod
    def _operator_chose(client, host: str, port: int) -> bool:
        address = getattr(getattr(client, "proxy_mode", None), "address", None)  # reverse:/upstream: modes only
        return bool(address) and str(address[0]).lower() == host.lower() and address[1] == port

    def _why(self, elsewhere: bool, address: str, port: int, loop: bool = True) -> tuple[str, str] | None:
        """("remote"|"loop", reason) when `address` (an IP, or "localhost") may not be reached, else None.
        `loop`: the connection would go where the request names (not through an upstream proxy)."""
        if elsewhere:
            why = destinations.why_forbidden(address)
            if why:
                return "remote", why
        if loop and port in self.listen_ports():
            why = destinations.is_self(address)
            if why:
                return "loop", why
        return None

    def _message(self, kind: str, what: str) -> str:
        return "coze-mitm: " + (_remote_fix(what, self.allow_remote) if kind == "remote" else _loop_fix(what))

    def _exempt(self, client, elsewhere: bool, host: str, port: int) -> bool:
        if self._operator_chose(client, host, port):
            return True
        return elsewhere and self.allow_remote and (host.lower().rstrip("."), port) in self._api

    # ------------------------------------------------------------ HTTP: a JSON answer where there is a flow

    def http_connect(self, flow: http.HTTPFlow):
        if flow.response is None:
            return self._guard_flow(flow)
        return None

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response is not None or not flow.live:
            return None
        try:
            # this machine's own traffic to anywhere but the proxy's ports: the common path, asked first
            peer = flow.client_conn.peername
            if peer and is_loopback(peer[0]) and flow.request.data.port not in (self._ports or self.listen_ports()):
                return None
        except Exception as e:
            self._failed_flow(flow, e)
            return None
        return self._guard_flow(flow)

    def _guard_flow(self, flow: http.HTTPFlow):
        try:
            pending = self._check_flow(flow)
        except Exception as e:
            self._failed_flow(flow, e)
            return None
        if pending is None:
            return None
        return self._closed_on_error(pending, lambda e: self._failed_flow(flow, e))

    def _check_flow(self, flow: http.HTTPFlow):
        client = flow.client_conn
        host, port = flow.request.host, flow.request.port
        elsewhere = self.elsewhere(client)
        # In upstream mode every request goes to the upstream proxy (server_connect sees that address): the
        # request's own address cannot make this proxy connect to itself.
        loop = _mode(client) != "upstream"
        if not elsewhere and (not loop or port not in self.listen_ports()):
            return None  # this machine's own traffic: the common path
        name = host.strip().rstrip(".").lower()
        if name == STATUS_HOST or name.endswith("." + STATUS_HOST):  # names only this proxy answers
            if elsewhere and not self.allow_remote:
                self._refuse(flow, "remote", f"http://{STATUS_HOST}/ (this proxy's own pages)")
            return None
        if self._exempt(client, elsewhere, host, port):
            return None
        if not elsewhere and self._known_to_mitmproxy(host):
            return None  # the request hooks may serve it; mitmproxy's guard refuses it otherwise
        if not self.remote(client) and flow.request.method in ("GET", "HEAD") \
                and flow.request.path.split("?", 1)[0] == PAC_PATH:
            return None  # the PAC part answers it (at any address of the proxy); server_connect still guards
        if destinations.literal(host) is not None or host.strip().rstrip(".").lower() == "localhost":
            found = self._why(elsewhere, host, port, loop)
            if found:
                self._refuse(flow, found[0], f"{host}:{port} ({found[1]})")
            return None
        cached = destinations.cached_addresses(host, port)
        if cached is not None:
            self._judge_addresses(flow, elsewhere, host, port, cached, loop)
            return None
        return self._check_name(flow, elsewhere, host, port, loop)

    async def _check_name(self, flow: http.HTTPFlow, elsewhere: bool, host: str, port: int, loop: bool) -> None:
        try:
            addresses = await destinations.resolve(host, port)
        except _RESOLVE_ERRORS:
            return  # no answer here: server_connect refuses it (it never connects to an unchecked name)
        self._judge_addresses(flow, elsewhere, host, port, addresses, loop)

    def _judge_addresses(self, flow, elsewhere, host, port, addresses, loop) -> None:
        for address in addresses:
            found = self._why(elsewhere, address, port, loop)
            if found:
                self._refuse(flow, found[0], f"{host}:{port} (it resolves to {address}, {found[1]})")
                return

    def _refuse(self, flow: http.HTTPFlow, kind: str, what: str) -> None:
        if kind == "remote":
            answer_json(flow, 403, NO_CREDENTIALS, self._message(kind, what))
            flow.metadata[REFUSED] = "remote-client"
            flow.comment = "coze-mitm: client on another machine, destination on this host: refused"
        else:
            answer_json(flow, LOOP_STATUS, LOOP_CODE, self._message(kind, what))
            flow.metadata[REFUSED] = "self-loop"
            flow.comment = "coze-mitm: the proxy's own address: refused"

    @staticmethod
    def _failed_flow(flow: http.HTTPFlow, error: Exception) -> None:
        log.error(f"coze-mitm: the local gate failed ({type(error).__name__}): request refused", exc_info=error)
        answer_json(flow, FAILED_STATUS, FAILED_CODE,
                    "coze-mitm's local gate failed while checking this request, so it is refused; "
                    "see the mitmproxy log and report the bug")
        flow.metadata[REFUSED] = "internal-error"

    @staticmethod
    async def _closed_on_error(pending, refuse) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            raise
        except Exception as e:
            refuse(e)

    # ------------------------------------------------------------ every upstream connection

    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        server = data.server
        if server.error or not server.address:
            return None
        try:
            peer = data.client.peername  # this machine's own traffic, not to the proxy's ports: asked first
            if peer and is_loopback(peer[0]) and server.address[1] not in (self._ports or self.listen_ports()):
                return None
            pending = self._check_server(data)
        except Exception as e:
            self._failed_server(server, e)
            return None
        if pending is None:
            return None
        return self._closed_on_error(pending, lambda e: self._failed_server(server, e))

    def _check_server(self, data: server_hooks.ServerConnectionHookData):
        server = data.server
        elsewhere = self.elsewhere(data.client)
        host, port = str(server.address[0]), server.address[1]
        if not elsewhere and port not in self.listen_ports():
            return None
        if self._exempt(data.client, elsewhere, host, port):
            return None
        if destinations.literal(host) is not None or host.strip().rstrip(".").lower() == "localhost":
            found = self._why(elsewhere, host, port)
            if found:
                server.error = self._message(found[0], f"{host}:{port} ({found[1]})")
            return None
        return self._connect_name(server, elsewhere, host, port)

    async def _connect_name(self, server: connection.Server, elsewhere: bool, host: str, port: int) -> None:
        try:
            addresses = await destinations.resolve(host, port)
        except _RESOLVE_ERRORS as e:
            server.error = (f"coze-mitm: {host} did not resolve ({type(e).__name__}{': ' + str(e) if str(e) else ''}); "
                            "the proxy checks every destination of a client on another machine (and every one on "
                            "its own port) before connecting")
            return
        for address in addresses:
            found = self._why(elsewhere, address, port)
            if found:
                server.error = self._message(found[0], f"{host}:{port} (it resolves to {address}, {found[1]})")
                return
        if (host.lower().rstrip("."), port) in self._configured:
            return  # checked, not pinned: the other parts know these flows by their host name
        # Pinned: mitmproxy connects to the address checked, not to whatever a second lookup answers.
        server.address = (addresses[0], port)
        self._pinned[server] = host

    @staticmethod
    def _failed_server(server: connection.Server, error: Exception) -> None:
        log.error(f"coze-mitm: the local gate failed ({type(error).__name__}): connection refused", exc_info=error)
        server.error = "coze-mitm's local gate failed while checking this destination, so it is refused (see the log)"

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # mitmproxy names the server in TLS by the client's SNI, else by the server address: a pinned
        # connection keeps the name it was asked for.
        server = data.context.server
        name = self._pinned.get(server) if self._pinned else None
        if name is not None and server.sni is None:
            server.sni = data.client_hello.sni or name


def _mode(client) -> str:
    """The client's proxy mode ("regular", "upstream", "reverse", ...)."""
    return getattr(getattr(client, "proxy_mode", None), "type_name", "")


def _origin_key(origin: str) -> tuple[str, int] | None:
    """(host, port) of a page origin "scheme://host[:port]"."""
    try:
        parts = urllib.parse.urlsplit(origin)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.hostname.lower(), port) if parts.hostname and port else None
