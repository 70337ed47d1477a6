"""The proxy's own address is a Coze API base: `http://127.0.0.1:8080` works where `https://api.coze.cn` did.

A page or client that sets no proxy at all can name the proxy as its API base (`@coze/api` baseURL,
`@coze/chat-sdk` setting.apiBaseUrl, cozepy base_url). Its requests arrive origin-form (`POST /v3/chat`,
`Host: 127.0.0.1:8080`), which mitmproxy would send to itself and answer 502. Here they are re-addressed before any
other part looks at them:

    POST http://127.0.0.1:8080/v3/chat              -> coze_api_base (https://api.coze.cn/v3/chat)
    GET  ws://127.0.0.1:8080/v1/chat?bot_id=... (Upgrade: websocket)
                                                    -> its WebSocket host (wss://ws.coze.cn/v1/chat?...)
    GET  http://127.0.0.1:8080/                     a short page: what this is, the API base to paste (pages/direct_page.py)
    GET  http://127.0.0.1:8080/proxy.pac            the PAC file (pac.py answers it first)
    anything else there (/favicon.ico, ...)         404, JSON

From then on the request is an ordinary request to the Coze API: cors.py answers its preflight and sets CORS for
coze_origins only, auth.py swaps the tag (same rules: origin, budgets, logins), streaming.py streams, accounting and
flowlog count and log it. What this part adds, because the proxy is now the server the page talks to:
* Only a Host naming the proxy's own loopback socket exactly is served (core/own_address.py): no name the page
  chose (DNS rebinding), no other spelling. Other requests are none of this part's business.
* A client that is not on loopback gets a refusal (local means local; with coze_allow_remote too: clients on other
  machines use the proxy as a proxy, and reach this address only through a tunnel).
* A request carrying an Origin not in coze_origins (or `null`, or two) is refused here, untagged or not: the page has
  no business with this address. For WebSockets this is the only Origin check a browser gets (WebSockets have no
  CORS), and their refusal stays unreadable. An HTTP request from a well-formed http(s) origin gets a refusal its
  page can read (Access-Control-Allow-Origin for that origin, never credentials; its preflight answered here so the
  real request comes to be refused): `fetch` sees 403 and the msg saying how to allow the origin, instead of
  "Failed to fetch". Safe here only because the proxy itself is the server: nothing is forwarded, no token minted,
  and the page learns nothing but that its origin is not allowed (docs/decisions.md). `null`, several Origins and
  anything a browser would not send stay unreadable refusals.
* With mitmproxy's proxyauth, a client without a proxy login gets a JSON refusal instead of mitmproxy's 407 (which a
  browser that set no proxy never answers): users are named by their proxy login, which such a client cannot send.

The re-addressing is done in `requestheaders`, before a streamed request body (stream_large_bodies) could leave
with the headers to the proxy itself; the local pages in `request`, after the PAC part had its turn.
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import UpstreamMode

from coze_mitm.core import own_address
from coze_mitm.core.config import DEFAULT_PORTS, WS_SCHEME_OF_HTTP
from coze_mitm.core.hosts import STATUS_HOST
from coze_mitm.core.identity import is_loopback
from coze_mitm.core.refusal import NO_CREDENTIALS
from coze_mitm.flowmeta import DIRECT, LOCAL_ANSWER, REFUSED
from coze_mitm.pages import direct_page
from coze_mitm.parts.answers import answer_json
from coze_mitm.parts.cors import HEADER_LIST_RE, METHOD_RE
from coze_mitm.core.stats import Stats
from coze_mitm.parts.refused_origins import RefusedOriginsLog
from coze_mitm.parts.settings import CozeSettings

log = logging.getLogger("coze.direct_api")

HTTP_OF_WS = {ws: http_ for http_, ws in WS_SCHEME_OF_HTTP.items()}
MAX_SHOWN = 60  # characters of an origin quoted in an answer


def _shown(value: str) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in value[:MAX_SHOWN])
    return repr(shown + ("…" if len(value) > MAX_SHOWN else ""))


class DirectApi:
    acts_on_coze_api = False  # requests to the proxy's own address (re-addressed to the API in requestheaders)

    def __init__(self, settings: CozeSettings, refused: RefusedOriginsLog | None = None, stats: Stats | None = None):
        self.settings = settings
        self.refused = refused or RefusedOriginsLog()  # pages outside coze_origins: the status page shows them
        self.stats = stats or Stats()  # the counters the status page shows
        self._targets: dict = {}  # Origin -> (scheme bytes, host, port, Host header bytes): computed once each

    # ------------------------------------------------------------ which requests

    @staticmethod
    def own_address(flow: http.HTTPFlow) -> tuple[str, int] | None:
        """(host as the request names it, port) when it was sent to the proxy's own loopback address, else None."""
        request = flow.request
        sockname = flow.client_conn.sockname
        # the common case (a request through the proxy to another port) is one comparison
        if not sockname or len(sockname) < 2 or request.port != sockname[1]:
            return None
        sock = own_address.socket_address(sockname)
        if sock is None or not own_address.names_socket(request.host, request.port, sock):
            return None
        return request.host.lower(), request.port

    # ------------------------------------------------------------ re-addressed before anything else reads the host

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is not None:
            if response.status_code == 407 and self.own_address(flow) is not None:
                self._no_proxy_login(flow)
            return
        if not flow.live:
            return
        own = self.own_address(flow)
        if own is None or not own_address.is_api_path(flow.request.path):
            return
        if self._refused_remote(flow):
            return
        origins, websocket = [], False
        for key, value in flow.request.headers.fields:  # one pass for both questions
            key = key.lower()
            if key == b"origin":
                origins.append(value.decode("utf-8", "surrogateescape"))
            elif key == b"upgrade":
                websocket = value.strip().lower() == b"websocket"
        if origins and (len(origins) != 1 or origins[0] not in self.settings.page_origins):
            self._refuse_origin(flow, origins, websocket)
            return
        self._readdress(flow, own, websocket)

    def _readdress(self, flow: http.HTTPFlow, own: tuple[str, int], websocket: bool) -> None:
        target = self.settings.ws_base if websocket else self.settings.api_base
        if target is None:
            if websocket:
                self._refuse(flow, 503, 5000, "not-configured",
                             "coze-mitm knows no WebSocket host for the Coze API "
                             f"{self.settings.api_base or 'configured'}: name it with --set coze_api_hosts=wss://...")
            else:
                self._refuse(flow, 503, 5000, "not-configured",
                             f"coze-mitm cannot add credentials: {self.settings.problem}")
            return
        scheme, host, port, host_header = self._fields_of(target)
        # The request's own fields, and the Host header once (what the scheme, host and port setters would do, each
        # rewriting the header): the API gets the Host it expects (api.coze.cn, no :443).
        request = flow.request
        data = request.data
        data.scheme, data.host, data.port = scheme, host, port
        headers = data.headers
        fields_ = headers.fields
        for i, field in enumerate(fields_):
            if field[0].lower() == b"host":  # replaced in place; a second copy (never sent by a client) dropped
                headers.fields = (*fields_[:i], (field[0], host_header),
                                  *(f for f in fields_[i + 1:] if f[0].lower() != b"host"))
                break
        if data.authority or (scheme == b"http" and isinstance(flow.client_conn.proxy_mode, UpstreamMode)):
            # Upstream mode sends a plain-http request to the upstream proxy as it stands (mitmproxy makes it
            # origin-form only in regular mode): an origin-form one must become absolute-form for it to be routable.
            request.authority = host_header
        flow.metadata[DIRECT] = f"[{own[0]}]:{own[1]}" if ":" in own[0] else f"{own[0]}:{own[1]}"
        flow.comment = f"coze-mitm: sent to the proxy's own address, forwarded to {target}"

    def _fields_of(self, target) -> tuple[bytes, str, int, bytes]:
        fields_ = self._targets.get(target)
        if fields_ is None:
            scheme = HTTP_OF_WS.get(target.scheme, target.scheme)
            host = f"[{target.host}]" if ":" in target.host else target.host
            fields_ = (scheme.encode(), target.host, target.port,
                       (host if target.port == DEFAULT_PORTS[scheme] else f"{host}:{target.port}").encode("idna"))
            if len(self._targets) > 16:  # a few origins over a run's configure changes
                self._targets.clear()
            self._targets[target] = fields_
        return fields_

    # ------------------------------------------------------------ the proxy's own answers there

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or DIRECT in flow.metadata or not flow.live:
            return
        own = self.own_address(flow)
        if own is None:
            return
        if self._refused_remote(flow):
            return
        request = flow.request
        if not (request.path == "/" or request.path.startswith("/?")) or request.method not in ("GET", "HEAD"):
            answer_json(flow, 404, 4000, f"coze-mitm: {request.path.split('?', 1)[0][:100]!r} is not a Coze API path; "
                        f"this address ({own_address.api_base(*own)}) is a Coze API base: the API's paths (/v1/..., "
                        "/v3/...) are sent on to Coze, and / describes it")
            flow.comment = "coze-mitm: not a Coze API path on the proxy's own address; answered locally"
            return
        body = direct_page.render(own_address.api_base(*own), self.settings.page_origins, f"http://{STATUS_HOST}/")
        flow.response = http.Response.make(200, b"" if request.method == "HEAD" else body, {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": direct_page.CSP,
        })
        if request.method == "HEAD":
            flow.response.headers["Content-Length"] = str(len(body))
        flow.metadata[LOCAL_ANSWER] = True
        flow.comment = "coze-mitm: the page of the proxy's own address"

    # ------------------------------------------------------------ refusals

    def _refused_remote(self, flow: http.HTTPFlow) -> bool:
        peer = flow.client_conn.peername
        if peer and is_loopback(str(peer[0])):
            return False
        self._refuse(flow, 403, NO_CREDENTIALS, "remote-client",
                     "coze-mitm: the proxy's own address is a Coze API base for programs on this machine only; "
                     "from another machine use it as an HTTP proxy")
        return True

    def _refuse_origin(self, flow: http.HTTPFlow, origins: list[str], websocket: bool) -> None:
        if len(origins) != 1:
            self._refuse(flow, 400, 4000, "duplicate-origin",
                         "coze-mitm: the request carries more than one Origin header; send one")
            return
        origin = origins[0]
        if not websocket and own_address.is_serialized_origin(origin):
            self._refuse_readably(flow, origin)
        else:
            self._refuse(flow, 403, NO_CREDENTIALS, "origin-not-allowed",
                         f"coze-mitm: page origin {_shown(origin)} may not use this proxy as its Coze API; if this is "
                         "your page, add its exact origin to coze_origins (--set coze_origins=...)")
        if origin != "null":
            self.refused.note(origin, "the proxy's own address as its Coze API", logged_already=True)

    def _refuse_readably(self, flow: http.HTTPFlow, origin: str) -> None:
        """The refusal of a page outside coze_origins, made readable to that page: its preflight gets a 204 allowing
        what it asked (so the browser sends the real request, to be refused as well), its real request the JSON 403
        with CORS for that one origin. No Allow-Credentials: a page's cookies never matter here."""
        asked = flow.request.headers
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if flow.request.method == "OPTIONS" and "access-control-request-method" in asked:
            method = asked.get("access-control-request-method", "").strip()
            requested = asked.get("access-control-request-headers", "").strip()
            if METHOD_RE.fullmatch(method):
                cors["Access-Control-Allow-Methods"] = method
            if HEADER_LIST_RE.fullmatch(requested):
                cors["Access-Control-Allow-Headers"] = requested
            if asked.get("access-control-request-private-network", "").lower() == "true":
                cors["Access-Control-Allow-Private-Network"] = "true"  # a public page's preflight to loopback
            cors["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
            flow.response = http.Response.make(204, b"", {"Cache-Control": "no-store", **cors})
            flow.metadata[LOCAL_ANSWER] = True
            self._mark_refused(flow, "origin-not-allowed")
            return
        self._refuse(flow, 403, NO_CREDENTIALS, "origin-not-allowed",
                     f"{origin} is not in coze_origins: start with --origins {origin} (or --set coze_origins=...)",
                     cors)

    def _no_proxy_login(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow, 403, NO_CREDENTIALS, "login-unusable",
                     "coze-mitm: this proxy names its users by their proxy login (proxyauth), which a client that "
                     "calls its address directly cannot send: set the proxy in the client (or the browser's PAC file) "
                     "and call the Coze API by its own address")

    def _refuse(self, flow: http.HTTPFlow, status: int, code: int, reason: str, msg: str,
                headers: dict[str, str] | None = None) -> None:
        answer_json(flow, status, code, msg, headers)
        self._mark_refused(flow, reason)

    def _mark_refused(self, flow: http.HTTPFlow, reason: str) -> None:
        self.stats.refused(reason)
        flow.metadata[REFUSED] = reason
        flow.comment = f"coze-mitm: the proxy's own address: answered locally ({reason}); not forwarded"
        flow.marked = ":no_entry:"
        log.debug(f"coze-mitm: refused {flow.request.method} {flow.request.path.split('?')[0][:100]} on the proxy's "
                  f"own address ({reason})")
