"""The Redis store behind the usage book: what several proxies pointed at one Redis share (issue 28).

Pure logic, no mitmproxy import. `RedisUsageStore` speaks to Redis with redis-py's asyncio client, on the
event loop but never blocking it (every call is awaited, with a timeout). It keeps, for every proxy alike:

* usage per user per UTC day, and all time (hashes, increments only): written in idempotent batches (a
  batch carries an id; a retry after a lost reply is not counted twice), within GATHER (20 ms) of being counted;
  a chat's usage reported with its chat id (a stream's end, /v3/chat/retrieve, the proxy's own polls) is counted
  once for every proxy: the write sets the chat's "counted" key (SET NX, COUNTED_TTL) and adds its tokens only
  if it set it, in the same script, so no crash between the two can count it twice or lose it;
* the budget decision: one Lua script reads the user's tokens today, drops expired in-flight entries,
  counts the rest against the parallel cap and adds the new chat's entry, atomically; the only round trip a
  chat start waits for, on a connection of its own where decisions are pipelined (`DecisionLane`);
* chats in flight: one sorted set per user, an entry per chat scored with its expiry (Redis' clock); the
  proxy holding an entry renews it every lease/3 seconds, so a proxy that dies frees its entries within
  one lease;
* the new-users-per-minute window (a sorted set), and which users the team has seen today;
* what the status pages and /metrics show: today's figures refreshed every second (with the all-time
  figures of today's users); the all-time figures of the other users read once a minute, ALL_TIME_MAX
  users at most (the all-time hashes hold every user id ever seen, and ids are chosen by clients).

Redis unreachable: one warning line (start-up or later), budget decisions answer "down" at once (the
accounting part refuses budgeted chats, naming the store), usage waits in a bounded queue and is written
when Redis is back, or its loss is said with its size. The password (from the URL or COZE_REDIS_PASSWORD)
is never printed: messages name the URL without it, and any text that came from Redis is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import secrets
import time
import urllib.parse
from typing import Callable

from coze_mitm.core.usage_book import StoredUsage

log = logging.getLogger("coze-mitm.usage")

SCHEMES = ("redis://", "rediss://")
PASSWORD_ENV = "COZE_REDIS_PASSWORD"
PREFIX = "coze-mitm:"
LEASE = 30.0  # seconds an in-flight entry lives without its proxy renewing it
TIMEOUT = 2.0  # seconds for a connection or a command; past it Redis counts as unreachable
REFRESH = 1.0  # seconds between snapshots for the status pages (and between reconnection attempts)
GATHER = 0.02  # seconds a write waits for more: many chats' usage and ends in one round trip, 20 ms later at most
COUNTED_TTL = 2 * 86400  # seconds a chat id stays "counted" (its usage reported again later is not added again)
DAY_TTL = 400 * 86400  # a day's hash is kept this long (the SQLite store keeps its rows for ever)
BATCH_ROWS = 500  # (user, day) rows per write
MAX_CONNECTIONS = 32  # the asyncio client's pool: past it a command waits (TIMEOUT at most) for a free connection
ALL_TIME_EVERY = 60.0  # seconds between reads of the all-time figures of users not active today
ALL_TIME_MAX = 10_000  # users read at most from the all-time hashes (HSCAN, in Redis' order), once a minute
SCAN_COUNT = 1000  # HSCAN's COUNT hint: fields per round trip

# KEYS: the batch's id key ("" when the call carries no usage). ARGV: prefix, day TTL, counted TTL, the number of
# in-flight entries to remove, those (set, member) pairs, then (user, day, chat id or "", chats, tokens) per row.
# One call per write: the chats that ended and the usage counted since the last one, in one round trip. A row
# with a chat id adds its tokens only if no proxy counted that chat before (its "counted" key is set here).
APPLY = """
local p, ttl, counted, releases = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 5, 4 + 2 * releases, 2 do redis.call('ZREM', ARGV[i], ARGV[i + 1]) end
if KEYS[1] == '' or not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then return 0 end
for i = 5 + 2 * releases, #ARGV, 5 do
  local user, day, chat, c, t = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if chat ~= '' and not redis.call('SET', p .. 'counted:' .. #user .. ':' .. user .. ':' .. chat, '1', 'NX', 'EX',
                                   counted) then
    c, t = 0, 0
  end
  if c ~= 0 then
    redis.call('HINCRBY', p .. 'day:' .. day .. ':chats', user, c)
    redis.call('HINCRBY', p .. 'all:chats', user, c)
    redis.call('EXPIRE', p .. 'day:' .. day .. ':chats', ttl)
  end
  if t ~= 0 then
    redis.call('HINCRBY', p .. 'day:' .. day .. ':tokens', user, t)
    redis.call('HINCRBY', p .. 'all:tokens', user, t)
    redis.call('EXPIRE', p .. 'day:' .. day .. ':tokens', ttl)
  end
