"""usage_redis.py against a real redis-server (in process): the URL and its password, the atomic budget
decision, idempotent writes, the bounded queue while Redis is away, expiring in-flight entries."""

from __future__ import annotations

import asyncio
import time

import pytest

from coze_mitm.core import usage_redis
from coze_mitm.core.usage_book import UsageBook, utc_day
from coze_mitm.core.usage_flight import SharedInFlight
from coze_mitm.core.usage_redis import AT_CAP, DOWN, GO, OVER, RedisSpec, RedisUsageStore
from tests import redis_server

needs_redis = pytest.mark.skipif(
    redis_server.binary() is None or usage_redis.redis_available() != "",
    reason="needs Debian's redis-server (run_tests.py installs it as root: apt-get install redis-server) and the "
           "Python package redis (requirements.txt)")


@pytest.fixture
def server(tmp_path):
    s = redis_server.RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def store_for(url, lines, **kw):
    env = {usage_redis.PASSWORD_ENV: redis_server.PASSWORD}
    return RedisUsageStore(url, on_error=lines.append, on_info=lines.append, environ=env, **kw)


class TestSpec:
    def test_the_password_never_shows(self):
        spec = RedisSpec("redis://:s3cr%2Ft@cache.example:6380/2", environ={})
        assert spec.password == "s3cr/t" and (spec.host, spec.port, spec.db) == ("cache.example", 6380, 2)
        assert spec.shown == "redis://cache.example:6380/2"
        assert spec.scrub("auth s3cr/t failed, s3cr%2Ft") == "auth *** failed, ***"

    def test_password_from_the_environment_and_tls(self):
        spec = RedisSpec("rediss://redis.internal", environ={usage_redis.PASSWORD_ENV: "from-env"})
        assert spec.password == "from-env" and spec.tls and spec.shown == "rediss://redis.internal:6379/0"

    @pytest.mark.parametrize("url", ["redis://", "redis://host:port/0", "redis://host/abc", "http://host"])
    def test_bad_urls_say_what_a_redis_url_is(self, url):
        with pytest.raises(ValueError, match="coze_usage_file"):
            RedisSpec(url, environ={})


@needs_redis
@pytest.mark.process
def test_budget_and_cap_are_decided_once_for_everyone(server):
    """Two stores (two proxies) racing 40 chat starts of one user: exactly `cap` go, then the budget holds."""
    async def main():
        lines = []
        a, b = store_for(server.url, lines), store_for(server.url, lines)
        for s in (a, b):
            s.load(utc_day(time.time()))
        day = utc_day(time.time())
        verdicts = await asyncio.gather(*[(a if i % 2 else b).reserve("u-1", day, 100, 4, f"m{i}") for i in range(40)])
        assert [v[0] for v in verdicts].count(GO) == 4
        assert [v[0] for v in verdicts].count(AT_CAP) == 36
        # spend the budget through a; b sees it at once (its decision reads Redis, not its own book)
        a.record("u-1", day, 1, 120)
        await until(lambda: server.client().hget(f"coze-mitm:day:{day}:tokens", "u-1") == "120")
        assert await b.reserve("u-1", day, 100, 4, "late") == (OVER, 120, 0)
        assert await b.reserve("u-2", day, 100, 4, "other") == (GO, 0, 1)  # another user is not touched
        for s in (a, b):
            s.close()
        assert not [line for line in lines if "unreachable" in line]
    run(main())


@needs_redis
@pytest.mark.process
def test_in_flight_entries_expire_unless_renewed(server):
    """A proxy that stops renewing (it died) frees its entries within the lease; a live one keeps them."""
    async def main():
        lines = []
        live, dead = store_for(server.url, lines, lease=1.5), store_for(server.url, lines, lease=1.5)
        live.load("x")
        dead.load("x")
        day = utc_day(time.time())
        assert (await live.reserve("u-1", day, 100, 2, live.new_member()))[0] == GO
        assert (await dead.reserve("u-1", day, 100, 2, dead.new_member()))[0] == GO
        assert (await live.reserve("u-1", day, 100, 2, "third"))[0] == AT_CAP
        dead._task.cancel()  # as if killed: no renewal, no release
        dead._closing = True
        started = time.monotonic()
        while (await live.reserve("u-1", day, 100, 2, "third"))[0] != GO:
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.1)
        # the dead one's place came free; the live one's is still held (renewed every lease / 3)
        assert server.client().zcard("coze-mitm:flight:u-1") == 2
        live.close()
        assert server.client().zcard("coze-mitm:flight:u-1") == 0  # closing gives back what it held
    run(main())


