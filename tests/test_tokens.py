"""The token broker: JWT minting, the exchange against the strict stand-in, caching and single-flight."""

import asyncio
import time

import jwt
import pytest

from coze_mitm.core import config
from tests.conftest import CLIENT_ID, KID, write_config
from coze_mitm.core.exchange import CozeTokenExchange, ExchangeError, IssuedToken, scrub
from coze_mitm.core.tokens import LimitError, TokenBroker


@pytest.fixture
def exchange(tmp_path, rsa_key, standin):
    return CozeTokenExchange(config.load_oauth_config(write_config(tmp_path, rsa_key, standin.base_url)), timeout=3)


def test_jwt_claims(exchange, rsa_key, standin):
    token = exchange.mint_jwt("alice-0001")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": KID}
    claims = jwt.decode(token, rsa_key["public_pem"], algorithms=["RS256"], audience=standin.audience)
    assert claims["iss"] == CLIENT_ID
    assert claims["session_name"] == "alice-0001"
    assert claims["exp"] - claims["iat"] == 3600
    assert exchange.mint_jwt("alice-0001") != token  # a fresh jti every time
    assert jwt.decode(exchange.mint_jwt("x" * 8), options={"verify_signature": False})["jti"] != claims["jti"]


def test_exchange_reads_expires_in_as_absolute_time(exchange, standin):
    issued = exchange("alice-0001")
    assert issued.token.startswith("czs_")
    assert abs(issued.expires_at - (time.time() + 900)) < 5
    assert issued.logid
    assert issued.token not in repr(issued)
    assert standin.exchanges[0]["session_name"] == "alice-0001"
    assert standin.exchanges[0]["duration_seconds"] == 900


def test_exchange_refusal_explains_cn_com_mixup(tmp_path, rsa_key, standin):
    app = config.load_oauth_config(write_config(tmp_path, rsa_key, standin.base_url, client_id="999"))
    with pytest.raises(ExchangeError) as e:
        CozeTokenExchange(app)("alice-0001")
    assert e.value.status == 502 and e.value.code == 4100
    assert "invalid_client" in e.value.msg and "api.coze.com" in e.value.msg
    assert e.value.logid and e.value.logid in e.value.msg


def test_exchange_unreachable(tmp_path, rsa_key):
    app = config.load_oauth_config(write_config(tmp_path, rsa_key, "http://127.0.0.1:9"))
    with pytest.raises(ExchangeError) as e:
        CozeTokenExchange(app, timeout=2)("alice-0001")
    assert e.value.status == 502 and "cannot reach" in e.value.msg


def test_scrub_cuts_token_shapes():
    text = "bad czs_abcdef123 and pat_XYZ and eyJhbGciOi.eyJzdWIi.c2ln done"
    assert scrub(text) == "bad [redacted] and [redacted] and [redacted] done"


class CountingFetch:
    """The exchange's contract (user id in, IssuedToken out), with a clock the test controls."""

    def __init__(self, clock, lifetime=900, delay=0.0):
        self.clock, self.lifetime, self.delay, self.calls = clock, lifetime, delay, []

    def __call__(self, user_id):
        time.sleep(self.delay)
        self.calls.append(user_id)
        now = self.clock()
        return IssuedToken(f"czs_{user_id}_{len(self.calls)}", now + self.lifetime, now)


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_cached_until_close_to_expiry_then_renewed():
    clock = Clock()
    fetch = CountingFetch(clock)
    broker = TokenBroker(fetch, clock=clock)

    async def scenario():
        first = await broker.token_for("alice-0001")
        clock.now += 600
        assert await broker.token_for("alice-0001") == first  # fresh enough, cached
        clock.now += 100  # inside the last quarter: served from cache, renewed in the background
        assert await broker.token_for("alice-0001") == first
        await asyncio.sleep(0.05)
        renewed = await broker.token_for("alice-0001")
        assert renewed != first
        clock.now += 10_000  # expired: the request waits for a new one
        assert await broker.token_for("alice-0001") not in (first, renewed)

    run(scenario())
    assert fetch.calls == ["alice-0001"] * 3


def test_single_flight_per_user_parallel_across_users():
    clock = Clock()
    fetch = CountingFetch(clock, delay=0.3)
    broker = TokenBroker(fetch, clock=clock)

    async def scenario():
        t0 = time.monotonic()
        tokens = await asyncio.gather(*[broker.token_for(u) for u in ["alice-0001"] * 50 + ["bob-00002"] * 50])
        return tokens, time.monotonic() - t0

    tokens, elapsed = run(scenario())
    assert sorted(fetch.calls) == ["alice-0001", "bob-00002"]
    assert len(set(tokens)) == 2
    assert elapsed < 0.6 * 2  # the two exchanges overlapped


def test_event_loop_keeps_running_during_exchange():
    clock = Clock()
    broker = TokenBroker(CountingFetch(clock, delay=0.3), clock=clock)

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        await broker.token_for("alice-0001")
        t.cancel()
        return ticks

    assert run(scenario()) > 10


