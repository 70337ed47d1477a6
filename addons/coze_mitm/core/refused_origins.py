"""Page origins that asked for coze-mitm's help and are not in coze_origins: remembered for the status page, and
said in the log once in a while, so a user can tell why a page of theirs does not work. No mitmproxy import.

Bounded whatever pages send: the last MAX_KEPT distinct origins, each cut to MAX_LENGTH characters; a log line
per origin at most once per QUIET_SECONDS, and at most MAX_LINES_PER_MINUTE lines in all.
"""

from __future__ import annotations

import collections
import time

MAX_KEPT = 20
MAX_LENGTH = 200
QUIET_SECONDS = 600.0
MAX_LINES_PER_MINUTE = 10


class RefusedOrigins:
    def __init__(self, clock=time.time):
        self.clock = clock
        self._seen: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._lines: collections.deque[float] = collections.deque()

    def note(self, origin: str, what: str) -> str | None:
        """Remember a refusal; the log line to write now, or None (said recently, or too many lines this minute)."""
        origin = "".join(c if c.isprintable() else "?" for c in origin[:MAX_LENGTH])
        now = self.clock()
        entry = self._seen.pop(origin, None) or {"origin": origin, "count": 0, "logged": float("-inf")}
        entry.update(count=entry["count"] + 1, last=now, what=what)
        self._seen[origin] = entry
        while len(self._seen) > MAX_KEPT:
            self._seen.popitem(last=False)
        while self._lines and self._lines[0] <= now - 60:
            self._lines.popleft()
        if now - entry["logged"] < QUIET_SECONDS or len(self._lines) >= MAX_LINES_PER_MINUTE:
            return None
        entry["logged"] = now
        self._lines.append(now)
        return (f"coze-mitm: {what} from page origin {origin}, which is not in coze_origins; if it is your page, "
                f"add it: --set coze_origins=...,{origin} (run_mitm.py: --origins)")

    def recent(self) -> list[dict]:
        """Newest first: origin, how often, when last, what it asked."""
        return [{"origin": e["origin"], "count": e["count"], "last": int(e["last"]), "what": e["what"]}
                for e in reversed(self._seen.values())]

    def clear(self) -> None:
        self._seen.clear()