@needs_redis
@pytest.mark.process
def test_shared_in_flight_releases_its_entries(server):
    async def main():
        store = store_for(server.url, [])
        store.load("x")
        flight = SharedInFlight(store)
        day = utc_day(time.time())
        for key in ("flow-1", "ws-1", "ws-1"):
            member = store.new_member()
            assert (await store.reserve("u-1", day, 100, 4, member))[0] == GO
            flight.add(key, "u-1", member)
        assert server.client().zcard("coze-mitm:flight:u-1") == 3
        flight.rekey("flow-1", "poll:flow-1")
        flight.release("ws-1")  # one of the socket's two chats ended
        await until(lambda: server.client().zcard("coze-mitm:flight:u-1") == 2)
        flight.release_all("poll:flow-1")
        flight.release_all("ws-1")
        await until(lambda: server.client().zcard("coze-mitm:flight:u-1") == 0)
        assert not store.error
        store.close()
    run(main())


@needs_redis
@pytest.mark.process
def test_writes_are_idempotent_and_the_status_sees_every_proxy(server):
    async def main():
        a, b = store_for(server.url, []), store_for(server.url, [], refresh=0.05)
        book_a, book_b = UsageBook(a), UsageBook(b)
        book_a.load()
        book_b.load()
        book_a.chat("alice")
        book_a.tokens("alice", 30)
        book_b.tokens("alice", 12)
        await until(lambda: [r["tokens"] for r in book_b.rows()] == [42])
        assert book_b.rows() == [{"user": "alice", "chats": 1, "tokens": 42, "tokens_today": 42}]
        # a batch applied twice (the reply was lost, the proxy retries with the same id) counts once
        args = next(usage_redis._chunks({("alice", utc_day(time.time())): [0, 5]}))[1]
        for _ in range(2):
            await a._scripts["apply"](keys=["coze-mitm:batch:fixed:0"], args=args)
        await until(lambda: [r["tokens"] for r in book_b.rows()] == [47])
        book_a.tokens("bob", 3)
        a.close()  # at once, before its task could write: close() writes what is queued
        assert server.client().hget(f"coze-mitm:day:{utc_day(time.time())}:tokens", "bob") == "3"
        b.close()
    run(main())


@needs_redis
@pytest.mark.process
def test_a_chat_reported_through_two_proxies_counts_once(server):
    """The same chat's usage reported by two proxies (a client retrieving it through each, or one polling it):
    counted once; the chat's "counted" mark expires after COUNTED_TTL; a retried write is still counted once."""
    from coze_mitm.core.usage import Usage

    async def main():
        a, b = store_for(server.url, []), store_for(server.url, [], refresh=0.05)
        book_a, book_b = UsageBook(a), UsageBook(b)
        book_a.load()
        book_b.load()
        day = utc_day(time.time())
        assert book_a.tokens("alice", Usage(30, 10, 20, "chat-1"))
        assert book_b.tokens("alice", Usage(30, 10, 20, "chat-1"))  # B's own book never saw it
        assert book_b.tokens("alice", Usage(5, 2, 3, "chat-2"))
        book_b.tokens("alice", 4)  # usage without a chat id: added as it comes
        await until(lambda: server.client().hget(f"coze-mitm:day:{day}:tokens", "alice") == "39"
                    and not b._pending and not b._unsent)
        await until(lambda: [r["tokens"] for r in book_b.rows()] == [39])
        assert server.client().hget("coze-mitm:all:tokens", "alice") == "39"
        ttl = server.client().ttl("coze-mitm:counted:5:alice:chat-1")
        assert usage_redis.COUNTED_TTL - 60 < ttl <= usage_redis.COUNTED_TTL
        # a batch applied twice (its reply lost) with a new chat in it: the chat counts once
        args = next(usage_redis._chunks({("alice", day, "chat-3"): [0, 7]}))[1]
        for _ in range(2):
            await a._scripts["apply"](keys=["coze-mitm:batch:chats:0"], args=args)
        # and the same chat in another batch (another proxy's report): not added either
        args = next(usage_redis._chunks({("alice", day, "chat-3"): [0, 7]}))[1]
        await a._scripts["apply"](keys=["coze-mitm:batch:other:0"], args=args)
        assert server.client().hget(f"coze-mitm:day:{day}:tokens", "alice") == "46"
        # a user id holding ':' cannot take another user's chat mark ("a:b" + "c" is not "a" + "b:c")
        assert book_a.tokens("a:b", Usage(1, 1, 0, "c"))
        assert book_a.tokens("a", Usage(2, 1, 1, "b:c"))
        a.close()
        assert server.client().hget(f"coze-mitm:day:{day}:tokens", "a:b") == "1"
        assert server.client().hget(f"coze-mitm:day:{day}:tokens", "a") == "2"
        b.close()
    run(main())


