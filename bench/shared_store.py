"""coze-mitm benchmark, the shared store (issue 28): what a budgeted chat start costs with Redis against SQLite,
and how many requests per second two proxies sharing one Redis sustain against one.

    python bench/shared_store.py                # ~2 min; prints the figures (docs/benchmarks.md quotes them)
    python bench/shared_store.py --rounds 300 --seconds 5    # shorter

Needs Debian's redis-server and the Python package redis. Everything runs on this machine against the local
Coze stand-in (sandbox/, not Coze), Redis on loopback with the persistence docs/team.md recommends
(appendonly, appendfsync always):

1. the decision alone, in process: the SQLite store's budget check + in-flight count (memory only: SQLite is
   written by its own thread) against one Redis round trip of the reserve script; wall time per decision, and
   the CPU the event loop's thread spends on it (what no other flow can use meanwhile);
2. end to end: budgeted non-streamed /v3/chat through a real mitmdump with coze_usage_file=<sqlite file>
   and one with coze_usage_file=redis://..., interleaved, client-measured latency;
3. throughput: client threads sending budgeted chats of 32 users for N seconds through one proxy, then split
   over two proxies sharing the Redis (each proxy one process, i.e. one core at most).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

from bench.sections.common import machine, no_nagle, pct, session  # noqa: E402
from coze_mitm.core import usage_redis  # noqa: E402
from coze_mitm.core.usage_book import UsageBook, budget_refusal, utc_day  # noqa: E402
from coze_mitm.core.usage_flight import InFlight  # noqa: E402
from sandbox.coze_standin import make_sandbox_app, write_config  # noqa: E402
from tests import redis_server  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402

PAGE = "https://chat.example.org"
USERS = [f"1732000000000-benchUser{i:04d}" for i in range(32)]


def chat_body(user: str) -> dict:
    return {"bot_id": "7000", "user_id": user, "stream": False,
            "additional_messages": [{"role": "user", "content": "one two", "content_type": "text"}]}


def headers(user: str) -> dict:
    return {"Authorization": f"Bearer user:{user}", "Content-Type": "application/json"}


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


# -- 1. the decision alone ------------------------------------------------------------------------------
def decision_cost(server, rounds: int) -> dict:
    book, flight = UsageBook(), InFlight()
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(rounds):
        budget_refusal(book, USERS[i % 32], "u", 10**9, "POST", "/v3/chat")
        flight.count(USERS[i % 32])
        flight.add(str(i), USERS[i % 32])
        flight.release_all(str(i))
    sqlite_wall, sqlite_cpu = (time.perf_counter() - t0) / rounds, (time.thread_time() - c0) / rounds

    async def redis_rounds():
        store = usage_redis.RedisUsageStore(server.url, environ={usage_redis.PASSWORD_ENV: server.password},
                                            on_error=print, on_info=lambda _line: None)
        store.load(utc_day(time.time()))
        day = utc_day(time.time())
        for _ in range(50):  # connection up, scripts loaded
            await store.reserve(USERS[0], day, 10**9, 0, "")
        walls, cpu = [], 0.0
        for i in range(rounds):
            member = store.new_member()
            t, c = time.perf_counter(), time.thread_time()
            await store.reserve(USERS[i % 32], day, 10**9, 4, member)
            cpu += time.thread_time() - c
            walls.append(time.perf_counter() - t)
            store.release(member)  # written by the store's task, in the background (not timed)
        store.close()
        return walls, cpu / rounds

    out = {"sqlite_wall": sqlite_wall, "sqlite_cpu": sqlite_cpu}
    for policy in ("always", "everysec"):
        server.client().config_set("appendfsync", policy)
        walls, cpu = asyncio.run(redis_rounds())
        out[policy] = (statistics.median(walls), pct(walls, 99), cpu)
    server.client().config_set("appendfsync", "always")
    return out


# -- 2. end to end -----------------------------------------------------------------------------------------
def end_to_end(sqlite_proxy, redis_proxy, base: str, rounds: int) -> dict:
    times = {"sqlite": [], "redis": []}
    clients = {"sqlite": session(sqlite_proxy), "redis": session(redis_proxy)}
    for i in range(rounds + 50):
        for name in (("sqlite", "redis") if i % 2 else ("redis", "sqlite")):
            user = USERS[i % 32]
            t = time.perf_counter()
            r = clients[name].post(f"{base}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
            elapsed = time.perf_counter() - t
            assert r.status_code == 200 and r.json()["code"] == 0, r.text
            if i >= 50:  # the first rounds mint tokens and open connections
                times[name].append(elapsed)
    return {name: (statistics.median(v), pct(v, 99)) for name, v in times.items()}


# -- 3. throughput -------------------------------------------------------------------------------------------
def throughput(proxies, base: str, seconds: float, clients: int) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def client(n: int):
        s = session(proxies[n % len(proxies)])
        user = USERS[n % 32]
        while time.monotonic() < stop:
            r = s.post(f"{base}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
            assert r.status_code == 200 and r.json()["code"] == 0, r.text
            counts[n] += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(counts) / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/shared_store.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000, help="decisions / chats per store (default 1000)")
    p.add_argument("--seconds", type=float, default=15, help="length of each throughput run (default 15)")
    p.add_argument("--clients", type=int, default=16, help="client threads in the throughput runs (default 16)")
    args = p.parse_args(argv)
    if redis_server.binary() is None or usage_redis.redis_available():
        print("needs redis-server (apt-get install redis-server) and the Python package redis")
        return 1
    print(f"== {machine()}")
    standin, app_config = make_sandbox_app(delta_gap=0)
    no_nagle(standin)
    standin.start()
    started = []
    with tempfile.TemporaryDirectory(prefix="coze-bench-redis-") as tmp:
        work = Path(tmp)
        server = redis_server.RedisServer(work / "redis").start()
        try:
            d = decision_cost(server, args.rounds)
            print(f"decision alone ({args.rounds} rounds): SQLite store {us(d['sqlite_wall'])} "
                  f"(loop CPU {us(d['sqlite_cpu'])}); " + "; ".join(
                      f"Redis reserve, appendfsync {policy}: median {us(d[policy][0])}, p99 {us(d[policy][1])} "
                      f"(loop CPU {us(d[policy][2])})" for policy in ("always", "everysec")))
            config_path = work / "oauth.json"
            write_config(str(config_path), app_config)
            common = [f"coze_config={config_path}", f"coze_origins={PAGE}", "coze_user_daily_tokens=1000000000",
                      "coze_new_users_per_minute=0"]

            def proxy(name: str, store: str) -> Mitmdump:
                confdir = work / name
                confdir.mkdir()
                m = Mitmdump(confdir, [*common, f"coze_usage_file={store}"])
                started.append(m)
                m.start()
                return m

            os.environ[usage_redis.PASSWORD_ENV] = server.password  # the proxies read it from there
            sqlite_proxy = proxy("sqlite", str(work / "usage.sqlite"))
            redis_a = proxy("redis-a", server.url)
            redis_b = proxy("redis-b", server.url)
            assert redis_a.wait_for_output("shared through", 20) and redis_b.wait_for_output("shared through", 20)
            for policy in ("always", "everysec"):
                server.client().config_set("appendfsync", policy)
                e = end_to_end(sqlite_proxy, redis_a, standin.base_url, args.rounds)
                print(f"budgeted chat start end to end, appendfsync {policy} ({args.rounds} each, interleaved): "
                      f"SQLite median {e['sqlite'][0] * 1000:.3f} ms p99 {e['sqlite'][1] * 1000:.3f} ms; Redis median "
                      f"{e['redis'][0] * 1000:.3f} ms p99 {e['redis'][1] * 1000:.3f} ms; difference of medians "
                      f"{(e['redis'][0] - e['sqlite'][0]) * 1000:+.3f} ms (target: within 0.2 ms)")
            server.client().config_set("appendfsync", "everysec")
            runs = {"sqlite": [], "one": [], "two": []}
            slice_s = args.seconds / 3
            for _ in range(3):  # interleaved thirds: the machine's other load falls on all three alike
                runs["sqlite"].append(throughput([sqlite_proxy], standin.base_url, slice_s, args.clients))
                runs["one"].append(throughput([redis_a], standin.base_url, slice_s, args.clients))
                runs["two"].append(throughput([redis_a, redis_b], standin.base_url, slice_s, args.clients))
            sq, one, two = (statistics.median(runs[k]) for k in ("sqlite", "one", "two"))
            print(f"throughput (appendfsync everysec), {args.clients} client threads, 3 x {slice_s:g} s each, medians: "
                  f"one proxy (SQLite) {sq:.0f} req/s; one proxy (Redis) {one:.0f} req/s; two proxies sharing the "
                  f"Redis {two:.0f} req/s ({two / one:.2f}x one); all: {runs}")
            cpu = server.client().info("cpu")
            redis_chats = 2 * (args.rounds + 50) + 3 * slice_s * (statistics.mean(runs["one"]) + statistics.mean(runs["two"]))
            print(f"Redis' own CPU for all of it: {cpu['used_cpu_user'] + cpu['used_cpu_sys']:.2f} s for about "
                  f"{redis_chats:.0f} budgeted chats through the Redis proxies and {2 * args.rounds} decisions "
                  f"(~{(cpu['used_cpu_user'] + cpu['used_cpu_sys']) / (redis_chats + 2 * args.rounds) * 1e6:.0f} us each)")
        finally:
            for m in started:
                m.stop()
            server.stop()
            standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
