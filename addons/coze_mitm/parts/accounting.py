"""Usage per user: chats and Coze tokens counted as answers pass, kept in the usage file, budgets checked.

    coze_user_daily_tokens  Coze tokens a user may use per UTC day (0 = no budget); `budget_refusal`
                            is what the auth addon asks before it injects a credential
    coze_user_max_parallel_chats  with a budget: chats one user may have in flight at once (0 = no cap);
                            what bounds the overshoot (a chat's usage is known only when it ends)
    coze_usage_file         where usage is kept (default, when empty: coze-mitm-usage.sqlite in
                            mitmproxy's confdir; "memory" keeps it in memory only; with coze_demo and
                            no file named: memory, so the sandbox's users never reach a later run's file);
                            a redis:// URL: shared with every proxy using it (core/usage_redis.py: budget
                            decisions are then awaited there, coze_usage_lease bounds a dead proxy's places)

Hooks (this addon must come after `auth` and after `streaming` in the addon list):
(auth asks Coze for uncompressed answers to every request it injects: the usage in them is read without a decoder)
responseheaders               a tagged event-stream answer from the Coze API gets a usage reader as its
                              `stream` callable (chunks pass unchanged); a streamed chat counts as a chat;
                              a workflow stream's `Message` events carry the call's usage so far
response                      a non-streamed chat answered with code 0 counts as a chat (and its usage,
                              if it is completed already; answered `in_progress`, the proxy polls
                              `/v3/chat/retrieve` for it itself: core/usage_poll.py); `/v3/chat/retrieve`
                              of a completed chat: its usage (once per chat id); a streamed chat that ended
                              without `conversation.chat.completed` is polled too (it runs on at Coze); the
                              chat leaves the in-flight count (a polled one when its poll ends)
error                         a streamed chat cut short is polled as above; the chat leaves the in-flight count
websocket_message             on the WebSocket chat (`/v1/chat` on the ws host): a client event that starts
                              a reply counts as a chat, is budgeted (over budget or at the parallel cap it
                              is dropped and the client gets Coze's `error` event, code 4013) and is in
                              flight until `conversation.chat.completed`/`failed`/`canceled`/
                              `requires_action`; `conversation.chat.completed` carries the usage
websocket_end                 the socket's chats leave the in-flight count

The user is the key the auth addon leaves in flow.metadata["coze_user"] (a tag id, or `login:<name>`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path

from mitmproxy import ctx, http

from coze_mitm import options
from coze_mitm.core import fields, go_reading
from coze_mitm.flowmeta import COZE_USER
from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.exchange import scrub
from coze_mitm.core.usage import (
    COMPLETED, CREATED, WORKFLOW_MESSAGE, SSEUsageReader, parse_usage, retrieve_body_ok, usage_from_retrieve,
)
from coze_mitm.core.identity import short_id
from coze_mitm.core.refusal import BAD_REQUEST, FAILED, RATE_LIMITED, Refusal
from coze_mitm.core.stats import Stats
from coze_mitm.core.usage_book import (
    MAX_RUN_BODY, PAGE_STATUS, PARALLEL_RETRY_AFTER, WS_CHAT_ENDS, WS_CHAT_STARTS, WS_SPENDING, UsageBook, api_prefix,
    async_run_msg, budget_refusal, is_async_run, is_chat, over_budget_msg, parallel_msg, polls_full_msg,
    refusal_status, spends_tokens, utc_day, UsageShown,
)
from coze_mitm.core import usage_redis
from coze_mitm.core.usage_flight import InFlight, SharedInFlight
from coze_mitm.core.usage_poll import MAX_POLLERS, Chat, UsagePoller
from coze_mitm.core.usage_store import SqliteUsageStore, default_path

log = logging.getLogger("coze.accounting")

MAX_CHAT_ANSWER = 256 * 1024  # a non-streamed chat answer is ~1 KB; bigger ones are not parsed
MAX_WS_EVENT = 64 * 1024  # a WebSocket event carrying usage is small; bigger messages are not parsed
MAX_WS_CLIENT_EVENT = 1024 * 1024  # with a budget, a client event bigger than this is not forwarded (not checkable)
DEFAULT_PARALLEL = 4
WORKFLOWS_CHAT = "/v1/workflows/chat"
SLOT_MAX_AGE = 600.0  # seconds: longer than Coze takes to answer a chat's request
WORKFLOW_STREAMS = ("/v1/workflow/stream_run", "/v1/workflow/stream_resume")
_WS_START_NAMES = tuple(name.encode() for name in WS_CHAT_STARTS)


class Accounting:
    def __init__(self, settings=None, max_users: int = 10_000, stats: Stats | None = None):
        self.settings = settings  # CozeSettings: the token broker and the Coze API origins (for usage polls)
        self.stats = stats or Stats()  # refusals counted for the status page
        self.max_users = max_users
        self.book = UsageBook(max_users=max_users)  # memory only until configure opens the file
        self.store: SqliteUsageStore | None = None
        self.daily_tokens = 0
        self.max_parallel = DEFAULT_PARALLEL
        self.flight = InFlight()  # chats in flight per user (only while a budget is set)
        self.poller: UsagePoller | None = None  # built at the first non-streamed chat answered in_progress
        self.not_polled = 0  # non-streamed chats answered in_progress whose usage could not be polled
        self.refused_ws_events = 0
        self.unreadable_streams = 0
        self.cut_streams = 0  # streamed chats that ended before chat.completed: their usage polled
        # budgeted chats sent whose answer is not seen yet (each may need a poll): flow id -> when sent
        self._poll_slots: dict[str, float] = {}
        self.started = False
        self._ws_warned: set[str] = set()  # sockets told once that their audio is not forwarded
        self._closing: set[asyncio.Task] = set()  # Redis stores being closed on the loop (a reference each)


    def configure(self, updated):
        if "coze_user_daily_tokens" in updated:
            if ctx.options.coze_user_daily_tokens < 0:
                options.refuse("coze-mitm: coze_user_daily_tokens must be 0 (no budget) or a number of tokens per user "
                               "and day", started=self.started)
                return
            self.daily_tokens = ctx.options.coze_user_daily_tokens
        if "coze_user_max_parallel_chats" in updated:
            if ctx.options.coze_user_max_parallel_chats < 0:
                options.refuse("coze-mitm: coze_user_max_parallel_chats must be 0 (no cap) or the number of chats one "
                               "user may have in progress at once", started=self.started)
                return
            self.max_parallel = ctx.options.coze_user_max_parallel_chats
        if "coze_usage_lease" in updated and not 1 <= ctx.options.coze_usage_lease <= 3600:
            options.refuse("coze-mitm: coze_usage_lease must be 1 to 3600 seconds", started=self.started)
            return
        opened_by = {"coze_usage_file", "coze_demo", "coze_usage_lease"}
        if updated & opened_by or ("confdir" in updated and self.store is None):
            spec = ctx.options.coze_usage_file
            if not spec and getattr(ctx.options, "coze_demo", False):
                # The demo's users are the sandbox's (a throwaway stand-in): counted in memory only, so they
                # never appear in the usage file of a later run with a real Coze. An explicit file still counts.
                spec = "memory"
            self._open(spec)

    def _open(self, spec: str) -> None:
        """At start-up (before traffic): read the file once, then only the writer thread touches it."""
        if self.store is not None:
            self._close_store()
        self.store = None
        self.flight = InFlight()
        if getattr(self.settings, "shared_admission", None) is not None:
            self.settings.shared_admission = None  # the Redis store's new-users window goes with it
        if spec == "memory":
            self.book = UsageBook(max_users=self.max_users)
            return
        if usage_redis.is_redis_url(spec):
            self._open_shared(spec)
            return
        path = Path(spec).expanduser() if spec else default_path(ctx.options.confdir)
        # A warning, not an error: an ERROR at start-up stops mitmdump, and usage must never stop the proxy.
        self.store = SqliteUsageStore(path, on_error=log.warning)
        self.book = UsageBook(self.store, max_users=self.max_users)
        self.book.load()

    def _open_shared(self, spec: str) -> None:
        """A Redis that several proxies share (core/usage_redis.py): usage, budget decisions, chats in flight
        and the new-users window live there; this proxy's book shows its snapshots."""
        problem = usage_redis.redis_available()
        store = None
        try:
            store = None if problem else usage_redis.RedisUsageStore(
                spec, lease=float(ctx.options.coze_usage_lease), on_error=log.warning, on_info=log.info)
        except ValueError as e:
            problem = str(e)
        if store is None:
            self.book = UsageBook(max_users=self.max_users)
            options.refuse(f"coze-mitm: {problem}", started=self.started)
            return
        if store.spec.password_in_url:
            # Said, never shown: an option's value is in ps and mitmweb's Options view.
            log.warning(f"coze-mitm: coze_usage_file {store.path}: the password in the URL shows in ps and mitmweb's "
                        f"Options; give it as {usage_redis.PASSWORD_ENV} in the environment instead")
        self.store = store
        self.book = UsageBook(store, max_users=self.max_users)
        self.flight = SharedInFlight(store)
        self.book.load()
        if self.settings is not None:
            self.settings.shared_admission = store.admit

    def _close_store(self) -> None:
        """The store is replaced: a Redis one closes on the loop while the proxy runs (its blocking close
        could hold the loop for Redis' connect timeout); a file, or any store before the loop runs, at once."""
        if isinstance(self.store, usage_redis.RedisUsageStore):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                task = loop.create_task(self.store.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                return
        self.book.close()

    def running(self):
        self.started = True

    def shown(self) -> UsageShown:
        """What the status pages show of usage (coze.py hands this method to the status part)."""
        store = self.store
        return UsageShown(tuple(self.book.rows()), self.daily_tokens, None if store is None else str(store.path),
                          "" if store is None else store.error)

    def done(self):
        if self.poller is not None:
            self.poller.close()  # chats still polled are not counted
            self.poller = None
        self.book.close()  # the pending increments reach the file

    # -- budgets (asked by auth before it injects) ------------------------------------------------
    def budget_refusal(self, flow: http.HTTPFlow, user: str, shown_as: str, from_page: bool = False):
        """None when the request may go to Coze (a chat is then in flight until its answer ends), or the
        Refusal to answer with (or an awaitable of either, with a shared store); see usage_book.budget_refusal."""
        request = flow.request
        if isinstance(self.store, usage_redis.RedisUsageStore) and self.daily_tokens > 0 \
                and spends_tokens(request.method, request.data.path):
            post = request.method.upper() == "POST"
            uncountable = self._uncountable(request, flow.id, from_page) if post else None
            if uncountable is not None:
                return uncountable  # decided here, before the shared store is asked (and a place taken there)
            return self._shared_refusal(flow.id, user, shown_as, post, from_page, request.method)
        refusal = budget_refusal(self.book, user, shown_as, self.daily_tokens, request.method, request.data.path, from_page)
        if refusal is not None or self.daily_tokens <= 0 or request.method.upper() != "POST":
            return refusal  # the WebSocket handshake starts no chat: its chat-starting events are counted
        if not spends_tokens(request.method, request.data.path):
            return None
        in_flight = self.flight.count(user)
        if self.max_parallel and in_flight >= self.max_parallel:
            return Refusal(refusal_status(from_page), RATE_LIMITED, "budget",
                           parallel_msg(shown_as, in_flight, self.max_parallel), {"Retry-After": str(PARALLEL_RETRY_AFTER)})
        uncountable = self._uncountable(request, flow.id, from_page)
        if uncountable is not None:
            return uncountable
        self.flight.add(flow.id, user)
        return None

    def _uncountable(self, request: http.Request, request_id: str, from_page: bool) -> Refusal | None:
        """A refusal for a request whose spending the budget could not count, else None (docs/decisions.md)."""
        route = go_reading.route(request.data.path).lower()  # as Coze's Go server routes it: /v1/workflow/%72un too
        if route.endswith("/v1/workflow/run"):
            raw = request.raw_content  # None: the body is streamed past the proxy, so it cannot be checked
            encoding = fields.get(request.headers, b"content-encoding")
            body = b"{}" if raw == b"" else None if raw is None else decoded_prefix(raw, encoding, MAX_RUN_BODY + 1)
            asks = is_async_run(body)
            if asks is not False:
                # A body too costly to parse on the event loop was not read (go_reading.cheap_to_read): say so.
                big = asks is None and body is not None and not go_reading.cheap_to_read(body)
                msg = _big_run_msg() if big else async_run_msg(asks is True)
                return Refusal(200 if from_page else 400, BAD_REQUEST, "budget", msg)
            return None
        if api_prefix(request.data.path) is not None or route.endswith(WORKFLOWS_CHAT):
            # A chat's usage may have to be polled (answered in_progress): it holds a poll slot from now until
            # its answer's headers show a stream (or its poll starts); with every slot taken, it could go
            # uncounted, so it is refused.
            polls = len(self.poller) if self.poller is not None else 0
            if polls + len(self._poll_slots) >= MAX_POLLERS:
                self._forget_lost_slots()
            if polls + len(self._poll_slots) >= MAX_POLLERS:
                return Refusal(refusal_status(from_page), RATE_LIMITED, "budget",
                               polls_full_msg(polls + len(self._poll_slots)), {"Retry-After": str(PARALLEL_RETRY_AFTER)})
            self._poll_slots[request_id] = time.monotonic()
        return None

    def _forget_lost_slots(self) -> None:
        """A slot whose answer never came (no response or error hook ran) is forgotten, as InFlight does."""
        oldest = time.monotonic() - SLOT_MAX_AGE
        for key in [k for k, t in self._poll_slots.items() if t < oldest]:
            del self._poll_slots[key]

    async def _shared_refusal(self, key: str, user: str, shown_as: str, starts_chat: bool, from_page: bool,
                              method: str = "POST") -> Refusal | None:
        """The budget decision of every proxy sharing the store, in one step: None (the chat is in flight under
        `key`), or the refusal (over budget, at the parallel cap, or the store cannot be asked)."""
        store = self.store
        member = store.new_member() if starts_chat else ""
        cap = self.max_parallel if starts_chat else 0
        verdict, used, in_flight = await store.reserve(user, utc_day(self.book.clock()), self.daily_tokens, cap, member)
        if verdict == usage_redis.GO:
            if starts_chat:
                self.flight.add(key, user, member)
            return None
        status = refusal_status(from_page, method)
        if verdict == usage_redis.DOWN:
            # A page gets 200 + 4013 like any refusal (Coze's chat component shows only that); clients 503.
            msg = (f"coze-mitm: {shown_as} has a daily budget, and the usage store it is checked against "
                   f"({store.path}) does not answer; a budget that cannot be checked is not a budget, so chats wait "
                   f"until it is back (the proxy's owner sees why in its log)")
            page = status == PAGE_STATUS
            return Refusal(PAGE_STATUS if page else 503, RATE_LIMITED if page else FAILED, "budget-store", msg,
                           {"Retry-After": "5"})
        if verdict == usage_redis.AT_CAP:
            return Refusal(status, RATE_LIMITED, "budget", parallel_msg(shown_as, in_flight, self.max_parallel),
                           {"Retry-After": str(PARALLEL_RETRY_AFTER)})
        self.book.note_today(user, used)
        over = over_budget_msg(self.book, user, shown_as, self.daily_tokens)
        msg, wait = over if over is not None else (f"coze-mitm: {shown_as} has used the daily budget", 60)
        return Refusal(status, RATE_LIMITED, "budget", msg, {"Retry-After": str(wait)})

    def in_flight(self) -> dict:
        poll = self.poller.stats.as_dict() if self.poller is not None else None
        return {"chats_in_flight": self.flight.total(), "max_parallel_chats": self.max_parallel,
                "usage_polls": poll, "usage_not_polled": self.not_polled, "streams_cut_short_polled": self.cut_streams}

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._stream_ended(flow)
        finally:
            self.flight.release_all(flow.id)
            self._poll_slots.pop(flow.id, None)

    # -- counting ------------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        user = flow.metadata.get(COZE_USER)
        response = flow.response
        if not user or response is None or response.status_code != 200:
            return
        if not fields.get(response.headers, b"content-type").lower().startswith("text/event-stream"):
            return
        self._poll_slots.pop(flow.id, None)  # a stream: its usage comes in it (a stream cut short polls anyway)
        if is_chat(flow.request.method, flow.request.data.path):
            self.book.chat(user)
        if callable(response.stream):
            # another addon watches this stream already; replacing its callable would break it
            self._not_counted("another addon set its stream callable")
            return
        book = self.book
        encoding = fields.get(response.headers, b"content-encoding")
        if go_reading.route(flow.request.data.path).lower().endswith(WORKFLOW_STREAMS):
            # stream_run / stream_resume: a Message event's usage is this call's usage so far
            reader = SSEUsageReader(lambda usage: book.tokens(user, usage), events=(WORKFLOW_MESSAGE,),
                                    content_encoding=encoding, cumulative=True)
        else:
            # chats: the usage comes with chat.completed; chat.created names the chat, for a stream cut short
            reader = SSEUsageReader(lambda usage: book.tokens(user, usage), events=(COMPLETED,),
                                    content_encoding=encoding, ids_from=CREATED)
        if reader.unreadable:
            self._not_counted(reader.unreadable)
        # Replaces streaming.py's True: the stream still goes out chunk by chunk, each chunk unchanged.
        response.stream = reader

    def _not_counted(self, why: str) -> None:
        """Said once (the first such stream), then only counted: the reason may quote upstream's header."""
        self.unreadable_streams += 1
        if self.unreadable_streams == 1:
            log.warning(f"coze-mitm: usage of a stream not counted: {scrub(why, 120)} (later ones are only counted)")

    def response(self, flow: http.HTTPFlow) -> None:
        # Not after the answer (after_answer.py): the place must be free before any later hook of this connection
        # runs, and mitmproxy 12 may run one first (a WebSocket's first message sent with its upgrade request, a
        # pipelined request): a chat started there would otherwise be released with this one, uncounted.
        try:
            self._stream_ended(flow)
            self._count_answer(flow)
        finally:
            # The chat's answer has ended (a streamed one after its last chunk): it is no longer in flight,
            # unless its usage poll holds it now.
            self.flight.release_all(flow.id)
            self._poll_slots.pop(flow.id, None)

    def _count_answer(self, flow: http.HTTPFlow) -> None:
        user = flow.metadata.get(COZE_USER)
        response = flow.response
        if not user or response is None or response.stream or response.status_code != 200:
            return
        request = flow.request
        # The path as Coze's Go server routes it: /v3/%63hat and /v1/workflow/%72un are counted like the plain ones.
        route = go_reading.route(request.data.path).lower()
        retrieve = route.endswith("/v3/chat/retrieve")
        post = request.method.upper() == "POST"
        prefix = api_prefix(request.data.path) if post else None
        workflow = post and route.endswith("/v1/workflow/run")
        if not retrieve and prefix is None and not workflow:
            return  # most answers: nothing to count, no header or body read
        raw = response.raw_content or b""
        if not retrieve_body_ok(len(raw), fields.get(response.headers, b"content-encoding"), MAX_CHAT_ANSWER):
            return
        content = _content(response)
        if retrieve:
            usage = usage_from_retrieve(content, MAX_CHAT_ANSWER)
            if usage is not None:
                self.book.tokens(user, usage)
            return
        answer = _json(content)
        if not isinstance(answer, dict) or answer.get("code") != 0:
            return
        if workflow:  # a workflow run answers once, its usage (when Coze reports one) beside its output
            usage = parse_usage(answer)
            if usage is not None:
                self.book.tokens(user, usage)
            return
        if is_chat(request.method, request.data.path):
            self.book.chat(user)  # a non-streamed chat (stream: false)
        # Its usage comes with retrieve once completed; an answer that is completed already (a chat
        # that needed no polling) carries it here. Counted once per chat id either way.
        usage = usage_from_retrieve(content, MAX_CHAT_ANSWER)
        if usage is not None:
            self.book.tokens(user, usage)
            return
        data = answer.get("data")
        if isinstance(data, dict) and data.get("status") in ("created", "in_progress"):
            self._poll(flow, user, prefix, data)

    def _stream_ended(self, flow: http.HTTPFlow) -> None:
        """A streamed chat whose stream ended (client gone, connection cut, or a clean end) without its
        `conversation.chat.completed`: it may run on at Coze and be billed, so its usage is polled with the
        ids its `conversation.chat.created` gave (a chat that failed or was cancelled ends the poll at once)."""
        response = flow.response
        reader = response.stream if response is not None else None
        if not isinstance(reader, SSEUsageReader) or reader.chat_ref is None or reader.usages:
            return
        user = flow.metadata.get(COZE_USER)
        route = go_reading.route(flow.request.data.path)
        prefix = api_prefix(flow.request.data.path)
        if prefix is None and route.lower().endswith(WORKFLOWS_CHAT):
            prefix = route[: -len(WORKFLOWS_CHAT)]
        if not user or prefix is None:
            return
        conversation_id, chat_id = reader.chat_ref
        reader.chat_ref = None  # response and error may both come: one poll
        self.cut_streams += 1
        self._poll(flow, user, prefix, {"conversation_id": conversation_id, "id": chat_id})

    def _poll(self, flow: http.HTTPFlow, user: str, prefix: str, data: dict) -> None:
        """Coze answered `in_progress`: fetch the usage the client may never ask for, with the user's token,
        from the Coze API origin the chat went to (and no other)."""
        conversation_id, chat_id = data.get("conversation_id"), data.get("id")
        settings = self.settings
        if (not isinstance(conversation_id, str) or not isinstance(chat_id, str) or not conversation_id
                or not chat_id or len(conversation_id) > 128 or len(chat_id) > 128 or settings is None
                or settings.broker is None or not settings.is_coze_api(flow.request)):
            self.not_polled += 1
            return
        if self.poller is None:
            opts = ctx.options
            self.poller = UsagePoller(
                lambda u: self.settings.broker.token_for(u), self._polled_usage, self._poll_done,
                invalidate=lambda u, token: self.settings.broker.invalidate(u, token),
                timeout=float(getattr(opts, "coze_exchange_timeout", 10)), outbound=settings.outbound,
            )
        request = flow.request
        origin = f"{request.scheme}://{request.host}" + ("" if (request.scheme, request.port) in
                                                          (("http", 80), ("https", 443)) else f":{request.port}")
        key = f"poll:{flow.id}"
        self.flight.rekey(flow.id, key)  # in flight until its usage is counted (or the poll ends)
        self._poll_slots.pop(flow.id, None)
        self.poller.start(Chat(key, user, origin, prefix, conversation_id, chat_id), keep_all=self.daily_tokens > 0)

    def _polled_usage(self, user: str, usage) -> None:
        self.book.tokens(user, usage)

    def _poll_done(self, key: str, outcome: str) -> None:
        self.flight.release_all(key)
        if outcome == "dropped":
            log.warning("coze-mitm: too many non-streamed chats awaiting their usage; the oldest one is not counted")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """The WebSocket chat: a client event that starts a reply is counted and budgeted before it leaves;
        Coze's `conversation.chat.completed` carries the usage, as for a stream."""
        user = flow.metadata.get(COZE_USER)
        if not user or flow.websocket is None or not is_chat("GET", flow.request.data.path):
            return
        message = flow.websocket.messages[-1]
        if message.from_client:
            if not message.injected:
                return self._client_event(flow, user, message)  # awaitable when a shared store decides
            return
        content = message.content
        if len(content) > MAX_WS_EVENT or b"conversation.chat." not in content:
            return
        event = _json(content)
        kind = event.get("event_type") if isinstance(event, dict) else None
        if kind not in WS_CHAT_ENDS:
            return
        if kind == "conversation.chat.completed":
            usage = parse_usage(event.get("data"))
            if usage is not None:
                self.book.tokens(user, usage)
        self.flight.release(flow.id)  # the reply ended: one chat of this socket is no longer in flight

    def _client_event(self, flow: http.HTTPFlow, user: str, message) -> None:
        content = message.content
        budgeted = self.daily_tokens > 0
        if not budgeted:
            # No budget: only counting, so a cheap look first (most events are no chat start; an escaped
            # name, "\u0063onversation...", is read by Go as the name itself).
            if len(content) > MAX_WS_CLIENT_EVENT or not (b"\\u" in content or any(n in content for n in _WS_START_NAMES)):
                return
        elif len(content) > MAX_WS_CLIENT_EVENT:
            # Too big to read on the event loop, so it cannot be told apart from a chat start: not forwarded.
            self._refuse_event(flow, message, 4000, "coze-mitm: a WebSocket event over "
                               f"{MAX_WS_CLIENT_EVENT // 1024} KiB is not forwarded while a daily budget is set "
                               "(it cannot be checked); send smaller events")
            return
        # Read as Coze's Go server reads it: "Event_Type" fills event_type, the last of such keys wins.
        try:
            event = go_reading.read_object(content)
        except go_reading.Unreadable as e:
            if budgeted:  # Python and Go may read it differently: refused rather than guessed
                self._refuse_event(flow, message, 4000, f"coze-mitm: this WebSocket event is not forwarded while a "
                                   f"daily budget is set: {e}. Send each event as one JSON object in UTF-8, nested "
                                   f"at most {go_reading.MAX_DEPTH} levels")
            return  # no budget: only counting, and there is nothing to count in what cannot be read
        kind, disagree = go_reading.field(event, "event_type")
        if disagree and budgeted:
            self._refuse_event(flow, message, 4000, "coze-mitm: this WebSocket event is not forwarded while a daily "
                               "budget is set: it names its event_type more than once (in other cases or spellings) "
                               "with different values; send it once")
            return
        if not isinstance(kind, str) or kind not in WS_SPENDING:
            return  # chat.update, conversation.clear, ... spend nothing (an event_type that is no string: Coze refuses it)
        if budgeted:
            shown_as = short_id(user)
            if isinstance(self.store, usage_redis.RedisUsageStore) and (kind in WS_CHAT_STARTS or self.store.error):
                return self._shared_event(flow, user, shown_as, message, kind)
            over = over_budget_msg(self.book, user, shown_as, self.daily_tokens)
            if over is not None:
                if kind in WS_CHAT_STARTS or flow.id not in self._ws_warned:
                    self._ws_warned.add(flow.id)  # audio: said once per socket, then dropped quietly
                    self._refuse_event(flow, message, 4013, over[0])
                else:
                    message.drop()
                    self.refused_ws_events += 1
                return
            if kind not in WS_CHAT_STARTS:
                return  # audio input within the budget: the reply it may start is counted by its usage
            in_flight = self.flight.count(user)
            if self.max_parallel and in_flight >= self.max_parallel:
                self._refuse_event(flow, message, 4013, parallel_msg(shown_as, in_flight, self.max_parallel))
                return
            self.flight.add(flow.id, user)
        if kind in WS_CHAT_STARTS:
            self.book.chat(user)

    async def _shared_event(self, flow: http.HTTPFlow, user: str, shown_as: str, message, kind: str) -> None:
        """A chat start on the WebSocket chat, decided by the store every proxy shares (audio input only while
        that store cannot be asked: then it is refused, as the chats it may start would be)."""
        starts = kind in WS_CHAT_STARTS
        refusal = await self._shared_refusal(flow.id, user, shown_as, starts, False, "GET")
        if refusal is None:
            if starts:
                self.book.chat(user)
            return
        if starts or flow.id not in self._ws_warned:
            self._ws_warned.add(flow.id)  # audio: said once per socket, then dropped quietly
            self._refuse_event(flow, message, refusal.code, refusal.msg)
        else:
            message.drop()
            self.refused_ws_events += 1

    def _refuse_event(self, flow: http.HTTPFlow, message, code: int, msg: str) -> None:
        """Not forwarded; the client gets Coze's own error event instead (nothing reaches Coze)."""
        message.drop()
        self.refused_ws_events += 1
        if self.settings is not None:
            self.stats.refused("budget")
        event = {"id": f"coze-mitm-{secrets.token_hex(8)}", "event_type": "error", "data": {"code": code, "msg": msg}}
        payload = json.dumps(event, ensure_ascii=False).encode()
        try:
            ctx.master.commands.call("inject.websocket", flow, True, payload, True)
        except Exception as e:  # the socket closed meanwhile: the event was dropped all the same
            log.debug(f"coze-mitm: could not tell the WebSocket client why an event was dropped: {e}")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.flight.release_all(flow.id)
        self._ws_warned.discard(flow.id)


def _big_run_msg() -> str:
    return (f"coze-mitm: this workflow run's body is over {go_reading.ON_LOOP_BYTES // 1024} KiB with "
            f"{go_reading.MAX_VALUES} JSON values or more, too much for the proxy to read, so whether it asks to run "
            "asynchronously (is_async) cannot be checked; while a daily budget is set (coze_user_daily_tokens) such "
            "runs are not forwarded. Send it with fewer values (long strings are fine), or streamed "
            "(/v1/workflow/stream_run).")


def _content(response: http.Response) -> bytes:
    """The answer decoded, never more than MAX_CHAT_ANSWER of it (a small compressed body can decode to GiBs)."""
    return decoded_prefix(response.raw_content or b"", fields.get(response.headers, b"content-encoding"), MAX_CHAT_ANSWER) or b""


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
