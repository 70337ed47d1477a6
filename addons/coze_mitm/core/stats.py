"""What the status page and /metrics show: counters and the last errors (never a secret).

Owned by the settings part (one per proxy); the parts count into it, pages/status_usage.py reads it.
No mitmproxy import here.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from coze_mitm.core import refusal
from coze_mitm.core.exchange import scrub


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    injected: int = 0
    preflights: int = 0
    refusals: collections.Counter = field(default_factory=collections.Counter)
    last_errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    page_notes: dict = field(default_factory=dict)  # page origin -> what the status page says about it (csp.py)

    def refused(self, reason: str) -> None:
        # The keys of `refusals` are core/refusal.REASONS (a fixed set) or "other", so no upstream text (nor
        # anyone's choice of words) can grow status.json or reach it.
        self.refusals[refusal.counted(reason)] += 1

    def error(self, reason: str, msg: str, logid: str = "") -> None:
        # Bounded whatever the caller passes: 20 entries of at most ~1 KB each.
        self.last_errors.append({"time": time.time(), "reason": scrub(reason, 80), "msg": scrub(msg, 600),
                                 "logid": scrub(logid, 80)})