end
return 1
"""

# KEYS: today's tokens hash, the user's in-flight set. ARGV: user, budget, cap, member ("" = look only),
# lease in ms, then (set, member) pairs of this proxy's chats that ended and are not removed yet (so its own
# ended chats never count against its next decision). Returns {verdict, tokens used today, chats in flight}:
# 0 go on, 1 over budget, 2 at the cap.
RESERVE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
for i = 6, #ARGV, 2 do redis.call('ZREM', ARGV[i], ARGV[i + 1]) end
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local budget, cap, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
if budget > 0 and used >= budget then return {1, used, 0} end
if ARGV[4] == '' then return {0, used, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
if cap > 0 and n >= cap then return {2, used, n} end
redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
redis.call('PEXPIRE', KEYS[2], 2 * lease)
return {0, used, n + 1}
"""

# ARGV: lease in ms, then (in-flight set, member) pairs this proxy still holds: their expiry moves on.
RENEW = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', ARGV[i], 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', ARGV[i], 2 * lease)
end
return 1
"""

# KEYS: the new-users window, the user's "seen today" key. ARGV: user, limit.
# Returns 0 (admitted, or known already) or the seconds until the window has room.
ADMIT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, math.floor((tonumber(oldest[2]) + 60000 - now) / 1000) + 1)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 120000)
redis.call('SET', KEYS[2], '1', 'EX', 86400)
return 0
"""

GO, OVER, AT_CAP, DOWN = "go", "over", "at-cap", "down"


def is_redis_url(spec: str) -> bool:
    return spec.strip().lower().startswith(SCHEMES)


class RedisSpec:
    """A parsed coze_usage_file Redis URL: where to connect, and how to name it without the password."""

    def __init__(self, url: str, environ=os.environ):
        url = url.strip()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("coze_usage_file: a Redis URL is redis://[:password@]host[:port][/db] "
                             "(rediss:// for TLS)")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("coze_usage_file: the Redis URL's port is not a number") from None
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"coze_usage_file: the Redis URL's path must be a database number (/0), not /{db[:20]}")
        self.password = urllib.parse.unquote(parts.password) if parts.password else environ.get(PASSWORD_ENV) or None
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.tls = parts.scheme.lower() == "rediss"
        self.host, self.port, self.db = parts.hostname, port, int(db)
        self.query = parts.query
        host = f"[{self.host}]" if ":" in self.host else self.host
        # What every message shows: never the password (nor which one was given).
        self.shown = f"{parts.scheme.lower()}://{host}:{port}/{self.db}"
        self.password_in_url = bool(parts.password)  # it then shows in ps and mitmweb's Options: worth a warning
        self._url = url

    def client(self, asyncio_client: bool = True):
        """A redis-py client for this URL (password from the environment when the URL has none)."""
        from redis.backoff import NoBackoff
        if asyncio_client:
            import redis.asyncio as module
            from redis.asyncio.retry import Retry
        else:
            import redis as module
            from redis.retry import Retry
        # No retries inside the client: a command fails within TIMEOUT, and the store's task tries again each second
        # (a budget decision must not wait several timeouts while Redis is away).
        kwargs = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT, "retry": Retry(NoBackoff(), 0),
                  "health_check_interval": 0, "decode_responses": True}
        if self.password is not None:
            kwargs["password"] = self.password
        if not asyncio_client:
            return module.Redis.from_url(self._url, **kwargs)
        # A bounded pool (redis-py's default is 2**31 connections): a burst of chat starts waits for a free
        # connection instead of opening one each against the Redis every proxy shares.
        pool = module.BlockingConnectionPool.from_url(self._url, max_connections=MAX_CONNECTIONS, timeout=TIMEOUT,
                                                      **kwargs)
        return module.Redis.from_pool(pool)  # closing the client closes its pool

    def scrub(self, text: str) -> str:
        if self.password:
            text = text.replace(self.password, "***")
            quoted = urllib.parse.quote(self.password, safe="")
            if quoted != self.password:
                text = text.replace(quoted, "***")
        return text


