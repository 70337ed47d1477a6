"""In-process sections, no proxy: minting a JWT, and the memory a cached user costs."""

from __future__ import annotations

import asyncio
import gc
import secrets
import statistics
import time
import tracemalloc

import jwt

from coze_mitm.core.exchange import CozeTokenExchange, IssuedToken
from coze_mitm.core.tokens import TokenBroker

from .common import Row, ms, pct


def bench_jwt(exchange: CozeTokenExchange, pem: str, n: int) -> list[Row]:
    for _ in range(20):
        exchange.mint_jwt("warm-up-user")
    loaded = []
    for i in range(n):
        t0 = time.perf_counter()
        exchange.mint_jwt(f"user-{i:06d}-bench")
        loaded.append(time.perf_counter() - t0)
    claims = {"iss": exchange.app.client_id, "aud": exchange.audience, "iat": int(time.time()),
              "exp": int(time.time()) + 3600, "jti": secrets.token_urlsafe(24), "session_name": "user-pem-bench"}
    from_pem = []
    for _ in range(max(5, n // 25)):
        t0 = time.perf_counter()
        jwt.encode(claims, pem, algorithm="RS256", headers={"kid": exchange.app.public_key_id})
        from_pem.append(time.perf_counter() - t0)
    med, med_pem = statistics.median(loaded), statistics.median(from_pem)
    return [
        Row("mint one JWT (key loaded once), median / p99", f"{ms(med)} / {ms(pct(loaded, 99))}",
            f"PEM string each time: {ms(med_pem)}", f"{med_pem / med:.0f}x cheaper", "<= 2 ms", med <= 0.002),
    ]


def bench_memory(n_users: int) -> tuple[list[Row], dict]:
    """Memory per cached user: a TokenBroker filled through token_for (its real code path) with a fast fetch."""
    now = time.time()

    def fast_fetch(user_id: str) -> IssuedToken:
        # What Coze hands out: a czs_ token (~50 chars), an absolute expiry, a logid.
        return IssuedToken("czs_" + secrets.token_urlsafe(36), now + 900, now,
                           time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(13).upper())

    def user_ids(k: int, prefix: str) -> list[str]:
        # The userscript's shape: <first-use ms>-<128 random bits, base64url> (36 chars).
        return [f"{int(now * 1000) - i}-{secrets.token_urlsafe(16)}" for i in range(k)]

    async def fill(broker: TokenBroker, ids: list[str]) -> None:
        for user_id in ids:
            await broker.token_for(user_id)

    broker = TokenBroker(fast_fetch, max_users=n_users + 1000, new_users_per_minute=0)
    warm = user_ids(200, "w")
    later = user_ids(n_users, "u")
    asyncio.run(fill(broker, warm))  # worker threads, first allocations: not per-user costs
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    asyncio.run(fill(broker, later))
    del later  # the cache keeps its own references to the ids; the list is the benchmark's
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    cached = len(broker.users())
    broker.close()
    per_user = grown / n_users
    return [Row(f"memory per cached user ({cached:,} cached, tracemalloc)", f"{per_user:,.0f} B",
                f"{grown / 1024 / 1024:.1f} MiB for {n_users:,}", "", "<= 2 KB (2048 B)", per_user <= 2048)], \
        {"per_user": per_user}
