"""The team part of http://coze.mitm/: where identities come from, usage per user, /metrics.

No mitmproxy import, and nothing reached into: status.py hands in what is shown (the login mode, the counters
of core/stats.py, the token exchanges by result, and the accounting part's `UsageShown`, or None when no
accounting part counts usage) and serves what these return.
Users are shown as identity.short_id shows them everywhere: a proxy login whole, a tag id shortened
(a full tag id would let whoever reads the page act as that user).
"""

from __future__ import annotations

from collections.abc import Mapping

from coze_mitm.core import logins
from coze_mitm.core import metrics
from coze_mitm.core.identity import short_id
from coze_mitm.core.exchange import scrub
from coze_mitm.core.stats import Stats
from coze_mitm.core.usage_book import UsageShown, sum_rows

MAX_ROWS = 1000  # status.json: biggest spenders first; the rest only in the totals (and in /metrics)


def identities(login_mode: str) -> dict:
    mode = login_mode if login_mode in logins.MODES else "none"
    return {"mode": mode, "about": logins.MODES[mode]}


def usage(shown: UsageShown | None) -> list[dict]:
    """status.json's `usage`: one row per user, biggest spenders (all-time tokens) first."""
    if shown is None:
        return []
    return [{"user": short_id(r["user"]), "chats": r["chats"], "tokens": r["tokens"], "tokens_today": r["tokens_today"]}
            for r in shown.rows[:MAX_ROWS]]


def accounting_state(shown: UsageShown | None) -> dict:
    """The daily budget, and whether usage reaches its file (an error line, scrubbed, when it does not)."""
    if shown is None:
        file = {"path": None, "ok": False, "error": "usage is not counted (no accounting addon loaded)"}
    elif shown.store is None:
        file = {"path": None, "ok": True, "error": ""}  # coze_usage_file=memory: counted in memory only, by choice
    else:
        file = {"path": shown.store, "ok": not shown.store_error,
                "error": scrub(shown.store_error) if shown.store_error else ""}
    rows = shown.rows if shown is not None else ()
    return {
        "daily_token_budget": shown.daily_tokens if shown is not None else 0,
        "usage_file": file,
        "usage_users": len(rows),
        "usage_totals": sum_rows(rows),
    }


ALL_USERS = "(all)"  # the one `user` label value an anonymous reader on another machine sees


def metrics_text(stats: Stats, exchanges: Mapping[str, int], shown: UsageShown | None,
                 hide_users: bool = False) -> str:
    """hide_users: every usage row under user="(all)" (the sums), for readers who may not see names.
    exchanges: token exchanges by result (the broker's `results`)."""
    return metrics.render(
        usage_rows=shown.rows if shown is not None else (),
        injected=stats.injected,
        preflights=stats.preflights,
        refusals=stats.refusals,  # keys are core/refusal.REASONS (a fixed set) or "other"
        exchanges=exchanges,
        display=(lambda _user: ALL_USERS) if hide_users else short_id,
        started=stats.started,
        store_ok=None if shown is None or shown.store is None else not shown.store_error,
        counters=[(name, help_text, value) for name, _, help_text, value in stats.shown() if help_text],
    )
