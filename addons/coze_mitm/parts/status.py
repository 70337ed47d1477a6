"""http://coze.mitm/ — the proxy's own pages, answered here and never forwarded.

/                    HTML status page for a person (also over https://coze.mitm/)
/status.json         the same data for scripts (and the userscript's "am I proxied?" check)
/coze-chat.user.js   the userscript with this proxy's settings filled in (Tampermonkey offers to
                     install any URL ending in .user.js)
/ca-probe.png        a 1x1 image the status page loads over HTTPS to see whether the browser
                     accepts the proxy's certificates (i.e. trusts the mitmproxy CA)
/proxy.pac           the PAC file (answered by parts/pac.py, before this part; status.json's "pac_url")
/metrics             the counters in Prometheus' text format (status_usage.py): usage per user,
                     requests by outcome, token exchanges by result

Who may read them: clients on this machine; others only with coze_allow_remote (the local_gate part
answers them 403 before this part runs); with proxyauth, only after the login (mitmproxy's proxyauth
answers 407 first). A client on another machine without a login (coze_allow_remote, no proxyauth) sees no
user: status.json's `usage` and `users` are empty (the totals stay) and /metrics has one user, "(all)".

None of them shows a secret (tokens, the PAT, the key) or carries CORS headers, and no GET changes
state: a web page can neither read them nor poke them. The page is status.html (status_page.py),
rendered from the data of /status.json (`status()`) with autoescape: the one place values are
escaped. To add a section, add its data to `status()` and its markup to status.html.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Callable

from mitmproxy import ctx, http, tls

from coze_mitm import options
from coze_mitm.parts import demo
from coze_mitm.core import metrics, own_address
from coze_mitm.pages import status_usage
from coze_mitm.parts.answers import accept_connect
from coze_mitm.core.config import REPO_ROOT
from coze_mitm.core.csp_policy import resolve_sdk_url
from coze_mitm.core.identity import is_loopback, short_id
from coze_mitm.core.config import PYTHON
from coze_mitm.core.hosts import STATUS_HOST
from coze_mitm.core.stats import Stats
from coze_mitm.core.usage_book import UsageShown
from coze_mitm.parts.lifecycle import Lifecycle
from coze_mitm.parts.refused_origins import RefusedOriginsLog
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.pages.status_page import PAGE_CSP, render
from coze_mitm.core.exchange import scrub
from coze_mitm.core import scoped_ca
from coze_mitm.pages import userscript_fill
from coze_mitm.pages.pac import PAC_PATH
from coze_mitm.pages.userscript_fill import proxy_address, script_origins

log = logging.getLogger("coze.status")

USERSCRIPT_PATH = REPO_ROOT / "userscript" / "coze-chat.user.js"
USERSCRIPT_URL = f"http://{STATUS_HOST}/coze-chat.user.js"
# A 1x1 transparent PNG.
PROBE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
from coze_mitm.options import LAUNCHER  # noqa: E402  (how each way of starting names a setting)
# How each way of starting the proxy spells a setting, for the page's hints (option coze_launcher).
HINTS = {
    "": {"bot_id": "--set coze_bot_id=<bot id>", "origins": "--set coze_origins=https://your.page"},
    LAUNCHER: {"bot_id": "--bot-id <bot id>", "origins": "--origins https://your.page"},
}
# How to get a CA that vouches only for what coze-mitm intercepts (launcher/ca.py makes it).
NEW_CA_HINTS = {
    "": f"{PYTHON} run_mitm.py --new-ca (it lives in ~/.mitmproxy-coze-mitm; plain mitmdump uses it with "
        "--set confdir=~/.mitmproxy-coze-mitm)",
    LAUNCHER: f"{PYTHON} {LAUNCHER} --new-ca with your other flags",
}

class StatusPages:
    acts_on_coze_api = False  # coze.mitm only

    def __init__(self, settings: CozeSettings, usage: Callable[[], UsageShown] | None = None,
                 refused: RefusedOriginsLog | None = None, lifecycle: Lifecycle | None = None,
                 stats: Stats | None = None):
        self.settings = settings
        # Handed what the pages show, by what owns it: usage per user and the budget (the accounting part's
        # `shown`; None: no usage counted), the page origins refused lately, whether the proxy runs, and the
        # counters the parts count into.
        self.usage = usage
        self.refused = refused or RefusedOriginsLog()
        self.lifecycle = lifecycle or Lifecycle()
        self.stats = stats or Stats()
        self._template: str | None = None
        self.userscript: bytes | None = None
        self.userscript_version = ""
        self.sdk_url = ""
        self.proxy = proxy_address("", None)  # host:port the served script names (see running)
        self.api_base: str | None = own_address.listen_api_base("", None)  # the proxy's own address as an API base
        self._bound_port: int | None = None
        self.problems: list[str] = []
        self._ca_cache: tuple | None = None  # ((confdir, mtime, hosts), scoped_ca.describe(...))


    # ------------------------------------------------------------ configuration

    def configure(self, updated):
        if self._template is None:
            try:
                self._template = USERSCRIPT_PATH.read_text(encoding="utf-8")
            except OSError as e:
                log.warning(f"coze-mitm: cannot read the userscript {USERSCRIPT_PATH} ({e}); "
                            f"{USERSCRIPT_URL} will answer 404")
                self._template = ""
        opts = ctx.options
        if "coze_launcher" in updated and opts.coze_launcher not in HINTS:
            log.warning(f"coze-mitm: coze_launcher={opts.coze_launcher!r} is unknown (only {LAUNCHER} is); "
                        "the status page's hints name --set options")
        problems = []
        api_origins = sorted(str(o) for o in self.settings.api_origins)
        try:
            self.sdk_url = resolve_sdk_url(opts.coze_sdk_url, api_origins)
        except ValueError as e:
            message = f"coze-mitm: {e}; use the SDK's https:// URL, or leave coze_sdk_url empty for the official one"
            if self.lifecycle.started and "coze_sdk_url" in updated:
                options.refuse(message, started=True)  # rolled back: the SDK URL in force stays
            if str(e) not in self.problems:
                options.refuse(message, started=False)  # said once, not per reconfigure
            problems.append(str(e))
            self.sdk_url = resolve_sdk_url("", api_origins)
        self.problems = problems
        if updated & {"listen_host", "listen_port", "mode"}:
            self._bound_port = None  # the servers are restarted: until `running`, what the options say
        self.proxy = proxy_address(opts.listen_host, self._bound_port or opts.listen_port)
        self.api_base = self._api_base(self._bound_port or opts.listen_port)
        self._build_userscript()

    def running(self):
        # The port really bound (listen_port 0 means "any free port"); the host stays the browser's view of it.
        server = ctx.master.addons.get("proxyserver")
        addrs = server.listen_addrs() if server is not None else []
        if addrs:
            self._bound_port = addrs[0][1]
            self.api_base = self._api_base(self._bound_port)
            real = proxy_address(ctx.options.listen_host, self._bound_port)
            if real != self.proxy:
                self.proxy = real
                self._build_userscript()

    @staticmethod
    def _api_base(port: int | None) -> str | None:
        """The proxy's own address as a Coze API base (parts/direct_api.py): only when it listens on loopback, and
        only as a regular or upstream proxy (in reverse, SOCKS or transparent mode no request names its address).
        The first mode's server: the one listen_host/listen_port and `running`'s bound port describe."""
        modes = ctx.options.mode
        if modes and not str(modes[0]).startswith(("regular", "upstream")):
            return None
        return own_address.listen_api_base(ctx.options.listen_host, port)

    def _build_userscript(self) -> None:
        if not self._template:
            self.userscript, self.userscript_version = None, ""
            return
        values = {"botId": demo.bot_id(self.settings), "title": ctx.options.coze_title, "sdkUrl": self.sdk_url,
                  # its "fresh identity" menu says what follows
                  "loginMode": status_usage.identities(self.settings.login_mode)["mode"]}
        self.userscript, self.userscript_version, persisted = userscript_fill.build(
            self._template, sorted(self.settings.page_origins), values, self.proxy, getattr(ctx.options, "confdir", None))
        if not persisted:
            log.debug("coze-mitm: could not keep the userscript's version in the confdir; "
                      "installed copies may be offered an update after each restart")

    # ------------------------------------------------------------ hooks

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # https://coze.mitm exists only here: accept the CONNECT without trying to reach a server first.
        if flow.request.host.lower() == STATUS_HOST and not flow.response:
            accept_connect(flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # No server is called coze.mitm: make the certificate from the name alone rather than first try
        # (connection_strategy=eager) and fail to reach one, with a warning per connection.
        server = data.context.server
        if server.address and str(server.address[0]).lower() == STATUS_HOST:
            server.tls = False

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        if not self.settings.is_status_host(flow.request):
            return
        path = flow.request.path.split("?", 1)[0]
        if flow.request.method not in ("GET", "HEAD"):
            flow.response = self._json(405, {"code": 4000, "msg": "coze.mitm pages are read-only: use GET"})
        elif path in ("/", "/index.html"):
            headers = self._headers("text/html; charset=utf-8")
            headers["Content-Security-Policy"] = PAGE_CSP
            headers["X-Frame-Options"] = "DENY"
            flow.response = http.Response.make(200, self.render_html(flow).encode("utf-8"), headers)
        elif path == "/status.json":
            flow.response = self._json(200, self.status(flow))
        elif path == "/metrics":
            broker = self.settings.broker
            text = status_usage.metrics_text(self.stats, getattr(broker, "results", None) or {},
                                             self._usage(), hide_users=self.hide_users(flow))
            flow.response = http.Response.make(200, text.encode("utf-8"), {
                "Content-Type": metrics.CONTENT_TYPE, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            })
        elif path == "/coze-chat.user.js" and self.userscript is not None:
            flow.response = http.Response.make(200, self.userscript, self._headers("text/javascript; charset=utf-8"))
        elif path == "/ca-probe.png":
            # Loaded cross-origin by the http:// status page, so no Cross-Origin-Resource-Policy here.
            flow.response = http.Response.make(200, PROBE_PNG, {
                "Content-Type": "image/png", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            })
        else:
            flow.response = self._json(404, {"code": 4000, "msg": f"no page {path} here; see http://{STATUS_HOST}/"})
        flow.comment = "coze-mitm: status page"

    def hide_users(self, flow: http.HTTPFlow | None) -> bool:
        """An anonymous reader on another machine (coze_allow_remote without proxyauth, or with proxyauth `any`,
        which accepts any name): no user names."""
        if flow is None or self.settings.login_mode not in ("none", "any"):
            return False
        peer = flow.client_conn.peername
        return not (peer and is_loopback(str(peer[0])))

    @staticmethod
    def _headers(content_type: str) -> dict[str, str]:
        return {
            "Content-Type": content_type,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            # Other sites may not embed these (as <script>, <img>, ...); navigating to them still works.
            "Cross-Origin-Resource-Policy": "same-origin",
            "Referrer-Policy": "no-referrer",
        }

    def _json(self, status: int, data: dict) -> http.Response:
        body = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
        return http.Response.make(status, body, self._headers("application/json; charset=utf-8"))

    # ------------------------------------------------------------ the data

    def _usage(self) -> UsageShown | None:
        return self.usage() if self.usage is not None else None

    def status(self, flow: http.HTTPFlow | None = None) -> dict:
        s = self.settings
        stats = self.stats
        now = time.time()
        # (Inside a CONNECT tunnel the scheme follows the server side, which tls_clienthello set to none.)
        over_https = bool(flow and (flow.request.scheme == "https" or flow.client_conn.tls))
        demo_on = demo.enabled()
        shown = self._usage()
        data = {
            "service": "coze-mitm",
            "mode": s.broker.mode if s.broker else None,
            "api": sorted(map(str, s.api_origins)),
            "origins": sorted(s.page_origins),
            "problems": [scrub(p) for p in ([s.problem] if s.problem else []) + self.problems],
            "uptime_seconds": int(now - stats.started),
            "proxy": self.proxy,
            # A browser's automatic proxy configuration URL: only Coze goes through the proxy (parts/pac.py).
            "pac_url": f"http://{self.proxy}{PAC_PATH}",
            # The proxy's own address as a Coze API base (parts/direct_api.py), for clients that set no proxy; None
            # when it does not listen on loopback.
            "api_base": self.api_base,
            "https_needed": self._https_needed(),
            "ca": {
                # Fetched over https: the browser accepted the proxy's certificate (trusted CA, or a
                # warning clicked through). Over http nothing is known here; the HTML page probes.
                "fetched_over_https": over_https,
                "probably_trusted": True if over_https else None,
                "install_from": "http://mitm.it",
            },
            "ca_file": self.ca_file(),  # the CA in the confdir: which names it can vouch for
            "userscript": {
                "url": USERSCRIPT_URL, "version": self.userscript_version, "sdk_url": self.sdk_url,
                "title": ctx.options.coze_title, "pages": script_origins(s.page_origins),
            },
            "csp": {
                "enabled": bool(ctx.options.coze_csp),
                # page origin -> why the chat is unstyled there (see csp.py), scrub()bed like all upstream text
                "inline_styles_blocked": {o: scrub(m) for o, m in sorted(stats.page_notes.items())},
            },
            "counters": {
                **{name: value for name, _, _, value in stats.shown()},  # core/stats.py SHOWN
                "exchanges": s.broker.exchanges if s.broker else 0,
                "exchange_failures": s.broker.failures if s.broker else 0,
                "refusals": dict(sorted(stats.refusals.items())),
            },
            # Who the users are (the proxy login, or the userscript's tags) and what they used.
            "identities": status_usage.identities(s.login_mode),
            "usage": status_usage.usage(shown),  # biggest spenders first
            **status_usage.accounting_state(shown),
            "users": [
                {"user": short_id(user_id), "expires_at": int(expires_at), "expires_in_seconds": int(expires_at - now)}
                for user_id, expires_at in reversed(s.broker.users() if s.broker else [])
            ][:100],
            # Pages outside coze_origins that asked for Coze lately (newest first): why "my page gets a CORS error".
            "refused_origins": [{**r, "origin": scrub(r["origin"], 200)} for r in self.refused.recent()],
            "last_errors": [
                {"time": e.get("time"), "reason": scrub(str(e.get("reason", "")), 80), "msg": scrub(str(e.get("msg", ""))),
                 "logid": scrub(str(e.get("logid", "")), 80)}
                for e in reversed(stats.last_errors)
            ],
        }
        if self.hide_users(flow):
            data["usage"], data["users"] = [], []
        bot_id = demo.bot_id(s)
        if bot_id:
            data["bot_id"] = bot_id
        if demo_on:
            data["demo"] = {"sandbox": demo.SANDBOX_API, "page": f"{demo.DEMO_ORIGIN}/demo", "ready": demo.active(s)}
        return data

    def ca_file(self) -> dict:
        """The CA mitmproxy signs with (its confdir): the names it can vouch for, and the intercepted hosts it
        cannot (coze_origins or the API hosts grew since it was made). Read again only when the file changes."""
        hosts = self.settings.handled().ca_hosts()
        confdir = str(getattr(ctx.options, "confdir", "") or "~/.mitmproxy")
        try:
            stamp = (Path(confdir).expanduser() / scoped_ca.SIGNING_FILE).stat().st_mtime_ns
        except OSError:
            stamp = None
        key = (confdir, stamp, tuple(hosts))
        if self._ca_cache is None or self._ca_cache[0] != key:
            self._ca_cache = (key, scoped_ca.describe(confdir, hosts))
        info = dict(self._ca_cache[1])
        launcher = ctx.options.coze_launcher if ctx.options.coze_launcher in NEW_CA_HINTS else ""
        info["new_ca"] = NEW_CA_HINTS[launcher] if (info["every_site"] or info["missing"]) else ""
        return info

    def _https_needed(self) -> bool:
        """Does anything the pages load need the mitmproxy CA: an https page, or an https API they call?"""
        if any(o.startswith("https://") for o in script_origins(self.settings.page_origins)):
            return True
        called = demo.page_api_origins(self.settings)
        return any(o.startswith(("https://", "wss://")) for o in called)

    # ------------------------------------------------------------ the page

    def render_html(self, flow: http.HTTPFlow | None = None) -> str:
        data = self.status(flow)
        launcher = ctx.options.coze_launcher if ctx.options.coze_launcher in HINTS else ""
        hints = dict(HINTS[launcher])
        hints["origins_demo"] = ""
        if data.get("demo"):
            if launcher:
                hints["origins"] = f"{PYTHON} {LAUNCHER} --demo {hints['origins']}"
            hints["origins_demo"] = f" (the demo page {data['demo']['page']} needs no userscript)"
        c = data["counters"]
        view = {
            "mode": (data["mode"] or "not configured").upper(),
            "running_ok": data["mode"] is not None and not data["problems"],
            "install": bool(self.userscript) and bool(data["userscript"]["pages"]),
            "demo": data.get("demo"),  # optional keys of status.json: None when absent
            "bot_id": data.get("bot_id", ""),
            "bot_id_is_sandbox": bool(data.get("demo")) and not ctx.options.coze_bot_id.strip(),
            "hints": hints,
            "logins": data["identities"]["mode"] != "none",
            "user_label": "login" if data["identities"]["mode"] != "none" else "user (shortened id)",
            "counters": [
                *((label, c[name]) for name, label, _, _ in self.stats.shown()),
                ("Token exchanges", c["exchanges"]),
                ("Token exchange failures", c["exchange_failures"]),
                ("Requests refused", sum(c["refusals"].values())),
            ],
        }
        return render(data, view)