def test_failure_reaches_every_waiter_and_is_not_cached():
    clock = Clock()
    calls = []

    def failing(user_id):
        calls.append(user_id)
        raise ExchangeError(502, 5000, "exchange-unreachable", "nope")

    broker = TokenBroker(failing, clock=clock)

    async def scenario():
        results = await asyncio.gather(*[broker.token_for("alice-0001") for _ in range(5)], return_exceptions=True)
        assert all(isinstance(r, ExchangeError) for r in results)
        with pytest.raises(ExchangeError):
            await broker.token_for("alice-0001")

    run(scenario())
    assert len(calls) == 2
    assert broker.failures == 2


def test_lru_bound_and_invalidate():
    clock = Clock()
    fetch = CountingFetch(clock)
    broker = TokenBroker(fetch, clock=clock, max_users=2)

    async def scenario():
        a = await broker.token_for("user-aaaa")
        await broker.token_for("user-bbbb")
        await broker.token_for("user-aaaa")  # a is now the most recent
        await broker.token_for("user-cccc")  # evicts b
        assert [u for u, _ in broker.users()] == ["user-aaaa", "user-cccc"]
        assert not broker.invalidate("user-aaaa", "czs_some_other")
        assert broker.invalidate("user-aaaa", a)
        assert await broker.token_for("user-aaaa") != a

    run(scenario())
    assert fetch.calls.count("user-aaaa") == 2


def test_new_users_per_minute_limit():
    clock = Clock()
    fetch = CountingFetch(clock)
    broker = TokenBroker(fetch, clock=clock, new_users_per_minute=2)

    async def scenario():
        await broker.token_for("user-aaaa")
        await broker.token_for("user-bbbb")
        with pytest.raises(LimitError) as e:
            await broker.token_for("user-cccc")
        assert 1 <= e.value.retry_after <= 61
        await broker.token_for("user-aaaa")  # known users are not limited
        clock.now += 61
        await broker.token_for("user-cccc")

    run(scenario())
    assert fetch.calls == ["user-aaaa", "user-bbbb", "user-cccc"]


def test_total_wait_bounded_queue_included_late_work_skipped():
    # 4 workers, exchanges of 1 s, 1.5 s allowed: the first round is served; the second round starts in
    # time but ends too late (504, its tokens are still cached); the third would start after every
    # waiter gave up, so it is never sent.
    clock = Clock()
    fetch = CountingFetch(clock, delay=1.0)
    broker = TokenBroker(fetch, clock=clock, workers=4, timeout=1.5)
    users = [f"user-{i:04d}" for i in range(12)]

    async def scenario():
        return await asyncio.gather(*[broker.token_for(u) for u in users], return_exceptions=True)

    results = run(scenario())
    served = [r for r in results if isinstance(r, str)]
    timed_out = [r for r in results if isinstance(r, ExchangeError)]
    assert len(served) == 4 and len(timed_out) == 8
    assert all(e.status == 504 and e.reason == "exchange-timeout" for e in timed_out)
    time.sleep(1.2)  # let the second round finish: its tokens are kept, the third round never ran
    assert len(fetch.calls) == 8


def test_promised_burst_never_queued():
    # 30 new users at once, each exchange taking most of the allowed time: none waits behind another.
    clock = Clock()
    fetch = CountingFetch(clock, delay=1.0)
    broker = TokenBroker(fetch, clock=clock, timeout=2.5)
    users = [f"user-{i:04d}" for i in range(30)]

    async def scenario():
        return await asyncio.gather(*[broker.token_for(u) for u in users], return_exceptions=True)

    assert all(isinstance(r, str) for r in run(scenario()))
    assert sorted(fetch.calls) == users


def test_exchange_answer_read_with_a_bound_and_scrubbed(tmp_path, rsa_key):
    # A token endpoint that answers a compression bomb, then one that echoes the signed assertion.
    import json, threading, zlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            assertion = self.headers["Authorization"].removeprefix("Bearer ")
            seen.append(assertion)
            if len(seen) == 1:
                c = zlib.compressobj(9, zlib.DEFLATED, 31)
                body = c.compress(b'{"access_token":"' + b"a" * (32 << 20) + b'"}') + c.flush()
                headers = {"Content-Encoding": "gzip"}
            else:
                body = json.dumps({"error_code": assertion[:40], "error_message": assertion}).encode()
                headers = {"X-Tt-Logid": assertion}
            self.send_response(200 if len(seen) == 1 else 400)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = config.load_oauth_config(write_config(tmp_path, rsa_key, f"http://127.0.0.1:{server.server_address[1]}"))
        exchange = CozeTokenExchange(app, timeout=5)
        with pytest.raises(ExchangeError) as bomb:
            exchange("alice-0001")
        assert bomb.value.reason == "exchange-garbage" and "not a JSON object of at most 64 KiB" in bomb.value.msg
        with pytest.raises(ExchangeError) as echo:
            exchange("alice-0001")
    finally:
        server.shutdown()
        server.server_close()
    assert echo.value.reason == "exchange-refused"
    for part in [seen[1], *seen[1].split("."), seen[1][:40]]:
        assert part not in echo.value.msg and part not in echo.value.logid
