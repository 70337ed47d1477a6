"""The usage of a non-streamed chat, fetched by the proxy itself.

Pure logic and I/O, no mitmproxy import. A non-streamed `/v3/chat` (or `submit_tool_outputs`) is answered
at once with `status: "in_progress"`; its usage appears only in `GET /v3/chat/retrieve` once the chat is
completed. A client that reads the reply with `/v3/chat/message/list` never asks for it, so the proxy
polls retrieve itself, with that user's token, on the Coze API origin the chat was sent to:

* one asyncio task per chat on the event loop (sleeping costs nothing); each request runs in a small
  thread pool of its own (core/off_loop.py), never on the loop, and leaves the way mitmproxy's connection
  options say (core/outbound.py: upstream proxy, certificate checks);
* bounded in time: first after `first_delay` s, then `factor` times longer each time up to `max_delay`,
  for at most `deadline` s;
* bounded in count: at most `max_pollers` chats polled at once; when one more comes, the oldest poll is
  dropped and counted in `dropped` (its usage is not counted);
* the usage is handed to `on_usage(user, usage)` once (the book counts a chat id once anyway), then
  `on_done(key, outcome)` says how the poll ended: "counted", "ended" (failed, canceled, requires_action:
  nothing to count), "gave-up" (deadline), "dropped" (too many polls), "closed" (shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import requests
import urllib3

from coze_mitm.core.off_loop import OffLoopHttp
from coze_mitm.core.outbound import DIRECT, Outbound
from coze_mitm.core.usage import Usage, parse_usage

MAX_POLLERS = 64
DEADLINE = 600.0
FIRST_DELAY = 1.0
FACTOR = 1.5
MAX_DELAY = 10.0
WORKERS = 4
MAX_BODY = 256 * 1024
INVALID_TOKEN_CODES = frozenset({4100, 700012006})
ENDED = frozenset({"failed", "canceled", "requires_action"})


@dataclass
class PollStats:
    started: int = 0
    counted: int = 0
    ended: int = 0  # the chat failed, was canceled or waits for tool outputs: no usage to count
    gave_up: int = 0  # not completed within the deadline: not counted
    dropped: int = 0  # more chats to poll than max_pollers: the oldest was not counted
    requests: int = 0
    errors: int = 0  # retrieve requests that failed (network, HTTP status, answer); the poll goes on
    delays: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))  # s, answer -> counted

    def as_dict(self) -> dict:
        d = sorted(self.delays)
        return {"started": self.started, "counted": self.counted, "ended": self.ended, "gave_up": self.gave_up,
                "not_counted_dropped": self.dropped, "requests": self.requests, "errors": self.errors,
                "delay_median_s": round(d[len(d) // 2], 3) if d else None, "delay_max_s": round(d[-1], 3) if d else None}


@dataclass(frozen=True)
class Chat:
    key: str  # what the in-flight count holds it under
    user: str
    origin: str  # scheme://host[:port] of the Coze API the chat was sent to
    prefix: str  # the API base's path prefix ("" for Coze)
    conversation_id: str
    chat_id: str


class UsagePoller:
    def __init__(self, token_for: Callable[[str], Awaitable[str]], on_usage: Callable[[str, Usage], None],
                 on_done: Callable[[str, str], None], *, invalidate: Callable[[str, str], object] | None = None,
                 max_pollers: int = MAX_POLLERS, deadline: float = DEADLINE, first_delay: float = FIRST_DELAY,
                 factor: float = FACTOR, max_delay: float = MAX_DELAY, timeout: float = 10.0,
                 outbound: Callable[[], Outbound] = lambda: DIRECT):
        self.token_for, self.on_usage, self.on_done, self.invalidate = token_for, on_usage, on_done, invalidate
        self.max_pollers, self.deadline = max_pollers, deadline
        self.first_delay, self.factor, self.max_delay = first_delay, factor, max_delay
        self.timeout = timeout
        self.stats = PollStats()
        self._tasks: collections.OrderedDict[str, asyncio.Task] = collections.OrderedDict()  # oldest first
        self._http = OffLoopHttp(WORKERS, "coze-usage-poll", outbound=outbound)

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, chat: Chat) -> None:
        """Poll for `chat`'s usage (call on the event loop). A chat already polled is not polled twice."""
        if chat.key in self._tasks:
            return
        while len(self._tasks) >= self.max_pollers:
            key, task = self._tasks.popitem(last=False)
            task.cancel()
            self.stats.dropped += 1
            self.on_done(key, "dropped")
        self.stats.started += 1
        task = asyncio.get_running_loop().create_task(self._poll(chat, time.monotonic()), name="coze-usage-poll")
        self._tasks[chat.key] = task

    def close(self) -> None:
        """Stop every poll (their usage is not counted) and the pool."""
        for key, task in list(self._tasks.items()):
            task.cancel()
            self.on_done(key, "closed")
        self._tasks.clear()
        self._http.close()

    async def _poll(self, chat: Chat, started: float) -> None:
        outcome = "gave-up"
        try:
            delay = self.first_delay
            while True:
                left = started + self.deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(delay, left))
                delay = min(delay * self.factor, self.max_delay)
                status, usage = await self._ask(chat)
                if usage is not None:
                    self.stats.delays.append(time.monotonic() - started)
                    self.on_usage(chat.user, usage)
                    outcome = "counted"
                    break
                if status in ENDED:
                    outcome = "ended"
                    break
        except asyncio.CancelledError:
            return  # dropped or closed: whoever cancelled said so
        except Exception:  # never let a poll's bug escape into the loop's exception handler
            self.stats.errors += 1
        if self._tasks.get(chat.key) is asyncio.current_task():
            del self._tasks[chat.key]
            if outcome == "counted":
                self.stats.counted += 1
            elif outcome == "ended":
                self.stats.ended += 1
            else:
                self.stats.gave_up += 1
            self.on_done(chat.key, outcome)

    async def _ask(self, chat: Chat) -> tuple[str, Usage | None]:
        """(the chat's status, its usage once completed); ("", None) when this round told nothing."""
        try:
            token = await self.token_for(chat.user)
        except Exception:  # the exchange failed or the user limit was hit: try again next round
            self.stats.errors += 1
            return "", None
        query = urllib.parse.urlencode({"conversation_id": chat.conversation_id, "chat_id": chat.chat_id})
        url = f"{chat.origin}{chat.prefix}/v3/chat/retrieve?{query}"
        self.stats.requests += 1
        try:
            status_code, body = await self._http.run(self._get, url, token)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError):
            self.stats.errors += 1
            return "", None
        try:
            answer = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            self.stats.errors += 1
            return "", None
        code = answer.get("code")
        if status_code == 401 or code in INVALID_TOKEN_CODES:
            if self.invalidate is not None:
                self.invalidate(chat.user, token)  # the next round mints a fresh one
            self.stats.errors += 1
            return "", None
        data = answer.get("data")
        if code != 0 or not isinstance(data, dict):
            self.stats.errors += 1
            return "", None
        status = data.get("status") if isinstance(data.get("status"), str) else ""
        if status == "completed":
            usage = parse_usage(data)
            if usage is not None and not usage.chat_id:
                usage = Usage(usage.token_count, usage.input_count, usage.output_count, chat.chat_id)
            return status, usage
        return status, None

    def _get(self, url: str, token: str) -> tuple[int, bytes]:
        """Blocking (runs in the pool): one retrieve, its body read raw and bounded."""
        r = self._http.session().get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                                            "Accept-Encoding": "identity"},
                              timeout=self.timeout, allow_redirects=False, stream=True)
        try:
            body = r.raw.read(MAX_BODY + 1, decode_content=True)
        finally:
            r.close()
        if len(body) > MAX_BODY:
            raise ValueError("retrieve answer too large")
        return r.status_code, body
