"""`http://coze.mitm/metrics`: the proxy's counters in Prometheus' text format 0.0.4.

Pure logic, no mitmproxy import: the caller hands in plain numbers and serves the text with
`CONTENT_TYPE`. User names come from clients (logins, tags), so every label value is escaped as the
format requires (backslash, double quote, newline) and label sets that end up equal after the caller's
shortening (two ids with the same short form) are merged, never repeated: a repeated series makes the
whole scrape invalid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "coze_mitm_"


def escape_label(value: str) -> str:
    # Only these three escapes exist in 0.0.4; a lone surrogate (possible in JSON-decoded text) is not UTF-8.
    value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Family:
    """One metric: its HELP, TYPE and samples (label tuple -> value; equal label sets are summed)."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = PREFIX + name, kind, help_text
        self.samples: dict[tuple[tuple[str, str], ...], float] = {}

    def add(self, value: float, **labels: str) -> "Family":
        key = tuple(labels.items())
        self.samples[key] = self.samples.get(key, 0) + value
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples.items():
            if labels:
                inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels)
                lines.append(f"{self.name}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{self.name} {_number(value)}")
        return "\n".join(lines) + "\n"


def render(*, usage_rows: Iterable[Mapping] = (), injected: int = 0, preflights: int = 0,
           refusals: Mapping[str, int] | None = None, exchanges: Mapping[str, int] | None = None,
           display: Callable[[str], str] = str, started: float | None = None,
           store_ok: bool | None = None, counters: Iterable[tuple[str, str, float]] = ()) -> str:
    """The exposition text.

    usage_rows  UsageBook.rows(): {"user", "chats", "tokens", "tokens_today"}
    display     how a user key is shown (e.g. identity.short_id for tag ids, the name for logins);
                the same form the status page uses, never a full tag id (it would let a reader act as that user)
    refusals    reason -> count of tagged requests the proxy answered itself
    exchanges   result -> count of token exchanges ("ok" and the failure reasons)
    counters    (name, help, value): one counter each, coze_mitm_<name>_total (core/stats.py SHOWN)
    """
    tokens = Family("tokens_total", "counter", "Coze tokens used (usage.token_count Coze reported), per user.")
    chats = Family("chats_total", "counter", "Chat requests sent to Coze with injected credentials, per user.")
    today = Family("tokens_today", "gauge", "Coze tokens used today (UTC day), per user; what daily budgets count.")
    for row in usage_rows:
        user = display(row["user"])
        tokens.add(row["tokens"], user=user)
        chats.add(row["chats"], user=user)
        today.add(row.get("tokens_today", 0), user=user)

    requests = Family("requests_total", "counter",
                      "Tagged requests to the Coze API and preflights, by outcome (refused: by reason).")
    requests.add(injected, outcome="injected")
    requests.add(preflights, outcome="preflight")
    for reason, n in sorted((refusals or {}).items()):
        requests.add(n, outcome="refused", reason=reason)

    exch = Family("token_exchanges_total", "counter", "Token exchanges with Coze's OAuth endpoint, by result.")
    for result, n in sorted((exchanges or {}).items()):
        exch.add(n, result=result)

    families = [tokens, chats, today, requests, exch]
    families += [Family(f"{name}_total", "counter", help_text).add(value) for name, help_text, value in counters]
    if started is not None:
        families.append(Family("start_time_seconds", "gauge", "When the proxy started (unix time).").add(started))
    if store_ok is not None:
        families.append(Family("usage_store_ok", "gauge",
                               "1 while usage is written to its file, 0 once it is counted in memory only.")
                        .add(int(store_ok)))
    return "".join(f.render() for f in families)
