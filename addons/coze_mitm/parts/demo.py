"""http://coze.mitm/demo — a small chat page that talks to the local SANDBOX through the whole path.

Active only with `--set coze_demo=true`, which `python3 run_mitm.py --demo` sets together with a
local Coze stand-in (sandbox/coze_standin.py) as the configured API and http://coze.mitm in
coze_origins. The page then does what the Web Chat SDK does on a real page:

    page http://coze.mitm/demo ── POST http://sandbox.coze.mitm/v3/chat   Authorization: Bearer user:<id>
        a cross-origin call: the browser sends a CORS preflight first (answered by cors.py),
        then the tagged POST: auth.py mints this user's token from the sandbox and swaps it in,
        and the SSE reply streams back delta by delta.

`sandbox.coze.mitm` is a name only this proxy knows: it is mapped here to the configured API origin,
and only when that origin is on this machine (a sandbox), never to a real Coze. A browser sends it
through its proxy like any other host, whereas 127.0.0.1 would bypass the proxy in most browsers.
Clients that tunnel (a CONNECT to sandbox.coze.mitm:80 or :443: undici's ProxyAgent always does,
browsers do for ws://) get the tunnel from here too, since no server of that name exists to connect
to; what arrives inside it, plain http or TLS with the proxy's certificate, is mapped the same way.

In the demo, the pages call the sandbox by that name: the served userscript and the status page name
the sandbox's bot, and allowed pages' CSP gets http://sandbox.coze.mitm in connect-src (`bot_id`,
`page_api_origins`; the other addons ask these functions).
"""

from __future__ import annotations

import html
import json
import logging
import secrets
from pathlib import Path

from mitmproxy import ctx, http, tls

from coze_mitm.parts.answers import accept_connect, answer_json
from coze_mitm.core.config import Origin, parse_api_origin
from coze_mitm.core.config import PYTHON
from coze_mitm.core.hosts import DEMO_API_HOST as SANDBOX_HOST, DEMO_ORIGIN, REAL_COZE_HOSTS, STATUS_HOST
from coze_mitm.core.identity import is_loopback
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.flowmeta import DEMO_ROUTED

log = logging.getLogger("coze.demo")

DEMO_PATHS = ("/demo", "/demo/")
DEMO_HTML = Path(__file__).resolve().parent.parent / "pages" / "demo.html"
SANDBOX_API = f"http://{SANDBOX_HOST}"
DEFAULT_BOT_ID = "7000000000000000001"
# Coze's own hosts (REAL_COZE_HOSTS) are answered here in the demo (a JSON note that the demo talks to the
# sandbox), never tunnelled to the internet: a page written for the real Coze then says why it gets no answer.


def enabled() -> bool:
    """Is the coze_demo option on? (False where the Demo addon is not loaded, e.g. in unit tests.)"""
    return bool(getattr(ctx.options, "coze_demo", False))


def sandbox_origin(settings: CozeSettings) -> Origin | None:
    """The configured API origin if it is a local sandbox (JWT mode, loopback host), else None."""
    app = settings.app
    if app is None or settings.broker is None:
        return None
    origin = parse_api_origin(app.api_base)
    return origin if is_loopback(origin.host) else None


def active(settings: CozeSettings) -> bool:
    """The demo is on and has a local sandbox to send sandbox.coze.mitm to."""
    return enabled() and sandbox_origin(settings) is not None


def bot_id(settings: CozeSettings) -> str:
    """The bot the pages chat with: coze_bot_id, or in the demo the sandbox's bot."""
    return ctx.options.coze_bot_id.strip() or (DEFAULT_BOT_ID if active(settings) else "")


def page_api_origins(settings: CozeSettings) -> list[str]:
    """The API origins as pages call them (Coze's ws hosts too: @coze/api's WebSockets need connect-src);
    in the demo the sandbox by its name, not its loopback address."""
    origins = sorted(str(o) for o in settings.api_origins | settings.ws_origins)
    sandbox = sandbox_origin(settings) if enabled() else None
    if sandbox is None:
        return origins
    return sorted({SANDBOX_API if o == str(sandbox) else o for o in origins})




