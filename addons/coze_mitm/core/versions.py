"""Version numbers as tuples, for the few decisions that depend on mitmproxy's version (mitmweb's unauthenticated
API before 11.1.2, htpasswd schemes 12.x cannot read). No mitmproxy import: callers pass the text."""

from __future__ import annotations

import re

MITMWEB_FIXED = (11, 1, 2)  # CVE-2025-23217: mitmweb's API is unauthenticated before this version


def version_tuple(text: str) -> tuple[int, ...]:
    """"11.0.2" -> (11, 0, 2); "12.0.0.dev" -> (12, 0, 0): the first three numbers."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])
