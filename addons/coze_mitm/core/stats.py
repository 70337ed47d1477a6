"""What the status page and /metrics show: counters and the last errors (never a secret).

One per proxy, made by addons/coze.py and handed to the parts that count into it and to the status part that
shows it (parts/status.py, pages/status_usage.py). No mitmproxy import here.

A new counter: its field in `Stats` and its line in `SHOWN`, and the part that counts it; status.json, the
status page and /metrics show it from there.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from coze_mitm.core import refusal
from coze_mitm.core.exchange import scrub


# The counters shown as they are, in this order: status.json's `counters` (by field name), a row each on the status
# page (the label) and, with a help text, a /metrics counter `coze_mitm_<field>_total` (None: not on its own there;
# `injected` and `preflights` are outcomes of coze_mitm_requests_total, core/metrics.py).
SHOWN: tuple[tuple[str, str, str | None], ...] = (
    ("requests", "Requests to the Coze API", None),
    ("injected", "Credentials injected", None),
    ("preflights", "CORS preflights answered", None),
)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    injected: int = 0
    preflights: int = 0
    refusals: collections.Counter = field(default_factory=collections.Counter)
    last_errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    page_notes: dict = field(default_factory=dict)  # page origin -> what the status page says about it (csp.py)

    def shown(self) -> list[tuple[str, str, str | None, int]]:
        """(field, the page's label, /metrics help or None, value) for each of SHOWN, in its order."""
        return [(name, label, help_text, getattr(self, name)) for name, label, help_text in SHOWN]

    def refused(self, reason: str) -> None:
        # The keys of `refusals` are core/refusal.REASONS (a fixed set) or "other", so no upstream text (nor
        # anyone's choice of words) can grow status.json or reach it.
        self.refusals[refusal.counted(reason)] += 1

    def error(self, reason: str, msg: str, logid: str = "") -> None:
        # Bounded whatever the caller passes: 20 entries of at most ~1 KB each.
        self.last_errors.append({"time": time.time(), "reason": scrub(reason, 80), "msg": scrub(msg, 600),
                                 "logid": scrub(logid, 80)})
