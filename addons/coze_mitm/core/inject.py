"""coze_inject: the userscript's loader put into allowed pages by the proxy itself. Pure logic, no mitmproxy import.

A browser with no userscript manager (the one `run_mitm.py --browser` starts, or any browser using the proxy) gets
the same chat as with the userscript: the proxy adds one inline <script> to the HTML of pages in coze_origins. It is
the served userscript (its config block filled in, pages/userscript_fill.py) inside a small wrapper that stands in
for what a userscript manager gives it:

* GM_getValue / GM_setValue: the page origin's localStorage (key prefix `coze-mitm:`), so the user id the
  userscript makes (`<ms>-<128 random bits, base64url>`) is kept per origin and browser profile; where storage is
  refused (privacy modes), kept in memory for this page view only.
* GM_xmlhttpRequest (the userscript's "am I proxied?" question to http://coze.mitm/status.json): answered in the
  page with what the proxy knows when it injects, since only a proxied page gets the loader at all.
* the loader waits for the page's `load` event and a moment more, then stands down when the userscript already runs
  on the page (it sets window.__cozeMitmLoaded as it starts, at document-idle, before `load` in practice); the
  userscript's own guard keeps the two from both loading the SDK whichever runs first.

Allowed by the page's Content-Security-Policy through a hash source of exactly this script ('sha256-...'), added only
where the page's script policy would block it (see `allow_loader`). A hash, not a nonce: the same for every response
with the same settings, so a 304's headers (which replace the cached page's) still allow the cached page's loader.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

from coze_mitm.core.csp_meta import HEAD_SCAN_LIMIT, patch_meta_tags
from coze_mitm.core.csp_policy import UNSAFE_INLINE, _governing, has_nonce_or_hash, patch_policy

STORE_PREFIX = "coze-mitm:"
MARKER = "data-coze-mitm"  # the attribute on the injected <script>: tells it from the page's own scripts
STAND_DOWN_MS = 250  # after `load`: a userscript manager's document-idle run has happened by then in practice

_WRAPPER = """(function () {
  'use strict';
  if (window.top !== window) return;
  var STATUS = %(status)s;
  var PREFIX = %(prefix)s;
  var memory = {};
  function GM_getValue(key, fallback) {
    try { var v = window.localStorage.getItem(PREFIX + key); return v === null ? fallback : v; }
    catch (e) { return Object.prototype.hasOwnProperty.call(memory, key) ? memory[key] : fallback; }
  }
  function GM_setValue(key, value) {
    try { window.localStorage.setItem(PREFIX + key, String(value)); } catch (e) { memory[key] = String(value); }
  }
  function GM_xmlhttpRequest(details) {
    setTimeout(function () { details.onload({ status: 200, responseText: JSON.stringify(STATUS) }); }, 0);
  }
  var unsafeWindow = window;
  var module;
  function run() {
    if (window.__cozeMitmLoaded || window.__cozeMitmClient || document.getElementById('coze-mitm-sdk')) {
      window.__cozeMitmInjected = 'stood down';
      return;
    }
    window.__cozeMitmInjected = 'running';
/* the userscript, as http://coze.mitm/coze-chat.user.js serves it */
%(userscript)s
  }
  function later() { setTimeout(run, %(delay)d); }
  if (document.readyState === 'complete') later();
  else window.addEventListener('load', later, { once: true });
})();
"""

# Inside an inline <script>, "</script" ends it and "<!--" / "<script" change how the rest is parsed. They can only
# stand in comments and string literals here (the filled config values are JSON strings), where these escapes read
# back the same: "<\\/" is "</", "<\\!--" is "<!--", "<\\script" is "<script".
_UNSAFE = re.compile(r"</|<!--|<(?=script)", re.IGNORECASE)
_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)
_BODY = re.compile(r"<body[\s>/]", re.IGNORECASE)
_HTML_OPEN = re.compile(r"<html(?:\s[^>]*)?>", re.IGNORECASE)
_DOCTYPE = re.compile(r"\s*<!doctype[^>]*>", re.IGNORECASE)


def _escape(text: str) -> str:
    return _UNSAFE.sub(lambda m: {"</": "<\\/", "<!--": "<\\!--"}.get(m[0], "<\\"), text)


def loader_script(userscript: str) -> str:
    """The text of the inline <script> (already safe to put between <script> and </script>)."""
    status = {"service": "coze-mitm", "injected": True}
    return _escape(_WRAPPER % {"status": json.dumps(status), "prefix": json.dumps(STORE_PREFIX),
                               "userscript": userscript, "delay": STAND_DOWN_MS})


def script_hash(script: str) -> str:
    """The CSP hash source of an inline script's text."""
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def _allow_in_policy(policy: str, source: str) -> tuple[str, list[str]]:
    sources = _governing(policy, "script-src")  # the directive that governs <script> elements
    if sources is None:
        return policy, []  # nothing restricts scripts
    lowered = [s.lower() for s in sources]
    if UNSAFE_INLINE in lowered and not has_nonce_or_hash(sources) and "'strict-dynamic'" not in lowered:
        return policy, []  # inline scripts are allowed already; a hash here would take that from the page's own
    return patch_policy(policy, {"script-src": (source,)})


def allow_loader(value: str, source: str) -> tuple[str, list[str]]:
    """A Content-Security-Policy value (one or more policies) that lets the inline script hashed `source` run.

    Each policy is enforced on its own, so each gets the hash where its script directive would block the loader;
    beside 'unsafe-inline' (without nonce, hash or 'strict-dynamic') nothing is added, since a hash would make
    browsers ignore 'unsafe-inline' and block the page's own inline scripts."""
    changed: list[str] = []
    patched = []
    for policy in value.split(","):
        new, names = _allow_in_policy(policy, source)
        patched.append(new if not names else (" " if policy[:1].isspace() else "") + new)
        changed.extend(n for n in names if n not in changed)
    return (",".join(patched), changed) if changed else (value, [])


def allow_loader_in_meta(document: str, source: str) -> tuple[str, list[str]]:
    """The document with its <meta http-equiv="Content-Security-Policy"> tags allowing the loader too."""
    return patch_meta_tags(document, {}, patch=lambda policy: allow_loader(policy, source))


def insert_loader(document: str, script: str) -> str:
    """The document with `<script data-coze-mitm>script</script>` at the end of its head (after any meta charset,
    which must come within the first 1024 bytes), else before <body>, else after <html> or the doctype."""
    tag = f'<script {MARKER}="loader">{script}</script>'
    for pattern in (_HEAD_END, _BODY):
        m = pattern.search(document, 0, HEAD_SCAN_LIMIT)
        if m:
            return document[:m.start()] + tag + document[m.start():]
    for pattern in (_HTML_OPEN, _DOCTYPE):
        m = pattern.match(document) if pattern is _DOCTYPE else pattern.search(document, 0, HEAD_SCAN_LIMIT)
        if m:
            return document[:m.end()] + tag + document[m.end():]
    return tag + document  # no doctype: the page is in quirks mode already