@needs_redis
@pytest.mark.process
def test_redis_away_refuses_budget_decisions_and_queues_usage(tmp_path):
    """Redis down at start: one line, decisions say DOWN at once, usage waits (bounded) and is written when
    Redis comes; what did not fit is said with its size."""
    server = redis_server.RedisServer(tmp_path / "redis")
    async def main():
        lines = []
        store = store_for(server.url, lines, max_pending=2, refresh=0.05)
        book = UsageBook(store)
        book.load()
        await until(lambda: store.error)
        assert len(lines) == 1 and f"usage store {server.url} unreachable" in lines[0]
        assert await store.reserve("u-1", utc_day(time.time()), 100, 4, "m") == (DOWN, 0, 0)
        for user, tokens in (("u-1", 10), ("u-2", 20), ("u-1", 5), ("u-3", 40)):  # u-3: a third row, over the bound
            book.tokens(user, tokens)
        assert "queue of 2 user-days is full" in lines[-1]
        server.start()
        await until(lambda: not store.error and not store._unsent and not store._pending)
        assert "reachable again" in lines[-1] and "1 chats" not in lines[-1] and "40 Coze tokens" in lines[-1]
        day = utc_day(time.time())
        assert server.client().hgetall(f"coze-mitm:day:{day}:tokens") == {"u-1": "15", "u-2": "20"}
        assert not any(redis_server.PASSWORD in line for line in lines)
        store.close()
    try:
        run(main())
    finally:
        server.stop()


@needs_redis
@pytest.mark.process
def test_new_users_per_minute_is_one_window_for_every_proxy(server):
    """Two brokers (two proxies) with a limit of 2 new users a minute: the third new user is refused by either;
    a user the other proxy admitted is not new."""
    from coze_mitm.core.exchange import IssuedToken
    from coze_mitm.core.tokens import LimitError, TokenBroker

    def fetch(user):
        now = time.time()
        return IssuedToken(f"czs_{user}", now + 900, now)

    async def main():
        a, b = store_for(server.url, []), store_for(server.url, [])
        brokers = []
        for store in (a, b):
            store.load("x")
            broker = TokenBroker(fetch, new_users_per_minute=2)
            broker.admission = store.admit
            brokers.append(broker)
        assert await brokers[0].token_for("user-1") == "czs_user-1"
        assert await brokers[1].token_for("user-2") == "czs_user-2"
        with pytest.raises(LimitError, match="across the proxies") as refused:
            await brokers[0].token_for("user-3")
        assert 1 <= refused.value.retry_after <= 61
        assert await brokers[1].token_for("user-1") == "czs_user-1"  # new to this proxy, not to the team
        # Redis away: each proxy's own window decides again
        a.error = "down"
        assert await brokers[0].token_for("user-3") == "czs_user-3"
        for broker in brokers:
            broker.close()
        a.close()
        b.close()
    run(main())