def redis_available() -> str:
    """"" when redis-py can be imported, else the one line that says what to install."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return ("coze_usage_file names a Redis server, but the Python package `redis` is not installed in "
                "mitmproxy's Python: pip install 'redis>=5' (see requirements.txt)")
    return ""


class DecisionLane:
    """One connection that carries this proxy's budget decisions, pipelined: each is one write and one read of
    a redis-py asyncio Connection (its handshake, TLS, password and parser), answers matched to callers in the
    order Redis gives them (it answers in order). Through the client's own path (pool, per-command timeouts) a
    decision took ~0.26 ms of loop CPU inside mitmdump between chats, on this lane ~0.1 ms (docs/benchmarks.md).

    A call not answered within `timeout` closes the connection and fails every call waiting on it (their
    answers could no longer be told apart); the next call connects again.
    """

    def __init__(self, make_connection: Callable, timeout: float = TIMEOUT, scripts: tuple[str, ...] = ()):
        self._make = make_connection  # -> an unconnected redis.asyncio Connection without a socket timeout
        self.timeout = timeout
        self.scripts = scripts  # loaded into Redis' script cache at each connection (EVALSHA finds them)
        self._conn = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._reader: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self._timers: dict[asyncio.Future, asyncio.TimerHandle] = {}
        self._stopped = False  # stop(): no call connects again (the store was closed or replaced)
        # Connection attempts so far, and how the last one failed: calls that queued behind a failed attempt
        # fail with it rather than each trying again (n waiters would otherwise wait up to n timeouts).
        self._attempts = 0
        self._last_failure: BaseException | None = None

    async def call(self, *args):
        """The command's answer (a ResponseError of Redis is raised as it is); a connection failure or
        timeout raises redis' ConnectionError / TimeoutError."""
        if self._stopped:
            from redis.exceptions import ConnectionError as RedisConnectionError
            raise RedisConnectionError("the usage store was closed")
        conn = self._conn
        if conn is None or not conn.is_connected:  # closed by a failed read being handled: never reopened unbounded
            if conn is not None:
                from redis.exceptions import ConnectionError as RedisConnectionError
                self._broken(conn, RedisConnectionError("the connection closed"))
            conn = await self._connect()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._timers[answer] = loop.call_later(self.timeout, self._timed_out, conn, answer)
        self._waiting.append(answer)  # before the write, with no await between: the order of the answers
        try:
            await conn.send_packed_command(conn.pack_command(*args), check_health=False)
        except asyncio.CancelledError:
            # This caller is cancelled mid-write: the connection can no longer be trusted, and the others
            # waiting on it fail as from a broken connection (never with this caller's cancellation).
            answer.cancel()
            from redis.exceptions import ConnectionError as RedisConnectionError
            self._broken(conn, RedisConnectionError("a decision's write was interrupted"))
            raise
        except BaseException as e:
            self._broken(conn, e)
        try:
            return await answer
        finally:
            timer = self._timers.pop(answer, None)
            if timer is not None:
                timer.cancel()

    async def _connect(self):
        if self._lock is None:
            self._lock = asyncio.Lock()
        attempts_seen = self._attempts
        async with self._lock:
            if self._stopped:
                from redis.exceptions import ConnectionError as RedisConnectionError
                raise RedisConnectionError("the usage store was closed")
            if self._conn is None and self._attempts != attempts_seen and self._last_failure is not None:
                # an attempt made while this call waited failed: no second one (a new exception of redis' kind:
                # the failure's own class may take other arguments)
                from redis.exceptions import ConnectionError as RedisConnectionError
                raise RedisConnectionError(f"the connection attempt failed: {self._last_failure}")
            if self._conn is None:
                self._attempts += 1
                conn = self._make()
                # The handshake (AUTH, SELECT) reads without a socket timeout on this connection: bounded here.
                try:
                    await asyncio.wait_for(self._handshake(conn), self.timeout)
                except BaseException as e:
                    await conn.disconnect(nowait=True)  # whatever failed (refused, NOPERM, cancelled): not left open
                    if isinstance(e, asyncio.TimeoutError):
                        from redis.exceptions import TimeoutError as RedisTimeoutError
                        e = RedisTimeoutError("Timeout connecting to server")
                    if not isinstance(e, asyncio.CancelledError):
                        self._last_failure = e
                    raise e from None
                self._last_failure = None
                self._conn = conn
                self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            return self._conn

    async def _handshake(self, conn) -> None:
        await conn.connect()
        for script in self.scripts:
            await conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", script), check_health=False)
            await conn.read_response()

    async def _read(self, conn) -> None:
        from redis.exceptions import ResponseError
        while True:
            try:
                # No timeout: an idle lane waits here for ever; a call's own timer bounds the wait for its answer.
                answer = await conn.read_response()
            except ResponseError as e:  # the command failed (NOSCRIPT, ...): the connection is fine
                answer = e
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # redis' ConnectionError (Redis went away, even while idle), ...
                self._broken(conn, e)
                return
            if not self._waiting:
                continue  # nothing asked (a RESP3 push): no one to give it to
            waiter = self._waiting.popleft()
            if waiter.done():
                continue
            if isinstance(answer, ResponseError):
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)

    def _timed_out(self, conn, answer: asyncio.Future) -> None:
        if not answer.done():
            from redis.exceptions import TimeoutError as RedisTimeoutError
            timeout = RedisTimeoutError(f"no answer within {self.timeout:g} s")
            if conn is not self._conn:  # its connection is gone already (closed, replaced): this call fails alone
                answer.set_exception(timeout)
                return
            self._broken(conn, timeout)

    def _broken(self, conn, e: BaseException) -> None:
        """Every call waiting on `conn` fails with `e`; the next call connects again."""
        if conn is not self._conn:
            return
        self._conn = None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(e)
        asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))

    def stop(self) -> None:
        """No more calls: the calls still waiting fail (the store is down for them), the reader ends; the
        connection is closed by aclose(), or on the loop if it runs."""
        self._stopped = True
        waiting, self._waiting = self._waiting, collections.deque()
        if waiting:
            from redis.exceptions import ConnectionError as RedisConnectionError
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_exception(RedisConnectionError("the usage store was closed"))
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # at exit, the loop stopped: the process' end closes it
        conn, self._conn = self._conn, None
        if conn is not None:
            loop.create_task(conn.disconnect(nowait=True))

    async def aclose(self) -> None:
        self.stop()


