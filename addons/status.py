"""http://coze.mitm/ — the proxy's own pages, answered here and never forwarded.

/                    HTML status page for a person (also over https://coze.mitm/)
/status.json         the same data for scripts (and the userscript's "am I proxied?" check)
/coze-chat.user.js   the userscript with this proxy's settings filled in (Tampermonkey offers to
                     install any URL ending in .user.js)
/ca-probe.png        a 1x1 image the status page loads over HTTPS to see whether the browser
                     accepts the proxy's certificates (i.e. trusts the mitmproxy CA)

None of them shows a secret (tokens, the PAT, the key) or carries CORS headers, and no GET changes
state: a web page can neither read them nor poke them. Every value shown is HTML-escaped; the
page's own CSP allows nothing but its inline style and script (by hash) and the probe image.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
import time
from pathlib import Path

from mitmproxy import ctx, http

from config import REPO_ROOT
from csp_policy import resolve_sdk_url
from identity import short_id
from settings import STATUS_HOST, CozeSettings
from tokens import scrub

log = logging.getLogger("coze.status")

USERSCRIPT_PATH = REPO_ROOT / "userscript" / "coze-chat.user.js"
USERSCRIPT_URL = f"http://{STATUS_HOST}/coze-chat.user.js"
VERSION_STATE_FILE = "coze-mitm-userscript.json"  # in mitmproxy's confdir: keeps @version stable across restarts
NO_ORIGIN_MATCH = "http://no-page-origin-configured.invalid/*"  # .invalid never resolves: matches no page
# A 1x1 transparent PNG.
PROBE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

_MATCH_LINE = re.compile(r"// @match\s+.*")
_VERSION_LINE = re.compile(r"^(// @version\s+)(\S+)\s*$", re.M)


# ---------------------------------------------------------------- the userscript


def fill_userscript(template: str, origins: list[str], values: dict[str, str]) -> str:
    """The userscript with one @match per page origin and the config block's values replaced.

    Values go in as JSON string literals (ASCII only, so no U+2028 or quote can end the line or the
    string early); origins were validated by coze_origins' parser.
    """
    # The proxy's own pages (the demo puts http://coze.mitm in coze_origins) never get the SDK injected.
    own = {f"http://{STATUS_HOST}", f"https://{STATUS_HOST}"}
    matches = [f"// @match        {o}/*" for o in sorted(origins) if o not in own]
    if not matches:
        # No @match at all would mean "every page" to some script managers: match nothing useful instead.
        matches = [f"// @match        {NO_ORIGIN_MATCH}"]
    lines, placed = [], False
    for line in template.split("\n"):
        if _MATCH_LINE.fullmatch(line):
            if not placed:  # the template's placeholder @match line(s) become ours, in the same place
                lines.extend(matches)
                placed = True
            continue
        if line.startswith("// ==/UserScript==") and not placed:
            lines.extend(matches)
            placed = True
        lines.append(line)
    text = "\n".join(lines)
    for key, value in values.items():
        text = re.sub(
            rf"^(  {re.escape(key)}: ).*?(, // @coze-mitm {re.escape(key)}\b.*)$",
            lambda m: m[1] + json.dumps(value) + m[2], text, count=1, flags=re.M,
        )
    return text


def base_version(template: str) -> str:
    m = _VERSION_LINE.search(template)
    return m[2] if m else "0"


def set_version(text: str, version: str) -> str:
    return _VERSION_LINE.sub(lambda m: m[1] + version, text, count=1)


def version_stamp(digest: str, state_path: Path | None, now: float) -> tuple[int, bool]:
    """A number that stays the same while `digest` does and rises whenever it changes.

    It is the time of the last change, kept in a small file so a restart with the same settings
    gives the same number (Tampermonkey then sees no update). Returns (stamp, persisted).
    """
    old: dict = {}
    if state_path is not None:
        try:
            old = json.loads(state_path.read_text())
        except (OSError, ValueError):
            old = {}
    if not isinstance(old, dict):
        old = {}
    old_stamp = old.get("stamp") if isinstance(old.get("stamp"), int) else 0
    if old.get("digest") == digest and old_stamp > 0:
        return old_stamp, True
    stamp = max(int(now), old_stamp + 1)  # never backwards, even if the clock is
    if state_path is None:
        return stamp, False
    try:
        tmp = state_path.with_name(state_path.name + ".tmp")
        tmp.write_text(json.dumps({"digest": digest, "stamp": stamp}))
        os.replace(tmp, state_path)
    except OSError:
        return stamp, False
    return stamp, True


# ---------------------------------------------------------------- small formatting helpers


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return "expired"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _error_row(e: dict) -> str:
    esc = html.escape
    when = _clock(e["time"]) if isinstance(e["time"], (int, float)) else ""
    logid = f"<code>{esc(e['logid'])}</code>" if e["logid"] else ""
    return f"<tr><td>{esc(when)}</td><td><code>{esc(e['reason'])}</code></td><td>{esc(e['msg'])}</td><td>{logid}</td></tr>"


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2129}
header{background:#1d2129;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:14px}
header h1{font-size:20px;margin:0}
main{max-width:1080px;margin:0 auto;padding:18px 24px 40px}
.badge{border-radius:12px;padding:2px 10px;font-size:13px;font-weight:600;background:#3b3f46;color:#fff}
.badge.ok{background:#1f8a4c;color:#fff}.badge.bad{background:#c0392b;color:#fff}
header .muted{color:#b8bec9}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px}
.card{background:#fff;border-radius:8px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.card h2{font-size:15px;margin:0 0 6px}
h2.section{font-size:17px;margin:26px 0 8px}
.ok{color:#1f8a4c}.bad{color:#c0392b}.warn{color:#a86400}.muted{color:#6b7280}
.problem{background:#fdecea;border:1px solid #c0392b;border-radius:8px;padding:10px 14px;margin-bottom:14px}
.button{display:inline-block;background:#4d53e8;color:#fff;text-decoration:none;font-weight:600;
 padding:9px 18px;border-radius:6px;margin:4px 0}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px;overflow:hidden;
 box-shadow:0 1px 3px rgba(0,0,0,.12)}
th,td{text-align:left;padding:7px 12px;border-bottom:1px solid #eceef1;vertical-align:top}
th{background:#f8f9fb;font-weight:600}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f2f4;padding:1px 4px;border-radius:4px;
 word-break:break-all}
ul{margin:4px 0;padding-left:20px}
"""