def test_a_snapshot_of_more_users_than_the_book_keeps_is_summed_once():
    """The book keeps max_users; the rest of a shared snapshot is OTHERS, the same figures every second."""
    from coze_mitm.core.usage_book import OTHERS, StoredUsage
    book = UsageBook(max_users=2)
    today = utc_day(time.time())
    rows = [StoredUsage(f"user-{i}", 1, 10 * i, 1, 10 * i) for i in range(1, 6)]
    for _ in range(3):  # three snapshots of the same figures
        book.absorb(rows, today)
    shown = book.rows()
    assert [r["user"] for r in shown] == ["user-5", "user-4", OTHERS]
    assert shown[-1] == {"user": OTHERS, "chats": 3, "tokens": 60, "tokens_today": 60}
    assert sum(r["tokens"] for r in shown) == 150


@needs_redis
@pytest.mark.process
def test_a_wrong_password_is_said_without_the_password(server):
    async def main():
        lines = []
        store = RedisUsageStore(f"redis://:wrong-pw-1234@127.0.0.1:{server.port}/0", on_error=lines.append,
                                on_info=lines.append, environ={})
        store.load("x")
        await until(lambda: store.error)
        assert lines == [store.error]
        assert f"usage store redis://127.0.0.1:{server.port}/0 cannot be used (AuthenticationError" in store.error
        assert "wrong-pw-1234" not in store.error and server.password not in store.error
        assert await store.reserve("u-1", utc_day(time.time()), 100, 4, "m") == (DOWN, 0, 0)
        store.close()
    run(main())


def commands(client, name: str) -> int:
    """How many times a Redis server ran the command `name` (INFO commandstats)."""
    return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


@needs_redis
@pytest.mark.process
def test_a_read_only_replica_is_one_line_until_it_takes_writes(server, tmp_path):
    """A replica answers PING but refuses writes: the store stays "cannot be used" (one line), not back and
    forth every second; it is back (one line) once writes succeed."""
    replica = redis_server.RedisServer(tmp_path / "replica", extra=(
        "--replicaof", "127.0.0.1", str(server.port), "--masterauth", server.password)).start()

    async def main():
        lines = []
        store = store_for(replica.url, lines, refresh=0.05)
        store.load("x")
        await until(lambda: store.error)
        assert "cannot be used (ReadOnlyError" in store.error
        pings = commands(replica.client(), "ping")
        await until(lambda: commands(replica.client(), "ping") >= pings + 5)  # five more tries, each refused
        assert lines == [store.error]
        assert await store.reserve("u-1", utc_day(time.time()), 100, 4, "m") == (DOWN, 0, 0)
        replica.client().replicaof("NO", "ONE")  # promoted: writes go through
        await until(lambda: not store.error)
        assert len(lines) == 2 and "reachable again" in lines[1]
        assert (await store.reserve("u-1", utc_day(time.time()), 100, 4, "m"))[0] == GO
        await store.aclose()
    try:
        run(main())
    finally:
        replica.stop()


@needs_redis
@pytest.mark.process
@pytest.mark.parametrize("closing", ["aclose", "close"])
def test_closing_frees_the_places_of_chats_that_ended_just_before(server, closing):
    """A chat that ended moments before the store closes (its removal still gathering for the next write) and one
    still in flight: both places are free for the other proxies at once, not after the 30 s lease."""
    async def main():
        store = store_for(server.url, [])
        store.load("x")
        day = utc_day(time.time())
        ended, running = store.new_member(), store.new_member()
        assert (await store.reserve("u-1", day, 100, 4, ended))[0] == GO
        assert (await store.reserve("u-1", day, 100, 4, running))[0] == GO
        assert server.client().zcard("coze-mitm:flight:u-1") == 2
        store.release(ended)  # gathered for the next write (up to 20 ms away), or the next decision
        if closing == "aclose":
            await store.aclose()
        else:
            store.close()  # at exit: the blocking client
        assert server.client().zcard("coze-mitm:flight:u-1") == 0
    run(main())


