"""<meta http-equiv="Content-Security-Policy"> tags in a document's head: found and patched like headers.

Pure logic, no mitmproxy import; the rules are csp_policy's.
"""

from __future__ import annotations

import html
import re
from typing import Callable, Iterable, Mapping

from coze_mitm.core.csp_policy import patch_header_value

_HEAD_END = re.compile(r"</head\s*>|<body[\s>/]", re.IGNORECASE)
_META = re.compile(r"<meta\b[^>]*>", re.IGNORECASE)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
HEAD_SCAN_LIMIT = 256 * 1024  # without a </head>, look no further than this for meta tags


def _csp_meta_tags(document: str):
    """(start, stop, attribute name, policy) of each <meta http-equiv="Content-Security-Policy">'s
    content attribute in the document head.

    Browsers honour such a tag only in the head, so only the head is searched (up to </head> or
    <body>): text further down, in scripts or comments, is never looked at.
    """
    end = _HEAD_END.search(document, 0, HEAD_SCAN_LIMIT)
    limit = end.start() if end else min(len(document), HEAD_SCAN_LIMIT)
    for tag in _META.finditer(document, 0, limit):
        attrs = {}
        for m in _ATTR.finditer(tag.group(0), 5):  # after "<meta"
            value = next((g for g in m.groups()[1:] if g is not None), None)
            attrs.setdefault(m.group(1).lower(), (m, value))
        equiv = attrs.get("http-equiv")
        content = attrs.get("content")
        if not equiv or not content or content[1] is None:
            continue
        if html.unescape(equiv[1] or "").strip().lower() != "content-security-policy":
            continue
        m = content[0]
        yield tag.start() + m.start(), tag.start() + m.end(), m.group(1), html.unescape(content[1])


def meta_policies(document: str) -> list[str]:
    return [policy for *_, policy in _csp_meta_tags(document)]


def patch_meta_tags(document: str, needs: Mapping[str, Iterable[str]],
                    patch: Callable[[str], tuple[str, list[str]]] | None = None) -> tuple[str, list[str]]:
    """Patch the <meta http-equiv="Content-Security-Policy" content="..."> tags in the document head: with
    `needs` by csp_policy's rules, or with `patch` (policy -> (new policy, directives changed)) when given."""
    patch = patch or (lambda policy: patch_header_value(policy, needs))
    pieces: list[str] = []
    pos = 0
    changed: list[str] = []
    for start, stop, attr, policy in _csp_meta_tags(document):
        new, names = patch(policy)
        if not names:
            continue
        pieces.append(document[pos:start])
        pieces.append(f'{attr}="{html.escape(new, quote=True)}"')
        pos = stop
        changed.extend(n for n in names if n not in changed)
    if not changed:
        return document, []
    pieces.append(document[pos:])
    return "".join(pieces), changed