class Demo:
    acts_on_coze_api = False  # its pages, its sandbox name and real Coze hosts while the demo is local: none a Coze API origin

    def __init__(self, settings: CozeSettings):
        self.settings = settings
        self._template: str | None = None
        self.on = False  # coze_demo, read in configure: the flow hooks of a proxy without the demo return at once
        self._told: set[str] = set()  # real Coze hosts a page called during the demo (logged once each)


    @property
    def in_use(self) -> bool:
        """The bundle calls no hook of this part while it is off."""
        return self.on

    def configure(self, updated):
        if "coze_demo" in updated:
            self.on = bool(ctx.options.coze_demo)
        if "coze_demo" not in updated and not updated & {"coze_config", "coze_api_base", "coze_origins", "coze_pat"}:
            return
        if not ctx.options.coze_demo:
            return
        target = self.sandbox_origin()
        if target is None:
            log.warning(
                f"coze-mitm: coze_demo is on, but the configured Coze API ({self._api_description()}) is not a local "
                f"sandbox: the demo page stays off; start it with: {PYTHON} run_mitm.py --demo"
            )
            return
        self.template()  # read the page now, not on the event loop when the first request arrives
        if DEMO_ORIGIN not in self.settings.page_origins:
            log.warning(f"coze-mitm: coze_demo: add {DEMO_ORIGIN} to coze_origins, or the demo page gets no credentials")
        log.info(f"coze-mitm: demo page at {DEMO_ORIGIN}/demo; its API {SANDBOX_API} goes to the local SANDBOX at {target}")

    def _api_description(self) -> str:
        return ", ".join(sorted(map(str, self.settings.api_origins))) or "none"

    def sandbox_origin(self) -> Origin | None:
        return sandbox_origin(self.settings)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # No server is called sandbox.coze.mitm: mitmproxy would fail to connect to it (502) before any
        # request hook ran. Open the tunnel here; the requests inside it are routed in `request`.
        if not self.on or flow.response:
            return
        host = flow.request.host.lower()
        if host == SANDBOX_HOST:
            accept_connect(flow)
            flow.comment = f"coze-mitm demo: tunnel to {SANDBOX_HOST} opened by the proxy"
        elif host in REAL_COZE_HOSTS and self._real_coze_answered_here():
            accept_connect(flow)
            flow.comment = f"coze-mitm demo: {host} answered by the proxy (the demo talks to {SANDBOX_API})"

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # TLS inside that tunnel: with connection_strategy=eager mitmproxy would first try TLS with a server
        # of that name (to copy its certificate), fail, and log a warning per tunnel. There is none: make
        # the client's certificate from the name alone. (The requests inside are re-addressed in `request`.)
        server = data.context.server
        if not (self.on and server.address):
            return
        host = str(server.address[0]).lower()
        if host == SANDBOX_HOST or (host in REAL_COZE_HOSTS and self._real_coze_answered_here()):
            server.tls = False

    def request(self, flow: http.HTTPFlow) -> None:
        if not self.on or flow.response or not flow.live:
            return
        request = flow.request
        host = request.host.lower()
        if host == SANDBOX_HOST and request.scheme in ("http", "https"):
            self._route_to_sandbox(flow)
        elif host == STATUS_HOST and request.path.split("?", 1)[0] in DEMO_PATHS and request.method in ("GET", "HEAD"):
            self._serve_page(flow)
        elif host in REAL_COZE_HOSTS and self._real_coze_answered_here():
            self._answer_for_real_coze(flow, host)

    def _real_coze_answered_here(self) -> bool:
        # Only while the demo's API is the local sandbox: a real Coze configured with coze_demo on is real.
        return not any(o.host in REAL_COZE_HOSTS for o in (*self.settings.api_origins, *self.settings.ws_origins))

    def _answer_for_real_coze(self, flow: http.HTTPFlow, host: str) -> None:
        origin = flow.request.headers.get("origin", "")
        cors = {}
        if origin in self.settings.page_origins:
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept-Language, X-Coze-Client-User-Agent",
                    "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS"}
        if flow.request.method == "OPTIONS" and "access-control-request-method" in flow.request.headers:
            # The preflight passes, so the page can read the note below rather than a bare CORS failure.
            flow.response = http.Response.make(204, b"", cors)
        else:
            answer_json(flow, 503, 5000,
                        f"coze-mitm runs the demo (run_mitm.py --demo): it talks to the local sandbox at {SANDBOX_API}, "
                        f"not to {host}. Point the page's API base at {SANDBOX_API}, or start coze-mitm without --demo "
                        "and with your app's config to reach Coze.", cors)
        flow.comment = f"coze-mitm demo: {host} answered locally; the demo talks to {SANDBOX_API}"
        if host not in self._told:
            self._told.add(host)
            log.warning(f"coze-mitm: demo: a page called {host}; the demo answers it locally (the sandbox is {SANDBOX_API})")

    def _route_to_sandbox(self, flow: http.HTTPFlow) -> None:
        target = self.sandbox_origin()
        if target is None:
            answer_json(flow, 503, 5000,
                        f"{SANDBOX_HOST} is the coze-mitm demo's name for a local sandbox, and none is configured "
                        f"(the Coze API is {self._api_description()}); start the demo with: {PYTHON} run_mitm.py --demo")
            flow.comment = "coze-mitm demo: no local sandbox configured; answered locally"
            return
        # Before cors/auth see the flow: from here on it is a request to the configured API origin.
        flow.request.scheme, flow.request.host, flow.request.port = target.scheme, target.host, target.port
        flow.metadata[DEMO_ROUTED] = True
        flow.comment = f"coze-mitm demo: {SANDBOX_HOST} sent to the local SANDBOX at {target} (not Coze)"

    def _serve_page(self, flow: http.HTTPFlow) -> None:
        nonce = secrets.token_urlsafe(16)
        ready = self.sandbox_origin() is not None
        page_config = {
            "apiBase": SANDBOX_API,
            "botId": ctx.options.coze_bot_id.strip() or DEFAULT_BOT_ID,
            "ready": ready,
            "problem": "" if ready else (
                f"the configured Coze API ({self._api_description()}) is not a local sandbox; "
                f"start the demo with: {PYTHON} run_mitm.py --demo"
            ),
        }
        # JSON inside <script>: "<" escaped so no value can close the element.
        config_json = json.dumps(page_config).replace("<", "\\u003c")
        body = (
            self.template()
            .replace("__NONCE__", nonce)
            .replace("__CONFIG_JSON__", config_json)
            .replace("__TITLE__", html.escape(ctx.options.coze_title or "Coze"))
        )
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            f"connect-src {SANDBOX_API}; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        flow.response = http.Response.make(200, body.encode(), {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": csp,
            "Referrer-Policy": "no-referrer",
        })
        flow.comment = "coze-mitm: demo page"

    def template(self) -> str:
        if self._template is None:
            self._template = DEMO_HTML.read_text(encoding="utf-8")
        return self._template
