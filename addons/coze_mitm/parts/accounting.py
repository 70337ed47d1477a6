"""Usage per user: chats and Coze tokens counted as answers pass, kept in the usage file, budgets checked.

    coze_user_daily_tokens  Coze tokens a user may use per UTC day (0 = no budget); `budget_refusal`
                            is what the auth addon asks before it injects a credential
    coze_usage_file         where usage is kept (default, when empty: coze-mitm-usage.sqlite in
                            mitmproxy's confdir; "memory" keeps it in memory only; with coze_demo and
                            no file named: memory, so the sandbox's users never reach a later run's file)

Hooks (this addon must come after `auth` and after `streaming` in the addon list):
responseheaders               a tagged event-stream answer from the Coze API gets a usage reader as its
                              `stream` callable (chunks pass unchanged); a streamed chat counts as a chat
response                      a non-streamed chat answered with code 0 counts as a chat (and its usage,
                              if it is completed already); `/v3/chat/retrieve` of a completed chat: its
                              usage (once per chat id)
websocket_start               a WebSocket chat (`/v1/chat` on the ws host) counts as a chat

The user is the key the auth addon leaves in flow.metadata["coze_user"] (a tag id, or `login:<name>`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mitmproxy import ctx, http

from coze_mitm import options
from coze_mitm.core import fields
from coze_mitm.flowmeta import COZE_USER
from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.exchange import scrub
from coze_mitm.core.usage import SSEUsageReader, parse_usage, retrieve_body_ok, usage_from_retrieve
from coze_mitm.core.usage_book import UsageBook, budget_refusal, is_chat
from coze_mitm.core.usage_store import SqliteUsageStore, default_path

log = logging.getLogger("coze.accounting")

MAX_CHAT_ANSWER = 256 * 1024  # a non-streamed chat answer is ~1 KB; bigger ones are not parsed
MAX_WS_EVENT = 64 * 1024  # a WebSocket event carrying usage is small; bigger messages are not parsed


class Accounting:
    def __init__(self, max_users: int = 10_000):
        self.max_users = max_users
        self.book = UsageBook(max_users=max_users)  # memory only until configure opens the file
        self.store: SqliteUsageStore | None = None
        self.daily_tokens = 0
        self.unreadable_streams = 0
        self.started = False


    def configure(self, updated):
        if "coze_user_daily_tokens" in updated:
            if ctx.options.coze_user_daily_tokens < 0:
                options.refuse("coze-mitm: coze_user_daily_tokens must be 0 (no budget) or a number of tokens per user "
                               "and day", started=self.started)
                return
            self.daily_tokens = ctx.options.coze_user_daily_tokens
        if updated & {"coze_usage_file", "coze_demo"} or ("confdir" in updated and self.store is None):
            spec = ctx.options.coze_usage_file
            if not spec and getattr(ctx.options, "coze_demo", False):
                # The demo's users are the sandbox's (a throwaway stand-in): counted in memory only, so they
                # never appear in the usage file of a later run with a real Coze. An explicit file still counts.
                spec = "memory"
            self._open(spec)

    def _open(self, spec: str) -> None:
        """At start-up (before traffic): read the file once, then only the writer thread touches it."""
        if self.store is not None:
            self.book.close()
        self.store = None
        if spec == "memory":
            self.book = UsageBook(max_users=self.max_users)
            return
        path = Path(spec).expanduser() if spec else default_path(ctx.options.confdir)
        # A warning, not an error: an ERROR at start-up stops mitmdump, and usage must never stop the proxy.
        self.store = SqliteUsageStore(path, on_error=log.warning)
        self.book = UsageBook(self.store, max_users=self.max_users)
        self.book.load()

    def running(self):
        self.started = True

    def done(self):
        self.book.close()  # the pending increments reach the file

    # -- budgets (asked by auth before it injects) ------------------------------------------------
    def budget_refusal(self, flow: http.HTTPFlow, user: str, shown_as: str):
        """None, or (status, code, reason, msg, headers) for a local answer; see usage_book.budget_refusal."""
        return budget_refusal(self.book, user, shown_as, self.daily_tokens, flow.request.method, flow.request.path)

    # -- counting ------------------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        user = flow.metadata.get(COZE_USER)
        response = flow.response
        if not user or response is None or response.status_code != 200:
            return
        if not fields.get(response.headers, b"content-type").lower().startswith("text/event-stream"):
            return
        if is_chat(flow.request.method, flow.request.path):
            self.book.chat(user)
        if callable(response.stream):
            # another addon watches this stream already; replacing its callable would break it
            self._not_counted("another addon set its stream callable")
            return
        book = self.book
        reader = SSEUsageReader(lambda usage: book.tokens(user, usage),
                                content_encoding=fields.get(response.headers, b"content-encoding"))
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
        user = flow.metadata.get(COZE_USER)
        response = flow.response
        if not user or response is None or response.stream or response.status_code != 200:
            return
        request = flow.request
        if b"/chat" not in request.data.path:
            return  # neither a chat nor its retrieve (most answers): decided on the raw path, not decoded
        route = request.path.split("?", 1)[0].rstrip("/")
        retrieve = route.endswith("/v3/chat/retrieve")
        if not retrieve and not is_chat(request.method, request.path):
            return  # most answers: nothing to count, no header or body read
        raw = response.raw_content or b""
        if not retrieve_body_ok(len(raw), fields.get(response.headers, b"content-encoding"), MAX_CHAT_ANSWER):
            return
        if retrieve:
            usage = usage_from_retrieve(_content(response), MAX_CHAT_ANSWER)
            if usage is not None:
                self.book.tokens(user, usage)
        elif is_chat(request.method, request.path):
            content = _content(response)
            if _code_ok(content):
                self.book.chat(user)  # a non-streamed chat (stream: false)
                # Its usage comes with retrieve once completed; an answer that is completed already (a chat
                # that needed no polling) carries it here. Counted once per chat id either way.
                usage = usage_from_retrieve(content, MAX_CHAT_ANSWER)
                if usage is not None:
                    self.book.tokens(user, usage)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        user = flow.metadata.get(COZE_USER)
        if user and is_chat("GET", flow.request.path):
            self.book.chat(user)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """A WebSocket chat's usage: Coze's `conversation.chat.completed` event, as for a stream."""
        user = flow.metadata.get(COZE_USER)
        if not user or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if message.from_client or len(message.content) > MAX_WS_EVENT or b"conversation.chat.completed" not in message.content:
            return
        try:
            event = json.loads(message.content)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if isinstance(event, dict) and event.get("event_type") == "conversation.chat.completed":
            usage = parse_usage(event.get("data"))
            if usage is not None:
                self.book.tokens(user, usage)


def _content(response: http.Response) -> bytes:
    """The answer decoded, never more than MAX_CHAT_ANSWER of it (a small compressed body can decode to GiBs)."""
    return decoded_prefix(response.raw_content or b"", fields.get(response.headers, b"content-encoding"), MAX_CHAT_ANSWER) or b""


def _code_ok(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(answer, dict) and answer.get("code") == 0