# Loads https://coze.mitm/ca-probe.png: it loads only if the browser accepts the certificate the
# proxy makes for coze.mitm, i.e. trusts the mitmproxy CA (or had an exception added by hand).
PROBE_SCRIPT = """
(function () {
  var el = document.getElementById('ca-state');
  if (!el) return;
  var done = false;
  function show(ok) {
    if (done) return;
    done = true;
    el.className = ok ? 'ok' : 'bad';
    el.textContent = ok
      ? '\\u2714 This browser accepted the proxy\\u2019s HTTPS certificate for https://coze.mitm: the mitmproxy CA is probably trusted.'
      : '\\u2718 https://coze.mitm did not load: most likely this browser does not trust the mitmproxy CA yet ' +
        '(HTTPS pages would show certificate errors), or its HTTPS traffic does not go through the proxy ' +
        '(set the proxy for HTTPS too).';
  }
  var img = new Image();
  img.onload = function () { show(true); };
  img.onerror = function () { show(false); };
  setTimeout(function () { show(false); }, 6000);
  img.src = 'https://coze.mitm/ca-probe.png?t=' + Date.now();
})();
"""

PAGE_CSP = "; ".join([
    "default-src 'none'",
    f"style-src {_csp_hash(STYLE)}",
    f"script-src {_csp_hash(PROBE_SCRIPT)}",
    f"img-src https://{STATUS_HOST}",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


class StatusPages:
    def __init__(self, settings: CozeSettings):
        self.settings = settings
        self._template: str | None = None
        self.userscript: bytes | None = None
        self.userscript_version = ""
        self.sdk_url = ""
        self.problems: list[str] = []

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
        problems = []
        api_origins = sorted(str(o) for o in self.settings.api_origins)
        try:
            self.sdk_url = resolve_sdk_url(opts.coze_sdk_url, api_origins)
        except ValueError as e:
            # An ERROR line at startup stops mitmdump, as a bad setting should (said once, not per reconfigure).
            if str(e) not in self.problems:
                log.error(f"coze-mitm: {e}; use the SDK's https:// URL, or leave coze_sdk_url empty for the official one")
            problems.append(str(e))
            self.sdk_url = resolve_sdk_url("", api_origins)
        self.problems = problems
        self._build_userscript()

    def _build_userscript(self) -> None:
        if not self._template:
            self.userscript, self.userscript_version = None, ""
            return
        opts = ctx.options
        text = fill_userscript(self._template, sorted(self.settings.page_origins), {
            "botId": opts.coze_bot_id.strip(),
            "title": opts.coze_title,
            "sdkUrl": self.sdk_url,
        })
        digest = hashlib.sha256(text.encode()).hexdigest()
        state_path = None
        confdir = getattr(opts, "confdir", None)
        if confdir:
            state_path = Path(os.path.expanduser(confdir)) / VERSION_STATE_FILE
        stamp, persisted = version_stamp(digest, state_path, time.time())
        if not persisted:
            log.debug("coze-mitm: could not keep the userscript's version in the confdir; "
                      "installed copies may be offered an update after each restart")
        self.userscript_version = f"{base_version(self._template)}.{stamp}"
        self.userscript = set_version(text, self.userscript_version).encode("utf-8")

    # ------------------------------------------------------------ hooks

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # https://coze.mitm exists only here: accept the CONNECT without trying to reach a server first.
        if flow.request.host.lower() == STATUS_HOST and not flow.response:
            now = time.time()
            flow.response = http.Response(
                flow.request.data.http_version, 200, b"Connection established", http.Headers(), b"", None, now, now,
            )

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

    def status(self, flow: http.HTTPFlow | None = None) -> dict:
        s = self.settings
        stats = s.stats
        now = time.time()
        over_https = bool(flow and flow.request.scheme == "https")
        data = {
            "service": "coze-mitm",
            "mode": s.broker.mode if s.broker else None,
            "api": sorted(map(str, s.api_origins)),
            "origins": sorted(s.page_origins),
            "problems": [scrub(p) for p in ([s.problem] if s.problem else []) + self.problems],
            "uptime_seconds": int(now - stats.started),
            "ca": {
                # Fetched over https: the browser accepted the proxy's certificate (trusted CA, or a
                # warning clicked through). Over http nothing is known here; the HTML page probes.
                "fetched_over_https": over_https,
                "probably_trusted": True if over_https else None,
                "install_from": "http://mitm.it",
            },
            "userscript": {"url": USERSCRIPT_URL, "version": self.userscript_version, "sdk_url": self.sdk_url},
            "csp": {"enabled": bool(ctx.options.coze_csp)},
            "counters": {
                "requests": stats.requests,
                "injected": stats.injected,
                "preflights": stats.preflights,
                "exchanges": s.broker.exchanges if s.broker else 0,
                "exchange_failures": s.broker.failures if s.broker else 0,
                "refusals": dict(sorted(stats.refusals.items())),
            },
            "users": [
                {"user": short_id(user_id), "expires_at": int(expires_at), "expires_in_seconds": int(expires_at - now)}
                for user_id, expires_at in reversed(s.broker.users() if s.broker else [])
            ][:100],
            "last_errors": [
                {"time": e.get("time"), "reason": scrub(str(e.get("reason", "")), 80), "msg": scrub(str(e.get("msg", ""))),
                 "logid": scrub(str(e.get("logid", "")), 80)}
                for e in reversed(stats.last_errors)
            ],
        }
        bot_id = ctx.options.coze_bot_id.strip()
        if bot_id:
            data["bot_id"] = bot_id
        return data

    # ------------------------------------------------------------ the page

    def render_html(self, flow: http.HTTPFlow | None = None) -> str:
        data = self.status(flow)
        esc = html.escape
        opts = ctx.options
        mode = (data["mode"] or "not configured").upper()
        running_ok = data["mode"] is not None and not data["problems"]

        problems = "".join(f'<div class="problem"><b>Problem:</b> {esc(p)}</div>' for p in data["problems"])

        if data["mode"] == "pat":
            mode_note = ('<p class="warn">PAT mode: every user shares one Coze identity and one chat history. '
                         "Use a JWT app config for private histories.</p>")
        elif data["mode"] == "jwt":
            mode_note = "<p class=\"muted\">Each user gets their own Coze token (session_name = their id), so their own history.</p>"
        else:
            mode_note = ""

        if data["ca"]["fetched_over_https"]:
            ca = ('<p class="ok">\u2714 This page came over HTTPS from the proxy, so this browser accepted the '
                  "proxy's certificate: the mitmproxy CA is probably trusted (unless a certificate warning was "
                  "clicked through).</p>")
        else:
            ca = ('<p id="ca-state" class="muted">Checking whether this browser accepts the proxy\'s HTTPS '
                  "certificates\u2026</p><noscript><p class=\"muted\">Unknown without JavaScript: open "
                  '<a href="https://coze.mitm/">https://coze.mitm/</a>; if it opens without a certificate warning, '
                  "the mitmproxy CA is trusted.</p></noscript>")
        ca += ('<p>Not trusted yet? Install the mitmproxy CA from <a href="http://mitm.it">http://mitm.it</a> '
               "(open it with this proxy set), then reload.</p>")

        origins = data["origins"]
        origin_list = ("<ul>" + "".join(f"<li><code>{esc(o)}</code></li>" for o in origins) + "</ul>") if origins else (
            '<p class="bad">None: no page may use the chat. Start the proxy with '
            "<code>--set coze_origins=https://your.page</code>.</p>")

        bot_id = data.get("bot_id", "")
        bot_line = f"<code>{esc(bot_id)}</code>" if bot_id else (
            '<span class="bad">not set</span> (start with <code>--set coze_bot_id=&lt;bot id&gt;</code>)')
        userscript = data["userscript"]
        install = (f'<a class="button" href="/coze-chat.user.js">Install userscript</a> '
                   f'<span class="muted">version {esc(userscript["version"])}</span>') if self.userscript else (
            '<p class="bad">The userscript file is missing from this installation.</p>')

        users_rows = "".join(
            f"<tr><td><code>{esc(u['user'])}</code></td><td>{esc(_ago(u['expires_in_seconds']))}</td>"
            f"<td>{esc(_clock(u['expires_at']))}</td></tr>"
            for u in data["users"]
        ) or '<tr><td colspan="3" class="muted">none yet</td></tr>'

        c = data["counters"]
        counter_rows = "".join(f"<tr><td>{esc(label)}</td><td>{value}</td></tr>" for label, value in (
            ("Requests to the Coze API", c["requests"]),
            ("Credentials injected", c["injected"]),
            ("CORS preflights answered", c["preflights"]),
            ("Token exchanges", c["exchanges"]),
            ("Token exchange failures", c["exchange_failures"]),
            ("Requests refused", sum(c["refusals"].values())),
        ))
        refusal_rows = "".join(
            f"<tr><td><code>{esc(reason)}</code></td><td>{n}</td></tr>" for reason, n in c["refusals"].items()
        ) or '<tr><td colspan="2" class="muted">none</td></tr>'
        error_rows = "".join(map(_error_row, data["last_errors"])) or '<tr><td colspan="4" class="muted">none</td></tr>'

        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>coze-mitm status</title><style>{STYLE}</style></head>
<body>
<header><h1>coze-mitm</h1><span class="badge {'ok' if running_ok else 'bad'}">{esc(mode)} mode</span>
<span class="muted">up {esc(_ago(data['uptime_seconds']))}</span></header>
<main>
{problems}
<div class="grid">
<section class="card"><h2>Proxy</h2>
<p class="ok">\u2714 This browser goes through coze-mitm: this page is answered by the proxy itself.</p>
<p>Coze API: {', '.join(f'<code>{esc(a)}</code>' for a in data['api']) or '<span class="bad">none</span>'}</p>
{mode_note}</section>
<section class="card"><h2>HTTPS (mitmproxy CA)</h2>{ca}</section>
<section class="card"><h2>Userscript</h2>
{install}
<p>Bot id: {bot_line}<br>Title: {esc(opts.coze_title)}<br>
SDK: <code>{esc(userscript['sdk_url'])}</code></p>
<p class="muted">Tampermonkey or Violentmonkey offers to install it; it updates itself when these settings change.</p>
</section>
<section class="card"><h2>Allowed page origins</h2>{origin_list}
<p class="muted">Their Content-Security-Policy {'gets' if opts.coze_csp else 'does <b>not</b> get'} the Chat SDK's sources added.</p>
</section>
</div>
<h2 class="section">Users</h2>
<table><tr><th>user (shortened id)</th><th>token expires in</th><th>at</th></tr>{users_rows}</table>
<div class="grid">
<div><h2 class="section">Counters</h2><table>{counter_rows}</table></div>
<div><h2 class="section">Refusals by reason</h2><table><tr><th>reason</th><th>count</th></tr>{refusal_rows}</table></div>
</div>
<h2 class="section">Last errors</h2>
<table><tr><th>time</th><th>reason</th><th>what happened</th><th>Coze logid</th></tr>{error_rows}</table>
<p class="muted">The same data for scripts: <a href="/status.json">/status.json</a>.
No token, key or PAT is ever shown here.</p>
</main>
<script>{PROBE_SCRIPT}</script>
</body></html>"""
