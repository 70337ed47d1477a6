"""status.html, the page at http://coze.mitm/: loaded once, rendered with Jinja2's autoescape.

Autoescape is the one place values are escaped into the page. The page's inline style and script are
static; PAGE_CSP allows exactly them, by their hashes, and the probe image, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path

import jinja2  # comes with mitmproxy (through flask, for mitm.it)

from coze_mitm.core.hosts import STATUS_HOST

PAGE_PATH = Path(__file__).resolve().parent / "status.html"

_PAGE_SOURCE = PAGE_PATH.read_text(encoding="utf-8")  # at import (startup), never on the event loop
# The page's static inline style and script, allowed by their hashes.
STYLE = re.search(r"<style>(.*?)</style>", _PAGE_SOURCE, re.S)[1]
PROBE_SCRIPT = re.search(r"<script>(.*?)</script>", _PAGE_SOURCE, re.S)[1]


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE_CSP = "; ".join([
    "default-src 'none'",
    f"style-src {_csp_hash(STYLE)}",
    f"script-src {_csp_hash(PROBE_SCRIPT)}",
    f"img-src https://{STATUS_HOST}",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return "expired"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _clock(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


_env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_env.filters.update(ago=_ago, clock=_clock)
PAGE = _env.from_string(_PAGE_SOURCE)


def render(data: dict, view: dict) -> str:
    """`data` is what /status.json answers; `view` what only the page needs (hints, labels)."""
    return PAGE.render(data=data, view=view)
