"""The token broker: one Coze access token per user, cached, renewed early.

* `TokenBroker` is the async part used from mitmproxy hooks: a bounded LRU cache per user and one
  in-flight exchange per user however many requests wait for it, so concurrent first requests cost
  one exchange, and other users' exchanges run in parallel off the event loop. The exchange itself
  (sign a JWT, POST it to Coze) is exchange.py's `CozeTokenExchange`, run in worker threads.
* `PatBroker` has the same face for PAT mode: every user gets the one personal access token.

No mitmproxy import here. Nothing in this module ever logs or raises a token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from typing import Awaitable, Callable

from coze_mitm.core.exchange import DEAD, EXCHANGE_WORKERS, ExchangeError, IssuedToken
from coze_mitm.core.identity import short_id
from coze_mitm.core.refusal import RATE_LIMITED, Refusal, Refused

log = logging.getLogger("coze.tokens")


class LimitError(Refused):
    """Too many new users: answered 429 with Retry-After, never minted."""

    def __init__(self, msg: str, retry_after: int):
        super().__init__(Refusal(429, RATE_LIMITED, "new-user-limit", msg, {"Retry-After": str(retry_after)}))
        self.retry_after = retry_after


class TokenBroker:
    """Per-user access tokens: cached (LRU, bounded), single-flight, renewed ahead of expiry."""

    mode = "jwt"

    def __init__(self, fetch: Callable[[str], IssuedToken], *, max_users: int = 10_000,
                 new_users_per_minute: int = 0, clock: Callable[[], float] = time.time,
                 workers: int = EXCHANGE_WORKERS, timeout: float | None = None):
        self._fetch = fetch
        # A request waits at most this long for its token, in the queue and the exchange together.
        self.timeout = timeout if timeout is not None else getattr(fetch, "timeout", None)
        self.max_users = max_users
        self.new_users_per_minute = new_users_per_minute
        self._clock = clock
        self._cache: collections.OrderedDict[str, IssuedToken] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._new_user_times: collections.deque[float] = collections.deque()
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="coze-exchange")
        # The team's window when proxies share one (usage_redis.RedisUsageStore.admit): async (user, limit) ->
        # 0 admitted, N seconds to wait, None when it cannot say (then this proxy's own window decides).
        self.admission: Callable[[str, int], Awaitable[int | None]] | None = None
        self.exchanges = 0
        self.failures = 0
        # Exchanges by outcome ("ok", or a failure's fixed reason), for /metrics; never keyed by upstream text.
        self.results: collections.Counter[str] = collections.Counter()

    def cached_token(self, user_id: str) -> str | None:
        """The user's token if one is cached and still usable (no waiting, no task), else None.
        When the token is due for renewal this starts it in the background (call it on the event loop)."""
        issued = self._cache.get(user_id)
        if issued is None:
            return None
        now = self._clock()
        if now >= issued.usable_until:
            return None
        self._cache.move_to_end(user_id)
        if now >= issued.renew_at and user_id not in self._inflight:
            self._start_fetch(user_id).add_done_callback(self._forget_background_failure)
        return issued.token

    async def token_for(self, user_id: str) -> str:
        token = self.cached_token(user_id)
        if token is not None:
            return token
        if user_id not in self._cache and user_id not in self._inflight:
            if self.admission is not None and self.new_users_per_minute:
                await self._admit_shared(user_id)
            else:
                self._admit_new_user(self._clock())
        # shield: a client that gives up must not cancel the exchange other requests are waiting for.
        pending = asyncio.shield(self._inflight.get(user_id) or self._start_fetch(user_id))
        if not self.timeout:
            return (await pending).token
        try:
            return (await asyncio.wait_for(pending, self.timeout)).token
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    def _timed_out(self) -> ExchangeError:
        make = getattr(self._fetch, "timed_out", None)
        if make is not None:
            return make()
        return ExchangeError(504, 5000, "exchange-timeout",
                             f"no token within {self.timeout:g} s; raise coze_exchange_timeout")

    def _admit_new_user(self, now: float) -> None:
        if not self.new_users_per_minute:
            return
        while self._new_user_times and self._new_user_times[0] <= now - 60:
            self._new_user_times.popleft()
        if len(self._new_user_times) >= self.new_users_per_minute:
            retry_after = max(1, int(self._new_user_times[0] + 60 - now) + 1)
            raise LimitError(
                f"more than {self.new_users_per_minute} new users in a minute; try again in {retry_after} s "
                "(raise coze_new_users_per_minute if this is expected)",
                retry_after,
            )
        self._new_user_times.append(now)

    async def _admit_shared(self, user_id: str) -> None:
        wait = await self.admission(user_id, self.new_users_per_minute)
        if wait is None:  # the shared store cannot say: this proxy's own window decides
            self._admit_new_user(self._clock())
        elif wait > 0:
            raise LimitError(
                f"more than {self.new_users_per_minute} new users in a minute across the proxies sharing the usage "
                f"store; try again in {wait} s (raise coze_new_users_per_minute if this is expected)", wait)

    def _start_fetch(self, user_id: str) -> asyncio.Future:
        task = asyncio.get_running_loop().create_task(self._fetch_and_store(user_id))
        self._inflight[user_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(user_id, None))
        # Waiters that gave up (504) leave nobody to read a late failure: read it here, or asyncio logs it.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _fetch_unless_late(self, user_id: str, deadline: float) -> IssuedToken:
        # Whoever asked has stopped waiting (504) while this sat in the queue: don't spend a worker on it.
        if deadline and time.monotonic() > deadline:
            raise self._timed_out()
        return self._fetch(user_id)

    async def _fetch_and_store(self, user_id: str) -> IssuedToken:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout if self.timeout else 0.0
        try:
            issued = await loop.run_in_executor(self._executor, self._fetch_unless_late, user_id, deadline)
        except Exception as e:
            self.failures += 1
            self.results[getattr(e, "reason", "internal-error")] += 1
            raise
        self.exchanges += 1
        self.results["ok"] += 1
        self._cache[user_id] = issued
        self._cache.move_to_end(user_id)
        while len(self._cache) > self.max_users:
            self._cache.popitem(last=False)
        log.info(
            "coze-mitm: token for user %s minted, expires %s (in %d s)%s",
            short_id(user_id), time.strftime("%H:%M:%S", time.localtime(issued.expires_at)),
            issued.expires_at - self._clock(), f", logid {issued.logid}" if issued.logid else "",
        )
        return issued

    @staticmethod
    def _forget_background_failure(task: asyncio.Future) -> None:
        # The old token stays valid until usable_until; the next request tries again.
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            log.warning("coze-mitm: early token renewal failed, keeping the current token: %s", getattr(e, "msg", type(e).__name__))

    def invalidate(self, user_id: str, token: str) -> bool:
        """Coze said `token` is invalid: forget it (unless it was already replaced).

        The user stays known (a dead entry), so the fresh token is not counted as a new user's."""
        issued = self._cache.get(user_id)
        if issued is not None and issued.token == token:
            self._cache[user_id] = DEAD
            return True
        return False

    def users(self) -> list[tuple[str, float]]:
        """(user id, expiry) for every cached user with a live token, most recently used last."""
        return [(user_id, issued.expires_at) for user_id, issued in self._cache.items() if issued is not DEAD]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PatBroker:
    """PAT mode: one personal access token for everyone (no isolation between users)."""

    mode = "pat"

    def __init__(self, pat: str):
        self._pat = pat
        self.exchanges = 0
        self.failures = 0
        self.results: collections.Counter[str] = collections.Counter()
        self.max_users = 0

    def cached_token(self, user_id: str) -> str | None:
        return self._pat

    async def token_for(self, user_id: str) -> str:
        return self._pat

    def invalidate(self, user_id: str, token: str) -> bool:
        return False

    def users(self) -> list[tuple[str, float]]:
        return []

    def close(self) -> None:
        pass