@needs_redis
@pytest.mark.process
def test_ended_chats_free_their_places_even_when_a_decision_fails(server):
    """The ended chats a failing call carried are sent with the next one, not left to expire with the lease."""
    async def main():
        lines = []
        store = store_for(server.url, lines, refresh=0.05)  # the default lease: 30 s
        store.load("x")
        day = utc_day(time.time())
        member = store.new_member()
        assert (await store.reserve("u-1", day, 100, 4, member))[0] == GO
        assert server.client().zcard("coze-mitm:flight:u-1") == 1
        server.client().client_pause(2500, all=False)  # writes (scripts too) wait: the next call times out
        store.release(member)  # the chat ended; its removal rides on the next call...
        assert (await store.reserve("u-2", day, 100, 4, "m2"))[0] == DOWN  # ...which fails
        assert "unreachable (TimeoutError" in store.error
        await until(lambda: server.client().zcard("coze-mitm:flight:u-1") == 0)  # well within the lease
        await store.aclose()
    run(main())


@needs_redis
@pytest.mark.process
def test_a_burst_of_decisions_rides_one_connection(server):
    """200 decisions at once are pipelined on the store's decision connection: one command each, no connection
    per decision (the store's other work uses its bounded pool)."""
    async def main():
        store = store_for(server.url, [])
        store.load("x")
        day = utc_day(time.time())
        verdicts = await asyncio.gather(*[store.reserve(f"u-{i}", day, 100, 4, f"m{i}") for i in range(200)])
        assert [v[0] for v in verdicts] == [GO] * 200
        assert [v[2] for v in verdicts] == [1] * 200  # each its own user's first chat in flight
        # the script was loaded when the connection opened: no decision failed with NOSCRIPT and was sent again
        stats = server.client().info("commandstats")
        # (a decision answered NOSCRIPT is sent again as EVAL; the store's task also renews, by EVALSHA)
        assert stats["cmdstat_evalsha"]["calls"] >= 200 and "cmdstat_eval" not in stats
        # this test's client, the decision connection and the pool's (MAX_CONNECTIONS at most)
        assert int(server.client().info("clients")["connected_clients"]) <= 3
        await store.aclose()
    run(main())


@needs_redis
@pytest.mark.process
def test_decisions_go_on_after_redis_forgets_the_script_or_drops_the_connection(server):
    """A Redis restarted from its file has no scripts cached (NOSCRIPT: the script is sent once more); a decision
    connection that Redis closed while idle (its `timeout`, a restart) is opened again by the next decision."""
    async def main():
        lines = []
        store = store_for(server.url, lines)
        store.load("x")
        day = utc_day(time.time())
        assert (await store.reserve("u-1", day, 100, 4, "m1"))[:2] == (GO, 0)
        server.client().script_flush()
        assert await store.reserve("u-1", day, 100, 4, "m2") == (GO, 0, 2)
        lane_id = await store._lane.call("CLIENT", "ID")
        assert server.client().client_kill_filter(_id=lane_id) == 1
        await until(lambda: store._lane._conn is None)  # the reader saw it close
        assert await store.reserve("u-1", day, 100, 4, "m3") == (GO, 0, 3)
        assert not store.error and not lines[1:], lines
        await store.aclose()
    run(main())


@needs_redis
@pytest.mark.process
def test_a_decision_waiting_when_the_store_closes_is_answered_down_not_left_waiting(server):
    """The store replaced (coze_usage_file changed, a script reload) while Redis holds a decision back: the
    chat is refused as with Redis away, at once, instead of waiting for ever (its flow's hook never returning)."""
    async def main():
        store = store_for(server.url, [])
        store.load("x")
        day = utc_day(time.time())
        assert (await store.reserve("u-1", day, 100, 4, "m1"))[0] == GO  # the decision connection is open
        server.client().client_pause(20_000)  # Redis answers nobody for 20 s
        pending = asyncio.ensure_future(store.reserve("u-1", day, 100, 4, "m2"))
        await until(lambda: store._lane._waiting)
        await asyncio.wait_for(store.aclose(), 15)
        assert (await asyncio.wait_for(pending, 15))[0] == DOWN
        assert (await store.reserve("u-1", day, 100, 4, "m3"))[0] == DOWN  # closed: never connects again
    try:
        run(main())
    finally:
        server.client().client_unpause()


