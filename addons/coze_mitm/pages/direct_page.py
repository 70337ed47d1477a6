"""The short page `GET /` on the proxy's own address answers (instead of mitmproxy's 502): what this is, the API base
to paste, where the status page is. No mitmproxy import; everything shown is escaped."""

from __future__ import annotations

import html

CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def render(base: str, origins, status_url: str) -> bytes:
    base_e = html.escape(base)
    allowed = ", ".join(f"<code>{html.escape(o)}</code>" for o in sorted(origins)) or (
        "none yet: start the proxy with <code>--set coze_origins=http://localhost:3000</code> (your page's origin)")
    status_e = html.escape(status_url)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>coze-mitm: a Coze API base</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}}
code,pre{{background:#f2f2f5;padding:.1em .3em;border-radius:3px}}pre{{padding:.6em}}</style></head>
<body>
<h1>coze-mitm</h1>
<p>This address is a local proxy that talks to the Coze API for you: it adds your Coze credentials (the token never
reaches your page), answers CORS for the page origins you allowed, streams replies and counts usage.
Use it as the <b>Coze API base</b> in your own page or script, with the token <code>user:&lt;id&gt;</code>
(an id of your choosing per user):</p>
<pre>{base_e}</pre>
<ul>
<li><code>@coze/api</code>: <code>new CozeAPI({{token: 'user:' + id, baseURL: '{base_e}'}})</code></li>
<li><code>@coze/chat-sdk</code>: <code>setting: {{apiBaseUrl: '{base_e}'}}</code></li>
<li>cozepy: <code>Coze(auth=TokenAuth('user:' + id), base_url='{base_e}')</code></li>
</ul>
<p>Page origins allowed: {allowed}.</p>
<p>Status, usage and the userscript: <a href="{status_e}">{status_e}</a> (a name only this proxy knows: open it in a
browser that uses the proxy, e.g. with its PAC file <a href="/proxy.pac">/proxy.pac</a>).</p>
</body></html>
""".encode()