class RedisUsageStore:
    """Usage, budgets, in-flight chats and the new-user window in one Redis that every proxy shares."""

    shared = True

    def __init__(self, url: str, *, lease: float = LEASE, max_pending: int = 100_000,
                 on_error: Callable[[str], None] | None = None, on_info: Callable[[str], None] | None = None,
                 refresh: float = REFRESH, all_time_every: float = ALL_TIME_EVERY,
                 all_time_max: int = ALL_TIME_MAX, environ=os.environ):
        self.spec = RedisSpec(url, environ)
        self.path = self.spec.shown  # what the status page shows as "usage_file"
        self.lease = lease
        self.refresh = refresh
        self.all_time_every = all_time_every
        self.all_time_max = all_time_max
        self.max_pending = max_pending
        self.on_error = on_error or log.warning
        self.on_info = on_info or log.info
        self.error = ""  # "" while Redis answers; otherwise the line that said it does not
        self.proxy_id = secrets.token_hex(6)  # names this process' in-flight entries
        self.on_rows: Callable[[list[StoredUsage], str], None] | None = None  # the book's absorb
        self.today: Callable[[], str] | None = None
        self.writes = 0  # batches written
        self.lost_chats = self.lost_tokens = 0  # counted while Redis was away, past the queue's bound
        self._member_ids = itertools.count(1)
        # (user, day) -> [chats, tokens]; (user, day, chat id) -> [0, tokens] for a chat counted once per id
        self._pending: dict[tuple, list[int]] = {}
        self._unsent: list[tuple[str, dict[tuple, list[int]]]] = []  # (batch id, rows): retried as is
        self._held: dict[str, str] = {}  # member -> user: this proxy's entries, renewed until released
        self._releases: list[tuple[str, str]] = []
        self._client = None
        self._lane: DecisionLane | None = None
        self._no_script: type = Exception  # redis' NoScriptError, once redis is imported (load)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._scripts: dict[str, object] = {}
        self._renewed = 0.0
        self._snapshot_at = 0.0
        self._all_time: dict[str, tuple[int, int]] = {}  # user -> (chats, tokens) from the last all-time read
        self._all_time_at = float("-inf")

    # -- UsageStore ----------------------------------------------------------------------------------
    def load(self, today: str) -> list[StoredUsage]:
        """Starts the store's task (connect, write, renew, snapshot); the figures arrive with the first
        snapshot, through on_rows. Must be called on the running event loop."""
        self._client = self.spec.client()
        self._scripts = {name: self._client.register_script(src) for name, src in
                         (("apply", APPLY), ("reserve", RESERVE), ("renew", RENEW), ("admit", ADMIT))}
        from redis.exceptions import NoScriptError
        self._no_script = NoScriptError
        pool = self._client.connection_pool
        # The pool's kind of connection (TLS, password, db from the URL), without the per-read timeout.
        self._lane = DecisionLane(lambda: pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None}),
                                  scripts=(RESERVE,))
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return []

    def record(self, user: str, day: str, chats: int, tokens: int) -> None:
        row = self._pending.get((user, day))
        if row is None:
            if self._queued_rows() >= self.max_pending:
                self._lose(chats, tokens)
                return
            row = self._pending[(user, day)] = [0, 0]
        row[0] += chats
        row[1] += tokens
        self._kick()

    def record_chat(self, user: str, day: str, chat_id: str, tokens: int) -> None:
        """One chat's usage, counted once per chat id by every proxy sharing the store (this proxy's book
        counts it once already; Redis decides whether another proxy did, in the write itself)."""
        key = (user, day, chat_id)
        if key in self._pending:
            return  # reported twice before its write: once
        if self._queued_rows() >= self.max_pending:
            self._lose(0, tokens)
            return
        self._pending[key] = [0, tokens]
        self._kick()

    def close(self) -> None:
        """At exit: what is still queued is written (a blocking client: the loop is stopping), this proxy's
        in-flight entries are removed. While the proxy runs on, use aclose()."""
        batches = self._stop()
        entries = self._entries_to_remove()
        if not batches and not entries:
            return
        try:
            client = self.spec.client(asyncio_client=False)
            apply = client.register_script(APPLY)
            for batch_id, rows in batches:
                for suffix, args in _chunks(rows):
                    apply(keys=[PREFIX + "batch:" + batch_id + suffix], args=args)
            if entries:
                pipe = client.pipeline(transaction=False)
                for user, member in entries:
                    pipe.zrem(_flight_key(user), member)
                pipe.execute()
            client.close()
        except Exception as e:  # redis.RedisError, OSError: the loss is said, with its size
            self._say_lost(batches, e)

    async def aclose(self) -> None:
        """close() on the running loop (coze_usage_file or coze_usage_lease changed while the proxy runs):
        the same writes with the asyncio client, so the loop never waits for Redis."""
        if self._client is None:  # never loaded: nothing of it on the loop
            self.close()
            return
        batches = self._stop()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # cancelled: a call under way ends first
        try:
            entries = self._entries_to_remove()
            if batches or entries:
                for batch_id, rows in batches:
                    for suffix, args in _chunks(rows):
                        await self._scripts["apply"](keys=[PREFIX + "batch:" + batch_id + suffix], args=args)
                if entries:
                    pipe = self._client.pipeline(transaction=False)
                    for user, member in entries:
                        pipe.zrem(_flight_key(user), member)
                    await pipe.execute()
        except Exception as e:
            self._say_lost(batches, e)
        finally:
            if self._lane is not None:
                await self._lane.aclose()
            if self._client is not None:
                await self._client.aclose()

    def _entries_to_remove(self) -> list[tuple[str, str]]:
        """At close, (user, member) of every in-flight entry this proxy put in Redis and has not removed: the chats
        still in flight, and those that ended but whose removal had not been sent yet (else both would hold their
        places for the rest of a lease on every proxy)."""
        entries = [*self._releases, *((user, member) for member, user in self._held.items())]
        self._releases = []
        # Redis away: not asked again at exit (a connection attempt that may take seconds); they expire within
        # their lease, as release() says.
        return [] if self.error else entries

    def _stop(self) -> list[tuple[str, dict[tuple, list[int]]]]:
        """Stops the task; returns every batch still to write."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self._lane is not None:
            self._lane.stop()
        batches = self._unsent + ([("b" + secrets.token_hex(8), self._pending)] if self._pending else [])
        self._unsent, self._pending = [], {}
        return batches

    def _say_lost(self, batches, e: BaseException) -> None:
        """redis.RedisError, OSError at close: the loss is said, with its size."""
        chats = sum(c for _, rows in batches for c, _t in rows.values())
        tokens = sum(t for _, rows in batches for _c, t in rows.values())
        if chats or tokens:
            self.on_error(f"coze-mitm: usage store {self.path}: {chats} chats and {tokens} Coze tokens counted "
                          f"last could not be written at exit ({self._why(e)}); they are lost")

    # -- budgets and the parallel cap ----------------------------------------------------------------
    def new_member(self) -> str:
        return f"{self.proxy_id}:{next(self._member_ids)}"

    async def reserve(self, user: str, day: str, budget: int, cap: int, member: str) -> tuple[str, int, int]:
        """(GO | OVER | AT_CAP | DOWN, tokens used today, chats in flight), decided in one step for every
        proxy; with GO and a member, the chat is in flight under it (hold it, then release it)."""
        if self.error or self._client is None:
            return DOWN, 0, 0
        releases, self._releases = self._releases, []
        ended = [x for ended_user, ended_member in releases for x in (_flight_key(ended_user), ended_member)]
        args = (2, _day_key(day, "tokens"), _flight_key(user), user, budget, cap, member, int(self.lease * 1000), *ended)
        try:
            try:
                verdict, used, n = await self._lane.call("EVALSHA", self._scripts["reserve"].sha, *args)
            except self._no_script:
                # Redis restarted (or flushed its scripts): the script's source once, cached by Redis again.
                verdict, used, n = await self._lane.call("EVAL", RESERVE, *args)
        except Exception as e:
            self._releases[:0] = releases  # not removed: sent with the next call (else they keep places a lease)
            self._down(e)
            return DOWN, 0, 0
        if verdict == 0 and member:
            self._held[member] = user
        return (GO, OVER, AT_CAP)[int(verdict)], int(used), int(n)

    def release(self, member: str) -> None:
        user = self._held.pop(member, None)
        if user is None:
            return
        if not self.error:
            self._releases.append((user, member))
            self._kick()
        # Redis away: the entry expires within its lease (this proxy no longer renews it).

    async def admit(self, user: str, limit: int) -> int | None:
        """The team's new-users-per-minute window: 0 admitted, N > 0 seconds to wait, None when Redis
        cannot say (the proxy then applies its own window)."""
        if self.error or self._client is None:
            return None
        try:
            return int(await self._scripts["admit"](keys=[PREFIX + "new-users", PREFIX + "seen:" + user],
                                                    args=[user, limit]))
        except Exception as e:
            self._down(e)
            return None

    # -- the task --------------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        first = True
        while not self._closing:
            try:
                if self.error or first:
                    await self._client.ping()
                    # Up only once a write succeeds: a read-only replica (or an ACL without writes) answers
                    # PING, and every decision would fail again right after.
                    await self._client.set(PREFIX + "alive:" + self.proxy_id, "1", ex=max(60, int(self.lease)))
                    self._up(first)
                first = False
                await self._write()
                now = time.monotonic()
                if self._held and now - self._renewed >= self.lease / 3:
                    self._renewed = now
                    await self._renew()
                if now - self._snapshot_at >= self.refresh:
                    self._snapshot_at = now
                    await self._snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                first = False
                self._down(e)
            if self.error:  # away: try again once per refresh, however much is counted meanwhile
                await asyncio.sleep(self.refresh)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.refresh)
                except asyncio.TimeoutError:
                    pass
                else:
                    # Usage and ended chats gather for GATHER: one round trip for many chats, never one per chat
                    # right after its answer (it would take loop time from the next chat). This proxy's own
                    # decisions never wait for it: each carries the ended chats not written yet (reserve).
                    await asyncio.sleep(GATHER)
            self._wake.clear()

    async def _write(self) -> None:
        if self._pending:
            self._unsent.append(("b" + secrets.token_hex(8), self._pending))
            self._pending = {}
        while self._releases or self._unsent:
            releases, self._releases = self._releases, []
            ended = [x for user, member in releases for x in (_flight_key(user), member)]
            try:
                if not self._unsent:
                    await self._scripts["apply"](keys=[""], args=[PREFIX, DAY_TTL, COUNTED_TTL, len(releases), *ended])
                    continue
                batch_id, rows = self._unsent[0]
                for suffix, args in _chunks(rows, ended):
                    await self._scripts["apply"](keys=[PREFIX + "batch:" + batch_id + suffix], args=args)
                    releases = []  # the first chunk removed them
            except BaseException:
                self._releases[:0] = releases  # not removed yet: sent again with the next write
                raise
            self._unsent.pop(0)
            self.writes += 1

    async def _renew(self) -> None:
        args: list = [int(self.lease * 1000)]
        for member, user in self._held.items():
            args += [_flight_key(user), member]
        await self._scripts["renew"](keys=[], args=args)

    async def _snapshot(self) -> None:
        if self.on_rows is None or self.today is None:
            return
        today = self.today()
        now = time.monotonic()
        if now - self._all_time_at >= self.all_time_every:
            self._all_time_at = now
            await self._read_all_time()
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(_day_key(today, "chats"))
        pipe.hgetall(_day_key(today, "tokens"))
        chats_today, tokens_today = await pipe.execute()
        figures: dict[str, list[int]] = {user: [c, t, 0, 0] for user, (c, t) in self._all_time.items()}
        users = list(chats_today.keys() | tokens_today.keys())
        if users:  # today's users: their all-time figures as fresh as today's
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(PREFIX + "all:chats", users)
            pipe.hmget(PREFIX + "all:tokens", users)
            chats, tokens = await pipe.execute()
            for user, c, t in zip(users, chats, tokens):
                figures[user] = [int(c or 0), int(t or 0), int(chats_today.get(user) or 0),
                                 int(tokens_today.get(user) or 0)]
        # What this proxy counted but Redis has not acknowledged yet still shows.
        for rows in [self._pending, *(r for _, r in self._unsent)]:
            for (user, day, *_chat), (c, t) in rows.items():
                f = figures.setdefault(user, [0, 0, 0, 0])
                f[0] += c
                f[1] += t
                if day == today:
                    f[2] += c
                    f[3] += t
        self.on_rows([StoredUsage(u, *f) for u, f in figures.items()], today)

    async def _read_all_time(self) -> None:
        """At most all_time_max users' all-time figures (HSCAN: bounded round trips, never the whole hash)."""
        tokens: dict[str, str] = {}
        cursor = 0
        while True:
            cursor, part = await self._client.hscan(PREFIX + "all:tokens", cursor, count=SCAN_COUNT)
            tokens.update(part)
            if not cursor or len(tokens) >= self.all_time_max:
                break
        users = list(tokens)[:self.all_time_max]
        chats = await self._client.hmget(PREFIX + "all:chats", users) if users else []
        self._all_time = {u: (int(c or 0), int(tokens[u] or 0)) for u, c in zip(users, chats)}

    # -- health ----------------------------------------------------------------------------------------
    def _why(self, e: BaseException) -> str:
        return self.spec.scrub(f"{type(e).__name__}: {e}")[:300]

    def _down(self, e: BaseException) -> None:
        if self.error:
            return
        what = "unreachable" if _connection_problem(e) else "cannot be used"
        self.error = (f"coze-mitm: usage store {self.path} {what} ({self._why(e)}): users with a daily budget "
                      f"are refused until it answers, other traffic goes on; usage counted meanwhile is queued "
                      f"(up to {self.max_pending} user-days) and written when it is back")
        self.on_error(self.error)

    def _up(self, first: bool) -> None:
        if first and not self.error:
            self.on_info(f"coze-mitm: usage, budgets and the parallel cap shared through {self.path}")
            return
        self.error = ""
        queued = self._queued_rows()
        lost = (f"; {self.lost_chats} chats and {self.lost_tokens} Coze tokens counted while it was away did not "
                f"fit the queue and are lost" if self.lost_chats or self.lost_tokens else "")
        self.lost_chats = self.lost_tokens = 0  # said: the next outage counts afresh
        self.on_error(f"coze-mitm: usage store {self.path} reachable again; {queued} queued user-days are being "
                      f"written{lost}")

    def _queued_rows(self) -> int:
        return len(self._pending) + sum(len(rows) for _, rows in self._unsent)

    def _lose(self, chats: int, tokens: int) -> None:
        first = not (self.lost_chats or self.lost_tokens)
        self.lost_chats += chats
        self.lost_tokens += tokens
        if first:
            self.on_error(f"coze-mitm: usage store {self.path}: the queue of {self.max_pending} user-days is full; "
                          f"usage counted from now until Redis is back is kept in this proxy's memory only "
                          f"(its size is said when it is back)")


