"""The PAC file (pages/pac.py), answered by the proxy itself and never forwarded.

    GET http://127.0.0.1:8080/proxy.pac   a browser's automatic proxy configuration URL: the browser asks
                                          the proxy directly (origin-form, `GET /proxy.pac`, Host: the
                                          proxy), which reaches this hook like any request; answered here,
                                          or mitmproxy would send it to itself in a loop and answer 502
    GET http://coze.mitm/proxy.pac        the same file through the proxy (the status page links it)

The proxy address in the file is the one the browser reached: the request's Host when it asked the
proxy directly, else the listen address and the port really bound (as the status page names it).
What it lists follows the running settings: rebuilt on every configure.

Who gets which file (issue 25): with proxyauth on, the file is served without a login (browsers never
answer a 407 for it), so that file names no origin (salted digests only, pages/pac.py); a client on
another machine while coze_allow_remote is off, which may not use the proxy at all, gets no file
(proxyauth's 407 stands; without proxyauth the local_gate part answers it 403). Everyone else (this
machine without proxyauth, clients who logged in, e.g. through http://coze.mitm/proxy.pac) gets the
plain file.
"""

from __future__ import annotations

import logging
import secrets

from mitmproxy import ctx, http

from coze_mitm.core.hosts import DEFAULT_ONBOARDING_HOST, STATUS_HOST
from coze_mitm.core.identity import is_loopback
from coze_mitm.flowmeta import LOCAL_ANSWER
from coze_mitm.pages import pac
from coze_mitm.pages.userscript_fill import proxy_address
from coze_mitm.parts.settings import CozeSettings

log = logging.getLogger("coze.pac")

PAC_PATH_BYTES = pac.PAC_PATH.encode()


class Pac:
    acts_on_coze_api = False  # the PAC is served on the proxy's own address and coze.mitm only

    def __init__(self, settings: CozeSettings):
        self.settings = settings
        self.hosts: list[str] = [STATUS_HOST, DEFAULT_ONBOARDING_HOST]
        self.origins: list[str] = []
        self.proxy = proxy_address("", None)
        self._bound_port: int | None = None
        self.salt = secrets.token_hex(8)  # per process: the digests of one proxy's file say nothing of another's

    def configure(self, updated):
        handled = self.settings.handled()  # the same hosts the launcher intercepts and the CA vouches for
        self.hosts, self.origins = handled.named_hosts(), handled.origins()
        if updated & {"listen_host", "listen_port", "mode"}:
            self._bound_port = None
        self.proxy = proxy_address(getattr(ctx.options, "listen_host", ""),
                                   self._bound_port or getattr(ctx.options, "listen_port", None))

    def running(self):
        server = ctx.master.addons.get("proxyserver")
        addrs = server.listen_addrs() if server is not None else []
        if addrs:
            self._bound_port = addrs[0][1]
            self.proxy = proxy_address(getattr(ctx.options, "listen_host", ""), self._bound_port)

    def text(self, proxy: str | None = None, *, private: bool = False) -> str:
        """The file; `private`: for a reader without a login (origins as digests only)."""
        proxy = proxy or self.proxy
        if not pac.valid_proxy(proxy):  # e.g. a zoned IPv6 listen address: the browser is on this machine
            proxy = f"127.0.0.1:{proxy.rsplit(':', 1)[-1]}" if proxy.rsplit(":", 1)[-1].isdigit() else "127.0.0.1:8080"
        return pac.render(proxy, self.hosts, self.origins, salt=self.salt if private else None)

    def _may_use_the_proxy(self, flow: http.HTTPFlow) -> bool:
        """A client on this machine, or any with coze_allow_remote (a client on another machine without it may
        not use the proxy at all)."""
        if self.settings.allow_remote:
            return True
        peer = flow.client_conn.peername
        return bool(peer) and is_loopback(str(peer[0]))

    def _to_the_proxy(self, flow: http.HTTPFlow) -> bool:
        """Is this request addressed to the proxy itself (host:port of the socket the client reached)?"""
        request = flow.request
        sockname = flow.client_conn.sockname
        ports = {p for p in (sockname[1] if sockname else None, self._bound_port) if p}
        if request.port not in ports:
            return False
        host = request.host.lower().strip("[]")
        own = str(sockname[0]).lower() if sockname and sockname[0] else ""
        return host == own or is_loopback(host) or host == (getattr(ctx.options, "listen_host", "") or "").lower()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's proxyauth (before every script) answers 407 to a fetch without a login, and a browser never
        # answers a 407 for its PAC file: the PAC (no secret in it) is served to the proxy's own URL regardless.
        response = flow.response
        if response is None or response.status_code != 407 or flow.request.method not in ("GET", "HEAD"):
            return
        if flow.request.path.split("?", 1)[0] == pac.PAC_PATH and self._to_the_proxy(flow) \
                and self._may_use_the_proxy(flow):
            # Not logged in: the file that names no origin (an exception above leaves the 407: fails closed).
            flow.response = None
            self._serve(flow, private=True)

    def request(self, flow: http.HTTPFlow) -> None:
        self._serve(flow, private=False)

    def _serve(self, flow: http.HTTPFlow, private: bool) -> None:
        if flow.response or not flow.live:
            return
        request = flow.request
        # asked of every request: the raw path bytes first (request.path decodes them each time)
        if not request.data.path.startswith(PAC_PATH_BYTES) or request.path.split("?", 1)[0] != pac.PAC_PATH:
            return
        if request.host.lower() == STATUS_HOST:
            proxy = self.proxy
        elif self._to_the_proxy(flow):
            proxy = request.host_header or ""
            if not pac.valid_proxy(proxy):  # no port in Host, or something odd: the address as configured
                proxy = proxy_address(request.host, request.port)
                if not pac.valid_proxy(proxy):
                    proxy = self.proxy
        else:
            return
        if request.method not in ("GET", "HEAD"):
            flow.response = http.Response.make(405, b"the PAC file is read with GET\n",
                                               {"Content-Type": "text/plain; charset=utf-8", "Allow": "GET, HEAD"})
        else:
            flow.response = http.Response.make(200, self.text(proxy, private=private).encode("ascii"), {
                "Content-Type": pac.CONTENT_TYPE,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            })
        flow.metadata[LOCAL_ANSWER] = True
        flow.comment = "coze-mitm: PAC file"