@needs_redis
def test_decisions_queued_behind_a_connection_that_never_answers_fail_with_it(tmp_path):
    """A Redis that takes connections and never answers (a hung host, a black-holed port): one connection
    attempt times out, and the decisions that queued behind it fail with it instead of each trying in turn
    (8 queued decisions would otherwise wait up to 8 timeouts)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the connections; nothing ever reads or answers them
    try:
        async def main():
            store = store_for(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", [])
            store.load("x")
            store._lane.timeout = 0.5
            day = utc_day(time.time())
            verdicts = await asyncio.gather(*[store.reserve(f"u-{i}", day, 100, 4, f"m{i}") for i in range(8)])
            assert [v[0] for v in verdicts] == [DOWN] * 8
            # (a decision that reached the lane after the first attempt had failed may try once more)
            assert store._lane._attempts <= 2
            await store.aclose()
        run(main())
    finally:
        silent.close()


@needs_redis
@pytest.mark.process
def test_the_snapshot_reads_today_every_time_and_all_time_rarely_and_bounded(server):
    """The all-time hashes hold every user id ever seen: read once a minute, all_time_max users at most;
    today's users are read every second, their all-time figures with them."""
    client = server.client()
    client.hset("coze-mitm:all:tokens", mapping={f"old-{i}": i for i in range(5000)})
    client.hset("coze-mitm:all:chats", mapping={f"old-{i}": 1 for i in range(5000)})
    client.hset("coze-mitm:all:tokens", "alice", 100)
    client.hset("coze-mitm:all:chats", "alice", 2)

    async def main():
        store = store_for(server.url, [], refresh=0.05, all_time_max=300)
        snapshots = []
        book = UsageBook(store)
        book.load()
        absorb = store.on_rows
        store.on_rows = lambda rows, today: (snapshots.append(len(rows)), absorb(rows, today))
        book.tokens("alice", 7)
        def alice():
            return next((r for r in book.rows() if r["user"] == "alice"), None)
        await until(lambda: len(snapshots) >= 5 and (alice() or {}).get("tokens") == 107)
        assert alice() == {"user": "alice", "chats": 2, "tokens": 107, "tokens_today": 7}
        assert max(snapshots) <= 300 + 1  # the bound, plus today's user
        assert commands(client, "hgetall") <= 2 * len(snapshots)  # today's two hashes, never the all-time ones
        scans = commands(client, "hscan")
        assert 1 <= scans <= 300 // usage_redis.SCAN_COUNT + 2  # one bounded read (default: once a minute)
        await store.aclose()
    run(main())


@needs_redis
@pytest.mark.process
def test_replacing_a_redis_store_while_running_closes_it_off_the_loop_and_hides_the_password(tmp_path, caplog,
                                                                                             monkeypatch):
    """coze_usage_file changed while the proxy runs: the old Redis store is closed by a task on the loop, not by
    a blocking client in configure. A password in the URL: one warning naming COZE_REDIS_PASSWORD, never it."""
    import logging
    import socket

    from mitmproxy.test import taddons

    from coze_mitm.options import OptionsOnly
    from coze_mitm.parts.accounting import Accounting

    monkeypatch.delenv(usage_redis.PASSWORD_ENV, raising=False)
    silent = socket.socket()  # accepts connections (the kernel's backlog) but never answers: Redis hanging
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]

    async def main():
        acc = Accounting()
        with taddons.context(OptionsOnly(), acc) as tctx:
            with caplog.at_level(logging.INFO):
                url = f"redis://:pw-in-url-4711@127.0.0.1:{port}/0"
                tctx.configure(acc, confdir=str(tmp_path), coze_usage_file=url)
                acc.running()
                acc.book.tokens("bob", 3)
                tctx.configure(acc, coze_usage_file="memory")
                # configure returned before any attempt to write: the close waits on the loop, not in it
                assert not [r for r in caplog.records if "could not be written" in r.getMessage()]
                assert acc._closing
                await until(lambda: not acc._closing)
        text = [r.getMessage() for r in caplog.records]
        assert any("3 Coze tokens counted last could not be written" in line for line in text)
        warned = [line for line in text if "password in the URL" in line]
        assert len(warned) == 1 and "COZE_REDIS_PASSWORD" in warned[0]
        assert not any("pw-in-url-4711" in line for line in text)
    try:
        run(main())
    finally:
        silent.close()
