"""The team part of http://coze.mitm/: where identities come from, usage per user, /metrics.

No mitmproxy import: status.py hands in the settings (CozeSettings) and the accounting part, and serves
what these return.
Users are shown as identity.short_id shows them everywhere: a proxy login whole, a tag id shortened
(a full tag id would let whoever reads the page act as that user).
"""

from __future__ import annotations

from coze_mitm.core import logins
from coze_mitm.core import metrics
from coze_mitm.core.identity import short_id
from coze_mitm.core.exchange import scrub

MAX_ROWS = 1000  # status.json: biggest spenders first; the rest only in the totals (and in /metrics)


def identities(settings) -> dict:
    mode = settings.login_mode if settings.login_mode in logins.MODES else "none"
    return {"mode": mode, "about": logins.MODES[mode]}


def usage(accounting) -> list[dict]:
    """status.json's `usage`: one row per user, biggest spenders (all-time tokens) first."""
    if accounting is None:
        return []
    return [{"user": short_id(r["user"]), "chats": r["chats"], "tokens": r["tokens"], "tokens_today": r["tokens_today"]}
            for r in accounting.book.rows()[:MAX_ROWS]]


def accounting_state(accounting) -> dict:
    """The daily budget, and whether usage reaches its file (an error line, scrubbed, when it does not)."""
    store = accounting.store if accounting is not None else None
    if accounting is None:
        file = {"path": None, "ok": False, "error": "usage is not counted (no accounting addon loaded)"}
    elif store is None:
        file = {"path": None, "ok": True, "error": ""}  # coze_usage_file=memory: counted in memory only, by choice
    else:
        file = {"path": str(store.path), "ok": not store.error, "error": scrub(store.error) if store.error else ""}
    rows = accounting.book.rows() if accounting is not None else []
    return {
        "daily_token_budget": accounting.daily_tokens if accounting is not None else 0,
        "usage_file": file,
        "usage_users": len(rows),
        "usage_totals": {k: sum(r[k] for r in rows) for k in ("chats", "tokens", "tokens_today")},
    }


ALL_USERS = "(all)"  # the one `user` label value an anonymous reader on another machine sees


def metrics_text(settings, accounting, hide_users: bool = False) -> str:
    """hide_users: every usage row under user="(all)" (the sums), for readers who may not see names."""
    stats, broker = settings.stats, settings.broker
    store_ok = None
    if accounting is not None and accounting.store is not None:
        store_ok = not accounting.store.error
    return metrics.render(
        usage_rows=accounting.book.rows() if accounting is not None else (),
        injected=stats.injected,
        preflights=stats.preflights,
        refusals=stats.refusals,  # keys are core/refusal.REASONS (a fixed set) or "other"
        exchanges=getattr(broker, "results", None) or {},
        display=(lambda _user: ALL_USERS) if hide_users else short_id,
        started=stats.started,
        store_ok=store_ok,
    )