def _connection_problem(e: BaseException) -> bool:
    """Whether Redis could not be reached (rather than refusing: a wrong password, a read-only replica, ...)."""
    try:
        from redis.exceptions import AuthenticationError, ConnectionError as RedisConnectionError, TimeoutError
    except ImportError:
        return isinstance(e, OSError)
    if isinstance(e, AuthenticationError):
        return False
    return isinstance(e, (RedisConnectionError, TimeoutError, OSError, asyncio.TimeoutError))


def _day_key(day: str, what: str) -> str:
    return f"{PREFIX}day:{day}:{what}"


def _flight_key(user: str) -> str:
    return f"{PREFIX}flight:{user}"


def _chunks(rows: dict[tuple, list[int]], ended: list[str] = ()):
    """(key suffix, APPLY's args) per BATCH_ROWS rows: each chunk is its own idempotent write; the first also
    removes the `ended` in-flight entries ((set, member) pairs, flat). A row's key is (user, day), or (user, day,
    chat id) for a chat counted once per id."""
    items = list(rows.items())
    for n, start in enumerate(range(0, len(items), BATCH_ROWS)):
        args: list = [PREFIX, DAY_TTL, COUNTED_TTL, len(ended) // 2, *ended]
        ended = ()
        for (user, day, *chat), (c, t) in items[start:start + BATCH_ROWS]:
            args += [user, day, chat[0] if chat else "", c, t]
        yield f":{n}", args
