"""http://coze.mitm/ — the proxy's own pages, answered here and never forwarded.

/                    HTML status page for a person
/status.json         the same data for scripts (and the userscript's "am I proxied?" check)
/coze-chat.user.js   the userscript with this proxy's settings filled in
No page here has CORS headers or changes state on GET: a web page can neither read nor poke them.
"""

from __future__ import annotations

import html
import json
import time

from mitmproxy import http

from config import REPO_ROOT
from identity import short_id
from settings import CozeSettings

USERSCRIPT_PATH = REPO_ROOT / "userscript" / "coze-chat.user.js"


class StatusPages:
    def __init__(self, settings: CozeSettings):
        self.settings = settings

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        if not self.settings.is_status_host(flow.request):
            return
        path = flow.request.path.split("?", 1)[0]
        if flow.request.method not in ("GET", "HEAD"):
            flow.response = self._json(405, {"code": 4000, "msg": "coze.mitm pages are read-only: use GET"})
        elif path in ("/", "/index.html"):
            flow.response = http.Response.make(200, self.render_html().encode(), self._headers("text/html; charset=utf-8"))
        elif path == "/status.json":
            flow.response = self._json(200, self.status())
        else:
            flow.response = self._json(404, {"code": 4000, "msg": f"no page {path} here; see http://coze.mitm/"})
        flow.comment = "coze-mitm: status page"

    @staticmethod
    def _headers(content_type: str) -> dict[str, str]:
        return {"Content-Type": content_type, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    def _json(self, status: int, data: dict) -> http.Response:
        return http.Response.make(status, json.dumps(data, indent=2).encode(), self._headers("application/json; charset=utf-8"))

    def status(self) -> dict:
        s = self.settings
        stats = s.stats
        now = time.time()
        return {
            "service": "coze-mitm",
            "mode": s.broker.mode if s.broker else None,
            "api": sorted(map(str, s.api_origins)),
            "origins": sorted(s.page_origins),
            "uptime_seconds": int(now - stats.started),
            "counters": {
                "requests": stats.requests,
                "injected": stats.injected,
                "preflights": stats.preflights,
                "exchanges": s.broker.exchanges if s.broker else 0,
                "exchange_failures": s.broker.failures if s.broker else 0,
                "refusals": dict(stats.refusals),
            },
            "users": [
                {"user": short_id(user_id), "expires_at": int(expires_at), "expires_in_seconds": int(expires_at - now)}
                for user_id, expires_at in reversed(s.broker.users() if s.broker else [])
            ][:100],
            "last_errors": list(stats.last_errors),
        }

    def render_html(self) -> str:
        data = self.status()
        esc = html.escape
        rows = "".join(
            f"<tr><td><code>{esc(u['user'])}</code></td><td>{u['expires_in_seconds']} s</td></tr>" for u in data["users"]
        ) or "<tr><td colspan=2>none yet</td></tr>"
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>coze-mitm status</title></head>
<body><h1>coze-mitm</h1>
<p>Mode: <b>{esc(str(data['mode']).upper())}</b>; Coze API: {esc(', '.join(data['api']))}</p>
<p>Allowed page origins: {esc(', '.join(data['origins']) or 'none')}</p>
<h2>Users</h2><table><tr><th>user</th><th>token expires in</th></tr>{rows}</table>
<h2>Counters</h2><pre>{esc(json.dumps(data['counters'], indent=2))}</pre>
</body></html>"""
