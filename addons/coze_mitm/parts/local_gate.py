"""Local means local: without coze_allow_remote, a client on another machine is relayed nowhere on this host.

The hole this closes (issue 19): mitmproxy's own loop guard refuses only localhost, 127.0.0.1, ::1 and the
listen address. A client on the LAN could `CONNECT 127.0.0.2:<proxy port>` (or this host's LAN address),
send a first packet without a space so that mitmproxy passes the tunnel through raw, and the proxy then
received the inner request again from 127.0.0.1: a "local" client, given the owner's credentials. The same
path relayed LAN clients to any service bound to this host's loopback.

So for a client whose connection comes from another machine (`client.peername` not loopback) while
coze_allow_remote is off:
* `server_connect` (every upstream connection mitmproxy opens, whatever the tunnelling: CONNECT, raw
  pass-through, absolute URL, HTTP/2, WebSocket, UDP) refuses a destination that is loopback
  (127.0.0.0/8, ::1, "localhost"), unspecified (0.0.0.0/8, ::) or one of this host's own addresses
  (core/destinations.py), or a name that resolves to any of them. Names are resolved here without blocking
  (`loop.getaddrinfo`, at most RESOLVE_TIMEOUT seconds; a name that does not resolve is refused) and the
  connection is pinned to the first address checked, so a second lookup by mitmproxy cannot answer
  differently (DNS rebinding). mitmproxy then answers the client "Connection killed: <our reason>" (502)
  or closes the raw tunnel. Because the proxy can no longer reach itself for a remote client, a connection
  that arrives from loopback really is from this machine: the other parts' `peername` test holds.
* `http_connect` and `requestheaders` answer such a destination before any connection with a JSON 403,
  code 4101, naming coze_allow_remote; and so is every request to coze.mitm (the status pages, /metrics,
  the demo and its sandbox.coze.mitm): this part runs before the demo and status parts.

Pinning changes one visible thing for remote clients only: inside a CONNECT tunnel to a name, mitmproxy
takes the flows' host from the server address, so they show the IP (the Host header and the TLS SNI, the
name, are what the server sees; `tls_clienthello` below keeps the SNI the name when the client sends none).

A destination the operator configured (the address of `--mode reverse:` / `--mode upstream:`) is allowed:
the client did not choose it. Local clients, and everyone with coze_allow_remote, pass at once: one
loopback test of the peer address (cached).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import server_hooks

from coze_mitm.core import destinations
from coze_mitm.core.hosts import STATUS_HOST
from coze_mitm.core.identity import is_loopback
from coze_mitm.flowmeta import REFUSED
from coze_mitm.parts.answers import answer_json

log = logging.getLogger("coze.local_gate")

CODE = 4101  # the code auth uses for "clients on other machines get no credentials"
SETTING = "coze_allow_remote"


def _fix(why: str) -> str:
    return (f"clients on other machines may not reach {why} through this proxy; "
            f"its owner can allow them with --set {SETTING}=true")


class LocalGate:
    def __init__(self):
        self.allow_remote = False
        self._pinned: weakref.WeakKeyDictionary[connection.Server, str] = weakref.WeakKeyDictionary()

    def configure(self, updated):
        if SETTING in updated:
            self.allow_remote = bool(getattr(ctx.options, SETTING, False))

    # ------------------------------------------------------------ who

    def remote(self, client: connection.Client | None) -> bool:
        """Is this client on another machine and coze_allow_remote off? (No peer address counts as remote.)"""
        if self.allow_remote:
            return False
        peer = getattr(client, "peername", None)
        return not (peer and is_loopback(str(peer[0])))

    @staticmethod
    def _operator_chose(client, host: str, port: int) -> bool:
        address = getattr(getattr(client, "proxy_mode", None), "address", None)  # reverse:/upstream: modes only
        return bool(address) and str(address[0]).lower() == host.lower() and address[1] == port

    # ------------------------------------------------------------ HTTP: a JSON answer where there is a flow

    def http_connect(self, flow: http.HTTPFlow):
        if flow.response is None and self.remote(flow.client_conn):
            return self._check_flow(flow)
        return None

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response is None and flow.live and self.remote(flow.client_conn):
            return self._check_flow(flow)
        return None

    def _check_flow(self, flow: http.HTTPFlow):
        host, port = flow.request.host, flow.request.port
        name = host.strip().rstrip(".").lower()
        if name == STATUS_HOST or name.endswith("." + STATUS_HOST):
            self._refuse(flow, f"http://{STATUS_HOST}/ (this proxy's own pages)")
            return None
        if self._operator_chose(flow.client_conn, host, port):
            return None
        why = destinations.why_forbidden(host)
        if why:
            self._refuse(flow, f"{host}:{port} ({why})")
            return None
        if destinations.literal(host) is not None:
            return None
        cached = destinations.cached_addresses(host, port)
        if cached is not None:
            self._judge_addresses(flow, host, port, cached)
            return None
        return self._check_name(flow, host, port)

    async def _check_name(self, flow: http.HTTPFlow, host: str, port: int) -> None:
        try:
            addresses = await destinations.resolve(host, port)
        except (OSError, asyncio.TimeoutError, UnicodeError, ValueError):  # x..y: the IDNA codec refuses
            return  # no answer here: server_connect refuses it (it never connects to an unchecked name)
        self._judge_addresses(flow, host, port, addresses)

    def _judge_addresses(self, flow, host, port, addresses) -> None:
        for address in addresses:
            why = destinations.why_forbidden(address)
            if why:
                self._refuse(flow, f"{host}:{port} (it resolves to {address}, {why})")
                return

    @staticmethod
    def _refuse(flow: http.HTTPFlow, what: str) -> None:
        answer_json(flow, 403, CODE, f"coze-mitm: {_fix(what)}")
        flow.metadata[REFUSED] = "remote-client"
        flow.comment = "coze-mitm: client on another machine, coze_allow_remote off: refused"

    # ------------------------------------------------------------ every upstream connection

    def server_connect(self, data: server_hooks.ServerConnectionHookData):
        server = data.server
        if server.error or not server.address or not self.remote(data.client):
            return None
        host, port = str(server.address[0]), server.address[1]
        if self._operator_chose(data.client, host, port):
            return None
        why = destinations.why_forbidden(host)
        if why:
            server.error = f"coze-mitm: {_fix(f'{host}:{port} ({why})')}"
            return None
        if destinations.literal(host) is not None:
            return None
        return self._connect_name(server, host, port)

    async def _connect_name(self, server: connection.Server, host: str, port: int) -> None:
        try:
            addresses = await destinations.resolve(host, port)
        except (OSError, asyncio.TimeoutError, UnicodeError, ValueError) as e:
            server.error = (f"coze-mitm: {host} did not resolve ({type(e).__name__}{': ' + str(e) if str(e) else ''}); "
                            f"for clients on other machines the proxy checks every destination first ({SETTING} is off)")
            return
        for address in addresses:
            why = destinations.why_forbidden(address)
            if why:
                server.error = f"coze-mitm: {_fix(f'{host}:{port} (it resolves to {address}, {why})')}"
                return
        # Pinned: mitmproxy connects to the address checked, not to whatever a second lookup answers.
        server.address = (addresses[0], port)
        self._pinned[server] = host

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # mitmproxy names the server in TLS by the client's SNI, else by the server address: a pinned
        # connection keeps the name it was asked for.
        server = data.context.server
        name = self._pinned.get(server) if self._pinned else None
        if name is not None and server.sni is None:
            server.sni = data.client_hello.sni or name
