"""Usage per user, in memory: the book the request path reads, and the daily-budget rules.

Pure logic, no mitmproxy import, no I/O.

* `UsageBook` counts chats and Coze tokens per user (all time, and today in UTC), answers budget checks
  without touching a disk, and is bounded: user names come from clients, so past `max_users` the least
  recently active user is folded into one "(others)" row.
* `UsageStore` is what the book needs from persistence: rows at start-up, increments afterwards
  (`usage_store.SqliteUsageStore` keeps them in a SQLite file). A team running several proxies behind a
  load balancer would implement the same two methods against a shared server (see the README, "Sharing
  the proxy with a team").
* `budget_refusal` is the daily budget: which requests spend tokens, and the 429 a user over budget gets.
"""

from __future__ import annotations

import collections
import datetime
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Protocol

from coze_mitm.core import go_reading
from coze_mitm.core.refusal import RATE_LIMITED, Refusal
from coze_mitm.core.usage import Usage

OTHERS = "(others)"  # users folded away; no tag id (no parentheses) and no "login:" key can equal it
DAY = 86400


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


def next_utc_midnight(t: float) -> int:
    return (int(t) // DAY + 1) * DAY


class StoredUsage(NamedTuple):
    user: str
    chats: int  # all time
    tokens: int
    chats_today: int
    tokens_today: int


class UsageStore(Protocol):
    """Persistence behind the book. `record` is called on the event loop: it must return at once."""

    error: str  # "" while healthy; otherwise the one line that says what failed (the book keeps counting)

    def load(self, today: str) -> list[StoredUsage]:
        """Every user's totals, and today's, biggest spenders first (called once, at start-up)."""

    def record(self, user: str, day: str, chats: int, tokens: int) -> None:
        """Add to the user's row of that UTC day (increments, never absolute values)."""

    def close(self) -> None:
        """Write what is pending; called once when the proxy stops."""


@dataclass
class UserUsage:
    chats: int = 0
    tokens: int = 0
    day: str = ""  # the UTC day the *_today figures belong to
    chats_today: int = 0
    tokens_today: int = 0

    def roll(self, today: str) -> None:
        if self.day != today:
            self.day, self.chats_today, self.tokens_today = today, 0, 0


class UsageBook:
    """Per-user chats and tokens, in memory; every change is also handed to the store (if any)."""

    def __init__(self, store: UsageStore | None = None, *, max_users: int = 10_000,
                 clock: Callable[[], float] = time.time, max_chat_ids: int = 10_000):
        self.store = store
        self.max_users = max(1, max_users)
        self.clock = clock
        self._users: collections.OrderedDict[str, UserUsage] = collections.OrderedDict()  # LRU order
        self._others = UserUsage()
        # The chats whose usage was counted, oldest first, as hashes of (user, chat id): ~70 bytes each
        # instead of ~250 for the strings in an OrderedDict (10,000 of them at most either way). str
        # hashes are salted per process, so no client can aim at another's; a collision (2^-64 a pair)
        # would leave one chat uncounted.
        self._chat_ids: set[int] = set()
        self._chat_order: collections.deque[int] = collections.deque()
        self._max_chat_ids = max_chat_ids
        self.folded = 0  # users folded into OTHERS so far

    # -- start-up --------------------------------------------------------------------------------
    def load(self) -> str:
        """Fill the book from the store. Returns the store's error line ("" when all is well); the store
        has already reported it once through its on_error."""
        if self.store is None:
            return ""
        if getattr(self.store, "shared", False):
            # A store several proxies share (usage_redis.py) hands in every user's figures again and again.
            self.store.on_rows = self.absorb
            self.store.today = lambda: utc_day(self.clock())
        today = utc_day(self.clock())
        rows = self.store.load(today)
        # biggest spenders first: those who stay tracked when there are more than max_users
        for row in reversed(rows):  # least first, so the biggest end up most recently used
            entry = self._entry(row.user, today)
            entry.chats, entry.tokens = row.chats, row.tokens
            entry.chats_today, entry.tokens_today = row.chats_today, row.tokens_today
        return self.store.error

    def absorb(self, rows: Iterable[StoredUsage], today: str) -> None:
        """A shared store's snapshot (what every proxy counted, this one's unwritten increments included)
        replaces the figures of the users it names."""
        if today != utc_day(self.clock()):
            return  # taken just before midnight: the next one is today's
        ordered = sorted(rows, key=lambda r: (r.tokens, r.chats))  # the biggest end up most recently used
        kept, rest = ordered[-self.max_users:], ordered[:-self.max_users]
        for row in kept:
            entry = self._users.get(row.user)
            if entry is None:
                entry = self._entry(row.user, today)
            entry.roll(today)
            entry.chats, entry.tokens = row.chats, row.tokens
            entry.chats_today, entry.tokens_today = row.chats_today, row.tokens_today
        if rest:
            # The smallest spenders beyond max_users are OTHERS: replaced by this snapshot's sums, not added to
            # (the same users come again with every snapshot).
            o = self._others = UserUsage(day=today)
            for row in rest:
                o.chats += row.chats
                o.tokens += row.tokens
                o.chats_today += row.chats_today
                o.tokens_today += row.tokens_today
            self.folded = len(rest)

    def note_today(self, user: str, tokens_today: int) -> None:
        """A shared store said what `user` used today (a budget decision): shown at once, before the next
        snapshot."""
        entry = self._entry(user, utc_day(self.clock()))
        if tokens_today > entry.tokens_today:
            entry.tokens += tokens_today - entry.tokens_today
            entry.tokens_today = tokens_today

    # -- counting (event loop; memory only, the store write is queued) -----------------------------
    def chat(self, user: str) -> None:
        """One chat request of `user` went to Coze."""
        now = self.clock()
        today = utc_day(now)
        entry = self._entry(user, today)
        entry.chats += 1
        entry.chats_today += 1
        self._record(user, today, 1, 0)

    def tokens(self, user: str, usage: Usage | int) -> bool:
        """Coze reported `usage` for one of `user`'s chats; False if that chat was counted already."""
        if isinstance(usage, Usage):
            count, chat_id = usage.token_count, usage.chat_id
        else:
            count, chat_id = int(usage), ""
        if count < 0:
            return False
        if chat_id:  # a client may stream a chat and also poll /v3/chat/retrieve for it: count it once
            key = hash((user, chat_id))
            if key in self._chat_ids:
                return False
            self._chat_ids.add(key)
            self._chat_order.append(key)
            if len(self._chat_order) > self._max_chat_ids:
                self._chat_ids.discard(self._chat_order.popleft())
        today = utc_day(self.clock())
        entry = self._entry(user, today)
        entry.tokens += count
        entry.tokens_today += count
        if chat_id and getattr(self.store, "shared", False):
            # Several proxies may see the same chat (retrieved through one, polled by another): the shared
            # store counts it once for all of them (usage_redis.py); this book's figure is replaced by its
            # next snapshot.
            self.store.record_chat(user, today, chat_id, count)
        else:
            self._record(user, today, 0, count)
        return True

    def over_budget(self, user: str, daily_tokens: int) -> tuple[bool, int, int]:
        """(whether `user` has used `daily_tokens` or more today, tokens used today, when that resets).

        A budget of 0 or less is no budget. Looking does not make a user recently active."""
        now = self.clock()
        today = utc_day(now)
        entry = self._users.get(user)
        used = entry.tokens_today if entry is not None and entry.day == today else 0
        return (daily_tokens > 0 and used >= daily_tokens), used, next_utc_midnight(now)

    # -- reading -----------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One dict per user, biggest spenders (all time) first; the folded users last, as OTHERS."""
        today = utc_day(self.clock())
        out = []
        for user, e in self._users.items():
            today_tokens = e.tokens_today if e.day == today else 0
            out.append({"user": user, "chats": e.chats, "tokens": e.tokens, "tokens_today": today_tokens})
        out.sort(key=lambda r: (-r["tokens"], -r["chats"], r["user"]))
        if self.folded:
            o = self._others
            out.append({"user": OTHERS, "chats": o.chats, "tokens": o.tokens,
                        "tokens_today": o.tokens_today if o.day == today else 0})
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- inside ----------------------------------------------------------------------------------
    def _entry(self, user: str, today: str) -> UserUsage:
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = UserUsage(day=today)
            while len(self._users) > self.max_users:
                self._fold(*self._users.popitem(last=False))
        else:
            self._users.move_to_end(user)
        entry.roll(today)
        return entry

    def _fold(self, user: str, entry: UserUsage) -> None:
        o = self._others
        if entry.day > o.day:
            o.roll(entry.day)
        o.chats += entry.chats
        o.tokens += entry.tokens
        if entry.day == o.day:
            o.chats_today += entry.chats_today
            o.tokens_today += entry.tokens_today
        self.folded += 1

    def _record(self, user: str, day: str, chats: int, tokens: int) -> None:
        if self.store is not None:
            self.store.record(user, day, chats, tokens)


def sum_rows(rows: Iterable[dict]) -> dict:
    """Totals of `rows()` (for a status line)."""
    total = {"chats": 0, "tokens": 0, "tokens_today": 0}
    for r in rows:
        for k in total:
            total[k] += r[k]
    return total


@dataclass(frozen=True)
class UsageShown:
    """What the status pages show of usage, handed to them by the part that counts it (parts/accounting.py
    `shown`): a copy made when asked, so that a page reads usage without reaching into the book or its store."""
    rows: tuple[dict, ...] = ()  # UsageBook.rows(): biggest spenders first
    daily_tokens: int = 0  # coze_user_daily_tokens (0: no budget)
    store: str | None = None  # where usage is kept (a file, a redis:// URL without its password); None: memory only
    store_error: str = ""  # why usage no longer reaches the store ("" while it does)


# -- daily budgets ----------------------------------------------------------------------------------
# Requests that make Coze spend tokens; everything else (history, conversations, files) stays allowed.
# /v1/chat is the WebSocket chat's upgrade (on the ws host); submit_tool_outputs resumes a chat;
# the workflow endpoints run a workflow (whose LLM nodes spend tokens) once per request.
SPENDING_PATHS = ("/v3/chat", "/v3/chat/submit_tool_outputs", "/v1/workflows/chat", "/v1/workflow/run",
                  "/v1/workflow/stream_run", "/v1/workflow/stream_resume")
WS_CHAT_PATH = "/v1/chat"
# Client events of the WebSocket chat (/v1/chat) that make Coze start (or resume) a reply: each is one
# chat in flight, budgeted before it is forwarded. Over budget, audio input is not forwarded either (with
# server-side voice detection, audio alone starts replies).
WS_CHAT_STARTS = frozenset({"conversation.message.create", "input_audio_buffer.complete",
                            "conversation.chat.submit_tool_outputs"})
WS_SPENDING = WS_CHAT_STARTS | {"input_audio_buffer.append"}
# Server events that end the reply a chat start began (the socket's end ends them all).
WS_CHAT_ENDS = frozenset({"conversation.chat.completed", "conversation.chat.failed", "conversation.chat.canceled",
                          "conversation.chat.requires_action"})


def _route(path: str | bytes) -> str:
    """The path as Coze's (Go) server routes it, lower-cased for matching: percent-decoded, `//`, `.` and `..`
    resolved, no query, fragment or trailing slash (core/go_reading.route)."""
    return go_reading.route(path).lower()


def spends_tokens(method: str, path: str | bytes) -> bool:
    """Whether a request to the Coze API is subject to the daily budget (an API base may have a path
    prefix, e.g. a self-hosted Coze Studio, so the end of the path is what counts). The path is read as
    Coze's Go server reads it: `/v3/%63hat` spends like `/v3/chat`."""
    route = _route(path)
    if method.upper() == "GET":
        return route.endswith(WS_CHAT_PATH)  # the WebSocket chat's upgrade
    return method.upper() == "POST" and any(route.endswith(p) for p in SPENDING_PATHS)


def is_chat(method: str, path: str | bytes) -> bool:
    route = _route(path)
    if method.upper() == "GET":
        return route.endswith("/v1/chat")
    return method.upper() == "POST" and (route.endswith("/v3/chat") or route.endswith("/v1/workflows/chat"))


def api_prefix(path: str | bytes) -> str | None:
    """The API base's path prefix ("" for Coze) of a /v3/chat or /v3/chat/submit_tool_outputs request, to
    address /v3/chat/retrieve on the same base; None for any other path."""
    route = go_reading.route(path)
    low = route.lower()
    for end in ("/v3/chat/submit_tool_outputs", "/v3/chat"):
        if low.endswith(end):
            return route[: -len(end)]
    return None


def _clock_text(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# The status of a refusal (issue 19 asks for "429/4013 with Retry-After"). Coze's official chat component
# (@coze/chat-sdk) throws away the code and msg of any HTTP 402-599 answer and shows "Send Failed"; it shows
# the msg of a code 4013 as the bot's answer only when the HTTP status is 200 (docs/chat-sdk-notes.md).
# So: 200 for a request from a page (it carries Origin), 429 for every other client; the body (code
# 4013, the msg) and the Retry-After header are the same for both.
PAGE_STATUS, CLIENT_STATUS = 200, 429


def refusal_status(from_page: bool, method: str = "POST") -> int:
    # A WebSocket handshake is never answered 200 (the client waits for a 101): always 429 there.
    return PAGE_STATUS if from_page and method.upper() != "GET" else CLIENT_STATUS


def budget_refusal(book: UsageBook, user: str, shown_as: str, daily_tokens: int,
                   method: str, path: str, from_page: bool = False) -> Refusal | None:
    """None when the request may go on; otherwise the local answer — code 4013 (Coze's own "rate limited"), Retry-After until the UTC midnight, HTTP 429
    (200 for a page: see refusal_status)."""
    if daily_tokens <= 0 or not spends_tokens(method, path):
        return None
    over = over_budget_msg(book, user, shown_as, daily_tokens)
    if over is None:
        return None
    msg, wait = over
    return Refusal(refusal_status(from_page, method), RATE_LIMITED, "budget", msg, {"Retry-After": str(wait)})


def over_budget_msg(book: UsageBook, user: str, shown_as: str, daily_tokens: int) -> tuple[str, int] | None:
    """(the message, seconds until the budget resets) when `user` has used the daily budget; else None."""
    over, used, resets_at = book.over_budget(user, daily_tokens)
    if not over:
        return None
    wait = max(1, resets_at - int(book.clock()))
    msg = (f"coze-mitm: {shown_as} has used {used} Coze tokens today, and the daily budget is {daily_tokens} "
           f"(coze_user_daily_tokens); chats resume at {_clock_text(resets_at)} (in {wait // 3600} h "
           f"{wait % 3600 // 60} min). Reading history still works; ask the proxy's owner for a bigger budget.")
    return msg, wait


PARALLEL_RETRY_AFTER = 2  # seconds: a chat usually ends within that; the client may try again then


def parallel_msg(shown_as: str, in_flight: int, cap: int) -> str:
    return (f"coze-mitm: {shown_as} has {in_flight} chats in progress, and at most {cap} may run at once "
            f"(coze_user_max_parallel_chats, which keeps the daily budget from being overshot); send this one "
            f"again when one of them has ended.")


# -- what a budget cannot count -------------------------------------------------------------------
MAX_RUN_BODY = 4 * 1024 * 1024  # a workflow run's body read to see whether it asks to run asynchronously


def is_async_run(body: bytes | None) -> bool | None:
    """Whether a `/v1/workflow/run` body asks for an asynchronous run: True, False, or None when that cannot
    be told (no JSON object, or too big). Read the way Coze's Go server reads it, and then some: a key that
    matches `is_async` as Go's encoding/json matches field names (core/go_reading.field) with any value but
    false/null counts; keys that disagree, or a body Go and Python would read differently, cannot be told."""
    if body is None or len(body) > MAX_RUN_BODY:
        return None
    if b"\\" not in body and b"ync" not in body.lower():
        # No spelling of the key is possible without these bytes (Go folds only ASCII letters, K and LONG S
        # among them; an escape needs a backslash): no parse on the common path. A body that is no JSON at all
        # is refused by Coze itself.
        return False
    try:
        obj = go_reading.read_object(body)
    except go_reading.Unreadable:
        return None
    value, disagree = go_reading.field(obj, "is_async")
    if disagree:
        return None  # readers could differ on it: not guessed
    return value is not None and value is not False


def async_run_msg(readable: bool) -> str:
    why = ("asks to run asynchronously (is_async): its usage would be known only from its run history, hours "
           "later if the run is long, after the budget decided" if readable else
           "cannot be read as one JSON object, so whether it runs asynchronously (is_async) cannot be checked")
    return (f"coze-mitm: this workflow run {why}; while a daily budget is set (coze_user_daily_tokens) such runs "
            "are not forwarded. Run it synchronously (/v1/workflow/run without is_async) or streamed "
            "(/v1/workflow/stream_run).")


def polls_full_msg(polls: int) -> str:
    return (f"coze-mitm: {polls} chats are waiting for their usage from Coze, the most the proxy follows at once; "
            "a chat started now might go uncounted, which a daily budget (coze_user_daily_tokens) does not "
            "allow. Send it again in a few seconds.")
